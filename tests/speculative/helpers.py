"""Tiny checkpoints for speculation tests: random targets / drafts (tests/tiny.py) and
random EAGLE-3 heads saved in the published format."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny import VOCAB, make_tiny_checkpoint

__all__ = ["make_tiny_checkpoint", "make_eagle3_head", "random_prompts", "check_draft_graphs", "VOCAB"]


def random_prompts(lengths, seed=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (n,), generator=g).tolist() for n in lengths]


def make_eagle3_head(path: Path, target_hidden: int = 64, vocab: int = VOCAB, draft_vocab: int = 200,
                     hidden: int = 64, heads: int = 4, kv_heads: int = 2, prefix: str = "midlayer.",
                     aux_layer_ids: list[int] | None = None, with_embedding: bool = False, seed: int = 0,
                     num_aux: int = 3, target_hidden_size: int | None = None, with_d2t: bool = True) -> Path:
    """A random EAGLE-3 head: config.json (LlamaForCausalLMEagle3) + model.safetensors.
    with_d2t False: a full-vocabulary head (draft_vocab == vocab, no d2t / t2d), as for Llama 4."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.08).contiguous()

    head_dim = hidden // heads
    t = {
        "fc.weight": w(hidden, num_aux * target_hidden),
        f"{prefix}self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        f"{prefix}self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        f"{prefix}self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        f"{prefix}self_attn.o_proj.weight": w(hidden, heads * head_dim),
        f"{prefix}mlp.gate_proj.weight": w(2 * hidden, hidden),
        f"{prefix}mlp.up_proj.weight": w(2 * hidden, hidden),
        f"{prefix}mlp.down_proj.weight": w(hidden, 2 * hidden),
        f"{prefix}input_layernorm.weight": torch.ones(hidden),
        f"{prefix}hidden_norm.weight": torch.ones(hidden),
        f"{prefix}post_attention_layernorm.weight": torch.ones(hidden),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": w(draft_vocab, hidden),
    }
    # the draft vocabulary: a sorted random subset of the target's (holding token 0)
    target_ids = torch.cat([torch.zeros(1, dtype=torch.long),
                            torch.randperm(vocab - 1, generator=g)[: draft_vocab - 1] + 1]).sort().values
    t["d2t"] = target_ids - torch.arange(draft_vocab)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids] = True
    t["t2d"] = t2d
    if not with_d2t:
        assert draft_vocab == vocab, "a head without d2t drafts over the whole vocabulary"
        del t["d2t"], t["t2d"]
    if with_embedding:
        t["embed_tokens.weight"] = w(vocab, hidden)
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": 2 * hidden, "num_hidden_layers": 1, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "vocab_size": vocab, "draft_vocab_size": draft_vocab,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False}
    if target_hidden_size is not None:
        cfg["target_hidden_size"] = target_hidden_size
    if aux_layer_ids is not None:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_layer_ids, "use_aux_hidden_state": True}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _generate_logging_drafts(target, spec, prompts, params, graphs: bool, dtype: str | None):
    """-> (token ids, every (request id, drafts) the proposer emitted, its DraftGraphRunner).
    graphs on CPU: the runner's graphs emulated under the Triton interpreter."""
    from lightspeed import LLM
    from lightspeed.engine.cuda_graph import CudaGraphRunner
    cuda = dtype is not None
    llm = LLM(str(target), device="cuda" if cuda else "cpu", dtype=dtype, block_size=4, max_num_seqs=4,
              enable_cuda_graph=graphs, speculative=spec)
    log, proposer = [], llm.engine.runner.proposer
    emit = proposer.emit

    def recording(out, rid, tokens, parents):
        log.append((rid, list(tokens)))
        emit(out, rid, tokens, parents)
    proposer.emit = recording
    r = llm.engine.runner
    if graphs and not cuda:
        r.graphs = CudaGraphRunner(r.model, r.kv_caches, r.block_size, 4, r.device)
        r.set_kernel_settings(r.kernel_settings.replace(triton_on_cpu=True))
    tokens = [o.token_ids for o in llm.generate(prompts, params)]
    return tokens, log, proposer.graphs


def check_draft_graphs(target, spec, prompts, params, want_keys, dtype: str | None = None) -> None:
    """Drafting in graphs (CUDA with a dtype; else the graph body emulated on CPU under the
    Triton interpreter) proposes what eager drafting proposes, with the same output tokens.
    want_keys: some of the (B, k, roots given) graph buckets that must have been used.
    NOTE: in bfloat16 near-ties may flip a draft (other attention bounds, padded rows)."""
    import pytest

    import lightspeed.kernels as K
    if dtype is None and not K.interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    eager, eager_log, _ = _generate_logging_drafts(target, spec, prompts, params, False, dtype)
    graphed, graph_log, runner = _generate_logging_drafts(target, spec, prompts, params, True, dtype)
    assert runner is not None and want_keys & {(lay.B, k, r) for lay, k, r, *_ in runner.graphs}, "no draft graph used"
    if dtype is not None:
        assert all(g.graph is not None for g in runner.graphs.values()), "not captured"
    if dtype == "bfloat16":
        same = sum(a == b for a, b in zip(eager_log, graph_log))
        assert same >= 0.5 * len(eager_log), (same, len(eager_log))
    else:
        assert graphed == eager and graph_log == eager_log and len(eager_log) >= 6
