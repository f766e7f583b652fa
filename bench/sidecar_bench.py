"""Sidecar overhead: latency and throughput through the gate against direct Triton, same run.

Starts one embedded Triton and one sidecar (``smdp serve`` in its own process, greedy policy), then
for each path (direct, via the sidecar):
  - low load: one request at a time (added latency, p50/p99);
  - saturation: C requests kept in flight for T seconds (throughput, p50/p99), and the CPU seconds
    Triton and the sidecar spent per request (merging means one Triton call per batch).
Client, sidecar and Triton share this machine's cores, as in the reference measurement
(a plain Python pass-through proxy: 1.0 ms p50 vs Triton's 0.43 ms, 1.6k vs 5.6k req/s).

    python bench/sidecar_bench.py [--model cpu_mlp] [--seconds 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugin.triton_server import EmbeddedTriton, TritonConfig  # noqa: E402

INPUT_DIM = {"cpu_mlp": 256, "emulated_gpu": 16}


def request(model: str, rows: int = 1) -> bytes:
    x = np.random.default_rng(0).standard_normal((rows, INPUT_DIM[model])).astype(np.float32)
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    del t
    return req.SerializeToString()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children (Triton's Python-backend stubs are children)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


async def low_load(url: str, payload: bytes, n: int) -> np.ndarray:
    async with grpc.aio.insecure_channel(url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(20):
            await call(payload)
        lat = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            await call(payload)
            lat[i] = time.perf_counter() - t0
    return lat


async def saturation(url: str, payload: bytes, seconds: float, concurrency: int) -> tuple[np.ndarray, float]:
    async with grpc.aio.insecure_channel(url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        lats: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call(payload)
                lats.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return np.array(lats), time.perf_counter() - t0


def start_sidecar(triton_url: str, policy: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "smdp.cli", "serve", "--listen", "127.0.0.1:0", "--triton", triton_url,
         "--policy", policy, "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    line = proc.stdout.readline()
    m = re.search(r"listening on ([\d.]+:\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"sidecar did not start: {line}{proc.stdout.read()}")
    return proc, m.group(1)


def fmt_ms(a: np.ndarray, q: float) -> str:
    return f"{np.quantile(a, q) * 1e3:7.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu_mlp", choices=sorted(INPUT_DIM))
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests at low load")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each saturation run")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at saturation")
    ap.add_argument("--policy", default="greedy")
    args = ap.parse_args()

    payload = request(args.model)
    triton = EmbeddedTriton(TritonConfig(models=(args.model,))).start()
    side, side_url = start_sidecar(triton.grpc_url, args.policy)
    try:
        rows = []
        for name, url in (("direct", triton.grpc_url), ("sidecar", side_url)):
            lat = asyncio.run(low_load(url, payload, args.requests))
            cpu0 = cpu_seconds(triton.pid), cpu_seconds(side.pid)
            sat, wall = asyncio.run(saturation(url, payload, args.seconds, args.concurrency))
            cpu1 = cpu_seconds(triton.pid), cpu_seconds(side.pid)
            tri_cpu = (cpu1[0] - cpu0[0]) / len(sat) * 1e6
            side_cpu = (cpu1[1] - cpu0[1]) / len(sat) * 1e6
            rows.append((name, lat, sat, len(sat) / wall, tri_cpu, side_cpu))
        print(f"\nSidecar overhead, model {args.model}, policy {args.policy}; client, sidecar and Triton "
              f"share {os.cpu_count()} cores\n")
        print(f"{'path':8} | {'low load p50 ms':>15} {'p99 ms':>8} | {'saturation req/s':>16} {'p50 ms':>8} "
              f"{'p99 ms':>8} | {'Triton CPU us/req':>17} {'sidecar CPU us/req':>18}")
        for name, lat, sat, rps, tri_cpu, side_cpu in rows:
            print(f"{name:8} | {fmt_ms(lat, .5):>15} {fmt_ms(lat, .99):>8} | {rps:16.0f} {fmt_ms(sat, .5):>8} "
                  f"{fmt_ms(sat, .99):>8} | {tri_cpu:17.1f} {side_cpu if name == 'sidecar' else 0:18.1f}")
        d, s = rows
        print(f"\nadded latency at low load: p50 {1e3 * (np.median(s[1]) - np.median(d[1])):.3f} ms, "
              f"p99 {1e3 * (np.quantile(s[1], .99) - np.quantile(d[1], .99)):.3f} ms")
        print(f"throughput ratio sidecar/direct at saturation: {s[3] / d[3]:.2f}")
        print(f"Triton CPU per request, sidecar path / direct: {s[4] / d[4]:.2f} "
              f"(merged batches mean fewer Triton calls)")
        print(f"total CPU per request (Triton + sidecar) / direct Triton: {(s[4] + s[5]) / d[4]:.2f}")
    finally:
        side.terminate()
        side.wait(10)
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
