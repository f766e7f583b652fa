"""The SMDP solvers: closed forms, agreement of two methods, truncation independence, optimality."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from solver import (
    BatchingModel,
    ModelError,
    PolicyTable,
    ServiceProfile,
    SolveResult,
    UnstablePolicyError,
    evaluate,
    greedy,
    solve,
    static,
    threshold,
)

ROOT = Path(__file__).resolve().parents[1]
V100 = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")


def v100(B: int, load: float, weight: float, cv: float = 0.0, idle_w: float = 40.0) -> BatchingModel:
    prof = ServiceProfile(V100.mean_s[:B], V100.energy_j[:B], np.full(B, cv))
    m = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=idle_w, weight=weight)
    return m.with_(rate=load * m.capacity)


def mg1(rate: float, tau: float, cv: float) -> BatchingModel:
    prof = ServiceProfile(mean_s=[tau], energy_j=[0.3], cv=[cv])
    return BatchingModel(rate=rate, max_batch=1, profile=prof, idle_power_w=30.0, weight=1e-5)


def pollaczek_khinchine(rate: float, tau: float, cv: float) -> float:
    rho = rate * tau
    es2 = tau * tau * (1 + cv * cv)
    return tau + rate * es2 / (2 * (1 - rho))


# --- closed forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cv", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("rho", [0.3, 0.8, 0.95])
def test_batch_size_one_is_mg1(cv, rho):
    tau = 0.002
    m = mg1(rho / tau, tau, cv)
    res = solve(m)
    assert res.policy.threshold() == 1  # B = 1: serving one whenever any wait is the only choice
    assert res.mean_latency_s == pytest.approx(pollaczek_khinchine(m.rate, tau, cv), rel=1e-9)
    # P: idle power for the idle fraction 1 - rho, one batch energy per request otherwise.
    assert res.mean_power_w == pytest.approx((1 - rho) * 30.0 + m.rate * 0.3, rel=1e-9)
    assert res.throughput_rps == pytest.approx(m.rate, rel=1e-9)


@pytest.mark.parametrize("truncation", [1, 3, 20, 200])
def test_fluid_tail_is_exact_for_mg1_at_any_truncation(truncation):
    """B = 1: the walk above N steps down by one, lands exactly on N, and the drain cost is exact."""
    tau, cv = 0.002, 2.0
    m = mg1(0.9 / tau, tau, cv)
    res = solve(m, truncation=truncation)
    assert res.mean_latency_s == pytest.approx(pollaczek_khinchine(m.rate, tau, cv), rel=1e-9)


def test_first_order_tail_misses_the_variance_term_but_converges():
    """The pure fluid drain is wrong at small N for variable service, and right as N grows."""
    tau, cv = 0.002, 2.0
    m = mg1(0.8 / tau, tau, cv)
    exact = pollaczek_khinchine(m.rate, tau, cv)
    small = solve(m, truncation=5, tail="first-order").mean_latency_s
    large = solve(m, truncation=400, tail="first-order").mean_latency_s
    assert abs(small - exact) / exact > 1e-2
    assert abs(large - exact) / exact < 1e-6


# --- two methods, one answer ----------------------------------------------------------------------

AGREEMENT_CASES = [
    (4, 0.9, 0.0, 0.0),
    (4, 0.5, 1e-3, 1.0),
    (8, 0.3, 1e-5, 0.0),
    (8, 0.7, 1e-4, 0.5),
    (16, 0.6, 1e-4, 0.0),
    (32, 0.3, 1e-5, 0.0),
    # the sizes the paper benchmarks (RVI needs 1-3 thousand sweeps here, about 1-6 s each)
    (64, 0.6, 1e-4, 0.0),
    (64, 0.5, 1e-3, 0.5),
    (128, 0.5, 1e-4, 0.0),
]


@pytest.mark.parametrize("B,load,w,cv", AGREEMENT_CASES)
def test_rvi_and_pi_agree(B, load, w, cv):
    m = v100(B, load, w, cv)
    pi = solve(m, "pi")
    rvi = solve(m, "rvi", truncation=pi.truncation)
    assert rvi.converged and pi.converged
    assert rvi.gain == pytest.approx(pi.gain, rel=1e-6)
    lo, hi = rvi.gain_bounds
    assert lo <= pi.gain * (1 + 1e-12) and pi.gain <= hi * (1 + 1e-12)
    np.testing.assert_array_equal(rvi.policy.actions, pi.policy.actions)


class _Flip:
    """Two states that swap at every step with equal sojourns: a periodic chain (period 2)."""

    n_states = 2
    valid = np.ones((2, 1), dtype=bool)
    time = np.ones((2, 1))
    cost = np.array([[1.0], [3.0]])

    def expected_next(self, h):
        return np.array([[h[1]], [h[0]]])


def test_rvi_uniformisation_makes_a_periodic_chain_converge():
    """With tau_u = min tau exactly there is no self-loop: V_k+1 - V_k alternates (1, 3), (3, 1), ...
    and the bounds never meet. Tijms' tau_u < min tau adds one and value iteration converges."""
    from solver.rvi import UNIFORMISATION_FACTOR, relative_value_iteration

    assert UNIFORMISATION_FACTOR < 1
    out = relative_value_iteration(_Flip(), tol=1e-9, max_iter=20_000)
    assert out.converged
    assert out.gain == pytest.approx(2.0, rel=1e-8)  # (1 + 3) / 2 per unit time


def test_rvi_with_automatic_truncation_agrees_with_pi():
    m = v100(8, 0.6, 1e-4, 0.0)
    pi, rvi = solve(m, "pi"), solve(m, "rvi")
    assert rvi.gain == pytest.approx(pi.gain, rel=1e-6)
    common = min(pi.truncation, rvi.truncation) + 1
    np.testing.assert_array_equal(rvi.policy.actions[:common], pi.policy.actions[:common])


@pytest.mark.parametrize("method", ["pi", "rvi"])
def test_warm_start_gives_the_same_answer_with_less_work(method):
    m = v100(16, 0.6, 1e-4)
    cold = solve(m, method)
    near = solve(m.with_(rate=m.rate * 1.05), method)
    warm = solve(m, method, warm_start=near.policy)
    assert warm.gain == pytest.approx(cold.gain, rel=1e-6)
    common = min(warm.truncation, cold.truncation) + 1
    np.testing.assert_array_equal(warm.policy.actions[:common], cold.policy.actions[:common])
    again = solve(m, method, warm_start=cold.policy)
    assert again.iterations < cold.iterations


# --- truncation -----------------------------------------------------------------------------------

TRUNCATION_CASES = [
    (8, 0.9, 1e-5, 0.0),
    (32, 0.6, 1e-4, 1.0),
    (32, 0.9, 1e-5, 2.0),
    (64, 0.9, 1e-4, 0.0),
    (64, 0.6, 1e-4, 1.0),
]


@pytest.mark.parametrize("B,load,w,cv", TRUNCATION_CASES)
def test_growing_truncation_past_the_automatic_choice_changes_nothing(B, load, w, cv):
    m = v100(B, load, w, cv)
    auto = solve(m)
    assert auto.converged and auto.truncation >= B
    for factor in (1.5, 2.5):
        big = solve(m, truncation=int(auto.truncation * factor), warm_start=auto.policy)
        assert big.gain == pytest.approx(auto.gain, rel=1e-8)
        np.testing.assert_array_equal(big.policy.actions[: auto.truncation + 1], auto.policy.actions)
        # beyond the automatic N the larger solve serves full batches, as the table's rule says
        assert np.all(big.policy.actions[auto.truncation + 1 :] == B)


def test_automatic_truncation_stops_once_the_gain_settles():
    """Growth tolerance 1e-8: at B = 64, CV 1, load 0.6 the 1.25 steps 220 -> 276 -> 346 settle (the
    gain moves by about 1e-9 on the last one, the policy not at all); the 1.5 steps of the solver
    before went on to 497 for the same gain and policy."""
    m = v100(64, 0.6, 1e-4, 1.0)
    auto = solve(m)
    assert auto.converged and auto.sizes_tried == (220, 276, 346)
    before = solve(m, growth=1.5, resume_warm_start=False, linear_solver="dense")
    assert before.converged and before.sizes_tried == (220, 331, 497)
    assert auto.gain == pytest.approx(before.gain, rel=1e-9)
    np.testing.assert_array_equal(before.policy.actions[: auto.truncation + 1], auto.policy.actions)
    big = solve(m, truncation=3 * auto.truncation, warm_start=auto.policy)
    assert big.gain == pytest.approx(auto.gain, rel=1e-9)
    np.testing.assert_array_equal(big.policy.actions[: auto.truncation + 1], auto.policy.actions)


BEFORE_CASES = [
    (16, 0.9, 1e-4, 2.0),
    (32, 0.6, 1e-4, 1.0),
    (32, 0.9, 1e-4, 1.0),
    (64, 0.9, 1e-4, 0.0),
    (64, 0.9, 1e-4, 1.0),
    (128, 0.6, 1e-4, 1.0),  # the case: N = 1478 before
]


