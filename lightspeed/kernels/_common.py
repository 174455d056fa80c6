"""Shared by every kernel file: the optional Triton import, interpreter detection, the
Programmatic Dependent Launch (PDL) support check and a few launch helpers (whether PDL is
wanted is a KernelSettings field, kernels/settings.py).

NOTE: triton is optional. Without it, `triton.jit` is an inert decorator and `tl` a stub
with `constexpr`, so the kernel files still import and their `<op>_ref` functions work;
only the Triton launchers refuse to run.
"""
from __future__ import annotations

import functools
import types

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by tests/kernels/test_dispatch.py in a subprocess
    HAS_TRITON = False

    def _inert_jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_inert_jit, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(int(n) - 1, 0).bit_length())
    tl = types.SimpleNamespace(constexpr=None)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter.

    NOTE: Triton decides this when it is imported (TRITON_INTERPRET=1 must be set before);
    its own library functions are then InterpretedFunction objects.
    """
    return HAS_TRITON and type(tl.standard.sum).__name__ == "InterpretedFunction"


def _patch_interpreter() -> None:
    """NOTE: Triton 3.6's interpreter keeps scalars as 1-element arrays and converts them
    with int(array), which numpy >= 2.4 refuses; a loop `range(lo, hi)` over loaded values
    then fails. Wrap its tensor patching so that __index__ takes the element instead."""
    import numpy as np
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor
    if getattr(orig, "_lightspeed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lightspeed = True
    interpreter._patch_lang_tensor = patched

    # NOTE: the interpreter also rounds float32 -> bf16 toward zero (the GPU rounds to
    # nearest even), and float32 -> e4m3 loses the carry of a round-up into the next binade
    # (31.5 -> 16); convert through torch so that interpreted kernels round like the GPU.
    orig_convert = interpreter._convert_float

    def convert_float(data, src_ty, dst_ty, rounding_mode):
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.bfloat16)
            return t.view(torch.int16).numpy().view(np.uint16)
        if src_ty == tl.float32 and dst_ty == tl.float8e4nv:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.float8_e4m3fn)
            return t.view(torch.uint8).numpy()
        return orig_convert(data, src_ty, dst_ty, rounding_mode)

    interpreter._convert_float = convert_float


if interpreter_active():
    _patch_interpreter()


def require_triton(*tensors: torch.Tensor) -> None:
    """A Triton launcher runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: `pip install triton==3.6.0`, or use the <op>_ref path")
    if interpreter_active():
        return
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(f"Triton kernels need CUDA tensors (got {t.device}); on CPU use the reference, "
                               "or set TRITON_INTERPRET=1 before importing triton")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must be contiguous (strides {tuple(t.stride())})")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------
# Programmatic Dependent Launch.
#
# A kernel launched with launch_pdl=True may start while its predecessor in the stream is
# still running. Every kernel here therefore
#   * loads only static data (weights, metadata written before the step) before
#     `tl.extra.cuda.gdc_wait()`, and stores nothing before it;
#   * calls `tl.extra.cuda.gdc_launch_dependents()` once it no longer needs its inputs.
# Both sit under `if USE_PDL:` (a constexpr), so they are compiled only when PDL is on and
# never reach the interpreter.
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def pdl_supported(device: torch.device) -> bool:
    """The GPU of `device` runs PDL launches (sm_90+; never under the interpreter)."""
    if not (HAS_TRITON and device.type == "cuda") or interpreter_active():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9


def use_pdl(device: torch.device, enabled: bool = True) -> bool:
    """A launcher's PDL flag: `enabled` (KernelSettings.pdl, passed down) and supported here."""
    return enabled and pdl_supported(device)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small stand-in under the interpreter."""
    if device.type != "cuda" or interpreter_active():
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def dot_in_f32() -> bool:
    """NOTE: Triton 3.6's interpreter computes a bf16 x bf16 tl.dot wrongly; under the
    interpreter every kernel upcasts its dot operands to float32 (exact for bf16/fp16)."""
    return interpreter_active()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait until the predecessor grid has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    """Let the next kernel in the stream start launching (it still waits for us in pdl_wait)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def dot(a, b, F32: tl.constexpr):
    """tl.dot with float32 accumulation; operands upcast to float32 when F32 (interpreter);
    float32 operands multiply in full precision (not tf32)."""
    if F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
