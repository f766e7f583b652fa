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

    def mean_since(self, since: float, now: float) -> tuple[float, float, int] | None:
        """(mean, standard deviation, count) of the answers at or after ``since`` still in the window."""
        self._prune(now)
        t = np.fromiter(self._times, dtype=float, count=len(self._times))
        v = np.fromiter(self._values, dtype=float, count=len(self._values))[t >= since]
        if v.size == 0:
            return None
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.inf, int(v.size)

    def summary(self, now: float, quantile: float, latency_s: float) -> LatencySummary | None:
        """The q-quantile and the share <= latency_s over the window; None without answers in it."""
        self._prune(now)
        if not self._values:
            return None
        v = np.fromiter(self._values, dtype=float, count=len(self._values))
        return LatencySummary(float(np.quantile(v, quantile)), float(np.mean(v <= latency_s)), int(v.size))
