"""Engine: add_request / step / abort_request. Owns the loop: schedule -> run -> update ->
detokenize (stop strings) -> outputs."""
from __future__ import annotations

import functools
import itertools
import time

import torch

from lightspeed.config import EngineConfig, SamplingParams
from lightspeed.engine.block_manager import BlockManager
from lightspeed.engine.outputs import RequestMetrics, RequestOutput
from lightspeed.engine.request import Request, RequestStatus, SpecStats
from lightspeed.engine.runner import ModelRunner
from lightspeed.engine.scheduler import Scheduler
from lightspeed.errors import InvalidRequestError
from lightspeed.layers.linear import quantize_model_, set_batch_invariant
from lightspeed.loader import open_checkpoint, resolve_model
from lightspeed.models import get_model_class
from lightspeed.models.random import SHAPE_PREFIX, random_model
from lightspeed.tokenizer import IncrementalDetokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev, _DTYPES[dtype or ("bfloat16" if dev.type == "cuda" else "float32")]


def load_model(model: str, device: torch.device, dtype: torch.dtype, quantization: str | None = None):
    """Resolve, open and load a checkpoint -> (model, tokenizer); `shape:NAME` builds a model
    of a real shape with random weights and no tokenizer (None: prompts are token ids).

    NOTE: cached by (path, modification time, device, dtype, quantization): engines in one
    process share loaded weights (a model holds no per-request state; KV caches belong to
    runners), so a benchmark sweep loads each checkpoint once.
    """
    if model.startswith(SHAPE_PREFIX):
        return _random_model(model[len(SHAPE_PREFIX):], device, dtype, quantization)
    path = resolve_model(model)
    stamp = max((f.stat().st_mtime_ns for f in ([path] + sorted(path.glob("*")) if path.is_dir() else [path]))
                if path.exists() else [0])
    return _load_model(path, stamp, device, dtype, quantization)


@functools.lru_cache(maxsize=2)
def _random_model(shape: str, device: torch.device, dtype: torch.dtype, quantization: str | None):
    return random_model(shape, device, dtype, quantization=quantization), None


@functools.lru_cache(maxsize=4)
def _load_model(path, mtime_ns: int, device: torch.device, dtype: torch.dtype, quantization: str | None = None):
    ckpt = open_checkpoint(path)
    tokenizer = ckpt.tokenizer()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = get_model_class(ckpt.config)(ckpt.config)
    finally:
        torch.set_default_dtype(prev)
    net.load_weights(ckpt.weights())
    quantize_model_(net, quantization)  # NOTE: every Linear but lm_head (embeddings are not Linear)
    return net.eval(), tokenizer


