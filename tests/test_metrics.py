"""SidecarMetrics: events recorded, scraped over HTTP from a real server, parsed as Prometheus text."""

from __future__ import annotations

import math
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from plugin.metrics import SidecarMetrics, batch_size_buckets, start_metrics_server


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from one HTTP scrape."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def served():
    metrics = SidecarMetrics(max_batch=8)
    server, port = start_metrics_server(metrics, "127.0.0.1:0")
    try:
        yield metrics, f"http://127.0.0.1:{port}/metrics"
    finally:
        server.stop()


def test_batch_size_buckets_are_powers_of_two_up_to_max_batch():
    assert batch_size_buckets(8) == (1, 2, 4, 8)
    assert batch_size_buckets(1) == (1,)
    assert batch_size_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            batch_size_buckets(bad)


def test_counters_and_histograms_over_http(served):
    metrics, url = served
    for _ in range(5):
        metrics.request_arrived("m")
    metrics.request_arrived("other")
    metrics.request_rejected("m", "queue_full")
    metrics.request_rejected("m", "queue_full")
    metrics.request_rejected("m", "malformed")
    latencies = [0.0004, 0.004, 0.004, 0.25]
    for lat in latencies[:3]:
        metrics.request_answered("m", grpc.StatusCode.OK, lat)
    metrics.request_answered("m", grpc.StatusCode.UNAVAILABLE, latencies[3])
    for size, why in ((1, "policy"), (3, "policy"), (8, "max_wait"), (6, "timeout_rule")):
        metrics.batch_dispatched("m", size, why)
    metrics.batch_completed("m", 3, 0.004)
    metrics.batch_completed("m", 8, 0.02)

    s = _scrape(url)
    assert s["smdp_sidecar_requests_total"][(("model", "m"),)] == 5
    assert s["smdp_sidecar_requests_total"][(("model", "other"),)] == 1
    rej = s["smdp_sidecar_requests_rejected_total"]
    assert rej[(("model", "m"), ("reason", "queue_full"))] == 2
    assert rej[(("model", "m"), ("reason", "malformed"))] == 1
    resp = s["smdp_sidecar_responses_total"]
    assert resp[(("code", "OK"), ("model", "m"))] == 3
    assert resp[(("code", "UNAVAILABLE"), ("model", "m"))] == 1

    assert s["smdp_sidecar_request_latency_seconds_count"][(("model", "m"),)] == 4
    assert s["smdp_sidecar_request_latency_seconds_sum"][(("model", "m"),)] == pytest.approx(sum(latencies))
    lat_b = s["smdp_sidecar_request_latency_seconds_bucket"]
    assert lat_b[(("le", "0.0005"), ("model", "m"))] == 1
    assert lat_b[(("le", "0.005"), ("model", "m"))] == 3
    assert lat_b[(("le", "+Inf"), ("model", "m"))] == 4

    batches = s["smdp_sidecar_batches_total"]
    assert batches[(("model", "m"), ("why", "policy"))] == 2
    assert batches[(("model", "m"), ("why", "max_wait"))] == 1
    assert batches[(("model", "m"), ("why", "timeout_rule"))] == 1
    size_b = s["smdp_sidecar_batch_size_bucket"]
    # sizes 1, 3, 8, 6 against bounds 1, 2, 4, 8
    expect = {"1.0": 1, "2.0": 1, "4.0": 2, "8.0": 4, "+Inf": 4}
    for le, count in expect.items():
        assert size_b[(("le", le), ("model", "m"))] == count
    assert s["smdp_sidecar_batch_size_sum"][(("model", "m"),)] == 18
    assert s["smdp_sidecar_batch_service_seconds_count"][(("model", "m"),)] == 2
    assert s["smdp_sidecar_batch_service_seconds_sum"][(("model", "m"),)] == pytest.approx(0.024)


def test_gauges_hold_the_last_value(served):
    metrics, url = served
    metrics.set_queue("m", 7, 1)
    metrics.set_queue("m", 3, 0)
    metrics.set_policy("m", 4, 12, 0.0051, 164.5)
    metrics.set_rate("m", 2990.0, 2900.0, 3080.0)
    metrics.set_measured("m", 0.0062, 150.25, modelled=True)
    metrics.set_policy("n", 1, None, 0.002, 56.0)
    metrics.set_measured("n", 0.002, 80.0, modelled=False)

    s = _scrape(url)
    one = (("model", "m"),)
    assert s["smdp_sidecar_queue_length"][one] == 3
    assert s["smdp_sidecar_in_flight_batches"][one] == 0
    assert s["smdp_sidecar_policy_version"][one] == 4
    assert s["smdp_sidecar_policy_threshold"][one] == 12
    assert s["smdp_sidecar_predicted_latency_seconds"][one] == pytest.approx(0.0051)
    assert s["smdp_sidecar_predicted_power_watts"][one] == pytest.approx(164.5)
    assert s["smdp_sidecar_arrival_rate_per_second"][one] == 2990
    assert s["smdp_sidecar_arrival_rate_lower_per_second"][one] == 2900
    assert s["smdp_sidecar_arrival_rate_upper_per_second"][one] == 3080
    assert s["smdp_sidecar_measured_latency_seconds"][one] == pytest.approx(0.0062)
    assert s["smdp_sidecar_measured_power_watts"][one] == pytest.approx(150.25)
    assert s["smdp_sidecar_power_modelled"][one] == 1
    assert math.isnan(s["smdp_sidecar_policy_threshold"][(("model", "n"),)])
    assert s["smdp_sidecar_power_modelled"][(("model", "n"),)] == 0


