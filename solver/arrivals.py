"""Open-loop arrival processes as sorted arrays of absolute arrival times (seconds from 0).

Arrival times are drawn independently of the system they feed, so that the simulator, the load
generator and any comparison can replay *the same* sequence against every contender. Nothing here
knows about the simulator: a load test imports these functions to schedule requests.

Every generator takes an explicit ``numpy.random.Generator`` (or a seed) so that runs are
reproducible, and fails with :class:`ArrivalError` naming the bad argument.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from solver.arrival_model import MMPP2, ArrivalModel, CompoundPoisson, Poisson
from solver.model import ModelError

__all__ = [
    "ArrivalError",
    "poisson",
    "compound_poisson",
    "mmpp",
    "mmpp2_path",
    "from_model",
    "steps",
    "ramp",
    "trace",
    "read_trace_timestamps",
    "windowed_rate",
]


class ArrivalError(ModelError):
    """Bad input to an arrival process (a ModelError, so every CLI maps it to exit code 2)."""


RngLike = np.random.Generator | int | None


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _rate(name: str, value: float, *, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ArrivalError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ArrivalError(f"{name} must be finite and {bound} (requests per second), got {value!r}")
    return value


def _length(n: int | None, duration: float | None) -> tuple[int | None, float | None]:
    """Validate the stopping rule: a request count, a time horizon, or both (whichever ends first)."""
    if n is None and duration is None:
        raise ArrivalError("give n (number of requests) or duration (seconds), or both")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ArrivalError(f"n must be an integer >= 0, got {n!r}")
        n = int(n)
    if duration is not None:
        duration = float(duration)
        if not math.isfinite(duration) or duration < 0:
            raise ArrivalError(f"duration must be finite and >= 0 seconds, got {duration!r}")
    return n, duration


def poisson(rate: float, n: int | None = None, duration: float | None = None, rng: RngLike = None) -> np.ndarray:
    """Homogeneous Poisson arrivals: the first n, or all in [0, duration), whichever ends first."""
    rate = _rate("rate", rate)
    n, duration = _length(n, duration)
    gen = _rng(rng)
    if n is not None:
        times = np.cumsum(gen.exponential(1.0 / rate, size=n))
        return times if duration is None else times[times < duration]
    # Given the count, Poisson points on an interval are uniform order statistics: no cumsum drift.
    count = int(gen.poisson(rate * duration))
    return np.sort(gen.uniform(0.0, duration, size=count))


def compound_poisson(rate: float, groups: CompoundPoisson, n: int | None = None, duration: float | None = None,
                     rng: RngLike = None) -> np.ndarray:
    """Requests in groups: group epochs Poisson at rate / G, each bringing X requests at one instant.

    X is geometric with mean G or the model's empirical law; the result repeats each epoch X times
    (the first n requests, or all in [0, duration)).
    """
    rate = _rate("rate", rate)
    if not isinstance(groups, CompoundPoisson):
        raise ArrivalError(f"compound_poisson needs a CompoundPoisson group law, got {type(groups).__name__}")
    n, duration = _length(n, duration)
    gen = _rng(rng)
    lam_g = rate / groups.group_mean
    epochs: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    total, clock = 0, 0.0
    block = max(16, int((n if n is not None else rate * duration) / groups.group_mean * 1.1) + 16)
    while True:
        t = clock + np.cumsum(gen.exponential(1.0 / lam_g, size=block))
        if groups.group_pmf is None:
            x = gen.geometric(1.0 / groups.group_mean, size=block)
        else:
            q = np.asarray(groups.group_pmf)
            x = gen.choice(q.size, size=block, p=q)
        epochs.append(t)
        sizes.append(x)
        total += int(x.sum())
        clock = float(t[-1])
        if (n is not None and total >= n) or (duration is not None and clock >= duration):
            break  # whichever ends first
    times = np.repeat(np.concatenate(epochs), np.concatenate(sizes))
    if duration is not None:
        times = times[times < duration]
    if n is not None:
        times = times[:n]
    return times


def mmpp2_path(process: MMPP2, n: int, rng: RngLike = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first n arrivals of an MMPP (any number of phases; groups per phase for a batch MMPP) with its phase path.

    Returns (times, switch_times, phases): the phase is ``phases[i]`` (0..m - 1) on
    [switch_times[i], switch_times[i + 1]); switch_times[0] = 0 and the first phase is drawn from the
    stationary law. The phase at time t is ``phases[searchsorted(switch_times, t, "right") - 1]``.
    """
    if not isinstance(process, MMPP2):
        raise ArrivalError(f"mmpp2_path needs an MMPP2, got {type(process).__name__}")
    n, _ = _length(n, None)
    gen = _rng(rng)
    lam = np.asarray(process.rates)
    leave = np.asarray(process.leave_rates)
    m = process.phases
    if m == 2:  # two phases draw exactly as they always have
        phase = int(gen.random() >= process.stationary[0])
    else:
        phase = min(int(np.searchsorted(np.cumsum(process.stationary), gen.random(), side="right")), m - 1)
        jump = process.generator.copy()
        np.fill_diagonal(jump, 0.0)
        jump_cdf = np.cumsum(jump / leave[:, None], axis=1)
    starts, phases, durs = [0.0], [phase], []
    expected, clock = 0.0, 0.0
    target = n + 5.0 * math.sqrt(n) + 10.0
    while True:
        d = float(gen.exponential(1.0 / leave[phase]))
        durs.append(d)
        expected += d * lam[phase]
        clock += d
        if expected >= target:
            break
        if m == 2:
            phase = 1 - phase
        else:
            phase = min(int(np.searchsorted(jump_cdf[phase], gen.random(), side="right")), m - 1)
        starts.append(clock)
        phases.append(phase)
    d = np.asarray(durs)
    ph = np.asarray(phases, dtype=np.int64)
    if process.groups is None:
        times = _piecewise(d, lam[ph], gen, n, None)
    else:  # group instants at rates[i] / G_i, each repeated by a size drawn from its phase's law
        epochs = _piecewise(d, np.asarray(process.epoch_rates)[ph], gen, None, None)
        at = ph[np.searchsorted(np.asarray(starts), epochs, side="right") - 1]
        sizes = np.empty(epochs.size, dtype=np.int64)
        for i, law in enumerate(process.groups):
            sel = np.nonzero(at == i)[0]
            if law.group_pmf is None:
                sizes[sel] = gen.geometric(1.0 / law.group_mean, size=sel.size)
            else:
                q = np.asarray(law.group_pmf)
                sizes[sel] = gen.choice(q.size, size=sel.size, p=q)
        times = np.repeat(epochs, sizes)[:n]
    if times.size < n:  # an unlucky draw below the margin: append more of the path
        more, st2, ph2 = mmpp2_path(process, n - times.size, gen)
        times = np.concatenate((times, clock + more))
        return times, np.concatenate((np.asarray(starts), clock + st2)), np.concatenate((ph, ph2))
    return times, np.asarray(starts), ph


