"""The embedded Triton launcher: configuration checks, clear errors, and a lifecycle that never
leaves a process behind (stop, restart on the same ports, crash, interpreter exit, killed parent)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from plugin.launcher.triton_server import (
    DEFAULT_REPOSITORY,
    EmbeddedTriton,
    TritonConfig,
    TritonStartError,
    TritonUnavailable,
    free_port,
    glibc_version,
    locate_triton,
    prepare_backends,
)

ROOT = Path(__file__).resolve().parent.parent


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def wait_gone(pgid: int, timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def mlp_ok(url: str) -> bool:
    """One cpu_mlp inference through a fresh unmodified client."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url=url) as client:
        return infer_mlp(client)


def infer_mlp(client) -> bool:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("INPUT0", [2, 256], "FP32")
    inp.set_data_from_numpy(np.ones((2, 256), np.float32))
    return client.infer("cpu_mlp", [inp], client_timeout=30).as_numpy("OUTPUT0").shape == (2, 16)


# --------------------------------------------------------------------------------------------------
# Configuration and errors (no server)


def test_config_defaults_point_at_the_projects_repository() -> None:
    config = TritonConfig()
    assert config.repository == ROOT / "model_repository"
    assert config.models == ("emulated_gpu", "cpu_mlp")
    assert config.address == "127.0.0.1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grpc_port": -1}, "grpc_port must be an integer in 0..65535"),
        ({"http_port": 70000}, "http_port"),
        ({"grpc_port": 9000, "http_port": 9000}, "must differ"),
        ({"models": ()}, "at least one model"),
        ({"models": ("no_such_model",)}, "no_such_model"),
        ({"repository": Path("/nonexistent/repo")}, "not a directory: /nonexistent/repo"),
        ({"startup_timeout_s": 0}, "startup_timeout_s must be > 0"),
    ],
)
def test_config_rejects_bad_values_naming_them(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TritonConfig(**fields)


def test_a_single_model_name_is_accepted_as_a_string() -> None:
    assert TritonConfig(models="cpu_mlp").models == ("cpu_mlp",)


def test_ports_are_unknown_before_start() -> None:
    server = EmbeddedTriton(models=("cpu_mlp",))
    with pytest.raises(RuntimeError, match="not been started"):
        _ = server.grpc_url
    assert not server.is_running()
    server.stop()  # stopping a server that never ran is harmless


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_glibc_is_new_enough_on_this_linux_host() -> None:
    version = glibc_version()
    if version is None:
        pytest.skip("not a glibc system")
    assert version >= (2, 17)


def test_missing_binary_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TritonUnavailable, match=f"tritonserver binary not found: {tmp_path}/bin/tritonserver"):
        locate_triton(tmp_path / "bin" / "tritonserver")


def test_missing_binary_surfaces_from_start(tmp_path: Path) -> None:
    server = EmbeddedTriton(models=("cpu_mlp",), binary=tmp_path / "tritonserver")
    with pytest.raises(TritonUnavailable, match="not found"):
        server.start()
    assert not server.is_running()


