"""k model instances fed by one queue: the model's stability bound, the k-instance simulator against
the one-server simulator (k = 1) and against the exact phase-type chain (k = 2, 3), the chain against
the one-server exact evaluation (k = 1), and the solver (k = 1 is today's SMDP, exactly)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from solver import arrivals
from solver.evaluate import evaluate
from solver.instances import evaluate_instances, search_thresholds, simulate_table, solve_instances
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import (Decision, InstanceTable, PerInstance, PolicyTable, TimeoutRule, greedy,
                           instance_thresholds, threshold)
from solver.simulate import simulate
from solver.smdp import solve

V100 = ServiceProfile.affine(64, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550)
P0 = 40.0


def _small(cv: float, B: int = 4) -> ServiceProfile:
    return ServiceProfile.affine(B, 0.001, 0.002, 0.05, 0.2, cv=cv)


@dataclass(frozen=True)
class GenericK:
    """Hides a k-instance rule's type so the simulator takes its ask-at-every-epoch loop."""

    inner: InstanceTable | PerInstance

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    @property
    def instances(self) -> int:
        return self.inner.instances

    def decide_busy(self, n: int, busy: int, oldest_wait_s: float) -> Decision:
        return self.inner.decide_busy(n, busy, oldest_wait_s)


def test_stability_bound_is_k_times_one_instance():
    one = BatchingModel(rate=1.0, max_batch=64, profile=V100, idle_power_w=P0)
    cap = one.capacity
    two = BatchingModel(rate=1.5 * cap, max_batch=64, profile=V100, idle_power_w=P0, instances=2)
    assert two.capacity == pytest.approx(2 * cap)
    assert two.load == pytest.approx(0.75)
    with pytest.raises(ModelError, match=r"at or above capacity B/tau\(B\)"):
        one.with_(rate=1.5 * cap)
    with pytest.raises(ModelError, match=r"capacity k B/tau\(B\) = 2 x 64"):
        two.with_(rate=2 * cap)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ModelError, match="instances must be an integer >= 1"):
            one.with_(instances=bad)
    with pytest.raises(ModelError, match="solver.instances"):
        solve(two)
    with pytest.raises(ModelError, match="solver.instances"):
        evaluate(two, greedy(64))


@pytest.mark.parametrize("rule", [greedy(64), threshold(64, 8), TimeoutRule(64, 0.002)])
def test_one_instance_simulation_equals_the_one_server_simulator(rule):
    arr = arrivals.poisson(0.5 * 64 / float(V100.mean_s[-1]), n=50_000, rng=1)
    ref = simulate(V100, rule, arr, idle_power_w=P0, weight=1e-4, seed=2)
    wrapped = [PerInstance(rule, 1)]
    if isinstance(rule, PolicyTable):
        wrapped.append(InstanceTable(rule.actions[None, :], 64))
    for k_rule in wrapped:
        got = simulate(V100, k_rule, arr, idle_power_w=P0, weight=1e-4, seed=2)
        assert got == ref, k_rule
    slow = simulate(V100, GenericK(PerInstance(rule, 1)), arr, idle_power_w=P0, weight=1e-4, seed=2)
    assert slow.batch_hist == ref.batch_hist  # the generic loop's timer sums may differ in the last bit
    assert slow.mean_latency_s == pytest.approx(ref.mean_latency_s, rel=1e-12)
    assert slow.mean_power_w == pytest.approx(ref.mean_power_w, rel=1e-12)


def test_fast_paths_equal_the_generic_k_instance_loop():
    arr = arrivals.poisson(1.5 * 64 / float(V100.mean_s[-1]), n=40_000, rng=3)
    cv_prof = ServiceProfile.affine(64, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550, cv=0.8)
    for prof in (V100, cv_prof):
        for rule in (instance_thresholds(64, (2, 9)), PerInstance(TimeoutRule(64, 0.003), 2)):
            a = simulate(prof, rule, arr, idle_power_w=P0, weight=0.0, seed=5)
            b = simulate(prof, GenericK(rule), arr, idle_power_w=P0, weight=0.0, seed=5)
            assert a.mean_latency_s == pytest.approx(b.mean_latency_s, rel=1e-12)
            assert a.batch_hist == b.batch_hist
            assert a.mean_power_w == pytest.approx(b.mean_power_w, rel=1e-12)


