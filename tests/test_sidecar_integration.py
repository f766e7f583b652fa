"""The sidecar in front of a real tritonserver, driven by an unmodified tritonclient over real gRPC.

Every test runs on both data planes: the Python gate, and the native one (``smdp-gate``, C++) with
the same Python control plane. Where a plane lacks a feature the test says so and is skipped there.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from plugin.config import load_config
from plugin.native_data_plane import NativeDataPlane
from plugin.runner import SidecarThread
from planes import data_plane, plane, settle  # noqa: F401 - data_plane: autouse, both planes
from slowed_triton import slowed_emulated_gpu

pytestmark = pytest.mark.integration

SCALE = 20  # emulated service times x20: batch of 1 takes ~42 ms, so arrival order is unambiguous

@contextmanager
def sidecar(triton_url: str, **overrides):
    default = overrides.pop("default", {"policy": "greedy"})
    overrides.setdefault("data_plane", plane())
    cfg = load_config(
        overrides={"listen": "127.0.0.1:0", "control_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                   "triton_url": triton_url,
                   "default": default, **overrides},
        environ={},
    )
    runner = SidecarThread(cfg)
    runner.start()
    assert isinstance(runner.sidecar.plane, NativeDataPlane) == (cfg.data_plane == "native")
    try:
        yield runner
    finally:
        runner.stop()


def emu_input(rows: int = 1, seed: int = 0) -> tuple[np.ndarray, list[tc.InferInput]]:
    x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return x, [inp]


def mlp_input(rows: int = 1, seed: int = 0) -> list[tc.InferInput]:
    x = np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def executed_batches(client: tc.InferenceServerClient, model: str) -> dict[int, int]:
    """Triton's own record of the batch sizes it executed (statistics API)."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def diff(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0)}


def executed_since(client: tc.InferenceServerClient, model: str, before: dict[int, int], requests: int
                   ) -> dict[int, int]:
    """Triton's batches since ``before``, once they account for ``requests`` requests: Triton counts a
    batch in its statistics just after sending its responses, so a read at once may miss the last."""
    deadline = time.monotonic() + 5
    while True:
        ran = diff(executed_batches(client, model), before)
        if sum(b * n for b, n in ran.items()) >= requests or time.monotonic() > deadline:
            return ran
        time.sleep(0.02)


@pytest.fixture(scope="module")
def slow_triton(triton_factory_module):
    """A private Triton whose emulated GPU runs SCALE times slower than a V100."""
    return triton_factory_module


@pytest.fixture(scope="module")
def triton_factory_module(tmp_path_factory, triton_runnable):
    with slowed_emulated_gpu(tmp_path_factory.mktemp("slow"), SCALE) as server:
        yield server


# -- protocol fidelity ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 5])
def test_outputs_are_byte_identical_through_the_sidecar(triton, rows):
    with sidecar(triton.grpc_url) as sc:
        direct, via = tc.InferenceServerClient(triton.grpc_url), tc.InferenceServerClient(sc.url)
        _, inputs = emu_input(rows, seed=rows)
        a, b = direct.infer("emulated_gpu", inputs), via.infer("emulated_gpu", inputs)
        ra, rb = a.get_response(), b.get_response()
        assert [o.name for o in ra.outputs] == [o.name for o in rb.outputs]
        assert [o.datatype for o in ra.outputs] == [o.datatype for o in rb.outputs]
        assert [list(o.shape) for o in ra.outputs] == [list(o.shape) for o in rb.outputs]
        # OUTPUT0 is data; BATCH_* describe the execution, equal here because both ran alone
        assert ra.raw_output_contents == rb.raw_output_contents
        m = mlp_input(rows, seed=rows)
        assert (direct.infer("cpu_mlp", m).get_response().raw_output_contents
                == via.infer("cpu_mlp", m).get_response().raw_output_contents)


