"""The gate's decision core, driven by a fake clock: no network, no event loop."""

from __future__ import annotations

import numpy as np
import pytest

from plugin.gate import ModelGate, Pending, QueueFull
from solver.policy import Decision, GateRule, GroupHold, MaxWaitGuard, PolicyTable, TimeoutRule, greedy, static, threshold


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


# The gate's deterministic cases are shared with the native plane: tests/vectors/*.json, run by
# tests/test_vectors.py here and by native/test_gate_core.cc there. What follows is Python's own.


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


def test_a_rule_and_the_description_the_gate_runs_decide_alike():
    """The gate runs ``GateRule.of(rule)``: the same decisions as the rule's own, on a grid of states."""
    rules = [
        greedy(4), threshold(8, 3), threshold(4, 9), static(8, 3), PolicyTable(np.array([0, 0, 2, 2, 4]), 4),
        TimeoutRule(8, 0.002), TimeoutRule(4, 0.0), MaxWaitGuard(threshold(8, 6), 0.5),
        MaxWaitGuard(TimeoutRule(4, 0.01), 0.002), MaxWaitGuard(static(8, 2), 0.003),
    ]
    waits = [0.0, 0.0005, 0.001999, 0.002, 0.0025, 0.003, 0.01, 0.4999, 0.5, 2.0]
    for rule in rules:
        described = GateRule.of(rule)
        assert described.max_batch == rule.max_batch
        for n in range(0, 14):
            for w in waits:
                assert described.decide(n, w) == rule.decide(n, w), (rule, n, w)


def test_a_guard_around_a_timeout_reports_whichever_fires_first():
    """One description runs both planes: the tighter of the two waits decides, and names itself."""
    loose = GateRule.of(MaxWaitGuard(TimeoutRule(4, 0.01), 0.5))
    assert loose.decide(2, 0.6).reason == "timeout"  # the timeout's wait passed first
    tight = GateRule.of(MaxWaitGuard(TimeoutRule(4, 0.01), 0.002))
    assert tight.decide(2, 0.6).reason == "max_wait"


def test_the_gate_runs_a_rule_it_has_no_description_for_as_it_is():
    class EveryOther:
        max_batch = 4

        def decide(self, n: int, oldest_wait_s: float) -> Decision:
            return Decision(min(n, 4) if n % 2 == 0 else 0)

    with pytest.raises(ValueError, match="cannot run a EveryOther rule"):
        GateRule.of(EveryOther())
    gate, clock = make(EveryOther())
    submit(gate, clock, 3)
    assert gate.poll().batches == ()
    submit(gate, clock, 1)
    assert [len(b) for b in gate.poll().batches] == [4]


def test_a_guard_needs_a_positive_wait():
    with pytest.raises(ValueError):
        MaxWaitGuard(greedy(4), 0.0)


def _gate_state(gate):
    return (gate.queue_length, gate.in_flight, vars(gate.counters).copy())


def test_serve_alone_is_what_submit_then_poll_do_for_an_arrival_at_an_empty_gate():
    """``serve_alone`` (the Python plane's lone-request path) against ``submit`` + ``poll`` on twin
    gates: the same batch of one, reason, slots and counters when it serves, and nothing changed when
    it does not (the twin then waits, or its queue or slots rule it out)."""
    rules = [
        greedy(4), threshold(8, 3), static(8, 3), TimeoutRule(8, 0.002), TimeoutRule(4, 0.0),
        MaxWaitGuard(threshold(8, 6), 0.001), MaxWaitGuard(TimeoutRule(1, 0.01), 0.0004),
        GateRule(4, (0, 1, 2, 3, 4), 4, busy_tables=((0, 0, 2, 3, 4), (0, 1, 2, 3, 4))),
        GateRule(4, (0, 0, 2, 3, 4), 4, busy_tables=((0, 1, 2, 3, 4),)),
        GroupHold(greedy(4), 0.001), GroupHold(MaxWaitGuard(threshold(8, 3), 0.002), 0.0004),
    ]
    rng = np.random.default_rng(3)
    served = waited = 0
    for rule in rules:
        for slots in (1, 2, 3):
            a, ca = make(rule, slots=slots, max_queue=4)
            b, cb = make(rule, slots=slots, max_queue=4)
            for _ in range(300):
                dt = float(rng.choice([0.0, 0.0005, 0.003]))
                ca.t += dt
                cb.t += dt
                r = rng.random()
                if r < 0.3 and a.in_flight:
                    a.complete()
                    b.complete()
                elif r < 0.4:
                    for g in (a, b):
                        g.poll()
                    continue
                if a.queue_length == 4:
                    continue
                arrival = ca.t
                late = float(rng.choice([0.0, 0.0005, 0.005]))  # the clock moves on before the decision
                before = _gate_state(a)
                why = a.serve_alone(arrival - late)
                p = Pending(key="m", arrival=arrival - late)
                if why is None:
                    assert _gate_state(a) == before
                    # as the plane does then: submit and poll, on both twins
                    a.submit(Pending(key="m", arrival=arrival - late))
                    a.poll()
                b.submit(p)
                step = b.poll()
                if why is not None:
                    served += 1
                    assert step.batches == ((p,),) and step.reasons == (why,) and step.wake_at is None
                else:
                    waited += 1
                    assert (p,) not in step.batches or before[0] > 0 or before[1] == slots
                assert _gate_state(a) == _gate_state(b)
    assert served > 100 and waited > 100


