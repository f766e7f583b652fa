"""Merge KServe v2 inference requests along the batch dimension and split Triton's answer back.

The merged gate makes Triton execute exactly the batch the policy chose by sending the a oldest
compatible requests as ONE ``ModelInferRequest`` whose inputs are the callers' inputs concatenated
along dim 0. Triton answers with one response whose outputs carry all rows; ``split`` cuts the rows
back so that every caller receives what Triton would have answered it alone.

Everything here works on the gRPC protobuf messages of ``tritonclient.grpc.service_pb2``; tensor
data is treated as opaque bytes (concatenation and slicing by row byte offsets), so no numeric
conversion happens on the hot path and results are bit-identical. Typed ``contents`` are converted
to raw once, because Triton refuses a request that mixes ``contents`` with ``raw_input_contents``.

Error policy: ``MalformedRequest`` is the caller's fault (the server maps it to INVALID_ARGUMENT);
``MergeError`` is a gate bug (it asked to merge requests with different keys or too many rows);
``SplitError`` means Triton's answer cannot be apportioned (the gate answers INTERNAL).
"""

from __future__ import annotations

import math
import operator
import struct
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

ModelInferRequest = service_pb2.ModelInferRequest
ModelInferResponse = service_pb2.ModelInferResponse

__all__ = [
    "MalformedRequest",
    "MergeError",
    "SplitError",
    "MergedRequest",
    "merge_key",
    "batch_rows",
    "merge",
    "split",
    "validate_request",
    "RequestValidator",
    "DTYPE_SIZE",
]


class MalformedRequest(ValueError):
    """The request itself is invalid; the message is meant for the client (INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MergeError(ValueError):
    """The gate asked for a merge that cannot be done (different merge keys, too many rows)."""


class SplitError(RuntimeError):
    """Triton's merged answer cannot be apportioned to the callers (the gate answers INTERNAL)."""


# Bytes per element of each KServe v2 datatype; BYTES is variable (length-prefixed elements).
DTYPE_SIZE: dict[str, int] = {
    "BOOL": 1, "INT8": 1, "UINT8": 1,
    "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
    "INT32": 4, "UINT32": 4, "FP32": 4,
    "INT64": 8, "UINT64": 8, "FP64": 8,
    "BYTES": 0,
}

# Which InferTensorContents field carries each datatype (FP16/BF16 have none: raw only), and the
# numpy type its values are stored as in raw form (little-endian, as Triton expects).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_CONTENTS_FIELDS = tuple(sorted(set(_CONTENTS_FIELD.values())))
_NUMPY_TYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}

# Shared-memory tensors live in a region the caller registered: the gate cannot see or concatenate
# their data, and Triton writes shm outputs into one caller-owned region that cannot be split.
SHM_PARAMS = frozenset({"shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"})
# Sequence requests carry state in the model between calls of one sequence; merging two sequences'
# steps into one request would route them to one sequence slot.
SEQUENCE_PARAMS = frozenset({"sequence_id", "sequence_start", "sequence_end"})
# Priority and timeout belong to each caller; the gate orders and expires requests itself and
# stamps the merged request, so they must not prevent merging.
PER_CALLER_PARAMS = frozenset({"priority", "timeout"})

_U32 = struct.Struct("<I")
_HAS_CONTENTS = operator.methodcaller("HasField", "contents")


def _param_value(p: service_pb2.InferParameter) -> tuple:
    """A hashable (kind, value) for one InferParameter: int64 5 and uint64 5 mean different things."""
    kind = p.WhichOneof("parameter_choice")
    return (kind, getattr(p, kind) if kind else None)


def _params_key(params, exclude: frozenset = frozenset()) -> tuple:
    return tuple(sorted((k, _param_value(v)) for k, v in params.items() if k not in exclude))


def _has_any(params, keys: frozenset) -> bool:
    return any(k in params for k in keys)


