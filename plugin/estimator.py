"""Online estimates the sidecar feeds back into the SMDP: arrival rate, service-time profile, power.

Pure logic: every method takes its timestamps from the caller (the gate's clock), so the same code
runs live and in tests on synthetic streams, and nothing here reads the wall clock.

Arrival rate. ``RateEstimator`` counts arrivals over a sliding window (cumulative counts at a grid
of bucket marks, so an arrival costs O(1) and memory is O(buckets)), with the exact Poisson
(Garwood) confidence interval on the count. A two-sided CUSUM on the inter-arrival times against
the rate the policy in force was solved for (the *reference*) detects a change: the upper arm tests
rate x ratio, the lower arm rate / ratio. Its threshold is h = ln(false_alarm_arrivals); by Lorden's
bound the mean run between false alarms of each arm is at least e^h arrivals. When an arm fires, the
estimate restarts from the CUSUM's change-point estimate (the last time that arm was zero), so the
new policy is solved for the new regime, not for a mix of old and new. The lower arm also counts the
silence since the last arrival, so a stream that stops is detected without waiting for an arrival.

Service time. ``ServiceTimeEstimator`` keeps a running mean and variance per batch size (Welford)
and fits tau(b) = alpha b + tau0 by least squares on all observations (computed from the per-size
statistics), with R^2 and t confidence intervals. Its ``profile`` blends each size's own mean with
the fit, the fit counting as ``prior_weight`` observations, so sizes seen often keep their own
figure, sizes seen rarely lean on the fit, and sizes never seen come from it.

Power. ``PowerSource`` uses Triton's Prometheus metrics (``nv_energy_consumption``, a joule counter,
differenced over time; else ``nv_gpu_power_usage``, watts) when the server exports them, and
otherwise models the power from the profile: (energy of the batches served + P0 x idle time) /
elapsed. Every reading says which it is (``modelled``).
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

from solver.model import ServiceProfile

# ---------------------------------------------------------------------------------------------------
# Arrival rate
# ---------------------------------------------------------------------------------------------------


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


def _check(name: str, value: float, *, low: float = 0.0, inclusive: bool = False, high: float | None = None) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value >= low if inclusive else value > low) and (high is None or value < high)
    if not ok:
        bound = f">= {low}" if inclusive else f"> {low}"
        if high is not None:
            bound += f" and < {high}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


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
    ) -> None:
        self.window_s = _check("window_s", window_s)
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"buckets must be an integer >= 1, got {buckets!r}")
        self.confidence = _check("confidence", confidence, high=1.0)
        self.change_ratio = _check("change_ratio", change_ratio, low=1.0)
        self.threshold = math.log(_check("false_alarm_arrivals", false_alarm_arrivals, low=1.0))
        if isinstance(min_arrivals, bool) or not isinstance(min_arrivals, int) or min_arrivals < 1:
            raise ValueError(f"min_arrivals must be an integer >= 1, got {min_arrivals!r}")
        self.min_arrivals = min_arrivals
        if isinstance(settle_arrivals, bool) or not isinstance(settle_arrivals, int) or settle_arrivals < 1:
            raise ValueError(f"settle_arrivals must be an integer >= 1, got {settle_arrivals!r}")
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
        if self.reference is None or self._alarm is not None:
            return
        x = t - self._clock
        self._clock = t
        lam = self.reference
        self._up += self._log_r - (self.change_ratio - 1.0) * lam * x
        if self._up <= 0.0:
            self._up = 0.0
            self._up_zero = (t, self._total)
        elif self._up >= self.threshold:
            self._raise("up", self._up_zero)
            return
        self._down += -self._log_r + (1.0 - 1.0 / self.change_ratio) * lam * x
        if self._down <= 0.0:
            self._down = 0.0
            self._down_zero = (t, self._total)
        elif self._down >= self.threshold:
            self._raise("down", self._down_zero)

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

    def estimate(self, now: float) -> RateEstimate:
        """The rate over the last window (or since the last detected change, if later)."""
        if now < self._last:
            raise ValueError(f"now ({now!r}) is before the last arrival ({self._last!r})")
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
        # The silence since the last arrival is evidence for a lower rate (censored inter-arrival).
        gap = max(0.0, now - self._clock)
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
        self._clear_cusum(max(now, self._last))

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


# ---------------------------------------------------------------------------------------------------
# Service time
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineFit:
    """tau(b) = alpha b + tau0 by least squares on every observation, with t confidence intervals."""

    alpha_s: float
    tau0_s: float
    r2: float
    alpha_ci: tuple[float, float]
    tau0_ci: tuple[float, float]
    residual_sd_s: float
    n: int
    sizes: int
    """Distinct batch sizes observed."""
    confidence: float

    def predict(self, b: np.ndarray | int) -> np.ndarray:
        return self.alpha_s * np.asarray(b, dtype=float) + self.tau0_s


class ServiceTimeEstimator:
    """Per-batch-size service-time statistics, an affine fit, and a ServiceProfile built from both."""

    def __init__(self, max_batch: int, *, prior_weight: float = 5.0, confidence: float = 0.95) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.max_batch = max_batch
        self.prior_weight = _check("prior_weight", prior_weight, inclusive=True)
        self.confidence = _check("confidence", confidence, high=1.0)
        self._n = np.zeros(max_batch + 1, dtype=np.int64)
        self._mean = np.zeros(max_batch + 1)
        self._m2 = np.zeros(max_batch + 1)

    def observe(self, batch_size: int, seconds: float) -> None:
        """One batch of ``batch_size`` took ``seconds`` (dispatch to completion)."""
        b = int(batch_size)
        if b != batch_size or not 1 <= b <= self.max_batch:
            raise ValueError(f"batch size must be an integer in 1..{self.max_batch}, got {batch_size!r}")
        x = float(seconds)
        if not math.isfinite(x) or x <= 0:
            raise ValueError(f"service time must be a finite number of seconds > 0, got {seconds!r}")
        self._n[b] += 1
        d = x - self._mean[b]
        self._mean[b] += d / self._n[b]
        self._m2[b] += d * (x - self._mean[b])

    def observe_many(self, batch_sizes: Iterable[int], seconds: Iterable[float]) -> None:
        for b, s in zip(batch_sizes, seconds, strict=True):
            self.observe(b, s)

    @property
    def counts(self) -> np.ndarray:
        """Observations per batch size 1..B (index b - 1)."""
        return self._n[1:].copy()

    @property
    def means(self) -> np.ndarray:
        """Mean service time per size 1..B; NaN where none was observed."""
        return np.where(self._n[1:] > 0, self._mean[1:], np.nan)

    def fit(self) -> AffineFit | None:
        """The affine fit, or None with fewer than two distinct sizes or three observations."""
        seen = self._n > 0
        sizes = int(seen.sum())
        total = int(self._n.sum())
        if sizes < 2 or total < 3:
            return None
        b = np.nonzero(seen)[0].astype(float)
        w = self._n[seen].astype(float)
        y = self._mean[seen]
        within = float(self._m2[seen].sum())
        bbar = float(np.dot(w, b) / total)
        ybar = float(np.dot(w, y) / total)
        sxx = float(np.dot(w, (b - bbar) ** 2))
        sxy = float(np.dot(w, (b - bbar) * (y - ybar)))
        alpha = sxy / sxx
        tau0 = ybar - alpha * bbar
        sse = within + float(np.dot(w, (y - (alpha * b + tau0)) ** 2))
        sst = within + float(np.dot(w, (y - ybar) ** 2))
        r2 = 1.0 - sse / sst if sst > 0 else 1.0
        dof = total - 2
        s2 = sse / dof if dof > 0 else math.nan
        q = float(stats.t.ppf(0.5 + self.confidence / 2, dof)) if dof > 0 else math.inf
        se_alpha = math.sqrt(s2 / sxx) if dof > 0 else math.inf
        se_tau0 = math.sqrt(s2 * (1.0 / total + bbar * bbar / sxx)) if dof > 0 else math.inf
        return AffineFit(
            alpha_s=alpha,
            tau0_s=tau0,
            r2=r2,
            alpha_ci=(alpha - q * se_alpha, alpha + q * se_alpha),
            tau0_ci=(tau0 - q * se_tau0, tau0 + q * se_tau0),
            residual_sd_s=math.sqrt(s2) if dof > 0 else math.nan,
            n=total,
            sizes=sizes,
            confidence=self.confidence,
        )

    def profile(
        self,
        busy_power_w: float | Sequence[float] | np.ndarray,
        *,
        max_batch: int | None = None,
        cv: float | None = None,
        prior: ServiceProfile | None = None,
    ) -> ServiceProfile:
        """A profile for sizes 1..max_batch: observed means blended with the fit (or a scaled prior).

        busy_power_w: board power while serving, watts, one value or one per size (for example a
        published profile's ``busy_power_w``); the energy of a batch is that power times its time.
        cv: service-time CV for every size; default: each size's own where it has two or more
        observations, else the median of those.
        prior: a profile to fall back on when the fit is not available (one size observed): its
        times are scaled to the observations.
        """
        top = self.max_batch if max_batch is None else int(max_batch)
        if not 1 <= top <= self.max_batch:
            raise ValueError(f"max_batch must be in 1..{self.max_batch}, got {max_batch!r}")
        sizes = np.arange(1, top + 1)
        n = self._n[1: top + 1].astype(float)
        mean = self._mean[1: top + 1]
        fit = self.fit()
        if fit is not None:
            base = fit.predict(sizes)
            source = f"estimated (affine fit alpha={fit.alpha_s:.4g}s, tau0={fit.tau0_s:.4g}s, R2={fit.r2:.4f})"
        elif prior is not None:
            if prior.max_batch < top:
                raise ValueError(f"prior profile covers batch sizes 1..{prior.max_batch}, need 1..{top}")
            seen = n > 0
            if not np.any(seen):
                raise ValueError("no service times observed yet")
            scale = float(np.dot(n[seen], mean[seen]) / np.dot(n[seen], prior.mean_s[:top][seen]))
            base = prior.mean_s[:top] * scale
            source = f"estimated (prior scaled by {scale:.4g})"
        else:
            raise ValueError("a service profile needs observations at two or more batch sizes, or a prior profile")
        tau = (n * mean + self.prior_weight * base) / (n + self.prior_weight)
        tau = np.where(n > 0, tau, base)
        if np.any(tau <= 0):
            b = int(sizes[np.argmax(tau <= 0)])
            raise ValueError(f"estimated service time for batch size {b} is {tau[b - 1]!r} <= 0: "
                             "the fit does not hold at that size")
        power = np.broadcast_to(np.asarray(busy_power_w, dtype=float), (top,)) if np.ndim(busy_power_w) == 0 \
            else np.asarray(busy_power_w, dtype=float)[:top]
        if power.shape != (top,):
            raise ValueError(f"busy_power_w must be one value or one per batch size 1..{top}")
        if np.any(~np.isfinite(power)) or np.any(power < 0):
            raise ValueError(f"busy power must be finite and >= 0 watts, got {power.tolist()!r}")
        if cv is None:
            multi = self._n[1: top + 1] >= 2
            own = np.zeros(top)
            own[multi] = np.sqrt(self._m2[1: top + 1][multi] / (self._n[1: top + 1][multi] - 1)) / mean[multi]
            fill = float(np.median(own[multi])) if np.any(multi) else 0.0
            cvs = np.where(multi, own, fill)
        else:
            cvs = np.full(top, _check("cv", cv, inclusive=True))
        return ServiceProfile(mean_s=tau, energy_j=power * tau, cv=cvs, source=source)


# ---------------------------------------------------------------------------------------------------
# Power
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_prometheus_text(text: str, names: Iterable[str] | None = None) -> list[MetricSample]:
    """Samples of the Prometheus text exposition format (the subset Triton writes).

    Comments and blank lines are skipped; a malformed sample line raises ValueError naming its line.
    """
    wanted = None if names is None else set(names)
    out: list[MetricSample] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"metrics line {lineno} is not a sample: {raw!r}")
        name, labels_text, value_text = m.groups()
        if wanted is not None and name not in wanted:
            continue
        labels: dict[str, str] = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                if lm is None:
                    raise ValueError(f"metrics line {lineno} has malformed labels: {raw!r}")
                labels[lm.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], lm.group(2))
                pos = lm.end()
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"metrics line {lineno} has a non-numeric value {value_text!r}") from None
        out.append(MetricSample(name, labels, value))
    return out


@dataclass(frozen=True)
class GpuMetrics:
    """Triton's GPU power figures at one scrape, summed over the selected GPUs."""

    power_w: float | None
    """nv_gpu_power_usage: instantaneous board power, watts."""
    energy_j: float | None
    """nv_energy_consumption: joules since Triton started."""
    gpus: int


def gpu_metrics(text: str, gpu_uuids: Sequence[str] | None = None) -> GpuMetrics:
    """Sum ``nv_gpu_power_usage`` and ``nv_energy_consumption`` over the GPUs (all, or those listed)."""
    samples = parse_prometheus_text(text, ("nv_gpu_power_usage", "nv_energy_consumption"))
    keep = None if gpu_uuids is None else set(gpu_uuids)
    power: dict[str, float] = {}
    energy: dict[str, float] = {}
    for s in samples:
        gpu = s.labels.get("gpu_uuid", "")
        if keep is not None and gpu not in keep:
            continue
        if not math.isfinite(s.value):
            continue
        (power if s.name == "nv_gpu_power_usage" else energy)[gpu] = s.value
    return GpuMetrics(
        power_w=sum(power.values()) if power else None,
        energy_j=sum(energy.values()) if energy else None,
        gpus=len(set(power) | set(energy)),
    )


def fetch_metrics(url: str, timeout_s: float = 2.0) -> str:
    """GET Triton's metrics endpoint (for example http://127.0.0.1:8002/metrics); raises OSError."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - operator-given URL
        return resp.read().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class PowerReading:
    power_w: float
    modelled: bool
    """True when computed from the profile, not read from the accelerator."""
    source: str
    """"nv_energy_consumption", "nv_gpu_power_usage" or "profile"."""


class PowerSource:
    """Mean accelerator power: measured from Triton's metrics when it exports them, else modelled.

    Feed it scrapes with ``observe_metrics(now, text)``; ask ``reading(...)`` with the gate's batch
    counts over the same interval, used for the modelled figure. A scrape older than ``max_age_s``
    no longer counts as a measurement.
    """

    def __init__(
        self, profile: ServiceProfile, idle_power_w: float, *,
        gpu_uuids: Sequence[str] | None = None, max_age_s: float = 30.0,
    ) -> None:
        self.profile = profile
        self.idle_power_w = _check("idle_power_w", idle_power_w, inclusive=True)
        self.gpu_uuids = None if gpu_uuids is None else tuple(gpu_uuids)
        self.max_age_s = _check("max_age_s", max_age_s)
        self._prev: tuple[float, float] | None = None  # (time, energy) of the previous scrape
        self._measured: tuple[float, float, str] | None = None  # (time, watts, source)

    def observe_metrics(self, now: float, text: str) -> GpuMetrics:
        m = gpu_metrics(text, self.gpu_uuids)
        if m.energy_j is not None:
            prev, self._prev = self._prev, (now, m.energy_j)
            if prev is not None and now > prev[0] and m.energy_j >= prev[1]:
                self._measured = (now, (m.energy_j - prev[1]) / (now - prev[0]), "nv_energy_consumption")
                return m
        if m.power_w is not None:
            self._measured = (now, m.power_w, "nv_gpu_power_usage")
        return m

    def modelled(self, elapsed_s: float, batch_counts: Sequence[int] | np.ndarray, busy_s: float) -> float:
        """(sum over batches of e(b) + P0 x idle time) / elapsed; batch_counts[b] = batches of size b."""
        elapsed_s = _check("elapsed_s", elapsed_s)
        counts = np.asarray(batch_counts, dtype=float)
        top = min(counts.size - 1, self.profile.max_batch)
        if counts.size - 1 > self.profile.max_batch and np.any(counts[self.profile.max_batch + 1:] > 0):
            raise ValueError(f"batches larger than the profile's largest size {self.profile.max_batch} were counted")
        energy = float(np.dot(counts[1: top + 1], self.profile.energy_j[:top]))
        idle = max(0.0, elapsed_s - float(busy_s))
        return (energy + self.idle_power_w * idle) / elapsed_s

    def reading(
        self, now: float, *, elapsed_s: float, batch_counts: Sequence[int] | np.ndarray, busy_s: float
    ) -> PowerReading:
        if self._measured is not None and now - self._measured[0] <= self.max_age_s:
            return PowerReading(self._measured[1], False, self._measured[2])
        return PowerReading(self.modelled(elapsed_s, batch_counts, busy_s), True, "profile")


# ---------------------------------------------------------------------------------------------------
# Learning the profile the policy is solved with
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeEstimate:
    """What is known of tau(b) at one batch size."""

    batch_size: int
    n: int
    """Batches of this size the gate saw complete."""
    mean_s: float
    """Their mean dispatch-to-completion time, seconds (NaN when n = 0)."""
    ci_s: float
    """Half-width of the t confidence interval of that mean, seconds (inf with fewer than 2)."""
    prior_s: float
    """The prior profile's (the CSV's) tau(b), seconds."""
    learned_s: float
    """tau(b) of the learned profile, seconds."""
    triton_compute_s: float | None = None
    """Triton's own compute_infer time per batch of this size since the sidecar started, seconds."""
    triton_n: int = 0


