"""``smdp trace-bench``: a real trace with a changing rate, replayed on every contender.

The question the product must answer: when the load moves, does the adaptive SMDP gate beat every
single hand-tuned ``max_queue_delay``? Each contender replays exactly the same arrival times (the
trace, time-compressed to the requested mean rate); the adaptive gate's rate estimate, policy
version and threshold are polled from its control API during the run and plotted against the
trace's own windowed rate.

Config mode runs twice: ``config smdp``, the SMDP policy compiled for the trace's mean rate into
Triton's ``dynamic_batching`` once, and ``config smdp adaptive``, which starts from the same settings
while the config-mode follower (``plugin.config_mode.follow``, what ``smdp config-mode --follow`` runs)
polls Triton's statistics in a thread of this process and re-compiles and reloads the model when
the rate moves. Clients talk to Triton directly in both.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from solver import arrivals
from solver.catch_share import RunFit, fit_run
from solver.quantities import DEFAULT_IDLE_POWER_W

from .bench import (BenchConfig, BenchReport, BenchRow, Progress, _ms, bench_stack, contender_override, format_table,
                    hop_added, hop_parts, window_split, with_hop, write_outputs)
from .contenders import Contender, Prediction, compile_config, ma_delay, parse_contender, predict
from .metrics import batch_histogram, measure, power_note
from .openloop import run_open_loop
from .stack import SidecarProcess, SidecarSpec
from .stack_profile import GateWatch
from .triton_control import BatchingOverride

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv_2023.csv"


@dataclass(frozen=True)
class StatusSample:
    t_s: float
    rate_rps: float
    version: int
    serve_from: int
    """The smallest queue length at which the policy in force serves (its wait region ends there)."""
    predicted_rate_rps: float
    solved_for: str = ""
    """The arrival model the policy in force was solved for (from the status note)."""


_SOLVED_FOR = re.compile(r"policy solved for ([^;]+)")


def solved_arrivals(note: str) -> str:
    """The arrival model named in a status note ("poisson" when it says arrivals are assumed Poisson)."""
    m = _SOLVED_FOR.search(note)
    if m is not None:
        spec = m.group(1).strip()
        return "" if spec == "nothing yet" else spec
    return "poisson" if "assumed Poisson" in note else ""


@dataclass(frozen=True)
class FittedPrediction:
    """The gates' predictions under the arrival model fitted to the replayed trace (``smdp fit-arrivals``)."""

    spec: str
    fixed: "Prediction"
    """The fixed gate's table (solved for Poisson at the mean rate) evaluated exactly under the fit."""
    adaptive: "Prediction"
    """The best phase-blind table under the fit (``solver.mmpp.solve_mmpp_blind``; under groups alone
    the compound-Poisson solve): what a gate that learns the clumping can reach."""
    poisson_w_s: float
    """The Poisson reference's W for the fixed gate (what this column showed before)."""
    replay_w_s: float
    """The fixed gate's table simulated on the replayed arrival times themselves (no arrival model):
    what the model's error is measured against before the stack's own effects."""
    option: str = "poisson"
    """The fit as ``--arrivals`` reads it (``solver.arrival_model.arrivals_option``): what the seeded
    adaptive gate starts from."""
    judged_option: str = ""
    """The arrival model the gates' figures are judged under: an MMPP fit with its phases' time scale
    calibrated to ``replay_w_s`` (``solver.mmpp.calibrate_modulation``), as ``--arrivals`` reads it;
    "" where that is ``option`` itself (Poisson, groups alone, or no time scale reaches the target)."""
    calibration: str = ""
    """What the calibration did (``ModulationCalibration.describe``); "" without one."""

    @property
    def judged(self) -> str:
        return self.judged_option or self.option


