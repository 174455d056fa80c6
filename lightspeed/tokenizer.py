"""Tokenizer (a `tokenizers.Tokenizer` + special tokens + chat template) and the incremental
detokenizer used for streaming.

Behaviour follows HF `AutoTokenizer` (transformers 5) on the same files:
- BOS/EOS insertion: an HF directory's tokenizer.json post-processor decides. NOTE: like
  transformers 5, `add_bos_token`/`add_eos_token` in tokenizer_config.json are ignored when a
  tokenizer.json exists. GGUF vocabularies pass explicit flags, which rebuild a
  `TemplateProcessing` (transformers' `update_post_processor`).
- Chat templates render in a jinja2 sandbox with HF's globals (raise_exception, strftime_now,
  a non-HTML-escaping tojson) and trim_blocks / lstrip_blocks.
"""
from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from lightspeed.errors import CheckpointError, InvalidRequestError, ModelNotFoundError

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Text <-> token ids for one model."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None,
                 eos_token_ids: list[int] | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, chat_template: str | None = None,
                 clean_up_tokenization_spaces: bool = False):
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        named = [t for t in (bos_token, eos_token, unk_token, pad_token) if t is not None]
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        # Named special tokens are matched whole and skipped by decode (as in HF). NOTE: unlike HF,
        # a name missing from the vocab is not appended: its new id would be past the embedding.
        missing = [t for t in dict.fromkeys(named) if t not in added and backend.token_to_id(t) is not None]
        if missing:
            backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        ids = list(eos_token_ids or [])
        self.eos_token_ids: list[int] = list(dict.fromkeys(([self.eos_token_id] if self.eos_token_id is not None else []) + ids))
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        # Derived from behaviour, so it is right whichever post-processor is in place.
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token: bool = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._plain: BackendTokenizer | None = None  # see _plain_backend

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not path.is_dir():
            raise ModelNotFoundError(f"tokenizer directory {path} does not exist")
        if not tok_file.is_file():
            raise CheckpointError(
                f"{path} has no tokenizer.json; lightspeed reads fast (tokenizers) tokenizers only. "
                "Create one with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
        try:
            backend = BackendTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"{tok_file} is not a valid tokenizer.json: {e}") from e
        cfg = _read_json(path / "tokenizer_config.json")
        specials = {name: _token_content(cfg.get(name)) for name in _SPECIAL_NAMES}
        gen = _read_json(path / "generation_config.json")
        gen_eos = gen.get("eos_token_id")
        eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        return cls(backend, **specials, eos_token_ids=eos_ids, chat_template=_hf_chat_template(path, cfg),
                   clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))

    # ---- encode / decode ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocab + added tokens), like len(hf_tok)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    # ---- chat ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render `messages` with the model's chat template (returns text, not ids)."""
        if not self.chat_template:
            raise InvalidRequestError(
                "this model has no chat template (none in tokenizer_config.json, chat_template.jinja or "
                "the GGUF's tokenizer.chat_template); use the plain completion API with a raw prompt")
        try:
            template = _compile_template(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                   **{n: getattr(self, n) for n in _SPECIAL_NAMES}, **kwargs)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template error: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> tuple[list[int], str]:
        """Render and encode a conversation -> (ids, text) so that no message can inject
        control tokens: the template's own text is encoded with special-token matching, the
        messages' strings (content, name, ...; not the role) as plain text.

            rendered:  <|im_start|>user\n | Hi <|im_start|>system ... | <|im_end|>\n ...
                       template (specials)  message text (plain)        template

        The messages' strings are located by rendering once more with unique markers in
        their place. NOTE: a template that rewrites message text (trim, slicing) cannot be
        split so; then text holding a special token's spelling is refused.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        tag = uuid.uuid4().hex
        originals: list[str] = []

        def mark(value):
            originals.append(value)
            return f"\ue000{tag}{len(originals) - 1}\ue001"
        marked = [{k: mark(v) if isinstance(v, str) and v and k != "role" else v for k, v in m.items()}
                  for m in messages]
        pieces = re.split(f"\ue000{tag}(\\d+)\ue001", self.apply_chat_template(marked, add_generation_prompt, **kwargs))
        # pieces: [template, index, template, index, ..., template]
        if "".join(originals[int(x)] if i % 2 else x for i, x in enumerate(pieces)) != text:
            specials = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
            if any(sp in v for v in originals for sp in specials):
                raise InvalidRequestError(
                    "a message holds the text of a special token and this model's chat template rewrites message "
                    "text, so it cannot be encoded as plain text safely; remove the special-token text")
            return self.encode(text, add_special_tokens=False), text
        ids: list[int] = []
        for i, x in enumerate(pieces):
            if i % 2:
                ids += self._plain_backend().encode(originals[int(x)], add_special_tokens=False).ids
            elif x:
                ids += self.backend.encode(x, add_special_tokens=False).ids
        return ids, text

    def _plain_backend(self) -> BackendTokenizer:
        """A copy of the backend that reads special-token spellings as plain text."""
        if self._plain is None:
            plain = BackendTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Rebuild BOS/EOS insertion the way transformers' `update_post_processor` does."""
        add_bos = add_bos and self.bos_token_id is not None
        add_eos = add_eos and self.eos_token_id is not None
        bos, eos = f"{self.bos_token}:0 " if add_bos else "", f" {self.eos_token}:0" if add_eos else ""
        pair_bos = f" {self.bos_token}:1" if add_bos else ""
        pair_eos = f" {self.eos_token}:1" if add_eos else ""
        special = ([(self.bos_token, self.bos_token_id)] if add_bos else []) + \
                  ([(self.eos_token, self.eos_token_id)] if add_eos else [])
        self.backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0{eos}{pair_bos} $B:1{pair_eos}", special_tokens=special)


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text deltas (vLLM/TGI prefix/read offsets).

        all_ids:  [ ...prompt... | out0 out1 ... ]
                        ^prefix_offset   ^read_offset
        prefix_text = decode(all_ids[prefix:read]);  new_text = decode(all_ids[prefix:])
        delta = new_text[len(prefix_text):]   (held back while it ends in U+FFFD: an
                                               incomplete UTF-8 character)

    Without `prompt_ids` the concatenated deltas equal `tokenizer.decode(output_ids)`. With
    `prompt_ids` the output is decoded in the prompt's context (differs only for tokenizers
    whose decoder strips a leading space, e.g. SentencePiece).
    """

    _CONTEXT = 5  # prompt tokens of context for the first output tokens

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or [])
        self.prefix_offset = max(len(self._ids) - self._CONTEXT, 0)
        self.read_offset = len(self._ids)
        self.output_ids: list[int] = []
        self.text = ""  # all text emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Append new token ids; return the newly completed text (possibly "")."""
        self._ids.extend(token_ids)
        self.output_ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At end of stream: emit held-back text even if it ends in an invalid byte sequence."""
        prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        self.text += delta
        return delta


# ---- helpers ------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(path: Path, cfg: dict) -> str | None:
    """chat_template.jinja wins (transformers 5 layout), then tokenizer_config, then chat_template.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = cfg.get("chat_template") or _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        by_name = {t["name"]: t["template"] for t in template}
        template = by_name.get("default", next(iter(by_name.values()), None))
    return template


def _clean_up_tokenization(text: str) -> str:
    """HF's `clean_up_tokenization` (only when tokenizer_config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class _GenerationTag(jinja2.ext.Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` (assistant-mask marker) as a no-op."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja's built-in, no HTML escaping (HF semantics).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
