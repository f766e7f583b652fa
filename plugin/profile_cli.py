"""``smdp profile``: measure a model's service-time profile on a live Triton (see plugin/profiler.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_profile_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure a model's tau(b) on a live Triton and write the profile CSV the solver reads",
        description=(
            "Read the model's config from Triton over gRPC, synthesise valid inputs, and for each batch size b "
            "send batches of exactly b rows as one ModelInfer request, one at a time (the gate's slot), after a "
            "warm-up; time each from dispatch to completion. Writes the profile CSV "
            "(batch_size,mean_service_s,busy_power_w|batch_energy_j,service_cv) with its metadata in '#' "
            "comment lines, and optionally the per-batch samples, a plot and JSON with per-size confidence "
            "intervals and a drift check. Power is measured from Triton's GPU metrics where it reports a GPU; "
            "otherwise it is modelled (--power-from, --power-model) and marked 'power: modelled'. "
            "Exit status: 0 ok, 1 the profile could not be taken or fewer than two sizes worked, 2 bad input."
        ),
    )
    p.add_argument("--triton", required=True, metavar="HOST:PORT", help="Triton's gRPC endpoint")
    p.add_argument("--model", required=True, metavar="NAME", help="the model to profile")
    p.add_argument("--version", default="", metavar="V", help="model version (default: Triton's choice)")
    p.add_argument("--sizes", default="default", metavar="1,2,4,...|all",
                   help="batch sizes to time: a comma-separated list, 'all' (1..B), or the default: powers of two "
                   "up to B, and B")
    p.add_argument("--max-batch", type=int, default=None, metavar="B",
                   help="largest batch size (default: the model's max_batch_size; may not exceed it)")
    p.add_argument("--runs-per-size", type=int, default=None, metavar="N",
                   help="timed batches per size (default: %d)" % _defaults()["runs"])
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="unrecorded batches per size before its timed ones (default: %d)" % _defaults()["warmup"])
    p.add_argument("--input-data", type=Path, default=None, metavar="FILE",
                   help="example rows: perf_analyzer's JSON ({\"data\": [{\"INPUT\": [...]}, ...]}) or an .npz with "
                   "one array per input (rows along the first axis); required for BYTES inputs and variable dims")
    p.add_argument("--out", type=Path, default=Path("profile.csv"), help="profile CSV to write (default: %(default)s)")
    p.add_argument("--samples-out", type=Path, default=None, metavar="FILE",
                   help="also write every timed batch as batch_size,service_s (smdp solve --samples FILE)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE", help="also plot tau(b) with its 95%% band and e(b)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (per-size CIs, drift check)")
    power = p.add_mutually_exclusive_group()
    power.add_argument("--power-from", type=Path, default=None, metavar="CSV",
                       help="no GPU metrics: model the energy with this prior profile's busy power p(b) over the "
                       "measured tau(b)")
    power.add_argument("--power-model", default=None, metavar="A[,B]",
                       help="no GPU metrics: model busy power as A + B x b watts over the measured tau(b)")
    p.add_argument("--metrics-url", default="auto", metavar="URL|auto|off",
                   help="Triton's Prometheus metrics, read for GPU power (default: auto = Triton's host, the port after its gRPC port)")
    p.add_argument("--instances", type=int, default=None, metavar="K",
                   help="model instances the profile is for, recorded with it (default: the model's instance_group)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of one request, seconds (default: %(default)s)")
    p.set_defaults(func=_cmd_profile)


def _defaults() -> dict[str, int]:
    from plugin.profiler import DEFAULT_RUNS_PER_SIZE, DEFAULT_WARMUP

    return {"runs": DEFAULT_RUNS_PER_SIZE, "warmup": DEFAULT_WARMUP}


class _Bar:
    """A progress bar on stderr: redrawn in place on a terminal, one line per size otherwise."""

    def __init__(self, stream=None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()

    def __call__(self, k: int, n_sizes: int, done: int, total: int) -> None:
        frac = (k + done / total) / n_sizes
        fill = int(round(frac * self.width))
        text = f"[{'#' * fill}{'.' * (self.width - fill)}] size {k + 1}/{n_sizes}: {done}/{total} batches"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if k + 1 == n_sizes and done == total else ""))
            self.stream.flush()
        elif done == total:
            self.stream.write(text + "\n")
            self.stream.flush()


def _cmd_profile(args: argparse.Namespace) -> int:
    import asyncio
    import json

    import grpc

    from plugin.profiler import (
        ProfileError, ProfileRequest, format_table, plot_profile, profile_model, report_json, write_profile_csv,
        write_samples_csv,
    )

    d = _defaults()
    req = ProfileRequest(
        triton_url=args.triton, model=args.model, version=args.version, sizes=args.sizes, max_batch=args.max_batch,
        runs_per_size=d["runs"] if args.runs_per_size is None else args.runs_per_size,
        warmup=d["warmup"] if args.warmup is None else args.warmup, input_data=args.input_data,
        power_from=args.power_from, power_model=args.power_model,
        metrics_url=None if args.metrics_url == "off" else args.metrics_url, instances=args.instances,
        timeout_s=args.timeout,
    )

    def say(msg: str) -> None:
        print(f"smdp profile: {msg}", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(profile_model(req, progress=_Bar(), say=say))
    except ProfileError as exc:
        print(f"smdp profile: {exc}", file=sys.stderr)
        return 2 if exc.code == grpc.StatusCode.INVALID_ARGUMENT else 1
    for w in report.warnings:
        say(f"warning: {w}")
    if not report.ok:
        say(f"only {len(report.sizes)} batch size(s) worked; a profile needs at least two: nothing written")
        if args.json:
            print(json.dumps(report_json(report), indent=1))
        return 1
    files = [write_profile_csv(report, args.out)]
    if args.samples_out is not None:
        files.append(write_samples_csv(report, args.samples_out))
    if args.plot is not None:
        files.append(plot_profile(report, args.plot))
    if args.json:
        doc = report_json(report)
        doc["files"] = [str(f) for f in files]
        print(json.dumps(doc, indent=1))
    else:
        print(format_table(report))
        for f in files:
            print(f"wrote {f}")
    return 0
