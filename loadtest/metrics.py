"""From an open-loop run's per-request records to W, P, J: the figures every bench row reports.

Power on a CPU-only host is modelled, never measured: each response carries the size b of the batch
that served it and that batch's energy e(b) (the emulated model's BATCH_ENERGY_J, per batch, not per
row). A one-row request therefore owns 1/b of its batch, so summing e/b over the answered requests
counts every batch's energy exactly once without knowing which requests shared a batch; the same
shares give the number of batches (sum 1/b) and the busy time (sum tau(b)/b). Idle time draws P0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from plugin.placement import Placement
from solver import quantities
from solver.model import ServiceProfile

from .openloop import LoadError, OpenLoopResult

__all__ = ["Measured", "measure", "batch_histogram", "power_note"]


def power_note(profile_name: str, idle_power_w: float) -> str:
    """The sentence every report carries, since no power meter is involved."""
    return f"power modelled from the {profile_name} profile, idle P0 = {idle_power_w:g} W assumed"


@dataclass(frozen=True)
class Measured:
    """What one contender did on one arrival sequence (latencies in seconds, power in watts)."""

    requests: int
    ok: int
    failed: int
    mean_latency_s: float
    p50_latency_s: float
    p95_latency_s: float
    p99_latency_s: float
    mean_power_w: float
    cost: float
    """J = W + w P with the measured W and the modelled P."""
    throughput_rps: float
    """Answered requests per second of the measurement window."""
    mean_batch: float
    """Requests per batch, averaged over batches (as the solver reports it)."""
    busy_fraction: float
    horizon_s: float
    send_lag_mean_s: float
    send_lag_p99_s: float
    weight: float
    slo_attainment: float = math.nan
    """Share of the counted requests answered OK within the SLO's D (NaN: no SLO asked for)."""
    goodput_rps: float = math.nan
    """Requests answered OK within D per second of the window (NaN: no SLO asked for)."""


def _shares(result: OpenLoopResult, counted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch sizes and energies of the counted, answered requests that report them."""
    ok = counted & result.ok & (result.batch_size > 0)
    return result.batch_size[ok], result.batch_energy_j[ok]


def _window(result: OpenLoopResult, window: tuple[float, float] | None) -> tuple[float, float, np.ndarray]:
    """(start, end, mask of requests scheduled in [start, end)); by default the whole run, from the
    first arrival to the last answer."""
    if window is None:
        start = float(result.scheduled_s.min()) if result.n else 0.0
        answered = ~np.isnan(result.done_s)
        end = float(np.nanmax(result.done_s)) if answered.any() else start
        return start, end, np.ones(result.n, dtype=bool)
    start, end = (float(x) for x in window)
    if not (math.isfinite(start) and math.isfinite(end) and end > start):
        raise LoadError(f"measurement window must be finite with end > start, got {window!r}")
    counted = (result.scheduled_s >= start) & (result.scheduled_s < end)
    return start, end, counted


def batch_histogram(result: OpenLoopResult, max_batch: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """Estimated number of batches of each size b = 1..max_batch (index b - 1) that served the
    counted requests: requests seen in batches of b, divided by b."""
    _, _, counted = _window(result, window)
    b, _ = _shares(result, counted)
    if b.size and b.max() > max_batch:
        raise LoadError(f"a response reports batch size {int(b.max())} > max_batch {max_batch}")
    counts = np.bincount(b, minlength=max_batch + 1)[1:].astype(float)
    return counts / np.arange(1, max_batch + 1)


def measure(result: OpenLoopResult, profile: ServiceProfile, *, idle_power_w: float, weight: float,
            energy_scale: float = 1.0, window: tuple[float, float] | None = None,
            slo_latency_s: float | None = None, placement: Placement | None = None) -> Measured:
    """Summarise a run over ``window`` (scheduled times, seconds; default the whole run).

    ``profile`` is the (time-scaled) profile the server emulates; it gives each batch's busy time.
    ``energy_scale`` multiplies the reported BATCH_ENERGY_J (the emulated model reports the unscaled
    e(b); a time_scale of s at unchanged power means s e(b) joules). Latency, batch sizes and energy
    are those of the requests scheduled in the window; power spreads that energy, plus P0 for the
    rest, over the window's length (``placement``: k instances on D devices, P0 once per device,
    ``Placement.modelled_power_w``; default one instance); throughput counts the answers that arrive
    within it.
    ``slo_latency_s`` (D): also the SLO attainment (share of the counted requests answered OK within
    D; a failed request counts as a miss) and the goodput (those requests per second of the window).
    """
    if slo_latency_s is not None and not (math.isfinite(slo_latency_s) and slo_latency_s > 0):
        raise LoadError(f"slo_latency_s must be finite and > 0 seconds, got {slo_latency_s!r}")
    quantities.idle_power(idle_power_w, error=LoadError)
    if not (math.isfinite(energy_scale) and energy_scale > 0):
        raise LoadError(f"energy_scale must be finite and > 0, got {energy_scale!r}")
    start, end, counted = _window(result, window)
    horizon = end - start
    ok_mask = result.ok
    good = counted & ok_mask
    lat = result.done_s[good] - result.scheduled_s[good]
    b, e = _shares(result, counted)
    if b.size and b.max() > profile.max_batch:
        raise LoadError(f"a response reports batch size {int(b.max())} beyond the profile's {profile.max_batch}")
    if b.size and np.any(np.isnan(e)):
        raise LoadError("some responses report BATCH_SIZE but no BATCH_ENERGY_J")
    batches = float(np.sum(1.0 / b)) if b.size else 0.0
    busy = float(np.sum(profile.mean_s[b - 1] / b)) if b.size else 0.0
    energy = float(np.sum(e / b)) * energy_scale if b.size else 0.0
    if horizon > 0 and b.size:
        where = placement if placement is not None else Placement(1, 1, "one instance")
        power = where.modelled_power_w(energy, busy, horizon, idle_power_w)
    else:
        power = math.nan
    if lat.size:
        w_mean = float(lat.mean())
        p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
    else:
        w_mean = p50 = p95 = p99 = math.nan
    done = result.done_s[ok_mask]
    answered_in = int(np.sum((done >= start) & (done < end)))
    sent = counted & ~np.isnan(result.sent_s)
    lag = result.sent_s[sent] - result.scheduled_s[sent]
    n_counted = int(counted.sum())
    within = int(np.sum(lat <= slo_latency_s)) if slo_latency_s is not None else 0
    attainment = within / n_counted if slo_latency_s is not None and n_counted else math.nan
    goodput = within / horizon if slo_latency_s is not None and horizon > 0 else math.nan
    return Measured(
        requests=n_counted,
        ok=int(good.sum()),
        failed=n_counted - int(good.sum()),
        mean_latency_s=w_mean,
        p50_latency_s=p50,
        p95_latency_s=p95,
        p99_latency_s=p99,
        mean_power_w=power,
        cost=w_mean + weight * power,
        throughput_rps=answered_in / horizon if horizon > 0 else math.nan,
        mean_batch=b.size / batches if batches > 0 else math.nan,
        busy_fraction=busy / horizon if horizon > 0 else math.nan,
        horizon_s=horizon,
        send_lag_mean_s=float(lag.mean()) if lag.size else math.nan,
        send_lag_p99_s=float(np.percentile(lag, 99)) if lag.size else math.nan,
        weight=weight,
        slo_attainment=attainment,
        goodput_rps=goodput,
    )
