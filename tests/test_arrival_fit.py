"""Fitting arrival models to arrival times, and the --arrivals / fit-arrivals command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smdp.cli import main
from solver import arrivals
from solver.arrival_model import MMPP2, CompoundPoisson
from solver.errors import ModelError
from solver.fit import dispersion, fit_arrivals, fit_compound, fit_mmpp, interarrival_cv


def _within(est: float, half: float, true: float, k: float = 1.5) -> bool:
    """|est - true| inside k times the reported 95% half-width (k > 1: the CI is the fit's own, approximate)."""
    return abs(est - true) <= k * half


def test_fit_recovers_compound_poisson():
    cp = CompoundPoisson(4.0)
    t = arrivals.compound_poisson(300.0, cp, n=60_000, rng=2)
    fit = fit_compound(t, window_s=1e-9)
    assert _within(fit.model.group_mean, fit.mean_group_ci95, 4.0, 1.0)
    assert fit.rate == pytest.approx(300.0, rel=0.03)
    full = fit_arrivals(t, group_window_s=1e-9)
    assert isinstance(full.chosen, CompoundPoisson)
    assert full.interarrival_cv["trace"] == pytest.approx(interarrival_cv(cp, 300.0), rel=0.05)
    idx = cp.group_second_moment / cp.group_mean  # 7
    assert full.dispersion["trace"][0] == pytest.approx(idx, rel=0.1)


def test_fit_recovers_mmpp():
    proc = MMPP2((400.0, 40.0), (0.5, 1.0))
    t, _, _ = arrivals.mmpp2_path(proc, 60_000, rng=3)
    fit = fit_mmpp(t)
    for est, half, true in zip(fit.model.rates, fit.rates_ci95, proc.rates):
        assert _within(est, half, true)
    for est, half, true in zip(fit.model.switching, fit.switching_ci95, proc.switching):
        assert _within(est, half, true)
    full = fit_arrivals(t)
    assert isinstance(full.chosen, MMPP2)
    assert full.misfit["mmpp"] < full.misfit["poisson"]


def test_poisson_stream_fits_poisson():
    t = arrivals.poisson(200.0, n=40_000, rng=5)
    full = fit_arrivals(t)
    d = np.asarray(dispersion(t, full.windows_s))
    windows = np.floor(t[-1] / np.asarray(full.windows_s))
    assert np.all(np.abs(d - 1.0) < 4.0 * np.sqrt(2.0 / (windows - 1.0)))  # a sample variance's noise
    assert full.windows_s[-1] * 10 <= t[-1] < full.windows_s[-1] * 30  # up to the longest window measured
    assert full.chosen.spec == "poisson"
    assert full.compound.model.group_mean == pytest.approx(1.0, abs=0.02)


def _trace_csv(path, times):
    base = np.datetime64("2023-11-16T18:00:00", "ns")
    stamps = base + (np.asarray(times) * 1e9).astype("timedelta64[ns]")
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [str(s).replace("T", " ") + ",1,1" for s in stamps]
    path.write_text("\n".join(lines) + "\n")


def test_fit_arrivals_cli(tmp_path, capsys):
    t = arrivals.compound_poisson(100.0, CompoundPoisson(3.0), n=20_000, rng=9)
    trace = tmp_path / "groups.csv"
    _trace_csv(trace, t)
    assert main(["fit-arrivals", str(trace), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"]["kind"] == "compound_poisson"
    assert out["arrivals_option"].startswith("batch:")
    assert abs(out["compound"]["mean_group"] - 3.0) <= 1.5 * out["compound"]["mean_group_ci95"]
    assert set(out["index_of_dispersion"]) >= {"trace", "poisson", "batch"}
    assert main(["fit-arrivals", str(trace)]) == 0
    text = capsys.readouterr().out
    assert "fitted model: batch:empirical" in text and "index of dispersion" in text
    assert main(["fit-arrivals", str(tmp_path / "missing.csv")]) == 2


def test_solve_json_reports_the_arrival_model(capsys):
    argv = ["solve", "--rate", "400", "--max-batch", "16", "--weight", "1e-4", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["arrivals"]["kind"] == "poisson"
    assert main(argv + ["--arrivals", "batch:1"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["gain"] == plain["gain"] and one["policy"] == plain["policy"]
    assert main(argv + ["--arrivals", "batch:4"]) == 0
    grouped = json.loads(capsys.readouterr().out)
    assert grouped["arrivals"] == {"kind": "compound_poisson", "spec": "batch:4", "mean_group": 4.0,
                                   "group_sizes": "geometric", "group_pmf": None, "index_of_dispersion": 7.0}
    assert abs(grouped["gain"] - plain["gain"]) > 1e-3 * plain["gain"]  # groups change the optimum
    assert main(["solve", "--max-batch", "16", "--arrivals", "mmpp:500,50:1,2", "--json"]) == 0
    mm = json.loads(capsys.readouterr().out)
    assert mm["arrivals"]["kind"] == "mmpp" and mm["rate"] == pytest.approx(350.0)
    assert len(mm["phase_policies"]) == 2 and mm["policy"] == mm["phase_policies"][0]
    assert main(["solve", "--max-batch", "16", "--rate", "300", "--arrivals", "mmpp:500,50:1,2"]) == 2
    assert "mean rate" in capsys.readouterr().err
    assert main(["solve", "--max-batch", "16", "--rate", "300", "--arrivals", "batch:x"]) == 2


def test_simulate_grouped_stream_predicts_and_reports(capsys):
    argv = ["simulate", "--rate", "300", "--max-batch", "16", "--arrivals", "batch:4", "--requests", "30000", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_arrivals"]["spec"] == "batch:4"
    assert abs(out["mean_latency_s"] - out["predicted"]["mean_latency_s"]) <= 4 * out["latency_ci95_s"]
    assert main(argv + ["--model-arrivals", "poisson"]) == 0
    blind = json.loads(capsys.readouterr().out)
    assert blind["predicted"]["mean_latency_s"] < out["predicted"]["mean_latency_s"]
    assert main(["simulate", "--max-batch", "16", "--arrivals", "mmpp:500,50:1,2", "--requests", "20000", "--json"]) == 0
    mm = json.loads(capsys.readouterr().out)
    assert len(mm["phase_policies"]) == 2 and mm["predicted"]["cost"] > 0


@pytest.mark.parametrize("spec", ["batch:4", "mmpp:900,100:2,3"])
def test_compare_with_bursty_arrivals_adds_the_poisson_solved_policy(spec, tmp_path, capsys):
    argv = ["compare", "--max-batch", "16", "--loads", "0.4", "--weights", "1e-4", "--requests", "6000",
            "--timeouts", "0.001", "--arrivals", spec, "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arrivals"] == spec
    rows = {r["contender"]: r for r in out["points"][0]["rows"]}
    assert {"smdp", "smdp poisson", "greedy", "best timeout"} <= set(rows)
    # exact predictions under the bursty model: the arrival-aware policy is predicted no worse
    assert rows["smdp"]["pred_cost"] <= rows["smdp poisson"]["pred_cost"] * (1 + 1e-9)
    assert rows["smdp"]["pred_cost"] <= rows["greedy"]["pred_cost"] * (1 + 1e-9)


def test_fit_recovers_batch_mmpp():
    from solver.fit import fit_batch_mmpp

    proc = MMPP2((600.0, 60.0), (0.5, 1.0), (CompoundPoisson(3.0), CompoundPoisson(1.2)))
    t, _, _ = arrivals.mmpp2_path(proc, 80_000, rng=7)
    fit = fit_batch_mmpp(t, window_s=1e-9)
    for est, half, true in zip(fit.model.rates, fit.rates_ci95, proc.rates):
        assert _within(est, half, true)
    for est, half, true in zip(fit.model.switching, fit.switching_ci95, proc.switching):
        assert _within(est, half, true)
    assert fit.model.group_means == pytest.approx((3.0, 1.2), rel=0.08)
    full = fit_arrivals(t, group_window_s=1e-9)
    assert full.chosen == fit.model  # both clumped and modulated: neither plain model has both
    assert full.misfit["batch_mmpp"] < min(full.misfit["mmpp"], full.misfit["batch"])
    assert full.interarrival_cv["trace"] == pytest.approx(full.interarrival_cv["batch_mmpp"], rel=0.1)


def test_fit_recovers_a_three_phase_mmpp_and_the_choice_takes_three_where_two_miss():
    proc = MMPP2((900.0, 250.0, 20.0), (0.3, 0.2, 0.6, 0.4, 0.1, 0.5))  # three levels, phases of seconds
    t, _, _ = arrivals.mmpp2_path(proc, 150_000, rng=5)
    fit = fit_mmpp(t, phases=3)
    assert fit.model.phases == 3
    for est, half, true in zip(fit.model.rates, fit.rates_ci95, proc.rates):
        assert _within(est, half, true)
    for est, half, true in zip(fit.model.switching, fit.switching_ci95, proc.switching):
        assert _within(est, half, true)
    with pytest.raises(ModelError, match="max_phases"):
        fit_arrivals(t[:1000], max_phases=7)
    # short surges, a normal level and long quiet spells (three time scales): two phases miss the
    # surges' share of the dispersion and the choice goes to three
    proc = MMPP2((3000.0, 300.0, 10.0), (20.0, 0.0, 0.5, 0.5, 0.0, 0.33))
    t, _, _ = arrivals.mmpp2_path(proc, 60_000, rng=5)
    full = fit_arrivals(t, max_phases=3)
    assert full.misfit["mmpp3"] < full.misfit["mmpp"] - 0.1
    assert isinstance(full.chosen, MMPP2) and full.chosen.phases == 3
    assert full.chosen.rates[1:] == pytest.approx((300.0, 10.0), rel=0.05)


def test_two_phase_fit_is_unchanged_by_more_phases():
    proc = MMPP2((400.0, 40.0), (0.5, 1.0))
    t, _, _ = arrivals.mmpp2_path(proc, 30_000, rng=3)
    two, three = fit_arrivals(t, max_phases=2), fit_arrivals(t, max_phases=3)
    assert two.mmpp == three.mmpp and not two.more_phases
    assert "mmpp3" in three.more_phases and all(f.model.phases == 3 for f in three.more_phases.values())
    assert three.chosen == two.chosen  # more phases buy nothing on a two-phase stream: the simpler is kept


def test_the_choice_takes_four_phases_on_a_four_phase_stream_and_keeps_two_on_a_two_phase_one():
    """Four levels on their own time scales (short surges, busy, normal, quiet spells): the phase count
    is chosen by the dispersion curve up to the longest window the trace measures, and is the true one;
    on a two-phase stream four phases buy nothing and two are kept."""
    proc = MMPP2((3000.0, 600.0, 100.0, 5.0), (20.0, 0.0, 0.0, 0.3, 0.5, 0.2, 0.1, 0.2, 0.2, 0.0, 0.2, 0.13))
    t, _, _ = arrivals.mmpp2_path(proc, 60_000, rng=2)
    full = fit_arrivals(t, group_window_s=0.0, max_phases=4)
    assert isinstance(full.chosen, MMPP2) and full.chosen.phases == 4
    assert full.misfit["mmpp4"] < 0.5 * full.misfit["mmpp3"]
    fit = full.more_phases["mmpp4"]
    for est, half, true in zip(fit.model.rates[1:], fit.rates_ci95[1:], proc.rates[1:]):
        assert _within(est, half, true)
    two = MMPP2((400.0, 40.0), (0.5, 1.0))
    t, _, _ = arrivals.mmpp2_path(two, 30_000, rng=3)
    full = fit_arrivals(t, group_window_s=0.0, max_phases=4)
    assert isinstance(full.chosen, MMPP2) and full.chosen.phases == 2


def test_models_without_groups_are_not_chosen_where_the_trace_has_groups_they_cannot_produce():
    from solver.arrival_model import POISSON
    from solver.fit import groups_explained

    plain = MMPP2((600.0, 60.0), (0.5, 1.0))
    t, _, _ = arrivals.mmpp2_path(plain, 20_000, rng=8)
    window = 0.01 / ((t.size - 1) / t[-1])
    assert groups_explained(plain, t, window)  # chance neighbours within the window, as the model expects
    assert groups_explained(plain, t, 0.0)
    assert not groups_explained(POISSON, t, 3e-3)  # a Poisson stream has fewer close neighbours than an MMPP
    grouped = MMPP2((600.0, 60.0), (0.5, 1.0), (CompoundPoisson(1.5), CompoundPoisson(1.5)))
    g, _, _ = arrivals.mmpp2_path(grouped, 20_000, rng=8)
    assert not groups_explained(plain, g, window) and not groups_explained(plain, g, 0.0)
    full = fit_arrivals(g, max_phases=2)
    assert set(full.ungrouped) >= {"poisson", "mmpp"} and full.chosen.grouped
    with pytest.raises(ModelError, match="without groups"):
        groups_explained(grouped, g, window)
