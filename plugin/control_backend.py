"""The sidecar's answers to the control API (``smdp.v1.Control``): status, weight, target, policy.

Runs on the sidecar's event loop (the control server shares it), so reads and writes of gate state
happen between two decisions and need no lock.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from solver.policy import GateRule, PolicyTable
from solver.slo import SloTarget

from .control import Figures, ModelStatusInfo, PolicyInfo, ServiceTimeInfo, SloStatusInfo, UnknownModel
from .metrics import PREFIX

if TYPE_CHECKING:
    from .registry import ModelRegistry, ModelState


class SidecarControl:
    """``ControlBackend`` over a running sidecar's ``ModelRegistry``; models appear once gated."""

    def __init__(self, registry: "ModelRegistry") -> None:
        self.registry = registry

    def _state(self, model: str) -> "ModelState":
        state = self.registry.gated(model)
        if state is None:
            raise UnknownModel(model)
        return state

    def models(self) -> list[str]:
        return self.registry.gated_models()

    async def set_weight(self, model: str, weight: float) -> None:
        c = self._state(model).controller
        if c is None:
            raise ValueError(f"model {model!r} is not served by an adaptive smdp policy; its weight has no effect")
        await c.try_weight(weight)  # refused (ValueError) when its solve does not converge
        c.tick(self.registry.clock())

    def set_latency_target(self, model: str, target_s: float | None) -> None:
        c = self._state(model).controller
        if c is None:
            raise ValueError(f"model {model!r} is not served by an adaptive smdp policy; it has no latency target")
        c.set_latency_target(target_s)
        c.tick(self.registry.clock())

    def set_slo(self, model: str, target: SloTarget | None) -> None:
        c = self._state(model).controller
        if c is None:
            raise ValueError(f"model {model!r} is not served by an adaptive smdp policy; it cannot take an SLO")
        c.set_slo(target)
        c.tick(self.registry.clock())

    def policy(self, model: str) -> PolicyInfo:
        state = self._state(model)
        rule = state.info.rule  # the policy itself, without the gate's max-wait guard
        c = state.controller
        version = c.version if c is not None else 1
        installed = c.installed_at if c is not None else state.stats.started_at
        actions = rule.actions.tolist() if isinstance(rule, PolicyTable) else []
        threshold = rule.threshold() if isinstance(rule, PolicyTable) else None
        busy: tuple[tuple[int, ...], ...] = ()
        if isinstance(rule, GateRule) and rule.max_wait_s is None:  # a k-instance table (no timer)
            actions, busy = list(rule.table), rule.busy_tables
        try:
            hold = GateRule.of(state.gate.rule).hold_s if state.gate is not None else 0.0
        except ValueError:  # a rule only the simulator knows: no hold
            hold = 0.0
        return PolicyInfo(actions, rule.max_batch, version, self.registry.clock() - installed,
                          state.info.spec if state.info else "", threshold, busy, hold if hold > 0 else None)

    def _rejected(self, model: str, reason: str) -> int:
        """Requests refused for ``reason`` (the metrics' ``requests_rejected`` counter; 0 if none yet)."""
        value = self.registry.metrics.registry.get_sample_value(
            PREFIX + "requests_rejected_total", {"model": model, "reason": reason})
        return int(value or 0)

    @staticmethod
    def _service_times(c) -> list[ServiceTimeInfo]:
        """tau(b) per size with data: the gate's mean, the prior, and the profile in force."""
        if c is None or c.learner is None:
            return []
        return [
            ServiceTimeInfo(
                batch_size=s.batch_size, samples=s.n, mean_s=s.mean_s if s.n else None,
                ci_s=s.ci_s if s.n >= 2 else None, prior_s=s.prior_s, in_force_s=s.learned_s,
                triton_compute_s=s.triton_compute_s, triton_batches=s.triton_n,
            )
            for s in c.learner.sizes(c.profile)
        ]

    def status(self, model: str) -> ModelStatusInfo:
        state = self._state(model)
        now = self.registry.clock()
        c = state.controller
        st = state.stats
        weight = c.weight if c is not None else self.registry.policy_config(model).weight
        pol = self.policy(model)
        predicted = None
        if c is not None and c.current is not None and math.isfinite(c.current.mean_latency_s):
            s = c.current
            predicted = Figures(s.mean_latency_s, s.mean_power_w, s.mean_latency_s + weight * s.mean_power_w,
                                s.rate_rps, s.mean_batch)
        measured = None
        power_modelled = True
        elapsed = now - st.started_at
        if st.latency_n and elapsed > 0:
            w_meas = st.latency_sum_s / st.latency_n
            p_meas = math.nan
            reading = c.power_reading(now, st) if c is not None else None
            if reading is not None:
                # measured from Triton's GPU metrics when it reports a GPU, else modelled from the profile
                p_meas, power_modelled = reading.power_w, reading.modelled
            elif state.profile is not None:
                p = state.profile
                top = min(len(st.batches) - 1, p.max_batch)
                counts = st.batches[1: top + 1].astype(float)
                energy = float(np.dot(counts, p.energy_j[:top]))
                busy = float(np.dot(counts, p.mean_s[:top]))
                idle_w = self.registry.policy_config(model).idle_power_w
                p_meas = state.placement.modelled_power_w(energy, busy, elapsed, idle_w)
            batches = int(st.batches.sum())
            mean_batch = float(np.dot(np.arange(len(st.batches)), st.batches)) / batches if batches else 0.0
            measured = Figures(w_meas, p_meas, w_meas + weight * (p_meas if math.isfinite(p_meas) else 0.0),
                               st.latency_n / elapsed, mean_batch)
        return ModelStatusInfo(
            model=model,
            weight=weight,
            max_batch=state.info.max_batch,
            policy_version=pol.version,
            policy_age_s=pol.age_s,
            policy_source=(f"{c.current.source}, {c.current.profile_source}{_scaled(c.current)}"
                           if c is not None and c.current is not None else pol.source),
            rate=c.rate.estimate(now) if c is not None else None,
            latency_target_s=c.latency_target_s if c is not None else None,
            threshold=pol.threshold,
            predicted=predicted,
            predicted_rate_rps=c.current.rate_rps if c is not None and c.current is not None else 0.0,
            measured=measured,
            batch_histogram=st.batches.tolist(),
            batch_mean_s=np.divide(st.busy_s, st.batches, out=np.zeros_like(st.busy_s), where=st.batches > 0).tolist(),
            dispatch_lag=(st.lag_n, st.lag_s / st.lag_n) if st.lag_n else None,
            queue_length=state.gate.queue_length,
            in_flight=state.gate.in_flight,
            instances=state.gate.slots,
            devices=state.placement.devices,
            completed=st.latency_n,
            rejected=state.gate.counters.rejected,
            rejected_expired=state.gate.counters.expired,
            rejected_invalid=self._rejected(model, "invalid_argument"),
            failed=st.failed_requests,
            solver_reachable=c.solver_reachable if c is not None else True,
            power_modelled=power_modelled,
            service_times=self._service_times(c),
            profile_updates=c.profile_version if c is not None else 0,
            profile_batches=c.learner.batches if c is not None and c.learner is not None else 0,
            profile_learning=c is not None and c.learner is not None,
            slo=(_slo_status(c, now) if c is not None
                 else _fixed_slo_status(self.registry.policy_config(model), state.info)),
            note="; ".join(x for x in (
                c.note if c is not None else "",
                c.learning_summary(now) if c is not None else "",
                "" if state.profile is not None or c is not None else "no profile: power unknown",
            ) if x),
        )


