"""SLO reporting in the load tests: attainment and goodput, the SLO contenders, their plumbing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from loadtest.bench import BenchConfig, BenchReport, BenchRow, format_table
from loadtest.contenders import Prediction, ma_delay, parse_contender
from loadtest.metrics import measure
from loadtest.openloop import LoadError, OpenLoopResult
from loadtest.stack import SidecarSpec
from solver.arrivals import poisson
from solver.model import BatchingModel, ServiceProfile
from solver.policy import TimeoutRule
from solver.simulate import simulate_latencies
from solver.slo import SloTarget

ROOT = Path(__file__).resolve().parent.parent


def _result(scheduled, done, status):
    n = len(scheduled)
    return OpenLoopResult(
        scheduled_s=np.asarray(scheduled, float), sent_s=np.asarray(scheduled, float) + 1e-4,
        done_s=np.asarray(done, float), status=tuple(status), batch_size=np.ones(n, np.int64),
        batch_energy_j=np.full(n, 1.0),
    )


def test_attainment_counts_failures_as_misses_and_goodput_per_second():
    prof = ServiceProfile.from_table([1], [0.01], [1.0])
    # latencies 0.02, 0.05, (failed), 0.2 in a 4 s window; D = 0.1: two of four within D
    res = _result([0.5, 1.5, 2.5, 3.5], [0.52, 1.55, math.nan, 3.7], ["OK", "OK", "UNAVAILABLE", "OK"])
    m = measure(res, prof, idle_power_w=0.0, weight=0.0, window=(0.0, 4.0), slo_latency_s=0.1)
    assert m.slo_attainment == pytest.approx(0.5) and m.goodput_rps == pytest.approx(0.5)
    plain = measure(res, prof, idle_power_w=0.0, weight=0.0, window=(0.0, 4.0))
    assert math.isnan(plain.slo_attainment) and math.isnan(plain.goodput_rps)
    with pytest.raises(LoadError):
        measure(res, prof, idle_power_w=0.0, weight=0.0, slo_latency_s=0.0)


def test_slo_contenders_parse_and_need_an_slo():
    ma, gate = parse_contender("triton:ma"), parse_contender("gate:smdp-slo")
    assert ma.name == "triton MA delay" and ma.model_analyzer and ma.kind == "triton"
    assert gate.name == "gate smdp SLO" and gate.slo and gate.adaptive and gate.policy == "smdp"
    with pytest.raises(ValueError, match="need an SLO"):
        BenchConfig(rates=(100.0,), contenders=(gate,), data_plane="python")
    cfg = BenchConfig(rates=(100.0,), contenders=(ma, gate), data_plane="python", slo=SloTarget(0.99, 0.05))
    assert cfg.slo.latency_s == 0.05


def test_the_fixed_slo_gate_is_the_slo_search_solved_once():
    from plugin.config import ModelPolicyConfig, SloConfig
    from plugin.policies import build_rule
    from solver.policy import MaxWaitGuard
    from solver.slo import solve_slo

    fixed = parse_contender("gate:smdp-slo-fixed")
    assert fixed.name == "gate smdp SLO fixed" and fixed.slo and not fixed.adaptive
    csv = ROOT / "profiles" / "v100_resnet50.csv"
    prof = ServiceProfile.from_csv(csv, max_batch=32)
    rate = 0.05 * 32 / prof.mean_s[-1]
    cfg = ModelPolicyConfig(policy="smdp", profile=csv, adaptive=False, rate_rps=rate, weight=0.1, idle_power_w=40.0,
                            slo=SloConfig(quantile=0.99, latency_s=0.02, margin_s=0.002))
    info = build_rule("m", cfg, 32)
    want = solve_slo(BatchingModel(rate=rate, max_batch=32, profile=prof, idle_power_w=40.0, weight=0.1),
                     SloTarget(0.99, 0.02, 0.002))
    assert want.feasible and want.max_wait_s is not None  # power-led at low load: the guard binds
    assert isinstance(info.rule, MaxWaitGuard) and info.rule.max_wait_s == want.max_wait_s
    np.testing.assert_array_equal(info.rule.rule.actions, want.policy.actions)
    assert info.prediction["slo_feasible"] and info.prediction["predicted_quantile_s"] <= 0.018
    # its ctl status: the SLO and what the one search predicted (nothing measured: no controller)
    from plugin.control_backend import _fixed_slo_status
    from plugin.ctl_cli import _slo_text

    st = _fixed_slo_status(cfg, info).message()
    assert (st.quantile, st.latency_s, st.margin_s, st.feasible) == (0.99, 0.02, 0.002, True)
    assert st.predicted_quantile_s == info.prediction["predicted_quantile_s"] and st.max_wait_s == want.max_wait_s
    assert not st.HasField("measured_quantile_s")
    text = "\n".join(_slo_text(st))
    assert "q0.99 <= 20.000 ms: predicted to meet it" in text and "max-wait guard" in text
    assert _fixed_slo_status(cfg.model_copy(update={"slo": None}), info) is None
    with pytest.raises(ValueError, match="smdp"):
        ModelPolicyConfig(policy="greedy", slo=SloConfig(latency_s=0.02))


def test_sidecar_spec_passes_the_slo_as_serve_flags():
    flags = SidecarSpec(policy="smdp", max_batch=8, slo=SloTarget(0.95, 0.02)).flags()
    i = flags.index("--slo-latency")
    assert flags[i + 1] == "0.02" and flags[flags.index("--slo-quantile") + 1] == "0.95"
    assert "--slo-margin" not in flags
    flags = SidecarSpec(policy="smdp", max_batch=8, slo=SloTarget(0.95, 0.02, 0.003)).flags()
    assert flags[flags.index("--slo-margin") + 1] == "0.003"
    assert "--slo-latency" not in SidecarSpec(policy="smdp", max_batch=8).flags()


def test_serve_flags_build_the_slo_config():
    import argparse

    from plugin.serve_cli import _slo_flags

    def ns(q=None, d=None, m=None, b=None, c=None, x=None):
        return argparse.Namespace(default_slo_quantile=q, default_slo_latency_s=d, default_slo_margin_s=m,
                                  default_slo_bound=b, default_slo_best_delay_catch_share=c,
                                  default_slo_best_delay_direct_extra_s=x)

    assert _slo_flags(ns()) is None
    assert _slo_flags(ns(d=0.05)) == {"latency_s": 0.05}
    assert _slo_flags(ns(q=0.9, d=0.05)) == {"latency_s": 0.05, "quantile": 0.9}
    assert _slo_flags(ns(d=0.05, m=0.002)) == {"latency_s": 0.05, "margin_s": 0.002}
    assert _slo_flags(ns(b="best_delay", m=0.002)) == {"bound": "best_delay", "margin_s": 0.002}
    assert _slo_flags(ns(b="best_delay", c=0.7, x=0.001)) == {"bound": "best_delay", "best_delay_catch_share": 0.7,
                                                            "best_delay_direct_extra_s": 0.001}
    for bad in (ns(q=0.9), ns(m=0.002), ns(b="stated"), ns(c=0.7), ns(x=0.001)):
        with pytest.raises(ValueError, match="--slo-latency"):
            _slo_flags(bad)


def test_the_slo_config_takes_a_margin_below_its_latency():
    from pydantic import ValidationError

    from plugin.config import SloConfig

    assert SloConfig(latency_s=0.05).margin_s == 0.0
    assert SloConfig(latency_s=0.05, margin_s=0.004).margin_s == 0.004
    for bad in (-0.001, 0.05, 0.06, math.nan):
        with pytest.raises(ValidationError, match="margin"):
            SloConfig(latency_s=0.05, margin_s=bad)


def test_ma_delay_is_the_least_power_delay_meeting_the_slo():
    prof = ServiceProfile.from_csv(ROOT / "profiles" / "v100_resnet50.csv", max_batch=32)
    model = BatchingModel(rate=0.2 * 32 / prof.mean_s[-1], max_batch=32, profile=prof, idle_power_w=40.0)
    slo = SloTarget(0.99, 0.02)
    d = ma_delay(model, slo)
    assert 0 < d < 0.02
    times = poisson(model.rate, n=40_000, rng=np.random.default_rng([0, 5]))

    def run(delay):
        sim, lat = simulate_latencies(prof, TimeoutRule(32, delay), times, idle_power_w=40.0, weight=0.0,
                                      seed=0, warmup=float(times[800]))
        return float(np.quantile(lat, 0.99)), sim.mean_power_w

    q, p = run(d)
    assert q <= 0.02
    assert p < run(0.0)[1]  # waiting buys power
    assert run(min(0.02, d + 0.02 / 40))[0] > 0.02 or run(min(0.02, d + 0.02 / 40))[1] >= p


def test_the_table_shows_attainment_and_goodput_with_an_slo():
    from loadtest.metrics import Measured

    cfg = BenchConfig(rates=(100.0,), contenders=(parse_contender("gate:smdp-slo"),), data_plane="python",
                      slo=SloTarget(0.99, 0.05))
    m = Measured(100, 100, 0, 0.01, 0.01, 0.02, 0.03, 100.0, 0.11, 100.0, 2.0, 0.5, 1.0, 0.0, 0.0, 1e-3,
                 slo_attainment=0.995, goodput_rps=99.5)
    row = BenchRow(100.0, "gate smdp SLO", m, Prediction(), np.zeros(4), np.zeros(3), {}, ())
    text = format_table(BenchReport(cfg, (row,), 4, "power modelled"))
    assert "attain" in text and "0.9950" in text and "99.5" in text and "q0.99 of latency <= 50 ms" in text


def test_the_measured_margin_is_the_hop_plus_the_send_lag_quantile():
    from loadtest.slo_margin import measured_margin, send_lags

    lags = [np.linspace(0.0, 0.002, 501), np.full(499, 0.010)]  # pooled: 1,000 lags
    m = measured_margin(0.0015, lags, 0.99, 0.08)
    assert m.send_lag_s == pytest.approx(np.quantile(np.concatenate(lags), 0.99)) and m.requests == 1000
    assert m.margin_s == pytest.approx(0.0015 + m.send_lag_s)
    assert "1.50 ms" in m.describe() and f"{m.margin_s * 1e3:.2f} ms" in m.describe()
    assert measured_margin(0.0015, lags, 0.5, 0.08).send_lag_s < 0.0021  # the SLO's own quantile
    with pytest.raises(ValueError, match="not below D"):
        measured_margin(0.0015, lags, 0.99, 0.011)
    with pytest.raises(ValueError, match="no send lags"):
        measured_margin(0.0015, [np.empty(0)], 0.99, 0.08)
    with pytest.raises(ValueError, match="hop"):
        measured_margin(math.nan, lags, 0.99, 0.08)
    # served by Triton directly: its own hop + the same send lag, not the hop through the gate
    direct = measured_margin(0.0035, lags, 0.99, 0.08, direct_hop_s=0.001)
    assert direct.direct_extra_s == pytest.approx(0.001 + direct.send_lag_s)
    assert direct.margin_s - direct.direct_extra_s == pytest.approx(0.0025)
    assert f"{direct.direct_extra_s * 1e3:.2f} ms" in direct.describe()
    assert m.direct_extra_s == pytest.approx(m.send_lag_s)  # no direct hop given: the lag alone
    with pytest.raises(ValueError, match="straight to Triton"):
        measured_margin(0.0015, lags, 0.99, 0.08, direct_hop_s=math.nan)
    # a request sent early counts 0; one never sent does not count
    res = OpenLoopResult(np.array([0.0, 1.0, 2.0]), np.array([0.001, 0.999, np.nan]), np.array([0.1, 1.1, np.nan]),
                         ("OK", "OK", "NOT_SENT"), np.zeros(3, dtype=int), np.full(3, np.nan))
    assert send_lags(res).tolist() == pytest.approx([0.001, 0.0])


def test_slo_margin_auto_flag():
    from loadtest.cli import _config
    from smdp.cli import build_parser

    cfg = _config(build_parser().parse_args(["bench", "--slo-latency", "0.08", "--slo-margin", "auto"]))
    assert cfg.slo_margin_auto and cfg.slo.margin_s == 0.0
    cfg = _config(build_parser().parse_args(["bench", "--slo-latency", "0.08", "--slo-margin", "0.004"]))
    assert not cfg.slo_margin_auto and cfg.slo.margin_s == 0.004
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--slo-latency", "0.08", "--slo-margin", "soon"])
    with pytest.raises(ValueError, match="needs an SLO"):
        BenchConfig(rates=(100.0,), contenders=(parse_contender("triton:0"),), slo_margin_auto=True)
