"""kafka-python clients configured the way the run loop relies on.

Consumer: manual commits only (offsets are committed after the batch's predictions are
acknowledged), raw bytes. Producer: acks=all, idempotent, small linger so a batch's sends
share requests. Every client gets the same security settings (security_config); a broker that
cannot be used at the start is a KafkaBootstrapError (KafkaLoginError when it refused the login).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError, KafkaTimeoutError, SaslAuthenticationFailedError, TopicAlreadyExistsError
from kafka.structs import MemberState

from streamer.errors import StartupInterrupted, StreamerError
from streamer.kafka.abstract import GroupWatch, KafkaClientError
from streamer.settings import KafkaSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_CHECK_S = 0.1  # how often interruptible looks at its stop

# An open transaction of a process that died blocks read_committed consumers until it times
# out: keep that short (a batch's transaction takes well under a second).
TRANSACTION_TIMEOUT_MS = 15_000
# kafka-python backs off reconnecting exponentially up to 30 s by default, so a broker that came
# back was used only ~20 s later; 1 s caps the wait after a return at about a second.
RECONNECT_BACKOFF_MAX_MS = 1000

REDACTED = "**********"


class _SecretRedaction(logging.Filter):
    """Replaces the passwords handed to kafka-python in its log records.

    At DEBUG kafka-python logs the admin client's configuration, every request (PLAIN's
    SaslAuthenticate bytes hold the password) and the raw bytes it sends.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secret: str) -> None:
        # As text, and as it shows inside the repr of bytes and of text (the admin client logs its
        # configuration's repr: backslashes and quotes escaped), and ascii()'s escapes.
        self.secrets.update({secret, repr(secret.encode())[2:-1], repr(secret)[1:-1], ascii(secret)[1:-1]} - {""})

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record: left for the handler to report
                return True
            redacted = message
            for secret in self.secrets:
                redacted = redacted.replace(secret, REDACTED)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


_REDACTION = _SecretRedaction()


def _redact_kafka_loggers() -> None:
    # A logger's filters see only the records logged on it, so each of kafka-python's loggers gets
    # one: those that exist once kafka is imported, and the three seen logging secrets.
    names = {"kafka.admin.client", "kafka.net.connection", "kafka.protocol.parser", "librdkafka", "librdkafka.errors"}
    names.update(
        name for name, logger in list(logging.root.manager.loggerDict.items())
        if name.split(".")[0] == "kafka" and isinstance(logger, logging.Logger)
    )
    for name in names:
        logging.getLogger(name).addFilter(_REDACTION)


_redact_kafka_loggers()


class KafkaBootstrapError(StreamerError):
    """No broker of ``bootstrap_servers`` could be used before kafka-python's bootstrap timeout."""

    def __init__(self, bootstrap_servers: str, security: dict[str, object], reason: str) -> None:
        super().__init__(f"Kafka at {bootstrap_servers} ({_describe(security)}): {reason}")
        self.bootstrap_servers = bootstrap_servers
        self.reason = reason


class KafkaSettingsRefused(StreamerError):
    """The client library refused its settings as it was created (librdkafka checks a TLS file's
    contents then, not at the first connection): final, not a broker to wait for."""

    def __init__(self, security: dict[str, object], reason: str) -> None:
        super().__init__(f"Kafka client ({_describe(security)}): its settings were refused: {reason}")
        self.reason = reason


class KafkaLoginError(KafkaBootstrapError):
    """The brokers refused this client's SASL login (user, password or mechanism)."""

    def __init__(self, bootstrap_servers: str, security: dict[str, object], refusal: SaslAuthenticationFailedError) -> None:
        super().__init__(bootstrap_servers, security, f"the SASL login was refused: {refusal}")
        self.refusal = refusal


def _describe(security: dict[str, object]) -> str:
    protocol = security.get("security_protocol", "PLAINTEXT")
    if "sasl_mechanism" in security:
        return f"{protocol}, {security['sasl_mechanism']} as user {security.get('sasl_plain_username')!r}"
    return str(protocol)


