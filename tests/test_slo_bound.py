"""An SLO bound derived from the model (``solver.slo_bound``, ``slo.bound: best_delay``): the least-J
Triton delay's predicted quantile on the search's own path, the search for it, the delay served where
the search cannot do better, and the adaptive gate re-deriving it as its fit moves (no network)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from plugin.config import SloConfig
from plugin.control_backend import _slo_status
from plugin.loop.controller import ControllerConfig, LearningConfig, PolicyController
from plugin.policies import best_delay_slo
from solver import arrivals
from solver.arrival_model import MMPP2, parse_arrivals
from solver.errors import ModelError
from solver.model import BatchingModel, ServiceProfile
from solver.policy import TRITON_CATCH_SHARE, GateRule, MaxWaitGuard, PolicyTable, TimeoutRule, TritonBatcher
from solver.simulate import simulate_latencies
from solver.slo import search_path
from solver.slo_bound import BestDelaySlo, delay_rule, derive_bound, solve_best_delay_slo

ROOT = Path(__file__).resolve().parents[1]
B = 32
P0 = 40.0
W = 1e-3
DELAYS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05)
SLOW = MMPP2((300.0, 60.0), (1.0, 1.0))
CLUMPED = parse_arrivals("mmpp:210,30:0.5,1:3,1.2")
"""The synthetic stream of the trace bench: a busy phase in groups of 3, a slow one in groups of 1.2."""


@pytest.fixture(scope="module")
def profile() -> ServiceProfile:
    base = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")
    return dataclasses.replace(base, mean_s=base.mean_s * 10, energy_j=base.energy_j * 10, samples=None).truncated(B)


def _model(profile, arrivals=None, rate=None) -> BatchingModel:
    if arrivals is None:
        return BatchingModel(rate or SLOW.mean_rate, B, profile, P0, W)
    return BatchingModel(arrivals.mean_rate, B, profile, P0, W, arrivals=arrivals)



class Clock:
    """The controller's injected clock, moved by hand."""

    t = 1000.0

    def __call__(self) -> float:
        return self.t

def test_a_delay_as_a_gate_rule_is_tritons_timeout(profile):
    """The full-batch table guarded by d (greedy for d = 0) decides as Triton's delay d: the same
    latencies request by request, and the same table and timer for the gate."""
    times = np.cumsum(np.random.default_rng(3).exponential(1 / 150.0, 6_000))
    for d in (0.0, 0.02):
        table, guard = delay_rule(B, d)
        ours = table if guard is None else MaxWaitGuard(table, guard)
        _, a = simulate_latencies(profile, ours, times, idle_power_w=P0, weight=W, seed=1)
        _, b = simulate_latencies(profile, TimeoutRule(B, d), times, idle_power_w=P0, weight=W, seed=1)
        np.testing.assert_array_equal(a, b)
    g, t = GateRule.of(MaxWaitGuard(*delay_rule(B, 0.02))), GateRule.of(TimeoutRule(B, 0.02))
    assert (g.table, g.beyond, g.max_wait_s) == (t.table, t.beyond, t.max_wait_s)


