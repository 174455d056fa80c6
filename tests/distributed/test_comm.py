"""The all-reduce choice and buffer bookkeeping of distributed/comm.py on CPU (the collectives
themselves run in test_shard.py's gloo processes; one-shot timing needs GPUs: issue 19)."""
from __future__ import annotations

import torch

from lightspeed.distributed.comm import ONE_SHOT_MAX_BYTES, Communicator, all_reduce_add_rmsnorm_ref, choose_method
from lightspeed.layers.norm import rms_norm


def test_method_choice():
    small, big = 5120 * 2, ONE_SHOT_MAX_BYTES + 2
    assert choose_method(1, True, True, True, small, ONE_SHOT_MAX_BYTES) == "none"
    assert choose_method(8, True, True, True, small, ONE_SHOT_MAX_BYTES) == "one_shot"
    assert choose_method(8, True, True, True, ONE_SHOT_MAX_BYTES, ONE_SHOT_MAX_BYTES) == "one_shot"
    assert choose_method(8, True, True, True, big, ONE_SHOT_MAX_BYTES) == "nccl"  # large: NCCL's ring
    assert choose_method(8, True, True, False, small, ONE_SHOT_MAX_BYTES) == "nccl"  # strided input
    assert choose_method(8, False, True, True, small, ONE_SHOT_MAX_BYTES) == "nccl"  # no symmetric memory
    assert choose_method(2, True, False, True, small, ONE_SHOT_MAX_BYTES) == "gloo"  # CPU tensors


def test_cpu_group_keeps_no_buffers_and_counts_calls():
    comm = Communicator(None, 2, torch.device("cpu"))
    assert not comm.has_one_shot and comm.prepare(torch.bfloat16) is False and comm.buffers == {}
    assert comm.buffer_numel(torch.bfloat16) == ONE_SHOT_MAX_BYTES // 2
    assert comm.buffer_numel(torch.float32) == ONE_SHOT_MAX_BYTES // 4
    assert comm.method(torch.zeros(4)) == "gloo"
    one = Communicator(None, 1, torch.device("cpu"))
    x = torch.randn(2, 3)
    assert one.all_reduce(x) is x and one.counts["none"] == 1
    assert one.all_gather_last(x) is x


def test_reference_semantics():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 16, generator=g) for _ in range(4)]
    res, w = torch.randn(2, 16, generator=g), torch.rand(16, generator=g)
    normed, summed = all_reduce_add_rmsnorm_ref(parts, res, w, 1e-6)
    torch.testing.assert_close(summed, parts[0] + parts[1] + parts[2] + parts[3] + res)
    torch.testing.assert_close(normed, rms_norm(summed, w, 1e-6))
    normed, summed = all_reduce_add_rmsnorm_ref(parts, None, w, 1e-6)
    torch.testing.assert_close(summed, sum(parts))
