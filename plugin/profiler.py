"""Measure a model's service-time profile on a live Triton: ``smdp profile`` and ``profile: auto``.

The SMDP policy is only as good as the service-time law tau(b) it is solved for, and what the gate
waits for is not the accelerator's time alone but the whole hold of its slot: the merged request's
gRPC round trip, Triton's scheduling, the backend's own overhead and the model. So the profiler
measures exactly that: it reads the model's config from Triton, synthesises valid inputs, and for
each batch size b sends batches of exactly b rows as one ``ModelInfer`` request over gRPC, one at a
time (as the gate holds one slot), timing each from dispatch to completion, after a warm-up.

The result is the profile CSV the solver reads (``batch_size,mean_service_s,batch_energy_j`` or
``busy_power_w``, ``service_cv``), the per-batch samples (``batch_size,service_s``), per-size
confidence intervals and a drift check (first half against second half of each size's samples).

Power is measured only where Triton reports a GPU (``nv_energy_consumption``, a joule counter that
steps once per poll of Triton's metrics thread: every ``--metrics-interval-ms`` / 2 in Triton core's
metrics.cc, about a second at the default 2000 ms; so each size is run back to back for at least a
second and on until the counter has stepped twice, at most ``max_energy_window_s``, and the counter's
slope between its first and last step gives the power; ``nv_gpu_power_usage`` while idle gives P0).
Elsewhere the energy column is modelled, from a prior profile's busy power or an affine power
model, and every output says "power: modelled". It is never presented as measured.

The profiler lives in the sidecar's package because the sidecar runs it at start-up for
``profile: auto`` models; the load-test commands use it from there.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import enum
import hashlib
import json
import logging
import math
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from solver.model import ModelError, ServiceProfile

log = logging.getLogger("smdp.profiler")

SERVICE = "inference.GRPCInferenceService"
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

DEFAULT_RUNS_PER_SIZE = 30
DEFAULT_WARMUP = 3
DEFAULT_ENERGY_WINDOW_S = 1.0
"""Shortest back-to-back run per size over which Triton's energy counter is differenced, seconds."""
DEFAULT_MAX_ENERGY_WINDOW_S = 6.0
"""Longest such run, seconds: the counter steps about once a second with Triton's default metrics
interval (2000 ms, polled every half interval) and twice as slowly if a build polls once per interval;
two steps are needed for a slope."""
DRIFT_RELATIVE = 0.05
"""A size drifts when its two halves' means differ by more than this fraction ..."""
DRIFT_P_VALUE = 0.01
"""... and Welch's t-test says the difference is not noise at this level."""
CONFIDENCE = 0.95
STALL_FACTOR = 20.0
"""A batch that takes this many times its size's median is reported as a stall (and kept)."""


class ProfileError(Exception):
    """The profile cannot be taken; ``code`` is the standard gRPC status that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


# ---------------------------------------------------------------------------------------------------
# The model as Triton describes it


_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "INT8": np.dtype(np.int8), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # raw bfloat16 bits
}


def _wire_dtype(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type)
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


@dataclass(frozen=True)
class InputSpec:
    """One input of the model, per row (the batch dimension excluded)."""

    name: str
    datatype: str
    """KServe v2 datatype: FP32, INT64, BYTES, ..."""
    dims: tuple[int, ...]
    """-1 = variable."""
    optional: bool = False
    shape_tensor: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """What the profiler needs of a model's config."""

    name: str
    version: str
    max_batch_size: int
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    instances: int
    """Model instances (sum of instance_group counts): the gate's slots."""
    config_hash: str
    """sha256 of the serialised config: a cache key that changes when the model does."""
    dynamic_batching: bool = False
    """Triton's own batcher is on (it can hold a lone request for its idle wait, see build_report)."""

    @classmethod
    def from_config(cls, cfg: model_config_pb2.ModelConfig, version: str = "") -> "ModelSpec":
        inputs = tuple(
            InputSpec(i.name, _wire_dtype(i.data_type), tuple(int(d) for d in i.dims), bool(i.optional),
                      bool(i.is_shape_tensor))
            for i in cfg.input
        )
        digest = hashlib.sha256(cfg.SerializeToString(deterministic=True)).hexdigest()[:16]
        return cls(cfg.name, version, int(cfg.max_batch_size), inputs, tuple(o.name for o in cfg.output),
                   sum(max(g.count, 1) for g in cfg.instance_group) or 1, digest,
                   cfg.HasField("dynamic_batching"))


def check_profilable(cfg: model_config_pb2.ModelConfig) -> None:
    """Refuse models the gate does not batch, saying why (FAILED_PRECONDITION)."""
    if cfg.max_batch_size <= 0:
        raise ProfileError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"model '{cfg.name}' has max_batch_size {cfg.max_batch_size}: it does not batch, so "
                           "there is nothing to batch and nothing to profile")
    if cfg.model_transaction_policy.decoupled:
        raise ProfileError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"model '{cfg.name}' is decoupled: the gate relays its requests as they are, so there "
                           "is nothing to batch")
    if cfg.HasField("sequence_batching"):
        raise ProfileError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"model '{cfg.name}' is sequence-batched: the gate relays its requests as they are, so "
                           "there is nothing to batch")


# ---------------------------------------------------------------------------------------------------
# Inputs


