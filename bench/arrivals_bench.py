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
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from solver import arrivals
from solver.arrival_model import MMPP2
from solver.compare import TIMEOUT_GRID_S
from solver.fit import fit_arrivals
from solver.mmpp import evaluate_mmpp, solve_mmpp
from solver.model import BatchingModel, ServiceProfile
from solver.phase_filter import PhaseFilter
from solver.policy import TimeoutRule
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles" / "p4_resnet50.csv")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--idle-power", type=float, default=40.0)
    ap.add_argument("--loads", default="0.3,0.6")
    ap.add_argument("--weights", default="0,1e-4")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="time the MMPP solver's banded LU against the dense one")
    args = ap.parse_args()
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
