"""The loop's broker probe, no broker: readiness follows it, lag comes from the last known ends."""

from __future__ import annotations

from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from streamer.engine import Engine
from streamer.metrics import Health, Metrics
from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file
from streamer.pipeline import Pipeline
from streamer.settings import load_settings

TP = TopicPartition("in", 0)


class AwayConsumer:
    """Just what the probe and lag() read; ``away`` makes end_offsets time out as kafka-python does."""

    def __init__(self) -> None:
        self.away = False
        self.end = 500
        self.highwater_value: int | None = None  # no fetch has told it yet

    def assignment(self):
        return {TP}

    def end_offsets(self, partitions, timeout_ms=None):
        if self.away:
            raise KafkaTimeoutError("Failed to get offsets by timestamps in 1000 ms")
        return {tp: self.end for tp in partitions}

    def highwater(self, tp):
        return self.highwater_value

    def position(self, tp, timeout_ms=None):
        return 120


def build(tmp_path) -> tuple[Pipeline, AwayConsumer, Health, CollectorRegistry]:
    config = ModelConfig(2, 8, 1, 2)
    save_model_file(tmp_path / "m.pt", init_random_model(config, seed=1), config, "v1")
    settings = load_settings({"model": {"path": tmp_path / "m.pt", "device": "cpu"}, "checkpoint": {"enabled": False}})
    engine = Engine.build(load_model_file(tmp_path / "m.pt"), capacity=10, device="cpu")
    consumer = AwayConsumer()
    registry = CollectorRegistry()
    health = Health(60.0)
    pipeline = Pipeline(settings, engine, consumer, producer=None, metrics=Metrics(registry), health=health)  # type: ignore[arg-type]
    return pipeline, consumer, health, registry


def test_broker_away_makes_not_ready_and_lag_keeps_the_last_known_end(tmp_path):
    pipeline, consumer, health, registry = build(tmp_path)
    lag = lambda: registry.get_sample_value("streamer_consumer_lag", {"topic": "in", "partition": "0"})  # noqa: E731
    pipeline._maybe_lag()
    assert health.readiness() == (True, "ok") and lag() == 380
    assert registry.get_sample_value("streamer_broker_reachable") == 1

    consumer.away = True
    pipeline._last_lag = 0.0
    pipeline._maybe_lag()
    ready, reason = health.readiness()
    assert not ready and "broker unreachable" in reason and "KafkaTimeoutError" in reason
    assert lag() == 380  # from the last known end, not 0 or dropped
    assert registry.get_sample_value("streamer_broker_reachable") == 0
    assert health.status()[0]  # still live

    consumer.away, consumer.end = False, 900
    pipeline._last_lag = 0.0
    pipeline._maybe_lag()
    assert health.readiness() == (True, "ok") and lag() == 780
