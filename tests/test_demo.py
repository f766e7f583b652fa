"""``smdp demo`` end to end, shortened: every contender kind runs, outputs parse, nothing is left running."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _marked(marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries the marker, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if f"SMDP_DEMO_TEST_MARKER={marker}".encode() in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def test_demo_runs_every_contender_and_leaves_no_process(triton_runnable, tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "demo"
    env = {**os.environ, "SMDP_DEMO_TEST_MARKER": marker}
    proc = subprocess.run(
        [sys.executable, "-m", "smdp.cli", "demo", "--rates", "80", "--duration", "1.0", "--warmup", "0.6",
         "--cooldown", "0.2", "--out", str(out)],
        capture_output=True, text=True, timeout=400, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "solver service (smdp solver-serve) at 127.0.0.1:" in text
    assert "compiled to preferred_batch_size: [" in text
    # the solver is told tau(b) as measured on this stack, and W~ carries the measured per-request hop
    assert "stack profile of emulated_gpu: profile: auto, measured b=1,2,4," in text
    assert "a lone request's answer takes" in text
    # and, for the gate contenders, the batch times and hop the gate measured at the load (at-load): one
    # calibration run per gate policy (greedy its own, every SMDP contender the adaptive SMDP gate's)
    assert "at 80 req/s through the " in text and "batches hold the slot" in text
    assert "gate, greedy (" in text and "gate, smdp (" in text
    # each calibration sets the gate's own W beside the model's on its arrivals: the time in the gate
    assert "against the model's" in text and "ms in the gate)" in text
    names = ["triton delay=0ms", "triton delay=10ms", "gate greedy", "gate smdp", "gate smdp adaptive", "config smdp",
             "gate smdp SLO"]
    table = text[text.index("J = W + w P"):]
    for name in names:
        assert f"    80 {name}" in table, table
    with open(out / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["contender"] for r in rows] == names
    for r in rows:
        assert int(r["failed"]) == 0 and int(r["requests"]) > 20
        assert float(r["W_mean_ms"]) > 0 and float(r["pred_J_ms"]) > 0
        assert 0.0 <= float(r["slo_attainment"]) <= 1.0 and float(r["slo_latency_ms"]) == 80.0
        assert r["pred_source"].endswith("+hop")
    summary = json.loads((out / "bench.json").read_text())
    assert summary["config"]["solver"] == "embedded"
    assert [r["contender"] for r in summary["rows"]] == names
    for name in ("latency_cdf.png", "batch_sizes.png", "jwp_bars.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "solver.log").exists()
    # every gate contender's run split into its time in the gate and the hop outside it
    for name in ("gate_greedy", "gate_smdp", "gate_smdp_adaptive"):
        split = (out / f"gate-split-{name}-80.txt").read_text()
        assert split.startswith("over the measured window: client W"), split
        assert "hop (client - gate)" in split and "turnaround" in split and "beyond the profile" in split, split
    # and the table of those splits beside the prediction's parts
    assert "where the gate contenders' W went over the window" in text
    for name in ("gate greedy", "gate smdp", "gate smdp adaptive"):
        assert f"    80 {name}" in text[text.index("where the gate contenders' W went"):]
    # Triton, the sidecars and the solver service were all stopped (give exiting ones a moment)
    deadline = time.monotonic() + 10.0
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked(marker) == []
