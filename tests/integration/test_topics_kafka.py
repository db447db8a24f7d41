"""`streamer topics create` and the topics `streamer run` creates, on the real broker."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource, ResourceType

from streamer.cli import main
from streamer.kafka import ensure_topics
from streamer.kafka.topics import written_topics
from streamer.settings import load_settings

pytestmark = pytest.mark.kafka


def describe(bootstrap: str, topics: list[str]) -> dict[str, tuple[int, dict[str, str]]]:
    """name -> (partitions, the configs set on the topic itself), as the broker tells."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 30
    metadata = admin.list_topics(timeout=30)
    while not set(topics) <= set(metadata.topics) and time.monotonic() < deadline:  # metadata lags a creation
        time.sleep(0.2)
        metadata = admin.list_topics(timeout=30)
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics])
    configs = {
        resource.name: {e.name: e.value for e in future.result(30).values() if e.source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value}
        for resource, future in futures.items()
    }
    return {t: (len(metadata.topics[t].partitions), configs[t]) for t in topics}


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """stderr without warnings (e.g. of a STREAMER_TEST_* variable in the environment)."""
    return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("streamer: warning:")]


def names(unique: str) -> dict[str, str]:
    return {"in": f"in-{unique}", "out": f"out-{unique}", "dlq": f"dlq-{unique}", "ckpt": f"ckpt-{unique}"}


def test_create_gives_each_topic_what_settings_say(kafka_bootstrap: str, unique: str, capsys: pytest.CaptureFixture):
    t = names(unique)
    argv = [
        "topics", "create", "--kafka-bootstrap-servers", kafka_bootstrap,
        "--kafka-input-topic", t["in"], "--kafka-output-topic", t["out"], "--kafka-dead-letter-topic", t["dlq"],
        "--topics-partitions", "4", "--topics-retention-ms", "3600000",
        "--topics-dead-letter-partitions", "2", "--topics-dead-letter-retention-ms", "-1",
        "--checkpoint-store", "kafka", "--checkpoint-topic", t["ckpt"], "--topics-checkpoint-partitions", "3",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(x["name"], x["created"]) for x in printed["topics"]] == [(t[k], True) for k in ("in", "out", "dlq", "ckpt")]
    found = describe(kafka_bootstrap, list(t.values()))
    assert found[t["in"]] == (4, {"retention.ms": "3600000"})
    assert found[t["out"]] == (4, {"retention.ms": "3600000"})
    assert found[t["dlq"]] == (2, {"retention.ms": "-1", "max.message.bytes": "16777216"})  # takes whole dead letters
    assert found[t["ckpt"]] == (3, {"cleanup.policy": "compact"})
    # Again: nothing is created, nothing changed; what exists is said as it is, and where it
    # differs from the settings (it had been said as the settings asked).
    assert main([*argv[:argv.index("--topics-partitions")], "--topics-partitions", "8",
                 "--checkpoint-store", "kafka", "--checkpoint-topic", t["ckpt"]]) == 0
    captured = capsys.readouterr()
    again = {x["name"]: x for x in json.loads(captured.out)["topics"]}
    assert not any(x["created"] for x in again.values())
    assert again[t["in"]]["partitions"] == 4 and again[t["in"]]["differs"] == ["4 partitions, not 8"]
    assert again[t["ckpt"]] == {"name": t["ckpt"], "created": False, "partitions": 3, "replication_factor": 1,
                                "configs": {"cleanup.policy": "compact"}, "differs": ["3 partitions, not 6"]}
    assert f"streamer: warning: topic {t['in']} exists with 4 partitions, not 8: left as it is" in captured.err
    assert describe(kafka_bootstrap, [t["in"]])[t["in"]][0] == 4


