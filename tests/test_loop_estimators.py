"""Online estimators on synthetic streams: rate CI coverage, change detection, affine fit, metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from plugin.loop.telemetry import PowerSource, gpu_metrics, parse_prometheus_text
from plugin.loop.rate import RateEstimator, poisson_rate_interval
from plugin.loop.profile import ServiceTimeEstimator
from solver.model import ServiceProfile

ROOT = Path(__file__).resolve().parent.parent
V100 = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")
V100_ROWS = (1, 2, 4, 8, 64, 128)  # the published sizes (the others are interpolated)


def poisson_times(rng: np.random.Generator, rate: float, count: int, start: float = 0.0) -> np.ndarray:
    return start + np.cumsum(rng.exponential(1.0 / rate, count))


def feed(est: RateEstimator, times: np.ndarray) -> None:
    for t in times:
        est.observe(float(t))


# -- rate -------------------------------------------------------------------------------------------


def test_garwood_interval_matches_known_values() -> None:
    # Exact 95% limits for 10 Poisson events (Garwood 1936; standard tables): 4.795 .. 18.39.
    lo, hi = poisson_rate_interval(10, 1.0)
    assert lo == pytest.approx(4.7954, abs=1e-3) and hi == pytest.approx(18.390, abs=1e-3)
    lo, hi = poisson_rate_interval(0, 2.0)
    assert lo == 0.0 and hi == pytest.approx(-math.log(0.025) / 2.0, rel=1e-9)  # 3.689 events / 2 s


def test_estimate_is_within_its_interval_most_of_the_time() -> None:
    rate, trials, covered, widths = 80.0, 300, 0, []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        est = RateEstimator(0.0, window_s=5.0)
        times = poisson_times(rng, rate, 600)
        times = times[times <= 6.0]
        feed(est, times)
        e = est.estimate(6.0)
        assert 5.0 - est.window_s / 60 <= e.span_s <= 5.0 + 1e-9
        covered += e.contains(rate)
        widths.append(e.hi - e.lo)
    # Exact intervals are conservative: nominal 95%; 300 trials put 90% far below any plausible outcome.
    assert 0.90 <= covered / trials <= 1.0
    # ... but not uselessly wide: about 2 x 1.96 sqrt(lambda T) / T.
    assert np.mean(widths) == pytest.approx(2 * 1.96 * math.sqrt(rate * 5.0) / 5.0, rel=0.1)


def test_window_forgets_the_old_rate() -> None:
    rng = np.random.default_rng(7)
    est = RateEstimator(0.0, window_s=20.0)  # no reference: detector off, pure sliding window
    first = poisson_times(rng, 50.0, 5000)
    first = first[first < 40.0]
    second = poisson_times(rng, 150.0, 20000, start=40.0)
    second = second[second < 80.0]
    feed(est, first)
    assert est.estimate(40.0).contains(50.0)
    feed(est, second)
    e = est.estimate(80.0)
    assert e.contains(150.0) and not e.contains(50.0) and e.span_s <= 20.0 + 1e-9


def test_memory_is_bounded_by_the_buckets() -> None:
    rng = np.random.default_rng(3)
    est = RateEstimator(0.0, window_s=2.0, buckets=20)
    feed(est, poisson_times(rng, 500.0, 20000))
    assert len(est._marks) <= 20 + 2
    # A silence longer than the window: the estimate drops to zero arrivals over about one window.
    last = est._last
    e = est.estimate(last + 10.0)
    assert e.n == 0 and e.rate == 0.0 and e.hi < 3.0 and len(est._marks) <= 22


def test_first_solve_is_asked_once_enough_arrivals() -> None:
    est = RateEstimator(0.0, min_arrivals=20)
    for i in range(19):
        est.observe(0.01 * (i + 1))
    assert not est.changed(0.2)
    est.observe(0.2)
    assert est.changed(0.2)
    est.reset(0.2)
    assert est.reference == pytest.approx(100.0) and not est.changed(0.2)


@pytest.mark.parametrize("seed", range(12))
def test_no_false_alarm_on_a_stationary_stream_then_a_x3_step_is_detected(seed: int) -> None:
    """Bound stated: with false_alarm_arrivals = 1e6 (h = ln 1e6 = 13.8) and ratio 2, the upper arm
    gains ln 2 - 1/3 = 0.36 per arrival at 3x the reference rate, so it fires after about 38 arrivals
    at the new rate; we require at most 100 (1/3 s at 300/s). Lorden's bound gives each arm a mean
    run of at least 1e6 arrivals between false alarms, so 20 000 stationary arrivals stay quiet."""
    rng = np.random.default_rng(seed)
    est = RateEstimator(0.0, window_s=30.0)
    est.reset(0.0, 100.0)
    before = poisson_times(rng, 100.0, 20_000)
    feed(est, before)
    assert not est.changed(float(before[-1])) and est.alarm is None
    after = poisson_times(rng, 300.0, 1000, start=float(before[-1]))
    for i, t in enumerate(after, start=1):
        est.observe(float(t))
        if est.alarm:
            break
    assert est.alarm == "up" and i <= 100, f"detected after {i} arrivals"
    # The estimate restarts at the change point: it is about the new rate, not a 30 s mix.
    e = est.estimate(float(t))
    assert e.span_s < 2.0 and 150.0 < e.rate < 600.0
    est.reset(float(t), e.rate)
    assert not est.changed(float(t))
    more = poisson_times(rng, 300.0, 3000, start=float(t))
    feed(est, more)
    assert est.estimate(float(more[-1])).contains(300.0)


@pytest.mark.parametrize("seed", range(6))
def test_a_drop_to_a_third_is_detected(seed: int) -> None:
    # Lower arm at rate/3: gains -ln 2 + 1.5 = 0.81 per arrival: about 17 arrivals; we allow 60.
    rng = np.random.default_rng(100 + seed)
    est = RateEstimator(0.0)
    est.reset(0.0, 300.0)
    before = poisson_times(rng, 300.0, 3000)
    feed(est, before)
    after = poisson_times(rng, 100.0, 500, start=float(before[-1]))
    for i, t in enumerate(after, start=1):
        est.observe(float(t))
        if est.changed(float(t)):
            break
    assert est.alarm == "down" and i <= 60


def test_silence_is_detected_without_an_arrival() -> None:
    rng = np.random.default_rng(5)
    est = RateEstimator(0.0)
    est.reset(0.0, 100.0)
    times = poisson_times(rng, 100.0, 2000)
    feed(est, times)
    last = float(times[-1])
    assert not est.changed(last + 0.05)
    # (1 - 1/2) x 100/s x gap >= 13.8 once the gap passes 0.28 s.
    assert est.changed(last + 0.3) and est.alarm == "down"
    assert est.estimate(last + 0.3).rate < 100.0


def _reported_in_batches(est: RateEstimator, times: np.ndarray, interval_s: float, tick_s: float,
                         rate: float) -> tuple[int, list[float]]:
    """Arrivals told to ``est`` in reports every ``interval_s`` (as the native gate reports them), with a
    control tick every ``tick_s`` between reports: the alarms the ticks raise, and the estimates."""
    alarms, estimates = 0, []
    report, i, tick = interval_s, 0, tick_s * 0.6
    while tick < float(times[-1]) - 1.0:
        while report <= tick:
            while i < len(times) and times[i] <= report:
                est.observe(float(times[i]))
                i += 1
            report += interval_s
        if est.changed(tick):
            alarms += 1
            est.reset(tick, rate)
        estimates.append(est.estimate(tick).rate)
        tick += tick_s
    return alarms, estimates


@pytest.mark.parametrize("interval_s,rate", [(0.05, 600.0), (0.25, 200.0)])
def test_arrivals_reported_late_are_not_a_silence(interval_s: float, rate: float) -> None:
    """Arrivals that reach the estimator in reports every interval_s: the unreported time at a tick is
    not a silence and not a lower rate once the estimator knows the lag. Without it, the lower arm
    counts the time since the last report as silence and raises an alarm at most ticks."""
    rng = np.random.default_rng(11)
    times = poisson_times(rng, rate, int(rate * 30))
    blind = RateEstimator(0.0, window_s=10.0, change_ratio=1.5, min_arrivals=30)
    blind.reset(0.0, rate)
    alarms, _ = _reported_in_batches(blind, times, interval_s, 0.25, rate)
    assert alarms > 20  # the false silences the lag causes
    aware = RateEstimator(0.0, window_s=10.0, change_ratio=1.5, min_arrivals=30, lag_s=2 * interval_s)
    aware.reset(0.0, rate)
    alarms, estimates = _reported_in_batches(aware, times, interval_s, 0.25, rate)
    assert alarms == 0
    assert abs(np.mean(estimates[len(estimates) // 2:]) / rate - 1.0) < 0.05
    # a real silence is still seen, lag_s later than without the lag: (1 - 1/2) x 100/s x gap >= 13.8
    # once the gap beyond the lag passes 0.28 s
    quiet = RateEstimator(0.0, lag_s=2 * interval_s)
    quiet.reset(0.0, 100.0)
    stream = poisson_times(rng, 100.0, 2000)
    feed(quiet, stream)
    last = float(stream[-1])
    assert not quiet.changed(last + 2 * interval_s + 0.25)
    assert quiet.changed(last + 2 * interval_s + 0.3) and quiet.alarm == "down"


def test_rate_estimator_rejects_bad_input() -> None:
    est = RateEstimator(10.0)
    est.observe(11.0)
    with pytest.raises(ValueError, match="before the previous"):
        est.observe(10.5)
    with pytest.raises(ValueError, match="before the previous"):
        est.observe(float("nan"))
    with pytest.raises(ValueError, match="window_s"):
        RateEstimator(0.0, window_s=0)
    with pytest.raises(ValueError, match="change_ratio"):
        RateEstimator(0.0, change_ratio=1.0)
    with pytest.raises(ValueError, match="confidence"):
        RateEstimator(0.0, confidence=1.0)
    with pytest.raises(ValueError, match="reference rate"):
        est.reset(12.0, -1.0)
    with pytest.raises(ValueError, match="lag_s"):
        RateEstimator(0.0, lag_s=-0.1)


# -- service time -----------------------------------------------------------------------------------


def test_affine_fit_of_the_published_table_is_inoues() -> None:
    est = ServiceTimeEstimator(128)
    for b in V100_ROWS:
        est.observe(b, V100.mean_s[b - 1])
    fit = est.fit()
    # Inoue (2021): alpha = 0.1438 ms, tau0 = 1.8874 ms, R^2 = 0.99975.
    assert fit.alpha_s == pytest.approx(0.1438e-3, abs=0.00005e-3)
    assert fit.tau0_s == pytest.approx(1.8874e-3, abs=0.00005e-3)
    assert fit.r2 == pytest.approx(0.99975, abs=0.000005)


def test_affine_fit_recovers_inoue_from_noisy_samples() -> None:
    rng = np.random.default_rng(11)
    est = ServiceTimeEstimator(128)
    cv = 0.1
    for b in V100_ROWS:
        mean = V100.mean_s[b - 1]
        est.observe_many([b] * 300, rng.gamma(1 / cv**2, mean * cv**2, 300))
    fit = est.fit()
    assert fit.n == 1800 and fit.sizes == 6
    assert fit.alpha_ci[0] <= 0.1438e-3 <= fit.alpha_ci[1]
    assert fit.tau0_ci[0] <= 1.8874e-3 <= fit.tau0_ci[1]
    assert fit.alpha_s == pytest.approx(0.1438e-3, rel=0.02) and fit.tau0_s == pytest.approx(1.8874e-3, rel=0.03)


def test_affine_fit_equals_numpy_least_squares_on_raw_samples() -> None:
    rng = np.random.default_rng(2)
    b = rng.integers(1, 17, 400)
    y = 0.5e-3 * b + 2e-3 + rng.normal(0, 2e-4, b.size)
    est = ServiceTimeEstimator(16)
    est.observe_many(b.tolist(), np.abs(y).tolist())
    fit = est.fit()
    y = np.abs(y)
    slope, intercept = np.polyfit(b, y, 1)
    r2 = 1 - np.sum((y - (slope * b + intercept)) ** 2) / np.sum((y - y.mean()) ** 2)
    assert fit.alpha_s == pytest.approx(slope, rel=1e-9) and fit.tau0_s == pytest.approx(intercept, rel=1e-9)
    assert fit.r2 == pytest.approx(r2, rel=1e-9)
    # scipy's linregress gives the same standard error of the slope.
    from scipy import stats

    lr = stats.linregress(b, y)
    half = (fit.alpha_ci[1] - fit.alpha_ci[0]) / 2
    assert half == pytest.approx(stats.t.ppf(0.975, b.size - 2) * lr.stderr, rel=1e-6)


def test_profile_blends_observed_sizes_with_the_fit() -> None:
    est = ServiceTimeEstimator(8, prior_weight=5.0)
    # Sizes 1 and 8 observed often on an exact line; size 4 seen twice, above the line.
    est.observe_many([1] * 50, [1.0e-3] * 50)
    est.observe_many([8] * 50, [4.5e-3] * 50)
    est.observe_many([4, 4], [4.0e-3, 4.0e-3])
    fit = est.fit()
    profile = est.profile(200.0, cv=0.0)
    line = fit.predict(np.arange(1, 9))
    # Unobserved sizes come from the fit, observed ones are (n mean + k fit) / (n + k).
    for b in (2, 3, 5, 6, 7):
        assert profile.mean_s[b - 1] == pytest.approx(line[b - 1])
    assert profile.mean_s[3] == pytest.approx((2 * 4.0e-3 + 5 * line[3]) / 7)
    assert profile.energy_j == pytest.approx(200.0 * profile.mean_s)
    assert profile.max_batch == 8 and profile.law == "deterministic"


def test_profile_with_one_size_needs_a_prior() -> None:
    est = ServiceTimeEstimator(64)
    est.observe_many([8] * 10, [2 * V100.mean_s[7]] * 10)  # twice as slow as the published V100
    assert est.fit() is None
    with pytest.raises(ValueError, match="two or more batch sizes"):
        est.profile(250.0)
    profile = est.profile(V100.busy_power_w[:64], prior=V100, max_batch=64)
    assert profile.mean_s[31] == pytest.approx(2 * V100.mean_s[31])
    assert profile.energy_j[31] == pytest.approx(V100.busy_power_w[31] * profile.mean_s[31])


def test_service_estimator_rejects_bad_input() -> None:
    est = ServiceTimeEstimator(4)
    for b, s in ((0, 1e-3), (5, 1e-3), (1.5, 1e-3), (1, 0.0), (1, float("inf"))):
        with pytest.raises(ValueError):
            est.observe(b, s)
    assert est.counts.sum() == 0
    with pytest.raises(ValueError, match="max_batch"):
        ServiceTimeEstimator(0)


# -- power ------------------------------------------------------------------------------------------

TRITON_METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="emulated_gpu",version="1"} 1234
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{gpu_uuid="GPU-aaaa"} 61.5
nv_gpu_power_usage{gpu_uuid="GPU-bbbb"} 38.25
# HELP nv_gpu_power_limit GPU power management limit in watts
# TYPE nv_gpu_power_limit gauge
nv_gpu_power_limit{gpu_uuid="GPU-aaaa"} 300
# HELP nv_energy_consumption GPU energy consumption in joules since the Triton Server started
# TYPE nv_energy_consumption counter
nv_energy_consumption{gpu_uuid="GPU-aaaa"} 1000.5
nv_energy_consumption{gpu_uuid="GPU-bbbb"} 2000
"""


