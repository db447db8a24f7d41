"""The Kafka client seam: what the run loop needs of a consumer and a producer.

The loop (pipeline.py, partitions.py) is written against ``Consumer`` and ``Producer``; the
backends (kafka_python.py, confluent.py) adapt kafka-python and confluent-kafka to them, and
tests drive the loop with an in-process double. Partitions are ``TopicPartition`` (a plain
(topic, partition) tuple), offsets plain ints (the next offset to read), and every message that
crosses the seam is a ``Message``. Errors cross as ``KafkaClientError`` and its subclasses,
whatever the backend raised.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple

from streamer.errors import StreamerError

ClientName = Literal["kafka-python", "confluent-kafka"]
Headers = list[tuple[str, bytes | None]]


class TopicPartition(NamedTuple):
    """One partition of a topic. Equal to (and hashed as) kafka-python's TopicPartition."""

    topic: str
    partition: int


class Message(NamedTuple):
    """A consumed message, as both backends give it: ``timestamp`` in milliseconds since the epoch
    (-1 when the broker gave none), ``headers`` a list of (name, value) pairs (empty when none)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp: int


CommitMetadata = Mapping[TopicPartition, str]  # a metadata string per partition, committed with its offset


class Committed(NamedTuple):
    """A group's committed offset, and the metadata string committed with it ("" when none)."""

    offset: int
    metadata: str = ""


class KafkaClientError(StreamerError):
    """A client call failed. ``retriable``: the same call may succeed later (the broker is away,
    a leader moves); not retriable: retrying cannot help (configuration, authorisation, fencing)."""

    def __init__(self, message: str, retriable: bool = False, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.cause = cause


class GroupMovedOn(KafkaClientError):
    """A commit refused because the group is rebalancing or has rebalanced: the partitions' next
    owner re-reads from the last commit, so nothing is lost (at-least-once holds)."""


class BrokerTimeout(KafkaClientError):
    """No answer within the call's timeout (retriable)."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message, retriable=True, cause=cause)


PartitionsCallback = Callable[[list[TopicPartition]], None]


class RebalanceHooks(NamedTuple):
    """Called on the consumer's own thread of rebalancing, during ``Consumer.poll``: ``assigned``
    (partitions added), ``revoked`` (taken away in good order: state may be saved) and ``lost``
    (taken away without notice: the group moved on, state must not be saved)."""

    assigned: PartitionsCallback
    revoked: PartitionsCallback
    lost: PartitionsCallback


class GroupWatch(ABC):
    """Watches for a member left outside its group by a client bug and makes it rejoin."""

    outside: str | None  # why the member is outside its group; None while it is in

    @abstractmethod
    def check(self, broker_reachable: bool = True) -> bool:
        """Called once per loop iteration; True when it forced a rejoin this call."""


class Consumer(ABC):
    """A group consumer with manual commits; offsets are the next offset to read."""

    # Whether a commit asked on another thread while a rebalance hook runs inside poll can be
    # answered before the hook returns. librdkafka holds such a commit until its rebalance
    # callback returns (asked on the callback's own thread, it is answered at once, but then
    # nothing bounds the wait for a coordinator that has stopped answering).
    commits_answered_inside_rebalance: bool = True

    @abstractmethod
    def subscribe(self, topics: Sequence[str], hooks: RebalanceHooks) -> None:
        """Join the group for ``topics``; ``hooks`` hear of every change of assignment."""

    @abstractmethod
    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        """At most ``max_records`` messages of assigned, unpaused partitions, in offset order per
        partition (partitions may interleave); waits at most ``timeout_s`` for the first. Rebalance
        hooks run inside. A broker that is away gives an empty list or a retriable error."""

    @abstractmethod
    def assignment(self) -> set[TopicPartition]:
        """The partitions assigned to this member now."""

    @abstractmethod
    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Fetch nothing more of these until ``resume``."""

    @abstractmethod
    def resume(self, partitions: Iterable[TopicPartition]) -> None: ...

    @abstractmethod
    def seek(self, partition: TopicPartition, offset: int) -> None:
        """The next poll of ``partition`` starts at ``offset`` (replay, recovery)."""

    @abstractmethod
    def committed_with_metadata(
        self, partitions: Sequence[TopicPartition], timeout_s: float,
    ) -> dict[TopicPartition, Committed | None]:
        """The group's committed offsets with their metadata (None where it has none)."""

    def committed(self, partitions: Sequence[TopicPartition], timeout_s: float) -> dict[TopicPartition, int | None]:
        """The group's committed offsets (None where it has none)."""
        answer = self.committed_with_metadata(partitions, timeout_s)
        return {tp: None if c is None else c.offset for tp, c in answer.items()}

    @abstractmethod
    def position(self, partition: TopicPartition, timeout_s: float) -> int | None:
        """Where the next poll of ``partition`` starts: the fetch position, or where
        kafka.auto_offset_reset puts a partition without one; None when not known in time."""

    @abstractmethod
    def commit(self, offsets: Mapping[TopicPartition, int], metadata: CommitMetadata | None = None) -> None:
        """Commit synchronously, each offset with its ``metadata`` string ("" where none is
        given). GroupMovedOn when the group refused it; KafkaClientError else."""

    @abstractmethod
    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_s: float) -> dict[TopicPartition, int]:
        """The brokers' end offsets (the log end, or the last stable offset in read_committed
        mode); KafkaClientError when no answer came within ``timeout_s``."""

    @abstractmethod
    def highwater(self, partition: TopicPartition) -> int | None:
        """The end offset the last fetch response told of, without asking the broker."""

    @abstractmethod
    def group_metadata(self) -> object:
        """This member's group metadata, for Producer.send_offsets_to_transaction."""

    def group_watch(self, grace_s: float) -> GroupWatch | None:
        """A watch for this client's known way of leaving a member outside its group; None when
        the client has none."""
        return None

    @abstractmethod
    def close(self, timeout_s: float = 5.0) -> None:
        """Leave the group (committing nothing) and release the connections."""


