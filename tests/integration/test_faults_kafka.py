"""Fault cases around the broker, each on a real process or broker: stopping during start-up,
giving up on an unreachable broker in time, and a broker that goes away and comes back
(readiness, lag, resumption)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.conftest import LOCAL_KAFKA, REPO, free_port
from tests.integration.helpers import ServiceThread, create_topic, produce, read_topic, service_settings
from tests.integration.test_pipeline_kafka import reading, write_model
from tests.test_metrics import get

pytestmark = pytest.mark.kafka

STOP_BOUND_S = 5.0  # SIGTERM -> exit 0, at any moment (README "Reliability")
# Start-up gives up within kafka.startup_wait_s + MIN_ATTEMPT_S (3 s) of starting to connect; the
# rest is for a loaded host (the log's first line is the model loaded, a step before connecting).
GIVE_UP_SLACK_S = 5.0
EXIT_AFTER_S = 10.0  # from the last line logged to the process gone (the interpreter's shutdown)


def give_up_times(output: str, exited: datetime) -> tuple[float, float]:
    """From the model loaded to giving up, and from giving up to the exit, by the log's clock:
    the interpreter's start and torch's import (14 s on a cold host) are not counted."""
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in output.splitlines() if line[:2] == "20"]
    return (stamps[-1] - stamps[0]).total_seconds(), (exited - stamps[-1]).total_seconds()
MAX_START_UP_LINES = 5  # lines a failed start-up may print (ours and the CLI's error)
READY_FAILS_WITHIN_S = 5.0  # /readyz turns 503 this long after the broker went away, at most
RESUMES_WITHIN_S = 5.0  # consumption resumes this long after the broker answers again, at most


def start_process(model: Path, bootstrap: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", "run", "--model-path", str(model), "--kafka-bootstrap-servers", bootstrap,
         "--kafka-client", os.environ.get("STREAMER_KAFKA__CLIENT", "kafka-python"), "--run-status-interval-s", "0", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")},
    )


def wait_for(condition, timeout_s: float, interval_s: float = 0.1) -> float | None:
    """Seconds until ``condition()`` held, or None when it did not within ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(interval_s)
    return None


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    write_model(path, seed=11, version="faults-v1")
    return path


def test_sigterm_while_waiting_for_the_broker_exits_0_promptly(model: Path):
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    process = start_process(model, closed, "--kafka-startup-wait-s", "120", "--metrics-enabled", "false")
    # Signalled once it waits for the broker: after the model is loaded (start-up on a busy machine
    # can take seconds before that; a signal then is not what this test is about).
    first = process.stdout.readline()
    assert "state table of" in first, first + process.communicate(timeout=30)[0]
    time.sleep(0.5)
    assert process.poll() is None, process.communicate()[0]
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    output = first + output
    took = time.monotonic() - signalled
    assert process.returncode == 0, output
    assert took < STOP_BOUND_S, f"exited {took:.1f}s after SIGTERM"
    assert json.loads(output.strip().splitlines()[-1])["summary"]["readings"] == 0


def test_sigint_while_running_exits_0_promptly(model: Path, kafka_bootstrap: str, unique: str):
    port = free_port()
    create_topic(kafka_bootstrap, f"in-{unique}")
    process = start_process(
        model, kafka_bootstrap, "--kafka-input-topic", f"in-{unique}", "--kafka-output-topic", f"out-{unique}",
        "--kafka-dead-letter-topic", f"dlq-{unique}", "--kafka-group-id", f"g-{unique}",
        "--metrics-port", str(port), "--checkpoint-enabled", "false",
    )
    try:
        assert wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 45) is not None
    except AssertionError:
        process.kill()
        raise AssertionError(process.communicate()[0])
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert time.monotonic() - signalled < STOP_BOUND_S, output