def _serialize_bytes(values: Iterable[bytes]) -> bytes:
    """Triton's BYTES wire form: each element as a 4-byte little-endian length, then its bytes."""
    out = bytearray()
    for v in values:
        out += len(v).to_bytes(4, "little") + v
    return bytes(out)


def _as_bytes(x: object) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    if isinstance(x, np.generic):
        return _as_bytes(x.item())
    return str(x).encode("utf-8")


def _example_from_json(name: str, value: object, spec: InputSpec | None, where: str) -> np.ndarray:
    """One row of one input from perf_analyzer's --input-data JSON (list, {content, shape} or {b64})."""
    shape: tuple[int, ...] | None = None
    if isinstance(value, dict):
        if "shape" in value:
            shape = tuple(int(d) for d in value["shape"])
        if "content" in value:
            value = value["content"]
        elif "b64" in value:
            if spec is None or spec.datatype == "BYTES":
                raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{where}: input '{name}': b64 data is for numeric inputs")
            raw = base64.b64decode(value["b64"])
            value = np.frombuffer(raw, dtype=_NUMPY[spec.datatype]).tolist()
        else:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{where}: input '{name}' needs 'content' or 'b64', got keys {sorted(value)}")
    bytes_input = spec is not None and spec.datatype == "BYTES"
    if bytes_input:
        arr = np.array([_as_bytes(v) for v in np.ravel(np.array(value, dtype=object))], dtype=object)
    else:
        try:
            arr = np.array(value, dtype=_NUMPY[spec.datatype] if spec is not None else float).ravel()
        except (TypeError, ValueError) as exc:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: input '{name}': {exc}") from None
    if shape is None and spec is not None and all(d >= 0 for d in spec.dims):
        shape = spec.dims
    if shape is not None:
        if int(np.prod(shape, dtype=np.int64)) != arr.size:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{where}: input '{name}' has {arr.size} values, its shape {list(shape)} needs "
                               f"{int(np.prod(shape, dtype=np.int64))}")
        arr = arr.reshape(shape)
    return arr


def read_input_data(path: Path, spec: ModelSpec) -> dict[str, list[np.ndarray]]:
    """Example rows per input from a perf_analyzer-style JSON (``{"data": [{INPUT: values, ...}, ...]}``)
    or an .npz (one array per input, rows along the first axis). Rows exclude the batch dimension."""
    by_name = {i.name: i for i in spec.inputs}
    out: dict[str, list[np.ndarray]] = {}
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=True) as npz:
                for name in npz.files:
                    arr = npz[name]
                    s = by_name.get(name)
                    if arr.ndim < 1 or arr.shape[0] < 1:
                        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"{path}: array '{name}' needs rows along its first axis")
                    rows = []
                    for row in arr:
                        if s is not None and s.datatype == "BYTES":
                            row = np.array([_as_bytes(v) for v in np.ravel(row)], dtype=object).reshape(np.shape(row))
                        elif s is not None:
                            row = np.asarray(row, dtype=_NUMPY[s.datatype])
                        rows.append(np.asarray(row))
                    out[name] = rows
        else:
            doc = json.loads(path.read_text())
            entries = doc.get("data") if isinstance(doc, dict) else None
            if not isinstance(entries, list) or not entries:
                raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"{path}: expected {{\"data\": [{{\"INPUT\": values, ...}}, ...]}} "
                                   "(perf_analyzer's --input-data format)")
            for k, entry in enumerate(entries):
                if isinstance(entry, list):  # perf_analyzer's per-stream form: a list of steps
                    raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"{path}: data[{k}] is a sequence of steps; give one object per row")
                if not isinstance(entry, dict):
                    raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: data[{k}] is not an object")
                for name, value in entry.items():
                    out.setdefault(name, []).append(
                        _example_from_json(name, value, by_name.get(name), f"{path}: data[{k}]"))
    except OSError as exc:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read --input-data {path}: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"--input-data {path}: {exc}") from None
    unknown = sorted(set(out) - set(by_name))
    if unknown:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"--input-data {path} names input(s) {unknown} that model '{spec.name}' does not have "
                           f"(it has {sorted(by_name)})")
    return out