def test_serve_alone_leaves_a_rule_without_a_description_to_poll():
    class Once:
        max_batch = 2
        calls = 0

        def decide(self, n: int, oldest_wait_s: float) -> Decision:
            Once.calls += 1
            return Decision(1)

    gate, clock = make(Once())
    assert gate.serve_alone(clock.t) is None and Once.calls == 0


def test_complete_frees_a_slot_and_gives_the_queue_length_the_plane_polls_on():
    """The Python plane polls a gate after a batch completes only when ``complete()`` says requests
    wait (its return value, ``queue_length``): a queue formed behind a batch in flight must be seen."""
    gate, clock = make(threshold(8, 3), slots=1)
    submit(gate, clock, k=3)
    assert [len(b) for b in gate.poll().batches] == [3] and gate.in_flight == 1
    assert gate.complete() == 0 and gate.in_flight == 0  # nothing waits: nothing to decide
    submit(gate, clock, k=3)
    gate.poll()
    submit(gate, clock, k=2)  # waits behind the batch in flight
    assert gate.complete() == 2 == gate.queue_length and gate.in_flight == 0
    with pytest.raises(RuntimeError):
        gate.complete()


def test_a_group_hold_travels_with_any_rule_the_gate_runs_and_the_simulator_sees_the_rule_as_it_is():
    held = GroupHold(MaxWaitGuard(threshold(8, 3), 0.5), 0.001)
    line = "max_batch=8 beyond=8 table=0,0,0,3,4,5,6,7,8 max_wait_us=500000 guard_reason=max_wait hold_us=1000"
    assert GateRule.of(held).to_line() == line
    assert GateRule.of(MaxWaitGuard(GroupHold(threshold(8, 3), 0.001), 0.5)).to_line() == line
    assert GateRule.from_line(line) == GateRule.of(held)
    for n in range(12):
        assert held.decide(n, 0.0) == held.rule.decide(n, 0.0)  # the simulator's view: no hold
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="group hold must be finite and > 0"):
            GroupHold(greedy(4), bad)
    with pytest.raises(ValueError, match="hold must be finite and >= 0"):
        GateRule(4, (0, 1, 2, 3, 4), 4, hold_s=-1.0)


def test_a_lone_arrival_under_a_hold_is_queued_and_served_when_the_hold_ends():
    """The Python plane's lone path (``serve_alone``) must not skip the hold: the request waits in the
    queue for the rest of its group, then goes with whoever came."""
    gate, clock = make(GroupHold(greedy(4), 0.0005))
    assert gate.serve_alone(clock.t) is None
    (a,) = submit(gate, clock)
    assert gate.poll().wake_at == pytest.approx(0.0005)
    clock.t = 0.0003
    (b,) = submit(gate, clock)
    assert gate.poll().wake_at == pytest.approx(0.0008)
    clock.t = 0.0009
    assert gate.poll().batches == ((a, b),)
    assert gate.counters.decisions_held == 2
    gate.complete()
    clock.t = 0.01  # long after the group: a late arrival's own wait has used up the hold
    assert gate.serve_alone(clock.t - 0.001) == "policy"
