"""``smdp serve``: the sidecar in the foreground."""

from __future__ import annotations

import argparse
import os
import sys

# gRPC core's EventEngine endpoints read every socket on threads of their own and hand each event to
# the thread polling the completion queue (grpc.aio's poller), which wakes the event loop: one thread
# hop more per message than the older iomgr endpoints, where the poller reads the socket itself. On a
# small, shared machine that hop cost 0.3-0.5 ms added latency and ~250 us CPU per request (RESULTS.md,
# section 3). Read once, when gRPC starts, hence set before anything imports it; a GRPC_EXPERIMENTS
# already in the environment (even empty) is left as it is.
GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints,-event_engine_callback_cq"


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the sidecar gate in front of a Triton server",
        description="Serve Triton's gRPC inference API, gating inference by the batching policy. "
        "Settings come from --config (YAML), then SMDP_SIDECAR_* environment variables, then these flags.",
    )
    p.add_argument("--config", help="YAML file with SidecarConfig fields")
    p.add_argument("--listen", help="host:port for the inference API (default 127.0.0.1:8011; port 0 = free)")
    p.add_argument("--triton", dest="triton_url", help="host:port of Triton's gRPC endpoint (default 127.0.0.1:8001)")
    p.add_argument("--listen-http", help="host:port for Triton's HTTP/REST API through the gate (default: off; "
                   "port 0 = free)")
    p.add_argument("--triton-http", dest="triton_http_url",
                   help="host:port of Triton's HTTP endpoint (default: Triton's host, port 8000)")
    p.add_argument("--mode", choices=["merged", "released"], help="how a chosen batch is sent to Triton")
    p.add_argument("--data-plane", choices=["auto", "python", "native"],
                   help="what carries inference: the C++ smdp-gate (make native), the Python gate, or auto (default: "
                   "native wherever smdp-gate is found, else python, saying why)")
    p.add_argument("--triton-batcher", choices=["keep", "off"],
                   help="off: reload gated models without Triton's dynamic batcher (merged mode; needs explicit "
                   "model control); keep (default): leave their configs as they are")
    p.add_argument("--max-queue", type=int, help="requests that may wait per model (default 1024)")
    p.add_argument("--policy", help="default policy: greedy | smdp | static:B0 | threshold:K | timeout:SECONDS")
    p.add_argument("--profile", help="profile CSV for the smdp policy")
    p.add_argument("--rate", type=float, help="arrival rate (requests/s) the smdp policy is solved for")
    p.add_argument("--weight", type=float, help="w, seconds per watt")
    p.add_argument("--idle-power", type=float, help="P0, watts")
    p.add_argument("--max-batch", type=int, help="B, the largest batch the gate forms")
    p.add_argument("--fixed", action="store_true", help="smdp: keep the policy solved for --rate (no re-solving)")
    p.add_argument("--long-run-window", dest="long_run_window_s", type=float,
                   help="horizon of the long-run mean rate that scales w per regime, seconds (default 600; 0 = w as is)")
    p.add_argument("--slo-quantile", type=float,
                   help="smdp: with --slo-latency, serve a tail-latency SLO, this quantile of response time (default 0.99)")
    p.add_argument("--slo-latency", type=float, help="smdp: the SLO's latency bound D, seconds")
    p.add_argument("--solver", dest="solver_url", help="host:port of a shared smdp solver-serve (default: in-process)")
    p.add_argument("--control-listen", help="host:port of the control API (default 127.0.0.1:8012; 'none' = off)")
    p.add_argument("--control-token", help="bearer token required by the control API")
    p.add_argument("--metrics-listen", help="host:port of the Prometheus /metrics endpoint (default 127.0.0.1:8013; "
                   "'none' = off)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_run)


def _slo_flags(args: argparse.Namespace) -> dict | None:
    """``slo`` of the default policy from --slo-quantile/--slo-latency (the config validates the values)."""
    if args.slo_latency is None:
        if args.slo_quantile is not None:
            raise ValueError("--slo-quantile needs --slo-latency (the SLO's D, seconds)")
        return None
    out = {"latency_s": args.slo_latency}
    if args.slo_quantile is not None:
        out["quantile"] = args.slo_quantile
    return out


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    import asyncio
    import logging

    from pydantic import ValidationError

    from .config import load_config
    from .runner import serve_forever

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        slo = _slo_flags(args)
    except ValueError as exc:
        print(f"smdp serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    default = {
        "policy": args.policy,
        "profile": args.profile,
        "rate_rps": args.rate,
        "weight": args.weight,
        "idle_power_w": args.idle_power,
        "max_batch": args.max_batch,
        "adaptive": False if args.fixed else None,
        "slo": slo,
    }
    overrides = {
        "listen": args.listen,
        "triton_url": args.triton_url,
        "listen_http": args.listen_http,
        "triton_http_url": args.triton_http_url,
        "mode": args.mode,
        "data_plane": args.data_plane,
        "triton_batcher": args.triton_batcher,
        "max_queue": args.max_queue,
        "solver_url": args.solver_url,
        "long_run_window_s": args.long_run_window_s,
        "control_listen": args.control_listen,
        "control_token": args.control_token,
        "metrics_listen": args.metrics_listen,
        "default": {k: v for k, v in default.items() if v is not None} or None,
    }
    off = [k for k in ("control_listen", "metrics_listen") if overrides[k] == "none"]
    for k in off:
        overrides[k] = None
    try:
        config = load_config(args.config, overrides=overrides)
        if off:
            config = config.model_copy(update={k: None for k in off})
    except (ValidationError, ValueError, OSError) as exc:
        print(f"smdp serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from .native_plane import NativePlaneError

    try:
        return asyncio.run(serve_forever(config))
    except (OSError, NativePlaneError) as exc:
        print(f"smdp serve: {exc}", file=sys.stderr)
        return 1