def merge_key(req: ModelInferRequest) -> Hashable | None:
    """The compatibility class of a request; requests with equal keys can be merged, None = alone.

    The key never raises: anything odd (unknown datatype, negative dims, inputs disagreeing on the
    batch size) yields None so that Triton sees the request unchanged and answers with its own error.
    Rules and why:
    - same model name and version: the merged request goes to one model version;
    - same input names in the same order, same datatypes and same shapes except dim 0, same input
      parameters: only then is dim-0 concatenation a well-formed tensor meaning the same thing;
    - same requested outputs with the same parameters (e.g. ``classification``): Triton computes
      one set of outputs for the whole merged request;
    - no shared-memory parameters: the data is not in the message (inputs) or the output region
      belongs to one caller (outputs);
    - no sequence parameters: sequence state is per caller;
    - other request parameters equal except priority/timeout (per caller, handled by the gate):
      custom parameters can change what the model computes;
    - dim 0 > 0 on every input and the same on all of them: an empty batch adds nothing to a batch
      and inputs that disagree on the batch size are malformed.
    """
    inputs = req.inputs
    req_params = req.parameters
    if not inputs or (req_params and _has_any(req_params, SEQUENCE_PARAMS)):
        return None
    rows = -1
    names = set()
    inputs_key = []
    for t in inputs:
        shape = tuple(t.shape)
        if not shape or min(shape) < 0 or t.datatype not in DTYPE_SIZE:
            return None
        if rows < 0:
            rows = shape[0]
        elif shape[0] != rows:
            return None
        name = t.name
        if name in names:
            return None
        names.add(name)
        params = t.parameters
        if params:
            if _has_any(params, SHM_PARAMS):
                return None
            inputs_key.append((name, t.datatype, shape[1:], _params_key(params)))
        else:
            inputs_key.append((name, t.datatype, shape[1:], ()))
    if rows == 0:
        return None
    outputs_key = []
    for o in req.outputs:
        params = o.parameters
        if params and _has_any(params, SHM_PARAMS):
            return None
        outputs_key.append((o.name, _params_key(params) if params else ()))
    return (
        req.model_name,
        req.model_version,
        tuple(inputs_key),
        tuple(outputs_key),
        _params_key(req_params, PER_CALLER_PARAMS) if req_params else (),
    )


def batch_rows(req: ModelInferRequest) -> int:
    """Rows the request contributes to a merged batch (its dim 0), so the gate can respect
    max_batch_size with ragged callers. Meaningful only for requests with a merge key."""
    if not req.inputs or not req.inputs[0].shape:
        raise ValueError(f"request {req.id!r} has no batched input")
    return int(req.inputs[0].shape[0])


@dataclass(frozen=True)
class MergedRequest:
    """One merged request and what ``split`` needs to give each caller its rows back.

    ``request`` is a protobuf message and hence mutable: the gate stamps ``priority``/``timeout``
    on its parameters before sending; nothing else should change it.
    """

    request: ModelInferRequest
    rows: tuple[int, ...]
    ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.ids) or not self.rows:
            raise ValueError(f"rows {self.rows} and ids {self.ids} must be non-empty and of equal length")
        if min(self.rows) <= 0:
            raise ValueError(f"every caller must contribute at least one row, got rows {self.rows}")

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def _req_tag(req: ModelInferRequest) -> str:
    return f"[request id: {req.id or '<id_unknown>'}] "


def _bytes_boundaries(blob: bytes) -> list[int]:
    """Offsets [0, end_1, ..., end_n] of the length-prefixed elements of a raw BYTES tensor.

    struct.unpack_from reads the blob in place; nothing is copied. Raises ValueError with the
    offset of the first truncated element.
    """
    bounds = [0]
    off = 0
    n = len(blob)
    unpack = _U32.unpack_from
    while off < n:
        if off + 4 > n:
            raise ValueError(f"truncated length prefix at byte {off} of {n}")
        off += 4 + unpack(blob, off)[0]
        if off > n:
            raise ValueError(f"element at byte {bounds[-1]} claims to end at byte {off}, beyond the {n} bytes given")
        bounds.append(off)
    return bounds


def _check_raw(req: ModelInferRequest, t, shape: tuple, blob: bytes) -> None:
    elements = math.prod(shape)
    if t.datatype == "BYTES":
        try:
            count = len(_bytes_boundaries(blob)) - 1
        except ValueError as e:
            raise MalformedRequest(
                f"{_req_tag(req)}malformed BYTES data for input '{t.name}' for model '{req.model_name}': {e}"
            ) from None
        if count != elements:
            raise MalformedRequest(
                f"{_req_tag(req)}expected {elements} string elements for input '{t.name}' for model "
                f"'{req.model_name}' (shape {list(shape)}), got {count}"
            )
    else:
        expected = elements * DTYPE_SIZE[t.datatype]
        if len(blob) != expected:
            raise MalformedRequest(
                f"{_req_tag(req)}input byte size mismatch for input '{t.name}' for model '{req.model_name}'. "
                f"Expected {expected}, got {len(blob)}"
            )


