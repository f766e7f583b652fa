"""Merging and splitting KServe v2 requests: round trips against a simulated model, keys, errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, model_config_pb2, service_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from plugin.merge import (
    MalformedRequest,
    MergeError,
    RequestValidator,
    SplitError,
    batch_rows,
    merge,
    merge_key,
    split,
    validate_request,
)

# ------------------------------------------------------------------ building requests the client way


def make_request(
    arrays: dict[str, np.ndarray],
    *,
    rid: str = "",
    model: str = "m",
    version: str = "",
    outputs: list[InferRequestedOutput] | None = None,
    priority: int = 0,
    timeout: int | None = None,
    parameters: dict | None = None,
    sequence_id: int = 0,
) -> service_pb2.ModelInferRequest:
    """A request exactly as tritonclient's InferenceServerClient.infer would send it."""
    inputs = []
    for name, arr in arrays.items():
        dtype = "BYTES" if arr.dtype == np.object_ else _np_to_triton(arr.dtype)
        inp = InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return _get_inference_request(
        model_name=model,
        inputs=inputs,
        model_version=version,
        request_id=rid,
        outputs=outputs,
        sequence_id=sequence_id,
        sequence_start=False,
        sequence_end=False,
        priority=priority,
        timeout=timeout,
        parameters=parameters,
    )


