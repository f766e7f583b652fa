"""Control API: token, validation (nothing changes on bad input), NOT_FOUND, status stream, smdp ctl."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
from dataclasses import dataclass, field

import grpc
import pytest

from plugin.control import (
    SERVICE_NAME,
    ControlServicer,
    Figures,
    ModelStatusInfo,
    PolicyInfo,
    ServiceTimeInfo,
    SloStatusInfo,
    UnknownModel,
    is_loopback_address,
    start_control_server,
)
from plugin.loop.rate import RateEstimate
from smdp.v1 import smdp_pb2, smdp_pb2_grpc

TOKEN = "s3cret"


@dataclass
class FakeModel:
    weight: float = 1e-4
    target: float | None = None
    version: int = 1
    queue: int = 0
    slo: tuple[float, float, float] | None = None


@dataclass
class FakeBackend:
    """In-memory ControlBackend: records what the servicer asks of it."""

    models_: dict[str, FakeModel] = field(default_factory=lambda: {"resnet": FakeModel(), "mlp": FakeModel(weight=0.0)})
    calls: list[tuple] = field(default_factory=list)

    def models(self):
        return list(self.models_)

    def status(self, model: str) -> ModelStatusInfo:
        m = self.models_[model]
        return ModelStatusInfo(
            model=model, weight=m.weight, max_batch=32, policy_version=m.version, policy_age_s=1.5,
            policy_source="smdp", rate=RateEstimate(500.0, 480.0, 520.0, 15000, 30.0, 0.95),
            latency_target_s=m.target, threshold=4,
            predicted=Figures(4e-3, 120.0, 4e-3 + m.weight * 120.0, 500.0, 3.2), predicted_rate_rps=495.0,
            measured=Figures(4.2e-3, 118.0, 4.2e-3 + m.weight * 118.0, 499.0, 3.1),
            batch_histogram=[0, 5, 0, 7], queue_length=m.queue, in_flight=1, completed=9000,
            rejected=2, failed=1, solver_reachable=True, power_modelled=True, note="",
            service_times=(
                ServiceTimeInfo(3, 7, 2.5e-3, 4e-4, 2.0e-3, 2.4e-3, triton_compute_s=1.9e-3, triton_batches=7),
                ServiceTimeInfo(1, 5, 1.2e-3, None, 1.0e-3, 1.1e-3),
                ServiceTimeInfo(2, 0, None, None, 1.5e-3, 1.5e-3, triton_compute_s=1.4e-3, triton_batches=3),
            ),
            profile_updates=2, profile_batches=12, profile_learning=True, rejected_expired=3, rejected_invalid=4,
            slo=None if m.slo is None else SloStatusInfo(
                m.slo[0], m.slo[1], feasible=True, predicted_quantile_s=0.8 * m.slo[1], predicted_ci95_s=1e-4,
                measured_quantile_s=0.9 * m.slo[1], attainment=0.995, samples=4000, max_wait_s=0.5 * m.slo[1],
                margin_s=m.slo[2], correction_s=0.25 * m.slo[2]),
        )

    async def set_weight(self, model: str, weight: float) -> None:  # async on purpose: both kinds work
        self.calls.append(("set_weight", model, weight))
        self.models_[model].weight = weight
        self.models_[model].version += 1

    def set_latency_target(self, model: str, target_s: float | None) -> None:
        self.calls.append(("set_latency_target", model, target_s))
        if target_s is not None and target_s < 1e-3:
            raise ValueError(f"latency target {target_s} s is below the fastest batch (1 ms)")
        self.models_[model].target = target_s

    def set_slo(self, model: str, target) -> None:
        self.calls.append(("set_slo", model, target))
        self.models_[model].slo = None if target is None else (target.quantile, target.latency_s, target.margin_s)

    def policy(self, model: str) -> PolicyInfo:
        if model == "mlp":
            raise UnknownModel(model)  # a backend may also refuse by itself
        return PolicyInfo([0, 0, 0, 0, 4, 5, 6], 32, self.models_[model].version, 1.5, "smdp", 4)


class LoopThread:
    """An asyncio loop in a thread, to host a grpc.aio server for blocking test clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def served():
    loop = LoopThread()
    backend = FakeBackend()
    server, port = loop.run(start_control_server(backend, "127.0.0.1:0", token=TOKEN))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield backend, smdp_pb2_grpc.ControlStub(channel), port
    finally:
        channel.close()
        loop.run(server.stop(None))
        loop.close()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_status_and_models(served) -> None:
    backend, stub, _ = served
    assert list(stub.ListModels(smdp_pb2.ListModelsRequest(), metadata=AUTH).models) == ["mlp", "resnet"]
    s = stub.GetStatus(smdp_pb2.ModelRequest(model="resnet"), metadata=AUTH)
    assert s.model == "resnet" and s.rate.rate_rps == 500.0 and s.rate.arrivals == 15000
    assert s.rate.lo_rps == 480.0 and s.rate.hi_rps == 520.0
    assert s.threshold == 4 and s.predicted.mean_power_w == 120.0 and s.measured.mean_latency_s == 4.2e-3
    assert list(s.batch_histogram) == [0, 5, 0, 7] and s.power_modelled and s.solver_reachable
    assert not s.HasField("latency_target_s") and s.rejected == 2 and s.failed == 1
    assert s.rejected_expired == 3 and s.rejected_invalid == 4


