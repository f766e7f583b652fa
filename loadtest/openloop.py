"""Open-loop load: every request fires at its pre-drawn arrival time, whatever earlier ones are doing.

A closed-loop client (send, wait, send) lets a slow server slow the arrivals down, so it measures a
different queue from the one the SMDP models. Here the arrival times come from ``solver.arrivals``
(drawn before the run), one asyncio loop fires each as its own gRPC call on a shared channel, and
nothing waits for a response before the next send. The client can still fall behind (a saturated
CPU), so each request's send time is recorded beside its scheduled time and the send lag is part of
every result: a late generator is visible, not hidden.

The wire protocol is KServe v2 gRPC (Triton's ``inference.GRPCInferenceService``) through the
generated stubs in ``tritonclient.grpc``, with requests serialised ahead of time so that firing a
request costs one task and one write. Loopback targets only: this is a bench, not a traffic cannon.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "InputSpec",
    "LoadError",
    "OpenLoopResult",
    "RequestFactory",
    "run_open_loop",
    "run_open_loop_async",
    "model_inputs",
]

SERVICE = "inference.GRPCInferenceService"
CLIENT_DROPPED = "CLIENT_DROPPED"
"""Status of a request the client did not send because ``max_in_flight`` calls were outstanding."""
NOT_SENT = "NOT_SENT"
"""Status of a request whose scheduled time fell after the run's time limit."""
WRONG_RESPONSE = "WRONG_RESPONSE"
"""Status of a response whose id is not the request's (rows routed to the wrong caller)."""

_LOOPBACK = ("127.", "localhost", "[::1]", "::1", "unix:")
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT32": np.int32, "INT64": np.int64,
           "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16}


class LoadError(ValueError):
    """Bad load-generator input (target, model, arrival times); the message names the bad value."""


@dataclass(frozen=True)
class InputSpec:
    """One input tensor of a request: its name, KServe datatype and per-row shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in _DTYPES:
            raise LoadError(f"input {self.name!r}: datatype {self.datatype!r} is not supported "
                            f"(use one of {sorted(_DTYPES)})")
        if any(int(d) < 1 for d in self.shape):
            raise LoadError(f"input {self.name!r}: shape {self.shape} has a variable or empty dimension; "
                            "give an explicit InputSpec with fixed dimensions")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


class RequestFactory:
    """Serialises one-row ModelInferRequests ahead of time, each with its own id and contents.

    Every request carries distinct input values (a function of its index) and an id, so a response
    that comes back to the wrong caller is detected by its id.
    """

    def __init__(self, model: str, inputs: Sequence[InputSpec], version: str = "",
                 parameters: dict[str, int] | None = None) -> None:
        from tritonclient.grpc import service_pb2

        if not model:
            raise LoadError("model name is empty")
        if not inputs:
            raise LoadError(f"model {model!r}: no inputs to send")
        self.model = model
        self._template = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        for key, value in (parameters or {}).items():
            self._template.parameters[key].int64_param = int(value)
        self._inputs = tuple(inputs)
        for spec in self._inputs:
            t = self._template.inputs.add()
            t.name = spec.name
            t.datatype = spec.datatype
            t.shape.extend((1, *spec.shape))
            self._template.raw_input_contents.append(b"")

    def build(self, index: int) -> bytes:
        req = self._template.__class__()
        req.CopyFrom(self._template)
        req.id = str(index)
        for k, spec in enumerate(self._inputs):
            values = np.full(spec.shape, (index % 1000) / 1000.0).astype(_DTYPES[spec.datatype])
            req.raw_input_contents[k] = values.tobytes()
        return req.SerializeToString()


@dataclass(frozen=True, eq=False)
class OpenLoopResult:
    """Per-request record of one open-loop run; times are seconds from the run's time origin."""

    scheduled_s: np.ndarray
    """When each request was due (its arrival time)."""
    sent_s: np.ndarray
    """When the client actually issued it (NaN: never sent)."""
    done_s: np.ndarray
    """When its answer (response or error) arrived (NaN: none)."""
    status: tuple[str, ...]
    """gRPC status name per request ("OK"), or CLIENT_DROPPED / NOT_SENT / WRONG_RESPONSE."""
    batch_size: np.ndarray
    """BATCH_SIZE the server reported for the batch that carried the request (0: not reported)."""
    batch_energy_j: np.ndarray
    """BATCH_ENERGY_J reported for that whole batch (NaN: not reported)."""
    wall_start: float = 0.0
    """time.time() at the time origin, to line the run up with server logs."""
    errors: tuple[str, ...] = ()
    """A few distinct error messages, for the report."""
    max_in_flight_seen: int = 0

    def __post_init__(self) -> None:
        n = self.scheduled_s.shape[0]
        for name in ("sent_s", "done_s", "batch_size", "batch_energy_j"):
            if getattr(self, name).shape != (n,):
                raise LoadError(f"{name} must have one entry per request ({n})")
        if len(self.status) != n:
            raise LoadError(f"status must have one entry per request ({n})")

    @property
    def n(self) -> int:
        return int(self.scheduled_s.shape[0])

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == "OK" for s in self.status], dtype=bool)

    @property
    def n_failed(self) -> int:
        return int(self.n - self.ok.sum())

    def failures(self) -> dict[str, int]:
        return dict(Counter(s for s in self.status if s != "OK"))

    @property
    def latency_s(self) -> np.ndarray:
        """Response time of the successful requests from their *scheduled* time (client lag included,
        so a late generator cannot make the server look faster)."""
        ok = self.ok
        return self.done_s[ok] - self.scheduled_s[ok]

    @property
    def send_lag_s(self) -> np.ndarray:
        """How late the generator fired each request it sent."""
        sent = ~np.isnan(self.sent_s)
        return self.sent_s[sent] - self.scheduled_s[sent]

    def lag_summary(self) -> dict[str, float]:
        lag = self.send_lag_s
        if lag.size == 0:
            return {"mean_s": math.nan, "p99_s": math.nan, "max_s": math.nan}
        return {"mean_s": float(lag.mean()), "p99_s": float(np.percentile(lag, 99)), "max_s": float(lag.max())}


