"""The Kafka checkpoint store's fault cases over the in-memory changelog (the same scenarios run
on the real broker in tests/integration/test_checkpoint_kafka.py), and the directory store's
handling of checkpoints above the committed offset."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.checkpoint import DirectoryCheckpointStore
from streamer.checkpoint_kafka import KafkaCheckpointStore
from streamer.kafka.memory import MemoryBroker, MemoryChangelog
from tests.checkpoint_scenarios import CHUNK, SCENARIOS, WIDTH, assert_same, checkpoint


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_kafka_store_fault_cases(scenario) -> None:
    changelog = MemoryChangelog(MemoryBroker(), "checkpoints", partitions=3)

    def open_store(keep: int = 3) -> KafkaCheckpointStore:
        return KafkaCheckpointStore(changelog, "group", keep, CHUNK)

    scenario(open_store)


def test_compaction_keeps_what_the_store_still_reads() -> None:
    changelog = MemoryChangelog(MemoryBroker(), "checkpoints")
    store = KafkaCheckpointStore(changelog, "group", 2, CHUNK)
    saved = [checkpoint(0, offset, devices=100) for offset in (10, 20, 30)]
    for c in saved:
        store.save(c)
    store.save(checkpoint(0, 30, devices=100, version="v2"))  # written again at 30
    changelog.compact()
    fresh = KafkaCheckpointStore(changelog, "group", 2, CHUNK)
    assert fresh.offsets("readings", 0) == [30, 20]
    loaded, refused = fresh.load_latest("readings", 0, WIDTH)
    assert refused == [] and loaded is not None and loaded.model_version == "v2"
    assert_same(fresh.load_latest("readings", 0, WIDTH, max_offset=25)[0], saved[1])


def test_a_checkpoint_deleted_while_a_reader_was_not_looking_is_refused_once():
    """Compaction drops tombstones after delete.retention.ms: a reader that caught up before the
    deletion never sees it, and holds a "ghost" manifest whose chunks are gone."""
    changelog = MemoryChangelog(MemoryBroker(), "checkpoints")
    writer = KafkaCheckpointStore(changelog, "group", 2, CHUNK)
    reader = KafkaCheckpointStore(changelog, "group", 2, CHUNK)
    for offset in (10, 20):
        writer.save(checkpoint(0, offset, devices=100))
    assert reader.offsets("readings", 0) == [20, 10]
    writer.save(checkpoint(0, 30, devices=100))  # 10 deleted
    changelog.compact()  # ... and its tombstones too, as after delete.retention.ms
    assert reader.offsets("readings", 0) == [30, 20, 10]  # the reader cannot know
    loaded, refused = reader.load_latest("readings", 0, WIDTH, max_offset=15)
    assert loaded is None and len(refused) == 1 and "gone from the changelog" in refused[0].reason
    assert reader.offsets("readings", 0) == [30, 20]
    assert reader.load_latest("readings", 0, WIDTH, max_offset=15) == (None, [])


def test_directory_store_keeps_a_save_below_older_checkpoints_and_discards_them(tmp_path: Path) -> None:
    store = DirectoryCheckpointStore(tmp_path, "group", keep=2)
    for offset in (1000, 2000):
        store.save(checkpoint(0, offset, devices=20))
    new = checkpoint(0, 100, devices=20, seed=7)
    store.save(new)
    assert store.offsets("readings", 0) == [2000, 1000, 100]
    loaded, refused = store.load_latest("readings", 0, WIDTH, max_offset=150)
    assert refused == []
    assert_same(loaded, new)
    assert store.discard_above("readings", 0, 150) == [1000, 2000]
    assert store.offsets("readings", 0) == [100]
    for offset in (200, 300, 400):
        store.save(checkpoint(0, offset, devices=20))
    assert store.offsets("readings", 0) == [400, 300]


def test_a_load_beats_progress_for_each_chunk_it_reads():
    # A big checkpoint's read takes long: whoever reads the store (the loop) stays live meanwhile.
    changelog = MemoryChangelog(MemoryBroker(), "checkpoints")
    saved = checkpoint(0, 10, devices=500)
    KafkaCheckpointStore(changelog, "group", 2, CHUNK).save(saved)
    store = KafkaCheckpointStore(changelog, "group", 2, CHUNK)
    beats = []
    store.progress = lambda: beats.append(1)
    loaded, refused = store.load_latest("readings", 0, WIDTH)
    assert refused == [] and len(beats) == len(store._index(store.changelog_partition("readings", 0))
                                                 .manifests[("readings", 0)][10].chunks) > 1
    assert_same(loaded, saved)
