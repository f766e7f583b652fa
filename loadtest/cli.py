"""Sub-commands of the load-testing part: ``smdp bench``, ``smdp demo`` and ``smdp pareto``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from solver.quantities import DEFAULT_IDLE_POWER_W


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what} is empty")
    return values


def _common(p: argparse.ArgumentParser, out: str, at_load: bool = False) -> None:
    from .bench import DEFAULT_PROFILE

    p.add_argument("--triton", metavar="HOST:PORT", help="use this Triton (gRPC) instead of starting an embedded one")
    p.add_argument("--model", default="emulated_gpu", help="model to load (default: %(default)s)")
    p.add_argument("--profile", type=Path, default=DEFAULT_PROFILE,
                   help="profile CSV the emulated model runs (default: %(default)s)")
    p.add_argument("--time-scale", type=float, default=10.0,
                   help="emulated GPU this many times slower than the profile (default: %(default)s)")
    p.add_argument("--idle-power", type=float, default=DEFAULT_IDLE_POWER_W, help="P0, watts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival sequences (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path(out), help="output directory (default: %(default)s)")
    at = (["at-load"] if at_load else [])
    p.add_argument("--stack-profile", choices=at + ["measured", "table"], default=(at or ["measured"])[0],
                   help="what the solver is told: tau(b) measured on this stack once (smdp profile, cached in the "
                   "output directory; the table's energy) or the published table alone" + (
                       "; at-load: that profile, and for the gate contenders at each load the batch times, "
                       "time in the gate beyond the model's W and per-request hop (and its decision-to-dispatch "
                       "turnaround) the gate measures in a calibration run at that load (its own arrivals), one "
                       "run per gate policy (the SMDP contenders share the fixed SMDP gate's); their W is "
                       "predicted on their own arrivals" if at_load else "") + " (default: %(default)s)")


def _contender_flags(p: argparse.ArgumentParser, gates: str, slo_latency: float | None = None,
                     slo_contenders: str = "triton:ma,gate:smdp-slo-fixed,gate:smdp-slo") -> None:
    p.add_argument("--data-plane", choices=["auto", "python", "native"], default="auto",
                   help="what carries the gate contenders' requests: native = the C++ smdp-gate (`make native`), "
                   "the sidecar's Python gate, or auto = native where smdp-gate is found (default: %(default)s)")
    p.add_argument("--delays-us", default="0,10000",
                   help="Triton max_queue_delay_microseconds contenders, '' for none (default: %(default)s)")
    p.add_argument("--gates", default=gates,
                   help="gate policies: greedy, smdp (solved for the bench's rate, fixed), smdp-adaptive (re-solves "
                   "for the measured rate, through --solver), static:B0, threshold:K, timeout:S; '' for none "
                   "(default: %(default)s)")
    p.add_argument("--config-mode", default="smdp", metavar="smdp|''",
                   help="config-mode contender: the SMDP policy compiled into the model's dynamic_batching "
                   "(preferred_batch_size, max_queue_delay_microseconds) and reloaded on Triton, clients "
                   "direct to Triton; '' for none (default: %(default)s)")
    add_slo_flags(p, slo_latency, slo_contenders)


def add_slo_flags(p: argparse.ArgumentParser, latency: float | None = None,
                  contenders: str = "triton:ma,gate:smdp-slo-fixed,gate:smdp-slo") -> None:
    p.add_argument("--slo-latency", type=float, default=latency,
                   help="a tail-latency SLO's D, seconds (of the emulated, time-scaled system): every row reports "
                   "attainment (share within D) and goodput, and the --slo-contenders join in; 0 = no SLO "
                   "(default: %(default)s)")
    p.add_argument("--slo-contenders", default=contenders,
                   help="what an SLO adds: triton:ma (the delay a Model-Analyzer-style sweep picks), "
                   "gate:smdp-slo-fixed (the SLO search once, for the run's rate), gate:smdp-slo (the adaptive "
                   "SLO gate); '' for none (default: %(default)s)")
    p.add_argument("--slo-quantile", type=float, default=0.99, help="the SLO's quantile q (default: %(default)s)")
    p.add_argument("--slo-margin", type=_margin, default=0.0, metavar="SECONDS|auto",
                   help="seconds of D the SLO gate reserves for latency it does not see (this load generator's "
                   "own threads and its hop to the sidecar): it searches for D - margin; auto = measured by the "
                   "bench at each load before the SLO gates run: the lone-request hop through the gate plus the "
                   "load generator's send lag at the SLO's quantile over the contenders before them "
                   "(default: %(default)s)")


def _margin(text: str) -> float | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds or 'auto': {text!r}") from None


def slo_target(args: argparse.Namespace):
    """The SLO of --slo-latency / --slo-quantile / --slo-margin, or None (a bad value raises a ModelError).
    With --slo-margin auto its margin is 0 here; the bench measures it (``slo_margin_auto``)."""
    from solver.slo import SloTarget

    if args.slo_latency is None or args.slo_latency == 0:
        return None
    return SloTarget(args.slo_quantile, args.slo_latency, 0.0 if slo_margin_auto(args) else args.slo_margin)


def slo_margin_auto(args: argparse.Namespace) -> bool:
    """--slo-margin auto with an SLO."""
    return args.slo_margin == "auto" and bool(args.slo_latency)


def slo_contenders(slo, specs: str = "triton:ma,gate:smdp-slo-fixed,gate:smdp-slo") -> tuple:
    """What an SLO adds to the default contender list (``--slo-contenders``): by default the MA-style
    Triton delay and the SLO gate, fixed (searched once for the run's rate) and adaptive."""
    from .contenders import parse_contender

    return () if slo is None else tuple(parse_contender(s.strip()) for s in specs.split(",") if s.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    from .bench import BENCH_WEIGHT

    p = subparsers.add_parser(
        "bench",
        help="compare Triton's batcher and the SMDP gate on one open-loop arrival sequence",
        description="Against a real Triton (embedded unless --triton), run every contender one after another "
        "on the same Poisson arrival sequence per rate, and report W (mean/p50/p95/p99), P, J = W + w P, "
        "throughput, batch size and failures beside the solver's predictions. Power is modelled from the "
        "profile. Writes bench.csv, bench.json, latencies.npz and PNG plots.",
    )
    _common(p, "out/bench")
    p.add_argument("--rates", default="100,200", help="arrival rates, req/s, comma-separated (default: %(default)s)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per contender (default: %(default)s)")
    p.add_argument("--weight", type=float, default=BENCH_WEIGHT,
                   help="w, seconds per watt, for the scaled system (default: %(default)s)")
    _contender_flags(p, gates="greedy,smdp")
    p.add_argument("--warmup", type=float, default=1.5,
                   help="seconds of arrivals before the measured window, per contender (default: %(default)s)")
    p.add_argument("--cooldown", type=float, default=1.0,
                   help="seconds of unmeasured arrivals after the window, per contender (default: %(default)s)")
    p.add_argument("--solver", default="none", metavar="embedded|HOST:PORT|none",
                   help="where adaptive gates re-solve: a smdp solver-serve started for the bench (embedded), "
                   "a running one, or none = in the sidecar (default: %(default)s)")
    p.add_argument("--instances", type=int, default=1,
                   help="run the model with this many instances (its instance_group count): Triton's batcher and "
                   "the gate fill them all; predictions are for k instances (default: %(default)s, which leaves "
                   "the model's config as it is)")
    p.set_defaults(func=_cmd_bench)

    d = subparsers.add_parser(
        "demo",
        help="the one-minute tour: embedded Triton, solver service, sidecar gates, config mode, short bench",
        description="Start an embedded Triton and the solver service (smdp solver-serve), run a short bench "
        "(two loads x seven contenders: Triton's batcher at two delays, the gate with greedy, with the fixed "
        "SMDP policy and with the adaptive one re-solving through the solver service, config mode, and the "
        "gate serving a tail-latency SLO; every row reports its attainment), print the table and write plots "
        "to out/demo/. Everything started is stopped.",
    )
    _common(d, "out/demo", at_load=True)
    d.add_argument("--rates", default="100,200", help="arrival rates, req/s (default: %(default)s)")
    d.add_argument("--duration", type=float, default=2.5, help="measured seconds per contender (default: %(default)s)")
    d.add_argument("--weight", type=float, default=BENCH_WEIGHT, help="w, seconds per watt (default: %(default)s)")
    # the demo's SLO row: the adaptive SLO gate at q0.99 <= 80 ms (of the emulated system), with the part
    # of it kept for what the gate cannot see measured by the demo: the load generator's hop through the
    # gate (a lone request, about 2 ms beyond tau(1)) and its own send lag at q0.99 (about 2-3 ms)
    _contender_flags(d, gates="greedy,smdp,smdp-adaptive", slo_latency=0.08, slo_contenders="gate:smdp-slo")
    d.set_defaults(slo_margin="auto")
    d.add_argument("--warmup", type=float, default=0.75,
                   help="seconds of unmeasured arrivals before the window, per contender (default: %(default)s)")
    d.add_argument("--cooldown", type=float, default=0.25,
                   help="seconds of unmeasured arrivals after the window, per contender (default: %(default)s)")
    d.add_argument("--solver", default="embedded", metavar="embedded|HOST:PORT|none",
                   help="where the adaptive gate re-solves (default: %(default)s, a smdp solver-serve started "
                   "for the demo)")
    d.set_defaults(func=_cmd_demo)

    x = subparsers.add_parser(
        "pareto",
        help="sweep w: measured latency and power of the SMDP gate against the solver's trade-off curve",
        description="At one rate, solve and run the SMDP gate for each w on the same arrival sequence, and "
        "plot measured (W, P) points over the predicted curve, with greedy and Triton's batcher as references.",
    )
    _common(x, "out/pareto")
    x.add_argument("--rate", type=float, default=100.0, help="arrival rate, req/s (default: %(default)s)")
    x.add_argument("--weights", default="0,0.0003,0.001,0.003,0.01",
                   help="w values, seconds per watt (default: %(default)s)")
    x.add_argument("--duration", type=float, default=6.0, help="seconds per run (default: %(default)s)")
    x.add_argument("--delays-us", default="0,10000", help="Triton batcher reference points (default: %(default)s)")
    x.add_argument("--warmup", type=float, default=1.5, help="seconds of warm-up arrivals per run (default: %(default)s)")
    x.set_defaults(func=_cmd_pareto)

    from .trace_bench import add_trace_bench_command

    add_trace_bench_command(subparsers)


def _contenders(args: argparse.Namespace):
    from .contenders import Contender, parse_contender

    out: list[Contender] = []
    for d in _floats(args.delays_us, "--delays-us") if args.delays_us else ():
        if d != int(d) or d < 0:
            raise ValueError(f"--delays-us: {d!r} is not a whole number of microseconds >= 0")
        out.append(Contender("triton", max_queue_delay_us=int(d)))
    for g in (s.strip() for s in args.gates.split(",") if s.strip()):
        out.append(parse_contender(f"gate:{g}"))
    for m in (s.strip() for s in (getattr(args, "config_mode", "") or "").split(",") if s.strip()):
        out.append(parse_contender(f"config:{m}"))
    names = {c.name for c in out}
    out += [c for c in slo_contenders(slo_target(args), args.slo_contenders) if c.name not in names]
    return tuple(out)


def _config(args: argparse.Namespace):
    from .bench import BenchConfig

    return BenchConfig(
        rates=_floats(args.rates, "--rates"), contenders=_contenders(args), duration_s=args.duration,
        time_scale=args.time_scale, weight=args.weight, idle_power_w=args.idle_power, profile_csv=args.profile,
        model=args.model, seed=args.seed, warmup_s=args.warmup, cooldown_s=args.cooldown, out_dir=args.out,
        solver=None if args.solver in ("none", "") else args.solver, data_plane=args.data_plane,
        slo=slo_target(args), slo_margin_auto=slo_margin_auto(args), instances=getattr(args, "instances", 1),
        stack_profile=args.stack_profile != "table", operating_point=args.stack_profile == "at-load",
    )


def _progress(start: float):
    def say(msg: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)

    return say


def _run(args: argparse.Namespace, title: str) -> int:
    from plugin.launcher.triton_server import TritonStartError, TritonUnavailable
    from solver.model import ModelError

    from .bench import format_table, run_bench, write_outputs

    say = _progress(time.monotonic())
    try:
        cfg = _config(args)
    except (ValueError, argparse.ArgumentTypeError, ModelError) as exc:
        print(f"smdp {title}: {exc}", file=sys.stderr)
        return 2
    say(f"{title}: {len(cfg.rates)} load(s) x {len(cfg.contenders)} contenders x {cfg.duration_s:g} s, "
        f"output in {cfg.out_dir}")
    try:
        report = run_bench(cfg, triton_url=args.triton, progress=say)
    except (TritonUnavailable, TritonStartError) as exc:
        print(f"smdp {title}: Triton is not available: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ModelError) as exc:
        print(f"smdp {title}: {exc}", file=sys.stderr)
        return 2
    report = write_outputs(report)
    print()
    print(format_table(report))
    print()
    for f in report.files:
        print(f"wrote {f}")
    failed = sum(r.measured.failed for r in report.rows)
    if failed:
        print(f"smdp {title}: {failed} request(s) failed; see bench.json for the errors", file=sys.stderr)
        return 1
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    return _run(args, "bench")


def _cmd_demo(args: argparse.Namespace) -> int:
    return _run(args, "demo")


def _cmd_pareto(args: argparse.Namespace) -> int:
    from plugin.launcher.triton_server import TritonStartError, TritonUnavailable
    from solver.model import ModelError

    from .pareto import ParetoConfig, run_pareto, write_pareto

    say = _progress(time.monotonic())
    try:
        delays = tuple(int(d) for d in _floats(args.delays_us, "--delays-us")) if args.delays_us else ()
        cfg = ParetoConfig(rate=args.rate, weights=_floats(args.weights, "--weights"), delays_us=delays,
                           duration_s=args.duration, time_scale=args.time_scale, idle_power_w=args.idle_power,
                           profile_csv=args.profile, model=args.model, seed=args.seed,
                           warmup_s=args.warmup, out_dir=args.out, stack_profile=args.stack_profile != "table")
    except (ValueError, argparse.ArgumentTypeError, ModelError) as exc:
        print(f"smdp pareto: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_pareto(cfg, triton_url=args.triton, progress=say)
    except (TritonUnavailable, TritonStartError) as exc:
        print(f"smdp pareto: Triton is not available: {exc}", file=sys.stderr)
        return 1
    except (ValueError, ModelError) as exc:
        print(f"smdp pareto: {exc}", file=sys.stderr)
        return 2
    text, files = write_pareto(result)
    print()
    print(text)
    for f in files:
        print(f"wrote {f}")
    return 1 if any(p.measured.failed for p in result.points) else 0
