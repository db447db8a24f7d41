#!/usr/bin/env python3
"""kafka-python against confluent-kafka behind streamer's client seam: one JSON object per figure.

On one topic of BENCH_READINGS (200000) readings from 5000 devices over 6 partitions (one value
each), filled once, each client runs, with a fresh consumer group each time:
  consume_only  Consumer.poll until every reading is read;
  passthrough   poll, produce one message per reading, flush (acknowledged), commit; no model;
  streamer      the run loop (Pipeline.run_once), model of hidden 64 x 2 layers on the CPU.
Figures: readings/s from the first message to the last, and CPU microseconds per reading (this
process's user+system time over the same span, the client libraries' threads included).
BENCH_ROUNDS (1) repeats the whole set, clients interleaved, so both see the same broker state.
KAFKA_BOOTSTRAP_SERVERS uses a running broker; else deploy/kafka/local-kafka is started on free
ports (KAFKA_PORT=auto, KAFKA_STATE_DIR in a temporary directory) and stopped afterwards.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamer.kafka import ensure_topics, open_consumer, open_producer  # noqa: E402
from streamer.kafka.abstract import RebalanceHooks, TopicPartition  # noqa: E402
from streamer.model import ModelConfig, init_random_model, save_model_file  # noqa: E402
from streamer.settings import KafkaSettings, Settings, load_settings  # noqa: E402

if TYPE_CHECKING:
    from streamer.pipeline import Pipeline

READINGS = int(os.environ.get("BENCH_READINGS", "200000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1"))
DEVICES, PARTITIONS, HIDDEN, LAYERS, FEATURES = 5000, 6, 64, 2, 1
MAX_RECORDS = 4096
CLIENTS = ("kafka-python", "confluent-kafka")
LOCAL_KAFKA = REPO / "deploy" / "kafka" / "local-kafka"


def emit(**figure: object) -> None:
    print(json.dumps(figure), flush=True)


def start_broker() -> tuple[str, dict[str, str] | None]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"], None
    env = {**os.environ, "KAFKA_PORT": "auto", "KAFKA_STATE_DIR": tempfile.mkdtemp(prefix="streamer-bench-kafka-")}
    started = subprocess.run([str(LOCAL_KAFKA), "start"], env=env, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        sys.exit(f"local Kafka did not start:\n{started.stderr[-3000:]}")
    return started.stdout.strip().splitlines()[-1], env


def stop_broker(broker_env: dict[str, str] | None) -> None:
    """Stop the broker start_broker started (None: it used a running one) and remove its state."""
    if broker_env is not None:
        subprocess.run([str(LOCAL_KAFKA), "stop"], env=broker_env, capture_output=True, timeout=120)
        shutil.rmtree(broker_env["KAFKA_STATE_DIR"], ignore_errors=True)


def fill_topic(bootstrap: str, topic: str) -> None:
    """READINGS readings, device i % DEVICES, keyed by device (so a device stays on one partition)."""
    ensure_topics(bootstrap, {topic: PARTITIONS})
    producer = open_producer(KafkaSettings(bootstrap_servers=bootstrap, client="confluent-kafka"))
    values = np.random.default_rng(1).normal(size=READINGS).round(4)
    ts = time.time()
    for i in range(READINGS):
        device = f"sensor-{i % DEVICES:05d}"
        body = json.dumps({"device_id": device, "ts": ts + i * 1e-3, "values": [float(values[i])]})
        producer.produce(topic, device.encode(), body.encode())
    assert producer.flush(120) and not producer.delivery_failures(), "filling the topic failed"
    producer.close(10)


def settings_for(client: str, bootstrap: str, topic: str, model_path: Path, checkpoints: Path) -> Settings:
    return load_settings({
        "kafka": {"bootstrap_servers": bootstrap, "input_topic": topic, "output_topic": f"{topic}-out-{client}",
                  "dead_letter_topic": f"{topic}-dlq", "group_id": f"bench-{client}-{uuid.uuid4().hex[:6]}",
                  "client": client},
        "batch": {"max_records": MAX_RECORDS, "max_wait_ms": 20},
        "model": {"path": model_path, "device": "cpu"},
        "state": {"capacity": 2 * DEVICES},
        "checkpoint": {"directory": checkpoints},
        "metrics": {"enabled": False},
        "run": {"status_interval_s": 0},
    })


def broker_pid(broker_env: dict[str, str] | None) -> int | None:
    """The pid of the local broker: the one start_broker started, else a running one whose
    KAFKA_STATE_DIR (deploy/kafka/local-kafka's) is in the environment; None when unknown."""
    state_dir = (broker_env or os.environ).get("KAFKA_STATE_DIR")
    try:
        pid = int((Path(state_dir) / "kafka.pid").read_text().strip()) if state_dir else None
    except (OSError, ValueError):
        return None
    return pid if pid is not None and Path(f"/proc/{pid}/stat").exists() else None


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, every thread (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Span:
    """Wall and process CPU seconds from the first ``start`` to ``stop``; with ``broker`` (a pid),
    also that process's CPU seconds (``broker_cpu``, after ``stop``): on one host the broker's
    share of the cores is taken from the loop's."""

    def __init__(self, broker: int | None = None) -> None:
        self.wall: float | None = None
        self.cpu = 0.0
        self.broker = broker
        self._broker_started = 0.0
        self.broker_cpu: float | None = None

    def start(self) -> None:
        if self.wall is None:
            self.wall, self.cpu = time.perf_counter(), time.process_time()
            if self.broker is not None:
                self._broker_started = process_cpu_seconds(self.broker)

    def stop(self) -> tuple[float, float]:
        assert self.wall is not None, "nothing was read"
        if self.broker is not None:
            self.broker_cpu = process_cpu_seconds(self.broker) - self._broker_started
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def open_loop(settings: Settings, metrics: object = None, engine: object = None) -> "Pipeline":
    """The run loop as `streamer run` builds it from ``settings``: its checkpoint store included
    (checkpoint.directory: a bench's temporary folder). ``engine``: one built already."""
    from streamer.pipeline import Pipeline
    from streamer.service import build_engine, build_store

    engine = engine or build_engine(settings)
    consumer = open_consumer(settings.kafka, settings.batch.max_records)
    producer = open_producer(settings.kafka)
    store = build_store(settings) if settings.checkpoint.enabled else None
    return Pipeline(settings, engine, consumer, producer, metrics=metrics, store=store)  # type: ignore[arg-type]


def first_messages_at(pipeline: "Pipeline", span: Span | None = None) -> list[float]:
    """A list that gets the time (perf_counter) at which the loop's poll first returned messages:
    a bench of a topic filled beforehand counts from there, the first fetch after joining the
    group (200 ms) being no part of the loop's rate. ``span`` is started then too."""
    marks: list[float] = []
    poll = pipeline._poll

    def polled(timeout_s: float, max_records: int) -> list:
        messages = poll(timeout_s, max_records)
        if messages and not marks:
            marks.append(time.perf_counter())
            if span is not None:
                span.start()
        return messages

    pipeline._poll = polled  # type: ignore[method-assign]
    return marks


def close_loop(pipeline: "Pipeline") -> None:
    pipeline.partitions.close()
    pipeline.producer.close(5)
    pipeline.consumer.close(5)
    if pipeline.partitions.store is not None:
        pipeline.partitions.store.close()


NOTHING = RebalanceHooks(lambda tps: None, lambda tps: None, lambda tps: None)


def consume_only(settings: Settings) -> tuple[float, float]:
    consumer = open_consumer(settings.kafka, MAX_RECORDS)
    consumer.subscribe([settings.kafka.input_topic], NOTHING)
    span, seen = Span(), 0
    while seen < READINGS:
        polled = consumer.poll(0.5, MAX_RECORDS)
        if polled:
            span.start()
            seen += sum(m.value is not None for m in polled)
    figures = span.stop()
    consumer.close(5)
    return figures


def passthrough(settings: Settings) -> tuple[float, float]:
    kafka = settings.kafka
    consumer = open_consumer(kafka, MAX_RECORDS)
    producer = open_producer(kafka)
    consumer.subscribe([kafka.input_topic], NOTHING)
    span, seen = Span(), 0
    while seen < READINGS:
        polled = consumer.poll(0.5, MAX_RECORDS)
        if not polled:
            continue
        span.start()
        offsets: dict[TopicPartition, int] = {}
        for m in polled:
            producer.produce(kafka.output_topic, m.key, m.value)
            offsets[TopicPartition(m.topic, m.partition)] = m.offset + 1
        assert producer.flush(60) and not producer.delivery_failures()
        consumer.commit(offsets)
        seen += len(polled)
    figures = span.stop()
    producer.close(5)
    consumer.close(5)
    return figures


def streamer_loop(settings: Settings) -> tuple[float, float]:
    pipeline = open_loop(settings)
    pipeline.subscribe()
    pipeline.prepare_process()  # as Pipeline.run does
    stop = threading.Event()
    span = Span()
    while pipeline.summary.readings < READINGS:
        if pipeline.run_once(stop):
            span.start()
    figures = span.stop()
    close_loop(pipeline)
    gc.unfreeze()  # as Pipeline.run does when it returns
    return figures


LOOPS: dict[str, Callable[[Settings], tuple[float, float]]] = {
    "consume_only": consume_only, "passthrough": passthrough, "streamer": streamer_loop,
}


def main() -> None:
    import torch

    emit(figure="machine", python=platform.python_version(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
         readings=READINGS, devices=DEVICES, partitions=PARTITIONS, hidden=HIDDEN, layers=LAYERS)
    bootstrap, broker_env = start_broker()
    work = Path(tempfile.mkdtemp(prefix="streamer-bench-clients-"))
    try:
        topic = f"bench-clients-{uuid.uuid4().hex[:8]}"
        fill_topic(bootstrap, topic)
        ensure_topics(bootstrap, {f"{topic}-out-{c}": PARTITIONS for c in CLIENTS} | {f"{topic}-dlq": 1})
        model_path = work / "model.pt"
        config = ModelConfig(FEATURES, HIDDEN, LAYERS, FEATURES)
        save_model_file(model_path, init_random_model(config, seed=0), config, "bench")
        rates: dict[tuple[str, str], list[float]] = {}
        for round_ in range(ROUNDS):
            for loop, run in LOOPS.items():
                for client in CLIENTS:
                    settings = settings_for(client, bootstrap, topic, model_path, work / f"cp-{client}-{round_}")
                    seconds, cpu = run(settings)
                    rate = READINGS / seconds
                    rates.setdefault((loop, client), []).append(rate)
                    emit(figure="kafka_client", loop=loop, client=client, round=round_, readings=READINGS,
                         readings_per_s=round(rate), cpu_us_per_reading=round(cpu / READINGS * 1e6, 2),
                         seconds=round(seconds, 2))
        for client in CLIENTS:
            best = {loop: max(rates[(loop, client)]) for loop in LOOPS}
            emit(figure="kafka_client_summary", client=client, **{f"{loop}_readings_per_s": round(r) for loop, r in best.items()},
                 streamer_vs_passthrough=round(best["streamer"] / best["passthrough"], 3))
        faster = max(CLIENTS, key=lambda c: max(rates[("streamer", c)]))
        emit(figure="kafka_client_faster", client=faster,
             streamer_ratio=round(max(rates[("streamer", faster)]) / max(max(rates[("streamer", c)]) for c in CLIENTS if c != faster), 2))
        top_passthrough = max(max(rates[("passthrough", c)]) for c in CLIENTS)
        emit(figure="kafka_client_goal", streamer_readings_per_s=round(max(rates[("streamer", faster)])),
             fastest_passthrough_readings_per_s=round(top_passthrough),
             streamer_vs_fastest_passthrough=round(max(rates[("streamer", faster)]) / top_passthrough, 3), goal=0.9)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stop_broker(broker_env)


if __name__ == "__main__":
    main()