def _np_to_triton(dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


_TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def to_typed(req: service_pb2.ModelInferRequest) -> service_pb2.ModelInferRequest:
    """The same request with its data moved into typed ``contents`` (a legal, rarer encoding)."""
    out = service_pb2.ModelInferRequest()
    out.CopyFrom(req)
    out.ClearField("raw_input_contents")
    for t, blob in zip(out.inputs, req.raw_input_contents):
        arr = decode(t.datatype, blob)
        getattr(t.contents, _TYPED_FIELD[t.datatype]).extend(arr.tolist())
    return out


def decode(datatype: str, blob: bytes) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes_tensor(blob)
    return np.frombuffer(blob, dtype=triton_to_np_dtype(datatype))


def encode(arr: np.ndarray) -> bytes:
    if arr.dtype == np.object_:
        s = serialize_byte_tensor(arr)
        return s.item() if s.size else b""
    return arr.tobytes()


def model_fn(arr: np.ndarray) -> np.ndarray:
    """Row-independent toy model: 2x+1 on numbers, not on booleans, x+x+b'1' on bytes."""
    if arr.dtype == np.object_:
        return np.array([x + x + b"1" for x in arr.ravel()], dtype=np.object_).reshape(arr.shape)
    if arr.dtype == np.bool_:
        return ~arr
    return (arr * 2 + 1).astype(arr.dtype)


def fake_triton(req: service_pb2.ModelInferRequest, *, typed_answer: bool = False, version: str = "1",
                extra_output_shape: list[int] | None = None) -> service_pb2.ModelInferResponse:
    """What a model OUT_<x> = model_fn(x) served by Triton answers to ``req`` (raw by default)."""
    resp = service_pb2.ModelInferResponse(model_name=req.model_name, model_version=version, id=req.id)
    resp.parameters["triton_final_response"].bool_param = True
    wanted = [o.name for o in req.outputs] or [f"OUT_{t.name}" for t in req.inputs]
    by_name = {}
    for k, t in enumerate(req.inputs):
        if len(req.raw_input_contents):
            x = decode(t.datatype, req.raw_input_contents[k])
        else:
            x = np.array(list(getattr(t.contents, _TYPED_FIELD[t.datatype])),
                         dtype=triton_to_np_dtype(t.datatype))
        by_name[f"OUT_{t.name}"] = (t.datatype, list(t.shape), model_fn(x.reshape(t.shape)))
    for name in wanted:
        datatype, shape, y = by_name[name]
        o = resp.outputs.add(name=name, datatype=datatype, shape=shape)
        if typed_answer:
            getattr(o.contents, _TYPED_FIELD[datatype]).extend(y.ravel().tolist())
        else:
            resp.raw_output_contents.append(encode(y))
    if extra_output_shape is not None:
        resp.outputs.add(name="STATS", datatype="FP32", shape=extra_output_shape)
        resp.raw_output_contents.append(np.zeros(extra_output_shape, np.float32).tobytes())
    return resp


def sample(dtype: str, rows: int, width: int, rng: np.random.Generator) -> np.ndarray:
    if dtype == "BYTES":
        return np.array(
            [bytes(rng.integers(0, 256, rng.integers(0, 6)).astype(np.uint8)) for _ in range(rows * width)],
            dtype=np.object_,
        ).reshape(rows, width)
    if dtype == "BOOL":
        return rng.integers(0, 2, (rows, width)).astype(bool)
    np_type = triton_to_np_dtype(dtype)
    if np.issubdtype(np_type, np.integer):
        return rng.integers(-1000, 1000, (rows, width)).astype(np_type)
    return rng.standard_normal((rows, width)).astype(np_type)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", ["FP32", "INT64", "FP16", "BOOL", "BYTES", "INT8", "UINT16", "FP64"])
def test_merge_split_round_trip_equals_each_request_answered_alone(dtype):
    rng = np.random.default_rng(7)
    reqs = [make_request({"x": sample(dtype, r, 3, rng)}, rid=f"r{i}", priority=i + 1)
            for i, r in enumerate((1, 3, 2))]
    merged = merge(reqs, request_id="batch-1")
    assert merged.rows == (1, 3, 2) and merged.total_rows == 6
    assert list(merged.request.inputs[0].shape) == [6, 3]
    # the merged tensor is the row-wise concatenation of the callers' tensors
    got = decode(dtype, merged.request.raw_input_contents[0]).reshape(6, 3)
    want = np.concatenate([decode(dtype, r.raw_input_contents[0]).reshape(list(r.inputs[0].shape)) for r in reqs])
    np.testing.assert_array_equal(got, want)
    parts = split(fake_triton(merged.request), merged)
    assert parts == [fake_triton(r) for r in reqs]
    # and the client library reads each part as the direct answer
    for r, p in zip(reqs, parts):
        x = decode(dtype, r.raw_input_contents[0]).reshape(list(r.inputs[0].shape))
        np.testing.assert_array_equal(InferResult(p).as_numpy("OUT_x"), model_fn(x))


def test_multi_input_request_with_requested_outputs_in_their_order():
    rng = np.random.default_rng(1)
    outs = [InferRequestedOutput("OUT_b"), InferRequestedOutput("OUT_a")]
    reqs = [
        make_request({"a": sample("FP32", r, 4, rng), "b": sample("BYTES", r, 2, rng)}, rid=f"q{r}", outputs=outs)
        for r in (2, 1, 4)
    ]
    merged = merge(reqs)
    assert [o.name for o in merged.request.outputs] == ["OUT_b", "OUT_a"]
    assert merged.request.id == ""
    parts = split(fake_triton(merged.request), merged)
    assert parts == [fake_triton(r) for r in reqs]
    assert [o.name for o in parts[0].outputs] == ["OUT_b", "OUT_a"]


def test_single_request_passes_through_unchanged_in_content():
    rng = np.random.default_rng(2)
    req = make_request({"x": sample("FP32", 5, 16, rng)}, rid="solo", version="3")
    merged = merge([req], request_id="m")
    assert merged.request.raw_input_contents == req.raw_input_contents
    assert list(merged.request.inputs[0].shape) == [5, 16] and merged.request.model_version == "3"
    assert split(fake_triton(merged.request), merged) == [fake_triton(req)]


@pytest.mark.parametrize("dtype", ["FP32", "INT32", "INT64", "UINT8", "BOOL", "BYTES", "FP64", "UINT64", "INT8"])
def test_typed_contents_are_converted_to_raw_and_merge_with_raw_requests(dtype):
    rng = np.random.default_rng(3)
    raw = [make_request({"x": sample(dtype, r, 2, rng)}, rid=f"r{r}") for r in (1, 3, 2)]
    mixed = [raw[0], to_typed(raw[1]), to_typed(raw[2])]
    assert not mixed[1].raw_input_contents and mixed[1].inputs[0].HasField("contents")
    assert merge_key(mixed[1]) == merge_key(raw[1])
    merged = merge(mixed)
    assert not any(t.HasField("contents") for t in merged.request.inputs)
    assert merged.request.raw_input_contents == merge(raw).request.raw_input_contents
    assert split(fake_triton(merged.request), merged) == [fake_triton(r) for r in raw]


def test_typed_response_is_split_into_typed_parts():
    rng = np.random.default_rng(4)
    reqs = [make_request({"x": sample("FP32", r, 3, rng), "s": sample("BYTES", r, 1, rng)}, rid=f"t{r}")
            for r in (3, 1, 2)]
    merged = merge(reqs)
    parts = split(fake_triton(merged.request, typed_answer=True), merged)
    assert parts == [fake_triton(r, typed_answer=True) for r in reqs]
    assert not parts[0].raw_output_contents and len(parts[0].outputs[0].contents.fp32_contents) == 9


def test_split_keeps_ids_response_parameters_and_resolved_version():
    rng = np.random.default_rng(5)
    reqs = [make_request({"x": sample("FP32", 1, 2, rng)}, rid=rid) for rid in ("a", "", "c")]
    merged = merge(reqs, request_id="gate-7")
    resp = fake_triton(merged.request, version="2")
    resp.parameters["custom"].string_param = "kept"
    parts = split(resp, merged)
    assert [p.id for p in parts] == ["a", "", "c"]
    assert all(p.model_version == "2" and p.model_name == "m" for p in parts)
    assert all(p.parameters["custom"].string_param == "kept" for p in parts)
    assert all(p.parameters["triton_final_response"].bool_param for p in parts)


def test_merged_request_drops_per_caller_parameters_and_keeps_shared_ones():
    rng = np.random.default_rng(6)
    reqs = [make_request({"x": sample("FP32", 1, 2, rng)}, priority=p, timeout=t, parameters={"mode": "fast"})
            for p, t in ((1, 100), (2, None), (0, 5000))]
    assert len({merge_key(r) for r in reqs}) == 1
    params = merge(reqs).request.parameters
    assert "priority" not in params and "timeout" not in params
    assert params["mode"].string_param == "fast"


def test_bytes_rows_with_empty_and_long_elements_split_at_element_boundaries():
    a = np.array([[b""], [b"x" * 300]], dtype=np.object_)
    b = np.array([[b"\x00\x01"]], dtype=np.object_)
    c = np.array([[b""], [b""], [b"end"]], dtype=np.object_)
    reqs = [make_request({"s": v}, rid=str(i)) for i, v in enumerate((a, b, c))]
    merged = merge(reqs)
    parts = split(fake_triton(merged.request), merged)
    for v, p in zip((a, b, c), parts):
        np.testing.assert_array_equal(InferResult(p).as_numpy("OUT_s"), model_fn(v))


# ------------------------------------------------------------------ merge keys


def _key(**kw):
    rng = np.random.default_rng(0)
    arrays = kw.pop("arrays", None) or {"x": sample("FP32", 2, 4, rng)}
    return merge_key(make_request(arrays, **kw))


def test_compatible_requests_share_a_key_regardless_of_rows_id_priority_timeout():
    rng = np.random.default_rng(0)
    k1 = merge_key(make_request({"x": sample("FP32", 1, 4, rng)}, rid="a", priority=1, timeout=10))
    k2 = merge_key(make_request({"x": sample("FP32", 7, 4, rng)}, rid="b"))
    assert k1 is not None and k1 == k2
    assert hash(k1) == hash(k2)


def test_incompatible_requests_get_different_keys():
    rng = np.random.default_rng(0)
    base = _key()
    variants = {
        "shape": _key(arrays={"x": sample("FP32", 2, 5, rng)}),
        "rank": _key(arrays={"x": sample("FP32", 2, 4, rng).reshape(2, 2, 2)}),
        "dtype": _key(arrays={"x": sample("FP64", 2, 4, rng)}),
        "input name": _key(arrays={"y": sample("FP32", 2, 4, rng)}),
        "input set": _key(arrays={"x": sample("FP32", 2, 4, rng), "y": sample("FP32", 2, 4, rng)}),
        "model": _key(model="other"),
        "version": _key(version="2"),
        "outputs": _key(outputs=[InferRequestedOutput("OUT_x")]),
        "classification": _key(outputs=[InferRequestedOutput("OUT_x", class_count=3)]),
        "custom parameter": _key(parameters={"mode": "slow"}),
        "custom parameter type": _key(parameters={"mode": 1}),
        "custom parameter bool": _key(parameters={"mode": True}),  # True == 1 in Python: kind must count
    }
    assert all(v is not None for v in variants.values())
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants), "each variant must be its own class"
    # input order matters too: the merged request lists inputs in one order
    xy = {"x": sample("FP32", 2, 4, rng), "y": sample("INT64", 2, 1, rng)}
    assert merge_key(make_request(xy)) != merge_key(make_request(dict(reversed(list(xy.items())))))
    # output parameter values matter
    assert _key(outputs=[InferRequestedOutput("OUT_x", class_count=3)]) != _key(
        outputs=[InferRequestedOutput("OUT_x", class_count=2)])