class _LoginRefusals(logging.Filter):
    """Collects the SASL refusals that kafka-python logs (as an argument of an ERROR record)."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[SaslAuthenticationFailedError] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            self.refusals.extend(arg for arg in record.args if isinstance(arg, SaslAuthenticationFailedError))
        return True


def bootstrap_failure_reason(security_protocol: str) -> str:
    """Why no broker could be used, as far as the protocol allows: not reachable, always; a TLS
    failure only over SSL; a refused login only with SASL."""
    causes = ["not reachable"]
    if "SSL" in security_protocol:
        causes.append("a TLS failure")
    if security_protocol.startswith("SASL_"):
        causes.append("a refused login (check the user and password)")
    listed = causes[0] if len(causes) == 1 else ", ".join(causes[:-1]) + " or " + causes[-1]
    return f"no broker could be used before the bootstrap timeout: {listed}"


@contextmanager
def _bootstrap_failure_explained(bootstrap_servers: str, security: dict[str, object]) -> Iterator[None]:
    """Turns kafka-python's bare bootstrap timeout into KafkaLoginError or KafkaBootstrapError.

    kafka-python 3.0.12 retries a refused login until bootstrap_timeout_ms (30 s by default) and then
    raises KafkaTimeoutError; the refusal is only logged (logger kafka.net.connection, which must let
    ERROR through for it to be seen here). Often it is not even seen: the broker sends its refusal and
    closes the connection at once, and kafka-python drops data read together with the close
    ("socket disconnected"). Hence the hedged reason of KafkaBootstrapError.
    """
    logger = logging.getLogger("kafka.net.connection")
    refusals = _LoginRefusals()
    logger.addFilter(refusals)
    try:
        yield
    except KafkaTimeoutError as exc:
        if refusals.refusals:
            raise KafkaLoginError(bootstrap_servers, security, refusals.refusals[-1]) from exc
        reason = bootstrap_failure_reason(str(security.get("security_protocol", "PLAINTEXT")))
        # The admin client (topics) is kafka-python's whichever kafka.client serves the loop.
        raise KafkaBootstrapError(bootstrap_servers, security,
                                  reason + "; the log of kafka-python (its admin client) has the details") from exc
    finally:
        logger.removeFilter(refusals)


def security_config(settings: KafkaSettings) -> dict[str, object]:
    """kafka-python keyword arguments for ``settings.security_protocol``: only those that apply to it.

    The one place the secrets are unwrapped; from here on kafka-python's log records have them redacted.
    """
    config: dict[str, object] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        assert settings.sasl_password is not None  # KafkaSettings checks SASL_* settings are complete
        # kafka-python takes the SCRAM credentials from the sasl_plain_* arguments too.
        config.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password.get_secret_value(),
        )
        _REDACTION.add(settings.sasl_password.get_secret_value())
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_check_hostname"] = settings.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(settings, name)
            if path is not None:
                config[name] = str(path)
        if settings.ssl_password is not None:
            config["ssl_password"] = settings.ssl_password.get_secret_value()
            _REDACTION.add(settings.ssl_password.get_secret_value())
    return config


def assignment_strategy(settings: KafkaSettings) -> str:
    """Cooperative-sticky (KIP-429) keeps unmoved partitions' state in memory through a
    rebalance. In exactly-once mode the eager range assignor is the default: every member gives
    up all its partitions before any is handed out again, so no two members ever hold one
    partition in the same generation (seen with kafka-python's cooperative protocol after a
    broker restart, which let two members commit transactions for one partition)."""
    name = settings.assignment
    if name == "auto":
        name = "range" if settings.exactly_once else "cooperative-sticky"
    return name


def assignor(settings: KafkaSettings) -> type:
    """kafka-python's assignor class for assignment_strategy."""
    return RangePartitionAssignor if assignment_strategy(settings) == "range" else CooperativeStickyAssignor


def transactional_id(settings: KafkaSettings, instance_id: str | None = None) -> str:
    """The prefix, the group and kafka.instance_id (random when unset), so a restarted instance
    fences its predecessor's open transaction at once."""
    instance = instance_id or settings.instance_id or uuid.uuid4().hex[:12]
    return f"{settings.transactional_id_prefix}-{settings.group_id}-{instance}"


