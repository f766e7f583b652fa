"""Triton Python-backend model that behaves like a GPU running a batch with a published profile.

On a CPU-only machine the physics that makes batching worthwhile (a batch of 64 costs far less than
64 batches of 1) is missing, so this model supplies it: every execution holds the model instance for
tau(b) seconds, where b is the batch Triton's batcher actually formed, and reports the energy e(b)
that the profiled GPU would have drawn. Everything around it (Triton's queue and batcher, gRPC, the
gate) is real; only the accelerator is modelled, and so is its power.

Config parameters (all optional, string values as Triton requires):
  profile_csv  profile file, relative to the model directory or absolute (default v100_resnet50.csv)
  time_scale   multiplies every service time (default 1; 0.1 runs a ten times faster "GPU")
  jitter_cv    coefficient of variation of a gamma-distributed service time (default 0 =
               deterministic); "profile" takes the CSV's service_cv column instead
  seed         seed of the jitter's random generator (default 0)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from profile_table import ProfileError, ProfileTable, jittered


def _parameter(config: dict, name: str, default: str) -> str:
    value = config.get("parameters", {}).get(name, {}).get("string_value", "")
    return value.strip() or default


def _positive_float(name: str, text: str, allow_zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise pb_utils.TritonModelException(f"parameter {name} must be a number, got {text!r}") from None
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise pb_utils.TritonModelException(f"parameter {name} must be a finite number {bound}, got {text!r}")
    return value


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.max_batch = int(config.get("max_batch_size", 0))
        if self.max_batch < 1:
            raise pb_utils.TritonModelException("emulated_gpu needs max_batch_size >= 1 (it models batching)")
        profile_path = Path(_parameter(config, "profile_csv", "v100_resnet50.csv"))
        if not profile_path.is_absolute():
            profile_path = Path(args["model_repository"]) / profile_path
        try:
            self.profile = ProfileTable.from_csv(profile_path, self.max_batch)
        except ProfileError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.time_scale = _positive_float("time_scale", _parameter(config, "time_scale", "1"))
        jitter = _parameter(config, "jitter_cv", "0")
        if jitter == "profile":
            self.jitter_cv = self.profile.cv.copy()
        else:
            self.jitter_cv = np.full(self.max_batch, _positive_float("jitter_cv", jitter, allow_zero=True))
        seed = _parameter(config, "seed", "0")
        try:
            self.rng = np.random.default_rng(int(seed))
        except ValueError:
            raise pb_utils.TritonModelException(f"parameter seed must be an integer, got {seed!r}") from None

    def _service_time(self, b: int) -> float:
        """One draw of S_b in seconds: the profile's mean, gamma-jittered with the configured CV."""
        return jittered(self.profile.service_s(b) * self.time_scale, float(self.jitter_cv[b - 1]), self.rng)

    def execute(self, requests: list) -> list:
        started = time.perf_counter()
        inputs = [pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() for r in requests]
        b = int(sum(x.shape[0] for x in inputs))
        try:
            deadline = started + self._service_time(b)
            energy = self.profile.energy(b)
        except ProfileError as exc:
            error = pb_utils.TritonError(str(exc))
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]

        responses = []
        for x in inputs:
            rows = x.shape[0]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("OUTPUT0", (2.0 * x + 1.0).astype(np.float32)),
                        pb_utils.Tensor("BATCH_SIZE", np.full((rows, 1), b, dtype=np.int32)),
                        pb_utils.Tensor("BATCH_ENERGY_J", np.full((rows, 1), energy, dtype=np.float32)),
                    ]
                )
            )
        # Sleep (never spin: the host's cores are shared) until the batch's service time is over.
        while (remaining := deadline - time.perf_counter()) > 0:
            time.sleep(remaining)
        return responses

    def finalize(self) -> None:
        pass
