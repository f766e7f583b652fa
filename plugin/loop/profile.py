"""The service-time profile, learned online from completed batches: what the policy is solved with.

Service time. ``ServiceTimeEstimator`` keeps a running mean and variance per batch size (Welford)
and fits tau(b) = alpha b + tau0 by least squares on all observations (computed from the per-size
statistics), with R^2 and t confidence intervals. Its ``profile`` blends each size's own mean with
the fit, the fit counting as ``prior_weight`` observations, so sizes seen often keep their own
figure, sizes seen rarely lean on the fit, and sizes never seen come from it.

``ProfileLearner`` blends a prior (the CSV profile) with each batch size's measured mean and says when the
learned profile drifted enough from the one in force to re-solve.

Pure logic: every method takes its timestamps from the caller (the gate's clock), so the same code
runs live and in tests on synthetic streams, and nothing here reads the wall clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import stats

from solver.model import ServiceProfile
from solver.quantities import check_count, check_number


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
        check_count("max_batch", max_batch)
        self.max_batch = max_batch
        self.prior_weight = check_number("prior_weight", prior_weight, inclusive=True)
        self.confidence = check_number("confidence", confidence, high=1.0)
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
            cvs = np.full(top, check_number("cv", cv, inclusive=True))
        return ServiceProfile(mean_s=tau, energy_j=power * tau, cv=cvs, source=source)


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
        self.drift_threshold = check_number("drift", drift)
        check_count("min_samples", min_samples, low=2)
        self.min_samples = min_samples
        self.prior_weight = check_number("prior_weight", prior_weight, inclusive=True)
        self.confidence = check_number("confidence", confidence, high=1.0)
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
