"""End to end through the real broker: readings in, one exact prediction each out, bad input dead-lettered."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from streamer.model import ModelConfig, Normalization, init_random_model, load_model_file, save_model_file
from tests.integration.conftest import free_port
from tests.integration.helpers import ServiceThread, create_topic, produce, read_topic, service_settings

YEAR_S = 365 * 24 * 3600

pytestmark = pytest.mark.kafka

N_DEVICES, N_READINGS, N_FEATURES = 40, 25, 2


def offline(bundle, seq: np.ndarray) -> np.ndarray:
    x = (torch.from_numpy(seq) - bundle.normalization.mean) / bundle.normalization.std
    with torch.no_grad():
        outs = torch.stack([bundle.model(x[None, : t + 1])[0][0] for t in range(len(seq))])
    return (outs * bundle.normalization.std + bundle.normalization.mean).numpy()


def write_model(path, seed: int, version: str):
    """A random two-feature model with normalisation (readings around (20, -3)), saved and loaded back."""
    config = ModelConfig(2, 16, 2, 2)
    norm = Normalization(torch.tensor([20.0, -3.0]), torch.tensor([5.0, 0.5]))
    save_model_file(path, init_random_model(config, seed=seed), config, version, norm)
    return load_model_file(path)


def reading(device: str, ts: object, values: list) -> bytes:
    return json.dumps({"device_id": device, "ts": ts, "values": values}).encode()


BAD_MESSAGES = [
    # (key, value, expected reason)
    (b"dev-000", b"{not json", "not_json"),
    (b"dev-001", b'{"device_id": "dev-001", "values": [1.0, 2.0]}', "invalid_schema"),
    (b"dev-002", b'{"device_id": "dev-002", "ts": 5, "values": [1.0, "x"]}', "invalid_schema"),
    (b"dev-003", b'{"device_id": "dev-003", "ts": 5, "values": [1.0, 2.0, 3.0]}', "wrong_value_count"),
    (b"dev-004", b'{"device_id": "dev-004", "ts": 5, "values": [1.0, NaN]}', "non_finite"),
    (b"dev-005", b'{"device_id": "dev-005", "ts": 5, "values": [Infinity, 1.0]}', "non_finite"),
    (b"other", b'{"device_id": "dev-006", "ts": 5, "values": [1.0, 2.0]}', "key_mismatch"),
    (None, b'{"device_id": "dev-007", "ts": 5, "values": [1.0, 2.0]}', "key_mismatch"),
    (b"dev-008", None, "not_json"),
    (b"dev-009", b"\xff\xfe\x00", "not_json"),
]


@pytest.mark.parametrize("step", ["eager", "compiled"])  # model.compile: the CPU step through torch.compile
def test_end_to_end_predictions_and_dead_letters(kafka_bootstrap: str, unique: str, tmp_path, step: str, caplog):
    caplog.set_level("DEBUG", logger="streamer.compiled")
    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"], partitions=3)
    model_path = tmp_path / "model.pt"
    bundle = write_model(model_path, seed=4, version="e2e-v1")

    rng = np.random.default_rng(3)
    devices = [f"dev-{d:03d}" for d in range(N_DEVICES)]
    sequences = {d: (rng.normal(size=(N_READINGS, N_FEATURES)) * [5.0, 0.5] + [20.0, -3.0]).astype(np.float32)
                 for d in devices}
    messages = []
    bad_at = {i * (N_DEVICES * N_READINGS // len(BAD_MESSAGES)): bad for i, bad in enumerate(BAD_MESSAGES)}
    sent = 0
    for t in range(N_READINGS):
        for d in devices:
            if sent in bad_at:
                key, value, _ = bad_at[sent]
                messages.append((key, value, [("trace", b"abc")]))
            ts = 1_700_000_000 + t * 60 if t % 2 else f"2023-11-14T22:{t:02d}:20+00:00"
            messages.append((d.encode(), reading(d, ts, sequences[d][t].tolist()), None))
            sent += 1
    produce(kafka_bootstrap, topics["in"], messages)

    port = free_port()
    service = ServiceThread(service_settings(
        kafka_bootstrap, topics, f"g-{unique}", model_path, tmp_path / "checkpoints", metrics={"enabled": True, "port": port},
        model={"compile": step == "compiled"}))
    try:
        expected = N_DEVICES * N_READINGS
        out = read_topic(kafka_bootstrap, topics["out"], expected, timeout_s=120)
        dlq = read_topic(kafka_bootstrap, topics["dlq"], len(BAD_MESSAGES), timeout_s=30)
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status == 200
    finally:
        summary = service.stop()

    # Exactly one prediction per reading, each equal to the offline model over the sequence so far.
    assert len(out) == expected
    # Compiled at the start (or, a test of this model having run before, served from this process's compile).
    compiled = [r.getMessage() for r in caplog.records if r.name == "streamer.compiled"]
    assert len(compiled) == (step == "compiled"), compiled
    assert all(m.startswith(("compiled the CPU step", "the compiled CPU step of this configuration serves")) for m in compiled)
    by_device = defaultdict(list)
    for record in out:
        body = json.loads(record.value)
        assert record.key == body["device_id"].encode()
        assert set(body) == {"device_id", "ts", "forecast", "anomaly_score", "is_anomaly", "residual", "model_version"}
        assert body["model_version"] == "e2e-v1" and isinstance(body["is_anomaly"], bool)
        assert math.isfinite(body["anomaly_score"])
        by_device[body["device_id"]].append(body)
    assert sorted(by_device) == devices
    for d in devices:
        preds = by_device[d]  # one partition per device: output order is reading order
        assert len(preds) == N_READINGS
        assert isinstance(preds[0]["ts"], float) and preds[1]["ts"] == 1_700_000_060.0
        np.testing.assert_allclose(np.array([p["forecast"] for p in preds]), offline(bundle, sequences[d]),
                                   atol=1e-5, rtol=1e-6)

    # Every bad message dead-lettered with its reason, original bytes and source position.
    assert len(dlq) == len(BAD_MESSAGES)
    expected_reasons = Counter(reason for _, _, reason in BAD_MESSAGES)
    got_reasons = Counter()
    originals = {(k, v) for k, v, _ in BAD_MESSAGES}
    for record in dlq:
        headers = dict(record.headers)
        got_reasons[headers["streamer.reason"].decode()] += 1
        assert (record.key, record.value) in originals
        assert headers["trace"] == b"abc"
        assert headers["streamer.source.topic"].decode() == topics["in"]
        assert int(headers["streamer.source.offset"]) >= 0 and headers["streamer.error"]
    assert got_reasons == expected_reasons

    # The same counts through /metrics over HTTP.
    def metric(line_start: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(line_start))

    assert metric("streamer_readings_total ") == expected
    assert metric("streamer_predictions_total ") == expected
    for reason, count in expected_reasons.items():
        assert metric(f'streamer_dead_letters_total{{reason="{reason}"}}') == count
    assert metric("streamer_active_devices ") == N_DEVICES
    assert metric("streamer_table_capacity ") == 1000
    # Event times of 2023: more than the past bound old, counted apart from the latency histogram.
    assert metric('streamer_event_time_skew_total{direction="past"}') == expected
    assert metric("streamer_event_to_publish_seconds_count ") == 0
    assert metric("streamer_step_seconds_count ") >= 1
    assert "streamer_consumer_lag{" in metrics_text
    assert summary.predictions == expected


def test_event_times_far_off_are_counted_apart_from_latency(kafka_bootstrap: str, unique: str, tmp_path):
    """A reading a year in the future once drove the latency histogram's sum to -31 million."""
    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"])
    model_path = tmp_path / "model.pt"
    write_model(model_path, seed=5, version="skew-v1")
    now = time.time()
    stamps = [now] * 20 + [now + YEAR_S, now + 3600, now - 30 * 24 * 3600, now - 60]
    produce(kafka_bootstrap, topics["in"], [
        (b"dev-1", reading("dev-1", ts, [20.0 + i, -3.0]), None) for i, ts in enumerate(stamps)
    ])
    service = ServiceThread(service_settings(kafka_bootstrap, topics, f"g-{unique}", model_path, tmp_path / "cp"))
    try:
        out = read_topic(kafka_bootstrap, topics["out"], len(stamps), timeout_s=60, settle_s=0.5)
    finally:
        service.stop()
    assert len(out) == len(stamps)  # every reading is still predicted
    assert service.metric("streamer_event_time_skew_total", direction="future") == 2  # a year, an hour ahead
    assert service.metric("streamer_event_time_skew_total", direction="past") == 1  # 30 days old
    assert service.metric("streamer_event_to_publish_seconds_count") == 21
    assert 0 <= service.metric("streamer_event_to_publish_seconds_sum") < 21 * 60 + 21 * 60