def test_status_carries_the_learned_profile(served) -> None:
    _, stub, _ = served
    s = stub.GetStatus(smdp_pb2.ModelRequest(model="resnet"), metadata=AUTH)
    assert s.profile_learning and s.profile_updates == 2 and s.profile_batches == 12
    assert [t.batch_size for t in s.service_times] == [1, 2, 3]  # ascending, whatever the backend's order
    one, two, three = s.service_times
    assert one.samples == 5 and one.mean_s == 1.2e-3 and not one.HasField("ci_s")
    assert one.prior_s == 1.0e-3 and one.in_force_s == 1.1e-3 and not one.HasField("triton_compute_s")
    # a size only Triton saw: no gate mean (absent, not 0), Triton's figure present
    assert two.samples == 0 and not two.HasField("mean_s") and two.triton_compute_s == 1.4e-3 and two.triton_batches == 3
    assert three.ci_s == 4e-4 and three.in_force_s == 2.4e-3
    again = smdp_pb2.ModelStatus.FromString(s.SerializeToString())
    assert again.service_times == s.service_times


def test_service_time_drops_non_finite_figures() -> None:
    msg = ServiceTimeInfo(4, 1, math.nan, math.inf, 1e-3, 1e-3, triton_compute_s=math.nan).message()
    assert not msg.HasField("mean_s") and not msg.HasField("ci_s") and not msg.HasField("triton_compute_s")


def test_set_weight_and_target(served) -> None:
    backend, stub, _ = served
    s = stub.SetWeight(smdp_pb2.SetWeightRequest(model="resnet", weight=2.5e-4), metadata=AUTH)
    assert s.weight == 2.5e-4 and s.policy_version == 2 and backend.models_["resnet"].weight == 2.5e-4
    s = stub.SetWeight(smdp_pb2.SetWeightRequest(model="resnet", weight=0.0), metadata=AUTH)
    assert s.weight == 0.0
    s = stub.SetLatencyTarget(smdp_pb2.SetLatencyTargetRequest(model="resnet", target_s=0.005), metadata=AUTH)
    assert s.HasField("latency_target_s") and s.latency_target_s == 0.005
    s = stub.ClearLatencyTarget(smdp_pb2.ModelRequest(model="resnet"), metadata=AUTH)
    assert not s.HasField("latency_target_s") and backend.models_["resnet"].target is None