def test_merged_batches_return_each_caller_its_own_rows(triton):
    with sidecar(triton.grpc_url) as sc:
        via = tc.InferenceServerClient(sc.url)
        direct = tc.InferenceServerClient(triton.grpc_url)

        def one(seed: int):
            x, inputs = emu_input(1 + seed % 3, seed)
            return seed, x, via.infer("emulated_gpu", inputs, request_id=f"r{seed}")

        with ThreadPoolExecutor(24) as ex:
            results = list(ex.map(one, range(96)))
        merged = [r for _, _, r in results if int(r.as_numpy("BATCH_SIZE")[0, 0]) > 3]
        assert merged, "a burst of 96 should have produced merged batches"
        for seed, x, r in results:
            assert r.get_response().id == f"r{seed}"
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 2 * x + 1)
            assert r.as_numpy("OUTPUT0").shape == x.shape
            # the same bytes Triton gives that input alone
            _, inputs = emu_input(x.shape[0], seed)
            alone = direct.infer("emulated_gpu", inputs).as_numpy("OUTPUT0")
            assert r.as_numpy("OUTPUT0").tobytes() == alone.tobytes()


def stream_all(url: str, sends: list[tuple[str, list, str]], answers: int, timeout: float = 30) -> list:
    """Send (model, inputs, request id) on one tritonclient stream; the (result, error) pairs of the
    first ``answers`` responses (a decoupled model may send several per request)."""
    client = tc.InferenceServerClient(url)
    got: list = []
    done = threading.Event()

    def callback(result, error):
        got.append((result, error))
        if len(got) == answers:
            done.set()

    client.start_stream(callback)
    for model, inputs, rid in sends:
        client.async_stream_infer(model, inputs, request_id=rid)
    assert done.wait(timeout), f"{len(got)} of {answers} stream answers"
    client.stop_stream()
    return got


def test_stream_infer_answers_every_request_once(triton):
    with sidecar(triton.grpc_url) as sc:
        sent = {f"s{i}": emu_input(1, seed=100 + i) for i in range(20)}
        got = stream_all(sc.url, [("emulated_gpu", inputs, rid) for rid, (_, inputs) in sent.items()], 20)
        assert all(e is None for _, e in got)
        ids = [r.get_response().id for r, _ in got]
        assert sorted(ids) == sorted(sent)
        for r, _ in got:
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 2 * sent[r.get_response().id][0] + 1)


def stream_request(id: str, model: str = "emulated_gpu", seed: int = 0, **params):
    """A raw ModelInferRequest (one row) for a stream, with any parameters as (kind, value)."""
    from tritonclient.grpc import service_pb2

    x = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
    req = service_pb2.ModelInferRequest(model_name=model, id=id)
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(x.tobytes())
    for key, (kind, value) in params.items():
        setattr(req.parameters[key], kind, value)
    return x, req


def test_stream_requests_are_gated_into_the_batches_the_policy_chose(slow_triton):
    """The burst of test_triton_executes_exactly_the_batches_the_policy_chose, on one stream."""
    direct = tc.InferenceServerClient(slow_triton.grpc_url)
    with sidecar(slow_triton.grpc_url, default={"policy": "threshold:4", "max_batch": 8}) as sc:
        before = executed_batches(direct, "emulated_gpu")
        sent = {f"g{i}": emu_input(1, seed=200 + i) for i in range(12)}
        got = stream_all(sc.url, [("emulated_gpu", inputs, rid) for rid, (_, inputs) in sent.items()], 12)
        assert all(e is None for _, e in got), [e for _, e in got if e is not None]
        for r, _ in got:
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 2 * sent[r.get_response().id][0] + 1)
        sizes = sorted(int(r.as_numpy("BATCH_SIZE")[0, 0]) for r, _ in got)
        settle(sc)
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        assert state.gate.counters.submitted == 12  # every stream request went through the gate
        gate_hist = {b: int(n) for b, n in enumerate(state.stats.batches) if n}
        triton_hist = executed_since(direct, "emulated_gpu", before, 12)
        assert triton_hist == gate_hist  # what Triton ran is what the gate chose, whatever the timing
        assert min(sizes) >= 4  # threshold 4: nothing ran in a smaller batch
        # the stream's 12 requests are on the wire within a few ms: 4 start, 8 wait for the first batch
        assert sizes == [4] * 4 + [8] * 8


