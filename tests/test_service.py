"""Start-up's wait for the brokers, no broker: bounded by kafka.startup_wait_s, interrupted by stop,
kafka-python's log lines folded into ours."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from streamer.kafka.clients import KafkaBootstrapError, KafkaLoginError
from streamer.service import MIN_ATTEMPT_S, StartupInterrupted, _until_reachable


class Unreachable:
    """A connect that waits its bootstrap timeout, logs like kafka-python, then fails."""

    def __init__(self) -> None:
        self.timeouts_ms: list[int] = []

    def __call__(self, timeout_ms: int) -> object:
        self.timeouts_ms.append(timeout_ms)
        for _ in range(5):
            logging.getLogger("kafka.net.manager").error("Connection failed: KafkaConnectionError: 111 ECONNREFUSED")
        time.sleep(timeout_ms / 1000)
        raise KafkaBootstrapError("127.0.0.1:1", {}, "no broker could be used")


def test_gives_up_within_the_wait_with_a_few_lines_of_ours(caplog):
    caplog.set_level(logging.INFO)
    connect = Unreachable()
    started = time.monotonic()
    with pytest.raises(KafkaBootstrapError):
        _until_reachable(connect, started + 3.0, threading.Event())
    elapsed = time.monotonic() - started
    assert 3.0 <= elapsed < 3.0 + MIN_ATTEMPT_S + 0.5
    assert not [r for r in caplog.records if r.name.startswith("kafka")]  # folded
    ours = [r for r in caplog.records if r.name == "streamer.service"]
    assert 1 <= len(ours) <= 3
    assert "ECONNREFUSED" in ours[-1].getMessage() and "giving up" in ours[-1].getMessage()


def test_zero_wait_is_one_short_try():
    connect = Unreachable()
    started = time.monotonic()
    with pytest.raises(KafkaBootstrapError):
        _until_reachable(connect, time.monotonic(), threading.Event())
    assert connect.timeouts_ms == [int(MIN_ATTEMPT_S * 1000)]
    assert time.monotonic() - started < MIN_ATTEMPT_S + 0.5


def test_no_deadline_tries_until_a_broker_answers_saying_it_is_waiting(caplog, monkeypatch):
    # A transactional producer replacing an aborted one, in the loop: it waits out any outage.
    monkeypatch.setattr("streamer.service.STARTUP_RETRY_S", 0.0)
    attempts, waited = [], []

    def answers_the_third_time(timeout_ms: int) -> object:
        attempts.append(timeout_ms)
        if len(attempts) < 3:
            raise KafkaBootstrapError("127.0.0.1:1", {}, "no broker could be used")
        return "client"

    caplog.set_level(logging.WARNING, logger="streamer.service")
    assert _until_reachable(answers_the_third_time, math.inf, threading.Event(), waiting=lambda: waited.append(1)) == "client"
    assert attempts == [30_000] * 3 and waited == [1, 1]
    assert [r.getMessage().endswith("trying again until one does") for r in caplog.records] == [True, True]


def test_stop_interrupts_a_try_in_progress():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(StartupInterrupted):
        _until_reachable(Unreachable(), time.monotonic() + 60, stop)
    assert time.monotonic() - started < 5  # not the try's 60 s


@contextmanager
def records_reaching_the_root() -> Iterator[list[logging.LogRecord]]:
    """The records the root logger's handlers (stderr, in a run) receive meanwhile; the client
    libraries' loggers put back as they were after (silencing them lasts for the process)."""
    from streamer.kafka.clients import CLIENT_LOGGERS

    class Seen(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    before = {name: (logging.getLogger(name).propagate, list(logging.getLogger(name).handlers)) for name in CLIENT_LOGGERS}
    seen = Seen()
    logging.getLogger().addHandler(seen)
    try:
        yield seen.records
    finally:
        logging.getLogger().removeHandler(seen)
        for name, (propagate, handlers) in before.items():
            logger = logging.getLogger(name)
            logger.propagate, logger.handlers = propagate, handlers


def test_an_abandoned_bootstrap_logs_nothing_after_the_stop():
    # The abandoned client goes on in its thread: its library's ERROR lines had reached stderr
    # (the root logger's handlers) once start-up's folding of them was left, after a clean stop.
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with records_reaching_the_root() as seen:
        with pytest.raises(StartupInterrupted) as stopped:
            _until_reachable(Unreachable(), time.monotonic() + 60, stop)
        assert stopped.value.abandoned
        seen.clear()
        later = threading.Thread(target=logging.getLogger("kafka.net.manager").error, args=("Connection failed",))
        later.start()
        later.join()
        assert not seen


def test_an_abandoned_topic_describe_logs_nothing_after_the_stop(monkeypatch):
    # The describe at start is abandoned on a stop too, its client going on in its thread.
    from streamer import service
    from streamer.settings import load_settings

    def describing(*args, **kwargs):
        time.sleep(1.0)
        logging.getLogger("kafka.conn").error("Connect attempt returned error 111")
        return {}

    monkeypatch.setattr(service, "describe_topics", describing)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with records_reaching_the_root() as seen:
        with pytest.raises(StartupInterrupted):
            service._topic_housekeeping(load_settings({"kafka": {"bootstrap_servers": "127.0.0.1:1"}}), stop)
        time.sleep(1.2)  # the describe's thread logs now
        assert not [r for r in seen if r.name.startswith("kafka")]


def test_a_refused_login_is_final():
    calls = []

    def refused(timeout_ms: int) -> object:
        calls.append(timeout_ms)
        raise KafkaLoginError("127.0.0.1:1", {}, Exception("bad password"))  # type: ignore[arg-type]

    with pytest.raises(KafkaLoginError):
        _until_reachable(refused, time.monotonic() + 60, threading.Event())
    assert len(calls) == 1


def test_kafka_logs_propagate_again_after_start_up(caplog):
    caplog.set_level(logging.INFO)
    _until_reachable(lambda timeout_ms: "client", time.monotonic() + 5, threading.Event())
    logging.getLogger("kafka.net.manager").error("after start-up")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("kafka")] == ["after start-up"]