@pytest.mark.parametrize("B,load,w,cv", BEFORE_CASES)
def test_automatic_truncation_agrees_with_the_solver_before_at_a_smaller_n(B, load, w, cv):
    """Same gain (1e-8) and policy as the search before (1.5x growth, dense LU), with N no larger,
    cold and warm-started from a neighbouring rate."""
    m = v100(B, load, w, cv)
    before = solve(m, growth=1.5, resume_warm_start=False, linear_solver="dense")
    near = solve(m.with_(rate=0.95 * m.rate))
    for res in (solve(m), solve(m, warm_start=near.policy)):
        assert res.converged and before.converged
        assert res.truncation <= before.truncation
        assert res.gain == pytest.approx(before.gain, rel=1e-8)
        np.testing.assert_array_equal(res.policy.actions, before.policy.actions[: res.truncation + 1])


def test_warm_start_resumes_the_search_two_steps_below_its_size():
    """A neighbour's N is about where the search will settle: start on the search's own sizes two
    steps below it (three sizes, as the stopping rule needs unless the step is at rounding level), so
    a chain of warm solves neither climbs from the bottom nor creeps upwards."""
    m = v100(64, 0.6, 1e-4, 1.0)
    cold = solve(m)
    assert len(cold.sizes_tried) >= 3
    again = solve(m, warm_start=cold.policy)
    assert again.sizes_tried == cold.sizes_tried[-3:]
    assert solve(m, warm_start=again.policy).sizes_tried == again.sizes_tried
    near = solve(m.with_(rate=0.99 * m.rate))
    warm = solve(m, warm_start=near.policy)
    assert warm.sizes_tried == cold.sizes_tried[-len(warm.sizes_tried) :]  # the same sizes, from higher up
    assert len(warm.sizes_tried) <= len(cold.sizes_tried)
    assert warm.sizes_tried[2] <= near.truncation * 1.25**0.5 < int(warm.sizes_tried[2] * 1.25) + 1
    # a table far smaller than the first size is no reason to start below it
    small = solve(m, warm_start=PolicyTable(near.policy.actions[:80], 64))
    assert small.sizes_tried[0] == cold.sizes_tried[0]
    # and the search as it was stays available
    assert solve(m, warm_start=cold.policy, resume_warm_start=False).sizes_tried[0] == cold.sizes_tried[0]


def test_the_returned_gain_is_within_the_tolerance_of_the_limit():
    """The contraction check: the gain at the returned N is within 1e-8 of a far larger truncation
    in cases whose first step was not yet settled (CV 1-2)."""
    for B, load, cv in [(16, 0.9, 2.0), (32, 0.9, 1.0), (64, 0.6, 1.0)]:
        m = v100(B, load, 1e-4, cv)
        auto = solve(m)
        assert len(auto.sizes_tried) >= 3
        limit = solve(m, truncation=4 * auto.truncation, warm_start=auto.policy)
        assert abs(auto.gain - limit.gain) <= 1e-8 * limit.gain


@pytest.mark.parametrize("B,load,w,cv", [(16, 0.9, 1e-5, 2.0), (16, 0.75, 1e-3, 2.0), (16, 0.45, 1e-5, 1.0)])
def test_automatic_truncation_does_not_stop_on_an_accidental_small_step(B, load, w, cv):
    """The gain's error changes sign as N grows and can stay flat over one step: these searches
    stopped on two sizes whose gains agreed by accident (118 -> 148: 4e-9 apart, 1e-7 from the
    limit), or on a tiny step after a large one (101 -> 127 -> 159). The gain must be within 1e-8 of
    a far larger truncation, with the same policy on the common states."""
    m = v100(B, load, w, cv)
    auto = solve(m)
    assert auto.converged and len(auto.sizes_tried) >= 3
    limit = solve(m, truncation=2000)
    assert abs(auto.gain - limit.gain) <= 1e-8 * limit.gain
    np.testing.assert_array_equal(limit.policy.actions[: auto.truncation + 1], auto.policy.actions)


@pytest.mark.parametrize("B,load,w,cv", [(8, 0.9, 1e-5, 0.0), (16, 0.7, 1e-4, 1.0), (32, 0.9, 1e-4, 0.0)])
def test_fluid_tail_gain_equals_a_very_large_plain_truncation(B, load, w, cv):
    m = v100(B, load, w, cv)
    fluid = solve(m)
    plain = solve(m, tail="none", truncation=12 * fluid.truncation, warm_start=fluid.policy)
    assert plain.gain == pytest.approx(fluid.gain, rel=1e-8)
    np.testing.assert_array_equal(plain.policy.actions[: fluid.truncation + 1], fluid.policy.actions)
    # and the plain truncation at the fluid tail's N is visibly worse: the tail cost is doing work
    short = solve(m, tail="none", truncation=B)
    assert abs(short.gain - fluid.gain) > 1e-6 * fluid.gain


# --- optimality -----------------------------------------------------------------------------------

OPT_CASES = [(8, 0.5, 1e-4, 0.0), (16, 0.9, 1e-5, 1.0), (32, 0.3, 1e-3, 0.0)]


@pytest.mark.parametrize("B,load,w,cv", OPT_CASES)
def test_gain_is_not_above_any_baseline(B, load, w, cv):
    m = v100(B, load, w, cv)
    res = solve(m)
    slack = 1e-9 * res.gain
    costs = {"greedy": evaluate(m, greedy(B)).cost}
    for k in range(1, B + 1):
        costs[f"threshold {k}"] = evaluate(m, threshold(B, k)).cost
    for b0 in range(1, B + 1):
        try:
            costs[f"static {b0}"] = evaluate(m, static(B, b0)).cost
        except UnstablePolicyError:
            assert b0 / m.profile.mean_s[b0 - 1] <= m.rate
    assert len(costs) > B + 1
    worst = {name: c for name, c in costs.items() if c < res.gain - slack}
    assert not worst, f"gain {res.gain} above baselines {worst}"
    # the optimum is attained: some baseline is optimal only if the policy is that baseline
    assert min(costs.values()) >= res.gain - slack


def test_gain_equals_exact_evaluation_of_the_returned_policy():
    for B, load, w, cv in [(8, 0.5, 1e-4, 0.0), (32, 0.9, 1e-5, 1.0), (64, 0.6, 1e-4, 0.0)]:
        m = v100(B, load, w, cv)
        res = solve(m)
        ev = evaluate(m, res.policy)  # its own automatic truncation, independent of the solver's
        assert ev.cost == pytest.approx(res.gain, rel=1e-6)
        assert res.mean_latency_s + m.weight * res.mean_power_w == pytest.approx(res.gain, rel=1e-9)
        assert res.mean_latency_s == pytest.approx(ev.mean_latency_s, rel=1e-6)
        assert res.mean_power_w == pytest.approx(ev.mean_power_w, rel=1e-6)
        assert res.throughput_rps == pytest.approx(m.rate, rel=1e-9)


def test_zero_weight_serves_at_once_at_low_load_but_not_at_high_load():
    """What is true for w = 0 (latency only) on the V100 profile.

    At low load the optimum is greedy: serve everything as soon as the server is free. At high load
    it is not: a batch of 1 spends tau(1) = 2.1 ms of a server that is 90% busy, so waiting for a
    few more requests lowers the mean latency even though nobody pays for power.
    """
    low = v100(8, 0.3, 0.0)
    res = solve(low)
    assert res.threshold() == 1
    assert res.gain == pytest.approx(evaluate(low, greedy(8)).cost, rel=1e-12)
    high = v100(8, 0.9, 0.0)
    res = solve(high)
    assert res.policy.action(1) == 0
    assert evaluate(high, greedy(8)).cost > res.gain * (1 + 1e-4)  # 0.1% here; noise is 1e-12
    # w = 0: the cost is the mean latency and nothing else
    assert res.gain == pytest.approx(res.mean_latency_s, rel=1e-12)


def test_large_weight_waits_for_fuller_batches():
    for B in (8, 32):
        m = v100(B, 0.5, 1e-3)
        res = solve(m)
        assert res.policy.action(1) == 0
        k = res.threshold()
        assert k is not None and k > 1
        lighter = solve(m.with_(weight=1e-6))
        assert res.mean_power_w < lighter.mean_power_w
        assert res.mean_latency_s > lighter.mean_latency_s


def test_large_batches_at_low_load_split_rare_long_queues():
    """Not every optimum is control-limit: with tau affine in b, serving a long queue in two batches
    gives the first half a shorter batch. The solver's answer must still beat the best threshold."""
    m = v100(32, 0.3, 0.0)
    res = solve(m)
    a = res.policy.actions
    n = np.arange(a.size)
    assert np.any((a > 0) & (a < np.minimum(n, 32)))
    best_threshold = min(evaluate(m, threshold(32, k)).cost for k in range(1, 33))
    assert res.gain < best_threshold


# --- result record and arguments ------------------------------------------------------------------


