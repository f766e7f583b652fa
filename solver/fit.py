"""Fit an arrival model to arrival times: Poisson, compound Poisson (groups) or a two-phase MMPP.

* Groups: arrivals closer than ``group_window_s`` to the previous one join its group (a fan-out,
  or a trace recorded in ticks). The compound-Poisson fit is the group rate, the mean group size G
  (with its normal-approximation 95% CI) and the empirical group-size law.
* MMPP: Baum-Welch on the request counts in bins of ``bin_s`` (a two-state hidden Markov chain with
  Poisson emissions); the bin transition matrix P = Pi + exp(-s bin)(I - Pi) gives the switching
  rates exactly for a chain that switches at most rarely within a bin (the bin is shrunk until the
  fitted switching is below 5% per bin). 95% CIs from the expected complete-data information (time
  spent in each phase for a rate, expected switches for a switching rate): a little narrow, since
  they ignore the uncertainty about the hidden path.
* Batch MMPP: both at once (a trace clumped in instants *and* modulated in rate): the MMPP fitted
  to the group instants, each phase's group-size law weighted by the smoothed phase posterior.
* Which model: the index of dispersion of the counts, Var N(t) / E N(t), over several windows t
  is computed for the trace and predicted by each model (Poisson 1; compound Poisson E[X^2]/E[X] at
  every t; the MMPP rising from 1 with t). The chosen model is the one whose curve is closest in
  mean squared log ratio, the simplest (Poisson, groups, MMPP, batch MMPP) when it is within
  ``MISFIT_TOLERANCE`` of the closest; more phases only where they halve the misfit (``PHASE_GAIN``);
  a model without groups only where it accounts for the requests that arrive within the group window
  (``groups_explained``). The table of all is part of the fit, as are the interarrival CVs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from solver.arrival_model import MAX_PHASES, MMPP2, POISSON, ArrivalModel, CompoundPoisson, Poisson
from solver.errors import ModelError

WINDOWS_IN_MEAN_GAPS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
"""Windows of the dispersion table, in units of the mean interarrival time: half decades, so that the
curve is sampled evenly in log t from a request gap up to the longest window the trace measures
(``MIN_WINDOWS`` of them). A modulated queue's W is decided at the long end, where the queue builds
over a burst and drains after it (for a one-minute trace at 150 req/s a decade grid held a single
measurable window above 10 gaps)."""

MIN_WINDOWS = 10
"""A window is used only where the trace holds at least this many of it (fewer give no variance)."""


MAX_FIT_PHASES = 4
"""``fit_arrivals`` tries MMPPs with 2..this many phases."""

MISFIT_TOLERANCE = 0.01
"""A simpler model is chosen over a closer one unless the closer one's misfit is lower by more than
this (a mean squared log ratio: about 10% RMS between the dispersion curves)."""

CLEAR_PHASE = 0.9
"""The batch MMPP's group-size law of a phase is taken from groups whose bin is in it with at least
this posterior probability."""

MAX_BINS = 5_000
"""The default MMPP bin is 2 mean gaps, widened to keep at most this many bins (EM is O(bins) per step)."""
MAX_BINS_REFINED = 20_000
"""Bins are halved while the fitted switching is fast, up to this many."""


@dataclass(frozen=True)
class CompoundFit:
    model: CompoundPoisson
    rate: float
    group_rate: float
    groups: int
    mean_group_ci95: float
    """Half-width of the 95% CI of G."""


@dataclass(frozen=True)
class MMPPFit:
    model: MMPP2
    rates_ci95: tuple[float, ...]
    switching_ci95: tuple[float, ...]
    """Per off-diagonal generator entry, row by row (as ``MMPP.switching``)."""
    bin_s: float
    iterations: int
    log_likelihood: float


@dataclass(frozen=True)
class ArrivalFit:
    chosen: ArrivalModel
    rate: float
    requests: int
    span_s: float
    group_window_s: float
    compound: CompoundFit
    mmpp: MMPPFit | None
    batch_mmpp: MMPPFit | None
    """The MMPP of the group instants with a group-size law per phase (None without groups)."""
    windows_s: tuple[float, ...]
    dispersion: dict[str, tuple[float, ...]]
    """Index of dispersion per window: "trace" and each candidate model."""
    interarrival_cv: dict[str, float]
    misfit: dict[str, float]
    """Mean squared log ratio of each model's dispersion curve to the trace's (smaller is closer)."""
    more_phases: dict[str, MMPPFit] = field(default_factory=dict)
    """The fits with 3..max_phases phases: "mmpp3", "batch_mmpp3", ... (those that converged)."""
    ungrouped: tuple[str, ...] = ()
    """Models without groups that cannot produce the trace's groups (``groups_explained``): not chosen."""

    def to_dict(self) -> dict:
        c = self.compound
        out = {
            "chosen": self.chosen.to_dict(),
            "spec": self.chosen.spec,
            "rate": self.rate,
            "requests": self.requests,
            "span_s": self.span_s,
            "group_window_s": self.group_window_s,
            "compound": {**c.model.to_dict(), "rate": c.rate, "group_rate": c.group_rate, "groups": c.groups,
                         "mean_group_ci95": c.mean_group_ci95},
            "mmpp": None,
            "windows_s": list(self.windows_s),
            "index_of_dispersion": {k: list(v) for k, v in self.dispersion.items()},
            "interarrival_cv": self.interarrival_cv,
            "misfit": self.misfit,
            "ungrouped": list(self.ungrouped),
        }
        for key, m in (("mmpp", self.mmpp), ("batch_mmpp", self.batch_mmpp), *self.more_phases.items()):
            out[key] = None if m is None else {
                **m.model.to_dict(), "rates_ci95": list(m.rates_ci95), "switching_ci95": list(m.switching_ci95),
                "bin_s": m.bin_s, "iterations": m.iterations, "log_likelihood": m.log_likelihood}
        return out