def from_model(process: ArrivalModel, rate: float, n: int, rng: RngLike = None) -> np.ndarray:
    """n arrival times from an arrival model at mean rate ``rate`` (an MMPP carries its own rates)."""
    if isinstance(process, Poisson):
        return poisson(rate, n=n, rng=rng)
    if isinstance(process, CompoundPoisson):
        return compound_poisson(rate, process, n=n, rng=rng)
    return mmpp2_path(process, n, rng)[0]


def _piecewise(durations: np.ndarray, rates: np.ndarray, gen: np.random.Generator,
               n: int | None, duration: float | None) -> np.ndarray:
    """Poisson arrivals with rate rates[i] during consecutive segments of length durations[i]."""
    starts = np.concatenate(([0.0], np.cumsum(durations)[:-1]))
    counts = gen.poisson(rates * durations)
    seg = np.repeat(np.arange(durations.size), counts)
    times = np.sort(starts[seg] + gen.uniform(0.0, 1.0, size=seg.size) * durations[seg])
    if duration is not None:
        times = times[times < duration]
    if n is not None:
        times = times[:n]
    return times


def steps(schedule: Sequence[tuple[float, float]], rng: RngLike = None, *, n: int | None = None) -> np.ndarray:
    """Piecewise-constant rate: ``[(duration_s, rate), ...]`` back to back from time 0.

    A rate of 0 is a silent period. Load tests use this for step changes of the arrival rate.
    """
    if len(schedule) == 0:
        raise ArrivalError("steps schedule is empty: give at least one (duration_s, rate) pair")
    durations, rates = [], []
    for i, item in enumerate(schedule):
        try:
            d, r = item
        except (TypeError, ValueError):
            raise ArrivalError(f"steps entry {i} must be a (duration_s, rate) pair, got {item!r}") from None
        d = float(d)
        if not math.isfinite(d) or d <= 0:
            raise ArrivalError(f"steps entry {i}: duration must be finite and > 0 seconds, got {d!r}")
        durations.append(d)
        rates.append(_rate(f"steps entry {i}: rate", r, allow_zero=True))
    if n is not None:
        _length(n, None)
    return _piecewise(np.asarray(durations), np.asarray(rates), _rng(rng), n, None)


