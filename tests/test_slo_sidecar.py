"""The sidecar's SLO loop without Triton: the controller solves for the SLO, re-solves when the rate
moves, flags an infeasible SLO, and exports what it predicted and measured."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from plugin.loop.controller import ControllerConfig, PolicyController
from plugin.latency_window import LatencyWindow
from plugin.metrics import PREFIX, SidecarMetrics, latency_buckets_with
from solver.arrivals import poisson
from solver.model import ServiceProfile
from solver.policy import greedy
from solver.slo import SloTarget

ROOT = Path(__file__).resolve().parent.parent
B = 32


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def prior() -> ServiceProfile:
    return ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv", max_batch=B)


def _controller(prior, clock, rate: float, metrics=None) -> tuple[PolicyController, list]:
    installed: list = []
    c = PolicyController(
        "m", prior,
        ControllerConfig(max_batch=B, idle_power_w=40.0, weight=1e-3, initial_rate=rate, window_s=5.0,
                         long_run_s=0.0),
        install=installed.append, clock=clock, metrics=metrics)
    return c, installed


async def _tick(c: PolicyController, now: float) -> bool:
    task = c.tick(now)
    if task is not None:
        await task
    return task is not None


def _gauge(metrics: SidecarMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(PREFIX + name, {"model": "m"})


def test_the_controller_serves_the_slo_policy_and_exports_it(prior):
    async def go():
        clock = Clock()
        metrics = SidecarMetrics(B)
        c, installed = _controller(prior, clock, 0.05 * B / prior.mean_s[-1], metrics)
        await _tick(c, clock.t)
        plain = c.current
        assert plain.slo is None and plain.max_wait_s is None
        c.set_slo(SloTarget(0.99, 0.008))
        assert await _tick(c, clock.t)
        s = c.current
        assert s.slo is not None and s.slo.feasible and s.slo.quantile_s + s.slo.ci95_s <= 0.008
        # at 5% load the mean-optimal table waits far longer than 8 ms for company: a guard cuts it
        assert s.max_wait_s is not None and 0 < s.max_wait_s < 0.008
        assert installed[-1] is s.policy and c.version == 2
        assert s.mean_power_w > plain.mean_power_w  # meeting the SLO costs power
        assert _gauge(metrics, "slo_feasible") == 1.0 and _gauge(metrics, "slo_latency_seconds") == 0.008
        assert _gauge(metrics, "slo_predicted_quantile_seconds") == pytest.approx(s.slo.quantile_s)
        # measured: a window of answers, 1% of them late
        for i in range(1000):
            c.observe_latency(clock.t - 1.0 + i * 1e-3, 0.02 if i % 100 == 0 else 0.004)
        m = c.measured_slo(clock.t)
        assert m.samples == 1000 and m.attainment == pytest.approx(0.99)
        assert c.publish_measured(clock.t) is None  # no batch stats in this test: only the SLO gauges move
        c.set_slo(None)
        assert _gauge(metrics, "slo_feasible") is None  # the SLO's series are gone
        assert await _tick(c, clock.t) and c.current.slo is None and c.current.max_wait_s is None

    asyncio.run(go())


def test_an_infeasible_slo_serves_greedy_and_says_so(prior, caplog):
    async def go():
        clock = Clock()
        metrics = SidecarMetrics(B)
        c, installed = _controller(prior, clock, 0.5 * B / prior.mean_s[-1], metrics)
        c.set_slo(SloTarget(0.99, 0.0015))  # below one batch of 1 (2.1 ms on a V100)
        await _tick(c, clock.t)
        s = c.current
        assert not s.slo.feasible and s.slo.quantile_s > 0.0015
        np.testing.assert_array_equal(installed[-1].actions, greedy(B, installed[-1].truncation).actions)
        assert "infeasible" in c.note and _gauge(metrics, "slo_feasible") == 0.0
        assert "infeasible" in caplog.text

    asyncio.run(go())


def test_the_slo_policy_is_resolved_when_the_rate_moves(prior):
    async def go():
        clock = Clock()
        cap = B / prior.mean_s[-1]
        c, installed = _controller(prior, clock, 0.05 * cap)
        c.set_slo(SloTarget(0.99, 0.01))
        await _tick(c, clock.t)
        first = c.current
        assert first.slo.feasible and first.rate_rps == pytest.approx(0.05 * cap)
        # the traffic turns out 6x higher: the estimator sees it, the SLO search runs again for it
        start = clock.t
        for t in poisson(0.3 * cap, duration=3.0, rng=np.random.default_rng(3)):
            clock.t = start + float(t)
            c.observe_arrival(clock.t)
            await _tick(c, clock.t)
        again = c.current
        assert again is not first and again.slo is not None and again.slo.feasible
        assert again.rate_rps == pytest.approx(0.3 * cap, rel=0.25)

    asyncio.run(go())


def test_slo_and_mean_latency_target_exclude_each_other(prior):
    c, _ = _controller(prior, Clock(), 100.0)
    c.set_slo(SloTarget(0.9, 0.01))
    c.set_latency_target(0.005)
    assert c.slo is None and c.latency_target_s == 0.005
    c.set_slo(SloTarget(0.9, 0.01))
    assert c.latency_target_s is None and c.slo == SloTarget(0.9, 0.01)
    c.set_latency_target(None)  # clearing the target leaves the SLO alone
    assert c.slo == SloTarget(0.9, 0.01)


def test_latency_window_forgets_what_left_the_window():
    w = LatencyWindow(10.0, max_samples=1000)
    assert w.summary(0.0, 0.99, 0.01) is None
    for i in range(100):
        w.add(float(i) * 0.1, 0.05 if i < 50 else 0.002)  # the slow half is the older one
    full = w.summary(9.9, 0.5, 0.01)
    assert full.samples == 100 and full.attainment == pytest.approx(0.5)
    recent = w.summary(15.0, 0.99, 0.01)  # only t >= 5 s remain: all fast
    assert recent.samples == 50 and recent.attainment == 1.0 and recent.quantile_s == pytest.approx(0.002)
    capped = LatencyWindow(10.0, max_samples=10)
    for i in range(100):
        capped.add(0.0, 0.001)
    assert capped.summary(0.0, 0.5, 0.01).samples == 10
    with pytest.raises(ValueError):
        LatencyWindow(0.0)


def test_excess_window_pools_answers_over_their_own_predictions():
    from plugin.latency_window import ExcessWindow

    w = ExcessWindow(10.0)
    assert w.gap(0.0, 0.99, min_samples=200, tail_samples=5.0) is None
    # two policies: the same 2 ms excess over each one's own prediction
    for t, predicted_q, predicted_mean in ((1.0, 0.010, 0.006), (2.0, 0.020, 0.012)):
        for _ in range(150):
            w.add(t, predicted_q + 0.002, predicted_q, predicted_mean)
    g = w.gap(2.0, 0.99, min_samples=200, tail_samples=5.0)  # 300 answers: the mean's excess, 4-10 ms
    assert not g.at_quantile and g.samples == 300 and g.excess_s == pytest.approx(0.008)
    for x in np.linspace(0.0, 0.004, 300):  # 600 in all: the tail's excess
        w.add(3.0, 0.030 + x, 0.030, 0.020)
    g = w.gap(3.0, 0.99, min_samples=200, tail_samples=5.0)
    assert g.at_quantile and g.samples == 600
    assert g.excess_s == pytest.approx(float(np.quantile(np.r_[np.full(300, 0.002), np.linspace(0, 0.004, 300)], 0.99)))
    assert 0 < g.ci95_s < 0.002
    assert w.gap(12.5, 0.99, min_samples=200, tail_samples=5.0).samples == 300  # t = 1 and 2 left the window
    w.clear()
    assert w.gap(12.5, 0.99, min_samples=200, tail_samples=5.0) is None


def test_histogram_buckets_carry_the_slo_edge():
    edges = latency_buckets_with([0.05, 0.013])
    assert 0.013 in edges and 0.05 in edges and list(edges) == sorted(set(edges))
    m = SidecarMetrics(B, latency_buckets_s=edges)
    m.request_answered("m", "OK", 0.012)
    assert m.registry.get_sample_value(PREFIX + "request_latency_seconds_bucket", {"model": "m", "le": "0.013"}) == 1
    with pytest.raises(ValueError):
        latency_buckets_with([math.nan])


def test_measured_overhead_tightens_the_searched_bound(prior):
    """Answers that run 2 ms above the model's prediction make the next search aim 2 ms below D."""
    async def go():
        clock = Clock()
        c, installed = _controller(prior, clock, 0.05 * B / prior.mean_s[-1])
        d = 0.01
        c.set_slo(SloTarget(0.99, d))
        await _tick(c, clock.t)
        first = c.current
        assert c.slo_offset_s == 0.0
        rng = np.random.default_rng(1)
        for i in range(300):  # the policy in force, measured: its predicted mean plus 2 ms, with noise
            c.observe_latency(clock.t + 0.001 * i, first.mean_latency_s + 0.002 + rng.normal(0, 0.001))
        clock.t += 0.5
        assert await _tick(c, clock.t)  # the offset moved by more than 2% of D: solved again at once
        assert c.slo_offset_s == pytest.approx(0.002, abs=3e-4)
        again = c.current
        assert again.slo.quantile_s + again.slo.ci95_s <= d - c.slo_offset_s
        assert f"D - 0.00 ms margin - {c.slo_offset_s * 1e3:.2f} ms" in c.note
        # the same excess measured under the new policy changes nothing
        clock.t += 6.0  # the window (5 s) has forgotten the older answers
        for i in range(300):
            c.observe_latency(clock.t + 0.001 * i, again.mean_latency_s + 0.002 + rng.normal(0, 0.001))
        clock.t += 1.5
        assert not await _tick(c, clock.t)
        # with enough answers for the tail, its q-quantile counts: 3 ms above the predicted one
        # (the mean of these answers is far below the prediction, and that no longer matters)
        clock.t += 6.0
        top = (again.slo.quantile_s + 0.003) / 0.99
        for x in rng.permutation(np.linspace(0.0, top, 801)):
            c.observe_latency(clock.t, float(x))
        clock.t += 1.0
        assert await _tick(c, clock.t)
        assert c.slo_offset_s == pytest.approx(0.003, abs=2e-4)
        third = c.current
        assert third.slo.quantile_s + third.slo.ci95_s <= d - c.slo_offset_s
        # it measured 0.5 ms above the new prediction: the correction comes down to that
        clock.t += 6.0  # the window (5 s) has forgotten the older answers
        top = (third.slo.quantile_s + 0.0005) / 0.99
        for x in rng.permutation(np.linspace(0.0, top, 801)):
            c.observe_latency(clock.t, float(x))
        clock.t += 1.0
        assert await _tick(c, clock.t)
        assert c.slo_offset_s == pytest.approx(0.0005, abs=2e-4)
        # the answers of the policy before still count after the re-solve: nothing new to act on
        clock.t += 1.0
        assert not await _tick(c, clock.t)
        assert c.excess.gap(clock.t, 0.99, min_samples=200, tail_samples=5.0).samples == 801
        c.set_slo(SloTarget(0.99, d))
        assert c.slo_offset_s == 0.0  # a new SLO starts from the model again

    asyncio.run(go())


