"""Summarize py-spy raw (collapsed) stacks recorded with --threads [--subprocesses]: per
process and thread, the share of on-CPU samples, then the functions that hold the most
samples (inclusive: a function counted once per stack) and the leaf functions (self time).
A sample whose innermost frame waits (select, a lock, a queue, sleep) counts as idle, and is
left out of the function shares.

    python bench/device/stacks.py PROFILE.txt... [--top N]
"""
from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

_PROCESS = re.compile(r'process \d+:".*?";')
WAITS = re.compile(r"^(\S*\.)?(select|poll|wait|acquire|sleep|_recv|recv_bytes|_poll|get|accept|epoll|join|_wait_for_tstate_lock|_worker) \(")


def parse(path: str):
    """-> {process: {thread: [(frames, count)]}} (frames without line numbers, outermost first)."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        procs = _PROCESS.findall(stack)  # NOTE: a command line may hold ';'; a child process follows its parent
        parts = _PROCESS.sub("", stack).split(";")
        thread = parts.pop(0) if parts and parts[0].startswith("thread ") else "thread"
        frames = [re.sub(r":\d+\)$", ")", f) for f in parts if f]
        out[procs[-1][:100] if procs else "process"][thread].append((frames, int(count)))
    return out


def summarize(path: str, top: int) -> None:
    print(f"##### {path}")
    for proc, threads in parse(path).items():
        total = sum(c for stacks in threads.values() for _, c in stacks)
        print(f"=== {proc}: {total} samples")
        for thread, stacks in sorted(threads.items(), key=lambda kv: -sum(c for _, c in kv[1])):
            busy = [(frames, c) for frames, c in stacks if frames and not WAITS.match(frames[-1])]
            n, idle = sum(c for _, c in busy), sum(c for _, c in stacks) - sum(c for _, c in busy)
            if n < 0.02 * total:
                continue
            incl, leaf = Counter(), Counter()
            for frames, c in busy:
                for f in set(frames):
                    incl[f] += c
                if frames:
                    leaf[frames[-1]] += c
            print(f"  --- {thread}: {n} busy samples, {idle} idle")
            for f, c in incl.most_common(top):
                print(f"    {100 * c / n:5.1f}%  {f[:110]}")
            print("    leaves: " + "; ".join(f"{f[:60]} {100 * c / n:.1f}%" for f, c in leaf.most_common(8)))


if __name__ == "__main__":
    args = sys.argv[1:]
    top = int(args[args.index("--top") + 1]) if "--top" in args else 30
    for p in [a for i, a in enumerate(args) if a != "--top" and (i == 0 or args[i - 1] != "--top")]:
        summarize(p, top)
