"""How a model's requests clump, learned online from their arrival times (the adaptive gate's input).

An arrival that comes within ``window_gaps`` mean interarrival times of the previous one joins its
group (a client's fan-out, a trace recorded in ticks); the mean gap is an exponentially weighted
mean over the last ~``1 / alpha`` arrivals, so the window follows the rate. The last ``max_groups``
completed groups give the mean group size G with a 95% CI, the index of dispersion E[X^2]/E[X] and
the empirical group-size law, which is the arrival model the gate's policy is solved for
(``solver.arrival_model.CompoundPoisson``).

Poisson is the answer until the evidence says otherwise: fewer than ``min_groups`` groups, or a G
whose CI reaches below ``SIGNIFICANT_G`` (a Poisson stream at window 0.01 gaps gives G ~ 1.01).
O(1) per arrival; the law is built only when asked (at a re-solve).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from solver.arrival_model import POISSON, ArrivalModel, CompoundPoisson

SIGNIFICANT_G = 1.1
"""Groups are taken into account once the lower 95% bound of G is above this."""
MAX_GROUP = 4096
"""Group sizes above this are counted as this (the law's support stays bounded)."""


class GroupEstimator:
    def __init__(self, window_gaps: float = 0.01, max_groups: int = 2000, min_groups: int = 200,
                 alpha: float = 0.01) -> None:
        if not (math.isfinite(window_gaps) and window_gaps > 0):
            raise ValueError(f"window_gaps must be a finite number > 0, got {window_gaps!r}")
        if max_groups < min_groups or min_groups < 2:
            raise ValueError(f"need 2 <= min_groups <= max_groups, got {min_groups}, {max_groups}")
        self.window_gaps = float(window_gaps)
        self.min_groups = int(min_groups)
        self.alpha = float(alpha)
        self.sizes: deque[int] = deque(maxlen=int(max_groups))
        self._sum = 0
        self._sum2 = 0
        self._last: float | None = None
        self._gap: float | None = None
        self._current = 0

    def observe(self, t: float) -> None:
        if self._last is None:
            self._last, self._current = t, 1
            return
        gap = max(t - self._last, 0.0)
        self._last = t
        same = self._gap is not None and gap <= self.window_gaps * self._gap
        self._gap = gap if self._gap is None else self._gap + self.alpha * (gap - self._gap)
        if same:
            self._current += 1
            return
        self._push(min(self._current, MAX_GROUP))
        self._current = 1

    def _push(self, size: int) -> None:
        if len(self.sizes) == self.sizes.maxlen:
            old = self.sizes[0]
            self._sum -= old
            self._sum2 -= old * old
        self.sizes.append(size)
        self._sum += size
        self._sum2 += size * size

    @property
    def groups(self) -> int:
        return len(self.sizes)

    def mean_group(self) -> tuple[float, float] | None:
        """(G, half-width of its 95% CI), or None before ``min_groups`` groups."""
        n = len(self.sizes)
        if n < self.min_groups:
            return None
        g = self._sum / n
        var = max(self._sum2 / n - g * g, 0.0) * n / (n - 1)
        return g, 1.96 * math.sqrt(var / n)

    def index_of_dispersion(self) -> float | None:
        """E[X^2] / E[X]: the counts' Var/mean over windows long against a group (1 for Poisson)."""
        if len(self.sizes) < self.min_groups:
            return None
        return self._sum2 / self._sum

    def model(self) -> ArrivalModel:
        """The arrival model to solve for: the empirical group law once G is significantly above 1."""
        est = self.mean_group()
        if est is None or est[0] - est[1] <= SIGNIFICANT_G:
            return POISSON
        counts = np.bincount(np.fromiter(self.sizes, dtype=np.int64))
        return CompoundPoisson.empirical(counts.astype(float))