def test_k_instances_serve_above_one_instance_capacity_and_count_every_request():
    cap = 64 / float(V100.mean_s[-1])
    arr = arrivals.poisson(2.7 * cap, n=60_000, rng=4)  # 0.9 of three instances
    res = simulate(V100, instance_thresholds(64, (1, 1, 1)), arr, idle_power_w=P0, weight=0.0, seed=1)
    assert res.n_requests == arr.size
    assert res.throughput_rps == pytest.approx(2.7 * cap, rel=0.03)
    # each busy instance draws its batch's power, each idle one P0: between 0.9 of full and 3 x full
    assert 0.85 * 3 * float(V100.busy_power_w[-1]) < res.mean_power_w < 3 * float(V100.busy_power_w[-1])


def test_idle_power_is_per_instance():
    # almost no traffic: every instance idles nearly all the time, so P is close to k P0
    arr = arrivals.poisson(1.0, n=2_000, rng=1)
    for k in (1, 2, 4):
        res = simulate(V100, instance_thresholds(64, (1,) * k), arr, idle_power_w=P0, weight=0.0, seed=1)
        extra = 1.0 * (float(V100.energy_j[0]) - P0 * float(V100.mean_s[0]))  # lambda (e(1) - P0 tau(1))
        assert res.mean_power_w == pytest.approx(k * P0 + extra, rel=2e-3)


@pytest.mark.parametrize("cv", [1.0, 0.5])
def test_one_instance_chain_equals_the_one_server_exact_evaluation(cv):
    prof = _small(cv, B=6)
    model = BatchingModel(rate=0.7 * 6 / float(prof.mean_s[-1]), max_batch=6, profile=prof, idle_power_w=10.0,
                          weight=1e-4)
    for table in (greedy(6), threshold(6, 3), solve(model).policy):
        exact = evaluate(model, table)
        chain = evaluate_instances(model, InstanceTable(table.extended(7)[None, :], 6))
        assert chain.exact_law
        assert chain.mean_latency_s == pytest.approx(exact.mean_latency_s, rel=1e-6)
        assert chain.mean_power_w == pytest.approx(exact.mean_power_w, rel=1e-6)
        assert chain.mean_batch == pytest.approx(exact.mean_batch, rel=1e-6)


@pytest.mark.parametrize("cv,k,thresholds", [(1.0, 2, (1, 3)), (1.0, 3, (1, 2, 4)), (0.5, 2, (2, 4))])
def test_simulator_matches_the_exact_chain_for_k_instances(cv, k, thresholds):
    prof = _small(cv)
    model = BatchingModel(rate=0.8 * k * 4 / float(prof.mean_s[-1]), max_batch=4, profile=prof, idle_power_w=10.0,
                          weight=1e-4, instances=k)
    table = instance_thresholds(4, thresholds)
    chain = evaluate_instances(model, table)
    assert chain.exact_law and chain.converged
    sim = simulate_table(model, table, 300_000, seed=7)
    assert abs(sim.mean_latency_s - chain.mean_latency_s) <= 3 * sim.latency_ci95_s
    assert abs(sim.mean_power_w - chain.mean_power_w) <= 3 * sim.power_ci95_w
    assert sim.mean_batch == pytest.approx(chain.mean_batch, rel=0.02)
    assert chain.throughput_rps == pytest.approx(model.rate, rel=1e-8)


def test_chain_refuses_what_it_cannot_hold():
    model = BatchingModel(rate=100.0, max_batch=64, profile=V100, idle_power_w=P0, instances=3)
    with pytest.raises(ModelError, match="evaluate this table by simulation"):
        evaluate_instances(model, instance_thresholds(64, (1, 1, 1)), max_states=5_000)
    with pytest.raises(ModelError, match="2 rows"):
        evaluate_instances(model, instance_thresholds(64, (1, 1)))


def test_one_instance_solve_is_todays_solver():
    model = BatchingModel(rate=0.6 * 64 / float(V100.mean_s[-1]), max_batch=64, profile=V100, idle_power_w=P0,
                          weight=1e-4)
    today = solve(model)
    got = solve_instances(model)
    assert got.gain == today.gain
    assert np.array_equal(got.policy.actions[0], today.policy.actions)
    d = got.to_dict()
    assert d["policy"] == [int(x) for x in today.policy.actions]
    assert d["instances"] == 1 and d["gain"] == today.gain


