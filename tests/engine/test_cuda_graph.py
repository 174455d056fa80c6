"""CUDA graphs: bucket choice and static-input padding as pure functions (CPU), and on the GPU
graph-captured decode and verify steps giving the same tokens as eager steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightspeed.config import SamplingParams
from lightspeed.engine.cuda_graph import (Layout, batch_buckets, fill_static_inputs, graph_shape, pick_bucket,
                                         warm_up_shapes)
from lightspeed.engine.input_prep import BlockTables
from lightspeed.engine.input_prep import build_host_inputs as _build_host_inputs
from lightspeed.engine.outputs import ScheduledRequest, SchedulerOutput
from lightspeed.layers.attention import attention_bound

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("overlap", [False, True])
def test_warm_up_requests_run_to_their_end_and_leave_the_engine_as_it_was(tmp_path, overlap):
    """Engine.warm_up's requests (run on GPUs, so the first prefills compile nothing), one step
    at a time and under overlap scheduling (a GPU server's default): they finish, free their
    blocks and leave no state; the engine then answers as a fresh one."""
    from lightspeed import LLM
    from tests.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path, "qwen2")
    prompts = _prompts([7, 30])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    fresh = [o.token_ids for o in LLM(str(tmp_path), device="cpu", block_size=4).generate(prompts, params)]
    llm = LLM(str(tmp_path), device="cpu", block_size=4, overlap_schedule=overlap)
    assert llm.engine.overlap == overlap
    e = llm.engine
    e.run_warm_up_requests()
    assert not e.has_unfinished_requests() and not e._states and not e.runner.generators
    assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    assert [o.token_ids for o in llm.generate(prompts, params)] == fresh


def req(rid, tokens, start, table, drafts=0, last=True, parents=None):
    return ScheduledRequest(rid, tokens, start, table, drafts, last, GREEDY, 0, parents)  # the whole table


def build_host_inputs(sched, bs):
    tables = BlockTables()
    tables.update(sched)
    return _build_host_inputs(sched, bs, tables)


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256]
    assert batch_buckets(512)[-5:] == [256, 320, 384, 448, 512]  # the max-throughput preset
    assert batch_buckets(1000) == batch_buckets(512)
    assert [pick_bucket(n, [1, 2, 4, 8]) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def test_warm_up_shapes_short_sequences_first_largest_batch_first():
    assert warm_up_shapes([1, 2, 4], 300, 32) == [(4, 256), (2, 256), (1, 256), (4, 512), (2, 512), (1, 512)]
    assert warm_up_shapes([1, 2, 4], 100, 32) == [(4, 256), (2, 256), (1, 256)]
    shapes = warm_up_shapes(batch_buckets(512), 32768, 32)  # the max-throughput preset: bounds 256 and 512
    assert len(shapes) == 32 and shapes[0] == (512, 256) and shapes[-1] == (1, 512)


def test_attention_bound_is_a_power_of_two_of_at_least_256():
    assert [attention_bound(n) for n in (1, 200, 256, 257, 1025, 4096)] == [256, 256, 256, 512, 2048, 4096]


def test_graph_shape_decode_verify_and_eager():
    bs, buckets = 4, [1, 2, 4, 8]

    def shape(*reqs):
        sched = SchedulerOutput(list(reqs))
        return graph_shape(sched, build_host_inputs(sched, bs), buckets)

    assert shape(req("a", [5], 9, [0, 1, 2])) == (1, 1)
    assert shape(*[req(str(i), [5], 9, [0, 1, 2]) for i in range(3)]) == (4, 1)
    assert shape(*[req(str(i), [5], 9, [0, 1, 2]) for i in range(9)]) is None  # past the largest bucket
    assert shape(req("a", [5, 6, 7, 8], 9, [0, 1, 2, 3], drafts=3), req("b", [5], 3, [4])) == (2, 4)
    assert shape(req("a", [1, 2, 3], 0, [0], last=True)) is None  # a prefill chunk
    assert shape(req("a", [1], 0, [0], last=False)) is None
    assert shape(req("a", [5] + [1] * 16, 9, [0, 1, 2, 3, 4, 5, 6], drafts=16)) == (1, 17)  # a 16-node tree
    assert shape(req("a", [5] + [1] * 64, 9, list(range(20)), drafts=64)) is None  # q 65 > 64


def test_fill_static_inputs_pads_with_unwritten_slots():
    bs = 4
    sched = SchedulerOutput([req("a", [11, 12, 13], 6, [7, 3, 9], drafts=2, parents=[-1, -1]),
                             req("b", [21, 22], 2, [5], drafts=1)])
    host = build_host_inputs(sched, bs)
    lay = Layout.make(4, 3, max(host.seq_lens), bs)  # B = 4 sequences (2 dummies), Q = 3
    assert (lay.T, lay.L, lay.MB) == (12, 256, 64)
    o = lay.offsets()
    buf = np.full(o["end"], 777, dtype=np.int64)  # poison
    fill_static_inputs(buf, lay, host)
    assert buf[o["ids"]: o["ids"] + 5].tolist() == [11, 12, 13, 21, 22]
    assert buf[o["pos"]: o["pos"] + 5].tolist() == [6, 7, 7, 2, 3]  # tree siblings share depth 1
    # slots: a at storage 6..8 -> block 3 (index 1) offsets 2, 3 then block 9 offset 0; b at 2, 3 of block 5
    assert buf[o["slot"]: o["slot"] + lay.T].tolist() == [14, 15, 36, 22, 23] + [-1] * 7
    assert buf[o["len"]: o["len"] + 4].tolist() == [9, 4, 1, 1]
    assert buf[o["qsl"]: o["qsl"] + 5].tolist() == [0, 3, 5, 6, 7]  # dummies: one row each
    tables = buf[o["tab"]: o["tree"]].reshape(4, lay.MB)
    assert tables[0, :3].tolist() == [7, 3, 9] and tables[1, 0] == 5
    tree = buf[o["tree"]: o["end"]].reshape(4, 3, 3)
    assert tree[0].tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]  # root + two siblings
    assert tree[1].tolist() == np.tril(np.ones((3, 3))).tolist()  # a chain: causal
    assert all(tree[i, 0, 0] == 1 for i in (2, 3))
    # a later, smaller step in the same buffer: stale real rows become padding again
    host2 = build_host_inputs(SchedulerOutput([req("b", [23], 4, [5, 6])]), bs)
    fill_static_inputs(buf, lay, host2)
    assert buf[o["slot"]: o["slot"] + lay.T].tolist() == [24] + [-1] * 11
    assert buf[o["len"]: o["len"] + 4].tolist() == [5, 1, 1, 1]
    assert buf[o["qsl"]: o["qsl"] + 5].tolist() == [0, 1, 2, 3, 4]


# The padded static-input body, emulated on CPU (run eagerly, no capture) under the Triton
# interpreter: decode padded from 3 to 4 sequences, and tree verify steps, give the torch
# path's tokens.
EMULATION = r"""
import sys, torch
import lightspeed.kernels as K
from lightspeed import LLM, SamplingParams
from lightspeed.engine.cuda_graph import CudaGraphRunner
from lightspeed.speculative import SpeculativeConfig
from tests.tiny import make_tiny_checkpoint
tmp = sys.argv[1]
make_tiny_checkpoint(f"{tmp}/t", "qwen2", seed=0)
make_tiny_checkpoint(f"{tmp}/d", "qwen2", seed=1, num_hidden_layers=1)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 8)]
params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
tree = SpeculativeConfig(method="draft", model=f"{tmp}/d", num_speculative_tokens=2, tree_topk=2, tree_num_nodes=3)
for spec, want in ((None, {(4, 1)}), (tree, {(4, 3), (4, 4)})):
    llm = LLM(f"{tmp}/t", device="cpu", block_size=4, speculative=spec)
    ref = [o.token_ids for o in llm.generate(prompts, params)]
    r = llm.engine.runner
    r.graphs = CudaGraphRunner(r.model, r.kv_caches, r.block_size, 4, r.device)
    r.set_kernel_settings(r.kernel_settings.replace(triton_on_cpu=True))
    got = [o.token_ids for o in llm.generate(prompts, params)]
    shapes = {(k[0].B, k[0].Q) for k in r.graphs.graphs}
    assert ref == got and want & shapes, (ref, got, shapes)
    print("ok")
