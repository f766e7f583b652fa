"""Config mode: compile a solved policy into Triton's own ``dynamic_batching`` and apply it.

For deployments that want no hop in the data path. Triton's batcher cannot run a table a(n); it
runs a fixed rule with two knobs, and config mode chooses them:

Triton's rule (core/src/dynamic_batch_scheduler.cc, ``GetDynamicBatch``), for one instance in the
non-prefetch mode that priority levels select (a batch is formed only when the instance is idle)
and one row per request, with n requests queued, P the preferred sizes and d the delay:

  1. if d > 0 and the oldest request has waited >= d: serve min(n, B);
  2. else if some p in P has p <= n: serve f(n) = max{p in P : p <= n};
  3. else if d == 0: serve min(n, B)  (a zero delay never holds a request);
  4. else wait, and look again when the oldest reaches d (or on the next arrival).

``TritonBatcherRule`` is exactly that, as a ``BatchRule`` the simulator runs.

The mapping (``compile_policy``):

- A control-limit policy "wait below K, serve min(n, B) from K on" is ``P = {K, ..., B}`` with
  d = infinity, exactly. More generally a table is representable iff a(n) = f(n) for every n, with
  P = the sizes it serves: greedy (``P = {1..B}``) and static batching at b0 = B (``P = {B}``) are.
  The SMDP's optimum often is not: with energy piecewise affine in b (a published table
  interpolated) it keeps requests back to hit a kink, for instance serving 17 at n = 19 or 64 at
  every n from 91 to 114 on the V100 profile, which "the largest preferred size not above n"
  cannot express. P is then the sizes the table serves (plus B where that fits better), the
  states where Triton differs are listed in ``mismatched_states``, and the simulated J says what
  they cost (0.03% to 0.4% on the V100 profile at 300 to 3,000 requests/s).
- The delay is what a table does not have: a finite d makes Triton serve min(n, B) when the oldest
  request has waited d, which the policy would not do. It is required anyway (a request waiting
  for company must not wait forever when traffic stops), so the delay is chosen by simulating the
  compiled rule on Poisson arrivals at the rate over a grid of delays, on common random numbers,
  and taking the smallest delay whose simulated J is within ``rtol`` of the best on the grid.
- ``style="timeout"`` compiles to ``P = {B}`` plus the J-minimising delay: Triton's plain timeout
  rule (``solver.policy.TimeoutRule``), the honest baseline to compare against.

The result carries J three ways: the SMDP's exact prediction for its table, the table simulated,
and the compiled rule simulated on the same arrivals and service times; ``relative_gap`` is how
far the compiled rule is from the table. Limits: the simulation assumes one instance, non-prefetch
batching and single-row requests; Triton's own overheads (about 0.2 ms per batch on the emulated
model, see model_repository/README.md) are not in the profile; and large delays are capped at
1/500 of the simulated horizon so that the final drain (the simulator waits out the delay after the
last arrival) moves J by well under a percent.

Applying (``ConfigModeApplier``): read the model's config, change only ``preferred_batch_size`` and
``max_queue_delay_microseconds`` (priority levels, queue policy, parameters stay), and reload with
the repository API's load-with-config-override. Triton swaps the model in the background (about
1.4 s for the Python-backend model here) without failing a request. Reloads are rate-limited.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Literal, Sequence, TypeVar

import numpy as np

from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import Decision, PolicyTable, TimeoutRule

__all__ = [
    "ApplyOutcome",
    "CompiledPolicy",
    "ConfigModeApplier",
    "ConfigModeError",
    "DynamicBatchingSettings",
    "ReloadThrottle",
    "TritonBatcherRule",
    "compile_policy",
    "merge_settings",
    "preferred_sizes_for",
    "settings_from_config",
    "size_ranges",
]

Style = Literal["preferred", "timeout"]
STYLES = ("preferred", "timeout")
_MAX_DELAY_US = 3_600_000_000
"""One hour: far beyond any useful batching delay; a larger value is a unit mistake."""


class ConfigModeError(RuntimeError):
    """Reading or reloading a model's config failed; the message names the model, server and cause.

    ``retryable`` is False when trying again cannot help (the model does not batch, or has another
    max_batch_size than the settings were compiled for).
    """

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


# ------------------------------------------------------------------------------------------------
# The settings and Triton's rule


@dataclass(frozen=True)
class DynamicBatchingSettings:
    """The two ``dynamic_batching`` fields config mode sets, and the ``max_batch_size`` they assume."""

    preferred_batch_size: tuple[int, ...]
    max_queue_delay_microseconds: int
    max_batch_size: int
    """Not changed on the model: the compiled rule is only right when the model has this B."""

    def __post_init__(self) -> None:
        b = self.max_batch_size
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {b!r}")
        object.__setattr__(self, "max_batch_size", int(b))
        sizes = tuple(self.preferred_batch_size)
        if not sizes:
            raise ValueError("preferred_batch_size must list at least one size (Triton would add [max_batch_size])")
        for p in sizes:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 1 <= p <= b:
                raise ValueError(f"preferred batch size {p!r} is outside 1..max_batch_size={b}")
        sizes = tuple(int(p) for p in sizes)
        if list(sizes) != sorted(set(sizes)):
            raise ValueError(f"preferred_batch_size must be increasing without repeats, got {list(sizes)}")
        object.__setattr__(self, "preferred_batch_size", sizes)
        d = self.max_queue_delay_microseconds
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d <= _MAX_DELAY_US:
            raise ValueError(f"max_queue_delay_microseconds must be an integer in 0..{_MAX_DELAY_US}, got {d!r}")
        object.__setattr__(self, "max_queue_delay_microseconds", int(d))

    @property
    def delay_s(self) -> float:
        return self.max_queue_delay_microseconds / 1e6

    def rule(self) -> "TritonBatcherRule | TimeoutRule":
        """The batching rule Triton runs with these settings (for the simulator and the gate).

        ``P = {B}`` is exactly ``TimeoutRule``, which the simulator runs on a faster path.
        """
        if self.preferred_batch_size == (self.max_batch_size,):
            return TimeoutRule(self.max_batch_size, self.delay_s)
        return TritonBatcherRule(self.max_batch_size, self.preferred_batch_size, self.delay_s)

    def describe(self) -> str:
        return (f"preferred_batch_size: {size_ranges(self.preferred_batch_size)}, "
                f"max_queue_delay_microseconds: {self.max_queue_delay_microseconds} "
                f"(max_batch_size {self.max_batch_size})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "preferred_batch_size": list(self.preferred_batch_size),
            "max_queue_delay_microseconds": self.max_queue_delay_microseconds,
            "max_batch_size": self.max_batch_size,
        }


def size_ranges(sizes: Sequence[int]) -> str:
    """[1, 2, 3, 5, 8, 9] -> '1-3, 5, 8-9' (a compiled SMDP policy can list a hundred sizes)."""
    parts: list[str] = []
    i = 0
    s = list(sizes)
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        parts.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return "[" + ", ".join(parts) + "]"


@dataclass(frozen=True)
class TritonBatcherRule:
    """Triton's dynamic batcher with preferred sizes and a delay (the module docstring's rule)."""

    max_batch: int
    preferred: tuple[int, ...]
    delay_s: float
    _best: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """f(n) = max{p in P : p <= n} (0 if none) for n = 0..max(P); above max(P) it is max(P)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, (int, np.integer)) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")
        prefs = tuple(sorted(set(int(p) for p in self.preferred)))
        if not prefs or prefs[0] < 1 or prefs[-1] > self.max_batch:
            raise ValueError(f"preferred sizes must be non-empty and within 1..{self.max_batch}, got {list(self.preferred)}")
        if not math.isfinite(self.delay_s) or self.delay_s < 0:
            raise ValueError(f"delay must be finite and >= 0 seconds, got {self.delay_s!r}")
        object.__setattr__(self, "preferred", prefs)
        best = [0] * (prefs[-1] + 1)
        current = 0
        members = set(prefs)
        for n in range(prefs[-1] + 1):
            if n in members:
                current = n
            best[n] = current
        object.__setattr__(self, "_best", tuple(best))

    def serve_size(self, n: int) -> int:
        """f(n): what Triton serves at n before the delay expires (0 = it waits)."""
        return self._best[n] if n < len(self._best) else self._best[-1]

    def decide(self, n: int, oldest_wait_s: float) -> Decision:
        if n <= 0:
            return Decision(0)
        d = self.delay_s
        if d > 0 and oldest_wait_s >= d:
            return Decision(min(n, self.max_batch))
        f = self._best[n] if n < len(self._best) else self._best[-1]
        if f:
            return Decision(f)
        if d == 0:
            return Decision(min(n, self.max_batch))
        return Decision(0, d - oldest_wait_s)


