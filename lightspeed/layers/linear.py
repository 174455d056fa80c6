"""Linear layers whose matmul goes through one dispatch point, `linear()`.

A fused layer (qkv_proj, gate_up_proj) stacks several HF projections along the output
dim; `output_sizes` records the pieces so the loader can copy each HF tensor into its rows:

    weight [sum(output_sizes), in_features]
    rows:  | shard 0 (q) | shard 1 (k) | shard 2 (v) |

FP8 (`quantize_fp8_`): weight [out, in] float8_e4m3fn and weight_scale [out] float32 with
W ~= weight * weight_scale[:, None] (per output channel); `linear()` then runs fp8_linear.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lightspeed import kernels
from lightspeed.kernels.settings import DEFAULT_SETTINGS, KernelSettings

INVARIANT_MAX_ROWS = 64  # = kernels.MAX_VERIFY_Q


def _use_gemv(x: torch.Tensor, weight: torch.Tensor, ks: KernelSettings) -> bool:
    """The bf16/fp16 GEMV policy for M <= 16 tokens (KernelSettings.gemv_mode): "never"
    (cuBLAS), "always" (Triton gemv), or "tuned" (the (M, N, K, dtype) shapes that
    ensure_gemv_tuned measured faster than cuBLAS; the default); always in batch-invariant mode."""
    m = x.shape[0]
    if x.dim() != 2 or m > kernels.MAX_M or weight.stride(-1) != 1 or not ks.use_triton(x) \
            or kernels.needs_grad(x, weight):
        return False  # NOTE: CPU float32 weights are column-major (pack_weight): not for the GEMV
    if ks.batch_invariant:
        return True
    if ks.gemv_mode == "never":
        return False
    return ks.gemv_mode == "always" or (m, weight.shape[0], weight.shape[1], weight.dtype) in ks.state.gemv_faster


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, ks: KernelSettings = DEFAULT_SETTINGS) -> torch.Tensor:
    """x: [num_tokens, in], weight: [out, in] (fp8 with scale [out]), bias: [out] -> [num_tokens, out].

    NOTE: the single place every projection's matmul runs: fp8_linear when the weight is
    FP8; the Triton GEMV for small M where the policy says it beats cuBLAS; else F.linear
    (cuBLAS on CUDA, MKL on CPU). Batch invariance (ks.batch_invariant): every projection
    (lm_head included) with M <= 64 rows runs the Triton GEMV in its batch-invariant form
    (kernels/gemv.py; 16-row pieces past 16), so a verify step (M = k + 1, or a tree's
    nodes + 1) computes each row's bits as a decode step (M = 1) does.
    """
    if ks.batch_invariant and kernels.MAX_M < x.shape[0] <= INVARIANT_MAX_ROWS and x.dim() == 2 \
            and ks.use_triton(x) and not kernels.needs_grad(x, weight):
        return torch.cat([linear(part, weight, bias, scale, ks) for part in x.split(kernels.MAX_M)])
    if scale is not None:
        return kernels.fp8_linear(x, weight, scale, bias, batch_invariant=ks.batch_invariant, ks=ks)
    if _use_gemv(x, weight, ks):
        return kernels.gemv(x, weight, bias, batch_invariant=ks.batch_invariant, ks=ks)
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The storage `linear()` runs fastest with, for an [out, in] weight; same logical shape.

    NOTE: on CPU, MKL streams a column-major weight (memory laid out [in, out]) 1.3-1.5x
    faster than row-major at num_tokens 1-2 (batch-1 decode, the case lightspeed is built
    for); at 4-8 tokens it is ~15% slower, from 64 tokens on the same (AMD EPYC, 2 cores).
    float32 only (bf16 gains nothing); other devices keep HF's row-major layout.
    """
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 \
            and weight.is_contiguous():
        return weight.t().contiguous().t()
    return weight


