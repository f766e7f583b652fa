"""Where a model's instances run, read from its config as Triton serves it: k instances, D devices.

Triton feeds all instances of a model from one queue; ``instance_group`` says how many there are and
where. The config Triton returns (``ModelConfig``) is normalised (``NormalizeInstanceGroup`` in Triton
core): KIND_AUTO is resolved to KIND_GPU or KIND_CPU, and a KIND_GPU group that lists no GPUs gets every
supported GPU listed. So from the served config:

- k (``instances``): each group's ``count``, times the number of GPUs it lists for KIND_GPU (Triton
  places ``count`` instances on each listed GPU).
- D (``devices``, the solver's ``BatchingModel.devices``: the idle power P0 is drawn once per device):
  - KIND_GPU: the distinct GPU ids listed over all groups (two groups on GPU 0 share it; count 2 on
    one GPU is one device). A KIND_GPU group that lists none (a config not normalised by Triton) is
    counted as one device.
  - KIND_CPU: every CPU instance runs on the one host, which idles once: the CPU groups together are
    one device. (An emulated accelerator served as KIND_CPU, like this project's ``emulated_gpu``,
    is one device by this reading, whatever its instances emulate.)
  - KIND_MODEL: the model places its instances itself and the config does not say where; each such
    instance is counted as its own device (the conservative reading: no idle power shared).
  - KIND_AUTO left unresolved (a config not from Triton): as KIND_GPU when it lists GPUs, else as
    KIND_CPU, which is what Triton resolves it to on a host without those GPUs.
  D is at most k (each device counted hosts at least one instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

_Group = model_config_pb2.ModelInstanceGroup


@dataclass(frozen=True)
class Placement:
    """k instances fed by one queue, on D devices that each draw the idle power once."""

    instances: int
    devices: int
    why: str
    """How D was counted, in words (for logs and status notes)."""

    def __post_init__(self) -> None:
        if self.instances < 1 or not 1 <= self.devices <= self.instances:
            raise ValueError(f"need 1 <= devices <= instances, got devices={self.devices}, instances={self.instances}")

    def modelled_power_w(self, energy_j: float, busy_s: float, elapsed_s: float, idle_power_w: float) -> float:
        """Mean power over ``elapsed_s`` from the batches' profile energy ``energy_j`` and their summed busy
        time ``busy_s`` (over all instances): D P0 plus each running batch's increment over P0, i.e.
        (energy + P0 x idle instance-time) / elapsed - (k - D) P0, the idle instance-time k x elapsed -
        busy floored at 0 (a profile slower than the stack). k = D = 1: (energy + P0 idle) / elapsed."""
        idle = max(0.0, self.instances * elapsed_s - busy_s)
        return (energy_j + idle_power_w * idle) / elapsed_s - (self.instances - self.devices) * idle_power_w


def placement(cfg: model_config_pb2.ModelConfig) -> Placement:
    """k and D of a model config (the module doc); a config without instance groups is one instance."""
    instances = 0
    gpus: set[int] = set()
    unlisted_gpu_groups = 0
    host = False
    model_placed = 0
    for g in cfg.instance_group:
        count = max(g.count, 1)
        kind = g.kind
        if kind == _Group.KIND_AUTO:
            kind = _Group.KIND_GPU if len(g.gpus) > 0 else _Group.KIND_CPU
        if kind == _Group.KIND_GPU:
            if len(g.gpus) > 0:
                instances += count * len(g.gpus)
                gpus.update(int(x) for x in g.gpus)
            else:
                instances += count
                unlisted_gpu_groups += 1
        elif kind == _Group.KIND_MODEL:
            instances += count
            model_placed += count
        else:
            instances += count
            host = True
    if instances == 0:
        return Placement(1, 1, "no instance_group: one instance")
    parts = []
    if gpus:
        parts.append(f"{len(gpus)} GPU(s) listed")
    if unlisted_gpu_groups:
        parts.append(f"{unlisted_gpu_groups} KIND_GPU group(s) listing no GPU, one device each")
    if host:
        parts.append("the host for KIND_CPU")
    if model_placed:
        parts.append(f"{model_placed} KIND_MODEL instance(s), one device each")
    devices = min(len(gpus) + unlisted_gpu_groups + int(host) + model_placed, instances)
    return Placement(instances, devices, "; ".join(parts))


def placement_of_json(cfg: Mapping[str, object]) -> Placement:
    """``placement`` of a config in Triton's JSON form (``get_model_config(..., as_json=True)``)."""
    return placement(json_format.ParseDict(cfg, model_config_pb2.ModelConfig(), ignore_unknown_fields=True))
