"""The SMDP truncated to states 0..N, with an analytic cost for the states it leaves out.

A batch served at n lands on n - a + K, and K is unbounded, so any finite state space must say what
happens above N. Two answers are implemented:

* ``"none"``: the plain truncation. Overflow mass is lumped at N and nothing else is charged; the
  error vanishes only when N is far above where the queue ever goes.
* ``"fluid"`` (default) and ``"first-order"``: an *excursion*. Above N the policy serves full batches (the table's
  beyond-N rule), so a landing on N + m starts a drain back to N that costs, relative to staying at N,
  Delta(m) = C(m) - g * D(m). The truncated chain jumps straight to N and is charged the drain's
  cost C(m) and its duration D(m) as part of the transition. Because g enters only through
  D(m), the tail is an ordinary SMDP on 0..N with longer sojourns and larger costs, so policy
  iteration, value iteration and exact evaluation need no special treatment and no iteration on g.

Drain of m extra requests at net rate B/tau(B) - lambda, with delta = B - lambda*tau(B) (requests
removed per full batch), alpha = tau(B) / (2 lambda delta):

* D(m) = m tau(B) / delta, energy e(B) m / delta (m / delta full batches).
* ``"first-order"`` latency cost, the pure fluid drain:
  D(m) N / lambda + m^2 / (2 lambda (B/tau(B) - lambda)) = alpha (2 N m + m^2).
* ``"fluid"`` adds the second-order (diffusion) term: h(x) = alpha x^2 + beta x solves the Poisson
  equation of the full-batch walk x -> x - B + K exactly, and its latency part is the first-order
  cost plus m (E[S_B^2]/2 + alpha E[(K-B)^2]) / delta. The first-order drain ignores the variance of
  K; with variable service (CV 1-2) that makes its gain wrong by 10-40% at N = a few B and it needs
  thousands of states to settle. The corrected drain is still an approximation for B > 1 (the
  excursion is taken to end exactly at N): measured on the V100 profile, at N of about 3.4 B its
  gain is within 1e-12 for deterministic service, and within 5e-8 (B = 64) to 7e-6 (B = 128, where
  the policy still differs near N) for CV 1; each further 1.5x of N cut the error by 25x or more.
  The automatic truncation (``solver.smdp``) grows N until that settles. For B = 1 the walk is skip-free downwards, lands exactly
  on N, and this tail is exact (M/G/1) at every N.

Group arrivals (``solver.arrival_model.CompoundPoisson``): K is the compound count, a wait lasts
until the next group (mean G/lambda) and jumps by a whole group (landings above N take the same
excursion), and the fluid term uses Var K = lambda tau E[X^2]/E[X] + lambda^2 Var S. A serve's
latency cost is unchanged: E[A(t)] = lambda t whether requests come alone or in groups, so
E[integral of N(t)] over a service is n tau + lambda E[S^2]/2 either way.

The K pmf is kept on 0..L (L <= N, trimmed where every action's pmf is below 1e-20); whatever lies
beyond, in the window or above N, goes to the excursion through exact partial moments
E[K; K > t] and E[K^2; K > t] (the full moments are known in closed form), so no mass is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as sfft
from scipy import stats

from solver import arrival_model as am
from solver.model import BatchingModel, ModelError, ServiceProfile

TailKind = Literal["fluid", "first-order", "none"]
TAILS: tuple[str, ...] = ("fluid", "first-order", "none")
_PMF_FLOOR = 1e-20
EXPECTATION_CHUNKS = 8
"""Row chunks of the Hankel product in ``TruncatedSMDP.expected_next``."""
NEAR_CHUNK = 32
"""States per block of ``TruncatedSMDP.expected_next_near``."""
SPECTRAL_MIN_BAND = 384
"""The serve products of ``TruncatedSMDP.expected_next`` go through the FFT (``_Spectrum``) where the
K pmf window has at least this many entries (L + 1): the Hankel product's cost grows as N L B, the
FFT's as B nfft log nfft with nfft about N + L. Measured at B = 256, CV 1 (one thread): N = 872,
L = 872: 1.6 ms against 5.5 ms; N = 2133: 4.9 ms against 24-34 ms (docs/notes/issue-18.md)."""


def service_moments(profile: ServiceProfile) -> tuple[np.ndarray, np.ndarray]:
    """E[S_b] and E[S_b^2] for b = 1..B, from the law that also generates K.

    With empirical samples the sample moments are used, so that the cost of a batch and the
    arrivals during it come from the same distribution.
    """
    if profile.samples is not None:
        m1 = np.array([float(np.mean(s)) for s in profile.samples])
        m2 = np.array([float(np.mean(s * s)) for s in profile.samples])
        return m1, m2
    m1 = np.asarray(profile.mean_s, dtype=float)
    return m1, m1 * m1 * (1.0 + profile.cv**2)


PMF_ANCHOR_STEP = 16
"""``arrival_pmf_matrix`` takes scipy's value at every PMF_ANCHOR_STEP-th k and the ratio recurrence in between."""
_PMF_TINY = 1e-280
"""Below this an anchor may have lost relative precision (subnormal, or underflowed to 0): its block is scipy's."""


