"""How each client's errors reach the loop: a leader or coordinator moving is retriable (the
loop rides it out as the broker away), configuration and fencing are not."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import TopicPartition as RdTopicPartition
from kafka import errors as kp_errors

from streamer.kafka import confluent, kafka_python
from streamer.kafka.abstract import BrokerTimeout, GroupMovedOn, KafkaClientError, TopicPartition

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("code", sorted(confluent.TRANSIENT))
def test_confluent_broker_errors_the_protocol_calls_retriable_are_retriable(code: int):
    # librdkafka leaves its retriable flag unset on these outside its own retry logic: the end
    # offset of a checkpoint partition answered NOT_LEADER_FOR_PARTITION after a rebalance.
    assert not KafkaError(code).retriable()
    assert confluent.client_error(KafkaException(KafkaError(code)), "end offset").retriable


@pytest.mark.parametrize("code", [
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError._INVALID_ARG,
    KafkaError.INVALID_PRODUCER_EPOCH,
])
def test_confluent_configuration_and_fencing_errors_are_not_retriable(code: int):
    assert not confluent.client_error(KafkaException(KafkaError(code)), "call").retriable


def test_confluent_fatal_errors_are_never_retriable():
    error = KafkaError(KafkaError.NOT_COORDINATOR, fatal=True)
    assert not confluent.client_error(KafkaException(error), "commit").retriable


def test_confluent_group_and_timeout_errors_keep_their_kinds():
    assert isinstance(confluent.client_error(KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS)), "c"),
                      GroupMovedOn)
    assert isinstance(confluent.client_error(KafkaException(KafkaError(KafkaError._TRANSPORT)), "c"), BrokerTimeout)


@pytest.mark.parametrize("error, retriable", [
    (kp_errors.NotLeaderForPartitionError(), True),
    (kp_errors.CoordinatorNotAvailableError(), True),
    (kp_errors.TopicAuthorizationFailedError(), False),
])
def test_kafka_python_keeps_its_own_retriable_flags(error, retriable: bool):
    assert kafka_python.client_error(error, "call").retriable is retriable


@pytest.mark.parametrize("protocol, causes", [
    ("PLAINTEXT", "not reachable"),
    ("SSL", "not reachable or a TLS failure"),
    ("SASL_PLAINTEXT", "not reachable or a refused login (check the user and password)"),
    ("SASL_SSL", "not reachable, a TLS failure or a refused login (check the user and password)"),
])
def test_a_bootstrap_failure_names_only_causes_the_protocol_allows(protocol: str, causes: str):
    from streamer.kafka.clients import bootstrap_failure_reason

    assert bootstrap_failure_reason(protocol) == f"no broker could be used before the bootstrap timeout: {causes}"


def test_confluent_committed_offset_the_coordinator_could_not_give_is_an_error_not_none():
    """librdkafka answers per partition: offset -1001 with an error is no "never committed" (which
    would start the partition at auto.offset.reset and its devices from zero)."""
    from types import SimpleNamespace

    from streamer.kafka.abstract import TopicPartition

    def answer(error):
        return [SimpleNamespace(topic="t", partition=0, offset=-1001, metadata=None, error=error),
                SimpleNamespace(topic="t", partition=1, offset=42, metadata=None, error=None)]

    consumer = confluent.ConfluentConsumer.__new__(confluent.ConfluentConsumer)
    asked = [TopicPartition("t", 0), TopicPartition("t", 1)]
    consumer.client = SimpleNamespace(committed=lambda partitions, timeout: answer(None))
    assert consumer.committed(asked, 1.0) == {asked[0]: None, asked[1]: 42}
    consumer.client = SimpleNamespace(
        committed=lambda partitions, timeout: answer(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)))
    with pytest.raises(Exception) as raised:
        consumer.committed(asked, 1.0)
    assert raised.value.retriable and "committed offset of t[0]" in str(raised.value)


def test_confluent_end_offsets_errors_and_no_answer_reach_the_loop_as_the_seams():
    """end_offsets (the loop's lag and readiness probe) asks through an admin client, answered
    per partition: a leader moving is retriable, an unknown partition is not, no answer in time
    is BrokerTimeout; a partition's end is its offset, -1 (none known) left out."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from streamer.kafka.abstract import TopicPartition

    def answered(outcomes):
        def list_offsets(asked, isolation_level, request_timeout):
            futures = {}
            for tp, outcome in zip(asked, outcomes):
                future: Future = Future()
                if isinstance(outcome, KafkaError):
                    future.set_exception(KafkaException(outcome))
                elif outcome is not None:
                    future.set_result(SimpleNamespace(offset=outcome))
                futures[tp] = future  # None: never answered
            return futures
        return SimpleNamespace(list_offsets=list_offsets, poll=lambda timeout: served.append(timeout) or 0)

    served: list[float] = []

    consumer = confluent.ConfluentConsumer(None, "latest", False)  # type: ignore[arg-type]
    asked = [TopicPartition("t", 0), TopicPartition("t", 1)]
    assert consumer.end_offsets([], 1.0) == {}
    consumer._probe = answered([7, -1])
    assert consumer.end_offsets(asked, 1.0) == {asked[0]: 7}
    assert served == [0]  # its queued log lines and error callbacks, served at every probe
    consumer._probe = answered([7, KafkaError(KafkaError.LEADER_NOT_AVAILABLE)])
    with pytest.raises(Exception) as raised:
        consumer.end_offsets(asked, 1.0)
    assert raised.value.retriable and "end offset of t[1]" in str(raised.value)
    consumer._probe = answered([KafkaError(KafkaError._UNKNOWN_PARTITION), 7])
    with pytest.raises(Exception) as raised:
        consumer.end_offsets(asked, 1.0)
    assert not raised.value.retriable
    consumer._probe = answered([7, None])
    with pytest.raises(BrokerTimeout, match=r"end offset of t\[1\]: no answer in 0.2s"):
        consumer.end_offsets(asked, 0.2)


def test_client_logs_silenced_reach_no_handler_not_even_the_last_resort():
    """`streamer run` silences the client libraries before its summary line: a client abandoned
    while it waited for a broker logs from its thread until exit, and nothing may follow."""
    code = (
        "import logging, sys\n"
        "from streamer.kafka.clients import silence_client_logs\n"
        "logging.basicConfig(stream=sys.stdout)\n"
        "logging.getLogger('kafka.net.manager').warning('before')\n"
        "silence_client_logs()\n"
        "logging.getLogger('kafka.net.manager').warning('Bootstrap bootstrap-0 not ready')\n"
        "logging.getLogger('librdkafka').error('after')\n"
        "logging.getLogger('streamer').warning('ours')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["WARNING:kafka.net.manager:before", "WARNING:streamer:ours"], done.stdout
    assert done.stderr == ""


class _Refusing:
    """A librdkafka consumer that refuses every seek as of a partition it has not started."""

    def __init__(self, assign_error: int | None = None, assigned: bool = True) -> None:
        self.calls: list[tuple[str, list[tuple[str, int, int]]]] = []
        self.assign_error = assign_error
        self.assigned = assigned

    def assignment(self):
        return [RdTopicPartition("readings", 3)] if self.assigned else []

    def seek(self, partition):
        raise KafkaException(KafkaError(KafkaError._STATE, "Failed to seek to offset 5810: Local: Erroneous state"))

    def incremental_unassign(self, partitions):
        self.calls.append(("unassign", [(p.topic, p.partition, p.offset) for p in partitions]))

    def incremental_assign(self, partitions):
        if self.assign_error is not None:
            raise KafkaException(KafkaError(self.assign_error))
        self.calls.append(("assign", [(p.topic, p.partition, p.offset) for p in partitions]))


def test_a_confluent_seek_refused_for_the_partitions_state_for_long_assigns_the_partition_again(caplog, monkeypatch):
    """librdkafka refuses the seek of a partition whose fetcher it has not started ("Local:
    Erroneous state", seen in chaos runs right after an assignment), and never starts one whose
    committed-offset request failed: retried, such a seek is refused for good. Cooperative: at
    first retried (retriable); refused for SEEK_REFUSED_REASSIGN_S, the partition is unassigned
    and assigned again at the offset, which starts it there (tests/integration/test_consumer_kafka.py
    holds librdkafka to that); one no longer assigned (an assign that failed before) is assigned."""
    tp = TopicPartition("readings", 3)
    client = _Refusing()
    consumer = confluent.ConfluentConsumer(client, "earliest", cooperative=True)  # type: ignore[arg-type]
    with pytest.raises(KafkaClientError) as refused:
        consumer.seek(tp, 5810)
    assert refused.value.retriable and client.calls == []
    monkeypatch.setattr(confluent, "SEEK_REFUSED_REASSIGN_S", 0.0)
    consumer.seek(tp, 5810)
    assert client.calls[0][0] == "unassign" and client.calls[0][1][0][:2] == ("readings", 3)
    assert client.calls[1] == ("assign", [("readings", 3, 5810)])
    assert "readings[3] assigned again at offset 5810" in caplog.text
    failing = confluent.ConfluentConsumer(_Refusing(KafkaError._STATE), "earliest", cooperative=True)  # type: ignore[arg-type]
    with pytest.raises(KafkaClientError) as refused:
        failing.seek(tp, 5810)
    assert refused.value.retriable and "re-assigning" in str(refused.value)
    unassigned = _Refusing(assigned=False)
    confluent.ConfluentConsumer(unassigned, "earliest", cooperative=True).seek(tp, 5810)  # type: ignore[arg-type]
    assert unassigned.calls == [("assign", [("readings", 3, 5810)])]


def test_a_confluent_seek_refused_for_the_partitions_state_under_eager_assignment_is_retried():
    """An eager assign() would restart every other partition: there the seek is tried again a
    moment later (retriable), not the end of the run."""
    client = _Refusing()
    consumer = confluent.ConfluentConsumer(client, "earliest", cooperative=False)  # type: ignore[arg-type]
    with pytest.raises(KafkaClientError) as refused:
        consumer.seek(TopicPartition("readings", 0), 5810)
    assert refused.value.retriable and "seek" in str(refused.value)
    assert client.calls == []


def test_a_confluent_seek_refusal_time_is_forgotten_when_the_partition_leaves(monkeypatch):
    """The time of a refused seek belongs to that assignment: kept across a revocation, the first
    refusal after the partition came back 30 s later had assigned it again at once, skipping the
    wait that keeps librdkafka from taking the call for the answer to a queued rebalance."""
    tp = TopicPartition("readings", 3)
    client = _Refusing()
    consumer = confluent.ConfluentConsumer(client, "earliest", cooperative=True)  # type: ignore[arg-type]
    now = [1000.0]
    monkeypatch.setattr(confluent.time, "monotonic", lambda: now[0])
    with pytest.raises(KafkaClientError):
        consumer.seek(tp, 10)
    consumer._unassign(client, [RdTopicPartition("readings", 3)])  # revoked (or lost), then assigned again
    client.calls.clear()
    now[0] += 60.0
    with pytest.raises(KafkaClientError) as refused:
        consumer.seek(tp, 20)
    assert refused.value.retriable and client.calls == []  # retried, not assigned again yet


class _Polled:
    """A librdkafka message or event, as poll gives it."""

    def __init__(self, error: KafkaError | None = None, offset: int = 5) -> None:
        self._error, self._offset = error, offset

    def error(self):
        return self._error

    def topic(self):
        return "readings"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def key(self):
        return b"k"

    def value(self):
        return b"{}"

    def headers(self):
        return None

    def timestamp(self):
        return (0, -1)


class _Polling:
    def __init__(self, first, rest) -> None:
        self.first, self.rest = first, rest

    def poll(self, timeout):
        return self.first

    def consume(self, num_messages, timeout):
        return self.rest


@pytest.mark.parametrize("code", sorted(confluent.REFUSED))
def test_a_confluent_authorisation_refusal_polled_as_an_event_ends_the_run_as_kafka_pythons_does(code: int):
    """librdkafka reports a missing ACL on the topic or the group as a consumer event from poll,
    neither fatal nor raised; it had been logged at DEBUG, and the service consumed nothing while
    its health beat. Not retriable, as kafka-python's poll raises it."""
    refused = _Polled(KafkaError(code))
    for client in (_Polling(refused, []), _Polling(_Polled(), [refused, _Polled(offset=6)])):
        consumer = confluent.ConfluentConsumer(client, "earliest", cooperative=True)  # type: ignore[arg-type]
        with pytest.raises(KafkaClientError) as raised:
            consumer.poll(1.0, 10)
        assert not raised.value.retriable and "poll" in str(raised.value)
    other = _Polling(_Polled(), [_Polled(KafkaError(KafkaError._PARTITION_EOF)), _Polled(offset=6)])
    polled = confluent.ConfluentConsumer(other, "earliest", cooperative=True).poll(1.0, 10)  # type: ignore[arg-type]
    assert [m.offset for m in polled] == [5, 6]  # other events: the client goes on by itself


@pytest.mark.parametrize("code", sorted(confluent.CHANGELOG_PARTITION_UNKNOWN))
def test_a_changelog_partition_the_clients_metadata_lacks_for_a_while_is_retriable(code: int):
    """After a broker restart librdkafka said "Local: Unknown partition" for a partition of the
    checkpoint changelog (opened with it): that had ended two runs of the chaos test. Recovery
    retries a retriable error every STORE_RETRY_S, the partition paused meanwhile."""
    from types import SimpleNamespace

    def watermarks(partition, timeout):
        raise KafkaException(KafkaError(code))

    changelog = confluent.ConfluentChangelog("checkpoints", SimpleNamespace(get_watermark_offsets=watermarks), None)  # type: ignore[arg-type]
    with pytest.raises(KafkaClientError, match=r"end offset of checkpoints\[4\]") as raised:
        changelog.end_offset(4, 1.0)
    assert raised.value.retriable


def test_confluent_fatal_errors_are_not_retried_whatever_their_code():
    """A fatal error with a timeout's or a group's code (librdkafka marks fencing fatal) ends the
    run; it had become a retriable BrokerTimeout or a GroupMovedOn by its code."""
    for code in (KafkaError._TIMED_OUT, KafkaError.FENCED_INSTANCE_ID, KafkaError.REBALANCE_IN_PROGRESS):
        error = confluent.client_error(KafkaException(KafkaError(code, fatal=True)), "commit")
        assert type(error) is KafkaClientError and not error.retriable, code


def test_a_kafka_python_seek_of_a_partition_no_longer_assigned_is_retried_not_a_traceback():
    """kafka-python says ValueError('Unassigned partition') for a partition revoked between the
    loop's check and its seek; it had left the seam as a bare ValueError."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:9", api_version=(3, 0))  # nothing connects
    try:
        with pytest.raises(KafkaClientError, match="seek") as refused:
            kafka_python.KafkaPythonConsumer(consumer).seek(TopicPartition("readings", 0), 5)
        assert refused.value.retriable
    finally:
        consumer.close()


def test_a_kafka_python_committed_offsets_fetch_gives_up_at_its_timeout():
    """Without a timeout kafka-python looks for the group's coordinator for ever: partition
    recovery would hang the loop (no health beats, no stop) while the coordinator is away."""
    import threading

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:9", group_id="g", api_version=(3, 0),
                             reconnect_backoff_max_ms=100)
    outcome: list[BaseException | None] = []

    def fetch() -> None:
        try:
            kafka_python.KafkaPythonConsumer(consumer).committed([TopicPartition("readings", 0)], 0.5)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(15)
    try:
        assert not thread.is_alive(), "committed() did not give up at its timeout"
        assert isinstance(outcome[0], BrokerTimeout), outcome
    finally:
        consumer.close()


def test_a_kafka_python_transactions_sends_are_let_go_once_it_ends(monkeypatch: pytest.MonkeyPatch):
    """Exactly-once never asks delivery_failures (a failed send fails the commit): the futures of
    every send had been kept for the producer's life, memory growing with each message."""
    from kafka.future import Future

    class Client:
        def send(self, *args, **kwargs):
            future = Future()
            future.success(None)
            return future

        def commit_transaction(self) -> None: ...

        def abort_transaction(self) -> None:
            raise kp_errors.KafkaTimeoutError("abort")

    producer = kafka_python.KafkaPythonProducer(Client())  # type: ignore[arg-type]
    for _ in range(1000):
        producer.produce("out", b"k", b"v")
    producer.commit_transaction()
    assert producer._sent == []
    producer.produce("out", b"k", b"v")
    with pytest.raises(KafkaClientError):
        producer.abort_transaction()
    assert producer._sent == []


def test_a_kafka_python_producer_whose_transactions_cannot_start_is_closed(monkeypatch: pytest.MonkeyPatch):
    """A replacement producer is retried until one starts; each that failed at
    init_transactions had stayed open (its sender thread, and an InitProducerId that, answered
    later, could fence the one that started). The reason names the transaction coordinator."""
    from streamer.kafka import clients
    from streamer.kafka.clients import KafkaBootstrapError
    from streamer.settings import KafkaSettings

    made = []

    class Producer:
        def __init__(self, **config) -> None:
            self.closed_with: float | None = None
            made.append(self)

        def init_transactions(self) -> None:
            raise kp_errors.KafkaTimeoutError("Timeout waiting for transaction coordinator")

        def close(self, timeout: float | None = None) -> None:
            self.closed_with = timeout

    monkeypatch.setattr(clients, "KafkaProducer", Producer)
    with pytest.raises(KafkaBootstrapError, match="no transaction coordinator answered"):
        clients.make_producer(KafkaSettings(exactly_once=True), "instance-1")
    assert [p.closed_with for p in made] == [0.0]


def test_a_password_is_redacted_in_the_forms_the_client_libraries_log_it():
    """kafka-python's admin client logs its configuration's repr at DEBUG: a password with a
    backslash or a quote shows escaped there, and had been left as it was."""
    import logging

    from streamer.kafka.clients import REDACTED, _SecretRedaction

    redaction = _SecretRedaction()
    secret = "caf\u00e9\\pw'\"\x01"
    redaction.add(secret)
    for shown in (repr({"sasl_plain_password": secret}), repr(secret.encode()), ascii(secret), secret):
        record = logging.LogRecord("kafka.admin.client", logging.DEBUG, __file__, 1, "config: %s", (shown,), None)
        redaction.filter(record)
        assert REDACTED in record.getMessage() and "pw" not in record.getMessage(), record.getMessage()


def os_threads() -> int:
    """librdkafka's threads in this process (named rdk:main, rdk:broker...): threads that other
    tests left (a bootstrap abandoned on its helper thread) come and go on their own."""
    from pathlib import Path

    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += (task / "comm").read_text().startswith("rdk:")
        except OSError:  # the thread ended meanwhile
            pass
    return count


def threads_back_to(base: int, within_s: float = 10.0) -> int:
    """The process's OS thread count once it is back to ``base`` (librdkafka's threads end a
    moment after the client), or at ``within_s``."""
    import time

    deadline = time.monotonic() + within_s
    while os_threads() > base and time.monotonic() < deadline:
        time.sleep(0.05)
    return os_threads()


def test_a_kafka_python_rebalance_hooks_error_crosses_the_seam_as_raised_as_confluents_does(caplog):
    # kafka-python catches a hook's error, finishes the rebalance and raises KafkaError("User
    # rebalance callback throws an error") from it: the run had ended on that, not retriable
    # whatever the hook raised, its reason only in kafka-python's own log. Its real join-prepare
    # and close code runs here (no broker: the hooks run before any request is answered).
    import logging

    from kafka import KafkaConsumer
    from kafka import TopicPartition as KafkaTopicPartition

    from streamer.kafka.abstract import RebalanceHooks

    raised = KafkaClientError("checkpoint write to the changelog: broker away", retriable=True)

    def failing(partitions):
        raise raised

    caplog.set_level(logging.CRITICAL, logger="kafka")  # for this test alone: later ones read kafka's records
    client = KafkaConsumer(bootstrap_servers="127.0.0.1:1", group_id="g", enable_auto_commit=False,
                           api_version=(2, 8, 0))
    consumer = kafka_python.KafkaPythonConsumer(client)
    consumer.subscribe(["t"], RebalanceHooks(lambda partitions: None, failing, failing))
    client._subscription.assign_from_subscribed([KafkaTopicPartition("t", 0)])
    generation = client._coordinator._generation
    with pytest.raises(kp_errors.KafkaError) as wrapped:
        client._net.run(client._coordinator._on_join_prepare_async, generation.generation_id, generation.member_id)
    assert wrapped.value.__cause__ is raised

    class Polls:
        def poll(self, **kwargs):
            raise wrapped.value

    with pytest.raises(KafkaClientError) as polled:
        kafka_python.KafkaPythonConsumer(Polls()).poll(1.0, 10)
    assert polled.value is raised and polled.value.retriable
    # Its own errors are still the seam's.
    class Times:
        def poll(self, **kwargs):
            raise kp_errors.KafkaTimeoutError("no answer")

    with pytest.raises(BrokerTimeout, match="poll: KafkaTimeoutError"):
        kafka_python.KafkaPythonConsumer(Times()).poll(1.0, 10)
    # close revokes through the hook too: its error had left as kafka-python's own KafkaError.
    client._subscription.assign_from_subscribed([KafkaTopicPartition("t", 0)])
    with pytest.raises(KafkaClientError) as closed:
        consumer.close(1.0)
    assert closed.value is raised


def test_a_kafka_python_changelog_closes_its_producer_even_with_a_send_pending(caplog):
    # producer.close raises while a send is pending, before it stops its sender: the changelog's
    # producer had stayed open, its thread running, and a raw KafkaTimeoutError left close.
    import logging
    import time

    from kafka import KafkaConsumer, KafkaProducer
    from kafka import TopicPartition as KafkaTopicPartition

    caplog.set_level(logging.CRITICAL, logger="kafka")  # for this test alone: later ones read kafka's records
    producer = KafkaProducer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8, 0), acks="all")
    producer._accumulator.append(KafkaTopicPartition("changelog", 0), int(time.time() * 1000), b"k", b"v", [])
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8, 0), enable_auto_commit=False)
    kafka_python.KafkaPythonChangelog("changelog", consumer, producer).close()
    assert producer._closed
    producer._sender.join(30)  # told to stop; its last loop may outlast the close's join on a loaded host
    assert not producer._sender.is_alive()


