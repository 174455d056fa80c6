"""What each rank of the sharding tests runs (kept free of transformers so that spawned
processes start fast): a sharded model and the unsharded one, stepped through the runner's
own input preparation (a mixed prefill batch, then decode steps on the reference's greedy
tokens), reporting the largest logit difference and whether greedy tokens agree."""
from __future__ import annotations

import json
import os

import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.input_prep import BlockTables, build_host_inputs, inputs_from_host
from lightspeed.engine.outputs import ScheduledRequest, SchedulerOutput

BLOCK_SIZE, BLOCKS_PER_SEQ = 4, 8


def full_model(path: str, quantization):
    from lightspeed.layers.linear import quantize_model_
    from lightspeed.loader import open_checkpoint
    from lightspeed.models import get_model_class
    ckpt = open_checkpoint(path)
    net = get_model_class(ckpt.config)(ckpt.config)
    net.load_weights(ckpt.weights())
    quantize_model_(net, quantization)
    return net.eval(), ckpt.config


class Paged:
    """Sequence i owns blocks [i * BLOCKS_PER_SEQ, (i+1) * BLOCKS_PER_SEQ)."""

    def __init__(self, model, config, num_seqs: int):
        shape = model.kv_cache_shape(config, num_seqs * BLOCKS_PER_SEQ, BLOCK_SIZE)
        self.kv = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
        self.model, self.lens = model, [0] * num_seqs

    @torch.inference_mode()
    def step(self, new_tokens: list[list[int]]) -> torch.Tensor:
        """-> the logits of each sequence's last new token [num_seqs, vocab]."""
        sched = SchedulerOutput([ScheduledRequest(str(i), toks, self.lens[i],
                                                  list(range(i * BLOCKS_PER_SEQ, (i + 1) * BLOCKS_PER_SEQ)), 0,
                                                  True, SamplingParams(), 0) for i, toks in enumerate(new_tokens)])
        self.lens = [n + len(t) for n, t in zip(self.lens, new_tokens)]
        tables = BlockTables()
        tables.update(sched)
        inputs = inputs_from_host(build_host_inputs(sched, BLOCK_SIZE, tables), torch.device("cpu"))
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv, inputs.attn_meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])


def check_comm(ctx) -> dict:
    """The collectives against their plain definitions (every rank builds every rank's part)."""
    from lightspeed.distributed.comm import all_reduce_add_rmsnorm_ref
    from lightspeed.layers.norm import RMSNorm
    world, g = ctx.world_size, torch.Generator().manual_seed(5)
    parts = [torch.randn(3, 8, generator=g) * (r + 1) for r in range(world)]
    residual = torch.randn(3, 8, generator=g)
    norm = RMSNorm(8, 1e-6)
    norm.weight.data = torch.rand(8, generator=g) + 0.5
    normed, summed = ctx.comm.all_reduce_add_rmsnorm(parts[ctx.rank].clone(), residual, norm)
    want_normed, want_summed = all_reduce_add_rmsnorm_ref(parts, residual, norm.weight, norm.eps)
    gathered = ctx.comm.all_gather_last(parts[ctx.rank])
    amax = ctx.comm.all_reduce_max_(parts[ctx.rank][0].clone())
    return dict(add_rmsnorm=bool(torch.allclose(normed, want_normed, atol=1e-5)
                                 and torch.allclose(summed, want_summed, atol=1e-5)),
                all_gather=bool(torch.equal(gathered, torch.cat(parts, dim=-1))),
                max=bool(torch.equal(amax, torch.stack([p[0] for p in parts]).amax(0))),
                counts=dict(ctx.comm.counts))


def rank_main(rank: int, world: int, init_file: str, cases: dict, result_dir: str) -> None:
    """cases: name -> (checkpoint path, expert_parallel, quantization); writes rank{r}.json."""
    from lightspeed.distributed.loading import load_sharded_model
    from lightspeed.distributed.parallel import destroy_group, init_group
    torch.set_num_threads(1)
    ctx = init_group(rank, world, init_file, torch.device("cpu"), timeout_s=60)
    report = {"comm": check_comm(ctx)}
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 1, 6)]
        for name, (path, ep, quant) in cases.items():
            ctx.expert_parallel = ep
            full, config = full_model(path, quant)
            shard, _, weights = load_sharded_model(path, ctx, torch.device("cpu"), torch.float32, quant)
            ref, tp = Paged(full, config, 3), Paged(shard, config, 3)
            worst, same, new = 0.0, True, prompts
            for _ in range(4):
                a, b = ref.step(new), tp.step(new)
                worst = max(worst, float((a - b).abs().max()))
                same &= bool(torch.equal(a.argmax(-1), b.argmax(-1)))
                new = [[int(t)] for t in a.argmax(-1)]
            report[name] = dict(max_abs_diff=worst, same_greedy=same, bytes_read=weights.bytes_read,
                                shape=list(b.shape))
    finally:
        destroy_group()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
