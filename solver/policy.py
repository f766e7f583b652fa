"""Batching rules: what to do when the server is free and n requests wait.

One interface serves the simulator and the sidecar's gate alike, so that what is simulated is
exactly what is enforced. A rule sees the queue length and the age of the oldest request and says
how many to serve now (0 = wait) and, when waiting, after how long to look again even if nothing
arrives (only the timeout rule needs that; the SMDP's epochs are arrivals and completions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Decision:
    serve: int
    """Batch size to start now; 0 means wait."""
    recheck_after_s: float | None = None
    """When waiting: decide again after this many seconds even without an arrival (None: only on arrival)."""
    reason: str = "policy"
    """Why: "policy" (the table or rule), "timeout" (the oldest waited the rule's T), "max_wait" (the guard);
    a wait: "hold" when the gate holds a batch for the rest of a group (``GroupHold``), else "policy"."""


@runtime_checkable
class BatchRule(Protocol):
    max_batch: int

    def decide(self, n: int, oldest_wait_s: float) -> Decision:
        """Called when the server is free and n >= 0 requests wait, the oldest for oldest_wait_s."""
        ...


@dataclass(frozen=True)
class PolicyTable:
    """A stationary SMDP policy: a(n) for n = 0..N; beyond N serve min(n, beyond), by default min(n, B).

    This is what the solver returns and what the gate enforces; it depends on the queue length only.
    ``beyond`` is the batch size served above the table: None (the default) means B, full batches;
    a static policy sets it to its b0 so that it never serves anything else.
    """

    actions: np.ndarray
    max_batch: int
    beyond: int | None = None

    def __post_init__(self) -> None:
        if self.beyond is not None:
            if isinstance(self.beyond, bool) or int(self.beyond) != self.beyond or not 1 <= self.beyond <= self.max_batch:
                raise ValueError(f"beyond-table batch size must be in 1..B={self.max_batch}, got {self.beyond!r}")
            object.__setattr__(self, "beyond", int(self.beyond))
        a = np.asarray(self.actions, dtype=np.int64).copy()
        if a.ndim != 1 or a.size == 0:
            raise ValueError("policy table must be a non-empty 1-d array")
        n = np.arange(a.size)
        bad = (a < 0) | (a > np.minimum(n, self.max_batch))
        if np.any(bad):
            i = int(np.argmax(bad))
            raise ValueError(f"policy action a({i}) = {a[i]} is outside 0..min({i}, B={self.max_batch})")
        a.setflags(write=False)
        object.__setattr__(self, "actions", a)

    @property
    def truncation(self) -> int:
        return int(self.actions.size - 1)

    @property
    def beyond_batch(self) -> int:
        """The batch size served far above the table: ``beyond``, or B."""
        return self.max_batch if self.beyond is None else self.beyond

    def action(self, n: int) -> int:
        if n < self.actions.size:
            return int(self.actions[n])
        return min(n, self.beyond_batch)

    def decide(self, n: int, oldest_wait_s: float = 0.0) -> Decision:
        return Decision(self.action(n))

    def threshold(self) -> int | None:
        """The smallest n at which the policy serves, if it is of control-limit type, else None.

        Control-limit: wait below some K, serve min(n, B) at and above it.
        """
        a = self.actions
        if self.beyond_batch != self.max_batch:
            return None
        n = np.arange(a.size)
        serving = np.nonzero(a > 0)[0]
        if serving.size == 0:
            return None
        k = int(serving[0])
        expect = np.where(n >= k, np.minimum(n, self.max_batch), 0)
        return k if np.array_equal(a, expect) else None

    def extended(self, size: int) -> np.ndarray:
        """a(n) for n = 0..size-1, applying the beyond-N rule."""
        n = np.arange(size)
        out = np.minimum(n, self.beyond_batch)
        m = min(size, self.actions.size)
        out[:m] = self.actions[:m]
        return out


def greedy(max_batch: int, truncation: int | None = None) -> PolicyTable:
    """Serve min(n, B) whenever free: Triton with max_queue_delay 0."""
    size = (truncation if truncation is not None else max_batch) + 1
    return PolicyTable(np.minimum(np.arange(size), max_batch), max_batch)


def threshold(max_batch: int, k: int, truncation: int | None = None) -> PolicyTable:
    """Wait until n >= k, then serve min(n, B)."""
    if k < 1:
        raise ValueError(f"threshold must be >= 1, got {k}")
    size = max(truncation if truncation is not None else max_batch, k) + 1
    n = np.arange(size)
    return PolicyTable(np.where(n >= k, np.minimum(n, max_batch), 0), max_batch)


def static(max_batch: int, b0: int, truncation: int | None = None) -> PolicyTable:
    """Wait for exactly b0, then serve batches of b0, at every queue length (beyond the table too)."""
    if not 1 <= b0 <= max_batch:
        raise ValueError(f"static batch size must be in 1..{max_batch}, got {b0}")
    size = max(truncation if truncation is not None else max_batch, b0) + 1
    n = np.arange(size)
    return PolicyTable(np.where(n >= b0, b0, 0), max_batch, beyond=b0)


@dataclass(frozen=True)
class TimeoutRule:
    """Triton's dynamic batcher: serve min(n, B) once n >= B or the oldest has waited timeout_s.

    Not a function of n alone, so it has no exact SMDP evaluation; the simulator and gate run it.
    """

    max_batch: int
    timeout_s: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.timeout_s) or self.timeout_s < 0:
            raise ValueError(f"timeout must be finite and >= 0 seconds, got {self.timeout_s!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")

    def decide(self, n: int, oldest_wait_s: float) -> Decision:
        if n <= 0:
            return Decision(0)
        if n >= self.max_batch:
            return Decision(self.max_batch)
        if oldest_wait_s >= self.timeout_s:
            return Decision(n, reason="timeout")
        return Decision(0, self.timeout_s - oldest_wait_s)


TRITON_IDLE_WAIT_S = 0.5
"""Triton's dynamic batcher sleeps at most this long when nothing wakes it (``default_wait_microseconds``
in core's dynamic_batch_scheduler.cc, 500 ms in every release since 2.x)."""

TRITON_CATCH_SHARE = 0.6
"""The share of completions with requests queued at which Triton's batcher catches its instance free
(``TritonBatcher.catch_share``). Measured on the bench's stack (emulated GPU x10, B = 128, a shared
2-core host; ``bench/triton_tail.py``): 0.65-0.71 on two synthetic MMPP streams, 0.69-0.77 on the
conversation trace. Re-simulating those five runs (three seeds each), 0.6 predicts W within -0.7% to
+0.2% and p99 within -2.1% to +2.7% of what Triton gave (0.5: W -0.2% to +3.2%, p99 -1.4% to +5.1%,
too long a tail; the raw measured share is above the fit because only the transitions that tell the
two apart are counted). A race between two threads: it depends on the host and the load, so the SLO
bound takes it as a setting (``slo.best_delay_catch_share``)."""


@dataclass(frozen=True)
class TritonBatcher:
    """Triton's own dynamic batcher at ``max_queue_delay`` = ``timeout_s``, as it runs when it cannot
    prefetch: the model of a Triton delay *as Triton runs it*, for predictions (not a gate rule).

    While its instance is free it decides as ``TimeoutRule`` (serve min(n, B) once n >= B or the oldest
    has waited ``timeout_s``; its timer runs). What differs is the instance freeing with requests queued.
    Triton (core 2.51 = r24.10, unchanged through the newest release) forms a batch only when the rate
    limiter has a payload slot; without prefetching -- a queue with priority levels, a request timeout,
    ``allow_timeout_override`` or ``max_queue_size`` (``PriorityQueue::SupportPrefetching``), as the
    bench's model has -- a slot is an instance waiting in ``DequeuePayload``. Arrivals while the instance
    is busy do not wake the batcher (no slot). When the execution ends, the payload's callback wakes it
    once, and it looks for a slot while the instance thread is still releasing the batch on its way back
    to ``DequeuePayload``: a race. With share ``catch_share`` it finds the instance waiting and decides
    as ``TimeoutRule`` does; otherwise it sleeps on until the next arrival (whose enqueue finds the slot)
    or until its 500 ms default wait, counted from its last dispatch, runs out. The first request of the
    waking group wakes it: if the oldest has waited ``timeout_s`` it dispatches at once, before the rest
    of that group is enqueued (they wait for the next batch); else its timer runs and the group joins.
    So the instance idles with work queued for the gap to the next arrival, a long one in a slow phase or
    between clumps: a longer tail than ``TimeoutRule``'s. (With prefetching the next payload is formed
    while the instance is busy, frozen unless the batcher wins the same race: another model, not this.)

    ``catch_share`` = 1 is ``TimeoutRule`` exactly; 0 is the code without the race. The simulator draws
    the race from its own stream of the run's seed (common random numbers across delays). At k instances,
    or with config mode's preferred sizes: ``TritonInstances`` (``TritonInstances.of`` this one).
    """

    max_batch: int
    timeout_s: float
    catch_share: float = TRITON_CATCH_SHARE
    idle_wait_s: float = TRITON_IDLE_WAIT_S

    def __post_init__(self) -> None:
        TimeoutRule(self.max_batch, self.timeout_s)  # the same checks
        c = self.catch_share
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise ValueError(f"catch share must be a number in [0, 1], got {c!r}")
        if not math.isfinite(self.idle_wait_s) or self.idle_wait_s <= 0:
            raise ValueError(f"idle wait must be finite and > 0 seconds, got {self.idle_wait_s!r}")


def parse_rule_spec(spec: str) -> tuple[str, float | None]:
    """Split a rule spec ``greedy | smdp | static:B0 | threshold:K | timeout:SECONDS``.

    Returns (kind, argument). Raises ValueError naming the bad spec. ``smdp`` needs a solved policy,
    so turning it into a rule is the caller's job; the others are built by ``rule_from_spec``.
    """
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind in ("greedy", "smdp"):
        if arg:
            raise ValueError(f"policy {kind!r} takes no argument, got {spec!r}")
        return kind, None
    if kind not in ("static", "threshold", "timeout"):
        raise ValueError(
            f"unknown policy {spec!r}: expected greedy, smdp, static:B0, threshold:K or timeout:SECONDS"
        )
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"policy {spec!r} needs a numeric argument after ':'") from None
    if not math.isfinite(value) or value < 0 or (kind != "timeout" and (value < 1 or value != int(value))):
        raise ValueError(f"policy {spec!r}: bad argument {arg!r}")
    return kind, value


