"""The Python data plane's own cost per request, with no network: a stand-in answers for Triton.

    python bench/plane_path_bench.py [--model emulated_gpu] [--requests 5000] [--runs 5] [--tree DIR]
                                     [--evict-mb N] [--wire]

Drives ``PythonPlane.infer`` of a ``Sidecar`` (greedy policy, the model's config from
model_repository/, one-row FP32 requests) with
sequential requests; the stand-in for Triton answers on the event loop's next turn. Prints, per
request (medians over the requests, best and median over the runs):
- arrival to the send: from the request's bytes (parsed as the servicer parses them) to the stand-in's
  start (validation, merge key, the gate's decision, stamping, and the one loop turn a gRPC call also
  takes before it sends);
- the return path: from the stand-in's answer to the answer encoded for the caller;
- the whole request: from the request's bytes to the end of the loop turn after its answer, where
  the request's accounting runs;
- CPU: the process's CPU time per request, the stand-in's small share included.
``--evict-mb N``: between requests, write one byte in every 64 of an N MiB buffer (outside the
measured times; its CPU is subtracted), so that each request starts with caches holding other work,
as in a real sidecar process on a machine where the client, Triton and other processes run between
two requests. A tight loop keeps the path's code and data in cache and reads several times lower.
Each request is parsed from its bytes and its answer encoded, as the gRPC servicer does, and the
stand-in does what the channel to Triton does with a message (encodes the request, parses the answer).
``--wire``: the request's bytes go to the plane as well (``PythonPlane.infer``'s ``wire``, what the
servicer passes): a lone request goes to the stand-in as bytes and its answer comes back as bytes.
``--tree DIR``: import the sidecar from another checkout (e.g. an older tree, for a before/after on
the same machine; run the two alternately, as the machine's other work shifts the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emulated_gpu", help="a model of model_repository/ with FP32 inputs")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose plugin/ is measured")
    ap.add_argument("--evict-mb", type=int, default=0, metavar="N",
                    help="between requests, touch every cache line of an N MiB buffer (0: no eviction)")
    ap.add_argument("--wire", action="store_true",
                    help="pass the request's bytes too (the servicer's path since the plane takes them)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))

    import numpy as np
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2, service_pb2

    from plugin.config import load_config
    from plugin.server import Sidecar

    config = text_format.Parse((ROOT / "model_repository" / args.model / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    req = service_pb2.ModelInferRequest(model_name=args.model, id="x")
    for i in config.input:
        req.inputs.add(name=i.name, datatype="FP32", shape=[1, *i.dims])
        req.raw_input_contents.append(np.ones((1, *i.dims), np.float32).tobytes())
    data = req.SerializeToString()
    resp = service_pb2.ModelInferResponse(model_name=args.model, id="x")
    for o in config.output:
        resp.outputs.add(name=o.name, datatype="FP32", shape=[1, *o.dims])
        resp.raw_output_contents.append(np.ones((1, *o.dims), np.float32).tobytes())
    marks: dict[str, float] = {}
    evict = np.zeros(args.evict_mb << 20, np.uint8) if args.evict_mb > 0 else None

    async def model_config(_req, timeout=None):
        return service_pb2.ModelConfigResponse(config=config)

    resp_wire = resp.SerializeToString()
    parse, parse_resp = service_pb2.ModelInferRequest.FromString, service_pb2.ModelInferResponse.FromString

    async def infer(req, timeout=None):
        marks["sent"] = time.perf_counter()
        req.SerializeToString()  # what the channel does with the message
        await asyncio.sleep(0)  # Triton's answer comes on a later turn of the loop
        marks["back"] = time.perf_counter()
        return parse_resp(resp_wire)

    async def infer_wire(_wire, timeout=None):
        marks["sent"] = time.perf_counter()
        await asyncio.sleep(0)
        marks["back"] = time.perf_counter()
        return resp_wire

    def encode(answer) -> bytes:  # the servicer's response serializer
        return answer if type(answer) is bytes else answer.SerializeToString()

    async def run() -> list[tuple[float, float, float, float]]:
        cfg = load_config(overrides={"triton_url": "127.0.0.1:9", "default": {"policy": "greedy"},
                                     "triton_batcher": "keep"}, environ={})
        sc = Sidecar(cfg)
        sc.upstream.model_config = model_config
        sc.upstream.infer = infer
        sc.upstream.infer_wire = infer_wire
        wire = data if args.wire else None
        if wire is not None:
            plane_infer = sc.plane.infer
        else:  # an older tree's plane may not take the bytes
            async def plane_infer(r, _wire):
                return await sc.plane.infer(r)
        out = []
        try:
            for _ in range(500):  # warm-up: the model's config, the validator, the policy
                encode(await plane_infer(parse(data), wire))
                await asyncio.sleep(0)
            for _ in range(args.runs):
                to_send, back, whole = [], [], []
                evicting = 0.0
                c0 = time.process_time()
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    encode(await plane_infer(parse(data), wire))
                    t1 = time.perf_counter()
                    to_send.append(marks["sent"] - t0)
                    back.append(t1 - marks["back"])
                    await asyncio.sleep(0)  # what a caller's next request waits for at least
                    whole.append(time.perf_counter() - t0)
                    if evict is not None:
                        e0 = time.process_time()
                        evict[::64] += 1
                        evicting += time.process_time() - e0
                cpu = (time.process_time() - c0 - evicting) / args.requests
                out.append((statistics.median(to_send), statistics.median(back), statistics.median(whole), cpu))
        finally:
            await sc.close()
        return out

    runs = asyncio.run(run())
    print(f"Python plane, model {args.model}, {args.requests} sequential requests x {args.runs} runs, stand-in upstream "
          f"(tree {args.tree.resolve().name}{', the request as bytes too' if args.wire else ''}{f', caches evicted ({args.evict_mb} MiB) between requests' if evict is not None else ''}); "
          "per request, us: best / median over runs")
    for i, name in enumerate(("arrival to the send", "return path", "whole request", "CPU")):
        xs = [r[i] * 1e6 for r in runs]
        print(f"  {name:20} {min(xs):7.1f} / {statistics.median(xs):7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