def redact_secret(secret: str) -> None:
    """From now on ``secret`` is replaced in the Kafka client libraries' log records."""
    _REDACTION.add(secret)


def _bootstrap_timeout(bootstrap_timeout_ms: int | None) -> dict[str, int]:
    return {} if bootstrap_timeout_ms is None else {"bootstrap_timeout_ms": max(1, int(bootstrap_timeout_ms))}


def make_consumer(settings: KafkaSettings, max_poll_records: int, bootstrap_timeout_ms: int | None = None) -> KafkaConsumer:
    """``bootstrap_timeout_ms``: how long to wait for a first broker (kafka-python's 30 s when None)."""
    security = security_config(settings)
    with _bootstrap_failure_explained(settings.bootstrap_servers, security):
        return KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=settings.group_id,
            client_id=settings.client_id,
            enable_auto_commit=False,
            auto_offset_reset=settings.auto_offset_reset,
            max_poll_records=max_poll_records,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=max(1000, settings.session_timeout_ms // 3),
            fetch_max_wait_ms=100,
            partition_assignment_strategy=(assignor(settings),),
            isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            **_bootstrap_timeout(bootstrap_timeout_ms),
            **security,
        )


def make_producer(
    settings: KafkaSettings, instance_id: str | None = None, bootstrap_timeout_ms: int | None = None
) -> KafkaProducer:
    """Idempotent, acks=all. In exactly-once mode transactional, transactions initialised: the
    transactional id is the prefix, the group and kafka.instance_id (random when unset), so a
    restarted instance fences its predecessor's open transaction at once."""
    security = security_config(settings)
    transactional: dict[str, object] = {}
    if settings.exactly_once:
        transactional = {
            "transactional_id": transactional_id(settings, instance_id),
            "transaction_timeout_ms": TRANSACTION_TIMEOUT_MS,
        }
    with _bootstrap_failure_explained(settings.bootstrap_servers, security):
        producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            client_id=settings.client_id,
            acks="all",
            linger_ms=5,
            batch_size=256 * 1024,
            max_request_size=settings.max_message_bytes,  # a dead letter carries a whole input message
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            **_bootstrap_timeout(bootstrap_timeout_ms),
            **transactional,
            **security,
        )
    if settings.exactly_once:
        try:
            producer.init_transactions()  # waits for a transaction coordinator: a broker must answer
        except KafkaError as exc:
            # Closed at once: a producer left behind would keep its sender thread, and its
            # InitProducerId, answered later, could fence the producer of the next try.
            close_producer(producer, 0.0)
            raise KafkaBootstrapError(settings.bootstrap_servers, security,
                                      f"no transaction coordinator answered: {exc!r}") from exc
    return producer


def close_producer(producer: KafkaProducer, timeout_s: float) -> None:
    """Close ``producer``, waiting up to ``timeout_s`` for what it still sends, then dropping it.

    kafka-python's ``close`` flushes first and raises KafkaTimeoutError while sends are pending
    (UnknownError after it split a batch the broker refused as too large), before it stops its
    sender thread: the producer would stay open, with its thread and
    connections. Then the sender is closed without sending (its pending sends fail) and the
    producer closed again, now with nothing pending.
    """
    try:
        producer.close(timeout=timeout_s)
        return
    except KafkaError:  # a timeout, or UnknownError('Future not done') of a batch it split and lost
        pass
    sender = getattr(producer, "_sender", None)  # kafka-python 3.x: the I/O thread
    if sender is not None:
        sender.force_close()
        sender.join(max(timeout_s, 1.0))
    producer.close(timeout=0)


# Room for a record's key, headers and batch framing beside its value.
RECORD_OVERHEAD_BYTES = 64 * 1024


def changelog_request_bytes(max_value_bytes: int) -> int:
    """The fetch and request size a changelog client needs for values of ``max_value_bytes``."""
    return max(1024 * 1024, max_value_bytes + RECORD_OVERHEAD_BYTES)


# How long a changelog producer waits for a topic's metadata (a send to a partition it does not
# know yet), not kafka-python's 60 s: the checkpoint store's call timeout (checkpoint_kafka.CALL_TIMEOUT_S).
CHANGELOG_METADATA_WAIT_MS = 30_000


