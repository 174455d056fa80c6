"""Validated configuration dataclasses: ModelConfig, SamplingParams, EngineConfig, SpeculativeConfig."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightspeed.errors import InvalidRequestError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Llama4ForCausalLM",
                           "Llama4ForConditionalGeneration")
LLAMA4_ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")


@dataclass
class ModelConfig:
    """Shape and numerics of a decoder-only model, read once from the checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2)
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # -- Llama 4 (defaults: a dense model; HF Llama4TextConfig's __post_init__ rules in from_hf_config)
    num_local_experts: int = 0  # 0: no MoE layers
    num_experts_per_tok: int = 1
    moe_layers: list[int] = field(default_factory=list)  # layer ids with MoE feed-forward
    intermediate_size_mlp: int | None = None  # dense feed-forward of non-MoE layers (None: intermediate_size)
    # NOTE: HF's naming: no_rope_layers[i] == 1 means layer i DOES use rope; None: every layer does
    no_rope_layers: list[int] | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" | "chunked_attention"
    attention_chunk_size: int | None = None  # chunked layers: keys visible only within the query's chunk
    use_qk_norm: bool = False  # L2 norm of q, k (after rope) on rope layers
    attn_temperature_tuning: bool = False  # NoPE layers: q *= 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    weight_prefix: str = ""  # checkpoint names of the text model start with this ("language_model.")

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; lightspeed runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"activation {self.hidden_act!r} is not supported (only silu)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise UnsupportedModelError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_local_experts and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise UnsupportedModelError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                                        f"[1, num_local_experts = {self.num_local_experts}]")
        if self.layer_types is not None and "chunked_attention" in self.layer_types and not self.attention_chunk_size:
            raise UnsupportedModelError("layer_types has chunked_attention layers but attention_chunk_size is not set")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise UnsupportedModelError(f"rope_scaling type {rope_type!r} is not supported "
                                        "(default, linear, llama3)")

    @property
    def rope_type(self) -> str:
        s = self.rope_scaling or {}
        return s.get("rope_type", s.get("type", "default"))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from an HF `config.json` dict."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise UnsupportedModelError("config.json has no 'architectures' field; cannot tell the model type")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; lightspeed runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        if arch in LLAMA4_ARCHITECTURES:
            return _llama4_from_hf_config(cls, arch, cfg)
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            hidden_act=cfg.get("hidden_act", "silu"),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _llama4_from_hf_config(cls, arch: str, cfg: dict[str, Any]) -> "ModelConfig":
    """Llama4ForCausalLM (`llama4_text`), or the text part of Llama4ForConditionalGeneration
    (`text_config`, weights under `language_model.`); defaults as HF Llama4TextConfig."""
    prefix = ""
    if arch == "Llama4ForConditionalGeneration":
        if not isinstance(cfg.get("text_config"), dict):
            raise UnsupportedModelError("Llama4ForConditionalGeneration config.json has no text_config")
        top, cfg = cfg, dict(cfg["text_config"])
        for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
            if cfg.get(key) is None and top.get(key) is not None:
                cfg[key] = top[key]
        prefix = "language_model."
    n = cfg.get("num_hidden_layers", 48)
    num_heads = cfg.get("num_attention_heads", 40)
    hidden = cfg.get("hidden_size", 5120)
    no_rope = cfg.get("no_rope_layers") or [int((i + 1) % cfg.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    step = cfg.get("interleave_moe_layer_step", 1)
    moe = cfg.get("moe_layers")
    moe = list(range(step - 1, n, step)) if moe is None else list(moe)
    layer_types = cfg.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in no_rope]
    chunk = cfg.get("attention_chunk_size", 8192)
    if "chunked_attention" not in layer_types:
        chunk = None
    eos = cfg.get("eos_token_id", 2)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return cls(
        architecture=arch,
        vocab_size=cfg.get("vocab_size", 202048),
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size", 8192),
        num_hidden_layers=n,
        num_attention_heads=num_heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=(cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 500000.0)),
        rope_scaling=_rope_scaling(cfg),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096 * 32),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", False),
        hidden_act=cfg.get("hidden_act", "silu"),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_ids=eos_ids,
        num_local_experts=cfg.get("num_local_experts", 16) if moe else 0,
        num_experts_per_tok=cfg.get("num_experts_per_tok", 1),
        moe_layers=moe,
        intermediate_size_mlp=cfg.get("intermediate_size_mlp", 16384),
        no_rope_layers=list(no_rope),
        layer_types=list(layer_types),
        attention_chunk_size=chunk,
        use_qk_norm=cfg.get("use_qk_norm", True),
        attn_temperature_tuning=cfg.get("attn_temperature_tuning", True),
        floor_scale=cfg.get("floor_scale", 8192),
        attn_scale=cfg.get("attn_scale", 0.1),
        weight_prefix=prefix,
    )