def test_the_bound_is_the_least_j_delays_quantile_on_the_searchs_own_path(profile):
    """Recomputed by hand: every delay simulated as Triton runs it (``TritonBatcher``) on ``search_path``'s
    arrivals (the seed the search uses), the least J kept, its empirical quantile the bound, and the same
    delay as the gate runs it (``TimeoutRule``'s decisions) on that path; D adds the margin and the
    correction, the search is for the quantile itself. Under the modulated process the same delays have a
    longer tail, and Triton's is longer than the gate's."""
    rule = BestDelaySlo(0.99, DELAYS, margin_s=0.004)
    model = _model(profile, SLOW)
    bound = derive_bound(model, rule, seed=2)
    arr, warm = search_path(model, 0.99, seed=2)
    assert arr.size >= 100_000  # an MMPP's path is five times the Poisson one's

    def by_hand(rule):
        sim, lat = simulate_latencies(profile, rule, arr, idle_power_w=P0, weight=W, seed=2, warmup=warm)
        return sim.mean_latency_s + W * sim.mean_power_w, float(np.quantile(lat, 0.99))

    triton = {d: by_hand(TritonBatcher(B, d)) for d in DELAYS}
    least = min(triton, key=lambda d: triton[d][0])
    assert bound.best.delay_s == least
    assert bound.quantile_s == pytest.approx(triton[least][1], rel=1e-12)
    assert [p.cost for p in bound.delays] == pytest.approx([triton[d][0] for d in DELAYS], rel=1e-12)
    gate = by_hand(TimeoutRule(B, least))
    assert (bound.gate_delay.delay_s, bound.gate_delay.cost) == (least, pytest.approx(gate[0], rel=1e-12))
    assert bound.gate_delay.estimate.quantile_s == pytest.approx(gate[1], rel=1e-12)
    assert gate[1] < bound.quantile_s and gate[0] < bound.best.cost
    # Triton catching every free instance is the TimeoutRule: the two figures coincide
    always = derive_bound(model, dataclasses.replace(rule, catch_share=1.0), seed=2)
    assert always.best.delay_s == always.gate_delay.delay_s
    assert always.quantile_s == always.gate_delay.estimate.quantile_s and always.best.cost == always.gate_delay.cost
    target = bound.target(0.003)
    assert target.latency_s == pytest.approx(bound.quantile_s + 0.004 + 0.003)
    assert target.budget_s == pytest.approx(bound.quantile_s)
    # a delay served directly carries 1.5 ms beyond its model, the gate its 4 ms margin: D is the delay's
    # quantile + 1.5 ms (+ the correction), and the gate is searched 2.5 ms inside the delay's quantile
    direct = dataclasses.replace(bound, rule=dataclasses.replace(rule, direct_extra_s=0.0015)).target(0.003)
    assert direct.latency_s == pytest.approx(bound.quantile_s + 0.0015 + 0.003)
    assert direct.margin_s == pytest.approx(0.004 + 0.003)
    assert direct.budget_s == pytest.approx(bound.quantile_s - 0.0025)
    assert dataclasses.replace(rule, direct_extra_s=0.0).direct_s == 0.0 and rule.direct_s == 0.004
    too_wide = dataclasses.replace(rule, margin_s=bound.quantile_s + 0.001, direct_extra_s=0.0)
    with pytest.raises(ModelError, match="leave nothing within the gate's margin"):
        dataclasses.replace(bound, rule=too_wide).target()
    assert bound.arrivals == SLOW.spec and "Triton delay" in bound.describe()
    poisson = derive_bound(_model(profile), rule, seed=2)
    assert poisson.arrivals == "poisson" and poisson.quantile_s < bound.quantile_s


def test_the_search_pick_is_served_when_it_beats_the_delay_on_both(profile):
    """Poisson and the strongly modulated MMPP: the search meets the delay's quantile (its upper 95%
    bound within it) at a lower J, and that pick is served."""
    rule = BestDelaySlo(0.99, DELAYS)
    for arrivals in (None, SLOW):
        res = solve_best_delay_slo(_model(profile, arrivals), rule)
        c = res.result.chosen
        assert not res.delay_served and res.result is res.search and res.result.feasible
        assert c.cost < res.bound.best.cost
        assert c.estimate.upper_s <= res.bound.quantile_s
        assert c.cost == min(x.cost for x in res.search.candidates if x.feasible)


