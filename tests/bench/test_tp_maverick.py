"""The floor and projection arithmetic of the issue-19 script (its GPU parts run on devices;
`bench/device/tp_maverick.sh` with EXTRA="--device cpu ..." runs it end to end on gloo)."""
from __future__ import annotations

import pytest
import torch

from lightspeed.bench.latency import active_weight_bytes
from lightspeed.bench.tp_maverick import active_bytes_per_gpu, kv_bytes_per_gpu, projection
from lightspeed.layers.moe import Experts
from lightspeed.models.random import random_model


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama4-8e", "cpu", torch.float32)


def _expert_bytes(model) -> list[float]:
    return [sum(t.numel() * t.element_size() for t in (m.gate_up_proj, m.down_proj)) / m.num_experts
            for m in model.modules() if isinstance(m, Experts)]


def test_one_rank_floor_is_the_engine_floor(model):
    embed_row = model.config.hidden_size * 4
    for t in (1, 4):
        assert active_bytes_per_gpu(model, t, 1, False) + t * embed_row == pytest.approx(active_weight_bytes(model, t))


def _rank0_shard(expert_parallel: bool):
    from lightspeed.distributed.comm import Communicator
    from lightspeed.distributed.parallel import ParallelContext
    from lightspeed.distributed.shard import shard_model_
    ctx = ParallelContext(0, 2, Communicator(None, 2, torch.device("cpu")), expert_parallel)
    return random_model("tiny-llama4-8e", "cpu", torch.float32, shard=lambda m: shard_model_(m, ctx))


def test_expert_parallel_busiest_rank_reads_whole_experts(model):
    full_expert = sum(_expert_bytes(model))  # one whole expert of every MoE layer
    ep, tp = _rank0_shard(True), _rank0_shard(False)
    assert sum(_expert_bytes(tp)) == full_expert / 2
    # one token: EP's busiest rank reads the whole chosen expert, TP-in-expert half of it on each rank
    assert active_bytes_per_gpu(ep, 1, 2, True) - active_bytes_per_gpu(tp, 1, 2, False) == \
        pytest.approx(full_expert / 2)
    assert kv_bytes_per_gpu(tp, 1024, 2) == 4 * 2 * 1024 * 1 * 16 * 2  # one KV head per rank


def test_projection_is_labelled_and_scaled():
    decode = dict(ms_per_step=2.0, fraction_of_floor=0.5, floor_ms=1.0, name="d")
    verify = dict(ms_per_step=3.0, name="v")
    rows = projection(decode, verify, lm_head_floor_ms=0.1, shape="llama4-maverick@24", world=8)
    assert [r["acceptance_length"] for r in rows] == [2.9, 3.0, 3.1] and all(r["projection"] for r in rows)
    draft = 2.0 / 24 + 0.1 / 0.5
    assert rows[1]["tokens_per_s_user"] == pytest.approx(1e3 * 3.0 / (3.0 * 2 + 3 * draft), abs=0.1)
    assert rows[0]["name"].startswith("PROJECTION")
