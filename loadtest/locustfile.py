"""Locust load for Triton's KServe v2 gRPC API (direct, or through the sidecar) with OPEN-LOOP arrivals.

Locust users are closed-loop by nature (a user sends, waits for the answer, then sends again), so a
slow server would slow the arrivals down. Here each Locust process runs ONE arrival scheduler,
started with the test (``test_start``), not with a user: it draws the arrival times from
``loadtest.arrival_spec`` chunk by chunk (``CHUNK_S`` seconds of schedule at a time, so the load
goes on for as long as the run, whether or not Locust knows its length: web UI, workers) and fires
each arrival at its time as its own greenlet, whether or not earlier requests have returned.

- Several processes (``--processes N``, or ``--master`` with workers): every process draws the same
  global sequence (chunk k from a generator seeded by ``--arrival-seed`` and k) and fires only its
  share, arrivals i with i mod W == its rank, so the total rate is the configured one, not W times
  it. The master numbers the workers it is about to start (0..W-1) and sends the numbering with the
  spawn message; without it a worker falls back to Locust's ``worker_index`` modulo ``--expect-workers``.
- Users: within a process the arrivals are spread round-robin over the live users' gRPC channels (a
  process with no user yet uses a channel of its own). The user count does not change the rate:
  a user spawned late does not replay the arrivals it missed, and none are bunched.
- An arrival the scheduler fires late (the process was busy) is fired at once, counted, and its
  lag reported; latency is measured from the scheduled time, as in ``smdp bench``.
- A trace ends: the scheduler then says so on stdout (the rest of the run sends nothing).

Run headless::

    locust -f loadtest/locustfile.py --headless -u 1 -t 20s --csv out/x --host 127.0.0.1:8011 \\
        --arrivals poisson --rate 100
    locust -f loadtest/locustfile.py --headless --processes 4 -u 8 -t 60s --host ... --rate 400
    # other processes: --arrivals steps:10x50,10x200 | ramp:50:300 |
    #                  trace:FILE (--trace-time-scale X | --trace-rate R)

Every request is reported through ``environment.events.request`` (name = model, type "grpc"),
so failures and response times appear in Locust's stats and CSVs. At the end each process prints
what it fired (count, offered rate, its share) and the send lag; ``--arrival-log PREFIX`` also
writes each process's scheduled and sent times to ``PREFIX.<rank>of<W>.csv``.
"""

from __future__ import annotations

# grpc under gevent: must run before any channel is created (and before tritonclient is imported).
import grpc.experimental.gevent as _grpc_gevent

_grpc_gevent.init_gevent()

import logging  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from loadtest.arrival_spec import DEFAULT_RAMP_S, parse_arrivals, share_of  # noqa: E402

CHUNK_S = 5.0
"""Seconds of schedule drawn at a time."""
LATE_S = 0.010
"""An arrival fired more than this after its scheduled time counts as late."""
START_DELAY_S = 0.5
"""From test start to the first scheduled time: the process opens its channel meanwhile."""
log = logging.getLogger("smdp.locust")


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--arrivals", default="poisson", include_in_web_ui=True,
                        help="poisson | steps:D1xR1,D2xR2 | ramp:R0:R1 | trace:FILE")
    parser.add_argument("--rate", type=float, default=50.0, include_in_web_ui=True,
                        help="Poisson rate, requests/second (all users and all processes together)")
    parser.add_argument("--ramp-duration", type=float, default=0.0, include_in_web_ui=True,
                        help="ramp: seconds from R0 to R1, then R1 holds (0 = the run time, else "
                        f"{DEFAULT_RAMP_S:g} s)")
    parser.add_argument("--trace-time-scale", type=float, default=1.0, include_in_web_ui=True,
                        help="trace replay: >1 compresses time")
    parser.add_argument("--trace-rate", type=float, default=0.0, include_in_web_ui=True,
                        help="trace replay: rescale to this mean rate (0 = keep the trace's timing)")
    parser.add_argument("--model", default="emulated_gpu", include_in_web_ui=True, help="Triton model to infer")
    parser.add_argument("--arrival-seed", type=int, default=0, include_in_web_ui=True,
                        help="seed of the arrival sequence (>= 0; the same in every process)")
    parser.add_argument("--request-timeout", type=float, default=30.0, include_in_web_ui=True,
                        help="deadline of one request, seconds")
    parser.add_argument("--arrival-log", default="", include_in_web_ui=False,
                        help="write each process's scheduled/sent times to PREFIX.<rank>of<W>.csv")


