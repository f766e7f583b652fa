"""The SMDP policy against the batching rules an operator would otherwise use, over a sweep.

At every (load, weight) point the contenders are: the SMDP policy, greedy (Triton with
max_queue_delay 0), the best static batch b0 (chosen by exact evaluation), Triton's timeout rule at
fixed timeouts, and the best timeout found by simulation over a grid. Each is predicted by exact
evaluation where that is defined (queue-length policies; the timeout rule is not one) and simulated
on one arrival sequence shared by all contenders at that load, with common service-time streams.

The best timeout is *chosen* on a separate tuning sequence and *reported* on the shared one, so that
it does not profit from fitting the very noise it is judged on (the SMDP policy gets no such help).

A rule that ignores w (greedy, a timeout) behaves the same at every weight, so it is simulated once
per load and its J = W + w P is recomputed per weight.

With k > 1 instances (``instances``) every contender runs on k instances fed by one queue: the
k-instance policy a(n, m) (``solver.instances``, predicted by its own fresh simulation), the
one-server SMDP policy applied to each instance slot as the gate did before (``per-slot smdp``,
``solver.instances.per_slot_policy``), and greedy and Triton's timeout rule per instance (Triton's
batcher with k instances). Loads are fractions of k B / tau(B). Static b0 and exact predictions of
the baselines are one-server figures and are left out.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from solver import arrivals, quantities
from solver.arrival_model import MMPP2, POISSON, ArrivalModel
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import BatchRule, PerInstance, PolicyTable, TimeoutRule, greedy, static
from solver.simulate import SimResult, simulate

__all__ = ["CompareRow", "ComparePoint", "CompareResult", "compare", "DEFAULT_TIMEOUTS_S", "TIMEOUT_GRID_S"]

DEFAULT_TIMEOUTS_S: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005)
TIMEOUT_GRID_S: tuple[float, ...] = (0.0, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.006, 0.008,
                                     0.012, 0.016, 0.024, 0.032, 0.05)


@dataclass(frozen=True)
class CompareRow:
    """One contender at one point: predicted (NaN where undefined) and simulated figures."""

    contender: str
    spec: str
    """The rule as ``smdp simulate --policy`` takes it (timeouts in seconds)."""
    detail: str
    """What the spec leaves implicit: the SMDP's threshold, the chosen b0 or timeout."""
    pred_latency_s: float
    pred_power_w: float
    pred_cost: float
    sim_latency_s: float
    sim_p99_s: float
    sim_power_w: float
    sim_cost: float
    sim_cost_ci95: float
    sim_mean_batch: float
    gain_pred: float
    """SMDP's relative gain over this contender, 1 - J_smdp / J_this, predicted (NaN if undefined)."""
    gain_sim: float
    """The same on the simulated J of both."""


@dataclass(frozen=True)
class ComparePoint:
    load: float
    rate: float
    weight: float
    rows: tuple[CompareRow, ...]

    def row(self, contender: str) -> CompareRow:
        for r in self.rows:
            if r.contender == contender:
                return r
        raise KeyError(contender)


