"""The loop's broker probe, no broker (the in-process double): readiness follows it, lag comes from
the last known ends, and an outage is a few lines of ours however much the client library logs."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from streamer.engine import Engine
from streamer.kafka.abstract import TopicPartition
from streamer.kafka.memory import MemoryBroker, MemoryConsumer, MemoryProducer
from streamer.metrics import Health, Metrics
from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file
from streamer.pipeline import Pipeline
from streamer.settings import load_settings

TP = TopicPartition("in", 0)


def build(tmp_path) -> tuple[Pipeline, MemoryBroker, Health, CollectorRegistry]:
    config = ModelConfig(2, 8, 1, 2)
    save_model_file(tmp_path / "m.pt", init_random_model(config, seed=1), config, "v1")
    settings = load_settings({"model": {"path": tmp_path / "m.pt", "device": "cpu"}, "checkpoint": {"enabled": False},
                              "kafka": {"input_topic": "in"}})
    engine = Engine.build(load_model_file(tmp_path / "m.pt"), capacity=10, device="cpu")
    broker = MemoryBroker()
    broker.create_topic("in", 1)
    for i in range(500):
        broker.append("in", b"d", b"{}")
    consumer = MemoryConsumer(broker, "g")
    consumer.assigned.add(TP)
    consumer.seek(TP, 120)
    registry = CollectorRegistry()
    health = Health(60.0)
    health.beat()  # past start-up: the loop's first poll
    pipeline = Pipeline(settings, engine, consumer, MemoryProducer(broker), metrics=Metrics(registry), health=health)
    return pipeline, broker, health, registry


def test_broker_away_makes_not_ready_and_lag_keeps_the_last_known_end(tmp_path):
    pipeline, broker, health, registry = build(tmp_path)
    lag = lambda: registry.get_sample_value("streamer_consumer_lag", {"topic": "in", "partition": "0"})  # noqa: E731
    pipeline._maybe_lag()
    assert health.readiness() == (True, "ok") and lag() == 380
    assert registry.get_sample_value("streamer_broker_reachable") == 1

    broker.away = True
    pipeline._last_lag = 0.0
    pipeline._maybe_lag()
    ready, reason = health.readiness()
    assert not ready and "broker unreachable" in reason and "BrokerTimeout" in reason
    assert lag() == 380  # from the last known end, not 0 or dropped
    assert registry.get_sample_value("streamer_broker_reachable") == 0
    assert health.status()[0]  # still live

    broker.away = False
    for _ in range(380):
        broker.append("in", b"d", b"{}")
    pipeline._last_lag = 0.0
    pipeline._maybe_lag()
    assert health.readiness() == (True, "ok") and lag() == 760


def test_an_outage_is_one_line_when_it_starts_and_one_when_it_ends(tmp_path, caplog):
    """However many lines kafka-python (``kafka.*``) or librdkafka log while the brokers are away."""
    caplog.set_level(logging.INFO)
    pipeline, broker, health, registry = build(tmp_path)
    with pipeline.outage.installed():
        logging.getLogger("kafka.conn").warning("an unrelated complaint before the outage")
        for episode in range(2):
            broker.away = True
            for i in range(40):
                logging.getLogger("kafka.net.connection").error("Connection failed: KafkaConnectionError: 111 ECONNREFUSED")
                logging.getLogger("librdkafka").warning("FAIL [rdkafka#consumer-1] Connect to ipv4#127.0.0.1:9 failed: Connection refused")
                if i % 10 == 0:
                    pipeline._last_lag = 0.0
                    pipeline._maybe_lag()  # the probe fails too
            broker.away = False
            pipeline._last_lag = 0.0
            pipeline._maybe_lag()
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("kafka.conn", "WARNING", "an unrelated complaint before the outage")  # passed on
    ours = lines[1:]
    assert [(name, level) for name, level, _ in ours] == [
        ("streamer.kafka.outage", "WARNING"), ("streamer.kafka.outage", "INFO")] * 2, ours
    assert "unreachable" in ours[0][2] and "ECONNREFUSED" in ours[0][2]
    assert "answer again" in ours[1][2] and "80 client library messages held back" in ours[1][2]
    assert pipeline.outage.episodes == 2
    # After the run the client libraries' records propagate as before.
    logging.getLogger("kafka.conn").warning("after the run")
    assert caplog.records[-1].getMessage() == "after the run"
