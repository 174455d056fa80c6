"""HF safetensors loader: round trips of tiny random transformers models, and bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from lightspeed.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from lightspeed.loader import Checkpoint, open_checkpoint, resolve_model

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    cfg_cls, model_cls, extra = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(tie_word_embeddings=False, sliding_window=64)),
    }[kind]
    return model_cls(cfg_cls(**TINY, **extra)).eval()


def save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip(tmp_path, kind, sharded):
    model = tiny_model(kind)
    save(model, tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    ckpt = open_checkpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint)
    cfg = ckpt.config
    assert cfg.architecture == type(model).__name__
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (32, 2, 8, 128)
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.tie_word_embeddings == (kind == "qwen2")
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    loaded = dict(ckpt.weights())
    assert ckpt.num_tensors() == len(loaded) == len(expected)
    assert set(loaded) == set(expected)
    for name, ref in expected.items():
        assert loaded[name].dtype == ref.dtype
        torch.testing.assert_close(loaded[name], ref, rtol=0, atol=0, msg=name)


def test_native_dtype_is_kept(tmp_path):
    save(tiny_model("llama").to(torch.bfloat16), tmp_path)
    assert {t.dtype for _, t in open_checkpoint(tmp_path).weights()} == {torch.bfloat16}


def test_missing_path_and_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        open_checkpoint(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a local path"):
        resolve_model("definitely-not-a-model")


def test_resolve_model_local_paths(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_truncated_safetensors(tmp_path):
    save(tiny_model("llama"), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path)


def test_garbage_safetensors_header(tmp_path):
    save(tiny_model("llama"), tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path)


def test_index_names_missing_shard(tmp_path):
    save(tiny_model("qwen2"), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        open_checkpoint(tmp_path)


def test_no_weights(tmp_path):
    save(tiny_model("llama"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        open_checkpoint(tmp_path)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path)


def test_hub_id_offline_is_network_error(monkeypatch):
    import huggingface_hub.constants

    from lightspeed.errors import NetworkError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NetworkError, match="offline"):
        resolve_model("lightspeed-test-org/no-such-model")
