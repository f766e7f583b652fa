"""The solver as a gRPC service (``smdp.v1.Solver``), its policy cache, and clients.

One solver serves many sidecars, and sidecars ask again whenever their measured rate moves, so
most requests are near-repeats: answers are cached on rounded inputs (rate to about 1%, weight to 3
significant digits, everything else exact), and a miss starts policy iteration from the cached
policy of the nearest rate, which usually leaves one or two improvement steps to do.

The solve is CPU-bound, so the server is a synchronous gRPC server whose thread pool keeps solves
off the I/O path. Bad input is INVALID_ARGUMENT with the model's own message (for example a rate at
or above capacity); a policy that cannot be evaluated is FAILED_PRECONDITION.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from smdp.v1 import smdp_pb2, smdp_pb2_grpc
from solver.arrival_model import MMPP2, POISSON, ArrivalModel, CompoundPoisson
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import PolicyTable
from solver.quantities import check_count
from solver.result import SolveResult

SERVICE_NAME = smdp_pb2.DESCRIPTOR.services_by_name["Solver"].full_name
RATE_STEP = 0.01
"""Relative width of a rate cell of the cache."""
WEIGHT_DIGITS = 3
"""Significant digits of the weight in a cache key."""
DEFAULT_CACHE_SIZE = 256


# ---------------------------------------------------------------------------------------------------
# Messages <-> model objects
# ---------------------------------------------------------------------------------------------------


def profile_message(profile: ServiceProfile) -> smdp_pb2.Profile:
    """The profile, one row per batch size 1..B (interpolated sizes are sent as they were filled in)."""
    if profile.samples is not None:
        raise ModelError("a profile with empirical service samples cannot be sent to the solver service; "
                         "send its means and CVs instead")
    return smdp_pb2.Profile(
        batch_size=range(1, profile.max_batch + 1),
        mean_service_s=profile.mean_s.tolist(),
        batch_energy_j=profile.energy_j.tolist(),
        service_cv=profile.cv.tolist(),
    )


def arrivals_message(arrivals: ArrivalModel) -> smdp_pb2.Arrivals:
    """The arrival model as sent (Poisson: empty; an MMPP is refused, the service has no phase tables)."""
    if isinstance(arrivals, MMPP2):
        raise ModelError(f"the solver service does not solve {arrivals.spec} (a table per phase): "
                         "solve it in process with solver.mmpp")
    if isinstance(arrivals, CompoundPoisson):
        return smdp_pb2.Arrivals(mean_group_size=arrivals.group_mean,
                                 group_pmf=[] if arrivals.group_pmf is None else list(arrivals.group_pmf))
    return smdp_pb2.Arrivals()


def parse_arrivals_message(msg: smdp_pb2.Arrivals) -> ArrivalModel:
    if msg.group_pmf:
        return CompoundPoisson.empirical(list(msg.group_pmf))
    g = msg.mean_group_size
    if g == 0.0 or g == 1.0:
        return POISSON
    return CompoundPoisson(g)


def solve_request(
    model: BatchingModel,
    method: str = "pi",
    *,
    warm_start: PolicyTable | None = None,
    truncation: int | None = None,
) -> smdp_pb2.SolveRequest:
    return smdp_pb2.SolveRequest(
        rate_rps=model.rate,
        weight=model.weight,
        idle_power_w=model.idle_power_w,
        max_batch=model.max_batch,
        profile=profile_message(model.profile),
        method=method,
        warm_start_policy=[] if warm_start is None else warm_start.actions.tolist(),
        truncation=truncation or 0,
        arrivals=arrivals_message(model.arrivals),
    )


@dataclass(frozen=True)
class ParsedRequest:
    model: BatchingModel
    method: str
    truncation: int | None
    warm_start: PolicyTable | None


def parse_request(req: smdp_pb2.SolveRequest) -> ParsedRequest:
    """Validate a request into a model; every problem is a ModelError naming the bad field."""
    p = req.profile
    rows = len(p.batch_size)
    if rows == 0:
        raise ModelError("profile has no rows: batch_size is empty")
    for name in ("mean_service_s", "batch_energy_j"):
        if len(getattr(p, name)) != rows:
            raise ModelError(f"profile.{name} has {len(getattr(p, name))} entries, batch_size has {rows}")
    if len(p.service_cv) not in (0, 1, rows):
        raise ModelError(f"profile.service_cv must have 0, 1 or {rows} entries, got {len(p.service_cv)}")
    cv: float | list[float] = 0.0 if not p.service_cv else (p.service_cv[0] if len(p.service_cv) == 1 else list(p.service_cv))
    profile = ServiceProfile.from_table(
        list(p.batch_size), list(p.mean_service_s), list(p.batch_energy_j), cv,
        max_batch=req.max_batch or None, source="grpc",
    )
    model = BatchingModel(
        rate=req.rate_rps,
        max_batch=profile.max_batch,
        profile=profile,
        idle_power_w=req.idle_power_w,
        weight=req.weight,
        arrivals=parse_arrivals_message(req.arrivals),
    )
    method = req.method or "pi"
    warm = None
    if req.warm_start_policy:
        try:
            warm = PolicyTable(np.asarray(req.warm_start_policy, dtype=np.int64), model.max_batch)
        except ValueError as exc:
            raise ModelError(f"warm_start_policy: {exc}") from None
    return ParsedRequest(model, method, req.truncation or None, warm)


def solve_reply(result: SolveResult, *, cached: bool, warm_started: bool) -> smdp_pb2.SolveReply:
    m = result.model
    reply = smdp_pb2.SolveReply(
        policy=result.policy.actions.tolist(),
        gain=result.gain,
        mean_latency_s=result.mean_latency_s,
        mean_power_w=result.mean_power_w,
        throughput_rps=result.throughput_rps,
        mean_batch=result.mean_batch,
        iterations=result.iterations,
        converged=result.converged,
        solve_time_s=result.solve_time_s,
        truncation=result.truncation,
        cached=cached,
        warm_started=warm_started,
        solved_rate_rps=m.rate,
        solved_weight=m.weight,
        method=result.method,
        capacity_rps=m.capacity,
        load=m.load,
        max_batch=m.max_batch,
        arrivals=arrivals_message(m.arrivals),
    )
    k = result.threshold()
    if k is not None:
        reply.threshold = k
    return reply


# ---------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------


def rate_cell(rate: float) -> int:
    """Index of the ~1%-wide logarithmic cell that holds ``rate``."""
    return int(round(math.log(rate) / math.log1p(RATE_STEP)))


def weight_key(weight: float) -> float:
    return float(f"{weight:.{WEIGHT_DIGITS}g}")


def family_key(model: BatchingModel, method: str, truncation: int | None) -> str:
    """Everything but rate and weight, exactly: a policy only warm-starts or answers within its family."""
    h = hashlib.sha256()
    pr = model.profile
    for arr in (pr.mean_s, pr.energy_j, pr.cv):
        h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
    h.update(repr((model.max_batch, float(model.idle_power_w), method, truncation)).encode())
    # policies for another arrival model neither answer nor warm-start this one
    h.update(arrivals_message(model.arrivals).SerializeToString(deterministic=True))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    family: str
    rate_cell: int
    weight: float


def cache_key(parsed: ParsedRequest) -> CacheKey:
    m = parsed.model
    return CacheKey(family_key(m, parsed.method, parsed.truncation), rate_cell(m.rate), weight_key(m.weight))


class PolicyCache:
    """A thread-safe LRU of solve results, with a nearest-rate lookup for warm starts."""

    def __init__(self, max_entries: int = DEFAULT_CACHE_SIZE) -> None:
        check_count("cache size", max_entries)
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, SolveResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> SolveResult | None:
        with self._lock:
            result = self._entries.get(key)
            if result is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return result

    def put(self, key: CacheKey, result: SolveResult) -> None:
        with self._lock:
            self._entries[key] = result
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def nearest(self, key: CacheKey) -> SolveResult | None:
        """The cached result of the same family closest in rate, preferring the same weight."""
        with self._lock:
            best, best_d = None, None
            for k, result in self._entries.items():
                if k.family != key.family:
                    continue
                d = (k.weight != key.weight, abs(k.rate_cell - key.rate_cell))
                if best_d is None or d < best_d:
                    best, best_d = result, d
            return best


# ---------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------


class SolverService(smdp_pb2_grpc.SolverServicer):
    """``smdp.v1.Solver`` over ``solver.smdp.solve`` with the cache in front."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE, solve_fn: Callable[..., SolveResult] | None = None) -> None:
        if solve_fn is None:
            from solver.smdp import solve as solve_fn
        self._solve = solve_fn
        self.cache = PolicyCache(cache_size)
        # Single flight: concurrent requests for one key wait for the first one's solve.
        self._inflight: dict[CacheKey, threading.Event] = {}
        self._inflight_lock = threading.Lock()
        self.waiting = 0
        """Requests currently waiting for another request's solve of the same key."""

    def handle(self, req: smdp_pb2.SolveRequest) -> smdp_pb2.SolveReply:
        """The whole request, without gRPC: raises ModelError for bad input."""
        parsed = parse_request(req)
        key = cache_key(parsed)
        while True:
            hit = self.cache.get(key)
            if hit is not None:
                return solve_reply(hit, cached=True, warm_started=False)
            with self._inflight_lock:
                done = self._inflight.get(key)
                if done is None:
                    done = self._inflight[key] = threading.Event()
                    break
                self.waiting += 1
            try:
                done.wait()
            finally:
                with self._inflight_lock:
                    self.waiting -= 1
            # Now cached, unless the first solve failed or did not converge: then solve here.
        try:
            warm = parsed.warm_start
            if warm is None:
                near = self.cache.nearest(key)
                warm = None if near is None else near.policy
            result = self._solve(parsed.model, parsed.method, truncation=parsed.truncation, warm_start=warm)
            if result.converged:
                self.cache.put(key, result)
            return solve_reply(result, cached=False, warm_started=warm is not None)
        finally:
            with self._inflight_lock:
                del self._inflight[key]
            done.set()

    def Solve(self, request: smdp_pb2.SolveRequest, context: grpc.ServicerContext) -> smdp_pb2.SolveReply:
        from solver.evaluate import UnstablePolicyError

        try:
            return self.handle(request)
        except (UnstablePolicyError, ArithmeticError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no optimal policy: {exc}")
        except ValueError as exc:  # ModelError and every other validation error
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise AssertionError("unreachable")  # context.abort raises


def start_solver_server(
    address: str = "127.0.0.1:0",
    *,
    max_workers: int = 4,
    cache_size: int = DEFAULT_CACHE_SIZE,
    service: SolverService | None = None,
) -> tuple[grpc.Server, int]:
    """Start the solver with health checking and reflection; returns (server, bound port).

    The caller stops it with ``server.stop(grace)``. Raises OSError if the address cannot be bound.
    Pass ``service`` to keep a handle on the cache (its hit and miss counts).
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="smdp-solver"))
    if service is None:
        service = SolverService(cache_size=cache_size)
    smdp_pb2_grpc.add_SolverServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


# ---------------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------------


class SolverError(Exception):
    """A solve that did not succeed: the gRPC code and the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def unavailable(self) -> bool:
        """The solver could not be reached in time: keep the policy in force and retry later."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True, eq=False)
class RemoteSolution:
    """A solver reply as model objects; the figures are for solved_rate_rps / solved_weight."""

    policy: PolicyTable
    gain: float
    mean_latency_s: float
    mean_power_w: float
    throughput_rps: float
    mean_batch: float
    threshold: int | None
    iterations: int
    converged: bool
    solve_time_s: float
    truncation: int
    cached: bool
    warm_started: bool
    solved_rate_rps: float
    solved_weight: float
    method: str
    capacity_rps: float
    load: float
    arrivals: ArrivalModel = POISSON

    @classmethod
    def from_reply(cls, reply: smdp_pb2.SolveReply) -> "RemoteSolution":
        return cls(
            policy=PolicyTable(np.asarray(reply.policy, dtype=np.int64), reply.max_batch),
            gain=reply.gain,
            mean_latency_s=reply.mean_latency_s,
            mean_power_w=reply.mean_power_w,
            throughput_rps=reply.throughput_rps,
            mean_batch=reply.mean_batch,
            threshold=reply.threshold if reply.HasField("threshold") else None,
            iterations=reply.iterations,
            converged=reply.converged,
            solve_time_s=reply.solve_time_s,
            truncation=reply.truncation,
            cached=reply.cached,
            warm_started=reply.warm_started,
            solved_rate_rps=reply.solved_rate_rps,
            solved_weight=reply.solved_weight,
            method=reply.method,
            capacity_rps=reply.capacity_rps,
            load=reply.load,
            arrivals=parse_arrivals_message(reply.arrivals),
        )


def _check_timeout(timeout_s: float) -> float:
    timeout_s = float(timeout_s)
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout_s!r}")
    return timeout_s


class SolverClient:
    """Blocking client; every call has a deadline (``timeout_s``) and fails with SolverError."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = _check_timeout(timeout_s)
        self._channel = grpc.insecure_channel(address)
        self._stub = smdp_pb2_grpc.SolverStub(self._channel)

    def solve(
        self,
        model: BatchingModel,
        method: str = "pi",
        *,
        warm_start: PolicyTable | None = None,
        truncation: int | None = None,
        timeout_s: float | None = None,
    ) -> RemoteSolution:
        req = solve_request(model, method, warm_start=warm_start, truncation=truncation)
        try:
            reply = self._stub.Solve(req, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise SolverError(exc.code(), exc.details() or "") from None
        return RemoteSolution.from_reply(reply)

    def reachable(self, timeout_s: float = 1.0) -> bool:
        """The solver answers its health check as SERVING within ``timeout_s``."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            resp = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SolverClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSolverClient:
    """The same client for an asyncio program (the sidecar): the solve never blocks its event loop."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = _check_timeout(timeout_s)
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = smdp_pb2_grpc.SolverStub(self._channel)

    async def solve(
        self,
        model: BatchingModel,
        method: str = "pi",
        *,
        warm_start: PolicyTable | None = None,
        truncation: int | None = None,
        timeout_s: float | None = None,
    ) -> RemoteSolution:
        req = solve_request(model, method, warm_start=warm_start, truncation=truncation)
        try:
            reply = await self._stub.Solve(req, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise SolverError(exc.code(), exc.details() or "") from None
        return RemoteSolution.from_reply(reply)

    async def reachable(self, timeout_s: float = 1.0) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            resp = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncSolverClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

