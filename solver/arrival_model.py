"""Arrival models of the SMDP: Poisson, compound Poisson (requests in groups) and an m-phase MMPP.

A model's ``rate`` (``BatchingModel.rate``) is always the mean *request* rate lambda; the arrival
model says how those requests clump:

* ``Poisson()``: one request at a time, the solver's original assumption (``poisson``).
* ``CompoundPoisson(group_mean=G)``: groups at rate lambda / G, all of a group at one instant, group
  sizes geometric on 1, 2, ... with mean G (``batch:G``); or ``CompoundPoisson.empirical(pmf)`` with
  any group-size law (for instance the one measured in a trace). ``batch:1`` is Poisson exactly.
* ``MMPP2(rates, switching)``: a hidden two-state Markov chain switches phase 1 -> 2 at rate
  ``switching[0]`` and 2 -> 1 at ``switching[1]``; requests arrive as Poisson at ``rates[i]`` in phase
  i (``mmpp:RATE1,RATE2:SWITCH12,SWITCH21``). Its mean rate is fixed by its parameters, so a model
  with an MMPP must carry that rate (``BatchingModel`` checks). Solved by ``solver.mmpp``.
  ``mmpp:RATE1,RATE2:SWITCH12,SWITCH21:GROUP1,GROUP2`` is the batch MMPP: in phase i the requests
  come in geometric groups of mean GROUP_i (``MMPP2.groups``, empirical laws as well).
  ``MMPP`` (``MMPP2`` is the same class) takes m = 2..6 phases: ``mmpp:R1,R2,R3:S12,S13,S21,S23,S31,S32``
  (the generator's off-diagonal row by row; two phases read exactly as above). A trace whose bursts
  have several levels (the Azure code trace) needs more than two.

For compound Poisson the embedded chain of the SMDP stays exact: the requests that arrive during a
batch's service, K, are a compound sum: the number of groups M given the service time S is
Poisson(lambda_g S) (mixed over the service law exactly as for Poisson arrivals), and
P(K = k) = sum_m P(M = m) P(X_1 + ... + X_m = k). Only m <= k matter (every group has >= 1
request), so a pmf on 0..kmax is exact. The geometric convolution powers are negative binomial in
closed form; empirical ones are convolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np
from scipy import stats

from solver.errors import ModelError

if TYPE_CHECKING:
    from solver.model import ServiceProfile

_PMF_FLOOR = 1e-20


def _positive(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ModelError(f"{name} must be a finite number > 0, got {value!r}")
    return v


@dataclass(frozen=True)
class Poisson:
    """Requests arrive one at a time as a Poisson process at the model's rate."""

    @property
    def spec(self) -> str:
        return "poisson"

    @property
    def group_mean(self) -> float:
        return 1.0

    @property
    def group_second_moment(self) -> float:
        return 1.0

    def to_dict(self) -> dict:
        return {"kind": "poisson", "spec": self.spec, "mean_group": 1.0, "index_of_dispersion": 1.0}


