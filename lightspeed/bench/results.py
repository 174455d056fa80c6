"""One JSON shape for every benchmark result (DESIGN.md): device, git commit, command, figures."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path


def git_commit() -> str:
    """HEAD's short hash, or $LIGHTSPEED_GIT_COMMIT for a tree exported without .git."""
    if os.environ.get("LIGHTSPEED_GIT_COMMIT"):
        return os.environ["LIGHTSPEED_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_results(path: str | Path | None, device, results: list[dict], command: str | None = None) -> Path | None:
    """Write the results JSON to `path` (None: print only, write nothing) -> the path written."""
    if path is None:
        return None
    record = {"device": device_name(device), "git_commit": git_commit(),
              "command": command or "lightspeed " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "results": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def compare_outputs(token_ids: list[list[int]], plain: list[list[int]]) -> dict:
    """Per-prompt comparison with plain decoding's tokens: all identical, how many prompts are,
    and where each differing one first differs (token index; None when identical)."""
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
              for a, b in zip(token_ids, plain)]
    same = sum(f is None for f in firsts)
    return {"outputs_identical_to_plain": same == len(plain) == len(token_ids),
            "prompts_identical_to_plain": f"{same}/{len(plain)}", "first_difference": firsts}

