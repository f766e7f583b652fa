"""Tail-latency SLOs: the response-time distribution of a batching policy, and the least-J policy
whose q-quantile of response time stays within D.

Two ways to get the distribution, used where each is right:

* ``exact_response_cdf`` / ``exact_quantile`` -- exact for a queue-length table *without* guard under
  Poisson arrivals and deterministic or gamma service. A tagged-request Markov chain on the embedded
  chain: the tagged request arrives (PASTA) to the time-stationary state -- idle with n waiting, or
  a batch of a in service started at n, its elapsed and residual parts of the length-biased service
  time giving the arrivals before it and the wait until the next epoch -- and from then on its state
  at each decision epoch is (N, p): N requests wait, it is p-th in FIFO order. Serving a >= p ends
  its response after S_a; serving a < p moves it to (N - a + K_a, p - a) after S_a; waiting moves it
  to (N + 1, p) after an Exp(lambda) time. p never grows, so the Laplace transform of the remaining
  time, phi(N, p; s), is solved row by row in p (one backward sweep along N for the waits), and the
  CDF comes from Euler inversion (Abate & Whitt). Exact up to the truncation of N (the lumped mass is
  reported) and the inversion's error (about 1e-7 where the CDF is smooth, larger next to the kinks
  that deterministic service makes). Its cost grows as N^2 x K-window x transform points, about
  seconds at B = 64 and more at B = 128, and it knows nothing of the guard: it is the reference the
  simulator is checked against (tests; at B = 1 it is the M/D/1 waiting-time law), not the search's
  workhorse.
* ``simulated_quantile`` -- the simulator (``solver.simulate``), for any rule and in particular a
  table *with* the max-wait guard, whose age-dependent decisions leave the queue-length chain.
  The q-quantile is the empirical one; its 95% confidence interval comes from sectioning (quantiles
  of consecutive blocks of requests, a t interval on their mean), which respects the correlation
  between neighbouring requests.

``solve_slo`` searches the family (a(n) solved for weight w', optionally guarded by g) for the least
J = W + w P at the model's own w among the candidates whose *upper* 95% bound of the q-quantile is
<= D. Every candidate runs on one arrival sequence and one set of service-time streams (common random
numbers), so the comparisons between candidates are not blurred by independent noise, and every
candidate -- guarded or not -- is judged by the same yardstick. The simulator is used in the search
because the guard needs it and because it costs O(requests) per candidate (tens of ms), which keeps
an SLO solve at B = 128 within a second; ``method="exact"`` judges the unguarded candidates by the
exact chain instead (slower; for cross-checks). When no candidate meets D, the result is greedy
(serve min(n, B) at once, the least-latency rule) with ``feasible = False``: never a silent violation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
from scipy import special, stats

from solver import arrivals as arrival_streams
from solver.arrival_model import MMPP, POISSON, Poisson
from solver.model import BatchingModel, ModelError
from solver.policy import BatchRule, MaxWaitGuard, PolicyTable, greedy
from solver.simulate import SimResult, simulate_latencies
from solver.smdp import solve
from solver.tail import arrival_pmf_matrix, initial_truncation

QuantileMethod = Literal["exact", "simulation"]
SearchMethod = Literal["simulation", "exact"]

_EULER_M = 12
"""Euler inversion order: 2M + 1 transform evaluations per time point, about 0.6 M significant digits
for smooth functions in double precision."""
_SECTIONS = 20
"""Blocks for the sectioning CI of a simulated quantile."""
_TAIL_SAMPLES = 400
"""Simulated requests beyond the q-quantile the search asks for (sets its run length)."""
_GUARD_FIRST = 0.5
"""The first guard tried for a table, as a fraction of D (the guard caps the oldest request's wait, so
it lives below D)."""
_GUARD_MIN = 0.05
"""The tightest guard tried, as a fraction of D: when it misses D, no guard helps that table."""
_GUARD_TOL = 1.0 / 80.0
"""The guard search stops when the largest feasible and the smallest infeasible guard are this close
(a fraction of D)."""
_GUARD_STEPS = 5
"""Guarded candidates simulated per table, at most."""
_MMPP_PATH_FACTOR = 5
"""An MMPP's path is this many times longer than a Poisson one: its slow phases come and go over many
requests, and 40,000 requests of the code trace's four-phase fit gave W from 131 to 153 ms and a p99
from 450 to 518 ms over three seeds (200,000: 139-149 and 488-554 ms; the exact W is 145 ms)."""
_WEIGHT_STEPS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.0)
"""Weights tried, as fractions of the model's weight: from its own (least J) towards 0 (least latency)."""