def _typed_to_raw(req: ModelInferRequest, t) -> bytes:
    """Raw little-endian bytes of an input given in typed ``contents`` (validated)."""
    dtype = t.datatype
    field = _CONTENTS_FIELD.get(dtype)
    contents = t.contents
    for other in _CONTENTS_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise MalformedRequest(
                f"{_req_tag(req)}unexpected explicit tensor data in '{other}' for input '{t.name}' "
                f"for model '{req.model_name}' of datatype '{dtype}'"
                + ("; FP16/BF16 data must be sent in raw_input_contents" if field is None else "")
            )
    values = getattr(contents, field) if field else ()
    elements = math.prod(t.shape)
    if len(values) != elements:
        raise MalformedRequest(
            f"{_req_tag(req)}expected {elements} elements for input '{t.name}' for model "
            f"'{req.model_name}' (shape {list(t.shape)}), got {len(values)}"
            + (" (FP16/BF16 data must be sent in raw_input_contents)" if field is None and elements else "")
        )
    if dtype == "BYTES":
        pack = _U32.pack
        return b"".join(pack(len(v)) + v for v in values)
    if not elements:
        return b""
    np_type = _NUMPY_TYPE[dtype]
    if np_type.kind in "iu":
        # Values arrive widened to 32/64 bits; a C-style narrowing cast is what a raw client would send.
        wide = np.array(values, dtype=np.uint64 if dtype == "UINT64" else np.int64)
        return wide.astype(np_type).tobytes()
    return np.array(values, dtype=np_type).tobytes()


def _input_blobs(req: ModelInferRequest, *, allow_shm: bool) -> list[bytes | None]:
    """The raw data of each input in order (None for shared-memory inputs), validated against shape.

    Mirrors Triton's gRPC front end: either ``raw_input_contents`` holds one blob per input that is
    not in shared memory, or every such input uses typed ``contents``; never both. One pass with
    few attribute reads, because protobuf field access is the dominant cost on the gate's hot path.
    """
    raw = req.raw_input_contents
    nraw = len(raw)
    out: list[bytes | None] = []
    k = 0
    for t in req.inputs:
        if t.datatype not in DTYPE_SIZE:
            raise MalformedRequest(
                f"{_req_tag(req)}invalid datatype '{t.datatype}' for input '{t.name}' for model '{req.model_name}'"
            )
        shape = tuple(t.shape)
        if shape and min(shape) < 0:
            raise MalformedRequest(
                f"{_req_tag(req)}input '{t.name}' for model '{req.model_name}' has a negative dimension "
                f"in shape {list(shape)}"
            )
        params = t.parameters
        if params and _has_any(params, SHM_PARAMS):
            if not allow_shm:
                raise MergeError(f"request {req.id!r} uses shared memory and cannot be merged")
            out.append(None)
            continue
        if not nraw:
            out.append(_typed_to_raw(req, t))
            continue
        if k == nraw:
            _raw_count_error(req, nraw)
        if t.HasField("contents"):
            raise MalformedRequest(
                f"{_req_tag(req)}contents field must not be specified when using raw_input_contents "
                f"for input '{t.name}' for model '{req.model_name}'"
            )
        blob = raw[k]
        k += 1
        _check_raw(req, t, shape, blob)
        out.append(blob)
    if k != nraw:
        _raw_count_error(req, nraw)
    return out


def _raw_count_error(req: ModelInferRequest, nraw: int) -> None:
    wanted = sum(1 for t in req.inputs if not (t.parameters and _has_any(t.parameters, SHM_PARAMS)))
    raise MalformedRequest(
        f"{_req_tag(req)}expected {wanted} raw_input_contents (one per input not in shared memory) "
        f"for model '{req.model_name}', got {nraw}"
    )


def _check_keys(reqs: Sequence[ModelInferRequest]) -> None:
    key = merge_key(reqs[0])
    if key is None:
        raise MergeError(f"request {reqs[0].id!r} cannot be merged (merge_key is None); send it alone")
    for r in reqs[1:]:
        if merge_key(r) != key:
            raise MergeError(
                f"request {r.id!r} is not compatible with request {reqs[0].id!r} (different merge keys)"
            )


