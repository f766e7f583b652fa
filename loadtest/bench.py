"""``smdp bench``: contenders one after another on the same open-loop arrival sequence, against a real
Triton, measured beside the solver's predictions.

For each arrival rate one Poisson sequence is drawn; every contender replays exactly that sequence
(same times, same request contents). Triton's batcher contenders reload the model with their
``max_queue_delay_microseconds``; gate contenders put a sidecar process in front of Triton with the
model's dynamic batcher removed, so the gate alone decides and each merged request runs as it comes
(with the batcher left on, Triton 2.51 sometimes holds a lone request for its 500 ms default wait).
The config-mode contender compiles the SMDP policy for the rate into ``preferred_batch_size`` and
``max_queue_delay_microseconds``, reloads the model with them, and its clients talk to Triton
directly. Adaptive gates re-solve through a shared ``smdp solver-serve`` process when the config
asks for one (``solver="embedded"`` starts it, as the demo does). The emulated model runs
``time_scale`` times slower than the profiled GPU, so that the few hundred requests per second a small host can generate are real loads,
and the solver gets the same scaled profile (times and energies x scale, power unchanged).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from plugin.placement import Placement, placement_of_json
from solver import arrivals, quantities
from solver.model import BatchingModel, ModelError, ServiceProfile

from solver.slo import SloTarget

from .contenders import Contender, Prediction, compile_config, ma_delay, predict

BENCH_WEIGHT = 1e-3
"""The load tests' w, seconds per watt, for the time-scaled emulated GPU (W is time_scale x longer, P
unchanged): not the solver's default 0, so that the SMDP's waits differ from greedy's and the bench
shows the trade-off."""
from .metrics import Measured, batch_histogram, measure, power_note
from .openloop import OpenLoopResult, run_open_loop
from .stack import SidecarProcess, SidecarSpec, SolverProcess, scaled_profile, write_profile_csv
from .stack_profile import GateWatch, RequestHop, RuleSchedule, RunSplit, run_split
from .triton_control import BatchingOverride, ModelConfigControl

__all__ = ["BenchConfig", "BenchRow", "BenchReport", "Stack", "bench_stack", "run_one", "run_bench", "DEFAULT_PROFILE"]

DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """One bench: loads, contenders and the physics the solver is told about."""

    rates: tuple[float, ...]
    contenders: tuple[Contender, ...]
    duration_s: float = 8.0
    time_scale: float = 10.0
    weight: float = BENCH_WEIGHT
    """w in seconds per watt, for the *scaled* system (W is scale x longer, P unchanged)."""
    idle_power_w: float = quantities.DEFAULT_IDLE_POWER_W
    profile_csv: Path = DEFAULT_PROFILE
    """The profile the emulated model runs (its own copy of it must describe the same GPU)."""
    model: str = "emulated_gpu"
    seed: int = 0
    warmup_s: float = 1.5
    """Arrivals before the measurement window: first-call costs (a fresh model instance, the
    sidecar's config fetch and solve) and the empty-start transient fall here, not in the figures."""
    cooldown_s: float = 1.0
    """Arrivals after the window, not counted: they flush requests that a waiting policy holds."""
    request_timeout_s: float = 30.0
    out_dir: Path = Path("out/bench")
    solver: str | None = None
    """Where adaptive gates re-solve: None in the sidecar (a worker thread), "embedded" a
    ``smdp solver-serve`` process started for the bench, or HOST:PORT of a running one."""
    data_plane: str = "auto"
    """What carries the gate contenders' requests: ``native`` (smdp-gate), the sidecar's Python gate, or
    ``auto`` = native where smdp-gate is found (resolved once here, so the report names the plane)."""
    data_plane_reason: str = ""
    """Why that plane (set when ``auto`` is resolved)."""
    slo: SloTarget | None = None
    """A tail-latency SLO: every row then reports attainment (share within D) and goodput; the
    ``gate:smdp-slo`` and ``triton:ma`` contenders need it."""
    slo_margin_auto: bool = False
    """``--slo-margin auto``: the SLO gates' margin is measured at each load before they run (the hop
    through the gate + the send lag at the SLO's quantile, ``loadtest.slo_margin``) instead of ``slo``'s."""
    slo_catch_share: float | None = None
    """``--slo-catch-share``: the race share the derived-bound SLO gates model Triton with
    (``slo.best_delay_catch_share``; None: the config's default)."""
    slo_catch_share_fit: bool = False
    """``--slo-catch-share fit`` (the trace bench): the derived-bound SLO gates use the share fitted to the
    W and tail of the run's first Triton delay contender (``solver.catch_share``), which must run before them."""
    instances: int = 1
    """k: the model runs with this instance_group count; predictions and power are for k instances
    (each busy one its batch's power, each idle one P0)."""
    stack_profile: bool = True
    """Tell the solver tau(b) as measured on this stack (``smdp profile``, once, cached: the table's time
    plus what gRPC and the backend add; energy from the table) instead of the published table alone."""
    operating_point: bool = False
    """With ``stack_profile``: before the contenders at each load, run the gate on its own arrivals at that
    load, once per gate policy among the contenders (``calibration_policy``: the SMDP contenders share the
    fixed SMDP gate's run), and tell the solver, for the gate contenders with that policy there, the
    batch times (its turnaround from decision to dispatch included), the time its answers spent in the gate
    beyond the model's W and the per-request hop outside it, as the gate measured them under that load
    (``stack_profile.operating_point``), instead of the quiet profile's and the lone requests' hop; and
    predict those contenders' W on their own arrivals (``stack_profile.model_w``)."""
    calibration_windows: float = 2.0
    """The operating-point calibration's measured window, in contender windows (``duration_s``): its
    per-batch excess, in-gate time and hop are means over a few hundred requests on a shared host, and a
    longer window halves their variance's share of the prediction's error for a few seconds per policy."""

    def __post_init__(self) -> None:
        from plugin.native_plane import choose_plane

        choice = choose_plane(self.data_plane, "merged")
        object.__setattr__(self, "data_plane", choice.plane)
        object.__setattr__(self, "data_plane_reason", self.data_plane_reason or choice.reason)
        rates = tuple(float(r) for r in self.rates)
        if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
            raise ValueError(f"rates must be a non-empty list of positive numbers, got {list(self.rates)}")
        object.__setattr__(self, "rates", rates)
        if not self.contenders:
            raise ValueError("give at least one contender")
        names = [c.name for c in self.contenders]
        if len(set(names)) != len(names):
            raise ValueError(f"contenders repeat: {names}")
        for name in ("duration_s", "time_scale", "request_timeout_s", "calibration_windows"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")
        quantities.weight(self.weight)
        quantities.idle_power(self.idle_power_w)
        for name in ("warmup_s", "cooldown_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        object.__setattr__(self, "profile_csv", Path(self.profile_csv))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.slo is None and any(c.slo or c.model_analyzer for c in self.contenders):
            raise ValueError("the gate:smdp-slo and triton:ma contenders need an SLO (--slo-latency)")
        if self.slo_margin_auto and self.slo is None:
            raise ValueError("--slo-margin auto needs an SLO (--slo-latency)")
        share = self.slo_catch_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0.0 <= share <= 1.0):
            raise ValueError(f"--slo-catch-share must be a share in [0, 1], got {share!r}")
        if self.slo_catch_share_fit:
            if share is not None:
                raise ValueError("--slo-catch-share is either a share or fit, not both")
            kinds = [c.kind == "triton" and not c.model_analyzer for c in self.contenders]
            derived = [c.slo and c.derived for c in self.contenders]
            if any(derived) and (True not in kinds or kinds.index(True) > derived.index(True)):
                raise ValueError("--slo-catch-share fit needs a triton:DELAY_US contender before the first "
                                 "gate:smdp-slo-derived* one: the share is fitted to its run")
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) or self.instances < 1:
            raise ValueError(f"instances must be an integer >= 1, got {self.instances!r}")
        if self.instances > 1 and any(c.kind == "config" or c.slo or c.model_analyzer for c in self.contenders):
            raise ValueError("with --instances > 1 the bench runs gates and Triton's batcher only "
                             "(config mode and the SLO contenders are one-instance)")
        if self.operating_point and self.instances > 1:
            raise ValueError("the operating-point calibration is one-instance (--stack-profile measured with --instances)")
        if self.solver is not None and self.solver != "embedded" and ":" not in self.solver:
            raise ValueError(f"solver must be 'embedded' or HOST:PORT, got {self.solver!r}")

    @property
    def needs_solver(self) -> bool:
        """An adaptive gate is among the contenders and a solver service is asked for."""
        return self.solver is not None and any(c.adaptive for c in self.contenders)

    @property
    def window(self) -> tuple[float, float]:
        """Scheduled times that count: after the warm-up, before the cool-down."""
        return self.warmup_s, self.warmup_s + self.duration_s

    @property
    def profile_name(self) -> str:
        return self.profile_csv.stem


@dataclass(frozen=True, eq=False)
class BenchRow:
    """One contender at one load: measured and predicted figures side by side."""

    rate_rps: float
    contender: str
    measured: Measured
    predicted: Prediction
    batch_hist: np.ndarray
    """Estimated batches per size b = 1..B (index b - 1)."""
    latencies_s: np.ndarray
    failures: dict[str, int] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    settings: str = ""
    """Config mode: the dynamic_batching settings the model ran with (an SLO gate: its measured margin)."""
    send_lags_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    """How late the load generator sent each request of the window, seconds."""
    split: RunSplit | None = None
    """A gate contender's window split into the gate's own W and the hop outside it (None: not a gate, or
    the gate could not be read)."""
    predicted_hop_s: float = math.nan
    """The per-request hop outside the gate added to the solver's W in ``predicted`` (NaN: none added)."""
    predicted_in_gate_s: float = 0.0
    """The time in the gate beyond the model's W added to it in ``predicted`` (``RequestHop.in_gate_s``)."""


@dataclass(frozen=True, eq=False)
class BenchReport:
    config: BenchConfig
    rows: tuple[BenchRow, ...]
    max_batch: int
    note: str
    files: tuple[Path, ...] = ()


# ------------------------------------------------------------------------------------------------
# Running


def contender_override(c: Contender, cfg: BenchConfig, compiled=None) -> BatchingOverride:
    """The model config a contender runs under."""
    if c.kind == "triton":
        return BatchingOverride(max_queue_delay_us=c.max_queue_delay_us, time_scale=cfg.time_scale,
                                instances=_instances(cfg))
    if c.kind == "config":
        if compiled is None:
            raise ValueError("config mode needs the compiled settings")
        s = compiled.settings
        return BatchingOverride(max_queue_delay_us=s.max_queue_delay_microseconds,
                                preferred_batch_size=s.preferred_batch_size, time_scale=cfg.time_scale)
    # the merging gate sends whole batches: Triton's batcher has nothing left to do
    return BatchingOverride(time_scale=cfg.time_scale, dynamic_batching=False, instances=_instances(cfg))


def _instances(cfg: BenchConfig) -> int | None:
    """The instance count a contender sets: k > 1 as asked; with k = 1 the model's config is left as it is."""
    return cfg.instances if cfg.instances > 1 else None


def _run_contender(c: Contender, cfg: BenchConfig, control: ModelConfigControl, triton_url: str,
                   times: np.ndarray, rate: float, B: int, profile_path: Path, log_dir: Path,
                   compiled=None, solver_url: str | None = None,
                   told: ServiceProfile | None = None) -> tuple[OpenLoopResult, RunSplit | None, RuleSchedule | None]:
    """Run one contender; for a gate contender also its window split into the gate's own W and the hop
    outside it (``stack_profile.RunSplit``, written beside its log; None where the gate could not be read),
    and for an SLO gate the rules it ran over the window (``stack_profile.RuleSchedule``; else None)."""
    control.apply(contender_override(c, cfg, compiled))
    sidecar = None
    target = triton_url  # Triton's batcher and config mode: no sidecar hop
    lo, hi = cfg.window
    watch: ExitStack | GateWatch = ExitStack()
    split, in_force = None, None
    try:
        if c.kind == "gate":
            spec = SidecarSpec(policy=c.policy, max_batch=B, profile_csv=profile_path, rate_rps=rate,
                               weight=cfg.weight, idle_power_w=cfg.idle_power_w, adaptive=c.adaptive,
                               solver_url=solver_url if c.adaptive else None, data_plane=cfg.data_plane,
                               slo=cfg.slo if c.slo else None,
                               max_wait_s=c.max_wait_s, group_hold_s=c.group_hold_s)
            safe = c.name.replace(" ", "_").replace(":", "_")
            sidecar = SidecarProcess(triton_url, spec, log_path=log_dir / f"sidecar-{safe}-{rate:g}.log").start()
            target = sidecar.url
            if sidecar.control_url is not None:
                watch = GateWatch(sidecar.control_url, cfg.model, cfg.window, rules=c.slo)
        with watch:
            result = run_open_loop(target, cfg.model, times, timeout_s=cfg.request_timeout_s,
                                   required=(times >= lo) & (times < hi), drain_grace_s=1.0,
                                   time_limit_s=hi + cfg.cooldown_s + 5.0)
        if sidecar is not None and c.slo:
            _save_slo_status(sidecar, cfg.model, log_dir / f"slo-status-{safe}-{rate:g}.txt")
        if isinstance(watch, GateWatch):
            split = window_split(watch, result, cfg.window, told, log_dir / f"gate-split-{safe}-{rate:g}.txt")
            if c.slo:
                in_force = _rule_in_force(watch, log_dir / f"slo-rule-{safe}-{rate:g}.txt")
        return result, split, in_force
    finally:
        if sidecar is not None:
            sidecar.stop()


def window_split(watch: GateWatch, result: OpenLoopResult, window: tuple[float, float], told: ServiceProfile | None,
               path: Path) -> RunSplit | None:
    """A gate contender's window split into its time in the gate and the hop outside it
    (``stack_profile.RunSplit``), written to ``path``; None (and the reason in the file) where it cannot be had."""
    lo, hi = window
    ok = (result.scheduled_s >= lo) & (result.scheduled_s < hi) & result.ok
    try:
        split = run_split(result.done_s[ok] - result.scheduled_s[ok], watch.window(), told)
    except ValueError as exc:
        path.write_text(f"no split: {exc}\n")
        return None
    path.write_text(f"over the measured window: {split.describe()}\n")
    return split


def _rule_in_force(watch: GateWatch, path: Path) -> RuleSchedule | None:
    """The rules an SLO gate ran over the measured window, written to ``path``; None (and the reason in
    the file) where it could not be read."""
    try:
        in_force = watch.rules_in_force()
    except ValueError as exc:
        path.write_text(f"no rule: {exc}\n")
        return None
    path.write_text(in_force.describe() + "\n")
    return in_force


def _save_slo_status(sidecar: SidecarProcess, model: str, path: Path) -> None:
    """The SLO gate's own view at the end of its run (``smdp ctl status``: its predicted and measured
    quantile, the margin and the correction it searched with), beside its log; best effort."""
    import grpc

    from plugin.ctl_cli import _status_text
    from smdp.v1 import smdp_pb2, smdp_pb2_grpc

    if sidecar.control_url is None:
        return
    try:
        with grpc.insecure_channel(sidecar.control_url) as channel:
            status = smdp_pb2_grpc.ControlStub(channel).GetStatus(smdp_pb2.ModelRequest(model=model), timeout=5.0)
        path.write_text(_status_text(status) + "\n")
    except grpc.RpcError as exc:
        path.write_text(f"no status: {exc.code().name}\n")


@dataclass(frozen=True)
class Stack:
    """A Triton ready for contenders: its URL, the model's config control and the scaled profile."""

    triton_url: str
    control: ModelConfigControl
    max_batch: int
    profile: ServiceProfile
    """What the solver is told (predictions, gate policies, config mode): the stack's measured profile,
    or the table the emulated model runs at this time scale (``stack_profile`` off)."""
    profile_path: Path
    solver_url: str | None = None
    """The solver service adaptive gates re-solve through (None: in the sidecar)."""
    emulated: ServiceProfile | None = None
    """The table the emulated model runs at this time scale: what measurement charges (None: ``profile``)."""
    hop: RequestHop | None = None
    """Measured per-request time beyond the batch's slot, added to the solver's W (None: not measured)."""
    placement: Placement = Placement(1, 1, "one instance")
    """k instances on D devices as the contenders' config places them (``plugin.placement``, what the
    sidecar reads): predictions and measured power count P0 once per device."""

    @property
    def ground_truth(self) -> ServiceProfile:
        return self.emulated if self.emulated is not None else self.profile


@contextmanager
def bench_stack(cfg: BenchConfig, triton_url: str | None = None, progress: Progress = print) -> Iterator[Stack]:
    """Start an embedded Triton (unless ``triton_url``) and always leave things as found: our own
    Triton is stopped; someone else's gets the model's original config back."""
    base = ServiceProfile.from_csv(cfg.profile_csv)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    triton = None
    solver = None
    if triton_url is None:
        from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig

        progress(f"starting Triton (embedded, model {cfg.model}) ...")
        t0 = time.monotonic()
        triton = EmbeddedTriton(TritonConfig(models=(cfg.model,), log_file=cfg.out_dir / "tritonserver.log"))
        triton.start()
        triton_url = triton.grpc_url
        progress(f"Triton ready at {triton_url} in {time.monotonic() - t0:.1f} s")
    control = None
    try:
        control = ModelConfigControl(triton_url, cfg.model)
        B = control.max_batch
        if B < 1:
            raise ValueError(f"model {cfg.model!r} does not batch (max_batch_size {B})")
        if B > base.max_batch:
            raise ValueError(f"model {cfg.model!r} batches up to {B}, beyond the profile's {base.max_batch}")
        emulated = scaled_profile(base.truncated(B), cfg.time_scale)
        where = bench_placement(control, cfg)
        hop = None
        profile, profile_path = emulated, write_profile_csv(
            emulated, cfg.out_dir / f"{cfg.profile_name}_x{cfg.time_scale:g}.csv")
        if cfg.stack_profile:
            from .stack_profile import request_hops, stack_profile

            profile, profile_path = stack_profile(triton_url, control, cfg.model, cfg.time_scale, emulated,
                                                  cfg.idle_power_w, cfg.out_dir, progress)
            hop = request_hops(triton_url, control, cfg.model, cfg.time_scale, B, float(profile.mean_s[0]),
                               cfg.data_plane, cfg.out_dir, progress)
        solver_url = None
        if cfg.needs_solver:
            if cfg.solver == "embedded":
                solver = SolverProcess(log_path=cfg.out_dir / "solver.log").start()
                progress(f"solver service (smdp solver-serve) at {solver.url}")
                solver_url = solver.url
            else:
                solver_url = cfg.solver
        yield Stack(triton_url, control, B, profile, profile_path, solver_url, emulated, hop, where)
    finally:
        if solver is not None:
            progress("stopping the solver service")
            solver.stop()
        if control is not None:
            try:
                if triton is None:  # someone else's Triton: leave the model as it was found
                    control.restore()
            except Exception as exc:  # Triton gone: nothing left to restore, and the real error wins
                progress(f"could not restore the model's original config: {exc}")
            control.close()
        if triton is not None:
            progress("stopping Triton")
            triton.stop()


def bench_placement(control: ModelConfigControl, cfg: BenchConfig) -> Placement:
    """k and D of the config the contenders run with (the instance count the bench sets)."""
    where = placement_of_json(control.config_with(BatchingOverride(instances=_instances(cfg))))
    if where.instances != cfg.instances:
        raise ValueError(f"model {cfg.model!r} runs {where.instances} instance(s) with instance_group count "
                         f"{cfg.instances} ({where.why}): give --instances {where.instances} or a config "
                         "that lists one GPU")
    return where


def batching_model(stack: Stack, cfg: BenchConfig, rate: float) -> BatchingModel:
    try:
        return BatchingModel(rate, stack.max_batch, stack.profile, cfg.idle_power_w, cfg.weight,
                             instances=cfg.instances,
                             devices=stack.placement.devices if cfg.instances > 1 else None)
    except ModelError as exc:
        raise ValueError(f"rate {rate:g}/s: {exc}") from None


def arrival_times(cfg: BenchConfig, rate: float, index: int) -> np.ndarray:
    """The Poisson sequence every contender at this rate replays: warm-up, window, cool-down."""
    return arrivals.poisson(rate, duration=cfg.window[1] + cfg.cooldown_s, rng=cfg.seed + index)


def run_one(stack: Stack, cfg: BenchConfig, c: Contender, rate: float, times: np.ndarray) -> BenchRow:
    """One contender on one arrival sequence: predicted, run, measured over the window."""
    lo, hi = cfg.window
    if c.kind == "config" and c.adaptive:
        raise ValueError(f"{c.name}: config mode following the load runs in smdp trace-bench (a constant "
                         "Poisson rate gives it nothing to follow)")
    model = batching_model(stack, cfg, rate)
    compiled = compile_config(model, seed=cfg.seed) if c.kind == "config" else None
    settings = ""
    if c.model_analyzer and cfg.slo is not None:  # the delay its sweep picks at this rate
        delay = ma_delay(model, cfg.slo, seed=cfg.seed)
        c = replace(c, max_queue_delay_us=int(round(delay * 1e6)))
        settings = f"max_queue_delay {delay * 1e3:.3f} ms (Model-Analyzer-style sweep for the SLO)"
    pred = predict(c, model, times, seed=cfg.seed, warmup_s=lo, compiled=compiled, slo=cfg.slo)
    if _on_its_arrivals(c, cfg) and math.isfinite(pred.mean_latency_s):
        pred = _w_on_its_arrivals(pred, c, model, times, cfg)
    hop, in_gate = hop_added(pred, stack, c)
    pred = with_hop(pred, stack, c)
    res, split, in_force = _run_contender(c, cfg, stack.control, stack.triton_url, times, rate, stack.max_batch,
                         stack.profile_path, cfg.out_dir, compiled=compiled, solver_url=stack.solver_url,
                         told=stack.profile)
    m = measure(res, stack.ground_truth, idle_power_w=cfg.idle_power_w, weight=cfg.weight,
                energy_scale=cfg.time_scale, window=cfg.window, placement=stack.placement,
                slo_latency_s=cfg.slo.latency_s if cfg.slo is not None else None)
    in_window = (res.scheduled_s >= lo) & (res.scheduled_s < hi)
    ok = in_window & res.ok
    failures = dict(Counter(s for s, w in zip(res.status, in_window) if w and s != "OK"))
    if c.slo and cfg.slo is not None and cfg.slo_margin_auto:
        settings = f"SLO margin {cfg.slo.margin_s * 1e3:.2f} ms (measured)"
    if in_force is not None and _in_force_on_its_arrivals(c, cfg) and math.isfinite(hop):
        pred = _rule_on_its_arrivals(in_force, model, times, cfg, in_gate + hop)
        settings = f"{settings}; {in_force.describe()}" if settings else in_force.describe()
    sent = in_window & np.isfinite(res.sent_s)
    return BenchRow(rate, c.name, m, pred, batch_histogram(res, stack.max_batch, cfg.window),
                    res.done_s[ok] - res.scheduled_s[ok], failures, res.errors,
                    compiled.settings.describe() if compiled is not None else settings,
                    np.maximum(res.sent_s[sent] - res.scheduled_s[sent], 0.0), split, hop, in_gate)


def _on_its_arrivals(c: Contender, cfg: BenchConfig) -> bool:
    """Whether a contender's W is predicted on its run's own arrivals (``stack_profile.model_w``): the gate
    contenders the operating-point calibration serves, other than the SLO gates (their policy moves while they
    run: predicted after it with the rules they ran, ``_rule_on_its_arrivals``) and a guarded gate (its guard
    is no rule the model runs)."""
    return (cfg.operating_point and c.kind == "gate" and not c.slo and c.max_wait_us is None
            and cfg.instances == 1)


def _w_on_its_arrivals(pred: Prediction, c: Contender, model: BatchingModel, times: np.ndarray,
                       cfg: BenchConfig) -> Prediction:
    """``pred`` with W the model's on these arrivals over the window (the run's own few hundred requests, the
    same sequence the contender replays) instead of the stationary mean; P stays the stationary one."""
    from .stack_profile import model_w, policy_rule

    w = model_w(model.profile, policy_rule(c.policy, model), times, cfg.window, cfg.idle_power_w, cfg.weight)
    return replace(pred, mean_latency_s=w, cost=w + cfg.weight * pred.mean_power_w, source=f"{pred.source}, W sim")


def _in_force_on_its_arrivals(c: Contender, cfg: BenchConfig) -> bool:
    """Whether an SLO gate is predicted with the rule it ran (``_rule_on_its_arrivals``): at the operating
    point, one instance. Its SLO loop moves the policy while it runs (the measured correction), so the
    policy solved before the run is not the one measured."""
    return cfg.operating_point and c.kind == "gate" and c.slo and cfg.instances == 1


def _rule_on_its_arrivals(in_force: RuleSchedule, model: BatchingModel, times: np.ndarray, cfg: BenchConfig,
                          residual_s: float) -> Prediction:
    """The prediction for the rules a gate ran over the window (read from it as it ran): W and P of those rules
    simulated on the run's own arrivals (``stack_profile.model_wp_schedule``), W plus ``residual_s`` (the calibration's
    time in the gate and hop)."""
    from .stack_profile import model_wp_schedule

    f = model_wp_schedule(model.profile, in_force, times, cfg.idle_power_w, cfg.weight)
    w = f.mean_latency_s + residual_s
    return Prediction(w, f.mean_power_w, w + cfg.weight * f.mean_power_w, f.mean_batch, "in force, W P sim+hop")


def hop_parts(hop: RequestHop, c: Contender) -> tuple[float, float]:
    """(hop, in-gate time) a request takes beyond its batch's slot on this stack: through the sidecar
    for gate contenders, direct otherwise."""
    return (hop.gate_s, hop.in_gate_s) if c.kind == "gate" else (hop.direct_s, 0.0)


def hop_added(pred: Prediction, stack: Stack, c: Contender) -> tuple[float, float]:
    """The (hop, in-gate time) ``with_hop`` adds to ``pred``: ``hop_parts`` of the stack's measured hop;
    (NaN, 0) where it adds nothing (no hop measured, or no finite prediction)."""
    if stack.hop is None or not math.isfinite(pred.mean_latency_s):
        return math.nan, 0.0
    return hop_parts(stack.hop, c)


def with_hop(pred: Prediction, stack: Stack, c: Contender) -> Prediction:
    """The solver's prediction plus the measured hop (``hop_added``), as ``run_one`` adds it; as is
    without one (the trace bench's predictions)."""
    hop, in_gate = hop_added(pred, stack, c)
    if math.isnan(hop):
        return pred
    h = hop + in_gate
    return replace(pred, mean_latency_s=pred.mean_latency_s + h, cost=pred.cost + h, source=f"{pred.source}+hop")


def calibration_policy(c: Contender) -> str:
    """The gate policy whose calibration run a gate contender is predicted with: every SMDP contender
    (fixed, adaptive, SLO) shares the SMDP gate's; any other policy runs its own (a policy that
    sends more, smaller batches turns the gate around more often)."""
    return "smdp" if c.policy == "smdp" else c.policy


def _at_operating_point(stack: Stack, cfg: BenchConfig, rate: float, index: int, policy: str,
                        progress: Progress) -> Stack:
    """The stack the gate contenders at ``rate`` whose ``calibration_policy`` is ``policy`` are predicted
    (and their policies solved) with: the profile and hop measured through the gate running that policy at
    this load (``cfg.operating_point``), else ``stack``. Run just before the first of them, so that what it
    measures of a shared host is as close as it can be to what they meet."""
    if not (cfg.operating_point and cfg.stack_profile and stack.hop is not None):
        return stack
    from .stack_profile import CALIBRATION_SEED, operating_point

    lo = cfg.warmup_s
    hi = lo + cfg.duration_s * cfg.calibration_windows
    times = arrivals.poisson(rate, duration=hi + cfg.cooldown_s, rng=cfg.seed + CALIBRATION_SEED + index)
    try:
        op = operating_point(stack.triton_url, stack.control, cfg.model, cfg.time_scale, stack.max_batch,
                             stack.profile, stack.profile_path, stack.ground_truth, cfg.idle_power_w, rate,
                             cfg.weight, times, (lo, hi), cfg.data_plane, cfg.out_dir,
                             progress, policy=policy)
    except ValueError as exc:  # said, and the run goes on with what the quiet stack gave
        progress(f"could not measure the stack at {rate:g} req/s through the gate ({policy}: {exc}): the gate "
                 "contenders with that policy there are predicted with the quiet profile and the lone requests' hop")
        return stack
    return replace(stack, profile=op.profile, profile_path=op.path, hop=RequestHop(stack.hop.direct_s, op.hop_s, op.in_gate_s))


def run_bench(cfg: BenchConfig, triton_url: str | None = None, progress: Progress = print) -> BenchReport:
    """Run every contender at every rate; starts an embedded Triton unless ``triton_url`` is given."""
    rows: list[BenchRow] = []
    with bench_stack(cfg, triton_url, progress) as stack:
        for k, rate in enumerate(cfg.rates):
            model = batching_model(stack, cfg, rate)
            times = arrival_times(cfg, rate, k)
            lo, hi = cfg.window
            counted = int(np.sum((times >= lo) & (times < hi)))
            progress(f"load {rate:g} req/s (rho = {model.load:.2f} of capacity {model.capacity:.0f}/s): "
                     f"{counted} Poisson arrivals measured over {cfg.duration_s:g} s "
                     f"(+{cfg.warmup_s:g} s warm-up, +{cfg.cooldown_s:g} s cool-down)")
            gate_stacks: dict[str, Stack] = {}  # per calibration policy, calibrated before its first contender
            at_rate = cfg
            for c in cfg.contenders:
                on = stack
                if c.kind == "gate":
                    key = calibration_policy(c)
                    if key not in gate_stacks:
                        gate_stacks[key] = _at_operating_point(stack, cfg, rate, k, key, progress)
                    on = gate_stacks[key]
                t0 = time.monotonic()
                if c.slo and at_rate is cfg and cfg.slo_margin_auto:  # measured before the first SLO gate
                    from .slo_margin import margin_before_slo

                    lags = [r.send_lags_s for r in rows if r.rate_rps == rate]
                    margin = margin_before_slo(stack, cfg, times, lags, progress).margin_s
                    at_rate = replace(cfg, slo=replace(cfg.slo, margin_s=margin))
                row = run_one(on, at_rate if c.slo else cfg, c, rate, times)
                rows.append(row)
                m = row.measured
                progress(f"  {c.name:<24} W {m.mean_latency_s * 1e3:7.2f} ms  P {m.mean_power_w:6.1f} W  "
                         f"batch {m.mean_batch:5.2f}  failed {m.failed}  ({time.monotonic() - t0:.1f} s)")
                if row.settings:
                    progress(f"  {'':<24} {'' if c.kind == 'gate' else 'compiled to '}{row.settings}")
        B = stack.max_batch
        where = stack.placement
    note = power_note(cfg.profile_name, cfg.idle_power_w)
    if where.instances > 1:
        note += f"; {where.instances} instances on {where.devices} device(s) ({where.why}): P0 once per device"
    if cfg.stack_profile:
        note += "; the solver is told tau(b) as measured on this stack (smdp profile), energy from the table"
        if cfg.operating_point:
            note += "; for the gate contenders as measured through the gate at each load"
    return BenchReport(cfg, tuple(rows), B, note)


# ------------------------------------------------------------------------------------------------
# Reporting

CSV_FIELDS = [
    "rate_rps", "contender", "requests", "failed", "W_mean_ms", "W_p50_ms", "W_p95_ms", "W_p99_ms",
    "P_w", "J_ms", "throughput_rps", "mean_batch", "pred_W_ms", "pred_P_w", "pred_J_ms", "pred_mean_batch",
    "pred_source", "send_lag_mean_ms", "send_lag_p99_ms", "weight_s_per_w", "time_scale", "note",
    "slo_quantile", "slo_latency_ms", "slo_attainment", "goodput_rps",
    "gate_W_ms", "hop_ms", "pred_gate_W_ms", "pred_hop_ms",
]


def _ms(x: float) -> float:
    return x * 1e3


def csv_rows(report: BenchReport) -> list[dict]:
    out = []
    for r in report.rows:
        m, p = r.measured, r.predicted
        out.append({
            "rate_rps": r.rate_rps, "contender": r.contender, "requests": m.requests, "failed": m.failed,
            "W_mean_ms": _ms(m.mean_latency_s), "W_p50_ms": _ms(m.p50_latency_s), "W_p95_ms": _ms(m.p95_latency_s),
            "W_p99_ms": _ms(m.p99_latency_s), "P_w": m.mean_power_w, "J_ms": _ms(m.cost),
            "throughput_rps": m.throughput_rps, "mean_batch": m.mean_batch,
            "pred_W_ms": _ms(p.mean_latency_s), "pred_P_w": p.mean_power_w, "pred_J_ms": _ms(p.cost),
            "pred_mean_batch": p.mean_batch, "pred_source": p.source,
            "send_lag_mean_ms": _ms(m.send_lag_mean_s), "send_lag_p99_ms": _ms(m.send_lag_p99_s),
            "weight_s_per_w": report.config.weight, "time_scale": report.config.time_scale, "note": report.note,
            "slo_quantile": report.config.slo.quantile if report.config.slo else math.nan,
            "slo_latency_ms": _ms(report.config.slo.latency_s) if report.config.slo else math.nan,
            "slo_attainment": m.slo_attainment, "goodput_rps": m.goodput_rps,
            "gate_W_ms": _ms(r.split.gate_w_s) if r.split else math.nan,
            "hop_ms": _ms(r.split.hop_s) if r.split else math.nan,
            "pred_gate_W_ms": _ms(p.mean_latency_s - r.predicted_hop_s) if r.split else math.nan,
            "pred_hop_ms": _ms(r.predicted_hop_s) if r.split else math.nan,
        })
    return out


def write_csv(report: BenchReport, path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in csv_rows(report):
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def format_table(report: BenchReport) -> str:
    """The per-contender table for a terminal, measured beside predicted."""
    cfg = report.config
    slo = cfg.slo
    head = (f"{'rate':>6} {'contender':<24} {'W ms':>8} {'p50':>7} {'p95':>7} {'p99':>7} {'P W':>6} "
            f"{'J ms':>8} {'thr/s':>7} {'batch':>6} {'fail':>5} "
            + (f"{'attain':>7} {'good/s':>7} " if slo else "")
            + f"| {'W~ms':>7} {'P~W':>6} {'J~ms':>8}  src")
    lines = [
        f"J = W + w P with w = {cfg.weight:g} s/W; emulated GPU {cfg.time_scale:g}x slower than "
        f"{cfg.profile_name}; ~ = solver's prediction",
        f"gate contenders on the {cfg.data_plane} data plane ({cfg.data_plane_reason})",
        *([f"SLO: q{slo.quantile:g} of latency <= {_ms(slo.latency_s):g} ms; attain = share of requests within "
           f"D (>= {slo.quantile:g} meets it), good/s = requests answered within D per second"] if slo else []),
        head,
        "-" * len(head),
    ]
    best: dict[float, float] = {}
    for r in report.rows:
        if r.measured.failed == 0 and math.isfinite(r.measured.cost):
            best[r.rate_rps] = min(best.get(r.rate_rps, math.inf), r.measured.cost)
    for r in report.rows:
        m, p = r.measured, r.predicted
        mark = " *" if best.get(r.rate_rps) == m.cost else ""
        lines.append(
            f"{r.rate_rps:6g} {r.contender:<24} {_ms(m.mean_latency_s):8.2f} {_ms(m.p50_latency_s):7.2f} "
            f"{_ms(m.p95_latency_s):7.2f} {_ms(m.p99_latency_s):7.2f} {m.mean_power_w:6.1f} {_ms(m.cost):8.2f} "
            f"{m.throughput_rps:7.1f} {m.mean_batch:6.2f} {m.failed:5d} "
            + (f"{m.slo_attainment:7.4f} {m.goodput_rps:7.1f} " if slo else "")
            + f"| {_ms(p.mean_latency_s):7.2f} "
            f"{p.mean_power_w:6.1f} {_ms(p.cost):8.2f}  {p.source}{mark}"
        )
    lines += split_table(report)
    lag = max((r.measured.send_lag_p99_s for r in report.rows), default=math.nan)
    lines.append(f"* lowest measured J at its load.  Client send lag p99 (worst contender): {_ms(lag):.2f} ms.")
    lines.append(report.note + ".")
    return "\n".join(lines)


def split_table(report: BenchReport) -> list[str]:
    """Where each gate contender's W went over the window (``RunSplit``): measured W = the gate's own W + the
    hop outside it, beside the prediction's two parts (the solver's W in the gate, the hop added to it):
    which of the two a miss is in. No lines where no gate contender was split."""
    rows = [r for r in report.rows if r.split is not None]
    if not rows:
        return []

    def err(got: float, want: float) -> str:
        return f"{got / want - 1:+7.1%}" if math.isfinite(want) and want > 0 else f"{'-':>7}"

    head = (f"{'rate':>6} {'contender':<24} {'W ms':>8} {'W~ms':>8} {'W err':>7} | {'gate':>7} {'gate~':>7} "
            f"{'(in~)':>6} {'err':>7} | {'hop':>6} {'hop~':>6} | {'batch':>6} {'turn':>5} {'slot+':>6}")
    out = ["where the gate contenders' W went over the window, ms: W = gate (arrival to answer in the sidecar, "
           "its GetStatus) + hop (outside it); ~ = predicted: gate~ = the solver's W + in~ (what the calibration's "
           "gate held beyond the model's W), hop~ = the calibration's hop; batch = mean dispatch-to-completion, "
           "turn = decision to dispatch, slot+ = how much longer the batches held the slot than the profile the "
           "prediction was solved with, per batch", head, "-" * len(head)]
    for r in rows:
        sp, p = r.split, r.predicted
        gate_pred = p.mean_latency_s - r.predicted_hop_s
        out.append(f"{r.rate_rps:6g} {r.contender:<24} {_ms(r.measured.mean_latency_s):8.2f} "
                   f"{_ms(p.mean_latency_s):8.2f} {err(r.measured.mean_latency_s, p.mean_latency_s)} | "
                   f"{_ms(sp.gate_w_s):7.2f} {_ms(gate_pred):7.2f} {_ms(r.predicted_in_gate_s):+6.2f} "
                   f"{err(sp.gate_w_s, gate_pred)} | "
                   f"{_ms(sp.hop_s):6.2f} {_ms(r.predicted_hop_s):6.2f} | {_ms(sp.busy_s):6.2f} {_ms(sp.lag_s):5.2f} "
                   f"{_ms(sp.slot_excess_s):+6.2f}")
    return out


def _json_safe(obj):
    """JSON has no NaN or infinity: None says "not available"."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def write_outputs(report: BenchReport) -> BenchReport:
    """CSV, JSON summary, per-request latencies and PNG plots into the config's out_dir."""
    from .plots import plot_bars, plot_batch_hist, plot_latency_cdf

    out = report.config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = [write_csv(report, out / "bench.csv")]
    summary = {
        "note": report.note,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(report.config).items()},
        "max_batch": report.max_batch,
        "rows": [dict(row, failures=r.failures, errors=list(r.errors), settings=r.settings or None)
                 for row, r in zip(csv_rows(report), report.rows)],
    }
    (out / "bench.json").write_text(json.dumps(_json_safe(summary), indent=1))
    files.append(out / "bench.json")
    np.savez_compressed(out / "latencies.npz", **{f"{r.rate_rps:g}|{r.contender}": r.latencies_s for r in report.rows})
    files.append(out / "latencies.npz")
    files += [plot_latency_cdf(report, out / "latency_cdf.png"), plot_batch_hist(report, out / "batch_sizes.png"),
              plot_bars(report, out / "jwp_bars.png")]
    return replace(report, files=tuple(files))
