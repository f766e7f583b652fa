"""The load generators and ``smdp bench`` against a real Triton (and a real sidecar)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from loadtest.openloop import run_open_loop
from loadtest.triton_control import BatchingOverride, ModelConfigControl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
V100_TAU1_S = 0.00210084034  # tau(1) of profiles/v100_resnet50.csv


@pytest.fixture
def emulated(triton):
    """The session Triton's emulated_gpu, with its original config put back after the test."""
    control = ModelConfigControl(triton.grpc_url, "emulated_gpu")
    try:
        yield control
    finally:
        control.restore()
        control.close()


def test_open_loop_fires_on_schedule_when_the_server_is_slow(triton, emulated):
    """A server that takes 50 ms per request, one at a time: 20 arrivals in 100 ms are all sent
    within about 100 ms (not one per 50 ms), so the requests overlap."""
    emulated.apply(BatchingOverride(time_scale=0.05 / V100_TAU1_S, dynamic_batching=False))
    times = np.linspace(0.0, 0.095, 20)
    res = run_open_loop(triton.grpc_url, "emulated_gpu", times, timeout_s=10.0)
    assert res.failures() == {}
    assert np.nanmax(res.sent_s) - times[0] < 0.13
    assert np.max(res.send_lag_s) < 0.03
    first_done = np.nanmin(res.done_s)
    assert first_done - res.sent_s[0] >= 0.045  # the server really is slow
    assert np.sum(res.sent_s < first_done) >= 10  # many were sent before any answer came back
    assert res.max_in_flight_seen >= 10
    # served one after another: the last answer comes about 20 x 50 ms after the first send
    assert np.nanmax(res.done_s) - res.sent_s[0] > 0.9
    assert np.all(res.batch_size == 1)


def test_open_loop_poisson_run_keeps_its_dispersion_and_reports_batches(triton):
    rate, horizon = 200.0, 3.0
    from solver.arrivals import poisson

    times = poisson(rate, duration=horizon, rng=7)
    res = run_open_loop(triton.grpc_url, "emulated_gpu", times, timeout_s=10.0)
    assert res.failures() == {}
    assert res.n == times.size
    # what the server received (send times) is still Poisson: dispersion test on 0.1 s windows
    counts = np.histogram(res.sent_s, bins=np.arange(0.0, horizon + 1e-9, 0.1))[0]
    k = counts.size
    d = ((counts - counts.mean()) ** 2).sum() / counts.mean()
    assert stats.chi2.ppf(0.0005, k - 1) < d < stats.chi2.ppf(0.9995, k - 1)
    assert res.lag_summary()["p99_s"] < 0.05
    assert np.all(res.batch_size >= 1) and np.all(np.isfinite(res.batch_energy_j))
    assert np.all(res.latency_s > 0)


def test_trace_replay_is_sent_with_the_trace_gaps(triton, tmp_path):
    from loadtest.arrival_spec import parse_arrivals

    gaps = np.round(np.random.default_rng(5).exponential(0.2, 60), 7)
    start = np.datetime64("2023-11-16T18:17:03.0000000", "ns")
    stamps = start + np.concatenate(([0], np.cumsum(np.round(gaps * 1e7).astype(np.int64) * 100)))
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        str(s).replace("T", " ") + ",1,1\n" for s in stamps))
    times = parse_arrivals(f"trace:{trace}", time_scale=10.0).times(60.0)
    res = run_open_loop(triton.grpc_url, "emulated_gpu", times, timeout_s=10.0)
    assert res.failures() == {}
    np.testing.assert_allclose(np.diff(res.sent_s) * 10.0, gaps, atol=10.0 * 0.02)


def test_locust_headless_open_loop_through_the_sidecar(triton, tmp_path):
    from plugin.config import load_config
    from plugin.runner import SidecarThread

    sidecar = SidecarThread(load_config(overrides={"listen": "127.0.0.1:0", "control_listen": "127.0.0.1:0",
                                             "metrics_listen": "127.0.0.1:0", "triton_url": triton.grpc_url},
                                        environ={}))
    sidecar.start()
    try:
        out = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
             "-u", "1", "-r", "1", "-t", "5s", "--csv", str(out), "--host", sidecar.url, "--only-summary",
             "--arrivals", "poisson", "--rate", "60"],
            capture_output=True, text=True, timeout=90, cwd=ROOT,
        )
    finally:
        sidecar.stop()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "open-loop (this process): fired" in proc.stdout and "send lag" in proc.stdout
    with open(f"{out}_stats.csv", newline="") as fh:
        rows = {r["Name"]: r for r in csv.DictReader(fh)}
    agg = rows["Aggregated"]
    assert int(agg["Request Count"]) > 100  # ~60/s for ~5 s
    assert int(agg["Failure Count"]) == 0
    assert float(agg["Average Response Time"]) > 0


