"""Engine: add_request / step / abort_request. Owns the loop: schedule -> run -> update ->
detokenize (stop strings) -> outputs."""
from __future__ import annotations

import itertools
import logging
import time

import torch

from lightspeed.config import EngineConfig, SamplingParams
from lightspeed.engine.block_manager import BlockManager
from lightspeed.engine.forward import calibrate_k_shift, rope_positions
from lightspeed.engine.outputs import RequestMetrics, RequestOutput
from lightspeed.engine.penalties import has_penalties
from lightspeed.engine.profile import NULL_TIMER
from lightspeed.engine.prompt import check_prompt
from lightspeed.engine.request import Request, RequestStatus, SpecStats
from lightspeed.engine.runner import ModelRunner
from lightspeed.engine.scheduler import Scheduler
from lightspeed.errors import InvalidRequestError
from lightspeed.kernels.kv_cache import kv_bytes_per_slot
from lightspeed.kernels.settings import KernelSettings
from lightspeed.loader.model import load_model
from lightspeed.tokenizer import IncrementalDetokenizer

WARM_UP_PROMPT_LENS = (100, 300)  # Engine.run_warm_up_requests
_log = logging.getLogger("lightspeed")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev, _DTYPES[dtype or ("bfloat16" if dev.type == "cuda" else "float32")]


