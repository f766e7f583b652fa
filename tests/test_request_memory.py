"""Memory after refused large requests: a request's bytes are freed when it is answered, on both data
planes, not kept until a garbage collection (issue 14, defect 8: twelve refused 64 MiB requests once
held 860 MiB of the Python plane).

The client runs in a process of its own, so that the memory measured is the data plane's only: this
process for the Python plane (the sidecar runs in a thread here), ``smdp-gate`` for the native one.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from plugin.native_data_plane import NativeDataPlane
from planes import data_plane  # noqa: F401 - data_plane: autouse, both planes
from planes import plane_sidecar as sidecar

pytestmark = pytest.mark.integration

SIZE_MIB = 32
WARM_UP = 4  # refused requests before the baseline: the allocators reach their working set
MEASURED = 12

_CLIENT = """
import sys
import grpc
from tritonclient.grpc import service_pb2
url, rows, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
req = service_pb2.ModelInferRequest(model_name="emulated_gpu")
req.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
req.raw_input_contents.append(bytes(rows * 16 * 4))
data = req.SerializeToString()
del req
opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
with grpc.insecure_channel(url, options=opts) as channel:
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for _ in range(n):
        try:
            infer(data, timeout=120)
            print("OK")
        except grpc.RpcError as exc:
            print(exc.code().name)
"""


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _send_big(url: str, n: int) -> set[str]:
    """The codes of ``n`` requests of SIZE_MIB each, far more rows than the model's max_batch_size."""
    rows = (SIZE_MIB << 20) // (16 * 4)
    done = subprocess.run([sys.executable, "-c", _CLIENT, url, str(rows), str(n)],
                          capture_output=True, text=True, timeout=600, check=True)
    return set(done.stdout.split())


def test_refused_large_requests_are_freed_when_answered(triton):
    with sidecar(triton.grpc_url) as sc:
        plane = sc.sidecar.plane
        pid = plane._process().proc.pid if isinstance(plane, NativeDataPlane) else os.getpid()
        # Memory held until a collection is memory held: with collections off, what the refused
        # requests leave is exactly what reference cycles keep.
        gc.disable()
        try:
            assert _send_big(sc.url, WARM_UP) == {"INVALID_ARGUMENT"}  # Triton's own refusal
            baseline = _rss_mib(pid)
            assert _send_big(sc.url, MEASURED) == {"INVALID_ARGUMENT"}
            grown = _rss_mib(pid) - baseline
        finally:
            gc.enable()
        print(f"{sc.sidecar.config.data_plane}: {grown:+.0f} MiB after {MEASURED} more refused "
              f"{SIZE_MIB} MiB requests (baseline {baseline:.0f} MiB after {WARM_UP})")
        # Holding them would take all MEASURED of them; the allocators keep a few now and then (the
        # native gate's RSS moves by one or two requests' worth either way from round to round).
        assert grown < MEASURED / 2 * SIZE_MIB, \
            f"{grown:.0f} MiB more after {MEASURED} refused {SIZE_MIB} MiB requests (baseline {baseline:.0f} MiB)"
