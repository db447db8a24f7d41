"""Reading and writing test topics on the real broker."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamer.kafka import ensure_topics


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    ensure_topics(bootstrap, {topic: partitions})


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None, list | None]]) -> None:
    """(key, value, headers) in order; waits for every acknowledgement."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=k, value=v, headers=h) for k, v, h in messages]
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()


def read_topic(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0, settle_s: float = 1.0,
    committed_only: bool = False,
) -> list:
    """Every record of ``topic`` from the beginning: waits for ``expected`` and then ``settle_s``
    more, so that a surplus (duplicates) would be seen too. ``committed_only``: read_committed."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed" if committed_only else "read_uncommitted",
    )
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                time.sleep(0.2)
        if partitions is None:
            return []
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records: list = []
        settle_until = None
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            if len(records) >= expected:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
        return records
    finally:
        consumer.close()
