"""The batching SMDP under an m-phase MMPP: state (n, phase), one policy table per phase.

Which phase the policy sees. The gate observes the phase: the exact model here takes the phase
as known at every decision epoch (completions, arrivals, and phase switches while waiting), and the
gate estimates it online with a forward filter on arrival times (``PhaseFilter``; the simulator
runs both the oracle and the filtered phase). Why: an MMPP matters exactly when its phases differ a
lot in rate and last long against the gaps between arrivals, which is when the filter's posterior
is sharp (a few arrivals tell a busy phase from a quiet one), and the per-phase tables then differ
(the quiet phase serves early, the busy phase fills batches). When the phases cannot be told
apart from arrival times the per-phase tables are close, and a phase-blind table (one table for
both phases, ``evaluate_mmpp`` with a ``PolicyTable``) is what remains; this module evaluates that
exactly too, so the value of knowing the phase is measured, not assumed.

Embedded chain (exact). Serve a at (n, i): the service S_a is drawn from the profile's law and
(K, J), the arrivals during it and the phase at its end, follow the MMPP's counting law, computed
by uniformisation: with theta >= lambda_i + r_i, the number of uniformised events during S is
Poisson(theta S) mixed over S (the same law as Poisson arrivals at rate theta,
``solver.tail.arrival_pmf_matrix``) and each event is an arrival (prob lambda_i / theta), a switch
(r_i / theta) or nothing. The latency cost of the epoch is (n E S + E integral_0^S A(t) dt) / lambda
with E[int A | i] = lambda E[S^2]/2 + (lambda_i - lambda)(E S / sigma - (1 - E e^{-sigma S}) / sigma^2),
sigma = r12 + r21 (the MMPP's mean count E[A(t) | i] relaxes to lambda t at rate sigma).
Wait at (n, i): until the next arrival or switch, mean 1 / (lambda_i + r_i), to (n + 1, i) or (n, j)
with probability Q_ij / (lambda_i + r_i).

m phases (m = 2..6): the same chain with m phases per n (states m (N + 1)); the latency integral
is E[int_0^S A | i] = lambda E[S^2]/2 + e_i Z (E S (I - Pi) - Z (I - E e^{QS})) lambda with
Z = (Pi - Q)^{-1} and E e^{QS} from Q's eigenvalues and the service law's Laplace transform (two
phases keep the closed form above, so they reproduce the two-phase results exactly).

Batch MMPP (``MMPP2.groups``): in phase i groups come at g_i = lambda_i / G_i with sizes X_i. The
uniformised events are then groups, and each one adds a draw of X_j to the count (a convolution
per event: still exact); a wait lasts 1 / (g_i + r_i) and jumps by a whole group (landings above N
are valued at N). The latency integral is unchanged: it depends on the mean count only.

Above N (landings beyond the truncation) the drain back to N is charged with the phase-averaged
fluid coefficients of ``solver.tail`` at the mean rate (an approximation; the automatic truncation
grows N until the gain settles, as for Poisson).
"""

from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import linalg, signal

from solver.arrival_model import MMPP2, POISSON
from solver.errors import ModelError
from solver.model import BatchingModel
from solver.pi import MIN_BLOCKS, BandedBelowLU, SingularPolicyError, improve
from solver.policy import PolicyTable
from solver.tail import arrival_pmf_matrix, initial_truncation, service_moments, tail_coefficients

MAX_TRUNCATION = 1500
"""Per phase; the system has m (N + 1) unknowns."""
GROWTH_RTOL = 1e-8
_FLOOR = 1e-20


def _mmpp(model: BatchingModel) -> MMPP2:
    if not isinstance(model.arrivals, MMPP2):
        raise ModelError(f"solver.mmpp needs a model with MMPP2 arrivals, got {model.arrivals.spec}")
    return model.arrivals


def _laplace(model: BatchingModel, sigma: float | complex) -> np.ndarray:
    """E[exp(-sigma S_b)] for b = 1..B (complex for a complex sigma)."""
    prof = model.profile
    if prof.samples is not None:
        if isinstance(sigma, complex):
            return np.array([complex(np.mean(np.exp(-sigma * np.asarray(s)))) for s in prof.samples])
        return np.array([float(np.mean(np.exp(-sigma * s))) for s in prof.samples])
    t, c = np.asarray(prof.mean_s), np.asarray(prof.cv)
    out = np.exp(-sigma * t)
    if isinstance(sigma, complex):
        out = out.astype(complex)
    g = c > 0
    out[g] = (1.0 + sigma * t[g] * c[g] ** 2) ** (-1.0 / c[g] ** 2)
    return out


