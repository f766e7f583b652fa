"""Sidecar overhead: latency and throughput through the gate against direct Triton, same run.

Starts one embedded Triton, the sidecar on each data plane (``smdp serve`` in its own process, greedy
policy: ``sidecar`` = the Python gate, ``sidecar-native`` = the C++ smdp-gate, when built) and plain
pass-through proxies (``bench/passthrough_proxy.py``, raw bytes, no gate, same gRPC environment as
``smdp serve``), then for each path (direct, via a proxy, via a sidecar):
  - low load: one request at a time (added latency, p50/p99);
  - saturation: C requests kept in flight for T seconds (throughput, p50/p99), and the CPU seconds
    Triton and the sidecar spent per request (merging means one Triton call per batch).
Client, sidecar and Triton share this machine's cores, as in the reference measurement
(a plain Python pass-through proxy: 1.0 ms p50 vs Triton's 0.43 ms, 1.6k vs 5.6k req/s).

    python bench/sidecar_bench.py [--model cpu_mlp] [--seconds 5] [--concurrency 32] [--rounds 3]
                                  [--proxies aio,aio-default,sync]  # pass-through contenders ('' = none)
                                  [--native auto|on|off]  # the native data plane (auto: when built)
                                  [--baseline DIR]   # DIR: another source tree, e.g. an older commit
                                  [--native-gates NAME=PATH,...]  # more native contenders: other smdp-gate
                                                                  # binaries (e.g. the callback-API build)
                                  [--native-report-intervals S,...]  # more native contenders: the gate's
                                                                     # report interval (native_report_interval_s)
                                  [--python-plane on|off]  # the Python-plane sidecar contender
                                  [--protocol grpc|http|both]  # which API the paths are measured on

With ``--protocol http`` (or both) the same is measured over Triton's HTTP/REST API: direct to
Triton's HTTP port, through a plain aiohttp pass-through proxy (``bench/http_passthrough_proxy.py``),
and through each sidecar's HTTP listener (``--listen-http``); the client sends what tritonclient.http
sends by default (binary tensors, binary outputs) over keep-alive connections (aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugin.launcher.triton_server import DEFAULT_REPOSITORY, EmbeddedTriton, TritonConfig  # noqa: E402

INPUT_DIM = {"cpu_mlp": 256, "emulated_gpu": 16}


def request(model: str, rows: int = 1) -> bytes:
    x = np.random.default_rng(0).standard_normal((rows, INPUT_DIM[model])).astype(np.float32)
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    del t
    return req.SerializeToString()


def without_dynamic_batching(model: str, dest: Path) -> Path:
    """A copy of the model's repository entry with its ``dynamic_batching`` block removed."""
    shutil.copytree(DEFAULT_REPOSITORY / model, dest / model)
    cfg = dest / model / "config.pbtxt"
    text = cfg.read_text()
    start = text.index("dynamic_batching")
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            break
    cfg.write_text(text[:start] + text[j + 1:])
    return dest


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


def thread_cpu(pid: int) -> tuple[float, float]:
    """(the process's main thread, its other threads): seconds on a CPU, from each thread's schedstat
    (nanoseconds, where /proc/PID/stat counts clock ticks). The main thread is where an asyncio
    server's event loop and its Python run; gRPC's poller and other threads are the rest."""
    main = rest = 0.0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if task.name == str(pid):
            main += ns / 1e9
        else:
            rest += ns / 1e9
    return main, rest


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of a process and its children."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    vol = inv = 0
    for p in dict.fromkeys(pids):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        inv += int(line.split()[1])
            except OSError:
                pass
    return vol, inv


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


def http_request(model: str, rows: int = 1) -> tuple[bytes, dict[str, str]]:
    """The body and headers tritonclient.http sends for one inference (binary input and outputs)."""
    import tritonclient.http as tch

    x = np.random.default_rng(0).standard_normal((rows, INPUT_DIM[model])).astype(np.float32)
    inp = tch.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, header_length = tch.InferenceServerClient.generate_request_body([inp])
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return body, headers


