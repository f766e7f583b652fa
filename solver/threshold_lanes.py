"""Many k-instance threshold policies simulated at once, vectorised over lanes (numpy).

The threshold search of ``solver.instances`` compares hundreds of control-limit vectors
T = (T_0..T_{k-1}) (row m waits until n >= T_m, then serves min(n, B)) on common random numbers.
One Python event loop per candidate costs about 0.5 us per simulated request; here every candidate
and every replication is a *lane* of one numpy state, and one step starts the next batch in every
lane at once, so the per-step interpreter cost is shared by thousands of lanes.

Replications are overlapping windows of ONE long Poisson arrival stream (so all candidates see the
same arrivals): replication r simulates requests [r S, r S + W + S + E) from an empty system, counts
the latency of requests [r S + W, r S + W + S) (its segment; the segments tile the stream), the
energy of the batches whose first request is in its segment, and the segment's time span. The warm-up
W removes the empty start (batching queues forget it within a few batches), the tail E (> 2 B
requests) keeps the segment's last requests from waiting for arrivals that never come
(``warmup_requests`` has the warm-up's size and how it was measured). Sums over
the replications of one candidate give its W, P and J; their spread across replications gives a
confidence half-width, and the spread of the paired differences between two candidates (common
random numbers) the half-width of their difference.

Service times (common random numbers by inversion): the j-th batch a replication starts takes the
u_j-quantile of its size's law, u_j one stream per replication common to every candidate, so a slow
batch in one candidate is a slow batch in the others whatever its size. The law is a sorted pool of
``pool`` draws per size of the profile's law (its empirical quantiles); deterministic service takes
tau(b) itself.

Decision epochs, per lane: with the instances' free times sorted f_1 <= ... <= f_k and "now" the
last start, between f_j and f_{j+1} exactly k - j instances are busy (m = k - j, j free); the next
batch starts at the first time s >= max(now, f_j) in such a piece at which n >= T_m, i.e.
s = max(now, f_j, arrival h + T_m - 1) if that is before f_{j+1}; it takes min(n(s), B) requests
and the instance freed first. This is the event loop of ``solver.simulate`` (``_run_instances``)
for threshold tables, one batch start per step: the tests check the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from solver.model import BatchingModel, ModelError

POOL = 4096
"""Service-time draws per batch size (non-deterministic laws)."""
WARMUP_BATCHES = 3.0
"""Default warm-up: this many B-sized batches per unit of 1 / (1 - load) (``warmup_requests``)."""


def warmup_requests(model: BatchingModel) -> int:
    """Requests simulated from the empty start before a replication counts: max(4 B, 3 B / (1 - load)).
    An empty start shortens the queue; the bias decays on the time scale of the queue's relaxation,
    which grows as 1 / (1 - load). Measured on the V100 profile (k = 4, B = 64, against 10^6-request
    runs): W within its 95% CI at loads 0.3-0.95 with this warm-up; 250 requests left W 10% low at
    0.95 and 1000 left it 3-5% low, differently for different thresholds."""
    return max(4 * model.max_batch, math.ceil(WARMUP_BATCHES * model.max_batch / (1.0 - model.load)))


@dataclass(frozen=True)
class LaneFigures:
    """Per candidate (rows) and replication (columns): counted requests, their latency sum, the
    extra busy energy (sum of (p(b) - P0) x duration) and the segment's span."""

    count: np.ndarray
    latency_sum: np.ndarray
    extra_energy: np.ndarray
    span: np.ndarray
    idle_power_w: float
    devices: int
    """D: each device draws P0 once (``BatchingModel.devices``)."""
    weight: float
    batches: np.ndarray | None = None
    """Batches whose first request is in the segment (per candidate and replication)."""
    latencies: np.ndarray | None = None
    """With ``run(..., latencies=True)``: per candidate (rows), the response time of every counted
    request in arrival order (replication r's segment, then r + 1's: the segments tile the stream)."""

    @property
    def mean_latency_s(self) -> np.ndarray:
        return self.latency_sum.sum(axis=1) / self.count.sum(axis=1)

    @property
    def mean_batch(self) -> np.ndarray:
        """Requests per batch: the counted requests over the batches that start in the segments."""
        if self.batches is None:
            raise ModelError("these figures were made without batch counts")
        return self.count.sum(axis=1) / np.maximum(self.batches.sum(axis=1), 1)

    @property
    def mean_power_w(self) -> np.ndarray:
        return self.devices * self.idle_power_w + self.extra_energy.sum(axis=1) / self.span.sum(axis=1)

    @property
    def cost(self) -> np.ndarray:
        return self.mean_latency_s + self.weight * self.mean_power_w

    def _influence(self, weight_latency: float, weight_power: float) -> np.ndarray:
        """Each replication's influence on weight_latency x W + weight_power x P (the ratio estimators
        linearised): rows candidates, columns replications; their standard error is the estimate's."""
        w_hat = self.mean_latency_s[:, None]
        e_hat = (self.extra_energy.sum(axis=1) / self.span.sum(axis=1))[:, None]
        c_bar = self.count.mean(axis=1, keepdims=True)
        s_bar = self.span.mean(axis=1, keepdims=True)
        return (weight_latency * (self.latency_sum - w_hat * self.count) / c_bar
                + weight_power * (self.extra_energy - e_hat * self.span) / s_bar)

    @staticmethod
    def _se(z: np.ndarray) -> np.ndarray:
        return z.std(axis=1, ddof=1) / math.sqrt(z.shape[1])

    def latency_se(self) -> np.ndarray:
        """Standard error of each candidate's W (across replications)."""
        return self._se(self._influence(1.0, 0.0))

    def power_se(self) -> np.ndarray:
        """Standard error of each candidate's P."""
        return self._se(self._influence(0.0, 1.0))

    def cost_se(self) -> np.ndarray:
        """Standard error of each candidate's J."""
        return self._se(self._influence(1.0, self.weight))

    def difference_se(self, ref: int) -> np.ndarray:
        """Standard error of J(candidate) - J(ref), paired over replications (common random numbers)."""
        z = self._influence(1.0, self.weight)
        return self._se(z - z[ref])


