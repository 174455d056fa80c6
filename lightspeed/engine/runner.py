"""ModelRunner: the only place that builds tensors. Owns the model, the KV cache and the
per-request sampling state; turns a SchedulerOutput into a RunnerOutput."""
from __future__ import annotations

import torch

from lightspeed import kernels
from lightspeed.engine.input_prep import build_host_inputs, prepare_inputs
from lightspeed.engine.outputs import RunnerOutput, SchedulerOutput
from lightspeed.engine.sampler import Sampler
from lightspeed.layers.linear import ensure_gemv_tuned


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, proposer=None, verifier=None, enable_cuda_graph: bool = False,
                 max_num_seqs: int = 64):
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
        self.grammar = None  # structured.GrammarBatch: matchers of constrained requests (set by the Engine)
        # CUDA graphs need the Triton path (no host syncs or lists inside a step)
        self.graphs = None
        if enable_cuda_graph and device.type == "cuda" and kernels.use_triton(self.kv_caches[0]):
            from lightspeed.engine.cuda_graph import CudaGraphRunner
            self.graphs = CudaGraphRunner(model, self.kv_caches, block_size, max_num_seqs, device)

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
            if self.grammar is not None:
                self.grammar.drop(rid)
        out = RunnerOutput()
        if sched.is_empty:
            return out
        host = build_host_inputs(sched, self.block_size)
        aux_ids = tuple(getattr(self.proposer, "aux_layer_ids", ()))
        shape = self.graphs.shape_for(sched, host) if self.graphs is not None else None
        # NOTE: the GEMV-vs-cuBLAS choice is per token count; measure it outside any capture
        ensure_gemv_tuned(self.model, shape[0] * shape[1] if shape else len(host.input_ids), self.device)
        ran = self.graphs.run(shape, host, aux_ids) if shape is not None else None
        if ran is not None:  # replayed: views of the graph's static outputs, valid this step
            inputs, hidden, aux_hidden, logits = ran
        else:
            inputs = prepare_inputs(sched, self.block_size, self.device, host)
            aux_hidden = None
            if aux_ids:  # EAGLE-3 fuses these target layers' hidden states
                hidden, aux_hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta,
                                                aux_layer_ids=aux_ids)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_logits, vocab]
        if self.grammar is not None:  # NOTE: the host fills the masks while the device runs the step
            self.grammar.mask_logits(sched, inputs, logits)
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
        if self.grammar is not None:
            self.grammar.advance(out)
        if self.proposer is not None:
            self.proposer.propose(self, sched, inputs, hidden, aux_hidden, out)
            if self.grammar is not None:
                self.grammar.trim_drafts(out)
        return out