def test_probes_answer_while_start_up_waits_for_the_brokers(tmp_path):
    """The metrics server had been started only once the topics answered: while start-up waited
    for the brokers, /readyz refused connections instead of saying "starting", and /healthz,
    once up, failed at 60 s of a wait allowed to last kafka.startup_wait_s per client."""
    import socket
    import urllib.error
    import urllib.request

    from streamer.model import save_model_file
    from streamer.service import run_service
    from streamer.settings import load_settings
    from tests.conftest import make_bundle

    bundle = make_bundle(input_size=1, hidden_size=8, num_layers=1)
    save_model_file(tmp_path / "m.pt", bundle.model, bundle.config, "v")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once this is closed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    settings = load_settings({
        "kafka": {"bootstrap_servers": f"127.0.0.1:{closed_port}", "startup_wait_s": 60},
        "model": {"path": tmp_path / "m.pt", "device": "cpu"},
        "checkpoint": {"directory": tmp_path / "cp"},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    })
    stop = threading.Event()
    runner = threading.Thread(target=run_service, args=(settings, stop), daemon=True)
    runner.start()

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, repr(exc)

    try:
        deadline = time.monotonic() + 30
        while (answer := get("/readyz"))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer[0] == 503 and "starting" in answer[1], answer
        assert get("/healthz")[0] == 200
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()


def test_stop_set_while_the_engine_is_built_ends_the_run_before_any_kafka_call(monkeypatch, caplog, tmp_path):
    # SIGTERM during model.compile (seconds at start-up): the signal handler only sets stop, so the
    # build finishes; then the run ends without contacting the brokers, and says so.
    from streamer import service
    from streamer.model import save_model_file
    from streamer.settings import load_settings
    from tests.conftest import make_bundle

    bundle = make_bundle(input_size=1, hidden_size=8, num_layers=2)
    model_file = tmp_path / "model.pt"
    save_model_file(model_file, bundle.model, bundle.config, "service-test")

    stop = threading.Event()
    real_build = service.build_engine

    def build_signalled(settings):
        engine = real_build(settings)
        stop.set()
        return engine

    def no_kafka(*args, **kwargs):
        raise AssertionError("Kafka contacted after stop")

    monkeypatch.setattr(service, "build_engine", build_signalled)
    monkeypatch.setattr(service, "_topics_ready", no_kafka)
    caplog.set_level(logging.INFO, logger="streamer.service")
    settings = load_settings({"model": {"path": model_file}, "kafka": {"bootstrap_servers": "127.0.0.1:1"}})
    summary = service.run_service(settings, stop)
    assert summary.readings == 0 and summary.batches == 0
    said = [r.getMessage() for r in caplog.records if r.name == "streamer.service"]
    assert said[-1] == "stopped during start-up, before Kafka was contacted"
    assert not [m for m in said if "waiting for Kafka" in m]


def test_stop_set_while_the_topics_are_described_is_not_waited_out(monkeypatch):
    # The describe at start waits up to 10 s for brokers that vanished right after answering.
    from streamer import service
    from streamer.settings import load_settings

    def unanswered(*args, **kwargs):
        time.sleep(10)
        raise AssertionError("not abandoned")

    monkeypatch.setattr(service, "describe_topics", unanswered)
    settings = load_settings({"kafka": {"bootstrap_servers": "127.0.0.1:1"}, "model": {"path": "unused.pt"}})
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(StartupInterrupted):
        service._topic_housekeeping(settings, stop)
    assert time.monotonic() - started < 5  # not the describe's 10 s


