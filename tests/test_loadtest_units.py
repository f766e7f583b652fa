"""Pure logic of the load-testing part: arrival specs, metrics from per-request records, contenders."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from loadtest.arrival_spec import parse_arrivals
from loadtest.contenders import Contender, parse_contender, predict
from loadtest.metrics import batch_histogram, measure, power_note
from loadtest.openloop import LoadError, OpenLoopResult, RequestFactory, InputSpec
from loadtest.stack import scaled_profile, write_profile_csv
from solver.model import BatchingModel, ServiceProfile
from solver.policy import TRITON_CATCH_SHARE

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "AzureLLMInferenceTrace_code_2023.csv"
V100 = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"


# --- arrival specs --------------------------------------------------------------------------------

def test_poisson_counts_pass_dispersion_test():
    """Counts per window of a Poisson stream: mean = variance (chi-square dispersion test)."""
    rate, window, k = 200.0, 0.1, 400
    t = parse_arrivals("poisson", rate=rate).times(window * k, seed=3)
    counts = np.histogram(t, bins=np.arange(k + 1) * window)[0]
    assert abs(counts.mean() - rate * window) < 4 * math.sqrt(rate * window / k)
    d = ((counts - counts.mean()) ** 2).sum() / counts.mean()  # ~ chi2(k - 1) under Poisson
    assert stats.chi2.ppf(0.001, k - 1) < d < stats.chi2.ppf(0.999, k - 1)


def _write_trace(path: Path, gaps_s: np.ndarray) -> Path:
    """A trace in the Azure format with the given inter-arrival gaps (100 ns resolution)."""
    start = np.datetime64("2023-11-16T18:17:03.0000000", "ns")
    stamps = start + np.concatenate(([0], np.cumsum(np.round(gaps_s * 1e7).astype(np.int64) * 100)))
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [str(s).replace("T", " ") + ",10,10" for s in stamps]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_trace_replay_keeps_interarrivals_up_to_the_scale(tmp_path, scale):
    gaps = np.round(np.random.default_rng(1).exponential(0.05, 300), 7)
    trace = _write_trace(tmp_path / "t.csv", gaps)
    t = parse_arrivals(f"trace:{trace}", time_scale=scale).times(gaps.sum() / scale + 1.0)
    assert t.size == 301 and t[0] == 0.0
    np.testing.assert_allclose(np.diff(t) * scale, gaps, rtol=0, atol=1e-9)


def test_trace_replay_to_a_target_rate(tmp_path):
    trace = _write_trace(tmp_path / "t.csv", np.random.default_rng(2).exponential(0.3, 200))
    t = parse_arrivals(f"trace:{trace}", trace_rate=100.0).times(1e9)
    assert (t.size - 1) / t[-1] == pytest.approx(100.0, rel=1e-9)


@pytest.mark.skipif(not TRACE.is_file(), reason="shared trace not present")
def test_real_trace_cut_at_the_duration():
    t = parse_arrivals(f"trace:{TRACE}", time_scale=10.0).times(5.0)
    assert t.size > 10 and t[-1] < 5.0 and np.all(np.diff(t) >= 0)


def test_steps_repeat_to_fill_the_duration():
    t = parse_arrivals("steps:1x0,1x500").times(10.0, seed=1)
    second = np.floor(t).astype(int)
    assert np.all(second % 2 == 1)  # the rate-0 seconds are silent
    assert abs(t.size - 2500) < 5 * math.sqrt(2500)


@pytest.mark.parametrize("spec, message", [
    ("poisson", "rate"),
    ("steps:10", "DURATIONxRATE"),
    ("steps:0x5", "duration must be > 0"),
    ("ramp:1", "ramp:START_RATE:END_RATE"),
    ("trace:/nonexistent.csv", "not found"),
    ("uniform", "unknown arrival process"),
])
def test_bad_arrival_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_arrivals(spec)


# --- metrics --------------------------------------------------------------------------------------

def _result(scheduled, done, sizes, energies, status=None):
    n = len(scheduled)
    return OpenLoopResult(
        scheduled_s=np.asarray(scheduled, float), sent_s=np.asarray(scheduled, float) + 1e-4,
        done_s=np.asarray(done, float), status=tuple(status or ["OK"] * n),
        batch_size=np.asarray(sizes, np.int64), batch_energy_j=np.asarray(energies, float),
    )


def test_power_counts_each_batch_once_and_idle_at_p0():
    """Two batches (3 requests, then 1) in a 10 s window: energy e(3) + e(1), busy tau(3) + tau(1)."""
    prof = ServiceProfile.from_table([1, 2, 3], [0.1, 0.15, 0.2], [10.0, 14.0, 18.0])
    res = _result([0.0, 0.01, 0.02, 5.0], [0.22, 0.22, 0.22, 5.1], [3, 3, 3, 1], [18.0, 18.0, 18.0, 10.0])
    m = measure(res, prof, idle_power_w=40.0, weight=0.01, window=(0.0, 10.0))
    expected_p = (18.0 + 10.0 + 40.0 * (10.0 - 0.2 - 0.1)) / 10.0
    assert m.mean_power_w == pytest.approx(expected_p)
    assert m.mean_batch == pytest.approx(2.0)  # 4 requests in 2 batches
    lat = np.array([0.22, 0.21, 0.20, 0.1])
    assert m.mean_latency_s == pytest.approx(lat.mean())
    assert m.cost == pytest.approx(lat.mean() + 0.01 * expected_p)
    assert m.throughput_rps == pytest.approx(0.4)
    np.testing.assert_allclose(batch_histogram(res, 3, (0.0, 10.0)), [1.0, 0.0, 1.0])


def test_energy_scale_multiplies_the_reported_energy():
    prof = ServiceProfile.from_table([1], [0.1], [10.0])
    res = _result([0.0], [0.1], [1], [10.0])
    a = measure(res, prof, idle_power_w=0.0, weight=0.0, window=(0.0, 1.0))
    b = measure(res, prof, idle_power_w=0.0, weight=0.0, window=(0.0, 1.0), energy_scale=3.0)
    assert b.mean_power_w == pytest.approx(3 * a.mean_power_w) and a.mean_power_w == pytest.approx(10.0)


def test_window_counts_only_requests_scheduled_in_it_and_failures():
    prof = ServiceProfile.from_table([1], [0.1], [1.0])
    res = _result([0.5, 1.5, 2.5, 3.5], [0.6, 1.6, math.nan, 3.6], [1, 1, 0, 1], [1.0, 1.0, math.nan, 1.0],
                  status=["OK", "OK", "UNAVAILABLE", "OK"])
    m = measure(res, prof, idle_power_w=40.0, weight=0.0, window=(1.0, 3.0))
    assert (m.requests, m.ok, m.failed) == (2, 1, 1)
    assert m.mean_latency_s == pytest.approx(0.1)
    assert res.failures() == {"UNAVAILABLE": 1}


def test_metrics_reject_inconsistent_records():
    prof = ServiceProfile.from_table([1, 2], [0.1, 0.2], [1.0, 2.0])
    with pytest.raises(LoadError, match="batch size 5"):
        measure(_result([0.0], [0.1], [5], [1.0]), prof, idle_power_w=40.0, weight=0.0)
    with pytest.raises(LoadError, match="BATCH_ENERGY_J"):
        measure(_result([0.0], [0.1], [1], [math.nan]), prof, idle_power_w=40.0, weight=0.0)
    with pytest.raises(LoadError, match="one entry per request"):
        OpenLoopResult(np.zeros(2), np.zeros(1), np.zeros(2), ("OK", "OK"), np.zeros(2), np.zeros(2))


def test_power_note_names_profile_and_idle_power():
    assert power_note("v100_resnet50", 40.0) == "power modelled from the v100_resnet50 profile, idle P0 = 40 W assumed"


# --- requests, profiles, contenders ---------------------------------------------------------------

def test_request_factory_gives_each_request_its_id_and_contents():
    from tritonclient.grpc import service_pb2

    f = RequestFactory("emulated_gpu", [InputSpec("INPUT0", "FP32", (16,))])
    a, b = (service_pb2.ModelInferRequest.FromString(f.build(i)) for i in (3, 4))
    assert (a.id, b.id) == ("3", "4") and list(a.inputs[0].shape) == [1, 16]
    assert np.frombuffer(a.raw_input_contents[0], np.float32).shape == (16,)
    assert a.raw_input_contents[0] != b.raw_input_contents[0]
    with pytest.raises(LoadError, match="variable"):
        InputSpec("x", "FP32", (-1,))


def test_scaled_profile_keeps_power_and_round_trips_through_csv(tmp_path):
    base = ServiceProfile.from_csv(V100)
    s = scaled_profile(base, 10.0)
    np.testing.assert_allclose(s.busy_power_w, base.busy_power_w)
    np.testing.assert_allclose(s.mean_s, 10 * base.mean_s)
    back = ServiceProfile.from_csv(write_profile_csv(s, tmp_path / "p.csv"))
    np.testing.assert_allclose(back.mean_s, s.mean_s, rtol=1e-12)
    np.testing.assert_allclose(back.energy_j, s.energy_j, rtol=1e-12)


def test_contender_specs():
    assert parse_contender("triton:5000") == Contender("triton", max_queue_delay_us=5000)
    assert parse_contender("gate:static:8").name == "gate static:8"
    for bad in ("triton:abc", "gate:", "gate:bogus", "other:1"):
        with pytest.raises(ValueError):
            parse_contender(bad)
    unscaled = parse_contender("gate:smdp-adaptive-unscaled")
    assert unscaled.adaptive and not unscaled.long_run and unscaled.name == "gate smdp adaptive (w unscaled)"
    assert parse_contender("gate:smdp-adaptive").long_run
    with pytest.raises(ValueError, match="only the adaptive gate"):
        Contender("gate", policy="smdp", long_run=False)


def test_the_unscaled_adaptive_gate_runs_a_sidecar_with_the_long_run_window_off():
    from loadtest.stack import SidecarSpec
    from smdp.cli import build_parser

    flags = SidecarSpec(policy="smdp", max_batch=8, long_run_window_s=0.0).flags()
    assert flags[flags.index("--long-run-window") + 1] == "0.0"
    assert "--long-run-window" not in SidecarSpec(policy="smdp", max_batch=8).flags()
    args = build_parser().parse_args(["serve", "--long-run-window", "0"])
    assert args.long_run_window_s == 0.0


def test_a_guarded_gate_contender_runs_a_sidecar_with_that_max_wait():
    from loadtest.stack import SidecarSpec
    from plugin.serve_cli import config_from_args
    from smdp.cli import build_parser

    c = parse_contender("gate:smdp-adaptive-guard:10000")
    assert c.adaptive and c.max_wait_us == 10_000 and c.name == "gate smdp adaptive guard=10ms"
    assert not parse_contender("gate:smdp-guard:2500").adaptive
    for bad in ("gate:smdp-guard:x", "gate:smdp-guard:0"):
        with pytest.raises(ValueError):
            parse_contender(bad)
    flags = SidecarSpec(policy="greedy", max_batch=8, max_wait_s=0.01).flags()
    assert flags[flags.index("--max-wait") + 1] == "0.01"
    assert "--max-wait" not in SidecarSpec(policy="smdp", max_batch=8).flags()
    config = config_from_args(build_parser().parse_args(["serve", *flags]))
    assert config.policy_for("any").max_wait_s == 0.01


def test_a_gate_contender_sets_its_group_hold_and_the_sidecar_gets_it():
    from loadtest.bench import BenchConfig
    from loadtest.trace_bench import gate_spec
    from plugin.serve_cli import config_from_args
    from smdp.cli import build_parser

    off = parse_contender("gate:smdp-slo-derived-seeded-hold:0")
    assert off.derived and off.seeded and off.hold_us == 0 and off.name == "gate smdp SLO derived seeded hold=0ms"
    both = parse_contender("gate:smdp-adaptive-guard:5000-hold:800")
    assert both.max_wait_us == 5000 and both.hold_us == 800 and both.name == "gate smdp adaptive guard=5ms hold=0.8ms"
    assert parse_contender("gate:smdp").hold_us is None
    for bad in ("gate:smdp-hold:x", "gate:smdp-hold:-5", "triton:100-hold:3"):
        with pytest.raises(ValueError):
            parse_contender(bad)
    seeded = parse_contender("gate:smdp-adaptive-seeded-hold:0")
    cfg = BenchConfig(rates=(150.0,), contenders=(seeded,), data_plane="python")
    spec = gate_spec(seeded, cfg, max_batch=8, profile_csv=V100, rate_rps=150.0, solver_url=None, slo=None,
                     arrivals="batch:3")
    config = config_from_args(build_parser().parse_args(["serve", *spec.flags()]))
    assert config.policy_for("any").group_hold_s == 0
    default = config_from_args(build_parser().parse_args(["serve"])).policy_for("any").group_hold_s
    assert default == pytest.approx(0.0005)


def test_the_trace_bench_gives_each_gate_its_guard_and_the_seeded_one_the_fitted_model():
    from loadtest.bench import BenchConfig
    from loadtest.trace_bench import gate_spec
    from plugin.serve_cli import config_from_args
    from smdp.cli import build_parser

    cfg = BenchConfig(rates=(150.0,), contenders=(parse_contender("gate:smdp"),), data_plane="python")
    fit = "mmpp:300,20:0.5,1:2,1"
    kw = dict(max_batch=8, profile_csv=V100, rate_rps=150.0, solver_url="127.0.0.1:1", slo=None, arrivals=fit)
    seeded = parse_contender("gate:smdp-adaptive-seeded-guard:20000")
    assert seeded.seeded and seeded.adaptive and seeded.name == "gate smdp adaptive seeded guard=20ms"
    assert parse_contender("gate:smdp-adaptive-seeded").seeded
    with pytest.raises(ValueError):
        Contender("gate", policy="smdp", seeded=True)  # only the adaptive gate is seeded
    spec = gate_spec(seeded, cfg, **kw)
    assert spec.max_wait_s == 0.02 and spec.arrivals == fit
    config = config_from_args(build_parser().parse_args(["serve", *spec.flags()]))
    assert config.policy_for("any").max_wait_s == 0.02 and config.policy_for("any").arrivals == fit
    fixed = gate_spec(parse_contender("gate:smdp-guard:20000"), cfg, **kw)
    assert fixed.max_wait_s == 0.02 and fixed.arrivals is None and fixed.solver_url is None
    plain = gate_spec(parse_contender("gate:smdp-adaptive"), cfg, **kw)
    assert plain.max_wait_s is None and plain.arrivals is None
    # the SLO gate seeded with the fit: its SLO and its arrival model both reach the sidecar
    from solver.slo import SloTarget

    slo_seeded = parse_contender("gate:smdp-slo-seeded")
    assert slo_seeded.slo and slo_seeded.seeded and slo_seeded.name == "gate smdp SLO seeded"
    spec = gate_spec(slo_seeded, cfg, **{**kw, "slo": SloTarget(0.99, 0.07)})
    config = config_from_args(build_parser().parse_args(["serve", *spec.flags()]))
    got = config.policy_for("any")
    assert got.arrivals == fit and got.slo is not None and got.slo.latency_s == 0.07 and got.adaptive
    with pytest.raises(ValueError):
        Contender("gate", policy="smdp", slo=True, seeded=True)  # the fixed SLO gate is not seeded
    # D derived from the model: the sidecar gets --slo-bound best_delay and the margin, not the bench's D
    derived = parse_contender("gate:smdp-slo-derived-seeded")
    assert derived.derived and derived.seeded and derived.name == "gate smdp SLO derived seeded"
    spec = gate_spec(derived, cfg, **{**kw, "slo": SloTarget(0.99, 0.07, 0.003)})
    assert "--slo-latency" not in spec.flags()
    got = config_from_args(build_parser().parse_args(["serve", *spec.flags()])).policy_for("any")
    assert got.arrivals == fit and got.slo.bound == "best_delay" and got.slo.latency_s is None
    assert got.slo.margin_s == 0.003 and got.slo.quantile == 0.99 and got.slo.best_delay_direct_extra_s is None
    # with the margin measured, what Triton's answers carry served directly goes to the derived gate only
    spec = gate_spec(derived, cfg, **{**kw, "slo": SloTarget(0.99, 0.07, 0.003)}, slo_direct_extra_s=0.0012)
    got = config_from_args(build_parser().parse_args(["serve", *spec.flags()])).policy_for("any")
    assert got.slo.best_delay_direct_extra_s == 0.0012 and got.slo.margin_s == 0.003
    assert got.slo.best_delay_catch_share == TRITON_CATCH_SHARE  # not given: the config's default
    shared = gate_spec(derived, dataclasses.replace(cfg, slo_catch_share=0.75),
                       **{**kw, "slo": SloTarget(0.99, 0.07, 0.003)})
    got = config_from_args(build_parser().parse_args(["serve", *shared.flags()])).policy_for("any")
    assert got.slo.best_delay_catch_share == 0.75
    with pytest.raises(ValueError, match="--slo-catch-share must be a share in"):
        dataclasses.replace(cfg, slo_catch_share=1.5)
    # a share fitted to a Triton run: given to the derived gate over the config's
    fitted = gate_spec(derived, cfg, **{**kw, "slo": SloTarget(0.99, 0.07, 0.003)}, slo_catch_share=0.66)
    got = config_from_args(build_parser().parse_args(["serve", *fitted.flags()])).policy_for("any")
    assert got.slo.best_delay_catch_share == 0.66
    stated = gate_spec(slo_seeded, cfg, **{**kw, "slo": SloTarget(0.99, 0.07, 0.003)}, slo_direct_extra_s=0.0012)
    assert "--slo-direct-extra" not in stated.flags()
    assert not parse_contender("gate:smdp-slo-derived").seeded
    with pytest.raises(ValueError, match="derives its bound"):
        Contender("gate", policy="smdp", slo=True, derived=True)  # the fixed SLO gate states D


def test_predictions_agree_with_the_solver_and_tritons_zero_delay_is_its_batcher_simulated():
    from loadtest.contenders import TRITON_DRAWS, triton_prediction
    from solver.evaluate import evaluate
    from solver.policy import TimeoutRule, TritonBatcher, greedy
    from solver.simulate import simulate

    prof = scaled_profile(ServiceProfile.from_csv(V100).truncated(32), 10.0)
    model = BatchingModel(100.0, 32, prof, 40.0, 1e-3)
    times = np.sort(np.random.default_rng(0).uniform(0, 20, 2000))
    g = predict(Contender("gate", "greedy"), model, times)
    assert g.source == "exact"
    assert g.mean_latency_s == pytest.approx(evaluate(model, greedy(32)).mean_latency_s)
    # Triton's delay 0 as Triton runs it (its batcher sleeps through part of the completions): simulated,
    # longer than greedy simulated on the same times, which is what the gate's greedy runs
    t0 = predict(Contender("triton", max_queue_delay_us=0), model, times)
    kw = dict(idle_power_w=40.0, weight=1e-3, seed=0)
    # the mean of TRITON_DRAWS draws of the races on the same times, seeds 0 .. draws - 1
    draws = [simulate(prof, TritonBatcher(32, 0.0), times, **{**kw, "seed": i}) for i in range(TRITON_DRAWS)]
    assert t0.source == "sim" and t0.cost == pytest.approx(np.mean([d.cost for d in draws]), rel=1e-12)
    assert t0.mean_latency_s == pytest.approx(np.mean([d.mean_latency_s for d in draws]), rel=1e-12)
    assert len({d.mean_latency_s for d in draws}) > 1  # the draws differ: the mean is not one of them
    one = triton_prediction(model, 0.0, times, draws=1)
    assert one.cost == simulate(prof, TritonBatcher(32, 0.0), times, **kw).cost
    with pytest.raises(ValueError, match="draws"):
        triton_prediction(model, 0.0, times, draws=0)
    assert t0.mean_latency_s > simulate(prof, TimeoutRule(32, 0.0), times, **kw).mean_latency_s
    smdp = predict(Contender("gate", "smdp"), model, times)
    assert smdp.cost <= g.cost + 1e-12  # the optimum is no worse than greedy
    sim = predict(Contender("triton", max_queue_delay_us=10000), model, times, warmup_s=1.0)
    assert sim.source == "sim" and sim.mean_batch >= g.mean_batch


# --- lazily drawn, partitioned arrival sequences (the Locust scheduler's) ------------------------

def _take(it, until_s: float) -> np.ndarray:
    out = []
    for t in it:
        if t >= until_s:
            break
        out.append(t)
    return np.asarray(out)


@pytest.mark.parametrize("spec", ["poisson", "steps:1.5x40,2x300", "ramp:50:250"])
def test_shares_of_several_processes_partition_the_one_sequence(spec):
    from loadtest.arrival_spec import share_of

    a = parse_arrivals(spec, rate=120.0)
    whole = _take(share_of(a, 5, chunk_s=2.0, ramp_s=20.0), 30.0)
    parts = [_take(share_of(a, 5, r, 3, chunk_s=2.0, ramp_s=20.0), 30.0) for r in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), whole)  # no arrival twice, none lost
    assert all(abs(p.size - whole.size / 3) <= 1 for p in parts)  # W processes: W x less each, not W x more
    assert np.all(np.diff(whole) >= 0)


def test_unbounded_poisson_drawn_in_chunks_keeps_its_rate_and_dispersion():
    """No horizon is needed (web UI, workers): 20 chunks later the load has not stopped, and the
    counts per window are Poisson across chunk boundaries."""
    from loadtest.arrival_spec import share_of

    rate, window, k = 150.0, 0.25, 400
    t = _take(share_of(parse_arrivals("poisson", rate=rate), 11, chunk_s=5.0), window * k)
    counts = np.histogram(t, bins=np.arange(k + 1) * window)[0]
    assert abs(counts.mean() - rate * window) < 4 * math.sqrt(rate * window / k)
    d = ((counts - counts.mean()) ** 2).sum() / counts.mean()
    assert stats.chi2.ppf(0.001, k - 1) < d < stats.chi2.ppf(0.999, k - 1)


def test_ramp_drawn_in_chunks_reaches_the_end_rate_and_holds_it():
    from loadtest.arrival_spec import share_of

    t = _take(share_of(parse_arrivals("ramp:0:200"), 2, chunk_s=3.0, ramp_s=30.0), 90.0)
    assert abs(np.sum(t < 30.0) - 3000) < 4 * math.sqrt(3000)  # mean 100/s over the ramp
    assert abs(np.sum(t >= 30.0) - 12000) < 4 * math.sqrt(12000)  # then 200/s


def test_a_trace_share_ends_with_the_trace(tmp_path):
    from loadtest.arrival_spec import share_of

    gaps = np.round(np.random.default_rng(4).exponential(0.05, 99), 7)
    a = parse_arrivals(f"trace:{_write_trace(tmp_path / 't.csv', gaps)}")
    assert a.end_s() == pytest.approx(gaps.sum(), abs=1e-6)
    parts = [list(share_of(a, 0, r, 2, chunk_s=1.0)) for r in range(2)]  # finite: the generators end
    assert sorted(parts[0] + parts[1]) == pytest.approx(np.concatenate(([0.0], np.cumsum(gaps))).tolist(), abs=1e-6)


def test_share_arguments_are_checked():
    from loadtest.arrival_spec import share_of

    with pytest.raises(ValueError, match="rank"):
        next(share_of(parse_arrivals("poisson", rate=1.0), 0, 2, 2))


# --- config mode and the solver service as contenders -------------------------------------------

def test_config_contender_spec_and_name():
    c = parse_contender("config:smdp")
    assert (c.kind, c.policy, c.name) == ("config", "smdp", "config smdp")
    assert parse_contender("config").name == "config smdp"
    with pytest.raises(ValueError, match="config:smdp"):
        parse_contender("config:greedy")
    ada = parse_contender("config:smdp-adaptive")
    assert (ada.kind, ada.policy, ada.adaptive, ada.name) == ("config", "smdp", True, "config smdp adaptive")
    with pytest.raises(ValueError, match="adaptive"):
        Contender("gate", policy="greedy", adaptive=True)


def test_config_prediction_simulates_the_compiled_rule_on_the_run_arrivals():
    from loadtest.contenders import compile_config
    from solver.arrivals import poisson

    profile = scaled_profile(ServiceProfile.from_csv(V100).truncated(32), 10.0)
    model = BatchingModel(150.0, 32, profile, 40.0, 1e-3)
    compiled = compile_config(model, seed=1, n_requests=5000)
    s = compiled.settings
    assert s.max_batch_size == 32 and s.preferred_batch_size[-1] <= 32 and s.max_queue_delay_microseconds >= 0
    times = poisson(150.0, duration=60.0, rng=3)
    pred = predict(Contender("config"), model, times, seed=1, compiled=compiled)
    assert pred.source == "sim"
    smdp = predict(Contender("gate", "smdp"), model, times)
    # the compiled rule approximates the SMDP table: its J is within a few percent of the optimum
    assert pred.cost == pytest.approx(smdp.cost, rel=0.1)
    assert pred.mean_power_w > 40.0


def test_sidecar_spec_passes_the_solver_service():
    from loadtest.stack import SidecarSpec

    flags = SidecarSpec(policy="smdp", max_batch=8, rate_rps=10.0, solver_url="127.0.0.1:9").flags()
    assert flags[flags.index("--solver") + 1] == "127.0.0.1:9"
    assert "--solver" not in SidecarSpec(policy="smdp", max_batch=8).flags()


def test_gate_contenders_run_on_the_data_plane_asked_for(tmp_path, monkeypatch):
    import plugin.native_plane as native_plane
    from loadtest.cli import _config
    from loadtest.stack import SidecarSpec
    from smdp.cli import build_parser

    flags = SidecarSpec(policy="greedy", max_batch=8, data_plane="native").flags()
    assert flags[flags.index("--data-plane") + 1] == "native"
    for command in ("demo", "bench"):
        for plane in ("native", "python"):
            args = build_parser().parse_args([command, "--out", str(tmp_path), "--data-plane", plane])
            assert _config(args).data_plane == plane
    # The default (auto) is resolved once, in the bench, so the report can name the plane: native where
    # smdp-gate is found, else python with the reason.
    gate = tmp_path / "smdp-gate"
    gate.write_text("#!/bin/sh\n")
    gate.chmod(0o755)
    monkeypatch.setenv("SMDP_NATIVE_GATE", str(gate))
    cfg = _config(build_parser().parse_args(["demo", "--out", str(tmp_path)]))
    assert cfg.data_plane == "native" and str(gate) in cfg.data_plane_reason
    monkeypatch.setenv("SMDP_NATIVE_GATE", str(tmp_path / "nothing"))
    monkeypatch.setattr(native_plane, "DEFAULT_BINARY", tmp_path / "nothing")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    cfg = _config(build_parser().parse_args(["demo", "--out", str(tmp_path)]))
    assert cfg.data_plane == "python" and "make native" in cfg.data_plane_reason


def test_demo_defaults_have_every_contender_kind_and_start_a_solver(tmp_path):
    from loadtest.cli import _config
    from smdp.cli import build_parser

    args = build_parser().parse_args(["demo", "--out", str(tmp_path)])
    cfg = _config(args)
    names = [c.name for c in cfg.contenders]
    assert names == ["triton delay=0ms", "triton delay=10ms", "gate greedy", "gate smdp", "gate smdp adaptive",
                     "config smdp", "gate smdp SLO"]
    assert cfg.slo.latency_s == 0.08 and cfg.slo.quantile == 0.99
    assert cfg.slo.margin_s == 0.0 and cfg.slo_margin_auto  # measured by the demo before the SLO gate runs
    assert cfg.solver == "embedded" and cfg.needs_solver
    plain = _config(build_parser().parse_args(["demo", "--slo-latency", "0", "--out", str(tmp_path)]))
    assert plain.slo is None and "gate smdp SLO" not in [c.name for c in plain.contenders]
    bench = _config(build_parser().parse_args(["bench", "--gates", "smdp-adaptive", "--config-mode", ""]))
    assert [c.name for c in bench.contenders][-1] == "gate smdp adaptive" and not bench.needs_solver


def test_trace_bench_exits_1_when_requests_fail(monkeypatch, tmp_path, capsys):
    from dataclasses import replace as dc_replace

    import loadtest.trace_bench as tb
    from loadtest.bench import BenchConfig, BenchReport, BenchRow
    from loadtest.contenders import Prediction
    from loadtest.metrics import Measured

    cfg = BenchConfig(rates=(100.0,), contenders=(Contender("triton"),), out_dir=tmp_path)
    m = Measured(10, 7, 3, 0.01, 0.01, 0.02, 0.03, 100.0, 0.11, 70.0, 2.0, 0.5, 1.0, 0.0, 0.0, 1e-3)
    row = BenchRow(100.0, "triton delay=0ms", m, Prediction(), np.zeros(8), np.zeros(7), {"UNAVAILABLE": 3})
    report = BenchReport(cfg, (row,), 8, "note")
    monkeypatch.setattr(tb, "trace_times", lambda *a: np.linspace(0.0, 5.0, 50))
    monkeypatch.setattr(tb, "run_trace_bench", lambda *a, **k: (report, []))
    monkeypatch.setattr(tb, "write_outputs", lambda r: r)
    monkeypatch.setattr(tb, "plot_trail", lambda *a, **k: tmp_path / "trail.png")
    assert tb.main_trace_bench(cfg, tmp_path / "t.csv", 100.0, None, None, lambda _m: None) == 1
    assert "3 request(s) failed" in capsys.readouterr().err
    ok = BenchReport(cfg, (dc_replace(row, measured=dc_replace(m, failed=0, ok=10), failures={}),), 8, "note")
    monkeypatch.setattr(tb, "run_trace_bench", lambda *a, **k: (ok, []))
    assert tb.main_trace_bench(cfg, tmp_path / "t.csv", 100.0, None, None, lambda _m: None) == 0


def test_repeat_summary_pairs_each_repeat_against_the_adaptive_gate():
    from loadtest.trace_bench import repeat_summary

    costs = {"gate smdp": [0.200, 0.210, 0.205], "gate smdp adaptive": [0.204, 0.200, 0.207],
             "triton delay=0ms": [0.220, 0.215, 0.218]}
    lines = repeat_summary(costs)
    table = {line[:32].strip(): line[32:].split() for line in lines[1:4]}
    assert table["gate smdp"] == ["205.00", "200.00", "210.00", "3"]  # mean, min, max, repeats
    assert table["gate smdp adaptive"] == ["203.67", "200.00", "207.00", "3"]
    vs_fixed = next(line for line in lines if line.startswith("gate smdp adaptive vs gate smdp:"))
    # per repeat: +2.0%, -4.8%, +1.0%; lower in one of three
    assert "+2.0, -4.8, +1.0" in vs_fixed and "lower in 1 of 3" in vs_fixed
    vs_triton = next(line for line in lines if "vs triton" in line)
    assert "lower in 3 of 3" in vs_triton
    assert len(repeat_summary({"gate smdp": [0.2]})) == 2  # no adaptive gate: the table only


def test_the_fitted_prediction_is_kept_for_the_next_run_of_the_same_trace(tmp_path, monkeypatch):
    from loadtest import trace_bench

    prof = scaled_profile(ServiceProfile.from_csv(V100).truncated(32), 10.0)
    times = np.sort(np.random.default_rng(1).uniform(0, 20, 2000))
    model = BatchingModel((times.size - 1) / (times[-1] - times[0]), 32, prof, 40.0, 1e-3)
    calls = []
    real = trace_bench.fitted_prediction
    monkeypatch.setattr(trace_bench, "fitted_prediction", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = trace_bench.cached_fitted_prediction(tmp_path, model, times, 1.0)
    again = trace_bench.cached_fitted_prediction(tmp_path, model, times, 1.0)
    assert again == first and len(calls) == 1
    trace_bench.cached_fitted_prediction(tmp_path, model.with_(weight=2e-3), times, 1.0)  # another model: solved again
    assert len(calls) == 2


def test_trace_bench_predictions_carry_the_measured_hop():
    from loadtest.bench import Stack, with_hop
    from loadtest.contenders import Prediction
    from loadtest.stack_profile import RequestHop

    prof = scaled_profile(ServiceProfile.from_csv(V100).truncated(8), 10.0)
    stack = Stack("t", None, 8, prof, V100, hop=RequestHop(0.001, 0.003, 0.001))
    pred = Prediction(0.050, 100.0, 0.150, 4.0, "exact")
    gate = with_hop(pred, stack, parse_contender("gate:smdp-adaptive-seeded"))
    assert gate.mean_latency_s == pytest.approx(0.054) and gate.cost == pytest.approx(0.154) and gate.source == "exact+hop"
    assert with_hop(pred, stack, parse_contender("triton:20000")).mean_latency_s == pytest.approx(0.051)
    assert with_hop(pred, dataclasses.replace(stack, hop=None), parse_contender("gate:smdp")) == pred
    assert with_hop(Prediction(), stack, parse_contender("gate:smdp")) == Prediction()


def test_a_fitted_race_share_needs_a_triton_run_before_the_derived_gates():
    """``--slo-catch-share fit``: the derived gates take the share fitted to the first Triton delay contender's
    run, so one must come before them; a share and fit together, or a bad word, are refused."""
    from loadtest.bench import BenchConfig
    from loadtest.trace_bench import TritonShareFits, catch_share_arg, derived_catch_share
    from solver.catch_share import CatchShareFit, RunFit
    from solver.slo import SloTarget

    slo = SloTarget(0.99, 0.07, 0.003)
    triton, derived = parse_contender("triton:20000"), parse_contender("gate:smdp-slo-derived-seeded")
    ok = BenchConfig(rates=(150.0,), contenders=(triton, derived), slo=slo, slo_catch_share_fit=True)
    for bad in ((derived, triton), (derived,)):
        with pytest.raises(ValueError, match="needs a triton:DELAY_US contender before"):
            BenchConfig(rates=(150.0,), contenders=bad, slo=slo, slo_catch_share_fit=True)
    with pytest.raises(ValueError, match="either a share or fit"):
        BenchConfig(rates=(150.0,), contenders=(triton, derived), slo=slo, slo_catch_share=0.7,
                    slo_catch_share_fit=True)
    assert catch_share_arg("fit") is None and catch_share_arg(None) is None and catch_share_arg("0.7") == 0.7
    with pytest.raises(ValueError, match="a share in \\[0, 1\\] or fit"):
        catch_share_arg("fitted")
    shares = TritonShareFits()
    with pytest.raises(ValueError, match="no Triton delay contender's run"):
        derived_catch_share(ok, shares)
    fit = lambda x: CatchShareFit(x, "mean", 0.05, (0.0, 1.0), (0.06, 0.04), True)  # noqa: E731
    shares.add("triton delay=20ms", RunFit(fit(0.7), fit(0.8)))
    shares.add("triton delay=30ms", RunFit(fit(0.5), fit(0.4)))
    assert derived_catch_share(ok, shares) == 0.7  # the first run's, by its mean
    assert derived_catch_share(dataclasses.replace(ok, slo_catch_share_fit=False, slo_catch_share=0.55), shares) == 0.55


def test_the_repeats_after_the_first_keep_the_first_fitted_share_in_any_order():
    from loadtest.bench import BenchConfig
    from loadtest.trace_bench import later_repeats
    from solver.slo import SloTarget

    order = (parse_contender("triton:20000"), parse_contender("gate:smdp-slo-derived-seeded"))
    cfg = BenchConfig(rates=(150.0,), contenders=order, data_plane="python", slo=SloTarget(0.99, 0.11),
                      slo_catch_share_fit=True)
    with pytest.raises(ValueError, match="needs a triton:DELAY_US contender before"):
        dataclasses.replace(cfg, contenders=order[::-1])
    later = later_repeats(cfg, 0.42)
    assert later.slo_catch_share == 0.42 and not later.slo_catch_share_fit
    assert dataclasses.replace(later, contenders=order[::-1]).contenders == order[::-1]  # the reversed order runs
    assert later_repeats(cfg, None) is cfg  # no Triton run answered: the first repeat's failure stands
    stated = dataclasses.replace(cfg, slo_catch_share_fit=False, slo_catch_share=0.6)
    assert later_repeats(stated, 0.42) is stated
