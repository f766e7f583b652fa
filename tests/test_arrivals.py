"""Arrival processes: statistical laws checked against closed forms, trace replay against the file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from solver import arrivals
from solver.arrivals import ArrivalError
from solver.model import ModelError

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
CODE = TRACES / "AzureLLMInferenceTrace_code_2023.csv"
CONV = TRACES / "AzureLLMInferenceTrace_conv_2023.csv"
needs_traces = pytest.mark.skipif(not CODE.exists(), reason="shared traces not present")


def _window_counts(times: np.ndarray, window: float, horizon: float) -> np.ndarray:
    k = int(horizon // window)
    return np.histogram(times, bins=np.arange(k + 1) * window)[0]


@pytest.mark.parametrize("mode", ["n", "duration"])
def test_poisson_counts_are_poisson(mode):
    rate, horizon = 40.0, 4000.0
    if mode == "n":
        t = arrivals.poisson(rate, n=int(rate * horizon * 1.05), rng=7)
    else:
        t = arrivals.poisson(rate, duration=horizon, rng=7)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0
    counts = _window_counts(t, 1.0, horizon)
    mean = counts.mean()
    assert abs(mean - rate) < 4 * math.sqrt(rate / counts.size)
    # Index of dispersion ~ 1; (k-1) * IDC is chi-square with k-1 degrees of freedom under Poisson.
    idc = counts.var(ddof=1) / mean
    chi2 = (counts.size - 1) * idc
    p = stats.chi2.sf(chi2, counts.size - 1)
    assert 0.001 < p < 0.999, (idc, p)
    # Inter-arrival times are exponential.
    assert stats.kstest(np.diff(t), "expon", args=(0, 1 / rate)).pvalue > 0.001


def test_poisson_n_and_duration_together_stop_at_first():
    t = arrivals.poisson(10.0, n=1000, duration=5.0, rng=1)
    assert t.size < 1000 and t[-1] < 5.0
    assert arrivals.poisson(10.0, n=0, rng=1).size == 0


def test_mmpp_rate_and_overdispersion_match_closed_form():
    lam = np.array([10.0, 100.0])
    r = np.array([1.0, 2.0])  # leaving rates of state 0 and 1
    p = np.array([r[1], r[0]]) / r.sum()
    mean_rate = p @ lam
    var_lam = p[0] * p[1] * (lam[0] - lam[1]) ** 2
    window, horizon = 20.0, 20000.0
    s = r.sum()
    # Asymptotic index of dispersion of an MMPP-2 with the finite-window correction.
    idc_exact = 1 + 2 * var_lam / (mean_rate * s) * (1 - (1 - math.exp(-s * window)) / (s * window))
    t = arrivals.mmpp(lam, r, duration=horizon, rng=3)
    counts = _window_counts(t, window, horizon)
    assert counts.mean() / window == pytest.approx(mean_rate, rel=0.03)
    idc = counts.var(ddof=1) / counts.mean()
    assert idc == pytest.approx(idc_exact, rel=0.15)


def test_mmpp_generator_form_and_count_mode():
    q = np.array([[-1.0, 1.0], [2.0, -2.0]])
    t = arrivals.mmpp([10.0, 100.0], q, n=200_000, rng=5)
    assert t.size == 200_000 and np.all(np.diff(t) >= 0)
    assert t.size / t[-1] == pytest.approx((10 * 2 + 100 * 1) / 3, rel=0.05)
    # Starting in a chosen state: a slow chain starting in the silent-ish state stays there first.
    slow = arrivals.mmpp([1.0, 1000.0], [1e-6, 1e-6], duration=10.0, rng=1, initial=0)
    assert slow.size < 40


def test_mmpp_single_state_is_poisson():
    t = arrivals.mmpp([50.0], [0.0], duration=2000.0, rng=2)
    counts = _window_counts(t, 1.0, 2000.0)
    assert counts.mean() == pytest.approx(50.0, rel=0.02)
    assert counts.var(ddof=1) / counts.mean() == pytest.approx(1.0, abs=0.15)


def test_steps_rates_per_segment():
    sched = [(100.0, 20.0), (50.0, 0.0), (100.0, 80.0)]
    t = arrivals.steps(sched, rng=4)
    starts, rates = arrivals.windowed_rate(t, 50.0, 250.0)
    assert starts.tolist() == [0.0, 50.0, 100.0, 150.0, 200.0]
    expect = np.array([20.0, 20.0, 0.0, 80.0, 80.0])
    assert np.all(np.abs(rates - expect) <= 4 * np.sqrt(expect / 50.0) + 1e-12)


def test_ramp_cumulative_intensity():
    r0, r1, T = 10.0, 200.0, 100.0
    t = arrivals.ramp(r0, r1, T, rng=9)
    assert np.all((t >= 0) & (t < T))
    total = 0.5 * (r0 + r1) * T
    first_half = r0 * T / 2 + (r1 - r0) / T * (T / 2) ** 2 / 2
    assert abs(t.size - total) < 4 * math.sqrt(total)
    k = int(np.sum(t < T / 2))
    assert abs(k - first_half) < 4 * math.sqrt(first_half)
    # Constant ramp degenerates to Poisson; decreasing ramp is the mirror image.
    assert abs(arrivals.ramp(30.0, 30.0, 100.0, rng=1).size - 3000) < 4 * math.sqrt(3000)
    down = arrivals.ramp(r1, r0, T, rng=9)
    assert abs(int(np.sum(down < T / 2)) - (total - first_half)) < 4 * math.sqrt(total - first_half)


@pytest.mark.parametrize(
    "call",
    [
        lambda: arrivals.poisson(-1.0, n=10),
        lambda: arrivals.poisson(float("nan"), n=10),
        lambda: arrivals.poisson(1.0),
        lambda: arrivals.poisson(1.0, n=-3),
        lambda: arrivals.steps([]),
        lambda: arrivals.steps([(0.0, 1.0)]),
        lambda: arrivals.steps([(1.0, -1.0)]),
        lambda: arrivals.ramp(-1.0, 2.0, 1.0),
        lambda: arrivals.mmpp([1.0, 2.0], [1.0], duration=1.0),
        lambda: arrivals.mmpp([1.0, 2.0], [[-1.0, 2.0], [1.0, -1.0]], duration=1.0),
        lambda: arrivals.mmpp([0.0, 0.0], [1.0, 1.0], n=5),
        lambda: arrivals.windowed_rate(np.arange(3.0), 0.0),
    ],
)
def test_bad_process_arguments(call):
    with pytest.raises(ArrivalError):
        call()
    assert issubclass(ArrivalError, ModelError)


def _ns_independent(path: Path) -> np.ndarray:
    """Timestamps in ns parsed by hand (no numpy datetime), to check the vectorised reader."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        stamp = line.split(",")[0]
        day, clock = stamp.split(" ")
        hh, mm, ss = clock.split(":")
        whole, frac = ss.split(".")
        d = int(day.split("-")[2])
        ns = (((d * 24 + int(hh)) * 60 + int(mm)) * 60 + int(whole)) * 10**9 + int(frac.ljust(9, "0"))
        out.append(ns)
    return np.asarray(out, dtype=np.int64)


