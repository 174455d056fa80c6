"""Tokenizers built from GGUF metadata against transformers' `AutoTokenizer(gguf_file=...)`."""
from __future__ import annotations

import numpy as np
import pytest

from lightspeed.loader.pull import model_path
from lightspeed.loader.gguf import tokenizer_from_gguf
from lightspeed.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!", "def f(x):\n    return x**2  # square\n", "  leading and   multiple    spaces\t\ttabs\n\n\nnewlines",
    "日本語のテキスト、中文字符", "emoji 🤗🚀👩‍👩‍👧 and ∑ math", "numbers 1234567 3.14159 1,000,000",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "don't you'll I'M we've", "", " ", "Ünïcödé façade naïve",
    "\u00a0nbsp\u202fnarrow", "<|endoftext|>x<|endoftext|>", "a\r\nb\rc", "🤗" * 5, "((([[[{{{}}}]]])))", "x" * 300,
    "<tool_call>\n{\"name\": 1}\n</tool_call>", "<|fim_prefix|>def<|fim_suffix|>ret<|fim_middle|>", "İstanbul ǅ ﬁ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi 🤗"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


def assert_same_as_hf(ours: Tokenizer, hf) -> None:
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
                hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_path)


def test_smollm2_matches_transformers(smollm2_path, smollm2_tokenizer):
    ours = smollm2_tokenizer
    assert_same_as_hf(ours, hf_tokenizer(smollm2_path))
    assert ours.add_bos_token is False and ours.eos_token_ids == [2]
    assert ours.encode("<|im_start|>") == [1]  # control tokens stay whole


def test_smollm2_splits_every_digit(smollm2_tokenizer):
    # NOTE: tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) split each
    # \p{N} char first. transformers' GGUF path uses plain GPT-2 splitting, which differs only for
    # numerals that have merges, e.g. " ①" -> one token there, " " + "①" here.
    ours = smollm2_tokenizer
    assert [ours.decode([i]) for i in ours.encode(" 12")] == [" ", "1", "2"]
    assert ours.encode(" ①") == ours.encode(" ") + ours.encode("①")


@pytest.mark.slow  # ~20-30 s: both sides parse 151k tokens + merges from the GGUF
def test_qwen_matches_transformers_when_cached():
    path = model_path("qwen2.5-coder-0.5b-instruct")
    if not path.is_file():
        pytest.skip("qwen2.5-coder-0.5b-instruct not pulled (lightspeed.loader.pull.pull)")
    ours = tokenizer_from_gguf(path)
    assert_same_as_hf(ours, hf_tokenizer(path))
    assert ours.eos_token_ids == [151645] and not ours.add_bos_token
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert "<tools>" in ours.apply_chat_template(CONVERSATIONS[0], tools=tools)


# ---- SentencePiece ("llama") vocabulary, synthetic ----------------------------------------
PIECES = ["▁t", "he", "▁the", "▁h", "ll", "llo", "ello", "▁hello", "or", "ld", "▁w", "▁wor", "▁world", "qu",
          "ick", "▁quick", "▁b", "ro", "own", "▁brown", "▁f", "ox", "▁fox", "in", "ing", "▁th", "er", "▁a", "an", "▁and"]
CHARS = ["▁"] + list("abcdefghijklmnopqrstuvwxyz,.!?'")
SPM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
                "{% else %}{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}{% endfor %}")


def write_spm_gguf(path, gguf_writer, gguf_llama_kv, **extra_kv):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + CHARS + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(CHARS) + len(PIECES))
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(CHARS))] + [-float(i) for i in range(len(PIECES))]
    kv = gguf_llama_kv("llama", hidden=8, layers=1, ffn=16, heads=2, kv_heads=2) | {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.chat_template": SPM_TEMPLATE} | extra_kv
    return gguf_writer(path, "llama", {"token_embd.weight": np.zeros((len(tokens), 8), np.float32)}, kv=kv)


SPM_TEXTS = ["hello world", "the quick brown fox", " hello", "hello  world!", "naïve 🤗 日本", "", "<s>hi</s>",
             "hello\nworld\n\n", "THE Quick"]


def test_sentencepiece_gguf_matches_transformers(tmp_path, gguf_writer, gguf_llama_kv):
    path = write_spm_gguf(tmp_path / "spm.gguf", gguf_writer, gguf_llama_kv)
    ours, hf = tokenizer_from_gguf(path), hf_tokenizer(path)
    assert ours.add_bos_token and ours.vocab_size == len(hf)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1  # BOS, as the GGUF's llama vocab implies
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert ours.encode("the", add_special_tokens=False) == [ours.token_to_id("▁the")]  # ▁t + he -> ▁the
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_sentencepiece_without_space_prefix(tmp_path, gguf_writer, gguf_llama_kv):
    # NOTE: transformers ignores tokenizer.ggml.add_space_prefix = false; llama.cpp honours it, as we do.
    path = write_spm_gguf(tmp_path / "spm.gguf", gguf_writer, gguf_llama_kv, **{"tokenizer.ggml.add_space_prefix": False})
    ours = tokenizer_from_gguf(path)
    assert ours.id_to_token(ours.encode("hello world", add_special_tokens=False)[0]) != "▁"
    for text in SPM_TEXTS:
        assert ours.decode(ours.encode(text)) == text.replace("<s>", "").replace("</s>", ""), text


def test_add_bos_flag_from_gguf(tmp_path, gguf_writer, gguf_llama_kv):
    path = write_spm_gguf(tmp_path / "spm.gguf", gguf_writer, gguf_llama_kv, **{"tokenizer.ggml.add_bos_token": False})
    ours = tokenizer_from_gguf(path)
    assert not ours.add_bos_token and ours.encode("hello") == ours.encode("hello", add_special_tokens=False)