class InputSynthesizer:
    """Builds the ``ModelInferRequest`` of a batch of exactly b rows.

    Numeric inputs with fixed dims get random values (uniform in [0, 1) for floats, small integers,
    random booleans); BYTES inputs, inputs with variable dims and shape tensors need example rows
    (``--input-data``), which are cycled through to fill a batch. Requests are built once per size.
    """

    def __init__(self, spec: ModelSpec, examples: Mapping[str, Sequence[np.ndarray]] | None = None,
                 seed: int = 0) -> None:
        self.spec = spec
        self._examples = {k: list(v) for k, v in (examples or {}).items()}
        self._rng = np.random.default_rng(seed)
        self._cache: dict[int, service_pb2.ModelInferRequest] = {}
        for i in spec.inputs:
            if i.name in self._examples:
                self._check_examples(i)
                continue
            if i.optional:
                continue
            why = None
            if i.datatype == "BYTES":
                why = "it is a BYTES (string) input"
            elif i.shape_tensor:
                why = "it is a shape tensor"
            elif any(d < 0 for d in i.dims):
                why = f"its dims {list(i.dims)} are variable"
            elif i.datatype not in _NUMPY:
                why = f"its datatype {i.datatype} is not supported"
            if why is not None:
                raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"cannot synthesise input '{i.name}' of model '{spec.name}': {why}; give example "
                                   "rows with --input-data FILE (perf_analyzer's JSON, or an .npz with one array "
                                   "per input)")

    def _check_examples(self, i: InputSpec) -> None:
        shapes = {tuple(np.shape(r)) for r in self._examples[i.name]}
        if len(shapes) != 1:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"--input-data: the rows of input '{i.name}' differ in shape {sorted(shapes)}; a batch "
                               "needs one shape")
        (shape,) = shapes
        if len(shape) != len(i.dims) or any(d >= 0 and d != s for s, d in zip(shape, i.dims)):
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"--input-data: rows of input '{i.name}' have shape {list(shape)}, the model wants "
                               f"{list(i.dims)}")

    def _random(self, i: InputSpec, b: int) -> np.ndarray:
        shape = (b, *i.dims)
        if i.datatype in ("FP16", "FP32", "FP64"):
            return self._rng.random(shape).astype(_NUMPY[i.datatype])
        if i.datatype == "BF16":
            return (self._rng.random(shape).astype("<f4").view("<u4") >> 16).astype("<u2")
        if i.datatype == "BOOL":
            return self._rng.random(shape) < 0.5
        return self._rng.integers(0, 100, size=shape).astype(_NUMPY[i.datatype])

    def request(self, b: int) -> service_pb2.ModelInferRequest:
        if b < 1 or b > self.spec.max_batch_size:
            raise ValueError(f"batch size {b} outside 1..{self.spec.max_batch_size}")
        req = self._cache.get(b)
        if req is not None:
            return req
        req = service_pb2.ModelInferRequest(model_name=self.spec.name, model_version=self.spec.version,
                                            id=f"smdp-profile-{b}")
        for i in self.spec.inputs:
            ex = self._examples.get(i.name)
            if ex is None and i.optional:
                continue
            if ex is not None:
                rows = [ex[k % len(ex)] for k in range(b)]
                if i.datatype == "BYTES":
                    arr = np.stack([np.asarray(r, dtype=object) for r in rows])
                    blob = _serialize_bytes(_as_bytes(v) for v in arr.ravel())
                else:
                    arr = np.stack([np.asarray(r, dtype=_NUMPY[i.datatype]) for r in rows])
                    blob = arr.tobytes()
            else:
                arr = self._random(i, b)
                blob = np.ascontiguousarray(arr).tobytes()
            t = req.inputs.add()
            t.name, t.datatype = i.name, i.datatype
            t.shape.extend(arr.shape)
            req.raw_input_contents.append(blob)
        for name in self.spec.outputs:
            req.outputs.add().name = name
        self._cache[b] = req
        return req


# ---------------------------------------------------------------------------------------------------
# Talking to Triton


def _unreachable(url: str, exc: grpc.aio.AioRpcError) -> ProfileError:
    return ProfileError(grpc.StatusCode.UNAVAILABLE, f"Triton at {url} is unreachable: {exc.details()}")


class TritonModelClient:
    """One gRPC channel to Triton, as the gate has: the model's config, and timed ``ModelInfer`` calls."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self._config = self._channel.unary_unary(
            f"/{SERVICE}/ModelConfig", request_serializer=service_pb2.ModelConfigRequest.SerializeToString,
            response_deserializer=service_pb2.ModelConfigResponse.FromString)
        self._infer = self._channel.unary_unary(
            f"/{SERVICE}/ModelInfer", request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString)

    async def model_config(self, name: str, version: str = "") -> model_config_pb2.ModelConfig:
        try:
            resp = await self._config(service_pb2.ModelConfigRequest(name=name, version=version),
                                      timeout=min(self.timeout_s, 10.0))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _unreachable(self.url, exc) from None
            if code == grpc.StatusCode.NOT_FOUND or (code == grpc.StatusCode.INVALID_ARGUMENT
                                                     and "unknown model" in (exc.details() or "")):
                what = f"model '{name}'" + (f" version {version}" if version else "")
                raise ProfileError(grpc.StatusCode.NOT_FOUND,
                                   f"{what} is not known to Triton at {self.url} ({exc.details()})") from None
            raise ProfileError(code, f"Triton refused the config of model '{name}': {exc.details()}") from None
        return resp.config

    async def model_spec(self, name: str, version: str = "") -> ModelSpec:
        cfg = await self.model_config(name, version)
        check_profilable(cfg)
        return ModelSpec.from_config(cfg, version)

    async def timed_infer(self, req: service_pb2.ModelInferRequest) -> float:
        """Seconds from dispatch to completion of one request (raises grpc.aio.AioRpcError)."""
        t0 = time.perf_counter()
        await self._infer(req, timeout=self.timeout_s)
        return time.perf_counter() - t0

    async def close(self) -> None:
        await self._channel.close()


# ---------------------------------------------------------------------------------------------------
# Power


class PowerKind(enum.Enum):
    MEASURED = "measured"
    """From Triton's GPU metrics."""
    MODELLED = "modelled"
    """From a prior profile's busy power or an affine power model: no meter involved."""
    NONE = "none"
    """No power information: busy power 0 is written (latency-only policies)."""


