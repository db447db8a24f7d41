"""The Kafka checkpoint store (streamer/checkpoint_kafka.py) on the real broker, with each client."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from streamer.checkpoint import Checkpoint, ModelStamp
from streamer.checkpoint_kafka import ChangelogUnavailable, KafkaCheckpointStore, Manifest
from streamer.engine import PartitionState
from streamer.kafka import ensure_topics, open_changelog
from streamer.kafka.clients import TopicSpec
from streamer.kafka.topics import COMPACT
from streamer.settings import KafkaSettings
from tests.checkpoint_scenarios import SCENARIOS

pytestmark = pytest.mark.kafka

WIDTH = 12
CHUNK = 4096


def state_of(devices: int, seed: int) -> PartitionState:
    rng = np.random.default_rng(seed)
    ids = [f"dev-{seed}-{i}-ü" for i in range(devices)]
    return PartitionState(ids, rng.normal(size=(devices, WIDTH)).astype(np.float32), rng.uniform(0, 1e9, devices))


def checkpoint(partition: int, offset: int, devices: int = 500, version: str = "v1") -> Checkpoint:
    return Checkpoint("readings", partition, offset, state_of(devices, offset), WIDTH, version)


@pytest.fixture
def changelog_topic(kafka_bootstrap: str, unique: str) -> str:
    topic = f"ckpt-{unique}"
    ensure_topics(kafka_bootstrap, {topic: TopicSpec(3, 1, dict(COMPACT))})
    return topic


def open_store(bootstrap: str, topic: str, group: str = "group", keep: int = 3) -> KafkaCheckpointStore:
    client = os.environ["STREAMER_KAFKA__CLIENT"]  # set by the kafka_client fixture
    changelog = open_changelog(KafkaSettings(bootstrap_servers=bootstrap, client=client), topic, CHUNK, 30_000)
    return KafkaCheckpointStore(changelog, group, keep, CHUNK)


def assert_same(loaded: Checkpoint, saved: Checkpoint) -> None:
    assert (loaded.topic, loaded.partition, loaded.offset, loaded.model_version) == (
        saved.topic, saved.partition, saved.offset, saved.model_version)
    assert loaded.state.device_ids == saved.state.device_ids
    assert np.array_equal(loaded.state.rows, saved.state.rows)
    assert np.array_equal(loaded.state.last_seen, saved.state.last_seen)


def test_saved_in_chunks_and_loaded_by_another_process(kafka_bootstrap: str, changelog_topic: str):
    writer = open_store(kafka_bootstrap, changelog_topic)
    saved = checkpoint(0, 100)  # ~36 kB: ten chunks of 4 kB
    try:
        key = writer.save(saved)
    finally:
        writer.close()
    assert key.endswith("/readings/0/00000000000000000100/manifest")
    reader = open_store(kafka_bootstrap, changelog_topic)  # a fresh index: everything read from the log
    try:
        loaded, refused = reader.load_latest("readings", 0, WIDTH)
        assert refused == [] and loaded is not None
        assert_same(loaded, saved)
        assert reader.load_latest("readings", 1, WIDTH) == (None, [])
        assert reader.load_latest("readings", 0, WIDTH, max_offset=99) == (None, [])
    finally:
        reader.close()


def test_keep_prunes_with_tombstones_seen_by_other_readers(kafka_bootstrap: str, changelog_topic: str):
    store = open_store(kafka_bootstrap, changelog_topic, keep=2)
    other = open_store(kafka_bootstrap, changelog_topic, keep=2)
    try:
        for offset in (10, 20, 30, 40):
            store.save(checkpoint(1, offset, devices=50))
        assert store.offsets("readings", 1) == [40, 30]
        assert other.offsets("readings", 1) == [40, 30]  # the tombstones deleted 10 and 20
        assert other.load_latest("readings", 1, WIDTH, max_offset=35)[0].offset == 30
        assert other.load_latest("readings", 1, WIDTH, max_offset=25) == (None, [])
        # Another group's checkpoints of the same partition are apart.
        assert open_store(kafka_bootstrap, changelog_topic, group="other-group").offsets("readings", 1) == []
    finally:
        store.close()
        other.close()


def chunk_key(store: KafkaCheckpointStore, partition: int, offset: int, chunk: int) -> str:
    """The key of a chunk of a checkpoint ``store`` saved (as its manifest names it)."""
    index = store._index(store.changelog_partition("readings", partition))
    return index.manifests[("readings", partition)][offset].chunks[chunk].key


def test_a_checkpoint_without_all_its_chunks_is_refused_and_the_previous_one_used(kafka_bootstrap: str, changelog_topic: str):
    store = open_store(kafka_bootstrap, changelog_topic)
    try:
        previous = checkpoint(2, 50)
        store.save(previous)
        store.save(checkpoint(2, 60))
        at = store.changelog_partition("readings", 2)
        # A writer that died before its manifest: chunks and no manifest are never read.
        store.changelog.write(at, [(store._key("readings", 2, 70, "00000").encode(), b"half")], 30)
        # A chunk of 60 replaced by other bytes (as if rewritten): its manifest no longer verifies.
        store.changelog.write(at, [(chunk_key(store, 2, 60, 1).encode(), b"x" * CHUNK)], 30)
        reader = open_store(kafka_bootstrap, changelog_topic)
        try:
            loaded, refused = reader.load_latest("readings", 2, WIDTH)
            assert loaded is not None
            assert_same(loaded, previous)
            assert [r.path for r in refused] == [store._key("readings", 2, 60, "manifest")]
            assert "does not match its manifest" in refused[0].reason
            # A manifest whose chunk is deleted (a tombstone) is refused the same way.
            store.changelog.write(at, [(chunk_key(store, 2, 50, 0).encode(), None)], 30)
            loaded, refused = reader.load_latest("readings", 2, WIDTH)
            assert loaded is None and "missing" in refused[-1].reason
        finally:
            reader.close()
    finally:
        store.close()


def test_model_stamps_follow_the_directory_store_rules(kafka_bootstrap: str, changelog_topic: str):
    store = open_store(kafka_bootstrap, changelog_topic)
    try:
        store.save(checkpoint(0, 10, version="old"))
        store.save(checkpoint(0, 20, version="new"))
        new = ModelStamp("new", {})
        assert store.load_latest("readings", 0, WIDTH, 25, new)[0].offset == 20
        loaded, refused = store.load_latest("readings", 0, WIDTH, 15, new)
        assert loaded is None and "written under model old" in refused[0].reason
        loaded, refused = store.load_latest("readings", 0, WIDTH + 1)
        assert loaded is None and "width" in refused[0].reason
    finally:
        store.close()


def test_manifest_names_chunks_with_checksums(kafka_bootstrap: str, changelog_topic: str):
    store = open_store(kafka_bootstrap, changelog_topic)
    try:
        key = store.save(checkpoint(0, 5))
        at = store.changelog_partition("readings", 0)
        end = store.changelog.end_offset(at, 30)
        records = {m.key.decode(): m.value for m in store.changelog.read(at, 0, end, 30)}
        manifest = Manifest.from_bytes(key, records[key])
        assert len(manifest.chunks) == -(-manifest.size // CHUNK)
        for ref in manifest.chunks:
            assert len(records[ref.key]) == ref.size <= CHUNK
            assert hashlib.sha256(records[ref.key]).hexdigest() == ref.sha256
    finally:
        store.close()


def test_a_missing_changelog_topic_is_an_error_naming_it(kafka_bootstrap: str, unique: str):
    from streamer.kafka.abstract import KafkaClientError

    with pytest.raises(KafkaClientError, match=f"ckpt-missing-{unique}"):
        open_store(kafka_bootstrap, f"ckpt-missing-{unique}")


def test_a_kafka_python_changelogs_producer_knows_its_partitions_once_opened(kafka_bootstrap: str, changelog_topic: str,
                                                                              kafka_client: str):
    """Else its first write waited for the topic's metadata first (60 s by default while the brokers
    were away), and then for its own timeout."""
    if kafka_client != "kafka-python":
        pytest.skip("kafka-python's producer waits for metadata in send")
    from streamer.kafka.clients import CHANGELOG_METADATA_WAIT_MS

    store = open_store(kafka_bootstrap, changelog_topic)
    producer = store.changelog.producer
    try:
        assert producer.config["max_block_ms"] == CHANGELOG_METADATA_WAIT_MS
        producer.config["max_block_ms"] = 0  # known already, or this raises at once
        assert len(producer.partitions_for(changelog_topic)) == store.partitions
    finally:
        store.close()


def test_a_write_that_cannot_be_delivered_is_an_oserror(kafka_bootstrap: str, changelog_topic: str):
    store = open_store(kafka_bootstrap, changelog_topic)
    store.chunk_bytes = 4 * 1024 * 1024  # above the broker's message.max.bytes (1 MiB by default)
    try:
        with pytest.raises(ChangelogUnavailable):
            store.save(checkpoint(0, 7, devices=40_000))
    finally:
        store.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_fault_cases(kafka_bootstrap: str, changelog_topic: str, scenario):
    """The fault cases of tests/checkpoint_scenarios.py (unit-tested over the in-memory changelog),
    each store a fresh client of the real changelog topic."""
    opened: list[KafkaCheckpointStore] = []

    def open_scenario_store(keep: int = 3) -> KafkaCheckpointStore:
        opened.append(open_store(kafka_bootstrap, changelog_topic, keep=keep))
        return opened[-1]

    try:
        scenario(open_scenario_store)
    finally:
        for store in opened:
            store.close()
