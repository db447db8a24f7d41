"""The run loop: Kafka poll -> decode -> step -> produce -> acknowledge -> commit -> checkpoint.

At-least-once (default): a batch's offsets are committed only after every prediction and dead
letter of that batch has been acknowledged by the broker; a crash in between re-delivers the
batch. Pipelined: batch n is produced and left in flight while batch n+1 is polled and decoded;
batch n is then settled (acknowledged, committed, checkpointed) before batch n+1 is stepped, so
commits and checkpoints keep batch order, a failed delivery of batch n lets nothing after it
commit, and the engine's state matches every checkpoint's offset. While the loop is busy the
acknowledged batches' offsets are committed together once per kafka.commit_interval_ms (a
commit is a broker round trip in the loop's path), and at once when a checkpoint is due. With
nothing new to poll the batch in flight is settled, and what is acknowledged is committed once a
poll has waited IDLE_POLL_MS for nothing (or sooner, when the interval or a checkpoint makes it
due); on a revocation, a model switch or stopping, at once. Exactly-once (kafka.exactly_once): the batch's predictions, dead letters and input
offsets are committed in one transaction; an aborted batch's partitions are recovered again
from their checkpoints, since the engine had applied readings whose output never became
visible. Checkpoints follow commits (see partitions.py).

The loop is written against the client seam (streamer.kafka.abstract: Consumer, Producer), so
either client library runs it, and tests drive it with the in-process broker (kafka/memory.py).
The partition manager decides each batch once (a frozen BatchPlan: what is replayed, what is
committed, which partitions are due a checkpoint); the loop carries it through the steps.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

from streamer.checkpoint import CheckpointStore, StoreUnreadable
from streamer.engine import Engine, PredictionBatch, ReadingBatch, StepReport, distinct_lists
from streamer.errors import PipelineError, StartupInterrupted, StreamerError
from streamer.kafka.abstract import (
    BrokerTimeout,
    Consumer,
    GroupMovedOn,
    KafkaClientError,
    Message,
    Producer,
    TopicPartition,
)
from streamer.kafka.clients import OUTSIDE_GROUP_SESSIONS
from streamer.kafka.outage import BrokerOutageLog
from streamer.malloc import retain_freed_memory
from streamer.metrics import Health, Metrics
from streamer.model import file_signature, load_model_file
from streamer.partitions import BatchPlan, CheckpointPolicy, Owned, PartitionManager
from streamer.records import (
    ARROW_CONTENT_TYPE,
    CONTENT_TYPE_HEADER,
    BatchSpan,
    DeadLetter,
    DeadLetterReason,
    DecodedBatch,
    ReadingDecoder,
    SourcePosition,
    encode_arrow_predictions,
    encode_predictions,
)
from streamer.settings import Settings

log = logging.getLogger(__name__)

IDLE_POLL_MS = 200
ARROW_HEADERS = [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)]
LAG_INTERVAL_S = 1.0
BROKER_AWAY_BACKOFF_S = 0.5
# Each LAG_INTERVAL_S the loop asks the brokers for the end offsets of its partitions, waiting at
# most this long: the answer is the lag, no answer makes the process not ready (/readyz).
BROKER_PROBE_TIMEOUT_MS = 1000
COMMIT_RETRY_S = 120.0  # retriable commit errors (broker away) are retried this long
COMMIT_RETRY_INTERVAL_S = 0.5
# A revocation inside the poll settles the batch in flight and commits first: for at most this
# long (or the session timeout, if shorter). A member that waits longer inside its rebalance
# callback holds the whole group's rebalance up, up to max.poll.interval.ms: no member is handed
# a partition meanwhile.
REVOKE_WAIT_S = 10.0
STORE_RETRY_S = 1.0  # recoveries waiting for the checkpoint store or the broker are tried again this often
MODEL_SETTLE_S = 1.0  # a changed model file is read once it has stayed the same this long
# Exactly-once: this many transactions in a row aborted on errors retrying cannot help end the run.
HOPELESS_ABORTS = 3
# A batch's sends between waits for their acknowledgement (_sends): messages of any kind, and bytes
# of batch messages and dead letters, well inside librdkafka's queue (100k messages, 1 GiB).
PRODUCE_CHUNK = 40_000
PRODUCE_CHUNK_BYTES = 8 * 1024 * 1024


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


@dataclass(frozen=True)
class Unsettled:
    """A batch stepped and produced whose sends are not yet known to be acknowledged: its offsets
    (plan.commit) are committed, and its due partitions checkpointed, only once they are, for
    the partitions still owned as they were when it was stepped (``owners``). event_ts: the
    published predictions' event times (latency is measured to the acknowledgement)."""

    plan: BatchPlan
    owners: Mapping[TopicPartition, Owned]  # as each partition was owned when the batch was stepped
    report: StepReport
    published: int
    anomalies: int  # flagged among the published: a replayed reading was counted when first published
    replayed: int
    by_reason: Tally
    event_ts: np.ndarray
    started: float
    messages: int = 0  # input messages, good or dead-lettered, replayed ones left out