def _times(times: np.ndarray) -> np.ndarray:
    t = np.asarray(times, dtype=float)
    if t.ndim != 1 or t.size < 20:
        raise ModelError(f"fitting needs at least 20 arrival times, got {t.size}")
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0):
        raise ModelError("arrival times must be finite and sorted")
    if t[-1] <= t[0]:
        raise ModelError("arrival times span no time")
    return t - t[0]


def group_sizes(times: np.ndarray, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(group start times, group sizes): an arrival within ``window_s`` of the previous one joins its group."""
    t = np.asarray(times, dtype=float)
    new = np.concatenate(([True], np.diff(t) > window_s))
    starts = np.nonzero(new)[0]
    sizes = np.diff(np.append(starts, t.size))
    return t[starts], sizes


def fit_compound(times: np.ndarray, window_s: float) -> CompoundFit:
    t = _times(times)
    epochs, sizes = group_sizes(t, window_s)
    span = float(t[-1])
    g = float(sizes.mean())
    half = 1.96 * float(sizes.std(ddof=1)) / math.sqrt(sizes.size) if sizes.size > 1 else math.inf
    pmf = np.bincount(sizes).astype(float)
    model = CompoundPoisson.empirical(pmf) if g > 1.0 else CompoundPoisson(1.0)
    return CompoundFit(model, (t.size - 1) / span, (sizes.size - 1) / span, int(sizes.size), half)


def _poisson_logpmf(c: np.ndarray, mu: float) -> np.ndarray:
    from scipy.special import gammaln

    mu = max(mu, 1e-300)
    return c * math.log(mu) - mu - gammaln(c + 1.0)


def _scan(mats: np.ndarray, later_left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Running products of a sequence of m x m matrices, each scaled to entries summing to 1, with their log scales.

    later_left False: out[k] = M_0 M_1 ... M_k; True: out[k] = M_k ... M_1 M_0. Hillis-Steele scan:
    log2(T) batched matrix products instead of T sequential steps (numpy, no Python loop over bins).
    """
    c = mats.copy()
    n = c.shape[0]
    ones = np.ones(c.shape[1] * c.shape[2])
    top = c.reshape(n, -1) @ ones
    top[top <= 0] = 1.0
    c /= top[:, None, None]
    logs = np.log(top)
    d = 1
    while d < n:
        prod = np.matmul(c[d:], c[:-d]) if later_left else np.matmul(c[:-d], c[d:])
        top = prod.reshape(n - d, -1) @ ones
        top[top <= 0] = 1.0
        prod /= top[:, None, None]
        logs[d:] = logs[:-d] + logs[d:] + np.log(top)  # the right side is read before the write
        c[d:] = prod
        d *= 2
    return c, logs


def _initial_rates(c: np.ndarray, m: int, bin_s: float, top_share: float | None = None) -> np.ndarray:
    """Starting rates, busiest first: the means of the sorted bins split in m equal parts, or (with
    ``top_share``) the busiest ``top_share`` of the bins first and the rest in equal parts (a start
    that sees short bursts)."""
    if m == 2:  # as the two-phase fit always started
        hi = c > np.median(c)
        lam = np.array([max(c[hi].mean() if hi.any() else c.mean() * 1.5, 1e-9),
                        max(c[~hi].mean() if (~hi).any() else c.mean() * 0.5, 1e-9)]) / bin_s
        if lam[0] <= lam[1]:
            lam = np.array([c.mean() * 1.5, c.mean() * 0.5]) / bin_s + 1e-9
        return lam
    order = np.sort(c)[::-1]
    if top_share is None:
        parts = np.array_split(order, m)  # the busiest bins first, the quietest last
    else:
        k = max(1, int(round(top_share * order.size)))
        parts = [order[:k], *np.array_split(order[k:], m - 1)]
    lam = np.array([max(float(p.mean()) if p.size else 0.0, 1e-9) for p in parts]) / bin_s
    spread = c.mean() / bin_s * np.linspace(1.5, 0.5, m)
    return np.where(np.diff(np.append(lam, -1.0)) < 0, lam, spread) + 1e-9 * np.arange(m, 0, -1)


TOP_SHARES = (None, 0.02)
"""EM starts for three or more phases (``_initial_rates``): the fit with the higher likelihood is kept."""


def _baum_welch(counts: np.ndarray, bin_s: float, iters: int, tol: float = 1e-6, phases: int = 2):
    """``_baum_welch_from`` over the starts (one for two phases, as always; ``TOP_SHARES`` for more)."""
    if phases == 2:
        return _baum_welch_from(counts, bin_s, iters, tol, 2, None)
    fits = [_baum_welch_from(counts, bin_s, iters, tol, phases, share) for share in TOP_SHARES]
    return max(fits, key=lambda f: f[4])


def _baum_welch_from(counts: np.ndarray, bin_s: float, iters: int, tol: float, phases: int,
                     top_share: float | None):
    """m-state Poisson HMM on bin counts: (rates, P, gamma sums, xi sums, loglik, iterations, gamma).

    Forward and backward passes as scans of the matrices P diag(b_k) (``_scan``): vectorised over the
    bins; each alpha_k, beta_k is normalised, so gamma and xi are the smoothed posteriors exactly."""
    from scipy.special import gammaln

    c = counts.astype(float)
    m = int(phases)
    lam = _initial_rates(c, m, bin_s, top_share)
    P = np.full((m, m), 0.05 / (m - 1))
    np.fill_diagonal(P, 0.95)
    start = np.full(m, 1.0 / m)
    prev = -math.inf
    T = c.size
    it = 0
    ll = -math.inf
    lg = gammaln(c + 1.0)
    gamma = np.full((T, m), 1.0 / m)
    gs = gamma.sum(axis=0)
    xis = np.zeros((m, m))
    for it in range(1, iters + 1):
        mu = np.maximum(lam * bin_s, 1e-300)
        logb = c[:, None] * np.log(mu)[None, :] - mu[None, :] - lg[:, None]
        mx = logb.max(axis=1, keepdims=True)
        b = np.exp(logb - mx)
        a0 = start * b[0]
        s0 = float(a0.sum())
        mats = P[None, :, :] * b[1:, None, :]  # M_k = P diag(b_k), k = 1..T - 1
        alpha = np.empty((T, m))
        alpha[0] = a0 / s0
        beta = np.ones((T, m))
        ll = math.log(s0) + float(np.sum(mx))
        if T > 1:
            fwd, flog = _scan(mats, later_left=False)
            al = np.einsum("i,kij->kj", alpha[0], fwd)
            tot = al.sum(axis=1)
            alpha[1:] = al / tot[:, None]
            ll += math.log(float(tot[-1])) + float(flog[-1])
            bwd, _ = _scan(mats[::-1], later_left=True)  # bwd[j] = M_{T-1-j} ... M_{T-1}
            be = bwd.sum(axis=2)[::-1]  # beta_k for k = 0..T - 2: M_{k+1} ... M_{T-1} 1
            beta[:-1] = be / be.max(axis=1, keepdims=True)
        gamma = alpha * beta
        gamma /= gamma.sum(axis=1, keepdims=True)
        xi = alpha[:-1, :, None] * P[None] * (b[1:] * beta[1:])[:, None, :]
        xi /= xi.sum(axis=(1, 2), keepdims=True)
        xis = xi.sum(axis=0)
        gs = gamma.sum(axis=0)
        lam = np.maximum((gamma * c[:, None]).sum(axis=0) / (gs * bin_s), 1e-12)
        P = xis / np.maximum(xis.sum(axis=1, keepdims=True), 1e-300)
        P = np.where(xis.sum(axis=1, keepdims=True) > 0, P, np.eye(m))
        start = gamma[0]
        if abs(ll - prev) <= tol * abs(ll):
            break
        prev = ll
    return lam, P, gs, xis, ll, it, gamma


def fit_mmpp(times: np.ndarray, bin_s: float | None = None, iters: int = 60, phases: int = 2) -> MMPPFit:
    return _fit_mmpp(times, bin_s, iters, phases)[0]


def fit_batch_mmpp(times: np.ndarray, window_s: float, bin_s: float | None = None, iters: int = 60,
                   phases: int = 2) -> MMPPFit:
    """A batch MMPP: the MMPP fitted to the group instants (arrivals within ``window_s`` of the
    previous one join its group), then each phase's group-size law weighted by the posterior
    probability of that phase in the group's bin (the E-step's smoothed phase)."""
    t = _times(times)
    epochs, sizes = group_sizes(t, window_s)
    if sizes.max() <= 1:
        raise ModelError("no groups in these arrival times: the batch MMPP is the plain MMPP")
    fit, gamma, width = _fit_mmpp(epochs, bin_s, iters, phases)
    post = gamma[np.minimum((epochs // width).astype(np.int64), gamma.shape[0] - 1)]  # [group, phase]
    # groups in bins whose phase is clear: near a switch the posterior would lend each phase the
    # other's sizes (a bias no CI shows); all groups when too few bins are clear
    clear = post.max(axis=1) >= CLEAR_PHASE
    laws, half = [], []
    for i in range(phases):
        w = post[:, i] * clear if (post[:, i] * clear).sum() >= 30 else post[:, i]
        if w.sum() <= 0:
            laws.append(CompoundPoisson(1.0))
            half.append(0.0)
            continue
        pmf = np.bincount(sizes, weights=w).astype(float)
        pmf[0] = 0.0
        laws.append(CompoundPoisson.empirical(pmf) if pmf[2:].sum() > 0 else CompoundPoisson(1.0))
        mean = float(np.average(sizes, weights=w))
        sd = math.sqrt(float(np.average((sizes - mean) ** 2, weights=w)))
        n_eff = float(w.sum()) ** 2 / float((w * w).sum())
        half.append(1.96 * sd / math.sqrt(n_eff))
    g = np.array([law.group_mean for law in laws])
    er = fit.model.rates
    model = MMPP2(tuple(er[i] * g[i] for i in range(phases)), fit.model.switching, tuple(laws))
    # the request rate is (group rate) x G: both uncertainties, to first order
    rci = tuple(fit.rates_ci95[i] * g[i] + er[i] * half[i] for i in range(phases))
    return MMPPFit(model, rci, fit.switching_ci95, fit.bin_s, fit.iterations, fit.log_likelihood)


def _generator(P: np.ndarray, width: float) -> np.ndarray:
    """The generator Q with expm(Q width) = P (the bins' transition matrix), or ModelError.

    Two phases: the closed form (P = Pi + exp(-s width)(I - Pi)). More: the principal matrix
    logarithm, negative off-diagonal rates (P not exactly embeddable) clipped to 0."""
    m = P.shape[0]
    if m == 2:
        stay = 1.0 - P[0, 1] - P[1, 0]
        if stay <= 0:
            raise ModelError("the MMPP fit found no persistent phases (switching faster than the bins)")
        s = -math.log(stay) / width
        tot = P[0, 1] + P[1, 0]
        return np.array([[-P[0, 1] / tot * s, P[0, 1] / tot * s], [P[1, 0] / tot * s, -P[1, 0] / tot * s]])
    from scipy import linalg

    if np.min(np.real(np.linalg.eigvals(P))) <= 0:
        raise ModelError("the MMPP fit found no persistent phases (switching faster than the bins)")
    q = np.real(linalg.logm(P)) / width
    off = ~np.eye(m, dtype=bool)
    q[off] = np.clip(q[off], 0.0, None)
    np.fill_diagonal(q, 0.0)
    np.fill_diagonal(q, -q.sum(axis=1))
    return q


def _fit_mmpp(times: np.ndarray, bin_s: float | None, iters: int,
              phases: int = 2) -> tuple[MMPPFit, np.ndarray, float]:
    """The fit, the smoothed phase posterior per bin (columns in the fit's phase order) and the bin width."""
    t = _times(times)
    rate = (t.size - 1) / float(t[-1])
    span = float(t[-1])
    m = int(phases)
    if m < 2 or m > MAX_PHASES:
        raise ModelError(f"an MMPP fit needs 2..{MAX_PHASES} phases, got {phases!r}")
    width = max(2.0 / rate, span / MAX_BINS) if bin_s is None else float(bin_s)
    if not math.isfinite(width) or width <= 0:
        raise ModelError(f"bin width must be > 0 seconds, got {bin_s!r}")
    off = ~np.eye(m, dtype=bool)
    for _ in range(6):
        edges = np.arange(0.0, float(t[-1]) + width, width)
        if edges.size - 1 < 50:
            raise ModelError(f"bins of {width:g} s give fewer than 50 bins over the trace's {t[-1]:g} s")
        counts = np.histogram(t, bins=edges)[0]
        lam, P, gs, xis, ll, it, gamma = _baum_welch(counts, width, iters, phases=m)
        q = _generator(P, width)
        srt = np.sort(lam)
        distinct = float(np.min(np.diff(srt))) * width > 3.0 * math.sqrt(max(lam) * width / max(min(gs), 1.0))
        moving = float(np.max(np.where(off, P, 0.0).sum(axis=1)))
        if moving <= 0.05 or bin_s is not None or 2 * (edges.size - 1) > MAX_BINS_REFINED or not distinct:
            break
        width *= 0.5
    order = np.argsort(-lam, kind="stable")  # the busiest phase first
    rates = lam[order]
    time_in = gs[order] * width
    qo = q[np.ix_(order, order)]
    sw = qo[off]  # row by row: (r12, r21) for two phases
    switches = xis[np.ix_(order, order)][off]
    model = MMPP2(tuple(float(r) for r in rates), tuple(float(x) for x in sw))
    rci = tuple(float(1.96 * math.sqrt(r / max(ti, 1e-300))) for r, ti in zip(rates, time_in))
    sci = tuple(float(1.96 * r / math.sqrt(max(n, 1e-300))) for r, n in zip(sw, switches))
    return MMPPFit(model, rci, sci, width, it, ll), gamma[:, order], width


def dispersion(times: np.ndarray, windows_s: tuple[float, ...]) -> tuple[float, ...]:
    """Var / mean of the counts in consecutive windows of each length (NaN with fewer than 10 windows)."""
    t = _times(times)
    out = []
    for w in windows_s:
        k = int(t[-1] // w)
        if k < MIN_WINDOWS:
            out.append(math.nan)
            continue
        c = np.bincount((t[t < k * w] // w).astype(np.int64), minlength=k)[:k].astype(float)
        out.append(float(c.var(ddof=1) / c.mean()) if c.mean() > 0 else math.nan)
    return tuple(out)


def interarrival_cv(model: ArrivalModel, rate: float) -> float:
    """CV of the time between consecutive requests under the model (in steady state)."""
    if isinstance(model, Poisson):
        return 1.0
    if isinstance(model, CompoundPoisson):
        # a request's gap to the next is 0 unless it ends its group (probability 1/G), then Exp(lambda/G):
        # E T = 1/lambda, E T^2 = 2 G / lambda^2, so CV^2 = 2 G - 1 for any group-size law
        g = model.group_mean
        return math.sqrt(2.0 * g - 1.0)
    # group instants form an MMPP at the epoch rates; a request's gap is 0 unless it ends its group,
    # so E T^2 = E[T_g^2] / (requests per group), T_g the gap after a group instant (phase law alpha)
    d1 = np.diag(model.epoch_rates)
    d0 = model.generator - d1
    pi = model.stationary
    ones = np.ones(model.phases)
    alpha = pi @ d1 / float(pi @ d1 @ ones)
    inv = np.linalg.inv(-d0)
    per_group = float(alpha @ np.asarray(model.group_means))
    m2 = 2.0 * float(alpha @ inv @ inv @ ones) / per_group
    m1 = 1.0 / model.mean_rate
    return math.sqrt(max(m2 / (m1 * m1) - 1.0, 0.0))


GROUPS_Z = 3.0
"""Requests that join a group beyond this many standard deviations above what a model without groups
expects by chance (arrivals that happen to fall within the group window) are groups it cannot produce."""


def groups_explained(model: ArrivalModel, times: np.ndarray, window_s: float) -> bool:
    """Whether a model without groups (Poisson or a plain MMPP) accounts for the requests that arrive
    within ``window_s`` of the previous one: each is such a request with probability
    sum_i pi_i lambda_i (1 - exp(-lambda_i window)) / sum_i pi_i lambda_i (the phase seen by an arrival;
    a switch within the window ignored). Where far more join than that, the trace's groups are real
    (several requests at one instant) and only a model with groups has them: the dispersion curve
    alone would let fast phases stand in for them, and a queue that serves a group at once sees the
    difference."""
    gaps = np.diff(np.asarray(times, dtype=float))
    joined = int(np.sum(gaps <= window_s))
    if isinstance(model, Poisson):
        rates, weights = np.array([gaps.size / float(np.sum(gaps))]), np.array([1.0])
    elif isinstance(model, MMPP2) and not model.grouped:
        rates = np.asarray(model.rates, dtype=float)
        weights = np.asarray(model.stationary, dtype=float) * rates
    else:
        raise ModelError(f"groups_explained takes a model without groups, got {model.spec}")
    p = float(np.sum(weights * -np.expm1(-rates * window_s)) / np.sum(weights))
    expected = gaps.size * p
    sd = math.sqrt(max(gaps.size * p * (1.0 - p), 0.0))
    return joined <= expected + GROUPS_Z * sd


PHASE_GAIN = 0.5
"""A model with more phases is chosen only where it at least halves the misfit of the choice among
fewer phases (and lowers it by more than ``MISFIT_TOLERANCE``): extra phases otherwise chase the
trace's sampling noise (a compound-Poisson stream is not three-phase)."""


def _choose(misfit: dict[str, float], levels: list[list[str]], excluded: tuple[str, ...] = ()) -> str:
    """Within the first level (up to two phases) the simplest model within ``MISFIT_TOLERANCE`` of
    the closest; then each level of more phases replaces it only if it gains ``PHASE_GAIN``.
    ``excluded`` models are never chosen."""
    best = "poisson"
    for depth, level in enumerate(levels):
        names = [k for k in level if k in misfit and math.isfinite(misfit[k]) and k not in excluded]
        if not names:
            continue
        floor = min(misfit[k] for k in names)
        if depth > 0 and not (floor <= PHASE_GAIN * misfit[best] and floor <= misfit[best] - MISFIT_TOLERANCE):
            continue
        best = next(k for k in names if misfit[k] <= floor + MISFIT_TOLERANCE)
    return best


def _misfit(curve: tuple[float, ...], trace_d: tuple[float, ...]) -> float:
    """Mean squared log ratio of a model's dispersion curve to the trace's (over its finite windows)."""
    ok = [i for i, d in enumerate(trace_d) if math.isfinite(d) and d > 0]
    return float(np.mean([math.log(curve[i] / trace_d[i]) ** 2 for i in ok])) if ok else math.nan


def dispersion_misfit(model: ArrivalModel, fit: "ArrivalFit") -> float:
    """How far ``model``'s index-of-dispersion curve is from the fitted trace's, on the fit's windows
    (the measure ``fit_arrivals`` chooses by): a model in force can be compared with a new fit."""
    if isinstance(model, Poisson):
        curve = tuple(1.0 for _ in fit.windows_s)
    elif isinstance(model, CompoundPoisson):
        curve = tuple(model.group_second_moment / model.group_mean for _ in fit.windows_s)
    else:
        curve = tuple(model.index_of_dispersion(w) for w in fit.windows_s)
    return _misfit(curve, fit.dispersion["trace"])


def fit_arrivals(times: np.ndarray, group_window_s: float | None = None, bin_s: float | None = None,
                 max_phases: int = MAX_FIT_PHASES) -> ArrivalFit:
    """Every candidate fitted (MMPPs with 2..``max_phases`` phases, plain and batch), the one chosen by
    the dispersion misfit (the simplest within ``MISFIT_TOLERANCE`` of the closest)."""
    if not 2 <= int(max_phases) <= MAX_PHASES:
        raise ModelError(f"max_phases must be 2..{MAX_PHASES}, got {max_phases!r}")
    t = _times(times)
    span = float(t[-1])
    rate = (t.size - 1) / span
    window = 0.01 / rate if group_window_s is None else float(group_window_s)
    if not math.isfinite(window) or window < 0:
        raise ModelError(f"group window must be finite and >= 0 seconds, got {group_window_s!r}")
    comp = fit_compound(t, window)
    try:
        mm: MMPPFit | None = fit_mmpp(t, bin_s)
    except ModelError:
        mm = None
    bm: MMPPFit | None = None
    if comp.model.group_mean > 1.0:
        try:
            bm = fit_batch_mmpp(t, window, bin_s)
        except ModelError:
            bm = None
    more: dict[str, MMPPFit] = {}
    for m in range(3, int(max_phases) + 1):
        try:
            more[f"mmpp{m}"] = fit_mmpp(t, bin_s, phases=m)
        except ModelError:
            pass
        if comp.model.group_mean > 1.0:
            try:
                more[f"batch_mmpp{m}"] = fit_batch_mmpp(t, window, bin_s, phases=m)
            except ModelError:
                pass
    windows = tuple(w / rate for w in WINDOWS_IN_MEAN_GAPS if span // (w / rate) >= MIN_WINDOWS) or (1.0 / rate,)
    trace_d = dispersion(t, windows)
    curves: dict[str, tuple[float, ...]] = {"trace": trace_d, "poisson": tuple(1.0 for _ in windows)}
    cvs = {"trace": float(np.std(np.diff(t)) / np.mean(np.diff(t))), "poisson": 1.0}
    cands: dict[str, ArrivalModel] = {"poisson": POISSON}
    if comp.model.group_mean > 1.0:
        idx = comp.model.group_second_moment / comp.model.group_mean
        curves["batch"] = tuple(idx for _ in windows)
        cvs["batch"] = interarrival_cv(comp.model, rate)
        cands["batch"] = comp.model
    if mm is not None:
        curves["mmpp"] = tuple(mm.model.index_of_dispersion(w) for w in windows)
        cvs["mmpp"] = interarrival_cv(mm.model, rate)
        cands["mmpp"] = mm.model
    if bm is not None:
        curves["batch_mmpp"] = tuple(bm.model.index_of_dispersion(w) for w in windows)
        cvs["batch_mmpp"] = interarrival_cv(bm.model, rate)
        cands["batch_mmpp"] = bm.model
    for name, f in more.items():
        curves[name] = tuple(f.model.index_of_dispersion(w) for w in windows)
        cvs[name] = interarrival_cv(f.model, rate)
        cands[name] = f.model
    misfit = {name: _misfit(curves[name], trace_d) for name in cands}
    ungrouped = tuple(name for name, m in cands.items()
                      if not (isinstance(m, CompoundPoisson) or (isinstance(m, MMPP2) and m.grouped))
                      and not groups_explained(m, t, window))
    best = _choose(misfit, [["poisson", "batch", "mmpp", "batch_mmpp"],
                            *([f"mmpp{m}", f"batch_mmpp{m}"] for m in range(3, int(max_phases) + 1))], ungrouped)
    chosen = cands[best]
    return ArrivalFit(chosen, rate, int(t.size), span, window, comp, mm, bm, windows, curves, cvs, misfit, more,
                      ungrouped)
