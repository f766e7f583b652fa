"""Discrete-event simulation of one batching server under any batching rule and arrival sequence.

The simulator is the common yardstick: the SMDP policy, greedy, static, threshold and Triton's
timeout rule are all run here on the same arrival array, and its estimates are checked against
exact evaluation and queueing closed forms. It must therefore accept any ``BatchRule``, any
service law of the profile and any arrival array (Poisson, MMPP, trace replay), and be fast.

Speed comes from looping over decision epochs only (never per request): arrivals during a service
are counted with a bisection on the sorted arrival times, a queue-length table policy jumps straight
to the arrival at which it next serves, Triton's timeout rule jumps straight to its firing time
(``TritonBatcher``, Triton's batcher as it runs without prefetching, also to the arrival that wakes it;
``TritonInstances`` the same at k instances or with config mode's preferred sizes),
service times are pre-drawn in blocks per batch size, and all latency bookkeeping is vectorised.

Conventions:
- FIFO: a batch takes the ``serve`` oldest waiting requests.
- Decision epochs: when the server becomes free, at each arrival while it is free, and at the
  ``recheck_after_s`` timer when a rule asks for one. Requests with the same arrival time are one
  group (compound Poisson, ``solver.arrivals.compound_poisson``): the decision after it sees all of it.
- When the arrival stream is exhausted and the rule would wait forever, the rest is served in
  batches of min(n, B) (the drain), so every request completes.
- Power: a batch of b that runs for s seconds uses busy_power(b) * s joules, busy_power(b) =
  e(b) / tau(b) with tau(b) the mean of the same law the service times are drawn from (the profile's
  energy convention, ``ServiceProfile``), so the expected energy of a batch is e(b), the solver's
  figure; physically a slower batch burns longer. Idle time draws P0. Time before ``warmup`` is excluded.
- Service times come from one random stream per batch size, so two rules that run the same k-th
  batch of size b get the same service time: comparisons on common random numbers.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
from scipy import stats

from solver.model import ModelError, ServiceProfile
from solver.policy import (BatchRule, InstanceRule, InstanceTable, MaxWaitGuard, PerInstance, PolicyTable, TimeoutRule,
                           TritonBatcher, TritonInstances)

__all__ = ["SimResult", "simulate", "simulate_latencies", "simulate_phased", "batch_means_ci"]

_CI_BATCHES = 30


@dataclass(frozen=True)
class SimResult:
    """Estimates from one simulation run (requests that arrived after the warm-up)."""

    mean_latency_s: float
    p50_latency_s: float
    p95_latency_s: float
    p99_latency_s: float
    latency_ci95_s: float
    """Half-width of the 95% CI of mean latency, by batch means over consecutive requests."""
    mean_power_w: float
    power_ci95_w: float
    """Half-width of the 95% CI of mean power, by batch means over equal time windows."""
    cost: float
    """J = mean latency + weight * mean power."""
    throughput_rps: float
    mean_batch: float
    batch_hist: tuple[int, ...]
    """Number of batches of each size, index b - 1."""
    n_requests: int
    n_batches: int
    horizon_s: float
    weight: float

    @property
    def cost_ci95(self) -> float:
        """A conservative half-width for J (latency and power errors added, not combined)."""
        return self.latency_ci95_s + self.weight * self.power_ci95_w

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_hist"] = list(self.batch_hist)
        d["cost_ci95"] = self.cost_ci95
        return d


def batch_means_ci(values: np.ndarray, batches: int = _CI_BATCHES) -> float:
    """95% CI half-width of the mean of a correlated sequence, from means of consecutive blocks.

    Blocks long against the correlation time make their means nearly independent; with too few
    values to form blocks the half-width is NaN rather than a falsely tight number.
    """
    v = np.asarray(values, dtype=float)
    k = min(batches, v.size // 10)
    if k < 2:
        return math.nan
    size = v.size // k
    means = v[: k * size].reshape(k, size).mean(axis=1)
    return float(stats.t.ppf(0.975, k - 1) * means.std(ddof=1) / math.sqrt(k))


class _ServiceDraws:
    """Service times per batch size from one independent stream per size, drawn in growing blocks."""

    def __init__(self, profile: ServiceProfile, max_batch: int, seed: int | None):
        self.profile = profile
        self.deterministic = profile.law == "deterministic"
        self.mean = profile.mean_s.tolist()
        seq = np.random.SeedSequence(seed)
        self.rngs = [np.random.default_rng(s) for s in seq.spawn(max_batch)]
        self.buf: list[list[float]] = [[] for _ in range(max_batch)]
        self.pos = [0] * max_batch
        self.block = [256] * max_batch

    def draw(self, b: int) -> float:
        if self.deterministic:
            return self.mean[b - 1]
        i = b - 1
        p = self.pos[i]
        buf = self.buf[i]
        if p >= len(buf):
            size = self.block[i]
            self.block[i] = min(size * 4, 1 << 16)
            buf = self.profile.sample(np.full(size, b), self.rngs[i]).tolist()
            self.buf[i] = buf
            p = 0
        self.pos[i] = p + 1
        return buf[p]


def _validate(profile: ServiceProfile, rule: BatchRule, arrivals: np.ndarray, idle_power_w: float,
              weight: float, warmup: float) -> np.ndarray:
    if not isinstance(profile, ServiceProfile):
        raise ModelError(f"profile must be a ServiceProfile, got {type(profile).__name__}")
    if not isinstance(rule, (BatchRule, InstanceRule, TritonBatcher, TritonInstances)):
        raise ModelError(f"rule must implement BatchRule (max_batch, decide) or InstanceRule (max_batch, instances, "
                         f"decide_busy), or be a TritonBatcher or TritonInstances, got {type(rule).__name__}")
    b = rule.max_batch
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ModelError(f"rule.max_batch must be an integer >= 1, got {b!r}")
    if b > profile.max_batch:
        raise ModelError(f"rule max_batch {b} exceeds the profile's largest batch size {profile.max_batch}")
    t = np.asarray(arrivals, dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise ModelError("arrivals must be a non-empty 1-d array of arrival times")
    if not np.all(np.isfinite(t)) or t[0] < 0:
        raise ModelError("arrival times must be finite and >= 0")
    if np.any(np.diff(t) < 0):
        i = int(np.argmax(np.diff(t) < 0)) + 1
        raise ModelError(f"arrival times must be sorted; arrival {i} ({t[i]!r}) comes before arrival {i - 1}")
    for name, v in (("idle_power_w", idle_power_w), ("weight", weight), ("warmup", warmup)):
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ModelError(f"{name} must be finite and >= 0, got {v!r}")
    if warmup >= t[-1]:
        raise ModelError(f"warmup {warmup!r} s leaves no arrivals (last arrival at {t[-1]:.6g} s)")
    return t


def _actions_and_next_serve(table: PolicyTable, size: int) -> tuple[list[int], list[int]]:
    """The table's actions a(0..size-1) and next_serve[n]: the smallest m >= n with a(m) > 0 (``size``
    where none is, beyond which a(m) = min(m, beyond) > 0): where a waiting loop jumps to."""
    acts = table.extended(size).tolist()
    next_serve = [0] * size
    nxt = size
    for n in range(size - 1, -1, -1):
        if acts[n] > 0:
            nxt = n
        next_serve[n] = nxt
    return acts, next_serve


def _run_table(table: PolicyTable, t: list[float], draw: Callable[[int], float]):
    """Event loop for a queue-length policy: jump from one serving epoch to the next."""
    n_total = len(t)
    big_b = table.max_batch
    far = table.beyond_batch  # beyond the table serve min(n, far): B, or a static policy's b0
    size = max(table.truncation + 2, big_b + 2)
    acts, next_serve = _actions_and_next_serve(table, size)
    sizes: list[int] = []
    starts: list[float] = []
    durs: list[float] = []
    now = 0.0
    head = 0  # first request not yet served
    na = 0  # arrivals with time <= now
    while head < n_total:
        if na == head:  # empty system: idle until the next arrival (all of its group)
            now = t[head]
            na = bisect_right(t, now, head + 1)
        n = na - head
        a = acts[n] if n < size else (n if n < far else far)
        if a == 0:
            m = next_serve[n]
            if head + m <= n_total:
                na = head + m
                now = t[na - 1]
                na = bisect_right(t, now, na)  # a group arrives whole: it may overshoot m
                if na - head != m:
                    continue  # decide again at the state the group reached
                a = acts[m] if m < size else min(m, far)
            else:  # stream exhausted before the policy would serve: drain
                na = n_total
                now = max(now, t[-1])
                n = na - head
                a = n if n < big_b else big_b
        s = draw(a)
        sizes.append(a)
        starts.append(now)
        durs.append(s)
        head += a
        now += s
        na = bisect_right(t, now, na)
    return sizes, starts, durs


def _run_table_guard(table: PolicyTable, max_wait_s: float, t: list[float], draw: Callable[[int], float]):
    """Event loop for a queue-length table under a max-wait guard (``MaxWaitGuard(PolicyTable, g)``).

    The same decisions as the generic loop asking ``MaxWaitGuard.decide`` at every epoch, without
    the per-arrival calls: while the table waits, the next serving epoch is the earlier of the
    arrival at which the table serves and the moment the oldest request has waited g (then min(n, B)).
    """
    n_total = len(t)
    big_b = table.max_batch
    far = table.beyond_batch
    g = float(max_wait_s)
    size = max(table.truncation + 2, big_b + 2)
    acts, next_serve = _actions_and_next_serve(table, size)
    sizes: list[int] = []
    starts: list[float] = []
    durs: list[float] = []
    now = 0.0
    head = 0
    na = 0
    while head < n_total:
        if na == head:
            now = t[head]
            na = head + 1
        n = na - head
        fire = t[head] + g
        if now >= fire:  # the oldest has already waited g: the guard serves
            a = n if n < big_b else big_b
        else:
            a = acts[n] if n < size else (n if n < far else far)
            if a == 0:
                m = next_serve[n]
                if head + m <= n_total and t[head + m - 1] < fire:
                    na = head + m
                    now = t[na - 1]
                    a = acts[m] if m < size else min(m, far)
                else:  # the guard fires first (or the stream ends before the table would serve)
                    now = fire
                    na = bisect_right(t, now, na)
                    n = na - head
                    a = n if n < big_b else big_b
        s = draw(a)
        sizes.append(a)
        starts.append(now)
        durs.append(s)
        head += a
        now += s
        na = bisect_right(t, now, na)
    return sizes, starts, durs


def _run_delay(max_batch: int, timeout_s: float, t: list[float], draw: Callable[[int], float], *,
               catch_share: float = 1.0, idle_wait_s: float = math.inf, race: np.random.Generator | None = None):
    """Event loop for a delay batcher: a batch goes at the earlier of 'oldest waited timeout_s' and 'n
    reaches max_batch'. With ``catch_share`` 1 (the default) this is ``TimeoutRule``: decided whenever the
    instance is free. Below 1 it is Triton's batcher without prefetching (``TritonBatcher``): at a
    completion with requests queued it misses the instance with probability 1 - catch_share (drawn from
    ``race``), and then nothing is decided until the next arrival (its group's first request) or the
    batcher's idle wait (ticks of ``idle_wait_s`` from its last dispatch)."""
    n_total = len(t)
    big_b = max_batch
    timeout = float(timeout_s)
    tick = float(idle_wait_s)
    catch = float(catch_share)
    if catch < 1.0 and race is None:
        raise ValueError("a delay batcher that can miss a completion needs its race's random stream")
    sizes: list[int] = []
    starts: list[float] = []
    durs: list[float] = []
    now = 0.0
    head = 0
    na = 0
    dispatched = 0.0  # when the batcher last dispatched a batch: its idle waits count from there
    asleep = False  # the instance freed with requests queued and the batcher missed it
    while head < n_total:
        if na == head:  # empty: the next arrival finds the instance free and wakes the batcher
            now = t[head]
            na = bisect_right(t, now, head + 1)
        elif asleep:
            k = max(1, math.ceil((now - dispatched) / tick))
            wake = dispatched + k * tick
            if na < n_total and t[na] < wake:  # the first request of the next group wakes it
                now = t[na]
                if now - t[head] >= timeout or na + 1 - head >= big_b:
                    na += 1  # dispatched at once, before the rest of the group is enqueued
                else:  # its timer runs: the group joins
                    na = bisect_right(t, now, na + 1)
            else:  # its idle wait runs out first
                now = wake
                na = bisect_right(t, now, na)
        if na - head < big_b:
            fire = t[head] + timeout
            full = head + big_b - 1
            if full < n_total and t[full] < fire:
                fire = t[full]
            if fire > now:
                now = fire
                na = bisect_right(t, now, na)
        n = na - head
        a = n if n < big_b else big_b
        s = draw(a)
        sizes.append(a)
        starts.append(now)
        durs.append(s)
        head += a
        dispatched = now
        now += s
        na = bisect_right(t, now, na)
        asleep = na > head and not (catch >= 1.0 or (catch > 0.0 and race.random() < catch))
    return sizes, starts, durs


def _run_generic(rule: BatchRule, t: list[float], draw: Callable[[int], float]):
    """Event loop for any rule: ask it at every completion, arrival while free, and timer."""
    n_total = len(t)
    big_b = int(rule.max_batch)
    decide = rule.decide
    sizes: list[int] = []
    starts: list[float] = []
    durs: list[float] = []
    now = 0.0
    head = 0
    na = 0
    while head < n_total:
        if na == head:
            now = t[head]
            na = bisect_right(t, now, head + 1)
        n = na - head
        d = decide(n, now - t[head])
        a = int(d.serve)
        if a < 0 or a > n or a > big_b:
            raise ModelError(f"rule {rule!r} chose to serve {a} with n={n} waiting and B={big_b}")
        if a == 0:
            nxt_arrival = t[na] if na < n_total else math.inf
            recheck = d.recheck_after_s
            if recheck is not None:
                recheck = float(recheck)
                if not recheck >= 0:
                    raise ModelError(f"rule {rule!r} asked to recheck after {recheck!r} s")
                timer = now + recheck
                if timer <= now:  # a timer below the clock's resolution must still move time
                    timer = math.nextafter(now, math.inf)
            else:
                timer = math.inf
            if nxt_arrival <= timer:
                if math.isinf(nxt_arrival):  # nothing will ever happen again: drain
                    a = n if n < big_b else big_b
                else:
                    now = nxt_arrival
                    na = bisect_right(t, now, na + 1)  # the whole group arrives at once
                    continue
            else:
                now = timer
                continue
        s = draw(a)
        sizes.append(a)
        starts.append(now)
        durs.append(s)
        head += a
        now += s
        na = bisect_right(t, now, na)
    return sizes, starts, durs


def _run_phased(policy, source, t: list[float], draw: Callable[[int], float]):
    """Event loop for a phase policy: decide at completions, arrivals while free and phase changes."""
    n_total = len(t)
    big_b = int(policy.max_batch)
    tables = [tb.extended(max(tb.truncation + 2, big_b + 2)).tolist() for tb in policy.tables]
    sizes: list[int] = []
    starts: list[float] = []
    durs: list[float] = []
    now = 0.0
    head = 0
    na = 0
    while head < n_total:
        if na == head:
            now = t[head]
            na = bisect_right(t, now, head + 1)
        n = na - head
        acts = tables[source.phase(now, na)]
        a = acts[n] if n < len(acts) else min(n, big_b)
        if a == 0:
            nxt = t[na] if na < n_total else math.inf
            change = source.next_change(now, nxt)
            if change < nxt:
                now = change
                continue
            if math.isinf(nxt):
                a = n if n < big_b else big_b
            else:
                now = nxt
                na = bisect_right(t, now, na + 1)
                continue
        s = draw(a)
        sizes.append(a)
        starts.append(now)
        durs.append(s)
        head += a
        now += s
        na = bisect_right(t, now, na)
    return sizes, starts, durs


def simulate_phased(profile: ServiceProfile, policy, source, arrivals: np.ndarray, *, idle_power_w: float,
                    weight: float, seed: int | None = None, warmup: float = 0.0) -> SimResult:
    """Run a phase policy (``solver.mmpp.PhasePolicy``) whose phase comes from ``source``
    (``solver.phase_filter``: the true path, or the forward filter on these arrival times)."""
    t = _validate(profile, policy.tables[0], arrivals, idle_power_w, weight, warmup)
    draws = _ServiceDraws(profile, int(policy.max_batch), seed)
    sizes, starts, durs = _run_phased(policy, source, t.tolist(), draws.draw)
    return _summarise(profile, t, np.asarray(sizes, dtype=np.int64), np.asarray(starts), np.asarray(durs),
                      float(idle_power_w), float(weight), float(warmup), int(policy.max_batch))[0]


def _run_instances(rule: InstanceRule, t: list[float], draw: Callable[[int], float], *, catch_share: float = 1.0,
                   idle_wait_s: float = math.inf, race: np.random.Generator | None = None):
    """Event loop for k instances fed by one FIFO queue.

    Decision epochs: an arrival while an instance is free, a completion, a rule's timer. At an epoch
    the rule is asked with m = busy instances, again after each batch it starts while one is free.
    Fast paths that skip epochs at which nothing can change: a table jumps to the next completion or
    to the arrival at which its row for the current m serves, a per-instance timeout rule straight to
    its firing time (it ignores m, so completions meanwhile do not change its answer). When no event
    is left and the rule would wait forever, the rest is served in batches of min(n, B).

    ``catch_share`` < 1: Triton's batcher without prefetching (``TritonInstances``, ``PerInstance`` of its
    rule). At a completion that frees an instance while all k were busy and requests are queued, the
    batcher misses it with probability 1 - ``catch_share`` (one draw from ``race`` per such completion
    instant); then nothing is decided until the next arrival (its group's first request, as ``_run_delay``),
    another instance's completion, or the batcher's idle wait (ticks of ``idle_wait_s`` from its last
    dispatch). With k = 1 and a ``TimeoutRule`` these are ``_run_delay``'s decisions and draws.
    """
    n_total = len(t)
    k = int(rule.instances)
    big_b = int(rule.max_batch)
    table: list[list[int]] | None = None
    next_serve: list[list[int]] = []
    size = 0
    timeout: float | None = None
    if type(rule) is InstanceTable:
        size = max(rule.truncation + 2, big_b + 2)
        table = []
        for m in range(k):
            acts, nxt_row = _actions_and_next_serve(rule.row(m), size)
            table.append(acts)
            next_serve.append(nxt_row)
    elif type(rule) is PerInstance and type(rule.rule) is TimeoutRule:
        timeout = float(rule.rule.timeout_s)
    decide = rule.decide_busy
    catch = float(catch_share)
    tick = float(idle_wait_s)
    if catch < 1.0 and race is None:
        raise ValueError("a batcher that can miss a completion needs its race's random stream")
    sizes: list[int] = []
    starts: list[float] = []
    durs: list[float] = []
    busy: list[float] = []  # heap of completion times
    inf = math.inf
    now = 0.0
    head = 0
    na = 0
    dispatched = 0.0  # the last dispatch: a batcher's idle waits count from there
    asleep = False  # an instance freed with requests queued while all were busy, and the batcher missed it
    while head < n_total:
        if busy and busy[0] <= now:
            full = len(busy) == k
            while busy and busy[0] <= now:
                heapq.heappop(busy)
            if full and na > head and catch < 1.0 and not (catch > 0.0 and race.random() < catch):
                asleep = True
        m = len(busy)
        if asleep:  # the instance(s) freed wait unseen: the next arrival, completion or idle tick wakes it
            asleep = False
            tick_at = dispatched + max(1, math.ceil((now - dispatched) / tick)) * tick
            done = busy[0] if busy else inf
            if na < n_total and t[na] < tick_at and t[na] < done:  # the first request of the next group
                now = t[na]
                if decide(na + 1 - head, m, now - t[head]).serve > 0:
                    na += 1  # dispatched at once, before the rest of the group is enqueued
                else:  # the rule waits: the group joins
                    na = bisect_right(t, now, na + 1)
            elif done <= tick_at:  # another instance's completion: its callback finds the freed one waiting
                now = done
                na = bisect_right(t, now, na)
                continue
            else:  # the idle wait runs out first
                now = tick_at
                na = bisect_right(t, now, na)
        n = na - head
        wake = inf  # when waiting with a free instance: the next time the rule could serve
        while m < k and n > 0:
            if table is not None:
                a = table[m][n] if n < size else min(n, big_b)
                if a == 0:
                    need = next_serve[m][n]
                    idx = head + need - 1
                    wake = t[idx] if idx < n_total else inf
            elif timeout is not None:
                fire = t[head] + timeout
                if n >= big_b:
                    a = big_b
                elif now >= fire:
                    a = n
                else:
                    a = 0
                    full = head + big_b - 1
                    wake = fire
                    if full < n_total and t[full] < wake:
                        wake = t[full]
            else:
                d = decide(n, m, now - t[head])
                a = int(d.serve)
                if a < 0 or a > n or a > big_b:
                    raise ModelError(f"rule {rule!r} chose to serve {a} with n={n} waiting, m={m} busy and B={big_b}")
                if a == 0:
                    nxt_arrival = t[na] if na < n_total else inf
                    wake = nxt_arrival
                    if d.recheck_after_s is not None:
                        recheck = float(d.recheck_after_s)
                        if not recheck >= 0:
                            raise ModelError(f"rule {rule!r} asked to recheck after {recheck!r} s")
                        timer = now + recheck
                        if timer <= now:
                            timer = math.nextafter(now, inf)
                        wake = min(wake, timer)
            if a == 0:
                break
            s = draw(a)
            sizes.append(a)
            starts.append(now)
            durs.append(s)
            heapq.heappush(busy, now + s)
            dispatched = now
            head += a
            n -= a
            m += 1
        if head >= n_total:
            break
        done = busy[0] if busy else inf
        if n == 0:  # empty queue: the next arrival or completion
            nxt = t[na] if na < n_total else inf
            now = min(nxt, done)
        elif m < k:  # waiting with a free instance
            nxt = wake if timeout is not None else min(wake, done)  # a per-instance timeout ignores completions
            if math.isinf(nxt):  # the rule would wait past the last arrival, nothing busy: drain
                now = max(now, t[-1])
                na = n_total
                n = na - head
                a = n if n < big_b else big_b
                s = draw(a)
                sizes.append(a)
                starts.append(now)
                durs.append(s)
                heapq.heappush(busy, now + s)
                dispatched = now
                head += a
                continue
            now = nxt
        else:  # all busy
            now = done
        na = bisect_right(t, now, na)
    return sizes, starts, durs


def simulate(profile: ServiceProfile, rule: BatchRule | InstanceRule | TritonBatcher | TritonInstances,
             arrivals: np.ndarray, *, idle_power_w: float, weight: float, seed: int | None = None, warmup: float = 0.0, devices: int | None = None) -> SimResult:
    """Run ``rule`` on the given arrival times and estimate W, its percentiles, P and J = W + w P.

    ``warmup`` (seconds) drops the requests that arrive before it and the energy spent before it,
    to remove the empty-start transient. ``seed`` fixes the service-time streams.

    An ``InstanceRule`` (``InstanceTable``, ``PerInstance``) runs on its k instances fed by one FIFO
    queue (``_run_instances``); power is then the sum over instances (each busy one draws its
    batch's power, each idle one P0), so P0 is the idle power of one instance's device. ``devices``
    D < k (instances sharing accelerators, ``BatchingModel.devices``) counts P0 once per device:
    power is D P0 plus each busy instance's p(b) - P0. ``TritonInstances`` (Triton's batcher at k instances,
    with its race; ``_run_instances``) is counted the same way.
    """
    return simulate_latencies(profile, rule, arrivals, idle_power_w=idle_power_w, weight=weight, seed=seed,
                              warmup=warmup, devices=devices)[0]


def simulate_latencies(profile: ServiceProfile, rule: BatchRule | InstanceRule | TritonBatcher | TritonInstances,
                       arrivals: np.ndarray, *,
                       idle_power_w: float, weight: float, seed: int | None = None,
                       warmup: float = 0.0, devices: int | None = None) -> tuple[SimResult, np.ndarray]:
    """``simulate`` plus the response time of every request that arrived after the warm-up, in
    arrival order (for latency distributions: quantiles, SLO attainment)."""
    t = _validate(profile, rule, arrivals, idle_power_w, weight, warmup)
    draws = _ServiceDraws(profile, int(rule.max_batch), seed)
    t_list = t.tolist()
    if isinstance(rule, (InstanceRule, TritonInstances)):
        k = int(rule.instances)
        if devices is not None and (isinstance(devices, bool) or not isinstance(devices, (int, np.integer))
                                    or not 1 <= devices <= k):
            raise ModelError(f"devices must be an integer in 1..instances = {k}, got {devices!r}")
        if type(rule) is TritonInstances:
            sizes, starts, durs = _run_instances(PerInstance(rule.rule, k), t_list, draws.draw,
                                                 catch_share=rule.catch_share, idle_wait_s=rule.idle_wait_s,
                                                 race=_race_stream(seed, rule.max_batch))
        else:
            sizes, starts, durs = _run_instances(rule, t_list, draws.draw)
        return _summarise(profile, t, np.asarray(sizes, dtype=np.int64), np.asarray(starts), np.asarray(durs),
                          float(idle_power_w), float(weight), float(warmup), int(rule.max_batch),
                          k if devices is None else int(devices))
    if devices is not None and devices != 1:
        raise ModelError(f"devices must be 1 for a one-server rule, got {devices!r}")
    if type(rule) is PolicyTable:
        sizes, starts, durs = _run_table(rule, t_list, draws.draw)
    elif type(rule) is TimeoutRule:
        sizes, starts, durs = _run_delay(int(rule.max_batch), rule.timeout_s, t_list, draws.draw)
    elif type(rule) is TritonBatcher:
        race = _race_stream(seed, rule.max_batch)
        sizes, starts, durs = _run_delay(int(rule.max_batch), rule.timeout_s, t_list, draws.draw,
                                         catch_share=rule.catch_share, idle_wait_s=rule.idle_wait_s, race=race)
    elif type(rule) is MaxWaitGuard and type(rule.rule) is PolicyTable:
        sizes, starts, durs = _run_table_guard(rule.rule, rule.max_wait_s, t_list, draws.draw)
    else:
        sizes, starts, durs = _run_generic(rule, t_list, draws.draw)
    return _summarise(profile, t, np.asarray(sizes, dtype=np.int64), np.asarray(starts), np.asarray(durs),
                      float(idle_power_w), float(weight), float(warmup), int(rule.max_batch))


def _race_stream(seed: int | None, max_batch: int) -> np.random.Generator:
    """The batcher's races: their own stream of the run's seed, beside the service times' one per batch size
    (common random numbers across delays and instance counts)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(int(max_batch) + 1)[-1])


def _summarise(profile: ServiceProfile, t: np.ndarray, sizes: np.ndarray, starts: np.ndarray, durs: np.ndarray,
               p0: float, weight: float, warmup: float, big_b: int,
               devices: int = 1) -> tuple[SimResult, np.ndarray]:
    ends = starts + durs
    completion = np.repeat(ends, sizes)
    latency = completion - t
    first = int(np.searchsorted(t, warmup, side="left"))
    lat = latency[first:]
    horizon_end = float(ends[-1])
    horizon = horizon_end - warmup

    # Busy time and energy inside [warmup, end], prorating a batch that straddles the warm-up.
    power = profile.busy_power_w[sizes - 1]
    busy = np.clip(ends - np.maximum(starts, warmup), 0.0, None)
    energy = float(np.sum(power * busy)) + p0 * (devices * horizon - float(busy.sum()))  # D P0 + sum (p - P0)
    mean_power = energy / horizon

    # Power CI by batch means over equal time windows (a batch's energy counted where it starts).
    k = _CI_BATCHES
    counted = starts >= warmup
    win = np.minimum(((starts[counted] - warmup) / horizon * k).astype(np.int64), k - 1)
    busy_e = np.bincount(win, weights=(power * durs)[counted], minlength=k)
    busy_t = np.bincount(win, weights=durs[counted], minlength=k)
    win_p = (busy_e + p0 * (devices * horizon / k - busy_t)) / (horizon / k)
    power_ci = float(stats.t.ppf(0.975, k - 1) * win_p.std(ddof=1) / math.sqrt(k)) if counted.sum() >= 2 * k else math.nan

    hist = np.bincount(sizes[counted], minlength=big_b + 1)[1:]
    n_batches = int(counted.sum())
    mean_latency = float(lat.mean())
    p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
    return SimResult(
        mean_latency_s=mean_latency,
        p50_latency_s=p50,
        p95_latency_s=p95,
        p99_latency_s=p99,
        latency_ci95_s=batch_means_ci(lat),
        mean_power_w=mean_power,
        power_ci95_w=power_ci,
        cost=mean_latency + weight * mean_power,
        throughput_rps=lat.size / horizon,
        mean_batch=float(sizes[counted].mean()) if n_batches else math.nan,
        batch_hist=tuple(int(x) for x in hist),
        n_requests=int(lat.size),
        n_batches=n_batches,
        horizon_s=horizon,
        weight=weight,
    ), lat


if __name__ == "__main__":  # a quick figure; bench/sim_bench.py has the full benchmark
    import time

    from solver import arrivals
    from solver.quantities import DEFAULT_IDLE_POWER_W
    from solver.policy import greedy

    prof = ServiceProfile.affine(64, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550)
    arr = arrivals.poisson(2000.0, n=1_000_000, rng=1)
    t0 = time.perf_counter()
    res = simulate(prof, greedy(64), arr, idle_power_w=DEFAULT_IDLE_POWER_W, weight=0.0, seed=1)
    print(f"greedy, 10^6 Poisson requests at 2000/s: {time.perf_counter() - t0:.2f} s, "
          f"W = {res.mean_latency_s * 1e3:.3f} ms, P = {res.mean_power_w:.1f} W")