def make_changelog_clients(
    settings: KafkaSettings, max_value_bytes: int, bootstrap_timeout_ms: int | None = None
) -> tuple[KafkaConsumer, KafkaProducer]:
    """A group-less consumer (no commits, read_uncommitted) and an idempotent, non-transactional
    acks=all producer for a changelog whose values are at most ``max_value_bytes``."""
    security = security_config(settings)
    request_bytes = changelog_request_bytes(max_value_bytes)
    with _bootstrap_failure_explained(settings.bootstrap_servers, security):
        consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=None,
            client_id=f"{settings.client_id}-changelog",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=request_bytes,
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
            **_bootstrap_timeout(bootstrap_timeout_ms),
            **security,
        )
        try:
            producer = KafkaProducer(
                bootstrap_servers=settings.bootstrap_servers.split(","),
                client_id=f"{settings.client_id}-changelog",
                acks="all",
                linger_ms=5,
                max_block_ms=CHANGELOG_METADATA_WAIT_MS,
                max_request_size=request_bytes,
                reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
                **_bootstrap_timeout(bootstrap_timeout_ms),
                **security,
            )
        except BaseException:
            consumer.close(autocommit=False)
            raise
    return consumer, producer


def interruptible(call: Callable[[], T], stop: threading.Event | None) -> T:
    """``call()`` on a helper thread, abandoned when ``stop`` is set (StartupInterrupted): kafka-python's
    bootstrap does not look at signals, and librdkafka's waits in C, where Python runs no signal
    handler (a signal's handler runs between the main thread's waits here: Ctrl-C's
    KeyboardInterrupt too). What an abandoned call still makes is closed."""
    if stop is None:
        return call()
    outcome: dict[str, object] = {}
    lock = threading.Lock()

    def run() -> None:
        try:
            result: object = call()
            key = "result"
        except BaseException as exc:  # handed to the caller below
            result, key = exc, "error"
        with lock:
            outcome[key] = result
            abandoned = outcome.get("abandoned", False)
        if abandoned and key == "result" and hasattr(result, "close"):
            try:
                result.close()  # type: ignore[attr-defined]
            except Exception:
                log.debug("closing a client made after stop failed", exc_info=True)

    worker = threading.Thread(target=run, name="kafka-startup", daemon=True)
    worker.start()
    while worker.is_alive():
        if stop.wait(STOP_CHECK_S):
            with lock:
                if "result" not in outcome and "error" not in outcome:
                    outcome["abandoned"] = True
                    raise StartupInterrupted(abandoned=True)
        worker.join(0.0)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


@dataclass(frozen=True)
class TopicSpec:
    """What a topic is created with: partitions, replication factor and topic configs
    (e.g. {"retention.ms": "604800000"} or {"cleanup.policy": "compact"})."""

    partitions: int
    replication_factor: int = 1
    configs: dict[str, str] = field(default_factory=dict)


class MissingTopics(StreamerError):
    """Topics that must exist (and are not streamer's to create) do not."""

    def __init__(self, topics: list[str]) -> None:
        super().__init__(f"topics {topics} do not exist")
        self.topics = topics


def ensure_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int | TopicSpec],
    client_id: str = "streamer-admin",
    security: dict[str, object] | None = None,
    bootstrap_timeout_ms: int | None = None,
    must_exist: Sequence[str] = (),
) -> list[str]:
    """Create the topics (name -> TopicSpec, or a partition count: replication factor 1, no
    configs) that do not exist yet; returns those created. Topics that exist are left as they are.
    KafkaClientError when the brokers refuse one (e.g. more replicas than brokers); MissingTopics
    when one of ``must_exist`` does not exist (after the others were created).

    ``security``: kafka-python security arguments, as security_config returns them.
    """
    admin = _admin(bootstrap_servers, client_id, security or {}, bootstrap_timeout_ms)
    try:
        existing = set(admin.list_topics())
        created = []
        for name, spec in topics.items():
            if name in existing:
                continue
            spec = TopicSpec(spec) if isinstance(spec, int) else spec
            topic = NewTopic(name, spec.partitions, spec.replication_factor, topic_configs=dict(spec.configs))
            try:
                admin.create_topics([topic])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                # kafka-python's message is the whole request and response; the broker's reason is in it.
                reason = re.search(r"error_message='([^']*)'", str(exc))
                before = f" (created before it: {', '.join(created)})" if created else ""
                raise KafkaClientError(
                    f"creating topic {name} ({spec.partitions} partitions, replication factor "
                    f"{spec.replication_factor}, {spec.configs or 'no configs'}): {type(exc).__name__}: "
                    f"{reason.group(1) if reason else exc}{before}", cause=exc) from exc
            log.info("created topic %s", name)
        missing = [name for name in must_exist if name not in existing and name not in created]
        if missing:
            raise MissingTopics(missing)
        return created
    finally:
        admin.close()


