"""Host time per engine step, by phase (`python -m lightspeed.bench.host_step`).

The engine and its runner call `timer.mark(phase)` at each phase's end; the default
NULL_TIMER does nothing. A StepTimer adds the wall time since the previous mark to `phase`:

    step():  start | schedule | input_prep | forward | sample | wait | update | output |

`forward` is the model's launch on CUDA (its device time overlaps the host) and its whole
compute on CPU; `wait` is the host blocked on the device for sampled tokens.
"""
from __future__ import annotations

import time
from collections import defaultdict

PHASES = ("schedule", "input_prep", "forward", "sample", "wait", "update", "output")
# phases that are host work (the rest is the device's, or waiting for it)
HOST_PHASES = ("schedule", "input_prep", "sample", "update", "output")


class NullTimer:
    def start(self) -> None:
        pass

    def mark(self, phase: str) -> None:
        pass


NULL_TIMER = NullTimer()


class StepTimer(NullTimer):
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now

    def reset(self) -> None:
        self.seconds.clear()
