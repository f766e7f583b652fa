"""``smdp config-mode``: solve, compile into Triton's dynamic_batching, show the cost, apply."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from solver.quantities import DEFAULT_IDLE_POWER_W, DEFAULT_WEIGHT


def add_config_mode_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config-mode",
        help="compile the SMDP policy into a model's dynamic_batching config and reload it on Triton",
        description=(
            "Solve the batching SMDP at --rate, compile the policy into Triton's own dynamic_batching "
            "(preferred_batch_size + max_queue_delay_microseconds, the delay chosen by simulating Triton's "
            "rule), print the settings with the predicted and simulated J = W + w P of the SMDP policy and "
            "of the compiled rule, and reload the model with them (load with config override) unless "
            "--dry-run. No sidecar is involved: Triton batches by itself."
        ),
    )
    p.add_argument("--triton", dest="triton_url", default=None,
                   help="host:port of Triton's gRPC endpoint (required unless --dry-run)")
    p.add_argument("--model", required=True, help="model to reconfigure")
    p.add_argument("--profile", type=Path, required=True, help="profile CSV: batch_size,mean_service_s,batch_energy_j[,service_cv]")
    p.add_argument("--rate", type=float, default=None,
                   help="arrival rate the policy is for, requests/s (required unless --follow; with --follow, "
                        "the rate to start from before the first estimate)")
    p.add_argument("--weight", type=float, default=DEFAULT_WEIGHT, help="w, seconds per watt (default: %(default)s)")
    p.add_argument("--idle-power", type=float, default=DEFAULT_IDLE_POWER_W, help="P0, watts (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="B (default: the model's max_batch_size from Triton, else the profile's largest size)")
    p.add_argument("--style", choices=("preferred", "timeout"), default="preferred",
                   help="preferred: the sizes the policy serves + a delay (default); timeout: [B] + the best delay, "
                        "Triton's plain rule")
    p.add_argument("--requests", type=int, default=None,
                   help="simulated requests per delay tried (default: 100000, with --follow 5000 so that a "
                        "re-compile takes a fraction of a second)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals and service times")
    p.add_argument("--dry-run", action="store_true", help="print the settings, do not reload the model")
    p.add_argument("--json", action="store_true", help="print one JSON object (settings, costs, applied)")
    f = p.add_argument_group(
        "following the load (--follow)",
        "Poll Triton's statistics for the model's request count, estimate the arrival rate (sliding window "
        "and CUSUM change detector), and re-compile and reload when it moves out of the policy's rate band. "
        "Runs until SIGINT/SIGTERM (or --duration); one line per change.")
    f.add_argument("--follow", action="store_true", help="keep following the arrival rate (closed loop)")
    f.add_argument("--poll-s", type=float, default=1.0, help="seconds between statistics polls (default: %(default)s)")
    f.add_argument("--min-interval", type=float, default=10.0,
                   help="at most one reload per this many seconds (default: %(default)s)")
    f.add_argument("--window", type=float, default=30.0, help="rate estimator window, seconds (default: %(default)s)")
    f.add_argument("--change-ratio", type=float, default=2.0,
                   help="the CUSUM detects a rate change by this factor (default: %(default)s)")
    f.add_argument("--band", type=float, default=0.3,
                   help="re-compile when the estimate is this far (relative) from the policy's rate and "
                        "significantly so (default: %(default)s)")
    f.add_argument("--settle", type=float, default=3.0,
                   help="seconds of the new regime to measure before re-compiling (default: %(default)s)")
    f.add_argument("--verbose", action="store_true", help="also log every statistics sample and the rate estimate")
    f.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until signalled)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from solver.model import BatchingModel, ModelError, ServiceProfile
    from solver.smdp import solve

    from .compiler import ConfigModeApplier, ConfigModeError, compile_policy

    def fail(code: int, message: str) -> int:
        print(f"smdp config-mode: {message}", file=sys.stderr)
        return code

    if args.follow:
        return _follow(args, fail)
    if args.rate is None:
        return fail(2, "--rate is required unless --follow")
    if args.requests is None:
        args.requests = 100_000
    if args.triton_url is None and not args.dry_run:
        return fail(2, "--triton is required unless --dry-run")
    applier = None
    try:
        try:
            profile = ServiceProfile.from_csv(args.profile)
            max_batch = args.max_batch
            if args.triton_url is not None:
                applier = ConfigModeApplier(args.triton_url, args.model, min_interval_s=0.0)
                if max_batch is None:
                    max_batch = int(applier.config().get("max_batch_size", 0)) or None
            if max_batch is None:
                max_batch = profile.max_batch
            model = BatchingModel(rate=args.rate, max_batch=max_batch, profile=profile,
                                  idle_power_w=args.idle_power, weight=args.weight)
            result = solve(model)
            compiled = compile_policy(result, model.profile, model.rate, idle_power_w=model.idle_power_w,
                                      weight=model.weight, style=args.style, n_requests=args.requests, seed=args.seed)
        except (ModelError, ValueError) as exc:
            return fail(2, str(exc))
        except ConfigModeError as exc:
            return fail(1, str(exc))

        outcome = None
        if not args.dry_run:
            try:
                outcome = applier.submit(compiled.settings)
            except ConfigModeError as exc:
                _report(args, result, compiled, None)
                return fail(1, str(exc))
        _report(args, result, compiled, outcome)
        return 0
    finally:
        if applier is not None:
            applier.close()


def _report(args: argparse.Namespace, result, compiled, outcome) -> None:
    from .compiler import size_ranges

    if args.json:
        d = compiled.to_dict()
        d["model"] = args.model
        d["smdp_gain"] = result.gain
        d["threshold"] = result.threshold()
        d["applied"] = None if outcome is None else {"status": outcome.status, "reload_s": outcome.reload_s}
        print(json.dumps(d, indent=2, allow_nan=False, default=lambda x: None))
        return
    s = compiled.settings
    pred, sim, comp = compiled.smdp_predicted, compiled.smdp_simulated, compiled.compiled_simulated
    k = result.threshold()
    print(f"SMDP policy for {args.model}: rate {compiled.rate:g}/s, w = {compiled.weight:g} s/W, B = {s.max_batch_size}, "
          + (f"control limit K = {k}" if k is not None else "not of control-limit type"))
    print(f"Triton dynamic_batching ({compiled.style} style):")
    print(f"  preferred_batch_size: {size_ranges(s.preferred_batch_size)} ({len(s.preferred_batch_size)} sizes)")
    print(f"  max_queue_delay_microseconds: {s.max_queue_delay_microseconds}")
    print(f"{'':28s}{'W (ms)':>10s}{'P (W)':>10s}{'J':>12s}")
    print(f"{'SMDP, predicted (exact)':28s}{pred.mean_latency_s * 1e3:10.3f}{pred.mean_power_w:10.2f}{pred.cost:12.6f}")
    print(f"{'SMDP table, simulated':28s}{sim.mean_latency_s * 1e3:10.3f}{sim.mean_power_w:10.2f}{sim.cost:12.6f}"
          f"  (+/- {sim.cost_ci95:.2g})")
    print(f"{'compiled rule, simulated':28s}{comp.mean_latency_s * 1e3:10.3f}{comp.mean_power_w:10.2f}{comp.cost:12.6f}"
          f"  (+/- {comp.cost_ci95:.2g})")
    print(f"compiled vs table: J {compiled.relative_gap * 100:+.2f}% on the same {compiled.n_requests} simulated "
          "Poisson arrivals and service times")
    if compiled.exact:
        print("the compiled rule equals the table on every queue length (until the delay expires)")
    else:
        m = compiled.mismatched_states
        print(f"approximate: Triton serves max(preferred <= n), the table differs at {len(m)} queue lengths "
              f"(first: n = {', '.join(map(str, m[:8]))}{', ...' if len(m) > 8 else ''})")
    if outcome is None:
        print("dry run: not applied")
    elif outcome.status == "applied":
        print(f"applied: model {args.model} reloaded on {args.triton_url} in {outcome.reload_s:.2f} s")
    else:
        print(f"{outcome.status}: model {args.model} already has these settings, not reloaded")


def _follow(args: argparse.Namespace, fail) -> int:
    """``--follow``: the closed loop until SIGINT/SIGTERM or --duration."""
    import signal
    import threading
    import time

    from solver.model import ModelError, ServiceProfile

    from .follow import FOLLOW_SIM_REQUESTS, RateFollower, follow_triton
    from .compiler import ConfigModeError

    if args.triton_url is None:
        return fail(2, "--follow needs --triton (the request counts come from Triton's statistics)")
    if args.json:
        return fail(2, "--json is not available with --follow (one line is logged per change)")
    stop = threading.Event()

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        profile = ServiceProfile.from_csv(args.profile)
        if not (args.poll_s > 0 and args.min_interval >= 0 and (args.duration is None or args.duration > 0)):
            raise ValueError("--poll-s and --duration must be > 0, --min-interval >= 0")
        follower = RateFollower(window_s=args.window, change_ratio=args.change_ratio, band=args.band,
                                settle_s=args.settle)
        loop, close = follow_triton(
            args.triton_url, args.model, profile, weight=args.weight, idle_power_w=args.idle_power,
            max_batch=args.max_batch, style=args.style,
            n_requests=args.requests if args.requests is not None else FOLLOW_SIM_REQUESTS, seed=args.seed,
            poll_s=args.poll_s, min_interval_s=args.min_interval, dry_run=args.dry_run, follower=follower, log=log,
            verbose=args.verbose)
    except (ModelError, ValueError) as exc:
        return fail(2, str(exc))
    except ConfigModeError as exc:
        return fail(1, str(exc))
    previous = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame) -> None:
            log(f"config-follow: {signal.Signals(signum).name}: stopping")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    timer = None
    try:
        if args.rate is not None:  # start from the given rate; the loop corrects it from measurements
            loop.submit(loop.follower.start_at(args.rate, time.monotonic()))
        if args.duration is not None:
            timer = threading.Timer(args.duration, stop.set)
            timer.daemon = True
            timer.start()
        b = "model's max_batch_size" if args.max_batch is None else args.max_batch
        log(f"config-follow: following {args.model} on {args.triton_url} (B = {b}, w = {args.weight:g} s/W, "
            f"poll every {args.poll_s:g} s, at most one reload per {args.min_interval:g} s"
            + (", dry run" if args.dry_run else "") + ")")
        loop.run(stop)
    finally:
        if timer is not None:
            timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        close()
    applied = sum(1 for c in loop.changes if c.status == "applied")
    log(f"config-follow: stopped after {len(loop.changes)} re-compile(s), {applied} reload(s), "
        f"{loop.follower.resets} statistics restart(s)")
    return 0
