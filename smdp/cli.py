"""The `smdp` command: one entry point, sub-commands contributed by each part of the project.

Each part exposes ``register(subparsers)``, adding its sub-commands with ``set_defaults(func=...)``
where ``func(args) -> int``. Heavy imports stay inside those functions so that ``smdp --help`` and
the solver commands start fast and work without the optional extras installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from smdp import GRPC_EXPERIMENTS

# Modules that contribute sub-commands; a missing one (a part not yet built) is skipped.
_PARTS = ("solver.cli", "plugin.cli", "loadtest.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smdp",
        description="Optimal SMDP dynamic batching for NVIDIA Triton Inference Server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]:
        # The sidecar's gRPC setting (smdp/__init__.py), before the parser: building it imports the
        # sub-commands' modules, and with them gRPC, which reads it once. A GRPC_EXPERIMENTS already in
        # the environment (even empty) is left as it is.
        os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
