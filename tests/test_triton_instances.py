"""Triton's batcher at k instances and with config mode's preferred sizes (``solver.policy.TritonInstances``):
equality with the rules it extends where the race cannot happen or is always won, a hand-worked k = 2 sequence,
the longer tail when the race is lost, and the bench's predictions built on it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from plugin.config_mode.compiler import DynamicBatchingSettings, TritonBatcherRule
from solver import arrivals
from solver.arrival_model import parse_arrivals
from solver.model import BatchingModel, ModelError, ServiceProfile
from solver.policy import PerInstance, TimeoutRule, TritonBatcher, TritonInstances, greedy
from solver.simulate import simulate, simulate_latencies

KW = dict(idle_power_w=1.0, weight=0.0, seed=0)
PROF = ServiceProfile(mean_s=np.linspace(0.021, 0.06, 32), energy_j=np.linspace(1.0, 4.0, 32), cv=np.full(32, 0.2))


def _det(means_ms: list[float]) -> ServiceProfile:
    n = len(means_ms)
    return ServiceProfile(mean_s=np.array(means_ms) / 1e3, energy_j=np.ones(n), cv=np.zeros(n))


def _clumped(k: int, n: int = 12_000, seed: int = 2) -> np.ndarray:
    """A two-phase stream in groups, at a load where the k instances are often all busy with work queued."""
    return arrivals.from_model(parse_arrivals(f"mmpp:{230 * k},{30 * k}:0.5,1:3,1.2"), 0.0, n, rng=seed)


def _same(a, b) -> bool:
    (ra, la), (rb, lb) = a, b
    return np.array_equal(la, lb) and ra == rb


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_winning_every_race_is_the_per_instance_timeout_rule_exactly(k, delay):
    t = _clumped(k)
    old = simulate_latencies(PROF, PerInstance(TimeoutRule(32, delay), k), t, **KW)
    new = simulate_latencies(PROF, TritonInstances(TimeoutRule(32, delay), k, catch_share=1.0), t, **KW)
    assert _same(old, new)
    # with D < k devices too (the power sums what the summary sums)
    old = simulate(PROF, PerInstance(TimeoutRule(32, delay), k), t, **KW, devices=1)
    assert old == simulate(PROF, TritonInstances(TimeoutRule(32, delay), k, 1.0), t, **KW, devices=1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_winning_every_race_is_the_compiled_config_rule_exactly(k):
    t = _clumped(k)
    for rule in (TritonBatcherRule(32, (4, 8, 16, 32), 0.02), TritonBatcherRule(32, (3, 5, 32), 0.0),
                 DynamicBatchingSettings((32,), 15_000, 32).rule()):  # P = {B}: a TimeoutRule
        old_rule = rule if k == 1 else PerInstance(rule, k)
        old = simulate_latencies(PROF, old_rule, t, **KW)
        assert _same(old, simulate_latencies(PROF, TritonInstances(rule, k, catch_share=1.0), t, **KW)), rule


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6, 1.0])
def test_one_instance_is_tritons_one_instance_batcher_exactly(share):
    t = _clumped(1, seed=5)  # in groups: the waking group split, as the one-instance model does
    for delay in (0.0, 0.01, 0.02):
        old = simulate_latencies(PROF, TritonBatcher(32, delay, catch_share=share), t, **KW)
        new = simulate_latencies(PROF, TritonInstances(TimeoutRule(32, delay), 1, catch_share=share), t, **KW)
        assert _same(old, new), delay
        assert _same(old, simulate_latencies(PROF, TritonInstances.of(TritonBatcher(32, delay, catch_share=share)),
                                             t, **KW))
    # the idle wait as well (a short one, so that it fires)
    old = simulate_latencies(PROF, TritonBatcher(32, 0.01, catch_share=share, idle_wait_s=0.03), t, **KW)
    new = simulate_latencies(PROF, TritonInstances(TimeoutRule(32, 0.01), 1, share, idle_wait_s=0.03), t, **KW)
    assert _same(old, new)


def _lat_ms(rule, prof, t) -> tuple[tuple[int, ...], list[float]]:
    res, lat = simulate_latencies(prof, rule, np.asarray(t, dtype=float), **KW)
    return res.batch_hist, [round(x * 1e3, 6) for x in lat]


def test_hand_worked_sequence_at_two_instances():
    # B = 4, T = 4 ms; tau(1) = 10, tau(2) = 12 ms; two instances. Arrivals (ms):
    t = [0.0, 0.001, 0.006, 0.007, 0.014, 0.040, 0.041, 0.046, 0.047, 0.054, 0.059, 0.059]
    prof = _det([10, 12, 14, 16])
    # Both models: {0, 1} at 4 on one instance (done 16), {6, 7} at 10 on the other (done 22); 14 comes with
    # both busy. {40, 41} at 44 (done 56), {46, 47} at 50 (done 62); 54 comes with both busy.
    # Winning every race (the per-instance timeout rule): at 16 the batcher sees the instance free, 14's timer
    # fires at 18 (done 28, 14 ms). At 56 likewise: 54 served at 58 (done 68); the two of 59 wait for the other
    # instance, free at 62, their timer fires at 63 (done 75, 16 ms each).
    won = TritonInstances(TimeoutRule(4, 0.004), 2, catch_share=1.0)
    assert _lat_ms(won, prof, t) == ((2, 5, 0, 0), [16, 15, 16, 15, 14, 16, 15, 16, 15, 14, 16, 16])
    assert _lat_ms(PerInstance(TimeoutRule(4, 0.004), 2), prof, t) == _lat_ms(won, prof, t)
    # Losing every race: at 16 the instance idles with 14 queued; no arrival comes before the other instance's
    # completion at 22, whose callback finds the first waiting: 14 (waited 8 >= T) is served at 22 (done 32,
    # 18 ms). At 56 the instance idles with 54 queued; the arrival at 59 (the first of a group of two) wakes the
    # batcher before the other completion (62): 54 has waited 5 >= T, so {54, 59} go at once (done 71) and the
    # group's second waits. At 62 the other instance frees with it queued while the first is busy: a race
    # again, lost; no arrival follows, so the first instance's completion at 71 wakes the batcher and it is
    # served then (done 81, 22 ms).
    lost = TritonInstances(TimeoutRule(4, 0.004), 2, catch_share=0.0)
    assert _lat_ms(lost, prof, t) == ((2, 5, 0, 0), [16, 15, 16, 15, 18, 16, 15, 16, 15, 17, 12, 22])


def test_a_completion_while_another_instance_is_free_is_no_race():
    # B = 4, T = 20 ms, tau(1) = 10: {0} alone goes at 20 (done 30); 25 arrives with the other instance free
    # and its timer runs: the completion at 30 frees a second instance, no race, 25 served at 45 as the
    # timeout rule serves it, whatever the share.
    t = [0.0, 0.025]
    prof = _det([10, 12, 14, 16])
    for share in (0.0, 1.0):
        assert _lat_ms(TritonInstances(TimeoutRule(4, 0.02), 2, share), prof, t) == ((2, 0, 0, 0), [30, 30])


def test_the_idle_wait_wakes_it_when_nothing_else_does_at_two_instances():
    # B = 4, T = 4 ms; tau(b) = 100 ms. {0, 1} at 4 (done 104), {6, 7} at 10 (done 110); 50 comes with both
    # busy; at 104 the first instance idles with it queued (race lost). The next event: the other completion
    # at 110, unless the idle wait (ticks of 40 ms from the last dispatch at 10: 50, 90, 130) comes first --
    # it does not here, so the completion wakes it at 110 (done 210). With 30 ms: ticks at 40, 70, 100, 130:
    # the first at or after 104 is 130 > 110, still the completion.
    t = [0.0, 0.001, 0.006, 0.007, 0.050]
    prof = _det([100, 100, 100, 100])
    for wait in (0.04, 0.03):
        lat = _lat_ms(TritonInstances(TimeoutRule(4, 0.004), 2, 0.0, idle_wait_s=wait), prof, t)[1]
        assert lat[-1] == pytest.approx(210 - 50)
    # A completion later than the tick: the second batch takes 300 ms (tau(2) = 300), done 310; ticks of 40 ms
    # from 10: the first at or after 104 is 130: 50 served at 130 (done 230).
    slow2 = _det([100, 300, 300, 300])
    t = [0.0, 0.006, 0.007, 0.050]  # {0} at 4 (done 104), {6, 7} at 10 (done 310)
    lat = _lat_ms(TritonInstances(TimeoutRule(4, 0.004), 2, 0.0, idle_wait_s=0.04), slow2, t)[1]
    assert lat == [104, pytest.approx(304), pytest.approx(303), pytest.approx(230 - 50)]


@pytest.mark.parametrize("k", [2, 3])
def test_losing_the_race_at_k_instances_lengthens_the_tail_on_a_clumped_stream(k):
    t = _clumped(k, n=20_000, seed=1)
    res = {c: simulate(PROF, TritonInstances(TimeoutRule(32, 0.01), k, c), t, **KW) for c in (1.0, 0.6, 0.0)}
    assert res[0.0].p99_latency_s > res[1.0].p99_latency_s + 0.003
    assert res[1.0].mean_latency_s < res[0.6].mean_latency_s < res[0.0].mean_latency_s
    assert res[0.0].n_requests == res[1.0].n_requests
    # the same seed, the same races
    assert simulate(PROF, TritonInstances(TimeoutRule(32, 0.01), k), t, **KW) == res[0.6]
    # config mode's preferred sizes too
    rule = TritonBatcherRule(32, (4, 8, 16, 32), 0.01)
    p99 = [simulate(PROF, TritonInstances(rule, k, c), t, **KW).p99_latency_s for c in (1.0, 0.0)]
    assert p99[1] > p99[0] + 0.003


def test_bad_input_is_refused():
    rule = TimeoutRule(4, 0.01)
    with pytest.raises(ValueError, match="instances must be an integer >= 1, got 0"):
        TritonInstances(rule, 0)
    with pytest.raises(ValueError, match="instances must be an integer >= 1, got True"):
        TritonInstances(rule, True)
    with pytest.raises(ValueError, match="instances must be an integer >= 1, got 1.5"):
        TritonInstances(rule, 1.5)
    with pytest.raises(ValueError, match="catch share must be a number in \\[0, 1\\], got 1.5"):
        TritonInstances(rule, 2, catch_share=1.5)
    with pytest.raises(ValueError, match="catch share"):
        TritonInstances(rule, 2, catch_share=True)
    with pytest.raises(ValueError, match="idle wait must be finite and > 0 seconds, got 0.0"):
        TritonInstances(rule, 2, idle_wait_s=0.0)
    for bad in (PerInstance(rule, 2), TritonBatcher(4, 0.01), TritonInstances(rule, 2), "timeout:0.01"):
        with pytest.raises(ValueError, match="one-server BatchRule"):
            TritonInstances(bad, 2)
    with pytest.raises(ValueError, match="expected a TritonBatcher, got TimeoutRule"):
        TritonInstances.of(rule)
    with pytest.raises(ModelError, match="devices must be an integer in 1..instances = 2, got 3"):
        simulate(PROF, TritonInstances(rule, 2), np.array([0.0, 1.0]), **KW, devices=3)
    with pytest.raises(ModelError, match="exceeds"):
        simulate(_det([10, 12]), TritonInstances(rule, 2), np.array([0.0, 1.0]), **KW)


# --- the bench's predictions --------------------------------------------------------------------------------

def _model(k: int, rate: float) -> BatchingModel:
    return BatchingModel(rate, 32, PROF, 1.0, 1e-3, instances=k)


def test_tritons_prediction_at_k_instances_is_its_batcher_with_the_race_averaged_over_the_draws():
    from loadtest.contenders import TRITON_DRAWS, Contender, predict, triton_prediction

    model = _model(2, 250.0)
    t = _clumped(2, n=4000)
    got = predict(Contender("triton", max_queue_delay_us=10_000), model, t, seed=3, warmup_s=1.0)
    kw = dict(idle_power_w=1.0, weight=1e-3, warmup=1.0, devices=model.idle_devices)
    sims = [simulate(PROF, TritonInstances(TimeoutRule(32, 0.01), 2), t, **kw, seed=3 + i) for i in range(TRITON_DRAWS)]
    assert got.source == "sim"
    assert got.mean_latency_s == pytest.approx(np.mean([s.mean_latency_s for s in sims]), rel=1e-12)
    assert got.cost == pytest.approx(np.mean([s.cost for s in sims]), rel=1e-12)
    # won every race, one draw: the figure the bench gave before (the timeout rule on each instance)
    one = triton_prediction(model, 0.01, t, seed=3, warmup_s=1.0, draws=1, catch_share=1.0)
    old = simulate(PROF, PerInstance(TimeoutRule(32, 0.01), 2), t, **kw, seed=3)
    assert (one.mean_latency_s, one.mean_power_w, one.cost) == (old.mean_latency_s, old.mean_power_w, old.cost)
    # delay 0: the bench gave greedy on each instance; the batcher that wins every race is that
    zero = triton_prediction(model, 0.0, t, seed=3, warmup_s=1.0, draws=1, catch_share=1.0)
    assert zero.mean_latency_s == pytest.approx(simulate(PROF, PerInstance(greedy(32), 2), t, **kw, seed=3)
                                                .mean_latency_s, rel=1e-12)
    assert predict(Contender("triton", max_queue_delay_us=0), model, t, seed=3, warmup_s=1.0).mean_latency_s > \
        zero.mean_latency_s
    with pytest.raises(ValueError, match="draws must be an integer >= 1, got 0"):
        triton_prediction(model, 0.01, t, draws=0)


def test_config_modes_prediction_is_its_compiled_rule_with_the_race():
    from loadtest.contenders import TRITON_DRAWS, Contender, config_prediction, predict

    model = _model(1, 120.0)
    t = _clumped(1, n=4000, seed=4)
    settings = DynamicBatchingSettings((4, 8, 16, 32), 10_000, 32)

    compiled = SimpleNamespace(settings=settings)  # what predict reads of compile_config's result
    got = predict(Contender("config"), model, t, seed=2, warmup_s=1.0, compiled=compiled)
    kw = dict(idle_power_w=1.0, weight=1e-3, warmup=1.0)
    sims = [simulate(PROF, TritonInstances(settings.rule(), 1), t, **kw, seed=2 + i) for i in range(TRITON_DRAWS)]
    assert got.source == "sim"
    assert got.mean_latency_s == pytest.approx(np.mean([s.mean_latency_s for s in sims]), rel=1e-12)
    # won every race, one draw: the compiled rule as config mode simulated it before
    one = config_prediction(model, settings, t, seed=2, warmup_s=1.0, draws=1, catch_share=1.0)
    old = simulate(PROF, settings.rule(), t, **kw, seed=2)
    assert (one.mean_latency_s, one.mean_power_w, one.cost) == (old.mean_latency_s, old.mean_power_w, old.cost)
    assert got.mean_latency_s > one.mean_latency_s  # the race lengthens its W on this stream