def fake_triton(tmp_path: Path, script: str, stub: bool = True) -> Path:
    """A directory laid out like /opt/tritonserver whose 'binary' is a shell script."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "backends" / "python").mkdir(parents=True)
    (tmp_path / "backends" / "python" / "libtriton_python.so").write_bytes(b"")
    if stub:
        (tmp_path / "backends" / "python" / "triton_python_backend_stub").write_bytes(b"")
    binary = tmp_path / "bin" / "tritonserver"
    binary.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_non_executable_binary_is_named(tmp_path: Path) -> None:
    binary = fake_triton(tmp_path, "exit 0\n")
    binary.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(TritonUnavailable, match="not executable"):
        locate_triton(binary)


def test_missing_python_stub_is_named(tmp_path: Path) -> None:
    binary = fake_triton(tmp_path, "exit 0\n", stub=False)
    with pytest.raises(TritonUnavailable, match="stub not found"):
        locate_triton(binary)


def test_server_dying_at_start_reports_exit_code_and_log_tail(tmp_path: Path) -> None:
    binary = fake_triton(tmp_path, 'echo "E0101 model load failed: something specific" >&2\nexit 3\n')
    server = EmbeddedTriton(models=("cpu_mlp",), binary=binary, log_file=tmp_path / "log.txt")
    with pytest.raises(TritonStartError, match=r"(?s)exited with code 3.*something specific"):
        server.start()
    assert not server.is_running()


def test_unloadable_shared_library_is_named(tmp_path: Path) -> None:
    binary = fake_triton(
        tmp_path,
        'echo "tritonserver: error while loading shared libraries: libfoo.so.7: cannot open shared object file" >&2\n'
        "exit 127\n",
    )
    with pytest.raises(TritonUnavailable, match="libfoo.so.7"):
        EmbeddedTriton(models=("cpu_mlp",), binary=binary, log_file=tmp_path / "log.txt").start()


def test_port_taken_is_retried_then_reported(tmp_path: Path) -> None:
    binary = fake_triton(
        tmp_path,
        """echo "E0101 main.cc:245] \\"failed to start GRPC service: Unavailable - Socket '127.0.0.1:1' already in use \\""\nexit 1\n""",
    )
    server = EmbeddedTriton(models=("cpu_mlp",), binary=binary, log_file=tmp_path / "log.txt", bind_retries=1)
    with pytest.raises(TritonStartError, match="could not bind its GRPC port.*gave up after 2 attempts"):
        server.start()
    assert (tmp_path / "log.txt").read_text().count("=== smdp: starting") == 2


def test_server_never_ready_times_out_and_is_killed(tmp_path: Path) -> None:
    # exec: the 'server' is the sleeping process itself, as tritonserver would be.
    binary = fake_triton(tmp_path, f"echo $$ > {tmp_path}/pid\necho still loading\nexec sleep 60\n")
    server = EmbeddedTriton(
        models=("cpu_mlp",), binary=binary, log_file=tmp_path / "log.txt", startup_timeout_s=1.0, stop_timeout_s=2.0
    )
    with pytest.raises(TritonStartError, match=r"(?s)not ready within 1 s.*still loading"):
        server.start()
    assert not server.is_running()
    assert wait_gone(int((tmp_path / "pid").read_text())) == []
    log = (tmp_path / "log.txt").read_text()
    assert "--model-control-mode=explicit" in log and "--load-model=cpu_mlp" in log
    assert "--grpc-address=127.0.0.1" in log and "--http-address=127.0.0.1" in log


def test_smdp_triton_help_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "smdp.cli", "triton", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--repository", "--models", "--grpc-port", "--http-port", "--metrics-port"):
        assert flag in out.stdout


def test_smdp_triton_rejects_a_bad_model_list() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "smdp.cli", "triton", "--models", "nope"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 2
    assert "nope" in out.stderr


# --------------------------------------------------------------------------------------------------
# Real server lifecycle


def test_workspace_is_prepared_once_with_the_stub_for_this_python(triton_runnable, tmp_path: Path) -> None:
    dist = locate_triton()
    first = prepare_backends(dist, cache_root=tmp_path)
    stub = first / "python" / "triton_python_backend_stub"
    assert stub.is_file() and (first / "python" / "libtriton_python.so").is_file()
    assert stub.read_bytes() == dist.stub.read_bytes()
    mtime = stub.stat().st_mtime_ns
    assert prepare_backends(dist, cache_root=tmp_path) == first
    assert stub.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / dist.version_key).iterdir()] == ["backends"]


@pytest.mark.integration
def test_session_server_exposes_its_endpoints(triton) -> None:
    import tritonclient.grpc as grpcclient

    assert triton.is_running()
    assert triton.grpc_url == f"127.0.0.1:{triton.grpc_port}"
    assert len({triton.grpc_port, triton.http_port, triton.metrics_port}) == 3
    with grpcclient.InferenceServerClient(url=triton.grpc_url) as client:
        assert client.is_server_ready()
        assert {m["name"] for m in client.get_model_repository_index(as_json=True)["models"] if m.get("state") == "READY"} \
            == {"emulated_gpu", "cpu_mlp"}
    import urllib.request

    with urllib.request.urlopen(triton.metrics_url, timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()
    with urllib.request.urlopen(f"http://{triton.http_url}/v2/health/live", timeout=10) as r:
        assert r.status == 200


@pytest.mark.integration
@pytest.mark.slow
def test_stop_restart_and_crash_keep_ports_and_leave_no_process(triton_factory) -> None:
    import tritonclient.grpc as grpcclient

    server = triton_factory(models=("cpu_mlp",))
    ports = (server.grpc_port, server.http_port, server.metrics_port)
    pgid = server.pid
    assert len(group_members(pgid)) >= 2, "expected tritonserver and its Python-backend stub"
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        assert infer_mlp(client)

        server.restart()  # graceful: same ports, fresh process
        assert wait_gone(pgid) == []
        assert (server.grpc_port, server.http_port, server.metrics_port) == ports
        assert server.pid != pgid
        assert infer_mlp(client), "the old client's channel should reconnect to the restarted server"

        crashed = server.pid
        server.kill()  # Triton goes away abruptly
        assert wait_gone(crashed) == []
        assert _unreachable(client)
        server.restart()
        assert (server.grpc_port, server.http_port, server.metrics_port) == ports
        # The old channel saw the crash and is in reconnect backoff, and gRPC shares that
        # subchannel with any new channel to the same address in this process: RPCs fail fast
        # until it reconnects by itself (behaviour a client must live with), which it must do.
        assert eventually(lambda: infer_mlp(client), timeout_s=20)
        assert mlp_ok(server.grpc_url)
    finally:
        client.close()
    last = server.pid
    server.stop()
    assert not server.is_running()
    assert wait_gone(last) == []
    # The crash left the Python backend's shared-memory regions behind; stop() removed them.
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*")) == []
    server.stop()  # idempotent


def eventually(attempt, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if attempt():
                return True
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _unreachable(client) -> bool:
    """True when the server is unreachable (the client raises or says not live)."""
    try:
        return not client.is_server_live(client_timeout=2)
    except Exception:
        return True


@pytest.mark.integration
def test_context_manager_stops_the_server(triton_factory) -> None:
    server = triton_factory(start=False, models=("cpu_mlp",), grpc_port=free_port())
    with server as running:
        assert running is server and server.is_running()
        pgid = server.pid
        assert mlp_ok(server.grpc_url)
    assert not server.is_running()
    assert wait_gone(pgid) == []


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from plugin.launcher.triton_server import EmbeddedTriton
server = EmbeddedTriton(models=("cpu_mlp",)).start()
print(server.pid, server.grpc_url, flush=True)
if {hang}:
    time.sleep(600)
# no stop(): the interpreter's exit must take Triton down
"""


