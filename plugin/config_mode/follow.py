"""Config mode, closed loop: follow the arrival rate from Triton's statistics and re-compile.

One-shot config mode (``smdp config-mode --rate R``) compiles the SMDP policy for one rate; nothing
follows the load. Here the rate is measured without a hop in the data path: Triton's statistics API
gives a cumulative request count per model (``inference_stats.success.count``), polled every
``poll_s`` seconds. Each difference of two samples is a Poisson count over the poll interval, fed to
the project's ``RateEstimator`` through its count entry point (``observe_count``): the same sliding
window, exact confidence interval and two-sided CUSUM the gate uses on arrival timestamps.

``RateFollower`` (pure, time passed in) asks for a re-compile when

- no policy is in force yet, ``settle_s`` have passed and the estimate is good enough: its
  confidence interval fits in the band (with ``min_arrivals`` at least), or the window is full;
- the CUSUM fires (the rate moved by ``change_ratio`` or more from the rate the policy in force was
  compiled for); the estimate then restarts from the change point, and the request waits until
  ``settle_s`` of the new regime is in the window, so the policy is compiled for the new rate, not
  for the first, mixed, poll interval;
- or the window's estimate leaves the policy's rate band (more than ``band`` away, relatively) and
  ``band_confidence`` interval (99.9%: the test is repeated at every poll) excludes the rate in
  force: slow drifts the CUSUM, tuned to ``change_ratio``, is slow to see.

A request is not repeated while its compile is in flight; the rate asked for is clamped to
[``min_rate``, ``max_rate``] (the solver needs a rate above zero and below capacity), and one that
is within the band of the rate in force is dropped (the detector is re-armed instead).

Counter restarts: a model reload (which is what applying a config does) restarts Triton's statistics
at zero, and requests the old model served during the swap are not in the new count. A count below
the previous one, or a sample the caller marks ``restarted``, is a restart, never negative traffic:
the interval is credited with the larger of the new count and the current estimate times the
interval, so the estimate and the detector see neither a bogus dip nor a bogus burst.

``FollowLoop`` runs it: a poll loop (never blocked by a compile or a reload) and one worker thread
that compiles (``compile_policy`` simulates: keep its request count modest) and applies through the
rate-limited ``ConfigModeApplier``. Its inputs are callables, so it is tested without a network.
Counted requests are completions, not arrivals: the two rates agree in steady state, and a change
shows up one latency late.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from solver.quantities import check_number

from ..loop.rate import RateEstimate, RateEstimator, poisson_rate_interval

__all__ = ["FollowChange", "FollowLoop", "Recompile", "RateFollower", "request_count"]


def request_count(stats: dict[str, Any], model: str | None = None) -> int:
    """Successful requests of ``model`` (all versions) in a ``get_inference_statistics(as_json=True)`` reply."""
    total = 0
    for entry in stats.get("model_stats", []):
        if model is not None and entry.get("name") != model:
            continue
        success = entry.get("inference_stats", {}).get("success", {})
        total += int(success.get("count", 0) or 0)  # protobuf JSON: 64-bit ints as strings, zeros omitted
    return total


@dataclass(frozen=True)
class Recompile:
    """A request to compile the policy for ``rate`` (already clamped), and why."""

    rate: float
    estimate: RateEstimate
    reason: str
    """"first", "up", "down" (the CUSUM fired) or "band" (the window left the rate band)."""
    at: float


class RateFollower:
    """Rate from polled cumulative counts; when to re-compile. Pure: times are passed in."""

    def __init__(
        self,
        *,
        window_s: float = 30.0,
        buckets: int = 60,
        change_ratio: float = 2.0,
        false_alarm_arrivals: float = 1e6,
        band: float = 0.3,
        settle_s: float = 3.0,
        min_arrivals: int = 50,
        min_rate: float = 1.0,
        max_rate: float = math.inf,
        confidence: float = 0.95,
        band_confidence: float = 0.999,
    ) -> None:
        self._kw = dict(window_s=window_s, buckets=buckets, confidence=confidence, change_ratio=change_ratio,
                        false_alarm_arrivals=false_alarm_arrivals, min_arrivals=min_arrivals)
        RateEstimator(0.0, **self._kw)  # validates
        self.band = check_number("band", band)
        self.band_confidence = check_number("band_confidence", band_confidence, high=1.0)
        self.settle_s = check_number("settle_s", settle_s, inclusive=True)
        self.min_rate = check_number("min_rate", min_rate)
        self.max_rate = float(max_rate)
        if not self.max_rate > self.min_rate:
            raise ValueError(f"max_rate must be above min_rate ({self.min_rate}), got {max_rate!r}")
        self.min_arrivals = int(min_arrivals)
        self.estimator: RateEstimator | None = None
        self.reference: float | None = None
        """The rate the policy in force (or being applied) was compiled for."""
        self.resets = 0
        """Counter restarts seen."""
        self.last: tuple[float, int] | None = None
        """The previous sample (time, cumulative count)."""
        self._in_flight: Recompile | None = None
        self._retry_at = -math.inf

    @property
    def in_flight(self) -> Recompile | None:
        return self._in_flight

    def estimate(self, now: float) -> RateEstimate | None:
        return None if self.estimator is None else self.estimator.estimate(now)

    def sample(self, t: float, count: int, *, restarted: bool = False) -> Recompile | None:
        """Triton's cumulative count at time t; a re-compile request, or None.

        ``restarted``: the caller knows the counter restarted since the previous sample (it
        reloaded the model); a count below the previous one is taken as a restart anyway.
        """
        t = float(t)
        count = int(count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count!r}")
        if self.last is None:  # the count since Triton started covers an unknown span: a baseline only
            self.last = (t, count)
            self.estimator = RateEstimator(t, **self._kw)
            if self.reference is not None:
                self.estimator.reset(t, self.reference)
            return None
        t0, c0 = self.last
        if t < t0:
            raise ValueError(f"sample time {t!r} is before the previous one ({t0!r})")
        est = self.estimator
        assert est is not None
        if count < c0 or restarted:
            self.resets += 1
            before = est.estimate(t0)
            filled = before.rate * (t - t0) if before.n > 0 else 0.0
            delta = max(count, int(round(filled)))
        else:
            delta = count - c0
        self.last = (t, count)
        est.observe_count(t, delta)
        return self._decide(t)

    def _decide(self, now: float) -> Recompile | None:
        est = self.estimator
        assert est is not None
        if self._in_flight is not None or now < self._retry_at:
            return None
        e = est.estimate(now)
        ref = self.reference
        if ref is None:
            est_w = self.estimator.window_s
            full = e.span_s >= est_w - est_w / self._kw["buckets"] - 1e-9  # the window starts at a bucket mark
            tight = e.n >= self.min_arrivals and e.lo > 0 and e.hi / e.lo <= 1.0 + self.band
            if e.span_s < self.settle_s or e.n == 0 or not (tight or full):
                return None
            reason = "first"
        elif est.alarm is not None or est.changed(now):
            if e.span_s < self.settle_s:
                return None  # let the new regime fill the estimate first
            reason = est.alarm or "changed"
        elif e.span_s >= self.settle_s and self._outside(e.rate, ref) and not self._plausible(e, ref):
            reason = "band"
        else:
            return None
        rate = min(max(e.rate, self.min_rate), self.max_rate)
        if ref is not None and not self._outside(rate, ref):
            est.reset(now, ref)  # a move that the band does not count: keep the policy, re-arm
            return None
        self._in_flight = Recompile(rate, e, reason, now)
        return self._in_flight

    def _plausible(self, e: RateEstimate, ref: float) -> bool:
        """``ref`` is inside the estimate's ``band_confidence`` interval (polled every second, the
        band test is repeated often: a 95% interval would be left by noise alone now and then)."""
        lo, hi = poisson_rate_interval(e.n, e.span_s, self.band_confidence)
        return lo <= ref <= hi

    def _outside(self, rate: float, ref: float) -> bool:
        lo, hi = sorted((rate, ref))
        return lo <= 0 or hi / lo > 1.0 + self.band

    def start_at(self, rate: float, now: float) -> Recompile:
        """Ask for a policy at a given rate before anything is measured (``--rate`` with ``--follow``)."""
        rate = min(max(check_number("rate", rate), self.min_rate), self.max_rate)
        e = RateEstimate(rate=rate, lo=rate, hi=rate, n=0, span_s=0.0, confidence=self._kw["confidence"])
        self._in_flight = Recompile(rate, e, "given", float(now))
        return self._in_flight

    def compiled(self, rate: float, now: float) -> None:
        """The policy for ``rate`` is now in force (or waiting for the reload throttle)."""
        rate = check_number("rate", rate)
        self.reference = rate
        self._in_flight = None
        if self.estimator is not None:
            self.estimator.reset(max(now, self.last[0] if self.last else now), rate)

    def failed(self, now: float) -> None:
        """The requested compile failed: ask again, at the earliest ``settle_s`` from now."""
        self._in_flight = None
        self._retry_at = now + max(self.settle_s, 1.0)


# ------------------------------------------------------------------------------------------------
# The loop


class _Applier(Protocol):
    def submit(self, settings: Any) -> Any: ...

    def poll(self) -> Any: ...

    @property
    def pending(self) -> Any: ...


@dataclass(frozen=True)
class FollowChange:
    """One re-compile: what it was for and what became of it."""

    at: float
    rate: float
    reason: str
    estimate: RateEstimate
    settings: Any
    """``DynamicBatchingSettings`` (None when the compile failed)."""
    predicted_j: float
    """The SMDP's exact J at ``rate``; NaN when the compile failed."""
    compiled_j: float
    """The compiled rule's simulated J."""
    status: str
    """"applied", "unchanged", "pending", "dry-run" or "failed"."""
    reload_s: float = 0.0
    error: str = ""


