"""The run loop: Kafka poll -> decode -> step -> produce -> acknowledge -> commit.

At-least-once: a batch's offsets are committed only after every prediction and dead letter of
that batch has been acknowledged by the broker. A crash between the two re-delivers the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamer.engine import Engine
from streamer.errors import PipelineError
from streamer.metrics import Health, Metrics
from streamer.records import ReadingDecoder, encode_predictions
from streamer.settings import Settings

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200
LAG_INTERVAL_S = 1.0


@dataclass
class RunSummary:
    readings: int = 0
    predictions: int = 0
    dead_letters: int = 0
    anomalies: int = 0
    batches: int = 0
    seconds: float = 0.0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.health = health
        self.decoder = ReadingDecoder(engine.config.input_size)
        self.summary = RunSummary()
        self._last_lag = 0.0
        self._last_status = time.monotonic()
        self._status_readings = 0
        if metrics is not None:
            metrics.watch_table(lambda: len(engine.table), engine.table.capacity, engine.model_version)

    def run(self, stop: threading.Event) -> RunSummary:
        """Process micro-batches until ``stop`` is set or run.duration_s has passed."""
        self.consumer.subscribe([self.settings.kafka.input_topic])
        started = time.monotonic()
        duration = self.settings.run.duration_s
        try:
            while not stop.is_set():
                if duration is not None and time.monotonic() - started >= duration:
                    break
                self.run_once(stop)
                self._maybe_status()
        except Exception as exc:
            if self.health is not None:
                self.health.fail(f"run loop stopped: {exc}")
            raise
        finally:
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Poll one micro-batch and process it completely; returns the messages handled."""
        records = self._poll_batch(stop)
        if self.health is not None:
            self.health.beat()
        if self.metrics is not None:
            self.metrics.on_poll()
        if records:
            self._process(records)
        self._maybe_lag()
        return len(records)

    def _poll_batch(self, stop: threading.Event | None) -> list:
        """Up to batch.max_records messages, waiting at most batch.max_wait_ms after the first."""
        max_records = self.settings.batch.max_records
        max_wait = self.settings.batch.max_wait_ms / 1000
        records: list = []
        deadline: float | None = None
        while len(records) < max_records:
            if deadline is None:
                timeout_ms = IDLE_POLL_MS
            else:
                timeout_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records - len(records))
            for messages in polled.values():
                records.extend(messages)
            if not records:
                return records  # idle: let the caller check stop and deadlines
            if deadline is None:
                deadline = time.monotonic() + max_wait
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                break
        return records

    def _process(self, records: list) -> None:
        """The commit order, step by step."""
        started = time.perf_counter()
        kafka = self.settings.kafka
        # 1. Decode and validate; bad messages become dead letters, never exceptions.
        decoded = self.decoder.decode(records)
        # 2. Step every device with a new reading, in offset order per device.
        predictions, report = self.engine.step(decoded.readings)
        # 3. Produce predictions and dead letters.
        futures = [
            self.producer.send(kafka.output_topic, key=key, value=value)
            for key, value in encode_predictions(predictions, self.engine.model_version)
        ]
        for letter in decoded.dead_letters:
            futures.append(
                self.producer.send(kafka.dead_letter_topic, key=letter.key, value=letter.value, headers=letter.kafka_headers())
            )
        # 4. Wait until the broker has acknowledged all of them.
        self.producer.flush()
        failed = [f for f in futures if f.failed()]
        if failed:
            raise PipelineError(
                f"{len(failed)} of {len(futures)} sends of this batch failed (first: {failed[0].exception!r});"
                " offsets not committed, the batch will be re-delivered"
            )
        acked_at = time.time()
        # 5. Commit the offsets of every message of the batch, used or dead-lettered.
        self.consumer.commit(self._next_offsets(records))
        # 6. Account for it.
        by_reason = Tally(letter.reason.value for letter in decoded.dead_letters)
        self._account(report, by_reason, acked_at - predictions.ts, time.perf_counter() - started)

    @staticmethod
    def _next_offsets(records: list) -> dict[TopicPartition, OffsetAndMetadata]:
        last: dict[TopicPartition, int] = {}
        for msg in records:
            last[TopicPartition(msg.topic, msg.partition)] = msg.offset
        return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in last.items()}

    def _account(self, report, by_reason: Tally, latencies: np.ndarray, batch_seconds: float) -> None:
        s = self.summary
        s.batches += 1
        s.readings += report.readings
        s.predictions += report.readings
        s.anomalies += report.anomalies
        dead = sum(by_reason.values())
        s.dead_letters += dead
        for reason, count in by_reason.items():
            s.dead_letters_by_reason[reason] = s.dead_letters_by_reason.get(reason, 0) + count
        self._status_readings += report.readings
        if self.metrics is None:
            return
        self.metrics.on_batch(
            readings=report.readings,
            predictions=report.readings,
            anomalies=report.anomalies,
            new_devices=report.new_devices,
            evicted_ttl=report.evicted_idle,
            evicted_capacity=report.evicted_capacity,
            step_seconds=report.step_seconds,
            batch_seconds=batch_seconds,
            latencies=latencies,
        )
        if by_reason:
            self.metrics.on_dead_letters(by_reason)

    def _maybe_lag(self) -> None:
        if self.metrics is None or time.monotonic() - self._last_lag < LAG_INTERVAL_S:
            return
        self._last_lag = time.monotonic()
        self.metrics.on_lag(self.lag())

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the end of each assigned partition, where the consumer knows both."""
        lag = {}
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except Exception:  # unknown until the partition's first fetch; lag is best effort
                continue
            if position is not None:
                lag[(tp.topic, tp.partition)] = max(0, end - position)
        return lag

    def _maybe_status(self) -> None:
        interval = self.settings.run.status_interval_s
        if not interval:
            return
        now = time.monotonic()
        elapsed = now - self._last_status
        if elapsed < interval:
            return
        lag = sum(self.lag().values())
        s = self.summary
        log.info(
            "%.0f readings/s | %d devices | %d anomalies | %d dead letters | lag %d",
            self._status_readings / elapsed,
            len(self.engine.table),
            s.anomalies,
            s.dead_letters,
            lag,
        )
        self._last_status = now
        self._status_readings = 0