def _admin(bootstrap_servers: str, client_id: str, security: dict[str, object],
           bootstrap_timeout_ms: int | None) -> KafkaAdminClient:
    with _bootstrap_failure_explained(bootstrap_servers, security):
        return KafkaAdminClient(
            bootstrap_servers=bootstrap_servers.split(","), client_id=client_id,
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS, **_bootstrap_timeout(bootstrap_timeout_ms), **security,
        )


@dataclass(frozen=True)
class TopicState:
    """An existing topic as the brokers describe it: its partition count and the configs asked
    for (set on the topic or inherited from the broker; one the brokers do not give is left out)."""

    partitions: int
    replication_factor: int
    configs: dict[str, str]  # those the brokers gave (describing configs may be refused: then none)


def describe_topics(
    bootstrap_servers: str,
    topics: Sequence[str],
    keys: Sequence[str],
    client_id: str = "streamer-admin",
    security: dict[str, object] | None = None,
    bootstrap_timeout_ms: int | None = None,
) -> dict[str, TopicState]:
    """Each of ``topics`` that exists, by name, with the config values of ``keys``."""
    admin = _admin(bootstrap_servers, client_id, security or {}, bootstrap_timeout_ms)
    try:
        found = {t["name"]: t.get("partitions") or [] for t in admin.describe_topics(list(topics))
                 if not t.get("error_code")}
        partitions = {name: len(parts) for name, parts in found.items()}
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, list(keys)) for name in partitions], config_filter="all",
        ) if partitions and keys else {}
    finally:
        admin.close()
    configs = {name: {key: str(entry["value"]) for key, entry in entries.items()
                      if key in keys and isinstance(entry, dict) and entry.get("value") is not None}
               for name, entries in described.get("topic", {}).items()}
    return {name: TopicState(count, len(found[name][0].get("replica_nodes") or []) if found[name] else 0,
                             configs.get(name, {})) for name, count in partitions.items()}


class _LastComplaint(logging.Handler):
    """Keeps the first WARNING or worse that kafka-python logged since ``first`` was reset (the
    reason a connect failed, e.g. "Connection failed: KafkaConnectionError: 111 ECONNREFUSED")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is not None:
            return
        try:
            self.first = record.getMessage()
        except Exception:  # a malformed record: nothing to keep
            pass


# The loggers of the client libraries: kafka-python's and librdkafka's (confluent.py routes it there).
CLIENT_LOGGERS = ("kafka", "librdkafka")


@contextmanager
def client_logs_handled_by(handler: logging.Handler) -> Iterator[None]:
    """While inside, the client libraries' log records (CLIENT_LOGGERS) go to ``handler`` only:
    filters on their loggers (secret redaction, login refusals) still see every record, only
    propagation to the application's handlers stops."""
    loggers = [logging.getLogger(name) for name in CLIENT_LOGGERS]
    propagate = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, was in zip(loggers, propagate):
            logger.propagate = was
            logger.removeHandler(handler)


def silence_client_logs() -> None:
    """From now on the client libraries' log records (CLIENT_LOGGERS) go nowhere: for a process
    that stops while a client it abandoned (a bootstrap that does not look at signals) goes on
    in its thread until exit, whose lines would otherwise follow the run's last line."""
    for name in CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())  # not Python's last-resort handler either
        logger.propagate = False


