"""The sidecar's front: Triton's own gRPC inference service and the start-up that wires its parts.

``Sidecar`` wires the parts: ``Upstream`` (plugin/upstream.py, the channel to Triton), the metrics,
``ModelRegistry`` (plugin/registry.py: each model's config, gate, rule and controller) and the
``DataPlane`` that carries inference: ``PythonPlane`` (plugin/python_plane.py: the gate decides in
this process, batches are merged and split here) or ``NativeDataPlane`` (plugin/native_data_plane.py:
``smdp-gate`` serves inference, this process keeps control). With the Python plane, ``_Servicer``
serves ``ModelInfer`` and ``ModelStreamInfer`` through the plane; every other RPC is relayed to Triton
as raw bytes (no parse, no re-encode), so any KServe v2 / tritonclient call works by changing only
the URL.

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
from typing import Any, AsyncIterator, Callable, Protocol

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2

from .config import SidecarConfig
from .metrics import SidecarMetrics, latency_buckets_with
from .native_data_plane import NativeDataPlane
from .native_plane import choose_plane
from .python_plane import PythonPlane
from .registry import GatePlane, ModelRegistry, consume
from .repository_control import REPOSITORY_CONTROL as _REPOSITORY_CONTROL, refused_message
from .upstream import CHANNEL_OPTIONS, SERVICE, GateError, Upstream

log = logging.getLogger("smdp.sidecar")

_SERVICE_DESC = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_GATED = {"ModelInfer", "ModelStreamInfer"}


class DataPlane(GatePlane, Protocol):
    """What carries inference (``PythonPlane``, ``NativeDataPlane``): the registry's gates, and a life cycle."""

    async def ready(self) -> None:
        """Start-up is done: gate what should be gated before its first request."""
        ...

    async def sync(self) -> None:
        """Return once everything the plane did so far is in the registry's stats and counters."""
        ...

    def died(self) -> asyncio.Future | None:
        """A future that ends should the plane stop carrying inference on its own (None: it cannot)."""
        ...

    async def close(self) -> None: ...


class Sidecar:
    """The sidecar's parts, wired: the channel to Triton, the metrics, the model registry, and the
    data plane that carries inference (``config.data_plane``: ``native``, else Python)."""

    def __init__(self, config: SidecarConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self._clock = clock or asyncio.get_running_loop().time
        self.upstream = Upstream(config.triton_url, config.upstream_timeout_s)
        self.metrics = SidecarMetrics(latency_buckets_s=latency_buckets_with(
            [m.slo.latency_s for m in (config.default, *config.models.values())
             if m.slo is not None and m.slo.latency_s is not None]))
        self.registry = ModelRegistry(config, self.upstream, self.metrics, self._clock)
        self.plane: PythonPlane | NativeDataPlane
        if config.data_plane == "native":
            deny = () if config.allow_repository_control else tuple(sorted(_REPOSITORY_CONTROL))
            self.plane = NativeDataPlane(config, self.registry, self.upstream, self.metrics, self._clock, deny)
        else:
            self.plane = PythonPlane(config, self.registry, self.upstream, self.metrics, self._clock)
        self.registry.attach(self.plane)

    def clock(self) -> float:
        return self._clock()

    async def close(self) -> None:
        await self.plane.close()
        await self.registry.close()
        await self.upstream.close()


UNPARSABLE = "Unable to parse request"
"""Triton's answer (INTERNAL) to a ModelInfer whose bytes do not parse (invalid UTF-8 in a string too)."""


def _parse_infer_request(data: bytes) -> service_pb2.ModelInferRequest | None:
    """The request, or None for bytes that do not parse: answered as Triton answers them, instead of
    gRPC's UNKNOWN and a log line with a traceback for every such request."""
    try:
        return service_pb2.ModelInferRequest.FromString(data)
    except DecodeError:
        return None


def _infer_response_bytes(response: service_pb2.ModelInferResponse | bytes) -> bytes:
    """A ModelInfer answer on the wire: Triton's own bytes as they are, or the plane's message encoded."""
    return response if type(response) is bytes else response.SerializeToString()


class _Servicer:
    """gRPC glue: gated inference plus a raw-bytes relay for every other RPC."""

    UNPARSABLE_LOG_EVERY_S = 60.0

    def __init__(self, plane: PythonPlane) -> None:
        self.plane = plane
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

    async def model_infer(self, wire: bytes, context: grpc.aio.ServicerContext) -> service_pb2.ModelInferResponse | bytes:
        """Parsed here, not by gRPC, so that the plane has the request's bytes as well (``PythonPlane.infer``'s
        ``wire``: sent on as they came where the request goes to Triton as it came or alone). gRPC holds
        the received bytes until the call ends either way: keeping them costs no memory."""
        request = _parse_infer_request(wire)
        if request is None:
            del wire  # (the abort's reference cycle, below)
            self._count_unparsable()
            await context.abort(grpc.StatusCode.INTERNAL, UNPARSABLE)
        try:
            return await self.plane.infer(request, wire)
        except GateError as exc:
            code, details = exc.code, exc.details
            # The error's traceback holds the frames that hold the request, and those frames that
            # re-raised it hold the error: a cycle, which kept a refused 64 MiB request in memory until
            # the next garbage collection. Cut here, and aborted outside the handler.
            exc.__traceback__ = None
        # The abort's error holds this frame, in a cycle with grpc's call state freed only by a garbage
        # collection: the frame must not hold the request then (12 refused 64 MiB requests held 860 MiB).
        del request, wire
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
        plane = self.plane
        infer = plane.infer
        registry = plane.registry
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
                                relay = _StreamRelay(plane.upstream.stream(metadata=md), out)
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
            del request  # not held by the abort's error (see model_infer)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused_message(method))

        return grpc.unary_unary_rpc_method_handler(denied)
    if unary_request and unary_response:
        stub = channel.unary_unary(path)

        async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                response = await stub(request, metadata=_forward_metadata(context))
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            else:
                if on_success is not None:
                    on_success(request)
                return response
            del request  # not held by the abort's error (see model_infer)
            await context.abort(code, details)

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
    plane = sidecar.plane
    if isinstance(plane, NativeDataPlane):
        try:
            port = await plane.start()
        except BaseException:
            await sidecar.close()
            raise
        log.info("native data plane (smdp-gate) listening on port %d, relaying to Triton at %s",
                 port, config.triton_url)
        running = RunningSidecar(None, sidecar, port, None)
        await _start_side_servers(running, config)
        await plane.ready()
        return running
    servicer = _Servicer(plane)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in _SERVICE_DESC.methods:
        if m.name == "ModelInfer":
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                servicer.model_infer, response_serializer=_infer_response_bytes)
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
    await plane.ready()
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
            if isinstance(sidecar.plane, PythonPlane):
                running.http, running.http_port = await start_http_front(config, submit=sidecar.plane.infer)
            else:
                running.http, running.http_port = await start_http_front(config, gate_port=running.port)
        except BaseException:
            await running.stop(0)
            raise
        log.info("HTTP/REST API on port %d", running.http_port)