def test_result_dict_is_json_and_complete():
    m = BatchingModel(rate=1000.0, max_batch=8, profile=V100, idle_power_w=40.0, weight=1e-4)
    res = solve(m)
    assert isinstance(res, SolveResult)
    d = json.loads(json.dumps(res.to_dict()))
    for key in ("policy", "gain", "mean_latency_s", "mean_power_w", "throughput_rps", "mean_batch",
                "iterations", "converged", "solve_time_s", "truncation", "method", "threshold", "rate",
                "weight", "max_batch", "interpolated"):
        assert key in d
    assert d["policy"] == res.policy.actions.tolist()
    assert len(d["policy"]) == res.truncation + 1
    assert d["threshold"] == res.threshold()
    assert d["interpolated"] == [3, 5, 6, 7]  # V100 table gives 1, 2, 4, 8
    assert d["rate"] == m.rate and d["max_batch"] == 8


def test_interpolated_sizes_are_reported_for_the_full_table():
    m = BatchingModel(rate=1000.0, max_batch=128, profile=V100, idle_power_w=40.0, weight=1e-4)
    given = {1, 2, 4, 8, 64, 128}
    assert set(m.profile.interpolated) == set(range(1, 129)) - given


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "newton"}, "method"),
        ({"tail": "exact"}, "tail"),
        ({"truncation": 4}, "truncation 4 must be >= max_batch B = 8"),
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"warm_start": PolicyTable(np.zeros(5, dtype=int), 4)}, "max_batch 4"),
        ({"growth": 1.0}, "growth"),
        ({"growth": float("inf")}, "growth"),
        ({"linear_solver": "cholesky"}, "linear_solver"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ModelError, match=match):
        solve(v100(8, 0.5, 1e-4), **kwargs)


def test_rvi_reports_non_convergence():
    res = solve(v100(8, 0.9, 1e-4), "rvi", truncation=40, max_iter=5)
    assert not res.converged and res.iterations == 5
    lo, hi = res.gain_bounds
    assert lo < hi


SPARSE_CASES = [
    (16, 0.6, 1e-4, 0.0),  # deterministic
    (64, 0.9, 1e-4, 0.0),
    (64, 0.6, 1e-4, 1.0),  # CV 1: the K window covers all of 0..N
    (128, 0.9, 1e-4, 1.0),
]


@pytest.mark.parametrize("B,load,w,cv", SPARSE_CASES)
def test_sparse_and_dense_linear_solves_agree(B, load, w, cv):
    m = v100(B, load, w, cv)
    dense = solve(m, linear_solver="dense")
    sparse = solve(m, linear_solver="sparse")
    assert sparse.truncation == dense.truncation
    assert sparse.gain == pytest.approx(dense.gain, rel=1e-10)
    np.testing.assert_array_equal(sparse.policy.actions, dense.policy.actions)
    assert sparse.mean_latency_s == pytest.approx(dense.mean_latency_s, rel=1e-9)


def test_sparse_system_has_the_dense_entries():
    from solver.pi import evaluate_policy
    from solver.tail import build

    m = v100(32, 0.8, 1e-4, 1.0)
    smdp = build(m, 90)
    n = np.arange(smdp.n_states)
    actions = np.where(n < 5, 0, np.minimum(n, 32))  # waits, partial and full batches
    P, c, tau = smdp.policy_arrays(actions)
    np.testing.assert_array_equal(smdp.transition_matrix(actions).toarray(), P)
    A, c2, tau2 = smdp.evaluation_system(actions)
    S, _, _ = smdp.evaluation_system(actions, sparse=True)
    np.testing.assert_array_equal(S.toarray(), A)
    expected = np.eye(smdp.n_states) - P
    expected[:, 0] = tau
    np.testing.assert_array_equal(A, expected)
    d, s = evaluate_policy(smdp, actions, "dense"), evaluate_policy(smdp, actions, "sparse")
    assert s.gain == pytest.approx(d.gain, rel=1e-12)
    np.testing.assert_allclose(s.pi, d.pi, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError):
        evaluate_policy(smdp, actions, "cholesky")


# --- the banded-below evaluation ------------------------------------------------------------------


def test_banded_below_lu_solves_a_system_that_needs_pivoting():
    """Random matrix zero below its 5th subdiagonal, zero diagonal: both solves match numpy's."""
    from solver.pi import BandedBelowLU

    rng = np.random.default_rng(7)
    n, band = 47, 5
    M = rng.standard_normal((n, n))
    M[np.tril_indices(n, -band - 1)] = 0.0
    M[np.diag_indices(n)] = 0.0
    b = rng.standard_normal(n)
    lu = BandedBelowLU.of(M, band)
    np.testing.assert_allclose(lu.solve(b), np.linalg.solve(M, b), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lu.solve_transposed(b), np.linalg.solve(M.T, b), rtol=1e-10, atol=1e-12)
    # the band is checked by the structure, not trusted: a wider one gives a wrong answer
    wide = rng.standard_normal((n, n))
    wide[np.tril_indices(n, -3 * band)] = 0.0
    bad = BandedBelowLU.of(wide, band).solve(b)
    assert not np.allclose(bad, np.linalg.solve(wide, b))


def test_banded_lu_storage_rebanded_to_fewer_subdiagonals_solves_like_a_fresh_one():
    """One storage of capacity 9 factors a 9-band matrix, then a 4-band one in a narrower layout (and
    back): each solve is a fresh LU's answer; more subdiagonals than the capacity is refused."""
    from solver.pi import BandedBelowLU

    rng = np.random.default_rng(11)
    n = 40
    b = rng.standard_normal(n)
    lu = BandedBelowLU(n, 9, capacity=9)
    for band in (9, 4, 9, 1):
        M = rng.standard_normal((n, n)) + 4 * np.eye(n)
        M[np.tril_indices(n, -band - 1)] = 0.0
        lu.clear(band)
        assert lu.kl == band
        lu.matrix[:] = np.triu(M, -band)
        lu.factor()
        fresh = BandedBelowLU.of(M, band)
        np.testing.assert_array_equal(lu.solve(b), fresh.solve(b))
        np.testing.assert_allclose(lu.solve(b), np.linalg.solve(M, b), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lu.solve_transposed(b), np.linalg.solve(M.T, b), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="kl must be"):
        lu.clear(10)


