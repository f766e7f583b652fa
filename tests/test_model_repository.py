"""The model repository: configs parse and are self-contained, the model code is right on its own,
and both models answer correctly and batch through a real Triton with an unmodified client."""

from __future__ import annotations

import ast
import importlib.util
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from solver.model import ServiceProfile

REPO = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = ("emulated_gpu", "cpu_mlp")
# What a model directory may import besides its own files: Triton's container has these.
ALLOWED_IMPORTS = {"numpy", "triton_python_backend_utils"} | set(sys.stdlib_module_names)


def load_config(name: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((REPO / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def load_module(path: Path, name: str):
    """Import a model-directory module the way the Python backend does: its directory on sys.path."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


profile_table = load_module(REPO / "emulated_gpu" / "1" / "profile_table.py", "emulated_profile_table")
mlp_weights = load_module(REPO / "cpu_mlp" / "1" / "mlp_weights.py", "cpu_mlp_weights")


def param(config: model_config_pb2.ModelConfig, key: str) -> str:
    return config.parameters[key].string_value


# --------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", MODELS)
def test_config_parses_and_matches_its_directory(name: str) -> None:
    config = load_config(name)
    assert config.name == name
    assert config.backend == "python"
    assert (REPO / name / "1" / "model.py").is_file()
    batching = config.dynamic_batching
    assert config.HasField("dynamic_batching")
    assert batching.max_queue_delay_microseconds == 0
    assert batching.priority_levels == 2
    assert batching.default_priority_level == 2
    policy = batching.default_queue_policy
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert policy.allow_timeout_override
    assert policy.max_queue_size > 0
    # Triton lets a request only shorten the default timeout: 0 here would disable overrides.
    assert policy.default_timeout_microseconds > 0
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, model_config_pb2.ModelInstanceGroup.KIND_CPU)]


@pytest.mark.parametrize("name", MODELS)
def test_model_code_imports_only_its_own_files_numpy_and_stdlib(name: str) -> None:
    """Inside NVIDIA's container only the model directory is mounted: no project imports allowed."""
    version_dir = REPO / name / "1"
    for source in version_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top in ALLOWED_IMPORTS or (version_dir / f"{top}.py").is_file(), (
                    f"{source.name} imports {module!r}, which is neither a sibling file nor numpy/stdlib"
                )


def test_emulated_gpu_profile_file_exists_and_covers_max_batch() -> None:
    config = load_config("emulated_gpu")
    csv = REPO / "emulated_gpu" / param(config, "profile_csv")
    assert csv.is_file()
    assert config.max_batch_size == 128
    assert [tuple(i.dims) for i in config.input] == [(16,)]
    assert {o.name: tuple(o.dims) for o in config.output} == {"OUTPUT0": (16,), "BATCH_SIZE": (1,), "BATCH_ENERGY_J": (1,)}
    table = profile_table.ProfileTable.from_csv(csv, config.max_batch_size)
    assert table.max_batch == config.max_batch_size


def test_emulated_gpu_profile_is_the_projects_v100_table() -> None:
    shipped = (REPO / "emulated_gpu" / "v100_resnet50.csv").read_text()
    assert shipped == (REPO.parent / "profiles" / "v100_resnet50.csv").read_text()


def test_cpu_mlp_layer_sizes_match_its_tensors() -> None:
    config = load_config("cpu_mlp")
    sizes = mlp_weights.parse_layer_sizes(param(config, "layer_sizes"))
    assert config.max_batch_size == 64
    assert [tuple(i.dims) for i in config.input] == [(sizes[0],)]
    assert [tuple(o.dims) for o in config.output] == [(sizes[-1],)]
    assert sizes == (256, 512, 512, 16)


# --------------------------------------------------------------------------------------------------
# Model code on its own (pure logic)


def test_profile_table_agrees_with_the_solvers_profile_for_every_batch_size() -> None:
    """Two independent readers of one CSV: the model's local loader and solver.model.ServiceProfile."""
    csv = REPO / "emulated_gpu" / "v100_resnet50.csv"
    local = profile_table.ProfileTable.from_csv(csv, 128)
    solver = ServiceProfile.from_csv(csv, max_batch=128)
    np.testing.assert_allclose(local.mean_s, solver.mean_s, rtol=1e-12)
    np.testing.assert_allclose(local.energy_j, solver.energy_j, rtol=1e-12)
    np.testing.assert_allclose(local.cv, solver.cv)


def test_profile_table_interpolates_linearly_between_rows(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("batch_size,mean_service_s,batch_energy_j,service_cv\n1,0.001,0.1,0.2\n5,0.005,0.9,0.6\n")
    table = profile_table.ProfileTable.from_csv(csv, 5)
    assert table.service_s(3) == pytest.approx(0.003)
    assert table.energy(2) == pytest.approx(0.3)
    assert table.service_cv(4) == pytest.approx(0.5)
    with pytest.raises(profile_table.ProfileError, match="batch size 6"):
        table.service_s(6)


@pytest.mark.parametrize(
    ("text", "max_batch", "message"),
    [
        ("batch_size,mean_service_s\n1,0.1\n", 1, "lacks column"),
        ("batch_size,mean_service_s,batch_energy_j\n2,0.1,1\n", 2, "must include batch size 1"),
        ("batch_size,mean_service_s,batch_energy_j\n1,0.1,1\n4,0.2,2\n", 8, "max_batch_size 8 is not covered"),
        ("batch_size,mean_service_s,batch_energy_j\n1,-0.1,1\n", 1, "mean_service_s must be > 0"),
        ("batch_size,mean_service_s,batch_energy_j\n1,x,1\n", 1, "line 2"),
        ("batch_size,mean_service_s,batch_energy_j\n1,0.1,1\n1,0.2,1\n", 1, "twice"),
        ("batch_size,mean_service_s,batch_energy_j\n", 1, "no rows"),
    ],
)
def test_profile_table_rejects_bad_csv_with_a_clear_message(tmp_path: Path, text: str, max_batch: int, message: str) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text(text)
    with pytest.raises(profile_table.ProfileError, match=message):
        profile_table.ProfileTable.from_csv(csv, max_batch)


def test_profile_table_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(profile_table.ProfileError, match="not found.*nope.csv"):
        profile_table.ProfileTable.from_csv(tmp_path / "nope.csv", 1)


@pytest.mark.parametrize("cv", [0.25, 1.0])
def test_jittered_service_time_has_the_profiles_mean_and_cv(cv: float) -> None:
    rng = np.random.default_rng(42)
    draws = np.array([profile_table.jittered(0.002, cv, rng) for _ in range(40_000)])
    assert np.all(draws > 0)
    # Standard errors at n = 40,000: mean 0.5% * cv, CV well under 2%; tolerances are ~5 sigma.
    assert draws.mean() == pytest.approx(0.002, rel=0.03 * cv)
    assert draws.std() / draws.mean() == pytest.approx(cv, rel=0.05)
    # Same second moment as the solver's gamma law for this CV.
    solver = ServiceProfile.from_table([1], [0.002], [0.1], cv=cv)
    assert np.mean(draws**2) == pytest.approx(solver.second_moment(1), rel=0.1)


def test_zero_jitter_is_the_mean_exactly() -> None:
    assert profile_table.jittered(0.0021, 0.0, np.random.default_rng(0)) == 0.0021


def reference_mlp(x: np.ndarray, layers) -> np.ndarray:
    """The same network written differently: one row at a time, ReLU via np.where, float64."""
    out = []
    for row in np.asarray(x, dtype=np.float64):
        h = row
        for i, (w, b) in enumerate(layers):
            h = h @ w.astype(np.float64) + b.astype(np.float64)
            if i < len(layers) - 1:
                h = np.where(h > 0, h, 0.0)
        out.append(h)
    return np.array(out)


def test_mlp_batched_forward_equals_row_by_row_reference() -> None:
    layers = mlp_weights.make_weights((256, 512, 512, 16), seed=7)
    assert [w.shape for w, _ in layers] == [(256, 512), (512, 512), (512, 16)]
    x = np.random.default_rng(1).standard_normal((9, 256)).astype(np.float32)
    np.testing.assert_allclose(mlp_weights.forward(x, layers), reference_mlp(x, layers), rtol=1e-4, atol=1e-4)


def test_mlp_weights_are_a_function_of_the_seed() -> None:
    a = mlp_weights.make_weights((4, 3, 2), seed=1)
    b = mlp_weights.make_weights((4, 3, 2), seed=1)
    c = mlp_weights.make_weights((4, 3, 2), seed=2)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert not np.array_equal(a[0][0], c[0][0])


@pytest.mark.parametrize("text", ["256", "a,b", "4,0,2", ""])
def test_mlp_layer_sizes_are_validated(text: str) -> None:
    with pytest.raises(ValueError, match="layer_sizes"):
        mlp_weights.parse_layer_sizes(text)


# --------------------------------------------------------------------------------------------------
# Through a real Triton, with an unmodified tritonclient.grpc client


@pytest.fixture(scope="module")
def client(triton):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url=triton.grpc_url)
    yield c
    c.close()


def emulated_request(x: np.ndarray):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32))
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "BATCH_SIZE", "BATCH_ENERGY_J")]
    return [inp], outputs


