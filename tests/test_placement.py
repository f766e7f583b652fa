"""k instances on D devices, read from the model's config as Triton serves it (``plugin.placement``),
and D reaching the k-instance solve, the controller, status and metrics."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import model_config_pb2

from plugin.config import ModelPolicyConfig
from plugin.placement import Placement, placement
from plugin.policies import build_rule, model_instances

PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"
G, C = model_config_pb2.ModelInstanceGroup.KIND_GPU, model_config_pb2.ModelInstanceGroup.KIND_CPU
A, M = model_config_pb2.ModelInstanceGroup.KIND_AUTO, model_config_pb2.ModelInstanceGroup.KIND_MODEL


def _config(*groups: tuple[int, int, list[int]]) -> model_config_pb2.ModelConfig:
    cfg = model_config_pb2.ModelConfig(name="m", max_batch_size=64)
    for count, kind, gpus in groups:
        cfg.instance_group.add(count=count, kind=kind, gpus=gpus)
    return cfg


@pytest.mark.parametrize("groups, k, d", [
    ((), 1, 1),                                  # no instance_group: one instance
    (((2, G, [0]),), 2, 1),                      # count 2 on one GPU: one idle draw
    (((1, G, [0, 1, 2, 3]),), 4, 4),             # one instance on each of four GPUs
    (((2, G, [0, 1]),), 4, 2),                   # two on each of two GPUs
    (((1, G, [0]), (1, G, [0, 1])), 3, 2),       # two groups sharing GPU 0
    (((2, G, []),), 2, 1),                       # KIND_GPU listing none (not normalised): one device
    (((3, C, []),), 3, 1),                       # CPU instances share the host
    (((1, C, []), (2, C, [])), 3, 1),            # CPU groups together: still the one host
    (((1, G, [1]), (2, C, [])), 3, 2),           # a GPU and the host
    (((2, M, []),), 2, 2),                       # KIND_MODEL: each instance its own device
    (((2, A, [0]),), 2, 1),                      # KIND_AUTO listing a GPU: as KIND_GPU
    (((2, A, []),), 2, 1),                       # KIND_AUTO listing none: the host
    (((0, C, []),), 1, 1),                       # count 0: Triton's default of one
])
def test_k_and_d_from_the_instance_groups(groups, k, d):
    where = placement(_config(*groups))
    assert (where.instances, where.devices) == (k, d)
    assert model_instances(_config(*groups)) == k
    assert where.why


def test_the_json_config_triton_serves_reads_the_same():
    from plugin.placement import placement_of_json

    served = {"name": "m", "max_batch_size": 64, "instance_group": [
        {"name": "m_0", "kind": "KIND_GPU", "count": 2, "gpus": [0, 1], "passive": False},
        {"name": "m_1", "kind": "KIND_CPU", "count": 1}]}
    assert placement_of_json(served) == placement(_config((2, G, [0, 1]), (1, C, [])))
    assert (placement_of_json(served).instances, placement_of_json(served).devices) == (5, 3)
    assert placement_of_json({"name": "m"}).instances == 1


def test_the_bench_reads_k_and_d_from_the_config_it_runs_and_refuses_a_k_it_cannot_set():
    from loadtest.bench import BenchConfig, bench_placement
    from loadtest.contenders import Contender
    from loadtest.triton_control import BatchingOverride

    class Control:  # the bench's ModelConfigControl, reduced to what bench_placement asks
        def __init__(self, groups):
            self.groups = groups

        def config_with(self, override: BatchingOverride):
            g = dict(self.groups[0], count=override.instances) if override.instances else self.groups[0]
            return {"name": "emulated_gpu", "instance_group": [g]}

    cfg = BenchConfig(rates=(10.0,), contenders=(Contender("triton"),), instances=2, data_plane="python")
    assert bench_placement(Control([{"kind": "KIND_CPU", "count": 1}]), cfg) == Placement(2, 1, "the host for KIND_CPU")
    with pytest.raises(ValueError, match="runs 4 instance"):
        bench_placement(Control([{"kind": "KIND_GPU", "count": 1, "gpus": [0, 1]}]), cfg)


def test_a_placement_refuses_more_devices_than_instances():
    with pytest.raises(ValueError, match="devices"):
        Placement(2, 3, "")
    with pytest.raises(ValueError, match="devices"):
        Placement(2, 0, "")


def test_the_k_instance_solve_counts_idle_power_once_per_device():
    """D shifts P by (k - D) P0 and leaves the policy alone (P = D P0 + the busy instances' increments)."""
    cap = 64 / 0.0108899098
    cfg = ModelPolicyConfig(policy="smdp", profile=PROFILE, rate_rps=0.8 * cap, weight=1e-4, idle_power_w=40.0)
    per_instance = build_rule("m", cfg, 64, instances=2)
    shared = build_rule("m", cfg, 64, instances=2, devices=1)
    assert per_instance.prediction["devices"] == 2 and shared.prediction["devices"] == 1
    assert shared.rule == per_instance.rule
    assert shared.prediction["mean_latency_s"] == pytest.approx(per_instance.prediction["mean_latency_s"], rel=1e-12)
    assert per_instance.prediction["mean_power_w"] - shared.prediction["mean_power_w"] == pytest.approx(40.0, rel=1e-9)
    one = build_rule("m", cfg.model_copy(update={"rate_rps": 0.5 * cap}), 64, instances=1, devices=1)
    assert one.prediction is not None  # k = 1: D is 1 whatever is passed


def test_modelled_power_counts_idle_power_once_per_device():
    """(energy + P0 x idle instance-time) / elapsed - (k - D) P0 = D P0 + sum of the batches' increments."""
    energy, busy, elapsed, p0 = 30.0, 0.5, 1.0, 40.0  # two instances busy 0.25 s each in one second
    per_instance = Placement(2, 2, "").modelled_power_w(energy, busy, elapsed, p0)
    shared = Placement(2, 1, "").modelled_power_w(energy, busy, elapsed, p0)
    assert per_instance == pytest.approx((30.0 + 40.0 * 1.5) / 1.0)
    assert shared == pytest.approx(per_instance - 40.0)
    assert shared == pytest.approx(1 * p0 + (energy - p0 * busy) / elapsed)
    assert Placement(1, 1, "").modelled_power_w(energy, 0.2, elapsed, p0) == pytest.approx((30.0 + 40.0 * 0.8) / 1.0)
    assert Placement(1, 1, "").modelled_power_w(energy, 1.5, elapsed, p0) == pytest.approx(30.0)  # floored idle


def test_the_bench_predicts_tritons_batcher_with_p0_once_per_device():
    from loadtest.contenders import Contender, predict
    from solver import arrivals
    from solver.model import BatchingModel, ServiceProfile

    profile = ServiceProfile.from_csv(PROFILE, max_batch=64)
    model = BatchingModel(0.6 * 2 * 64 / float(profile.mean_s[-1]), 64, profile, 40.0, 1e-4, instances=2)
    times = arrivals.poisson(model.rate, duration=2.0, rng=3)
    per_instance = predict(Contender("triton"), model, times, warmup_s=0.5)
    shared = predict(Contender("triton"), model.with_(devices=1), times, warmup_s=0.5)
    assert shared.mean_latency_s == per_instance.mean_latency_s
    assert shared.mean_power_w == pytest.approx(per_instance.mean_power_w - 40.0, rel=1e-9)


def test_the_adaptive_loop_solves_with_d_and_follows_a_changed_placement():
    import asyncio

    from plugin.loop.controller import ControllerConfig, LearningConfig, PolicyController
    from solver.model import ServiceProfile

    with pytest.raises(ValueError, match="devices"):
        ControllerConfig(max_batch=64, instances=2, devices=3)
    profile = ServiceProfile.from_csv(PROFILE, max_batch=64)
    cap = 64 / float(profile.mean_s[-1])

    def solved(devices: int | None):
        clock = [1000.0]
        c = PolicyController(
            "m", profile,
            ControllerConfig(max_batch=64, idle_power_w=40.0, weight=1e-4, initial_rate=1.2 * cap, window_s=5.0,
                             long_run_s=0.0, learning=LearningConfig(enabled=False), instances=2, devices=devices),
            install=lambda rule: None, clock=lambda: clock[0])

        async def go():
            await c.tick(clock[0])

        asyncio.run(go())
        return c

    shared, per_instance = solved(1), solved(None)
    assert shared.current.mean_power_w == pytest.approx(per_instance.current.mean_power_w - 40.0, rel=1e-9)
    assert np.array_equal(shared.current.table.actions, per_instance.current.table.actions)
    shared.set_placement(4, 2)
    assert (shared.instances, shared.devices) == (4, 2)
    with pytest.raises(ValueError):
        shared.set_placement(2, 4)


@pytest.mark.integration
def test_the_sidecar_reads_k_and_d_from_tritons_config_into_status_and_metrics(triton):
    """The session Triton's emulated_gpu reloaded with instance_group count 2 (KIND_CPU): k = 2 on one
    device (the host); the smdp solve, ``GetStatus`` and the ``smdp_sidecar_devices`` gauge carry D = 1."""
    from loadtest.triton_control import BatchingOverride, ModelConfigControl
    from plugin.config import load_config
    from plugin.runner import SidecarThread
    from prometheus_client.parser import text_string_to_metric_families
    from smdp.v1 import smdp_pb2, smdp_pb2_grpc

    rate = 0.3 * 2 * 128 / 0.0204 # well inside two instances' capacity at B = 128
    control = ModelConfigControl(triton.grpc_url, "emulated_gpu")
    try:
        control.apply(BatchingOverride(dynamic_batching=False, instances=2))
        model = {"policy": "smdp", "profile": str(PROFILE), "idle_power_w": 40.0, "weight": 1e-4, "rate_rps": rate,
                 "adaptive": True, "learn_profile": False}
        cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": "127.0.0.1:0",
                                     "metrics_listen": "127.0.0.1:0", "triton_url": triton.grpc_url,
                                     "retune_interval_s": 0.1, "data_plane": "python",
                                     "models": {"emulated_gpu": model}}, environ={})
        runner = SidecarThread(cfg)
        runner.start()
        try:
            x = np.zeros((1, 16), dtype=np.float32)
            inp = tc.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            tc.InferenceServerClient(runner.url).infer("emulated_gpu", [inp], client_timeout=30)
            with grpc.insecure_channel(runner.control_url) as ch:
                s = smdp_pb2_grpc.ControlStub(ch).GetStatus(smdp_pb2.ModelRequest(model="emulated_gpu"))
            assert (s.instances, s.devices) == (2, 1)
            deadline = time.monotonic() + 30
            while runner.call(lambda: runner.sidecar.registry.gated("emulated_gpu").controller.current) is None:
                assert time.monotonic() < deadline, "the adaptive loop never solved"
                time.sleep(0.1)
            c = runner.call(lambda: runner.sidecar.registry.gated("emulated_gpu").controller)
            assert (c.instances, c.devices) == (2, 1) and c.power.placement.devices == 1
            sol = c.current
            # the installed solve is the k-instance search for D = 1: P0 counted once, not per instance
            from solver.instances import solve_instances
            from solver.model import BatchingModel

            bm = BatchingModel(rate=sol.rate_rps, max_batch=c.max_batch, profile=c.profile, idle_power_w=40.0,
                               weight=sol.solved_weight, instances=2)
            assert sol.mean_power_w == pytest.approx(solve_instances(bm.with_(devices=1)).mean_power_w, rel=1e-9)
            assert sol.mean_power_w == pytest.approx(solve_instances(bm).mean_power_w - 40.0, rel=1e-9)
            port = runner.call(lambda: runner._running.metrics_port)
            deadline = time.monotonic() + 5
            while True:  # the gauges are exported once a retune tick
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                got = {(smp.name, smp.labels.get("model")): smp.value
                       for fam in text_string_to_metric_families(text) for smp in fam.samples}
                if ("smdp_sidecar_devices", "emulated_gpu") in got or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert got[("smdp_sidecar_devices", "emulated_gpu")] == 1
            assert got[("smdp_sidecar_instances", "emulated_gpu")] == 2
        finally:
            runner.stop()
    finally:
        control.restore()
        control.close()
