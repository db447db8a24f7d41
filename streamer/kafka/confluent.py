"""The confluent-kafka (librdkafka) backend of the client seam (abstract.py).

Configured as the kafka-python clients are (clients.py): manual commits of explicit offsets,
idempotent acks=all producer, transactional in exactly-once mode, the same assignment strategy
and security settings. librdkafka's log lines go to the logger ``librdkafka`` and its error
callback's to ``librdkafka.errors`` (both folded during outages, see outage.py); the clients
are checked against the brokers when built, so that start-up fails as with kafka-python:
KafkaBootstrapError, or KafkaLoginError for a refused SASL login.

Rebalance callbacks run inside ``poll`` on the calling thread: a partition cannot move while
the loop is between polls. librdkafka's group membership runs on its own threads, so the
kafka-python work-around (MembershipWatch) is not needed here.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer as RdConsumer
from confluent_kafka import IsolationLevel, KafkaError, KafkaException
from confluent_kafka import Producer as RdProducer
from confluent_kafka import TopicPartition as RdTopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

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
from streamer.kafka.clients import (
    RECONNECT_BACKOFF_MAX_MS,
    TRANSACTION_TIMEOUT_MS,
    KafkaBootstrapError,
    KafkaLoginError,
    KafkaSettingsRefused,
    assignment_strategy,
    bootstrap_failure_reason,
    changelog_request_bytes,
    redact_secret,
    transactional_id,
)
from streamer.settings import KafkaSettings

LIBRDKAFKA_LOGGER = "librdkafka"
log = logging.getLogger(LIBRDKAFKA_LOGGER)
# A partition whose seek librdkafka has refused this long as of one it has not started is
# assigned again at the offset (see ConfluentConsumer.seek).
SEEK_REFUSED_REASSIGN_S = 30.0
ours = logging.getLogger(__name__)  # streamer's own lines, not the library's (those are folded in outages)
errors_log = logging.getLogger(LIBRDKAFKA_LOGGER + ".errors")

GROUP_MOVED_ON = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError.STALE_MEMBER_EPOCH,
}
TIMED_OUT = {KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN}
# Broker errors the Kafka protocol calls retriable (a leader or coordinator moving, a broker
# restarting). librdkafka flags an error retriable only where its own request logic did, so the
# same "Not leader for partition" comes back unflagged from query_watermark_offsets, say (seen
# after a rebalance; it ended a run). UNKNOWN_TOPIC_OR_PART is left out: a missing topic stays.
TRANSIENT = {
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.KAFKA_STORAGE_ERROR,
    KafkaError.FENCED_LEADER_EPOCH,
    KafkaError.UNKNOWN_LEADER_EPOCH,
    KafkaError.OFFSET_NOT_AVAILABLE,
    KafkaError.PREFERRED_LEADER_NOT_AVAILABLE,
    KafkaError._WAIT_COORD,
}
# Refusals librdkafka reports from poll as events, not fatal and not raised (confluentinc/librdkafka
# #3072): the application decides. kafka-python raises them from poll, and they end the run there
# (not retriable); reported at DEBUG here, a consumer without the topic's or the group's ACL had
# consumed nothing, its health beating. (A refused login is checked at start-up; later, as a
# broker comes back, librdkafka retries it, as kafka-python does.)
REFUSED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}
# A partition of the checkpoint changelog that the client's metadata lacks for a while after a
# broker restart (ConfluentChangelog.end_offset): retriable there, where the partition is known to exist.
CHANGELOG_PARTITION_UNKNOWN = {KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART}
# librdkafka's transaction calls take a timeout and return a retriable error after it, except
# send_offsets_to_transaction while its group coordinator is away (librdkafka issues #5456 and
# #5511: it can block far longer; seen for 60 s after a broker restart). Twice the timeout marks
# a call stuck.
CALL_TIMEOUT_S = 10.0
SERVE_REPORTS_EVERY = 1024  # produce calls between two polls that serve delivery reports


def _theirs(tp: TopicPartition, offset: int | None = None) -> RdTopicPartition:
    return RdTopicPartition(tp.topic, tp.partition) if offset is None else RdTopicPartition(tp.topic, tp.partition, offset)


def _with_metadata(
    offsets: Mapping[TopicPartition, int], metadata: CommitMetadata | None,
) -> list[RdTopicPartition]:
    metadata = metadata or {}
    return [RdTopicPartition(tp.topic, tp.partition, o, metadata=metadata.get(tp, "")) for tp, o in offsets.items()]


def _ours(tps: Iterable[RdTopicPartition]) -> list[TopicPartition]:
    return [TopicPartition(tp.topic, tp.partition) for tp in tps]


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if it carries one."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


def client_error(exc: KafkaException, what: str) -> KafkaClientError:
    """confluent-kafka's error as the seam's: GroupMovedOn, BrokerTimeout, else KafkaClientError."""
    error = _kafka_error(exc)
    if error is None:
        return KafkaClientError(f"{what}: {exc!r}", cause=exc)
    if error.fatal():  # librdkafka's fatal errors end the client whatever their code
        return KafkaClientError(f"{what}: {error.str()}", retriable=False, cause=exc)
    if error.code() in GROUP_MOVED_ON:
        return GroupMovedOn(f"{what}: {error.str()}", cause=exc)
    if error.code() in TIMED_OUT:
        return BrokerTimeout(f"{what}: {error.str()}", cause=exc)
    retriable = error.retriable() or error.code() in TRANSIENT
    return KafkaClientError(f"{what}: {error.str()}", retriable=retriable, cause=exc)


def security_config(settings: KafkaSettings) -> dict[str, object]:
    """librdkafka's properties for ``settings.security_protocol``: only those that apply to it."""
    config: dict[str, object] = {"security.protocol": settings.security_protocol.lower()}
    if settings.security_protocol.startswith("SASL_"):
        assert settings.sasl_password is not None  # KafkaSettings checks SASL_* settings are complete
        password = settings.sasl_password.get_secret_value()
        config.update({"sasl.mechanism": settings.sasl_mechanism, "sasl.username": settings.sasl_username,
                       "sasl.password": password})
        redact_secret(password)
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl.endpoint.identification.algorithm"] = "https" if settings.ssl_check_hostname else "none"
        for name, prop in (("ssl_cafile", "ssl.ca.location"), ("ssl_certfile", "ssl.certificate.location"),
                           ("ssl_keyfile", "ssl.key.location")):
            path = getattr(settings, name)
            if path is not None:
                config[prop] = str(path)
        if settings.ssl_certfile is not None and settings.ssl_keyfile is None:
            # The key in the certificate's file, as Python's ssl (and kafka-python) read it there:
            # librdkafka reads a key only from ssl.key.location, and sent no certificate.
            config["ssl.key.location"] = str(settings.ssl_certfile)
        if settings.ssl_password is not None:
            config["ssl.key.password"] = settings.ssl_password.get_secret_value()
            redact_secret(settings.ssl_password.get_secret_value())
    return config