def test_the_delay_itself_is_served_where_the_search_cannot_beat_it(profile):
    """Where Triton catches every free instance (``catch_share`` 1: Triton's delay is the gate's), on the
    clumped stream the search's feasible pick costs more J than the best delay; with greedy the only delay,
    no searched policy meets its tail. Both times the delay is served, as a gate rule equal to Triton's,
    with the delay's own figures, and the search's verdict is kept for status."""
    clumped = solve_best_delay_slo(_model(profile, CLUMPED), BestDelaySlo(0.99, DELAYS, catch_share=1.0))
    assert clumped.delay_served and clumped.search.feasible
    assert clumped.search.chosen.cost > clumped.bound.best.cost
    greedy_only = solve_best_delay_slo(_model(profile, SLOW), BestDelaySlo(0.99, (0.0,), catch_share=1.0))
    assert greedy_only.delay_served and not greedy_only.search.feasible
    for res in (clumped, greedy_only):
        c, best = res.result.chosen, res.bound.best
        assert res.bound.gate_delay.cost == best.cost
        assert res.result.feasible and c.cost == best.cost and c.estimate.quantile_s == best.estimate.quantile_s
        gate, triton = GateRule.of(c.rule), TimeoutRule(B, best.delay_s)
        for n in range(B + 3):
            for wait in (0.0, 0.5 * best.delay_s, best.delay_s, 0.1):
                assert gate.decide(n, wait).serve == triton.decide(n, wait).serve
        out = res.to_dict()
        assert out["delay_served"] is True and out["best_delay_s"] == best.delay_s
        assert out["slo_latency_s"] == pytest.approx(best.estimate.quantile_s)


def test_a_delay_that_misses_the_budget_by_the_hop_gives_way_to_a_search_pick_that_meets_it(profile):
    """Where the gate's margin holds more than a direct client's extra (a longer hop through the sidecar),
    the budget sits below the delay's quantile. On the clumped stream where Triton catches every free
    instance the delay would otherwise be served (its J is the lowest); now it misses the budget, so the
    search's feasible pick is served at a higher J. With a margin no policy can meet, the delay is served,
    flagged infeasible: not greedy, since the gap is the hop, which no policy takes back."""
    rule = BestDelaySlo(0.99, DELAYS, catch_share=1.0)
    q = derive_bound(_model(profile, CLUMPED), rule).quantile_s
    # a hop 0.1 ms longer through the sidecar than to Triton (the search's pick is within the budget by less)
    tight = solve_best_delay_slo(_model(profile, CLUMPED), dataclasses.replace(rule, margin_s=1e-4,
                                                                                 direct_extra_s=0.0))
    assert tight.bound.gate_delay.estimate.quantile_s > tight.result.target.budget_s  # the delay misses it
    assert tight.search.feasible and tight.search.chosen.cost > tight.bound.gate_delay.cost
    assert not tight.delay_served and tight.result is tight.search and tight.result.feasible
    assert tight.result.chosen.estimate.upper_s <= tight.result.target.budget_s
    hopeless = solve_best_delay_slo(_model(profile, CLUMPED), dataclasses.replace(rule, margin_s=0.9 * q,
                                                                                    direct_extra_s=0.0))
    assert not hopeless.search.feasible
    assert hopeless.delay_served and not hopeless.result.feasible
    best = hopeless.bound.best
    assert hopeless.result.chosen.max_wait_s == best.delay_s and hopeless.result.chosen.cost == best.cost
    assert hopeless.to_dict()["slo_feasible"] is False
    # the same margin with a direct extra that matches it: the budget is the delay's quantile, which it meets
    matched = solve_best_delay_slo(_model(profile, CLUMPED), dataclasses.replace(rule, margin_s=1e-4,
                                                                                   direct_extra_s=1e-4))
    assert matched.delay_served and matched.result.feasible


