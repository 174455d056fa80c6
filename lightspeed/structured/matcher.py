"""The runner's side of structured outputs: one xgrammar GrammarMatcher per constrained
request, token bitmasks over the step's logits rows, and the matchers' advance.

Exact under speculation: for a request with drafts the matcher walks the draft tree,

    row 0      mask at the state after the request's tokens (the root)
    row 1 + c  mask at the state after the drafts on the path root -> c

accepting each draft on the way and rolling it back after its subtree, so every row the
verifier reads holds the target's distribution restricted to the grammar. A draft the
grammar rejects gets probability 0 at its parent's row, so the verifier rejects it (its own
row is left unmasked: nothing reads it). After verification the matcher accepts the
emitted tokens (accepted drafts + bonus / recovered), which the masks made grammatical.
"""
from __future__ import annotations

import torch

from lightspeed.speculative.verify import children_of
from lightspeed.structured.bitmask import apply_bitmask, host_bitmask


class GrammarBatch:
    """request id -> its matcher; owned by the ModelRunner."""

    def __init__(self, structured):
        import xgrammar

        self._xgr = xgrammar
        self.structured = structured
        self.vocab_size = structured.vocab_size
        self.stop_token_ids = set(structured.stop_token_ids)
        # ids no grammar accepts (special tokens, padding rows past the tokenizer's vocabulary):
        # drafts of them are rejected here, without asking (and warning from) the matcher
        self.never_ids = set(structured.info.special_token_ids) - self.stop_token_ids
        self.grammars: dict = {}  # request id -> CompiledGrammar (matcher built at its first step)
        self.matchers: dict = {}
        self.num_accepted: dict[str, int] = {}  # request id -> emitted tokens its matcher accepted
        self.num_masked_rows = 0  # rows masked so far (tests, benchmarks)
        self._host: torch.Tensor | None = None  # [rows, ceil(V / 32)] int32 bitmask buffer (pinned on CUDA)
        self._shifts: torch.Tensor | None = None  # arange(8) uint8 on the logits' device (apply_bitmask)
        self._batch = None  # xgrammar.BatchGrammarMatcher: fills many requests' masks on several threads

    def add(self, request_id: str, compiled) -> None:
        self.grammars[request_id] = compiled

    def drop(self, request_id: str) -> None:
        self.grammars.pop(request_id, None)
        self.matchers.pop(request_id, None)
        self.num_accepted.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.grammars

    def _matcher(self, request_id: str):
        m = self.matchers.get(request_id)
        if m is None:
            m = self._xgr.GrammarMatcher(self.grammars[request_id], override_stop_tokens=sorted(self.stop_token_ids))
            self.matchers[request_id] = m
        return m

    # -- before sampling / verification ----------------------------------------------
    def mask_logits(self, sched, inputs, logits: torch.Tensor) -> None:
        """Fill the bitmask of every row a constrained request samples or verifies from and
        apply it to `logits` ([num_logits, V]) in place; other rows are untouched."""
        todo = [(i, s) for i, s in enumerate(sched.scheduled) if s.is_last_chunk and s.request_id in self.grammars]
        if not todo:
            return
        bitmask = self._bitmask(logits)  # [num_logits, ceil(V / 32)]; rows not filled below allow every token
        rows: list[int] = []
        plain = []  # (matcher, row) of requests without drafts: filled together, on several threads
        for i, s in todo:
            first = inputs.logits_rows[i][0]
            m = self._matcher(s.request_id)
            n = s.num_draft_tokens
            if not n:
                if not m.is_terminated():  # see _fill_tree
                    plain.append((m, first))
                continue
            parents = s.draft_parents if s.draft_parents is not None else list(range(-1, n - 1))
            rows += self._fill_tree(m, bitmask, first, s.token_ids[len(s.token_ids) - n:], parents)
        if len(plain) == 1:
            plain[0][0].fill_next_token_bitmask(bitmask, plain[0][1])
        elif plain:
            if self._batch is None:
                self._batch = self._xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask([m for m, _ in plain], bitmask, [r for _, r in plain])
        rows = rows + [r for _, r in plain]
        if not rows:
            return
        if len(rows) < logits.shape[0]:  # NOTE: every row is applied; the others allow every token
            bitmask[sorted(set(range(logits.shape[0])) - set(rows))] = -1
        apply_bitmask(logits, bitmask, self.shifts(logits.device))
        self.num_masked_rows += len(rows)

    def shifts(self, device: torch.device) -> torch.Tensor:
        """arange(8) uint8 on `device` (apply_bitmask's bit positions in a byte)."""
        if self._shifts is None or self._shifts.device != device:
            self._shifts = torch.arange(8, dtype=torch.uint8, device=device)
        return self._shifts

    def _bitmask(self, logits: torch.Tensor) -> torch.Tensor:
        """A view of the reused host buffer for this step's rows.
        NOTE: reusing it is safe: the step's sampling copies its tokens to the host, which
        waits for this step's (non-blocking) copy of the buffer to the device."""
        self._host = host_bitmask(self._host, logits.shape[0], (logits.shape[-1] + 31) // 32,
                                  logits.device.type == "cuda")
        return self._host[: logits.shape[0]]

    def _fill_tree(self, m, bitmask: torch.Tensor, first: int, drafts: list[int], parents: list[int]) -> list[int]:
        """Masks of the root row and of every draft node the grammar accepts -> their rows; none
        for a request whose grammar ended (a stop token at the previous step, read after this
        step was scheduled under overlap scheduling: the scheduler drops this row's token)."""
        if m.is_terminated():
            return []
        m.fill_next_token_bitmask(bitmask, first)
        filled = [first]
        kids = children_of(parents)
        stack = [(c, False) for c in reversed(kids.get(-1, ()))]
        while stack:  # depth first; (c, True) = leave c's subtree: roll its token back
            c, leaving = stack.pop()
            if leaving:
                m.rollback(1)
                continue
            if not self._accepts(m, drafts[c]):
                continue  # a stop token ends the request there; nothing reads the rows below
            m.fill_next_token_bitmask(bitmask, first + 1 + c)
            filled.append(first + 1 + c)
            stack.append((c, True))
            stack += [(k, False) for k in reversed(kids.get(c, ()))]
        return filled

    def _accepts(self, m, token_id: int) -> bool:
        """Advance `m` by a draft token if the grammar takes it; a stop token is never taken
        (the request ends there: nothing reads the rows after it)."""
        return token_id not in self.stop_token_ids and token_id not in self.never_ids and m.accept_token(token_id)

    # -- after sampling / verification -------------------------------------------------
    def advance(self, out) -> None:
        """Accept every constrained request's emitted tokens (RunnerOutput.sampled_token_ids)."""
        for rid, tokens in out.sampled_token_ids.items():
            if rid not in self.grammars:
                continue
            m = self._matcher(rid)
            for t in tokens:
                if m.is_terminated():
                    break  # the request ended at a stop token; later tokens are dropped by the scheduler
                if not m.accept_token(t):
                    raise RuntimeError(f"internal error: request {rid} emitted token {t}, which its grammar "
                                       "rejects although its logits were masked")
                self.num_accepted[rid] = self.num_accepted.get(rid, 0) + 1

    def draft_masks(self):
        """A structured.DraftMasks for this step's proposal (drafting under the grammars)."""
        from lightspeed.structured.drafting import DraftMasks
        return DraftMasks(self)

    def trim_drafts(self, out) -> None:
        """Cut each constrained request's proposed drafts to what its grammar accepts (the rest
        would be rejected by verification anyway): a chain before its first rejected token,
        a tree without its rejected nodes and their subtrees. A stop token stays as a last
        draft where the grammar may end."""
        for rid, drafts in out.draft_token_ids.items():
            if rid not in self.grammars or not drafts:
                continue
            parents = out.draft_parents.get(rid, list(range(-1, len(drafts) - 1)))
            keep = self._valid_nodes(self._matcher(rid), drafts, parents)
            if len(keep) == len(drafts):
                continue
            index = {c: i for i, c in enumerate(keep)}
            out.draft_token_ids[rid] = [drafts[c] for c in keep]
            if rid in out.draft_parents:
                out.draft_parents[rid] = [index.get(parents[c], -1) for c in keep]

    def _valid_nodes(self, m, drafts: list[int], parents: list[int]) -> list[int]:
        """The draft nodes whose path the grammar accepts, in draft order (parents first)."""
        kids = children_of(parents)
        keep: list[int] = []
        stack = [(c, False) for c in reversed(kids.get(-1, ()))]
        while stack:  # depth first, as _fill_tree
            c, leaving = stack.pop()
            if leaving:
                m.rollback(1)
                continue
            if drafts[c] in self.stop_token_ids:
                if m.is_completed():
                    keep.append(c)  # the output may end here; nothing after a stop token is read
                continue
            if m.is_terminated() or not self._accepts(m, drafts[c]):
                continue
            keep.append(c)
            stack.append((c, True))
            stack += [(k, False) for k in reversed(kids.get(c, ()))]
        return sorted(keep)

    def is_ended(self, request_id: str, num_output_tokens: int | None = None) -> bool:
        """True when the request's grammar admits nothing but a stop token (its output is whole).
        num_output_tokens: the request's output was cut there (max_tokens inside a verified
        chain): the matcher is first rolled back to it, so tokens past the cut do not count."""
        if request_id not in self.grammars:
            return False
        m = self._matcher(request_id)
        extra = self.num_accepted.get(request_id, 0) - num_output_tokens if num_output_tokens is not None else 0
        if extra > 0:
            m.rollback(extra)
            self.num_accepted[request_id] -= extra
        if m.is_terminated():
            return True
        if not m.is_completed():
            return False
        bitmask = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
        m.fill_next_token_bitmask(bitmask, 0)
        bits = (bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [W, 32]
        allowed = set(bits.reshape(-1)[: self.vocab_size].nonzero()[:, 0].tolist())
        return allowed <= self.stop_token_ids
