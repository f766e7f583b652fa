"""What the sidecar knows of each model: its config from Triton, its gate, its rule and controller.

``ModelRegistry`` reads a model's config from Triton once (on its first request, or when the data
plane reports it), decides whether and how the model is gated (``build_rule``, an adaptive smdp
model's ``PolicyController``), asks the data plane for the gate (``GatePlane.new_gate``), and keeps
the state until Triton says the model changed. It remembers Triton's "no such model" for
``unknown_model_ttl_s``. The control API, the data planes and the servicer read and change models
only through its public methods.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2

from solver.arrival_model import POISSON, ArrivalModel
from solver.model import ServiceProfile
from solver.policy import BatchRule, MaxWaitGuard, PolicyTable
from solver.slo import SloTarget

from .batcher_notice import TritonBatcherNotice
from .config import ModelPolicyConfig, SidecarConfig
from .gate import GateCounters
from .loop.controller import ControllerConfig, PolicyController, RemoteSolver
from .metrics import SidecarMetrics
from .model_names import is_model_name
from .placement import Placement, placement
from .policies import RuleInfo, best_delay_slo, build_rule, gate_rule
from .upstream import GateError, Upstream, ended_by_triton

log = logging.getLogger("smdp.sidecar")

CONFIG_REREAD_S = 1.0
"""A model's config is read again on a sign it changed at most this often, seconds."""
MAX_UNKNOWN = 1024
"""Most (model, version) pairs remembered as unknown to Triton at once (``unknown_model_ttl_s``)."""
# ModelConfig errors that mean "this model cannot be gated": the request is relayed as is, so the
# caller gets exactly what Triton says to it. Any other error is the caller's answer.
_NOT_GATEABLE = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})


def ungateable(cfg: model_config_pb2.ModelConfig) -> bool:
    """Models whose requests must reach Triton as sent: decoupled ones (any number of responses per
    request, streamed) and sequence-batched ones (per-sequence state, correlation ids)."""
    return cfg.model_transaction_policy.decoupled or cfg.HasField("sequence_batching")


def consume(task: asyncio.Future) -> None:
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
    lag_s: float = 0.0
    """Sum over dispatched batches of the time from the gate's decision to the batch's dispatch, seconds:
    the slot is the batch's from the decision on, so this is service time no dispatch-to-completion time
    holds (the Python gate's turnaround through its event loop; the native gate dispatches as it decides)."""
    lag_n: int = 0
    """Batches ``lag_s`` covers (0: the plane does not measure it)."""

    def __post_init__(self) -> None:
        self.batches = np.zeros(self.max_batch + 1, dtype=np.int64)
        self.busy_s = np.zeros(self.max_batch + 1)

    def record(self, rows: int, seconds: float) -> None:
        i = min(rows, self.max_batch)
        self.batches[i] += 1
        self.busy_s[i] += seconds

    def record_lag(self, seconds: float) -> None:
        self.lag_s += max(seconds, 0.0)
        self.lag_n += 1


