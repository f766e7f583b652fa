"""The gate's decision core for one model: a bounded queue, in-flight slots and a batching rule.

This is plain code with an injected clock and no I/O, so every decision can be tested without a
network. The asyncio server calls ``poll()`` at each decision epoch (an arrival, a completion, or a
timer the core asked for) and carries out the ``Step`` it returns; it never reads the wall clock
inside the rule.

Why the queue is ordered by (priority, arrival): a client's priority must be honoured while requests
wait in the sidecar, exactly as Triton's own priority queue would. The rule still sees n = all
requests present, since the SMDP's state is the total backlog.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable

from solver.policy import BatchRule, Decision, GateRule


class QueueFull(Exception):
    """The model's queue is at its bound; the request must be refused (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class Pending:
    """One caller's request while it waits in the gate."""

    key: Hashable | None
    """Merge key: requests with equal non-None keys may share a batch; None goes alone."""
    arrival: float
    """Clock time the request entered the gate, seconds."""
    rows: int = 1
    """Batch-dimension rows this request carries (a batch of a requests has sum(rows) rows)."""
    priority: int = 0
    """Lower is more urgent (Triton's convention: level 1 is the highest)."""
    deadline: float | None = None
    """Clock time after which the request is dropped unanswered by the model (client's timeout)."""
    payload: Any = None
    """Opaque to the core: the server keeps the request and the caller's future here."""
    seq: int = 0
    live: bool = True


@dataclass(frozen=True)
class Step:
    """What the server must do now."""

    batches: tuple[tuple[Pending, ...], ...] = ()
    """Batches to dispatch now, one in-flight slot each, members oldest first."""
    expired: tuple[Pending, ...] = ()
    """Requests whose deadline passed while waiting: answer them with a timeout error."""
    wake_at: float | None = None
    """Clock time at which to poll again even if nothing happens (None: only on events)."""
    reasons: tuple[str, ...] = ()
    """Why each batch was served (the rule's Decision.reason), parallel to ``batches``."""


@dataclass
class GateCounters:
    submitted: int = 0
    rejected: int = 0
    cancelled: int = 0
    expired: int = 0
    dispatched_requests: int = 0
    dispatched_batches: int = 0
    decisions_wait: int = 0
    decisions_serve: int = 0
    decisions_held: int = 0
    """Waits that held a batch for the rest of a group (the rule's ``hold_s``; also in ``decisions_wait``)."""


def _gate_rule(rule: BatchRule) -> GateRule | None:
    """The rule's one description (``GateRule``, as the native gate runs it), or None for a rule only
    the simulator knows (or a test's), which the gate then asks as it is: it sees neither m nor the hold."""
    try:
        return GateRule.of(rule)
    except ValueError:
        return None


def _decider(rule: BatchRule, described: GateRule | None) -> Callable[[int, float, int, float, float], Decision]:
    """What the gate runs for a rule. Called as (n waiting, oldest wait, m = batches in flight, time since
    the newest arrival, time since its group's first)."""
    if described is not None:
        return described.decide
    decide = rule.decide
    return lambda n, wait, busy, since_newest, group_age: decide(n, wait)


