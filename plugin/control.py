"""The operator's control API (``smdp.v1.Control``), written against a small backend protocol.

The sidecar implements ``ControlBackend``; this module owns everything between it and the wire:
the bearer-token check, validation (a bad value changes nothing and is INVALID_ARGUMENT, an unknown
model NOT_FOUND), the conversion of typed status records into messages, and the status stream.
Backend methods may be plain or ``async``; they run on the server's event loop, so a plain one
must not block.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import ipaddress
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import grpc

from plugin.loop.rate import RateEstimate
from solver import quantities
from solver.model import ModelError
from solver.slo import SloTarget
from smdp.v1 import smdp_pb2, smdp_pb2_grpc

log = logging.getLogger("smdp.control")

SERVICE_NAME = smdp_pb2.DESCRIPTOR.services_by_name["Control"].full_name
MIN_WATCH_INTERVAL_S = 0.01
DEFAULT_WATCH_INTERVAL_S = 1.0


# ---------------------------------------------------------------------------------------------------
# What the backend reports
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """W, P and J = W + w P of one source (the solver's prediction, or the gate's measurement)."""

    mean_latency_s: float
    mean_power_w: float
    cost: float
    throughput_rps: float = 0.0
    mean_batch: float = 0.0

    def message(self) -> smdp_pb2.Figures:
        return smdp_pb2.Figures(
            mean_latency_s=self.mean_latency_s, mean_power_w=self.mean_power_w, cost=self.cost,
            throughput_rps=self.throughput_rps, mean_batch=self.mean_batch,
        )


@dataclass(frozen=True)
class ServiceTimeInfo:
    """tau(b) at one batch size as the sidecar knows it, seconds; see ``ServiceTime`` in the proto."""

    batch_size: int
    samples: int
    mean_s: float | None
    """Mean dispatch-to-completion time of the ``samples`` batches; None (or NaN) when there are none."""
    ci_s: float | None
    """Half-width of that mean's confidence interval; None (or inf/NaN) with fewer than 2 batches."""
    prior_s: float
    in_force_s: float
    triton_compute_s: float | None = None
    triton_batches: int = 0

    def message(self) -> smdp_pb2.ServiceTime:
        msg = smdp_pb2.ServiceTime(batch_size=self.batch_size, samples=self.samples, prior_s=self.prior_s,
                                   in_force_s=self.in_force_s, triton_batches=self.triton_batches)
        if self.mean_s is not None and math.isfinite(self.mean_s):
            msg.mean_s = self.mean_s
        if self.ci_s is not None and math.isfinite(self.ci_s):
            msg.ci_s = self.ci_s
        if self.triton_compute_s is not None and math.isfinite(self.triton_compute_s):
            msg.triton_compute_s = self.triton_compute_s
        return msg


@dataclass(frozen=True)
class SloStatusInfo:
    """A model's tail-latency SLO and how it fares; see ``SloStatus`` in the proto."""

    quantile: float
    latency_s: float
    feasible: bool
    predicted_quantile_s: float | None = None
    predicted_ci95_s: float | None = None
    measured_quantile_s: float | None = None
    attainment: float | None = None
    samples: int = 0
    max_wait_s: float | None = None
    margin_s: float = 0.0
    correction_s: float = 0.0
    stall_held_up: int = 0
    stalled_s: float = 0.0
    correction_with_stalls_s: float | None = None
    derived_bound: str = ""

    def message(self) -> smdp_pb2.SloStatus:
        msg = smdp_pb2.SloStatus(quantile=self.quantile, latency_s=self.latency_s, feasible=self.feasible,
                                 samples=self.samples, margin_s=self.margin_s, correction_s=self.correction_s,
                                 stall_held_up=self.stall_held_up, stalled_s=self.stalled_s,
                                 derived_bound=self.derived_bound)
        for name in ("predicted_quantile_s", "predicted_ci95_s", "measured_quantile_s", "attainment", "max_wait_s",
                     "correction_with_stalls_s"):
            value = getattr(self, name)
            if value is not None and math.isfinite(value):
                setattr(msg, name, value)
        return msg


