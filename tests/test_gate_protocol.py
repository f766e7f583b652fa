"""The native gate's line protocol carries client-chosen model names: they are percent-encoded both
ways and a line that does not parse exactly is refused, so no name can forge a report."""

from __future__ import annotations

import asyncio

import pytest

from plugin.model_names import MAX_MODEL_NAME_BYTES, is_model_name
from plugin.native_plane import (
    Arrivals, BatchDone, BatchesDone, CommandRefused, Counters, Loaded, Lost, NativePlane, Reported, Seen, forget_line, in_arrival_order,
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


def test_a_batches_line_is_one_reports_batches_as_columns_and_must_add_up():
    assert _parsed([b"batches m%20x 1,2 1,3 0.0005,0.25 0,14 policy,timeout 1e-05,0.001,0.002\n"]) == [
        BatchesDone("m x", sizes=(1, 2), rows=(1, 3), elapsed=(0.0005, 0.25), codes=(0, 14),
                    whys=("policy", "timeout"), waits=(1e-05, 0.001, 0.002)),
    ]
    for bad in (b"batches m 1,2 1,3 0.1,0.2 0,0 policy,policy 0.1,0.2\n",    # 2 waits for 3 members
                b"batches m 1,2 1 0.1,0.2 0,0 policy,policy 0.1,0.2,0.3\n",  # a column short
                b"batches m 0 1 0.1 0 policy \n",                             # a batch without members
                b"batches m 1 1 0.1 0 , 0.1\n",                               # no reason
                b"batches m 1 1 0.1 0 policy 0.1 extra\n",
                b"batches m 1 1 x 0 policy 0.1\n"):
        with pytest.raises(ValueError):
            parse_event(bad)


class _Recorder:
    """What a controller is told, in order (the bookkeeping under test, not the controller's)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def observe_batch(self, rows, seconds, failed_requests=None):
        self.calls.append(("batch", rows, seconds, failed_requests))

    def observe_latency(self, now, latency_s):
        self.calls.append(("latency", now, latency_s))

    def observe_arrival(self, t):
        self.calls.append(("arrival", t))


def _booked(events: list, controller: bool):
    """A native data plane's bookkeeping of ``events`` for one model: its stats, controller calls and
    metrics exposition."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from plugin.metrics import SidecarMetrics
    from plugin.native_data_plane import NativeDataPlane
    from plugin.registry import BatchStats

    from plugin.config import load_config

    state = SimpleNamespace(name="m", gate=object(), stats=BatchStats(8), controller=_Recorder() if controller else None)
    registry = SimpleNamespace(get=lambda name, version: state if name == "m" else None)

    async def book() -> NativeDataPlane:
        plane = NativeDataPlane(load_config(overrides={"triton_url": "127.0.0.1:9"}, environ={}), registry, None,
                                SidecarMetrics(max_batch=8), lambda: 100.0, ())
        for event in events:
            plane._on_event(event)
        return plane

    plane = run(book())
    exposition = [line for line in generate_latest(plane.metrics.registry).decode().splitlines()
                  if "_created" not in line]
    return vars(state.stats), state.controller.calls if controller else None, exposition


@pytest.mark.parametrize("controller", [False, True])
def test_a_batches_line_is_booked_as_the_same_batches_one_line_each(controller):
    """Stats, the controller's observations (in order, the failure count each batch saw) and the
    metrics are those of the per-batch lines, failed batches and merged batches included."""
    singles = [BatchDone("m", 1, 1, 10.0, 10.0005, 0, "policy", (0.0,)),
               BatchDone("m", 3, 4, 10.001, 10.003, 0, "timeout", (0.001, 0.0005, 0.0)),
               BatchDone("m", 2, 2, 10.004, 10.0045, 14, "policy", (0.002, 0.001)),
               BatchDone("m", 1, 8, 10.005, 10.004, 0, "max_wait", (0.25,))]  # end before start: 0 s
    elapsed = tuple(max(b.end - b.start, 0.0) for b in singles)  # as the gate computes it
    assert elapsed[3] == 0.0
    columns = BatchesDone("m", (1, 3, 2, 1), (1, 4, 2, 8), elapsed, (0, 0, 14, 0),
                          ("policy", "timeout", "policy", "max_wait"), (0.0, 0.001, 0.0005, 0.0, 0.002, 0.001, 0.25))
    one_each = _booked(singles, controller)
    at_once = _booked([columns], controller)
    stats_a, calls_a, metrics_a = one_each
    stats_b, calls_b, metrics_b = at_once
    assert stats_a.keys() == stats_b.keys()
    for key, value in stats_a.items():
        assert value == pytest.approx(stats_b[key], abs=1e-12), key
    assert stats_a["answered"] == 7 and stats_a["failed_requests"] == 2 and stats_a["latency_n"] == 5
    if controller:
        assert [c[0] for c in calls_a] == [c[0] for c in calls_b]
        for a, b in zip(calls_a, calls_b):
            assert a == pytest.approx(b, abs=1e-12)
        assert [c for c in calls_a if c[0] == "batch"][2][3] == 2  # the failed batch, as the count grew
    assert metrics_a == metrics_b
