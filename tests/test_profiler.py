"""The profiler's pure parts: sizes, input synthesis, statistics against closed forms, power from
Triton's GPU metrics (on recorded metric text), and the files it writes read back by the solver."""

from __future__ import annotations

import asyncio

import json
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from scipy import stats
from tritonclient.grpc import model_config_pb2

from plugin.profiler import (
    GpuMeter, InputSynthesizer, ModelSpec, PowerKind, PowerModel, ProfileError, SizeRun, SizeStats, SweepPlan,
    build_report, check_profilable, counter_power_w, monotonicity_warnings, parse_sizes, profile_power_kind,
    read_input_data, report_json, write_profile_csv, write_samples_csv,
)
from solver.model import ServiceProfile, read_samples_csv

V100 = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"

# What Triton 2.x serves on its metrics port on a GPU host (trimmed: one GPU, a few families).
RECORDED_GPU_METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="resnet50",version="1"} 1200
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-5e6f9b2c-1d1a-4c3e-9d8e-2b7f0e6c1a11"} 0.41
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{gpu_uuid="GPU-5e6f9b2c-1d1a-4c3e-9d8e-2b7f0e6c1a11"} %(power).3f
# HELP nv_gpu_power_limit GPU power management limit in watts
# TYPE nv_gpu_power_limit gauge
nv_gpu_power_limit{gpu_uuid="GPU-5e6f9b2c-1d1a-4c3e-9d8e-2b7f0e6c1a11"} 300.000000
# HELP nv_energy_consumption GPU energy consumption in joules since the Triton Server started
# TYPE nv_energy_consumption counter
nv_energy_consumption{gpu_uuid="GPU-5e6f9b2c-1d1a-4c3e-9d8e-2b7f0e6c1a11"} %(energy).3f
"""

CPU_ONLY_METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="cpu_mlp",version="1"} 12
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.25
"""


def spec(inputs, max_batch: int = 8, name: str = "m") -> ModelSpec:
    cfg = model_config_pb2.ModelConfig(name=name, max_batch_size=max_batch)
    for n, dt, dims in inputs:
        cfg.input.add(name=n, data_type=dt, dims=dims)
    cfg.output.add(name="Y", data_type=model_config_pb2.TYPE_FP32, dims=[1])
    return ModelSpec.from_config(cfg)


# ----------------------------------------------------------------------------------------------------
# Sizes and models