@pytest.mark.parametrize(("batch_output", "json_readings"), [("json", True), ("arrow", True), ("arrow", False)])
def test_batch_messages_end_to_end(kafka_bootstrap: str, unique: str, tmp_path, batch_output: str, json_readings: bool):
    """Gateways' Arrow batch messages beside JSON readings through the real broker: every reading
    gets the offline model's prediction, a batch message with a bad row is dead-lettered whole,
    and under kafka.batch_output = arrow a batch message's predictions come back as batch messages
    under its key. Without JSON readings, batches are of batch messages alone: planned per
    gateway's list (engine.plan_lists), the same predictions."""
    import pyarrow as pa

    from streamer.engine import LIST_PLAN_MIN_IDS
    from streamer.records import ARROW_CONTENT_TYPE, CONTENT_TYPE_HEADER, encode_arrow_readings

    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"], partitions=3)
    model_path = tmp_path / "model.pt"
    bundle = write_model(model_path, seed=5, version="batch-v1")
    header = [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)]
    rng = np.random.default_rng(4)
    per_gateway = 12 if json_readings else LIST_PLAN_MIN_IDS  # lists long enough to be planned per list
    gateways = {f"gw-{g}".encode(): [f"gw{g}-dev-{d:02d}" for d in range(per_gateway)] for g in range(4)}
    singles = [f"solo-{d:02d}" for d in range(6)] if json_readings else []
    rounds = 10
    sequences = {d: (rng.normal(size=(rounds, N_FEATURES)) * [5.0, 0.5] + [20.0, -3.0]).astype(np.float32)
                 for d in [*singles, *(d for ds in gateways.values() for d in ds)]}
    messages = []
    for t in range(rounds):
        ts = 1_700_000_000.0 + 60 * t
        for gateway, devices in gateways.items():
            values = np.stack([sequences[d][t] for d in devices])
            messages.append((gateway, encode_arrow_readings(devices, np.full(len(devices), ts), values), header))
        for d in singles:
            messages.append((d.encode(), reading(d, ts, sequences[d][t].tolist()), None))
    bad = encode_arrow_readings(["gw0-dev-00", "gw0-dev-01"], np.array([1.0, 2.0]), np.array([[1.0, 2.0], [np.nan, 1.0]]))
    messages.append((b"gw-0", bad, header))
    produce(kafka_bootstrap, topics["in"], messages)

    service = ServiceThread(service_settings(kafka_bootstrap, topics, f"g-{unique}", model_path, tmp_path / "checkpoints",
                                             kafka={"batch_output": batch_output}))
    readings = len(sequences) * rounds
    batch_messages = len(gateways) * rounds
    try:
        expected = batch_messages + len(singles) * rounds if batch_output == "arrow" else readings
        out = read_topic(kafka_bootstrap, topics["out"], expected, timeout_s=120)
        dlq = read_topic(kafka_bootstrap, topics["dlq"], 1, timeout_s=30)
    finally:
        summary = service.stop()
    assert summary.readings == readings and summary.predictions == readings
    assert len(out) == expected
    rows: dict[str, list[dict]] = defaultdict(list)
    for record in out:
        if record.headers:
            assert batch_output == "arrow" and record.headers == [("content-type", ARROW_CONTENT_TYPE)]
            table = pa.ipc.open_stream(record.value).read_all()
            assert table.num_rows == per_gateway and set(table.column("device_id").to_pylist()) == set(gateways[record.key])
            bodies = table.to_pylist()
        else:
            bodies = [json.loads(record.value)]
            assert record.key == bodies[0]["device_id"].encode()
        for body in bodies:
            assert body["model_version"] == "batch-v1"
            rows[body["device_id"]].append(body)
    assert sorted(rows) == sorted(sequences)
    for d, seq in sequences.items():  # one partition per device (per gateway): output order is reading order
        assert [b["ts"] for b in rows[d]] == [1_700_000_000.0 + 60 * t for t in range(rounds)]
        np.testing.assert_allclose(np.array([b["forecast"] for b in rows[d]]), offline(bundle, seq), atol=1e-5, rtol=1e-6)
    assert len(dlq) == 1 and dict(dlq[0].headers)["streamer.reason"] == b"non_finite"
    assert (dlq[0].key, dlq[0].value) == (b"gw-0", bad)


