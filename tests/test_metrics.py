"""Metrics bundle and health/readiness, no broker: event-time skew kept out of the latency histogram."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamer.metrics import EVENT_TIME_FUTURE_S, EVENT_TIME_PAST_S, Health, Metrics, MetricsServer, split_skewed

YEAR = 365 * 24 * 3600.0


def batch(metrics: Metrics, latencies: list[float]) -> None:
    metrics.on_batch(
        readings=len(latencies), predictions=len(latencies), anomalies=0, new_devices=0, evicted_ttl=0,
        evicted_capacity=0, step_seconds=1e-3, batch_seconds=2e-3, latencies=np.asarray(latencies, dtype=np.float64),
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


def test_split_skewed_bounds():
    latencies = np.array([-YEAR, -EVENT_TIME_FUTURE_S - 1, -EVENT_TIME_FUTURE_S, -1.0, 0.5, EVENT_TIME_PAST_S,
                          EVENT_TIME_PAST_S + 1, 10 * YEAR])
    kept, future, past = split_skewed(latencies)
    assert (future, past) == (2, 2)
    # Within the bounds: kept; a little in the future (host clock skew) counts as 0, never negative.
    assert kept.tolist() == [0.0, 0.0, 0.5, EVENT_TIME_PAST_S]


def test_future_and_ancient_event_times_are_counted_apart_not_observed():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    batch(metrics, [0.02, 0.03, -YEAR, 2 * YEAR, -5.0])
    assert sample(registry, "streamer_event_time_skew_total", direction="future") == 1
    assert sample(registry, "streamer_event_time_skew_total", direction="past") == 1
    assert sample(registry, "streamer_event_to_publish_seconds_count") == 3
    assert sample(registry, "streamer_event_to_publish_seconds_sum") == pytest.approx(0.05)
    assert sample(registry, "streamer_readings_total") == 5  # the readings themselves still count


def test_skew_bounds_are_settable():
    registry = CollectorRegistry()
    metrics = Metrics(registry, event_time_future_s=1.0, event_time_past_s=60.0)
    batch(metrics, [-2.0, 61.0, 30.0])
    assert sample(registry, "streamer_event_time_skew_total", direction="future") == 1
    assert sample(registry, "streamer_event_time_skew_total", direction="past") == 1
    assert sample(registry, "streamer_event_to_publish_seconds_count") == 1


def test_health_live_but_not_ready_while_starting_and_while_the_broker_is_away():
    health = Health(60.0)
    # Start-up opens the clients (trying a broker that does not answer again and again): not
    # ready until the loop's first beat. It had been ready from the start.
    assert health.readiness() == (False, "starting: the Kafka clients are being opened")
    assert health.status() == (True, "ok (not ready: starting: the Kafka clients are being opened)")
    health.beat()
    assert health.status() == (True, "ok") and health.readiness() == (True, "ok")
    health.broker_away("no answer to an end-offsets request")
    ready, reason = health.readiness()
    assert not ready and "broker unreachable" in reason and "end-offsets" in reason
    live, text = health.status()
    assert live and "not ready: broker unreachable" in text
    health.broker_answered()
    assert health.readiness() == (True, "ok")


def test_a_stopping_service_is_live_but_not_ready():
    # It had read ready until the process was gone, while it finished its batch and closed.
    import threading

    stop = threading.Event()
    health = Health(60.0, stopping=stop)
    health.beat()
    assert health.readiness() == (True, "ok")
    stop.set()
    assert health.readiness() == (False, "stopping: the batch in hand is finished, checkpointed and committed")
    assert health.status() == (True, "ok (not ready: stopping: the batch in hand is finished, checkpointed and"
                                     " committed)")


def test_health_stale_or_failed_is_neither_live_nor_ready():
    health = Health(0.0)
    health._last -= 1.0
    assert not health.status()[0] and not health.readiness()[0]
    health = Health(60.0)
    health.fail("run loop stopped: boom")
    assert health.status() == (False, "run loop stopped: boom") == health.readiness()


def get(url: str) -> tuple[int, str]:
    """(HTTP status, body); (0, the error) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, repr(exc)


