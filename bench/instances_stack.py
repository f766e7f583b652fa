"""How long a batch holds an instance of the real stack when k batches run at once (issue 13).

The solver is told the stack's profile measured one batch at a time (``loadtest/stack_profile.py``:
one instance, one request in flight). With ``instance_group`` count k, up to k batches run at once,
on the same host cores as Triton's gRPC front end, the Python backend's stubs and the load
generator. This measures the batch hold (a merged request of b rows, Triton's batcher off, as the
gate sends it) with c = 1 and c = k requests in flight (closed loop, c clients each sending the next
request when its answer arrives), on the emulated model with k instances, and prints the ratio.

    python bench/instances_stack.py [--instances 2 --time-scale 20] [--sizes 1,16,64] [--requests 20]

``--diagnose RATE``: where a k-instance prediction's W goes wrong. Triton's batcher (delay 0, k
instances) runs one open-loop Poisson sequence at RATE; the per-request record splits the measured W
(from each request's scheduled time) into the client's send lag and the time from the actual send,
and the simulator predicts W twice with the hold measured above (tau(b) of the table plus the added
time at c = k, interpolated): on the scheduled arrivals (what the bench predicts) and on the arrivals
as sent (the sequence the server really got).

``--trace DIR`` (with ``--diagnose``): Triton traces every request (TIMESTAMPS) into DIR; afterwards
its own record of the Poisson run is analysed (``--analyse DIR`` repeats that without Triton): what a
batch costs beyond tau(b) when it is one request of b rows (the gate's batches) and when it is b
separate requests (Triton's batches), the turnaround from an instance finishing to Triton's batcher
starting its next batch while requests wait, and the server-side W predicted on the traced arrivals
with those holds (``replay``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.stack import scaled_profile
from loadtest.triton_control import BatchingOverride, ModelConfigControl
from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig
from plugin.profiler import InputSynthesizer, TritonModelClient
from solver.model import ServiceProfile

MODEL = "emulated_gpu"


async def closed_loop(url: str, b: int, clients: int, requests: int, skip: int) -> np.ndarray:
    """Per-request seconds of ``clients`` closed-loop clients sending b-row requests."""
    client = TritonModelClient(url)
    try:
        spec = await client.model_spec(MODEL)
        synth = InputSynthesizer(spec)
        req = synth.request(b)

        async def one() -> list[float]:
            out = []
            for i in range(requests + skip):
                dt = await client.timed_infer(req)
                if i >= skip:
                    out.append(dt)
            return out

        got = await asyncio.gather(*(one() for _ in range(clients)))
    finally:
        await client.close()
    return np.asarray([x for g in got for x in g])


def diagnose(url: str, control: ModelConfigControl, table: ServiceProfile, k: int, time_scale: float,
             added: dict[int, float], rate: float, duration_s: float, warmup_s: float) -> float:
    from loadtest.openloop import run_open_loop
    from solver import arrivals
    from solver.policy import PerInstance, TimeoutRule
    from solver.simulate import simulate

    sizes = sorted(added)
    extra = np.interp(np.arange(1, table.max_batch + 1), sizes, [added[b] for b in sizes])
    prof = ServiceProfile(mean_s=table.mean_s + extra, energy_j=table.energy_j + 40.0 * extra, cv=table.cv)
    control.apply(BatchingOverride(max_queue_delay_us=0, time_scale=time_scale, instances=k))
    # the same holds through Triton's batcher (delay 0): the stack profile is measured with it off; one
    # client, so that the batcher has nothing to merge and times the batch of b rows it was sent
    with_batcher: dict[int, float] = {}
    for b in sizes:
        t = asyncio.run(closed_loop(url, b, 1, 8, 2))
        with_batcher[b] = float(np.median(t)) - float(table.mean_s[b - 1])
    print("  added per batch with Triton's batcher on (median, c = 1), ms: "
          + ", ".join(f"b={b}: {with_batcher[b] * 1e3:.2f} (off: {added[b] * 1e3:.2f})" for b in sizes))
    extra_on = np.interp(np.arange(1, table.max_batch + 1), sizes, [with_batcher[b] for b in sizes])
    prof_on = ServiceProfile(mean_s=table.mean_s + extra_on, energy_j=table.energy_j + 40.0 * extra_on, cv=table.cv)
    lone = np.arange(25) * (3 * float(prof.mean_s[0]) + 0.005)
    res = run_open_loop(url, MODEL, lone, timeout_s=30.0, drain_grace_s=1.0)
    hop = float(np.median((res.done_s - res.scheduled_s)[5:])) - float(prof.mean_s[0])
    times = arrivals.poisson(rate, duration=duration_s, rng=7)
    mark = time.monotonic()
    res = run_open_loop(url, MODEL, times, timeout_s=30.0, drain_grace_s=1.0, time_limit_s=duration_s + 10)
    win = (res.scheduled_s >= warmup_s) & res.ok
    w_sched = float(np.mean(res.done_s[win] - res.scheduled_s[win]))
    w_sent = float(np.mean(res.done_s[win] - res.sent_s[win]))
    lag = float(np.mean(res.sent_s[win] - res.scheduled_s[win]))
    batch = float(np.mean(res.batch_size[win]))
    rule = PerInstance(TimeoutRule(table.max_batch, 0.0), k)
    sent = np.sort(np.where(np.isnan(res.sent_s), res.scheduled_s, res.sent_s))

    def sim(t: np.ndarray, p: ServiceProfile = prof):
        return simulate(p, rule, t, idle_power_w=40.0, weight=0.0, seed=1, warmup=warmup_s)

    p_sched, p_sent, p_on = sim(times), sim(sent), sim(times, prof_on)
    print(f"\nTriton batcher delay 0, count {k}, time scale {time_scale:g}, {rate:g} req/s, "
          f"{int(win.sum())} requests counted; lone-request hop {hop * 1e3:.2f} ms")
    print(f"  measured W from scheduled {w_sched * 1e3:.2f} ms = send lag {lag * 1e3:.2f} + from send "
          f"{w_sent * 1e3:.2f}; batch size seen by a request {batch:.2f}")
    for name, p in (("on the scheduled arrivals", p_sched), ("on the arrivals as sent", p_sent),
                    ("with the batcher-on hold", p_on)):
        w = p.mean_latency_s + hop
        print(f"  predicted {name:<26}: W {w * 1e3:.2f} ms (sim {p.mean_latency_s * 1e3:.2f} + hop), "
              f"mean batch {p.mean_batch:.2f}; measured from scheduled / pred {w_sched / w:.4f}, "
              f"lag + pred {(lag + w) * 1e3:.2f} ms ({w_sched / (lag + w):.4f})")
    return mark


@dataclass(frozen=True)
class TracedBatches:
    """Triton's own record of a run (``--trace-config level=TIMESTAMPS``, every request traced): per batch
    its start and end (the requests' COMPUTE_START / COMPUTE_END, shared by the batch), its requests'
    arrivals at the scheduler (QUEUE_START), steady-clock seconds."""

    start: np.ndarray
    end: np.ndarray
    arrivals: tuple[np.ndarray, ...]

    @property
    def size(self) -> np.ndarray:
        return np.array([a.size for a in self.arrivals])


def read_trace(path: Path, model: str) -> TracedBatches:
    """Group the traced requests of ``model`` into batches by their (COMPUTE_START, COMPUTE_END)."""
    entries = json.loads(path.read_text())
    stamps: dict[int, dict[str, int]] = {}
    names: dict[int, str] = {}
    for e in entries:
        i = int(e["id"])
        if "model_name" in e:
            names[i] = e["model_name"]
        for t in e.get("timestamps", ()):
            stamps.setdefault(i, {})[t["name"]] = int(t["ns"])
    rows = []
    for i, t in stamps.items():
        if names.get(i) == model and {"QUEUE_START", "COMPUTE_START", "COMPUTE_END"} <= t.keys():
            rows.append((t["COMPUTE_START"], t["COMPUTE_END"], t["QUEUE_START"]))
    if not rows:
        raise SystemExit(f"no traced requests of {model} in {path}")
    rows.sort()
    groups: dict[tuple[int, int], list[int]] = {}
    for cs, ce, q in rows:
        groups.setdefault((cs, ce), []).append(q)
    keys = sorted(groups)
    return TracedBatches(np.array([k[0] for k in keys]) * 1e-9, np.array([k[1] for k in keys]) * 1e-9,
                         tuple(np.sort(np.array(groups[k])) * 1e-9 for k in keys))


def formation(tb: TracedBatches, k: int, table: ServiceProfile, lo: float) -> None:
    """How Triton's batcher formed the batches, against the per-instance greedy rule the bench simulates.

    Each batch goes to the instance that became free last before its start (k instances; the end of
    an instance's previous batch is when Triton's backend thread finished it). For the batches counted
    (starting ``lo`` s after the first), split by whether requests were already waiting when the
    instance freed: the turnaround (start - instance free) and how many of the batch's requests
    arrived after the instance freed (greedy: the batch is exactly the requests waiting then)."""
    free = [-np.inf] * k
    t0 = tb.start[0]
    rows = []
    all_arr = np.sort(np.concatenate(tb.arrivals))
    for s, e, arr in zip(tb.start, tb.end, tb.arrivals):
        ready = [f for f in free if f <= s + 1e-9]
        if not ready:
            raise SystemExit(f"batch at {s - t0:.4f} s starts with all {k} instances busy: not {k} instances?")
        f = max(ready)
        free[free.index(f)] = e
        if s - t0 < lo:
            continue
        waiting = bool(arr[0] < f)
        late = int(np.sum(arr > f)) if waiting else int(np.sum(arr > arr[0]))
        gap = s - (f if waiting else arr[0])
        # the arrival closest before the start: did the batch start on an arrival's heels?
        j = np.searchsorted(all_arr, s, side="right") - 1
        since_arrival = s - all_arr[j] if j >= 0 else np.inf
        rows.append((waiting, gap, late, arr.size, since_arrival, e - s - float(table.mean_s[arr.size - 1])))
    r = np.array(rows, dtype=float)
    print(f"  {r.shape[0]} batches counted (traced by Triton); busy = COMPUTE_END - COMPUTE_START")
    sizes, overs = r[:, 3], r[:, 5]
    print("  busy - tau(b) of Triton's batches of b separate requests, ms: " + ", ".join(
        f"b in [{lo_b}, {hi_b}): {overs[(sizes >= lo_b) & (sizes < hi_b)].mean() * 1e3:.3f}"
        for lo_b, hi_b in ((1, 2), (2, 8), (8, 16), (16, 24), (24, 40), (40, 129))
        if np.any((sizes >= lo_b) & (sizes < hi_b))))
    for flag, name in ((1.0, "requests waiting when the instance freed"), (0.0, "instance idle, batch on an arrival")):
        m = r[:, 0] == flag
        if not m.any():
            continue
        g, late, b, since, over = r[m, 1], r[m, 2], r[m, 3], r[m, 4], r[m, 5]
        print(f"  {name}: {int(m.sum())} batches, mean size {b.mean():.2f}")
        print(f"    turnaround (start - {'instance free' if flag else 'first arrival'}) ms: mean {g.mean() * 1e3:.3f}, "
              f"p50 {np.median(g) * 1e3:.3f}, p90 {np.percentile(g, 90) * 1e3:.3f}, max {g.max() * 1e3:.3f}")
        print(f"    requests that arrived after {'the instance freed' if flag else 'the first'}: mean {late.mean():.2f} "
              f"per batch ({late.sum() / b.sum():.1%} of the batches' requests)")
        print(f"    start within 0.3 ms after an arrival: {np.mean(since < 3e-4):.1%} of these batches; "
              f"busy - tau(b): mean {over.mean() * 1e3:.3f} ms")


def replay(tb: TracedBatches, k: int, table: ServiceProfile, lo: float) -> None:
    """Predict the server-side W (QUEUE_START to COMPUTE_END) of the traced run on its own arrivals at
    the scheduler, with Triton's batcher as the per-instance greedy rule, for three holds: tau(b) alone;
    plus the backend's cost fitted to the traced busy times (a + c b: Triton's batch is b separate
    requests, each one the Python backend reads and answers); plus the measured turnaround between an
    instance freeing and its next batch starting while requests wait."""
    from solver.policy import PerInstance, TimeoutRule
    from solver.simulate import simulate

    b = tb.size
    over = tb.end - tb.start - table.mean_s[b - 1]
    c, a = np.polyfit(b.astype(float), over, 1)
    t0 = tb.start[0]
    arr = np.sort(np.concatenate(tb.arrivals))
    done = np.concatenate([np.full(x.size, e) for x, e in zip(tb.arrivals, tb.end)])
    q = np.concatenate(tb.arrivals)
    counted = q >= t0 + lo
    w_server = float(np.mean(done[counted] - q[counted]))
    free = [-np.inf] * k
    turns = []
    for st, e, x in zip(tb.start, tb.end, tb.arrivals):
        f = max(v for v in free if v <= st + 1e-9)
        free[free.index(f)] = e
        if x[0] < f:
            turns.append(st - f)
    turn = float(np.mean(turns))
    sizes = np.arange(1, table.max_batch + 1)
    print(f"  backend cost fitted to the traced busy times: busy - tau(b) = {a * 1e3:.3f} + {c * 1e3:.4f} b ms; "
          f"turnaround with requests waiting {turn * 1e3:.3f} ms (mean of {len(turns)})")
    print(f"  measured server-side W (QUEUE_START to COMPUTE_END) {w_server * 1e3:.2f} ms, "
          f"mean batch {float(np.mean(b[tb.start >= t0 + lo])):.2f}")
    for name, extra in (("tau(b)", 0.0 * sizes), ("tau(b) + backend cost", a + c * sizes),
                        ("tau(b) + backend cost + turnaround", a + c * sizes + turn)):
        prof = ServiceProfile(mean_s=table.mean_s + extra, energy_j=table.energy_j, cv=table.cv)
        sim = simulate(prof, PerInstance(TimeoutRule(table.max_batch, 0.0), k), arr - arr[0], idle_power_w=40.0,
                       weight=0.0, seed=1, warmup=t0 + lo - arr[0])
        print(f"  predicted, hold {name:<46}: W {sim.mean_latency_s * 1e3:7.2f} ms ({w_server / sim.mean_latency_s - 1:+.2%} "
              f"measured vs predicted), mean batch {sim.mean_batch:.2f}")
    # the turnaround as drawn, not its mean: each batch's hold + one of the measured turnarounds
    base = table.mean_s + a + c * sizes
    prof = ServiceProfile(mean_s=base, energy_j=table.energy_j, cv=table.cv).with_samples(
        {int(n): base[n - 1] + np.asarray(turns) for n in sizes})
    sim = simulate(prof, PerInstance(TimeoutRule(table.max_batch, 0.0), k), arr - arr[0], idle_power_w=40.0,
                   weight=0.0, seed=1, warmup=t0 + lo - arr[0])
    name = "tau(b) + backend cost + turnaround as drawn"
    print(f"  predicted, hold {name:<46}: W {sim.mean_latency_s * 1e3:7.2f} ms ({w_server / sim.mean_latency_s - 1:+.2%} "
          f"measured vs predicted), mean batch {sim.mean_batch:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--time-scale", type=float, default=20.0)
    ap.add_argument("--sizes", default="1,16,64,128")
    ap.add_argument("--requests", type=int, default=20, help="per client and size, after 3 not counted")
    ap.add_argument("--diagnose", type=float, default=None, metavar="RATE",
                    help="then run Triton's batcher at RATE req/s and split W (module doc)")
    ap.add_argument("--duration", type=float, default=14.0, help="--diagnose: seconds of arrivals (first 4 not counted)")
    ap.add_argument("--trace", type=Path, default=None, metavar="DIR",
                    help="--diagnose: Triton traces every request (timestamps) into DIR; after the run, how its "
                         "batcher formed the batches of the Poisson run (``formation``)")
    ap.add_argument("--analyse", type=Path, default=None, metavar="DIR",
                    help="only analyse a run traced into DIR before (no Triton)")
    args = ap.parse_args()
    if args.analyse is not None:
        analyse(args.analyse)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    k = args.instances
    extra: tuple[str, ...] = ()
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
        trace_file = args.trace / "trace.json"
        trace_file.unlink(missing_ok=True)
        extra = ("--trace-config", f"triton,file={trace_file}", "--trace-config", "triton,log-frequency=0",
                 "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1", "--trace-config", "count=-1")
    triton = EmbeddedTriton(TritonConfig(models=(MODEL,), extra_args=extra))
    triton.start()
    mark = None
    try:
        control = ModelConfigControl(triton.grpc_url, MODEL)
        table = scaled_profile(ServiceProfile.from_csv("profiles/v100_resnet50.csv").truncated(control.max_batch),
                               args.time_scale)
        control.apply(BatchingOverride(time_scale=args.time_scale, dynamic_batching=False, instances=k))
        print(f"emulated_gpu, count {k}, time scale {args.time_scale:g}; hold = request time, closed loop")
        print(f"{'b':>4} {'table ms':>9} {'c=1 ms':>8} {'+-':>5} {'c=k ms':>8} {'+-':>5} {'c=k / c=1':>9} "
              f"{'added c=1':>9} {'added c=k':>9}")
        added: dict[int, float] = {}
        for b in sizes:
            res = {}
            for c in (1, k):
                t = asyncio.run(closed_loop(triton.grpc_url, b, c, args.requests, 3))
                res[c] = (float(t.mean()), 1.96 * float(t.std(ddof=1)) / np.sqrt(t.size))
            tau = float(table.mean_s[b - 1])
            (m1, e1), (mk, ek) = res[1], res[k]
            print(f"{b:>4} {tau * 1e3:>9.2f} {m1 * 1e3:>8.2f} {e1 * 1e3:>5.2f} {mk * 1e3:>8.2f} {ek * 1e3:>5.2f} "
                  f"{mk / m1:>9.4f} {(m1 - tau) * 1e3:>9.2f} {(mk - tau) * 1e3:>9.2f}", flush=True)
            added[b] = mk - tau
        if args.diagnose is not None:
            mark = diagnose(triton.grpc_url, control, table, k, args.time_scale, added, args.diagnose, args.duration,
                            4.0)
        control.close()
    finally:
        triton.stop()
    if args.trace is not None and mark is not None:
        (args.trace / "mark.txt").write_text(f"{mark!r} {k} {args.time_scale!r} {table.max_batch} {args.sizes}\n")
        analyse(args.trace)


def analyse(trace_dir: Path) -> None:
    """``formation`` and ``replay`` of the Poisson run traced in ``trace_dir`` (its first 4 s not counted)."""
    mark_s, k_s, scale_s, b_s, sizes_s = (trace_dir / "mark.txt").read_text().split()
    held = np.array([int(x) for x in sizes_s.split(",")])
    mark, k = float(mark_s), int(k_s)
    tb = read_trace(trace_dir / "trace.json", MODEL)
    table = scaled_profile(ServiceProfile.from_csv("profiles/v100_resnet50.csv").truncated(int(b_s)), float(scale_s))
    keep = tb.start >= mark  # Triton's steady clock and time.monotonic() are both CLOCK_MONOTONIC
    run = TracedBatches(tb.start[keep], tb.end[keep], tuple(a for a, x in zip(tb.arrivals, keep) if x))
    lo = mark + 4.0 - run.start[0]
    # before the run: the hold measurements' batches, each ONE request of b rows (batcher off, as the
    # gate sends them): what a batch costs beyond tau(b) when it is one request
    one = (tb.start < mark) & (tb.size == 1)
    busy = (tb.end - tb.start)[one]
    near = held[np.abs(busy[:, None] - table.mean_s[held - 1][None, :]).argmin(axis=1)] - 1
    over = busy - table.mean_s[near]
    print("\nbusy - tau(b) of a batch that is ONE request of b rows (the hold measurements), ms: "
          + ", ".join(f"b={b + 1}: {np.median(over[near == b]) * 1e3:.3f} (n={int(np.sum(near == b))})"
                      for b in np.unique(near) if np.sum(near == b) >= 5))
    print(f"how Triton's batcher formed the batches of that run (count {k}, delay 0), from its trace:")
    formation(run, k, table, lo)
    replay(run, k, table, lo)


if __name__ == "__main__":
    t0 = time.monotonic()
    main()
    print(f"({time.monotonic() - t0:.0f} s)")