def ramp(start_rate: float, end_rate: float, duration: float, rng: RngLike = None) -> np.ndarray:
    """Rate moving linearly from start_rate to end_rate over [0, duration): an exact
    non-homogeneous Poisson process (unit-rate points mapped through the inverse cumulative rate).
    """
    r0 = _rate("start_rate", start_rate, allow_zero=True)
    r1 = _rate("end_rate", end_rate, allow_zero=True)
    _, duration = _length(None, duration)
    if duration == 0 or r0 + r1 == 0:
        return np.empty(0)
    gen = _rng(rng)
    total = 0.5 * (r0 + r1) * duration  # Lambda(duration)
    count = int(gen.poisson(total))
    u = np.sort(gen.uniform(0.0, total, size=count))
    slope = (r1 - r0) / duration
    if abs(slope) * duration < 1e-12 * max(r0, r1):
        return u / r0
    # Lambda(t) = r0 t + slope t^2 / 2 = u; the stable root of the quadratic.
    return 2.0 * u / (r0 + np.sqrt(r0 * r0 + 2.0 * slope * u))


def mmpp(rates: Sequence[float], switching: Sequence[float] | np.ndarray, n: int | None = None,
         duration: float | None = None, rng: RngLike = None, initial: int | None = None) -> np.ndarray:
    """Markov-modulated Poisson process: arrivals at rates[i] while a hidden CTMC is in state i.

    ``switching`` is either the CTMC generator (m x m, rows summing to 0) or a vector of leaving
    rates (state i is left at rate switching[i] for a uniformly chosen other state; for two states
    the usual on/off MMPP). The chain starts in ``initial`` or, by default, in its stationary law, so
    the long-run mean rate is pi . rates from the first arrival on.
    """
    lam = np.asarray([_rate(f"rates[{i}]", r, allow_zero=True) for i, r in enumerate(rates)], dtype=float)
    m = lam.size
    if m < 1:
        raise ArrivalError("mmpp needs at least one state rate")
    q = np.asarray(switching, dtype=float)
    if q.ndim == 1:
        if q.size != m:
            raise ArrivalError(f"mmpp: {q.size} switching rates for {m} states")
        if np.any(~np.isfinite(q)) or np.any(q < 0):
            raise ArrivalError(f"mmpp switching rates must be finite and >= 0, got {q.tolist()}")
        if m == 1:
            gen_q = np.zeros((1, 1))
        else:
            gen_q = np.repeat((q / (m - 1))[:, None], m, axis=1)
            np.fill_diagonal(gen_q, -q)
    elif q.ndim == 2 and q.shape == (m, m):
        off = q - np.diag(np.diag(q))
        if np.any(~np.isfinite(q)) or np.any(off < 0) or not np.allclose(q.sum(axis=1), 0.0, atol=1e-9 * max(1.0, np.abs(q).max())):
            raise ArrivalError("mmpp generator must be finite with off-diagonal entries >= 0 and rows summing to 0")
        gen_q = q
    else:
        raise ArrivalError(f"mmpp switching must be a length-{m} vector or an {m}x{m} generator, got shape {q.shape}")
    n, duration = _length(n, duration)
    gen = _rng(rng)
    leave = -np.diag(gen_q)
    jump = np.zeros((m, m))
    for i in range(m):
        if leave[i] > 0:
            jump[i] = np.where(np.arange(m) == i, 0.0, gen_q[i] / leave[i])
    pi = _stationary(gen_q)
    if initial is None:
        state = int(gen.choice(m, p=pi))
    else:
        if not 0 <= int(initial) < m:
            raise ArrivalError(f"mmpp initial state must be in 0..{m - 1}, got {initial!r}")
        state = int(initial)
    if n is not None and duration is None and not np.any(lam > 0):
        raise ArrivalError("mmpp with all rates 0 never produces n arrivals")

    # Simulate sojourns in blocks until the stopping rule is met; arrivals within a sojourn are a
    # homogeneous Poisson segment, so the per-arrival work stays vectorised.
    cum_jump = np.cumsum(jump, axis=1)
    seg_d: list[float] = []
    seg_r: list[float] = []
    elapsed, expected = 0.0, 0.0
    target = None if n is None else n + 5.0 * math.sqrt(n) + 10.0
    while True:
        rate_now = lam[state]
        stay = gen.exponential(1.0 / leave[state]) if leave[state] > 0 else math.inf
        if duration is not None:
            stay = min(stay, duration - elapsed)
        elif math.isinf(stay):  # absorbing state: stay long enough for the remaining requests
            if rate_now == 0:
                raise ArrivalError("mmpp reaches an absorbing state with rate 0: it never produces n arrivals")
            stay = 2.0 * (target - expected) / rate_now
        seg_d.append(stay)
        seg_r.append(rate_now)
        elapsed += stay
        expected += stay * rate_now
        if duration is not None and elapsed >= duration:
            break
        if target is not None and duration is None and expected >= target:
            break
        if leave[state] > 0:
            state = min(int(np.searchsorted(cum_jump[state], gen.random(), side="right")), m - 1)
    d = np.asarray(seg_d)
    r = np.asarray(seg_r)
    keep = d > 0
    times = _piecewise(d[keep], r[keep], gen, n, duration)
    if n is not None and duration is None and times.size < n:
        # Unlucky draw below the expected-count margin: continue from where the chain stands.
        if leave[state] > 0:
            state = min(int(np.searchsorted(cum_jump[state], gen.random(), side="right")), m - 1)
        more = mmpp(lam, gen_q, n=n - times.size, rng=gen, initial=state)
        times = np.concatenate((times, float(d.sum()) + more))
    return times


