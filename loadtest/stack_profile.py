"""What the solver is told in the load tests: the emulated GPU's published table for what the model
itself does, and a measured profile for what the stack adds.

The emulated model sleeps tau(b) of the (time-scaled) published table, but a batch holds the gate's
slot longer: the merged request's gRPC round trip, Triton's scheduling and the Python backend's IPC
come on top. ``smdp profile`` measures that hold on the model exactly as the gate contenders run it
(time scale applied, Triton's batcher off), once per model config (cached). The solver's profile is
then the measured tau(b) and CV, with the energy of a batch taken from the table (the ground truth of
what the emulated GPU draws) plus idle power P0 for the time the stack adds, during which the GPU
would sit idle: exactly how the bench's measurement charges it (loadtest/metrics.py), so predicted
and measured power count the same joules.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from plugin.auto_profile import auto_profile
from plugin.config import ModelPolicyConfig
from solver.model import BatchingModel, ServiceProfile
from solver.policy import BatchRule

from .triton_control import BatchingOverride, ModelConfigControl

STACK_PROFILE_BUDGET_S = 60.0
"""Longest the one-off sweep of the stack may take, seconds."""


def compose(measured: ServiceProfile, emulated: ServiceProfile, idle_power_w: float) -> ServiceProfile:
    """Measured times and CVs; energy e(b) of the table plus P0 x (measured - table time)."""
    top = min(measured.max_batch, emulated.max_batch)
    tau = measured.mean_s[:top]
    extra = np.maximum(tau - emulated.mean_s[:top], 0.0)
    return ServiceProfile(mean_s=tau, energy_j=emulated.energy_j[:top] + idle_power_w * extra,
                          cv=measured.cv[:top], interpolated=measured.interpolated,
                          source=f"measured stack + {emulated.source or 'table'} energy")


def write_composed_csv(profile: ServiceProfile, path: Path, note: str) -> Path:
    rows = [f"# {note}", "# power: modelled (the emulated GPU's table energy, P0 for the time the stack adds)",
            "batch_size,mean_service_s,batch_energy_j,service_cv"]
    for b in range(1, profile.max_batch + 1):
        rows.append(f"{b},{profile.mean_s[b - 1]!r},{profile.energy_j[b - 1]!r},{profile.cv[b - 1]!r}")
    path.write_text("\n".join(rows) + "\n")
    return path


def stack_profile(triton_url: str, control: ModelConfigControl, model: str, time_scale: float,
                  emulated: ServiceProfile, idle_power_w: float, out_dir: Path,
                  progress: Callable[[str], None] = print) -> tuple[ServiceProfile, Path]:
    """The profile the solver is told, measured on this stack (cached under ``out_dir``)."""
    control.apply(BatchingOverride(time_scale=time_scale, dynamic_batching=False))
    cfg = ModelPolicyConfig(policy="smdp", profile="auto", profile_auto_s=STACK_PROFILE_BUDGET_S,
                            max_batch=emulated.max_batch)
    got = asyncio.run(auto_profile(triton_url, model, "", cfg, out_dir / "profile-cache", metrics_url=None))
    if got.path is None:
        raise ValueError(f"model {model!r}: could not profile the stack: {got.reason}")
    progress(f"stack profile of {model}: {got.reason}")
    measured = ServiceProfile.from_csv(got.path)
    if measured.max_batch < emulated.max_batch:
        raise ValueError(f"the stack profile reaches b = {measured.max_batch} only, the model batches up to "
                         f"{emulated.max_batch}")
    prof = compose(measured, emulated, idle_power_w)
    added = prof.mean_s - emulated.mean_s
    progress(f"the stack adds {added.min() * 1e3:.2f}-{added.max() * 1e3:.2f} ms per batch to the table's "
             f"tau(b) ({emulated.mean_s[0] * 1e3:.1f} ms at b = 1)")
    path = write_composed_csv(prof, out_dir / f"{model}_stack_x{time_scale:g}.csv",
                              f"tau(b) measured on the stack ({got.path.name}); energy from {emulated.source}")
    return prof, path


@dataclass(frozen=True)
class RequestHop:
    """What a request's answer takes beyond its batch's slot (tau(b) above), as the load generator sees it:
    its own send and receive path, and for gate contenders the hop through the sidecar. Measured with
    lone requests (nothing queued) as the median of latency - tau(1); added to the solver's W."""

    direct_s: float
    gate_s: float
    in_gate_s: float = 0.0
    """At the operating point (``operating_point``): the gate's own mean W beyond the model's (the calibration
    policy simulated on the calibration's arrivals with the loaded profile): time in the sidecar that no
    tau(b) and no queueing model holds (splitting a batch's answer, resuming its callers). Added, with
    ``gate_s``, to a gate contender's predicted W; 0 for the lone requests."""


