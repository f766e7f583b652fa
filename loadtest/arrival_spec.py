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

import itertools
import math
from typing import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from solver import arrivals

__all__ = ["ArrivalSpec", "DEFAULT_RAMP_S", "parse_arrivals", "share_of"]

DEFAULT_RAMP_S = 600.0
"""``ramp`` drawn chunk by chunk when the run's length is unknown: the ramp's length (then it holds)."""


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

    @property
    def finite(self) -> bool:
        """A trace ends; the other processes go on for as long as the run."""
        return self.kind == "trace"

    def between(self, start_s: float, end_s: float, rng: np.random.Generator,
                ramp_s: float = DEFAULT_RAMP_S) -> np.ndarray:
        """Arrival times in [start_s, end_s), for drawing an unbounded sequence chunk by chunk.

        Poisson, steps (the schedule repeats) and ramp (from the rate at 0 to the end rate over
        ``ramp_s``, then held) are non-homogeneous Poisson processes, so disjoint chunks are
        independent: drawing chunk k with its own generator (seeded by the run's seed and k) gives
        the same sequence in every process. A trace is sliced (empty once it has ended).
        """
        if not (math.isfinite(start_s) and math.isfinite(end_s) and 0 <= start_s <= end_s):
            raise ValueError(f"need 0 <= start <= end, finite, got [{start_s!r}, {end_s!r})")
        span = end_s - start_s
        if span == 0:
            return np.empty(0)
        if self.kind == "poisson":
            return start_s + arrivals.poisson(self.rate, duration=span, rng=rng)
        if self.kind == "steps":
            period = sum(d for d, _ in self.schedule)
            out = []
            base = math.floor(start_s / period) * period
            while base < end_s:
                seg = base
                for d, r in self.schedule:
                    lo, hi = max(seg, start_s), min(seg + d, end_s)
                    if hi > lo and r > 0:
                        out.append(lo + arrivals.poisson(r, duration=hi - lo, rng=rng))
                    seg += d
                base += period
            return np.concatenate(out) if out else np.empty(0)
        if self.kind == "ramp":
            r0, r1 = self.ramp
            if not (math.isfinite(ramp_s) and ramp_s > 0):
                raise ValueError(f"ramp length must be finite and > 0 seconds, got {ramp_s!r}")

            def rate(t: float) -> float:
                return r0 + (r1 - r0) * min(t / ramp_s, 1.0)

            top = max(rate(start_s), rate(end_s))  # the rate is monotone: thinning at the larger end
            if top <= 0:
                return np.empty(0)
            t = start_s + arrivals.poisson(top, duration=span, rng=rng)
            keep = rng.uniform(0.0, top, size=t.size) < np.array([rate(x) for x in t])
            return t[keep]
        t = self._trace_times()
        return t[(t >= start_s) & (t < end_s)]

    def _trace_times(self) -> np.ndarray:
        """The whole trace, read once."""
        if "_trace_cache" not in self.__dict__:
            t = arrivals.trace(self.trace_path, time_scale=self.time_scale, target_rate=self.trace_rate)
            object.__setattr__(self, "_trace_cache", t)
        return self.__dict__["_trace_cache"]

    def end_s(self) -> float:
        """When the sequence ends: just after the last arrival of a trace, else infinity."""
        if not self.finite:
            return math.inf
        t = self._trace_times()
        return float(t[-1]) + 1e-9 if t.size else 0.0

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


def share_of(spec: ArrivalSpec, seed: int, rank: int = 0, workers: int = 1, *, chunk_s: float = 5.0,
             ramp_s: float = DEFAULT_RAMP_S) -> Iterator[float]:
    """One process's share of an unbounded arrival sequence, drawn lazily, in order.

    The global sequence is drawn ``chunk_s`` seconds at a time, chunk k with a generator seeded
    by (seed, k), so every process draws the same one; this process keeps arrivals i with
    i mod workers == rank. A trace stops at its end; the other processes never stop.
    """
    if not (isinstance(workers, int) and workers >= 1 and isinstance(rank, int) and 0 <= rank < workers):
        raise ValueError(f"need 0 <= rank < workers, got rank {rank!r} of {workers!r}")
    if not (math.isfinite(chunk_s) and chunk_s > 0):
        raise ValueError(f"chunk_s must be finite and > 0, got {chunk_s!r}")
    i = 0
    end = spec.end_s()
    for k in itertools.count():
        lo = k * chunk_s
        if lo >= end:
            return
        rng = np.random.default_rng([int(seed), k])
        for t in spec.between(lo, min(lo + chunk_s, end), rng, ramp_s=ramp_s):
            if i % workers == rank:
                yield float(t)
            i += 1
