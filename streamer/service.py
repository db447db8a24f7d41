"""Wires a run together from settings: model, engine, Kafka clients, metrics server, loop."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry

from streamer.anomaly import AnomalyParams
from streamer.checkpoint import CheckpointStore, DirectoryCheckpointStore
from streamer.engine import Engine
from streamer.kafka import Producer, ensure_topics, open_changelog, open_consumer, open_producer
from streamer.errors import StartupInterrupted, StreamerError
from streamer.kafka.abstract import KafkaClientError
from streamer.kafka.clients import (
    KafkaBootstrapError,
    KafkaLoginError,
    MissingTopics,
    describe_topics,
    interruptible,
    kafka_logs_folded,
    security_config,
    silence_client_logs,
)
from streamer.kafka.topics import written_topics
from streamer.kernels import STATE_DTYPES
from streamer.metrics import Health, Metrics, MetricsServer
from streamer.model import load_model_file
from streamer.pipeline import Pipeline, RunSummary
from streamer.settings import Settings, describe_setting

log = logging.getLogger(__name__)

HEALTH_STALE_AFTER_S = 60.0
STARTUP_RETRY_S = 1.0  # between tries to reach the brokers at start-up
PRODUCER_BATCH_BYTES = 1_000_000  # librdkafka's batch.size (kafka-python's here: 256 KiB, below it)
MIN_ATTEMPT_S = 3.0  # a try waits for a broker at least this long (kafka.startup_wait_s = 0: one try); TLS and SASL handshakes fit
MAX_ATTEMPT_S = 30.0  # ... and at most this long, so a long wait still reports each failed try
CLOSE_TIMEOUT_S = 2.0  # closing the clients at the end, the broker possibly away
T = TypeVar("T")


def anomaly_params(settings: Settings) -> AnomalyParams:
    return AnomalyParams(**settings.anomaly.model_dump())


def build_engine(settings: Settings) -> Engine:
    if settings.model.cpu_threads:
        import torch

        torch.set_num_threads(settings.model.cpu_threads)
    bundle = load_model_file(settings.model.path)
    engine = Engine.build(
        bundle,
        capacity=settings.state.capacity,
        device=settings.model.device,
        ttl_seconds=settings.state.ttl_seconds,
        anomaly=anomaly_params(settings),
        state_dtype=STATE_DTYPES[settings.state.dtype],
        cuda_graphs=settings.model.cuda_graphs,
        compile=settings.model.compile,
    )
    log.info(
        "model %s (version %s, %s) on %s, state table of %d devices",
        bundle.path,
        bundle.version,
        bundle.config.to_dict(),
        engine.device,
        engine.table.capacity,
    )
    return engine


def build_store(settings: Settings, bootstrap_timeout_ms: int | None = None) -> CheckpointStore:
    """The checkpoint store checkpoint.store names: a directory, or a Kafka changelog topic
    (which must exist: run_service creates it when missing)."""
    checkpoint, kafka = settings.checkpoint, settings.kafka
    if checkpoint.store == "kafka":
        from streamer.checkpoint_kafka import KafkaCheckpointStore

        changelog = open_changelog(kafka, checkpoint.topic, checkpoint.chunk_bytes, bootstrap_timeout_ms)
        try:
            store = KafkaCheckpointStore(changelog, kafka.group_id, checkpoint.keep, checkpoint.chunk_bytes)
        except BaseException:
            changelog.close()
            raise
        log.info("checkpoints in Kafka topic %s (%d partitions, chunks of at most %d bytes)",
                 checkpoint.topic, store.partitions, checkpoint.chunk_bytes)
        return store
    log.info("checkpoints in %s", checkpoint.directory.resolve())
    return DirectoryCheckpointStore(checkpoint.directory, kafka.group_id, checkpoint.keep)


def _topics_ready(settings: Settings, deadline: float, stop: threading.Event | None,
                  answered: Callable[[], object] = lambda: None) -> bool:
    """Create the topics streamer writes that are missing, and wait until the input topic exists
    (`streamer topics create` makes it, or its producers' first sends where the broker creates
    topics on demand), until ``deadline``: then a StreamerError naming kafka.input_topic.
    Subscribed to a topic that does not exist, the consumer would sit idle, its every request for
    offsets unanswered. ``answered`` is called whenever the brokers answer, the topic there or not.
    Returns whether it waited for the input topic."""
    kafka = settings.kafka
    said = False
    while True:
        try:
            _until_reachable(
                lambda timeout_ms: ensure_topics(
                    kafka.bootstrap_servers,
                    written_topics(settings),
                    kafka.client_id,
                    security=security_config(kafka),
                    bootstrap_timeout_ms=timeout_ms,
                    must_exist=(kafka.input_topic,),
                ),
                deadline,
                stop,
            )
            answered()
            if said:
                log.info("input topic %s exists: starting", kafka.input_topic)
            return said
        except MissingTopics:
            answered()
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamerError(
                    f"{describe_setting('kafka', 'input_topic')} = {kafka.input_topic!r}: no such topic at"
                    f" {kafka.bootstrap_servers} (waited {kafka.startup_wait_s:.0f}s; `streamer topics create`"
                    " creates it)") from None
            if not said:
                log.warning("input topic %s does not exist at %s; waiting up to %.0fs for it to be created",
                            kafka.input_topic, kafka.bootstrap_servers, left)
                said = True
            if stop is not None and stop.wait(min(STARTUP_RETRY_S, left)):
                raise StartupInterrupted() from None


def _topic_housekeeping(settings: Settings, stop: threading.Event | None = None) -> int | None:
    """What the brokers say of the topics the loop reads and writes, asked once at start (one admin
    client): the dead-letter topic's max.message.bytes, returned, or None (then dead letters are
    bounded by kafka.max_message_bytes alone); a dead-letter topic whose limit is below the input
    topic's, which cannot take a dead letter of every input message whole, and a checkpoint
    changelog that is not compacted are said once. ``stop`` set meanwhile raises StartupInterrupted
    (brokers that vanish right then keep the describe waiting up to 10 s)."""
    kafka = settings.kafka
    changelog = settings.checkpoint.topic if settings.checkpoint.enabled and settings.checkpoint.store == "kafka" else None
    try:
        states = interruptible(lambda: describe_topics(
            kafka.bootstrap_servers, [kafka.input_topic, kafka.dead_letter_topic, *([changelog] if changelog else [])],
            ["max.message.bytes", "cleanup.policy", "retention.ms"], kafka.client_id, security=security_config(kafka),
            bootstrap_timeout_ms=int(min(kafka.startup_wait_s, 10.0) * 1000)), stop)
    except StartupInterrupted as exc:
        if exc.abandoned:  # as _until_reachable: the describe's client goes on in its thread
            silence_client_logs()
        raise
    except Exception as exc:  # housekeeping: the loop runs without it
        log.warning("could not describe the topics (%s): dead letters are bounded by kafka.max_message_bytes = %d%s",
                    exc, kafka.max_message_bytes, "; the changelog's cleanup.policy is not checked" if changelog else "")
        return None
    if changelog is not None and changelog in states:
        _check_changelog_compacted(changelog, states[changelog].configs)
    limits = {name: int(state.configs["max.message.bytes"]) for name, state in states.items()
              if state.configs.get("max.message.bytes", "").isdigit()}
    limit = limits.get(kafka.dead_letter_topic)
    given = limits.get(kafka.input_topic)
    if limit is not None and given is not None and limit < min(given, kafka.max_message_bytes) + 2048:
        log.warning("dead-letter topic %s takes records of up to %d bytes, input topic %s up to %d: a refused message"
                    " near the input's limit is dead-lettered cut to fit (header streamer.truncated); raise the"
                    " dead-letter topic's max.message.bytes to keep every message whole",
                    kafka.dead_letter_topic, limit, kafka.input_topic, given)
    if limit is not None and limit < PRODUCER_BATCH_BYTES:
        # The broker's limit is on a request's batch of records: dead letters the producer sends
        # together can exceed it even when each fits.
        log.warning("dead-letter topic %s takes batches of up to %d bytes, less than the producer's %d: several dead"
                    " letters sent together may be refused, which stops the loop", kafka.dead_letter_topic, limit,
                    PRODUCER_BATCH_BYTES)
    return limit


def _check_changelog_compacted(topic: str, configs: dict[str, str]) -> None:
    """Say when the checkpoint changelog (made elsewhere, or before streamer made it compacted) is
    not compacted: its checkpoints older than retention.ms are deleted, and a partition whose
    newest checkpoint is gone starts its devices from zero."""
    if "compact" not in configs.get("cleanup.policy", "compact").split(","):
        log.warning("checkpoint changelog %s has cleanup.policy=%s, not compact: checkpoints older than its retention.ms"
                    " (%s) are deleted, and a partition whose newest one is gone starts its devices from zero; set"
                    " cleanup.policy=compact on it", topic, configs.get("cleanup.policy"),
                    configs.get("retention.ms", "?"))


def _metrics_server(registry: CollectorRegistry, health: Health, settings: Settings) -> MetricsServer:
    """The metrics server, started; a StreamerError naming the setting when its address cannot be
    bound (the CLI checked it at start, but something may have taken the port since)."""
    host, port = settings.metrics.host, settings.metrics.port
    try:
        return MetricsServer(registry, health, host, port).start()
    except OSError as exc:
        raise StreamerError(
            f"{describe_setting('metrics', 'port')} = {port}, {describe_setting('metrics', 'host')} = {host!r}:"
            f" cannot serve metrics there ({exc.strerror or exc})") from None


def _until_reachable(
    connect: Callable[[int], T], deadline: float, stop: threading.Event | None = None, what: str = "Kafka",
    waiting: Callable[[], None] | None = None,
) -> T:
    """``connect(bootstrap_timeout_ms)``, tried again while no broker answers (a broker restarting
    as we start), until ``deadline`` (monotonic; math.inf: until one answers): each try waits at
    most what is left (at least MIN_ATTEMPT_S), so giving up comes within MIN_ATTEMPT_S of the
    deadline. A refused login is final at once. ``stop`` set meanwhile raises StartupInterrupted
    within clients.STOP_CHECK_S. ``waiting()`` is called after each failed try. kafka-python's own log
    lines are folded into one line of ours per failed try."""
    attempt = 0
    try:
        with kafka_logs_folded() as complaint:
            while True:
                attempt += 1
                timeout_s = min(MAX_ATTEMPT_S, max(MIN_ATTEMPT_S, deadline - time.monotonic()))
                try:
                    return interruptible(lambda: connect(int(timeout_s * 1000)), stop)
                except KafkaLoginError:
                    raise
                except (KafkaBootstrapError, KafkaClientError) as exc:
                    # A retriable KafkaClientError: the brokers answered the bootstrap, then went
                    # away before what came next answered (the checkpoint store's first calls).
                    if isinstance(exc, KafkaClientError) and not exc.retriable:
                        raise
                    left = deadline - time.monotonic()
                    detail = f" ({complaint.first})" if complaint.first else ""
                    complaint.first = None
                    if isinstance(exc, KafkaBootstrapError):
                        failed = f"{what} at {exc.bootstrap_servers}: no broker answered in {timeout_s:.0f}s{detail}"
                    else:
                        failed = f"{what}: {exc}"
                    if left <= 0:
                        log.error("%s; giving up after %d tries", failed, attempt)
                        raise
                    log.warning("%s; trying again %s", failed,
                                "until one does" if math.isinf(left) else f"for {left:.0f}s more")
                    if waiting is not None:
                        waiting()
                if stop is not None and stop.wait(min(STARTUP_RETRY_S, max(0.0, deadline - time.monotonic()))):
                    raise StartupInterrupted()
    except StartupInterrupted as exc:
        if exc.abandoned:
            # The abandoned client goes on bootstrapping in its thread: its library's ERROR
            # lines had reached stderr once the folding above was left, after a clean stop.
            silence_client_logs()
        raise


def run_service(
    settings: Settings, stop: threading.Event, registry: CollectorRegistry | None = None
) -> RunSummary:
    """Run until ``stop`` is set (or run.duration_s passes); closes everything it opened.

    ``stop`` set while the model loads or compiles, or while start-up waits for the brokers, ends
    the run at once with an empty summary.
    """
    engine = None if stop.is_set() else build_engine(settings)  # a signal first: not worth a compile's seconds
    if engine is None or stop.is_set():  # a signal before or while the model loaded or compiled
        log.info("stopped during start-up, before Kafka was contacted")
        return RunSummary()
    kafka = settings.kafka
    # The topics streamer writes (output, dead letters, the checkpoint changelog) as settings
    # section ``topics`` says, if they are missing, so the first dead letter does not wait for
    # auto-creation and the changelog is compacted.
    reachable_by = time.monotonic() + kafka.startup_wait_s
    opened: list[Callable[[], object]] = []  # closers, last opened first
    server = None
    pipeline: Pipeline | None = None
    try:
        registry = registry or CollectorRegistry()
        metrics_settings = settings.metrics
        metrics = Metrics(
            registry,
            event_time_future_s=metrics_settings.event_time_future_s,
            event_time_past_s=metrics_settings.event_time_past_s,
        )
        # Served from the start: /readyz says "starting" (503) while the brokers are waited for,
        # and /healthz stays live for as long as start-up may wait for them (the topics, the store
        # and consumer, the producer: kafka.startup_wait_s each), so that a probe does not restart
        # a pod that waits as it was told to.
        health = Health(HEALTH_STALE_AFTER_S, start_within_s=3 * kafka.startup_wait_s, stopping=stop)
        if settings.metrics.enabled:
            server = _metrics_server(registry, health, settings)
            log.info("metrics at http://%s:%d/metrics, liveness at /healthz, readiness at /readyz", server.host, server.port)
        # The brokers answering, the topic there or not, are reachable: a forgotten `streamer
        # topics create` had read as unreachable brokers (StreamerBrokerUnreachable) for the wait.
        if _topics_ready(settings, reachable_by, stop, answered=lambda: metrics.broker_reachable.set(1)):
            reachable_by = time.monotonic() + kafka.startup_wait_s  # the brokers answered: the clients' own wait
        store = None
        if settings.checkpoint.enabled:
            store = _until_reachable(lambda timeout_ms: build_store(settings, timeout_ms), reachable_by, stop)
            opened.append(store.close)
        consumer = _until_reachable(
            lambda timeout_ms: open_consumer(kafka, settings.batch.max_records, timeout_ms), reachable_by, stop
        )
        log.info("Kafka client: %s", kafka.client)
        opened.append(lambda: consumer.close(CLOSE_TIMEOUT_S))
        instance_id = kafka.instance_id or uuid.uuid4().hex[:12]  # one transactional id per process

        def connect(timeout_ms: int) -> Producer:
            return open_producer(kafka, instance_id, timeout_ms)

        # Before the producer: a stop while the topics are described leaves no producer unclosed.
        dead_letter_limit = _topic_housekeeping(settings, stop)
        first = _until_reachable(connect, time.monotonic() + kafka.startup_wait_s, stop)
        # Every client opened has had its answer from the brokers: reachable, as the loop's own
        # probes go on to tell (the gauge had read 0, unreachable, until the loop's first probe).
        metrics.broker_reachable.set(1)

        def successor() -> Producer:
            """A transactional producer in place of one whose transaction was aborted, in the loop:
            an outage that aborted it may last longer than the start-up wait, and at-least-once
            rides out any outage. Live meanwhile (liveness beats), not ready (the broker is away)."""
            def waiting() -> None:
                assert pipeline is not None  # the successor of a producer the pipeline had
                pipeline.waiting_for_broker("no broker answers the new transactional producer")

            return _until_reachable(connect, math.inf, stop, waiting=waiting)

        pipeline = Pipeline(settings, engine, consumer, first, metrics, health, store, successor,
                            dead_letter_limit)
        opened.append(lambda: pipeline.producer.close(CLOSE_TIMEOUT_S))
        summary = pipeline.run(stop)
        log.info(
            "stopped: %d readings, %d predictions, %d dead letters, %d anomalies in %.1fs",
            summary.readings,
            summary.predictions,
            summary.dead_letters,
            summary.anomalies,
            summary.seconds,
        )
        return summary
    except StartupInterrupted:
        log.info("stopped while waiting for Kafka at %s", kafka.bootstrap_servers)
        return pipeline.summary if pipeline is not None else RunSummary()
    finally:
        for close in reversed(opened):
            try:
                close()
            except Exception:  # the broker may be away: what was not flushed is re-delivered
                log.warning("closing a Kafka client failed", exc_info=True)
        if server is not None:
            server.stop()
