"""The inline dispatch: a request the idle gate serves at once, alone, is sent to Triton from its
caller's own coroutine. It must answer exactly once and account for its batch exactly as a batch
dispatched by a task of its own, including when the caller goes away while Triton works."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from test_sidecar_robustness import Upstream, emu_config, make_sidecar, request, rpc_error, run, settle, until

from tritonclient.grpc import service_pb2

from plugin.python_plane import priority_wire
from plugin.server import GateError

MODEL = {"model": "emulated_gpu"}


def spawned(sc) -> list:
    """Record every batch that gets a dispatch task of its own."""
    seen: list = []
    spawn = sc.plane._spawn

    def record(coro):
        seen.append(coro.cr_frame.f_locals.get("batch") if coro.cr_frame else None)
        spawn(coro)

    sc.plane._spawn = record
    return seen


def sample(sc, name: str, **labels) -> float:
    return sc.metrics.registry.get_sample_value(name, {**MODEL, **labels}) or 0.0


def test_an_idle_gate_serves_an_arrival_inline_and_accounts_for_it_as_a_task_would():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        tasks = spawned(sc)
        resp = await sc.plane.infer(request(id="a"))
        assert resp.id == "a" and len(up.sent) == 1
        assert tasks == []  # no dispatch task: the caller's coroutine sent it
        state = sc.registry.models()[("emulated_gpu", "")]

        # The same request with the slot busy waits, then goes by a task when the slot frees.
        up.hold.clear()
        first = asyncio.ensure_future(sc.plane.infer(request(id="b")))
        await until(lambda: len(up.sent) == 2)
        second = asyncio.ensure_future(sc.plane.infer(request(id="c")))
        await until(lambda: state.gate.queue_length == 1)
        up.hold.set()
        assert (await first).id == "b" and (await second).id == "c"
        assert len(tasks) == 1 and len(tasks[0]) == 1 and tasks[0][0].payload.request.id == "c"

        s = state.stats
        assert s.batches[1] == 3 and s.answered == 3 and s.failed_requests == 0 and s.latency_n == 3
        assert s.busy_s[1] > 0
        assert state.gate.in_flight == 0 and state.gate.queue_length == 0
        assert state.gate.counters.dispatched_batches == 3
        assert sample(sc, "smdp_sidecar_requests_total") == 3
        assert sample(sc, "smdp_sidecar_responses_total", code="OK") == 3
        assert sample(sc, "smdp_sidecar_batch_service_seconds_count") == 3
        assert sample(sc, "smdp_sidecar_batch_size_count") == 3
        await sc.close()

    run(main())


def test_a_caller_that_goes_away_during_an_inline_dispatch_leaves_the_batch_running():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        await sc.plane.infer(request(id="warm"))
        state = sc.registry.models()[("emulated_gpu", "")]
        up.hold.clear()
        caller = asyncio.ensure_future(sc.plane.infer(request(id="gone")))
        await until(lambda: len(up.sent) == 2)
        waiting = asyncio.ensure_future(sc.plane.infer(request(id="next")))
        await until(lambda: state.gate.queue_length == 1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await settle()
        assert state.gate.in_flight == 1  # still Triton's: the slot stays taken until it ends
        assert len(sc.plane._tasks) == 1  # the rest of the dispatch runs on in a task
        up.hold.set()
        assert (await waiting).id == "next"
        await until(lambda: state.gate.in_flight == 0)
        s = state.stats
        assert s.batches[1] == 3 and s.answered == 3 and s.failed_requests == 0
        assert [r.id for r in up.sent] == ["warm", "gone", "next"]
        await sc.close()

    run(main())


def test_an_answer_leaves_before_its_accounting_which_is_done_by_the_loops_next_turn():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        await sc.plane.infer(request(id="warm"))
        await asyncio.sleep(0)
        state = sc.registry.models()[("emulated_gpu", "")]
        before = sample(sc, "smdp_sidecar_responses_total", code="OK")
        resp = await sc.plane.infer(request(id="a"))
        # answered, its slot not yet freed nor its latency counted: that work is off the caller's path
        assert resp.id == "a"
        assert state.gate.in_flight == 1 and state.stats.answered == 1 and state.stats.latency_n == 1
        await asyncio.sleep(0)
        assert state.gate.in_flight == 0 and state.stats.answered == 2 and state.stats.latency_n == 2
        assert state.stats.batches[1] == 2 and state.gate.counters.dispatched_batches == 2
        assert sample(sc, "smdp_sidecar_responses_total", code="OK") == before + 1
        # a request arriving in between is queued behind the busy slot and served when it frees
        first = asyncio.ensure_future(sc.plane.infer(request(id="b")))
        second = asyncio.ensure_future(sc.plane.infer(request(id="c")))
        assert (await first).id == "b" and (await second).id == "c"
        await asyncio.sleep(0)
        assert state.stats.answered == 4 and state.gate.in_flight == 0 and state.gate.queue_length == 0
        assert [r.id for r in up.sent] == ["warm", "a", "b", "c"]
        await sc.close()

    run(main())


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL])
def test_an_inline_dispatch_gives_tritons_error_once_and_frees_the_slot(code):
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        await sc.plane.infer(request(id="warm"))
        state = sc.registry.models()[("emulated_gpu", "")]
        up.error = rpc_error(code, "no")
        with pytest.raises(GateError) as err:
            await sc.plane.infer(request(id="x"))
        want = grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.NOT_FOUND else code
        assert err.value.code == want
        await asyncio.sleep(0)  # the batch's accounting: on the loop's next turn, after the answer
        assert state.stats.failed_requests == 1 and state.stats.answered == 2
        assert state.gate.in_flight == 0
        assert sample(sc, "smdp_sidecar_responses_total", code=want.name) == 1
        await sc.close()

    run(main())


@pytest.mark.parametrize("levels, want", [(3, 1), (0, None)])
def test_a_lone_request_gets_the_dispatch_priority_and_one_with_parameters_is_gated_as_before(levels, want):
    """The lone-request path stamps what ``_stamp`` stamps on a batch of one without parameters: the
    sidecar's dispatch priority where the model has that level, nothing else. A request that carries
    parameters goes through the queue and the gate's poll, with its own priority forwarded."""
    async def main():
        up = Upstream(emu_config(**{"dynamic_batching.priority_levels": levels}))
        sc = await make_sidecar(up, dispatch_priority=1)
        tasks = spawned(sc)
        await sc.plane.infer(request(id="plain"))
        await asyncio.sleep(0)  # its accounting: the slot is free again
        await sc.plane.infer(request(id="mine", priority=("uint64_param", 2), timeout=("int64_param", 0)))
        await asyncio.sleep(0)
        plain, mine = up.sent
        got = plain.parameters["priority"].uint64_param if "priority" in plain.parameters else None
        assert got == want and "timeout" not in plain.parameters
        assert "priority" in mine.parameters and (not levels or mine.parameters["priority"].uint64_param == 2)
        assert "timeout" not in mine.parameters
        assert tasks == []  # both served at once, from their callers' coroutines
        state = sc.registry.models()[("emulated_gpu", "")]
        assert state.gate.counters.dispatched_batches == 2 and state.gate.counters.submitted == 2
        assert state.stats.answered == 2 and state.stats.latency_n == 2 and state.gate.in_flight == 0
        assert sample(sc, "smdp_sidecar_batches_total", why="policy") == 2
        await sc.close()

    run(main())