def count_law(model: BatchingModel) -> np.ndarray:
    """P(K = k, J = j | I = i) during one S_b: array [b - 1, i, j, k], k = 0..L (mass beyond L < 1e-14)."""
    mm = _mmpp(model)
    lam = np.asarray(mm.epoch_rates)  # arrival instants: requests, or groups of a batch MMPP
    leave = np.asarray(mm.leave_rates)
    m = mm.phases
    theta = float(np.max(lam + leave)) * 1.0000001
    m1, m2 = service_moments(model.profile)
    B = model.max_batch
    sd = math.sqrt(theta * m1[-1] + theta * theta * max(m2[-1] - m1[-1] ** 2, 0.0))
    mmax = int(theta * m1[-1] + 12.0 * sd + 30)
    while True:
        events = arrival_pmf_matrix(model.profile, theta, mmax)  # uniformised events during S_b
        # the tail beyond mmax is negligible once the last columns are far below the floor (a sum test
        # would chase the pmf's own rounding, about 1e-15 per term)
        if float(events[:, -10:].max()) <= _FLOOR or float(np.min(events.sum(axis=1))) >= 1.0 - 1e-12:
            break
        if mmax > 1_000_000:
            raise ModelError(f"arrivals during one service exceed 10^6 uniformised events (theta {theta:.6g}/s)")
        mmax *= 2
    alive = np.nonzero(events.max(axis=0) > _FLOOR)[0]
    mmax = int(alive[-1])
    events = events[:, : mmax + 1]
    if mm.grouped:
        return _grouped_count_law(mm, events, theta)
    a1 = np.diag(lam / theta)  # an arrival, phase kept
    a0 = np.eye(m) + (mm.generator - np.diag(lam)) / theta  # no arrival: a switch or nothing
    u = np.zeros((mmax + 1, m, m))  # u[k] = P(k arrivals, phase j | i) after e events
    u[0] = np.eye(m)
    out = np.zeros((B, mmax + 1, m, m))
    for e in range(mmax + 1):
        out += events[:, e, None, None, None] * u[None]
        if e == mmax:
            break
        nxt = u @ a0
        nxt[1:] += u[:-1] @ a1
        u = nxt
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))  # [b, i, j, k]


def _grouped_count_law(mm: MMPP2, events: np.ndarray, theta: float) -> np.ndarray:
    """``count_law`` of a batch MMPP: each uniformised event in phase j is a group (probability
    g_j / theta, g_j the group rate) whose size is drawn from phase j's law, a switch, or nothing.
    The request count k runs to kmax, doubled until the mass beyond it is below 1e-13 (against the
    events' own mass)."""
    g = np.asarray(mm.epoch_rates)
    B, M = events.shape[0], events.shape[1] - 1
    p = mm.phases
    a0 = np.eye(p) + (mm.generator - np.diag(g)) / theta  # no group: a switch or nothing
    mean_k = M * max(mm.group_means) + 10
    kmax = int(2 * mean_k)
    while True:
        q = mm.size_pmfs(kmax)
        xs = [int(np.nonzero(q[j] > _FLOOR)[0][-1]) for j in range(p)]
        kern = [q[j, : xs[j] + 1] * (g[j] / theta) for j in range(p)]
        u = np.zeros((kmax + 1, p, p))  # u[k, i, j] = P(k requests, phase j | i) after m events
        u[0] = np.eye(p)
        out = np.zeros((B, kmax + 1, p, p))
        for m in range(M + 1):
            out += events[:, m, None, None, None] * u[None]
            if m == M:
                break
            nxt = u @ a0
            for j in range(p):
                nxt[:, :, j] += signal.convolve(u[:, :, j], kern[j][:, None], mode="full")[: kmax + 1]
            u = nxt
        # the requests' law loses mass beyond kmax only; the events' own truncation (a nearly
        # deterministic service's mixture) is not the count's to recover by doubling kmax
        lost = float(np.max(events.sum(axis=1)[:, None] - out.sum(axis=(1, 3))))
        if lost <= 1e-13 or kmax > 4_000_000:
            break
        kmax *= 2
    alive = np.nonzero(out.max(axis=(0, 2, 3)) > _FLOOR)[0]
    out = out[:, : int(alive[-1]) + 1]
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))  # [b, i, j, k]


def wait_moves(mm: MMPP2, truncation: int) -> np.ndarray:
    """[i, x]: probability that a wait at phase i ends in a jump of x requests (x = 0: a switch),
    the jump's share of the next event (group or switch); x runs to the largest group above 1e-20."""
    g = np.asarray(mm.epoch_rates)
    leave = np.asarray(mm.leave_rates)
    q = mm.size_pmfs(truncation)
    last = max(int(np.nonzero(q[j] > _FLOOR)[0][-1]) for j in range(mm.phases))
    out = q[:, : last + 1] * (g / (g + leave))[:, None]
    out[:, 0] = leave / (g + leave)
    return out


def wait_switches(mm: MMPP2) -> np.ndarray:
    """[i, j]: probability that a wait at phase i ends in a switch to phase j (row sums: ``wait_moves``'
    column 0; two phases: that column, off the diagonal, exactly)."""
    g = np.asarray(mm.epoch_rates)
    leave = np.asarray(mm.leave_rates)
    q = mm.generator.copy()
    np.fill_diagonal(q, 0.0)
    if mm.phases == 2:
        return np.array([[0.0, leave[0] / (g[0] + leave[0])], [leave[1] / (g[1] + leave[1]), 0.0]])
    return q / (g + leave)[:, None]


@dataclass(frozen=True)
class PhasePolicy:
    """One queue-length table per MMPP phase: ``tables[i]`` is used while the phase is i."""

    tables: tuple[PolicyTable, ...]

    def __post_init__(self) -> None:
        if len(self.tables) < 2 or any(t.max_batch != self.tables[0].max_batch for t in self.tables):
            raise ValueError("a phase policy needs a table per phase (two or more), all with the same max_batch")

    @property
    def max_batch(self) -> int:
        return self.tables[0].max_batch

    def action(self, n: int, phase: int) -> int:
        return self.tables[phase].action(n)

    def to_dict(self) -> dict:
        return {f"phase{i + 1}": [int(a) for a in t.actions] for i, t in enumerate(self.tables)}