def test_requests_that_must_go_alone_have_no_key():
    rng = np.random.default_rng(0)
    assert _key(sequence_id=42) is None
    assert merge_key(make_request({"x": np.zeros((0, 4), np.float32)})) is None  # empty batch
    assert merge_key(make_request({})) is None
    assert merge_key(make_request({"x": sample("FP32", 2, 4, rng), "y": sample("FP32", 3, 4, rng)})) is None
    shm_in = make_request({"x": sample("FP32", 2, 4, rng)})
    shm_in.inputs[0].parameters["shared_memory_region"].string_param = "r0"
    assert merge_key(shm_in) is None
    out = InferRequestedOutput("OUT_x")
    out.set_shared_memory("r1", 32)
    assert _key(outputs=[out]) is None
    scalar = make_request({"x": sample("FP32", 2, 4, rng)})
    scalar.inputs[0].ClearField("shape")
    assert merge_key(scalar) is None
    odd = make_request({"x": sample("FP32", 2, 4, rng)})
    odd.inputs[0].datatype = "FP8"
    assert merge_key(odd) is None


def test_merge_refuses_different_keys_unmergeable_requests_and_too_many_rows():
    rng = np.random.default_rng(0)
    a = make_request({"x": sample("FP32", 2, 4, rng)}, rid="a")
    b = make_request({"x": sample("FP32", 2, 5, rng)}, rid="b")
    with pytest.raises(MergeError, match="'b'"):
        merge([a, b])
    with pytest.raises(MergeError, match="alone"):
        merge([make_request({"x": sample("FP32", 2, 4, rng)}, rid="s", sequence_id=3)])
    with pytest.raises(MergeError, match="exceeds max_batch_size 3"):
        merge([a, a], max_batch_size=3)
    assert merge([a, a], max_batch_size=4).total_rows == 4 == 2 * batch_rows(a)
    with pytest.raises(MergeError):
        merge([])


