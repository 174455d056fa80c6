"""Processes of a tensor-parallel engine: rank 0 is the engine's own process (scheduler,
block manager, sampler, speculation: all unchanged); ranks 1..N-1 are workers that lightspeed
spawns (torch.multiprocessing, spawn). Each step rank 0 pipes the SchedulerOutput (ints and
lists) to every worker, then all ranks run the same ModelRunner.execute on their shard and
meet in the model's collectives; only rank 0's RunnerOutput is used.

    rank 0 (Engine)                         rank r (worker_main)
    TensorParallelGroup(config) --spawn-->  init_group; load shard
    init_group; load shard                  recv runner settings; ModelRunner; send "ready"
    start(runner) --settings--> ...         loop: recv SchedulerOutput; runner.execute
    execute(sched) --sched--> ...           (None: exit)

Failures: every collective times out (EngineConfig.distributed_timeout_s); a worker that
dies or raises makes rank 0's step fail with a DistributedError naming the rank, its exit
code and its error; the engine is then dead (every later step raises the same error).
TP = 1 never comes here: the Engine keeps today's single-process path.
"""
from __future__ import annotations

import atexit
import os
import pickle
import tempfile
import traceback
import weakref

import torch
import torch.multiprocessing as mp

from lightspeed.config import EngineConfig
from lightspeed.distributed.parallel import (ParallelContext, check_devices, check_parallel, destroy_group,
                                             init_group, rank_device)
from lightspeed.engine.forward import calibrate_k_shift
from lightspeed.errors import DistributedError, LightspeedError, UnsupportedModelError


def model_config_of(model: str):
    from lightspeed.loader import open_checkpoint, resolve_model
    from lightspeed.loader.model import SHAPE_PREFIX
    from lightspeed.models.random import shape_config
    if model.startswith(SHAPE_PREFIX):
        return shape_config(model[len(SHAPE_PREFIX):])
    return open_checkpoint(resolve_model(model)).config


def load_rank_model(config: EngineConfig, ctx: ParallelContext, device: torch.device, dtype: torch.dtype):
    """-> (this rank's shard, tokenizer or None). `shape:NAME`: random weights, the same seed
    on every rank (replicated routers and norms agree), FP8 built directly in FP8."""
    from lightspeed.distributed.shard import shard_model_
    from lightspeed.loader import resolve_model
    from lightspeed.loader.model import SHAPE_PREFIX
    from lightspeed.models.random import random_model
    if config.model.startswith(SHAPE_PREFIX):
        net, tokenizer = random_model(config.model[len(SHAPE_PREFIX):], device, dtype, seed=config.seed,
                                      quantization=config.quantization, shard=lambda m: shard_model_(m, ctx)), None
    else:
        from lightspeed.distributed.loading import load_sharded_model
        net, tokenizer, _ = load_sharded_model(resolve_model(config.model), ctx, device, dtype,
                                               config.quantization,
                                               with_tokenizer=ctx.rank == 0 or config.kv_cache_dtype == "fp8")
    ctx.comm.prepare(dtype)  # the one-shot buffers, before any CUDA graph is captured
    return net, tokenizer


def _runner_settings(runner, config: EngineConfig) -> dict:
    """What a worker needs to build a runner like rank 0's (its KernelSettings, fresh state)."""
    return dict(num_blocks=runner.num_blocks, block_size=runner.block_size, seed=config.seed,
                kv_cache_dtype=runner.kv_cache_dtype,
                enable_cuda_graph=runner.graphs is not None, max_num_seqs=config.max_num_seqs,
                aux_layer_ids=tuple(getattr(runner.proposer, "aux_layer_ids", ())),
                kernel_settings=runner.kernel_settings.replace())


class _AuxLayers:
    """A worker's stand-in for rank 0's proposer: asks the model for the same aux hidden
    states (the same forward, the same CUDA-graph shapes), proposes nothing."""

    needs_hidden_states = True

    def __init__(self, aux_layer_ids: tuple[int, ...]):
        self.aux_layer_ids = aux_layer_ids

    def drop(self, request_id: str) -> None:
        pass

    def set_kernel_settings(self, settings) -> None:
        pass

    def propose(self, inputs):
        from lightspeed.speculative.proposer import Drafts
        return Drafts()