# -- the request's bytes: a request sent on as it came goes as the caller's bytes -------------------


@pytest.mark.parametrize("level", [1, 2, 7])
def test_the_dispatch_stamp_appended_to_a_requests_bytes_parses_as_the_stamped_request(level):
    """``priority_wire`` appended to the encoding of a request without parameters is the encoding of
    that request with ``parameters["priority"]`` set: what the typed lone path sends, as protobuf (and
    Triton's parser) reads it."""
    for req in (request(id="a"), request(rows=3, id=""), service_pb2.ModelInferRequest(model_name="m")):
        stamped = service_pb2.ModelInferRequest()
        stamped.CopyFrom(req)
        stamped.parameters["priority"].uint64_param = level
        got = service_pb2.ModelInferRequest.FromString(req.SerializeToString() + priority_wire(level))
        assert got == stamped
        assert got.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"


@pytest.mark.parametrize("levels, stamped", [(3, True), (0, False)])
def test_a_lone_request_with_its_bytes_goes_as_those_bytes_and_its_answer_comes_back_as_tritons_bytes(levels, stamped):
    async def main():
        up = Upstream(emu_config(**{"dynamic_batching.priority_levels": levels}))
        sc = await make_sidecar(up, dispatch_priority=1)
        req = request(id="a")
        wire = req.SerializeToString()
        answer = await sc.plane.infer(req, wire)
        assert type(answer) is bytes
        assert service_pb2.ModelInferResponse.FromString(answer).id == "a"
        assert up.wire == [wire + priority_wire(1) if stamped else wire]  # the caller's bytes, the stamp after
        assert not req.parameters  # the caller's message is not stamped
        await asyncio.sleep(0)  # its accounting, as for a typed lone request
        state = sc.registry.models()[("emulated_gpu", "")]
        s = state.stats
        assert s.batches[1] == 1 and s.answered == 1 and s.latency_n == 1 and state.gate.in_flight == 0
        assert sample(sc, "smdp_sidecar_responses_total", code="OK") == 1
        assert sample(sc, "smdp_sidecar_batches_total", why="policy") == 1
        await sc.close()

    run(main())


def test_a_queued_request_with_its_bytes_is_merged_and_answered_as_a_message():
    """Only a request sent on as it came goes as bytes: one the gate queues is answered from the
    batch's split, a message, whatever the caller passed."""
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        await sc.plane.infer(request(id="warm"))
        await asyncio.sleep(0)
        state = sc.registry.models()[("emulated_gpu", "")]
        up.hold.clear()
        first = asyncio.ensure_future(sc.plane.infer(request(id="b"), request(id="b").SerializeToString()))
        await until(lambda: len(up.sent) == 2)
        queued = request(id="c")
        second = asyncio.ensure_future(sc.plane.infer(queued, queued.SerializeToString()))
        await until(lambda: state.gate.queue_length == 1)
        up.hold.set()
        a, b = await first, await second
        assert type(a) is bytes and service_pb2.ModelInferResponse.FromString(a).id == "b"
        assert isinstance(b, service_pb2.ModelInferResponse) and b.id == "c"
        assert len(up.wire) == 1  # the lone one only
        await sc.close()

    run(main())


def test_a_request_for_an_unknown_model_is_relayed_as_its_bytes_with_tritons_error():
    async def main():
        up = Upstream()
        up.config_error = rpc_error(grpc.StatusCode.NOT_FOUND, "unknown model")
        up.error = rpc_error(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'nope' is not found")
        sc = await make_sidecar(up)
        req = request(model="nope", id="z")
        with pytest.raises(GateError) as err:
            await sc.plane.infer(req, req.SerializeToString())
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert up.wire == [req.SerializeToString()]
        await sc.close()

    run(main())
