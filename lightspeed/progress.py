"""The one progress bar of lightspeed's long runs (benchmarks, LLM.generate(progress=...)):
tqdm on stderr with count, rate and ETA."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(total_or_items, desc: str, unit: str, leave: bool = False, disable: bool = False):
    """A progress bar on stderr (count, rate, ETA) over a count or an iterable (disable: none)."""
    items = None if isinstance(total_or_items, int) else total_or_items
    total = total_or_items if items is None else len(items)
    return tqdm(items, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                disable=disable)