def test_sizes() -> None:
    assert parse_sizes("default", 128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert parse_sizes("default", 48) == (1, 2, 4, 8, 16, 32, 48)
    assert parse_sizes("all", 4) == (1, 2, 3, 4)
    assert parse_sizes("4, 1,2,2", 8) == (1, 2, 4)
    with pytest.raises(ProfileError) as e:
        parse_sizes("1,2,16,32", 8)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "[16, 32]" in e.value.message
    for bad in ("x", "0,1", ","):
        with pytest.raises(ProfileError):
            parse_sizes(bad, 8)


def test_models_that_do_not_batch_are_refused() -> None:
    with pytest.raises(ProfileError, match="nothing to batch") as e:
        check_profilable(model_config_pb2.ModelConfig(name="flat", max_batch_size=0))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    seq = model_config_pb2.ModelConfig(name="seq", max_batch_size=4)
    seq.sequence_batching.SetInParent()
    with pytest.raises(ProfileError, match="sequence-batched"):
        check_profilable(seq)


def test_model_spec_reads_instances_and_hashes_the_config() -> None:
    cfg = model_config_pb2.ModelConfig(name="m", max_batch_size=4)
    cfg.instance_group.add(count=2)
    cfg.instance_group.add(count=1)
    a = ModelSpec.from_config(cfg)
    assert a.instances == 3 and not a.dynamic_batching
    cfg.dynamic_batching.max_queue_delay_microseconds = 10
    b = ModelSpec.from_config(cfg)
    assert b.dynamic_batching and b.config_hash != a.config_hash


# ----------------------------------------------------------------------------------------------------
# Inputs


def test_numeric_inputs_are_synthesised_with_exactly_b_rows() -> None:
    s = spec([("A", model_config_pb2.TYPE_FP32, [3, 2]), ("B", model_config_pb2.TYPE_INT64, [5]),
              ("C", model_config_pb2.TYPE_BOOL, [1]), ("D", model_config_pb2.TYPE_FP16, [2]),
              ("E", model_config_pb2.TYPE_BF16, [2])])
    synth = InputSynthesizer(s)
    req = synth.request(6)
    assert req.model_name == "m" and [o.name for o in req.outputs] == ["Y"]
    sizes = {"A": 4, "B": 8, "C": 1, "D": 2, "E": 2}
    for t, raw in zip(req.inputs, req.raw_input_contents):
        assert t.shape[0] == 6
        assert len(raw) == math.prod(t.shape) * sizes[t.name]
    assert list(req.inputs[0].shape) == [6, 3, 2]
    assert synth.request(6) is req  # built once per size
    with pytest.raises(ValueError):
        synth.request(9)


@pytest.mark.parametrize("dt, dims, why", [
    (model_config_pb2.TYPE_STRING, [1], "BYTES"),
    (model_config_pb2.TYPE_FP32, [-1, 4], "variable"),
])
def test_inputs_that_cannot_be_synthesised_name_the_input(dt, dims, why) -> None:
    with pytest.raises(ProfileError) as e:
        InputSynthesizer(spec([("OK", model_config_pb2.TYPE_FP32, [2]), ("TOKENS", dt, dims)]))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'TOKENS'" in e.value.message and why in e.value.message and "--input-data" in e.value.message


def test_input_data_json_rows_fill_a_batch(tmp_path) -> None:
    s = spec([("TEXT", model_config_pb2.TYPE_STRING, [1]), ("SEQ", model_config_pb2.TYPE_INT32, [-1])])
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"data": [
        {"TEXT": ["ab"], "SEQ": {"content": [1, 2, 3], "shape": [3]}},
        {"TEXT": {"content": ["xyz"], "shape": [1]}, "SEQ": [4, 5, 6]},
    ]}))
    synth = InputSynthesizer(s, read_input_data(f, s))
    req = synth.request(3)
    text, seq = req.raw_input_contents
    # BYTES: 4-byte little-endian length before each element; rows cycle ab, xyz, ab
    assert text == b"\x02\x00\x00\x00ab\x03\x00\x00\x00xyz\x02\x00\x00\x00ab"
    assert np.frombuffer(seq, dtype="<i4").tolist() == [1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert list(req.inputs[1].shape) == [3, 3]


def test_input_data_npz_and_errors(tmp_path) -> None:
    s = spec([("X", model_config_pb2.TYPE_FP32, [4])])
    f = tmp_path / "d.npz"
    np.savez(f, X=np.arange(8, dtype=np.float32).reshape(2, 4))
    req = InputSynthesizer(s, read_input_data(f, s)).request(3)
    assert np.frombuffer(req.raw_input_contents[0], dtype="<f4").reshape(3, 4)[2].tolist() == [0, 1, 2, 3]
    np.savez(f, Z=np.ones((1, 4)))
    with pytest.raises(ProfileError, match="'Z'|Z"):
        read_input_data(f, s)
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"data": [{"X": [1, 2, 3]}]}))
    with pytest.raises(ProfileError, match="3 values"):
        read_input_data(j, s)
    j.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="perf_analyzer"):
        read_input_data(j, s)
    with pytest.raises(ProfileError, match="cannot read"):
        read_input_data(tmp_path / "missing.json", s)


# ----------------------------------------------------------------------------------------------------
# Statistics


def test_size_stats_against_closed_forms() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) * 1e-3
    s = SizeStats.of(4, x, busy_power_w=100.0)
    half = stats.t.ppf(0.975, 5) * np.std(x, ddof=1) / math.sqrt(6)
    assert s.mean_s == pytest.approx(3.5e-3)
    assert (s.ci_lo_s, s.ci_hi_s) == pytest.approx((3.5e-3 - half, 3.5e-3 + half))
    assert s.cv == pytest.approx(np.std(x) / 3.5e-3)
    assert (s.first_half_mean_s, s.second_half_mean_s) == pytest.approx((2e-3, 5e-3))
    assert s.drift == pytest.approx(1.5)
    assert s.energy_j == pytest.approx(100.0 * 3.5e-3)


def test_drift_needs_a_real_and_significant_difference() -> None:
    rng = np.random.default_rng(1)
    steady = 0.010 + rng.normal(0, 0.0002, 200)
    assert not SizeStats.of(1, steady, 0.0).drifted
    slowed = np.concatenate([steady[:100], steady[100:] * 1.2])
    s = SizeStats.of(1, slowed, 0.0)
    assert s.drifted and s.drift == pytest.approx(0.2, abs=0.02) and s.drift_p < 1e-6
    tiny = np.concatenate([steady[:100], steady[100:] * 1.01])  # significant, but 1% is not drift
    assert not SizeStats.of(1, tiny, 0.0).drifted


def test_monotonicity_warnings() -> None:
    a = SizeStats.of(1, np.array([5.0, 5.1, 4.9]) * 1e-3, 0.0)
    b = SizeStats.of(2, np.array([2.0, 2.1, 1.9]) * 1e-3, 0.0)
    c = SizeStats.of(4, np.array([3.0, 3.1, 2.9]) * 1e-3, 0.0)
    (w,) = monotonicity_warnings([a, b, c])
    assert "tau(2)" in w and "tau(1)" in w and "beyond" in w
    assert monotonicity_warnings([b, c]) == []


