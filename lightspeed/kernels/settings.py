"""KernelSettings: every setting that changes which kernel runs or its arithmetic, in one
object that the ModelRunner owns and passes down (DESIGN.md convention 8).

    runner = ModelRunner(model, ..., kernel_settings=KernelSettings(pdl=False))
        -> bind_kernel_settings(model, settings)   every module keeps a reference
        -> Linear / RMSNorm / Attention / MoE       kernels.<op>(..., ks=self.kernel_settings)
        -> launchers                                pdl=ks.use_pdl(device)

Two engines in one process (a target and its draft, two eval rows, a test) hold two
settings objects and never change each other's numbers. Environment variables give the
defaults of a new object only: LIGHTSPEED_DISABLE_TRITON=1 (torch references everywhere),
LIGHTSPEED_DISABLE_PDL=1, LIGHTSPEED_BF16_GEMV=never|always|tuned.

KernelState holds what a runner learns while it runs (measured GEMV-vs-cuBLAS choices,
tile-config overrides, split-K tile counters); it belongs to one settings object.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from lightspeed.kernels._common import HAS_TRITON, interpreter_active, pdl_supported

GEMV_MODES = ("never", "always", "tuned")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@dataclass
class KernelState:
    """Mutable per-runner kernel state (see the module docstring)."""

    # (M, N, K, dtype) of bf16/fp16 GEMVs measured faster than cuBLAS (layers/linear.py ensure_gemv_tuned)
    gemv_faster: set[tuple[int, int, int, torch.dtype]] = field(default_factory=set)
    # (M, N, K, dtype) -> (cuBLAS us, GEMV us) of those measurements
    gemv_timings: dict[tuple, tuple[float, float]] = field(default_factory=dict)
    # (op, M, N, K, weight dtype) -> GEMV / fused-MoE tile-config overrides (kernels/gemv.py)
    tuned_configs: dict[tuple, dict] = field(default_factory=dict)
    # device -> [4096] int32 split-K tile counters, zero between launches (kernels/gemv.py)
    counters: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def set_tuned_config(self, m: int, n: int, k: int, weight_dtype: torch.dtype, config: dict,
                         op: str = "gemv") -> None:
        self.tuned_configs[(op, m, n, k, weight_dtype)] = dict(config)


@dataclass(frozen=True)
class KernelSettings:
    """Which kernels run, and how. Frozen: derive variants with `replace(...)`."""

    triton: bool = field(default_factory=lambda: not _env_on("LIGHTSPEED_DISABLE_TRITON"))
    triton_on_cpu: bool = False  # the Triton path on CPU tensors too (tests, TRITON_INTERPRET=1 only)
    pdl: bool = field(default_factory=lambda: not _env_on("LIGHTSPEED_DISABLE_PDL"))
    # every projection with <= 64 rows through the batch-invariant GEMV (layers/linear.py)
    batch_invariant: bool = False
    # bf16/fp16 GEMV for M <= 16: "never" (cuBLAS), "always" (Triton), "tuned" (where measured faster)
    gemv_mode: str = field(default_factory=lambda: os.environ.get("LIGHTSPEED_BF16_GEMV", "tuned"))
    # small steps of dense Llama-family layers in 8 launches per layer, not 10 (kernels/fused_gemv.py)
    fused_layers: bool = True
    state: KernelState = field(default_factory=KernelState, compare=False, repr=False)

    def __post_init__(self):
        if self.gemv_mode not in GEMV_MODES:
            raise ValueError(f"gemv mode must be never, always or tuned, got {self.gemv_mode!r}")

    def replace(self, **changes) -> "KernelSettings":
        """A copy with `changes` and a fresh KernelState (nothing learned is shared)."""
        return dataclasses.replace(self, state=KernelState(), **changes)

    def use_triton(self, t: torch.Tensor) -> bool:
        """Triton when it imports and is not disabled, for CUDA tensors (not under the
        interpreter unless triton_on_cpu); CPU tensors only with triton_on_cpu under the interpreter."""
        if not self.triton or not HAS_TRITON:
            return False
        if t.is_cuda:
            return not interpreter_active() or self.triton_on_cpu
        return self.triton_on_cpu and interpreter_active()

    def use_pdl(self, device: torch.device) -> bool:
        """PDL for a launch on `device`: asked for, and the GPU supports it (sm_90+)."""
        return self.pdl and pdl_supported(device)


# NOTE: immutable defaults for code that runs a model outside a runner (training, unit
# tests of one layer); a runner binds its own settings to its model.
DEFAULT_SETTINGS = KernelSettings()


def bind_kernel_settings(model: nn.Module, settings: KernelSettings) -> None:
    """Give every module of `model` a reference to `settings` (`module.kernel_settings`)."""
    for module in model.modules():
        module.kernel_settings = settings
