"""Locust load for Triton's KServe v2 gRPC API (direct, or through the sidecar) with OPEN-LOOP arrivals.

Locust users are closed-loop by nature (a user sends, waits for the answer, then sends again), so a
slow server would slow the arrivals down. Here the arrival times are drawn in advance from
``solver.arrivals`` and each user spawns one greenlet per arrival at its time, whether or not earlier
requests have returned. With N users, user k fires arrivals k, k + N, k + 2N, ... of one shared
sequence, so the total stays the process chosen (and any number of users works in the web UI).

Run headless::

    locust -f loadtest/locustfile.py --headless -u 1 -t 20s --csv out/x --host 127.0.0.1:8011 \\
        --arrivals poisson --rate 100
    # other processes: --arrivals steps:10x50,10x200 | ramp:50:300 |
    #                  trace:FILE (--trace-time-scale X | --trace-rate R)

Every request is reported through ``environment.events.request`` (name = model, type "grpc"),
so failures and response times appear in Locust's stats and CSVs. The send lag (how late the
generator fired) is printed at the end: a saturated client shows itself there.
"""

from __future__ import annotations

# grpc under gevent: must run before any channel is created (and before tritonclient is imported).
import grpc.experimental.gevent as _grpc_gevent

_grpc_gevent.init_gevent()

import itertools  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

from loadtest.arrival_spec import parse_arrivals  # noqa: E402

DEFAULT_HORIZON_S = 600.0


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--arrivals", default="poisson", include_in_web_ui=True,
                        help="poisson | steps:D1xR1,D2xR2 | ramp:R0:R1 | trace:FILE")
    parser.add_argument("--rate", type=float, default=50.0, include_in_web_ui=True,
                        help="Poisson rate, requests/second (all users together)")
    parser.add_argument("--trace-time-scale", type=float, default=1.0, include_in_web_ui=True,
                        help="trace replay: >1 compresses time")
    parser.add_argument("--trace-rate", type=float, default=0.0, include_in_web_ui=True,
                        help="trace replay: rescale to this mean rate (0 = keep the trace's timing)")
    parser.add_argument("--model", default="emulated_gpu", include_in_web_ui=True, help="Triton model to infer")
    parser.add_argument("--arrival-seed", type=int, default=0, include_in_web_ui=True,
                        help="seed of the arrival sequence")
    parser.add_argument("--request-timeout", type=float, default=30.0, include_in_web_ui=True,
                        help="deadline of one request, seconds")


_state: dict = {}


def _horizon(options) -> float:
    run_time = getattr(options, "run_time", None)
    return float(run_time) if run_time else DEFAULT_HORIZON_S


def _schedule(environment) -> np.ndarray:
    """The shared arrival sequence of this test run (drawn once, when the first user needs it)."""
    if "times" not in _state:
        o = environment.parsed_options
        spec = parse_arrivals(o.arrivals, rate=o.rate, time_scale=o.trace_time_scale,
                              trace_rate=o.trace_rate or None)
        _state["times"] = spec.times(_horizon(o), seed=o.arrival_seed)
        _state["t0"] = time.monotonic() + 0.2
        _state["lags"] = []
    return _state["times"]


@events.test_start.add_listener
def _reset(environment, **_kw) -> None:
    _state.clear()
    TritonOpenLoopUser._ids = itertools.count()


@events.test_stop.add_listener
def _report_lag(environment, **_kw) -> None:
    lags = np.asarray(_state.get("lags", []))
    if lags.size:
        print(f"open-loop send lag: mean {lags.mean() * 1e3:.2f} ms, p99 {np.percentile(lags, 99) * 1e3:.2f} ms, "
              f"max {lags.max() * 1e3:.2f} ms over {lags.size} requests", flush=True)


def _request_inputs(client, model: str):
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


class TritonOpenLoopUser(User):
    """Fires its share of the precomputed arrival sequence; never waits for a response to send."""

    _ids = itertools.count()

    def __init__(self, environment) -> None:
        super().__init__(environment)
        import tritonclient.grpc as grpcclient

        if not self.host:
            raise ValueError("give --host HOST:PORT (Triton's or the sidecar's gRPC endpoint, no scheme)")
        url = self.host.split("://", 1)[-1].rstrip("/")
        self.client = grpcclient.InferenceServerClient(url)
        self.model = environment.parsed_options.model
        self.timeout = float(environment.parsed_options.request_timeout)
        self.index = next(self._ids)
        self._pending: list = []

    def on_stop(self) -> None:
        # The run is over: requests still in flight are abandoned unreported (not failures), then
        # the channel closes.
        gevent.killall([g for g in self._pending if not g.dead], block=True, timeout=2.0)
        self.client.close()

    def _one(self, scheduled: float, inputs) -> None:
        sent = time.monotonic()
        _state["lags"].append(sent - scheduled)
        exc = None
        length = 0
        try:
            result = self.client.infer(self.model, inputs, client_timeout=self.timeout)
            length = len(result.get_response().SerializeToString())
        except Exception as e:  # reported to Locust as a failure, with the server's message
            exc = e
        self.environment.events.request.fire(
            request_type="grpc", name=self.model, response_time=(time.monotonic() - scheduled) * 1e3,
            response_length=length, exception=exc, context={},
        )

    @task
    def fire(self) -> None:
        times = _schedule(self.environment)
        t0 = _state["t0"]
        runner = self.environment.runner
        users = max(1, getattr(runner, "target_user_count", None) or 1)
        mine = times[self.index % users::users] if self.index < users else times[:0]
        inputs = _request_inputs(self.client, self.model)
        for t in mine:
            delay = t0 + t - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            self._pending.append(gevent.spawn(self._one, t0 + t, inputs))
            if len(self._pending) > 256:
                self._pending = [g for g in self._pending if not g.dead]
        gevent.joinall(self._pending, timeout=self.timeout + 1.0)
        raise StopUser()
