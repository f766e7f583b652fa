"""The calls NVIDIA's example clients make (triton-inference-server/client, src/python/examples), with
only the URL changed to the sidecar's, on both data planes: sequence streams (sync and asyncio),
explicit contents, strings, system shared memory and a decoupled model's repeated responses. The
models are stand-ins with the same names and tensors (tests/example_models.py).
"""

from __future__ import annotations

import asyncio
import queue
import uuid

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio

from example_models import unregister_system_shm, write_example_repository
from planes import data_plane, plane  # noqa: F401 - data_plane: autouse, both planes
from planes import plane_sidecar as sidecar

pytestmark = pytest.mark.integration

RUNS = 10  # the example's pattern, run again and again: reordering showed in 3-6 runs of 10


@pytest.fixture(scope="module")
def example_triton(tmp_path_factory, triton_runnable):
    from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig

    repo = write_example_repository(tmp_path_factory.mktemp("examples") / "repo")
    server = EmbeddedTriton(TritonConfig(repository=repo, models=tuple(p.name for p in repo.iterdir())))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- simple_grpc_sequence_stream_infer_client.py ---------------------------------------------------

VALUES = [11, 7, 5, 3, 2, 0, 1]


def _sequence_inputs(value: int) -> list[tc.InferInput]:
    inp = tc.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [inp]


def _expected(model: str, seq0: int, seq1: int) -> tuple[list[int], list[int]]:
    """The running sums the example checks: sequence 1 sends the values negated; the dyna model
    adds the correlation id."""
    s0 = list(np.cumsum(VALUES))
    s1 = list(-np.cumsum(VALUES))
    if model == "simple_dyna_sequence":
        s0 = [v + seq0 for v in s0]
        s1 = [v + seq1 for v in s1]
    return s0, s1


@pytest.mark.parametrize("model", ["simple_sequence", "simple_dyna_sequence"])
def test_sequence_stream_example_sync(example_triton, model):
    with sidecar(example_triton.grpc_url) as sc:
        for run in range(RUNS):
            seq0, seq1 = 1000 + 2 * run, 1001 + 2 * run
            got: queue.Queue = queue.Queue()
            client = tc.InferenceServerClient(sc.url)
            client.start_stream(callback=lambda result, error: got.put((result, error)))
            # as the example: the two sequences interleaved, one stream
            for i, v in enumerate(VALUES):
                last = i == len(VALUES) - 1
                client.async_stream_infer(model, _sequence_inputs(v), request_id=f"{seq0}_{i}", sequence_id=seq0,
                                          sequence_start=i == 0, sequence_end=last)
                client.async_stream_infer(model, _sequence_inputs(-v), request_id=f"{seq1}_{i}", sequence_id=seq1,
                                          sequence_start=i == 0, sequence_end=last)
            answers = [got.get(timeout=60) for _ in range(2 * len(VALUES))]
            client.stop_stream()
            client.close()
            errors = [str(e) for _, e in answers if e is not None]
            assert errors == [], f"run {run}: {errors[:2]}"
            ids = [r.get_response().id for r, _ in answers]
            sent = [f"{s}_{i}" for i in range(len(VALUES)) for s in (seq0, seq1)]
            assert ids == sent, f"run {run}: answers out of order"
            outs = {r.get_response().id: int(r.as_numpy("OUTPUT")[0, 0]) for r, _ in answers}
            e0, e1 = _expected(model, seq0, seq1)
            assert [outs[f"{seq0}_{i}"] for i in range(len(VALUES))] == e0
            assert [outs[f"{seq1}_{i}"] for i in range(len(VALUES))] == e1