def test_parse_prometheus_text() -> None:
    samples = parse_prometheus_text(TRITON_METRICS)
    assert len(samples) == 6
    s = samples[0]
    assert s.name == "nv_inference_request_success" and s.labels == {"model": "emulated_gpu", "version": "1"}
    assert s.value == 1234.0
    odd = parse_prometheus_text('m{a="x\\"y",b="1"} NaN 1700000000000\nplain 2.5e3\n')
    assert odd[0].labels == {"a": 'x"y', "b": "1"} and math.isnan(odd[0].value)
    assert odd[1].name == "plain" and odd[1].labels == {} and odd[1].value == 2500.0
    with pytest.raises(ValueError, match="line 2"):
        parse_prometheus_text("ok 1\nnot a sample line at all\n")


def test_gpu_metrics_sum_and_select() -> None:
    m = gpu_metrics(TRITON_METRICS)
    assert m.power_w == pytest.approx(99.75) and m.energy_j == pytest.approx(3000.5) and m.gpus == 2
    one = gpu_metrics(TRITON_METRICS, ["GPU-bbbb"])
    assert one.power_w == pytest.approx(38.25) and one.energy_j == pytest.approx(2000.0) and one.gpus == 1
    none = gpu_metrics("# CPU-only Triton\nnv_cpu_utilization 0.5\n")
    assert none.power_w is None and none.energy_j is None and none.gpus == 0