# ------------------------------------------------------------------------------------------------
# Compiling


def _mismatches(policy: PolicyTable, preferred: Sequence[int], upto: int) -> list[int]:
    """States n <= upto at which Triton's f(n) (no delay expiry) differs from the policy's a(n)."""
    rule = TritonBatcherRule(policy.max_batch, tuple(preferred), 1.0)
    a = policy.extended(upto + 1)
    return [n for n in range(upto + 1) if rule.serve_size(n) != int(a[n])]


def preferred_sizes_for(policy: PolicyTable) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(P, mismatched states): the preferred sizes that reproduce ``policy`` best, and where they do not.

    P is the set of sizes the table serves; B is added when that makes fewer states differ (the
    table's beyond-N rule serves min(n, B), or its ``beyond`` size). Mismatches are counted on n = 0..N + B.
    """
    served = sorted({int(x) for x in policy.actions if x > 0})
    if not served:
        served = [policy.max_batch]  # a table that never serves below N: beyond N it serves B
    upto = policy.truncation + policy.max_batch
    options = [tuple(served)]
    if served[-1] != policy.max_batch:
        options.append(tuple(served) + (policy.max_batch,))
    scored = [(len(m), p, m) for p in options for m in [_mismatches(policy, p, upto)]]
    count, best, mism = min(scored, key=lambda x: x[0])
    return best, tuple(mism)


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """Settings for Triton, and how close Triton running them comes to the SMDP policy."""

    settings: DynamicBatchingSettings
    style: str
    rate: float
    weight: float
    idle_power_w: float
    exact: bool
    """Triton's rule equals the table on every state checked, up to the delay's expiry."""
    mismatched_states: tuple[int, ...]
    """Queue lengths n (0..N + B) at which Triton would serve a different size than the table."""
    smdp_predicted: Any
    """``solver.evaluate.Evaluation`` of the table: the SMDP's exact W, P and J."""
    smdp_simulated: Any
    """``SimResult`` of the table on the arrivals used to choose the delay."""
    compiled_simulated: Any
    """``SimResult`` of the compiled Triton rule on the same arrivals and service times."""
    delay_curve: tuple[tuple[float, float], ...]
    """(delay seconds, simulated J) for every delay tried."""
    n_requests: int

    # the settings' fields, so callers can treat the result as the settings
    @property
    def preferred_batch_size(self) -> tuple[int, ...]:
        return self.settings.preferred_batch_size

    @property
    def max_queue_delay_microseconds(self) -> int:
        return self.settings.max_queue_delay_microseconds

    @property
    def max_batch_size(self) -> int:
        return self.settings.max_batch_size

    @property
    def relative_gap(self) -> float:
        """(J compiled - J table) / J table, both simulated on common random numbers."""
        return (self.compiled_simulated.cost - self.smdp_simulated.cost) / self.smdp_simulated.cost

    def to_dict(self) -> dict[str, Any]:
        def sim(r: Any) -> dict[str, float]:
            return {"cost": r.cost, "mean_latency_s": r.mean_latency_s, "mean_power_w": r.mean_power_w,
                    "p99_latency_s": r.p99_latency_s, "mean_batch": r.mean_batch,
                    "latency_ci95_s": r.latency_ci95_s, "power_ci95_w": r.power_ci95_w}

        p = self.smdp_predicted
        return {
            "settings": self.settings.to_dict(),
            "style": self.style,
            "rate": self.rate,
            "weight": self.weight,
            "idle_power_w": self.idle_power_w,
            "exact": self.exact,
            "mismatched_states": list(self.mismatched_states),
            "smdp_predicted": {"cost": p.cost, "mean_latency_s": p.mean_latency_s, "mean_power_w": p.mean_power_w},
            "smdp_simulated": sim(self.smdp_simulated),
            "compiled_simulated": sim(self.compiled_simulated),
            "relative_gap": self.relative_gap,
            "delay_curve": [[d, j] for d, j in self.delay_curve],
            "n_requests": self.n_requests,
        }


def _delay_grid(rate: float, profile: ServiceProfile, first_size: int, horizon_s: float, count: int) -> list[int]:
    """Candidate delays in whole microseconds: 0, then geometric over the times that matter.

    The scale is the time to gather the smallest preferred batch plus one full service (a request
    can wait behind a running batch); the top is 20 times that, capped so that the drain at the
    end of the simulation (which waits the delay out) stays negligible.
    """
    scale = max(first_size - 1, 1) / rate + float(profile.mean_s[-1])
    lo = max(0.25 / rate, 1e-5)
    hi = min(20.0 * scale, horizon_s / 500.0)
    us = {0}
    if hi > lo:
        us.update(int(round(x * 1e6)) for x in np.geomspace(lo, hi, count))
    return sorted(u for u in us if u <= _MAX_DELAY_US)


def compile_policy(
    policy: Any,
    profile: ServiceProfile,
    rate: float,
    *,
    idle_power_w: float,
    weight: float,
    style: Style = "preferred",
    n_requests: int = 100_000,
    seed: int = 0,
    delays_us: Sequence[int] | None = None,
    rtol: float = 0.005,
    grid_points: int = 16,
) -> CompiledPolicy:
    """Triton ``dynamic_batching`` settings for ``policy`` (a PolicyTable or a SolveResult).

    The delay is chosen by simulating the compiled rule on ``n_requests`` Poisson arrivals at
    ``rate`` (see the module docstring); ``delays_us`` replaces the automatic grid. Raises
    ModelError for a rate at or above capacity, a profile that does not cover B, or bad arguments.
    """
    from solver import arrivals
    from solver.evaluate import evaluate
    from solver.simulate import simulate

    table = getattr(policy, "policy", policy)
    if not isinstance(table, PolicyTable):
        raise ModelError(f"policy must be a PolicyTable or a SolveResult, got {type(policy).__name__}")
    if style not in STYLES:
        raise ModelError(f"style must be one of {STYLES}, got {style!r}")
    if isinstance(n_requests, bool) or not isinstance(n_requests, (int, np.integer)) or n_requests < 1000:
        raise ModelError(f"n_requests must be an integer >= 1000 (the delay is chosen by simulation), got {n_requests!r}")
    if not (math.isfinite(rtol) and rtol >= 0):
        raise ModelError(f"rtol must be finite and >= 0, got {rtol!r}")
    big_b = table.max_batch
    if profile.max_batch < big_b:
        raise ModelError(f"the policy's max batch {big_b} exceeds the profile's largest batch size {profile.max_batch}")
    model = BatchingModel(rate=rate, max_batch=big_b, profile=profile, idle_power_w=idle_power_w, weight=weight)
    profile = model.profile

    if style == "timeout":
        preferred: tuple[int, ...] = (big_b,)
        mism = tuple(_mismatches(table, preferred, table.truncation + big_b))
    else:
        preferred, mism = preferred_sizes_for(table)

    t = arrivals.poisson(model.rate, n=int(n_requests), rng=seed)
    warmup = float(t[min(1000, int(n_requests) // 20)])
    horizon = float(t[-1])

    def run(rule: Any):
        return simulate(profile, rule, t, idle_power_w=model.idle_power_w, weight=model.weight,
                        seed=seed, warmup=warmup)

    if delays_us is None:
        grid = _delay_grid(model.rate, profile, preferred[0], horizon, grid_points)
    else:
        grid = sorted({int(d) for d in delays_us})
        if not grid:
            raise ModelError("delays_us must list at least one delay")
    curve: list[tuple[int, Any]] = []
    for us in grid:
        settings = DynamicBatchingSettings(preferred, us, big_b)  # validates each delay
        curve.append((us, run(settings.rule())))
    best = min(r.cost for _, r in curve)
    chosen_us, chosen = next((us, r) for us, r in curve if r.cost <= best + rtol * abs(best))
    return CompiledPolicy(
        settings=DynamicBatchingSettings(preferred, chosen_us, big_b),
        style=style,
        rate=model.rate,
        weight=model.weight,
        idle_power_w=model.idle_power_w,
        exact=not mism,
        mismatched_states=mism,
        smdp_predicted=evaluate(model, table),
        smdp_simulated=run(table),
        compiled_simulated=chosen,
        delay_curve=tuple((us / 1e6, r.cost) for us, r in curve),
        n_requests=int(n_requests),
    )


# ------------------------------------------------------------------------------------------------
# Triton's config, as JSON


def _int_field(value: Any, default: int = 0) -> int:
    """Protobuf JSON writes 64-bit integers as strings and omits zeros."""
    return default if value is None or value == "" else int(value)


def settings_from_config(cfg: dict[str, Any]) -> DynamicBatchingSettings | None:
    """The settings a model config (``get_model_config(as_json=True)["config"]``) has now.

    None when the model has no ``dynamic_batching`` section. Triton fills in
    ``preferred_batch_size: [max_batch_size]`` when the file lists none.
    """
    dyn = cfg.get("dynamic_batching")
    b = _int_field(cfg.get("max_batch_size"))
    if dyn is None or b < 1:
        return None
    prefs = sorted({int(p) for p in dyn.get("preferred_batch_size") or [b]})
    return DynamicBatchingSettings(tuple(prefs), _int_field(dyn.get("max_queue_delay_microseconds")), b)


def merge_settings(cfg: dict[str, Any], settings: DynamicBatchingSettings, model: str = "") -> dict[str, Any]:
    """A copy of ``cfg`` with the two batching fields replaced and everything else as it was.

    Raises ConfigModeError when the model cannot batch or its max_batch_size differs from the one
    the settings were compiled for (Triton serves min(n, max_batch_size) when the delay expires).
    """
    name = model or cfg.get("name", "?")
    b = _int_field(cfg.get("max_batch_size"))
    if b < 1:
        raise ConfigModeError(
            f"model '{name}' has max_batch_size {b}: it does not batch, config mode has nothing to set", retryable=False
        )
    if b != settings.max_batch_size:
        raise ConfigModeError(
            f"model '{name}' has max_batch_size {b} but the policy was compiled for B = {settings.max_batch_size}: "
            f"solve with max batch {b} (config mode does not change max_batch_size)",
            retryable=False,
        )
    out = copy.deepcopy(cfg)
    dyn = out.setdefault("dynamic_batching", {})
    dyn["preferred_batch_size"] = list(settings.preferred_batch_size)
    dyn["max_queue_delay_microseconds"] = str(settings.max_queue_delay_microseconds)
    return out


# ------------------------------------------------------------------------------------------------
# Applying, rate-limited

T = TypeVar("T")


class ReloadThrottle(Generic[T]):
    """At most one reload per ``min_interval_s``; what arrives in between waits, newest wins.

    Pure bookkeeping (no I/O, time passed in) so the policy is testable on its own: a reload is a
    model swap on the server, and a burst of re-solves must not become a burst of swaps.
    """

    def __init__(self, min_interval_s: float) -> None:
        if not math.isfinite(min_interval_s) or min_interval_s < 0:
            raise ValueError(f"min_interval_s must be finite and >= 0 seconds, got {min_interval_s!r}")
        self.min_interval_s = float(min_interval_s)
        self.last_reload_at: float | None = None
        self.pending: T | None = None

    def allowed_at(self) -> float:
        """The earliest time the next reload may start (-inf before the first)."""
        return -math.inf if self.last_reload_at is None else self.last_reload_at + self.min_interval_s

    def allowed(self, now: float) -> bool:
        return now >= self.allowed_at()

    def hold(self, item: T) -> None:
        """Keep ``item`` for later, replacing whatever was waiting."""
        self.pending = item

    def take(self, now: float) -> T | None:
        """The waiting item, if there is one and a reload is allowed now (it is then no longer waiting)."""
        if self.pending is None or not self.allowed(now):
            return None
        item, self.pending = self.pending, None
        return item

    def reloaded(self, now: float) -> None:
        """Record a reload attempt (failed attempts count too, so a failing server is not hammered)."""
        self.last_reload_at = now


@dataclass(frozen=True)
class ApplyOutcome:
    status: Literal["applied", "unchanged", "pending"]
    settings: DynamicBatchingSettings
    at: float
    """Clock time of the decision."""
    reload_s: float = 0.0
    """How long Triton took to load the new config (applied only)."""
    due_at: float | None = None
    """When a pending change may be applied (pending only)."""


class ConfigModeApplier:
    """Apply compiled settings to one model on one Triton, at most once per ``min_interval_s``.

    ``submit`` applies at once when allowed, else holds the settings (a newer submit replaces
    them); ``poll`` applies what is held once the interval has passed, so whoever owns the applier
    calls it periodically (the sidecar's retune loop). Both block for the reload (about 1.4 s for a
    Python-backend model): call them from a worker thread, never an event loop. Thread-safe.
    """

    def __init__(
        self,
        triton_url: str,
        model: str,
        min_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        timeout_s: float = 120.0,
    ) -> None:
        import tritonclient.grpc as grpcclient

        if not model or "/" in model:
            raise ValueError(f"model must be a model name, got {model!r}")
        self.triton_url = triton_url
        self.model = model
        self._clock = clock
        self._timeout_s = timeout_s
        self._throttle: ReloadThrottle[DynamicBatchingSettings] = ReloadThrottle(min_interval_s)
        self._lock = threading.Lock()
        self._client = grpcclient.InferenceServerClient(triton_url)
        self.applied: DynamicBatchingSettings | None = None
        """The settings of the last reload this applier made."""
        self.reloads = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> DynamicBatchingSettings | None:
        return self._throttle.pending

    @property
    def next_allowed_at(self) -> float:
        return self._throttle.allowed_at()

    def config(self) -> dict[str, Any]:
        """The model's config as Triton reports it now (JSON form)."""
        from tritonclient.utils import InferenceServerException

        try:
            return self._client.get_model_config(self.model, as_json=True, client_timeout=self._timeout_s)["config"]
        except InferenceServerException as exc:
            raise ConfigModeError(
                f"cannot read the config of model '{self.model}' from Triton at {self.triton_url}: {exc}"
            ) from None

    def current_settings(self) -> DynamicBatchingSettings | None:
        return settings_from_config(self.config())

    def submit(self, settings: DynamicBatchingSettings) -> ApplyOutcome:
        """Apply ``settings`` now if a reload is allowed, else keep them for ``poll``."""
        with self._lock:
            now = self._clock()
            if not self._throttle.allowed(now):
                if settings == self.applied:  # back to what is in force: nothing left to do
                    self._throttle.pending = None
                    return ApplyOutcome("unchanged", settings, now)
                self._throttle.hold(settings)
                return ApplyOutcome("pending", settings, now, due_at=self._throttle.allowed_at())
            self._throttle.pending = None
            return self._apply_or_hold(settings, now)

    def poll(self) -> ApplyOutcome | None:
        """Apply the held settings if the interval has passed; None when there is nothing to do yet."""
        with self._lock:
            now = self._clock()
            settings = self._throttle.take(now)
            if settings is None:
                return None
            return self._apply_or_hold(settings, now)

    def _apply_or_hold(self, settings: DynamicBatchingSettings, now: float) -> ApplyOutcome:
        """Apply; on failure keep the settings for a retry by ``poll`` (after the interval if a
        reload was attempted) and raise."""
        try:
            return self._apply(settings, now)
        except ConfigModeError as exc:
            if exc.retryable and self._throttle.pending is None:
                self._throttle.hold(settings)
            raise

    def _apply(self, settings: DynamicBatchingSettings, now: float) -> ApplyOutcome:
        from tritonclient.utils import InferenceServerException

        cfg = self.config()
        if settings_from_config(cfg) == settings:
            self.applied = settings
            return ApplyOutcome("unchanged", settings, now)
        new = merge_settings(cfg, settings, self.model)
        self._throttle.reloaded(now)
        started = time.perf_counter()
        try:
            self._client.load_model(self.model, config=json.dumps(new), client_timeout=self._timeout_s)
        except InferenceServerException as exc:
            self.last_error = (f"reloading model '{self.model}' on Triton at {self.triton_url} with "
                               f"{settings.describe()} failed: {exc}")
            raise ConfigModeError(self.last_error) from None
        self.last_error = None
        self.applied = settings
        self.reloads += 1
        return ApplyOutcome("applied", settings, now, reload_s=time.perf_counter() - started)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ConfigModeApplier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
