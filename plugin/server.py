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
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import model_config_pb2, service_pb2

from solver.policy import MaxWaitGuard
from solver.slo import SloTarget

from .batcher_notice import TritonBatcherNotice
from .loop.controller import PolicyController, RemoteSolver, learning_options
from .config import ModelPolicyConfig, SidecarConfig
from .gate import ModelGate, Pending, QueueFull
from .metrics import SidecarMetrics, latency_buckets_with
from .model_names import is_model_name
from .native_plane import NativeGateView, NativePlane, choose_plane, forget_line, monotonic_offset
from .merge import MalformedRequest, RequestValidator, merge, merge_key, split
from .policies import RuleInfo, build_rule, model_instances

log = logging.getLogger("smdp.sidecar")

SERVICE = "inference.GRPCInferenceService"
_SERVICE_DESC = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_GATED = {"ModelInfer", "ModelStreamInfer"}
_STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
_REPOSITORY_CONTROL = {"RepositoryModelLoad", "RepositoryModelUnload"}
_CONFIG_REREAD_S = 1.0  # a model's config is read again on a sign it changed at most this often
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Reconnect quickly after Triton restarts: recovery should take well under a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Triton's errors quote what the client sent (a model name, an input's name): an answer of one
    # client's request larger than gRPC's default metadata limit (8-16 KiB) must still come back, as
    # that request's answer, and not as a connection failure under everyone's calls.
    ("grpc.max_metadata_size", 2**31 - 1),
    ("grpc.absolute_max_metadata_size", 2**31 - 1),
]


class GateError(Exception):
    """The one answer a caller gets when it gets no response."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# Triton's own messages for the per-request parameters it would refuse (grpc infer handler, 2.51).
_BAD_PRIORITY_TYPE = "invalid value type for 'priority' parameter, expected int64_param or uint64_param."
_BAD_PRIORITY = "invalid value for 'priority', expected value >= 0."
_BAD_TIMEOUT_TYPE = "invalid value type for 'timeout' parameter, expected int64_param."
# ModelConfig errors that mean "this model cannot be gated": the request is relayed as is, so the
# caller gets exactly what Triton says to it. Any other error is the caller's answer.
# Most (model, version) pairs remembered as unknown to Triton at once (``unknown_model_ttl_s``).
_MAX_UNKNOWN = 1024
_NOT_GATEABLE = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})


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


def _ungateable(cfg: model_config_pb2.ModelConfig) -> bool:
    """Models whose requests must reach Triton as sent: decoupled ones (any number of responses per
    request, streamed) and sequence-batched ones (per-sequence state, correlation ids)."""
    return cfg.model_transaction_policy.decoupled or cfg.HasField("sequence_batching")


def _done(call: grpc.aio.Call | asyncio.Future) -> asyncio.Future:
    """A future that ends when ``call`` does; cancelling it does not cancel the call."""
    fut = asyncio.get_running_loop().create_future()
    call.add_done_callback(lambda _c: fut.done() or fut.set_result(None))
    return fut


def _consume(task: asyncio.Future) -> None:
    """Mark a shared task's outcome retrieved, for when every waiter went away before it ended."""
    if not task.cancelled():
        task.exception()


@dataclass
class BatchStats:
    """What the gate observed of the batches it sent: sizes, and dispatch-to-completion times."""

    max_batch: int
    batches: np.ndarray = field(init=False)
    busy_s: np.ndarray = field(init=False)
    failed_requests: int = 0
    answered: int = 0
    latency_sum_s: float = 0.0
    """Sum over answered requests of arrival-to-answer time in the sidecar, seconds."""
    latency_n: int = 0
    started_at: float = 0.0

    def __post_init__(self) -> None:
        self.batches = np.zeros(self.max_batch + 1, dtype=np.int64)
        self.busy_s = np.zeros(self.max_batch + 1)

    def record(self, rows: int, seconds: float) -> None:
        i = min(rows, self.max_batch)
        self.batches[i] += 1
        self.busy_s[i] += seconds


@dataclass
class ModelState:
    name: str
    version: str
    config: model_config_pb2.ModelConfig
    gate: ModelGate | None
    info: RuleInfo | None
    stats: BatchStats
    default_priority: int
    priority_levels: int
    controller: PolicyController | None = None
    profile: Any = None
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    config_read_at: float = 0.0
    """When its config was last read from Triton (sidecar clock)."""


