"""The native gate's holding rule while a model's profile: auto sweep runs (pure logic)."""

from __future__ import annotations

import pytest

from plugin.auto_profile import HOLD_GRACE_S, HOLD_MAX_QUEUE, hold_line, hold_rule
from solver.policy import GateRule


def test_hold_rule_waits_at_every_queue_length_until_the_sweeps_budget_has_passed() -> None:
    rule = hold_rule(8, 100, 5.0)
    for n in (1, 7, 8, 9, 100):
        d = rule.decide(n, 0.0)
        assert d.serve == 0 and d.recheck_after_s == pytest.approx(5.0 + HOLD_GRACE_S)
        assert rule.decide(n, 4.9).serve == 0
    # past the budget and its grace, what waits is served in full batches (the guard)
    assert rule.decide(3, 5.0 + HOLD_GRACE_S).serve == 3
    assert rule.decide(20, 5.0 + HOLD_GRACE_S).serve == 8


def test_hold_line_round_trips_and_bounds_the_queue() -> None:
    line = hold_line("my model", 4, 10_000_000, 3.0)
    assert line.startswith("policy my%20model ")
    fields = dict(f.split("=", 1) for f in line.split()[2:])
    assert int(fields.pop("max_queue")) == HOLD_MAX_QUEUE
    assert int(fields.pop("slots")) == 1
    for key in ("default_priority", "priority_levels", "dispatch_priority"):
        fields.pop(key)
    rule = GateRule.from_fields(fields)
    assert rule == hold_rule(4, HOLD_MAX_QUEUE, 3.0)
    assert len(rule.table) == HOLD_MAX_QUEUE + 1 and set(rule.table) == {0}
    assert int(dict(f.split("=", 1) for f in hold_line("m", 4, 16, 3.0).split()[2:])["max_queue"]) == 16