def rule_from_spec(spec: str, max_batch: int) -> BatchRule:
    """Build a baseline rule from its spec (everything but ``smdp``)."""
    kind, value = parse_rule_spec(spec)
    if kind == "greedy":
        return greedy(max_batch)
    if kind == "static":
        return static(max_batch, int(value))
    if kind == "threshold":  # K > B is allowed: it waits with a full batch available (evaluation handles it)
        return threshold(max_batch, int(value))
    if kind == "timeout":
        return TimeoutRule(max_batch, float(value))
    raise ValueError("the smdp policy must be solved, not parsed: use solver.solve")


def check_max_wait(max_wait_s: float) -> None:
    """The guard's one rule for its wait (``MaxWaitGuard``, ``InstanceGuard``): finite and > 0 seconds."""
    if not math.isfinite(max_wait_s) or max_wait_s <= 0:
        raise ValueError(f"max wait must be finite and > 0 seconds, got {max_wait_s!r}")


@dataclass(frozen=True)
class MaxWaitGuard:
    """Any rule, plus: serve min(n, B) once the oldest request has waited ``max_wait_s``.

    The SMDP's decision to wait is optimal only while arrivals continue; when traffic stops, a
    request that is waiting for company would wait forever. The guard bounds that in production
    without changing the policy while traffic flows (choose it well above the policy's waits).
    """

    rule: BatchRule
    max_wait_s: float

    def __post_init__(self) -> None:
        check_max_wait(self.max_wait_s)

    @property
    def max_batch(self) -> int:
        return self.rule.max_batch

    def decide(self, n: int, oldest_wait_s: float) -> Decision:
        if n > 0 and oldest_wait_s >= self.max_wait_s:
            return Decision(min(n, self.max_batch), reason="max_wait")
        d = self.rule.decide(n, oldest_wait_s)
        if d.serve > 0 or n == 0:
            return d
        left = self.max_wait_s - oldest_wait_s
        return Decision(0, left if d.recheck_after_s is None else min(d.recheck_after_s, left))