def test_policy_evaluation_factors_with_the_policys_own_band():
    """The evaluation LU holds the largest batch + 1 subdiagonals of the policy (not B + 1), and its
    values are the dense evaluation's; a policy with a larger batch after a smaller one gets its band."""
    from solver.pi import PolicyEvaluator, evaluate_policy
    from solver.tail import build

    B, N = 32, 200
    smdp = build(v100(B, 0.6, 1e-4, 1.0), N)
    n = np.arange(N + 1)
    evaluate = PolicyEvaluator(smdp, "banded")
    for cap in (12, 32, 20, 5):
        actions = np.minimum(n, cap)
        got = evaluate.refactor(actions)
        assert evaluate._base is not None and evaluate._base.lu.kl == cap + 1
        dense = evaluate_policy(smdp, actions, "dense")
        assert got.gain == pytest.approx(dense.gain, rel=1e-12)
        np.testing.assert_allclose(got.h, dense.h, rtol=1e-10, atol=1e-12 * np.max(np.abs(dense.h)))
        np.testing.assert_allclose(got.pi, dense.pi, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("B,N,cv", [(4, 40, 1.0), (8, 61, 0.0), (32, 150, 1.0), (32, 130, 2.0)])
def test_banded_evaluation_equals_the_dense_one(B, N, cv):
    """Every policy shape (waits, partial and full batches, waits above B) on several block counts
    (at least MIN_BLOCKS blocks of B + 1 states, so the banded path runs; full and partial last blocks)."""
    from solver.pi import evaluate_policy
    from solver.tail import build

    from solver.pi import MIN_BLOCKS

    assert N + 1 >= MIN_BLOCKS * (B + 1)
    m = v100(B, 0.8, 1e-4, cv)
    smdp = build(m, N)
    n = np.arange(N + 1)
    rng = np.random.default_rng(B + N)
    policies = [
        np.minimum(n, B),
        np.where(n < 3, 0, np.minimum(n, B)),
        np.where(n < B + 3, 0, B),  # a threshold above B waits at n >= B
        np.where(n == 0, 0, rng.integers(1, np.maximum(np.minimum(n, B), 1) + 1)),
    ]
    for actions in policies:
        M, c, tau = smdp.hessenberg_system(actions)
        A, _, _ = smdp.evaluation_system(actions)
        np.testing.assert_array_equal(M, np.concatenate([A[:, 1:], A[:, :1]], axis=1))
        assert not np.any(np.tril(M, -B - 2))
        d, b = evaluate_policy(smdp, actions, "dense"), evaluate_policy(smdp, actions, "banded")
        assert b.gain == pytest.approx(d.gain, rel=1e-12)
        np.testing.assert_allclose(b.h, d.h, rtol=1e-10, atol=1e-12 * np.max(np.abs(d.h)))
        np.testing.assert_allclose(b.pi, d.pi, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("cv", [0.0, 1.0])
def test_build_from_a_longer_count_pmf_is_the_same_smdp(cv):
    """The automatic truncation computes the arrivals' pmf (and the arrays that do not depend on N) once
    for several sizes: every array is the one build computes on its own; a pmf or arrays shorter than N,
    or another model's, are refused."""
    from solver.model import ModelError
    from solver.tail import PairArrays, build, count_arrivals

    m = v100(32, 0.6, 1e-4, cv)
    own = build(m, 150)
    counts = count_arrivals(m, 188)
    pairs = PairArrays(m, 188)
    # the shared prefix sums and transposed pmf, a plain B x (kmax + 1) array, the shared N-free arrays
    for shared in (build(m, 150, counts=counts), build(m, 150, counts=counts.pmf),
                   build(m, 150, counts=counts, pairs=pairs)):
        for name in ("pmf", "pmf_t", "valid", "latency", "energy", "time", "tail_p", "tail_m", "cost", "_gather"):
            np.testing.assert_array_equal(getattr(shared, name), getattr(own, name))
        assert shared.pmf_t.flags.c_contiguous
    with pytest.raises(ModelError, match="kmax >= N"):
        build(m, 150, counts=count_arrivals(m, 120))
    with pytest.raises(ModelError, match="nmax >= N"):
        build(m, 150, pairs=PairArrays(m, 120))
    with pytest.raises(ModelError, match="this model"):
        build(m, 150, pairs=PairArrays(m.with_(rate=0.9 * m.rate), 188))


def test_hessenberg_rows_are_rows_of_the_system():
    from solver.tail import build

    m = v100(16, 0.7, 1e-4, 1.0)
    smdp = build(m, 70)
    n = np.arange(71)
    actions = np.where(n < 4, 0, np.minimum(n, 16))
    M, c, _ = smdp.hessenberg_system(actions)
    states = np.array([0, 3, 4, 17, 70])
    rows, rc = smdp.hessenberg_rows(actions, states)
    np.testing.assert_array_equal(rows, M[states])
    np.testing.assert_array_equal(rc, c[states])


@pytest.mark.parametrize("cv", [0.0, 1.0])
def test_low_rank_update_equals_a_fresh_evaluation(cv):
    """A policy that differs from the factored one in a few states is solved by the Woodbury update:
    gain, h and pi as a dense LU gives them; a larger change is factored afresh."""
    from solver.pi import MAX_UPDATE_RANK, PolicyEvaluator, evaluate_policy
    from solver.tail import build

    B, N = 32, 160
    m = v100(B, 0.7, 1e-4, cv)
    smdp = build(m, N)
    n = np.arange(N + 1)
    base = np.where(n < 5, 0, np.minimum(n, B))
    ev = PolicyEvaluator(smdp)
    ev(base)
    assert not ev.updated
    rng = np.random.default_rng(3)
    for r in (1, 4, MAX_UPDATE_RANK):
        changed = np.sort(rng.choice(np.arange(B, N + 1), size=r, replace=False))
        other = base.copy()
        other[changed] = rng.integers(1, B + 1, size=r)
        other[changed] = np.where(other[changed] == base[changed], 1, other[changed])
        got = ev(other)
        assert ev.updated
        want = evaluate_policy(smdp, other, "dense")
        assert got.gain == pytest.approx(want.gain, rel=1e-12)
        np.testing.assert_allclose(got.h, want.h, rtol=1e-10, atol=1e-12 * np.max(np.abs(want.h)))
        np.testing.assert_allclose(got.pi, want.pi, rtol=1e-8, atol=1e-15)
    many = np.where(n < 5, 0, np.maximum(np.minimum(n, B) - 1, 1))  # differs in more than MAX_UPDATE_RANK states
    assert np.count_nonzero(many != base) > MAX_UPDATE_RANK
    got = ev(many)
    assert not ev.updated
    assert got.gain == pytest.approx(evaluate_policy(smdp, many, "dense").gain, rel=1e-12)


def test_policy_iteration_refactors_an_update_that_lost_accuracy(monkeypatch):
    """The Bellman residual of an updated evaluation is checked: a wrong update is redone with a
    fresh LU, and policy iteration lands where it does without updates."""
    import solver.pi as pi
    from solver.tail import build

    m = v100(32, 0.6, 1e-4, 1.0)
    smdp = build(m, 200)
    want = pi.policy_iteration(smdp)
    calls = []
    real = pi._BandedSolve.updated

    def spoiled(self, smdp, actions, states):
        v = real(self, smdp, actions, states)
        calls.append(states.size)
        return pi.PolicyValues(v.gain, v.h * (1 + 1e-6), v.pi)

    monkeypatch.setattr(pi._BandedSolve, "updated", spoiled)
    refactored = []
    real_refactor = pi.PolicyEvaluator.refactor
    monkeypatch.setattr(pi.PolicyEvaluator, "refactor", lambda self, a: refactored.append(1) or real_refactor(self, a))
    got = pi.policy_iteration(smdp, krylov=False)  # (with GMRES its later steps are far from the first LU)
    assert calls, "the case must take a low-rank step"
    assert len(refactored) >= len(calls) + 1  # the first LU, then every spoiled update redone
    np.testing.assert_array_equal(got.actions, want.actions)
    assert got.values.gain == pytest.approx(want.values.gain, rel=1e-12)


def test_extended_values_follow_the_fluid_tail():
    """The seed of the next size: h above N is h(N) plus the excursion's relative cost."""
    from solver.pi import policy_iteration
    from solver.smdp import _extended_values
    from solver.tail import build

    m = v100(32, 0.6, 1e-4, 1.0)
    smdp = build(m, 120)
    values = policy_iteration(smdp).values
    h = _extended_values(smdp, values, 151)
    np.testing.assert_array_equal(h[:121], values.h)
    c, mm = smdp.coeffs, 30.0
    delta = c.lin * mm + c.quad * mm**2 + m.weight * c.energy * mm - values.gain * c.time * mm
    assert h[150] - h[120] == pytest.approx(delta, rel=1e-12)
    # and it is close to what the larger truncation's own evaluation gives there
    big = policy_iteration(build(m, 150)).values
    assert abs(h[150] - big.h[150]) < 1e-3 * abs(big.h[150])


# --- the control-limit family (Deb & Serfozo) ------------------------------------------------------


def constant_service(B: int, load: float, weight: float, cv: float = 0.0) -> BatchingModel:
    """Deb & Serfozo's setting: a batch of any size takes the same time and energy."""
    prof = ServiceProfile.affine(B, 0.0, 0.004, 0.0, 0.6, cv=cv)
    m = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=40.0, weight=weight)
    return m.with_(rate=load * m.capacity)


@pytest.mark.parametrize(
    "model",
    [v100(8, 0.5, 1e-4), v100(16, 0.9, 1e-5, 1.0), v100(32, 0.3, 1e-3), v100(64, 0.6, 1e-4, 1.0),
     constant_service(16, 0.5, 1e-5), constant_service(64, 0.3, 1e-5)],
)
def test_control_limit_search_finds_the_best_limit_of_the_family(model):
    from solver.pi import control_limit, control_limit_search, evaluate_policy
    from solver.tail import build

    smdp = build(model, solve(model).truncation)
    found = control_limit_search(smdp)
    gains = [evaluate_policy(smdp, control_limit(smdp.n_states, model.max_batch, t)).gain
             for t in range(1, model.max_batch + 1)]
    assert found.limit == int(np.argmin(gains)) + 1
    assert found.values.gain == pytest.approx(min(gains), rel=1e-12)
    assert found.evaluations < model.max_batch or model.max_batch <= 8


@pytest.mark.parametrize("B,load,w,cv,limit", [(16, 0.5, 1e-5, 0.0, 7), (16, 0.3, 1e-4, 0.0, 11),
                                                (32, 0.2, 3e-5, 0.0, 8), (64, 0.3, 1e-5, 0.0, 15),
                                                (16, 0.7, 1e-4, 0.5, 16)])
def test_with_size_independent_service_the_optimum_is_the_best_control_limit(B, load, w, cv, limit):
    """Deb & Serfozo (1973): policy iteration over all policies lands on a control limit, the one
    the family search picks, with the same gain."""
    from solver.pi import control_limit_search
    from solver.tail import build

    m = constant_service(B, load, w, cv)
    res = solve(m)
    found = control_limit_search(build(m, res.truncation))
    assert res.policy.threshold() == found.limit == limit
    np.testing.assert_array_equal(res.policy.actions, found.actions)
    assert found.values.gain == pytest.approx(res.gain, rel=1e-12)
    started = solve(m, control_limit_start=True)
    assert started.gain == pytest.approx(res.gain, rel=1e-12)
    np.testing.assert_array_equal(started.policy.actions, res.policy.actions)


@pytest.mark.parametrize("B,load,w,cv", [(8, 0.5, 1e-4, 0.0), (32, 0.6, 1e-4, 1.0), (64, 0.6, 1e-4, 1.0)])
def test_a_control_limit_start_changes_nothing_but_the_path(B, load, w, cv):
    """Where the optimum is not a control limit (V100, CV 1) PI from the family's best still finds it."""
    m = v100(B, load, w, cv)
    greedy_start, cl_start = solve(m), solve(m, control_limit_start=True)
    assert cl_start.gain == pytest.approx(greedy_start.gain, rel=1e-10)
    common = min(cl_start.truncation, greedy_start.truncation) + 1
    np.testing.assert_array_equal(cl_start.policy.actions[:common], greedy_start.policy.actions[:common])


def test_a_weight_that_overflows_the_gain_is_not_reported_converged():
    """w x e(b) past the float range (w = 1e308) leaves the gain NaN: that solve must not claim to have
    converged, since the sidecar installs only converged policies."""
    from solver.model import BatchingModel, ServiceProfile

    profile = ServiceProfile.from_csv(Path(__file__).resolve().parents[1] / "profiles" / "v100_resnet50.csv")
    bad = solve(BatchingModel(rate=2000.0, max_batch=64, profile=profile, idle_power_w=40.0, weight=1e308))
    assert not bad.converged
    fine = solve(BatchingModel(rate=2000.0, max_batch=64, profile=profile, idle_power_w=40.0, weight=1e300))
    assert fine.converged and math.isfinite(fine.gain)


@pytest.mark.parametrize("cv,groups", [(0.0, False), (1.0, False), (1.0, True)])
def test_q_values_from_a_state_on_are_the_full_tables_rows(cv, groups):
    from solver.arrival_model import CompoundPoisson
    from solver.pi import q_values
    from solver.tail import build

    m = v100(16, 0.6, 1e-4, cv)
    if groups:
        m = m.with_(arrivals=CompoundPoisson(2.0))
    smdp = build(m, 90)
    h = np.linspace(0.0, 3.0, 91) ** 2
    full = q_values(smdp, h, 0.4)
    for first in (0, 5, 16, 40, 90):
        np.testing.assert_allclose(q_values(smdp, h, 0.4, first), full[first:], rtol=1e-13)


def _decimal_pmf(first, ratio, kmax: int, ks: set[int]) -> np.ndarray:
    """A pmf at the points ks by its ratio recurrence in 45-digit decimal arithmetic (the reference)."""
    from decimal import Decimal

    v, out = first, []
    for k in range(kmax + 1):
        if k in ks:
            out.append(float(v))
        v = v * ratio(Decimal(k))
    return np.array(out)


@pytest.mark.parametrize("cv, mean", [(1.0, 154.0), (1.0, 20.0), (0.01, 1000.0), (0.1, 154.0), (2.0, 1.0),
                                      (0.5, 300.0), (0.0, 0.6), (0.0, 154.0), (0.0, 1500.0)])
def test_arrival_pmf_recurrence_is_as_accurate_as_scipy(cv, mean):
    """The pmf from scipy anchors and the ratio recurrence: against a 45-digit reference at least as
    accurate as scipy's own values (both about 1e-12 relative at k in the thousands, up to 6e-12
    for Poisson means in the thousands), and within 1e-11 of scipy, on every entry above the 1e-20 floor; large shape (CV 0.01), long geometric
    tails (CV 1), Poisson means whose left tail underflows (1500: blocks with tiny anchors)."""
    from decimal import Decimal, localcontext

    from scipy import stats

    from solver.tail import arrival_pmf_matrix

    kmax = 3000
    ks = set(range(0, kmax + 1, 7))
    idx = np.array(sorted(ks))
    t = np.array([1.0, 1.1])
    prof = ServiceProfile(mean_s=t, energy_j=[1.0, 1.0], cv=[cv, cv])
    got = arrival_pmf_matrix(prof, mean, kmax)
    for b in range(2):
        with localcontext() as ctx:
            ctx.prec = 45
            if cv == 0:
                mu = Decimal(float(mean * t[b]))
                ref = _decimal_pmf((-mu).exp(), lambda k: mu / (k + 1), kmax, ks)
                scipy_values = stats.poisson.pmf(idx, mean * t[b])
            else:
                shape = 1.0 / cv**2
                p = 1.0 / (1.0 + mean * t[b] * cv**2)
                r, pd = Decimal(shape), Decimal(p)
                ref = _decimal_pmf((r * pd.ln()).exp(), lambda k: (k + r) / (k + 1) * (1 - pd), kmax, ks)
                scipy_values = stats.nbinom.pmf(idx, shape, p)
        mask = ref > 1e-20
        err = np.max(np.abs(got[b, idx][mask] - ref[mask]) / ref[mask])
        err_scipy = np.max(np.abs(scipy_values[mask] - ref[mask]) / ref[mask])
        assert err <= 1.5 * err_scipy + 2e-14, (b, err, err_scipy)
        full = np.asarray(prof.arrival_pmf(b + 1, mean, kmax))
        big = full > 1e-20
        assert np.max(np.abs(got[b][big] - full[big]) / full[big]) < 1e-11
        assert np.all(np.abs(got[b] - full) <= 1e-11 * full + 1e-280)


def test_stationary_distribution_of_a_replaced_factorisation_is_evaluated_afresh():
    """pi is solved when first read; read after its LU storage was refactored for another policy,
    it comes from a fresh evaluation, not from the other policy's factors."""
    from solver.pi import PolicyEvaluator, evaluate_policy
    from solver.tail import build

    B, N = 32, 160
    m = v100(B, 0.7, 1e-4, 1.0)
    smdp = build(m, N)
    n = np.arange(N + 1)
    first = np.where(n < 5, 0, np.minimum(n, B))
    second = np.where(n < 9, 0, np.maximum(np.minimum(n, B) - 1, 1))
    small = first.copy()
    small[40] = 7
    ev = PolicyEvaluator(smdp)
    a = ev(first)
    b = ev(small)
    assert ev.updated
    c = ev(second)  # more than MAX_UPDATE_RANK changes: refactored in the same storage
    assert not ev.updated
    for got, actions in ((a, first), (b, small), (c, second)):
        want = evaluate_policy(smdp, actions, "dense")
        np.testing.assert_allclose(got.pi, want.pi, rtol=1e-8, atol=1e-15)
        assert got.pi.sum() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("B,N,cv,groups", [(32, 120, 1.0, False), (128, 500, 1.0, False), (128, 400, 0.0, False),
                                           (64, 300, 1.0, True)])
def test_expected_next_near_is_the_full_product_on_the_window(B, N, cv, groups):
    """The windowed product equals the full one (to rounding) on the wait and every serve action within
    the width of the given actions, and is +inf on exactly the other pairs."""
    from solver.arrival_model import CompoundPoisson
    from solver.tail import build

    m = v100(B, 0.6, 1e-4, cv)
    if groups:
        m = m.with_(arrivals=CompoundPoisson(2.0))
    smdp = build(m, N)
    rng = np.random.default_rng(7)
    n = np.arange(N + 1)
    actions = np.clip(np.minimum(n, B) - rng.integers(0, 12, N + 1), 0, B)
    actions[n >= B] = np.maximum(actions[n >= B], 1)
    h = np.cumsum(rng.uniform(0.0, 1.0, N + 1)) ** 1.5
    full = smdp.expected_next(h)
    for width in (1, 8):
        near = smdp.expected_next_near(h, actions, width)
        a = np.arange(B + 1)[None, :]
        want = (a >= 1) & (np.abs(a - actions[:, None]) <= width) & (a <= n[:, None])
        want[:, 0] = True
        np.testing.assert_array_equal(np.isfinite(near), want)
        np.testing.assert_allclose(near[want], full[want], rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("B,load,cv", [(256, 0.6, 1.0), (256, 0.9, 0.0), (128, 0.6, 1.0)])
def test_policy_iteration_near_actions_gives_the_full_improvements_answer(B, load, cv):
    """Improving near the current actions until that finds nothing, then over all: the same policy and
    gain as improving over all actions every step (from greedy and from a shifted start)."""
    from solver.pi import NEAR_ACTIONS, policy_iteration
    from solver.tail import build

    m = v100(B, load, 1e-4, cv) if B <= 128 else None
    if m is None:
        from solver import ServiceProfile

        prof = ServiceProfile.affine(B, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550, cv=cv)
        m0 = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=40.0, weight=1e-4)
        m = m0.with_(rate=load * m0.capacity)
    smdp = build(m, 3 * B)
    ref = policy_iteration(smdp, near=None)
    n = np.arange(smdp.n_states)
    starts = [None, np.clip(ref.actions - (n % 3), np.where(n < B, 0, 1), None)]
    for start in starts:
        out = policy_iteration(smdp, start, near=NEAR_ACTIONS)
        assert out.converged
        np.testing.assert_array_equal(out.actions, ref.actions)
        assert out.values.gain == pytest.approx(ref.values.gain, rel=1e-12)


@pytest.mark.parametrize("B,N,cv,groups,first", [(64, 500, 1.0, False, 0), (128, 700, 2.0, False, 200),
                                                 (64, 450, 1.0, True, 100), (32, 200, 0.0, False, 40)])
def test_serve_products_by_fft_are_the_hankel_products(B, N, cv, groups, first, monkeypatch):
    """The FFT form of the serve products gives the Hankel product's values on every allowed pair (to
    1e-12 relative), the wait column bit for bit, from any first state; its windowed product is its
    full one on the window, +inf elsewhere."""
    from solver import tail
    from solver.arrival_model import CompoundPoisson
    from solver.tail import build

    m = v100(B, 0.6, 1e-4, cv)
    if groups:
        m = m.with_(arrivals=CompoundPoisson(2.0))
    rng = np.random.default_rng(3)
    h = np.cumsum(rng.uniform(0.0, 1.0, N + 1)) ** 1.7
    n = np.arange(N + 1)
    actions = np.clip(np.minimum(n, B) - rng.integers(0, 12, N + 1), 0, B)
    actions[n >= B] = np.maximum(actions[n >= B], 1)
    out = {}
    for name, threshold in (("hankel", 10**9), ("fft", 1)):
        monkeypatch.setattr(tail, "SPECTRAL_MIN_BAND", threshold)
        smdp = build(m, N)
        assert (smdp._spectrum() is not None) == (name == "fft")
        out[name] = (smdp.expected_next(h, first), smdp.expected_next(h), smdp.expected_next_near(h, actions, 8))
    valid = smdp.valid
    for part, (got, want) in enumerate(zip(out["fft"], out["hankel"])):
        ok = valid[first:] if part == 0 else valid
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-12, atol=0.0)
        np.testing.assert_array_equal(got[:, 0], want[:, 0])
    full, near = out["fft"][1], out["fft"][2]
    np.testing.assert_array_equal(out["fft"][0], full[first:])
    a = np.arange(B + 1)[None, :]
    window = (a >= 1) & (np.abs(a - actions[:, None]) <= 8) & (a <= n[:, None])
    window[:, 0] = True
    np.testing.assert_array_equal(np.isfinite(near), window)
    np.testing.assert_array_equal(near[window], full[window])


