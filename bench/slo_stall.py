"""A host stall against the SLO gate's measured correction, on the real stack.

Embedded Triton (the emulated GPU, ``--time-scale`` times slower than the V100 profile), the adaptive
SLO gate in front of it (``smdp serve`` with ``--slo-*``, the bench's own sidecar process), steady
Poisson load at ``--rate`` for ``--duration`` seconds. At each ``--stall-at`` second Triton's process
group (started here) is paused with SIGSTOP for ``--stall-ms`` and resumed with SIGCONT. Every 0.5 s
the gate's ``ctl status`` is read: the measured correction in force, what it would be with the
stalls left in (``SloStatus.correction_with_stalls_s``), the answers a stall held up, the gate's
own attainment over its window. After the run it prints the client's attainment per 2 s slice and
that timeline: the dip during the stall, the recovery after it, and whether the correction moved.

    .venv/bin/python bench/slo_stall.py --rate 200 --duration 30 --stall-at 10 --stall-ms 400
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from loadtest.bench import BenchConfig, bench_stack, contender_override
from loadtest.contenders import parse_contender
from loadtest.openloop import run_open_loop
from loadtest.stack import SidecarProcess, SidecarSpec
from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig
from solver import arrivals
from solver.slo import SloTarget
from smdp.v1 import smdp_pb2, smdp_pb2_grpc


@dataclass(frozen=True)
class Sample:
    t: float
    """Seconds from the load's time origin."""
    correction_s: float
    with_stalls_s: float
    held_up: int
    stalled_s: float
    attainment: float
    measured_q_s: float
    predicted_q_s: float


def _watch(control_url: str, model: str, t0: list[float], stop: threading.Event, out: list[Sample]) -> None:
    """Read the gate's SLO status every 0.5 s until ``stop``."""
    with grpc.insecure_channel(control_url) as ch:
        stub = smdp_pb2_grpc.ControlStub(ch)
        while not stop.wait(0.5):
            try:
                st = stub.GetStatus(smdp_pb2.ModelRequest(model=model), timeout=2.0)
            except grpc.RpcError:
                continue
            o = st.slo
            if not st.HasField("slo") or not t0:
                continue
            nan = float("nan")
            out.append(Sample(
                time.time() - t0[0], o.correction_s,
                o.correction_with_stalls_s if o.HasField("correction_with_stalls_s") else nan,
                o.stall_held_up, o.stalled_s,
                o.attainment if o.HasField("attainment") else nan,
                o.measured_quantile_s if o.HasField("measured_quantile_s") else nan,
                o.predicted_quantile_s if o.HasField("predicted_quantile_s") else nan))


