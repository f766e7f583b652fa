"""Triton's HTTP/REST protocol through the sidecar, against a real tritonserver, on both data planes.

Every answer is compared with what Triton's own HTTP endpoint says to the same request: bodies
byte for byte where Triton's are deterministic (inference with the same input, metadata, errors).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as tcg
import tritonclient.http as tch
from tritonclient.utils import InferenceServerException

from plugin.config import load_config
from plugin.repository_control import refused_message
from plugin.runner import SidecarThread
from planes import data_plane, plane, settle  # noqa: F401  (data_plane: autouse, both planes)

pytestmark = pytest.mark.integration


def sidecar_config(triton, **fields):
    overrides = {"listen": "127.0.0.1:0", "listen_http": "127.0.0.1:0", "control_listen": None,
                 "metrics_listen": None, "triton_url": triton.grpc_url,
                 "triton_http_url": f"127.0.0.1:{triton.http_port}", "triton_statistics": False,
                 "data_plane": plane(), "default": {"policy": "greedy"}}
    overrides.update(fields)
    return load_config(overrides=overrides, environ={})


@pytest.fixture
def sidecar(triton):
    with SidecarThread(sidecar_config(triton)) as sc:
        yield sc


def post(port: int, path: str, body: bytes, headers: dict | None = None, method: str = "POST"):
    """(status, headers, body) of one plain HTTP call."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body if method == "POST" else None,
                                 headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def mlp_json(rows: int, seed: int, **extra) -> bytes:
    x = np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)
    doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [rows, 256], "data": x.tolist()}], **extra}
    return json.dumps(doc).encode()


def test_plain_json_infer_is_byte_identical_to_triton(triton, sidecar):
    for body in (mlp_json(1, 1), mlp_json(3, 2, id="req-7"), mlp_json(8, 5), mlp_json(4, 6),
                 mlp_json(2, 3, parameters={"binary_data_output": True}),
                 mlp_json(1, 4, outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": True}}])):
        want = post(triton.http_port, "/v2/models/cpu_mlp/infer", body)
        got = post(sidecar.http_port, "/v2/models/cpu_mlp/infer", body)
        assert got[0] == want[0] == 200
        assert got[2] == want[2]
        assert got[1]["Content-Type"] == want[1]["Content-Type"]
        assert got[1].get("Inference-Header-Content-Length") == want[1].get("Inference-Header-Content-Length")
    # a version in the path, and the emulated model's INT32 output
    x = np.ones((2, 16), np.float32)
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                                   "data": x.ravel().tolist()}]}).encode()
    want = post(triton.http_port, "/v2/models/emulated_gpu/versions/1/infer", body)
    got = post(sidecar.http_port, "/v2/models/emulated_gpu/versions/1/infer", body)
    assert got[0] == want[0] == 200
    assert json.loads(got[2]) == json.loads(want[2])  # BATCH_ENERGY_J is time-dependent: equal shapes/keys
    assert json.loads(got[2])["outputs"][1]["data"] == [2, 2]


def test_tritonclient_http_sync_async_and_aio(triton, sidecar):
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)

    def inputs(binary: bool):
        inp = tch.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        return [inp]

    direct = tch.InferenceServerClient(f"127.0.0.1:{triton.http_port}")
    via = tch.InferenceServerClient(sidecar.http_url, concurrency=4)
    want = direct.infer("cpu_mlp", inputs(True)).as_numpy("OUTPUT0")
    for binary in (True, False):
        outs = [tch.InferRequestedOutput("OUTPUT0", binary_data=binary)]
        got = via.infer("cpu_mlp", inputs(binary), outputs=outs, request_id="r1")
        np.testing.assert_array_equal(got.as_numpy("OUTPUT0"), want)
        assert got.get_response()["id"] == "r1"
    handles = [via.async_infer("cpu_mlp", inputs(True)) for _ in range(4)]
    for h in handles:
        np.testing.assert_array_equal(h.get_result().as_numpy("OUTPUT0"), want)
    # metadata, health, config, statistics (simple_http_health_metadata.py)
    assert via.is_server_live() and via.is_server_ready() and via.is_model_ready("cpu_mlp")
    assert via.get_server_metadata() == direct.get_server_metadata()
    assert via.get_model_metadata("cpu_mlp") == direct.get_model_metadata("cpu_mlp")
    assert via.get_model_config("cpu_mlp") == direct.get_model_config("cpu_mlp")
    assert via.get_inference_statistics("cpu_mlp")["model_stats"][0]["name"] == "cpu_mlp"
    assert via.get_model_repository_index() == direct.get_model_repository_index()
    via.close()
    direct.close()

    import asyncio

    import tritonclient.http.aio as tcha

    async def aio() -> None:
        client = tcha.InferenceServerClient(sidecar.http_url)
        try:
            assert await client.is_server_live()
            inp = tcha.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            res = await asyncio.gather(*(client.infer("cpu_mlp", [inp]) for _ in range(3)))
            for r in res:
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), want)
        finally:
            await client.close()

    asyncio.run(aio())


