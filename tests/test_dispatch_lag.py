"""The gate's turnaround: the time from a batch's decision epoch (the completion or arrival the gate
decided it at; the slot is the batch's from then, as the solver models it) to its dispatch. The Python
gate counts it apart from dispatch-to-completion and reports it in ``GetStatus`` (``dispatch_lag``),
with its own per-size batch record (``batch_mean_s``), for any policy; the load tests' calibration adds
it to the batch times the solver is told."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from test_sidecar_robustness import Upstream, make_sidecar, request, run, until

from plugin.control_backend import SidecarControl

LATE_S = 0.03


def test_a_late_dispatch_is_counted_as_turnaround_not_as_service_time_and_reported():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        # the slot busy with "a"; "b" and "c" queue behind it (greedy: one batch of 2 at a's completion)
        up.hold.clear()
        first = asyncio.ensure_future(sc.plane.infer(request(id="a")))
        await until(lambda: len(up.sent) == 1)
        state = sc.registry.models()[("emulated_gpu", "")]
        rest = [asyncio.ensure_future(sc.plane.infer(request(id=x))) for x in "bc"]
        await until(lambda: state.gate.queue_length == 2)

        spawn = sc.plane._spawn

        def late(coro):  # the event loop turns around slowly: the dispatch task starts LATE_S after the decision
            async def later():
                await asyncio.sleep(LATE_S)
                await coro

            spawn(later())

        sc.plane._spawn = late
        up.hold.set()
        assert (await first).id == "a" and [(await r).id for r in rest] == ["b", "c"]

        s = state.stats
        assert s.batches[1] == 1 and s.batches[2] == 1
        assert s.lag_n == 2  # every batch: "a" dispatched inline at its arrival, "b"+"c" at a's completion
        assert LATE_S <= s.lag_s < LATE_S + 0.5
        assert s.busy_s[2] < LATE_S  # dispatch-to-completion does not hold the turnaround

        msg = SidecarControl(sc.registry).status("emulated_gpu").message()
        assert msg.HasField("dispatch_lag") and msg.dispatch_lag.batches == 2
        assert msg.dispatch_lag.mean_s * 2 == pytest.approx(s.lag_s)
        assert list(msg.batch_histogram[:3]) == [0, 1, 1]
        assert msg.batch_mean_s[1] == pytest.approx(s.busy_s[1]) and msg.batch_mean_s[2] == pytest.approx(s.busy_s[2])
        assert msg.batch_mean_s[0] == 0.0
        await sc.close()

    run(main())


def test_a_gate_without_batches_reports_no_turnaround():
    async def main():
        up = Upstream()
        sc = await make_sidecar(up)
        await sc.plane.infer(request(id="a"))
        state = sc.registry.models()[("emulated_gpu", "")]
        state.stats.lag_n, state.stats.lag_s = 0, 0.0  # as a plane that does not measure it leaves them
        msg = SidecarControl(sc.registry).status("emulated_gpu").message()
        assert not msg.HasField("dispatch_lag")
        await sc.close()

    run(main())


def test_gate_reading_and_window_are_the_gates_totals_and_their_differences():
    from smdp.v1 import smdp_pb2

    from loadtest.stack_profile import gate_reading, window_between

    def status(hist, means, completed, w, lag):
        msg = smdp_pb2.ModelStatus(model="m", batch_histogram=hist, batch_mean_s=means, completed=completed)
        msg.measured.mean_latency_s = w
        if lag is not None:
            msg.dispatch_lag.batches, msg.dispatch_lag.mean_s = lag
        return msg

    lo = gate_reading(status([0, 4, 2], [0.0, 0.010, 0.012], 8, 0.05, (6, 0.001)))
    assert lo.batches.tolist() == [4, 2] and np.allclose(lo.busy_s, [0.040, 0.024])
    assert lo.requests == 8 and lo.latency_sum_s == pytest.approx(0.4) and lo.lag_s == pytest.approx(0.006)
    # later: 6 more batches of 1 at 11 ms, a first batch of 3 at 15 ms; the sidecar's W over all 20 requests 60 ms
    hi = gate_reading(status([0, 10, 2, 1], [0.0, (0.040 + 6 * 0.011) / 10, 0.012, 0.015], 20, 0.06, (13, 0.002)))
    win = window_between(lo, hi)
    assert win.batches.tolist() == [6, 0, 1] and np.allclose(win.busy_s, [0.066, 0.0, 0.015])
    assert win.requests == 12 and win.latency_sum_s == pytest.approx(20 * 0.06 - 8 * 0.05)
    assert win.lag_s == pytest.approx(13 * 0.002 - 6 * 0.001)
    # a plane that does not measure the turnaround (no dispatch_lag): none is added
    assert gate_reading(status([0, 1], [0.0, 0.01], 1, 0.02, None)).lag_s == 0.0
    with pytest.raises(ValueError, match="no dispatch-to-completion times"):
        gate_reading(smdp_pb2.ModelStatus(model="m", batch_histogram=[0, 1]))


def test_added_under_load_counts_the_turnaround_per_batch() -> None:
    from loadtest.stack_profile import GateWindow, added_under_load
    from solver.model import ServiceProfile

    quiet = ServiceProfile.from_table([1, 2, 3, 4], [0.020, 0.022, 0.024, 0.026], [2.0, 2.4, 2.8, 3.2])
    n = np.array([0, 10, 0, 30])
    busy = np.array([0.0, 10 * 0.023, 0.0, 30 * 0.029])  # 2.5 ms over the quiet profile per batch
    # 40 batches with 0.8 ms from decision to dispatch each: 2.5 + 0.8 ms per batch
    assert added_under_load(quiet, GateWindow(n, busy, 200, 9.0, 40 * 0.0008)) == pytest.approx(3.3e-3)
    # turnaround alone, batches as quiet as the profile
    same = np.array([0.0, 10 * 0.022, 0.0, 30 * 0.026])
    assert added_under_load(quiet, GateWindow(n, same, 200, 9.0, 40 * 0.0005)) == pytest.approx(0.5e-3)


def test_ctl_status_shows_the_turnaround_where_the_plane_measures_it():
    from smdp.v1 import smdp_pb2

    from plugin.ctl_cli import _status_text

    msg = smdp_pb2.ModelStatus(model="m", max_batch=4, batch_histogram=[0, 3])
    assert "turnaround" not in _status_text(msg)
    msg.dispatch_lag.batches, msg.dispatch_lag.mean_s = 3, 0.00078
    assert "turnaround 0.780 ms per batch from decision to dispatch (3 batches)" in _status_text(msg)
