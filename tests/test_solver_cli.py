"""`smdp solve | simulate | compare`: the JSON contract, every policy spec, and clean failures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smdp.cli import main
from solver.cli import _compress_ints, _ranges

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "v100_resnet50.csv"
TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_conv_2023.csv"
SOLVE_KEYS = {"policy", "gain", "mean_latency_s", "mean_power_w", "throughput_rps", "mean_batch", "iterations",
              "converged", "solve_time_s", "truncation"}
SIM_KEYS = {"mean_latency_s", "p50_latency_s", "p95_latency_s", "p99_latency_s", "latency_ci95_s", "mean_power_w",
            "cost", "throughput_rps", "mean_batch", "batch_hist", "n_requests", "n_batches", "horizon_s"}
BASE = ["--profile", str(PROFILE), "--max-batch", "32", "--idle-power", "40"]


def _needs_solver():
    pytest.importorskip("solver.smdp", reason="the SMDP solver is not available yet")
    pytest.importorskip("solver.evaluate", reason="exact evaluation is not available yet")


def _run_json(capsys, argv: list[str]) -> dict:
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_solve_json_contract_and_consistency(capsys):
    _needs_solver()
    from solver.evaluate import evaluate
    from solver.model import BatchingModel, ServiceProfile
    from solver.policy import PolicyTable

    d = _run_json(capsys, ["solve", *BASE, "--rate", "1500", "--weight", "1e-5", "--json"])
    assert SOLVE_KEYS <= d.keys()
    pol = d["policy"]
    assert len(pol) == d["truncation"] + 1
    assert all(0 <= a <= min(n, 32) for n, a in enumerate(pol))
    assert d["converged"] is True
    assert d["gain"] == pytest.approx(d["mean_latency_s"] + 1e-5 * d["mean_power_w"], rel=1e-9)
    # The printed policy, evaluated independently, has the printed gain.
    model = BatchingModel(1500.0, 32, ServiceProfile.from_csv(PROFILE, max_batch=32), 40.0, 1e-5)
    ev = evaluate(model, PolicyTable(np.array(pol), 32))
    assert ev.cost == pytest.approx(d["gain"], rel=1e-6)
    assert d["throughput_rps"] == pytest.approx(1500.0, rel=1e-3)
    # Both solvers agree through the CLI.
    r = _run_json(capsys, ["solve", *BASE, "--rate", "1500", "--weight", "1e-5", "--method", "rvi", "--json"])
    assert r["gain"] == pytest.approx(d["gain"], rel=1e-5)


def test_solve_readable_summary(capsys):
    _needs_solver()
    assert main(["solve", *BASE, "--rate", "1000", "--weight", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "predicted W =" in out and " ms" in out and "J = W + w P" in out
    assert "interpolated batch sizes" in out and "3, 5-7, 9-32" in out  # the V100 table gives 1, 2, 4, 8, 64, 128
    assert "n = 0" in out


def test_ranges_and_int_compression():
    assert _ranges([0, 0, 0, 3, 4, 4, 4], 4) == [
        "n = 0..2: wait",
        "n = 3..6: serve all waiting, min(n, B)",
        "n > 6: serve min(n, B) = 4 (beyond the table)",
    ]
    assert _ranges([0, 1, 1, 3], 8)[1:3] == ["n = 1: serve all waiting, min(n, B)", "n = 2: serve 1"]
    assert _ranges([0, 1, 1, 2, 2, 5], 8)[1:4] == [
        "n = 1: serve all waiting, min(n, B)",
        "n = 2..4: serve part of the queue, a(n) from 1 to 2",
        "n = 5: serve all waiting, min(n, B)",
    ]
    assert _compress_ints([3, 5, 6, 7, 9]) == "3, 5-7, 9"


@pytest.mark.parametrize("spec", ["greedy", "static:8", "threshold:4", "timeout:0.001", "timeout:0", "smdp"])
def test_simulate_each_policy(capsys, spec):
    if spec in ("smdp", "greedy", "static:8", "threshold:4"):
        _needs_solver()
    d = _run_json(capsys, ["simulate", *BASE, "--rate", "1200", "--weight", "1e-5", "--policy", spec,
                           "--requests", "40000", "--seed", "3", "--json"])
    assert SIM_KEYS <= d.keys()
    assert d["n_requests"] == 40000
    assert sum(b * c for b, c in enumerate(d["batch_hist"], 1)) == 40000
    assert d["cost"] == pytest.approx(d["mean_latency_s"] + 1e-5 * d["mean_power_w"])
    assert d["p50_latency_s"] <= d["p99_latency_s"]
    if spec.startswith("static"):
        assert set(np.nonzero(d["batch_hist"])[0] + 1) <= {8, *range(1, 8)}  # b0, and one drain batch
        assert sum(d["batch_hist"][:7]) <= 1
    if d["predicted"] is not None:  # table policies: the simulation agrees with the exact evaluation
        p = d["predicted"]
        assert abs(d["mean_latency_s"] - p["mean_latency_s"]) <= 4 * d["latency_ci95_s"]


def test_simulate_trace_arrivals(capsys):
    if not TRACE.exists():
        pytest.skip("shared traces not present")
    d = _run_json(capsys, ["simulate", *BASE, "--rate", "1000", "--policy", "timeout:0.002", "--arrivals",
                           f"trace:{TRACE}", "--trace-rate", "800", "--requests", "5000", "--json"])
    assert d["n_requests"] == 5000
    assert d["offered_rate_rps"] == pytest.approx(800.0, rel=1e-9)
    d2 = _run_json(capsys, ["simulate", *BASE, "--rate", "1000", "--policy", "timeout:0", "--arrivals",
                            f"trace:{TRACE}", "--time-scale", "100", "--requests", "5000", "--json"])
    assert d2["n_requests"] == 5000
    d3 = _run_json(capsys, ["simulate", *BASE, "--rate", "1000", "--policy", "timeout:0", "--arrivals",
                            f"trace:{TRACE}", "--requests", "5000", "--json"])
    assert d3["offered_rate_rps"] == pytest.approx(1000.0, rel=1e-9)  # default: rescaled to --rate


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", *BASE, "--rate", "-5", "--policy", "greedy"], "arrival rate"),
        (["simulate", *BASE, "--rate", "1e6", "--policy", "greedy"], "capacity"),
        (["simulate", *BASE, "--rate", "100", "--weight", "nan", "--policy", "greedy"], "weight"),
        (["simulate", *BASE, "--rate", "100", "--policy", "fastest"], "unknown policy"),
        (["simulate", *BASE, "--rate", "100", "--policy", "static:99"], "static"),
        (["simulate", *BASE, "--rate", "100", "--policy", "timeout:-1"], "timeout"),
        (["simulate", *BASE, "--rate", "100", "--policy", "greedy", "--arrivals", "uniform"], "unknown arrivals"),
        (["simulate", *BASE, "--rate", "100", "--policy", "greedy", "--arrivals", "trace:/no/such.csv"], "cannot read"),
        (["simulate", "--profile", "/no/such.csv", "--rate", "100", "--policy", "greedy"], "cannot read profile"),
        (["simulate", *BASE, "--rate", "100", "--policy", "greedy", "--requests", "0"], "requests"),
        (["solve", *BASE, "--rate", "-1"], "arrival rate"),
        (["solve", *BASE, "--rate", "1e6"], "capacity"),
        (["solve", *BASE, "--rate", "100", "--weight", "nan"], "weight"),
        (["compare", *BASE, "--loads", "1.5", "--out", "/tmp/never"], "load"),
        (["compare", *BASE, "--weights", "x", "--out", "/tmp/never"], "weights"),
    ],
)
def test_bad_input_exits_2_with_message(capsys, argv, message):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err


def test_bad_input_in_a_real_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "smdp.cli", "simulate", *BASE, "--rate", "1e6", "--policy", "greedy"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "capacity" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_tiny_sweep_writes_table_and_plot(tmp_path, capsys):
    _needs_solver()
    out = tmp_path / "cmp"
    rc = main(["compare", *BASE, "--loads", "0.3,0.7", "--weights", "0,1e-4", "--requests", "4000",
               "--timeouts", "0.001,0.004", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    for name in ("compare.txt", "compare.csv", "compare.json", "compare.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best static" in text and "best timeout" in text and "timeout 1ms" in text
    rows = list(csv.DictReader((out / "compare.csv").open()))
    contenders = {"smdp", "greedy", "best static", "timeout 1ms", "timeout 4ms", "best timeout"}
    assert {r["contender"] for r in rows} == contenders
    assert len(rows) == 4 * len(contenders)
    for load in ("0.3", "0.7"):
        for w in ("0.0", "0.0001"):
            pt = {r["contender"]: r for r in rows if r["load"] == load and r["weight"] == w}
            # The SMDP policy is optimal among stationary queue-length policies: its predicted J is no
            # worse than greedy's or the best static batch's.
            j = float(pt["smdp"]["pred_cost"])
            assert j <= float(pt["greedy"]["pred_cost"]) * (1 + 1e-6)
            assert j <= float(pt["best static"]["pred_cost"]) * (1 + 1e-6)
            assert float(pt["greedy"]["gain_pred"]) >= -1e-6
            assert pt["timeout 1ms"]["pred_cost"] in ("", "nan")
    data = json.loads((out / "compare.json").read_text())
    assert len(data["points"]) == 4
    assert data["interpolated"] == [3, 5, 6, 7] + list(range(9, 33))
    assert "interpolated batch sizes (not in the profile): 3, 5-7, 9-32" in text


def test_threshold_above_max_batch_is_simulated_and_evaluated(capsys):
    d = _run_json(capsys, ["simulate", *BASE, "--rate", "2000", "--policy", "threshold:48", "--requests", "20000",
                           "--json"])
    assert d["batch_hist"][31] >= sum(d["batch_hist"]) - 1  # waits for 48, serves full batches of 32
    assert "error" not in d["predicted"] and d["predicted"]["mean_batch"] == pytest.approx(32, rel=1e-9)


def test_simulate_reports_interpolated_sizes_and_the_prediction_basis(capsys):
    d = _run_json(capsys, ["simulate", *BASE, "--rate", "1000", "--policy", "greedy", "--requests", "2000", "--json"])
    assert d["interpolated_batch_sizes"] == [3, 5, 6, 7] + list(range(9, 33))
    assert d["predicted"]["basis"].startswith("Poisson arrivals at --rate 1000")
    assert d["warnings"] == []
    assert main(["simulate", *BASE, "--rate", "1000", "--policy", "greedy", "--requests", "2000"]) == 0
    text = capsys.readouterr().out
    assert "interpolated batch sizes (not in the profile): 3, 5-7, 9-32" in text
    assert "predicted (exact evaluation, Poisson arrivals at --rate 1000 req/s)" in text


def test_simulate_trace_at_its_own_time_scale_warns_about_the_prediction(capsys):
    if not TRACE.exists():
        pytest.skip("shared traces not present")
    assert main(["simulate", *BASE, "--rate", "1000", "--policy", "greedy", "--arrivals",
                 f"trace:{TRACE}", "--time-scale", "100", "--requests", "5000", "--json"]) == 0
    cap = capsys.readouterr()
    d, err = json.loads(cap.out), cap.err
    offered = d["offered_rate_rps"]
    assert abs(offered - 1000) > 100, "the test needs a trace rate away from --rate"
    assert any("predicted figures are for Poisson arrivals at --rate 1000" in w for w in d["warnings"])
    assert "warning" in err
    d2 = _run_json(capsys, ["simulate", *BASE, "--rate", "1000", "--policy", "greedy", "--arrivals",
                            f"trace:{TRACE}", "--requests", "5000", "--json"])
    assert d2["warnings"] == []  # rescaled to --rate


def test_samples_and_busy_power_profiles_on_the_command_line(tmp_path, capsys):
    prof = tmp_path / "p.csv"
    prof.write_text("batch_size,mean_service_s,busy_power_w\n1,0.002,100\n4,0.005,160\n")
    rng = np.random.default_rng(0)
    samples = tmp_path / "s.csv"
    with samples.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["batch_size", "service_s"])
        for b, mean in ((1, 0.002), (2, 0.003), (4, 0.006)):
            for x in rng.gamma(4.0, mean / 4.0, 200):
                w.writerow([b, x])
    base = ["--profile", str(prof), "--max-batch", "4", "--idle-power", "30"]
    d = _run_json(capsys, ["solve", *base, "--rate", "300", "--samples", str(samples), "--json"])
    assert d["service_law"] == "empirical" and d["samples"] == str(samples)
    assert d["interpolated_batch_sizes"] == [2, 3]  # 2 is sampled but not in the profile; 3 in neither
    # capacity from the samples' mean at 4 (about 6 ms), not from the profile's 5 ms
    assert d["capacity_rps"] < 4 / 0.0055
    s = _run_json(capsys, ["simulate", *base, "--rate", "300", "--samples", str(samples), "--policy", "greedy",
                           "--requests", "50000", "--json"])
    assert abs(s["mean_power_w"] - s["predicted"]["mean_power_w"]) <= 4 * s["power_ci95_w"]
    assert main(["solve", *base, "--rate", "300", "--samples", str(tmp_path / "absent.csv")]) == 2
    assert "cannot read samples" in capsys.readouterr().err
