"""The native gate's line protocol carries client-chosen model names: they are percent-encoded both
ways and a line that does not parse exactly is refused, so no name can forge a report."""

from __future__ import annotations

import asyncio

import pytest

from plugin.model_names import MAX_MODEL_NAME_BYTES, is_model_name
from plugin.native_plane import (
    Arrivals, BatchDone, CommandRefused, Counters, Loaded, Lost, NativePlane, Reported, Seen, forget_line, in_arrival_order,
    parse_event,
    policy_line, quote_field, unquote_field,
)
from plugin.loop.rate import RateEstimator
from solver.policy import greedy

HOSTILE = ["x\nbatch m 1 8 0 30 0 policy 0", "a b", "100%", "%0A", "tab\there", "ünï cødé", "🙂", "a,b=c"]


@pytest.mark.parametrize("name", HOSTILE + ["plain_name-1.0"])
def test_a_quoted_field_is_one_printable_token_and_decodes_back(name):
    wire = quote_field(name)
    assert wire.isascii() and wire.isprintable() and " " not in wire and "\n" not in wire
    assert unquote_field(wire) == name


def test_quoting_matches_what_the_gate_writes():
    assert quote_field("a b\n%") == "a%20b%0A%25"
    assert quote_field("é") == "%C3%A9"
    assert quote_field("emulated_gpu") == "emulated_gpu"


@pytest.mark.parametrize("bad", ["%", "%4", "%zz", "a%G1", "%C3"])
def test_a_malformed_field_is_refused(bad):
    with pytest.raises(ValueError):
        unquote_field(bad)


@pytest.mark.parametrize("name, ok", [
    ("emulated_gpu", True), ("a b", True), ("ünï", True), ("", False), ("a\x00b", False), ("a\nb", False),
    ("a\x7fb", False), ("m" * MAX_MODEL_NAME_BYTES, True), ("m" * (MAX_MODEL_NAME_BYTES + 1), False),
    ("é" * (MAX_MODEL_NAME_BYTES // 2 + 1), False),
])
def test_which_names_can_be_models(name, ok):
    assert is_model_name(name) is ok


def test_commands_carry_quoted_names_and_refuse_what_cannot_be_a_model():
    assert policy_line("a b", greedy(2), slots=1, max_queue=4).startswith("policy a%20b max_batch=2 ")
    assert forget_line("a b") == "forget a%20b"
    for bad in ("", "a\nb", "x" * 2000):
        with pytest.raises(ValueError):
            policy_line(bad, greedy(2), slots=1, max_queue=4)
        with pytest.raises(ValueError):
            forget_line(bad)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _parsed(lines: list[bytes]) -> list:
    """The events the control plane takes from these lines (those that parse exactly)."""
    events = []
    for raw in lines:
        try:
            event = parse_event(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if event is not None:
            events.append(event)
    return events


def test_the_reader_decodes_names_and_refuses_lines_that_do_not_parse_exactly():
    events = _parsed([
        b"seen a%20b\n",
        b"seen a b\n",                          # an unquoted space: two fields, refused
        b"seen a%0Ab\n",                        # a newline: not a model name, refused
        b"seen \n",                             # empty: refused
        b"lost " + quote_field("m" * 2000).encode() + b"\n",  # too long to be a model: refused
        b"batch m 2 3 1.0 1.5 0 policy 0.1,0.2\n",
        b"batch m 2 3 1.0 1.5 0 policy 0.1,0.2 extra\n",
        b"error policy%20x%0Abatch%20m\n",
    ])
    assert events == [
        Seen("a b"),
        BatchDone("m", size=2, rows=3, start=1.0, end=1.5, code=0, why="policy", waits=(0.1, 0.2)),
        CommandRefused("policy x\nbatch m"),
    ]


def test_each_report_of_the_gate_parses_to_its_event_type():
    assert _parsed([b"lost m\n", b"loaded m\n", b"arrive m 1.5 2.25\n", b"arrive m\n",
                    b"counters m submitted=3 queue=1\n", b"reported\n", b"ok policy m\n"]) == [
        Lost("m"), Loaded("m"), Arrivals("m", (1.5, 2.25)), Arrivals("m", ()),
        Counters("m", {"submitted": 3, "queue": 1}), Reported(),
    ]
    with pytest.raises(ValueError):
        parse_event(b"lost m extra\n")
    with pytest.raises(ValueError):
        parse_event(b"counters m submitted=x\n")


def test_arrivals_stamped_out_of_order_reach_the_estimator_in_order_and_none_is_lost():
    """The gate stamps arrivals on several threads: a report, and the next one, can hold them a few
    microseconds out of order. Every arrival must still reach the rate estimator (which refuses a
    time before the previous one), in order, shifted by no more than the disorder."""
    reports = [(1.000, 1.002, 1.001), (1.0015, 1.003), (), (1.004,)]
    estimator = RateEstimator(start_s=0.0, window_s=10.0)
    passed: list[float] = []
    last = float("-inf")
    for times in reports:
        ordered = in_arrival_order(times, last)
        assert len(ordered) == len(times)
        for t in ordered:
            estimator.observe(t)
        passed += ordered
        last = ordered[-1] if ordered else last
    assert passed == sorted(passed) and len(passed) == 6
    assert passed == [1.000, 1.001, 1.002, 1.002, 1.003, 1.004]
    control = RateEstimator(start_s=0.0, window_s=10.0)  # without the ordering the estimator refuses the disorder
    control.observe(1.002)
    with pytest.raises(ValueError):
        control.observe(1.0015)


def test_the_gate_echoes_quoted_names_and_quotes_its_errors(native_gate):
    """A policy for a name with a space and a non-ASCII letter is accepted and echoed quoted; a bad
    command's error comes back as one line whatever its text."""
    async def scenario():
        out: list[bytes] = []
        plane = await NativePlane.start(listen="127.0.0.1:0", triton_url="127.0.0.1:1", max_queue=4,
                                        on_event=lambda e: None)
        original = plane._handle
        plane._handle = lambda raw: (out.append(raw), original(raw))
        try:
            plane.send(policy_line("ä b", greedy(2), slots=1, max_queue=4))
            plane.send("policy ok max_batch=2 table=0,1 bad%0Akey=1")
            plane.send("policy a%0Ab max_batch=2 table=0,1")  # a newline: not a model name
            plane.send("policy %zz max_batch=2 table=0,1")
            await plane.sync()
            return out, list(plane.errors)
        finally:
            await plane.stop()

    out, errors = run(scenario())
    assert b"ok policy %C3%A4%20b\n" in out
    assert len(errors) == 3
    assert "unknown key 'bad%0Akey'" in errors[0]
    assert "is not a model name" in errors[1] and "is not a model name" in errors[2]
    assert all(line.count(b"\n") == 1 and line.endswith(b"\n") for line in out)