HOLD_SPAN = 4
"""A group hold ends at most this many holds after the group's first member arrived (``GroupHold``)."""


@dataclass(frozen=True)
class GroupHold:
    """A rule the gate runs, plus a hold for the rest of a group: a batch the rule would start now with
    everything that waits, and not a full one, waits while the newest request arrived less than
    ``hold_s`` ago, for at most ``HOLD_SPAN`` holds after the group's first member.

    A group is the run of arrivals each within ``hold_s`` of the one before. The policy is solved for
    groups that arrive at one instant (compound Poisson, an MMPP's groups), but a client's fan-out
    reaches the gate one request after another, a fraction of a millisecond apart. Without the hold,
    the first members bring the queue to the table's threshold and go without the rest, which then
    wait for the next batch.

    The hold needs the gate's own state (when the newest request and the group's first arrived), so
    only the gates run it (``GateRule.decide``). The simulator runs the rule as it is: there a group
    arrives at one instant and has no rest to wait for. ``hold_s`` is finite and > 0.
    """

    rule: BatchRule
    hold_s: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.hold_s) or self.hold_s <= 0:
            raise ValueError(f"group hold must be finite and > 0 seconds, got {self.hold_s!r}")

    @property
    def max_batch(self) -> int:
        return self.rule.max_batch

    def decide(self, n: int, oldest_wait_s: float) -> Decision:
        return self.rule.decide(n, oldest_wait_s)