def test_group_holds_count_what_the_gate_counted_since_the_last_tick_and_survive_a_new_gate(served):
    metrics, url = served
    one = (("model", "m"),)
    metrics.set_holds("m", 0)
    assert _scrape(url)["smdp_sidecar_group_holds_total"][one] == 0
    metrics.set_holds("m", 5)
    metrics.set_holds("m", 5)
    metrics.set_holds("m", 12)
    assert _scrape(url)["smdp_sidecar_group_holds_total"][one] == 12
    metrics.set_holds("m", 3)  # a reloaded model's new gate counts from 0: its 3 are new holds
    assert _scrape(url)["smdp_sidecar_group_holds_total"][one] == 15


def test_two_sidecars_in_one_process_do_not_clash():
    a, b = SidecarMetrics(max_batch=4), SidecarMetrics(max_batch=16)
    a.request_arrived("m")
    server_a, port_a = start_metrics_server(a)
    server_b, port_b = start_metrics_server(b)
    try:
        assert port_a != port_b
        sa = _scrape(f"http://127.0.0.1:{port_a}/metrics")
        sb = _scrape(f"http://127.0.0.1:{port_b}/metrics")
        assert sa["smdp_sidecar_requests_total"][(("model", "m"),)] == 1
        assert (("model", "m"),) not in sb.get("smdp_sidecar_requests_total", {})
    finally:
        server_a.stop()
        server_b.stop()


def test_stop_closes_the_port_and_is_idempotent():
    server, port = start_metrics_server(SidecarMetrics())
    assert server.url == f"http://127.0.0.1:{port}/metrics"
    _scrape(server.url)
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost:http", "127.0.0.1:70000", ":0"])
def test_bad_address_is_refused_with_its_value(address):
    with pytest.raises(ValueError, match="metrics address"):
        start_metrics_server(SidecarMetrics(), address)


def test_children_are_created_once_per_model_and_label():
    metrics = SidecarMetrics()
    metrics.request_answered("m", grpc.StatusCode.OK, 0.001)
    metrics.batch_dispatched("m", 2, "policy")
    first = metrics._children["m"]
    ok_child = first.answered[grpc.StatusCode.OK]
    metrics.request_answered("m", grpc.StatusCode.OK, 0.001)
    metrics.batch_dispatched("m", 2, "policy")
    assert metrics._children["m"] is first
    assert first.answered[grpc.StatusCode.OK] is ok_child
    assert len(first.dispatched) == 1


def _samples(metrics: SidecarMetrics) -> dict[str, dict[tuple, float]]:
    from prometheus_client import generate_latest

    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_a_reports_worth_at_once_exports_what_one_update_per_event_does():
    """The native gate's report is booked with one update per label and bucket; the exposition must
    be the one that one ``observe``/``inc`` per batch and answer gives, values on bucket bounds,
    beyond the last finite bound and NaN included."""
    latencies = [0.0005, 0.0004, 0.0011, 0.75, 3.0, 10.0, 11.0, 0.0, float("nan"), 0.002]
    sizes, whys = [1, 2, 8, 3, 1], ["policy", "policy", "timeout", "max_wait", "policy"]
    seconds = [0.001, 0.0005, 0.5, 20.0, 0.0]
    one, bulk = SidecarMetrics(max_batch=8), SidecarMetrics(max_batch=8)
    for size, why, s in zip(sizes, whys, seconds):
        one.batch_dispatched("m", size, why)
        one.batch_completed("m", size, s)
    for latency in latencies:
        one.request_answered("m", "OK", latency)
    for latency in latencies[:3]:
        one.request_answered("m", grpc.StatusCode.UNAVAILABLE, latency)
    bulk.batches_done("m", sizes, whys, seconds)
    bulk.requests_answered("m", "OK", latencies)
    bulk.requests_answered("m", grpc.StatusCode.UNAVAILABLE, latencies[:3])
    bulk.requests_answered("m", "OK", [])
    a, b = _samples(one), _samples(bulk)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for labels, value in a[name].items():
            assert value == pytest.approx(b[name][labels], rel=1e-12, nan_ok=True), (name, labels)
    assert a["smdp_sidecar_request_latency_seconds_count"][(("model", "m"),)] == 12  # NaN in no bucket


def _exposition(registry) -> list[str]:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode().splitlines()


