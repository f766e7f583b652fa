"""Keeping each model's SMDP policy right while it runs: rate estimate -> solve -> atomic swap.

One ``PolicyController`` per gated model that uses the ``smdp`` policy. It owns the arrival-rate
estimator, the operator's weight and latency target, and the policy's version. Solving never runs
on the event loop: it goes to the solver service (``solver_url``) or, without one, to a worker
thread. If the solver cannot be reached the gate keeps its last policy and the status says so.

Why a periodic tick and not a check on every arrival: the estimator's change detector is O(1) per
arrival already; deciding to re-solve at most every ``retune_interval_s`` bounds how often a
burst of noise can ask for solves, and a silence (rate drop) is noticed without any arrival.
Steps are found by the estimator's CUSUM (ratio ``change_ratio``); drifts smaller than that by a
look every ``3 x window_s`` at the windowed estimate.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import PolicyTable, greedy

from .estimator import RateEstimator

log = logging.getLogger("smdp.adaptive")

WEIGHT_SEARCH_MAX = 1.0
"""Upper end of the latency-target weight search, seconds per watt (far past any useful trade-off)."""


@dataclass
class Solution:
    """A policy and what the solver predicted for it."""

    policy: PolicyTable
    rate_rps: float
    weight: float
    mean_latency_s: float
    mean_power_w: float
    gain: float
    mean_batch: float
    source: str


class PolicyController:
    """The adaptive policy of one model; all methods run on the sidecar's event loop."""

    def __init__(
        self,
        model: str,
        profile: ServiceProfile,
        *,
        max_batch: int,
        idle_power_w: float,
        weight: float,
        install: Callable[[PolicyTable], None],
        clock: Callable[[], float],
        solver: Any | None = None,
        initial_rate: float | None = None,
        window_s: float = 10.0,
        change_ratio: float = 1.5,
        min_arrivals: int = 30,
        drift_tolerance: float = 0.15,
    ) -> None:
        self.model = model
        self.profile = profile.truncated(max_batch) if profile.max_batch != max_batch else profile
        self.max_batch = max_batch
        self.idle_power_w = idle_power_w
        self.weight = weight
        self.latency_target_s: float | None = None
        self._install = install
        self._clock = clock
        self._solver = solver
        self.rate = RateEstimator(clock(), window_s=window_s, change_ratio=change_ratio, min_arrivals=min_arrivals)
        self.drift_tolerance = drift_tolerance
        self.refresh_s = 3.0 * window_s
        self.current: Solution | None = None
        self.version = 0
        self.installed_at = clock()
        self.solver_reachable = solver is None
        self.note = ""
        self.solves = 0
        self._task: asyncio.Task | None = None
        self._dirty = initial_rate is not None
        self._initial_rate = initial_rate

    @property
    def capacity(self) -> float:
        return self.max_batch / float(self.profile.mean_s[self.max_batch - 1])

    # -- inputs ------------------------------------------------------------------------------
    def observe_arrival(self, t: float) -> None:
        self.rate.observe(t)

    def set_weight(self, weight: float) -> None:
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and >= 0 seconds per watt, got {weight!r}")
        self.weight = weight
        self.latency_target_s = None
        self._dirty = True

    def set_latency_target(self, target_s: float | None) -> None:
        if target_s is not None and (not math.isfinite(target_s) or target_s <= 0):
            raise ValueError(f"latency target must be finite and > 0 seconds, got {target_s!r}")
        self.latency_target_s = target_s
        self._dirty = True

    # -- the loop ----------------------------------------------------------------------------
    def due(self, now: float) -> float | None:
        """The rate to solve for now, or None when the policy in force still fits."""
        if self._task is not None and not self._task.done():
            return None
        if self.rate.ready(now):
            # Steps (up, down, or silence) are the CUSUM's job: when it fires, the estimate restarts
            # at the change point, so the new policy is solved for the new rate, not a blend.
            est = self.rate.estimate(now)
            if self._dirty or self.rate.changed(now) or not self.solver_reachable:
                return est.rate
            # Slow drifts smaller than the detector's ratio: a periodic look, long enough after the
            # last solve that it never races the detector after a step.
            ref = self.current.rate_rps if self.current is not None else None
            if (
                ref is not None
                and now - self.installed_at >= self.refresh_s
                and abs(est.rate - ref) > self.drift_tolerance * ref
                and not est.contains(ref)
            ):
                return est.rate
            return None
        if self._dirty and (self.current is not None or self._initial_rate is not None):
            return self.current.rate_rps if self.current is not None else self._initial_rate
        return None

    def tick(self, now: float) -> asyncio.Task | None:
        """Start a re-solve if one is due; returns its task."""
        rate = self.due(now)
        if rate is None:
            return None
        self._dirty = False
        self._task = asyncio.get_running_loop().create_task(self._resolve(rate, now))
        return self._task

    async def _resolve(self, rate: float, asked_at: float) -> None:
        try:
            solution = await self._solution_for(rate)
        except Exception as exc:  # the solver failed: keep the policy in force
            self.solver_reachable = False
            self._dirty = True
            self.note = f"solver unavailable, keeping policy v{self.version}: {exc}"
            log.warning("%s: %s", self.model, self.note)
            return
        self.solver_reachable = True
        self.solves += 1
        self.current = solution
        self.version += 1
        self.installed_at = self._clock()
        self._install(solution.policy)  # atomic: one assignment between two decisions
        self.rate.reset(self._clock(), solution.rate_rps)
        if not self.note.startswith("overload") and not self.note.startswith("latency target"):
            self.note = ""
        log.info(
            "%s: policy v%d for %.1f req/s, w=%.3g (%s): threshold %s, predicted W %.3f ms, P %.1f W",
            self.model, self.version, solution.rate_rps, solution.weight, solution.source,
            solution.policy.threshold(), solution.mean_latency_s * 1e3, solution.mean_power_w,
        )

    async def _solution_for(self, rate: float) -> Solution:
        self.note = ""
        if rate >= self.capacity:
            # No stationary policy exists; serve full batches, the bounded queue sheds the excess.
            self.note = (f"overload: estimated rate {rate:.1f}/s >= capacity {self.capacity:.1f}/s; "
                         "serving full batches, excess is refused with RESOURCE_EXHAUSTED")
            return Solution(greedy(self.max_batch), rate, self.weight, math.inf, math.nan, math.inf, self.max_batch,
                            "overload fallback")
        if self.latency_target_s is None:
            return await self._solve(rate, self.weight)
        return await self._search_weight(rate, self.latency_target_s)

    async def _search_weight(self, rate: float, target_s: float) -> Solution:
        """The largest w whose predicted W meets the target: least power subject to the target.

        Predicted W grows with w (more waiting buys less power), so bisect on log w.
        """
        best = await self._solve(rate, 0.0)
        if best.mean_latency_s > target_s:
            self.note = (f"latency target {target_s * 1e3:.3f} ms is below the least achievable "
                         f"{best.mean_latency_s * 1e3:.3f} ms at {rate:.1f}/s; serving for least latency")
            return best
        top = await self._solve(rate, WEIGHT_SEARCH_MAX)
        if top.mean_latency_s <= target_s:
            self.weight = WEIGHT_SEARCH_MAX
            return top
        lo, hi = -9.0, math.log10(WEIGHT_SEARCH_MAX)
        for _ in range(14):
            mid = (lo + hi) / 2
            sol = await self._solve(rate, 10**mid)
            if sol.mean_latency_s <= target_s:
                lo, best = mid, sol
            else:
                hi = mid
        self.weight = best.weight
        return best

    async def _solve(self, rate: float, weight: float) -> Solution:
        model = BatchingModel(rate=rate, max_batch=self.max_batch, profile=self.profile,
                              idle_power_w=self.idle_power_w, weight=weight)
        warm = self.current.policy if self.current is not None else None
        if self._solver is not None:
            r = await self._solver.solve(model, warm_start=warm)
            source = "solver service (cached)" if r.cached else "solver service"
        else:
            from solver.smdp import solve

            r = await asyncio.get_running_loop().run_in_executor(None, lambda: solve(model, warm_start=warm))
            source = "in-process solver"
        return Solution(r.policy, rate, weight, r.mean_latency_s, r.mean_power_w, r.gain, r.mean_batch, source)

    async def wait_idle(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