def test_stream_errors_are_in_band_and_every_request_is_answered_once(triton):
    """As Triton reports them on a stream: an error_message with the request's id, the stream goes on."""
    from tritonclient.grpc import service_pb2_grpc

    with sidecar(triton.grpc_url) as sc, grpc.insecure_channel(sc.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        xa, a = stream_request("a", seed=1)
        _, bad = stream_request("bad", priority=("int64_param", -1))
        _, unknown = stream_request("unknown", model="no_such_model")
        xd, d = stream_request("d", seed=2)
        answers = list(stub.ModelStreamInfer(iter([a, bad, unknown, d]), timeout=30))
        by_id = {r.infer_response.id: r for r in answers}
        assert len(answers) == 4 and set(by_id) == {"a", "bad", "unknown", "d"}
        for key, x in (("a", xa), ("d", xd)):
            r = by_id[key]
            assert r.error_message == ""
            out = np.frombuffer(r.infer_response.raw_output_contents[0], np.float32).reshape(1, 16)
            np.testing.assert_array_equal(out, 2 * x + 1)
        assert "priority" in by_id["bad"].error_message
        assert "no_such_model" in by_id["unknown"].error_message
        settle(sc)
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        assert state.gate.queue_length == 0 and state.gate.in_flight == 0


def test_a_cancelled_stream_withdraws_what_it_queued_and_triton_never_sees_it(slow_triton):
    from tritonclient.grpc import service_pb2_grpc

    direct = tc.InferenceServerClient(slow_triton.grpc_url)
    # threshold 8: five requests wait in the gate for three more that never come
    with sidecar(slow_triton.grpc_url, default={"policy": "threshold:8", "max_batch": 8}) as sc, \
            grpc.insecure_channel(sc.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        before = executed_batches(direct, "emulated_gpu")
        release = threading.Event()

        def requests():
            for i in range(5):
                yield stream_request(f"c{i}", seed=i)[1]
            release.wait(30)  # the stream stays open until it is cancelled

        call = stub.ModelStreamInfer(requests())
        try:
            deadline = time.monotonic() + 10
            while True:
                settle(sc)
                state = sc.sidecar.registry.models().get(("emulated_gpu", ""))
                if state is not None and state.gate.queue_length == 5:
                    break
                assert time.monotonic() < deadline, "the five requests never queued"
                time.sleep(0.02)
            call.cancel()
            deadline = time.monotonic() + 10
            while True:
                settle(sc)
                if state.gate.queue_length == 0:
                    break
                assert time.monotonic() < deadline, "the cancelled stream's requests stayed queued"
                time.sleep(0.02)
        finally:
            release.set()
        assert state.gate.counters.cancelled == 5 and state.gate.counters.dispatched_requests == 0
        assert diff(executed_batches(direct, "emulated_gpu"), before) == {}


def test_other_rpcs_pass_through_unchanged(triton):
    with sidecar(triton.grpc_url) as sc:
        direct, via = tc.InferenceServerClient(triton.grpc_url), tc.InferenceServerClient(sc.url)
        assert via.is_server_live() and via.is_server_ready() and via.is_model_ready("cpu_mlp")
        assert via.get_server_metadata() == direct.get_server_metadata()
        assert via.get_model_metadata("emulated_gpu") == direct.get_model_metadata("emulated_gpu")
        assert via.get_model_config("cpu_mlp") == direct.get_model_config("cpu_mlp")
        assert via.get_model_repository_index() == direct.get_model_repository_index()
        with pytest.raises(InferenceServerException) as info:
            via.unload_model("cpu_mlp")
        assert "PERMISSION_DENIED" in str(info.value.status())
        assert direct.is_model_ready("cpu_mlp")


def test_health_is_served(triton):
    with sidecar(triton.grpc_url) as sc, grpc.insecure_channel(sc.url) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "inference.GRPCInferenceService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_health_and_reflection_are_served(triton):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with sidecar(triton.grpc_url) as sc, grpc.insecure_channel(sc.url) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "inference.GRPCInferenceService" in services and "grpc.health.v1.Health" in services
        # The service resolves to Triton's own descriptors (what grpcurl needs to call it).
        from google.protobuf.descriptor_pool import DescriptorPool

        service = DescriptorPool(db).FindServiceByName("inference.GRPCInferenceService")
        assert {"ModelInfer", "ModelStreamInfer", "ServerLive", "ModelConfig"} <= {m.name for m in service.methods}


# -- errors: every request gets exactly one answer -----------------------------------------------


def test_unknown_model_gets_tritons_own_error(triton):
    with sidecar(triton.grpc_url) as sc:
        _, inputs = emu_input()
        errors = []
        for url in (triton.grpc_url, sc.url):
            with pytest.raises(InferenceServerException) as info:
                tc.InferenceServerClient(url).infer("no_such_model", inputs)
            errors.append((info.value.status(), info.value.message()))
        assert errors[0] == errors[1]
        assert "NOT_FOUND" in errors[1][0]


@pytest.mark.parametrize(
    "shape, dtype, name",
    [([2, 5], "FP32", "INPUT0"), ([2, 16], "INT32", "INPUT0"), ([2, 16], "FP32", "NOT_AN_INPUT")],
)
def test_malformed_tensors_get_invalid_argument_and_queue_nothing(triton, shape, dtype, name):
    with sidecar(triton.grpc_url) as sc:
        inp = tc.InferInput(name, shape, dtype)
        inp.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if dtype == "FP32" else np.int32))
        with pytest.raises(InferenceServerException) as info:
            tc.InferenceServerClient(sc.url).infer("emulated_gpu", [inp])
        assert "INVALID_ARGUMENT" in info.value.status()
        settle(sc)
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        assert state.gate.queue_length == 0 and state.gate.in_flight == 0


