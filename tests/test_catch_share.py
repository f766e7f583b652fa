"""The share of races Triton's batcher wins, fitted to a measured run (``solver.catch_share``): a run
simulated at a known share is given back its share from its mean latency; the curve falls with the
share; a figure outside the model's range gets the nearer end, flagged; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from solver import arrivals
from solver.catch_share import CatchShareFit, combined_share, fit_catch_share
from solver.errors import ModelError
from solver.model import ServiceProfile
from solver.policy import TritonBatcher
from solver.simulate import simulate_latencies

B, DELAY = 32, 0.02
PROF = ServiceProfile(mean_s=np.linspace(0.021, 0.06, B), energy_j=np.ones(B), cv=np.full(B, 0.05))
TIMES = arrivals.mmpp((210.0, 30.0), (0.5, 1.0), n=9000, rng=3)
WINDOW = (2.0, float(TIMES[-1]) - 2.0)


def _run(share: float, seed: int, hop_s: float = 0.0) -> np.ndarray:
    """A 'measured' run: Triton's batcher at ``share`` simulated with a seed the fit does not use."""
    _, lat = simulate_latencies(PROF, TritonBatcher(B, DELAY, catch_share=share), TIMES, idle_power_w=0.0,
                                weight=0.0, seed=seed)
    keep = (TIMES >= WINDOW[0]) & (TIMES < WINDOW[1])
    return lat[keep] + hop_s


@pytest.mark.parametrize("share", [0.25, 0.6, 0.9])
def test_a_runs_mean_latency_gives_back_its_share(share):
    """One run's W pins the share to about +-0.06 (its draw's noise, measured over 20 runs at 0.6 on a
    stream like this one); three runs averaged, within 0.1. The hop added to the run is taken off."""
    got = [fit_catch_share(PROF, B, DELAY, TIMES, float(np.mean(_run(share, 100 + i, 0.002))), hop_s=0.002,
                           window=WINDOW) for i in range(3)]
    assert all(g.bracketed and g.figure == "mean" for g in got)
    assert all(0.005 < g.se < 0.15 for g in got)  # its own standard error: the spread over 20 runs was 0.057
    assert abs(np.mean([g.share for g in got]) - share) < 0.1
    assert all(abs(g.share - share) < 0.2 for g in got)


def test_the_curve_falls_with_the_share_and_the_fit_reads_it_between_grid_points():
    fit = fit_catch_share(PROF, B, DELAY, TIMES, float(np.mean(_run(0.55, 7))), window=WINDOW)
    curve = np.asarray(fit.simulated_s)
    assert curve[0] > curve[-1] and np.all(np.diff(curve) < 0.002)  # falls, up to draw noise
    lo, hi = np.searchsorted(fit.grid, fit.share, side="right") - 1, np.searchsorted(fit.grid, fit.share)
    assert fit.grid[lo] <= fit.share <= fit.grid[hi]
    assert min(curve[lo], curve[hi]) - 1e-4 <= fit.measured_s <= max(curve[lo], curve[hi]) + 1e-4
    q = fit_catch_share(PROF, B, DELAY, TIMES, float(np.quantile(_run(0.55, 7), 0.99)), quantile=0.99,
                        window=WINDOW)
    assert q.figure == "q0.99" and 0.0 <= q.share <= 1.0 and q.simulated_s[0] > q.simulated_s[-1]
    assert "share" in q.describe() and q.to_dict()["figure"] == "q0.99"


def test_a_figure_outside_the_models_range_gets_the_nearer_end_flagged():
    fit = fit_catch_share(PROF, B, DELAY, TIMES, 0.0005, window=WINDOW)  # shorter than any share gives
    assert fit.share == 1.0 and not fit.bracketed and "outside" in fit.describe()
    fit = fit_catch_share(PROF, B, DELAY, TIMES, 5.0, window=WINDOW)  # longer than the batcher that never wins
    assert fit.share == 0.0 and not fit.bracketed


