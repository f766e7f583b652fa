"""Tail-latency SLOs: the exact response-time chain against M/D/1 and the simulator, the guarded
simulator fast path against the generic loop, the SLO search and its CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq

from smdp.cli import main
from solver import arrivals
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import MaxWaitGuard, greedy
from solver.simulate import _run_generic, _run_table_guard, _ServiceDraws, simulate_latencies
from solver.slo import (SloTarget, exact_quantile, exact_response_cdf, sectioned_quantile, simulated_quantile,
                        solve_slo)
from solver.smdp import solve

ROOT = Path(__file__).resolve().parent.parent
V100 = ROOT / "profiles" / "v100_resnet50.csv"


def _v100(B: int, load: float, weight: float, cv: float = 0.0) -> BatchingModel:
    prof = ServiceProfile.from_csv(V100, max_batch=B)
    if cv:
        prof = replace(prof, cv=np.full(B, cv))
    cap = B / float(prof.mean_s[-1])
    return BatchingModel(rate=load * cap, max_batch=B, profile=prof, idle_power_w=40.0, weight=weight)


def _md1_cdf(t: float, lam: float, d: float) -> float:
    """Erlang's M/D/1 waiting-time law, shifted by the service time: P(W + d <= t)."""
    rho = lam * d
    w = t - d
    if w < 0:
        return 0.0
    return (1 - rho) * sum(math.exp(lam * (w - k * d)) * (-lam * (w - k * d)) ** k / math.factorial(k)
                           for k in range(int(w // d) + 1))


@pytest.mark.parametrize("rho", [0.3, 0.7])
def test_exact_chain_is_md1_at_batch_size_one(rho):
    d = 0.01
    prof = ServiceProfile.from_table([1], [d], [1.0])
    model = BatchingModel(rate=rho / d, max_batch=1, profile=prof, idle_power_w=1.0)
    ts = np.array([0.0105, 0.012, 0.015, 0.025, 0.035, 0.05])
    got = exact_response_cdf(model, greedy(1), ts)
    want = np.array([_md1_cdf(t, model.rate, d) for t in ts])
    assert np.max(np.abs(got - want)) < 1.5e-3  # kinks of the deterministic law cost the inversion ~1e-3
    assert exact_response_cdf(model, greedy(1), [0.0099])[0] < 1e-3  # nobody is done before one service
    for q in (0.9, 0.99):
        want_q = brentq(lambda t: _md1_cdf(t, model.rate, d) - q, d * 1.0001, 0.15)
        assert exact_quantile(model, greedy(1), q) == pytest.approx(want_q, rel=0.015)


def test_exact_chain_matches_the_simulator_with_partial_batches():
    model = _v100(8, 0.5, 1e-3)
    policy = solve(model).policy
    assert policy.action(8) > 0 and policy.action(1) == 0  # it waits, then serves
    q99 = exact_quantile(model, policy, 0.99)
    arr = arrivals.poisson(model.rate, n=300_000, rng=5)
    est, sim = simulated_quantile(model, policy, SloTarget(0.99, q99), arr, seed=1, warmup=1.0)
    assert abs(est.quantile_s - q99) < 3 * est.ci95_s + 0.002 * q99
    assert est.attainment == pytest.approx(0.99, abs=0.0015)
    # the mean of the chain's distribution is the solver's exact W
    ts = np.linspace(1e-4, 0.08, 400)
    cdf = exact_response_cdf(model, policy, ts)
    mean = float(np.sum(1.0 - cdf) * (ts[1] - ts[0]))
    assert mean == pytest.approx(solve(model).mean_latency_s, rel=0.01)


def test_exact_chain_matches_the_simulator_with_gamma_service():
    model = _v100(4, 0.5, 1e-4, cv=0.5)
    policy = solve(model).policy
    arr = arrivals.poisson(model.rate, n=200_000, rng=7)
    _, lat = simulate_latencies(model.profile, policy, arr, idle_power_w=40.0, weight=0.0, seed=3, warmup=1.0)
    ts = np.quantile(lat, [0.5, 0.9, 0.99])
    got = exact_response_cdf(model, policy, ts)
    assert np.max(np.abs(got - [0.5, 0.9, 0.99])) < 0.006


@pytest.mark.parametrize("load,guard,cv", [(0.1, 0.004, 0.0), (0.5, 0.002, 0.5), (0.3, 0.02, 1.0)])
def test_guarded_table_fast_path_is_the_generic_loop(load, guard, cv):
    model = _v100(32, load, 1e-3, cv=cv)
    policy = solve(model).policy
    arr = arrivals.poisson(model.rate, n=20_000, rng=2).tolist()
    slow = _run_generic(MaxWaitGuard(policy, guard), arr, _ServiceDraws(model.profile, 32, 3).draw)
    fast = _run_table_guard(policy, guard, arr, _ServiceDraws(model.profile, 32, 3).draw)
    assert fast[0] == slow[0]
    np.testing.assert_allclose(fast[1], slow[1], rtol=0, atol=1e-12)


def test_the_guard_caps_the_wait_of_the_oldest():
    model = _v100(64, 0.05, 1e-3)
    policy = solve(model).policy
    arr = arrivals.poisson(model.rate, n=20_000, rng=4)
    _, plain = simulate_latencies(model.profile, policy, arr, idle_power_w=40.0, weight=0.0, seed=1)
    _, guarded = simulate_latencies(model.profile, MaxWaitGuard(policy, 0.005), arr, idle_power_w=40.0,
                                    weight=0.0, seed=1)
    assert plain.max() > 0.02
    # at low load the server is free when the guard fires: wait <= g, then one batch, plus at most one batch ahead
    assert guarded.max() <= 0.005 + 2 * float(model.profile.mean_s[-1]) + 1e-9


def test_sectioned_quantile_ci_covers_the_true_quantile():
    rng = np.random.default_rng(0)
    x = rng.exponential(1.0, size=100_000)
    point, half = sectioned_quantile(x, 0.99)
    assert abs(point - math.log(100)) < 3 * half
    assert 0 < half < 0.2
    assert math.isnan(sectioned_quantile(x[:500], 0.99)[1])


@pytest.mark.parametrize("q,d", [(0.0, 0.01), (1.0, 0.01), (-0.5, 0.01), (math.nan, 0.01), (True, 0.01),
                                 (0.99, 0.0), (0.99, -1.0), (0.99, math.nan), (0.99, math.inf)])
def test_invalid_targets_are_refused(q, d):
    with pytest.raises(ModelError):
        SloTarget(q, d)


@pytest.mark.parametrize("margin", [-0.001, 0.01, 0.02, math.nan, math.inf, True])
def test_invalid_margins_are_refused(margin):
    with pytest.raises(ModelError, match="margin"):
        SloTarget(0.99, 0.01, margin)


def test_a_margin_is_taken_off_the_searched_bound():
    """D with a margin searches exactly as D - margin without one; only the reported SLO differs."""
    model = _v100(64, 0.05, 1e-3)
    with_margin = solve_slo(model, SloTarget(0.99, 0.012, 0.004))
    plain = solve_slo(model, SloTarget(0.99, 0.008))
    assert with_margin.target.budget_s == pytest.approx(0.008)
    assert with_margin.feasible and with_margin.chosen.estimate.upper_s <= 0.008
    assert with_margin.max_wait_s == plain.max_wait_s and with_margin.chosen.cost == plain.chosen.cost
    out = with_margin.to_dict()
    assert out["slo_latency_s"] == 0.012 and out["slo_margin_s"] == 0.004


def test_the_guard_found_is_the_largest_that_meets_d_on_the_search_s_own_traffic():
    """Power-led, low load: the guard binds. The one chosen meets D, one a D/40 larger misses it on
    the same arrivals and service draws, and the search judged far fewer candidates than a grid."""
    from solver import arrivals as streams
    from solver.policy import MaxWaitGuard

    model = _v100(64, 0.05, 0.1)
    target = SloTarget(0.99, 0.02)
    res = solve_slo(model, target, seed=3)
    assert res.feasible and res.max_wait_s is not None
    arr = streams.from_model(model.arrivals, model.rate, res.requests, rng=np.random.default_rng([3, 12]))
    warmup = float(arr[max(100, res.requests // 50)])
    ok, _ = simulated_quantile(model, res.chosen.rule, target, arr, seed=3, warmup=warmup)
    assert ok.upper_s <= 0.02 and ok.quantile_s == res.chosen.estimate.quantile_s
    wider = MaxWaitGuard(res.policy, res.max_wait_s + 0.02 / 40)
    over, _ = simulated_quantile(model, wider, target, arr, seed=3, warmup=warmup)
    assert over.upper_s > 0.02
    assert len(res.candidates) <= 16


def test_a_loose_slo_keeps_the_mean_optimal_policy():
    model = _v100(64, 0.3, 1e-3)
    res = solve_slo(model, SloTarget(0.99, 0.05))
    assert res.feasible and res.max_wait_s is None
    assert res.chosen.table_weight == model.weight
    np.testing.assert_array_equal(res.policy.actions, solve(model).policy.actions)


def test_a_tight_slo_is_met_on_fresh_traffic_and_costs_more():
    model = _v100(64, 0.05, 1e-3)
    loose = solve_slo(model, SloTarget(0.99, 0.05))
    tight = solve_slo(model, SloTarget(0.99, 0.008))
    assert tight.feasible
    assert tight.chosen.estimate.upper_s <= 0.008
    assert tight.chosen.cost > loose.chosen.cost  # the constraint binds
    # independent arrivals and service draws: the chosen rule attains the SLO
    arr = arrivals.poisson(model.rate, n=100_000, rng=99)
    est, _ = simulated_quantile(model, tight.chosen.rule, tight.target, arr, seed=12345, warmup=1.0)
    assert est.attainment >= 0.99
    # every feasible candidate costs at least the chosen one
    assert all(c.cost >= tight.chosen.cost for c in tight.candidates if c.feasible)


def test_an_impossible_slo_is_flagged_and_served_greedily():
    model = _v100(64, 0.5, 1e-3)
    res = solve_slo(model, SloTarget(0.99, 0.002))  # below one batch of 1 plus queueing at half load
    assert not res.feasible
    np.testing.assert_array_equal(res.policy.actions, greedy(64, res.policy.truncation).actions)
    assert res.chosen.estimate.quantile_s > 0.002
    assert res.to_dict()["slo_feasible"] is False


def test_exact_search_agrees_with_the_simulated_one():
    model = _v100(8, 0.4, 1e-3)
    target = SloTarget(0.99, 0.03)
    sim = solve_slo(model, target)
    ex = solve_slo(model, target, method="exact")
    assert sim.feasible and ex.feasible and ex.max_wait_s is None
    assert ex.chosen.estimate.method == "exact"
    assert ex.chosen.estimate.quantile_s == pytest.approx(sim.chosen.estimate.quantile_s, rel=0.03)


def _cli_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_slo_json_contract(capsys):
    base = ["solve", "--rate", "1500", "--weight", "1e-3", "--max-batch", "64"]
    d = _cli_json(capsys, [*base, "--slo-quantile", "0.99", "--slo-latency", "0.008", "--json"])
    for key in ("policy", "mean_latency_s", "mean_power_w", "max_wait_s", "predicted_quantile_s", "slo_feasible"):
        assert key in d
    assert d["slo_feasible"] is True and d["predicted_quantile_s"] <= 0.008
    assert d["max_wait_s"] is None or 0 < d["max_wait_s"] < 0.008
    loose = _cli_json(capsys, [*base, "--slo-quantile", "0.99", "--slo-latency", "0.1", "--json"])
    assert loose["max_wait_s"] is None and loose["slo_feasible"] is True
    bad = _cli_json(capsys, [*base, "--slo-quantile", "0.99", "--slo-latency", "0.001", "--json"])
    assert bad["slo_feasible"] is False


@pytest.mark.parametrize("extra", [["--slo-quantile", "1", "--slo-latency", "0.01"],
                                   ["--slo-quantile", "nan", "--slo-latency", "0.01"],
                                   ["--slo-quantile", "0.9", "--slo-latency", "0"],
                                   ["--slo-quantile", "0.9", "--slo-latency", "-1"],
                                   ["--slo-quantile", "0.9"], ["--slo-latency", "0.01"]])
def test_cli_refuses_bad_slo(capsys, extra):
    assert main(["solve", "--rate", "1500", *extra]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_clumped_arrivals_are_searched_by_simulation_and_refused_by_the_exact_chain():
    from solver.arrival_model import parse_arrivals

    base = _v100(32, 0.3, 1e-3)
    clumped = base.with_(arrivals=parse_arrivals("batch:4"))
    with pytest.raises(ModelError, match="Poisson"):
        exact_response_cdf(clumped, solve(base).policy, [0.01])
    target = SloTarget(0.99, 0.03)
    res = solve_slo(clumped, target)
    assert res.feasible
    # groups of 4 arrive together: the tail is worse than for single arrivals at the same rate
    assert res.chosen.estimate.quantile_s > solve_slo(base, target).chosen.estimate.quantile_s


# -- the pick's figures apart from the search (``fresh_figures``) ---------------------------------


def test_an_unguarded_pick_is_judged_exactly_under_poisson_and_under_an_mmpp():
    from solver.arrival_model import MMPP2
    from solver.evaluate import evaluate
    from solver.mmpp import evaluate_mmpp
    from solver.slo import SloCandidate, fresh_figures

    model = _v100(16, 0.5, 0.002)
    table = solve(model).policy
    est = simulated_quantile(model, table, SloTarget(0.99, 1.0), arrivals.poisson(model.rate, n=2000,
                                                                                     rng=np.random.default_rng(1)))[0]
    cand = SloCandidate(model.weight, None, table, est, 0.0, 0.0, 0.0, True)  # the search's figures: 0, ignored
    f = fresh_figures(model, cand, 0.99)
    ev = evaluate(model, table)
    assert (f.source, f.paths) == ("exact", 0)
    assert (f.mean_latency_s, f.mean_power_w, f.cost, f.mean_batch) == (ev.mean_latency_s, ev.mean_power_w, ev.cost,
                                                                         ev.mean_batch)
    modulated = model.with_(arrivals=MMPP2((1.6 * model.rate, 0.4 * model.rate), (2.0, 2.0)))
    g = fresh_figures(modulated, cand, 0.99)
    em = evaluate_mmpp(modulated, table)
    assert g.source == "exact" and g.mean_latency_s == em.mean_latency_s and g.cost == em.cost
    assert g.mean_latency_s > f.mean_latency_s  # the modulation's waits: the MMPP's own figures, not Poisson's


def test_a_guarded_pick_is_judged_on_fresh_paths_not_the_searchs():
    from solver.slo import SloCandidate, fresh_figures, search_path

    model = _v100(16, 0.5, 0.002)
    table = solve(model).policy
    rule = MaxWaitGuard(table, 0.004)
    target = SloTarget(0.99, 1.0)
    est = simulated_quantile(model, rule, target, arrivals.poisson(model.rate, n=2000, rng=np.random.default_rng(1)))[0]
    cand = SloCandidate(model.weight, 0.004, table, est, 0.0, 0.0, 0.0, True)

    def on(seed: int):
        arr, warm = search_path(model, 0.99, seed=seed)
        return simulate_latencies(model.profile, rule, arr, idle_power_w=model.idle_power_w, weight=model.weight,
                                  seed=seed, warmup=warm)[0]

    f = fresh_figures(model, cand, 0.99, paths=3, seed=5)
    sims = [on(6), on(7), on(8)]  # seeds past the search's own (5)
    assert (f.source, f.paths) == ("sim", 3)
    assert f.mean_latency_s == pytest.approx(np.mean([s.mean_latency_s for s in sims]), rel=1e-12)
    assert f.cost == pytest.approx(np.mean([s.cost for s in sims]), rel=1e-12)
    assert f.mean_latency_s != on(5).mean_latency_s  # not the search's path
    one = fresh_figures(model, cand, 0.99, paths=1, seed=5)
    assert one.mean_latency_s == sims[0].mean_latency_s
    # the mean over fresh paths of Poisson arrivals is near the long run: 4 paths of 40,000 against 400,000
    arr = arrivals.poisson(model.rate, n=400_000, rng=np.random.default_rng(77))
    long = simulate_latencies(model.profile, rule, arr, idle_power_w=model.idle_power_w, weight=model.weight,
                              seed=77, warmup=float(arr[2000]))[0]
    assert fresh_figures(model, cand, 0.99, seed=5).mean_latency_s == pytest.approx(long.mean_latency_s, rel=0.02)


@pytest.mark.parametrize("paths", [0, -1, 1.5, True, "4"])
def test_fresh_figures_refuse_a_bad_number_of_paths(paths):
    from solver.slo import SloCandidate, fresh_figures

    model = _v100(16, 0.5, 0.002)
    table = solve(model).policy
    est = simulated_quantile(model, table, SloTarget(0.99, 1.0), arrivals.poisson(model.rate, n=2000,
                                                                                     rng=np.random.default_rng(1)))[0]
    with pytest.raises(ModelError, match="paths"):
        fresh_figures(model, SloCandidate(model.weight, 0.004, table, est, 0.0, 0.0, 0.0, True), 0.99, paths=paths)