def merge(
    reqs: Sequence[ModelInferRequest],
    *,
    request_id: str = "",
    max_batch_size: int | None = None,
    checked: bool = False,
) -> MergedRequest:
    """Concatenate compatible requests along dim 0 into one all-raw request.

    The merged request keeps the first request's model, outputs and request parameters except
    priority/timeout (the gate stamps its own). Each input's data is validated against its shape,
    so a malformed caller is refused with its id named instead of corrupting its neighbours' rows.
    ``max_batch_size``, when given, bounds the total rows (Triton would refuse a larger batch).
    ``checked=True`` says the caller already grouped ``reqs`` by equal, non-None ``merge_key``
    (the gate computes the key once at enqueue); recomputing it here would cost as much as the
    rest of the merge. With the default, mixing incompatible requests raises ``MergeError``.
    """
    if not reqs:
        raise MergeError("merge needs at least one request")
    if not checked:
        _check_keys(reqs)
    rows = tuple(int(r.inputs[0].shape[0]) for r in reqs)
    total = sum(rows)
    if max_batch_size is not None and total > max_batch_size:
        raise MergeError(f"merged batch of {total} rows {rows} exceeds max_batch_size {max_batch_size}")
    blobs = [_input_blobs(r, allow_shm=False) for r in reqs]

    first = reqs[0]
    merged = ModelInferRequest()
    if len(reqs) == 1 and len(first.raw_input_contents):
        # Already one all-raw request: a C-level copy beats rebuilding it field by field.
        merged.CopyFrom(first)
        merged.id = request_id
        for k in PER_CALLER_PARAMS:
            if k in merged.parameters:
                del merged.parameters[k]
        return MergedRequest(request=merged, rows=rows, ids=(first.id,))
    merged.model_name = first.model_name
    merged.model_version = first.model_version
    merged.id = request_id
    for k, v in first.parameters.items():
        if k not in PER_CALLER_PARAMS:
            merged.parameters[k].CopyFrom(v)
    for j, t in enumerate(first.inputs):
        mt = merged.inputs.add()
        mt.name = t.name
        mt.datatype = t.datatype
        mt.shape.append(total)
        mt.shape.extend(t.shape[1:])
        if t.parameters:
            for k, v in t.parameters.items():
                mt.parameters[k].CopyFrom(v)
    merged.raw_input_contents.extend([b"".join([b[j] for b in blobs]) for j in range(len(first.inputs))])
    merged.outputs.extend(first.outputs)
    return MergedRequest(request=merged, rows=rows, ids=tuple(r.id for r in reqs))