def _anchored_pmf(exact, ratio_rows, rows: int, kmax: int) -> np.ndarray:
    """A pmf on k = 0..kmax per row from exact values at every PMF_ANCHOR_STEP-th k and the ratios in between.

    ``exact(k, rows)`` gives the pmf at the (1-D) points k for the rows selected by the index array ``rows``
    (scipy); ``ratio_rows(k)`` gives p(k + 1) / p(k) for every row and each k (rows x k.size). Within a
    block of S = PMF_ANCHOR_STEP entries p(k0 + i) = p(k0) * ratio(k0) * ... * ratio(k0 + i - 1) (one
    cumulative product), so a value carries at most S - 1 multiplications of rounding on top of its
    anchor's: as accurate as scipy's own values (tests/test_solver.py compares both with a 45-digit
    reference) at 1/S of scipy's evaluations. A block whose anchor is below _PMF_TINY while the pmf
    still rises is scipy's (S >= 2).
    """
    S = PMF_ANCHOR_STEP
    blocks = kmax // S + 1
    width = blocks * S
    every = np.arange(rows)
    out = np.empty((rows, width))
    out[:, 1:] = ratio_rows(np.arange(width - 1, dtype=float))
    run = out.reshape(rows, blocks, S)
    anchors = exact(np.arange(blocks) * S, every)
    # a tiny anchor left of the mode (the pmf still rising: ratio > 1) may start a block that rises to
    # values that matter; right of the mode the block stays below its anchor
    rising = ~(anchors >= _PMF_TINY) & (run[:, :, 1] > 1.0)
    run[:, :, 0] = anchors
    np.cumprod(run, axis=2, out=run)
    row, block = np.nonzero(rising)
    if row.size:  # means in the hundreds and more: the far left tail underflows, take scipy's values
        for i in np.unique(row):
            sel = block[row == i]
            k = (sel[:, None] * S + np.arange(S)[None, :]).ravel()
            run[i, sel] = exact(k, np.array([i]))[0].reshape(sel.size, S)
    return out[:, : kmax + 1]


def arrival_pmf_matrix(profile: ServiceProfile, rate: float, kmax: int) -> np.ndarray:
    """P(K_b = k) for b = 1..B (rows) and k = 0..kmax (columns), vectorised over b.

    Same law as ``ServiceProfile.arrival_pmf``: Poisson for deterministic service, negative binomial
    for gamma service, a Poisson mixture over the samples for empirical service. Poisson and negative
    binomial rows come from scipy's values every PMF_ANCHOR_STEP-th k and the ratio recurrences
    p(k + 1) / p(k) = mu / (k + 1) and (k + r) q / (k + 1) (r = 1 / CV^2, q = 1 - p) in between
    (``_anchored_pmf``): scipy's pmf costs about 150 ns an entry, the largest part of a build at
    B = 128, CV 1, N = 856 before.
    """
    B = profile.max_batch
    if profile.samples is not None:
        return np.vstack([profile.arrival_pmf(b, rate, kmax) for b in range(1, B + 1)])
    t = np.asarray(profile.mean_s, dtype=float)
    c = np.asarray(profile.cv, dtype=float)
    out = np.empty((B, kmax + 1))
    det = c == 0
    if np.any(det):
        mu = rate * t[det]
        out[det] = _anchored_pmf(lambda k, i: stats.poisson.pmf(k[None, :], mu[i][:, None]),
                                 lambda k: mu[:, None] / (k + 1.0), mu.size, kmax)
    g = ~det
    if np.any(g):
        shape = 1.0 / (c[g] ** 2)
        p = 1.0 / (1.0 + rate * t[g] * c[g] ** 2)
        q = 1.0 - p
        out[g] = _anchored_pmf(lambda k, i: stats.nbinom.pmf(k[None, :], shape[i][:, None], p[i][:, None]),
                               lambda k: (k + shape[:, None]) * q[:, None] / (k + 1.0), shape.size, kmax)
    return out


def _counted(model: BatchingModel) -> am.Poisson | am.CompoundPoisson:
    """The model's arrivals, if this one-dimensional SMDP covers them (an MMPP needs ``solver.mmpp``)."""
    arrivals = model.arrivals
    if isinstance(arrivals, am.MMPP2):
        raise ModelError(f"the arrival model {arrivals.spec} needs the phase in the state: use solver.mmpp")
    return arrivals


@dataclass(frozen=True)
class TailCoefficients:
    """An excursion to N + m costs latency lin*m + quad*m^2, energy energy*m and lasts time*m.

    All in the units of the per-epoch costs: latency in s^2 (integral of N(t)/lambda), energy in J,
    time in s. Batches served during it: batches*m, all of size B.
    """

    lin: float
    quad: float
    energy: float
    time: float
    batches: float
    size: int = 0
    """Batch size served during the drain (B unless a policy's beyond-table rule says otherwise)."""


def tail_coefficients(
    model: BatchingModel, truncation: int, tail: str, drain_batch: int | None = None
) -> TailCoefficients:
    """Coefficients of the drain from N + m back to N while serving batches of ``drain_batch``
    (default B, full batches; see the module doc, with B read as the drain batch size)."""
    B = model.max_batch if drain_batch is None else int(drain_batch)
    if not 1 <= B <= model.max_batch:
        raise ModelError(f"drain batch size must be in 1..B={model.max_batch}, got {drain_batch!r}")
    if tail == "none":
        return TailCoefficients(0.0, 0.0, 0.0, 0.0, 0.0, B)
    lam = model.rate
    arrivals = _counted(model)
    m1, m2 = service_moments(model.profile)
    tau_b, s2_b = float(m1[B - 1]), float(m2[B - 1])
    delta = B - lam * tau_b
    if delta <= 0:  # the model refuses this for full batches; a smaller drain batch may hit it
        raise ModelError(f"batches of {B} drain nothing: {B} - lambda*tau({B}) = {delta!r} <= 0")
    alpha = tau_b / (2.0 * lam * delta)
    lin = 2.0 * alpha * truncation
    if tail == "fluid":
        # groups: Var K = lambda tau E[X^2]/E[X] + lambda^2 Var S (the ratio is 1 for Poisson)
        disp = arrivals.group_second_moment / arrivals.group_mean
        var_k = lam * tau_b * disp + lam * lam * (s2_b - tau_b * tau_b)
        lin += (0.5 * s2_b + alpha * (var_k + delta * delta)) / delta
    elif tail != "first-order":
        raise ModelError(f"tail must be one of {TAILS}, got {tail!r}")
    return TailCoefficients(
        lin=lin,
        quad=alpha,
        energy=float(model.profile.energy_j[B - 1]) / delta,
        time=tau_b / delta,
        batches=1.0 / delta,
        size=B,
    )


