"""Recent response times of one model, for its SLO.

``LatencyWindow`` keeps the (time, latency) of the requests answered within the last ``window_s``
seconds (the rate estimator's window, so that the measured quantile and the rate the policy is
solved for describe the same stretch of traffic) and answers quantile / share-within-D questions
about them: the measured quantile and attainment. ``ExcessWindow`` keeps how far each answer ran
above its policy's prediction, for the SLO search's correction (plugin/loop/controller.py).
Adding is O(1) amortised on the request path; the questions sort a copy (status, telemetry and a
once-a-second check only). At most ``max_samples`` are kept (the oldest go first), which bounds
memory at high rates.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .stalls import StallLog, window_seconds


@dataclass(frozen=True)
class LatencySummary:
    """The window's answer: its q-quantile, the share within D, and how many answers it rests on."""

    quantile_s: float
    attainment: float
    samples: int


@dataclass(frozen=True)
class LatencyGap:
    """How far the answers ran above the prediction for the policy each was served under: at the
    q-quantile when there are enough of them for it, else at the mean."""

    excess_s: float
    """Measured minus predicted (negative: the answers ran faster than predicted)."""
    ci95_s: float
    """95% half-width of the measured figure: order statistics at the quantile, a normal one at the mean."""
    at_quantile: bool
    samples: int
    with_stalls_s: float = math.nan
    """The same figure over every answer, the ones host stalls touched included (``plugin.stalls``):
    what the correction would be if stalls were not told apart."""
    held_up: int = 0
    """Answers of the window a stall touched, left out of ``excess_s``."""
    stalled_s: float = 0.0
    """Stall time over the window's answers, seconds."""


class LatencyWindow:
    def __init__(self, window_s: float, max_samples: int = 200_000) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
        self.window_s = window_seconds(window_s)
        self._times: deque[float] = deque(maxlen=max_samples)
        self._values: deque[float] = deque(maxlen=max_samples)

    def add(self, now: float, latency_s: float) -> None:
        self._times.append(now)
        self._values.append(latency_s)

    def _prune(self, now: float) -> None:
        cut = now - self.window_s
        while self._times and self._times[0] < cut:
            self._times.popleft()
            self._values.popleft()

    def summary(self, now: float, quantile: float, latency_s: float) -> LatencySummary | None:
        """The q-quantile and the share <= latency_s over the window; None without answers in it."""
        self._prune(now)
        if not self._values:
            return None
        v = np.fromiter(self._values, dtype=float, count=len(self._values))
        return LatencySummary(float(np.quantile(v, quantile)), float(np.mean(v <= latency_s)), int(v.size))


class ExcessWindow:
    """The answers of the last ``window_s`` seconds against what was predicted for them: each one's
    latency minus the predicted q-quantile, and minus the predicted mean, of the policy in force
    when it was answered. Pooling the excess over a policy's own prediction lets the answers of
    every policy in the window count (a re-solve does not throw the evidence away), as long as what
    the model misses is about the same for each: the latency the gate adds, a wider spread.
    Adding is O(1) amortised; ``gap`` sorts a copy (once a second at most)."""

    def __init__(self, window_s: float, max_samples: int = 200_000) -> None:
        self.window_s = window_seconds(window_s)
        self._times: deque[float] = deque(maxlen=max_samples)
        self._latencies: deque[float] = deque(maxlen=max_samples)
        self._over_quantile: deque[float] = deque(maxlen=max_samples)
        self._over_mean: deque[float] = deque(maxlen=max_samples)

    def add(self, now: float, latency_s: float, predicted_quantile_s: float, predicted_mean_s: float) -> None:
        self._times.append(now)
        self._latencies.append(latency_s)
        self._over_quantile.append(latency_s - predicted_quantile_s)
        self._over_mean.append(latency_s - predicted_mean_s)

    def clear(self) -> None:
        self._times.clear()
        self._latencies.clear()
        self._over_quantile.clear()
        self._over_mean.clear()

    def _prune(self, now: float) -> None:
        cut = now - self.window_s
        while self._times and self._times[0] < cut:
            self._times.popleft()
            self._latencies.popleft()
            self._over_quantile.popleft()
            self._over_mean.popleft()

    def gap(self, now: float, quantile: float, *, min_samples: int, tail_samples: float,
            stalls: StallLog | None = None) -> LatencyGap | None:
        """The q-quantile of the excess over the predicted q-quantile once ``tail_samples / (1 - q)``
        answers are in the window, from ``min_samples`` on the mean excess over the predicted mean;
        None with fewer. With ``stalls``, over the answers no stall touched only."""
        self._prune(now)
        n_all = len(self._times)
        touched = np.zeros(n_all, dtype=bool)
        stalled_s = 0.0
        if stalls is not None and len(stalls) and n_all:
            ends = np.fromiter(self._times, dtype=float, count=n_all)
            begins = ends - np.fromiter(self._latencies, dtype=float, count=n_all)
            touched = stalls.touched(begins, ends)
            stalled_s = stalls.covered_s(float(begins.min()), now)
        keep = ~touched
        n = int(keep.sum())
        at_quantile = n >= max(min_samples, tail_samples / (1.0 - quantile))
        if not at_quantile and n < max(min_samples, 2):
            return None
        raw = np.fromiter(self._over_quantile if at_quantile else self._over_mean, dtype=float, count=n_all)
        v = raw[keep]
        if at_quantile:
            v = np.sort(v)
            half = 1.96 * math.sqrt(n * quantile * (1.0 - quantile))  # binomial spread of the order statistic
            lo = v[max(0, math.floor(n * quantile - half) - 1)]
            hi = v[min(n - 1, math.ceil(n * quantile + half) - 1)]
            figure, ci = float(np.quantile(v, quantile)), 0.5 * float(hi - lo)
            with_stalls = float(np.quantile(raw, quantile))
        else:
            figure, ci = float(v.mean()), 1.96 * float(v.std(ddof=1)) / math.sqrt(n)
            with_stalls = float(raw.mean())
        return LatencyGap(figure, ci, at_quantile, n, with_stalls, int(touched.sum()), stalled_s)