@dataclass(frozen=True)
class SloTarget:
    """A latency SLO: the ``quantile`` q of response time must be <= ``latency_s`` D.

    ``margin_s`` is the part of D reserved for latency the model does not see (the client's own
    threads, its network hop to the gate): the policy is searched for ``budget_s`` = D - margin.
    """

    quantile: float
    latency_s: float
    margin_s: float = 0.0

    def __post_init__(self) -> None:
        q, d, m = self.quantile, self.latency_s, self.margin_s
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0.0 < q < 1.0:
            raise ModelError(f"SLO quantile must be a number strictly between 0 and 1, got {q!r}")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0.0:
            raise ModelError(f"SLO latency must be a finite number of seconds > 0, got {d!r}")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or not 0.0 <= m < d:
            raise ModelError(f"SLO margin must be a finite number of seconds >= 0 and below the latency {d!r}, "
                             f"got {m!r}")
        object.__setattr__(self, "quantile", float(q))
        object.__setattr__(self, "latency_s", float(d))
        object.__setattr__(self, "margin_s", float(m))

    @property
    def budget_s(self) -> float:
        """What the policy's predicted q-quantile must stay within: D - margin."""
        return self.latency_s - self.margin_s


# ----------------------------------------------------------------------------------------------
# Exact: the tagged-request chain
# ----------------------------------------------------------------------------------------------