def test_overload_is_refused_with_resource_exhausted_and_nothing_is_lost(slow_triton):
    with sidecar(slow_triton.grpc_url, max_queue=4) as sc:
        client = tc.InferenceServerClient(sc.url)

        def one(seed: int):
            x, inputs = emu_input(1, seed)
            try:
                r = client.infer("emulated_gpu", inputs)
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 2 * x + 1)
                return "ok"
            except InferenceServerException as exc:
                return exc.status()

        with ThreadPoolExecutor(40) as ex:
            answers = list(ex.map(one, range(40)))
        assert len(answers) == 40
        assert set(answers) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"}
        assert answers.count("StatusCode.RESOURCE_EXHAUSTED") > 0 and answers.count("ok") > 0
        settle(sc)
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        assert state.gate.counters.rejected == answers.count("StatusCode.RESOURCE_EXHAUSTED")
        assert state.gate.queue_length == 0 and state.gate.in_flight == 0


def test_client_timeout_expires_in_the_gate_and_frees_its_place(slow_triton):
    # threshold 64 with a lone request: the gate would wait forever, the client's timeout ends it
    with sidecar(slow_triton.grpc_url, default={"policy": "threshold:64"}) as sc:
        client = tc.InferenceServerClient(sc.url)
        _, inputs = emu_input()
        t0 = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            client.infer("emulated_gpu", inputs, timeout=50_000)  # Triton's per-request timeout, us
        assert "UNAVAILABLE" in info.value.status() and "timeout" in info.value.message().lower()
        assert time.monotonic() - t0 < 5
        # a caller that gives up (gRPC deadline) is withdrawn from the queue
        with pytest.raises(InferenceServerException) as info:
            client.infer("emulated_gpu", inputs, client_timeout=0.2)
        assert "DEADLINE_EXCEEDED" in info.value.status()
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        deadline = time.monotonic() + 5
        settle(sc)
        while state.gate.queue_length and time.monotonic() < deadline:
            time.sleep(0.02)
            settle(sc)
        assert state.gate.queue_length == 0
        assert state.gate.counters.expired == 1 and state.gate.counters.cancelled == 1


def test_client_priority_overtakes_waiting_requests(slow_triton):
    with sidecar(slow_triton.grpc_url, default={"policy": "static:1"}) as sc:
        client = tc.InferenceServerClient(sc.url)
        order: list[str] = []
        done = threading.Semaphore(0)

        def send(tag: str, priority: int, rows: int = 1) -> None:
            def cb(result, error):
                order.append(tag if error is None else f"{tag}: {error}")
                done.release()

            client.async_infer("emulated_gpu", emu_input(rows)[1], cb, priority=priority)

        def until(pred, what: str) -> None:
            deadline = time.monotonic() + 10
            while settle(sc) or not pred():  # the native gate's state as of now, not its last report
                assert time.monotonic() < deadline, what
                time.sleep(0.002)

        # the gate's own state says when each step has happened: no sleeps that a busy host outruns
        send("first", 2, rows=64)  # 64 rows run ~220 ms: time enough to queue the rest behind it
        until(lambda: ("emulated_gpu", "") in sc.sidecar.registry.models(), "the model never appeared")
        gate = sc.sidecar.registry.models()[("emulated_gpu", "")].gate
        until(lambda: gate.in_flight == 1, "first never dispatched")
        for i in range(3):
            send(f"low{i}", 2)
        until(lambda: gate.queue_length == 3, "the low-priority requests never queued")
        send("urgent", 1)
        for _ in range(5):
            assert done.acquire(timeout=30)
        assert order[:2] == ["first", "urgent"], order


