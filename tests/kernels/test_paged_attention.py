"""Decode, verify and prefill attention over the paged KV cache against the reference."""
from __future__ import annotations

import pytest
import torch

from lightspeed.kernels.paged_attention import paged_attention_ref
from lightspeed.kernels.paged_decode_attention import paged_decode_attention_ref, paged_decode_attention_triton
from lightspeed.kernels.paged_prefill_attention import paged_prefill_attention_ref, paged_prefill_attention_triton
from lightspeed.kernels.paged_verify_attention import (pack_tree_masks, paged_verify_attention_ref,
                                                       paged_verify_attention_triton)
from tests.kernels.helpers import DEVICES, TOL, assert_all_written, poison, rel_err


def make_batch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device):
    """Random paged cache with shuffled blocks (plus unused ones), block tables, q."""
    num_blocks = sum(-(-n // bs) for n in seq_lens) + 3
    kv = torch.randn(2, num_blocks, bs, hkv, d, device=device).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    max_blocks = max(-(-n // bs) for n in seq_lens) + 1  # one spare column
    bt = torch.full((len(seq_lens), max_blocks), 10**6, dtype=torch.int32)  # never read
    for i, n in enumerate(seq_lens):
        nb = -(-n // bs)
        bt[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)
    return q, kv, bt.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device), qsl.to(device)


def random_tree_masks(q_lens):
    """Per sequence: a random tree of its new tokens (each node's parent an earlier node or the
    context); row i sees itself and its ancestors."""
    masks = []
    for n in q_lens:
        m = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            parent = int(torch.randint(-1, i, ()))
            if parent >= 0:
                m[i] |= m[parent]
        masks.append(m)
    return masks


DECODE_CASES = [  # seq_lens, hq, hkv, d, block_size, window, num_parts
    ([37, 70, 1], 14, 2, 64, 16, None, None),
    ([37, 70, 5], 14, 2, 64, 16, None, 3),        # split-KV + reduce
    ([50, 9], 9, 3, 64, 8, None, 4),
    ([100, 33], 4, 2, 128, 16, 20, 4),            # sliding window across partitions
    ([40], 8, 8, 80, 16, None, 3),                # MHA, head_dim 80
    ([64, 17], 4, 1, 256, 16, None, 2),           # head_dim 256
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[str(i) for i in range(len(DECODE_CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode(device, case, dtype):
    seq_lens, hq, hkv, d, bs, window, part = case
    q, kv, bt, sl, _ = make_batch(seq_lens, [1] * len(seq_lens), hq, hkv, d, bs, dtype, device)
    out = poison(q.shape, dtype, device)
    o = paged_decode_attention_triton(q, kv, bt, sl, d ** -0.5, max(seq_lens) + 5, window, num_parts=part,
                                      block_n=16 if device == "cpu" else None, out=out)
    ref = paged_decode_attention_ref(q, kv, bt, sl, d ** -0.5, window)
    assert_all_written(o)
    assert rel_err(o, ref) < TOL[dtype]


VERIFY_CASES = [  # seq_lens, q_lens, hq, hkv, d, block_size, tree, window, num_parts
    ([37, 21, 60], [5, 3, 1], 14, 2, 64, 16, False, None, None),
    ([37, 21], [5, 4], 9, 3, 64, 8, False, None, 3),
    ([40, 33], [5, 5], 9, 3, 64, 8, True, None, 3),
    ([70, 19], [4, 16], 12, 2, 128, 16, True, 12, 4),
    ([26], [2], 4, 2, 80, 16, False, 7, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", VERIFY_CASES, ids=[str(i) for i in range(len(VERIFY_CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_verify(device, case, dtype):
    seq_lens, q_lens, hq, hkv, d, bs, tree, window, part = case
    q, kv, bt, sl, qsl = make_batch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device)
    tm = pack_tree_masks(random_tree_masks(q_lens), max(q_lens), device) if tree else None
    out = poison(q.shape, dtype, device)
    o = paged_verify_attention_triton(q, kv, qsl, sl, bt, d ** -0.5, max(seq_lens), max(q_lens), tm, window,
                                      num_parts=part, block_n=16 if device == "cpu" else None, out=out)
    ref = paged_verify_attention_ref(q, kv, qsl, sl, bt, d ** -0.5, tm, window)
    assert_all_written(o)
    assert rel_err(o, ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill(device, dtype):
    """Whole prompts, a second chunk after a cached context, and a decode token in one batch."""
    seq_lens, q_lens = [23, 45, 30], [23, 20, 1]
    q, kv, bt, sl, qsl = make_batch(seq_lens, q_lens, 9, 3, 64, 8, dtype, device)
    out = poison(q.shape, dtype, device)
    o = paged_prefill_attention_triton(q, kv, qsl, sl, bt, 0.125, max(q_lens), q_tile=8,
                                       block_n=16 if device == "cpu" else None, out=out)
    assert_all_written(o)
    assert rel_err(o, paged_prefill_attention_ref(q, kv, qsl, sl, bt, 0.125)) < TOL[dtype]
    o = paged_prefill_attention_triton(q, kv, qsl, sl, bt, 0.125, max(q_lens), sliding_window=10)
    assert rel_err(o, paged_prefill_attention_ref(q, kv, qsl, sl, bt, 0.125, 10)) < TOL[dtype]
    for chunk in (8, 12):  # Llama 4 chunks: on and inside the 8-key blocks
        o = paged_prefill_attention_triton(q, kv, qsl, sl, bt, 0.125, max(q_lens), chunk_size=chunk, q_tile=8,
                                           block_n=16 if device == "cpu" else None)
        assert rel_err(o, paged_prefill_attention_ref(q, kv, qsl, sl, bt, 0.125, chunk_size=chunk)) < TOL[dtype]


def tree_of_parents(parents):
    """[n, n] ancestor mask (itself included) of a tree given by each node's parent (-1: root)."""
    m = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] |= m[p]
    return m


CHUNK_CASES = [  # seq_lens, q_lens, hq, hkv, d, block_size, chunk, tree parents (None: causal), num_parts
    ([45, 70, 9], [1, 1, 1], 9, 3, 64, 8, 12, None, None),        # decode, boundary inside a block
    ([45, 70, 9], [1, 1, 1], 7, 7, 32, 16, 16, None, 3),          # decode, boundary on a block, split-KV
    ([37, 52], [5, 4], 12, 2, 64, 8, 12, None, 2),                # verify: 36 | 37..48: a boundary among the new
    ([50, 33], [5, 6], 9, 3, 64, 16, 16, [-1, 0, 0, 1, 3], 2),    # tree: depth 3 crosses 48
    ([30], [7], 6, 2, 32, 8, 8, [-1, 0, 1, 1, 2, 4, 0], None),    # tree: 24 + depths 0..4, chunk 24..31
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CHUNK_CASES, ids=[str(i) for i in range(len(CHUNK_CASES))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_attention(device, case, dtype):
    """Llama 4 chunked attention: each query sees only keys of its chunk (tree tokens at their depth)."""
    seq_lens, q_lens, hq, hkv, d, bs, chunk, parents, part = case
    q, kv, bt, sl, qsl = make_batch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device)
    out = poison(q.shape, dtype, device)
    block_n = 16 if device == "cpu" else None
    if max(q_lens) == 1:
        o = paged_decode_attention_triton(q, kv, bt, sl, d ** -0.5, max(seq_lens), chunk_size=chunk,
                                          num_parts=part, block_n=block_n, out=out)
        ref = paged_decode_attention_ref(q, kv, bt, sl, d ** -0.5, chunk_size=chunk)
    else:
        masks = [tree_of_parents(parents[:n]) if parents else None for n in q_lens]
        tm = pack_tree_masks(masks, max(q_lens), device) if parents else None
        o = paged_verify_attention_triton(q, kv, qsl, sl, bt, d ** -0.5, max(seq_lens), max(q_lens), tm,
                                          chunk_size=chunk, num_parts=part, block_n=block_n, out=out)
        ref = paged_verify_attention_ref(q, kv, qsl, sl, bt, d ** -0.5, tm, chunk_size=chunk)
        unchunked = paged_verify_attention_ref(q, kv, qsl, sl, bt, d ** -0.5, tm)
        assert rel_err(unchunked, ref) > 0.1  # the chunks matter
    assert_all_written(o)
    assert rel_err(o, ref) < TOL[dtype]


def test_chunk_mask_rules():
    """visible_mask: keys [p // C * C, p]; a tree token at its depth, its ancestors at theirs."""
    from lightspeed.kernels.paged_attention import visible_mask
    m = visible_mask(3, 10, None, None, 4, "cpu")  # queries at 7, 8, 9
    assert m.tolist() == [[k in range(4, 8) for k in range(10)], [k in (8,) for k in range(10)],
                          [k in (8, 9) for k in range(10)]]
    tree = tree_of_parents([-1, 0, 0, 2])  # new tokens at positions 6, 7, 7, 8
    m = visible_mask(4, 10, tree, None, 4, "cpu")
    assert m[3].tolist() == [False] * 9 + [True]  # position 8 starts a chunk: only itself
    assert m[2].tolist() == [False] * 4 + [True, True, True, False, True, False]  # 4, 5, root, itself


@pytest.mark.parametrize("device", DEVICES)
def test_graph_bounds(device):
    """Grid sized for larger bounds than the batch (a CUDA-graph bucket): same result."""
    q, kv, bt, sl, qsl = make_batch([30, 12], [3, 2], 4, 2, 64, 16, torch.bfloat16, device)
    ref = paged_verify_attention_ref(q, kv, qsl, sl, bt, 0.125)
    o = paged_verify_attention_triton(q, kv, qsl, sl, bt, 0.125, 200, 5, num_parts=4)
    assert rel_err(o, ref) < 1e-2


def test_ref_matches_layer_ref():
    """kernels' reference == layers/attention.py's, on the metadata the runner builds."""
    from lightspeed.layers.attention import AttentionMetadata
    from lightspeed.kernels.paged_attention import paged_attention_meta_ref as layer_ref

    seq_lens, q_lens = [37, 21, 9], [5, 1, 3]
    q, kv, bt, sl, qsl = make_batch(seq_lens, q_lens, 6, 2, 32, 8, torch.float32, "cpu")
    masks = random_tree_masks(q_lens)
    masks[1] = None
    meta = AttentionMetadata(slot_mapping=torch.zeros(9, dtype=torch.long), query_start_loc=qsl, seq_lens=sl,
                             block_tables=bt, query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens,
                             tree_masks=masks)
    for window in (None, 6):
        ours = paged_attention_ref(q, kv, bt, sl, qsl, 0.2, pack_tree_masks(masks, 5, "cpu"), window)
        torch.testing.assert_close(ours, layer_ref(q, kv, meta, 0.2, window), atol=1e-5, rtol=1e-5)


def _verify_rows_equal_decode(device, dtype, seq_lens, q_len, hq, hkv, d, bs, tree, chunk, block_n):
    """Row i of a verify step (k + 1 = q_len new tokens per sequence, causal or a random tree)
    == a decode step of that token after its ancestors (the accepted path), bitwise; each
    launch with its own attention_bound (as eager steps and graph buckets use)."""
    from lightspeed.layers.attention import attention_bound
    q, kv, bt, sl, qsl = make_batch(seq_lens, [q_len] * len(seq_lens), hq, hkv, d, bs, dtype, device)
    masks = random_tree_masks([q_len] * len(seq_lens)) if tree else [torch.ones(q_len, q_len).tril().bool()] * len(sl)
    tm = pack_tree_masks(masks, q_len, device) if tree else None
    scale = d ** -0.5
    o = paged_verify_attention_triton(q, kv, qsl, sl, bt, scale, attention_bound(max(seq_lens)), q_len, tm,
                                      chunk_size=chunk, block_n=block_n)
    flat = kv.view(2, -1, hkv, d)
    for i in range(q_len):
        rows = qsl[:-1] + i
        path_kv = kv.clone()  # each sequence's context, then row i's ancestors and itself in order
        dec_lens = []
        for s, n in enumerate(seq_lens):
            ctx = n - q_len
            slot = [int(bt[s, p // bs]) * bs + p % bs for p in range(n)]
            path = masks[s][i].nonzero().flatten().tolist()
            path_kv.view(2, -1, hkv, d)[:, slot[ctx:ctx + len(path)]] = flat[:, [slot[ctx + j] for j in path]]
            dec_lens.append(ctx + len(path))
        dec_lens = torch.tensor(dec_lens, dtype=torch.int32, device=device)
        dec = paged_decode_attention_triton(q[rows].contiguous(), path_kv, bt, dec_lens, scale,
                                            attention_bound(int(dec_lens.max())), chunk_size=chunk, block_n=block_n)
        assert torch.equal(o[rows], dec), f"row {i}: max diff {(o[rows].float() - dec.float()).abs().max()}"
    ref = paged_verify_attention_ref(q, kv, qsl, sl, bt, scale, tm, chunk_size=chunk)
    assert rel_err(o, ref) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tree", [False, True], ids=["causal", "tree"])
@pytest.mark.parametrize("chunk", [None, 24], ids=["full", "chunk24"])
def test_verify_rows_equal_decode(device, dtype, tree, chunk):
    """Batch invariance (issue 4): 258 = a verify step crossing the bound 256 its decode rows
    stay under; split-KV in both (the interpreter's 4 'SMs': 2 partitions)."""
    _verify_rows_equal_decode(device, dtype, [29, 258], 5, 6, 2, 32, 8, tree, chunk,
                              16 if device == "cpu" else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tree", [False, True], ids=["causal", "tree"])
@pytest.mark.parametrize("chunk", [None, 1024], ids=["full", "chunk1024"])
@pytest.mark.parametrize("seq_lens", [[100], [1030], [3000], [129, 515, 2049, 3000]], ids=str)
def test_verify_rows_equal_decode_real_shapes_gpu(dtype, tree, chunk, seq_lens):
    """Qwen2.5-1.5B attention (12 q heads, 2 kv heads, head_dim 128, block 16), k + 1 = 5."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _verify_rows_equal_decode("cuda", dtype, seq_lens, 5, 12, 2, 128, 16, tree, chunk, None)