def test_stop_set_before_the_engine_is_built_skips_the_build(monkeypatch, caplog):
    from streamer import service
    from streamer.settings import load_settings

    def no_build(settings):
        raise AssertionError("the engine was built after stop")

    monkeypatch.setattr(service, "build_engine", no_build)
    caplog.set_level(logging.INFO, logger="streamer.service")
    stop = threading.Event()
    stop.set()
    settings = load_settings({"model": {"path": "unused.pt"}, "kafka": {"bootstrap_servers": "127.0.0.1:1"}})
    assert service.run_service(settings, stop).readings == 0
    assert [r.getMessage() for r in caplog.records] == ["stopped during start-up, before Kafka was contacted"]


def test_a_started_service_reads_the_brokers_reachable_and_a_stopping_one_not_ready(monkeypatch, tmp_path):
    # streamer_broker_reachable had read 0 (unreachable) from start-up, where every client had
    # just had its answer, until the loop's first probe; /readyz had read 200 while it stopped.
    from prometheus_client import CollectorRegistry

    from streamer import service
    from streamer.kafka.memory import MemoryBroker, MemoryConsumer, MemoryProducer
    from streamer.model import save_model_file
    from streamer.settings import load_settings
    from tests.conftest import make_bundle

    bundle = make_bundle(input_size=1, hidden_size=8, num_layers=1)
    save_model_file(tmp_path / "m.pt", bundle.model, bundle.config, "v")
    broker = MemoryBroker()
    seen = {}

    def topics_ready(settings, deadline, stop, answered):  # the brokers answer: reachable from then on
        seen["reachable before the brokers answer"] = registry.get_sample_value("streamer_broker_reachable")
        answered()
        seen["reachable once they answer"] = registry.get_sample_value("streamer_broker_reachable")
        return False

    monkeypatch.setattr(service, "_topics_ready", topics_ready)
    monkeypatch.setattr(service, "_topic_housekeeping", lambda *args: None)
    monkeypatch.setattr(service, "open_consumer", lambda *args: MemoryConsumer(broker, "g"))
    monkeypatch.setattr(service, "open_producer", lambda *args: MemoryProducer(broker))

    def run(pipeline, stop):
        seen["reachable at the loop's start"] = registry.get_sample_value("streamer_broker_reachable")
        pipeline.health.beat()
        seen["ready"] = pipeline.health.readiness()
        stop.set()
        seen["stopping"] = pipeline.health.readiness()
        return service.RunSummary()

    monkeypatch.setattr(service.Pipeline, "run", run)
    settings = load_settings({"kafka": {"bootstrap_servers": "127.0.0.1:1"},
                              "model": {"path": tmp_path / "m.pt", "device": "cpu"},
                              "checkpoint": {"directory": tmp_path / "cp"}, "metrics": {"enabled": False}})
    registry = CollectorRegistry()
    service.run_service(settings, threading.Event(), registry)
    assert seen == {"reachable before the brokers answer": 0.0, "reachable once they answer": 1.0,
                    "reachable at the loop's start": 1.0, "ready": (True, "ok"),
                    "stopping": (False, "stopping: the batch in hand is finished, checkpointed and committed")}


def test_a_retriable_client_error_after_the_bootstrap_is_tried_again_and_a_final_one_is_not(caplog, monkeypatch):
    # The brokers answered the bootstrap, then left before the checkpoint store's first call
    # answered (its changelog's partitions): that ended the start-up, where a bootstrap that no
    # broker answered is tried again until kafka.startup_wait_s.
    from streamer.kafka.abstract import BrokerTimeout, KafkaClientError

    monkeypatch.setattr("streamer.service.STARTUP_RETRY_S", 0.0)
    caplog.set_level(logging.WARNING, logger="streamer.service")
    calls = []

    def connect(timeout_ms: int) -> str:
        calls.append(timeout_ms)
        if len(calls) < 3:
            raise BrokerTimeout("changelog topic 'checkpoints': no partitions known within 30s")
        return "store"

    assert _until_reachable(connect, time.monotonic() + 60, threading.Event(), what="the checkpoint store") == "store"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[0].startswith("the checkpoint store: changelog topic 'checkpoints': no partitions")
    assert "trying again for" in said[0]

    def refused(timeout_ms: int) -> str:
        calls.append(timeout_ms)
        raise KafkaClientError("not authorised", retriable=False)

    calls.clear()
    with pytest.raises(KafkaClientError, match="not authorised"):
        _until_reachable(refused, time.monotonic() + 60, threading.Event())
    assert len(calls) == 1
