"""The Python data plane: each model's ``ModelGate`` decides in this process, and the sidecar
merges each batch into one request to Triton and splits the response back to its callers.

Every caller gets exactly one answer: the response, or one ``GateError`` (RESOURCE_EXHAUSTED when its
model's queue is full, INVALID_ARGUMENT for a malformed request, UNAVAILABLE when Triton cannot be
reached, or whatever status Triton itself gave).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import CoroutineType
from typing import Callable, Coroutine

import grpc
from tritonclient.grpc import service_pb2

from solver.policy import BatchRule

from .config import SidecarConfig
from .gate import ModelGate, Pending, QueueFull
from .merge import MalformedRequest, RequestValidator, merge, merge_key, split
from .metrics import SidecarMetrics
from .registry import ModelRegistry, ModelState
from .upstream import GateError, Upstream

log = logging.getLogger("smdp.sidecar")

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


def priority_wire(level: int) -> bytes:
    """The encoding of a ModelInferRequest whose one field is ``parameters["priority"]`` = ``level``
    (uint64_param). Appended to a request's bytes it adds that parameter, as protobuf parses a message's
    concatenated encodings as one (a map field gains the entry; the last entry of a key wins)."""
    stamp = service_pb2.ModelInferRequest()
    stamp.parameters["priority"].uint64_param = level
    return stamp.SerializeToString()


def _done(call: grpc.aio.Call | asyncio.Future) -> asyncio.Future:
    """A future that ends when ``call`` does; cancelling it does not cancel the call."""
    fut = asyncio.get_running_loop().create_future()
    call.add_done_callback(lambda _c: fut.done() or fut.set_result(None))
    return fut


@dataclass(eq=False)
class _Call:
    request: service_pb2.ModelInferRequest
    future: asyncio.Future


class PythonPlane:
    """Inference through the Python gate: ``infer`` answers one caller's request; the registry's
    models get a ``ModelGate`` each, and every decision epoch (arrival, completion, timer) runs here."""

    def __init__(self, config: SidecarConfig, registry: ModelRegistry, upstream: Upstream, metrics: SidecarMetrics,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        self._validators: dict[tuple[str, str], RequestValidator] = {}
        """Per model: the request checks of its config in force, worked out once per config."""
        self._stamp_wire = priority_wire(config.dispatch_priority) if config.dispatch_priority else b""
        """The dispatch priority's stamp as bytes, appended to a lone request's own (``_serve_alone``)."""

    # -- what the registry asks of the plane -------------------------------------------------
    def new_gate(self, name: str, rule: BatchRule, *, slots: int, max_rows: int, default_priority: int,
                 priority_levels: int) -> ModelGate:
        return ModelGate(rule, slots=slots, max_queue=self.config.max_queue, max_rows=max_rows, clock=self._clock)

    def rule_changed(self, state: ModelState) -> None:
        self._pump(state)

    def priorities_changed(self, state: ModelState) -> None:
        """Read from the state at each request: nothing to push."""

    def model_changed(self, name: str) -> None:
        """Its config is read again at the model's next request."""

    def hold(self, name: str, max_batch: int, budget_s: float) -> None:
        """Its callers already wait for the model's state, which is there once the sweep is done."""

    # -- life cycle --------------------------------------------------------------------------
    async def ready(self) -> None:
        """Start-up done: profile the ``profile: auto`` models now rather than at their first request."""
        self.registry.preload_auto_profiles()

    async def sync(self) -> None:
        """Everything this plane did is already in the registry's stats: nothing to wait for."""

    def died(self) -> asyncio.Future | None:
        """The Python plane runs in this process: it does not die apart from it."""
        return None

    async def close(self) -> None:
        for state in self.registry.models().values():
            if state.timer:
                state.timer.cancel()
        await asyncio.sleep(0)  # a batch's accounting, queued behind its answers
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- inference ---------------------------------------------------------------------------
    async def infer(self, request: service_pb2.ModelInferRequest, wire: bytes | None = None
                    ) -> service_pb2.ModelInferResponse | bytes:
        """One caller's request, answered exactly once (a response, or GateError).

        ``wire``: the request's bytes as the caller sent them, where the caller can take the answer as
        bytes too (the gRPC servicer). A request that goes to Triton as it came (its model unknown or
        ungated) or alone (``_serve_alone``) is then sent as these bytes, and Triton's answer is
        returned as Triton's bytes: no protobuf encoding either way, and the caller gets Triton's answer
        byte for byte. Without it (HTTP, streams) every answer is a message.

        The bookkeeping of an answer (the batch's completion epoch, the latency statistics, metrics,
        the controller's observers) runs just after the answer leaves, on the event loop's next turn
        (``_batch_ended``, ``_answered``): off the caller's latency, and before the loop takes up any
        event that came in meanwhile (its callbacks queue behind).
        """
        # A model already known is looked up without a coroutine (the registry's fetch is for the first)
        state = self.registry.get(request.model_name, request.model_version)
        if state is None:
            state = await self.registry.model_state(request.model_name, request.model_version)
        if state is None:
            response = await self._as_it_came(request, wire)
            self.registry.known_again(request.model_name, request.model_version)
            return response
        if state.gate is None:
            return await self._as_it_came(request, wire)
        inputs = request.inputs
        shape = inputs[0].shape if inputs else None
        rows = int(shape[0]) if shape else 1
        key = merge_key(request)
        try:
            model = (state.name, state.version)
            validator = self._validators.get(model)
            if validator is None or validator.config is not state.config:
                validator = self._validators[model] = RequestValidator(state.config)
            validator.check_shaped(request, key, rows)
        except MalformedRequest:
            return await self._relay_refused(state, request, wire)
        now = self._clock()
        priority = state.default_priority
        deadline = None
        params = request.parameters
        if not params:
            # An idle gate the rule lets serve this request now, alone: no queue entry, no batch
            why = state.gate.serve_alone(now)
            if why is not None:
                if state.controller is not None:
                    state.controller.observe_arrival(now)
                self.metrics.request_arrived(state.name)
                return await self._serve_alone(state, request, wire, rows, now, why)
        else:
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
        call = _Call(request, self._loop.create_future())
        item = Pending(
            key=key,
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
                await self._dispatch(state, alone, now, inline=True)
            response = await call.future
            self._loop.call_soon(self._answered, state, now, self._clock() - now)
            return response
        except GateError as exc:
            self.metrics.request_answered(state.name, exc.code, self._clock() - now)
            raise
        except asyncio.CancelledError:
            state.gate.cancel(item)  # still waiting: frees its place; dispatched: the batch runs on
            raise

    def _as_it_came(self, request: service_pb2.ModelInferRequest, wire: bytes | None
                    ) -> Coroutine[None, None, service_pb2.ModelInferResponse | bytes]:
        """Triton's answer to the request sent on unchanged: its bytes where the caller gave them
        (Triton's answer as bytes), else the message."""
        return self.upstream.call(request) if wire is None else self.upstream.relay(wire)

    async def _serve_alone(self, state: ModelState, request: service_pb2.ModelInferRequest, wire: bytes | None,
                           rows: int, arrival: float, why: str) -> service_pb2.ModelInferResponse | bytes:
        """A request the gate serves alone at its arrival (``ModelGate.serve_alone``; the request has no
        parameters): sent to Triton from its caller's coroutine as a plain relay sends it, the one
        stamp being the sidecar's dispatch priority. With its bytes (``wire``) it is sent as those bytes,
        the stamp appended as its encoding (``priority_wire``: a map entry that follows the request's
        own fields parses as one more entry, and the request has none), and Triton's answer comes back
        as bytes. Its batch's and its answer's accounting run in one
        callback on the loop's next turn (``_alone_done``), after the answer has gone. Should the caller
        go away while Triton works, the call runs on and is accounted for when it ends (its slot stays
        taken until then), as any batch in flight."""
        # Written out rather than through the functions the batch path uses (``_dispatch_level``, ``_done``):
        # on a machine whose caches other processes fill between requests, each further Python function
        # a request passes through costs microseconds (docs/notes/issue-16.md, ninth round).
        config = self.config
        level = config.dispatch_priority
        stamp = level and level <= state.priority_levels
        if wire is None:
            if stamp:
                request.parameters["priority"].uint64_param = level
            send, sent = self.upstream.infer, request
        else:
            send, sent = self.upstream.infer_wire, wire + self._stamp_wire if stamp else wire
        start = self._clock()
        upstream = send(sent, timeout=config.upstream_timeout_s)
        if type(upstream) is CoroutineType:  # a stand-in for the channel (tests)
            upstream = self._loop.create_task(upstream)
        ended = self._loop.create_future()
        upstream.add_done_callback(lambda _c: ended.done() or ended.set_result(None))
        try:
            await ended  # cancelling this wait leaves the upstream call running
        except asyncio.CancelledError:
            self._spawn(self._alone_on(state, upstream, rows, arrival, start, why))
            raise
        error = None
        try:
            response = await self.upstream.answer(upstream)
        except Exception as exc:  # never leave a caller without an answer
            error = self._failure(state, exc)
        end = self._clock()
        if error is None:
            self._loop.call_soon(self._alone_done, state, rows, why, arrival, start, end, grpc.StatusCode.OK)
            return response
        state.stats.failed_requests += 1
        self._loop.call_soon(self._alone_done, state, rows, why, arrival, start, end, error.code)
        raise error

    async def _alone_on(self, state: ModelState, upstream: grpc.aio.UnaryUnaryCall, rows: int, arrival: float,
                        start: float, why: str) -> None:
        """The rest of ``_serve_alone`` once its caller went away: accounted for when Triton is done."""
        try:
            await self.upstream.answer(upstream)
        except Exception as exc:
            self._failure(state, exc)
            state.stats.failed_requests += 1
        self._alone_done(state, rows, why, arrival, start, self._clock(), None)

    def _alone_done(self, state: ModelState, rows: int, why: str, arrival: float, start: float, end: float,
                    answer: grpc.StatusCode | None) -> None:
        """A request served alone ended at ``end``: what ``_batch_done`` and ``_answered`` (or the error's
        count) do for a batch of one, and the dispatch's metrics. ``answer``: the caller's status, OK
        for a response; None when the caller went away first (no answer counted)."""
        stats = state.stats
        stats.record_lag(start - arrival)
        elapsed = end - start
        stats.record(rows, elapsed)
        controller = state.controller
        if controller is not None:
            controller.observe_batch(rows, elapsed, stats.failed_requests)
        stats.answered += 1
        latency = end - arrival
        if answer is grpc.StatusCode.OK:
            answer = "OK"  # the metrics' label as text: a str is hashed in C, a StatusCode (an Enum) in Python
            stats.latency_sum_s += latency
            stats.latency_n += 1
            if controller is not None:
                controller.observe_latency(end, latency)
        self.metrics.request_alone(state.name, rows, why, elapsed, answer, latency)
        if state.gate.complete():  # anything queued meanwhile: decide now
            self._pump(state, epoch=end)

    def _dispatch_level(self, state: ModelState) -> int | None:
        """The priority the sidecar gives a request (or batch) that names none: its dispatch priority,
        where the model has that level."""
        dispatch = self.config.dispatch_priority
        return dispatch if dispatch and dispatch <= state.priority_levels else None

    def _answered(self, state: ModelState, arrival: float, latency: float) -> None:
        """A response's accounting: its arrival-to-answer time in the statistics, the controller and metrics."""
        state.stats.latency_sum_s += latency
        state.stats.latency_n += 1
        if state.controller is not None:
            state.controller.observe_latency(arrival + latency, latency)
        self.metrics.request_answered(state.name, "OK", latency)

    async def _relay_refused(self, state: ModelState, request: service_pb2.ModelInferRequest, wire: bytes | None
                             ) -> service_pb2.ModelInferResponse | bytes:
        """A request the model's config says Triton refuses: sent to Triton alone and ungated (it must
        not fail a merged batch), so that its caller gets Triton's own code and message. Should Triton
        serve it after all, the sidecar's copy of the config is stale: it is read again."""
        try:
            response = await self._as_it_came(request, wire)
        except GateError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                self.metrics.request_rejected(state.name, "invalid_argument")
            raise
        if self.registry.config_stale(state):
            log.info("Triton served a request model %s's config refuses: reading its config again", state.name)
            self.registry.model_changed(state.name)
        return response

    def _pump(self, state: ModelState, arrived: Pending | None = None, epoch: float | None = None
              ) -> tuple[Pending, ...] | None:
        """One decision epoch: carry out what the gate decides now, and arm its timer.

        ``arrived``: the request whose arrival this epoch is. When the gate serves it alone, now, that
        batch is returned instead of given a task: its caller's coroutine dispatches it (``infer``).
        ``epoch``: when the completion this epoch is was clocked (None: now, or the arrival's time);
        what the gate sends is dispatched that much later (``BatchStats.lag_s``).
        """
        step = state.gate.poll()
        decided = arrived.arrival if arrived is not None else self._clock() if epoch is None else epoch
        for item in step.expired:
            self._fail(item.payload, GateError(grpc.StatusCode.UNAVAILABLE, "Request timeout expired"))
        alone = None
        for batch, why in zip(step.batches, step.reasons):
            self.metrics.batch_dispatched(state.name, sum(p.rows for p in batch), why)
            if arrived is not None and len(batch) == 1 and batch[0] is arrived:
                alone = batch
                continue
            self._spawn(self._dispatch(state, batch, decided))
        if step.wake_at is not None and (state.timer_at is None or step.wake_at < state.timer_at):
            if state.timer:
                state.timer.cancel()
            state.timer_at = step.wake_at
            state.timer = self._loop.call_at(step.wake_at, self._on_timer, state)
        return alone

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
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
            level = self._dispatch_level(state)
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

    async def _dispatch(self, state: ModelState, batch: tuple[Pending, ...], decided: float,
                        inline: bool = False) -> None:
        """Send one batch to Triton and answer its members; then free its slot and pump.

        ``decided``: the decision epoch (the arrival or completion the gate decided the batch at; its
        slot is taken from then on): the time until this dispatch is the gate's turnaround, counted
        apart from dispatch-to-completion (``BatchStats.lag_s``).
        ``inline``: run by the one member's own caller (see ``_pump``). Should that caller go away
        while Triton works, the batch runs on in a task, as it would have in its own task.
        """
        calls: list[_Call] = [p.payload for p in batch]
        start = self._clock()
        state.stats.record_lag(start - decided)
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
                self._batch_ended(state, calls, rows, start)

    async def _run_on(
        self, state: ModelState, calls: list[_Call], rows: int, start: float, upstream: grpc.aio.UnaryUnaryCall
    ) -> None:
        """The rest of an inline dispatch whose caller went away: its batch completes as any other."""
        try:
            self._succeed(calls[0], await self.upstream.answer(upstream))
        except Exception as exc:
            self._batch_failed(state, calls, exc)
        finally:
            self._batch_ended(state, calls, rows, start)

    def _batch_failed(self, state: ModelState, calls: list[_Call], exc: Exception) -> None:
        """Every member of a failed batch gets its one answer: the error."""
        error = self._failure(state, exc)
        state.stats.failed_requests += len(calls)
        for call in calls:
            self._fail(call, error)

    def _failure(self, state: ModelState, exc: Exception) -> GateError:
        """What the callers of a failed dispatch get for ``exc``."""
        if isinstance(exc, GateError):
            return self._upstream_error(state, exc)
        if isinstance(exc, MalformedRequest):
            return GateError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.error("dispatch failed", exc_info=exc)
        return GateError(grpc.StatusCode.INTERNAL, f"sidecar error: {exc}")

    def _batch_ended(self, state: ModelState, calls: list[_Call], rows: int, start: float) -> None:
        """A batch ended, its members answered: clocked now, accounted for on the loop's next turn, after
        the answers have gone (their callers' wake-ups are queued already, these go behind them)."""
        self._loop.call_soon(self._batch_done, state, calls, rows, start, self._clock())

    def _batch_done(self, state: ModelState, calls: list[_Call], rows: int, start: float, end: float) -> None:
        """A batch ended at ``end``, answered or failed: account for it, free its slot, and decide again."""
        elapsed = end - start
        state.stats.record(rows, elapsed)
        if state.controller is not None:  # learns tau(b); a batch that raised the failure count is skipped
            state.controller.observe_batch(rows, elapsed, state.stats.failed_requests)
        self.metrics.batch_completed(state.name, rows, elapsed)
        state.stats.answered += len(calls)
        if state.gate.complete():  # with nothing waiting the gate has nothing to decide or expire
            self._pump(state, epoch=end)

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