@dataclass(frozen=True)
class CompoundPoisson:
    """Groups of requests at rate lambda / E[X]; all requests of a group arrive at one instant.

    ``group_pmf`` None: geometric sizes P(X = x) = p (1 - p)^(x - 1), x >= 1, p = 1 / group_mean.
    Otherwise ``group_pmf[x]`` = P(X = x) for x = 0..len - 1 (entry 0 must be 0; it sums to 1) and
    ``group_mean`` must be its mean (``empirical`` computes it).
    """

    group_mean: float
    """G = E[X]: mean requests per group (>= 1)."""
    group_pmf: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        g = float(self.group_mean)
        if not math.isfinite(g) or g < 1.0:
            raise ModelError(f"mean group size must be a finite number >= 1, got {self.group_mean!r}")
        object.__setattr__(self, "group_mean", g)
        if self.group_pmf is not None:
            q = np.asarray(self.group_pmf, dtype=float)
            if q.ndim != 1 or q.size < 2 or not np.all(np.isfinite(q)) or np.any(q < 0):
                raise ModelError("group-size pmf must be a list of probabilities P(X = 0), P(X = 1), ...")
            if q[0] != 0.0:
                raise ModelError(f"group-size pmf: P(X = 0) must be 0 (a group has >= 1 request), got {q[0]!r}")
            if abs(q.sum() - 1.0) > 1e-9:
                raise ModelError(f"group-size pmf must sum to 1, sums to {q.sum()!r}")
            q = q / q.sum()
            mean = float(np.arange(q.size) @ q)
            if abs(mean - g) > 1e-9 * mean:
                raise ModelError(f"group_mean {g!r} disagrees with the mean of group_pmf, {mean!r}")
            object.__setattr__(self, "group_pmf", tuple(float(x) for x in q))

    @classmethod
    def empirical(cls, pmf: Sequence[float]) -> "CompoundPoisson":
        """Group sizes with P(X = x) = pmf[x] (normalised; pmf[0] must be 0)."""
        q = np.asarray(pmf, dtype=float)
        if q.ndim != 1 or q.size < 2 or not np.all(np.isfinite(q)) or np.any(q < 0) or q.sum() <= 0:
            raise ModelError("group-size pmf must be a list of probabilities P(X = 0), P(X = 1), ...")
        if q[0] != 0.0:
            raise ModelError(f"group-size pmf: P(X = 0) must be 0 (a group has >= 1 request), got {q[0]!r}")
        q = q / q.sum()
        return cls(group_mean=float(np.arange(q.size) @ q), group_pmf=tuple(float(x) for x in q))

    @property
    def geometric(self) -> bool:
        return self.group_pmf is None

    @property
    def spec(self) -> str:
        return f"batch:{self.group_mean:g}" if self.geometric else f"batch:empirical(mean {self.group_mean:g})"

    @property
    def group_second_moment(self) -> float:
        """E[X^2]."""
        if self.group_pmf is None:
            p = 1.0 / self.group_mean
            return (2.0 - p) / (p * p)
        q = np.asarray(self.group_pmf)
        x = np.arange(q.size, dtype=float)
        return float(q @ (x * x))

    def size_pmf(self, kmax: int) -> np.ndarray:
        """P(X = x), x = 0..kmax (the last entry is not a tail mass)."""
        x = np.arange(kmax + 1)
        if self.group_pmf is None:
            p = 1.0 / self.group_mean
            return np.where(x >= 1, stats.geom.pmf(x, p), 0.0)
        q = np.zeros(kmax + 1)
        src = np.asarray(self.group_pmf)[: kmax + 1]
        q[: src.size] = src
        return q

    def convolution_powers(self, mmax: int, kmax: int) -> np.ndarray:
        """C[m, k] = P(X_1 + ... + X_m = k), m = 0..mmax, k = 0..kmax."""
        out = np.zeros((mmax + 1, kmax + 1))
        out[0, 0] = 1.0
        if mmax == 0:
            return out
        k = np.arange(kmax + 1)
        if self.group_pmf is None:
            p = 1.0 / self.group_mean
            m = np.arange(1, mmax + 1)[:, None]
            # a sum of m geometric(p) on {1, 2, ...} is m + NegBin(m, p) failures
            out[1:] = np.where(k[None, :] >= m, stats.nbinom.pmf(k[None, :] - m, m, p), 0.0)
            return out
        q = self.size_pmf(kmax)
        for m in range(1, mmax + 1):
            out[m] = np.convolve(out[m - 1], q)[: kmax + 1]
        return out

    def to_dict(self) -> dict:
        return {
            "kind": "compound_poisson",
            "spec": self.spec,
            "mean_group": self.group_mean,
            "group_sizes": "geometric" if self.geometric else "empirical",
            "group_pmf": None if self.group_pmf is None else list(self.group_pmf),
            "index_of_dispersion": self.group_second_moment / self.group_mean,
        }


