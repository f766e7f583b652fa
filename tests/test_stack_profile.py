"""The load tests' solver profile: measured times, the table's energy, and P0 for the time the stack adds."""

from __future__ import annotations

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
    line = run_split(np.array([0.040, 0.042, 0.044, 0.046]), GateWindow(np.array([0, 2]), np.array([0.0, 0.050]), 4,
                                                                        0.160, 0.001))
    assert "client W 43.00 ms over 4 answers" in line and "the gate's own W 40.00 ms over 4" in line
    assert "hop (client - gate) 3.00 ms" in line and "2 batches, mean dispatch-to-completion 25.00 ms" in line
    assert "turnaround 0.50 ms" in line
    assert run_split(np.array([]), GateWindow(np.zeros(2), np.zeros(2), 0, 0.0)) == "no answered requests to split"
