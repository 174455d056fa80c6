"""Speculation that cannot help is warned about before any model loads."""
from __future__ import annotations

from lightspeed.spec_advice import CPU_NOTE, speculation_warnings
from lightspeed.speculative import SpeculativeConfig
from tests.tiny import make_tiny_checkpoint


def test_draft_that_is_the_target_or_not_smaller(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    make_tiny_checkpoint(small, "llama")
    make_tiny_checkpoint(big, "llama", num_hidden_layers=6)
    same = speculation_warnings(str(big), SpeculativeConfig.from_cli(f"draft:{big}"), "cuda")
    assert len(same) == 1 and "target itself" in same[0]
    larger = speculation_warnings(str(small), SpeculativeConfig.from_cli(f"draft:{big}"), "cuda")
    assert len(larger) == 1 and "not smaller" in larger[0]
    assert speculation_warnings(str(big), SpeculativeConfig.from_cli(f"draft:{small}"), "cuda") == []
    assert speculation_warnings(str(big), None, "cpu") == []
    assert speculation_warnings(str(big), SpeculativeConfig.from_cli("ngram"), "cpu") == [CPU_NOTE]
