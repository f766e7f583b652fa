"""Batch time and energy of the emulated accelerator, read from a profile CSV.

This file is deliberately self-contained (numpy and the standard library only): the model must also
load inside NVIDIA's Triton container, where only the model directory is mounted and the project's
``solver`` package is not installed. The interpolation matches ``solver.model.ServiceProfile
.from_table`` (linear in batch size between the published sizes, no extrapolation), so the SMDP and
the emulated server agree on tau(b) and e(b) for every b.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("batch_size", "mean_service_s", "batch_energy_j")


def jittered(mean_s: float, cv: float, rng: np.random.Generator) -> float:
    """One service time with the given mean and coefficient of variation: gamma, or the mean if cv=0.

    Gamma with shape 1/cv^2 and scale mean*cv^2 is the law the SMDP assumes for a profile with a
    service_cv, so the emulated server and the model agree on E[S] and E[S^2].
    """
    if cv == 0.0:
        return float(mean_s)
    shape = 1.0 / (cv * cv)
    return float(rng.gamma(shape, mean_s / shape))


class ProfileError(ValueError):
    """The profile CSV is missing, malformed or does not cover the batch sizes the model accepts."""


class ProfileTable:
    """tau(b) seconds, e(b) joules and the CV of S_b for b = 1..max_batch (index b - 1)."""

    def __init__(self, mean_s: np.ndarray, energy_j: np.ndarray, cv: np.ndarray, source: str) -> None:
        self.mean_s = mean_s
        self.energy_j = energy_j
        self.cv = cv
        self.source = source

    @property
    def max_batch(self) -> int:
        return int(self.mean_s.shape[0])

    def _check(self, b: int) -> int:
        if not 1 <= b <= self.max_batch:
            raise ProfileError(f"batch size {b} is outside the profile's range 1..{self.max_batch} ({self.source})")
        return b - 1

    def service_s(self, b: int) -> float:
        return float(self.mean_s[self._check(b)])

    def energy(self, b: int) -> float:
        return float(self.energy_j[self._check(b)])

    def service_cv(self, b: int) -> float:
        return float(self.cv[self._check(b)])

    @classmethod
    def from_csv(cls, path: str | Path, max_batch: int) -> "ProfileTable":
        """Read ``batch_size,mean_service_s,batch_energy_j[,service_cv]`` and fill 1..max_batch."""
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile CSV not found: {path}")
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ProfileError(f"profile CSV {path} lacks column(s) {missing}; header is {header}")
            rows = []
            for line, raw in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                try:
                    size = float(row["batch_size"])
                    t = float(row["mean_service_s"])
                    e = float(row["batch_energy_j"])
                    c = float(row["service_cv"]) if row.get("service_cv") else 0.0
                except ValueError as exc:
                    raise ProfileError(f"profile CSV {path} line {line}: {exc}") from None
                if size != round(size) or size < 1:
                    raise ProfileError(f"profile CSV {path} line {line}: batch_size must be an integer >= 1, got {size}")
                if not math.isfinite(t) or t <= 0:
                    raise ProfileError(f"profile CSV {path} line {line}: mean_service_s must be > 0, got {t}")
                if not math.isfinite(e) or e < 0:
                    raise ProfileError(f"profile CSV {path} line {line}: batch_energy_j must be >= 0, got {e}")
                if not math.isfinite(c) or c < 0:
                    raise ProfileError(f"profile CSV {path} line {line}: service_cv must be >= 0, got {c}")
                rows.append((int(size), t, e, c))
        if not rows:
            raise ProfileError(f"profile CSV {path} has no rows")
        rows.sort()
        sizes = np.array([r[0] for r in rows])
        if np.any(np.diff(sizes) == 0):
            raise ProfileError(f"profile CSV {path} lists a batch size twice")
        if sizes[0] != 1:
            raise ProfileError(f"profile CSV {path} must include batch size 1 (smallest is {sizes[0]})")
        if max_batch < 1 or max_batch > sizes[-1]:
            raise ProfileError(
                f"max_batch_size {max_batch} is not covered by profile CSV {path} (sizes 1..{sizes[-1]})"
            )
        grid = np.arange(1, max_batch + 1)
        cols = [np.array([r[i] for r in rows], dtype=float) for i in (1, 2, 3)]
        t, e, c = (np.interp(grid, sizes, col) for col in cols)
        return cls(t, e, c, str(path))