def _check_target(target: str) -> None:
    if not target or ":" not in target:
        raise LoadError(f"target must be host:port, got {target!r}")
    if not target.startswith(_LOOPBACK):
        raise LoadError(f"target {target!r} is not a loopback address; the open-loop driver only loads this machine")


def _check_times(times: np.ndarray) -> np.ndarray:
    t = np.asarray(times, dtype=float)
    if t.ndim != 1:
        raise LoadError("arrival times must be a 1-d array")
    if t.size and (not np.all(np.isfinite(t)) or t[0] < 0 or np.any(np.diff(t) < 0)):
        raise LoadError("arrival times must be finite, >= 0 and sorted")
    return t


async def model_inputs(channel, model: str, version: str = "") -> list[InputSpec]:
    """The inputs of a batching model from its metadata (the leading -1 is the batch dimension)."""
    import grpc
    from tritonclient.grpc import service_pb2

    meta = channel.unary_unary(
        f"/{SERVICE}/ModelMetadata",
        request_serializer=service_pb2.ModelMetadataRequest.SerializeToString,
        response_deserializer=service_pb2.ModelMetadataResponse.FromString,
    )
    try:
        resp = await meta(service_pb2.ModelMetadataRequest(name=model, version=version), timeout=10)
    except grpc.aio.AioRpcError as exc:
        raise LoadError(f"cannot read metadata of model {model!r}: {exc.code().name} {exc.details()}") from None
    specs = []
    for t in resp.inputs:
        shape = list(t.shape)
        if not shape or shape[0] != -1:
            raise LoadError(f"model {model!r} input {t.name!r} has shape {shape}: only batching models "
                            "(leading dimension -1) are supported")
        specs.append(InputSpec(t.name, t.datatype, tuple(shape[1:])))
    return specs


def _outputs(resp) -> tuple[int, float, str]:
    """(BATCH_SIZE, BATCH_ENERGY_J, id) from a response, 0 / NaN where the model does not report them."""
    b, e = 0, math.nan
    for k, out in enumerate(resp.outputs):
        if k >= len(resp.raw_output_contents):
            break
        if out.name == "BATCH_SIZE":
            b = int(np.frombuffer(resp.raw_output_contents[k], dtype=np.int32)[0])
        elif out.name == "BATCH_ENERGY_J":
            e = float(np.frombuffer(resp.raw_output_contents[k], dtype=np.float32)[0])
    return b, e, resp.id


