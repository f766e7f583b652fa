"""The shared decision vectors (tests/vectors/*.json) run against the Python plane.

The same files are run by the native core's unit test (native/test_gate_core.cc, ``make -C native
test``) against native/gate_core.h, so both planes are held to one set of answers; the format is in
tests/vectors/README.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from plugin.gate import ModelGate, Pending, QueueFull
from plugin.merge import SplitError, batch_rows, merge, merge_key, split
from solver.policy import BatchRule, GateRule, GroupHold, MaxWaitGuard, rule_from_spec

VECTORS = Path(__file__).resolve().parent / "vectors"
FILES = sorted(VECTORS.glob("*.json"))


def _load(key: str) -> list[tuple[str, Any]]:
    out = []
    for path in FILES:
        for i, case in enumerate(json.loads(path.read_text()).get(key, [])):
            out.append(pytest.param(case, id=f"{path.stem}:{case.get('name', case.get('line', i))}"))
    return out


def test_there_are_vectors_of_every_part():
    assert FILES and _load("lines") and _load("errors") and _load("decisions") and _load("scripts")
    assert _load("merges") and _load("merge_keys")


# -- the rule's text -----------------------------------------------------------------------------


def _built(spec: dict[str, Any]) -> BatchRule:
    rule = rule_from_spec(spec["spec"], spec["max_batch"])
    rule = MaxWaitGuard(rule, spec["max_wait_s"]) if "max_wait_s" in spec else rule
    return GroupHold(rule, spec["hold_s"]) if "hold_s" in spec else rule


@pytest.mark.parametrize("case", _load("lines"))
def test_a_rule_line_round_trips_and_is_what_the_rule_it_describes_sends(case):
    rule = GateRule.from_line(case["line"])
    assert rule.to_line() == case["line"]
    if "built_from" in case:
        assert GateRule.of(_built(case["built_from"])).to_line() == case["line"]


@pytest.mark.parametrize("case", _load("errors"))
def test_a_bad_rule_line_is_refused_with_a_clear_error(case):
    with pytest.raises(ValueError) as err:
        GateRule.from_line(case["line"])
    assert case["error"] in str(err.value)


@pytest.mark.parametrize("case", _load("decisions"))
def test_the_rule_decides_as_the_vectors_say(case):
    rule = GateRule.from_line(case["rule"])
    for c in case["cases"]:
        d = rule.decide(c["n"], c["wait"], c.get("busy", 0), c.get("since_newest", math.inf), c.get("group_age", math.inf))
        got = (d.serve, d.recheck_after_s, d.reason)
        if c["recheck"] is None:
            assert got == (c["serve"], None, c["reason"]), c
        else:
            assert (d.serve, d.reason) == (c["serve"], c["reason"]), c
            assert d.recheck_after_s == pytest.approx(c["recheck"], abs=1e-9), c


# -- the gate ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _request(spec: str | dict[str, Any], now: float) -> Pending:
    if isinstance(spec, str):
        spec = {"id": spec}
    return Pending(
        key=spec.get("key", "k"), arrival=spec.get("arrival", now), rows=spec.get("rows", 1),
        priority=spec.get("priority", 0), deadline=spec.get("deadline"), payload=spec["id"],
    )


def _ids(items: tuple[Pending, ...]) -> list[str]:
    return [p.payload for p in items]


def run_script(script: dict[str, Any]) -> None:
    clock = Clock()
    gate = ModelGate(GateRule.from_line(script["rule"]), slots=script.get("slots", 1),
                     max_queue=script.get("max_queue", 1024), clock=clock)
    pending: dict[str, Pending] = {}
    for i, event in enumerate(script["events"]):
        where = f"event {i}: {event}"
        if "at" in event:
            clock.t = event["at"]
        elif "arrive" in event:
            refused = []
            for spec in event["arrive"]:
                p = _request(spec, clock.t)
                try:
                    gate.submit(p)
                    pending[p.payload] = p
                except QueueFull:
                    refused.append(p.payload)
            assert refused == event.get("refused", []), where
        elif "cancel" in event:
            assert gate.cancel(pending[event["cancel"]]) == event["cancelled"], where
        elif "complete" in event:
            if event.get("fails"):
                with pytest.raises(RuntimeError):
                    for _ in range(event["complete"]):
                        gate.complete()
            else:
                for _ in range(event["complete"]):
                    gate.complete()
        elif "rule" in event:
            gate.set_rule(GateRule.from_line(event["rule"]))
        elif "slots" in event:
            gate.set_slots(event["slots"])
        elif "poll" in event:
            want = event["poll"]
            step = gate.poll()
            batches = [_ids(b) for b in step.batches]
            assert batches == want.get("batches", []), where
            assert list(step.reasons) == want.get("reasons", ["policy"] * len(batches)), where
            assert _ids(step.expired) == want.get("expired", []), where
            if want.get("wake_at") is None:
                assert step.wake_at is None, where
            else:
                assert step.wake_at == pytest.approx(want["wake_at"], abs=1e-9), where
        elif "state" in event:
            want = event["state"]
            got = {"queue": gate.queue_length, "in_flight": gate.in_flight, "slots": gate.slots}
            for key in ("queue", "in_flight", "slots"):
                if key in want:
                    assert got[key] == want[key], f"{where}: {key} = {got[key]}"
            for key, value in want.get("counters", {}).items():
                assert getattr(gate.counters, key) == value, f"{where}: {key}"
        else:
            raise AssertionError(f"unknown event {event}")


@pytest.mark.parametrize("case", _load("scripts"))
def test_the_python_gate_steps_as_the_vectors_say(case):
    run_script(case)


# -- merging and splitting -----------------------------------------------------------------------


def _infer_request(obj: dict[str, Any]) -> service_pb2.ModelInferRequest:
    return json_format.ParseDict(obj, service_pb2.ModelInferRequest())


def _infer_response(obj: dict[str, Any]) -> service_pb2.ModelInferResponse:
    return json_format.ParseDict(obj, service_pb2.ModelInferResponse())


@pytest.mark.parametrize("case", _load("merge_keys"))
def test_requests_share_a_merge_key_as_the_vectors_say(case):
    reqs = {r["id"]: _infer_request(r) for r in case["requests"]}
    keys = {rid: merge_key(r) for rid, r in reqs.items()}
    assert sorted(case["rows"]) == sorted(rid for rid, k in keys.items() if k is not None)
    for rid in case["alone"]:
        assert keys[rid] is None, rid
    for rid, rows in case["rows"].items():
        assert batch_rows(reqs[rid]) == rows, rid
    classes = case["classes"]
    assert sorted(rid for c in classes for rid in c) == sorted(case["rows"])
    for i, members in enumerate(classes):
        assert len({keys[rid] for rid in members}) == 1, members
        for other in classes[i + 1:]:
            assert keys[members[0]] != keys[other[0]], (members, other)


@pytest.mark.parametrize("case", _load("merges"))
def test_a_batch_merges_and_splits_as_the_vectors_say(case):
    reqs = [_infer_request(r) for r in case["requests"]]
    merged = merge(reqs)
    if "merged" in case:
        assert merged.request == _infer_request(case["merged"])
    response = _infer_response(case["response"])
    if case.get("split_error"):
        with pytest.raises(SplitError):
            split(response, merged)
    else:
        assert split(response, merged) == [_infer_response(p) for p in case["split"]]
