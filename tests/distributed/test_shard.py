"""Sharded models (gloo, 2 and 4 CPU processes) against the unsharded model in the same
process, on tiny random fp32 checkpoints: Llama with GQA (KV heads < ranks at 4) and a
padded vocabulary, Llama with o_proj / MLP biases, Qwen2 (q/k/v bias, tied embeddings),
Scout-like and Maverick-like Llama 4 with expert parallelism and with TP inside each expert,
and FP8 (shards carry the scales of the whole rows). Prefill of a mixed batch then decode
steps: logits close, greedy tokens equal. Also: the bytes each rank reads from safetensors."""
from __future__ import annotations

import json
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from lightspeed.config import ModelConfig  # noqa: E402
from lightspeed.distributed.parallel import ParallelContext, check_parallel  # noqa: E402
from lightspeed.distributed.comm import Communicator  # noqa: E402
from lightspeed.errors import InvalidRequestError  # noqa: E402
from tests.distributed.ranks import rank_main  # noqa: E402
from tests.tiny import make_tiny_checkpoint  # noqa: E402

# name -> (maker, arch or case, overrides, expert_parallel, quantization)
CASES = {
    "llama-gqa": ("tiny", "llama", dict(vocab_size=330), False, None),
    "llama-bias": ("tiny", "llama", dict(attention_bias=True, mlp_bias=True), False, None),
    "qwen2": ("tiny", "qwen2", dict(tie_word_embeddings=True), False, None),
    "scout-ep": ("llama4", "scout", dict(num_local_experts=4), True, None),
    "scout-tp": ("llama4", "scout", dict(num_local_experts=4), False, None),
    "maverick-ep": ("llama4", "maverick", dict(num_local_experts=8), True, None),
    "maverick-tp": ("llama4", "maverick", dict(num_local_experts=8), False, None),
    "llama-fp8": ("tiny", "llama", {}, False, "fp8"),
    "maverick-tp-fp8": ("llama4", "maverick", dict(num_local_experts=8), False, "fp8"),
}


def make_checkpoints(root: str) -> dict[str, tuple]:
    """-> name -> (path, expert_parallel, quantization, bytes of the unsharded checkpoint)."""
    from pathlib import Path

    from tests.models.test_llama4 import make_llama4
    out = {}
    for name, (maker, arch, overrides, ep, quant) in CASES.items():
        path = Path(root) / name
        hf = (make_tiny_checkpoint if maker == "tiny" else make_llama4)(path, arch, **overrides)
        out[name] = (str(path), ep, quant, sum(t.numel() * t.element_size() for t in hf.state_dict().values()))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(str(tmp_path_factory.mktemp("tp_ckpts")))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_models_match_unsharded(checkpoints, world, tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    # 4 ranks: the cases whose split differs from 2 (KV heads replicated, one expert per rank)
    names = list(CASES) if world == 2 else ["llama-gqa", "qwen2", "maverick-ep", "scout-tp"]
    cases = {name: checkpoints[name][:3] for name in names}
    mp.start_processes(rank_main, args=(world, init_file, cases, str(tmp_path)), nprocs=world, join=True,
                       start_method="forkserver")  # as the engine starts its workers
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
    for r, rep in enumerate(reports):  # the collectives against their plain definitions
        c = rep["comm"]
        assert c["add_rmsnorm"] and c["all_gather"] and c["max"], (r, c)
        assert c["counts"]["gloo"] == 1 and c["counts"]["one_shot"] == 0, c  # CPU: the backend, never one-shot
    for name in names:
        for r, rep in enumerate(reports):
            got = rep[name]
            tol = 5e-3 if CASES[name][4] else 1e-4
            assert got["max_abs_diff"] < tol, (name, r, got)
            assert got["same_greedy"], (name, r, got)
            # each rank reads its 1/N share, plus what is replicated (norms, routers, shared KV heads)
            assert got["bytes_read"] < checkpoints[name][3] / world * 1.5, (name, r, got)
        assert len({json.dumps(rep[name]["shape"]) for rep in reports}) == 1


def test_bytes_read_per_rank_is_exact_share(tmp_path):
    """Llama, 2 ranks: every tensor but the norms is split in two, so each rank reads exactly
    half of the split bytes plus all of the norm bytes (rank 0 / rank 1 alike)."""
    from lightspeed.distributed.loading import ShardedWeights
    from lightspeed.loader import open_checkpoint
    make_tiny_checkpoint(tmp_path, "llama")
    ckpt = open_checkpoint(tmp_path)
    full = dict(ckpt.weights())
    norm_bytes = sum(t.numel() * 4 for n, t in full.items() if "norm" in n)
    split_bytes = sum(t.numel() * 4 for n, t in full.items() if "norm" not in n)
    for rank in range(2):
        ctx = ParallelContext(rank, 2, Communicator(None, 2, torch.device("cpu")))
        weights = ShardedWeights(ckpt, ctx)
        got = dict(weights)
        assert weights.bytes_read == norm_bytes + split_bytes // 2
        q = full["model.layers.0.self_attn.q_proj.weight"]
        torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"], q.chunk(2)[rank])
        o = full["model.layers.0.self_attn.o_proj.weight"]
        torch.testing.assert_close(got["model.layers.0.self_attn.o_proj.weight"], o.chunk(2, dim=1)[rank])


def test_sizes_that_do_not_divide_are_refused():
    cfg = ModelConfig.from_hf_config(dict(architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=96,
                                          intermediate_size=192, num_hidden_layers=1, num_attention_heads=6,
                                          num_key_value_heads=2, max_position_embeddings=64))
    check_parallel(cfg, 2)
    with pytest.raises(InvalidRequestError, match="6 attention heads"):
        check_parallel(cfg, 4)
    with pytest.raises(InvalidRequestError, match="KV heads"):
        check_parallel(cfg, 3)
    with pytest.raises(InvalidRequestError, match="mixture-of-experts"):
        check_parallel(cfg, 2, expert_parallel=True)
