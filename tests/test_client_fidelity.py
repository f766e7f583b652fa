"""No client can tell the sidecar from Triton: odd and bad requests get Triton's own answer (code and
message) through the sidecar, on both data planes, without costing the sidecar a config read or a
log line per request."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from plugin.control_backend import SidecarControl
from plugin.repository_control import refused_message
from plugin.runner import SidecarThread
from planes import count_config_calls, data_plane, emu_request, settle  # noqa: F401 - data_plane: autouse, both planes
from planes import plane_sidecar as sidecar

pytestmark = pytest.mark.integration

INFER = "/inference.GRPCInferenceService/ModelInfer"


def raw_infer(channel: grpc.Channel):
    """ModelInfer taking the request's bytes as they are (so they may be anything)."""
    return channel.unary_unary(INFER, request_serializer=lambda b: b,
                               response_deserializer=service_pb2.ModelInferResponse.FromString)


def outcome(channel: grpc.Channel, request: bytes | service_pb2.ModelInferRequest) -> tuple:
    """What a client sees: ("OK", model, outputs) or (code, message)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        resp = raw_infer(channel)(data, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return "OK", resp.model_name, tuple(resp.raw_output_contents)


def both(triton, sc, request) -> tuple[tuple, tuple]:
    with grpc.insecure_channel(triton.grpc_url) as direct, grpc.insecure_channel(sc.url) as via:
        return outcome(direct, request), outcome(via, request)



def serve_once(sc: SidecarThread) -> None:
    with grpc.insecure_channel(sc.url) as ch:
        assert outcome(ch, emu_request())[0] == "OK"


def invalid_utf8_name() -> bytes:
    """A ModelInferRequest whose model_name is not UTF-8 (a proto3 string must be)."""
    data = emu_request("emulated_gpX").SerializeToString()
    return data.replace(b"emulated_gpX", b"emulated_gp\xff", 1)


def test_an_unknown_version_of_a_gated_model_gets_tritons_not_found_without_config_reads(triton):
    with sidecar(triton.grpc_url) as sc:
        serve_once(sc)
        state = sc.call(lambda: sc.sidecar.registry.models()[("emulated_gpu", "")])
        asked = count_config_calls(sc)
        answers = [both(triton, sc, emu_request(version="7")) for _ in range(5)]
        assert answers[0][0][0] == grpc.StatusCode.NOT_FOUND, answers[0]
        assert all(via == direct for direct, via in answers), answers[0]
        time.sleep(0.3)
        settle(sc)
        assert asked.count("emulated_gpu") <= 1, asked
        assert sc.call(lambda: sc.sidecar.registry.models().get(("emulated_gpu", ""))) is state  # not dropped
        serve_once(sc)


@pytest.mark.parametrize("what", ["empty-name", "invalid-utf8-name", "random-bytes"])
def test_malformed_requests_get_tritons_answer_and_no_log_line_each(triton, caplog, what):
    request = {"empty-name": emu_request("").SerializeToString(),
               "invalid-utf8-name": invalid_utf8_name(),
               "random-bytes": np.random.default_rng(7).bytes(300)}[what]
    with sidecar(triton.grpc_url) as sc:
        serve_once(sc)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            answers = [both(triton, sc, request) for _ in range(20)]
            serve_once(sc)
        direct, via = answers[0]
        assert via == direct
        assert all(a == answers[0] for a in answers)
        noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(noisy) <= 1, [r.getMessage()[:200] for r in noisy]
        assert not any(r.exc_info for r in caplog.records)


def stream_outcome(channel: grpc.Channel, messages: list[bytes]) -> list:
    """What a ModelStreamInfer client sees for these request bytes: each response, then the status."""
    call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=lambda b: b,
                                 response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
    seen: list = []
    try:
        for r in call(iter(messages), timeout=30):
            seen.append(("error", r.error_message) if r.error_message else ("OK", r.infer_response.id))
        seen.append("end OK")
    except grpc.RpcError as exc:
        seen.append((exc.code(), exc.details()))
    return seen


@pytest.mark.parametrize("what", ["random-bytes", "invalid-utf8-name"])
def test_stream_messages_that_do_not_parse_get_tritons_answer(triton, what):
    """Triton (2.51) takes a stream message whose bytes do not parse as the end of the client's
    requests: no response for it nor for anything sent after it, the requests before it are answered
    and the stream ends OK. Through the sidecar: the same."""
    bad = {"random-bytes": np.random.default_rng(7).bytes(300), "invalid-utf8-name": invalid_utf8_name()}[what]
    good = [emu_request(rid=f"r{i}").SerializeToString() for i in range(2)]
    with sidecar(triton.grpc_url) as sc, grpc.insecure_channel(triton.grpc_url) as direct, \
            grpc.insecure_channel(sc.url) as via:
        for messages in ([bad], [good[0], bad, good[1]]):
            want = stream_outcome(direct, messages)
            assert stream_outcome(via, messages) == want
        assert want == [("OK", "r0"), "end OK"]  # measured on Triton, as the test's first line checks


def test_completed_counts_the_requests_answered_ok_on_both_planes(triton):
    with sidecar(triton.grpc_url) as sc, grpc.insecure_channel(sc.url) as ch:
        serve_once(sc)
        bad = emu_request()
        bad.inputs[0].datatype = "INT32"  # Triton refuses it: the model takes FP32
        results = [outcome(ch, emu_request()) for _ in range(3)] + [outcome(ch, bad) for _ in range(2)]
        assert [r[0] for r in results] == ["OK"] * 3 + [grpc.StatusCode.INVALID_ARGUMENT] * 2
        deadline = time.monotonic() + 10
        while True:
            settle(sc)
            status = sc.call(lambda: SidecarControl(sc.sidecar.registry).status("emulated_gpu"))
            if status.completed >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        settle(sc)
        status = sc.call(lambda: SidecarControl(sc.sidecar.registry).status("emulated_gpu"))
        assert status.completed == 4  # the first and the three: OK answers only


def _simple_request(rows: int) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[rows, 16])
        req.raw_input_contents.append(np.ones((rows, 16), np.int32).tobytes())
    return req


def _simple_config(max_batch: int) -> str:
    import json

    return json.dumps({
        "name": "simple", "backend": "python", "max_batch_size": max_batch,
        "input": [{"name": n, "data_type": "TYPE_INT32", "dims": [16]} for n in ("INPUT0", "INPUT1")],
        "output": [{"name": n, "data_type": "TYPE_INT32", "dims": [16]} for n in ("OUTPUT0", "OUTPUT1")],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    })


def test_a_reload_through_the_sidecar_is_seen_at_once(tmp_path, triton_factory):
    """``simple`` reloaded with max_batch_size 16 through the sidecar's repository API: 12 rows are
    served at once, and the gate's policy is rebuilt for the new size."""
    import tritonclient.grpc as tc

    from example_models import write_example_repository

    repo = write_example_repository(tmp_path / "repo", ("simple",))
    server = triton_factory(repository=repo, models=("simple",))
    with sidecar(server.grpc_url, allow_repository_control=True) as sc, grpc.insecure_channel(sc.url) as ch:
        assert outcome(ch, _simple_request(2))[0] == "OK"
        refused = outcome(ch, _simple_request(12))
        assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT and "8" in refused[1], refused
        tc.InferenceServerClient(sc.url).load_model("simple", config=_simple_config(16))
        assert outcome(ch, _simple_request(12))[0] == "OK"
        deadline = time.monotonic() + 10
        while True:
            state = sc.call(lambda: sc.sidecar.registry.models().get(("simple", "")))
            if (state is not None and state.info is not None and state.info.max_batch == 16) \
                    or time.monotonic() > deadline:
                break
            outcome(ch, _simple_request(1))
            time.sleep(0.05)
        assert state is not None and state.info.max_batch == 16