@dataclass(frozen=True)
class PowerModel:
    """Modelled busy power p(b) in watts; the profile's energy is then p(b) x the measured tau(b)."""

    busy_power_w: Callable[[int], float]
    description: str

    @classmethod
    def from_profile(cls, path: Path) -> "PowerModel":
        """The busy power of a prior profile CSV, interpolated in b (held flat past its last size)."""
        prior = ServiceProfile.from_csv(path)
        p = prior.busy_power_w
        return cls(lambda b: float(p[min(b, prior.max_batch) - 1]), f"busy power from {path.name}")

    @classmethod
    def affine(cls, spec: str) -> "PowerModel":
        """``A[,B]``: p(b) = A + B b watts while a batch of b is served."""
        try:
            parts = [float(x) for x in spec.split(",")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 2 or not all(math.isfinite(x) for x in parts):
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"--power-model takes A[,B] (busy power A + B x b watts), got {spec!r}")
        a, slope = parts[0], (parts[1] if len(parts) == 2 else 0.0)
        if a < 0 or slope < 0:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"--power-model {spec!r}: A and B must be >= 0 watts")
        return cls(lambda b: a + slope * b, f"affine busy power {a:g} + {slope:g} x b W")


def counter_power_w(observations: Sequence[tuple[float, float]]) -> float | None:
    """Mean power (W) from readings (time s, energy counter J) of a counter that updates in steps.

    Only the readings where the counter had just changed are trusted as "the value at this time", so
    the slope runs from the first change to the last; None when the counter changed fewer than twice.
    """
    changes: list[tuple[float, float]] = []
    prev = None
    for t, e in observations:
        if prev is not None and e != prev:
            changes.append((t, e))
        prev = e
    if len(changes) < 2:
        return None
    (t0, e0), (t1, e1) = changes[0], changes[-1]
    if t1 <= t0 or e1 < e0:
        return None
    return (e1 - e0) / (t1 - t0)


class GpuMeter:
    """Reads Triton's GPU metrics (``nv_energy_consumption``, ``nv_gpu_power_usage``) in a thread while
    something runs; summed over every GPU Triton reports."""

    def __init__(self, url: str, fetch: Callable[[str], str] | None = None, interval_s: float = 0.01) -> None:
        from .loop.telemetry import fetch_metrics

        self.url = url
        self._fetch = fetch or fetch_metrics
        self.interval_s = interval_s

    def read(self):
        from .loop.telemetry import gpu_metrics

        return gpu_metrics(self._fetch(self.url))

    def available(self) -> bool:
        """Whether Triton reports a GPU's energy counter (False when the endpoint is away too)."""
        try:
            m = self.read()
        except (OSError, ValueError):
            return False
        return m.energy_j is not None and m.gpus > 0

    def idle_power_w(self, seconds: float = 1.0) -> float | None:
        """P0: mean of ``nv_gpu_power_usage`` (else the energy counter's slope) while nothing runs."""
        obs: list[tuple[float, float]] = []
        powers: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            m = self.read()
            if m.power_w is not None:
                powers.append(m.power_w)
            if m.energy_j is not None:
                obs.append((time.monotonic(), m.energy_j))
            time.sleep(self.interval_s)
        if powers:
            return float(np.mean(powers))
        return counter_power_w(obs)

    def recording(self) -> "_Recording":
        return _Recording(self)


class _Recording:
    """Energy-counter readings taken in a thread between ``start()`` and ``stop()``."""

    def __init__(self, meter: GpuMeter) -> None:
        self._meter = meter
        self._stop = threading.Event()
        self.observations: list[tuple[float, float]] = []
        self.steps = 0
        """Times the counter changed between readings so far (``counter_power_w`` needs two)."""
        self._thread = threading.Thread(target=self._run, name="smdp-gpu-meter", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = self._meter.read()
            except (OSError, ValueError):
                m = None
            if m is not None and m.energy_j is not None:
                if self.observations and m.energy_j != self.observations[-1][1]:
                    self.steps += 1
                self.observations.append((time.monotonic(), m.energy_j))
            self._stop.wait(self._meter.interval_s)

    def start(self) -> "_Recording":
        self._thread.start()
        return self

    def stop(self) -> float | None:
        """Mean power over the recording, watts (None: the counter did not move enough)."""
        self._stop.set()
        self._thread.join()
        return counter_power_w(self.observations)


# ---------------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class SweepPlan:
    sizes: tuple[int, ...]
    runs_per_size: int = DEFAULT_RUNS_PER_SIZE
    warmup: int = DEFAULT_WARMUP
    """Unrecorded batches at each size before its timed ones."""
    energy_window_s: float = DEFAULT_ENERGY_WINDOW_S
    budget_s: float | None = None
    """Wall-clock bound of the whole sweep (``profile: auto``): runs per size are cut to fit; None = none."""
    min_runs: int = 5
    """With a budget: fewest timed batches a size needs to count."""
    max_energy_window_s: float = DEFAULT_MAX_ENERGY_WINDOW_S
    """The energy run goes on past ``energy_window_s`` until the counter has stepped twice, up to this
    (or ``energy_window_s``, the longer)."""

    def __post_init__(self) -> None:
        if not self.sizes or any(b < 1 for b in self.sizes) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes must be increasing batch sizes >= 1, got {list(self.sizes)}")
        if self.runs_per_size < 2:
            raise ValueError(f"runs per size must be >= 2 (a mean and its spread), got {self.runs_per_size}")
        if self.warmup < 0:
            raise ValueError(f"warm-up must be >= 0 batches, got {self.warmup}")
        if self.budget_s is not None and not (math.isfinite(self.budget_s) and self.budget_s > 0):
            raise ValueError(f"budget must be > 0 seconds, got {self.budget_s!r}")
        if not (self.energy_window_s > 0 and self.max_energy_window_s > 0):
            raise ValueError(f"energy windows must be > 0 seconds, got {self.energy_window_s!r} and "
                             f"{self.max_energy_window_s!r}")


def parse_sizes(text: str, max_batch: int) -> tuple[int, ...]:
    """``all``, ``default`` (powers of two up to B, and B) or a comma-separated list, checked against B."""
    text = text.strip()
    if text == "all":
        return tuple(range(1, max_batch + 1))
    if text in ("", "default"):
        sizes = {1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch}
        return tuple(sorted(sizes | {max_batch}))
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"--sizes must be 'all' or comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"--sizes must be batch sizes >= 1, got {text!r}")
    above = [b for b in sizes if b > max_batch]
    if above:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"--sizes {above} above the largest batch {max_batch} (the model's max_batch_size or "
                           "--max-batch)")
    return tuple(sizes)


