"""kafka-python clients configured the way the run loop relies on.

Consumer: manual commits only (offsets are committed after the batch's predictions are
acknowledged), raw bytes. Producer: acks=all, idempotent, small linger so a batch's sends
share requests.
"""

from __future__ import annotations

import logging

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamer.settings import KafkaSettings

log = logging.getLogger(__name__)


def make_consumer(settings: KafkaSettings, max_poll_records: int) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers.split(","),
        group_id=settings.group_id,
        client_id=settings.client_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        max_poll_records=max_poll_records,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(1000, settings.session_timeout_ms // 3),
        fetch_max_wait_ms=100,
    )


def make_producer(settings: KafkaSettings) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers.split(","),
        client_id=settings.client_id,
        acks="all",
        linger_ms=5,
        batch_size=256 * 1024,
    )


def ensure_topics(bootstrap_servers: str, topics: dict[str, int], client_id: str = "streamer-admin") -> list[str]:
    """Create the topics (name -> partitions) that do not exist yet; returns those created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers.split(","), client_id=client_id)
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(name, partitions, 1) for name, partitions in topics.items() if name not in existing]
        created = []
        for topic in missing:
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s", created)
        return created
    finally:
        admin.close()