def run_child(hang: bool) -> tuple[subprocess.Popen, int, str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), hang=hang)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    if not line:
        child.wait(timeout=30)
        pytest.fail(f"child did not start Triton: {child.stderr.read()}")
    pid, url = line.split()
    return child, int(pid), url


@pytest.mark.integration
@pytest.mark.slow
def test_interpreter_exit_stops_triton() -> None:
    child, pid, url = run_child(hang=False)
    assert child.wait(timeout=60) == 0, child.stderr.read()
    assert wait_gone(pid) == []


@pytest.mark.integration
@pytest.mark.slow
def test_killed_parent_takes_triton_down(triton_runnable) -> None:
    child, pid, url = run_child(hang=True)
    try:
        assert mlp_ok(url)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert wait_gone(pid) == [], "tritonserver outlived its SIGKILLed parent"
    finally:
        if child.poll() is None:
            child.kill()
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.integration
@pytest.mark.slow
def test_smdp_triton_runs_in_the_foreground_and_stops_on_sigterm(triton_runnable) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "smdp.cli", "triton", "--models", "cpu_mlp",
         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        lines = []
        while not any(line.strip().startswith("grpc:") for line in lines):
            line = proc.stdout.readline()
            assert line, f"smdp triton ended early: {proc.stderr.read()}"
            lines.append(line)
        pid = int(lines[0].split("pid ")[1].split(")")[0])
        url = next(line.split()[1] for line in lines if line.strip().startswith("grpc:"))
        assert mlp_ok(url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert wait_gone(pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
