"""The calls of NVIDIA's tritonclient HTTP examples, through the sidecar's HTTP listener, both planes.

Re-creates what simple_http_infer_client.py, simple_http_async_infer_client.py,
simple_http_aio_infer_client.py, simple_http_health_metadata.py, simple_http_string_infer_client.py,
simple_http_shm_client.py and simple_http_sequence_sync_infer_client.py do, against a real Triton
serving Python-backend stand-ins of the models they call (tests/http_example_models), with only the
URL pointing at the sidecar instead of Triton.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from plugin.config import load_config
from plugin.runner import SidecarThread
from example_models import unregister_system_shm
from planes import data_plane, plane  # noqa: F401  (data_plane: autouse, both planes)

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parent / "http_example_models"


@pytest.fixture(scope="module")
def triton(triton_runnable):
    from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig

    server = EmbeddedTriton(TritonConfig(repository=MODELS, models=(
        "simple", "simple_string", "simple_identity", "simple_sequence")))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def url(triton):
    """The sidecar's HTTP listener (host:port), in front of the example models' Triton."""
    cfg = load_config(overrides={
        "listen": "127.0.0.1:0", "listen_http": "127.0.0.1:0", "control_listen": None, "metrics_listen": None,
        "triton_url": triton.grpc_url, "triton_http_url": f"127.0.0.1:{triton.http_port}",
        "triton_statistics": False, "data_plane": plane(), "default": {"policy": "greedy"}}, environ={})
    with SidecarThread(cfg) as sc:
        yield sc.http_url


@pytest.fixture
def client(url):
    c = httpclient.InferenceServerClient(url=url, concurrency=4)
    try:
        yield c
    finally:
        c.close()


def simple_inputs(binary: bool = True):
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(in0, binary_data=False)
    inputs[1].set_data_from_numpy(in1, binary_data=binary)
    return in0, in1, inputs


def test_simple_http_infer_client(client):
    in0, in1, inputs = simple_inputs()
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
    query = {"test_1": 1, "test_2": 2}
    results = client.infer("simple", inputs, outputs=outputs, query_params=query,
                           headers={"header_1": "value_1"})
    np.testing.assert_array_equal(results.as_numpy("OUTPUT0"), in0 + in1)
    np.testing.assert_array_equal(results.as_numpy("OUTPUT1"), in0 - in1)
    assert results.get_output("OUTPUT1")["data"] == (in0 - in1).ravel().tolist()  # JSON, as asked
    # no outputs named: all of them, binary (tritonclient's default)
    results = client.infer("simple", inputs)
    np.testing.assert_array_equal(results.as_numpy("OUTPUT0"), in0 + in1)
    assert results.get_output("OUTPUT0")["parameters"] == {"binary_data_size": 64}
    with pytest.raises(InferenceServerException) as e:
        client.infer("wrong_model_name", inputs, outputs=outputs)
    assert e.value.status() == "404"
    assert e.value.message() == "Request for unknown model: 'wrong_model_name' is not found"


def test_simple_http_async_and_aio_infer_clients(client, url):
    in0, in1, inputs = simple_inputs()
    handles = [client.async_infer("simple", inputs, request_id=str(i)) for i in range(8)]
    for i, h in enumerate(handles):
        r = h.get_result()
        assert r.get_response()["id"] == str(i)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), in0 - in1)

    async def aio():
        c = aioclient.InferenceServerClient(url=url)
        try:
            assert await c.is_server_live() and await c.is_model_ready("simple")
            ins = [aioclient.InferInput("INPUT0", [1, 16], "INT32"), aioclient.InferInput("INPUT1", [1, 16], "INT32")]
            ins[0].set_data_from_numpy(in0)
            ins[1].set_data_from_numpy(in1)
            rs = await asyncio.gather(*(c.infer("simple", ins) for _ in range(4)))
            for r in rs:
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), in0 + in1)
        finally:
            await c.close()

    asyncio.run(aio())


def test_simple_http_health_metadata(client, triton):
    direct = httpclient.InferenceServerClient(url=f"127.0.0.1:{triton.http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("simple") and not client.is_model_ready("wrong_model_name")
    assert client.get_server_metadata() == direct.get_server_metadata()
    assert client.get_model_metadata("simple") == direct.get_model_metadata("simple")
    assert client.get_model_config("simple") == direct.get_model_config("simple")
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("wrong_model_name")
    stats = client.get_inference_statistics("simple")
    assert stats["model_stats"][0]["name"] == "simple"
    direct.close()


def test_simple_http_string_infer_client(client, triton):
    in0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    in1 = np.ones((1, 16), dtype=np.int32)
    in0n = np.array([str(x).encode("utf-8") for x in in0.ravel()], dtype=np.object_).reshape(in0.shape)
    in1n = np.array([str(x).encode("utf-8") for x in in1.ravel()], dtype=np.object_).reshape(in1.shape)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_data_from_numpy(in0n, binary_data=False)
    inputs[1].set_data_from_numpy(in1n, binary_data=True)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
    r = client.infer("simple_string", inputs, outputs=outputs)
    assert [int(x) for x in r.as_numpy("OUTPUT0").ravel()] == (in0 + in1).ravel().tolist()
    assert [int(x) for x in r.as_numpy("OUTPUT1").ravel()] == (in0 - in1).ravel().tolist()
    # simple_identity: strings and raw bytes, each way, answered as Triton answers them
    direct = httpclient.InferenceServerClient(url=f"127.0.0.1:{triton.http_port}")
    words = np.array([["lorem", "ipsum", "dolor", "sit", "amet"]], dtype=np.object_)
    raw = np.array([[b"\x01x\n", "\u00e9".encode(), b'"q"', b"", b"\\"]], dtype=np.object_)
    for binary in (True, False):
        for a in (words, raw):
            def call(c):
                inp = httpclient.InferInput("INPUT0", list(a.shape), "BYTES")
                inp.set_data_from_numpy(a, binary_data=binary)
                out = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
                return c.infer("simple_identity", [inp], outputs=out).as_numpy("OUTPUT0").tolist()

            got = call(client)
            assert got == call(direct)
            assert [x if isinstance(x, bytes) else x.encode() for x in got[0]] == [
                x if isinstance(x, bytes) else x.encode() for x in a[0]]
    direct.close()


def test_simple_http_shm_client(client):
    import tritonclient.utils.shared_memory as shm

    client.unregister_system_shared_memory()
    in0, in1, _ = simple_inputs()
    size = in0.nbytes
    key = f"/smdp_http_{uuid.uuid4().hex[:8]}"
    op = shm.create_shared_memory_region("output_data", key + "_out", size * 2)
    ip = shm.create_shared_memory_region("input_data", key + "_in", size * 2)
    try:
        client.register_system_shared_memory("output_data", key + "_out", size * 2)
        shm.set_shared_memory_region(ip, [in0])
        shm.set_shared_memory_region(ip, [in1], offset=size)
        client.register_system_shared_memory("input_data", key + "_in", size * 2)
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_shared_memory("input_data", size)
        inputs[1].set_shared_memory("input_data", size, offset=size)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                   httpclient.InferRequestedOutput("OUTPUT1", binary_data=True)]
        outputs[0].set_shared_memory("output_data", size)
        outputs[1].set_shared_memory("output_data", size, offset=size)
        results = client.infer("simple", inputs, outputs=outputs)
        o0, o1 = results.get_output("OUTPUT0"), results.get_output("OUTPUT1")
        assert "data" not in o0 and "parameters" not in o0  # left in the region, as Triton answers
        np.testing.assert_array_equal(shm.get_contents_as_numpy(op, np.int32, o0["shape"]), in0 + in1)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(op, np.int32, o1["shape"], offset=size), in0 - in1)
        assert len(client.get_system_shared_memory_status()) == 2
        unregister_system_shm(client)
        assert client.get_system_shared_memory_status() == []
    finally:
        unregister_system_shm(client)
        shm.destroy_shared_memory_region(ip)
        shm.destroy_shared_memory_region(op)


def test_simple_http_sequence_sync_infer_client(client):
    values = [11, 7, 5, 3, 2, 0, 1]

    def send(first: int, sign: int, sequence_id) -> list[int]:
        out = []
        seq = [first] + [sign * v for v in values]
        for i, v in enumerate(seq):
            inp = httpclient.InferInput("INPUT", [1, 1], "INT32")
            inp.set_data_from_numpy(np.full((1, 1), v, np.int32))
            r = client.infer("simple_sequence", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT")],
                             sequence_id=sequence_id, sequence_start=i == 0, sequence_end=i == len(seq) - 1)
            out.append(int(r.as_numpy("OUTPUT")[0][0]))
        return out

    assert send(0, 1, 1000) == [1] + values
    assert send(100, -1, 1001) == [101] + [-v for v in values]
    assert send(20, -1, str(uuid.uuid4())) == [21] + [-v for v in values]
