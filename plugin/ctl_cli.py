"""``smdp ctl``: the operator's command line for a sidecar's control API (smdp.v1.Control).

    smdp ctl --url HOST:PORT [--token T] models
    smdp ctl --url HOST:PORT [--token T] status [MODEL]
    smdp ctl --url HOST:PORT [--token T] set-weight MODEL W
    smdp ctl --url HOST:PORT [--token T] set-target MODEL SECONDS|none
    smdp ctl --url HOST:PORT [--token T] set-slo MODEL --quantile Q --latency SECONDS
    smdp ctl --url HOST:PORT [--token T] clear-slo MODEL
    smdp ctl --url HOST:PORT [--token T] policy MODEL
    smdp ctl --url HOST:PORT [--token T] watch MODEL [--interval S] [--count N]

``--json`` prints the messages as JSON (proto field names) instead of text. Exit codes: 0 success,
2 for the caller's mistakes (bad value, unknown model, bad token), 1 when the sidecar cannot be
reached or fails.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable

_USER_ERRORS = ("INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED")


def add_ctl_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ctl",
        help="control a running sidecar: weight, latency target, SLO, status, policy",
        description="Client of the sidecar's control API (smdp.v1.Control).",
    )
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("SMDP_CONTROL_URL", "127.0.0.1:8012"),
                   help="host:port of the control API (default: $SMDP_CONTROL_URL or %(default)s)")
    p.add_argument("--token", default=os.environ.get("SMDP_CONTROL_TOKEN"),
                   help="bearer token (default: $SMDP_CONTROL_TOKEN)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    cmds = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)
    cmds.add_parser("models", help="list the models the sidecar gates")
    st = cmds.add_parser("status", help="status of one model, or of every model")
    st.add_argument("model", nargs="?")
    sw = cmds.add_parser("set-weight", help="set w (seconds per watt) of J = W + w P")
    sw.add_argument("model")
    sw.add_argument("weight", type=float)
    tg = cmds.add_parser("set-target", help="set a mean latency target in seconds, or 'none' to clear it")
    tg.add_argument("model")
    tg.add_argument("target", help="seconds, or none")
    so = cmds.add_parser("set-slo", help="set a tail-latency SLO: the QUANTILE of response time <= LATENCY seconds")
    so.add_argument("model")
    so.add_argument("--quantile", type=float, default=0.99, help="q, strictly between 0 and 1 (default: %(default)s)")
    so.add_argument("--latency", type=float, required=True, help="D, seconds")
    so.add_argument("--margin", type=float, default=0.0,
                    help="seconds of D reserved for latency the sidecar does not see (client, network); the "
                         "policy is searched for D - margin (default: %(default)s)")
    cs = cmds.add_parser("clear-slo", help="drop the model's SLO (back to least J = W + w P)")
    cs.add_argument("model")
    po = cmds.add_parser("policy", help="the policy table in force")
    po.add_argument("model")
    wa = cmds.add_parser("watch", help="stream the status until interrupted")
    wa.add_argument("model")
    wa.add_argument("--interval", type=float, default=1.0, help="seconds between updates (default: %(default)s)")
    wa.add_argument("--count", type=int, default=0, help="stop after this many updates (default: until Ctrl-C)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    import grpc

    from smdp.v1 import smdp_pb2, smdp_pb2_grpc

    if not math.isfinite(args.timeout) or args.timeout <= 0:
        print(f"smdp ctl: error: --timeout must be > 0 seconds, got {args.timeout}", file=sys.stderr)
        return 2
    metadata = () if not args.token else (("authorization", f"Bearer {args.token}"),)
    show = _json if args.json else _text
    with grpc.insecure_channel(args.url) as channel:
        stub = smdp_pb2_grpc.ControlStub(channel)
        kw = {"metadata": metadata, "timeout": args.timeout}
        try:
            cmd = args.ctl_command
            if cmd == "models":
                reply = stub.ListModels(smdp_pb2.ListModelsRequest(), **kw)
                out(show(reply))
            elif cmd == "status":
                names = [args.model] if args.model else list(stub.ListModels(smdp_pb2.ListModelsRequest(), **kw).models)
                for name in names:
                    out(show(stub.GetStatus(smdp_pb2.ModelRequest(model=name), **kw)))
            elif cmd == "set-weight":
                out(show(stub.SetWeight(smdp_pb2.SetWeightRequest(model=args.model, weight=args.weight), **kw)))
            elif cmd == "set-target":
                if args.target.strip().lower() == "none":
                    reply = stub.ClearLatencyTarget(smdp_pb2.ModelRequest(model=args.model), **kw)
                else:
                    try:
                        target = float(args.target)
                    except ValueError:
                        print(f"smdp ctl: error: target must be seconds or 'none', got {args.target!r}", file=sys.stderr)
                        return 2
                    reply = stub.SetLatencyTarget(
                        smdp_pb2.SetLatencyTargetRequest(model=args.model, target_s=target), **kw)
                out(show(reply))
            elif cmd == "set-slo":
                out(show(stub.SetSlo(smdp_pb2.SetSloRequest(model=args.model, quantile=args.quantile,
                                                            latency_s=args.latency, margin_s=args.margin),
                                       **kw)))
            elif cmd == "clear-slo":
                out(show(stub.ClearSlo(smdp_pb2.ModelRequest(model=args.model), **kw)))
            elif cmd == "policy":
                out(show(stub.GetPolicy(smdp_pb2.ModelRequest(model=args.model), **kw)))
            elif cmd == "watch":
                req = smdp_pb2.WatchStatusRequest(model=args.model, interval_s=args.interval,
                                                  max_updates=max(0, args.count))
                # No deadline on the stream itself: it runs until the count or Ctrl-C.
                for status in stub.WatchStatus(req, metadata=metadata):
                    out(show(status))
        except grpc.RpcError as exc:
            code = exc.code()
            print(f"smdp ctl: {code.name}: {exc.details()}", file=sys.stderr)
            return 2 if code.name in _USER_ERRORS else 1
        except KeyboardInterrupt:
            return 130
    return 0


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def _json(msg: Any) -> str:
    import json

    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _text(msg: Any) -> str:
    name = type(msg).__name__
    if name == "ListModelsReply":
        return "\n".join(msg.models) if msg.models else "(no models)"
    if name == "PolicyReply":
        return _policy_text(msg)
    if name == "ModelStatus":
        return _status_text(msg)
    return str(msg)


def _policy_text(p: Any) -> str:
    lines = [f"model {p.model}: policy v{p.version} ({p.source}), age {p.age_s:.1f} s, B = {p.max_batch}"]
    if p.HasField("threshold"):
        lines.append(f"  control-limit: wait while n < {p.threshold}, then serve min(n, B)")
    if p.HasField("group_hold_s"):
        lines.append(f"  group hold: a batch that is not full waits until {_ms(p.group_hold_s)} after the newest "
                     "arrival (the policy is solved for arrivals in groups)")
    if not p.actions:
        lines.append("  (not a table: the rule depends on waiting time)")
        return "\n".join(lines)
    rows = [list(p.actions)] + [list(r.actions) for r in p.busy_tables]
    for m, acts in enumerate(rows):
        indent = "  "
        if len(rows) > 1:
            lines.append(f"  m = {m}{'+' if m == len(rows) - 1 else ''} batches in flight:")
            indent = "    "
        start = 0
        for n in range(1, len(acts) + 1):
            if n == len(acts) or _kind(n, acts[n], p.max_batch) != _kind(start, acts[start], p.max_batch):
                kind, a = _kind(start, acts[start], p.max_batch)
                span = f"n = {start}" if n - 1 == start else f"n = {start}..{n - 1}"
                what = {"wait": "wait", "all": "serve min(n, B)", "fixed": f"serve {a}"}[kind]
                lines.append(f"{indent}{span}: {what}")
                start = n
        lines.append(f"{indent}n > {len(acts) - 1}: serve min(n, B)")
    return "\n".join(lines)


def _kind(n: int, a: int, max_batch: int) -> tuple[str, int]:
    if a == 0:
        return ("wait", 0)
    if a == min(n, max_batch):
        return ("all", 0)
    return ("fixed", a)


def _figures(f: Any, power_note: str = "") -> str:
    return (f"W {_ms(f.mean_latency_s)}  P {f.mean_power_w:.2f} W{power_note}  J {f.cost:.6g}  "
            f"throughput {f.throughput_rps:.1f}/s  mean batch {f.mean_batch:.2f}")


def _status_text(s: Any) -> str:
    lines = [f"model {s.model}"]
    if s.HasField("rate"):
        r = s.rate
        lines.append(f"  rate       {r.rate_rps:.2f} req/s  [{r.lo_rps:.2f}, {r.hi_rps:.2f}] "
                     f"({r.confidence:.0%}, {r.arrivals} arrivals over {r.span_s:.1f} s)")
    else:
        lines.append("  rate       (not estimated yet)")
    target = _ms(s.latency_target_s) if s.HasField("latency_target_s") else "none"
    lines.append(f"  weight     {s.weight:.6g} s/W   latency target {target}")
    thr = f", threshold {s.threshold}" if s.HasField("threshold") else ""
    lines.append(f"  policy     v{s.policy_version} {s.policy_source}{thr}, age {s.policy_age_s:.1f} s, B = {s.max_batch}")
    if s.HasField("predicted"):
        lines.append(f"  predicted  {_figures(s.predicted)}  (at {s.predicted_rate_rps:.2f} req/s)")
    if s.HasField("measured"):
        lines.append(f"  measured   {_figures(s.measured, ' (modelled)' if s.power_modelled else '')}")
    if s.HasField("slo"):
        lines.extend(_slo_text(s.slo))
    hist = [f"{b}:{c}" for b, c in enumerate(s.batch_histogram) if b > 0 and c > 0]
    lines.append(f"  batches    {' '.join(hist) if hist else '(none)'}")
    if s.HasField("dispatch_lag"):
        lines.append(f"  turnaround {_ms(s.dispatch_lag.mean_s)} per batch from decision to dispatch "
                     f"({s.dispatch_lag.batches} batches)")
    lines.append(f"  queue {s.queue_length}, in flight {s.in_flight} of {max(s.instances, 1)} instance(s) "
                 f"on {max(s.devices, 1)} device(s), "
                 f"completed {s.completed}, "
                 f"rejected {s.rejected} (queue full) + {s.rejected_expired} expired + {s.rejected_invalid} invalid, "
                 f"failed {s.failed}")
    lines.extend(_profile_text(s))
    lines.append(f"  solver     {'reachable' if s.solver_reachable else 'UNREACHABLE'}; "
                 f"power {'modelled from the profile' if s.power_modelled else 'measured'}")
    if s.note:
        lines.append(f"  note       {s.note}")
    return "\n".join(lines)


def _slo_text(o: Any) -> list[str]:
    q = f"q{o.quantile:g}"
    guard = f", max-wait guard {_ms(o.max_wait_s)}" if o.HasField("max_wait_s") else ""
    # with a derived bound the search's fallback is the best delay as the gate runs it, not greedy
    fallback = "the best delay as the gate runs it" if o.derived_bound else "greedy"
    state = "predicted to meet it" if o.feasible else f"INFEASIBLE at this rate: serving {fallback}"
    lines = [f"  SLO        {q} <= {_ms(o.latency_s)}: {state}{guard}"]
    if o.derived_bound:
        lines.append(f"    D derived from the model: {o.derived_bound}")
    if o.margin_s or o.correction_s:
        lines.append(f"    searched for D - {_ms(o.margin_s)} margin - {_ms(o.correction_s)} measured correction "
                     f"= {_ms(o.latency_s - o.margin_s - o.correction_s)}")
    if o.HasField("predicted_quantile_s"):
        ci = f" +- {_ms(o.predicted_ci95_s)}" if o.HasField("predicted_ci95_s") else ""
        lines.append(f"    predicted {q} {_ms(o.predicted_quantile_s)}{ci}")
    if o.HasField("measured_quantile_s"):
        lines.append(f"    measured  {q} {_ms(o.measured_quantile_s)}, attainment {o.attainment:.4f} "
                     f"(share within D, over {o.samples} answers in the rate window)")
    if o.stall_held_up:
        kept = (f"; the correction with them left in would be {_ms(o.correction_with_stalls_s)}"
                if o.HasField("correction_with_stalls_s") else "")
        lines.append(f"    host stalls {_ms(o.stalled_s)} in the window touched {o.stall_held_up} answers, "
                     f"left out of the correction{kept}")
    return lines


def _opt_ms(msg: Any, name: str) -> str:
    return f"{getattr(msg, name) * 1e3:.3f}" if msg.HasField(name) else "-"


def _profile_text(s: Any) -> list[str]:
    """The learned service profile: a header line and a compact table, one row per batch size."""
    if not s.profile_learning and not s.service_times:
        return []
    where = f"learned v{s.profile_updates}" if s.profile_updates else "CSV prior"
    lines = [f"  profile    {where} in force; {s.profile_batches} batches observed"]
    if s.service_times:
        lines.append(f"    {'b':>4} {'batches':>8} {'mean ms':>9} {'+-ms':>7} {'prior ms':>9} {'in force':>9} "
                     f"{'triton ms':>9}")
        for t in s.service_times:
            lines.append(f"    {t.batch_size:>4} {t.samples:>8} {_opt_ms(t, 'mean_s'):>9} {_opt_ms(t, 'ci_s'):>7} "
                         f"{t.prior_s * 1e3:>9.3f} {t.in_force_s * 1e3:>9.3f} {_opt_ms(t, 'triton_compute_s'):>9}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m plugin.ctl_cli``: the same command without the ``smdp`` front end."""
    parser = argparse.ArgumentParser(prog="smdp ctl", description="Client of the sidecar's control API.")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
