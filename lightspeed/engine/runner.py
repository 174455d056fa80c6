"""ModelRunner: the only place that builds tensors. Owns the model, the KV cache and the
per-request sampling state and the KernelSettings its model runs with; turns a
SchedulerOutput into a RunnerOutput."""
from __future__ import annotations

import math

import torch

from lightspeed.engine.input_prep import BlockTables, build_host_inputs, inputs_from_host
from lightspeed.engine.outputs import RunnerOutput, SchedulerOutput
from lightspeed.engine.profile import NULL_TIMER
from lightspeed.engine.penalties import ContextTracker, apply_penalties
from lightspeed.engine.sampler import Sampler
from lightspeed.kernels.settings import KernelSettings, bind_kernel_settings
from lightspeed.layers.linear import ensure_gemv_tuned
from lightspeed.speculative.proposer import ProposeInputs
from lightspeed.speculative.verify import VerifyRequest


def lazy_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on CPU from calloc'd memory (numpy), whose pages the OS maps on first
    write, so a KV cache costs resident memory only as blocks are used (torch.zeros writes
    every page up front: a 2 GiB default CPU cache was 2 GiB of RSS from the start)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, proposer=None, verifier=None, enable_cuda_graph: bool = False,
                 max_num_seqs: int = 64, kernel_settings: KernelSettings | None = None):
        self.model = model
        self.config = model.config
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        shape = model.kv_cache_shape(self.config, num_blocks, block_size)
        self.kv_caches = [lazy_zeros(shape, dtype, device) for _ in range(self.config.num_hidden_layers)]
        self.sampler = Sampler()
        self.penalty_contexts = ContextTracker()  # token ids of requests with repetition/frequency/presence penalties
        self.proposer = proposer
        self.verifier = verifier
        self.set_kernel_settings(kernel_settings if kernel_settings is not None else KernelSettings())
        self._seed_rng = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}
        self.block_tables = BlockTables()  # request id -> block ids, from the scheduler's per-step changes
        self.draft_probs: dict[str, torch.Tensor] = {}  # request id -> q [n, V] of its sampled drafts, until verified
        self.grammar = None  # structured.GrammarBatch: matchers of constrained requests (see constrain)
        self.timer = NULL_TIMER  # engine/profile.py: the engine's StepTimer while profiling
        # CUDA graphs need the Triton path (no host syncs or lists inside a step)
        self.graphs = None
        if enable_cuda_graph and device.type == "cuda" and self.kernel_settings.use_triton(self.kv_caches[0]):
            from lightspeed.engine.cuda_graph import CudaGraphRunner
            self.graphs = CudaGraphRunner(model, self.kv_caches, block_size, max_num_seqs, device)

    def set_kernel_settings(self, settings: KernelSettings) -> None:
        """Run the model (and the drafter, the verifier) with `settings` from now on."""
        self.kernel_settings = settings
        bind_kernel_settings(self.model, settings)
        for part in (self.proposer, self.verifier):
            if part is not None:
                part.set_kernel_settings(settings)

    def constrain(self, request_id: str, compiled, structured) -> None:
        """Constrain a request's output to its compiled grammar (structured outputs): its
        logits rows are masked, its drafts trimmed, its matcher advanced by what it emits."""
        if self.grammar is None:
            from lightspeed.structured import GrammarBatch
            self.grammar = GrammarBatch(structured)
        self.grammar.add(request_id, compiled)

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
            self.draft_probs.pop(rid, None)
            self.penalty_contexts.drop(rid)
            if self.proposer is not None:
                self.proposer.drop(rid)
            if self.grammar is not None:
                self.grammar.drop(rid)
        self.block_tables.update(sched)
        out = RunnerOutput()
        if sched.is_empty:
            return out
        self.penalty_contexts.update(sched.scheduled)
        host = build_host_inputs(sched, self.block_size, self.block_tables)
        self.timer.mark("input_prep")
        proposer = self.proposer
        aux_ids = tuple(proposer.aux_layer_ids) if proposer is not None and proposer.needs_hidden_states else ()
        shape = self.graphs.shape_for(sched, host) if self.graphs is not None else None
        # NOTE: the GEMV-vs-cuBLAS choice is per token count; measure it outside any capture
        ensure_gemv_tuned(self.model, shape[0] * shape[1] if shape else len(host.input_ids), self.device,
                          self.kernel_settings)
        ran = self.graphs.run(shape, host, aux_ids) if shape is not None else None
        if ran is not None:  # replayed: views of the graph's static outputs, valid this step
            inputs, hidden, aux_hidden, logits = ran
        else:
            inputs = inputs_from_host(host, self.device)
            aux_hidden = None
            if aux_ids:  # EAGLE-3 fuses these target layers' hidden states
                hidden, aux_hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta,
                                                aux_layer_ids=aux_ids)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_logits, vocab]
        self.timer.mark("forward")
        if self.grammar is not None:  # NOTE: the host fills the masks while the device runs the step
            self.grammar.mask_logits(sched, inputs, logits)
        plain = [(i, s) for i, s in enumerate(sched.scheduled) if s.is_last_chunk and not s.num_draft_tokens]
        if plain:
            rows = [inputs.logits_rows[i][0] for i, _ in plain]
            params = [s.sampling_params for _, s in plain]
            gens = [None if p.is_greedy else self._generator(s.request_id, p.seed) for (_, s), p in zip(plain, params)]
            ctxs = self.penalty_contexts.contexts
            penalized = apply_penalties(logits[rows], params, [ctxs.get(s.request_id) for _, s in plain],
                                        [s.num_output_tokens for _, s in plain])
            tokens, logprobs = self.sampler(penalized, params, gens)
            for (_, s), t, lp in zip(plain, tokens, logprobs):
                out.sampled_token_ids[s.request_id] = [t]
                if lp is not None:
                    out.logprobs[s.request_id] = [lp]
        self.timer.mark("sample")
        accepted = self._verify(sched, inputs, logits, out) if self.verifier is not None else {}
        if self.grammar is not None:  # the masks made every emitted token grammatical
            self.grammar.advance(out)
        if self.proposer is not None:
            self._propose(sched, inputs, aux_hidden, accepted, out)
        return out

    # -- speculation: the verifier and the proposer see plain inputs; KV, generators and graphs stay here
    def _verify(self, sched: SchedulerOutput, inputs, logits: torch.Tensor, out: RunnerOutput) -> dict[str, list[int]]:
        """Verify every request with drafts; emit its tokens; move a tree's accepted KV into place
        -> request id -> accepted draft indices."""
        todo = [(i, s) for i, s in enumerate(sched.scheduled) if s.is_last_chunk and s.num_draft_tokens]
        requests = []
        for i, s in todo:
            p = s.sampling_params
            requests.append(VerifyRequest(s.request_id, inputs.logits_rows[i][0], s.token_ids[-s.num_draft_tokens:],
                                          s.draft_parents, p, self.draft_probs.pop(s.request_id, None),
                                          None if p.is_greedy else self._generator(s.request_id, p.seed)))
        results = self.verifier.verify(logits, requests)
        src_slots: list[int] = []
        dst_slots: list[int] = []
        for _, s in todo:
            r = results[s.request_id]
            out.sampled_token_ids[s.request_id] = r.token_ids
            if r.logprobs is not None:
                out.logprobs[s.request_id] = r.logprobs
            # Tree: node c's KV sits at storage slot root + 1 + c; the accepted path's KV must
            # end up at the slots of its positions root + 1, root + 2, ... (chains already do).
            root, table = s.start_pos + len(s.token_ids) - s.num_draft_tokens - 1, self.block_tables[s.request_id]
            for d, c in enumerate(r.path, start=1):
                if c != d - 1:
                    src_slots.append(_slot(table, root + 1 + c, self.block_size))
                    dst_slots.append(_slot(table, root + d, self.block_size))
        if src_slots:
            copy_kv_slots(self.kv_caches, src_slots, dst_slots)
        return {rid: r.path for rid, r in results.items()}

    def _propose(self, sched: SchedulerOutput, inputs, aux_hidden: torch.Tensor | None,
                 accepted: dict[str, list[int]], out: RunnerOutput) -> None:
        emitted = out.sampled_token_ids
        gens = {s.request_id: self._generator(s.request_id, s.sampling_params.seed) for s in sched.scheduled
                if s.request_id in emitted and not s.sampling_params.is_greedy}
        drafts = self.proposer.propose(ProposeInputs(sched, emitted, accepted, inputs.attn_meta.query_start_loc_cpu,
                                                     aux_hidden, gens, self.graphs is not None))
        for s in sched.scheduled:
            self.draft_probs.pop(s.request_id, None)
        self.draft_probs.update(drafts.probs)
        out.draft_token_ids.update(drafts.token_ids)
        out.draft_parents.update(drafts.parents)
        if self.grammar is not None:  # NOTE: a trimmed chain keeps its q rows; verify reads the first n
            self.grammar.trim_drafts(out)


def _slot(block_table: list[int], index: int, block_size: int) -> int:
    return block_table[index // block_size] * block_size + index % block_size


def copy_kv_slots(kv_caches: list[torch.Tensor], src: list[int], dst: list[int]) -> None:
    """Copy K and V of slots `src` to slots `dst` in every layer ([2, blocks, block_size, Hkv, D])."""
    dev = kv_caches[0].device
    src_t, dst_t = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
    for kv in kv_caches:
        flat = kv.view(2, -1, *kv.shape[3:])  # [2, slots, Hkv, D]
        flat[:, dst_t] = flat[:, src_t]  # NOTE: the gather copies first, so overlapping slots are safe