@dataclass(frozen=True)
class SizeRun:
    """What happened at one batch size."""

    batch_size: int
    samples_s: np.ndarray
    error: str | None = None
    """Why the size stopped (the first failed request), or None."""
    busy_power_w: float | None = None
    """Measured: mean GPU power over a back-to-back run of this size, watts."""
    cycle_s: float | None = None
    """Measured: wall time per batch over that run, seconds (so energy per batch = power x cycle)."""


Progress = Callable[[int, int, int, int], None]
"""(size index, number of sizes, batches done at this size, batches planned at this size)."""


async def sweep(client: TritonModelClient, synth: InputSynthesizer, plan: SweepPlan,
                progress: Progress | None = None, meter: GpuMeter | None = None) -> list[SizeRun]:
    """Time batches of each size one at a time; a size whose request fails is recorded and skipped."""
    out: list[SizeRun] = []
    started = time.monotonic()
    n_sizes = len(plan.sizes)
    for k, b in enumerate(plan.sizes):
        runs = plan.runs_per_size
        if plan.budget_s is not None:
            left = plan.budget_s - (time.monotonic() - started)
            if left <= 0:
                out.append(SizeRun(b, np.empty(0), "the sweep's time budget was spent before this size"))
                continue
        req = synth.request(b)
        samples: list[float] = []
        error = None
        try:
            for _ in range(plan.warmup):
                await client.timed_infer(req)
            for j in range(runs):
                samples.append(await client.timed_infer(req))
                if progress is not None:
                    progress(k, n_sizes, j + 1, runs)
                if plan.budget_s is not None and j + 1 >= plan.min_runs:
                    # share what is left of the budget among this and the sizes still to come
                    left = plan.budget_s - (time.monotonic() - started)
                    mean = float(np.mean(samples))
                    if left < mean * (plan.min_runs + plan.warmup) * (n_sizes - k - 1) + mean:
                        break
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            log.warning("profiling batch size %d failed: %s", b, error)
        power = cycle = None
        if error is None and meter is not None:
            power, cycle, error = await _energy_window(client, req, plan.energy_window_s, meter,
                                                       plan.max_energy_window_s)
        out.append(SizeRun(b, np.asarray(samples if error is None else [], dtype=float), error, power, cycle))
    return out


async def _energy_window(client: TritonModelClient, req, window_s: float, meter: GpuMeter,
                         max_window_s: float | None = None) -> tuple[float | None, float | None, str | None]:
    """Run one size back to back for ``window_s``, and on until the GPU's energy counter has stepped twice
    (a slope), at most ``max_window_s``, while the counter is read."""
    longest = window_s if max_window_s is None else max(window_s, max_window_s)
    rec = meter.recording().start()
    n = 0
    t0 = time.monotonic()
    try:
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= longest or (elapsed >= window_s and rec.steps >= 2):
                break
            await client.timed_infer(req)
            n += 1
    except grpc.aio.AioRpcError as exc:
        rec.stop()
        return None, None, f"{exc.code().name}: {exc.details()}"
    elapsed = time.monotonic() - t0
    power = await asyncio.get_running_loop().run_in_executor(None, rec.stop)
    return power, elapsed / n, None


# ---------------------------------------------------------------------------------------------------
# Statistics and the report


