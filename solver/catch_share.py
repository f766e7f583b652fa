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

Each fit carries its standard error: one run's figure strays from the curve as one draw does, and by
what the hop measured for the run is off (``SYSTEMATIC_S``), so that spread at the share over the
curve's slope there is how far the share may be off. Which figure
tells the share better depends on the stream: on a clumped one the mean moves a lot with the share and
the tail is noisy, on a near-Poisson one the mean hardly moves at all. ``combined_share`` weighs the
fits by their standard errors.
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
SYSTEMATIC_S = 0.0003
"""What a measured figure may be off by beyond the draws' noise, seconds: the hop added to the model is
measured anew on every run (lone requests straight to Triton: 1.1-1.9 ms across the runs of one host),
and a figure whose curve is flat (a near-Poisson stream's mean moves 1.5 ms from share 0 to 1) would
otherwise give a share that this alone moves from end to end."""


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
    spread_s: tuple[float, ...] = ()
    """The figure's standard deviation over the draws at each share of ``grid``: how far one run's figure
    strays from the curve."""
    se: float = math.inf
    """The share's standard error: one run's spread at the share (and the figure's systematic error) over
    the curve's slope there (inf where the curve is flat: the figure does not tell the share)."""

    def describe(self) -> str:
        where = "" if self.bracketed else " (outside the model's range: the nearer end)"
        se = f" +- {self.se:.2f}" if math.isfinite(self.se) else ", not told apart"
        return (f"share {self.share:.2f}{se} by its {self.figure} {self.measured_s * 1e3:.2f} ms{where}; the model gives "
                f"{self.simulated_s[0] * 1e3:.2f} ms at share {self.grid[0]:g} to {self.simulated_s[-1] * 1e3:.2f} ms "
                f"at {self.grid[-1]:g}")

    def to_dict(self) -> dict:
        return {"share": float(self.share), "figure": self.figure, "measured_s": float(self.measured_s),
                "grid": [float(x) for x in self.grid],
                "simulated_s": [float(x) for x in self.simulated_s], "bracketed": bool(self.bracketed),
                "spread_s": [float(x) for x in self.spread_s], "se": float(self.se) if math.isfinite(self.se) else None}


def combined_share(fits: "list[CatchShareFit] | tuple[CatchShareFit, ...]") -> float:
    """The fits' shares weighted by the inverse of their squared standard errors (on one run: its W and its
    tail, whichever tells the share better counts more); the first fit's share where none has a finite one."""
    if not fits:
        raise ModelError("no fit to combine")
    w = np.array([1.0 / f.se ** 2 if math.isfinite(f.se) and f.se > 0 else 0.0 for f in fits])
    if not w.sum() > 0:
        return float(fits[0].share)
    return float(np.clip(np.dot(w, [f.share for f in fits]) / w.sum(), 0.0, 1.0))


@dataclass(frozen=True)
class RunFit:
    """One run of Triton's batcher given its share twice, by its mean and by a quantile of its answers,
    read off one set of simulations (``fit_run``)."""

    by_mean: CatchShareFit
    by_quantile: CatchShareFit

    @property
    def share(self) -> float:
        """The two weighed by their standard errors (``combined_share``)."""
        return combined_share([self.by_mean, self.by_quantile])

    def describe(self) -> str:
        return f"{self.by_mean.describe()}; at {self.by_quantile.describe()}; together {self.share:.2f}"

    def to_dict(self) -> dict:
        return {"share": self.share, "by_mean": self.by_mean.to_dict(), "by_quantile": self.by_quantile.to_dict()}


def fit_catch_share(profile: ServiceProfile, max_batch: int, delay_s: float, times: np.ndarray, measured_s: float, *,
                    quantile: float | None = None, hop_s: float = 0.0, window: tuple[float, float] | None = None,
                    draws: int = DEFAULT_DRAWS, seed: int = 0, grid: tuple[float, ...] = DEFAULT_GRID,
                    systematic_s: float = SYSTEMATIC_S) -> CatchShareFit:
    """The ``TritonBatcher`` share under which Triton at ``delay_s`` on ``times`` (seconds, sorted) gives
    ``measured_s``: the mean response time (``quantile`` None) or its ``quantile``, of the requests that
    arrived within ``window`` (all where None), with ``hop_s`` added to every simulated response (what
    the measured ones carry beyond the model: the client's hop to Triton). ``systematic_s`` is added in
    quadrature to the draws' spread in the standard error (``SYSTEMATIC_S``). Module doc for the method."""
    _check_figure(measured_s, quantile, systematic_s)
    shares, runs = _simulated(profile, max_batch, delay_s, times, hop_s, window, draws, seed, grid)
    return _read(shares, runs, measured_s, quantile, systematic_s)


