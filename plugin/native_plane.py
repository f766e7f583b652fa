"""The native data plane: ``native/smdp-gate`` (C++) carries inference, this process keeps control.

Why: every Python gRPC hop costs about a millisecond at low load on a small shared machine, so a
gate written in Python cannot add less latency than a plain Python pass-through proxy (RESULTS.md,
section 3). With ``data_plane: native`` the sidecar starts ``smdp-gate`` on its inference address; the
gate's queue, decisions, merging and splitting run in C++ (native/gate_core.h mirrors
plugin/gate.py), while policies, the rate estimator, profile learning, the control API and metrics
stay here, unchanged.

The two talk over the gate's stdin and stdout, one line per message (protocol in
native/smdp_gate.cc): this side pushes ``policy`` lines (the rule as a table, see ``policy_line``),
the gate reports the models it sees, arrival times, each batch's size, rows, time and member
waits (one line per model and report), and its counters. Times are CLOCK_MONOTONIC seconds (Python's ``time.monotonic``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

from solver.policy import BatchRule, GateRule

from .gate import GateCounters
from .model_names import is_model_name

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BINARY_ENV = "SMDP_NATIVE_GATE"
DEFAULT_BINARY = ROOT / "native" / "build" / "smdp-gate"


class NativePlaneError(RuntimeError):
    """The native gate is missing, did not start, or refused a command."""


def find_binary(explicit: str | os.PathLike | None = None) -> Path:
    """The ``smdp-gate`` executable: explicit path (which must be one), else $SMDP_NATIVE_GATE, the
    build tree, then PATH."""
    if explicit is not None:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return Path(explicit)
        raise NativePlaneError(f"native_binary {str(explicit)!r} is not an executable file")
    candidates = [os.environ.get(BINARY_ENV), DEFAULT_BINARY, shutil.which("smdp-gate")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise NativePlaneError(
        "the native data plane needs the smdp-gate binary: build it with `make native` (needs g++, protoc and "
        f"gRPC C++, e.g. Debian's libgrpc++-dev), or point {BINARY_ENV} at it"
    )


@dataclass(frozen=True)
class PlaneChoice:
    """Which data plane carries inference, and why (said once at start)."""

    plane: Literal["python", "native"]
    reason: str


def choose_plane(data_plane: str, mode: str, native_binary: str | None = None) -> PlaneChoice:
    """Resolve ``data_plane`` (auto | python | native) to the plane that will run.

    ``auto`` (the default) takes the native gate wherever its binary exists, since it adds the least
    latency (RESULTS.md); it falls back to the Python gate, saying why and how to get the native one,
    where the binary is missing or the configuration needs what only the Python plane does
    (``mode: released``). An explicit choice is taken as is (a missing binary then fails at start).
    """
    if data_plane == "python":
        return PlaneChoice("python", "data_plane: python (as configured)")
    if data_plane == "native":
        return PlaneChoice("native", "data_plane: native (as configured)")
    if data_plane != "auto":
        raise ValueError(f"data_plane must be auto, python or native, not {data_plane!r}")
    if mode != "merged":
        return PlaneChoice("python", f"data_plane auto: the Python gate, since mode {mode} runs on it only")
    try:
        binary = find_binary(native_binary)
    except NativePlaneError as exc:
        return PlaneChoice("python", f"data_plane auto: the Python gate, since {exc}")
    return PlaneChoice("native", f"data_plane auto: the native gate ({binary})")


def policy_line(
    model: str,
    rule: BatchRule,
    *,
    slots: int,
    max_queue: int,
    default_priority: int = 0,
    priority_levels: int = 0,
    dispatch_priority: int = 0,
) -> str:
    """The gate's ``policy`` command for a rule; raises ValueError for a rule it cannot express.

    The rule travels as its one description, ``GateRule`` (see ``GateRule.of``: a table with a batch
    size beyond it, optionally guarded by a maximum wait), in ``GateRule.to_line``'s text; the gate's
    own settings follow.
    """
    if not is_model_name(model):
        raise ValueError(f"model name {model!r} cannot be sent to the native gate")
    return f"policy {quote_field(model)} " + policy_fields(rule, slots, max_queue, default_priority, priority_levels,
                                                           dispatch_priority)


def policy_fields(rule: BatchRule, slots: int, max_queue: int, default_priority: int = 0, priority_levels: int = 0,
                  dispatch_priority: int = 0) -> str:
    """The fields of a ``policy`` command after its model name (``policy_line``)."""
    return (f"{GateRule.of(rule).to_line()} slots={slots} max_queue={max_queue} default_priority={default_priority} "
            f"priority_levels={priority_levels} dispatch_priority={dispatch_priority}")


CHECK_RULE = GateRule(2, (0, 1, 2), 2, 0.001, "max_wait", ((0, 0, 2),), 0.0005)
"""A rule with every key ``GateRule.to_line`` can write (a new key belongs here): a gate built from older
sources refuses it at start (``NativePlane.start``) instead of refusing the first policy that uses the key."""


def quote_field(text: str) -> str:
    """A model name (or message) as the gate's line protocol carries it: bytes outside printable ASCII,
    space and ``%`` as ``%XX``, so that no client-chosen name can end a line or a field."""
    return "".join(c if "!" <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
                   for c in text)


def unquote_field(field: str) -> str:
    """The inverse of ``quote_field``; ValueError for a field no gate writes."""
    if "%" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i]
        if c == "%":
            pair = field[i + 1:i + 3]
            if len(pair) != 2 or not all(h in "0123456789abcdefABCDEF" for h in pair):
                raise ValueError(f"malformed %-escape in {field[:80]!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out += c.encode()
            i += 1
    return out.decode("utf-8")


def forget_line(model: str) -> str:
    """The gate's ``forget`` command for a model."""
    if not is_model_name(model):
        raise ValueError(f"model name {model!r} cannot be sent to the native gate")
    return f"forget {quote_field(model)}"