@pytest.mark.parametrize("buckets", [(0.0005, 0.001, 0.002, 0.75, 10.0), (1.0, 2.0, 4.0, 8.0)])
def test_histogram_family_exports_what_prometheus_clients_own_histogram_does(buckets):
    """Our histogram (``observe`` per value, ``observe_all`` at once) against the library's
    ``Histogram.observe`` per value, two label sets, values on bounds, beyond the last, NaN, inf and
    negative included: the same lines but the library's ``_created`` ones."""
    from prometheus_client import CollectorRegistry, Histogram

    from plugin.metrics import HistogramFamily

    values = [0.0005, 0.0004, 0.0011, 0.75, 3.0, 10.0, 11.0, 0.0, float("nan"), 0.002, -1.0, float("inf"), 2, 8]
    texts = []
    for how in ("library", "observe", "observe_all", "library_unused", "unused"):
        registry = CollectorRegistry(auto_describe=True)
        if how.startswith("library"):
            family = Histogram("h_seconds", "a test histogram", ("model", "kind"), buckets=buckets, registry=registry)
        else:
            family = HistogramFamily("h_seconds", "a test histogram", ("model", "kind"), buckets, registry)
        if how.endswith("unused"):  # no label set used yet: HELP and TYPE only
            texts.append(_exposition(registry))
            continue
        for labels, share in ((("m", "a"), values), (("n", "b"), values[3:6]), (("o", "c"), [])):
            h = family.labels(*labels)
            if how == "observe_all":
                h.observe_all(share)
            else:
                for v in share:
                    h.observe(v)
        texts.append(_exposition(registry))
    library, observe, observe_all, library_unused, unused = texts
    assert any(line.startswith("h_seconds_created") for line in library)
    assert [line for line in library if "_created" not in line] == observe == observe_all
    assert 'h_seconds_count{kind="c",model="o"} 0.0' in observe
    count = next(line for line in observe if line.startswith('h_seconds_count{kind="a",model="m"}'))
    assert count.endswith(f" {float(len(values) - 1)}")  # NaN counts in no bucket
    assert unused == library_unused == ["# HELP h_seconds a test histogram", "# TYPE h_seconds histogram"]


def test_sidecar_histograms_have_the_library_names_and_no_created_series():
    metrics = SidecarMetrics(max_batch=8)
    metrics.request_answered("m", "OK", 0.003)
    metrics.batch_dispatched("m", 3, "policy")
    metrics.batch_completed("m", 3, 0.004)
    lines = _exposition(metrics.registry)
    for name, le in (("request_latency_seconds", "0.003"), ("batch_size", "4.0"), ("batch_service_seconds", "0.005")):
        full = "smdp_sidecar_" + name
        assert f"# TYPE {full} histogram" in lines
        assert f'{full}_bucket{{le="{le}",model="m"}} 1.0' in lines
        assert f'{full}_count{{model="m"}} 1.0' in lines
        assert not any(line.startswith(full + "_created") for line in lines)
    assert any(line.startswith("smdp_sidecar_requests_created") for line in lines)  # the counters keep theirs


@pytest.mark.parametrize("buckets", [(), (0.1, 0.1), (0.2, 0.1), (0.0, 1.0), (1.0, float("inf")), (float("nan"),)])
def test_histogram_family_refuses_bad_bounds_and_label_counts(buckets):
    from prometheus_client import CollectorRegistry

    from plugin.metrics import HistogramFamily

    with pytest.raises(ValueError, match="bucket bounds"):
        HistogramFamily("h", "test", ("model",), buckets, CollectorRegistry())
    family = HistogramFamily("h", "test", ("model",), (1.0,), CollectorRegistry())
    with pytest.raises(ValueError, match="1 label values expected"):
        family.labels("m", "extra")


def test_histogram_series_counts_every_value_from_several_threads_while_scraped():
    import threading

    from prometheus_client import CollectorRegistry

    from plugin.metrics import HistogramFamily

    registry = CollectorRegistry()
    family = HistogramFamily("h", "test", ("model",), (1.0, 2.0), registry)
    series = family.labels("m")
    done = threading.Event()
    seen: list[list[str]] = []

    def scrape() -> None:
        while not done.is_set():
            seen.append(_exposition(registry))

    def write(bulk: bool) -> None:
        for _ in range(2000):
            if bulk:
                series.observe_all([0.5, 1.5, 3.0])
            else:
                series.observe(1.5)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    writers = [threading.Thread(target=write, args=(bulk,)) for bulk in (True, False, True)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    scraper.join()
    final = _exposition(registry)
    assert 'h_bucket{le="1.0",model="m"} 4000.0' in final
    assert 'h_bucket{le="2.0",model="m"} 10000.0' in final
    assert 'h_count{model="m"} 14000.0' in final
    assert 'h_sum{model="m"} 23000.0' in final
    for lines in seen:  # each scrape a consistent snapshot: the sum is the one its buckets give
        samples = {(s.name, s.labels.get("le")): s.value
                   for family in text_string_to_metric_families("\n".join(lines) + "\n") for s in family.samples}
        if ("h_count", None) not in samples:
            continue
        one, two, count = samples[("h_bucket", "1.0")], samples[("h_bucket", "2.0")], samples[("h_count", None)]
        assert samples[("h_sum", None)] == 0.5 * one + 1.5 * (two - one) + 3.0 * (count - two)
