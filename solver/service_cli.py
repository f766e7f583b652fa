"""``smdp solver-serve``: the solver gRPC service in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys


_DESCRIPTION = (
    "Serve smdp.v1.Solver with a policy cache, gRPC health checking and reflection. "
    "Sidecars ask it for a new policy whenever their measured arrival rate or weight changes."
)


def add_solver_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "solver-serve", help="run the SMDP solver as a gRPC service (smdp.v1.Solver)", description=_DESCRIPTION
    )
    _add_arguments(p)


ENV_PREFIX = "SMDP_SOLVER_"
"""Each flag may come from the environment instead: --cache-size is SMDP_SOLVER_CACHE_SIZE; a flag wins."""


def _env(name: str, default: str, environ=os.environ) -> str:
    return environ.get(ENV_PREFIX + name.upper(), default)


def _env_int(name: str, default: int, environ=os.environ) -> int:
    text = _env(name, str(default), environ)
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"smdp solver-serve: error: {ENV_PREFIX}{name.upper()} must be an integer, got {text!r}") from None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    # 50051: the port compose and Kubernetes use; 8011-8013 are the sidecar's defaults
    p.add_argument("--listen", default=_env("listen", "127.0.0.1:50051"),
                   help="host:port to listen on (env SMDP_SOLVER_LISTEN; default: %(default)s; "
                        "port 0 = a free port, printed)")
    p.add_argument("--workers", type=int, default=_env_int("workers", 4),
                   help="concurrent solves (env SMDP_SOLVER_WORKERS; default: %(default)s)")
    p.add_argument("--cache-size", type=int, default=_env_int("cache_size", 256),
                   help="cached solutions kept (env SMDP_SOLVER_CACHE_SIZE; default: %(default)s)")
    p.add_argument("--keep-freed-memory-mb", type=int, default=_env_int("keep_freed_memory_mb", 1024),
                   help="freed memory the process keeps for the next solve instead of returning it, in MiB; "
                        "arrays below it come from the heap (solver.memory: about a third faster at B = 128; "
                        "0 = glibc's defaults; env SMDP_SOLVER_KEEP_FREED_MEMORY_MB; default: %(default)s)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from solver.service import start_solver_server

    if args.workers < 1:
        print(f"smdp solver-serve: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if not 0 <= args.keep_freed_memory_mb < 2048:
        print(f"smdp solver-serve: error: --keep-freed-memory-mb must be in [0, 2048), got {args.keep_freed_memory_mb}",
              file=sys.stderr)
        return 2
    if args.keep_freed_memory_mb:
        from solver.memory import keep_freed_memory

        if not keep_freed_memory(args.keep_freed_memory_mb * 2**20):
            print("smdp solver-serve: freed memory not kept (not glibc): solves run with the C library's defaults",
                  file=sys.stderr)
    try:
        server, port = start_solver_server(args.listen, max_workers=args.workers, cache_size=args.cache_size)
    except (OSError, ValueError) as exc:
        print(f"smdp solver-serve: error: {exc}", file=sys.stderr)
        return 2
    host = args.listen.rsplit(":", 1)[0]
    print(f"smdp solver listening on {host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2.0).wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m solver.service_cli``: the same command without the ``smdp`` front end."""
    parser = argparse.ArgumentParser(prog="smdp solver-serve", description=_DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