@dataclass
class NativeGateView:
    """What the control plane knows of one model's native gate: the same reads as ``ModelGate``.

    The decisions are made in the native process; this view holds the rule last pushed there and
    the counters, queue length and in-flight count it last reported (every ``report_interval``).
    """

    model: str
    push: Callable[[str], None]
    rule: BatchRule
    slots: int
    max_queue: int
    default_priority: int = 0
    priority_levels: int = 0
    dispatch_priority: int = 0
    counters: GateCounters = field(default_factory=GateCounters)
    queue_length: int = 0
    in_flight: int = 0
    invalid: int = 0
    """Requests the gate refused for a bad ``priority`` or ``timeout`` parameter."""

    def __post_init__(self) -> None:
        self._send()

    def _send(self) -> None:
        self.push(policy_line(
            self.model, self.rule, slots=self.slots, max_queue=self.max_queue,
            default_priority=self.default_priority, priority_levels=self.priority_levels,
            dispatch_priority=self.dispatch_priority,
        ))

    def set_rule(self, rule: BatchRule) -> None:
        self.rule = rule
        self._send()

    def set_slots(self, slots: int) -> None:
        self.slots = slots
        self._send()

    def set_priorities(self, default_priority: int, priority_levels: int) -> None:
        self.default_priority, self.priority_levels = default_priority, priority_levels
        self._send()

    def update(self, values: dict[str, int]) -> dict[str, int]:
        """Apply a ``counters`` report; returns how much each counter grew since the last one."""
        c = self.counters
        grown = {}
        for name, attr in (("submitted", "submitted"), ("rejected", "rejected"), ("cancelled", "cancelled"),
                           ("expired", "expired"), ("batches", "dispatched_batches"),
                           ("requests", "dispatched_requests"), ("held", "decisions_held")):
            if name in values:
                grown[name] = values[name] - getattr(c, attr)
                setattr(c, attr, values[name])
        if "invalid" in values:
            grown["invalid"] = values["invalid"] - self.invalid
            self.invalid = values["invalid"]
        self.queue_length = values.get("queue", self.queue_length)
        self.in_flight = values.get("in_flight", self.in_flight)
        return grown


@dataclass(frozen=True)
class Seen:
    """The gate relays a model it has no policy for (reported again every second while traffic lasts)."""

    model: str