@runtime_checkable
class InstanceRule(Protocol):
    """A batching rule for k instances fed by one queue: it also sees how many are busy."""

    max_batch: int
    instances: int

    def decide_busy(self, n: int, busy: int, oldest_wait_s: float) -> Decision:
        """Called when at least one instance is free (busy < instances) and n >= 0 requests wait."""
        ...


@dataclass(frozen=True)
class InstanceTable:
    """a(n, m): the batch to start when m of the k instances are busy and n requests wait.

    ``actions[m]`` is the row for m busy (m = 0..k-1), n = 0..N; beyond N serve min(n, B). An
    instance is free whenever m < k, so the row for m = k does not exist: then nothing can start.
    With k = 1 this is exactly a ``PolicyTable`` (``row(0)``).
    """

    actions: np.ndarray
    max_batch: int

    def __post_init__(self) -> None:
        a = np.asarray(self.actions, dtype=np.int64).copy()
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError("instance policy table must be a non-empty 2-d array a[m][n] (k rows)")
        for m in range(a.shape[0]):
            PolicyTable(a[m], self.max_batch)  # validates 0 <= a(n, m) <= min(n, B)
        a.setflags(write=False)
        object.__setattr__(self, "actions", a)
        object.__setattr__(self, "max_batch", int(self.max_batch))

    @property
    def instances(self) -> int:
        return int(self.actions.shape[0])

    @property
    def truncation(self) -> int:
        return int(self.actions.shape[1] - 1)

    def row(self, busy: int) -> PolicyTable:
        """a(., m) as a one-server table."""
        return PolicyTable(self.actions[busy], self.max_batch)

    def action(self, n: int, busy: int) -> int:
        if not 0 <= busy < self.instances:
            raise ValueError(f"busy instances must be in 0..{self.instances - 1}, got {busy}")
        if n < self.actions.shape[1]:
            return int(self.actions[busy, n])
        return min(n, self.max_batch)

    def decide_busy(self, n: int, busy: int, oldest_wait_s: float = 0.0) -> Decision:
        return Decision(self.action(n, busy))

    def thresholds(self) -> tuple[int, ...] | None:
        """Per m, the smallest n at which the row serves, if every row is of control-limit type."""
        out = []
        for m in range(self.instances):
            t = self.row(m).threshold()
            if t is None:
                return None
            out.append(t)
        return tuple(out)

    def to_lists(self) -> list[list[int]]:
        return [[int(x) for x in r] for r in self.actions]