@needs_traces
@pytest.mark.parametrize("path", [CODE, CONV])
def test_trace_reproduces_interarrivals(path):
    ns = _ns_independent(path)
    gaps = np.diff(ns) * 1e-9
    t = arrivals.trace(path)
    assert t.size == ns.size and t[0] == 0.0
    assert np.allclose(np.diff(t), gaps, rtol=0, atol=1e-9)
    fast = arrivals.trace(path, time_scale=4.0)
    assert np.allclose(np.diff(fast), gaps / 4.0, rtol=0, atol=1e-9)
    scaled = arrivals.trace(path, target_rate=123.0)
    assert (scaled.size - 1) / scaled[-1] == pytest.approx(123.0, rel=1e-12)
    assert np.allclose(np.diff(scaled) / np.diff(scaled).mean(), gaps / gaps.mean())


@needs_traces
def test_trace_start_and_limit():
    ns = _ns_independent(CONV)
    t = arrivals.trace(CONV, start=100, limit=50)
    assert t.size == 50 and t[0] == 0.0
    assert np.allclose(t, (ns[100:150] - ns[100]) * 1e-9, atol=1e-9)
    assert arrivals.trace(CONV, start=ns.size - 3).size == 3
    with pytest.raises(ArrivalError, match="past the end"):
        arrivals.trace(CONV, start=ns.size)