@dataclass(frozen=True)
class Lost:
    """Triton answered NOT_FOUND for a gated model: it is restarting, or the model was unloaded."""

    model: str


@dataclass(frozen=True)
class Loaded:
    """A repository load or unload of the model went through the gate and succeeded."""

    model: str


def in_arrival_order(times: Iterable[float], after: float) -> list[float]:
    """``times`` as a non-decreasing stream that starts no earlier than ``after``.

    The native gate stamps arrivals on gRPC's callback threads, so one report (and the next one)
    can hold them a few microseconds out of order; the rate and arrival estimators need arrivals in
    order. A time earlier than one already passed on is taken as that time (a shift of microseconds,
    not a lost arrival)."""
    out: list[float] = []
    last = after
    for t in sorted(times):
        last = max(last, t)
        out.append(last)
    return out


@dataclass(frozen=True)
class Arrivals:
    """Requests the gate queued since its last report."""

    model: str
    times: tuple[float, ...]
    """Their arrival times, CLOCK_MONOTONIC seconds."""


@dataclass(frozen=True)
class BatchDone:
    """A batch the gate sent came back (answered or failed)."""

    model: str
    size: int
    rows: int
    start: float
    end: float
    code: int
    """gRPC status code number of the batch's answer (0 = OK)."""
    why: str
    """Why the gate served it: ``policy``, or its guard's reason (``timeout``, ``max_wait``)."""
    waits: tuple[float, ...]
    """Each member's time in the gate before the batch went out, seconds."""


@dataclass(frozen=True)
class BatchesDone:
    """The batches the gate completed since its last report (one ``batches`` line per model and report),
    column by column in completion order, so that a report's bookkeeping is a few passes over columns
    rather than one event per batch."""

    model: str
    sizes: tuple[int, ...]
    """Each batch's members (>= 1)."""
    rows: tuple[int, ...]
    elapsed: tuple[float, ...]
    """Each batch's dispatch-to-answer time, seconds."""
    codes: tuple[int, ...]
    """Each batch's gRPC status code number (0 = OK)."""
    whys: tuple[str, ...]
    """Why the gate served each: ``policy``, or its guard's reason."""
    waits: tuple[float, ...]
    """Every member's time in the gate before its batch went out, batch after batch (``sum(sizes)``)."""

    @classmethod
    def of(cls, done: BatchDone) -> "BatchesDone":
        """One batch in the columns' form."""
        return cls(done.model, (done.size,), (done.rows,), (max(done.end - done.start, 0.0),), (done.code,),
                   (done.why,), done.waits)


@dataclass(frozen=True)
class Counters:
    """The gate's running counters and queue figures for a model (names as in ``NativeGateView.update``)."""

    model: str
    values: dict[str, int]


@dataclass(frozen=True)
class Reported:
    """The gate has reported everything it did before the last ``report`` command."""


@dataclass(frozen=True)
class CommandRefused:
    """The gate refused a command; ``message`` says which and why."""

    message: str


GateEvent = Seen | Lost | Loaded | Arrivals | BatchDone | BatchesDone | Counters
"""What the gate reports of its models; the control plane handles each by type."""

_BY_MODEL: dict[str, type[Seen] | type[Lost] | type[Loaded]] = {"seen": Seen, "lost": Lost, "loaded": Loaded}


@functools.lru_cache(maxsize=1024)
def _model_field(field: str, kind: str) -> str:
    """A line's model field decoded and checked; the few names a gate reports are decoded once each
    (every line of a report names its model)."""
    model = unquote_field(field)
    if not is_model_name(model):
        raise ValueError(f"{kind}: {model[:80]!r} is not a model name")
    return model


