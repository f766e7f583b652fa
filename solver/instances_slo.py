"""Tail-latency SLO for k instances: the least-J threshold policy a(n, m), optionally with a max-wait
guard, whose q-quantile of response time stays within D.

``solver.slo.solve_slo`` does this for one instance (tables a(n) solved for w' <= w, a guard searched
per table, quantiles from the event simulator). Here the family is the k-instance one:

* tables: the m-dependent control limits T = (T_0..T_{k-1}) that ``solve_instances`` finds for
  w' in w x (1, 0.3, 0.1, 0.03, 0.01, 0) (``solver.slo``'s ladder), plus greedy (1, ..., 1);
* guards: each table alone and with a max-wait guard g = f x D for f in ``GUARD_FRACTIONS``; then,
  per table, one refinement between its largest feasible and smallest infeasible fraction;
* judged on common random numbers by the vectorised lanes (``solver.threshold_lanes``: every
  candidate sees one arrival stream and one set of service-time quantiles), with every counted
  request's response time kept; the q-quantile and its 95% half-width come from sectioning
  (``solver.slo.sectioned_quantile``, 20 consecutive blocks of the arrival-ordered latencies), so a
  candidate is feasible when the *upper* bound is <= D - margin (``SloTarget.budget_s``), as in
  ``solve_slo``.

The least J = W + w P (at the model's own w) among the feasible candidates is chosen; when none is
feasible the result is greedy flagged ``feasible = False`` (never a silent violation). k = 1 is
``solver.slo.solve_slo``'s job (the exact SMDP tables, not a threshold family).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from solver.instances import solve_instances
from solver.model import BatchingModel, ModelError
from solver.policy import InstanceGuard, InstanceTable, instance_thresholds
from solver.slo import QuantileEstimate, SloTarget, sectioned_quantile
from solver.threshold_lanes import ThresholdLanes

WEIGHT_STEPS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.0)
"""Weights the tables are solved for, as fractions of the model's w (``solver.slo``'s ladder)."""
GUARD_FRACTIONS = (0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05)
"""Max-wait guards tried with every table, as fractions of the budget D."""
REFINE_STEPS = 3
"""Guards tried per table between its largest feasible and smallest infeasible fraction."""
TAIL_SAMPLES = 400
"""Counted requests beyond the q-quantile per candidate (sets the run length, as in ``solver.slo``)."""
REPLICATIONS = 40
"""Lanes per candidate; the segment length follows from the run length."""


@dataclass(frozen=True, eq=False)
class InstanceSloCandidate:
    """One member of the family: control limits solved for ``table_weight``, guarded by ``max_wait_s``."""

    thresholds: tuple[int, ...]
    table_weight: float
    """w' the limits were solved for (nan: greedy)."""
    max_wait_s: float | None
    estimate: QuantileEstimate
    mean_latency_s: float
    mean_power_w: float
    cost: float
    """J = W + w P at the model's weight."""
    feasible: bool
    max_batch: int
    mean_batch: float
    """Requests per batch."""

    @property
    def table(self) -> InstanceTable:
        return instance_thresholds(self.max_batch, self.thresholds)

    @property
    def rule(self) -> InstanceTable | InstanceGuard:
        return self.table if self.max_wait_s is None else InstanceGuard(self.table, self.max_wait_s)


@dataclass(frozen=True, eq=False)
class InstanceSloResult:
    model: BatchingModel
    target: SloTarget
    chosen: InstanceSloCandidate
    feasible: bool
    """False: no candidate met D; ``chosen`` is greedy, not compliant."""
    candidates: tuple[InstanceSloCandidate, ...]
    requests: int
    """Counted requests per candidate (common random numbers)."""
    solve_time_s: float

    def to_dict(self) -> dict:
        c = self.chosen
        return {
            "policy": [[int(a) for a in row] for row in c.table.actions],
            "thresholds": list(c.thresholds),
            "instances": self.model.instances,
            "max_wait_s": c.max_wait_s,
            "table_weight": None if math.isnan(c.table_weight) else c.table_weight,
            "slo_feasible": self.feasible,
            "slo_quantile": self.target.quantile,
            "slo_latency_s": self.target.latency_s,
            "slo_margin_s": self.target.margin_s,
            "predicted_quantile_s": c.estimate.quantile_s,
            "predicted_quantile_ci95_s": c.estimate.ci95_s,
            "predicted_attainment": c.estimate.attainment,
            "quantile_method": "lanes",
            "gain": c.cost,
            "cost": c.cost,
            "mean_latency_s": c.mean_latency_s,
            "mean_power_w": c.mean_power_w,
            "mean_batch": c.mean_batch,
            "candidates": len(self.candidates),
            "requests": self.requests,
            "solve_time_s": self.solve_time_s,
        }


