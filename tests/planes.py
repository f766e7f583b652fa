"""Run a sidecar test module on both data planes: the Python gate and the native one (smdp-gate).

Not a test module: integration tests import ``data_plane`` (an autouse fixture, so every test of the
module runs once per plane), ``plane()`` for their sidecar config, and ``settle``. A test that needs
what only the Python plane has carries ``@pytest.mark.python_plane_only("why")``.
"""

from __future__ import annotations

import pytest

_PLANE = {"value": "python"}


@pytest.fixture(autouse=True, params=["python", "native"])
def data_plane(request):
    if request.param == "native":
        request.getfixturevalue("native_gate")  # skipped (or failed, in CI) when it is not built
        why = request.node.get_closest_marker("python_plane_only")
        if why is not None:
            pytest.skip(f"python plane only: {why.args[0]}")
    _PLANE["value"] = request.param
    yield request.param
    _PLANE["value"] = "python"


def plane() -> str:
    """The data plane the running test is parametrized with."""
    return _PLANE["value"]


def settle(sc) -> None:
    """Make the control plane's view of the gate current (``SidecarThread``): the native gate reports
    its counters and batches every 50 ms, so a read right after the last answer could be stale."""
    native = sc.sidecar._native
    if native is not None:
        sc.run(native.sync(), 10)
