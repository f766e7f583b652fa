"""Run a sidecar test module on both data planes: the Python gate and the native one (smdp-gate).

Not a test module: integration tests import ``data_plane`` (an autouse fixture, so every test of the
module runs once per plane), ``plane()`` for their sidecar config, and ``settle``. A test that needs
what only the Python plane has carries ``@pytest.mark.python_plane_only("why")``.
"""

from __future__ import annotations

from contextlib import contextmanager

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
    its counters and batches every ``native_report_interval_s``, so a read right after the last answer could be stale."""
    sc.run(sc.sidecar.plane.sync(), 10)


@contextmanager
def plane_sidecar(triton_url: str, **overrides):
    """A ``SidecarThread`` on the running test's plane in front of ``triton_url``: greedy by default,
    no control API or metrics, inference on a free port; always stopped."""
    from plugin.config import load_config
    from plugin.runner import SidecarThread

    default = overrides.pop("default", {"policy": "greedy"})
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": None, "metrics_listen": None,
                                 "triton_url": triton_url, "data_plane": plane(), "default": default,
                                 **overrides}, environ={})
    runner = SidecarThread(cfg)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def count_config_calls(sc) -> list[str]:
    """Wrap the sidecar's upstream ModelConfig call (``SidecarThread``): the returned list collects the
    names asked for."""
    asked: list[str] = []

    def install() -> None:
        original = sc.sidecar.upstream.model_config

        def counting(request, **kwargs):
            asked.append(request.name)
            return original(request, **kwargs)

        sc.sidecar.upstream.model_config = counting

    sc.call(install)
    return asked


def emu_request(model: str = "emulated_gpu", rows: int = 1, version: str = "", rid: str = ""):
    """A raw ModelInferRequest for the emulated GPU model: ``rows`` rows of the value ``rows``."""
    import numpy as np
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=rid)
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
    req.raw_input_contents.append(np.full((rows, 16), rows, np.float32).tobytes())
    return req
