"""Triton's own dynamic batcher on the real stack against its two models, on one replayed stream.

For each Triton delay (``max_queue_delay``) and queue configuration, the stream is replayed open loop
against the embedded Triton (the emulated GPU, as ``smdp trace-bench`` runs it) and compared, request
by request in distribution, with the same arrival times simulated under

- ``TimeoutRule``: the batcher decides whenever its instance is free (what Triton does when it can
  prefetch the next batch);
- ``TritonBatcher``: the batcher sleeps through the instance freeing and decides at the next arrival or
  its 500 ms wait (what Triton does when it cannot prefetch, ``solver.policy.TritonBatcher``); and the
  share of races it must win to give the run's W and p99 (``solver.catch_share``).

Configurations: ``as-is`` is the model's own config (priority levels and a queue policy with a request
timeout and ``max_queue_size``: no prefetching); ``prefetch`` removes those three from its
``dynamic_batching`` (default queue policy, one level: prefetching on). Figures: W, p50, p95, p99, the
mean batch, the share of requests by batch size (from the BATCH_SIZE each answer carries), Triton's own
per-batch-size execution counts and times (the statistics extension), the client's send lag, and the
per-request hop of lone requests (latency beyond the batch's time, measured by the bench's stack).

    python bench/triton_tail.py --synthetic mmpp:210,30:0.5,1:3,1.2 --seed 1 --delays-ms 20 --configs as-is,prefetch
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("as-is", "prefetch")
_NO_PREFETCH_FIELDS = ("priority_levels", "default_priority_level", "default_queue_policy", "priority_queue_policy")


def _stats(client, model: str) -> dict[int, tuple[int, int]]:
    """Triton's statistics: batch size -> (executions, compute_infer ns)."""
    st = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    out = {}
    for b in st.get("batch_stats", []):
        ci = b.get("compute_infer", {})
        out[int(b["batch_size"])] = (int(ci.get("count", 0)), int(ci.get("ns", 0)))
    return out


def _share_by_size(sizes: np.ndarray, max_batch: int) -> np.ndarray:
    """Share of requests served in batches of each size 1..B."""
    counts = np.bincount(sizes.astype(np.int64), minlength=max_batch + 1)[1:].astype(float)
    total = counts.sum()
    return counts / total if total else counts


def _bins(share: np.ndarray) -> str:
    edges = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 128)]
    return " ".join(f"{lo}-{hi}:{share[lo - 1:hi].sum():.2f}" if lo != hi else f"{lo}:{share[lo - 1]:.2f}"
                    for lo, hi in edges if lo <= share.size)