def test_inputs_that_once_stopped_the_loop_are_dead_lettered(kafka_bootstrap: str, unique: str, tmp_path):
    """Each of these once stopped the loop for good, or lost a message: a value that overflows the
    float32 statistics (an inf forecast: no JSON), a refused message too big for a dead-letter topic
    of the broker's default limit (the broker refused the dead letter), a batch message of no rows
    (no reply) and two Arrow streams in one message (the second's rows dropped)."""
    import hashlib

    import pyarrow as pa

    from streamer.records import ARROW_CONTENT_TYPE, CONTENT_TYPE_HEADER, encode_arrow_readings

    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"])
    create_topic(kafka_bootstrap, topics["dlq"])  # made elsewhere: the broker's default max.message.bytes
    model_path = tmp_path / "model.pt"
    bundle = write_model(model_path, seed=6, version="v1")
    header = [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)]
    rng = np.random.default_rng(2)
    seq = (rng.normal(size=(10, N_FEATURES)) * [5.0, 0.5] + [20.0, -3.0]).astype(np.float32)
    messages = [(b"dev-a", reading("dev-a", 1_700_000_000 + t, seq[t].tolist()), None) for t in range(5)]
    messages.append((b"dev-a", reading("dev-a", 1_700_000_005, [1e20, 1e20]), None))
    huge = b"{" + bytes(rng.integers(0x20, 0x7F, 1_048_300, dtype=np.uint8))  # no JSON, near the input's limit
    messages.append((b"junk", huge, None))
    empty = encode_arrow_readings([], np.zeros(0), np.zeros((0, N_FEATURES)))
    messages.append((b"gw-empty", empty, header))
    two = encode_arrow_readings(["gw-x"], np.array([1.7e9]), seq[:1]) + encode_arrow_readings(["gw-y"], np.array([1.7e9]), seq[:1])
    messages.append((b"gw-two", two, header))
    messages += [(b"dev-a", reading("dev-a", 1_700_000_010 + t, seq[t].tolist()), None) for t in range(5, 10)]
    produce(kafka_bootstrap, topics["in"], messages)

    service = ServiceThread(service_settings(kafka_bootstrap, topics, f"g-{unique}", model_path, tmp_path / "checkpoints",
                                             kafka={"batch_output": "arrow"}))
    try:
        out = read_topic(kafka_bootstrap, topics["out"], 11, timeout_s=90)
        dlq = read_topic(kafka_bootstrap, topics["dlq"], 3, timeout_s=30)
    finally:
        summary = service.stop()
    assert summary.readings == 10 and summary.dead_letters == 3
    replies = [r for r in out if r.headers]
    assert [(r.key, pa.ipc.open_stream(r.value).read_all().num_rows) for r in replies] == [(b"gw-empty", 0)]
    forecasts = [json.loads(r.value)["forecast"] for r in out if not r.headers]
    np.testing.assert_allclose(np.array(forecasts), offline(bundle, seq), atol=1e-5, rtol=1e-6)  # as if never sent
    letters = {r.key: r for r in dlq}
    assert {k: dict(r.headers)["streamer.reason"] for k, r in letters.items()} == {
        b"dev-a": b"out_of_range", b"junk": b"not_json", b"gw-two": b"not_arrow"}
    cut = letters[b"junk"]
    said = dict(cut.headers)["streamer.truncated"].decode()
    assert huge.startswith(cut.value) and len(cut.value) < len(huge)
    assert f"value of {len(huge)} bytes (sha256 {hashlib.sha256(huge).hexdigest()})" in said
    assert letters[b"gw-two"].value == two and letters[b"dev-a"].value == messages[5][1]