def worker_share(environment) -> tuple[int, int]:
    """(rank, W): this process fires global arrivals i with i mod W == rank."""
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        return 0, 1
    o = environment.parsed_options
    ranks = getattr(o, "openloop_ranks", None) or {}
    if runner.client_id in ranks:
        return int(ranks[runner.client_id]), len(ranks)
    count = max(1, int(getattr(o, "expect_workers", 1) or 1))
    if ranks:
        log.warning("open loop: this worker (%s) is not in the master's numbering %s; it takes index %d of %d",
                    runner.client_id, sorted(ranks), runner.worker_index % count, count)
    return max(runner.worker_index, 0) % count, count


class Scheduler:
    """This process's share of the open-loop arrival sequence, fired on time, chunk by chunk."""

    def __init__(self, environment) -> None:
        o = environment.parsed_options
        self.environment = environment
        self.spec = parse_arrivals(o.arrivals, rate=o.rate, time_scale=o.trace_time_scale,
                                   trace_rate=o.trace_rate or None)
        if int(o.arrival_seed) < 0:
            raise ValueError(f"--arrival-seed must be >= 0, got {o.arrival_seed}")
        self.seed = int(o.arrival_seed)
        run_time = getattr(o, "run_time", None)
        self.ramp_s = float(o.ramp_duration or run_time or DEFAULT_RAMP_S)
        self.model = o.model
        self.timeout = float(o.request_timeout)
        self.rank, self.workers = worker_share(environment)
        self.users: list["TritonOpenLoopUser"] = []
        self._rr = 0
        self._own = None  # (client, inputs) for when no user is alive
        self.pending: list = []
        self.scheduled: list[float] = []
        self.sent: list[float] = []
        self.sent_wall: list[float] = []
        self.late = 0
        self.ended = False
        self.t0 = time.monotonic() + START_DELAY_S
        self.greenlet = gevent.spawn(self._run)

    # -- the sequence --------------------------------------------------------------------------
    def share(self):
        """This process's scheduled times, in order, drawn lazily."""
        return share_of(self.spec, self.seed, self.rank, self.workers, chunk_s=CHUNK_S, ramp_s=self.ramp_s)

    # -- firing ------------------------------------------------------------------------------------
    def _channel(self):
        live = [u for u in self.users if u.client is not None]
        if live:  # round-robin over the users' channels
            self._rr = (self._rr + 1) % len(live)
            u = live[self._rr]
            return u.client, u.inputs()
        if self._own is None:
            self._own = _open(self.environment.host, self.model)
        return self._own

    def _run(self) -> None:
        try:
            self._own = _open(self.environment.host, self.model)  # before t0, not on the first arrival
        except Exception as exc:  # the users' channels may still work; the first send will say
            log.warning("open loop: cannot open a channel to %s: %s", self.environment.host, exc)
        for t in self.share():
            delay = self.t0 + t - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            client, inputs = self._channel()
            self.pending.append(gevent.spawn(self._one, client, inputs, t))
            if len(self.pending) > 1024:
                self.pending = [g for g in self.pending if not g.dead]
        self.ended = True
        print(f"open-loop: the arrival sequence ended after {len(self.sent)} arrivals "
              f"({time.monotonic() - self.t0:.1f} s); nothing more is sent", flush=True)

    def _one(self, client, inputs, t: float) -> None:
        scheduled = self.t0 + t
        sent = time.monotonic()
        lag = sent - scheduled
        self.scheduled.append(t)
        self.sent.append(sent - self.t0)
        self.sent_wall.append(time.time())
        if lag > LATE_S:
            self.late += 1
        exc = None
        length = 0
        try:
            result = client.infer(self.model, inputs, client_timeout=self.timeout)
            length = len(result.get_response().SerializeToString())
        except Exception as e:  # reported to Locust as a failure, with the server's message
            exc = e
        self.environment.events.request.fire(
            request_type="grpc", name=self.model, response_time=(time.monotonic() - scheduled) * 1e3,
            response_length=length, exception=exc, context={},
        )

    def stop(self) -> None:
        """End of the run: stop firing; requests in flight are abandoned unreported (not failures)."""
        self.greenlet.kill(block=True, timeout=2.0)
        gevent.killall([g for g in self.pending if not g.dead], block=True, timeout=2.0)
        if self._own is not None:
            self._own[0].close()
            self._own = None

    def report(self) -> str:
        n = len(self.sent)
        who = f"process {self.rank + 1} of {self.workers}" if self.workers > 1 else "this process"
        if n == 0:
            return f"open-loop ({who}): no arrival was fired"
        span = max(self.sent[-1], 1e-9)
        lags = np.asarray(self.sent) - np.asarray(self.scheduled)
        rate = getattr(self.spec, "rate", None)
        share = f", configured {rate / self.workers:g}/s for this share" if self.spec.kind == "poisson" else ""
        return (f"open-loop ({who}): fired {n} arrivals in {span:.1f} s = {n / span:.1f}/s{share}; "
                f"send lag mean {lags.mean() * 1e3:.2f} ms, p99 {np.percentile(lags, 99) * 1e3:.2f} ms, "
                f"max {lags.max() * 1e3:.2f} ms; {self.late} later than {LATE_S * 1e3:g} ms")

    def write_log(self, prefix: str) -> None:
        path = f"{prefix}.{self.rank}of{self.workers}.csv"
        rows = zip(self.scheduled, self.sent, self.sent_wall)
        with open(path, "w") as fh:
            fh.write("scheduled_s,sent_s,sent_unix_s\n")
            fh.writelines(f"{a!r},{b!r},{c!r}\n" for a, b, c in rows)