HOP_REQUESTS = 30
"""Lone requests per path; the first HOP_SKIPPED (a fresh channel, the sidecar's config fetch) not counted."""
HOP_SKIPPED = 5


def request_hops(triton_url: str, control: ModelConfigControl, model: str, time_scale: float, max_batch: int,
                 tau1_s: float, data_plane: str, log_dir: Path,
                 progress: Callable[[str], None] = print) -> RequestHop:
    from .openloop import run_open_loop
    from .stack import SidecarProcess, SidecarSpec

    control.apply(BatchingOverride(time_scale=time_scale, dynamic_batching=False))
    times = np.arange(HOP_REQUESTS) * (3 * tau1_s + 0.005)  # each alone: the last one long done

    def hop(target: str) -> float:
        res = run_open_loop(target, model, times, timeout_s=30.0, drain_grace_s=1.0)
        lat = (res.done_s - res.scheduled_s)[HOP_SKIPPED:][res.ok[HOP_SKIPPED:]]
        if lat.size < 5:
            raise ValueError(f"only {lat.size} lone requests to {target} were answered")
        return float(np.median(lat)) - tau1_s

    direct = hop(triton_url)
    sidecar = SidecarProcess(triton_url, SidecarSpec(policy="greedy", max_batch=max_batch, data_plane=data_plane),
                             log_path=log_dir / "sidecar-hop.log").start()
    try:
        gate = hop(sidecar.url)
    finally:
        sidecar.stop()
    progress(f"a lone request's answer takes {direct * 1e3:.2f} ms beyond tau(1) straight to Triton, "
             f"{gate * 1e3:.2f} ms through the {data_plane} gate (added to the solver's W)")
    return RequestHop(direct, gate)


# ------------------------------------------------------------------------------------------------
# The stack at its operating point


@dataclass(frozen=True)
class GateWindow:
    """What a gate measured over a window of a run (differences of two ``GetStatus`` readings): per batch
    size b (index b - 1) the batches and the sum of their dispatch-to-completion times, the requests it
    answered with the sum of their arrival-to-answer times in the sidecar, and the sum of its batches'
    decision-to-dispatch times (``ModelStatus.dispatch_lag``; 0 where the plane does not measure it)."""

    batches: np.ndarray
    busy_s: np.ndarray
    requests: int
    latency_sum_s: float
    lag_s: float = 0.0


def added_under_load(quiet: ServiceProfile, window: GateWindow) -> float:
    """How much longer a batch holds the gate's slot under load than in the quiet profile, seconds: the
    batch-weighted mean of (measured - quiet tau(b)) over the sizes the window saw, plus the gate's mean
    decision-to-dispatch time (the slot is the batch's from its decision epoch, as the solver models it)."""
    top = min(quiet.max_batch, window.batches.size)
    n = window.batches[:top].astype(float)
    if n.sum() <= 0:
        raise ValueError("the gate completed no batch in the window")
    return float((window.busy_s[:top].sum() + window.lag_s - np.dot(n, quiet.mean_s[:top])) / n.sum())


def loaded(quiet: ServiceProfile, added_s: float, emulated: ServiceProfile, idle_power_w: float) -> ServiceProfile:
    """The quiet stack profile with every tau(b) ``added_s`` longer (floored at the table's own time, which
    the emulated model always sleeps); energy as ``compose`` charges it (P0 for the time the stack adds)."""
    top = min(quiet.max_batch, emulated.max_batch)
    tau = np.maximum(quiet.mean_s[:top] + added_s, emulated.mean_s[:top])
    times = ServiceProfile(mean_s=tau, energy_j=quiet.energy_j[:top], cv=quiet.cv[:top],
                           interpolated=quiet.interpolated, source=quiet.source)
    out = compose(times, emulated, idle_power_w)
    return ServiceProfile(mean_s=out.mean_s, energy_j=out.energy_j, cv=out.cv, interpolated=out.interpolated,
                          source=f"{quiet.source or 'stack'} under load ({added_s * 1e3:+.2f} ms per batch)")