def test_the_slo_search_assumes_the_measured_spread_of_batch_times(prior):
    from plugin.loop.controller import LearningConfig

    async def go():
        clock = Clock()
        c = PolicyController(
            "m", prior,
            ControllerConfig(max_batch=B, idle_power_w=40.0, weight=1e-3, initial_rate=0.3 * B / prior.mean_s[-1],
                             window_s=5.0, long_run_s=0.0,
                             learning=LearningConfig(min_samples=30, telemetry_interval_s=1e9)),
            install=lambda p: None, clock=clock)
        assert c.slo_service_cv() is None  # nothing measured: the profile's own law
        c.set_slo(SloTarget(0.99, 0.015))
        await _tick(c, clock.t)
        tight = c.current
        rng = np.random.default_rng(2)
        for b in (8, 16):
            tau = float(prior.mean_s[b - 1])
            for x in rng.gamma(1 / 0.6**2, tau * 0.6**2, size=400):  # CV 0.6 around the profile's means
                c.observe_batch(b, float(x))
        assert c.slo_service_cv() == pytest.approx(0.6, rel=0.15)
        c.set_slo(SloTarget(0.99, 0.015))  # solve again, now with the measured spread
        await _tick(c, clock.t)
        spread = c.current
        # the same SLO under the wider law: still met by prediction, and the tail it predicts is longer
        # (D = 15 ms leaves both searches their unguarded w table: the difference is the law alone)
        assert spread.slo.quantile_s + spread.slo.ci95_s <= 0.015 and spread.max_wait_s is None
        assert spread.slo.quantile_s - spread.slo.ci95_s > tight.slo.quantile_s + tight.slo.ci95_s
        assert spread.mean_latency_s > tight.mean_latency_s

    asyncio.run(go())


