"""The kafka-python backend of the client seam (abstract.py).

The clients are built by clients.make_consumer / make_producer (manual commits, idempotent
producer, security settings); this module adapts their calls, records and errors. kafka-python
runs rebalance callbacks inside ``poll``; it can leave a member outside its group after a lost
SyncGroup reply, which ``group_watch`` (clients.MembershipWatch) works around.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTopicPartition
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata

from streamer.kafka.abstract import (
    BrokerTimeout,
    Changelog,
    CommitMetadata,
    Committed,
    Consumer,
    GroupMovedOn,
    GroupWatch,
    Headers,
    KafkaClientError,
    Message,
    Producer,
    RebalanceHooks,
    TopicPartition,
)
from streamer.kafka.clients import MembershipWatch, close_producer

COMMIT_TIMEOUT_MS = 5000
GROUP_MOVED_ON = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError)


def _theirs(tp: TopicPartition) -> KafkaTopicPartition:
    return KafkaTopicPartition(tp.topic, tp.partition)


def _with_metadata(
    offsets: Mapping[TopicPartition, int], metadata: CommitMetadata | None,
) -> dict[KafkaTopicPartition, OffsetAndMetadata]:
    metadata = metadata or {}
    return {_theirs(tp): OffsetAndMetadata(o, metadata.get(tp, ""), -1) for tp, o in offsets.items()}


def _ours(tps: Iterable[KafkaTopicPartition]) -> list[TopicPartition]:
    return [TopicPartition(tp.topic, tp.partition) for tp in tps]


def raised_by_a_hook(exc: KafkaError) -> BaseException | None:
    """What a rebalance hook raised, where kafka-python wrapped it: it catches the hook's error,
    finishes the rebalance and raises KafkaError("User rebalance callback throws an error") from
    it, which had ended the run without its reason, as not retriable whatever it was.
    confluent-kafka raises the hook's own error from poll; so does this adapter now."""
    cause = exc.__cause__
    return cause if cause is not None and not isinstance(cause, KafkaError) else None


def client_error(exc: KafkaError, what: str) -> KafkaClientError:
    """kafka-python's error as the seam's: GroupMovedOn, BrokerTimeout, else KafkaClientError."""
    if isinstance(exc, GROUP_MOVED_ON):
        return GroupMovedOn(f"{what}: {exc!r}", cause=exc)
    if isinstance(exc, KafkaTimeoutError):
        return BrokerTimeout(f"{what}: {exc!r}", cause=exc)
    return KafkaClientError(f"{what}: {exc!r}", retriable=bool(getattr(exc, "retriable", False)), cause=exc)


