"""The sidecar's per-request path under failure: cancelled streams and callers, bad parameters,
merged timeouts, Triton's errors. Unit tests drive a Sidecar whose upstream calls are fakes; the
integration tests at the end check the same properties against a real tritonserver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2

from plugin.config import load_config
from plugin.gate import Pending
from plugin.merge import MalformedRequest, RequestValidator
from plugin.python_plane import _priority_level
from plugin.server import GateError, Sidecar, _Servicer
from slowed_triton import slowed_emulated_gpu

REPO = Path(__file__).resolve().parents[1] / "model_repository"


def emu_config(**edits) -> model_config_pb2.ModelConfig:
    cfg = text_format.Parse((REPO / "emulated_gpu" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    for path, value in edits.items():
        obj = cfg
        *parts, last = path.split(".")
        for part in parts:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return cfg


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def request(rows: int = 1, id: str = "", model: str = "emulated_gpu", **params) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, id=id)
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
    req.raw_input_contents.append(np.full((rows, 16), rows, np.float32).tobytes())
    for key, (kind, value) in params.items():
        setattr(req.parameters[key], kind, value)
    del t
    return req


class Upstream:
    """Stands in for Triton: records what it is sent, answers each request with its input rows,
    and holds every call while ``hold`` is clear."""

    def __init__(self, config: model_config_pb2.ModelConfig | None = None) -> None:
        self.config = config if config is not None else emu_config()
        self.config_calls = 0
        self.config_gate = asyncio.Event()
        self.config_gate.set()
        self.config_error: grpc.aio.AioRpcError | None = None
        self.sent: list[service_pb2.ModelInferRequest] = []
        self.wire: list[bytes] = []  # what infer_wire was sent, as sent (each also in ``sent``, parsed)
        self.hold = asyncio.Event()
        self.hold.set()
        self.error: grpc.aio.AioRpcError | None = None
        self.ready = True

    async def model_config(self, req, timeout=None):
        self.config_calls += 1
        await self.config_gate.wait()
        if self.config_error is not None:
            raise self.config_error
        return service_pb2.ModelConfigResponse(config=self.config)

    async def server_ready(self, req, timeout=None):
        if not self.ready:  # Triton shutting down: "Server exiting"
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "Server exiting")
        return service_pb2.ServerReadyResponse(ready=True)

    async def infer(self, req, timeout=None):
        try:  # Triton refuses a malformed request at once, with the message the sidecar's validator knows
            RequestValidator(self.config).check(req)
        except MalformedRequest as exc:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.sent.append(req)
        await self.hold.wait()
        if self.error is not None:
            raise self.error
        resp = service_pb2.ModelInferResponse(model_name=req.model_name, id=req.id)
        out = resp.outputs.add(name="OUTPUT0", datatype="FP32", shape=list(req.inputs[0].shape))
        del out
        resp.raw_output_contents.append(req.raw_input_contents[0])
        return resp

    async def infer_wire(self, data: bytes, timeout=None) -> bytes:
        """ModelInfer as bytes (``Upstream.infer_wire``): the bytes recorded as sent, then answered as
        ``infer`` answers the request they encode, encoded."""
        self.wire.append(data)
        return (await self.infer(service_pb2.ModelInferRequest.FromString(data), timeout)).SerializeToString()


async def make_sidecar(upstream: Upstream, **overrides) -> Sidecar:
    default = overrides.pop("default", {"policy": "greedy"})
    cfg = load_config(overrides={"triton_url": "127.0.0.1:9", "default": default, **overrides}, environ={})
    sc = Sidecar(cfg)
    sc.upstream.model_config = upstream.model_config
    sc.upstream.server_ready = upstream.server_ready
    sc.upstream.infer = upstream.infer
    sc.upstream.infer_wire = upstream.infer_wire
    return sc


async def settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def until(cond, timeout: float = 5.0) -> None:
    async def wait():
        while not cond():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(wait(), timeout)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# -- streams -------------------------------------------------------------------------------------


def test_cancelled_stream_withdraws_its_queued_requests():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        up.hold.clear()
        forever = asyncio.Event()

        async def requests():
            for i in range(5):
                yield request(id=f"s{i}")
            await forever.wait()  # the client keeps its stream open, then goes away

        gen = _Servicer(sc.plane).model_stream_infer(requests(), None)
        consumer = asyncio.ensure_future(gen.__anext__())
        await until(lambda: ("emulated_gpu", "") in sc.registry.models())
        state = sc.registry.models()[("emulated_gpu", "")]
        await until(lambda: state.gate.in_flight == 1 and state.gate.queue_length == 4)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await settle()
        assert state.gate.queue_length == 0 and state.gate.counters.cancelled == 4
        up.hold.set()
        await until(lambda: state.gate.in_flight == 0)
        await settle()
        assert len(up.sent) == 1  # the four that waited never reached Triton
        assert state.gate.counters.dispatched_requests == 1
        await sc.close()

    run(main())


@pytest.mark.parametrize("failure", [RuntimeError("boom"), asyncio.CancelledError()])
def test_stream_answers_every_request_once_even_when_the_sidecar_fails(failure):
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        servicer = _Servicer(sc.plane)
        infer = sc.plane.infer

        async def flaky(req):
            if req.id == "bad":
                raise failure
            return await infer(req)

        sc.plane.infer = flaky

        async def requests():
            for i in ("a", "bad", "c"):
                yield request(id=i)

        got = [r async for r in servicer.model_stream_infer(requests(), None)]
        assert sorted(r.infer_response.id for r in got) == ["a", "bad", "c"]
        errors = {r.infer_response.id: r.error_message for r in got if r.error_message}
        assert list(errors) == ["bad"]
        await sc.close()

    run(main())


def test_stream_gate_errors_are_in_band_and_the_stream_ends():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)

        async def requests():
            yield request(id="ok")
            yield request(id="neg", priority=("int64_param", -1))

        got = [r async for r in _Servicer(sc.plane).model_stream_infer(requests(), None)]
        by_id = {r.infer_response.id: r.error_message for r in got}
        assert by_id == {"ok": "", "neg": "invalid value for 'priority', expected value >= 0."}
        await sc.close()

    run(main())


# -- the first load of a model's state ---------------------------------------------------------


def test_a_cancelled_first_caller_does_not_fail_the_others_waiting_for_the_config():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        up.config_gate.clear()
        first = asyncio.ensure_future(sc.plane.infer(request(id="first")))
        await settle()
        second = asyncio.ensure_future(sc.plane.infer(request(id="second")))
        await settle()
        first.cancel()
        await settle()
        up.config_gate.set()
        resp = await second
        assert resp.id == "second"
        assert first.cancelled()
        assert up.config_calls == 1
        await sc.close()

    run(main())


def test_a_failed_first_load_answers_every_waiter_with_the_error():
    async def main():
        up = Upstream()
        up.config_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        sc = await make_sidecar(up)
        up.config_gate.clear()
        calls = [asyncio.ensure_future(sc.plane.infer(request())) for _ in range(3)]
        await settle()
        up.config_gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, GateError) and r.code == grpc.StatusCode.UNAVAILABLE for r in results)
        assert up.config_calls == 1
        await sc.close()

    run(main())


def test_a_config_read_triton_ends_is_unavailable_and_the_next_request_is_gated():
    """Triton shutting down can end the sidecar's config read with CANCELLED (the caller cancelled
    nothing): the caller gets UNAVAILABLE, retryable, never CANCELLED; once Triton answers, the model
    is gated."""

    async def main():
        up = Upstream()
        up.config_error = rpc_error(grpc.StatusCode.CANCELLED, "Received RST_STREAM with error code 8")
        sc = await make_sidecar(up)
        with pytest.raises(GateError) as info:
            await sc.plane.infer(request())
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "Triton ended the call" in info.value.details
        assert up.sent == []
        up.config_error = None
        await sc.plane.infer(request())
        assert up.config_calls == 2 and len(up.sent) == 1
        assert sc.registry.get("emulated_gpu", "") is not None  # gated now
        await sc.close()

    run(main())


def test_unexpected_config_error_while_ready_is_the_callers_answer_not_an_ungated_relay():
    async def main():
        up = Upstream()
        up.config_error = rpc_error(grpc.StatusCode.INTERNAL, "config broke")
        sc = await make_sidecar(up)
        with pytest.raises(GateError) as info:
            await sc.plane.infer(request())
        assert info.value.code == grpc.StatusCode.INTERNAL and "config broke" in info.value.details
        assert up.sent == []  # not relayed around the gate
        # an unknown model is still relayed, so the caller gets Triton's own error for it
        up.config_error = rpc_error(grpc.StatusCode.NOT_FOUND, "unknown model")
        up.error = rpc_error(grpc.StatusCode.NOT_FOUND, "Request for unknown model")
        with pytest.raises(GateError) as info:
            await sc.plane.infer(request(model="nope"))
        assert info.value.code == grpc.StatusCode.NOT_FOUND and len(up.sent) == 1
        await sc.close()

    run(main())


@pytest.mark.parametrize("edit", [{"model_transaction_policy.decoupled": True}, "sequence"])
def test_decoupled_and_sequence_models_are_relayed_unchanged(edit):
    async def main():
        cfg = emu_config(**edit) if isinstance(edit, dict) else emu_config()
        if edit == "sequence":
            cfg.ClearField("dynamic_batching")
            cfg.sequence_batching.max_sequence_idle_microseconds = 1000
        up = Upstream(cfg)
        sc = await make_sidecar(up)
        req = request(id="x", priority=("int64_param", 1))
        await sc.plane.infer(req)
        assert up.sent == [req]  # the caller's own message, not stamped
        assert req.parameters["priority"].int64_param == 1 and "timeout" not in req.parameters
        assert sc.registry.models()[("emulated_gpu", "")].gate is None
        await sc.close()

    run(main())


# -- priority ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, value, levels, default, want",
    [
        ("uint64_param", 1, 2, 2, 1),
        ("int64_param", 2, 2, 2, 2),
        ("int64_param", 0, 2, 2, 2),  # 0: the model's default
        ("uint64_param", 3, 2, 2, 2),  # above the levels: the default
        ("uint64_param", 2**64 - 1, 2, 1, 1),
        ("int64_param", 1, 0, 0, 0),  # a model without levels has one queue
        ("int64_param", 7, 0, 0, 0),
    ],
)
def test_priority_level_follows_triton(kind, value, levels, default, want):
    p = service_pb2.InferParameter()
    setattr(p, kind, value)
    assert _priority_level(p, levels, default) == want


@pytest.mark.parametrize("kind, value", [("int64_param", -1), ("string_param", "1"), ("double_param", 1.0),
                                         ("bool_param", True)])
def test_bad_priority_is_refused_at_arrival(kind, value):
    p = service_pb2.InferParameter()
    setattr(p, kind, value)
    with pytest.raises(GateError) as info:
        _priority_level(p, 2, 2)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'priority'" in info.value.details


def test_negative_priority_gets_invalid_argument_and_its_neighbours_are_served():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        up.hold.clear()
        await sc.registry.model_state("emulated_gpu", "")
        reqs = [request(id=f"r{i}") for i in range(4)]
        reqs[2] = request(id="neg", priority=("int64_param", -1))
        reqs.append(request(id="str", timeout=("uint64_param", 5)))
        calls = [asyncio.ensure_future(sc.plane.infer(r)) for r in reqs]
        await settle()
        up.hold.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        codes = {r.id: "OK" for r in results if not isinstance(r, Exception)}
        codes.update({reqs[i].id: r.code.name for i, r in enumerate(results) if isinstance(r, GateError)})
        assert codes == {"r0": "OK", "r1": "OK", "r3": "OK", "neg": "INVALID_ARGUMENT", "str": "INVALID_ARGUMENT"}
        state = sc.registry.models()[("emulated_gpu", "")]
        assert state.stats.failed_requests == 0 and state.gate.counters.submitted == 3
        await sc.close()

    run(main())


def test_priority_above_the_models_levels_waits_at_the_default_level():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up, default={"policy": "static:1"})
        up.hold.clear()
        first = asyncio.ensure_future(sc.plane.infer(request(id="first")))
        await until(lambda: len(up.sent) == 1)
        # levels 2, default 2: priority 9 is the default level, so "urgent" (level 1) overtakes it
        calls = [asyncio.ensure_future(sc.plane.infer(request(id="p9", priority=("uint64_param", 9)))), None]
        await settle()
        calls[1] = asyncio.ensure_future(sc.plane.infer(request(id="urgent", priority=("uint64_param", 1))))
        await settle()
        up.hold.set()
        await asyncio.gather(first, *calls)
        assert [r.id for r in up.sent] == ["first", "urgent", "p9"]
        # what Triton is told is the level the gate used
        assert up.sent[2].parameters["priority"].uint64_param == 2
        await sc.close()

    run(main())


# -- timeouts of merged requests -----------------------------------------------------------------


def _members(sc: Sidecar, deadlines):
    out = []
    for d in deadlines:
        call = type("C", (), {})()
        call.request = request()
        out.append(Pending(key="k", arrival=0.0, deadline=d, payload=call))
    return tuple(out)


@pytest.mark.parametrize(
    "deadlines, want_us",
    [((1.05, None), None), ((1.05, 3.0), 2_000_000), ((None,), None), ((1.5,), 500_000), ((1.05, 1.2), 200_000)],
)
def test_a_merged_request_carries_a_timeout_safe_for_every_member(deadlines, want_us):
    async def main():
        sc = await make_sidecar(Upstream())
        state = await sc.registry.model_state("emulated_gpu", "")
        req = request(timeout=("int64_param", 10))
        sc.plane._stamp(state, req, _members(sc, deadlines), 1.0)
        got = req.parameters["timeout"].int64_param if "timeout" in req.parameters else None
        assert got == pytest.approx(want_us, abs=2) if want_us else got is None
        await sc.close()

    run(main())


# -- Triton's errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merged", "released"])
def test_model_gone_from_triton_gives_unavailable_and_drops_the_cached_state(mode):
    async def main():
        up = Upstream()
        sc = await make_sidecar(up, mode=mode, default={"policy": "threshold:3"})
        state = await sc.registry.model_state("emulated_gpu", "")
        up.error = rpc_error(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'emulated_gpu' is not found")
        results = await asyncio.gather(*(sc.plane.infer(request(id=str(i))) for i in range(3)), return_exceptions=True)
        assert [r.code for r in results] == [grpc.StatusCode.UNAVAILABLE] * 3
        assert ("emulated_gpu", "") not in sc.registry.models()
        assert state.stats.failed_requests == 3
        await sc.close()

    run(main())



def test_a_model_back_after_not_found_keeps_its_gate_policy_and_counters():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        state = await sc.registry.model_state("emulated_gpu", "")
        await sc.plane.infer(request(id="before"))
        up.error = rpc_error(grpc.StatusCode.NOT_FOUND, "Request for unknown model")
        with pytest.raises(GateError):
            await sc.plane.infer(request(id="gone"))
        assert ("emulated_gpu", "") not in sc.registry.models()
        up.error = None
        up.config = emu_config(**{"dynamic_batching.priority_levels": 3})
        up.config.instance_group[0].count = 2
        assert (await sc.plane.infer(request(id="back"))).id == "back"
        again = sc.registry.models()[("emulated_gpu", "")]
        assert again is state and again.gate.slots == 2 and again.priority_levels == 3
        assert state.gate.counters.dispatched_requests == 3 and state.stats.failed_requests == 1
        await sc.close()

    run(main())


def test_operator_settings_outlive_a_rebuilt_model_state():
    async def main():
        profile = Path(__file__).resolve().parents[1] / "profiles" / "v100_resnet50.csv"
        up = Upstream()
        sc = await make_sidecar(up, default={"policy": "smdp", "profile": str(profile), "rate_rps": 100.0,
                                             "weight": 1e-4})
        state = await sc.registry.model_state("emulated_gpu", "")
        assert state.controller is not None
        state.controller.set_weight(5e-3)
        sc.registry.forget(state)
        up.config = emu_config(max_batch_size=64)  # batching changed: a new state, a new gate
        fresh = await sc.registry.model_state("emulated_gpu", "")
        assert fresh is not state and fresh.controller.weight == 5e-3
        fresh.controller.set_latency_target(0.05)
        sc.registry.forget(fresh)
        up.config = emu_config(max_batch_size=32)
        third = await sc.registry.model_state("emulated_gpu", "")
        assert third.controller.latency_target_s == 0.05
        await sc.close()

    run(main())


# -- against a real tritonserver -----------------------------------------------------------------

SLOW = 200  # emulated service times x200: a batch of 1 takes ~0.42 s, of 32 rows ~1.3 s


@pytest.fixture(scope="module")
def slower_triton(tmp_path_factory, triton_runnable):
    with slowed_emulated_gpu(tmp_path_factory.mktemp("slower"), SLOW) as server:
        yield server


def _sidecar(triton_url: str, **overrides):
    from plugin.runner import SidecarThread

    default = overrides.pop("default", {"policy": "greedy"})
    overrides.setdefault("data_plane", "python")  # these tests read the Python gate's state
    overrides.setdefault("control_listen", "127.0.0.1:0")  # never the fixed default ports: tests run side by side
    overrides.setdefault("metrics_listen", "127.0.0.1:0")
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "triton_url": triton_url, "default": default, **overrides},
                      environ={})
    runner = SidecarThread(cfg)
    runner.start()
    return runner


def _triton_successes(url: str) -> int:
    import tritonclient.grpc as tc

    stats = tc.InferenceServerClient(url).get_inference_statistics("emulated_gpu", as_json=True)
    return int(stats["model_stats"][0]["inference_stats"].get("success", {}).get("count", 0))


def _wait(cond, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _stub(url: str):
    from tritonclient.grpc import service_pb2_grpc

    channel = grpc.insecure_channel(url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.integration
def test_a_cancelled_streams_queued_requests_never_reach_triton(slower_triton):
    import threading

    sc = _sidecar(slower_triton.grpc_url)
    channel, stub = _stub(sc.url)
    release = threading.Event()
    try:
        before = _triton_successes(slower_triton.grpc_url)

        def requests():
            for i in range(5):
                yield request(id=f"s{i}")
            release.wait(60)

        call = stub.ModelStreamInfer(requests())
        _wait(lambda: ("emulated_gpu", "") in sc.sidecar.registry.models())
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        # the first runs alone (~0.42 s); the other four wait in the gate for it
        _wait(lambda: state.gate.in_flight == 1 and state.gate.queue_length == 4)
        call.cancel()
        _wait(lambda: state.gate.in_flight == 0 and state.gate.queue_length == 0)
        assert state.gate.counters.cancelled == 4 and state.gate.counters.dispatched_requests == 1
        _wait(lambda: _triton_successes(slower_triton.grpc_url) - before >= 1)
        assert _triton_successes(slower_triton.grpc_url) - before == 1
    finally:
        release.set()
        channel.close()
        sc.stop()


@pytest.mark.integration
def test_a_stream_past_its_deadline_sends_nothing_more_to_triton(slower_triton):
    import threading

    # static:1 serves one request at a time (~0.42 s each): at the 1 s deadline some still wait
    sc = _sidecar(slower_triton.grpc_url, default={"policy": "static:1"})
    channel, stub = _stub(sc.url)
    release = threading.Event()
    try:
        before = _triton_successes(slower_triton.grpc_url)

        def requests():
            for i in range(5):
                yield request(id=f"s{i}")
            release.wait(60)

        call = stub.ModelStreamInfer(requests(), timeout=1.0)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        _wait(lambda: state.gate.in_flight == 0 and state.gate.queue_length == 0)
        c = state.gate.counters
        assert c.cancelled >= 1 and c.cancelled + c.dispatched_requests == 5
        _wait(lambda: _triton_successes(slower_triton.grpc_url) - before >= c.dispatched_requests)
        assert _triton_successes(slower_triton.grpc_url) - before == c.dispatched_requests
    finally:
        release.set()
        channel.close()
        sc.stop()


@pytest.mark.integration
def test_negative_priority_is_refused_and_its_burst_neighbours_succeed(slower_triton):
    sc = _sidecar(slower_triton.grpc_url, default={"policy": "threshold:4", "max_batch": 8})
    channel, stub = _stub(sc.url)
    try:
        reqs = [request(id="a"), request(id="b", priority=("int64_param", -1)), request(id="c"),
                request(id="d", priority=("uint64_param", 9)), request(id="e", priority=("int64_param", 1))]
        futures = [stub.ModelInfer.future(r, timeout=60) for r in reqs]
        answers = {}
        for r, f in zip(reqs, futures):
            try:
                answers[r.id] = f.result().id
            except grpc.RpcError as exc:
                answers[r.id] = (exc.code(), exc.details())
        assert answers == {"a": "a", "c": "c", "d": "d", "e": "e",
                           "b": (grpc.StatusCode.INVALID_ARGUMENT, "invalid value for 'priority', expected value >= 0.")}
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        assert {b: int(n) for b, n in enumerate(state.stats.batches) if n} == {4: 1}
    finally:
        channel.close()
        sc.stop()


@pytest.mark.integration
def test_a_merged_batch_outlives_its_shortest_members_timeout_in_tritons_queue(slower_triton):
    """A member with a short timeout must not make Triton expire the whole merged request while it
    waits behind work Triton is already running."""
    import time

    import tritonclient.grpc as tc

    direct = tc.InferenceServerClient(slower_triton.grpc_url)
    sc = _sidecar(slower_triton.grpc_url, default={"policy": "threshold:2", "max_batch": 8})
    try:
        client = tc.InferenceServerClient(sc.url)
        x = np.zeros((32, 16), np.float32)
        busy = tc.InferInput("INPUT0", list(x.shape), "FP32")
        busy.set_data_from_numpy(x)
        results: dict[str, object] = {}

        def keep(tag):
            return lambda result, error: results.__setitem__(tag, error or result)

        direct.async_infer("emulated_gpu", [busy], keep("busy"))  # Triton's instance: busy ~1.3 s
        time.sleep(0.3)
        for tag, timeout in (("short", 200_000), ("none", None)):
            inp = tc.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(np.ones((1, 16), np.float32))
            client.async_infer("emulated_gpu", [inp], keep(tag), timeout=timeout)
        _wait(lambda: len(results) == 3, 60)
        errors = {k: str(v) for k, v in results.items() if isinstance(v, Exception)}
        assert not errors
        assert [int(results[t].as_numpy("BATCH_SIZE")[0, 0]) for t in ("short", "none")] == [2, 2]
    finally:
        sc.stop()


_DECOUPLED_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)[0])
            for i in range(n):
                out = pb_utils.Tensor("OUT", np.array([[i]], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

_DECOUPLED_CONFIG = '''
name: "decoupled_echo"
backend: "python"
max_batch_size: 8
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "OUT", data_type: TYPE_INT32, dims: [ 1 ] } ]
model_transaction_policy { decoupled: true }
instance_group [ { count: 1, kind: KIND_CPU } ]
'''


@pytest.mark.integration
def test_decoupled_model_streams_are_relayed_with_every_response(tmp_path, triton_factory):
    import threading

    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    model = tmp_path / "decoupled_echo"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(_DECOUPLED_MODEL)
    (model / "config.pbtxt").write_text(_DECOUPLED_CONFIG)
    server = triton_factory(repository=tmp_path, models=("decoupled_echo",))
    sc = _sidecar(server.grpc_url)
    try:
        def ask(n: int) -> list[tc.InferInput]:
            inp = tc.InferInput("IN", [1, 1], "INT32")
            inp.set_data_from_numpy(np.array([[n]], dtype=np.int32))
            return [inp]

        # unary ModelInfer on a decoupled model: exactly Triton's own refusal
        errors = []
        for url in (server.grpc_url, sc.url):
            with pytest.raises(InferenceServerException) as info:
                tc.InferenceServerClient(url).infer("decoupled_echo", ask(1))
            errors.append((info.value.status(), info.value.message()))
        assert errors[0] == errors[1]

        client = tc.InferenceServerClient(sc.url)
        got: list = []
        done = threading.Event()

        def callback(result, error):
            got.append((result, error))
            if len(got) == 5:
                done.set()

        client.start_stream(callback)
        client.async_stream_infer("decoupled_echo", ask(3), request_id="three")
        client.async_stream_infer("decoupled_echo", ask(2), request_id="two")
        assert done.wait(60), got
        client.stop_stream()
        assert [e for _, e in got if e is not None] == []
        values = sorted((r.get_response().id, int(r.as_numpy("OUT")[0, 0])) for r, _ in got)
        assert values == [("three", 0), ("three", 1), ("three", 2), ("two", 0), ("two", 1)]
        assert sc.sidecar.registry.models()[("decoupled_echo", "")].gate is None
    finally:
        sc.stop()


# -- unknown models: Triton's "no such model" is remembered for unknown_model_ttl_s -----------------


def test_an_unknown_model_is_remembered_for_the_ttl_and_forgotten_once_triton_serves_it():
    async def main():
        up = Upstream()
        up.config_error = rpc_error(grpc.StatusCode.NOT_FOUND, "unknown model")
        up.error = rpc_error(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'nope' is not found")
        now = [100.0]
        cfg = load_config(overrides={"triton_url": "127.0.0.1:9", "default": {"policy": "greedy"},
                                     "unknown_model_ttl_s": 1.0}, environ={})
        sc = Sidecar(cfg, clock=lambda: now[0])
        sc.upstream.model_config, sc.upstream.server_ready, sc.upstream.infer = up.model_config, up.server_ready, up.infer
        results = await asyncio.gather(*(sc.plane.infer(request(model="nope")) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, GateError) and r.code == grpc.StatusCode.NOT_FOUND
                   and r.details == "Request for unknown model: 'nope' is not found" for r in results)
        assert up.config_calls == 1 and len(up.sent) == 20  # each relayed once: Triton's own answer
        now[0] += 0.9
        with pytest.raises(GateError):
            await sc.plane.infer(request(model="nope"))
        assert up.config_calls == 1
        now[0] += 0.2  # past the TTL: asked again
        with pytest.raises(GateError):
            await sc.plane.infer(request(model="nope"))
        assert up.config_calls == 2
        # the model appears: its first relayed request succeeds, and the next one is gated
        up.error = None
        assert (await sc.plane.infer(request(model="nope"))).model_name == "nope"
        assert up.config_calls == 2
        up.config_error = None
        await sc.plane.infer(request(model="nope"))
        assert up.config_calls == 3 and sc.registry.models()[("nope", "")].gate is not None
        await sc.close()

    run(main())


def test_triton_not_ready_is_not_remembered_and_the_memory_is_bounded(monkeypatch):
    import plugin.registry as registry

    async def main():
        up = Upstream()
        up.config_error = rpc_error(grpc.StatusCode.NOT_FOUND, "unknown model")
        up.ready = False
        sc = await make_sidecar(up, unknown_model_ttl_s=60.0)
        for _ in range(2):
            with pytest.raises(GateError) as info:
                await sc.plane.infer(request(model="nope"))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert up.config_calls == 2 and up.sent == []  # retryable, not cached, not relayed
        up.ready = True
        up.error = rpc_error(grpc.StatusCode.NOT_FOUND, "unknown")
        monkeypatch.setattr(registry, "MAX_UNKNOWN", 4)
        for i in range(10):
            with pytest.raises(GateError):
                await sc.plane.infer(request(model=f"m{i}"))
        assert sc.registry.unknown() == [("m6", ""), ("m7", ""), ("m8", ""), ("m9", "")]
        await sc.close()

    run(main())


def test_status_counts_each_kind_of_refusal_apart():
    from plugin.control_backend import SidecarControl

    async def main():
        up = Upstream()
        up.hold.clear()  # the first batch holds the model's one slot
        sc = await make_sidecar(up, max_queue=2)
        first = asyncio.ensure_future(sc.plane.infer(request()))
        await until(lambda: len(up.sent) == 1)
        bad = request()
        bad.inputs[0].shape[1] = 15  # malformed against the model config
        with pytest.raises(GateError) as info:
            await sc.plane.infer(bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(GateError) as info:
            await sc.plane.infer(request(priority=("string_param", "high")))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        expiring = asyncio.ensure_future(sc.plane.infer(request(timeout=("int64_param", 20_000))))  # 20 ms
        waiting = asyncio.ensure_future(sc.plane.infer(request()))
        await settle()
        with pytest.raises(GateError) as info:  # the queue holds two: full
            await sc.plane.infer(request())
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(GateError) as info:
            await expiring
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "timeout" in info.value.details
        s = SidecarControl(sc.registry).status("emulated_gpu").message()
        assert (s.rejected, s.rejected_expired, s.rejected_invalid) == (1, 1, 2)
        up.hold.set()
        await asyncio.gather(first, waiting)
        await sc.close()

    run(main())
