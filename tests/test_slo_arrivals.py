"""The tail-latency SLO under a modulated arrival model: the search judges its candidates on the MMPP,
and the seeded adaptive gate searches under its shape (no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from plugin.loop.controller import ControllerConfig, LearningConfig, PolicyController
from solver import arrivals
from solver.arrival_model import MMPP2, POISSON
from solver.errors import ModelError
from solver.model import BatchingModel, ServiceProfile
from solver.simulate import simulate_latencies
from solver.slo import SloTarget, fresh_figures, solve_slo
from solver.smdp import solve

ROOT = Path(__file__).resolve().parents[1]
B = 32
P0 = 40.0
W = 1e-3
SLOW = MMPP2((300.0, 60.0), (1.0, 1.0))
"""Mean 180/s: a busy phase and a slow one of a second each; in the slow phase the mean-optimal table
waits for a batch to fill for long, which Poisson at the mean rate does not see."""


@pytest.fixture(scope="module")
def profile() -> ServiceProfile:
    base = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")
    return dataclasses.replace(base, mean_s=base.mean_s * 10, energy_j=base.energy_j * 10, samples=None).truncated(B)


def _p99(profile, rule, times) -> float:
    sim, _ = simulate_latencies(profile, rule, times, idle_power_w=P0, weight=W, seed=5, warmup=2.0)
    return sim.p99_latency_s


def test_the_slo_search_under_an_mmpp_meets_d_where_the_poisson_search_misses(profile):
    """p99 <= 90 ms at 180/s: under Poisson the unguarded mean-optimal table meets it, so the Poisson
    search serves it; on the MMPP's own paths its p99 is far above. The search under the MMPP picks a
    table (solved for Poisson at the mean rate, at a weight of its ladder) and a guard that meet D on
    an independent path of the MMPP."""
    model = BatchingModel(SLOW.mean_rate, B, profile, P0, W, arrivals=SLOW)
    target = SloTarget(0.99, 0.09)
    aware = solve_slo(model, target)
    blind = solve_slo(model.with_(arrivals=POISSON), target)
    fresh = arrivals.from_model(SLOW, 0.0, 60_000, rng=99)  # not the search's path
    assert aware.feasible and aware.chosen.max_wait_s is not None
    assert _p99(profile, aware.chosen.rule, fresh) <= target.latency_s
    assert blind.feasible and _p99(profile, blind.chosen.rule, fresh) > 1.3 * target.latency_s
    # the family's tables are the Poisson-solved ones (a phase-blind gate runs them)
    c = aware.chosen
    np.testing.assert_array_equal(
        c.policy.actions, solve(model.with_(arrivals=POISSON, weight=c.table_weight)).policy.actions[:c.policy.actions.size])
    # every candidate is judged on the MMPP: the chosen one is the least J among the feasible ones
    assert c.cost == min(x.cost for x in aware.candidates if x.feasible)


def test_an_slo_no_policy_meets_under_the_mmpp_is_flagged_and_exact_judging_is_refused(profile):
    model = BatchingModel(SLOW.mean_rate, B, profile, P0, W, arrivals=SLOW)
    res = solve_slo(model, SloTarget(0.99, 0.06))  # the slow phase's batches alone take most of it
    assert not res.feasible and math.isnan(res.chosen.table_weight) and res.chosen.max_wait_s is None
    with pytest.raises(ModelError, match="assumes Poisson"):
        solve_slo(model, SloTarget(0.99, 0.09), method="exact")


def test_the_seeded_gate_searches_the_slo_under_its_shape_and_swings_do_not_re_search(profile):
    """With ``arrivals`` given and an SLO set, the first search is under the MMPP scaled to the rate (its
    result carries that model and a guard); the windowed rate's swings within the shape's noise ask for
    no new search."""

    class Clock:
        t = 1000.0

        def __call__(self) -> float:
            return self.t

    async def go():
        clock = Clock()
        c = PolicyController(
            "m", profile,
            ControllerConfig(max_batch=B, idle_power_w=P0, weight=W, initial_rate=SLOW.mean_rate, window_s=5.0,
                             learning=LearningConfig(enabled=False), long_run_s=600.0, group_window_gaps=0.01,
                             arrivals=SLOW),
            install=lambda p: None, clock=clock)
        c.set_slo(SloTarget(0.99, 0.09))
        await c.tick(clock.t)
        sol = c.current
        assert isinstance(sol.arrivals, MMPP2) and sol.arrivals.switching == SLOW.switching
        assert sol.arrivals.mean_rate == pytest.approx(SLOW.mean_rate, rel=1e-9)
        assert sol.slo is not None and sol.slo.feasible and sol.max_wait_s is not None
        assert "policy solved for mmpp:" in c.learning_summary(clock.t)
        c.modulation.min_arrivals = 10**9  # no online fits here
        version = c.version
        start = clock.t
        for x in arrivals.from_model(SLOW, 0.0, 4_000, rng=4):  # about 20 s of the seeded process itself
            c.observe_arrival(start + float(x))
            if start + float(x) >= clock.t + 0.25:  # ticking every 0.25 s, as the loop does
                clock.t = start + float(x)
                task = c.tick(clock.t)
                if task is not None:
                    await task
        assert clock.t > start + 15.0
        assert c.version == version  # its own swings are the modulation searched for

    asyncio.run(go())


def test_the_trace_bench_predicts_the_seeded_slo_gate_by_the_search_under_the_fit(profile):
    from loadtest.contenders import slo_prediction
    from loadtest.trace_bench import seeded_slo_prediction

    model = BatchingModel(SLOW.mean_rate, B, profile, P0, W)
    target = SloTarget(0.99, 0.09)
    got = seeded_slo_prediction(model, SLOW.spec, target)
    chosen = solve_slo(model.with_(arrivals=SLOW), target).chosen
    assert chosen.max_wait_s is not None  # guarded: judged again on fresh paths, not the search's own
    want = fresh_figures(model.with_(arrivals=SLOW), chosen, 0.99)
    assert got.mean_latency_s == want.mean_latency_s and got.cost == want.cost and got.source == "sim"
    assert got.mean_latency_s != chosen.mean_latency_s
    # not the Poisson reference's figures: the MMPP's slow phases lengthen the waits
    assert got.mean_latency_s != slo_prediction(model, target, 0).mean_latency_s
    assert seeded_slo_prediction(model, "poisson", target).cost == slo_prediction(model, target, 0).cost
    # a bound the unguarded mean-optimal table meets: its figures are the exact evaluation under the fit
    from solver.mmpp import evaluate_mmpp

    loose = seeded_slo_prediction(model, SLOW.spec, SloTarget(0.99, 1.0))
    ev = evaluate_mmpp(model.with_(arrivals=SLOW), solve(model).policy)
    assert loose.source == "exact" and loose.mean_latency_s == pytest.approx(ev.mean_latency_s, rel=1e-12)
