"""The EAGLE-3 head as training sees it: build it from the target, unroll the training-time
test (TTT) with the attention pattern of test time, the loss, and saving in the published
format. See lightspeed/train/eagle3.py for the whole recipe."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lightspeed.layers.rotary import apply_rotary
from lightspeed.models.eagle3 import Eagle3Config, Eagle3Head

STEP_DECAY = 0.8  # weight of TTT step k's loss: STEP_DECAY ** k


def head_hf_config(target_cfg, draft_vocab_size: int, aux_layers: list[int]) -> dict:
    c = target_cfg
    return {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling, "max_position_embeddings": c.max_position_embeddings,
            "vocab_size": c.vocab_size, "draft_vocab_size": draft_vocab_size, "target_hidden_size": c.hidden_size,
            "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "bfloat16",
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_layers), "use_aux_hidden_state": True}}


def build_head(hf_cfg: dict, target_model, draft_ids: torch.Tensor, seed: int) -> Eagle3Head:
    """A fresh trainable head (float32, on the target's device) sharing the target's frozen embedding."""
    device = target_model.lm_head.weight.device
    cfg = Eagle3Config.from_hf_config(hf_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            head = Eagle3Head(cfg, 3, has_embedding=False)
        finally:
            torch.set_default_dtype(prev)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # NOTE: the target's own output rows are a good start for the head's lm_head
        head.lm_head.weight.copy_(target_model.lm_head.weight.detach().float()[draft_ids.to(device)].contiguous())
        head.d2t.copy_(draft_ids.to(device) - torch.arange(len(draft_ids), device=device))
    for name, p in head.named_parameters():
        p.requires_grad_(True)
    head.embed_tokens = target_model.model.embed_tokens  # shared, frozen (not a head parameter)
    return head


def trainable(head: Eagle3Head) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in head.named_parameters() if not n.startswith("embed_tokens")]


def head_state(head: Eagle3Head) -> dict[str, torch.Tensor]:
    """The trained parameters under the published EAGLE-3 names (q/k/v and gate/up split)."""
    out = {}
    layer = head.midlayer
    out["fc.weight"] = head.fc.weight
    q, k, v = layer.self_attn.qkv_proj.weight.split(layer.self_attn.qkv_proj.output_sizes)
    out["midlayer.self_attn.q_proj.weight"], out["midlayer.self_attn.k_proj.weight"] = q, k
    out["midlayer.self_attn.v_proj.weight"] = v
    out["midlayer.self_attn.o_proj.weight"] = layer.self_attn.o_proj.weight
    gate, up = layer.mlp.gate_up_proj.weight.split(layer.mlp.gate_up_proj.output_sizes)
    out["midlayer.mlp.gate_proj.weight"], out["midlayer.mlp.up_proj.weight"] = gate, up
    out["midlayer.mlp.down_proj.weight"] = layer.mlp.down_proj.weight
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        out[f"midlayer.{n}.weight"] = getattr(layer, n).weight
    out["norm.weight"] = head.norm.weight
    out["lm_head.weight"] = head.lm_head.weight
    return {k: t.detach().float().cpu().contiguous() for k, t in out.items()}


def save_head(head: Eagle3Head, hf_cfg: dict, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    from safetensors.torch import save_file
    tensors = {k: t.to(dtype) for k, t in head_state(head).items()}
    d2t = head.d2t.detach().cpu()
    tensors["d2t"] = d2t
    t2d = torch.zeros(hf_cfg["vocab_size"], dtype=torch.bool)
    t2d[torch.arange(len(d2t)) + d2t] = True
    tensors["t2d"] = t2d
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**hf_cfg, "torch_dtype": str(dtype).removeprefix("torch.")},
                                                indent=2))


# ---------------------------------------------------------------------------------- TTT


def _attend(q, k0, v0, ks, vs, num_kv_heads: int, scale: float) -> torch.Tensor:
    """q [n, Hq, D]; k0/v0 [n, Hkv, D] (step-0 keys: causal); ks/vs: lists of [n, Hkv, D]
    (later steps' keys: each row sees only its own) -> [n, Hq, D]."""
    n, hq, d = q.shape
    rep = hq // num_kv_heads
    k0, v0 = k0.repeat_interleave(rep, 1), v0.repeat_interleave(rep, 1)
    s0 = torch.einsum("ihd,jhd->hij", q, k0) * scale  # [Hq, n, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s0 = s0.masked_fill(~causal, float("-inf"))
    kk = [k.repeat_interleave(rep, 1) for k in ks]
    vv = [v.repeat_interleave(rep, 1) for v in vs]
    diag = [torch.einsum("ihd,ihd->hi", q, k)[..., None] * scale for k in kk]  # [Hq, n, 1] each
    p = torch.softmax(torch.cat([s0] + diag, -1), -1)
    out = torch.einsum("hij,jhd->ihd", p[..., :n], v0)
    for m, v in enumerate(vv):
        out = out + p[..., n + m].transpose(0, 1)[..., None] * v
    return out


def ttt_forward(head: Eagle3Head, ids: torch.Tensor, aux: torch.Tensor, steps: int):
    """ids [L]; aux [L, 3H] -> list over steps of draft-vocab logits [L-1, V_draft] (row i of
    step k predicts t_{i+2+k}; rows past the sequence are garbage, masked by the loss)."""
    layer, attn = head.midlayer, head.midlayer.self_attn
    L = ids.shape[0]
    n = L - 1
    rows = torch.arange(n, device=ids.device)
    hidden = head.fc(aux[:n].to(head.fc.weight.dtype))  # [n, H]
    keys0 = None
    ks, vs, logits = [], [], []
    for k in range(steps):
        tok = ids[(rows + 1 + k).clamp(max=L - 1)]
        pos = (rows + k).clamp(max=head.rotary_emb.cos_sin_cache.shape[0] - 1)
        cos, sin = head.rotary_emb.cos_sin(pos)
        embeds = head.embed_tokens(tok).to(hidden.dtype)
        normed_h = layer.hidden_norm(hidden)
        residual = normed_h if layer.norm_before_residual else hidden
        x = torch.cat([layer.input_layernorm(embeds), normed_h], -1)
        qkv = attn.qkv_proj(x)
        qk_size = attn.q_size + attn.kv_size
        qk = apply_rotary(qkv[:, :qk_size].reshape(n, -1, attn.head_dim), cos, sin)
        q, key = qk[:, : attn.num_heads], qk[:, attn.num_heads:]
        v = qkv[:, qk_size:].reshape(n, attn.num_kv_heads, attn.head_dim)
        if keys0 is None:
            keys0 = (key, v)
        else:
            ks.append(key)
            vs.append(v)
        o = _attend(q, keys0[0], keys0[1], ks, vs, attn.num_kv_heads, attn.attn.scale)
        a = attn.o_proj(o.reshape(n, -1))
        a, residual = layer.post_attention_layernorm(a, residual)
        out = layer.mlp(a) + residual  # pre-norm output, fed back as the next step's hidden
        logits.append(head.lm_head(head.norm(out)).float())
        hidden = out
    return logits


def ttt_loss(step_logits, tgt_draft: torch.Tensor, tgt_argmax: torch.Tensor, draft_ids: torch.Tensor,
             t2d: torch.Tensor):
    """tgt_draft [L, V_draft]: the target's logits over the draft vocabulary; tgt_argmax [L]:
    its argmax over the full vocabulary -> (weighted loss, per-step losses, per-step (correct, count))."""
    L = tgt_draft.shape[0]
    n = L - 1
    rows = torch.arange(n, device=tgt_draft.device)
    total = 0.0
    losses, accs = [], []
    for k, lg in enumerate(step_logits):
        idx = rows + 1 + k
        valid = idx <= L - 1
        j = idx.clamp(max=L - 1)
        argmax = tgt_argmax[j]
        mask = valid & t2d[argmax]
        p = torch.softmax(tgt_draft[j].float(), -1)
        ce = -(p * torch.log_softmax(lg, -1)).sum(-1)
        cnt = int(mask.sum())
        lk = (ce * mask).sum() / max(cnt, 1)
        total = total + STEP_DECAY ** k * lk
        losses.append(float(lk.detach()))
        pred = draft_ids[lg.argmax(-1)]
        accs.append((int(((pred == argmax) & valid).sum()), int(valid.sum())))
    return total, losses, accs


# ---------------------------------------------------------------------------------- loop