@pytest.mark.parametrize("dyna", [False, True], ids=["simple_sequence", "simple_dyna_sequence"])
def test_sequence_stream_example_aio(example_triton, dyna):
    """simple_grpc_aio_sequence_stream_infer_client.py (and with -d): on one stream, three sequences one
    after the other, each with a leading value: two with integer ids, and one with a string id (a
    UUID) on simple_sequence. With -d the example's third sequence is on simple_string_dyna_sequence,
    which has no stand-in here: it is a third integer sequence of simple_dyna_sequence instead."""
    int_model = "simple_dyna_sequence" if dyna else "simple_sequence"

    async def one_run(url: str, run: int) -> None:
        seq0, seq1 = 5000 + 2 * run, 5001 + 2 * run
        seq2: int | str = 7000 + run if dyna else str(uuid.uuid4())
        sent = [(int_model, seq0, [0] + VALUES), (int_model, seq1, [100] + [-v for v in VALUES]),
                (int_model, seq2, [20] + [-v for v in VALUES])]

        async def requests():
            for model, seq, values in sent:
                for i, v in enumerate(values):
                    yield {"model_name": model, "inputs": _sequence_inputs_aio(v),
                           "outputs": [tc_aio.InferRequestedOutput("OUTPUT")], "request_id": f"{seq}_{i}",
                           "sequence_id": seq, "sequence_start": i == 0, "sequence_end": i == len(values) - 1}

        n = sum(len(values) for _, _, values in sent)
        async with tc_aio.InferenceServerClient(url) as client:
            answers = []
            async for result, error in client.stream_infer(requests()):
                answers.append((result, error))
                if len(answers) == n:
                    break
        errors = [str(e) for _, e in answers if e is not None]
        assert errors == [], f"run {run}: {errors[:2]}"
        ids = [r.get_response().id for r, _ in answers]
        assert ids == [f"{seq}_{i}" for _, seq, values in sent for i in range(len(values))], f"run {run}: out of order"
        outs = [int(r.as_numpy("OUTPUT")[0, 0]) for r, _ in answers]
        expected = []
        for model, seq, values in sent:
            add = int(seq) if model != "simple_sequence" else 0  # the dyna models add the correlation id
            expected += [int(v) + add for v in np.cumsum(values)]
        assert outs == expected, f"run {run}: wrong sums"

    with sidecar(example_triton.grpc_url) as sc:
        for run in range(RUNS):
            asyncio.run(asyncio.wait_for(one_run(sc.url, run), 60))


def _sequence_inputs_aio(value: int) -> list[tc_aio.InferInput]:
    inp = tc_aio.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [inp]




# -- grpc_explicit_int_content_client.py, simple_grpc_string_infer_client.py ---------------------------