def test_a_model_whose_output_overflows_dead_letters_its_readings_and_goes_on(kafka_bootstrap: str, unique: str,
                                                                            tmp_path):
    """Forecasts that overflow float32 (a model with huge head weights) cannot be published: each such
    reading is dead-lettered as read (prediction_not_finite), its device starts afresh, the loop goes
    on and commits; every reading is a prediction or a dead letter."""
    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"], partitions=2)
    model_path = tmp_path / "model.pt"
    bundle = write_model(model_path, seed=7, version="overflow")
    with torch.no_grad():
        bundle.model.fc.weight.fill_(3e38)
        bundle.model.fc.bias.fill_(3e38)
    save_model_file(model_path, bundle.model, bundle.config, "overflow", bundle.normalization)
    devices = [f"dev-{d}" for d in range(6)]
    messages = [(d.encode(), reading(d, 1_700_000_000 + t, [20.0 + t, -3.0]), None) for t in range(8) for d in devices]
    produce(kafka_bootstrap, topics["in"], messages)
    service = ServiceThread(service_settings(kafka_bootstrap, topics, f"g-{unique}", model_path, tmp_path / "checkpoints"))
    try:
        dlq = read_topic(kafka_bootstrap, topics["dlq"], len(messages), timeout_s=90)
        out = read_topic(kafka_bootstrap, topics["out"], 0, timeout_s=5)
    finally:
        summary = service.stop()
    assert len(dlq) + len(out) == len(messages) and len(dlq) >= len(messages) // 2
    assert summary.readings == len(messages) and summary.dead_letters == len(dlq)
    sent = {(k, v) for k, v, _ in messages}
    for record in dlq:
        headers = dict(record.headers)
        assert headers["streamer.reason"] == b"prediction_not_finite" and (record.key, record.value) in sent
        assert b"overflowed float32" in headers["streamer.error"]
    for record in out:
        assert all(math.isfinite(v) for v in json.loads(record.value)["forecast"])