def worker_main(rank: int, world: int, init_file: str, config: EngineConfig, device: torch.device,
                dtype: torch.dtype, conn) -> None:
    """A worker process: its shard, its runner, one SchedulerOutput per step until None."""
    from lightspeed.engine.runner import ModelRunner
    parent = mp.parent_process()
    try:
        device = rank_device(device, rank)  # rank 0's resolved device and dtype
        ctx = init_group(rank, world, init_file, device, config.distributed_timeout_s, config.expert_parallel)
        model, tokenizer = load_rank_model(config, ctx, device, dtype)
        k_shift = calibrate_k_shift(model, tokenizer, config.kv_cache_dtype)  # in step with rank 0's
        s = conn.recv()
        if s is None:
            return  # rank 0 failed before its runner existed
        proposer = _AuxLayers(s["aux_layer_ids"]) if s["aux_layer_ids"] else None
        runner = ModelRunner(model, s["num_blocks"], s["block_size"], device, dtype, seed=s["seed"],
                             proposer=proposer, enable_cuda_graph=s["enable_cuda_graph"],
                             max_num_seqs=s["max_num_seqs"], kernel_settings=s["kernel_settings"],
                             kv_cache_dtype=s["kv_cache_dtype"], k_shift=k_shift)
        conn.send("ready")
        while True:
            while not conn.poll(1.0):
                if parent is not None and not parent.is_alive():
                    return  # the engine is gone
            sched = conn.recv()
            if sched is None:
                return
            runner.execute(sched)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then the process exits
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
        except (OSError, BrokenPipeError):
            pass
        raise SystemExit(1) from None
    finally:
        destroy_group()