@pytest.mark.parametrize("B,load,cv", [(64, 0.6, 2.0), (128, 0.6, 1.0), (256, 0.3, 1.0)])
def test_solve_with_fft_products_gives_the_hankel_products_answer(B, load, cv, monkeypatch):
    """The automatic truncation with the FFT serve products (the default where the pmf window is long)
    and with the Hankel products: the same sizes, policy, iterations, and gain to 1e-12, cold and
    warm (the product's rounding, 1e-13 relative at most, is far below the improvement's 1e-11 tie)."""
    from solver import tail
    from solver.tail import build

    if B <= 128:
        m = v100(B, load, 1e-4, cv)
    else:
        prof = ServiceProfile.affine(B, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550, cv=cv)
        m0 = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=40.0, weight=1e-4)
        m = m0.with_(rate=load * m0.capacity)
    results = {}
    for name, threshold in (("hankel", 10**9), ("fft", tail.SPECTRAL_MIN_BAND)):
        monkeypatch.setattr(tail, "SPECTRAL_MIN_BAND", threshold)
        warm = solve(m.with_(rate=0.95 * m.rate)).policy
        results[name] = (solve(m), solve(m, warm_start=warm))
    for got, want in zip(results["fft"], results["hankel"]):
        assert got.converged and want.converged
        assert got.sizes_tried == want.sizes_tried and got.iterations == want.iterations
        np.testing.assert_array_equal(got.policy.actions, want.policy.actions)
        assert got.gain == pytest.approx(want.gain, rel=1e-12)
    assert build(m, results["fft"][0].truncation)._spectrum() is not None  # the FFT path was the one taken


