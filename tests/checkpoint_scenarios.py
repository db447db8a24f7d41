"""Fault cases of the Kafka checkpoint store, run over the in-memory changelog
(tests/test_checkpoint_kafka.py) and over the real broker with each client
(tests/integration/test_checkpoint_kafka.py). Faults are injected at the Changelog seam
(``FaultyChangelog``), around whichever changelog the store was given."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from streamer.checkpoint import Checkpoint
from streamer.checkpoint_kafka import ChangelogUnavailable, KafkaCheckpointStore
from streamer.engine import PartitionState
from streamer.kafka.abstract import BrokerTimeout, Changelog, KafkaClientError, Message

WIDTH = 12
CHUNK = 4096

OpenStore = Callable[..., KafkaCheckpointStore]  # open_store(keep=3): a fresh store (fresh index) over one changelog


class FaultyChangelog(Changelog):
    """``inner`` with faults: the next write fails after ``write_ok`` of its records went in;
    the next ``reads_failing`` reads time out after ``read_ok`` records came out."""

    def __init__(self, inner: Changelog) -> None:
        self.inner = inner
        self.topic = inner.topic
        self.write_ok: int | None = None
        self.read_ok = 0
        self.reads_failing = 0

    def partition_count(self, timeout_s: float) -> int:
        return self.inner.partition_count(timeout_s)

    def end_offset(self, partition: int, timeout_s: float) -> int:
        return self.inner.end_offset(partition, timeout_s)

    def read(self, partition: int, start: int, end: int, timeout_s: float) -> Iterator[Message]:
        failing = self.reads_failing > 0
        for count, message in enumerate(self.inner.read(partition, start, end, timeout_s)):
            if failing and count == self.read_ok:
                self.reads_failing -= 1
                raise BrokerTimeout(f"changelog read: {end} not reached in time (injected)")
            yield message

    def write(self, partition: int, records: Sequence[tuple[bytes, bytes | None]], timeout_s: float) -> list[int]:
        if self.write_ok is None:
            return self.inner.write(partition, records, timeout_s)
        ok, self.write_ok = self.write_ok, None
        if ok:
            self.inner.write(partition, records[:ok], timeout_s)
        raise KafkaClientError(f"{len(records) - ok} of {len(records)} records not delivered (injected)", retriable=True)

    def close(self) -> None:
        self.inner.close()


def faulty(store: KafkaCheckpointStore) -> FaultyChangelog:
    """Put a FaultyChangelog between ``store`` and its changelog."""
    if not isinstance(store.changelog, FaultyChangelog):
        store.changelog = FaultyChangelog(store.changelog)
    return store.changelog


def state_of(devices: int, seed: int) -> PartitionState:
    rng = np.random.default_rng(seed)
    ids = [f"dev-{seed}-{i}-ü" for i in range(devices)]
    return PartitionState(ids, rng.normal(size=(devices, WIDTH)).astype(np.float32), rng.uniform(0, 1e9, devices))


def checkpoint(partition: int, offset: int, devices: int = 500, version: str = "v1", seed: int | None = None) -> Checkpoint:
    state = state_of(devices, offset if seed is None else seed)
    return Checkpoint("readings", partition, offset, state, WIDTH, version)


def assert_same(loaded: Checkpoint | None, saved: Checkpoint) -> None:
    assert loaded is not None
    assert (loaded.topic, loaded.partition, loaded.offset, loaded.model_version) == (
        saved.topic, saved.partition, saved.offset, saved.model_version)
    assert loaded.state.device_ids == saved.state.device_ids
    assert np.array_equal(loaded.state.rows, saved.state.rows)
    assert np.array_equal(loaded.state.last_seen, saved.state.last_seen)


def live_keys(store: KafkaCheckpointStore, partition: int) -> set[str]:
    """Keys of the changelog partition holding input ``partition`` whose last record is not a
    tombstone (what compaction will keep)."""
    changelog = store.changelog.inner if isinstance(store.changelog, FaultyChangelog) else store.changelog
    at = store.changelog_partition("readings", partition)
    last: dict[bytes, bytes | None] = {}
    for message in changelog.read(at, 0, changelog.end_offset(at, 30), 30):
        if message.key is not None:
            last[message.key] = message.value
    return {key.decode() for key, value in last.items() if value is not None}


def offsets_reset_checkpoints_above_do_not_push_new_ones_out(open_store: OpenStore) -> None:
    """Checkpoints of an earlier history above the committed offset: a save below them stays,
    and recovery deletes them (discard_above), for this reader and a fresh one."""
    store = open_store(keep=2)
    for offset in (1000, 2000):
        store.save(checkpoint(0, offset, devices=20))
    faulty(store).write_ok = 1  # and a save that failed midway, above them
    with pytest.raises(ChangelogUnavailable):
        store.save(checkpoint(0, 3000, devices=20))
    new = checkpoint(0, 100, devices=20, seed=7)
    store.save(new)  # the group's offsets went back to 0: this is the partition's history now
    loaded, refused = store.load_latest("readings", 0, WIDTH, max_offset=150)
    assert refused == []
    assert_same(loaded, new)
    assert store.discard_above("readings", 0, 150) == [1000, 2000]
    assert store.offsets("readings", 0) == [100]
    assert store.discard_above("readings", 0, 150) == []
    fresh = open_store(keep=2)
    assert fresh.offsets("readings", 0) == [100]
    assert_same(fresh.load_latest("readings", 0, WIDTH)[0], new)
    assert not any(f"/{o:020d}/" in k for o in (1000, 2000, 3000) for k in live_keys(store, 0))


def a_rewrite_at_the_same_offset_that_fails_leaves_the_old_one_whole(open_store: OpenStore) -> None:
    store = open_store()
    old = checkpoint(0, 20, version="v1")  # ~36 kB: ten chunks
    store.save(old)
    faulty(store).write_ok = 3  # three chunks of the new one go in, then the brokers go away
    with pytest.raises(ChangelogUnavailable):
        store.save(checkpoint(0, 20, version="v2"))
    reader = open_store()
    loaded, refused = reader.load_latest("readings", 0, WIDTH)
    assert refused == []
    assert_same(loaded, old)
    # Written again whole: the new one is read, and the old one's chunks are deleted.
    new = checkpoint(0, 20, version="v2")
    store.save(new)
    assert_same(open_store().load_latest("readings", 0, WIDTH)[0], new)
    live = live_keys(store, 0)
    chunks_live = sorted(k for k in live if "/00000000000000000020/" in k and not k.endswith("/manifest"))
    manifest = store._index(store.changelog_partition("readings", 0)).manifests[("readings", 0)][20]
    assert chunks_live == sorted(c.key for c in manifest.chunks)  # the new one's only


def a_catch_up_cut_short_goes_on_where_it_stopped(open_store: OpenStore) -> None:
    writer = open_store(keep=5)
    saved = [writer.save(checkpoint(0, offset, devices=100)) and checkpoint(0, offset, devices=100)
             for offset in (10, 20, 30, 40)]
    reader = open_store(keep=5)
    faults = faulty(reader)
    faults.read_ok, faults.reads_failing = 2, 1000  # every read times out after 2 records
    at = reader.changelog_partition("readings", 0)
    records = reader.changelog.end_offset(at, 30)
    for attempt in range(records):
        try:
            loaded, refused = reader.load_latest("readings", 0, WIDTH)
            break
        except KafkaClientError:
            continue
    else:
        pytest.fail(f"the catch-up of {records} records never finished")
    assert attempt <= records // 2 + 1  # each attempt read on from where the last one stopped
    assert refused == []
    assert_same(loaded, saved[-1])  # its two chunks read back in one read


def records_that_are_not_checkpoints_are_passed_over(open_store: OpenStore) -> None:
    store = open_store()
    at = store.changelog_partition("readings", 0)
    group = store._prefix
    store.changelog.write(at, [
        (f"{group}readings/0/00000000000000000005/manifest".encode(), b"[1, 2]"),  # JSON, not an object
        (f"{group}readings/0/00000000000000000006/manifest".encode(), b"\xff not json"),
        (f"{group}readings/0/\u00b2/manifest".encode(), b"{}"),  # "²".isdigit(), and yet not a number
        (f"{group}readings/\u00b2/00000000000000000007/00000".encode(), b"chunk"),
        (b"\xff\xfe", b"a key that is not UTF-8"),
        # Manifests int() cannot take (1e999 is inf to JSON) or nested past the parser's depth:
        # they had ended the loop in a traceback, in the recovery and in the checkpoint writer.
        (f"{group}readings/0/00000000000000000002/manifest".encode(), _manifest(offset=1e999)),
        (f"{group}readings/0/00000000000000000003/manifest".encode(), _manifest(offset=3, chunks=[["k", 1e999, "h"]])),
        (f"{group}readings/0/00000000000000000004/manifest".encode(), b"[" * 100_000 + b"]" * 100_000),
        # A manifest under another checkpoint's key: it had been refused at every load.
        (f"{group}readings/0/00000000000000000008/manifest".encode(), _manifest(offset=7)),
    ], 30)
    saved = checkpoint(0, 10, devices=20)
    open_store().save(saved)  # a writer reading them for the first time
    fresh = open_store()
    assert fresh.offsets("readings", 0) == [10]
    loaded, refused = fresh.load_latest("readings", 0, WIDTH)
    assert refused == []
    assert_same(loaded, saved)
    assert fresh.load_latest("readings", 0, WIDTH, max_offset=9) == (None, [])


def _manifest(offset: object, chunks: list | None = None) -> bytes:
    """A manifest's JSON for readings[0] at ``offset``."""
    return json.dumps({"format": 1, "topic": "readings", "partition": 0, "offset": offset, "size": 1,
                       "sha256": "0" * 64, "chunks": chunks if chunks is not None else [["k", 1, "0" * 64]]}).encode()


def the_records_of_a_failed_save_are_deleted_by_later_ones(open_store: OpenStore) -> None:
    store = open_store(keep=2)
    store.save(checkpoint(0, 10, devices=100))
    faulty(store).write_ok = 2
    with pytest.raises(ChangelogUnavailable):
        store.save(checkpoint(0, 20, devices=100))
    assert any("/00000000000000000020/" in k for k in live_keys(store, 0))
    store.save(checkpoint(0, 30, devices=100))
    assert any("/00000000000000000020/" in k for k in live_keys(store, 0))  # newer than the oldest kept (10)
    store.save(checkpoint(0, 40, devices=100))  # keeps 30 and 40: 20 is older than both
    live = live_keys(store, 0)
    assert not any("/00000000000000000020/" in k or "/00000000000000000010/" in k for k in live)
    assert open_store().offsets("readings", 0) == [40, 30]


SCENARIOS = [
    offsets_reset_checkpoints_above_do_not_push_new_ones_out,
    a_rewrite_at_the_same_offset_that_fails_leaves_the_old_one_whole,
    a_catch_up_cut_short_goes_on_where_it_stopped,
    records_that_are_not_checkpoints_are_passed_over,
    the_records_of_a_failed_save_are_deleted_by_later_ones,
]
