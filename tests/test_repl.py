"""`lightspeed chat` in a pseudo-terminal (pexpect): Ctrl-C stops the reply and keeps the
conversation; chat sampling defaults; the cut-reply note."""
from __future__ import annotations

import os
import re
import sys
import time
from argparse import Namespace
from pathlib import Path

import pexpect

from lightspeed.config import SamplingParams
from lightspeed.repl import CHAT_DEFAULTS, chat_params
from tests.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STATS = re.compile(r"\[(\d+) prompt tokens, (\d+) generated")


def _send_and_interrupt(child, line: str) -> None:
    child.send(line + "\r")
    child.expect_exact(line + "\r\n")  # the terminal's echo
    time.sleep(1.0)  # the reply streams (3000 tokens take far longer)
    child.sendintr()


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(tmp_path):
    make_tiny_checkpoint(tmp_path, "llama", max_position_embeddings=4096)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTSPEED_HOME": str(tmp_path / "home")}
    child = pexpect.spawn(sys.executable, ["-m", "lightspeed.cli", "chat", "--model", str(tmp_path), "--device", "cpu",
                                           "--max-tokens", "3000", "--threads", "1", "--top-k", "1"],
                          env=env, cwd=str(ROOT), timeout=120, encoding="utf-8", codec_errors="replace")
    try:
        child.expect_exact("> ")
        _send_and_interrupt(child, "first")
        child.expect(STATS)
        first_prompt, first_generated = int(child.match.group(1)), int(child.match.group(2))
        child.expect_exact("[stopped]")
        assert 0 < first_generated < 3000
        child.expect_exact("> ")
        _send_and_interrupt(child, "second")
        child.expect(STATS)
        # the second prompt holds the first turn and its (partial) reply: the tiny template
        # (byte tokens) adds 23 tokens around "second" and an empty reply; the reply's text adds more
        assert int(child.match.group(1)) > first_prompt + len("second") + 23
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_chat_sampling_defaults(tmp_path):
    args = Namespace(model=str(tmp_path), temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                     max_tokens=8, min_p=0.0, seed=None, stop=[])
    assert chat_params(args).temperature == CHAT_DEFAULTS["temperature"]
    (tmp_path / "generation_config.json").write_text(
        '{"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.2}')
    p = chat_params(args)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.3, 0.8, 20, 1.2)
    args.temperature = 0.0  # the command line wins
    assert chat_params(args).temperature == 0.0


def test_cut_reply_notes():
    from types import SimpleNamespace

    from lightspeed.repl import _finish_note
    params = SamplingParams(max_tokens=4)
    assert "--max-tokens 4" in _finish_note(SimpleNamespace(finish_reason="length", token_ids=[1] * 4), params, 64)
    assert "context limit of 64" in _finish_note(SimpleNamespace(finish_reason="length", token_ids=[1]), params, 64)
    assert _finish_note(SimpleNamespace(finish_reason="stop", token_ids=[1]), params, 64) is None


def test_readline_history_is_kept(tmp_path, monkeypatch):
    from lightspeed.repl import _setup_readline
    monkeypatch.setenv("LIGHTSPEED_HOME", str(tmp_path))
    (tmp_path / "chat_history").write_text("first question\nsecond question\n")
    rl, history = _setup_readline()
    assert history == tmp_path / "chat_history"
    assert [rl.get_history_item(i) for i in (1, 2)] == ["first question", "second question"]
    rl.clear_history()