def _kv_num_blocks(cfg: EngineConfig, model_config, dtype: torch.dtype, device: torch.device, max_model_len: int) -> int:
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    # NOTE: FP8 (kv_cache_dtype fp8) counts its e4m3 values and float32 scales: about 2x the blocks
    per_block = model_config.num_hidden_layers * cfg.block_size * kv_bytes_per_slot(
        model_config.num_key_value_heads, model_config.head_dim, dtype, cfg.kv_cache_dtype)
    wanted = cfg.max_num_seqs * -(-max_model_len // cfg.block_size)
    if cfg.kv_cache_gb is not None:
        budget = cfg.kv_cache_gb * 2**30
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] * 0.8
    else:
        budget = 2 * 2**30
    return max(1, min(wanted, int(budget // per_block)))


def engine_kernel_settings(config: EngineConfig, speculative: bool, device: torch.device) -> KernelSettings:
    """The engine's KernelSettings: PDL per config.enable_pdl (and LIGHTSPEED_DISABLE_PDL), the
    fused layers per config.enable_fused_layers; batch invariance per config.batch_invariant,
    None meaning on with speculation on CUDA."""
    invariant = config.batch_invariant
    invariant = speculative and device.type == "cuda" if invariant is None else invariant
    # NOTE: the fused layers call the projections' kernels directly, past the row-parallel
    # all-reduce hooks of a tensor-parallel shard: per-op layers under TP
    fused = config.enable_fused_layers and config.tensor_parallel_size == 1
    base = KernelSettings(batch_invariant=invariant, fused_layers=fused)
    return base if config.enable_pdl else base.replace(pdl=False)


def use_overlap(config: EngineConfig, speculative, device: torch.device) -> bool:
    """Overlap scheduling per config.overlap_schedule; None: on for CUDA without speculation or
    tensor parallelism. NOTE: speculation and tensor parallelism need each step's tokens on
    the host before the next step is scheduled; they always run one step at a time."""
    supported = speculative is None and config.tensor_parallel_size == 1
    if config.overlap_schedule is None:
        return supported and device.type == "cuda"
    if config.overlap_schedule and not supported:
        _log.warning("overlap scheduling is off: speculative decoding and tensor parallelism run one step at a time")
    return config.overlap_schedule and supported


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor once (tied weights too)."""
    seen = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


class Engine:
    def __init__(self, config: EngineConfig, speculative=None):
        self.config = config
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype)
        kernel_settings = engine_kernel_settings(config, speculative is not None, self.device)
        self.tp_group = None
        if config.tensor_parallel_size > 1 and speculative is not None and speculative.is_tree:
            # NOTE: a tree's accepted path moves KV slots on rank 0 only (runner._verify); the
            # other ranks' caches would keep the rejected branches' KV
            raise InvalidRequestError("tree speculation is not supported with --tensor-parallel-size > 1 yet; "
                                      "use a chain (--spec-tree-topk 1)")
        if config.tensor_parallel_size > 1:  # one process per device (lightspeed/distributed)
            from lightspeed.distributed.executor import TensorParallelGroup
            self.tp_group = TensorParallelGroup(config, self.device, self.dtype, speculative)
            model, self.tokenizer, k_shift = self.tp_group.model, self.tp_group.tokenizer, self.tp_group.k_shift
        else:
            model, self.tokenizer = load_model(config.model, self.device, self.dtype, config.quantization)
            k_shift = calibrate_k_shift(model, self.tokenizer, config.kv_cache_dtype)
        self.model_config = mc = model.config
        max_positions = rope_positions(model)
        if config.max_model_len is not None and config.max_model_len > max_positions and not config.allow_long_context:
            raise InvalidRequestError(
                f"--max-model-len {config.max_model_len} is more than this model's context of {max_positions} "
                "tokens (its position embeddings); lower it, leave it unset, or pass --allow-long-context to cap it")
        max_len = min(config.max_model_len or mc.max_position_embeddings, max_positions)
        num_blocks = _kv_num_blocks(config, mc, self.dtype, self.device, max_len)
        # NOTE: a context longer than the whole cache could never run; cap it there
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        proposer = verifier = None
        if speculative is not None:
            from lightspeed.speculative import build_speculation
            from lightspeed.speculative.proposer import TargetInfo
            embed = getattr(getattr(model, "model", model), "embed_tokens", None)
            target = TargetInfo(model_name=config.model, model_config=mc, tokenizer=self.tokenizer, embed_tokens=embed,
                                device=self.device, dtype=self.dtype, block_size=config.block_size,
                                num_kv_blocks=num_blocks, max_model_len=self.max_model_len,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                max_num_seqs=config.max_num_seqs)
            proposer, verifier = build_speculation(speculative, target)
        self.speculative = speculative
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.device, self.dtype,
                                  seed=config.seed, proposer=proposer, verifier=verifier,
                                  enable_cuda_graph=config.enable_cuda_graph, max_num_seqs=config.max_num_seqs,
                                  kernel_settings=kernel_settings, kv_cache_dtype=config.kv_cache_dtype,
                                  k_shift=k_shift)
        if self.tp_group is not None:
            self.runner = self.tp_group.start(self.runner)  # pipes each step to the other ranks
        # NOTE: a proposer that needs every position's hidden states (EAGLE-3) turns prefix caching off
        caching = config.enable_prefix_caching and (proposer is None or proposer.supports_prefix_cache)
        self.block_manager = BlockManager(num_blocks, config.block_size, enable_caching=caching)
        adaptive = None
        if speculative is not None and speculative.adaptive:
            from lightspeed.speculative.adaptive import AdaptiveDraftLength, DraftCostModel
            cost = speculative.draft_cost
            if cost is None:  # NOTE: bandwidth-bound forwards cost their weight bytes
                drafter = getattr(proposer, "_module", None)
                cost = weight_bytes(drafter) / weight_bytes(model) if drafter is not None else 0.0
            adaptive = AdaptiveDraftLength(DraftCostModel(cost), speculative.depth)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   spec_thresholds=getattr(speculative, "load_thresholds", None), adaptive=adaptive)
        self._ids = itertools.count()
        self._phases = itertools.count()  # each request's stream phase (_OutputState.is_due)
        self._states: dict[str, _OutputState] = {}
        self.spec_stats = SpecStats()  # speculation counters of every finished request, in aggregate
        self.overlap = use_overlap(config, speculative, self.device)
        # requests whose steps run one at a time (their tokens are needed on the host first)
        self._sync_ids: set[str] = set()
        self._in_flight = None  # (SchedulerOutput, runner.LaunchedStep) launched and not yet read
        self.timer = NULL_TIMER  # engine/profile.py StepTimer: host time per phase

    @property
    def kernel_settings(self) -> KernelSettings:
        """The settings the runner runs its model (and drafter) with."""
        return self.runner.kernel_settings

    # -- requests ----------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate a prompt (text or token ids) -> token ids; raises InvalidRequestError."""
        return check_prompt(self.tokenizer, self.model_config.vocab_size, self.max_model_len, prompt, self.config.model)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, stream: bool = True) -> str:
        """Queue a request -> its id. stream=False: one output, when it finishes (its text
        decoded then, unless stop strings need it each step)."""
        params = params or SamplingParams()
        ids = self.tokenize_prompt(prompt)
        if self.speculative is not None and has_penalties(params):
            raise InvalidRequestError("repetition, frequency and presence penalties are not supported with "
                                      "speculative decoding; leave them at their defaults or serve without speculation")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.scheduler.requests:
            raise InvalidRequestError(f"request id {rid!r} is already running")
        grammar = self.structured.compile(params) if params.is_guided else None  # InvalidRequestError: bad one
        req = Request(rid, ids, params, eos_token_ids=list(self._eos_ids()), max_model_len=self.max_model_len)
        self._states[rid] = _OutputState(self.tokenizer, params, prompt if isinstance(prompt, str) else None,
                                         stream, phase=next(self._phases) % self.config.stream_interval)
        if params.logprobs is not None or has_penalties(params):
            self._sync_ids.add(rid)
        self.scheduler.add_request(req)
        if grammar is not None:  # NOTE: a method call, so it reaches a TensorParallelRunner's own runner
            self.runner.constrain(rid, grammar, self.structured)
        return rid

    @property
    def structured(self):
        """The structured.StructuredOutputs compiling this model's constraints (built on first use)."""
        from lightspeed.structured import structured_outputs
        return structured_outputs(self.tokenizer, self.model_config.vocab_size, self._eos_ids())

    def _eos_ids(self) -> set[int]:
        return set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else ())

    def abort_request(self, request_id: str) -> None:
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._states.pop(request_id, None)
        self._sync_ids.discard(request_id)

    def warm_up(self) -> int:
        """Before serving: capture the decode CUDA graphs of short sequences at every batch
        size now (runner.warm_up), so that no step of a running server stalls all requests
        on a capture; on a GPU also run WARM_UP_PROMPT_LENS requests to their end, so the first
        prefills compile no kernel (~0.5 s of the first requests' TTFT on a fresh H200)
        -> graphs captured."""
        start = time.perf_counter()
        n = self.runner.warm_up(self.max_model_len)
        if n:
            _log.info("captured %d CUDA graphs in %.1f s", n, time.perf_counter() - start)
        if self.device.type == "cuda":
            self.run_warm_up_requests()
        return n

    def run_warm_up_requests(self) -> None:
        """Prompts of WARM_UP_PROMPT_LENS tokens (those that fit), two greedy tokens each, run
        to their end in one batch: prefill, mixed and decode steps, and the sampler."""
        vocab = self.model_config.vocab_size
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for i, n in enumerate(n for n in WARM_UP_PROMPT_LENS if n + 2 <= self.max_model_len):
            self.add_request([(7 * t + i) % vocab for t in range(n)], params, request_id=f"warm-up-{i}", stream=False)
        while self.has_unfinished_requests():
            self.step()

    def has_unfinished_requests(self) -> bool:
        # NOTE: a step still in flight then holds only finished requests; the next step reads it
        return self.scheduler.has_unfinished_requests()

    # -- the loop --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step whose tokens were read.

        Sequential: that is this step. Overlap scheduling: the previous one, read after this
        one is launched, so the host's scheduling and input prep run while the device computes:

            host:   | sched N+1 | launch N+1 | read N, stop checks, outputs | sched N+2 | ...
            device: | ......... step N ......... | ............ step N+1 ............ |

        A request that ended at step N (EOS, a stop string) was already scheduled for N + 1;
        that token is dropped. Steps of requests that need their tokens on the host before the
        next step is scheduled (logprobs, penalties) run one at a time; a grammar's masks wait
        for the previous step's tokens inside the launch (runner.launch)."""
        timer = self.timer
        timer.start()
        outputs = []
        sequential = not self.overlap or bool(self._sync_ids)
        if sequential and self._in_flight is not None:
            outputs += self._read(*self._in_flight)
            self._in_flight = None
        sched = self.scheduler.schedule()
        timer.mark("schedule")
        if sequential:  # NOTE: execute: a tensor-parallel runner's one entry point
            return outputs + self._update(sched, self.runner.execute(sched))
        launched = self.runner.launch(sched)
        if self._in_flight is not None:
            outputs += self._read(*self._in_flight)
        self._in_flight = None if sched.is_empty else (sched, launched)
        return outputs

    def _read(self, sched, launched) -> list[RequestOutput]:
        return self._update(sched, self.runner.collect(launched))

    def _update(self, sched, result) -> list[RequestOutput]:
        """Advance the step's requests by its tokens; stop checks; outputs."""
        timer = self.timer
        updated = self.scheduler.update_from_output(sched, result)
        timer.mark("update")
        outputs = []
        interval = self.config.stream_interval
        for req in updated:
            state = self._states[req.request_id]
            due = state.stream and state.is_due(req, interval)
            if not req.is_finished and not state.params.stop and not due:
                continue  # NOTE: no stop strings: decoded only when an output is due (or it finishes)
            if state.process(req):
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            elif req.status is RequestStatus.FINISHED_LENGTH and self.runner.grammar is not None \
                    and self.runner.grammar.is_ended(req.request_id, len(req.output_token_ids)):
                req.status = RequestStatus.FINISHED_STOPPED  # the grammar ended exactly at max_tokens
            if req.is_finished or due:  # NOTE: process() changes the output only when it finishes it
                outputs.append(state.output(req))
            if req.is_finished:
                self.spec_stats.merge(req.spec)
                del self._states[req.request_id]
                self._sync_ids.discard(req.request_id)
        timer.mark("output")
        return outputs


class _OutputState:
    """Detokenizes one request's new tokens, applies stop strings, builds RequestOutputs."""

    def __init__(self, tokenizer, params: SamplingParams, prompt: str | None, stream: bool = True, phase: int = 0):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None  # None: no text
        # NOTE: two tokenizer decodes per token and step were ~10 us per request; a request read
        # only when finished (LLM.generate) is decoded once, at the end
        self.is_deferred = not stream and not params.stop
        self.stream = stream
        self.params = params
        self.prompt = prompt
        self.text = ""
        self.num_processed = 0
        self.num_sent_tokens = 0
        self.num_sent_chars = 0
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.phase = phase  # streamed outputs at token counts = phase (mod the interval): see is_due

    def process(self, req: Request) -> bool:
        """Detokenize the new tokens (one by one with stop strings); True when a stop string
        ended the request (then the tokens after it are dropped, exactly as if they had never
        been sampled)."""
        stops = self.params.stop
        if self.is_deferred:
            self.num_processed = len(req.output_token_ids)
            if req.is_finished and self.detok is not None:
                self.text = self.detok.add(self._text_ids(req, 0)) + self.detok.flush()
            return False
        if not stops and self.detok is not None:  # NOTE: no stop string: the new tokens in one decode
            new = self._text_ids(req, self.num_processed)
            self.num_processed = len(req.output_token_ids)
            self.text += self.detok.add(new) if new else ""
        while self.num_processed < len(req.output_token_ids):
            tid = req.output_token_ids[self.num_processed]
            self.num_processed += 1
            if (tid in req.eos_token_ids and not self.params.ignore_eos) or self.detok is None:
                continue  # the eos token itself carries no text
            new = self.detok.add([tid])
            if not new:
                continue
            start = max(0, len(self.text) - self.hold)
            self.text += new
            if stops:
                hits = [(i, s) for s in stops if (i := self.text.find(s, start)) >= 0]
                if hits:
                    i, s = min(hits)
                    self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
                    req.truncate_output(self.num_processed)
                    return True
        if req.is_finished and self.detok is not None:
            self.text += self.detok.flush()  # text held back as an incomplete UTF-8 character
        return False

    def _text_ids(self, req: Request, start: int) -> list[int]:
        """The output tokens from `start` that carry text (eos tokens do not, unless ignore_eos)."""
        eos = () if self.params.ignore_eos else req.eos_token_ids
        return [t for t in req.output_token_ids[start:] if t not in eos]

    def is_due(self, req: Request, interval: int) -> bool:
        """A streamed output now: the first token, then every `interval` tokens, at token counts
        of the request's phase (mod interval), so that requests started together (a burst of
        arrivals) spread their outputs over the steps instead of all sending at one."""
        n, sent = len(req.output_token_ids), self.num_sent_tokens
        return sent == 0 or n - sent >= interval or (n > sent and n % interval == self.phase)

    def output(self, req: Request) -> RequestOutput:
        finished = req.is_finished
        visible = len(self.text) if finished else max(self.num_sent_chars, len(self.text) - self.hold)
        new_text = self.text[self.num_sent_chars:visible]
        new_ids = req.output_token_ids[self.num_sent_tokens:]
        self.num_sent_chars, self.num_sent_tokens = visible, len(req.output_token_ids)
        return RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids), text=self.text[:visible], new_token_ids=new_ids,
            new_text=new_text, finished=finished, finish_reason=req.status.value if finished else None,
            logprobs=list(req.output_logprobs) if self.params.logprobs is not None else None,
            metrics=request_metrics(req), prompt=self.prompt)


def request_metrics(req: Request) -> RequestMetrics:
    n = len(req.output_token_ids)
    end = req.finish_time or time.perf_counter()
    first = req.first_token_time
    e2e = end - req.arrival_time
    return RequestMetrics(
        num_prompt_tokens=req.num_prompt_tokens, num_generated_tokens=n,
        time_to_first_token_s=None if first is None else first - req.arrival_time,
        e2e_latency_s=e2e, tokens_per_s=n / e2e if e2e > 0 else None,
        decode_tokens_per_s=(n - 1) / (end - first) if first is not None and n > 1 and end > first else None,
        num_preemptions=req.num_preemptions, num_cached_tokens=req.num_cached_tokens,
        acceptance_length=req.spec.acceptance_length,
        num_verify_steps=req.spec.num_verify_steps,
        acceptance_rate_per_position=req.spec.acceptance_rate_per_position)