@pytest.mark.parametrize("wait_s", [0, 4])
def test_unreachable_broker_gives_up_within_startup_wait(model: Path, wait_s: int):
    closed = f"127.0.0.1:{free_port()}"
    process = start_process(model, closed, "--kafka-startup-wait-s", str(wait_s), "--metrics-enabled", "false")
    output, _ = process.communicate(timeout=60)
    waited, exit_took = give_up_times(output, datetime.now())
    assert process.returncode == 2, output
    lines = output.strip().splitlines()
    assert waited < wait_s + GIVE_UP_SLACK_S, f"gave up after {waited:.1f}s\n{output}"
    assert exit_took < EXIT_AFTER_S, f"exited {exit_took:.1f}s after giving up\n{output}"
    assert len(lines) <= MAX_START_UP_LINES, output
    assert not any(" kafka." in line for line in lines), output  # kafka-python's lines are folded into ours
    assert "ECONNREFUSED" in output and closed in lines[-1]


def test_an_input_topic_that_does_not_exist_is_waited_for_then_named(model: Path, kafka_bootstrap: str, unique: str):
    """Subscribed to a topic that does not exist, the loop would sit idle; run waits
    kafka.startup_wait_s for it (saying so once), then stops with one line naming the setting."""
    wait_s = 3
    process = start_process(
        model, kafka_bootstrap, "--kafka-input-topic", f"missing-{unique}", "--kafka-output-topic", f"out-{unique}",
        "--kafka-dead-letter-topic", f"dlq-{unique}", "--kafka-startup-wait-s", str(wait_s),
        "--metrics-enabled", "false", "--checkpoint-enabled", "false",
    )
    output, _ = process.communicate(timeout=60)
    waited, exit_took = give_up_times(output, datetime.now())
    assert process.returncode == 2, output
    assert waited < wait_s + GIVE_UP_SLACK_S and exit_took < EXIT_AFTER_S, (waited, exit_took, output)
    lines = output.strip().splitlines()
    assert sum("does not exist" in line and "waiting up to" in line for line in lines) == 1, output
    assert lines[-1].startswith("streamer: error: kafka.input_topic (flag --kafka-input-topic") and \
        f"'missing-{unique}': no such topic" in lines[-1], output


def test_an_input_topic_created_while_run_waits_is_read(model: Path, kafka_bootstrap: str, unique: str, tmp_path: Path):
    topics = {"in": f"late-{unique}", "out": f"out-{unique}", "dlq": f"dlq-{unique}"}
    settings = service_settings(kafka_bootstrap, topics, f"g-{unique}", model, tmp_path / "ck",
                                kafka={"startup_wait_s": 60})
    service = ServiceThread(settings)
    try:
        # The brokers answer, the topic is not there: reachable (it had read 0, and the alert on it
        # fired), and the service waits for the topic.
        assert wait_for(lambda: service.metric("streamer_broker_reachable") == 1, 30) is not None
        time.sleep(1.0)
        assert service.alive()
        create_topic(kafka_bootstrap, topics["in"])
        produce(kafka_bootstrap, topics["in"], [(b"dev-1", reading("dev-1", 1.0, [20.5, -3.0]), None)])
        assert wait_for(lambda: service.metric("streamer_predictions_total") >= 1, 45) is not None
    finally:
        service.stop()


