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

Rate modulation (``ModulationEstimator``): the last ``max_arrivals`` arrival times are kept and, at
most every ``refit_s`` seconds (off the event loop), fitted as ``smdp fit-arrivals`` does
(``solver.fit.fit_arrivals``). When the fit picks an MMPP (phases that differ in rate, groups per
phase or not), the adaptive gate solves for that shape at the rate it estimates: the table best on
average over the phases (``solver.mmpp.solve_mmpp_blind``).

A fitted model can be given at start (``arrivals`` in the policy config, ``smdp serve --arrivals``,
as ``smdp fit-arrivals`` prints it for past traffic): an MMPP seeds the modulation shape and a
compound Poisson the group law, so the first solve is already for it instead of waiting minutes for
2,000 arrivals and a fit. While a shape is in force the controller scales it to the long-run mean
rate, not the windowed one (the shape's phases are the rate's swings: re-solving for each swing as
well would count them twice), and a new fit replaces it only where it is clearly closer to the
recent arrivals (``SWITCH_GAIN``).

Why phase-blind in the sidecar, not a table per phase with the forward filter
(``solver.phase_filter``): (1) what it buys is small where it was measured. By exact evaluation
under the batch MMPPs fitted to the Azure traces, the per-phase optimum (phase observed: an upper
bound on what a filter achieves) is within a fraction of a percent of the best phase-blind table
(docs/notes/issue-17.md has the figures); phases that matter are long, so the adaptive gate's rate
detector already re-solves for each one. (2) The gate would have to run the filter per arrival
and switch tables on both data planes (the native plane's rule would need a phase input, a new
``GateRule`` and shared vectors): a large change to the hot path for that small gain. The exact
per-phase solve and the filter stay in the solver and the simulator (``smdp compare --arrivals
mmpp:...``), where the value of observing the phase is measured for any given model.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from solver.arrival_model import MMPP2, POISSON, ArrivalModel, CompoundPoisson

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
        self.prior: ArrivalModel = POISSON
        """The model answered before ``min_groups`` groups (a compound-Poisson seed from the config)."""

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
        if est is None:
            return self.prior
        if est[0] - est[1] <= SIGNIFICANT_G:
            return POISSON
        counts = np.bincount(np.fromiter(self.sizes, dtype=np.int64))
        return CompoundPoisson.empirical(counts.astype(float))


MIN_PHASE_ARRIVALS = 20.0
"""A phase that carries a real share of the traffic must last this many of its own arrivals on
average, or the fit is taken for clumping, not modulation (``slow_phases``)."""


def slow_phases(process: MMPP2) -> bool:
    """Whether every phase with at least a tenth of the mean rate lasts ``MIN_PHASE_ARRIVALS`` of its
    arrival instants on average. Groups that reach the gate spread by a little network jitter look,
    to the MMPP fit, like phases of a few arrivals at a huge rate switching hundreds of times a
    second: that is the group estimator's business, and an MMPP solve would read it as surges."""
    lam = process.mean_rate
    for rate, epochs, leave in zip(process.rates, process.epoch_rates, process.leave_rates):
        if rate >= 0.1 * lam and epochs / leave < MIN_PHASE_ARRIVALS:
            return False
    return True


SWITCH_GAIN = 0.5
"""A new fit replaces the modulation shape in force only where its dispersion misfit on the recent
arrivals is at most this fraction of the shape in force's (``ModulationEstimator.refit``)."""


