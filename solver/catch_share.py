"""The share of races Triton's batcher wins, fitted to what Triton's own batcher was measured to do.

``solver.policy.TritonBatcher`` models Triton's dynamic batcher without prefetching: at a completion
with requests queued, the batcher catches its instance free with probability ``catch_share``, else it
sleeps until the next arrival. The share is a race between two threads and depends on the host; the
model's default (``TRITON_CATCH_SHARE``) is a fit over a few streams on one host. Given a run of
Triton's batcher at one delay on known arrival times, ``fit_catch_share`` finds the share under which
the model reproduces a measured figure (the mean latency, or a quantile): the same times simulated at
each share of a grid (several draws of the races and service times each, the same draws at every
share), the figure averaged over the draws, and the measured one placed on that curve by linear
interpolation. The figure falls as the share rises (fewer sleeps, fewer split groups); the curve is
made monotone (running minimum) before it is read, so draw noise cannot give two answers. A measured
figure outside the curve's range is given the end share, flagged ``bracketed = False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from solver.errors import ModelError
from solver.model import ServiceProfile
from solver.policy import TritonBatcher
from solver.simulate import simulate_latencies

DEFAULT_GRID = tuple(float(x) for x in np.round(np.linspace(0.0, 1.0, 11), 10))
DEFAULT_DRAWS = 8


@dataclass(frozen=True)
class CatchShareFit:
    """The share whose simulated figure matches the measured one, and the curve it was read from."""

    share: float
    figure: str
    """"mean" or "qQ" (the quantile Q of response time)."""
    measured_s: float
    grid: tuple[float, ...]
    simulated_s: tuple[float, ...]
    """The figure at each share of ``grid``: the mean over the draws, plus ``hop_s``, as simulated."""
    bracketed: bool
    """False: the measured figure lies outside the curve's range; ``share`` is the nearer end."""

    def describe(self) -> str:
        where = "" if self.bracketed else " (outside the model's range: the nearer end)"
        return (f"share {self.share:.2f} by its {self.figure} {self.measured_s * 1e3:.2f} ms{where}; the model gives "
                f"{self.simulated_s[0] * 1e3:.2f} ms at share {self.grid[0]:g} to {self.simulated_s[-1] * 1e3:.2f} ms "
                f"at {self.grid[-1]:g}")

    def to_dict(self) -> dict:
        return {"share": self.share, "figure": self.figure, "measured_s": self.measured_s, "grid": list(self.grid),
                "simulated_s": list(self.simulated_s), "bracketed": self.bracketed}


def fit_catch_share(profile: ServiceProfile, max_batch: int, delay_s: float, times: np.ndarray, measured_s: float, *,
                    quantile: float | None = None, hop_s: float = 0.0, window: tuple[float, float] | None = None,
                    draws: int = DEFAULT_DRAWS, seed: int = 0, grid: tuple[float, ...] = DEFAULT_GRID
                    ) -> CatchShareFit:
    """The ``TritonBatcher`` share under which Triton at ``delay_s`` on ``times`` (seconds, sorted) gives
    ``measured_s``: the mean response time (``quantile`` None) or its ``quantile``, of the requests that
    arrived within ``window`` (all where None), with ``hop_s`` added to every simulated response (what
    the measured ones carry beyond the model: the client's hop to Triton). Module doc for the method."""
    if not math.isfinite(measured_s) or measured_s <= 0.0:
        raise ModelError(f"the measured figure must be a finite number of seconds > 0, got {measured_s!r}")
    if quantile is not None and not (isinstance(quantile, float) and 0.0 < quantile < 1.0):
        raise ModelError(f"quantile must be a float strictly between 0 and 1 (or None for the mean), got {quantile!r}")
    if not math.isfinite(hop_s) or hop_s < 0.0:
        raise ModelError(f"hop must be a finite number of seconds >= 0, got {hop_s!r}")
    if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or not math.isfinite(delay_s) or delay_s < 0:
        raise ModelError(f"the Triton delay must be a finite number of seconds >= 0, got {delay_s!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ModelError(f"draws must be an integer >= 1, got {draws!r}")
    shares = tuple(float(s) for s in grid)
    if len(shares) < 2 or any(b <= a for a, b in zip(shares, shares[1:])) or shares[0] < 0.0 or shares[-1] > 1.0:
        raise ModelError(f"grid must be at least two increasing shares in [0, 1], got {grid!r}")
    t = np.asarray(times, dtype=float)
    if t.ndim != 1 or t.size < 2:
        raise ModelError("times must be at least two arrival times")
    keep = np.ones(t.size, dtype=bool) if window is None else (t >= window[0]) & (t < window[1])
    if not keep.any():
        raise ModelError(f"no arrival falls within the window {window!r}")
    curve = []
    for s in shares:
        rule = TritonBatcher(max_batch, delay_s, catch_share=s)  # its own checks on B and the delay
        figures = []
        for i in range(draws):
            _, lat = simulate_latencies(profile, rule, t, idle_power_w=0.0, weight=0.0, seed=seed + i)
            x = lat[keep] + hop_s
            figures.append(float(np.mean(x)) if quantile is None else float(np.quantile(x, quantile)))
        curve.append(float(np.mean(figures) if quantile is None else np.median(figures)))
    mono = np.minimum.accumulate(np.asarray(curve))  # non-increasing in the share
    figure = "mean" if quantile is None else f"q{quantile:g}"
    if measured_s >= mono[0]:
        return CatchShareFit(shares[0], figure, measured_s, shares, tuple(curve), measured_s == mono[0])
    if measured_s <= mono[-1]:
        return CatchShareFit(shares[-1], figure, measured_s, shares, tuple(curve), measured_s == mono[-1])
    j = int(np.argmax(mono <= measured_s))  # the first share at or below the measured figure; j >= 1
    hi_f, lo_f = mono[j - 1], mono[j]
    frac = 0.0 if hi_f == lo_f else (hi_f - measured_s) / (hi_f - lo_f)
    share = shares[j - 1] + frac * (shares[j] - shares[j - 1])
    return CatchShareFit(float(share), figure, measured_s, shares, tuple(curve), True)


__all__ = ["DEFAULT_DRAWS", "DEFAULT_GRID", "CatchShareFit", "fit_catch_share"]