MAX_PHASES = 6
"""The most phases an MMPP may have (the solver's state is (n, phase): m (N + 1) unknowns)."""


@dataclass(frozen=True)
class MMPP:
    """Markov-modulated Poisson process with m >= 2 phases, optionally with requests in groups per phase.

    ``rates[i]``: requests per second in phase i (some may be 0). ``switching``: the generator's
    off-diagonal entries in row-major order, m (m - 1) of them: for two phases ``(r12, r21)``, the
    rate of leaving phase 1 for phase 2 and back; for three ``(r12, r13, r21, r23, r31, r32)``. Every
    phase must be left at a positive rate and the chain must reach every phase (irreducible).
    ``groups`` (optional, a batch MMPP): in phase i requests come in groups at rate
    ``rates[i] / groups[i].group_mean``, all of a group at one instant, sizes drawn from
    ``groups[i]`` (a ``CompoundPoisson``'s group-size law). A trace that is both clumped in instants
    and modulated in rate (the Azure code trace) needs both; None is the plain MMPP, exactly.
    Two phases keep their closed forms (stationary law, index of dispersion) exactly.
    """

    rates: tuple[float, ...]
    switching: tuple[float, ...]
    groups: tuple[CompoundPoisson, ...] | None = None

    def __post_init__(self) -> None:
        m = len(self.rates)
        if m < 2 or m > MAX_PHASES or len(self.switching) != m * (m - 1):
            raise ModelError(f"mmpp needs 2..{MAX_PHASES} rates and m (m - 1) switching rates (the generator's "
                             f"off-diagonal, row by row), got {self.rates!r}, {self.switching!r}")
        rates = []
        for i, r in enumerate(self.rates, start=1):
            r = float(r)
            if not math.isfinite(r) or r < 0:
                raise ModelError(f"mmpp rate of phase {i} must be finite and >= 0, got {r!r}")
            rates.append(r)
        if max(rates) <= 0:
            raise ModelError("mmpp: at least one phase must have a positive rate")
        if m == 2:
            sw = tuple(_positive(f"mmpp switching rate {name}", v) for name, v in zip(("1->2", "2->1"), self.switching))
        else:
            sw = tuple(float(v) for v in self.switching)
            if not all(math.isfinite(v) and v >= 0 for v in sw):
                raise ModelError(f"mmpp switching rates must be finite and >= 0, got {self.switching!r}")
        object.__setattr__(self, "rates", tuple(rates))
        object.__setattr__(self, "switching", sw)
        if m > 2:
            if min(self.leave_rates) <= 0:
                raise ModelError(f"mmpp: every phase must be left at a positive rate, got {self.switching!r}")
            if np.min(self.stationary) <= 1e-12:
                raise ModelError(f"mmpp: the phases must all be reachable from each other, got {self.switching!r}")
        if self.groups is not None:
            if len(self.groups) != m or not all(isinstance(g, CompoundPoisson) for g in self.groups):
                raise ModelError("a batch MMPP needs one group-size law (CompoundPoisson) per phase")
            if all(g.geometric and g.group_mean == 1.0 for g in self.groups):
                object.__setattr__(self, "groups", None)  # groups of one: the plain MMPP
            else:
                object.__setattr__(self, "groups", tuple(self.groups))

    @property
    def phases(self) -> int:
        return len(self.rates)

    @property
    def grouped(self) -> bool:
        return self.groups is not None

    @property
    def group_means(self) -> tuple[float, ...]:
        if self.groups is None:
            return tuple(1.0 for _ in self.rates)
        return tuple(g.group_mean for g in self.groups)

    @property
    def group_mean(self) -> float:
        """Mean requests per arrival instant in the long run (1 for the plain MMPP)."""
        if self.groups is None:
            return 1.0
        g = float(self.stationary @ np.asarray(self.epoch_rates))
        return self.mean_rate / g if g > 0 else 1.0

    @property
    def epoch_rates(self) -> tuple[float, ...]:
        """Arrival instants (groups) per second in each phase: rates[i] / G_i."""
        return tuple(r / g for r, g in zip(self.rates, self.group_means))

    @property
    def leave_rates(self) -> tuple[float, ...]:
        """The rate of leaving each phase (for two phases: ``switching`` itself)."""
        if self.phases == 2:
            return self.switching
        return tuple(float(x) for x in -np.diag(self.generator))

    def size_pmfs(self, kmax: int) -> np.ndarray:
        """[i, x]: P(X = x) in phase i, x = 0..kmax (1 at x = 1 without groups)."""
        out = np.zeros((self.phases, kmax + 1))
        for i in range(self.phases):
            if self.groups is None:
                out[i, 1] = 1.0
            else:
                out[i] = self.groups[i].size_pmf(kmax)
        return out

    def with_rates(self, rates: tuple[float, ...]) -> "MMPP":
        """The same switching and group laws at other request rates."""
        return MMPP(rates, self.switching, self.groups)

    def time_scaled(self, factor: float) -> "MMPP":
        """The same process with time running ``factor`` times faster: request and switching rates both
        times ``factor`` (the group laws as they are), so its index of dispersion per mean gap is kept."""
        f = float(factor)
        return MMPP(tuple(r * f for r in self.rates), tuple(s * f for s in self.switching), self.groups)

    def slowed(self, factor: float) -> "MMPP":
        """The same process with its phases lasting ``factor`` times as long: switching rates / ``factor``,
        request rates and group laws as they are. The stationary law, the mean rate and the clumping
        within a phase are kept; over windows longer than a phase it is burstier for ``factor`` > 1."""
        f = float(factor)
        if not math.isfinite(f) or f <= 0:
            raise ModelError(f"mmpp: a slowing factor must be finite and > 0, got {factor!r}")
        return MMPP(self.rates, tuple(s / f for s in self.switching), self.groups)

    @property
    def stationary(self) -> np.ndarray:
        """P(phase i) in the long run."""
        if self.phases == 2:
            r12, r21 = self.switching
            return np.array([r21, r12]) / (r12 + r21)
        m = self.phases
        a = np.vstack([self.generator.T, np.ones(m)])
        b = np.zeros(m + 1)
        b[-1] = 1.0
        pi = np.linalg.lstsq(a, b, rcond=None)[0]
        return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()

    @property
    def mean_rate(self) -> float:
        return float(self.stationary @ np.asarray(self.rates))

    @property
    def generator(self) -> np.ndarray:
        m = self.phases
        q = np.zeros((m, m))
        off = ~np.eye(m, dtype=bool)
        q[off] = self.switching
        q[np.diag_indices(m)] = -q.sum(axis=1)
        return q

    @property
    def spec(self) -> str:
        base = "mmpp:" + ",".join(f"{r:g}" for r in self.rates) + ":" + ",".join(f"{s:g}" for s in self.switching)
        if self.groups is None:
            return base
        if all(g.geometric for g in self.groups):
            return base + ":" + ",".join(f"{g.group_mean:g}" for g in self.groups)
        return base + ":empirical(means " + ",".join(f"{g:.4g}" for g in self.group_means) + ")"

    def _compound_index(self) -> float:
        lam = self.mean_rate
        if self.groups is None or lam <= 0:
            return 1.0
        idx = [g.group_second_moment / g.group_mean for g in self.groups]
        return float(self.stationary @ (np.asarray(self.rates) * np.asarray(idx))) / lam

    def index_of_dispersion(self, window_s: float | None = None) -> float:
        """Var N(t) / E N(t) of the counts in a window of t seconds (t = None: the limit t -> inf).

        Given the phase path the count is compound Poisson, so Var N(t) = E[Var(N | path)] +
        Var(E[N | path]): the first is t sum_i pi_i lambda_i E[X_i^2] / E[X_i] (the groups), the
        second the rate modulation, 2 int_0^t (t - u) Cov(lambda(0), lambda(u)) du with
        Cov = (pi lambda) (e^{Qu} - Pi) lambda; with Z = (Pi - Q)^{-1},
        int_0^t (t - u)(e^{Qu} - Pi) du = Z (t (I - Pi) - Z (I - e^{Qt})). Two phases: closed form.
        """
        base = self._compound_index()
        lam = self.mean_rate
        if lam <= 0:
            return base
        if self.phases == 2:
            l1, l2 = self.rates
            r12, r21 = self.switching
            s = r12 + r21
            extra = 2.0 * r12 * r21 * (l1 - l2) ** 2 / (s**3 * lam)
            if window_s is None:
                return base + extra
            t = float(window_s)
            return base + extra * (1.0 - (1.0 - math.exp(-s * t)) / (s * t))
        from scipy import linalg

        m = self.phases
        pi = self.stationary
        r = np.asarray(self.rates)
        q = self.generator
        big_pi = np.outer(np.ones(m), pi)
        z = np.linalg.inv(big_pi - q)
        if window_s is None:  # the limit: 2 (pi lambda) Z (I - Pi) lambda / lam
            return base + 2.0 * float((pi * r) @ z @ (np.eye(m) - big_pi) @ r) / lam
        t = float(window_s)
        inner = z @ (t * (np.eye(m) - big_pi) - z @ (np.eye(m) - linalg.expm(q * t)))
        return base + 2.0 * float((pi * r) @ inner @ r) / (lam * t)

    def to_dict(self) -> dict:
        return {
            "kind": "mmpp",
            "spec": self.spec,
            "phases": self.phases,
            "rates": list(self.rates),
            "switching": list(self.switching),
            "stationary": [float(x) for x in self.stationary],
            "mean_rate": self.mean_rate,
            "index_of_dispersion": self.index_of_dispersion(),
            "groups": None if self.groups is None else [g.to_dict() for g in self.groups],
        }


