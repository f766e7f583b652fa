"""PNG plots of a bench: latency CDFs, batch-size histograms, and J/W/P measured against predicted.

matplotlib is imported here only, with the Agg backend, so the bench runs on headless machines and
the CLI stays fast to start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .bench import BenchReport


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_rate(report: "BenchReport") -> dict[float, list]:
    out: dict[float, list] = {}
    for r in report.rows:
        out.setdefault(r.rate_rps, []).append(r)
    return out


def plot_latency_cdf(report: "BenchReport", path: Path) -> Path:
    plt = _plt()
    groups = _by_rate(report)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (rate, rows) in zip(axes[0], groups.items()):
        for r in rows:
            lat = np.sort(r.latencies_s) * 1e3
            if lat.size:
                ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post",
                        label=f"{r.contender} (W {r.measured.mean_latency_s * 1e3:.1f} ms)")
        ax.set_title(f"{rate:g} req/s")
        ax.set_xlabel("response time (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Latency CDF per contender (same arrival sequence)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_batch_hist(report: "BenchReport", path: Path) -> Path:
    plt = _plt()
    groups = _by_rate(report)
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (rate, rows) in zip(axes[0], groups.items()):
        top = 1
        for r in rows:
            h = r.batch_hist
            nz = np.nonzero(h > 0)[0]
            top = max(top, int(nz[-1]) + 1 if nz.size else 1)
        sizes = np.arange(1, top + 1)
        for r in rows:
            total = r.batch_hist.sum()
            frac = r.batch_hist[:top] / total if total > 0 else np.zeros(top)
            ax.step(sizes, frac, where="mid", label=f"{r.contender} (mean {r.measured.mean_batch:.1f})")
        ax.set_title(f"{rate:g} req/s")
        ax.set_xlabel("batch size")
        ax.set_ylabel("fraction of batches")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Batch sizes Triton executed (from BATCH_SIZE in the responses)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(report: "BenchReport", path: Path) -> Path:
    plt = _plt()
    groups = _by_rate(report)
    metrics = (("J (ms)", "cost", 1e3), ("W (ms)", "mean_latency_s", 1e3), ("P (W)", "mean_power_w", 1.0))
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 3.8 * len(groups)), squeeze=False)
    for row_axes, (rate, rows) in zip(axes, groups.items()):
        x = np.arange(len(rows))
        for ax, (label, attr, scale) in zip(row_axes, metrics):
            meas = [getattr(r.measured, attr) * scale for r in rows]
            pred = [getattr(r.predicted, attr) * scale for r in rows]
            pred = [p if math.isfinite(p) else 0.0 for p in pred]
            ax.bar(x - 0.2, meas, 0.4, label="measured")
            ax.bar(x + 0.2, pred, 0.4, label="predicted", alpha=0.6)
            ax.set_xticks(x)
            ax.set_xticklabels([r.contender for r in rows], rotation=25, ha="right", fontsize=7)
            ax.set_title(f"{label} at {rate:g} req/s")
            ax.grid(True, axis="y", alpha=0.3)
    # one legend for the figure, in the title band: inside an axis it hid the last contender's bars
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"J = W + w P, w = {report.config.weight:g} s/W; {report.note}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
