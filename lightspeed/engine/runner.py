"""ModelRunner: the only place that builds tensors. Owns the model, the KV cache and the
per-request sampling state; turns a SchedulerOutput into a RunnerOutput."""
from __future__ import annotations

import torch

from lightspeed.engine.input_prep import prepare_inputs
from lightspeed.engine.outputs import RunnerOutput, SchedulerOutput
from lightspeed.engine.sampler import Sampler


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, proposer=None, verifier=None):
        self.model = model
        self.config = model.config
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        shape = model.kv_cache_shape(self.config, num_blocks, block_size)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.config.num_hidden_layers)]
        self.sampler = Sampler()
        self.proposer = proposer
        self.verifier = verifier
        self._seed_rng = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        g = self.generators.get(request_id)
        if g is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
            g = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[request_id] = g
        return g

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_request_ids:
            self.generators.pop(rid, None)
            if self.proposer is not None:
                self.proposer.drop(rid)
        out = RunnerOutput()
        if sched.is_empty:
            return out
        inputs = prepare_inputs(sched, self.block_size, self.device)
        aux_ids = getattr(self.proposer, "aux_layer_ids", ())
        aux_hidden = None
        if aux_ids:  # EAGLE-3 fuses these target layers' hidden states
            hidden, aux_hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta,
                                            aux_layer_ids=aux_ids)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_logits, vocab]
        plain = [(i, s) for i, s in enumerate(sched.scheduled) if s.is_last_chunk and not s.num_draft_tokens]
        if plain:
            rows = [inputs.logits_rows[i][0] for i, _ in plain]
            params = [s.sampling_params for _, s in plain]
            gens = [None if p.is_greedy else self._generator(s.request_id, p.seed) for (_, s), p in zip(plain, params)]
            tokens, logprobs = self.sampler(logits[rows], params, gens)
            for (_, s), t, lp in zip(plain, tokens, logprobs):
                out.sampled_token_ids[s.request_id] = [t]
                if lp is not None:
                    out.logprobs[s.request_id] = [lp]
        if self.verifier is not None:
            self.verifier.verify(self, sched, inputs, logits, out)
        if self.proposer is not None:
            self.proposer.propose(self, sched, inputs, hidden, aux_hidden, out)
        return out