MMPP2 = MMPP
"""The name the two-phase code and its callers use: the same class (any number of phases)."""


ArrivalModel = Union[Poisson, CompoundPoisson, MMPP]
POISSON = Poisson()


def parse_arrivals(spec: str) -> ArrivalModel:
    """``poisson`` | ``batch:MEAN_GROUP`` | ``mmpp:RATE1,RATE2:SWITCH12,SWITCH21``."""
    text = str(spec).strip()
    head, _, rest = text.partition(":")
    head = head.strip().lower()
    if head == "poisson" and not rest:
        return POISSON
    if head == "batch":
        try:
            g = float(rest)
        except ValueError:
            raise ModelError(f"--arrivals batch:MEAN_GROUP needs a number >= 1, got {text!r}") from None
        return POISSON if g == 1.0 else CompoundPoisson(group_mean=g)
    if head == "mmpp":
        parts = rest.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            rates = [float(x) for x in parts[0].split(",")]
            m = len(rates)
            sw = [float(x) for x in parts[1].split(",")]
            gs = [float(x) for x in parts[2].split(",")] if len(parts) == 3 else [1.0] * m
            if m < 2 or len(sw) != m * (m - 1) or len(gs) != m:
                raise ValueError
        except ValueError:
            raise ModelError(f"--arrivals mmpp:RATE1,...,RATEm:SWITCHES[:GROUP1,...,GROUPm] needs m >= 2 rates, "
                             f"m (m - 1) switching rates (the generator's off-diagonal row by row: S12,S21 for "
                             f"two phases) and optionally m group means, got {text!r}") from None
        groups = None if all(g == 1.0 for g in gs) else tuple(CompoundPoisson(g) for g in gs)
        return MMPP(rates=tuple(rates), switching=tuple(sw), groups=groups)
    raise ModelError("arrival model must be poisson, batch:MEAN_GROUP or mmpp:RATE1,RATE2:SWITCH12,SWITCH21"
                     f"[:GROUP1,GROUP2]; got {text!r}")