# ----------------------------------------------------------------------------------------------------
# Power


def test_power_model_affine_and_from_a_prior_profile() -> None:
    m = PowerModel.affine("40,2.5")
    assert m.busy_power_w(4) == pytest.approx(50.0)
    assert PowerModel.affine("120").busy_power_w(64) == 120.0
    for bad in ("", "a,b", "1,2,3", "-5", "nan"):
        with pytest.raises(ProfileError):
            PowerModel.affine(bad)
    prior = ServiceProfile.from_csv(V100)
    p = PowerModel.from_profile(V100)
    assert p.busy_power_w(8) == pytest.approx(prior.busy_power_w[7])
    assert p.busy_power_w(500) == pytest.approx(prior.busy_power_w[-1])


def test_counter_power_from_a_stepping_counter() -> None:
    # a counter updated every 50 ms at 200 W, read every 10 ms: the slope between its changes
    obs = [(t, 200.0 * (math.floor((t + 0.013) / 0.05) * 0.05)) for t in np.arange(0.0, 1.2, 0.01)]
    assert counter_power_w(obs) == pytest.approx(200.0, rel=0.05)
    assert counter_power_w([(0.0, 5.0), (0.5, 5.0), (1.0, 5.0)]) is None
    assert counter_power_w([(0.0, 5.0), (0.5, 6.0)]) is None  # one change is no slope


class FakeTritonMetrics:
    """Serves the recorded metric text with a counter that advances at ``watts`` in ``step_s`` steps."""

    def __init__(self, watts: float, step_s: float = 0.04) -> None:
        self.watts = watts
        self.step_s = step_s
        self.t0 = time.monotonic()
        self.energy = 1000.0
        self.last = 0.0
        self.lock = threading.Lock()

    def __call__(self, url: str) -> str:
        with self.lock:
            now = time.monotonic() - self.t0
            if now - self.last >= self.step_s:
                self.energy += self.watts * (now - self.last)
                self.last = now
            return RECORDED_GPU_METRICS % {"power": self.watts, "energy": self.energy}


def test_gpu_meter_on_recorded_metric_text() -> None:
    fake = FakeTritonMetrics(70.0)
    meter = GpuMeter("http://gpu:8002/metrics", fetch=fake, interval_s=0.005)
    assert meter.available()
    assert meter.idle_power_w(0.2) == pytest.approx(70.0)
    fake.watts = 250.0
    rec = meter.recording().start()
    time.sleep(0.6)
    assert rec.stop() == pytest.approx(250.0, rel=0.15)
    assert not GpuMeter("x", fetch=lambda url: CPU_ONLY_METRICS).available()

    def away(url: str) -> str:
        raise OSError("connection refused")

    assert not GpuMeter("x", fetch=away).available()


