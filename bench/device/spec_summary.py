"""The short table the device scripts print last, from an eval-spec JSON: per row tok/s/user,
AL, how many outputs equal plain decoding's (and where the others first differ), per-position
acceptance; with both a head and a draft model, the head's ratio to the draft (issue 7 target).

    python bench/device/spec_summary.py bench/results/issue7-eval-spec-qwen1.5b.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    p = Path(path)
    if not p.exists():
        sys.exit(f"eval-spec: no result in {p}")
    r = json.loads(p.read_text())
    rows = r["results"]
    print(f"device {r['device']}, commit {r['git_commit']}, {rows[0]['num_prompts']} prompts ({rows[0]['prompts']}), "
          f"{rows[0]['output_len']} tokens, greedy, batch {rows[0]['batch_size']}")
    for row in rows:
        pos = " ".join(f"{a:.2f}" for a in row.get("acceptance_rate_per_position") or [])
        al = f"AL {row['acceptance_length']:.2f}" if row.get("acceptance_length") else " " * 7
        same = f" same={row['prompts_identical_to_plain']}" if "prompts_identical_to_plain" in row else ""
        diffs = [d for d in row.get("first_difference") or [] if d is not None]
        same += f" (first differences {diffs})" if diffs else ""
        print(f"{row['speculative'][-40:]:<40} {row['tokens_per_s_user']:8.1f} tok/s  {al}{same}  [{pos}]")

    def best(method: str) -> float | None:
        return max((x["tokens_per_s_user"] for x in rows if x["speculative"].startswith(method)), default=None)
    head, draft = best("eagle3:"), best("draft:")
    if head and draft:
        print(f"head / draft model (best of each): {head / draft:.2f}x (target >= 1.3x); head {head:.0f} tok/s "
              "(target >= 2500)")


if __name__ == "__main__":
    main(sys.argv[1])