def _described(settings: KafkaSettings) -> dict[str, object]:
    """What KafkaBootstrapError names of the security settings (no secrets)."""
    described: dict[str, object] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        described.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username)
    return described


class _Errors:
    """librdkafka's error callback: logged (folded during outages), and a refused login kept for
    the bootstrap check."""

    def __init__(self) -> None:
        self.refusal: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            self.refusal = error
        errors_log.warning("%s", error.str())


def _common(settings: KafkaSettings, errors: _Errors) -> dict[str, object]:
    return {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        "logger": log,
        "error_cb": errors,
        **security_config(settings),
    }


def _client(kind: type[RdConsumer] | type[RdProducer], config: dict[str, object], settings: KafkaSettings) -> Any:
    """librdkafka's client of ``config``; KafkaSettingsRefused when it refuses them (a TLS file
    that is not PEM, a CA file that is not a CA)."""
    try:
        return kind(config)
    except KafkaException as exc:
        error = _kafka_error(exc)
        raise KafkaSettingsRefused(_described(settings), error.str() if error is not None else str(exc)) from None


def _check_reachable(client: RdConsumer | RdProducer, settings: KafkaSettings, errors: _Errors, timeout_s: float) -> None:
    """Ask for the cluster's metadata: a broker must answer within ``timeout_s``."""
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        client.poll(0)  # serves the error callback: a refused login is only told there
        if errors.refusal is not None:
            raise KafkaLoginError(settings.bootstrap_servers, _described(settings), errors.refusal) from exc  # type: ignore[arg-type]
        reason = bootstrap_failure_reason(settings.security_protocol)
        raise KafkaBootstrapError(settings.bootstrap_servers, _described(settings), f"{reason} ({exc.args[0].str()})") from exc
    if errors.refusal is not None:
        raise KafkaLoginError(settings.bootstrap_servers, _described(settings), errors.refusal)  # type: ignore[arg-type]