_state: dict = {}


@events.test_start.add_listener
def _start(environment, **_kw) -> None:
    old = _state.pop("scheduler", None)
    if old is not None:
        old.stop()
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        # number the workers the spawn messages are about to go to; sent with the parsed options
        nodes = sorted(runner.clients.ready + runner.clients.spawning + runner.clients.running,
                       key=lambda w: runner.get_worker_index(w.id))
        environment.parsed_options.openloop_ranks = {w.id: i for i, w in enumerate(nodes)}
        return
    _state["scheduler"] = Scheduler(environment)


@events.test_stop.add_listener
def _stop(environment, **_kw) -> None:
    sched = _state.pop("scheduler", None)
    if sched is None:
        return
    sched.stop()
    print(sched.report(), flush=True)
    prefix = getattr(environment.parsed_options, "arrival_log", "")
    if prefix:
        sched.write_log(prefix)


def _inputs_for(client, model: str):
    """One-row InferInputs for every input of a batching model, from its metadata."""
    import tritonclient.grpc as grpcclient

    meta = client.get_model_metadata(model)
    dtypes = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT32": np.int32, "INT64": np.int64}
    inputs = []
    for t in meta.inputs:
        shape = [1, *[int(d) for d in t.shape[1:]]]
        if t.datatype not in dtypes or any(d < 1 for d in shape):
            raise ValueError(f"model {model!r} input {t.name!r} ({t.datatype} {list(t.shape)}) is not supported")
        x = grpcclient.InferInput(t.name, shape, t.datatype)
        x.set_data_from_numpy(np.full(shape, 0.5, dtype=dtypes[t.datatype]))
        inputs.append(x)
    return inputs


def _url(host: str | None) -> str:
    if not host:
        raise ValueError("give --host HOST:PORT (Triton's or the sidecar's gRPC endpoint, no scheme)")
    return host.split("://", 1)[-1].rstrip("/")


def _open(host: str | None, model: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(_url(host))
    return client, _inputs_for(client, model)


class TritonOpenLoopUser(User):
    """A gRPC channel the process's scheduler sends through; a user never paces the arrivals."""

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.client = None
        self._inputs = None

    def inputs(self):
        return self._inputs

    def on_start(self) -> None:
        self.client, self._inputs = _open(self.host or self.environment.host, self.environment.parsed_options.model)
        sched = _state.get("scheduler")
        if sched is not None:
            sched.users.append(self)

    def on_stop(self) -> None:
        sched = _state.get("scheduler")
        if sched is not None and self in sched.users:
            sched.users.remove(self)
        client, self.client = self.client, None
        if client is not None:
            gevent.spawn_later(self.environment.parsed_options.request_timeout, client.close)

    @task
    def idle(self) -> None:
        """The scheduler does the sending; the user only holds its channel open."""
        gevent.sleep(3600.0)
