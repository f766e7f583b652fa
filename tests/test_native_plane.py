"""The native data plane: its C++ unit tests, the rule it is sent, and its process's life.

What the gate does with requests is tested on both planes by tests/test_sidecar_integration.py and
tests/test_adaptive_integration.py; here: what only the native plane has.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from plugin.config import SidecarConfig
from plugin.native_plane import (
    CHECK_RULE,
    NativeGateView,
    NativePlane,
    NativePlaneError,
    find_binary,
    policy_fields,
    policy_line,
)
from solver.policy import GroupHold, MaxWaitGuard, PolicyTable, TimeoutRule, greedy, static, threshold

ROOT = Path(__file__).resolve().parents[1]


# -- pure: the rule as the gate receives it ------------------------------------------------------


def fields(line: str) -> dict[str, str]:
    op, model, *rest = line.split()
    assert op == "policy"
    return {"model": model, **dict(f.split("=", 1) for f in rest)}


def test_a_policy_table_is_sent_as_it_is():
    f = fields(policy_line("m", greedy(4), slots=2, max_queue=9, default_priority=2, priority_levels=2,
                           dispatch_priority=1))
    assert f == {"model": "m", "max_batch": "4", "beyond": "4", "table": "0,1,2,3,4", "slots": "2",
                 "max_queue": "9", "default_priority": "2", "priority_levels": "2", "dispatch_priority": "1"}
    assert fields(policy_line("m", threshold(8, 3), slots=1, max_queue=1))["table"] == "0,0,0,3,4,5,6,7,8"
    s = fields(policy_line("m", static(8, 3), slots=1, max_queue=1))
    assert s["beyond"] == "3" and "max_wait_us" not in s  # static stays static beyond its table


def test_tritons_timeout_rule_is_a_guarded_table():
    f = fields(policy_line("m", TimeoutRule(4, 0.0125), slots=1, max_queue=1))
    assert f["table"] == "0,0,0,0,4" and f["beyond"] == "4"
    assert f["max_wait_us"] == "12500" and f["guard_reason"] == "timeout"


def test_a_max_wait_guard_adds_the_tighter_guard():
    table = PolicyTable(np.array([0, 0, 2]), 4)
    f = fields(policy_line("m", MaxWaitGuard(table, 0.5), slots=1, max_queue=1))
    assert f["table"] == "0,0,2" and f["max_wait_us"] == "500000" and f["guard_reason"] == "max_wait"
    f = fields(policy_line("m", MaxWaitGuard(TimeoutRule(4, 0.01), 0.002), slots=1, max_queue=1))
    assert f["max_wait_us"] == "2000" and f["guard_reason"] == "max_wait"
    f = fields(policy_line("m", MaxWaitGuard(TimeoutRule(4, 0.01), 0.5), slots=1, max_queue=1))
    assert f["max_wait_us"] == "10000" and f["guard_reason"] == "timeout"


def test_a_group_hold_travels_in_the_policy_line_with_the_guard():
    f = fields(policy_line("m", GroupHold(MaxWaitGuard(greedy(4), 0.5), 0.0005), slots=1, max_queue=1))
    assert f["table"] == "0,1,2,3,4" and f["max_wait_us"] == "500000" and f["hold_us"] == "500"
    assert "hold_us" not in fields(policy_line("m", greedy(4), slots=1, max_queue=1))


def test_what_the_gate_cannot_run_is_refused_here():
    class Odd:
        max_batch = 4

        def decide(self, n, oldest_wait_s):  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(ValueError, match="cannot run a Odd rule"):
        policy_line("m", Odd(), slots=1, max_queue=1)
    with pytest.raises(ValueError, match="model name"):
        policy_line("two\nlines", greedy(2), slots=1, max_queue=1)


def test_the_view_pushes_every_change_and_counts_what_grew():
    sent: list[str] = []
    view = NativeGateView("m", sent.append, greedy(4), slots=1, max_queue=8)
    view.set_rule(threshold(4, 2))
    view.set_slots(3)
    view.set_priorities(2, 2)
    assert len(sent) == 4 and fields(sent[-1])["slots"] == "3" and fields(sent[-1])["priority_levels"] == "2"
    assert fields(sent[1])["table"] == "0,0,2,3,4"
    grown = view.update({"submitted": 5, "rejected": 2, "expired": 0, "queue": 3, "in_flight": 1})
    assert grown == {"submitted": 5, "rejected": 2, "expired": 0}
    grown = view.update({"submitted": 9, "rejected": 2, "expired": 1, "queue": 0, "in_flight": 0, "held": 6})
    assert grown == {"submitted": 4, "rejected": 0, "expired": 1, "held": 6}
    assert view.counters.decisions_held == 6
    assert view.counters.submitted == 9 and view.queue_length == 0 and view.in_flight == 0


def test_native_runs_the_merged_mode_only():
    with pytest.raises(ValidationError, match="merged mode only"):
        SidecarConfig(data_plane="native", mode="released")
    assert SidecarConfig(data_plane="native").data_plane == "native"


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_a_report_interval_that_is_not_a_positive_duration_is_refused(bad):
    with pytest.raises(ValidationError, match="native_report_interval_s"):
        SidecarConfig(native_report_interval_s=bad)


def test_the_rate_estimator_knows_how_late_the_native_gate_reports_arrivals():
    """On the native plane arrivals reach the controller in reports: its rate estimator is told the lag
    (twice the report interval), so the time since the last report is not read as a silence; the
    Python plane sees each arrival as it comes."""
    from plugin.config import ModelPolicyConfig
    from plugin.loop.controller import ControllerConfig

    pol = ModelPolicyConfig(policy="smdp", profile=ROOT / "profiles" / "v100_resnet50.csv")
    native = SidecarConfig(default=pol, data_plane="native", native_report_interval_s=0.25)
    assert ControllerConfig.of(pol, native, max_batch=8, instances=1).arrival_lag_s == pytest.approx(0.5)
    python = SidecarConfig(default=pol, data_plane="python", native_report_interval_s=0.25)
    assert ControllerConfig.of(pol, python, max_batch=8, instances=1).arrival_lag_s == 0.0
    with pytest.raises(ValueError, match="arrival_lag_s"):
        ControllerConfig(max_batch=8, arrival_lag_s=-1.0)


def test_auto_takes_the_native_gate_where_it_is_found_else_python_and_says_why(monkeypatch, tmp_path):
    import plugin.native_plane as native_plane
    from plugin.native_plane import choose_plane

    assert SidecarConfig().data_plane == "auto"
    gate = tmp_path / "smdp-gate"
    gate.write_text("#!/bin/sh\n")
    gate.chmod(0o755)
    monkeypatch.setenv("SMDP_NATIVE_GATE", str(gate))
    assert choose_plane("auto", "merged").plane == "native"
    released = choose_plane("auto", "released")
    assert released.plane == "python" and "released" in released.reason
    assert choose_plane("python", "merged").plane == "python"
    monkeypatch.setenv("SMDP_NATIVE_GATE", str(tmp_path / "nothing"))
    monkeypatch.setattr(native_plane, "DEFAULT_BINARY", tmp_path / "nothing")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    missing = choose_plane("auto", "merged")
    assert missing.plane == "python" and "make native" in missing.reason
    assert choose_plane("native", "merged").plane == "native"  # explicit: fails at start, not here
    with pytest.raises(ValueError, match="auto, python or native"):
        choose_plane("fast", "merged")


def test_a_missing_binary_says_how_to_build_it(monkeypatch, tmp_path):
    import plugin.native_plane as native_plane

    monkeypatch.setenv("SMDP_NATIVE_GATE", str(tmp_path / "nothing"))
    monkeypatch.setattr(native_plane, "DEFAULT_BINARY", tmp_path / "nothing")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NativePlaneError, match="make native"):
        find_binary()


# -- the C++ core's own unit tests ---------------------------------------------------------------


def test_the_cpp_decision_core_and_merging_pass_their_unit_tests_and_the_shared_vectors(native_gate):
    exe = Path(native_gate).with_name("test_gate_core")
    assert exe.is_file(), f"{exe} missing: make -C native builds it with smdp-gate"
    out = subprocess.run([str(exe), str(ROOT / "tests" / "vectors")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ", 0 failed" in out.stdout and int(out.stdout.split()[0]) > 50


# -- the process ---------------------------------------------------------------------------------


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_bad_command_gets_an_error_naming_it_and_the_gate_keeps_serving(native_gate):
    async def scenario():
        events = []
        plane = await NativePlane.start(listen="127.0.0.1:0", triton_url="127.0.0.1:1", max_queue=4,
                                        on_event=events.append)
        try:
            plane.send("policy m max_batch=4 table=0,2")  # a(1) = 2 > 1
            plane.send("policy m max_batch=4 table=0,1 colour=blue")
            plane.send("frobnicate m")
            plane.send("policy m max_batch=4 table=0,1")
            await plane.sync()
            return list(plane.errors), plane.port
        finally:
            await plane.stop()

    errors, port = run(scenario())
    assert port > 0
    assert any("a(1) = 2" in e for e in errors), errors
    assert any("unknown key 'colour'" in e for e in errors), errors
    assert any("unknown command 'frobnicate'" in e for e in errors), errors
    assert len(errors) == 3


def test_a_long_report_is_handled_in_order_and_lets_the_loop_take_turns():
    """Thousands of buffered lines: each handled once, in order, with other work run in between."""
    n = 3000

    async def scenario():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"import sys; sys.stdout.write(''.join(f'counters m submitted={{i}}\\n' for i in range({n})))",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await proc.wait()  # everything is in the pipe before the first line is read
        seen: list[int] = []
        during: list[int] = []

        def other_work():
            during.append(len(seen))
            if len(seen) < n:
                asyncio.get_running_loop().call_soon(other_work)

        plane = NativePlane(proc, 0, lambda e: seen.append(e.values["submitted"]))
        asyncio.get_running_loop().call_soon(other_work)
        await plane.exited
        return seen, during

    seen, during = run(scenario())
    assert seen == list(range(n))
    assert len([d for d in during if 0 < d < n]) >= n // 256 - 1


def test_an_address_it_cannot_bind_is_a_clear_error(native_gate):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = f"127.0.0.1:{held.getsockname()[1]}"

        async def scenario():
            await NativePlane.start(listen=busy, triton_url="127.0.0.1:1", max_queue=4, on_event=lambda e: None)

        with pytest.raises(NativePlaneError, match="did not start on"):
            run(scenario())


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _serve(triton_url: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "smdp.cli", "serve", "--data-plane", "native", "--listen", "127.0.0.1:0",
         "--triton", triton_url, "--policy", "greedy", "--control-listen", "none", "--metrics-listen", "none",
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
    )
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split("listening on ")[1].split()[0]
    proc.kill()
    raise AssertionError("smdp serve --data-plane native did not start")


@pytest.mark.integration
def test_sigterm_answers_what_is_in_flight_and_leaves_no_gate_behind(native_gate, triton):
    import tritonclient.grpc as tc

    proc, url = _serve(triton.grpc_url)
    gates = [c for c in _children(proc.pid) if "smdp-gate" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(gates) == 1
    client = tc.InferenceServerClient(url)
    x = np.arange(16, dtype=np.float32)[None, :]
    inp = tc.InferInput("INPUT0", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    assert np.array_equal(client.infer("emulated_gpu", [inp]).as_numpy("OUTPUT0"), 2 * x + 1)
    results = []
    for _ in range(8):
        client.async_infer("emulated_gpu", [inp], lambda result, error: results.append(error))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    deadline = time.monotonic() + 10
    while len(results) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    # every request got exactly one answer: a response, or a refusal once the server stopped
    assert len(results) == 8
    assert not _alive(gates[0])


@pytest.mark.integration
def test_the_gate_reports_at_the_configured_interval(native_gate, triton):
    """native_report_interval_s reaches the gate (its default, and a value from the environment)."""

    def interval_ms(env: dict[str, str] | None) -> str:
        proc, _ = _serve(triton.grpc_url, env)
        try:
            gates = [c for c in _children(proc.pid) if "smdp-gate" in Path(f"/proc/{c}/cmdline").read_text()]
            assert len(gates) == 1
            argv = Path(f"/proc/{gates[0]}/cmdline").read_text().split("\0")
            return argv[argv.index("--report-interval-ms") + 1]
        finally:
            proc.terminate()
            proc.wait(20)

    assert float(interval_ms(None)) == SidecarConfig().native_report_interval_s * 1e3
    assert interval_ms({"SMDP_SIDECAR_NATIVE_REPORT_INTERVAL_S": "0.5"}) == "500"


@pytest.mark.integration
def test_a_wake_up_and_the_stop_do_not_wait_for_the_next_report(native_gate, triton):
    """The gate's timer thread sleeps until the next report unless a decision asks for an earlier
    wake-up or the gate stops: with reports 60 s apart, a request the rule holds for 50 ms is served
    by its guard, and the gate stops, both long before the first report would have come."""
    import grpc
    from tritonclient.grpc import service_pb2

    async def scenario():
        plane = await NativePlane.start(listen="127.0.0.1:0", triton_url=triton.grpc_url, max_queue=4,
                                        on_event=lambda e: None, report_interval_ms=60_000)
        try:
            plane.send("policy emulated_gpu max_batch=4 table=0,0,0,0,4 max_wait_us=50000 guard_reason=timeout")
            await plane.sync()
            req = service_pb2.ModelInferRequest(model_name="emulated_gpu")
            req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
            req.raw_input_contents.append(np.ones(16, np.float32).tobytes())
            async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as ch:
                infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                       request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                       response_deserializer=service_pb2.ModelInferResponse.FromString)
                t0 = time.monotonic()
                resp = await infer(req, timeout=20)
                served = time.monotonic() - t0
        finally:
            t1 = time.monotonic()
            await plane.stop()
            stopped = time.monotonic() - t1
        return resp, served, stopped

    resp, served, stopped = run(scenario())
    assert resp.model_name == "emulated_gpu"
    assert 0.05 <= served < 20 and stopped < 20  # neither waited for the report, 60 s away


@pytest.mark.integration
def test_the_gate_exits_when_its_control_plane_is_killed(native_gate, triton):
    proc, _ = _serve(triton.grpc_url)
    gates = [c for c in _children(proc.pid) if "smdp-gate" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(gates) == 1
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up at all: the gate sees its stdin close
    proc.wait(10)
    deadline = time.monotonic() + 15
    while _alive(gates[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(gates[0]), "smdp-gate outlived its control plane"


OLD_GATE = """#!{python}
import sys
print("listening 1", flush=True)
for line in sys.stdin:
    op = line.split()[0]
    if op == "quit":
        break
    print("error " + ("unknown%20command%20'" + op + "'" if {unknown} else "policy:%20unknown%20key%20'hold_us'"),
          flush=True)
