"""Recent response times of one model, for its SLO: the measured quantile and attainment.

One job: keep the (time, latency) of the requests answered within the last ``window_s`` seconds
(the rate estimator's window, so that the measured quantile and the rate the policy is solved for
describe the same stretch of traffic) and answer quantile / share-within-D questions about them.
Adding is O(1) amortised on the request path; the questions sort a copy (status and telemetry
only). At most ``max_samples`` are kept (the oldest go first), which bounds memory at high rates.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencySummary:
    """The window's answer: its q-quantile, the share within D, and how many answers it rests on."""

    quantile_s: float
    attainment: float
    samples: int


@dataclass(frozen=True)
class LatencyGap:
    """How far the answers since some time ran above a prediction: at the q-quantile when there are
    enough of them for it, else at the mean."""

    excess_s: float
    """Measured minus predicted (negative: the answers ran faster than predicted)."""
    ci95_s: float
    """95% half-width of the measured figure: order statistics at the quantile, a normal one at the mean."""
    at_quantile: bool
    samples: int


class LatencyWindow:
    def __init__(self, window_s: float, max_samples: int = 200_000) -> None:
        if not math.isfinite(window_s) or window_s <= 0:
            raise ValueError(f"window must be finite and > 0 seconds, got {window_s!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
        self.window_s = float(window_s)
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

    def gap_since(self, since: float, now: float, quantile: float, predicted_quantile_s: float,
                  predicted_mean_s: float, *, min_samples: int, tail_samples: float) -> LatencyGap | None:
        """The answers at or after ``since`` (still in the window) against a prediction: their
        q-quantile minus ``predicted_quantile_s`` once ``tail_samples / (1 - q)`` of them are in,
        from ``min_samples`` on their mean minus ``predicted_mean_s``; None with fewer (or a
        prediction that is not a number)."""
        self._prune(now)
        t = np.fromiter(self._times, dtype=float, count=len(self._times))
        v = np.fromiter(self._values, dtype=float, count=len(self._values))[t >= since]
        n = int(v.size)
        if n >= max(min_samples, tail_samples / (1.0 - quantile)) and math.isfinite(predicted_quantile_s):
            v.sort()
            half = 1.96 * math.sqrt(n * quantile * (1.0 - quantile))  # binomial spread of the order statistic
            lo = v[max(0, math.floor(n * quantile - half) - 1)]
            hi = v[min(n - 1, math.ceil(n * quantile + half) - 1)]
            point = float(np.quantile(v, quantile))
            return LatencyGap(point - predicted_quantile_s, 0.5 * float(hi - lo), True, n)
        if n >= max(min_samples, 2) and math.isfinite(predicted_mean_s):
            return LatencyGap(float(v.mean()) - predicted_mean_s, 1.96 * float(v.std(ddof=1)) / math.sqrt(n), False, n)
        return None

    def summary(self, now: float, quantile: float, latency_s: float) -> LatencySummary | None:
        """The q-quantile and the share <= latency_s over the window; None without answers in it."""
        self._prune(now)
        if not self._values:
            return None
        v = np.fromiter(self._values, dtype=float, count=len(self._values))
        return LatencySummary(float(np.quantile(v, quantile)), float(np.mean(v <= latency_s)), int(v.size))
