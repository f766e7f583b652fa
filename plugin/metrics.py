"""The sidecar's Prometheus metrics: what the gate sees, what the policy predicts, what was measured.

Why a private ``CollectorRegistry`` per ``SidecarMetrics``: the process-wide default registry
refuses a second metric of the same name, so two sidecars in one process (tests, a bench running
several gates) would clash; each sidecar owns its registry and serves it on its own port.

Why labelled children are cached per model: ``metric.labels(...)`` hashes and validates the label
values and takes a lock on every call. The server calls these methods on its event loop for every
request and batch, so each model's children are looked up once and kept in a dict; a call is then
one dict lookup plus the child's own (lock-protected) increment. Labels with open sets of values
(rejection reason, status code, dispatch reason) are cached per (model, value) the same way.

Names follow Prometheus conventions: prefix ``smdp_sidecar_``, base units in the name
(``_seconds``, ``_watts``), ``_total`` on counters (added by prometheus_client).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import math
import socket
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Iterable, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from solver.quantities import check_count

__all__ = ["SidecarMetrics", "MetricsServer", "start_metrics_server", "batch_size_buckets", "LATENCY_BUCKETS_S",
           "latency_buckets_with", "HistogramFamily", "HistogramSeries"]

PREFIX = "smdp_sidecar_"

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)
"""Request latency buckets, seconds: sub-millisecond to the seconds a stalled request might take."""

def latency_buckets_with(edges: list[float] | tuple[float, ...]) -> tuple[float, ...]:
    """The request-latency buckets plus the given edges (the configured SLOs' D), so that a histogram
    quantile at D is a bucket boundary, not an interpolation. Edges must be finite and > 0."""
    for e in edges:
        if not math.isfinite(e) or e <= 0:
            raise ValueError(f"latency bucket edges must be finite and > 0 seconds, got {e!r}")
    return tuple(sorted(set(LATENCY_BUCKETS_S) | {float(e) for e in edges}))


SERVICE_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Batch dispatch-to-completion buckets, seconds (an accelerator batch is milliseconds)."""


def batch_size_buckets(max_batch: int) -> tuple[float, ...]:
    """Upper bounds 1, 2, 4, ... up to max_batch (included even when not a power of two)."""
    check_count("max_batch", max_batch)
    out = []
    b = 1
    while b < max_batch:
        out.append(float(b))
        b *= 2
    out.append(float(max_batch))
    return tuple(out)


class HistogramSeries:
    """One label set's histogram: a count per bucket and the sum of the values, kept here.

    ``observe`` finds a value's bucket by bisection (the first upper bound >= the value; NaN counts in
    none but joins the sum, as prometheus_client's ``Histogram.observe`` does); ``observe_all`` books
    many values with one locked update. The lock makes a scrape's snapshot consistent (each bucket,
    the count and the sum from the same instant) and lets any thread call; today the writers are the
    event loop (the Python plane's request path, the native plane's report bookkeeping) and the
    readers the metrics server's scrape threads.
    """

    __slots__ = ("_bounds", "_counts", "_sum", "_lock")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # increasing, the last one +inf
        self._counts = [0] * len(bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self._bounds, value)
        with self._lock:
            if value <= math.inf:  # False for NaN only: it joins the sum, not a bucket
                self._counts[i] += 1
            self._sum += value

    def observe_all(self, values: Sequence[float]) -> None:
        """``observe(v)`` for each of ``values``: the buckets counted first, then one locked update."""
        if not values:
            return
        total = sum(values)
        if total == total:  # no NaN among the values
            counts = collections.Counter(map(bisect.bisect_left, itertools.repeat(self._bounds), values))
        else:
            counts = collections.Counter(bisect.bisect_left(self._bounds, v) for v in values if v <= math.inf)
        with self._lock:
            for i, n in counts.items():
                self._counts[i] += n
            self._sum += total

    def snapshot(self) -> tuple[list[int], float]:
        """(per-bucket counts, not cumulative; the sum), read together."""
        with self._lock:
            return list(self._counts), self._sum


class HistogramFamily:
    """A labelled histogram made of ``HistogramSeries`` and exported by ``collect`` (a prometheus_client
    custom collector, registered on ``registry``): prometheus_client's ``Histogram`` has no bulk
    observe, and its ``observe`` checks and searches the bounds linearly on every call.

    The exposition is ``Histogram``'s: HELP/TYPE, ``_bucket`` (cumulative, ``le`` formatted by the
    library, ``+Inf`` last), ``_count`` and ``_sum`` per label set, in the order the label sets were
    first used, a family with no label set yet shows its HELP/TYPE lines only. One difference: no
    ``_created`` series (the time a label set was first used); nothing in this project reads it.
    Bounds must be finite, > 0 and increasing (+Inf is added); all of the sidecar's are, and with a
    negative first bound the library's family would drop ``_count`` and ``_sum``."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(not (math.isfinite(b) and b > 0) for b in bounds) or \
                any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"histogram {name}: bucket bounds must be finite, > 0 and increasing, got {buckets!r}")
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._bounds = bounds + (math.inf,)
        self._le = tuple(floatToGoString(b) for b in self._bounds)
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> HistogramSeries:
        """The series of one label set (created on first use), label values in ``labelnames`` order."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"histogram {self._name}: {len(self._labelnames)} label values expected "
                             f"({', '.join(self._labelnames)}), got {values!r}")
        key = tuple(str(v) for v in values)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = HistogramSeries(self._bounds)
            return series

    def describe(self) -> Iterable[HistogramMetricFamily]:
        """The family without samples: the registry checks its names for clashes without a ``collect``."""
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            series = list(self._series.items())
        for key, s in series:
            counts, total = s.snapshot()
            family.add_metric(key, [(le, float(n)) for le, n in zip(self._le, itertools.accumulate(counts))], total)
        return [family]