def test_threshold_search_at_one_instance_finds_the_family_optimum_near_the_smdp():
    # the k-instance formulation where it is comparable with the exact SMDP: k = 1
    prof = _small(0.0, B=16)
    model = BatchingModel(rate=0.5 * 16 / float(prof.mean_s[-1]), max_batch=16, profile=prof, idle_power_w=10.0,
                          weight=2e-4)
    exact = {t: evaluate(model, threshold(16, t)).cost for t in range(1, 17)}
    best = min(exact.values())
    star = solve(model).gain
    assert star <= best * (1 + 1e-9)
    (t,), _, _ = search_thresholds(model, requests=60_000)
    assert exact[t] <= best * 1.01
    assert exact[t] <= star * 1.02


def test_k_instance_solve_beats_greedy_and_reports_k_rows():
    cap = 64 / float(V100.mean_s[-1])
    model = BatchingModel(rate=1.2 * cap, max_batch=64, profile=V100, idle_power_w=P0, weight=1e-4, instances=2)
    res = solve_instances(model, requests=30_000, report_requests=60_000)
    assert res.policy.instances == 2 and res.method == "threshold-search"
    assert res.throughput_rps == pytest.approx(model.rate, rel=0.03)
    greedy_k = simulate_table(model, instance_thresholds(64, (1, 1)), 60_000, seed=1_000_003)
    assert res.gain <= greedy_k.cost + res.gain_ci95
    d = res.to_dict()
    assert len(d["policy"]) == 2 and d["instances"] == 2
    assert {"gain", "mean_latency_s", "mean_power_w"} <= d.keys()


def _cli_json(capsys, argv: list[str]) -> dict:
    import json

    from smdp.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_cli_solve_instances_json_contract(capsys):
    base = ["solve", "--rate", "9000", "--weight", "1e-4", "--json"]
    two = _cli_json(capsys, base + ["--instances", "2"])
    assert two["instances"] == 2 and len(two["policy"]) == 2
    assert all(len(row) == len(two["policy"][0]) for row in two["policy"])
    assert {"gain", "mean_latency_s", "mean_power_w"} <= two.keys()
    assert two["capacity_rps"] > 9000 > two["capacity_rps"] / 2
    one = _cli_json(capsys, ["solve", "--rate", "3000", "--json"])
    flat = _cli_json(capsys, ["solve", "--rate", "3000", "--json", "--instances", "1"])
    assert one == {**flat, "solve_time_s": one["solve_time_s"]}
    assert one["instances"] == 1 and isinstance(one["policy"][0], int)


def test_cli_refuses_a_rate_above_k_instances(capsys):
    from smdp.cli import main

    assert main(["solve", "--rate", "9000", "--instances", "1"]) == 2
    assert "at or above capacity" in capsys.readouterr().err
    assert main(["solve", "--rate", "9000", "--instances", "0"]) == 2
    assert "instances must be an integer >= 1" in capsys.readouterr().err


def test_cli_simulate_and_compare_with_instances(capsys, tmp_path):
    sim = _cli_json(capsys, ["simulate", "--rate", "9000", "--instances", "2", "--policy", "timeout:0.002",
                             "--requests", "20000", "--json"])
    assert sim["instances"] == 2 and sim["throughput_rps"] == pytest.approx(9000, rel=0.05)
    cmp_ = _cli_json(capsys, ["compare", "--instances", "2", "--loads", "0.7", "--weights", "1e-4",
                              "--requests", "20000", "--timeouts", "0.002", "--out", str(tmp_path), "--json"])
    assert cmp_["instances"] == 2
    names = [r["contender"] for r in cmp_["points"][0]["rows"]]
    assert names[:3] == ["smdp", "per-slot smdp", "greedy"] and "best timeout" in names


def test_cli_devices_count_idle_power_once_per_device(capsys):
    base = ["simulate", "--rate", "9000", "--instances", "2", "--policy", "timeout:0.002", "--requests", "20000",
            "--idle-power", "40", "--json"]
    two = _cli_json(capsys, base)
    one = _cli_json(capsys, base + ["--devices", "1"])
    assert two["devices"] == 2 and one["devices"] == 1
    assert one["mean_power_w"] == pytest.approx(two["mean_power_w"] - 40.0, rel=1e-9)
    assert one["mean_latency_s"] == two["mean_latency_s"]
    from smdp.cli import main

    assert main(base + ["--devices", "3"]) == 2
    assert "devices must be an integer in 1..instances = 2" in capsys.readouterr().err
