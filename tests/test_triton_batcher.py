"""Triton's own batcher without prefetching (``solver.policy.TritonBatcher``) in the simulator:
hand-worked event sequences, and equality with ``TimeoutRule`` wherever the instance is never freed
with requests queued (the only place the two differ)."""

from __future__ import annotations

import numpy as np
import pytest

from solver import arrivals
from solver.model import ModelError, ServiceProfile
from solver.policy import TimeoutRule, TritonBatcher
from solver.simulate import simulate, simulate_latencies

KW = dict(idle_power_w=1.0, weight=0.0, seed=0)


def _missing(max_batch: int, timeout_s: float, **kw) -> TritonBatcher:
    """The batcher that never wins the race at a completion (``catch_share`` 0): deterministic."""
    return TritonBatcher(max_batch, timeout_s, catch_share=0.0, **kw)


def _det(means_ms: list[float]) -> ServiceProfile:
    """Deterministic service times (ms per batch size 1..len)."""
    n = len(means_ms)
    return ServiceProfile(mean_s=np.array(means_ms) / 1e3, energy_j=np.ones(n), cv=np.zeros(n))


def _lat_ms(rule, prof, t) -> tuple[tuple[int, ...], list[float]]:
    res, lat = simulate_latencies(prof, rule, np.asarray(t, dtype=float), **KW)
    return res.batch_hist, [round(x * 1e3, 6) for x in lat]


def test_hand_worked_sequence_the_instance_frees_with_a_request_queued():
    # T = 5 ms; tau(1) = 10, tau(2) = 12 ms. Arrivals (ms): 0, 1, 15, 30, 100, 103.
    prof = _det([10, 12, 14, 16])
    t = [0.0, 0.001, 0.015, 0.030, 0.100, 0.103]
    # Both: {0, 1} served at 5 (the oldest waited T), done at 17.
    # TimeoutRule: at 17 the request of 15 waits; its timer fires at 20 -> done 30 (15 ms); the arrival
    # at 30 fires at 35 -> done 45 (15 ms).
    assert _lat_ms(TimeoutRule(4, 0.005), prof, t) == ((2, 2, 0, 0), [17, 16, 15, 15, 17, 14])
    # Triton: at 17 the batcher has not noticed the instance free; the arrival at 30 wakes it, the
    # oldest (15) has waited 15 >= T: {15, 30} served at 30 -> done 42 (27 and 12 ms).
    assert _lat_ms(_missing(4, 0.005), prof, t) == ((0, 3, 0, 0), [17, 16, 27, 12, 17, 14])


def test_the_idle_wait_wakes_the_batcher_when_no_arrival_does():
    # One request queued at the completion and nothing after it: the 500 ms wait, counted from the
    # last dispatch (5 ms), ends at 505 ms; tau(1) = 10 ms.
    prof = _det([10, 12, 14, 16])
    t = [0.0, 0.001, 0.012]
    hist, lat = _lat_ms(_missing(4, 0.005), prof, t)
    assert hist == (1, 1, 0, 0)
    assert lat == [17, 16, pytest.approx(505 + 10 - 12)]
    # a shorter idle wait, 50 ms: 5 + 50 = 55 -> done 65
    assert _lat_ms(_missing(4, 0.005, idle_wait_s=0.05), prof, t)[1] == [17, 16, pytest.approx(65 - 12)]
    # a service longer than the wait: ticks at 5 + 40 k, the first at or after the completion (105): 125
    slow = _det([100, 100, 100, 100])
    assert _lat_ms(_missing(4, 0.005, idle_wait_s=0.04), slow, t)[1] == [105, 104, pytest.approx(225 - 12)]


def test_when_awake_it_runs_the_delay_timer_and_serves_full_batches():
    prof = _det([10, 12, 14])
    # T = 20, B = 3. {0} alone: its timer fires at 20, done 30. The request of 25 came while busy; the
    # arrival at 35 wakes the batcher, but the oldest (25) has waited only 10 < T: the timer runs (the
    # instance is free) and fires at 45 with {25, 35}, done 57 -- what TimeoutRule does too.
    t = [0.0, 0.025, 0.035]
    for rule in (TimeoutRule(3, 0.02), _missing(3, 0.02)):
        assert _lat_ms(rule, prof, t) == ((1, 1, 0), [30, 32, 22])
    # {0, 9} at 20 (T), done 32; 25 and 26 come while busy; the arrival at 50 wakes it, the oldest has
    # waited 25 >= T: {25, 26, 50} at 50, done 64 (TimeoutRule serves {25, 26} at 45, done 57, and {50} at 70).
    t = [0.0, 0.009, 0.025, 0.026, 0.050]
    assert _lat_ms(_missing(3, 0.02), prof, t) == ((0, 1, 1), [32, 23, 39, 38, 14])
    assert _lat_ms(TimeoutRule(3, 0.02), prof, t) == ((1, 2, 0), [32, 23, 32, 31, 30])
    # The first request of the waking group wakes it; the oldest has waited: it dispatches at once, before
    # the rest of the group is enqueued. T = 5: {0, 1} at 5, done 17; 15 waits; the group of two at 40
    # wakes it: {15, 40} at 40, done 52; the other 40 waits for the next wake, the arrival at 70.
    g = [0.0, 0.001, 0.015, 0.040, 0.040, 0.070]
    assert _lat_ms(_missing(3, 0.005), prof, g) == ((0, 3, 0), [17, 16, 37, 12, 42, 12])
    # a waking group whose oldest has not waited T joins whole while the timer runs: T = 20; {0} at 20,
    # done 30; 25 waits; the group at 35 wakes it, 25 has waited 10: the timer fires at 45 with all three
    # (B = 4: three do not fill a batch)
    g = [0.0, 0.025, 0.035, 0.035]
    assert _lat_ms(_missing(4, 0.02), _det([10, 12, 14, 16]), g) == ((1, 0, 1, 0), [30, 34, 24, 24])