def test_power_source_measured_then_modelled() -> None:
    profile = ServiceProfile.affine(8, 1e-3, 2e-3, 0.2, 0.5)
    src = PowerSource(profile, idle_power_w=30.0, max_age_s=10.0)
    counts = np.zeros(9)
    counts[4] = 100  # 100 batches of 4: 100 x (0.8 + 0.5) J = 130 J, busy 100 x 6 ms = 0.6 s
    # No metrics: modelled = (130 J + 30 W x 9.4 s) / 10 s.
    r = src.reading(0.0, elapsed_s=10.0, batch_counts=counts, busy_s=0.6)
    assert r.modelled and r.source == "profile" and r.power_w == pytest.approx((130 + 30 * 9.4) / 10)
    # One scrape: the instantaneous gauge; two: the energy counter's slope.
    src.observe_metrics(100.0, TRITON_METRICS)
    r = src.reading(100.0, elapsed_s=10.0, batch_counts=counts, busy_s=0.6)
    assert not r.modelled and r.source == "nv_gpu_power_usage" and r.power_w == pytest.approx(99.75)
    later = TRITON_METRICS.replace("1000.5", "1500.5").replace("} 2000", "} 2300")
    src.observe_metrics(105.0, later)
    r = src.reading(105.0, elapsed_s=10.0, batch_counts=counts, busy_s=0.6)
    assert r.source == "nv_energy_consumption" and r.power_w == pytest.approx(800 / 5)
    # A stale measurement no longer counts.
    assert src.reading(200.0, elapsed_s=10.0, batch_counts=counts, busy_s=0.6).modelled
    with pytest.raises(ValueError, match="larger than the profile"):
        src.modelled(1.0, np.ones(12), 0.1)