def instance_thresholds(max_batch: int, thresholds: tuple[int, ...] | list[int]) -> InstanceTable:
    """Row m waits until n >= thresholds[m], then serves min(n, B); thresholds in 1..B."""
    if len(thresholds) < 1:
        raise ValueError("need one threshold per instance (at least one)")
    for t in thresholds:
        if isinstance(t, bool) or int(t) != t or not 1 <= t <= max_batch:
            raise ValueError(f"thresholds must be integers in 1..B={max_batch}, got {list(thresholds)}")
    n = np.arange(max_batch + 1)
    rows = [np.where(n >= int(t), np.minimum(n, max_batch), 0) for t in thresholds]
    return InstanceTable(np.vstack(rows), max_batch)


@dataclass(frozen=True)
class PerInstance:
    """A one-server rule applied to each free instance as if it were alone (it ignores m).

    This is what the gate did before k-instance policies: each instance slot runs the one-server rule.
    Triton's dynamic batcher with k instances, when it never misses an instance freeing, is
    ``PerInstance(TimeoutRule(B, delay), k)``; as it runs the bench's model (no prefetching), see
    ``TritonInstances``.
    """

    rule: BatchRule
    instances: int

    def __post_init__(self) -> None:
        if isinstance(self.instances, bool) or int(self.instances) != self.instances or self.instances < 1:
            raise ValueError(f"instances must be an integer >= 1, got {self.instances!r}")

    @property
    def max_batch(self) -> int:
        return self.rule.max_batch

    def decide_busy(self, n: int, busy: int, oldest_wait_s: float) -> Decision:
        return self.rule.decide(n, oldest_wait_s)


@dataclass(frozen=True)
class TritonInstances:
    """Triton's dynamic batcher without prefetching feeding ``instances`` instances of one model, each batch
    formed by ``rule``: the model of Triton's batcher at k instances, and of config mode's compiled settings,
    *as Triton runs them* (for predictions, not a gate rule).

    ``rule`` is what Triton's ``GetDynamicBatch`` does when it may form a batch: ``TimeoutRule(B, delay)``
    (``preferred_batch_size`` left to Triton's default [B]) or config mode's compiled rule with preferred sizes
    (``plugin.config_mode.compiler.TritonBatcherRule``, ``DynamicBatchingSettings.rule()``); any ``BatchRule``.

    What Triton core r24.10 does (docs/notes/issue-17.md, eleventh pass): one batcher thread per model
    (``TritonModel::SetConfiguredScheduler`` creates the ``DynamicBatchScheduler`` with no instance), one
    backend thread per instance; without prefetching a payload slot is an instance thread waiting in
    ``RateLimiter::DequeuePayload`` (``PayloadSlotAvailable``: ``WaitingConsumerCount() > 0``). So:

    - While some instance is free (waiting for a payload) the batcher sees it and decides as ``rule`` does,
      one batch per free instance (``PerInstance(rule, k)``); completions meanwhile change nothing.
    - When all k are busy it waits for a slot; arrivals do not wake it (``Enqueue``: no slot, no notify). A
      completion's callback wakes it and it checks for a slot while that instance thread is still on its way
      back to ``DequeuePayload``: the race, drawn per such completion with requests queued. Won (share
      ``catch_share``): it decides as ``rule``. Lost: it sleeps on, the instance idle with work queued, until
      the next arrival's enqueue (its group's first request: dispatched at once if ``rule`` serves then,
      else the group joins), the **next completion of another instance** (its callback wakes the batcher,
      which now finds the first instance waiting: no race there), or its 500 ms wait, counted from its last
      dispatch. A completion while another instance is already free is no race either.
    - At one instance and ``TimeoutRule`` this is ``TritonBatcher`` exactly (the same race stream).

    ``catch_share`` = 1 is ``PerInstance(rule, k)`` exactly (``rule`` itself at k = 1).
    """

    rule: BatchRule
    instances: int = 1
    catch_share: float = TRITON_CATCH_SHARE
    idle_wait_s: float = TRITON_IDLE_WAIT_S

    def __post_init__(self) -> None:
        r = self.rule
        if isinstance(r, (TritonBatcher, TritonInstances, InstanceRule)) or not isinstance(r, BatchRule):
            raise ValueError(f"Triton's batch rule must be a one-server BatchRule (TimeoutRule or the compiled "
                             f"preferred-size rule), got {type(r).__name__}")
        b = r.max_batch
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"the rule's max_batch must be an integer >= 1, got {b!r}")
        k = self.instances
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"instances must be an integer >= 1, got {k!r}")
        object.__setattr__(self, "instances", int(k))
        TritonBatcher(int(b), 0.0, catch_share=self.catch_share, idle_wait_s=self.idle_wait_s)  # the same checks

    @property
    def max_batch(self) -> int:
        return int(self.rule.max_batch)

    @classmethod
    def of(cls, batcher: TritonBatcher, instances: int = 1) -> "TritonInstances":
        """``batcher`` (Triton's one-instance model at a delay) at ``instances`` instances."""
        if not isinstance(batcher, TritonBatcher):
            raise ValueError(f"expected a TritonBatcher, got {type(batcher).__name__}")
        return cls(TimeoutRule(batcher.max_batch, batcher.timeout_s), instances, batcher.catch_share,
                   batcher.idle_wait_s)