@pytest.mark.parametrize("weight", [-1e-4, float("nan"), float("inf"), -0.0 - 1e-300])
def test_invalid_weight_is_refused_and_changes_nothing(served, weight: float) -> None:
    backend, stub, _ = served
    code, details = code_of(stub.SetWeight, smdp_pb2.SetWeightRequest(model="resnet", weight=weight), metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "weight" in details
    assert backend.models_["resnet"].weight == 1e-4 and backend.models_["resnet"].version == 1
    assert not backend.calls


@pytest.mark.parametrize("target", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_target_is_refused_and_changes_nothing(served, target: float) -> None:
    backend, stub, _ = served
    code, details = code_of(stub.SetLatencyTarget,
                            smdp_pb2.SetLatencyTargetRequest(model="resnet", target_s=target), metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "latency target" in details
    assert backend.models_["resnet"].target is None and not backend.calls


def test_backend_refusal_is_invalid_argument(served) -> None:
    backend, stub, _ = served
    code, details = code_of(stub.SetLatencyTarget,
                            smdp_pb2.SetLatencyTargetRequest(model="resnet", target_s=1e-4), metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "fastest batch" in details
    assert backend.models_["resnet"].target is None


def test_unknown_model_is_not_found(served) -> None:
    backend, stub, _ = served
    for call, req in (
        (stub.GetStatus, smdp_pb2.ModelRequest(model="nope")),
        (stub.GetPolicy, smdp_pb2.ModelRequest(model="nope")),
        (stub.SetWeight, smdp_pb2.SetWeightRequest(model="nope", weight=1.0)),
        (stub.SetLatencyTarget, smdp_pb2.SetLatencyTargetRequest(model="nope", target_s=1.0)),
        (stub.ClearLatencyTarget, smdp_pb2.ModelRequest(model="nope")),
    ):
        code, details = code_of(call, req, metadata=AUTH)
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, _ = code_of(stub.GetPolicy, smdp_pb2.ModelRequest(model="mlp"), metadata=AUTH)
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = code_of(stub.GetStatus, smdp_pb2.ModelRequest(model=""), metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "required" in details
    code, _ = code_of(lambda: next(iter(stub.WatchStatus(smdp_pb2.WatchStatusRequest(model="nope"), metadata=AUTH))))
    assert code == grpc.StatusCode.NOT_FOUND
    assert not backend.calls


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Basic {TOKEN}"),)])
def test_bad_or_missing_token_is_unauthenticated(served, metadata) -> None:
    backend, stub, _ = served
    for call, req in (
        (stub.ListModels, smdp_pb2.ListModelsRequest()),
        (stub.GetStatus, smdp_pb2.ModelRequest(model="resnet")),
        (stub.SetWeight, smdp_pb2.SetWeightRequest(model="resnet", weight=1.0)),
    ):
        code, _ = code_of(call, req, metadata=metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: list(stub.WatchStatus(smdp_pb2.WatchStatusRequest(model="resnet", max_updates=1),
                                                    metadata=metadata)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert backend.models_["resnet"].weight == 1e-4 and not backend.calls


def test_no_token_configured_means_open() -> None:
    loop = LoopThread()
    server, port = loop.run(start_control_server(FakeBackend()))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = smdp_pb2_grpc.ControlStub(ch).ListModels(smdp_pb2.ListModelsRequest(), timeout=5)
        assert list(reply.models) == ["mlp", "resnet"]
    finally:
        loop.run(server.stop(None))
        loop.close()
    with pytest.raises(ValueError, match="token"):
        ControlServicer(FakeBackend(), token=" ")


def test_watch_streams_updates(served) -> None:
    backend, stub, _ = served
    stream = stub.WatchStatus(smdp_pb2.WatchStatusRequest(model="resnet", interval_s=0.02), metadata=AUTH, timeout=10)
    seen = []
    for status in stream:
        seen.append(status.queue_length)
        backend.models_["resnet"].queue += 1  # the next update must show it
        if len(seen) == 4:
            stream.cancel()
            break
    assert seen == [0, 1, 2, 3]
    limited = list(stub.WatchStatus(smdp_pb2.WatchStatusRequest(model="mlp", interval_s=0.01, max_updates=3),
                                    metadata=AUTH, timeout=10))
    assert len(limited) == 3 and all(s.model == "mlp" for s in limited)
    code, details = code_of(lambda: list(stub.WatchStatus(
        smdp_pb2.WatchStatusRequest(model="mlp", interval_s=0.001), metadata=AUTH, timeout=5)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "interval_s" in details


def test_watch_ends_when_the_model_goes(served) -> None:
    backend, stub, _ = served
    stream = stub.WatchStatus(smdp_pb2.WatchStatusRequest(model="mlp", interval_s=0.02), metadata=AUTH, timeout=10)
    assert next(stream).model == "mlp"
    del backend.models_["mlp"]
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_policy(served) -> None:
    _, stub, _ = served
    p = stub.GetPolicy(smdp_pb2.ModelRequest(model="resnet"), metadata=AUTH)
    assert list(p.actions) == [0, 0, 0, 0, 4, 5, 6] and p.threshold == 4 and p.version == 1 and p.max_batch == 32


def test_health_and_reflection(served) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    _, _, port = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert {"smdp.v1.Control", "grpc.health.v1.Health"} <= set(ProtoReflectionDescriptorDatabase(ch).get_services())


# -- smdp ctl ---------------------------------------------------------------------------------------


def test_set_and_clear_slo(served) -> None:
    backend, stub, _ = served
    s = stub.GetStatus(smdp_pb2.ModelRequest(model="resnet"), metadata=AUTH)
    assert not s.HasField("slo")
    s = stub.SetSlo(smdp_pb2.SetSloRequest(model="resnet", quantile=0.99, latency_s=0.05), metadata=AUTH)
    assert backend.models_["resnet"].slo == (0.99, 0.05, 0.0)
    assert s.slo.quantile == 0.99 and s.slo.latency_s == 0.05 and s.slo.feasible and s.slo.margin_s == 0.0
    assert s.slo.predicted_quantile_s == pytest.approx(0.04) and s.slo.attainment == 0.995 and s.slo.samples == 4000
    s = stub.SetSlo(smdp_pb2.SetSloRequest(model="resnet", quantile=0.99, latency_s=0.05, margin_s=0.004),
                    metadata=AUTH)
    assert backend.models_["resnet"].slo == (0.99, 0.05, 0.004)
    assert s.slo.margin_s == 0.004 and s.slo.correction_s == pytest.approx(0.001)
    s = stub.ClearSlo(smdp_pb2.ModelRequest(model="resnet"), metadata=AUTH)
    assert not s.HasField("slo") and backend.models_["resnet"].slo is None


@pytest.mark.parametrize("q, d, margin", [
    (0.0, 0.05, 0.0), (1.0, 0.05, 0.0), (-0.5, 0.05, 0.0), (float("nan"), 0.05, 0.0), (1.5, 0.05, 0.0),
    (0.99, 0.0, 0.0), (0.99, -0.01, 0.0), (0.99, float("nan"), 0.0), (0.99, float("inf"), 0.0),
    (0.99, 0.05, -0.001), (0.99, 0.05, 0.05), (0.99, 0.05, float("nan"))])
def test_invalid_slo_is_refused_and_changes_nothing(served, q: float, d: float, margin: float) -> None:
    backend, stub, _ = served
    code, details = code_of(stub.SetSlo, smdp_pb2.SetSloRequest(model="resnet", quantile=q, latency_s=d,
                                                                margin_s=margin), metadata=AUTH)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "SLO" in details
    assert backend.models_["resnet"].slo is None and not backend.calls


def test_ctl_slo_commands(served, capsys) -> None:
    backend, _, port = served
    rc, out = ctl(port, "set-slo", "resnet", "--quantile", "0.95", "--latency", "0.02")
    assert rc == 0 and backend.models_["resnet"].slo == (0.95, 0.02, 0.0)
    assert "SLO        q0.95 <= 20.000 ms: predicted to meet it, max-wait guard 10.000 ms" in out[0]
    assert "searched for D" not in out[0]
    assert "measured  q0.95 18.000 ms, attainment 0.9950" in out[0]
    rc, _ = ctl(port, "set-slo", "resnet", "--quantile", "1", "--latency", "0.02")
    assert rc == 2 and "INVALID_ARGUMENT" in capsys.readouterr().err
    assert backend.models_["resnet"].slo == (0.95, 0.02, 0.0)
    rc, out = ctl(port, "set-slo", "resnet", "--latency", "0.02", "--margin", "0.004")
    assert rc == 0 and backend.models_["resnet"].slo == (0.99, 0.02, 0.004)
    assert "searched for D - 4.000 ms margin - 1.000 ms measured correction = 15.000 ms" in out[0]
    rc, _ = ctl(port, "set-slo", "resnet", "--latency", "0.02", "--margin", "0.02")
    assert rc == 2 and "margin" in capsys.readouterr().err
    assert backend.models_["resnet"].slo == (0.99, 0.02, 0.004)
    rc, out = ctl(port, "clear-slo", "resnet")
    assert rc == 0 and backend.models_["resnet"].slo is None and "SLO " not in out[0]


def ctl(port: int, *argv: str, token: str | None = TOKEN) -> tuple[int, list[str]]:
    from plugin.ctl_cli import _add_arguments

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    args = parser.parse_args(["--url", f"127.0.0.1:{port}", *(["--token", token] if token else []), *argv])
    lines: list[str] = []
    rc = args.func(args, out=lines.append)
    return rc, lines


def test_ctl_commands(served, capsys) -> None:
    backend, _, port = served
    rc, out = ctl(port, "status")
    assert rc == 0 and len(out) == 2 and out[1].startswith("model resnet") and "500.00 req/s" in out[1]
    assert "(modelled)" in out[1] and "1:5 3:7" in out[1]
    assert "rejected 2 (queue full) + 3 expired + 4 invalid" in out[1]
    assert "profile    learned v2 in force; 12 batches observed" in out[1]
    rows = [line.split() for line in out[1].splitlines() if line.startswith("    ") and line.split()[0].isdigit()]
    assert rows == [["1", "5", "1.200", "-", "1.000", "1.100", "-"],
                    ["2", "0", "-", "-", "1.500", "1.500", "1.400"],
                    ["3", "7", "2.500", "0.400", "2.000", "2.400", "1.900"]]
    rc, out = ctl(port, "set-weight", "resnet", "3e-4")
    assert rc == 0 and backend.models_["resnet"].weight == 3e-4
    rc, out = ctl(port, "set-target", "resnet", "0.004")
    assert rc == 0 and backend.models_["resnet"].target == 0.004 and "4.000 ms" in out[0]
    rc, out = ctl(port, "set-target", "resnet", "none")
    assert rc == 0 and backend.models_["resnet"].target is None
    rc, out = ctl(port, "policy", "resnet")
    assert rc == 0 and "n = 0..3: wait" in out[0] and "n = 4..6: serve min(n, B)" in out[0]
    rc, out = ctl(port, "--json", "watch", "resnet", "--interval", "0.01", "--count", "2")
    assert rc == 0 and len(out) == 2 and json.loads(out[0])["model"] == "resnet"
    rc, out = ctl(port, "--json", "models")
    assert rc == 0 and json.loads(out[0]) == {"models": ["mlp", "resnet"]}


def test_ctl_errors(served, capsys) -> None:
    backend, _, port = served
    rc, _ = ctl(port, "set-weight", "resnet", "nan")
    assert rc == 2 and "INVALID_ARGUMENT" in capsys.readouterr().err
    assert backend.models_["resnet"].weight == 1e-4 and not math.isnan(backend.models_["resnet"].weight)
    rc, _ = ctl(port, "status", "ghost")
    assert rc == 2 and "NOT_FOUND" in capsys.readouterr().err
    rc, _ = ctl(port, "status", token=None)
    assert rc == 2 and "UNAUTHENTICATED" in capsys.readouterr().err
    rc, _ = ctl(port, "set-target", "resnet", "soon")
    assert rc == 2 and "'none'" in capsys.readouterr().err
    rc, _ = ctl(1, "--timeout", "0.5", "models")  # nothing listens on port 1
    err = capsys.readouterr().err
    assert rc == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err)


# -- exposure warning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:8012", True), ("127.3.4.5:0", True), ("localhost:8012", True), ("LOCALHOST:1", True),
    ("[::1]:8012", True), ("unix:/tmp/ctl.sock", True), ("unix-abstract:ctl", True),
    ("0.0.0.0:8012", False), ("[::]:8012", False), (":8012", False), ("10.0.0.5:8012", False),
    ("ctl.example.com:8012", False), ("[2001:db8::1]:8012", False),
])
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback_address(address) is loopback


@pytest.mark.parametrize("address, token, warned", [
    ("0.0.0.0:0", None, True), ("0.0.0.0:0", TOKEN, False), ("127.0.0.1:0", None, False),
])
def test_an_exposed_control_api_without_a_token_is_warned_about_at_start(caplog, address, token, warned) -> None:
    loop = LoopThread()
    try:
        with caplog.at_level("WARNING", logger="smdp.control"):
            server, _ = loop.run(start_control_server(FakeBackend(), address, token=token))
        loop.run(server.stop(None))
    finally:
        loop.close()
    hits = [r for r in caplog.records if r.name == "smdp.control" and r.levelname == "WARNING"]
    assert bool(hits) is warned
    if warned:
        msg = hits[0].getMessage()
        assert address in msg and "no token" in msg and "control_token" in msg