"""


@pytest.mark.parametrize("unknown", [True, False])
def test_a_gate_built_from_older_sources_is_refused_at_start_saying_to_rebuild_it(tmp_path, unknown):
    """A gate that does not know a key of the rules this sidecar sends (or the start-up check itself)
    would refuse the first policy that uses it and keep its previous rule: it is refused at start."""
    old = tmp_path / "smdp-gate"
    old.write_text(OLD_GATE.format(python=sys.executable, unknown=unknown))
    old.chmod(0o755)
    with pytest.raises(NativePlaneError, match=r"does not know the rules this sidecar sends .*rebuild it \(make native\)"):
        run(NativePlane.start(listen="127.0.0.1:0", triton_url="127.0.0.1:1", max_queue=4, on_event=lambda e: None,
                              binary=old, start_timeout_s=5.0))


def test_the_start_up_check_rule_carries_every_key_a_rule_can_have():
    assert set(fields("policy m " + policy_fields(CHECK_RULE, 2, 1, 1, 2, 1))) == {
        "model", "max_batch", "beyond", "table", "busy_tables", "max_wait_us", "guard_reason", "hold_us", "slots",
        "max_queue", "default_priority", "priority_levels", "dispatch_priority"}


def test_an_explicit_binary_that_is_not_there_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(NativePlaneError, match="not an executable file"):
        find_binary(tmp_path / "smdp-gate")


def test_serve_says_what_is_missing_instead_of_a_traceback(tmp_path):
    env = {**os.environ, "SMDP_SIDECAR_NATIVE_BINARY": str(tmp_path / "smdp-gate")}
    out = subprocess.run(
        [sys.executable, "-m", "smdp.cli", "serve", "--data-plane", "native", "--listen", "127.0.0.1:0",
         "--triton", "127.0.0.1:1", "--control-listen", "none", "--metrics-listen", "none"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )
    assert out.returncode == 1
    assert "smdp serve: native_binary" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.integration
def test_serve_exits_when_its_gate_dies_so_supervision_restarts_both(native_gate, triton):
    proc, _ = _serve(triton.grpc_url)
    gates = [c for c in _children(proc.pid) if "smdp-gate" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(gates) == 1
    os.kill(gates[0], signal.SIGKILL)
    assert proc.wait(20) == 1  # not left running with nothing on its inference port


@pytest.mark.integration
def test_a_bad_priority_is_refused_by_the_gate_and_counted_as_on_the_python_plane(native_gate, triton):
    import grpc
    from tritonclient.grpc import service_pb2

    from plugin.config import load_config
    from plugin.control_backend import SidecarControl
    from plugin.runner import SidecarThread

    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": None, "metrics_listen": None,
                                 "triton_url": triton.grpc_url, "data_plane": "native",
                                 "default": {"policy": "greedy"}}, environ={})
    sc = SidecarThread(cfg)
    sc.start()
    try:
        req = service_pb2.ModelInferRequest(model_name="emulated_gpu")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
        req.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
        req.parameters["priority"].string_param = "high"
        with grpc.insecure_channel(sc.url) as ch:
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                   response_deserializer=service_pb2.ModelInferResponse.FromString)
            with pytest.raises(grpc.RpcError) as info:
                infer(req, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "expected int64_param or uint64_param" in info.value.details()
            del req.parameters["priority"]
            assert infer(req, timeout=10).model_name == "emulated_gpu"  # the next one is served
        sc.run(sc.sidecar.plane.sync(), 10)
        status = sc.call(lambda: SidecarControl(sc.sidecar.registry).status("emulated_gpu"))
        assert status.rejected_invalid == 1 and status.completed >= 1
    finally:
        sc.stop()


@pytest.mark.integration
def test_one_stream_carries_gated_requests_and_a_decoupled_models_responses(native_gate, tmp_path, triton_factory):
    """On one ModelStreamInfer: requests for a gated model go through the gate (and are answered
    in-band), requests for a decoupled model are relayed to Triton on an upstream stream with every
    response it sends."""
    import shutil

    import tritonclient.grpc as tc

    from test_sidecar_integration import stream_all
    from test_sidecar_robustness import _DECOUPLED_CONFIG, _DECOUPLED_MODEL, _sidecar

    model = tmp_path / "decoupled_echo"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(_DECOUPLED_MODEL)
    (model / "config.pbtxt").write_text(_DECOUPLED_CONFIG)
    shutil.copytree(ROOT / "model_repository" / "emulated_gpu", tmp_path / "emulated_gpu",
                    ignore=shutil.ignore_patterns("__pycache__"))
    server = triton_factory(repository=tmp_path, models=("decoupled_echo", "emulated_gpu"))
    sc = _sidecar(server.grpc_url, data_plane="native")
    try:
        def ask(n: int) -> list[tc.InferInput]:
            inp = tc.InferInput("IN", [1, 1], "INT32")
            inp.set_data_from_numpy(np.array([[n]], dtype=np.int32))
            return [inp]

        def emu(seed: int) -> tuple[np.ndarray, list[tc.InferInput]]:
            x = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
            inp = tc.InferInput("INPUT0", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            return x, [inp]

        sent = {f"e{i}": emu(i) for i in range(3)}
        sends = [("decoupled_echo", ask(3), "three"), *(("emulated_gpu", inputs, rid) for rid, (_, inputs) in sent.items()),
                 ("decoupled_echo", ask(2), "two")]
        got = stream_all(sc.url, sends, 8, timeout=60)
        assert [e for _, e in got if e is not None] == []
        echoes = sorted((r.get_response().id, int(r.as_numpy("OUT")[0, 0]))
                        for r, _ in got if r.get_response().model_name == "decoupled_echo")
        assert echoes == [("three", 0), ("three", 1), ("three", 2), ("two", 0), ("two", 1)]
        gated = {r.get_response().id: r for r, _ in got if r.get_response().model_name == "emulated_gpu"}
        assert set(gated) == set(sent)
        for key, (x, _) in sent.items():
            np.testing.assert_array_equal(gated[key].as_numpy("OUTPUT0"), 2 * x + 1)
        sc.run(sc.sidecar.plane.sync(), 10)
        assert sc.sidecar.registry.models()[("emulated_gpu", "")].gate.counters.submitted == 3
    finally:
        sc.stop()
