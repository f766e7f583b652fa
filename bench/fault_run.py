"""A fault run of the sidecar on one data plane, against a real Triton: steady unary load from
concurrent clients while faults are injected, then every request's outcome is counted.

Phases (seconds of the run): 0-4 steady load; 4-8 overload (four times the clients); at 8 Triton
is killed (SIGKILL) and restarted on its ports; throughout, a fuzzing client sends random bytes,
hostile model names (newline with a forged report line, NUL, 20,000 characters) and malformed
tensors. Prints, per kind of request: sent, answered by status code, lost (no answer within the
client's deadline), and the recovery time (Triton restarted -> first OK through the sidecar).
A gRPC unary call gets one status by construction, so a duplicate shows as a client that got an
answer for a request id it did not send (checked).

    .venv/bin/python bench/fault_run.py --data-plane native
"""

from __future__ import annotations

import argparse
import collections
import random
import threading
import time

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from plugin.config import load_config
from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig
from plugin.runner import SidecarThread

INFER = "/inference.GRPCInferenceService/ModelInfer"


def _good(rid: str) -> bytes:
    r = service_pb2.ModelInferRequest(model_name="emulated_gpu", id=rid)
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    r.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return r.SerializeToString()


def _fuzz(rnd: random.Random) -> bytes:
    kind = rnd.randrange(5)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(1, 400))
    r = service_pb2.ModelInferRequest(model_name=["x\nbatch emulated_gpu 1 8 0 30 0 policy 0", "emulated_gpu\x00x",
                                                  "n" * 20_000, "emulated_gpu"][kind - 1])
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 15 if kind == 4 else 16])
    r.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return r.SerializeToString()


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = collections.Counter()
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.wrong_id = 0
        self.last_ok = 0.0

    def add(self, kind: str, code: str, ok_at: float = 0.0) -> None:
        with self.lock:
            self.codes[kind][code] += 1
            if ok_at:
                self.last_ok = max(self.last_ok, ok_at)


def run(plane: str, seconds: float) -> None:
    triton = EmbeddedTriton(TritonConfig(models=("emulated_gpu",))).start()
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": None, "metrics_listen": None,
                                 "triton_url": triton.grpc_url, "data_plane": plane,
                                 "default": {"policy": "greedy"}}, environ={})
    sc = SidecarThread(cfg)
    sc.start()
    tally = Tally()
    stop = threading.Event()
    overload = threading.Event()
    first_ok_after: list[float] = []
    restarted_at = [0.0]

    def client(i: int, fuzz: bool, extra: bool) -> None:
        rnd = random.Random(i)
        opts = [("grpc.max_metadata_size", 1 << 20)]
        with grpc.insecure_channel(sc.url, options=opts) as ch:
            call = ch.unary_unary(INFER, request_serializer=lambda b: b,
                                  response_deserializer=service_pb2.ModelInferResponse.FromString)
            n = 0
            while not stop.is_set():
                if extra and not overload.is_set():
                    time.sleep(0.01)
                    continue
                kind = "fuzz" if fuzz else "good"
                rid = f"{i}-{n}"
                n += 1
                data = _fuzz(rnd) if fuzz else _good(rid)
                with tally.lock:
                    tally.sent[kind] += 1
                try:
                    resp = call(data, timeout=10)
                    now = time.monotonic()
                    if kind == "good" and resp.id != rid:
                        with tally.lock:
                            tally.wrong_id += 1
                    if restarted_at[0] and not first_ok_after and kind == "good":
                        first_ok_after.append(now - restarted_at[0])
                    tally.add(kind, "OK")
                except grpc.RpcError as exc:
                    code = exc.code()
                    tally.add(kind, "LOST (deadline)" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name)
                if fuzz:
                    time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i, False, False)) for i in range(4)]
    threads += [threading.Thread(target=client, args=(100 + i, False, True)) for i in range(12)]
    threads += [threading.Thread(target=client, args=(200, True, False))]
    for t in threads:
        t.start()
    try:
        time.sleep(seconds * 0.25)
        overload.set()
        time.sleep(seconds * 0.25)
        overload.clear()
        triton.kill()
        killed = time.monotonic()
        triton.start()
        restarted_at[0] = time.monotonic()
        time.sleep(seconds * 0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sc.stop()
        triton.stop()
    print(f"plane={plane}  Triton down {restarted_at[0] - killed:.2f} s (killed, then restarted on its ports)")
    for kind in ("good", "fuzz"):
        answered = sum(tally.codes[kind].values())
        codes = ", ".join(f"{c} {n}" for c, n in tally.codes[kind].most_common())
        print(f"  {kind:5s} sent {tally.sent[kind]:6d}  answered {answered:6d} ({codes})  "
              f"lost {tally.sent[kind] - answered}")
    print(f"  answers for a request id not sent (duplicates or mix-ups): {tally.wrong_id}")
    rec = f"{first_ok_after[0]:.2f} s" if first_ok_after else "never"
    print(f"  recovery: Triton back -> first OK through the sidecar: {rec}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-plane", choices=["native", "python"], default="native")
    ap.add_argument("--seconds", type=float, default=16.0, help="length of the run (default: %(default)s)")
    args = ap.parse_args()
    run(args.data_plane, args.seconds)


if __name__ == "__main__":
    main()
