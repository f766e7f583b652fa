"""The committed generated code is exactly what the script makes from the committed proto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("smdp/v1/smdp_pb2.py", "smdp/v1/smdp_pb2.pyi", "smdp/v1/smdp_pb2_grpc.py")


def test_generated_code_is_reproducible(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for rel in GENERATED:
        fresh = (tmp_path / rel).read_bytes()
        committed = (ROOT / rel).read_bytes()
        assert fresh == committed, f"{rel} differs from a fresh generation: run scripts/gen_proto.py"


def test_services_and_methods_are_declared() -> None:
    from smdp.v1 import smdp_pb2

    services = smdp_pb2.DESCRIPTOR.services_by_name
    assert set(services) == {"Solver", "Control"}
    assert [m.name for m in services["Solver"].methods] == ["Solve"]
    control = {m.name: m for m in services["Control"].methods}
    assert set(control) == {
        "ListModels", "SetWeight", "SetLatencyTarget", "ClearLatencyTarget", "GetStatus", "GetPolicy", "WatchStatus",
        "SetSlo", "ClearSlo",
    }
    assert control["WatchStatus"].server_streaming and not control["GetStatus"].server_streaming


def test_optional_fields_distinguish_absent_from_zero() -> None:
    from smdp.v1 import smdp_pb2

    reply = smdp_pb2.SolveReply()
    assert not reply.HasField("threshold")
    reply.threshold = 0
    assert reply.HasField("threshold")
    status = smdp_pb2.ModelStatus(latency_target_s=0.01)
    again = smdp_pb2.ModelStatus.FromString(status.SerializeToString())
    assert again.HasField("latency_target_s") and again.latency_target_s == pytest.approx(0.01)
    assert not again.HasField("predicted")


def test_script_refuses_another_grpcio_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "GRPC_TOOLS_VERSION", "0.0.1")
    with pytest.raises(RuntimeError, match="grpcio-tools==0.0.1"):
        module.generate(tmp_path)
    assert not any(tmp_path.iterdir())
