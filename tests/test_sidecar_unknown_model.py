"""Requests for a model Triton does not know: Triton's own error each, without re-asking its config.

Against a real tritonserver in explicit model-control mode: ``cpu_mlp`` is in the repository but
not loaded, so Triton answers NOT_FOUND for it until it is loaded through the repository API.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from plugin.config import load_config
from plugin.runner import SidecarThread
from smdp.v1 import smdp_pb2, smdp_pb2_grpc

from planes import count_config_calls

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1] / "model_repository"
TTL = 3.0  # generous for a busy 2-core host; the default is 1 s


@pytest.fixture
def triton_without_mlp(tmp_path, triton_factory):
    """A private Triton whose repository holds cpu_mlp but has only emulated_gpu loaded."""
    repo = tmp_path / "repo"
    for name in ("emulated_gpu", "cpu_mlp"):
        shutil.copytree(REPO / name, repo / name)
    return triton_factory(repository=repo, models=("emulated_gpu",))


def mlp_input() -> list[tc.InferInput]:
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def error_of(client: tc.InferenceServerClient, model: str = "cpu_mlp") -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, mlp_input(), client_timeout=30)
    return info.value.status(), info.value.message()



def test_a_burst_for_an_unknown_model_gets_tritons_error_and_asks_its_config_once(triton_without_mlp):
    triton = triton_without_mlp
    direct = tc.InferenceServerClient(triton.grpc_url)
    expected = error_of(direct)
    assert expected[0] == "StatusCode.NOT_FOUND" or "unknown model" in expected[1].lower(), expected
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                                 "triton_url": triton.grpc_url, "unknown_model_ttl_s": TTL,
                                 "default": {"policy": "greedy"}}, environ={})
    with SidecarThread(cfg) as sc:
        asked = count_config_calls(sc)
        via = tc.InferenceServerClient(sc.url)
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:  # concurrent: they share one config lookup
            burst = list(pool.map(lambda _: error_of(via), range(48)))
        burst += [error_of(via) for _ in range(12)]  # one after the other: the remembered answer
        within = time.monotonic() - started < TTL
        assert burst == [expected] * len(burst)  # exactly Triton's own error, for every request
        if within:
            assert asked.count("cpu_mlp") == 1, asked
        assert asked.count("cpu_mlp") <= 2, asked
        # the model that exists is unaffected
        x = np.arange(16, dtype=np.float32)[None, :]
        inp = tc.InferInput("INPUT0", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        assert np.array_equal(via.infer("emulated_gpu", [inp]).as_numpy("OUTPUT0"), 2 * x + 1)

        # after the TTL the sidecar asks again (and still answers Triton's error)
        time.sleep(TTL + 0.2)
        before = asked.count("cpu_mlp")
        assert error_of(via) == expected
        assert asked.count("cpu_mlp") == before + 1, asked

        # load the model through Triton's repository API: served at once, gated within the TTL
        direct.load_model("cpu_mlp")
        loaded = time.monotonic()
        first = via.infer("cpu_mlp", mlp_input(), client_timeout=30)
        assert first.as_numpy("OUTPUT0").shape[0] == 1
        gated = None
        while time.monotonic() - loaded < TTL + 2.0:
            via.infer("cpu_mlp", mlp_input(), client_timeout=30)
            state = sc.call(lambda: sc.sidecar.registry.models().get(("cpu_mlp", "")))
            if state is not None and state.gate is not None:
                gated = time.monotonic() - loaded
                break
            time.sleep(0.05)
        assert gated is not None and gated < TTL, gated
        with grpc.insecure_channel(sc.control_url) as ch:
            models = smdp_pb2_grpc.ControlStub(ch).ListModels(smdp_pb2.ListModelsRequest(), timeout=10).models
        assert "cpu_mlp" in models


def test_a_zero_ttl_asks_tritons_config_every_time(triton_without_mlp):
    triton = triton_without_mlp
    expected = error_of(tc.InferenceServerClient(triton.grpc_url))
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                                 "triton_url": triton.grpc_url, "unknown_model_ttl_s": 0,
                                 "data_plane": "python",  # counts the Python gate's config fetches
                                 "default": {"policy": "greedy"}}, environ={})
    with SidecarThread(cfg) as sc:
        asked = count_config_calls(sc)
        via = tc.InferenceServerClient(sc.url)
        assert [error_of(via) for _ in range(3)] == [expected] * 3
        assert asked.count("cpu_mlp") == 3
