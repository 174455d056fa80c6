"""Lossless speculative decoding: a proposer drafts tokens, the target verifies them in one pass.

    LLM(model, speculative=SpeculativeConfig(method="draft", model="small-model", num_speculative_tokens=4))

Methods (chosen here, never by name inside the runner):
    draft   a small model with the target's tokenizer and its own paged KV cache
    ngram   prompt lookup: continue the longest suffix that already occurred (no model)
    eagle3  an EAGLE-3 head fed with three of the target's hidden states

Chains draft `num_speculative_tokens` tokens; with tree_topk > 1 the proposer builds an
EAGLE-2 style dynamic tree (tree_topk branches per expanded node, tree_depth levels, the
best tree_num_nodes nodes), verified in one target pass with a tree attention mask.
"""
from __future__ import annotations

from dataclasses import dataclass

from lightspeed.errors import InvalidRequestError

__all__ = ["SpeculativeConfig", "build_speculation", "parse_load_thresholds"]

METHODS = ("draft", "ngram", "eagle3")


@dataclass
class SpeculativeConfig:
    method: str = "ngram"
    model: str | None = None  # draft model (method draft) or EAGLE-3 head directory (method eagle3)
    num_speculative_tokens: int = 4  # chain length k; the default tree depth
    # trees (EAGLE-2 style); tree_topk <= 1 means a chain
    tree_topk: int = 1
    tree_depth: int | None = None  # None: num_speculative_tokens
    tree_num_nodes: int | None = None  # None: tree_topk * tree_depth
    # n-gram / prompt lookup: suffix lengths tried, longest first
    ngram_min: int = 1
    ngram_max: int = 4
    # speculation policy: (num_requests, k) pairs; once that many requests are running or
    # waiting, draft at most k tokens (a tree: depth k), 0 = speculation off. None: always k.
    load_thresholds: list[tuple[int, int]] | None = None

    def __post_init__(self):
        if isinstance(self.load_thresholds, str):
            self.load_thresholds = parse_load_thresholds(self.load_thresholds)
        if self.method not in METHODS:
            raise InvalidRequestError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method in ("draft", "eagle3") and not self.model:
            what = "a draft model (draft:MODEL)" if self.method == "draft" else "an EAGLE-3 head (eagle3:PATH)"
            raise InvalidRequestError(f"speculative method {self.method!r} needs {what}")
        checks = [
            (isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 64,
             f"num_speculative_tokens must be an integer in [1, 64], got {self.num_speculative_tokens!r}"),
            (isinstance(self.tree_topk, int) and 1 <= self.tree_topk <= 64, f"tree_topk must be in [1, 64], got {self.tree_topk!r}"),
            (self.tree_depth is None or 1 <= self.tree_depth <= 64, f"tree_depth must be in [1, 64], got {self.tree_depth!r}"),
            (self.tree_num_nodes is None or 1 <= self.tree_num_nodes <= 512,
             f"tree_num_nodes must be in [1, 512], got {self.tree_num_nodes!r}"),
            (1 <= self.ngram_min <= self.ngram_max, f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}"),
            (all(isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 0 for n, k in self.load_thresholds or ()),
             f"load_thresholds must be (num_requests >= 1, k >= 0) pairs, got {self.load_thresholds!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)

    @property
    def is_tree(self) -> bool:
        return self.tree_topk > 1

    @property
    def depth(self) -> int:
        """Longest draft path: the chain length, or the tree depth."""
        return (self.tree_depth or self.num_speculative_tokens) if self.is_tree else self.num_speculative_tokens

    @property
    def num_nodes(self) -> int:
        """Most draft tokens verified in one step."""
        if not self.is_tree:
            return self.num_speculative_tokens
        return self.tree_num_nodes or self.tree_topk * self.depth

    @classmethod
    def from_cli(cls, spec: str, num_speculative_tokens: int = 4, **options) -> "SpeculativeConfig":
        """"draft:MODEL" | "ngram" | "eagle3:PATH" (+ tree options) -> SpeculativeConfig."""
        method, _, model = spec.partition(":")
        method = method.strip().lower()
        if method not in METHODS:
            raise InvalidRequestError(f"--speculative must be draft:MODEL, ngram or eagle3:HEAD_PATH, got {spec!r}")
        if method == "ngram" and model:
            raise InvalidRequestError(f"--speculative ngram takes no model, got {spec!r}")
        options = {k: v for k, v in options.items() if v is not None}
        return cls(method=method, model=model or None, num_speculative_tokens=num_speculative_tokens, **options)


def parse_load_thresholds(text: str | None) -> list[tuple[int, int]] | None:
    """"64:2,128:0" -> [(64, 2), (128, 0)]; "" or "none" -> None."""
    if not text or text.strip().lower() == "none":
        return None
    try:
        return [(int(n), int(k)) for n, k in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise InvalidRequestError(f"speculation thresholds must look like 64:2,128:0 (from N requests on, "
                                  f"at most k drafts; 0 = off), got {text!r}") from None


def build_speculation(config: SpeculativeConfig, engine):
    """-> (proposer, verifier) for the Engine; loads the drafter (weights, vocabulary checks)."""
    from lightspeed.speculative.verify import Verifier
    if config.method == "ngram":
        from lightspeed.speculative.ngram import NgramProposer
        proposer = NgramProposer(config, engine)
    elif config.method == "draft":
        from lightspeed.speculative.draft_model import DraftModelProposer
        proposer = DraftModelProposer(config, engine)
    else:
        from lightspeed.speculative.eagle3 import Eagle3Proposer
        proposer = Eagle3Proposer(config, engine)
    verifier = Verifier(proposer)
    proposer.verifier = verifier
    return proposer, verifier