@pytest.fixture
def own_broker(tmp_path: Path):
    """A broker this test may stop and start (the session's may be shared or external)."""
    env = {**os.environ, "KAFKA_PORT": "auto", "KAFKA_STATE_DIR": str(tmp_path / "kafka")}

    def local_kafka(command: str) -> str:
        done = subprocess.run([str(LOCAL_KAFKA), command], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    bootstrap = local_kafka("start").strip().splitlines()[-1]
    yield bootstrap, local_kafka
    subprocess.run([str(LOCAL_KAFKA), "clean"], env=env, capture_output=True, timeout=120)


MAX_OUTAGE_LINES = 6  # WARNING or worse logged while the broker is away, ours and the client library's


def test_broker_away_not_ready_lag_kept_and_prompt_resume(own_broker, model: Path, tmp_path: Path, unique: str, caplog):
    caplog.set_level(logging.INFO)
    bootstrap, local_kafka = own_broker
    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(bootstrap, topics["in"])
    # A backlog the service works through one reading a batch, so lag is large when the broker goes.
    produce(bootstrap, topics["in"], [
        (f"dev-{i % 50}".encode(), reading(f"dev-{i % 50}", 1_700_000_000 + i, [20.0, -3.0]), None) for i in range(4000)
    ])
    port = free_port()
    # The member's session outlives the outage (stop, up to 5 s, 3 s, start: past the default 10 s
    # on a busy host, and the group then drops the member and the resumption waits for a rejoin):
    # what is timed here is the loop taking up again, as the group member it was.
    service = ServiceThread(service_settings(
        bootstrap, topics, f"g-{unique}", model, tmp_path / "checkpoints",
        batch={"max_records": 1, "max_wait_ms": 0}, metrics={"enabled": True, "port": port},
        kafka={"session_timeout_ms": 60_000},
    ))
    readyz = f"http://127.0.0.1:{port}/readyz"
    try:
        assert wait_for(lambda: service.metric("streamer_readings_total") >= 50
                        and service.metric("streamer_consumer_lag", topic=topics["in"], partition="0") > 0, 45)
        outage_starts = len(caplog.records)
        local_kafka("stop")
        not_ready = wait_for(lambda: get(readyz)[0] == 503, 30)
        assert not_ready is not None and not_ready < READY_FAILS_WITHIN_S, f"not ready after {not_ready}s"
        status, reason = get(readyz)
        assert status == 503 and "broker unreachable" in reason, reason
        time.sleep(3.0)  # the loop keeps probing an absent broker
        lag = service.metric("streamer_consumer_lag", topic=topics["in"], partition="0")
        consumed = service.metric("streamer_readings_total")
        # The last known end, not 0 (a batch in hand when the broker went is in neither).
        assert lag > 0 and lag + consumed >= 4000 - 5, (lag, consumed)
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200  # live: waiting for the broker is no crash
        assert service.metric("streamer_broker_reachable") == 0

        local_kafka("start")  # returns once the broker accepts connections
        resumed = wait_for(lambda: service.metric("streamer_readings_total") > consumed, 60)
        assert resumed is not None and resumed < RESUMES_WITHIN_S, f"resumed after {resumed}s"
        print(f"not ready {not_ready:.1f}s after the broker stopped; resumed {resumed:.1f}s after it answered")
        assert wait_for(lambda: get(readyz)[0] == 200, RESUMES_WITHIN_S) is not None
        # The outage in a few lines: one of ours when it starts, one when it ends; the client
        # library's own lines held back in between.
        outage = caplog.records[outage_starts:]
        loud = [f"{r.name} {r.levelname} {r.getMessage()}" for r in outage if r.levelno >= logging.WARNING]
        ours = [r for r in outage if r.name == "streamer.kafka.outage"]
        print(f"{len(loud)} lines of WARNING or worse during the outage:", *loud, sep="\n  ")
        assert len(loud) <= MAX_OUTAGE_LINES, loud
        assert [r.levelname for r in ours][:2] == ["WARNING", "INFO"], [r.getMessage() for r in ours]
        assert "unreachable" in ours[0].getMessage() and "answer again" in ours[1].getMessage()
    finally:
        service.stop(timeout_s=30)


def test_a_delivery_the_broker_refuses_stops_the_loop_before_its_commit(kafka_bootstrap: str, model: Path,
                                                                         tmp_path: Path, unique: str):
    """A prediction larger than its topic accepts (an output topic of max.message.bytes 100): the
    broker refuses it, the batch's offsets are not committed (it would be re-delivered) and the loop
    stops with the error. A dead letter too big for its topic (1024 here) is cut to fit instead."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    from streamer.errors import PipelineError
    from tests.integration.helpers import read_topic

    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"])
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topics["dlq"], 1, 1, topic_configs={"max.message.bytes": "1024"}),
                             NewTopic(topics["out"], 1, 1, topic_configs={"max.message.bytes": "100"})])
    finally:
        admin.close()
    bad = b"{not json" + b"x" * 4000  # its dead letter is over 1024 bytes
    produce(kafka_bootstrap, topics["in"], [(b"dev-1", bad, None),
                                            (b"dev-1", reading("dev-1", 1_700_000_000, [20.0, -3.0]), None)])
    group = f"g-{unique}"
    service = ServiceThread(service_settings(kafka_bootstrap, topics, group, model, tmp_path / "checkpoints",
                                             batch={"max_records": 1}))  # the dead letter's batch first, alone
    service.thread.join(timeout=60)
    assert not service.alive(), "the loop kept running after a refused delivery"
    with pytest.raises(PipelineError, match="sends of this batch failed"):
        service.stop()
    [letter] = read_topic(kafka_bootstrap, topics["dlq"], expected=1)
    headers = dict(letter.headers)
    assert headers["streamer.reason"] == b"not_json" and b"cut to fit the dead-letter topic's 1024 bytes" in headers[
        "streamer.truncated"] and bad.startswith(letter.value) and len(letter.value) < len(bad)
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        assert consumer.committed(TopicPartition(topics["in"], 0)) in (None, 1)  # never past the refused prediction
    finally:
        consumer.close()


def test_exactly_once_a_delivery_the_broker_refuses_aborts_its_batch_until_it_is_taken(
        kafka_bootstrap: str, model: Path, tmp_path: Path, unique: str):
    """Exactly-once, a prediction larger than its topic accepts: the send fails, the batch
    aborts (nothing visible, offsets not committed) and is tried again with a new producer; once
    the topic takes such messages, it is published once. (kafka-python splits the refused batch
    and loses track of it: its flush waits out the transaction's 60 s.)"""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic

    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"])
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topics["dlq"], 1, 1), NewTopic(topics["out"], 1, 1, topic_configs={"max.message.bytes": "100"})])
        produce(kafka_bootstrap, topics["in"], [(f"dev-{i}".encode(), reading(f"dev-{i}", 1_700_000_000, [20.0, -3.0]), None)
                                                for i in range(4)])
        group = f"g-{unique}"
        service = ServiceThread(service_settings(kafka_bootstrap, topics, group, model, tmp_path / "checkpoints",
                                                 kafka={"exactly_once": True}))
        try:
            assert wait_for(lambda: (service.registry.get_sample_value("streamer_transactions_aborted_total") or 0) >= 1,
                            timeout_s=150) is not None, "no transaction aborted"
            assert service.alive()  # the loop goes on, trying again
            consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
            try:
                assert consumer.committed(TopicPartition(topics["in"], 0)) is None
            finally:
                consumer.close()
            admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics["out"], configs={"max.message.bytes": "1048588"})])
            out = read_topic(kafka_bootstrap, topics["out"], expected=4, committed_only=True, timeout_s=90)
            assert sorted(json.loads(m.value)["device_id"] for m in out) == [f"dev-{i}" for i in range(4)]
        finally:
            service.stop(timeout_s=60)
    finally:
        admin.close()