def parse_event(raw: bytes) -> GateEvent | Reported | CommandRefused | None:
    """One line of the gate's stdout as an event, or None for a line of no interest. Every model
    name on a line is percent-encoded (``quote_field``) and must decode to a model name: a line that
    does not parse exactly raises ValueError, and is refused whole."""
    parts = raw.decode("ascii").rstrip("\n").split(" ")
    kind = parts[0]
    if kind == "reported":
        return Reported()
    if kind == "error":
        return CommandRefused(unquote_field(" ".join(parts[1:])))
    if kind not in ("seen", "lost", "loaded", "arrive", "batch", "batches", "counters"):
        return None
    if len(parts) < 2:
        raise ValueError(f"{kind}: model name missing")
    model = _model_field(parts[1], kind)
    by_model = _BY_MODEL.get(kind)
    if by_model is not None:
        if len(parts) != 2:
            raise ValueError(f"{kind}: one field expected")
        return by_model(model)
    if kind == "arrive":
        return Arrivals(model, tuple(map(float, parts[2:])))
    if kind == "batch":
        if len(parts) != 9:
            raise ValueError("batch: 9 fields expected")
        waits = tuple(float(w) for w in parts[8].split(",")) if parts[8] else ()
        return BatchDone(model, int(parts[2]), int(parts[3]), float(parts[4]), float(parts[5]),
                         int(parts[6]), parts[7], waits)
    if kind == "batches":
        return _batches(model, parts)
    values = dict(p.split("=", 1) for p in parts[2:])
    return Counters(model, {k: int(v) for k, v in values.items()})


def _batches(model: str, parts: list[str]) -> BatchesDone:
    """A ``batches`` line's columns, checked to describe the same batches and their members."""
    if len(parts) != 8:
        raise ValueError("batches: 8 fields expected")
    sizes = tuple(map(int, parts[2].split(",")))
    rows = tuple(map(int, parts[3].split(",")))
    elapsed = tuple(map(float, parts[4].split(",")))
    codes = tuple(map(int, parts[5].split(",")))
    whys = tuple(parts[6].split(","))
    waits = tuple(map(float, parts[7].split(",")))
    if not len(sizes) == len(rows) == len(elapsed) == len(codes) == len(whys):
        raise ValueError("batches: columns of different lengths")
    if min(sizes) < 1 or min(rows) < 0 or "" in whys:
        raise ValueError("batches: a batch without members or reason, or with negative rows")
    if len(waits) != sum(sizes):
        raise ValueError(f"batches: {len(waits)} waits for {sum(sizes)} members")
    return BatchesDone(model, sizes, rows, elapsed, codes, whys, waits)


