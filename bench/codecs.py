#!/usr/bin/env python3
"""The codecs' benchmark: one JSON object per figure on stdout.

json_codec: messages/s decoding a batch of JSON readings into a ReadingBatch and encoding as
many predictions, for the pydantic decoder and json-module encoder they replaced (kept in
tests/test_records.py as the reference) and for streamer.records, in the same process, over
the same messages, alternating runs.

batch_message: one Arrow batch message of B rows (B distinct devices, as bench/bench.py's engine
figure) for B in {1k, 16k, 131k}: readings/s of decoding it alone; of Engine.step alone; and of
decode + step + encode, with its ratio to the step alone (goals: decode >= 1M readings/s,
ratio >= 0.8); with torch's default threads and with one. Each time is the best of ROUNDS rounds that alternate the ways (machine noise only
slows a round down), each round the median of its runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamer.engine import Engine, PredictionBatch, ReadingBatch  # noqa: E402
from streamer.model import ModelBundle, ModelConfig, init_random_model  # noqa: E402
from streamer.records import (  # noqa: E402
    ARROW_CONTENT_TYPE,
    CONTENT_TYPE_HEADER,
    Reading,
    ReadingDecoder,
    encode_arrow_readings,
    encode_predictions,
)
from bench import emit, timed  # noqa: E402  (bench/bench.py, this script's sibling)
from tests.test_records import PydanticDecoder, old_encode  # noqa: E402
from tests.test_records_fuzz import Message  # noqa: E402

HIDDEN, LAYERS = 64, 2
JSON_BATCH = 4096  # messages per decoded batch: bench/bench.py's batch.max_records
JSON_DEVICES = 5000
BATCH_ROWS = (1024, 16384, 131072)
ROUNDS = 3


def json_messages(n: int, features: int, seed: int = 0) -> list[Message]:
    """Readings as bench/bench.py writes them to its topic (ts, values rounded to 4 places)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n, features)).round(4).tolist()
    ts = time.time()
    messages = []
    for i in range(n):
        device = f"sensor-{i % JSON_DEVICES:05d}"
        body = json.dumps({"device_id": device, "ts": ts + i * 1e-3, "values": values[i]}).encode()
        messages.append(Message("bench", i % 6, i, device.encode(), body, []))
    return messages


@dataclass(frozen=True)
class OldSourcePosition:
    """SourcePosition as the pydantic decoder made it, one per message."""

    topic: str
    partition: int
    offset: int


def pydantic_decode(decoder: PydanticDecoder, messages: list[Message]) -> ReadingBatch:
    """The pydantic decoder's decode(): a reading and a position per good message, arrays built as it built them."""
    ids, ts, values, positions = [], [], [], []
    for msg in messages:
        result = decoder.decode_one(msg.key, msg.value)
        position = OldSourcePosition(msg.topic, msg.partition, msg.offset)
        if not isinstance(result, tuple):
            ids.append(result.device_id)
            ts.append(result.ts)
            values.append(result.values)
            positions.append(position)
    return ReadingBatch(
        ids, np.asarray(ts, dtype=np.float64), np.asarray(values, dtype=np.float32).reshape(len(ids), decoder.input_size),
        np.fromiter((p.partition for p in positions), dtype=np.int32, count=len(positions)),
    )


def predictions_for(readings: ReadingBatch) -> PredictionBatch:
    n = len(readings)
    rng = np.random.default_rng(1)
    score = rng.random(n)
    return PredictionBatch(readings.device_ids, readings.ts, readings.values * np.float32(1.01), score, score > 0.99,
                           rng.normal(size=n).astype(np.float32), np.zeros(n, dtype=np.float32))


def bench_json(features: int) -> None:
    messages = json_messages(JSON_BATCH, features)
    new, old = ReadingDecoder(features), PydanticDecoder(features)
    predictions = predictions_for(new.decode(messages).readings)
    assert isinstance(new.decode_one(messages[0].key, messages[0].value), Reading)
    assert pydantic_decode(old, messages).values.tobytes() == new.decode(messages).readings.values.tobytes()
    ways = {
        "pydantic+json": (lambda: pydantic_decode(old, messages), lambda: old_encode(predictions, "bench")),
        "msgspec": (lambda: new.decode(messages), lambda: encode_predictions(predictions, "bench")),
    }
    seconds = {name: [math.inf, math.inf] for name in ways}
    for _ in range(ROUNDS):  # alternate, so that machine noise hits both ways alike; keep the best
        for name, (decode, encode) in ways.items():
            d, e = timed(decode, min_seconds=0.5), timed(encode, min_seconds=0.5)
            seconds[name] = [min(seconds[name][0], d), min(seconds[name][1], e)]
    for name, (d, e) in seconds.items():
        base_d, base_e = seconds["pydantic+json"]
        emit(figure="json_codec", way=name, features=features, batch=JSON_BATCH,
             decode_messages_per_s=round(JSON_BATCH / d), encode_messages_per_s=round(JSON_BATCH / e),
             decode_encode_messages_per_s=round(JSON_BATCH / (d + e)),
             vs_pydantic=round((base_d + base_e) / (d + e), 2))


def bench_batch_messages(threads: int) -> None:
    """The batch_message figures with torch using ``threads`` threads."""
    torch.set_num_threads(threads)
    config = ModelConfig(1, HIDDEN, LAYERS, 1)
    bundle = ModelBundle(init_random_model(config, seed=0), config, "bench", None)
    rng = np.random.default_rng(2)
    decoder = ReadingDecoder(1)
    for rows in BATCH_ROWS:
        ids = [f"sensor-{i:06d}" for i in range(rows)]
        value = encode_arrow_readings(ids, np.full(rows, time.time()), rng.normal(size=(rows, 1)))
        message = Message("bench", 0, 0, b"gateway-00000", value, [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)])
        decoded = decoder.decode([message])
        assert len(decoded.readings) == rows and not decoded.dead_letters
        engine = Engine.build(bundle, capacity=rows, device="cpu")
        predictions, _ = engine.step(decoded.readings, now=0.0)

        def end_to_end() -> None:
            batch = decoder.decode([message])
            predictions, _ = engine.step(batch.readings, now=0.0)
            encode_predictions(predictions, "bench")

        ways = {
            "decode": lambda: decoder.decode([message]),
            "encode": lambda: encode_predictions(predictions, "bench"),
            "step": lambda: engine.step(decoded.readings, now=0.0),
            "end_to_end": end_to_end,
        }
        best: dict[str, float] = {}
        for _ in range(ROUNDS):  # alternate, so that machine noise hits step and end to end alike; keep the best
            for name, fn in ways.items():
                best[name] = min(best.get(name, math.inf), timed(fn, min_seconds=0.5))
        decode_s, encode_s, step_s, both_s = (best[name] for name in ways)
        emit(figure="batch_message", rows=rows, message_bytes=len(value), hidden=HIDDEN, layers=LAYERS, torch_threads=threads,
             decode_readings_per_s=round(rows / decode_s), encode_readings_per_s=round(rows / encode_s),
             engine_readings_per_s=round(rows / step_s), decode_step_encode_readings_per_s=round(rows / both_s),
             vs_engine=round(step_s / both_s, 3))


def main() -> None:
    emit(figure="machine", python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
         torch_threads=torch.get_num_threads())
    for features in (1, 3):
        bench_json(features)
    # torch's default threads, then one: OpenMP threads spin on after a step and slow the Python
    # work that follows (decode, encode) on a machine with few cores; one thread shows the codecs' own cost.
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        bench_batch_messages(threads)


if __name__ == "__main__":
    main()