class TensorParallelGroup:
    """Rank 0's side: spawns the workers, joins the group, loads rank 0's shard."""

    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype, speculative=None):
        n = config.tensor_parallel_size
        check_devices(device, n)
        check_parallel(model_config_of(config.model), n, config.expert_parallel)
        self.config, self.world_size = config, n
        self._tmp = tempfile.TemporaryDirectory(prefix="lightspeed-tp-")
        init_file = os.path.join(self._tmp.name, "rendezvous")
        spawn = mp.get_context("forkserver")  # NOTE: a fresh process like spawn (CUDA-safe), but
        spawn.set_forkserver_preload(["lightspeed.distributed.executor"])  # torch imported once per engine process
        self.conns, self.procs = [], []
        for rank in range(1, n):
            ours, theirs = spawn.Pipe()
            p = spawn.Process(target=worker_main, args=(rank, n, init_file, config, device, dtype, theirs), daemon=True,
                              name=f"lightspeed-tp-rank{rank}")
            p.start()
            self.conns.append(ours)
            self.procs.append(p)
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs, self._tmp)
        atexit.register(self._finalizer)
        try:
            self.ctx = init_group(0, n, init_file, rank_device(device, 0), config.distributed_timeout_s,
                                  config.expert_parallel)
            self.model, self.tokenizer = load_rank_model(config, self.ctx, rank_device(device, 0), dtype)
            self.k_shift = calibrate_k_shift(self.model, self.tokenizer, config.kv_cache_dtype)  # in step with
            # the workers' (worker_main)
        except BaseException as e:
            self.failed = None
            err = self.failure(e)
            if err is e:
                raise
            raise err from e
        self.failed: DistributedError | None = None

    def start(self, runner) -> "TensorParallelRunner":
        """Send the runner's settings to the workers and wait until each has built its runner."""
        head = getattr(runner.proposer, "head", None)
        shard_embed = getattr(getattr(runner.model, "model", runner.model), "embed_tokens", None)
        if head is not None and (head.embed_tokens is None or head.embed_tokens is shard_embed):
            # NOTE: an EAGLE-3 head without its own embedding shares the target's, which is
            # split over ranks here (its forward all-reduces); the head (rank 0 only) gets the
            # whole one, read once.
            try:
                head.embed_tokens = None
                head.set_embedding(self._full_embedding(runner.device, runner.dtype))
            except BaseException:
                self.shutdown()  # the workers wait for settings: stop them
                raise
        settings = _runner_settings(runner, self.config)
        for conn in self.conns:
            conn.send(settings)
        for rank, conn in enumerate(self.conns, 1):
            if not conn.poll(self.config.distributed_timeout_s):
                raise self.failure(TimeoutError(f"rank {rank} not ready after {self.config.distributed_timeout_s} s"))
            msg = conn.recv()
            if msg != "ready":
                raise self.failure(RuntimeError(str(msg)))
        return TensorParallelRunner(runner, self)

    def _full_embedding(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Embedding:
        from lightspeed.distributed.loading import read_full_tensor
        from lightspeed.loader import open_checkpoint, resolve_model
        from lightspeed.loader.model import SHAPE_PREFIX
        if self.config.model.startswith(SHAPE_PREFIX):
            raise UnsupportedModelError("an EAGLE-3 head without its own embedding needs the target's, which a "
                                        "random-weight shape model under tensor parallelism does not keep whole")
        w = read_full_tensor(open_checkpoint(resolve_model(self.config.model)), "embed_tokens.weight")
        return torch.nn.Embedding(w.shape[0], w.shape[1], _weight=w.to(device, dtype)).requires_grad_(False)

    def failure(self, cause: BaseException) -> DistributedError:
        """A DistributedError naming every worker that died or reported an error."""
        lines = []
        for rank, (conn, p) in enumerate(zip(self.conns, self.procs), 1):
            p.join(timeout=0.5 if p.is_alive() else 0)
            err = None
            try:
                while conn.poll(0):
                    msg = conn.recv()
                    if isinstance(msg, tuple) and msg[:1] == ("error",):
                        err = msg[1]
            except (EOFError, OSError):
                pass
            if not p.is_alive() or err:
                lines.append(f"rank {rank} (pid {p.pid}) " + (f"exited with code {p.exitcode}" if not p.is_alive()
                                                              else "failed") + (f": {err.strip()}" if err else ""))
        what = "; ".join(lines) or f"{type(cause).__name__}: {cause}"
        if isinstance(cause, LightspeedError) and not lines:
            self.failed = cause  # e.g. a checkpoint error on rank 0: already clear
        else:
            self.failed = DistributedError(f"tensor-parallel group of {self.world_size} failed: {what}. The "
                                           "engine cannot continue; restart it (check GPU memory, the ranks' "
                                           "logs, or raise EngineConfig.distributed_timeout_s for slow starts)")
        self.shutdown()
        return self.failed

    def shutdown(self) -> None:
        self._finalizer()


def _stop(conns, procs, tmp) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, BrokenPipeError):
            pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    destroy_group()
    tmp.cleanup()


class TensorParallelRunner:
    """Rank 0's ModelRunner behind the same `execute`; other attributes are the runner's."""

    def __init__(self, runner, group: TensorParallelGroup):
        self.runner, self.group = runner, group

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, sched):
        g = self.group
        if g.failed is not None:
            raise g.failed
        payload = pickle.dumps(sched, protocol=pickle.HIGHEST_PROTOCOL)  # once for all workers (conn.recv reads it)
        for rank, (conn, p) in enumerate(zip(g.conns, g.procs), 1):
            if not p.is_alive():
                raise g.failure(RuntimeError(f"rank {rank} is not running"))
            try:
                conn.send_bytes(payload)
            except (OSError, BrokenPipeError) as e:
                raise g.failure(e) from e
        try:
            return self.runner.execute(sched)
        except LightspeedError:
            raise
        except Exception as e:  # a collective that timed out or lost a peer
            raise g.failure(e) from e

    def warm_up(self, max_seq_len: int) -> int:
        """Nothing ahead of time: every rank captures a graph when it first runs that step
        (captures hold collectives, so ranks capture only in lockstep)."""
        del max_seq_len
        return 0

    def shutdown(self) -> None:
        self.group.shutdown()