@dataclass(frozen=True)
class ModelStatusInfo:
    """One model's state as the sidecar sees it; see ``ModelStatus`` in the proto for each field."""

    model: str
    weight: float
    max_batch: int
    policy_version: int
    policy_age_s: float
    policy_source: str
    rate: RateEstimate | None = None
    latency_target_s: float | None = None
    threshold: int | None = None
    predicted: Figures | None = None
    predicted_rate_rps: float = 0.0
    measured: Figures | None = None
    batch_histogram: Sequence[int] = field(default_factory=tuple)
    """Entry b counts batches of b requests (entry 0 unused)."""
    queue_length: int = 0
    in_flight: int = 0
    instances: int = 1
    """k: model instances the gate fills; the policy a(n, m) sees m = ``in_flight``."""
    devices: int = 1
    """D: the devices those instances draw idle power on (``plugin.placement``)."""
    completed: int = 0
    rejected: int = 0
    """Refused because the queue was full."""
    failed: int = 0
    solver_reachable: bool = False
    power_modelled: bool = True
    note: str = ""
    service_times: Sequence[ServiceTimeInfo] = field(default_factory=tuple)
    profile_updates: int = 0
    profile_batches: int = 0
    profile_learning: bool = False
    rejected_expired: int = 0
    rejected_invalid: int = 0
    slo: SloStatusInfo | None = None
    batch_mean_s: Sequence[float] = field(default_factory=tuple)
    """Entry b: mean dispatch-to-completion time of the batches ``batch_histogram`` entry b counts (0: none)."""
    dispatch_lag: tuple[int, float] | None = None
    """(batches, mean decision-to-dispatch time in seconds); None where the plane does not measure it."""

    def message(self) -> smdp_pb2.ModelStatus:
        msg = smdp_pb2.ModelStatus(
            model=self.model,
            weight=self.weight,
            policy_version=self.policy_version,
            policy_age_s=self.policy_age_s,
            policy_source=self.policy_source,
            max_batch=self.max_batch,
            predicted_rate_rps=self.predicted_rate_rps,
            batch_histogram=[int(x) for x in self.batch_histogram],
            queue_length=self.queue_length,
            in_flight=self.in_flight,
            instances=self.instances,
            devices=self.devices,
            completed=self.completed,
            rejected=self.rejected,
            failed=self.failed,
            solver_reachable=self.solver_reachable,
            power_modelled=self.power_modelled,
            note=self.note,
            service_times=[t.message() for t in sorted(self.service_times, key=lambda t: t.batch_size)],
            profile_updates=self.profile_updates,
            profile_batches=self.profile_batches,
            profile_learning=self.profile_learning,
            rejected_expired=self.rejected_expired,
            rejected_invalid=self.rejected_invalid,
            batch_mean_s=[float(x) for x in self.batch_mean_s],
        )
        if self.dispatch_lag is not None:
            msg.dispatch_lag.CopyFrom(smdp_pb2.DispatchLag(batches=self.dispatch_lag[0], mean_s=self.dispatch_lag[1]))
        if self.rate is not None:
            r = self.rate
            msg.rate.CopyFrom(smdp_pb2.RateEstimate(
                rate_rps=r.rate, lo_rps=r.lo, hi_rps=r.hi, confidence=r.confidence, arrivals=r.n, span_s=r.span_s))
        if self.latency_target_s is not None:
            msg.latency_target_s = self.latency_target_s
        if self.threshold is not None:
            msg.threshold = self.threshold
        if self.predicted is not None:
            msg.predicted.CopyFrom(self.predicted.message())
        if self.measured is not None:
            msg.measured.CopyFrom(self.measured.message())
        if self.slo is not None:
            msg.slo.CopyFrom(self.slo.message())
        return msg


@dataclass(frozen=True)
class PolicyInfo:
    """The rule in force: a table a(n) (empty for a rule that is not one, e.g. Triton's timeout)."""

    actions: Sequence[int]
    max_batch: int
    version: int
    age_s: float
    source: str
    threshold: int | None = None
    busy_tables: Sequence[Sequence[int]] = ()
    """k instances: a(n, m) for m = 1, 2, ... (``actions`` is m = 0); empty when the rule ignores m."""
    group_hold_s: float | None = None
    """The gate's hold for the rest of a group, seconds, where it holds (``solver.policy.GroupHold``)."""

    def message(self, model: str) -> smdp_pb2.PolicyReply:
        msg = smdp_pb2.PolicyReply(
            model=model, actions=[int(a) for a in self.actions], max_batch=self.max_batch,
            version=self.version, age_s=self.age_s, source=self.source,
            busy_tables=[smdp_pb2.BusyRow(actions=[int(a) for a in row]) for row in self.busy_tables],
        )
        if self.threshold is not None:
            msg.threshold = self.threshold
        if self.group_hold_s is not None:
            msg.group_hold_s = self.group_hold_s
        return msg


class UnknownModel(KeyError):
    """The backend has no model of that name (answered as NOT_FOUND)."""


class ControlBackend(Protocol):
    """What the sidecar provides to the control API. Methods may be ``async``.

    ``set_weight``, ``set_latency_target`` and ``set_slo`` receive values already validated here; they may still
    raise ValueError (for example a latency target no weight can meet), which becomes
    INVALID_ARGUMENT, or UnknownModel, which becomes NOT_FOUND.
    """

    def models(self) -> Sequence[str]: ...

    def status(self, model: str) -> ModelStatusInfo: ...

    def set_weight(self, model: str, weight: float) -> None: ...

    def set_latency_target(self, model: str, target_s: float | None) -> None: ...

    def set_slo(self, model: str, target: SloTarget | None) -> None: ...

    def policy(self, model: str) -> PolicyInfo: ...


# ---------------------------------------------------------------------------------------------------
# Servicer
# ---------------------------------------------------------------------------------------------------


async def _call(fn: Any, *args: Any) -> Any:
    out = fn(*args)
    if inspect.isawaitable(out):
        out = await out
    return out


