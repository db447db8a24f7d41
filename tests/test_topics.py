"""streamer/kafka/topics.py and the argument errors of `streamer topics create` (no broker)."""

from __future__ import annotations

import pytest

from streamer.cli import main
from streamer.kafka.clients import TopicSpec
from streamer.kafka.topics import topic_specs, written_topics
from streamer.settings import load_settings


def test_specs_follow_the_topics_section():
    settings = load_settings({
        "kafka": {"input_topic": "in", "output_topic": "out", "dead_letter_topic": "dlq"},
        "topics": {"partitions": 12, "replication_factor": 3, "retention_ms": 86400000,
                   "dead_letter_partitions": 2, "dead_letter_retention_ms": -1, "checkpoint_partitions": 4},
        "checkpoint": {"store": "kafka", "topic": "ckpt"},
    })
    assert topic_specs(settings) == {
        "in": TopicSpec(12, 3, {"retention.ms": "86400000"}),
        "out": TopicSpec(12, 3, {"retention.ms": "86400000"}),
        "dlq": TopicSpec(2, 3, {"retention.ms": "-1", "max.message.bytes": str(16 * 1024 * 1024)}),
        "ckpt": TopicSpec(4, 3, {"cleanup.policy": "compact"}),
    }
    assert list(written_topics(settings)) == ["out", "dlq", "ckpt"]


def test_no_changelog_with_the_directory_store_and_broker_retention_by_default():
    settings = load_settings({"kafka": {"input_topic": "in", "output_topic": "out", "dead_letter_topic": "dlq"}})
    # The dead-letter topic takes what the producer may send (kafka.max_message_bytes), whole input messages.
    dlq = TopicSpec(1, 1, {"max.message.bytes": str(settings.kafka.max_message_bytes)})
    assert topic_specs(settings) == {"in": TopicSpec(6, 1, {}), "out": TopicSpec(6, 1, {}), "dlq": dlq}


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--topics-partitions", "0"], "topics.partitions (flag --topics-partitions"),
        (["--topics-replication-factor", "many"], "topics.replication_factor (flag --topics-replication-factor"),
        (["--topics-retention-ms", "-2"], "topics.retention_ms (flag --topics-retention-ms"),
        (["--topics-dead-letter-partitions", "-1"], "topics.dead_letter_partitions"),
        (["--checkpoint-store", "s3"], "checkpoint.store (flag --checkpoint-store"),
        (["--checkpoint-topic", "no/slash"], "checkpoint.topic (flag --checkpoint-topic"),
        (["--checkpoint-chunk-bytes", "10"], "checkpoint.chunk_bytes (flag --checkpoint-chunk-bytes"),
    ],
)
def test_a_bad_value_is_one_line_naming_it_and_exit_2(argv: list[str], named: str, capsys: pytest.CaptureFixture):
    assert main(["topics", "create", *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("streamer: warning:")]
    assert len(errors) == 1 and errors[0].startswith("streamer: error: invalid settings: ") and named in errors[0]


@pytest.mark.parametrize("argv, said", [
    (["topics"], "required: ACTION"),
    (["topics", "delete"], "invalid choice: 'delete'"),
    (["topics", "create", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["topics", "create", "--model-path", "m.pt"], "unrecognized arguments: --model-path"),  # not a topics setting
])
def test_a_bad_command_line_exits_2(argv: list[str], said: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_the_changelog_cannot_be_a_data_topic(capsys: pytest.CaptureFixture):
    assert main(["topics", "create", "--checkpoint-store", "kafka", "--checkpoint-topic", "sensor-readings"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("streamer: warning:")]
    assert len(errors) == 1 and "checkpoint.topic (flag --checkpoint-topic" in errors[0] and "its own topic" in errors[0]
