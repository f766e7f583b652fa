"""The gate's decision core, driven by a fake clock: no network, no event loop."""

from __future__ import annotations

import numpy as np
import pytest

from plugin.gate import ModelGate, Pending, QueueFull
from solver.policy import PolicyTable, TimeoutRule, greedy, threshold


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(rule, **kw):
    clock = Clock()
    return ModelGate(rule, clock=clock, **kw), clock


def submit(gate, clock, k=1, key="m", **kw):
    items = []
    for _ in range(k):
        p = Pending(key=key, arrival=clock.t, **kw)
        gate.submit(p)
        items.append(p)
    return items


def test_greedy_serves_everything_waiting_up_to_B_when_free():
    gate, clock = make(greedy(4))
    items = submit(gate, clock, 6)
    step = gate.poll()
    assert [len(b) for b in step.batches] == [4]
    assert list(step.batches[0]) == items[:4]  # FIFO: the oldest four
    assert gate.queue_length == 2 and gate.in_flight == 1
    # busy: arrivals do not start anything
    submit(gate, clock, 1)
    assert gate.poll().batches == ()
    gate.complete()
    step = gate.poll()
    assert [len(b) for b in step.batches] == [3]
    assert gate.queue_length == 0


def test_threshold_policy_waits_below_threshold_and_asks_for_no_timer():
    gate, clock = make(threshold(8, 3))
    submit(gate, clock, 2)
    step = gate.poll()
    assert step.batches == () and step.wake_at is None
    submit(gate, clock, 1)
    step = gate.poll()
    assert [len(b) for b in step.batches] == [3]


def test_policy_table_action_is_applied_exactly():
    # a(n): wait at 0..1, serve 2 at n=2, serve 2 at n=3, serve 4 from n=4 on
    table = PolicyTable(np.array([0, 0, 2, 2, 4]), max_batch=4)
    gate, clock = make(table)
    submit(gate, clock, 3)
    assert [len(b) for b in gate.poll().batches] == [2]
    gate.complete()
    submit(gate, clock, 4)  # n = 5 > N: serve min(n, B) = 4
    assert [len(b) for b in gate.poll().batches] == [4]


def test_timeout_rule_asks_for_a_timer_and_serves_when_it_fires():
    gate, clock = make(TimeoutRule(max_batch=8, timeout_s=0.002))
    submit(gate, clock, 1)
    step = gate.poll()
    assert step.batches == () and step.wake_at == pytest.approx(0.002)
    clock.t = 0.001
    submit(gate, clock, 1)
    assert gate.poll().wake_at == pytest.approx(0.002)  # still the oldest's timer
    clock.t = 0.002
    step = gate.poll()
    assert [len(b) for b in step.batches] == [2]


def test_several_slots_dispatch_several_batches_at_once():
    gate, clock = make(greedy(2), slots=3)
    submit(gate, clock, 5)
    step = gate.poll()
    assert [len(b) for b in step.batches] == [2, 2, 1]
    assert gate.in_flight == 3
    with pytest.raises(RuntimeError):
        for _ in range(4):
            gate.complete()


def test_bounded_queue_refuses_and_loses_nothing():
    gate, clock = make(threshold(4, 4), max_queue=3)
    items = submit(gate, clock, 3)
    with pytest.raises(QueueFull):
        submit(gate, clock, 1)
    assert gate.queue_length == 3 and gate.counters.rejected == 1
    gate.set_rule(greedy(4))
    step = gate.poll()
    assert list(step.batches[0]) == items


def test_incompatible_requests_are_not_merged_and_order_is_kept():
    gate, clock = make(greedy(8))
    a1 = submit(gate, clock, 1, key="A")[0]
    b1 = submit(gate, clock, 1, key="B")[0]
    a2 = submit(gate, clock, 1, key="A")[0]
    solo = submit(gate, clock, 1, key=None)[0]
    step = gate.poll()
    assert step.batches == ((a1, a2),)
    gate.complete()
    assert gate.poll().batches == ((b1,),)
    gate.complete()
    assert gate.poll().batches == ((solo,),)  # unmergeable requests go alone
    assert gate.queue_length == 0


def test_rows_are_capped_at_the_model_maximum_batch():
    gate, clock = make(greedy(8))
    big = submit(gate, clock, 1, rows=6)[0]
    small = submit(gate, clock, 2, rows=2)
    step = gate.poll()
    assert step.batches == ((big, small[0]),)  # 6 + 2 = 8 rows; the third would make 10
    gate.complete()
    assert gate.poll().batches == ((small[1],),)


