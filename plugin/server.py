"""The sidecar: Triton's own gRPC inference service, with inference gated by the batching policy.

Every RPC other than inference is relayed to Triton as raw bytes (no parse, no re-encode), so any
KServe v2 / tritonclient call works by changing only the URL. ``ModelInfer`` and
``ModelStreamInfer`` go through a per-model ``ModelGate``: the gate decides at each epoch (arrival,
completion, timer) how many of the waiting requests to serve, and the chosen batch is sent to Triton
as one merged request whose response rows are split back to the callers.

Every caller gets exactly one answer: the response, or one gRPC status (RESOURCE_EXHAUSTED when its
model's queue is full, INVALID_ARGUMENT for a malformed request, UNAVAILABLE when Triton cannot be
reached, or whatever status Triton itself gave).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2

from solver.policy import BatchRule

from .config import SidecarConfig
from .gate import ModelGate, Pending, QueueFull
from .merge import MalformedRequest, RequestValidator, merge, merge_key, split
from .metrics import SidecarMetrics, latency_buckets_with
from .native_plane import NativeGateView, NativePlane, choose_plane, forget_line, monotonic_offset
from .registry import Gate, ModelRegistry, ModelState, consume
from .upstream import CHANNEL_OPTIONS, SERVICE, GateError, Upstream

log = logging.getLogger("smdp.sidecar")

_SERVICE_DESC = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_GATED = {"ModelInfer", "ModelStreamInfer"}
_STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
_REPOSITORY_CONTROL = {"RepositoryModelLoad", "RepositoryModelUnload"}


# Triton's own messages for the per-request parameters it would refuse (grpc infer handler, 2.51).
_BAD_PRIORITY_TYPE = "invalid value type for 'priority' parameter, expected int64_param or uint64_param."
_BAD_PRIORITY = "invalid value for 'priority', expected value >= 0."
_BAD_TIMEOUT_TYPE = "invalid value type for 'timeout' parameter, expected int64_param."


def _priority_level(p: service_pb2.InferParameter, levels: int, default: int) -> int:
    """The queue level Triton gives a request's ``priority``: 0, above ``levels``, or any value on a
    model without priority levels means the model's default (InferenceRequest::SetPriority)."""
    which = p.WhichOneof("parameter_choice")
    if which == "uint64_param":
        value = p.uint64_param
    elif which == "int64_param":
        value = p.int64_param
        if value < 0:
            raise GateError(grpc.StatusCode.INVALID_ARGUMENT, _BAD_PRIORITY)
    else:
        raise GateError(grpc.StatusCode.INVALID_ARGUMENT, _BAD_PRIORITY_TYPE)
    return value if 0 < value <= levels else default


def _timeout_us(p: service_pb2.InferParameter) -> int:
    """A request's ``timeout`` in microseconds; 0 or less means none (Triton reads it as unsigned)."""
    if p.WhichOneof("parameter_choice") != "int64_param":
        raise GateError(grpc.StatusCode.INVALID_ARGUMENT, _BAD_TIMEOUT_TYPE)
    return p.int64_param


def _done(call: grpc.aio.Call | asyncio.Future) -> asyncio.Future:
    """A future that ends when ``call`` does; cancelling it does not cancel the call."""
    fut = asyncio.get_running_loop().create_future()
    call.add_done_callback(lambda _c: fut.done() or fut.set_result(None))
    return fut


@dataclass(eq=False)
class _Call:
    request: service_pb2.ModelInferRequest
    future: asyncio.Future