# -- the policy is what Triton executes ----------------------------------------------------------


def test_triton_executes_exactly_the_batches_the_policy_chose(slow_triton):
    direct = tc.InferenceServerClient(slow_triton.grpc_url)
    with sidecar(slow_triton.grpc_url, default={"policy": "threshold:4", "max_batch": 8}) as sc:
        client = tc.InferenceServerClient(sc.url)
        before = executed_batches(direct, "emulated_gpu")
        done = threading.Semaphore(0)
        results: list = []

        def cb(result, error):
            results.append((result, error))
            done.release()

        # 4 arrive: the threshold is met, a batch of 4 runs (~49 ms); 8 arrive meanwhile and go as
        # one batch of B = 8 at its completion. async_infer only queues the call on the channel, so
        # the whole burst is on the wire in a few ms, well inside the first batch (threads were not:
        # on a busy 2-core host their start-up spread the burst past 49 ms).
        inputs = [emu_input(1, s)[1] for s in range(12)]
        for inp in inputs:
            client.async_infer("emulated_gpu", inp, cb)
        for _ in inputs:
            assert done.acquire(timeout=30)
        assert all(error is None for _, error in results), [e for _, e in results if e is not None]
        sizes = sorted(int(r.as_numpy("BATCH_SIZE")[0, 0]) for r, _ in results)
        settle(sc)
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        gate_hist = {b: int(n) for b, n in enumerate(state.stats.batches) if n}
        triton_hist = executed_since(direct, "emulated_gpu", before, len(inputs))
        assert triton_hist == gate_hist  # what Triton ran is what the gate chose, whatever the timing
        assert sizes == [4] * 4 + [8] * 8
        assert triton_hist == {4: 1, 8: 1}


def test_triton_batch_histogram_equals_the_gates_under_poisson_load(slow_triton):
    from solver.arrivals import poisson

    direct = tc.InferenceServerClient(slow_triton.grpc_url)
    profile = Path(__file__).resolve().parents[1] / "profiles" / "v100_resnet50.csv"
    with sidecar(
        slow_triton.grpc_url,
        default={"policy": "timeout:0.03", "max_batch": 16, "profile": str(profile)},
    ) as sc:
        client = tc.InferenceServerClient(sc.url)
        before = executed_batches(direct, "emulated_gpu")
        times = poisson(150.0, n=150, rng=np.random.default_rng(3))
        start = time.monotonic()

        def fire(i: int):
            delay = start + times[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            return client.infer("emulated_gpu", emu_input(1, i)[1])

        with ThreadPoolExecutor(64) as ex:
            results = list(ex.map(fire, range(len(times))))
        assert len(results) == len(times)
        settle(sc)
        state = sc.sidecar.registry.models()[("emulated_gpu", "")]
        gate_hist = {b: int(n) for b, n in enumerate(state.stats.batches) if n}
        triton_hist = executed_since(direct, "emulated_gpu", before, len(times))
        assert triton_hist == gate_hist
        assert sum(b * n for b, n in triton_hist.items()) == len(times)
        assert max(triton_hist) > 1


def test_greedy_gate_batches_like_tritons_own_delay_zero(slow_triton):
    """One request starts alone; five arriving while it runs go together: Triton's rule, and greedy's."""
    direct = tc.InferenceServerClient(slow_triton.grpc_url)

    def scenario(client) -> dict[int, int]:
        before = executed_batches(direct, "emulated_gpu")
        with ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(client.infer, "emulated_gpu", emu_input(1, 0)[1])]
            time.sleep(0.015)
            futs += [ex.submit(client.infer, "emulated_gpu", emu_input(1, s)[1]) for s in range(1, 6)]
            for f in futs:
                f.result()
        return executed_since(direct, "emulated_gpu", before, 6)

    native = scenario(direct)
    with sidecar(slow_triton.grpc_url) as sc:
        gated = scenario(tc.InferenceServerClient(sc.url))
    assert native == gated == {1: 1, 5: 1}