def test_a_dead_letter_of_a_message_of_a_megabyte_is_delivered(kafka_bootstrap: str, model: Path, tmp_path: Path,
                                                               unique: str):
    """A bad input message of about 1 MB, which the broker takes (its default max.message.bytes is
    1 MiB) and which is over librdkafka's default message.max.bytes (1,000,000): its dead letter
    carries it whole (kafka.max_message_bytes allows it), is delivered, and the loop goes on."""
    from kafka import KafkaConsumer, TopicPartition

    from tests.integration.helpers import read_topic

    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    for topic in topics.values():
        create_topic(kafka_bootstrap, topic)
    big = b"{not json" + b"x" * 1_030_000
    produce(kafka_bootstrap, topics["in"], [(b"dev-1", big, None)])
    produce(kafka_bootstrap, topics["in"], [(b"dev-1", reading("dev-1", 1_700_000_000, [20.0, -3.0]), None)])
    group = f"g-{unique}"
    service = ServiceThread(service_settings(kafka_bootstrap, topics, group, model, tmp_path / "checkpoints"))
    try:
        [letter] = read_topic(kafka_bootstrap, topics["dlq"], expected=1)
        assert letter.value == big and dict(letter.headers)["streamer.reason"] == b"not_json"
        assert len(read_topic(kafka_bootstrap, topics["out"], expected=1)) == 1
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
        try:
            assert wait_for(lambda: consumer.committed(TopicPartition(topics["in"], 0)) == 2, 30) is not None
        finally:
            consumer.close()
        assert service.alive()
    finally:
        service.stop()


