#!/usr/bin/env python3
"""What a checkpoint of BENCH_DEVICES (100000) devices costs in each checkpoint store: one JSON
object per figure.

The checkpoint is one input partition's state under a model of hidden 64 x 2 layers, 1 feature
(the row width an Engine of that model has), device ids like "sensor-000123", random rows.
Stores: directory (a local temporary directory, fsync on), and kafka with each client (a
compacted changelog topic of 1 partition, chunks of checkpoint.chunk_bytes' default).
Figures per store: checkpoint_bytes (the encoded checkpoint), stored_bytes (the file; or the
changelog records' keys and values, chunks and manifest), records, save_s (write, acknowledged
and pruned) and load_s (a fresh store: for kafka, indexing the changelog partition and reading
the chunks back; verified and decoded), the median of BENCH_ROUNDS (3) rounds.
KAFKA_BOOTSTRAP_SERVERS uses a running broker; else deploy/kafka/local-kafka is started on free
ports (as tests/integration/conftest.py does) and stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kafka_clients import emit, start_broker, stop_broker  # noqa: E402  (bench/, this script's folder, is on sys.path)
from streamer.checkpoint import Checkpoint, CheckpointStore, DirectoryCheckpointStore, encode  # noqa: E402
from streamer.checkpoint_kafka import KafkaCheckpointStore  # noqa: E402
from streamer.engine import Engine, PartitionState  # noqa: E402
from streamer.kafka import ensure_topics, open_changelog  # noqa: E402
from streamer.kafka.clients import TopicSpec  # noqa: E402
from streamer.kafka.topics import COMPACT  # noqa: E402
from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file  # noqa: E402
from streamer.settings import CheckpointSettings, KafkaSettings  # noqa: E402

DEVICES = int(os.environ.get("BENCH_DEVICES", "100000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
HIDDEN, LAYERS, FEATURES = 64, 2, 1
CHUNK_BYTES = CheckpointSettings().chunk_bytes


def row_width(workdir: Path) -> int:
    config = ModelConfig(FEATURES, HIDDEN, LAYERS, FEATURES)
    path = workdir / "model.pt"
    save_model_file(path, init_random_model(config, seed=0), config, "bench")
    return Engine.build(load_model_file(path), capacity=1, device="cpu").layout.width


def checkpoint_of(offset: int, width: int) -> Checkpoint:
    rng = np.random.default_rng(offset)
    state = PartitionState(
        [f"sensor-{d:06d}" for d in range(DEVICES)],
        rng.normal(size=(DEVICES, width)).astype(np.float32),
        rng.uniform(1.7e9, 1.8e9, DEVICES),
    )
    return Checkpoint("readings", 0, offset, state, width, "bench", created=1.7e9)


def measure(name: str, open_store, stored_bytes, width: int) -> None:
    saves, loads, stored, records = [], [], 0, 0
    for round_ in range(ROUNDS):
        checkpoint = checkpoint_of(1000 * (round_ + 1), width)
        store: CheckpointStore = open_store()
        try:
            started = time.perf_counter()
            store.save(checkpoint)
            saves.append(time.perf_counter() - started)
            stored, records = stored_bytes(store, checkpoint)
        finally:
            store.close()
        fresh: CheckpointStore = open_store()
        try:
            started = time.perf_counter()
            loaded, refused = fresh.load_latest("readings", 0, width)
            loads.append(time.perf_counter() - started)
        finally:
            fresh.close()
        assert loaded is not None and not refused and loaded.offset == checkpoint.offset, (name, refused)
        assert np.array_equal(loaded.state.rows, checkpoint.state.rows)
    emit(store=name, devices=DEVICES, width=width, checkpoint_bytes=len(encode(checkpoint)), stored_bytes=stored,
         records=records, save_s=round(statistics.median(saves), 4), load_s=round(statistics.median(loads), 4),
         rounds=ROUNDS)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="streamer-bench-ckpt-"))
    bootstrap, broker_env = start_broker()
    try:
        width = row_width(workdir)
        root = workdir / "checkpoints"

        def file_bytes(store: DirectoryCheckpointStore, checkpoint: Checkpoint) -> tuple[int, int]:
            return store.paths("readings", 0)[0].stat().st_size, 1

        measure("directory", lambda: DirectoryCheckpointStore(root, "bench"), file_bytes, width)
        for client in ("kafka-python", "confluent-kafka"):
            topic = f"bench-checkpoints-{uuid.uuid4().hex[:8]}"
            ensure_topics(bootstrap, {topic: TopicSpec(1, 1, dict(COMPACT))})
            settings = KafkaSettings(bootstrap_servers=bootstrap, client=client)

            def open_store() -> KafkaCheckpointStore:
                return KafkaCheckpointStore(open_changelog(settings, topic, CHUNK_BYTES, 30_000), "bench",
                                            chunk_bytes=CHUNK_BYTES)

            def log_bytes(store: KafkaCheckpointStore, checkpoint: Checkpoint) -> tuple[int, int]:
                at = store.changelog_partition("readings", 0)
                end = store.changelog.end_offset(at, 30)
                prefix = store._key("readings", 0, checkpoint.offset, "").encode()
                sizes = [len(m.key) + len(m.value) for m in store.changelog.read(at, 0, end, 60)
                         if m.key.startswith(prefix) and m.value is not None]
                return sum(sizes), len(sizes)

            measure(f"kafka ({client})", open_store, log_bytes, width)
    finally:
        stop_broker(broker_env)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