def test_a_changelog_that_exists_uncompacted_is_said_and_a_failure_names_what_was_created(
        kafka_bootstrap: str, unique: str, capsys: pytest.CaptureFixture):
    from kafka.admin import KafkaAdminClient, NewTopic

    t = names(unique)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(t["ckpt"], 1, 1)])  # delete policy, as auto-creation makes it
    finally:
        admin.close()
    assert main(["topics", "create", "--kafka-bootstrap-servers", kafka_bootstrap, "--kafka-input-topic", t["in"],
                 "--kafka-output-topic", t["out"], "--kafka-dead-letter-topic", t["dlq"],
                 "--checkpoint-store", "kafka", "--checkpoint-topic", t["ckpt"]]) == 0
    captured = capsys.readouterr()
    ckpt = {x["name"]: x for x in json.loads(captured.out)["topics"]}[t["ckpt"]]
    assert ckpt["differs"] == ["1 partitions, not 6", "cleanup.policy=delete, not compact"]
    assert f"topic {t['ckpt']} exists with 1 partitions, not 6; cleanup.policy=delete, not compact" in captured.err
    # A refusal part-way names the topics created before it (the broker refuses a name that
    # collides with another's but for '.' and '_').
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(f"dlq2_{unique}", 1, 1)])
    finally:
        admin.close()
    code = main(["topics", "create", "--kafka-bootstrap-servers", kafka_bootstrap, "--kafka-input-topic", f"in2-{unique}",
                 "--kafka-output-topic", f"out2-{unique}", "--kafka-dead-letter-topic", f"dlq2.{unique}"])
    [err] = error_lines(capsys)
    assert code == 2 and f"(created before it: in2-{unique}, out2-{unique})" in err, err


def test_without_the_kafka_store_no_changelog_is_created(kafka_bootstrap: str, unique: str, capsys: pytest.CaptureFixture):
    t = names(unique)
    assert main(["topics", "create", "--kafka-bootstrap-servers", kafka_bootstrap, "--kafka-input-topic", t["in"],
                 "--kafka-output-topic", t["out"], "--kafka-dead-letter-topic", t["dlq"]]) == 0
    assert [x["name"] for x in json.loads(capsys.readouterr().out)["topics"]] == [t["in"], t["out"], t["dlq"]]


def test_more_replicas_than_brokers_is_one_line_and_exit_2(kafka_bootstrap: str, unique: str, capsys: pytest.CaptureFixture):
    code = main(["topics", "create", "--kafka-bootstrap-servers", kafka_bootstrap,
                 "--kafka-input-topic", f"in-{unique}", "--topics-replication-factor", "3"])
    [err] = error_lines(capsys)
    assert code == 2
    assert err.startswith(f"streamer: error: creating topic in-{unique}")
    assert "replication factor 3" in err and "InvalidReplicationFactorError" in err


def test_no_broker_is_one_line_and_exit_2(capsys: pytest.CaptureFixture):
    from tests.integration.conftest import free_port

    code = main(["topics", "create", "--kafka-bootstrap-servers", f"127.0.0.1:{free_port()}", "--kafka-startup-wait-s", "0"])
    [err] = error_lines(capsys)
    assert code == 2 and err.startswith("streamer: error: Kafka at 127.0.0.1:")


def test_run_creates_the_topics_it_writes_as_settings_say(kafka_bootstrap: str, unique: str):
    t = names(unique)
    settings = load_settings({
        "kafka": {"bootstrap_servers": kafka_bootstrap, "input_topic": t["in"], "output_topic": t["out"],
                  "dead_letter_topic": t["dlq"]},
        "topics": {"partitions": 5, "dead_letter_partitions": 2, "retention_ms": 7200000},
        "checkpoint": {"store": "kafka", "topic": t["ckpt"]},
    })
    specs = written_topics(settings)  # what run_service hands to ensure_topics
    assert list(specs) == [t["out"], t["dlq"], t["ckpt"]]
    ensure_topics(kafka_bootstrap, specs)
    found = describe(kafka_bootstrap, [t["out"], t["dlq"], t["ckpt"]])
    assert found == {t["out"]: (5, {"retention.ms": "7200000"}), t["dlq"]: (2, {"max.message.bytes": "16777216"}),
                     t["ckpt"]: (6, {"cleanup.policy": "compact"})}


def test_run_says_when_its_checkpoint_changelog_is_not_compacted(kafka_bootstrap: str, unique: str, caplog):
    import logging

    from kafka.admin import KafkaAdminClient, NewTopic

    from streamer.service import _topic_housekeeping

    t = names(unique)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(t["ckpt"], 1, 1, topic_configs={"retention.ms": "3600000"})])
    finally:
        admin.close()
    settings = load_settings({"kafka": {"bootstrap_servers": kafka_bootstrap},
                              "checkpoint": {"store": "kafka", "topic": t["ckpt"]}})
    with caplog.at_level(logging.WARNING, logger="streamer.service"):
        _topic_housekeeping(settings)
    [said] = [r.getMessage() for r in caplog.records if r.name == "streamer.service"]
    assert f"checkpoint changelog {t['ckpt']} has cleanup.policy=delete, not compact" in said and "(3600000)" in said
