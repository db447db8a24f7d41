"""Which input partitions this process owns, and their device state across rebalances and restarts.

Device rows belong to the partition their key maps to. On assignment a partition is paused
until the run loop recovers it: load its newest checkpoint at or below the group's committed
offset, seek there, and replay up to the committed offset with output suppressed (those
predictions were published before). Without a checkpoint it starts from the committed offset
with zero state, which is counted. On revocation its rows are checkpointed and freed; on loss
(the group moved on without us) they are freed without a checkpoint.

Checkpoints are written only for offsets the group has committed, so a checkpoint never runs
ahead of the group and replay never re-publishes what downstream has not seen.

Replay never crosses a model switch: every owned partition is checkpointed when the model
changes (``model_switched``), each checkpoint names the model that applies the readings after
it, and recovery refuses one of another model when readings would have to be replayed from it
(the devices then start from zero state, counted as ``no_checkpoint``). The offsets say it too:
each is committed with the model that applied the readings before it, and since which offset (a
ModelSpan), so that a switch whose checkpoint is missing (the store failed, the process died
first) is not replayed across either, whichever model the partition's next owner serves.

Checkpoints due while the loop runs are written by a thread of their own (CheckpointWriter): the
loop copies the partition's rows out and goes on, while encoding, hashing and fsync, tens of
milliseconds for a partition of 20k devices, happen beside it. One is written at a time;
partitions due meanwhile stay due and go next, one batch after another, so the cost is spread
and memory holds one partition's copy. A partition counts as checkpointed once its write is
done. Every other use of the store (recovery, revocation, a model switch, shutdown) first waits
for the write in flight, so the store is used by one thread at a time, and those checkpoints are
written before the loop goes on.

A checkpoint that cannot be written (a full disk) is retried with exponential backoff rather
than on every batch; a failure episode logs one line when it starts and one when checkpoints
work again, and every failed attempt is counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from streamer.checkpoint import Checkpoint, CheckpointStore, ModelSpan, ModelStamp, StoreUnreadable
from streamer.engine import Engine
from streamer.kafka.abstract import Committed, Consumer, GroupMovedOn, KafkaClientError, RebalanceHooks, TopicPartition
from streamer.metrics import Metrics

log = logging.getLogger(__name__)

BROKER_CALL_TIMEOUT_S = 30.0  # committed offsets and positions asked for during recovery
# One turn of the loop recovers partitions for about this long (at least one), the rest in the
# turns after: the loop polls in between, where the clients run the group's rebalances (a member
# that does not poll holds the group's rebalance up, and past max.poll.interval.ms leaves it).
RECOVERY_TURN_S = 5.0


@dataclass
class Owned:
    """An owned, recovered partition. next_offset: the next input offset after what the engine
    has applied; replay_until: offsets below it are replayed with output suppressed;
    committed_offset: the group's committed offset as this process knows it; unsaved_since:
    monotonic time since when applied readings (past the replay) are in no checkpoint;
    model_since: the offset since which the served model has applied the partition's readings
    (committed with its offsets, see ModelSpan)."""

    next_offset: int
    replay_until: int
    checkpoint_offset: int | None = None
    checkpoint_time: float = 0.0
    readings_since_checkpoint: int = 0
    replayed: int = 0
    committed_offset: int = 0
    unsaved_since: float | None = None
    writing: int | None = None  # offset of its checkpoint in the writer's hands
    writing_readings: int = 0  # readings_since_checkpoint when that checkpoint was taken
    writing_since: float = 0.0
    model_since: int = 0


@dataclass(frozen=True)
class CheckpointPolicy:
    """When partitions are due a checkpoint, and how a failing store is retried: after a failure
    no due checkpoint is tried for retry_initial_s, doubling per failure up to retry_max_s."""

    interval_s: float = 30.0
    interval_readings: int = 100_000
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0


@dataclass(frozen=True)
class BatchPlan:
    """What the partition manager decides for one batch, once, before it is stepped.

    next_offsets / readings: per partition of the batch, the offset after its last message and
    how many readings it decoded (a batch message counts its rows, a dead letter none). replay_until: for partitions still replaying, offsets below this
    are applied with their output suppressed (published before). commit: the offsets to commit
    once the batch's output is acknowledged (never below what the group has), each with its
    metadata (commit_metadata: a ModelSpan). checkpoint_due: the partitions to checkpoint once
    those offsets are committed.
    """

    next_offsets: Mapping[TopicPartition, int]
    readings: Mapping[TopicPartition, int]
    replay_until: Mapping[TopicPartition, int]
    commit: Mapping[TopicPartition, int]
    checkpoint_due: frozenset[TopicPartition]
    commit_metadata: Mapping[TopicPartition, str] = field(default_factory=lambda: MappingProxyType({}))

    def replayed(self, topic: str, partition: int, offset: int) -> bool:
        """Whether this message's output is suppressed (it was published before)."""
        return offset < self.replay_until.get(TopicPartition(topic, partition), -1)


