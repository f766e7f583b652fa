"""solver.memory: freed memory kept for the next solve (glibc's mmap and trim thresholds)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from solver.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Faults of the second fill of a 64 MiB array, after the first was freed: every page (4 KiB, or 2 MiB
# with transparent huge pages) when the array is mapped afresh, next to none when its memory was kept.
PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from solver.memory import keep_freed_memory
    assert keep_freed_memory(256 * 2**20)
a = np.ones(8 * 2**20); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(8 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "1"])
def test_bad_sizes_are_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match="keep_bytes"):
        keep_freed_memory(bad)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_a_freed_array_is_reused_without_page_faults() -> None:
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ), timeout=60, check=True)
        faults[mode] = int(out.stdout.strip())
    # mapped afresh, every page faults in again: at least one per 2 MiB huge page, one per 4 KiB without
    assert faults["default"] >= 64 // 2, faults
    assert faults["keep"] * 10 < faults["default"], faults  # kept: the pages are reused


def test_solver_serve_refuses_a_bad_keep_freed_memory_value() -> None:
    proc = subprocess.run([sys.executable, "-m", "solver.service_cli", "--keep-freed-memory-mb", "-1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "--keep-freed-memory-mb must be in [0, 2048), got -1" in proc.stderr
