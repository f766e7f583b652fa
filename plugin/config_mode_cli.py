"""``smdp config-mode``: solve, compile into Triton's dynamic_batching, show the cost, apply."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_IDLE_POWER_W = 40.0  # as ``smdp solve``: the published V100 tables give no idle figure


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
    p.add_argument("--rate", type=float, required=True, help="arrival rate the policy is for, requests/s")
    p.add_argument("--weight", type=float, default=0.0, help="w, seconds per watt (default: %(default)s)")
    p.add_argument("--idle-power", type=float, default=DEFAULT_IDLE_POWER_W, help="P0, watts (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="B (default: the model's max_batch_size from Triton, else the profile's largest size)")
    p.add_argument("--style", choices=("preferred", "timeout"), default="preferred",
                   help="preferred: the sizes the policy serves + a delay (default); timeout: [B] + the best delay, "
                        "Triton's plain rule")
    p.add_argument("--requests", type=int, default=100_000, help="simulated requests per delay tried (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated arrivals and service times")
    p.add_argument("--dry-run", action="store_true", help="print the settings, do not reload the model")
    p.add_argument("--json", action="store_true", help="print one JSON object (settings, costs, applied)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from solver.model import BatchingModel, ModelError, ServiceProfile
    from solver.smdp import solve

    from .config_mode import ConfigModeApplier, ConfigModeError, compile_policy

    def fail(code: int, message: str) -> int:
        print(f"smdp config-mode: {message}", file=sys.stderr)
        return code

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
    from .config_mode import size_ranges

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
