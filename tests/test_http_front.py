"""The HTTP/REST translator's pure logic: KServe v2 HTTP <-> ModelInferRequest/Response.

The request side is checked against what tritonclient.http itself sends (JSON and binary), the
response side against the KServe v2 layout Triton writes; the integration tests compare with a real
Triton.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as tch
from tritonclient.grpc import service_pb2

from plugin.http_front import (
    OutputKind,
    OutputPlan,
    Untranslatable,
    decode_request,
    encode_response,
    error_body,
    format_double,
    json_string,
    response_encoding,
)
from plugin.repository_control import refused_message


def client_body(inputs, outputs=None, **kw) -> tuple[bytes, int | None]:
    """The body and Inference-Header-Content-Length tritonclient.http sends for these tensors."""
    body, header_length = tch.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return body, header_length


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize(
    "datatype,values",
    [
        ("FP32", np.arange(6, dtype=np.float32).reshape(2, 3) / 7),
        ("FP64", np.linspace(-1, 1, 6).reshape(2, 3)),
        ("INT8", np.array([[-128, 0, 127]], dtype=np.int8)),
        ("UINT16", np.array([[0, 1, 65535]], dtype=np.uint16)),
        ("INT64", np.array([[-(2**62), 3, 2**62]], dtype=np.int64)),
        ("UINT64", np.array([[2**64 - 1, 0]], dtype=np.uint64)),
        ("BOOL", np.array([[True, False, True]])),
        ("BYTES", np.array([[b"a", "é".encode(), b'q"\\\n'], [b"", b"xyz", b"0"]], dtype=np.object_)),
    ],
)
def test_request_tensors_become_the_raw_bytes_grpc_carries(datatype, values, binary):
    inp = tch.InferInput("X", list(values.shape), datatype)
    inp.set_data_from_numpy(values, binary_data=binary)
    body, header_length = client_body([inp])
    req, plan = decode_request("m", "2", body, header_length)
    assert (req.model_name, req.model_version) == ("m", "2")
    assert [(t.name, t.datatype, list(t.shape)) for t in req.inputs] == [("X", datatype, list(values.shape))]
    if datatype == "BYTES":
        want = b"".join(struct.pack("<I", len(v)) + v for v in values.ravel())
    else:
        want = values.tobytes()
    assert req.raw_input_contents[0] == want
    assert plan == OutputPlan(OutputKind.BINARY, {})  # tritonclient asks for binary outputs by default


def test_request_parameters_outputs_and_shared_memory():
    inp = tch.InferInput("X", [1, 2], "FP32")
    inp.set_shared_memory("in_region", 8, offset=4)
    outs = [tch.InferRequestedOutput("A", binary_data=False), tch.InferRequestedOutput("B", class_count=3),
            tch.InferRequestedOutput("C")]
    outs[2].set_shared_memory("out_region", 64)
    body, header_length = client_body([inp], outputs=outs, request_id="id1", sequence_id=7, sequence_start=True,
                                      priority=1, timeout=500, parameters={"custom": "v", "n": 3, "f": 0.5})
    req, plan = decode_request("m", "", body, header_length)
    assert req.id == "id1"
    p = req.parameters
    assert p["sequence_id"].int64_param == 7 and p["sequence_start"].bool_param
    assert "sequence_end" not in p
    assert p["priority"].uint64_param == 1 and p["timeout"].int64_param == 500
    assert p["custom"].string_param == "v" and p["n"].int64_param == 3 and p["f"].double_param == 0.5
    assert not req.raw_input_contents
    ip = req.inputs[0].parameters
    assert ip["shared_memory_region"].string_param == "in_region"
    assert ip["shared_memory_byte_size"].int64_param == 8 and ip["shared_memory_offset"].int64_param == 4
    assert [o.name for o in req.outputs] == ["A", "B", "C"]
    assert req.outputs[1].parameters["classification"].int64_param == 3
    assert req.outputs[2].parameters["shared_memory_region"].string_param == "out_region"
    assert plan.kind("A") is OutputKind.JSON and plan.kind("B") is OutputKind.BINARY
    assert plan.kind("C") is OutputKind.SHM and plan.kind("other") is OutputKind.JSON


@pytest.mark.parametrize(
    "doc",
    [
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "data": [1.0]}]},  # count
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": ["1"]}]},  # type
        {"inputs": [{"name": "X", "datatype": "INT32", "shape": [1], "data": [1.5]}]},
        {"inputs": [{"name": "X", "datatype": "INT32", "shape": [1], "data": [True]}]},
        {"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [-1]}]},
        {"inputs": [{"name": "X", "datatype": "FP16", "shape": [1], "data": [1.0]}]},
        {"inputs": [{"name": "X", "datatype": "NOPE", "shape": [1], "data": [1]}]},
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [-1], "data": [1.0]}]},
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1]}]},  # no data
        {"inputs": {}},
        {"inputs": [], "parameters": {"triton_x": 1}},
        {"inputs": [], "parameters": {"priority": -1}},
        {"inputs": [], "id": 3},
        [],
    ],
)
def test_what_triton_would_refuse_is_left_to_triton(doc):
    with pytest.raises(Untranslatable):
        decode_request("m", "", json.dumps(doc).encode(), None)


def test_binary_sizes_must_match_the_body():
    inp = tch.InferInput("X", [2], "INT32")
    inp.set_data_from_numpy(np.array([1, 2], np.int32), binary_data=True)
    body, hl = client_body([inp])
    decode_request("m", "", body, hl)
    for bad in (body + b"extra", body[:-1]):
        with pytest.raises(Untranslatable):
            decode_request("m", "", bad, hl)
    with pytest.raises(Untranslatable):  # raw binary (header length 0) is Triton's to parse
        decode_request("m", "", body, 0)


def response(outputs: dict[str, tuple[str, np.ndarray]], **kw) -> service_pb2.ModelInferResponse:
    r = service_pb2.ModelInferResponse(model_name="m", model_version="1", **kw)
    for name, (dt, arr) in outputs.items():
        r.outputs.add(name=name, datatype=dt, shape=arr.shape)
        if dt == "BYTES":
            r.raw_output_contents.append(b"".join(struct.pack("<I", len(v)) + v for v in arr.ravel()))
        else:
            r.raw_output_contents.append(arr.tobytes())
    return r


def test_response_json_layout_is_tritons():
    r = response({"A": ("INT32", np.array([[1, -2]], np.int32)), "B": ("BOOL", np.array([True, False])),
                  "S": ("BYTES", np.array([b"x\x01\"/", "é".encode()], dtype=np.object_))}, id="q")
    r.parameters["p"].bool_param = True
    body, header = encode_response(r, OutputPlan(OutputKind.JSON, {}))
    assert header is None
    assert body == (
        b'{"id":"q","model_name":"m","model_version":"1","parameters":{"p":true},"outputs":['
        b'{"name":"A","datatype":"INT32","shape":[1,2],"data":[1,-2]},'
        b'{"name":"B","datatype":"BOOL","shape":[2],"data":[true,false]},'
        b'{"name":"S","datatype":"BYTES","shape":[2],"data":["x\\u0001\\"/","\xc3\xa9"]}]}'
    )


def test_response_binary_and_shared_memory_outputs():
    a = np.array([[1.5, 2.5]], np.float32)
    r = response({"A": ("FP32", a), "E": ("FP32", np.zeros((0, 2), np.float32)), "C": ("FP32", a)})
    r.raw_output_contents[2] = b""  # in shared memory: Triton's gRPC frontend sends no bytes
    body, header = encode_response(r, OutputPlan(OutputKind.BINARY, {"C": OutputKind.SHM}))
    head = body[:header]
    assert json.loads(head)["outputs"] == [
        {"name": "A", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
        {"name": "E", "datatype": "FP32", "shape": [0, 2], "parameters": {"binary_data_size": 0}},
        {"name": "C", "datatype": "FP32", "shape": [1, 2]},
    ]
    assert body[header:] == a.tobytes()
    # the client reads it back as from Triton
    result = tch.InferResult.from_response_body(body, header_length=header)
    np.testing.assert_array_equal(result.as_numpy("A"), a)


@pytest.mark.parametrize(
    "x,text",
    [(1.0, "1.0"), (0.5, "0.5"), (-0.0, "-0.0"), (1e-7, "1e-7"), (1.5e-7, "1.5e-7"), (1e21, "1e21"),
     (1e20, "100000000000000000000.0"), (1.25e16, "12500000000000000.0"), (1.5e300, "1.5e300"),
     (0.000123, "0.000123"), (1.23e-6, "0.00000123"), (123.456, "123.456"), (-2.5e-10, "-2.5e-10")],
)
def test_doubles_are_laid_out_as_rapidjson_writes_them(x, text):
    assert format_double(x) == text
    assert float(text) == x


# (float32 output of cpu_mlp, as Triton 2.51's HTTP endpoint wrote it): Grisu2's digits, which are
# not Python's shortest repr (2.3587534427642822, 0.41583219170570374, ...) but read back the same.
TRITON_WROTE = ["2.3587534427642824", "0.41583219170570376", "-0.49006757140159609", "1.1590299606323243",
                "1.7001383304595948", "-0.16265162825584413", "-0.2916126549243927", "0.067746102809906",
                "-1.275307536125183", "0.08854535222053528"]


@pytest.mark.parametrize("text", TRITON_WROTE)
def test_doubles_get_tritons_digits_not_the_shortest(text):
    assert format_double(float(text)) == text


def test_doubles_read_back_exactly():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(2000).astype(np.float32).astype(np.float64),
                             rng.standard_normal(2000) * 10.0 ** rng.integers(-300, 300, 2000),
                             [5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-7, 123456789012345678.0]])
    for v in values.tolist():
        assert float(format_double(v)) == v
        assert float(format_double(-v)) == -v


def test_json_strings_and_error_bodies():
    assert json_string(b'a"b\\c\n\x1f\x7f/') == b'"a\\"b\\\\c\\n\\u001F\x7f/"'
    assert json.loads(error_body("bad 'x'\n")) == {"error": "bad 'x'\n"}


@pytest.mark.parametrize(
    "accept,enc",
    [(None, "identity"), ("gzip", "gzip"), ("deflate", "deflate"), ("gzip;q=0.5, deflate;q=0.8", "deflate"),
     ("br", "identity"), ("identity, gzip", "identity"), ("gzip;q=x, deflate", "deflate")],
)
def test_response_compression_is_chosen_as_triton_does(accept, enc):
    assert response_encoding(accept) == enc


def test_listener_decompresses_requests_and_compresses_answers_as_asked():
    """The HTTP listener itself, with the gate replaced by a function that echoes the input's rows
    (a pure-logic test of the plumbing; the integration tests use the real gate and Triton)."""
    import asyncio
    import gzip
    import zlib

    import aiohttp

    from plugin.http_front import HttpFront

    seen: list[service_pb2.ModelInferRequest] = []

    async def echo(req: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        seen.append(req)
        r = service_pb2.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
        r.outputs.add(name="Y", datatype=req.inputs[0].datatype, shape=req.inputs[0].shape)
        r.raw_output_contents.append(req.raw_input_contents[0])
        return r

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inp = tch.InferInput("X", [2, 3], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, hl = client_body([inp], request_id="z")

    async def run() -> None:
        from plugin.launcher.triton_server import free_port

        front = HttpFront(echo, f"127.0.0.1:{free_port()}", allow_repository_control=False)  # no Triton there
        port = await front.start("127.0.0.1:0")
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as s:
                url = f"http://127.0.0.1:{port}/v2/models/m/versions/2/infer"
                headers = {"Inference-Header-Content-Length": str(hl), "Content-Encoding": "gzip",
                           "Accept-Encoding": "deflate"}
                async with s.post(url, data=gzip.compress(body), headers=headers) as r:
                    assert r.status == 200 and r.headers["Content-Encoding"] == "deflate"
                    out = zlib.decompress(await r.read())
                    header = int(r.headers["Inference-Header-Content-Length"])
                result = tch.InferResult.from_response_body(out, header_length=header)
                np.testing.assert_array_equal(result.as_numpy("Y"), x)
                assert result.get_response()["id"] == "z" and seen[-1].model_version == "2"
                # Triton unreachable: relayed calls answer 503 with Triton's error body layout
                async with s.get(f"http://127.0.0.1:{port}/v2/health/ready") as r:
                    assert r.status == 503 and "unreachable" in (await r.json())["error"]
                async with s.post(f"http://127.0.0.1:{port}/v2/repository/models/m/load", data=b"{}") as r:
                    assert r.status == 403 and (await r.json())["error"] == refused_message("RepositoryModelLoad")
        finally:
            await front.stop()

    asyncio.run(run())