async def run_open_loop_async(
    target: str,
    model: str,
    times: np.ndarray,
    *,
    inputs: Sequence[InputSpec] | None = None,
    timeout_s: float = 30.0,
    max_in_flight: int = 4096,
    time_limit_s: float | None = None,
    start_delay_s: float = 0.05,
    required: np.ndarray | None = None,
    drain_grace_s: float = 1.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> OpenLoopResult:
    """Fire one request per arrival time at ``target`` (host:port) and record what happened.

    ``timeout_s`` is each call's deadline; ``time_limit_s`` stops firing once that much time has
    passed (later arrivals are NOT_SENT); ``max_in_flight`` bounds outstanding calls (arrivals beyond
    it are CLIENT_DROPPED, never delayed: delaying them would close the loop).

    After the last arrival the run waits for every request in the boolean mask ``required``
    (default: all) up to its deadline, then at most ``drain_grace_s`` for the others, and cancels
    what is left (status CANCELLED). A policy that waits for more arrivals may hold the last few
    requests of a finite stream indefinitely: benches therefore measure a window and let a
    cool-down stream (not required) flush it.
    """
    import grpc
    from tritonclient.grpc import service_pb2

    _check_target(target)
    t = _check_times(times)
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise LoadError(f"timeout_s must be finite and > 0, got {timeout_s!r}")
    if max_in_flight < 1:
        raise LoadError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
    n = t.size
    if required is None:
        need = np.ones(n, dtype=bool)
    else:
        need = np.asarray(required, dtype=bool)
        if need.shape != (n,):
            raise LoadError(f"required must be a boolean mask with one entry per arrival ({n}), got shape {need.shape}")
    if not (drain_grace_s >= 0 and math.isfinite(drain_grace_s)):
        raise LoadError(f"drain_grace_s must be finite and >= 0, got {drain_grace_s!r}")
    sent = np.full(n, math.nan)
    done = np.full(n, math.nan)
    bsize = np.zeros(n, dtype=np.int64)
    energy = np.full(n, math.nan)
    status = [NOT_SENT] * n
    errors: dict[str, str] = {}

    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        specs = list(inputs) if inputs is not None else await model_inputs(channel, model)
        factory = RequestFactory(model, specs)
        payloads = [factory.build(i) for i in range(n)]
        infer = channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=None,  # payloads are serialised already
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        await channel.channel_ready()
        loop = asyncio.get_running_loop()
        clock = loop.time
        origin = clock() + start_delay_s
        wall_start = time.time() + start_delay_s
        in_flight = 0
        needed = 0  # required requests sent and not yet answered
        peak = 0
        drained = asyncio.Event()
        drained.set()
        required_done = asyncio.Event()
        required_done.set()

        async def one(i: int) -> None:
            nonlocal in_flight, needed
            try:
                resp = await infer(payloads[i], timeout=timeout_s)
                done[i] = clock() - origin
                b, e, rid = _outputs(resp)
                bsize[i], energy[i] = b, e
                if rid != str(i):
                    status[i] = WRONG_RESPONSE
                    errors.setdefault(WRONG_RESPONSE, f"request {i} got the response of {rid!r}")
                else:
                    status[i] = "OK"
            except grpc.aio.AioRpcError as exc:
                done[i] = clock() - origin
                status[i] = exc.code().name
                errors.setdefault(status[i], exc.details() or "")
            except asyncio.CancelledError:
                status[i] = "CANCELLED"
            finally:
                in_flight -= 1
                if in_flight == 0:
                    drained.set()
                if need[i]:
                    needed -= 1
                    if needed == 0:
                        required_done.set()

        tasks: set[asyncio.Task] = set()
        i = 0
        limit = math.inf if time_limit_s is None else float(time_limit_s)
        next_progress = 1.0
        while i < n:
            now = clock() - origin
            if now >= limit:
                break
            if t[i] > now:
                await asyncio.sleep(min(t[i], limit) - now)
                continue
            while i < n and t[i] <= now:
                if in_flight >= max_in_flight:
                    status[i] = CLIENT_DROPPED
                else:
                    sent[i] = clock() - origin
                    in_flight += 1
                    peak = max(peak, in_flight)
                    drained.clear()
                    if need[i]:
                        needed += 1
                        required_done.clear()
                    task = loop.create_task(one(i))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                i += 1
            if on_progress is not None and now >= next_progress:
                on_progress(i, n)
                next_progress = now + 1.0
        try:
            await asyncio.wait_for(required_done.wait(), timeout_s + 5.0)
            await asyncio.wait_for(drained.wait(), drain_grace_s)
        except asyncio.TimeoutError:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return OpenLoopResult(
        scheduled_s=t, sent_s=sent, done_s=done, status=tuple(status), batch_size=bsize,
        batch_energy_j=energy, wall_start=wall_start, errors=tuple(f"{k}: {v}" for k, v in errors.items()),
        max_in_flight_seen=peak,
    )


def run_open_loop(target: str, model: str, times: np.ndarray, **options) -> OpenLoopResult:
    """Synchronous wrapper of :func:`run_open_loop_async` (its own event loop)."""
    return asyncio.run(run_open_loop_async(target, model, times, **options))