def test_explicit_int_content_example(example_triton):
    """Inputs in ``contents.int_contents`` instead of raw bytes; then both at once, which Triton
    refuses with its own words (the example checks them)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def request() -> service_pb2.ModelInferRequest:
        req = service_pb2.ModelInferRequest(model_name="simple")
        for name, values in (("INPUT0", range(16)), ("INPUT1", [1] * 16)):
            t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
            t.contents.int_contents[:] = list(values)
        return req

    def answers(url: str) -> tuple:
        with grpc.insecure_channel(url) as ch:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            resp = stub.ModelInfer(request(), timeout=30)
            sums = np.frombuffer(resp.raw_output_contents[0], np.int32).tolist()
            both = request()
            both.raw_input_contents.append(np.zeros(16, np.int32).tobytes())
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(both, timeout=30)
            return sums, info.value.code(), info.value.details()

    with sidecar(example_triton.grpc_url) as sc:
        direct, via = answers(example_triton.grpc_url), answers(sc.url)
    assert direct[0] == [v + 1 for v in range(16)]
    assert via == direct
    assert "contents field must not be specified when using raw_input_contents for 'INPUT0'" in via[2]


def test_string_example(example_triton):
    a = np.array([[str(v).encode() for v in range(16)]], dtype=np.object_)
    b = np.array([[b"1"] * 16], dtype=np.object_)
    with sidecar(example_triton.grpc_url) as sc:
        client = tc.InferenceServerClient(sc.url)
        for _ in range(3):
            inputs = [tc.InferInput("INPUT0", [1, 16], "BYTES"), tc.InferInput("INPUT1", [1, 16], "BYTES")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer("simple_string", inputs)
            assert [int(x) for x in result.as_numpy("OUTPUT0")[0]] == [v + 1 for v in range(16)]
            assert [int(x) for x in result.as_numpy("OUTPUT1")[0]] == [v - 1 for v in range(16)]


# -- simple_grpc_shm_client.py -----------------------------------------------------------------------


def test_system_shared_memory_example(example_triton):
    """Regions registered through the sidecar (relayed to Triton), inputs and outputs in them."""
    import tritonclient.utils.shared_memory as shm

    a = np.arange(16, dtype=np.int32)[None, :]
    b = np.ones((1, 16), dtype=np.int32)
    nbytes = a.nbytes
    with sidecar(example_triton.grpc_url) as sc:
        client = tc.InferenceServerClient(sc.url)
        client.unregister_system_shared_memory()
        key = f"/smdp_example_{plane()}"
        ip = shm.create_shared_memory_region("input_data", key + "_in", nbytes * 2)
        op = shm.create_shared_memory_region("output_data", key + "_out", nbytes * 2)
        try:
            shm.set_shared_memory_region(ip, [a, b])
            client.register_system_shared_memory("input_data", key + "_in", nbytes * 2)
            client.register_system_shared_memory("output_data", key + "_out", nbytes * 2)
            assert len(client.get_system_shared_memory_status().regions) == 2
            inputs = [tc.InferInput("INPUT0", [1, 16], "INT32"), tc.InferInput("INPUT1", [1, 16], "INT32")]
            inputs[0].set_shared_memory("input_data", nbytes)
            inputs[1].set_shared_memory("input_data", nbytes, offset=nbytes)
            outputs = [tc.InferRequestedOutput("OUTPUT0"), tc.InferRequestedOutput("OUTPUT1")]
            outputs[0].set_shared_memory("output_data", nbytes)
            outputs[1].set_shared_memory("output_data", nbytes, offset=nbytes)
            client.infer("simple", inputs, outputs=outputs)
            out0 = shm.get_contents_as_numpy(op, np.int32, [1, 16])
            out1 = shm.get_contents_as_numpy(op, np.int32, [1, 16], offset=nbytes)
            np.testing.assert_array_equal(out0, a + b)
            np.testing.assert_array_equal(out1, a - b)
        finally:
            client.unregister_system_shared_memory()
            shm.destroy_shared_memory_region(ip)
            shm.destroy_shared_memory_region(op)


# -- simple_grpc_custom_repeat.py (decoupled) --------------------------------------------------------


def test_decoupled_repeat_example(example_triton):
    values = np.array([4, 2, 0, 1], dtype=np.int32)
    with sidecar(example_triton.grpc_url) as sc:
        got: queue.Queue = queue.Queue()
        client = tc.InferenceServerClient(sc.url)
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        for rid in ("r0", "r1"):
            inputs = [tc.InferInput("IN", [len(values)], "INT32"), tc.InferInput("DELAY", [len(values)], "UINT32"),
                      tc.InferInput("WAIT", [1], "UINT32")]
            inputs[0].set_data_from_numpy(values)
            inputs[1].set_data_from_numpy(np.zeros(len(values), np.uint32))
            inputs[2].set_data_from_numpy(np.zeros(1, np.uint32))
            client.async_stream_infer("repeat_int32", inputs, request_id=rid)
        answers = [got.get(timeout=60) for _ in range(2 * len(values))]
        client.stop_stream()
    assert [e for _, e in answers if e is not None] == []
    for rid in ("r0", "r1"):
        mine = [r for r, _ in answers if r.get_response().id == rid]
        assert [int(r.as_numpy("OUT")[0]) for r in mine] == values.tolist()
        assert [int(r.as_numpy("IDX")[0]) for r in mine] == list(range(len(values)))