def fit_run(profile: ServiceProfile, max_batch: int, delay_s: float, times: np.ndarray, latencies_s: np.ndarray,
            quantile: float, *, hop_s: float = 0.0, window: tuple[float, float] | None = None,
            draws: int = DEFAULT_DRAWS, seed: int = 0, grid: tuple[float, ...] = DEFAULT_GRID,
            systematic_s: float = SYSTEMATIC_S) -> RunFit:
    """``fit_catch_share`` by the mean and by the ``quantile`` of a run's measured ``latencies_s``
    (seconds), both read off the same simulations (the same figures as two calls, for half the work)."""
    lat = np.asarray(latencies_s, dtype=float)
    if lat.ndim != 1 or lat.size == 0:
        raise ModelError("latencies must be a non-empty sequence of seconds")
    mean_s, q_s = float(np.mean(lat)), float(np.quantile(lat, quantile)) if _is_quantile(quantile) else math.nan
    _check_figure(mean_s, None, systematic_s)
    _check_figure(q_s, quantile, systematic_s)
    shares, runs = _simulated(profile, max_batch, delay_s, times, hop_s, window, draws, seed, grid)
    return RunFit(_read(shares, runs, mean_s, None, systematic_s), _read(shares, runs, q_s, quantile, systematic_s))


def _is_quantile(q) -> bool:
    return isinstance(q, float) and 0.0 < q < 1.0


def _check_figure(measured_s: float, quantile: float | None, systematic_s: float) -> None:
    if quantile is not None and not _is_quantile(quantile):
        raise ModelError(f"quantile must be a float strictly between 0 and 1 (or None for the mean), got {quantile!r}")
    if not math.isfinite(measured_s) or measured_s <= 0.0:
        raise ModelError(f"the measured figure must be a finite number of seconds > 0, got {measured_s!r}")
    if not math.isfinite(systematic_s) or systematic_s < 0.0:
        raise ModelError(f"the systematic error must be a finite number of seconds >= 0, got {systematic_s!r}")


def _simulated(profile: ServiceProfile, max_batch: int, delay_s: float, times: np.ndarray, hop_s: float,
               window: tuple[float, float] | None, draws: int, seed: int, grid: tuple[float, ...]
               ) -> tuple[tuple[float, ...], list[list[np.ndarray]]]:
    """The grid's shares, and at each the responses (plus ``hop_s``) of the requests within ``window`` in
    each of ``draws`` simulations (seeds ``seed``..; the same at every share)."""
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
    runs = []
    for s in shares:
        rule = TritonBatcher(max_batch, delay_s, catch_share=s)  # its own checks on B and the delay
        runs.append([simulate_latencies(profile, rule, t, idle_power_w=0.0, weight=0.0, seed=seed + i)[1][keep] + hop_s
                     for i in range(draws)])
    return shares, runs


def _read(shares: tuple[float, ...], runs: list[list[np.ndarray]], measured_s: float, quantile: float | None,
          systematic_s: float) -> CatchShareFit:
    """The figure's curve over the shares (the draws' mean, or median for a quantile), and the measured
    figure placed on it (module doc)."""
    curve, spread = [], []
    for draws in runs:
        figures = [float(np.mean(x)) if quantile is None else float(np.quantile(x, quantile)) for x in draws]
        curve.append(float(np.mean(figures) if quantile is None else np.median(figures)))
        spread.append(float(np.std(figures, ddof=1)) if len(figures) > 1 else math.nan)
    mono = np.minimum.accumulate(np.asarray(curve))  # non-increasing in the share
    figure = "mean" if quantile is None else f"q{quantile:g}"
    if measured_s >= mono[0]:
        share, bracketed = shares[0], bool(measured_s == mono[0])
    elif measured_s <= mono[-1]:
        share, bracketed = shares[-1], bool(measured_s == mono[-1])
    else:
        j = int(np.argmax(mono <= measured_s))  # the first share at or below the measured figure; j >= 1
        hi_f, lo_f = mono[j - 1], mono[j]
        frac = 0.0 if hi_f == lo_f else (hi_f - measured_s) / (hi_f - lo_f)
        share, bracketed = shares[j - 1] + frac * (shares[j] - shares[j - 1]), True
    return CatchShareFit(float(share), figure, measured_s, shares, tuple(curve), bracketed, tuple(spread),
                         _standard_error(np.asarray(shares), mono, np.hypot(np.asarray(spread), systematic_s),
                                         float(share)))


def _standard_error(grid: np.ndarray, mono: np.ndarray, spread: np.ndarray, share: float) -> float:
    """One run's spread at ``share`` over the curve's slope there, the slope a secant over the grid points
    within 0.2 of it (at least two): draw noise in neighbouring points does not make it steep or flat."""
    near = np.nonzero(np.abs(grid - share) <= 0.2 + 1e-12)[0]
    if near.size < 2:
        near = np.argsort(np.abs(grid - share))[:2]
    lo, hi = int(near.min()), int(near.max())
    slope = (mono[lo] - mono[hi]) / (grid[hi] - grid[lo])
    sd = float(np.interp(share, grid, spread))
    if not (slope > 0 and math.isfinite(sd)):
        return math.inf
    return sd / slope


__all__ = ["DEFAULT_DRAWS", "DEFAULT_GRID", "SYSTEMATIC_S", "CatchShareFit", "RunFit", "combined_share",
           "fit_catch_share", "fit_run"]