class Linear(nn.Module):
    """y = x W^T + b, with W stored [out_features, in_features] as in HF checkpoints."""

    kernel_settings: KernelSettings = DEFAULT_SETTINGS  # the runner's (bind_kernel_settings)

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features = in_features
        self.out_features = sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.register_buffer("weight_scale", None)  # [out] float32 once quantized to FP8

    def shard(self, param_name: str, shard_id: int | None) -> torch.Tensor:
        """The rows of `weight`/`bias` that the HF tensor of shard `shard_id` fills (a view)."""
        param = getattr(self, param_name)
        if shard_id is None:
            return param.data
        offset = sum(self.output_sizes[:shard_id])
        return param.data.narrow(0, offset, self.output_sizes[shard_id])

    def process_weights_after_loading(self) -> None:
        if self.weight_scale is None:
            self.weight.data = pack_weight(self.weight.data)

    def quantize_fp8_(self, make=None, device: torch.device | None = None) -> None:
        """Weight -> e4m3 with per-output-channel scales (kernels.quantize_fp8_per_channel);
        make(shape) -> a fresh weight (on `device`) in place of the stored one (random models)."""
        if self.weight_scale is not None:
            return
        w8, scale = kernels.quantize_fp8_per_channel(self.weight.data if make is None else make(self.weight.shape))
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale = scale

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in]: the weight, or for FP8 weight * scale in float32 (exports, e.g. to HF)."""
        if self.weight_scale is None:
            return self.weight.data
        return self.weight.data.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor, skip_bias: bool = False) -> torch.Tensor:
        """skip_bias: the caller adds the bias in a fused epilogue (qkv_rope_cache)."""
        return linear(x, self.weight, None if skip_bias else self.bias, self.weight_scale, self.kernel_settings)

    def extra_repr(self) -> str:
        q = ", fp8" if self.weight_scale is not None else ""
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}{q}"


QUANTIZATIONS = (None, "fp8")


def quantize_model_(model: nn.Module, method: str | None, skip: tuple[str, ...] = ("lm_head",), *, make=None,
                    device: torch.device | None = None) -> int:
    """Quantize in place every module with `quantize_fp8_` (Linear, MoE Experts) except those
    whose name ends with one of `skip` (embeddings and routers have none); -> how many.
    make, device: passed to each quantize_fp8_ (random_model builds FP8 weights this way)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {method!r}")
    if method is None:
        return 0
    n = 0
    for name, module in model.named_modules():
        if hasattr(module, "quantize_fp8_") and not name.endswith(skip):
            module.quantize_fp8_(make=make, device=device)
            n += 1
    return n


def ensure_gemv_tuned(model: nn.Module, m: int, device: torch.device, ks: KernelSettings) -> None:
    """In "tuned" mode on CUDA with Triton: for each bf16/fp16 Linear shape of `model` (lm_head
    included) not yet measured at this M (<= 16), time cuBLAS and the Triton GEMV under a
    CUDA graph, cycling through enough weight copies to miss L2, and remember in ks.state
    where the GEMV is faster. Call it outside graph capture, before the first step of M tokens.
    NOTE: measured once per settings object and shape; ks.state.gemv_timings keeps the figures."""
    if ks.gemv_mode != "tuned" or ks.batch_invariant or m > kernels.MAX_M or device.type != "cuda":
        return
    shapes = getattr(model, "_linear_shapes", None)
    if shapes is None:
        shapes = sorted({(mod.weight.shape[0], mod.weight.shape[1], mod.weight.dtype) for mod in model.modules()
                         if isinstance(mod, Linear) and mod.weight_scale is None
                         and mod.weight.dtype in (torch.bfloat16, torch.float16)}, key=str)
        model._linear_shapes = shapes
    state = ks.state
    todo = [(n, k, dtype) for n, k, dtype in shapes if (m, n, k, dtype) not in state.gemv_timings]
    if not todo or not ks.use_triton(torch.empty(0, device=device)):
        return
    gemv = functools.partial(kernels.gemv, ks=ks)
    for n, k, dtype in todo:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        copies = max(1, min(32, -(-4 * l2 // (n * k * 2))))
        ws = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(copies)]
        x = torch.randn(m, k, device=device, dtype=dtype)
        try:
            t = {name: _graph_time(lambda f=f: [f(x, w) for w in ws], 20) / copies
                 for name, f in (("cublas", F.linear), ("gemv", gemv))}
        except Exception as e:  # noqa: BLE001 - a GEMV that cannot run here just stays on cuBLAS
            warnings.warn(f"GEMV tuning of {m}x{n}x{k} failed, using cuBLAS: {type(e).__name__}: {e}")
            t = {"cublas": 0.0, "gemv": float("inf")}
        (state.gemv_faster.add if t["gemv"] < t["cublas"] else state.gemv_faster.discard)((m, n, k, dtype))
        state.gemv_timings[(m, n, k, dtype)] = (round(t["cublas"], 2), round(t["gemv"], 2))
        del ws


def _graph_time(fn, reps: int) -> float:
    """Median microseconds of one replay of a CUDA graph of fn (after a warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(1e3 * a.elapsed_time(b))
    return sorted(times)[len(times) // 2]