def _storage(M: np.ndarray) -> np.ndarray | None:
    """The contiguous array whose memory the view M lies in (following ``base``), or None."""
    root = M
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root if root.flags.c_contiguous or root.flags.f_contiguous else None


def _fill_serve_runs(M: np.ndarray, root: np.ndarray, a: np.ndarray, pmf: np.ndarray, N: int, L: int) -> None:
    """M[n, s : s + w] = pmf[a(n) - 1, :w], s = n - a(n), w = min(L, N - s) + 1, for every n with a(n) > 0.

    Consecutive states with the same action have windows that start one column further per row:
    in M's memory that is a 2-D strided array (row stride = M's row + column stride), so a run of
    them is written by one assignment, at the run's last (narrowest) width; the few entries the
    earlier rows of a run have past that width are written together at the end. An optimal policy
    changes its action every 5-10 states above B, so this replaces a Python step per state by one
    per run (122 runs for 857 states at B = 128, CV 1)."""
    P = np.nonzero(a > 0)[0]
    if P.size == 0:
        return
    ap = a[P]
    brk = np.nonzero((np.diff(P) != 1) | (np.diff(ap) != 0))[0]
    first = np.concatenate(([0], brk + 1))
    last = np.concatenate((brk, [P.size - 1]))
    s = P - ap
    w = np.minimum(L, N - s) + 1
    narrow = w[last]  # the widths shrink along a run once its windows reach N
    rs, cs = M.strides
    origin = M.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    for n0, n1, an, width in zip(P[first].tolist(), P[last].tolist(), ap[first].tolist(), narrow.tolist()):
        run = np.ndarray((n1 - n0 + 1, width), dtype=M.dtype, buffer=root, offset=origin + n0 * rs + (n0 - an) * cs,
                         strides=(rs + cs, cs))
        run[...] = pmf[an - 1, :width]
    extra = w - np.repeat(narrow, last - first + 1)
    if extra.any():
        k = np.repeat(w - extra, extra) + np.arange(int(extra.sum())) - np.repeat(np.cumsum(extra) - extra, extra)
        row = np.repeat(np.arange(P.size), extra)
        M[P[row], s[row] + k] = pmf[ap[row] - 1, k]


class _Spectrum:
    """The serve products of ``TruncatedSMDP.expected_next`` by FFT, for one truncated SMDP.

    E[h(s + K_a)] in the window is the correlation of h (zero past N) with the pmf of K_a, so for all
    B actions at once it is one real FFT of h, a product with the pmf rows' spectra (made once per SMDP)
    and B inverse FFTs of length nfft >= N + L + 1 (no wrap-around): B nfft log nfft work instead of the
    Hankel product's N L B. The rounding is relative to the largest terms: measured at B = 256, CV 1,
    N = 2133 with the optimal policy's h, at most 9e-16 absolute (|h| up to 0.27) and 4e-13 relative
    to the smallest products, far below the 1e-11 that ``solver.pi.improve`` treats as a tie.
    """

    __slots__ = ("nfft", "spectrum", "offset")

    def __init__(self, smdp: TruncatedSMDP) -> None:
        N, L = smdp.truncation, smdp.band
        self.nfft = sfft.next_fast_len(N + L + 1, real=True)
        self.spectrum = sfft.rfft(smdp.pmf[:, ::-1], n=self.nfft, axis=1)
        """(B, nfft // 2 + 1): the spectra of the reversed pmf rows."""
        self.spectrum.setflags(write=False)
        self.offset = L - 1
        """E[h(n - a + K_a)] is entry (a - 1, n - a + L) of the inverse transforms, at n + (a - 1)(nfft - 1)
        + L - 1 in their flat storage: a view with strides 1 (n) and nfft - 1 (a), no index array."""

    def served(self, h: np.ndarray, first: int) -> np.ndarray:
        """E[h(n - a + K_a)] over the landings in the window, n = first..N, a = 1..B: (N + 1 - first, B), a
        view of the inverse transforms (garbage where a > n, as in ``TruncatedSMDP.expected_next``)."""
        conv = self._transforms(h)
        B = conv.shape[0]
        item = conv.itemsize
        return np.lib.stride_tricks.as_strided(conv.ravel()[self.offset + first :], shape=(h.size - first, B),
                                               strides=(item, item * (self.nfft - 1)), writeable=False)

    def served_at(self, h: np.ndarray, n: np.ndarray, a: np.ndarray) -> np.ndarray:
        """``served``'s entries at the pairs (n, a), a >= 1 (the same values)."""
        return self._transforms(h).ravel()[n + (a - 1) * (self.nfft - 1) + self.offset]

    def _transforms(self, h: np.ndarray) -> np.ndarray:
        """(B, nfft): the convolutions of h with the reversed pmf rows."""
        return sfft.irfft(self.spectrum * sfft.rfft(h, n=self.nfft), n=self.nfft, axis=1)