"""


def test_padded_graph_body_emulated_in_the_interpreter(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", EMULATION, str(tmp_path)], cwd=root, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(root), "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.count("ok") == 2, r.stdout[-3000:] + r.stderr[-6000:]


# ---------------------------------------------------------------------------- GPU (skipped without CUDA)
def _generate(path, prompts, graphs: bool, dtype: str, params=GREEDY, **kw):
    from lightspeed import LLM
    llm = LLM(str(path), device="cuda", dtype=dtype, enable_cuda_graph=graphs, block_size=4, **kw)
    outs = llm.generate(prompts, params)
    return [o.token_ids for o in outs], llm.engine.runner.graphs


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,batch", [("bfloat16", 1), ("bfloat16", 2), ("float32", 3), ("bfloat16", 4)])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graph_decode_equals_eager(tmp_path, arch, dtype, batch):
    from tests.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path, arch)
    prompts = _prompts([7, 30, 12, 61][:batch])
    eager, _ = _generate(tmp_path, prompts, False, dtype)
    graphed, graphs = _generate(tmp_path, prompts, True, dtype)
    assert graphs is not None and any(k[0].Q == 1 for k in graphs.graphs), "no decode graph was used"
    assert graphed == eager


@pytest.mark.gpu
def test_warmed_up_graphs_serve_decode_without_new_captures(tmp_path):
    """Engine.warm_up captures the decode graphs of short sequences; decoding then uses them
    (no capture while serving) and gives the eager tokens."""
    from lightspeed import LLM
    from tests.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path, "qwen2")
    prompts = _prompts([7, 30, 12])
    eager, _ = _generate(tmp_path, prompts, False, "bfloat16")
    llm = LLM(str(tmp_path), device="cuda", dtype="bfloat16", enable_cuda_graph=True, block_size=4, max_num_seqs=8)
    n = llm.engine.warm_up()  # and its requests, whose steps capture nothing new
    graphs = llm.engine.runner.graphs
    assert n == len(graphs.graphs) == len(graphs.buckets) * 2  # bounds 256 and 512: max_model_len is larger
    assert not llm.engine.has_unfinished_requests()
    keys = set(graphs.graphs)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == eager
    assert set(graphs.graphs) == keys


@pytest.mark.gpu
@pytest.mark.parametrize("tree", [False, True])
def test_graph_verify_equals_eager(tmp_path, tree):
    from lightspeed.speculative import SpeculativeConfig
    from tests.tiny import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path / "t", "qwen2", seed=0)
    make_tiny_checkpoint(tmp_path / "d", "qwen2", seed=1, num_hidden_layers=1)
    spec = SpeculativeConfig(method="draft", model=str(tmp_path / "d"), num_speculative_tokens=3,
                             **(dict(tree_topk=2, tree_num_nodes=5) if tree else {}))
    prompts = _prompts([9, 20])
    eager, _ = _generate(tmp_path / "t", prompts, False, "float32", speculative=spec)
    graphed, graphs = _generate(tmp_path / "t", prompts, True, "float32", speculative=spec)
    assert any(k[0].Q > 1 for k in graphs.graphs), "no verify graph was used"
    assert graphed == eager
