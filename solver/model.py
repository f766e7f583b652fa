"""The frozen, validated batching model that every solver, evaluator and simulator takes.

Validation happens once, here, so that solvers can be pure functions of a model that is known to be
sound; every error names the offending field and value.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
from scipy import special, stats

ServiceLaw = Literal["deterministic", "gamma", "empirical"]


class ModelError(ValueError):
    """A model or profile input is invalid; the message names the bad field and value."""


def _finite_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ModelError(f"{name} must be a finite number > 0, got {value!r}")
    return value


@dataclass(frozen=True)
class ServiceProfile:
    """Service time and energy of a batch, for every batch size 1..max_batch.

    Arrays are indexed by batch size minus one. Sizes missing from the source are linearly
    interpolated (and listed in ``interpolated``) so that a published table with a few sizes
    (1, 2, 4, 8, 64, 128) still defines every action of the SMDP.
    """

    mean_s: np.ndarray
    """tau(b): mean service time of a batch of b, seconds."""
    energy_j: np.ndarray
    """e(b): energy of one batch of b, joules (busy power x service time)."""
    cv: np.ndarray
    """Coefficient of variation of S_b (0 = deterministic, else gamma with that CV)."""
    samples: tuple[np.ndarray, ...] | None = None
    """Optional empirical service-time samples per batch size (seconds); overrides the gamma law."""
    interpolated: tuple[int, ...] = ()
    """Batch sizes whose figures were interpolated rather than given."""
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("mean_s", "energy_j", "cv"):
            arr = np.asarray(getattr(self, name), dtype=float)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        n = self.mean_s.shape[0]
        if n < 1:
            raise ModelError("service profile is empty: it needs at least batch size 1")
        if self.energy_j.shape != (n,) or self.cv.shape != (n,):
            raise ModelError("service profile arrays must all have one entry per batch size")
        for b in range(1, n + 1):
            t, e, c = self.mean_s[b - 1], self.energy_j[b - 1], self.cv[b - 1]
            if not math.isfinite(t) or t <= 0:
                raise ModelError(f"mean service time for batch size {b} must be finite and > 0, got {t!r}")
            if not math.isfinite(e) or e < 0:
                raise ModelError(f"batch energy for batch size {b} must be finite and >= 0, got {e!r}")
            if not math.isfinite(c) or c < 0:
                raise ModelError(f"service CV for batch size {b} must be finite and >= 0, got {c!r}")
        if self.samples is not None:
            if len(self.samples) != n:
                raise ModelError("empirical samples must be given for every batch size")
            frozen = []
            for b, s in enumerate(self.samples, start=1):
                arr = np.asarray(s, dtype=float)
                if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                    raise ModelError(f"empirical service samples for batch size {b} must be non-empty, finite and > 0")
                arr.setflags(write=False)
                frozen.append(arr)
            object.__setattr__(self, "samples", tuple(frozen))

    @property
    def max_batch(self) -> int:
        return int(self.mean_s.shape[0])

    @property
    def law(self) -> ServiceLaw:
        if self.samples is not None:
            return "empirical"
        return "deterministic" if not np.any(self.cv > 0) else "gamma"

    @property
    def busy_power_w(self) -> np.ndarray:
        """Mean board power while serving a batch of b, watts."""
        return self.energy_j / self.mean_s

    def second_moment(self, b: int) -> float:
        """E[S_b^2], seconds^2."""
        if self.samples is not None:
            s = self.samples[b - 1]
            return float(np.mean(s * s))
        t, c = self.mean_s[b - 1], self.cv[b - 1]
        return float(t * t * (1.0 + c * c))

    def truncated(self, max_batch: int) -> "ServiceProfile":
        """The profile restricted to batch sizes 1..max_batch."""
        if max_batch < 1:
            raise ModelError(f"max_batch must be >= 1, got {max_batch}")
        if max_batch > self.max_batch:
            raise ModelError(
                f"max_batch {max_batch} exceeds the largest batch size in the profile ({self.max_batch})"
            )
        return replace(
            self,
            mean_s=self.mean_s[:max_batch],
            energy_j=self.energy_j[:max_batch],
            cv=self.cv[:max_batch],
            samples=None if self.samples is None else self.samples[:max_batch],
            interpolated=tuple(b for b in self.interpolated if b <= max_batch),
        )

    def arrival_pmf(self, b: int, rate: float, kmax: int) -> np.ndarray:
        """P(K = k), k = 0..kmax, for K the Poisson(rate) arrivals during one S_b.

        The last entry is not a tail mass; callers that need one take 1 - sum.
        """
        k = np.arange(kmax + 1)
        if self.samples is not None:
            lam_s = rate * self.samples[b - 1][:, None]
            return np.mean(stats.poisson.pmf(k[None, :], lam_s), axis=0)
        t, c = self.mean_s[b - 1], self.cv[b - 1]
        if c == 0:
            return stats.poisson.pmf(k, rate * t)
        shape = 1.0 / (c * c)
        scale = t * c * c
        p = 1.0 / (1.0 + rate * scale)
        return stats.nbinom.pmf(k, shape, p)

    def sample(self, b: int | np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw service times for the given batch sizes (vectorised)."""
        b = np.atleast_1d(np.asarray(b, dtype=int))
        if self.samples is not None:
            out = np.empty(b.shape, dtype=float)
            for size in np.unique(b):
                idx = b == size
                out[idx] = rng.choice(self.samples[size - 1], size=int(idx.sum()))
            return out
        t = self.mean_s[b - 1]
        c = self.cv[b - 1]
        out = t.copy()
        g = c > 0
        if np.any(g):
            shape = 1.0 / (c[g] ** 2)
            out[g] = rng.gamma(shape, t[g] / shape)
        return out

    @classmethod
    def from_table(
        cls,
        batch_sizes: Sequence[int],
        mean_s: Sequence[float],
        energy_j: Sequence[float],
        cv: Sequence[float] | float = 0.0,
        max_batch: int | None = None,
        source: str = "",
    ) -> "ServiceProfile":
        """Build a profile from (possibly sparse) rows, interpolating the missing sizes linearly.

        Sizes above the largest given are not extrapolated: ``max_batch`` may not exceed it.
        """
        sizes = np.asarray(batch_sizes, dtype=float)
        if sizes.size == 0:
            raise ModelError("profile has no rows")
        if np.any(~np.isfinite(sizes)) or np.any(sizes != np.round(sizes)) or np.any(sizes < 1):
            raise ModelError(f"batch sizes must be integers >= 1, got {list(batch_sizes)}")
        order = np.argsort(sizes)
        sizes = sizes[order].astype(int)
        if np.any(np.diff(sizes) == 0):
            raise ModelError(f"batch size {int(sizes[np.argmax(np.diff(sizes) == 0)])} appears twice in the profile")
        t = np.asarray(mean_s, dtype=float)[order]
        e = np.asarray(energy_j, dtype=float)[order]
        c = np.broadcast_to(np.asarray(cv, dtype=float), sizes.shape)[order] if np.ndim(cv) else np.full(sizes.shape, float(cv))
        for name, arr in (("mean_service_s", t), ("batch_energy_j", e), ("service_cv", c)):
            bad = ~np.isfinite(arr) | (arr <= 0 if name == "mean_service_s" else arr < 0)
            if np.any(bad):
                i = int(np.argmax(bad))
                raise ModelError(f"{name} for batch size {sizes[i]} is invalid: {arr[i]!r}")
        if sizes[0] != 1:
            raise ModelError(f"profile must include batch size 1 (smallest given is {sizes[0]})")
        top = int(sizes[-1]) if max_batch is None else int(max_batch)
        if top < 1:
            raise ModelError(f"max_batch must be >= 1, got {top}")
        if top > sizes[-1]:
            raise ModelError(f"max_batch {top} exceeds the largest batch size in the profile ({sizes[-1]})")
        grid = np.arange(1, top + 1)
        interpolated = tuple(int(b) for b in grid if b not in set(sizes.tolist()))
        return cls(
            mean_s=np.interp(grid, sizes, t),
            energy_j=np.interp(grid, sizes, e),
            cv=np.interp(grid, sizes, c),
            interpolated=interpolated,
            source=source,
        )

    @classmethod
    def from_csv(cls, path: str | Path, max_batch: int | None = None) -> "ServiceProfile":
        """Read ``batch_size,mean_service_s,batch_energy_j[,service_cv]``."""
        path = Path(path)
        try:
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                cols = set(reader.fieldnames or [])
                need = {"batch_size", "mean_service_s", "batch_energy_j"}
                if not need <= cols:
                    raise ModelError(f"{path}: missing column(s) {sorted(need - cols)}; have {sorted(cols)}")
                rows = list(reader)
        except OSError as exc:
            raise ModelError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
        try:
            sizes = [float(r["batch_size"]) for r in rows]
            t = [float(r["mean_service_s"]) for r in rows]
            e = [float(r["batch_energy_j"]) for r in rows]
            c = [float(r.get("service_cv") or 0.0) for r in rows]
        except ValueError as exc:
            raise ModelError(f"{path}: non-numeric value: {exc}") from exc
        return cls.from_table(sizes, t, e, c, max_batch=max_batch, source=str(path))

    @classmethod
    def affine(
        cls, max_batch: int, alpha_s: float, tau0_s: float, beta_j: float, c0_j: float, cv: float = 0.0
    ) -> "ServiceProfile":
        """tau(b) = alpha*b + tau0 and e(b) = beta*b + c0 (Inoue's fitted form)."""
        b = np.arange(1, max_batch + 1)
        return cls(mean_s=alpha_s * b + tau0_s, energy_j=beta_j * b + c0_j, cv=np.full(max_batch, float(cv)),
                   source="affine")


