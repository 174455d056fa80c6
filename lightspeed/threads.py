"""CPU threads of the engine: one per physical core this process may run on, so the
engine's intra-op threads never share a core (hyper-threads slow a decode step down)."""
from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (Linux topology; else os.cpu_count)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def set_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (None: physical_cores()); returns the number set."""
    import torch
    n = num_threads or physical_cores()
    torch.set_num_threads(n)
    return n