class ModulationEstimator:
    """A (batch) MMPP fitted to the most recent arrivals: the shape of the rate's modulation.

    ``observe`` is O(1); ``refit`` is the expensive part (an EM fit over up to ``max_arrivals``
    times, seconds) and is meant to run in an executor when ``due``. ``model_for(rate)`` is the
    fitted MMPP scaled to a mean of ``rate`` (the level comes from the rate estimator, the shape
    from the fit), or None while no fit has found modulation.
    """

    def __init__(self, group_window_gaps: float = 0.01, max_arrivals: int = 10_000, min_arrivals: int = 2_000,
                 refit_s: float = 30.0, max_phases: int = 2) -> None:
        if not (math.isfinite(group_window_gaps) and group_window_gaps > 0):
            raise ValueError(f"group_window_gaps must be a finite number > 0, got {group_window_gaps!r}")
        if not 20 <= min_arrivals <= max_arrivals:
            raise ValueError(f"need 20 <= min_arrivals <= max_arrivals, got {min_arrivals}, {max_arrivals}")
        if not (math.isfinite(refit_s) and refit_s > 0):
            raise ValueError(f"refit_s must be a finite number > 0, got {refit_s!r}")
        self.group_window_gaps = float(group_window_gaps)
        self.min_arrivals = int(min_arrivals)
        self.refit_s = float(refit_s)
        self.max_phases = int(max_phases)
        """The most phases a fit may choose (``fit_arrivals``); the phase-blind solve's cost grows with it."""
        self.times: deque[float] = deque(maxlen=int(max_arrivals))
        self.shape: MMPP2 | None = None
        """The last fit's MMPP, or None (no fit yet, or the fit chose a model without modulation)."""
        self.chosen = "nothing yet"
        """What the last fit chose (its spec), for the status note."""
        self.version = 0
        """Incremented when a fit changes ``shape``."""
        self.fitted_at = -math.inf
        self.kept = 0
        """Fits that chose a different shape but were not taken (``SWITCH_GAIN``: the one in force fit
        the recent arrivals nearly as well)."""

    def seed(self, shape: MMPP2) -> None:
        """Start from a shape fitted elsewhere (``smdp fit-arrivals`` on past traffic: ``arrivals`` in the
        policy config): the adaptive gate solves for it from its first solve, and a later fit replaces
        it only where that fit is clearly closer to the recent arrivals (``refit``)."""
        if not isinstance(shape, MMPP2):
            raise ValueError(f"a modulation seed is an MMPP, got {shape.spec}")
        self.shape = shape
        self.chosen = f"{shape.spec} (given)"
        self.version += 1

    def observe(self, t: float) -> None:
        self.times.append(t)

    def due(self, now: float) -> bool:
        return len(self.times) >= self.min_arrivals and now - self.fitted_at >= self.refit_s

    def snapshot(self, now: float) -> np.ndarray:
        """The kept arrival times, copied (on the thread that calls ``observe``); the fit is not due
        again for ``refit_s``."""
        self.fitted_at = now
        return np.fromiter(self.times, dtype=float, count=len(self.times))

    def refit(self, t: np.ndarray) -> None:
        """Fit a ``snapshot`` (seconds: run it off the event loop)."""
        from solver.errors import ModelError
        from solver.fit import fit_arrivals

        if t.size < self.min_arrivals or not t[-1] > t[0]:
            return
        rate = (t.size - 1) / float(t[-1] - t[0])
        try:
            fit = fit_arrivals(t, group_window_s=self.group_window_gaps / rate, max_phases=self.max_phases)
        except ModelError:
            return
        self.chosen = fit.chosen.spec
        shape = fit.chosen if isinstance(fit.chosen, MMPP2) and slow_phases(fit.chosen) else None
        if shape == self.shape:
            return
        if self.shape is not None and not self._clearly_better(fit, shape, rate):
            self.kept += 1
            return
        self.shape = shape
        self.version += 1

    def _clearly_better(self, fit, shape: MMPP2 | None, rate: float) -> bool:
        """Whether a new fit should replace the shape in force: the fitted choice's dispersion misfit on
        the recent arrivals must be below ``SWITCH_GAIN`` times the shape in force's (scaled to the
        same rate) and lower by ``MISFIT_TOLERANCE``. A fit of a minute's arrivals is noisy, and every
        change of shape is a new solve and a new table; the shape in force (a seed fitted to a long
        history, or an earlier fit) stays unless the evidence against it is clear. A refused fit
        (``slow_phases``: jittered groups) is no evidence against it either."""
        from solver.fit import MISFIT_TOLERANCE, dispersion_misfit

        if shape is None and isinstance(fit.chosen, MMPP2):
            return False
        old = dispersion_misfit(self.model_for(rate), fit)
        new = dispersion_misfit(fit.chosen, fit)
        if not math.isfinite(old):
            return True
        return math.isfinite(new) and new <= SWITCH_GAIN * old and new <= old - MISFIT_TOLERANCE

    def model_for(self, rate: float) -> MMPP2 | None:
        """The fitted shape at mean request rate ``rate``; None without one."""
        if self.shape is None or not rate > 0:
            return None
        f = rate / self.shape.mean_rate
        return self.shape.with_rates(tuple(r * f for r in self.shape.rates))