def requests_for(q: float) -> int:
    """Counted requests per candidate: ``TAIL_SAMPLES`` beyond the q-quantile, at least 20,000."""
    return int(min(2_000_000, max(20_000, math.ceil(TAIL_SAMPLES / (1.0 - q)))))


def solve_slo_instances(model: BatchingModel, target: SloTarget, *, seed: int = 0,
                        weights: tuple[float, ...] | None = None, requests: int | None = None) -> InstanceSloResult:
    """The least-J k-instance threshold policy (with or without a max-wait guard) whose q-quantile's
    upper 95% bound is <= D - margin (module doc); greedy with ``feasible = False`` when none is."""
    started = time.perf_counter()
    if not isinstance(target, SloTarget):
        raise ModelError(f"target must be an SloTarget, got {type(target).__name__}")
    if model.instances < 2:
        raise ModelError("one instance: use solver.slo.solve_slo (the exact SMDP tables)")
    w = model.weight
    if weights is None:
        ladder = sorted({w * f for f in WEIGHT_STEPS}, reverse=True)
    else:
        ladder = sorted({float(x) for x in weights}, reverse=True)
        if any(not math.isfinite(x) or x < 0 for x in ladder):
            raise ModelError(f"candidate weights must be finite and >= 0, got {weights!r}")
    n_req = requests_for(target.quantile) if requests is None else int(requests)
    if n_req < 1000:
        raise ModelError(f"requests must be >= 1000, got {requests!r}")
    k, big_b = model.instances, model.max_batch
    tables: dict[tuple[int, ...], float] = {}
    for wp in ladder:
        th = solve_instances(model.with_(weight=wp), seed=seed).policy.thresholds()
        if th is not None and th not in tables:
            tables[th] = wp
    tables.setdefault((1,) * k, math.nan)  # greedy: the least-latency rule, and the fallback
    segment = math.ceil(n_req / REPLICATIONS)
    lanes = ThresholdLanes(model, replications=REPLICATIONS, segment=segment, seed=seed)
    budget = target.budget_s
    candidates: list[InstanceSloCandidate] = []

    def judge(cands: list[tuple[tuple[int, ...], float | None]]) -> list[InstanceSloCandidate]:
        th = np.array([c[0] for c in cands])
        guards = np.array([math.inf if g is None else g for _, g in cands])
        fig = lanes.run(th, guards=guards, latencies=True)
        out = []
        for i, (t, g) in enumerate(cands):
            lat = fig.latencies[i]
            point, half = sectioned_quantile(lat, target.quantile)
            est = QuantileEstimate(point, half, float(np.mean(lat <= budget)), "simulation")
            ok = math.isfinite(est.upper_s) and est.upper_s <= budget
            out.append(InstanceSloCandidate(t, tables[t], g, est, float(fig.mean_latency_s[i]),
                                            float(fig.mean_power_w[i]), float(fig.cost[i]), ok, big_b,
                                            float(fig.mean_batch[i])))
        return out

    first = judge([(t, None) for t in tables] + [(t, f * budget) for t in tables for f in GUARD_FRACTIONS])
    candidates.extend(first)
    refine: list[tuple[tuple[int, ...], float | None]] = []
    for t in tables:
        mine = [c for c in first if c.thresholds == t and c.max_wait_s is not None]
        ok = max((c.max_wait_s for c in mine if c.feasible), default=None)
        bad = min((c.max_wait_s for c in mine if not c.feasible and (ok is None or c.max_wait_s > ok)), default=None)
        if ok is not None and bad is not None:
            refine.extend((t, ok + (bad - ok) * j / (REFINE_STEPS + 1)) for j in range(1, REFINE_STEPS + 1))
    if refine:
        candidates.extend(judge(refine))
    feasible = [c for c in candidates if c.feasible]
    if feasible:
        chosen = min(feasible, key=lambda c: c.cost)
    else:
        chosen = next(c for c in candidates if c.thresholds == (1,) * k and c.max_wait_s is None)
    return InstanceSloResult(model, target, chosen, bool(feasible), tuple(candidates), segment * REPLICATIONS,
                             time.perf_counter() - started)
