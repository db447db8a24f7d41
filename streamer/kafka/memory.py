"""An in-process broker with a Consumer and Producer over it, for driving the run loop in unit
tests without Kafka (as getsentry/arroyo's LocalBroker does). Not a kafka.client choice.

What it keeps of Kafka's contract: per-partition logs and offsets, one consumer group's committed
offsets, rebalance hooks run inside ``poll`` (or at once, as a client's own thread would), commits
of partitions not assigned to the member refused (GroupMovedOn), deliveries acknowledged only by
``flush``, and transactions whose messages and offsets become visible together on commit. What
it leaves out: replication, timing, more than one member's assignment logic.

``MemoryChangelog`` is a Changelog (a checkpoint store's compacted topic) over one of its topics,
with ``compact`` doing what the log cleaner would.

Every call that changes something is appended to ``MemoryBroker.journal`` as a tuple, so a test
can read the order of produce, flush, commit and transaction calls. ``away`` makes the broker
unreachable (flush returns False, commits and offset requests fail retriably); ``fail`` makes the
next call of a name raise the error given.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

from streamer.kafka.abstract import (
    BrokerTimeout,
    Changelog,
    CommitMetadata,
    Committed,
    Consumer,
    GroupMovedOn,
    Headers,
    KafkaClientError,
    Message,
    Producer,
    RebalanceHooks,
    TopicPartition,
)


class MemoryBroker:
    def __init__(self) -> None:
        self.topics: dict[str, list[list[Message]]] = {}
        self.committed: dict[tuple[str, TopicPartition], int] = {}
        self.commit_metadata: dict[tuple[str, TopicPartition], str] = {}  # committed with those offsets
        self.journal: list[tuple] = []
        self.away = False
        self.rejected_topics: set[str] = set()  # deliveries to these fail
        self._failures: dict[str, list[BaseException]] = {}
        self._timestamp = 0

    def create_topic(self, name: str, partitions: int) -> None:
        self.topics.setdefault(name, [[] for _ in range(partitions)])

    def partitions(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in range(len(self.topics[topic]))]

    def append(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> Message:
        """Write one message (partition by the key's CRC-32, as a keyed producer would)."""
        self.create_topic(topic, 1)
        logs = self.topics[topic]
        partition = zlib.crc32(key) % len(logs) if key is not None else 0
        self._timestamp += 1
        message = Message(topic, partition, len(logs[partition]), key, value, list(headers or []), self._timestamp)
        logs[partition].append(message)
        return message

    def messages(self, topic: str) -> list[Message]:
        return [m for log in self.topics.get(topic, []) for m in log]

    def fail(self, call: str, error: BaseException, times: int = 1) -> None:
        """The next ``times`` calls named ``call`` (e.g. "commit", "commit_transaction") raise ``error``."""
        self._failures.setdefault(call, []).extend([error] * times)

    def commit(self, group: str, offsets: Mapping[TopicPartition, int], metadata: CommitMetadata | None) -> None:
        """The group's offsets, each with its metadata ("" where none is given), as Kafka keeps them."""
        for tp, offset in offsets.items():
            self.committed[(group, tp)] = offset
            self.commit_metadata[(group, tp)] = (metadata or {}).get(tp, "")

    def _check(self, call: str) -> None:
        failures = self._failures.get(call)
        if failures:
            raise failures.pop(0)

    def _reachable(self, call: str) -> None:
        if self.away:
            raise BrokerTimeout(f"{call}: the broker is away")


class MemoryConsumer(Consumer):
    """One member of ``group``: assigned every partition of its topics at its first poll."""

    def __init__(self, broker: MemoryBroker, group: str, auto_offset_reset: str = "earliest") -> None:
        self.broker = broker
        self.group = group
        self.auto_offset_reset = auto_offset_reset
        self.generation = 0
        self.hooks: RebalanceHooks | None = None
        self.topics: list[str] = []
        self.assigned: set[TopicPartition] = set()
        self.paused: set[TopicPartition] = set()
        self.positions: dict[TopicPartition, int] = {}
        self._joined = False
        self._queued: list[tuple[str, list[TopicPartition]]] = []

    # --- driving it from a test ---

    def rebalance(self, assigned: Iterable[TopicPartition] = (), revoked: Iterable[TopicPartition] = (),
                  lost: Iterable[TopicPartition] = ()) -> None:
        """Queue a rebalance for the next poll (revocations first, then assignments)."""
        for kind, partitions in (("lost", lost), ("revoked", revoked), ("assigned", assigned)):
            if partitions := list(partitions):
                self._queued.append((kind, partitions))

    def rebalance_now(self, revoked: Iterable[TopicPartition] = (), lost: Iterable[TopicPartition] = ()) -> None:
        """Take partitions away at once, as a client whose rebalancing runs on its own thread does."""
        for kind, partitions in (("lost", list(lost)), ("revoked", list(revoked))):
            if partitions:
                self._apply(kind, partitions)

    def _apply(self, kind: str, partitions: list[TopicPartition]) -> None:
        assert self.hooks is not None
        self.generation += 1
        self.broker.journal.append((kind, tuple(sorted(partitions))))
        if kind == "assigned":
            self.assigned.update(partitions)
            self.hooks.assigned(partitions)
        else:
            if kind == "revoked":  # still assigned during the hook, as the clients do: it may commit
                self.hooks.revoked(partitions)
            self.assigned.difference_update(partitions)
            self.paused.difference_update(partitions)
            for tp in partitions:
                self.positions.pop(tp, None)
            if kind == "lost":
                self.hooks.lost(partitions)

    # --- Consumer ---

    def subscribe(self, topics: Sequence[str], hooks: RebalanceHooks) -> None:
        self.topics, self.hooks = list(topics), hooks

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        if not self._joined and self.hooks is not None:
            self._joined = True
            for topic in self.topics:
                self.broker.create_topic(topic, 1)
            self._queued.insert(0, ("assigned", [tp for t in self.topics for tp in self.broker.partitions(t)]))
        while self._queued:
            self._apply(*self._queued.pop(0))
        if self.broker.away:
            return []
        polled: list[Message] = []
        for tp in sorted(self.assigned - self.paused):
            log = self.broker.topics[tp.topic][tp.partition]
            start = self.position(tp, 0)
            assert start is not None
            taken = log[start:start + max_records - len(polled)]
            polled.extend(taken)
            self.positions[tp] = start + len(taken)
        return polled

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self.paused.update(partitions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self.paused.difference_update(partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.broker._check("seek")
        self.positions[partition] = offset

    def committed_with_metadata(
        self, partitions: Sequence[TopicPartition], timeout_s: float,
    ) -> dict[TopicPartition, Committed | None]:
        self.broker._check("committed")
        self.broker._reachable("committed")
        committed = {tp: self.broker.committed.get((self.group, tp)) for tp in partitions}
        return {tp: None if o is None else Committed(o, self.broker.commit_metadata.get((self.group, tp), ""))
                for tp, o in committed.items()}

    def position(self, partition: TopicPartition, timeout_s: float) -> int | None:
        if partition in self.positions:
            return self.positions[partition]
        return 0 if self.auto_offset_reset == "earliest" else len(self.broker.topics[partition.topic][partition.partition])

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: CommitMetadata | None = None) -> None:
        self.broker._check("commit")
        if self.broker.away:
            raise KafkaClientError("commit: the broker is away", retriable=True)
        moved = set(offsets) - self.assigned
        if moved:
            raise GroupMovedOn(f"commit: {sorted(moved)} are not assigned to this member")
        self.broker.commit(self.group, offsets, metadata)
        self.broker.journal.append(("commit", dict(offsets)))

    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_s: float) -> dict[TopicPartition, int]:
        self.broker._reachable("end offsets")
        return {tp: len(self.broker.topics[tp.topic][tp.partition]) for tp in partitions if tp.topic in self.broker.topics}

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.broker.topics[partition.topic][partition.partition]) if partition.topic in self.broker.topics else None

    def group_metadata(self) -> object:
        return (self, self.generation)

    def close(self, timeout_s: float = 0.0) -> None:
        # Both clients revoke what is assigned as they close, through the hooks (the loop's last
        # checkpoints and commits): a close that skipped it had left that path untested.
        if self.hooks is not None and self.assigned:
            self._apply("revoked", sorted(self.assigned))
        self.broker.journal.append(("close consumer",))


