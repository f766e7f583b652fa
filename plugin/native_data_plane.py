"""The native data plane as the sidecar drives it: ``smdp-gate`` carries inference, this side gives
each model's gate its rule (a ``NativeGateView`` pushes it) and turns what the gate reports (typed
``GateEvent``s, plugin/native_plane.py) into the same bookkeeping the Python plane does inline:
the registry's stats, each controller's estimator and learner, and the metrics."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable, Coroutine

import grpc
from tritonclient.grpc import service_pb2

from solver.policy import BatchRule

from .config import SidecarConfig
from .metrics import SidecarMetrics
from .native_plane import (
    Arrivals, BatchDone, BatchesDone, Counters, GateEvent, Loaded, Lost, NativeGateView, NativePlane, NativePlaneError, Seen,
    forget_line, in_arrival_order, monotonic_offset,
)
from .registry import ModelRegistry, ModelState
from .upstream import GateError, Upstream

log = logging.getLogger("smdp.sidecar")

_STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


class NativeDataPlane:
    """One ``smdp-gate`` process serving inference on the sidecar's address, driven from here."""

    def __init__(self, config: SidecarConfig, registry: ModelRegistry, upstream: Upstream, metrics: SidecarMetrics,
                 clock: Callable[[], float], deny: tuple[str, ...]) -> None:
        self.config = config
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self._clock = clock
        self._deny = deny
        self._loop = asyncio.get_running_loop()
        self._gate: NativePlane | None = None
        self._views: dict[str, NativeGateView] = {}
        """Each gated model's view of its native gate, by name (the gate knows no versions)."""
        self._loading: set[str] = set()
        self._last_arrival: dict[str, float] = {}
        """Models whose config is being read because of a gate's event (one read at a time each)."""
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    async def start(self) -> int:
        """Start ``smdp-gate`` on ``config.listen``; returns the port it bound."""
        config = self.config
        self._gate = await NativePlane.start(
            listen=config.listen, triton_url=config.triton_url, max_queue=config.max_queue,
            on_event=self._on_event, binary=config.native_binary,
            upstream_timeout_s=config.upstream_timeout_s, deny=self._deny,
            report_interval_ms=config.native_report_interval_s * 1e3,
        )
        return self._gate.port

    def _process(self) -> NativePlane:
        if self._gate is None:
            raise NativePlaneError("smdp-gate is not started")
        return self._gate

    # -- what the registry asks of the plane -------------------------------------------------
    def new_gate(self, name: str, rule: BatchRule, *, slots: int, max_rows: int, default_priority: int,
                 priority_levels: int) -> NativeGateView:
        view = NativeGateView(
            name, self._process().send, rule, slots=slots, max_queue=self.config.max_queue,
            default_priority=default_priority, priority_levels=priority_levels,
            dispatch_priority=self.config.dispatch_priority,
        )
        self._views[name] = view
        return view

    def rule_changed(self, state: ModelState) -> None:
        """The view pushed the new rule to the gate, which decides with it from its next epoch."""

    def priorities_changed(self, state: ModelState) -> None:
        view = self._views.get(state.name)
        if view is not None and view is state.gate:
            view.set_priorities(state.default_priority, state.priority_levels)

    def model_changed(self, name: str) -> None:
        """The native gate keeps its policy until the new one."""
        if not self._closing:
            self._relearn_soon(name)

    def hold(self, name: str, max_batch: int, budget_s: float) -> None:
        """The gate relays a model without a policy: give it one that holds (``auto_profile.hold_rule``)."""
        from .auto_profile import hold_line

        self._process().send(hold_line(name, max_batch, self.config.max_queue, budget_s))

    # -- life cycle --------------------------------------------------------------------------
    async def ready(self) -> None:
        """Gate the models Triton has ready before the first request: the native gate relays a model
        ungated until its policy arrives, so waiting for first traffic would let a burst through ungated.
        Best effort: with Triton away, models are gated as their first requests are seen."""
        try:
            resp = await self.upstream.repository_index(service_pb2.RepositoryIndexRequest(ready=True),
                                                        timeout=self.config.upstream_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.info("Triton's repository index is not available (%s): models are gated as they are seen",
                     exc.code().name)
            return
        for model in resp.models:
            if model.state == "READY" and self.registry.get(model.name, "") is None:
                await self._load(model.name)

    async def sync(self) -> None:
        """Return once everything the gate did before this call is in the registry's stats and counters
        (it reports every ``native_report_interval_s`` otherwise): for status reads that must be exact."""
        await self._process().sync(10.0)

    def died(self) -> asyncio.Future | None:
        """Resolves with the gate's exit status should it end before ``close``."""
        return self._gate.exited if self._gate is not None else None

    async def close(self) -> None:
        self._closing = True
        if self._gate is not None:
            await self._gate.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- what the gate reports ---------------------------------------------------------------
    def _on_event(self, event: GateEvent) -> None:
        """Each event by its type; the bookkeeping is the Python gate's own (``PythonPlane``)."""
        kind = type(event)
        if kind is Counters:
            self._counters(event)
        elif kind is Arrivals:
            self._arrivals(event)
        elif kind is BatchesDone:
            self._batches_done(event)
        elif kind is BatchDone:
            self._batches_done(BatchesDone.of(event))
        elif self._closing:
            return
        elif kind is Seen:
            self._seen(event)
        elif kind is Lost:
            self._lost(event)
        elif kind is Loaded:
            self.registry.model_changed(event.model)

    def _seen(self, event: Seen) -> None:
        """A model the gate relays ungated: read its config and push its policy (once it batches).
        The gate reports an ungated model with traffic again every second, so a failed load is retried."""
        name = event.model
        if self.registry.get(name, "") is not None or name in self._loading:
            return
        self._loading.add(name)
        self._spawn(self._load_once(name))

    def _lost(self, event: Lost) -> None:
        """Triton no longer knows a gated model (restarting, or unloaded): as the Python plane does on
        NOT_FOUND, forget its config and read it again. Meanwhile the gate keeps gating with the policy
        it has and answers UNAVAILABLE for what Triton refuses."""
        state = self.registry.get(event.model, "")
        if state is not None:
            self.registry.forget(state)
        self._relearn_soon(event.model)

    def _batches_done(self, rep: BatchesDone) -> None:
        """A report's batches, in completion order: each batch and answer booked as the Python gate
        books it, the metrics once per report (``SidecarMetrics.batches_done``, ``requests_answered``)."""
        state = self.registry.get(rep.model, "")
        if state is None:
            return
        stats, controller = state.stats, state.controller
        answered_at = self._clock()
        completed: list[float] = []  # latencies of the requests answered OK
        failed: dict[int, list[float]] = {}
        first = 0
        for size, rows, elapsed, code in zip(rep.sizes, rep.rows, rep.elapsed, rep.codes):
            latencies = [wait + elapsed for wait in rep.waits[first:first + size]]
            first += size
            if code != 0:
                stats.failed_requests += size
            stats.record(rows, elapsed)
            if controller is not None:
                controller.observe_batch(rows, elapsed, stats.failed_requests)
            stats.answered += size
            if code == 0:  # completed: answered OK, as the Python gate counts them
                stats.latency_sum_s += sum(latencies)
                stats.latency_n += size
                if controller is not None:
                    for latency in latencies:
                        controller.observe_latency(answered_at, latency)
                completed += latencies
            else:
                failed.setdefault(code, []).extend(latencies)
        self.metrics.batches_done(state.name, rep.rows, rep.whys, rep.elapsed)
        self.metrics.requests_answered(state.name, "OK", completed)
        for number, latencies in failed.items():
            self.metrics.requests_answered(state.name, _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN),
                                           latencies)

    def _arrivals(self, event: Arrivals) -> None:
        state = self.registry.get(event.model, "")
        if state is None or state.gate is None:
            return
        if not event.times:
            return
        offset = monotonic_offset(self._clock)
        after = self._last_arrival.get(event.model, -math.inf)
        if state.controller is None:  # only counted: no estimator needs them in order
            self._last_arrival[event.model] = max(after, max(event.times) + offset)
        else:
            times = in_arrival_order((t + offset for t in event.times), after)
            self._last_arrival[event.model] = times[-1]
            for t in times:
                state.controller.observe_arrival(t)
        self.metrics.request_arrived(state.name, len(event.times))

    def _counters(self, event: Counters) -> None:
        state = self.registry.get(event.model, "")
        view = self._views.get(event.model)
        if state is None or view is None or state.gate is not view:
            return
        grown = view.update(event.values)
        # as the Python gate counts them: refusals before queueing (expiry is an answer, not a refusal)
        for reason, key in (("queue_full", "rejected"), ("invalid_argument", "invalid")):
            for _ in range(max(grown.get(key, 0), 0)):
                self.metrics.request_rejected(state.name, reason)

    # -- reading a model's config again ------------------------------------------------------
    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _relearn_soon(self, name: str) -> None:
        if name not in self._loading:
            self._loading.add(name)
            self._spawn(self._relearn(name))

    async def _relearn(self, name: str, retry_s: float = 0.5, give_up_s: float = 600.0) -> None:
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
                if state is None:
                    self._views.pop(name, None)
                    self._process().send(forget_line(name))
                return
            if not self._closing:
                log.warning("model %s did not come back within %.0f s", name, give_up_s)
        finally:
            self._loading.discard(name)

    async def _load(self, name: str) -> None:
        try:
            await self.registry.model_state(name, "")
        except GateError as exc:
            log.warning("cannot gate model %s yet: %s", name, exc.details)
            if name not in self._views and not self._closing:  # no gate after all: release what a hold keeps
                self._process().send(forget_line(name))

    async def _load_once(self, name: str) -> None:
        try:
            await self._load(name)
        finally:
            self._loading.discard(name)
