"""Shared fixtures: one real tritonserver for the whole session, and a factory for private ones.

Where the binary cannot run here (no nvidia-pytriton, old glibc, a missing shared library) the
integration tests are skipped with that reason; a binary that is present but fails to start is a
test error, not a skip.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest


def _unavailable_reason() -> str | None:
    from plugin.launcher.triton_server import TritonUnavailable, locate_triton

    try:
        locate_triton()
    except TritonUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def triton_runnable() -> None:
    """Skips (with the reason) when the embedded tritonserver cannot run on this machine."""
    reason = _unavailable_reason()
    if reason is not None:
        pytest.skip(f"tritonserver cannot run here: {reason}")


@pytest.fixture(scope="session")
def triton(triton_runnable: None) -> Iterator["EmbeddedTriton"]:  # noqa: F821
    """One Triton with ``model_repository/`` and both models, shared by the session, always stopped."""
    from plugin.launcher.triton_server import DEFAULT_MODELS, EmbeddedTriton, TritonConfig

    server = EmbeddedTriton(TritonConfig(models=DEFAULT_MODELS))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def triton_factory(triton_runnable: None) -> Iterator[Callable[..., "EmbeddedTriton"]]:  # noqa: F821
    """``make(start=True, **TritonConfig fields)``: a private server, stopped at the end of the test."""
    from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig

    servers: list[EmbeddedTriton] = []

    def make(start: bool = True, **fields) -> EmbeddedTriton:
        server = EmbeddedTriton(TritonConfig(**fields))
        servers.append(server)
        return server.start() if start else server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def native_gate() -> str:
    """The path of the native data plane's binary (``make native``). Skipped with the reason when it
    is not built; with SMDP_REQUIRE_NATIVE=1 (CI) a missing binary fails instead."""
    import os

    from plugin.native_plane import NativePlaneError, find_binary

    try:
        return str(find_binary())
    except NativePlaneError as exc:
        if os.environ.get("SMDP_REQUIRE_NATIVE") == "1":
            pytest.fail(f"SMDP_REQUIRE_NATIVE=1 but {exc}")
        pytest.skip(str(exc))
