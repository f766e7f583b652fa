"""What a solve returns: the policy, its gain and the predicted figures, in one frozen record."""

from __future__ import annotations

import math
from dataclasses import dataclass

from solver.evaluate import Evaluation
from solver.model import BatchingModel
from solver.policy import PolicyTable


def _num(x: float) -> float | None:
    """JSON has no inf/nan; None says "not available" instead of writing an invalid document."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True, eq=False)
class SolveResult:
    """An optimal policy table and what it is predicted to do.

    ``gain`` is the solver's optimal average cost J* = W + w P; ``mean_latency_s`` and
    ``mean_power_w`` come from the exact evaluation of ``policy`` (``evaluation``), whose cost equals
    ``gain`` up to the solver's tolerance.
    """

    policy: PolicyTable
    gain: float
    mean_latency_s: float
    mean_power_w: float
    throughput_rps: float
    mean_batch: float
    iterations: int
    """Policy-improvement steps (PI) or value-iteration sweeps (RVI), summed over the sizes tried."""
    converged: bool
    """The method converged at the final N and, with automatic N, the gain and policy settled."""
    solve_time_s: float
    """Wall time of the whole call, automatic truncation and final evaluation included."""
    truncation: int
    method: str
    model: BatchingModel
    tail: str = "fluid"
    gain_bounds: tuple[float, float] = (math.nan, math.nan)
    """RVI's lower/upper bounds on g (PI: both equal the exact gain)."""
    sizes_tried: tuple[int, ...] = ()
    """Every truncation solved on the way to the automatic choice (the last one is ``truncation``)."""
    evaluation: Evaluation | None = None

    def threshold(self) -> int | None:
        return self.policy.threshold()

    def to_dict(self) -> dict:
        m = self.model
        return {
            "policy": [int(x) for x in self.policy.actions],
            "gain": _num(self.gain),
            "mean_latency_s": _num(self.mean_latency_s),
            "mean_power_w": _num(self.mean_power_w),
            "throughput_rps": _num(self.throughput_rps),
            "mean_batch": _num(self.mean_batch),
            "iterations": int(self.iterations),
            "converged": bool(self.converged),
            "solve_time_s": float(self.solve_time_s),
            "truncation": int(self.truncation),
            "method": self.method,
            "tail": self.tail,
            "threshold": self.threshold(),
            "rate": m.rate,
            "weight": m.weight,
            "max_batch": m.max_batch,
            "idle_power_w": m.idle_power_w,
            "capacity_rps": m.capacity,
            "load": m.load,
            "interpolated": [int(b) for b in m.profile.interpolated],
            "gain_bounds": [_num(x) for x in self.gain_bounds],
            "sizes_tried": [int(x) for x in self.sizes_tried],
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
        }