def test_exactly_once_rides_out_an_outage_longer_than_the_start_up_wait(own_broker, model: Path, tmp_path: Path,
                                                                       unique: str):
    # A transaction the outage aborts needs a new producer, which waits for a broker. That wait
    # had given up after kafka.startup_wait_s and ended the process (exit 2), where at-least-once
    # rides out any outage; now it waits as long as the outage lasts, live all the while.
    bootstrap, local_kafka = own_broker
    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(bootstrap, topics["in"])
    create_topic(bootstrap, topics["out"])
    readings = [(f"dev-{i % 20}".encode(), reading(f"dev-{i % 20}", 1_700_000_000 + i, [20.0, -3.0]), None)
                for i in range(2000)]
    produce(bootstrap, topics["in"], readings)
    port = free_port()
    service = ServiceThread(service_settings(
        bootstrap, topics, f"g-{unique}", model, tmp_path / "checkpoints",
        batch={"max_records": 5, "max_wait_ms": 0}, metrics={"enabled": True, "port": port},
        kafka={"exactly_once": True, "startup_wait_s": 2, "session_timeout_ms": 60_000},
    ))
    try:
        assert wait_for(lambda: service.metric("streamer_predictions_total") >= 100, 60)
        local_kafka("stop")
        time.sleep(25.0)  # past the start-up wait and the bound of a transaction call
        assert service.alive() and get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        local_kafka("start")
        assert wait_for(lambda: service.metric("streamer_predictions_total") >= 2000, 120), \
            service.metric("streamer_predictions_total")
    finally:
        service.stop(timeout_s=30)
    published = read_topic(bootstrap, topics["out"], 2000, timeout_s=60, committed_only=True)
    keys = Counter((json.loads(r.value)["device_id"], json.loads(r.value)["ts"]) for r in published)
    assert len(keys) == 2000 and set(keys.values()) == {1}


def test_a_big_batchs_predictions_are_sent_in_parts_each_acknowledged_before_the_next(
    kafka_bootstrap: str, model: Path, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
):
    """Batch messages answered in JSON, a prediction a row: 100k predictions of one micro-batch
    go out in parts of PRODUCE_CHUNK, each acknowledged before the next is queued (a full client
    queue had kept the loop from beating or stopping while the brokers were away; the wait is
    _flush's, live and answering stop, as test_broker_away_not_ready_lag_kept_and_prompt_resume
    shows with the broker stopped). Every prediction is published once, the batch committed."""
    import numpy as np

    from streamer.pipeline import PRODUCE_CHUNK
    from streamer.records import ARROW_CONTENT_TYPE, CONTENT_TYPE_HEADER, encode_arrow_readings

    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"])
    devices = [f"dev-{i}" for i in range(1000)]
    values = np.tile(np.array([[20.0, -3.0]], dtype=np.float32), (len(devices), 1))
    produce(kafka_bootstrap, topics["in"], [
        (b"gateway", encode_arrow_readings(devices, np.full(len(devices), 1_700_000_000.0 + t), values),
         [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)]) for t in range(100)
    ])
    readings = 100 * len(devices)
    assert readings > 2 * PRODUCE_CHUNK
    from streamer.pipeline import Pipeline

    flush, flushes = Pipeline._flush, []

    def counted(self):
        flushes.append(sys._getframe(1).f_code.co_name)  # who waits: _sends (part way) or a settle
        return flush(self)

    monkeypatch.setattr(Pipeline, "_flush", counted)
    service = ServiceThread(service_settings(
        kafka_bootstrap, topics, f"g-{unique}", model, tmp_path / "checkpoints",
        batch={"max_records": 500, "max_wait_ms": 5000}, state={"capacity": 2000},  # one batch, however slow
    ))
    try:
        assert wait_for(lambda: service.metric("streamer_readings_total") >= readings, 120) is not None
    finally:
        summary = service.stop(timeout_s=60)
    assert summary.readings == readings
    assert flushes.count("_sends") >= 1, flushes  # waited for part of a batch before it was done
    published = Counter((r.key, json.loads(r.value)["ts"]) for r in read_topic(kafka_bootstrap, topics["out"], readings))
    assert len(published) == readings and set(published.values()) == {1}
