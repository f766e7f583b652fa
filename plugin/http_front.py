"""Triton's HTTP/REST protocol (KServe v2) in front of the gate, on either data plane.

An inference request that arrives over HTTP is translated into the ``ModelInferRequest`` that the
same call would have been over gRPC, and submitted into the same per-model gate (one queue, one
policy, one rate estimate for both protocols): in-process on the Python data plane, through the
native gate's gRPC port on the native one. Its answer is translated back into what Triton's own HTTP
endpoint writes for that request (JSON or Triton's binary-tensor extension, ``binary_data_output``
and per-output ``binary_data`` honoured, shared-memory outputs left in their region), so a caller
sees the same body as from Triton itself.

Everything else (health, server and model metadata, config, statistics, repository index,
shared-memory registration, ...) is relayed to Triton's HTTP endpoint byte for byte; repository
load/unload is refused unless ``allow_repository_control``, as on gRPC.

Two cases are relayed to Triton as they came, so that the caller gets exactly Triton's answer:
a request this translator cannot carry (malformed JSON, a wrong element type, raw binary bodies, ...
Triton answers them with its own error, or serves them, un-gated), and one whose model Triton does
not know (Triton's own 404 and message). Errors raised here use Triton's HTTP codes and its
``{"error": "..."}`` body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import struct
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import Awaitable, Callable, Mapping

import aiohttp
import grpc
import numpy as np
from aiohttp import web
from tritonclient.grpc import service_pb2

from .config import SidecarConfig
from .repository_control import refused_message

log = logging.getLogger("smdp.http")

Submit = Callable[[service_pb2.ModelInferRequest], Awaitable[service_pb2.ModelInferResponse]]
"""Submits one request into the gate; returns the response or raises ``GateError``."""

INFER_HEADER = "Inference-Header-Content-Length"
# Triton's default --http-max-input-size (64 MiB): bodies above it are refused there too.
MAX_BODY = 64 * 1024 * 1024
_JSON = "application/json"

# Triton's HttpCodeFromError, keyed by the gRPC status the same error carries on gRPC (Triton's gRPC
# frontend maps INTERNAL, NOT_FOUND, UNAVAILABLE, UNSUPPORTED->UNIMPLEMENTED, INVALID_ARG,
# ALREADY_EXISTS, CANCELLED, UNKNOWN one to one). Codes only the sidecar emits: RESOURCE_EXHAUSTED
# (the gate's queue is full) is 503 as Triton answers its own full queue; PERMISSION_DENIED (a
# refused repository call) is 403 as Triton answers a restricted API; DEADLINE_EXCEEDED (the
# upstream deadline) is 503 as Triton answers a request whose timeout expired.
_HTTP_STATUS = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}


def http_status(code: grpc.StatusCode) -> int:
    """Triton's HTTP status for an error that gRPC reports with ``code`` (400 when no closer one)."""
    return _HTTP_STATUS.get(code, 400)


class Untranslatable(Exception):
    """This request is not carried by the translator: it goes to Triton as it came."""


class OutputKind(Enum):
    JSON = "json"
    BINARY = "binary"
    SHM = "shm"


@dataclass(frozen=True)
class OutputPlan:
    """How each output goes back to the caller, as Triton's HTTP endpoint decides it."""

    default: OutputKind
    """Outputs the request did not list (``binary_data_output`` in the request's parameters)."""
    named: Mapping[str, OutputKind]
    """Outputs the request listed: binary when their ``binary_data`` says so, else JSON or SHM."""

    def kind(self, name: str) -> OutputKind:
        return self.named.get(name, self.default)


# -- request: HTTP (KServe v2 JSON + binary extension) -> ModelInferRequest ------------------------

_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
_DATATYPES = frozenset(_NUMPY) | {"BYTES", "BF16"}
_SHM_KEYS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")


