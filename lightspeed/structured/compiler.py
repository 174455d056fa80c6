"""Grammar compilation with xgrammar: the vocabulary once per tokenizer, each grammar once
per constraint (xgrammar's own cache, bounded in bytes). Callers compile off the engine loop
(the server's handlers in a worker thread before queueing, server/structured.py; the engine
process on a worker thread before adding the request, server/engine_process.py)."""
from __future__ import annotations

import functools

from lightspeed.errors import InvalidRequestError, UnsupportedModelError
from lightspeed.structured.spec import GuidedSpec, guided_spec

CACHE_LIMIT_BYTES = 256 << 20  # compiled grammars kept (LRU); a JSON schema takes ~10 KB-10 MB


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover -- a runtime dependency
        raise UnsupportedModelError("structured outputs need the xgrammar package: pip install xgrammar") from e
    return xgrammar


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: list[int]):
    """xgrammar.TokenizerInfo of a lightspeed Tokenizer: each id's bytes (byte-level BPE,
    byte fallback or raw, read from the tokenizers backend as transformers does), the
    model's vocabulary size (logits rows past the tokenizer's ids are always masked) and the
    ids that end the grammar (the model's end-of-sequence tokens)."""
    xgr = _xgrammar()
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))


# NOTE: xgrammar 0.2.x writes the characters of a string with minLength / maxLength as
# [^"\\\r\n], which admits the control characters JSON forbids in strings (json.loads rejects
# them); its unbounded strings use the class below. Patched in the schema's EBNF.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def json_schema_grammar(schema_json: str, strict_mode: bool = True) -> str:
    """A JSON schema -> xgrammar EBNF of its compact JSON (no free whitespace: a model cannot
    pad its output forever), strings without raw control characters."""
    xgr = _xgrammar()
    ebnf = str(xgr.Grammar.from_json_schema(schema_json, any_whitespace=False, strict_mode=strict_mode))
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


class StructuredOutputs:
    """Compiles the constraints of one model's requests; thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_threads: int = 2):
        if tokenizer is None:
            raise InvalidRequestError("structured outputs need a tokenizer; this model has none (shape: models)")
        if not stop_token_ids:
            raise InvalidRequestError("structured outputs need an end-of-sequence token; this model has none")
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        self.info = tokenizer_info(tokenizer, vocab_size, self.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=True,
                                            cache_limit_bytes=CACHE_LIMIT_BYTES)

    def compile(self, params_or_spec):
        """SamplingParams (or a GuidedSpec) -> xgrammar.CompiledGrammar, or None when it has
        no constraint; InvalidRequestError with xgrammar's reason for a bad one. Blocks (a
        cache hit: microseconds; a new schema: milliseconds to a second)."""
        spec = params_or_spec if isinstance(params_or_spec, GuidedSpec) else guided_spec(params_or_spec)
        if spec is None:
            return None
        c = self.compiler
        try:
            if spec.kind == "json_schema":
                return c.compile_grammar(json_schema_grammar(spec.source))
            if spec.kind == "json_object":
                return c.compile_grammar(json_schema_grammar('{"type": "object"}', strict_mode=False))
            if spec.kind == "regex":
                return c.compile_regex(spec.source)
            return c.compile_grammar(spec.source)
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0]
            reason = reason.split(": ", 1)[1] if reason.startswith("[") and ": " in reason else reason
            raise InvalidRequestError(f"cannot compile the {spec.kind.replace('_', ' ')} constraint: {reason}") from e



@functools.lru_cache(maxsize=4)
def _shared(tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> StructuredOutputs:
    return StructuredOutputs(tokenizer, vocab_size, list(stop_token_ids))


def structured_outputs(tokenizer, vocab_size: int, stop_token_ids) -> StructuredOutputs:
    """The one StructuredOutputs of a (tokenizer object, vocabulary size, stop ids) in this
    process: an engine and the server's handlers in one process share its compile cache.
    NOTE: keyed by the tokenizer's identity; the vocabulary is compiled once per model."""
    return _shared(tokenizer, int(vocab_size), tuple(sorted(set(stop_token_ids))))