class Sidecar:
    """The data plane of the sidecar: the Python gate's request path, or the native gate's events;
    one event loop drives everything. What it knows of each model is its ``registry``'s."""

    def __init__(self, config: SidecarConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self.upstream = Upstream(config.triton_url, config.upstream_timeout_s)
        self._tasks: set[asyncio.Task] = set()
        self._validators: dict[tuple[str, str], RequestValidator] = {}
        """Per model: the request checks of its config in force, worked out once per config."""
        self.metrics = SidecarMetrics(latency_buckets_s=latency_buckets_with(
            [m.slo.latency_s for m in (config.default, *config.models.values()) if m.slo is not None]))
        self.registry = ModelRegistry(config, self.upstream, self.metrics, self._clock, self)
        self._native = None
        """The native data plane (``data_plane: native``): a NativePlane once start_sidecar started it."""
        self._native_loading: set[str] = set()
        self._closing = False

    async def close(self) -> None:
        self._closing = True
        if self._native is not None:
            await self._native.stop()
        await self.registry.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.upstream.close()

    def clock(self) -> float:
        return self._clock()

    @property
    def native(self) -> NativePlane | None:
        """The native gate's process when it carries inference; None on the Python plane."""
        return self._native

    async def start_native(self) -> NativePlane:
        """Start the native gate (``data_plane: native``): from now on it carries inference."""
        config = self.config
        self._native = await NativePlane.start(
            listen=config.listen, triton_url=config.triton_url, max_queue=config.max_queue,
            on_event=self._native_event, binary=config.native_binary,
            upstream_timeout_s=config.upstream_timeout_s,
            deny=() if config.allow_repository_control else tuple(sorted(_REPOSITORY_CONTROL)),
        )
        return self._native

    # -- what the registry asks of the plane -------------------------------------------------
    def new_gate(self, name: str, rule: BatchRule, *, slots: int, max_rows: int, default_priority: int,
                 priority_levels: int) -> Gate:
        if self._native is not None:
            return NativeGateView(
                name, self._native.send, rule, slots=slots, max_queue=self.config.max_queue,
                default_priority=default_priority, priority_levels=priority_levels,
                dispatch_priority=self.config.dispatch_priority,
            )
        return ModelGate(rule, slots=slots, max_queue=self.config.max_queue, max_rows=max_rows, clock=self._clock)

    def rule_changed(self, state: ModelState) -> None:
        self._pump(state)

    def priorities_changed(self, state: ModelState) -> None:
        if self._native is not None:
            state.gate.set_priorities(state.default_priority, state.priority_levels)

    def model_changed(self, name: str) -> None:
        """The native gate keeps its policy until the new one."""
        if self._native is not None and name not in self._native_loading and not self._closing:
            self._native_loading.add(name)
            self._spawn(self._native_relearn(name))

    # -- native data plane -------------------------------------------------------------------
    def _native_event(self, kind: str, *args: Any) -> None:
        """What the native gate reported: feed the estimator, the learner, the stats and metrics
        exactly as the Python gate's own bookkeeping does (``infer``, ``_batch_done``)."""
        if self._closing and kind in ("seen", "lost", "loaded"):
            return
        if kind == "loaded":
            self.registry.model_changed(args[0])
            return
        if kind == "lost":
            # Triton no longer knows a gated model (restarting, or unloaded): as the Python plane does
            # on NOT_FOUND, forget its config and read it again. Meanwhile the gate keeps gating with
            # the policy it has and answers UNAVAILABLE for what Triton refuses.
            name = args[0]
            state = self.registry.get(name, "")
            if state is not None:
                self.registry.forget(state)
            if name not in self._native_loading:
                self._native_loading.add(name)
                self._spawn(self._native_relearn(name))
            return
        if kind == "seen":
            name = args[0]
            if self.registry.get(name, "") is not None or name in self._native_loading:
                return
            self._native_loading.add(name)
            self._spawn(self._native_load(name))
            return
        if kind == "batch":
            rep = args[0]
            state = self.registry.get(rep.model, "")
            if state is None:
                return
            elapsed = max(rep.end - rep.start, 0.0)
            if rep.code != 0:
                state.stats.failed_requests += rep.size
            state.stats.record(rep.rows, elapsed)
            if state.controller is not None:
                state.controller.observe_batch(rep.rows, elapsed, state.stats.failed_requests)
            self.metrics.batch_dispatched(state.name, rep.rows, rep.why)
            self.metrics.batch_completed(state.name, rep.rows, elapsed)
            state.stats.answered += rep.size
            code = _STATUS_BY_NUMBER.get(rep.code, grpc.StatusCode.UNKNOWN)
            answered_at = self._clock()
            for wait in rep.waits:
                latency = wait + elapsed
                if rep.code == 0:  # completed: answered OK, as the Python gate counts them
                    state.stats.latency_sum_s += latency
                    state.stats.latency_n += 1
                    if state.controller is not None:
                        state.controller.observe_latency(answered_at, latency)
                self.metrics.request_answered(state.name, "OK" if rep.code == 0 else code, latency)
            return
        state = self.registry.get(args[0], "")
        if state is None or state.gate is None:
            return
        if kind == "arrive":
            offset = monotonic_offset(self._clock)
            for t in args[1]:
                if state.controller is not None:
                    state.controller.observe_arrival(t + offset)
                self.metrics.request_arrived(state.name)
        elif kind == "counters":
            grown = state.gate.update(args[1])
            # as the Python gate counts them: refusals before queueing (expiry is an answer, not a refusal)
            for reason, key in (("queue_full", "rejected"), ("invalid_argument", "invalid")):
                for _ in range(max(grown.get(key, 0), 0)):
                    self.metrics.request_rejected(state.name, reason)

    async def native_preload(self) -> None:
        """Gate the models Triton has ready before the first request: the native gate relays a model
        ungated until its policy arrives, so waiting for first traffic would let a burst through ungated.
        Best effort: with Triton away, models are gated as their first requests are seen."""
        try:
            resp = await self.upstream.repository_index(service_pb2.RepositoryIndexRequest(ready=True), timeout=self.config.upstream_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.info("Triton's repository index is not available (%s): models are gated as they are seen",
                     exc.code().name)
            return
        for model in resp.models:
            if model.state == "READY" and self.registry.get(model.name, "") is None:
                await self._native_load(model.name)

    async def _native_relearn(self, name: str, retry_s: float = 0.5, give_up_s: float = 600.0) -> None:
        """After ``lost``: read the model's config again once Triton has it (the state is reused and its
        policy pushed again). A model Triton is ready without is unloaded for good: relay it ungated."""
        try:
            end = self._clock() + give_up_s
            while self._clock() < end and not self._closing:
                try:
                    state = await self.registry.model_state(name, "")
                except GateError:
                    await asyncio.sleep(retry_s)  # Triton away or still starting
                    continue
                if state is None and self._native is not None:
                    self._native.send(forget_line(name))
                return
            if not self._closing:
                log.warning("model %s did not come back within %.0f s", name, give_up_s)
        finally:
            self._native_loading.discard(name)

    async def _native_load(self, name: str) -> None:
        """A model the native gate relays ungated: read its config and push its policy (once it batches).
        The gate reports an ungated model with traffic again every second, so a failed load is retried."""
        try:
            await self.registry.model_state(name, "")
        except GateError as exc:
            log.warning("cannot gate model %s yet: %s", name, exc.details)
        finally:
            self._native_loading.discard(name)

    # -- inference ---------------------------------------------------------------------------
    async def infer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        """One caller's request, answered exactly once (a response, or GateError)."""
        state = await self.registry.model_state(request.model_name, request.model_version)
        if state is None:
            response = await self.upstream.call(request)
            self.registry.known_again(request.model_name, request.model_version)
            return response
        if state.gate is None:
            return await self.upstream.call(request)
        try:
            key = (state.name, state.version)
            validator = self._validators.get(key)
            if validator is None or validator.config is not state.config:
                validator = self._validators[key] = RequestValidator(state.config)
            validator.check(request)
        except MalformedRequest:
            return await self._relay_refused(state, request)
        now = self._clock()
        priority = state.default_priority
        deadline = None
        params = request.parameters
        if params:
            try:
                if "priority" in params:
                    priority = _priority_level(params["priority"], state.priority_levels, state.default_priority)
                if "timeout" in params:
                    timeout_us = _timeout_us(params["timeout"])
                    if timeout_us > 0:
                        deadline = now + timeout_us / 1e6
            except GateError:
                self.metrics.request_rejected(state.name, "invalid_argument")
                raise
        inputs = request.inputs
        shape = inputs[0].shape if inputs else None
        rows = int(shape[0]) if shape else 1
        call = _Call(request, self._loop.create_future())
        item = Pending(
            key=merge_key(request),
            arrival=now,
            rows=rows,
            priority=priority,
            deadline=deadline,
            payload=call,
        )
        try:
            state.gate.submit(item)
        except QueueFull as exc:
            self.metrics.request_rejected(state.name, "queue_full")
            raise GateError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"model '{state.name}' is overloaded: {exc}"
            ) from None
        if state.controller is not None:
            state.controller.observe_arrival(now)
        self.metrics.request_arrived(state.name)
        alone = self._pump(state, item)
        try:
            if alone is not None:
                # Served at once, alone: dispatch from this coroutine instead of a task of its own
                # (two event-loop hops fewer). Same body, same accounting; the future is set by now.
                await self._dispatch(state, alone, inline=True)
            response = await call.future
            latency = self._clock() - now
            state.stats.latency_sum_s += latency
            state.stats.latency_n += 1
            if state.controller is not None:
                state.controller.observe_latency(now + latency, latency)
            self.metrics.request_answered(state.name, "OK", latency)
            return response
        except GateError as exc:
            self.metrics.request_answered(state.name, exc.code, self._clock() - now)
            raise
        except asyncio.CancelledError:
            state.gate.cancel(item)  # still waiting: frees its place; dispatched: the batch runs on
            raise

    async def _relay_refused(self, state: ModelState, request: service_pb2.ModelInferRequest
                             ) -> service_pb2.ModelInferResponse:
        """A request the model's config says Triton refuses: sent to Triton alone and ungated (it must
        not fail a merged batch), so that its caller gets Triton's own code and message. Should Triton
        serve it after all, the sidecar's copy of the config is stale: it is read again."""
        try:
            response = await self.upstream.call(request)
        except GateError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                self.metrics.request_rejected(state.name, "invalid_argument")
            raise
        if self.registry.config_stale(state):
            log.info("Triton served a request model %s's config refuses: reading its config again", state.name)
            self.registry.model_changed(state.name)
        return response

    def _pump(self, state: ModelState, arrived: Pending | None = None) -> tuple[Pending, ...] | None:
        """One decision epoch: carry out what the gate decides now, and arm its timer.

        ``arrived``: the request whose arrival this epoch is. When the gate serves it alone, now, that
        batch is returned instead of given a task: its caller's coroutine dispatches it (``infer``).
        """
        if self._native is not None:
            return None  # the native gate decides; a new rule reached it with set_rule
        step = state.gate.poll()
        for item in step.expired:
            self._fail(item.payload, GateError(grpc.StatusCode.UNAVAILABLE, "Request timeout expired"))
        alone = None
        for batch, why in zip(step.batches, step.reasons):
            self.metrics.batch_dispatched(state.name, sum(p.rows for p in batch), why)
            if arrived is not None and len(batch) == 1 and batch[0] is arrived:
                alone = batch
                continue
            self._spawn(self._dispatch(state, batch))
        if step.wake_at is not None and (state.timer_at is None or step.wake_at < state.timer_at):
            if state.timer:
                state.timer.cancel()
            state.timer_at = step.wake_at
            state.timer = self._loop.call_at(step.wake_at, self._on_timer, state)
        return alone

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_timer(self, state: ModelState) -> None:
        state.timer = state.timer_at = None
        self._pump(state)

    def _stamp(
        self, state: ModelState, req: service_pb2.ModelInferRequest, members: tuple[Pending, ...], now: float
    ) -> None:
        """Priority and timeout of what the gate sends.

        A client's own priority is forwarded (the most urgent level among a merged batch's members);
        requests without one get the sidecar's dispatch priority, so gated traffic overtakes anything
        that reaches Triton directly. The gate has expired its requests itself while they waited; the
        timeout forwarded must not fail a member before its own deadline, so it is the latest member's
        remaining time, and none at all when any member has none.
        """
        level = None
        latest = 0.0
        for p in members:
            if "priority" in p.payload.request.parameters and (level is None or p.priority < level):
                level = p.priority
            if latest is not None:
                latest = None if p.deadline is None else max(latest, p.deadline)
        if level is None:
            dispatch = self.config.dispatch_priority
            if dispatch and dispatch <= state.priority_levels:
                level = dispatch
        if level is not None:
            req.parameters["priority"].uint64_param = level
        if latest is not None:
            req.parameters["timeout"].int64_param = max(1, int((latest - now) * 1e6))
        elif "timeout" in req.parameters:
            del req.parameters["timeout"]

    def _upstream_error(self, state: ModelState, exc: GateError) -> GateError:
        """What a caller gets for Triton's error on a dispatched request."""
        if exc.code == grpc.StatusCode.NOT_FOUND:
            # A model the gate was serving vanished (Triton restarting, or the model unloaded):
            # retryable for these callers; the next request re-reads the model's config.
            self.registry.forget(state)
            return GateError(
                grpc.StatusCode.UNAVAILABLE, f"model '{state.name}' is not available on Triton: {exc.details}"
            )
        return exc

    async def _dispatch(self, state: ModelState, batch: tuple[Pending, ...], inline: bool = False) -> None:
        """Send one batch to Triton and answer its members; then free its slot and pump.

        ``inline``: run by the one member's own caller (see ``_pump``). Should that caller go away
        while Triton works, the batch runs on in a task, as it would have in its own task.
        """
        calls: list[_Call] = [p.payload for p in batch]
        start = self._clock()
        rows = sum(p.rows for p in batch)
        handed_off = False
        try:
            if len(batch) == 1:
                req = calls[0].request  # ours alone (parsed for this call): stamp it in place
                self._stamp(state, req, batch, start)
                upstream = self.upstream.infer(req, timeout=self.config.upstream_timeout_s)
                if inline:
                    if asyncio.iscoroutine(upstream):  # a stand-in for the channel (tests)
                        upstream = self._loop.create_task(upstream)
                    try:
                        await _done(upstream)  # cancelling this wait leaves the upstream call running
                    except asyncio.CancelledError:
                        handed_off = True
                        self._spawn(self._run_on(state, calls, rows, start, upstream))
                        raise
                self._succeed(calls[0], await self.upstream.answer(upstream))
            elif self.config.mode == "released":
                await self._dispatch_released(state, batch, start)
            else:
                merged = merge([c.request for c in calls], checked=True)
                self._stamp(state, merged.request, batch, start)
                response = await self.upstream.call(merged.request)
                try:
                    parts = split(response, merged)
                except Exception as exc:  # an output without a batch dimension
                    raise GateError(grpc.StatusCode.INTERNAL, f"cannot split merged response: {exc}") from None
                for call, part in zip(calls, parts):
                    self._succeed(call, part)
        except Exception as exc:  # never leave a caller without an answer
            self._batch_failed(state, calls, exc)
        finally:
            if not handed_off:
                self._batch_done(state, calls, rows, start)

    async def _run_on(
        self, state: ModelState, calls: list[_Call], rows: int, start: float, upstream: grpc.aio.UnaryUnaryCall
    ) -> None:
        """The rest of an inline dispatch whose caller went away: its batch completes as any other."""
        try:
            self._succeed(calls[0], await self.upstream.answer(upstream))
        except Exception as exc:
            self._batch_failed(state, calls, exc)
        finally:
            self._batch_done(state, calls, rows, start)

    def _batch_failed(self, state: ModelState, calls: list[_Call], exc: Exception) -> None:
        """Every member of a failed batch gets its one answer: the error."""
        if isinstance(exc, GateError):
            exc = self._upstream_error(state, exc)
        elif isinstance(exc, MalformedRequest):
            exc = GateError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        else:
            log.error("dispatch failed", exc_info=exc)
            exc = GateError(grpc.StatusCode.INTERNAL, f"sidecar error: {exc}")
        state.stats.failed_requests += len(calls)
        for call in calls:
            self._fail(call, exc)

    def _batch_done(self, state: ModelState, calls: list[_Call], rows: int, start: float) -> None:
        """A batch ended, answered or failed: account for it, free its slot, and decide again."""
        elapsed = self._clock() - start
        state.stats.record(rows, elapsed)
        if state.controller is not None:  # learns tau(b); a batch that raised the failure count is skipped
            state.controller.observe_batch(rows, elapsed, state.stats.failed_requests)
        self.metrics.batch_completed(state.name, rows, elapsed)
        state.stats.answered += len(calls)
        state.gate.complete()
        self._pump(state)

    async def _dispatch_released(self, state: ModelState, batch: tuple[Pending, ...], start: float) -> None:
        async def one(p: Pending) -> None:
            req = p.payload.request
            self._stamp(state, req, (p,), start)
            try:
                self._succeed(p.payload, await self.upstream.call(req))
            except GateError as exc:
                state.stats.failed_requests += 1
                self._fail(p.payload, self._upstream_error(state, exc))

        await asyncio.gather(*(one(p) for p in batch))

    @staticmethod
    def _succeed(call: _Call, response: service_pb2.ModelInferResponse) -> None:
        if not call.future.done():
            call.future.set_result(response)

    @staticmethod
    def _fail(call: _Call, exc: GateError) -> None:
        if not call.future.done():
            call.future.set_exception(exc)


UNPARSABLE = "Unable to parse request"
"""Triton's answer (INTERNAL) to a ModelInfer whose bytes do not parse (invalid UTF-8 in a string too)."""


def _parse_infer_request(data: bytes) -> service_pb2.ModelInferRequest | None:
    """The request, or None for bytes that do not parse: answered as Triton answers them, instead of
    gRPC's UNKNOWN and a log line with a traceback for every such request."""
    try:
        return service_pb2.ModelInferRequest.FromString(data)
    except DecodeError:
        return None


class _Servicer:
    """gRPC glue: gated inference plus a raw-bytes relay for every other RPC."""

    UNPARSABLE_LOG_EVERY_S = 60.0

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self._unparsable = 0  # since the last log line about them
        self._unparsable_logged_at = -math.inf

    def _count_unparsable(self) -> None:
        """One log line a minute at most, however many clients send bytes that do not parse."""
        self._unparsable += 1
        now = time.monotonic()
        if now - self._unparsable_logged_at >= self.UNPARSABLE_LOG_EVERY_S:
            log.warning("%d ModelInfer request(s) did not parse (answered INTERNAL, as Triton does) in the "
                        "last %.0f s at most", self._unparsable, self.UNPARSABLE_LOG_EVERY_S)
            self._unparsable, self._unparsable_logged_at = 0, now

    async def model_infer(self, request: service_pb2.ModelInferRequest | None, context: grpc.aio.ServicerContext):
        if request is None:
            self._count_unparsable()
            await context.abort(grpc.StatusCode.INTERNAL, UNPARSABLE)
        try:
            return await self.sidecar.infer(request)
        except GateError as exc:
            code, details = exc.code, exc.details
            # The error's traceback holds the frames that hold the request, and those frames that
            # re-raised it hold the error: a cycle, which kept a refused 64 MiB request in memory until
            # the next garbage collection. Cut here, and aborted outside the handler.
            exc.__traceback__ = None
        await context.abort(code, details)

    async def model_stream_infer(
        self, requests: AsyncIterator[service_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ):
        """One stream response per request, in completion order; errors are in-band as Triton does.

        Each request is answered by its own task, which always puts exactly one response (or one
        in-band error) on ``out``. When the stream ends early (the client cancels or goes away), every
        outstanding task is cancelled, which withdraws its request from the gate's queue.

        Requests for models without a gate (decoupled ones, with any number of responses each; sequence
        models, whose requests Triton must see in order) are relayed unchanged, in the order sent, on one
        upstream stream to Triton, opened when the first one comes; its responses are passed on as
        they arrive, and the stream ends when both sides are done.
        """
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        sidecar = self.sidecar
        infer = sidecar.infer
        registry = sidecar.registry
        loop = asyncio.get_running_loop()
        closing = False
        relay: _StreamRelay | None = None

        async def handle(req: service_pb2.ModelInferRequest) -> None:
            try:
                item = service_pb2.ModelStreamInferResponse(infer_response=await infer(req))
            except GateError as exc:
                item = _stream_error(req, exc.details)
            except asyncio.CancelledError:
                if closing:
                    raise  # the stream is closing: nobody is left to answer
                item = _stream_error(req, "request cancelled in the sidecar")
            except Exception as exc:  # never leave a request without its answer
                log.exception("stream request failed")
                item = _stream_error(req, f"sidecar error: {exc}")
            out.put_nowait(item)

        async def reader() -> None:
            # Requests for a gated model each go through the gate (their own task); every other one
            # (decoupled and sequence models, models without a gate, names Triton does not know) is
            # relayed from here, in the order sent, on one upstream stream: Triton must see a
            # sequence's requests in order, and answers them in order.
            nonlocal relay
            try:
                async for req in requests:
                    out.put_nowait(_REQUEST)
                    try:
                        state = registry.get(req.model_name, req.model_version)
                        if state is None:
                            state = await registry.model_state(req.model_name, req.model_version)
                        if state is None or state.gate is None:
                            if relay is None:
                                md = _forward_metadata(context) if context is not None else None
                                relay = _StreamRelay(sidecar.upstream.stream(metadata=md), out)
                            await relay.send(req)
                            out.put_nowait(_RELAYED)
                            continue
                    except GateError as exc:
                        out.put_nowait(_stream_error(req, exc.details))
                        continue
                    except Exception as exc:  # never leave a request without its answer
                        log.exception("stream request failed")
                        out.put_nowait(_stream_error(req, f"sidecar error: {exc}"))
                        continue
                    t = loop.create_task(handle(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            finally:
                out.put_nowait(None)  # end of requests, however reading ended

        read_task = loop.create_task(reader())
        read_task.add_done_callback(consume)
        try:
            inflight = 0
            reading = True
            relay_ended = False  # its end seen on the queue, after every response it passed on
            while reading or inflight or (relay is not None and not relay_ended):
                if not reading and not inflight and relay is not None and relay.writing:
                    await relay.done_writing()  # every request relayed: Triton ends the stream when done
                item = await out.get()
                if item is None:
                    reading = False
                elif item is _REQUEST:
                    inflight += 1
                elif item is _RELAYED:
                    inflight -= 1  # its responses come through the relay
                elif type(item) is _Forward:
                    yield item.response
                elif type(item) is GateError:  # the upstream stream failed: so does this one
                    await context.abort(item.code, item.details)
                elif item is _RELAY_END:
                    relay_ended = True
                else:
                    inflight -= 1
                    yield item
        finally:
            closing = True
            read_task.cancel()
            for t in tasks:
                t.cancel()
            if relay is not None:
                relay.cancel()


_REQUEST = object()  # on a stream's queue: one more request to answer
_RELAYED = object()  # on a stream's queue: a request sent on the relay, answered by Triton
_RELAY_END = object()  # on a stream's queue: the relay's upstream stream ended


class _Forward:
    """On a stream's queue: a response from the relay, passed on as is."""

    __slots__ = ("response",)

    def __init__(self, response: service_pb2.ModelStreamInferResponse) -> None:
        self.response = response


class _StreamRelay:
    """One client stream's requests for decoupled models, on one upstream ModelStreamInfer call."""

    def __init__(self, call: grpc.aio.StreamStreamCall, out: asyncio.Queue) -> None:
        self.call = call
        self.out = out
        self.open = True
        self.writing = True
        self._lock = asyncio.Lock()  # one write at a time on a gRPC stream
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, req: service_pb2.ModelInferRequest) -> None:
        async with self._lock:
            try:
                await self.call.write(req)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                raise GateError(code, f"Triton's stream failed: {exc}") from None

    async def done_writing(self) -> None:
        self.writing = False
        async with self._lock:
            try:
                await self.call.done_writing()
            except (grpc.aio.AioRpcError, grpc.aio.UsageError):
                pass  # the upstream stream already ended; its reader reports how

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                if resp is grpc.aio.EOF:
                    break
                self.out.put_nowait(_Forward(resp))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.out.put_nowait(GateError(exc.code(), exc.details() or ""))
        finally:
            self.open = False
            self.out.put_nowait(_RELAY_END)

    def cancel(self) -> None:
        self._reader.cancel()
        self.call.cancel()


def _stream_error(req: service_pb2.ModelInferRequest, message: str) -> service_pb2.ModelStreamInferResponse:
    return service_pb2.ModelStreamInferResponse(
        error_message=message,
        infer_response=service_pb2.ModelInferResponse(
            model_name=req.model_name, model_version=req.model_version, id=req.id
        ),
    )


def _relay_handler(channel: grpc.aio.Channel, method: str, unary_request: bool, unary_response: bool, allowed: bool,
                   on_success: Callable[[bytes], None] | None = None):
    """Relay a method's bytes to Triton; ``on_success`` sees the request of each call Triton answered OK."""
    path = f"/{SERVICE}/{method}"
    if not allowed:

        async def denied(request, context):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
f"{method} is not exposed through the sidecar: to relay Triton's repository control, start it "
                "with allow_repository_control: true in its config (or smdp serve --allow-repository-control)",
            )

        return grpc.unary_unary_rpc_method_handler(denied)
    if unary_request and unary_response:
        stub = channel.unary_unary(path)

        async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                response = await stub(request, metadata=_forward_metadata(context))
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            if on_success is not None:
                on_success(request)
            return response

        return grpc.unary_unary_rpc_method_handler(relay)
    raise NotImplementedError(f"streaming relay for {method}")


def _forward_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
    md = context.invocation_metadata() or ()
    return tuple((k, v) for k, v in md if not k.startswith((":", "grpc-")) and k not in ("user-agent", "te"))


@dataclass
class RunningSidecar:
    """A started sidecar server: its port, and how to stop it."""

    server: grpc.aio.Server | None
    """The Python inference server; None with the native data plane (its process serves inference)."""
    sidecar: Sidecar
    port: int
    health: Any
    control: grpc.aio.Server | None = None
    control_port: int | None = None
    metrics_server: Any = None
    metrics_port: int | None = None
    http: Any = None
    """The HTTP/REST listener (plugin/http_front.py), when ``listen_http`` is set."""
    http_port: int | None = None

    async def stop(self, grace: float = 1.0) -> None:
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.http is not None:
            await self.http.stop()
        if self.control is not None:
            await self.control.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.server is not None:
            await self.server.stop(grace)
        await self.sidecar.close()


async def start_sidecar(config: SidecarConfig) -> RunningSidecar:
    """Build and start the sidecar server; binds ``config.listen`` (port 0 = a free port) and returns it."""
    choice = choose_plane(config.data_plane, config.mode, config.native_binary)
    (log.info if choice.plane == "native" or config.data_plane == "python" else log.warning)("%s", choice.reason)
    config = config.model_copy(update={"data_plane": choice.plane})
    sidecar = Sidecar(config)
    if config.data_plane == "native":
        try:
            native = await sidecar.start_native()
        except BaseException:
            await sidecar.close()
            raise
        log.info("native data plane (smdp-gate) listening on port %d, relaying to Triton at %s",
                 native.port, config.triton_url)
        running = RunningSidecar(None, sidecar, native.port, None)
        await _start_side_servers(running, config)
        await sidecar.native_preload()
        return running
    servicer = _Servicer(sidecar)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in _SERVICE_DESC.methods:
        if m.name == "ModelInfer":
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                servicer.model_infer,
                request_deserializer=_parse_infer_request,
                response_serializer=service_pb2.ModelInferResponse.SerializeToString,
            )
        elif m.name == "ModelStreamInfer":
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                servicer.model_stream_infer,
                request_deserializer=service_pb2.ModelInferRequest.FromString,
                response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString,
            )
        else:
            allowed = m.name not in _REPOSITORY_CONTROL or config.allow_repository_control
            handlers[m.name] = _relay_handler(
                sidecar.upstream.channel, m.name, not m.client_streaming, not m.server_streaming, allowed,
                sidecar.registry.repository_call_done if m.name in _REPOSITORY_CONTROL else None,
            )
    server = grpc.aio.server(options=CHANNEL_OPTIONS[:2])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot bind the sidecar to {config.listen}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info("sidecar listening on port %d, relaying to Triton at %s", port, config.triton_url)
    running = RunningSidecar(server, sidecar, port, health)
    await _start_side_servers(running, config)
    sidecar.registry.preload_auto_profiles()
    return running


async def _start_side_servers(running: RunningSidecar, config: SidecarConfig) -> None:
    """The control API and the metrics endpoint, whichever plane carries inference."""
    sidecar = running.sidecar
    if config.control_listen:
        from .control import start_control_server
        from .control_backend import SidecarControl

        try:
            running.control, running.control_port = await start_control_server(
                SidecarControl(sidecar.registry), config.control_listen, config.control_token
            )
        except BaseException:
            await running.stop(0)
            raise
        log.info("control API on port %d", running.control_port)
    if config.metrics_listen:
        from .metrics import start_metrics_server

        try:
            running.metrics_server, running.metrics_port = start_metrics_server(sidecar.metrics, config.metrics_listen)
        except BaseException:
            await running.stop(0)
            raise
        log.info("Prometheus metrics on port %d", running.metrics_port)
    if config.listen_http:
        from .http_front import start_http_front

        try:
            if sidecar.native is None:
                running.http, running.http_port = await start_http_front(config, submit=sidecar.infer)
            else:
                running.http, running.http_port = await start_http_front(config, gate_port=running.port)
        except BaseException:
            await running.stop(0)
            raise
        log.info("HTTP/REST API on port %d", running.http_port)
