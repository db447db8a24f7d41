import errno
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kafka.structs import TopicPartition

from streamer import checkpoint as checkpoint_module
from streamer.checkpoint import Checkpoint, CheckpointError, DirectoryCheckpointStore, ModelSpan, ModelStamp, decode, encode
from streamer.engine import Engine, ReadingBatch
from streamer.kafka.abstract import Committed
from streamer.partitions import CheckpointPolicy, PartitionManager
from tests.conftest import make_bundle, written_as_the_loop_goes_on


def stepped_engine(seed: int = 0) -> Engine:
    """An engine with devices from two partitions after a few batches."""
    engine = Engine.build(make_bundle(input_size=2, hidden_size=8, num_layers=2, seed=seed), capacity=64, device="cpu")
    rng = np.random.default_rng(seed)
    for t in range(5):
        ids = [f"dev-{i}-ü" for i in range(10)]
        engine.step(
            ReadingBatch(ids, np.full(10, float(t)), rng.normal(size=(10, 2)).astype(np.float32),
                         np.array([i % 2 for i in range(10)], dtype=np.int32)),
            now=100.0 + t,
        )
    return engine


def checkpoint_of(engine: Engine, partition: int, offset: int) -> Checkpoint:
    return Checkpoint("readings", partition, offset, engine.export_partition(partition), engine.layout.width, "v1")


def test_snapshot_restore_is_bitwise(tmp_path: Path):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(checkpoint_of(engine, 1, 42))
    before = {d: engine.table.rows[engine.table.slot_of(d)].clone() for d in engine.table.device_ids()}

    assert engine.drop_partition(1) == 5 and len(engine.table) == 5
    loaded, refused = store.load_latest("readings", 1, engine.layout.width)
    assert refused == [] and loaded.offset == 42 and loaded.model_version == "v1"
    engine.restore_partition(1, loaded.state)
    assert len(engine.table) == 10
    for device, row in before.items():
        assert np.array_equal(engine.table.rows[engine.table.slot_of(device)].numpy().view(np.uint32),
                              row.numpy().view(np.uint32)), device
        assert engine.table.last_seen(device) == 104.0
    assert sorted(engine.export_partition(1).device_ids) == sorted(f"dev-{i}-ü" for i in range(1, 10, 2))


