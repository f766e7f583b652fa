"""``smdp serve``: the sidecar in the foreground."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from smdp import GRPC_EXPERIMENTS  # imports no gRPC

if TYPE_CHECKING:
    from .config import SidecarConfig

# Flags of `smdp serve` and the configuration fields they set: type, choices, help (with units) and
# the default shown come from the field itself (plugin/config.py). SidecarConfig's fields first:
TOP_FLAGS = {
    "--listen": "listen",
    "--triton": "triton_url",
    "--listen-http": "listen_http",
    "--triton-http": "triton_http_url",
    "--mode": "mode",
    "--data-plane": "data_plane",
    "--triton-batcher": "triton_batcher",
    "--max-queue": "max_queue",
    "--long-run-window": "long_run_window_s",
    "--solver": "solver_url",
    "--control-listen": "control_listen",
    "--control-token": "control_token",
    "--metrics-listen": "metrics_listen",
    "--allow-repository-control": "allow_repository_control",
}
# ... then the policy of every model without an entry of its own (SidecarConfig.default):
POLICY_FLAGS = {
    "--policy": "policy",
    "--profile": "profile",
    "--rate": "rate_rps",
    "--weight": "weight",
    "--idle-power": "idle_power_w",
    "--max-batch": "max_batch",
    "--max-wait": "max_wait_s",
    "--group-hold": "group_hold_s",
    "--arrivals": "arrivals",
}
# ... and its tail-latency SLO (ModelPolicyConfig.slo):
SLO_FLAGS = {
    "--slo-quantile": "quantile",
    "--slo-latency": "latency_s",
    "--slo-margin": "margin_s",
    "--slo-bound": "bound",
    "--slo-catch-share": "best_delay_catch_share",
    "--slo-direct-extra": "best_delay_direct_extra_s",
}
OFF = "none"
"""What --control-listen and --metrics-listen take to turn the endpoint off."""
_OFF_FIELDS = ("control_listen", "metrics_listen")


def policy_dest(field: str) -> str:
    """The parsed argument of a flag that sets ``default.<field>`` (as SMDP_SIDECAR_DEFAULT_<FIELD>)."""
    return f"default_{field}"


def slo_dest(field: str) -> str:
    """The parsed argument of a flag that sets ``default.slo.<field>``."""
    return f"default_slo_{field}"


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    from .config import ModelPolicyConfig, SidecarConfig, SloConfig, add_field_flag

    p = sub.add_parser(
        "serve",
        help="run the sidecar gate in front of a Triton server",
        description="Serve Triton's gRPC inference API, gating inference by the batching policy. "
        "Settings come from --config (YAML), then SMDP_SIDECAR_* environment variables, then these flags.",
    )
    p.add_argument("--config", help="YAML file with SidecarConfig fields")
    for flag, field in TOP_FLAGS.items():
        extra = f"; on the command line, {OFF!r} = off" if field in _OFF_FIELDS else ""
        add_field_flag(p, flag, SidecarConfig, field, dest=field, extra_help=extra)
    for flag, field in POLICY_FLAGS.items():
        add_field_flag(p, flag, ModelPolicyConfig, field, dest=policy_dest(field), extra_help="; for the default policy")
    p.add_argument("--fixed", action="store_true", help="smdp: keep the policy solved for --rate (no re-solving)")
    for flag, field in SLO_FLAGS.items():
        add_field_flag(p, flag, SloConfig, field, dest=slo_dest(field),
                       extra_help="; the default policy's tail-latency SLO (smdp; --slo-latency or --slo-bound "
                       "best_delay sets it)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_run)


def config_from_args(args: argparse.Namespace) -> "SidecarConfig":
    """The configuration: --config's file, then the environment, then the flags given."""
    from .config import load_config

    default = {field: getattr(args, policy_dest(field)) for field in POLICY_FLAGS.values()}
    default["adaptive"] = False if args.fixed else None
    default["slo"] = _slo_flags(args)
    overrides = {field: getattr(args, field) for field in TOP_FLAGS.values()}
    overrides["default"] = {k: v for k, v in default.items() if v is not None} or None
    off = [k for k in _OFF_FIELDS if overrides[k] == OFF]
    for k in off:
        overrides[k] = None
    config = load_config(args.config, overrides=overrides)
    return config.model_copy(update={k: None for k in off}) if off else config


def _slo_flags(args: argparse.Namespace) -> dict | None:
    """``slo`` of the default policy from --slo-quantile/--slo-latency/--slo-bound (the config validates
    the values)."""
    given = {field: getattr(args, slo_dest(field)) for field in SLO_FLAGS.values()}
    if given["latency_s"] is None and given["bound"] in (None, "stated"):
        if any(v is not None for v in given.values()):
            raise ValueError("--slo-quantile, --slo-margin and --slo-bound stated need --slo-latency (the SLO's D, "
                             "seconds), or --slo-bound best_delay to derive D from the model (--slo-catch-share "
                             "and --slo-direct-extra go with it)")
        return None
    return {k: v for k, v in given.items() if v is not None}


def _run(args: argparse.Namespace) -> int:
    # The gRPC core setting `smdp serve` runs with (smdp/__init__.py says why). `smdp` sets it before
    # anything imports gRPC (smdp.cli.main); here again for callers that start at this function, where
    # it takes effect only if nothing imported gRPC yet. One already in the environment is left as is.
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    import asyncio
    import logging

    from pydantic import ValidationError

    from .runner import serve_forever

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"smdp serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from .native_plane import NativePlaneError

    try:
        return asyncio.run(serve_forever(config))
    except (OSError, NativePlaneError) as exc:
        print(f"smdp serve: {exc}", file=sys.stderr)
        return 1