class ThresholdLanes:
    """One arrival stream and its service-time streams, on which candidate threshold vectors are
    simulated together (module doc). Build once per model, call ``run`` per set of candidates."""

    def __init__(self, model: BatchingModel, *, replications: int, segment: int, warmup: int | None = None,
                 tail: int | None = None, seed: int = 0, pool: int = POOL):
        for name, v, lo in (("replications", replications, 2), ("segment", segment, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ModelError(f"{name} must be an integer >= {lo}, got {v!r}")
        self.model = model
        self.k = int(model.instances)
        self.big_b = int(model.max_batch)
        self.reps = int(replications)
        self.segment = int(segment)
        self.warmup = int(warmup) if warmup is not None else warmup_requests(model)
        self.tail = int(tail) if tail is not None else 2 * self.big_b + 8
        rng = np.random.default_rng(seed)
        n = self.reps * self.segment + self.warmup + self.tail
        gaps = rng.exponential(1.0 / model.rate, size=n)
        self.t = np.cumsum(gaps)
        self.cs = np.concatenate(([0.0], np.cumsum(self.t)))
        prof = model.profile
        self.mean = np.asarray(prof.mean_s[: self.big_b], dtype=float)
        self.extra_power = np.asarray(prof.busy_power_w[: self.big_b], dtype=float) - float(model.idle_power_w)
        self.deterministic = prof.law == "deterministic"
        self.pool_size = int(pool)
        if not self.deterministic:
            sizes = np.repeat(np.arange(1, self.big_b + 1), self.pool_size)
            self.pool = np.sort(prof.sample(sizes, rng).reshape(self.big_b, self.pool_size), axis=1).ravel()
            # a lane starts at most one batch per request: this many quantile indices per replication
            self.u = rng.integers(0, self.pool_size, size=(self.reps, self.warmup + self.segment + self.tail))

    def run(self, thresholds: np.ndarray, *, guards: np.ndarray | None = None,
            latencies: bool = False) -> LaneFigures:
        """Simulate every row of ``thresholds`` (C x k, T_m in 1..B) on every replication.

        ``guards`` (C seconds, inf = none): a max-wait guard per candidate, which serves min(n, B) as
        soon as an instance is free and the oldest request has waited that long (``InstanceGuard``).
        ``latencies``: also keep every counted request's response time (``LaneFigures.latencies``)."""
        th = np.asarray(thresholds, dtype=np.int64)
        k, big_b, reps = self.k, self.big_b, self.reps
        if th.ndim != 2 or th.shape[1] != k or th.min() < 1 or th.max() > big_b:
            raise ModelError(f"thresholds must be C x {k} integers in 1..{big_b}, got shape {th.shape}")
        c = th.shape[0]
        g = np.full(c, np.inf) if guards is None else np.asarray(guards, dtype=float)
        if g.shape != (c,) or np.any(np.isnan(g)) or np.any(g <= 0):
            raise ModelError(f"guards must be {c} max waits > 0 seconds (inf: none), got {guards!r}")
        guard = np.repeat(g, reps)
        lanes = c * reps
        rep = np.tile(np.arange(reps), c)
        cand = np.repeat(np.arange(c), reps)
        # need[:, j]: requests waiting that start a batch in piece j (j + 1 free, m = k - 1 - j busy)
        need = th[cand][:, ::-1] - 1
        lo_idx = rep * self.segment
        seg_lo = lo_idx + self.warmup
        seg_hi = seg_lo + self.segment
        end = seg_hi + self.tail
        t, cs, mean, extra_power = self.t, self.cs, self.mean, self.extra_power
        h = lo_idx.copy()
        now = t[h]
        free = np.full((lanes, k), -np.inf)
        lat = np.zeros(lanes)
        cnt = np.zeros(lanes)
        energy = np.zeros(lanes)
        out_lat = np.zeros(lanes)
        out_cnt = np.zeros(lanes)
        out_energy = np.zeros(lanes)
        nb = np.zeros(lanes)
        out_nb = np.zeros(lanes)
        inf = np.inf
        hi = np.full((lanes, k), inf)
        alive = np.arange(lanes)
        rep_alive = rep.copy()
        keep_lat = np.zeros((lanes, self.segment)) if latencies else None
        offsets = np.arange(big_b)
        step = 0
        while alive.size:
            fs = np.sort(free, axis=1)
            lo = np.maximum(fs, now[:, None])
            hi[:, :-1] = fs[:, 1:]
            idx = h[:, None] + need
            at = t[np.minimum(idx, (end - 1)[:, None])]
            at[idx >= end[:, None]] = inf
            # the guard: the oldest request (arrival h) may not wait beyond its max wait
            s_cand = np.maximum(lo, np.minimum(at, (t[np.minimum(h, end - 1)] + guard)[:, None]))
            s_cand[s_cand >= hi] = inf
            s = s_cand.min(axis=1)
            stuck = np.isinf(s)
            if stuck.any():  # no threshold is ever reached again: serve the rest once all are free
                s[stuck] = np.maximum(np.maximum(now[stuck], fs[stuck, -1]), t[end[stuck] - 1])
            a = np.minimum(np.minimum(np.searchsorted(t, s, side="right"), end) - h, big_b)
            if self.deterministic:
                d = mean[a - 1]
            else:
                d = self.pool[(a - 1) * self.pool_size + self.u[rep_alive, step]]
            done_at = s + d
            fs[:, 0] = done_at
            free = fs
            c0 = np.maximum(h, seg_lo)
            c1 = np.maximum(np.minimum(h + a, seg_hi), c0)
            lat += (c1 - c0) * done_at - (cs[c1] - cs[c0])
            cnt += c1 - c0
            energy += extra_power[a - 1] * d * ((c1 - c0) / a)
            nb += (h >= seg_lo) & (h < seg_hi)
            if keep_lat is not None:
                i = c0[:, None] + offsets[None, :]
                ok = i < c1[:, None]
                rows, cols = np.nonzero(ok)
                keep_lat[alive[rows], i[rows, cols] - seg_lo[rows]] = done_at[rows] - t[i[rows, cols]]
            h = h + a
            now = s
            step += 1
            left = h < end
            if not left.all():
                gone = ~left
                out_lat[alive[gone]] = lat[gone]
                out_cnt[alive[gone]] = cnt[gone]
                out_energy[alive[gone]] = energy[gone]
                out_nb[alive[gone]] = nb[gone]
                keep = np.flatnonzero(left)
                alive, h, now, free, lat, cnt, energy, nb = (alive[keep], h[keep], now[keep], free[keep], lat[keep],
                                                             cnt[keep], energy[keep], nb[keep])
                need, seg_lo, seg_hi, end, hi, rep_alive, guard = (need[keep], seg_lo[keep], seg_hi[keep], end[keep],
                                                                   hi[keep], rep_alive[keep], guard[keep])
        first = np.arange(reps) * self.segment + self.warmup
        span = t[first + self.segment - 1] - t[first - 1]
        return LaneFigures(
            count=out_cnt.reshape(c, reps), latency_sum=out_lat.reshape(c, reps),
            extra_energy=out_energy.reshape(c, reps), span=np.tile(span, (c, 1)),
            idle_power_w=float(self.model.idle_power_w), devices=self.model.idle_devices,
            weight=float(self.model.weight), batches=out_nb.reshape(c, reps),
            latencies=None if keep_lat is None else keep_lat.reshape(c, reps * self.segment))


def grid(max_batch: int) -> list[int]:
    """Threshold values the scan tries: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... B."""
    out = {1, 2, 3}
    x = 4
    while x <= max_batch:
        out.add(x)
        out.add(min(max_batch, x + x // 2))
        x *= 2
    out.add(max_batch)
    return sorted(v for v in out if v <= max_batch)


@dataclass(frozen=True)
class LaneSearch:
    """What ``search`` found: the thresholds, their J on the search's lanes, and its effort."""

    thresholds: tuple[int, ...]
    cost: float
    evaluations: int
    """Distinct candidates simulated."""
    runs: int
    """Vectorised runs (each simulates a set of candidates together)."""


def search(lanes: ThresholdLanes, starts: list[tuple[int, ...]], *, max_runs: int = 24) -> LaneSearch:
    """Least-J thresholds: a scan of common thresholds (T, ..., T) over a grid, then a pattern search
    (every coordinate +- step at once, move to the best, halve the step when none is better)."""
    k, big_b = lanes.k, lanes.big_b
    cache: dict[tuple[int, ...], float] = {}
    runs = 0

    def evaluate(cands: list[tuple[int, ...]]) -> None:
        nonlocal runs
        new = sorted({c for c in cands if c not in cache})
        if new:
            costs = lanes.run(np.array(new)).cost
            cache.update(zip(new, costs.tolist()))
            runs += 1

    values = grid(big_b)
    evaluate([(v,) * k for v in values] + list(starts))
    x = min(cache, key=lambda c: (cache[c], c))
    above = [v for v in values if v > max(x)]
    step = max(1, ((above[0] if above else big_b) - max(x)) // 2)
    while step >= 1 and runs < max_runs:
        cands = []
        for m in range(k):
            for d in (-step, step):
                v = x[m] + d
                if 1 <= v <= big_b:
                    cands.append(x[:m] + (v,) + x[m + 1:])
        for d in (-step, step):  # all together: J is flat along single rows that are rarely asked
            diag = tuple(min(big_b, max(1, v + d)) for v in x)
            if diag != x:
                cands.append(diag)
        evaluate(cands)
        best = min(cands + [x], key=lambda c: (cache[c], c))
        if cache[best] < cache[x]:
            x = best
        else:
            step //= 2
    return LaneSearch(thresholds=x, cost=cache[x], evaluations=len(cache), runs=runs)
