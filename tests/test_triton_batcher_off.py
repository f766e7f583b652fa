"""triton_batcher: off: the sidecar reloads gated models without Triton's dynamic batcher.

Against a private real Triton (the change is to its loaded config), on both data planes.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tritonclient.grpc as tc

from planes import data_plane, plane, plane_sidecar  # noqa: F401 - data_plane: autouse, both planes
from plugin.config import load_config
from plugin.runner import SidecarThread

pytestmark = pytest.mark.integration


def _infer(url: str) -> np.ndarray:
    x = np.random.default_rng(0).random((3, 16), dtype=np.float32)
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return tc.InferenceServerClient(url).infer("emulated_gpu", [inp]).as_numpy("OUTPUT0")


def _sidecar(triton_url: str, batcher: str) -> SidecarThread:
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": None, "metrics_listen": None,
                                 "triton_url": triton_url, "data_plane": plane(), "triton_batcher": batcher,
                                 "default": {"policy": "greedy", "max_batch": 8}}, environ={})
    return SidecarThread(cfg)


def test_off_reloads_gated_models_without_the_batcher_and_keeps_answering(triton_factory):
    triton = triton_factory(models=("emulated_gpu",))
    direct = tc.InferenceServerClient(triton.grpc_url)
    before = direct.get_model_config("emulated_gpu").config
    assert before.HasField("dynamic_batching") and before.dynamic_batching.priority_levels == 2
    expected = _infer(triton.grpc_url)
    with _sidecar(triton.grpc_url, "off") as sc:
        got = _infer(sc.url)
        np.testing.assert_array_equal(got, expected)
        after = direct.get_model_config("emulated_gpu").config
        assert not after.HasField("dynamic_batching")
        # Everything else of the model's config is as it was.
        before.ClearField("dynamic_batching")
        assert after == before
        for _ in range(3):
            np.testing.assert_array_equal(_infer(sc.url), expected)


def test_keep_leaves_the_config_alone(triton_factory):
    triton = triton_factory(models=("emulated_gpu",))
    direct = tc.InferenceServerClient(triton.grpc_url)
    with _sidecar(triton.grpc_url, "keep") as sc:
        _infer(sc.url)
        assert direct.get_model_config("emulated_gpu").config.HasField("dynamic_batching")


def _batcher_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "dynamic_batching is on behind the merged gate" in r.getMessage()]


def test_keep_by_default_says_so_once_for_all_models_and_not_when_chosen(triton, caplog):
    """Both stock models have dynamic_batching: one warning line per start names them both and
    ``triton_batcher: off``; a model read again says nothing more; an explicit ``keep`` says nothing."""
    caplog.set_level(logging.INFO, logger="smdp.sidecar")
    for chosen in (False, True):
        caplog.clear()
        overrides = {"triton_batcher": "keep"} if chosen else {}
        with plane_sidecar(triton.grpc_url, **overrides) as sc:
            for name in ("emulated_gpu", "cpu_mlp"):
                assert sc.run(sc.sidecar.registry.model_state(name, "")).gate is not None
            sc.call(lambda: sc.sidecar.registry.model_changed("cpu_mlp"))  # read again, as after a reload
            assert sc.run(sc.sidecar.registry.model_state("cpu_mlp", "")).gate is not None
        lines = _batcher_warnings(caplog)
        if chosen:
            assert lines == []
        else:
            assert len(lines) == 1, lines
            assert "cpu_mlp, emulated_gpu" in lines[0] and "triton_batcher: off" in lines[0]
