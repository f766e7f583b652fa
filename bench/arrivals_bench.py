"""Bursty arrivals on recorded traces: the Poisson-solved SMDP policy against arrival-aware ones and Triton.

For each Azure LLM trace (rescaled in time to a given load of the profile's capacity), the arrival
model is fitted on the first half of the trace (``solver.fit``) and every contender is simulated
on the second half (held out), on common service-time streams:

* smdp poisson: the policy solved for Poisson arrivals at the trace's mean rate (what the solver did
  before arrival models), predicted by exact evaluation under Poisson;
* smdp batch: solved for the compound-Poisson fit (groups within 1% of a mean gap), predicted
  exactly under that fit;
* smdp mmpp / smdp bmmpp: solved for the fitted MMPP and the fitted batch MMPP (groups per phase,
  what ``fit-arrivals`` picks on both traces): per-phase tables, the gate's phase from the forward
  filter, predicted exactly under the fit with the phase observed;
* "same, pred. by fit": the Poisson-solved table (what a fixed gate runs) predicted exactly under
  the chosen fit, phase-blind: the prediction the trace bench prints for the fixed gate;
* best Triton delay: the timeout rule at the grid value that is best *on the same held-out stream*
  (an advantage no SMDP policy gets).

Prints W (mean), p99, P, J, the predicted W and its error against the simulated W.

    python bench/arrivals_bench.py [--profile profiles/p4_resnet50.csv] [--max-batch 64] [--loads 0.3,0.6]

``--speed``: the MMPP solver's banded LU against the dense one instead (the same solves, in one run:
read the ratio; times on a shared machine are noisy).

``--tail-guard``: the trace bench's setup instead (V100 table 10x slower, B = 128, w = 1e-3, 150
req/s; the code and conversation traces and the synthetic batch MMPP): can a max-wait guard on the
gate bring its p99 down to the best Triton delay's and keep J at or below that delay's? The guard
is chosen without hindsight: the arrival model is fitted on the first half of the stream, and under
that fit (simulated) the predicted-best Triton delay d* and its p99 are computed; the guard is the
largest on a grid whose gate p99 under the fit is no worse (``choose_guard``). Then every contender
runs on the held-out second half of the stream (simulated).

``--slo-study [--trace conv|code]``: where the tail trade-off lies on the replayed trace (the trace bench's
setup, all of the trace's first 9,000 requests at 150 req/s, simulated on its own arrival times): Triton's
delays; the Poisson-solved table, the phase-blind table under the fit and the phase-aware tables with the
forward filter, each unguarded and with guards of 20..80 ms; which requests make the unguarded tables'
p99 (the phase the filter gives them, how long the next arrivals took); and the SLO search
(``solver.slo.solve_slo``) for a p99 bound D under Poisson and under the fitted MMPP, its pick replayed;
D from a list, and D derived from the model alone (the p99 of the delay with the least J on a path of the fit).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from solver import arrivals
from solver.arrival_model import MMPP2, ArrivalModel
from solver.compare import TIMEOUT_GRID_S
from solver.fit import fit_arrivals
from solver.mmpp import evaluate_mmpp, solve_mmpp
from solver.model import BatchingModel, ServiceProfile
from solver.phase_filter import PhaseFilter
from solver.policy import TimeoutRule, TritonBatcher
from solver.simulate import simulate, simulate_phased
from solver.smdp import solve

ROOT = Path(__file__).resolve().parents[1]
TRACES = {
    "code": ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_code_2023.csv",
    "conv": ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv_2023.csv",
}


def _row(name: str, sim, w: float, pred_w: float | None) -> str:
    j = sim.mean_latency_s + w * sim.mean_power_w
    pw = "-" if pred_w is None else f"{pred_w * 1e3:8.3f}"
    err = "-" if pred_w is None else f"{100 * (pred_w / sim.mean_latency_s - 1):+6.1f}%"
    return (f"  {name:<20} {sim.mean_latency_s * 1e3:8.3f} {sim.latency_ci95_s * 1e3:6.3f} {sim.p99_latency_s * 1e3:8.3f} "
            f"{sim.mean_power_w:7.2f} {j * 1e3:9.3f} | {pw:>8} {err:>7}")


def speed(prof: ServiceProfile, max_batch: int, idle_power_w: float) -> None:
    import time

    from solver.arrival_model import CompoundPoisson
    from solver.mmpp import build_phase_smdp, evaluate_actions

    cap = max_batch / float(prof.mean_s[-1])
    print(f"MMPP solver, dense vs banded LU (B = {max_batch}, capacity {cap:.0f}/s; best of 3 each)")
    print(f"  {'arrivals':<44} {'N':>5} {'eval dense s':>12} {'banded s':>9} {'ratio':>6} | "
          f"{'solve dense s':>13} {'banded s':>9} {'ratio':>6}  same policy, gain diff")
    for proc in (MMPP2((1.4 * cap, 0.1 * cap), (3.0, 2.0)),
                 MMPP2((1.4 * cap, 0.1 * cap), (3.0, 2.0), (CompoundPoisson(3.0), CompoundPoisson(1.5)))):
        m = BatchingModel(rate=proc.mean_rate, max_batch=max_batch, profile=prof, idle_power_w=idle_power_w,
                          weight=1e-4, arrivals=proc)
        res = {}
        for ls in ("dense", "banded"):
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                r = solve_mmpp(m, linear_solver=ls)
                best = min(best, time.perf_counter() - t0)
            res[ls] = (best, r)
        N = res["banded"][1].truncation
        smdp = build_phase_smdp(m, N)
        acts = np.vstack([t.extended(N + 1) for t in res["banded"][1].policy.tables])
        ev = {}
        for ls in ("dense", "banded"):
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                evaluate_actions(smdp, acts, ls)
                best = min(best, time.perf_counter() - t0)
            ev[ls] = best
        same = all(np.array_equal(a.actions, b.actions) for a, b in
                   zip(res["dense"][1].policy.tables, res["banded"][1].policy.tables))
        diff = abs(res["dense"][1].gain - res["banded"][1].gain) / res["dense"][1].gain
        print(f"  {proc.spec:<44} {N:5d} {ev['dense']:12.3f} {ev['banded']:9.3f} {ev['dense'] / ev['banded']:6.2f} | "
              f"{res['dense'][0]:13.3f} {res['banded'][0]:9.3f} {res['dense'][0] / res['banded'][0]:6.2f}  "
              f"{same}, {diff:.1e}")


GUARD_GRID_S = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
DELAYS_S = (0.0, 0.005, 0.01, 0.02, 0.04)
"""The Triton delays the trace bench compares against (20 ms is its default second one)."""


def choose_guard(prof: ServiceProfile, table, fitted, rate: float, max_batch: int, idle_power_w: float,
                 weight: float, requests: int = 60_000, seed: int = 3, delay_s: float | None = None):
    """(guard s or None, delay s, its p99 s) from the fitted model alone: simulate ``requests``
    arrivals of ``fitted`` (at ``rate``), take the Triton delay ``delay_s`` (the one the operator
    runs; None: the delay of ``DELAYS_S`` with the least J under the fit) and its p99, and return the
    largest guard of ``GUARD_GRID_S`` under which the table's p99 is no higher (None: the unguarded
    table already is; the smallest guard when none is)."""
    from solver.policy import MaxWaitGuard

    t = arrivals.from_model(fitted, rate, requests, rng=seed)
    run = lambda rule: simulate(prof, rule, t, idle_power_w=idle_power_w, weight=weight, seed=seed,  # noqa: E731
                                warmup=float(t[-1]) * 0.02)
    delays = {d: run(TimeoutRule(max_batch, d)) for d in (DELAYS_S if delay_s is None else (delay_s,))}
    best = min(delays, key=lambda d: delays[d].mean_latency_s + weight * delays[d].mean_power_w)
    target = delays[best].p99_latency_s
    if run(table).p99_latency_s <= target:
        return None, best, target
    for g in sorted(GUARD_GRID_S, reverse=True):
        if run(MaxWaitGuard(table, g)).p99_latency_s <= target:
            return g, best, target
    return min(GUARD_GRID_S), best, target


def tail_guard(seed: int, delay_s: float | None) -> None:
    from loadtest.stack import scaled_profile
    from solver.arrival_model import parse_arrivals
    from solver.mmpp import solve_mmpp_blind
    from solver.policy import MaxWaitGuard

    B, w, p0, rate = 128, 1e-3, 40.0, 150.0
    prof = scaled_profile(ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv").truncated(B), 10.0)
    streams = {"code": arrivals.trace(TRACES["code"], target_rate=rate, limit=12_000),
               "conv": arrivals.trace(TRACES["conv"], target_rate=rate, limit=9_000),
               "synthetic": arrivals.from_model(parse_arrivals("mmpp:210,30:0.5,1:3,1.2"), 0.0, 9_000, rng=seed)}
    print(f"Tail guard, trace bench setup: V100 table x10, B = {B}, w = {w:g}, {rate:g} req/s; fitted on the first "
          "half, simulated on the second")
    for name, t in streams.items():
        t = (t - t[0]) * ((t.size - 1) / (t[-1] - t[0]) / rate)
        half = t.size // 2
        first, test = t[:half], t[half:] - t[half]
        fit = fit_arrivals(first)
        shape = fit.chosen  # at the replay's mean rate (the adaptive gate measures the rate; the fit gives the shape)
        if isinstance(shape, MMPP2):
            shape = shape.with_rates(tuple(r * rate / shape.mean_rate for r in shape.rates))
        model = BatchingModel(rate, B, prof, p0, w)
        fixed = solve(model).policy
        tables = {"gate smdp (Poisson table)": fixed}
        if isinstance(shape, MMPP2):
            tables["gate smdp blind (fitted)"] = solve_mmpp_blind(model.with_(arrivals=shape), fixed).policy
        print(f"\n{name}: {t.size} requests, fitted on the first half: {fit.chosen.spec}")
        print(f"  {'contender':<44} {'W ms':>8} {'p99 ms':>8} {'J ms':>8}")
        sim = lambda rule: simulate(prof, rule, test, idle_power_w=p0, weight=w, seed=seed)  # noqa: E731
        rows = {f"triton {d * 1e3:g} ms": sim(TimeoutRule(B, d)) for d in DELAYS_S}
        best = min(rows, key=lambda k: rows[k].mean_latency_s + w * rows[k].mean_power_w)
        for label, table in tables.items():
            g, d_star, p99_star = choose_guard(prof, table, shape, rate, B, p0, w, seed=seed, delay_s=delay_s)
            rows[label] = sim(table)
            if g is not None:
                rows[f"{label} + guard {g * 1e3:g} ms"] = sim(MaxWaitGuard(table, g))
            which = "the best delay" if delay_s is None else "the operator's delay"
            print(f"  ({label}: under the fit {which} is {d_star * 1e3:g} ms with p99 {p99_star * 1e3:.1f} ms; "
                  f"guard {'none needed' if g is None else f'{g * 1e3:g} ms'})")
        for k, r in rows.items():
            j = r.mean_latency_s + w * r.mean_power_w
            mark = "  <- best delay on this half" if k == best else ""
            print(f"  {k:<44} {r.mean_latency_s * 1e3:8.2f} {r.p99_latency_s * 1e3:8.2f} {j * 1e3:8.2f}{mark}")


STUDY_GUARDS_S = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08)
STUDY_DELAYS_S = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04)
STUDY_SLO_S = (0.0574, 0.063, 0.070, 0.075)
"""p99 bounds for the SLO search: Triton 20 ms's and 30 ms's simulated p99 on the conversation trace, and
70 / 75 ms (Triton 20 ms's p99 measured on the stack was 71.7-75.2 ms)."""


SYNTHETIC_REQUESTS = 9_000


def synthetic_stream(spec: str, seed: int) -> np.ndarray:
    """A synthetic clumped stream: SYNTHETIC_REQUESTS arrival times drawn from an arrival spec with a seed."""
    from solver.arrival_model import parse_arrivals

    model = parse_arrivals(spec)
    if not isinstance(model, MMPP2):
        raise SystemExit(f"--synthetic needs an mmpp spec (it carries its own rates), got {spec!r}")
    return arrivals.from_model(model, 0.0, SYNTHETIC_REQUESTS, rng=seed)


def write_trace_csv(times: np.ndarray, path: Path) -> None:
    """Arrival times as a trace CSV with the Azure traces' TIMESTAMP column (what `smdp trace-bench --trace` reads)."""
    base = np.datetime64("2023-01-01T00:00:00", "ns")
    stamps = base + np.round(np.asarray(times, dtype=float) * 1e9).astype("timedelta64[ns]")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"{str(s).replace('T', ' ')},1,1\n" for s in stamps))


