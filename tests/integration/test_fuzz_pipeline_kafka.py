"""Fuzzing the pipeline's bad-input path through the real broker.

Thousands of bad messages, of the kinds tests/test_records_fuzz.py generates, between the good
readings of 50 devices on one input topic: the service must keep running, dead-letter every bad
message exactly once with its reason, source and original bytes, and predict every good reading
exactly as the offline model does over that device's good readings alone.

The bad messages come from Hypothesis under a seed: STREAMER_FUZZ_SEED=<the printed seed> replays a run.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import Phase, given, seed, settings
from hypothesis import strategies as st

from streamer.records import Reading, ReadingDecoder
from tests.integration.helpers import ServiceThread, create_topic, produce, read_topic, service_settings
from tests.integration.test_pipeline_kafka import offline, reading, write_model
from tests.test_records_fuzz import FUZZ, GOOD, Payload, bad_payloads

pytestmark = pytest.mark.kafka

N_DEVICES, N_READINGS, N_FEATURES, N_BAD = 50, 30, 2, 5000
SEED = int(os.environ.get("STREAMER_FUZZ_SEED") or random.randrange(2**32))


def generate_bad(count: int, input_size: int, run_seed: int) -> list[tuple[Payload, str]]:
    """``count`` payloads the decoder refuses, each with its reason; the same ones for the same seed.

    Leaves out the rare arbitrary payload that happens to be a good reading, and a null key with a
    null value, which kafka-python refuses to produce.
    """
    decoder = ReadingDecoder(input_size)
    found: list[tuple[Payload, str]] = []

    @seed(run_seed)
    @settings(FUZZ, max_examples=count // 30 + 20, phases=[Phase.generate])
    @given(st.lists(bad_payloads(input_size), min_size=30, max_size=40))
    def collect(batch: list[Payload]) -> None:
        for payload in batch:
            if payload.key is None and payload.value is None:
                continue
            result = decoder.decode_one(payload.key, payload.value)
            got = GOOD if isinstance(result, Reading) else result[0]
            assert payload.expect is None or got in payload.expect, (payload, result)
            if got != GOOD:
                found.append((payload, got.value))

    collect()
    assert len(found) >= count
    return found[:count]


def test_bad_input_between_good_readings(kafka_bootstrap: str, unique: str, tmp_path):
    print(f"\nfuzz seed {SEED}: STREAMER_FUZZ_SEED={SEED} replays this run")
    topics = {name: f"{name}-{unique}" for name in ("in", "out", "dlq")}
    create_topic(kafka_bootstrap, topics["in"], partitions=3)
    model_path = tmp_path / "model.pt"
    bundle = write_model(model_path, seed=11, version="fuzz-v1")

    # Good readings in time order; bad messages at random places between them.
    rng = np.random.default_rng(SEED)
    devices = [f"dev-{d:03d}" for d in range(N_DEVICES)]
    sequences = {d: (rng.normal(size=(N_READINGS, N_FEATURES)) * [5.0, 0.5] + [20.0, -3.0]).astype(np.float32)
                 for d in devices}
    good = [(d.encode(), reading(d, 1_700_000_000 + 60 * t, sequences[d][t].tolist()), None)
            for t in range(N_READINGS) for d in devices]
    bad = generate_bad(N_BAD, N_FEATURES, SEED)
    bad_headers = [[("trace", f"bad-{i}".encode())] if i % 3 == 0 else [] for i in range(len(bad))]
    bad_slots = set(random.Random(SEED).sample(range(len(good) + len(bad)), len(bad)))
    good_left, bad_left = iter(good), iter(zip(bad, bad_headers))
    messages = []
    for slot in range(len(good) + len(bad)):
        if slot in bad_slots:
            (payload, _), headers = next(bad_left)
            messages.append((payload.key, payload.value, headers))
        else:
            messages.append(next(good_left))
    produce(kafka_bootstrap, topics["in"], messages)

    service = ServiceThread(service_settings(
        kafka_bootstrap, topics, f"g-{unique}", model_path, tmp_path / "checkpoints", batch={"max_records": 500}))
    try:
        out = read_topic(kafka_bootstrap, topics["out"], len(good), timeout_s=60)
        dlq = read_topic(kafka_bootstrap, topics["dlq"], len(bad), timeout_s=30)
        sent = read_topic(kafka_bootstrap, topics["in"], len(messages), timeout_s=30, settle_s=0)
        assert service.alive(), f"the service stopped on its own: {service.result.get('error')!r}"
    finally:
        summary = service.stop()
    assert (summary.readings, summary.dead_letters) == (len(good), len(bad))

    # Every bad message once on the dead-letter topic: its reason, its bytes, its headers, its source.
    assert len(sent) == len(messages) and len(dlq) == len(bad)
    expected = Counter((p.key, p.value, reason, tuple(h)) for (p, reason), h in zip(bad, bad_headers))
    got = Counter()
    sources = set()
    by_position = {(r.partition, r.offset): r for r in sent}
    for record in dlq:
        theirs = [(k, v) for k, v in record.headers if not k.startswith("streamer.")]
        ours = dict(h for h in record.headers if h[0].startswith("streamer."))
        got[(record.key, record.value, ours["streamer.reason"].decode(), tuple(theirs))] += 1
        assert ours["streamer.error"] and ours["streamer.source.topic"].decode() == topics["in"]
        source = (int(ours["streamer.source.partition"]), int(ours["streamer.source.offset"]))
        assert (by_position[source].key, by_position[source].value) == (record.key, record.value)
        sources.add(source)
    assert len(sources) == len(bad)
    assert got == expected
    assert summary.dead_letters_by_reason == dict(Counter(reason for _, reason in bad))

    # Every good reading: one prediction, equal to the offline model over the device's good readings.
    assert len(out) == len(good)
    by_device = defaultdict(list)
    for record in out:
        body = json.loads(record.value)
        assert record.key == body["device_id"].encode() and math.isfinite(body["anomaly_score"])
        by_device[body["device_id"]].append(body)
    assert sorted(by_device) == devices
    for d in devices:
        preds = by_device[d]  # one partition per device: output order is reading order
        assert [p["ts"] for p in preds] == [1_700_000_000.0 + 60 * t for t in range(N_READINGS)]
        np.testing.assert_allclose(np.array([p["forecast"] for p in preds]), offline(bundle, sequences[d]),
                                   atol=1e-5, rtol=1e-6)