@pytest.mark.parametrize("kw, match", [
    (dict(measured_s=float("nan")), "measured"), (dict(measured_s=0.0), "measured"),
    (dict(quantile=1.0), "quantile"), (dict(quantile=1), "quantile"), (dict(hop_s=-0.001), "hop"),
    (dict(systematic_s=float("inf")), "systematic"),
    (dict(draws=0), "draws"), (dict(draws=True), "draws"), (dict(grid=(0.5,)), "grid"),
    (dict(grid=(0.5, 0.2)), "grid"), (dict(grid=(0.0, 1.5)), "grid"), (dict(window=(1e6, 2e6)), "window"),
    (dict(delay_s=-0.01), "delay"),
])
def test_bad_input_is_refused_with_a_clear_error(kw, match):
    args = dict(profile=PROF, max_batch=B, delay_s=DELAY, times=TIMES, measured_s=0.05)
    args.update(kw)
    with pytest.raises(ModelError, match=match):
        fit_catch_share(**args)


def test_fits_are_weighed_by_their_standard_errors():
    """The combination of one run's W and p99 fits lies between them, nearer the one with the smaller
    standard error; a flat figure (infinite error) does not count, and with no finite error the first
    fit's share is taken."""
    run = _run(0.5, 11)
    by_mean = fit_catch_share(PROF, B, DELAY, TIMES, float(np.mean(run)), window=WINDOW)
    by_q = fit_catch_share(PROF, B, DELAY, TIMES, float(np.quantile(run, 0.99)), quantile=0.99, window=WINDOW)
    assert all(len(f.spread_s) == len(f.grid) and 0 < f.se < 0.5 for f in (by_mean, by_q))
    both = combined_share([by_mean, by_q])
    assert min(by_mean.share, by_q.share) <= both <= max(by_mean.share, by_q.share)
    better, worse = sorted((by_mean, by_q), key=lambda f: f.se)
    assert abs(both - better.share) <= abs(both - worse.share)
    flat = CatchShareFit(0.9, "mean", 0.05, (0.0, 1.0), (0.05, 0.05), True)  # se inf
    assert combined_share([flat, by_q]) == pytest.approx(by_q.share)
    assert combined_share([flat, CatchShareFit(0.2, "q0.99", 0.05, (0.0, 1.0), (0.06, 0.04), True)]) == 0.9
    with pytest.raises(ModelError, match="no fit"):
        combined_share([])


def test_the_systematic_error_widens_the_standard_error_by_its_reach_on_the_curve():
    """A near-Poisson stream's mean moves a few ms over all shares: an error of the hop's size then moves the
    share a lot. The standard error grows with the systematic error, and by about that error over the
    curve's slope once it dominates the draws' spread."""
    t = np.cumsum(np.random.default_rng(5).exponential(1 / 150.0, 9000))
    window = (2.0, float(t[-1]) - 2.0)
    _, lat = simulate_latencies(PROF, TritonBatcher(B, DELAY, catch_share=0.6), t, idle_power_w=0.0, weight=0.0,
                                seed=50)
    measured = float(np.mean(lat[(t >= window[0]) & (t < window[1])]))
    fits = [fit_catch_share(PROF, B, DELAY, t, measured, window=window, systematic_s=e) for e in (0.0, 3e-4, 3e-3)]
    assert fits[0].se < fits[1].se < fits[2].se
    assert fits[0].share == fits[1].share == fits[2].share  # the share itself does not move
    slope = fits[2].simulated_s[0] - fits[2].simulated_s[-1]  # over the whole grid, share 0 to 1
    assert 0.5 * 3e-3 / slope < fits[2].se < 3.0 * 3e-3 / slope


def test_a_runs_two_fits_from_one_set_of_simulations_equal_two_separate_fits():
    """``fit_run`` reads the mean and the quantile off the same simulations: the same fits as two calls of
    ``fit_catch_share``, and their combination as its share."""
    from solver.catch_share import fit_run

    run = _run(0.45, 21, 0.001)
    both = fit_run(PROF, B, DELAY, TIMES, run, 0.99, hop_s=0.001, window=WINDOW)
    assert both.by_mean == fit_catch_share(PROF, B, DELAY, TIMES, float(np.mean(run)), hop_s=0.001, window=WINDOW)
    assert both.by_quantile == fit_catch_share(PROF, B, DELAY, TIMES, float(np.quantile(run, 0.99)), quantile=0.99,
                                               hop_s=0.001, window=WINDOW)
    assert both.share == combined_share([both.by_mean, both.by_quantile]) and both.to_dict()["share"] == both.share
    with pytest.raises(ModelError, match="latencies"):
        fit_run(PROF, B, DELAY, TIMES, np.empty(0), 0.99)
    with pytest.raises(ModelError, match="quantile"):
        fit_run(PROF, B, DELAY, TIMES, run, 1.5)
