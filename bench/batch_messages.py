#!/usr/bin/env python3
"""Arrow batch messages through the real broker: one JSON object per figure.

A topic of 6 partitions holds GATEWAYS x ROUNDS batch messages of ROWS readings each (one
value; a gateway's devices are its own, so the table holds GATEWAYS x ROWS devices). The run loop
(Pipeline.run_once, confluent-kafka, default settings but the topics, model of hidden 64 x 2
layers on the CPU) reads them all, once with kafka.batch_output = arrow (a batch message out per
batch message in) and once with json (a message per prediction). Figures: readings/s from the
first message to the last, and as a ratio of the engine's own rate (Engine.step alone, in this
process, over the very batches the loop stepped, on a fresh table), measured right after each
loop run so that machine noise hits both alike; then the engine over the same batches without
their id lists (planned per reading, as before engine.plan_lists), and the ratio of the two.
The cores each kept busy (CPU seconds a second): the loop's process and, when the broker is local
and its pid known (the one started here, or a running one whose KAFKA_STATE_DIR is set, as
deploy/kafka/local-kafka takes it), the broker's while the loop ran; the engine alone's. On a
host of few cores the broker's share is taken from the loop's.

BATCH_ROWS (16384), BATCH_GATEWAYS (8), BATCH_ROUNDS (24) size it; BATCH_OUTPUTS (arrow,json) picks
the outputs. BATCH_ORDERS (same,shuffled): a topic for each, its gateways listing their devices
in the same order every round (the decoder reuses the ids of a sender's last message, see
records._SenderIds) or in a new order every round (never the same ids twice in a row: the ids are
read afresh from every message). KAFKA_BOOTSTRAP_SERVERS uses a
running broker; else deploy/kafka/local-kafka is started on free ports and stopped afterwards.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from kafka_clients import (  # noqa: E402
    Span, broker_pid, close_loop, emit, first_messages_at, open_loop, start_broker, stop_broker,
)

from streamer.engine import ReadingBatch  # noqa: E402
from streamer.kafka import ensure_topics, open_producer  # noqa: E402
from streamer.model import ModelConfig, init_random_model, save_model_file  # noqa: E402
from streamer.records import ARROW_CONTENT_TYPE, CONTENT_TYPE_HEADER, encode_arrow_readings  # noqa: E402
from streamer.service import build_engine  # noqa: E402
from streamer.settings import KafkaSettings, Settings, load_settings  # noqa: E402

ROWS = int(os.environ.get("BATCH_ROWS", "16384"))
GATEWAYS = int(os.environ.get("BATCH_GATEWAYS", "8"))
ROUNDS = int(os.environ.get("BATCH_ROUNDS", "24"))
OUTPUTS = [o.strip() for o in os.environ.get("BATCH_OUTPUTS", "arrow,json").split(",") if o.strip()]
ORDERS = [o.strip() for o in os.environ.get("BATCH_ORDERS", "same,shuffled").split(",") if o.strip()]
PARTITIONS, HIDDEN, LAYERS = 6, 64, 2
READINGS = ROWS * GATEWAYS * ROUNDS
DEVICES = ROWS * GATEWAYS


def fill_topic(bootstrap: str, topic: str, order: str) -> None:
    if order not in ("same", "shuffled"):
        raise SystemExit(f"BATCH_ORDERS: {order!r} is neither same nor shuffled")
    ensure_topics(bootstrap, {topic: PARTITIONS})
    producer = open_producer(KafkaSettings(bootstrap_servers=bootstrap))
    rng = np.random.default_rng(1)
    header = [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)]
    ts = time.time()
    for r in range(ROUNDS):
        for g in range(GATEWAYS):
            ids = [f"gw{g:03d}-sensor-{i:06d}" for i in range(ROWS)]
            if order == "shuffled":
                ids = [ids[i] for i in rng.permutation(ROWS)]
            value = encode_arrow_readings(ids, np.full(ROWS, ts + r), rng.normal(size=(ROWS, 1)))
            producer.produce(topic, f"gateway-{g:03d}".encode(), value, header)
    assert producer.flush(120) and not producer.delivery_failures(), "filling the topic failed"
    producer.close(10)


def settings_for(bootstrap: str, topic: str, model_path: Path, checkpoints: Path, batch_output: str) -> Settings:
    return load_settings({
        "kafka": {"bootstrap_servers": bootstrap, "input_topic": topic, "output_topic": f"{topic}-out-{batch_output}",
                  "dead_letter_topic": f"{topic}-dlq", "group_id": f"bench-batch-{uuid.uuid4().hex[:6]}",
                  "batch_output": batch_output},
        "model": {"path": model_path, "device": "cpu"},
        "state": {"capacity": DEVICES},
        "checkpoint": {"directory": checkpoints},
        "metrics": {"enabled": False},
        "run": {"status_interval_s": 0},
    })


def loop(settings: Settings, broker: int | None) -> tuple[float, list[ReadingBatch], float, float | None]:
    """Seconds from the first message to the last, the batches the engine stepped, and the cores
    (CPU seconds a second) this process and the broker (``broker``: its pid, when it is local and
    known; else None) kept busy meanwhile."""
    engine = build_engine(settings)
    stepped: list[ReadingBatch] = []
    step = engine.step

    def kept(batch: ReadingBatch, now: float | None = None):
        stepped.append(batch)
        return step(batch, now)

    engine.step = kept  # type: ignore[method-assign]
    pipeline = open_loop(settings, engine=engine)
    span = Span(broker)
    first = first_messages_at(pipeline, span)  # the first batch's own processing counts, its wait for data not
    pipeline.subscribe()
    pipeline.prepare_process()  # as Pipeline.run does
    stop = threading.Event()
    while pipeline.summary.readings < READINGS:
        pipeline.run_once(stop)
    pipeline._settle(commit=True)  # the last batch acknowledged, as the run loop does when it stops
    seconds = time.perf_counter() - first[0]
    wall, cpu = span.stop()
    close_loop(pipeline)
    gc.unfreeze()
    return seconds, stepped, cpu / wall, None if span.broker_cpu is None else span.broker_cpu / wall


def engine_rate(settings: Settings, stepped: list[ReadingBatch]) -> tuple[float, float]:
    """Readings/s of Engine.step alone over the batches the loop stepped, on a fresh table, and
    the cores it kept busy (process CPU seconds a second)."""
    engine = build_engine(settings)
    for batch in stepped:  # every device in the table, as the loop's run leaves it
        engine.step(batch, now=0.0)
    span, done = Span(), 0
    span.start()
    until = time.perf_counter() + 3.0
    while time.perf_counter() < until:
        for batch in stepped:
            engine.step(batch, now=0.0)
            done += len(batch)
    seconds, cpu = span.stop()
    return done / seconds, cpu / seconds


def main() -> None:
    import torch

    bootstrap, broker_env = start_broker()
    broker = broker_pid(broker_env)
    work = Path(tempfile.mkdtemp(prefix="streamer-bench-batch-"))
    run_id = uuid.uuid4().hex[:8]
    try:
        model_path = work / "model.pt"
        config = ModelConfig(1, HIDDEN, LAYERS, 1)
        save_model_file(model_path, init_random_model(config, seed=0), config, "bench")
        for order, batch_output in [(order, output) for order in ORDERS for output in OUTPUTS]:
            topic = f"bench-batch-{order}-{run_id}"
            if batch_output == OUTPUTS[0]:
                fill_topic(bootstrap, topic, order)
                ensure_topics(bootstrap, {f"{topic}-out-{o}": PARTITIONS for o in OUTPUTS} | {f"{topic}-dlq": 1})
            settings = settings_for(bootstrap, topic, model_path, work / f"cp-{order}-{batch_output}", batch_output)
            seconds, stepped, loop_cores, broker_cores = loop(settings, broker)
            typical = int(statistics.median(len(b) for b in stepped))
            engine, engine_cores = engine_rate(settings, stepped)
            # The engine over the same batches planned per reading, not per sender's list: what
            # the lists give (none where no batch repeats a list: plan_lists leaves those to plan_waves).
            per_reading, _ = engine_rate(settings, [replace(batch, id_lists=None) for batch in stepped])
            rate = READINGS / seconds
            emit(figure="batch_messages_end_to_end", order=order, batch_output=batch_output, client=settings.kafka.client,
                 rows_per_message=ROWS, messages=GATEWAYS * ROUNDS, readings=READINGS, devices=DEVICES,
                 torch_threads=torch.get_num_threads(), state_dtype=settings.state.dtype,
                 compiled=settings.model.compile, median_step_readings=typical, readings_per_s=round(rate),
                 engine_readings_per_s=round(engine), vs_engine=round(rate / engine, 3),
                 engine_planned_per_reading_readings_per_s=round(per_reading),
                 engine_lists_vs_per_reading=round(engine / per_reading, 3),
                 # Cores busy (CPU seconds a second): the loop's process, the local broker's meanwhile
                 # (None when not known), the engine alone's, of the host's.
                 loop_cores=round(loop_cores, 2),
                 broker_cores=None if broker_cores is None else round(broker_cores, 2),
                 engine_cores=round(engine_cores, 2), host_cores=os.cpu_count(),
                 goal_readings_per_s=1_000_000, goal_vs_engine=0.8)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stop_broker(broker_env)


if __name__ == "__main__":
    main()
