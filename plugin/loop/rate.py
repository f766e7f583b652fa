"""The arrival rate of one model, estimated online, and when it changed.

Arrival rate. ``RateEstimator`` counts arrivals over a sliding window (cumulative counts at a grid
of bucket marks, so an arrival costs O(1) and memory is O(buckets)), with the exact Poisson
(Garwood) confidence interval on the count. A two-sided CUSUM on the inter-arrival times against
the rate the policy in force was solved for (the *reference*) detects a change: the upper arm tests
rate x ratio, the lower arm rate / ratio. Its threshold is h = ln(false_alarm_arrivals); by Lorden's
bound the mean run between false alarms of each arm is at least e^h arrivals. When an arm fires, the
estimate restarts from the CUSUM's change-point estimate (the last time that arm was zero), so the
new policy is solved for the new regime, not for a mix of old and new. The lower arm also counts the
silence since the last arrival, so a stream that stops is detected without waiting for an arrival.

Pure logic: every method takes its timestamps from the caller (the gate's clock), so the same code
runs live and in tests on synthetic streams, and nothing here reads the wall clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from scipy import stats

from solver.quantities import check_count, check_number


@dataclass(frozen=True)
class RateEstimate:
    """Arrivals per second over ``span_s``, with its two-sided ``confidence`` interval [lo, hi]."""

    rate: float
    lo: float
    hi: float
    n: int
    """Arrivals counted."""
    span_s: float
    """The span they were counted over (at most the window)."""
    confidence: float

    def contains(self, rate: float) -> bool:
        return self.lo <= rate <= self.hi


def poisson_rate_interval(n: int, span_s: float, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) interval for a Poisson rate from n events in span_s seconds."""
    if span_s <= 0:
        return 0.0, math.inf
    a = 1.0 - confidence
    lo = 0.0 if n == 0 else float(stats.chi2.ppf(a / 2, 2 * n)) / (2 * span_s)
    hi = float(stats.chi2.ppf(1 - a / 2, 2 * n + 2)) / (2 * span_s)
    return lo, hi