def infer_emulated(client, x: np.ndarray):
    inputs, outputs = emulated_request(x)
    return client.infer("emulated_gpu", inputs, outputs=outputs)


def batch_stats(client, model: str) -> dict[int, tuple[int, int]]:
    """batch size -> (executions, total compute_infer ns), from Triton's statistics API."""
    stats = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
    out = {}
    for entry in stats.get("batch_stats", []):
        ci = entry["compute_infer"]
        out[int(entry["batch_size"])] = (int(ci.get("count", 0)), int(ci.get("ns", 0)))
    return out


def stats_delta(before: dict, after: dict) -> dict[int, tuple[int, int]]:
    delta = {}
    for b, (count, ns) in after.items():
        c0, n0 = before.get(b, (0, 0))
        if count - c0:
            delta[b] = (count - c0, ns - n0)
    return delta


def stats_since(client, model: str, before: dict, rows: int) -> dict[int, tuple[int, int]]:
    """``stats_delta`` once Triton's statistics account for ``rows`` executed rows: Triton counts a
    batch just after sending its responses, so a read right after the last answer may miss it."""
    deadline = time.monotonic() + 5
    while True:
        delta = stats_delta(before, batch_stats(client, model))
        if sum(b * c for b, (c, _) in delta.items()) >= rows or time.monotonic() > deadline:
            return delta
        time.sleep(0.02)


