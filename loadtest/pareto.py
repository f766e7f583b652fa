"""``smdp pareto``: sweep the weight w and compare the measured latency/power trade-off with the
solver's curve.

Every w gives a different SMDP policy (solved by the sidecar for that w) and so a different (W, P);
the solver's curve comes from solving on a fine grid of w. Greedy and Triton's batcher at a few
delays are measured once as reference points (w does not change what they do).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from solver import quantities
from solver.quantities import DEFAULT_IDLE_POWER_W

from .bench import DEFAULT_PROFILE, BenchConfig, BenchRow, Progress, arrival_times, batching_model, bench_stack, run_one
from .contenders import Contender
from .metrics import Measured, power_note

__all__ = ["ParetoConfig", "ParetoPoint", "ParetoResult", "run_pareto", "write_pareto"]


@dataclass(frozen=True)
class ParetoConfig:
    rate: float
    weights: tuple[float, ...]
    delays_us: tuple[int, ...] = (0, 10000)
    duration_s: float = 6.0
    time_scale: float = 10.0
    idle_power_w: float = DEFAULT_IDLE_POWER_W
    profile_csv: Path = DEFAULT_PROFILE
    model: str = "emulated_gpu"
    seed: int = 0
    warmup_s: float = 1.5
    cooldown_s: float = 1.0
    out_dir: Path = Path("out/pareto")
    stack_profile: bool = True
    """Tell the solver tau(b) measured on this stack (see BenchConfig.stack_profile)."""

    def __post_init__(self) -> None:
        ws = tuple(quantities.weight(w) for w in self.weights)
        if not ws:
            raise ValueError("give at least one weight")
        object.__setattr__(self, "weights", ws)
        if any(d < 0 for d in self.delays_us):
            raise ValueError(f"delays must be >= 0 microseconds, got {list(self.delays_us)}")
        self.bench(0.0)  # validates the rest

    def bench(self, weight: float, contenders: Sequence[Contender] = (Contender("gate", "smdp"),)) -> BenchConfig:
        return BenchConfig(rates=(self.rate,), contenders=tuple(contenders), duration_s=self.duration_s,
                           time_scale=self.time_scale, weight=weight, idle_power_w=self.idle_power_w,
                           profile_csv=self.profile_csv, model=self.model, seed=self.seed,
                           warmup_s=self.warmup_s, cooldown_s=self.cooldown_s, out_dir=Path(self.out_dir),
                           stack_profile=self.stack_profile)


@dataclass(frozen=True, eq=False)
class ParetoPoint:
    label: str
    weight: float | None
    measured: Measured
    predicted_w_s: float
    predicted_p_w: float


@dataclass(frozen=True, eq=False)
class ParetoResult:
    config: ParetoConfig
    points: tuple[ParetoPoint, ...]
    curve_weights: np.ndarray
    curve_w_s: np.ndarray
    curve_p_w: np.ndarray
    note: str


def _point(row: BenchRow, label: str, weight: float | None) -> ParetoPoint:
    return ParetoPoint(label, weight, row.measured, row.predicted.mean_latency_s, row.predicted.mean_power_w)


def run_pareto(cfg: ParetoConfig, triton_url: str | None = None, progress: Progress = print) -> ParetoResult:
    from solver.smdp import solve

    base = cfg.bench(0.0)
    points: list[ParetoPoint] = []
    with bench_stack(base, triton_url, progress) as stack:
        times = arrival_times(base, cfg.rate, 0)
        model = batching_model(stack, base, cfg.rate)
        progress(f"rate {cfg.rate:g} req/s (rho = {model.load:.2f}); solving the trade-off curve")
        grid = np.unique(np.concatenate(([0.0], np.geomspace(1e-5, max(max(cfg.weights), 1e-4) * 3, 24),
                                         cfg.weights)))
        curve = [solve(model.with_(weight=float(w))) for w in grid]
        refs = [Contender("gate", "greedy"), *(Contender("triton", max_queue_delay_us=int(d)) for d in cfg.delays_us)]
        for c in refs:
            t0 = time.monotonic()
            row = run_one(stack, base, c, cfg.rate, times)
            points.append(_point(row, c.name, None))
            progress(f"  {c.name:<24} W {row.measured.mean_latency_s * 1e3:7.2f} ms  "
                     f"P {row.measured.mean_power_w:6.1f} W  ({time.monotonic() - t0:.1f} s)")
        for w in cfg.weights:
            t0 = time.monotonic()
            bw = cfg.bench(w)
            row = run_one(stack, bw, bw.contenders[0], cfg.rate, times)
            points.append(_point(row, f"smdp w={w:g}", w))
            progress(f"  smdp w={w:<18g} W {row.measured.mean_latency_s * 1e3:7.2f} ms  "
                     f"P {row.measured.mean_power_w:6.1f} W  ({time.monotonic() - t0:.1f} s)")
    return ParetoResult(cfg, tuple(points), grid, np.array([r.mean_latency_s for r in curve]),
                        np.array([r.mean_power_w for r in curve]), power_note(base.profile_name, cfg.idle_power_w))


def write_pareto(result: ParetoResult) -> tuple[str, list[Path]]:
    """Table text, and pareto.csv / pareto.png in the output directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(result.config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path_csv = out / "pareto.csv"
    with path_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "weight_s_per_w", "W_mean_ms", "W_p99_ms", "P_w", "pred_W_ms", "pred_P_w", "failed", "note"])
        for p in result.points:
            m = p.measured
            w.writerow([p.label, "" if p.weight is None else f"{p.weight:g}", f"{m.mean_latency_s * 1e3:.4g}",
                        f"{m.p99_latency_s * 1e3:.4g}", f"{m.mean_power_w:.4g}", f"{p.predicted_w_s * 1e3:.4g}",
                        f"{p.predicted_p_w:.4g}", m.failed, result.note])
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(result.curve_w_s * 1e3, result.curve_p_w, "-", color="grey", label="solver: optimal (W, P) as w varies")
    for p in result.points:
        m = p.measured
        if p.weight is None:
            ax.plot(m.mean_latency_s * 1e3, m.mean_power_w, "s", label=f"measured {p.label}")
        else:
            ax.plot(m.mean_latency_s * 1e3, m.mean_power_w, "o", color="C3")
            ax.plot(p.predicted_w_s * 1e3, p.predicted_p_w, "x", color="k")
            ax.annotate(f"w={p.weight:g}", (m.mean_latency_s * 1e3, m.mean_power_w), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.plot([], [], "o", color="C3", label="measured SMDP gate")
    ax.plot([], [], "x", color="k", label="predicted SMDP gate")
    ax.set_xlabel("mean latency W (ms)")
    ax.set_ylabel("mean power P (W)")
    ax.set_title(f"Latency/power trade-off at {result.config.rate:g} req/s", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.text(0.01, 0.01, result.note, fontsize=7)
    fig.tight_layout()
    path_png = out / "pareto.png"
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    lines = [f"{'point':<24} {'W ms':>8} {'p99 ms':>8} {'P W':>7} | {'W~ms':>8} {'P~W':>7} {'fail':>5}"]
    for p in result.points:
        m = p.measured
        lines.append(f"{p.label:<24} {m.mean_latency_s * 1e3:8.2f} {m.p99_latency_s * 1e3:8.2f} "
                     f"{m.mean_power_w:7.1f} | {p.predicted_w_s * 1e3:8.2f} {p.predicted_p_w:7.1f} {m.failed:5d}")
    lines.append(result.note + ".")
    return "\n".join(lines), [path_csv, path_png]
