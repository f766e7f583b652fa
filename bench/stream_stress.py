"""Stress the gate's ModelStreamInfer path: many concurrent streams mixing gated requests and
requests relayed to Triton (an unknown model), some cancelled part-way, against a real Triton.

Every stream that is not cancelled must get exactly one answer per request, gated requests must
succeed, and the gate must end with nothing queued or in flight. Prints the counts; exit status 1
on any violation. For memory errors run it on the sanitizer build of the native gate:

    make -C native asan
    SMDP_NATIVE_GATE=native/build/asan/smdp-gate ASAN_OPTIONS=detect_leaks=0 \\
        .venv/bin/python bench/stream_stress.py --threads 24
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from plugin.config import load_config
from plugin.runner import SidecarThread
from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig


def _request(i: int, model: str) -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name=model, id=f"r{i}")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    r.raw_input_contents.append(np.full((1, 16), i, np.float32).tobytes())
    return r


def _worker(url: str, seed: int, streams: int, problems: list, counts: dict, lock: threading.Lock) -> None:
    rnd = random.Random(seed)
    with grpc.insecure_channel(url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(streams):
            n = rnd.randint(1, 25)
            reqs = [_request(i, "emulated_gpu" if rnd.random() < 0.8 else "no_such_model") for i in range(n)]
            cancel_at = rnd.randint(0, n) if rnd.random() < 0.4 else None
            hold = threading.Event()

            def gen(reqs=reqs, cancel_at=cancel_at, hold=hold):
                yield from reqs
                if cancel_at is not None:
                    hold.wait(5)  # keep the stream open until it is cancelled

            call = stub.ModelStreamInfer(gen(), timeout=60)
            got = []
            try:
                for resp in call:
                    got.append(resp)
                    if cancel_at is not None and len(got) >= cancel_at:
                        call.cancel()
                        break
            except grpc.RpcError as e:
                if cancel_at is None or e.code() != grpc.StatusCode.CANCELLED:
                    with lock:
                        problems.append(f"stream ended with {e.code()}: {e.details()}")
            hold.set()
            with lock:
                counts["streams"] += 1
                counts["answers"] += len(got)
                counts["cancelled"] += cancel_at is not None
                if cancel_at is None:
                    if sorted(r.infer_response.id for r in got) != sorted(r.id for r in reqs):
                        problems.append(f"{len(got)} answers for {n} requests")
                    problems.extend(f"gated request failed: {r.error_message}" for r in got
                                    if r.infer_response.model_name == "emulated_gpu" and r.error_message)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=12, help="concurrent clients (default: %(default)s)")
    ap.add_argument("--streams", type=int, default=15, help="streams per client (default: %(default)s)")
    ap.add_argument("--data-plane", choices=["native", "python"], default="native")
    args = ap.parse_args(argv)
    triton = EmbeddedTriton(TritonConfig(models=("emulated_gpu",))).start()
    cfg = load_config(overrides={
        "listen": "127.0.0.1:0", "control_listen": None, "metrics_listen": None, "triton_url": triton.grpc_url,
        "data_plane": args.data_plane, "default": {"policy": "threshold:3", "max_batch": 8, "max_wait_s": 0.01}},
        environ={})
    sc = SidecarThread(cfg)
    sc.start()
    try:
        problems: list[str] = []
        counts = {"streams": 0, "cancelled": 0, "answers": 0}
        lock = threading.Lock()
        threads = [threading.Thread(target=_worker, args=(sc.url, s, args.streams, problems, counts, lock))
                   for s in range(args.threads)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sc.run(sc.sidecar.plane.sync(), 10)
        gate = sc.sidecar.registry.models()[("emulated_gpu", "")].gate
        print(f"{counts['streams']} streams ({counts['cancelled']} cancelled part-way), {counts['answers']} answers "
              f"in {time.monotonic() - t0:.1f} s; gate: queue {gate.queue_length}, in flight {gate.in_flight}, "
              f"{gate.counters.submitted} submitted, {gate.counters.cancelled} withdrawn, "
              f"{gate.counters.dispatched_requests} served in {gate.counters.dispatched_batches} batches")
        for p in problems[:10]:
            print("PROBLEM:", p)
        return 1 if problems or gate.queue_length or gate.in_flight else 0
    finally:
        sc.stop()
        triton.stop()


if __name__ == "__main__":
    sys.exit(main())
