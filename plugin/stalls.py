"""Host stalls, kept apart from the SLO policy's own tail.

The SLO's measured correction (plugin/loop/controller.py) is the q-quantile, over the rate window,
of how far each answer ran above its policy's prediction. A stall of the host (Triton descheduled or
paused, a CPU hog, a page-in) holds up every request in flight at once: at 200 req/s a 0.5 s stall
touches about 100 answers of the 2,000 in a 10 s window, five times the 1% a q0.99 SLO looks at, so
the correction would jump by about the stall's length and tighten the policy for as long as the
stall stays in the window, though nothing about the policy's own tail changed. A policy cannot
take such a stall back either: every policy's answers are held up by the same amount.

So the answers a stall touched are left out of the correction: those whose life (arrival to
answer) overlapped the stall, or its wake, as long again after it (the backlog it left, served
in bigger and later batches than the policy's own). They say nothing about the policy's tail.
A stall is measured where the sidecar sees one: a batch that ran past its expected time (the
profile in force) by more than a threshold; the part beyond expected + threshold is the stall.
Such a batch is not a service time either: the profile learner skips it, or one paused batch
would raise the learned mean and spread of its size for good. Below the threshold nothing is left
out: the ordinary spread of batch times and the hop stay in the correction, which is what it is
for, and a lasting slowdown of the batches (within the threshold, which scales with the batch's
expected time) is the profile learner's: it adopts the slower profile, and the expected time
follows it.

``StallLog`` keeps the stalls of a window and answers, for a set of answers' lives, which a stall
touched (overlapping stalls merged first). Adding is O(1) on the request path; the question is
O(answers x stalls) in numpy, asked at most once a second.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


def window_seconds(window_s: float) -> float:
    """A rolling window's length, checked once for the SLO's windows (here and ``latency_window``)."""
    if not math.isfinite(window_s) or window_s <= 0:
        raise ValueError(f"window must be finite and > 0 seconds, got {window_s!r}")
    return float(window_s)


class StallLog:
    """Stretches of time the host held requests up beyond what the model expects, over a window."""

    def __init__(self, window_s: float, max_stalls: int = 4096) -> None:
        if max_stalls < 1:
            raise ValueError(f"max_stalls must be >= 1, got {max_stalls!r}")
        self.window_s = window_seconds(window_s)
        self._starts: deque[float] = deque(maxlen=max_stalls)
        self._ends: deque[float] = deque(maxlen=max_stalls)

    def __len__(self) -> int:
        return len(self._starts)

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    def add(self, start: float, end: float) -> None:
        """The host held things up from ``start`` to ``end`` (nothing when end <= start)."""
        if end > start:
            self._starts.append(start)
            self._ends.append(end)

    def overrun(self, due_at: float, done_at: float, threshold_s: float) -> float:
        """Something expected done at ``due_at`` was done at ``done_at``: the part of its delay beyond
        ``threshold_s`` is a stall. Returns that part, seconds (0: none)."""
        start = due_at + threshold_s
        if done_at > start:
            self.add(start, done_at)
            return done_at - start
        return 0.0

    def _merged(self, since: float) -> tuple[np.ndarray, np.ndarray]:
        """The stalls ending after ``since``, overlapping ones merged, in time order."""
        stale = since - self.window_s  # kept a window longer: a late answer may have begun earlier
        while self._ends and self._ends[0] < stale:
            self._starts.popleft()  # roughly time-ordered: the stale head goes, the rest is filtered below
            self._ends.popleft()
        if not self._starts:
            return np.empty(0), np.empty(0)
        s = np.fromiter(self._starts, dtype=float, count=len(self._starts))
        e = np.fromiter(self._ends, dtype=float, count=len(self._ends))
        keep = e >= since
        s, e = s[keep], e[keep]
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        # a new group starts where a stall begins after every earlier one has ended
        reach = np.maximum.accumulate(e)
        new = np.ones(s.size, dtype=bool)
        new[1:] = s[1:] > reach[:-1]
        return s[new], np.maximum.reduceat(e, np.flatnonzero(new))

    def touched(self, begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Which of the lives [begins[i], ends[i]] a stall touched: overlapped the stall, or its
        wake (as long again after it: the backlog it left). Stalls that ended a window before the
        earliest begin are dropped for good."""
        begins = np.asarray(begins, dtype=float)
        ends = np.asarray(ends, dtype=float)
        if begins.size == 0:
            return np.zeros(0, dtype=bool)
        s, e = self._merged(float(begins.min()))
        if s.size == 0:
            return np.zeros(begins.size, dtype=bool)
        wake = e + (e - s)
        return ((begins[:, None] < wake[None, :]) & (ends[:, None] > s[None, :])).any(axis=1)

    def covered_s(self, start: float, end: float) -> float:
        """Stall time inside [start, end] (overlapping stalls counted once), seconds."""
        s, e = self._merged(start)
        return float(np.clip(np.minimum(e, end) - np.maximum(s, start), 0.0, None).sum()) if s.size else 0.0