class Gate(Protocol):
    """What the registry and the control API read and set of a model's gate, on either plane
    (``plugin.gate.ModelGate``, ``plugin.native_plane.NativeGateView``)."""

    @property
    def slots(self) -> int: ...
    @property
    def queue_length(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def counters(self) -> GateCounters: ...
    @property
    def rule(self) -> BatchRule:
        """The rule the gate runs: the policy with its guard and hold (``Registry.guarded``)."""
        ...

    def set_rule(self, rule: BatchRule) -> None: ...
    def set_slots(self, slots: int) -> None: ...


@dataclass
class ModelState:
    name: str
    version: str
    config: model_config_pb2.ModelConfig
    gate: Gate | None
    info: RuleInfo | None
    stats: BatchStats
    default_priority: int
    priority_levels: int
    controller: PolicyController | None = None
    profile: ServiceProfile | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    config_read_at: float = 0.0
    """When its config was last read from Triton (sidecar clock)."""
    placement: Placement = Placement(1, 1, "one instance")
    """k instances on D devices, read from its config (``plugin.placement``)."""


class GatePlane(Protocol):
    """What the registry asks of the data plane that carries inference."""

    def new_gate(self, name: str, rule: BatchRule, *, slots: int, max_rows: int, default_priority: int,
                 priority_levels: int) -> Gate:
        """The gate of a model newly gated, running ``rule``."""
        ...

    def rule_changed(self, state: ModelState) -> None:
        """The model's rule was swapped: decide again now."""
        ...

    def priorities_changed(self, state: ModelState) -> None:
        """The model came back with its config read again: its priority levels may have changed."""
        ...

    def model_changed(self, name: str) -> None:
        """The registry forgot what it knew of ``name`` (it is read again at the next sign of it)."""
        ...

    def hold(self, name: str, max_batch: int, budget_s: float) -> None:
        """A ``profile: auto`` sweep of ``name`` (at most ``budget_s``) starts before its gate opens: its
        requests must wait for the gate, not run beside the sweep."""
        ...


class _NoPlane:
    """Before ``ModelRegistry.attach``: no gate can be made."""

    def new_gate(self, name: str, rule: BatchRule, *, slots: int, max_rows: int, default_priority: int,
                 priority_levels: int) -> Gate:
        raise RuntimeError("the registry has no data plane attached")

    def rule_changed(self, state: ModelState) -> None:
        pass

    def priorities_changed(self, state: ModelState) -> None:
        pass

    def model_changed(self, name: str) -> None:
        pass

    def hold(self, name: str, max_batch: int, budget_s: float) -> None:
        pass


class ModelRegistry:
    """Per-model state, Triton's model configs, rules and controllers; runs on the event loop."""

    def __init__(self, config: SidecarConfig, upstream: Upstream, metrics: SidecarMetrics,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.metrics = metrics
        self._upstream = upstream
        self._clock = clock
        self._plane: GatePlane = _NoPlane()
        self._loop = asyncio.get_running_loop()
        self._models: dict[tuple[str, str], ModelState] = {}
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self._unknown: dict[tuple[str, str], float] = {}
        """Models Triton said it does not know, and until when that answer is trusted (clock time)."""
        self._retired: dict[tuple[str, str], ModelState] = {}
        """Forgotten models' states (NOT_FOUND from Triton): reused by the next load when it can be."""
        self._tasks: set[asyncio.Task] = set()
        self._batcher_notice = TritonBatcherNotice(chosen="triton_batcher" in config.model_fields_set)
        self._solver = None
        if config.solver_url:
            from solver.service import AsyncSolverClient

            self._solver = AsyncSolverClient(config.solver_url, timeout_s=config.solver_timeout_s)
        self._retune = self._loop.create_task(self._retune_loop())

    def attach(self, plane: GatePlane) -> None:
        """The data plane whose gates the registry's models get (once, before the first model)."""
        self._plane = plane

    def clock(self) -> float:
        return self._clock()

    async def close(self) -> None:
        self._batcher_notice.close()
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

    # -- reads -------------------------------------------------------------------------------
    def models(self) -> dict[tuple[str, str], ModelState]:
        """Every model the sidecar knows now, gated or not, by (name, version)."""
        return dict(self._models)

    def get(self, name: str, version: str) -> ModelState | None:
        """The model's state if it is known now (no call to Triton)."""
        return self._models.get((name, version))

    def gated(self, model: str) -> ModelState | None:
        """The state of a gated model by name (any version), None when it has no gate (yet)."""
        for (name, _), state in self._models.items():
            if name == model and state.gate is not None:
                return state
        return None

    def gated_models(self) -> list[str]:
        return sorted({name for (name, _), s in self._models.items() if s.gate is not None})

    def policy_config(self, model: str) -> ModelPolicyConfig:
        return self.config.policy_for(model)

    def config_stale(self, state: ModelState) -> bool:
        """Whether ``state`` is the one in force and its config may be read again (a sign it changed)."""
        return self._models.get((state.name, state.version)) is state \
            and self._clock() - state.config_read_at >= CONFIG_REREAD_S

    def unknown(self) -> list[tuple[str, str]]:
        """The models remembered as unknown to Triton, oldest first."""
        return list(self._unknown)

    # -- loading -----------------------------------------------------------------------------
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
            pending.add_done_callback(consume)
            self._tasks.add(pending)
            pending.add_done_callback(self._tasks.discard)
        return await asyncio.shield(pending)

    def known_again(self, name: str, version: str) -> None:
        """Triton answered a relayed request of a model remembered as unknown: gate it from now on."""
        if self._unknown:
            self._unknown.pop((name, version), None)

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

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        if len(self._unknown) >= MAX_UNKNOWN:
            for k in [k for k, t in self._unknown.items() if t <= now]:
                del self._unknown[k]
            while len(self._unknown) >= MAX_UNKNOWN:
                del self._unknown[next(iter(self._unknown))]  # the oldest entry
        self._unknown[key] = now + ttl

    async def _read_config(self, name: str, version: str) -> model_config_pb2.ModelConfig | None:
        """The model's config from Triton; None when Triton does not know it (or cannot gate it)."""
        try:
            resp = await self._upstream.model_config(
                service_pb2.ModelConfigRequest(name=name, version=version),
                timeout=self.config.upstream_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise GateError(grpc.StatusCode.UNAVAILABLE, f"Triton is unreachable: {exc.details()}") from None
            if code == grpc.StatusCode.CANCELLED:  # as for an inference (Upstream.answer)
                raise ended_by_triton(exc.details() or "") from None
            if code not in _NOT_GATEABLE:
                raise GateError(code, exc.details() or "") from None
            if await self._upstream.exiting():
                # Triton unloads every model while it shuts down: not the model's fault, retryable.
                raise GateError(grpc.StatusCode.UNAVAILABLE, "Triton is not ready (starting or stopping)") from None
            return None  # an unknown model, or one unloading: Triton's own answer
        return resp.config

    async def _load_state(self, name: str, version: str) -> ModelState | None:
        cfg = await self._read_config(name, version)
        if cfg is None:
            return None
        if self._batcher_to_turn_off(cfg):
            await self._turn_off_triton_batcher(name, cfg)
        where = placement(cfg)
        slots = where.instances
        dyn = cfg.dynamic_batching
        levels = dyn.priority_levels if cfg.HasField("dynamic_batching") else 0
        default_level = dyn.default_priority_level if levels else 0
        old = self._retired.pop((name, version), None)
        if old is not None and old.gate is not None and not ungateable(cfg) \
                and cfg.max_batch_size == old.config.max_batch_size:
            # The same model back (Triton restarted): keep its gate, whose batches may still be in
            # flight, its policy and controller (operator settings included) and its counters.
            old.config = cfg
            old.config_read_at = self._clock()
            old.gate.set_slots(slots)
            old.placement = where
            if old.controller is not None:
                old.controller.set_placement(slots, where.devices)  # the next re-solve is for the new k, D
            old.priority_levels = levels
            old.default_priority = default_level or (levels or 0)
            self._plane.priorities_changed(old)
            log.info("model %s is back: gating it as before (%d slot(s))", name, slots)
            return old
        gate = info = profile = None
        max_rows = max(cfg.max_batch_size, 1)
        policy_cfg = self.config.policy_for(name)
        if cfg.max_batch_size > 0 and not ungateable(cfg):
            auto_note = ""
            if policy_cfg.profile == "auto" and policy_cfg.policy == "smdp":
                policy_cfg, auto_note = await self._auto_profile(name, version, policy_cfg)
            if policy_cfg.policy == "smdp" and policy_cfg.adaptive:
                info, profile = self._adaptive_start(name, policy_cfg, cfg.max_batch_size)
            else:
                info = await self._loop.run_in_executor(None, build_rule, name, policy_cfg, cfg.max_batch_size, slots,
                                                        where.devices)
            if auto_note:
                info = replace(info, spec=f"{info.spec} ({auto_note})")
            gate = self._plane.new_gate(
                name, self.guarded(name, info.rule), slots=slots, max_rows=info.max_batch,
                default_priority=default_level or (levels or 0), priority_levels=levels,
            )
            max_rows = info.max_batch
            log.info("gating model %s (B=%d, %d slot(s) on %d device(s): %s; policy %s)", name, info.max_batch, slots,
                     where.devices, where.why, info.spec)
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
            placement=where,
        )
        state.stats.started_at = state.config_read_at = self._clock()
        if profile is not None:
            state.controller = self._controller(state, policy_cfg, profile, slots, where.devices)
            if old is not None and old.controller is not None:
                # what the operator set through the control API outlives a changed config
                if old.controller.latency_target_s is not None:
                    state.controller.set_latency_target(old.controller.latency_target_s)
                else:
                    state.controller.set_weight(old.controller.weight)
                if old.controller.slo_rule is not None:
                    state.controller.set_slo(old.controller.slo_rule)
                elif old.controller.slo is not None:
                    state.controller.set_slo(old.controller.slo)
        return state

    def _controller(self, state: ModelState, policy_cfg: ModelPolicyConfig, profile: ServiceProfile,
                    slots: int, devices: int) -> PolicyController:
        """The adaptive smdp model's controller; it installs its solved policies through ``_install``."""
        controller = PolicyController(
            state.name,
            profile,
            ControllerConfig.of(policy_cfg, self.config, max_batch=state.info.max_batch, instances=slots,
                                devices=devices),
            install=lambda policy: self._install(state, policy),
            clock=self._clock,
            solver=RemoteSolver(self._solver) if self._solver is not None else None,
            stats=state.stats,
            metrics=self.metrics,
        )
        slo = policy_cfg.slo
        if slo is not None and slo.latency_s is None:
            controller.set_slo(best_delay_slo(slo))
        elif slo is not None:
            controller.set_slo(SloTarget(slo.quantile, slo.latency_s, slo.margin_s))
        return controller

    async def _auto_profile(self, name: str, version: str, cfg: ModelPolicyConfig) -> tuple[ModelPolicyConfig, str]:
        """``profile: auto``: the measured (or cached) profile in place of "auto", or greedy and why."""
        from .auto_profile import auto_profile

        got = await auto_profile(self.config.triton_url, name, version, cfg,
                                 self.config.profile_cache_dir.expanduser(),
                                 metrics_url=self.config.triton_metrics_url, timeout_s=self.config.upstream_timeout_s,
                                 before_sweep=lambda b: self._plane.hold(name, b, cfg.profile_auto_s))
        if got.path is None:
            log.warning("model %s: %s; gating it greedily instead of smdp", name, got.reason)
            return cfg.model_copy(update={"policy": "greedy", "profile": None}), got.reason
        log.info("model %s: %s", name, got.reason)
        return cfg.model_copy(update={"profile": got.path}), got.reason

    @staticmethod
    def _adaptive_start(name: str, cfg: ModelPolicyConfig, model_max_batch: int) -> tuple[RuleInfo, ServiceProfile]:
        """An adaptive smdp model starts greedy; its controller installs the solved policy shortly."""
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

    def _batcher_to_turn_off(self, cfg: model_config_pb2.ModelConfig) -> bool:
        """A gated model whose Triton batcher the operator asked the sidecar to turn off (merged mode)."""
        return (self.config.triton_batcher == "off" and self.config.mode == "merged" and cfg.max_batch_size > 0
                and cfg.HasField("dynamic_batching") and not ungateable(cfg))

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
        try:
            await self._upstream.repository_load(request, timeout=self.config.upstream_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("model %s: could not turn Triton's dynamic batcher off (%s: %s); it stays on (Triton must "
                        "run with --model-control-mode=explicit for the sidecar to reload a model)",
                        name, exc.code().name, exc.details())
            return
        log.info("model %s: Triton's dynamic batcher turned off behind the merged gate (reloaded with a config "
                 "override, as triton_batcher: off asks)", name)

    # -- rules -------------------------------------------------------------------------------
    def guarded(self, model: str, rule: BatchRule, arrivals: ArrivalModel = POISSON) -> BatchRule:
        """The rule the gate runs: the policy, with the model's max-wait guard if it has one, and its
        group hold where the policy was solved for ``arrivals`` that come in groups."""
        return gate_rule(self.config.policy_for(model), rule, arrivals)

    def _install(self, state: ModelState, policy: PolicyTable) -> None:
        """Swap in a solved table; the event loop runs one decision at a time, so this is atomic."""
        current = state.controller.current if state.controller is not None else None
        pred = None
        if current is not None:
            pred = {"mean_latency_s": current.mean_latency_s, "mean_power_w": current.mean_power_w}
        state.info = RuleInfo(policy, "smdp", policy.max_batch, pred)
        own_wait = current.max_wait_s if current is not None else None
        rule = policy if own_wait is None else MaxWaitGuard(policy, own_wait)  # an SLO policy's guard
        state.gate.set_rule(self.guarded(state.name, rule, current.arrivals if current is not None else POISSON))
        self._plane.rule_changed(state)

    def set_rule(self, name: str, version: str, info: RuleInfo) -> None:
        """Replace a model's rule between two decisions (the event loop runs one at a time)."""
        state = self._models[(name, version)]
        if state.gate is None:
            raise ValueError(f"model {name!r} does not batch; it has no gate")
        state.info = info
        state.gate.set_rule(self.guarded(name, info.rule))
        self._plane.rule_changed(state)

    # -- changes -----------------------------------------------------------------------------
    def forget(self, state: ModelState) -> None:
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
        may change its max_batch_size, say)."""
        for key, state in list(self._models.items()):
            if key[0] == name:
                self.forget(state)
        for key in [k for k in self._unknown if k[0] == name]:
            del self._unknown[key]
        self._plane.model_changed(name)

    def repository_call_done(self, request: bytes) -> None:
        """A RepositoryModelLoad or RepositoryModelUnload relayed through the sidecar succeeded."""
        try:
            name = service_pb2.RepositoryModelLoadRequest.FromString(request).model_name  # Unload's fields alike
        except DecodeError:
            return
        if is_model_name(name):
            self.model_changed(name)

    # -- the closed loop ---------------------------------------------------------------------
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
        m.set_queue(state.name, state.gate.queue_length, state.gate.in_flight, state.gate.slots,
                    state.placement.devices)
        m.set_holds(state.name, state.gate.counters.decisions_held)
        c = state.controller
        if c is not None:
            est = c.rate.estimate(now)
            m.set_rate(state.name, est.rate, est.lo, est.hi)
            if c.current is not None:
                m.set_policy(state.name, c.version, c.current.policy.threshold(), c.current.mean_latency_s,
                             c.current.mean_power_w)
