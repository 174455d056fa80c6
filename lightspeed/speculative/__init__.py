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

from lightspeed.config import METHODS, SpeculativeConfig, parse_load_thresholds  # noqa: F401  (config lives there)

__all__ = ["SpeculativeConfig", "build_speculation", "parse_load_thresholds"]

def build_speculation(config: SpeculativeConfig, target):
    """-> (proposer, verifier) for the engine described by `target` (proposer.TargetInfo);
    loads the drafter (weights, vocabulary checks). The two never reference each other: the
    runner passes the verifier's results to the proposer and the drafts back."""
    from lightspeed.speculative.verify import Verifier
    if config.method == "ngram":
        from lightspeed.speculative.ngram import NgramProposer
        proposer = NgramProposer(config, target)
    elif config.method == "draft":
        from lightspeed.speculative.draft_model import DraftModelProposer
        proposer = DraftModelProposer(config, target)
    else:
        from lightspeed.speculative.eagle3 import Eagle3Proposer
        proposer = Eagle3Proposer(config, target)
    return proposer, Verifier()