def split_calibration(times: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The trace's first ``fraction`` of its span (the calibration prefix the arrival model and the
    gates' mean rate are taken from) and the rest, shifted to start at 0 (what is replayed): the
    prediction and the seeded gate are judged on arrivals they were not fitted on."""
    f = float(fraction)
    if not 0.0 < f < 1.0:
        raise ValueError(f"the calibration prefix must be a fraction of the trace in (0, 1), got {fraction!r}")
    t = np.asarray(times, dtype=float) - float(times[0])
    cut = f * float(t[-1])
    calib, rest = t[t < cut], t[t >= cut]
    if calib.size < 20 or rest.size < 20:
        raise ValueError(f"a calibration prefix of {f:g} leaves {calib.size} arrivals to fit and {rest.size} to "
                         "replay; both need at least 20")
    return calib, rest - rest[0]


def time_compressed(shape, rate: float):
    """An MMPP moved to mean ``rate`` as a trace is (``trace_times`` compresses time): rates and
    switching both times rate / mean rate, so its dispersion per mean gap is kept. Scaling the rates
    alone would keep the phases' durations in seconds and shrink them in mean gaps: fitted on the code
    trace's first half (183 req/s) and moved to the second's (118 req/s), that predicted the fixed
    gate's W 13% short, time-compressed 1.3% (the halves' dispersion curves per mean gap agree)."""
    return shape.time_scaled(float(rate) / shape.mean_rate)


def fitted_prediction(model, times: np.ndarray, warmup_s: float = 0.0,
                      fit_times: np.ndarray | None = None) -> FittedPrediction:
    """``fit_times``: where the arrival model is fitted (a calibration prefix), its MMPP then moved to
    ``model``'s rate (the replay's mean: the shape is what is judged out of sample) by
    ``time_compressed``; the replayed ``times`` themselves when None (in sample)."""
    from solver.arrival_model import MMPP2, POISSON, Poisson, arrivals_option
    from solver.errors import ModelError
    from solver.evaluate import evaluate
    from solver.fit import fit_arrivals
    from solver.mmpp import calibrate_modulation, evaluate_mmpp, solve_mmpp_blind
    from solver.simulate import simulate
    from solver.smdp import solve

    ref = solve(model)
    try:
        chosen = fit_arrivals(times if fit_times is None else fit_times).chosen
    except ModelError:  # too few arrivals to fit: the Poisson reference, said so
        chosen = POISSON
    if fit_times is not None and isinstance(chosen, MMPP2):
        chosen = time_compressed(chosen, model.rate)
    replay = simulate(model.profile, ref.policy, times, idle_power_w=model.idle_power_w, weight=model.weight,
                      seed=0, warmup=warmup_s).mean_latency_s
    poisson = Prediction(ref.mean_latency_s, ref.mean_power_w, ref.gain, ref.mean_batch, "exact")
    option = arrivals_option(chosen)
    if isinstance(chosen, Poisson):
        return FittedPrediction(chosen.spec, poisson, poisson, ref.mean_latency_s, replay, option)
    if isinstance(chosen, MMPP2):
        fm = model.with_(rate=chosen.mean_rate, arrivals=chosen)
        best = solve_mmpp_blind(fm, ref.policy)  # the table a gate that learns the fit reaches
        # the phases' time scale calibrated to the fixed table's W on the times the fit came from
        if fit_times is None:
            target = replay
        else:  # the prefix, time-compressed to the replay's rate as the fit was
            prefix_rate = (fit_times.size - 1) / float(fit_times[-1] - fit_times[0])
            target = simulate(model.profile, ref.policy, np.asarray(fit_times, float) * (prefix_rate / model.rate),
                              idle_power_w=model.idle_power_w, weight=model.weight, seed=0,
                              warmup=warmup_s).mean_latency_s
        cal = calibrate_modulation(fm, ref.policy, target)
        jm = model.with_(rate=cal.arrivals.mean_rate, arrivals=cal.arrivals)
        ev, eva = evaluate_mmpp(jm, ref.policy), evaluate_mmpp(jm, best.policy)
        fixed = Prediction(ev.mean_latency_s, ev.mean_power_w, ev.cost, ev.mean_batch, "exact")
        ada = Prediction(eva.mean_latency_s, eva.mean_power_w, eva.cost, eva.mean_batch, "exact")
        return FittedPrediction(chosen.spec, fixed, ada, ref.mean_latency_s, replay, option,
                                "" if cal.clamped else arrivals_option(cal.arrivals), cal.describe())
    fm = model.with_(arrivals=chosen)
    ev1 = evaluate(fm, ref.policy)
    sol = solve(fm)
    return FittedPrediction(chosen.spec, Prediction(ev1.mean_latency_s, ev1.mean_power_w, ev1.cost, ev1.mean_batch, "exact"),
                            Prediction(sol.mean_latency_s, sol.mean_power_w, sol.gain, sol.mean_batch, "exact"),
                            ref.mean_latency_s, replay, option)


def _under(model, option: str):
    """``model`` with the arrival model ``option`` (an MMPP at its own mean rate)."""
    from solver.arrival_model import MMPP2, parse_arrivals

    fit = parse_arrivals(option)
    return model.with_(rate=fit.mean_rate, arrivals=fit) if isinstance(fit, MMPP2) else model.with_(arrivals=fit)


def seeded_slo_prediction(model, option: str, slo, seed: int = 0, judged: str | None = None) -> Prediction:
    """The seeded SLO gate's figures: the SLO search (``solver.slo.solve_slo``) under the fitted arrival
    model ``option`` (``FittedPrediction.option``; an MMPP at its own mean rate, the replay's), as the
    gate's first search runs it; under Poisson or groups alone, at the model's rate. The pick's figures
    are taken apart from the search (``solver.slo.fresh_figures``: exact for an unguarded table, else
    fresh paths): the search's own lean low, and a slowly modulated path's W is noisy. ``judged``: the
    arrival model the figures are taken under (``FittedPrediction.judged``; default ``option``)."""
    from .contenders import slo_prediction

    return slo_prediction(_under(model, option), slo, seed, None if judged is None else _under(model, judged))


def derived_slo_prediction(model, option: str, slo, seed: int = 0, direct_extra_s: float | None = None,
                           catch_share: float | None = None, judged: str | None = None) -> tuple[Prediction, str]:
    """The derived-bound SLO gate's figures and a line on its bound: ``solver.slo_bound`` (D = the least-J
    Triton delay's predicted quantile, the SLO searched for it, the delay served where the search cannot
    beat it) under ``option`` (the fit, an MMPP at its own mean rate; or Poisson), with ``slo``'s quantile
    and margin (and ``direct_extra_s``: what Triton's answers carry beyond the model served directly; None:
    the margin), as the gate's first search runs it (before any measured correction); its pick's figures
    taken apart from the search (``fresh_figures``) under ``judged`` (default ``option``)."""
    from solver.policy import TRITON_CATCH_SHARE
    from solver.slo import fresh_figures
    from solver.slo_bound import DEFAULT_DELAYS_S, BestDelaySlo, solve_best_delay_slo

    under = _under(model, option)
    res = solve_best_delay_slo(under, BestDelaySlo(slo.quantile, DEFAULT_DELAYS_S, slo.margin_s,
                                                   direct_extra_s=direct_extra_s,
                                                   catch_share=TRITON_CATCH_SHARE if catch_share is None else catch_share),
                               seed=seed)
    c = res.result.chosen
    guard = "no guard" if c.max_wait_s is None else f"guard {c.max_wait_s * 1e3:.1f} ms"
    pick = (f"serving the delay itself (search {'feasible' if res.search.feasible else 'infeasible'}, J "
            f"{res.search.chosen.cost * 1e3:.2f} ms)" if res.delay_served else
            f"the search's pick w' {c.table_weight:g}, {guard}, predicted q{slo.quantile:g} {c.estimate.quantile_s * 1e3:.2f} ms")
    f = fresh_figures(under if judged is None else _under(model, judged), c, slo.quantile, seed=seed)
    said = (f"D = {res.result.target.latency_s * 1e3:.2f} ms derived ({res.bound.describe()}); {pick}, J "
            f"{c.cost * 1e3:.2f} ms on the search's path, {f.cost * 1e3:.2f} ms "
            f"{'exact' if f.source == 'exact' else f'on {f.paths} fresh paths'}")
    return Prediction(f.mean_latency_s, f.mean_power_w, f.cost, f.mean_batch, f.source), said


def cached_fitted_prediction(out_dir: Path, model, times: np.ndarray, warmup_s: float = 0.0,
                             fit_times: np.ndarray | None = None) -> FittedPrediction:
    """``fitted_prediction``, kept in ``out_dir`` under a hash of everything it depends on (the times,
    the model's rate, B, profile, P0, w, the warm-up): the fits and the phase-blind search take
    minutes with several phases, and a bench split into short runs replays the same trace each time."""
    import hashlib
    import json
    from dataclasses import asdict

    h = hashlib.sha256(np.ascontiguousarray(times, dtype=float).tobytes())
    if fit_times is not None:
        h.update(b"fitted on")
        h.update(np.ascontiguousarray(fit_times, dtype=float).tobytes())
    prof = model.profile
    for arr in (prof.mean_s, prof.cv, prof.energy_j, *(prof.samples or ())):
        h.update(np.ascontiguousarray(arr, dtype=float).tobytes())
    h.update(repr((model.rate, model.max_batch, model.idle_power_w, model.weight, warmup_s, "option",
                   "time-compressed" if fit_times is not None else "", "calibrated")).encode())
    path = Path(out_dir) / f"fitted-prediction-{h.hexdigest()[:16]}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return FittedPrediction(d["spec"], Prediction(**d["fixed"]), Prediction(**d["adaptive"]),
                                d["poisson_w_s"], d["replay_w_s"], d["option"], d["judged_option"], d["calibration"])
    fp = fitted_prediction(model, times, warmup_s, fit_times)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(fp)))
    return fp


def _poll_status(control_url: str, model: str, start: float, stop: threading.Event,
                 out: list[StatusSample], interval_s: float = 0.25) -> None:
    import grpc

    from smdp.v1 import smdp_pb2, smdp_pb2_grpc

    with grpc.insecure_channel(control_url) as ch:
        stub = smdp_pb2_grpc.ControlStub(ch)
        version, serve_from = -1, -1
        while not stop.wait(interval_s):
            try:
                s = stub.GetStatus(smdp_pb2.ModelRequest(model=model), timeout=1.0)
                if s.policy_version != version:
                    p = stub.GetPolicy(smdp_pb2.ModelRequest(model=model), timeout=1.0)
                    version = s.policy_version
                    serve_from = next((n for n, a in enumerate(p.actions) if a > 0), -1)
            except grpc.RpcError:
                continue  # the model appears with its first request
            out.append(StatusSample(time.monotonic() - start, s.rate.rate_rps, s.policy_version,
                                    serve_from, s.predicted_rate_rps, solved_arrivals(s.note)))


def wait_for_seeded_policy(control_url: str, model: str, timeout_s: float = 180.0) -> float:
    """Seconds until the gate's policy in force is solved for a given (non-Poisson) arrival model: a
    seeded gate solves for its fitted model at start-up (the native plane gates Triton's ready models
    before any request), which takes seconds to a minute with several phases; the replay starts after
    it, as traffic would reach a sidecar started ahead of it. TimeoutError when it does not come."""
    import grpc

    from smdp.v1 import smdp_pb2, smdp_pb2_grpc

    t0 = time.monotonic()
    with grpc.insecure_channel(control_url) as ch:
        stub = smdp_pb2_grpc.ControlStub(ch)
        while time.monotonic() - t0 < timeout_s:
            try:
                s = stub.GetStatus(smdp_pb2.ModelRequest(model=model), timeout=1.0)
                if solved_arrivals(s.note) not in ("", "poisson"):
                    return time.monotonic() - t0
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"model {model}: no policy solved for the given arrival model within {timeout_s:g} s")


@dataclass(frozen=True)
class FollowSettings:
    """How the config-mode follower runs during a replay (the trace is time-compressed: short windows)."""

    window_s: float = 3.0
    poll_s: float = 0.25
    settle_s: float = 1.0
    min_interval_s: float = 2.0
    n_requests: int = 5000


class ConfigFollowRun:
    """The config-mode follower in a thread for one replay: ``start()``, replay, ``stop()``."""

    def __init__(self, triton_url: str, model: str, profile, max_batch: int, cfg: BenchConfig,
                 start_rate: float, follow: FollowSettings, progress: Progress) -> None:
        from plugin.config_mode.follow import RateFollower, follow_triton

        follower = RateFollower(window_s=follow.window_s, settle_s=follow.settle_s, min_arrivals=20)
        self.loop, self._close = follow_triton(
            triton_url, model, profile, weight=cfg.weight, idle_power_w=cfg.idle_power_w, max_batch=max_batch,
            n_requests=follow.n_requests, seed=cfg.seed, poll_s=follow.poll_s, min_interval_s=follow.min_interval_s,
            follower=follower, log=lambda msg: progress("    " + msg.replace("config-follow: ", "follow: ")))
        self._start_rate = start_rate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ConfigFollowRun":
        # the model runs the settings compiled for start_rate: the follower watches for change from it
        self.loop.follower.compiled(self._start_rate, time.monotonic())
        self._thread = threading.Thread(target=self.loop.run, args=(self._stop,), name="config-follow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        self._close()

    def summary(self) -> str:
        ch = self.loop.changes
        applied = [c for c in ch if c.status == "applied"]
        last = f"; last for {applied[-1].rate:.0f}/s: {applied[-1].settings.describe()}" if applied else ""
        return f"followed: {len(ch)} re-compile(s), {len(applied)} reload(s){last}"


def gate_spec(c: Contender, cfg: BenchConfig, *, max_batch: int, profile_csv: Path, rate_rps: float,
              solver_url: str | None, slo, arrivals: str, slo_direct_extra_s: float | None = None,
              slo_catch_share: float | None = None) -> SidecarSpec:
    """A gate contender's sidecar: its guard (``-guard:US``) and, seeded, the fitted ``arrivals``; a derived
    gate's race share is ``slo_catch_share`` where given, else ``cfg``'s."""
    return SidecarSpec(policy=c.policy, max_batch=max_batch, profile_csv=profile_csv, rate_rps=rate_rps,
                       weight=cfg.weight, idle_power_w=cfg.idle_power_w, adaptive=c.adaptive,
                       solver_url=solver_url if c.adaptive else None, data_plane=cfg.data_plane,
                       long_run_window_s=None if c.long_run else 0.0, slo=slo if c.slo else None,
                       max_wait_s=c.max_wait_s, group_hold_s=c.group_hold_s, arrivals=arrivals if c.seeded else None,
                       slo_bound="best_delay" if c.derived else "stated",
                       slo_direct_extra_s=slo_direct_extra_s if c.derived else None,
                       slo_catch_share=(cfg.slo_catch_share if slo_catch_share is None else slo_catch_share)
                       if c.derived else None)


def derived_catch_share(cfg: BenchConfig, shares: "TritonShareFits") -> float | None:
    """The race share a derived gate models Triton with: fitted (``--slo-catch-share fit``), stated, or
    None (the sidecar config's default)."""
    if not cfg.slo_catch_share_fit:
        return cfg.slo_catch_share
    if shares.share is None:  # BenchConfig checks the order; a Triton run with no answer in the window
        raise ValueError("--slo-catch-share fit: no Triton delay contender's run to fit the share to")
    return shares.share


def triton_share_fit(stack, c: Contender, res, quantile: float, window: tuple[float, float], seed: int) -> RunFit:
    """``solver.catch_share`` fitted to a Triton delay contender's run (``res``, an open-loop result): by
    its answers' mean and by their ``quantile``, with the hop the bench adds to Triton's predictions. The
    model is given the arrivals Triton saw (the requests' send times) and the answers are timed from their
    send, so a load generator that lags in a burst is not counted as Triton's."""
    sent = np.isfinite(res.sent_s)
    ok = res.ok & sent & (res.sent_s >= window[0]) & (res.sent_s < window[1])
    hop = sum(hop_parts(stack.hop, c)) if stack.hop is not None else 0.0
    return fit_run(stack.profile, stack.max_batch, c.max_queue_delay_us / 1e6, np.sort(res.sent_s[sent]),
                   res.done_s[ok] - res.sent_s[ok], quantile, hop_s=hop, window=window, seed=seed)


class ContenderFit(NamedTuple):
    """A Triton delay contender's name and its run's fitted share."""

    contender: str
    fit: RunFit


class TritonShareFits:
    """The race share (``solver.catch_share``) fitted to each Triton delay contender's run, over the repeats;
    ``share`` is the first run's (its W and tail fits weighed by their errors), which the derived gates use
    with ``--slo-catch-share fit``."""

    def __init__(self) -> None:
        self.rows: list[ContenderFit] = []

    @property
    def share(self) -> float | None:
        return self.rows[0].fit.share if self.rows else None

    def add(self, contender: str, fit: RunFit) -> None:
        self.rows.append(ContenderFit(contender, fit))

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps([{"contender": r.contender, **r.fit.to_dict()} for r in self.rows], indent=1))
        return path


def run_trace_bench(cfg: BenchConfig, times: np.ndarray, triton_url: str | None = None,
                    progress: Progress = print,
                    follow: FollowSettings = FollowSettings(),
                    calibration: np.ndarray | None = None,
                    shares: TritonShareFits | None = None) -> tuple[BenchReport, list[StatusSample]]:
    """Every contender on ``times``; figures over cfg.window; the adaptive gate's status trail.

    ``shares``: where each Triton delay contender's fitted race share is added (a fresh one if None);
    with ``cfg.slo_catch_share_fit`` the derived gates use its ``share``.

    ``calibration``: earlier arrivals (``split_calibration``) that the arrival model's shape is fitted
    to instead of the replayed ``times`` themselves; the mean rate stays the replay's (the gates are
    given it as in sample, and the adaptive gate measures it), so what is judged out of sample is the
    clumping and modulation."""
    rows: list[BenchRow] = []
    trail: list[StatusSample] = []
    shares = TritonShareFits() if shares is None else shares
    mean_rate = (times.size - 1) / float(times[-1] - times[0])
    lo, hi = cfg.window
    with bench_stack(cfg, triton_url, progress) as stack:
        from solver.model import BatchingModel

        model = BatchingModel(mean_rate, stack.max_batch, stack.profile, cfg.idle_power_w, cfg.weight)
        progress(f"trace: {times.size} arrivals over {times[-1]:.0f} s, mean {mean_rate:.0f} req/s "
                 f"(rho = {model.load:.2f} of capacity {model.capacity:.0f}/s)"
                 + ("" if calibration is None else
                    f"; the arrival model fitted to the {calibration.size} arrivals before it ({calibration[-1]:.0f} s, "
                    f"mean {(calibration.size - 1) / float(calibration[-1]):.0f} req/s, not replayed)"))
        fitted = cached_fitted_prediction(cfg.out_dir, model, times, warmup_s=lo, fit_times=calibration)
        where = "the replayed trace" if calibration is None else "the calibration prefix"
        progress(f"arrival model fitted to {where}: {fitted.spec}; fixed gate's W predicted "
                 f"{fitted.fixed.mean_latency_s * 1e3:.2f} ms under it ({fitted.poisson_w_s * 1e3:.2f} ms under Poisson, "
                 f"{fitted.replay_w_s * 1e3:.2f} ms simulated on the replayed times)"
                 + (f"; gates judged under it with its {fitted.calibration}" if fitted.calibration else ""))
        slo = cfg.slo  # with --slo-margin auto: its margin measured before the first SLO gate
        direct_extra: float | None = None  # ... and what Triton's answers carry beyond the model, for a derived D
        for c in cfg.contenders:
            t0 = time.monotonic()
            if c.slo and cfg.slo_margin_auto and slo is cfg.slo:
                from .slo_margin import margin_before_slo

                measured = margin_before_slo(stack, cfg, times, [r.send_lags_s for r in rows], progress)
                slo, direct_extra = replace(slo, margin_s=measured.margin_s), measured.direct_extra_s
            # a rule's prediction assumes Poisson arrivals at the trace's mean rate: a reference, not the truth
            catch = derived_catch_share(cfg, shares) if c.derived else None  # a derived gate's race share
            compiled = compile_config(model, seed=cfg.seed) if c.kind == "config" else None
            settings = compiled.settings.describe() if compiled is not None else ""
            if c.model_analyzer and cfg.slo is not None:
                # Model Analyzer profiles at the peak: the busiest 10 s of the replay, at most 95% of capacity
                _, rates = arrivals.windowed_rate(times, 10.0)
                peak = min(float(rates.max()), 0.95 * model.capacity)
                delay = ma_delay(model.with_(rate=peak), cfg.slo, seed=cfg.seed)
                c = replace(c, max_queue_delay_us=int(round(delay * 1e6)))
                settings = f"max_queue_delay {delay * 1e3:.3f} ms (Model-Analyzer-style sweep at peak {peak:.0f}/s)"
            pred = predict(c, model, times, seed=cfg.seed, warmup_s=lo, compiled=compiled,
                           slo=slo if c.slo else cfg.slo)
            if c.kind == "gate" and c.policy == "smdp" and not c.slo:  # the fitted model, not the Poisson reference
                pred = fitted.adaptive if c.adaptive else fitted.fixed
            elif c.slo and c.derived:  # D derived and searched under the model the gate starts from
                pred, said = derived_slo_prediction(model, fitted.option if c.seeded else "poisson", slo, cfg.seed,
                                                    direct_extra, catch, judged=fitted.judged)
                progress(f"  {c.name}: {said}" + (f" (race share {catch:.2f}, fitted to Triton's run)"
                                                   if cfg.slo_catch_share_fit else ""))
            elif c.slo and c.seeded:  # the SLO search under the fitted model, as the seeded gate runs it
                pred = seeded_slo_prediction(model, fitted.option, slo, cfg.seed, judged=fitted.judged)
            hop, in_gate = hop_added(pred, stack, c)
            pred = with_hop(pred, stack, c)  # the measured per-request hop, as the steady-load bench adds
            status: list[StatusSample] = []
            sidecar = None
            follower = None
            target = stack.triton_url
            stop = threading.Event()
            poller = None
            watch: ExitStack | GateWatch = ExitStack()
            split = None
            try:
                if c.kind == "triton":
                    stack.control.apply(BatchingOverride(max_queue_delay_us=c.max_queue_delay_us,
                                                         time_scale=cfg.time_scale))
                elif c.kind == "config":
                    stack.control.apply(contender_override(c, cfg, compiled))
                    if c.adaptive:
                        follower = ConfigFollowRun(stack.triton_url, cfg.model, stack.profile, stack.max_batch, cfg,
                                                   mean_rate, follow, progress).start()
                else:
                    stack.control.apply(BatchingOverride(time_scale=cfg.time_scale, dynamic_batching=False))
                    spec = gate_spec(c, cfg, max_batch=stack.max_batch, profile_csv=stack.profile_path,
                                     rate_rps=mean_rate, solver_url=stack.solver_url, slo=slo, arrivals=fitted.option,
                                     slo_direct_extra_s=direct_extra,
                                     slo_catch_share=catch)
                    safe = c.name.replace(" ", "_").replace(":", "_")
                    sidecar = SidecarProcess(stack.triton_url, spec, log_path=cfg.out_dir / f"sidecar-{safe}.log").start()
                    target = sidecar.url
                    if c.seeded and sidecar.control_url:
                        took = wait_for_seeded_policy(sidecar.control_url, cfg.model)
                        progress(f"  {c.name}: the policy for the fitted model in force {took:.1f} s after start")
                    if sidecar.control_url:
                        # every gate is polled alike, so the trail plot's status reads cost the fixed
                        # gate what they cost the adaptive one; only the (scaled) adaptive gate's are kept
                        poller = threading.Thread(target=_poll_status, daemon=True,
                                                  args=(sidecar.control_url, cfg.model, time.monotonic(), stop,
                                                        status))
                        poller.start()
                        # the gate's own W over the window, to split the client's W into it and the hop outside
                        watch = GateWatch(sidecar.control_url, cfg.model, cfg.window)
                with watch:
                    res = run_open_loop(target, cfg.model, times, timeout_s=cfg.request_timeout_s,
                                        required=(times >= lo) & (times < hi), drain_grace_s=1.0,
                                        time_limit_s=float(times[-1]) + 10.0)
                if isinstance(watch, GateWatch):
                    split = window_split(watch, res, cfg.window, stack.profile, cfg.out_dir / f"gate-split-{safe}.txt")
            finally:
                stop.set()
                if poller is not None:
                    poller.join(5)
                if sidecar is not None:
                    sidecar.stop()
                if follower is not None:
                    follower.stop()
                    settings = follower.summary()
                    # the follower reloaded the model behind the control's back: make the next apply reload
                    stack.control.current = {}
            if c.name == TRAILED:
                trail.extend(status)
            if c.kind == "gate":
                since: dict[str, float] = {}
                for x in status:
                    if x.solved_for:
                        since.setdefault(x.solved_for, x.t_s)
                used = [f"{k} (from {t:.0f} s)" for k, t in since.items()]
                if not used and not c.adaptive:
                    used = ["poisson (solved once, at the mean rate)"]
                settings = (f"predicted under the fitted {fitted.spec}; policies solved for "
                            f"{', '.join(used) if used else 'unknown (no status read)'}"
                            + (f"; SLO margin {slo.margin_s * 1e3:.2f} ms" if c.slo and slo is not None else ""))
            m = measure(res, stack.ground_truth, idle_power_w=cfg.idle_power_w, weight=cfg.weight,
                        energy_scale=cfg.time_scale, window=cfg.window,
                        slo_latency_s=cfg.slo.latency_s if cfg.slo is not None else None)
            in_window = (res.scheduled_s >= lo) & (res.scheduled_s < hi)
            ok = in_window & res.ok
            failures: dict[str, int] = {}
            for s, w in zip(res.status, in_window):
                if w and s != "OK":
                    failures[s] = failures.get(s, 0) + 1
            sent = in_window & np.isfinite(res.sent_s)
            rows.append(BenchRow(mean_rate, c.name, m, pred, batch_histogram(res, stack.max_batch, cfg.window),
                                 res.done_s[ok] - res.scheduled_s[ok], failures, res.errors, settings,
                                 np.maximum(res.sent_s[sent] - res.scheduled_s[sent], 0.0), split, hop, in_gate))
            progress(f"  {c.name:<24} W {m.mean_latency_s * 1e3:7.2f} ms  P {m.mean_power_w:6.1f} W  "
                     f"J {_ms(m.cost):7.2f} ms  batch {m.mean_batch:5.2f}  failed {m.failed}  "
                     f"({time.monotonic() - t0:.1f} s)")
            if c.kind == "triton" and not c.model_analyzer and cfg.instances == 1 and ok.any():
                q = cfg.slo.quantile if cfg.slo is not None else 0.99
                fit = triton_share_fit(stack, c, res, q, cfg.window, cfg.seed)
                shares.add(c.name, fit)
                progress(f"  {'':<24} Triton's batcher catches its instance free at {fit.describe()}")
            if settings:
                progress(f"  {'':<24} {settings if follower is not None or c.kind == 'gate' else 'compiled to ' + settings}")
        B = stack.max_batch
    note = power_note(cfg.profile_name, cfg.idle_power_w)
    return BenchReport(cfg, tuple(rows), B, note), trail


def plot_trail(times: np.ndarray, trail: list[StatusSample], path: Path, window_s: float = 2.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts, rate = arrivals.windowed_rate(times, window_s)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.step(starts, rate, where="post", color="0.6", label=f"trace rate ({window_s:g} s windows)")
    if trail:
        t = np.array([s.t_s for s in trail])
        ax.plot(t, [s.rate_rps for s in trail], color="C0", label="sidecar's rate estimate")
        ax.plot(t, [s.predicted_rate_rps for s in trail], color="C1", drawstyle="steps-post",
                label="rate the policy in force was solved for")
        ax2 = ax.twinx()
        ax2.plot(t, [s.serve_from if s.serve_from >= 0 else np.nan for s in trail], color="C2",
                 drawstyle="steps-post", label="policy serves from n = (waits below)")
        ax2.set_ylabel("queue length n")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Adaptive SMDP gate on a trace replay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TRAILED = "gate smdp adaptive"
"""The contender whose rate estimate and policy are plotted over time (one run: trails do not mix)."""


def trace_times(path: Path, mean_rate: float, limit: int | None) -> np.ndarray:
    return arrivals.trace(path, target_rate=mean_rate, limit=limit)


def default_contenders(delays_us: tuple[int, ...]) -> tuple[Contender, ...]:
    return (*(Contender("triton", max_queue_delay_us=d) for d in delays_us),
            Contender("gate", policy="smdp", adaptive=False), Contender("gate", policy="smdp", adaptive=True),
            Contender("config", policy="smdp"), Contender("config", policy="smdp", adaptive=True))


def summary_lines(report: BenchReport) -> list[str]:
    """Where the adaptive gate stands against every fixed contender, in J."""
    by = {r.contender: r.measured.cost for r in report.rows}
    ada = by.get("gate smdp adaptive")
    if ada is None or not math.isfinite(ada):
        return []
    lines = []
    for name, cost in by.items():
        if name == "gate smdp adaptive" or not math.isfinite(cost):
            continue
        lines.append(f"adaptive SMDP gate vs {name:<24}: J {_ms(ada):8.2f} vs {_ms(cost):8.2f} ms "
                     f"({(cost - ada) / cost * 100:+.1f}% better)" if ada <= cost else
                     f"adaptive SMDP gate vs {name:<24}: J {_ms(ada):8.2f} vs {_ms(cost):8.2f} ms "
                     f"({(ada - cost) / cost * 100:.1f}% WORSE)")
    return lines


def repeat_summary(costs: dict[str, list[float]], reference: str = TRAILED) -> list[str]:
    """Per contender, J over the repeats (mean, min-max), and against ``reference`` the paired
    difference per repeat: a comparison the run-to-run drift of one contender cannot fake.

    ``costs``: contender -> J (seconds) per repeat, in repeat order.
    """
    lines = [f"{'contender':<32} {'J mean ms':>10} {'min':>8} {'max':>8}  repeats"]
    for name, js in costs.items():
        a = np.array(js, dtype=float) * 1e3
        lines.append(f"{name:<32} {a.mean():10.2f} {a.min():8.2f} {a.max():8.2f}  {len(a)}")
    ref = costs.get(reference)
    if ref is None:
        return lines
    for name, js in costs.items():
        if name == reference:
            continue
        d = (np.array(ref, dtype=float) - np.array(js, dtype=float)) / np.array(js, dtype=float) * 100
        lower = int(np.sum(d < 0))
        lines.append(f"{reference} vs {name}: J {d.mean():+.1f}% on average (per repeat {', '.join(f'{x:+.1f}' for x in d)}%), "
                     f"lower in {lower} of {d.size}")
    return lines


def later_repeats(cfg: BenchConfig, first_share: float | None) -> BenchConfig:
    """The settings of the repeats after the first. With ``--slo-catch-share fit`` the derived gates keep
    the first repeat's fit (``first_share``), stated: a reversed order runs them before any Triton delay,
    which the fit needs first."""
    if cfg.slo_catch_share_fit and first_share is not None:
        return replace(cfg, slo_catch_share=first_share, slo_catch_share_fit=False)
    return cfg


def main_trace_bench(cfg: BenchConfig, trace_path: Path, mean_rate: float, limit: int | None,
                     triton_url: str | None, progress: Progress, follow: FollowSettings = FollowSettings(),
                     repeat: int = 1, fit_prefix: float = 0.0) -> int:
    """``repeat`` > 1: the contender list is run that many times, in reverse order every other time
    (a contender's place in a run moves its J by a few percent), and J is summarised over the
    repeats; the tables and plots are those of the first repeat."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat!r}")
    times = trace_times(trace_path, mean_rate, limit)
    calibration = None
    if fit_prefix:
        calibration, times = split_calibration(times, fit_prefix)
    span = float(times[-1])
    cfg = replace(cfg, duration_s=max(span - cfg.warmup_s - cfg.cooldown_s, 1.0))
    shares = TritonShareFits()  # one over the repeats: a reversed order's derived gates keep the first fit
    report, trail = run_trace_bench(cfg, times, triton_url, progress, follow, calibration, shares)
    costs: dict[str, list[float]] = {r.contender: [r.measured.cost] for r in report.rows}
    failed = sum(r.measured.failed for r in report.rows)
    later = later_repeats(cfg, shares.share)
    for k in range(1, repeat):
        order = tuple(reversed(cfg.contenders)) if k % 2 else cfg.contenders
        progress(f"repeat {k + 1} of {repeat}: {', '.join(c.name for c in order)}")
        again, _ = run_trace_bench(replace(later, contenders=order), times, triton_url, progress, follow, calibration,
                                   shares)
        for r in again.rows:
            costs[r.contender].append(r.measured.cost)
        failed += sum(r.measured.failed for r in again.rows)
    report = write_outputs(report)
    files = list(report.files) + [plot_trail(times, trail, cfg.out_dir / "adaptive_trail.png")]
    if shares.rows:
        files.append(shares.write(cfg.out_dir / "catch_share.json"))
    print()
    print(format_table(report))  # with the gates' split (``split_table``)
    fitted_on = "the replayed trace" if calibration is None else f"the first {fit_prefix:g} of the trace (not replayed)"
    print(f"(gate predictions: exact evaluation under the arrival model fitted to {fitted_on}, the fixed gate's "
          "Poisson-solved table and the best phase-blind table for the adaptive one; SLO gates: their pick on fresh "
          "paths of it; an MMPP fit with its phases' time scale calibrated to the fixed table's W on the times it was "
          "fitted to, so the fixed gate's W is not an independent check there; Triton delays and config mode: "
          "simulated on the trace; each gate's arrival models solved for are in bench.json's settings)")
    for line in summary_lines(report):
        print(line)
    if repeat > 1:
        print()
        print(f"over {repeat} repeats (order reversed every other one):")
        lines = repeat_summary(costs)
        for line in lines:
            print(line)
        path = cfg.out_dir / "repeats.txt"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    for f in files:
        print(f"wrote {f}")
    if failed:  # as ``smdp bench``: a run with failed requests is not a clean result
        print(f"smdp trace-bench: {failed} request(s) failed; see bench.json for the errors", file=sys.stderr)
        return 1
    return 0


def add_trace_bench_command(sub) -> None:
    import argparse

    from .bench import BENCH_WEIGHT, DEFAULT_PROFILE

    p = sub.add_parser(
        "trace-bench",
        help="replay a real trace with a changing rate on Triton's batcher delays, the (adaptive) SMDP gate and "
             "(adaptive) config mode",
        description="Every contender replays the same trace arrivals (time-compressed to --rate on average) "
        "against a real embedded Triton; reports W, P, J per contender and plots the adaptive gate's rate "
        "estimate and threshold over time. Power is modelled from the profile.",
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace CSV (default: the Azure conversation trace)")
    p.add_argument("--rate", type=float, default=150.0, help="mean request rate of the replay, req/s (default: %(default)s)")
    p.add_argument("--limit", type=int, default=9000, help="trace rows replayed from the start, 0 = all (default: %(default)s)")
    p.add_argument("--delays-us", default="0,5000,20000,50000",
                   help="Triton max_queue_delay_microseconds contenders (default: %(default)s)")
    p.add_argument("--contenders", metavar="SPEC,...",
                   help="replace the contender list: triton:DELAY_US, gate:smdp, gate:smdp-adaptive, "
                   "gate:smdp-adaptive-unscaled (re-solves with w as is), gate:smdp-adaptive-seeded (starts from the "
                   "fitted arrival model), gate:smdp-slo-seeded (the --slo-latency SLO searched under the fitted "
                   "model), gate:smdp-slo-derived-seeded (the same with D derived from the model: --slo-bound "
                   "best_delay; --slo-latency is then the attainment's yardstick only), config:smdp, config:smdp-adaptive "
                   "(default: the --delays-us delays, both SMDP gates and both config modes)")
    p.add_argument("--slo-catch-share", default=None, metavar="SHARE|fit",
                   help="the derived-bound SLO gates (gate:smdp-slo-derived*): the share of its instance's completions "
                   "at which Triton's batcher is modelled catching it free, in [0, 1], or fit: the share fitted to the "
                   "W and tail of the first triton:DELAY_US contender's run, which must come before them (every "
                   "Triton delay contender's fitted share is reported either way) (default: the sidecar config's "
                   "slo.best_delay_catch_share)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the contender list this many times, reversing its order every other time, and "
                   "summarise J over the repeats (default: %(default)s)")
    p.add_argument("--fit-prefix", type=float, default=0.0, metavar="FRACTION",
                   help="fit the arrival model's shape from this first fraction of the trace's span and replay only "
                   "the rest, so the clumping the predictions and the seeded gate assume is judged out of "
                   "sample (the mean rate stays the replayed part's, the shape moved to it by time "
                   "compression); 0 = fit the replayed trace itself (default: %(default)s)")
    p.add_argument("--weight", type=float, default=BENCH_WEIGHT, help="w, seconds per watt (default: %(default)s)")
    p.add_argument("--time-scale", type=float, default=10.0, help="emulated GPU this much slower (default: %(default)s)")
    p.add_argument("--idle-power", type=float, default=DEFAULT_IDLE_POWER_W, help="P0, watts (default: %(default)s)")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    p.add_argument("--rate-window", type=float, default=3.0,
                   help="the sidecar's and the config-mode follower's rate-estimator window, seconds: short, since the replay compresses "
                   "minutes into seconds (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds at the start not counted (default: %(default)s)")
    p.add_argument("--solver", default="embedded", metavar="embedded|HOST:PORT|none",
                   help="where the adaptive gate re-solves: a smdp solver-serve started for the bench (embedded), "
                   "a running one, or none = in the sidecar (default: %(default)s)")
    p.add_argument("--triton", metavar="HOST:PORT", help="use this Triton instead of an embedded one")
    p.add_argument("--data-plane", choices=["auto", "python", "native"], default="auto",
                   help="what carries the gate contenders' requests (native: the C++ smdp-gate, `make native`; "
                   "auto: native where smdp-gate is found) (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out/trace-bench"))
    from .cli import add_slo_flags

    add_slo_flags(p)
    p.set_defaults(func=_cmd)


def catch_share_arg(text: str | None) -> float | None:
    """``--slo-catch-share``: a share (checked by ``BenchConfig``), or None for the default and for fit."""
    if text is None or text == "fit":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--slo-catch-share must be a share in [0, 1] or fit, got {text!r}") from None


def _cmd(args) -> int:
    import sys

    from plugin.launcher.triton_server import TritonStartError, TritonUnavailable
    from solver.model import ModelError

    start = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)

    import os

    os.environ["SMDP_SIDECAR_RATE_WINDOW_S"] = repr(float(args.rate_window))  # read by the sidecar processes
    try:
        delays = tuple(int(float(d)) for d in args.delays_us.split(",") if d.strip())
        from .cli import slo_contenders, slo_margin_auto, slo_target

        slo = slo_target(args)
        contenders = (tuple(parse_contender(c) for c in args.contenders.split(",") if c.strip())
                      if args.contenders else default_contenders(delays) + slo_contenders(slo, args.slo_contenders))
        cfg = BenchConfig(rates=(args.rate,), contenders=contenders, time_scale=args.time_scale, slo=slo,
                          slo_margin_auto=slo_margin_auto(args), slo_catch_share=catch_share_arg(args.slo_catch_share),
                          slo_catch_share_fit=args.slo_catch_share == "fit",
                          weight=args.weight, idle_power_w=args.idle_power, profile_csv=args.profile,
                          warmup_s=args.warmup, cooldown_s=1.0, out_dir=args.out,
                          solver=None if args.solver in ("none", "") else args.solver,
                          data_plane=args.data_plane)
        return main_trace_bench(cfg, args.trace, args.rate, args.limit or None, args.triton, say,
                                FollowSettings(window_s=float(args.rate_window)), repeat=args.repeat,
                                fit_prefix=args.fit_prefix)
    except (TritonUnavailable, TritonStartError) as exc:
        print(f"smdp trace-bench: Triton is not available: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ModelError, OSError) as exc:
        print(f"smdp trace-bench: {exc}", file=sys.stderr)
        return 2