def _slo_status(c, now: float) -> SloStatusInfo | None:
    """The SLO, the search's prediction for the policy in force (if it was solved for this SLO) and
    the measurement over the rate estimator's window."""
    if c is None or c.slo is None:
        return None
    sol = c.current
    pred = sol.slo if sol is not None else None
    meas = c.measured_slo(now)
    gap = c.slo_gap
    return SloStatusInfo(
        quantile=c.slo.quantile, latency_s=c.slo.latency_s,
        feasible=pred.feasible if pred is not None else False,
        predicted_quantile_s=pred.quantile_s if pred is not None else None,
        predicted_ci95_s=pred.ci95_s if pred is not None else None,
        measured_quantile_s=meas.quantile_s if meas is not None else None,
        attainment=meas.attainment if meas is not None else None,
        samples=meas.samples if meas is not None else 0,
        max_wait_s=sol.max_wait_s if sol is not None and pred is not None else None,
        margin_s=c.slo.margin_s, correction_s=c.slo_offset_s,
        stall_held_up=gap.held_up if gap is not None else 0,
        stalled_s=gap.stalled_s if gap is not None else 0.0,
        correction_with_stalls_s=max(0.0, gap.with_stalls_s) if gap is not None and gap.at_quantile else None,
        derived_bound=c.slo_bound.describe() if c.slo_bound is not None else "",
    )


def _fixed_slo_status(cfg, info) -> SloStatusInfo | None:
    """A fixed SLO model's status (``adaptive: false`` with ``slo``; ``plugin.policies``): its SLO and
    what the one search at ``rate_rps`` predicted. Nothing is measured against it (no controller)."""
    pred = info.prediction if info is not None else None
    if cfg is None or cfg.slo is None or not pred or "predicted_quantile_s" not in pred:
        return None
    return SloStatusInfo(
        quantile=cfg.slo.quantile, latency_s=pred.get("slo_latency_s", cfg.slo.latency_s),
        feasible=bool(pred["slo_feasible"]), predicted_quantile_s=pred["predicted_quantile_s"],
        max_wait_s=pred.get("max_wait_s"), margin_s=cfg.slo.margin_s, derived_bound=pred.get("bound", ""),
    )


def _scaled(solution) -> str:
    """How the policy's w differs from the operator's (the long-run scaling, plugin/loop/controller.py), if it does."""
    w, solved = solution.weight, solution.solved_weight
    if solved is None or w <= 0 or abs(solved / w - 1.0) < 0.01:
        return ""
    return f", solved with w x {solved / w:.2f} = {solved:.3g} for this rate against the long-run mean"