def test_the_slo_search_runs_in_a_worker_process_with_the_same_answer(prior):
    """The sidecar's SLO search runs off its GIL, in a process of its own, and finds what solve_slo finds."""
    import os

    from plugin.loop import slo_search
    from solver.model import BatchingModel
    from solver.slo import solve_slo

    model = BatchingModel(rate=0.05 * B / prior.mean_s[-1], max_batch=B, profile=prior, idle_power_w=40.0, weight=0.1)
    target = SloTarget(0.99, 0.02, 0.001)

    async def go():
        return await slo_search.search(model, target)

    try:
        there = asyncio.run(go())
        assert slo_search._executor().submit(os.getpid).result(timeout=30) != os.getpid()
    finally:
        slo_search.shutdown()
    here = solve_slo(model, target)
    assert there.feasible == here.feasible and there.max_wait_s == here.max_wait_s
    np.testing.assert_array_equal(there.policy.actions, here.policy.actions)
    assert there.target == target


def test_a_correction_that_leaves_no_policy_falls_back_to_d_minus_margin(prior):
    """A stalled host can make the measured excess larger than any policy can take back; the SLO
    policy for D - margin is served then, not greedy (which would only add load)."""
    async def go():
        clock = Clock()
        c, installed = _controller(prior, clock, 0.05 * B / prior.mean_s[-1])
        c.set_slo(SloTarget(0.99, 0.01, 0.001))
        await _tick(c, clock.t)
        first = c.current
        assert first.slo.feasible
        c.slo_offset_s = 0.0085  # leaves 0.5 ms: below one batch of one
        c._dirty = True
        clock.t += 1.0
        assert await _tick(c, clock.t)
        now = c.current
        assert now.slo.feasible and now.slo.quantile_s + now.slo.ci95_s <= 0.009
        assert now.max_wait_s == first.max_wait_s
        assert "searched for D - margin only" in c.note and c.slo_offset_s == 0.0085

    asyncio.run(go())