def test_a_confluent_producer_closed_or_dropped_releases_librdkafkas_client():
    # close had only flushed, and the client's delivery callback (the wrapper's bound method)
    # kept a cycle: a producer dropped after close(0), as a replaced transactional one is, kept
    # librdkafka's threads and connections until a full garbage collection.
    import gc
    import time
    import weakref

    from confluent_kafka import Producer as RdProducer

    def producer() -> confluent.ConfluentProducer:
        errors = confluent._Errors()
        wrapper = confluent.ConfluentProducer(errors)
        wrapper.client = RdProducer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0, "error_cb": errors,
                                     "on_delivery": confluent._delivered_to(weakref.ref(wrapper)),
                                     "delivery.report.only.error": True})
        return wrapper

    gc.disable()
    try:
        base = os_threads()
        closed = producer()
        closed.produce("t", b"k", b"v")
        assert os_threads() > base
        started = time.monotonic()
        closed.close(0.2)
        assert time.monotonic() - started < 5
        with pytest.raises(RuntimeError, match="closed"):
            closed.client.flush(0)
        closed.close(0.2)  # again, as shutdown does to a producer replaced without a successor: no error
        dropped = producer()
        gone = weakref.ref(dropped)
        del dropped
        assert gone() is None  # freed with its last reference, no collection needed
        assert threads_back_to(base) <= base
    finally:
        gc.enable()