MODEL_W_DRAWS = 8
"""Service-time streams the model's W on a run's own arrivals is averaged over."""


def policy_rule(policy: str, model: BatchingModel) -> BatchRule:
    """The rule a gate runs for ``policy`` under ``model``: the SMDP policy solved for it, or the baseline."""
    from solver.policy import parse_rule_spec, rule_from_spec
    from solver.smdp import solve

    if parse_rule_spec(policy)[0] == "smdp":
        return solve(model).policy
    return rule_from_spec(policy, model.max_batch)


@dataclass(frozen=True)
class WindowFigures:
    """The model's figures on a run's own arrivals (``model_wp``)."""

    mean_latency_s: float
    """Mean W of the requests scheduled in the window."""
    mean_power_w: float
    """Mean power from the window's start to the last batch's end, from the simulated batches."""
    mean_batch: float


def _counted(times: np.ndarray, window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(the arrival times as floats, which of those from the window's start on fall in it): the
    simulation's latencies start at the window's start (its warm-up), the mean is over the window."""
    lo, hi = window
    t = np.asarray(times, dtype=float)
    counted = t[t >= lo] < hi
    if not counted.any():
        raise ValueError("no arrival in the window")
    return t, counted


def model_wp(profile: ServiceProfile, rule: BatchRule, times: np.ndarray, window: tuple[float, float],
             idle_power_w: float, weight: float, draws: int = MODEL_W_DRAWS) -> WindowFigures:
    """The model's mean W over the requests scheduled in ``window`` of these very arrival ``times``, and
    its mean power and batch from the window's start on: ``rule`` simulated with ``profile``'s service law,
    averaged over ``draws`` service-time streams."""
    from solver.simulate import simulate_latencies

    t, counted = _counted(times, window)
    lo = window[0]
    runs = [simulate_latencies(profile, rule, t, idle_power_w=idle_power_w, weight=weight, seed=s, warmup=lo)
            for s in range(draws)]
    return WindowFigures(float(np.mean([lat[counted].mean() for _, lat in runs])),
                         float(np.mean([r.mean_power_w for r, _ in runs])),
                         float(np.mean([r.mean_batch for r, _ in runs])))


def model_w(profile: ServiceProfile, rule: BatchRule, times: np.ndarray, window: tuple[float, float],
            idle_power_w: float, weight: float, draws: int = MODEL_W_DRAWS) -> float:
    """The model's mean W, seconds, over the requests scheduled in ``window`` of these very arrival ``times``:
    ``rule`` simulated with ``profile``'s service law, averaged over ``draws`` service-time streams. A run's
    window holds a few hundred arrivals, whose own mean W differs from the stationary one by a few percent
    (the same in every run of a seed); this is the figure that sequence gives the model, so that set beside a
    measurement of it only the model's error is left."""
    return model_wp(profile, rule, times, window, idle_power_w, weight, draws).mean_latency_s


@dataclass(frozen=True)
class RuleReading:
    """The rule a gate had in force at one reading (``GetPolicy`` and ``GetStatus``): its table a(n), the
    SLO policy's max-wait guard (None: none), the policy's version and how long it had been in force."""

    actions: tuple[int, ...]
    max_batch: int
    max_wait_s: float | None
    version: int
    age_s: float

    @property
    def rule(self) -> BatchRule:
        from solver.policy import MaxWaitGuard, PolicyTable

        table = PolicyTable(np.asarray(self.actions, dtype=np.int64), self.max_batch)
        return table if self.max_wait_s is None else MaxWaitGuard(table, self.max_wait_s)

    def describe(self) -> str:
        from solver.policy import PolicyTable

        k = PolicyTable(np.asarray(self.actions, dtype=np.int64), self.max_batch).threshold()
        served = [n for n, x in enumerate(self.actions) if x > 0]
        shape = f"threshold {k}" if k is not None else f"serves from n = {served[0] if served else '-'}"
        return (f"v{self.version} ({shape}"
                + (f", max wait {self.max_wait_s * 1e3:.2f} ms" if self.max_wait_s is not None else "") + ")")


def rule_reading(status, policy) -> RuleReading:
    """A ``RuleReading`` from a ``ModelStatus`` and a ``PolicyReply`` read together."""
    if not policy.actions:
        raise ValueError("the gate's rule is not a table")
    guard = status.slo.max_wait_s if status.HasField("slo") and status.slo.HasField("max_wait_s") else None
    return RuleReading(tuple(int(a) for a in policy.actions), int(policy.max_batch), guard, int(policy.version),
                       float(policy.age_s))


RULE_READ_EVERY_S = 0.25
"""How often ``GateWatch`` reads the rule in force over the window (with ``rules``): a policy installed and
replaced between two readings is missed (``RuleSchedule.missed``)."""


@dataclass(frozen=True)
class RuleSchedule:
    """The rules a gate ran over a window, each from when it came into force (``rule_schedule``)."""

    segments: tuple[tuple[float, RuleReading], ...]
    """(start, rule) in time order; the first starts at the window's start, each runs until the next."""
    window: tuple[float, float]
    missed: int = 0
    """Policies installed in the window that no reading saw (in force between two readings)."""

    def shares(self) -> np.ndarray:
        """Each segment's share of the window."""
        lo, hi = self.window
        ends = [t for t, _ in self.segments[1:]] + [hi]
        return np.array([(end - t) / (hi - lo) for (t, _), end in zip(self.segments, ends)])

    def describe(self) -> str:
        parts = ", then ".join(f"{r.describe()} for {share:.0%}" for (_, r), share in zip(self.segments, self.shares()))
        more = f" ({self.missed} more seen by no reading)" if self.missed else ""
        changes = len(self.segments) - 1 + self.missed
        return (f"rule in force over the whole window: {parts}" if changes == 0
                else f"the policy changed {changes}x in the window{more}: {parts}")


def rule_schedule(readings: list[tuple[float, RuleReading]], window: tuple[float, float]) -> RuleSchedule:
    """The rules in force over ``window`` from readings (time, rule) taken in it, the first at its start: each
    version seen comes into force at its reading's time less its age (not before the window's start)."""
    lo, hi = window
    if hi <= lo:
        raise ValueError(f"window must be positive, got {window!r}")
    if not readings:
        raise ValueError("no reading of the gate's rule")
    first: dict[int, tuple[float, RuleReading]] = {}
    for t, r in sorted(readings, key=lambda x: x[0]):
        first.setdefault(r.version, (min(max(t - r.age_s, lo), hi), r))
    seen = sorted(first.items())
    starts = np.maximum.accumulate([start for _, (start, _) in seen])
    starts[0] = lo
    segments = tuple((float(t), r) for t, (_, (_, r)) in zip(starts, seen))
    kept = tuple(seg for i, seg in enumerate(segments) if i + 1 == len(segments) or segments[i + 1][0] > seg[0])
    return RuleSchedule(kept, window, seen[-1][0] - seen[0][0] - (len(seen) - 1))


def model_wp_schedule(profile: ServiceProfile, schedule: RuleSchedule, times: np.ndarray, idle_power_w: float,
                      weight: float, draws: int = MODEL_W_DRAWS) -> WindowFigures:
    """``model_wp`` for a gate whose rule changed in the window: each rule simulated on all the arrivals, a
    request's W taken from the rule in force at its arrival, P and the mean batch as each rule's weighted by
    its share of the window (the queue a new rule finds is its own simulation's, not the old rule's: a
    switch's transient is not modelled). One rule: exactly ``model_wp``."""
    lo = schedule.window[0]
    if len(schedule.segments) == 1:
        return model_wp(profile, schedule.segments[0][1].rule, times, schedule.window, idle_power_w, weight, draws)
    from solver.simulate import simulate_latencies

    t, counted = _counted(times, schedule.window)
    which = np.searchsorted([start for start, _ in schedule.segments], t[t >= lo][counted], side="right") - 1
    shares = schedule.shares()
    w, p, batch = [], [], []
    for s in range(draws):
        lat = np.empty(int(counted.sum()))
        pw = mb = 0.0
        for k, (_, r) in enumerate(schedule.segments):
            res, all_lat = simulate_latencies(profile, r.rule, t, idle_power_w=idle_power_w, weight=weight, seed=s,
                                              warmup=lo)
            lat[which == k] = all_lat[counted][which == k]
            pw += shares[k] * res.mean_power_w
            mb += shares[k] * res.mean_batch
        w.append(lat.mean())
        p.append(pw)
        batch.append(mb)
    return WindowFigures(float(np.mean(w)), float(np.mean(p)), float(np.mean(batch)))


@dataclass(frozen=True)
class OperatingPoint:
    """The stack measured at one load through a gate: what the solver is told for the gate contenders there."""

    rate_rps: float
    profile: ServiceProfile
    path: Path
    added_s: float
    """tau(b) under load minus the quiet profile's, seconds per batch."""
    hop_s: float
    """A request's mean answer time at the client beyond its time in the sidecar (gate wait + batch), under
    this load: the per-request hop at the operating point, added to the solver's W."""
    batches: int
    requests: int
    policy: str = "smdp"
    """The gate policy the calibration ran (``operating_point``'s ``policy``)."""
    lag_s: float = 0.0
    """Of ``added_s``: the gate's mean decision-to-dispatch time per batch (0 where not measured)."""
    in_gate_s: float = 0.0
    """The gate's own mean W beyond the model's on the calibration's arrivals (``RequestHop.in_gate_s``)."""


CALIBRATION_SEED = 1_000_003
"""Offset of the calibration run's arrival seed: its arrivals are never the ones the contenders replay."""


def gate_reading(status) -> GateWindow:
    """The gate's totals since it started, from a ``ModelStatus``: its own batch record (any policy),
    answered requests and their summed time in the sidecar, summed decision-to-dispatch time."""
    n = np.asarray(status.batch_histogram[1:], dtype=float)
    mean = np.asarray(status.batch_mean_s[1:], dtype=float)
    if mean.size != n.size:
        raise ValueError("the gate reported no dispatch-to-completion times with its batch histogram")
    w = status.measured.mean_latency_s if status.HasField("measured") else 0.0
    lag = status.dispatch_lag.batches * status.dispatch_lag.mean_s if status.HasField("dispatch_lag") else 0.0
    return GateWindow(n, n * mean, int(status.completed), float(w) * int(status.completed), float(lag))


def window_between(first: GateWindow, last: GateWindow) -> GateWindow:
    """What the gate measured between two readings."""
    top = max(first.batches.size, last.batches.size)

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, (0, top - x.size))

    return GateWindow(pad(last.batches) - pad(first.batches), pad(last.busy_s) - pad(first.busy_s),
                      last.requests - first.requests, last.latency_sum_s - first.latency_sum_s,
                      last.lag_s - first.lag_s)


RUN_ORIGIN_S = 0.05
"""``run_open_loop``'s start delay: its time 0 is this long after the call."""


class GateWatch:
    """Reads a gate's ``GetStatus`` at both ends of a run's window (seconds from the run's time origin, on
    timer threads started when the watch is entered, just before the run): what the gate itself measured in
    that window (``window()``), to set beside what the client measured in it; with ``rules``, also the rule
    in force every ``RULE_READ_EVERY_S`` over it (``rules_in_force()``)."""

    def __init__(self, control_url: str, model: str, window: tuple[float, float], rules: bool = False) -> None:
        self._url = control_url
        self._model = model
        self._window = window
        self._rules = rules
        self._readings: dict[str, GateWindow] = {}
        self._rule_readings: list[tuple[float, RuleReading]] = []
        self._rule_errors: list[BaseException] = []
        self._errors: list[BaseException] = []

    def __enter__(self) -> "GateWatch":
        import threading

        import grpc

        from smdp.v1 import smdp_pb2, smdp_pb2_grpc

        self._channel = grpc.insecure_channel(self._url)
        stub = smdp_pb2_grpc.ControlStub(self._channel)

        request = smdp_pb2.ModelRequest(model=self._model)

        def read(key: str) -> None:
            try:
                self._readings[key] = gate_reading(stub.GetStatus(request, timeout=5.0))
            except BaseException as exc:  # reported by window(), after the run
                self._errors.append(exc)

        def read_rule(at: float) -> None:
            try:
                status = stub.GetStatus(request, timeout=5.0)
                self._rule_readings.append((at, rule_reading(status, stub.GetPolicy(request, timeout=5.0))))
            except BaseException as exc:  # reported by rules_in_force(), after the run
                self._rule_errors.append(exc)

        lo, hi = self._window
        self._timers = [threading.Timer(RUN_ORIGIN_S + lo, read, ("lo",)),
                        threading.Timer(RUN_ORIGIN_S + hi, read, ("hi",))]
        if self._rules:
            at = np.append(np.arange(lo, hi, RULE_READ_EVERY_S), hi)
            self._timers += [threading.Timer(RUN_ORIGIN_S + float(t), read_rule, (float(t),)) for t in at]
        for t in self._timers:
            t.start()
        return self

    def __exit__(self, *exc_info) -> None:
        for t in self._timers:
            t.join()
        self._channel.close()

    def window(self) -> GateWindow:
        """What the gate measured between the two readings; ValueError where either could not be read."""
        if self._errors:
            raise ValueError(f"could not read the gate's status: {self._errors[0]}")
        if len(self._readings) != 2:
            raise ValueError("the gate's status was not read at both ends of the window")
        return window_between(self._readings["lo"], self._readings["hi"])

    def rules_in_force(self) -> RuleSchedule:
        """The rules the gate ran over the window (``rules`` set; ``rule_schedule``); ValueError where they
        were not read."""
        if self._rule_errors:
            raise ValueError(f"could not read the gate's rule: {self._rule_errors[0]}")
        return rule_schedule(self._rule_readings, self._window)


def operating_point(triton_url: str, control: ModelConfigControl, model: str, time_scale: float, max_batch: int,
                    quiet: ServiceProfile, quiet_path: Path, emulated: ServiceProfile, idle_power_w: float,
                    rate: float, weight: float, times: np.ndarray, window: tuple[float, float], data_plane: str,
                    out_dir: Path, progress: Callable[[str], None] = print,
                    policy: str = "smdp") -> OperatingPoint:
    """Run the gate with ``policy`` (fixed: ``smdp`` the policy solved for the quiet profile, so that the rule it
    runs is known and can be simulated) at ``rate`` on its own Poisson arrivals
    ``times`` and read, from the gate itself (``GetStatus``: its per-size dispatch-to-completion times, its
    decision-to-dispatch turnaround, its measured W) over ``window``, how long the batches hold its slot at
    this load and how long answers take beyond the gate; the profile the solver is then told for the gate
    contenders with that policy at this load. The quiet profile was taken one batch at a time on an
    otherwise idle stack: under load on a small host the sidecar's own CPU and the client's slow the
    batches down, and a gate that sends more batches turns around more often, so the solver must be told
    the batches as they run there, under the policy that runs."""
    from .openloop import run_open_loop
    from .stack import SidecarProcess, SidecarSpec

    control.apply(BatchingOverride(time_scale=time_scale, dynamic_batching=False))
    spec = SidecarSpec(policy=policy, max_batch=max_batch, profile_csv=quiet_path, rate_rps=rate, weight=weight,
                       idle_power_w=idle_power_w, adaptive=False, data_plane=data_plane)
    tag = _file_tag(policy)
    sidecar = SidecarProcess(triton_url, spec,
                             log_path=out_dir / f"sidecar-operating-point-{tag}-{rate:g}.log").start()
    lo, hi = window
    try:
        if sidecar.control_url is None:
            raise ValueError("the sidecar reported no control API port")
        with GateWatch(sidecar.control_url, model, window) as watch:
            res = run_open_loop(sidecar.url, model, times, timeout_s=30.0, drain_grace_s=1.0,
                                required=(times >= lo) & (times < hi))
    finally:
        sidecar.stop()
    win = watch.window()
    in_window = (res.scheduled_s >= lo) & (res.scheduled_s < hi) & res.ok
    if win.requests < 10 or in_window.sum() < 10:
        raise ValueError(f"only {win.requests} requests answered in the calibration window at {rate:g} req/s")
    added = added_under_load(quiet, win)
    client_w = float(np.mean(res.done_s[in_window] - res.scheduled_s[in_window]))
    hop = client_w - win.latency_sum_s / win.requests
    prof = loaded(quiet, added, emulated, idle_power_w)
    path = write_composed_csv(prof, out_dir / f"{model}_stack_x{time_scale:g}_at_{rate:g}rps_{tag}.csv",
                              f"tau(b) of the quiet stack profile + {added * 1e3:.3f} ms per batch, measured "
                              f"through the {data_plane} gate ({policy}) at {rate:g} req/s")
    batches = int(win.batches.sum())
    lag = win.lag_s / batches if batches else 0.0
    gate_w = win.latency_sum_s / win.requests
    # the rule the gate ran (solved by the sidecar for the quiet profile), as its batches ran here
    modelled = model_w(prof, policy_rule(policy, BatchingModel(rate, max_batch, quiet, idle_power_w, weight)), times,
                       window, idle_power_w, weight)
    in_gate = gate_w - modelled
    progress(f"at {rate:g} req/s through the {data_plane} gate, {policy} ({batches} batches, {win.requests} "
             f"requests): batches hold the slot {added * 1e3:+.2f} ms longer than the quiet profile (of which "
             f"{lag * 1e3:.2f} ms from decision to dispatch); the gate's own W {gate_w * 1e3:.2f} ms against the "
             f"model's {modelled * 1e3:.2f} ms on these arrivals ({in_gate * 1e3:+.2f} ms in the gate), an answer "
             f"takes {hop * 1e3:.2f} ms beyond the gate (both told to the solver's W for the gate contenders with "
             f"this policy at this load)")
    return OperatingPoint(rate, prof, path, added, hop, batches, win.requests, policy, lag, in_gate)


def _file_tag(policy: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in policy)


@dataclass(frozen=True)
class RunSplit:
    """Where a gate contender's answers spent their time over the measured window: the client's mean W over
    the window's answered requests, the gate's own arrival-to-answer mean over the same window (its
    ``GetStatus`` at both ends, ``GateWatch``), so the per-request hop outside the gate is their difference;
    and the gate's batch cycle there (mean dispatch-to-completion, turnaround). Set beside the prediction
    (the solver's W in the gate plus the calibration's hop), it says whether a miss was in the gate or in
    the hop."""

    client_w_s: float
    client_n: int
    gate_w_s: float
    gate_n: int
    batches: int
    busy_s: float
    """Mean dispatch-to-completion time per batch, seconds."""
    lag_s: float
    """Mean decision-to-dispatch time per batch (turnaround), seconds; 0 where the plane does not measure it."""
    slot_excess_s: float = math.nan
    """How much longer its batches held the slot (dispatch-to-completion plus turnaround) than the profile the
    prediction was solved with (``added_under_load`` against it), seconds per batch; NaN: not compared."""

    @property
    def hop_s(self) -> float:
        return self.client_w_s - self.gate_w_s

    def describe(self) -> str:
        return (f"client W {self.client_w_s * 1e3:.2f} ms over {self.client_n} answers; the gate's own W "
                f"{self.gate_w_s * 1e3:.2f} ms over {self.gate_n}; hop (client - gate) {self.hop_s * 1e3:.2f} ms; "
                f"{self.batches} batches, mean dispatch-to-completion {self.busy_s * 1e3:.2f} ms, turnaround "
                f"{self.lag_s * 1e3:.2f} ms"
                + ("" if math.isnan(self.slot_excess_s) else
                   f"; the slot held {self.slot_excess_s * 1e3:+.2f} ms per batch beyond the profile predicted with"))


def run_split(client_latency_s: np.ndarray, window: GateWindow, told: ServiceProfile | None = None) -> RunSplit:
    """The split of a run's window from the client's latencies of the requests scheduled in it and the gate's
    own figures over it (and, given ``told``, the profile the prediction was solved with, its batches' excess
    over it); ValueError where either side answered none."""
    if client_latency_s.size == 0 or window.requests <= 0:
        raise ValueError("no answered requests to split")
    n = float(window.batches.sum())
    excess = added_under_load(told, window) if told is not None and n else math.nan
    return RunSplit(float(np.mean(client_latency_s)), int(client_latency_s.size),
                    window.latency_sum_s / window.requests, int(window.requests), int(n),
                    float(window.busy_s.sum()) / n if n else math.nan, window.lag_s / n if n else math.nan, excess)