@dataclass(eq=False)
class _Call:
    request: service_pb2.ModelInferRequest
    future: asyncio.Future


class Sidecar:
    """Owns the upstream channel and one gate per model; one event loop drives everything."""

    def __init__(self, config: SidecarConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self._channel = grpc.aio.insecure_channel(config.triton_url, options=_CHANNEL_OPTIONS)
        self._infer = self._channel.unary_unary(
            f"/{SERVICE}/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        self._model_config = self._channel.unary_unary(
            f"/{SERVICE}/ModelConfig",
            request_serializer=service_pb2.ModelConfigRequest.SerializeToString,
            response_deserializer=service_pb2.ModelConfigResponse.FromString,
        )
        self._server_ready = self._channel.unary_unary(
            f"/{SERVICE}/ServerReady",
            request_serializer=service_pb2.ServerReadyRequest.SerializeToString,
            response_deserializer=service_pb2.ServerReadyResponse.FromString,
        )
        self._stream = self._channel.stream_stream(
            f"/{SERVICE}/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self._models: dict[tuple[str, str], ModelState] = {}
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self._unknown: dict[tuple[str, str], float] = {}
        """Models Triton said it does not know, and until when that answer is trusted (clock time)."""
        self._retired: dict[tuple[str, str], ModelState] = {}
        """Forgotten models' states (NOT_FOUND from Triton): reused by the next load when it can be."""
        self._tasks: set[asyncio.Task] = set()
        self._validators: dict[tuple[str, str], RequestValidator] = {}
        """Per model: the request checks of its config in force, worked out once per config."""
        self.metrics = SidecarMetrics(latency_buckets_s=latency_buckets_with(
            [m.slo.latency_s for m in (config.default, *config.models.values()) if m.slo is not None]))
        self._solver = None
        if config.solver_url:
            from solver.service import AsyncSolverClient

            self._solver = AsyncSolverClient(config.solver_url, timeout_s=config.solver_timeout_s)
        self._native = None
        """The native data plane (``data_plane: native``): a NativePlane once start_sidecar started it."""
        self._native_loading: set[str] = set()
        self._batcher_notice = TritonBatcherNotice(chosen="triton_batcher" in config.model_fields_set)
        self._closing = False
        self._retune = self._loop.create_task(self._retune_loop())

    async def close(self) -> None:
        self._closing = True
        self._batcher_notice.close()
        if self._native is not None:
            await self._native.stop()
        self._retune.cancel()
        for state in [*self._models.values(), *self._retired.values()]:
            if state.timer:
                state.timer.cancel()
            if state.controller is not None:
                await state.controller.wait_idle()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._solver is not None:
            await self._solver.close()
        await self._channel.close()

    async def _retune_loop(self) -> None:
        """Let every adaptive model re-solve when its rate moved (see plugin.loop.controller)."""
        while True:
            await asyncio.sleep(self.config.retune_interval_s)
            now = self._clock()
            for state in list(self._models.values()):
                try:
                    if state.controller is not None:
                        state.controller.tick(now)
                    if state.gate is not None:
                        self._export(state, now)
                except Exception:  # never let one model stop the loop
                    log.exception("retune of %s failed", state.name)

    def _export(self, state: ModelState, now: float) -> None:
        """The slow-moving gauges, once a tick (the per-request counters are updated inline)."""
        m = self.metrics
        m.set_queue(state.name, state.gate.queue_length, state.gate.in_flight, state.gate.slots)
        c = state.controller
        if c is not None:
            est = c.rate.estimate(now)
            m.set_rate(state.name, est.rate, est.lo, est.hi)
            if c.current is not None:
                m.set_policy(state.name, c.version, c.current.policy.threshold(), c.current.mean_latency_s,
                             c.current.mean_power_w)

    def clock(self) -> float:
        return self._clock()

    # -- models ------------------------------------------------------------------------------
    def models(self) -> dict[tuple[str, str], ModelState]:
        return dict(self._models)

    async def model_state(self, name: str, version: str) -> ModelState | None:
        """The gate state of a model, fetching its config from Triton once.

        Returns None when Triton does not know the model (the caller then relays the request as is,
        so the client gets exactly Triton's own error). Raises GateError UNAVAILABLE when Triton is away.
        """
        key = (name, version)
        state = self._models.get(key)
        if state is not None:
            return state
        if not is_model_name(name):
            return None  # no repository holds it: Triton's own answer, nothing kept by its name
        until = self._unknown.get(key)
        if until is not None:
            if self._clock() < until:
                return None  # unknown a moment ago: relay without asking Triton for its config again
            del self._unknown[key]
        pending = self._loading.get(key)
        if pending is None:
            # The load runs in its own task: a caller that goes away cancels its wait, not the load
            # every other caller of this model is waiting for.
            pending = self._loading[key] = self._loop.create_task(self._load(key))
            pending.add_done_callback(_consume)
            self._tasks.add(pending)
            pending.add_done_callback(self._tasks.discard)
        return await asyncio.shield(pending)

    async def _load(self, key: tuple[str, str]) -> ModelState | None:
        try:
            state = await self._load_state(*key)
            if state is not None:
                self._models[key] = state
            else:
                self._remember_unknown(key)
            return state
        except GateError:
            raise
        except Exception as exc:
            log.exception("cannot set up the gate of model %s", key[0])
            raise GateError(grpc.StatusCode.INTERNAL, f"sidecar cannot gate model '{key[0]}': {exc}") from None
        finally:
            self._loading.pop(key, None)

    def _remember_unknown(self, key: tuple[str, str]) -> None:
        """Trust Triton's "no such model" for ``unknown_model_ttl_s``; bounded, so that clients asking
        for ever new names cannot grow it without end."""
        ttl = self.config.unknown_model_ttl_s
        if ttl <= 0:
            return
        now = self._clock()
        if len(self._unknown) >= _MAX_UNKNOWN:
            for k in [k for k, t in self._unknown.items() if t <= now]:
                del self._unknown[k]
            while len(self._unknown) >= _MAX_UNKNOWN:
                del self._unknown[next(iter(self._unknown))]  # the oldest entry
        self._unknown[key] = now + ttl

    def _known_again(self, key: tuple[str, str]) -> None:
        """Triton answered a relayed request of a model remembered as unknown: gate it from now on."""
        self._unknown.pop(key, None)

    async def _load_state(self, name: str, version: str) -> ModelState | None:
        try:
            resp = await self._model_config(
                service_pb2.ModelConfigRequest(name=name, version=version),
                timeout=self.config.upstream_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise GateError(grpc.StatusCode.UNAVAILABLE, f"Triton is unreachable: {exc.details()}") from None
            if code not in _NOT_GATEABLE:
                raise GateError(code, exc.details() or "") from None
            if await self._triton_exiting():
                # Triton unloads every model while it shuts down: not the model's fault, retryable.
                raise GateError(grpc.StatusCode.UNAVAILABLE, "Triton is not ready (starting or stopping)") from None
            return None  # an unknown model, or one unloading: Triton's own answer
        cfg = resp.config
        if self._batcher_to_turn_off(cfg):
            await self._turn_off_triton_batcher(name, cfg)
        slots = model_instances(cfg)
        dyn = cfg.dynamic_batching
        levels = dyn.priority_levels if cfg.HasField("dynamic_batching") else 0
        default_level = dyn.default_priority_level if levels else 0
        old = self._retired.pop((name, version), None)
        if old is not None and old.gate is not None and not _ungateable(cfg) \
                and cfg.max_batch_size == old.config.max_batch_size:
            # The same model back (Triton restarted): keep its gate, whose batches may still be in
            # flight, its policy and controller (operator settings included) and its counters.
            old.config = cfg
            old.config_read_at = self._clock()
            old.gate.set_slots(slots)
            if old.controller is not None:
                old.controller.instances = slots  # the next re-solve is for the new k
            old.priority_levels = levels
            old.default_priority = default_level or (levels or 0)
            if self._native is not None:
                old.gate.set_priorities(old.default_priority, levels)
            log.info("model %s is back: gating it as before (%d slot(s))", name, slots)
            return old
        gate = info = controller = profile = None
        max_rows = max(cfg.max_batch_size, 1)
        policy_cfg = self.config.policy_for(name)
        if cfg.max_batch_size > 0 and not _ungateable(cfg):
            auto_note = ""
            if policy_cfg.profile == "auto" and policy_cfg.policy == "smdp":
                policy_cfg, auto_note = await self._auto_profile(name, version, policy_cfg)
            if policy_cfg.policy == "smdp" and policy_cfg.adaptive:
                info, profile = self._adaptive_start(name, policy_cfg, cfg.max_batch_size)
            else:
                info = await self._loop.run_in_executor(None, build_rule, name, policy_cfg, cfg.max_batch_size, slots)
            if auto_note:
                info = replace(info, spec=f"{info.spec} ({auto_note})")
            if self._native is not None:
                gate = NativeGateView(
                    name, self._native.send, self._guarded(name, info.rule), slots=slots,
                    max_queue=self.config.max_queue, default_priority=default_level or (levels or 0),
                    priority_levels=levels, dispatch_priority=self.config.dispatch_priority,
                )
            else:
                gate = ModelGate(
                    self._guarded(name, info.rule), slots=slots, max_queue=self.config.max_queue,
                    max_rows=info.max_batch, clock=self._clock,
                )
            max_rows = info.max_batch
            log.info("gating model %s (B=%d, %d slot(s), policy %s)", name, info.max_batch, slots, info.spec)
            if self.config.mode == "merged" and cfg.HasField("dynamic_batching") \
                    and self.config.triton_batcher == "keep":
                self._batcher_notice.seen(name)  # one warning line per start for all such models
        state = ModelState(
            name=name,
            version=version,
            config=cfg,
            gate=gate,
            info=info,
            stats=BatchStats(max_rows),
            default_priority=default_level or (levels or 0),
            priority_levels=levels,
            profile=profile,
        )
        state.stats.started_at = state.config_read_at = self._clock()
        if profile is not None:
            state.controller = PolicyController(
                name,
                profile,
                max_batch=info.max_batch,
                idle_power_w=policy_cfg.idle_power_w,
                weight=policy_cfg.weight,
                install=lambda policy, st=state: self._install(st, policy),
                instances=slots,
                clock=self._clock,
                solver=RemoteSolver(self._solver) if self._solver is not None else None,
                initial_rate=policy_cfg.rate_rps,
                window_s=self.config.rate_window_s,
                long_run_s=self.config.long_run_window_s,
                group_window_gaps=self.config.arrival_group_window,
                stats=state.stats,
                metrics=self.metrics,
                **learning_options(self.config, name),
            )
            if policy_cfg.slo is not None:
                state.controller.set_slo(SloTarget(policy_cfg.slo.quantile, policy_cfg.slo.latency_s))
            if old is not None and old.controller is not None:
                # what the operator set through the control API outlives a changed config
                if old.controller.latency_target_s is not None:
                    state.controller.set_latency_target(old.controller.latency_target_s)
                else:
                    state.controller.set_weight(old.controller.weight)
                if old.controller.slo is not None:
                    state.controller.set_slo(old.controller.slo)
        return state

    def preload_auto_profiles(self) -> None:
        """Profile the configured ``profile: auto`` models now, at start, rather than at their first request
        (which waits for the sweep either way: the model's gate opens after it)."""
        for name, pc in self.config.models.items():
            if pc.profile == "auto" and pc.policy == "smdp":
                self._spawn(self._preload(name))

    async def _preload(self, name: str) -> None:
        try:
            await self.model_state(name, "")
        except GateError as exc:
            log.warning("model %s: not gated at start (%s); it will be at its first request", name, exc.details)

    async def _auto_profile(self, name: str, version: str, cfg: ModelPolicyConfig) -> tuple[ModelPolicyConfig, str]:
        """``profile: auto``: the measured (or cached) profile in place of "auto", or greedy and why."""
        from .auto_profile import auto_profile

        got = await auto_profile(self.config.triton_url, name, version, cfg,
                                 self.config.profile_cache_dir.expanduser(),
                                 metrics_url=self.config.triton_metrics_url, timeout_s=self.config.upstream_timeout_s)
        if got.path is None:
            log.warning("model %s: %s; gating it greedily instead of smdp", name, got.reason)
            return cfg.model_copy(update={"policy": "greedy", "profile": None}), got.reason
        log.info("model %s: %s", name, got.reason)
        return cfg.model_copy(update={"profile": got.path}), got.reason

    def _adaptive_start(self, name: str, cfg, model_max_batch: int) -> tuple[RuleInfo, Any]:
        """An adaptive smdp model starts greedy; its controller installs the solved policy shortly."""
        from solver.model import ServiceProfile
        from solver.policy import greedy

        if cfg.profile is None:
            raise GateError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model '{name}': the smdp policy needs a service-time profile (`profile`)",
            )
        b = min(cfg.max_batch or model_max_batch, model_max_batch)
        profile = ServiceProfile.from_csv(cfg.profile)
        return RuleInfo(greedy(b), "smdp (greedy until the first solve)", b), profile.truncated(
            min(b, profile.max_batch)
        )

    def _guarded(self, model: str, rule):
        """The rule the gate runs: the policy, with the model's max-wait guard if it has one."""
        from solver.policy import MaxWaitGuard

        max_wait = self.config.policy_for(model).max_wait_s
        return rule if max_wait is None else MaxWaitGuard(rule, max_wait)

    def _install(self, state: ModelState, policy) -> None:
        """Swap in a solved table; the event loop runs one decision at a time, so this is atomic."""
        c = state.controller
        pred = None
        if c is not None and c.current is not None:
            pred = {"mean_latency_s": c.current.mean_latency_s, "mean_power_w": c.current.mean_power_w}
        state.info = RuleInfo(policy, "smdp", policy.max_batch, pred)
        own_wait = c.current.max_wait_s if c is not None and c.current is not None else None
        rule = policy if own_wait is None else MaxWaitGuard(policy, own_wait)  # an SLO policy's guard
        state.gate.set_rule(self._guarded(state.name, rule))
        self._pump(state)

    def _batcher_to_turn_off(self, cfg: model_config_pb2.ModelConfig) -> bool:
        """A gated model whose Triton batcher the operator asked the sidecar to turn off (merged mode)."""
        return (self.config.triton_batcher == "off" and self.config.mode == "merged" and cfg.max_batch_size > 0
                and cfg.HasField("dynamic_batching") and not _ungateable(cfg))

    async def _turn_off_triton_batcher(self, name: str, cfg: model_config_pb2.ModelConfig) -> None:
        """Reload ``name`` in Triton with its config less ``dynamic_batching`` (a load with a config
        override, as config mode does): behind the merged gate each request Triton gets is a whole
        batch, so its batcher only adds its idle-wait stalls. ``cfg`` is left as read, so the gate keeps
        the priority levels the model declared. Best effort: where Triton refuses (its model control
        mode is not explicit), the batcher stays on and the log says why."""
        from google.protobuf import json_format

        override = model_config_pb2.ModelConfig()
        override.CopyFrom(cfg)
        override.ClearField("dynamic_batching")
        request = service_pb2.RepositoryModelLoadRequest(model_name=name)
        request.parameters["config"].string_param = json_format.MessageToJson(
            override, preserving_proto_field_name=True, indent=None)
        load = self._channel.unary_unary(
            f"/{SERVICE}/RepositoryModelLoad",
            request_serializer=service_pb2.RepositoryModelLoadRequest.SerializeToString,
            response_deserializer=service_pb2.RepositoryModelLoadResponse.FromString,
        )
        try:
            await load(request, timeout=self.config.upstream_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("model %s: could not turn Triton's dynamic batcher off (%s: %s); it stays on (Triton must "
                        "run with --model-control-mode=explicit for the sidecar to reload a model)",
                        name, exc.code().name, exc.details())
            return
        log.info("model %s: Triton's dynamic batcher turned off behind the merged gate (reloaded with a config "
                 "override, as triton_batcher: off asks)", name)

    async def _triton_exiting(self) -> bool:
        """Whether Triton is shutting down (or away): its ServerReady then fails ("Server exiting").
        A ready=false answer is not that: with strict readiness Triton is "not ready" while any model
        loads, unloads or failed to load, and requests for other models are still served."""
        try:
            await self._server_ready(service_pb2.ServerReadyRequest(), timeout=self.config.upstream_timeout_s)
            return False
        except grpc.aio.AioRpcError:
            return True

    def _forget(self, state: ModelState) -> None:
        """Drop a model's cached config: the next request re-reads it. The state is kept aside, and
        the reload reuses it (gate, policy, controller, counters) when the model's batching is unchanged;
        otherwise its gate drains what it holds and the new state starts with the operator's settings."""
        key = (state.name, state.version)
        if self._models.get(key) is state:
            del self._models[key]
            self._retired[key] = state

    def model_changed(self, name: str) -> None:
        """Triton loaded or unloaded a model through the sidecar (repository control), or answered in
        a way only a changed config explains: what the sidecar knows of it is read again (a reload
        may change its max_batch_size, say). The native gate keeps its policy until the new one."""
        for key, state in list(self._models.items()):
            if key[0] == name:
                self._forget(state)
        for key in [k for k in self._unknown if k[0] == name]:
            del self._unknown[key]
        if self._native is not None and name not in self._native_loading and not self._closing:
            self._native_loading.add(name)
            self._spawn(self._native_relearn(name))

    def repository_call_done(self, request: bytes) -> None:
        """A RepositoryModelLoad or RepositoryModelUnload relayed through the sidecar succeeded."""
        try:
            name = service_pb2.RepositoryModelLoadRequest.FromString(request).model_name  # Unload's fields alike
        except DecodeError:
            return
        if is_model_name(name):
            self.model_changed(name)

    def set_rule(self, name: str, version: str, info: RuleInfo) -> None:
        """Replace a model's rule between two decisions (the event loop runs one at a time)."""
        state = self._models[(name, version)]
        if state.gate is None:
            raise ValueError(f"model {name!r} does not batch; it has no gate")
        state.info = info
        state.gate.set_rule(self._guarded(name, info.rule))
        self._pump(state)

    # -- native data plane -------------------------------------------------------------------
    def _native_event(self, kind: str, *args: Any) -> None:
        """What the native gate reported: feed the estimator, the learner, the stats and metrics
        exactly as the Python gate's own bookkeeping does (``infer``, ``_batch_done``)."""
        if self._closing and kind in ("seen", "lost", "loaded"):
            return
        if kind == "loaded":
            self.model_changed(args[0])
            return
        if kind == "lost":
            # Triton no longer knows a gated model (restarting, or unloaded): as the Python plane does
            # on NOT_FOUND, forget its config and read it again. Meanwhile the gate keeps gating with
            # the policy it has and answers UNAVAILABLE for what Triton refuses.
            name = args[0]
            state = self._models.get((name, ""))
            if state is not None:
                self._forget(state)
            if name not in self._native_loading:
                self._native_loading.add(name)
                self._spawn(self._native_relearn(name))
            return
        if kind == "seen":
            name = args[0]
            if (name, "") in self._models or name in self._native_loading:
                return
            self._native_loading.add(name)
            self._spawn(self._native_load(name))
            return
        if kind == "batch":
            rep = args[0]
            state = self._models.get((rep.model, ""))
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
        state = self._models.get((args[0], ""))
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

    async def _native_preload(self) -> None:
        """Gate the models Triton has ready before the first request: the native gate relays a model
        ungated until its policy arrives, so waiting for first traffic would let a burst through ungated.
        Best effort: with Triton away, models are gated as their first requests are seen."""
        index = self._channel.unary_unary(
            f"/{SERVICE}/RepositoryIndex",
            request_serializer=service_pb2.RepositoryIndexRequest.SerializeToString,
            response_deserializer=service_pb2.RepositoryIndexResponse.FromString,
        )
        try:
            resp = await index(service_pb2.RepositoryIndexRequest(ready=True), timeout=self.config.upstream_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.info("Triton's repository index is not available (%s): models are gated as they are seen",
                     exc.code().name)
            return
        for model in resp.models:
            if model.state == "READY" and (model.name, "") not in self._models:
                await self._native_load(model.name)

    async def _native_relearn(self, name: str, retry_s: float = 0.5, give_up_s: float = 600.0) -> None:
        """After ``lost``: read the model's config again once Triton has it (the state is reused and its
        policy pushed again). A model Triton is ready without is unloaded for good: relay it ungated."""
        try:
            end = self._clock() + give_up_s
            while self._clock() < end and not self._closing:
                try:
                    state = await self.model_state(name, "")
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
            await self.model_state(name, "")
        except GateError as exc:
            log.warning("cannot gate model %s yet: %s", name, exc.details)
        finally:
            self._native_loading.discard(name)

    # -- inference ---------------------------------------------------------------------------
    async def infer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        """One caller's request, answered exactly once (a response, or GateError)."""
        state = await self.model_state(request.model_name, request.model_version)
        if state is None:
            response = await self._call_triton(request)
            if self._unknown:
                self._known_again((request.model_name, request.model_version))
            return response
        if state.gate is None:
            return await self._call_triton(request)
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
            response = await self._call_triton(request)
        except GateError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                self.metrics.request_rejected(state.name, "invalid_argument")
            raise
        if self._models.get((state.name, state.version)) is state \
                and self._clock() - state.config_read_at >= _CONFIG_REREAD_S:
            log.info("Triton served a request model %s's config refuses: reading its config again", state.name)
            self.model_changed(state.name)
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
            self._forget(state)
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
                upstream = self._infer(req, timeout=self.config.upstream_timeout_s)
                if inline:
                    if asyncio.iscoroutine(upstream):  # a stand-in for the channel (tests)
                        upstream = self._loop.create_task(upstream)
                    try:
                        await _done(upstream)  # cancelling this wait leaves the upstream call running
                    except asyncio.CancelledError:
                        handed_off = True
                        self._spawn(self._run_on(state, calls, rows, start, upstream))
                        raise
                self._succeed(calls[0], await self._upstream(upstream))
            elif self.config.mode == "released":
                await self._dispatch_released(state, batch, start)
            else:
                merged = merge([c.request for c in calls], checked=True)
                self._stamp(state, merged.request, batch, start)
                response = await self._call_triton(merged.request)
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
            self._succeed(calls[0], await self._upstream(upstream))
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
                self._succeed(p.payload, await self._call_triton(req))
            except GateError as exc:
                state.stats.failed_requests += 1
                self._fail(p.payload, self._upstream_error(state, exc))

        await asyncio.gather(*(one(p) for p in batch))

    async def _call_triton(self, req: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        return await self._upstream(self._infer(req, timeout=self.config.upstream_timeout_s))

    @staticmethod
    async def _upstream(call: grpc.aio.UnaryUnaryCall) -> service_pb2.ModelInferResponse:
        """Triton's response to a started call, or its error as a GateError."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = exc.details() or ""
        # (raised outside the handler: raising inside it leaves this frame, the call and its request in
        # a reference cycle with the error, freed only by a garbage collection)
        if code == grpc.StatusCode.CANCELLED:
            # Not the caller's doing (that cancels this coroutine instead): Triton or the connection
            # ended the call, as when Triton shuts down. Retryable, as Triton being away is.
            code, details = grpc.StatusCode.UNAVAILABLE, f"Triton ended the call: {details}"
        elif code == grpc.StatusCode.UNAVAILABLE and "timeout" not in details.lower():
            details = f"Triton is unreachable: {details}"
        raise GateError(code, details)

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
        # The abort's error holds this frame, in a cycle with grpc's call state freed only by a garbage
        # collection: the frame must not hold the request then (12 refused 64 MiB requests held 860 MiB).
        del request
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
                        state = sidecar._models.get((req.model_name, req.model_version))
                        if state is None:
                            state = await sidecar.model_state(req.model_name, req.model_version)
                        if state is None or state.gate is None:
                            if relay is None:
                                md = _forward_metadata(context) if context is not None else None
                                relay = _StreamRelay(sidecar._stream(metadata=md), out)
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
        read_task.add_done_callback(_consume)
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
    if config.data_plane == "native":
        try:
            sidecar._native = await NativePlane.start(
                listen=config.listen, triton_url=config.triton_url, max_queue=config.max_queue,
                on_event=sidecar._native_event, binary=config.native_binary,
                upstream_timeout_s=config.upstream_timeout_s,
                deny=() if config.allow_repository_control else tuple(sorted(_REPOSITORY_CONTROL)),
            )
        except BaseException:
            await sidecar.close()
            raise
        log.info("native data plane (smdp-gate) listening on port %d, relaying to Triton at %s",
                 sidecar._native.port, config.triton_url)
        running = RunningSidecar(None, sidecar, sidecar._native.port, None)
        await _start_side_servers(running, config)
        await sidecar._native_preload()
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
                sidecar._channel, m.name, not m.client_streaming, not m.server_streaming, allowed,
                sidecar.repository_call_done if m.name in _REPOSITORY_CONTROL else None,
            )
    server = grpc.aio.server(options=_CHANNEL_OPTIONS[:2])
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
    sidecar.preload_auto_profiles()
    return running


async def _start_side_servers(running: RunningSidecar, config: SidecarConfig) -> None:
    """The control API and the metrics endpoint, whichever plane carries inference."""
    sidecar = running.sidecar
    if config.control_listen:
        from .control import start_control_server
        from .control_backend import SidecarControl

        try:
            running.control, running.control_port = await start_control_server(
                SidecarControl(sidecar), config.control_listen, config.control_token
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
            if sidecar._native is None:
                running.http, running.http_port = await start_http_front(config, submit=sidecar.infer)
            else:
                running.http, running.http_port = await start_http_front(config, gate_port=running.port)
        except BaseException:
            await running.stop(0)
            raise
        log.info("HTTP/REST API on port %d", running.http_port)