def test_a_confluent_producer_refused_at_start_up_is_closed_not_left_running():
    # Start-up tries again and again while the brokers are away: each refused producer had kept
    # librdkafka's threads and connections until a collection (the consumer was closed already).
    import gc

    from streamer.kafka.clients import KafkaBootstrapError
    from streamer.settings import KafkaSettings

    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", client="confluent-kafka")
    gc.disable()
    try:
        base = os_threads()
        refusals = []  # kept, as start-up keeps its last one to report: their frames hold the clients
        for _ in range(3):
            with pytest.raises(KafkaBootstrapError) as refused:
                confluent.make_producer(settings, "i", bootstrap_timeout_ms=200)
            refusals.append(refused.value)
        assert threads_back_to(base) <= base
    finally:
        gc.enable()


def test_a_confluent_producer_whose_transaction_call_has_not_returned_is_not_closed_under_it():
    # The loop gives up on a stuck send_offsets_to_transaction (TransactionStuck) and replaces the
    # producer: librdkafka's close, under the call still running, waited for it; a process of the
    # chaos run hung there for good, its loop with it.
    import threading

    class Stuck:
        def __init__(self) -> None:
            self.release, self.calls = threading.Event(), []

        def send_offsets_to_transaction(self, *args) -> None:
            self.release.wait(10)

        def __getattr__(self, name):
            def call(*args, **kwargs):
                self.calls.append(name)
                return 0
            return call

        def __len__(self) -> int:
            return 0

    producer = confluent.ConfluentProducer(confluent._Errors())
    producer.client = Stuck()
    call = threading.Thread(target=producer.send_offsets_to_transaction, args=({}, object()))
    call.start()
    while not producer._in_flight:
        time.sleep(0.01)
    producer.close(0)
    assert producer.client.calls == []  # neither flushed, purged nor closed under the call
    producer.client.release.set()
    call.join(5)
    producer.close(0)
    assert producer.client.calls == ["flush", "purge", "flush", "close"]