def _row_by_row_transitions(smdp, actions):
    """P of a policy written the plain way, one state at a time (the reference for the run fill)."""
    N, L = smdp.truncation, smdp.band
    P = np.zeros((N + 1, N + 1))
    for n in range(N + 1):
        a = int(actions[n])
        if a == 0:
            P[n, n + 1] = 1.0
            continue
        s = n - a
        e = min(s + L, N)
        P[n, s : e + 1] = smdp.pmf[a - 1, : e - s + 1]
        P[n, N] += smdp.tail_p[n, a]
    return P


@pytest.mark.parametrize("B,N,cv", [(16, 120, 0.0), (16, 120, 1.0), (32, 150, 2.0), (128, 700, 1.0)])
def test_transitions_written_by_runs_of_equal_actions_are_the_row_by_row_ones(B, N, cv):
    """A whole policy's rows are written by runs of states with the same action (strided 2-D writes),
    bit for bit the plain row-by-row matrix: in a dense array, in the banded LU's storage and as the
    rows of a low-rank update; runs whose windows end inside 0..N (CV 0) or at N (CV 1-2), broken by
    waits, of length one (serve all below B) and long (full batches)."""
    from solver.pi import BandedBelowLU
    from solver.tail import build

    m = v100(B, 0.8, 1e-4, cv)
    smdp = build(m, N)
    n = np.arange(N + 1)
    rng = np.random.default_rng(N)
    ramp = np.minimum(np.maximum(n // 3, 1), B)
    policies = [
        np.minimum(n, B),
        np.where(n == 0, 0, np.minimum(ramp, n)),
        np.where((n < 3) | ((n > B // 2) & (n < B) & (n % 4 == 0)), 0, np.minimum(ramp, n)),
        np.where(n == 0, 0, np.minimum(rng.integers(1, 4, N + 1) + n // 2, np.minimum(n, B))),
    ]
    for actions in policies:
        P = _row_by_row_transitions(smdp, actions)
        got, _, _ = smdp.policy_arrays(actions)
        np.testing.assert_array_equal(got, P)
        M, _, _ = smdp.hessenberg_system(actions)
        want = np.eye(N + 1) - P
        want = np.concatenate([want[:, 1:], M[:, -1:]], axis=1)
        np.testing.assert_array_equal(M, want)
        lu = BandedBelowLU(N + 1, B + 1)
        smdp.hessenberg_system(actions, out=lu.extended)
        np.testing.assert_array_equal(np.triu(lu.matrix, -(B + 1)), M)
        states = np.array([1, B, N // 2, N - 1])
        rows, _ = smdp.hessenberg_rows(actions, states)
        np.testing.assert_array_equal(rows, M[states])


def test_policy_iteration_at_b_128_improves_near_the_actions_on_the_first_step_only(monkeypatch):
    """At B = 128 the windowed product costs most of a full one: one windowed step (where the size or
    rate step moved most actions by one), then full steps; the warm solve's sizes, gain and policy are
    those of improving over all actions every step."""
    import functools

    import solver.pi
    import solver.smdp

    m = v100(128, 0.6, 1e-4, 1.0)
    near = solve(m.with_(rate=0.95 * m.rate))
    calls = []
    windowed = solver.pi.q_values_near
    monkeypatch.setattr(solver.pi, "q_values_near", lambda *a, **k: calls.append(1) or windowed(*a, **k))
    warm = solve(m, warm_start=near.policy)
    assert len(calls) == len(warm.sizes_tried)  # one per size's policy iteration
    monkeypatch.setattr(solver.smdp, "policy_iteration", functools.partial(solver.pi.policy_iteration, near=None))
    full = solve(m, warm_start=near.policy)
    assert warm.sizes_tried == full.sizes_tried and warm.converged and full.converged
    np.testing.assert_array_equal(warm.policy.actions, full.policy.actions)
    assert warm.gain == pytest.approx(full.gain, rel=1e-12)


@pytest.mark.parametrize("B,cv", [(8, 0.0), (32, 1.0)])
def test_q_values_are_the_plain_expression_bit_for_bit(B, cv):
    """Q written into the product's own array (no temporaries) is (c - g tau) + E[h(next)] with +inf
    where not allowed, exactly: from state 0 and from a later state, and on the near-action window."""
    from solver.pi import evaluate_policy, q_values, q_values_near
    from solver.tail import build

    m = v100(B, 0.7, 1e-4, cv)
    smdp = build(m, 4 * B)
    a = np.minimum(np.arange(smdp.n_states), B)
    v = evaluate_policy(smdp, a)
    for first in (0, B // 2, 3 * B):
        plain = smdp.cost[first:] - v.gain * smdp.time[first:] + smdp.expected_next(v.h, first)
        np.testing.assert_array_equal(q_values(smdp, v.h, v.gain, first), np.where(smdp.valid[first:], plain, np.inf))
    plain = smdp.cost - v.gain * smdp.time + smdp.expected_next_near(v.h, a, 3)
    np.testing.assert_array_equal(q_values_near(smdp, v.h, v.gain, a, 3), np.where(smdp.valid, plain, np.inf))


# --- the policy settled by its worth in gain ------------------------------------------------------


def test_policy_iteration_reports_the_start_policys_gain():
    from solver.pi import evaluate_policy, policy_iteration
    from solver.tail import build

    smdp = build(v100(64, 0.6, 1e-4, 1.0), 300, "fluid")
    start = np.minimum(np.arange(smdp.n_states), 32)
    out = policy_iteration(smdp, start)
    assert out.start_gain == pytest.approx(evaluate_policy(smdp, start).gain, rel=1e-13)
    assert out.start_gain > out.values.gain  # the half batches are not optimal, and PI only improves


def test_policy_is_settled_when_unchanged_or_worth_less_than_the_gains_rounding():
    from solver.smdp import GROWTH_RTOL, NOISE_FLOOR, _policy_settled

    previous = np.array([0, 1, 2, 3])
    same = np.array([0, 1, 2, 3, 4, 4])
    moved = np.array([0, 1, 3, 3, 4, 4])
    g = 2.0
    below, above = g * (1 + 0.5 * NOISE_FLOOR * GROWTH_RTOL), g * (1 + 2 * NOISE_FLOOR * GROWTH_RTOL)
    assert _policy_settled(same, previous, above, g, GROWTH_RTOL, by_gain=True)  # unchanged: settled
    assert _policy_settled(same, previous, None, g, GROWTH_RTOL, by_gain=False)
    assert _policy_settled(moved, previous, below, g, GROWTH_RTOL, by_gain=True)
    assert not _policy_settled(moved, previous, above, g, GROWTH_RTOL, by_gain=True)
    assert not _policy_settled(moved, previous, below, g, GROWTH_RTOL, by_gain=False)  # the rule before
    assert not _policy_settled(moved, previous, None, g, GROWTH_RTOL, by_gain=True)  # RVI: no start gain


@pytest.mark.parametrize("B,load,w,cv", [(128, 0.3, 1e-4, 1.0), (128, 0.45, 1e-3, 1.0)])
def test_automatic_n_stops_where_only_near_ties_still_move(B, load, w, cv):
    """At CV 1 the batch size of states the chain visits once in 10^8 decisions or less keeps moving
    by one as N grows: requiring them unchanged took N = 873-883 where the policy is settled in gain
    from 446-564. The smaller N's gain is within 1e-10 of the larger's, its policy loses at most
    1e-11 of the gain when run in the larger truncation, and the states where the two differ carry
    about 1e-8 of the stationary mass at most."""
    from solver.pi import evaluate_policy
    from solver.tail import build

    m = v100(B, load, w, cv)
    auto = solve(m)
    equal = solve(m, policy_by_gain=False)
    assert auto.converged and equal.converged
    assert auto.truncation < 0.7 * equal.truncation
    assert auto.sizes_tried == equal.sizes_tried[: len(auto.sizes_tried)]  # the same search, stopped sooner
    assert auto.gain == pytest.approx(equal.gain, rel=1e-10)
    big = build(m, equal.truncation, "fluid")
    # the smaller N's decisions on its states, the larger one's above: what the near-ties are worth
    mixed = equal.policy.actions.copy()
    mixed[: auto.truncation + 1] = auto.policy.actions
    assert 0 <= evaluate_policy(big, mixed).gain - equal.gain <= 1e-11 * equal.gain
    # and the table as the gate runs it (full batches above the smaller N) is within the tolerance
    carried = evaluate_policy(big, auto.policy.extended(big.n_states))
    assert 0 <= carried.gain - equal.gain <= 1e-9 * equal.gain
    differ = np.nonzero(auto.policy.actions != equal.policy.actions[: auto.truncation + 1])[0]
    assert evaluate_policy(big, equal.policy.actions).pi[differ].sum() <= 2e-8


def _affine(B: int, load: float, cv: float) -> BatchingModel:
    prof = ServiceProfile.affine(B, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550, cv=cv)
    m0 = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=40.0, weight=1e-4)
    return m0.with_(rate=load * m0.capacity)


def test_policy_iteration_can_leave_the_full_check_to_the_caller():
    """confirm=False: a windowed run stops where the window finds nothing (not confirmed); from greedy
    (every step a full one) the policy is confirmed anyway. Here the window found everything: the
    same policy and gain as with the check, which passes on it."""
    from solver.pi import improve, policy_iteration, q_values
    from solver.tail import build

    smdp = build(_affine(160, 0.6, 1.0), 480)
    ref = policy_iteration(smdp, near=None)
    n = np.arange(smdp.n_states)
    shifted = np.clip(ref.actions - (n % 3), np.where(n < 160, 0, 1), None)
    out = policy_iteration(smdp, shifted, confirm=False)
    assert out.converged and not out.confirmed
    np.testing.assert_array_equal(out.actions, ref.actions)
    assert out.values.gain == pytest.approx(ref.values.gain, rel=1e-12)
    np.testing.assert_array_equal(improve(q_values(smdp, out.values.h, out.values.gain), out.actions), out.actions)
    assert policy_iteration(smdp, confirm=False).confirmed  # from greedy: full steps


@pytest.mark.parametrize("B,load", [(160, 0.6), (256, 0.45)])
def test_the_automatic_n_returns_a_policy_that_passes_the_full_check(B, load):
    """Sizes that cannot end the search skip the improvement over all actions; the returned one
    never does: no action improves on the returned policy at its N, and PI from it stops at once."""
    from solver.pi import improve, policy_iteration, q_values
    from solver.tail import build

    m = _affine(B, load, 1.0)
    for res in (solve(m), solve(m, warm_start=solve(m.with_(rate=0.95 * m.rate)).policy)):
        assert res.converged and len(res.sizes_tried) >= 3
        smdp = build(m, res.truncation)
        out = policy_iteration(smdp, res.policy.actions)
        assert out.iterations == 1 and out.confirmed
        np.testing.assert_array_equal(out.actions, res.policy.actions)
        np.testing.assert_array_equal(improve(q_values(smdp, out.values.h, out.values.gain), out.actions), out.actions)
        assert out.values.gain == pytest.approx(res.gain, rel=1e-12)


def test_the_automatic_n_confirms_a_size_before_it_ends_the_search(monkeypatch):
    """Every unconfirmed size's policy is spoiled outside the window (one state served 9 or more more
    requests than its optimum): the size that ends the search must get the check over all actions,
    which finds the spoiled state, so the policy returned still passes it."""
    import solver.smdp
    from solver.pi import PIOutcome, evaluate_policy, improve, policy_iteration, q_values
    from solver.tail import build

    real = solver.smdp.policy_iteration
    spoiled = []

    def spoiling(smdp, start=None, **kwargs):
        out = real(smdp, start, **kwargs)
        if out.confirmed:
            return out
        a = out.actions.copy()
        n = np.arange(a.size)
        far = np.nonzero((a > 0) & (np.minimum(n, smdp.model.max_batch) - a > 8))[0]
        assert far.size
        a[far[0]] = min(int(far[0]), smdp.model.max_batch)
        spoiled.append(smdp.truncation)
        return PIOutcome(a, evaluate_policy(smdp, a), out.iterations, True, out.start_gain, confirmed=False)

    m = _affine(160, 0.6, 1.0)
    clean = solve(m)
    monkeypatch.setattr(solver.smdp, "policy_iteration", spoiling)
    res = solve(m)
    assert res.converged and res.truncation in spoiled  # the size that ended the search came spoiled
    smdp = build(m, res.truncation)
    values = evaluate_policy(smdp, res.policy.actions)
    np.testing.assert_array_equal(improve(q_values(smdp, values.h, values.gain), res.policy.actions), res.policy.actions)
    assert res.gain == pytest.approx(clean.gain, rel=1e-8)
    assert policy_iteration(smdp, res.policy.actions).iterations == 1


def test_shape_seed_extrapolates_the_policys_growth_and_its_saturation():
    """The added states start from a + b sqrt(n) + c n fitted on the previous policy's [N/2, 0.9 N]:
    a policy of exactly that shape is continued to within rounding, one that reaches B inside the fit
    range stays at B (the floor), and a truncation too small to fit falls back (None)."""
    from solver.smdp import _shape_seeded_start

    B, N, size = 256, 1000, 1251
    n = np.arange(size)
    curve = np.clip(np.rint(40 + 3.0 * np.sqrt(n) + 0.1 * n), 0, B).astype(np.int64)
    start = np.minimum(n, B)
    start[: N + 1] = np.minimum(curve[: N + 1], n[: N + 1])
    seeded = _shape_seeded_start(start, N + 1, B)
    np.testing.assert_array_equal(seeded[: N + 1], start[: N + 1])  # the common states are the policy's
    assert np.abs(seeded[N + 1 :] - curve[N + 1 :]).max() <= 1
    saturated = start.copy()
    saturated[700 : N + 1] = B  # reaches B at 700: a fitted curve would bend back under it
    assert (_shape_seeded_start(saturated, N + 1, B)[N + 1 :] == B).all()
    assert _shape_seeded_start(np.minimum(np.arange(40), 16), 21, 16) is None  # [16, 19): too few states


@pytest.mark.parametrize("B,load,cv", [(64, 0.6, 2.0), (128, 0.6, 1.0), (128, 0.9, 1.0), (128, 0.3, 2.0)])
def test_shape_seeded_search_gives_the_fluid_seeded_answer(B, load, cv):
    """Seeding the added states from the policy's shape changes only policy iteration's start: cold
    and warm (from each seed's own solve at 0.95 x the rate), the gain is the fluid-seeded search's to
    1e-10 and the policies agree except on states carrying at most 1e-8 of the stationary mass (at
    CV 2, load 0.3 the better start settles the policy one size earlier: N 1218 against 1523)."""
    from solver.pi import evaluate_policy
    from solver.tail import build

    m = v100(B, load, 1e-4, cv)
    near = {seed: solve(m.with_(rate=0.95 * m.rate), shape_seed=seed).policy for seed in (False, True)}
    for warm in (False, True):
        fluid, shaped = (solve(m, shape_seed=seed, warm_start=near[seed] if warm else None) for seed in (False, True))
        assert fluid.converged and shaped.converged
        assert shaped.truncation <= fluid.truncation
        assert shaped.gain == pytest.approx(fluid.gain, rel=1e-10)
        common = shaped.truncation + 1
        differ = np.nonzero(shaped.policy.actions != fluid.policy.actions[:common])[0]
        if shaped.truncation == fluid.truncation:
            assert shaped.gain == pytest.approx(fluid.gain, rel=1e-12)
        pi = evaluate_policy(build(m, fluid.truncation, "fluid"), fluid.policy.actions).pi
        assert pi[differ].sum() <= 1e-8


def test_gmres_solves_a_system_and_reports_when_it_does_not_converge():
    """The GMRES of the Krylov evaluation: numpy's solution of a nonsymmetric system from any start,
    the start itself when it already solves it, and None where the iterations run out."""
    from solver.pi import gmres

    rng = np.random.default_rng(5)
    n = 60
    A = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / math.sqrt(n)
    b = rng.standard_normal(n)
    want = np.linalg.solve(A, b)
    for x0 in (np.zeros(n), rng.standard_normal(n)):
        got = gmres(lambda v: A @ v, b, x0, n, 1e-14)
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(gmres(lambda v: A @ v, b, want, 3, 1e-10), want)
    assert gmres(lambda v: A @ v, b, np.zeros(n), 3, 1e-14) is None
    # the identity plus a rank-2 term: at most 3 iterations
    U, W = rng.standard_normal((n, 2)), rng.standard_normal((2, n)) / n
    got = gmres(lambda v: v + U @ (W @ v), b, np.zeros(n), 3, 1e-13)
    assert got is not None
    np.testing.assert_allclose(got, np.linalg.solve(np.eye(n) + U @ W, b), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("cv", [0.0, 1.0])
def test_krylov_evaluation_equals_a_fresh_evaluation(cv):
    """A policy too far from the factored one for the low-rank update, but within KRYLOV_MAX_SHARE of
    its states, is solved by GMRES preconditioned with that LU: gain, h and pi as a dense LU gives them;
    from the last GMRES solution as well; beyond the share, and with krylov=False, a new LU."""
    from solver.pi import KRYLOV_MAX_SHARE, MAX_UPDATE_RANK, PolicyEvaluator, evaluate_policy
    from solver.tail import build

    B, N = 32, 200
    m = v100(B, 0.7, 1e-4, cv)
    smdp = build(m, N)
    n = np.arange(N + 1)
    base = np.where(n < 6, 0, np.minimum(n, B))
    rng = np.random.default_rng(11)
    ev, plain = PolicyEvaluator(smdp), PolicyEvaluator(smdp, krylov=False)
    ev(base)
    plain(base)
    for r in (MAX_UPDATE_RANK + 1, 40, int(KRYLOV_MAX_SHARE * (N + 1))):
        changed = np.sort(rng.choice(np.arange(B, N + 1), size=r, replace=False))
        other = base.copy()
        other[changed] = np.maximum(base[changed] - rng.integers(1, 4, size=r), 1)
        got = ev(other)
        assert ev.updated and ev.iterated
        want = evaluate_policy(smdp, other, "dense")
        assert got.gain == pytest.approx(want.gain, rel=1e-12)
        np.testing.assert_allclose(got.h, want.h, rtol=1e-10, atol=1e-12 * np.max(np.abs(want.h)))
        np.testing.assert_allclose(got.pi, want.pi, rtol=1e-8, atol=1e-15)
        assert plain(other).gain == pytest.approx(want.gain, rel=1e-12)
        assert not plain.updated and not plain.iterated
        plain(base)
    far = np.where(n < 6, 0, np.maximum(np.minimum(n, B) - 1, 1))
    assert np.count_nonzero(far != base) > KRYLOV_MAX_SHARE * (N + 1)
    assert ev(far).gain == pytest.approx(evaluate_policy(smdp, far, "dense").gain, rel=1e-12)
    assert not ev.updated and not ev.iterated


def test_policy_iteration_refactors_a_krylov_evaluation_that_lost_accuracy(monkeypatch):
    """The Bellman residual checks GMRES's evaluations as it checks the low-rank update's: a wrong one is
    redone with a fresh LU, and policy iteration lands where it does with LUs only."""
    import solver.pi as pi
    from solver.tail import build

    m = v100(128, 0.6, 1e-4, 1.0)
    smdp = build(m, 700)
    start = pi.policy_iteration(build(m, 560)).actions
    start = np.concatenate([start, np.full(700 - 560, start[-1])])
    want = pi.policy_iteration(smdp, start, krylov=False)
    real = pi._BandedSolve.krylov
    calls = []

    def spoiled(self, smdp, actions, states, x0):
        found = real(self, smdp, actions, states, x0)
        calls.append(states.size)
        if found is None:
            return None
        v, x = found
        return pi.PolicyValues(v.gain, v.h * (1 + 1e-6), v.pi), x

    monkeypatch.setattr(pi._BandedSolve, "krylov", spoiled)
    got = pi.policy_iteration(smdp, start)
    assert calls, "the case must take a Krylov step"
    np.testing.assert_array_equal(got.actions, want.actions)
    assert got.values.gain == pytest.approx(want.values.gain, rel=1e-12)
    assert got.iterations == want.iterations


@pytest.mark.parametrize("B,load,cv", [(64, 0.6, 2.0), (128, 0.6, 1.0), (128, 0.3, 2.0)])
def test_solve_with_krylov_evaluations_gives_the_lu_answer(B, load, cv, monkeypatch):
    """GMRES preconditioned with the last LU changes no answer of the automatic search: cold and warm,
    the same sizes, iterations and policy as with a new LU for every larger change, the gain to 1e-12
    (and GMRES is taken)."""
    import functools

    import solver.pi as pi
    import solver.smdp as smdp_module

    m = v100(B, load, 1e-4, cv)
    taken = []
    real = pi._BandedSolve.krylov
    monkeypatch.setattr(pi._BandedSolve, "krylov", lambda *a: taken.append(1) or real(*a))
    near = solve(m.with_(rate=0.95 * m.rate)).policy
    for warm in (None, near):
        got = solve(m, warm_start=warm)
        with monkeypatch.context() as ctx:
            ctx.setattr(smdp_module, "policy_iteration", functools.partial(pi.policy_iteration, krylov=False))
            want = solve(m, warm_start=warm)
        assert got.sizes_tried == want.sizes_tried and got.iterations == want.iterations
        np.testing.assert_array_equal(got.policy.actions, want.policy.actions)
        assert got.gain == pytest.approx(want.gain, rel=1e-12)
        assert got.mean_latency_s == pytest.approx(want.mean_latency_s, rel=1e-10)
    assert taken


@pytest.mark.parametrize("B,cv,load,groups", [(32, 0.0, 0.6, False), (64, 1.0, 0.9, True), (256, 1.0, 0.6, False),
                                              (256, 2.0, 0.3, False), (128, 0.0, 0.9, False)])
def test_prefix_sums_read_through_a_view_are_the_gathered_ones(B, cv, load, groups, monkeypatch):
    """build reads the arrivals' prefix sums at each pair's last in-window landing through a strided view
    on the rows n >= B (clipped at the pmf window where it is shorter than N): the values of the plain
    gather, and every array of the SMDP the same bit for bit, for each tail, with a window shorter than
    N or not, with sums that reach just N or further."""
    import solver.tail as tail
    from solver.arrival_model import CompoundPoisson

    if B <= 128:
        m = v100(B, load, 1e-4, cv)
    else:  # the benchmark's B = 256 profile (affine service time and energy)
        prof = ServiceProfile.affine(B, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550, cv=cv)
        m = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=40.0, weight=1e-4)
        m = m.with_(rate=load * m.capacity)
    if groups:
        m = m.with_(arrivals=CompoundPoisson(2.0))

    def gathered(sums, N, L, start):
        return np.take(sums, np.minimum(L, N - start) + sums.shape[1] * np.arange(B)[None, :])

    for N in (B, B + 3, 2 * B + 17, 5 * B):
        s = np.maximum(np.arange(N + 1)[:, None] - np.arange(1, B + 1)[None, :], 0)
        for kmax in (N, N + B + 1):
            counts = tail.count_arrivals(m, kmax)
            for sums in (counts.c0, counts.c1, counts.c2):
                for L in (N, N // 2):
                    np.testing.assert_array_equal(tail._in_window(sums, N, L, s), gathered(sums, N, L, s))
            for name in tail.TAILS:
                viewed = tail.build(m, N, name, counts=counts)
                with monkeypatch.context() as ctx:
                    ctx.setattr(tail, "_in_window", gathered)
                    plain = tail.build(m, N, name, counts=counts)
                for array in ("latency", "energy", "time", "tail_p", "tail_m", "cost"):
                    np.testing.assert_array_equal(getattr(viewed, array), getattr(plain, array))
