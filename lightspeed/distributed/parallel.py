"""The tensor-parallel context a sharded model is built with, the checks of a size against a
model, and process-group setup (NCCL on GPU, gloo on CPU; every collective times out).

    rank r of N holds: q heads [r Hq/N, (r+1) Hq/N); KV heads [r Hkv/N, ...) or, when
    Hkv < N, KV head r Hkv / N (replicated: N / Hkv ranks share it); intermediate columns
    [r I/N, ...); vocabulary rows [r V', (r+1) V') with V' = ceil(V / N) (the tail padded);
    Llama 4 experts [r E/N, ...) (expert parallel) or every expert's columns [r I/N, ...).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightspeed.config import ModelConfig
from lightspeed.distributed.comm import Communicator, no_multicast_env
from lightspeed.errors import DistributedError, InvalidRequestError


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    comm: Communicator
    expert_parallel: bool = False

    def split(self, n: int) -> tuple[int, int]:
        """(start, size) of this rank's even share of n (n divisible by world_size)."""
        size = n // self.world_size
        return self.rank * size, size

    def vocab_split(self, vocab_size: int) -> tuple[int, int]:
        """(start, size) of this rank's vocabulary rows; size = ceil(V / N) on every rank."""
        size = -(-vocab_size // self.world_size)
        return self.rank * size, size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, number of KV heads) this rank holds (one, replicated, when Hkv < N)."""
        if num_kv_heads >= self.world_size:
            return self.split(num_kv_heads)
        return self.rank * num_kv_heads // self.world_size, 1


def check_parallel(config: ModelConfig, world_size: int, expert_parallel: bool = False) -> None:
    """InvalidRequestError naming what `world_size` does not divide."""
    n, c = world_size, config
    bad = []
    if c.num_attention_heads % n:
        bad.append(f"{c.num_attention_heads} attention heads")
    kv = c.num_key_value_heads
    if (kv >= n and kv % n) or (kv < n and n % kv):
        bad.append(f"{kv} KV heads (need KV heads divisible by the size, or the size by the KV heads)")
    sizes = [("intermediate size", c.intermediate_size)]
    if c.num_local_experts:
        if c.intermediate_size_mlp:
            sizes = [("dense intermediate size", c.intermediate_size_mlp),
                     ("shared-expert intermediate size", c.intermediate_size)]
        if expert_parallel and c.num_local_experts % n:
            bad.append(f"{c.num_local_experts} experts (expert parallel)")
    elif expert_parallel:
        raise InvalidRequestError(f"--expert-parallel is for mixture-of-experts models; {c.architecture} has none")
    bad += [f"{what} {v}" for what, v in sizes if v % n]
    if bad:
        raise InvalidRequestError(f"tensor_parallel_size {n} does not divide the {'; '.join(bad)} of this "
                                  f"{c.architecture}; pick a size that divides them")


def check_devices(device: torch.device, world_size: int) -> None:
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if world_size > have:
            raise InvalidRequestError(f"tensor_parallel_size {world_size} needs {world_size} GPUs but "
                                      f"{have} are visible; lower it or set CUDA_VISIBLE_DEVICES")
    elif device.type != "cpu":
        raise InvalidRequestError(f"tensor parallelism runs on cuda or cpu, not {device.type}")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r uses GPU r (CPU ranks share the CPU)."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_group(rank: int, world_size: int, init_file: str, device: torch.device, timeout_s: float,
               expert_parallel: bool = False, enable_one_shot: bool = True) -> ParallelContext:
    """Join the default process group (a FileStore rendezvous at init_file) -> the context."""
    no_multicast_env()
    if dist.is_initialized():
        raise DistributedError("this process already belongs to a tensor-parallel group; one tensor-parallel "
                               "engine per process (shut the other down first)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except Exception as e:  # noqa: BLE001 - rendezvous failures come as several types
        raise DistributedError(f"rank {rank} could not join the tensor-parallel group of {world_size} "
                               f"within {timeout_s:.0f} s ({type(e).__name__}: {e})") from e
    comm = Communicator(None, world_size, device, enable_one_shot=enable_one_shot)
    return ParallelContext(rank, world_size, comm, expert_parallel)


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