@dataclass(frozen=True)
class InstanceGuard:
    """A k-instance table a(n, m) plus the max-wait guard: whenever an instance is free and the oldest
    request has waited ``max_wait_s``, serve min(n, B) (``MaxWaitGuard`` for k instances)."""

    table: InstanceTable
    max_wait_s: float

    def __post_init__(self) -> None:
        check_max_wait(self.max_wait_s)

    @property
    def max_batch(self) -> int:
        return self.table.max_batch

    @property
    def instances(self) -> int:
        return self.table.instances

    def decide_busy(self, n: int, busy: int, oldest_wait_s: float) -> Decision:
        if n > 0 and oldest_wait_s >= self.max_wait_s:
            return Decision(min(n, self.max_batch), reason="max_wait")
        d = self.table.decide_busy(n, busy, oldest_wait_s)
        if d.serve > 0 or n == 0:
            return d
        return Decision(0, self.max_wait_s - oldest_wait_s)


GuardReason = Literal["timeout", "max_wait"]
_GUARD_REASONS: tuple[GuardReason, ...] = ("timeout", "max_wait")


def _table_row(row: Sequence[int], b: int, name: str, prefix: str) -> tuple[int, ...]:
    """One row a(0), a(1), ... of a gate rule as ints; ValueError (``name`` / ``prefix`` say which row)
    unless it is non-empty and every a(n) is in 0..min(n, B)."""
    out = tuple(int(a) for a in row)
    if not out:
        raise ValueError(f"{name} is empty")
    for n, a in enumerate(out):
        if a < 0 or a > min(n, b):
            raise ValueError(f"{prefix}policy action a({n}) = {a} is outside 0..min({n}, B={b})")
    return out