class MemoryProducer(Producer):
    def __init__(self, broker: MemoryBroker, name: str = "producer") -> None:
        self.broker = broker
        self.name = name
        self._queued: list[tuple[str, bytes | None, bytes | None, Headers | None]] = []
        self._failures: list[BaseException] = []
        self._transaction: list[tuple[str, bytes | None, bytes | None, Headers | None]] | None = None
        self._offsets: tuple[object, dict[TopicPartition, int], dict[TopicPartition, str]] | None = None
        self.closed = False

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        assert not self.closed, "produce on a closed producer"
        self._queued.append((topic, key, value, headers))

    def flush(self, timeout_s: float) -> bool:
        if self.broker.away:
            return False
        sent, self._queued = self._queued, []
        delivered = 0
        for topic, key, value, headers in sent:
            if topic in self.broker.rejected_topics:
                self._failures.append(KafkaClientError(f"delivery to {topic} failed"))
            elif self._transaction is not None:
                self._transaction.append((topic, key, value, headers))
            else:
                self.broker.append(topic, key, value, headers)
                delivered += 1
        self.broker.journal.append(("flush", self.name, delivered))
        return True

    def delivery_failures(self) -> list[BaseException]:
        failures, self._failures = self._failures, []
        return failures

    def begin_transaction(self) -> None:
        assert self._transaction is None, "a transaction is open already"
        self._transaction = []
        self.broker.journal.append(("begin_transaction", self.name))

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: object,
        metadata: CommitMetadata | None = None,
    ) -> None:
        self.broker._check("send_offsets_to_transaction")
        self._offsets = (group_metadata, dict(offsets), dict(metadata or {}))
        self.broker.journal.append(("send_offsets_to_transaction", self.name, dict(offsets)))

    def commit_transaction(self) -> None:
        assert self._transaction is not None, "no transaction open"
        self.broker._check("commit_transaction")
        # As the clients do: a commit flushes first, and a send that failed, or a broker that does
        # not answer, fails the commit (the transaction must be aborted).
        if not self.flush(0):
            raise BrokerTimeout("commit_transaction: the broker is away")
        if self._failures:
            failures, self._failures = self._failures, []
            raise KafkaClientError(f"commit_transaction: {len(failures)} sends of the transaction failed"
                                   f" (first: {failures[0]})")
        if self._offsets is not None:
            (consumer, generation), offsets, metadata = self._offsets  # type: ignore[misc]
            if consumer.generation != generation or set(offsets) - consumer.assigned:
                raise GroupMovedOn("commit_transaction: the group moved on since the batch's group metadata")
        for message in self._transaction:
            self.broker.append(*message)
        if self._offsets is not None:
            self.broker.commit(consumer.group, offsets, metadata)
        self.broker.journal.append(("commit_transaction", self.name, len(self._transaction)))
        self._transaction, self._offsets = None, None

    def abort_transaction(self) -> None:
        self._queued, self._transaction, self._offsets = [], None, None
        self.broker.journal.append(("abort_transaction", self.name))

    def close(self, timeout_s: float = 0.0) -> None:
        self.closed = True
        self.broker.journal.append(("close producer", self.name))


