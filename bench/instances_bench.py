"""The k-instance formulation's errors, measured (issue 13; RESULTS.md section 7).

1. Exact phase-type chain against the simulator for k = 2, 3 (small B, where the chain fits): exact
   laws (CV 1, CV 0.5 = Erlang-4) and deterministic service (8 Erlang phases, an approximation).
2. The threshold family's restriction at k = 1, where the exact SMDP is known: J of the threshold the
   search picks (evaluated exactly) against J* on the V100 profile.
3. The k-instance solver's prediction (its fresh simulation) against an independent simulation on
   other random numbers, k = 2 and 4 on the V100 profile at loads 0.3..0.9 of k B / tau(B).
4. Speed (--speed runs only this): ``solve_instances`` with the vectorised search (now) against the
   event-loop search it replaced (before), in the same run, k = 2 and 4, B = 64, V100 profile; the J of
   both choices on one independent simulation (common random numbers: their difference is precise).

5. SLO (--slo runs only this): the k-instance SLO search (``solver.instances_slo``) on the V100 profile,
   B = 64: the chosen limits and guard, their q99 on the search's lanes against an independent event
   simulation of the chosen rule, and the least-J unguarded limits' q99 and J (what the SLO costs).

    python bench/instances_bench.py [--requests N] [--speed] [--slo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from solver.evaluate import evaluate
import time

from solver.instances import Search, evaluate_instances, search_thresholds, simulate_table, solve_instances
from solver.model import BatchingModel, ServiceProfile
from solver.policy import instance_thresholds, threshold
from solver.smdp import solve

V100 = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"


def chain_vs_simulator(requests: int) -> None:
    print("1. exact chain vs simulator (B = 4, tau(b) = 2 + b ms, load 0.8 of k B/tau(B), w = 1e-4 s/W)")
    print(f"   {'CV':>4} {'k':>2} {'T_m':<9} {'W chain':>9} {'W sim':>9} {'+-':>7} {'dW %':>6} | "
          f"{'P chain':>8} {'P sim':>8} {'+-':>5} {'dP %':>6} | {'states':>6} law")
    for cv, k, th in [(1.0, 2, (1, 3)), (1.0, 3, (1, 2, 4)), (0.5, 2, (2, 4)), (0.5, 3, (2, 2, 4)), (0.0, 2, (1, 2))]:
        prof = ServiceProfile.affine(4, 0.001, 0.002, 0.05, 0.2, cv=cv)
        m = BatchingModel(rate=0.8 * k * 4 / float(prof.mean_s[-1]), max_batch=4, profile=prof, idle_power_w=10.0,
                          weight=1e-4, instances=k)
        t = instance_thresholds(4, th)
        e = evaluate_instances(m, t)
        s = simulate_table(m, t, requests, seed=11)
        print(f"   {cv:>4.1f} {k:>2} {'/'.join(map(str, th)):<9} {e.mean_latency_s * 1e3:>9.4f} "
              f"{s.mean_latency_s * 1e3:>9.4f} {s.latency_ci95_s * 1e3:>7.4f} "
              f"{100 * (e.mean_latency_s / s.mean_latency_s - 1):>+6.2f} | {e.mean_power_w:>8.2f} {s.mean_power_w:>8.2f} "
              f"{s.power_ci95_w:>5.2f} {100 * (e.mean_power_w / s.mean_power_w - 1):>+6.2f} | {e.states:>6} "
              f"{'exact' if e.exact_law else 'Erlang-8 approx.'}")


LOADS = (0.3, 0.6, 0.9)
WEIGHTS = (0.0, 1e-4)


def v100_cases(instances: tuple[int, ...]):
    """(k, load, w, model) for the V100 profile at B = 64: every k, load (of the k-instance capacity)
    and weight the sections below report."""
    prof = ServiceProfile.from_csv(V100, max_batch=64)
    for k in instances:
        base = BatchingModel(rate=1.0, max_batch=64, profile=prof, idle_power_w=40.0, instances=k)
        for load in LOADS:
            for w in WEIGHTS:
                yield k, load, w, base.with_(rate=load * base.capacity, weight=w)


def family_at_one_instance(requests: int) -> None:
    print("\n2. threshold family vs the exact SMDP at k = 1 (V100, B = 64, P0 = 40 W), exact J of each")
    print(f"   {'load':>4} {'w':>6} {'J* smdp ms':>11} {'best T':>6} {'J(best T)':>10} {'search T':>8} "
          f"{'J(search)':>10} {'search vs J* %':>14}")
    for _, load, w, m in v100_cases((1,)):
        star = solve(m).gain
        exact = {t: evaluate(m, threshold(64, t)).cost for t in range(1, 65)}
        best = min(exact, key=exact.get)
        (t,), _, _ = search_thresholds(m, requests=requests)
        print(f"   {load:>4.1f} {w:>6g} {star * 1e3:>11.4f} {best:>6} {exact[best] * 1e3:>10.4f} {t:>8} "
              f"{exact[t] * 1e3:>10.4f} {100 * (exact[t] / star - 1):>+14.3f}")


def prediction_vs_simulation(requests: int) -> None:
    print("\n3. k-instance solver: predicted (its fresh simulation) vs an independent simulation (V100, B = 64)")
    print(f"   {'k':>2} {'load':>4} {'w':>6} {'T_m':<14} {'W pred':>8} {'W sim':>8} {'dW %':>6} {'P pred':>7} "
          f"{'P sim':>7} {'dP %':>6} {'solve s':>7}")
    for k, load, w, m in v100_cases((2, 4)):
        r = solve_instances(m)
        s = simulate_table(m, r.policy, requests, seed=777)
        th = "/".join(map(str, r.policy.thresholds() or ()))
        print(f"   {k:>2} {load:>4.1f} {w:>6g} {th:<14} {r.mean_latency_s * 1e3:>8.3f} "
              f"{s.mean_latency_s * 1e3:>8.3f} {100 * (r.mean_latency_s / s.mean_latency_s - 1):>+6.2f} "
              f"{r.mean_power_w:>7.1f} {s.mean_power_w:>7.1f} {100 * (r.mean_power_w / s.mean_power_w - 1):>+6.2f} "
              f"{r.solve_time_s:>7.1f}")


def speed(requests: int) -> None:
    print("\n4. solve time, vectorised search (now) vs event-loop search (before), same run; V100, B = 64")
    print("   (wall seconds; cpu: this process's CPU seconds, less sensitive to a shared machine)")
    print(f"   {'k':>2} {'load':>4} {'w':>6} {'now s':>6} {'cpu':>5} {'before s':>8} {'cpu':>5} {'ratio':>6} {'cands now':>9} "
          f"{'before':>6} {'T_m now':<14} {'T_m before':<14} {'J now vs before %':>17}")
    for k, load, w, m in v100_cases((2, 4)):
        t0, c0 = time.perf_counter(), time.process_time()
        now = solve_instances(m)
        t1, c1 = time.perf_counter(), time.process_time()
        before = solve_instances(m, search=Search.EVENT_LOOP)
        t2, c2 = time.perf_counter(), time.process_time()
        j_now = simulate_table(m, now.policy, requests, seed=4242).cost
        j_bef = simulate_table(m, before.policy, requests, seed=4242).cost
        print(f"   {k:>2} {load:>4.1f} {w:>6g} {t1 - t0:>6.2f} {c1 - c0:>5.2f} {t2 - t1:>8.2f} {c2 - c1:>5.2f} "
              f"{(t2 - t1) / (t1 - t0):>6.1f} "
              f"{now.evaluations:>9} {before.evaluations:>6} {'/'.join(map(str, now.policy.thresholds() or ())):<14} "
              f"{'/'.join(map(str, before.policy.thresholds() or ())):<14} {100 * (j_now / j_bef - 1):>+17.3f}",
              flush=True)


def slo(requests: int) -> None:
    import numpy as np

    from solver.instances_slo import solve_slo_instances
    from solver.simulate import simulate_latencies
    from solver.slo import SloTarget

    prof = ServiceProfile.from_csv(V100, max_batch=64)
    print("\n5. k-instance SLO search (q = 0.99; V100, B = 64): chosen vs an independent event simulation")
    print(f"{'k':>2} {'load':>4} {'w':>6} {'D ms':>5} {'ok':>3} {'T_m':<12} {'guard ms':>8} {'q99 lanes':>9} {'+-':>5} "
          f"{'q99 sim':>7} {'J ms':>8} {'J sim':>8} | {'least-J T_m':<12} {'its q99':>7} {'its J':>8} {'cands':>5} {'s':>5}")
    for k, load, w, d in ((2, 0.5, 1e-3, 0.008), (2, 0.3, 1e-3, 0.006), (2, 0.7, 1e-3, 0.012), (2, 0.5, 1e-4, 0.0075),
                          (4, 0.5, 1e-3, 0.008), (4, 0.7, 1e-3, 0.012), (2, 0.5, 1e-3, 0.005)):
        model = BatchingModel(load * k * 64 / float(prof.mean_s[-1]), 64, prof, 40.0, w, instances=k)
        t0 = time.perf_counter()
        res = solve_slo_instances(model, SloTarget(0.99, d))
        dt = time.perf_counter() - t0
        c = res.chosen
        arr = np.cumsum(np.random.default_rng(17).exponential(1.0 / model.rate, requests))
        sim, lat = simulate_latencies(prof, c.rule, arr, idle_power_w=40.0, weight=w, seed=5, warmup=arr[requests // 50])
        least = min((x for x in res.candidates if x.max_wait_s is None), key=lambda x: x.cost)
        guard = "-" if c.max_wait_s is None else f"{c.max_wait_s * 1e3:.2f}"
        print(f"{k:>2} {load:>4} {w:>6g} {d * 1e3:>5g} {'yes' if res.feasible else 'NO':>3} "
              f"{'/'.join(map(str, c.thresholds)):<12} {guard:>8} {c.estimate.quantile_s * 1e3:>9.3f} "
              f"{c.estimate.ci95_s * 1e3:>5.3f} {np.quantile(lat, 0.99) * 1e3:>7.3f} {c.cost * 1e3:>8.3f} "
              f"{sim.cost * 1e3:>8.3f} | {'/'.join(map(str, least.thresholds)):<12} "
              f"{least.estimate.quantile_s * 1e3:>7.3f} {least.cost * 1e3:>8.3f} {len(res.candidates):>5} {dt:>5.2f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200_000, help="simulated requests per check (default: %(default)s)")
    ap.add_argument("--speed", action="store_true", help="only section 4 (solve time, now vs before)")
    ap.add_argument("--slo", action="store_true", help="only section 5 (the k-instance SLO search)")
    args = ap.parse_args()
    if args.speed:
        speed(2 * args.requests)
        return
    if args.slo:
        slo(2 * args.requests)
        return
    chain_vs_simulator(args.requests)
    family_at_one_instance(args.requests // 2)
    prediction_vs_simulation(args.requests)
    speed(2 * args.requests)
    slo(2 * args.requests)


if __name__ == "__main__":
    main()
