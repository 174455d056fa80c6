"""Every kernel variant the launchers produce compiles for sm_90 (H100/H200) with Triton's
bundled ptxas, with no register spills and the PDL instructions exactly where PDL is on.
Runs without a GPU (tests/kernels/sm90.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightspeed.kernels._common import HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]


def _has_ptxas() -> bool:
    if not HAS_TRITON:
        return False
    import triton
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _has_ptxas(), reason="needs triton with its bundled ptxas")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "tests.kernels.sm90"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
