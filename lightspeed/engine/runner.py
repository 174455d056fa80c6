"""ModelRunner: the only place that builds tensors. Owns the model, the KV cache and the
per-request sampling state and the KernelSettings its model runs with; turns a
SchedulerOutput into a RunnerOutput."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from lightspeed.engine.input_prep import BlockTables, build_host_inputs, inputs_from_host
from lightspeed.engine.outputs import PLACEHOLDER, RunnerOutput, SchedulerOutput
from lightspeed.engine.penalties import ContextTracker, apply_penalties, has_penalties
from lightspeed.engine.profile import NULL_TIMER
from lightspeed.engine.sampler import Sampler, to_device
from lightspeed.kernels.kv_cache import copy_kv_slots, new_kv_cache, split_kv
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
                 max_num_seqs: int = 64, kernel_settings: KernelSettings | None = None, kv_cache_dtype: str = "auto",
                 k_shift: list[torch.Tensor] | None = None):
        self.model = model
        self.config = model.config
        self.device, self.dtype = device, dtype
        self.block_size = block_size
        shape = model.kv_cache_shape(self.config, num_blocks, block_size)
        # per layer: a tensor in the model dtype, or an FP8 KVCache (kernels/kv_cache.py) whose K is
        # stored less k_shift[layer] (forward.py calibrate_k_shift; zeros when None)
        self.kv_cache_dtype, self.k_shift = kv_cache_dtype, k_shift
        self.kv_caches = [new_kv_cache(shape, dtype, kv_cache_dtype, device, lazy_zeros,
                                       k_shift=None if k_shift is None else k_shift[i])
                          for i in range(self.config.num_hidden_layers)]
        self.num_blocks = num_blocks
        self.sampler = Sampler()
        self.penalty_contexts = ContextTracker()  # token ids of requests with repetition/frequency/presence penalties
        self.proposer = proposer
        self.verifier = verifier
        self.set_kernel_settings(kernel_settings if kernel_settings is not None else KernelSettings())
        self._seed_rng = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}
        self.block_tables = BlockTables()  # request id -> block ids, from the scheduler's per-step changes
        self.draft_probs: dict[str, torch.Tensor] = {}  # request id -> q [n, V] of its sampled drafts, until verified
        # the last launched step's sampled tokens on the device [n] and each request's row in them
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None
        self._last_launched: LaunchedStep | None = None  # its tokens (grammars read them before masking)
        self.grammar = None  # structured.GrammarBatch: matchers of constrained requests (see constrain)
        self.meter = None  # spec_advice.SpeculationMeter: is speculation slower than plain here (CPU)
        method = getattr(getattr(proposer, "config", None), "method", None)  # NOTE: a TP worker's stand-in has none
        if method is not None and device.type == "cpu":
            from lightspeed.spec_advice import SpeculationMeter
            self.meter = SpeculationMeter(method)
        self.timer = NULL_TIMER  # engine/profile.py: the engine's StepTimer while profiling
        # CUDA graphs need the Triton path (no host syncs or lists inside a step)
        self.graphs = None
        if enable_cuda_graph and device.type == "cuda" and self.kernel_settings.use_triton(self.kv_data(0)):
            from lightspeed.engine.cuda_graph import CudaGraphRunner
            self.graphs = CudaGraphRunner(model, self.kv_caches, block_size, max_num_seqs, device)

    def warm_up(self, max_seq_len: int) -> int:
        """Capture the decode CUDA graphs of sequences up to about max_seq_len tokens now
        (cuda_graph.py CudaGraphRunner.warm_up) -> how many; 0 without graphs."""
        if self.graphs is None:
            return 0
        return self.graphs.warm_up(max_seq_len, lambda b: ensure_gemv_tuned(self.model, b, self.device,
                                                                            self.kernel_settings))

    def kv_data(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s K/V values [2, blocks, block_size, Hkv, D] (without FP8 scales)."""
        return split_kv(self.kv_caches[layer])[0]

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

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step to its end: its tokens on the host."""
        return self.collect(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> "LaunchedStep":
        """Enqueue one step on the device; its sampled tokens stay there (a step with logprobs,
        penalties or speculation runs to its end here). A token id PLACEHOLDER in the step is
        the token the previous launched step sampled for that request: filled in on the device
        (overlap scheduling). Grammars: once the forward is enqueued, the host reads the previous
        step's tokens, advances the matchers and fills the masks while the device computes."""
        for rid in sched.finished_request_ids:
            self.generators.pop(rid, None)
            self.draft_probs.pop(rid, None)
            self.penalty_contexts.drop(rid)
            if self.proposer is not None:
                self.proposer.drop(rid)
            if self.grammar is not None:
                self.grammar.drop(rid)
        self.block_tables.update(sched)
        if sched.is_empty:
            return LaunchedStep(out=RunnerOutput())
        start = time.perf_counter()
        needs_host = self.verifier is not None or self.proposer is not None or any(
            s.sampling_params.logprobs is not None or has_penalties(s.sampling_params) for s in sched.scheduled)
        if needs_host:
            self.penalty_contexts.update(sched.scheduled)
        host = build_host_inputs(sched, self.block_size, self.block_tables)
        fill = self._placeholder_fill(sched, host)
        self.timer.mark("input_prep")
        proposer = self.proposer
        aux_ids = tuple(proposer.aux_layer_ids) if proposer is not None and proposer.needs_hidden_states else ()
        shape = self.graphs.shape_for(sched, host) if self.graphs is not None else None
        # NOTE: the GEMV-vs-cuBLAS choice is per token count; measure it outside any capture
        ensure_gemv_tuned(self.model, shape[0] * shape[1] if shape else len(host.input_ids), self.device,
                          self.kernel_settings)
        ran = self.graphs.run(shape, host, aux_ids, fill) if shape is not None else None
        if ran is not None:  # replayed: views of the graph's static outputs, valid this step
            inputs, hidden, aux_hidden, logits = ran
        else:
            inputs = inputs_from_host(host, self.device)
            if fill is not None:
                inputs.input_ids.index_copy_(0, *fill)
            aux_hidden = None
            if aux_ids:  # EAGLE-3 fuses these target layers' hidden states
                hidden, aux_hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta,
                                                aux_layer_ids=aux_ids)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn_meta)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [num_logits, vocab]
        self.timer.mark("forward")
        if self.grammar is not None and any(s.request_id in self.grammar for s in sched.scheduled):
            self._read_last_launched()  # NOTE: its tokens advance the matchers the masks start from
            self.grammar.mask_logits(sched, inputs, logits)
        if needs_host:
            out = self._run_on_host(sched, inputs, logits, aux_hidden, start)
            self.timer.mark("sample")
            return LaunchedStep(out=out)
        plain = [(i, s) for i, s in enumerate(sched.scheduled) if s.is_last_chunk]
        if not plain:
            return LaunchedStep(out=RunnerOutput())
        tokens = self.sampler.sample(self._plain_logits(logits, inputs, plain), *self._plain_params(plain))
        rids = [s.request_id for _, s in plain]
        self._last_sampled = (tokens, {rid: j for j, rid in enumerate(rids)})
        step = LaunchedStep(request_ids=rids, tokens=to_host_async(tokens))
        self._last_launched = step
        self.timer.mark("sample")
        return step

    def collect(self, step: "LaunchedStep") -> RunnerOutput:
        """Wait for a launched step's tokens -> its RunnerOutput (read once; the grammars of its
        requests advanced by them)."""
        if step.out is not None:
            return step.out
        tokens, ready = step.tokens
        if ready is not None:
            ready.synchronize()
        self.timer.mark("wait")
        step.out = RunnerOutput(sampled_token_ids={rid: [t] for rid, t in zip(step.request_ids, tokens.tolist())})
        if self.grammar is not None:
            self.grammar.advance(step.out)
        return step.out

    def _read_last_launched(self) -> None:
        if self._last_launched is not None:
            self.collect(self._last_launched)
            self._last_launched = None

    def _placeholder_fill(self, sched: SchedulerOutput, host) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, tokens) on the device: input row of each PLACEHOLDER <- the previous step's
        sampled token of that request."""
        prev = [(host.query_start_loc[i + 1] - 1, s.request_id) for i, s in enumerate(sched.scheduled)
                if s.token_ids[-1] == PLACEHOLDER]
        if not prev:
            return None
        tokens, row_of = self._last_sampled
        dst = to_device([r for r, _ in prev], torch.int64, self.device)
        src = to_device([row_of[rid] for _, rid in prev], torch.int64, self.device)
        return dst, tokens.index_select(0, src)

    def _plain_params(self, plain: list) -> tuple[list, list]:
        params = [s.sampling_params for _, s in plain]
        gens = [None if p.is_greedy else self._generator(s.request_id, p.seed) for (_, s), p in zip(plain, params)]
        return params, gens

    @staticmethod
    def _plain_logits(logits: torch.Tensor, inputs, plain: list) -> torch.Tensor:
        """[len(plain), vocab]: each plain request's logits row (no copy when that is every row)."""
        rows = [inputs.logits_rows[i][0] for i, _ in plain]
        if len(rows) == logits.shape[0] and rows[-1] == len(rows) - 1:
            return logits  # rows ascend: they are 0 .. n - 1
        return logits[to_device(rows, torch.int64, logits.device)]

    def _run_on_host(self, sched: SchedulerOutput, inputs, logits: torch.Tensor, aux_hidden,
                     start: float) -> RunnerOutput:
        """Sample (with logprobs, penalties), verify, advance grammars and propose, with the
        tokens on the host."""
        out = RunnerOutput()
        plain = [(i, s) for i, s in enumerate(sched.scheduled) if s.is_last_chunk and not s.num_draft_tokens]
        if plain:
            params, gens = self._plain_params(plain)
            ctxs = self.penalty_contexts.contexts
            penalized = apply_penalties(self._plain_logits(logits, inputs, plain), params,
                                        [ctxs.get(s.request_id) for _, s in plain],
                                        [s.num_output_tokens for _, s in plain])
            tokens, logprobs = self.sampler(penalized, params, gens)
            for (_, s), t, lp in zip(plain, tokens, logprobs):
                out.sampled_token_ids[s.request_id] = [t]
                if lp is not None:
                    out.logprobs[s.request_id] = [lp]
        accepted = self._verify(sched, inputs, logits, out) if self.verifier is not None else {}
        if self.grammar is not None:  # the masks made every emitted token grammatical
            self.grammar.advance(out)
        if self.proposer is None:
            return out
        verified = time.perf_counter()
        self._propose(sched, inputs, aux_hidden, accepted, out)
        if self.meter is not None and not self.meter.is_done and _is_decode(sched):
            has_drafts = any(s.num_draft_tokens for s in sched.scheduled)
            self.meter.record(has_drafts, time.perf_counter() - start if has_drafts else verified - start,
                              sum(len(t) for t in out.sampled_token_ids.values()))
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
        masks = self.grammar.draft_masks() if self.grammar is not None else None
        try:
            drafts = self.proposer.propose(ProposeInputs(sched, emitted, accepted,
                                                         inputs.attn_meta.query_start_loc_cpu, aux_hidden, gens,
                                                         self.graphs is not None, masks))
        finally:
            if masks is not None:
                masks.close()
        for s in sched.scheduled:
            self.draft_probs.pop(s.request_id, None)
        if self.meter is not None and self.meter.wants_plain_step() and _is_decode(sched):
            return  # NOTE: a measured plain step next (SpeculationMeter); dropping drafts is always lossless
        self.draft_probs.update(drafts.probs)
        out.draft_token_ids.update(drafts.token_ids)
        out.draft_parents.update(drafts.parents)
        if self.grammar is not None:  # NOTE: a trimmed chain keeps its q rows; verify reads the first n
            self.grammar.trim_drafts(out)


def _is_decode(sched: SchedulerOutput) -> bool:
    """Every scheduled request feeds one real token (and maybe drafts): no prefill."""
    return all(s.is_last_chunk and len(s.token_ids) - s.num_draft_tokens == 1 for s in sched.scheduled)


@dataclass
class LaunchedStep:
    """A step on the device: `out` when it ran to its end in launch(), else its requests and
    their sampled tokens on their way to the host (to_host_async)."""
    out: RunnerOutput | None = None
    request_ids: list[str] | None = None
    tokens: tuple[torch.Tensor, object] | None = None


def to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start copying `t` to the host -> (host tensor, CUDA event to wait on before reading it, or None)."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _slot(block_table: list[int], index: int, block_size: int) -> int:
    return block_table[index // block_size] * block_size + index % block_size