@contextmanager
def kafka_logs_folded() -> Iterator[_LastComplaint]:
    """While inside, the client libraries' log records go nowhere but to the handler yielded,
    which keeps the first complaint for a line of our own."""
    complaint = _LastComplaint()
    complaint.addFilter(_REDACTION)
    with client_logs_handled_by(complaint):
        yield complaint


# A member that holds no partitions and is not a settled member of a generation (joined, stable,
# heartbeats on) for this many session timeouts is taken to be stuck outside its group. A healthy
# join takes well under one session timeout here; the broker itself evicts a silent member after one.
OUTSIDE_GROUP_SESSIONS = 2


def _settled(coordinator: object) -> bool | None:
    """Whether kafka-python's group coordinator says this member is settled in a generation: state
    STABLE, a generation id and member id, heartbeats enabled. None when its internals are not the
    ones of kafka-python 3.0.x (then only time decides)."""
    state = getattr(coordinator, "state", None)
    generation = getattr(coordinator, "_generation", None)
    heartbeats = getattr(coordinator, "_heartbeat_enabled", None)
    if state is None or generation is None or heartbeats is None:
        return None
    generation_id = getattr(generation, "generation_id", -1)
    member_id = getattr(generation, "member_id", "")
    return state is MemberState.STABLE and generation_id is not None and generation_id >= 0 and bool(member_id) and bool(heartbeats)


class MembershipWatch(GroupWatch):
    """Finds a consumer left outside its group and forces it to rejoin (a work-around for
    kafka-python 3.0.12, which cannot be patched here).

    Seen in about 4 of 26 fresh group starts: ``ensure_active_group`` gives up on poll's timeout
    while its JoinGroup/SyncGroup attempt is in flight (coordinator/base.py ``join_group_async``
    caches the attempt in ``_join_task``); the SyncGroup reply is never applied, heartbeats stay
    off, and the member stays with no partitions for good while the loop looks healthy.

    ``check(broker_reachable)`` is called once per loop iteration (cheap: an attribute read or
    three). It fires when the consumer is subscribed, holds no partitions, the broker answers,
    and the coordinator is not settled in a generation (see ``_settled``) -- continuously for
    ``grace_s``. A member that is settled but got nothing (more members than partitions) is left
    alone. Firing logs one WARNING, drops the stale join attempt and requests a rejoin; the next
    firing, if the rejoin does not take, comes ``grace_s`` later.
    """

    def __init__(self, consumer: object, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.consumer = consumer
        self.grace_s = grace_s
        self.clock = clock
        self._outside_since: float | None = None
        self.outside: str | None = None  # why the member is outside its group; None while it is in
        self.rejoins = 0

    def check(self, broker_reachable: bool = True) -> bool:
        """True when it forced a rejoin this call."""
        consumer = self.consumer
        subscription = getattr(consumer, "subscription", None)  # absent: not a group consumer
        if not broker_reachable or subscription is None or consumer.assignment() or not subscription():
            self._outside_since = None
            self.outside = None
            return False
        coordinator = getattr(consumer, "_coordinator", None)
        if _settled(coordinator):
            self._outside_since = None
            self.outside = None
            return False
        now = self.clock()
        if self._outside_since is None:
            self._outside_since = now
            return False
        waited = now - self._outside_since
        if waited < self.grace_s:
            return False
        self.outside = (
            f"no partitions and not in a group generation for {waited:.0f}s "
            f"(coordinator {getattr(coordinator, 'state', '?')}); rejoin forced"
        )
        log.warning("consumer left outside its group: %s", self.outside)
        self._force_rejoin(coordinator)
        self.rejoins += 1
        self._outside_since = now
        return True

    @staticmethod
    def _force_rejoin(coordinator: object) -> None:
        if coordinator is None:
            return
        with getattr(coordinator, "_lock", nullcontext()):
            # The cached attempt whose reply was lost: without dropping it the next poll re-awaits it.
            if getattr(coordinator, "_join_task", None) is not None:
                coordinator._join_task = None
            request_rejoin = getattr(coordinator, "request_rejoin", None)
            if request_rejoin is not None:
                request_rejoin()
