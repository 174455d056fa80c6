"""Offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from lightspeed.config import EngineConfig, SamplingParams
from lightspeed.engine.engine import Engine
from lightspeed.engine.outputs import RequestOutput
from lightspeed.errors import InvalidRequestError

Prompt = str | list[int]
Message = dict[str, str]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    def __init__(self, model: str = "smollm2-135m-instruct", device: str | None = None, dtype: str | None = None,
                 speculative=None, **engine_kwargs):
        self.engine = Engine(EngineConfig(model=model, device=device, dtype=dtype, **engine_kwargs), speculative)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _add_all(self, prompts: list[Prompt], params: SamplingParams | Sequence[SamplingParams] | None,
                 stream: bool = False) -> list[str]:
        if not prompts:
            raise InvalidRequestError("no prompts given")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        for p in prompts:  # validate everything before anything runs
            self.engine.tokenize_prompt(p)
        return [self.engine.add_request(p, sp, stream=stream) for p, sp in zip(prompts, params)]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: str | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in input order.
        progress: a bar of that name (finished prompts, rate, ETA) on stderr."""
        ids = self._add_all(_as_prompt_list(prompts), sampling_params)
        final: dict[str, RequestOutput] = {}
        bar = None
        if progress is not None:
            from lightspeed.progress import progress as progress_bar
            bar = progress_bar(len(ids), progress, "prompt")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[r] for r in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput with `new_text` / `new_token_ids` deltas each step (every
        EngineConfig.stream_interval tokens: the first and last always)."""
        (rid,) = self._add_all([prompt], sampling_params, stream=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)[0]  # message text never as specials

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | None = None) -> RequestOutput | list[RequestOutput]:
        """One conversation -> one output; a list of conversations -> a list of outputs."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else messages
        outs = self.generate([self.apply_chat_template(c) for c in convs], sampling_params)
        return outs[0] if single else outs

    def chat_stream(self, messages: list[Message], sampling_params: SamplingParams | None = None):
        return self.stream(self.apply_chat_template(messages), sampling_params)