def test_stall_log_finds_the_lives_a_stall_or_its_wake_touched():
    from plugin.stalls import StallLog

    log = StallLog(10.0)
    assert log.overrun(1.0, 1.0004, 0.001) == 0.0 and len(log) == 0  # within the threshold: no stall
    assert log.overrun(1.0, 1.3, 0.001) == pytest.approx(0.299)  # the part beyond due + threshold
    log.add(1.2, 1.5)  # overlaps the first: merged into 1.001-1.5, its wake to 1.999
    log.add(2.5, 2.6)  # wake to 2.7
    lives = [(0.0, 0.5), (0.9, 1.01), (1.1, 1.2), (1.95, 2.0), (2.0, 2.4), (2.65, 3.0), (2.75, 3.0), (0.0, 4.0)]
    begins, ends = np.array(lives).T
    assert log.touched(begins, ends).tolist() == [False, True, True, True, False, True, False, True]
    assert log.covered_s(0.0, 4.0) == pytest.approx(0.499 + 0.1)
    assert log.covered_s(1.4, 2.55) == pytest.approx(0.1 + 0.05)
    assert not log.touched(np.array([3.0]), np.array([3.1])).any() and len(log) == 3
    # stalls that ended a window (10 s) before the earliest life asked about are gone for good
    assert not log.touched(np.array([12.55]), np.array([13.0])).any() and len(log) == 1
    with pytest.raises(ValueError):
        StallLog(0.0)


def test_excess_window_leaves_the_answers_a_stall_touched_out():
    from plugin.latency_window import ExcessWindow
    from plugin.stalls import StallLog

    w, stalls = ExcessWindow(10.0), StallLog(10.0)
    rng = np.random.default_rng(3)
    # 2,000 answers over 10 s, at most 1 ms above a 20 ms predicted quantile; a 300 ms stall at 5 s
    # holds up those in flight or arriving during it, and those just after it wait behind the backlog
    begin = np.sort(rng.uniform(0.0, 9.9, 2000))
    lat = rng.uniform(0.0, 0.021, 2000)
    stalls.add(5.0, 5.3)
    hit = (begin < 5.3) & (begin + lat > 5.0)
    lat = np.where(hit, lat + 5.3 - np.maximum(begin, 5.0), lat)
    backlog = (begin >= 5.3) & (begin < 5.5)
    lat = np.where(backlog, lat + 0.05, lat)
    for t, x in sorted(zip(begin + lat, lat)):
        w.add(float(t), float(x), 0.020, 0.010)
    g = w.gap(10.0, 0.99, min_samples=200, tail_samples=5.0, stalls=stalls)
    plain = w.gap(10.0, 0.99, min_samples=200, tail_samples=5.0)
    wake = (begin < 5.6) & (begin + lat > 5.0)  # the stall and as long again after it
    assert g.at_quantile and g.held_up == int(wake.sum()) > 100 and g.samples == 2000 - g.held_up
    assert g.excess_s < 0.0011  # the policy's own 1 ms tail is what is left
    assert plain.excess_s > 0.05 and g.with_stalls_s == pytest.approx(plain.excess_s)
    assert g.stalled_s == pytest.approx(0.3)
    assert plain.held_up == 0 and plain.with_stalls_s == pytest.approx(plain.excess_s)