def test_priority_orders_the_queue_but_the_rule_sees_the_whole_backlog():
    gate, clock = make(threshold(2, 3))
    low = submit(gate, clock, 2, priority=2)
    clock.t = 1.0
    high = submit(gate, clock, 1, priority=1)[0]
    step = gate.poll()  # n = 3 reaches the threshold; the urgent one goes first
    assert step.batches == ((high, low[0]),)


def test_cancelled_request_frees_its_place_and_is_never_dispatched():
    gate, clock = make(threshold(4, 3), max_queue=3)
    items = submit(gate, clock, 3)
    # the third arrival reached the threshold only if polled; cancel before the epoch
    assert gate.cancel(items[1])
    assert not gate.cancel(items[1])
    assert gate.queue_length == 2
    submit(gate, clock, 1)  # the freed place is usable
    step = gate.poll()
    assert items[1] not in step.batches[0] and len(step.batches[0]) == 3
    assert not gate.cancel(items[0])  # already dispatched


def test_expired_requests_are_dropped_before_deciding_and_reported():
    gate, clock = make(threshold(4, 3))
    doomed = submit(gate, clock, 1, deadline=0.005)[0]
    keep = submit(gate, clock, 1)[0]
    step = gate.poll()
    assert step.batches == () and step.wake_at == pytest.approx(0.005)
    clock.t = 0.006
    submit(gate, clock, 1)
    step = gate.poll()
    assert step.expired == (doomed,)
    assert step.batches == ()  # n fell to 2, below the threshold
    assert gate.queue_length == 2 and keep.live


def test_rule_swap_takes_effect_at_the_next_decision():
    gate, clock = make(threshold(4, 4))
    submit(gate, clock, 2)
    assert gate.poll().batches == ()
    gate.set_rule(greedy(4))
    assert [len(b) for b in gate.poll().batches] == [2]


def test_every_request_is_dispatched_exactly_once_under_random_events():
    rng = np.random.default_rng(7)
    gate, clock = make(TimeoutRule(8, 0.003), slots=2, max_queue=50)
    seen: dict[int, int] = {}
    outstanding: list[tuple[Pending, ...]] = []
    accepted = refused = cancelled = expired = 0
    pendings = []
    for _ in range(5000):
        clock.t += float(rng.exponential(0.0005))
        r = rng.random()
        if r < 0.6:
            p = Pending(key=int(rng.integers(0, 2)), arrival=clock.t,
                        deadline=clock.t + 0.01 if rng.random() < 0.1 else None)
            try:
                gate.submit(p)
                accepted += 1
                pendings.append(p)
            except QueueFull:
                refused += 1
        elif r < 0.65 and pendings:
            if gate.cancel(pendings[int(rng.integers(0, len(pendings)))]):
                cancelled += 1
        elif outstanding:
            outstanding.pop(0)
            gate.complete()
        step = gate.poll()
        expired += len(step.expired)
        for b in step.batches:
            assert len(b) <= 8 and len({p.key for p in b}) == 1
            for p in b:
                seen[id(p)] = seen.get(id(p), 0) + 1
        outstanding.extend(step.batches)
    assert all(v == 1 for v in seen.values())
    assert accepted == len(seen) + cancelled + expired + gate.queue_length
    assert refused == gate.counters.rejected


def test_max_wait_guard_serves_stranded_requests_when_traffic_stops():
    from solver.policy import MaxWaitGuard

    gate, clock = make(MaxWaitGuard(threshold(8, 6), max_wait_s=0.5))
    submit(gate, clock, 3)
    step = gate.poll()
    assert step.batches == () and step.wake_at == pytest.approx(0.5)  # the policy waits, guarded
    clock.t = 0.2
    submit(gate, clock, 2)
    assert gate.poll().batches == ()  # 5 < 6: still the policy's call
    clock.t = 0.5
    assert [len(b) for b in gate.poll().batches] == [5]  # the oldest waited 0.5 s: serve what is there
    gate.complete()
    submit(gate, clock, 6)
    assert [len(b) for b in gate.poll().batches] == [6]  # the threshold itself is unchanged


def test_max_wait_guard_keeps_the_tighter_timer_of_the_rule():
    from solver.policy import MaxWaitGuard

    gate, clock = make(MaxWaitGuard(TimeoutRule(8, 0.002), max_wait_s=0.5))
    submit(gate, clock, 1)
    assert gate.poll().wake_at == pytest.approx(0.002)
    with pytest.raises(ValueError):
        MaxWaitGuard(greedy(4), 0.0)