def split(resp: ModelInferResponse, merged: MergedRequest) -> list[ModelInferResponse]:
    """Cut a merged response into one response per caller, in the order of ``merged.ids``.

    Each part has the caller's id, the response's model name/version (the version Triton resolved,
    which is what it would have answered the caller alone), the response parameters, the outputs
    in Triton's order with dim 0 set to the caller's row count, and byte-identical data. Outputs
    are checked before anything is built: every output's dim 0 must equal the merged batch size,
    since only then is it a batch dimension whose rows belong to callers in order.
    """
    rows = merged.rows
    total = merged.total_rows
    outputs = resp.outputs
    raw = resp.raw_output_contents
    use_raw = len(raw) > 0
    if use_raw and len(raw) != len(outputs):
        raise SplitError(f"response has {len(outputs)} outputs but {len(raw)} raw_output_contents")
    # cumulative row boundaries [0, r1, r1+r2, ...]
    cuts = [0]
    for r in rows:
        cuts.append(cuts[-1] + r)

    pieces: list[list] = []  # per output, per caller: bytes (raw) or list of values (typed)
    for j, o in enumerate(outputs):
        shape = tuple(o.shape)
        if not shape or shape[0] != total:
            raise SplitError(
                f"output '{o.name}' has shape {list(shape)}: its first dimension is not the batch dimension "
                f"of the merged request ({total} rows from {len(rows)} requests), so it cannot be split"
            )
        per_row = math.prod(shape[1:])
        if use_raw:
            if len(rows) == 1:
                continue  # checked above; the whole response goes to the one caller
            blob = raw[j]
            if o.datatype == "BYTES":
                try:
                    bounds = _bytes_boundaries(blob)
                except ValueError as e:
                    raise SplitError(f"output '{o.name}': malformed BYTES data: {e}") from None
                if len(bounds) - 1 != total * per_row:
                    raise SplitError(
                        f"output '{o.name}' has {len(bounds) - 1} BYTES elements, shape {list(shape)} needs {total * per_row}"
                    )
                offs = [bounds[c * per_row] for c in cuts]
            else:
                size = DTYPE_SIZE.get(o.datatype)
                if size is None:
                    raise SplitError(f"output '{o.name}' has unknown datatype '{o.datatype}'")
                if len(blob) != total * per_row * size:
                    raise SplitError(
                        f"output '{o.name}' holds {len(blob)} bytes, shape {list(shape)} of {o.datatype} needs "
                        f"{total * per_row * size}"
                    )
                offs = [c * per_row * size for c in cuts]
            view = memoryview(blob)
            pieces.append([view[offs[i]:offs[i + 1]].tobytes() for i in range(len(rows))])
        else:
            field = _CONTENTS_FIELD.get(o.datatype)
            values = getattr(o.contents, field) if field else ()
            if len(values) != total * per_row:
                raise SplitError(
                    f"output '{o.name}' has {len(values)} typed values, shape {list(shape)} needs {total * per_row}"
                )
            pieces.append([values[c * per_row:d * per_row] for c, d in zip(cuts, cuts[1:])])

    if len(rows) == 1:
        # The caller owns every row: its answer is Triton's answer under its own id.
        part = ModelInferResponse()
        part.CopyFrom(resp)
        part.id = merged.ids[0]
        return [part]

    template = ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version)
    for k, v in resp.parameters.items():
        template.parameters[k].CopyFrom(v)
    for o in outputs:
        ot = template.outputs.add()
        ot.name = o.name
        ot.datatype = o.datatype
        ot.shape.extend(o.shape)
        if o.parameters:
            for k, v in o.parameters.items():
                ot.parameters[k].CopyFrom(v)

    parts = []
    for i, (rid, r) in enumerate(zip(merged.ids, rows)):
        part = ModelInferResponse()
        part.CopyFrom(template)
        part.id = rid
        for j, ot in enumerate(part.outputs):
            ot.shape[0] = r
            if not use_raw:
                field = _CONTENTS_FIELD.get(ot.datatype)
                if field:
                    getattr(ot.contents, field).extend(pieces[j][i])
        if use_raw:
            part.raw_output_contents.extend([p[i] for p in pieces])
        parts.append(part)
    return parts


# ---------------------------------------------------------------- validation against the config


def _config_dtype(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type)
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


def _dims_match(shape: Sequence[int], dims: Sequence[int]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims))


