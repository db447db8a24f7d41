"""run_simulator against a real broker, through each client: every reading arrives keyed by device
in the partition the Java client would pick, labels match messages."""

import json
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.partitioner.default import murmur2

from streamer.kafka import open_producer
from streamer.settings import load_settings
from streamer.simulate import FleetSpec, run_simulator


@pytest.mark.kafka
def test_simulator_produces_keyed_json_readings_and_labels(kafka_bootstrap: str, tmp_path: Path):
    topic = f"test-simulate-{uuid.uuid4().hex}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    labels_path = tmp_path / "labels.jsonl"
    spec = FleetSpec(devices=40, seed=11, anomaly_rate=0.05)
    try:
        producer = open_producer(load_settings({"kafka": {"bootstrap_servers": kafka_bootstrap}}).kafka)
        try:
            summary = run_simulator(producer, topic, spec, rate=0, max_readings=500, labels_path=labels_path)
        finally:
            producer.close(5)
        assert summary.readings == 500 and summary.devices == 40

        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=f"test-simulate-{uuid.uuid4().hex}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        messages = []
        deadline = time.monotonic() + 30
        try:
            while len(messages) < 500 and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=500).values():
                    messages.extend(batch)
            # Nothing beyond the 500 readings.
            for batch in consumer.poll(timeout_ms=500).values():
                messages.extend(batch)
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic])
        admin.close()

    assert len(messages) == 500
    by_key: dict[tuple[str, float], dict] = {}
    per_device: dict[str, int] = {}
    for message in messages:
        value = json.loads(message.value)
        assert set(value) == {"device_id", "ts", "values"}
        assert message.key == value["device_id"].encode()
        # The Java client's partition for the key (murmur2), whichever client wrote it.
        assert message.partition == (murmur2(message.key) & 0x7FFFFFFF) % 3
        assert value["device_id"].startswith("sensor-")
        assert isinstance(value["ts"], float) and abs(value["ts"] - time.time()) < 120
        assert len(value["values"]) == 1 and all(isinstance(v, float) for v in value["values"])
        per_device[value["device_id"]] = per_device.get(value["device_id"], 0) + 1
        by_key[(value["device_id"], value["ts"])] = value
    # 500 readings of 40 devices in device order: 12 full rounds and 20 devices of a 13th.
    assert len(per_device) == 40 and sorted(per_device.values()) == [12] * 20 + [13] * 20

    labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
    assert len(labels) == summary.anomalies > 0
    for label in labels:
        assert set(label) == {"device_id", "ts", "step", "kind"}
        assert label["kind"] in {"spike", "level_shift", "dropout"}
        assert (label["device_id"], label["ts"]) in by_key, label



@pytest.mark.kafka
def test_simulate_command_reads_kafka_settings_from_env_and_config(kafka_bootstrap: str, tmp_path: Path, monkeypatch, capsys):
    from streamer.cli import main
    from tests.integration.helpers import create_topic, read_topic

    topic = f"test-simulate-cli-{uuid.uuid4().hex}"
    config = tmp_path / "streamer.toml"
    config.write_text(f'[kafka]\ninput_topic = "{topic}"\nbootstrap_servers = "127.0.0.1:1"\n')
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", kafka_bootstrap)  # env beats the file
    create_topic(kafka_bootstrap, topic)
    assert main(["simulate", "--config", str(config), "--devices", "4", "--max-readings", "20", "--rate", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["simulated"]["readings"] == 20
    messages = read_topic(kafka_bootstrap, topic, 20, timeout_s=30)
    assert len(messages) == 20
    assert {m.key for m in messages} == {f"sensor-{i:05d}".encode() for i in range(4)}