@dataclass
class FailureEpisode:
    """Consecutive failed checkpoint writes, from the first failure to the next success."""

    initial_s: float
    max_s: float
    failed: int = 0  # attempts failed in this episode; 0: the store works
    started: float = 0.0
    retry_at: float = 0.0
    delay_s: float = 0.0

    def waiting(self, now: float) -> bool:
        """True while a failing store is in its backoff: due checkpoints wait."""
        return self.failed > 0 and now < self.retry_at

    def fail(self, now: float) -> bool:
        """Count a failed attempt and back off; True when it starts an episode."""
        first = self.failed == 0
        if first:
            self.started, self.delay_s = now, self.initial_s
        else:
            self.delay_s = min(self.max_s, self.delay_s * 2)
        self.failed += 1
        self.retry_at = now + self.delay_s
        return first

    def succeed(self) -> int:
        """End the episode; returns the attempts that failed in it (0: there was none)."""
        failed, self.failed = self.failed, 0
        return failed


@dataclass(frozen=True)
class Written:
    """A checkpoint the writer is done with: error None when it is stored."""

    tp: TopicPartition
    offset: int
    error: BaseException | None
    seconds: float


class CheckpointWriter:
    """Saves checkpoints to ``store`` on a thread of its own, in the order given. The partition
    manager hands it one at a time (its queue holds one more: a third would wait in submit)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._queue: queue.Queue[tuple[TopicPartition, Checkpoint] | None] = queue.Queue(maxsize=1)
        self._done: list[Written] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, tp: TopicPartition, checkpoint: Checkpoint) -> None:
        self._queue.put((tp, checkpoint))

    def drain(self) -> None:
        """Wait until every checkpoint submitted is stored or failed."""
        self._queue.join()

    def take(self) -> list[Written]:
        """The writes done since the last call, in order."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self, timeout_s: float) -> bool:
        """Stop after the writes in hand, waiting for them at most timeout_s; False when a write
        did not return by then (a store that hangs is left to the daemon thread)."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return False
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                tp, checkpoint = item
                started = time.perf_counter()
                try:
                    self.store.save(checkpoint)
                    error = None
                except BaseException as exc:  # handed to the loop by take()
                    error = exc
                with self._lock:
                    self._done.append(Written(tp, checkpoint.offset, error, time.perf_counter() - started))
            finally:
                self._queue.task_done()


class PartitionManager:
    def __init__(
        self,
        consumer: Consumer,
        engine: Engine,
        store: CheckpointStore | None,
        policy: CheckpointPolicy,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        progress: Callable[[], None] | None = None,
    ) -> None:
        """``progress``: called after each partition recovered or checkpointed on its way out (a
        rebalance of many big partitions takes minutes: the loop's liveness beat)."""
        self.consumer = consumer
        self.progress = progress or (lambda: None)
        if store is not None:
            store.progress = self.progress  # a long read of a big checkpoint beats as it goes
        self.engine = engine
        self.store = store
        self.writer = CheckpointWriter(store) if store is not None else None
        self._writing = 0  # checkpoints handed to the writer and not yet accounted for
        self._writer_error: BaseException | None = None  # not a store failure: raised by pump
        self.policy = policy
        self.metrics = metrics
        self.clock = clock
        self.failures = FailureEpisode(policy.retry_initial_s, policy.retry_max_s)
        # Computed at scrape time where metrics.py offers the hook (streamer_checkpoint_lag_seconds).
        watch = getattr(metrics, "watch_checkpoint_lag", None)
        if callable(watch):
            watch(self.checkpoint_lag)
        # Held while the engine's state changes: rebalance callbacks may run on a client's own
        # thread (kafka-python's IO thread) and must not checkpoint a partition while a batch
        # is being stepped.
        self.lock = threading.RLock()
        self.owned: dict[TopicPartition, Owned] = {}
        self.pending: set[TopicPartition] = set()
        self.restart_at: dict[TopicPartition, int] = {}  # see reset
        self._tried: dict[TopicPartition, float] = {}  # when a pending partition's recovery was last tried
        self._digest: tuple[object, str] | None = None  # (the engine's bundle, its stamp's digest)

    # --- rebalance callbacks (during Consumer.poll, possibly on the client's own thread) ---

    def hooks(self) -> RebalanceHooks:
        return RebalanceHooks(
            assigned=self.assign,
            revoked=lambda partitions: self.release(partitions, checkpoint=True),
            lost=lambda partitions: self.release(partitions, checkpoint=False),
        )

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        new = [tp for tp in partitions if tp not in self.owned]
        if not new:
            return
        # Nothing of these is processed before recovery has put their state and position right.
        self.consumer.pause(new)
        with self.lock:
            self.pending.update(new)
        log.info("assigned %s", _names(new))

    def release(self, partitions: Iterable[TopicPartition], checkpoint: bool) -> None:
        with self.lock:
            if checkpoint:  # a lost partition writes nothing: it does not wait for the store
                self.settle_writes()
            for tp in list(partitions):
                self.pending.discard(tp)
                self.restart_at.pop(tp, None)
                self._tried.pop(tp, None)
                owned = self.owned.pop(tp, None)
                if owned is None:
                    continue
                if checkpoint and self._committed_through(tp, owned, "revoked"):
                    self._save(tp, owned)
                    self.progress()
                dropped = self.engine.drop_partition(tp.partition)
                log.info("%s %s: %d devices freed", "revoked" if checkpoint else "lost", _name(tp), dropped,
                         extra=_context(tp))

    # --- run loop side ---

    def accepts(self, tp: TopicPartition) -> bool:
        return tp in self.owned

    def recover_pending(self) -> int:
        """Recover the partitions assigned since the last call (blocking: talks to the broker), for
        about RECOVERY_TURN_S, the rest at the next call; returns how many were recovered. One
        whose recovery fails for a while (the store or the broker: a retriable error) stays
        pending, and the others are recovered; the first such error is raised once all were
        tried."""
        if not self.pending:
            return 0
        with self.lock:
            self.settle_writes()  # the store is read below: nothing of it in flight
            # The least recently tried first: a turn that ends early (RECOVERY_TURN_S) after a
            # slow failure leaves the others for the next turn, which starts with them.
            pending = sorted(self.pending, key=lambda tp: (self._tried.get(tp, 0.0), tp))
        try:
            committed = self.consumer.committed_with_metadata(pending, BROKER_CALL_TIMEOUT_S)
        except GroupMovedOn as exc:
            # The coordinator answers for a group that is rebalancing: these partitions are tried
            # again a moment later, or revoked meanwhile (a GroupMovedOn is final for a commit only).
            raise KafkaClientError(str(exc), retriable=True, cause=exc) from exc
        failed: Exception | None = None
        recovered = 0
        turn = time.monotonic()
        for n, tp in enumerate(pending):
            if n and time.monotonic() - turn >= RECOVERY_TURN_S:
                break  # the rest at the next turn, after a poll
            with self.lock:
                if tp not in self.pending:
                    continue  # revoked again meanwhile
                self._tried[tp] = time.monotonic()
                try:
                    self._recover(tp, committed.get(tp))
                except (KafkaClientError, StoreUnreadable) as exc:
                    if isinstance(exc, KafkaClientError) and not exc.retriable:
                        raise
                    failed = failed or exc
                    self.progress()  # a try that waited out a call is no stuck loop either
                    continue
                self.pending.discard(tp)
                self._tried.pop(tp, None)
            self.consumer.resume([tp])
            self.progress()
            recovered += 1
        if failed is not None:
            raise failed
        return recovered

    def _recover(self, tp: TopicPartition, commit: Committed | None) -> None:
        # Kept until the partition is recovered: a recovery that fails (the store or the broker
        # away) is tried again from the same place, not from a fetch position past the batch.
        restart_at = self.restart_at.get(tp)
        committed = None if commit is None else commit.offset
        span = None if commit is None else ModelSpan.decode(commit.metadata)
        if span is not None and committed is not None and span.since > committed:
            span = None  # of another history of the partition (its offsets went back): says nothing
        if committed is not None:
            start: int | None = committed
        elif restart_at is not None:
            start = restart_at
        else:
            start = self.consumer.position(tp, BROKER_CALL_TIMEOUT_S)
        if start is None:
            raise KafkaClientError(f"no position for {_name(tp)} within {BROKER_CALL_TIMEOUT_S:.0f}s", retriable=True)
        self.engine.drop_partition(tp.partition)
        checkpoint = None
        stamp = self._model_stamp()
        if self.store is not None:
            checkpoint, refused = self.store.load_latest(
                tp.topic, tp.partition, self.engine.layout.width, start, stamp, span)
            if refused and self.metrics is not None:
                self.metrics.on_checkpoints_refused(len(refused))
            if committed is not None:
                self._discard_above(tp, committed)
        if checkpoint is not None:
            evicted = self.engine.restore_partition(tp.partition, checkpoint.state)
            capacity = self.engine.table.capacity
            if len(checkpoint.state) > capacity:
                log.warning(
                    "the checkpoint of %s holds %d devices, more than state.capacity (%d): the %d seen last are"
                    " restored, the others start from zero when seen again", _name(tp), len(checkpoint.state),
                    capacity, capacity, extra=_context(tp),
                )
            self.consumer.seek(tp, checkpoint.offset)
            owned = Owned(checkpoint.offset, start, checkpoint.offset, self.clock(), committed_offset=start,
                          model_since=_model_since(span, self._digest_of(), checkpoint.offset))
            outcome = "checkpoint"
            if checkpoint.model_version != stamp.version:
                # Another model's rows, carried over (same config, nothing to replay): from here on
                # this model applies the readings, and the checkpoint must say so, as a switch's
                # does. Left under the old name, a process of the group still serving the old
                # model (the file replaced, its next reload check not yet come) took it and
                # replayed this model's readings under the old one.
                self._save(tp, owned, rewrite=True)
            log.info(
                "recovered %s from checkpoint at offset %d (%d devices%s, model %s), replaying to %d",
                _name(tp), checkpoint.offset, len(checkpoint.state),
                f", {evicted} evicted for room" if evicted else "", checkpoint.model_version, start,
                extra=_context(tp),
            )
        else:
            self.consumer.seek(tp, start)
            owned = Owned(start, start, committed_offset=start,
                          model_since=_model_since(span, self._digest_of(), start))
            if committed is None:
                outcome = "fresh"  # the group never read this partition: zero state is right
                if self.store is not None:
                    self._save(tp, owned)  # recovery has a starting point from here on
            else:
                outcome = "no_checkpoint"
                log.warning("%s has no usable checkpoint: its devices start from zero at offset %d", _name(tp), start,
                            extra=_context(tp))
        self.owned[tp] = owned
        self.restart_at.pop(tp, None)
        if self.metrics is not None:
            self.metrics.on_recovery(outcome)

    def plan(self, next_offsets: dict[TopicPartition, int], readings: dict[TopicPartition, int]) -> BatchPlan:
        """The plan of a batch reaching ``next_offsets`` with ``readings`` decoded readings per partition.
        Call under ``lock``, right before the batch is stepped (then ``applied``)."""
        now = self.clock()
        self._apply_written()
        # Due (the batch's commit is not held back for the interval) only when a checkpoint can
        # start at that commit: not while the writer is busy or a failing store backs off.
        can_start = not self._writing and not self.failures.waiting(now)
        replay_until, commit, metadata, due = {}, {}, {}, set()
        model = self._digest_of()
        for tp, offset in next_offsets.items():
            owned = self.owned.get(tp)
            if owned is None:
                continue
            if owned.next_offset < owned.replay_until:
                replay_until[tp] = owned.replay_until
            if offset > owned.replay_until:
                commit[tp] = offset
                metadata[tp] = ModelSpan(model, owned.model_since).encode()
                if can_start and self._due(owned, now, readings.get(tp, 0)):
                    due.add(tp)
        return BatchPlan(
            MappingProxyType(dict(next_offsets)), MappingProxyType(dict(readings)), MappingProxyType(replay_until),
            MappingProxyType(commit), frozenset(due), MappingProxyType(metadata),
        )

    def applied(self, plan: BatchPlan) -> None:
        """The engine has applied everything before ``plan.next_offsets`` of these partitions."""
        for tp, offset in plan.next_offsets.items():
            owned = self.owned.get(tp)
            if owned is None:
                continue
            if owned.next_offset < owned.replay_until:
                # Messages, for the log line; the pipeline counts the replayed readings.
                owned.replayed += min(offset, owned.replay_until) - owned.next_offset
                if offset >= owned.replay_until:
                    log.info("%s caught up after replaying %d messages", _name(tp), owned.replayed, extra=_context(tp))
            if owned.unsaved_since is None and offset > max(owned.replay_until, owned.checkpoint_offset or 0):
                owned.unsaved_since = self.clock()
            owned.next_offset = offset
            owned.readings_since_checkpoint += plan.readings.get(tp, 0)

    def committed(self, plan: BatchPlan) -> None:
        """``plan.commit`` is committed: a partition due and applied no further than that is
        checkpointed next (see pump)."""
        with self.lock:
            for tp, offset in plan.commit.items():
                owned = self.owned.get(tp)
                if owned is not None:
                    owned.committed_offset = max(owned.committed_offset, offset)
            self.pump()

    def pump(self) -> bool:
        """Account for the writer's finished checkpoint; when it is idle, hand it the next one:
        the partition longest without one among those due whose applied offset is committed
        (a checkpoint never runs ahead of the group). None while a failing store backs off.
        Called after every commit and once a loop turn. True when it handed one over. A write
        that failed with what is not a store failure (OSError) is raised here, on the loop."""
        if self.writer is None:
            return False
        with self.lock:
            self._apply_written()
            if self._writer_error is not None:
                error, self._writer_error = self._writer_error, None
                raise error
            now = self.clock()
            if self._writing or self.failures.waiting(now):
                return False
            ready = [(owned.checkpoint_time, tp) for tp, owned in self.owned.items()
                     if owned.next_offset == owned.committed_offset and self._due(owned, now)
                     and not _covered(owned)]
            if not ready:
                return False
            tp = min(ready)[1]
            self._save(tp, self.owned[tp], wait=False)
            return True

    def _due(self, owned: Owned, now: float, readings: int = 0) -> bool:
        """Whether the policy asks for a checkpoint of this partition (``readings`` more applied)."""
        return self.store is not None and (
            now - owned.checkpoint_time >= self.policy.interval_s
            or owned.readings_since_checkpoint + readings >= self.policy.interval_readings
        )

    def replaying(self) -> int:
        """Owned partitions still replaying readings whose output was published before."""
        with self.lock:
            return sum(1 for owned in self.owned.values() if owned.next_offset < owned.replay_until)

    def checkpoint_all(self) -> None:
        """Checkpoint every owned partition (clean shutdown: tried even while backing off). The
        first write that fails ends it, and no checkpoint is written after it (the revocation
        as the consumer closes included): with the store's brokers away each write waits out its
        timeout (30 s in Kafka), and a stop had taken two of them per partition, minutes where a
        supervisor allows seconds. The partitions' next owners replay from their last checkpoints."""
        with self.lock:
            self.settle_writes()
            for tp, owned in self.owned.items():
                if self._committed_through(tp, owned, "stopping") and not self._save(tp, owned):
                    if self.store is not None:
                        log.warning("stopping: the checkpoint store failed, no more checkpoints from this process"
                                    " (the partitions' next owners replay from their last ones)")
                        self.store = None
                    return

    def discard(self, partitions: Iterable[TopicPartition]) -> None:
        """A step failed part-way: the engine's rows of these partitions may hold readings past
        their applied offset. Their rows are dropped and the partitions forgotten (call under
        ``lock``), so that no checkpoint is taken of them: their next owner, this process after a
        restart included, recovers them from their checkpoints and replays what they lack."""
        for tp in partitions:
            if self.owned.pop(tp, None) is not None:
                self.engine.drop_partition(tp.partition)
                log.warning("%s: its devices' state is dropped after a failed step; it is not checkpointed",
                            _name(tp), extra=_context(tp))

    def forget_unowned(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the rows a step just made for partitions this process no longer owns (revoked on
        the client's thread after the batch was polled; call under ``lock``): nothing of theirs is
        published or checkpointed, and their rows would hold table capacity until expiry. A
        partition assigned again and waiting for recovery is left to it (recovery drops them)."""
        for tp in partitions:
            if tp not in self.owned and tp not in self.pending:
                self.engine.drop_partition(tp.partition)

    def settle_writes(self) -> None:
        """Wait for the checkpoints in the writer's hands and account for them."""
        if self.writer is not None:
            with self.lock:
                self.writer.drain()
                self._apply_written()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the writer after the writes in hand (at most timeout_s) and account for them;
        checkpoints from here on (a revocation as the consumer closes) are written at once. A
        write still hanging then leaves the store to it: no more checkpoints are written."""
        if self.writer is not None:
            finished = self.writer.close(timeout_s)
            with self.lock:
                self._apply_written()
                self.writer = None
                if not finished:
                    log.warning("a checkpoint write did not return within %.0fs: no more checkpoints from this"
                                " process (the partitions' next owners replay from their last ones)", timeout_s)
                    self.store = None

    def model_switched(self) -> None:
        """The engine serves a new model from the next step on: checkpoint every owned partition
        at the offset the engine has applied, named after the new model, so that a recovery
        replays only readings the new model applied. Call after the batch in hand is committed
        and before the next one is stepped, under ``lock`` together with the swap. A partition
        whose applied offset the group has not committed (its commit was refused: the group is
        moving it) is left out; its next owner will not replay across the switch either (see
        CheckpointStore.load_latest)."""
        with self.lock:
            self.settle_writes()
            for tp, owned in self.owned.items():
                owned.model_since = owned.next_offset  # committed with its offsets from here on
                if self._committed_through(tp, owned, "at the model switch"):
                    self._save(tp, owned, rewrite=True)

    def _committed_through(self, tp: TopicPartition, owned: Owned, when: str) -> bool:
        """Whether the group has committed what the engine applied of ``tp``: checkpoints are
        taken only there. One ahead of the commit would be of no use to a recovery (it starts at
        the committed offset, and refuses those past it), and its save would prune the older ones
        that recovery needs (checkpoint.keep)."""
        if self.store is None or owned.next_offset <= owned.committed_offset:
            return True  # without a store nothing is written either way
        log.warning("%s not checkpointed %s: offset %d is not committed (%d is)", _name(tp), when,
                    owned.next_offset, owned.committed_offset, extra=_context(tp))
        return False

    def checkpoint_lag(self) -> dict[tuple[str, int], float]:
        """Per owned partition, seconds its applied readings have gone without a checkpoint:
        0 when its newest checkpoint includes everything applied (read at scrape time)."""
        now = self.clock()
        return {
            (tp.topic, tp.partition): 0.0 if owned.unsaved_since is None else now - owned.unsaved_since
            for tp, owned in list(self.owned.items())
        }

    def reset(self, partitions: Iterable[TopicPartition]) -> None:
        """Throw away these partitions' state and recover them again (after an aborted
        transaction: the engine applied readings whose output never became visible)."""
        with self.lock:  # the filter too: a revocation on the client's thread between them had been a KeyError
            partitions = [tp for tp in partitions if tp in self.owned]
            for tp in partitions:
                # Where it restarts when the group has no commit for it yet: the consumer's fetch
                # position is past the dropped batch by now, whose output nobody has seen.
                self.restart_at[tp] = self.owned.pop(tp).committed_offset
                self.engine.drop_partition(tp.partition)
        self.assign(partitions)

    def _discard_above(self, tp: TopicPartition, committed: int) -> None:
        """Delete the checkpoints of ``tp`` above the group's committed offset: no recovery can
        start from them, and those of an earlier history of the partition (its offsets reset, or
        the topic created anew) would be restored once the offsets pass them again. Housekeeping:
        a store that cannot do it now is told of in the log, and recovery goes on."""
        assert self.store is not None
        try:
            discarded = self.store.discard_above(tp.topic, tp.partition, committed)
        except (KafkaClientError, OSError) as exc:
            log.warning("%s: could not delete the checkpoints above the committed offset %d: %s", _name(tp),
                        committed, exc, extra=_context(tp))
            return
        if discarded:
            log.info("%s: deleted %d checkpoint(s) above the committed offset %d (offsets %s): written after a commit"
                     " that did not happen, or before the group's offsets went back", _name(tp), len(discarded),
                     committed, ", ".join(map(str, discarded)), extra=_context(tp))

    def _model_stamp(self) -> ModelStamp:
        """The served model's version and config, with its global normalisation when it has one:
        rows hold forecasts and statistics in its units, so a checkpoint written under another
        normalisation is another config's (Engine.swap_model resets the table for it too)."""
        config = self.engine.config.to_dict()
        normalization = self.engine.bundle.normalization
        if normalization is not None:
            config["normalization"] = {"mean": normalization.mean.tolist(), "std": normalization.std.tolist()}
        return ModelStamp.of(self.engine.model_version, config)

    def _digest_of(self) -> str:
        """The served model's ModelStamp digest, worked out once per model."""
        bundle = self.engine.bundle
        if self._digest is None or self._digest[0] is not bundle:
            self._digest = (bundle, self._model_stamp().digest())
        return self._digest[1]

    def _save(self, tp: TopicPartition, owned: Owned, rewrite: bool = False, wait: bool = True) -> bool:
        """Checkpoint ``tp`` at its applied offset; False when the store failed. ``rewrite``: also
        when a checkpoint at that offset exists or the partition is still replaying (a model
        switch: the checkpoint must name the model that applies the readings after it).
        wait=False: the rows are copied out here and handed to the writer (call with nothing of
        this partition in its hands); the outcome is accounted for by a later _apply_written."""
        if self.store is None:
            return False
        if not rewrite and _covered(owned):
            return True
        started = time.perf_counter()
        state = self.engine.export_partition(tp.partition)
        stamp = self._model_stamp()
        checkpoint = Checkpoint(
            tp.topic, tp.partition, owned.next_offset, state, self.engine.layout.width, stamp.version,
            model_config=stamp.config,
        )
        if not wait and self.writer is not None:
            owned.writing, owned.writing_readings, owned.writing_since = (
                owned.next_offset, owned.readings_since_checkpoint, self.clock())
            self._writing += 1
            self.writer.submit(tp, checkpoint)
            return True
        try:
            self.store.save(checkpoint)
        except OSError as exc:
            self._failed(tp, owned.next_offset, exc)
            return False
        self._saved(tp, owned, owned.next_offset, owned.readings_since_checkpoint, None,
                    time.perf_counter() - started)
        return True

    def _apply_written(self) -> None:
        """Account for the writer's finished checkpoints (on the loop's side of the lock). One
        whose partition left meanwhile still counts for the store's health and the metrics."""
        if self.writer is None:
            return
        for done in self.writer.take():
            self._writing -= 1
            owned = self.owned.get(done.tp)
            if owned is not None and owned.writing != done.offset:
                owned = None  # the partition left (and may be back): that write is not its own
            if owned is not None:
                owned.writing = None
            if done.error is None:
                self._saved(done.tp, owned, done.offset, owned.writing_readings if owned else 0,
                            owned.writing_since if owned else None, done.seconds)
            elif isinstance(done.error, OSError):
                self._failed(done.tp, done.offset, done.error)
            else:
                self._writer_error = self._writer_error or done.error

    def _saved(self, tp: TopicPartition, owned: Owned | None, offset: int, readings: int, taken_at: float | None,
               seconds: float) -> None:
        """``tp``'s checkpoint at ``offset`` is stored; it was taken when ``readings`` readings
        were unsaved, at ``taken_at`` (None: just now, nothing applied since). ``owned``: the
        partition, None when it has left since."""
        failed = self.failures.succeed()
        if failed:
            log.warning(
                "checkpoints are written again (%s at offset %d) after %d failed attempts over %.1fs",
                _name(tp), offset, failed, self.clock() - self.failures.started, extra=_context(tp),
            )
        if self.metrics is not None:
            self.metrics.on_checkpoint(seconds)
        if owned is None:
            return
        owned.checkpoint_offset = offset
        owned.checkpoint_time = self.clock()
        owned.readings_since_checkpoint = max(0, owned.readings_since_checkpoint - readings)
        # Readings applied after the checkpoint was taken were applied after taken_at.
        owned.unsaved_since = None if owned.next_offset == offset else taken_at

    def _failed(self, tp: TopicPartition, offset: int, exc: OSError) -> None:
        """One failed write: counted always, logged only when it starts a failure episode."""
        if self.failures.fail(self.clock()):
            log.error(
                "checkpoint of %s at offset %d failed: %s; retrying in %.0fs, backing off up to %.0fs"
                " (further failures: streamer_checkpoint_failures_total, debug log)",
                _name(tp), offset, exc, self.failures.delay_s, self.failures.max_s, extra=_context(tp),
            )
        else:
            log.debug("checkpoint of %s at offset %d failed again: %s", _name(tp), offset, exc, extra=_context(tp))
        if self.metrics is not None:
            self.metrics.on_checkpoint_failed()


def _model_since(span: ModelSpan | None, model: str, start: int) -> int:
    """Since which offset the served model (digest ``model``) has applied a partition recovered
    at ``start`` (the checkpoint's offset, or the committed one without a checkpoint): since the
    committed span's start when that span is this model's, else since ``start``."""
    return span.since if span is not None and span.model == model else start


def _covered(owned: Owned) -> bool:
    """Whether the partition's last checkpoint serves as one at its applied offset: it is at that
    offset, or the partition is still replaying from it (the checkpoint started from is as good)."""
    return owned.checkpoint_offset == owned.next_offset or (
        owned.next_offset < owned.replay_until and owned.checkpoint_offset is not None
    )


def _name(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _context(tp: TopicPartition) -> dict[str, object]:
    """A log record's context fields (run.log_format = "json") for one partition."""
    return {"topic": tp.topic, "partition": tp.partition}


def _names(tps: Iterable[TopicPartition]) -> str:
    return ", ".join(_name(tp) for tp in sorted(tps))