def _first_ready_estimate(seed: int, settle: int) -> tuple[int, float]:
    """(arrivals since the change point, rate) when ``ready`` first holds after a 100 -> 300/s step."""
    rng = np.random.default_rng(300 + seed)
    est = RateEstimator(0.0, window_s=30.0, min_arrivals=20, settle_arrivals=settle)
    est.reset(0.0, 100.0)
    before = poisson_times(rng, 100.0, 5_000)
    feed(est, before)
    for t in poisson_times(rng, 300.0, 2_000, start=float(before[-1])):
        est.observe(float(t))
        if est.alarm and est.ready(float(t)):
            e = est.estimate(float(t))
            return e.n, e.rate
    raise AssertionError("the step was never ready to be solved for")


def test_a_new_regime_is_solved_for_only_once_it_has_settled() -> None:
    """Right after an alarm the estimate from the change point rests on a few arrivals and is biased
    toward the change (the CUSUM puts the point where the new regime looked strongest). ``ready``
    waits for settle_arrivals of them: over 40 steps the first estimate solved for is closer to the
    true rate than one taken at min_arrivals, and its worst case far closer (measured: mean error
    9.7% vs 14%, worst 32% vs 85%)."""
    settled = [_first_ready_estimate(seed, 100) for seed in range(40)]
    eager = [_first_ready_estimate(seed, 1) for seed in range(40)]
    assert all(n >= 100 for n, _ in settled)
    err_settled = np.array([abs(r / 300.0 - 1) for _, r in settled])
    err_eager = np.array([abs(r / 300.0 - 1) for _, r in eager])
    assert err_settled.mean() < 0.8 * err_eager.mean(), (err_settled.mean(), err_eager.mean())
    assert err_settled.max() < 0.5 * err_eager.max() and err_settled.max() < 0.4, (err_settled.max(), err_eager.max())


def test_settle_arrivals_is_validated() -> None:
    with pytest.raises(ValueError, match="settle_arrivals must be an integer >= 1, got 0"):
        RateEstimator(0.0, settle_arrivals=0)