class Producer(ABC):
    """An idempotent producer (acks=all); transactional in exactly-once mode.

    ``transaction_stuck_after_s``: a transaction call that has not returned by then is taken to
    be stuck (the loop drops the producer and fences it with a new one)."""

    transaction_stuck_after_s: float = 60.0

    @abstractmethod
    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        """Queue one message; its delivery is known after ``flush``. KafkaClientError when the
        client refuses it before queueing it."""

    @abstractmethod
    def flush(self, timeout_s: float) -> bool:
        """Wait for the acknowledgement of everything queued; False when ``timeout_s`` passed first."""

    @abstractmethod
    def delivery_failures(self) -> list[BaseException]:
        """The failures of the sends found settled since the last call, and forgets those sends.
        After a ``flush`` that returned True every send before it is settled, so an empty list
        then means all were delivered; called between flushes it returns what is known so far."""

    @abstractmethod
    def begin_transaction(self) -> None: ...

    @abstractmethod
    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: object,
        metadata: CommitMetadata | None = None,
    ) -> None:
        """Commit these input offsets, each with its ``metadata`` string, with the open
        transaction (fenced by ``group_metadata``)."""

    @abstractmethod
    def commit_transaction(self) -> None: ...

    @abstractmethod
    def abort_transaction(self) -> None: ...

    @abstractmethod
    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued within ``timeout_s``, then release the connections."""


class Changelog(ABC):
    """One topic read and written outside any group (a checkpoint changelog): partitions are
    assigned by hand and read from a chosen offset to the end; records go to a chosen partition.
    Not a group member: nothing is committed, nothing rebalances."""

    topic: str

    @abstractmethod
    def partition_count(self, timeout_s: float) -> int:
        """How many partitions the topic has; KafkaClientError when it does not exist or no
        broker answered within ``timeout_s``."""

    @abstractmethod
    def end_offset(self, partition: int, timeout_s: float) -> int:
        """The log end offset of ``partition`` (the offset the next record will get)."""

    @abstractmethod
    def read(self, partition: int, start: int, end: int, timeout_s: float) -> Iterator[Message]:
        """The records of ``partition`` with ``start`` <= offset < ``end``, in offset order (a
        compacted topic has gaps). BrokerTimeout when ``end`` is not reached within ``timeout_s``."""

    @abstractmethod
    def write(self, partition: int, records: Sequence[tuple[bytes, bytes | None]], timeout_s: float) -> list[int]:
        """Append (key, value) records to ``partition`` in this order (value None: a tombstone),
        wait for their acknowledgement and return their offsets; KafkaClientError when any was
        not delivered within ``timeout_s``."""

    @abstractmethod
    def close(self) -> None: ...
