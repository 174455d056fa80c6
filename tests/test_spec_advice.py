"""Speculation that cannot help: warned about before any model loads (a draft that is the
target or not smaller), and on CPU reported once, measured, when it runs slower than plain."""
from __future__ import annotations

from lightspeed.spec_advice import SpeculationMeter, speculation_warnings
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
    assert speculation_warnings(str(big), SpeculativeConfig.from_cli("ngram"), "cpu") == []


def test_meter_asks_for_plain_steps_and_concludes_once(caplog):
    m = SpeculationMeter("ngram")
    for _ in range(SpeculationMeter.WARMUP):
        m.record(True, 1.0, 1)  # not counted
        assert not m.wants_plain_step()
    asked = 0
    for step in range(200):
        if m.is_done:
            break
        plain = asked > m.steps[False]  # the runner dropped a proposal: this step runs plain
        m.record(not plain, 0.010 if plain else 0.030, 1 if plain else 2)  # 100 tok/s plain, 67 with drafts
        asked += m.wants_plain_step()
    assert m.steps[False] == SpeculationMeter.MIN_PLAIN and m.steps[True] == SpeculationMeter.MIN_SPEC
    assert "slower than plain" in m.verdict and "66.7 tokens/s with it vs 100.0" in m.verdict
    assert [r.getMessage() for r in caplog.records] == [m.verdict]
    m.record(True, 1.0, 1)  # done: nothing more is measured or said
    assert not m.wants_plain_step() and len(caplog.records) == 1
    fast = SpeculationMeter("draft")
    fast.num_skipped = SpeculationMeter.WARMUP
    for _ in range(20):
        fast.record(True, 0.02, 4)
        fast.record(False, 0.01, 1)
    assert "pays" in fast.verdict


def test_slow_speculation_on_cpu_is_reported_once(tmp_path, caplog):
    """A draft model that is rarely right (a different random model) costs more than it saves
    on a CPU: the engine says so once, from its own measured steps; outputs are unchanged."""
    from lightspeed import LLM, SamplingParams
    make_tiny_checkpoint(tmp_path / "t", "llama", seed=0)
    make_tiny_checkpoint(tmp_path / "d", "llama", seed=1, num_hidden_layers=1)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    plain = LLM(str(tmp_path / "t"), device="cpu").generate([[1, 2, 3]], params)[0]
    llm = LLM(str(tmp_path / "t"), device="cpu",
              speculative=SpeculativeConfig("draft", model=str(tmp_path / "d"), num_speculative_tokens=4))
    assert llm.generate([[1, 2, 3]], params)[0].token_ids == plain.token_ids
    llm.generate([[4, 5, 6], [7, 8, 9]], SamplingParams(max_tokens=96, temperature=0, ignore_eos=True))
    notes = [r.getMessage() for r in caplog.records if r.name == "lightspeed.speculation"]
    assert len(notes) == 1 and "speculation (draft) is slower than plain decoding" in notes[0]
