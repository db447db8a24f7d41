"""The topics streamer uses, and what settings say each is created with (section ``topics``)."""

from __future__ import annotations

from streamer.kafka.clients import TopicSpec
from streamer.settings import Settings, TopicsSettings

COMPACT = {"cleanup.policy": "compact"}


def _retention(retention_ms: int | None) -> dict[str, str]:
    return {} if retention_ms is None else {"retention.ms": str(retention_ms)}


def topic_specs(settings: Settings) -> dict[str, TopicSpec]:
    """Input, output, dead letters and (with checkpoint.store = kafka) the checkpoint changelog,
    by name, in that order. The changelog is compacted, with no time retention; the dead-letter
    topic takes records of up to kafka.max_message_bytes."""
    topics: TopicsSettings = settings.topics
    kafka = settings.kafka
    data = TopicSpec(topics.partitions, topics.replication_factor, _retention(topics.retention_ms))
    specs = {
        kafka.input_topic: data,
        kafka.output_topic: data,
        # A dead letter is a whole input message and its streamer.* headers: the topic takes
        # what the producer may send (kafka.max_message_bytes), not the broker's 1 MiB default.
        kafka.dead_letter_topic: TopicSpec(
            topics.dead_letter_partitions, topics.replication_factor,
            {**_retention(topics.dead_letter_retention_ms), "max.message.bytes": str(kafka.max_message_bytes)},
        ),
    }
    if settings.checkpoint.store == "kafka":
        specs[settings.checkpoint.topic] = TopicSpec(topics.checkpoint_partitions, topics.replication_factor, dict(COMPACT))
    return specs


def written_topics(settings: Settings) -> dict[str, TopicSpec]:
    """The topics `streamer run` writes (all but the input), which it creates when missing."""
    specs = topic_specs(settings)
    specs.pop(settings.kafka.input_topic)
    return specs
