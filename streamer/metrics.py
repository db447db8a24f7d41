"""Prometheus metrics for the run loop, built on an injected registry; /metrics and /healthz.

The only module that imports prometheus_client. Calls happen once per batch: per-reading
latencies go into a numpy-backed histogram (``BulkHistogram``) that takes a whole batch in
one call; values that can be read off the state (devices, capacity) are read at scrape time.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from streamer.records import DeadLetterReason

log = logging.getLogger(__name__)

# Steps take tens of microseconds to tens of milliseconds.
STEP_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
# To batch.max_records' 1M messages, and past it: a batch message brings many readings.
BATCH_SIZE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# A whole batch waits for its acknowledgements and commit: through a broker's restart, a minute or two.
BATCH_SECONDS_BUCKETS = STEP_BUCKETS + (2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# To EVENT_TIME_PAST_S: a backlog caught up after an outage has latencies of hours, which had all
# fallen past 60 s, where every quantile reads 60.
LATENCY_BUCKETS = (1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                   900.0, 3600.0, 4 * 3600.0, 24 * 3600.0, 7 * 24 * 3600.0)
# A checkpoint of a big partition to the Kafka store takes a second or more (README, checkpoint stores).
CHECKPOINT_BUCKETS = (1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Event times outside [now - EVENT_TIME_PAST_S, now + EVENT_TIME_FUTURE_S] are a device's clock or a
# replayed backlog, not latency: they are counted apart and kept out of the latency histogram.
EVENT_TIME_FUTURE_S = 300.0
EVENT_TIME_PAST_S = 7 * 24 * 3600.0
# Label values of counters that are exported at 0 from the start, so that rate() and alerts on
# them have a series before the first event (a labelled child exists only once created).
RECOVERY_OUTCOMES = ("checkpoint", "fresh", "no_checkpoint")
MODEL_RELOAD_OUTCOMES = ("loaded", "reset", "failed")
HTTP_TIMEOUT_S = 10.0  # a metrics/health client that sends nothing for this long is dropped


def split_skewed(
    latencies: np.ndarray, future_s: float = EVENT_TIME_FUTURE_S, past_s: float = EVENT_TIME_PAST_S
) -> tuple[np.ndarray, int, int]:
    """``latencies`` (seconds, acknowledgement time minus event time) -> (those within the bounds,
    clipped at 0, how many are more than ``future_s`` in the future, how many more than ``past_s`` old).

    An event time up to ``future_s`` ahead is clock skew between hosts: it counts as latency 0, so
    the histogram's sum never goes down.
    """
    future = latencies < -future_s
    past = latencies > past_s
    n_future, n_past = int(future.sum()), int(past.sum())
    kept = latencies[~(future | past)] if n_future or n_past else latencies
    return np.maximum(kept, 0.0), n_future, n_past


class BulkHistogram(Collector):
    """A histogram observed a whole array at a time (prometheus_client observes one value per call)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(sorted(buckets), dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # last bucket: +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        index = np.searchsorted(self.bounds, values, side="left")  # le semantics: value <= bound
        counts = np.bincount(index, minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        labels = [*(repr(float(b)) for b in self.bounds), "+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(labels, cumulative)), total)
        yield family

    def describe(self) -> Iterable[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)


class Metrics:
    """Every metric of a run, registered on ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        event_time_future_s: float = EVENT_TIME_FUTURE_S,
        event_time_past_s: float = EVENT_TIME_PAST_S,
    ) -> None:
        self.registry = registry
        self.event_time_future_s = event_time_future_s
        self.event_time_past_s = event_time_past_s
        self.readings = Counter("streamer_readings", "Valid readings consumed", registry=registry)
        # The dead-letter rate's denominator: dead letters are messages, and a batch message's
        # readings are many (alerts.yml had divided by readings, and half the messages of a topic
        # of batch messages dead-lettered read as 1%).
        self.input_messages = Counter(
            "streamer_input_messages", "Input messages taken in, good or dead-lettered (a batch message counts once;"
            " messages replayed after a recovery do not count again)", registry=registry,
        )
        self.predictions = Counter("streamer_predictions", "Predictions acknowledged by the broker", registry=registry)
        self.dead_letters = Counter(
            "streamer_dead_letters", "Messages sent to the dead-letter topic", ["reason"], registry=registry
        )
        for reason in DeadLetterReason:
            self.dead_letters.labels(reason=reason.value)
        self.anomalies = Counter("streamer_anomalies", "Readings flagged as anomalous", registry=registry)
        self.evictions = Counter(
            "streamer_evictions", "Devices evicted from the state table", ["reason"], registry=registry
        )
        self._evicted_ttl = self.evictions.labels(reason="ttl")
        self._evicted_capacity = self.evictions.labels(reason="capacity")
        self._reset_not_finite = self.evictions.labels(reason="not_finite")  # state dropped, the device kept
        self.new_devices = Counter("streamer_new_devices", "Devices that started from zero state", registry=registry)
        self.batches = Counter("streamer_batches", "Micro-batches completed", registry=registry)
        self.batch_size = Histogram(
            "streamer_batch_readings", "Readings per micro-batch", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.step_seconds = Histogram(
            "streamer_step_seconds", "Engine step time per micro-batch", buckets=STEP_BUCKETS, registry=registry
        )
        self.batch_seconds = Histogram(
            "streamer_batch_seconds",
            "Whole micro-batch time: decode, step, produce, acknowledge, commit",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=registry,
        )
        self.latency = BulkHistogram(
            "streamer_event_to_publish_seconds",
            "From a reading's event time to its prediction's acknowledgement by the broker",
            LATENCY_BUCKETS,
            registry,
        )
        self.event_time_skew = Counter(
            "streamer_event_time_skew",
            f"Readings whose event time was more than {event_time_future_s:g}s in the future or more than"
            f" {event_time_past_s:g}s in the past when published (not in streamer_event_to_publish_seconds)",
            ["direction"],
            registry=registry,
        )
        self._skew_future = self.event_time_skew.labels(direction="future")
        self._skew_past = self.event_time_skew.labels(direction="past")
        self.broker_reachable = Gauge(
            "streamer_broker_reachable", "1 while the brokers answered the last probe (start-up's clients, then the"
            " loop's end-offsets requests), else 0",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "streamer_consumer_lag", "Records behind the partition's end", ["topic", "partition"], registry=registry
        )
        self._lag_series: set[tuple[str, str]] = set()  # (topic, partition) series consumer_lag has
        self.active_devices = Gauge("streamer_active_devices", "Devices in the state table", registry=registry)
        self.table_capacity = Gauge("streamer_table_capacity", "Rows of the state table", registry=registry)
        self.model_info = Gauge("streamer_model_info", "The model being served", ["version"], registry=registry)
        self.recoveries = Counter(
            "streamer_partition_recoveries",
            "Partitions taken on, by how their state was recovered (checkpoint, fresh, no_checkpoint)",
            ["outcome"],
            registry=registry,
        )
        for outcome in RECOVERY_OUTCOMES:
            self.recoveries.labels(outcome=outcome)
        self.replayed = Counter(
            "streamer_replayed_messages", "Readings replayed with output suppressed (a batch message counts its rows)", registry=registry
        )
        self.checkpoints = Counter("streamer_checkpoints", "Partition checkpoints written", registry=registry)
        self.checkpoint_failures = Counter(
            "streamer_checkpoint_failures", "Partition checkpoints that could not be written", registry=registry
        )
        self.checkpoints_refused = Counter(
            "streamer_checkpoints_refused", "Checkpoint files refused on load (corrupt, truncated, other model)",
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "streamer_checkpoint_seconds", "Time to write one partition checkpoint", buckets=CHECKPOINT_BUCKETS,
            registry=registry,
        )
        self.model_reloads = Counter(
            "streamer_model_reloads", "Model file changes seen, by outcome (loaded; reset: a new shape, table emptied; failed)", ["outcome"],
            registry=registry,
        )
        for outcome in MODEL_RELOAD_OUTCOMES:
            self.model_reloads.labels(outcome=outcome)
        self.group_rejoins = Counter(
            "streamer_group_rejoins_forced", "Rejoins forced on a consumer found stuck outside its group",
            registry=registry,
        )
        self.transactions_aborted = Counter(
            "streamer_transactions_aborted", "Batches whose transaction was aborted (exactly-once mode)",
            registry=registry,
        )
        self.last_batch_time = Gauge(
            "streamer_last_batch_timestamp_seconds", "When the loop last completed a poll", registry=registry
        )

    def watch_checkpoint_lag(self, lag: Callable[[], Mapping[tuple[str, int], float]]) -> None:
        """Export ``lag()`` ({(topic, partition): seconds}) at scrape time as
        streamer_checkpoint_lag_seconds; partitions come and go with the assignment."""
        self.registry.register(_CheckpointLag(lag))

    def watch_table(self, active: Callable[[], int], capacity: int, model_version: str) -> None:
        self.active_devices.set_function(active)
        self.table_capacity.set(capacity)
        self.model_info.labels(version=model_version).set(1)

    def on_batch(
        self,
        readings: int,
        predictions: int,
        anomalies: int,
        new_devices: int,
        evicted_ttl: int,
        evicted_capacity: int,
        step_seconds: float,
        batch_seconds: float,
        latencies: np.ndarray,
        reset_not_finite: int = 0,
        messages: int = 0,
    ) -> None:
        self.batches.inc()
        self.readings.inc(readings)
        self.input_messages.inc(messages)
        self.predictions.inc(predictions)
        self.anomalies.inc(anomalies)
        self.new_devices.inc(new_devices)
        if evicted_ttl:
            self._evicted_ttl.inc(evicted_ttl)
        if evicted_capacity:
            self._evicted_capacity.inc(evicted_capacity)
        if reset_not_finite:
            self._reset_not_finite.inc(reset_not_finite)
        self.batch_size.observe(readings)
        self.step_seconds.observe(step_seconds)
        self.batch_seconds.observe(batch_seconds)
        kept, future, past = split_skewed(latencies, self.event_time_future_s, self.event_time_past_s)
        if future:
            self._skew_future.inc(future)
        if past:
            self._skew_past.inc(past)
        self.latency.observe_many(kept)

    def on_dead_letters(self, by_reason: Mapping[str, int]) -> None:
        for reason, count in by_reason.items():
            self.dead_letters.labels(reason=reason).inc(count)

    def on_lag(self, lag: Mapping[tuple[str, int], int]) -> None:
        """``lag`` covers the partitions owned now: the series of any other partition (revoked,
        lost) is removed, not left at its last value."""
        series = {(topic, str(partition)) for topic, partition in lag}
        for gone in self._lag_series - series:
            self.consumer_lag.remove(*gone)
        self._lag_series = series
        for (topic, partition), value in lag.items():
            self.consumer_lag.labels(topic=topic, partition=str(partition)).set(value)

    def on_recovery(self, outcome: str) -> None:
        self.recoveries.labels(outcome=outcome).inc()

    def on_replayed(self, readings: int) -> None:
        """Readings applied again after a recovery, output suppressed (a batch message counts its rows)."""
        self.replayed.inc(readings)

    def on_checkpoint(self, seconds: float) -> None:
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)

    def on_checkpoint_failed(self) -> None:
        self.checkpoint_failures.inc()

    def on_checkpoints_refused(self, count: int) -> None:
        self.checkpoints_refused.inc(count)

    def on_model_reload(self, outcome: str, version: str | None = None) -> None:
        self.model_reloads.labels(outcome=outcome).inc()
        if version is not None:
            self.model_info.clear()
            self.model_info.labels(version=version).set(1)

    def on_transaction_aborted(self) -> None:
        self.transactions_aborted.inc()

    def on_poll(self) -> None:
        self.last_batch_time.set(time.time())


class Health:
    """Liveness (/healthz): the loop has polled within ``stale_after_s`` and has not failed.
    Readiness (/readyz): live, and the brokers answered the loop's last probe."""

    def __init__(self, stale_after_s: float, start_within_s: float | None = None,
                 stopping: threading.Event | None = None) -> None:
        """``start_within_s``: how long start-up may take before the loop's first beat (the
        waits for the brokers it is allowed), where liveness gives it ``stale_after_s`` after.
        ``stopping``: the run's stop event; once set, the service is not ready (it finishes the
        batch in hand, checkpoints and closes), and stays live while it does. A run that ends on
        its own (run.duration_s) says so with ``finishing``."""
        self.stale_after_s = stale_after_s
        self.start_within_s = start_within_s
        self._stopping = stopping
        self._finishing = False
        self._last = time.monotonic()
        # Until the loop's first beat: the clients are still being opened (a broker that does not
        # answer start-up is tried again for kafka.startup_wait_s), nothing is consumed yet.
        self._starting = True
        self._failed: str | None = None
        self._broker_away: str | None = None  # why the last probe failed; None while it answers
        self._broker_away_since: float | None = None
        self._outside_group: str | None = None  # the consumer is stuck outside its group: why

    def beat(self) -> None:
        self._last = time.monotonic()
        self._starting = False

    def finishing(self) -> None:
        """The run loop has ended without a stop (run.duration_s passed): not ready from now on,
        as after a stop, while it settles, checkpoints and closes."""
        self._finishing = True

    def fail(self, reason: str) -> None:
        self._failed = reason

    def broker_answered(self) -> None:
        self._broker_away = None
        self._broker_away_since = None

    def broker_away(self, reason: str) -> None:
        if self._broker_away_since is None:
            self._broker_away_since = time.monotonic()
        self._broker_away = reason

    def outside_group(self, reason: str | None) -> None:
        """The consumer is stuck outside its group (``reason``), or back in it (None): liveness
        fails meanwhile, since a restart would also get it back in."""
        self._outside_group = reason

    def status(self) -> tuple[bool, str]:
        """Liveness: (ok, text). A broker that is away does not fail it (restarting us would not
        bring the broker back); the text says so."""
        stale = self._stale()
        if stale is not None:
            return False, stale
        if self._outside_group is not None:
            return False, f"consumer outside its group: {self._outside_group}"
        ready, reason = self.readiness()
        return True, "ok" if ready else f"ok (not ready: {reason})"

    def _stale(self) -> str | None:
        """Why the service is not live (failed, or silent too long), or None. Start-up waits for
        the brokers as long as it is allowed to (start_within_s) before it fails liveness."""
        if self._failed:
            return self._failed
        age = time.monotonic() - self._last
        if self._starting and self.start_within_s is not None:
            if age > self.start_within_s + self.stale_after_s:
                return f"start-up has not finished in {age:.1f}s"
            return None
        if age > self.stale_after_s:
            return f"run loop has not polled for {age:.1f}s"
        return None

    def readiness(self) -> tuple[bool, str]:
        """Readiness: (ok, text); not ready while the loop is not live or the broker is away."""
        stale = self._stale()
        if stale is not None:
            return False, stale
        if self._outside_group is not None:
            return False, f"consumer outside its group: {self._outside_group}"
        if self._finishing or (self._stopping is not None and self._stopping.is_set()):
            # It had read ready until the process was gone: a rollout took it for serving.
            return False, "stopping: the batch in hand is finished, checkpointed and committed"
        if self._starting:
            return False, "starting: the Kafka clients are being opened"
        if self._broker_away is not None:
            away = time.monotonic() - (self._broker_away_since or time.monotonic())
            return False, f"broker unreachable for {away:.0f}s: {self._broker_away}"
        return True, "ok"


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that stalled (HTTP_TIMEOUT_S) or went away: one debug line. socketserver's
        own printed a traceback to stderr for each, past the log's format (a load balancer's
        half-open check, a port scan)."""
        error = sys.exc_info()[1]
        if isinstance(error, (TimeoutError, ConnectionError)):
            log.debug("metrics client %s: %r", client_address, error)
            return
        log.warning("metrics server: a request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT_S  # a client that stalls mid-request lets go of its thread

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class MetricsServer:
    """/metrics (Prometheus text format), /healthz (liveness) and /readyz (readiness) over HTTP,
    on a daemon thread; 503 with the reason as text when not healthy or not ready."""

    def __init__(self, registry: CollectorRegistry, health: Health, host: str, port: int) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            # Only these three paths, read with GET or HEAD: a mistyped probe path (/healthz/) had
            # been answered 200 with the metrics, so the probe could never fail.
            path, method = environ.get("PATH_INFO"), environ.get("REQUEST_METHOD")
            if path not in ("/metrics", "/healthz", "/readyz"):
                return _text(start_response, "404 Not Found", "not found: /metrics, /healthz or /readyz", method)
            if method not in ("GET", "HEAD"):
                return _text(start_response, "405 Method Not Allowed", "GET or HEAD", method, [("Allow", "GET, HEAD")])
            if path == "/metrics":
                if method == "GET":
                    return metrics_app(environ, start_response)
                answer: list = []  # HEAD: GET's status and headers, its length, no body
                body = metrics_app({**environ, "REQUEST_METHOD": "GET"}, lambda *args: answer.extend(args))
                status, headers = answer[0], [(k, v) for k, v in answer[1] if k.lower() != "content-length"]
                start_response(status, [*headers, ("Content-Length", str(sum(map(len, body))))])
                return []
            ok, text = health.status() if path == "/healthz" else health.readiness()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", text, method)

        # An IPv6 address (::1, ::) on an IPv6 socket, as the start-up check binds it; any other
        # host ("", localhost, a name) on IPv4 as before (the stdlib server is IPv4 only).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_ThreadingWSGIServer,), {"address_family": family})
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _text(start_response, status: str, text: str, method: str | None, headers: list | None = None) -> list[bytes]:
    body = text.encode() + b"\n"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *(headers or [])])
    return [] if method == "HEAD" else [body]


class _CheckpointLag(Collector):
    def __init__(self, lag: Callable[[], Mapping[tuple[str, int], float]]) -> None:
        self.lag = lag

    def collect(self):
        family = GaugeMetricFamily(
            "streamer_checkpoint_lag_seconds",
            "Seconds the partition's applied readings have gone without a checkpoint (0 when its newest"
            " checkpoint includes them all)",
            labels=["topic", "partition"],
        )
        for (topic, partition), seconds in self.lag().items():
            family.add_metric([topic, str(partition)], seconds)
        yield family