def test_errors_are_tritons(triton, sidecar):
    cases = [
        ("/v2/models/nope/infer", mlp_json(1, 0)),  # unknown model: Triton's 404 and message
        ("/v2/models/cpu_mlp/infer", b"{not json"),  # malformed: Triton's 400 and message
        ("/v2/models/cpu_mlp/infer", json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32",
                                                             "shape": [1, 256], "data": ["x"] * 256}]}).encode()),
        ("/v2/models/cpu_mlp/infer", json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32",
                                                             "shape": [1, 256], "data": [1.0] * 3}]}).encode()),
    ]
    for path, body in cases:
        want = post(triton.http_port, path, body)
        got = post(sidecar.http_port, path, body)
        assert (got[0], got[2]) == (want[0], want[2]), path
        assert want[0] in (400, 404, 500) and b'"error"' in want[2]
    # a shape the model does not take: 400 with an error body, as Triton answers
    bad = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3],
                                  "data": [1.0, 2.0, 3.0]}]}).encode()
    want = post(triton.http_port, "/v2/models/cpu_mlp/infer", bad)
    got = post(sidecar.http_port, "/v2/models/cpu_mlp/infer", bad)
    assert got[0] == want[0] == 400 and "error" in json.loads(got[2])
    # repository control is refused unless allowed
    status, _, body = post(sidecar.http_port, "/v2/repository/models/cpu_mlp/unload", b"{}")
    assert status == 403 and json.loads(body)["error"] == refused_message("RepositoryModelUnload")
    assert post(triton.http_port, "/v2/models/cpu_mlp/ready", b"", method="GET")[0] == 200


def test_triton_away_is_503(triton):
    from plugin.launcher.triton_server import free_port

    dead = f"127.0.0.1:{free_port()}"
    cfg = sidecar_config(triton, triton_url=dead, triton_http_url=f"127.0.0.1:{free_port()}")
    with SidecarThread(cfg) as sc:
        status, headers, body = post(sc.http_port, "/v2/models/cpu_mlp/infer", mlp_json(1, 0))
        assert status == 503 and json.loads(body)["error"]
        assert headers["Content-Type"] == "application/json"
        status, _, body = post(sc.http_port, "/v2/health/ready", b"", method="GET")
        assert status == 503 and "unreachable" in json.loads(body)["error"]


def test_mixed_grpc_and_http_callers_share_merged_batches(triton):
    """One gate for both protocols: a timeout policy collects a burst of gRPC and HTTP callers into
    merged batches (the emulated model reports the size of the batch it ran), each gets its rows."""
    cfg = sidecar_config(triton, default={"policy": "timeout:0.2", "max_batch": 16})
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(12)]
    with SidecarThread(cfg) as sc:
        barrier = threading.Barrier(len(xs))

        def call(i: int):
            barrier.wait()
            if i % 2:
                c = tch.InferenceServerClient(sc.http_url)
                inp = tch.InferInput("INPUT0", [1, 16], "FP32")
                inp.set_data_from_numpy(xs[i], binary_data=bool(i % 4 == 1))
            else:
                c = tcg.InferenceServerClient(sc.url)
                inp = tcg.InferInput("INPUT0", [1, 16], "FP32")
                inp.set_data_from_numpy(xs[i])
            r = c.infer("emulated_gpu", [inp])
            return r.as_numpy("OUTPUT0"), int(r.as_numpy("BATCH_SIZE")[0, 0])

        with ThreadPoolExecutor(len(xs)) as pool:
            results = list(pool.map(call, range(len(xs))))
        settle(sc)
    direct = tch.InferenceServerClient(f"127.0.0.1:{triton.http_port}")
    for x, (out, _) in zip(xs, results):
        inp = tch.InferInput("INPUT0", [1, 16], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(out, direct.infer("emulated_gpu", [inp]).as_numpy("OUTPUT0"), rtol=1e-6)
    sizes = [b for _, b in results]
    assert max(sizes) > 1, sizes  # batches were merged
    merged = [i for i, (_, b) in enumerate(results) if b > 1]
    assert {i % 2 for i in merged} == {0, 1}, sizes  # ... from callers of both protocols
    stats = direct.get_inference_statistics("emulated_gpu")["model_stats"][0]["batch_stats"]
    assert any(int(s["batch_size"]) > 1 for s in stats)


def test_queue_full_is_503_with_the_gates_message(triton):
    cfg = sidecar_config(triton, max_queue=1, default={"policy": "timeout:1.0", "max_batch": 16})
    with SidecarThread(cfg) as sc:
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                       "data": [0.0] * 16}]}).encode()
        post(sc.http_port, "/v2/models/emulated_gpu/infer", body)  # the model is known to the gate now
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: post(sc.http_port, "/v2/models/emulated_gpu/infer", body), range(3)))
    codes = sorted(a[0] for a in answers)
    assert 200 in codes and 503 in codes, codes
    refused = next(a for a in answers if a[0] == 503)
    assert "overloaded" in json.loads(refused[2])["error"] or "queue" in json.loads(refused[2])["error"]