# ------------------------------------------------------------------ malformed data


def _fp32_req(rid="bad"):
    return make_request({"x": np.ones((2, 4), np.float32)}, rid=rid)


def test_short_raw_blob_is_refused_naming_request_input_and_sizes():
    good, bad = _fp32_req("ok"), _fp32_req("bad")
    bad.raw_input_contents[0] = bad.raw_input_contents[0][:-4]
    with pytest.raises(MalformedRequest, match=r"\[request id: bad\].*'x'.*Expected 32, got 28") as e:
        merge([good, bad])
    assert "bad" in e.value.message


def test_malformed_bytes_tensors_are_refused():
    req = make_request({"s": np.array([[b"abc"], [b"de"]], dtype=np.object_)}, rid="b1")
    truncated = service_pb2.ModelInferRequest()
    truncated.CopyFrom(req)
    truncated.raw_input_contents[0] = req.raw_input_contents[0][:-1]
    with pytest.raises(MalformedRequest, match=r"b1.*'s'.*beyond the 12 bytes"):
        merge([truncated])
    extra = service_pb2.ModelInferRequest()
    extra.CopyFrom(req)
    extra.raw_input_contents[0] = req.raw_input_contents[0] + struct.pack("<I", 1) + b"z"
    with pytest.raises(MalformedRequest, match=r"expected 2 string elements.*got 3"):
        merge([extra])
    prefix = service_pb2.ModelInferRequest()
    prefix.CopyFrom(req)
    prefix.raw_input_contents[0] = req.raw_input_contents[0] + b"\x01\x00"
    with pytest.raises(MalformedRequest, match="truncated length prefix at byte 13"):
        merge([prefix])


