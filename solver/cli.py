"""Sub-commands ``smdp solve``, ``smdp simulate`` and ``smdp compare``.

Other tools (the sidecar, load tests, scripts) drive the solver through ``--json`` output, so the
JSON keys are a contract: see each command's help. Invalid input of any kind (a ModelError, a bad
policy spec, an unreadable file) ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

from solver.quantities import DEFAULT_IDLE_POWER_W, DEFAULT_WEIGHT

DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"
DEFAULT_MAX_BATCH = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    solve = subparsers.add_parser(
        "solve",
        help="solve the SMDP for the optimal batching policy",
        description="Solve the batching SMDP (minimise J = W + w P) and print the policy table a(n) with "
                    "its predicted mean latency W, mean power P and cost J.",
    )
    _model_args(solve, rate_required=False)
    solve.add_argument("--arrivals", default="poisson", help=ARRIVALS_HELP)
    solve.add_argument("--method", choices=("pi", "rvi"), default="pi",
                       help="policy iteration (default) or relative value iteration")
    solve.add_argument("--truncation", type=int, default=None, help="largest queue length N (default: automatic)")
    solve.add_argument("--seed", type=int, default=0,
                       help="with --instances K > 1: seed of the simulations the threshold search compares on")
    solve.add_argument("--json", action="store_true",
                       help="print one JSON object: policy (a(n), n = 0..N), gain, mean_latency_s, mean_power_w, "
                            "throughput_rps, mean_batch, iterations, converged, solve_time_s, truncation, arrivals "
                            "(the arrival model), ...; under an mmpp also phase_policies (one table per phase; "
                            "policy is phase 1's)")
    _slo_args(solve)
    solve.set_defaults(func=_cmd_solve)

    sim = subparsers.add_parser(
        "simulate",
        help="simulate a batching policy on Poisson or trace arrivals",
        description="Discrete-event simulation of one server under a batching policy. Policies: smdp (solved "
                    "at --rate), greedy, static:B0, threshold:K, timeout:SECONDS (Triton's rule).",
    )
    _model_args(sim, rate_required=False)
    sim.add_argument("--policy", default="smdp", help="smdp | greedy | static:B0 | threshold:K | timeout:SECONDS")
    sim.add_argument("--arrivals", default="poisson",
                     help="poisson | batch:MEAN_GROUP | mmpp:RATE1,RATE2:SWITCH12,SWITCH21 (generated at mean "
                          "rate --rate; an mmpp carries its own) or trace:FILE (a CSV with a TIMESTAMP column); a "
                          "trace is rescaled to mean rate --rate unless --time-scale or --trace-rate is given")
    sim.add_argument("--model-arrivals", default=None,
                     help="the arrival model the smdp policy is solved for and the prediction uses (same forms "
                          "as --arrivals, or fit: fitted to the simulated stream); default: --arrivals, "
                          "poisson for a trace")
    sim.add_argument("--time-scale", type=float, default=None, help="trace time compression (2 = twice as fast)")
    sim.add_argument("--trace-rate", type=float, default=None, help="rescale the trace to this mean rate (req/s)")
    sim.add_argument("--requests", type=int, default=100_000, help="number of requests (trace: at most this many)")
    sim.add_argument("--seed", type=int, default=0, help="seed of arrivals and service times")
    sim.add_argument("--warmup", type=float, default=0.0, help="seconds of simulated time to discard")
    sim.add_argument("--json", action="store_true",
                     help="print one JSON object with mean_latency_s, p50/p95/p99_latency_s, latency_ci95_s, "
                          "mean_power_w, cost, throughput_rps, mean_batch, batch_hist, ... and predicted figures")
    sim.set_defaults(func=_cmd_simulate)

    cmp_ = subparsers.add_parser(
        "compare",
        help="SMDP against greedy, static and Triton-timeout batching over a load/weight sweep",
        description="For each load and weight: solve the SMDP and compare it with greedy, the best static "
                    "batch (by exact evaluation) and Triton's timeout rule at fixed timeouts and at the best "
                    "timeout (by simulation), predicted and simulated on one shared arrival sequence. "
                    "Writes compare.txt/.csv/.json/.png to --out.",
    )
    cmp_.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="profile CSV (default: %(default)s)")
    cmp_.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="B (default: %(default)s)")
    cmp_.add_argument("--idle-power", type=float, default=DEFAULT_IDLE_POWER_W,
                      help="idle power P0 in watts (default: %(default)s, an assumption)")
    cmp_.add_argument("--loads", default="0.1,0.3,0.5,0.7,0.9", help="loads as fractions of capacity (default: %(default)s)")
    cmp_.add_argument("--weights", default="0,1e-5,1e-4,1e-3", help="weights w in s/W (default: %(default)s)")
    cmp_.add_argument("--requests", type=int, default=100_000, help="simulated requests per load (default: %(default)s)")
    cmp_.add_argument("--timeouts", default="0.0005,0.001,0.002,0.005",
                      help="fixed Triton timeouts in seconds (default: %(default)s)")
    cmp_.add_argument("--method", choices=("pi", "rvi"), default="pi")
    cmp_.add_argument("--arrivals", default="poisson",
                      help="poisson | batch:MEAN_GROUP | mmpp:RATE1,RATE2:SWITCH12,SWITCH21 (its rates scaled to "
                           "each load); not poisson: adds the Poisson-solved SMDP as a contender")
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("--out", type=Path, default=Path("out/compare"), help="output folder (default: %(default)s)")
    cmp_.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    _instances_arg(cmp_)
    cmp_.set_defaults(func=_cmd_compare)

    fit = subparsers.add_parser(
        "fit-arrivals",
        help="fit an arrival model (poisson, batch:G, mmpp) to a trace and say how well it fits",
        description="Fit compound Poisson (groups: arrivals within --group-window of the previous one) and a "
                    "two-phase MMPP (Baum-Welch on binned counts) to a trace's arrival times; pick the model "
                    "whose index of dispersion over several windows is closest to the trace's; print the "
                    "parameters with 95%% CIs, interarrival CVs and the dispersion table (model vs trace).",
    )
    fit.add_argument("trace", type=Path, help="CSV with a timestamp column")
    fit.add_argument("--column", default="TIMESTAMP", help="timestamp column (default: %(default)s)")
    fit.add_argument("--group-window", type=float, default=None,
                     help="seconds: an arrival this close to the previous joins its group (default: 1%% of the "
                          "mean interarrival time)")
    fit.add_argument("--bin", type=float, default=None,
                     help="seconds per bin of the MMPP fit (default: 2 mean gaps, halved while switching is fast)")
    fit.add_argument("--max-phases", type=int, default=4,
                     help="try MMPPs with 2..this many phases (at most 6; default: %(default)s)")
    fit.add_argument("--json", action="store_true", help="print the fit as one JSON object")
    fit.set_defaults(func=_cmd_fit_arrivals)

    from solver.service_cli import add_solver_serve_command

    add_solver_serve_command(subparsers)


ARRIVALS_HELP = ("arrival model: poisson (default) | batch:MEAN_GROUP (compound Poisson, geometric groups of that "
                 "mean at one instant) | mmpp:RATE1,RATE2:SWITCH12,SWITCH21 (two-phase MMPP; its mean rate is "
                 "the model's rate, so --rate may be left out)")


def _slo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo-quantile", type=float, default=None,
                   help="with --slo-latency: pick the least-J policy (table a(n) for some w' <= w, optionally "
                        "with a max-wait guard) whose predicted Q-quantile of response time is <= D; --json then "
                        "adds max_wait_s (null: no guard), predicted_quantile_s and slo_feasible (false: no "
                        "policy meets D, the answer is greedy); with --instances K > 1 the family is the "
                        "k-instance control limits T_m, optionally guarded (solver/instances_slo.py)")
    p.add_argument("--slo-latency", type=float, default=None, help="the SLO's latency bound D, seconds")
    p.add_argument("--slo-bound", choices=("stated", "best_delay"), default="stated",
                   help="with --slo-quantile: best_delay derives D instead of --slo-latency: the predicted quantile of "
                        "the least-J Triton delay of --slo-delays under the model's arrivals, served itself where no "
                        "searched policy meets it at a lower J (solver/slo_bound.py); --json then adds best_delay_s, "
                        "best_delay_quantile_s, the delays judged and delay_served (default: %(default)s)")
    p.add_argument("--slo-delays", default=None,
                   help="with --slo-bound best_delay: comma-separated Triton delays, seconds (default: "
                        "0,0.005,0.01,0.02,0.03,0.04,0.05)")
    p.add_argument("--slo-catch-share", type=float, default=None,
                   help="with --slo-bound best_delay: the share of its instance's completions at which Triton's "
                        "batcher catches it free, in [0, 1] (default: the config's slo.best_delay_catch_share, "
                        "0.6: the fit to the measured runs)")
    p.add_argument("--slo-direct-extra", type=float, default=None,
                   help="with --slo-bound best_delay: seconds a delay's answers would carry beyond the model served "
                        "by Triton directly; D = the delay's quantile + this, searched for D - margin (default: "
                        "--slo-margin)")
    p.add_argument("--slo-margin", type=float, default=0.0,
                   help="seconds of D reserved for latency the model does not see (client, network): the policy "
                        "is searched for D - margin (default: %(default)s)")


def _slo_target(args: argparse.Namespace):
    """The SLO asked for on the command line, or None; both flags or neither."""
    from solver.model import ModelError
    from solver.slo import SloTarget

    q, d = args.slo_quantile, args.slo_latency
    if args.slo_bound == "best_delay":
        from solver.slo_bound import DEFAULT_DELAYS_S, BestDelaySlo

        if q is None or d is not None:
            raise ModelError("--slo-bound best_delay needs --slo-quantile and derives D: leave out --slo-latency")
        try:
            delays = DEFAULT_DELAYS_S if args.slo_delays is None else tuple(float(x) for x in args.slo_delays.split(","))
        except ValueError:
            raise ModelError(f"--slo-delays must be comma-separated seconds, got {args.slo_delays!r}") from None
        from solver.policy import TRITON_CATCH_SHARE

        share = TRITON_CATCH_SHARE if args.slo_catch_share is None else args.slo_catch_share
        return BestDelaySlo(q, delays, args.slo_margin, catch_share=share, direct_extra_s=args.slo_direct_extra)
    for flag, given in (("--slo-delays", args.slo_delays), ("--slo-catch-share", args.slo_catch_share),
                        ("--slo-direct-extra", args.slo_direct_extra)):
        if given is not None:
            raise ModelError(f"{flag} goes with --slo-bound best_delay")
    if q is None and d is None:
        return None
    if q is None or d is None:
        raise ModelError("--slo-quantile and --slo-latency go together: give both or neither")
    return SloTarget(q, d, args.slo_margin)


def _cmd_solve_slo(args: argparse.Namespace, model, target) -> int:
    from solver.slo import solve_slo
    from solver.slo_bound import BestDelaySlo, solve_best_delay_slo

    derived = solve_best_delay_slo(model, target) if isinstance(target, BestDelaySlo) else None
    res = derived.result if derived is not None else solve_slo(model, target)
    out = derived.to_dict() if derived is not None else res.to_dict()
    target = res.target
    out.update({"profile": str(args.profile), "samples": None if args.samples is None else str(args.samples),
                "service_law": model.profile.law})
    if args.json:
        print(_dump(out))
        return 0
    c = res.chosen
    print(f"SLO policy for lambda = {model.rate:g} req/s (load {model.load:.3f}), w = {model.weight:g} s/W, "
          f"B = {model.max_batch}: q = {target.quantile:g} of response time <= {target.latency_s * 1e3:g} ms"
          + (f" (searched for {target.budget_s * 1e3:g} ms: {target.margin_s * 1e3:g} ms margin)" if target.margin_s else ""))
    if derived is not None:
        print(f"  D derived from the model: {derived.bound.describe()}")
        for p in derived.bound.delays:
            print(f"    Triton delay {p.delay_s * 1e3:5g} ms: W {p.mean_latency_s * 1e3:.3f} ms, "
                  f"q{target.quantile:g} {p.estimate.quantile_s * 1e3:.3f} ms, J {p.cost * 1e3:.4f} ms")
        g = derived.bound.gate_delay
        print(f"    (as Triton runs it, its batcher catching {derived.bound.rule.catch_share:g} of its instance's "
              f"completions; the gate running the {g.delay_s * 1e3:g} ms rule: W {g.mean_latency_s * 1e3:.3f} ms, "
              f"q{target.quantile:g} {g.estimate.quantile_s * 1e3:.3f} ms, J {g.cost * 1e3:.4f} ms)")
    if derived is not None and derived.delay_served:
        print(f"  the search's pick ({'feasible' if derived.search.feasible else 'infeasible'}, J "
              f"{derived.search.chosen.cost * 1e3:.4f} ms) does not beat the delay: serving the Triton delay "
              f"{derived.bound.best.delay_s * 1e3:g} ms rule itself ("
              + ("greedy)" if derived.bound.best.delay_s == 0 else "the full-batch table with that max-wait guard)"))
    elif res.feasible:
        guard = "no guard" if c.max_wait_s is None else f"max-wait guard {c.max_wait_s * 1e3:.3f} ms"
        print(f"  table solved for w' = {c.table_weight:g} s/W, {guard}")
    else:
        print("  INFEASIBLE: no policy in the family meets the SLO at this rate; serving greedy (min(n, B) at once)")
    print(f"  predicted q-quantile {c.estimate.quantile_s * 1e3:.3f} ms (+- {c.estimate.ci95_s * 1e3:.3f}, "
          f"{c.estimate.method}), attainment {c.estimate.attainment:.4f}")
    print(f"  predicted W = {c.mean_latency_s * 1e3:.3f} ms, P = {c.mean_power_w:.2f} W, J = {c.cost * 1e3:.4f} ms; "
          f"{len(res.candidates)} candidates on {res.requests} simulated requests in {res.solve_time_s:.2f} s")
    for line in _ranges([int(a) for a in c.policy.actions], model.max_batch):
        print(f"    {line}")
    return 0


def _cmd_solve_slo_instances(args: argparse.Namespace, model, target) -> int:
    """k > 1 instances with an SLO: the threshold family with a guard (``solver.instances_slo``)."""
    from solver.instances_slo import solve_slo_instances

    res = solve_slo_instances(model, target)
    out = res.to_dict()
    out.update(_model_fields(args, model))
    if args.json:
        print(_dump(out))
        return 0
    c = res.chosen
    print(f"SLO policy for {model.instances} instances, lambda = {model.rate:g} req/s (load {model.load:.3f}), "
          f"w = {model.weight:g} s/W, B = {model.max_batch}: q = {target.quantile:g} of response time <= "
          f"{target.latency_s * 1e3:g} ms")
    if res.feasible:
        guard = "no guard" if c.max_wait_s is None else f"max-wait guard {c.max_wait_s * 1e3:.3f} ms"
        print(f"  control limits T_m = {'/'.join(str(t) for t in c.thresholds)}, {guard}")
    else:
        print("  INFEASIBLE: no policy in the family meets the SLO at this rate; serving greedy (min(n, B) at once)")
    print(f"  predicted q-quantile {c.estimate.quantile_s * 1e3:.3f} ms (+- {c.estimate.ci95_s * 1e3:.3f}, lanes), "
          f"attainment {c.estimate.attainment:.4f}")
    print(f"  predicted W = {c.mean_latency_s * 1e3:.3f} ms, P = {c.mean_power_w:.2f} W, J = {c.cost * 1e3:.4f} ms; "
          f"{len(res.candidates)} candidates on {res.requests} simulated requests in {res.solve_time_s:.2f} s")
    return 0


def _model_args(p: argparse.ArgumentParser, rate_required: bool) -> None:
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE,
                   help="profile CSV batch_size,mean_service_s,batch_energy_j|busy_power_w[,service_cv] "
                        "(default: %(default)s)")
    p.add_argument("--samples", type=Path, default=None,
                   help="CSV batch_size,service_s of measured service times (one row per batch run): they "
                        "replace the profile's times as an empirical law; busy power stays the profile's")
    p.add_argument("--rate", type=float, required=rate_required, help="arrival rate lambda, requests per second")
    p.add_argument("--weight", type=float, default=DEFAULT_WEIGHT, help="w, seconds per watt (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="B (default: %(default)s)")
    p.add_argument("--idle-power", type=float, default=DEFAULT_IDLE_POWER_W,
                   help="idle power P0 in watts (default: %(default)s, an assumption)")
    _instances_arg(p)


def _instances_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=int, default=1,
                   help="k model instances fed by one queue (instance_group count x GPUs); capacity is k B/tau(B) "
                        "and the policy is a table a(n, m) for m busy instances (default: %(default)s)")
    p.add_argument("--devices", type=int, default=None,
                   help="D accelerators the k instances run on, each drawing --idle-power once (1..k; default: "
                        "one per instance); e.g. --instances 2 --devices 1 for count 2 on one GPU")


def _errors_exit_2(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input is the user's to fix: one clear line and exit 2, no traceback."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, OSError) as exc:  # ModelError and ArrivalError are ValueErrors
            print(f"smdp {args.command}: error: {exc}", file=sys.stderr)
            return 2

    return wrapper


def _model(args: argparse.Namespace, arrivals_spec: str = "poisson"):
    from solver.arrival_model import MMPP2, parse_arrivals
    from solver.model import BatchingModel, ModelError, ServiceProfile

    if args.max_batch < 1:
        raise ModelError(f"--max-batch must be >= 1, got {args.max_batch}")
    arrivals = parse_arrivals(arrivals_spec)
    rate = args.rate
    if isinstance(arrivals, MMPP2):
        if rate is not None and abs(rate - arrivals.mean_rate) > 1e-9 * arrivals.mean_rate:
            raise ModelError(f"--rate {rate:g} differs from the mean rate of {arrivals.spec}, "
                             f"{arrivals.mean_rate:.9g}/s: leave --rate out or give that")
        rate = arrivals.mean_rate
    elif rate is None:
        raise ModelError("--rate is required (except with --arrivals mmpp:..., which fixes the rate)")
    if arrivals.spec != "poisson" and args.instances > 1:
        raise ModelError(f"--arrivals {arrivals.spec} with --instances > 1 is not supported: the k-instance "
                         "solver assumes Poisson arrivals")
    profile = ServiceProfile.from_csv(args.profile, max_batch=args.max_batch, samples=args.samples)
    return BatchingModel(rate=rate, max_batch=args.max_batch, profile=profile,
                         idle_power_w=args.idle_power, weight=args.weight, instances=args.instances,
                         arrivals=arrivals, devices=args.devices)


def _floats(text: str, what: str) -> list[float]:
    from solver.model import ModelError

    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ModelError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ModelError(f"{what} is empty")
    return vals


def _dump(obj: Any) -> str:
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if hasattr(o, "tolist"):  # numpy scalars and arrays
            return clean(o.tolist())
        return o

    return json.dumps(clean(obj))


def _ranges(actions: list[int], max_batch: int) -> list[str]:
    """The table as runs: 'n = 0..4: wait', 'n = 5..20: serve all waiting', 'n = 21..90: serve 20..50'.

    Runs of partial batches (0 < a(n) < min(n, B)) are shown by their range of a(n); the exact
    table is in ``--json``.
    """

    def kind(n: int, a: int) -> str:
        if a == 0:
            return "wait"
        return "all" if a == min(n, max_batch) else "part"

    out: list[str] = []
    start = 0
    for n in range(1, len(actions) + 1):
        if n == len(actions) or kind(n, actions[n]) != kind(start, actions[start]):
            k = kind(start, actions[start])
            span = f"n = {start}" if n - 1 == start else f"n = {start}..{n - 1}"
            if k == "wait":
                what = "wait"
            elif k == "all":
                what = "serve all waiting, min(n, B)"
            else:
                lo, hi = min(actions[start:n]), max(actions[start:n])
                what = f"serve {lo}" if lo == hi else f"serve part of the queue, a(n) from {lo} to {hi}"
            out.append(f"{span}: {what}")
            start = n
    out.append(f"n > {len(actions) - 1}: serve min(n, B) = {max_batch} (beyond the table)")
    return out


def _profile_fields(args: argparse.Namespace, model) -> dict:
    """``--json``: the profile a solve read and what the solver made of it."""
    return {
        "profile": str(args.profile),
        "samples": None if args.samples is None else str(args.samples),
        "service_law": model.profile.law,
        "interpolated_batch_sizes": list(model.profile.interpolated),
    }


def _model_fields(args: argparse.Namespace, model) -> dict:
    """``--json``: the model a one-instance solve was made for (rate, weight, B, P0, capacity, load,
    profile, instances, arrival model), the same for every solver behind ``smdp solve``."""
    return {
        "rate": model.rate,
        "weight": model.weight,
        "max_batch": model.max_batch,
        "idle_power_w": model.idle_power_w,
        "capacity_rps": model.capacity,
        "load": model.load,
        **_profile_fields(args, model),
        "instances": model.instances,
        "devices": model.idle_devices,
        "arrivals": model.arrivals.to_dict(),
    }


@_errors_exit_2
def _cmd_solve(args: argparse.Namespace) -> int:
    from solver.arrival_model import MMPP2

    model = _model(args, args.arrivals)
    target = _slo_target(args)
    if target is not None:
        if model.instances > 1:
            if args.slo_bound == "best_delay":
                from solver.model import ModelError

                raise ModelError("--slo-bound best_delay derives D for one instance: give --slo-latency with --instances")
            return _cmd_solve_slo_instances(args, model, target)
        return _cmd_solve_slo(args, model, target)
    if model.instances > 1:
        return _solve_instances(args, model)
    if isinstance(model.arrivals, MMPP2):
        return _solve_mmpp(args, model)
    from solver.smdp import solve

    result = solve(model, method=args.method, truncation=args.truncation)
    actions = [int(a) for a in result.policy.actions]
    out = {
        "policy": actions,
        "threshold": result.policy.threshold(),
        "gain": result.gain,
        "cost": result.gain,
        "mean_latency_s": result.mean_latency_s,
        "mean_power_w": result.mean_power_w,
        "throughput_rps": result.throughput_rps,
        "mean_batch": result.mean_batch,
        "iterations": result.iterations,
        "converged": result.converged,
        "solve_time_s": result.solve_time_s,
        "truncation": result.truncation,
        "method": result.method,
        **_model_fields(args, model),
    }
    if args.json:
        print(_dump(out))
        return 0
    k = out["threshold"]
    print(f"SMDP policy for lambda = {model.rate:g} req/s (load {model.load:.3f} of capacity {model.capacity:.1f} req/s), "
          f"w = {model.weight:g} s/W, B = {model.max_batch}, P0 = {model.idle_power_w:g} W, arrivals {model.arrivals.spec}")
    print(f"  solved by {result.method} in {result.solve_time_s * 1e3:.1f} ms, {result.iterations} iterations, "
          f"{'converged' if result.converged else 'NOT CONVERGED'}, truncation N = {result.truncation}")
    if k is not None:
        print(f"  control-limit policy: wait while n < {k}, then serve min(n, B)")
    else:
        print("  not of control-limit type; the table:")
    for line in _ranges(actions, model.max_batch):
        print(f"    {line}")
    print(f"  predicted W = {result.mean_latency_s * 1e3:.3f} ms, P = {result.mean_power_w:.2f} W, "
          f"J = W + w P = {result.gain * 1e3:.4f} ms, throughput {result.throughput_rps:.1f} req/s, "
          f"mean batch {result.mean_batch:.2f}")
    interp = model.profile.interpolated
    if interp:
        print(f"  interpolated batch sizes (not in the profile): {_compress_ints(list(interp))}")
    return 0


def _solve_instances(args: argparse.Namespace, model) -> int:
    """``smdp solve --instances K`` (K > 1): policy[m][n], m = 0..K-1 busy instances."""
    from solver.instances import solve_instances

    res = solve_instances(model, seed=args.seed)
    out = res.to_dict()
    out.update({
        "cost": res.gain,
        **_profile_fields(args, model),
    })
    if args.json:
        print(_dump(out))
        return 0
    print(f"k-instance policy for lambda = {model.rate:g} req/s, {model.instances} instances (load {model.load:.3f} of "
          f"capacity {model.capacity:.1f} req/s), w = {model.weight:g} s/W, B = {model.max_batch}, "
          f"P0 = {model.idle_power_w:g} W per instance")
    print(f"  threshold search over a(n, m) in {res.solve_time_s:.1f} s, {res.evaluations} simulated candidates")
    for m in range(model.instances):
        row = res.policy.actions[m].tolist()
        print(f"  m = {m} busy: " + "; ".join(_ranges(row, model.max_batch)))
    print(f"  predicted (fresh simulation) W = {res.mean_latency_s * 1e3:.3f} ms, P = {res.mean_power_w:.2f} W, "
          f"J = W + w P = {res.gain * 1e3:.4f} ms (+-{res.gain_ci95 * 1e3:.4f}), mean batch {res.mean_batch:.2f}")
    return 0


def _solve_mmpp(args: argparse.Namespace, model) -> int:
    from solver.model import ModelError
    from solver.mmpp import solve_mmpp

    if args.method != "pi":
        raise ModelError("an mmpp model is solved by policy iteration only (--method pi)")
    res = solve_mmpp(model, truncation=args.truncation)
    tables = [[int(a) for a in t.actions] for t in res.policy.tables]
    ev = res.evaluation
    out = {
        "policy": tables[0],
        "phase_policies": tables,
        "phase_thresholds": [t.threshold() for t in res.policy.tables],
        "phase_observed": "forward filter on arrival times (solver.phase_filter); exact figures assume the true phase",
        "threshold": None,
        "gain": res.gain,
        "cost": res.gain,
        "mean_latency_s": ev.mean_latency_s,
        "mean_power_w": ev.mean_power_w,
        "throughput_rps": ev.throughput_rps,
        "mean_batch": ev.mean_batch,
        "iterations": res.iterations,
        "converged": res.converged,
        "solve_time_s": res.solve_time_s,
        "truncation": res.truncation,
        "method": "pi",
        **_model_fields(args, model),
    }
    if args.json:
        print(_dump(out))
        return 0
    print(f"SMDP policy per phase for {model.arrivals.spec} (mean {model.rate:g} req/s, load {model.load:.3f}), "
          f"w = {model.weight:g} s/W, B = {model.max_batch}, P0 = {model.idle_power_w:g} W")
    print(f"  solved by pi in {res.solve_time_s * 1e3:.1f} ms, {res.iterations} iterations, "
          f"{'converged' if res.converged else 'NOT CONVERGED'}, truncation N = {res.truncation} per phase")
    for i, (tb, acts) in enumerate(zip(res.policy.tables, tables), start=1):
        k = tb.threshold()
        head = f"wait while n < {k}, then serve min(n, B)" if k is not None else "not of control-limit type:"
        print(f"  phase {i} (rate {model.arrivals.rates[i - 1]:g} req/s): {head}")
        if k is None:
            for line in _ranges(acts, model.max_batch):
                print(f"    {line}")
    print(f"  predicted (phase observed) W = {ev.mean_latency_s * 1e3:.3f} ms, P = {ev.mean_power_w:.2f} W, "
          f"J = {res.gain * 1e3:.4f} ms, mean batch {ev.mean_batch:.2f}")
    return 0


@_errors_exit_2
def _cmd_fit_arrivals(args: argparse.Namespace) -> int:
    import numpy as np

    from solver.arrival_model import arrivals_option
    from solver.arrivals import read_trace_timestamps
    from solver.fit import fit_arrivals

    stamps = read_trace_timestamps(args.trace, column=args.column)
    times = (stamps - stamps[0]).astype("timedelta64[ns]").astype(np.int64) / 1e9
    fit = fit_arrivals(times, group_window_s=args.group_window, bin_s=args.bin, max_phases=args.max_phases)
    out = fit.to_dict()
    chosen = fit.chosen
    cli = arrivals_option(chosen)  # geometric groups of the same means
    out["arrivals_option"] = cli
    out["trace"] = str(args.trace)
    if args.json:
        print(_dump(out))
        return 0
    c = fit.compound
    print(f"{args.trace}: {fit.requests:,} requests over {fit.span_s:.1f} s, mean rate {fit.rate:.4g} req/s")
    print(f"  fitted model: {chosen.spec}  (use --arrivals {cli})")
    print(f"  groups (window {fit.group_window_s:.3g} s): {c.groups:,}, mean size G = {c.model.group_mean:.4g} "
          f"+- {c.mean_group_ci95:.2g}, index of dispersion E[X^2]/E[X] = "
          f"{c.model.group_second_moment / c.model.group_mean:.4g}")
    if fit.mmpp is not None:
        m = fit.mmpp
        (l1, l2), (r12, r21) = m.model.rates, m.model.switching
        print(f"  mmpp: rates {l1:.4g} +- {m.rates_ci95[0]:.2g}, {l2:.4g} +- {m.rates_ci95[1]:.2g} req/s; switching "
              f"1->2 {r12:.4g} +- {m.switching_ci95[0]:.2g}, 2->1 {r21:.4g} +- {m.switching_ci95[1]:.2g} /s "
              f"(bins {m.bin_s:.3g} s, {m.iterations} EM iterations)")
    if fit.batch_mmpp is not None:
        m = fit.batch_mmpp
        (l1, l2), (r12, r21), (g1, g2) = m.model.rates, m.model.switching, m.model.group_means
        print(f"  batch mmpp: rates {l1:.4g}, {l2:.4g} req/s in groups of mean {g1:.4g}, {g2:.4g}; switching "
              f"1->2 {r12:.4g}, 2->1 {r21:.4g} /s (the MMPP of the group instants)")
    for name, m in fit.more_phases.items():
        grouped = f" in groups of mean {', '.join(f'{g:.4g}' for g in m.model.group_means)}" if m.model.grouped else ""
        print(f"  {name}: rates {', '.join(f'{r:.4g}' for r in m.model.rates)} req/s{grouped}; switching "
              f"(row by row) {', '.join(f'{x:.4g}' for x in m.model.switching)} /s")
    names = list(fit.dispersion)
    print("  index of dispersion Var N(t)/E N(t)   " + "  ".join(f"{n:>8}" for n in names))
    for i, w in enumerate(fit.windows_s):
        print(f"    t = {w:10.4g} s                  " + "  ".join(f"{fit.dispersion[n][i]:8.3g}" for n in names))
    print("  interarrival CV                      " + "  ".join(f"{fit.interarrival_cv.get(n, math.nan):8.3g}" for n in names))
    print("  misfit (mean squared log ratio)      " + "  ".join(
        f"{fit.misfit[n]:8.3g}" if n in fit.misfit else f"{'':8}" for n in names))
    return 0


def _compress_ints(xs: list[int]) -> str:
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts)


@_errors_exit_2
def _cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from solver import arrivals
    from solver.arrival_model import MMPP2, parse_arrivals
    from solver.model import ModelError
    from solver.policy import InstanceRule, InstanceTable, PerInstance, PolicyTable, parse_rule_spec, rule_from_spec
    from solver.simulate import simulate

    if args.requests < 1:
        raise ModelError(f"--requests must be >= 1, got {args.requests}")
    source = args.arrivals.strip()
    is_trace = source.startswith("trace:")
    try:
        stream = None if is_trace else parse_arrivals(source)
    except ModelError as exc:
        raise ModelError(f"unknown arrivals {source!r}: expected poisson, batch:MEAN_GROUP, "
                         f"mmpp:RATE1,RATE2:SWITCH12,SWITCH21 or trace:FILE ({exc})") from None
    if isinstance(stream, MMPP2) and args.rate is None:
        args.rate = stream.mean_rate
    if args.rate is None:
        raise ModelError("--rate is required (except with --arrivals mmpp:..., which fixes the rate)")
    if isinstance(stream, MMPP2) and abs(args.rate - stream.mean_rate) > 1e-9 * stream.mean_rate:
        raise ModelError(f"--rate {args.rate:g} differs from the mean rate of {stream.spec}, {stream.mean_rate:.9g}/s")
    _model(args)  # validates the rate, profile and the rest before any arrivals are drawn
    if not is_trace:
        if args.time_scale is not None or args.trace_rate is not None:
            raise ModelError("--time-scale and --trace-rate apply to trace arrivals only")
        arr = arrivals.from_model(stream, args.rate, args.requests, rng=np.random.default_rng([args.seed, 1]))
    else:
        path = source[len("trace:"):]
        if args.time_scale is not None:
            arr = arrivals.trace(path, time_scale=args.time_scale, target_rate=args.trace_rate, limit=args.requests)
        else:
            arr = arrivals.trace(path, target_rate=args.trace_rate or args.rate, limit=args.requests)
    model_spec = args.model_arrivals or ("poisson" if is_trace else source)
    if model_spec.strip() == "fit":
        from solver.fit import fit_arrivals

        fitted = fit_arrivals(arr).chosen
        if isinstance(fitted, MMPP2):
            args.rate = fitted.mean_rate
        model = _model(args)
        model = model.with_(arrivals=fitted)
    else:
        if isinstance(parse_arrivals(model_spec), MMPP2):
            args.rate = None
        model = _model(args, model_spec)
    kind, _ = parse_rule_spec(args.policy)
    if kind != "smdp":
        rule = rule_from_spec(args.policy, model.max_batch)
        if model.instances > 1:
            rule = PerInstance(rule, model.instances)

    offered = (arr.size - 1) / arr[-1] if arr.size > 1 and arr[-1] > 0 else math.nan
    basis = (f"Poisson arrivals at --rate {model.rate:g} req/s" if model.arrivals.spec == "poisson"
             else f"{model.arrivals.spec} arrivals at mean rate {model.rate:g} req/s")
    warnings: list[str] = []
    if is_trace and math.isfinite(offered):
        if abs(offered - model.rate) > 0.1 * model.rate:
            warnings.append(f"the trace offers {offered:.6g} req/s, {100 * (offered / model.rate - 1):+.0f}% from "
                            f"--rate {model.rate:g}: the predicted figures are for {basis}, not for this trace")
        if offered >= model.capacity:
            warnings.append(f"the trace offers {offered:.6g} req/s, at or above capacity {model.capacity:.6g} req/s: "
                            f"the queue grows over the run and the simulated figures depend on its length")
    predicted: dict[str, Any] | None = None
    phased = None
    if kind == "smdp" and model.instances > 1:
        from solver.instances import solve_instances

        ksol = solve_instances(model, seed=args.seed + 1)
        rule = ksol.policy
        basis = f"the k-instance solver's own simulation of Poisson arrivals at --rate {model.rate:g} req/s"
        predicted = {"mean_latency_s": ksol.mean_latency_s, "mean_power_w": ksol.mean_power_w, "cost": ksol.gain,
                     "mean_batch": ksol.mean_batch, "thresholds": list(ksol.policy.thresholds() or ())}
    elif kind == "smdp" and isinstance(model.arrivals, MMPP2):
        from solver.mmpp import solve_mmpp

        sol_m = solve_mmpp(model)
        phased = sol_m.policy
        rule = phased.tables[0]
        predicted = {"mean_latency_s": sol_m.mean_latency_s, "mean_power_w": sol_m.mean_power_w, "cost": sol_m.gain,
                     "mean_batch": sol_m.evaluation.mean_batch, "phase": "observed (the simulation uses the "
                     "forward filter on arrival times)"}
    elif kind == "smdp":
        from solver.smdp import solve

        sol = solve(model)
        rule = sol.policy
        predicted = {"mean_latency_s": sol.mean_latency_s, "mean_power_w": sol.mean_power_w, "cost": sol.gain,
                     "mean_batch": sol.mean_batch, "threshold": sol.policy.threshold()}
    elif isinstance(rule, PolicyTable):
        from solver.evaluate import evaluate

        try:
            if isinstance(model.arrivals, MMPP2):
                from solver.mmpp import evaluate_mmpp

                ev = evaluate_mmpp(model, rule)
            else:
                ev = evaluate(model, rule)
            predicted = {"mean_latency_s": ev.mean_latency_s, "mean_power_w": ev.mean_power_w,
                         "cost": ev.cost, "mean_batch": ev.mean_batch}
        except ValueError as exc:  # UnstablePolicyError: e.g. a static batch too small for the rate
            predicted = {"error": str(exc)}

    if phased is not None:
        from solver.phase_filter import PhaseFilter
        from solver.simulate import simulate_phased

        res = simulate_phased(model.profile, phased, PhaseFilter(model.arrivals, arr), arr,
                              idle_power_w=model.idle_power_w, weight=model.weight, seed=args.seed, warmup=args.warmup)
    else:
        res = simulate(model.profile, rule, arr, idle_power_w=model.idle_power_w, weight=model.weight,
                       seed=args.seed, warmup=args.warmup,
                       devices=model.idle_devices if isinstance(rule, InstanceRule) else None)

    out = {
        "policy": args.policy,
        "arrivals": source,
        "model_arrivals": model.arrivals.to_dict(),
        "rate": model.rate,
        "offered_rate_rps": offered,
        "weight": model.weight,
        "max_batch": model.max_batch,
        "idle_power_w": model.idle_power_w,
        **res.to_dict(),
        "predicted": predicted,
        "interpolated_batch_sizes": list(model.profile.interpolated),
        "service_law": model.profile.law,
        "warnings": warnings,
    }
    if predicted is not None:
        predicted["basis"] = basis
    for w in warnings:
        print(f"smdp simulate: warning: {w}", file=sys.stderr)
    if phased is not None:
        out["phase_policies"] = [[int(a) for a in t.actions] for t in phased.tables]
    elif isinstance(rule, PolicyTable):
        out["policy_table"] = [int(a) for a in rule.actions]
    if isinstance(rule, InstanceTable):
        out["policy_table"] = rule.to_lists()
    out["instances"] = model.instances
    out["devices"] = model.idle_devices
    if args.json:
        print(_dump(out))
        return 0
    print(f"simulated {args.policy} on {source} arrivals ({res.n_requests:,} requests, {res.n_batches:,} batches, "
          f"{res.horizon_s:.2f} s), B = {model.max_batch}, w = {model.weight:g} s/W, P0 = {model.idle_power_w:g} W"
          + (f", {model.instances} instances" if model.instances > 1 else ""))
    print(f"  W mean {res.mean_latency_s * 1e3:.3f} ms (+-{res.latency_ci95_s * 1e3:.3f}), p50 "
          f"{res.p50_latency_s * 1e3:.3f}, p95 {res.p95_latency_s * 1e3:.3f}, p99 {res.p99_latency_s * 1e3:.3f} ms")
    print(f"  P {res.mean_power_w:.2f} W (+-{res.power_ci95_w:.2f}), J = W + w P = {res.cost * 1e3:.4f} ms, "
          f"throughput {res.throughput_rps:.1f} req/s, mean batch {res.mean_batch:.2f}")
    if predicted and "error" not in predicted:
        print(f"  predicted ({'exact evaluation, ' if model.instances == 1 else ''}{basis}): W {predicted['mean_latency_s'] * 1e3:.3f} ms, "
              f"P {predicted['mean_power_w']:.2f} W, J {predicted['cost'] * 1e3:.4f} ms")
    elif predicted:
        print(f"  no prediction: {predicted['error']}")
    interp = model.profile.interpolated
    if interp:
        print(f"  interpolated batch sizes (not in the profile): {_compress_ints(list(interp))}")
    return 0


@_errors_exit_2
def _cmd_compare(args: argparse.Namespace) -> int:
    from solver.compare import TIMEOUT_GRID_S, compare
    from solver.arrival_model import parse_arrivals
    from solver.model import ServiceProfile

    profile = ServiceProfile.from_csv(args.profile, max_batch=args.max_batch)
    timeouts = _floats(args.timeouts, "--timeouts")
    result = compare(
        profile, args.max_batch, args.idle_power, _floats(args.loads, "--loads"), _floats(args.weights, "--weights"),
        requests=args.requests, seed=args.seed, timeouts_s=timeouts,
        timeout_grid_s=tuple(sorted(set(TIMEOUT_GRID_S) | set(timeouts))), method=args.method,
        progress=lambda msg: print(msg, file=sys.stderr),
        arrival_model=parse_arrivals(args.arrivals), instances=args.instances, devices=args.devices,
    )
    paths = result.write(args.out)
    if args.json:
        print(_dump(result.to_dict()))
    else:
        print(result.table())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