def test_with_tritons_own_tail_the_search_beats_the_delay_on_the_clumped_stream(profile):
    """Judged as Triton runs it (the batcher sleeping through part of its instance's completions), the best
    delay's tail on the clumped stream is far longer than the same delay run by the gate; the search for
    it finds a policy within it, by its upper 95% figure, at less J than Triton's delay and the gate's."""
    res = solve_best_delay_slo(_model(profile, CLUMPED), BestDelaySlo(0.99, DELAYS))
    b, c = res.bound, res.result.chosen
    assert b.gate_delay.estimate.quantile_s < 0.85 * b.quantile_s
    assert not res.delay_served and res.result is res.search
    assert c.estimate.upper_s <= b.quantile_s and c.cost < b.gate_delay.cost < b.best.cost
    out = res.to_dict()
    assert out["best_delay_catch_share"] == TRITON_CATCH_SHARE == 0.6 and out["gate_delay_gain"] == b.gate_delay.cost
    assert out["best_delay_direct_extra_s"] == 0.0  # unset: the margin (0 here)


def test_a_bad_rule_is_refused_with_a_clear_error():
    with pytest.raises(ModelError, match="at least one Triton delay"):
        BestDelaySlo(0.99, ())
    with pytest.raises(ValueError, match="catch share"):
        BestDelaySlo(0.99, (0.01,), catch_share=-0.1)
    with pytest.raises(ModelError, match="delays must be finite"):
        BestDelaySlo(0.99, (0.01, -0.01))
    for bad in (-0.001, math.nan, math.inf, True):
        with pytest.raises(ModelError, match="direct extra .* finite number of seconds >= 0"):
            BestDelaySlo(0.99, DELAYS, direct_extra_s=bad)
    with pytest.raises(ModelError, match="strictly between 0 and 1"):
        BestDelaySlo(1.0, DELAYS)
    assert BestDelaySlo(0.99, (0.02, 0.0, 0.02)).delays_s == (0.0, 0.02)