def arrivals_option(model: ArrivalModel) -> str:
    """A spec ``parse_arrivals`` reads back for ``model``: empirical group laws become geometric ones of
    the same means (what ``smdp fit-arrivals`` offers as the ``--arrivals`` option)."""
    if isinstance(model, CompoundPoisson):
        return "poisson" if model.group_mean == 1.0 else f"batch:{model.group_mean:.6g}"
    if isinstance(model, MMPP):
        parts = (model.rates, model.switching) + ((model.group_means,) if model.grouped else ())
        return "mmpp:" + ":".join(",".join(f"{x:.6g}" for x in xs) for xs in parts)
    return model.spec


def group_rate(arrivals: ArrivalModel, rate: float) -> float:
    """Arrival epochs per second: lambda for Poisson, lambda / G for groups."""
    if isinstance(arrivals, CompoundPoisson):
        return rate / arrivals.group_mean
    return rate


def count_moments(arrivals: Poisson | CompoundPoisson, rate: float, m1: np.ndarray, m2: np.ndarray):
    """E[K_b] and E[K_b^2] for the requests K_b that arrive during a service S_b with moments m1, m2.

    K = X_1 + ... + X_M, M | S ~ Poisson(lambda_g S): E K = lambda E S and
    Var K = lambda_g E[S] E[X^2] + lambda^2 Var S.
    """
    mean_k = rate * m1
    if isinstance(arrivals, Poisson):
        return mean_k, rate * m1 + rate * rate * m2
    lam_g = rate / arrivals.group_mean
    return mean_k, lam_g * m1 * arrivals.group_second_moment + rate * rate * m2


