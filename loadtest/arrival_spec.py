"""Arrival processes named on a command line, turned into arrival-time arrays by ``solver.arrivals``.

Specs (shared by the Locust user and the CLI):

- ``poisson`` with a rate: homogeneous Poisson.
- ``steps:D1xR1,D2xR2,...``: rate R1 for D1 seconds, then R2 for D2 seconds, ... (repeated to fill
  the duration).
- ``ramp:R0:R1``: the rate moves linearly from R0 to R1 over the duration.
- ``trace:FILE``: replay a trace CSV (TIMESTAMP column), compressed by a time scale or rescaled to
  a target mean rate, cut at the duration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from solver import arrivals

__all__ = ["ArrivalSpec", "parse_arrivals"]


@dataclass(frozen=True)
class ArrivalSpec:
    kind: str
    """poisson | steps | ramp | trace"""
    rate: float | None = None
    schedule: tuple[tuple[float, float], ...] = ()
    ramp: tuple[float, float] | None = None
    trace_path: Path | None = None
    time_scale: float = 1.0
    trace_rate: float | None = None

    def times(self, duration_s: float, seed: int | None = 0) -> np.ndarray:
        """Arrival times in [0, duration_s)."""
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"duration must be finite and > 0 seconds, got {duration_s!r}")
        if self.kind == "poisson":
            return arrivals.poisson(self.rate, duration=duration_s, rng=seed)
        if self.kind == "steps":
            period = sum(d for d, _ in self.schedule)
            reps = max(1, math.ceil(duration_s / period))
            t = arrivals.steps(list(self.schedule) * reps, rng=seed)
            return t[t < duration_s]
        if self.kind == "ramp":
            r0, r1 = self.ramp
            return arrivals.ramp(r0, r1, duration_s, rng=seed)
        t = arrivals.trace(self.trace_path, time_scale=self.time_scale, target_rate=self.trace_rate)
        return t[t < duration_s]


def _num(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {text!r}")
    return value


def parse_arrivals(spec: str, rate: float | None = None, time_scale: float = 1.0,
                   trace_rate: float | None = None) -> ArrivalSpec:
    """Parse an arrival spec (see the module docstring); errors name the bad part."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "poisson":
        if rest:
            rate = _num(rest, "poisson rate")
        if rate is None or not rate > 0:
            raise ValueError(f"poisson arrivals need a rate > 0 (--rate), got {rate!r}")
        return ArrivalSpec("poisson", rate=float(rate))
    if kind == "steps":
        schedule = []
        for part in (p for p in rest.split(",") if p.strip()):
            d, sep, r = part.partition("x")
            if not sep:
                raise ValueError(f"steps entry {part!r} must be DURATIONxRATE, e.g. 10x200")
            d_s, r_s = _num(d, "steps duration"), _num(r, "steps rate")
            if d_s <= 0:
                raise ValueError(f"steps entry {part!r}: duration must be > 0")
            schedule.append((d_s, r_s))
        if not schedule:
            raise ValueError("steps needs at least one DURATIONxRATE entry, e.g. steps:10x50,10x200")
        return ArrivalSpec("steps", schedule=tuple(schedule))
    if kind == "ramp":
        parts = rest.split(":")
        if len(parts) != 2:
            raise ValueError(f"ramp spec must be ramp:START_RATE:END_RATE, got {spec!r}")
        return ArrivalSpec("ramp", ramp=(_num(parts[0], "ramp start rate"), _num(parts[1], "ramp end rate")))
    if kind == "trace":
        if not rest:
            raise ValueError("trace arrivals need a file: trace:PATH")
        path = Path(rest)
        if not path.is_file():
            raise ValueError(f"trace file not found: {path}")
        if trace_rate is not None and time_scale != 1.0:
            raise ValueError("give a trace time scale or a trace rate, not both")
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"trace time scale must be > 0, got {time_scale!r}")
        return ArrivalSpec("trace", trace_path=path, time_scale=float(time_scale), trace_rate=trace_rate)
    raise ValueError(f"unknown arrival process {spec!r}: use poisson, steps:..., ramp:R0:R1 or trace:FILE")