async def http_low_load(url: str, model: str, payload: tuple[bytes, dict[str, str]], n: int) -> np.ndarray:
    import aiohttp

    body, headers = payload
    target = f"http://{url}/v2/models/{model}/infer"
    async with aiohttp.ClientSession() as s:
        async def one() -> None:
            async with s.post(target, data=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")

        for _ in range(20):
            await one()
        lat = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            await one()
            lat[i] = time.perf_counter() - t0
    return lat


async def http_saturation(url: str, model: str, payload: tuple[bytes, dict[str, str]], seconds: float,
                          concurrency: int) -> tuple[np.ndarray, float]:
    import aiohttp

    body, headers = payload
    target = f"http://{url}/v2/models/{model}/infer"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        lats: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                async with s.post(target, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url}: HTTP {r.status}")
                lats.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return np.array(lats), time.perf_counter() - t0


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


def start_sidecar(triton_url: str, policy: str, root: Path = ROOT, data_plane: str = "python",
                  triton_http: str | None = None, gate: Path | None = None,
                  settings: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, str | None]:
    """(process, gRPC host:port, HTTP host:port or None); ``triton_http``: also serve HTTP, relaying to it;
    ``gate``: the smdp-gate binary for the native plane (default: the one the sidecar finds); ``settings``:
    more sidecar settings, as ``SMDP_SIDECAR_<FIELD>`` environment variables."""
    # named even for python: data_plane's default is auto, which takes the native gate wherever it is
    # built; only a baseline tree that predates the setting (and so runs the Python gate) goes without
    knows_planes = "data_plane" in (root / "plugin" / "config.py").read_text()
    plane = ["--data-plane", data_plane] if knows_planes or data_plane != "python" else []
    if triton_http is not None:
        plane += ["--listen-http", "127.0.0.1:0", "--triton-http", triton_http]
    proc = subprocess.Popen(
        [sys.executable, "-m", "smdp.cli", "serve", "--listen", "127.0.0.1:0", "--triton", triton_url,
         "--policy", policy, "--control-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--log-level", "WARNING", *plane],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root,
        env={**os.environ, **({"SMDP_NATIVE_GATE": str(Path(gate).resolve())} if gate is not None else {}),
             **{f"SMDP_SIDECAR_{k.upper()}": v for k, v in (settings or {}).items()}},
    )
    seen = ""
    for line in proc.stdout:  # warnings may come first (e.g. about a model's dynamic_batching)
        seen += line
        m = re.search(r"listening on ([\d.]+:\d+)", line)
        if m:
            h = re.search(r"HTTP/REST on port (\d+)", line)
            return proc, m.group(1), f"127.0.0.1:{h.group(1)}" if h else None
    proc.kill()
    raise RuntimeError(f"sidecar did not start: {seen}")


PROXY_KINDS = {  # --proxies name: passthrough_proxy.py arguments
    "aio": ["--kind", "aio", "--grpc-env", "smdp"],
    "aio-default": ["--kind", "aio", "--grpc-env", "default"],
    "sync": ["--kind", "sync", "--grpc-env", "smdp"],
    "sync-default": ["--kind", "sync", "--grpc-env", "default"],
}


def start_proxy(triton_url: str, kind: str) -> tuple[subprocess.Popen, str]:
    script, extra = ("http_passthrough_proxy.py", []) if kind == "http" else ("passthrough_proxy.py", PROXY_KINDS[kind])
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), "--triton", triton_url, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    line = proc.stdout.readline()
    m = re.search(r"listening on ([\d.]+:\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"proxy did not start: {line}{proc.stdout.read()}")
    return proc, m.group(1)


def fmt_ms(a: np.ndarray, q: float) -> str:
    return f"{np.quantile(a, q) * 1e3:7.3f}"


@dataclass
class Path_:
    """One way to reach the model (direct, or through a sidecar process) and its measurements."""

    name: str
    url: str
    proc: subprocess.Popen | None = None
    protocol: str = "grpc"
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    low_lat: list[np.ndarray] = field(default_factory=list)  # every round's low-load latencies (s)
    low_cpu: list[float] = field(default_factory=list)
    low_cs: list[tuple[float, float]] = field(default_factory=list)  # (voluntary, involuntary) per request
    low_threads: list[tuple[float, float]] = field(default_factory=list)  # (main thread, others) CPU us/request
    tri_cs: list[tuple[float, float]] = field(default_factory=list)  # Triton's, on this path
    rps: list[float] = field(default_factory=list)
    sat_p50: list[float] = field(default_factory=list)
    sat_p99: list[float] = field(default_factory=list)
    tri_cpu: list[float] = field(default_factory=list)
    side_cpu: list[float] = field(default_factory=list)


def med(xs: list[float]) -> float:
    return float(np.median(xs)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu_mlp", choices=sorted(INPUT_DIM))
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests at low load, per round")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each saturation run (0: low load only)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at saturation")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each measures every path, in a rotating order (figures are medians over rounds)")
    ap.add_argument("--policy", default="greedy")
    ap.add_argument("--proxies", default="aio",
                    help=f"comma-separated pass-through proxy contenders, of {', '.join(PROXY_KINDS)} ('' = none)")
    ap.add_argument("--triton-batching", choices=["on", "off"], default="on",
                    help="off: Triton runs the model without its dynamic_batching block (no batcher stalls; "
                    "only the sidecar forms batches)")
    ap.add_argument("--native", choices=["auto", "on", "off"], default="auto",
                    help="include the sidecar on its native data plane (auto: when smdp-gate is built)")
    ap.add_argument("--protocol", choices=["grpc", "http", "both"], default="grpc",
                    help="measure over Triton's gRPC API, its HTTP/REST API, or both (same run)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also run a sidecar from another source tree (e.g. an older commit), same run; on "
                         "the native plane too (baseline-native) when that tree has native/build/smdp-gate")
    ap.add_argument("--native-gates", default="", metavar="NAME=PATH,...",
                    help="more sidecar-native contenders, each with its own smdp-gate binary, e.g. "
                         "callback=native/build/callback/smdp-gate (make -C native callback)")
    ap.add_argument("--native-report-intervals", default="", metavar="S,...",
                    help="more native contenders, one per native_report_interval_s value (named native-rS)")
    ap.add_argument("--python-plane", choices=["on", "off"], default="on",
                    help="include the sidecar on the Python data plane")
    args = ap.parse_args()
    gates = [g.split("=", 1) for g in filter(None, args.native_gates.split(","))]
    for g in gates:
        if len(g) != 2 or not Path(g[1]).is_file():
            ap.error(f"--native-gates: NAME=PATH to a built smdp-gate, got {'='.join(g)!r}")

    payload = request(args.model)
    http_payload = http_request(args.model)
    grpc_on, http_on = args.protocol in ("grpc", "both"), args.protocol in ("http", "both")
    tmp = tempfile.TemporaryDirectory(prefix="sidecar-bench-")
    repo = DEFAULT_REPOSITORY if args.triton_batching == "on" else without_dynamic_batching(args.model, Path(tmp.name))
    triton = EmbeddedTriton(TritonConfig(repository=repo, models=(args.model,))).start()
    triton_http = f"127.0.0.1:{triton.http_port}"
    paths = [Path_("direct", triton.grpc_url)] if grpc_on else []
    if http_on:
        paths.append(Path_("direct-http", triton_http, protocol="http"))

    def add_sidecar(name: str, proc: subprocess.Popen, url: str, http_url: str | None) -> None:
        if grpc_on:
            paths.append(Path_(name, url, proc))
        if http_on:
            paths.append(Path_(f"{name}-http", http_url, proc, "http"))

    try:
        for kind in filter(None, args.proxies.split(",")) if grpc_on else ():
            proc, url = start_proxy(triton.grpc_url, kind)
            paths.append(Path_(f"proxy-{kind}", url, proc))
        if http_on:
            proc, url = start_proxy(triton_http, "http")
            paths.append(Path_("proxy-http", url, proc, "http"))
        if args.python_plane == "on":
            add_sidecar("sidecar", *start_sidecar(triton.grpc_url, args.policy,
                                                  triton_http=triton_http if http_on else None))
        if args.native != "off":
            from plugin.native_plane import NativePlaneError, find_binary

            try:
                find_binary()
            except NativePlaneError as exc:
                if args.native == "on":
                    raise
                print(f"(no sidecar-native: {exc})", flush=True)
            else:
                add_sidecar("sidecar-native", *start_sidecar(triton.grpc_url, args.policy, data_plane="native",
                                                             triton_http=triton_http if http_on else None))
        for interval in filter(None, args.native_report_intervals.split(",")):
            add_sidecar(f"native-r{interval}", *start_sidecar(
                triton.grpc_url, args.policy, data_plane="native", triton_http=triton_http if http_on else None,
                settings={"native_report_interval_s": interval}))
        for name, gate in gates:
            add_sidecar(f"native-{name}", *start_sidecar(triton.grpc_url, args.policy, data_plane="native",
                                                        triton_http=triton_http if http_on else None, gate=Path(gate)))
        if args.baseline is not None:
            base = args.baseline.resolve()
            proc, url, _ = start_sidecar(triton.grpc_url, args.policy, base)
            paths.append(Path_("baseline", url, proc))
            if args.native != "off" and (base / "native" / "build" / "smdp-gate").exists():
                proc, url, _ = start_sidecar(triton.grpc_url, args.policy, base, data_plane="native")
                paths.append(Path_("baseline-native", url, proc))
        for r in range(args.rounds):
            order = paths[r % len(paths):] + paths[:r % len(paths)]
            for p in order:  # low load
                c0 = cpu_seconds(p.proc.pid) if p.proc else 0.0
                s0, t0 = context_switches(p.proc.pid) if p.proc else (0, 0), context_switches(triton.pid)
                th0 = thread_cpu(p.proc.pid) if p.proc else (0.0, 0.0)
                lat = asyncio.run(http_low_load(p.url, args.model, http_payload, args.requests)
                                  if p.protocol == "http" else low_load(p.url, payload, args.requests))
                c1 = cpu_seconds(p.proc.pid) if p.proc else 0.0
                s1, t1 = context_switches(p.proc.pid) if p.proc else (0, 0), context_switches(triton.pid)
                th1 = thread_cpu(p.proc.pid) if p.proc else (0.0, 0.0)
                p.p50.append(np.quantile(lat, .5))
                p.p99.append(np.quantile(lat, .99))
                p.low_lat.append(lat)
                p.low_cpu.append((c1 - c0) / (args.requests + 20) * 1e6)
                n = args.requests + 20
                p.low_cs.append(((s1[0] - s0[0]) / n, (s1[1] - s0[1]) / n))
                p.tri_cs.append(((t1[0] - t0[0]) / n, (t1[1] - t0[1]) / n))
                p.low_threads.append(((th1[0] - th0[0]) / n * 1e6, (th1[1] - th0[1]) / n * 1e6))
            for p in order if args.seconds > 0 else ():  # saturation
                cpu0 = cpu_seconds(triton.pid), cpu_seconds(p.proc.pid) if p.proc else 0.0
                sat, wall = asyncio.run(
                    http_saturation(p.url, args.model, http_payload, args.seconds, args.concurrency)
                    if p.protocol == "http" else saturation(p.url, payload, args.seconds, args.concurrency))
                cpu1 = cpu_seconds(triton.pid), cpu_seconds(p.proc.pid) if p.proc else 0.0
                p.rps.append(len(sat) / wall)
                p.sat_p50.append(np.quantile(sat, .5))
                p.sat_p99.append(np.quantile(sat, .99))
                p.tri_cpu.append((cpu1[0] - cpu0[0]) / len(sat) * 1e6)
                p.side_cpu.append((cpu1[1] - cpu0[1]) / len(sat) * 1e6)
            print(f"round {r + 1}: " + ", ".join(
                f"{p.name} p50 {p.p50[-1] * 1e3:.3f} ms / {p.rps[-1] if p.rps else float('nan'):.0f} req/s"
                for p in paths), flush=True)
        print(f"\nSidecar overhead, model {args.model}, policy {args.policy}; client, sidecar and Triton "
              f"share {os.cpu_count()} cores; medians over {args.rounds} round(s), "
              f"{args.requests} requests at low load, {args.seconds:g} s x {args.concurrency} in flight at saturation; "
              f"Triton's dynamic batching {args.triton_batching}\n")
        print(f"{'path':20} | {'low load p50 ms':>15} {'p99 ms':>8} {'proxy CPU us/req':>16} | "
              f"{'saturation req/s':>16} {'p50 ms':>8} {'p99 ms':>8} | {'Triton CPU us/req':>17} "
              f"{'proxy CPU us/req':>16}")
        for p in paths:
            print(f"{p.name:20} | {med(p.p50) * 1e3:15.3f} {med(p.p99) * 1e3:8.3f} {med(p.low_cpu):16.1f} | "
                  f"{med(p.rps):16.0f} {med(p.sat_p50) * 1e3:8.3f} {med(p.sat_p99) * 1e3:8.3f} | "
                  f"{med(p.tri_cpu):17.1f} {med(p.side_cpu):16.1f}")
        print(f"\nContext switches per request at low load (voluntary + involuntary, every thread; medians):")
        for p in paths:
            cs = (med([c[0] for c in p.low_cs]), med([c[1] for c in p.low_cs]))
            tcs = (med([c[0] for c in p.tri_cs]), med([c[1] for c in p.tri_cs]))
            own = f"{cs[0]:5.1f} + {cs[1]:4.1f}" if p.proc else "    -      "
            print(f"  {p.name:20} path's processes {own} | Triton {tcs[0]:5.1f} + {tcs[1]:4.1f}")
        print("\nCPU per request at low load by thread (schedstat; the main thread runs the event loop; medians, "
              "and per round):")
        for p in paths:
            if p.proc is None:
                continue
            main_us, rest_us = [t[0] for t in p.low_threads], [t[1] for t in p.low_threads]
            print(f"  {p.name:20} main thread {med(main_us):6.1f} us ({', '.join(f'{x:.0f}' for x in main_us)}); "
                  f"other threads {med(rest_us):6.1f} us")
        print(f"\nLow load, all rounds pooled ({args.rounds} x {args.requests} requests; a round's p99 is its "
              f"{args.requests // 100}th slowest, so the pooled one reads the tail more steadily):")
        for p in paths:
            q = np.quantile(np.concatenate(p.low_lat), [.5, .9, .99, .999]) * 1e3
            print(f"  {p.name:20} p50 {q[0]:.3f}  p90 {q[1]:.3f}  p99 {q[2]:.3f}  p99.9 {q[3]:.3f} ms; "
                  f"p99 per round {', '.join(f'{x * 1e3:.3f}' for x in p.p99)}")
        direct = {p.protocol: p for p in paths if p.name in ("direct", "direct-http")}
        for s in paths:
            d = direct[s.protocol]
            if s is d:
                continue
            added = [1e3 * (a - b) for a, b in zip(s.p50, d.p50)]
            added99 = [1e3 * (a - b) for a, b in zip(s.p99, d.p99)]
            ratio = [a / b for a, b in zip(s.rps, d.rps)]
            pooled99 = 1e3 * (np.quantile(np.concatenate(s.low_lat), .99) - np.quantile(np.concatenate(d.low_lat), .99))
            print(f"\n{s.name}: added latency at low load (vs {d.name}), p50 {med(added):.3f} ms "
                  f"(rounds: {', '.join(f'{x:.3f}' for x in added)}), p99 {med(added99):.3f} ms "
                  f"(rounds: {', '.join(f'{x:.3f}' for x in added99)}; pooled {pooled99:.3f} ms)")
            print(f"{s.name}: throughput ratio {s.name}/direct at saturation {med(ratio):.2f} "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in ratio)})")
            print(f"{s.name}: Triton CPU per request, {s.name} path / direct {med(s.tri_cpu) / med(d.tri_cpu):.2f}; "
                  f"total CPU per request (Triton + {s.name}) / direct Triton "
                  f"{(med(s.tri_cpu) + med(s.side_cpu)) / med(d.tri_cpu):.2f}")
    finally:
        for p in paths:
            if p.proc is not None:
                p.proc.terminate()
                p.proc.wait(10)
        triton.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