def test_a_host_stall_does_not_drive_the_correction_but_a_slower_path_does(prior):
    """A batch held up 300 ms (Triton paused) holds up every answer in flight: over the window that
    is far more than 1% of the answers, yet the correction stays where the policy's own tail puts it.
    The same answers running 2 ms late without any stall do raise it."""
    async def go():
        clock = Clock()
        from plugin.loop.controller import LearningConfig

        c = PolicyController(
            "m", prior,
            ControllerConfig(max_batch=B, idle_power_w=40.0, weight=1e-3, initial_rate=0.05 * B / prior.mean_s[-1],
                             window_s=5.0, long_run_s=0.0, learning=LearningConfig()),
            install=lambda p: None, clock=clock)
        d = 0.01
        c.set_slo(SloTarget(0.99, d))
        await _tick(c, clock.t)
        pol = c.current
        q = pol.slo.quantile_s
        rng = np.random.default_rng(5)
        t0 = clock.t
        # 1,500 answers over 3 s, within the predicted quantile
        begins = t0 + np.sort(rng.uniform(0.0, 3.0, 1500))
        lats = rng.uniform(0.2, 1.0, 1500) * q
        stall_end = t0 + 1.5
        expected = float(prior.mean_s[7])
        clock.t = stall_end
        c.observe_batch(8, expected + 0.3)  # a batch of 8 ran 300 ms past its time
        assert len(c.stalls) == 1
        # every answer in flight waited for it, to its end, and the next 300 ms wait behind the backlog
        hit = (begins < stall_end) & (begins + lats > stall_end - 0.3)
        lats = np.where(hit, lats + stall_end - np.maximum(begins, stall_end - 0.3), lats)
        backlog = (begins >= stall_end) & (begins < stall_end + 0.25)
        lats = np.where(backlog, lats + 0.02, lats)
        for t, x in sorted(zip(begins + lats, lats)):
            c.observe_latency(float(t), float(x))
        assert hit.mean() > 0.05
        clock.t = t0 + 3.5
        await _tick(c, clock.t)
        g = c.slo_gap
        assert g is not None and g.at_quantile and g.held_up >= (hit | backlog).sum()
        assert g.with_stalls_s > 0.25  # left in, the stall would have been the correction
        assert c.slo_offset_s == 0.0 and c.current is pol
        # the paused batch was not learned as a service time of size 8
        assert [e.n for e in c.learner.sizes(c.profile) if e.batch_size == 8] == []
        c.observe_batch(8, expected * 1.2)  # within the threshold: a service time
        assert [e.n for e in c.learner.sizes(c.profile) if e.batch_size == 8] == [1] and len(c.stalls) == 1
        # the status carries it
        from plugin.control_backend import _slo_status

        st = _slo_status(c, clock.t).message()
        assert st.stall_held_up == g.held_up and st.stalled_s > 0.29
        assert st.correction_with_stalls_s == pytest.approx(g.with_stalls_s)
        # no stall, the same answers 2 ms late: that is the path's, and the correction takes it
        clock.t += 11.0  # the window (5 s) forgets
        for t, x in zip(clock.t + np.sort(rng.uniform(0.0, 3.0, 1500)), rng.uniform(0.2, 1.0, 1500) * q + 0.002):
            c.observe_latency(float(t), float(x))
        clock.t += 3.5
        assert await _tick(c, clock.t)
        assert c.slo_offset_s == pytest.approx(0.002, abs=3e-4) and c.slo_gap.held_up == 0

    asyncio.run(go())
