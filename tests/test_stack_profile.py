"""The load tests' solver profile: measured times, the table's energy, and P0 for the time the stack adds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.stack_profile import compose, write_composed_csv
from solver.model import ServiceProfile


def test_composed_energy_charges_idle_power_for_what_the_stack_adds(tmp_path) -> None:
    table = ServiceProfile.from_table([1, 2, 4], [0.020, 0.022, 0.025], [2.0, 2.4, 3.0])
    measured = ServiceProfile.from_table([1, 2, 4], [0.0215, 0.0238, 0.0249], None, [0.03, 0.02, 0.01],
                                         busy_power_w=[0.0, 0.0, 0.0])
    p0 = 40.0
    prof = compose(measured, table, p0)
    assert prof.mean_s.tolist() == measured.mean_s.tolist() and prof.cv.tolist() == measured.cv.tolist()
    # a cycle of length T around one batch costs the same joules either way: the table's batch and P0 for
    # the rest (how the bench measures), or the composed batch and P0 for what is left of T
    for b in (1, 2, 3, 4):
        for cycle in (0.03, 0.1):
            measured_way = table.energy_j[b - 1] + p0 * (cycle - table.mean_s[b - 1])
            solver_way = prof.energy_j[b - 1] + p0 * (cycle - prof.mean_s[b - 1])
            if measured.mean_s[b - 1] >= table.mean_s[b - 1]:
                assert solver_way == pytest.approx(measured_way)
    # a measured time below the table's (b = 4 here) adds nothing, never negative energy
    assert prof.energy_j[3] == pytest.approx(table.energy_j[3])
    path = write_composed_csv(prof, tmp_path / "p.csv", "a note")
    back = ServiceProfile.from_csv(path)
    assert np.allclose(back.mean_s, prof.mean_s) and np.allclose(back.energy_j, prof.energy_j)
    assert "# power: modelled" in path.read_text()


def test_added_under_load_is_the_batch_weighted_excess_over_the_quiet_profile() -> None:
    from loadtest.stack_profile import GateWindow, added_under_load

    quiet = ServiceProfile.from_table([1, 2, 3, 4], [0.020, 0.022, 0.024, 0.026], [2.0, 2.4, 2.8, 3.2])
    # 10 batches of 2 each 1 ms longer, 30 batches of 4 each 3 ms longer: (10 x 1 + 30 x 3) / 40 ms
    n = np.array([0, 10, 0, 30])
    busy = np.array([0.0, 10 * 0.023, 0.0, 30 * 0.029])
    assert added_under_load(quiet, GateWindow(n, busy, 200, 9.0)) == pytest.approx(2.5e-3)
    # sizes beyond the quiet profile do not count; an empty window is an error, not a zero
    wide = GateWindow(np.array([0, 10, 0, 30, 7]), np.append(busy, 7.0), 200, 9.0)
    assert added_under_load(quiet, wide) == pytest.approx(2.5e-3)
    with pytest.raises(ValueError, match="no batch"):
        added_under_load(quiet, GateWindow(np.zeros(4), np.zeros(4), 0, 0.0))


def test_loaded_profile_shifts_every_time_and_charges_the_shift_at_idle_power() -> None:
    from loadtest.stack_profile import loaded

    table = ServiceProfile.from_table([1, 2, 4], [0.020, 0.022, 0.025], [2.0, 2.4, 3.0])
    measured = ServiceProfile.from_table([1, 2, 4], [0.0215, 0.0238, 0.0262], None, [0.03, 0.02, 0.01],
                                         busy_power_w=[0.0, 0.0, 0.0])
    p0 = 40.0
    quiet = compose(measured, table, p0)
    up = loaded(quiet, 0.002, table, p0)
    assert np.allclose(up.mean_s, quiet.mean_s + 0.002)
    assert np.allclose(up.energy_j, quiet.energy_j + p0 * 0.002)
    assert up.cv.tolist() == quiet.cv.tolist()
    # faster than the quiet profile: never below what the emulated model itself sleeps (the table)
    down = loaded(quiet, -0.003, table, p0)
    assert np.all(down.mean_s >= table.mean_s) and np.allclose(np.maximum(quiet.mean_s - 0.003, table.mean_s), down.mean_s)
    assert np.all(down.energy_j >= table.energy_j - 1e-12)


def test_operating_point_is_the_demos_default_and_one_instance_only() -> None:
    import argparse

    from loadtest.bench import BenchConfig
    from loadtest.cli import _config, register
    from loadtest.contenders import parse_contender

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    demo = _config(parser.parse_args(["demo", "--data-plane", "python"]))
    assert demo.stack_profile and demo.operating_point
    quiet = _config(parser.parse_args(["demo", "--data-plane", "python", "--stack-profile", "measured"]))
    assert quiet.stack_profile and not quiet.operating_point
    bench = _config(parser.parse_args(["bench", "--rates", "100", "--data-plane", "python"]))
    assert bench.stack_profile and not bench.operating_point
    with pytest.raises(ValueError, match="one-instance"):
        BenchConfig(rates=(100.0,), contenders=(parse_contender("gate:greedy"),), data_plane="python",
                    operating_point=True, instances=2)


def test_a_calibration_that_cannot_be_read_keeps_the_quiet_stack(monkeypatch, tmp_path) -> None:
    import loadtest.stack_profile as sp
    from loadtest.bench import BenchConfig, Stack, _at_operating_point
    from loadtest.contenders import parse_contender

    def fails(*args, **kwargs):
        raise ValueError("the gate's status was not read at both ends of the window")

    monkeypatch.setattr(sp, "operating_point", fails)
    prof = ServiceProfile.from_table([1, 2], [0.020, 0.022], [2.0, 2.4])
    stack = Stack("127.0.0.1:1", None, 2, prof, tmp_path / "p.csv", hop=sp.RequestHop(0.001, 0.002))
    cfg = BenchConfig(rates=(100.0,), contenders=(parse_contender("gate:greedy"),), data_plane="python",
                      operating_point=True, out_dir=tmp_path)
    said: list[str] = []
    assert _at_operating_point(stack, cfg, 100.0, 0, "greedy", said.append) is stack
    assert "could not measure the stack at 100 req/s" in said[0] and "not read at both ends" in said[0]


def test_each_gate_policy_is_calibrated_by_its_own_run_just_before_its_first_contender(monkeypatch, tmp_path) -> None:
    from contextlib import nullcontext
    from types import SimpleNamespace

    import loadtest.bench as bench
    import loadtest.stack_profile as sp
    from loadtest.bench import BenchConfig, Stack, calibration_policy
    from loadtest.contenders import parse_contender
    from solver.slo import SloTarget

    events: list[str] = []

    def calibrate(*args, policy: str, **kwargs):
        events.append(f"calibrate {policy}")
        i = sum(e.startswith("calibrate") for e in events)
        prof = ServiceProfile.from_table([1, 2], [0.021 + i * 1e-3, 0.023], [2.0, 2.4])
        return sp.OperatingPoint(100.0, prof, tmp_path / f"{policy}.csv", 1e-3, 0.002 * i, 10, 40, policy)

    seen: dict[str, Stack] = {}

    def run_one(stack, cfg, c, rate, times):  # records the stack each contender is predicted with
        events.append(f"run {c.name}")
        seen[c.name] = stack
        return SimpleNamespace(measured=SimpleNamespace(mean_latency_s=0.04, mean_power_w=100.0, mean_batch=2.0,
                                                        failed=0), settings="")

    prof = ServiceProfile.from_table([1, 2], [0.020, 0.022], [2.0, 2.4])
    stack = Stack("127.0.0.1:1", None, 2, prof, tmp_path / "p.csv", hop=sp.RequestHop(0.001, 0.0015))
    names = ("triton:0", "gate:greedy", "gate:smdp", "gate:smdp-adaptive", "gate:smdp-slo", "gate:static:2")
    contenders = tuple(parse_contender(x) for x in names)
    assert [calibration_policy(c) for c in contenders[1:]] == ["greedy", "smdp", "smdp", "smdp", "static:2"]
    cfg = BenchConfig(rates=(50.0,), contenders=contenders, data_plane="python", operating_point=True,
                      out_dir=tmp_path, slo=SloTarget(0.99, 0.2))
    monkeypatch.setattr(sp, "operating_point", calibrate)
    monkeypatch.setattr(bench, "bench_stack", lambda *a, **k: nullcontext(stack))
    monkeypatch.setattr(bench, "run_one", run_one)
    bench.run_bench(cfg, progress=lambda _: None)
    assert events == ["run triton delay=0ms", "calibrate greedy", "run gate greedy", "calibrate smdp", "run gate smdp",
                      "run gate smdp adaptive", "run gate smdp SLO", "calibrate static:2", "run gate static:2"]
    assert seen["triton delay=0ms"] is stack  # Triton's batcher keeps the quiet profile and the lone hop
    for name, policy, i in (("gate greedy", "greedy", 1), ("gate smdp", "smdp", 2), ("gate smdp adaptive", "smdp", 2),
                            ("gate smdp SLO", "smdp", 2), ("gate static:2", "static:2", 3)):
        got = seen[name]
        assert got.profile_path == tmp_path / f"{policy}.csv"
        assert got.hop == sp.RequestHop(0.001, 0.002 * i)  # the direct hop stays the lone requests'
        assert got.profile.mean_s[0] == pytest.approx(0.021 + i * 1e-3)


def test_run_split_is_the_clients_mean_less_the_gates_and_the_batch_cycle() -> None:
    from loadtest.stack_profile import GateWindow, run_split

    # 4 answers at 40, 42, 44, 46 ms (mean 43); the gate: 4 requests summing 160 ms (40 ms each);
    # 2 batches of 2 at 25 ms each, 0.5 ms from decision to dispatch each
    split = run_split(np.array([0.040, 0.042, 0.044, 0.046]), GateWindow(np.array([0, 2]), np.array([0.0, 0.050]), 4,
                                                                         0.160, 0.001))
    assert split.client_w_s == pytest.approx(0.043) and split.gate_w_s == pytest.approx(0.040)
    assert split.hop_s == pytest.approx(0.003) and split.batches == 2
    assert split.busy_s == pytest.approx(0.025) and split.lag_s == pytest.approx(0.0005)
    line = split.describe()
    assert "client W 43.00 ms over 4 answers" in line and "the gate's own W 40.00 ms over 4" in line
    assert "hop (client - gate) 3.00 ms" in line and "2 batches, mean dispatch-to-completion 25.00 ms" in line
    assert "turnaround 0.50 ms" in line
    with pytest.raises(ValueError, match="no answered requests"):
        run_split(np.array([]), GateWindow(np.zeros(2), np.zeros(2), 0, 0.0))


def test_run_split_compares_the_batches_with_the_profile_the_prediction_was_solved_with() -> None:
    from loadtest.stack_profile import GateWindow, run_split

    told = ServiceProfile.from_table([1, 2], [0.020, 0.024], [2.0, 2.4])
    # 3 batches of 1 at 21 ms and 1 of 2 at 26 ms, 0.2 ms turnaround each: (3 x 1 + 2 + 4 x 0.2) / 4 ms
    window = GateWindow(np.array([3, 1]), np.array([0.063, 0.026]), 5, 0.2, 4 * 0.0002)
    split = run_split(np.full(5, 0.043), window, told)
    assert split.slot_excess_s == pytest.approx((0.003 + 0.002 + 0.0008) / 4)
    assert "the slot held +1.45 ms per batch beyond the profile predicted with" in split.describe()
    assert np.isnan(run_split(np.full(5, 0.043), window).slot_excess_s)


def test_model_w_is_the_rules_mean_over_the_window_of_these_arrivals() -> None:
    from loadtest.stack_profile import model_w, policy_rule
    from solver.model import BatchingModel
    from solver.policy import greedy

    prof = ServiceProfile.from_table([1, 2], [0.020, 0.030], [2.0, 3.0])  # deterministic (cv 0)
    # greedy: 0 alone (20 ms); at 0.020 the two oldest of the three waiting, 0.001 and 0.010, together until
    # 0.050 (49 and 40 ms); 0.015 alone until 0.070 (55 ms); 1.0 alone (20 ms). Window [0.0005, 0.5): the
    # second, third and fourth
    times = np.array([0.0, 0.001, 0.010, 0.015, 1.0])
    rule = greedy(2)
    assert model_w(prof, rule, times, (0.0005, 0.5), 40.0, 0.001, draws=2) == pytest.approx((0.049 + 0.040 + 0.055) / 3)
    assert model_w(prof, rule, times, (0.0, 10.0), 40.0, 0.001) == pytest.approx(
        (0.020 + 0.049 + 0.040 + 0.055 + 0.020) / 5)
    with pytest.raises(ValueError, match="no arrival in the window"):
        model_w(prof, rule, times, (2.0, 3.0), 40.0, 0.001)
    model = BatchingModel(30.0, 2, prof, 40.0, 0.001)
    assert np.array_equal(policy_rule("greedy", model).actions, greedy(2).actions)
    from solver.smdp import solve

    assert np.array_equal(policy_rule("smdp", model).actions, solve(model).policy.actions)


def test_gate_contenders_at_the_operating_point_are_predicted_on_their_own_arrivals_plus_both_residuals(
        monkeypatch, tmp_path) -> None:
    import loadtest.bench as bench
    import loadtest.stack_profile as sp
    from loadtest.bench import BenchConfig, Stack
    from loadtest.contenders import parse_contender
    from loadtest.openloop import OpenLoopResult

    prof = ServiceProfile.from_table([1, 2], [0.020, 0.030], [2.0, 3.0])
    stack = Stack("127.0.0.1:1", None, 2, prof, tmp_path / "p.csv", hop=sp.RequestHop(0.001, 0.002, 0.0005))
    gate, triton = parse_contender("gate:greedy"), parse_contender("triton:0")
    cfg = BenchConfig(rates=(30.0,), contenders=(gate, triton), data_plane="python", operating_point=True,
                      out_dir=tmp_path, warmup_s=0.0005, duration_s=0.4995, cooldown_s=0.1)
    times = np.array([0.0, 0.001, 0.010, 0.015, 1.0])
    n = times.size
    done = OpenLoopResult(times, times, times + 0.05, ("OK",) * n, np.ones(n, dtype=np.int64), np.full(n, 2.0))
    monkeypatch.setattr(bench, "_run_contender", lambda *a, **k: (done, None, None))
    row = bench.run_one(stack, cfg, gate, 30.0, times)
    # the rule's W on these arrivals (closed form above) + the calibration's time in the gate + its hop
    assert row.predicted.mean_latency_s == pytest.approx((0.049 + 0.040 + 0.055) / 3 + 0.0005 + 0.002)
    assert row.predicted.source == "exact, W sim+hop"
    assert row.predicted_hop_s == 0.002 and row.predicted_in_gate_s == 0.0005
    # Triton's batcher (its 0 ms delay too, which also sleeps through completions it misses): simulated as
    # Triton runs it, plus the lone requests' direct hop, nothing in a gate
    row = bench.run_one(stack, cfg, triton, 30.0, times)
    assert row.predicted.source == "sim+hop" and row.predicted_in_gate_s == 0.0
    # without the operating point the gate keeps the stationary figure
    row = bench.run_one(stack, BenchConfig(rates=(30.0,), contenders=(gate,), data_plane="python", out_dir=tmp_path),
                        gate, 30.0, times)
    assert row.predicted.source == "exact+hop"


def test_the_split_table_sets_each_part_of_a_gate_contenders_w_beside_its_prediction(monkeypatch, tmp_path) -> None:
    import loadtest.bench as bench
    import loadtest.stack_profile as sp
    from loadtest.bench import BenchConfig, BenchReport, Stack, split_table
    from loadtest.contenders import parse_contender
    from loadtest.openloop import OpenLoopResult

    prof = ServiceProfile.from_table([1, 2], [0.020, 0.030], [2.0, 3.0])
    stack = Stack("127.0.0.1:1", None, 2, prof, tmp_path / "p.csv", hop=sp.RequestHop(0.001, 0.002, 0.0005))
    gate = parse_contender("gate:greedy")
    cfg = BenchConfig(rates=(30.0,), contenders=(gate,), data_plane="python", operating_point=True,
                      out_dir=tmp_path, warmup_s=0.0005, duration_s=0.4995, cooldown_s=0.1)
    times = np.array([0.0, 0.001, 0.010, 0.015, 1.0])
    n = times.size
    done = OpenLoopResult(times, times, times + 0.0535, ("OK",) * n, np.ones(n, dtype=np.int64), np.full(n, 2.0))
    split = sp.RunSplit(0.0535, 3, 0.0505, 3, 2, 0.025, 0.0004, 0.0001)
    monkeypatch.setattr(bench, "_run_contender", lambda *a, **k: (done, split, None))
    row = bench.run_one(stack, cfg, gate, 30.0, times)
    assert split_table(BenchReport(cfg, (), 2, "")) == []
    lines = split_table(BenchReport(cfg, (row,), 2, ""))
    assert "W = gate" in lines[0] and "slot+" in lines[1]
    # predicted: 48 ms (the rule on these arrivals) + 0.5 in the gate = 48.5, + 2 ms hop = 50.5
    assert lines[3].split() == ["30", "gate", "greedy", "53.50", "50.50", "+5.9%", "|", "50.50", "48.50", "+0.50",
                                "+4.1%", "|", "3.00", "2.00", "|", "25.00", "0.40", "+0.10"]
    got = {k: v for k, v in bench.csv_rows(BenchReport(cfg, (row,), 2, ""))[0].items() if "gate" in k or "hop" in k}
    assert got == pytest.approx({"gate_W_ms": 50.5, "hop_ms": 3.0, "pred_gate_W_ms": 48.5, "pred_hop_ms": 2.0})


def test_model_wp_gives_the_rules_power_and_batch_from_the_same_simulation() -> None:
    from loadtest.stack_profile import model_wp
    from solver.policy import greedy

    prof = ServiceProfile.from_table([1, 2], [0.020, 0.030], [2.0, 3.0])  # deterministic (cv 0)
    times = np.array([0.0, 0.001, 0.010, 0.015, 1.0])
    f = model_wp(prof, greedy(2), times, (0.0, 10.0), 40.0, 0.001, draws=2)
    # the schedule of the test above: batches of 1, 2, 1, 1 (9 J over 90 ms busy), the last ending at 1.020 s;
    # idle 40 W for the other 0.930 s
    assert f.mean_latency_s == pytest.approx((0.020 + 0.049 + 0.040 + 0.055 + 0.020) / 5)
    assert f.mean_power_w == pytest.approx((9.0 + 40.0 * 0.930) / 1.020)
    assert f.mean_batch == pytest.approx(5 / 4)


def _reading(version: int, age_s: float, actions=(0, 1, 2), max_wait_s=None):
    from loadtest.stack_profile import RuleReading

    return RuleReading(tuple(actions), 2, max_wait_s, version, age_s)


def test_the_rule_schedule_starts_each_version_seen_at_its_reading_less_its_age() -> None:
    from loadtest.stack_profile import rule_schedule
    from solver.policy import MaxWaitGuard, PolicyTable

    v1, v2 = _reading(1, 5.0), _reading(2, 0.05, actions=(0, 0, 2), max_wait_s=0.005)
    assert isinstance(v1.rule, PolicyTable) and np.array_equal(v1.rule.actions, [0, 1, 2])
    assert isinstance(v2.rule, MaxWaitGuard) and v2.rule.max_wait_s == 0.005
    one = rule_schedule([(0.0, v1), (0.2, _reading(1, 5.2))], (0.0, 0.2))
    assert [r.version for _, r in one.segments] == [1] and "whole window" in one.describe()
    # v2 read at 0.1 s, 0.05 s old: in force from 0.05 s, 75% of the window
    got = rule_schedule([(0.2, _reading(2, 0.15)), (0.0, v1), (0.1, v2)], (0.0, 0.2))
    assert [(t, r.version) for t, r in got.segments] == [(0.0, 1), (pytest.approx(0.05), 2)] and got.missed == 0
    assert np.allclose(got.shares(), [0.25, 0.75])
    assert "changed 1x" in got.describe() and "v1 (threshold 1) for 25%" in got.describe()
    assert "threshold 2, max wait 5.00 ms) for 75%" in got.describe()
    # v3 read first at 0.1 s: v2 came and went between readings
    got = rule_schedule([(0.0, v1), (0.1, _reading(3, 0.05))], (0.0, 0.2))
    assert got.missed == 1 and "changed 2x" in got.describe() and "1 more seen by no reading" in got.describe()
    # a version in force since before the window replaces the one read at its start from the start
    got = rule_schedule([(0.0, v1), (0.1, _reading(2, 0.5))], (0.0, 0.2))
    assert [(t, r.version) for t, r in got.segments] == [(0.0, 2)]
    with pytest.raises(ValueError, match="window must be positive"):
        rule_schedule([(0.0, v1)], (0.2, 0.2))
    with pytest.raises(ValueError, match="no reading"):
        rule_schedule([], (0.0, 0.2))


def test_model_wp_schedule_takes_each_requests_w_from_the_rule_in_force_at_its_arrival() -> None:
    from loadtest.stack_profile import RuleSchedule, model_wp_schedule

    prof = ServiceProfile.from_table([1, 2], [0.020, 0.030], [2.0, 3.0])  # deterministic (cv 0)
    times = np.array([0.0, 0.001, 0.1, 0.101])
    # greedy: each alone, 0 and 0.1 at once (20 ms), 0.001 and 0.101 after them (39 ms); 4 x 2 J by 0.14 s.
    # threshold 2: pairs at 0.001 and 0.101 (31 and 30 ms each); 2 x 3 J by 0.131 s... ending 0.131, and
    # the horizon is each simulation's own: 0.14 and 0.131 s.
    sched = RuleSchedule(((0.0, _reading(1, 5.0)), (0.05, _reading(2, 0.05, actions=(0, 0, 2)))), (0.0, 0.2))
    f = model_wp_schedule(prof, sched, times, 40.0, 0.001, draws=2)
    assert f.mean_latency_s == pytest.approx((0.020 + 0.039 + 0.031 + 0.030) / 4)
    p_greedy = (8.0 + 40.0 * (0.14 - 0.08)) / 0.14
    p_pairs = (6.0 + 40.0 * (0.131 - 0.06)) / 0.131
    assert f.mean_power_w == pytest.approx(0.25 * p_greedy + 0.75 * p_pairs)
    assert f.mean_batch == pytest.approx(0.25 * 1 + 0.75 * 2)


def test_rule_reading_takes_the_table_from_get_policy_and_the_guard_from_the_slo_status() -> None:
    from loadtest.stack_profile import rule_reading
    from smdp.v1 import smdp_pb2

    status = smdp_pb2.ModelStatus(model="m", slo=smdp_pb2.SloStatus(quantile=0.99, latency_s=0.08, max_wait_s=0.004))
    policy = smdp_pb2.PolicyReply(model="m", actions=[0, 0, 2, 2], max_batch=2, version=7, age_s=1.5)
    r = rule_reading(status, policy)
    assert (r.actions, r.max_batch, r.max_wait_s, r.version, r.age_s) == ((0, 0, 2, 2), 2, 0.004, 7, 1.5)
    assert rule_reading(smdp_pb2.ModelStatus(model="m"), policy).max_wait_s is None
    with pytest.raises(ValueError, match="not a table"):
        rule_reading(status, smdp_pb2.PolicyReply(model="m", max_batch=2))


def test_an_slo_gate_is_predicted_with_the_rule_it_ran_on_its_own_arrivals(monkeypatch, tmp_path) -> None:
    import loadtest.bench as bench
    import loadtest.stack_profile as sp
    from loadtest.bench import BenchConfig, Stack
    from loadtest.contenders import parse_contender
    from loadtest.openloop import OpenLoopResult
    from solver.slo import SloTarget

    prof = ServiceProfile.from_table([1, 2], [0.020, 0.030], [2.0, 3.0])
    stack = Stack("127.0.0.1:1", None, 2, prof, tmp_path / "p.csv", hop=sp.RequestHop(0.001, 0.002, 0.0005))
    gate = parse_contender("gate:smdp-slo")
    cfg = BenchConfig(rates=(30.0,), contenders=(gate,), data_plane="python", operating_point=True,
                      out_dir=tmp_path, warmup_s=0.0005, duration_s=0.4995, cooldown_s=0.1,
                      slo=SloTarget(0.99, 0.2))
    times = np.array([0.0, 0.001, 0.1])
    n = times.size
    done = OpenLoopResult(times, times, times + 0.03, ("OK",) * n, np.ones(n, dtype=np.int64), np.full(n, 2.0))
    # threshold 2 guarded at 5 ms: 0 and 0.001 together until 0.031 (3 J); 0.1 alone once it waited 5 ms,
    # 0.105 to 0.125 (2 J). Window from 0.0005: the second and third, W (30 + 25) / 2 ms; power from 0.0005
    # to 0.125 (busy 50 ms, idle 40 W for the other 74.5 ms)
    in_force = sp.RuleSchedule(((0.0005, _reading(2, 9.0, actions=(0, 0, 2), max_wait_s=0.005)),), cfg.window)
    monkeypatch.setattr(bench, "_run_contender", lambda *a, **k: (done, None, in_force))
    row = bench.run_one(stack, cfg, gate, 30.0, times)
    assert row.predicted.mean_latency_s == pytest.approx(0.0275 + 0.0005 + 0.002)
    assert row.predicted.mean_power_w == pytest.approx((5.0 + 40.0 * 0.0745) / 0.1245)
    assert row.predicted.mean_batch == pytest.approx(1.5)
    assert row.predicted.source == "in force, W P sim+hop" and "whole window" in row.settings
    # where the rule could not be read it keeps the SLO search's pick, judged apart from the search
    from loadtest.contenders import slo_prediction
    from solver.model import BatchingModel

    monkeypatch.setattr(bench, "_run_contender", lambda *a, **k: (done, None, None))
    kept = bench.run_one(stack, cfg, gate, 30.0, times).predicted
    want = slo_prediction(BatchingModel(30.0, 2, prof, cfg.idle_power_w, cfg.weight), cfg.slo, cfg.seed)
    assert kept.source == f"{want.source}+hop"
    assert kept.mean_latency_s == pytest.approx(want.mean_latency_s + 0.0005 + 0.002)
