"""Triton's repository control (model load and unload) through the sidecar: refused unless the
operator allows it, with one message on every front (gRPC on both planes, HTTP) saying how to allow it.
The native gate (native/smdp_gate.cc) words its refusal the same; tests compare them."""

from __future__ import annotations

REPOSITORY_CONTROL = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})
"""The gRPC methods (and their HTTP routes, .../load and .../unload) relayed only when allowed."""


def refused_message(method: str) -> str:
    """The refusal of ``method`` (a name in REPOSITORY_CONTROL): PERMISSION_DENIED on gRPC, 403 on HTTP."""
    return (f"{method} is not exposed through the sidecar: to relay Triton's repository control, start it "
            "with allow_repository_control: true in its config (or smdp serve --allow-repository-control)")