def test_readyz_over_http():
    registry = CollectorRegistry()
    health = Health(60.0)
    server = MetricsServer(registry, health, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/readyz")[0] == 503  # starting
        health.beat()
        assert get(base + "/readyz") == (200, "ok\n")
        health.broker_away("timed out")
        status, text = get(base + "/readyz")
        assert status == 503 and "broker unreachable" in text
        status, text = get(base + "/healthz")
        assert status == 200 and text.startswith("ok (not ready")
    finally:
        server.stop()


def request(port: int, method: str, path: str, host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_only_the_three_paths_answer_and_only_to_get_and_head():
    health = Health(60.0)
    health.beat()
    registry = CollectorRegistry()
    Metrics(registry)
    server = MetricsServer(registry, health, "127.0.0.1", 0).start()
    try:
        # A mistyped probe path had been answered 200 with the metrics: the probe could never fail.
        for path in ("/healthz/", "/HEALTHZ", "/nope", "/", "/metrics/x"):
            assert request(server.port, "GET", path)[0] == 404, path
        for method in ("POST", "PUT", "DELETE", "FOO"):
            status, headers, _ = request(server.port, method, "/healthz")
            assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert request(server.port, "GET", "/healthz")[::2] == (200, b"ok\n")
        assert request(server.port, "HEAD", "/healthz")[::2] == (200, b"")  # HEAD had sent the body
        status, head, body = request(server.port, "HEAD", "/metrics")
        assert (status, body) == (200, b"")  # HEAD had been 405 on /metrics
        status, headers, body = request(server.port, "GET", "/metrics")
        assert status == 200 and b"# HELP streamer_readings_total" in body
        assert head["Content-Length"] == headers["Content-Length"] == str(len(body))  # HEAD's had been 0
        assert request(server.port, "HEAD", "/readyz")[1]["Content-Length"] == "3"
        assert request(server.port, "GET", "/metrics?name[]=streamer_readings_total")[0] == 200
    finally:
        server.stop()


def test_a_client_that_stalls_mid_request_is_let_go(monkeypatch):
    import socket

    import streamer.metrics

    monkeypatch.setattr(streamer.metrics._QuietHandler, "timeout", 0.5)
    server = MetricsServer(CollectorRegistry(), Health(60.0), "127.0.0.1", 0).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as stalled:
            stalled.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the blank line
            started = time.monotonic()
            assert stalled.recv(100) == b""  # closed by the server; it had held a thread for good
            assert time.monotonic() - started < 4
    finally:
        server.stop()


def test_a_stalled_client_prints_no_traceback(monkeypatch, capfd, caplog):
    # socketserver's handle_error printed its timeout's traceback to stderr, past the log's format.
    import logging
    import socket

    import streamer.metrics

    monkeypatch.setattr(streamer.metrics._QuietHandler, "timeout", 0.3)
    server = MetricsServer(CollectorRegistry(), Health(60.0), "127.0.0.1", 0).start()
    try:
        with caplog.at_level(logging.DEBUG, logger="streamer.metrics"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as stalled:
                stalled.sendall(b"GET /metr")
                assert stalled.recv(100) == b""
            deadline = time.monotonic() + 3
            while "metrics client" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.stop()
    assert "Traceback" not in capfd.readouterr().err
    assert "timed out" in caplog.text


def test_buckets_reach_a_backlogs_latency_a_slow_batch_and_a_big_one():
    # Past the old top buckets (60 s, 1 s, 262,144) every quantile read the top bucket's bound.
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.on_batch(readings=300_000, predictions=1, anomalies=0, new_devices=0, evicted_ttl=0, evicted_capacity=0,
                     step_seconds=0.5, batch_seconds=2.5, latencies=np.array([3000.0]))
    assert sample(registry, "streamer_event_to_publish_seconds_bucket", le="3600.0") == 1
    assert sample(registry, "streamer_event_to_publish_seconds_bucket", le="900.0") == 0
    assert sample(registry, "streamer_batch_seconds_bucket", le="2.5") == 1
    assert sample(registry, "streamer_batch_seconds_bucket", le="1.0") == 0
    assert sample(registry, "streamer_batch_readings_bucket", le="1.048576e+06") == 1
    assert sample(registry, "streamer_batch_readings_bucket", le="262144.0") == 0


def test_the_host_of_all_interfaces_is_served_on_ipv4():
    health = Health(60.0)
    health.beat()
    server = MetricsServer(CollectorRegistry(), health, "", 0).start()  # "" had been refused once the run had started
    try:
        assert request(server.port, "GET", "/healthz")[::2] == (200, b"ok\n")
    finally:
        server.stop()


def test_an_ipv6_host_is_served():
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    health = Health(60.0)
    health.beat()
    server = MetricsServer(CollectorRegistry(), health, "::1", 0).start()  # had been "Address family not supported"
    try:
        assert request(server.port, "GET", "/healthz", host="::1")[::2] == (200, b"ok\n")
    finally:
        server.stop()


def test_checkpoint_lag_is_read_at_scrape_time():
    registry = CollectorRegistry()
    lag = {("readings", 0): 2.5}
    Metrics(registry).watch_checkpoint_lag(lambda: dict(lag))
    assert registry.get_sample_value("streamer_checkpoint_lag_seconds", {"topic": "readings", "partition": "0"}) == 2.5
    lag.clear()
    lag[("readings", 3)] = 0.0
    assert registry.get_sample_value("streamer_checkpoint_lag_seconds", {"topic": "readings", "partition": "0"}) is None
    assert registry.get_sample_value("streamer_checkpoint_lag_seconds", {"topic": "readings", "partition": "3"}) == 0.0


def test_counters_that_can_stay_zero_are_exported_at_zero_from_the_start():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    expected = {
        "streamer_dead_letters_total": ("reason", ["not_json", "invalid_schema", "wrong_value_count", "non_finite",
                                                   "key_mismatch", "not_arrow", "out_of_range", "prediction_not_finite"]),
        "streamer_partition_recoveries_total": ("outcome", ["checkpoint", "fresh", "no_checkpoint"]),
        "streamer_model_reloads_total": ("outcome", ["loaded", "reset", "failed"]),
        "streamer_evictions_total": ("reason", ["ttl", "capacity", "not_finite"]),
        "streamer_event_time_skew_total": ("direction", ["future", "past"]),
    }
    for name, (label, values) in expected.items():
        for value in values:
            assert registry.get_sample_value(name, {label: value}) == 0.0, (name, value)
    metrics.on_dead_letters({"not_json": 2})
    assert registry.get_sample_value("streamer_dead_letters_total", {"reason": "not_json"}) == 2.0
    metrics.on_batch(readings=3, predictions=3, anomalies=0, new_devices=0, evicted_ttl=1, evicted_capacity=0,
                     step_seconds=1e-3, batch_seconds=2e-3, latencies=np.zeros(3), reset_not_finite=2)
    assert [registry.get_sample_value("streamer_evictions_total", {"reason": r}) for r in ("ttl", "capacity", "not_finite")
            ] == [1.0, 0.0, 2.0]
    assert registry.get_sample_value("streamer_dead_letters_total", {"reason": "non_finite"}) == 0.0



def test_liveness_waits_for_start_up_as_long_as_it_may_take_then_for_the_loop_as_before():
    health = Health(60.0, start_within_s=360.0)  # three waits of kafka.startup_wait_s = 120
    health._last -= 200.0  # the brokers waited for 200 s: still live, not ready
    assert health.status()[0] and health.readiness() == (False, "starting: the Kafka clients are being opened")
    health._last -= 300.0  # past what start-up may take, and the stale time after it
    live, reason = health.status()
    assert not live and reason.startswith("start-up has not finished in 50")
    health.beat()  # the loop's first poll: from now on the loop's own 60 s
    health._last -= 61.0
    live, reason = health.status()
    assert not live and reason.startswith("run loop has not polled for 61")
