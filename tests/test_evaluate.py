"""Exact policy evaluation: closed forms, accounting identities, stability and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from solver import (
    BatchingModel,
    Evaluation,
    ModelError,
    PolicyTable,
    ServiceProfile,
    UnstablePolicyError,
    evaluate,
    greedy,
    static,
    threshold,
)

ROOT = Path(__file__).resolve().parents[1]
V100 = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv")

# Inoue's fit for V100 ResNet-50 (shared/profiles/README.md): tau(b) = alpha b + tau0, e(b) = beta b + c0
ALPHA, TAU0, BETA, C0 = 0.1438e-3, 1.8874e-3, 0.04419, 0.1550


def v100(B: int, load: float, weight: float, cv: float = 0.0) -> BatchingModel:
    prof = ServiceProfile(V100.mean_s[:B], V100.energy_j[:B], np.full(B, cv))
    m = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=40.0, weight=weight)
    return m.with_(rate=load * m.capacity)


@pytest.mark.parametrize("cv", [0.0, 0.5, 2.0])
def test_greedy_with_batch_one_is_pollaczek_khinchine(cv):
    tau, rate, e1, p0 = 0.004, 200.0, 0.5, 25.0
    prof = ServiceProfile(mean_s=[tau], energy_j=[e1], cv=[cv])
    m = BatchingModel(rate=rate, max_batch=1, profile=prof, idle_power_w=p0, weight=2e-5)
    ev = evaluate(m, greedy(1))
    rho = rate * tau
    w_pk = tau + rate * tau * tau * (1 + cv * cv) / (2 * (1 - rho))
    assert ev.mean_latency_s == pytest.approx(w_pk, rel=1e-9)
    assert ev.mean_power_w == pytest.approx((1 - rho) * p0 + rate * e1, rel=1e-9)
    assert ev.cost == pytest.approx(w_pk + 2e-5 * ev.mean_power_w, rel=1e-12)
    assert ev.idle_fraction == pytest.approx(1 - rho, rel=1e-9)
    assert ev.mean_batch == pytest.approx(1.0)


@pytest.mark.parametrize("lam", [100.0, 1000.0, 3000.0])
def test_greedy_respects_inoues_closed_form_bound(lam):
    """Unlimited-batch greedy with affine deterministic tau: E[W] <= min(phi0, phi1).

    B = 512 makes the batch limit irrelevant at these rates (asserted through the batch pmf)."""
    B = 512
    prof = ServiceProfile.affine(B, ALPHA, TAU0, BETA, C0)
    m = BatchingModel(rate=lam, max_batch=B, profile=prof, idle_power_w=40.0, weight=0.0)
    ev = evaluate(m, greedy(B))
    phi0 = (ALPHA + TAU0) / (2 * (1 - lam * ALPHA)) * (1 + 2 * lam * TAU0 + (1 - lam * TAU0) / (1 + lam * ALPHA))
    phi1 = 1.5 * TAU0 / (1 - lam * ALPHA) + (ALPHA / 2) * (lam * ALPHA + 2) / (1 - lam**2 * ALPHA**2)
    assert ev.batch_pmf[B - 1] < 1e-12
    assert ev.mean_latency_s <= min(phi0, phi1) * (1 + 1e-9)
    # a bound, but not a loose one: within 25% (the mean residual of the batch in progress)
    assert ev.mean_latency_s > 0.75 * min(phi0, phi1)
    # and at least one full service of the mean batch
    assert ev.mean_latency_s > TAU0 + ALPHA * ev.mean_batch


@pytest.mark.parametrize(
    "policy_of",
    [lambda B: greedy(B), lambda B: threshold(B, B // 2), lambda B: static(B, B), lambda B: threshold(B, 3 * B)],
)
@pytest.mark.parametrize("cv", [0.0, 1.0])
def test_accounting_identities(policy_of, cv):
    """Flow conservation, a proper batch pmf, and power = idle + energy of the batches served."""
    B = 16
    m = v100(B, 0.7, 1e-4, cv)
    ev = evaluate(m, policy_of(B))
    assert isinstance(ev, Evaluation)
    assert ev.throughput_rps == pytest.approx(m.rate, rel=1e-9)
    assert ev.batch_pmf.shape == (B,) and np.all(ev.batch_pmf >= 0)
    assert ev.batch_pmf.sum() == pytest.approx(1.0, abs=1e-12)
    sizes = np.arange(1, B + 1)
    assert ev.mean_batch == pytest.approx(float(sizes @ ev.batch_pmf), rel=1e-9)
    batch_rate = ev.throughput_rps / ev.mean_batch
    energy_per_batch = float(m.profile.energy_j @ ev.batch_pmf)
    assert ev.mean_power_w == pytest.approx(ev.idle_fraction * 40.0 + batch_rate * energy_per_batch, rel=1e-9)
    # time is either idle or busy serving: busy fraction = batch rate x mean service of a batch
    busy = batch_rate * float(m.profile.mean_s @ ev.batch_pmf)
    assert ev.idle_fraction + busy == pytest.approx(1.0, rel=1e-9)
    assert ev.cost == pytest.approx(ev.mean_latency_s + 1e-4 * ev.mean_power_w, rel=1e-12)


def test_a_table_that_waits_past_b_is_evaluated_as_written():
    """threshold(B, k > B) waits with a full batch available; the solver never does, evaluation can."""
    B = 8
    m = v100(B, 0.5, 1e-3)
    k = 2 * B
    ev = evaluate(m, threshold(B, k))
    assert ev.batch_pmf[B - 1] == pytest.approx(1.0, abs=1e-12)  # it only ever serves with n >= 16
    assert ev.mean_latency_s > (k - 1) / (2 * m.rate)
    ends_on_wait = PolicyTable(np.r_[0, np.arange(1, 9), 0], 8)  # waits at its last state, n = 9
    assert evaluate(m, ends_on_wait, truncation=9).truncation == 10
    assert evaluate(m, ends_on_wait).throughput_rps == pytest.approx(m.rate, rel=1e-9)


def test_static_full_batch_serves_only_full_batches():
    B = 8
    m = v100(B, 0.5, 0.0)
    ev = evaluate(m, static(B, B))
    assert ev.batch_pmf[B - 1] == pytest.approx(1.0, abs=1e-12)
    assert ev.mean_batch == pytest.approx(B, rel=1e-12)
    # every request waits for B - 1 others on average (B - 1)/2 arrivals... at least the service time
    assert ev.mean_latency_s > m.profile.mean_s[B - 1] + (B - 1) / (2 * m.rate)


def test_truncation_does_not_change_the_figures():
    m = v100(32, 0.9, 1e-4, 1.0)
    pol = threshold(32, 8)
    auto = evaluate(m, pol)
    assert auto.converged and auto.tail_mass < 0.01
    for n in (2 * auto.truncation, 3 * auto.truncation):
        big = evaluate(m, pol, truncation=n)
        assert big.cost == pytest.approx(auto.cost, rel=1e-9)
        assert big.mean_power_w == pytest.approx(auto.mean_power_w, rel=1e-9)
        assert big.tail_mass < auto.tail_mass
    # the plain truncation agrees too, but needs far more states for less accuracy (CV 1, load 0.9)
    plain = evaluate(m, pol, truncation=8 * auto.truncation, tail="none")
    assert plain.cost == pytest.approx(auto.cost, rel=1e-6)


def test_unstable_static_policy_is_refused_with_both_rates():
    B = 16
    m = v100(B, 0.8, 0.0)
    unstable = [b for b in range(1, B + 1) if b / m.profile.mean_s[b - 1] <= m.rate]
    assert unstable, "the test needs a static size that cannot keep up"
    b0 = unstable[-1]
    with pytest.raises(UnstablePolicyError, match=rf"{b0}/tau\({b0}\) = .* <= arrival rate {m.rate:.6g}/s"):
        evaluate(m, static(B, b0))
    stable = [b for b in range(1, B + 1) if b not in unstable]
    for b in stable:
        assert np.isfinite(evaluate(m, static(B, b)).cost)


def test_to_dict_is_json():
    ev = evaluate(v100(8, 0.5, 1e-4), greedy(8))
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["cost"] == ev.cost and len(d["batch_pmf"]) == 8


def test_bad_input_is_refused():
    m = v100(8, 0.5, 1e-4)
    with pytest.raises(ModelError, match="max_batch 4"):
        evaluate(m, greedy(4))
    with pytest.raises(ValueError, match="below the policy table"):
        evaluate(m, threshold(8, 20), truncation=10)
    with pytest.raises(ModelError, match="tail"):
        evaluate(m, greedy(8), tail="bogus")


def test_empirical_service_uses_the_sample_moments():
    """Two-point service law, given only as samples: M/G/1 with E[S] and E[S^2] of the samples."""
    samples = np.array([0.001, 0.003, 0.003, 0.001])
    prof = ServiceProfile(mean_s=[0.002], energy_j=[0.2], cv=[0.0], samples=(samples,))
    rate = 300.0
    m = BatchingModel(rate=rate, max_batch=1, profile=prof, idle_power_w=20.0, weight=0.0)
    ev = evaluate(m, greedy(1))
    es, es2 = samples.mean(), (samples**2).mean()
    assert ev.mean_latency_s == pytest.approx(es + rate * es2 / (2 * (1 - rate * es)), rel=1e-9)


def test_vectorised_arrival_pmf_matches_the_profile():
    from solver.tail import arrival_pmf_matrix

    rng = np.random.default_rng(1)
    mixed = ServiceProfile(mean_s=[0.002, 0.003, 0.004], energy_j=[0.1, 0.2, 0.3], cv=[0.0, 0.5, 2.0])
    empirical = ServiceProfile.from_samples((rng.gamma(4, 0.0005, 50), rng.gamma(4, 0.00075, 50)),
                                            energy_j=[0.1, 0.2])
    for prof in (mixed, empirical):
        got = arrival_pmf_matrix(prof, 900.0, 40)
        for b in range(1, prof.max_batch + 1):
            np.testing.assert_allclose(got[b - 1], prof.arrival_pmf(b, 900.0, 40), rtol=1e-12, atol=1e-300)


def test_static_policy_stays_static_beyond_its_table():
    """static(B, b0) serves b0 at every queue length; it used to fall back to full batches above B."""
    B, b0 = 16, 6
    pol = static(B, b0)
    assert pol.action(10 * B) == b0 and np.all(pol.extended(5 * B)[b0:] == b0)
    assert pol.threshold() is None and threshold(B, 4).threshold() == 4
    m = v100(B, 0.3, 1e-4)
    m = m.with_(rate=0.8 * b0 / m.profile.mean_s[b0 - 1])  # static 6 at 80% of its own capacity
    ev = evaluate(m, pol, truncation=B)  # small N: 0.1% of epochs land above the table
    assert ev.tail_mass > 1e-4
    assert ev.batch_pmf[b0 - 1] == pytest.approx(1.0, abs=1e-12) and ev.mean_batch == pytest.approx(b0, rel=1e-12)
    assert ev.throughput_rps == pytest.approx(m.rate, rel=1e-9)
    big = evaluate(m, pol)
    assert big.tail_mass < 1e-8
    assert ev.cost == pytest.approx(big.cost, rel=1e-6)  # the drain above N runs b0-batches, as the table does
    # a beyond-table size that cannot keep up is refused, even under a table that can
    slow = PolicyTable(np.minimum(np.arange(B + 1), B), B, beyond=1)
    with pytest.raises(UnstablePolicyError, match="above its table"):
        evaluate(m, slow)
    with pytest.raises(ValueError, match="beyond-table batch size"):
        PolicyTable(np.zeros(3, dtype=int), 2, beyond=3)