def _euler_terms(m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nodes beta_k and weights eta_k of the Euler algorithm: f(t) ~ 10^(m/3)/t sum eta_k Re F(beta_k/t)."""
    m = _EULER_M if m is None else m
    k = np.arange(2 * m + 1)
    beta = m * math.log(10.0) / 3.0 + 1j * math.pi * k
    xi = np.ones(2 * m + 1)
    xi[0] = 0.5
    xi[2 * m] = 2.0 ** -m
    for j in range(1, m):
        xi[2 * m - j] = xi[2 * m - j + 1] + 2.0 ** -m * special.comb(m, j)
    eta = (10.0 ** (m / 3.0)) * ((-1.0) ** k) * xi
    return beta, eta


@dataclass(frozen=True)
class _ServiceLaw:
    """Per batch size: E[e^{-sS} 1{K = k}] and E[e^{-sS}], K the Poisson(lambda) arrivals during S."""

    model: BatchingModel
    window: int

    def joint(self, a: int, s: np.ndarray) -> np.ndarray:
        """(window + 1, len(s)): E[e^{-s S_a}; K_a = k]."""
        lam = self.model.rate
        tau = float(self.model.profile.mean_s[a - 1])
        cv = float(self.model.profile.cv[a - 1])
        k = np.arange(self.window + 1)[:, None]
        if cv == 0.0:
            return np.exp(-s[None, :] * tau) * stats.poisson.pmf(k, lam * tau)
        shape = 1.0 / (cv * cv)
        theta = tau * cv * cv
        z = 1.0 + theta * (s[None, :] + lam)
        logc = special.gammaln(k + shape) - special.gammaln(k + 1.0) - special.gammaln(shape)
        return np.exp(logc - shape * np.log(z) + k * np.log(lam * theta / z))

    def transform(self, a: int, s: np.ndarray) -> np.ndarray:
        tau = float(self.model.profile.mean_s[a - 1])
        cv = float(self.model.profile.cv[a - 1])
        if cv == 0.0:
            return np.exp(-s * tau)
        shape = 1.0 / (cv * cv)
        return (1.0 + tau * cv * cv * s) ** -shape

    def residual_nodes(self, a: int, nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(elapsed u, residual r, weight) of the service in progress seen by a Poisson arrival:
        length-biased S, split uniformly; Gauss-Legendre in the split, generalised Gauss-Laguerre in S."""
        x, wx = special.roots_legendre(nodes)
        v = 0.5 * (x + 1.0)
        wv = 0.5 * wx
        tau = float(self.model.profile.mean_s[a - 1])
        cv = float(self.model.profile.cv[a - 1])
        if cv == 0.0:
            sizes, ws = np.array([tau]), np.array([1.0])
        else:
            shape = 1.0 / (cv * cv)
            theta = tau * cv * cv
            y, wy = special.roots_genlaguerre(max(8, nodes // 2), shape)  # weight y^shape e^-y: length-biased gamma
            sizes, ws = theta * y, wy / wy.sum()
        big_s = np.repeat(sizes, v.size)
        frac = np.tile(v, sizes.size)
        w = np.repeat(ws, v.size) * np.tile(wv, sizes.size)
        return big_s * (1.0 - frac), big_s * frac, w


@dataclass(frozen=True)
class ResponseChain:
    """The tagged-request chain of one unguarded table under one model (see the module doc)."""

    model: BatchingModel
    policy: PolicyTable
    truncation: int
    actions: np.ndarray
    arrival_weights: np.ndarray
    """Time-stationary probability of each state n: idle (a(n) = 0) or a batch started at n in service."""
    lumped_mass: float
    """Stationary probability per epoch of a landing above the truncation (moved to N)."""
    law: _ServiceLaw


def response_chain(model: BatchingModel, policy: PolicyTable, truncation: int | None = None) -> ResponseChain:
    """Build the embedded chain of ``policy`` on 0..N and its time-stationary distribution."""
    if model.profile.samples is not None:
        raise ModelError("the exact response-time chain needs deterministic or gamma service; "
                         "use simulated_quantile for an empirical service law")
    if not isinstance(model.arrivals, Poisson):
        raise ModelError("the exact response-time chain assumes Poisson arrivals (PASTA); "
                         f"use simulated_quantile for {type(model.arrivals).__name__} arrivals")
    if policy.max_batch != model.max_batch:
        raise ModelError(f"policy is for max_batch {policy.max_batch}, the model has B = {model.max_batch}")
    B = model.max_batch
    base = max(initial_truncation(model), policy.truncation + 1, B + 1)
    N = int(truncation) if truncation is not None else int(base + B)
    if N <= policy.truncation:
        raise ModelError(f"truncation {N} must exceed the policy table's last state {policy.truncation}")
    acts = policy.extended(N + 1)
    lam = model.rate
    tau_max = float(model.profile.mean_s[-1])
    cv_max = float(np.max(model.profile.cv))
    mean_k = lam * tau_max
    sd_k = math.sqrt(mean_k + (mean_k * cv_max) ** 2)
    window = int(min(N, math.ceil(mean_k + 12.0 * sd_k + 10)))
    pmf = arrival_pmf_matrix(model.profile, lam, window)
    P = np.zeros((N + 1, N + 1))
    lumped = np.zeros(N + 1)
    for n in range(N + 1):
        a = int(acts[n])
        if a == 0:
            P[n, min(n + 1, N)] = 1.0
            continue
        lo = n - a
        hi = min(N, lo + window)
        P[n, lo:hi + 1] = pmf[a - 1, : hi - lo + 1]
        spill = 1.0 - P[n].sum()
        P[n, N] += spill
        lumped[n] = spill
    # stationary pi of the embedded chain: pi (P - I) = 0, sum pi = 1
    A = (P - np.eye(N + 1)).T
    A[-1, :] = 1.0
    rhs = np.zeros(N + 1)
    rhs[-1] = 1.0
    pi = np.linalg.solve(A, rhs)
    pi = np.clip(pi, 0.0, None)
    pi /= pi.sum()
    sojourn = np.where(acts == 0, 1.0 / lam, model.profile.mean_s[np.maximum(acts, 1) - 1])
    weights = pi * sojourn
    weights /= weights.sum()
    return ResponseChain(model, policy, N, acts, weights, float(pi @ lumped), _ServiceLaw(model, window))


def _atoms(chain: ResponseChain) -> list[tuple[int, int, float, float]]:
    """(m, n, time, mass): a request that arrives while the server idles with n waiting and is served
    at once in a batch of deterministic length has the response time tau(a) exactly. These atoms are
    kept out of the transform and added to the CDF as steps: a jump defeats numerical inversion."""
    acts = chain.actions
    out = []
    for n in np.nonzero((acts == 0) & (chain.arrival_weights > 0))[0]:
        m = min(int(n) + 1, chain.truncation)
        a = int(acts[m])
        if a >= m and chain.model.profile.cv[a - 1] == 0.0:
            out.append((m, int(n), float(chain.model.profile.mean_s[a - 1]), float(chain.arrival_weights[n])))
    return out


def _response_transform(chain: ResponseChain, s: np.ndarray, nodes: int = 16) -> np.ndarray:
    """E[e^{-s T}; T not an atom] of the tagged request's response time T at each s (Re s > 0)."""
    atoms_from = {(m, n) for m, n, _, _ in _atoms(chain)}
    model = chain.model
    N = chain.truncation
    L = chain.law.window
    acts = chain.actions
    lam = model.rate
    S = s.size
    used = sorted({int(a) for a in acts if a > 0})
    joint = {a: chain.law.joint(a, s) for a in used}  # (L+1, S)
    lst = {a: chain.law.transform(a, s) for a in used}
    wait = lam / (lam + s)
    # phi[p, N]: transform of the remaining time of the p-th waiting request at an epoch with N waiting
    phi = np.zeros((N + 2, N + 1, S), dtype=complex)
    k = np.arange(L + 1)
    n_all = np.arange(N + 1)
    for p in range(1, N + 1):
        row = phi[p]
        ns = n_all[p:]
        a_n = acts[p:]
        done = a_n >= p
        for a in {int(x) for x in a_n[done]}:
            row[ns[done & (a_n == a)]] = lst[a]
        part = (a_n > 0) & (a_n < p)
        if np.any(part):
            for a in {int(x) for x in a_n[part]}:
                sel = ns[part & (a_n == a)]
                dest = np.minimum(sel[:, None] - a + k[None, :], N)  # (m, L+1)
                src = phi[p - a][dest]  # (m, L+1, S)
                row[sel] = np.einsum("mks,ks->ms", src, joint[a])
        waits = ns[a_n == 0]
        for n in waits[::-1]:
            row[n] = wait * (row[n + 1] if n < N else row[n])
    # The tagged request's arrival, weighted by the time-stationary state it sees.
    total = np.zeros(S, dtype=complex)
    w = chain.arrival_weights
    for n in np.nonzero((acts == 0) & (w > 0))[0]:
        m = min(n + 1, N)
        if (m, n) in atoms_from:
            continue  # served at once with deterministic service: an atom, inverted apart
        total += w[n] * phi[m, m]
    p_idx = np.minimum(n_all + 1, N)
    for a in used:
        starts = np.nonzero((acts == a) & (w > 0))[0]
        if starts.size == 0:
            continue
        u, r, wq = chain.law.residual_nodes(a, nodes)
        for ui, ri, wi in zip(u, r, wq):
            # H[m]: the tagged request is (m+1)-th, the batch ends after ri with K more arrivals
            pk = stats.poisson.pmf(k, lam * ri)
            land = np.minimum(p_idx[:, None] + k[None, :], N)  # (N+1, L+1) landing N'
            vals = phi[p_idx[:, None], land]  # (N+1, L+1, S)
            H = np.einsum("mks,k->ms", vals, pk) * np.exp(-s * ri)[None, :]
            pj = stats.poisson.pmf(k, lam * ui)
            m_idx = np.minimum(starts[:, None] - a + k[None, :], N)  # (starts, L+1)
            total += wi * np.einsum("nj,njs->s", w[starts][:, None] * pj[None, :], H[m_idx])
    return total


def exact_response_cdf(model: BatchingModel, policy: PolicyTable, times: np.ndarray | list[float], *,
                       truncation: int | None = None) -> np.ndarray:
    """P(T <= t) of a request's response time T (queueing + service) under an unguarded table.

    Exact up to the chain's truncation and the inversion error (module doc). ``times`` > 0 seconds.
    """
    chain = response_chain(model, policy, truncation)
    return _cdf(chain, np.asarray(times, dtype=float))


def _cdf(chain: ResponseChain, times: np.ndarray) -> np.ndarray:
    if times.ndim != 1 or np.any(~np.isfinite(times)) or np.any(times <= 0):
        raise ModelError("times must be a 1-d array of finite values > 0 seconds")
    beta, eta = _euler_terms()
    atoms = _atoms(chain)
    mass = sum(m for _, _, _, m in atoms)
    out = np.empty(times.size)
    chunk = max(1, 96 // beta.size)
    for i in range(0, times.size, chunk):
        t = times[i : i + chunk]
        s = (beta[None, :] / t[:, None]).ravel()
        f = _response_transform(chain, s)
        # the continuous part's complementary CDF, mass (1 - atoms) - P(T <= t, continuous), has
        # transform ((1 - atoms) - E[e^{-sT}; continuous]) / s
        tail = ((1.0 - mass - f) / s).reshape(t.size, beta.size)
        out[i : i + chunk] = (1.0 - mass) - (tail @ eta).real / t
    for _, _, at, m in atoms:
        out += m * (times >= at)
    return np.clip(out, 0.0, 1.0)


def exact_quantile(model: BatchingModel, policy: PolicyTable, q: float, *, truncation: int | None = None,
                   rtol: float = 1e-4) -> float:
    """The q-quantile of response time under an unguarded table, from the exact chain (bisection)."""
    SloTarget(q, 1.0)  # validates q
    return _quantile(response_chain(model, policy, truncation), q, rtol)


def _quantile(chain: ResponseChain, q: float, rtol: float = 1e-4) -> float:
    lo = float(chain.model.profile.mean_s[0]) * 0.999  # nobody finishes before the fastest batch
    hi = lo
    while True:
        hi *= 2.0
        if _cdf(chain, np.array([hi]))[0] >= q:
            break
        lo = hi
        if hi > 1e6:
            raise ModelError("response-time quantile beyond 1e6 s: is the policy stable?")
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if _cdf(chain, np.array([mid]))[0] >= q:
            hi = mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------------------------
# Simulated: any rule, guard included
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantileEstimate:
    """A q-quantile of response time with its 95% CI half-width and the share of requests within D."""

    quantile_s: float
    ci95_s: float
    """0 for the exact chain; sectioning half-width for the simulator."""
    attainment: float
    """P(T <= D - margin) (exact) or the share of simulated requests within D - margin (the budget)."""
    method: QuantileMethod

    @property
    def upper_s(self) -> float:
        return self.quantile_s + self.ci95_s


def sectioned_quantile(latencies: np.ndarray, q: float, sections: int = _SECTIONS) -> tuple[float, float]:
    """(q-quantile of all values, 95% CI half-width by sectioning over consecutive blocks).

    With too few values per block to hold a tail sample the half-width is NaN rather than a falsely
    tight number.
    """
    lat = np.asarray(latencies, dtype=float)
    point = float(np.quantile(lat, q))
    size = lat.size // sections
    if size * (1.0 - q) < 5.0:
        return point, math.nan
    blocks = np.quantile(lat[: size * sections].reshape(sections, size), q, axis=1)
    half = float(stats.t.ppf(0.975, sections - 1) * blocks.std(ddof=1) / math.sqrt(sections))
    return point, half


def simulated_quantile(model: BatchingModel, rule: BatchRule, target: SloTarget, arrivals: np.ndarray, *,
                       seed: int = 0, warmup: float = 0.0) -> tuple[QuantileEstimate, SimResult]:
    """The q-quantile of ``rule``'s response time (with a sectioning CI) and the share within the SLO's
    budget D - margin, on
    the given arrival times; the simulation's other figures come with it."""
    sim, lat = simulate_latencies(model.profile, rule, arrivals, idle_power_w=model.idle_power_w,
                                  weight=model.weight, seed=seed, warmup=warmup)
    point, half = sectioned_quantile(lat, target.quantile)
    return QuantileEstimate(point, half, float(np.mean(lat <= target.budget_s)), "simulation"), sim


# ----------------------------------------------------------------------------------------------
# The SLO search
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SloCandidate:
    """One member of the family: the table solved for ``table_weight``, guarded by ``max_wait_s``."""

    table_weight: float
    """w' the table a(n) was solved for (None-like 'greedy' is table_weight = nan)."""
    max_wait_s: float | None
    policy: PolicyTable
    estimate: QuantileEstimate
    mean_latency_s: float
    mean_power_w: float
    cost: float
    """J = W + w P at the model's weight w."""
    feasible: bool
    """The upper 95% bound of the q-quantile (the point value for the exact chain) is <= D - margin."""
    mean_batch: float = math.nan
    """Requests per batch (the simulation's, or the exact evaluation's for an exact candidate)."""

    @property
    def rule(self) -> BatchRule:
        return self.policy if self.max_wait_s is None else MaxWaitGuard(self.policy, self.max_wait_s)


@dataclass(frozen=True, eq=False)
class SloResult:
    """The least-J SLO policy, or greedy flagged infeasible, and every candidate judged on the way."""

    model: BatchingModel
    target: SloTarget
    chosen: SloCandidate
    feasible: bool
    """False: no candidate met D; ``chosen`` is greedy (the least-latency rule), not compliant."""
    candidates: tuple[SloCandidate, ...]
    method: SearchMethod
    requests: int
    """Simulated requests per candidate (common random numbers: one arrival sequence for all)."""
    solve_time_s: float

    @property
    def policy(self) -> PolicyTable:
        return self.chosen.policy

    @property
    def max_wait_s(self) -> float | None:
        return self.chosen.max_wait_s

    def to_dict(self) -> dict:
        c = self.chosen

        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return {
            "policy": [int(x) for x in c.policy.actions],
            "max_wait_s": num(c.max_wait_s),
            "mean_latency_s": num(c.mean_latency_s),
            "mean_power_w": num(c.mean_power_w),
            "gain": num(c.cost),
            "predicted_quantile_s": num(c.estimate.quantile_s),
            "predicted_quantile_ci95_s": num(c.estimate.ci95_s),
            "predicted_attainment": num(c.estimate.attainment),
            "quantile_method": c.estimate.method,
            "slo_quantile": self.target.quantile,
            "slo_latency_s": self.target.latency_s,
            "slo_margin_s": self.target.margin_s,
            "slo_feasible": bool(self.feasible),
            "table_weight": num(c.table_weight),
            "rate": self.model.rate,
            "weight": self.model.weight,
            "max_batch": self.model.max_batch,
            "idle_power_w": self.model.idle_power_w,
            "capacity_rps": self.model.capacity,
            "load": self.model.load,
            "search_method": self.method,
            "requests": self.requests,
            "candidates": len(self.candidates),
            "solve_time_s": float(self.solve_time_s),
        }


def _requests_for(q: float) -> int:
    return int(min(2_000_000, max(20_000, math.ceil(_TAIL_SAMPLES * _SECTIONS / 20 / (1.0 - q)))))


def search_path(model: BatchingModel, quantile: float, *, requests: int | None = None,
                seed: int = 0) -> tuple[np.ndarray, float]:
    """The arrival times every candidate of ``solve_slo`` is judged on, and the warm-up left out of the
    figures: a path of ``model.arrivals`` at ``model.rate``, long enough for the q-quantile's tail (five
    times longer under an MMPP), or ``requests`` long."""
    n_req = (_requests_for(quantile) * (_MMPP_PATH_FACTOR if isinstance(model.arrivals, MMPP) else 1)
             if requests is None else int(requests))
    if n_req < 1000:
        raise ModelError(f"requests must be >= 1000, got {requests!r}")
    arr = arrival_streams.from_model(model.arrivals, model.rate, n_req, rng=np.random.default_rng([seed, 12]))
    return arr, float(arr[min(arr.size - 1, max(100, n_req // 50))])


def solve_slo(model: BatchingModel, target: SloTarget, *, method: SearchMethod = "simulation",
              requests: int | None = None, seed: int = 0,
              weights: tuple[float, ...] | None = None) -> SloResult:
    """The least-J policy of the family whose predicted q-quantile of response time is <= D - margin
    (``target.budget_s``; "D" below).

    Family: a(n) solved for w' in ``weights`` (default: the model's w times 1, 0.3, 0.1, ..., 0),
    each alone and with a max-wait guard g. J is always the model's own J = W + w P. For each table
    the search tries it unguarded, then the largest guard that meets D (``_guard_search``: a smaller
    guard only cuts waits, so it lowers the tail and, for the tables at or below w, raises J).
    Tables further below w cost more J unguarded, so the descent stops at the first unguarded table
    that meets D, or at the first table whose best feasible candidate costs no less than the best
    above it (J of the guarded tables, as a function of w', falls to one minimum and rises after it).
    A table equal to one judged before (two weights, one policy) is not judged again,
    and once even the tightest guard (``_GUARD_MIN`` of D) missed D, the tables below are judged
    unguarded only: the tightest guard makes every table nearly greedy, so it would miss again.
    Figures are from the simulator on common random numbers (module doc); ``method="exact"`` judges
    unguarded tables by the exact chain. Infeasible: greedy, ``feasible = False``.

    Under an MMPP (``model.arrivals``: a fitted modulation) the tables a(n) are solved for Poisson
    arrivals at the MMPP's mean rate (the queue-length tables a phase-blind gate runs; the phase-blind
    search under several phases takes up to a minute at B = 128, too long for a ladder of weights), and
    every candidate is judged -- J and the q-quantile -- on a path simulated from the MMPP itself: the
    modulation's long waits in a slow phase are what sets the guard.
    """
    started = time.perf_counter()
    if not isinstance(target, SloTarget):
        raise ModelError(f"target must be an SloTarget, got {type(target).__name__}")
    if method not in ("simulation", "exact"):
        raise ModelError(f"method must be 'simulation' or 'exact', got {method!r}")
    if method == "exact" and not isinstance(model.arrivals, Poisson):
        raise ModelError("method 'exact' assumes Poisson arrivals; the simulated search takes any arrival model")
    w = model.weight
    if weights is None:
        ladder = sorted({w * f for f in _WEIGHT_STEPS}, reverse=True)
    else:
        ladder = sorted({float(x) for x in weights}, reverse=True)
        for x in ladder:
            if not math.isfinite(x) or x < 0:
                raise ModelError(f"candidate weights must be finite and >= 0, got {x!r}")
    arr, warmup = search_path(model, target.quantile, requests=requests, seed=seed)
    n_req = int(arr.size)

    def judge(weight: float, table: PolicyTable, guard: float | None, exact: tuple[float, float, float] | None
              ) -> SloCandidate:
        """Simulate one candidate on the shared arrivals; ``exact``: (W, P, mean batch) of an unguarded table."""
        rule: BatchRule = table if guard is None else MaxWaitGuard(table, guard)
        est, sim = simulated_quantile(model, rule, target, arr, seed=seed, warmup=warmup)
        lat_s, pow_w, batch = sim.mean_latency_s, sim.mean_power_w, sim.mean_batch
        if exact is not None:  # unguarded and asked for: the chain's quantile and the exact W, P
            quant, att = _exact_pair(model, table, target)
            est = QuantileEstimate(quant, 0.0, att, "exact")
            lat_s, pow_w, batch = exact
        ok = math.isfinite(est.upper_s) and est.upper_s <= target.budget_s
        return SloCandidate(weight, guard, table, est, lat_s, pow_w, lat_s + w * pow_w, ok, batch)

    candidates: list[SloCandidate] = []
    tables: list[PolicyTable] = []
    guards_help = True

    # the tables' model: an MMPP needs the phase in the state, the family's tables are phase-blind
    tabled = model.with_(arrivals=POISSON) if isinstance(model.arrivals, MMPP) else model

    def table(wp: float) -> bool:
        """Judge the table for w' (unguarded, then guarded); True when it meets D unguarded."""
        nonlocal guards_help
        res = solve(tabled.with_(weight=wp), warm_start=tables[-1] if tables else None)
        if any(_same_table(res.policy, t) for t in tables):
            return False  # the same table as another weight's: judged already
        tables.append(res.policy)
        exact = (res.mean_latency_s, res.mean_power_w, res.mean_batch) if method == "exact" else None
        plain = judge(wp, res.policy, None, exact)
        candidates.append(plain)
        if plain.feasible:
            return True
        if guards_help:
            # the guard found for the table above is where this one's search starts
            above = [c.max_wait_s for c in candidates if c.feasible and c.max_wait_s is not None]
            tried, guards_help = _guard_search(lambda g: judge(wp, res.policy, g, None), target.budget_s,
                                               above[-1] if above else None)
            candidates.extend(tried)
        return False

    # the top (least J unguarded), then -- when neither it nor its guards meet D -- the bottom (least
    # latency): when that misses too, the tables between are not judged (the tail shrinks towards
    # w' = 0 as the tables wait less); otherwise the descent goes on from the top
    if not table(ladder[0]) and len(ladder) > 1:
        middle = ladder[1:]
        if not any(c.feasible for c in candidates):
            table(ladder[-1])
            middle = ladder[1:-1] if any(c.feasible for c in candidates) else []
        for wp in middle:
            best = min((c.cost for c in candidates if c.feasible), default=math.inf)
            seen = len(candidates)
            if table(wp):
                break
            if min((c.cost for c in candidates[seen:] if c.feasible), default=math.inf) >= best < math.inf:
                break  # this table's best feasible J is no better than the ones above: J rises from here
    feasible = [c for c in candidates if c.feasible]
    if feasible:
        chosen = min(feasible, key=lambda c: c.cost)
    else:
        g = greedy(model.max_batch)
        chosen = judge(math.nan, g, None, None)
        candidates.append(chosen)
        if chosen.feasible:  # greedy itself meets D although no member of the ladder did
            feasible = [chosen]
    return SloResult(model, target, chosen, bool(feasible), tuple(candidates), method, n_req,
                     time.perf_counter() - started)


FRESH_PATHS = 4
"""Paths a chosen candidate is simulated on again, apart from the search's, for its figures (``fresh_figures``)."""


@dataclass(frozen=True)
class PickFigures:
    """A chosen rule's long-run figures, judged apart from the search that chose it (``fresh_figures``)."""

    mean_latency_s: float
    mean_power_w: float
    cost: float
    """J = W + w P at the model's weight."""
    mean_batch: float
    source: Literal["exact", "sim"]
    paths: int
    """Paths simulated and averaged (0: the exact evaluation)."""


def fresh_figures(model: BatchingModel, candidate: SloCandidate, quantile: float, *, paths: int = FRESH_PATHS,
                  seed: int = 0) -> PickFigures:
    """``candidate``'s W, P, J and mean batch under ``model``, for a prediction of what serving it gives.

    The search's own figures for its pick lean low: the pick is the least J of many candidates judged on
    one path (the least of noisy estimates), and under a slowly modulated MMPP one path's W moves by
    several per cent (``_MMPP_PATH_FACTOR``: 139-149 ms over seeds on the code trace's fit). So the pick
    is judged again: an unguarded table exactly (``solver.evaluate.evaluate``; under an MMPP the table
    phase-blind, ``solver.mmpp.evaluate_mmpp``); any other rule by the mean over ``paths`` paths as long
    as the search's for ``quantile`` (``search_path``), drawn with seeds the search does not use.
    """
    if isinstance(paths, bool) or not isinstance(paths, (int, np.integer)) or paths < 1:
        raise ModelError(f"paths must be an integer >= 1, got {paths!r}")
    if candidate.max_wait_s is None and math.isfinite(candidate.table_weight):
        if isinstance(model.arrivals, MMPP):
            from solver.mmpp import evaluate_mmpp

            ev = evaluate_mmpp(model, candidate.policy)
        else:
            from solver.evaluate import evaluate

            ev = evaluate(model, candidate.policy)
        return PickFigures(ev.mean_latency_s, ev.mean_power_w, ev.cost, ev.mean_batch, "exact", 0)
    sims = []
    for i in range(int(paths)):
        arr, warmup = search_path(model, quantile, seed=seed + 1 + i)  # the search's path is seed's own
        sim, _lat = simulate_latencies(model.profile, candidate.rule, arr, idle_power_w=model.idle_power_w,
                                       weight=model.weight, seed=seed + 1 + i, warmup=warmup)
        sims.append(sim)
    mean = lambda f: float(np.mean([f(s) for s in sims]))  # noqa: E731
    return PickFigures(mean(lambda s: s.mean_latency_s), mean(lambda s: s.mean_power_w), mean(lambda s: s.cost),
                       mean(lambda s: s.mean_batch), "sim", int(paths))


def _same_table(a: PolicyTable, b: PolicyTable) -> bool:
    """The same actions on the states both tables hold (their truncations may differ)."""
    m = min(a.actions.size, b.actions.size)
    return bool(np.array_equal(a.actions[:m], b.actions[:m]))


def _guard_search(judge: Callable[[float], SloCandidate], budget_s: float,
                  first: float | None = None) -> tuple[list[SloCandidate], bool]:
    """The guards judged for one table on the way to the largest one that meets the budget D, and
    whether the tightest guard (``_GUARD_MIN`` of D) could (False: it was judged and missed D).
    It starts at ``first`` (default ``_GUARD_FIRST`` of D).

    The upper bound u(g) of the q-quantile grows with g, and about as g + c: c is what a request
    spends beyond the oldest one's wait (the queue ahead of it, its batch's service), which the guard
    changes little. So after each candidate the next guard is D - c (c measured on it, less a
    quarter of the tolerance), kept strictly inside the bracket of the largest feasible and the
    smallest infeasible guard so far (its middle when the estimate falls outside): two or three
    simulations where a grid bisection took seven. It stops when the bracket is ``_GUARD_TOL`` of D
    wide, after ``_GUARD_STEPS`` candidates, or when the tightest guard missed D.
    """
    g_min, tol = _GUARD_MIN * budget_s, _GUARD_TOL * budget_s
    ok: float | None = None  # the largest feasible guard so far
    bad = budget_s  # the smallest infeasible one (a guard of D itself leaves no time to serve)
    tried: list[SloCandidate] = []
    g = _GUARD_FIRST * budget_s if first is None else min(max(first, g_min), budget_s * (1.0 - _GUARD_TOL))
    for _ in range(_GUARD_STEPS):
        cand = judge(g)
        tried.append(cand)
        if cand.feasible:
            ok = g
        else:
            bad = g
        if ok is None and bad <= g_min * (1.0 + 1e-9):
            return tried, False
        lo = ok if ok is not None else g_min
        if ok is not None and bad - ok <= tol:
            break
        excess = cand.estimate.upper_s - g
        nxt = budget_s - excess - 0.25 * tol if math.isfinite(excess) else math.nan
        if ok is None:  # nothing feasible yet: aim at the estimate, never below the tightest guard
            nxt = max(nxt, g_min) if math.isfinite(nxt) and nxt < bad else 0.5 * (lo + bad)
        elif nxt - ok < 0.5 * tol:  # the estimate says this feasible guard is about as large as it gets
            break
        elif not nxt < bad:
            nxt = 0.5 * (ok + bad)
        g = nxt
    return tried, True


def _exact_pair(model: BatchingModel, table: PolicyTable, target: SloTarget) -> tuple[float, float]:
    """(q-quantile, P(T <= D)) of an unguarded table from the exact chain."""
    chain = response_chain(model, table)
    return _quantile(chain, target.quantile), float(_cdf(chain, np.array([target.budget_s]))[0])