@dataclass(frozen=True)
class CompareResult:
    profile: str
    max_batch: int
    idle_power_w: float
    requests: int
    seed: int
    capacity_rps: float
    points: tuple[ComparePoint, ...]
    elapsed_s: float
    interpolated: tuple[int, ...] = ()
    """Batch sizes whose figures were interpolated rather than given by the profile."""
    instances: int = 1
    """k: model instances fed by one queue (module doc)."""
    arrivals: str = "poisson"
    """The arrival model of the streams and of the SMDP (``--arrivals``; an MMPP's rates scaled to each load)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [
            {"load": p.load, "rate": p.rate, "weight": p.weight, "rows": [asdict(r) for r in p.rows]}
            for p in self.points
        ]
        return d

    def table(self) -> str:
        """The human-readable report: one block per point, times in ms, J in ms."""
        lines = [
            f"profile {self.profile}, B = {self.max_batch}, idle power {self.idle_power_w:g} W (assumed), "
            + (f"{self.instances} instances, " if self.instances > 1 else "")
            + (f"{self.arrivals} arrivals, " if self.arrivals != "poisson" else "")
            + f"capacity {self.capacity_rps:.0f} req/s, {self.requests:,} simulated requests per point",
            "J = W + w P; gain = 1 - J_smdp / J_contender (positive: the SMDP policy is better)",
        ]
        if self.interpolated:
            lines.insert(1, f"interpolated batch sizes (not in the profile): {_ranges(self.interpolated)}")
        head = (f"  {'contender':<14} {'detail':<10} {'W pred':>8} {'P pred':>7} {'J pred':>8} | {'W sim':>8} "
                f"{'p99 sim':>8} {'P sim':>7} {'J sim':>8} {'+-':>6} {'batch':>6} | {'gain pred':>9} {'gain sim':>8}")
        units = (f"  {'':<14} {'':<10} {'ms':>8} {'W':>7} {'ms':>8} | {'ms':>8} {'ms':>8} {'W':>7} {'ms':>8} "
                 f"{'ms':>6} {'':>6} | {'%':>9} {'%':>8}")
        for p in self.points:
            lines.append("")
            lines.append(f"load {p.load:.2f} ({p.rate:.0f} req/s), w = {p.weight:g} s/W")
            lines.append(head)
            lines.append(units)
            for r in p.rows:
                lines.append(
                    f"  {r.contender:<14} {r.detail:<10} {_ms(r.pred_latency_s):>8} {_num(r.pred_power_w, 1):>7} "
                    f"{_ms(r.pred_cost):>8} | {_ms(r.sim_latency_s):>8} {_ms(r.sim_p99_s):>8} "
                    f"{_num(r.sim_power_w, 1):>7} {_ms(r.sim_cost):>8} {_ms(r.sim_cost_ci95, 3):>6} "
                    f"{_num(r.sim_mean_batch, 1):>6} | {_pct(r.gain_pred):>9} {_pct(r.gain_sim):>8}"
                )
        lines.append("")
        lines.append(f"finished in {self.elapsed_s:.1f} s")
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write compare.txt, compare.csv, compare.json and compare.png into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: out / f"compare.{k}" for k in ("txt", "csv", "json", "png")}
        paths["txt"].write_text(self.table() + "\n")
        with paths["csv"].open("w", newline="") as fh:
            names = ["load", "rate", "weight"] + list(CompareRow.__dataclass_fields__)
            w = csv.DictWriter(fh, fieldnames=names)
            w.writeheader()
            for p in self.points:
                for r in p.rows:
                    w.writerow({"load": p.load, "rate": p.rate, "weight": p.weight, **asdict(r)})
        paths["json"].write_text(json.dumps(_json_safe(self.to_dict()), indent=1) + "\n")
        self.plot(paths["png"])
        return paths

    def plot(self, path: str | Path) -> None:
        """Simulated J against load per weight (top) and the SMDP's simulated gain (bottom)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        weights = sorted({p.weight for p in self.points})
        contenders = list(dict.fromkeys(r.contender for p in self.points for r in p.rows))
        fig, axes = plt.subplots(2, len(weights), figsize=(4.2 * len(weights), 7), squeeze=False)
        for j, w in enumerate(weights):
            pts = sorted((p for p in self.points if p.weight == w), key=lambda p: p.load)
            loads = [p.load for p in pts]
            for c in contenders:
                rows = [p.row(c) if any(r.contender == c for r in p.rows) else None for p in pts]
                jv = [r.sim_cost * 1e3 if r else math.nan for r in rows]
                err = [r.sim_cost_ci95 * 1e3 if r else math.nan for r in rows]
                style = dict(lw=2.5, color="k") if c == "smdp" else dict(lw=1.2)
                axes[0, j].errorbar(loads, jv, yerr=err, marker="o", ms=3, label=c, capsize=2, **style)
                if c != "smdp":
                    axes[1, j].plot(loads, [r.gain_sim * 100 if r else math.nan for r in rows], marker="o", ms=3,
                                    label=c, lw=1.2)
            axes[0, j].set_title(f"w = {w:g} s/W")
            axes[0, j].set_ylabel("simulated J = W + wP (ms)")
            axes[1, j].axhline(0.0, color="k", lw=0.8)
            axes[1, j].set_ylabel("SMDP gain over contender (%)")
            axes[1, j].set_xlabel("load lambda / capacity")
        axes[0, 0].legend(fontsize=7)
        axes[1, 0].legend(fontsize=7)
        fig.suptitle(f"{Path(self.profile).name}, B = {self.max_batch}, P0 = {self.idle_power_w:g} W, "
                     f"{self.requests:,} requests per point")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _ranges(xs: Sequence[int]) -> str:
    parts, i, xs = [], 0, sorted(xs)
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts)


