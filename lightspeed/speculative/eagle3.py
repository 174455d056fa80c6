"""EAGLE-3 proposer: the head (lightspeed/models/eagle3.py) drafts from the target's hidden states.

The head's KV entry at position i is computed from (h_i, t_{i+1}): the fused target hidden
state of position i and the token after it; its output predicts t_{i+2}. So after a
target step that committed tokens up to position N - 1 (the bonus / recovered token),
the catch-up pass feeds positions head_done .. N - 2 with target hidden states (the
chunk's real tokens and the accepted drafts: for a tree, their rows along the accepted
path), and its last output predicts the first draft, at position N. Draft steps then feed
back the head's own pre-norm output; their KV lives in scratch slots from N - 1 on and is
overwritten by the next catch-up, which recomputes those positions from target states.

    head KV:  | (h_0,t_1) ... (h_{N-2},t_{N-1}) | scratch: draft steps |
              0                          head_done = N - 1

Hidden states of a prefill chunk whose next token is not known yet (the last position of
a partial chunk) wait in `pending` for the next step.
"""
from __future__ import annotations

import torch

from lightspeed.models.eagle3 import load_eagle3_head
from lightspeed.speculative.draft_model import kv_num_blocks
from lightspeed.speculative.drafting import DraftKV, DraftSeq, ModelDrafter, Root
from lightspeed.speculative.proposer import DraftJob, ProposeInputs, TargetInfo


class Eagle3Proposer(ModelDrafter):
    needs_hidden_states = True
    # NOTE: the head needs the target's hidden states of every position, which a prefix-cache
    # hit skips
    supports_prefix_cache = False

    def __init__(self, config, target: TargetInfo):
        super().__init__(config, target)
        self.head, self.aux_layer_ids = load_eagle3_head(config.model, target.model_config, target.device,
                                                         target.dtype)
        self.head.set_embedding(target.embed_tokens)
        c = self.head.config.layer
        self.max_model_len = min(self.max_model_len, c.max_position_embeddings)
        self.device, self.dtype = target.device, target.dtype
        self.kv: DraftKV | None = None
        self.head_done: dict[str, int] = {}  # positions < head_done have head KV from target states
        self.pending: dict[str, torch.Tensor] = {}  # fused target hidden [m, H] of positions head_done..
        self.broken: set[str] = set()  # requests whose hidden states were missed: no drafts

    def drop(self, request_id: str) -> None:
        super().drop(request_id)
        self.head_done.pop(request_id, None)
        self.pending.pop(request_id, None)
        self.broken.discard(request_id)
        if self.kv is not None:
            self.kv.free(request_id)

    @property
    def _module(self) -> torch.nn.Module:
        return self.head

    def _ensure_kv(self) -> None:
        if self.kv is not None:
            return
        c, bs = self.head.config.layer, self.target.block_size
        per_block = 2 * bs * c.num_key_value_heads * c.head_dim * torch.finfo(self.dtype).bits // 8
        self.kv = DraftKV(1, c.num_key_value_heads, c.head_dim, kv_num_blocks(self.target, per_block), bs,
                          self.device, self.dtype)

    def _step(self, ids, hidden, positions, meta, rows) -> tuple[torch.Tensor, torch.Tensor]:
        normed, prenorm = self.head(ids, hidden, positions, self.kv.kv_caches, meta)
        if rows is not None:
            normed, prenorm = normed[rows], prenorm[rows]
        return self.head.compute_logits(normed), prenorm

    def _new_hidden(self, inputs: ProposeInputs) -> dict[str, tuple[int, torch.Tensor]]:
        """request id -> (position of the first row, fused target hidden [n, H]) for the
        tokens this step committed: the chunk's real tokens, then the accepted drafts."""
        qsl, accepted, aux_hidden = inputs.query_start_loc, inputs.accepted, inputs.aux_hidden
        rows, spans = [], []
        for i, s in enumerate(inputs.sched.scheduled):
            n_real = len(s.token_ids) - s.num_draft_tokens
            r = list(range(qsl[i], qsl[i] + n_real))
            r += [qsl[i] + n_real + c for c in accepted.get(s.request_id, ())]
            spans.append((s.request_id, s.start_pos, len(rows), len(r)))
            rows += r
        fused = self.head.fuse(aux_hidden[torch.tensor(rows, device=aux_hidden.device)])
        return {rid: (pos, fused[a: a + n]) for rid, pos, a, n in spans}

    def _catch_up_seqs(self, inputs: ProposeInputs,
                       jobs: list[DraftJob]) -> tuple[list[DraftSeq], list[DraftJob | None]]:
        by_id = {j.request_id: j for j in jobs}
        seqs, plans = [], []
        for rid, (pos, new) in self._new_hidden(inputs).items():
            done = self.head_done.get(rid, 0)
            pend = self.pending.get(rid)
            have = done + (0 if pend is None else len(pend))
            if pos > have or rid in self.broken:
                self.broken.add(rid)  # NOTE: a gap in the hidden states: draft nothing for it
                continue
            new = new[have - pos:]
            pend = new if pend is None else torch.cat([pend, new])
            ctx = self.contexts[rid]
            num_feed = min(len(pend), len(ctx) - 1 - done)  # position p needs the token at p + 1
            job = by_id.get(rid)
            if job is not None and done + num_feed != len(ctx) - 1:
                job = None
            slots = done + num_feed if job is None else len(ctx) - 1 + self._scratch_slots(job)
            if num_feed <= 0 or not self.kv.ensure(rid, slots):
                self.pending[rid] = pend
                continue
            seqs.append(DraftSeq(rid, ctx[done + 1: done + 1 + num_feed], list(range(done, done + num_feed)), done,
                                 [num_feed - 1] if job is not None else [], hidden=pend[:num_feed]))
            plans.append(job)
            self.head_done[rid] = done + num_feed
            self.pending[rid] = pend[num_feed:]
        return seqs, plans

    def _roots(self, jobs: list[DraftJob], logits: torch.Tensor | None, prenorm: torch.Tensor | None) -> list[Root]:
        return [Root(job, None if logits is None else logits[i], None if prenorm is None else prenorm[i],
                     feed_base=job.num_tokens - 2, storage_base=job.num_tokens - 1) for i, job in enumerate(jobs)]
