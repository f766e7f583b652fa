"""k instances in the sidecar: k from the model's config, the k-instance rule built for it, and the
gate asking that rule with m = its batches in flight (decisions on both planes: tests/vectors/instances.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tritonclient.grpc import model_config_pb2

from plugin.config import ModelPolicyConfig
from plugin.gate import ModelGate, Pending
from plugin.policies import build_rule, model_instances
from solver.policy import GateRule, InstanceTable, PerInstance, TimeoutRule, instance_thresholds

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"


def _config(*groups: tuple[int, int, int]) -> model_config_pb2.ModelConfig:
    cfg = model_config_pb2.ModelConfig(name="m", max_batch_size=64)
    for count, kind, gpus in groups:
        cfg.instance_group.add(count=count, kind=kind, gpus=list(range(gpus)))
    return cfg


def test_k_is_the_instance_counts_times_the_gpus_listed():
    G, C = model_config_pb2.ModelInstanceGroup.KIND_GPU, model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert model_instances(_config()) == 1
    assert model_instances(_config((2, G, 0))) == 2
    assert model_instances(_config((2, G, 2))) == 4
    assert model_instances(_config((1, G, 3), (2, C, 0))) == 5
    assert model_instances(_config((0, C, 0))) == 1


def test_an_instance_table_and_a_per_slot_rule_describe_themselves_for_the_gate():
    table = instance_thresholds(4, (1, 3))
    rule = GateRule.of(table)
    assert rule.to_line() == "max_batch=4 beyond=4 table=0,1,2,3,4 busy_tables=0,0,0,3,4"
    assert GateRule.from_line(rule.to_line()) == rule
    assert GateRule.of(PerInstance(TimeoutRule(4, 0.01), 2)) == GateRule.of(TimeoutRule(4, 0.01))
    for m in range(2):
        for n in range(8):
            assert rule.decide(n, 0.0, m).serve == table.action(n, m)


def test_the_sidecar_builds_the_k_instance_policy_and_the_gate_follows_m():
    cap = 64 / 0.0108899098
    cfg = ModelPolicyConfig(policy="smdp", profile=PROFILE, rate_rps=1.5 * cap, weight=1e-4)
    info = build_rule("m", cfg, 64, instances=2)
    assert isinstance(info.rule, GateRule) and len(info.rule.busy_tables) == 1
    assert info.prediction is not None and info.prediction["instances"] == 2
    one = build_rule("m", cfg.model_copy(update={"rate_rps": 0.5 * cap}), 64)
    assert GateRule.of(one.rule).busy_tables == ()

    # the gate passes m = its in-flight batches: a table that serves at once when idle, waits for 3
    # when one instance is busy
    clock = [0.0]
    gate = ModelGate(GateRule.of(InstanceTable([[0, 1, 2, 3, 4], [0, 0, 0, 3, 4]], 4)), slots=2,
                     clock=lambda: clock[0])
    gate.submit(Pending("k", 0.0))
    assert [len(b) for b in gate.poll().batches] == [1]
    gate.submit(Pending("k", 0.0))
    gate.submit(Pending("k", 0.0))
    assert gate.poll().batches == ()
    gate.submit(Pending("k", 0.0))
    assert [len(b) for b in gate.poll().batches] == [3]


def test_the_adaptive_loop_solves_for_k_instances_and_installs_a_rule_that_sees_m():
    import asyncio

    from plugin.loop.controller import ControllerConfig, LearningConfig, PolicyController
    from solver.model import ServiceProfile

    profile = ServiceProfile.from_csv(PROFILE, max_batch=64)
    cap = 64 / float(profile.mean_s[-1])
    installed = []
    clock = [1000.0]
    c = PolicyController(
        "m", profile,
        ControllerConfig(max_batch=64, idle_power_w=40.0, weight=1e-4, initial_rate=1.5 * cap, window_s=5.0,
                         long_run_s=0.0, learning=LearningConfig(enabled=False), instances=2),
        install=installed.append, clock=lambda: clock[0])
    assert c.capacity == 2 * cap

    async def go():
        task = c.tick(clock[0])
        assert task is not None
        await task

    asyncio.run(go())
    assert c.current is not None and c.current.table is not None and c.current.table.instances == 2
    assert c.current.rate_rps == 1.5 * cap  # above one instance's capacity: solved, not capped
    assert len(installed) == 1 and isinstance(installed[0], GateRule) and len(installed[0].busy_tables) == 1

    from solver.slo import SloTarget

    # with an SLO, k instances are solved by the k-instance SLO search (solver.instances_slo): q99 <= 14 ms
    # makes it guard the limits, and the gate gets the table a(n, m) with that guard
    c.set_slo(SloTarget(0.99, 0.014))
    asyncio.run(go())
    assert len(installed) == 2 and isinstance(installed[1], GateRule) and len(installed[1].busy_tables) == 1
    assert c.current.slo is not None and c.current.slo.feasible and "k-instance SLO" in c.current.source
    assert c.current.slo.quantile_s + c.current.slo.ci95_s <= 0.014
    assert c.current.table is not None and c.current.max_wait_s is not None  # (6, 8) guarded at 1.4 ms
    from solver.policy import MaxWaitGuard

    guarded = GateRule.of(MaxWaitGuard(installed[1], c.current.max_wait_s))  # as the registry installs it
    assert guarded.busy_tables == installed[1].busy_tables and guarded.max_wait_s == c.current.max_wait_s


def test_the_real_stack_bench_measures_idle_power_per_device():
    import numpy as np

    from loadtest.metrics import measure
    from loadtest.openloop import OpenLoopResult
    from plugin.placement import Placement
    from solver.model import ServiceProfile

    prof = ServiceProfile.from_table([1, 2], [0.01, 0.01], [1.0, 1.0])  # e(b) = 1 J in 10 ms: p(b) = 100 W
    # two requests, one batch of 2 (each reports the whole batch's energy), in a 1 s window
    res = OpenLoopResult(scheduled_s=np.array([0.1, 0.1]), sent_s=np.array([0.1, 0.1]),
                         done_s=np.array([0.12, 0.12]), status=("OK", "OK"), batch_size=np.array([2, 2]),
                         batch_energy_j=np.array([1.0, 1.0]))
    one = measure(res, prof, idle_power_w=40.0, weight=0.0, window=(0.0, 1.0))
    two = measure(res, prof, idle_power_w=40.0, weight=0.0, window=(0.0, 1.0), placement=Placement(2, 2, ""))
    shared = measure(res, prof, idle_power_w=40.0, weight=0.0, window=(0.0, 1.0), placement=Placement(2, 1, ""))
    assert one.mean_power_w == pytest.approx(1.0 + 40.0 * 0.99)
    assert two.mean_power_w == pytest.approx(1.0 + 40.0 * 1.99)
    assert shared.mean_power_w == pytest.approx(1.0 + 40.0 * 0.99)  # two instances on one GPU: P0 once


def test_the_policy_reply_carries_and_shows_the_rows_for_m():
    from plugin.control import PolicyInfo
    from plugin.ctl_cli import _policy_text

    info = PolicyInfo([0, 1, 2, 3, 4], 4, 3, 1.0, "smdp", None, ((0, 0, 0, 3, 4),))
    msg = info.message("m")
    assert [list(r.actions) for r in msg.busy_tables] == [[0, 0, 0, 3, 4]]
    text = _policy_text(msg)
    assert "m = 0 batches in flight" in text and "m = 1+ batches in flight" in text
    assert "n = 0..2: wait" in text
    assert "m = 0" not in _policy_text(PolicyInfo([0, 1, 2], 2, 1, 0.0, "smdp").message("m"))
