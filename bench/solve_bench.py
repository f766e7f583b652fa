"""Solve time and memory: analytic fluid tail cost vs a plain truncation.

For each (B, load) the reference is policy iteration with the fluid tail at the automatic N (what
``solve`` does by default; it is checked against very large plain truncations in the tests). Then:

  PI  auto cold  : ``solve(model)``: PI from greedy, automatic N, final evaluation included
  PI  auto warm  : the same, warm-started from the policy solved at 0.95 x the rate
  RVI fluid Nmin : relative value iteration (Tijms' uniformisation) with the fluid tail, on the
                   smallest N whose gain is within --match of the reference and whose policy agrees
  RVI plain Nmin : the same with overflow lumped at N (tail="none", the paper's baseline), on its own
                   smallest such N
The smallest N are found with untimed PI solves (grow by 1.25, then bisect). An RVI row times the
solve only: building the truncated SMDP and iterating, cold. The exact evaluation of the policy it
found (one dense LU, which ``solve`` adds to report W and P) is timed apart, in the "eval ms"
column, and is not in the ratios: it would charge RVI with PI's kind of work. The ratios compare
the two RVI runs (the paper's comparison: same method, with and without the abstract cost) and PI
against plain RVI. A plain RVI that hit its sweep cap (--rvi-max-iter) or the largest N
(--plain-cap) without converging to the reference is flagged, and its ratios are printed as bounds
("<" : its time is only a lower bound) or not at all. Memory is the tracemalloc peak of the call
(numpy reports its buffers to tracemalloc): transition arrays, dense LU and all temporaries.

Profiles: V100 ResNet-50 from profiles/v100_resnet50.csv for B <= 128; for B = 256 Inoue's affine
V100 fit tau(b) = 0.1438 ms b + 1.8874 ms, e(b) = 0.04419 J b + 0.1550 J. Idle power 40 W is an
assumption (the source does not give it). Deterministic service unless --cv.

    python bench/solve_bench.py                      # B = 32, 64, 128, 256; loads 0.3, 0.6, 0.9
    python bench/solve_bench.py --batches 32 64 --loads 0.9 --cv 1

--linear-solvers: instead, time ``solve(model)`` (PI, automatic N, cold) with each LU of the policy
evaluation, in the same run: "before" (the previous dense path: a dense P, then I - P, then a copy
for LAPACK), "dense" (the current default: the system built in place, factored without a copy) and
"sparse" (the same entries in CSC, scipy.sparse.linalg.splu plus one refinement step), for every
--batches, --loads and --cvs. Ratios are against "before".

    python bench/solve_bench.py --linear-solvers --loads 0.6 0.9 --cvs 0 1

--against-before: ``solve(model)`` as it is now against the solver before the automatic N followed
the gain's own contraction ("before": ``growth=1.5, resume_warm_start=False,
linear_solver="dense"``, without the fluid-seeded start of each new size: ``solve_before``), in the same run, cold (PI from greedy) and warm (started from the same
solver's policy at 0.95 x the rate, as the adaptive loop's neighbour), for every --batches and
--cvs at --loads (default B = 64, 128, 256, CV 0 and 1, load 0.6). Time: best of --repeat; memory:
tracemalloc peak of one more call. Also: the N each chose, the gain difference and whether the
policies agree on their common states.

    python bench/solve_bench.py --against-before --batches 64 128 256 --cvs 0 1 --loads 0.6

With --against-full-improvement, "before" is instead the same solver with every policy-iteration step
improving over all actions (``policy_iteration(near=None)``), to measure the near-action steps alone.
With --against-policy-equality, "before" is the same solver whose automatic N counts the policy as
settled only when it is unchanged on the common states (``solve(policy_by_gain=False)``), to measure
the policy-settled-by-gain rule alone; "same pol" then also prints the stationary mass (of the
before's policy) on the states where the two differ.

--features: the other features' solves, now against before in the same run (the before solver is
swapped in where the feature calls ``solve``): "slo" (``solver.slo.solve_slo``, q0.99 <= 20 ms,
w = 0.1 s/W as in bench/slo_bench.py), "k=4" (``solver.instances.solve_instances`` with 4
instances; B <= 64 only: its search simulates, minutes at larger B), "groups" (``solve`` with
compound Poisson arrivals, geometric groups of mean 2) and "mmpp" (``solver.mmpp.solve_mmpp``, a
2-phase MMPP of rates 0.4 and 1.6 x the mean switching every 10 ms: its own PI on (n, phase), the
same code in both columns). One run each (the SLO and k-instance searches take seconds).

    python bench/solve_bench.py --features --batches 64 128 --cvs 0 1 --loads 0.6
    python bench/solve_bench.py --features --feature slo k=4 --batches 64 128 --cvs 0 1 --loads 0.6

--policy-drift: what the automatic N's two checks see at each size of the search (no timing). For
every --batches, --cvs and --loads: the sizes of a cold ``solve(model)``, then at each size the
fixed-N solve warm-started from the previous size's policy (as the search does), with the gain's
relative step, the states whose batch changed on the common states (count, first, largest
stationary probability among them, stationary mass from the first one up), the mass of the top
state and the first state above which at most 1e-10 of the stationary mass lies (embedded chain).

    python bench/solve_bench.py --policy-drift --batches 128 256 --cvs 1 --loads 0.6
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from solver import BatchingModel, ServiceProfile, solve  # noqa: E402
from solver.evaluate import summarize  # noqa: E402
from solver.quantities import DEFAULT_IDLE_POWER_W  # noqa: E402
import solver.pi  # noqa: E402
import solver.smdp  # noqa: E402
from scipy import linalg  # noqa: E402
from solver.pi import PolicyValues, evaluate_policy  # noqa: E402
from solver.rvi import relative_value_iteration  # noqa: E402
from solver.tail import build  # noqa: E402

IDLE_W = DEFAULT_IDLE_POWER_W
FEATURES = ("slo", "groups", "mmpp", "k=4")


def make_model(B: int, load: float, weight: float, cv: float) -> BatchingModel:
    if B <= 128:
        base = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv", max_batch=B)
        prof = ServiceProfile(base.mean_s, base.energy_j, np.full(B, cv), interpolated=base.interpolated)
    else:
        prof = ServiceProfile.affine(B, 0.1438e-3, 1.8874e-3, 0.04419, 0.1550, cv=cv)
    m = BatchingModel(rate=1.0, max_batch=B, profile=prof, idle_power_w=IDLE_W, weight=weight)
    return m.with_(rate=load * m.capacity)


def grid(args):
    """(cv, B, load, model) for every service CV, batch limit and load the command line asks for."""
    for cv in args.cvs:
        for B in args.batches:
            for load in args.loads:
                yield cv, B, load, make_model(B, load, args.weight, cv)


def measured(fn, repeat: int):
    """(result, best wall seconds, tracemalloc peak bytes): time without tracing, memory with it."""
    best = float("inf")
    out = None
    spent = 0.0
    runs = 0
    # best of ``repeat``, and of at least 3 when a run is short: the machine is shared, so single
    # short timings can be inflated several times by other processes
    while runs < repeat or (runs < 3 and spent < 2.0):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        runs += 1
    gc.collect()
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, best, peak


def smallest_truncation(model: BatchingModel, ref, tail: str, match: float, cap: int) -> int:
    """Smallest N >= B whose PI gain is within ``match`` of ref.gain with the same policy below N."""

    def good(N: int) -> bool:
        r = solve(model, truncation=N, tail=tail, warm_start=ref.policy)
        return abs(r.gain - ref.gain) <= match * ref.gain and same_policy(r, ref)

    lo, hi = model.max_batch - 1, model.max_batch
    while not good(hi):
        if hi >= cap:
            return cap
        lo, hi = hi, min(cap, int(hi * 1.25) + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if good(mid) else (mid, hi)
    return hi


class RVIRun:
    """What one timed RVI solve found (the fields the report reads, as on a SolveResult)."""

    def __init__(self, smdp, out):
        self.smdp = smdp
        self.truncation = smdp.truncation
        self.iterations = out.iterations
        self.converged = out.converged
        self.gain = out.gain
        self.actions = out.actions
        self.policy = SimpleNamespace(actions=out.actions)


def rvi_solve(m: BatchingModel, N: int, tail: str, tol: float, max_iter: int) -> RVIRun:
    """The RVI solve alone: build the truncated SMDP and iterate from V = 0, no final evaluation."""
    smdp = build(m, N, tail)
    return RVIRun(smdp, relative_value_iteration(smdp, None, tol=tol, max_iter=max_iter))


def rvi_evaluation(run: RVIRun):
    """The exact evaluation ``solve`` adds after RVI (dense LU on the same truncation), timed apart."""
    return summarize(run.smdp, run.actions, evaluate_policy(run.smdp, run.actions))


def same_policy(a, b) -> bool:
    n = min(a.policy.actions.size, b.policy.actions.size)
    return bool(np.array_equal(a.policy.actions[:n], b.policy.actions[:n]))


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:9.1f}"


def evaluate_policy_before(smdp, actions, linear_solver=None):
    """The dense evaluation as it was before the in-place build (kept here to measure against)."""
    P, c, tau = smdp.policy_arrays(actions)
    A = -P
    A[np.diag_indices_from(A)] += 1.0
    A[:, 0] = tau
    lu = linalg.lu_factor(A, check_finite=False)
    x = linalg.lu_solve(lu, c, check_finite=False)
    h = x.copy()
    h[0] = 0.0
    e0 = np.zeros(smdp.n_states)
    e0[0] = 1.0
    y = np.clip(linalg.lu_solve(lu, e0, trans=1, check_finite=False), 0.0, None)
    return PolicyValues(float(x[0]), h, y / y.sum())


def solve_with(m: BatchingModel, variant: str):
    if variant != "before":
        return solve(m, linear_solver=variant)
    saved = solver.pi.evaluate_policy, solver.smdp.evaluate_policy
    solver.pi.evaluate_policy = solver.smdp.evaluate_policy = evaluate_policy_before
    try:
        return solve(m, linear_solver="dense")  # the dense path is the one that calls evaluate_policy
    finally:
        solver.pi.evaluate_policy, solver.smdp.evaluate_policy = saved


def compare_linear_solvers(args) -> int:
    variants = ("before", "dense", "sparse")
    print(f"solve(model): PI, automatic N, cold; w = {args.weight:g} s/W, idle {IDLE_W} W; best of "
          f"{args.repeat} (time), tracemalloc peak (memory); ratios against 'before'")
    header = (f"{'cv':>3} {'B':>4} {'load':>5} {'N':>5} {'its':>4} "
              + " ".join(f"{v + ' ms':>10} {v + ' MB':>10}" for v in variants)
              + f" {'dense/bef t':>11} {'dense/bef m':>11} {'sparse/bef t':>12} {'sparse/bef m':>12} {'max rel dg':>10} {'same pol':>8}")
    print(header)
    print("-" * len(header))
    for cv, B, load, m in grid(args):
        runs = {v: measured(lambda v=v: solve_with(m, v), args.repeat) for v in variants}
        ref = runs["before"][0]
        dg = max(abs(r.gain - ref.gain) / ref.gain for r, _, _ in runs.values())
        same = all(r.truncation == ref.truncation and np.array_equal(r.policy.actions, ref.policy.actions)
                   for r, _, _ in runs.values())
        t = {v: runs[v][1] for v in variants}
        mem = {v: runs[v][2] for v in variants}
        print(f"{cv:>3g} {B:>4} {load:>5.2f} {ref.truncation:>5} {ref.iterations:>4} "
              + " ".join(f"{fmt_ms(t[v]):>10} {mem[v] / 2**20:>10.1f}" for v in variants)
              + f" {t['dense'] / t['before']:>11.2f} {mem['dense'] / mem['before']:>11.2f}"
              f" {t['sparse'] / t['before']:>12.2f} {mem['sparse'] / mem['before']:>12.2f} {dg:>10.1e} {str(same):>8}")
        sys.stdout.flush()
    return 0


def solve_before(m: BatchingModel, method: str = "pi", **kwargs):
    """The solver as it was: 1.5x growth from the initial size, dense LU (so no low-rank updates),
    each new size started from the previous policy and the beyond-N rule (no fluid-seeded start)
    (arguments as ``solve``'s). The lighter build and the shared arrivals pmf are in both."""
    saved = solver.smdp._seeded_start
    solver.smdp._seeded_start = lambda smdp, start, below, h, gain: start
    try:
        return solve(m, method, growth=1.5, resume_warm_start=False, linear_solver="dense", **kwargs)
    finally:
        solver.smdp._seeded_start = saved


def solve_full_improvement(m: BatchingModel, **kwargs):
    """``solve`` with every policy-iteration step improving over all actions (``near=None``): the solver
    before PI improved near the current batch sizes first."""
    saved = solver.smdp.policy_iteration
    solver.smdp.policy_iteration = functools.partial(saved, near=None)
    try:
        return solve(m, **kwargs)
    finally:
        solver.smdp.policy_iteration = saved


def solve_policy_equality(m: BatchingModel, **kwargs):
    """``solve`` whose automatic N counts the policy as settled only when unchanged on the common states."""
    return solve(m, policy_by_gain=False, **kwargs)


def differing_mass(m: BatchingModel, now, ref) -> float:
    """Stationary mass, under ``ref``'s policy on its own truncation, of the states where the two policies differ."""
    n = min(now.truncation, ref.truncation) + 1
    states = np.nonzero(now.policy.actions[:n] != ref.policy.actions[:n])[0]
    if states.size == 0:
        return 0.0
    smdp = build(m, ref.truncation, ref.tail)
    return float(evaluate_policy(smdp, ref.policy.actions[: ref.truncation + 1]).pi[states].sum())


def against_before(args) -> int:
    if args.against_policy_equality:
        before = solve_policy_equality
    else:
        before = solve_full_improvement if args.against_full_improvement else solve_before
    contenders = (("now", lambda m, warm=None: solve(m, warm_start=warm)),
                  ("before", lambda m, warm=None: before(m, warm_start=warm)))
    print(f"solve(model), PI: now vs before; w = {args.weight:g} s/W, idle {IDLE_W} W; best of {args.repeat} "
          f"(time), tracemalloc peak (memory); warm = started from the same solver's policy at 0.95 x rate")
    header = (f"{'cv':>3} {'B':>4} {'load':>5} {'start':<5} {'N now':>6} {'N before':>8} {'now ms':>9} {'before ms':>9} "
              f"{'now MB':>7} {'before MB':>9} {'t ratio':>7} {'rel dg':>8} {'same pol':>8}"
              + (f" {'diff mass':>9}" if args.against_policy_equality else ""))
    print(header)
    print("-" * len(header))
    for cv, B, load, m in grid(args):
        near = {name: fn(m.with_(rate=0.95 * m.rate)) for name, fn in contenders}
        for start in ("cold", "warm"):
            runs = {}
            for name, fn in contenders:
                warm = near[name].policy if start == "warm" else None
                runs[name] = measured(lambda fn=fn, warm=warm: fn(m, warm), args.repeat)
            (now, t_now, mem_now), (bef, t_bef, mem_bef) = runs["now"], runs["before"]
            print(f"{cv:>3g} {B:>4} {load:>5.2f} {start:<5} {now.truncation:>6} {bef.truncation:>8} "
                  f"{fmt_ms(t_now)} {fmt_ms(t_bef)} {mem_now / 2**20:>7.1f} {mem_bef / 2**20:>9.1f} "
                  f"{t_now / t_bef:>7.3f} {(now.gain - bef.gain) / bef.gain:>8.1e} {str(same_policy(now, bef)):>8}"
                  + (f" {differing_mass(m, now, bef):>9.1e}" if args.against_policy_equality else ""))
            sys.stdout.flush()
    return 0


def feature_rows(args) -> int:
    import solver.instances
    import solver.slo
    from solver.arrival_model import MMPP2, CompoundPoisson
    from solver.instances import solve_instances
    from solver.mmpp import solve_mmpp
    from solver.slo import SloTarget, solve_slo

    def with_before(module, fn):
        saved = module.solve
        module.solve = solve_before
        try:
            return fn()
        finally:
            module.solve = saved

    target = SloTarget(0.99, 0.020)
    print("feature solves, now vs before (module doc); one run each, tracemalloc peak of a second run")
    header = (f"{'feature':<8} {'cv':>3} {'B':>4} {'load':>5} {'now ms':>9} {'before ms':>9} {'now MB':>7} "
              f"{'before MB':>9} {'t ratio':>7}  result")
    print(header)
    print("-" * len(header))
    for cv, B, load, m in grid(args):
        cases = [
            ("slo", lambda m=m: solve_slo(m.with_(weight=0.1), target),
             lambda m=m: with_before(solver.slo, lambda: solve_slo(m.with_(weight=0.1), target)),
             lambda r: f"feasible {r.feasible}, {len(r.candidates)} candidates"),
            ("groups", lambda m=m: solve(m.with_(arrivals=CompoundPoisson(2.0))),
             lambda m=m: solve_before(m.with_(arrivals=CompoundPoisson(2.0))),
             lambda r: f"N {r.truncation}, gain {r.gain:.9g}"),
            ("mmpp", lambda m=m: solve_mmpp(m.with_(arrivals=MMPP2((0.4 * m.rate, 1.6 * m.rate), (100.0, 100.0)))),
             None, lambda r: f"N {r.truncation}, gain {r.gain:.9g}"),
        ]
        if B <= 64:
            k4 = m.with_(instances=4)
            k4 = k4.with_(rate=load * k4.capacity)
            cases.append(("k=4", lambda k4=k4: solve_instances(k4),
                          lambda k4=k4: with_before(solver.instances, lambda: solve_instances(k4)),
                          lambda r: f"gain {r.gain:.6g} +- {r.gain_ci95:.2g}"))
        for name, now_fn, before_fn, describe in cases:
            if name not in args.feature:
                continue
            try:
                now, t_now, mem_now = measured(now_fn, 1)
            except Exception as exc:  # a feature that refuses this model: say so, go on
                print(f"{name:<8} {cv:>3g} {B:>4} {load:>5.2f} refused: {exc}")
                continue
            if before_fn is None:
                t_bef, mem_bef = t_now, mem_now
            else:
                _, t_bef, mem_bef = measured(before_fn, 1)
            print(f"{name:<8} {cv:>3g} {B:>4} {load:>5.2f} {fmt_ms(t_now)} {fmt_ms(t_bef)} "
                  f"{mem_now / 2**20:>7.1f} {mem_bef / 2**20:>9.1f} {t_now / t_bef:>7.3f}  {describe(now)}"
                  + ("" if before_fn is not None else " (own solver: same code)"))
            sys.stdout.flush()
    return 0


def policy_drift(args) -> int:
    print("per size of the automatic search: gain step, batch changes on the common states and where "
          "the stationary mass (embedded chain) lies")
    header = (f"{'cv':>3} {'B':>4} {'load':>5} {'N':>5} {'rel dg':>8} {'changed':>7} {'first':>6} {'max pi':>8} "
              f"{'mass >=':>8} {'pi(N)':>8} {'m(1e-10)':>8}")
    print(header)
    print("-" * len(header))
    for cv, B, load, m in grid(args):
        prev = None
        for N in solve(m).sizes_tried:
            res = solve(m, truncation=N, warm_start=None if prev is None else prev.policy)
            a = res.policy.actions
            pi = evaluate_policy(build(m, N, "fluid"), a).pi
            above = np.cumsum(pi[::-1])[::-1]  # mass on n..N
            settled_m = int(np.argmax(above <= 1e-10)) if above[-1] <= 1e-10 else N + 1
            row = f"{cv:>3g} {B:>4} {load:>5.2f} {N:>5}"
            if prev is None:
                print(f"{row} {'':>8} {'':>7} {'':>6} {'':>8} {'':>8} {pi[-1]:>8.1e} {settled_m:>8}")
            else:
                p = prev.policy.actions
                d = np.nonzero(a[: p.size] != p)[0]
                dg = abs(res.gain - prev.gain) / res.gain
                first = f"{d[0]:>6} {pi[d].max():>8.1e} {above[d[0]]:>8.1e}" if d.size else f"{'-':>6} {'-':>8} {'-':>8}"
                print(f"{row} {dg:>8.1e} {d.size:>7} {first} {pi[-1]:>8.1e} {settled_m:>8}")
            sys.stdout.flush()
            prev = res
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    ap.add_argument("--weight", type=float, default=1e-4, help="w, seconds per watt")
    ap.add_argument("--cv", type=float, default=0.0, help="service-time CV (0: deterministic)")
    ap.add_argument("--rvi-tol", type=float, default=1e-7, help="RVI span tolerance (relative)")
    ap.add_argument("--rvi-max-iter", type=int, default=200_000)
    ap.add_argument("--match", type=float, default=1e-8, help="Nmin: gain within this of the reference gain")
    ap.add_argument("--plain-cap", type=int, default=3000, help="largest truncation tried")
    ap.add_argument("--repeat", type=int, default=5, help="timing repeats for the fast solves (best of)")
    ap.add_argument("--no-rvi", action="store_true", help="skip both RVI runs (PI only)")
    ap.add_argument("--linear-solvers", action="store_true",
                    help="compare the LU of policy evaluation: before / dense / sparse (module doc)")
    ap.add_argument("--cvs", type=float, nargs="+", default=[0.0, 1.0],
                    help="service CVs for --linear-solvers and --against-before")
    ap.add_argument("--against-before", action="store_true",
                    help="solve() now against the solver before (module doc), same run")
    ap.add_argument("--against-full-improvement", action="store_true",
                    help="with --against-before: 'before' is today's solver with every PI step improving over all "
                         "actions (no near-action steps)")
    ap.add_argument("--against-policy-equality", action="store_true",
                    help="with --against-before: 'before' is today's solver counting the policy as settled only when "
                         "unchanged on the common states (solve(policy_by_gain=False))")
    ap.add_argument("--features", action="store_true",
                    help="the SLO, k-instance and bursty-arrival solves, now against before (module doc)")
    ap.add_argument("--feature", nargs="+", choices=FEATURES, default=list(FEATURES),
                    help="with --features: only these feature solves")
    ap.add_argument("--policy-drift", action="store_true",
                    help="per size of the automatic search: gain step, policy changes, stationary mass (module doc)")
    ap.add_argument("--keep-freed-memory-mb", type=int, default=0,
                    help="keep this much freed memory in the bench process, as smdp solver-serve does by default "
                         "(solver.memory; 0: glibc's defaults). Process-wide: compare two runs, one with and one without")
    args = ap.parse_args(argv)
    if args.keep_freed_memory_mb:
        from solver.memory import keep_freed_memory

        print(f"freed memory kept: {args.keep_freed_memory_mb} MiB "
              f"({'applied' if keep_freed_memory(args.keep_freed_memory_mb * 2**20) else 'not applied: not glibc'})")
    if args.policy_drift:
        return policy_drift(args)
    if args.features:
        return feature_rows(args)
    if args.against_before:
        return against_before(args)
    if args.linear_solvers:
        return compare_linear_solvers(args)

    print(f"idle power {IDLE_W} W (assumed); w = {args.weight:g} s/W; service CV {args.cv:g}; "
          f"RVI tol {args.rvi_tol:g}; Nmin: gain within {args.match:g} of the reference, same policy")
    header = (f"{'B':>4} {'load':>5} {'method':<15} {'N':>5} {'iters':>7} {'conv':>5} {'time ms':>9} "
              f"{'peak MB':>8} {'eval ms':>8} {'gain':>14} {'rel diff':>9} {'same pol':>8}")
    print(header)
    print("-" * len(header))
    summary = []
    for B in args.batches:
        for load in args.loads:
            m = make_model(B, load, args.weight, args.cv)
            near = solve(m.with_(rate=0.95 * m.rate))
            cold, t_cold, mem_cold = measured(lambda: solve(m), args.repeat)
            warm, t_warm, mem_warm = measured(lambda: solve(m, warm_start=near.policy), args.repeat)
            rows = [("PI  auto cold", cold, t_cold, mem_cold, None), ("PI  auto warm", warm, t_warm, mem_warm, None)]
            n_fluid = smallest_truncation(m, cold, "fluid", args.match, args.plain_cap)
            n_plain = smallest_truncation(m, cold, "none", args.match, args.plain_cap)
            t_rvi = t_plain = mem_rvi = mem_plain = float("nan")
            plain_ok = True
            if not args.no_rvi:
                rvi, t_rvi, mem_rvi = measured(
                    lambda: rvi_solve(m, n_fluid, "fluid", args.rvi_tol, args.rvi_max_iter), 1)
                _, t_rvi_eval, _ = measured(lambda: rvi_evaluation(rvi), 1)
                # Lumping overflow at N silently drops requests, which makes "serve tiny batches near N"
                # a closed class whose gain can sit just above the optimum: RVI then crawls (PI, started
                # from greedy, does not notice). Grow N until plain RVI converges to the reference.
                budget = min(max(20_000, 10 * rvi.iterations), args.rvi_max_iter)
                while True:
                    plain, t_plain, mem_plain = measured(
                        lambda: rvi_solve(m, n_plain, "none", args.rvi_tol, budget), 1)
                    plain_ok = plain.converged and abs(plain.gain - cold.gain) <= 1e-6 * cold.gain and same_policy(plain, cold)
                    if plain_ok or n_plain >= args.plain_cap:
                        break
                    print(f"{B:>4} {load:>5.2f} RVI plain at N = {n_plain} fails ({plain.iterations} sweeps, "
                          f"converged {plain.converged}, gain {plain.gain:.9g}, {t_plain:.1f} s): growing N")
                    n_plain = min(args.plain_cap, int(n_plain * 1.25) + 1)
                _, t_plain_eval, _ = measured(lambda: rvi_evaluation(plain), 1)
                rows += [("RVI fluid Nmin", rvi, t_rvi, mem_rvi, t_rvi_eval),
                         ("RVI plain Nmin" if plain_ok else "RVI plain FAIL", plain, t_plain, mem_plain, t_plain_eval)]
            for name, r, t, mem, t_eval in rows:
                rel = (r.gain - cold.gain) / cold.gain
                ev = "-" if t_eval is None else fmt_ms(t_eval).strip()
                print(f"{B:>4} {load:>5.2f} {name:<15} {r.truncation:>5} {r.iterations:>7} {str(r.converged):>5} "
                      f"{fmt_ms(t)} {mem / 2**20:>8.2f} {ev:>8} {r.gain:>14.9g} {rel:>9.1e} {str(same_policy(r, cold)):>8}")
            if not plain_ok:
                print(f"{B:>4} {load:>5.2f} WARNING: plain RVI did not converge to the reference (sweep cap {budget}, "
                      f"N cap {args.plain_cap}): its time is a lower bound and the ratios below are bounds")
            summary.append((B, load, n_fluid, n_plain, t_cold, t_warm, t_rvi, t_plain, mem_cold, mem_rvi, mem_plain,
                            plain_ok))
            sys.stdout.flush()
    print()
    print("Ratios against plain RVI on its smallest adequate truncation (saving = 1 - ratio); RVI times are the")
    print("solve only (exact evaluation apart). '<' marks an upper bound: plain RVI hit its cap unconverged.")
    print(f"{'B':>4} {'load':>5} {'Nmin fluid':>10} {'Nmin plain':>10} {'RVI fluid/plain time':>21} "
          f"{'RVI fluid/plain mem':>20} {'PI warm/plain time':>19} {'PI cold/plain time':>19} {'PI cold/plain mem':>18}")
    for B, load, nf, npl, t_cold, t_warm, t_rvi, t_plain, mem_cold, mem_rvi, mem_plain, ok in summary:
        mark = "" if ok else "<"
        mem_mark = "" if ok else "?"  # memory does not grow with sweeps, but N may be too small
        print(f"{B:>4} {load:>5.2f} {nf:>10} {npl:>10} {mark + format(t_rvi / t_plain, '.4f'):>21} "
              f"{mem_mark + format(mem_rvi / mem_plain, '.3f'):>20} {mark + format(t_warm / t_plain, '.5f'):>19} "
              f"{mark + format(t_cold / t_plain, '.5f'):>19} {mem_mark + format(mem_cold / mem_plain, '.3f'):>18}")
    if not all(row[-1] for row in summary):
        print("some plain RVI runs did not converge: raise --rvi-max-iter / --plain-cap for exact ratios")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