@dataclass(frozen=True, eq=False)
class PhaseSMDP:
    """Costs, sojourns and transitions on (n, i), n = 0..N, i = 0..m - 1 (arrays [i, n, a])."""

    model: BatchingModel
    truncation: int
    law: np.ndarray
    """[b - 1, i, j, k]: the joint law of arrivals and end phase during S_b."""
    valid: np.ndarray
    latency: np.ndarray
    energy: np.ndarray
    time: np.ndarray
    tail_p: np.ndarray
    """[i, n, a, j]: probability of landing above N in phase j (moved to (N, j))."""
    tail_m: np.ndarray
    """[i, n, a]: E[(landing - N)^+], requests drained by the excursion."""
    drain_batches: float
    """Full batches per request drained above N."""

    @property
    def phases(self) -> int:
        return self.law.shape[1]

    @property
    def n_states(self) -> int:
        return self.phases * (self.truncation + 1)

    @property
    def cost(self) -> np.ndarray:
        return np.where(self.valid, self.latency + self.model.weight * self.energy, np.inf)

    def _extended(self, h: np.ndarray) -> np.ndarray:
        """h[j, l] for l = 0..N + L, landings above N valued at N (the excursion returns there)."""
        N = self.truncation
        L = self.law.shape[3] - 1
        ext = np.empty((self.phases, N + 1 + L))
        ext[:, : N + 1] = h
        ext[:, N + 1 :] = h[:, N : N + 1]
        return ext

    def expected_next(self, h: np.ndarray) -> np.ndarray:
        """E[h(next)] for every (i, n, a), h of shape (m, N + 1)."""
        N = self.truncation
        B = self.model.max_batch
        L = self.law.shape[3] - 1
        ext = self._extended(h)
        n = np.arange(N + 1)
        a = np.arange(1, B + 1)
        s = np.clip(n[:, None] - a[None, :], 0, N)
        m = self.phases
        out = np.empty((m, N + 1, B + 1))
        for i in range(m):
            acc = np.zeros((N + 1, B))
            for j in range(m):
                win = sliding_window_view(ext[j], L + 1)[: N + 1]  # win[s, k] = h_j(s + k)
                acc += win @ self.law[:, i, j, :].T  # [s, a - 1]
            out[i, :, 1:] = acc[s, a - 1]
        moves = wait_moves(self.model.arrivals, N)
        switch = wait_switches(self.model.arrivals)
        X = moves.shape[1] - 1
        for i in range(m):
            up = np.append(h[i], np.full(X, h[i, N]))  # h_i(min(n + x, N))
            win = sliding_window_view(up, X + 1)[: N + 1]
            if m == 2:
                out[i, :, 0] = moves[i, 0] * h[1 - i] + win[:, 1:] @ moves[i, 1:]
            else:
                out[i, :, 0] = switch[i] @ h + win[:, 1:] @ moves[i, 1:]
        return out

    def transition_matrix(self, actions: np.ndarray) -> np.ndarray:
        """Dense P over states i * (N + 1) + n."""
        N = self.truncation
        size = N + 1
        L = self.law.shape[3] - 1
        moves = wait_moves(self.model.arrivals, N)
        switch = wait_switches(self.model.arrivals)
        X = moves.shape[1] - 1
        m = self.phases
        P = np.zeros((self.n_states, self.n_states))
        for i in range(m):
            for n in range(size):
                r = i * size + n
                a = int(actions[i, n])
                if a == 0:
                    top = min(n + X, N)
                    P[r, i * size + n + 1 : i * size + top + 1] += moves[i, 1 : top - n + 1]
                    P[r, i * size + N] += moves[i, top - n + 1 :].sum()
                    for j in range(m):
                        if j != i:
                            P[r, j * size + n] += switch[i, j]
                    continue
                s = n - a
                e = min(s + L, N)
                for j in range(m):
                    P[r, j * size + s : j * size + e + 1] += self.law[a - 1, i, j, : e - s + 1]
                    P[r, j * size + N] += self.tail_p[i, n, a, j]
        return P


