"""An engine process sends only each output's new part; the server side adds the parts up to
the RequestOutputs the engine made."""
from dataclasses import replace

import torch

from lightspeed.config import EngineConfig, SamplingParams
from lightspeed.engine.engine import Engine
from lightspeed.server.output_deltas import OutputAssembler, to_deltas
from tests.tiny import make_tiny_checkpoint


def test_deltas_add_up_to_the_engines_outputs(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama")
    engine = Engine(EngineConfig(model=str(tmp_path), device="cpu", block_size=4, max_num_batched_tokens=16))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 19, 9)]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=["e"]),
              SamplingParams(max_tokens=6, temperature=0.7, seed=1, ignore_eos=True)]
    assembler = OutputAssembler()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(p, sp, request_id=f"r{i}")
        assembler.add(f"r{i}", p)
    assembler.add("aborted", [1, 2])
    assembler.drop("aborted")
    num_outputs = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        for want, got in zip(outs, assembler.outputs(to_deltas(outs)), strict=True):
            assert got.metrics == (want.metrics if want.finished else None)
            assert replace(got, metrics=None) == replace(want, metrics=None, prompt=None)
            num_outputs += 1
    assert num_outputs > 3 and not assembler._acc