def test_restored_devices_continue_exactly_like_uninterrupted_ones(tmp_path: Path):
    a, b = stepped_engine(), stepped_engine()
    state = checkpoint_of(a, 0, 7).state
    b.drop_partition(0)
    b.restore_partition(0, decode(encode(checkpoint_of(a, 0, 7))).state)
    ids = [f"dev-{i}-ü" for i in range(0, 10, 2)]
    x = np.ones((5, 2), np.float32)
    pa, _ = a.step(ReadingBatch(ids, np.zeros(5), x), now=200.0)
    pb, _ = b.step(ReadingBatch(ids, np.zeros(5), x), now=200.0)
    assert np.array_equal(pa.forecast, pb.forecast) and np.array_equal(pa.anomaly_score, pb.anomaly_score)
    assert len(state) == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path: Path, damage: str):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(checkpoint_of(engine, 0, 10))
    newest = store.save(checkpoint_of(engine, 0, 20))
    data = newest.read_bytes()
    newest.write_bytes({
        "truncate": data[: len(data) // 2],
        "flip": data[:100] + bytes([data[100] ^ 0x01]) + data[101:],
        "empty": b"",
        "garbage": b"STRMCKP1" + b"\x00" * 64,
    }[damage])
    with pytest.raises(CheckpointError, match=str(newest.name)):
        decode(newest.read_bytes(), newest)
    loaded, refused = store.load_latest("readings", 0, engine.layout.width)
    assert loaded.offset == 10
    assert [r.path for r in refused] == [newest] and refused[0].reason


def test_store_keeps_the_last_few_and_respects_the_committed_offset(tmp_path: Path):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group", keep=2)
    for offset in (5, 10, 15, 20):
        store.save(checkpoint_of(engine, 0, offset))
    assert [int(p.stem) for p in store.paths("readings", 0)] == [20, 15]
    assert store.load_latest("readings", 0, engine.layout.width, max_offset=17)[0].offset == 15
    assert store.load_latest("readings", 0, engine.layout.width, max_offset=3)[0] is None
    assert store.load_latest("readings", 1, engine.layout.width)[0] is None
    wrong_width, refused = store.load_latest("readings", 0, engine.layout.width + 1)
    assert wrong_width is None and "width" in refused[0].reason
    assert not list((tmp_path / "group" / "readings" / "0").glob("*.tmp"))


def test_empty_partition_checkpoint_round_trips(tmp_path: Path):
    engine = stepped_engine()
    cp = Checkpoint("t", 3, 0, engine.export_partition(3), engine.layout.width)
    assert len(cp.state) == 0
    back = decode(encode(cp))
    assert back.offset == 0 and len(back.state) == 0 and back.state.rows.shape == (0, engine.layout.width)


# --- failures of the store, and checkpoints across model switches (streamer/partitions.py) ---


class FakeConsumer:
    """What PartitionManager asks of a consumer: committed offsets, pause/resume, seek."""

    def __init__(self, committed: dict[TopicPartition, int] | None = None) -> None:
        self.committed_offsets = committed or {}
        self.metadata: dict[TopicPartition, str] = {}
        self.positions: dict[TopicPartition, int] = {}

    def committed_with_metadata(self, tps: list[TopicPartition], timeout_s: float) -> dict[TopicPartition, Committed | None]:
        return {tp: None if tp not in self.committed_offsets else Committed(self.committed_offsets[tp], self.metadata.get(tp, ""))
                for tp in tps}

    def position(self, tp: TopicPartition, timeout_s: float) -> int:
        return self.positions.get(tp, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, tps: list[TopicPartition]) -> None:
        pass

    def resume(self, tps: list[TopicPartition]) -> None:
        pass


class Recorder:
    """Metrics hooks, counted."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.calls.setdefault(name, []).append(args)

    def count(self, name: str) -> int:
        return len(self.calls.get(name, []))


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


TP0 = TopicPartition("readings", 0)
TP1 = TopicPartition("readings", 1)


def stamp_of(engine: Engine) -> ModelStamp:
    return ModelStamp.of(engine.model_version, engine.config.to_dict())


def stamped(engine: Engine, partition: int, offset: int, version: str | None = None) -> Checkpoint:
    return Checkpoint("readings", partition, offset, engine.export_partition(partition), engine.layout.width,
                      version or engine.model_version, model_config=engine.config.to_dict())


def applied_and_committed(partitions: PartitionManager, next_offsets: dict, readings: dict, commit: bool = True) -> None:
    """A batch's plan, applied, and (``commit``) its offsets committed, as the run loop does."""
    with partitions.lock:
        plan = partitions.plan(next_offsets, readings)
        partitions.applied(plan)
    if commit:
        partitions.committed(plan)
        written_as_the_loop_goes_on(partitions)


def manager(engine: Engine, store, committed: dict[TopicPartition, int], policy=CheckpointPolicy(), clock=None,
            metadata: dict[TopicPartition, str] | None = None):
    metrics = Recorder()
    consumer = FakeConsumer(committed)
    consumer.metadata.update(metadata or {})
    partitions = PartitionManager(consumer, engine, store, policy, metrics, clock=clock or Clock())
    partitions.assign(committed)
    partitions.recover_pending()
    return partitions, metrics


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch, failing: str):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(checkpoint_of(engine, 0, 10))

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, failing, disk_full)
    for offset in range(20, 30):
        with pytest.raises(OSError, match="No space"):
            store.save(checkpoint_of(engine, 0, offset))
    monkeypatch.undo()
    directory = tmp_path / "group" / "readings" / "0"
    assert sorted(p.name for p in directory.iterdir()) == [f"{10:020d}.ckpt"]
    assert store.load_latest("readings", 0, engine.layout.width)[0].offset == 10