class MemoryChangelog(Changelog):
    """A Changelog over ``broker``'s topic ``topic`` (created with ``partitions`` partitions);
    ``compact()`` keeps each key's last record and drops tombstones, leaving gaps in the offsets
    as Kafka's log cleaner does. Unreachable while the broker is ``away``."""

    def __init__(self, broker: MemoryBroker, topic: str = "changelog", partitions: int = 1) -> None:
        self.broker = broker
        self.topic = topic
        broker.create_topic(topic, partitions)
        self._end = [0] * len(broker.topics[topic])

    def partition_count(self, timeout_s: float) -> int:
        self.broker._reachable("partition_count")
        return len(self._end)

    def end_offset(self, partition: int, timeout_s: float) -> int:
        self.broker._reachable("end_offset")
        return self._end[partition]

    def read(self, partition: int, start: int, end: int, timeout_s: float) -> Iterator[Message]:
        self.broker._reachable("changelog read")
        return iter([m for m in self.broker.topics[self.topic][partition] if start <= m.offset < end])

    def write(self, partition: int, records: Sequence[tuple[bytes, bytes | None]], timeout_s: float) -> list[int]:
        self.broker._reachable("changelog write")
        offsets = []
        for key, value in records:
            offsets.append(self._end[partition])
            self._end[partition] += 1
            self.broker._timestamp += 1
            self.broker.topics[self.topic][partition].append(
                Message(self.topic, partition, offsets[-1], key, value, [], self.broker._timestamp))
        return offsets

    def compact(self) -> None:
        for log in self.broker.topics[self.topic]:
            last = {m.key: m.offset for m in log}
            log[:] = [m for m in log if last[m.key] == m.offset and m.value is not None]

    def close(self) -> None:
        pass
