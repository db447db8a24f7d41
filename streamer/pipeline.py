"""The run loop: Kafka poll -> decode -> step -> produce -> acknowledge -> commit -> checkpoint.

At-least-once (default): a batch's offsets are committed only after every prediction and dead
letter of that batch has been acknowledged by the broker; a crash in between re-delivers the
batch. Exactly-once (kafka.exactly_once): the batch's predictions, dead letters and input
offsets are committed in one transaction; an aborted batch's partitions are recovered again
from their checkpoints, since the engine had applied readings whose output never became
visible. Checkpoints follow commits (see partitions.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamer.checkpoint import DirectoryCheckpointStore
from streamer.engine import Engine, PredictionBatch, StepReport
from streamer.errors import PipelineError, StreamerError
from streamer.kafka.clients import OUTSIDE_GROUP_SESSIONS, MembershipWatch
from streamer.metrics import Health, Metrics
from streamer.model import load_model_file
from streamer.partitions import CheckpointPolicy, PartitionManager
from streamer.records import DeadLetter, ReadingDecoder, encode_predictions
from streamer.settings import Settings

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200
LAG_INTERVAL_S = 1.0
BROKER_AWAY_BACKOFF_S = 0.5
# Each LAG_INTERVAL_S the loop asks the brokers for the end offsets of its partitions, waiting at
# most this long: the answer is the lag, no answer makes the process not ready (/readyz).
BROKER_PROBE_TIMEOUT_MS = 1000
TRANSACTION_CALL_TIMEOUT_S = 60.0  # kafka-python waits on transaction calls without a bound
COMMIT_RETRY_S = 120.0  # retriable commit errors (broker away) are retried this long
# A commit refused because partitions are moving: whoever owns them next re-reads from the last
# commit, so the batch's predictions are repeated, never lost.
GROUP_MOVED_ON = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError)


@dataclass
class RunSummary:
    readings: int = 0
    predictions: int = 0
    dead_letters: int = 0
    anomalies: int = 0
    batches: int = 0
    replayed: int = 0
    aborted_batches: int = 0
    seconds: float = 0.0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)


class ModelWatcher:
    """Notices when the model file changes (mtime or size), checking at most every interval_s."""

    def __init__(self, path: Path, interval_s: float) -> None:
        self.path = path
        self.interval_s = interval_s
        self._signature = self._stat()
        self._next_check = time.monotonic() + interval_s

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def changed(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.interval_s
        signature = self._stat()
        if signature is None or signature == self._signature:
            return False
        self._signature = signature
        return True


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        metrics: Metrics | None = None,
        health: Health | None = None,
        store: DirectoryCheckpointStore | None = None,
        producer_factory: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        """``producer_factory`` makes a replacement for a transactional producer that got stuck
        (exactly-once mode); without it such a producer stops the loop."""
        self.settings = settings
        self.producer_factory = producer_factory
        self.engine = engine
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.health = health
        self.exactly_once = settings.kafka.exactly_once
        self.decoder = ReadingDecoder(engine.config.values_size)
        policy = CheckpointPolicy(settings.checkpoint.interval_s, settings.checkpoint.interval_readings)
        self.partitions = PartitionManager(consumer, engine, store, policy, metrics)
        self.summary = RunSummary()
        model = settings.model
        self.model_watcher = (
            ModelWatcher(model.path, model.reload_interval_s) if model.path and model.reload_interval_s else None
        )
        self._last_lag = 0.0
        self._end_offsets: dict[TopicPartition, int] = {}  # last known, kept while the broker is away
        self._stop: threading.Event | None = None
        self._broker_answers = True  # whether the last broker probe answered
        self.membership = MembershipWatch(consumer, OUTSIDE_GROUP_SESSIONS * settings.kafka.session_timeout_ms / 1000)
        self._last_status = time.monotonic()
        self._status_readings = 0
        if metrics is not None:
            metrics.watch_table(lambda: len(engine.table), engine.table.capacity, engine.model_version)

    def subscribe(self) -> None:
        self.consumer.subscribe([self.settings.kafka.input_topic], listener=self.partitions.listener())

    def run(self, stop: threading.Event) -> RunSummary:
        """Process micro-batches until ``stop`` is set or run.duration_s has passed; then
        checkpoint every owned partition (everything applied is committed by then)."""
        self._stop = stop
        self.subscribe()
        started = time.monotonic()
        duration = self.settings.run.duration_s
        try:
            while not stop.is_set():
                if duration is not None and time.monotonic() - started >= duration:
                    break
                self.run_once(stop)
                self._maybe_status()
            self.partitions.checkpoint_all()
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
        try:
            self.partitions.recover_pending()
        except KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise
            log.warning("recovering partitions must wait, the broker is away: %r", exc)  # they stay paused
        if self.health is not None:
            self.health.beat()
        if self.metrics is not None:
            self.metrics.on_poll()
        self._watch_membership()
        if records:
            self._process(records)
        self._maybe_reload_model()
        self._maybe_lag()
        return len(records)

    def _poll_batch(self, stop: threading.Event | None) -> list:
        """Up to batch.max_records messages of owned, recovered partitions, waiting at most
        batch.max_wait_ms after the first; per partition in offset order."""
        max_records = self.settings.batch.max_records
        max_wait = self.settings.batch.max_wait_ms / 1000
        chunks: list[tuple[TopicPartition, list]] = []
        count = 0
        deadline: float | None = None
        while count < max_records:
            if deadline is None:
                timeout_ms = IDLE_POLL_MS
            else:
                timeout_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            polled = self._poll(timeout_ms, max_records - count)
            for tp, messages in polled.items():
                chunks.append((tp, messages))
                count += len(messages)
            if not count:
                break  # idle: let the caller check stop and deadlines
            if deadline is None:
                deadline = time.monotonic() + max_wait
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                break
        # A partition revoked (or assigned and not yet recovered) while polling: its messages
        # are someone else's, or will be read again from its recovered position.
        return [msg for tp, messages in chunks if self.partitions.accepts(tp) for msg in messages]

    def _poll(self, timeout_ms: int, max_records: int) -> dict:
        """consumer.poll, riding out a broker that is away (kafka-python raises then, at times,
        instead of retrying by itself)."""
        try:
            return self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise
            log.warning("poll failed, the broker is away: %r; retrying", exc)
            time.sleep(BROKER_AWAY_BACKOFF_S)
            return {}

    def _process(self, records: list) -> None:
        """The commit order, step by step."""
        started = time.perf_counter()
        # The group membership this batch is committed under, taken before anything else: if the
        # consumer loses its partitions meanwhile (kafka-python's IO thread), the broker refuses
        # the transaction's offsets instead of accepting them under a newer membership.
        group = self.consumer.group_metadata() if self.exactly_once else None
        # 1. Decode and validate; bad messages become dead letters, never exceptions.
        decoded = self.decoder.decode(records)
        next_offsets, readings_per_partition = _progress(records)
        # Readings below a recovered partition's committed offset were published before.
        bounds = self.partitions.replay_bounds()
        replay = np.fromiter(
            (p.offset < bounds.get((p.topic, p.partition), -1) for p in decoded.positions),
            dtype=bool,
            count=len(decoded.positions),
        ) if bounds else np.zeros(len(decoded.positions), dtype=bool)
        letters = [d for d in decoded.dead_letters if d.source.offset >= bounds.get((d.source.topic, d.source.partition), -1)]
        # 2. Step every device with a new reading, in offset order per device.
        with self.partitions.lock:
            predictions, report = self.engine.step(decoded.readings)
            self.partitions.applied(next_offsets, readings_per_partition)
        published = _select(predictions, ~replay) if replay.any() else predictions
        offsets = self.partitions.offsets_to_commit(next_offsets)
        # 3-5. Produce predictions and dead letters; once the broker has them, commit offsets.
        if self.exactly_once:
            if not self._publish_transaction(published, letters, offsets, next_offsets, group):
                return  # nothing of this batch became visible
            committed = True
        else:
            if not self._publish(published, letters):
                return  # stopping with the broker away: nothing committed, the batch is re-delivered
            committed = not offsets or self._commit(offsets)  # published either way
        acked_at = time.time()
        # 6. Checkpoint the partitions that are due, now that their offsets are committed.
        if committed:
            self.partitions.committed(offsets)
        # 7. Account for it.
        by_reason = Tally(letter.reason.value for letter in letters)
        self.summary.replayed += int(replay.sum())
        self._account(report, len(published), by_reason, acked_at - published.ts, time.perf_counter() - started)

    def _sends(self, predictions: PredictionBatch, letters: list[DeadLetter]) -> list:
        kafka = self.settings.kafka
        futures = [
            self.producer.send(kafka.output_topic, key=key, value=value)
            for key, value in encode_predictions(predictions, self.engine.model_version)
        ]
        for letter in letters:
            # Kafka clients cannot send a message without key and value: keep an empty value.
            value = letter.value if letter.value is not None or letter.key is not None else b""
            futures.append(
                self.producer.send(kafka.dead_letter_topic, key=letter.key, value=value, headers=letter.kafka_headers())
            )
        return futures

    def _publish(self, predictions: PredictionBatch, letters: list[DeadLetter]) -> bool:
        """Send and wait for every acknowledgement; False when stopped while the broker is away
        (then nothing of the batch may be committed)."""
        futures = self._sends(predictions, letters)
        if not self._flush():
            log.warning("stopping with the broker away: this batch stays uncommitted and will be re-delivered")
            return False
        failed = [f for f in futures if f.failed()]
        if failed:
            raise PipelineError(
                f"{len(failed)} of {len(futures)} sends of this batch failed (first: {failed[0].exception!r});"
                " offsets not committed, the batch will be re-delivered"
            )
        return True

    def _flush(self) -> bool:
        """producer.flush(), a second at a time: while the broker is away the loop stays live, probes
        the broker (readiness, lag) and notices ``stop`` (False then). The producer's
        delivery timeout still fails the sends of a broker that stays away."""
        while True:
            try:
                self.producer.flush(timeout=BROKER_PROBE_TIMEOUT_MS / 1000)
                return True
            except KafkaTimeoutError:
                pass
            if self._stop is not None and self._stop.is_set():
                return False
            self._still_waiting("predictions wait for the broker's acknowledgement")

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> bool:
        """Commit, retrying while the broker is away; False if the group took the partitions
        meanwhile (their new owner re-reads from the last commit: at-least-once holds)."""
        deadline = time.monotonic() + COMMIT_RETRY_S
        while True:
            try:
                self.consumer.commit(offsets)
                return True
            except GROUP_MOVED_ON as exc:
                log.warning("commit refused, the group is rebalancing or has rebalanced: %r", exc)
                return False
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or time.monotonic() > deadline:
                    raise PipelineError(f"cannot commit offsets: {exc!r}") from exc
                if self._stop is not None and self._stop.is_set():
                    # Stopping: the batch stays uncommitted and is re-delivered (at-least-once).
                    log.warning("stopping with the broker away: this batch's offsets stay uncommitted (%r)", exc)
                    return False
                log.warning("commit failed (%r), retrying", exc)
                time.sleep(0.5)
                self._still_waiting(f"offsets cannot be committed ({type(exc).__name__})")

    def _publish_transaction(
        self,
        predictions: PredictionBatch,
        letters: list[DeadLetter],
        offsets: dict[TopicPartition, OffsetAndMetadata],
        next_offsets: dict[TopicPartition, int],
        group: object,
    ) -> bool:
        """One transaction: outputs and input offsets. False when it was aborted; then the
        batch's partitions are recovered again (the engine applied what nobody will see)."""
        producer = self.producer
        try:
            # Outputs only ever travel with their partition's offsets: those are what the broker
            # fences. A partition that left this process mid-batch has none, so the batch aborts.
            unfenced = {tp for tp in next_offsets if not self.partitions.accepts(tp)}
            if unfenced:
                raise PartitionsMoved(f"partitions left this process during the batch: {sorted(unfenced)}")
            producer.begin_transaction()
            self._sends(predictions, letters)
            if offsets:
                _bounded(lambda: producer.send_offsets_to_transaction(offsets, group), "send_offsets_to_transaction")
            _bounded(producer.commit_transaction, "commit_transaction")
            return True
        except PartitionsMoved as exc:
            log.warning("batch dropped: %s", exc)
            self.partitions.reset(next_offsets)
            self.summary.aborted_batches += 1
            return False
        except (KafkaError, TransactionStuck) as exc:
            log.warning("transaction aborted (%r): recovering %d partitions", exc, len(next_offsets))
            if not isinstance(exc, TransactionStuck):
                try:
                    _bounded(producer.abort_transaction, "abort_transaction")
                except (KafkaError, TransactionStuck) as abort_exc:
                    log.warning("abort failed too: %r", abort_exc)
            # Always start over with a new producer epoch: kafka-python 3.0 was seen to commit an
            # aborted batch's offsets later on (its offsets request retried into the next
            # transaction), which loses that batch. The successor fences every request of this one.
            self._replace_producer(exc)
            self.partitions.reset(next_offsets)
            self.summary.aborted_batches += 1
            if self.metrics is not None:
                self.metrics.on_transaction_aborted()
            return False

    def _replace_producer(self, cause: BaseException) -> None:
        """A producer whose transaction was aborted or got stuck is dropped; its successor (same
        transactional id) fences it and aborts what it left open."""
        if self.producer_factory is None:
            if isinstance(cause, TransactionStuck):
                raise PipelineError(f"the transaction can be neither committed nor aborted: {cause!r}") from cause
            return  # nothing to replace it with: carry on with this one
        log.warning("replacing the transactional producer after %r", cause)
        try:
            self.producer.close(timeout=0)
        except Exception:  # a broken producer may fail to close; its successor fences it anyway
            log.debug("closing the old producer failed", exc_info=True)
        self.producer = self.producer_factory()

    def _account(
        self, report: StepReport, published: int, by_reason: Tally, latencies: np.ndarray, batch_seconds: float
    ) -> None:
        s = self.summary
        s.batches += 1
        s.readings += report.readings
        s.predictions += published
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
            predictions=published,
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

    def _maybe_reload_model(self) -> None:
        if self.model_watcher is None or not self.model_watcher.changed():
            return
        path = self.model_watcher.path
        try:
            bundle = load_model_file(path)
            with self.partitions.lock:
                devices = len(self.engine.table)
                reset = self.engine.swap_model(bundle)
                self.partitions.model_switched()  # so that no replay after a crash crosses the switch
        except StreamerError as exc:
            log.error("model file changed but cannot be used, still serving %s: %s", self.engine.model_version, exc)
            if self.metrics is not None:
                self.metrics.on_model_reload("failed")
            return
        if reset:
            self.decoder = ReadingDecoder(bundle.config.values_size)
            log.warning(
                "model %s from %s has a new shape (%s): state table reset, %d devices start from zeros",
                bundle.version, path, bundle.config.to_dict(), devices,
            )
        else:
            log.info("now serving model %s from %s", bundle.version, path)
        if self.metrics is not None:
            self.metrics.on_model_reload("reset" if reset else "loaded", bundle.version)

    def _watch_membership(self) -> None:
        """A consumer stuck outside its group (kafka-python 3.0.12, see MembershipWatch) is made
        to rejoin, and liveness fails while it stays out."""
        if self.membership.check(self._broker_answers) and self.metrics is not None:
            self.metrics.group_rejoins.inc()
        if self.health is not None:
            self.health.outside_group(self.membership.outside)

    def _still_waiting(self, why: str) -> None:
        """The loop waits on the broker inside a batch: it is live, readiness follows the probe."""
        self._broker_answers = False
        if self.health is not None:
            self.health.beat()
            self.health.broker_away(why)
        self._maybe_lag()

    def _maybe_lag(self) -> None:
        if time.monotonic() - self._last_lag < LAG_INTERVAL_S:
            return
        self._last_lag = time.monotonic()
        self._probe_broker()
        if self.metrics is not None:
            self.metrics.on_lag(self.lag())

    def _probe_partitions(self) -> list[TopicPartition]:
        assigned = list(self.consumer.assignment())
        if assigned:
            return assigned
        # Nothing assigned (yet): still find out whether the brokers answer, on the input topic's
        # partition 0 (partitions_for_topic could wait 30 s for metadata from an absent broker).
        return [TopicPartition(self.settings.kafka.input_topic, 0)]

    def _probe_broker(self) -> None:
        """Ask for the end offsets (at most BROKER_PROBE_TIMEOUT_MS): they feed lag(), and whether
        an answer came decides readiness."""
        try:
            ends = self.consumer.end_offsets(self._probe_partitions(), timeout_ms=BROKER_PROBE_TIMEOUT_MS)
        except KafkaError as exc:
            reason = f"no answer to an end-offsets request within {BROKER_PROBE_TIMEOUT_MS} ms ({type(exc).__name__})"
            self._broker_answers = False
            if self.health is not None:
                self.health.broker_away(reason)
            if self.metrics is not None:
                self.metrics.broker_reachable.set(0)
            return
        self._broker_answers = True
        self._end_offsets.update({tp: end for tp, end in ends.items() if end is not None})
        if self.health is not None:
            self.health.broker_answered()
        if self.metrics is not None:
            self.metrics.broker_reachable.set(1)

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the end of each assigned partition, where the consumer knows both; the
        end is the newest of the fetch's high watermark and the last end offsets the brokers gave,
        so while they are away lag is reported from what was last known."""
        lag = {}
        for tp in self.consumer.assignment():
            ends = [e for e in (self.consumer.highwater(tp), self._end_offsets.get(tp)) if e is not None]
            if not ends:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except Exception:  # unknown until the partition's first fetch; lag is best effort
                continue
            if position is not None:
                lag[(tp.topic, tp.partition)] = max(0, max(ends) - position)
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
            "%.0f readings/s | %d devices | %d partitions | %d anomalies | %d dead letters | lag %d",
            self._status_readings / elapsed,
            len(self.engine.table),
            len(self.partitions.owned),
            s.anomalies,
            s.dead_letters,
            lag,
        )
        self._last_status = now
        self._status_readings = 0


class PartitionsMoved(StreamerError):
    """Partitions of the batch in hand were revoked or lost while it was processed."""


class TransactionStuck(StreamerError):
    """A transaction call that did not return in time (seen after broker restarts)."""


def _bounded(call: Callable[[], object], what: str, timeout_s: float = TRANSACTION_CALL_TIMEOUT_S) -> None:
    """Run ``call`` on a helper thread and wait at most timeout_s for it; raise what it raised."""
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"kafka-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TransactionStuck(f"{what} did not return within {timeout_s:.0f}s")
    if "error" in outcome:
        raise outcome["error"]


def _progress(records: list) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Per partition: the offset after its last message here, and how many messages."""
    next_offsets: dict[TopicPartition, int] = {}
    counts: dict[TopicPartition, int] = {}
    current = None
    for msg in records:
        if current is None or current.topic != msg.topic or current.partition != msg.partition:
            current = TopicPartition(msg.topic, msg.partition)
        next_offsets[current] = msg.offset + 1
        counts[current] = counts.get(current, 0) + 1
    return next_offsets, counts


def _select(predictions: PredictionBatch, mask: np.ndarray) -> PredictionBatch:
    index = np.flatnonzero(mask)
    return PredictionBatch(
        [predictions.device_ids[i] for i in index],
        predictions.ts[index],
        predictions.forecast[index],
        predictions.anomaly_score[index],
        predictions.is_anomaly[index],
        predictions.residual[index],
        predictions.surprise[index],
    )