def test_a_failing_store_is_retried_with_backoff_and_logged_once_per_episode(tmp_path: Path, monkeypatch, caplog):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    clock = Clock()
    policy = CheckpointPolicy(interval_s=3600, interval_readings=1, retry_initial_s=1.0, retry_max_s=8.0)
    partitions, metrics = manager(engine, store, {TP0: 0, TP1: 0}, policy, clock)
    real_save, attempts = store.save, []

    def disk_full(checkpoint):
        attempts.append(clock.now)
        raise OSError(errno.ENOSPC, "No space left on device")

    def batch(offset: int) -> None:
        clock.now += 0.2
        applied_and_committed(partitions, {TP0: offset, TP1: offset}, {TP0: 1, TP1: 1})

    monkeypatch.setattr(store, "save", disk_full)
    caplog.set_level(logging.INFO, logger="streamer.partitions")
    for offset in range(1, 201):  # 40 s of batches, both partitions due every batch
        batch(offset)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "No space" in errors[0].getMessage()
    # Tried at 0.2 s, then after 1, 2, 4, 8, 8, 8 ... s: not 400 times.
    assert 5 <= len(attempts) <= 10, attempts
    assert metrics.count("on_checkpoint_failed") == len(attempts)
    assert partitions.checkpoint_lag()[("readings", 0)] == pytest.approx(40.0 - 0.2)

    monkeypatch.setattr(store, "save", real_save)
    caplog.clear()
    clock.now += 10
    batch(201)
    recovered = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(recovered) == 1 and f"after {len(attempts)} failed attempts" in recovered[0]
    assert [int(p.stem) for p in store.paths("readings", 0)][0] == 201
    assert [int(p.stem) for p in store.paths("readings", 1)][0] == 201
    assert partitions.checkpoint_lag() == {("readings", 0): 0.0, ("readings", 1): 0.0}

    monkeypatch.setattr(store, "save", disk_full)  # a second episode is logged again
    batch(202)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_revoke_and_shutdown_checkpoints_are_tried_while_backing_off(tmp_path: Path, monkeypatch):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    clock = Clock()
    partitions, metrics = manager(engine, store, {TP0: 0, TP1: 0}, CheckpointPolicy(3600, 1), clock)
    real_save = store.save
    monkeypatch.setattr(store, "save", lambda cp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    applied_and_committed(partitions, {TP0: 5, TP1: 5}, {TP0: 5, TP1: 5})
    assert metrics.count("on_checkpoint_failed") == 1  # the second partition waits for the backoff
    monkeypatch.setattr(store, "save", real_save)
    partitions.release([TP1], checkpoint=True)
    partitions.checkpoint_all()
    assert int(store.paths("readings", 0)[0].stem) == 5 and int(store.paths("readings", 1)[0].stem) == 5


def test_a_checkpoint_of_another_model_is_not_replayed(tmp_path: Path):
    old = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(stamped(old, 0, 10))
    new = stepped_engine()
    new.swap_model(make_bundle(input_size=2, hidden_size=8, num_layers=2, seed=1, version="v2"))
    width, stamp = new.layout.width, stamp_of(new)

    # Readings 10..19 were applied under test-1: replaying them under v2 would not be what was published.
    loaded, refused = store.load_latest("readings", 0, width, 20, stamp)
    assert loaded is None and "test-1" in refused[0].reason and "v2" in refused[0].reason
    # Nothing to replay, same config: the rows carry over, as a hot reload carries them.
    loaded, refused = store.load_latest("readings", 0, width, 10, stamp)
    assert loaded.offset == 10 and refused == []
    # Another config (of the same row width): never.
    other = ModelStamp("v2", {**stamp.config, "time_features": ["hour"]})
    loaded, refused = store.load_latest("readings", 0, width, 10, other)
    assert loaded is None and "config" in refused[0].reason
    # The same version given to a model of another config (as streamer train's names can be): its
    # rows would be read in another layout, and had been.
    reused = ModelStamp("test-1", {**stamp_of(old).config, "hidden_size": 9})
    loaded, refused = store.load_latest("readings", 0, width, 10, reused)
    assert loaded is None and "of another config than the one served under that name" in refused[0].reason
    assert store.load_latest("readings", 0, width, 10, stamp_of(old))[0].offset == 10  # its own config: used
    # An older checkpoint of the model now served lies before the switch: not used either.
    store.save(stamped(new, 0, 5))
    assert store.load_latest("readings", 0, width, 20, stamp)[0] is None
    assert store.load_latest("readings", 0, width, 20, stamp_of(old))[0].offset == 10


def test_a_checkpoint_of_another_row_width_is_refused_and_no_older_one_used(tmp_path: Path):
    narrow = stepped_engine()
    wide = Engine.build(make_bundle(input_size=2, hidden_size=8, num_layers=2, device_norm_alpha=0.1),
                        capacity=64, device="cpu")
    assert wide.layout.width != narrow.layout.width
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(stamped(narrow, 0, 5))
    store.save(stamped(wide, 0, 10))
    partitions, metrics = manager(narrow, store, {TP0: 12})
    assert metrics.calls["on_recovery"] == [("no_checkpoint",)]
    assert metrics.calls["on_checkpoints_refused"] == [(1,)]
    assert partitions.consumer.positions[TP0] == 12 and narrow.export_partition(0).device_ids == []


def test_recovery_deletes_checkpoints_above_the_committed_offset(tmp_path: Path, caplog):
    """The group's offsets went back (reset, expired, the topic created anew): checkpoints above
    the committed offset are of the partition's earlier history. Kept, the next saves (below them)
    would be pruned as the oldest, and once the offsets passed them again they would be restored."""
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group", keep=3)
    store.save(stamped(engine, 0, 5))
    store.save(stamped(engine, 0, 900))
    store.save(stamped(engine, 0, 1000))
    with caplog.at_level(logging.INFO):
        partitions, metrics = manager(engine, store, {TP0: 7})
    assert metrics.calls["on_recovery"] == [("checkpoint",)]
    assert partitions.consumer.positions[TP0] == 5  # replays 5..7 from the checkpoint of this history
    assert store.offsets("readings", 0) == [5]
    told = [r.getMessage() for r in caplog.records if "above the committed offset" in r.getMessage()]
    assert len(told) == 1 and "offsets 900, 1000" in told[0]


def test_checkpoints_above_are_kept_when_the_group_has_no_commit_or_the_store_cannot_delete(tmp_path: Path, caplog,
                                                                                            monkeypatch):
    """No committed offset (never committed, or expired): they are of the same history, and nothing
    is deleted on the word of a position. A store that cannot delete: told, and recovery goes on."""
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group", keep=3)
    store.save(stamped(engine, 0, 5))
    store.save(stamped(engine, 0, 900))
    manager(engine, store, {TP0: None})
    assert store.offsets("readings", 0)[:2] == [900, 5]

    def cannot(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(store, "discard_above", cannot)
    with caplog.at_level(logging.WARNING):
        partitions, metrics = manager(engine, store, {TP0: 7})
    assert metrics.calls["on_recovery"] == [("checkpoint",)] and partitions.consumer.positions[TP0] == 5
    assert any("could not delete the checkpoints above the committed offset 7" in r.getMessage() for r in caplog.records)


def test_recovery_under_a_new_model_starts_devices_from_zero_and_counts_it(tmp_path: Path):
    old = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(stamped(old, 0, 10))
    old.swap_model(make_bundle(input_size=2, hidden_size=8, num_layers=2, seed=1, version="v2"))

    partitions, metrics = manager(old, store, {TP0: 20})
    assert metrics.calls["on_recovery"] == [("no_checkpoint",)] and metrics.count("on_checkpoints_refused") == 1
    assert partitions.consumer.positions[TP0] == 20 and len(old.export_partition(0)) == 0
    assert partitions.plan({TP0: 21}, {TP0: 1}).replay_until == {}

    partitions, metrics = manager(old, store, {TP0: 10})  # nothing to replay: rows carried over
    assert metrics.calls["on_recovery"] == [("checkpoint",)] and metrics.count("on_checkpoints_refused") == 0
    assert partitions.consumer.positions[TP0] == 10 and len(old.export_partition(0)) == 5


def test_a_model_switch_checkpoints_every_owned_partition_under_the_new_model(tmp_path: Path):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    partitions, metrics = manager(engine, store, {TP0: 0, TP1: 0})
    applied_and_committed(partitions, {TP0: 7}, {TP0: 7})
    applied_and_committed(partitions, {TP1: 9}, {TP1: 9}, commit=False)  # TP1's commit was refused
    partitions.checkpoint_all()  # TP0 already has a checkpoint at 7, under the old model
    before = {tp: store.load_latest("readings", tp.partition, engine.layout.width)[0] for tp in (TP0, TP1)}
    assert before[TP0].model_version == "test-1" and before[TP0].offset == 7

    engine.swap_model(make_bundle(input_size=2, hidden_size=8, num_layers=2, seed=1, version="v2"))
    partitions.model_switched()
    after = store.load_latest("readings", 0, engine.layout.width, 7, stamp_of(engine))[0]
    assert after.offset == 7 and after.model_version == "v2" and after.model_config == engine.config.to_dict()
    # Not checkpointed past what the group committed: the old one (offset 9, test-1) stays newest.
    assert store.load_latest("readings", 1, engine.layout.width)[0].model_version == "test-1"


def test_a_model_span_round_trips_and_other_metadata_says_nothing():
    span = ModelSpan("0123456789abcdef", 42)
    assert ModelSpan.decode(span.encode()) == span and ModelSpan.decode(ModelSpan("f" * 16, 0).encode()).since == 0
    assert ModelSpan.decode(span.encode() + "\x00") == span  # as confluent-kafka commits it, read by kafka-python
    text = span.encode()
    for other in ("", "checkpointed", text + " ", " " + text, text + "\x00\x00", text.replace("abcdef", "ABCDEF"), text.replace("42", "-42"),
                  text.replace("42", "042"), text.replace("42", "1" * 20), text.replace("0123456789abcdef", "0123")):
        assert ModelSpan.decode(other) is None, other
    stamp = ModelStamp.of("v1", {"hidden_size": 8})
    assert stamp.digest() == ModelStamp.of("v1", {"hidden_size": 8}).digest()
    assert len({stamp.digest(), ModelStamp.of("v2", {"hidden_size": 8}).digest(),
                ModelStamp.of("v1", {"hidden_size": 9}).digest()}) == 3


def test_commits_carry_the_served_models_span_and_a_switch_starts_a_new_one(tmp_path: Path):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    partitions, _ = manager(engine, store, {TP0: 3})  # no metadata: the span starts at the recovery
    first = stamp_of(engine).digest()
    assert partitions.plan({TP0: 5}, {TP0: 2}).commit_metadata == {TP0: ModelSpan(first, 3).encode()}
    applied_and_committed(partitions, {TP0: 7}, {TP0: 4})
    store.save = lambda checkpoint: (_ for _ in ()).throw(OSError("injected"))  # the switch's checkpoint fails
    engine.swap_model(make_bundle(input_size=2, hidden_size=8, num_layers=2, seed=1, version="v2"))
    partitions.model_switched()
    plan = partitions.plan({TP0: 9}, {TP0: 2})
    assert plan.commit_metadata == {TP0: ModelSpan(stamp_of(engine).digest(), 7).encode()} and first != stamp_of(engine).digest()


def test_recovery_replays_only_inside_the_committed_span(tmp_path: Path):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(stamped(engine, 0, 5))
    served = stamp_of(engine).digest()

    def recovered(committed: int, span: ModelSpan | None) -> tuple[list, list, int]:
        partitions, metrics = manager(engine, store, {TP0: committed}, metadata={TP0: span.encode()} if span else None)
        return metrics.calls["on_recovery"], metrics.calls.get("on_checkpoints_refused", []), partitions.owned[TP0].model_since

    # Inside the served model's span: replayed from the checkpoint, the span goes on.
    assert recovered(20, ModelSpan(served, 5)) == ([("checkpoint",)], [], 5)
    assert recovered(20, None) == ([("checkpoint",)], [], 5)  # no span said (an older commit): as before
    # The span started after the checkpoint (a switch back to this model whose checkpoint is missing),
    # or another model applied the readings: nothing is replayed across; zero state at the commit.
    assert recovered(20, ModelSpan(served, 10)) == ([("no_checkpoint",)], [(1,)], 10)
    assert recovered(20, ModelSpan("0" * 16, 0)) == ([("no_checkpoint",)], [(1,)], 20)
    # Nothing to replay: the checkpoint is taken whatever model applied the readings before it.
    assert recovered(5, ModelSpan("0" * 16, 0)) == ([("checkpoint",)], [], 5)
    # A span past the committed offset is of another history of the partition (its offsets went back).
    assert recovered(20, ModelSpan(served, 30)) == ([("checkpoint",)], [], 5)


def test_a_switch_to_another_shape_checkpoints_empty_rows_of_the_new_width(tmp_path: Path):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    partitions, _ = manager(engine, store, {TP0: 0})
    applied_and_committed(partitions, {TP0: 7}, {TP0: 7})
    assert engine.swap_model(make_bundle(input_size=2, hidden_size=4, num_layers=1, version="small"))
    partitions.model_switched()
    # After a crash, readings from 7 on are replayed under the new model from zero state, as served.
    loaded, refused = store.load_latest("readings", 0, engine.layout.width, 12, stamp_of(engine))
    assert refused == [] and loaded.offset == 7 and len(loaded.state) == 0 and loaded.model_version == "small"


def test_temporary_files_left_by_a_dead_writer_are_removed(tmp_path: Path):
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    store.save(checkpoint_of(engine, 0, 10))
    directory = tmp_path / "group" / "readings" / "0"
    dead, live = directory / f".{20:020d}.ckpt.999999.tmp", directory / f".{20:020d}.ckpt.999998.tmp"
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    old = time.time() - checkpoint_module.STALE_TMP_S - 60
    os.utime(dead, (old, old))
    store.save(checkpoint_of(engine, 0, 30))
    assert not dead.exists() and live.exists()


def test_directory_store_is_a_checkpoint_store_listing_offsets_newest_first(tmp_path: Path):
    from streamer.checkpoint import CheckpointStore

    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group", keep=2)
    assert isinstance(store, CheckpointStore)
    for offset in (3, 6, 9):
        store.save(checkpoint_of(engine, 0, offset))
    assert store.offsets("readings", 0) == [9, 6]
    assert store.offsets("readings", 1) == []
    store.close()


def test_pick_latest_refuses_what_cannot_be_read_and_takes_the_previous(tmp_path: Path):
    from streamer.checkpoint import pick_latest

    engine = stepped_engine()
    good = encode(checkpoint_of(engine, 0, 5))

    def unreadable() -> bytes:
        raise CheckpointError("k/10", "chunk k/10/00001 is missing")

    candidates = [(12, "k/12", lambda: good), (10, "k/10", unreadable), (5, "k/5", lambda: good)]
    loaded, refused = pick_latest(candidates, "readings", 0, engine.layout.width, max_offset=11)
    assert loaded is not None and loaded.offset == 5
    assert [(r.path, r.reason) for r in refused] == [("k/10", "chunk k/10/00001 is missing")]


class HeldStore(DirectoryCheckpointStore):
    """A directory store whose writes wait until released, one gate per write."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.started: list[tuple[int, int]] = []
        self.gates: list[threading.Event] = []
        self.fail_with: BaseException | None = None

    def save(self, checkpoint: Checkpoint):
        assert not self.gates or self.gates[-1].is_set(), "two writes at once"  # one thread at a time
        gate = threading.Event()
        self.gates.append(gate)
        self.started.append((checkpoint.partition, checkpoint.offset))
        assert gate.wait(10), "never released"
        if self.fail_with is not None:
            raise self.fail_with
        return super().save(checkpoint)

    def writes_started(self, count: int) -> list[tuple[int, int]]:
        """(partition, offset) of the writes started, once ``count`` have (and a moment for more)."""
        deadline = time.monotonic() + 10
        while len(self.started) < count:
            assert time.monotonic() < deadline, f"{len(self.started)} of {count} writes started"
            time.sleep(0.001)
        time.sleep(0.05)
        return list(self.started)

    def release_next(self) -> None:
        deadline = time.monotonic() + 10
        while not any(not g.is_set() for g in self.gates):
            assert time.monotonic() < deadline, "no write started"
            time.sleep(0.001)
        next(g for g in self.gates if not g.is_set()).set()


def batch_committed(partitions: PartitionManager, offset: int, readings: int = 5) -> None:
    """A batch reaching ``offset`` on both partitions, applied and committed; the checkpoint
    writer left to itself."""
    with partitions.lock:
        plan = partitions.plan({TP0: offset, TP1: offset}, {TP0: readings, TP1: readings})
        partitions.applied(plan)
    partitions.committed(plan)


def test_a_shutdown_whose_store_fails_stops_checkpointing_at_the_first_failure(tmp_path: Path, caplog):
    # Each write to a store whose brokers are away waits out its timeout (30 s in Kafka): a stop
    # had tried every partition, then every one again as the consumer closed (revoked).
    class Away(DirectoryCheckpointStore):
        tries = 0

        def save(self, checkpoint: Checkpoint) -> Path:
            Away.tries += 1
            raise OSError("the store's brokers are away")

    engine = stepped_engine()
    consumer = FakeConsumer({TP0: 0, TP1: 0})
    partitions = PartitionManager(consumer, engine, Away(tmp_path, "group"), CheckpointPolicy(3600, 10_000),
                                  Recorder(), clock=Clock())
    partitions.assign([TP0, TP1])
    partitions.recover_pending()
    batch_committed(partitions, 5)
    caplog.set_level(logging.WARNING)
    partitions.checkpoint_all()
    assert Away.tries == 1 and partitions.store is None
    assert any("no more checkpoints from this process" in r.getMessage() for r in caplog.records)
    partitions.close()
    partitions.release([TP0, TP1], checkpoint=True)  # the revocation as the consumer closes
    assert Away.tries == 1 and not partitions.owned


def with_a_write_in_flight(tmp_path: Path) -> tuple[PartitionManager, HeldStore, Recorder]:
    """Both partitions due after a batch to offset 5, and TP0's checkpoint held in the store."""
    engine = stepped_engine()
    store = HeldStore(tmp_path, "group")
    partitions, metrics = manager(engine, store, {TP0: 0, TP1: 0}, CheckpointPolicy(3600, 5))
    batch_committed(partitions, 5)
    assert store.writes_started(1) == [(0, 5)]
    return partitions, store, metrics


def test_a_slow_checkpoint_write_does_not_hold_the_loop_and_counts_once_done(tmp_path: Path):
    engine = stepped_engine()
    store = HeldStore(tmp_path, "group")
    clock = Clock()
    partitions, metrics = manager(engine, store, {TP0: 0, TP1: 0}, CheckpointPolicy(3600, 5), clock)
    for offset in (5, 10, 15):  # three batches, both partitions due from the first: the loop goes on
        clock.now += 1.0
        batch_committed(partitions, offset)
    # One write at a time: TP0's at offset 5 is in the store's hands, nothing else has started.
    assert store.writes_started(1) == [(0, 5)]
    owned = partitions.owned[TP0]
    assert owned.checkpoint_offset is None and partitions.checkpoint_lag()[("readings", 0)] == pytest.approx(2.0)
    store.release_next()
    partitions.settle_writes()
    # Counted once stored, at the offset it was taken at; the readings after it are still unsaved.
    assert owned.checkpoint_offset == 5 and owned.readings_since_checkpoint == 10
    assert partitions.checkpoint_lag()[("readings", 0)] == pytest.approx(2.0)  # taken at 1001, now 1003
    assert metrics.count("on_checkpoint") == 1
    # The loop's next turn hands over the next due partition: the one longest without a checkpoint.
    assert partitions.pump() and store.writes_started(2) == [(0, 5), (1, 15)]
    store.release_next()
    partitions.settle_writes()
    assert partitions.owned[TP1].checkpoint_offset == 15 and partitions.checkpoint_lag()[("readings", 1)] == 0.0


def test_revocation_waits_for_the_write_in_flight_then_writes_its_own(tmp_path: Path):
    partitions, store, _ = with_a_write_in_flight(tmp_path)
    revoker = threading.Thread(target=partitions.release, args=([TP1], True))
    revoker.start()
    revoker.join(0.2)
    assert revoker.is_alive() and store.started == [(0, 5)]  # waiting for TP0's write in flight ...
    store.release_next()
    assert store.writes_started(2) == [(0, 5), (1, 5)]  # ... then TP1's own,
    store.release_next()  # written before the revocation returns
    revoker.join(10)
    assert not revoker.is_alive() and store.started == [(0, 5), (1, 5)]
    assert int(store.paths("readings", 1)[0].stem) == 5 and TP1 not in partitions.owned


def test_a_write_that_fails_is_counted_on_the_loop_and_what_is_not_a_store_failure_is_raised(tmp_path: Path):
    partitions, store, metrics = with_a_write_in_flight(tmp_path)
    store.fail_with = OSError(errno.ENOSPC, "No space left on device")
    store.release_next()
    partitions.settle_writes()
    assert metrics.count("on_checkpoint_failed") == 1 and partitions.failures.failed == 1
    assert partitions.owned[TP0].checkpoint_offset is None and not partitions.pump()  # backing off
    partitions.failures.retry_at = 0.0
    store.fail_with = RuntimeError("a bug in the store")
    assert partitions.pump()
    store.release_next()
    # Not raised where it is waited for (a revocation hook: the client would swallow it, and the
    # partitions must still be released), but by the loop's next turn.
    partitions.release([TP1], checkpoint=False)
    partitions.settle_writes()
    assert TP1 not in partitions.owned
    with pytest.raises(RuntimeError, match="a bug in the store"):
        partitions.pump()


def test_after_close_checkpoints_are_written_at_once_and_closing_again_is_harmless(tmp_path: Path):
    # As the run loop stops: the writer is closed, then the consumer's close revokes what is owned.
    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group")
    partitions, _ = manager(engine, store, {TP0: 0, TP1: 0}, CheckpointPolicy(3600, 5))
    batch_committed(partitions, 5)
    partitions.close()
    partitions.close()
    assert partitions.owned[TP0].checkpoint_offset == 5  # the write in hand, accounted for
    done = threading.Thread(target=partitions.release, args=([TP0, TP1], True))
    done.start()
    done.join(10)
    assert not done.is_alive()
    assert [int(store.paths("readings", p)[0].stem) for p in (0, 1)] == [5, 5]


def test_a_lost_partition_does_not_wait_for_the_write_in_flight(tmp_path: Path):
    # Lost: the group moved on (the broker was away, say); nothing is written, so nothing waits.
    partitions, store, _ = with_a_write_in_flight(tmp_path)
    partitions.release([TP0, TP1], checkpoint=False)  # returns while TP0's write is held
    assert not partitions.owned
    store.release_next()
    partitions.settle_writes()
    assert partitions.pump() is False and int(store.paths("readings", 0)[0].stem) == 5


def test_a_partition_reset_with_its_write_in_flight_recovers_from_what_was_written(tmp_path: Path):
    # After an aborted transaction the partition is recovered again: recovery waits for the write
    # in flight, and that write, taken at a committed offset, is a checkpoint like any other.
    engine = stepped_engine()
    store = HeldStore(tmp_path, "group")
    consumer = FakeConsumer({TP0: 0, TP1: 0})
    partitions = PartitionManager(consumer, engine, store, CheckpointPolicy(3600, 5), Recorder(), clock=Clock())
    partitions.assign([TP0, TP1])
    partitions.recover_pending()
    batch_committed(partitions, 5)
    assert store.writes_started(1) == [(0, 5)]
    partitions.reset([TP0])
    consumer.committed_offsets[TP0] = 5
    recovering = threading.Thread(target=partitions.recover_pending)
    recovering.start()
    store.release_next()
    recovering.join(10)
    assert not recovering.is_alive() and partitions._writing == 0
    owned = partitions.owned[TP0]
    assert owned.checkpoint_offset == 5 and owned.writing is None and owned.next_offset == 5


def test_a_partition_revoked_as_an_aborted_batch_resets_its_partitions_is_left_alone(tmp_path: Path):
    # reset picked the owned partitions before taking the lock: a revocation on the client's
    # thread in between (made here by the lock itself, as it is taken) had been a KeyError.
    engine = stepped_engine()
    consumer = FakeConsumer({TP0: 0, TP1: 0})
    partitions = PartitionManager(consumer, engine, None, CheckpointPolicy(3600, 5), Recorder(), clock=Clock())
    partitions.assign([TP0, TP1])
    partitions.recover_pending()
    real = partitions.lock

    class RevokedAsTaken:
        def __enter__(self):
            partitions.lock = real
            partitions.release([TP0], checkpoint=False)  # the client's thread, just first
            return real.__enter__()

        def __exit__(self, *exc):
            return real.__exit__(*exc)

    partitions.lock = RevokedAsTaken()
    partitions.reset([TP0, TP1])
    assert TP0 not in partitions.owned and TP0 not in partitions.pending and partitions.pending == {TP1}


def test_a_checkpoint_whose_ids_are_inconsistent_is_refused_even_with_a_good_checksum():
    # Files a checksum does not catch (written so, or crafted): each is one CheckpointError.
    from streamer.engine import PartitionState

    def written(ids: list[str]) -> bytes:
        state = PartitionState(ids, np.zeros((len(ids), 3), np.float32), np.zeros(len(ids)))
        return encode(Checkpoint("readings", 0, 7, state, 3, "v1"))

    def resealed(body: bytes) -> bytes:
        return body + checkpoint_module.hashlib.sha256(body).digest()

    with pytest.raises(CheckpointError, match="appears twice"):
        decode(written(["a", "b", "a"]))
    good = written(["ab", "c"])[: -checkpoint_module.DIGEST_SIZE]
    with pytest.raises(CheckpointError, match="not UTF-8"):
        decode(resealed(good.replace(b"abc", b"\xffbc", 1)))
    lengths = np.asarray([2, 1], "<u4").tobytes()
    with pytest.raises(CheckpointError, match="add up to"):
        decode(resealed(good.replace(lengths, np.asarray([1, 1], "<u4").tobytes(), 1)))
    assert decode(resealed(good)).state.device_ids == ["ab", "c"]


@pytest.mark.parametrize("change", [
    lambda h: h.pop("topic"), lambda h: h.update(created=None), lambda h: h.update(partition="zero"),
    lambda h: h.update(offset=[1]),
])
def test_a_checkpoint_whose_header_another_writer_changed_is_refused_and_the_one_before_used(tmp_path: Path, change):
    """A file of a foreign or later writer that keeps the magic and a valid checksum but not the
    header's fields had raised KeyError / TypeError / ValueError out of recovery."""
    import hashlib
    import json
    import struct

    engine = stepped_engine()
    store = DirectoryCheckpointStore(tmp_path, "group", keep=3)
    store.save(stamped(engine, 0, 100))
    data = encode(stamped(engine, 0, 300))
    body = data[:-32]
    (length,) = struct.unpack_from("<I", body, len(checkpoint_module.MAGIC))
    at = len(checkpoint_module.MAGIC) + 4
    header = json.loads(body[at:at + length])
    change(header)
    text = json.dumps(header).encode()
    body = body[:len(checkpoint_module.MAGIC)] + struct.pack("<I", len(text)) + text + body[at + length:]
    forged = body + hashlib.sha256(body).digest()
    with pytest.raises(CheckpointError, match="bad header"):
        decode(forged, "forged")
    (store.root / "group" / "readings" / "0" / f"{300:020d}.ckpt").write_bytes(forged)
    loaded, refused = store.load_latest("readings", 0, engine.layout.width, 400)
    assert loaded is not None and loaded.offset == 100 and len(refused) == 1


def test_names_become_path_components_one_each_inside_the_store(tmp_path: Path):
    """"." and ".." had named the store's directory and its parent (a group id ".." wrote
    outside checkpoint.directory); "x€" and "x ac" had shared a directory; a group id of 210
    characters had made every save and load fail (ENAMETOOLONG), its partitions paused for good."""
    from streamer.checkpoint import _safe

    # Letters outside ASCII are kept, 2 to 4 bytes each: 150 of them (450 bytes) had failed every save.
    names = [".", "..", "x\u20ac", "x ac", "orders:" * 30, "orders:" * 30 + "x", "plain-name_1.0", "\u4e2d" * 150,
             "\u4e2d" * 151, "\u00e9" * 120]
    safe = [_safe(n) for n in names]
    assert len(set(safe)) == len(names) and all(s not in (".", "..") and len(s.encode()) <= 200 for s in safe[:-1]), safe
    assert _safe("plain-name_1.0") == "plain-name_1.0" and _safe("a b") == "a%20b"  # as before: paths kept
    # Every name that worked keeps its path: 240 bytes; 201 characters hashed by characters (201 bytes).
    import hashlib

    assert _safe("\u00e9" * 120) == "\u00e9" * 120
    long = "\u00e9" + "a" * 200
    assert _safe(long) == "\u00e9" + "a" * 134 + "~" + hashlib.sha256(long.encode()).hexdigest()
    # The Kafka store's keys have no byte limit: its prefixes are as they were, however many bytes.
    cjk = "\u4e2d" * 150
    assert _safe(cjk, max_bytes=None) == cjk and len(_safe(cjk).encode()) <= 200
    engine = stepped_engine()
    for group in ("..", "orders:" * 30, "\u4e2d" * 150, "\u00e9" * 200):
        store = DirectoryCheckpointStore(tmp_path / "root", group)
        store.save(stamped(engine, 0, 7))
        loaded, _ = store.load_latest("readings", 0, engine.layout.width, 10)
        assert loaded is not None and loaded.offset == 7
    assert not (tmp_path / "readings").exists()  # nothing outside the root