def count_pmf_matrix(profile: ServiceProfile, arrivals: Poisson | CompoundPoisson, rate: float, kmax: int,
                     poisson_matrix: Callable[[ServiceProfile, float, int], np.ndarray]) -> np.ndarray:
    """P(K_b = k) for b = 1..B (rows), k = 0..kmax (columns), exact on that range.

    ``poisson_matrix(profile, rate, kmax)`` is the Poisson-arrival law (``solver.tail``); for groups it
    gives the law of the number of groups M at the group rate, which is then compounded.
    """
    if isinstance(arrivals, Poisson):
        return poisson_matrix(profile, rate, kmax)
    lam_g = rate / arrivals.group_mean
    groups = poisson_matrix(profile, lam_g, kmax)
    alive = np.nonzero(groups.max(axis=0) > _PMF_FLOOR)[0]
    mmax = int(alive[-1]) if alive.size else 0
    powers = arrivals.convolution_powers(mmax, kmax)
    return np.clip(groups[:, : mmax + 1] @ powers, 0.0, 1.0)


def jump_tail(arrivals: CompoundPoisson, n: np.ndarray, truncation: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a wait at each n: P(n + X > N), E[(n + X - N)^+] and E[((n + X - N)^+)^2] (exact)."""
    N = truncation
    q = arrivals.size_pmf(N)
    x = np.arange(N + 1, dtype=float)
    c0 = np.cumsum(q)
    c1 = np.cumsum(q * x)
    c2 = np.cumsum(q * x * x)
    t = np.clip(N - n, 0, N)  # jumps x <= t stay in 0..N
    p_out = np.clip(1.0 - c0[t], 0.0, None)
    e1 = np.clip(arrivals.group_mean - c1[t], 0.0, None)
    e2 = np.clip(arrivals.group_second_moment - c2[t], 0.0, None)
    r = (n - N).astype(float)
    em = np.clip(e1 + r * p_out, 0.0, None)
    em2 = np.clip(e2 + 2.0 * r * e1 + r * r * p_out, 0.0, None)
    return p_out, em, em2


def jump_pmf(arrivals: CompoundPoisson, truncation: int) -> np.ndarray:
    """P(X = x), x = 0..L with L <= N the last size above the 1e-20 floor (for the wait rows)."""
    q = arrivals.size_pmf(truncation)
    alive = np.nonzero(q > _PMF_FLOOR)[0]
    return np.ascontiguousarray(q[: int(alive[-1]) + 1])
