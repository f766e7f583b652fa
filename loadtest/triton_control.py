"""Reload a Triton model with a changed batching configuration, and put the original back.

Triton applies a ``dynamic_batching`` change only through the repository API's load with a config
override (the model is swapped in the background). A plain ``load_model(name)`` afterwards does
*not* return to the file's config when the files are unchanged, so the original is captured first
and restored explicitly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchingOverride", "ModelConfigControl"]


@dataclass(frozen=True)
class BatchingOverride:
    """What a contender changes in the model's config; None leaves a field as it was."""

    max_queue_delay_us: int | None = None
    time_scale: float | None = None
    """The emulated model's ``time_scale`` parameter (service times multiplied by it)."""
    preferred_batch_size: tuple[int, ...] | None = None
    """Triton's ``preferred_batch_size`` list (config mode); None leaves the model's own."""
    instances: int | None = None
    """The model's instance_group count (its first group); None leaves it."""
    dynamic_batching: bool = True
    """False removes the ``dynamic_batching`` section: Triton then runs each request as it comes,
    which is what a merging gate wants (its requests are already the batches). It also avoids a
    stall seen with Triton 2.51's batcher when exactly one request at a time reaches it right after
    the previous one completes: the batcher sometimes sleeps its 500 ms default wait."""

    def __post_init__(self) -> None:
        if self.max_queue_delay_us is not None and (not isinstance(self.max_queue_delay_us, int)
                                                    or self.max_queue_delay_us < 0):
            raise ValueError(f"max_queue_delay_us must be an integer >= 0, got {self.max_queue_delay_us!r}")
        if self.preferred_batch_size is not None:
            sizes = tuple(int(p) for p in self.preferred_batch_size)
            if not sizes or any(p < 1 for p in sizes) or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"preferred_batch_size must be increasing sizes >= 1, got {self.preferred_batch_size!r}")
            object.__setattr__(self, "preferred_batch_size", sizes)
        if self.time_scale is not None and not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale!r}")


class ModelConfigControl:
    """Apply overrides to one model on one Triton; ``restore()`` reloads the config it found."""

    def __init__(self, triton_url: str, model: str) -> None:
        import tritonclient.grpc as grpcclient

        self.model = model
        self._client = grpcclient.InferenceServerClient(triton_url)
        self._original: dict[str, Any] = self._client.get_model_config(model, as_json=True)["config"]
        self.current: dict[str, Any] = copy.deepcopy(self._original)

    @property
    def max_batch(self) -> int:
        return int(self._original.get("max_batch_size", 0))

    def config_with(self, override: BatchingOverride) -> dict[str, Any]:
        cfg = copy.deepcopy(self._original)
        if not override.dynamic_batching:
            cfg.pop("dynamic_batching", None)
        elif override.max_queue_delay_us is not None or override.preferred_batch_size is not None:
            if "dynamic_batching" not in cfg:
                raise ValueError(f"model {self.model!r} has no dynamic_batching section to change")
            if override.max_queue_delay_us is not None:
                cfg["dynamic_batching"]["max_queue_delay_microseconds"] = str(override.max_queue_delay_us)
            if override.preferred_batch_size is not None:
                big_b = self.max_batch
                if override.preferred_batch_size[-1] > big_b:
                    raise ValueError(f"preferred batch size {override.preferred_batch_size[-1]} exceeds model "
                                     f"{self.model!r}'s max_batch_size {big_b}")
                cfg["dynamic_batching"]["preferred_batch_size"] = list(override.preferred_batch_size)
        if override.instances is not None:
            groups = cfg.get("instance_group") or [{"kind": "KIND_CPU"}]
            cfg["instance_group"] = [dict(groups[0], count=int(override.instances))]
        if override.time_scale is not None:
            cfg.setdefault("parameters", {})["time_scale"] = {"string_value": repr(float(override.time_scale))}
        return cfg

    def apply(self, override: BatchingOverride) -> None:
        """Reload the model with ``override`` (blocks until Triton reports it loaded)."""
        cfg = self.config_with(override)
        if cfg == self.current:
            return
        self._client.load_model(self.model, config=json.dumps(cfg))
        self.current = cfg

    def restore(self) -> None:
        if self.current != self._original:
            self._client.load_model(self.model, config=json.dumps(self._original))
            self.current = copy.deepcopy(self._original)

    def close(self) -> None:
        self._client.close()