class FollowLoop:
    """Poll ``read_count`` every ``poll_s``; compile and apply off the poll loop.

    ``compile(rate)`` returns a ``CompiledPolicy``; ``applier`` is a ``ConfigModeApplier`` (or None:
    compile and log only). ``run(stop)`` blocks until ``stop`` is set, then waits for the job in
    progress (a reload is not cut off half-way).
    """

    def __init__(
        self,
        follower: RateFollower,
        read_count: Callable[[], int],
        compile: Callable[[float], Any],
        applier: _Applier | None,
        *,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = print,
        verbose: bool = False,
    ) -> None:
        self.follower = follower
        self.verbose = verbose
        self.poll_s = check_number("poll_s", poll_s)
        self._read = read_count
        self._compile = compile
        self.applier = applier
        self._clock = clock
        self._log = log
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._outstanding = 0  # jobs queued or running
        self._reloading = False
        self._restarted = False
        self.changes: list[FollowChange] = []
        self.samples: list[tuple[float, int, float]] = []
        """(time, cumulative count, estimated rate) per poll."""
        self.read_errors = 0

    # -- the worker ------------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:  # a job must not kill the worker; it logs its own errors
                self._log(f"config-follow: unexpected error: {exc!r}")
            finally:
                with self._lock:
                    self._outstanding -= 1

    def _submit_job(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._outstanding += 1
        self._jobs.put(job)

    @property
    def busy(self) -> bool:
        """A compile or reload is queued or running."""
        with self._lock:
            return self._outstanding > 0

    def _reload(self, call: Callable[[], Any]) -> Any:
        with self._lock:
            self._reloading = True
        try:
            return call()
        finally:
            with self._lock:
                self._reloading = False

    def _after_apply(self, outcome: Any) -> None:
        if outcome is not None and getattr(outcome, "status", None) == "applied":
            with self._lock:
                self._restarted = True  # the reload restarted Triton's statistics

    def _recompile(self, req: Recompile) -> None:
        from .compiler import ConfigModeError, size_ranges

        try:
            compiled = self._compile(req.rate)
        except Exception as exc:  # ModelError (rate at capacity), ValueError
            self.follower.failed(self._clock())
            self.changes.append(FollowChange(req.at, req.rate, req.reason, req.estimate, None, math.nan, math.nan,
                                             "failed", error=str(exc)))
            self._log(f"config-follow: compiling for {req.rate:.1f}/s failed: {exc}")
            return
        self.follower.compiled(req.rate, self._clock())
        s = compiled.settings
        status, reload_s, error = "dry-run", 0.0, ""
        if self.applier is not None:
            try:
                outcome = self._reload(lambda: self.applier.submit(s))
                self._after_apply(outcome)
                status, reload_s = outcome.status, outcome.reload_s
            except ConfigModeError as exc:
                status, error = "failed", str(exc)
        e = req.estimate
        change = FollowChange(req.at, req.rate, req.reason, e, s, float(compiled.smdp_predicted.cost),
                              float(compiled.compiled_simulated.cost), status, reload_s, error)
        self.changes.append(change)
        self._log(
            f"config-follow: rate {req.rate:.1f}/s ({req.reason}; estimate {e.rate:.1f} [{e.lo:.1f}, {e.hi:.1f}] "
            f"over {e.span_s:.1f} s) -> preferred_batch_size {size_ranges(s.preferred_batch_size)}, "
            f"max_queue_delay_microseconds {s.max_queue_delay_microseconds}; predicted J "
            f"{change.predicted_j:.6g} (compiled rule {change.compiled_j:.6g}): {status}"
            + (f" in {reload_s:.2f} s" if status == "applied" else "") + (f" ({error})" if error else ""))

    def _apply_pending(self) -> None:
        from .compiler import ConfigModeError

        try:
            outcome = self._reload(self.applier.poll)
        except ConfigModeError as exc:
            self._log(f"config-follow: {exc}")
            return
        self._after_apply(outcome)
        if outcome is not None:
            self._log(f"config-follow: held settings {outcome.status}: {outcome.settings.describe()}"
                      + (f" in {outcome.reload_s:.2f} s" if outcome.status == "applied" else ""))
            if self.changes and outcome.status == "applied":
                last = self.changes[-1]
                if last.settings == outcome.settings and last.status == "pending":
                    self.changes[-1] = FollowChange(last.at, last.rate, last.reason, last.estimate, last.settings,
                                                    last.predicted_j, last.compiled_j, "applied", outcome.reload_s)

    # -- the poll loop ---------------------------------------------------------------------------

    def submit(self, req: Recompile) -> None:
        """Queue a re-compile the caller asked the follower for (``RateFollower.start_at``)."""
        self._submit_job(lambda: self._recompile(req))

    def step(self) -> Recompile | None:
        """One poll: sample the count (unless a reload is under way) and queue what it asks for."""
        with self._lock:
            if self._reloading:
                return None  # the counter restarts mid-reload: sample once it is done
            restarted, self._restarted = self._restarted, False
        try:
            count = self._read()
        except Exception as exc:
            self.read_errors += 1
            with self._lock:
                self._restarted = self._restarted or restarted
            if self.read_errors in (1, 10) or self.read_errors % 100 == 0:
                self._log(f"config-follow: reading Triton's statistics failed ({self.read_errors}x): {exc}")
            return None
        now = self._clock()
        req = self.follower.sample(now, count, restarted=restarted)
        e = self.follower.estimate(now)
        self.samples.append((now, count, e.rate if e is not None else math.nan))
        if self.verbose and e is not None:
            self._log(f"config-follow: sample count {count}{' (restarted)' if restarted else ''}: rate {e.rate:.1f} "
                      f"[{e.lo:.1f}, {e.hi:.1f}] over {e.span_s:.1f} s, policy for "
                      + ("-" if self.follower.reference is None else f"{self.follower.reference:.1f}/s"))
        if req is not None:  # the follower asks for nothing more until this one is done
            self._submit_job(lambda: self._recompile(req))
        elif not self.busy and self.applier is not None and self.applier.pending is not None:
            self._submit_job(self._apply_pending)
        return req

    def run(self, stop: threading.Event) -> None:
        worker = threading.Thread(target=self._worker, name="config-follow-worker", daemon=True)
        worker.start()
        try:
            next_at = self._clock()
            while not stop.is_set():
                self.step()
                next_at += self.poll_s
                delay = next_at - self._clock()
                if delay < 0:  # fell behind (a slow statistics call): do not burst to catch up
                    next_at, delay = self._clock(), 0.0
                stop.wait(delay)
        finally:
            self._jobs.put(None)
            worker.join()


# ------------------------------------------------------------------------------------------------
# Wiring to a real Triton

FOLLOW_SIM_REQUESTS = 5000
"""Simulated requests per delay tried when re-compiling while following (a few tenths of a second)."""


def policy_compiler(profile: Any, max_batch: int, *, weight: float, idle_power_w: float, style: str = "preferred",
                    n_requests: int = FOLLOW_SIM_REQUESTS, seed: int = 0) -> Callable[[float], Any]:
    """``rate -> CompiledPolicy``: solve the SMDP at the rate and compile it (``compile_policy``)."""
    from solver.model import BatchingModel
    from solver.smdp import solve

    from .compiler import compile_policy

    def compile(rate: float) -> Any:
        model = BatchingModel(rate=rate, max_batch=max_batch, profile=profile, idle_power_w=idle_power_w,
                              weight=weight)
        return compile_policy(solve(model), model.profile, model.rate, idle_power_w=model.idle_power_w,
                              weight=model.weight, style=style, n_requests=n_requests, seed=seed)

    return compile


def capacity_of(profile: Any, max_batch: int) -> float:
    """B / tau(B) of ``profile`` truncated to B: the rates a policy can be solved for lie below it."""
    return max_batch / float(profile.truncated(max_batch).mean_s[max_batch - 1])


def triton_request_counter(triton_url: str, model: str, timeout_s: float = 5.0) -> tuple[Callable[[], int], Callable[[], None]]:
    """(read, close): ``read()`` is the model's cumulative successful request count on Triton."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_url)

    def read() -> int:
        return request_count(client.get_inference_statistics(model, as_json=True, client_timeout=timeout_s), model)

    return read, client.close


def follow_triton(
    triton_url: str,
    model: str,
    profile: Any,
    *,
    weight: float,
    idle_power_w: float,
    max_batch: int | None = None,
    style: str = "preferred",
    n_requests: int = FOLLOW_SIM_REQUESTS,
    seed: int = 0,
    poll_s: float = 1.0,
    min_interval_s: float = 10.0,
    dry_run: bool = False,
    follower: RateFollower | None = None,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> tuple[FollowLoop, Callable[[], None]]:
    """A ``FollowLoop`` on one model of one Triton, and the function that closes its clients.

    B is the model's ``max_batch_size`` unless given; the follower's ``max_rate`` is set to 95% of
    the profile's capacity at B (the solver has no policy at or above it).
    """
    from .compiler import ConfigModeApplier

    applier = ConfigModeApplier(triton_url, model, min_interval_s=min_interval_s)
    read, close_reader = triton_request_counter(triton_url, model)

    def close() -> None:
        applier.close()
        close_reader()

    try:
        if max_batch is None:
            max_batch = int(applier.config().get("max_batch_size", 0)) or profile.max_batch
        cap = capacity_of(profile, max_batch)
        if follower is None:
            follower = RateFollower(max_rate=0.95 * cap)
        else:
            follower.max_rate = min(follower.max_rate, 0.95 * cap)
        compile = policy_compiler(profile, max_batch, weight=weight, idle_power_w=idle_power_w, style=style,
                                  n_requests=n_requests, seed=seed)
        loop = FollowLoop(follower, read, compile, None if dry_run else applier, poll_s=poll_s, log=log, verbose=verbose)
    except BaseException:
        close()
        raise
    return loop, close