def _rope_scaling(cfg: dict) -> dict | None:
    """HF moved rope options into `rope_parameters` (transformers 5); accept both spellings."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type", "default"))
    return None if kind == "default" else rs


MAX_SEED = 2**63 - 1  # seeds are in [0, MAX_SEED]
MAX_TOP_K = 2**31 - 1


@dataclass
class SamplingParams:
    """Per-request sampling options (OpenAI / vLLM semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N >= 0: the sampled token's logprob plus the top N
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0  # > 0; 1: off (lightspeed/engine/penalties.py)
    frequency_penalty: float = 0.0  # [-2, 2]
    presence_penalty: float = 0.0  # [-2, 2]
    # structured outputs (at most one; lightspeed/structured/): a JSON Schema (dict or JSON
    # text), any JSON object, a regular expression, or one of a list of strings
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (0 <= self.temperature < float("inf"), f"temperature must be finite and >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and 0 <= self.top_k <= MAX_TOP_K,
             f"top_k must be an integer in [0, {MAX_TOP_K}] (or -1 for off), got {self.top_k!r}"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED),
             f"seed must be an integer in [0, 2^63 - 1], got {self.seed!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (0.01 <= self.repetition_penalty <= 100,
             f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be non-negative integers"),
            *_guided_checks(self),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def is_guided(self) -> bool:
        """The output is constrained (json_schema, json_object, regex or choice)."""
        return self.json_schema is not None or self.json_object or self.regex is not None or self.choice is not None


def _guided_checks(p: SamplingParams) -> list[tuple[bool, str]]:
    num = (p.json_schema is not None) + bool(p.json_object) + (p.regex is not None) + (p.choice is not None)
    return [
        (num <= 1, "give at most one of json_schema, json_object, regex and choice"),
        (p.json_schema is None or isinstance(p.json_schema, (dict, str)), "json_schema must be a dict or JSON text"),
        (p.regex is None or (isinstance(p.regex, str) and p.regex != ""), "regex must be a non-empty string"),
        (p.choice is None or (isinstance(p.choice, (list, tuple)) and len(p.choice) > 0
                              and all(isinstance(c, str) and c for c in p.choice)),
         "choice must be a non-empty list of non-empty strings"),
        (not (num and p.ignore_eos), "ignore_eos cannot be combined with structured outputs (the grammar ends "
                                     "with an end-of-sequence token)"),
    ]


@dataclass
class EngineConfig:
    """How the engine runs a model: device, cache size, batching limits."""

    model: str = "smollm2-135m-instruct"
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from max_num_seqs * max_model_len and kv_cache_gb
    kv_cache_gb: float | None = None  # None: 80% of free GPU memory, or 2 GiB on CPU
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped by the cache)
    seed: int = 0
    quantization: str | None = None  # "fp8": e4m3 linear weights (per-output-channel scales) but lm_head
    # "fp8": e4m3 K/V with a scale per (token, kv head), about 2x the blocks (kernels/kv_cache.py);
    # "auto": the model dtype
    kv_cache_dtype: str = "auto"
    enable_cuda_graph: bool = True  # CUDA graphs for decode / verify steps (CUDA with Triton only)
    enable_pdl: bool = True  # Programmatic Dependent Launch between Triton kernels (sm_90+)
    # small steps of dense Llama-family layers in 8 launches per layer, not 10 (kernels/fused_gemv.py)
    enable_fused_layers: bool = True
    # every projection with <= 64 rows through the batch-invariant GEMV, so speculative
    # (verify) steps compute the logits of plain decode bit for bit; None: on with
    # speculation on CUDA (layers/linear.py)
    batch_invariant: bool | None = None
    enable_prefix_caching: bool = True  # reuse the KV of full blocks shared with earlier requests
    allow_long_context: bool = False  # a max_model_len beyond the model's positions: capped there, not an error
    # one process per device (lightspeed/distributed); 1 = today's single-process path
    tensor_parallel_size: int = 1
    expert_parallel: bool = False  # MoE: whole experts per rank instead of splitting each expert
    distributed_timeout_s: float = 300.0  # every collective; a dead or stuck worker fails after this
    # the host schedules and prepares step N+1 while the device runs step N (engine/engine.py);
    # None: on for CUDA without speculation or tensor parallelism
    overlap_schedule: bool | None = None
    # a streamed request's output every N tokens (its first and last always): fewer chunks for
    # the server to pickle, assemble and send (SGLang's --stream-interval)
    stream_interval: int = 1

    def __post_init__(self):
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise InvalidRequestError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in (None, "fp8"):
            raise InvalidRequestError(f"quantization must be fp8 or None, got {self.quantization!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise InvalidRequestError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r} (fp8: e4m3 K/V "
                                      "with a scale per token and kv head)")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise InvalidRequestError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise InvalidRequestError(f"stream_interval must be a positive integer, got {self.stream_interval!r}")
        if not self.distributed_timeout_s > 0:
            raise InvalidRequestError(f"distributed_timeout_s must be positive, got {self.distributed_timeout_s!r}")


