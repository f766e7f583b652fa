"""The trace-replay bench, end to end on a short slice of a real trace against a real Triton."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtest.bench import BenchConfig
from loadtest.contenders import Contender
from loadtest.trace_bench import DEFAULT_TRACE, TritonShareFits, plot_trail, run_trace_bench, summary_lines, trace_times

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not DEFAULT_TRACE.is_file(), reason="shared traces not present")]


def test_trace_replay_runs_every_contender_on_the_same_arrivals_and_tracks_the_rate(triton_runnable, tmp_path: Path):
    times = trace_times(DEFAULT_TRACE, mean_rate=120.0, limit=480)  # ~4 s of the conversation trace
    assert times.size == 480 and abs((times.size - 1) / times[-1] - 120.0) < 1e-6
    cfg = BenchConfig(
        rates=(120.0,),
        contenders=(Contender("triton", max_queue_delay_us=0), Contender("gate", policy="smdp", adaptive=True),
                    Contender("config", policy="smdp", adaptive=True)),
        duration_s=float(times[-1]) - 1.5, warmup_s=1.0, cooldown_s=0.5, out_dir=tmp_path, weight=1e-3,
    )
    shares = TritonShareFits()
    report, trail = run_trace_bench(cfg, times, progress=lambda _msg: None, shares=shares)
    assert [r.contender for r in report.rows] == ["triton delay=0ms", "gate smdp adaptive", "config smdp adaptive"]
    # Triton's run was given its race share, by its mean and by its q0.99 (no SLO stated), and written out
    assert [r.contender for r in shares.rows] == ["triton delay=0ms"] and 0.0 <= shares.share <= 1.0
    # (its answers timed from their send: the row's, from their schedule, less at most the send lag)
    fit, lag = shares.rows[0].fit.by_quantile, float(np.max(report.rows[0].send_lags_s)) + 1e-3
    assert fit.figure == "q0.99" and abs(fit.measured_s - np.quantile(report.rows[0].latencies_s, 0.99)) <= lag
    assert abs(shares.rows[0].fit.by_mean.measured_s - report.rows[0].measured.mean_latency_s) <= lag
    assert "by_mean" in shares.write(tmp_path / "catch_share.json").read_text()
    for row in report.rows:
        assert row.measured.failed == 0 and row.measured.requests > 0
        assert np.isfinite(row.measured.cost) and row.measured.mean_power_w > 0
    # the adaptive gate's status was polled while it ran: a rate estimate and a solved policy
    assert trail and max(s.version for s in trail) >= 1
    assert any(s.rate_rps > 0 for s in trail)
    assert summary_lines(report) and "adaptive SMDP gate vs triton delay=0ms" in summary_lines(report)[0]
    # the gate's prediction is the fitted arrival model's, and which models its solves used is recorded
    gate = report.rows[1]
    assert gate.predicted.source == "exact+hop" and np.isfinite(gate.predicted.mean_latency_s)  # + the measured hop
    assert "predicted under the fitted " in gate.settings and "policies solved for poisson" in gate.settings
    assert all(s.solved_for for s in trail if s.version >= 1)
    # its W over the window split into the gate's own and the hop outside it; Triton's and config mode's not
    assert gate.split is not None and gate.split.gate_n > 0
    assert 0.0 < gate.split.gate_w_s < gate.split.client_w_s and np.isfinite(gate.predicted_hop_s)
    assert report.rows[0].split is None and report.rows[2].split is None
    assert (tmp_path / "gate-split-gate_smdp_adaptive.txt").read_text().startswith("over the measured window")
    # config mode ran with its follower beside Triton (reloads, if any, failed no request)
    assert report.rows[2].settings.startswith("followed: ")
    assert plot_trail(times, trail, tmp_path / "trail.png").stat().st_size > 0
