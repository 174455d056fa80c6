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


def _attend(q, k0, v0, ks, vs, scale: float) -> torch.Tensor:
    """q [B, n, Hq, D]; k0/v0 [B, n, Hkv, D] (step-0 keys: causal); ks/vs: lists of [B, n, Hkv, D]
    (later steps' keys: each row sees only its own) -> [B, n, Hq, D]."""
    b, n, hq, d = q.shape
    g = k0.shape[2]
    q = q.reshape(b, n, g, hq // g, d)  # GQA: query heads grouped by their KV head
    s0 = torch.einsum("bigrd,bjgd->bgrij", q, k0) * scale  # [B, Hkv, rep, n, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s0 = s0.masked_fill(~causal, float("-inf"))
    diag = [torch.einsum("bigrd,bigd->bgri", q, k)[..., None] * scale for k in ks]  # [B, Hkv, rep, n, 1]
    p = torch.softmax(torch.cat([s0] + diag, -1), -1)
    out = torch.einsum("bgrij,bjgd->bigrd", p[..., :n], v0)
    for m, v in enumerate(vs):
        out = out + p[..., n + m].permute(0, 3, 1, 2)[..., None] * v[:, :, :, None]
    return out.reshape(b, n, hq, d)


def ttt_forward(head: Eagle3Head, ids: torch.Tensor, aux: torch.Tensor, steps: int,
                lens: torch.Tensor | None = None):
    """ids [B, L] right-padded, lens [B] (None: all L); aux [B, L, 3H] -> list over steps of
    draft-vocab logits [B, L-1, V_draft] (row i of step k predicts t_{i+2+k}; rows past a
    sequence are garbage, masked by the loss). One sequence: ids [L], aux [L, 3H] -> [L-1, V_draft].

    Padding needs no key mask: a valid row i (i + 1 + k < len) sees keys 0..i, all real."""
    if ids.dim() == 1:
        return [lg[0] for lg in ttt_forward(head, ids[None], aux[None], steps)]
    layer, attn = head.midlayer, head.midlayer.self_attn
    b, L = ids.shape
    n = L - 1
    last = (torch.full((b,), L, device=ids.device) if lens is None else lens.to(ids.device))[:, None] - 1
    rows = torch.arange(n, device=ids.device)
    hidden = head.fc(aux[:, :n].reshape(b * n, -1).to(head.fc.weight.dtype))  # [B n, H]
    keys0 = None
    ks, vs, logits = [], [], []
    for k in range(steps):
        tok = ids.gather(1, torch.minimum(rows[None] + 1 + k, last)).reshape(-1)  # [B n]
        pos = (rows + k).clamp(max=head.rotary_emb.cos_sin_cache.shape[0] - 1).repeat(b)
        cos, sin = head.rotary_emb.cos_sin(pos)
        embeds = head.embed_tokens(tok).to(hidden.dtype)
        normed_h = layer.hidden_norm(hidden)
        residual = normed_h if layer.norm_before_residual else hidden
        x = torch.cat([layer.input_layernorm(embeds), normed_h], -1)
        qkv = attn.qkv_proj(x)
        qk_size = attn.q_size + attn.kv_size
        qk = apply_rotary(qkv[:, :qk_size].reshape(b * n, -1, attn.head_dim), cos, sin)
        q = qk[:, : attn.num_heads].reshape(b, n, attn.num_heads, attn.head_dim)
        key = qk[:, attn.num_heads:].reshape(b, n, attn.num_kv_heads, attn.head_dim)
        v = qkv[:, qk_size:].reshape(b, n, attn.num_kv_heads, attn.head_dim)
        if keys0 is None:
            keys0 = (key, v)
        else:
            ks.append(key)
            vs.append(v)
        o = _attend(q, keys0[0], keys0[1], ks, vs, attn.attn.scale)
        a = attn.o_proj(o.reshape(b * n, -1))
        a, residual = layer.post_attention_layernorm(a, residual)
        out = layer.mlp(a) + residual  # pre-norm output, fed back as the next step's hidden
        logits.append(head.lm_head(head.norm(out)).float().reshape(b, n, -1))
        hidden = out
    return logits


def ttt_loss(step_logits, tgt_draft: torch.Tensor, tgt_argmax: torch.Tensor, lens: torch.Tensor,
             draft_ids: torch.Tensor, t2d: torch.Tensor, prompt_lens: torch.Tensor | None = None):
    """step_logits: list over steps of [B, L-1, V_draft] (ttt_forward); tgt_draft [B, L, V_draft]:
    the target's logits over the draft vocabulary; tgt_argmax [B, L]: its argmax over the full
    vocabulary; lens, prompt_lens [B] (None: no prompt) -> (loss, per-step losses [K], per-step
    (correct, count) [K, 2 (all rows, answer rows), 2]).

    loss = mean over sequences of sum_k STEP_DECAY^k * (soft CE of step k averaged over the
    sequence's rows whose target argmax is in the draft vocabulary): a batch of B sequences is
    exactly the mean of B one-sequence losses (gradient accumulation).

    Answer rows: i >= prompt_len - 1, whose input token t_{i+1} and predicted tokens are all
    generated. Only such rows root a draft chain at inference (the catch-up row of the last
    committed token; the first answer token comes from the prefill, never from a draft), so
    their accuracy is the one comparable with greedy acceptance."""
    b, L, _ = tgt_draft.shape
    n = L - 1
    p = torch.softmax(tgt_draft.float(), -1)  # [B, L, V_draft]
    total = 0.0
    losses, accs = [], []
    for k, lg in enumerate(step_logits):
        m = n - k  # rows i < n - k have a target t_{i+2+k} inside the padded length
        if m <= 0:
            break
        rows = torch.arange(m, device=lg.device)
        valid = (rows[None] + 1 + k) <= lens.to(lg.device)[:, None] - 1  # [B, m]
        argmax = tgt_argmax[:, 1 + k:]  # [B, m]
        mask = valid & t2d[argmax]
        ce = -(p[:, 1 + k:] * torch.log_softmax(lg[:, :m], -1)).sum(-1)  # [B, m]
        lk = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]
        total = total + STEP_DECAY ** k * lk.mean()
        losses.append(lk.detach().mean())
        hit = (draft_ids[lg[:, :m].argmax(-1)] == argmax) & valid
        answer = valid if prompt_lens is None else valid & (rows[None] >= prompt_lens.to(lg.device)[:, None] - 1)
        accs.append(torch.stack([hit.sum(), valid.sum(), (hit & answer).sum(), answer.sum()]).view(2, 2))
    zero = torch.zeros(2, 2, dtype=torch.long, device=tgt_draft.device)
    accs += [zero] * (len(step_logits) - len(accs))
    losses += [torch.zeros((), device=tgt_draft.device)] * (len(step_logits) - len(losses))
    return total, torch.stack(losses), torch.stack(accs)