@pytest.mark.parametrize("timeout", [0.0, 0.004, 0.02])
def test_equals_timeout_rule_when_the_queue_is_empty_at_every_completion(timeout):
    # Arrivals spaced further apart than T plus the longest service: every batch is one request and the
    # instance always frees to an empty queue, so the two models coincide request by request.
    prof = ServiceProfile(mean_s=np.linspace(0.010, 0.030, 8), energy_j=np.ones(8), cv=np.full(8, 0.3))
    rng = np.random.default_rng(3)
    t = np.cumsum(0.06 + rng.exponential(0.05, 400))
    a, la = simulate_latencies(prof, TimeoutRule(8, timeout), t, **KW)
    b, lb = simulate_latencies(prof, TritonBatcher(8, timeout), t, **KW)
    assert np.array_equal(la, lb) and a.batch_hist == b.batch_hist


def test_clumped_arrivals_give_smaller_batches_and_a_longer_tail_than_the_timeout_rule():
    # At a load where completions often find requests queued, the batcher's sleep until the next arrival
    # makes every such request wait for it: a longer mean and tail; the instance serves later, so not less.
    prof = ServiceProfile(mean_s=np.linspace(0.021, 0.06, 32), energy_j=np.ones(32), cv=np.zeros(32))
    t = arrivals.mmpp((210.0, 30.0), (0.5, 1.0), n=20_000, rng=1)
    a = simulate(prof, TimeoutRule(32, 0.02), t, **KW)
    b = simulate(prof, TritonBatcher(32, 0.02), t, **KW)  # the measured share of races won
    assert b.p99_latency_s > a.p99_latency_s + 0.005
    assert b.mean_latency_s > a.mean_latency_s
    assert b.n_requests == a.n_requests


def test_winning_every_race_is_the_timeout_rule_and_the_race_is_seeded():
    prof = ServiceProfile(mean_s=np.linspace(0.021, 0.06, 32), energy_j=np.ones(32), cv=np.full(32, 0.2))
    t = arrivals.mmpp((210.0, 30.0), (0.5, 1.0), n=5_000, rng=2)
    a, la = simulate_latencies(prof, TimeoutRule(32, 0.02), t, **KW)
    b, lb = simulate_latencies(prof, TritonBatcher(32, 0.02, catch_share=1.0), t, **KW)
    assert np.array_equal(la, lb) and a.batch_hist == b.batch_hist
    # a share in between: W between the two extremes, and the same answer for the same seed
    w = [simulate(prof, TritonBatcher(32, 0.02, catch_share=c), t, **KW).mean_latency_s for c in (1.0, 0.5, 0.0)]
    assert w[0] < w[1] < w[2]
    assert simulate(prof, TritonBatcher(32, 0.02), t, **KW) == simulate(prof, TritonBatcher(32, 0.02), t, **KW)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="timeout"):
        TritonBatcher(4, -1.0)
    with pytest.raises(ValueError, match="max_batch"):
        TritonBatcher(0, 0.01)
    with pytest.raises(ValueError, match="catch share"):
        TritonBatcher(4, 0.01, catch_share=1.5)
    with pytest.raises(ValueError, match="idle wait"):
        TritonBatcher(4, 0.01, idle_wait_s=0.0)
    with pytest.raises(ModelError, match="exceeds"):
        simulate(_det([10, 12]), TritonBatcher(4, 0.01), np.array([0.0, 1.0]), **KW)


def test_the_benchs_race_evidence_reads_the_batcher_from_answers_alone():
    """``bench/triton_tail.race_evidence`` on answers simulated by each model (a batch's answers at its
    completion plus a hop): the TimeoutRule starts every due batch at the completion, the batcher that never
    wins the race starts none there and every late one by the gap to the next arrival, and the share measured
    for the default batcher is near its ``catch_share``."""
    from bench.triton_tail import race_evidence

    from solver.arrival_model import parse_arrivals

    prof = ServiceProfile(mean_s=np.linspace(0.021, 0.06, 64), energy_j=np.ones(64), cv=np.zeros(64))
    t = arrivals.from_model(parse_arrivals("mmpp:210,30:0.5,1:3,1.2"), 0.0, 6_000, rng=5)  # in groups
    hop = 0.001

    def evidence(rule) -> dict:
        _, lat = simulate_latencies(prof, rule, t, **KW)
        done = t + lat + hop
        _, inv, cnt = np.unique(np.round(done, 12), return_inverse=True, return_counts=True)
        return race_evidence(t, done, cnt[inv], np.ones(t.size, dtype=bool), prof, 0.02, hop)

    timeout, never, half = (evidence(r) for r in (TimeoutRule(64, 0.02), _missing(64, 0.02), TritonBatcher(64, 0.02)))
    assert timeout["transitions"] > 100 and timeout["started_at_completion_share"] == 1.0
    assert timeout["split_group_share"] == 0.0
    assert never["started_at_completion_share"] < 0.1 and never["late_vs_next_arrival"] > 0.9
    assert never["split_group_share"] > 0.0
    assert abs(half["started_at_completion_share"] - 0.5) < 0.1
