"""Wires a run together from settings: model, engine, Kafka clients, metrics server, loop."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from streamer.anomaly import AnomalyParams
from streamer.checkpoint import DirectoryCheckpointStore
from streamer.engine import Engine
from streamer.kafka import ensure_topics, make_consumer, make_producer
from streamer.kafka.clients import KafkaBootstrapError, KafkaLoginError, security_config
from streamer.metrics import Health, Metrics, MetricsServer
from streamer.model import load_model_file
from streamer.pipeline import Pipeline, RunSummary
from streamer.settings import Settings

log = logging.getLogger(__name__)

HEALTH_STALE_AFTER_S = 60.0
STARTUP_RETRY_S = 2.0
T = TypeVar("T")


def anomaly_params(settings: Settings) -> AnomalyParams:
    return AnomalyParams(**settings.anomaly.model_dump())


def build_engine(settings: Settings) -> Engine:
    bundle = load_model_file(settings.model.path)
    engine = Engine.build(
        bundle,
        capacity=settings.state.capacity,
        device=settings.model.device,
        ttl_seconds=settings.state.ttl_seconds,
        anomaly=anomaly_params(settings),
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


def _until_reachable(connect: Callable[[], T], deadline: float) -> T:
    """``connect()``, tried again while no broker answers (a broker restarting as we start),
    until ``deadline`` (monotonic). A refused login is final at once."""
    while True:
        try:
            return connect()
        except KafkaLoginError:
            raise
        except KafkaBootstrapError as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s; trying again", exc)
            time.sleep(STARTUP_RETRY_S)


def run_service(
    settings: Settings, stop: threading.Event, registry: CollectorRegistry | None = None
) -> RunSummary:
    """Run until ``stop`` is set (or run.duration_s passes); closes everything it opened."""
    engine = build_engine(settings)
    kafka = settings.kafka
    # Output and dead-letter topics with the input's default partitioning if they are missing,
    # so the first dead letter does not wait for auto-creation.
    reachable_by = time.monotonic() + kafka.startup_wait_s
    _until_reachable(
        lambda: ensure_topics(
            kafka.bootstrap_servers,
            {kafka.output_topic: 1, kafka.dead_letter_topic: 1},
            kafka.client_id,
            security=security_config(kafka),
        ),
        reachable_by,
    )
    registry = registry or CollectorRegistry()
    metrics = Metrics(registry)
    health = Health(HEALTH_STALE_AFTER_S)
    server = None
    if settings.metrics.enabled:
        server = MetricsServer(registry, health, settings.metrics.host, settings.metrics.port).start()
        log.info("metrics at http://%s:%d/metrics, health at /healthz", server.host, server.port)
    store = None
    if settings.checkpoint.enabled:
        store = DirectoryCheckpointStore(settings.checkpoint.directory, kafka.group_id, settings.checkpoint.keep)
        log.info("checkpoints in %s", settings.checkpoint.directory.resolve())
    consumer = _until_reachable(lambda: make_consumer(kafka, settings.batch.max_records), reachable_by)
    instance_id = kafka.instance_id or uuid.uuid4().hex[:12]  # one transactional id per process

    def new_producer() -> KafkaProducer:
        return _until_reachable(lambda: make_producer(kafka, instance_id), time.monotonic() + kafka.startup_wait_s)

    pipeline = Pipeline(settings, engine, consumer, new_producer(), metrics, health, store, new_producer)
    try:
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
    finally:
        pipeline.producer.close()
        consumer.close()
        if server is not None:
            server.stop()
