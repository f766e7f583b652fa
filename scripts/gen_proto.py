#!/usr/bin/env python3
"""Regenerate the Python code of proto/smdp/v1/smdp.proto into smdp/v1/.

The generated files are committed, so that installing the project needs no protoc; this script is
the only way they are made, and tests/test_proto.py regenerates into a temporary folder and
compares byte for byte. The output depends on the grpcio-tools version, so the version is pinned
(``GRPC_TOOLS_VERSION``, and in pyproject's dev extra) and checked here.

Usage: python scripts/gen_proto.py [--out DIR]   (DIR defaults to the repository root)
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ("smdp/v1/smdp.proto",)
GRPC_TOOLS_VERSION = "1.81.1"


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto; returns the files written under ``out``."""
    from grpc_tools import protoc

    have = metadata.version("grpcio-tools")
    if have != GRPC_TOOLS_VERSION:
        raise RuntimeError(
            f"grpcio-tools {have} is installed but the committed code is made with {GRPC_TOOLS_VERSION}: "
            f"pip install grpcio-tools=={GRPC_TOOLS_VERSION}"
        )
    wkt = Path(protoc.__file__).resolve().parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{wkt}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            proto,
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {rc})")
    written = []
    for proto in PROTOS:
        stem = proto[: -len(".proto")]
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = out / f"{stem}{suffix}"
            if not path.is_file():
                raise RuntimeError(f"protoc did not write {path}")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository root)")
    args = parser.parse_args(argv)
    try:
        for path in generate(args.out):
            print(path)
    except RuntimeError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