METHODS = ("draft", "ngram", "eagle3")  # speculative methods (lightspeed/speculative/)


@dataclass
class SpeculativeConfig:
    """Lossless speculative decoding (lightspeed/speculative/__init__.py): the method, its
    drafter, the chain length or tree shape, and the load policy."""

    method: str = "ngram"
    model: str | None = None  # draft model (method draft) or EAGLE-3 head directory (method eagle3)
    num_speculative_tokens: int = 4  # chain length k; the default tree depth
    # trees (EAGLE-2 style); tree_topk <= 1 means a chain
    tree_topk: int = 1
    tree_depth: int | None = None  # None: num_speculative_tokens
    tree_num_nodes: int | None = None  # None: tree_topk * tree_depth
    # n-gram / prompt lookup: suffix lengths tried, longest first
    ngram_min: int = 1
    ngram_max: int = 4
    # speculation policy: (num_requests, k) pairs; once that many requests are running or
    # waiting, draft at most k tokens (a tree: depth k), 0 = speculation off. None: always k.
    load_thresholds: list[tuple[int, int]] | None = None
    # per request, draft the length its running acceptance pays for, none when it collapses
    # (speculative/adaptive.py); draft_cost: one draft forward in plain decode steps (None:
    # the drafter's weight bytes over the target's; 0 for n-gram)
    adaptive: bool = False
    draft_cost: float | None = None

    def __post_init__(self):
        if isinstance(self.load_thresholds, str):
            self.load_thresholds = parse_load_thresholds(self.load_thresholds)
        if self.method not in METHODS:
            raise InvalidRequestError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method in ("draft", "eagle3") and not self.model:
            what = "a draft model (draft:MODEL)" if self.method == "draft" else "an EAGLE-3 head (eagle3:PATH)"
            raise InvalidRequestError(f"speculative method {self.method!r} needs {what}")
        checks = [
            (isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 64,
             f"num_speculative_tokens must be an integer in [1, 64], got {self.num_speculative_tokens!r}"),
            (isinstance(self.tree_topk, int) and 1 <= self.tree_topk <= 64, f"tree_topk must be in [1, 64], got {self.tree_topk!r}"),
            (self.tree_depth is None or 1 <= self.tree_depth <= 64, f"tree_depth must be in [1, 64], got {self.tree_depth!r}"),
            (self.tree_num_nodes is None or 1 <= self.tree_num_nodes <= 512,
             f"tree_num_nodes must be in [1, 512], got {self.tree_num_nodes!r}"),
            (1 <= self.ngram_min <= self.ngram_max, f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}"),
            (all(isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 0 for n, k in self.load_thresholds or ()),
             f"load_thresholds must be (num_requests >= 1, k >= 0) pairs, got {self.load_thresholds!r}"),
            (self.draft_cost is None or (isinstance(self.draft_cost, (int, float)) and 0 <= self.draft_cost <= 10),
             f"draft_cost must be a number in [0, 10] (plain decode steps), got {self.draft_cost!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)

    @property
    def is_tree(self) -> bool:
        return self.tree_topk > 1

    @property
    def depth(self) -> int:
        """Longest draft path: the chain length, or the tree depth."""
        return (self.tree_depth or self.num_speculative_tokens) if self.is_tree else self.num_speculative_tokens

    @property
    def num_nodes(self) -> int:
        """Most draft tokens verified in one step."""
        if not self.is_tree:
            return self.num_speculative_tokens
        return self.tree_num_nodes or self.tree_topk * self.depth

    @classmethod
    def from_cli(cls, spec: str, num_speculative_tokens: int = 4, **options) -> "SpeculativeConfig":
        """"draft:MODEL" | "ngram" | "eagle3:PATH" (+ tree options) -> SpeculativeConfig."""
        method, _, model = spec.partition(":")
        method = method.strip().lower()
        if method not in METHODS:
            raise InvalidRequestError(f"--speculative must be draft:MODEL, ngram or eagle3:HEAD_PATH, got {spec!r}")
        if method == "ngram" and model:
            raise InvalidRequestError(f"--speculative ngram takes no model, got {spec!r}")
        options = {k: v for k, v in options.items() if v is not None}
        return cls(method=method, model=model or None, num_speculative_tokens=num_speculative_tokens, **options)


def parse_load_thresholds(text: str | None) -> list[tuple[int, int]] | None:
    """"64:2,128:0" -> [(64, 2), (128, 0)]; "" or "none" -> None."""
    if not text or text.strip().lower() == "none":
        return None
    try:
        return [(int(n), int(k)) for n, k in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise InvalidRequestError(f"speculation thresholds must look like 64:2,128:0 (from N requests on, "
                                  f"at most k drafts; 0 = off), got {text!r}") from None
