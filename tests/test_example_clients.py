"""The calls NVIDIA's example clients make (triton-inference-server/client, src/python/examples), with
only the URL changed to the sidecar's, on both data planes: sequence streams (sync and asyncio),
explicit contents, strings, system shared memory and a decoupled model's repeated responses. The
models are stand-ins with the same names and tensors (tests/example_models.py).
"""

from __future__ import annotations

import asyncio
import queue
from contextlib import contextmanager

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio

from example_models import write_example_repository
from plugin.config import load_config
from plugin.runner import SidecarThread
from planes import data_plane, plane  # noqa: F401 - data_plane: autouse, both planes

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


@contextmanager
def sidecar(triton_url: str):
    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": None, "metrics_listen": None,
                                 "triton_url": triton_url, "data_plane": plane(),
                                 "default": {"policy": "greedy"}}, environ={})
    runner = SidecarThread(cfg)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


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


def test_sequence_stream_example_aio(example_triton):
    async def one_run(url: str, run: int) -> list:
        seq0, seq1 = 5000 + 2 * run, 5001 + 2 * run

        async def requests():
            for i, v in enumerate(VALUES):
                last = i == len(VALUES) - 1
                for seq, value in ((seq0, v), (seq1, -v)):
                    yield {"model_name": "simple_sequence", "inputs": _sequence_inputs_aio(value),
                           "request_id": f"{seq}_{i}", "sequence_id": seq, "sequence_start": i == 0,
                           "sequence_end": last}

        async with tc_aio.InferenceServerClient(url) as client:
            answers = []
            async for result, error in client.stream_infer(requests()):
                answers.append((result, error))
                if len(answers) == 2 * len(VALUES):
                    break
        errors = [str(e) for _, e in answers if e is not None]
        assert errors == [], f"run {run}: {errors[:2]}"
        ids = [r.get_response().id for r, _ in answers]
        assert ids == [f"{s}_{i}" for i in range(len(VALUES)) for s in (seq0, seq1)], f"run {run}: out of order"
        outs = [int(r.as_numpy("OUTPUT")[0, 0]) for r, _ in answers]
        e0, e1 = _expected("simple_sequence", seq0, seq1)
        return outs == [x for pair in zip(e0, e1) for x in pair]

    with sidecar(example_triton.grpc_url) as sc:
        for run in range(RUNS):
            assert asyncio.run(asyncio.wait_for(one_run(sc.url, run), 60)), f"run {run}: wrong sums"


def _sequence_inputs_aio(value: int) -> list[tc_aio.InferInput]:
    inp = tc_aio.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [inp]


