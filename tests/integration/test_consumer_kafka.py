"""The consumer seam against a real broker, through each client: end offsets (the loop's lag and
readiness probe) asked of partitions that a group member is fetching from."""

import time
import uuid

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from streamer.kafka import open_consumer
from streamer.kafka.abstract import Committed, RebalanceHooks, TopicPartition
from streamer.settings import load_settings


@pytest.mark.kafka
def test_end_offsets_are_each_partitions_next_offset(kafka_bootstrap: str):
    topic = f"test-consumer-{uuid.uuid4().hex}"
    counts = {0: 5, 1: 0, 2: 12}
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=len(counts), replication_factor=1)])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for partition, count in counts.items():
        for i in range(count):
            producer.send(topic, key=b"k", value=b"%d" % i, partition=partition)
    producer.flush()
    producer.close()
    settings = load_settings({"kafka": {"bootstrap_servers": kafka_bootstrap, "input_topic": topic,
                                        "group_id": f"test-consumer-{uuid.uuid4().hex[:8]}", "auto_offset_reset": "latest"}})
    consumer = open_consumer(settings.kafka, 100)
    try:
        nothing = lambda partitions: None  # noqa: E731
        consumer.subscribe([topic], RebalanceHooks(nothing, nothing, nothing))
        deadline = time.monotonic() + 30
        while len(consumer.assignment()) < len(counts) and time.monotonic() < deadline:
            consumer.poll(0.1, 100)
        assert len(consumer.assignment()) == len(counts)
        consumer.poll(0.3, 100)  # fetching from the end: nothing comes, the fetch waits on the broker
        partitions = [TopicPartition(topic, p) for p in counts]
        assert consumer.end_offsets(partitions, 10) == {TopicPartition(topic, p): n for p, n in counts.items()}
        assert consumer.end_offsets(partitions[2:], 10) == {TopicPartition(topic, 2): 12}
        assert consumer.end_offsets([], 10) == {}
    finally:
        consumer.close(5)
        admin.delete_topics([topic])
        admin.close()


@pytest.mark.kafka
def test_end_offsets_in_exactly_once_mode_stop_at_an_open_transaction(kafka_bootstrap: str):
    """Read committed (exactly-once mode), a partition's end is its last stable offset: the
    readings of a transaction still open are not there yet, as the consumer does not read them."""
    from confluent_kafka import Producer

    topic = f"test-consumer-{uuid.uuid4().hex}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    plain = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(2):
        plain.send(topic, key=b"k", value=b"%d" % i, partition=0)
    plain.flush()
    plain.close()
    open_transaction = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"})
    open_transaction.init_transactions(30)
    open_transaction.begin_transaction()
    for i in range(3):
        open_transaction.produce(topic, key=b"k", value=b"%d" % i, partition=0)
    open_transaction.flush(30)
    tp = TopicPartition(topic, 0)
    ends = {}
    try:
        for exactly_once in (False, True):
            settings = load_settings({"kafka": {"bootstrap_servers": kafka_bootstrap, "input_topic": topic,
                                                "group_id": f"test-consumer-{uuid.uuid4().hex[:8]}",
                                                "exactly_once": exactly_once}})
            consumer = open_consumer(settings.kafka, 100)
            try:
                ends[exactly_once] = consumer.end_offsets([tp], 10)
            finally:
                consumer.close(5)
    finally:
        open_transaction.abort_transaction(30)
        admin.delete_topics([topic])
        admin.close()
    assert ends == {False: {tp: 5}, True: {tp: 2}}


