"""The weight an adaptive policy is solved with when the rate moves: w x long-run rate / rate.

The operator's objective is the long-run mean response time over all requests plus w x the
time-average power. Over regimes of rate lambda_i it decomposes into per-regime objectives
W_i + w (lambda_bar / lambda_i) P_i (plugin/loop/controller.py's module doc). Checked here by exact policy
evaluation, and in the controller without a network.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from plugin.loop.controller import WEIGHT_SCALE_MAX, ControllerConfig, LearningConfig, LongRunRate, PolicyController
from solver.evaluate import evaluate
from solver.model import BatchingModel, ServiceProfile
from solver.smdp import solve

ROOT = Path(__file__).resolve().parents[1]
B = 32
P0 = 40.0


@pytest.fixture(scope="module")
def profile() -> ServiceProfile:
    """The V100 profile 10x slower, as the benches run it (capacity about 500 req/s at B = 32)."""
    base = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")
    return dataclasses.replace(base, mean_s=base.mean_s * 10, energy_j=base.energy_j * 10, samples=None).truncated(B)


def long_run_cost(profile, w: float, regimes, policies) -> float:
    """Exact long-run J of serving regime i (rate, time share) with policies[i]: request-weighted
    mean latency + w x time-weighted mean power."""
    served = latency = power = 0.0
    for (rate, share), policy in zip(regimes, policies):
        ev = evaluate(BatchingModel(rate=rate, max_batch=B, profile=profile, idle_power_w=P0, weight=w), policy)
        served += share * rate
        latency += share * rate * ev.mean_latency_s
        power += share * ev.mean_power_w
    return latency / served + w * power


@pytest.mark.parametrize("w, regimes", [
    (0.001, ((50.0, 0.5), (350.0, 0.5))),
    (0.003, ((30.0, 0.5), (400.0, 0.5))),
    (0.001, ((50.0, 0.75), (350.0, 0.25))),
])
def test_solving_each_regime_with_the_scaled_weight_beats_one_fixed_policy_and_the_naive_weight(profile, w, regimes):
    def policy(rate: float, weight: float):
        return solve(BatchingModel(rate=rate, max_batch=B, profile=profile, idle_power_w=P0, weight=weight)).policy

    mean = sum(r * f for r, f in regimes)
    fixed = long_run_cost(profile, w, regimes, [policy(mean, w)] * len(regimes))
    naive = long_run_cost(profile, w, regimes, [policy(r, w) for r, _ in regimes])
    scaled = long_run_cost(profile, w, regimes, [policy(r, w * mean / r) for r, _ in regimes])
    # the decomposition is exact, so the per-regime optimum of it is the best of all three
    assert scaled <= fixed * (1 + 1e-9) and scaled <= naive * (1 + 1e-9)
    # and the naive controller is measurably off: worse than the scaled one by more than solver noise
    assert naive > scaled * 1.001


# -- the long-run mean rate ------------------------------------------------------------------------


def test_the_long_run_rate_is_the_plain_mean_early_and_forgets_over_its_horizon():
    lr = LongRunRate(100.0)
    assert lr.rate(0.0) is None
    for i in range(200):  # 20/s for 10 s
        lr.observe(i / 20.0)
    assert lr.rate(10.0) == pytest.approx(20.0, rel=0.02)
    assert lr.rate(5.0, min_span_s=30.0) is None  # not enough history for the caller
    for i in range(1, 6001):  # then 60/s for 100 s
        lr.observe(10.0 + i / 60.0)
    # EWMA over 100 s of 10 s at 20/s then 100 s at 60/s: (20 a + 60 b) / (a + b) with the decays
    a = 100.0 * (np.exp(-100 / 100) - np.exp(-110 / 100))
    b = 100.0 * (1 - np.exp(-100 / 100))
    assert lr.rate(110.0) == pytest.approx((20 * a + 60 * b) / (a + b), rel=0.02)
    with pytest.raises(ValueError, match="long-run horizon"):
        LongRunRate(0.0)


# -- the controller ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def feed(c: PolicyController, clock: Clock, rate: float, seconds: float) -> None:
    n = int(rate * seconds)
    for i in range(1, n + 1):
        c.observe_arrival(clock.t + i / rate)
    clock.t += seconds


def controller(profile, clock, w: float, **kw) -> PolicyController:
    return PolicyController(
        "m", profile,
        ControllerConfig(max_batch=B, idle_power_w=P0, weight=w, initial_rate=350.0, window_s=5.0,
                         learning=LearningConfig(enabled=False), **kw),
        install=lambda p: None, clock=clock)


def test_a_quiet_regime_is_solved_with_the_weight_scaled_by_the_long_run_rate(profile):
    async def go():
        clock = Clock()
        w = 0.001
        c = controller(profile, clock, w)
        await _tick(c, clock.t)
        feed(c, clock, 350.0, 60.0)  # a busy minute
        await _tick(c, clock.t)
        busy = c.current
        assert busy.solved_weight == pytest.approx(w, rel=0.05)  # steady: w itself
        feed(c, clock, 50.0, 8.0)  # then quiet: the detector fires, the new regime settles
        await _tick(c, clock.t)
        quiet = c.current
        assert quiet is not busy and quiet.rate_rps == pytest.approx(50.0, rel=0.25)
        mean = c.long_run.rate(clock.t)
        assert 250.0 < mean < 350.0
        assert quiet.weight == w and quiet.solved_weight == pytest.approx(w * mean / quiet.rate_rps, rel=1e-9)
        direct = solve(BatchingModel(rate=quiet.rate_rps, max_batch=B, profile=profile, idle_power_w=P0,
                                     weight=quiet.solved_weight))
        # warm-started from the busy regime, the search may settle at a larger N: same table below it
        common = min(quiet.policy.truncation, direct.policy.truncation) + 1
        assert np.array_equal(quiet.policy.actions[:common], direct.policy.actions[:common])
        # the quiet regime's policy waits for larger batches than the naive one would: power counts more
        naive = solve(BatchingModel(rate=quiet.rate_rps, max_batch=B, profile=profile, idle_power_w=P0, weight=w))
        assert quiet.mean_batch > naive.mean_batch

    asyncio.run(go())


def test_the_scale_is_bounded_and_off_when_asked(profile):
    clock = Clock()
    c = controller(profile, clock, 0.001)
    feed(c, clock, 400.0, 30.0)
    assert c.weight_scale(1.0, clock.t) == WEIGHT_SCALE_MAX
    assert c.weight_scale(1e6, clock.t) == 1 / WEIGHT_SCALE_MAX
    assert c.weight_scale(400.0, clock.t) == pytest.approx(1.0, rel=0.02)
    off = controller(profile, clock, 0.001, long_run_s=0.0)
    feed(off, clock, 400.0, 30.0)
    assert off.long_run is None and off.weight_scale(1.0, clock.t) == 1.0


def test_the_latency_target_search_is_not_scaled(profile):
    async def go():
        clock = Clock()
        c = controller(profile, clock, 0.0)
        feed(c, clock, 350.0, 60.0)
        feed(c, clock, 50.0, 8.0)
        c.set_latency_target(0.2)
        await _tick(c, clock.t)
        assert c.current.solved_weight == c.current.weight  # the target is this regime's W

    asyncio.run(go())


async def _tick(c: PolicyController, now: float) -> None:
    task = c.tick(now)
    if task is not None:
        await task
