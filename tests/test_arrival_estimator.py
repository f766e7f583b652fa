"""The sidecar learns how requests clump and the adaptive gate re-solves for it (no network)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from plugin.loop.controller import ControllerConfig, LearningConfig, PolicyController
from plugin.arrival_estimator import GroupEstimator
from solver import arrivals
from solver.arrival_model import POISSON, CompoundPoisson
from solver.model import BatchingModel, ServiceProfile
from solver.smdp import solve

ROOT = Path(__file__).resolve().parents[1]
B = 32
P0 = 40.0


@pytest.fixture(scope="module")
def profile() -> ServiceProfile:
    base = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")
    return dataclasses.replace(base, mean_s=base.mean_s * 10, energy_j=base.energy_j * 10, samples=None).truncated(B)


def test_group_estimator_learns_groups_and_leaves_poisson_alone():
    est = GroupEstimator(window_gaps=0.01, max_groups=3000, min_groups=200)
    for t in arrivals.compound_poisson(200.0, CompoundPoisson(4.0), n=12_000, rng=1):
        est.observe(float(t))
    g, half = est.mean_group()
    assert abs(g - 4.0) <= 1.5 * half and half < 0.3
    assert est.index_of_dispersion() == pytest.approx(7.0, rel=0.15)  # E[X^2]/E[X] of geometric(mean 4)
    learned = est.model()
    assert isinstance(learned, CompoundPoisson) and learned.group_mean == pytest.approx(g)

    plain = GroupEstimator(window_gaps=0.01, min_groups=200)
    for t in arrivals.poisson(200.0, n=12_000, rng=2):
        plain.observe(float(t))
    assert plain.mean_group()[0] < 1.05 and plain.model() is POISSON
    few = GroupEstimator(min_groups=200)
    for t in (0.0, 0.0, 0.0, 1.0):
        few.observe(t)
    assert few.mean_group() is None and few.model() is POISSON
    with pytest.raises(ValueError):
        GroupEstimator(window_gaps=0.0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_adaptive_gate_resolves_for_the_learned_groups(profile):
    async def go():
        clock = Clock()
        c = PolicyController(
            "m", profile,
            ControllerConfig(max_batch=B, idle_power_w=P0, weight=1e-3, initial_rate=200.0, window_s=5.0,
                             learning=LearningConfig(enabled=False), long_run_s=0.0, group_window_gaps=0.01),
            install=lambda p: None, clock=clock)
        task = c.tick(clock.t)
        await task
        assert c.current.arrivals is POISSON
        stream = arrivals.compound_poisson(200.0, CompoundPoisson(4.0), duration=40.0, rng=3)
        for t in stream:
            c.observe_arrival(clock.t + float(t))
        clock.t += 40.0
        task = c.tick(clock.t)
        assert task is not None  # a re-solve, for the learned groups
        await task
        sol = c.current
        assert isinstance(sol.arrivals, CompoundPoisson) and sol.arrivals.group_mean == pytest.approx(4.0, rel=0.15)
        direct = solve(BatchingModel(rate=sol.rate_rps, max_batch=B, profile=profile, idle_power_w=P0,
                                     weight=sol.solved_weight, arrivals=sol.arrivals))
        assert sol.gain == pytest.approx(direct.gain, rel=1e-9)
        poisson = solve(BatchingModel(rate=sol.rate_rps, max_batch=B, profile=profile, idle_power_w=P0,
                                      weight=sol.solved_weight))
        assert sol.mean_latency_s > poisson.mean_latency_s  # groups queue longer: the prediction says so
        text = c.learning_summary(clock.t)
        assert "arrivals: mean group" in text and "policy solved for batch:empirical" in text
        off = PolicyController(
            "m", profile,
            ControllerConfig(max_batch=B, idle_power_w=P0, weight=1e-3, initial_rate=200.0,
                             learning=LearningConfig(enabled=False)),
            install=lambda p: None, clock=clock)
        assert off.groups is None and off.arrival_model() is POISSON

    asyncio.run(go())


def test_adaptive_gate_solves_phase_blind_for_a_fitted_mmpp(profile):
    from solver.arrival_model import MMPP2
    from solver.mmpp import evaluate_mmpp

    proc = MMPP2((450.0, 60.0), (0.5, 1.0), (CompoundPoisson(2.0), CompoundPoisson(1.0)))  # mean 320/s

    async def go():
        clock = Clock()
        c = PolicyController(
            "m", profile,
            ControllerConfig(max_batch=B, idle_power_w=P0, weight=1e-3, initial_rate=proc.mean_rate, window_s=5.0,
                             learning=LearningConfig(enabled=False), long_run_s=0.0, group_window_gaps=0.01),
            install=lambda p: None, clock=clock)
        await c.tick(clock.t)
        assert c.modulation is not None and c.modulation.shape is None
        t, _, _ = arrivals.mmpp2_path(proc, 20_000, rng=5)
        for x in t:
            c.observe_arrival(clock.t + float(x))
        clock.t += float(t[-1])
        c.tick(clock.t)  # the fit of the last arrivals starts (off the event loop)
        await c.wait_idle()
        shape = c.modulation.shape
        assert isinstance(shape, MMPP2) and shape.rates[0] > 3 * shape.rates[1]
        c.set_weight(c.weight)  # a re-solve: it uses the fitted shape at the estimated rate
        await c.tick(clock.t)
        sol = c.current
        assert isinstance(sol.arrivals, MMPP2) and sol.arrivals.mean_rate == pytest.approx(sol.rate_rps, rel=1e-9)
        assert "phase-blind" in sol.source
        mm = BatchingModel(rate=sol.rate_rps, max_batch=B, profile=profile, idle_power_w=P0,
                           weight=sol.solved_weight, arrivals=sol.arrivals)
        assert sol.gain == pytest.approx(evaluate_mmpp(mm, sol.policy).cost, rel=1e-9)
        base = solve(mm.with_(arrivals=c.arrival_model()))  # what the gate solved before the fit
        assert sol.gain <= evaluate_mmpp(mm, base.policy).cost * (1 + 1e-12)
        assert "last fit mmpp:" in c.learning_summary(clock.t)

    asyncio.run(go())


def test_fast_switching_fits_are_clumping_not_modulation():
    from plugin.arrival_estimator import slow_phases
    from solver.arrival_model import MMPP2

    assert slow_phases(MMPP2((450.0, 60.0), (0.5, 1.0), (CompoundPoisson(2.0), CompoundPoisson(1.0))))
    assert slow_phases(MMPP2((600.0, 1e-6), (9.0, 3.0)))  # an idle phase may be short
    # jittered groups read as phases of a fraction of an arrival, switching thousands of times a second
    assert not slow_phases(MMPP2((446.0, 0.003), (2253.0, 298.0)))