class RateEstimator:
    """Sliding-window Poisson rate with a confidence interval and a two-sided CUSUM change detector.

    Usage in the gate: ``observe(t)`` on every arrival; at each control tick, if ``changed(now)``,
    solve for ``estimate(now).rate`` and then ``reset(now, rate)``. ``changed`` is also true once
    enough arrivals were seen and no reference has been set yet (the first solve).
    """

    def __init__(
        self,
        start_s: float,
        *,
        window_s: float = 30.0,
        buckets: int = 60,
        confidence: float = 0.95,
        change_ratio: float = 2.0,
        false_alarm_arrivals: float = 1e6,
        min_arrivals: int = 20,
        settle_arrivals: int = 100,
        lag_s: float = 0.0,
    ) -> None:
        self.window_s = check_number("window_s", window_s)
        self.lag_s = check_number("lag_s", lag_s, inclusive=True)
        """How late arrivals may reach the estimator, seconds: a data plane that reports them in batches
        (the native gate, every ``native_report_interval_s``) has told of arrivals only up to about now -
        lag_s. The estimate's span and the silence the lower arm counts end there (or at the last arrival,
        if later): the time not yet reported is neither a lower rate nor a silence."""
        check_count("buckets", buckets)
        self.confidence = check_number("confidence", confidence, high=1.0)
        self.change_ratio = check_number("change_ratio", change_ratio, low=1.0)
        self.threshold = math.log(check_number("false_alarm_arrivals", false_alarm_arrivals, low=1.0))
        check_count("min_arrivals", min_arrivals)
        self.min_arrivals = min_arrivals
        check_count("settle_arrivals", settle_arrivals)
        self.settle_arrivals = settle_arrivals
        start_s = float(start_s)
        if not math.isfinite(start_s):
            raise ValueError(f"start_s must be finite, got {start_s!r}")
        self._bucket = self.window_s / buckets
        self._total = 0
        self._last = start_s
        self._marks: deque[tuple[float, int]] = deque([(start_s, 0)])
        self._next_mark = start_s + self._bucket
        self._from = (start_s, 0)  # (time, cumulative count) the estimate may not reach before
        self._log_r = math.log(self.change_ratio)
        self.reference: float | None = None
        self._clear_cusum(start_s)

    # -- observations --------------------------------------------------------------------------

    def observe(self, t: float) -> None:
        """One arrival at time t (seconds, non-decreasing)."""
        if not t >= self._last:  # also refuses NaN
            raise ValueError(f"arrival time {t!r} is before the previous one ({self._last!r})")
        if t >= self._next_mark:
            self._advance(t)
        self._last = t
        self._total += 1
        self._cusum(t, 1)

    def observe_count(self, t: float, count: int) -> None:
        """``count`` arrivals in (previous observation, t], their times unknown (a polled counter).

        For callers that see a cumulative request count at poll times (Triton's statistics API)
        rather than each arrival. The window's bucket marks inside the interval get the count
        interpolated linearly (arrivals assumed spread evenly), so the estimate is not biased by the
        poll period. The CUSUM takes the interval's Poisson log-likelihood ratio at once, which is
        the sum of the per-arrival increments ``observe`` would add (k ln r - (r - 1) lambda dt for
        the upper arm), clipped at zero once per interval instead of once per arrival: the CUSUM of
        the grouped observations, with the same threshold. Change points fall on poll times.
        """
        k = int(count)
        if k != count or k < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
        t = float(t)
        if not t >= self._last:
            raise ValueError(f"observation time {t!r} is before the previous one ({self._last!r})")
        start, base = self._last, self._total
        dt = t - start
        if t >= self._next_mark:
            if dt > 0 and k > 0:
                # marks in (start, t] carry the interpolated count; _advance then appends the rest
                if t - self._next_mark > self.window_s:
                    self._next_mark += math.ceil((t - self.window_s - self._next_mark) / self._bucket) * self._bucket
                while self._next_mark <= t:
                    frac = (self._next_mark - start) / dt
                    self._marks.append((self._next_mark, base + int(round(k * frac))))
                    self._next_mark += self._bucket
            self._advance(t)  # drops the marks that left the window
        self._last = t
        self._total = base + k
        self._cusum(t, k)

    def _cusum(self, t: float, k: int) -> None:
        """Both CUSUM arms' step for ``k`` arrivals since the previous step, observed at ``t``: the
        Poisson log-likelihood ratio k ln r -/+ (r - 1 | 1 - 1/r) lambda dt, clipped at zero."""
        if self.reference is None or self._alarm is not None:
            return
        x = t - self._clock
        self._clock = t
        lam = self.reference
        self._up += k * self._log_r - (self.change_ratio - 1.0) * lam * x
        if self._up <= 0.0:
            self._up = 0.0
            self._up_zero = (t, self._total)
        elif self._up >= self.threshold:
            self._raise("up", self._up_zero)
            return
        self._down += -k * self._log_r + (1.0 - 1.0 / self.change_ratio) * lam * x
        if self._down <= 0.0:
            self._down = 0.0
            self._down_zero = (t, self._total)
        elif self._down >= self.threshold:
            self._raise("down", self._down_zero)

    def _advance(self, now: float) -> None:
        """Append the bucket marks up to ``now`` and drop those older than the window."""
        if now - self._next_mark > self.window_s:
            # A long silence: skip the marks that would fall out of the window at once (no arrival
            # happened in between, so the kept ones carry the same count).
            self._next_mark += math.ceil((now - self.window_s - self._next_mark) / self._bucket) * self._bucket
        while self._next_mark <= now:
            self._marks.append((self._next_mark, self._total))
            self._next_mark += self._bucket
        horizon = now - self.window_s
        while len(self._marks) > 1 and self._marks[0][0] < horizon:
            self._marks.popleft()

    # -- estimate ------------------------------------------------------------------------------

    def _seen_until(self, now: float) -> float:
        """The time up to which every arrival has been observed (``lag_s``)."""
        return max(now - self.lag_s, self._last)

    def estimate(self, now: float) -> RateEstimate:
        """The rate over the last window (or since the last detected change, if later)."""
        if now < self._last:
            raise ValueError(f"now ({now!r}) is before the last arrival ({self._last!r})")
        now = self._seen_until(now)
        self._advance(now)
        t0, n0 = self._marks[0]
        if self._from[0] >= t0:
            t0, n0 = self._from
        n = self._total - n0
        span = now - t0
        lo, hi = poisson_rate_interval(n, span, self.confidence)
        rate = n / span if span > 0 else 0.0
        return RateEstimate(rate=rate, lo=lo, hi=hi, n=n, span_s=span, confidence=self.confidence)

    def ready(self, now: float) -> bool:
        """Enough arrivals in the current span to solve for.

        After a detected change the estimate restarts at the change point, which the CUSUM places
        where the new regime looked strongest: the first few arrivals after it overstate the change
        (a selection bias), and a solve for them chases noise (seen on a trace replay: a rise from about
        410 to 430/s read as 665/s, above capacity, from the first 30 arrivals). So a new regime must show ``settle_arrivals``
        arrivals (100: about +-20% at 95%) before it is solved for.
        """
        need = max(self.min_arrivals, self.settle_arrivals) if self._alarm is not None else self.min_arrivals
        return self.estimate(now).n >= need

    # -- change detection ----------------------------------------------------------------------

    @property
    def alarm(self) -> str | None:
        """"up" or "down" once the CUSUM fired (until ``reset``), else None."""
        return self._alarm

    def changed(self, now: float) -> bool:
        """A policy should be (re)solved: the rate moved away from the reference, or none is set yet."""
        if self._alarm is not None:
            return True
        if self.reference is None:
            return self.ready(now)
        # The silence since the last arrival is evidence for a lower rate (censored inter-arrival);
        # only as far as arrivals have been reported (``lag_s``).
        gap = max(0.0, self._seen_until(now) - self._clock)
        if self._down + (1.0 - 1.0 / self.change_ratio) * self.reference * gap >= self.threshold:
            self._raise("down", self._down_zero)
            return True
        return False

    def reset(self, now: float, reference: float | None = None) -> None:
        """A policy was solved for ``reference`` (default: the current estimate): watch for change from it.

        Data since a detected change point are kept; older regimes stay excluded.
        """
        if reference is None:
            reference = self.estimate(now).rate
        reference = float(reference)
        if not math.isfinite(reference) or reference < 0:
            raise ValueError(f"reference rate must be finite and >= 0, got {reference!r}")
        # A zero rate cannot be tested against by inter-arrival times; wait for arrivals again.
        self.reference = reference if reference > 0 else None
        self._clear_cusum(self._seen_until(now))

    def _clear_cusum(self, now: float) -> None:
        self._up = 0.0
        self._down = 0.0
        self._clock = now
        self._up_zero = (now, self._total)
        self._down_zero = (now, self._total)
        self._alarm: str | None = None

    def _raise(self, which: str, change_point: tuple[float, int]) -> None:
        self._alarm = which
        self._from = change_point