def test_a_confluent_changelog_write_gives_up_in_its_time_and_leaves_no_records_queued():
    """librdkafka's queue full (a failed save's records waiting while the brokers are away), a
    write waited for room until message.timeout.ms (5 minutes by default), whatever its timeout."""
    from confluent_kafka import Consumer as RdConsumer
    from confluent_kafka import Producer as RdProducer

    consumer = RdConsumer({"bootstrap.servers": "127.0.0.1:9", "group.id": "g", "log_level": 0})
    producer = RdProducer({"bootstrap.servers": "127.0.0.1:9", "acks": "all", "enable.idempotence": True,
                           "log_level": 0, "queue.buffering.max.messages": 2, "message.timeout.ms": 60_000})
    changelog = confluent.ConfluentChangelog("checkpoints", consumer, producer)
    try:
        for records in ([(b"a", b"v"), (b"b", b"v")], [(b"c", b"v"), (b"d", b"v"), (b"e", b"v")]):
            started = time.monotonic()
            with pytest.raises(KafkaClientError) as raised:
                changelog.write(0, records, 0.5)
            assert raised.value.retriable and time.monotonic() - started < 3, raised.value
            # Purged: the queue has room for queue.buffering.max.messages again (len(producer) would
            # also count the error events the unreachable broker keeps queueing for a poll).
            for key in (b"x", b"y"):
                producer.produce("checkpoints", value=b"v", key=key, partition=0)
            producer.purge(in_queue=True, in_flight=False)
            producer.poll(0)
    finally:
        consumer.close()
        producer.purge()
        producer.flush(0)


def test_a_confluent_poll_whose_second_take_fails_hands_over_the_first_message_then_raises():
    # librdkafka's position is past the message poll() took: raised at once, a retriable error
    # had the loop poll on without it, and its next commit passed it by (a message lost).
    class FailingRest(_Polling):
        def consume(self, num_messages, timeout):
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    consumer = confluent.ConfluentConsumer(FailingRest(_Polled(offset=5), []), "earliest", cooperative=True)  # type: ignore[arg-type]
    assert [m.offset for m in consumer.poll(1.0, 10)] == [5]
    with pytest.raises(KafkaClientError) as raised:
        consumer.poll(1.0, 10)
    assert raised.value.retriable and "poll" in str(raised.value)
    assert [m.offset for m in consumer.poll(1.0, 10)] == [5]  # raised once; polling goes on
    consumer.client = _Polling(_Polled(offset=5), [_Polled(offset=6)])
    with pytest.raises(KafkaClientError):
        consumer.poll(1.0, 10)  # the error deferred again above
    assert [m.offset for m in consumer.poll(1.0, 10)] == [5, 6]
