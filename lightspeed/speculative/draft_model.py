"""Draft-model proposer: a small model with the target's tokenizer drafts autoregressively.

The draft keeps its own paged KV cache. `cached[rid]` lists the tokens whose KV the draft
holds at positions 0 .. len - 1; each step the catch-up pass feeds the context past the
longest common prefix of `cached` and the context (the tokens emitted since, including any
accepted drafts the draft did not feed), so rejected drafts are rolled back by
overwriting. A chain keeps the KV of the drafts it fed; a tree's nodes sit in scratch
slots and the accepted path is fed again by the next catch-up pass (the same pass that
feeds the bonus token, so it costs no extra forward).
"""
from __future__ import annotations

import torch

from lightspeed.errors import TokenizerMismatchError
from lightspeed.loader.model import load_model
from lightspeed.speculative.draft_graph import to_target_vocab
from lightspeed.speculative.drafting import DraftKV, DraftSeq, ModelDrafter, Root
from lightspeed.speculative.proposer import DraftJob, ProposeInputs, TargetInfo


def check_vocabularies(target_tok, draft_tok, draft_vocab_size: int, target_vocab_size: int, target_name: str,
                       draft_name: str) -> None:
    """Same token -> id map in both tokenizers, and a draft embedding that covers every id
    the target can produce (an embedding padded larger than the tokenizer is fine)."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv != dv:
        diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
        raise TokenizerMismatchError(
            f"draft model {draft_name!r} does not share the target {target_name!r}'s tokenizer "
            f"({len(dv)} vs {len(tv)} tokens; differing entries such as {diff}). Speculative decoding "
            "needs a draft with the same vocabulary: pick a smaller model of the same family.")
    needed = min(max(tv.values(), default=-1) + 1, target_vocab_size)
    if draft_vocab_size < needed:
        raise TokenizerMismatchError(
            f"draft model {draft_name!r} has {draft_vocab_size} embedding rows but the target can produce token "
            f"ids up to {needed - 1}; the draft checkpoint does not cover its tokenizer.")


def common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def kv_num_blocks(target: TargetInfo, bytes_per_block: int) -> int:
    """As many blocks as the target has, or what fits in 90% of the free GPU memory."""
    num = target.num_kv_blocks
    if target.device.type == "cuda":
        num = min(num, int(torch.cuda.mem_get_info(target.device)[0] * 0.9 // bytes_per_block))
    return max(num, 1)


class DraftModelProposer(ModelDrafter):
    def __init__(self, config, target: TargetInfo):
        super().__init__(config, target)
        self.model, tokenizer = load_model(config.model, target.device, target.dtype)
        mc = self.model.config
        check_vocabularies(target.tokenizer, tokenizer, mc.vocab_size, target.model_config.vocab_size,
                           target.model_name, config.model)
        self.target_vocab_size = target.model_config.vocab_size
        # NOTE: the draft's rotary table ends at its own max_position_embeddings
        self.max_model_len = min(self.max_model_len, mc.max_position_embeddings)
        self.device, self.dtype = target.device, target.dtype
        self.kv: DraftKV | None = None
        self.cached: dict[str, list[int]] = {}  # request id -> tokens with KV at positions 0..
        self.stable: dict[str, int] = {}  # request id -> context length at the last proposal

    def drop(self, request_id: str) -> None:
        super().drop(request_id)
        self.cached.pop(request_id, None)
        self.stable.pop(request_id, None)
        if self.kv is not None:
            self.kv.free(request_id)

    @property
    def _module(self) -> torch.nn.Module:
        return self.model

    def _ensure_kv(self) -> None:
        if self.kv is not None:
            return
        mc, bs = self.model.config, self.target.block_size
        per_block = (2 * mc.num_hidden_layers * bs * mc.num_key_value_heads * mc.head_dim
                     * torch.finfo(self.dtype).bits // 8)
        self.kv = DraftKV(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                          kv_num_blocks(self.target, per_block), bs, self.device, self.dtype)

    def _step(self, ids, hidden, positions, meta, rows) -> tuple[torch.Tensor, None]:
        out = self.model(ids, positions, self.kv.kv_caches, meta)
        logits = self.model.compute_logits(out if rows is None else out[rows])
        return to_target_vocab(logits, self.target_vocab_size), None

    def _catch_up_seqs(self, inputs: ProposeInputs, jobs: list[DraftJob]) -> tuple[list[DraftSeq], list[DraftJob]]:
        """Each context past the draft's valid cached prefix, rooting its job at its last token."""
        seqs, kept = [], []
        for job in jobs:
            rid, ctx = job.request_id, job.context
            n = len(ctx)
            valid = min(common_prefix(self.cached.get(rid, []), ctx, self.stable.get(rid, 0)), n - 1)
            if not self.kv.ensure(rid, n + self._scratch_slots(job)):
                continue  # NOTE: the draft's cache is full: this request decodes without drafts this step
            seqs.append(DraftSeq(rid, ctx[valid:], list(range(valid, n)), valid, [n - 1 - valid]))
            kept.append(job)
        return seqs, kept

    def _roots(self, jobs: list[DraftJob], logits: torch.Tensor | None, hidden: None) -> list[Root]:
        """The draft's cache now holds each whole context."""
        roots = []
        for i, job in enumerate(jobs):
            n = job.num_tokens
            self.cached[job.request_id] = list(job.context)
            self.stable[job.request_id] = n
            roots.append(Root(job, None if logits is None else logits[i], None, feed_base=n - 1, storage_base=n))
        return roots

    def _after_draft(self, roots: list[Root], tokens: dict[str, list[int]]) -> None:
        for r in roots:
            fed = tokens[r.job.request_id][:-1]  # a chain feeds every draft but its last
            self.cached[r.job.request_id] += fed
