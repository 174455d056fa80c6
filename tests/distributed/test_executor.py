"""Tensor-parallel engines end to end on CPU (rank 0 in this process, gloo workers spawned by
lightspeed): greedy output of TP = 2 equals TP = 1 on a mixed batch with chunked prefill;
draft-model, n-gram and EAGLE-3 speculation under TP equal plain under TP; a worker killed mid-run
fails the step with a DistributedError within the timeout; bad sizes are refused up front."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

pytest.importorskip("transformers")

from lightspeed import LLM, SamplingParams  # noqa: E402
from lightspeed.errors import DistributedError, InvalidRequestError  # noqa: E402
from lightspeed.speculative import SpeculativeConfig  # noqa: E402
from tests.tiny import make_tiny_checkpoint  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
# 16-token budget: the 37- and 23-token prompts prefill in chunks next to decoding requests
SMALL = dict(device="cpu", max_num_batched_tokens=16, max_num_seqs=4, num_kv_blocks=64, block_size=4)
PROMPTS = ["The quick brown fox jumps over the lazy dog, again and again!", "hi", "abc abc abc abc abc abc"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_engine") / "llama"
    make_tiny_checkpoint(path, "llama")
    return str(path)


@pytest.fixture(scope="module")
def plain_tp1(ckpt):
    return [o.token_ids for o in LLM(ckpt, **SMALL).generate(PROMPTS, GREEDY)]


def _tp_generate(ckpt, speculative=None, **kw):
    llm = LLM(ckpt, tensor_parallel_size=2, distributed_timeout_s=60, speculative=speculative, **SMALL, **kw)
    try:
        return llm.generate(PROMPTS, GREEDY)
    finally:
        llm.engine.runner.shutdown()


def test_tp2_mixed_chunked_batch_equals_tp1(ckpt, plain_tp1):
    assert [o.token_ids for o in _tp_generate(ckpt)] == plain_tp1


def test_fp8_kv_cache_under_tp(ckpt):
    """Each rank quantizes its own KV heads (a scale per head): TP = 2 gives TP = 1's tokens."""
    tp1 = [o.token_ids for o in LLM(ckpt, kv_cache_dtype="fp8", **SMALL).generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in _tp_generate(ckpt, kv_cache_dtype="fp8")] == tp1


@pytest.mark.parametrize("method", ["ngram", "draft", "eagle3"])
def test_speculation_under_tp_equals_plain(ckpt, plain_tp1, method, tmp_path):
    """Proposer and verifier on rank 0 (the draft model whole there; an EAGLE-3 head without
    its own embedding gets the target's whole embedding), the target sharded."""
    model = {"ngram": None, "draft": ckpt, "eagle3": None}[method]
    if method == "eagle3":
        from tests.speculative.helpers import make_eagle3_head
        model = str(make_eagle3_head(tmp_path / "eagle", seed=0))
    spec = SpeculativeConfig(method, model=model, num_speculative_tokens=3)
    outs = _tp_generate(ckpt, spec)
    assert [o.token_ids for o in outs] == plain_tp1
    if method == "draft":  # the target drafting for itself: every draft accepted
        assert all(o.metrics.acceptance_length > 3 for o in outs), [o.metrics.acceptance_length for o in outs]


