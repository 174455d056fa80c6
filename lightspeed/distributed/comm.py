"""All-reduce for one tensor-parallel group: a one-shot all-reduce over peer-mapped
(symmetric) buffers for the small messages of a decode step, NCCL (gloo on CPU) otherwise.

One-shot (PyTorch's `torch.ops.symm_mem.one_shot_all_reduce`): every rank copies its input
into its own symmetric buffer, then each rank reads all peers' buffers over NVLink and sums
them: one kernel, one hop, no ring. It wins at batch-1 sizes (a few KB per layer); NCCL wins
for large messages. Both are graph-capturable.

    buffer (per dtype): [ONE_SHOT_MAX_BYTES / itemsize] on every rank, rendezvous'd once
                        by `prepare` (outside CUDA graphs), which also checks it against NCCL
    call with n values: buffer[:n] <- x; barrier; out = sum over ranks of buffer[:n] (one kernel)

NOTE: NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, set
by `no_multicast_env` before any process group exists); only the peer-load one-shot op is
used, never the multimem one.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from lightspeed.layers.norm import rms_norm

ONE_SHOT_MAX_BYTES = 256 * 1024  # larger messages: NCCL (one-shot reads world_size x the bytes)
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def no_multicast_env() -> None:
    """Turn NVLink multicast off for NCCL and symmetric memory (call before init_process_group)."""
    os.environ.update(NO_MULTICAST_ENV)


def one_shot_available(device: torch.device) -> bool:
    """PyTorch's symmetric-memory one-shot op exists here (a CUDA build with symm_mem)."""
    if device.type != "cuda":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        return hasattr(torch.ops.symm_mem, "one_shot_all_reduce")
    except (ImportError, AttributeError, RuntimeError):
        return False


def all_reduce_add_rmsnorm_ref(parts: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor,
                               eps: float):
    """The semantics of the fused op, for tests: parts [world] x [T, H] (each rank's partial
    sum) -> (rms_norm(sum(parts) + residual), sum(parts) + residual)."""
    total = torch.stack(parts).sum(0)
    if residual is not None:
        total = total + residual
    return rms_norm(total, weight, eps), total


def choose_method(world_size: int, has_one_shot: bool, is_cuda: bool, is_contiguous: bool, nbytes: int,
                  max_bytes: int) -> str:
    """"none" (one rank), "one_shot" (a small contiguous CUDA message, buffers ready), else the
    group's backend: "nccl" for CUDA tensors, "gloo" for CPU ones."""
    if world_size == 1:
        return "none"
    if has_one_shot and is_cuda and is_contiguous and nbytes <= max_bytes:
        return "one_shot"
    return "nccl" if is_cuda else "gloo"


class Communicator:
    """All-reduce of one group; `method(x)` says which implementation a tensor takes."""

    def __init__(self, group, world_size: int, device: torch.device, enable_one_shot: bool = True,
                 one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES):
        self.group, self.world_size, self.device = group, world_size, device
        self.one_shot_max_bytes = one_shot_max_bytes
        self.has_one_shot = enable_one_shot and world_size > 1 and one_shot_available(device)
        self.buffers: dict[torch.dtype, torch.Tensor] = {}  # dtype -> symmetric buffer [buffer_numel(dtype)]
        self.counts = {"one_shot": 0, "nccl": 0, "gloo": 0, "none": 0}  # calls per method (tests, reports)

    def method(self, x: torch.Tensor) -> str:
        return choose_method(self.world_size, self.has_one_shot and x.dtype in self.buffers, x.is_cuda,
                             x.is_contiguous(), x.numel() * x.element_size(), self.one_shot_max_bytes)

    def buffer_numel(self, dtype: torch.dtype) -> int:
        return self.one_shot_max_bytes // torch.empty((), dtype=dtype).element_size()

    def prepare(self, dtype: torch.dtype) -> bool:
        """Collective, outside any CUDA graph, before the first step: allocate and rendezvous
        the symmetric buffer of `dtype`, then check one one-shot all-reduce against the backend's
        on every rank; any failure or mismatch anywhere turns one-shot off for this dtype on all
        ranks (NCCL then). -> whether one-shot is on."""
        if not self.has_one_shot or dtype in self.buffers:
            return dtype in self.buffers
        ok, buf = True, None
        try:
            import torch.distributed._symmetric_memory as symm_mem
            symm_mem.enable_symm_mem_for_group(self.group_name)  # idempotent; older releases need it
            buf = symm_mem.empty(self.buffer_numel(dtype), dtype=dtype, device=self.device)
            symm_mem.rendezvous(buf, self.group_name)
            x = torch.arange(4096, device=self.device).remainder(7).to(dtype) * (1 + dist.get_rank(self.group))
            got = torch.ops.symm_mem.one_shot_all_reduce_copy(buf[: x.numel()], x, "sum", self.group_name)
            want = x.clone()
            dist.all_reduce(want, group=self.group)
            ok = bool(torch.equal(got, want))
        except Exception as e:  # noqa: BLE001 - any failure means: use the backend instead
            warnings.warn(f"one-shot all-reduce unavailable ({type(e).__name__}: {e}); using NCCL")
            ok = False
        flag = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if int(flag.item()):
            self.buffers[dtype] = buf
        return dtype in self.buffers

    @property
    def group_name(self) -> str:
        return (self.group or dist.group.WORLD).group_name

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; in place for the backend path, a new tensor for one-shot."""
        how = self.method(x)
        self.counts[how] += 1
        if how == "none":
            return x
        if how == "one_shot":  # one kernel: copy into this rank's buffer, barrier, sum all peers'
            buf = self.buffers[x.dtype][: x.numel()]
            return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x.view(-1), "sum", self.group_name).view(x.shape)
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max_(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max over ranks, in place (FP8 scales of split input dims)."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., world * n], rank-major (vocabulary-parallel logits)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_reduce_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None, norm) -> tuple:
        """(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual) through `norm`
        (an RMSNorm: the Triton add+RMSNorm kernel on CUDA). NOTE: two launches on the one-shot
        path (the reduce, then add+norm in one kernel); a single fused kernel is future work."""
        x = self.all_reduce(x)
        return norm(x) if residual is None else norm(x, residual)
