"""``profile: auto``: the sidecar measures a model's profile before its gate opens, once per model config.

A short sweep (``smdp profile``'s, bounded by ``profile_auto_s``) over a spread of batch sizes, on
the same path the gate will use, written as a profile CSV into ``profile_cache_dir`` under a name
made of the model's name, version, config hash and largest batch, so that a restart (or the same
model on another sidecar sharing the directory) does not profile again; a changed config profiles
anew. The adaptive controller then takes it as its prior and refines it from live batches.
A model that cannot be profiled gets ``None`` and the reason; the sidecar then gates it greedily.

Requests that arrive during the sweep are held, on both data planes, and served by the model's gate once
it opens: the Python gate's callers wait for the model's state; the native gate, which relays a model
ungated until its policy arrives, is first given ``hold_rule``: a policy that waits whatever the queue,
bounded by the gate's queue (RESOURCE_EXHAUSTED beyond it), each caller's deadline, and a guard of the
sweep's budget plus ``HOLD_GRACE_S`` after which what waits is served.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from typing import Callable

from solver.model import ModelError, ServiceProfile
from solver.policy import GateRule

from .config import ModelPolicyConfig
from .profiler import (
    ModelSpec, ProfileError, ProfileRequest, TritonModelClient, profile_spec, write_profile_csv,
)

log = logging.getLogger("smdp.profiler")

AUTO_RUNS_PER_SIZE = 30
"""Most timed batches per size in the start-up sweep (the time budget usually cuts it shorter)."""
AUTO_WARMUP = 2
HOLD_GRACE_S = 2.0
"""How much longer than the sweep's budget a request may be held before the native gate serves it anyway."""


def hold_rule(max_batch: int, max_queue: int, budget_s: float) -> GateRule:
    """The native gate's rule while a model's sweep runs: wait at every queue length up to ``max_queue``
    (the gate refuses beyond it), serve min(n, B) once the oldest request has waited the sweep's budget
    plus ``HOLD_GRACE_S``."""
    return GateRule(max_batch, (0,) * (max_queue + 1), max_batch, budget_s + HOLD_GRACE_S)


HOLD_MAX_QUEUE = 4096
"""Most requests the native gate holds for a model during its sweep (fewer if the sidecar's max_queue is)."""


def hold_line(model: str, max_batch: int, max_queue: int, budget_s: float) -> str:
    """The native gate's ``policy`` command that holds ``model``'s requests during its sweep (``hold_rule``)."""
    from .native_plane import policy_line

    q = min(max_queue, HOLD_MAX_QUEUE)
    return policy_line(model, hold_rule(max(max_batch, 1), q, budget_s), slots=1, max_queue=q)


@dataclass(frozen=True)
class AutoProfile:
    """What ``profile: auto`` gave a model: a profile CSV, or None and why not."""

    path: Path | None
    reason: str


def cache_path(cache_dir: Path, spec: ModelSpec, max_batch: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)
    return cache_dir / f"{safe}-v{spec.version or 'latest'}-{spec.config_hash}-B{max_batch}.csv"


async def auto_profile(triton_url: str, model: str, version: str, cfg: ModelPolicyConfig, cache_dir: Path,
                       metrics_url: str | None = "auto", timeout_s: float = 60.0,
                       before_sweep: Callable[[int], None] | None = None) -> AutoProfile:
    """The model's cached profile, else a fresh bounded sweep written to the cache; never raises for
    the model's sake (the reason comes back instead). ``before_sweep(max_batch)`` is called just before
    a sweep starts (not for a cached profile): the native plane holds the model's requests from then."""
    client = TritonModelClient(triton_url, timeout_s=timeout_s)
    try:
        try:
            spec = await client.model_spec(model, version)
        except ProfileError as exc:
            return AutoProfile(None, f"cannot read the model's config: {exc}")
        top = min(cfg.max_batch or spec.max_batch_size, spec.max_batch_size)
        path = cache_path(cache_dir, spec, top)
        if path.is_file():
            try:
                ServiceProfile.from_csv(path)
                return AutoProfile(path, f"profile: auto, cached {path.name}")
            except ModelError as exc:
                log.warning("model %s: cached profile %s is unreadable (%s): profiling again", model, path, exc)
        req = ProfileRequest(
            triton_url=triton_url, model=model, version=version, sizes="default", max_batch=top,
            runs_per_size=AUTO_RUNS_PER_SIZE, warmup=AUTO_WARMUP, power_from=cfg.profile_power_from,
            power_model=cfg.profile_power_model, metrics_url=metrics_url, budget_s=cfg.profile_auto_s,
            timeout_s=timeout_s,
        )
        if before_sweep is not None:
            before_sweep(spec.max_batch_size)
        t0 = time.monotonic()
        log.info("model %s: profile: auto, sweeping batch sizes for at most %.0f s before its gate opens",
                 model, cfg.profile_auto_s)
        try:
            report = await profile_spec(client, spec, req, say=lambda m: log.info("model %s: %s", model, m))
        except ProfileError as exc:
            return AutoProfile(None, f"profile: auto failed: {exc}")
        for w in report.warnings:
            log.warning("model %s: profile: auto: %s", model, w)
        if not report.ok:
            failed = "; ".join(f"b={b}: {e}" for b, e in sorted(report.failed.items())[:3])
            return AutoProfile(None, f"profile: auto failed: only {len(report.sizes)} batch size(s) worked ({failed})")
        if report.sizes[0].batch_size != 1:
            return AutoProfile(None, "profile: auto failed: batch size 1 did not work")
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        write_profile_csv(report, tmp)
        tmp.replace(path)  # atomic: a reader sees the whole file or none
        sizes = ",".join(str(s.batch_size) for s in report.sizes)
        return AutoProfile(path, f"profile: auto, measured b={sizes} in {time.monotonic() - t0:.1f} s "
                                 f"({report.power.value} power), cached {path.name}")
    finally:
        await client.close()
