"""What Triton reports about the accelerator: its Prometheus metrics, read over HTTP and parsed, and the
mean power taken from them (or modelled from the profile when it exports none).

Power. ``PowerSource`` uses Triton's Prometheus metrics (``nv_energy_consumption``, a joule counter,
differenced over time; else ``nv_gpu_power_usage``, watts) when the server exports them, and
otherwise models the power from the profile: (energy of the batches served + P0 x idle time) /
elapsed. Every reading says which it is (``modelled``).
"""

from __future__ import annotations

import math
import re
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from plugin.placement import Placement
from solver.model import ServiceProfile
from solver.quantities import check_number


@dataclass(frozen=True)
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_prometheus_text(text: str, names: Iterable[str] | None = None) -> list[MetricSample]:
    """Samples of the Prometheus text exposition format (the subset Triton writes).

    Comments and blank lines are skipped; a malformed sample line raises ValueError naming its line.
    """
    wanted = None if names is None else set(names)
    out: list[MetricSample] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"metrics line {lineno} is not a sample: {raw!r}")
        name, labels_text, value_text = m.groups()
        if wanted is not None and name not in wanted:
            continue
        labels: dict[str, str] = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                if lm is None:
                    raise ValueError(f"metrics line {lineno} has malformed labels: {raw!r}")
                labels[lm.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], lm.group(2))
                pos = lm.end()
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"metrics line {lineno} has a non-numeric value {value_text!r}") from None
        out.append(MetricSample(name, labels, value))
    return out


@dataclass(frozen=True)
class GpuMetrics:
    """Triton's GPU power figures at one scrape, summed over the selected GPUs."""

    power_w: float | None
    """nv_gpu_power_usage: instantaneous board power, watts."""
    energy_j: float | None
    """nv_energy_consumption: joules since Triton started."""
    gpus: int


def gpu_metrics(text: str, gpu_uuids: Sequence[str] | None = None) -> GpuMetrics:
    """Sum ``nv_gpu_power_usage`` and ``nv_energy_consumption`` over the GPUs (all, or those listed)."""
    samples = parse_prometheus_text(text, ("nv_gpu_power_usage", "nv_energy_consumption"))
    keep = None if gpu_uuids is None else set(gpu_uuids)
    power: dict[str, float] = {}
    energy: dict[str, float] = {}
    for s in samples:
        gpu = s.labels.get("gpu_uuid", "")
        if keep is not None and gpu not in keep:
            continue
        if not math.isfinite(s.value):
            continue
        (power if s.name == "nv_gpu_power_usage" else energy)[gpu] = s.value
    return GpuMetrics(
        power_w=sum(power.values()) if power else None,
        energy_j=sum(energy.values()) if energy else None,
        gpus=len(set(power) | set(energy)),
    )


def metrics_url_for(setting: str | None, triton_url: str) -> str | None:
    """Triton's Prometheus endpoint from a ``triton_metrics_url`` setting: None, "" or "off" = not read;
    a URL as is; "auto" = Triton's host, on the port after its gRPC port, as Triton lays its ports out
    by default (gRPC 8001, metrics 8002) and as deployments that move them keep them. Where that guess
    is wrong the endpoint does not answer with Triton's metrics, and power is modelled and marked so:
    set the URL then."""
    if setting in (None, "", "off"):
        return None
    if setting != "auto":
        return setting
    host, _, port = triton_url.rpartition(":")
    try:
        metrics_port = int(port) + 1
    except ValueError:
        host, metrics_port = triton_url, 8002
    return f"http://{host or '127.0.0.1'}:{metrics_port}/metrics"


def fetch_metrics(url: str, timeout_s: float = 2.0) -> str:
    """GET Triton's metrics endpoint (for example http://127.0.0.1:8002/metrics); raises OSError."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - operator-given URL
        return resp.read().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class PowerReading:
    power_w: float
    modelled: bool
    """True when computed from the profile, not read from the accelerator."""
    source: str
    """"nv_energy_consumption", "nv_gpu_power_usage" or "profile"."""


class PowerSource:
    """Mean accelerator power: measured from Triton's metrics when it exports them, else modelled.

    Feed it scrapes with ``observe_metrics(now, text)``; ask ``reading(...)`` with the gate's batch
    counts over the same interval, used for the modelled figure. A scrape older than ``max_age_s``
    no longer counts as a measurement.
    """

    def __init__(
        self, profile: ServiceProfile, idle_power_w: float, *,
        gpu_uuids: Sequence[str] | None = None, max_age_s: float = 30.0,
    ) -> None:
        self.profile = profile
        self.idle_power_w = check_number("idle_power_w", idle_power_w, inclusive=True)
        self.gpu_uuids = None if gpu_uuids is None else tuple(gpu_uuids)
        self.max_age_s = check_number("max_age_s", max_age_s)
        self._prev: tuple[float, float] | None = None  # (time, energy) of the previous scrape
        self._measured: tuple[float, float, str] | None = None  # (time, watts, source)
        self.placement = Placement(1, 1, "one instance")
        """k instances on D devices: the modelled power counts P0 once per device (the controller sets it)."""

    def observe_metrics(self, now: float, text: str) -> GpuMetrics:
        m = gpu_metrics(text, self.gpu_uuids)
        if m.energy_j is not None:
            prev, self._prev = self._prev, (now, m.energy_j)
            if prev is not None and now > prev[0] and m.energy_j >= prev[1]:
                self._measured = (now, (m.energy_j - prev[1]) / (now - prev[0]), "nv_energy_consumption")
                return m
        if m.power_w is not None:
            self._measured = (now, m.power_w, "nv_gpu_power_usage")
        return m

    def modelled(self, elapsed_s: float, batch_counts: Sequence[int] | np.ndarray, busy_s: float) -> float:
        """(sum over batches of e(b) + P0 x idle time) / elapsed; batch_counts[b] = batches of size b;
        with k instances on D devices, P0 once per device (``Placement.modelled_power_w``)."""
        elapsed_s = check_number("elapsed_s", elapsed_s)
        counts = np.asarray(batch_counts, dtype=float)
        top = min(counts.size - 1, self.profile.max_batch)
        if counts.size - 1 > self.profile.max_batch and np.any(counts[self.profile.max_batch + 1:] > 0):
            raise ValueError(f"batches larger than the profile's largest size {self.profile.max_batch} were counted")
        energy = float(np.dot(counts[1: top + 1], self.profile.energy_j[:top]))
        return self.placement.modelled_power_w(energy, float(busy_s), elapsed_s, self.idle_power_w)

    def reading(
        self, now: float, *, elapsed_s: float, batch_counts: Sequence[int] | np.ndarray, busy_s: float
    ) -> PowerReading:
        if self._measured is not None and now - self._measured[0] <= self.max_age_s:
            return PowerReading(self._measured[1], False, self._measured[2])
        return PowerReading(self.modelled(elapsed_s, batch_counts, busy_s), True, "profile")
