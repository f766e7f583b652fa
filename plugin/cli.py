"""Sub-commands of the serving side: ``smdp triton`` (the embedded Triton server), ``smdp serve``,
``smdp ctl``, ``smdp config-mode`` and ``smdp profile``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from plugin.launcher.triton_server import DEFAULT_MODELS, DEFAULT_REPOSITORY  # light: stdlib only

    p = subparsers.add_parser(
        "triton",
        help="run the embedded tritonserver (from nvidia-pytriton) in the foreground",
        description=(
            "Start NVIDIA's tritonserver binary shipped in the nvidia-pytriton wheel with a model "
            "repository in explicit model-control mode, print its URLs, and stop it cleanly on "
            "Ctrl-C or SIGTERM. Port 0 picks a free port."
        ),
    )
    p.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository (default: %(default)s)")
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated models to load (default: %(default)s)",
    )
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default: %(default)s)")
    p.add_argument("--address", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    p.add_argument("--binary", type=Path, default=None, help="a tritonserver binary instead of nvidia-pytriton's")
    p.add_argument("--log-file", type=Path, default=None, help="write Triton's log here (default: a temp file)")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.set_defaults(func=_run_triton)

    from plugin.serve_cli import add_serve_command

    add_serve_command(subparsers)

    from plugin.ctl_cli import add_ctl_command

    add_ctl_command(subparsers)

    from plugin.config_mode.cli import add_config_mode_command

    add_config_mode_command(subparsers)

    from plugin.profile_cli import add_profile_command

    add_profile_command(subparsers)


def _run_triton(args: argparse.Namespace) -> int:
    import signal
    import sys
    import threading

    from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig, TritonStartError, TritonUnavailable

    try:
        config = TritonConfig(
            repository=args.repository,
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            address=args.address,
            binary=args.binary,
            log_file=args.log_file,
            log_verbose=args.log_verbose,
            startup_timeout_s=args.startup_timeout,
        )
    except ValueError as exc:
        print(f"smdp triton: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = EmbeddedTriton(config)
    try:
        try:
            server.start()
        except (TritonUnavailable, TritonStartError) as exc:
            print(f"smdp triton: {exc}", file=sys.stderr)
            return 1
        print(f"tritonserver running (pid {server.pid}), models: {', '.join(config.models)}")
        print(f"  grpc:    {server.grpc_url}")
        print(f"  http:    http://{server.http_url}")
        print(f"  metrics: {server.metrics_url}")
        print(f"  log:     {server.log_path}" + ("" if args.log_file else " (removed on exit; --log-file keeps one)"))
        print("Ctrl-C or SIGTERM stops it.", flush=True)
        while not stop.wait(0.5):
            if not server.is_running():
                code = server.wait(0)
                print(f"smdp triton: tritonserver exited on its own (code {code}):\n{server.log_tail()}", file=sys.stderr)
                return 1
        print("stopping tritonserver...", flush=True)
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
