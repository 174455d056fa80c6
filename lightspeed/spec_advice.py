"""Speculation that cannot help: a warning before any model loads for a draft model that is
the target itself or not smaller than it, and, on CPU, a one-time notice measured at run
time when speculation turns out slower than plain decoding (SpeculationMeter)."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("lightspeed.speculation")


def _checkpoint_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*") if p.suffix in (".safetensors", ".gguf", ".bin", ".pt"))


def speculation_warnings(model: str, speculative, device: str | None = None) -> list[str]:
    """-> the warnings for target `model` with `speculative` (a SpeculativeConfig or None)."""
    if speculative is None or speculative.method != "draft":
        return []
    if model.startswith("shape:") or speculative.model.startswith("shape:"):
        return []
    from lightspeed.loader import resolve_model
    target, draft = resolve_model(model).resolve(), resolve_model(speculative.model).resolve()
    if target == draft:
        return [f"the draft model is the target itself ({target}): every step runs the model twice and "
                "speculation cannot be faster than plain decoding; use a smaller draft or no --speculative"]
    if _checkpoint_bytes(draft) >= _checkpoint_bytes(target):
        return [f"the draft model ({_checkpoint_bytes(draft) / 1e9:.2f} GB) is not smaller than the target "
                f"({_checkpoint_bytes(target) / 1e9:.2f} GB): speculation cannot be faster than plain decoding; "
                "use a smaller draft"]
    return []


class SpeculationMeter:
    """Whether speculation pays on this CPU, measured once on the engine's own decode steps.

    The first WARMUP decode steps (one-time costs: allocation, first calls) are not counted.
    A decode step that verifies drafts costs its whole time (target pass, verification and
    drafting for the next step) for the tokens it emits; a decode step without drafts costs
    its target pass and sampling, what plain decoding pays, for one token per request. Steps
    without drafts come by themselves (no n-gram match, a request's last token) or are made:
    after every PROBE_EVERY steps with drafts the runner drops one proposal
    (`wants_plain_step`), until MIN_PLAIN plain steps are in. With MIN_SPEC steps with drafts
    too, the verdict is given once: a warning when speculation's tokens/s is below plain's.
    NOTE: CPU only; timing a GPU step would need a host sync.
    """

    WARMUP, MIN_SPEC, MIN_PLAIN, PROBE_EVERY = 32, 16, 3, 4

    def __init__(self, method: str):
        self.method = method
        self.seconds = {True: 0.0, False: 0.0}  # has drafts -> time of such steps
        self.tokens = {True: 0, False: 0}
        self.steps = {True: 0, False: 0}
        self.num_skipped = 0  # warm-up steps seen
        self.verdict: str | None = None  # the message given, once measured

    @property
    def is_done(self) -> bool:
        return self.verdict is not None

    def wants_plain_step(self) -> bool:
        """True: drop this step's proposal, so that the next decode step runs without drafts."""
        spec, plain = self.steps[True], self.steps[False]
        return not self.is_done and plain < self.MIN_PLAIN and spec >= (plain + 1) * self.PROBE_EVERY

    def record(self, has_drafts: bool, seconds: float, num_tokens: int) -> None:
        """One decode step: did it verify drafts, its time, the tokens it emitted."""
        if self.is_done:
            return
        if self.num_skipped < self.WARMUP:
            self.num_skipped += 1
            return
        self.seconds[has_drafts] += seconds
        self.tokens[has_drafts] += num_tokens
        self.steps[has_drafts] += 1
        if self.steps[True] >= self.MIN_SPEC and self.steps[False] >= self.MIN_PLAIN:
            self._conclude()

    def _conclude(self) -> None:
        spec, plain = (self.tokens[k] / max(self.seconds[k], 1e-9) for k in (True, False))
        if spec < plain:
            self.verdict = (f"speculation ({self.method}) is slower than plain decoding on this CPU: measured "
                            f"{spec:.1f} tokens/s with it vs {plain:.1f} tokens/s on steps without drafts; drop "
                            "--speculative for the fastest decoding here")
            logger.warning(self.verdict)
        else:
            self.verdict = f"speculation ({self.method}) pays on this CPU: {spec:.1f} vs {plain:.1f} tokens/s"
            logger.info(self.verdict)