class _BackToBack:
    """Stands in for the model client: every batch takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches = 0

    async def timed_infer(self, req) -> float:
        await asyncio.sleep(self.seconds)
        self.batches += 1
        return self.seconds


def test_energy_window_runs_on_until_a_slow_counter_has_stepped_twice() -> None:
    from plugin.profiler import _energy_window

    # Triton's counter steps once per poll of its metrics thread (about 1 s by default), here scaled to 0.3 s;
    # the minimum window (0.1 s) alone would see at most one step: no slope
    fake = FakeTritonMetrics(180.0, step_s=0.3)
    meter = GpuMeter("http://gpu:8002/metrics", fetch=fake, interval_s=0.005)
    client = _BackToBack(0.004)
    power, cycle, error = asyncio.run(_energy_window(client, None, 0.1, meter, 3.0))
    assert error is None and power == pytest.approx(180.0, rel=0.1)
    assert cycle == pytest.approx(0.004, rel=0.5) and client.batches > 0.6 / 0.004 * 0.5  # it ran for two steps
    # capped at the minimum window, as before: nothing to measure
    assert asyncio.run(_energy_window(_BackToBack(0.004), None, 0.1, meter, 0.1))[0] is None
    # a counter that never moves: the run stops at its maximum, power unknown
    still = GpuMeter("x", fetch=lambda url: RECORDED_GPU_METRICS % {"power": 50.0, "energy": 7.0}, interval_s=0.005)
    t0 = time.monotonic()
    assert asyncio.run(_energy_window(_BackToBack(0.004), None, 0.05, still, 0.3))[0] is None
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_measured_power_gives_energy_per_batch(tmp_path) -> None:
    s = spec([("X", model_config_pb2.TYPE_FP32, [4])])
    runs = [SizeRun(1, np.full(10, 0.002), busy_power_w=100.0, cycle_s=0.0025),
            SizeRun(4, np.full(10, 0.004), busy_power_w=150.0, cycle_s=0.0045)]
    r = build_report(s, "h:1", runs, SweepPlan((1, 4)), power_model=None, measured_idle_w=40.0)
    assert r.power is PowerKind.MEASURED and "power: measured" in r.power_line and "40.0 W" in r.power_line
    assert [x.energy_j for x in r.sizes] == pytest.approx([0.25, 0.675])
    path = write_profile_csv(r, tmp_path / "p.csv")
    assert "batch_energy_j" in path.read_text()
    assert ServiceProfile.from_csv(path).energy_j[3] == pytest.approx(0.675)
    assert profile_power_kind(path) is PowerKind.MEASURED
    assert report_json(r)["idle_power_w"] == 40.0


# ----------------------------------------------------------------------------------------------------
# The report and its files


def test_report_files_round_trip_through_the_solver(tmp_path) -> None:
    s = spec([("X", model_config_pb2.TYPE_FP32, [4])])
    rng = np.random.default_rng(0)
    runs = [SizeRun(b, 0.001 * (1 + 0.2 * b) * rng.gamma(50, 1 / 50, 40)) for b in (1, 2, 4, 8)]
    runs.append(SizeRun(3, np.empty(0), "INTERNAL: boom"))
    r = build_report(s, "h:1", runs, SweepPlan((1, 2, 3, 4, 8), runs_per_size=40),
                     power_model=PowerModel.affine("100,10"))
    assert r.ok and r.power is PowerKind.MODELLED and set(r.failed) == {3}
    assert any("batch size 3 failed: INTERNAL: boom" in w for w in r.warnings)
    p = write_profile_csv(r, tmp_path / "p.csv")
    q = write_samples_csv(r, tmp_path / "s.csv")
    lines = p.read_text().splitlines()
    assert lines[2] == "# power: modelled (affine busy power 100 + 10 x b W)"
    assert profile_power_kind(p) is PowerKind.MODELLED
    prof = ServiceProfile.from_csv(p)
    assert prof.max_batch == 8 and prof.interpolated == (3, 5, 6, 7)
    for x in r.sizes:
        assert prof.mean_s[x.batch_size - 1] == pytest.approx(x.mean_s)
        assert prof.energy_j[x.batch_size - 1] == pytest.approx((100 + 10 * x.batch_size) * x.mean_s)
        assert prof.cv[x.batch_size - 1] == pytest.approx(x.cv)
    samples = read_samples_csv(q)
    assert sorted(samples) == [1, 2, 4, 8] and all(v.size == 40 for v in samples.values())
    emp = ServiceProfile.from_csv(p, samples=q)
    assert emp.law == "empirical" and emp.mean_s[3] == pytest.approx(float(np.mean(samples[4])))
    doc = report_json(r)
    assert doc["power"] == "modelled" and doc["failed"] == [{"batch_size": 3, "error": "INTERNAL: boom"}]
    assert all(d["ci_lo_s"] < d["mean_service_s"] < d["ci_hi_s"] for d in doc["sizes"])
    json.dumps(doc)


def test_one_size_is_not_a_profile() -> None:
    s = spec([("X", model_config_pb2.TYPE_FP32, [4])])
    r = build_report(s, "h:1", [SizeRun(1, np.full(5, 0.001)), SizeRun(2, np.empty(0), "UNAVAILABLE: gone")],
                     SweepPlan((1, 2)), power_model=None)
    assert not r.ok and r.power is PowerKind.NONE and "power: none" in r.power_line


def test_stalls_are_reported_with_their_cause() -> None:
    s = spec([("X", model_config_pb2.TYPE_FP32, [4])])
    cfg = model_config_pb2.ModelConfig(name="m", max_batch_size=4)
    cfg.dynamic_batching.SetInParent()
    s_db = ModelSpec.from_config(cfg)
    runs = [SizeRun(1, np.array([0.003] * 9 + [0.503])), SizeRun(2, np.full(10, 0.003))]
    r = build_report(s_db, "h:1", runs, SweepPlan((1, 2)), power_model=None)
    assert any("1 batch(es) took over" in w and "dynamic_batching" in w for w in r.warnings)
    r = build_report(s, "h:1", runs, SweepPlan((1, 2)), power_model=None)
    assert any("took over" in w and "dynamic_batching" not in w for w in r.warnings)


def test_profile_csv_comments_do_not_disturb_the_readers(tmp_path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("# a note\nbatch_size,mean_service_s,busy_power_w\n# another\n1,0.001,100\n2,0.0015,120\n")
    prof = ServiceProfile.from_csv(p)
    assert prof.mean_s.tolist() == [0.001, 0.0015]
    s = tmp_path / "s.csv"
    s.write_text("# samples\nbatch_size,service_s\n1,0.001\n# x\n1,bad\n")
    with pytest.raises(ValueError, match="line 5"):
        read_samples_csv(s)