def make_consumer(settings: KafkaSettings, max_poll_records: int, bootstrap_timeout_ms: int | None = None) -> "ConfluentConsumer":
    """``bootstrap_timeout_ms``: how long to wait for a first broker (30 s when None)."""
    errors = _Errors()
    config = {
        **_common(settings, errors),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": settings.auto_offset_reset,
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(1000, settings.session_timeout_ms // 3),
        "fetch.wait.max.ms": 100,
        "partition.assignment.strategy": assignment_strategy(settings),
        "isolation.level": "read_committed" if settings.exactly_once else "read_uncommitted",
    }
    client = _client(RdConsumer, config, settings)
    try:
        _check_reachable(client, settings, errors, (bootstrap_timeout_ms or 30_000) / 1000)
    except BaseException:
        client.close()
        raise
    # End offsets are asked through a client of their own: on the consumer's connection each
    # request waits behind the fetch in flight (up to fetch.wait.max.ms), which on a quiet topic
    # is most of the time, and the loop waits with it.
    probe = {**_common(settings, errors), "client.id": f"{settings.client_id}-probe"}
    isolation = IsolationLevel.READ_COMMITTED if settings.exactly_once else IsolationLevel.READ_UNCOMMITTED
    return ConfluentConsumer(client, settings.auto_offset_reset, cooperative=assignment_strategy(settings) == "cooperative-sticky",
                             probe=probe, isolation=isolation)


def make_producer(
    settings: KafkaSettings, instance_id: str | None = None, bootstrap_timeout_ms: int | None = None
) -> "ConfluentProducer":
    """Idempotent, acks=all; in exactly-once mode transactional with transactions initialised
    (the transactional id as clients.transactional_id gives it)."""
    errors = _Errors()
    config = {
        **_common(settings, errors),
        "acks": "all",
        "enable.idempotence": True,
        # The loop produces a whole batch at once and then waits for its acknowledgement: a longer
        # linger only delays it (latency), the batch fills librdkafka's requests anyway.
        "linger.ms": 1,
        "delivery.report.only.error": True,
        "message.max.bytes": settings.max_message_bytes,  # a dead letter carries a whole input message
        # A key's partition as the Java client and kafka-python choose it (murmur2), not
        # librdkafka's default (CRC32): a device lands in the same partition whichever client wrote it.
        "partitioner": "murmur2_random",
    }
    producer = ConfluentProducer(errors)
    # Through a weak reference: the client holding the wrapper's bound method, and the wrapper the
    # client, a producer dropped unclosed (as a replaced transactional one was) had lived on with
    # its threads and connections until a full garbage collection, which gc.freeze makes rare.
    config["on_delivery"] = _delivered_to(weakref.ref(producer))
    if settings.exactly_once:
        config.update({"transactional.id": transactional_id(settings, instance_id),
                       "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS})
    client = _client(RdProducer, config, settings)
    timeout_s = (bootstrap_timeout_ms or 30_000) / 1000
    try:
        _check_reachable(client, settings, errors, timeout_s)
        if settings.exactly_once:
            try:
                client.init_transactions(timeout_s)  # waits for a transaction coordinator
            except KafkaException as exc:
                raise KafkaBootstrapError(settings.bootstrap_servers, _described(settings),
                                          f"no transaction coordinator answered: {exc.args[0].str()}") from exc
    except BaseException:
        # Start-up tries again and again while the brokers are away: each refused client had
        # lived on (threads, connections) until collected, as the consumer's never did.
        release_producer(client, 0)
        raise
    producer.client = client
    return producer


class ConfluentConsumer(Consumer):
    commits_answered_inside_rebalance = False

    def __init__(self, consumer: RdConsumer, auto_offset_reset: str, cooperative: bool,
                 probe: dict[str, object] | None = None, isolation: IsolationLevel = IsolationLevel.READ_UNCOMMITTED) -> None:
        """``probe``: the configuration of the admin client that end_offsets asks through (built
        at its first use); ``isolation``: whose end it asks for (read_committed: the last stable
        offset, as the consumer reads)."""
        self.client = consumer
        self.auto_offset_reset = auto_offset_reset
        self.cooperative = cooperative
        self._probe_config = probe or {}
        self._isolation = isolation
        self._probe: AdminClient | None = None
        self._seek_refused_since: dict[TopicPartition, float] = {}  # see seek
        self._deferred: Exception | None = None  # see poll

    def subscribe(self, topics: Sequence[str], hooks: RebalanceHooks) -> None:
        def on_assign(consumer: RdConsumer, partitions: list[RdTopicPartition]) -> None:
            # Assigned here, not after the callback, so that the hook may pause them at once.
            if self.cooperative:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
            hooks.assigned(_ours(partitions))

        def on_revoke(consumer: RdConsumer, partitions: list[RdTopicPartition]) -> None:
            hooks.revoked(_ours(partitions))
            self._unassign(consumer, partitions)

        def on_lost(consumer: RdConsumer, partitions: list[RdTopicPartition]) -> None:
            hooks.lost(_ours(partitions))
            self._unassign(consumer, partitions)

        self.client.subscribe(list(topics), on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)

    def _unassign(self, consumer: RdConsumer, partitions: list[RdTopicPartition]) -> None:
        for tp in _ours(partitions):  # a refused seek's time belongs to that assignment only
            self._seek_refused_since.pop(tp, None)
        if self.cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def poll(self, timeout_s: float, max_records: int) -> list[Message]:
        # consume() waits for all of num_messages or the timeout; the seam's poll returns as soon
        # as something came: wait for one, then take what is already fetched.
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            raise deferred
        try:
            first = self.client.poll(timeout_s)
        except KafkaException as exc:
            raise client_error(exc, "poll") from exc
        if first is None:
            return []
        polled = [first]
        if max_records > 1:
            try:
                polled.extend(self.client.consume(num_messages=max_records - 1, timeout=0))
            except KafkaException as exc:
                # ``first`` is taken: the client's position is past it. Raised now, a retriable
                # error had the loop poll on without it, and the offsets it committed next passed
                # it by; it is handed over, and the error raised at the next poll. (What a
                # rebalance hook raised is no KafkaException: it goes up at once.)
                self._deferred = client_error(exc, "poll")
        # tuple.__new__ spares NamedTuple's argument parsing: a few microseconds a message at 100k/s.
        new = tuple.__new__
        messages = [new(Message, (m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or [],
                                  m.timestamp()[1])) for m in polled if m.error() is None]
        if len(messages) < len(polled):
            for m in polled:
                error = m.error()
                if error is not None:
                    if error.fatal() or error.code() in REFUSED:
                        raise KafkaClientError(f"poll: {error.str()}", retriable=False)
                    log.debug("consumer event: %s", error.str())  # transient: the client retries by itself
        return messages

    def assignment(self) -> set[TopicPartition]:
        return set(_ours(self.client.assignment()))

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self.client.pause([_theirs(tp) for tp in partitions])

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self.client.resume([_theirs(tp) for tp in partitions])

    def seek(self, partition: TopicPartition, offset: int) -> None:
        try:
            self.client.seek(_theirs(partition, offset))
            self._seek_refused_since.pop(partition, None)
            return
        except KafkaException as exc:
            error = client_error(exc, f"seek {partition} to {offset}")
            refused = _kafka_error(exc)
            if refused is None or refused.code() != KafkaError._STATE:
                raise error from exc
            refused_since = self._seek_refused_since.setdefault(partition, time.monotonic())
            if not self.cooperative or time.monotonic() - refused_since < SEEK_REFUSED_REASSIGN_S:
                # A partition librdkafka has not taken up yet (just assigned, as the group moved):
                # its recovery is tried again a moment later, not the end of the run.
                raise KafkaClientError(str(error), retriable=True, cause=exc) from exc
        # librdkafka refuses the seek of a partition whose fetcher it has not started, and starts
        # it only once its own request for the committed offset answers: one that failed (the
        # group moving on while it was asked) leaves the partition assigned, never started and
        # every seek refused, until it is unassigned. Refused for SEEK_REFUSED_REASSIGN_S, it is
        # assigned anew at the offset, which starts it there with no such request. (Not at the
        # first refusal: outside a rebalance callback, librdkafka may take the call for the answer
        # to a rebalance it has queued. Cooperative assignment only: an eager assign() would
        # restart every other partition.)
        try:
            if partition in self.assignment():
                self.client.incremental_unassign([_theirs(partition)])
            self.client.incremental_assign([_theirs(partition, offset)])
        except KafkaException as exc:
            raise KafkaClientError(f"re-assigning {partition} at {offset}: {exc}", retriable=True, cause=exc) from exc
        self._seek_refused_since.pop(partition, None)
        ours.warning("%s[%d] assigned again at offset %d: librdkafka had refused its seek (a partition it had not"
                     " started)", partition.topic, partition.partition, offset)

    def committed_with_metadata(
        self, partitions: Sequence[TopicPartition], timeout_s: float,
    ) -> dict[TopicPartition, Committed | None]:
        try:
            answer = self.client.committed([_theirs(tp) for tp in partitions], timeout=timeout_s)
        except KafkaException as exc:
            raise client_error(exc, "fetching committed offsets") from exc
        for tp in answer:  # an offset the coordinator could not give is an error, not "never committed"
            if tp.error is not None:
                raise client_error(KafkaException(tp.error), f"fetching the committed offset of {tp.topic}[{tp.partition}]")
        return {TopicPartition(tp.topic, tp.partition): None if tp.offset < 0 else Committed(tp.offset, tp.metadata or "")
                for tp in answer}

    def position(self, partition: TopicPartition, timeout_s: float) -> int | None:
        [tp] = self.client.position([_theirs(partition)])
        if tp.offset >= 0:
            return tp.offset
        # Not fetched yet: where auto.offset.reset puts it.
        try:
            low, high = self.client.get_watermark_offsets(_theirs(partition), timeout=timeout_s)
        except KafkaException as exc:
            raise client_error(exc, "position") from exc
        return low if self.auto_offset_reset == "earliest" else high

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: CommitMetadata | None = None) -> None:
        try:
            answer = self.client.commit(offsets=_with_metadata(offsets, metadata), asynchronous=False)
        except KafkaException as exc:
            raise client_error(exc, "commit") from exc
        for tp in answer or []:
            if tp.error is not None:
                raise client_error(KafkaException(tp.error), f"commit of {tp.topic}[{tp.partition}]")

    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_s: float) -> dict[TopicPartition, int]:
        if not partitions:
            return {}
        if self._probe is None:
            self._probe = AdminClient(self._probe_config)
        # Its log lines and error callbacks wait in its queue until a poll serves them (to the
        # loggers the consumer's go to): served at every probe, so none pile up while brokers are away.
        self._probe.poll(0)
        deadline = time.monotonic() + timeout_s
        try:
            asked = self._probe.list_offsets({_theirs(tp): OffsetSpec.latest() for tp in partitions},
                                             isolation_level=self._isolation, request_timeout=timeout_s)
        except KafkaException as exc:
            raise client_error(exc, "end offsets") from exc
        ends = {}
        for tp, answer in asked.items():
            try:
                end = answer.result(timeout=max(0.0, deadline - time.monotonic())).offset
            except KafkaException as exc:
                raise client_error(exc, f"end offset of {tp.topic}[{tp.partition}]") from exc
            except concurrent.futures.TimeoutError as exc:
                raise BrokerTimeout(f"end offset of {tp.topic}[{tp.partition}]: no answer in {timeout_s}s", cause=exc) from exc
            if end >= 0:
                ends[TopicPartition(tp.topic, tp.partition)] = end
        return ends

    def highwater(self, partition: TopicPartition) -> int | None:
        try:
            _, high = self.client.get_watermark_offsets(_theirs(partition), cached=True)
        except KafkaException:
            return None
        return high if high >= 0 else None

    def group_metadata(self) -> object:
        return self.client.consumer_group_metadata()

    def close(self, timeout_s: float = 5.0) -> None:
        """librdkafka's close takes no timeout: with brokers that take requests but do not answer
        it waits for the LeaveGroup answer up to min(socket.timeout.ms, 5 s), ``timeout_s`` or not
        (README, on stopping)."""
        self._probe = None  # an admin client has no close: released with its last reference
        self.client.close()


class ConfluentProducer(Producer):
    transaction_stuck_after_s = 2 * CALL_TIMEOUT_S

    def __init__(self, errors: _Errors) -> None:
        self.client: RdProducer  # set by make_producer once built
        self._errors = errors
        self._failures: list[BaseException] = []
        self._unserved = 0  # messages produced since delivery reports were last served
        self._closed = False
        self._in_flight = 0  # transaction calls running (on the loop's helper threads)

    def _delivered(self, error: KafkaError | None, message: object) -> None:
        if error is not None:  # delivery.report.only.error: only failures come here
            self._failures.append(KafkaClientError(f"delivery failed: {error.str()}", retriable=error.retriable()))

    def produce(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None) -> None:
        # A delivered message leaves librdkafka's queue (queue.buffering.max.messages) only when
        # poll serves its delivery report, even one that delivery.report.only.error keeps from
        # us, at about 0.2 us each. Served a few at a time here, so that a producer that does not
        # flush for a while (the simulator) never stops for a whole queue's worth (20 ms for 100k).
        self._unserved += 1
        if self._unserved >= SERVE_REPORTS_EVERY:
            self._unserved = 0
            self.client.poll(0)
        while True:
            try:
                self.client.produce(topic, value=value, key=key, headers=headers)
                return
            except BufferError:  # the local queue is full of messages in flight: wait for deliveries
                self.client.poll(0.05)
            except KafkaException as exc:  # refused before it was queued (too large, unknown topic)
                raise client_error(exc, "produce") from exc

    def flush(self, timeout_s: float) -> bool:
        return self.client.flush(timeout_s) == 0

    def delivery_failures(self) -> list[BaseException]:
        self.client.poll(0)  # the delivery reports in so far, served (they are known only then)
        failures, self._failures = self._failures, []
        return failures

    def _transaction_call(self, what: str, call, *args: object) -> None:
        self._in_flight += 1  # the loop may give up on it (TransactionStuck): close must not wait under it
        try:
            call(*args)
        except KafkaException as exc:
            raise client_error(exc, what) from exc
        finally:
            self._in_flight -= 1

    def begin_transaction(self) -> None:
        self._transaction_call("begin_transaction", self.client.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: object,
        metadata: CommitMetadata | None = None,
    ) -> None:
        self._transaction_call("send_offsets_to_transaction", self.client.send_offsets_to_transaction,
                               _with_metadata(offsets, metadata), group_metadata, CALL_TIMEOUT_S)

    def commit_transaction(self) -> None:
        self._transaction_call("commit_transaction", self.client.commit_transaction, CALL_TIMEOUT_S)

    def abort_transaction(self) -> None:
        self._transaction_call("abort_transaction", self.client.abort_transaction, CALL_TIMEOUT_S)

    def close(self, timeout_s: float = 5.0) -> None:
        # Once: librdkafka's client refuses every call after its close, a second close included
        # (a producer replaced after an abort is closed, and closed again at shutdown when no
        # successor came: a warning with a traceback).
        if self._in_flight:
            # A transaction call the loop gave up on still runs on its helper thread: librdkafka's
            # close would wait for it (a process in the chaos run hung there, its loop with it).
            # Left to that call, which holds the client; freed when it returns.
            ours.warning("a transactional producer is let go unclosed: a call of it has not returned")
            return
        if not self._closed:
            self._closed = True
            release_producer(self.client, timeout_s)


def _delivered_to(producer: "weakref.ref[ConfluentProducer]"):
    def delivered(error: KafkaError | None, message: object) -> None:
        alive = producer()
        if alive is not None:
            alive._delivered(error, message)
    return delivered


def release_producer(client: RdProducer, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for what ``client`` still sends, drop the rest, and close it.

    Flushing alone had left librdkafka's threads and connections running (the seam says close
    releases them). Its own close flushes without a bound, so what the brokers did not take in
    time is purged first (its offsets are not committed: it is re-delivered), and close is
    called only with nothing left in its queues; otherwise the client goes with its last
    reference, as before."""
    client.flush(timeout_s)
    client.purge()
    client.flush(0)  # serves the purged messages' reports
    close = getattr(client, "close", None)  # confluent-kafka 2.10 and later
    if close is not None and len(client) == 0:
        close()


def make_changelog(settings: KafkaSettings, topic: str, max_value_bytes: int,
                   bootstrap_timeout_ms: int | None = None) -> "ConfluentChangelog":
    """A changelog client (abstract.Changelog): a consumer used only by assign (its group id is
    never joined) and an idempotent, non-transactional acks=all producer, checked against the brokers."""
    errors = _Errors()
    request_bytes = changelog_request_bytes(max_value_bytes)
    common = {**_common(settings, errors), "client.id": f"{settings.client_id}-changelog"}
    consumer = _client(RdConsumer, {
        **common,
        "group.id": f"{settings.group_id}-changelog-reader",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
        "max.partition.fetch.bytes": request_bytes,
        "isolation.level": "read_uncommitted",
        "enable.partition.eof": True,
    }, settings)
    producer: RdProducer | None = None
    try:
        producer = _client(RdProducer, {**common, "acks": "all", "enable.idempotence": True, "linger.ms": 5,
                                        "message.max.bytes": request_bytes}, settings)
        timeout_s = (bootstrap_timeout_ms or 30_000) / 1000
        _check_reachable(consumer, settings, errors, timeout_s)
        _check_reachable(producer, settings, errors, timeout_s)
    except BaseException:
        consumer.close()
        if producer is not None:
            release_producer(producer, 0)
        raise
    return ConfluentChangelog(topic, consumer, producer)


class ConfluentChangelog(Changelog):
    def __init__(self, topic: str, consumer: RdConsumer, producer: RdProducer) -> None:
        self.topic = topic
        self.consumer = consumer
        self.producer = producer

    def partition_count(self, timeout_s: float) -> int:
        try:
            metadata = self.consumer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException as exc:
            raise client_error(exc, f"partitions of {self.topic}") from exc
        found = metadata.topics.get(self.topic)
        if found is None or found.error is not None or not found.partitions:
            reason = found.error.str() if found is not None and found.error is not None else "no partitions"
            raise KafkaClientError(f"changelog topic {self.topic!r} cannot be used: {reason}")
        return len(found.partitions)

    def end_offset(self, partition: int, timeout_s: float) -> int:
        try:
            _, high = self.consumer.get_watermark_offsets(RdTopicPartition(self.topic, partition), timeout=timeout_s)
        except KafkaException as exc:
            what = f"end offset of {self.topic}[{partition}]"
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() in CHANGELOG_PARTITION_UNKNOWN and not error.fatal():
                # The changelog's partitions were there when it was opened: one the client's
                # metadata lacks now is a broker restarting (its metadata not refreshed yet), not
                # a partition gone. It had ended the run (the chaos test's broker restart).
                raise KafkaClientError(f"{what}: {error.str()}", retriable=True, cause=exc) from exc
            raise client_error(exc, what) from exc
        return high

    def read(self, partition: int, start: int, end: int, timeout_s: float) -> Iterator[Message]:
        if start >= end:
            return
        deadline = time.monotonic() + timeout_s
        # Done at the record end - 1, or at the partition's end (enable.partition.eof): a compacted
        # log may lack end - 1. position() is not used: after a new assign it can still tell the
        # previous assignment's position.
        try:
            self.consumer.assign([RdTopicPartition(self.topic, partition, start)])
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerTimeout(f"reading {self.topic}[{partition}] {start}..{end}: not done in {timeout_s}s")
                # consume() waits for all of num_messages or its timeout: wait for one, take what is fetched.
                first = self.consumer.poll(min(left, 1.0))
                polled = [] if first is None else [first, *self.consumer.consume(num_messages=499, timeout=0)]
                for m in polled:
                    error = m.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF and m.offset() >= start:
                            return
                        if error.fatal():
                            raise KafkaClientError(f"reading {self.topic}[{partition}]: {error.str()}")
                        continue  # transient; the client retries by itself
                    if start <= m.offset() < end:
                        yield Message(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or [],
                                      m.timestamp()[1])
                    if m.offset() >= end - 1:
                        return
        except KafkaException as exc:
            raise client_error(exc, f"reading {self.topic}[{partition}]") from exc
        finally:
            self.consumer.unassign()

    def write(self, partition: int, records: Sequence[tuple[bytes, bytes | None]], timeout_s: float) -> list[int]:
        failures: list[KafkaError] = []
        offsets: list[int] = [-1] * len(records)

        def delivered_as(n: int):
            def delivered(error: KafkaError | None, message: object) -> None:
                if error is not None:
                    failures.append(error)
                else:
                    offsets[n] = message.offset()  # type: ignore[attr-defined]
            return delivered

        deadline = time.monotonic() + timeout_s
        for n, (key, value) in enumerate(records):
            while True:
                try:
                    self.producer.produce(self.topic, value=value, key=key, partition=partition,
                                          on_delivery=delivered_as(n))
                    break
                except BufferError:  # the local queue is full: let deliveries drain it, in the time given
                    if time.monotonic() >= deadline:
                        self._drop_queued()
                        raise BrokerTimeout(f"writing to {self.topic}[{partition}]: the producer's queue stayed full"
                                            f" for {timeout_s}s") from None
                    self.producer.poll(0.05)
                except KafkaException as exc:
                    raise client_error(exc, f"writing to {self.topic}[{partition}]") from exc
        left = self.producer.flush(max(0.0, deadline - time.monotonic()))
        if left or failures:
            if left:
                self._drop_queued()
            reason = failures[0].str() if failures else f"{left} not acknowledged in {timeout_s}s"
            raise KafkaClientError(f"writing to {self.topic}[{partition}]: {len(failures) + left} of {len(records)} "
                                   f"records not delivered ({reason})", retriable=True)
        return offsets

    def _drop_queued(self) -> None:
        """Purge a failed write's records not sent yet: while the brokers are away they would wait
        in the queue for message.timeout.ms, and the writes after it, the queue full, for them
        (those in flight are left to it: the store forgets a failed save's records either way)."""
        self.producer.purge(in_queue=True, in_flight=False)
        self.producer.poll(0)  # serves the purged records' reports

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            release_producer(self.producer, 2.0)
