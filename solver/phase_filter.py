"""Which MMPP phase the gate is in: the true phase (simulation only) or a forward filter on arrival times.

The forward filter is the exact posterior P(phase | arrival times so far) of a two-phase MMPP:
between arrivals it evolves as p(t) ~ p(t0) exp((Q - Lambda)(t - t0)), and each arrival multiplies
it by Lambda (rates on the diagonal). The gate uses the most likely phase. Requests of one group
(the same instant) each count as an arrival, as the MMPP would count them. Under a batch MMPP an
instant is one group arrival (its rate: the group rate) and the group's size weighs the phases by
P(X_i = size): one more request at the same instant by P(X_i > k) / P(X_i >= k), and the group is
closed (P(X_i = k) / P(X_i >= k)) once time moves past it.

Between arrivals the posterior of a two-state chain moves monotonically towards a limit (a one-
dimensional autonomous ODE), so the most likely phase flips at most once per gap; ``next_change``
finds that instant by bisection, which is where a phase-observing policy re-decides.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from solver.arrival_model import MMPP2
from solver.errors import ModelError


_GROUP_CAP = 4096
"""Group sizes above this are weighed as this size (the filter's group-size tables end there)."""


class PhaseSource(Protocol):
    def phase(self, now: float, seen: int) -> int:
        """The phase at ``now`` given the first ``seen`` arrivals (all with time <= now)."""

    def next_change(self, now: float, until: float) -> float:
        """The first time in (now, until) at which ``phase`` changes with no arrival before it, else inf."""


@dataclass
class TruePhase:
    """The simulated path's own phase (an oracle: what the exact model assumes)."""

    switch_times: np.ndarray
    phases: np.ndarray
    _times: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._times = np.asarray(self.switch_times, dtype=float).tolist()
        self._ph = np.asarray(self.phases, dtype=np.int64).tolist()

    def phase(self, now: float, seen: int) -> int:
        return self._ph[bisect.bisect_right(self._times, now) - 1]

    def next_change(self, now: float, until: float) -> float:
        i = bisect.bisect_right(self._times, now)
        if i < len(self._times) and self._times[i] < until:
            return self._times[i]
        return math.inf


class PhaseFilter:
    """Forward filter of a two-phase MMPP on the arrival times it is fed, in order."""

    def __init__(self, process: MMPP2, times: Sequence[float] | np.ndarray | None = None):
        if process.phases != 2:
            raise ModelError(f"the forward filter is for two phases; this MMPP has {process.phases} "
                             "(run its tables with the true phase, or one phase-blind table)")
        self.rates = (float(process.epoch_rates[0]), float(process.epoch_rates[1]))
        # a batch MMPP: arrival instants are groups; the requests of one instant tell the group's size
        self._grouped = process.grouped
        q = process.size_pmfs(_GROUP_CAP)
        surv = np.cumsum(q[:, ::-1], axis=1)[:, ::-1]  # surv[i, k] = P(X_i >= k)
        self._q = q.tolist()
        self._surv = surv.tolist()
        self._open = 0  # requests seen so far at the open group's instant
        self._open_t = -math.inf
        m = process.generator - np.diag(self.rates)
        d, v = np.linalg.eig(m)  # real: a 2x2 generator minus a diagonal has real eigenvalues
        self._d = np.real(d)
        self._v = np.real(v)
        self._vinv = np.linalg.inv(self._v)
        (self._v00, self._v01), (self._v10, self._v11) = self._v.tolist()
        (self._w00, self._w01), (self._w10, self._w11) = self._vinv.tolist()
        self._d0, self._d1 = (float(x) for x in self._d)
        self._dmax = max(self._d0, self._d1)
        pi = process.stationary
        self._limit = self._propagate(float(pi[0]), float(pi[1]), 1e6 / max(abs(self._d).min(), 1e-12))
        self.p0, self.p1 = float(pi[0]), float(pi[1])
        self.t = 0.0
        self._times = [] if times is None else np.asarray(times, dtype=float).tolist()
        self._seen = 0

    def _propagate(self, p0: float, p1: float, dt: float) -> tuple[float, float]:
        """The posterior after dt seconds without an arrival (scalar code: it runs once per arrival)."""
        if dt <= 0:
            return p0, p1
        e0 = math.exp((self._d0 - self._dmax) * dt)
        e1 = math.exp((self._d1 - self._dmax) * dt)
        u0 = (p0 * self._v00 + p1 * self._v10) * e0
        u1 = (p0 * self._v01 + p1 * self._v11) * e1
        q0 = max(u0 * self._w00 + u1 * self._w10, 0.0)
        q1 = max(u0 * self._w01 + u1 * self._w11, 0.0)
        s = q0 + q1
        return (q0 / s, q1 / s) if s > 0 else self._limit

    def _weigh(self, w0: float, w1: float) -> None:
        q0, q1 = self.p0 * w0, self.p1 * w1
        s = q0 + q1
        if s > 0:
            self.p0, self.p1 = q0 / s, q1 / s

    def advance(self, now: float) -> None:
        """No arrival in (t, now]: move the posterior to ``now``."""
        if self._open and now > self._open_t:  # the open group ended with ``_open`` requests
            k = min(self._open, _GROUP_CAP)
            self._weigh(*(self._q[i][k] / self._surv[i][k] if self._surv[i][k] > 0 else 0.0 for i in range(2)))
            self._open = 0
        self.p0, self.p1 = self._propagate(self.p0, self.p1, now - self.t)
        self.t = now

    def arrival(self, at: float) -> None:
        if self._grouped and self._open and at == self._open_t:  # one more request of the same group
            k = min(self._open, _GROUP_CAP - 1)
            self._weigh(*(self._surv[i][k + 1] / self._surv[i][k] if self._surv[i][k] > 0 else 0.0 for i in range(2)))
            self._open += 1
            return
        self.advance(at)
        self._weigh(self.rates[0], self.rates[1])
        if self._grouped:
            self._open, self._open_t = 1, at

    @property
    def posterior(self) -> np.ndarray:
        return np.array([self.p0, self.p1])

    def phase(self, now: float, seen: int) -> int:
        while self._seen < seen:
            self.arrival(self._times[self._seen])
            self._seen += 1
        self.advance(now)
        return int(self.p1 > self.p0)

    def _phase_after(self, dt: float) -> int:
        q0, q1 = self._propagate(self.p0, self.p1, dt)
        return int(q1 > q0)

    def next_change(self, now: float, until: float) -> float:
        cur = int(self.p1 > self.p0)
        if int(self._limit[1] > self._limit[0]) == cur:
            return math.inf  # monotone towards a limit with the same most likely phase
        hi = until if math.isfinite(until) else now + 1.0
        while math.isinf(until) and self._phase_after(hi - now) == cur:
            hi = now + 2.0 * (hi - now)
            if hi - now > 1e9:
                return math.inf
        if self._phase_after(hi - now) == cur:
            return math.inf
        lo = now
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if self._phase_after(mid - now) == cur:
                lo = mid
            else:
                hi = mid
        return hi