@dataclass(frozen=True)
class GateRule:
    """The batching rule as both data planes run it: one description, one serialisation.

    A table a(n) for n = 0..N, min(n, ``beyond``) above it, and optionally a guard: once the oldest
    request has waited ``max_wait_s``, serve min(n, B) whatever the table says. Every rule the
    sidecar builds is one of these (``GateRule.of``): a solved or baseline ``PolicyTable`` as it is,
    Triton's ``TimeoutRule`` as the table 0 below B and B from B on guarded by its timeout (reported
    ``"timeout"``), and ``MaxWaitGuard`` adds or tightens the guard (reported ``"max_wait"``).

    The Python gate (plugin/gate.py) runs ``decide``; the native gate receives ``to_line()`` and runs
    the same decision in native/gate_core.h (``Policy::Decide``, ``ParsePolicy``). The shared decision
    vectors (tests/vectors/) hold both to the same answers and the same text.

    k instances (``InstanceTable``): ``table`` is the row for m = 0 busy instances and ``busy_tables``
    the rows for m = 1, 2, ...; the gate passes m = its in-flight batches. A gate with more slots than
    rows uses the last row for every larger m; without ``busy_tables`` the rule ignores m (one server,
    or a one-server rule applied to each slot).

    A group hold (``GroupHold``, ``hold_s`` > 0): a batch the table would start with all that waits, not
    a full one, waits until the newest request arrived ``hold_s`` ago, or ``HOLD_SPAN`` holds after its
    group's first member arrived, whichever is first. The gate passes both ages; the guard still fires.

    Text form: space-separated ``key=value`` fields, ``max_batch=B beyond=b table=a0,a1,...``, with
    busy rows ``busy_tables=row1;row2;...`` (each row ``a0,a1,...``, rows for m = 1, 2, ... separated
    by ``;``), when guarded ``max_wait_us=U guard_reason=timeout|max_wait``, and with a hold
    ``hold_us=H`` (times in whole microseconds, the only rounding in the round trip). A new part of the
    rule is a new key on both sides.
    """

    max_batch: int
    table: tuple[int, ...]
    beyond: int
    max_wait_s: float | None = None
    """The guard's maximum wait, seconds; None: no guard."""
    guard_reason: GuardReason = "max_wait"
    """What a served batch is reported as when the guard fired: Triton's "timeout" or the "max_wait" guard."""
    busy_tables: tuple[tuple[int, ...], ...] = ()
    """a(n, m) for m = 1, 2, ... busy instances (``table`` is m = 0); empty: the rule ignores m."""
    hold_s: float = 0.0
    """The group hold, seconds (``GroupHold``); 0: none."""

    def __post_init__(self) -> None:
        b = self.max_batch
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"max_batch must be >= 1, got {b!r}")
        if isinstance(self.beyond, bool) or not isinstance(self.beyond, int) or not 1 <= self.beyond <= b:
            raise ValueError(f"beyond must be in 1..B={b}, got {self.beyond!r}")
        object.__setattr__(self, "table", _table_row(self.table, b, "policy table", ""))
        object.__setattr__(self, "busy_tables", tuple(
            _table_row(row, b, f"busy_tables row for m = {m}", f"busy_tables row for m = {m}: ")
            for m, row in enumerate(self.busy_tables, start=1)))
        if self.max_wait_s is not None and (not math.isfinite(self.max_wait_s) or self.max_wait_s < 0):
            raise ValueError(f"max_wait must be finite and >= 0 seconds, got {self.max_wait_s!r}")
        if self.guard_reason not in _GUARD_REASONS:
            raise ValueError(f"guard_reason must be timeout or max_wait, got {self.guard_reason!r}")
        if not math.isfinite(self.hold_s) or self.hold_s < 0:
            raise ValueError(f"hold must be finite and >= 0 seconds, got {self.hold_s!r}")

    @classmethod
    def of(cls, rule: BatchRule) -> "GateRule":
        """The description of a rule the sidecar builds; ValueError for one no gate can run."""
        if isinstance(rule, GateRule):
            return rule
        if isinstance(rule, PolicyTable):
            return cls(rule.max_batch, tuple(int(a) for a in rule.actions), rule.beyond_batch)
        if isinstance(rule, InstanceTable):
            rows = [tuple(int(a) for a in r) for r in rule.actions]
            return cls(rule.max_batch, rows[0], rule.max_batch, busy_tables=tuple(rows[1:]))
        if isinstance(rule, PerInstance):
            return cls.of(rule.rule)
        if isinstance(rule, GroupHold):
            return replace(cls.of(rule.rule), hold_s=rule.hold_s)
        if isinstance(rule, InstanceGuard):
            return replace(cls.of(rule.table), max_wait_s=rule.max_wait_s, guard_reason="max_wait")
        if isinstance(rule, TimeoutRule):
            b = rule.max_batch
            return cls(b, (0,) * b + (b,), b, rule.timeout_s, "timeout")
        if isinstance(rule, MaxWaitGuard):
            inner = cls.of(rule.rule)
            if inner.max_wait_s is not None and (inner.max_wait_s, inner.guard_reason) <= (rule.max_wait_s, "max_wait"):
                return inner
            return replace(inner, max_wait_s=rule.max_wait_s, guard_reason="max_wait")
        raise ValueError(f"the gate cannot run a {type(rule).__name__} rule")

    def row(self, busy: int) -> tuple[int, ...]:
        """The table the rule uses with ``busy`` instances busy (the last row for any larger m)."""
        if busy <= 0 or not self.busy_tables:
            return self.table
        return self.busy_tables[min(busy, len(self.busy_tables)) - 1]

    def decide(self, n: int, oldest_wait_s: float, busy: int = 0, since_newest_s: float = math.inf,
               group_age_s: float = math.inf) -> Decision:
        """The decision with n waiting, the oldest for ``oldest_wait_s``, ``busy`` batches in flight, the
        newest request arrived ``since_newest_s`` ago and its group's first ``group_age_s`` ago (the
        hold's inputs; the defaults hold nothing). A held batch is a wait with reason "hold", to be
        decided again when the hold ends (or the guard fires, if sooner)."""
        if n <= 0:
            return Decision(0)
        wait = self.max_wait_s
        if wait is not None and oldest_wait_s >= wait:
            a = min(n, self.max_batch)
            # as TimeoutRule: a full batch is the rule's own choice, a timed-out one is the guard's
            if self.guard_reason == "timeout" and a >= self.max_batch:
                return Decision(a)
            return Decision(a, reason=self.guard_reason)
        table = self.row(busy)
        a = table[n] if n < len(table) else min(n, self.beyond)
        if a == 0:
            return Decision(0) if wait is None else Decision(0, wait - oldest_wait_s)
        hold = self.hold_s
        if hold > 0 and a >= n and n < self.max_batch:
            left = min(hold - since_newest_s, HOLD_SPAN * hold - group_age_s)
            if left > 0:
                return Decision(0, left if wait is None else min(left, wait - oldest_wait_s), reason="hold")
        return Decision(a)

    # -- the one serialisation ------------------------------------------------------------------
    def to_line(self) -> str:
        """The rule's fields as the native gate's ``policy`` command carries them (canonical order)."""
        out = f"max_batch={self.max_batch} beyond={self.beyond} table=" + ",".join(map(str, self.table))
        if self.busy_tables:
            out += " busy_tables=" + ";".join(",".join(map(str, r)) for r in self.busy_tables)
        if self.max_wait_s is not None:
            out += f" max_wait_us={max(0, round(self.max_wait_s * 1e6))} guard_reason={self.guard_reason}"
        if self.hold_s > 0:
            out += f" hold_us={round(self.hold_s * 1e6)}"
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "GateRule":
        """Parse the rule's fields (``to_line``'s keys); ValueError naming a bad or unknown one."""
        f = dict(fields)

        def integer(key: str, default: int | None = None) -> int:
            text = f.pop(key, None)
            if text is None:
                if default is None:
                    raise ValueError(f"{key}= missing")
                return default
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{key} must be an integer, got {text!r}") from None

        b = integer("max_batch")
        beyond = integer("beyond", b)
        wait_us = integer("max_wait_us", -1)
        hold_us = integer("hold_us", 0)
        if hold_us < 0:
            raise ValueError(f"hold_us must be >= 0, got {hold_us}")
        reason = f.pop("guard_reason", "max_wait")
        text = f.pop("table", None)
        if text is None:
            raise ValueError("table= missing")
        try:
            table = tuple(int(a) for a in text.split(",")) if text else ()
        except ValueError:
            raise ValueError(f"table must be integers separated by commas, got {text!r}") from None
        busy_text = f.pop("busy_tables", None)
        busy: tuple[tuple[int, ...], ...] = ()
        if busy_text is not None:
            try:
                busy = tuple(tuple(int(a) for a in r.split(",")) for r in busy_text.split(";"))
            except ValueError:
                raise ValueError(f"busy_tables must be rows of integers separated by commas, rows separated "
                                 f"by ';', got {busy_text!r}") from None
        if f:
            raise ValueError(f"unknown key {next(iter(f))!r}")
        if reason not in _GUARD_REASONS:
            raise ValueError(f"guard_reason must be timeout or max_wait, got {reason!r}")
        return cls(b, table, beyond, None if wait_us < 0 else wait_us * 1e-6, reason, busy, hold_us * 1e-6)

    @classmethod
    def from_line(cls, line: str) -> "GateRule":
        """Parse ``to_line``'s text."""
        fields: dict[str, str] = {}
        for token in line.split():
            key, eq, value = token.partition("=")
            if not eq or not key:
                raise ValueError(f"expected key=value, got {token!r}")
            fields[key] = value
        return cls.from_fields(fields)
