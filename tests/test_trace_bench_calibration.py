"""The trace bench's out-of-sample option: the arrival model fitted on a calibration prefix, the rest replayed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtest import trace_bench
from loadtest.stack import scaled_profile
from smdp.cli import main
from solver import arrivals
from solver.arrival_model import MMPP2, parse_arrivals
from solver.fit import fit_arrivals
from solver.model import BatchingModel, ServiceProfile

V100 = Path(__file__).resolve().parent.parent / "profiles" / "v100_resnet50.csv"


def test_the_calibration_prefix_is_split_off_by_time_and_the_rest_replayed_from_zero():
    times = 5.0 + np.sort(np.random.default_rng(2).uniform(0, 40, 4000))
    calib, rest = trace_bench.split_calibration(times, 0.25)
    span = times[-1] - times[0]
    assert calib.size + rest.size == times.size
    assert calib[0] == 0.0 and calib[-1] < 0.25 * span
    assert rest[0] == 0.0 and rest[-1] == pytest.approx(times[-1] - times[calib.size])
    assert np.all(np.diff(rest) >= 0)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            trace_bench.split_calibration(times, bad)
    with pytest.raises(ValueError, match="at least 20"):
        trace_bench.split_calibration(times, 0.001)


def test_out_of_sample_the_model_comes_from_the_prefix_and_the_replay_from_the_rest(tmp_path):
    """A Poisson prefix followed by a clumped stretch: fitted on the prefix the prediction is Poisson's
    (the clumps are unseen), while the table simulated on the replayed times sees them; in sample the
    clumps are fitted."""
    prof = scaled_profile(ServiceProfile.from_csv(V100).truncated(32), 10.0)
    calm = arrivals.poisson(100.0, n=1500, rng=3)
    groups = arrivals.poisson(20.0, n=300, rng=4)
    clumped = np.repeat(groups, 5)  # groups of five at one instant: the same mean rate, far burstier
    times = np.concatenate([calm, calm[-1] + 0.01 + clumped])
    calib, rest = trace_bench.split_calibration(times, (calm[-1] + 0.005) / times[-1])
    assert calib.size == calm.size
    model = BatchingModel((calib.size - 1) / calib[-1], 32, prof, 40.0, 1e-3)
    out = trace_bench.fitted_prediction(model, rest, 1.0, fit_times=calib)
    assert out.spec == "poisson" and out.fixed.mean_latency_s == pytest.approx(out.poisson_w_s)
    assert abs(out.replay_w_s / out.poisson_w_s - 1.0) > 0.1  # the replay is the clumped stretch
    inside = trace_bench.fitted_prediction(model, rest, 1.0)
    assert inside.spec != "poisson"
    assert abs(inside.fixed.mean_latency_s - inside.replay_w_s) < 0.5 * abs(inside.poisson_w_s - inside.replay_w_s)
    assert inside.replay_w_s == out.replay_w_s
    cached = trace_bench.cached_fitted_prediction(tmp_path, model, rest, 1.0, fit_times=calib)
    assert cached == out
    assert trace_bench.cached_fitted_prediction(tmp_path, model, rest, 1.0) == inside  # not the prefix's entry
    # a modulated prefix at twice the replay's rate: its shape, scaled to the replay's mean rate
    busy, _, _ = arrivals.mmpp2_path(MMPP2((400.0, 40.0), (0.5, 1.0)), 4000, rng=6)
    out = trace_bench.fitted_prediction(model, rest, 1.0, fit_times=busy)
    shape = parse_arrivals(out.option)
    assert isinstance(shape, MMPP2) and shape.phases == 2
    assert shape.mean_rate == pytest.approx(model.rate, rel=1e-5)
    assert model.rate < 0.6 * (busy.size - 1) / busy[-1]
    # moved as a trace is compressed in time: switching scales with the rates, dispersion per mean gap kept
    fitted = fit_arrivals(busy).chosen
    c = model.rate / fitted.mean_rate
    assert shape.switching == pytest.approx(tuple(s * c for s in fitted.switching), rel=1e-5)
    gap, gap_fitted = 1.0 / model.rate, 1.0 / fitted.mean_rate
    for k in (1.0, 30.0, 300.0):
        assert shape.index_of_dispersion(k * gap) == pytest.approx(fitted.index_of_dispersion(k * gap_fitted), rel=1e-4)


def test_a_bad_calibration_prefix_is_refused_before_anything_starts(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    stamps = np.datetime64("2023-11-16T18:00:00", "ns") + (np.arange(100) * 1e8).astype("timedelta64[ns]")
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(str(s).replace("T", " ") + ",1,1" for s in stamps) + "\n")
    rc = main(["trace-bench", "--trace", str(trace), "--fit-prefix", "1.5", "--triton", "127.0.0.1:1",
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "calibration prefix" in capsys.readouterr().err


def test_an_mmpp_fit_is_judged_with_its_time_scale_calibrated_to_the_times_it_came_from():
    """In sample, the fixed table's W under the judged model is its W simulated on the replayed times (to
    the calibration's tolerance): the fit's rates, its phases slowed or sped up. Fitted on a prefix, the
    target is the prefix's own W, time-compressed to the replay's rate as the fit is: nothing of the
    replayed times goes into it."""
    from solver.mmpp import CALIBRATION_RTOL
    from solver.simulate import simulate
    from solver.smdp import solve

    prof = scaled_profile(ServiceProfile.from_csv(V100).truncated(32), 10.0)
    busy, _, _ = arrivals.mmpp2_path(MMPP2((400.0, 40.0), (0.5, 1.0)), 4000, rng=6)
    model = BatchingModel((busy.size - 1) / busy[-1], 32, prof, 40.0, 1e-3)
    inside = trace_bench.fitted_prediction(model, busy, 1.0)
    fit, judged = parse_arrivals(inside.option), parse_arrivals(inside.judged_option)
    assert isinstance(fit, MMPP2) and isinstance(judged, MMPP2) and inside.judged == inside.judged_option
    assert judged.rates == pytest.approx(fit.rates, rel=1e-5)
    factor = fit.switching[0] / judged.switching[0]
    assert tuple(s / factor for s in fit.switching) == pytest.approx(judged.switching, rel=1e-5)
    assert f"x{factor:.3g}" in inside.calibration
    assert inside.fixed.mean_latency_s == pytest.approx(inside.replay_w_s, rel=CALIBRATION_RTOL * 1.01)
    # out of sample: the prefix's W, compressed to the replay's rate
    rest = arrivals.poisson(model.rate, n=3000, rng=9)
    out = trace_bench.fitted_prediction(model, rest, 1.0, fit_times=busy)
    prefix_w = simulate(prof, solve(model).policy, busy * ((busy.size - 1) / busy[-1] / model.rate),
                        idle_power_w=40.0, weight=1e-3, seed=0, warmup=1.0).mean_latency_s
    assert out.fixed.mean_latency_s == pytest.approx(prefix_w, rel=CALIBRATION_RTOL * 1.01)
    assert abs(out.fixed.mean_latency_s - out.replay_w_s) > 0.05 * out.replay_w_s  # the replay is Poisson's
    # a Poisson fit has nothing to calibrate: judged under the fit itself
    calm = trace_bench.fitted_prediction(model, rest, 1.0)
    assert calm.spec == "poisson" and calm.judged_option == "" and calm.calibration == ""
    assert calm.judged == calm.option