def _kv_num_blocks(cfg: EngineConfig, model_config, dtype: torch.dtype, device: torch.device, max_model_len: int) -> int:
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    per_block = (2 * model_config.num_hidden_layers * cfg.block_size * model_config.num_key_value_heads
                 * model_config.head_dim * torch.finfo(dtype).bits // 8)
    wanted = cfg.max_num_seqs * -(-max_model_len // cfg.block_size)
    if cfg.kv_cache_gb is not None:
        budget = cfg.kv_cache_gb * 2**30
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] * 0.8
    else:
        budget = 2 * 2**30
    return max(1, min(wanted, int(budget // per_block)))


class Engine:
    def __init__(self, config: EngineConfig, speculative=None):
        self.config = config
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype)
        from lightspeed import kernels
        kernels.set_pdl(config.enable_pdl)  # NOTE: process-wide, read at each kernel launch
        invariant = config.batch_invariant
        set_batch_invariant(speculative is not None and self.device.type == "cuda" if invariant is None else invariant)
        model, self.tokenizer = load_model(config.model, self.device, self.dtype, config.quantization)
        self.model_config = mc = model.config
        rope_positions = getattr(getattr(model, "model", model), "max_positions", mc.max_position_embeddings)
        max_len = min(config.max_model_len or mc.max_position_embeddings, rope_positions)
        num_blocks = _kv_num_blocks(config, mc, self.dtype, self.device, max_len)
        # NOTE: a context longer than the whole cache could never run; cap it there
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        proposer = verifier = None
        if speculative is not None:
            from lightspeed.speculative import build_speculation
            proposer, verifier = build_speculation(speculative, self)
        self.speculative = speculative
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.device, self.dtype,
                                  seed=config.seed, proposer=proposer, verifier=verifier,
                                  enable_cuda_graph=config.enable_cuda_graph, max_num_seqs=config.max_num_seqs)
        # NOTE: an EAGLE-3 head needs the target's hidden states of every position, which a
        # prefix-cache hit skips; prefix caching is off with it
        caching = config.enable_prefix_caching and getattr(speculative, "method", None) != "eagle3"
        self.block_manager = BlockManager(num_blocks, config.block_size, enable_caching=caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   spec_thresholds=getattr(speculative, "load_thresholds", None))
        self._ids = itertools.count()
        self._states: dict[str, _OutputState] = {}
        self.spec_stats = SpecStats()  # speculation counters of every finished request, in aggregate

    # -- requests ----------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate a prompt (text or token ids) -> token ids; raises InvalidRequestError."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(f"{self.config.model} has no tokenizer; give the prompt as token ids")
            if not prompt:
                raise InvalidRequestError("the prompt is empty; give at least one character or token")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise InvalidRequestError("the prompt is empty; give at least one character or token")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the context is {self.max_model_len} tokens "
                "(prompt plus at least one new token); shorten the prompt or raise --max-model-len")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.tokenize_prompt(prompt)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.scheduler.requests:
            raise InvalidRequestError(f"request id {rid!r} is already running")
        grammar = self.structured.compile(params) if params.is_guided else None  # InvalidRequestError: bad one
        if grammar is not None:
            self._grammar_batch().add(rid, grammar)
        req = Request(rid, ids, params, eos_token_ids=list(self._eos_ids()), max_model_len=self.max_model_len)
        self._states[rid] = _OutputState(self.tokenizer, params, prompt if isinstance(prompt, str) else None)
        self.scheduler.add_request(req)
        return rid

    @property
    def structured(self):
        """The structured.StructuredOutputs compiling this model's constraints (built on first use)."""
        from lightspeed.structured import structured_outputs
        return structured_outputs(self.tokenizer, self.model_config.vocab_size, self._eos_ids())

    def _grammar_batch(self):
        if self.runner.grammar is None:
            from lightspeed.structured import GrammarBatch
            self.runner.grammar = GrammarBatch(self.structured)
        return self.runner.grammar

    def _eos_ids(self) -> set[int]:
        return set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else ())

    def abort_request(self, request_id: str) -> None:
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._states.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the loop --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        outputs = []
        for req in self.scheduler.update_from_output(sched, result):
            state = self._states[req.request_id]
            if state.process(req):
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
            elif req.status is RequestStatus.FINISHED_LENGTH and self.runner.grammar is not None \
                    and self.runner.grammar.is_ended(req.request_id):
                req.status = RequestStatus.FINISHED_STOPPED  # the grammar ended exactly at max_tokens
            outputs.append(state.output(req))
            if req.is_finished:
                self.spec_stats.merge(req.spec)
                del self._states[req.request_id]
        return outputs


class _OutputState:
    """Detokenizes one request's new tokens, applies stop strings, builds RequestOutputs."""

    def __init__(self, tokenizer, params: SamplingParams, prompt: str | None):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None  # None: no text
        self.params = params
        self.prompt = prompt
        self.text = ""
        self.num_processed = 0
        self.num_sent_tokens = 0
        self.num_sent_chars = 0
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def process(self, req: Request) -> bool:
        """Detokenize tokens one by one; True when a stop string ended the request (then the
        tokens after it are dropped, exactly as if they had never been sampled)."""
        stops = self.params.stop
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