def test_closing_the_consumer_with_offsets_waiting_returns(kafka_bootstrap: str, unique: str, tmp_path):
    """Offsets acknowledged and waiting for the commit interval when the loop's thread closes the
    consumer: the revocation close makes must not try to commit them (with librdkafka that
    commit never returned). They are re-delivered to the next member, as at-least-once allows."""
    import threading

    from streamer.kafka import open_consumer, open_producer
    from streamer.pipeline import Pipeline
    from streamer.service import build_engine

    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"], partitions=2)
    model_path = tmp_path / "model.pt"
    write_model(model_path, seed=6, version="close-v1")
    produce(kafka_bootstrap, topics["in"], [(f"dev-{d}".encode(), reading(f"dev-{d}", 1_700_000_000.0, [20.0, -3.0]), None)
                                            for d in range(20)])
    settings = service_settings(kafka_bootstrap, topics, f"g-{unique}", model_path, tmp_path / "cp",
                                kafka={"commit_interval_ms": 60_000}, checkpoint={"interval_readings": 100_000})
    seen: dict[str, object] = {}

    def the_loop() -> None:  # subscribe, run and close on one thread, as the service does
        consumer = open_consumer(settings.kafka, settings.batch.max_records)
        producer = open_producer(settings.kafka)
        pipeline = Pipeline(settings, build_engine(settings), consumer, producer)
        pipeline.subscribe()
        deadline = time.monotonic() + 60
        while pipeline.summary.readings < 20 and time.monotonic() < deadline:
            pipeline.run_once()
        seen["readings"], seen["waiting"] = pipeline.summary.readings, dict(pipeline._to_commit)
        consumer.close(5)
        seen["closed"] = True
        producer.close(5)

    loop = threading.Thread(target=the_loop, daemon=True)
    loop.start()
    loop.join(90)
    assert seen.get("readings") == 20 and seen.get("waiting"), seen  # acknowledged, not committed
    assert seen.get("closed"), "consumer.close did not return"
