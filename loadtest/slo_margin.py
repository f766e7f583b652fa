"""``--slo-margin auto``: the SLO gate's margin measured by the bench itself, before the SLO contenders run.

The margin (``SloTarget.margin_s``) is the part of D kept for the latency the sidecar cannot see: the
load generator's own path to it and back, and the load generator's own lateness in sending. The
bench measures both, so it can set the margin instead of being told one:

* the hop: what a lone request's answer through the gate takes beyond tau(1) (``RequestHop.gate_s``,
  measured at the stack's start: the median of 25 lone requests);
* the send lag: how late the load generator issued requests against their schedule, at the SLO's
  quantile, pooled over the contenders that ran before the SLO contenders at the same load (the
  same arrival times, the same host). With none before them, a short run straight to Triton
  (delay 0) on the first seconds of the arrivals measures it.

margin = hop + send-lag quantile. For the bound derived from Triton's best delay the bench also measures
what a client served by Triton directly carries beyond the model (``direct_extra_s``: a lone request's
hop straight to Triton, ``RequestHop.direct_s``, + the same send-lag quantile): the delay's answers would
carry that, not the hop through the gate (``solver.slo_bound``). It is a measurement of this host at this moment (a shared host's
send lag moves from run to run), and the report says what was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .openloop import OpenLoopResult

CALIBRATION_S = 3.0
"""Seconds of the arrivals a send-lag calibration replays when no contender ran before the SLO ones."""


@dataclass(frozen=True)
class MeasuredMargin:
    hop_s: float
    """A lone request's answer through the gate beyond tau(1), seconds."""
    send_lag_s: float
    """The load generator's send lag at the SLO's quantile, seconds."""
    quantile: float
    requests: int
    """Requests the send lag rests on."""
    direct_hop_s: float = 0.0
    """A lone request's answer straight from Triton beyond tau(1), seconds."""

    @property
    def margin_s(self) -> float:
        return max(self.hop_s, 0.0) + max(self.send_lag_s, 0.0)

    @property
    def direct_extra_s(self) -> float:
        """What a client served by Triton directly carries beyond the model: its hop + the same send lag."""
        return max(self.direct_hop_s, 0.0) + max(self.send_lag_s, 0.0)

    def describe(self) -> str:
        return (f"SLO margin {self.margin_s * 1e3:.2f} ms measured: the lone-request hop through the gate "
                f"{self.hop_s * 1e3:.2f} ms + the load generator's send lag q{self.quantile:g} "
                f"{self.send_lag_s * 1e3:.2f} ms (over {self.requests} requests); served by Triton directly "
                f"{self.direct_extra_s * 1e3:.2f} ms (its hop {self.direct_hop_s * 1e3:.2f} ms + the same lag)")


def send_lags(result: OpenLoopResult) -> np.ndarray:
    """How late each sent request went out against its schedule, seconds."""
    sent = np.isfinite(result.sent_s)
    return np.maximum(result.sent_s[sent] - result.scheduled_s[sent], 0.0)


def measured_margin(hop_s: float, lags: Iterable[np.ndarray], quantile: float, latency_s: float,
                    direct_hop_s: float = 0.0) -> MeasuredMargin:
    """The margin from the hop and the pooled send lags (and the direct hop, for ``direct_extra_s``);
    ValueError when there are none, or when it leaves nothing of D."""
    if not math.isfinite(hop_s):
        raise ValueError(f"the hop through the gate was not measured ({hop_s!r})")
    if not math.isfinite(direct_hop_s):
        raise ValueError(f"the hop straight to Triton was not measured ({direct_hop_s!r})")
    pooled = np.concatenate([np.asarray(x, dtype=float) for x in lags] or [np.empty(0)])
    if pooled.size == 0:
        raise ValueError("no send lags to measure the SLO margin from")
    m = MeasuredMargin(float(hop_s), float(np.quantile(pooled, quantile)), float(quantile), int(pooled.size),
                       float(direct_hop_s))
    if not m.margin_s < latency_s:
        raise ValueError(f"{m.describe()}: not below D = {latency_s * 1e3:g} ms; this host cannot serve that SLO")
    return m


def margin_before_slo(stack, cfg, times: np.ndarray, lags: list[np.ndarray], progress) -> MeasuredMargin:
    """The margin for the SLO contenders at one load of a bench (``loadtest.bench.Stack``,
    ``BenchConfig``): ``lags`` are the send lags of the contenders that ran before them on ``times``;
    empty, a calibration run straight to Triton (delay 0) measures them. Said through ``progress``."""
    from .bench import contender_override
    from .contenders import Contender
    from .openloop import run_open_loop

    hop = stack.hop
    if hop is None:  # the stack was not profiled (--stack-profile table): measure the hop now
        from .stack_profile import request_hops

        hop = request_hops(stack.triton_url, stack.control, cfg.model, cfg.time_scale, stack.max_batch,
                           float(stack.profile.mean_s[0]), cfg.data_plane, cfg.out_dir, progress)
    if not any(x.size for x in lags):
        stack.control.apply(contender_override(Contender("triton", max_queue_delay_us=0), cfg))
        short = times[times < float(times[0]) + CALIBRATION_S]
        res = run_open_loop(stack.triton_url, cfg.model, short, timeout_s=cfg.request_timeout_s, drain_grace_s=1.0)
        lags = [send_lags(res)]
        progress(f"send-lag calibration: {short.size} requests straight to Triton (delay 0)")
    m = measured_margin(hop.gate_s, lags, cfg.slo.quantile, cfg.slo.latency_s, hop.direct_s)
    progress(m.describe())
    return m