def test_raw_count_mixed_encodings_and_typed_count_are_checked():
    rng = np.random.default_rng(0)
    two = make_request({"x": sample("FP32", 1, 2, rng), "y": sample("FP32", 1, 2, rng)}, rid="two")
    del two.raw_input_contents[1]
    with pytest.raises(MalformedRequest, match="expected 2 raw_input_contents.*got 1"):
        merge([two])
    both = _fp32_req("both")
    both.inputs[0].contents.fp32_contents.extend([1.0] * 8)
    with pytest.raises(MalformedRequest, match="contents field must not be specified"):
        merge([both])
    typed = to_typed(_fp32_req("typed"))
    del typed.inputs[0].contents.fp32_contents[-1]
    with pytest.raises(MalformedRequest, match=r"typed.*expected 8 elements.*got 7"):
        merge([typed])
    wrong_field = to_typed(_fp32_req("wf"))
    wrong_field.inputs[0].contents.int_contents.append(1)
    with pytest.raises(MalformedRequest, match="int_contents"):
        merge([wrong_field])
    half = to_typed(make_request({"x": np.ones((1, 2), np.float32)}, rid="h"))
    half.inputs[0].datatype = "FP16"
    with pytest.raises(MalformedRequest, match="raw_input_contents"):
        merge([half])


# ------------------------------------------------------------------ split errors


def test_output_without_batch_dimension_cannot_be_split_and_nothing_is_built():
    rng = np.random.default_rng(0)
    reqs = [make_request({"x": sample("FP32", r, 2, rng)}) for r in (1, 2)]
    merged = merge(reqs)
    for shape in ([4], [], [2, 3]):
        with pytest.raises(SplitError, match=r"STATS.*not the batch dimension.*3 rows"):
            split(fake_triton(merged.request, extra_output_shape=shape), merged)
    # an output whose dim 0 equals the batch size is taken as batched
    parts = split(fake_triton(merged.request, extra_output_shape=[3, 5]), merged)
    assert [list(p.outputs[1].shape) for p in parts] == [[1, 5], [2, 5]]


def test_inconsistent_response_sizes_raise_split_error():
    rng = np.random.default_rng(0)
    merged = merge([make_request({"x": sample("FP32", r, 2, rng)}) for r in (1, 2)])
    resp = fake_triton(merged.request)
    resp.raw_output_contents[0] = resp.raw_output_contents[0][:-4]
    with pytest.raises(SplitError, match="holds 20 bytes.*needs 24"):
        split(resp, merged)
    resp = fake_triton(merged.request)
    resp.raw_output_contents.append(b"")
    with pytest.raises(SplitError, match="1 outputs but 2 raw"):
        split(resp, merged)


# ------------------------------------------------------------------ validation against the config

CONFIG = """
name: "m"
max_batch_size: 8
input [
  { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] },
  { name: "s" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "opt" data_type: TYPE_INT64 dims: [ 2 ] optional: true }
]
output [
  { name: "OUT_x" data_type: TYPE_FP32 dims: [ -1, 4 ] },
  { name: "OUT_s" data_type: TYPE_STRING dims: [ 1 ] }
]
"""

NONBATCH = """
name: "nb"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT32 dims: [ 3 ] } ]
output [ { name: "y" data_type: TYPE_INT32 dims: [ 3 ] } ]
"""


def config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _valid(rows=2, width=3, **kw):
    x = np.ones((rows, width, 4), np.float32)
    s = np.array([[b"hi"]] * rows, dtype=np.object_)
    return make_request({"x": x, "s": s, **kw.pop("extra", {})}, rid="v", **kw)