def _pause(pgid: int, at: list[float], stall_s: float, t0: list[float], done: list[tuple[float, float]]) -> None:
    """SIGSTOP the process group ``pgid`` (ours) at each time of ``at``, SIGCONT ``stall_s`` later."""
    while not t0:
        time.sleep(0.01)
    for a in at:
        wait = t0[0] + a - time.time()
        if wait > 0:
            time.sleep(wait)
        start = time.time() - t0[0]
        os.killpg(pgid, signal.SIGSTOP)
        try:
            time.sleep(stall_s)
        finally:
            os.killpg(pgid, signal.SIGCONT)
        done.append((start, time.time() - t0[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--stall-at", type=float, nargs="+", default=[10.0])
    ap.add_argument("--stall-ms", type=float, default=400.0)
    ap.add_argument("--slo-latency", type=float, default=0.08)
    ap.add_argument("--slo-quantile", type=float, default=0.99)
    ap.add_argument("--slo-margin", type=float, default=0.005)
    ap.add_argument("--weight", type=float, default=1e-3)
    ap.add_argument("--data-plane", default="native")
    ap.add_argument("--out", type=Path, default=Path("out/slo_stall"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    slo = SloTarget(a.slo_quantile, a.slo_latency, a.slo_margin)
    contender = parse_contender("gate:smdp-slo")
    cfg = BenchConfig(rates=(a.rate,), contenders=(contender,), slo=slo, data_plane=a.data_plane,
                      out_dir=a.out, duration_s=a.duration, weight=a.weight, seed=a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    triton = EmbeddedTriton(TritonConfig(models=(cfg.model,), log_file=a.out / "tritonserver.log")).start()
    try:
        with bench_stack(cfg, triton_url=triton.grpc_url) as stack:
            stack.control.apply(contender_override(contender, cfg))
            spec = SidecarSpec(policy="smdp", max_batch=stack.max_batch, profile_csv=stack.profile_path,
                               rate_rps=a.rate, weight=a.weight, idle_power_w=cfg.idle_power_w, adaptive=True,
                               data_plane=cfg.data_plane, slo=slo)
            sidecar = SidecarProcess(stack.triton_url, spec, log_path=a.out / "sidecar.log").start()
            try:
                times = arrivals.poisson(a.rate, duration=a.duration, rng=a.seed)
                t0: list[float] = []
                samples: list[Sample] = []
                stalls: list[tuple[float, float]] = []
                stop = threading.Event()
                watcher = threading.Thread(target=_watch, args=(sidecar.control_url, cfg.model, t0, stop, samples),
                                           daemon=True)
                pauser = threading.Thread(target=_pause, args=(triton.pid, a.stall_at, a.stall_ms / 1e3, t0, stalls),
                                          daemon=True)
                watcher.start()
                pauser.start()
                t0.append(time.time())
                res = run_open_loop(sidecar.url, cfg.model, times, timeout_s=30.0, drain_grace_s=1.0,
                                    time_limit_s=a.duration + 10.0)
                pauser.join(timeout=a.stall_ms / 1e3 + 5.0)
                stop.set()
                watcher.join(timeout=5.0)
            finally:
                sidecar.stop()
    finally:
        triton.stop()
    _report(a, res, samples, stalls, slo, t0[0])


def _report(a, res, samples: list[Sample], stalls: list[tuple[float, float]], slo: SloTarget, t0: float) -> None:
    shift = res.wall_start - t0  # the open loop's own time origin, on the watcher's clock
    ok = np.array([s == "OK" for s in res.status])
    lat = res.done_s - res.scheduled_s
    print(f"rate {a.rate:g}/s, {a.duration:g} s, SLO q{slo.quantile:g} <= {slo.latency_s * 1e3:g} ms, margin "
          f"{slo.margin_s * 1e3:g} ms, {a.data_plane} plane; Triton paused (SIGSTOP) "
          + ", ".join(f"{s:.2f}-{e:.2f} s" for s, e in stalls))
    print(f"requests {res.n}, answered OK {int(ok.sum())}, overall attainment "
          f"{np.mean(ok & (lat <= slo.latency_s)):.4f}")
    print("client, per 2 s slice of scheduled time: attainment (share OK within D), p99 ms")
    for lo in np.arange(0.0, a.duration, 2.0):
        m = (res.scheduled_s + shift >= lo) & (res.scheduled_s + shift < lo + 2.0)
        if m.any():
            good = ok[m] & (lat[m] <= slo.latency_s)
            p99 = np.nanquantile(np.where(ok[m], lat[m], np.inf), 0.99) * 1e3
            print(f"  {lo:5.1f}-{lo + 2:5.1f} s  {good.mean():.4f}  {p99:8.2f}")
    print("gate status every 0.5 s: t s, correction ms (with stalls left in), answers held up, stall ms in window, "
          "gate attainment, measured q ms, predicted q ms")
    for s in samples:
        print(f"  {s.t:5.1f}  {s.correction_s * 1e3:6.2f} ({s.with_stalls_s * 1e3:7.2f})  {s.held_up:5d} "
              f"{s.stalled_s * 1e3:7.1f}  {s.attainment:.4f}  {s.measured_q_s * 1e3:7.2f}  {s.predicted_q_s * 1e3:7.2f}")
    if samples:
        print(f"max correction {max(s.correction_s for s in samples) * 1e3:.2f} ms; max with stalls left in "
              f"{np.nanmax([s.with_stalls_s for s in samples]) * 1e3:.2f} ms; final correction "
              f"{samples[-1].correction_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
