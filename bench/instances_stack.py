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
"""

from __future__ import annotations

import argparse
import asyncio
import time

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
             added: dict[int, float], rate: float, duration_s: float, warmup_s: float) -> None:
    from loadtest.openloop import run_open_loop
    from solver import arrivals
    from solver.policy import PerInstance, TimeoutRule
    from solver.simulate import simulate

    sizes = sorted(added)
    extra = np.interp(np.arange(1, table.max_batch + 1), sizes, [added[b] for b in sizes])
    prof = ServiceProfile(mean_s=table.mean_s + extra, energy_j=table.energy_j + 40.0 * extra, cv=table.cv)
    control.apply(BatchingOverride(max_queue_delay_us=0, time_scale=time_scale, instances=k))
    # the same holds through Triton's batcher (delay 0): the stack profile is measured with it off
    with_batcher: dict[int, float] = {}
    for b in sizes:
        t = asyncio.run(closed_loop(url, b, k, 8, 2))
        with_batcher[b] = float(np.median(t)) - float(table.mean_s[b - 1])
    print("  added per batch with Triton's batcher on (median, c = k), ms: "
          + ", ".join(f"b={b}: {with_batcher[b] * 1e3:.2f} (off: {added[b] * 1e3:.2f})" for b in sizes))
    extra_on = np.interp(np.arange(1, table.max_batch + 1), sizes, [with_batcher[b] for b in sizes])
    prof_on = ServiceProfile(mean_s=table.mean_s + extra_on, energy_j=table.energy_j + 40.0 * extra_on, cv=table.cv)
    lone = np.arange(25) * (3 * float(prof.mean_s[0]) + 0.005)
    res = run_open_loop(url, MODEL, lone, timeout_s=30.0, drain_grace_s=1.0)
    hop = float(np.median((res.done_s - res.scheduled_s)[5:])) - float(prof.mean_s[0])
    times = arrivals.poisson(rate, duration=duration_s, rng=7)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--time-scale", type=float, default=20.0)
    ap.add_argument("--sizes", default="1,16,64,128")
    ap.add_argument("--requests", type=int, default=20, help="per client and size, after 3 not counted")
    ap.add_argument("--diagnose", type=float, default=None, metavar="RATE",
                    help="then run Triton's batcher at RATE req/s and split W (module doc)")
    ap.add_argument("--duration", type=float, default=14.0, help="--diagnose: seconds of arrivals (first 4 not counted)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    k = args.instances
    triton = EmbeddedTriton(TritonConfig(models=(MODEL,)))
    triton.start()
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
            diagnose(triton.grpc_url, control, table, k, args.time_scale, added, args.diagnose, args.duration, 4.0)
        control.close()
    finally:
        triton.stop()


if __name__ == "__main__":
    t0 = time.monotonic()
    main()
    print(f"({time.monotonic() - t0:.0f} s)")
