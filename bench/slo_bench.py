"""Tail-latency SLO: the SLO gate against Triton's batcher, by simulation on the V100 profile.

For each load (a fraction of capacity B / tau(B)) every contender runs on one evaluation sequence of
Poisson arrivals and one set of service-time streams (common random numbers), independent of the
sequences the SLO search and the Model-Analyzer-style sweep used to choose:

  triton d=0        Triton's dynamic batcher with max_queue_delay 0 (serve what waits, at once)
  triton MA         the delay a Model-Analyzer-style search picks: sweep the delays on a profiling run
                    at the same rate, take the least-power one whose p99 (the SLO quantile) meets D
  triton hindsight  the least-power delay whose attainment on the evaluation run itself is >= q
                    (the best fixed delay, chosen knowing the outcome: no real system can)
  smdp mean-opt     the SMDP table for the model's w, unguarded (least J, blind to the SLO)
  smdp SLO          ``solver.slo.solve_slo``: the least-J table and max-wait guard predicted to meet it

Columns: attainment (share of requests within D), the q-quantile, mean power, and the SLO gate's power
against Triton's hindsight delay and against delay 0. Power is modelled from the profile (e(b) per
batch, P0 = 40 W idle, an assumption). ``--timing`` instead times an SLO solve at B = 128 against a
plain solve in the same run (median of --repeats), optionally against the search as it was at a git
revision (``--before REV``), and reports the longest stall of a 1 ms asyncio ticker while the search
runs in a thread of the same process and in the sidecar's SLO worker process (``plugin/loop/slo_search.py``).

    python bench/slo_bench.py                       # B = 64, D = 20 ms, q = 0.99, loads 0.05..0.7
    python bench/slo_bench.py --timing --batch 128 --weight 1e-3 --cvs 0 1 --loads 0.05 0.3 0.6 --before REV
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from solver import arrivals
from solver.model import BatchingModel, ServiceProfile
from solver.policy import BatchRule, TimeoutRule
from solver.simulate import simulate_latencies
from solver.slo import SloTarget, solve_slo
from solver.smdp import solve

ROOT = Path(__file__).resolve().parent.parent


def _run(model: BatchingModel, rule: BatchRule, arr: np.ndarray, seed: int, d: float, q: float
         ) -> tuple[float, float, float]:
    """(attainment, q-quantile, mean power) of ``rule`` on ``arr``."""
    sim, lat = simulate_latencies(model.profile, rule, arr, idle_power_w=model.idle_power_w, weight=0.0,
                                  seed=seed, warmup=float(arr[len(arr) // 50]))
    return float(np.mean(lat <= d)), float(np.quantile(lat, q)), sim.mean_power_w


def _least_power_delay(model, delays, arr, seed, d, q, by_quantile: bool):
    """The least-power Triton delay meeting the SLO on ``arr`` (by its q-quantile, or by attainment)."""
    best = None
    for delay in delays:
        att, quant, power = _run(model, TimeoutRule(model.max_batch, delay), arr, seed, d, q)
        ok = quant <= d if by_quantile else att >= q
        if ok and (best is None or power < best[1]):
            best = (delay, power)
    return best[0] if best is not None else 0.0


def study(args: argparse.Namespace) -> None:
    prof = ServiceProfile.from_csv(args.profile, max_batch=args.batch)
    base = BatchingModel(rate=1.0, max_batch=args.batch, profile=prof, idle_power_w=args.idle_power,
                         weight=args.weight)
    d, q = args.latency, args.quantile
    delays = np.round(np.arange(0.0, d + 1e-12, args.delay_step), 9)
    print(f"V100 profile, B = {args.batch}, P0 = {args.idle_power} W, w = {args.weight} s/W, SLO q{q} <= "
          f"{d * 1e3:g} ms; {args.requests} evaluation requests per load (common random numbers), Triton delays "
          f"0..{d * 1e3:g} ms every {args.delay_step * 1e3:g} ms")
    head = (f"{'load':>5} {'rate/s':>7} | {'contender':<17} {'delay/guard ms':>14} {'attain':>7} {'q ms':>7} "
            f"{'P W':>7}")
    print(head)
    print("-" * len(head))
    summary = []
    for load in args.loads:
        model = base.with_(rate=load * base.capacity)
        evaluation = arrivals.poisson(model.rate, n=args.requests, rng=np.random.default_rng([args.seed, 1]))
        profiling = arrivals.poisson(model.rate, n=args.requests // 2, rng=np.random.default_rng([args.seed, 2]))
        seed = args.seed + 7
        t0 = time.perf_counter()
        slo = solve_slo(model, SloTarget(q, d), seed=args.seed + 3)
        slo_s = time.perf_counter() - t0
        ma = _least_power_delay(model, delays, profiling, seed + 1, d, q, by_quantile=True)
        hind = _least_power_delay(model, delays, evaluation, seed, d, q, by_quantile=False)
        rows = [
            ("triton d=0", "0", TimeoutRule(model.max_batch, 0.0)),
            ("triton MA", f"{ma * 1e3:.2f}", TimeoutRule(model.max_batch, ma)),
            ("triton hindsight", f"{hind * 1e3:.2f}", TimeoutRule(model.max_batch, hind)),
            ("smdp mean-opt", "-", solve(model).policy),
            ("smdp SLO", "-" if slo.max_wait_s is None else f"{slo.max_wait_s * 1e3:.2f}", slo.chosen.rule),
        ]
        out = {}
        for name, knob, rule in rows:
            att, quant, power = _run(model, rule, evaluation, seed, d, q)
            out[name] = (att, quant, power)
            print(f"{load:>5.2f} {model.rate:>7.0f} | {name:<17} {knob:>14} {att:>7.4f} {quant * 1e3:>7.2f} "
                  f"{power:>7.2f}")
        a_slo, _, p_slo = out["smdp SLO"]
        p_hind, p0 = out["triton hindsight"][2], out["triton d=0"][2]
        print(f"{'':>5} {'':>7} | SLO gate: {'feasible' if slo.feasible else 'INFEASIBLE'} (search {slo_s:.2f} s, "
              f"{len(slo.candidates)} candidates); power {100 * (p_slo / p_hind - 1):+.2f}% vs hindsight delay, "
              f"{100 * (p_slo / p0 - 1):+.2f}% vs delay 0")
        summary.append((load, a_slo, p_slo / p_hind - 1, p_slo / p0 - 1, out["triton MA"][0]))
    print()
    print("load  SLO-gate attainment  power vs hindsight  power vs delay 0  (MA delay's attainment)")
    for load, att, vs_h, vs_0, ma_att in summary:
        print(f"{load:>4.2f}  {att:>19.4f}  {100 * vs_h:>+17.2f}%  {100 * vs_0:>+15.2f}%  ({ma_att:.4f})")


def _module_at(rev: str):
    """``solver/slo.py`` as it was at git revision ``rev``, imported as a module of its own."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:solver/slo.py"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    path = Path(tempfile.mkdtemp()) / "slo_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("slo_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["slo_before"] = mod
    spec.loader.exec_module(mod)
    return mod


