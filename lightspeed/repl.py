"""`lightspeed chat`: an interactive streaming chat that behaves like the REPLs people use.

- readline line editing and history (~/.cache/lightspeed/chat_history);
- Ctrl-C while a reply streams stops that reply and keeps the conversation (the partial
  reply stays in it); Ctrl-C at the prompt clears the line; Ctrl-D or /exit leaves;
- sampling defaults from the model's generation_config.json (temperature, top_p, top_k,
  repetition_penalty),
  else CHAT_DEFAULTS, unless given on the command line;
- a visible note when a reply is cut by --max-tokens or by the context.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

from lightspeed.config import SamplingParams
from lightspeed.errors import LightspeedError

CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0}  # NOTE: greedy decoding loops in open chat


def generation_defaults(model: str) -> dict:
    """temperature / top_p / top_k / repetition_penalty from the model's generation_config.json (an HF directory)."""
    path = Path(model)
    cfg_file = path / "generation_config.json" if path.is_dir() else None
    if cfg_file is None or not cfg_file.is_file():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    return {k: cfg[k] for k in CHAT_DEFAULTS if isinstance(cfg.get(k), int | float) and not isinstance(cfg[k], bool)}


def chat_params(args) -> SamplingParams:
    """Command line > generation_config.json > CHAT_DEFAULTS (validated before the model loads)."""
    model_defaults = generation_defaults(args.model)
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else model_defaults.get(k, v)
              for k, v in CHAT_DEFAULTS.items()}
    from lightspeed.options import checked_guided, guided_options
    return checked_guided(SamplingParams(max_tokens=args.max_tokens, min_p=args.min_p, seed=args.seed, stop=args.stop,
                                         **chosen, **guided_options(args)))


def _setup_readline():
    """Line editing and a persistent history, where readline exists (not on Windows)."""
    try:
        import readline
    except ImportError:
        return None
    from lightspeed.loader.pull import lightspeed_home
    history = lightspeed_home() / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    return readline, history


class _StopOnCtrlC:
    """While active, SIGINT sets a flag (checked between engine steps) instead of raising in
    the middle of a step, so the engine and its prefix cache stay consistent."""

    def __init__(self):
        self.stop = threading.Event()

    def __enter__(self):
        self.stop.clear()
        self._old = signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


def _finish_note(out, params: SamplingParams, max_model_len: int) -> str | None:
    if out is None or out.finish_reason != "length":
        return None
    if len(out.token_ids) >= params.max_tokens:
        return f"[reply cut at --max-tokens {params.max_tokens}; raise it for longer replies]"
    return f"[reply cut at the context limit of {max_model_len} tokens; start a new chat or raise --max-model-len]"


def run_chat(llm, params: SamplingParams, system: str | None = None, out=sys.stdout, err=sys.stderr) -> None:
    rl = _setup_readline() if sys.stdin.isatty() else None
    messages = [{"role": "system", "content": system}] if system else []
    print("lightspeed chat: type a message; Ctrl-C stops a reply, Ctrl-D or /exit leaves.", file=err)
    interrupt = _StopOnCtrlC()
    try:
        while True:
            try:
                user = input("> ")
            except EOFError:
                print(file=err)
                return
            except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
                print(file=err)
                continue
            if user.strip() in ("/exit", "/quit"):
                return
            if not user.strip():
                continue
            messages.append({"role": "user", "content": user})
            reply, last = "", None
            with interrupt:
                try:
                    stream = llm.chat_stream(messages, params)
                    for last in stream:
                        reply += last.new_text
                        out.write(last.new_text)
                        out.flush()
                        if interrupt.stop.is_set():
                            stream.close()  # aborts the request in the engine
                            break
                except LightspeedError as e:  # e.g. the conversation outgrew the context
                    print(f"error: {e}", file=err)
                    messages.pop()
                    continue
            out.write("\n")
            if last is not None:
                m = last.metrics
                print(f"[{m.num_prompt_tokens} prompt tokens, {m.num_generated_tokens} generated, "
                      f"{m.tokens_per_s or 0:.1f} tok/s]", file=err)
            note = "[stopped]" if interrupt.stop.is_set() else _finish_note(last, params, llm.engine.max_model_len)
            if note:
                print(note, file=err)
            messages.append({"role": "assistant", "content": reply})
    finally:
        if rl is not None:
            try:
                rl[0].write_history_file(rl[1])
            except OSError:
                pass