class KafkaPythonConsumer(Consumer):
    def __init__(self, consumer: KafkaConsumer) -> None:
        self.client = consumer

    def subscribe(self, topics: Sequence[str], hooks: RebalanceHooks) -> None:
        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Iterable[KafkaTopicPartition]) -> None:
                hooks.revoked(_ours(revoked))

            def on_partitions_assigned(self, assigned: Iterable[KafkaTopicPartition]) -> None:
                hooks.assigned(_ours(assigned))

            def on_partitions_lost(self, lost: Iterable[KafkaTopicPartition]) -> None:
                hooks.lost(_ours(lost))

        self.client.subscribe(list(topics), listener=Listener())

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        try:
            polled = self.client.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            hook = raised_by_a_hook(exc)
            if hook is not None:
                raise hook from None
            raise client_error(exc, "poll") from exc
        return [
            Message(r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp)
            for records in polled.values()
            for r in records
        ]

    def assignment(self) -> set[TopicPartition]:
        return set(_ours(self.client.assignment()))

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self.client.pause(*map(_theirs, partitions))

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self.client.resume(*map(_theirs, partitions))

    def seek(self, partition: TopicPartition, offset: int) -> None:
        try:
            self.client.seek(_theirs(partition), offset)
        except ValueError as exc:
            if "Unassigned partition" not in str(exc):  # an offset below 0: ours to fix, not to retry
                raise
            raise KafkaClientError(f"seek {partition}: {exc}", retriable=True, cause=exc) from exc

    def committed_with_metadata(
        self, partitions: Sequence[TopicPartition], timeout_s: float,
    ) -> dict[TopicPartition, Committed | None]:
        # Bounded: without a timeout kafka-python retries for ever while the coordinator is away.
        deadline = time.monotonic() + timeout_s
        answer: dict[TopicPartition, Committed | None] = {}
        try:
            for tp in partitions:
                theirs = self.client.committed(
                    _theirs(tp), metadata=True, timeout_ms=max(1, int((deadline - time.monotonic()) * 1000)))
                answer[tp] = None if theirs is None else Committed(theirs.offset, theirs.metadata or "")
        except KafkaError as exc:
            raise client_error(exc, "fetching committed offsets") from exc
        return answer

    def position(self, partition: TopicPartition, timeout_s: float) -> int | None:
        try:
            return self.client.position(_theirs(partition), timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            raise client_error(exc, "position") from exc

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: CommitMetadata | None = None) -> None:
        try:
            # Bounded: without a timeout kafka-python retries for ever while the coordinator is
            # away, and the loop could neither report it nor stop; the loop retries instead.
            self.client.commit(_with_metadata(offsets, metadata), timeout_ms=COMMIT_TIMEOUT_MS)
        except KafkaError as exc:
            raise client_error(exc, "commit") from exc

    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_s: float) -> dict[TopicPartition, int]:
        try:
            ends = self.client.end_offsets([_theirs(tp) for tp in partitions], timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            raise client_error(exc, "end offsets") from exc
        return {TopicPartition(tp.topic, tp.partition): end for tp, end in ends.items() if end is not None}

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.client.highwater(_theirs(partition))

    def group_metadata(self) -> object:
        return self.client.group_metadata()

    def group_watch(self, grace_s: float) -> GroupWatch:
        return MembershipWatch(self.client, grace_s)

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self.client.close(autocommit=False, timeout_ms=int(timeout_s * 1000))  # revokes through the hooks
        except KafkaError as exc:
            hook = raised_by_a_hook(exc)
            if hook is not None:
                raise hook from None
            raise client_error(exc, "close") from exc


class KafkaPythonProducer(Producer):
    def __init__(self, producer: KafkaProducer) -> None:
        self.client = producer
        self._sent: list[Future] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        try:
            self._sent.append(self.client.send(topic, key=key, value=value, headers=headers))
        except KafkaError as exc:  # refused before it was queued (too large, no metadata in time)
            raise client_error(exc, "produce") from exc

    def flush(self, timeout_s: float) -> bool:
        try:
            self.client.flush(timeout=timeout_s)
        except KafkaTimeoutError:
            return False
        except KafkaError as exc:  # UnknownError('Future not done'): a batch it split and lost track of
            raise client_error(exc, "flush") from exc
        return True

    def delivery_failures(self) -> list[BaseException]:
        done = [f for f in self._sent if f.is_done]
        self._sent = [f for f in self._sent if not f.is_done]
        return [f.exception for f in done if f.failed()]

    def _transaction_call(self, what: str, call, *args: object) -> None:
        try:
            call(*args)
        except KafkaError as exc:
            raise client_error(exc, what) from exc

    def begin_transaction(self) -> None:
        self._transaction_call("begin_transaction", self.client.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: object,
        metadata: CommitMetadata | None = None,
    ) -> None:
        self._transaction_call("send_offsets_to_transaction", self.client.send_offsets_to_transaction,
                               _with_metadata(offsets, metadata), group_metadata)

    def commit_transaction(self) -> None:
        self._transaction_call("commit_transaction", self.client.commit_transaction)
        # Committed: every send of the transaction was delivered (a failed one fails the commit).
        # Exactly-once never asks delivery_failures, so the futures are let go here.
        self._sent.clear()

    def abort_transaction(self) -> None:
        try:
            self._transaction_call("abort_transaction", self.client.abort_transaction)
        finally:
            self._sent.clear()  # the transaction's sends are void, delivered or not

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            close_producer(self.client, timeout_s)
        except KafkaError as exc:
            raise client_error(exc, "closing the producer") from exc


class KafkaPythonChangelog(Changelog):
    """A changelog read by a group-less consumer (assign + seek) and written by its own idempotent,
    non-transactional producer (checkpoints are written after the batch's transaction)."""

    def __init__(self, topic: str, consumer: KafkaConsumer, producer: KafkaProducer) -> None:
        self.topic = topic
        self.consumer = consumer
        self.producer = producer

    def partition_count(self, timeout_s: float) -> int:
        """Asked of the consumer, whose metadata request (all topics) creates none. kafka-python
        3.0.12's producer asks brokers to create the topics it asks about, whatever its
        allow_auto_create_topics says (its ClusterMetadata is made without it): a changelog
        missing had been made uncompacted. It waits for a broker for ever, though, where the
        brokers leave between the bootstrap and this call. The producer is asked once the topic
        is known to be there: its first write then knows the partitions (else its first send
        waits for them, up to max_block_ms, before its own timeout starts)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                partitions = self.consumer.partitions_for_topic(self.topic)
            except KafkaError as exc:
                raise client_error(exc, f"partitions of {self.topic}") from exc
            if partitions:
                break
            if time.monotonic() >= deadline or self.topic not in self.consumer.topics():
                raise KafkaClientError(f"changelog topic {self.topic!r} does not exist (or no broker answered)")
            time.sleep(0.1)
        try:
            self.producer.partitions_for(self.topic)
        except KafkaError as exc:
            raise client_error(exc, f"partitions of {self.topic}") from exc
        return len(partitions)

    def end_offset(self, partition: int, timeout_s: float) -> int:
        tp = KafkaTopicPartition(self.topic, partition)
        try:
            ends = self.consumer.end_offsets([tp], timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            raise client_error(exc, f"end offset of {self.topic}[{partition}]") from exc
        if ends.get(tp) is None:
            raise BrokerTimeout(f"end offset of {self.topic}[{partition}]: no answer in {timeout_s}s")
        return ends[tp]

    def read(self, partition: int, start: int, end: int, timeout_s: float) -> Iterator[Message]:
        tp = KafkaTopicPartition(self.topic, partition)
        if start >= end:
            return
        deadline = time.monotonic() + timeout_s
        try:
            self.consumer.assign([tp])
            self.consumer.seek(tp, start)
            while self.consumer.position(tp) < end:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerTimeout(f"reading {self.topic}[{partition}] {start}..{end}: not done in {timeout_s}s")
                polled = self.consumer.poll(timeout_ms=int(min(left, 1.0) * 1000), max_records=500)
                for r in polled.get(tp, []):
                    if start <= r.offset < end:
                        yield Message(r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp)
        except KafkaError as exc:
            raise client_error(exc, f"reading {self.topic}[{partition}]") from exc

    def write(self, partition: int, records: Sequence[tuple[bytes, bytes | None]], timeout_s: float) -> list[int]:
        try:
            sent = [self.producer.send(self.topic, key=key, value=value, partition=partition) for key, value in records]
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise client_error(exc, f"writing to {self.topic}[{partition}]") from exc
        failed = [f.exception for f in sent if not f.is_done or f.failed()]
        if failed:
            raise KafkaClientError(f"writing to {self.topic}[{partition}]: {len(failed)} of {len(sent)} records "
                                   f"not delivered ({failed[0]!r})", retriable=True)
        return [f.value.offset for f in sent]

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            # Not producer.close alone: it raises while a send is pending, before it stops its sender.
            close_producer(self.producer, 2.0)