_BROKEN_CONFIG = 'name: "broken"\nbackend: "python"\nmax_batch_size: 4\n' \
                 'input [ { name: "X", data_type: TYPE_FP32, dims: [ 1 ] } ]\n' \
                 'output [ { name: "Y", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'


def test_a_model_triton_does_not_serve_gets_tritons_answer_while_triton_reports_not_ready(tmp_path, triton_factory):
    """With a model that failed to load (or one unloading), Triton's strict readiness says "not ready",
    yet it serves the others and answers NOT_FOUND for a model it does not have: so does the sidecar."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    from example_models import write_example_repository

    repo = write_example_repository(tmp_path / "repo", ("simple",))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.py").write_text("raise RuntimeError('cannot load')\n")
    (repo / "broken" / "config.pbtxt").write_text(_BROKEN_CONFIG)
    server = triton_factory(repository=repo, models=("simple",))
    direct = tc.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException):
        direct.load_model("broken")
    assert not direct.is_server_ready()
    with sidecar(server.grpc_url) as sc:
        for name in ("broken", "absent"):
            request = emu_request(name)
            direct_answer, via = both(server, sc, request)
            assert direct_answer[0] in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), direct_answer
            assert via == direct_answer
        with grpc.insecure_channel(sc.url) as ch:
            assert outcome(ch, _simple_request(2))[0] == "OK"


def test_repository_control_refused_says_how_to_enable_it(triton):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    with sidecar(triton.grpc_url) as sc:
        with pytest.raises(InferenceServerException) as info:
            tc.InferenceServerClient(sc.url).unload_model("emulated_gpu")
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        assert info.value.message() == refused_message("RepositoryModelUnload")  # one wording, both planes
        assert "allow_repository_control: true" in info.value.message()
        assert "--allow-repository-control" in info.value.message()
        serve_once(sc)  # nothing was unloaded
