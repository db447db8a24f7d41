"""Which input partitions this process owns, and their device state across rebalances and restarts.

Device rows belong to the partition their key maps to. On assignment a partition is paused
until the run loop recovers it: load its newest checkpoint at or below the group's committed
offset, seek there, and replay up to the committed offset with output suppressed (those
predictions were published before). Without a checkpoint it starts from the committed offset
with zero state, which is counted. On revocation its rows are checkpointed and freed; on loss
(the group moved on without us) they are freed without a checkpoint.

Checkpoints are written only for offsets the group has committed, so a checkpoint never runs
ahead of the group and replay never re-publishes what downstream has not seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamer.checkpoint import Checkpoint, DirectoryCheckpointStore
from streamer.engine import Engine
from streamer.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Owned:
    """An owned, recovered partition. next_offset: the next input offset after what the engine
    has applied; replay_until: offsets below it are replayed with output suppressed."""

    next_offset: int
    replay_until: int
    checkpoint_offset: int | None = None
    checkpoint_time: float = 0.0
    readings_since_checkpoint: int = 0
    replayed: int = 0


@dataclass(frozen=True)
class CheckpointPolicy:
    interval_s: float = 30.0
    interval_readings: int = 100_000


class PartitionManager:
    def __init__(
        self,
        consumer: KafkaConsumer,
        engine: Engine,
        store: DirectoryCheckpointStore | None,
        policy: CheckpointPolicy,
        metrics: Metrics | None = None,
    ) -> None:
        self.consumer = consumer
        self.engine = engine
        self.store = store
        self.policy = policy
        self.metrics = metrics
        # Held while the engine's state changes: rebalance callbacks run on kafka-python's IO
        # thread and must not checkpoint a partition while a batch is being stepped.
        self.lock = threading.RLock()
        self.owned: dict[TopicPartition, Owned] = {}
        self.pending: set[TopicPartition] = set()

    # --- rebalance callbacks (kafka-python's IO thread, while the run loop is inside poll) ---

    def listener(self) -> ConsumerRebalanceListener:
        manager = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
                manager.release(revoked, checkpoint=True)

            def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
                manager.assign(assigned)

            def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
                manager.release(lost, checkpoint=False)

        return Listener()

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        new = [tp for tp in partitions if tp not in self.owned]
        if not new:
            return
        # Nothing of these is processed before recovery has put their state and position right.
        self.consumer.pause(*new)
        with self.lock:
            self.pending.update(new)
        log.info("assigned %s", _names(new))

    def release(self, partitions: Iterable[TopicPartition], checkpoint: bool) -> None:
        with self.lock:
            for tp in list(partitions):
                self.pending.discard(tp)
                owned = self.owned.pop(tp, None)
                if owned is None:
                    continue
                if checkpoint:
                    self._save(tp, owned)
                dropped = self.engine.drop_partition(tp.partition)
                log.info("%s %s: %d devices freed", "revoked" if checkpoint else "lost", _name(tp), dropped)

    # --- run loop side ---

    def accepts(self, tp: TopicPartition) -> bool:
        return tp in self.owned

    def recover_pending(self) -> None:
        """Recover every partition assigned since the last call (blocking: talks to the broker)."""
        if not self.pending:
            return
        with self.lock:
            pending = sorted(self.pending)
        committed = {tp: self.consumer.committed(tp) for tp in pending}
        for tp in pending:
            with self.lock:
                if tp not in self.pending:
                    continue  # revoked again meanwhile
                self._recover(tp, committed.get(tp))
                self.pending.discard(tp)
            self.consumer.resume(tp)

    def _recover(self, tp: TopicPartition, committed: int | None) -> None:
        start = committed if committed is not None else self.consumer.position(tp)
        self.engine.drop_partition(tp.partition)
        checkpoint = None
        if self.store is not None:
            checkpoint, refused = self.store.load_latest(tp.topic, tp.partition, self.engine.layout.width, start)
            if refused and self.metrics is not None:
                self.metrics.on_checkpoints_refused(len(refused))
        if checkpoint is not None:
            evicted = self.engine.restore_partition(tp.partition, checkpoint.state)
            self.consumer.seek(tp, checkpoint.offset)
            owned = Owned(checkpoint.offset, start, checkpoint.offset, time.monotonic())
            outcome = "checkpoint"
            log.info(
                "recovered %s from checkpoint at offset %d (%d devices%s), replaying to %d",
                _name(tp), checkpoint.offset, len(checkpoint.state),
                f", {evicted} evicted for room" if evicted else "", start,
            )
        else:
            self.consumer.seek(tp, start)
            owned = Owned(start, start)
            if committed is None:
                outcome = "fresh"  # the group never read this partition: zero state is right
                if self.store is not None:
                    self._save(tp, owned)  # recovery has a starting point from here on
            else:
                outcome = "no_checkpoint"
                log.warning("%s has no usable checkpoint: its devices start from zero at offset %d", _name(tp), start)
        self.owned[tp] = owned
        if self.metrics is not None:
            self.metrics.on_recovery(outcome)

    def replay_bounds(self) -> dict[TopicPartition, int]:
        """replay_until of the partitions still replaying (offsets below it: output suppressed)."""
        return {tp: o.replay_until for tp, o in self.owned.items() if o.next_offset < o.replay_until}

    def applied(self, next_offsets: dict[TopicPartition, int], readings: dict[TopicPartition, int]) -> None:
        """The engine has applied everything before ``next_offsets`` of these partitions."""
        for tp, offset in next_offsets.items():
            owned = self.owned.get(tp)
            if owned is None:
                continue
            if owned.next_offset < owned.replay_until:
                replayed = min(offset, owned.replay_until) - owned.next_offset
                owned.replayed += replayed
                if self.metrics is not None:
                    self.metrics.on_replayed(replayed)
                if offset >= owned.replay_until:
                    log.info("%s caught up after replaying %d messages", _name(tp), owned.replayed)
            owned.next_offset = offset
            owned.readings_since_checkpoint += readings.get(tp, 0)

    def offsets_to_commit(self, next_offsets: dict[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
        """Offsets of a batch worth committing: never below what the group already has."""
        result = {}
        for tp, offset in next_offsets.items():
            owned = self.owned.get(tp)
            if owned is not None and offset > owned.replay_until:
                result[tp] = OffsetAndMetadata(offset, "", -1)
        return result

    def committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """These offsets are committed: checkpoint the partitions that are due."""
        if self.store is None:
            return
        now = time.monotonic()
        with self.lock:
            for tp in offsets:
                owned = self.owned.get(tp)
                if owned is None or owned.next_offset != offsets[tp].offset:
                    continue
                due = (
                    now - owned.checkpoint_time >= self.policy.interval_s
                    or owned.readings_since_checkpoint >= self.policy.interval_readings
                )
                if due:
                    self._save(tp, owned)

    def checkpoint_all(self) -> None:
        """Checkpoint every owned partition (clean shutdown)."""
        with self.lock:
            for tp, owned in self.owned.items():
                self._save(tp, owned)

    def reset(self, partitions: Iterable[TopicPartition]) -> None:
        """Throw away these partitions' state and recover them again (after an aborted
        transaction: the engine applied readings whose output never became visible)."""
        partitions = [tp for tp in partitions if tp in self.owned]
        with self.lock:
            for tp in partitions:
                self.owned.pop(tp)
                self.engine.drop_partition(tp.partition)
        self.assign(partitions)

    def _save(self, tp: TopicPartition, owned: Owned) -> None:
        if self.store is None or owned.checkpoint_offset == owned.next_offset:
            return
        if owned.next_offset < owned.replay_until and owned.checkpoint_offset is not None:
            return  # still replaying: the checkpoint we started from is as good
        started = time.perf_counter()
        state = self.engine.export_partition(tp.partition)
        checkpoint = Checkpoint(
            tp.topic, tp.partition, owned.next_offset, state, self.engine.layout.width, self.engine.model_version
        )
        try:
            self.store.save(checkpoint)
        except OSError as exc:
            log.error("checkpoint of %s at offset %d failed: %s", _name(tp), owned.next_offset, exc)
            if self.metrics is not None:
                self.metrics.on_checkpoint_failed()
            return
        owned.checkpoint_offset = owned.next_offset
        owned.checkpoint_time = time.monotonic()
        owned.readings_since_checkpoint = 0
        if self.metrics is not None:
            self.metrics.on_checkpoint(time.perf_counter() - started)


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(_name(tp) for tp in sorted(tps))