@dataclass(frozen=True, eq=False)
class TruncatedSMDP:
    """Costs, sojourns and transitions of the SMDP on 0..N, per state n (rows) and action a (columns).

    Column a = 0 is "wait", a >= 1 "serve a"; ``valid`` masks the allowed pairs. Per pair the arrays
    already include the excursion (tail) charges, so cost/time/transition are those of an ordinary
    finite SMDP. Transitions of "serve a at n" are the K pmf shifted to start at n - a on 0..N plus
    ``tail_p`` (mass whose landing is above N, or beyond the pmf window) going to N.
    """

    model: BatchingModel
    truncation: int
    tail: str
    coeffs: TailCoefficients
    pmf: np.ndarray
    """(B, L+1): P(K_a = k), a = 1..B, k = 0..L."""
    pmf_t: np.ndarray
    """pmf transposed, C-contiguous: BLAS takes the Hankel product several times faster so."""
    valid: np.ndarray
    latency: np.ndarray
    """Expected integral of N(t)/lambda over the epoch, s^2."""
    energy: np.ndarray
    """Expected energy over the epoch, J."""
    time: np.ndarray
    """Expected epoch length, s."""
    tail_p: np.ndarray
    """Probability that the landing is above N (moved to N)."""
    tail_m: np.ndarray
    """E[(landing - N)^+]: requests drained by the excursion (0 for tail "none")."""
    cost: np.ndarray
    """latency + w * energy; +inf where invalid."""
    _gather: np.ndarray
    jump: np.ndarray | None = None
    """Group arrivals: P(X = x), x = 0..Lw, the jump of a wait (None: Poisson, a wait moves n to n + 1).
    A wait's landings above N go to N with the excursion charges (``tail_p``/``tail_m`` column 0)."""
    _spectra: list[_Spectrum] = field(default_factory=list, repr=False)
    """The pmf's spectrum for the FFT products, made on first use (at most one entry)."""

    @property
    def n_states(self) -> int:
        return self.truncation + 1

    @property
    def band(self) -> int:
        return self.pmf.shape[1] - 1

    def expected_next(self, h: np.ndarray, first: int = 0) -> np.ndarray:
        """E[h(next state)] for every (n, a), n = first..N, shape (N+1-first, B+1); garbage where invalid.

        The serve part is one Hankel-by-pmf product: row s of the sliding window of h holds
        h(s..s+L), so (window @ pmf.T)[s, a-1] is the in-window expectation after serving a down to s.
        From state ``first`` on only the rows s >= first - B are needed.
        """
        N = self.truncation
        L = self.band
        B = self.model.max_batch
        out = np.empty((N + 1 - first, B + 1))
        spectrum = self._spectrum()
        if spectrum is not None:
            out[:, 1:] = spectrum.served(h, first)
        else:
            lo = max(0, first - B)
            padded = np.zeros(N + 1 + L)
            padded[: N + 1] = h
            view = sliding_window_view(padded, L + 1)
            pv = np.empty((N + 1 - lo, B))
            # h is zero past N: rows s0.. need only the first N - s0 + 1 pmf entries. In row chunks,
            # each multiplied on its nonzero width only, the product skips most of the zero triangle
            # (about 40% of the work when the window spans 0..N, as it does for CV >= 1).
            chunk = max(64, (N + 1) // EXPECTATION_CHUNKS + 1)
            for s0 in range(lo, N + 1, chunk):
                s1 = min(s0 + chunk, N + 1)
                width = min(L, N - s0) + 1
                pv[s0 - lo : s1 - lo] = np.ascontiguousarray(view[s0:s1, :width]) @ self.pmf_t[:width]
            out[:, 1:] = pv.ravel()[self._gather[first:] - lo * B if lo else self._gather[first:]]
        out[:, 1:] += self.tail_p[first:, 1:] * h[N]
        out[:, 0] = self._expected_after_wait(h, first)
        return out

    def _spectrum(self) -> _Spectrum | None:
        """The FFT form of the serve products where it pays (``SPECTRAL_MIN_BAND``), else None."""
        if self.pmf.shape[1] < SPECTRAL_MIN_BAND:
            return None
        if not self._spectra:
            self._spectra.append(_Spectrum(self))
        return self._spectra[0]

    def _expected_after_wait(self, h: np.ndarray, first: int = 0) -> np.ndarray:
        """E[h(next state)] after waiting, n = first..N (the wait column of ``expected_next``)."""
        N = self.truncation
        if self.jump is None:  # one arrival
            return np.append(h[first + 1 :], h[N])
        lw = self.jump.size - 1
        up = np.zeros(N + 1 + lw)
        up[: N + 1] = h
        return sliding_window_view(up, lw + 1)[first:] @ self.jump + self.tail_p[first:, 0] * h[N]

    def expected_next_near(self, h: np.ndarray, actions: np.ndarray, width: int) -> np.ndarray:
        """``expected_next`` on the serve actions within ``width`` of ``actions[n]`` (and the wait),
        +inf elsewhere: shape (N+1, B+1), the same values as ``expected_next`` where computed.

        Policy iteration's intermediate improvements look only near the current actions (a rate or size
        step moves most batch sizes by one or two); the step that stops it looks at every action. Per
        chunk of NEAR_CHUNK states the product is taken on the actions the chunk's windows span and the
        rows s = n - a those reach: about (chunk + span) span instead of chunk B row-products.
        """
        N = self.truncation
        L = self.band
        B = self.model.max_batch
        a = np.asarray(actions, dtype=np.int64)
        n = np.arange(N + 1)
        lo = np.maximum(a - width, 1)
        hi = np.minimum(np.minimum(a + width, n), B)  # serve at most n, at most B
        spectrum = self._spectrum()
        if spectrum is not None:  # the FFT gives every action at once: read the window's pairs from it
            cols = lo[:, None] + np.arange(2 * width + 1)[None, :]
            keep = cols <= hi[:, None]
            rows = np.broadcast_to(n[:, None], cols.shape)[keep]
            cols = cols[keep]
            out = np.full((N + 1, B + 1), np.inf)
            out[rows, cols] = spectrum.served_at(h, rows, cols) + self.tail_p[rows, cols] * h[N]
            out[:, 0] = self._expected_after_wait(h)
            return out
        padded = np.zeros(N + 1 + L)
        padded[: N + 1] = h
        view = sliding_window_view(padded, L + 1)
        out = np.full((N + 1, B + 1), np.inf)
        hN = h[N]
        for n0 in range(0, N + 1, NEAR_CHUNK):
            n1 = min(n0 + NEAR_CHUNK, N + 1)
            span = hi[n0:n1] >= lo[n0:n1]
            if not span.any():
                continue
            c_lo = int(lo[n0:n1][span].min())
            c_hi = int(hi[n0:n1][span].max())
            s0 = max(n0 - c_hi, 0)
            s1 = n1 - c_lo  # rows s0..s1-1
            cols = np.arange(c_lo, c_hi + 1)
            w = min(L, N - s0) + 1
            pv = np.ascontiguousarray(view[s0:s1, :w]) @ self.pmf_t[:w, c_lo - 1 : c_hi]
            rows = n[n0:n1, None]
            keep = (cols >= lo[n0:n1, None]) & (cols <= hi[n0:n1, None])
            r = np.where(keep, rows - cols - s0, 0)
            e = pv[r, cols - c_lo] + self.tail_p[n0:n1, c_lo : c_hi + 1] * hN
            out[n0:n1, c_lo : c_hi + 1] = np.where(keep, e, np.inf)
        out[:, 0] = self._expected_after_wait(h)
        return out

    def _checked_actions(self, actions: np.ndarray) -> np.ndarray:
        N = self.truncation
        n = np.arange(N + 1)
        a = np.asarray(actions, dtype=np.int64)
        if a.shape != (N + 1,):
            raise ValueError(f"policy has {a.shape[0]} states, the truncation has {N + 1}")
        ok = np.where(a == 0, n < N, self.valid[n, np.clip(a, 0, self.model.max_batch)]) & (a >= 0) & (
            a <= self.model.max_batch
        )
        if not np.all(ok):
            i = int(np.argmax(~ok))
            raise ValueError(f"action a({i}) = {a[i]} is not allowed on 0..{N} (serve 1..min(n, B), wait below N)")
        return a

    def _policy_vectors(self, a: np.ndarray, n: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cost and sojourn of actions a at states n (default: a for every state)."""
        n = np.arange(self.n_states) if n is None else n
        return self.latency[n, a] + self.model.weight * self.energy[n, a], self.time[n, a]

    def policy_arrays(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense transition matrix, cost and sojourn vectors of a stationary policy on 0..N.

        Unlike the solver, a policy may wait at any n < N (for instance a threshold above B).
        """
        a = self._checked_actions(actions)
        P = np.zeros((self.n_states, self.n_states))
        self._fill_rows(P, a, 1.0)
        c, tau = self._policy_vectors(a)
        return P, c, tau

    def _fill_rows(self, M: np.ndarray, a: np.ndarray, sign: float, states: np.ndarray | None = None) -> None:
        """M[n, :] = sign * P[n, :] row by row (slice writes: no index arrays of size N * L); with
        ``states``, row k of M is state states[k] (and only those rows are written).

        Poisson arrivals: the serve rows' pmf windows are written first, for a whole policy by runs
        of states with the same action (``_fill_serve_runs``), else row by row; then the waits' single
        entries and the mass above N at column N for all rows at once. Each cell gets the same
        operations in the same order as a row-by-row fill, so the matrix is the same bit for bit."""
        N = self.truncation
        L = self.band
        pmf = -self.pmf if sign < 0 else self.pmf
        tail = self.tail_p
        rows = np.arange(N + 1) if states is None else np.asarray(states, dtype=np.int64)
        if self.jump is None:
            acts = np.asarray(a, dtype=np.int64)[rows]
            serve = acts > 0
            root = _storage(M) if states is None else None
            if root is not None:
                _fill_serve_runs(M, root, acts, pmf, N, L)
            else:
                for i, n, an in zip(np.nonzero(serve)[0].tolist(), rows[serve].tolist(), acts[serve].tolist()):
                    s = n - an
                    e = min(s + L, N)
                    M[i, s : e + 1] = pmf[an - 1, : e - s + 1]
            idx = np.arange(rows.size)
            wait = ~serve
            M[idx[wait], rows[wait] + 1] = sign
            M[idx[serve], N] += sign * tail[rows[serve], acts[serve]]
            return
        jump = sign * self.jump
        for i, n in enumerate(rows.tolist()):
            an = int(a[n])
            if an == 0:
                e = min(n + jump.size - 1, N)
                M[i, n : e + 1] += jump[: e - n + 1]
                M[i, N] += sign * tail[n, 0]
                continue
            s = n - an
            e = min(s + L, N)
            M[i, s : e + 1] = pmf[an - 1, : e - s + 1]
            if sign < 0:
                M[i, N] -= tail[n, an]
            else:
                M[i, N] += tail[n, an]

    def transition_matrix(self, actions: np.ndarray):
        """The policy's transition matrix as scipy.sparse CSR, entry for entry the dense one's.

        Row n holds the K pmf window of its action (length min(L, N - s) + 1 from s = n - a) and
        the mass above N added at column N; a wait row holds a single 1 at n + 1.
        """
        from scipy import sparse

        a = self._checked_actions(actions)
        if self.jump is not None:  # group jumps: rows of several entries for waits too
            P = np.zeros((self.n_states, self.n_states))
            self._fill_rows(P, a, 1.0)
            return sparse.csr_matrix(P)
        N = self.truncation
        L = self.band
        n = np.arange(N + 1)
        srv = a > 0
        s = np.where(srv, n - a, n + 1)
        e = np.where(srv, np.minimum(s + L, N), n + 1)
        win = e - s + 1
        extra = srv & (e < N)  # the tail mass needs its own entry at column N
        length = win + extra
        indptr = np.zeros(N + 2, dtype=np.int64)
        np.cumsum(length, out=indptr[1:])
        nnz = int(indptr[-1])
        idx_t = np.int32 if nnz < 2**31 and N < 2**31 else np.int64
        pos = np.arange(nnz, dtype=np.int64) - np.repeat(indptr[:-1], length)  # offset within the row
        row_s = np.repeat(s, length)
        indices = (row_s + pos).astype(idx_t)
        row_a = np.repeat(a, length)
        data = np.ones(nnz)
        in_win = pos < np.repeat(win, length)
        serve_win = in_win & (row_a > 0)
        data[serve_win] = self.pmf[row_a[serve_win] - 1, pos[serve_win]]
        last = indptr[1:] - 1
        tail = np.where(srv, self.tail_p[n, a], 0.0)
        has = srv & ~extra
        data[last[has]] += tail[has]
        indices[last[extra]] = N
        data[last[extra]] = tail[extra]
        return sparse.csr_matrix((data, indices, indptr.astype(idx_t)), shape=(N + 1, N + 1))

    def evaluation_system(self, actions: np.ndarray, sparse: bool = False):
        """(A, c, tau) of policy evaluation: A = I - P with its column 0 replaced by tau.

        Dense: one Fortran-ordered array built in place (LAPACK factors it without a copy), entry for
        entry what ``policy_arrays`` gives. Sparse: the same entries as scipy.sparse CSC.
        """
        a = self._checked_actions(actions)
        c, tau = self._policy_vectors(a)
        size = self.n_states
        if sparse:
            from scipy import sparse as sp

            P = self.transition_matrix(a)
            A = (sp.identity(size, format="csr") - P).tocsc()
            col0 = sp.csc_matrix((tau, (np.arange(size), np.zeros(size, dtype=np.int64))), shape=(size, 1))
            return sp.hstack([col0, A[:, 1:]], format="csc"), c, tau
        A = np.zeros((size, size), order="F")
        self._fill_rows(A, a, -1.0)
        A[np.diag_indices_from(A)] += 1.0
        A[:, 0] = tau
        return A, c, tau

    def hessenberg_system(
        self, actions: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(M, c, tau): the evaluation system with the unknowns ordered (h(1..N), g).

        The same equations as ``evaluation_system``, with its column 0 (tau, the column of g) moved
        to the end. Row n of I - P is zero left of column n - B (a batch removes at most B), so M is
        zero below its (B + 1)-th subdiagonal: banded below, full above (``solver.pi`` factors it
        with LAPACK's banded LU). Built in place: in a new Fortran-ordered array, or in ``out``, a
        zeroed (N + 1) x (N + 2) array whose column 0 is scratch (M is ``out[:, 1:]``; the solver
        passes a view into LAPACK's band storage).
        """
        a = self._checked_actions(actions)
        c, tau = self._policy_vectors(a)
        size = self.n_states
        buf = np.zeros((size, size + 1), order="F") if out is None else out
        if buf.shape != (size, size + 1):
            raise ValueError(f"out must be {size} x {size + 1}, got {buf.shape}")
        A = buf[:, :size]
        self._fill_rows(A, a, -1.0)
        A[np.diag_indices_from(A)] += 1.0
        buf[:, size] = tau
        return buf[:, 1:], c, tau

    def hessenberg_rows(self, actions: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``states`` of ``hessenberg_system(actions)``'s M and c (a low-rank update's rows)."""
        a = self._checked_actions(actions)
        states = np.asarray(states, dtype=np.int64)
        size = self.n_states
        buf = np.zeros((states.size, size + 1))
        self._fill_rows(buf, a, -1.0, states)
        buf[np.arange(states.size), states] += 1.0
        c, tau = self._policy_vectors(a[states], states)
        buf[:, size] = tau
        return buf[:, 1:], c


def _in_window(sums: np.ndarray, N: int, L: int, start: np.ndarray) -> np.ndarray:
    """sums[a - 1, min(L, N - s)] for n = 0..N (rows) and a = 1..B (columns), s = ``start`` (n, a): a
    prefix sum over the K pmf at a serve pair's last in-window landing.

    On the rows n >= B (every a <= n, so the column N - n + a is at most N <= kmax) read through a
    strided view of the C-ordered (B, kmax + 1) sums: entry (n, a) is one step back per n and kmax + 2
    steps per a in memory, so no index array is built or read (about 6x faster than the gather at
    B = 256, N = 2133); where the pmf window L is shorter than N, the pairs whose landings pass it read
    column L instead. The rows n < B by a gather. The same values as one gather.
    """
    B, width = sums.shape
    low = min(B, N + 1)
    columns = width * np.arange(B)[None, :]
    if not sums.flags.c_contiguous:
        return np.take(sums, np.minimum(L, N - start) + columns)
    out = np.empty((N + 1, B))
    out[:low] = np.take(sums, np.minimum(L, N - start[:low]) + columns)
    if N + 1 > low:
        flat = sums.reshape(-1)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[N + 1 - B :], shape=(N + 1 - B, B),
                                               strides=(-item, (width + 1) * item), writeable=False)
        if L >= N:
            out[low:] = view
        else:
            np.copyto(out[low:], np.where(N - start[low:] > L, sums[:, L], view))
    return out


def build(
    model: BatchingModel,
    truncation: int,
    tail: str = "fluid",
    drain_batch: int | None = None,
    counts: ArrivalCounts | np.ndarray | None = None,
    pairs: PairArrays | None = None,
) -> TruncatedSMDP:
    """Precompute every per-(state, action) quantity of the SMDP truncated at N = ``truncation``.

    ``drain_batch``: the batch size served above N (default B); exact evaluation of a table whose
    beyond-table rule serves less (a static b0) passes it, the solver never does.
    ``counts``: P(K_b = k) for b = 1..B, k = 0..kmax with kmax >= N, as ``count_arrivals`` gives it
    (its first N + 1 columns are this truncation's, entry for entry), or a plain B x (kmax + 1)
    array; computed here when None. The automatic truncation computes it once for several sizes,
    with its prefix sums (``ArrivalCounts``: each size's sums are their first columns, bit for bit).
    ``pairs``: the arrays that do not depend on N, for this model on at least 0..N (``PairArrays``;
    each size's are their first N + 1 rows, bit for bit); computed here when None.
    """
    if tail not in TAILS:
        raise ModelError(f"tail must be one of {TAILS}, got {tail!r}")
    B = model.max_batch
    if isinstance(truncation, bool) or not isinstance(truncation, (int, np.integer)):
        raise ModelError(f"truncation must be an integer >= B = {B}, got {truncation!r}")
    N = int(truncation)
    if N < B:
        raise ModelError(f"truncation N = {N} must be >= max_batch B = {B} (waiting is not allowed at n >= B)")
    lam, w = model.rate, model.weight
    m1, m2 = service_moments(model.profile)
    energy_b = np.asarray(model.profile.energy_j, dtype=float)
    coeffs = tail_coefficients(model, N, tail, drain_batch)

    arrivals = _counted(model)
    if counts is None:
        counts = count_arrivals(model, N)
    elif not isinstance(counts, ArrivalCounts):
        counts = ArrivalCounts(np.asarray(counts, dtype=float))
    if counts.pmf.shape[0] != B or counts.kmax < N:
        raise ModelError(f"counts must be B x (kmax + 1) with kmax >= N = {N}, got shape {counts.pmf.shape}")
    alive = np.nonzero(counts.column_max[: N + 1] > _PMF_FLOOR)[0]
    L = int(alive[-1]) if alive.size else 0
    pmf = np.ascontiguousarray(counts.pmf[:, : L + 1])
    c0, c1, c2 = counts.c0, counts.c1, counts.c2  # prefix sums over k = 0..kmax; columns 0..L are used
    mean_k, sq_k = am.count_moments(arrivals, lam, m1, m2)

    # (N + 1, B) arrays of the serve pairs (n, a = 1..B), from a column of n and a row of a
    if pairs is None:
        pairs = PairArrays(model, N)
    elif pairs.model is not model or pairs.nmax < N:
        raise ModelError(f"pairs must be this model's on 0..nmax with nmax >= N = {N}, got nmax = {pairs.nmax}")
    n = np.arange(N + 1)
    valid = pairs.valid[: N + 1]
    low = min(B, N + 1)  # only rows n < B hold pairs with a > n

    # Serve a at n: in-window landings s + k, k <= t = min(L, N - s); everything else is tail.
    s = pairs.start[: N + 1]
    latency = np.empty((N + 1, B + 1))
    energy = np.empty((N + 1, B + 1))
    time = np.empty((N + 1, B + 1))
    tp = np.empty((N + 1, B + 1))
    tm = np.empty((N + 1, B + 1))
    # the (N + 1, B) serve arrays are written in place, each operation the one of the plain
    # expressions (tail_p = max(1 - P(K <= t), 0), em = max(e1 + r tail_p, 0), em2 = max(e2 +
    # 2 r e1 + r r tail_p, 0), then the costs), so the arrays are the same bit for bit with fewer
    # temporaries of this size (about 4.4 MB each at B = 256, N = 2133)
    tail_p = tp[:, 1:]
    np.subtract(1.0, _in_window(c0, N, L, s), out=tail_p)
    np.maximum(tail_p, 0.0, out=tail_p)
    e1 = np.subtract(mean_k, _in_window(c1, N, L, s))
    np.maximum(e1, 0.0, out=e1)
    e2 = np.subtract(sq_k, _in_window(c2, N, L, s))
    np.maximum(e2, 0.0, out=e2)
    r = (s - N).astype(float)
    em = np.multiply(r, tail_p)
    em += e1
    np.maximum(em, 0.0, out=em)
    em2 = np.multiply(2.0, r)
    em2 *= e1
    em2 += e2
    del e1, e2
    r *= r
    r *= tail_p
    em2 += r
    np.maximum(em2, 0.0, out=em2)
    del r
    # a wait lasts until the next arrival epoch: 1/lambda, or G/lambda for groups of mean G
    g_mean = arrivals.group_mean
    latency[:, 0] = n * g_mean / lam**2
    energy[:, 0] = model.idle_power_w * g_mean / lam
    time[:, 0] = g_mean / lam
    tp[:, 0] = 0.0
    tm[:, 0] = 0.0
    serve = latency[:, 1:]
    np.multiply(coeffs.lin, em, out=serve)
    serve += pairs.service_latency[: N + 1]
    em2 *= coeffs.quad
    serve += em2
    del em2
    serve = energy[:, 1:]
    np.multiply(coeffs.energy, em, out=serve)
    serve += energy_b
    serve = time[:, 1:]
    np.multiply(coeffs.time, em, out=serve)
    serve += m1
    tm[:, 1:] = em if tail != "none" else 0.0
    del em
    jump = None
    if isinstance(arrivals, am.CompoundPoisson):
        jump = am.jump_pmf(arrivals, N)
        wp, wm, wm2 = am.jump_tail(arrivals, n, N)
        wp[N], wm[N], wm2[N] = 1.0, 0.0, 0.0  # never waits at N (a wait there is refused)
        latency[:, 0] += coeffs.lin * wm + coeffs.quad * wm2
        energy[:, 0] += coeffs.energy * wm
        time[:, 0] += coeffs.time * wm
        tp[:, 0] = wp
        tm[:, 0] = wm if tail != "none" else 0.0
    # Serve pairs with a > n (rows n < B only) are meaningless: zero them (time 1 keeps ratios
    # finite). The wait column stays defined at every n, because evaluation accepts tables that wait
    # at n >= B (a threshold above B) even though the solver never considers it.
    invalid = ~valid[:low, 1:]
    for arr in (latency, energy, time, tp, tm):
        arr[:low, 1:][invalid] = 0.0
    time[:low, 1:][invalid] = 1.0
    cost = latency + w * energy
    cost[:, 0][~valid[:, 0]] = np.inf
    cost[:low, 1:][invalid] = np.inf
    gather = pairs.gather[: N + 1]
    pmf_t = counts.transposed(L)
    out = TruncatedSMDP(model, N, tail, coeffs, pmf, pmf_t, valid, latency, energy, time, tp, tm, cost, gather, jump)
    for arr in (pmf, pmf_t, valid, latency, energy, time, tp, tm, cost, gather):
        arr.setflags(write=False)
    if jump is not None:
        jump.setflags(write=False)
    return out


class PairArrays:
    """The per-(state, action) arrays of ``build`` that do not depend on N, on states 0..nmax.

    ``valid`` (the allowed pairs), ``start`` (s = max(n - a, 0), where a batch of a leaves n),
    ``gather`` (s B + a - 1, the serve products' index) and ``service_latency`` ((n E[S_a] +
    lambda E[S_a^2] / 2) / lambda, the latency of serving a at n without the excursion), computed once
    and shared by the sizes of an automatic search: each size's are their first N + 1 rows.
    """

    __slots__ = ("model", "nmax", "valid", "start", "gather", "service_latency")

    def __init__(self, model: BatchingModel, nmax: int) -> None:
        B = model.max_batch
        self.model = model
        self.nmax = int(nmax)
        n = np.arange(self.nmax + 1)
        col = n[:, None]
        row = np.arange(1, B + 1)[None, :]
        self.valid = np.zeros((self.nmax + 1, B + 1), dtype=bool)
        self.valid[:, 0] = n < B
        self.valid[0, 0] = True
        self.valid[:, 1:] = row <= col
        self.start = np.maximum(col - row, 0)
        self.gather = self.start * B + (row - 1)
        m1, m2 = service_moments(model.profile)
        lam = model.rate
        self.service_latency = (col * m1 + lam * m2 / 2.0) / lam
        for arr in (self.valid, self.start, self.gather, self.service_latency):
            arr.setflags(write=False)


class ArrivalCounts:
    """P(K_b = k), b = 1..B (rows), k = 0..kmax, with what ``build`` derives from it for any N <= kmax.

    The prefix sums over k of the pmf, k pmf and k^2 pmf (one ``cumsum`` each: the first L + 1
    columns are those of the pmf cut at L, bit for bit), the largest entry per k (where the pmf is
    alive) and the pmf transposed (C-contiguous, for the Hankel products: its first L + 1 rows are a
    contiguous slice). Computed once and shared by the sizes of an automatic search.
    """

    __slots__ = ("pmf", "kmax", "c0", "c1", "c2", "column_max", "_transposed")

    def __init__(self, pmf: np.ndarray) -> None:
        if pmf.ndim != 2 or pmf.shape[1] < 1:
            raise ModelError(f"counts must be B x (kmax + 1), got shape {pmf.shape}")
        self.pmf = np.ascontiguousarray(pmf, dtype=float)
        self.kmax = self.pmf.shape[1] - 1
        k = np.arange(self.kmax + 1, dtype=float)
        self.c0 = np.cumsum(self.pmf, axis=1)
        self.c1 = np.cumsum(self.pmf * k, axis=1)
        self.c2 = np.cumsum(self.pmf * k * k, axis=1)
        self.column_max = self.pmf.max(axis=0)
        self._transposed: np.ndarray | None = None
        for arr in (self.pmf, self.c0, self.c1, self.c2, self.column_max):
            arr.setflags(write=False)

    def transposed(self, L: int) -> np.ndarray:
        """pmf[:, : L + 1].T, C-contiguous (a view of one shared transposed copy)."""
        if self._transposed is None:
            self._transposed = np.ascontiguousarray(self.pmf.T)
            self._transposed.setflags(write=False)
        return self._transposed[: L + 1]


def count_arrivals(model: BatchingModel, kmax: int) -> ArrivalCounts:
    """P(K_b = k), b = 1..B (rows), k = 0..kmax: the arrivals during a batch of b, for ``build``."""
    return ArrivalCounts(am.count_pmf_matrix(model.profile, _counted(model), model.rate, int(kmax), arrival_pmf_matrix))


def initial_truncation(model: BatchingModel) -> int:
    """The first N of the automatic search: past B by what one full batch brings in, plus margin.

    The policy of interest lives below about B (far above it, serving full batches is the only
    sensible action) and one full-batch epoch adds about lambda*tau(B) +- a few standard deviations.
    With the fluid tail and deterministic service this size is usually already settled and the search
    confirms it with one warm solve at 1.5 times the size; with CV 1-2 it takes two or three growth
    steps (module docstring). Either way it pays to start small.
    """
    B = model.max_batch
    m1, m2 = service_moments(model.profile)
    lam = model.rate
    arrivals = _counted(model)
    disp = arrivals.group_second_moment / arrivals.group_mean
    mean_k = lam * m1[B - 1]
    sd_k = math.sqrt(lam * m1[B - 1] * disp + lam * lam * max(m2[B - 1] - m1[B - 1] ** 2, 0.0))
    return int(max(B + math.ceil(mean_k + 3.0 * sd_k), math.ceil(1.25 * B), 16))