def _fmt(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def validate_request(req: ModelInferRequest, model_config: model_config_pb2.ModelConfig) -> None:
    """Refuse, before queueing, a request Triton would refuse, with Triton-like messages.

    Catching it at the gate matters for the merged mode: one bad request inside a merged batch would
    make Triton fail the whole batch, i.e. every innocent neighbour. Checks: input names known and
    not repeated, required (non-optional) inputs present, datatypes, shapes against ``dims`` (-1 is a
    wildcard; for batching models a leading batch dim, equal across inputs and <= max_batch_size),
    data sizes (raw blobs, typed contents, shared-memory byte sizes), requested outputs exist.
    Not modelled: shape tensors and ragged batching details, which Triton still checks itself.
    """
    RequestValidator(model_config).check(req)


class RequestValidator:
    """``validate_request`` for one model config, with what the config implies worked out once.

    The gate builds one per model and calls ``check`` per request: the checks and messages are
    exactly ``validate_request``'s; only the config side (expected datatypes, full dims, required
    inputs, output names) is not recomputed for every request. The config must not change afterwards.
    """

    __slots__ = ("config", "_model", "_batching", "_max_batch", "_inputs", "_allowed", "_required", "_n_inputs",
                 "_outputs", "_repeatable", "_passed")

    MAX_SHAPES = 256
    """Request shapes remembered as passed (``check_shaped``); forgotten wholesale past this many."""

    def __init__(self, model_config: model_config_pb2.ModelConfig) -> None:
        self.config = model_config
        self._model = model_config.name
        self._batching = model_config.max_batch_size > 0
        self._max_batch = model_config.max_batch_size
        lead = [-1] if self._batching else []
        self._inputs = {i.name: (_config_dtype(i.data_type), lead + list(i.dims)) for i in model_config.input}
        self._allowed = ", ".join(i.name for i in model_config.input)
        self._required = [i.name for i in model_config.input if not i.optional]
        self._n_inputs = len(model_config.input)
        self._outputs = [o.name for o in model_config.output]
        self._repeatable = all(i.data_type != model_config_pb2.TYPE_STRING for i in model_config.input)
        self._passed: set[tuple] = set()

    def check_shaped(self, req: ModelInferRequest, key: Hashable | None, rows: int) -> None:
        """``check``, done once per request shape: ``key`` is the request's ``merge_key`` and ``rows``
        its first input's dim 0. A request whose shape passed before passes without the checks.

        The shape is everything ``check`` reads of a request with raw contents and no shared memory:
        the merge key (names, datatypes, dims past the batch dim, parameters, outputs), the rows, each
        raw blob's length and whether an input also sets typed ``contents``. Not remembered: requests
        without a merge key (shared memory, sequences, anything odd), typed ``contents`` only, and
        models with BYTES inputs, whose blobs are checked element by element. Refusals are never
        remembered, so their messages (which name the request) are always ``check``'s."""
        raw = req.raw_input_contents
        if key is None or not raw or not self._repeatable:
            self.check(req)
            return
        shape = (key, rows, tuple(map(len, raw)), tuple(map(_HAS_CONTENTS, req.inputs)))
        if shape in self._passed:
            return
        self.check(req)
        if len(self._passed) >= self.MAX_SHAPES:
            self._passed.clear()
        self._passed.add(shape)

    def check(self, req: ModelInferRequest) -> None:
        """Raise MalformedRequest for what Triton would refuse (see ``validate_request``)."""
        model = self._model or req.model_name
        batching = self._batching
        seen: list[str] = []
        batch = None
        for t in req.inputs:
            name = t.name
            if name in seen:
                raise MalformedRequest(f"{_req_tag(req)}input '{name}' already exists in request for model '{model}'")
            ci = self._inputs.get(name)
            if ci is None:
                raise MalformedRequest(
                    f"{_req_tag(req)}unexpected inference input '{name}' for model '{model}', allowed inputs are: "
                    + self._allowed
                )
            seen.append(name)
            expected, full_dims = ci
            if t.datatype != expected:
                raise MalformedRequest(
                    f"{_req_tag(req)}inference input '{name}' data-type is '{t.datatype}', but model '{model}' "
                    f"expects '{expected}'"
                )
            shape = list(t.shape)
            if shape and min(shape) < 0:
                raise MalformedRequest(
                    f"{_req_tag(req)}input '{name}' for model '{model}' has a negative dimension in shape {_fmt(shape)}"
                )
            if not _dims_match(shape, full_dims):
                note = (
                    " NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension "
                    "to be prepended to each input shape."
                    if batching
                    else ""
                )
                raise MalformedRequest(
                    f"{_req_tag(req)}unexpected shape for input '{name}' for model '{model}'. "
                    f"Expected {_fmt(full_dims)}, got {_fmt(shape)}.{note}"
                )
            if batching:
                if batch is None:
                    batch = shape[0]
                elif shape[0] != batch:
                    raise MalformedRequest(
                        f"{_req_tag(req)}input '{name}' batch size does not match other inputs for '{model}'"
                    )
        missing = [n for n in self._required if n not in seen]
        if missing:
            raise MalformedRequest(
                f"{_req_tag(req)}expected {self._n_inputs} inputs but got {len(seen)} inputs for model '{model}'. "
                f"Got input(s) {seen}, but missing required input(s) {missing}. Please provide all required input(s)."
            )
        if batching and batch is not None and batch > self._max_batch:
            raise MalformedRequest(
                f"{_req_tag(req)}inference request batch-size must be <= {self._max_batch} for '{model}'"
            )
        outputs = req.outputs
        if outputs:
            cfg_outputs = self._outputs
            for o in outputs:
                if o.name not in cfg_outputs:
                    raise MalformedRequest(
                        f"{_req_tag(req)}unexpected inference output '{o.name}' for model '{model}', allowed outputs "
                        "are: " + ", ".join(cfg_outputs)
                    )
        _input_blobs(req, allow_shm=True)
        for t in req.inputs:
            if t.datatype != "BYTES" and t.parameters and "shared_memory_byte_size" in t.parameters:
                got = t.parameters["shared_memory_byte_size"].int64_param
                want = math.prod(t.shape) * DTYPE_SIZE[t.datatype]
                if got != want:
                    raise MalformedRequest(
                        f"{_req_tag(req)}input byte size mismatch for input '{t.name}' for model '{model}'. "
                        f"Expected {want}, got {got}"
                    )
