"""The solver gRPC service: same answers as a direct solve, cache and warm start, status codes."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from smdp.v1 import smdp_pb2_grpc
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.service import (
    SERVICE_NAME,
    AsyncSolverClient,
    PolicyCache,
    SolverClient,
    SolverError,
    SolverService,
    solve_request,
    start_solver_server,
)
from solver.smdp import solve

ROOT = Path(__file__).resolve().parent.parent
B = 32
PROFILE = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv", max_batch=B)
# A rate at the centre of a 1% cache cell, so that +0.3% stays in the same cell.
RATE = 1.01 ** 690  # ~ 968 req/s, load ~ 0.5 of B/tau(B) ~ 1.9k/s


def model(rate: float = RATE, weight: float = 1e-4) -> BatchingModel:
    return BatchingModel(rate=rate, max_batch=B, profile=PROFILE, idle_power_w=40.0, weight=weight)


@pytest.fixture(scope="module")
def served():
    service = SolverService(cache_size=16)
    server, port = start_solver_server("127.0.0.1:0", service=service)
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def client(served):
    with SolverClient(served[1], timeout_s=30) as c:
        yield c


def test_answer_equals_direct_solve(client: SolverClient) -> None:
    m = model(weight=2e-4)
    direct = solve(m)
    remote = client.solve(m)
    assert not remote.cached and not remote.warm_started
    assert np.array_equal(remote.policy.actions, direct.policy.actions)
    assert remote.gain == pytest.approx(direct.gain, rel=1e-12)
    assert remote.mean_latency_s == pytest.approx(direct.mean_latency_s, rel=1e-12)
    assert remote.mean_power_w == pytest.approx(direct.mean_power_w, rel=1e-12)
    assert remote.threshold == direct.threshold()
    assert remote.truncation == direct.truncation and remote.converged
    assert remote.capacity_rps == pytest.approx(m.capacity) and remote.load == pytest.approx(m.load)
    # Cost decomposes as J = W + w P.
    assert remote.gain == pytest.approx(remote.mean_latency_s + m.weight * remote.mean_power_w, rel=1e-6)


def test_rvi_answer_equals_direct_solve(client: SolverClient) -> None:
    m = model(rate=RATE * 0.8, weight=3e-4)
    direct = solve(m, "rvi")
    remote = client.solve(m, "rvi")
    assert remote.method == "rvi"
    assert np.array_equal(remote.policy.actions, direct.policy.actions)
    assert remote.gain == pytest.approx(direct.gain, rel=1e-9)


def test_near_identical_request_is_a_cache_hit(served, client: SolverClient) -> None:
    service, _ = served
    first = client.solve(model(weight=1e-4))
    hits = service.cache.hits
    again = client.solve(model(rate=RATE * 1.003, weight=1.0004e-4))
    assert again.cached and service.cache.hits == hits + 1
    assert again.solved_rate_rps == pytest.approx(RATE) and again.solved_weight == pytest.approx(1e-4)
    assert np.array_equal(again.policy.actions, first.policy.actions) and again.gain == first.gain
    # 5% away is another cell: solved afresh, warm-started from the cached neighbour, same answer as cold.
    far = model(rate=RATE * 1.05, weight=1e-4)
    warm = client.solve(far)
    cold = solve(far)
    assert not warm.cached and warm.warm_started
    assert warm.solved_rate_rps == pytest.approx(far.rate)
    assert np.array_equal(warm.policy.actions, cold.policy.actions)
    assert warm.gain == pytest.approx(cold.gain, rel=1e-10)


def test_explicit_warm_start_is_used(client: SolverClient) -> None:
    m = model(rate=RATE * 0.6, weight=5e-5)
    cold = solve(m)
    seed = solve(m.with_(rate=m.rate * 0.9)).policy
    out = client.solve(m, warm_start=seed)
    assert out.warm_started and not out.cached
    assert np.array_equal(out.policy.actions, cold.policy.actions)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: setattr(r, "rate_rps", 1e4), "at or above capacity"),
        (lambda r: setattr(r, "rate_rps", float("nan")), "arrival rate"),
        (lambda r: setattr(r, "weight", -1.0), "weight"),
        (lambda r: setattr(r, "method", "magic"), "method"),
        (lambda r: r.profile.mean_service_s.pop(), "mean_service_s"),
        (lambda r: r.profile.ClearField("batch_size"), "no rows"),
        (lambda r: setattr(r, "max_batch", 500), "max_batch 500"),
        (lambda r: setattr(r, "truncation", 3), "truncation 3"),
        (lambda r: r.warm_start_policy.extend([0, 5]), "warm_start_policy"),
    ],
)
def test_bad_input_is_invalid_argument_with_the_message(served, mutate, message: str) -> None:
    req = solve_request(model())
    mutate(req)
    with grpc.insecure_channel(served[1]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            smdp_pb2_grpc.SolverStub(channel).Solve(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_client_raises_solver_error_for_bad_input(client: SolverClient) -> None:
    req_model = model()
    with pytest.raises(SolverError) as info:
        client.solve(req_model, "nope")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and not info.value.unavailable


def test_unsolvable_is_failed_precondition() -> None:
    from solver.evaluate import UnstablePolicyError

    def failing(*args, **kwargs):
        raise UnstablePolicyError("the queue grows without bound")

    server, port = start_solver_server(service=SolverService(solve_fn=failing))
    try:
        with SolverClient(f"127.0.0.1:{port}") as c, pytest.raises(SolverError) as info:
            c.solve(model())
    finally:
        server.stop(None)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "grows without bound" in info.value.details


def test_health_and_reflection(served) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"smdp.v1.Solver", "grpc.health.v1.Health"} <= services


def test_unreachable_solver(served) -> None:
    # A port that was bound and released: nothing listens there.
    server, port = start_solver_server()
    server.stop(None).wait()
    with SolverClient(f"127.0.0.1:{port}", timeout_s=0.5) as c:
        assert not c.reachable(timeout_s=0.5)
        with pytest.raises(SolverError) as info:
            c.solve(model())
    assert info.value.unavailable
    with SolverClient(served[1]) as c:
        assert c.reachable()


def test_async_client(served) -> None:
    async def go():
        async with AsyncSolverClient(served[1], timeout_s=30) as c:
            assert await c.reachable()
            return await c.solve(model(rate=RATE * 0.4))

    out = asyncio.run(go())
    direct = solve(model(rate=RATE * 0.4))
    # the service may warm-start from a cached neighbour, whose size the search resumes from:
    # the same policy on the common states and the same gain, possibly at a larger N
    common = min(out.truncation, direct.truncation) + 1
    assert np.array_equal(out.policy.actions[:common], direct.policy.actions[:common])
    assert out.gain == pytest.approx(direct.gain, rel=1e-8)


def test_client_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        SolverClient("127.0.0.1:1", timeout_s=0)


def test_cache_is_lru_bounded() -> None:
    from solver.service import CacheKey

    cache = PolicyCache(2)
    a, b, c = (CacheKey("f", i, 0.0) for i in range(3))
    cache.put(a, "A")
    cache.put(b, "B")
    assert cache.get(a) == "A"  # a is now the most recent
    cache.put(c, "C")
    assert len(cache) == 2 and cache.get(b) is None and cache.get(a) == "A" and cache.get(c) == "C"
    assert cache.nearest(CacheKey("f", 10, 0.0)) == "C"
    assert cache.nearest(CacheKey("f", 10, 1.0)) == "C"
    assert cache.nearest(CacheKey("other", 0, 0.0)) is None
    cache.put(CacheKey("f", 9, 1.0), "W")  # same weight wins over a nearer rate
    assert cache.nearest(CacheKey("f", 0, 1.0)) == "W"
    with pytest.raises(ValueError, match="cache size"):
        PolicyCache(0)


def test_rate_cells_are_about_one_percent() -> None:
    from solver.service import rate_cell, weight_key

    assert rate_cell(RATE) == rate_cell(RATE * 1.004) == rate_cell(RATE / 1.004)
    assert rate_cell(RATE * 1.006) != rate_cell(RATE)
    assert weight_key(1.2344e-4) == weight_key(1.2341e-4) != weight_key(1.236e-4)
    assert math.isclose(weight_key(0.0), 0.0)


@pytest.mark.parametrize("by", ["flag", "environment"])
def test_solver_serve_command(by: str) -> None:
    argv, env = [sys.executable, "-m", "solver.service_cli"], dict(os.environ)
    if by == "flag":
        argv += ["--listen", "127.0.0.1:0"]
        env["SMDP_SOLVER_LISTEN"] = "127.0.0.1:1"  # the flag wins
    else:
        env["SMDP_SOLVER_LISTEN"] = "127.0.0.1:0"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("smdp solver listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.rsplit(":", 1)[1])
        with SolverClient(f"127.0.0.1:{port}", timeout_s=30) as c:
            assert c.solve(model()).converged
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_solver_serve_refuses_a_bad_environment_value() -> None:
    env = dict(os.environ, SMDP_SOLVER_WORKERS="four")
    proc = subprocess.run([sys.executable, "-m", "solver.service_cli"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)
    assert proc.returncode != 0
    assert "SMDP_SOLVER_WORKERS must be an integer, got 'four'" in proc.stderr


def test_concurrent_identical_requests_solve_once() -> None:
    import threading
    import time

    release = threading.Event()
    calls = []

    def gated_solve(*args, **kwargs):
        calls.append(args[0].rate)
        release.wait(30)
        return solve(*args, **kwargs)

    service = SolverService(solve_fn=gated_solve)
    req = solve_request(model(rate=RATE * 0.7))
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(service.handle(req))) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while service.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert service.waiting == 1 and len(calls) == 1
    release.set()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and sorted(r.cached for r in replies) == [False, True]
    assert replies[0].gain == replies[1].gain


def test_arrival_model_travels_and_keys_the_cache(served, client: SolverClient) -> None:
    from solver.arrival_model import MMPP2, CompoundPoisson

    service, _ = served
    grouped = model(rate=RATE * 0.7).with_(arrivals=CompoundPoisson(3.0))
    plain = client.solve(model(rate=RATE * 0.7))
    remote = client.solve(grouped)
    direct = solve(grouped)
    assert not remote.cached  # a Poisson policy at the same rate and weight does not answer for groups
    assert remote.arrivals == CompoundPoisson(3.0) and plain.arrivals.spec == "poisson"
    assert np.array_equal(remote.policy.actions, direct.policy.actions)
    assert remote.gain == pytest.approx(direct.gain, rel=1e-12)
    assert remote.gain != pytest.approx(plain.gain, rel=1e-6)
    emp = model(rate=RATE * 0.7).with_(arrivals=CompoundPoisson.empirical([0.0, 0.5, 0.0, 0.5]))
    assert client.solve(emp).gain == pytest.approx(solve(emp).gain, rel=1e-12)
    mm = MMPP2((2.0 * RATE * 0.7, 0.0), (1.0, 1.0))
    with pytest.raises(ModelError, match="solver.mmpp"):
        solve_request(model(rate=mm.mean_rate).with_(arrivals=mm))
