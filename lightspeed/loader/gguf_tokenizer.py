"""Build a `tokenizers.Tokenizer` from GGUF metadata (a GGUF has no tokenizer.json).

Two vocabulary kinds, named by `tokenizer.ggml.model`:

  "gpt2"   byte-level BPE: tokens are spelled in GPT-2's byte alphabet, merges are listed;
           the split regex depends on `tokenizer.ggml.pre` (the model family).
  "llama"  SentencePiece BPE: tokens use "▁" for space, `<0xNN>` byte tokens give byte
           fallback, and merges (if absent) are recovered from the per-token scores.

Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
Control tokens become special added tokens (skipped by decode(skip_special_tokens=True));
user-defined ones are added tokens matched whole but not special. This mirrors what
transformers builds for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from lightspeed.errors import CheckpointError, UnsupportedModelError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split regexes, by `tokenizer.ggml.pre` (same expressions as llama.cpp / the HF tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_BY_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
# GPT-2 regex after splitting every digit on its own (llama.cpp's SMOLLM / STARCODER group).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
# Llama-3 style vocabularies tokenize whole words that are in the vocab without merging.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}


def read_gguf_metadata(reader) -> dict[str, Any]:
    """All key/value fields of a `gguf.GGUFReader` as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def tokenizer_kwargs_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `lightspeed.tokenizer.Tokenizer(...)` from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError("GGUF has no tokenizer.ggml.tokens; it carries no tokenizer. "
                              "Pass a tokenizer directory (tokenizer.json) instead.")
    token_types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens, token_types)
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta, tokens)
        add_bos_default = True  # llama.cpp adds BOS for SPM vocabularies that do not say otherwise
    else:
        raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    named = {name: token(key) for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                 ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    _add_special_tokens(backend, kind, tokens, token_types, [t for t in named.values() if t is not None])
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    return dict(
        backend=backend,
        **named,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _byte_level_bpe(meta: dict, tokens: list[str], token_types: list[int]) -> BackendTokenizer:
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    to_bytes_alphabet = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab: dict[str, int] = {}
    for idx, (tok, ttype) in enumerate(zip(tokens, token_types)):
        if ttype not in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(p for p, _ in to_bytes_alphabet.pre_tokenize_str(tok))  # respell in the byte alphabet
        vocab.setdefault(tok, idx)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    backend = BackendTokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _SPLIT_BY_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # "default", "gpt2" and families whose regex is GPT-2's
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict, tokens: list[str]) -> BackendTokenizer:
    vocab = {tok: idx for idx, tok in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError("GGUF 'llama' tokenizer has neither merges nor scores")
        merges = merges_from_scores(tokens, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # NOTE: "first" = the ▁ prefix goes only at the very start, not after each special token
    # (transformers' non-legacy Llama behaviour).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece merges implied by a scored vocabulary: every split (l, r) of a token with
    both halves in the vocab, best merged-token score first (ties: longer left, longer right)."""
    found = []  # (score, left, right) in token order, splits ordered by (id(left), id(right))
    for tok, score in zip(tokens, scores):
        local = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((score, l, r) for l, r in local)
    found.sort(key=lambda x: (x[0], len(x[1]), len(x[2])), reverse=True)  # stable
    return [(l, r) for _, l, r in found]


def _add_special_tokens(backend: BackendTokenizer, kind: str, tokens: list[str], token_types: list[int],
                        named: list[str]) -> None:
    """Control tokens (and the named bos/eos/unk/pad) -> special; user-defined -> plain added."""
    # In a byte-level vocab a "control" token outside the byte alphabet is a llama.cpp mislabel.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if kind == "gpt2" else None
    special = [t for t, ty in zip(tokens, token_types)
               if ty == TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)]
    special += [t for t in named if t not in special]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    vocab = backend.get_vocab()
    user = [t for t, ty in zip(tokens, token_types) if ty == TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