def test_the_config_states_d_or_derives_it_never_both():
    with pytest.raises(ValidationError, match="slo.latency_s .* is required, or slo.bound: best_delay"):
        SloConfig()
    with pytest.raises(ValidationError, match="both set D"):
        SloConfig(latency_s=0.1, bound="best_delay")
    with pytest.raises(ValidationError, match="best_delay_grid_s: delays must be finite"):
        SloConfig(bound="best_delay", best_delay_grid_s=(0.01, -0.02))
    with pytest.raises(ValidationError, match="must be below slo.latency_s"):
        SloConfig(latency_s=0.01, margin_s=0.02)
    derived = SloConfig(bound="best_delay", margin_s=0.003, best_delay_grid_s=(0.02, 0.01))
    rule = best_delay_slo(derived)
    assert (rule.quantile, rule.margin_s, rule.delays_s) == (0.99, 0.003, (0.01, 0.02))
    assert (rule.catch_share, rule.direct_extra_s, rule.direct_s) == (TRITON_CATCH_SHARE, None, 0.003)
    tuned = best_delay_slo(SloConfig(bound="best_delay", margin_s=0.003, best_delay_catch_share=0.75,
                                     best_delay_direct_extra_s=0.001))
    assert (tuned.catch_share, tuned.direct_extra_s, tuned.direct_s) == (0.75, 0.001, 0.001)
    for bad in ({"best_delay_catch_share": 1.2}, {"best_delay_catch_share": -0.1},
                {"best_delay_catch_share": math.nan}, {"best_delay_direct_extra_s": -0.001}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            SloConfig(bound="best_delay", **bad)
    with pytest.raises(ValidationError, match="slo.best_delay_catch_share go with slo.bound: best_delay"):
        SloConfig(latency_s=0.05, best_delay_catch_share=0.7)
    with pytest.raises(ValidationError, match="best_delay_direct_extra_s go with slo.bound: best_delay"):
        SloConfig(latency_s=0.05, best_delay_direct_extra_s=0.001)


def test_the_adaptive_gate_derives_d_under_its_fit_and_again_when_the_fit_moves(profile):
    """Seeded with an MMPP, the controller's first SLO search derives D under the shape (status says how),
    the policy served is no worse than the delay by the model; a new shape (a re-fit) is searched again
    with D re-derived under it."""

    async def go():
        clock = Clock()
        c = PolicyController(
            "m", profile,
            ControllerConfig(max_batch=B, idle_power_w=P0, weight=W, initial_rate=SLOW.mean_rate, window_s=5.0,
                             learning=LearningConfig(enabled=False), long_run_s=600.0, group_window_gaps=0.01,
                             arrivals=SLOW),
            install=lambda p: None, clock=clock)
        c.set_slo(BestDelaySlo(0.99, DELAYS, margin_s=0.002))
        assert c.slo is None and c.slo_rule is not None
        await c.tick(clock.t)
        first = c.slo_bound
        assert first is not None and first.arrivals == SLOW.spec
        assert c.slo.latency_s == pytest.approx(first.quantile_s + 0.002)
        sol = c.current
        assert sol.slo is not None and sol.slo.feasible and isinstance(sol.arrivals, MMPP2)
        assert sol.mean_latency_s + W * sol.mean_power_w <= first.best.cost
        status = _slo_status(c, clock.t)
        assert status.latency_s == c.slo.latency_s and status.derived_bound == first.describe()
        assert "Triton delay" in status.message().derived_bound
        version = c.version
        c.modulation.min_arrivals = 10**9  # no online fits: the new shape below stands for one
        refit = MMPP2((330.0, 30.0), (1.0, 1.0))  # slower slow phase, same mean
        c.modulation.seed(refit)
        start = clock.t
        for x in arrivals.from_model(refit, 0.0, 4_000, rng=4):  # about 20 s of it, ticking every 0.25 s
            c.observe_arrival(start + float(x))
            if start + float(x) >= clock.t + 0.25:
                clock.t = start + float(x)
                task = c.tick(clock.t)
                if task is not None:
                    await task
        assert c.version > version
        second = c.slo_bound
        assert second is not first and second.arrivals != first.arrivals
        assert second.quantile_s != first.quantile_s
        assert c.slo.latency_s == pytest.approx(second.quantile_s + 0.002)
        c.set_slo(None)
        assert c.slo is None and c.slo_rule is None and _slo_status(c, clock.t) is None

    asyncio.run(go())


def test_smdp_solve_derives_the_bound_and_reports_it_in_its_json(capsys):
    import json

    from smdp.cli import main

    base = ["solve", "--profile", str(ROOT / "profiles" / "v100_resnet50.csv"), "--rate", "150", "--weight", "1e-3",
            "--max-batch", "32", "--slo-quantile", "0.99", "--slo-bound", "best_delay"]
    assert main([*base, "--slo-delays", "0.01,0.02", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bound"] == "best_delay" and d["best_delay_s"] in (0.01, 0.02)
    assert [p["delay_s"] for p in d["delays"]] == [0.01, 0.02]
    assert d["slo_latency_s"] == pytest.approx(d["best_delay_quantile_s"])  # no margin given
    assert d["predicted_quantile_s"] <= d["best_delay_quantile_s"] + 1e-12
    assert d["gain"] <= d["best_delay_gain"] + 1e-12 and d["bound_arrivals"] == "poisson"
    assert d["best_delay_catch_share"] == TRITON_CATCH_SHARE
    # the race share and what a direct client carries, as flags: D = the delay's quantile + 1 ms
    assert main([*base, "--slo-delays", "0.01,0.02", "--slo-catch-share", "0.8", "--slo-direct-extra", "0.001",
                 "--slo-margin", "0.003", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert t["best_delay_catch_share"] == 0.8 and t["best_delay_direct_extra_s"] == 0.001
    assert t["slo_latency_s"] == pytest.approx(t["best_delay_quantile_s"] + 0.001)
    for bad in (["--slo-latency", "0.05"], ["--slo-delays", "a,b"], ["--instances", "2"],
                ["--slo-catch-share", "1.5"], ["--slo-direct-extra", "-0.001"]):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert "error" in err and "Traceback" not in err
    assert main(["solve", "--rate", "150", "--slo-delays", "0.01"]) == 2
    assert "--slo-bound best_delay" in capsys.readouterr().err
    assert main(["solve", "--rate", "150", "--slo-catch-share", "0.7"]) == 2
    assert "--slo-catch-share goes with --slo-bound best_delay" in capsys.readouterr().err


def test_the_trace_benchs_derived_slo_prediction_is_the_bound_searched_under_the_fit(profile):
    """What the trace bench predicts for ``gate:smdp-slo-derived-seeded``: ``solve_best_delay_slo`` under
    the fit at its own mean rate, with the bench's quantile and margin; its pick's figures judged apart
    from the search (``fresh_figures``)."""
    from loadtest.trace_bench import derived_slo_prediction
    from solver.slo import SloTarget, fresh_figures
    from solver.slo_bound import DEFAULT_DELAYS_S

    model = _model(profile, rate=150.0)
    pred, said = derived_slo_prediction(model, CLUMPED.spec, SloTarget(0.99, 0.2, 0.003))
    under = model.with_(rate=CLUMPED.mean_rate, arrivals=CLUMPED)
    res = solve_best_delay_slo(under, BestDelaySlo(0.99, DEFAULT_DELAYS_S, 0.003))
    fresh = fresh_figures(under, res.result.chosen, 0.99)
    assert pred.cost == fresh.cost and pred.mean_latency_s == fresh.mean_latency_s and pred.source == fresh.source
    assert f"J {res.result.chosen.cost * 1e3:.2f} ms on the search's path" in said
    assert f"D = {(res.bound.quantile_s + 0.003) * 1e3:.2f} ms derived" in said
    # what Triton's answers carry served directly (1 ms), not the gate's 3 ms margin, goes into D
    _, direct_said = derived_slo_prediction(model, CLUMPED.spec, SloTarget(0.99, 0.2, 0.003),
                                              direct_extra_s=0.001)
    assert f"D = {(res.bound.quantile_s + 0.001) * 1e3:.2f} ms derived" in direct_said
    assert ("serving the delay itself" in said) == res.delay_served


def test_the_frontier_puts_the_poisson_gate_and_the_best_delay_on_one_path(profile):
    """``bench/arrivals_bench.py --frontier``: under Poisson the unguarded Poisson-solved table is the
    least-J rule, so the frontier at the best delay's p99 (below the table's) costs more J than the gate
    (the goal as written is off it), and at a bound the table meets it is the table itself, J for J (one
    path, one seed). Every feasible pick meets its bound by its upper 95% figure."""
    from bench.arrivals_bench import j_p99_frontier

    model = _model(profile, rate=150.0)
    first = j_p99_frontier(model, model, bounds_s=())
    gate, best = first.poisson_gate, first.best_delay
    assert best.cost == min(p.cost for p in first.delays) and gate.p99_s > best.p99_s
    assert [p.bound_s for p in first.points] == [best.p99_s] and first.at_best_delay is first.points[0]
    assert first.at_best_delay.feasible and first.at_best_delay.cost > gate.cost and not first.goal_met
    loose = gate.p99_s + gate.ci95_s + 0.002
    f = j_p99_frontier(model, model, bounds_s=(loose,))
    top = f.points[-1]
    assert top.bound_s == loose and top.feasible and top.cost == gate.cost
    np.testing.assert_array_equal(top.rule.actions, gate.rule.actions)  # unguarded: the table itself
    for p in f.points:
        assert not p.feasible or p.p99_s + p.ci95_s <= p.bound_s


def test_a_derived_d_moves_with_the_measured_correction_without_a_new_search(profile):
    """Answers 2 ms above the prediction: the correction is measured as for a stated D, and a derived D
    (the delay's quantile + margin + correction) carries it; the searched budget is the delay's quantile
    either way, so no search is asked for."""

    async def go():
        clock = Clock()
        c = PolicyController(
            "m", profile,
            ControllerConfig(max_batch=B, idle_power_w=P0, weight=W, initial_rate=150.0, window_s=5.0,
                             learning=LearningConfig(enabled=False), long_run_s=0.0),
            install=lambda p: None, clock=clock)
        c.set_slo(BestDelaySlo(0.99, DELAYS, margin_s=0.001))
        await c.tick(clock.t)
        first, version = c.current, c.version
        bound = c.slo_bound
        assert c.slo_offset_s == 0.0 and c.slo.latency_s == pytest.approx(bound.quantile_s + 0.001)
        rng = np.random.default_rng(1)
        for i in range(300):  # the policy in force, measured: its predicted mean plus 2 ms, with noise
            c.observe_latency(clock.t + 0.001 * i, first.mean_latency_s + 0.002 + rng.normal(0, 0.001))
        clock.t += 0.5
        assert c.tick(clock.t) is None and c.version == version
        assert c.slo_offset_s == pytest.approx(0.002, abs=3e-4)
        assert c.slo.latency_s == pytest.approx(bound.quantile_s + 0.001 + c.slo_offset_s)
        assert c.slo.budget_s == pytest.approx(bound.quantile_s) and c.slo_bound is bound

    asyncio.run(go())


def test_a_fixed_gate_with_a_derived_bound_serves_the_one_search_and_reports_its_d():
    """``adaptive: false`` with ``slo.bound: best_delay``: the bound is derived once at ``rate_rps`` and the
    fixed rule is ``solve_best_delay_slo``'s pick; its status carries the derived D and how it was found."""
    from plugin.config import ModelPolicyConfig
    from plugin.control_backend import _fixed_slo_status
    from plugin.policies import build_rule

    csv = ROOT / "profiles" / "v100_resnet50.csv"
    prof = ServiceProfile.from_csv(csv, max_batch=B)
    rate = 0.4 * B / prof.mean_s[-1]
    slo = SloConfig(quantile=0.99, bound="best_delay", margin_s=0.001)
    cfg = ModelPolicyConfig(policy="smdp", profile=csv, adaptive=False, rate_rps=rate, weight=W, idle_power_w=P0,
                            slo=slo)
    info = build_rule("m", cfg, B)
    want = solve_best_delay_slo(BatchingModel(rate=rate, max_batch=B, profile=prof, idle_power_w=P0, weight=W),
                                best_delay_slo(slo))
    c = want.result.chosen
    assert info.prediction["slo_latency_s"] == pytest.approx(want.bound.quantile_s + 0.001)
    assert info.prediction["bound"] == want.bound.describe()
    assert info.prediction["predicted_quantile_s"] == c.estimate.quantile_s
    guard = info.rule.max_wait_s if isinstance(info.rule, MaxWaitGuard) else None
    rule = info.rule.rule if isinstance(info.rule, MaxWaitGuard) else info.rule
    assert guard == c.max_wait_s and type(rule) is type(c.policy)
    if isinstance(rule, PolicyTable):
        np.testing.assert_array_equal(rule.actions, c.policy.actions)
    else:
        assert rule == c.policy
    st = _fixed_slo_status(cfg, info).message()
    assert st.latency_s == pytest.approx(want.bound.quantile_s + 0.001) and st.derived_bound == want.bound.describe()


def test_an_infeasible_derived_bound_says_the_delay_is_served_not_greedy():
    """``smdp ctl status``: with a stated D an infeasible SLO serves greedy; with a derived one the fallback
    is the best delay as the gate runs it (``solve_best_delay_slo``), and the status says which."""
    from plugin.ctl_cli import _slo_text
    from smdp.v1 import smdp_pb2

    stated = smdp_pb2.SloStatus(quantile=0.99, latency_s=0.05, feasible=False)
    derived = smdp_pb2.SloStatus(quantile=0.99, latency_s=0.05, feasible=False, derived_bound="best_delay: ...")
    assert "INFEASIBLE at this rate: serving greedy" in "\n".join(_slo_text(stated))
    text = "\n".join(_slo_text(derived))
    assert "INFEASIBLE at this rate: serving the best delay as the gate runs it" in text and "greedy" not in text