def test_killed_worker_gives_clear_error(ckpt):
    timeout = 20
    llm = LLM(ckpt, tensor_parallel_size=2, distributed_timeout_s=timeout, **dict(SMALL, num_kv_blocks=512))
    group = llm.engine.tp_group
    worker = group.procs[0]
    killer = threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL))
    start = time.monotonic()
    killer.start()
    with pytest.raises(DistributedError, match="rank 1 .*exited with code -9"):
        llm.generate(["a long run " * 4] * 2, SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    assert time.monotonic() - start < timeout + 15
    with pytest.raises(DistributedError):  # the engine stays failed, clearly
        llm.generate("again", GREEDY)


def test_bad_sizes_are_refused(ckpt):
    with pytest.raises(InvalidRequestError, match="does not divide"):
        LLM(ckpt, tensor_parallel_size=3, device="cpu")
    with pytest.raises(InvalidRequestError, match="mixture-of-experts"):
        LLM(ckpt, tensor_parallel_size=2, expert_parallel=True, device="cpu")
    import torch

    from lightspeed.distributed.parallel import check_devices
    with pytest.raises(InvalidRequestError, match="GPUs"):
        check_devices(torch.device("cuda"), torch.cuda.device_count() + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tp2_on_gpus_equals_tp1(ckpt, dtype):
    """NCCL + the one-shot all-reduce (when symmetric memory works here) inside CUDA graphs."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    gpu = dict(SMALL, device="cuda", dtype=dtype, block_size=16)
    plain = [o.token_ids for o in LLM(ckpt, **gpu).generate(PROMPTS, GREEDY)]
    llm = LLM(ckpt, tensor_parallel_size=2, distributed_timeout_s=120, **gpu)
    try:
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        comm = llm.engine.tp_group.ctx.comm
        assert comm.counts["nccl"] + comm.counts["one_shot"] > 0, comm.counts
    finally:
        llm.engine.runner.shutdown()
    if dtype == "float32":
        assert got == plain
    else:  # bf16 sums in another order across ranks: most tokens agree
        same = sum(a == b for x, y in zip(got, plain) for a, b in zip(x, y))
        assert same >= 0.8 * sum(len(x) for x in plain), (got, plain)


@pytest.mark.parametrize("argv", [["generate", "p"], ["serve"], ["bench", "latency"], ["eval-spec"]])
def test_cli_options_reach_the_engine_config(argv):
    from lightspeed.cli import build_parser, engine_options
    from lightspeed.config import EngineConfig
    args = build_parser().parse_args(argv[:1] + ["--tensor-parallel-size", "4", "--expert-parallel"] + argv[1:]
                                     if argv[0] != "bench" else argv + ["--tp", "4", "--expert-parallel"])
    opts = engine_options(args)
    assert opts["tensor_parallel_size"] == 4 and opts["expert_parallel"] is True
    assert EngineConfig(**opts).tensor_parallel_size == 4
    with pytest.raises(InvalidRequestError, match="positive"):
        EngineConfig(tensor_parallel_size=0)


@pytest.mark.slow  # ~50-100 s on 2 cores: four processes each dequantize the GGUF
def test_real_gguf_tp3_equals_tp1(smollm2_path):
    """SmolLM2-135M (9 heads, 3 KV heads) from its Q4_1 GGUF: each rank dequantizes the file
    and keeps its slices; 3 ranks give plain greedy's tokens."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    plain = [o.token_ids for o in LLM(str(smollm2_path), device="cpu").generate(prompts, params)]
    llm = LLM(str(smollm2_path), device="cpu", tensor_parallel_size=3, distributed_timeout_s=120)
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == plain
    finally:
        llm.engine.runner.shutdown()


def test_tree_speculation_under_tp_is_refused(tmp_path):
    """A tree's accepted-path KV moves happen on rank 0 only: refused before any worker starts."""
    from lightspeed import LLM
    with pytest.raises(InvalidRequestError, match="tree speculation"):
        LLM(str(tmp_path / "never-loaded"), tensor_parallel_size=2,
            speculative=SpeculativeConfig("ngram", num_speculative_tokens=3, tree_topk=2))


def test_structured_outputs_under_tp_equal_tp1(ckpt):
    """Grammars live on rank 0's runner (reached through TensorParallelRunner.constrain)."""
    pytest.importorskip("xgrammar")
    params = SamplingParams(max_tokens=12, temperature=0.0, regex=r"[a-c]{2,5}")
    want = [(o.token_ids, o.finish_reason) for o in LLM(ckpt, **SMALL).generate(PROMPTS, params)]
    llm = LLM(ckpt, tensor_parallel_size=2, distributed_timeout_s=60, **SMALL)
    try:
        got = llm.generate(PROMPTS, params)
    finally:
        llm.engine.runner.shutdown()
    assert [(o.token_ids, o.finish_reason) for o in got] == want
    assert all(re.fullmatch(r"[a-c]{2,5}", o.text) and o.finish_reason == "stop" for o in got)