@dataclass(frozen=True)
class ProfileDrift:
    """The largest significant difference between a learned profile and the one in force."""

    batch_size: int
    in_force_s: float
    learned_s: float
    n: int

    @property
    def relative(self) -> float:
        """learned / in force - 1 (0.25 = the learned tau(b) is 25% longer)."""
        return self.learned_s / self.in_force_s - 1.0


class ProfileLearner:
    """The service-time profile the policy should be solved with, learned from completed batches.

    Pure logic, no clock and no I/O: the controller feeds it ``observe(b, seconds)`` for every
    batch the gate saw complete (an O(1) Welford update) and, now and then, Triton's cumulative
    per-size statistics; at its own pace it asks ``profile()`` and ``drift(in_force)``.

    What is learned is the time between the gate dispatching a merged batch of b rows and the
    answer coming back, gRPC and merge/split included. That is the time during which the gate's
    instance slot is held and its requests wait, i.e. the S_b of the SMDP as the gate experiences it,
    so it is the quantity the policy must be solved with (Triton's ``compute_infer`` is kept beside
    it for diagnosis: their difference is the per-batch overhead outside the model).

    The learned tau(b) blends, per size, the size's own mean with a *base* curve, the base counting
    as ``prior_weight`` observations: sizes seen often keep their own figure, sizes seen rarely or
    never lean on the base. The base is the prior (the CSV) reshaped by the data: tau0 + c x
    prior(b) fitted (weighted least squares) on the sizes with ``min_samples`` or more batches when
    two or more such sizes with distinct prior times exist, else the prior scaled by the ratio of
    observed to prior time over those sizes. While no size has ``min_samples`` batches the data are
    thin and the profile is the prior unchanged. Energy per batch e(b) and the service CV stay the
    prior's: the time is what is learned here (power is ``PowerSource``'s job).
    """

    def __init__(
        self,
        prior: ServiceProfile,
        *,
        drift: float = 0.10,
        min_samples: int = 30,
        prior_weight: float = 20.0,
        confidence: float = 0.95,
    ) -> None:
        self.prior = prior
        self.max_batch = prior.max_batch
        self.drift_threshold = _check("drift", drift)
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
            raise ValueError(f"min_samples must be an integer >= 2, got {min_samples!r}")
        self.min_samples = min_samples
        self.prior_weight = _check("prior_weight", prior_weight, inclusive=True)
        self.confidence = _check("confidence", confidence, high=1.0)
        self.times = ServiceTimeEstimator(self.max_batch, prior_weight=self.prior_weight, confidence=confidence)
        self.batches = 0
        self._triton_base: dict[int, tuple[int, int]] | None = None  # size -> (count, ns) at the first read
        self._triton: dict[int, tuple[int, int]] = {}  # size -> (count, ns) since the first read

    # -- inputs ------------------------------------------------------------------------------
    def observe(self, batch_size: int, seconds: float) -> bool:
        """One completed batch; returns False (and learns nothing) for a size outside 1..B or a bad time."""
        if not 1 <= batch_size <= self.max_batch or not seconds > 0 or not math.isfinite(seconds):
            return False
        self.times.observe(batch_size, seconds)
        self.batches += 1
        return True

    def observe_triton(self, batch_stats: Iterable[tuple[int, int, int]]) -> None:
        """Triton's cumulative ``(batch_size, compute_infer count, compute_infer ns)`` per size.

        The first read is the baseline (Triton counts since it started, the sidecar since it did);
        later reads are differenced against it. A count that went backwards (Triton restarted)
        starts a new baseline.
        """
        now = {int(b): (int(c), int(ns)) for b, c, ns in batch_stats if 1 <= int(b) <= self.max_batch}
        base = self._triton_base
        if base is None or any(c < base.get(b, (0, 0))[0] for b, (c, _) in now.items()):
            self._triton_base = now
            self._triton = {}
            return
        self._triton = {
            b: (c - base.get(b, (0, 0))[0], ns - base.get(b, (0, 0))[1])
            for b, (c, ns) in now.items() if c > base.get(b, (0, 0))[0]
        }

    # -- outputs -----------------------------------------------------------------------------
    def _base(self, n: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, str]:
        prior = self.prior.mean_s
        ok = n >= self.min_samples
        w, x, y = n[ok].astype(float), prior[ok], mean[ok]
        if ok.sum() >= 2 and x.max() > 1.2 * x.min():
            xbar = float(np.dot(w, x) / w.sum())
            ybar = float(np.dot(w, y) / w.sum())
            c = float(np.dot(w, (x - xbar) * (y - ybar)) / np.dot(w, (x - xbar) ** 2))
            tau0 = ybar - c * xbar
            base = tau0 + c * prior
            if c > 0 and np.all(base > 0):
                return base, f"prior reshaped: {tau0 * 1e3:.3g} ms + {c:.3g} x prior"
        scale = float(np.dot(w, y) / np.dot(w, x))
        return prior * scale, f"prior scaled by {scale:.3g}"

    def profile(self) -> ServiceProfile:
        """The profile to solve with: the prior while data are thin, else the learned blend."""
        n = self.times._n[1:].astype(float)
        if not np.any(n >= self.min_samples):
            return self.prior
        mean = self.times._mean[1:]
        base, how = self._base(n, mean)
        k = self.prior_weight
        blend = np.divide(n * mean + k * base, n + k, out=base.copy(), where=(n + k) > 0)
        tau = np.where(n > 0, blend, base)
        return ServiceProfile(
            mean_s=tau, energy_j=self.prior.energy_j, cv=self.prior.cv,
            source=f"learned from {self.batches} batches ({how}; own means weighted n/(n+{k:g}))",
        )

    def half_widths(self) -> np.ndarray:
        """t confidence half-width of each size's mean, seconds (inf with fewer than 2 batches)."""
        n = self.times._n[1:]
        out = np.full(self.max_batch, math.inf)
        many = n >= 2
        if np.any(many):
            sd = np.sqrt(self.times._m2[1:][many] / (n[many] - 1))
            q = stats.t.ppf(0.5 + self.confidence / 2, n[many] - 1)
            out[many] = q * sd / np.sqrt(n[many])
        return out

    def drift(self, in_force: ServiceProfile, candidate: ServiceProfile | None = None) -> ProfileDrift | None:
        """The largest significant move of tau(b) away from the profile in force, or None.

        Significant at size b: b has ``min_samples`` or more batches, the candidate (learned) tau(b)
        differs from the one in force by more than ``drift`` (relative), and the confidence interval
        of b's observed mean excludes the value in force (so noise alone does not ask for solves).
        Comparing the candidate, not the raw mean, keeps a solve from repeating: once the learned
        profile is in force the next candidate differs from it only by what new data moved.
        """
        cand = self.profile() if candidate is None else candidate
        n = self.times._n[1:]
        top = min(in_force.max_batch, cand.max_batch, self.max_batch)
        ok = n[:top] >= self.min_samples
        if not np.any(ok):
            return None
        force = in_force.mean_s[:top]
        rel = np.abs(cand.mean_s[:top] / force - 1.0)
        sig = ok & (rel > self.drift_threshold) & (
            np.abs(self.times._mean[1: top + 1] - force) > self.half_widths()[:top])
        if not np.any(sig):
            return None
        b = int(np.argmax(np.where(sig, rel, -1.0))) + 1
        return ProfileDrift(b, float(force[b - 1]), float(cand.mean_s[b - 1]), int(n[b - 1]))

    def sizes(self, profile: ServiceProfile | None = None) -> list[SizeEstimate]:
        """Per-size figures for the sizes seen (by the gate or by Triton), for status and metrics."""
        prof = self.profile() if profile is None else profile
        n = self.times._n[1:]
        hw = self.half_widths()
        out = []
        for b in range(1, self.max_batch + 1):
            tc, tns = self._triton.get(b, (0, 0))
            if n[b - 1] == 0 and tc == 0:
                continue
            out.append(SizeEstimate(
                batch_size=b, n=int(n[b - 1]),
                mean_s=float(self.times._mean[b]) if n[b - 1] else math.nan,
                ci_s=float(hw[b - 1]), prior_s=float(self.prior.mean_s[b - 1]), learned_s=float(prof.mean_s[b - 1]),
                triton_compute_s=(tns / tc * 1e-9) if tc else None, triton_n=tc,
            ))
        return out