def test_valid_requests_pass_validation():
    cfg = config(CONFIG)
    validate_request(_valid(), cfg)
    validate_request(_valid(rows=8, width=1), cfg)  # -1 wildcard, max batch
    validate_request(_valid(extra={"opt": np.zeros((2, 2), np.int64)}), cfg)
    validate_request(_valid(outputs=[InferRequestedOutput("OUT_s")]), cfg)
    validate_request(to_typed(_valid()), cfg)
    validate_request(make_request({"x": np.arange(3, dtype=np.int32)}), config(NONBATCH))


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: _valid(extra={"zz": np.ones((2, 1), np.float32)}),
         r"\[request id: v\] unexpected inference input 'zz' for model 'm', allowed inputs are: x, s, opt"),
        (lambda: make_request({"x": np.ones((2, 3, 4), np.float32)}, rid="v"),
         r"expected 3 inputs but got 1 inputs.*missing required input\(s\) \['s'\]"),
        (lambda: make_request({"x": np.ones((2, 3, 4), np.float64), "s": np.array([[b"a"]] * 2, dtype=object)}),
         r"\[request id: <id_unknown>\] inference input 'x' data-type is 'FP64', but model 'm' expects 'FP32'"),
        (lambda: make_request({"x": np.ones((2, 3, 5), np.float32), "s": np.array([[b"a"]] * 2, dtype=object)}),
         r"unexpected shape for input 'x' for model 'm'. Expected \[-1,-1,4\], got \[2,3,5\]"),
        (lambda: make_request({"x": np.ones((3, 4), np.float32), "s": np.array([[b"a"]] * 3, dtype=object)}),
         r"Expected \[-1,-1,4\], got \[3,4\].*batch dimension"),
        (lambda: _valid(rows=9), r"batch-size must be <= 8 for 'm'"),
        (lambda: make_request({"x": np.ones((2, 3, 4), np.float32), "s": np.array([[b"a"]] * 3, dtype=object)}),
         r"input 's' batch size does not match other inputs for 'm'"),
        (lambda: _valid(outputs=[InferRequestedOutput("nope")]),
         r"unexpected inference output 'nope' for model 'm', allowed outputs are: OUT_x, OUT_s"),
        (lambda: _valid(extra={"opt": np.zeros((2, 2), np.int32)}), r"'opt' data-type is 'INT32'.*expects 'INT64'"),
    ],
)
def test_invalid_requests_are_refused_with_triton_like_messages(build, pattern):
    with pytest.raises(MalformedRequest, match=pattern):
        validate_request(build(), config(CONFIG))


def test_validation_checks_data_sizes_and_non_batching_shapes():
    cfg = config(CONFIG)
    short = _valid()
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    with pytest.raises(MalformedRequest, match=r"input byte size mismatch for input 'x'.*Expected 96, got 95"):
        validate_request(short, cfg)
    strings = _valid()
    strings.raw_input_contents[1] = strings.raw_input_contents[1] + struct.pack("<I", 0)
    with pytest.raises(MalformedRequest, match="expected 2 string elements for input 's'.*got 3"):
        validate_request(strings, cfg)
    dup = _valid()
    dup.inputs.append(dup.inputs[0])
    with pytest.raises(MalformedRequest, match="input 'x' already exists"):
        validate_request(dup, cfg)
    with pytest.raises(MalformedRequest, match=r"Expected \[3\], got \[1,3\]\.$"):
        validate_request(make_request({"x": np.ones((1, 3), np.int32)}), config(NONBATCH))


def test_validation_checks_shared_memory_byte_size_without_data():
    cfg = config(NONBATCH)
    inp = InferInput("x", [3], "INT32")
    inp.set_shared_memory("region", 12)
    req = _get_inference_request("nb", [inp], "", "shm", None, 0, False, False, 0, None, None)
    validate_request(req, cfg)  # no raw data expected for a shared-memory input
    assert merge_key(req) is None
    inp.set_shared_memory("region", 8)
    req = _get_inference_request("nb", [inp], "", "shm", None, 0, False, False, 0, None, None)
    with pytest.raises(MalformedRequest, match="Expected 12, got 8"):
        validate_request(req, cfg)


NUMERIC = """
name: "n"
max_batch_size: 8
input [
  { name: "x" data_type: TYPE_FP32 dims: [ -1, 4 ] },
  { name: "opt" data_type: TYPE_INT64 dims: [ 2 ] optional: true }
]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
"""