class ModelWatcher:
    """Notices when the model file changes (mtime or size), checking every interval_s.

    A file copied in place (truncated, then written) can be seen half-way. A change is reported
    only once the file has stayed as it was seen for a while (MODEL_SETTLE_S, or interval_s if
    shorter: the check after a change comes that much later, not a whole interval later), and
    ``unchanged`` tells whether it changed again while it was read: a copy still in progress
    is read again, not taken for the new version."""

    def __init__(self, path: Path, interval_s: float, signature: tuple[int, ...] | None = None) -> None:
        """``signature``: the file's as the model served was read (ModelBundle.signature), so that
        a file replaced since, while the service started, is noticed; else the file's now."""
        self.path = path
        self.interval_s = interval_s
        self.settle_s = min(interval_s, MODEL_SETTLE_S)
        self._signature = signature if signature is not None else self._stat()  # the file as last reported
        self._seen: tuple[int, ...] | None = None  # a change seen, not reported yet
        self._next_check = time.monotonic() + interval_s

    def _stat(self) -> tuple[int, ...] | None:
        return file_signature(self.path)

    def changed(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        signature = self._stat()
        if signature is not None and signature != self._signature and signature != self._seen:
            self._seen = signature  # look again once it has had time to settle
            self._next_check = now + self.settle_s
            return False
        self._next_check = now + self.interval_s
        if signature is None or signature == self._signature:
            self._seen = None
            return False
        self._signature, self._seen = signature, None
        return True

    def unchanged(self) -> bool:
        """Whether the file is as the last check that reported a change saw it."""
        return self._stat() == self._signature


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        consumer: Consumer,
        producer: Producer,
        metrics: Metrics | None = None,
        health: Health | None = None,
        store: CheckpointStore | None = None,
        producer_factory: Callable[[], Producer] | None = None,
        dead_letter_max_bytes: int | None = None,
    ) -> None:
        """``producer_factory`` makes a replacement for a transactional producer that got stuck
        (exactly-once mode); without it such a producer stops the loop. ``dead_letter_max_bytes``:
        the dead-letter topic's max.message.bytes, where known: dead letters are cut to fit it and
        kafka.max_message_bytes (DeadLetter.kafka_record)."""
        self.settings = settings
        producer_max = settings.kafka.max_message_bytes
        self.dead_letter_max_bytes = min(producer_max, dead_letter_max_bytes or producer_max)
        self.producer_factory = producer_factory
        self.engine = engine
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.health = health
        self.exactly_once = settings.kafka.exactly_once
        self.arrow_output = settings.kafka.batch_output == "arrow"
        self.decoder = ReadingDecoder(engine.config.values_size, settings.state.capacity)
        policy = CheckpointPolicy(settings.checkpoint.interval_s, settings.checkpoint.interval_readings)
        self.partitions = PartitionManager(consumer, engine, store, policy, metrics,
                                           progress=health.beat if health is not None else None)
        self.summary = RunSummary()
        model = settings.model
        served = engine.bundle
        self.model_watcher = (
            ModelWatcher(model.path, model.reload_interval_s,
                         served.signature if served.path is not None and Path(served.path) == Path(model.path) else None)
            if model.path and model.reload_interval_s else None
        )
        self._last_lag = 0.0
        self._end_offsets: dict[TopicPartition, int] = {}  # last known, kept while the broker is away
        self._stop: threading.Event | None = None
        self._broker_answers = True  # whether the last broker probe answered
        # A client's known way of leaving a member outside its group (kafka-python's), or None.
        self.membership = consumer.group_watch(OUTSIDE_GROUP_SESSIONS * settings.kafka.session_timeout_ms / 1000)
        self.outage = BrokerOutageLog()
        self._last_status = time.monotonic()
        self._status_readings = 0
        self._unsettled: Unsettled | None = None  # at-least-once: the batch produced, not yet committed
        # At-least-once: offsets of acknowledged batches not committed yet (kafka.commit_interval_ms),
        # the plan of the newest of them and the checkpoints due among them.
        self._to_commit: dict[TopicPartition, tuple[int, Owned, str]] = {}  # offset, owner, metadata
        self._to_commit_plan: BatchPlan | None = None
        self._last_commit = time.monotonic()
        self._commit_refused = False  # the last commit was refused: the next waits an interval
        self._switch_waits = False  # a changed model file waits for partitions to recover (said once)
        self._hopeless_aborts = 0  # transactions aborted in a row on errors retrying cannot help
        self._loop_thread: threading.Thread | None = None
        self._commits_heard = False  # whether a commit went through since the last lag check
        self._settling = False  # a revocation inside _settle's own flush or commit must not recurse
        self._polling = False  # inside consumer.poll: where a revocation may settle and commit
        self._wait_until: float | None = None  # a revocation's bound on waiting for the broker (monotonic)
        self._abandoned_commit: _Call | None = None  # a commit a revocation gave up waiting for
        self._store_unreadable_since: float | None = None  # recoveries waiting for the checkpoint store
        self._group_moving_said = False  # recoveries waiting on a rebalance said so
        self._store_retry_at = 0.0
        if metrics is not None:
            metrics.watch_table(lambda: len(engine.table), engine.table.capacity, engine.model_version)

    def subscribe(self) -> None:
        """Join the group; from here on this thread is the loop's."""
        self._loop_thread = threading.current_thread()
        hooks = self.partitions.hooks()
        self.consumer.subscribe([self.settings.kafka.input_topic], hooks._replace(revoked=self._revoking(hooks.revoked)))

    def _revoking(self, revoked: Callable[[list[TopicPartition]], None]) -> Callable[[list[TopicPartition]], None]:
        """Revocation settles the batch in flight and commits what waits first, while the
        partitions are still ours, so that their checkpoints are at a committed offset. Only
        inside the loop's own poll (where the clients run a rebalance); on a client's thread the
        commit is refused as before, and inside consumer.close (which revokes too) a commit can
        hang: librdkafka was seen to hold it until the callback it is called from returns."""

        def hook(partitions: list[TopicPartition]) -> None:
            if self._polling and threading.current_thread() is self._loop_thread and not self._settling:
                self._wait_until = time.monotonic() + min(REVOKE_WAIT_S, self.settings.kafka.session_timeout_ms / 1000)
                try:
                    self._settle(commit=True)
                finally:
                    self._wait_until = None
            revoked(partitions)

        return hook

    def run(self, stop: threading.Event) -> RunSummary:
        """Process micro-batches until ``stop`` is set or run.duration_s has passed; then
        checkpoint every owned partition (everything applied is committed by then)."""
        self._stop = stop
        self.subscribe()
        self.prepare_process()
        started = time.monotonic()
        duration = self.settings.run.duration_s
        try:
            with self.outage.installed():
                while not stop.is_set():
                    if duration is not None and time.monotonic() - started >= duration:
                        break
                    self.run_once(stop)
                    self._maybe_status()
                if self.health is not None:
                    self.health.finishing()  # a stop says so itself; run.duration_s does not
                self._settle(commit=True)
            self.partitions.checkpoint_all()
        except Exception as exc:
            if self.health is not None:
                self.health.fail(f"run loop stopped: {exc}")
            raise
        finally:
            self.partitions.close()  # the checkpoint writer: after checkpoint_all it has nothing in hand
            self.summary.seconds = time.monotonic() - started
            gc.unfreeze()  # collectable again at exit (nanobind, pyarrow's binding, counts leaks then)
        return self.summary

    def prepare_process(self) -> None:
        """Set the process up for the loop, once before its first batch (run does; a bench that
        drives run_once calls it too). The malloc limits stay for the rest of the process."""
        # What exists now (model, engine, clients, imported modules) lives as long as the loop:
        # out of the collector's sight, the full collections that tens of thousands of messages a
        # second set off stay cheap (they scanned it all: a third of the poll's time).
        gc.freeze()
        # The memory a step frees stays for the next step's tensors (streamer.malloc): given back
        # to the OS, a burst faulted it in again, thousands of page faults in a step.
        retain_freed_memory(self.settings.run.malloc_keep_mb)

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Poll one micro-batch and process it; returns the messages handled. At-least-once, the
        batch before it is settled on the way; when nothing came, it is settled, and what is
        acknowledged is committed once a poll with nothing in flight has waited for nothing."""
        # With nothing in flight the poll waits for readings (IDLE_POLL_MS): none coming in that
        # time is a quiet topic, and whatever was acknowledged is committed without waiting for
        # the interval. A batch in flight makes the poll return at once: a gap between bursts.
        quiet = self._unsettled is None
        records = self._poll_batch(stop)
        if not records:
            self._settle(commit=quiet)
        if time.monotonic() >= self._store_retry_at:
            try:
                recovered = self.partitions.recover_pending()
                self._store_readable_again(recovered)
            except KafkaClientError as exc:
                if not exc.retriable:
                    raise
                self._store_retry_at = time.monotonic() + STORE_RETRY_S  # not every turn: each may wait a call out
                if isinstance(exc.cause, GroupMovedOn):  # the coordinator answered: no outage
                    self._group_moving(exc)
                else:
                    self._commits_heard = False
                    self.outage.away(f"recovering partitions must wait ({exc})")  # they stay paused
            except StoreUnreadable as exc:
                self._store_unreadable(exc)  # they stay paused
        if self.health is not None:
            self.health.beat()
        if self.metrics is not None:
            self.metrics.on_poll()
        self._watch_membership()
        self.partitions.pump()  # the checkpoint writer's next partition, if one is due
        if records:
            self._process(records)
        self._maybe_reload_model()
        self._maybe_lag()
        return len(records)

    def _store_unreadable(self, exc: StoreUnreadable) -> None:
        """Recoveries wait for the checkpoint store, tried again every STORE_RETRY_S while the
        other partitions go on: one line when that starts."""
        now = time.monotonic()
        self._store_retry_at = now + STORE_RETRY_S
        if self._store_unreadable_since is None:
            self._store_unreadable_since = now
            log.warning("recovering partitions must wait, the checkpoint store cannot be read: %s", exc)

    def _store_readable_again(self, recovered: int) -> None:
        """After a recovery turn that raised nothing: ``recovered`` partitions of it."""
        if self._store_unreadable_since is not None and recovered:
            left = len(self.partitions.pending)
            log.info("checkpoint store read again after %.1fs: %d partition%s recovered%s",
                     time.monotonic() - self._store_unreadable_since, recovered, "" if recovered == 1 else "s",
                     f", {left} at the next turns" if left else "")
        self._store_unreadable_since = None
        self._group_moving_said = False

    def _group_moving(self, exc: KafkaClientError) -> None:
        """Recoveries wait while the coordinator answers that the group is rebalancing: one INFO
        line until a turn goes through (the brokers answer; this is no outage)."""
        if not self._group_moving_said:
            self._group_moving_said = True
            log.info("recovering partitions wait for the group's rebalance (%s)", exc)

    def _poll_batch(self, stop: threading.Event | None) -> list[Message]:
        """Up to batch.max_records messages of owned, recovered partitions, waiting at most
        batch.max_wait_ms after the first; per partition in offset order."""
        max_records = self.settings.batch.max_records
        max_wait = self.settings.batch.max_wait_ms / 1000
        polled: list[Message] = []
        deadline: float | None = None
        while len(polled) < max_records:
            if deadline is None:
                # A batch in flight is settled at once when nothing new comes.
                timeout_s = IDLE_POLL_MS / 1000 if self._unsettled is None else 0.0
            else:
                timeout_s = max(0.0, deadline - time.monotonic())
            polled.extend(self._poll(timeout_s, max_records - len(polled)))
            if not polled:
                break  # idle: let the caller check stop and deadlines
            if self._unsettled is not None:
                self._settle(wait=False)  # acknowledged meanwhile: commit now, not after the batch fills
            if deadline is None:
                deadline = time.monotonic() + max_wait
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                break
        # A partition revoked (or assigned and not yet recovered) while polling: its messages
        # are someone else's, or will be read again from its recovered position.
        foreign = {tp for tp in {(m.topic, m.partition) for m in polled} if not self.partitions.accepts(TopicPartition(*tp))}
        return [m for m in polled if (m.topic, m.partition) not in foreign] if foreign else polled

    def _poll(self, timeout_s: float, max_records: int) -> list[Message]:
        """consumer.poll, riding out a broker that is away (kafka-python raises then, at times,
        instead of retrying by itself)."""
        self._polling = True
        try:
            return self.consumer.poll(timeout_s, max_records)
        except KafkaClientError as exc:
            if not exc.retriable:
                raise
            self._commits_heard = False
            self.outage.away(f"poll failed ({exc})")
            time.sleep(BROKER_AWAY_BACKOFF_S)
            return []
        finally:
            self._polling = False

    def _process(self, records: list[Message]) -> None:
        """The commit order, step by step. At-least-once, the batch leaves this method produced
        and unacknowledged (``_unsettled``): the next run_once settles it after polling and
        decoding the next batch, before stepping it. Exactly-once, its transaction ends here."""
        started = time.perf_counter()
        # The group membership this batch is committed under, taken before anything else: if the
        # consumer loses its partitions meanwhile (kafka-python's IO thread), the broker refuses
        # the transaction's offsets instead of accepting them under a newer membership.
        group = self.consumer.group_metadata() if self.exactly_once else None
        # 1. Decode and validate; bad messages become dead letters, never exceptions.
        decoded = self.decoder.decode(records)
        next_offsets = _next_offsets(records)
        # 2. The batch before this one: acknowledged, committed, checkpointed (at-least-once).
        if not self._settle():
            return  # stopping with the broker away: neither batch is committed, both are re-delivered
        # 3. Plan (what is replayed, what is committed, what is due a checkpoint) and step every
        #    device with a new reading, in offset order per device.
        with self.partitions.lock:
            # At-least-once, a partition revoked or lost on the client's thread since the poll
            # (the lock holds that off from here on): its readings are its next owner's. Stepped
            # from the rows it no longer has (dropped with it), their predictions had gone out
            # wrong. (Exactly-once, such a batch is aborted whole: _publish_transaction.)
            gone = set() if self.exactly_once else {tp for tp in next_offsets if not self.partitions.accepts(tp)}
            if gone:
                records = [m for m in records if TopicPartition(m.topic, m.partition) not in gone]
                if not records:
                    return  # every partition of the batch gone: nothing to step, count or publish
                decoded = self.decoder.decode(records)
                next_offsets = _next_offsets(records)
            plan = self.partitions.plan(next_offsets, _readings_per_partition(decoded, next_offsets))
            try:
                predictions, report = self._step(decoded.readings)
            except BaseException:
                self.partitions.discard(plan.next_offsets)  # their rows may hold part of the batch
                raise
            self.partitions.applied(plan)
            self.partitions.forget_unowned(plan.next_offsets)
            owners = MappingProxyType({tp: self.partitions.owned[tp] for tp in plan.commit if tp in self.partitions.owned})
        # A forecast, score or residual that is NaN or infinite cannot be published (JSON has neither);
        # the engine has already reset the state of a device whose step gave one (Engine._reset_not_finite).
        not_finite = _not_finite(predictions)
        # Readings below a recovering partition's committed offset were published before.
        # Asked once per message: a batch message's rows share its answer.
        replay = np.fromiter(
            (plan.replayed(p.topic, p.partition, p.offset) for p in decoded.sources), dtype=bool, count=len(decoded.sources),
        )[decoded.source_of] if plan.replay_until else np.zeros(len(decoded.source_of), dtype=bool)
        letters = [d for d in decoded.dead_letters if not plan.replayed(d.source.topic, d.source.partition, d.source.offset)]
        refused = not_finite
        if not_finite.any():
            refused = _whole_messages(not_finite & ~replay, decoded.batch_spans)
            letters += _not_finite_letters(records, decoded, predictions, refused, not_finite)
        hidden = replay | refused
        published = _select(predictions, ~hidden) if hidden.any() else predictions
        spans = [] if not self.arrow_output else [
            span for span, hide in _published_spans(decoded.batch_spans, hidden)
            if not hide and not plan.replayed(span.position.topic, span.position.partition, span.position.offset)]
        messages = len(records) if not plan.replay_until else sum(
            1 for m in records if not plan.replayed(m.topic, m.partition, m.offset))
        batch = Unsettled(plan, owners, report, len(published), int(published.is_anomaly.sum()), int(replay.sum()),
                          Tally(letter.reason.value for letter in letters), published.ts, started, messages)
        # 4-6. Produce predictions and dead letters; once the broker has them, commit offsets,
        #    then checkpoint the partitions that are due.
        if self.exactly_once:
            if not self._publish_transaction(published, spans, letters, plan, group):
                return  # nothing of this batch became visible
            self.partitions.committed(plan)
            self._commits_heard = self._commits_heard or bool(plan.commit)
            self._done(batch, time.time())
        elif self._sends(published, spans, letters):
            self._unsettled = batch  # settled by the next batch, an idle poll, a revocation or stop
        else:
            log.warning("stopping with the broker away: the batch in hand is sent in part and stays uncommitted; it"
                        " will be re-delivered")
            # Its partitions are read again from their committed offsets if the loop goes on (a
            # caller of run_once past its stop), not left applied past a batch never committed.
            self.partitions.reset(plan.next_offsets)

    def _settle(self, wait: bool = True, commit: bool = False) -> bool:
        """The batch in flight (at-least-once), once every send of it is acknowledged: check the
        deliveries, account for it, and commit its offsets with those of the batches before it
        that wait for the commit interval, checkpointing the partitions that are due. ``wait``
        False: only if the acknowledgements are in already. ``commit``: commit whatever waits,
        whatever the interval (idle, revocation, stop). False when the batch is still in flight
        (not waiting, or stopping with the broker away); True when none is left."""
        batch = self._unsettled
        if self._settling:
            return batch is None
        self._settling = True
        try:
            acked_at = None
            if batch is not None:
                acked_at = self._settle_batch(batch, wait)
                if acked_at is None:
                    return False
            if self._to_commit and (commit or self._commit_due()):
                self._commit_waiting_offsets()
            if batch is not None:
                # Accounted for once settled, with its commit made when one was due: the readings
                # count moves on only when the loop does (after an outage the commit waits for the
                # group to take the member back).
                self._done(batch, acked_at)
            return True
        finally:
            self._settling = False

    def _settle_batch(self, batch: Unsettled, wait: bool) -> float | None:
        """The batch's sends acknowledged and checked, its offsets put with those waiting to be
        committed; when they were acknowledged (epoch s), or None while they are not."""
        if wait:
            if not self._flush():
                if self._wait_until is None:  # else a revocation gave up waiting (said), the loop goes on
                    log.warning("stopping with the broker away: the batch in flight stays uncommitted and will be"
                                " re-delivered")
                return None
        elif not self.producer.flush(0):
            return None
        acked_at = time.time()
        self._unsettled = None
        failed = self.producer.delivery_failures()
        if failed:
            raise PipelineError(
                f"{len(failed)} of {batch.published + sum(batch.by_reason.values())} sends of this batch failed"
                f" (first: {failed[0]!r}); offsets not committed, the batch will be re-delivered"
            )
        plan = batch.plan
        # Published either way; the offsets are committed now or with the next batches'.
        for tp, offset in plan.commit.items():
            owned = self.partitions.owned.get(tp)
            # Else it moved on: its new owner (this process too, when it was recovered since)
            # re-reads from the group's committed offset, which this older one must not move back.
            if owned is not None and owned is batch.owners.get(tp):
                waiting = self._to_commit.get(tp)
                # One waiting of an owner before this one (the partition left on the client's
                # thread and came back while commits were refused) is of that owner's history: its
                # offset, past what this owner has applied, is not this one's to commit.
                if waiting is None or waiting[1] is not owned or offset >= waiting[0]:
                    self._to_commit[tp] = (offset, owned, plan.commit_metadata.get(tp, ""))
        if self._to_commit:
            due = plan.checkpoint_due | (self._to_commit_plan.checkpoint_due if self._to_commit_plan else frozenset())
            self._to_commit_plan = replace(plan, checkpoint_due=due)
        return acked_at

    def _commit_due(self) -> bool:
        """Whether the offsets waiting are committed now: the interval has passed, or a checkpoint
        is due (it is taken at a committed offset)."""
        assert self._to_commit_plan is not None
        interval = self.settings.kafka.commit_interval_ms / 1000
        if self._commit_refused:  # the group is rebalancing: asked again once an interval has passed
            return time.monotonic() - self._last_commit >= interval
        return bool(self._to_commit_plan.checkpoint_due) or time.monotonic() - self._last_commit >= interval

    def _commit_waiting_offsets(self) -> None:
        """Commit the offsets of every acknowledged batch not committed yet (of partitions this
        process still owns), then checkpoint the partitions that are due. When the group refuses
        them (it is rebalancing: a cooperative member keeps its partitions through it) or the loop
        stops first, they wait for the next commit, of the partitions still owned as they were
        then; those the group moved on are re-delivered to their next owner (at-least-once)."""
        # Only partitions owned as they were then: one that left and came back starts afresh from
        # the group's committed offset, which an older offset of ours must not move back.
        owned = self.partitions.owned
        waiting = {tp: (o, was, m) for tp, (o, was, m) in self._to_commit.items() if owned.get(tp) is was}
        offsets = {tp: o for tp, (o, _, _) in waiting.items()}
        metadata = {tp: m for tp, (_, _, m) in waiting.items()}
        plan = self._to_commit_plan
        assert plan is not None
        self._to_commit, self._to_commit_plan = {}, None
        self._last_commit = time.monotonic()
        if not offsets:
            return
        committed = self._commit(offsets, metadata)
        self._commit_refused = not committed
        if committed:
            self.partitions.committed(replace(plan, commit=offsets))
            self._commits_heard = True
        else:  # tried again at the next commit: dropped, a quiet partition would never be committed
            self._to_commit, self._to_commit_plan = waiting, plan

    def _done(self, batch: "Unsettled", acked_at: float) -> None:
        """Account for a batch whose output the broker acknowledged at ``acked_at`` (epoch s)."""
        self.summary.replayed += batch.replayed
        if batch.replayed and self.metrics is not None:
            self.metrics.on_replayed(batch.replayed)
        self._account(batch.report, batch.published, batch.anomalies, batch.by_reason, acked_at - batch.event_ts,
                      time.perf_counter() - batch.started, batch.messages)

    def _step(self, readings: ReadingBatch) -> tuple[PredictionBatch, StepReport]:
        """engine.step over the batch, in chunks of at most the table's capacity of distinct
        devices (a batch message can carry more devices than the table holds), in order."""
        chunks = _chunks(readings, self.engine.table.capacity)
        if len(chunks) == 1:
            return self.engine.step(readings)
        stepped = [self.engine.step(chunk) for chunk in chunks]
        return _concat([p for p, _ in stepped]), _total([r for _, r in stepped])

    def _sends(self, predictions: PredictionBatch, spans: list[BatchSpan], letters: list[DeadLetter]) -> bool:
        """Queue the batch's predictions (those in ``spans``, rows of batch messages, as batch
        messages; the rest as JSON) and dead letters. Past PRODUCE_CHUNK of them (or
        PRODUCE_CHUNK_BYTES of batch messages and dead letters), the loop waits for their
        acknowledgement before it queues more (_flush: live, and answering stop). Batch messages
        answered in JSON, a prediction a row, had filled librdkafka's queue: with the brokers away
        its produce then waited for room up to message.timeout.ms (5 minutes), the loop neither
        beating nor stopping (kafka-python's queue has no bound: it grew). False when stopped part
        way: the batch is not committed (its partitions' next owner reads it again)."""
        kafka = self.settings.kafka
        produce = self.producer.produce
        version = self.engine.model_version
        rows = predictions
        if spans:
            json_rows = np.ones(len(predictions), dtype=bool)
            for span in spans:
                json_rows[span.start : span.stop] = False
            rows = _select(predictions, json_rows) if json_rows.any() else None
        sent = queued = 0  # since the last wait: messages, and bytes of batch messages and dead letters
        if rows is not None:
            for key, value in encode_predictions(rows, version):
                produce(kafka.output_topic, key, value)
                sent += 1
                if sent == PRODUCE_CHUNK:
                    if not self._flush():
                        return False
                    sent = 0
        # Batch messages after the JSON ones (each key's messages keep their order either way),
        # encoded as they go out; then the dead letters.
        records = itertools.chain(
            ((kafka.output_topic, span.key, value, ARROW_HEADERS) for span in spans
             for value in encode_arrow_predictions(_rows(predictions, span.start, span.stop), version, span.ids)),
            ((kafka.dead_letter_topic, *letter.kafka_record(self.dead_letter_max_bytes)) for letter in letters),
        )
        for topic, key, value, headers in records:
            produce(topic, key, value, headers)
            sent, queued = sent + 1, queued + len(value or b"")
            if sent >= PRODUCE_CHUNK or queued >= PRODUCE_CHUNK_BYTES:
                if not self._flush():
                    return False
                sent = queued = 0
        return True

    def _flush(self) -> bool:
        """producer.flush(), a second at a time: while the broker is away the loop stays live, probes
        the broker (readiness, lag) and notices ``stop`` (False then). The producer's
        delivery timeout still fails the sends of a broker that stays away."""
        while not self.producer.flush(BROKER_PROBE_TIMEOUT_MS / 1000):
            if self._stop is not None and self._stop.is_set():
                return False
            if self._waited_enough("predictions wait for the broker's acknowledgement"):
                return False
            self._still_waiting("predictions wait for the broker's acknowledgement")
        return True

    def _waited_enough(self, what: str) -> bool:
        """Whether a revocation's wait for the broker has run out (see REVOKE_WAIT_S): then what
        it waited for is left for later, as when stopping (at-least-once: the partitions' next
        owner re-reads from the last commit)."""
        if self._wait_until is None or time.monotonic() < self._wait_until:
            return False
        log.warning("a revocation gave up waiting: %s; the rebalance goes on without it", what)
        return True

    def _commit(self, offsets: dict[TopicPartition, int], metadata: dict[TopicPartition, str]) -> bool:
        """Commit, retrying while the broker is away; False if the group took the partitions
        meanwhile (their new owner re-reads from the last commit: at-least-once holds)."""
        deadline = time.monotonic() + COMMIT_RETRY_S
        while True:
            try:
                if not self._commit_waiting(offsets, metadata):
                    if self._wait_until is None:  # else a revocation gave up waiting (said)
                        log.warning("stopping with the broker away: this batch's offsets stay uncommitted (no answer)")
                    return False
                return True
            except GroupMovedOn as exc:
                log.warning("commit refused, the group is rebalancing or has rebalanced: %s", exc)
                return False
            except KafkaClientError as exc:
                if not exc.retriable or time.monotonic() > deadline:
                    raise PipelineError(f"cannot commit offsets: {exc}") from exc
                if self._stop is not None and self._stop.is_set():
                    # Stopping: the batch stays uncommitted and is re-delivered (at-least-once).
                    log.warning("stopping with the broker away: this batch's offsets stay uncommitted (%s)", exc)
                    return False
                if self._waited_enough(f"the commit failed ({exc})"):
                    return False
                self.outage.away(f"commit failed, retrying ({exc})")
                time.sleep(COMMIT_RETRY_INTERVAL_S)
                self._still_waiting(f"offsets cannot be committed ({type(exc.cause or exc).__name__})")

    def _commit_waiting(self, offsets: dict[TopicPartition, int], metadata: dict[TopicPartition, str]) -> bool:
        """consumer.commit on a helper thread, waited for a second at a time: both clients' commit
        can block for ever once the group coordinator is gone (after the batch's acknowledgement,
        before its commit). Meanwhile the loop is live and reports the broker away (without
        probing: the consumer is busy); False when stopped first (the commit is left behind,
        the batch stays uncommitted as far as the loop knows: at-least-once holds either way)."""
        if self._abandoned_commit is not None:
            if not self._abandoned_commit.done(0.0):
                # A commit a revocation gave up on is still asked: no other beside it (a late
                # answer to it would move the group's offsets back past this one's); these wait.
                raise GroupMovedOn("a commit given up on at a revocation is still unanswered")
            self._abandoned_commit = None
        worker = _Call(lambda: self.consumer.commit(offsets, metadata), "commit")
        if self._wait_until is not None and not self.consumer.commits_answered_inside_rebalance:
            # Inside a revocation the client answers it only once the hook returns: waited for,
            # every member's join had held this loop and the group's rebalance for REVOKE_WAIT_S
            # and reported the brokers away. Left to land then, as one given up on is.
            self._abandoned_commit = worker
            return False
        while not worker.done(BROKER_PROBE_TIMEOUT_MS / 1000):
            if self._stop is not None and self._stop.is_set():
                return False
            if self._waited_enough("offsets wait for the group coordinator's answer"):
                self._abandoned_commit = worker
                return False
            self._still_waiting("offsets wait for the group coordinator's answer", probe=False)
        worker.result()
        return True

    def _publish_transaction(
        self, predictions: PredictionBatch, spans: list[BatchSpan], letters: list[DeadLetter], plan: BatchPlan,
        group: object,
    ) -> bool:
        """One transaction: outputs and input offsets. False when it was aborted; then the
        batch's partitions are recovered again (the engine applied what nobody will see)."""
        producer = self.producer
        try:
            # Outputs only ever travel with their partition's offsets: those are what the broker
            # fences. A partition that left this process mid-batch has none, so the batch aborts.
            unfenced = {tp for tp in plan.next_offsets if not self.partitions.accepts(tp)}
            if unfenced:
                raise PartitionsMoved(f"partitions left this process during the batch: {sorted(unfenced)}")
            producer.begin_transaction()
            if not self._sends(predictions, spans, letters):
                raise TransactionStuck("stopping with the broker away: the transaction's sends are not acknowledged")
            if plan.commit:
                offsets, metadata = dict(plan.commit), dict(plan.commit_metadata)
                _bounded(lambda: producer.send_offsets_to_transaction(offsets, group, metadata),
                         "send_offsets_to_transaction",
                         producer.transaction_stuck_after_s)
            # The sends' outcomes before the commit: a send the broker refused fails the commit in
            # either client, but kafka-python's commit then never returns (the abort waited for
            # TransactionStuck). A commit flushes anyway: this one waits no longer.
            if not producer.flush(producer.transaction_stuck_after_s):
                raise TransactionStuck(f"the transaction's sends were not acknowledged within"
                                       f" {producer.transaction_stuck_after_s:.0f}s")
            failed = producer.delivery_failures()
            if failed:
                raise KafkaClientError(f"{len(failed)} sends of the transaction failed (first: {failed[0]!r})",
                                       retriable=all(getattr(f, "retriable", False) for f in failed))
            _bounded(producer.commit_transaction, "commit_transaction", producer.transaction_stuck_after_s)
            self._hopeless_aborts = 0
            return True
        except PartitionsMoved as exc:
            log.warning("batch dropped: %s", exc)
            self.partitions.reset(plan.next_offsets)
            self.summary.aborted_batches += 1
            if self.metrics is not None:
                self.metrics.on_transaction_aborted()
            return False
        except (KafkaClientError, TransactionStuck) as exc:
            log.warning("transaction aborted (%s): recovering %d partitions", exc, len(plan.next_offsets))
            if not isinstance(exc, TransactionStuck):
                try:
                    _bounded(producer.abort_transaction, "abort_transaction", producer.transaction_stuck_after_s)
                except (KafkaClientError, TransactionStuck) as abort_exc:
                    log.warning("abort failed too: %s", abort_exc)
            # The batch's rows first: whatever the producer's replacement meets, they are not kept.
            self.partitions.reset(plan.next_offsets)
            self.summary.aborted_batches += 1
            if self.metrics is not None:
                self.metrics.on_transaction_aborted()
            # A failure retrying cannot help (a send the output topic refuses, say) had been
            # aborted, recovered and sent again for ever, the loop live and nothing committed, where
            # at-least-once stops. Once the batch is recovered (left for the next owner), so does this.
            hopeless = (isinstance(exc, KafkaClientError) and not exc.retriable
                        and not isinstance(exc, (GroupMovedOn, BrokerTimeout)))
            self._hopeless_aborts = self._hopeless_aborts + 1 if hopeless else 0
            if self._hopeless_aborts >= HOPELESS_ABORTS:
                raise PipelineError(f"{self._hopeless_aborts} transactions in a row aborted on an error retrying cannot"
                                    f" help: {exc}") from exc
            # Always start over with a new producer epoch: kafka-python 3.0 was seen to commit an
            # aborted batch's offsets later on (its offsets request retried into the next
            # transaction), which loses that batch. The successor fences every request of this one.
            self._replace_producer(exc)
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
            self.producer.close(0)
        except Exception:  # a broken producer may fail to close; its successor fences it anyway
            log.debug("closing the old producer failed", exc_info=True)
        try:
            self.producer = self.producer_factory()
        except StartupInterrupted:  # stop set while it waited for the brokers: the loop ends, as stopped
            log.info("stopped while waiting for a new transactional producer")

    def _account(
        self, report: StepReport, published: int, anomalies: int, by_reason: Tally, latencies: np.ndarray,
        batch_seconds: float, messages: int = 0,
    ) -> None:
        s = self.summary
        s.batches += 1
        s.readings += report.readings
        s.predictions += published
        s.anomalies += anomalies
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
            anomalies=anomalies,
            new_devices=report.new_devices,
            evicted_ttl=report.evicted_idle,
            evicted_capacity=report.evicted_capacity,
            reset_not_finite=report.reset_not_finite,
            step_seconds=report.step_seconds,
            batch_seconds=batch_seconds,
            latencies=latencies,
            messages=messages,
        )
        if by_reason:
            self.metrics.on_dead_letters(by_reason)

    def _maybe_reload_model(self) -> None:
        watcher = self.model_watcher
        # Not while partitions wait for recovery (an aborted transaction's, a rebalance's): the
        # switch checkpoints the partitions owned, and one recovered after it from a checkpoint
        # of the model before would refuse that one and start its devices from zero. Nor while a
        # partition replays: the readings it replays were published under the model before, and
        # the rest of the replay had run under the new one, every later prediction of the
        # partition then depending on whether a recovery had happened.
        if watcher is None:
            return
        waiting = len(self.partitions.pending) + self.partitions.replaying()
        if waiting:
            if not self._switch_waits and not watcher.unchanged():
                self._switch_waits = True
                log.info("model file %s changed: the switch waits until %d partitions are recovered and replayed",
                         watcher.path, waiting)
            return
        self._switch_waits = False
        if not watcher.changed():
            return
        path = watcher.path
        # The switch checkpoints every partition at its committed offset: settle and commit first.
        self._settle(commit=True)
        try:
            bundle = load_model_file(path)
            with self.partitions.lock:
                devices = len(self.engine.table)
                reset = self.engine.swap_model(bundle)
                self.partitions.model_switched()  # so that no replay after a crash crosses the switch
        except StreamerError as exc:
            if not watcher.unchanged():
                log.info("model file %s changed again while it was read; reading it at the next check: %s", path, exc)
                return
            log.error("model file changed but cannot be used, still serving %s: %s", self.engine.model_version, exc)
            if self.metrics is not None:
                self.metrics.on_model_reload("failed")
            return
        if reset:
            self.decoder = ReadingDecoder(bundle.config.values_size, self.settings.state.capacity)
            log.warning(
                "model %s from %s has a new shape or normalisation (%s): state table reset, %d devices start"
                " from zeros", bundle.version, path, bundle.config.to_dict(), devices,
            )
        else:
            log.info("now serving model %s from %s", bundle.version, path)
        if self.metrics is not None:
            self.metrics.on_model_reload("reset" if reset else "loaded", bundle.version)

    def _watch_membership(self) -> None:
        """A consumer stuck outside its group (kafka-python 3.0.12, see MembershipWatch) is made
        to rejoin, and liveness fails while it stays out."""
        if self.membership is None:
            return
        if self.membership.check(self._broker_answers) and self.metrics is not None:
            self.metrics.group_rejoins.inc()
        if self.health is not None:
            self.health.outside_group(self.membership.outside)

    def _still_waiting(self, why: str, probe: bool = True) -> None:
        """The loop waits on the broker inside a batch: it is live, readiness follows the probe
        (``probe`` False: not ready, no probe while a helper thread uses the consumer)."""
        self._commits_heard = False  # what went through before this wait says nothing of now
        self._broker_away(why)
        if self.health is not None:
            self.health.beat()
        if probe:
            self._maybe_lag()

    def _maybe_lag(self) -> None:
        if time.monotonic() - self._last_lag < LAG_INTERVAL_S:
            return
        self._last_lag = time.monotonic()
        if self._commits_heard:
            # A commit went through since the last look: the brokers answer, and the fetches tell
            # the partitions' ends (highwater). An end-offsets request would wait behind the
            # fetches (up to fetch.wait.max.ms a partition), stalling the loop.
            self._commits_heard = False
            self._broker_answered()
        else:
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
            ends = self.consumer.end_offsets(self._probe_partitions(), BROKER_PROBE_TIMEOUT_MS / 1000)
        except KafkaClientError as exc:
            self._broker_away(f"no answer to an end-offsets request within {BROKER_PROBE_TIMEOUT_MS} ms"
                              f" ({type(exc.cause or exc).__name__})")
            return
        self._end_offsets.update(ends)
        self._broker_answered()

    def waiting_for_broker(self, why: str) -> None:
        """The loop waits for a broker outside its poll (a new transactional producer): live,
        not ready, the broker counted away (the loop's next probe tells when it answers)."""
        if self.health is not None:
            self.health.beat()
        self._broker_away(why)

    def _broker_away(self, why: str) -> None:
        self._broker_answers = False
        self.outage.away(why)
        if self.health is not None:
            self.health.broker_away(why)
        if self.metrics is not None:
            self.metrics.broker_reachable.set(0)

    def _broker_answered(self) -> None:
        self._broker_answers = True
        self.outage.back()
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
                position = self.consumer.position(tp, 0)
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
        status = {
            "readings_per_s": round(self._status_readings / elapsed, 1),
            "devices": len(self.engine.table),
            "partitions": len(self.partitions.owned),
            "anomalies": self.summary.anomalies,
            "dead_letters": self.summary.dead_letters,
            "lag": sum(self.lag().values()),
        }
        log.info(
            "%.0f readings/s | %d devices | %d partitions | %d anomalies | %d dead letters | lag %d",
            *status.values(),
            extra=status,  # fields of their own in JSON logs
        )
        self._last_status = now
        self._status_readings = 0


class PartitionsMoved(StreamerError):
    """Partitions of the batch in hand were revoked or lost while it was processed."""


class TransactionStuck(StreamerError):
    """A transaction call that did not return in time (seen after broker restarts)."""


class _Call:
    """``call`` running on a daemon helper thread (a client call that may not return)."""

    def __init__(self, call: Callable[[], object], what: str) -> None:
        self._call = call
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name=f"kafka-{what}", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        try:
            self._call()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def done(self, wait_s: float) -> bool:
        """Whether it has returned, waiting at most ``wait_s``."""
        self._worker.join(wait_s)
        return not self._worker.is_alive()

    def result(self) -> None:
        """Raise what the call raised (call after done() was True)."""
        if self._error is not None:
            raise self._error


def _bounded(call: Callable[[], object], what: str, timeout_s: float) -> None:
    """Run ``call`` on a helper thread and wait at most timeout_s for it; raise what it raised."""
    worker = _Call(call, what)
    if not worker.done(timeout_s):
        raise TransactionStuck(f"{what} did not return within {timeout_s:.0f}s")
    worker.result()


def _next_offsets(records: list[Message]) -> dict[TopicPartition, int]:
    """Per partition: the offset after its last message here."""
    next_offsets: dict[TopicPartition, int] = {}
    current = None
    for msg in records:
        if current is None or current.topic != msg.topic or current.partition != msg.partition:
            current = TopicPartition(msg.topic, msg.partition)
        next_offsets[current] = msg.offset + 1
    return next_offsets


def _readings_per_partition(decoded: DecodedBatch, next_offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Per partition of the batch, its decoded readings (a batch message counts its rows; a dead
    letter counts none): what checkpoint.interval_readings counts."""
    counts = dict.fromkeys(next_offsets, 0)
    partitions = decoded.readings.partitions
    if partitions is None or not len(partitions):
        return counts
    tally = np.bincount(partitions)  # one input topic: partitions by number
    for tp in counts:
        counts[tp] = int(tally[tp.partition]) if tp.partition < len(tally) else 0
    return counts


def _chunks(readings: ReadingBatch, capacity: int) -> list[ReadingBatch]:
    """``readings`` cut in order into runs of at most ``capacity`` distinct devices each."""
    ids = readings.device_ids
    if len(ids) <= capacity:
        return [readings]
    if readings.id_lists is not None:  # at most the distinct lists' ids: no set of every reading's
        if sum(len(listed) for listed in distinct_lists(readings.id_lists)) <= capacity:
            return [readings]
    if len(set(ids)) <= capacity:  # a set: 2.4x a dict over 1.9M ids
        return [readings]
    cuts, seen = [0], set()
    for i, device in enumerate(ids):
        if device not in seen:
            if len(seen) == capacity:
                cuts.append(i)
                seen = set()
            seen.add(device)
    cuts.append(len(ids))
    parts = readings.partitions
    return [
        ReadingBatch(ids[a:b], readings.ts[a:b], readings.values[a:b], None if parts is None else parts[a:b])
        for a, b in zip(cuts, cuts[1:])
    ]


def _concat(batches: list[PredictionBatch]) -> PredictionBatch:
    """The predictions of consecutive chunks as one batch, in order."""
    columns = {}
    for f in fields(PredictionBatch):
        parts = [getattr(b, f.name) for b in batches]
        columns[f.name] = [x for part in parts for x in part] if f.name == "device_ids" else np.concatenate(parts)
    return PredictionBatch(**columns)


def _total(reports: list[StepReport]) -> StepReport:
    """The reports of consecutive chunks added up (devices: per chunk, so a device in two counts twice)."""
    return StepReport(**{f.name: sum(getattr(r, f.name) for r in reports) for f in fields(StepReport)})


def _rows(predictions: PredictionBatch, start: int, stop: int) -> PredictionBatch:
    return PredictionBatch(
        predictions.device_ids[start:stop], predictions.ts[start:stop], predictions.forecast[start:stop],
        predictions.anomaly_score[start:stop], predictions.is_anomaly[start:stop], predictions.residual[start:stop],
        predictions.surprise[start:stop],
    )


def _published_spans(spans: list[BatchSpan], hidden: np.ndarray) -> list[tuple[BatchSpan, bool]]:
    """The batch messages' spans among the published predictions (the rows not ``hidden``), and
    whether each is hidden: a message's rows are replayed, or refused, all or none. A message of no
    rows is never hidden by its rows (its position says whether it is replayed)."""
    if not hidden.any():
        return [(span, False) for span in spans]
    before = np.concatenate([[0], np.cumsum(hidden)])  # hidden readings before each index
    return [(span._replace(start=span.start - int(before[span.start]), stop=span.stop - int(before[span.stop])),
             span.stop > span.start and bool(hidden[span.start])) for span in spans]


def _not_finite(predictions: PredictionBatch) -> np.ndarray:
    """(n,) bool: readings whose forecast, anomaly score or residual is NaN or infinite."""
    forecast = np.isfinite(predictions.forecast).all(axis=1)  # (n, F), n may be 0
    return ~(forecast & np.isfinite(predictions.anomaly_score) & np.isfinite(predictions.residual))


def _whole_messages(refused: np.ndarray, spans: list[BatchSpan]) -> np.ndarray:
    """``refused`` widened to every row of a batch message one of whose rows it holds."""
    for span in spans:
        if refused[span.start : span.stop].any():
            refused[span.start : span.stop] = True
    return refused


def _not_finite_letters(
    records: list[Message], decoded: DecodedBatch, predictions: PredictionBatch, refused: np.ndarray,
    bad: np.ndarray,
) -> list[DeadLetter]:
    """One dead letter per message with a refused reading (prediction_not_finite), the message as
    read; ``bad``: the readings whose own prediction is not finite (_not_finite), named in its detail."""
    first: dict[SourcePosition, int] = {}
    for i in np.flatnonzero(refused).tolist():
        position = decoded.position(i)
        if position not in first or (bad[i] and not bad[first[position]]):
            first[position] = i  # the message's first reading whose prediction is not finite
    letters = []
    for message in records:
        position = SourcePosition(message.topic, message.partition, message.offset)
        i = first.get(position)
        if i is None:
            continue
        what = [name for name, column in (("forecast", predictions.forecast), ("anomaly_score", predictions.anomaly_score),
                                          ("residual", predictions.residual))
                if not np.isfinite(column[i]).all()]
        detail = (f"{' and '.join(what)} of device {predictions.device_ids[i][:64]!r} not finite after this reading"
                  " (the model's output overflowed float32)")
        headers = [(k, v if v is not None else b"") for k, v in (message.headers or [])]
        letters.append(DeadLetter(DeadLetterReason.PREDICTION_NOT_FINITE, detail, message.key, message.value, headers,
                                  position))
    return letters


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