@dataclass(frozen=True)
class BatchingModel:
    """Everything the SMDP needs: lambda, B, the service profile, P0 and w.

    The objective is J = W + w * P with W in seconds and P in watts, so w is in seconds per watt.
    """

    rate: float
    """lambda: Poisson arrival rate, requests per second."""
    max_batch: int
    """B: the largest batch the server may run."""
    profile: ServiceProfile
    """Service time and energy per batch size; truncated to B at construction."""
    idle_power_w: float
    """P0: accelerator power while idle, watts."""
    weight: float = 0.0
    """w: latency/power trade-off, seconds per watt (>= 0)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, (int, np.integer)):
            raise ModelError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if self.max_batch < 1:
            raise ModelError(f"max_batch must be >= 1, got {self.max_batch}")
        object.__setattr__(self, "max_batch", int(self.max_batch))
        rate = _finite_positive("arrival rate", self.rate)
        object.__setattr__(self, "rate", rate)
        w = float(self.weight)
        if not math.isfinite(w) or w < 0:
            raise ModelError(f"weight w must be finite and >= 0 (seconds per watt), got {self.weight!r}")
        object.__setattr__(self, "weight", w)
        p0 = float(self.idle_power_w)
        if not math.isfinite(p0) or p0 < 0:
            raise ModelError(f"idle power must be finite and >= 0 watts, got {self.idle_power_w!r}")
        object.__setattr__(self, "idle_power_w", p0)
        if self.profile.max_batch != self.max_batch:
            object.__setattr__(self, "profile", self.profile.truncated(self.max_batch))
        cap = self.capacity
        if rate >= cap:
            raise ModelError(
                f"arrival rate {rate:.6g}/s is at or above capacity B/tau(B) = {self.max_batch}/"
                f"{self.profile.mean_s[-1]:.6g}s = {cap:.6g}/s: no stationary policy exists"
            )

    @property
    def capacity(self) -> float:
        """B / tau(B): the highest sustainable arrival rate, requests per second."""
        return self.max_batch / float(self.profile.mean_s[self.max_batch - 1])

    @property
    def load(self) -> float:
        """rho = lambda / capacity."""
        return self.rate / self.capacity

    def with_(self, **changes) -> "BatchingModel":
        """A validated copy with some fields changed (rate, weight, ...)."""
        return replace(self, **changes)
