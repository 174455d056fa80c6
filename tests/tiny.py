"""Tiny random checkpoints for tests: an HF model saved with save_pretrained plus a byte-level
BPE tokenizer (256 byte tokens, one special end-of-text token), so `LLM(str(path))` loads it."""
from __future__ import annotations

import json
from pathlib import Path

import torch

EOS_ID = 256
VOCAB = 320  # 256 bytes + <|endoftext|> + padding rows

ARCHS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "llama3": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True, head_dim=24),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    # head_dim 32: the smallest the fused 5-launch layers take (kernels/fused_gemv.py)
    "qwen2-d32": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_attention_heads=2,
                      num_key_value_heads=1),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=24),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def save_byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False, "chat_template": template,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_tiny_checkpoint(path: Path, arch: str = "llama", seed: int = 0, **overrides):
    """Save a random tiny model of `arch` (a key of ARCHS) to `path`; returns the HF model (fp32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=EOS_ID,
               bos_token_id=None, tie_word_embeddings=False, rope_theta=10000.0)
    cfg.update(ARCHS[arch])
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # larger weights than the default init give less flat, more decisive logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return model


def hf_greedy(model, prompt_ids: list[int], num_new: int) -> list[int]:
    """Oracle: greedy decoding with HF transformers, one full forward per token, no eos stop."""
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        for _ in range(num_new):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out