@pytest.mark.python_plane_only("the native gate runs the merged mode only")
def test_released_mode_lets_tritons_batcher_group_the_chosen_requests(slow_triton):
    direct = tc.InferenceServerClient(slow_triton.grpc_url)
    with sidecar(slow_triton.grpc_url, mode="released", default={"policy": "threshold:4", "max_batch": 8}) as sc:
        client = tc.InferenceServerClient(sc.url)
        before = executed_batches(direct, "emulated_gpu")
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(lambda s: client.infer("emulated_gpu", emu_input(1, s)[1]), range(4)))
        for s, r in enumerate(results):
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 2 * emu_input(1, s)[0] + 1)
        ran = executed_since(direct, "emulated_gpu", before, 4)
        assert sum(b * n for b, n in ran.items()) == 4  # all four ran, grouped by Triton's batcher


# -- Triton going away ---------------------------------------------------------------------------


def test_triton_restart_gives_unavailable_then_service_without_restarting_the_sidecar(triton_factory):
    server = triton_factory(models=("cpu_mlp",))
    with sidecar(server.grpc_url) as sc:
        client = tc.InferenceServerClient(sc.url)
        answers: list[str] = []
        sent = 0
        stop = threading.Event()

        def load():
            nonlocal sent
            while not stop.is_set():
                sent += 1
                try:
                    client.infer("cpu_mlp", mlp_input(1), client_timeout=10)
                    answers.append("ok")
                except InferenceServerException as exc:
                    answers.append(exc.status())
                time.sleep(0.01)

        th = threading.Thread(target=load)
        th.start()
        try:
            time.sleep(0.5)
            server.stop()
            time.sleep(1.0)
            down = list(answers)
            server.start()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and answers[-1:] != ["ok"]:
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            th.join(15)
        assert "StatusCode.UNAVAILABLE" in down
        assert answers[-1] == "ok"
        assert len(answers) == sent  # every request got exactly one answer
        assert set(answers) <= {"ok", "StatusCode.UNAVAILABLE"}
        # and the model is gated again, with the config Triton has now (the native plane re-reads it
        # after Triton's NOT_FOUND, or on the model's traffic once a second, see docs/operations.md)
        deadline = time.monotonic() + 10
        while True:
            client.infer("cpu_mlp", mlp_input(1), client_timeout=10)
            settle(sc)
            state = sc.call(lambda: sc.sidecar.registry.models().get(("cpu_mlp", "")))
            if (state is not None and state.gate is not None) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state is not None and state.gate is not None


def test_prometheus_metrics_count_requests_batches_and_decisions(slow_triton):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with sidecar(slow_triton.grpc_url, max_queue=4, default={"policy": "threshold:4", "max_batch": 8}) as sc:
        client = tc.InferenceServerClient(sc.url)

        def one(s: int) -> str:
            try:
                client.infer("emulated_gpu", emu_input(1, s)[1])
                return "ok"
            except InferenceServerException as exc:
                return exc.status()

        with ThreadPoolExecutor(12) as ex:
            answers = list(ex.map(one, range(12)))
        settle(sc)
        port = sc.call(lambda: sc._running.metrics_port)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") == "emulated_gpu":
                samples[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model")))] = s.value
    ok, refused = answers.count("ok"), answers.count("StatusCode.RESOURCE_EXHAUSTED")
    assert ok + refused == 12 and refused > 0
    assert samples[("smdp_sidecar_requests_total", ())] == ok
    assert samples[("smdp_sidecar_requests_rejected_total", (("reason", "queue_full"),))] == refused
    assert samples[("smdp_sidecar_responses_total", (("code", "OK"),))] == ok
    served = sum(v for (name, labels), v in samples.items() if name == "smdp_sidecar_batches_total")
    assert samples[("smdp_sidecar_batch_size_sum", ())] == ok and served >= ok / 8
    assert samples[("smdp_sidecar_batches_total", (("why", "policy"),))] == served  # no guard, no timeout fired
