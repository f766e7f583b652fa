"""The k-instance SLO search (``solver.instances_slo``): the lanes' guard and response times against
the event simulator, and the search's choice against an independent simulation of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from solver.instances import solve_instances
from solver.instances_slo import solve_slo_instances
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import InstanceGuard, instance_thresholds
from solver.simulate import simulate_latencies
from solver.slo import SloTarget, sectioned_quantile
from solver.threshold_lanes import ThresholdLanes

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"


def _small(cv: float) -> BatchingModel:
    b = np.arange(1, 9)
    prof = ServiceProfile.from_table(list(b), list((2 + b) * 1e-3), list((2 + b) * 1e-3 * 100.0), cv=[cv] * 8)
    return BatchingModel(0.5 * 2 * 8 / 0.010, 8, prof, 40.0, 1e-4, instances=2)


@pytest.mark.parametrize("cv, tol", [(0.0, 0.01), (1.0, 0.04)])
def test_the_lanes_guard_and_response_times_agree_with_the_event_simulator(cv, tol):
    model = _small(cv)
    table = instance_thresholds(8, (3, 6))
    fig = ThresholdLanes(model, replications=100, segment=2000, seed=3).run(
        np.array([[3, 6], [3, 6], [1, 1]]), guards=np.array([np.inf, 0.004, np.inf]), latencies=True)
    arr = np.cumsum(np.random.default_rng(5).exponential(1.0 / model.rate, 300_000))
    for i, rule in enumerate((table, InstanceGuard(table, 0.004), instance_thresholds(8, (1, 1)))):
        sim, lat = simulate_latencies(model.profile, rule, arr, idle_power_w=40.0, weight=1e-4, seed=1, warmup=arr[2000])
        assert fig.latencies[i].mean() == pytest.approx(fig.mean_latency_s[i], rel=1e-9)
        assert fig.mean_latency_s[i] == pytest.approx(sim.mean_latency_s, rel=tol)
        assert fig.mean_power_w[i] == pytest.approx(sim.mean_power_w, rel=tol)
        assert fig.mean_batch[i] == pytest.approx(sim.mean_batch, rel=tol)
        assert sectioned_quantile(fig.latencies[i], 0.95)[0] == pytest.approx(np.quantile(lat, 0.95), rel=tol)
    # the guard cuts the waits for company: a lower tail than the same limits unguarded
    assert np.quantile(fig.latencies[1], 0.95) < np.quantile(fig.latencies[0], 0.95)


def test_keeping_the_response_times_changes_no_figure():
    model = _small(1.0)
    lanes = ThresholdLanes(model, replications=20, segment=500, seed=1)
    a = lanes.run(np.array([[2, 5]]))
    b = lanes.run(np.array([[2, 5]]), latencies=True)
    assert a.latencies is None and b.latencies.shape == (1, 20 * 500)
    assert np.array_equal(a.latency_sum, b.latency_sum) and np.array_equal(a.extra_energy, b.extra_energy)
    with pytest.raises(ModelError, match="guards"):
        lanes.run(np.array([[2, 5]]), guards=np.array([0.0]))


def test_the_k_instance_slo_search_meets_the_slo_on_an_independent_simulation():
    """V100, B = 64, two instances at 0.5 of their capacity, w = 1e-3 s/W: the least-J limits miss
    q99 <= 8 ms (about 10 ms); the search finds a guarded member that meets it, which an
    independent event simulation confirms; a loose SLO keeps the least-J limits, an impossible one
    answers greedy, flagged."""
    prof = ServiceProfile.from_csv(PROFILE, max_batch=64)
    model = BatchingModel(0.5 * 2 * 64 / float(prof.mean_s[-1]), 64, prof, 40.0, 1e-3, instances=2)
    res = solve_slo_instances(model, SloTarget(0.99, 0.008))
    c = res.chosen
    assert res.feasible and c.feasible and c.estimate.upper_s <= 0.008
    arr = np.cumsum(np.random.default_rng(11).exponential(1.0 / model.rate, 200_000))
    sim, lat = simulate_latencies(prof, c.rule, arr, idle_power_w=40.0, weight=1e-3, seed=7, warmup=arr[4000])
    assert np.quantile(lat, 0.99) <= 0.008 * 1.02
    assert sim.cost == pytest.approx(c.cost, rel=0.02)
    unguarded = [x for x in res.candidates if x.max_wait_s is None]
    least = min(unguarded, key=lambda x: x.cost)
    assert not least.feasible and c.cost >= least.cost  # the SLO costs J: the least-J limits miss it

    loose = solve_slo_instances(model, SloTarget(0.95, 0.050), requests=10_000)
    assert loose.feasible and loose.chosen.max_wait_s is None
    assert loose.chosen.thresholds == solve_instances(model).policy.thresholds()
    impossible = solve_slo_instances(model, SloTarget(0.95, 0.002), requests=10_000)
    assert not impossible.feasible and impossible.chosen.thresholds == (1, 1)
    assert impossible.chosen.max_wait_s is None


def test_one_instance_is_the_one_server_searchs_job(capsys):
    prof = ServiceProfile.from_csv(PROFILE, max_batch=64)
    with pytest.raises(ModelError, match="solve_slo"):
        solve_slo_instances(BatchingModel(1000.0, 64, prof, 40.0, 1e-3), SloTarget(0.99, 0.01))
    from smdp.cli import main

    assert main(["solve", "--instances", "2", "--rate", "6000", "--weight", "1e-3", "--max-batch", "64",
                 "--slo-quantile", "0.95", "--slo-latency", "0.008", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["instances"] == 2 and out["slo_feasible"] is True and len(out["policy"]) == 2
    assert out["predicted_quantile_s"] + out["predicted_quantile_ci95_s"] <= 0.008
    assert out["slo_quantile"] == 0.95 and out["max_wait_s"] is None or out["max_wait_s"] > 0


def test_a_guarded_k_instance_table_is_a_gate_rule_both_planes_run():
    """A line of the form the shared vectors (tests/vectors/instances.json) run on the Python gate and
    the native one: the rows for m and the guard, which fires whatever m."""
    from solver.policy import GateRule, InstanceTable

    rule = GateRule.of(InstanceGuard(InstanceTable([[0, 1, 2, 3, 4], [0, 0, 2, 3, 4]], 4), 0.005))
    assert rule.to_line() == "max_batch=4 beyond=4 table=0,1,2,3,4 busy_tables=0,0,2,3,4 max_wait_us=5000 guard_reason=max_wait"
    assert rule.decide(1, 0.004, 1).serve == 0 and rule.decide(1, 0.005, 1).serve == 1
    with pytest.raises(ValueError, match="max wait"):
        InstanceGuard(InstanceTable([[0, 1]], 1), 0.0)


def test_a_fixed_slo_policy_for_k_instances_is_the_guarded_table_the_gate_runs():
    from plugin.config import ModelPolicyConfig
    from plugin.policies import build_rule
    from solver.policy import GateRule

    cap = 2 * 64 / 0.0108899098
    cfg = ModelPolicyConfig(policy="smdp", profile=PROFILE, rate_rps=0.5 * cap, weight=1e-3, adaptive=False,
                            slo={"quantile": 0.99, "latency_s": 0.008})
    info = build_rule("m", cfg, 64, instances=2, devices=1)
    assert isinstance(info.rule, GateRule) and len(info.rule.busy_tables) == 1
    assert info.prediction["slo_feasible"] and info.prediction["predicted_quantile_s"] <= 0.008
    assert info.rule.max_wait_s == info.prediction["max_wait_s"] and info.prediction["devices"] == 1