V100 = ServiceProfile.from_csv(REPO.parent / "profiles" / "v100_resnet50.csv")


@pytest.mark.integration
@pytest.mark.parametrize("rows", [1, 3, 64, 128])
def test_emulated_gpu_answers_one_request_of_several_rows(client, rows: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 16)).astype(np.float32)
    before = batch_stats(client, "emulated_gpu")
    result = infer_emulated(client, x)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), 2.0 * x + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("BATCH_SIZE"), np.full((rows, 1), rows))
    np.testing.assert_allclose(result.as_numpy("BATCH_ENERGY_J"), np.full((rows, 1), V100.energy_j[rows - 1]), rtol=1e-6)
    delta = stats_since(client, "emulated_gpu", before, rows)
    assert {b: count for b, (count, _) in delta.items()} == {rows: 1}


def fire_concurrently(client, model: str, inputs: list[np.ndarray], output_names: tuple[str, ...]) -> list:
    """Send every request at once with the client's async API; results in request order."""
    import tritonclient.grpc as grpcclient

    results: list = [None] * len(inputs)
    done = threading.Semaphore(0)

    def callback(i: int):
        def cb(result, error):
            results[i] = error if error is not None else result
            done.release()

        return cb

    for i, x in enumerate(inputs):
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        client.async_infer(model, [inp], callback(i), outputs=[grpcclient.InferRequestedOutput(n) for n in output_names])
    for _ in inputs:
        assert done.acquire(timeout=30), "a request got no answer within 30 s"
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return results


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_statistics_agree(client) -> None:
    """While a 128-row batch runs (~20 ms), 40 single-row requests queue; Triton batches them.

    Each execution of size k answers exactly k single-row requests, all reporting k, so the count of
    responses reporting k is k times the number of size-k executions in Triton's own batch_stats.
    """
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((128, 16)).astype(np.float32)]
    inputs += [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(40)]
    before = batch_stats(client, "emulated_gpu")
    results = fire_concurrently(client, "emulated_gpu", inputs, ("OUTPUT0", "BATCH_SIZE", "BATCH_ENERGY_J"))
    delta = stats_since(client, "emulated_gpu", before, sum(len(x) for x in inputs))

    for x, r in zip(inputs, results):
        np.testing.assert_allclose(r.as_numpy("OUTPUT0"), 2.0 * x + 1.0, rtol=1e-6)
        b = int(r.as_numpy("BATCH_SIZE")[0, 0])
        assert np.all(r.as_numpy("BATCH_SIZE") == b)
        np.testing.assert_allclose(r.as_numpy("BATCH_ENERGY_J"), V100.energy_j[b - 1], rtol=1e-6)
    assert int(results[0].as_numpy("BATCH_SIZE")[0, 0]) == 128

    reported = Counter(int(r.as_numpy("BATCH_SIZE")[0, 0]) for r in results[1:])
    assert max(reported) > 1, f"no batching happened: {reported}"
    executions = {k: n // k for k, n in reported.items()}
    assert all(n % k == 0 for k, n in reported.items()), reported
    executions[128] = executions.get(128, 0) + 1
    assert {k: c for k, (c, _) in delta.items()} == executions


@pytest.mark.integration
def test_emulated_service_time_grows_with_batch_size(client) -> None:
    """Order only, from Triton's own compute_infer: tau(64) = 10.9 ms vs tau(1) = 2.1 ms."""
    before = batch_stats(client, "emulated_gpu")
    for rows in (1, 64) * 4:
        infer_emulated(client, np.zeros((rows, 16), np.float32))
    delta = stats_since(client, "emulated_gpu", before, 4 * 65)
    assert delta[1][0] == 4 and delta[64][0] == 4
    mean_ns = {b: ns / count for b, (count, ns) in delta.items()}
    assert mean_ns[64] > mean_ns[1]
    print(f"emulated_gpu compute_infer: b=1 {mean_ns[1] / 1e6:.2f} ms (profile {V100.mean_s[0] * 1e3:.2f}), "
          f"b=64 {mean_ns[64] / 1e6:.2f} ms (profile {V100.mean_s[63] * 1e3:.2f})")


@pytest.mark.integration
def test_queued_request_past_its_timeout_is_rejected(client) -> None:
    """default_queue_policy: REJECT with per-request override; a 1 ms timeout behind a 20 ms batch expires."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    results: list = []
    done = threading.Semaphore(0)

    def cb(result, error):
        results.append((result, error))
        done.release()

    big, _ = emulated_request(np.zeros((128, 16), np.float32))
    client.async_infer("emulated_gpu", big, callback=cb)
    inp = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.float32))
    with pytest.raises(InferenceServerException, match="(?i)timeout|timed out"):
        client.infer("emulated_gpu", [inp], timeout=1000)
    assert done.acquire(timeout=30)
    assert results[0][1] is None
    # Priority 1 (the gate's level) and a generous timeout are accepted.
    result = client.infer("emulated_gpu", [inp], priority=1, timeout=10_000_000)
    assert int(result.as_numpy("BATCH_SIZE")[0, 0]) == 1


def mlp_layers():
    config = load_config("cpu_mlp")
    sizes = mlp_weights.parse_layer_sizes(param(config, "layer_sizes"))
    return mlp_weights.make_weights(sizes, int(param(config, "seed")))


@pytest.mark.integration
def test_cpu_mlp_answers_like_numpy_with_the_same_weights(client) -> None:
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(11).standard_normal((5, 256)).astype(np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("cpu_mlp", [inp]).as_numpy("OUTPUT0")
    assert got.shape == (5, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_mlp(x, mlp_layers()), rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_cpu_mlp_batches_concurrent_requests_and_splits_rows_back(triton_factory, tmp_path: Path) -> None:
    # cpu_mlp runs a small batch in well under a millisecond, so on a busy 2-core host the client may
    # never get ahead of it with max_queue_delay 0; a 50 ms delay makes Triton's grouping certain, and
    # what is tested is the model's batched execution and the split of rows back to each request.
    import shutil

    import tritonclient.grpc as grpcclient

    shutil.copytree(REPO / "cpu_mlp", tmp_path / "cpu_mlp", ignore=shutil.ignore_patterns("__pycache__"))
    config = load_config("cpu_mlp")
    config.dynamic_batching.max_queue_delay_microseconds = 50_000
    (tmp_path / "cpu_mlp" / "config.pbtxt").write_text(text_format.MessageToString(config))
    server = triton_factory(repository=tmp_path, models=("cpu_mlp",))
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 256)).astype(np.float32) for _ in range(48)]
    before = batch_stats(client, "cpu_mlp")
    results = fire_concurrently(client, "cpu_mlp", inputs, ("OUTPUT0",))
    delta = stats_since(client, "cpu_mlp", before, sum(len(x) for x in inputs))
    layers = mlp_layers()
    for x, r in zip(inputs, results):
        np.testing.assert_allclose(r.as_numpy("OUTPUT0"), reference_mlp(x, layers), rtol=1e-4, atol=1e-4)
    assert sum(b * c for b, (c, _) in delta.items()) == sum(x.shape[0] for x in inputs)
    assert sum(c for c, _ in delta.values()) < len(inputs), f"no batching happened: {delta}"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("time_scale", "-1", "parameter time_scale must be a finite number > 0"),
     ("profile_csv", "missing.csv", "profile CSV not found")],
)
def test_bad_emulated_gpu_parameter_fails_the_load_with_its_reason(triton_factory, tmp_path: Path, key, value, message) -> None:
    import shutil

    from plugin.launcher.triton_server import TritonStartError

    shutil.copytree(REPO / "emulated_gpu", tmp_path / "emulated_gpu", ignore=shutil.ignore_patterns("__pycache__"))
    config = load_config("emulated_gpu")
    config.parameters[key].string_value = value
    (tmp_path / "emulated_gpu" / "config.pbtxt").write_text(text_format.MessageToString(config))
    with pytest.raises(TritonStartError, match=message):
        triton_factory(repository=tmp_path, models=("emulated_gpu",), startup_timeout_s=60)
