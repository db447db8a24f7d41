from pathlib import Path

import numpy as np
import pytest

from streamer.checkpoint import Checkpoint, CheckpointError, DirectoryCheckpointStore, decode, encode
from streamer.engine import Engine, ReadingBatch
from tests.conftest import make_bundle


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