@dataclass(frozen=True)
class _StudyStream:
    """The study's and the frontier's common set-up: the V100 table x10 at B = 128, w = 1e-3, a 40 W idle
    power, the stream replayed at 150 req/s, the model at its measured rate and the fit's chosen model."""

    B: int
    w: float
    p0: float
    warm: float
    profile: ServiceProfile
    times: np.ndarray
    label: str
    model: BatchingModel
    fit: ArrivalModel

    @property
    def fitted(self) -> BatchingModel:
        """The model under the fit: an MMPP at its own mean rate, groups alone at the replay's."""
        fit = self.fit
        return self.model.with_(rate=fit.mean_rate, arrivals=fit) if isinstance(fit, MMPP2) else self.model.with_(arrivals=fit)


def _study_stream(trace: str, seed: int, synthetic: str | None) -> _StudyStream:
    from loadtest.stack import scaled_profile

    B, w, p0, rate, warm = 128, 1e-3, 40.0, 150.0, 1.5
    prof = scaled_profile(ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv").truncated(B), 10.0)
    if synthetic is None:
        t = arrivals.trace(TRACES[trace], target_rate=rate, limit=12_000 if trace == "code" else 9_000)
        label = trace
    else:
        t = synthetic_stream(synthetic, seed)
        t = (t - t[0]) * ((t.size - 1) / (t[-1] - t[0]) / rate)  # the trace bench's rescaling to --rate
        label = f"synthetic {synthetic} (seed {seed})"
    model = BatchingModel((t.size - 1) / float(t[-1]), B, prof, p0, w)
    return _StudyStream(B, w, p0, warm, prof, t, label, model, fit_arrivals(t).chosen)


def slo_study(trace: str, seed: int, synthetic: str | None = None,
              bounds_s: tuple[float, ...] = STUDY_SLO_S) -> None:
    import time

    from solver.mmpp import solve_mmpp_blind
    from solver.policy import MaxWaitGuard
    from solver.simulate import simulate_latencies
    from solver.slo import SloTarget, solve_slo

    st = _study_stream(trace, seed, synthetic)
    B, w, p0, warm, prof, t, trace, model, fit = st.B, st.w, st.p0, st.warm, st.profile, st.times, st.label, st.model, st.fit
    print(f"{trace} trace: {t.size} requests at {model.rate:.1f} req/s (rho {model.load:.2f}), V100 table x10, "
          f"B = {B}, w = {w:g}; fitted {fit.spec}; simulated on the replayed times (warm-up {warm:g} s)")
    fixed = solve(model).policy
    tables = {"Poisson table": fixed}
    fitted = st.fitted
    if isinstance(fit, MMPP2):
        tables["blind table (fit)"] = solve_mmpp_blind(fitted, fixed).policy
        phased = solve_mmpp(fitted).policy if fit.phases == 2 else None
    else:
        phased = None
    print(f"  {'contender':<40} {'W ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'J ms':>8}")

    def show(name: str, sim, lat) -> None:
        j = sim.mean_latency_s + w * sim.mean_power_w
        print(f"  {name:<40} {sim.mean_latency_s * 1e3:8.2f} {sim.p99_latency_s * 1e3:8.2f} "
              f"{float(np.quantile(lat, 0.999)) * 1e3:9.2f} {j * 1e3:8.2f}", flush=True)

    run = lambda rule: simulate_latencies(prof, rule, t, idle_power_w=p0, weight=w, seed=seed, warmup=warm)  # noqa: E731
    for d in STUDY_DELAYS_S:
        show(f"triton {d * 1e3:g} ms", *run(TimeoutRule(B, d)))
    for name, table in tables.items():
        for g in (None, *STUDY_GUARDS_S):
            show(name + ("" if g is None else f" + guard {g * 1e3:g} ms"), *run(table if g is None else MaxWaitGuard(table, g)))
    if phased is not None:
        res = simulate_phased(prof, phased, PhaseFilter(fit, t), t, idle_power_w=p0, weight=w, seed=seed, warmup=warm)
        print(f"  {'phase-aware tables, forward filter':<40} {res.mean_latency_s * 1e3:8.2f} "
              f"{res.p99_latency_s * 1e3:8.2f} {'-':>9} {(res.mean_latency_s + w * res.mean_power_w) * 1e3:8.2f}")
    # which requests make the unguarded Poisson table's p99
    sim, lat = simulate_latencies(prof, fixed, t, idle_power_w=p0, weight=w, seed=seed, warmup=0.0)
    tail = np.flatnonzero(lat > np.quantile(lat, 0.99))
    first = int(np.argmax(fixed.actions > 0))
    ahead = t[np.minimum(np.arange(t.size) + first - 1, t.size - 1)] - t
    print(f"  the Poisson table serves from n = {first}; its p99 tail ({tail.size} requests): the next {first - 1} "
          f"arrivals took median {np.median(ahead[tail]) * 1e3:.1f} ms after them (all requests: "
          f"{np.median(ahead) * 1e3:.1f} ms, p99 {np.quantile(ahead, 0.99) * 1e3:.1f} ms)")
    if isinstance(fit, MMPP2) and fit.phases == 2:
        filt = PhaseFilter(fit, t)
        ph = np.array([filt.phase(float(x), i + 1) for i, x in enumerate(t)])
        slow = int(np.argmin(fit.rates))
        print(f"  phase by the forward filter: slow phase ({fit.rates[slow]:.0f}/s) for {np.mean(ph[tail] == slow):.0%} "
              f"of the tail, {np.mean(ph == slow):.0%} of all requests")
    # a bound from the model alone: the p99 of the delay with the least J on a path of the fit, as Triton runs it
    path = arrivals.from_model(fit, fitted.rate, 200_000, rng=seed + 17)
    under = {d: simulate_latencies(prof, TritonBatcher(B, d), path, idle_power_w=p0, weight=w, seed=seed,
                                   warmup=float(path[2000]))[0] for d in STUDY_DELAYS_S}
    least = min(under, key=lambda d: under[d].mean_latency_s + w * under[d].mean_power_w)
    derived = round(under[least].p99_latency_s, 4)
    print(f"  under the fit (200,000 requests) the least-J delay is {least * 1e3:g} ms, p99 {derived * 1e3:.1f} ms: "
          "that p99 is the bound derived from the model")
    for D in (*bounds_s, derived):
        for label, arr_model in (("Poisson", model), ("fitted MMPP", fitted if isinstance(fit, MMPP2) else None)):
            if arr_model is None:
                continue
            t0 = time.perf_counter()
            r = solve_slo(arr_model, SloTarget(0.99, D), seed=seed)
            took = time.perf_counter() - t0
            c = r.chosen
            sim, lat = run(c.rule)
            which = "greedy" if not math.isfinite(c.table_weight) else f"w' {c.table_weight:g}"
            guard = "no guard" if c.max_wait_s is None else f"guard {c.max_wait_s * 1e3:.1f} ms"
            print(f"  SLO p99 <= {D * 1e3:g} ms under {label:<11}: {which}, {guard}, predicted p99 "
                  f"{c.estimate.quantile_s * 1e3:.2f} J {c.cost * 1e3:.2f}{'' if r.feasible else ' (infeasible)'}; "
                  f"replayed W {sim.mean_latency_s * 1e3:.2f} p99 {sim.p99_latency_s * 1e3:.2f} "
                  f"J {(sim.mean_latency_s + w * sim.mean_power_w) * 1e3:.2f} ({took:.2f} s)")
    # the bound the sidecar derives (slo.bound: best_delay): on the search's own path, the delay served
    # where the search cannot beat it
    from solver.slo_bound import DEFAULT_DELAYS_S, BestDelaySlo, solve_best_delay_slo

    for label, arr_model in (("Poisson", model), ("fitted MMPP", fitted if isinstance(fit, MMPP2) else None)):
        if arr_model is None:
            continue
        both = solve_best_delay_slo(arr_model, BestDelaySlo(0.99, DEFAULT_DELAYS_S), seed=seed)
        c = both.result.chosen
        sim, _ = run(c.rule)
        what = (f"the delay itself (search {'feasible' if both.search.feasible else 'infeasible'}, "
                f"J {both.search.chosen.cost * 1e3:.2f})" if both.delay_served else
                f"w' {c.table_weight:g}, {'no guard' if c.max_wait_s is None else f'guard {c.max_wait_s * 1e3:.1f} ms'}")
        print(f"  slo.bound best_delay under {label:<11}: {both.bound.describe()}; serves {what}, predicted p99 "
              f"{c.estimate.quantile_s * 1e3:.2f} J {c.cost * 1e3:.2f}; replayed W {sim.mean_latency_s * 1e3:.2f} "
              f"p99 {sim.p99_latency_s * 1e3:.2f} J {(sim.mean_latency_s + w * sim.mean_power_w) * 1e3:.2f}")


FRONTIER_POINTS = 9
"""Bounds on the J-p99 frontier: evenly spaced from the least-latency delay's p99 to the unguarded table's."""


@dataclass(frozen=True)
class FrontierPoint:
    """A rule judged on the frontier's path: its p99 (and 95% half-width) and J; ``rule`` to replay it."""

    name: str
    p99_s: float
    ci95_s: float
    cost: float
    rule: object
    bound_s: float | None = None
    """For a frontier point: the bound D searched for (None: a delay or the Poisson gate)."""
    feasible: bool = True


@dataclass(frozen=True)
class Frontier:
    delays: tuple[FrontierPoint, ...]
    """Triton's delays as Triton runs them (``TritonBatcher``)."""
    best_delay: FrontierPoint
    gate_delay: FrontierPoint
    """The best delay as the gate runs it (``TimeoutRule``'s decisions): what the derived bound falls back to."""
    poisson_gate: FrontierPoint
    points: tuple[FrontierPoint, ...]
    """The least-J SLO pick for each bound, in increasing D (infeasible: greedy, cost nan)."""
    at_best_delay: FrontierPoint
    """The frontier's point at D = the best delay's p99."""

    @property
    def goal_met(self) -> bool:
        """J at or below the Poisson gate's and the best delay's with p99 at or below the best delay's, by the
        frontier."""
        at = self.at_best_delay
        return at.feasible and at.cost <= min(self.poisson_gate.cost, self.best_delay.cost)


def j_p99_frontier(fitted: BatchingModel, table_model: BatchingModel, *, seed: int = 0,
                   bounds_s: tuple[float, ...] | None = None, points: int = FRONTIER_POINTS) -> Frontier:
    """Under ``fitted`` (the arrival model), on the SLO search's own path (``solver.slo.search_path``): the
    Triton delays of ``DEFAULT_DELAYS_S`` and the best (``solver.slo_bound.derive_bound``), the Poisson-solved
    table of ``table_model`` unguarded (what ``gate:smdp`` runs), and for each bound D (default: ``points``
    spread from the least delay p99 to the table's) the SLO search's least-J pick (``solve_slo``), with D =
    the best delay's p99 always among them."""
    from solver.slo import SloTarget, search_path, simulated_quantile, solve_slo
    from solver.slo_bound import DEFAULT_DELAYS_S, BestDelaySlo, derive_bound

    bound = derive_bound(fitted, BestDelaySlo(0.99, DEFAULT_DELAYS_S), seed=seed)
    B = fitted.max_batch
    delays = tuple(FrontierPoint(f"triton {p.delay_s * 1e3:g} ms", p.estimate.quantile_s, p.estimate.ci95_s, p.cost,
                                 TritonBatcher(B, p.delay_s, catch_share=bound.rule.catch_share)) for p in bound.delays)
    best = delays[bound.delays.index(bound.best)]
    g = bound.gate_delay
    gate_delay = FrontierPoint(f"gate running the triton {g.delay_s * 1e3:g} ms rule", g.estimate.quantile_s,
                               g.estimate.ci95_s, g.cost, TimeoutRule(B, g.delay_s))
    path, warm = search_path(fitted, 0.99, seed=seed)
    table = solve(table_model).policy
    est, sim = simulated_quantile(fitted, table, SloTarget(0.99, 1.0), path, seed=seed, warmup=warm)
    gate = FrontierPoint("gate smdp: Poisson-solved table, unguarded", est.quantile_s, est.ci95_s,
                         sim.mean_latency_s + fitted.weight * sim.mean_power_w, table)
    if bounds_s is None:
        lo = min(p.p99_s for p in delays)
        bounds_s = tuple(float(x) for x in np.linspace(lo, max(gate.p99_s, lo * 1.05), points))
    out = []
    for D in sorted({*bounds_s, best.p99_s}):
        r = solve_slo(fitted, SloTarget(0.99, D), seed=seed)
        c = r.chosen
        what = ("greedy, infeasible" if not r.feasible else
                f"w' {c.table_weight:g}" + ("" if c.max_wait_s is None else f" guard {c.max_wait_s * 1e3:.1f} ms"))
        out.append(FrontierPoint(what, c.estimate.quantile_s, c.estimate.ci95_s, c.cost if r.feasible else math.nan,
                                 c.rule, D, r.feasible))
    at = next(p for p in out if p.bound_s == best.p99_s)
    return Frontier(delays, best, gate_delay, gate, tuple(out), at)


def frontier(trace: str, seed: int, synthetic: str | None = None, bounds_s: tuple[float, ...] | None = None) -> None:
    """Print the J-p99 frontier under the fit (``j_p99_frontier``), every point also replayed on the trace's
    own times, and whether the issue's goal -- J at or below the Poisson gate's with p99 at or below the
    best delay's -- is on its feasible side."""
    from solver.simulate import simulate_latencies

    st = _study_stream(trace, seed, synthetic)
    B, w, p0, warm, prof, t, trace, model, fit = st.B, st.w, st.p0, st.warm, st.profile, st.times, st.label, st.model, st.fit
    fitted = st.fitted
    f = j_p99_frontier(fitted, model, seed=seed, bounds_s=bounds_s)
    print(f"{trace}: {t.size} requests at {model.rate:.1f} req/s, V100 table x10, B = {B}, w = {w:g}; fitted "
          f"{fit.spec}; every point judged on the SLO search's path of the fit (seed {seed}) and replayed on the "
          f"trace's times (warm-up {warm:g} s)")

    def row(name: str, p: FrontierPoint) -> None:
        sim, _ = simulate_latencies(prof, p.rule, t, idle_power_w=p0, weight=w, seed=seed, warmup=warm)
        print(f"  {name:<58} {p.p99_s * 1e3:8.2f} {p.ci95_s * 1e3:6.2f} {p.cost * 1e3:8.2f} | "
              f"{sim.p99_latency_s * 1e3:8.2f} {(sim.mean_latency_s + w * sim.mean_power_w) * 1e3:8.2f}", flush=True)

    print(f"  {'point (under the fit)':<58} {'p99 ms':>8} {'+-':>6} {'J ms':>8} | {'replayed':>8} {'J ms':>8}")
    for p in f.delays:
        row(p.name + ("  <- best delay (least J)" if p is f.best_delay else ""), p)
    row(f.gate_delay.name, f.gate_delay)
    row(f.poisson_gate.name, f.poisson_gate)
    print("  frontier: the least J the SLO search finds for p99 <= D under the fit")
    for p in f.points:
        row(f"D {p.bound_s * 1e3:7.2f} ms{' (best delay p99)' if p is f.at_best_delay else ''}: {p.name}", p)
    at, gate = f.at_best_delay, f.poisson_gate
    reach = [p for p in f.points if p.feasible and p.cost <= gate.cost]
    print(f"  at D = the best delay's p99 ({f.best_delay.p99_s * 1e3:.2f} ms) the least J is "
          + (f"{at.cost * 1e3:.2f} ms" if at.feasible else "none (no searched policy meets it)")
          + f" against the Poisson gate's {gate.cost * 1e3:.2f} ms and the best delay's {f.best_delay.cost * 1e3:.2f} ms; "
          "the goal as written (J <= the Poisson gate's, p99 <= the best delay's) is "
          + ("ON the frontier's feasible side" if f.goal_met else
             "OFF the frontier" + (f", by {(at.cost / gate.cost - 1) * 100:+.2f}% in J" if at.feasible else ""))
          + "; the frontier reaches the Poisson gate's J "
          + (f"from D = {reach[0].bound_s * 1e3:.2f} ms" if reach else "at no bound of the grid"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles" / "p4_resnet50.csv")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--idle-power", type=float, default=40.0)
    ap.add_argument("--loads", default="0.3,0.6")
    ap.add_argument("--weights", default="0,1e-4")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="time the MMPP solver's banded LU against the dense one")
    ap.add_argument("--tail-guard", action="store_true", help="the max-wait guard study in the trace bench's setup")
    ap.add_argument("--guard-delay-ms", type=float, default=None,
                    help="--tail-guard: the Triton delay whose p99 the guard must match (default: the best under the fit)")
    ap.add_argument("--slo-study", action="store_true", help="the tail trade-off and the SLO search on a replayed trace")
    ap.add_argument("--frontier", action="store_true",
                    help="the J-p99 frontier under the fit (--trace or --synthetic), with the Poisson gate's and the "
                         "best delay's points (--slo-bounds-ms: the bounds; default: spread between them)")
    ap.add_argument("--trace", choices=sorted(TRACES), default="conv", help="--slo-study: which trace")
    ap.add_argument("--synthetic", metavar="SPEC", default=None,
                    help=f"--slo-study: instead of a trace, {SYNTHETIC_REQUESTS} arrivals drawn from this mmpp spec "
                         "with --seed (rescaled to 150 req/s as the trace bench replays it)")
    ap.add_argument("--slo-bounds-ms", default=None,
                    help="--slo-study: comma-separated p99 bounds to search (default: the conversation trace's)")
    ap.add_argument("--write-trace", type=Path, default=None, metavar="CSV",
                    help="with --synthetic: write the drawn stream as a trace CSV (TIMESTAMP column) for smdp trace-bench")
    args = ap.parse_args()
    if args.write_trace is not None:
        if args.synthetic is None:
            raise SystemExit("--write-trace needs --synthetic SPEC")
        write_trace_csv(synthetic_stream(args.synthetic, args.seed), args.write_trace)
        print(f"wrote {SYNTHETIC_REQUESTS} arrivals of {args.synthetic} (seed {args.seed}) to {args.write_trace}")
        if not args.slo_study:
            return
    if args.frontier:
        bounds = None if args.slo_bounds_ms is None else tuple(float(x) / 1e3 for x in args.slo_bounds_ms.split(","))
        frontier(args.trace, args.seed, args.synthetic, bounds)
        return
    if args.slo_study:
        bounds = STUDY_SLO_S if args.slo_bounds_ms is None else tuple(float(x) / 1e3 for x in args.slo_bounds_ms.split(","))
        slo_study(args.trace, args.seed, args.synthetic, bounds)
        return
    if args.tail_guard:
        tail_guard(args.seed, None if args.guard_delay_ms is None else args.guard_delay_ms / 1e3)
        return
    prof = ServiceProfile.from_csv(args.profile, max_batch=args.max_batch)
    if args.speed:
        speed(prof, args.max_batch, args.idle_power)
        return
    cap = args.max_batch / float(prof.mean_s[-1])
    for name, path in TRACES.items():
        raw = arrivals.trace(path)
        for load in (float(x) for x in args.loads.split(",")):
            rate = load * cap
            t = raw * ((raw.size - 1) / raw[-1] / rate)  # rescaled to mean rate `rate`
            half = t.size // 2
            fit_part, test = t[:half], t[half:] - t[half]
            fit = fit_arrivals(fit_part)
            test_rate = (test.size - 1) / test[-1]
            print(f"\n{name} trace at load {load:g} ({rate:.0f} req/s; held-out half offers {test_rate:.0f} req/s), "
                  f"B = {args.max_batch}, {args.profile.name}: fitted {fit.chosen.spec}, groups G = "
                  f"{fit.compound.model.group_mean:.3f}")
            for w in (float(x) for x in args.weights.split(",")):
                base = BatchingModel(rate=rate, max_batch=args.max_batch, profile=prof,
                                     idle_power_w=args.idle_power, weight=w)
                print(f" w = {w:g} s/W        {'W ms':>8} {'+-':>6} {'p99 ms':>8} {'P W':>7} {'J ms':>9} | "
                      f"{'W pred':>8} {'error':>7}")
                sim = lambda rule: simulate(prof, rule, test, idle_power_w=args.idle_power, weight=w,  # noqa: E731
                                            seed=args.seed, warmup=0.0)
                sp = solve(base)
                sim_p = sim(sp.policy)
                print(_row(f"smdp poisson K={sp.policy.threshold()}", sim_p, w, sp.mean_latency_s))
                if isinstance(fit.chosen, MMPP2):  # the same table predicted under the fit (phase-blind)
                    ev = evaluate_mmpp(base.with_(rate=fit.chosen.mean_rate, arrivals=fit.chosen), sp.policy)
                    print(_row("  same, pred. by fit", sim_p, w, ev.mean_latency_s))
                cpm = base.with_(arrivals=fit.compound.model)
                sb = solve(cpm)
                print(_row(f"smdp batch K={sb.policy.threshold()}", sim(sb.policy), w, sb.mean_latency_s))
                for label, proc in (("mmpp", fit.mmpp), ("bmmpp", fit.batch_mmpp)):
                    if proc is None:
                        continue
                    mm = base.with_(rate=proc.model.mean_rate, arrivals=proc.model)
                    sm = solve_mmpp(mm)
                    res = simulate_phased(prof, sm.policy, PhaseFilter(proc.model, test), test,
                                          idle_power_w=args.idle_power, weight=w, seed=args.seed)
                    th = "/".join(str(x.threshold()) for x in sm.policy.tables)
                    print(_row(f"smdp {label} K={th}", res, w, sm.mean_latency_s))
                grid = {T: sim(TimeoutRule(args.max_batch, T)) for T in TIMEOUT_GRID_S}
                best = min(grid, key=lambda T: grid[T].mean_latency_s + w * grid[T].mean_power_w)
                print(_row(f"triton best {best * 1e3:g}ms", grid[best], w, None))
                if not math.isfinite(grid[best].mean_latency_s):
                    print("  (no finite timeout result)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
