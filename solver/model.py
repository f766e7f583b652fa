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

from solver.arrival_model import MMPP2, POISSON, ArrivalModel, CompoundPoisson, Poisson
from solver import quantities
from solver.errors import ModelError

ServiceLaw = Literal["deterministic", "gamma", "empirical"]
SAMPLE_MEAN_RTOL = 1e-6
"""How far ``mean_s`` may sit from the mean of the empirical samples (relative) before it is refused."""


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

    Energy convention (one, everywhere): a batch of b that runs for s seconds draws the busy power
    p(b) = e(b) / tau(b) for those s seconds, so it uses p(b) * s joules; idle time draws P0. The
    simulator charges exactly that per batch; the solver and exact evaluation charge its
    expectation, p(b) * E[S_b] = e(b), which gives the same long-run mean power (renewal reward).

    Empirical samples define the service law: with ``samples``, ``mean_s`` must equal their mean
    (a mismatch is refused, naming the batch size and both values) and ``cv`` is replaced by the
    sample CV, so that capacity, costs, K and busy power all come from the same moments.
    ``from_samples`` and ``with_samples`` compute the moments for you.
    """

    mean_s: np.ndarray
    """tau(b): mean service time of a batch of b, seconds."""
    energy_j: np.ndarray
    """e(b): energy of one batch of b, joules (busy power x service time)."""
    cv: np.ndarray
    """Coefficient of variation of S_b (0 = deterministic, else gamma with that CV)."""
    samples: tuple[np.ndarray, ...] | None = None
    """Optional empirical service-time samples per batch size (seconds); overrides the gamma law.
    Their mean must equal ``mean_s`` (relative 1e-6); ``cv`` is set to their CV."""
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
            cvs = np.empty(n)
            for b, s in enumerate(self.samples, start=1):
                arr = np.array(s, dtype=float)
                if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                    raise ModelError(f"empirical service samples for batch size {b} must be non-empty, finite and > 0")
                m = float(np.mean(arr))
                if abs(m - self.mean_s[b - 1]) > SAMPLE_MEAN_RTOL * m:
                    raise ModelError(
                        f"batch size {b}: mean_s {self.mean_s[b - 1]!r} s disagrees with the mean of its "
                        f"{arr.size} empirical samples, {m!r} s; the samples define the law, so give their mean "
                        f"(ServiceProfile.from_samples / with_samples do)"
                    )
                cvs[b - 1] = float(np.std(arr)) / m
                arr.setflags(write=False)
                frozen.append(arr)
            object.__setattr__(self, "samples", tuple(frozen))
            cvs.setflags(write=False)
            object.__setattr__(self, "cv", cvs)

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
        """p(b) = e(b) / tau(b): board power while serving a batch of b, watts (see the class doc)."""
        return self.energy_j / self.mean_s

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Sequence[float]],
        energy_j: Sequence[float] | None = None,
        busy_power_w: Sequence[float] | None = None,
        source: str = "",
    ) -> "ServiceProfile":
        """A profile whose law is the given samples (one array per batch size 1..B).

        Energy as ``energy_j`` (e(b) per batch) or ``busy_power_w`` (e(b) = p(b) x sample mean);
        exactly one of the two.
        """
        arrs = [np.asarray(x, dtype=float) for x in samples]
        if not arrs:
            raise ModelError("from_samples needs samples for batch size 1 at least")
        for b, a in enumerate(arrs, start=1):
            if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
                raise ModelError(f"empirical service samples for batch size {b} must be non-empty, finite and > 0")
        mean = np.array([float(np.mean(a)) for a in arrs])
        energy = _energy_from(energy_j, busy_power_w, mean)
        return cls(mean_s=mean, energy_j=energy, cv=np.zeros(mean.size), samples=tuple(arrs), source=source)

    def with_samples(self, samples: Mapping[int, Sequence[float]]) -> "ServiceProfile":
        """This profile with empirical service times: ``samples[b]`` holds measured times of batch size b.

        The samples replace mean_s and cv; the busy power p(b) of this profile is kept, so the energy
        of a batch becomes p(b) x its new mean (the class's energy convention). Sizes without
        samples get those of the nearest measured size (the smaller on a tie), scaled to a mean
        interpolated linearly between the measured sizes' sample means, and are listed in
        ``interpolated``. Sizes above max_batch are ignored.
        """
        given: dict[int, np.ndarray] = {}
        for b, x in samples.items():
            a = np.asarray(x, dtype=float)
            b = int(b)
            if b < 1:
                raise ModelError(f"samples: batch size must be >= 1, got {b}")
            if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
                raise ModelError(f"empirical service samples for batch size {b} must be non-empty, finite and > 0")
            if b <= self.max_batch:
                given[b] = a
        if 1 not in given:
            raise ModelError("samples must include batch size 1")
        sizes = np.array(sorted(given))
        means = np.array([float(np.mean(given[b])) for b in sizes])
        grid = np.arange(1, self.max_batch + 1)
        mean = np.interp(grid, sizes, means)
        out = []
        for b in grid:
            if b in given:
                out.append(given[b])
            else:
                near = int(sizes[np.argmin(np.abs(sizes - b))])
                base = given[near]
                out.append(base * (mean[b - 1] / float(np.mean(base))))
        mean = np.array([float(np.mean(a)) for a in out])
        missing = tuple(int(b) for b in grid if b not in given)
        return replace(
            self,
            mean_s=mean,
            energy_j=self.busy_power_w * mean,
            cv=np.zeros(mean.size),
            samples=tuple(out),
            interpolated=tuple(sorted(set(self.interpolated) | set(missing))),
        )

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
        energy_j: Sequence[float] | None,
        cv: Sequence[float] | float = 0.0,
        max_batch: int | None = None,
        source: str = "",
        busy_power_w: Sequence[float] | None = None,
    ) -> "ServiceProfile":
        """Build a profile from (possibly sparse) rows, interpolating the missing sizes linearly.

        Energy is given either as ``energy_j`` (e(b), joules per batch) or as ``busy_power_w``
        (p(b), watts while serving; e(b) = p(b) tau(b)): exactly one of the two, the other None.
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
        if (energy_j is None) == (busy_power_w is None):
            raise ModelError("give exactly one of batch_energy_j (energy per batch, J) and busy_power_w "
                             "(board power while serving, W) per batch size")
        e_name = "batch_energy_j" if energy_j is not None else "busy_power_w"
        e = np.asarray(energy_j if energy_j is not None else busy_power_w, dtype=float)[order]
        c = np.broadcast_to(np.asarray(cv, dtype=float), sizes.shape)[order] if np.ndim(cv) else np.full(sizes.shape, float(cv))
        for name, arr in (("mean_service_s", t), (e_name, e), ("service_cv", c)):
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
        tau = np.interp(grid, sizes, t)
        # the given quantity is interpolated; busy power becomes energy as p(b) x tau(b)
        energy = np.interp(grid, sizes, e) * (tau if busy_power_w is not None else 1.0)
        return cls(
            mean_s=tau,
            energy_j=energy,
            cv=np.interp(grid, sizes, c),
            interpolated=interpolated,
            source=source,
        )

    @classmethod
    def from_csv(
        cls, path: str | Path, max_batch: int | None = None, samples: str | Path | None = None
    ) -> "ServiceProfile":
        """Read ``batch_size,mean_service_s,batch_energy_j|busy_power_w[,service_cv]``.

        Energy per batch (``batch_energy_j``, J) or busy power (``busy_power_w``, W; e(b) = p(b) tau(b)):
        exactly one of the two columns. ``samples``: a CSV ``batch_size,service_s`` of measured
        service times, one row per batch run (see ``with_samples``; ``read_samples_csv``).
        Lines starting with ``#`` are comments (``smdp profile`` writes its metadata there).
        """
        path = Path(path)
        try:
            with path.open(newline="") as fh:
                reader = csv.DictReader(_UncommentedLines(fh))
                cols = set(reader.fieldnames or [])
                need = {"batch_size", "mean_service_s"}
                if not need <= cols:
                    raise ModelError(f"{path}: missing column(s) {sorted(need - cols)}; have {sorted(cols)}")
                energy_cols = [c for c in ("batch_energy_j", "busy_power_w") if c in cols]
                if len(energy_cols) != 1:
                    raise ModelError(
                        f"{path}: give exactly one of the columns batch_energy_j (J per batch) and busy_power_w "
                        f"(W while serving); "
                        + ("missing column(s) ['batch_energy_j'] (or busy_power_w)" if not energy_cols else "both are present")
                        + f"; have {sorted(cols)}"
                    )
                rows = list(reader)
        except OSError as exc:
            raise ModelError(f"cannot read profile {path}: {exc.strerror or exc}") from exc
        try:
            sizes = [float(r["batch_size"]) for r in rows]
            t = [float(r["mean_service_s"]) for r in rows]
            e = [float(r[energy_cols[0]]) for r in rows]
            c = [float(r.get("service_cv") or 0.0) for r in rows]
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{path}: non-numeric value: {exc}") from exc
        power = energy_cols[0] == "busy_power_w"
        prof = cls.from_table(sizes, t, None if power else e, c, max_batch=max_batch, source=str(path),
                              busy_power_w=e if power else None)
        if samples is not None:
            prof = prof.with_samples(read_samples_csv(samples))
        return prof

    @classmethod
    def affine(
        cls, max_batch: int, alpha_s: float, tau0_s: float, beta_j: float, c0_j: float, cv: float = 0.0
    ) -> "ServiceProfile":
        """tau(b) = alpha*b + tau0 and e(b) = beta*b + c0 (Inoue's fitted form)."""
        b = np.arange(1, max_batch + 1)
        return cls(mean_s=alpha_s * b + tau0_s, energy_j=beta_j * b + c0_j, cv=np.full(max_batch, float(cv)),
                   source="affine")


def _energy_from(energy_j, busy_power_w, mean_s: np.ndarray) -> np.ndarray:
    if (energy_j is None) == (busy_power_w is None):
        raise ModelError("give exactly one of energy_j (J per batch) and busy_power_w (W while serving)")
    if energy_j is not None:
        return np.asarray(energy_j, dtype=float)
    return np.asarray(busy_power_w, dtype=float) * mean_s


class _UncommentedLines:
    """The lines of a CSV file without its ``#`` comment lines (metadata such as ``# power: modelled``
    that ``smdp profile`` writes on top); ``lineno`` is the file's line number of the last line read."""

    def __init__(self, fh) -> None:
        self._fh = fh
        self.lineno = 0

    def __iter__(self) -> "_UncommentedLines":
        return self

    def __next__(self) -> str:
        while True:
            line = next(self._fh)
            self.lineno += 1
            if not line.lstrip().startswith("#"):
                return line


def read_samples_csv(path: str | Path) -> dict[int, np.ndarray]:
    """Measured service times from a CSV ``batch_size,service_s`` (one row per batch run)."""
    path = Path(path)
    out: dict[int, list[float]] = {}
    try:
        with path.open(newline="") as fh:
            lines = _UncommentedLines(fh)
            reader = csv.DictReader(lines)
            cols = set(reader.fieldnames or [])
            need = {"batch_size", "service_s"}
            if not need <= cols:
                raise ModelError(f"{path}: missing column(s) {sorted(need - cols)}; have {sorted(cols)}")
            for r in reader:
                i = lines.lineno
                try:
                    b, s = float(r["batch_size"]), float(r["service_s"])
                except (ValueError, TypeError):
                    raise ModelError(f"{path}, line {i}: non-numeric batch_size or service_s") from None
                if b != round(b) or b < 1 or not math.isfinite(s) or s <= 0:
                    raise ModelError(f"{path}, line {i}: need an integer batch_size >= 1 and service_s > 0, "
                                     f"got {r['batch_size']!r}, {r['service_s']!r}")
                out.setdefault(int(b), []).append(s)
    except OSError as exc:
        raise ModelError(f"cannot read samples {path}: {exc.strerror or exc}") from exc
    if not out:
        raise ModelError(f"{path}: no samples")
    return {b: np.asarray(v) for b, v in sorted(out.items())}


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
    weight: float = quantities.DEFAULT_WEIGHT
    """w: latency/power trade-off, seconds per watt (>= 0)."""
    arrivals: ArrivalModel = POISSON
    """How requests clump (``solver.arrival_model``): Poisson (default), compound Poisson or a
    two-phase MMPP; ``rate`` stays the mean request rate (for an MMPP it must equal its mean)."""
    instances: int = 1
    """k: identical model instances fed by one FIFO queue (Triton's central queue); each runs one batch
    at a time. The one-server solvers (``solver.smdp``) take k = 1; ``solver.instances`` any k."""
    devices: int | None = None
    """D: the accelerators the k instances run on, each drawing the idle power P0 once (1..k; None: one
    per instance, D = k). Power with m busy instances is D P0 + sum over the busy ones of (p(b) - P0):
    the baseline once per device plus each running batch's increment (for D = k: each busy instance
    p(b), each idle one P0; for k instances sharing one GPU, D = 1: P0 when all idle, p(b) with one busy)."""

    def __post_init__(self) -> None:
        if isinstance(self.instances, bool) or not isinstance(self.instances, (int, np.integer)) or self.instances < 1:
            raise ModelError(f"instances must be an integer >= 1, got {self.instances!r}")
        object.__setattr__(self, "instances", int(self.instances))
        if self.devices is not None:
            d = self.devices
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= self.instances:
                raise ModelError(f"devices must be an integer in 1..instances = {self.instances}, got {d!r}")
            object.__setattr__(self, "devices", int(d))
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, (int, np.integer)):
            raise ModelError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        if self.max_batch < 1:
            raise ModelError(f"max_batch must be >= 1, got {self.max_batch}")
        object.__setattr__(self, "max_batch", int(self.max_batch))
        rate = _finite_positive("arrival rate", self.rate)
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "weight", quantities.weight(self.weight))
        object.__setattr__(self, "idle_power_w", quantities.idle_power(self.idle_power_w))
        if not isinstance(self.arrivals, (Poisson, CompoundPoisson, MMPP2)):
            raise ModelError(f"arrivals must be Poisson, CompoundPoisson or MMPP2, got {type(self.arrivals).__name__}")
        if isinstance(self.arrivals, MMPP2) and abs(self.arrivals.mean_rate - rate) > 1e-9 * rate:
            raise ModelError(
                f"arrival rate {rate:.9g}/s differs from the mean rate of the MMPP {self.arrivals.spec}, "
                f"{self.arrivals.mean_rate:.9g}/s: give the MMPP's mean rate"
            )
        if self.profile.max_batch != self.max_batch:
            object.__setattr__(self, "profile", self.profile.truncated(self.max_batch))
        cap = self.capacity
        if rate >= cap:
            k = "" if self.instances == 1 else f"{self.instances} x "
            raise ModelError(
                f"arrival rate {rate:.6g}/s is at or above capacity {'k ' if k else ''}B/tau(B) = {k}"
                f"{self.max_batch}/{self.profile.mean_s[-1]:.6g}s = {cap:.6g}/s: no stationary policy exists"
            )

    @property
    def capacity(self) -> float:
        """k B / tau(B): the highest sustainable arrival rate of k instances, requests per second."""
        return self.instances * self.max_batch / float(self.profile.mean_s[self.max_batch - 1])

    @property
    def idle_devices(self) -> int:
        """D, resolved: ``devices``, or k when it is None (one device per instance)."""
        return self.instances if self.devices is None else self.devices

    @property
    def load(self) -> float:
        """rho = lambda / capacity."""
        return self.rate / self.capacity

    def with_(self, **changes) -> "BatchingModel":
        """A validated copy with some fields changed (rate, weight, ...)."""
        return replace(self, **changes)
