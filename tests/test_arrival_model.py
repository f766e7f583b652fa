"""Arrival models beyond Poisson: compound Poisson (groups) in the solver, exact evaluation and simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from solver import arrivals
from solver.arrival_model import POISSON, CompoundPoisson, MMPP2, parse_arrivals
from solver.evaluate import evaluate
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import greedy
from solver.simulate import simulate
from solver.smdp import solve
from solver.tail import arrival_pmf_matrix, build

ROOT = Path(__file__).resolve().parents[1]
V100 = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")


def v100(B: int, load: float, weight: float, cv: float = 0.0, arrivals=POISSON) -> BatchingModel:
    prof = ServiceProfile(V100.mean_s[:B], V100.energy_j[:B], np.full(B, cv))
    m = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=40.0, weight=weight)
    return m.with_(rate=load * m.capacity, arrivals=arrivals)


def test_parse_and_validate():
    assert parse_arrivals("poisson") is POISSON
    assert parse_arrivals("batch:1") is POISSON
    assert parse_arrivals("batch:4") == CompoundPoisson(4.0)
    mm = parse_arrivals("mmpp:100,10:0.5,2")
    assert mm == MMPP2((100.0, 10.0), (0.5, 2.0))
    assert mm.mean_rate == pytest.approx(100 * 0.8 + 10 * 0.2)
    for bad in ("batch:0.5", "batch:x", "mmpp:1,2:3", "mmpp:1,2:0,1", "mmpp:-1,2:1,1", "gamma"):
        with pytest.raises(ModelError):
            parse_arrivals(bad)
    with pytest.raises(ModelError, match="P\\(X = 0\\)"):
        CompoundPoisson.empirical([0.5, 0.5])
    with pytest.raises(ModelError, match="mean rate of the MMPP"):
        v100(8, 0.5, 0.0).with_(arrivals=mm)


@pytest.mark.parametrize("cv", [0.0, 1.0])
@pytest.mark.parametrize("weight", [0.0, 1e-3])
def test_groups_of_one_reproduce_poisson_exactly(cv, weight):
    m = v100(32, 0.6, weight, cv)
    plain = solve(m)
    one = solve(m.with_(arrivals=CompoundPoisson(1.0)))  # goes through the compound code path
    assert one.gain == pytest.approx(plain.gain, rel=1e-13)
    assert np.array_equal(one.policy.actions, plain.policy.actions)
    # on the solver's N (the evaluation's own automatic N settles the cost to 1e-8, not 1e-12)
    ev = evaluate(m.with_(arrivals=CompoundPoisson(1.0)), plain.policy, truncation=plain.truncation)
    assert ev.cost == pytest.approx(plain.gain, rel=1e-12)


@pytest.mark.parametrize("cv", [0.0, 0.7])
def test_count_pmf_is_the_compound_law(cv):
    """Moments of K and, for empirical sizes, the explicit compound sum."""
    m = v100(8, 0.7, 0.0, cv, CompoundPoisson(3.0))
    smdp = build(m, 400)
    pmf = smdp.pmf
    k = np.arange(pmf.shape[1])
    tau = m.profile.mean_s
    m2 = tau * tau * (1 + cv * cv)
    lam, lam_g = m.rate, m.rate / 3.0
    ex2 = (2 - 1 / 3) * 9  # E[X^2] of the geometric with mean 3
    assert pmf.sum(axis=1) == pytest.approx(np.ones(8), abs=1e-12)
    assert pmf @ k == pytest.approx(lam * tau, rel=1e-10)
    var = pmf @ (k * k) - (pmf @ k) ** 2
    assert var == pytest.approx(lam_g * tau * ex2 + lam * lam * (m2 - tau * tau), rel=1e-8)

    q = [0.0, 0.5, 0.2, 0.3]
    emp = CompoundPoisson.empirical(q)
    me = m.with_(arrivals=emp)
    got = build(me, 200).pmf
    groups = arrival_pmf_matrix(me.profile, me.rate / emp.group_mean, 200)
    want = np.zeros((8, 201))
    conv = np.zeros(201)
    conv[0] = 1.0
    for j in range(201):  # P(K = k) = sum_m P(M = m) q^{*m}(k)
        want += groups[:, j : j + 1] * conv[None, :]
        conv = np.convolve(conv, q)[:201]
    L = got.shape[1]
    assert got == pytest.approx(want[:, :L], abs=1e-15)


@pytest.mark.parametrize("cv", [0.0, 1.0])
def test_batch_one_server_is_the_mx_g_1_queue(cv):
    """B = 1, greedy: the M^X/G/1 queue, W = tau + (lambda E[S^2] + tau (E[X^2]/E[X] - 1)) / (2 (1 - rho))."""
    tau, rate, G = 0.004, 150.0, 2.5
    prof = ServiceProfile(mean_s=[tau], energy_j=[0.5], cv=[cv])
    cp = CompoundPoisson(G)
    m = BatchingModel(rate=rate, max_batch=1, profile=prof, idle_power_w=25.0, weight=0.0, arrivals=cp)
    rho = rate * tau
    s2 = tau * tau * (1 + cv * cv)
    want = tau + (rate * s2 + tau * (cp.group_second_moment / G - 1.0)) / (2 * (1 - rho))
    ev = evaluate(m, greedy(1))
    assert ev.mean_latency_s == pytest.approx(want, rel=1e-8)
    assert ev.mean_power_w == pytest.approx(rho * 0.5 / tau + (1 - rho) * 25.0, rel=1e-10)


@pytest.mark.parametrize("G,weight,cv", [(4.0, 5e-4, 0.0), (3.0, 0.0, 1.0)])
def test_simulator_agrees_with_exact_evaluation_under_groups(G, weight, cv):
    cp = CompoundPoisson(G)
    m = v100(16, 0.55, weight, cv, cp)
    res = solve(m)
    ev = evaluate(m, res.policy)
    assert ev.cost == pytest.approx(res.gain, rel=1e-9)
    t = arrivals.compound_poisson(m.rate, cp, n=300_000, rng=7)
    assert np.mean(np.diff(np.unique(t))) == pytest.approx(G / m.rate, rel=0.02)
    sim = simulate(m.profile, res.policy, t, idle_power_w=40.0, weight=weight, seed=3, warmup=2.0)
    assert abs(sim.mean_latency_s - ev.mean_latency_s) <= 4 * sim.latency_ci95_s
    assert abs(sim.mean_power_w - ev.mean_power_w) <= 4 * sim.power_ci95_w
    # the Poisson prediction of the same policy is far off: the test can tell groups from Poisson
    plain = evaluate(m.with_(arrivals=POISSON), res.policy)
    assert sim.mean_latency_s - plain.mean_latency_s > (4 if cv == 0 else 1.5) * sim.latency_ci95_s


def test_empirical_groups_simulated_as_given():
    emp = CompoundPoisson.empirical([0.0, 0.2, 0.0, 0.8])  # groups of 1 or 3
    t = arrivals.compound_poisson(100.0, emp, n=20_000, rng=1)
    _, counts = np.unique(t, return_counts=True)
    counts = counts[:-1]  # the last group may be cut at n
    assert set(counts.tolist()) <= {1, 3}
    assert np.mean(counts == 3) == pytest.approx(0.8, abs=0.02)
    assert t.size == 20_000


# ---- two-phase MMPP: state (n, phase) ---------------------------------------------------------

from scipy import linalg  # noqa: E402

from solver.mmpp import count_law, evaluate_mmpp, solve_mmpp  # noqa: E402
from solver.phase_filter import PhaseFilter, TruePhase  # noqa: E402
from solver.simulate import simulate_phased  # noqa: E402


def mmpp_model(process: MMPP2, B: int = 16, weight: float = 2e-4, cv: float = 0.5) -> BatchingModel:
    prof = ServiceProfile.affine(B, 0.1438e-3 * 4, 1.8874e-3 * 4, 0.04419, 0.1550, cv=cv)
    return BatchingModel(rate=process.mean_rate, max_batch=B, profile=prof, idle_power_w=40.0, weight=weight,
                         arrivals=process)


def test_mmpp_with_equal_rates_is_poisson():
    m = mmpp_model(MMPP2((600.0, 600.0), (1.0, 3.0)))
    res = solve_mmpp(m)
    plain = solve(m.with_(arrivals=POISSON))
    assert res.gain == pytest.approx(plain.gain, rel=1e-9)
    for table in res.policy.tables:
        size = min(table.actions.size, plain.policy.actions.size)
        assert np.array_equal(table.actions[:size], plain.policy.actions[:size])
    assert res.evaluation.phase_time == pytest.approx((0.75, 0.25), abs=1e-9)


def test_mmpp_count_law():
    proc = MMPP2((900.0, 100.0), (2.0, 3.0))
    m = mmpp_model(proc, B=8, cv=0.0)
    law = count_law(m)  # [b, i, j, k]
    tau = m.profile.mean_s
    k = np.arange(law.shape[3])
    assert law.sum(axis=(2, 3)) == pytest.approx(np.ones((8, 2)), abs=1e-12)
    for b in (0, 7):
        # end phase: the phase chain alone, exp(Q tau)
        assert law[b].sum(axis=2) == pytest.approx(linalg.expm(proc.generator * tau[b]), abs=1e-12)
        # mean count from the stationary phase: lambda tau
        mean = proc.stationary @ (law[b].sum(axis=1) @ k)
        assert mean == pytest.approx(proc.mean_rate * tau[b], rel=1e-10)


def test_mmpp_simulation_agrees_with_exact_evaluation():
    proc = MMPP2((900.0, 100.0), (2.0, 3.0))
    m = mmpp_model(proc)
    res = solve_mmpp(m)
    assert res.converged
    assert res.policy.tables[0].actions[:8].tolist() != res.policy.tables[1].actions[:8].tolist()
    t, sw, ph = arrivals.mmpp2_path(proc, 600_000, rng=11)
    sim = simulate_phased(m.profile, res.policy, TruePhase(sw, ph), t, idle_power_w=40.0, weight=2e-4,
                          seed=2, warmup=5.0)
    assert abs(sim.mean_latency_s - res.mean_latency_s) <= 4 * sim.latency_ci95_s
    assert abs(sim.mean_power_w - res.mean_power_w) <= 4 * sim.power_ci95_w
    # a phase-blind table (the Poisson-solved one) evaluated exactly under the MMPP, and simulated
    blind = solve(m.with_(arrivals=POISSON)).policy
    ev = evaluate_mmpp(m, blind)
    assert ev.cost > res.gain  # knowing the phase is worth something here
    sim_b = simulate(m.profile, blind, t, idle_power_w=40.0, weight=2e-4, seed=2, warmup=5.0)
    assert abs(sim_b.mean_latency_s - ev.mean_latency_s) <= 4 * sim_b.latency_ci95_s


def test_forward_filter_tracks_a_clear_phase():
    proc = MMPP2((1000.0, 50.0), (1.0, 1.0))
    t, sw, ph = arrivals.mmpp2_path(proc, 50_000, rng=4)
    truth, filt = TruePhase(sw, ph), PhaseFilter(proc, t)
    probe = t[::50]
    idx = np.searchsorted(t, probe, side="right")
    agree = np.mean([filt.phase(x, int(i)) == truth.phase(x, int(i)) for x, i in zip(probe, idx)])
    assert agree > 0.97


# ---- batch MMPP: groups per phase ----------------------------------------------------------------

def test_batch_mmpp_parses_and_groups_of_one_are_the_plain_mmpp():
    bm = parse_arrivals("mmpp:900,100:2,3:3,1.5")
    assert bm.grouped and bm.group_means == (3.0, 1.5) and bm.epoch_rates == (300.0, 100.0 / 1.5)
    assert parse_arrivals("mmpp:900,100:2,3:1,1") == MMPP2((900.0, 100.0), (2.0, 3.0))
    plain = MMPP2((900.0, 100.0), (2.0, 3.0))
    ones = MMPP2((900.0, 100.0), (2.0, 3.0), (CompoundPoisson(1.0), CompoundPoisson(1.0)))
    assert ones == plain
    with pytest.raises(ModelError, match="m >= 2 rates"):
        parse_arrivals("mmpp:900,100:2,3:3")


def test_batch_mmpp_count_law_and_dispersion():
    proc = MMPP2((900.0, 100.0), (2.0, 3.0), (CompoundPoisson(3.0), CompoundPoisson(1.5)))
    m = mmpp_model(proc, B=8, cv=0.0)
    law = count_law(m)
    tau = m.profile.mean_s
    k = np.arange(law.shape[3], dtype=float)
    assert law.sum(axis=(2, 3)) == pytest.approx(np.ones((8, 2)), abs=1e-12)
    for b in (0, 7):
        assert law[b].sum(axis=2) == pytest.approx(linalg.expm(proc.generator * tau[b]), abs=1e-12)
        start = proc.stationary
        mean = start @ (law[b].sum(axis=1) @ k)
        assert mean == pytest.approx(proc.mean_rate * tau[b], rel=1e-10)
        # Var K from the stationary phase, a fixed window tau: the index of dispersion at tau
        second = start @ (law[b].sum(axis=1) @ (k * k))
        assert (second - mean * mean) / mean == pytest.approx(proc.index_of_dispersion(tau[b]), rel=1e-8)
    # one phase, groups: the compound-Poisson law of the one-dimensional solver
    one = MMPP2((500.0, 500.0), (1.0, 1.0), (CompoundPoisson(2.5), CompoundPoisson(2.5)))
    lone = count_law(mmpp_model(one, B=8, cv=0.5))
    flat = solve(mmpp_model(one, B=8, cv=0.5).with_(arrivals=CompoundPoisson(2.5)))
    ev = evaluate_mmpp(mmpp_model(one, B=8, cv=0.5), flat.policy)
    assert ev.cost == pytest.approx(flat.gain, rel=1e-6)
    assert lone.sum(axis=2)[:, 0, :].sum(axis=1) == pytest.approx(np.ones(8), abs=1e-12)


def test_batch_mmpp_simulation_agrees_with_exact_evaluation():
    proc = MMPP2((900.0, 100.0), (2.0, 3.0), (CompoundPoisson(3.0), CompoundPoisson(1.5)))
    m = mmpp_model(proc)
    res = solve_mmpp(m)
    assert res.converged
    t, sw, ph = arrivals.mmpp2_path(proc, 400_000, rng=11)
    assert (t.size - 1) / t[-1] == pytest.approx(proc.mean_rate, rel=0.05)
    sim = simulate_phased(m.profile, res.policy, TruePhase(sw, ph), t, idle_power_w=40.0, weight=2e-4,
                          seed=2, warmup=5.0)
    assert abs(sim.mean_latency_s - res.mean_latency_s) <= 4 * sim.latency_ci95_s
    assert abs(sim.mean_power_w - res.mean_power_w) <= 4 * sim.power_ci95_w
    blind = solve(m.with_(arrivals=POISSON)).policy
    ev = evaluate_mmpp(m, blind)
    sim_b = simulate(m.profile, blind, t, idle_power_w=40.0, weight=2e-4, seed=2, warmup=5.0)
    assert abs(sim_b.mean_latency_s - ev.mean_latency_s) <= 4 * sim_b.latency_ci95_s
    # the filter reads group sizes too: phase 1's groups are twice as large
    filt = PhaseFilter(proc, t)
    probe = t[::97]
    idx = np.searchsorted(t, probe, side="right")
    truth = TruePhase(sw, ph)
    agree = np.mean([filt.phase(x, int(i)) == truth.phase(x, int(i)) for x, i in zip(probe, idx)])
    assert agree > 0.9


@pytest.mark.parametrize("groups", [None, (CompoundPoisson(3.0), CompoundPoisson(1.5))])
def test_mmpp_banded_evaluation_equals_dense(groups):
    from solver.mmpp import build_phase_smdp, evaluate_actions

    proc = MMPP2((900.0, 100.0), (2.0, 3.0), groups)  # phase 1 above capacity: long queues
    m = mmpp_model(proc, B=8)
    N = 120
    smdp = build_phase_smdp(m, N)
    a = np.vstack([np.minimum(np.arange(N + 1), 8)] * 2)
    a[0, :5] = 0  # waits in both phases, a different table per phase
    a[1, 2:4] = 0
    dense, banded = evaluate_actions(smdp, a, "dense"), evaluate_actions(smdp, a, "banded")
    assert banded.gain == pytest.approx(dense.gain, rel=1e-12)
    assert np.max(np.abs(banded.h - dense.h)) <= 1e-10 * np.max(np.abs(dense.h))
    assert np.max(np.abs(banded.pi - dense.pi)) <= 1e-13
    with pytest.raises(ValueError, match="linear_solver"):
        evaluate_actions(smdp, a, "sparse")
    # the solve: same gain and the same tables either way
    fast, slow = solve_mmpp(m), solve_mmpp(m, linear_solver="dense")
    assert fast.gain == pytest.approx(slow.gain, rel=1e-12)
    for t1, t2 in zip(fast.policy.tables, slow.policy.tables):
        assert np.array_equal(t1.actions, t2.actions)


def test_phase_blind_search_lowers_the_poisson_table_and_stays_phase_blind():
    from solver.mmpp import solve_mmpp_blind

    proc = MMPP2((900.0, 100.0), (2.0, 3.0), (CompoundPoisson(3.0), CompoundPoisson(1.5)))
    m = mmpp_model(proc)
    start = solve(m.with_(arrivals=POISSON)).policy
    res = solve_mmpp_blind(m, start)
    assert res.start_gain == pytest.approx(evaluate_mmpp(m, start).cost, rel=1e-9)
    assert res.gain <= res.start_gain
    assert res.gain == pytest.approx(evaluate_mmpp(m, res.policy).cost, rel=1e-12)
    assert res.gain >= solve_mmpp(m).gain * (1 - 1e-9)  # observing the phase can only help
    # under Poisson-equal phases the Poisson table is already the best blind one
    flat = mmpp_model(MMPP2((600.0, 600.0), (1.0, 3.0)))
    p = solve(flat.with_(arrivals=POISSON)).policy
    again = solve_mmpp_blind(flat, p)
    assert again.gain == pytest.approx(again.start_gain, rel=1e-9)


# ---- m phases -----------------------------------------------------------------------------------

THREE = "mmpp:1200,400,40:1,0.5,1,1,0.5,1.5"


def test_three_phase_parse_and_dispersion_against_lumping():
    proc = parse_arrivals(THREE)
    assert proc.phases == 3 and proc.spec == THREE
    assert proc.generator.sum(axis=1) == pytest.approx(np.zeros(3), abs=1e-12)
    assert proc.stationary @ proc.generator == pytest.approx(np.zeros(3), abs=1e-12)
    # two identical phases lump: the three-phase matrix forms equal the two-phase closed forms
    lumped = MMPP2((900.0, 100.0), (2.0, 3.0))
    split = MMPP2((900.0, 100.0, 100.0), (1.2, 0.8, 3.0, 4.0, 3.0, 2.5))
    for w in (1e-3, 0.1, 1.0, 30.0, None):
        assert split.index_of_dispersion(w) == pytest.approx(lumped.index_of_dispersion(w), rel=1e-9)
    assert split.mean_rate == pytest.approx(lumped.mean_rate, rel=1e-12)
    with pytest.raises(ModelError, match="reachable"):
        MMPP2((900.0, 100.0, 10.0), (1.0, 0.0, 1.0, 0.0, 1.0, 1.0))  # phase 3 is never entered


@pytest.mark.parametrize("groups", [None, (CompoundPoisson(3.0), CompoundPoisson(1.5), CompoundPoisson(1.5))])
def test_three_phase_with_two_identical_phases_solves_as_two(groups):
    g2 = None if groups is None else groups[:2]
    lumped = mmpp_model(MMPP2((900.0, 100.0), (2.0, 3.0), g2), B=8)
    split = mmpp_model(MMPP2((900.0, 100.0, 100.0), (1.2, 0.8, 3.0, 4.0, 3.0, 2.5), groups), B=8)
    a, b = solve_mmpp(lumped), solve_mmpp(split)
    assert b.gain == pytest.approx(a.gain, rel=1e-8)
    assert b.mean_latency_s == pytest.approx(a.mean_latency_s, rel=1e-7)
    assert np.array_equal(b.policy.tables[1].actions, b.policy.tables[2].actions)
    table = solve(lumped.with_(arrivals=POISSON)).policy
    assert evaluate_mmpp(split, table).cost == pytest.approx(evaluate_mmpp(lumped, table).cost, rel=1e-8)


def test_three_phase_count_law_matches_expm():
    proc = parse_arrivals(THREE)
    m = mmpp_model(proc, B=8, cv=0.0)
    law = count_law(m)  # [b, i, j, k]
    assert law.shape[1:3] == (3, 3)
    k = np.arange(law.shape[3])
    for b in (0, 3, 7):
        tau = float(m.profile.mean_s[b])
        assert law[b].sum(axis=2) == pytest.approx(linalg.expm(proc.generator * tau), abs=1e-10)
        mean = proc.stationary @ (law[b].sum(axis=1) @ k)
        assert mean == pytest.approx(proc.mean_rate * tau, rel=1e-9)
        var = proc.stationary @ (law[b].sum(axis=1) @ (k * k)) - mean * mean
        assert var / mean == pytest.approx(proc.index_of_dispersion(tau), rel=1e-7)


@pytest.mark.parametrize("groups", [None, (CompoundPoisson(2.5), CompoundPoisson(1.5), CompoundPoisson(1.0))])
def test_three_phase_banded_equals_dense_and_simulation_agrees(groups):
    from solver.mmpp import build_phase_smdp, evaluate_actions

    proc = MMPP2((900.0, 300.0, 30.0), (1.0, 0.5, 1.0, 1.0, 0.5, 1.5), groups)
    m = mmpp_model(proc)
    N = 150
    smdp = build_phase_smdp(m, N)
    a = np.vstack([np.minimum(np.arange(N + 1), 16)] * 3)
    a[1, :3] = 0
    a[2, :6] = 0
    dense, banded = evaluate_actions(smdp, a, "dense"), evaluate_actions(smdp, a, "banded")
    assert banded.gain == pytest.approx(dense.gain, rel=1e-12)
    assert np.max(np.abs(banded.pi - dense.pi)) <= 1e-13
    res = solve_mmpp(m)
    assert res.converged and len(res.policy.tables) == 3
    assert res.policy.tables[0].actions[:6].tolist() != res.policy.tables[2].actions[:6].tolist()
    t, sw, ph = arrivals.mmpp2_path(proc, 400_000, rng=13)
    assert set(np.unique(ph)) == {0, 1, 2}
    assert (t.size - 1) / t[-1] == pytest.approx(proc.mean_rate, rel=0.05)
    sim = simulate_phased(m.profile, res.policy, TruePhase(sw, ph), t, idle_power_w=40.0, weight=2e-4,
                          seed=2, warmup=5.0)
    assert abs(sim.mean_latency_s - res.mean_latency_s) <= 4 * sim.latency_ci95_s
    assert abs(sim.mean_power_w - res.mean_power_w) <= 4 * sim.power_ci95_w
    blind = solve(m.with_(arrivals=POISSON)).policy
    ev = evaluate_mmpp(m, blind)
    sim_b = simulate(m.profile, blind, t, idle_power_w=40.0, weight=2e-4, seed=2, warmup=5.0)
    assert abs(sim_b.mean_latency_s - ev.mean_latency_s) <= 4 * sim_b.latency_ci95_s


def test_grouped_count_law_under_a_nearly_deterministic_service_stops_at_the_events_mass():
    # the gamma mixture of a service with CV 1e-3 loses ~1e-13 of its own mass: the count law must not
    # chase it by doubling kmax (it did, to millions of requests: minutes per solve on a stack profile)
    proc = MMPP2((221.0, 33.0), (0.5, 0.9), (CompoundPoisson(3.0), CompoundPoisson(1.3)))
    m = mmpp_model(proc, B=16, cv=1e-3)
    law = count_law(m)
    assert law.shape[3] < 2_000
    assert law.sum(axis=(2, 3)).min() >= 1.0 - 1e-10


def test_overflow_moments_equal_the_windowed_products_they_replace():
    """build_phase_smdp's overflow terms by tail sums equal the direct sums over k: P(K > g), E[(K - g)+]
    and E[((K - g)+)^2] at every room g, and a whole three-phase grouped build (costs, times, overflow
    law) matches the windowed-product formulation it had before."""
    from numpy.lib.stride_tricks import sliding_window_view

    from solver.mmpp import build_phase_smdp, overflow_moments

    rng = np.random.default_rng(4)
    law = rng.random((5, 40)) ** 3
    law /= law.sum(axis=1, keepdims=True)
    k = np.arange(40)
    for room in (0, 7, 39, 60):
        p0, p1, p2 = overflow_moments(law, room)
        for g in range(room + 1):
            np.testing.assert_allclose(p0[:, g], law[:, k > g].sum(axis=1), rtol=1e-13, atol=1e-16)
            np.testing.assert_allclose(p1[:, g], (np.maximum(k - g, 0) * law).sum(axis=1), rtol=1e-13, atol=1e-16)
            np.testing.assert_allclose(p2[:, g], (np.maximum(k - g, 0) ** 2 * law).sum(axis=1), rtol=1e-13, atol=1e-16)
    proc = parse_arrivals("mmpp:900,300,40:2,0.5,1,3,0.2,0.4:2,1.5,1")
    prof = ServiceProfile.from_csv(ROOT / "profiles" / "p4_resnet50.csv", max_batch=16)
    model = BatchingModel(proc.mean_rate, 16, prof, 40.0, 1e-4, arrivals=proc)
    laws = count_law(model)
    N = 90
    smdp = build_phase_smdp(model, N, laws)
    L = laws.shape[3] - 1
    n, a = np.arange(N + 1), np.arange(1, 17)
    sc = np.clip(n[:, None] - a[None, :], 0, N)
    over = np.maximum(np.arange(N + 1 + L) - N, 0).astype(float)
    w1 = sliding_window_view(over, L + 1)[: N + 1]
    w2 = sliding_window_view(over * over, L + 1)[: N + 1]
    wb = sliding_window_view((np.arange(N + 1 + L) > N).astype(float), L + 1)[: N + 1]
    for i in range(proc.phases):
        law_i = laws[:, i].sum(axis=1)
        ok = smdp.valid[i, :, 1:]
        np.testing.assert_allclose(smdp.tail_m[i, :, 1:][ok], (w1 @ law_i.T)[sc, a - 1][ok], rtol=1e-12, atol=1e-15)
        for j in range(proc.phases):
            np.testing.assert_allclose(smdp.tail_p[i, :, 1:, j][ok], (wb @ laws[:, i, j].T)[sc, a - 1][ok],
                                       rtol=1e-12, atol=1e-15)
        # the second moment, indexed as the build indexes it (it enters the latency cost)
        np.testing.assert_allclose(overflow_moments(law_i, N)[2][a[None, :] - 1, N - sc][ok], (w2 @ law_i.T)[sc, a - 1][ok],
                                   rtol=1e-12, atol=1e-15)


# ---- the modulation's time scale calibrated to a queue's W --------------------------------------


def test_a_slowed_mmpp_keeps_its_rates_and_law_and_lasts_longer_in_each_phase():
    proc = MMPP2((900.0, 100.0, 300.0), (2.0, 1.0, 3.0, 0.5, 1.0, 1.0))
    slow = proc.slowed(2.5)
    assert slow.rates == proc.rates and slow.groups == proc.groups
    assert slow.switching == pytest.approx(tuple(s / 2.5 for s in proc.switching), rel=1e-15)
    assert np.allclose(slow.stationary, proc.stationary) and slow.mean_rate == pytest.approx(proc.mean_rate)
    assert proc.slowed(1.0) == proc
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ModelError, match="slowing factor"):
            proc.slowed(bad)


def test_the_calibration_finds_the_time_scale_a_slowed_fit_was_made_with():
    """W under an MMPP grows with its phases' length; given the W of a table under the process slowed by
    1.6, the calibration from the process itself finds 1.6 (and 1 for its own W)."""
    from solver.mmpp import CALIBRATION_RTOL, calibrate_modulation

    proc = MMPP2((900.0, 150.0), (2.0, 3.0))
    m = mmpp_model(proc, B=8)
    table = solve(m.with_(arrivals=POISSON)).policy
    own = evaluate_mmpp(m, table).mean_latency_s
    truth = proc.slowed(1.6)
    target = evaluate_mmpp(m.with_(arrivals=truth), table).mean_latency_s
    assert target > own * 1.05  # longer stretches of the busy phase: a longer W
    cal = calibrate_modulation(m, table, target)
    assert not cal.clamped and cal.factor == pytest.approx(1.6, rel=0.02)
    assert abs(cal.w_s - target) <= CALIBRATION_RTOL * target and cal.fitted_w_s == own
    assert cal.arrivals.rates == proc.rates and cal.evaluations <= 8
    assert "x1.6" in cal.describe()
    same = calibrate_modulation(m, table, own)
    assert same.factor == 1.0 and same.evaluations == 1 and same.arrivals == proc
    shorter = calibrate_modulation(m, table, evaluate_mmpp(m.with_(arrivals=proc.slowed(0.5)), table).mean_latency_s)
    assert shorter.factor == pytest.approx(0.5, rel=0.02)


def test_a_target_beyond_the_calibrations_range_keeps_the_fit_as_it_is_flagged():
    """No time scale gives the target: the time scale is not what the fit misses, so it is left alone."""
    from solver.mmpp import CALIBRATION_FACTORS, calibrate_modulation

    proc = MMPP2((900.0, 150.0), (2.0, 3.0))
    m = mmpp_model(proc, B=8)
    table = solve(m.with_(arrivals=POISSON)).policy
    own = evaluate_mmpp(m, table).mean_latency_s
    far = calibrate_modulation(m, table, 10.0)  # ten seconds: no time scale in range gives it
    slowest = evaluate_mmpp(m.with_(arrivals=proc.slowed(CALIBRATION_FACTORS[1])), table).mean_latency_s
    assert far.clamped and far.factor == 1.0 and far.arrivals == proc and far.w_s == own
    assert far.reach_w_s == pytest.approx(slowest) and own < slowest < 10.0
    assert "phases as fitted" in far.describe() and f"{slowest * 1e3:.2f}" in far.describe()
    near = calibrate_modulation(m, table, 1e-4)  # below any service time
    assert near.clamped and near.factor == 1.0 and near.arrivals == proc
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ModelError, match="target W"):
            calibrate_modulation(m, table, bad)
    with pytest.raises(ModelError, match="MMPP2"):
        calibrate_modulation(m.with_(arrivals=POISSON), table, 0.01)