@dataclass(frozen=True)
class SizeStats:
    batch_size: int
    n: int
    mean_s: float
    std_s: float
    ci_lo_s: float
    ci_hi_s: float
    """CONFIDENCE interval of the mean (Student t)."""
    cv: float
    first_half_mean_s: float
    second_half_mean_s: float
    drift: float
    """(second half - first half) / first half."""
    drift_p: float
    """Welch's t-test p-value of the halves' difference."""
    drifted: bool
    energy_j: float
    """e(b): measured, or modelled busy power x mean_s."""
    busy_power_w: float

    @classmethod
    def of(cls, batch_size: int, samples: np.ndarray, busy_power_w: float,
           energy_j: float | None = None) -> "SizeStats":
        from scipy import stats

        x = np.asarray(samples, dtype=float)
        n = x.size
        mean = float(x.mean())
        std = float(x.std(ddof=1)) if n > 1 else 0.0
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.inf
        a, b = x[: n // 2], x[n // 2:]
        m1, m2 = float(a.mean()), float(b.mean())
        p = 1.0
        if a.size >= 2 and b.size >= 2 and max(a.std(), b.std()) > 1e-9 * mean:
            with warnings.catch_warnings():  # one half constant: scipy warns of precision, p stays right
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        drift = (m2 - m1) / m1
        return cls(batch_size, n, mean, std, mean - half, mean + half, float(x.std()) / mean, m1, m2, drift, p,
                   bool(abs(drift) > DRIFT_RELATIVE and p < DRIFT_P_VALUE),
                   busy_power_w * mean if energy_j is None else energy_j, busy_power_w)


@dataclass(frozen=True)
class ProfileReport:
    """A finished profile: per-size statistics, the samples, what failed, and how power was obtained."""

    model: str
    version: str
    triton_url: str
    config_hash: str
    instances: int
    instances_in_config: int
    max_batch: int
    sizes: tuple[SizeStats, ...]
    samples: dict[int, np.ndarray]
    failed: dict[int, str]
    power: PowerKind
    power_source: str
    idle_power_w: float | None
    """Measured P0 (GPU idle power), watts; None when power is not measured."""
    runs_per_size: int
    warmup: int
    created: str
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """At least two sizes worked: enough for a profile."""
        return len(self.sizes) >= 2

    @property
    def power_line(self) -> str:
        if self.power is PowerKind.MEASURED:
            idle = f", idle P0 {self.idle_power_w:.1f} W" if self.idle_power_w is not None else ""
            return f"power: measured ({self.power_source}{idle})"
        if self.power is PowerKind.MODELLED:
            return f"power: modelled ({self.power_source})"
        return ("power: none (busy_power_w 0 written: give --power-from CSV or --power-model A,B for the "
                "energy of a batch)")

    def service_profile(self) -> ServiceProfile:
        s = self.sizes
        if self.power is PowerKind.MEASURED:
            return ServiceProfile.from_table([x.batch_size for x in s], [x.mean_s for x in s],
                                             [x.energy_j for x in s], [x.cv for x in s], source=self.model)
        return ServiceProfile.from_table([x.batch_size for x in s], [x.mean_s for x in s], None,
                                         [x.cv for x in s], source=self.model,
                                         busy_power_w=[x.busy_power_w for x in s])


def monotonicity_warnings(sizes: Sequence[SizeStats]) -> list[str]:
    """A warning for every size whose mean time is below a smaller size's (the profile is still written)."""
    out = []
    for prev, cur in zip(sizes, sizes[1:]):
        if cur.mean_s < prev.mean_s:
            noise = "within" if cur.ci_hi_s >= prev.ci_lo_s else "beyond"
            out.append(f"profile not monotone in b: tau({cur.batch_size}) = {cur.mean_s * 1e3:.3f} ms < "
                       f"tau({prev.batch_size}) = {prev.mean_s * 1e3:.3f} ms ({noise} the 95% intervals)")
    return out


def build_report(spec: ModelSpec, triton_url: str, runs: Sequence[SizeRun], plan: SweepPlan, *,
                 power_model: PowerModel | None, measured_idle_w: float | None = None,
                 instances: int | None = None) -> ProfileReport:
    measured = any(r.busy_power_w is not None for r in runs if r.error is None)
    by_size = {r.batch_size: r for r in runs}
    stats: list[SizeStats] = []
    failed: dict[int, str] = {}
    warnings: list[str] = []
    for r in runs:
        if r.error is not None or r.samples_s.size < 2:
            failed[r.batch_size] = r.error or f"only {r.samples_s.size} batch(es) timed"
            continue
        if measured:
            if r.busy_power_w is None or r.cycle_s is None:
                failed[r.batch_size] = "the GPU energy counter did not move during its window"
                continue
            # energy of one batch: the board's mean power over the back-to-back window x the time per batch
            energy = r.busy_power_w * r.cycle_s
            stats.append(SizeStats.of(r.batch_size, r.samples_s, energy / float(r.samples_s.mean()), energy))
        else:
            p = power_model.busy_power_w(r.batch_size) if power_model is not None else 0.0
            stats.append(SizeStats.of(r.batch_size, r.samples_s, p))
    stalls = {s.batch_size: int(np.sum(by_size[s.batch_size].samples_s > STALL_FACTOR * np.median(
        by_size[s.batch_size].samples_s))) for s in stats}
    stalled = {b: k for b, k in stalls.items() if k}
    if stalled:
        where = ", ".join(f"{k} at b={b}" for b, k in stalled.items())
        why = (" Model '%s' has dynamic_batching on: Triton 2.51 was seen holding a lone request for its 500 ms "
               "idle wait; the gate forms the batches itself, so consider removing dynamic_batching from the "
               "model's config (and profile again)." % spec.name) if spec.dynamic_batching else ""
        warnings.append(f"{sum(stalled.values())} batch(es) took over {STALL_FACTOR:g}x their size's median "
                        f"({where}); they are kept in the means.{why}")
    for s in stats:
        if s.drifted:
            warnings.append(f"batch size {s.batch_size} drifted: second half of its samples "
                            f"{s.drift * 100:+.1f}% against the first (Welch p = {s.drift_p:.3g}); the machine's "
                            "load changed during the sweep?")
    warnings += monotonicity_warnings(stats)
    if stats and stats[0].batch_size != 1:
        warnings.append("batch size 1 is not in the profile: the solver needs it")
    for b, why in failed.items():
        warnings.append(f"batch size {b} failed: {why}")
    if measured:
        power, source = PowerKind.MEASURED, "Triton's nv_energy_consumption over back-to-back runs"
    elif power_model is not None:
        power, source = PowerKind.MODELLED, power_model.description
    else:
        power, source = PowerKind.NONE, ""
    return ProfileReport(
        model=spec.name, version=spec.version, triton_url=triton_url, config_hash=spec.config_hash,
        instances=instances or spec.instances, instances_in_config=spec.instances, max_batch=max(plan.sizes),
        sizes=tuple(stats), samples={s.batch_size: by_size[s.batch_size].samples_s for s in stats},
        failed=failed, power=power, power_source=source,
        idle_power_w=measured_idle_w if measured else None, runs_per_size=plan.runs_per_size,
        warmup=plan.warmup, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------------------------------------
# Outputs


def metadata_lines(report: ProfileReport) -> list[str]:
    v = report.version or "latest"
    return [
        f"smdp profile of model {report.model} (version {v}, config {report.config_hash}) on Triton "
        f"{report.triton_url}, {report.created}",
        f"tau(b): dispatch to completion of one ModelInfer of b rows, one at a time, {report.runs_per_size} per "
        f"size after {report.warmup} warm-up; instances: {report.instances}",
        report.power_line,
    ]


def write_profile_csv(report: ProfileReport, path: Path) -> Path:
    """The solver's profile CSV, with '#' comment lines on top saying where it came from and how the
    power was obtained (the solver's reader skips them)."""
    measured = report.power is PowerKind.MEASURED
    energy_col = "batch_energy_j" if measured else "busy_power_w"
    lines = [f"# {m}" for m in metadata_lines(report)]
    lines.append(f"batch_size,mean_service_s,{energy_col},service_cv")
    for s in report.sizes:
        e = s.energy_j if measured else s.busy_power_w
        lines.append(f"{s.batch_size},{s.mean_s!r},{e!r},{s.cv!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_samples_csv(report: ProfileReport, path: Path) -> Path:
    """Every timed batch: ``batch_size,service_s`` (``smdp solve --samples``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["batch_size", "service_s"])
        for b, xs in sorted(report.samples.items()):
            for x in xs:
                w.writerow([b, repr(float(x))])
    return path


def plot_profile(report: ProfileReport, path: Path) -> Path:
    """tau(b) with its confidence band and the samples, and e(b) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = np.array([s.batch_size for s in report.sizes])
    mean = np.array([s.mean_s for s in report.sizes]) * 1e3
    lo = np.array([s.ci_lo_s for s in report.sizes]) * 1e3
    hi = np.array([s.ci_hi_s for s in report.sizes]) * 1e3
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in report.sizes:
        xs = report.samples[s.batch_size] * 1e3
        ax.scatter(np.full(xs.size, s.batch_size), xs, s=6, alpha=0.25, color="tab:blue")
    ax.fill_between(b, lo, hi, alpha=0.3, color="tab:blue", label="95% CI of the mean")
    ax.plot(b, mean, "o-", color="tab:blue", label="tau(b), mean")
    ax.set_xlabel("batch size b")
    ax.set_ylabel("service time, ms")
    if b.size and b.max() / max(b.min(), 1) >= 16:
        ax.set_xscale("log", base=2)
    ax2 = ax.twinx()
    e = np.array([s.energy_j for s in report.sizes])
    ax2.plot(b, e, "s--", color="tab:red", label=f"e(b), J ({report.power.value})")
    ax2.set_ylabel(f"energy per batch, J ({report.power.value})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title(f"{report.model}: {report.power_line}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_json(report: ProfileReport) -> dict:
    def num(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else x

    return {
        "model": report.model, "version": report.version, "triton": report.triton_url,
        "config_hash": report.config_hash, "created": report.created,
        "instances": report.instances, "instances_in_config": report.instances_in_config,
        "power": report.power.value, "power_source": report.power_source, "power_note": report.power_line,
        "idle_power_w": num(report.idle_power_w),
        "runs_per_size": report.runs_per_size, "warmup": report.warmup, "confidence": CONFIDENCE,
        "sizes": [{
            "batch_size": s.batch_size, "n": s.n, "mean_service_s": s.mean_s, "std_s": s.std_s,
            "ci_lo_s": num(s.ci_lo_s), "ci_hi_s": num(s.ci_hi_s), "service_cv": s.cv,
            "batch_energy_j": s.energy_j, "busy_power_w": s.busy_power_w,
            "drift": {"first_half_mean_s": s.first_half_mean_s, "second_half_mean_s": s.second_half_mean_s,
                      "relative": s.drift, "p_value": s.drift_p, "drifted": s.drifted},
        } for s in report.sizes],
        "failed": [{"batch_size": b, "error": e} for b, e in sorted(report.failed.items())],
        "warnings": list(report.warnings),
        "ok": report.ok,
    }


def format_table(report: ProfileReport) -> str:
    lines = [f"{m}" for m in metadata_lines(report)]
    head = f"{'b':>5} {'n':>4} {'tau ms':>9} {'95% CI ms':>21} {'cv':>6} {'drift':>7} {'e(b) J':>9}"
    lines += [head, "-" * len(head)]
    for s in report.sizes:
        lines.append(f"{s.batch_size:5d} {s.n:4d} {s.mean_s * 1e3:9.3f} [{s.ci_lo_s * 1e3:9.3f},{s.ci_hi_s * 1e3:9.3f}] "
                     f"{s.cv:6.3f} {s.drift * 100:+6.1f}%{'!' if s.drifted else ' '}{s.energy_j:9.4g}")
    for b, e in sorted(report.failed.items()):
        lines.append(f"{b:5d} failed: {e}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# One call for the CLI, the sidecar and the load tests


@dataclass(frozen=True)
class ProfileRequest:
    triton_url: str
    model: str
    version: str = ""
    sizes: str = "default"
    """'all', 'default' (powers of two and B) or a comma-separated list."""
    max_batch: int | None = None
    runs_per_size: int = DEFAULT_RUNS_PER_SIZE
    warmup: int = DEFAULT_WARMUP
    input_data: Path | None = None
    power_from: Path | None = None
    power_model: str | None = None
    metrics_url: str | None = "auto"
    """Triton's metrics endpoint for GPU power: 'auto' = Triton's host, the port after its gRPC port
    (plugin.loop.telemetry.metrics_url_for); None = not read."""
    instances: int | None = None
    budget_s: float | None = None
    energy_window_s: float = DEFAULT_ENERGY_WINDOW_S
    timeout_s: float = 60.0
    seed: int = 0

    def resolved_metrics_url(self) -> str | None:
        from plugin.loop.telemetry import metrics_url_for

        return metrics_url_for(self.metrics_url, self.triton_url)


def _power_model(req: ProfileRequest) -> PowerModel | None:
    if req.power_from is not None and req.power_model is not None:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, "give one of --power-from and --power-model, not both")
    if req.power_from is not None:
        try:
            return PowerModel.from_profile(req.power_from)
        except ModelError as exc:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"--power-from: {exc}") from None
    if req.power_model is not None:
        return PowerModel.affine(req.power_model)
    return None


async def profile_model(req: ProfileRequest, progress: Progress | None = None,
                        say: Callable[[str], None] | None = None) -> ProfileReport:
    """Read the model's config, sweep its sizes, and return the report (raises ProfileError)."""
    client = TritonModelClient(req.triton_url, timeout_s=req.timeout_s)
    try:
        spec = await client.model_spec(req.model, req.version)
        return await profile_spec(client, spec, req, progress, say)
    finally:
        await client.close()


async def profile_spec(client: TritonModelClient, spec: ModelSpec, req: ProfileRequest,
                       progress: Progress | None = None, say: Callable[[str], None] | None = None) -> ProfileReport:
    """Sweep the sizes of a model whose config was read (raises ProfileError)."""
    power_model = _power_model(req)
    if req.instances is not None and req.instances < 1:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"--instances must be >= 1, got {req.instances}")
    top = spec.max_batch_size
    if req.max_batch is not None:
        if req.max_batch < 1:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, f"--max-batch must be >= 1, got {req.max_batch}")
        if req.max_batch > spec.max_batch_size:
            raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"--max-batch {req.max_batch} is above model '{spec.name}''s max_batch_size "
                               f"{spec.max_batch_size}")
        top = req.max_batch
    sizes = parse_sizes(req.sizes, top)
    try:
        plan = SweepPlan(sizes, req.runs_per_size, req.warmup, req.energy_window_s, req.budget_s)
    except ValueError as exc:
        raise ProfileError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    examples = read_input_data(req.input_data, spec) if req.input_data is not None else None
    synth = InputSynthesizer(spec, examples, seed=req.seed)
    meter = None
    idle = None
    url = req.resolved_metrics_url()
    loop = asyncio.get_running_loop()
    if url is not None:
        candidate = GpuMeter(url)
        if await loop.run_in_executor(None, candidate.available):
            meter = candidate
            if say is not None:
                say(f"Triton reports GPU energy at {url}: measuring power (idle first)")
            idle = await loop.run_in_executor(None, meter.idle_power_w, 1.0)
    runs = await sweep(client, synth, plan, progress, meter)
    return build_report(spec, req.triton_url, runs, plan, power_model=power_model, measured_idle_w=idle,
                        instances=req.instances)


# ---------------------------------------------------------------------------------------------------
# Reading a written profile's metadata back

_POWER_LINE = re.compile(r"^#\s*power:\s*(\w+)")


def profile_power_kind(path: Path) -> PowerKind | None:
    """The ``# power: ...`` line of a profile CSV written by the profiler (None: not one of ours)."""
    try:
        with path.open() as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                m = _POWER_LINE.match(line)
                if m:
                    return PowerKind(m.group(1))
    except (OSError, ValueError):
        return None
    return None


__all__ = [
    "ProfileError", "InputSpec", "ModelSpec", "InputSynthesizer", "TritonModelClient", "PowerKind", "PowerModel",
    "GpuMeter", "counter_power_w", "SweepPlan", "parse_sizes", "SizeRun", "sweep", "SizeStats", "ProfileReport",
    "build_report", "monotonicity_warnings", "write_profile_csv", "write_samples_csv", "plot_profile",
    "report_json", "format_table", "ProfileRequest", "profile_model", "profile_spec", "read_input_data", "profile_power_kind",
    "check_profilable",
]