async def _longest_stall(work) -> float:
    """The longest gap between ticks of a 1 ms asyncio ticker while ``await work()`` runs: what the
    search costs the sidecar's event loop (the GIL it holds)."""
    import asyncio

    done = False
    longest = 0.0

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    try:
        await work()
    finally:
        done = True
        await tick
    return longest


def timing(args: argparse.Namespace) -> None:
    import asyncio

    from plugin.loop import slo_search

    before = _module_at(args.before) if args.before else None
    base_prof = ServiceProfile.from_csv(args.profile, max_batch=args.batch)
    target = SloTarget(args.quantile, args.latency)
    print(f"SLO solve vs plain solve, B = {args.batch}, w = {args.weight}, SLO q{args.quantile} <= "
          f"{args.latency * 1e3:g} ms; median of {args.repeats}"
          + (f"; 'before' = solver/slo.py at {args.before}, timed alternately in the same run" if before else "")
          + " (shared machine: compare within a row)")
    print(f"{'cv':>4} {'load':>5} {'plain ms':>9} {'SLO ms':>8} {'cands':>5} "
          + (f"{'before ms':>9} {'cands':>5} {'speed-up':>8} " if before else "")
          + f"{'stall thread ms':>15} {'stall process ms':>16} feasible")
    for cv in args.cvs:
        prof = ServiceProfile(base_prof.mean_s, base_prof.energy_j, np.full(args.batch, cv),
                              interpolated=base_prof.interpolated)
        base = BatchingModel(rate=1.0, max_batch=args.batch, profile=prof, idle_power_w=args.idle_power,
                             weight=args.weight)
        for load in args.loads:
            model = base.with_(rate=load * base.capacity)
            plain, slo_t, bef_t, res, bres = [], [], [], None, None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                solve(model)
                plain.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                res = solve_slo(model, target)
                slo_t.append(time.perf_counter() - t0)
                if before is not None:
                    t0 = time.perf_counter()
                    bres = before.solve_slo(model, before.SloTarget(args.quantile, args.latency))
                    bef_t.append(time.perf_counter() - t0)

            async def in_thread():
                await asyncio.get_running_loop().run_in_executor(None, solve_slo, model, target)

            async def in_process():
                await slo_search.search(model, target)

            stall_t = asyncio.run(_longest_stall(in_thread))
            asyncio.run(_longest_stall(in_process))  # the worker's start, not counted
            stall_p = asyncio.run(_longest_stall(in_process))
            p, s_ = statistics.median(plain), statistics.median(slo_t)
            row = f"{cv:>4g} {load:>5.2f} {p * 1e3:>9.1f} {s_ * 1e3:>8.1f} {len(res.candidates):>5} "
            if before is not None:
                b = statistics.median(bef_t)
                row += f"{b * 1e3:>9.1f} {len(bres.candidates):>5} {b / s_:>8.2f} "
            print(row + f"{stall_t * 1e3:>15.1f} {stall_p * 1e3:>16.1f} {res.feasible}", flush=True)
    slo_search.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles" / "v100_resnet50.csv")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--idle-power", type=float, default=40.0)
    ap.add_argument("--weight", type=float, default=0.1, help="w of J = W + w P (default: %(default)s, power-led)")
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--latency", type=float, default=0.020, help="D, seconds")
    ap.add_argument("--loads", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.7])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--delay-step", type=float, default=0.00025)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cvs", type=float, nargs="+", default=[0.0], help="--timing: service-time CVs")
    ap.add_argument("--before", default=None,
                    help="--timing: also time solver/slo.py as it was at this git revision, in the same run")
    args = ap.parse_args()
    (timing if args.timing else study)(args)


if __name__ == "__main__":
    main()