def _flatten(data: list) -> list:
    if not any(type(x) is list for x in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if type(x) is list:
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _is_uint(v: object) -> bool:
    return type(v) is int and 0 <= v < 2**64


def _json_tensor(datatype: str, data: object, count: int) -> bytes:
    """The raw bytes of a JSON ``data`` array, as Triton's ReadDataFromJson reads it."""
    if type(data) is not list:
        raise Untranslatable("'data' is not an array")
    flat = _flatten(data)
    if len(flat) != count:
        raise Untranslatable("shape does not match the data")
    kinds = set(map(type, flat))
    if datatype == "BYTES":
        if kinds - {str}:
            raise Untranslatable("BYTES data must be strings")
        parts = []
        for s in flat:
            b = s.encode("utf-8", "surrogatepass")
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    if datatype == "BOOL":
        if kinds - {bool}:
            raise Untranslatable("BOOL data must be true/false")
        return np.asarray(flat, dtype=np.bool_).tobytes()
    dtype = np.dtype(_NUMPY[datatype])
    try:
        if dtype.kind == "f":
            if kinds - {int, float}:
                raise Untranslatable("data must be numbers")
            return np.asarray(flat, dtype=np.float64).astype(dtype).tobytes()
        if kinds - {int}:
            raise Untranslatable("data must be integers")
        if dtype.kind == "u" and flat and min(flat) < 0:
            raise Untranslatable("unsigned data must not be negative")
        wide = np.asarray(flat, dtype=np.uint64 if dtype.kind == "u" else np.int64)
    except (OverflowError, ValueError) as exc:
        raise Untranslatable(str(exc)) from None
    return wide.astype(dtype).tobytes()


def _set_param(p: service_pb2.InferParameter, value: object) -> None:
    """A request parameter as Triton's SetTritonParameterFromJsonParameter types it."""
    if type(value) is str:
        p.string_param = value
    elif type(value) is bool:
        p.bool_param = value
    elif type(value) is int and -(2**63) <= value < 2**63:
        p.int64_param = value
    elif type(value) in (int, float):
        p.double_param = float(value)
    else:
        raise Untranslatable("parameter of an invalid type")


def decode_request(
    model: str, version: str, body: bytes, header_length: int | None
) -> tuple[service_pb2.ModelInferRequest, OutputPlan]:
    """The gRPC request equal to an HTTP infer request, and how its outputs go back.

    ``body``: the (decompressed) request body; ``header_length``: ``Inference-Header-Content-Length``
    (None: absent, the whole body is JSON). Raises ``Untranslatable`` for anything Triton would refuse
    or that this translator does not carry (Triton then answers the request itself)."""
    if header_length is None:
        header_length = len(body)
    if header_length == 0 or header_length > len(body):
        raise Untranslatable("raw binary request or bad header length")
    try:
        doc = json.loads(body[:header_length])
    except (ValueError, UnicodeDecodeError):
        raise Untranslatable("malformed JSON") from None
    if type(doc) is not dict or type(doc.get("inputs")) is not list:
        raise Untranslatable("no 'inputs' array")
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        if type(doc["id"]) is not str:
            raise Untranslatable("'id' is not a string")
        req.id = doc["id"]
    default = OutputKind.JSON
    params = doc.get("parameters")
    if params is not None:
        if type(params) is not dict:
            raise Untranslatable("'parameters' is not an object")
        for key, value in params.items():
            if key == "binary_data_output":
                if type(value) is not bool:
                    raise Untranslatable("bad binary_data_output")
                default = OutputKind.BINARY if value else OutputKind.JSON
            elif key == "sequence_id":
                if _is_uint(value):
                    if value < 2**63:
                        req.parameters[key].int64_param = value
                    else:
                        req.parameters[key].uint64_param = value
                elif type(value) is str:
                    req.parameters[key].string_param = value
                else:
                    raise Untranslatable("bad sequence_id")
            elif key in ("sequence_start", "sequence_end"):
                if type(value) is not bool:
                    raise Untranslatable(f"bad {key}")
                if value:
                    req.parameters[key].bool_param = True
            elif key in ("priority", "timeout"):
                if not _is_uint(value) or (key == "timeout" and value >= 2**63):
                    raise Untranslatable(f"bad {key}")
                if key == "priority":
                    req.parameters[key].uint64_param = value
                else:
                    req.parameters[key].int64_param = value
            elif key.startswith("triton_"):
                raise Untranslatable("reserved parameter")
            else:
                _set_param(req.parameters[key], value)
    pos = header_length
    for spec in doc["inputs"]:
        if type(spec) is not dict:
            raise Untranslatable("input is not an object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if type(name) is not str or datatype not in _DATATYPES or type(shape) is not list:
            raise Untranslatable("bad input name, datatype or shape")
        if not all(_is_uint(d) and d < 2**63 for d in shape):
            raise Untranslatable("bad shape")
        iparams = spec.get("parameters") or {}
        if type(iparams) is not dict:
            raise Untranslatable("bad input parameters")
        has_binary = "binary_data_size" in iparams
        has_shm = "shared_memory_region" in iparams
        if ("data" in spec) + has_binary + has_shm != 1:
            raise Untranslatable("input must set exactly one of data, binary_data_size, shared_memory_region")
        tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if has_shm:
            region = iparams["shared_memory_region"]
            if type(region) is not str:
                raise Untranslatable("bad shared_memory_region")
            tensor.parameters["shared_memory_region"].string_param = region
            for key in _SHM_KEYS[1:]:
                if key in iparams:
                    if not _is_uint(iparams[key]) or iparams[key] >= 2**63:
                        raise Untranslatable(f"bad {key}")
                    tensor.parameters[key].int64_param = iparams[key]
            continue
        if has_binary:
            size = iparams["binary_data_size"]
            if not _is_uint(size) or pos + size > len(body):
                raise Untranslatable("bad binary_data_size")
            req.raw_input_contents.append(body[pos:pos + size])
            pos += size
            continue
        if datatype in ("FP16", "BF16"):
            raise Untranslatable("FP16/BF16 data via JSON")
        count = 1
        for d in shape:
            count *= d
        req.raw_input_contents.append(b"" if count == 0 else _json_tensor(datatype, spec["data"], count))
    if pos != len(body):
        raise Untranslatable("unexpected additional input data")
    named: dict[str, OutputKind] = {}
    outputs = doc.get("outputs")
    if outputs is not None:
        if type(outputs) is not list:
            raise Untranslatable("'outputs' is not an array")
        for spec in outputs:
            if type(spec) is not dict or type(spec.get("name")) is not str:
                raise Untranslatable("bad output")
            oparams = spec.get("parameters") or {}
            if type(oparams) is not dict:
                raise Untranslatable("bad output parameters")
            out = req.outputs.add(name=spec["name"])
            binary = oparams.get("binary_data", False)
            if type(binary) is not bool:
                raise Untranslatable("bad binary_data")
            if "classification" in oparams:
                if not _is_uint(oparams["classification"]) or oparams["classification"] >= 2**63:
                    raise Untranslatable("bad classification")
                if "shared_memory_region" in oparams:
                    raise Untranslatable("classification with shared memory")
                out.parameters["classification"].int64_param = oparams["classification"]
            if "shared_memory_region" in oparams:
                if binary or type(oparams["shared_memory_region"]) is not str:
                    raise Untranslatable("bad shared-memory output")
                out.parameters["shared_memory_region"].string_param = oparams["shared_memory_region"]
                for key in _SHM_KEYS[1:]:
                    if key in oparams:
                        if not _is_uint(oparams[key]) or oparams[key] >= 2**63:
                            raise Untranslatable(f"bad {key}")
                        out.parameters[key].int64_param = oparams[key]
                named[spec["name"]] = OutputKind.SHM
            else:
                named[spec["name"]] = OutputKind.BINARY if binary else OutputKind.JSON
    return req, OutputPlan(default, named)


# -- response: ModelInferResponse -> Triton's HTTP body --------------------------------------------

_ESCAPE = re.compile(rb'[\x00-\x1f"\\]')
_SHORT = {0x08: b"\\b", 0x09: b"\\t", 0x0A: b"\\n", 0x0C: b"\\f", 0x0D: b"\\r", 0x22: b'\\"', 0x5C: b"\\\\"}


def _escape_char(m: re.Match) -> bytes:
    c = m.group()[0]
    return _SHORT.get(c) or b"\\u%04X" % c


def json_string(raw: bytes) -> bytes:
    """A JSON string as rapidjson (Triton's writer) writes it: bytes as they are, only control
    characters, quote and backslash escaped."""
    return b'"' + _ESCAPE.sub(_escape_char, raw) + b'"'


# -- doubles as Triton writes them ----------------------------------------------------------------
# Triton writes JSON with rapidjson, whose Writer::Double is Grisu2 (Loitsch 2010). Grisu2 does not
# always pick the shortest or the closest of the digit strings that read back as the same double, so
# Python's repr (shortest, closest) differs from Triton in the last digit now and then. What follows
# is rapidjson's Grisu2 and Prettify (internal/dtoa.h, diyfp.h), as in the rapidjson release Triton
# 2.51 is built with (before rapidjson's 2021 change to DigitGen's last rounding step, which that
# release skips when more than 8 fraction digits were generated: _GRISU_ROUND_DIGITS).

_M64 = (1 << 64) - 1
_HIDDEN = 1 << 52
_POW10 = [10**i for i in range(20)]
_GRISU_ROUND_DIGITS = 9


def _cached_power(k: int) -> tuple[int, int]:
    """10^k as a normalised 64-bit DiyFp (f, e), f * 2^e rounded to nearest (rapidjson's table)."""
    if k >= 0:
        v = 10**k
        e = v.bit_length() - 64
        if e <= 0:
            return v << -e, e
        return (v + (1 << (e - 1))) >> e, e
    d = 10**-k
    s = 63 + d.bit_length()
    f = ((1 << s) + d // 2) // d
    if f >> 64:
        s -= 1
        f = ((1 << s) + d // 2) // d
    return f, -s


_CACHED = [_cached_power(-348 + 8 * i) for i in range(87)]


def _mul(af: int, ae: int, bf: int, be: int) -> tuple[int, int]:
    p = af * bf
    return ((p >> 64) + ((p >> 63) & 1)) & _M64, ae + be + 64


def _grisu_round(digits: list[int], delta: int, rest: int, ten_kappa: int, wp_w: int) -> None:
    while rest < wp_w and delta - rest >= ten_kappa and (
            rest + ten_kappa < wp_w or wp_w - rest > rest + ten_kappa - wp_w):
        digits[-1] -= 1
        rest += ten_kappa


def grisu2(value: float) -> tuple[str, int]:
    """rapidjson's Grisu2 of a positive finite double: (digits, K), value ~ digits x 10^K."""
    (u,) = struct.unpack("<Q", struct.pack("<d", value))
    biased = (u >> 52) & 0x7FF
    f, e = ((u & (_HIDDEN - 1)) + _HIDDEN, biased - 1075) if biased else (u & (_HIDDEN - 1), -1074)
    pf, pe = (f << 1) + 1, e - 1  # the upper boundary, normalised
    shift = 54 - pf.bit_length()
    pf, pe = pf << (shift + 10), pe - shift - 10
    mf, me = ((f << 2) - 1, e - 2) if f == _HIDDEN else ((f << 1) - 1, e - 1)
    mf <<= me - pe
    dk = (-61 - pe) * 0.30102999566398114 + 347
    k = int(dk)
    if dk - k > 0.0:
        k += 1
    index = (k >> 3) + 1
    K = 348 - (index << 3)
    cf, ce = _CACHED[index]
    s = 64 - f.bit_length()
    wf, _ = _mul(f << s, e - s, cf, ce)
    wpf, wpe = _mul(pf, pe, cf, ce)
    wmf, _ = _mul(mf, pe, cf, ce)
    wpf -= 1
    delta = (wpf - wmf - 1) & _M64
    one_shift = -wpe
    one_f = 1 << one_shift
    wp_w = (wpf - wf) & _M64
    p1 = wpf >> one_shift
    p2 = wpf & (one_f - 1)
    kappa = len(str(p1))
    digits: list[int] = []
    while kappa > 0:
        d, p1 = divmod(p1, _POW10[kappa - 1])
        if d or digits:
            digits.append(d)
        kappa -= 1
        tmp = (p1 << one_shift) + p2
        if tmp <= delta:
            _grisu_round(digits, delta, tmp, _POW10[kappa] << one_shift, wp_w)
            return "".join(map(str, digits)), K + kappa
    while True:
        p2 *= 10
        delta *= 10
        d = p2 >> one_shift
        if d or digits:
            digits.append(d)
        p2 &= one_f - 1
        kappa -= 1
        if p2 < delta:
            n = -kappa
            _grisu_round(digits, delta, p2, one_f, (wp_w * (_POW10[n] if n < _GRISU_ROUND_DIGITS else 0)) & _M64)
            return "".join(map(str, digits)), K + kappa


def format_double(x: float) -> str:
    """A double as Triton (rapidjson's Writer::Double) writes it."""
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    if not math.isfinite(x):
        return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")
    sign = "-" if x < 0 else ""
    digits, k = grisu2(abs(x))
    n = len(digits)
    kk = n + k  # 10^(kk-1) <= |x| < 10^kk
    if 0 <= k and kk <= 21:
        s = digits + "0" * k + ".0"
    elif 0 < kk <= 21:
        s = digits[:kk] + "." + digits[kk:]
    elif -6 < kk <= 0:
        s = "0." + "0" * -kk + digits
    elif n == 1:
        s = f"{digits}e{kk - 1}"
    else:
        s = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + s


def _floats(values: np.ndarray) -> str:
    return ",".join(map(format_double, values.astype(np.float64).tolist()))


class ResponseError(Exception):
    """Triton's HTTP frontend would answer this response with an error (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_data(name: str, datatype: str, raw: bytes, count: int) -> bytes:
    if datatype == "BYTES":
        items = []
        off = 0
        for _ in range(count):
            if off + 4 > len(raw):
                raise ResponseError(500, f"output tensor shape does not match size of output for '{name}'")
            (n,) = struct.unpack_from("<I", raw, off)
            off += 4
            if off + n > len(raw):
                raise ResponseError(500, f"output tensor shape does not match size of output for '{name}'")
            items.append(json_string(raw[off:off + n]))
            off += n
        return b"[" + b",".join(items) + b"]"
    if datatype in ("FP16", "BF16"):
        raise ResponseError(
            400, f"sending {datatype} data via JSON is not supported. Please use the binary data format for output"
        )
    dtype = np.dtype(_NUMPY[datatype])
    if len(raw) != dtype.itemsize * count:
        raise ResponseError(
            500, f"Failed to write 'data' field: output tensor shape does not match size of output for '{name}'"
        )
    values = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL":
        text = ",".join("false" if v == 0 else "true" for v in raw)
    elif dtype.kind == "f":
        text = _floats(values)
    else:
        text = ",".join(map(str, values.tolist()))
    return ("[" + text + "]").encode()


def _param_json(p: service_pb2.InferParameter) -> bytes:
    which = p.WhichOneof("parameter_choice")
    if which == "bool_param":
        return b"true" if p.bool_param else b"false"
    if which in ("int64_param", "uint64_param"):
        return str(getattr(p, which)).encode()
    if which == "double_param":
        return format_double(p.double_param).encode()
    if which == "string_param":
        return json_string(p.string_param.encode())
    raise ResponseError(501, "Response parameter of type 'TRITONSERVER_PARAMETER_BYTES' is not currently supported")


def encode_response(resp: service_pb2.ModelInferResponse, plan: OutputPlan) -> tuple[bytes, int | None]:
    """Triton's HTTP body for this response: (body, JSON header length when binary data follows)."""
    parts = [b"{"]
    if resp.id:
        parts += [b'"id":', json_string(resp.id.encode()), b","]
    parts += [b'"model_name":', json_string(resp.model_name.encode()),
              b',"model_version":', json_string(resp.model_version.encode())]
    if resp.parameters:
        parts.append(b',"parameters":{')
        parts.append(b",".join(json_string(k.encode()) + b":" + _param_json(v) for k, v in resp.parameters.items()))
        parts.append(b"}")
    parts.append(b',"outputs":[')
    binaries: list[bytes] = []
    raws = resp.raw_output_contents
    for i, out in enumerate(resp.outputs):
        if i:
            parts.append(b",")
        count = 1
        for d in out.shape:
            count *= d
        parts += [b'{"name":', json_string(out.name.encode()), b',"datatype":', json_string(out.datatype.encode()),
                  b',"shape":[', ",".join(map(str, out.shape)).encode(), b"]"]
        kind = plan.kind(out.name)
        raw = raws[i] if i < len(raws) else b""
        if kind is OutputKind.BINARY:
            parts.append(b',"parameters":{"binary_data_size":%d}' % len(raw))
            if raw:
                binaries.append(raw)
        elif kind is OutputKind.JSON:
            parts += [b',"data":', _json_data(out.name, out.datatype, raw, count)]
        parts.append(b"}")
    parts.append(b"]}")
    header = b"".join(parts)
    if not binaries:
        return header, None
    return header + b"".join(binaries), len(header)


def error_body(message: str) -> bytes:
    return b'{"error":' + json_string(message.encode()) + b"}"


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message), content_type=_JSON, headers=headers)


# -- compression, as Triton's HTTP frontend does it --------------------------------------------------

def response_encoding(accept: str | None) -> str:
    """Triton's CompressionTypeUsed: the highest-weighted of identity, deflate and gzip."""
    if not accept:
        return "identity"
    best, weight = "identity", 0.0
    for enc in accept.split(","):
        name, _, q = enc.strip().partition(";q=")
        if not name:
            continue
        w = 1.0
        if q:
            try:
                w = float(q)
            except ValueError:
                continue
        if name in ("identity", "deflate", "gzip") and w > weight:
            best, weight = name, w
    return best


def _compress(encoding: str, body: bytes) -> bytes:
    if encoding == "gzip":
        c = zlib.compressobj(wbits=31)
        return c.compress(body) + c.flush()
    return zlib.compress(body)


# -- submitting into the gate ---------------------------------------------------------------------

class GrpcSubmit:
    """Submits into a gate that serves Triton's gRPC protocol (the native data plane's port)."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        self._infer = self._channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        self._timeout_s = timeout_s

    async def __call__(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        from .upstream import GateError

        try:
            return await self._infer(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise GateError(exc.code(), exc.details() or "") from None

    async def close(self) -> None:
        await self._channel.close()


# -- the HTTP server ------------------------------------------------------------------------------

_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                  "proxy-connection", "te", "trailer"})
_REPOSITORY = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")


def triton_http_target(config: SidecarConfig) -> str:
    """host:port of Triton's HTTP endpoint (``triton_http_url``; 'auto' = Triton's gRPC host, port 8000)."""
    if config.triton_http_url != "auto":
        return config.triton_http_url
    return f"{config.triton_url.rsplit(':', 1)[0]}:8000"


class HttpFront:
    """Triton's HTTP/REST API: inference into the gate, the rest relayed to Triton's HTTP port."""

    def __init__(
        self, submit: Submit, triton_http: str, allow_repository_control: bool, grpc: GrpcSubmit | None = None
    ) -> None:
        self._submit = submit
        self._grpc = grpc
        self._base = f"http://{triton_http}"
        self._allow_repository_control = allow_repository_control
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, listen: str) -> int:
        """Binds ``listen`` (host:port, port 0 = any free) and returns the port."""
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("POST", "/v2/models/{model}/infer", self._infer)
        app.router.add_route("POST", "/v2/models/{model}/versions/{version}/infer", self._infer)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = listen.rsplit(":", 1)
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port), reuse_address=True)
        await site.start()
        sockets = self._runner.addresses
        return int(sockets[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        model = request.match_info["model"]
        version = request.match_info.get("version", "")
        try:
            payload = body
            encoding = request.headers.get("Content-Encoding", "")
            if encoding in ("gzip", "deflate"):
                try:
                    payload = zlib.decompress(body, wbits=31 if encoding == "gzip" else 15)
                except zlib.error:
                    raise Untranslatable("bad compressed body") from None
            elif encoding not in ("", "identity"):
                raise Untranslatable("unsupported content-encoding")
            header_length = None
            if INFER_HEADER in request.headers:
                try:
                    header_length = int(request.headers[INFER_HEADER])
                except ValueError:
                    raise Untranslatable("bad Inference-Header-Content-Length") from None
            grpc_request, plan = decode_request(model, version, payload, header_length)
        except Untranslatable:
            return await self._relay(request, body)
        from .upstream import GateError

        try:
            response = await self._submit(grpc_request)
        except GateError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return await self._relay(request, body)  # Triton's own 404 and message for the model
            return _error(http_status(exc.code), exc.details)
        try:
            out, header_len = encode_response(response, plan)
        except ResponseError as exc:
            return _error(exc.status, exc.message)
        headers = {}
        content_type = _JSON
        if header_len is not None:
            content_type = "application/octet-stream"
            headers[INFER_HEADER] = str(header_len)
        accept = response_encoding(request.headers.get("Accept-Encoding"))
        if accept != "identity":
            out = _compress(accept, out)
            headers["Content-Encoding"] = accept
        return web.Response(body=out, headers=headers, content_type=content_type)

    async def _relay(self, request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        if _REPOSITORY.match(request.path) and not self._allow_repository_control:
            what = "RepositoryModelLoad" if request.path.endswith("/load") else "RepositoryModelUnload"
            return _error(403, refused_message(what))  # the gRPC front's PERMISSION_DENIED message
        if body is None:
            body = await request.read()
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(
                request.method, self._base + request.path_qs, data=body if body else None, headers=headers
            ) as upstream:
                data = await upstream.read()
                out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
                return web.Response(status=upstream.status, body=data, headers=out_headers)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            return _error(503, f"Triton is unreachable: {exc}")


async def start_http_front(
    config: SidecarConfig, *, submit: Submit | None = None, gate_port: int | None = None
) -> tuple[HttpFront, int]:
    """The HTTP listener on ``config.listen_http``; returns it and its bound port.

    ``submit``: the in-process gate (Python data plane); else ``gate_port``, the local gRPC port of
    the gate that carries inference (native data plane)."""
    if config.listen_http is None:
        raise ValueError("listen_http is not set")
    grpc_submit = None
    if submit is None:
        if gate_port is None:
            raise ValueError("start_http_front needs submit or gate_port")
        host = config.listen.rsplit(":", 1)[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::", "") else host
        grpc_submit = GrpcSubmit(f"{host}:{gate_port}", config.upstream_timeout_s)
        submit = grpc_submit
    front = HttpFront(submit, triton_http_target(config), config.allow_repository_control, grpc_submit)
    try:
        port = await front.start(config.listen_http)
    except BaseException:
        await front.stop()
        raise
    return front, port