def latency_integrals(model: BatchingModel, m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """[i, b - 1]: E[int_0^{S_b} A(t) dt | phase i at the start], A(t) the requests arrived by t.

    Two phases: lambda E S^2 / 2 + (lambda_i - lambda)(E S / sigma - (1 - E e^{-sigma S}) / sigma^2),
    sigma = r12 + r21. m phases: the module docstring's matrix form (Q's eigenvalues: E e^{QS}
    = V diag(E e^{mu S}) V^{-1}; the result is real, its rounding imaginary part dropped)."""
    mm = _mmpp(model)
    lam_bar = model.rate
    lam = np.asarray(mm.rates)
    if mm.phases == 2:
        sigma = float(sum(mm.switching))
        lap = _laplace(model, sigma)
        return np.vstack([lam_bar * m2 / 2.0 + (lam[i] - lam_bar) * (m1 / sigma - (1.0 - lap) / sigma**2)
                          for i in range(2)])
    p = mm.phases
    q = mm.generator
    big_pi = np.outer(np.ones(p), mm.stationary)
    z = np.linalg.inv(big_pi - q)
    mu, v = np.linalg.eig(q)
    vinv = np.linalg.inv(v)
    laps = np.vstack([_laplace(model, complex(-x)) for x in mu])  # [eigenvalue, b]
    out = np.empty((p, m1.size))
    dev = (np.eye(p) - big_pi) @ lam  # lambda - lambda_bar
    for b in range(m1.size):
        e_qs = np.real((v * laps[:, b][None, :]) @ vinv)
        out[:, b] = lam_bar * m2[b] / 2.0 + z @ (m1[b] * dev - z @ ((np.eye(p) - e_qs) @ lam))
    return out


def overflow_moments(law: np.ndarray, room: int, moments: int = 2) -> tuple[np.ndarray, ...]:
    """For a count law ``law[b, k]`` (k = 0..L arrivals during a batch of b + 1): the probability of more
    than g arrivals, E[(K - g)+] and E[((K - g)+)^2] for every room g = 0..``room`` (arrays [b, g]; the
    first ``moments`` + 1 of them). What the overflow above the truncation N costs from a post-service
    count s, at g = N - s.

    Tail sums of nonnegative terms only (no differences of large sums): P(K > g) is the reverse
    cumulative sum of the law from g + 1; E[(K - g)+] = sum_{g' >= g} P(K > g') since (K - g)+ counts
    the g' in [g, K); E[((K - g)+)^2] = E[(K - g)+] + 2 sum_{g' > g} E[(K - g')+] since
    (K - g)^2 = sum_{g' = g}^{K - 1} (2 (g' - g) + 1). O((room + L) B) where the windowed products they
    replace were O(room L B) (seconds per build at N = 1500 with a four-phase batch law).
    """
    b, width = law.shape
    size = max(room + 2, width + 1)
    padded = np.zeros((b, size))
    padded[:, :width] = law
    at_least = np.cumsum(padded[:, ::-1], axis=1)[:, ::-1]  # P(K >= g)
    more = np.zeros((b, size))
    more[:, :-1] = at_least[:, 1:]  # P(K > g)
    out = [more[:, : room + 1]]
    if moments >= 1:
        first = np.cumsum(more[:, ::-1], axis=1)[:, ::-1]  # sum_{g' >= g} P(K > g')
        out.append(first[:, : room + 1])
    if moments >= 2:
        later = np.zeros((b, size))
        later[:, :-1] = np.cumsum(first[:, ::-1], axis=1)[:, ::-1][:, 1:]  # sum_{g' > g} E[(K - g')+]
        out.append((first + 2.0 * later)[:, : room + 1])
    return tuple(out)


def build_phase_smdp(model: BatchingModel, truncation: int, law: np.ndarray | None = None) -> PhaseSMDP:
    mm = _mmpp(model)
    B = model.max_batch
    N = int(truncation)
    if N < B:
        raise ModelError(f"truncation N = {N} must be >= max_batch B = {B}")
    law = count_law(model) if law is None else law
    L = law.shape[3] - 1
    lam_bar = model.rate
    leave = np.asarray(mm.leave_rates)
    p = mm.phases
    m1, m2 = service_moments(model.profile)
    coeffs = tail_coefficients(model.with_(arrivals=POISSON), N, "fluid")
    integrals = latency_integrals(model, m1, m2)
    n = np.arange(N + 1)
    a = np.arange(1, B + 1)
    s = n[:, None] - a[None, :]
    sc = np.clip(s, 0, N)
    valid = np.zeros((p, N + 1, B + 1), dtype=bool)
    valid[:, :, 0] = n < B
    valid[:, :, 1:] = s >= 0
    latency = np.zeros((p, N + 1, B + 1))
    energy = np.zeros((p, N + 1, B + 1))
    time = np.ones((p, N + 1, B + 1))
    tail_p = np.zeros((p, N + 1, B + 1, p))
    tail_m = np.zeros((p, N + 1, B + 1))
    gap = N - sc  # the room above the post-service count s: the arrivals beyond it overflow N
    col = a[None, :] - 1
    epochs = np.asarray(mm.epoch_rates)
    for i in range(p):
        nu = epochs[i] + leave[i]
        latency[i, :, 0] = n / (nu * lam_bar)
        energy[i, :, 0] = model.idle_power_w / nu
        time[i, :, 0] = 1.0 / nu
        integral = integrals[i]
        _, over1, over2 = overflow_moments(law[:, i, :, :].sum(axis=1), N)  # end phase summed
        em = over1[col, gap]
        em2 = over2[col, gap]
        for j in range(p):
            tail_p[i, :, 1:, j] = overflow_moments(law[:, i, j, :], N, moments=0)[0][col, gap]
        latency[i, :, 1:] = (n[:, None] * m1[None, :] + integral[None, :]) / lam_bar + coeffs.lin * em + coeffs.quad * em2
        energy[i, :, 1:] = model.profile.energy_j[None, :] + coeffs.energy * em
        time[i, :, 1:] = m1[None, :] + coeffs.time * em
        tail_m[i, :, 1:] = em
    inval = ~valid
    latency[inval] = 0.0
    energy[inval] = 0.0
    time[inval] = 1.0
    tail_p[inval] = 0.0
    tail_m[inval] = 0.0
    return PhaseSMDP(model, N, law, valid, latency, energy, time, tail_p, tail_m, coeffs.batches)


@dataclass(frozen=True, eq=False)
class PhaseValues:
    gain: float
    h: np.ndarray
    """(m, N + 1), h(0, phase 1) = 0."""
    pi: np.ndarray
    """(m, N + 1): stationary law of the embedded chain."""


LINEAR_SOLVERS = ("banded", "dense")


def evaluate_actions(smdp: PhaseSMDP, actions: np.ndarray, linear_solver: str = "banded") -> PhaseValues:
    """Gain, relative values and stationary law of ``actions`` [i, n].

    "banded": states ordered n-major (m n + i), every transition goes down by at most m B + m - 1
    places (a batch of up to B, any end phase), so with g's column moved last the system is zero
    below its m (B + 1)-th subdiagonal and ``solver.pi.BandedBelowLU`` factors it in about
    m (B + 1) n^2 flops. "dense": one LAPACK LU of the whole system (2/3 n^3); both agree to rounding.
    """
    if linear_solver not in LINEAR_SOLVERS:
        raise ValueError(f"linear_solver must be one of {LINEAR_SOLVERS}, got {linear_solver!r}")
    N = smdp.truncation
    i_idx, n_idx = np.indices(actions.shape)
    ok = smdp.valid[i_idx, n_idx, actions] & ((actions > 0) | (n_idx < N))
    if not np.all(ok):
        i, n = (int(x[0]) for x in np.nonzero(~ok))
        raise ValueError(f"action {int(actions[i, n])} at (n = {n}, phase {i + 1}) is not allowed on 0..{N}")
    c = (smdp.latency + smdp.model.weight * smdp.energy)[i_idx, n_idx, actions].ravel()
    tau = smdp.time[i_idx, n_idx, actions].ravel()
    m = smdp.phases
    kl = m * (smdp.model.max_batch + 1)
    if linear_solver == "banded" and smdp.n_states >= MIN_BLOCKS * kl:
        return _evaluate_banded(smdp, actions, c, tau, kl)
    A = np.eye(smdp.n_states) - smdp.transition_matrix(actions)
    A[:, 0] = tau
    try:
        lu = linalg.lu_factor(A, overwrite_a=True, check_finite=False)
    except (linalg.LinAlgError, ValueError) as exc:  # pragma: no cover
        raise SingularPolicyError(str(exc)) from exc
    if np.min(np.abs(np.diag(lu[0]))) == 0.0:
        raise SingularPolicyError("policy evaluation matrix is singular")
    x = linalg.lu_solve(lu, c, check_finite=False)
    e0 = np.zeros(smdp.n_states)
    e0[0] = 1.0
    y = np.clip(linalg.lu_solve(lu, e0, trans=1, check_finite=False), 0.0, None)
    g = float(x[0])
    h = x.copy()
    h[0] = 0.0
    return PhaseValues(g, h.reshape(m, N + 1), (y / y.sum()).reshape(m, N + 1))


def _evaluate_banded(smdp: PhaseSMDP, actions: np.ndarray, c: np.ndarray, tau: np.ndarray, kl: int) -> PhaseValues:
    """``evaluate_actions`` on the n-major ordering with unknowns (h(1..), g): see its docstring.

    I - P is written straight into the LU's band storage (``BandedBelowLU.extended``: column k of
    the system is column k + 1 there, so the sojourns' column lands last), never as a dense matrix."""
    N = smdp.truncation
    size = smdp.n_states
    L = smdp.law.shape[3] - 1
    lu = BandedBelowLU(size, kl)
    E = lu.extended
    moves = wait_moves(smdp.model.arrivals, N)
    switch = wait_switches(smdp.model.arrivals)
    X = moves.shape[1] - 1
    m = smdp.phases
    for n in range(N + 1):
        for i in range(m):
            r = m * n + i
            E[r, r] += 1.0
            a = int(actions[i, n])
            if a == 0:
                top = min(n + X, N)
                E[r, m * (n + 1) + i : m * top + i + 1 : m] -= moves[i, 1 : top - n + 1]
                E[r, m * N + i] -= moves[i, top - n + 1 :].sum()
                for j in range(m):
                    if j != i:
                        E[r, m * n + j] -= switch[i, j]
                continue
            s0 = n - a
            e = min(s0 + L, N)
            for j in range(m):
                E[r, m * s0 + j : m * e + j + 1 : m] -= smdp.law[a - 1, i, j, : e - s0 + 1]
                E[r, m * N + j] -= smdp.tail_p[i, n, a, j]
    order = np.arange(size).reshape(m, N + 1).T.ravel()  # n-major position k -> phase-major index
    E[:, size] = tau[order]
    lu.factor()
    x = lu.solve(c[order])
    last = np.zeros(size)
    last[-1] = 1.0
    y = lu.solve_transposed(last)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise SingularPolicyError("policy evaluation matrix is singular")
    h = np.empty(size)
    h[order[0]] = 0.0
    h[order[1:]] = x[:-1]
    pi = np.empty(size)
    pi[order] = np.clip(y, 0.0, None)
    return PhaseValues(float(x[-1]), h.reshape(m, N + 1), (pi / pi.sum()).reshape(m, N + 1))


@dataclass(frozen=True, eq=False)
class PhaseEvaluation:
    """Long-run figures of a policy under an MMPP (exact up to the tail treatment)."""

    mean_latency_s: float
    mean_power_w: float
    cost: float
    throughput_rps: float
    mean_batch: float
    truncation: int
    phase_time: tuple[float, ...]
    """Fraction of time in each phase (the MMPP's stationary law, a check of the chain)."""

    def to_dict(self) -> dict:
        return {
            "mean_latency_s": self.mean_latency_s,
            "mean_power_w": self.mean_power_w,
            "cost": self.cost,
            "throughput_rps": self.throughput_rps,
            "mean_batch": self.mean_batch,
            "truncation": self.truncation,
            "phase_time": list(self.phase_time),
        }


def _summarize(smdp: PhaseSMDP, actions: np.ndarray, values: PhaseValues) -> PhaseEvaluation:
    i_idx, n_idx = np.indices(actions.shape)
    pi = values.pi
    t = smdp.time[i_idx, n_idx, actions]
    mean_time = float(np.sum(pi * t))
    lat = float(np.sum(pi * smdp.latency[i_idx, n_idx, actions])) / mean_time
    power = float(np.sum(pi * smdp.energy[i_idx, n_idx, actions])) / mean_time
    drained = smdp.tail_m[i_idx, n_idx, actions]
    B = smdp.model.max_batch
    served = float(np.sum(pi * actions)) + B * smdp.drain_batches * float(np.sum(pi * drained))
    batches = float(np.sum(pi * (actions > 0))) + smdp.drain_batches * float(np.sum(pi * drained))
    phase_t = (pi * t).sum(axis=1) / mean_time
    return PhaseEvaluation(
        mean_latency_s=lat,
        mean_power_w=power,
        cost=lat + smdp.model.weight * power,
        throughput_rps=served / mean_time,
        mean_batch=served / batches if batches > 0 else 0.0,
        truncation=smdp.truncation,
        phase_time=tuple(float(x) for x in phase_t),
    )


def _actions(model: BatchingModel, policy: PhasePolicy | PolicyTable, size: int) -> np.ndarray:
    m = _mmpp(model).phases
    tables = policy.tables if isinstance(policy, PhasePolicy) else (policy,) * m
    if len(tables) != m:
        raise ModelError(f"a phase policy with {len(tables)} tables for an MMPP with {m} phases")
    if tables[0].max_batch != model.max_batch:
        raise ModelError(f"policy is for max_batch {tables[0].max_batch}, the model has B = {model.max_batch}")
    return np.vstack([t.extended(size) for t in tables])


def _start_truncation(model: BatchingModel, policy: PhasePolicy | PolicyTable | None = None) -> int:
    mm = _mmpp(model)
    base = initial_truncation(model.with_(arrivals=POISSON))
    # a busy phase above capacity piles up requests while it lasts: cover a typical surge
    m1, _ = service_moments(model.profile)
    cap = model.capacity
    surge = max(0.0, max(mm.rates) - cap) / min(mm.leave_rates)
    n = int(max(base, model.max_batch + surge, 16))
    if policy is not None:
        tables = policy.tables if isinstance(policy, PhasePolicy) else (policy,)
        n = max(n, *(t.truncation + 1 for t in tables))
    return min(n, MAX_TRUNCATION)


def evaluate_mmpp(model: BatchingModel, policy: PhasePolicy | PolicyTable, truncation: int | None = None,
                  linear_solver: str = "banded", law: np.ndarray | None = None) -> PhaseEvaluation:
    """Exact W, P, J of a phase policy, or of one table for both phases (phase-blind), under the MMPP.

    Beyond the tables: serve min(n, B). N grows by half until the cost moves by less than 1e-10.
    ``law``: the model's ``count_law``, where the caller has it already.
    """
    for table in policy.tables if isinstance(policy, PhasePolicy) else (policy,):
        if table.beyond_batch != model.max_batch:
            raise ModelError(f"a table that serves batches of {table.beyond_batch} above its end (a static policy) "
                             "is not evaluated under an MMPP: the drain above N serves full batches")
    law = count_law(model) if law is None else law
    N = _start_truncation(model, policy) if truncation is None else int(truncation)
    previous = None
    while True:
        smdp = build_phase_smdp(model, N, law)
        a = _actions(model, policy, N + 1)
        cur = _summarize(smdp, a, evaluate_actions(smdp, a, linear_solver))
        if truncation is not None:
            return cur
        if previous is not None and abs(cur.cost - previous.cost) <= 1e-10 * abs(cur.cost):
            return cur
        if N >= MAX_TRUNCATION:
            return cur
        previous = cur
        N = min(MAX_TRUNCATION, int(N * 1.5) + 1)


class _EvaluatedResult:
    """W and P of a solve's policy, read from its exact evaluation."""

    evaluation: PhaseEvaluation

    @property
    def mean_latency_s(self) -> float:
        return self.evaluation.mean_latency_s

    @property
    def mean_power_w(self) -> float:
        return self.evaluation.mean_power_w


@dataclass(frozen=True, eq=False)
class PhaseSolveResult(_EvaluatedResult):
    policy: PhasePolicy
    gain: float
    evaluation: PhaseEvaluation
    iterations: int
    converged: bool
    truncation: int
    sizes_tried: tuple[int, ...]
    solve_time_s: float
    model: BatchingModel


def _policy_iteration(smdp: PhaseSMDP, start: np.ndarray, max_iter: int,
                      linear_solver: str) -> tuple[np.ndarray, PhaseValues, int, bool]:
    actions = start
    values = evaluate_actions(smdp, actions, linear_solver)
    cost = smdp.cost
    seen = [actions]
    for it in range(1, max_iter + 1):
        q = np.where(smdp.valid, cost - values.gain * smdp.time + smdp.expected_next(values.h), np.inf)
        flat_q = q.reshape(-1, q.shape[2])
        new = improve(flat_q, actions.ravel()).reshape(actions.shape)
        if np.array_equal(new, actions) or any(np.array_equal(new, old) for old in seen[-8:]):
            return actions, values, it, True
        actions = new
        seen.append(actions)
        values = evaluate_actions(smdp, actions, linear_solver)
    return actions, values, max_iter, False


def solve_mmpp(model: BatchingModel, *, truncation: int | None = None, max_iter: int = 1000,
               linear_solver: str = "banded") -> PhaseSolveResult:
    """Optimal phase-observed policy (one table per phase) by policy iteration on (n, phase)."""
    started = _time.perf_counter()
    law = count_law(model)
    mm = _mmpp(model)
    B = model.max_batch
    N = _start_truncation(model) if truncation is None else int(truncation)
    start = None
    sizes: list[int] = []
    previous = None
    its = 0
    settled = truncation is not None
    while True:
        smdp = build_phase_smdp(model, N, law)
        n = np.arange(N + 1)
        greedy = np.vstack([np.minimum(n, B)] * mm.phases)
        if start is not None:
            greedy[:, : start.shape[1]] = start
        actions, values, k, ok = _policy_iteration(smdp, greedy, max_iter, linear_solver)
        its += k
        sizes.append(N)
        if truncation is not None:
            break
        if previous is not None:
            pa, pg = previous
            if abs(values.gain - pg) <= GROWTH_RTOL * abs(values.gain) and np.array_equal(actions[:, : pa.shape[1]], pa):
                settled = True
                break
        if N >= MAX_TRUNCATION:
            break
        previous = (actions, values.gain)
        start = actions
        N = min(MAX_TRUNCATION, int(N * 1.5) + 1)
    policy = PhasePolicy(tuple(PolicyTable(actions[i], B) for i in range(mm.phases)))
    ev = _summarize(smdp, actions, values)
    return PhaseSolveResult(policy, values.gain, ev, its, bool(ok and settled), N, tuple(sizes),
                            _time.perf_counter() - started, model)


@dataclass(frozen=True, eq=False)
class BlindSolveResult(_EvaluatedResult):
    """The phase-blind table (one for both phases) found by ``solve_mmpp_blind``, exactly evaluated."""

    policy: PolicyTable
    gain: float
    evaluation: PhaseEvaluation
    start_gain: float
    """The starting table's J under the MMPP: the search only ever lowers it."""
    iterations: int
    truncation: int
    solve_time_s: float
    model: BatchingModel


def solve_mmpp_blind(model: BatchingModel, start: PolicyTable, *, max_iter: int = 50) -> BlindSolveResult:
    """The best table on average over the phase: for a gate that does not observe the phase.

    Policy iteration restricted to tables that ignore the phase: from ``start`` (typically the
    Poisson-solved table at the mean rate), evaluate exactly under the MMPP, then pick at every n
    the action that minimises the Q-value averaged over the phase with weights P(phase | n) (the
    embedded chain's stationary law at n; the MMPP's stationary law where n is never visited).
    A step is kept only if the exact gain drops, so the result is never worse than ``start`` (the
    restricted problem is partially observed: this is a descent, not a proof of optimality).
    """
    started = _time.perf_counter()
    if start.max_batch != model.max_batch or start.beyond_batch != model.max_batch:
        raise ModelError("the starting table must be a queue-length table for the model's B serving full batches above it")
    mm = _mmpp(model)
    law = count_law(model)
    N = evaluate_mmpp(model, start, law=law).truncation  # where the start's J has settled
    smdp = build_phase_smdp(model, N, law)
    B = model.max_batch
    actions = start.extended(N + 1)
    values = evaluate_actions(smdp, np.vstack([actions] * mm.phases))
    first = values.gain
    its = 0
    for its in range(1, max_iter + 1):
        q = np.where(smdp.valid, smdp.cost - values.gain * smdp.time + smdp.expected_next(values.h), np.inf)
        w = values.pi / np.maximum(values.pi.sum(axis=0, keepdims=True), 1e-300)
        unseen = values.pi.sum(axis=0) <= 1e-300
        w[:, unseen] = mm.stationary[:, None]
        avg = np.einsum("in,ina->na", w, np.where(np.isfinite(q), q, 0.0))
        avg = np.where(smdp.valid[0], avg, np.inf)
        new = improve(avg, actions)
        if np.array_equal(new, actions):
            break
        try:
            cand = evaluate_actions(smdp, np.vstack([new] * mm.phases))
        except SingularPolicyError:
            break
        if cand.gain >= values.gain * (1.0 - 1e-12):
            break
        actions, values = new, cand
    table = PolicyTable(actions, B)
    ev = evaluate_mmpp(model, table, law=law)  # N grown again: the search's table may settle further out
    return BlindSolveResult(table, ev.cost, ev, first, its, ev.truncation, _time.perf_counter() - started, model)


# ----------------------------------------------------------------------------------------------
# The modulation's time scale, calibrated to a queue's W
# ----------------------------------------------------------------------------------------------

CALIBRATION_FACTORS = (0.25, 4.0)
"""The slowing factors ``calibrate_modulation`` searches between (phases a quarter to four times as long)."""
CALIBRATION_RTOL = 0.002
"""``calibrate_modulation`` stops once the calibrated W is this close to the target (relative)."""


@dataclass(frozen=True)
class ModulationCalibration:
    """An MMPP fit whose phases were made ``factor`` times as long (``MMPP.slowed``) so that a reference
    table's exact W under it is ``target_w_s``."""

    arrivals: MMPP2
    factor: float
    target_w_s: float
    fitted_w_s: float
    """The reference table's W under the fit as it was (factor 1)."""
    w_s: float
    """... and under ``arrivals``: ``target_w_s`` within ``CALIBRATION_RTOL``, unless ``clamped``."""
    clamped: bool
    """The target lies beyond what the factors in ``CALIBRATION_FACTORS`` reach: the time scale does not
    explain the difference, and the fit is kept as it is (``factor`` 1)."""
    evaluations: int
    reach_w_s: float = math.nan
    """Where ``clamped``: the W at the end of the range towards the target."""

    def describe(self) -> str:
        if self.clamped:
            return (f"phases as fitted: no time scale in x{CALIBRATION_FACTORS[0]:g}-{CALIBRATION_FACTORS[1]:g} gives "
                    f"the reference table's W {self.target_w_s * 1e3:.2f} ms (it moves {self.fitted_w_s * 1e3:.2f} -> "
                    f"{self.reach_w_s * 1e3:.2f} ms)")
        return (f"phases x{self.factor:.3g} as long: the reference table's W {self.fitted_w_s * 1e3:.2f} -> "
                f"{self.target_w_s * 1e3:.2f} ms")


def calibrate_modulation(model: BatchingModel, policy: PolicyTable, target_w_s: float, *,
                         rtol: float = CALIBRATION_RTOL, max_evaluations: int = 16) -> ModulationCalibration:
    """The slowing factor s of ``model.arrivals`` (an MMPP) under which ``policy``'s exact W
    (``evaluate_mmpp``) is ``target_w_s``: typically the same table's W simulated on the trace the MMPP
    was fitted to. A fit by counts in bins matches the trace's rates and its dispersion over the windows
    it sees, and can still fall short of how long the trace stays in a slow or busy stretch (the Azure
    code trace's fit gives the fixed gate's table 145 ms where the trace itself gives 155). The phases'
    time scale is the one knob this leaves: W grows with s (longer stretches, the same stationary law and
    mean rate). Found by regula falsi (Illinois) on log s between ``CALIBRATION_FACTORS``, from s = 1.
    Where no s in that range reaches the target (a W that hardly moves with the time scale: phases long
    against the queue's own time scale already), the time scale is not what the fit misses, and the fit is
    returned as it is, flagged ``clamped``."""
    mm = _mmpp(model)
    t = float(target_w_s)
    if not math.isfinite(t) or t <= 0:
        raise ModelError(f"the target W must be finite and > 0 seconds, got {target_w_s!r}")
    if not 0 < rtol < 0.5:
        raise ModelError(f"rtol must be in (0, 0.5), got {rtol!r}")
    evaluations = 0

    def w_at(x: float) -> float:
        nonlocal evaluations
        evaluations += 1
        m = mm.slowed(math.exp(x))
        return evaluate_mmpp(model.with_(rate=m.mean_rate, arrivals=m), policy).mean_latency_s

    def done(x: float, w: float) -> ModulationCalibration:
        return ModulationCalibration(mm.slowed(math.exp(x)), math.exp(x), t, w0, w, False, evaluations)

    w0 = w_at(0.0)
    if abs(w0 - t) <= rtol * t:
        return done(0.0, w0)
    lo_x, hi_x = math.log(CALIBRATION_FACTORS[0]), math.log(CALIBRATION_FACTORS[1])
    end = hi_x if w0 < t else lo_x
    w_end = w_at(end)
    if (w_end - t) * (w0 - t) > 0:  # the whole range misses the target on one side: keep the fit
        return ModulationCalibration(mm, 1.0, t, w0, w0, True, evaluations, w_end)
    a, fa, b, fb = 0.0, w0 - t, end, w_end - t  # of opposite signs: the root lies between a and b
    w_b = w_end
    while evaluations < max_evaluations:
        x = b - fb * (b - a) / (fb - fa)
        w = w_at(x)
        fx = w - t
        if abs(fx) <= rtol * t:
            return done(x, w)
        if fx * fb < 0:  # the root is between x and b: b becomes the kept end
            a, fa = b, fb
        else:  # between a and x: a is kept again, its value halved (Illinois), so a stays no end for good
            fa /= 2
        b, fb, w_b = x, fx, w
    return done(b, w_b)