@pytest.mark.slow
def test_locust_open_loop_two_processes_several_users_slow_server_keep_the_rate(triton, emulated, tmp_path):
    """Two Locust worker processes, five users spawned over a second, a server slower than the
    load (20 ms per request, one at a time, at 60 req/s): together the processes send the one
    configured sequence (each its half, none twice), at the configured rate, and the send times
    are Poisson (dispersion test), not bunched when users arrive late."""
    from itertools import islice

    from loadtest.arrival_spec import parse_arrivals, share_of

    emulated.apply(BatchingOverride(time_scale=0.02 / V100_TAU1_S, dynamic_batching=False))
    rate, prefix = 60.0, tmp_path / "arrivals"
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
         "--processes", "2", "-u", "5", "-r", "5", "-t", "10s", "--host", triton.grpc_url, "--only-summary",
         "--arrivals", "poisson", "--rate", str(rate), "--arrival-seed", "3", "--request-timeout", "60",
         "--arrival-log", str(prefix)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    logs = [np.loadtxt(f"{prefix}.{r}of2.csv", delimiter=",", skiprows=1, ndmin=2) for r in range(2)]
    assert all(log.shape[0] > 100 for log in logs), [log.shape for log in logs]
    # the two shares are the one sequence, split: up to where both processes got, nothing missing or doubled
    upto = min(log[:, 0].max() for log in logs)
    union = np.sort(np.concatenate([log[log[:, 0] <= upto, 0] for log in logs]))
    whole = np.array(list(islice(share_of(parse_arrivals("poisson", rate=rate), 3, chunk_s=5.0), union.size + 50)))
    np.testing.assert_allclose(union, whole[whole <= upto], atol=1e-9)
    n = union.size
    assert abs(n - rate * upto) < 4.5 * math.sqrt(rate * upto)  # the configured rate, not 2x it
    # what the server was sent: Poisson counts per 0.25 s window once the users are up (a process
    # starting a user's channel can stall a few hundred ms on two cores), not bunched
    sent = np.sort(np.concatenate([log[:, 2] for log in logs]))
    lo, hi = sent[0] + 2.0, sent[-1] - 1.5
    counts = np.histogram(sent, bins=np.arange(lo, hi, 0.25))[0]
    k = counts.size
    d = ((counts - counts.mean()) ** 2).sum() / counts.mean()
    assert k > 15 and stats.chi2.ppf(0.0005, k - 1) < d < stats.chi2.ppf(0.9995, k - 1), (k, d, counts)
    assert abs(counts.mean() - rate * 0.25) < 4.5 * math.sqrt(rate * 0.25 / k)
    assert proc.stdout.count("open-loop (process") == 2
    assert "configured 30/s for this share" in proc.stdout


@pytest.mark.slow
def test_smdp_bench_tiny_end_to_end(triton, tmp_path, capsys):
    from smdp.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--triton", triton.grpc_url, "--rates", "80", "--duration", "1.5", "--warmup", "0.7",
                 "--cooldown", "0.5", "--delays-us", "0,5000", "--gates", "greedy,smdp", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "power modelled from the v100_resnet50 profile, idle P0 = 40 W assumed" in text
    with open(out / "bench.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["contender"] for r in rows] == ["triton delay=0ms", "triton delay=5ms", "gate greedy", "gate smdp",
                                              "config smdp"]
    for r in rows:
        assert int(r["failed"]) == 0 and int(r["requests"]) > 50
        assert float(r["W_mean_ms"]) > 0 and math.isfinite(float(r["pred_J_ms"]))
        # modelled power lies between idle and the V100's largest busy power
        assert 40.0 <= float(r["P_w"]) <= 300.0
        assert r["note"].startswith("power modelled from the v100_resnet50 profile, idle P0 = 40 W assumed")
    for name in ("latency_cdf.png", "batch_sizes.png", "jwp_bars.png"):
        assert (out / name).stat().st_size > 5000
    config_row = json.loads((out / "bench.json").read_text())["rows"][-1]
    # simulated; "+hop" when the stack profile added the measured per-request hop (issue 11)
    assert config_row["pred_source"] in ("sim", "sim+hop") and "preferred_batch_size: [" in config_row["settings"]
    # the bench put the session's model back as it found it
    cfg = ModelConfigControl(triton.grpc_url, "emulated_gpu")
    try:
        assert cfg.current["parameters"]["time_scale"]["string_value"] == "1"
        assert "dynamic_batching" in cfg.current
    finally:
        cfg.close()