class NativePlane:
    """One ``smdp-gate`` process: started, fed policies, read for events, stopped.

    ``on_event`` receives each ``GateEvent`` the gate reports; it runs on the event loop, one event
    at a time.
    """

    def __init__(self, proc: asyncio.subprocess.Process, port: int, on_event: Callable[[GateEvent], None]) -> None:
        self.proc = proc
        self.port = port
        self._on_event = on_event
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._stderr = asyncio.get_running_loop().create_task(self._log_stderr())
        self.errors: list[str] = []
        self._barriers: list[asyncio.Future] = []
        self._stopping = False
        self.exited: asyncio.Future = asyncio.get_running_loop().create_future()
        """Resolves with the gate's exit status when it ends; before ``stop()``, that is a failure."""

    @classmethod
    async def start(
        cls,
        *,
        listen: str,
        triton_url: str,
        max_queue: int,
        on_event: Callable[[GateEvent], None],
        deny: tuple[str, ...] = (),
        upstream_timeout_s: float = 60.0,
        binary: str | os.PathLike | None = None,
        report_interval_ms: float = 50.0,
        start_timeout_s: float = 10.0,
    ) -> "NativePlane":
        exe = find_binary(binary)
        args = [str(exe), "--listen", listen, "--upstream", triton_url, "--max-queue", str(max_queue),
                "--report-interval-ms", f"{report_interval_ms:g}", "--upstream-timeout-ms",
                f"{upstream_timeout_s * 1e3:g}"]
        for method in deny:
            args += ["--deny", method]
        # GRPC_EXPERIMENTS is set for this process's gRPC (serve_cli); the gate's gRPC C++ has its own
        env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=1 << 24, env=env,
        )
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), start_timeout_s)
        except asyncio.TimeoutError:
            line = b""
        parts = line.decode().split()
        if len(parts) != 2 or parts[0] != "listening":
            if proc.returncode is None:
                proc.kill()
            err = (await proc.stderr.read()).decode().strip()
            await proc.wait()
            raise NativePlaneError(f"smdp-gate did not start on {listen}: {err or line.decode().strip() or 'no output'}")
        refused = await cls._check(proc, start_timeout_s)
        if refused is not None:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise NativePlaneError(f"smdp-gate at {exe} does not know the rules this sidecar sends ({refused}): it was "
                                   "built from older sources; rebuild it (make native)")
        return cls(proc, int(parts[1]), on_event)

    @staticmethod
    async def _check(proc: asyncio.subprocess.Process, timeout_s: float) -> str | None:
        """Ask a gate just started to parse ``CHECK_RULE``; None if it can, else why not. A line that is
        neither answer (a model seen by an early request) is passed over: the gate reports it again."""
        proc.stdin.write(f"check {policy_fields(CHECK_RULE, 2, 1, 1, 2, 1)}\n".encode())
        end = time.monotonic() + timeout_s
        while True:
            try:
                raw = await asyncio.wait_for(proc.stdout.readline(), max(end - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                return "no answer to `check`"
            if not raw:
                return "it exited"
            if raw.strip() == b"ok check":
                return None
            try:
                event = parse_event(raw)
            except ValueError:
                continue
            if type(event) is CommandRefused:
                return event.message

    def send(self, line: str) -> None:
        """Queue one command for the gate (it applies commands in order)."""
        if self.proc.returncode is not None or self.proc.stdin.is_closing():
            raise NativePlaneError("smdp-gate is not running")
        self.proc.stdin.write(line.encode() + b"\n")

    async def sync(self, timeout_s: float = 5.0) -> None:
        """Return once everything the gate did before this call has been reported and handled here
        (it reports every ``report_interval_ms`` otherwise): for status reads that must be exact."""
        fut = asyncio.get_running_loop().create_future()
        self._barriers.append(fut)
        self.send("report")
        await asyncio.wait_for(fut, timeout_s)

    async def _read(self, turn_every: int = 256) -> None:
        """Handle the gate's lines in order. A report can hold thousands of lines, all buffered: every
        ``turn_every`` lines the loop's other work (the HTTP listener, the control API) gets a turn."""
        handled = 0
        while True:
            handled += 1
            if handled % turn_every == 0:
                await asyncio.sleep(0)
            raw = await self.proc.stdout.readline()
            if not raw:
                if self.proc.returncode is None:
                    await self.proc.wait()
                unexpected = not self._stopping
                log.log(logging.ERROR if unexpected else logging.INFO,
                        "smdp-gate exited with status %s%s", self.proc.returncode,
                        ": inference is down, the sidecar stops" if unexpected else "")
                for fut in self._barriers:
                    if not fut.done():
                        fut.set_exception(NativePlaneError("smdp-gate exited"))
                if not self.exited.done():
                    self.exited.set_result(self.proc.returncode)
                return
            try:
                self._handle(raw)
            except Exception:  # one bad line or handler must not stop the reader
                log.exception("cannot handle smdp-gate event %r", raw[:200])

    def _handle(self, raw: bytes) -> None:
        event = parse_event(raw)
        if event is None:
            return
        if type(event) is Reported:
            if self._barriers:
                fut = self._barriers.pop(0)
                if not fut.done():
                    fut.set_result(None)
        elif type(event) is CommandRefused:
            self.errors.append(event.message)
            log.error("smdp-gate refused a command: %s", event.message)
        else:
            self._on_event(event)

    async def _log_stderr(self) -> None:
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                return
            log.warning("smdp-gate: %s", raw.decode().rstrip())

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain and stop: no new calls, in-flight ones answered (within ``grace_s``), events read."""
        self._stopping = True
        if self.proc.returncode is None:
            try:
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
            except (ConnectionError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s + 2.0)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for task in (self._reader, self._stderr):
            try:
                await asyncio.wait_for(task, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()


def monotonic_offset(clock: Callable[[], float]) -> float:
    """What to add to a CLOCK_MONOTONIC time to get the sidecar clock's time."""
    return clock() - time.monotonic()