@needs_traces
def test_trace_mean_rate_matches_readme():
    # The README gives 8,819 requests over 57.3 min (2.57 req/s) for the code trace.
    t = arrivals.trace(CODE)
    assert t.size == 8819
    assert t.size / t[-1] == pytest.approx(2.57, abs=0.01)


def test_bad_trace_files(tmp_path):
    cases = {
        "empty.csv": "",
        "header_only.csv": "TIMESTAMP,ContextTokens\n",
        "garbage.csv": "TIMESTAMP,x\n2023-11-16 18:17:03.9799600,1\nnot a time,2\n",
        "unsorted.csv": "TIMESTAMP,x\n2023-11-16 18:17:03.9799600,1\n2023-11-16 18:17:02.0000000,2\n",
        "nocol.csv": "TIME,x\n2023-11-16 18:17:03.9799600,1\n",
    }
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(ArrivalError):
            arrivals.trace(p)
    with pytest.raises(ArrivalError, match="cannot read"):
        arrivals.trace(tmp_path / "missing.csv")
    one = tmp_path / "one.csv"
    one.write_text("TIMESTAMP\n2023-11-16 18:17:03.9799600\n")
    assert arrivals.trace(one).tolist() == [0.0]
    with pytest.raises(ArrivalError, match="two distinct"):
        arrivals.trace(one, target_rate=5.0)
    with pytest.raises(ArrivalError, match="not both"):
        arrivals.trace(one, time_scale=2.0, target_rate=5.0)
    with pytest.raises(ArrivalError):
        arrivals.trace(one, time_scale=0.0)


def test_windowed_rate_partial_last_window():
    t = np.arange(0.0, 10.5, 0.5)  # 2 per second on [0, 10.5)
    starts, rates = arrivals.windowed_rate(t, 4.0, 10.5)
    assert starts.tolist() == [0.0, 4.0, 8.0]
    assert rates.tolist() == pytest.approx([2.0, 2.0, 2.0])


def _arrivals_bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "arrivals_bench.py"
    spec = importlib.util.spec_from_file_location("arrivals_bench_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_synthetic_stream_written_as_trace_replays_the_same_arrivals(tmp_path):
    """The synthetic stream the bench writes for `smdp trace-bench --trace` reads back as the same times, groups kept."""
    bench = _arrivals_bench()
    times = bench.synthetic_stream("mmpp:210,30:0.5,1:3,1.2", 1)
    assert times.size == bench.SYNTHETIC_REQUESTS
    assert np.array_equal(times, bench.synthetic_stream("mmpp:210,30:0.5,1:3,1.2", 1))
    csv = tmp_path / "synthetic.csv"
    bench.write_trace_csv(times, csv)
    back = arrivals.trace(csv)
    np.testing.assert_allclose(back, times - times[0], atol=1e-9)
    assert np.count_nonzero(np.diff(back) == 0) == np.count_nonzero(np.diff(times) == 0) > 1000  # groups of ~3
    rescaled = arrivals.trace(csv, target_rate=150.0)
    assert (rescaled.size - 1) / rescaled[-1] == pytest.approx(150.0)
    with pytest.raises(SystemExit, match="needs an mmpp spec"):
        bench.synthetic_stream("batch:3", 1)