def _stationary(gen_q: np.ndarray) -> np.ndarray:
    m = gen_q.shape[0]
    if m == 1:
        return np.ones(1)
    a = np.vstack((gen_q.T, np.ones(m)))
    b = np.zeros(m + 1)
    b[-1] = 1.0
    pi, *_ = np.linalg.lstsq(a, b, rcond=None)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def read_trace_timestamps(path: str | Path, column: str = "TIMESTAMP") -> np.ndarray:
    """The raw timestamps of a trace CSV as datetime64[ns] (the Azure LLM traces' format)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ArrivalError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ArrivalError(f"trace {path} is not a text CSV file") from None
    lines = text.splitlines()
    if not lines:
        raise ArrivalError(f"trace {path} is empty")
    header = [h.strip() for h in lines[0].split(",")]
    if column not in header:
        raise ArrivalError(f"trace {path}: no {column!r} column in header {header}")
    col = header.index(column)
    rows = [ln for ln in lines[1:] if ln.strip()]
    if not rows:
        raise ArrivalError(f"trace {path} has a header but no requests")
    try:
        if col == 0:
            fields = [ln.split(",", 1)[0] for ln in rows]
        else:
            fields = [ln.split(",")[col] for ln in rows]
        stamps = np.array(fields, dtype="datetime64[ns]")
    except (ValueError, IndexError) as exc:
        raise ArrivalError(f"trace {path}: cannot parse {column} (expected 'YYYY-MM-DD HH:MM:SS.fffffff'): {exc}") from None
    if np.isnat(stamps).any():
        raise ArrivalError(f"trace {path}: empty {column} at row {int(np.argmax(np.isnat(stamps))) + 2}")
    back = np.diff(stamps) < np.timedelta64(0, "ns")
    if back.any():
        raise ArrivalError(f"trace {path}: timestamps go backwards at row {int(np.argmax(back)) + 3}; the file must be sorted")
    return stamps


def trace(path: str | Path, time_scale: float = 1.0, target_rate: float | None = None,
          start: int = 0, limit: int | None = None) -> np.ndarray:
    """Replay a recorded trace: rows start..start+limit-1, shifted so the first is at time 0.

    ``time_scale`` > 1 compresses time (2.0 = twice as fast, same burst shape); ``target_rate``
    instead rescales time so the mean rate, (requests - 1) / span, equals it. Only one may be used.
    """
    scale = float(time_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ArrivalError(f"time_scale must be finite and > 0, got {time_scale!r}")
    if target_rate is not None:
        target_rate = _rate("target_rate", target_rate)
        if scale != 1.0:
            raise ArrivalError("give time_scale or target_rate, not both")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ArrivalError(f"start must be a row index >= 0, got {start!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ArrivalError(f"limit must be an integer >= 1, got {limit!r}")
    stamps = read_trace_timestamps(path)
    if start >= stamps.size:
        raise ArrivalError(f"start row {start} is past the end of trace {path} ({stamps.size} requests)")
    stamps = stamps[start: None if limit is None else start + limit]
    times = (stamps - stamps[0]).astype(np.int64) * 1e-9
    if target_rate is not None:
        if times.size < 2 or times[-1] <= 0:
            raise ArrivalError(f"trace {path}: need two distinct timestamps to rescale to a target rate")
        scale = target_rate * times[-1] / (times.size - 1)
    return times / scale


def windowed_rate(times: np.ndarray, window_s: float, horizon_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise arrival rate over consecutive windows: (window start times, requests per second).

    The last window is partial when the horizon is not a multiple of the window; its rate is per
    second of its own length, so a constant-rate stream gives a flat line.
    """
    window_s = float(window_s)
    if not math.isfinite(window_s) or window_s <= 0:
        raise ArrivalError(f"window_s must be finite and > 0, got {window_s!r}")
    t = np.asarray(times, dtype=float)
    if t.ndim != 1:
        raise ArrivalError("times must be a 1-d array")
    end = float(horizon_s) if horizon_s is not None else (float(t[-1]) if t.size else 0.0)
    if not math.isfinite(end) or end <= 0:
        raise ArrivalError(f"horizon must be finite and > 0 seconds, got {end!r}")
    k = max(1, math.ceil(end / window_s - 1e-12))
    edges = np.minimum(np.arange(k + 1) * window_s, end)
    edges[-1] = end
    counts = np.histogram(t, bins=edges)[0]
    return edges[:-1], counts / np.diff(edges)