@dataclass
class _ModelChildren:
    """One model's pre-resolved metric children (the label lookup done once)."""

    arrived: Any
    latency: HistogramSeries
    batch_size: HistogramSeries
    batch_service: HistogramSeries
    queue: Any
    in_flight: Any
    instances: Any
    devices: Any
    policy_version: Any
    policy_threshold: Any
    predicted_latency: Any
    predicted_power: Any
    rate: Any
    rate_lo: Any
    rate_hi: Any
    measured_latency: Any
    measured_power: Any
    power_modelled: Any
    profile_version: Any
    profile_updates: Any
    holds: Any
    rejected: dict
    answered: dict
    dispatched: dict
    holds_seen: int = 0
    """The gate's ``decisions_held`` when last exported (``set_holds``)."""


class SidecarMetrics:
    """Every metric one sidecar exports, in a registry of its own.

    Methods are safe to call from any thread (prometheus_client children and ``HistogramSeries`` lock
    their values; the child caches only ever gain entries, and a race to add one stores the same child
    twice). The three histograms (request latency, batch size, batch service time) are
    ``HistogramFamily``: the library's ``Histogram`` exposition without its ``_created`` series.
    """

    def __init__(self, max_batch: int = 128, *, latency_buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.max_batch = max_batch
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        m = ("model",)
        self._arrived = Counter(PREFIX + "requests", "Inference requests received by the gate", m, registry=r)
        self._rejected = Counter(
            PREFIX + "requests_rejected", "Requests refused before queueing (queue full, malformed, ...)",
            ("model", "reason"), registry=r,
        )
        self._answered = Counter(
            PREFIX + "responses", "Requests answered, by gRPC status code", ("model", "code"), registry=r
        )
        self._latency = HistogramFamily(
            PREFIX + "request_latency_seconds", "Arrival-to-answer time of a request in the sidecar",
            m, latency_buckets_s, r,
        )
        self._dispatched = Counter(
            PREFIX + "batches", "Batches dispatched to Triton, by the reason the gate served",
            ("model", "why"), registry=r,
        )
        self._batch_size = HistogramFamily(
            PREFIX + "batch_size", "Requests (rows) per dispatched batch", m, batch_size_buckets(max_batch), r,
        )
        self._batch_service = HistogramFamily(
            PREFIX + "batch_service_seconds", "Dispatch-to-completion time of a batch on Triton",
            m, SERVICE_BUCKETS_S, r,
        )
        self._holds = Counter(
            PREFIX + "group_holds", "Decisions that held a batch for the rest of a group (group_hold_s): the rule "
            "would have served, but the newest request had just arrived", m, registry=r,
        )
        self._queue = Gauge(PREFIX + "queue_length", "Requests waiting in the gate", m, registry=r)
        self._in_flight = Gauge(PREFIX + "in_flight_batches", "Batches sent to Triton and not yet completed", m, registry=r)
        self._instances = Gauge(PREFIX + "instances", "Model instances k the gate fills (its slots; the rule's "
                                "a(n, m) sees m = in-flight batches)", m, registry=r)
        self._devices = Gauge(PREFIX + "devices", "Devices D the model's instances draw idle power on (GPUs listed "
                              "in instance_group; the host for KIND_CPU): the solver counts P0 once per device",
                              m, registry=r)
        self._policy_version = Gauge(PREFIX + "policy_version", "Version of the policy in force (increments per swap)", m, registry=r)
        self._policy_threshold = Gauge(
            PREFIX + "policy_threshold",
            "Control limit K of the policy in force (serve min(n, B) once n >= K); NaN if not control-limit",
            m, registry=r,
        )
        self._pred_latency = Gauge(PREFIX + "predicted_latency_seconds", "Mean latency W the solver predicts for the policy", m, registry=r)
        self._pred_power = Gauge(PREFIX + "predicted_power_watts", "Mean power P the solver predicts for the policy", m, registry=r)
        self._rate = Gauge(PREFIX + "arrival_rate_per_second", "Estimated Poisson arrival rate, requests per second", m, registry=r)
        self._rate_lo = Gauge(PREFIX + "arrival_rate_lower_per_second", "Lower end of the arrival rate's confidence interval", m, registry=r)
        self._rate_hi = Gauge(PREFIX + "arrival_rate_upper_per_second", "Upper end of the arrival rate's confidence interval", m, registry=r)
        self._meas_latency = Gauge(PREFIX + "measured_latency_seconds", "Measured mean latency over the last window", m, registry=r)
        self._meas_power = Gauge(PREFIX + "measured_power_watts", "Measured (or modelled) mean accelerator power", m, registry=r)
        self._modelled = Gauge(
            PREFIX + "power_modelled", "1 when the power figure comes from the profile, not a meter", m, registry=r
        )
        self._service_time = Gauge(
            PREFIX + "service_time_seconds",
            "tau(b) per batch size b: source=gate_mean (dispatch-to-completion mean the gate observed, gRPC "
            "included), in_force (the profile the policy is solved with), triton_compute (Triton's compute_infer "
            "per batch); only sizes seen are exported",
            ("model", "batch_size", "source"), registry=r,
        )
        self._service_samples = Gauge(
            PREFIX + "service_time_batches", "Completed batches of each size the service-time estimate rests on",
            ("model", "batch_size"), registry=r,
        )
        self._profile_version = Gauge(
            PREFIX + "profile_version", "Service profile in force: 0 = the CSV prior, +1 per learned profile adopted",
            m, registry=r,
        )
        self._profile_updates = Counter(
            PREFIX + "profile_updates", "Learned service profiles adopted (each asks for a new policy)", m, registry=r
        )
        # -- tail-latency SLO (plugin/loop/controller.py): the target, the prediction, the measurement
        self._slo_latency = Gauge(PREFIX + "slo_latency_seconds", "D of the model's SLO (q-quantile <= D)", m, registry=r)
        self._slo_quantile = Gauge(PREFIX + "slo_quantile", "q of the model's SLO", m, registry=r)
        self._slo_feasible = Gauge(
            PREFIX + "slo_feasible",
            "1 when the policy in force is predicted to meet the SLO; 0: none does at this rate, greedy is served",
            m, registry=r)
        self._slo_predicted = Gauge(
            PREFIX + "slo_predicted_quantile_seconds", "Predicted q-quantile of response time of the policy in force",
            m, registry=r)
        self._slo_measured = Gauge(
            PREFIX + "slo_measured_quantile_seconds",
            "Measured q-quantile of arrival-to-answer time over the rate estimator's window", m, registry=r)
        self._slo_attainment = Gauge(
            PREFIX + "slo_attainment",
            "Share of requests answered within D over the rate estimator's window (the SLO asks for >= q)",
            m, registry=r)
        self._slo_gauges = (self._slo_latency, self._slo_quantile, self._slo_feasible, self._slo_predicted,
                            self._slo_measured, self._slo_attainment)
        self._children: dict[str, _ModelChildren] = {}
        self._lock = threading.Lock()

    # -- label cache -------------------------------------------------------------------------
    def _model(self, model: str) -> _ModelChildren:
        c = self._children.get(model)
        if c is None:
            with self._lock:
                c = self._children.get(model)
                if c is None:
                    c = _ModelChildren(
                        arrived=self._arrived.labels(model),
                        latency=self._latency.labels(model),
                        batch_size=self._batch_size.labels(model),
                        batch_service=self._batch_service.labels(model),
                        queue=self._queue.labels(model),
                        in_flight=self._in_flight.labels(model),
                        instances=self._instances.labels(model),
                        devices=self._devices.labels(model),
                        policy_version=self._policy_version.labels(model),
                        policy_threshold=self._policy_threshold.labels(model),
                        predicted_latency=self._pred_latency.labels(model),
                        predicted_power=self._pred_power.labels(model),
                        rate=self._rate.labels(model),
                        rate_lo=self._rate_lo.labels(model),
                        rate_hi=self._rate_hi.labels(model),
                        measured_latency=self._meas_latency.labels(model),
                        measured_power=self._meas_power.labels(model),
                        power_modelled=self._modelled.labels(model),
                        profile_version=self._profile_version.labels(model),
                        profile_updates=self._profile_updates.labels(model),
                        holds=self._holds.labels(model),
                        rejected={},
                        answered={},
                        dispatched={},
                    )
                    self._children[model] = c
        return c

    @staticmethod
    def _label(value: Any) -> str:
        """A gRPC StatusCode (or any enum) by its name, anything else as text."""
        name = getattr(value, "name", None)
        return name if isinstance(name, str) else str(value)

    def _answered_child(self, c: _ModelChildren, model: str, code: Any) -> Counter:
        """The model's answered counter for ``code``, labelled once and then kept."""
        child = c.answered.get(code)
        if child is None:
            child = c.answered[code] = self._answered.labels(model, self._label(code))
        return child

    def _dispatched_child(self, c: _ModelChildren, model: str, why: str) -> Counter:
        """The model's dispatched-batches counter for ``why``, labelled once and then kept."""
        child = c.dispatched.get(why)
        if child is None:
            child = c.dispatched[why] = self._dispatched.labels(model, self._label(why))
        return child

    # -- hot path ----------------------------------------------------------------------------
    def request_arrived(self, model: str, count: int = 1) -> None:
        (self._children.get(model) or self._model(model)).arrived.inc(count)

    def request_rejected(self, model: str, reason: str) -> None:
        c = self._model(model)
        child = c.rejected.get(reason)
        if child is None:
            child = c.rejected[reason] = self._rejected.labels(model, self._label(reason))
        child.inc()

    def request_answered(self, model: str, code: Any, latency_s: float) -> None:
        """One answer (response or error status) and its arrival-to-answer time."""
        c = self._model(model)
        self._answered_child(c, model, code).inc()
        c.latency.observe(latency_s)

    def batch_dispatched(self, model: str, size: int, why: str) -> None:
        c = self._model(model)
        self._dispatched_child(c, model, why).inc()
        c.batch_size.observe(size)

    def batch_completed(self, model: str, size: int, seconds: float) -> None:
        # size is accepted for symmetry with batch_dispatched; the per-size service time is the
        # estimator's job (a label per size would multiply the series by B).
        self._model(model).batch_service.observe(seconds)

    def request_alone(self, model: str, size: int, why: str, seconds: float, code: Any, latency_s: float) -> None:
        """A request served alone, once its batch ended: ``batch_dispatched``, ``batch_completed`` and,
        unless ``code`` is None (its caller went away), ``request_answered``, with one model lookup."""
        # The lookups written out (the labelled children are there after a model's first request): on a
        # machine whose caches other processes fill between requests, each further function costs
        # microseconds per request (docs/notes/issue-16.md, ninth round).
        c = self._children.get(model) or self._model(model)
        (c.dispatched.get(why) or self._dispatched_child(c, model, why)).inc()
        c.batch_size.observe(size)
        c.batch_service.observe(seconds)
        if code is None:
            return
        (c.answered.get(code) or self._answered_child(c, model, code)).inc()
        c.latency.observe(latency_s)

    # -- a report's worth at once (the native gate reports its batches every report interval) --------
    def requests_answered(self, model: str, code: Any, latencies_s: Sequence[float]) -> None:
        """``request_answered`` for each of ``latencies_s``, all with ``code``: one update per bucket."""
        if not latencies_s:
            return
        c = self._model(model)
        self._answered_child(c, model, code).inc(len(latencies_s))
        c.latency.observe_all(latencies_s)

    def batches_done(self, model: str, sizes: Sequence[int], whys: Iterable[str], seconds: Sequence[float]) -> None:
        """``batch_dispatched`` and ``batch_completed`` for each batch (``sizes``, ``whys`` and ``seconds``
        in the same order), one update per label and bucket."""
        c = self._model(model)
        for why, n in collections.Counter(whys).items():
            self._dispatched_child(c, model, why).inc(n)
        c.batch_size.observe_all(sizes)
        c.batch_service.observe_all(seconds)

    def set_queue(self, model: str, queue_length: int, in_flight: int, instances: int = 1, devices: int = 1) -> None:
        c = self._model(model)
        c.queue.set(queue_length)
        c.in_flight.set(in_flight)
        c.instances.set(instances)
        c.devices.set(devices)

    def set_holds(self, model: str, held: int) -> None:
        """The gate's running count of group holds (``GateCounters.decisions_held``), read once a tick: the
        counter grows by what it grew since; a gate that started again (a reloaded model) counts from 0."""
        c = self._model(model)
        c.holds.inc(held - c.holds_seen if held >= c.holds_seen else held)
        c.holds_seen = held

    # -- occasional --------------------------------------------------------------------------
    def set_policy(
        self, model: str, version: int, threshold: int | None, predicted_latency_s: float, predicted_power_w: float
    ) -> None:
        c = self._model(model)
        c.policy_version.set(version)
        c.policy_threshold.set(math.nan if threshold is None else threshold)
        c.predicted_latency.set(predicted_latency_s)
        c.predicted_power.set(predicted_power_w)

    def set_rate(self, model: str, rate: float, lo: float, hi: float) -> None:
        c = self._model(model)
        c.rate.set(rate)
        c.rate_lo.set(lo)
        c.rate_hi.set(hi)

    def set_measured(self, model: str, latency_s: float, power_w: float, modelled: bool) -> None:
        """W over the last window (NaN: nothing answered in it) and P, with whether P is modelled."""
        c = self._model(model)
        c.measured_latency.set(latency_s)
        c.measured_power.set(power_w)
        c.power_modelled.set(1.0 if modelled else 0.0)

    def set_slo(self, model: str, quantile: float, latency_s: float, predicted_quantile_s: float,
                feasible: bool) -> None:
        """The SLO in force and what the search predicted for the policy it chose."""
        self._slo_quantile.labels(model).set(quantile)
        self._slo_latency.labels(model).set(latency_s)
        self._slo_predicted.labels(model).set(predicted_quantile_s)
        self._slo_feasible.labels(model).set(1.0 if feasible else 0.0)

    def set_slo_measured(self, model: str, quantile_s: float, attainment: float) -> None:
        """The measured q-quantile and attainment over the window."""
        self._slo_measured.labels(model).set(quantile_s)
        self._slo_attainment.labels(model).set(attainment)

    def clear_slo(self, model: str) -> None:
        """The model no longer has an SLO: its SLO series disappear."""
        for g in self._slo_gauges:
            try:
                g.remove(model)
            except KeyError:
                pass

    def profile_learned(self, model: str, version: int) -> None:
        """A learned service profile was adopted (it asks for a new policy)."""
        c = self._model(model)
        c.profile_updates.inc()
        c.profile_version.set(version)

    def set_service_times(self, model: str, sizes: Any) -> None:
        """Per-size tau(b) from ``ProfileLearner.sizes``: the gate's mean, the profile in force, Triton's."""
        for s in sizes:
            b = str(s.batch_size)
            if s.n:
                self._service_time.labels(model, b, "gate_mean").set(s.mean_s)
            self._service_time.labels(model, b, "in_force").set(s.learned_s)
            if s.triton_compute_s is not None:
                self._service_time.labels(model, b, "triton_compute").set(s.triton_compute_s)
            self._service_samples.labels(model, b).set(s.n)


# ------------------------------------------------------------------------------------------------
# HTTP exposition


class _QuietHandler(WSGIRequestHandler):
    """wsgiref logs every request to stderr; a scrape every few seconds would flood the log."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base)
        pass


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a slow scraper never blocks another; threads die with the process."""

    daemon_threads = True
    allow_reuse_address = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """A running ``/metrics`` endpoint; ``stop()`` shuts it down and joins its thread (idempotent)."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = host
        self.port = int(httpd.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"metrics address must be host:port (port 0 = a free port), got {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"metrics address {address!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"metrics address {address!r}: port {number} is outside 0..65535")
    return host, number


def start_metrics_server(metrics: SidecarMetrics, address: str = "127.0.0.1:0") -> tuple[MetricsServer, int]:
    """Serve ``metrics`` at ``http://address/metrics`` from a daemon thread; returns (server, bound port).

    Any path answers with the exposition, as prometheus_client's own server does. Raises OSError
    when the address cannot be bound.
    """
    host, port = _split_address(address)
    server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
    app = make_wsgi_app(metrics.registry)
    httpd = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"smdp-metrics-{httpd.server_port}", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread, host)
    return server, server.port