@pytest.mark.kafka
def test_a_partition_whose_seek_librdkafka_refused_is_consumed_from_the_offset(kafka_bootstrap: str, kafka_client: str,
                                                                                monkeypatch: pytest.MonkeyPatch):
    """Cooperative assignment, confluent-kafka: a seek librdkafka refuses as of a partition it has
    not started ("Local: Erroneous state") assigns the partition again at the offset, outside any
    rebalance callback, paused as the loop keeps a partition it recovers; resumed, it is consumed
    from that offset."""
    if kafka_client != "confluent-kafka":
        pytest.skip("librdkafka's refused seek; kafka-python has no such state")
    from confluent_kafka import KafkaError, KafkaException

    from streamer.kafka import confluent

    monkeypatch.setattr(confluent, "SEEK_REFUSED_REASSIGN_S", 0.0)  # refused long enough at once

    topic = f"test-consumer-{uuid.uuid4().hex}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(20):
        producer.send(topic, key=b"k", value=b"%d" % i, partition=0)
    producer.flush()
    producer.close()
    settings = load_settings({"kafka": {"bootstrap_servers": kafka_bootstrap, "input_topic": topic, "client": "confluent-kafka",
                                        "group_id": f"test-consumer-{uuid.uuid4().hex[:8]}", "auto_offset_reset": "earliest"}})
    consumer = open_consumer(settings.kafka, 100)

    class RefusingSeek:  # librdkafka's consumer, but every seek refused as of a partition not started
        def __init__(self, client):
            self.client = client

        def seek(self, partition):
            raise KafkaException(KafkaError(KafkaError._STATE, "Failed to seek: Local: Erroneous state"))

        def __getattr__(self, name):
            return getattr(self.client, name)

    tp = TopicPartition(topic, 0)
    try:
        assert consumer.cooperative
        nothing = lambda partitions: None  # noqa: E731
        consumer.subscribe([topic], RebalanceHooks(lambda partitions: consumer.pause(partitions), nothing, nothing))
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            assert consumer.poll(0.1, 100) == []  # paused at once
        assert consumer.assignment() == {tp}
        real = consumer.client
        consumer.client = RefusingSeek(real)
        consumer.seek(tp, 7)
        consumer.client = real
        assert consumer.assignment() == {tp}
        consumer.resume([tp])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 13 and time.monotonic() < deadline:
            got.extend(m.offset for m in consumer.poll(0.2, 100))
        assert got == list(range(7, 20))
    finally:
        consumer.close(5)
        admin.delete_topics([topic])
        admin.close()


@pytest.mark.kafka
@pytest.mark.parametrize("exactly_once", [False, True])
def test_offsets_are_committed_with_their_metadata_and_read_back(kafka_bootstrap: str, kafka_client: str,
                                                                  exactly_once: bool):
    """The loop commits a ModelSpan with each offset (a consumer's commit, or a transaction's
    offsets in exactly-once mode), and recovery reads it back with the committed offset."""
    from streamer.checkpoint import ModelSpan
    from streamer.kafka import open_producer

    topic = f"test-consumer-{uuid.uuid4().hex}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    settings = load_settings({"kafka": {"bootstrap_servers": kafka_bootstrap, "input_topic": topic,
                                        "output_topic": f"{topic}-out", "exactly_once": exactly_once,
                                        "group_id": f"test-consumer-{uuid.uuid4().hex[:8]}"}})
    consumer = open_consumer(settings.kafka, 100)
    producer = open_producer(settings.kafka, "metadata") if exactly_once else None
    partitions = [TopicPartition(topic, p) for p in range(3)]
    try:
        nothing = lambda partitions: None  # noqa: E731
        consumer.subscribe([topic], RebalanceHooks(nothing, nothing, nothing))
        deadline = time.monotonic() + 30
        while len(consumer.assignment()) < 3 and time.monotonic() < deadline:
            consumer.poll(0.1, 100)
        assert consumer.committed_with_metadata(partitions, 10) == dict.fromkeys(partitions)
        span = ModelSpan("0123456789abcdef", 7).encode()
        offsets = {partitions[0]: 0, partitions[1]: 12}
        metadata = {partitions[0]: span}  # partitions[1] with none
        if producer is None:
            consumer.commit(offsets, metadata)
        else:
            producer.begin_transaction()
            producer.send_offsets_to_transaction(offsets, consumer.group_metadata(), metadata)
            producer.commit_transaction()
        assert consumer.committed_with_metadata(partitions, 10) == {
            partitions[0]: Committed(0, span), partitions[1]: Committed(12, ""), partitions[2]: None}
        assert consumer.committed(partitions, 10) == {partitions[0]: 0, partitions[1]: 12, partitions[2]: None}
    finally:
        if producer is not None:
            producer.close(5)
        consumer.close(5)
        admin.delete_topics([topic])
        admin.close()
