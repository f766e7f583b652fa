"""Hostile clients against the sidecar in front of a real tritonserver, on both data planes.

Nothing a client sends may change what the control plane believes (the native gate's reports carry
client-chosen model names), and one client's bad request must fail only that request.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from tritonclient.grpc import service_pb2

from plugin.runner import SidecarThread
from planes import data_plane, emu_request, settle  # noqa: F401 - data_plane: autouse, both planes
from planes import plane_sidecar as sidecar

pytestmark = pytest.mark.integration

INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_stub(channel: grpc.Channel):
    return channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                               response_deserializer=service_pb2.ModelInferResponse.FromString)


def error_of(call, req, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(req, timeout=timeout)
    return info.value.code(), info.value.details()


def outcome_of(call, req, timeout: float = 30) -> tuple:
    """What a client sees: Triton's answer (model, outputs) or its error (code, message)."""
    try:
        resp = call(req, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return "OK", resp.model_name, tuple(resp.raw_output_contents)


def gated_stats(sc: SidecarThread, answered: int, model: str = "emulated_gpu"):
    """The model's batch statistics once they account for ``answered`` requests (the native gate
    reports a batch just after answering it)."""
    deadline = time.monotonic() + 10
    while True:
        settle(sc)
        state = sc.call(lambda: sc.sidecar.registry.models().get((model, "")))
        assert state is not None and state.gate is not None
        if state.stats.answered >= answered or time.monotonic() > deadline:
            return state.stats
        time.sleep(0.02)


# A forged report of a 30 s batch of 8 rows for the gated model, hidden in a model name.
FORGED = "x\nbatch emulated_gpu 1 8 0 30 0 policy 0\ncounters emulated_gpu submitted=999999"

HOSTILE_NAMES = {
    "newline-forged-batch": FORGED,
    "carriage-return": "x\rbatch emulated_gpu 1 8 0 30 0 policy 0",
    "nul": "emulated_gpu\x00\nbatch emulated_gpu 1 8 0 30 0 policy 0",
    "spaces": "emulated_gpu 1 8 0 30 0 policy 0",
    "percent": "%0abatch emulated_gpu 1 8 0 30 0 policy 0",
    "long": "m" * 20_000,
}


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=list(HOSTILE_NAMES))
def test_a_model_name_cannot_forge_what_the_control_plane_learns(triton, name):
    """The sidecar answers each hostile name exactly as Triton does (an unknown model; a name with a
    NUL is served by Triton as the model its first part names), and its view of the gated model (batches, busy time, counters) moves only with real traffic."""
    hostile = HOSTILE_NAMES[name]
    with grpc.insecure_channel(triton.grpc_url, options=[("grpc.max_metadata_size", 1 << 20)]) as ch:
        expected = outcome_of(infer_stub(ch), emu_request(hostile))
    with sidecar(triton.grpc_url) as sc, \
            grpc.insecure_channel(sc.url, options=[("grpc.max_metadata_size", 1 << 20)]) as ch:
        infer = infer_stub(ch)
        infer(emu_request(), timeout=30)  # the model is gated
        before = gated_stats(sc, 1)
        batches, busy, answered = before.batches.copy(), before.busy_s.copy(), before.answered
        for _ in range(3):
            assert outcome_of(infer, emu_request(hostile)) == expected
        time.sleep(0.3)  # several report intervals of the native gate
        after = gated_stats(sc, 1)
        assert after.batches.tolist() == batches.tolist()
        assert after.busy_s.tolist() == busy.tolist()
        assert after.answered == answered
        counters = sc.call(lambda: sc.sidecar.registry.models()[("emulated_gpu", "")].gate.counters)
        assert counters.submitted < 1000
        assert infer(emu_request(), timeout=30).model_name == "emulated_gpu"
        models = sc.call(lambda: {n for n, _ in sc.sidecar.registry.models()})
        assert models <= {"emulated_gpu", "cpu_mlp"}  # nothing kept by a hostile name


def test_a_huge_model_name_fails_only_its_own_request(triton):
    """A 20,000-character model name makes Triton's error larger than gRPC's default metadata limit:
    that request fails as it fails against Triton, and none of the concurrent good requests does."""
    huge = emu_request("n" * 20_000)
    big = [("grpc.max_metadata_size", 1 << 20)]
    with grpc.insecure_channel(triton.grpc_url, options=big) as ch:
        expected = error_of(infer_stub(ch), huge)
    with sidecar(triton.grpc_url) as sc, grpc.insecure_channel(sc.url, options=big) as ch:
        infer = infer_stub(ch)
        infer(emu_request(), timeout=30)
        stop = threading.Event()
        failures: list[str] = []
        served = [0]

        def good(i: int) -> None:
            while not stop.is_set():
                try:
                    assert infer(emu_request(rid=str(i)), timeout=30).id == str(i)
                    served[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

        with ThreadPoolExecutor(8) as pool:
            for i in range(8):
                pool.submit(good, i)
            bad = [error_of(infer, huge) for _ in range(10)]
            stop.set()
        assert failures == []
        assert served[0] > 0
        assert bad == [expected] * len(bad)