def main() -> int:
    from bench.arrivals_bench import synthetic_stream, write_trace_csv
    from loadtest.bench import BenchConfig, bench_stack
    from loadtest.contenders import Contender
    from loadtest.openloop import run_open_loop
    from loadtest.triton_control import BatchingOverride
    from loadtest.trace_bench import trace_times
    from solver.catch_share import fit_run
    from solver.policy import TimeoutRule, TritonBatcher
    from solver.simulate import simulate_latencies

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", metavar="SPEC", help="an mmpp spec, drawn as bench/arrivals_bench.py draws it")
    src.add_argument("--trace", type=Path, help="a trace CSV with a TIMESTAMP column")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--limit", type=int, default=9000)
    ap.add_argument("--delays-ms", default="20")
    ap.add_argument("--configs", default="as-is", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--time-scale", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("out/triton_tail"))
    args = ap.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or any(c not in CONFIGS for c in configs):
        raise SystemExit(f"--configs: a comma list of {', '.join(CONFIGS)}, got {args.configs!r}")
    delays = [float(x) / 1e3 for x in args.delays_ms.split(",") if x.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        csv = args.out / f"synthetic_seed{args.seed}.csv"
        write_trace_csv(synthetic_stream(args.synthetic, args.seed), csv)
        name = f"{args.synthetic} seed {args.seed}"
    else:
        csv = args.trace
        name = csv.name
    times = trace_times(csv, args.rate, args.limit)
    cfg = BenchConfig(rates=(args.rate,), contenders=(Contender("triton", max_queue_delay_us=0),),
                      time_scale=args.time_scale, out_dir=args.out, data_plane="python")
    lo, hi = cfg.warmup_s, float(times[-1]) - cfg.cooldown_s
    counted = (times >= lo) & (times < hi)
    results = []
    print(f"stream: {name}, {times.size} arrivals at {args.rate:g}/s over {times[-1]:.1f} s; window {lo:g}-{hi:.1f} s")
    import tritonclient.grpc as grpcclient

    with bench_stack(cfg, None, print) as stack:
        B = stack.max_batch
        hop = stack.hop.direct_s if stack.hop is not None else 0.0
        print(f"B = {B}; per-request hop of lone requests (added to every simulated latency): {hop * 1e3:.2f} ms")
        client = grpcclient.InferenceServerClient(stack.triton_url)
        for d in delays:
            for conf in configs:
                stack.control.apply(BatchingOverride(max_queue_delay_us=int(round(d * 1e6)), time_scale=cfg.time_scale))
                if conf == "prefetch":
                    c = copy.deepcopy(stack.control.current)
                    for f in _NO_PREFETCH_FIELDS:
                        c["dynamic_batching"].pop(f, None)
                    client.load_model(cfg.model, config=json.dumps(c))
                    stack.control.current = {}  # reloaded behind the control's back: its next apply reloads
                before = _stats(client, cfg.model)
                t0 = time.monotonic()
                res = run_open_loop(stack.triton_url, cfg.model, times, timeout_s=30.0, required=counted,
                                    drain_grace_s=1.0, time_limit_s=float(times[-1]) + 10.0)
                after = _stats(client, cfg.model)
                ok = counted & np.array([s == "OK" for s in res.status])
                lat = res.done_s[ok] - res.scheduled_s[ok]
                lag = res.sent_s[ok] - res.scheduled_s[ok]
                sizes = res.batch_size[ok]
                execs = {b: (after.get(b, (0, 0))[0] - before.get(b, (0, 0))[0],
                             after.get(b, (0, 0))[1] - before.get(b, (0, 0))[1]) for b in after}
                n_exec = sum(v[0] for v in execs.values())
                exec_mean_b = sum(b * v[0] for b, v in execs.items()) / n_exec if n_exec else math.nan
                # Triton's compute time per batch against the profile the simulations use
                excess = [v[1] / v[0] / 1e9 - float(stack.profile.mean_s[b - 1]) for b, v in execs.items() if v[0] > 0]
                weights = [v[0] for v in execs.values() if v[0] > 0]
                row = {"delay_s": d, "config": conf, "requests": int(ok.sum()), "failed": int(counted.sum() - ok.sum()),
                       "measured": _summary(lat, sizes, B), "send_lag_p50_s": float(np.median(lag)),
                       "send_lag_p99_s": float(np.percentile(lag, 99)), "triton_executions": n_exec,
                       "triton_mean_batch_per_execution": exec_mean_b,
                       "compute_minus_profile_mean_s": float(np.average(excess, weights=weights)) if weights else math.nan,
                       "wall_s": time.monotonic() - t0}
                row.update(race_evidence(res.scheduled_s, res.done_s, res.batch_size, ok, stack.profile, d, hop))
                # the share the model needs to give this run's W and p99 (solver.catch_share), beside the race
                # counted from the answers above
                fit = fit_run(stack.profile, B, d, times, lat, 0.99, hop_s=hop, window=(lo, hi), seed=cfg.seed)
                row["share_fitted_by_mean"] = fit.by_mean.share
                row["share_fitted_by_p99"] = fit.by_quantile.share
                for label, rule in (("timeout_rule", TimeoutRule(B, d)), ("triton_batcher", TritonBatcher(B, d)),
                                    ("triton_batcher_never_catches", TritonBatcher(B, d, catch_share=0.0))):
                    sim, slat = simulate_latencies(stack.profile, rule, times, idle_power_w=cfg.idle_power_w,
                                                   weight=cfg.weight, seed=cfg.seed)
                    sim_sizes = np.repeat(np.arange(1, B + 1), np.asarray(sim.batch_hist) * np.arange(1, B + 1))
                    row[label] = _summary(slat[counted] + hop, sim_sizes, B)
                np.savez_compressed(args.out / f"requests_{csv.stem}_{conf}_{d * 1e3:g}ms.npz",
                                    scheduled_s=res.scheduled_s, sent_s=res.sent_s, done_s=res.done_s,
                                    batch_size=res.batch_size, ok=ok)
                results.append(row)
                _print_row(row)
        client.close()
    path = args.out / f"triton_tail_{'synthetic_seed%d' % args.seed if args.synthetic else csv.stem}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


def _batches(done: np.ndarray, sizes: np.ndarray) -> list[tuple[int, int]]:
    """Answers (sorted by time) grouped into the batches that carried them: consecutive answers reporting
    the same batch size b, at most b of them, within 4 ms of the first (a batch's answers come out
    within about 1.5 ms on this stack)."""
    out = []
    i = 0
    while i < done.size:
        j = i + 1
        while j < done.size and j - i < sizes[i] and sizes[j] == sizes[i] and done[j] - done[i] < 0.004:
            j += 1
        out.append((i, j))
        i = j
    return out


def race_evidence(scheduled: np.ndarray, done: np.ndarray, batch_size: np.ndarray, ok: np.ndarray, profile,
                  delay_s: float, hop_s: float) -> dict:
    """How Triton's batcher took up work queued at a completion, from the answers alone.

    A transition is a pair of consecutive complete batches where the next one's oldest request had
    waited the delay before the previous batch completed (its answer less the hop): ``TimeoutRule``
    starts it at that completion. Its start is estimated as its first answer less the hop less
    tau(b). Only transitions whose next arrival came more than 3 ms after the completion tell the two
    apart (``transitions``): ``started_at_completion_share`` is the share of those that started within
    3 ms of the completion (the batcher caught the instance free), and for the others
    ``late_vs_next_arrival`` is how often the lateness is within 3 ms of the gap to the next arrival (it
    slept until then). ``split_group_share``: groups (equal arrival times) whose answers came in
    different batches."""
    sch, dn, b = scheduled[ok], done[ok], batch_size[ok]
    order = np.argsort(dn)
    sch, dn, b = sch[order], dn[order], b[order]
    every = np.sort(scheduled)
    bat = _batches(dn, b)
    late, gap = [], []
    for (i0, j0), (i1, j1) in zip(bat, bat[1:]):
        if j0 - i0 != b[i0] or j1 - i1 != b[i1]:
            continue
        completion = dn[i0] - hop_s
        if sch[i1:j1].min() + delay_s < completion - 0.002:
            late.append(dn[i1] - hop_s - float(profile.mean_s[b[i1] - 1]) - completion)
            k = int(np.searchsorted(every, completion, side="right"))
            gap.append(every[k] - completion if k < every.size else math.inf)
    late_a, gap_a = np.asarray(late), np.asarray(gap)
    telling = gap_a > 0.003
    late_a, gap_a = late_a[telling], gap_a[telling]
    slept = late_a > 0.003
    uniq, inv, cnt = np.unique(scheduled, return_inverse=True, return_counts=True)
    groups = split = 0
    for g in np.nonzero(cnt >= 2)[0]:
        idx = np.nonzero(inv == g)[0]
        if not ok[idx].all():
            continue
        groups += 1
        split += int(done[idx].max() - done[idx].min() > 0.004)
    return {"transitions": int(late_a.size),
            "started_at_completion_share": float(np.mean(~slept)) if late_a.size else math.nan,
            "late_vs_next_arrival": float(np.mean(np.abs(late_a[slept] - gap_a[slept]) < 0.003)) if slept.any() else math.nan,
            "split_group_share": split / groups if groups else math.nan}


def _summary(lat: np.ndarray, sizes: np.ndarray, max_batch: int) -> dict:
    share = _share_by_size(sizes, max_batch)
    p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
    return {"W_s": float(lat.mean()), "p50_s": p50, "p95_s": p95, "p99_s": p99,
            "mean_batch_by_request": float(np.sum(share * np.arange(1, max_batch + 1))),
            "share_by_size": share.tolist()}


def _print_row(row: dict) -> None:
    print(f"\ndelay {row['delay_s'] * 1e3:g} ms, config {row['config']}: {row['requests']} requests "
          f"({row['failed']} failed); send lag p50 {row['send_lag_p50_s'] * 1e3:.2f} ms, p99 "
          f"{row['send_lag_p99_s'] * 1e3:.2f} ms; Triton executions {row['triton_executions']} (mean batch "
          f"{row['triton_mean_batch_per_execution']:.2f}); its compute time - the profile's tau(b): "
          f"{row['compute_minus_profile_mean_s'] * 1e3:+.2f} ms per batch")
    print(f"  transitions due at a completion: {row['transitions']}, started there (the batcher caught the "
          f"instance): {row['started_at_completion_share']:.2f}; the late ones late by the gap to the next arrival "
          f"(within 3 ms): {row['late_vs_next_arrival']:.2f}; groups split across batches: {row['split_group_share']:.3f}")
    if "share_fitted_by_mean" in row:
        print(f"  the share TritonBatcher needs to give this run's W: {row['share_fitted_by_mean']:.2f}, its p99: "
              f"{row['share_fitted_by_p99']:.2f}")
    share_m = np.asarray(row["measured"]["share_by_size"])
    print(f"  {'':<28} {'W ms':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'batch':>6}  TV   share of requests by batch size")
    for label in ("measured", "timeout_rule", "triton_batcher", "triton_batcher_never_catches"):
        s = row[label]
        share = np.asarray(s["share_by_size"])
        tv = 0.5 * float(np.abs(share - share_m).sum())
        print(f"  {label:<28} {s['W_s'] * 1e3:7.2f} {s['p50_s'] * 1e3:7.2f} {s['p95_s'] * 1e3:7.2f} "
              f"{s['p99_s'] * 1e3:7.2f} {s['mean_batch_by_request']:6.2f} {tv:5.3f} {_bins(share)}")


if __name__ == "__main__":
    raise SystemExit(main())