def _numeric_variants() -> list[service_pb2.ModelInferRequest]:
    """Requests of one model's shapes, valid and not, some differing from a valid one only in what
    ``check_shaped``'s shape must hold: a blob's length, typed contents beside raw, rows."""
    def req(rows=2, width=3, **kw):
        return make_request({"x": np.ones((rows, width, 4), np.float32), **kw.pop("extra", {})}, rid="v", model="n",
                            **kw)

    short = req()
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    both = req()
    both.inputs[0].contents.fp32_contents.extend([1.0] * 24)
    typed_short = to_typed(req())
    del typed_short.inputs[0].contents.fp32_contents[-1]
    dup = req()
    dup.inputs.append(dup.inputs[0])
    dup.raw_input_contents.append(dup.raw_input_contents[0])
    return [req(), short, both, req(rows=9), req(rows=8), req(width=5), to_typed(req()), typed_short, dup,
            req(outputs=[InferRequestedOutput("y")]), req(outputs=[InferRequestedOutput("nope")]),
            req(extra={"opt": np.zeros((2, 2), np.int64)}), req(extra={"opt": np.zeros((2, 3), np.int64)}),
            req(extra={"opt": np.zeros((2, 2), np.int32)}), req(priority=1), req(sequence_id=7)]


def _outcome(check, req) -> str | None:
    try:
        check(req)
    except MalformedRequest as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("text, variants", [(NUMERIC, _numeric_variants), (CONFIG, lambda: [
    _valid(), _valid(rows=9), _valid(extra={"opt": np.zeros((2, 2), np.int64)})])])
def test_a_shape_that_passed_is_not_checked_again_and_every_request_gets_checks_answer(text, variants, monkeypatch):
    """``check_shaped`` answers every request as ``check`` does (the same message for a refusal),
    when each shape is new and again when every passing shape is remembered; with BYTES inputs
    (whose blobs are checked element by element) it checks every request."""
    cfg = config(text)
    requests = variants()
    expected = [_outcome(RequestValidator(cfg).check, r) for r in requests]
    assert None in expected and any(e is not None for e in expected)
    shaped = RequestValidator(cfg)

    def check(r):
        shape = r.inputs[0].shape
        shaped.check_shaped(r, merge_key(r), int(shape[0]) if shape else 1)

    for _ in range(2):
        assert [_outcome(check, r) for r in requests] == expected
    if text == NUMERIC:
        assert len(shaped._passed) == 5  # req() (and with a priority), rows=8, width 5, y asked for, opt; not
        # the typed or sequence ones
        def checked(self, r):
            raise AssertionError("checked again")

        monkeypatch.setattr(RequestValidator, "check", checked)
        check(requests[0])  # a remembered shape is not checked again
        with pytest.raises(AssertionError, match="checked again"):
            check(requests[3])  # a refused one is
    else:
        assert not shaped._passed
    strings = _valid()
    strings.raw_input_contents[1] = strings.raw_input_contents[1] + struct.pack("<I", 0)
    if text == CONFIG:  # a remembered shape's BYTES blob with one element too many
        with pytest.raises(MalformedRequest, match="expected 2 string elements"):
            check(strings)


def test_single_request_fast_path_drops_per_caller_parameters_and_sets_the_batch_id():
    req = make_request({"x": np.ones((2, 3), np.float32)}, rid="own", priority=2, timeout=900,
                       parameters={"mode": "fast"})
    merged = merge([req], request_id="gate-1")
    got = merged.request
    assert got.id == "gate-1" and merged.ids == ("own",) and merged.rows == (2,)
    assert set(got.parameters) == {"mode"}
    assert req.parameters["priority"].uint64_param == 2, "the caller's request is left untouched"
    assert split(fake_triton(got), merged)[0].id == "own"


def test_checked_merge_builds_the_same_request_as_the_checking_one():
    rng = np.random.default_rng(8)
    reqs = [make_request({"x": sample("INT64", r, 3, rng), "s": sample("BYTES", r, 2, rng)}, rid=str(r))
            for r in (2, 1, 3)]
    assert merge(reqs, checked=True, request_id="b") == merge(reqs, request_id="b")