class ModelGate:
    """Queue, slots and rule for one model. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        rule: BatchRule,
        *,
        slots: int = 1,
        max_queue: int = 1024,
        max_rows: int | None = None,
        clock: Callable[[], float],
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._slots = slots
        self._free = slots
        self._max_queue = max_queue
        self._clock = clock
        self._queues: dict[int, deque[Pending]] = {}
        self._levels: list[int] = []  # sorted priority levels that have a deque
        self._size = 0
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._seq = itertools.count()
        self._newest = -math.inf  # when the newest request arrived
        self._group_start = -math.inf  # when its group's first member arrived (GateRule.hold_s)
        self.counters = GateCounters()
        self.set_rule(rule)
        if max_rows is not None:
            self._max_rows = max_rows

    # -- state -------------------------------------------------------------------------------
    @property
    def rule(self) -> BatchRule:
        return self._rule

    def set_rule(self, rule: BatchRule) -> None:
        """Swap the rule; takes effect at the next decision, never inside one."""
        described = _gate_rule(rule)
        self._rule = rule
        self._decide = _decider(rule, described)
        self._pure = described is not None
        self._hold = described.hold_s if described is not None else 0.0
        self._max_rows = rule.max_batch

    @property
    def queue_length(self) -> int:
        return self._size

    @property
    def in_flight(self) -> int:
        return self._slots - self._free

    @property
    def slots(self) -> int:
        return self._slots

    def set_slots(self, slots: int) -> None:
        """Change the number of model instances (slots); in-flight batches keep theirs."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self._free += slots - self._slots
        self._slots = slots

    # -- events ------------------------------------------------------------------------------
    def submit(self, item: Pending) -> None:
        """Queue a request; raises QueueFull at the bound (nothing is queued then)."""
        if self._size >= self._max_queue:
            self.counters.rejected += 1
            raise QueueFull(f"queue is full ({self._max_queue} requests waiting)")
        item.seq = next(self._seq)
        item.live = True
        self._note_arrival(item.arrival)
        q = self._queues.get(item.priority)
        if q is None:
            q = self._queues[item.priority] = deque()
            self._levels = sorted(self._queues)
        q.append(item)
        self._size += 1
        self.counters.submitted += 1
        if item.deadline is not None:
            heapq.heappush(self._deadlines, (item.deadline, item.seq, item))

    def cancel(self, item: Pending) -> bool:
        """Withdraw a waiting request (its caller went away). False if it was already dispatched."""
        if not item.live:
            return False
        item.live = False
        self._size -= 1
        self.counters.cancelled += 1
        return True

    def complete(self) -> int:
        """A dispatched batch finished (successfully or not): its slot is free again. Returns the queue's
        length (``queue_length``), so that the caller knows at once whether there is anything to decide."""
        if self._free >= self._slots:
            raise RuntimeError("complete() without a batch in flight")
        self._free += 1
        return self._size

    def _note_arrival(self, arrival: float) -> None:
        """The newest arrival and its group's start (the hold's inputs): a request more than the hold after
        the newest one starts a new group (with no hold, every request later than the newest does). Noting
        the same arrival again changes nothing."""
        if arrival > self._newest:
            if arrival - self._newest > self._hold:
                self._group_start = arrival
            self._newest = arrival

    def serve_alone(self, arrival: float) -> str | None:
        """An arrival at a gate with nothing queued, decided without queueing it: when the rule serves
        it now, alone, its slot is taken and the rule's reason returned, with the counters as
        ``submit`` then ``poll`` leave them (the batch ``poll`` would return is this request alone).
        None: no queue, slot or counter is changed (the queue is not empty, no slot is free, the rule
        waits, or the rule is not a ``GateRule`` and so may not be asked twice); then ``submit`` and
        ``poll`` as usual. The rule is asked what ``poll`` asks it: n = 1, the wait since ``arrival``,
        m = batches in flight, and the hold's ages with this arrival noted (noted either way: the
        ``submit`` that follows a None notes it again, to no effect). With nothing queued every entry of
        the deadline heap is of a request gone already, so there is nothing to expire, and no wake-up to
        arm once the request is served."""
        if self._size or not self._free or not self._pure:
            return None
        now = self._clock()
        self._note_arrival(arrival)
        decision = self._decide(1, now - arrival, self._slots - self._free, now - self._newest,
                                now - self._group_start)
        if decision.serve <= 0:
            return None
        next(self._seq)  # the sequence number submit would have given it
        self._deadlines.clear()
        self._free -= 1
        c = self.counters
        c.submitted += 1
        c.decisions_serve += 1
        c.dispatched_batches += 1
        c.dispatched_requests += 1
        return decision.reason

    def poll(self) -> Step:
        """Make every decision due now: drop expired requests, then fill free slots by the rule."""
        now = self._clock()
        expired = self._expire(now)
        batches: list[tuple[Pending, ...]] = []
        reasons: list[str] = []
        wake_at: float | None = None
        while self._free > 0 and self._size > 0:
            oldest = self._oldest_arrival()
            decision = self._decide(self._size, now - oldest, self._slots - self._free, now - self._newest,
                                    now - self._group_start)
            if decision.serve <= 0:
                self.counters.decisions_wait += 1
                if decision.reason == "hold":
                    self.counters.decisions_held += 1
                if decision.recheck_after_s is not None:
                    wake_at = now + max(decision.recheck_after_s, 0.0)
                break
            self.counters.decisions_serve += 1
            batch = self._take(min(decision.serve, self._size))
            self._free -= 1
            self.counters.dispatched_batches += 1
            self.counters.dispatched_requests += len(batch)
            batches.append(batch)
            reasons.append(decision.reason)
        if self._deadlines:
            d = self._next_deadline()
            if d is not None and (wake_at is None or d < wake_at):
                wake_at = d
        return Step(tuple(batches), tuple(expired), wake_at, tuple(reasons))

    # -- internals ---------------------------------------------------------------------------
    def _expire(self, now: float) -> list[Pending]:
        out: list[Pending] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, item = heapq.heappop(self._deadlines)
            if item.live:
                item.live = False
                self._size -= 1
                out.append(item)
        self.counters.expired += len(out)
        return out

    def _next_deadline(self) -> float | None:
        while self._deadlines and not self._deadlines[0][2].live:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def _heads(self) -> Iterable[Pending]:
        for level in self._levels:
            q = self._queues[level]
            while q and not q[0].live:
                q.popleft()
            if q:
                yield q[0]

    def _oldest_arrival(self) -> float:
        return min(p.arrival for p in self._heads())

    def _take(self, count: int) -> tuple[Pending, ...]:
        """The ``count`` most urgent requests that can share a batch with the most urgent one.

        Rows are capped at the model's maximum batch size: a request carrying several rows
        counts for all of them in the batch Triton executes.
        """
        head = next(iter(self._heads()))
        taken: list[Pending] = []
        rows = 0
        for level in self._levels:
            q = self._queues[level]
            skipped: list[Pending] = []
            while q and len(taken) < count:
                item = q.popleft()
                if not item.live:
                    continue
                if item is head or (
                    head.key is not None and item.key == head.key and rows + item.rows <= self._max_rows
                ):
                    item.live = False
                    taken.append(item)
                    rows += item.rows
                    if head.key is None:
                        break
                else:
                    skipped.append(item)
                    if rows >= self._max_rows:
                        break
            q.extendleft(reversed(skipped))
            if len(taken) >= count or head.key is None or rows >= self._max_rows:
                break
        self._size -= len(taken)
        return tuple(taken)
