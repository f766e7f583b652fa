"""A fault run of the sidecar on one data plane, against a real Triton: steady unary load from
concurrent clients while faults are injected, then every request's outcome is counted.

The sidecar gates with the adaptive SMDP policy and solves on a shared solver service
(`smdp solver-serve`, a child process). Phases (seconds of a 16 s run): 0-4 steady load; 4-8
overload (four times the clients, so the rate moves and the sidecar wants a new policy); at 2 the
solver is killed (SIGKILL) and at 6 started again on its port; at 8 Triton is killed (SIGKILL) and
restarted on its ports; throughout, a fuzzing client sends random bytes, hostile model names
(newline with a forged report line, NUL, 20,000 characters) and malformed tensors. Prints, per kind
of request: sent, answered by status code, lost (no answer within the client's deadline), the
recovery time (Triton restarted -> first OK through the sidecar), and for the solver: whether the
sidecar saw it away, the policy versions installed while it was away, and the time from its
restart to the next policy installed.
A gRPC unary call gets one status by construction, so a duplicate shows as a client that got an
answer for a request id it did not send (checked).

    .venv/bin/python bench/fault_run.py --data-plane native
"""

from __future__ import annotations

import argparse
import collections
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from plugin.config import load_config
from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig
from plugin.runner import SidecarThread
from smdp.v1 import smdp_pb2, smdp_pb2_grpc

INFER = "/inference.GRPCInferenceService/ModelInfer"
PROFILE = Path(__file__).resolve().parents[1] / "model_repository" / "emulated_gpu" / "v100_resnet50.csv"


class SolverProcess:
    """`smdp solver-serve` in a child process on one port, to be killed and started again there."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> "SolverProcess":
        self._proc = subprocess.Popen([sys.executable, "-m", "smdp.cli", "solver-serve", "--listen", self.url],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with grpc.insecure_channel(self.url) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        return self

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


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
    solver = SolverProcess().start()
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": "127.0.0.1:0", "metrics_listen": None,
                                 "triton_url": triton.grpc_url, "data_plane": plane, "solver_url": solver.url,
                                 "retune_interval_s": 0.1, "rate_window_s": 2.0,
                                 "default": {"policy": "smdp", "profile": str(PROFILE), "max_batch": 32}},
                      environ={})
    sc = SidecarThread(cfg)
    sc.start()
    seen: list[tuple[float, int, bool]] = []  # (time, policy version, solver reachable)
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

    def watch() -> None:
        with grpc.insecure_channel(sc.control_url) as ch:
            stub = smdp_pb2_grpc.ControlStub(ch)
            while not stop.is_set():
                try:
                    st = stub.GetStatus(smdp_pb2.ModelRequest(model="emulated_gpu"), timeout=2)
                    seen.append((time.monotonic(), st.policy_version, st.solver_reachable))
                except grpc.RpcError:
                    pass
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i, False, False)) for i in range(4)]
    threads += [threading.Thread(target=watch)]
    threads += [threading.Thread(target=client, args=(100 + i, False, True)) for i in range(12)]
    threads += [threading.Thread(target=client, args=(200, True, False))]
    for t in threads:
        t.start()
    try:
        time.sleep(seconds * 0.125)
        solver.kill()
        solver_killed = time.monotonic()
        time.sleep(seconds * 0.125)
        overload.set()
        time.sleep(seconds * 0.125)
        solver.start()
        solver_back = time.monotonic()
        time.sleep(seconds * 0.125)
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
        solver.stop()
    print(f"plane={plane}  Triton down {restarted_at[0] - killed:.2f} s (killed, then restarted on its ports)")
    for kind in ("good", "fuzz"):
        answered = sum(tally.codes[kind].values())
        codes = ", ".join(f"{c} {n}" for c, n in tally.codes[kind].most_common())
        print(f"  {kind:5s} sent {tally.sent[kind]:6d}  answered {answered:6d} ({codes})  "
              f"lost {tally.sent[kind] - answered}")
    print(f"  answers for a request id not sent (duplicates or mix-ups): {tally.wrong_id}")
    rec = f"{first_ok_after[0]:.2f} s" if first_ok_after else "never"
    print(f"  recovery: Triton back -> first OK through the sidecar: {rec}")
    before = [v for t, v, _ in seen if t < solver_killed]
    away = [(v, r) for t, v, r in seen if solver_killed <= t < solver_back]
    after = [(t, v) for t, v, _ in seen if t >= solver_back]
    installed_away = len({v for v, _ in away} - set(before[-1:]))
    next_policy = next((t - solver_back for t, v in after if away and v > max(v for v, _ in away)), None)
    print(f"  solver killed for {solver_back - solver_killed:.2f} s: seen away "
          f"{'yes' if any(not r for _, r in away) else 'no'}; policies installed while away {installed_away}; "
          f"solver back -> next policy: {f'{next_policy:.2f} s' if next_policy is not None else 'none in the run'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-plane", choices=["native", "python"], default="native")
    ap.add_argument("--seconds", type=float, default=16.0, help="length of the run (default: %(default)s)")
    args = ap.parse_args()
    run(args.data_plane, args.seconds)


if __name__ == "__main__":
    main()