class ControlServicer(smdp_pb2_grpc.ControlServicer):
    """``smdp.v1.Control`` for grpc.aio; every call is authenticated first, then validated."""

    def __init__(self, backend: ControlBackend, token: str | None = None) -> None:
        if token is not None and not token.strip():
            raise ValueError("control token must be a non-empty string (or None for no authentication)")
        self._backend = backend
        self._token = None if token is None else f"Bearer {token}".encode()

    # -- checks ---------------------------------------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._token is None:
            return
        given = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if not given:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        value = given[0].encode() if isinstance(given[0], str) else bytes(given[0])
        if not hmac.compare_digest(value, self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")

    async def _model(self, name: str, context: grpc.aio.ServicerContext) -> str:
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model name is required")
        if name not in set(await _call(self._backend.models)):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")
        return name

    async def _backend_call(self, context: grpc.aio.ServicerContext, fn: Any, *args: Any) -> Any:
        try:
            return await _call(fn, *args)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {exc.args[0]!r}" if exc.args else "unknown model")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _status(self, model: str, context: grpc.aio.ServicerContext) -> smdp_pb2.ModelStatus:
        info: ModelStatusInfo = await self._backend_call(context, self._backend.status, model)
        return info.message()

    # -- RPCs -----------------------------------------------------------------------------------

    async def ListModels(self, request, context):
        await self._authorize(context)
        return smdp_pb2.ListModelsReply(models=sorted(await _call(self._backend.models)))

    async def SetWeight(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        try:
            w = quantities.weight(request.weight)
        except ModelError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._backend_call(context, self._backend.set_weight, model, float(w))
        return await self._status(model, context)

    async def SetLatencyTarget(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        t = request.target_s
        if not math.isfinite(t) or t <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"latency target must be a finite number of seconds > 0, got {t!r}")
        await self._backend_call(context, self._backend.set_latency_target, model, float(t))
        return await self._status(model, context)

    async def ClearLatencyTarget(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        await self._backend_call(context, self._backend.set_latency_target, model, None)
        return await self._status(model, context)

    async def SetSlo(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        try:
            target = SloTarget(request.quantile, request.latency_s, request.margin_s)
        except ModelError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._backend_call(context, self._backend.set_slo, model, target)
        return await self._status(model, context)

    async def ClearSlo(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        await self._backend_call(context, self._backend.set_slo, model, None)
        return await self._status(model, context)

    async def GetStatus(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        return await self._status(model, context)

    async def GetPolicy(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        info: PolicyInfo = await self._backend_call(context, self._backend.policy, model)
        return info.message(model)

    async def WatchStatus(self, request, context):
        await self._authorize(context)
        model = await self._model(request.model, context)
        interval = request.interval_s or DEFAULT_WATCH_INTERVAL_S
        if not math.isfinite(interval) or interval < MIN_WATCH_INTERVAL_S:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"interval_s must be >= {MIN_WATCH_INTERVAL_S} seconds (0 = {DEFAULT_WATCH_INTERVAL_S}), "
                                f"got {request.interval_s!r}")
        sent = 0
        while True:
            if model not in set(await _call(self._backend.models)):
                await context.abort(grpc.StatusCode.NOT_FOUND, f"model {model!r} is no longer served")
            yield await self._status(model, context)
            sent += 1
            if request.max_updates and sent >= request.max_updates:
                return
            await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------


def add_control_service(server: grpc.aio.Server, backend: ControlBackend, token: str | None = None) -> str:
    """Add the control service to an existing grpc.aio server (the sidecar's); returns its full name."""
    smdp_pb2_grpc.add_ControlServicer_to_server(ControlServicer(backend, token), server)
    return SERVICE_NAME


def is_loopback_address(address: str) -> bool:
    """True when a gRPC listen address can only be reached from this host.

    Loopback IPs (127.0.0.0/8, ::1), ``localhost`` and Unix sockets are; a wildcard (0.0.0.0, ::,
    an empty host) and any other address or host name are not.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(address: str, token: str | None) -> bool:
    """Log a warning when the control API listens beyond this host without a token; returns whether it did."""
    if token is not None or is_loopback_address(address):
        return False
    log.warning(
        "control API on %s has no token: anyone who can reach that address can change the trade-off "
        "weight and latency target of every model. Set control_token (SMDP_SIDECAR_CONTROL_TOKEN, "
        "--control-token) or bind control_listen to 127.0.0.1", address)
    return True


async def start_control_server(
    backend: ControlBackend, address: str = "127.0.0.1:0", token: str | None = None
) -> tuple[grpc.aio.Server, int]:
    """A stand-alone control server with health checking and reflection; returns (server, port).

    Call from a running event loop; stop with ``await server.stop(grace)``. Raises OSError if the
    address cannot be bound.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import SERVICE_NAME as HEALTH_NAME
    from grpc_health.v1.health import aio as health_aio
    from grpc_reflection.v1alpha import reflection

    warn_if_exposed(address, token)
    server = grpc.aio.server()
    add_control_service(server, backend, token)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port
