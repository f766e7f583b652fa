"""What the solver is told in the load tests: the emulated GPU's published table for what the model
itself does, and a measured profile for what the stack adds.

The emulated model sleeps tau(b) of the (time-scaled) published table, but a batch holds the gate's
slot longer: the merged request's gRPC round trip, Triton's scheduling and the Python backend's IPC
come on top. ``smdp profile`` measures that hold on the model exactly as the gate contenders run it
(time scale applied, Triton's batcher off), once per model config (cached). The solver's profile is
then the measured tau(b) and CV, with the energy of a batch taken from the table (the ground truth of
what the emulated GPU draws) plus idle power P0 for the time the stack adds, during which the GPU
would sit idle: exactly how the bench's measurement charges it (loadtest/metrics.py), so predicted
and measured power count the same joules.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from plugin.auto_profile import auto_profile
from plugin.config import ModelPolicyConfig
from solver.model import ServiceProfile

from .triton_control import BatchingOverride, ModelConfigControl

STACK_PROFILE_BUDGET_S = 60.0
"""Longest the one-off sweep of the stack may take, seconds."""


def compose(measured: ServiceProfile, emulated: ServiceProfile, idle_power_w: float) -> ServiceProfile:
    """Measured times and CVs; energy e(b) of the table plus P0 x (measured - table time)."""
    top = min(measured.max_batch, emulated.max_batch)
    tau = measured.mean_s[:top]
    extra = np.maximum(tau - emulated.mean_s[:top], 0.0)
    return ServiceProfile(mean_s=tau, energy_j=emulated.energy_j[:top] + idle_power_w * extra,
                          cv=measured.cv[:top], interpolated=measured.interpolated,
                          source=f"measured stack + {emulated.source or 'table'} energy")


def write_composed_csv(profile: ServiceProfile, path: Path, note: str) -> Path:
    rows = [f"# {note}", "# power: modelled (the emulated GPU's table energy, P0 for the time the stack adds)",
            "batch_size,mean_service_s,batch_energy_j,service_cv"]
    for b in range(1, profile.max_batch + 1):
        rows.append(f"{b},{profile.mean_s[b - 1]!r},{profile.energy_j[b - 1]!r},{profile.cv[b - 1]!r}")
    path.write_text("\n".join(rows) + "\n")
    return path


def stack_profile(triton_url: str, control: ModelConfigControl, model: str, time_scale: float,
                  emulated: ServiceProfile, idle_power_w: float, out_dir: Path,
                  progress: Callable[[str], None] = print) -> tuple[ServiceProfile, Path]:
    """The profile the solver is told, measured on this stack (cached under ``out_dir``)."""
    control.apply(BatchingOverride(time_scale=time_scale, dynamic_batching=False))
    cfg = ModelPolicyConfig(policy="smdp", profile="auto", profile_auto_s=STACK_PROFILE_BUDGET_S,
                            max_batch=emulated.max_batch)
    got = asyncio.run(auto_profile(triton_url, model, "", cfg, out_dir / "profile-cache", metrics_url=None))
    if got.path is None:
        raise ValueError(f"model {model!r}: could not profile the stack: {got.reason}")
    progress(f"stack profile of {model}: {got.reason}")
    measured = ServiceProfile.from_csv(got.path)
    if measured.max_batch < emulated.max_batch:
        raise ValueError(f"the stack profile reaches b = {measured.max_batch} only, the model batches up to "
                         f"{emulated.max_batch}")
    prof = compose(measured, emulated, idle_power_w)
    added = prof.mean_s - emulated.mean_s
    progress(f"the stack adds {added.min() * 1e3:.2f}-{added.max() * 1e3:.2f} ms per batch to the table's "
             f"tau(b) ({emulated.mean_s[0] * 1e3:.1f} ms at b = 1)")
    path = write_composed_csv(prof, out_dir / f"{model}_stack_x{time_scale:g}.csv",
                              f"tau(b) measured on the stack ({got.path.name}); energy from {emulated.source}")
    return prof, path


@dataclass(frozen=True)
class RequestHop:
    """What a request's answer takes beyond its batch's slot (tau(b) above), as the load generator sees it:
    its own send and receive path, and for gate contenders the hop through the sidecar. Measured with
    lone requests (nothing queued) as the median of latency - tau(1); added to the solver's W."""

    direct_s: float
    gate_s: float


HOP_REQUESTS = 30
"""Lone requests per path; the first HOP_SKIPPED (a fresh channel, the sidecar's config fetch) not counted."""
HOP_SKIPPED = 5


def request_hops(triton_url: str, control: ModelConfigControl, model: str, time_scale: float, max_batch: int,
                 tau1_s: float, data_plane: str, log_dir: Path,
                 progress: Callable[[str], None] = print) -> RequestHop:
    from .openloop import run_open_loop
    from .stack import SidecarProcess, SidecarSpec

    control.apply(BatchingOverride(time_scale=time_scale, dynamic_batching=False))
    times = np.arange(HOP_REQUESTS) * (3 * tau1_s + 0.005)  # each alone: the last one long done

    def hop(target: str) -> float:
        res = run_open_loop(target, model, times, timeout_s=30.0, drain_grace_s=1.0)
        lat = (res.done_s - res.scheduled_s)[HOP_SKIPPED:][res.ok[HOP_SKIPPED:]]
        if lat.size < 5:
            raise ValueError(f"only {lat.size} lone requests to {target} were answered")
        return float(np.median(lat)) - tau1_s

    direct = hop(triton_url)
    sidecar = SidecarProcess(triton_url, SidecarSpec(policy="greedy", max_batch=max_batch, data_plane=data_plane),
                             log_path=log_dir / "sidecar-hop.log").start()
    try:
        gate = hop(sidecar.url)
    finally:
        sidecar.stop()
    progress(f"a lone request's answer takes {direct * 1e3:.2f} ms beyond tau(1) straight to Triton, "
             f"{gate * 1e3:.2f} ms through the {data_plane} gate (added to the solver's W)")
    return RequestHop(direct, gate)
