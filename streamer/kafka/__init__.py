"""The product's Kafka clients behind one seam (abstract.py): kafka-python or confluent-kafka,
chosen by kafka.client; topic admin."""

from __future__ import annotations

from streamer.kafka.abstract import Changelog, Consumer, Message, Producer, TopicPartition
from streamer.kafka.clients import ensure_topics
from streamer.settings import KafkaSettings

__all__ = ["Changelog", "Consumer", "Message", "Producer", "TopicPartition", "ensure_topics", "open_changelog", "open_consumer", "open_producer"]


def open_consumer(settings: KafkaSettings, max_poll_records: int, bootstrap_timeout_ms: int | None = None) -> Consumer:
    """The group consumer of kafka.client, checked against the brokers (KafkaBootstrapError)."""
    if settings.client == "confluent-kafka":
        from streamer.kafka import confluent

        return confluent.make_consumer(settings, max_poll_records, bootstrap_timeout_ms)
    from streamer.kafka import clients, kafka_python

    return kafka_python.KafkaPythonConsumer(clients.make_consumer(settings, max_poll_records, bootstrap_timeout_ms))


def open_producer(settings: KafkaSettings, instance_id: str | None = None, bootstrap_timeout_ms: int | None = None) -> Producer:
    """The producer of kafka.client: idempotent, transactional in exactly-once mode."""
    if settings.client == "confluent-kafka":
        from streamer.kafka import confluent

        return confluent.make_producer(settings, instance_id, bootstrap_timeout_ms)
    from streamer.kafka import clients, kafka_python

    return kafka_python.KafkaPythonProducer(clients.make_producer(settings, instance_id, bootstrap_timeout_ms))


def open_changelog(
    settings: KafkaSettings, topic: str, max_value_bytes: int, bootstrap_timeout_ms: int | None = None
) -> Changelog:
    """A client of kafka.client for a changelog topic (abstract.Changelog) whose values are at most
    ``max_value_bytes``, checked against the brokers (KafkaBootstrapError)."""
    if settings.client == "confluent-kafka":
        from streamer.kafka import confluent

        return confluent.make_changelog(settings, topic, max_value_bytes, bootstrap_timeout_ms)
    from streamer.kafka import clients, kafka_python

    consumer, producer = clients.make_changelog_clients(settings, max_value_bytes, bootstrap_timeout_ms)
    return kafka_python.KafkaPythonChangelog(topic, consumer, producer)