def _ms(x: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(x) else f"{x * 1e3:.{digits}f}"


def _num(x: float, digits: int) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x * 100:+.1f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass
class _Sims:
    """Simulations at one load, cached by rule, all on the same arrivals and service streams."""

    profile: ServiceProfile
    arrivals: np.ndarray
    idle_power_w: float
    seed: int
    warmup: float
    devices: int = 1
    """D: devices drawing P0 (``BatchingModel.idle_devices``)."""
    cache: dict[Any, SimResult] = field(default_factory=dict)

    def run(self, key: Any, rule) -> SimResult:
        if key not in self.cache:
            self.cache[key] = simulate(self.profile, rule, self.arrivals, idle_power_w=self.idle_power_w,
                                       weight=0.0, seed=self.seed, warmup=self.warmup, devices=self.devices)
        return self.cache[key]

    def run_phased(self, key: Any, policy, process: MMPP2) -> SimResult:
        """A per-phase policy whose gate estimates the phase with the forward filter on these arrivals."""
        from solver.phase_filter import PhaseFilter
        from solver.simulate import simulate_phased

        if key not in self.cache:
            self.cache[key] = simulate_phased(self.profile, policy, PhaseFilter(process, self.arrivals), self.arrivals,
                                              idle_power_w=self.idle_power_w, weight=0.0, seed=self.seed,
                                              warmup=self.warmup)
        return self.cache[key]


def _at_rate(process: ArrivalModel, rate: float) -> ArrivalModel:
    """The arrival model at mean rate ``rate``: an MMPP's phase rates scaled, its switching kept."""
    if isinstance(process, MMPP2):
        f = rate / process.mean_rate
        return process.with_rates(tuple(r * f for r in process.rates))
    return process


def _predict(model: BatchingModel, table: PolicyTable):
    """Exact W, P of a queue-length table under the model's arrivals (phase-blind under an MMPP)."""
    from solver.evaluate import evaluate

    if isinstance(model.arrivals, MMPP2):
        from solver.mmpp import evaluate_mmpp

        return evaluate_mmpp(model, table)
    return evaluate(model, table)


def _cost(sim: SimResult, w: float) -> tuple[float, float]:
    return sim.mean_latency_s + w * sim.mean_power_w, sim.latency_ci95_s + w * sim.power_ci95_w


def compare(
    profile: ServiceProfile,
    max_batch: int,
    idle_power_w: float,
    loads: Sequence[float],
    weights: Sequence[float],
    requests: int = 50_000,
    seed: int = 0,
    timeouts_s: Sequence[float] = DEFAULT_TIMEOUTS_S,
    timeout_grid_s: Sequence[float] = TIMEOUT_GRID_S,
    method: str = "pi",
    progress: Callable[[str], None] | None = None,
    instances: int = 1,
    arrival_model: ArrivalModel = POISSON,
    devices: int | None = None,
) -> CompareResult:
    """Run the sweep. Loads are fractions of the capacity k B / tau(B), strictly between 0 and 1."""
    t_start = time.perf_counter()
    prof = profile.truncated(max_batch)
    base = BatchingModel(rate=0.5 * max_batch / float(prof.mean_s[max_batch - 1]), max_batch=max_batch,
                         profile=prof, idle_power_w=idle_power_w, weight=0.0, instances=instances, devices=devices)
    k_inst = base.instances
    if k_inst > 1 and arrival_model != POISSON:
        raise ModelError(f"compare with {arrival_model.spec} arrivals runs one instance; the k-instance solver "
                         "assumes Poisson arrivals")

    def each(rule: BatchRule) -> BatchRule | PerInstance:
        return rule if k_inst == 1 else PerInstance(rule, k_inst)
    loads = [float(x) for x in loads]
    weights = [float(x) for x in weights]
    if not loads or not weights:
        raise ModelError("compare needs at least one load and one weight")
    for x in loads:
        if not (0 < x < 1):
            raise ModelError(f"load must be strictly between 0 and 1 (a fraction of capacity), got {x!r}")
    for w in weights:
        quantities.weight(w)
    if isinstance(requests, bool) or int(requests) != requests or requests < 1000:
        raise ModelError(f"requests must be an integer >= 1000, got {requests!r}")
    for t in (*timeouts_s, *timeout_grid_s):
        if not math.isfinite(t) or t < 0:
            raise ModelError(f"timeouts must be finite and >= 0 seconds, got {t!r}")
    say = progress or (lambda _msg: None)
    from solver.evaluate import evaluate
    from solver.instances import per_slot_policy, solve_instances
    from solver.smdp import solve

    points: list[ComparePoint] = []
    for li, load in enumerate(loads):
        rate = load * base.capacity
        proc = _at_rate(arrival_model, rate)
        model0 = base.with_(rate=rate, arrivals=proc)
        arr = arrivals.from_model(proc, rate, int(requests), rng=np.random.default_rng([seed, li, 0]))
        warmup = float(arr[min(arr.size // 50, arr.size - 1)])  # drop the first 2%: the empty start
        sims = _Sims(prof, arr, idle_power_w, seed, warmup, base.idle_devices)
        tune_arr = arrivals.from_model(proc, rate, max(int(requests) // 2, 1000), rng=np.random.default_rng([seed, li, 1]))
        tune = _Sims(prof, tune_arr, idle_power_w, seed + 1, float(tune_arr[tune_arr.size // 50]), base.idle_devices)

        # Weight-independent work: greedy, fixed timeouts, the timeout grid, static b0 evaluations.
        g_pol = greedy(max_batch)
        g_pred = (math.nan, math.nan)
        if k_inst == 1:
            g_eval = _predict(model0, g_pol)
            g_pred = (g_eval.mean_latency_s, g_eval.mean_power_w)
        g_sim = sims.run("greedy", each(g_pol))
        for t in timeouts_s:
            sims.run(("timeout", t), each(TimeoutRule(max_batch, t)))
        grid = {t: tune.run(("timeout", t), each(TimeoutRule(max_batch, t))) for t in timeout_grid_s}
        statics = {}
        # under an MMPP the exact evaluation of every b0 costs minutes at B = 64: static b0 is left out there
        for b0 in range(1, max_batch + 1 if k_inst == 1 and not isinstance(proc, MMPP2) else 1):
            if rate * prof.mean_s[b0 - 1] < 0.98 * b0:  # static b0 is stable only below b0 / tau(b0)
                try:
                    statics[b0] = _predict(model0, static(max_batch, b0))
                except ValueError:  # UnstablePolicyError: b0 / tau(b0) cannot keep up
                    continue
        say(f"load {load:.2f}: baselines done ({time.perf_counter() - t_start:.1f} s)")

        warm = None
        for w in weights:
            model = model0.with_(weight=w)
            phased = None
            if isinstance(proc, MMPP2):
                from solver.mmpp import solve_mmpp

                sol = solve_mmpp(model)
                phased = sol.policy
                s_rule = phased.tables[0]
                th2 = [t.threshold() for t in phased.tables]
                s_detail = "K=" + "/".join("-" if x is None else str(x) for x in th2)
            elif k_inst == 1:
                sol = solve(model, method=method, warm_start=warm)
                warm = sol.policy
                s_rule = sol.policy
                k = sol.policy.threshold()
                s_detail = f"K={k}" if k is not None else "table"
            else:
                sol = solve_instances(model, seed=seed + li, method=method)
                s_rule = sol.policy
                th = sol.policy.thresholds()
                s_detail = "T=" + "/".join(str(x) for x in th) if th is not None else "table"
            if phased is not None:
                s_sim = sims.run_phased(("phased", w), phased, proc)
            else:
                s_sim = sims.run(("table", s_rule.actions.tobytes(), s_rule.actions.shape), s_rule)
            s_cost, s_ci = _cost(s_sim, w)
            s_pred = sol.mean_latency_s + w * sol.mean_power_w

            def row(name: str, spec: str, detail: str, pred_w: float, pred_p: float, sim: SimResult) -> CompareRow:
                pred_j = pred_w + w * pred_p
                j, ci = _cost(sim, w)
                return CompareRow(
                    contender=name, spec=spec, detail=detail, pred_latency_s=pred_w, pred_power_w=pred_p, pred_cost=pred_j,
                    sim_latency_s=sim.mean_latency_s, sim_p99_s=sim.p99_latency_s, sim_power_w=sim.mean_power_w,
                    sim_cost=j, sim_cost_ci95=ci, sim_mean_batch=sim.mean_batch,
                    gain_pred=(1 - s_pred / pred_j) if math.isfinite(pred_j) and pred_j > 0 else math.nan,
                    gain_sim=1 - s_cost / j if j > 0 else math.nan,
                )

            rows = [row("smdp", "smdp", s_detail, sol.mean_latency_s, sol.mean_power_w, s_sim)]
            if proc != POISSON:
                # the policy solved as if the stream were Poisson at the same mean rate, judged on this stream
                blind = solve(model.with_(arrivals=POISSON), method=method).policy
                kb = blind.threshold()
                b_ev = _predict(model, blind)
                rows.append(row("smdp poisson", "smdp", f"K={kb}" if kb is not None else "table", b_ev.mean_latency_s,
                                b_ev.mean_power_w, sims.run(("table", blind.actions.tobytes()), blind)))
            if k_inst > 1:
                slot = per_slot_policy(model, method=method)
                t_slot = slot.rule.threshold() if isinstance(slot.rule, PolicyTable) else None
                rows.append(row("per-slot smdp", "smdp-per-slot", f"K={t_slot}" if t_slot is not None else "table",
                                math.nan, math.nan,
                                sims.run(("per-slot", w), slot)))
            rows.append(row("greedy", "greedy", "", g_pred[0], g_pred[1], g_sim))
            if statics:
                b0 = min(statics, key=lambda b: statics[b].mean_latency_s + w * statics[b].mean_power_w)
                ev = statics[b0]
                rows.append(row("best static", f"static:{b0}", f"b0={b0}", ev.mean_latency_s, ev.mean_power_w,
                                sims.run(("static", b0), static(max_batch, b0))))
            for t in timeouts_s:
                rows.append(row(f"timeout {t * 1e3:g}ms", f"timeout:{t:g}", f"T={t * 1e3:g}ms", math.nan, math.nan,
                                sims.run(("timeout", t), each(TimeoutRule(max_batch, t)))))
            best_t = min(grid, key=lambda t: _cost(grid[t], w)[0])
            rows.append(row("best timeout", f"timeout:{best_t:g}", f"T={best_t * 1e3:g}ms", math.nan, math.nan,
                            sims.run(("timeout", best_t), each(TimeoutRule(max_batch, best_t)))))
            points.append(ComparePoint(load=load, rate=rate, weight=w, rows=tuple(rows)))
            say(f"load {load:.2f}, w {w:g}: SMDP J {s_cost * 1e3:.3f} ms (+-{s_ci * 1e3:.3f}), "
                f"greedy {_cost(g_sim, w)[0] * 1e3:.3f} ms ({time.perf_counter() - t_start:.1f} s)")
    return CompareResult(
        profile=prof.source or "profile", max_batch=max_batch, idle_power_w=float(idle_power_w),
        requests=int(requests), seed=int(seed), capacity_rps=base.capacity, points=tuple(points),
        elapsed_s=time.perf_counter() - t_start, interpolated=tuple(int(b) for b in prof.interpolated),
        instances=k_inst, arrivals=arrival_model.spec,
    )
