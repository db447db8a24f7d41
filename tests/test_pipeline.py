"""The run loop's commit order, on the in-process broker (streamer.kafka.memory), no Kafka.

At-least-once: produce, flush (acknowledged), commit, then checkpoint; nothing committed when
the acknowledgement does not come or a delivery fails; no checkpoint when the commit is refused.
Pipelined: a batch is produced and left in flight; the next run_once settles it (flush, commit,
checkpoint) after polling and decoding the next batch, before stepping it, or at once when
nothing new comes. While busy, acknowledged offsets wait for kafka.commit_interval_ms unless a
checkpoint is due; idle, a revocation or a model switch commits them at once.
Exactly-once: one transaction per batch (outputs, then offsets, then commit), then checkpoint; an
aborted transaction or a partition revoked mid-batch makes nothing visible and the batch is
processed again from the partition's recovered position, published once. Each of these is also
proven on the real broker, on both clients (tests/integration: test_pipeline_kafka,
test_recovery_kafka, test_chaos_kafka, test_faults_kafka).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from streamer.checkpoint import Checkpoint, DirectoryCheckpointStore
from streamer.engine import Engine, ReadingBatch
from streamer.errors import PipelineError
from streamer.kafka.abstract import GroupMovedOn, KafkaClientError, TopicPartition
from streamer.kafka.memory import MemoryBroker, MemoryConsumer, MemoryProducer
from streamer.metrics import Metrics
from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file
import streamer.pipeline as pipeline_module
from streamer.pipeline import Pipeline, _chunks
from streamer.records import ARROW_CONTENT_TYPE, CONTENT_TYPE_HEADER, encode_arrow_readings
from streamer.settings import load_settings
from tests.conftest import written_as_the_loop_goes_on

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)
DEVICES = [f"dev-{i}" for i in range(8)]


class JournaledStore(DirectoryCheckpointStore):
    """The real checkpoint store, its writes noted in the broker's journal."""

    def __init__(self, broker: MemoryBroker, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.broker = broker

    def save(self, checkpoint: Checkpoint):
        self.broker.journal.append(("checkpoint", checkpoint.partition, checkpoint.offset))
        return super().save(checkpoint)


class Rig:
    """A pipeline over the in-process broker; ``restart`` builds a new process on the same broker
    and checkpoint directory."""

    def __init__(self, tmp_path, exactly_once: bool = False, checkpoint_readings: int = 1, capacity: int = 100,
                 metrics: Metrics | None = None, commit_interval_ms: int = 1000, batch_output: str = "json",
                 reload_interval_s: float = 10.0) -> None:
        config = ModelConfig(2, 8, 1, 2)
        self.model_path = tmp_path / "m.pt"
        save_model_file(self.model_path, init_random_model(config, seed=3), config, "v1")
        self.settings = load_settings({
            "kafka": {"input_topic": "in", "output_topic": "out", "dead_letter_topic": "dlq", "group_id": "g",
                      "exactly_once": exactly_once, "commit_interval_ms": commit_interval_ms,
                      "batch_output": batch_output},
            "model": {"path": self.model_path, "device": "cpu", "reload_interval_s": reload_interval_s},
            "checkpoint": {"directory": tmp_path / "cp", "interval_readings": checkpoint_readings},
            "batch": {"max_records": 1000, "max_wait_ms": 0},
            "metrics": {"enabled": False},
            "run": {"status_interval_s": 0},
        })
        self.broker = MemoryBroker()
        self.broker.create_topic("in", 2)
        self.tmp_path = tmp_path
        self.capacity = capacity
        self.metrics = metrics
        self.producers: list[MemoryProducer] = []
        self.restart()

    def restart(self) -> None:
        self.consumer = MemoryConsumer(self.broker, "g")
        store = JournaledStore(self.broker, self.tmp_path / "cp", "g")
        engine = Engine.build(load_model_file(self.model_path), capacity=self.capacity, device="cpu")
        step = engine.step

        def journaled_step(*args, **kwargs):
            self.broker.journal.append(("step",))
            return step(*args, **kwargs)

        engine.step = journaled_step  # type: ignore[method-assign]
        self.pipeline = Pipeline(self.settings, engine, self.consumer, self.new_producer(), metrics=self.metrics,
                                 store=store, producer_factory=self.new_producer)
        self.pipeline.subscribe()
        self.pipeline.run_once()  # assigned and paused
        self.pipeline.run_once()  # recovered: seek, resume
        assert self.pipeline.partitions.owned.keys() == {P0, P1}

    def new_producer(self) -> MemoryProducer:
        producer = MemoryProducer(self.broker, f"producer-{len(self.producers)}")
        self.producers.append(producer)
        return producer

    def write(self, per_device: int, start_ts: int = 0, bad: int = 0) -> None:
        for t in range(per_device):
            for device in DEVICES:
                value = json.dumps({"device_id": device, "ts": 1_700_000_000 + start_ts + t, "values": [1.0, float(t)]})
                self.broker.append("in", device.encode(), value.encode())
        for i in range(bad):
            self.broker.append("in", b"dev-0", b"{not json")

    def write_arrow(self, gateway: bytes, devices: list[str], ts: int = 0) -> None:
        """One batch message: a reading of each device."""
        values = np.tile(np.array([[1.0, 2.0]], dtype=np.float32), (len(devices), 1))
        body = encode_arrow_readings(devices, np.full(len(devices), 1_700_000_000.0 + ts), values)
        self.broker.append("in", gateway, body, [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)])

    def mark(self) -> int:
        return len(self.journal())

    def journal(self, mark: int = 0) -> list[tuple]:
        """The journal's entries since ``mark``, once the checkpoints due are written (beside the
        loop, one after another as it goes on: here at once)."""
        written_as_the_loop_goes_on(self.pipeline.partitions)
        return self.broker.journal[mark:]

    def since(self, mark: int, steps: bool = False) -> list[str]:
        """The kinds of journal entries since ``mark``, consecutive repeats folded; engine steps
        only when ``steps``."""
        kinds: list[str] = []
        for entry in self.journal(mark):
            if entry[0] == "step" and not steps:
                continue
            if not kinds or kinds[-1] != entry[0]:
                kinds.append(entry[0])
        return kinds

    def ends(self) -> dict[TopicPartition, int]:
        return {tp: len(self.broker.topics["in"][tp.partition]) for tp in (P0, P1)}

    def outputs(self) -> Counter:
        """(device, ts) -> times published."""
        return Counter((json.loads(m.value)["device_id"], json.loads(m.value)["ts"]) for m in self.broker.messages("out"))


def committed(rig: Rig) -> dict[TopicPartition, int | None]:
    return rig.consumer.committed([P0, P1], 0)


def test_at_least_once_produces_flushes_commits_then_checkpoints(tmp_path):
    rig = Rig(tmp_path)
    rig.write(per_device=3, bad=1)
    mark = rig.mark()
    assert rig.pipeline.run_once() == 25
    assert rig.since(mark) == []  # produced, in flight
    assert rig.pipeline.run_once() == 0  # nothing new: settled at once
    assert rig.since(mark) == ["flush", "commit", "checkpoint"]
    assert committed(rig) == rig.ends()
    checkpoints = [e[1:] for e in rig.journal(mark) if e[0] == "checkpoint"]
    assert sorted(checkpoints) == sorted((tp.partition, end) for tp, end in rig.ends().items())
    assert sum(rig.outputs().values()) == 24 and len(rig.broker.messages("dlq")) == 1


def test_no_acknowledgement_no_commit_and_the_batch_comes_again(tmp_path):
    rig = Rig(tmp_path)
    rig.write(per_device=2)
    stop = threading.Event()
    rig.pipeline._stop = stop
    records = rig.pipeline._poll_batch(stop)
    rig.broker.away, _ = True, stop.set()  # the broker goes while the batch is stepped; then we stop
    mark = rig.mark()
    rig.pipeline._process(records)
    assert rig.pipeline._settle() is False
    assert rig.since(mark) == []  # no acknowledgement: no commit, no checkpoint
    rig.broker.away = False
    assert committed(rig) == {P0: None, P1: None}
    rig.restart()  # a new process re-reads from the last commit
    rig.pipeline.run_once()
    assert set(rig.outputs()) == {(d, 1_700_000_000 + t) for d in DEVICES for t in range(2)}


def test_a_failed_delivery_stops_the_batch_before_its_commit(tmp_path):
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    rig.broker.rejected_topics.add("out")
    mark = rig.mark()
    rig.pipeline.run_once()
    with pytest.raises(PipelineError, match="8 of 8 sends of this batch failed"):
        rig.pipeline.run_once()
    assert "commit" not in rig.since(mark) and "checkpoint" not in rig.since(mark)
    assert committed(rig) == {P0: None, P1: None}


def test_a_refused_commit_skips_the_checkpoint_and_is_tried_again_while_the_partitions_stay(tmp_path):
    # The group rebalancing refuses a commit; a cooperative member keeps its partitions. Their
    # offsets had been dropped: a quiet partition was never committed again, not even at a stop,
    # and a restart published its readings a second time.
    rig = Rig(tmp_path, commit_interval_ms=0)
    rig.write(per_device=1)
    rig.broker.fail("commit", GroupMovedOn("the group is rebalancing"))
    mark = rig.mark()
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert rig.since(mark) == ["flush"]  # published (at-least-once), neither committed nor checkpointed
    assert sum(rig.outputs().values()) == 8
    rig.pipeline.run_once()  # idle: the offsets waiting are committed, then checkpointed
    assert rig.since(mark)[1:] == ["commit", "checkpoint"] and committed(rig) == rig.ends()
    rig.restart()
    for _ in range(2):
        rig.pipeline.run_once()
    assert sum(rig.outputs().values()) == 8  # nothing published again


def test_a_refused_commit_of_a_partition_that_left_and_came_back_is_not_made_by_its_new_owner(tmp_path):
    # The offsets of a refused commit wait for the next one, tied to the partition's owner then.
    # The partition left (on the client's thread, no commit there) and came back: a new owner,
    # from the committed offset. Its first batch ended below the offset waiting, which was kept and
    # committed under the new owner: offsets it had not applied (its devices' state lacked those
    # readings), with the old owner's model in the metadata (a reviewer's model-based checker).
    rig = Rig(tmp_path, commit_interval_ms=60_000)  # after a refusal, the next commit waits this long
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    first = committed(rig)
    assert first == rig.ends()
    rig.write(per_device=3)
    rig.broker.fail("commit", GroupMovedOn("the group is rebalancing"))
    for _ in range(3):
        rig.pipeline.run_once()  # published; the commit refused: the next waits an interval
    assert rig.pipeline._to_commit.keys() == {P0, P1}
    rig.pipeline.settings = rig.settings.model_copy(update={"batch": rig.settings.batch.model_copy(update={"max_records": 2})})
    before = rig.pipeline.partitions.owned[P0]
    rig.consumer.rebalance_now(revoked=[P0])  # on the client's thread: no commit there
    rig.consumer.rebalance(assigned=[P0])
    busy = next(d for d in DEVICES if rig_partition(d) == 1)  # P1 busy: no idle poll commits meanwhile
    for t in range(20):
        rig.broker.append("in", busy.encode(), json.dumps({"device_id": busy, "ts": 1_700_000_100 + t,
                                                           "values": [1.0, 2.0]}).encode())
    for _ in range(5):
        rig.pipeline.run_once()
    owned = rig.pipeline.partitions.owned[P0]
    assert owned is not before and first[P0] < owned.next_offset < rig.ends()[P0]  # the new owner is part way
    assert committed(rig)[P0] == first[P0]
    rig.pipeline._settle(commit=True)  # as at a stop
    assert committed(rig)[P0] == owned.next_offset  # not the offset the owner before it had reached


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_big_batchs_sends_wait_for_acknowledgement_part_way_live_and_answering_stop(tmp_path, monkeypatch,
                                                                                     exactly_once: bool):
    # Batch messages answered in JSON (a prediction a row) filled the clients' queues: with the
    # brokers away, librdkafka waited for room up to 5 minutes, neither beating nor stopping.
    monkeypatch.setattr(pipeline_module, "PRODUCE_CHUNK", 5)
    rig = Rig(tmp_path, exactly_once=exactly_once)
    rig.write(per_device=2)  # 16 predictions: acknowledged after the 5th, the 10th and the 15th
    mark = rig.mark()
    for _ in range(3):
        rig.pipeline.run_once()
    flushes = [e for e in rig.journal(mark) if e[0] == "flush"]
    assert len(flushes) >= 4 and sum(rig.outputs().values()) == 16 and committed(rig) == rig.ends()
    mark = rig.mark()
    rig.write(per_device=0, bad=12)  # small dead letters count as messages too, not by their bytes alone
    for _ in range(3):
        rig.pipeline.run_once()
    assert len([e for e in rig.journal(mark) if e[0] == "flush"]) >= 3 and committed(rig) == rig.ends()
    beats = []
    rig.pipeline.health = SimpleNamespace(beat=lambda: beats.append(1), fail=lambda reason: None)
    rig.pipeline._stop = stop = threading.Event()
    waits = []

    def away_then_stop(*args):
        waits.append(args)
        if len(waits) == 3:
            stop.set()

    monkeypatch.setattr(rig.pipeline, "_broker_away", away_then_stop)
    before = committed(rig)
    rig.write(per_device=2, start_ts=10)
    produce = rig.pipeline.producer.produce

    def going_away(*args):  # the brokers go as the batch's first prediction is queued
        rig.broker.away = True
        produce(*args)

    sending = rig.pipeline.producer
    sending.produce = going_away
    rig.pipeline.run_once()
    del sending.produce  # the brokers stay
    assert stop.is_set() and len(beats) >= 3  # live while it waited, and it stopped part way
    rig.broker.away = False
    rig.pipeline._settle(commit=True)  # as run does once stopped: nothing of the batch is committed
    assert committed(rig) == before
    published = sum(rig.outputs().values()) - 16
    assert published <= 5  # the first part at most (exactly-once: none, its transaction never committed)
    stop.clear()  # a caller going on past the stop (run_once is public): the batch is read again, whole
    for _ in range(6):
        rig.pipeline.run_once()
    outputs = rig.outputs()
    assert committed(rig) == rig.ends() and len(outputs) == 32
    assert set(outputs.values()) == ({1} if exactly_once else {1, 2})


def test_a_commit_retried_while_the_broker_is_away(tmp_path, monkeypatch):
    monkeypatch.setattr("streamer.pipeline.COMMIT_RETRY_INTERVAL_S", 0.01)
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    rig.broker.fail("commit", KafkaClientError("coordinator not available", retriable=True), times=2)
    mark = rig.mark()
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert rig.since(mark) == ["flush", "commit", "checkpoint"]
    assert committed(rig) == rig.ends()


def test_revoked_mid_batch_at_least_once_only_the_partitions_still_owned_commit(tmp_path):
    rig = Rig(tmp_path)
    rig.write(per_device=2)
    flush = rig.pipeline.producer.flush

    def revoke_then_flush(timeout_s: float) -> bool:
        rig.consumer.rebalance_now(revoked=[P0])  # on the client's own thread, as kafka-python does
        return flush(timeout_s)

    rig.pipeline.producer.flush = revoke_then_flush  # type: ignore[method-assign]
    mark = rig.mark()
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    # P0's offsets are not offered (its new owner re-reads it from the last commit), and its state,
    # which holds the uncommitted batch, is not checkpointed on the way out: of no use to a
    # recovery at the last commit. P1's are committed, and it is checkpointed.
    assert rig.since(mark) == ["revoked", "flush", "commit", "checkpoint"]
    assert [e[1] for e in rig.journal(mark) if e[0] == "checkpoint"] == [1]
    assert committed(rig) == {P0: None, P1: len(rig.broker.topics["in"][1])}
    assert rig.pipeline.partitions.owned.keys() == {P1}


def commits(rig: Rig, mark: int) -> list[dict[TopicPartition, int]]:
    return [e[1] for e in rig.journal(mark) if e[0] == "commit"]


def test_busy_loop_commits_acknowledged_batches_together_once_idle_or_per_interval(tmp_path):
    rig = Rig(tmp_path, checkpoint_readings=10_000, commit_interval_ms=60_000)
    mark = rig.mark()
    for t in range(3):  # three batches back to back: each settles the one before, none commits
        rig.write(per_device=1, start_ts=t)
        rig.pipeline.run_once()
    assert rig.since(mark) == ["flush"] and committed(rig) == {P0: None, P1: None}
    assert rig.pipeline.summary.readings == 16  # accounted for once acknowledged, not once committed
    rig.pipeline.run_once()  # nothing new at once: the last batch settles, its offsets wait too
    assert rig.since(mark) == ["flush"] and committed(rig) == {P0: None, P1: None}
    rig.pipeline.run_once()  # nothing new for a while (the idle poll): all acknowledged commits at once
    assert commits(rig, mark) == [rig.ends()] and committed(rig) == rig.ends()

    # With no interval, a busy loop commits every batch as it settles it.
    (tmp_path / "every").mkdir()
    rig = Rig(tmp_path / "every", checkpoint_readings=10_000, commit_interval_ms=0)
    mark = rig.mark()
    for t in range(3):
        rig.write(per_device=1, start_ts=t)
        rig.pipeline.run_once()
    assert len(commits(rig, mark)) == 2  # batches 1 and 2; 3 is in flight
    rig.pipeline.run_once()
    assert len(commits(rig, mark)) == 3 and committed(rig) == rig.ends()


def test_a_due_checkpoint_commits_at_once_whatever_the_interval(tmp_path):
    rig = Rig(tmp_path, checkpoint_readings=10, commit_interval_ms=60_000)
    mark = rig.mark()
    for t in range(4):  # 4 readings a batch per partition; a partition is due after 10 of its own
        rig.write(per_device=1, start_ts=t)
        rig.pipeline.run_once()
    kinds = rig.since(mark)
    assert "checkpoint" in kinds and kinds.index("commit") == kinds.index("checkpoint") - 1
    saved = [e for e in rig.journal(mark) if e[0] == "checkpoint"]
    done = commits(rig, mark)
    # Each checkpoint is at an offset the commit just before it holds: the engine's state there.
    assert saved and all(done[-1][TopicPartition("in", p)] == offset for _, p, offset in saved)


def test_revocation_commits_what_waits_first_and_a_partition_back_drops_stale_offsets(tmp_path):
    rig = Rig(tmp_path, checkpoint_readings=10_000, commit_interval_ms=60_000)
    for t in range(2):
        rig.write(per_device=1, start_ts=t)
        rig.pipeline.run_once()
    mark = rig.mark()
    rig.consumer.rebalance(revoked=[P0])  # on the loop's thread, inside its poll
    rig.write(per_device=1, start_ts=2)
    rig.pipeline.run_once()
    kinds = rig.since(mark)
    # The hook settles the batch in flight and commits all that waits while P0 is still ours,
    # then P0's state is saved on the way out.
    assert kinds == ["revoked", "flush", "commit", "checkpoint"]
    assert committed(rig)[P0] == len(rig.broker.topics["in"][0]) - sum(1 for d in DEVICES if rig_partition(d) == 0)

    # A partition taken on the client's thread, while offsets wait, then given back: the offsets
    # noted under its old ownership are never committed (they could move the group's back).
    (tmp_path / "two").mkdir()
    rig2 = Rig(tmp_path / "two", checkpoint_readings=10_000, commit_interval_ms=60_000)
    for t in range(2):
        rig2.write(per_device=1, start_ts=t)
        rig2.pipeline.run_once()
    taker = threading.Thread(target=rig2.consumer.rebalance_now, kwargs={"revoked": [P0]})
    taker.start()
    taker.join()
    rig2.consumer.rebalance(assigned=[P0])
    mark = rig2.mark()
    rig2.pipeline._settle(commit=True)
    assert [set(c) for c in commits(rig2, mark)] == [{P1}]


def test_closing_the_consumer_revokes_through_the_loop_as_the_clients_do(tmp_path):
    # Both clients revoke what is assigned as they close; the double had only noted the close, so
    # the loop's last revocation (settle, commit, checkpoint on the way out) went untested.
    # Closed with a batch in flight (a run that failed): inside close nothing is committed (a
    # commit there can hang), so no checkpoint either; the partitions and their rows are let go.
    rig = Rig(tmp_path, checkpoint_readings=10_000, commit_interval_ms=60_000)
    rig.write(per_device=2)
    rig.pipeline.run_once()
    before = committed(rig)
    mark = rig.mark()
    rig.consumer.close()
    assert rig.since(mark) == ["revoked", "close consumer"]
    assert committed(rig) == before and not rig.pipeline.partitions.owned and len(rig.pipeline.engine.table) == 0
    # As run() ends: settled, committed and checkpointed first; close then has nothing to add.
    (tmp_path / "two").mkdir()
    rig = Rig(tmp_path / "two", checkpoint_readings=10_000, commit_interval_ms=60_000)
    rig.write(per_device=2)
    rig.pipeline.run_once()
    rig.pipeline._settle(commit=True)
    rig.pipeline.partitions.checkpoint_all()
    mark = rig.mark()
    rig.consumer.close()
    assert rig.since(mark) == ["revoked", "close consumer"]
    assert committed(rig) == {tp: len(rig.broker.topics["in"][tp.partition]) for tp in (P0, P1)}
    assert not rig.pipeline.partitions.owned and len(rig.pipeline.engine.table) == 0


def rig_partition(device: str) -> int:
    return zlib.crc32(device.encode()) % 2


def test_exactly_once_one_transaction_then_checkpoint(tmp_path):
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=3, bad=1)
    mark = rig.mark()
    rig.pipeline.run_once()
    # commit_transaction flushes the outputs first (the broker acknowledges them), as the clients do
    assert rig.since(mark) == ["begin_transaction", "send_offsets_to_transaction", "flush", "commit_transaction",
                               "checkpoint"]
    assert committed(rig) == rig.ends()
    assert sum(rig.outputs().values()) == 24 and len(rig.broker.messages("dlq")) == 1


def test_exactly_once_abort_replaces_the_producer_and_publishes_once(tmp_path):
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=2)
    rig.broker.fail("commit_transaction", KafkaClientError("transaction coordinator fenced"))
    mark = rig.mark()
    rig.pipeline.run_once()
    # The sends flushed and checked before the commit (kafka-python's commit never returns after a
    # refused send), then the commit refused.
    assert rig.since(mark) == ["begin_transaction", "send_offsets_to_transaction", "flush", "abort_transaction",
                               "close producer"]
    assert rig.broker.messages("out") == [] and committed(rig) == {P0: None, P1: None}
    assert rig.pipeline.producer is rig.producers[-1] and len(rig.producers) == 2
    assert rig.pipeline.summary.aborted_batches == 1
    rig.pipeline.run_once()  # the partitions are recovered from where the group had them
    rig.pipeline.run_once()  # and the batch is processed again
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(2)})
    assert committed(rig) == rig.ends()


def test_exactly_once_a_stop_while_the_new_producer_waits_for_the_brokers_ends_the_run_as_stopped(tmp_path):
    # The successor's wait for the brokers raises StartupInterrupted once stop is set; it had
    # escaped run() (no partitions reset, no checkpoints, health failed, "stopped while waiting").
    from streamer.errors import StartupInterrupted

    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=2)
    rig.broker.fail("commit_transaction", KafkaClientError("transaction coordinator fenced"))
    stop = threading.Event()

    def interrupted():
        stop.set()  # SIGTERM while the brokers are away
        raise StartupInterrupted()

    rig.pipeline.producer_factory = interrupted
    summary = rig.pipeline.run(stop)
    assert summary.aborted_batches == 1 and summary.predictions == 0 and rig.broker.messages("out") == []
    assert committed(rig) == {P0: None, P1: None}
    assert rig.pipeline.partitions.owned == {} and set(rig.pipeline.partitions.pending) == {P0, P1}  # reset: recovered next time


def test_exactly_once_an_aborted_batch_is_published_once_when_its_recovery_is_tried_again(tmp_path, monkeypatch):
    # The group has no commit yet: after the abort the partitions restart where the dropped batch
    # began, not at the fetch position past it, also when the first recovery fails (the store
    # cannot be read for a while): then the batch was replayed unpublished, and lost.
    monkeypatch.setattr("streamer.pipeline.STORE_RETRY_S", 0.0)
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=2)
    rig.broker.fail("commit_transaction", KafkaClientError("transaction coordinator fenced"))
    rig.pipeline.run_once()
    assert rig.broker.messages("out") == [] and committed(rig) == {P0: None, P1: None}
    store = rig.pipeline.partitions.store
    load_latest = store.load_latest
    failures = []

    def away_once(*args, **kwargs):
        if not failures:
            failures.append(args[:2])
            raise KafkaClientError("changelog read timed out", retriable=True)
        return load_latest(*args, **kwargs)

    store.load_latest = away_once
    for _ in range(4):
        rig.pipeline.run_once()
    assert len(failures) == 1
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(2)})
    assert committed(rig) == rig.ends()
    assert rig.pipeline.summary.replayed == 0


@pytest.mark.parametrize("when", ["before the transaction", "inside the transaction"])
def test_exactly_once_revoked_mid_batch_nothing_becomes_visible(tmp_path, when):
    """Before: the loop sees the partition gone and drops the batch. Inside: the broker refuses
    the transaction's offsets (the group moved on since the batch's group metadata) and it aborts."""
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=2)
    target = rig.consumer if when == "before the transaction" else rig.pipeline.producer
    name = "group_metadata" if when == "before the transaction" else "begin_transaction"
    call = getattr(target, name)

    def revoke_then_call():
        rig.consumer.rebalance_now(revoked=[P0])  # on the client's own thread, as kafka-python does
        setattr(target, name, call)
        return call()

    setattr(target, name, revoke_then_call)
    mark = rig.mark()
    rig.pipeline.run_once()
    kinds = rig.since(mark)
    assert kinds[0] == "revoked"
    if when == "before the transaction":
        assert "begin_transaction" not in kinds
    else:
        assert "abort_transaction" in kinds and "commit_transaction" not in kinds
    assert rig.broker.messages("out") == [] and rig.pipeline.summary.aborted_batches == 1
    rig.pipeline.run_once()
    rig.pipeline.run_once()  # P1 recovered and processed again; P0 is someone else's now
    p1_devices = {m.key.decode() for m in rig.broker.topics["in"][1]}
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in p1_devices for t in range(2)})
    assert committed(rig) == {P0: None, P1: rig.ends()[P1]}
    # P0's readings, polled before it left and stepped, leave no rows behind: they had held table
    # capacity (and counted as active devices) until expiry.
    assert len(rig.pipeline.engine.table) == len(p1_devices)


def test_a_restart_replays_from_the_checkpoint_without_republishing(tmp_path):
    rig = Rig(tmp_path, checkpoint_readings=10_000)  # only the fresh partitions' checkpoints at 0
    rig.write(per_device=3)
    for _ in range(3):  # the batch; its settling; the quiet poll that commits it
        rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    rig.restart()
    rig.write(per_device=1, start_ts=3)
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert rig.pipeline.summary.replayed == 24  # applied again to rebuild the state, not published
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(4)})


def test_a_restart_with_a_smaller_table_than_its_checkpoints_restores_what_fits(tmp_path, caplog):
    # state.capacity lowered below what a partition's checkpoint holds: recovery restores the
    # devices seen last, with a warning, and the loop goes on (it had failed every recovery).
    caplog.set_level(logging.WARNING, logger="streamer.partitions")
    rig = Rig(tmp_path)
    rig.write(per_device=3)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.journal()  # the checkpoints due, written: 4 devices of each partition
    rig.capacity = 3
    rig.restart()
    warned = [r.getMessage() for r in caplog.records if "more than state.capacity" in r.getMessage()]
    assert len(warned) == 2 and "holds 4 devices, more than state.capacity (3)" in warned[0]
    assert len(rig.pipeline.engine.table) == 3
    rig.write(per_device=1, start_ts=3)
    for _ in range(3):
        rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(4)})


def test_a_step_that_fails_part_way_leaves_no_checkpoint_of_its_rows(tmp_path):
    # The step raises after it changed rows (a GPU error at its last copy): the loop ends, and the
    # revocation as the consumer closes must not checkpoint those rows at the offset before the
    # batch, or a restart would apply the batch a second time.
    kw = dict(checkpoint_readings=10**9, commit_interval_ms=0)
    for name in ("ref", "rig"):
        (tmp_path / name).mkdir()
    ref = Rig(tmp_path / "ref", **kw)
    rig = Rig(tmp_path / "rig", **kw)
    for r in (ref, rig):
        r.write(per_device=2)
        r.pipeline.run_once()
        r.pipeline.run_once()
        r.write(per_device=2, start_ts=2)
    ref.pipeline.run_once()
    ref.pipeline.run_once()
    step = rig.pipeline.engine.step

    def applied_then_failed(*args, **kwargs):
        step(*args, **kwargs)
        raise RuntimeError("CUDA error: out of memory")

    rig.pipeline.engine.step = applied_then_failed
    with pytest.raises(RuntimeError, match="out of memory"):
        rig.pipeline.run_once()
    rig.pipeline.partitions.close()  # as run() ends
    rig.consumer.rebalance_now(revoked=[P0, P1])  # as the consumer closes
    assert {path.name for path in (tmp_path / "rig" / "cp").rglob("*.ckpt")} == {f"{0:020d}.ckpt"}
    rig.pipeline.engine.step = step
    rig.restart()
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(4)})
    for partition in (0, 1):
        got, want = rig.pipeline.engine.export_partition(partition), ref.pipeline.engine.export_partition(partition)
        assert dict(zip(got.device_ids, got.rows.tolist())) == dict(zip(want.device_ids, want.rows.tolist()))


def test_stopping_with_the_broker_away_checkpoints_nothing_past_the_commit(tmp_path, caplog):
    # A checkpoint at an offset the group has not committed is of no use to a recovery, and its
    # save pruned the committed one when checkpoint.keep is 1: the devices started from zero.
    rig = Rig(tmp_path)
    rig.pipeline.partitions.store.keep = 1
    rig.write(per_device=2)
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    rig.journal()
    assert committed(rig) == {P0: 8, P1: 8}
    rig.write(per_device=2, start_ts=2)
    rig.pipeline.run_once()  # stepped, in flight
    stop = threading.Event()
    stop.set()
    rig.pipeline._stop = stop
    rig.broker.away = True
    assert not rig.pipeline._settle(commit=True)  # as run() ends: nothing acknowledged
    rig.pipeline.partitions.checkpoint_all()
    rig.pipeline.partitions.close()
    rig.broker.away = False
    assert sorted(path.name for path in (tmp_path / "cp").rglob("*.ckpt")) == [f"{8:020d}.ckpt"] * 2
    assert sum("not checkpointed stopping: offset 16 is not committed (8 is)" in r.getMessage()
               for r in caplog.records) == 2
    caplog.clear()
    rig.restart()
    assert not any("no usable checkpoint" in r.getMessage() for r in caplog.records)
    assert len(rig.pipeline.engine.table) == len(DEVICES)
    for _ in range(3):
        rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert set(rig.outputs()) == {(d, 1_700_000_000 + t) for d in DEVICES for t in range(4)}


def test_a_batch_in_flight_commits_nothing_for_a_partition_recovered_since(tmp_path):
    # P0 is lost and assigned back while a batch is in flight; the member that had it meanwhile
    # committed further. The batch's older offset must not move the group's commit back.
    rig = Rig(tmp_path)
    rig.write(per_device=2)
    rig.pipeline.run_once()  # in flight, ending P0 at 8
    rig.write(per_device=3, start_ts=2)
    further = rig.ends()[P0]
    rig.broker.committed[("g", P0)] = further
    rig.consumer.rebalance(lost=[P0], assigned=[P0])
    flush = rig.pipeline.producer.flush
    polls = []

    def acknowledged_late(timeout_s):
        if timeout_s == 0 and not polls:  # not yet when the next poll looks
            polls.append(timeout_s)
            return False
        return flush(timeout_s)

    rig.pipeline.producer.flush = acknowledged_late
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert rig.broker.committed[("g", P0)] >= further
    assert all(entry[1].get(P0, further) >= further for entry in rig.journal() if entry[0] == "commit")


def test_exactly_once_a_stuck_transaction_call_replaces_the_producer(tmp_path):
    """A transaction call that does not return (librdkafka's send_offsets_to_transaction can block
    past its timeout while the group coordinator is away) is abandoned after the producer's bound."""
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=1)
    stuck = rig.pipeline.producer
    release = threading.Event()
    stuck.transaction_stuck_after_s = 0.05
    stuck.commit_transaction = lambda: release.wait(5)  # type: ignore[method-assign]
    rig.pipeline.run_once()
    release.set()
    assert rig.pipeline.producer is not stuck and stuck.closed
    assert rig.broker.messages("out") == [] and rig.pipeline.summary.aborted_batches == 1
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert rig.outputs() == Counter({(d, 1_700_000_000): 1 for d in DEVICES})


def test_pipelined_the_batch_before_commits_before_the_next_is_stepped(tmp_path):
    """Acknowledgements that come late: the next batch is polled and decoded meanwhile, then the
    loop waits for them, commits, and only then steps the next batch; commits in batch order."""
    rig = Rig(tmp_path, commit_interval_ms=0)  # a commit per batch
    rig.write(per_device=1)
    rig.pipeline.run_once()
    first = rig.ends()
    flush = rig.pipeline.producer.flush
    rig.pipeline.producer.flush = lambda timeout_s: timeout_s > 0 and flush(timeout_s)  # type: ignore[method-assign]
    rig.write(per_device=1, start_ts=1)
    mark = rig.mark()
    rig.pipeline.run_once()
    kinds = rig.since(mark, steps=True)  # batch 1 settled, then batch 2 stepped; its checkpoint written beside
    assert [k for k in kinds if k != "checkpoint"] == ["flush", "commit", "step"]
    assert kinds.index("checkpoint") > kinds.index("commit")
    assert [e[1] for e in rig.journal(mark) if e[0] == "commit"] == [first]
    rig.pipeline.run_once()  # nothing new: batch 2 settled at once
    assert committed(rig) == rig.ends()
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(2)})


def test_pipelined_a_failed_delivery_of_the_batch_before_commits_nothing_after_it(tmp_path):
    """Batch 1's delivery fails, found when batch 2 is in hand: neither commits, batch 2 is not
    stepped, the loop stops with the error; a restart re-reads both and publishes them."""
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    rig.broker.rejected_topics.add("out")
    rig.pipeline.run_once()
    rig.write(per_device=1, start_ts=1)
    mark = rig.mark()
    with pytest.raises(PipelineError, match="8 of 8 sends of this batch failed"):
        rig.pipeline.run_once()
    assert "step" not in rig.since(mark, steps=True) and "commit" not in rig.since(mark)
    assert committed(rig) == {P0: None, P1: None}
    rig.broker.rejected_topics.clear()
    rig.restart()
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert set(rig.outputs()) == {(d, 1_700_000_000 + t) for d in DEVICES for t in range(2)}


def test_exactly_once_a_dead_letter_that_cannot_be_delivered_aborts_its_batch(tmp_path):
    # A transaction whose dead letters the broker refused (as the clients do, its commit fails):
    # nothing of the batch is visible and its offsets stay; once the topic takes them, the batch
    # is published once, its dead letters with it. (The in-memory producer had committed such a
    # transaction, offsets and all, without its dead letters.)
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=1, bad=2)
    rig.broker.rejected_topics.add("dlq")
    rig.pipeline.run_once()
    assert rig.pipeline.summary.aborted_batches == 1 and rig.broker.messages("out") == []
    assert committed(rig) == {P0: None, P1: None}
    rig.broker.rejected_topics.clear()
    for _ in range(3):
        rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert rig.outputs() == Counter({(d, 1_700_000_000): 1 for d in DEVICES})
    assert len(rig.broker.messages("dlq")) == 2


def test_exactly_once_a_refused_send_aborts_before_the_commit_is_asked(tmp_path):
    # kafka-python's commit_transaction never returns after a send the broker refused (the
    # abort waited for TransactionStuck, 60 s): the loop checks the sends first.
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=1, bad=1)
    rig.broker.rejected_topics.add("dlq")
    producer = rig.pipeline.producer

    def hangs() -> None:
        raise AssertionError("commit_transaction asked after a refused send")

    producer.commit_transaction = hangs  # type: ignore[method-assign]
    rig.pipeline.run_once()
    assert rig.pipeline.summary.aborted_batches == 1 and rig.broker.messages("out") == []
    assert rig.pipeline.producer is not producer  # replaced, as after any abort


def test_a_refused_commit_waits_an_interval_even_with_a_checkpoint_due(tmp_path, caplog):
    # While the group rebalances, a due checkpoint had made every batch ask again (a coordinator
    # round trip and a warning each).
    rig = Rig(tmp_path, commit_interval_ms=60_000, checkpoint_readings=1)
    rig.write(per_device=1)
    rig.broker.fail("commit", GroupMovedOn("the group is rebalancing"))
    rig.pipeline.run_once()
    rig.pipeline.run_once()  # settled: the commit refused
    mark = rig.mark()
    for t in range(1, 4):
        rig.write(per_device=1, start_ts=t)
        rig.pipeline.run_once()
    assert "commit" not in rig.since(mark)
    rig.pipeline._last_commit -= 61.0  # an interval later
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert committed(rig) == rig.ends()


def test_revocation_settles_the_batch_in_flight_first(tmp_path):
    """A partition revoked inside the poll (the loop's own thread) while a batch is in flight:
    that batch is committed first, so the revoked partition's checkpoint is at a committed offset."""
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    rig.pipeline.run_once()
    rig.consumer.rebalance(revoked=[P0])
    mark = rig.mark()
    rig.pipeline.run_once()
    # The journal notes the revocation as it starts; inside its hook the batch is settled.
    assert rig.since(mark) == ["revoked", "flush", "commit", "checkpoint"]
    assert committed(rig) == rig.ends()
    assert ("checkpoint", 0, rig.ends()[P0]) in rig.journal()


def test_a_revocation_whose_commit_is_not_answered_gives_up_and_the_loop_goes_on(tmp_path, monkeypatch, caplog):
    """Inside the poll a revocation waits for the batch in flight's commit; a commit the
    coordinator never answers had held the loop there for good, and with it the group's whole
    rebalance (no member is handed a partition meanwhile). The wait is bounded: the revoked
    partition is released, the offsets wait for the next commit (at-least-once), the loop goes on."""
    monkeypatch.setattr(pipeline_module, "REVOKE_WAIT_S", 0.2)
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    rig.pipeline.run_once()
    answered = threading.Event()
    real_commit = rig.consumer.commit

    asked = []

    def unanswered(offsets, metadata=None):  # the revocation's commit is not answered; the ones after it are
        asked.append(offsets)
        if len(asked) == 1:
            answered.wait(30)
        real_commit(offsets, metadata)

    rig.consumer.commit = unanswered  # type: ignore[method-assign]
    rig.consumer.rebalance(revoked=[P0])
    started = time.monotonic()
    rig.pipeline.run_once()
    assert time.monotonic() - started < 10
    assert "a revocation gave up waiting: offsets wait for the group coordinator's answer" in caplog.text
    assert P0 not in rig.pipeline.partitions.owned
    answered.set()
    rig.consumer.commit = real_commit  # type: ignore[method-assign]
    # Its answer comes on the commit's own thread: until then no other commit is made (they wait
    # for the next interval), which under a busy host had outlasted the turns below.
    abandoned = rig.pipeline._abandoned_commit
    assert abandoned is None or abandoned.done(10)
    for t in range(1, 3):
        rig.write(per_device=1, start_ts=t)
        rig.pipeline.run_once()
    rig.pipeline._last_commit -= 3600  # an interval later
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert committed(rig)[P1] == rig.ends()[P1]


def test_a_revocation_does_not_wait_for_a_commit_the_client_answers_only_after_its_hook(tmp_path, caplog):
    """librdkafka answers a commit asked on another thread during its rebalance callback only
    once the callback returns: the revocation waited REVOKE_WAIT_S (10 s) for it on every member's
    join, the loop and the group's rebalance held, and reported the brokers away. It is left to
    land after the hook, as a commit given up on is; the next commits wait for it."""
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    rig.pipeline.run_once()
    rig.consumer.commits_answered_inside_rebalance = False  # type: ignore[misc]
    hook_returned = threading.Event()
    real_commit, real_hook = rig.consumer.commit, rig.consumer.hooks.revoked

    asked = []

    def answered_after_the_hook(offsets, metadata=None):
        asked.append(hook_returned.wait(30))
        real_commit(offsets, metadata)

    def hook(partitions):
        real_hook(partitions)
        hook_returned.set()

    rig.consumer.commit = answered_after_the_hook  # type: ignore[method-assign]
    rig.consumer.hooks = rig.consumer.hooks._replace(revoked=hook)
    rig.consumer.rebalance(revoked=[P0])
    started = time.monotonic()
    rig.pipeline.run_once()
    assert time.monotonic() - started < pipeline_module.REVOKE_WAIT_S / 2
    assert "gave up waiting" not in caplog.text and "unreachable" not in caplog.text
    assert P0 not in rig.pipeline.partitions.owned
    assert rig.pipeline._abandoned_commit is not None and rig.pipeline._abandoned_commit.done(10)
    assert asked == [True]  # asked once, answered after the hook (the double then refuses P0's: no longer assigned)
    rig.consumer.commit = real_commit  # type: ignore[method-assign]
    rig.write(per_device=1, start_ts=1)
    rig.pipeline.run_once()
    rig.pipeline._last_commit -= 3600  # an interval later
    rig.pipeline.run_once()
    assert committed(rig)[P1] == rig.ends()[P1]


def test_a_revocation_whose_commit_fails_again_and_again_gives_up_too(tmp_path, monkeypatch, caplog):
    # A commit failing at once with a retriable error (the coordinator away) was retried for
    # COMMIT_RETRY_S (120 s) inside the rebalance callback, then ended the run.
    monkeypatch.setattr(pipeline_module, "REVOKE_WAIT_S", 0.2)
    monkeypatch.setattr(pipeline_module, "COMMIT_RETRY_S", 3.0)
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    rig.pipeline.run_once()
    rig.broker.fail("commit", KafkaClientError("commit: coordinator not available", retriable=True), times=3)
    rig.consumer.rebalance(revoked=[P0])
    rig.pipeline.run_once()
    assert "a revocation gave up waiting: the commit failed" in caplog.text
    assert P0 not in rig.pipeline.partitions.owned
    rig.pipeline._last_commit -= 3600
    for _ in range(3):
        rig.pipeline.run_once()
    assert committed(rig)[P1] == rig.ends()[P1]


def test_a_batch_message_with_more_devices_than_the_table_is_stepped_in_chunks(tmp_path):
    """batch.max_records counts messages: one poll may carry more distinct devices than the state
    table holds. The batch is stepped in chunks of at most the capacity, committed once."""
    rig = Rig(tmp_path, capacity=5)
    devices = [f"gw-dev-{i}" for i in range(12)]
    rig.write_arrow(b"gw-0", devices[:7])
    rig.write_arrow(b"gw-0", devices[7:] + devices[:2], ts=1)
    mark = rig.mark()
    assert rig.pipeline.run_once() == 2
    rig.pipeline.run_once()
    assert rig.since(mark, steps=True) == ["step", "flush", "commit", "checkpoint"]
    assert sum(1 for e in rig.journal(mark) if e[0] == "step") == 3  # 14 readings of 12 devices, 5 at a time
    assert sum(1 for e in rig.journal(mark) if e[0] == "commit") == 1
    assert rig.pipeline.summary.readings == 14 and len(rig.broker.messages("out")) == 14
    assert [json.loads(m.value)["device_id"] for m in rig.broker.messages("out")] == devices[:7] + devices[7:] + devices[:2]
    tp = TopicPartition("in", rig.broker.messages("in")[0].partition)
    assert committed(rig)[tp] == 2


def test_a_gateways_repeated_list_is_stepped_at_once_and_cut_only_beyond_the_capacity():
    """Readings of id lists (batch messages alone) are cut as the readings would be; their
    distinct devices counted per distinct list."""
    listed = (tuple(f"gw-dev-{i}" for i in range(4)),) * 3  # one sender's list, three times
    ids = [device for ids in listed for device in ids]
    readings = ReadingBatch(ids, np.arange(12.0), np.zeros((12, 2), np.float32), np.zeros(12, np.int32), listed)
    assert _chunks(readings, 4) == [readings]
    more = (*listed, tuple(f"other-{i}" for i in range(3)))
    ids = [device for ids in more for device in ids]
    readings = ReadingBatch(ids, np.arange(15.0), np.zeros((15, 2), np.float32), np.zeros(15, np.int32), more)
    cut = _chunks(readings, 5)
    plain = _chunks(ReadingBatch(ids, readings.ts, readings.values, readings.partitions), 5)
    assert [c.device_ids for c in cut] == [c.device_ids for c in plain] == [ids[:13], ids[13:]]  # 5 devices, then 2
    assert all(c.id_lists is None for c in cut)


def test_checkpoint_spacing_counts_readings_not_messages(tmp_path):
    """checkpoint.interval_readings: a batch message of 8 rows counts 8."""
    rig = Rig(tmp_path, checkpoint_readings=8)
    rig.write_arrow(b"gw-0", DEVICES[:7])  # 7 readings: not due
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    tp = TopicPartition("in", rig.broker.messages("in")[0].partition)
    assert rig.pipeline.partitions.owned[tp].checkpoint_offset == 0
    rig.write_arrow(b"gw-0", DEVICES[:1], ts=1)  # the 8th reading
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    rig.pipeline.partitions.settle_writes()
    assert rig.pipeline.partitions.owned[tp].checkpoint_offset == 2


def test_the_replayed_metric_counts_readings_as_the_summary_does(tmp_path):
    registry = CollectorRegistry()
    rig = Rig(tmp_path, checkpoint_readings=10_000, metrics=Metrics(registry))
    rig.write_arrow(b"gw-0", DEVICES)
    rig.write_arrow(b"gw-0", DEVICES, ts=1)
    for _ in range(3):  # the batch; its settling; the quiet poll that commits it
        rig.pipeline.run_once()
    rig.restart()  # replays both messages from the fresh checkpoint at 0, publishing nothing
    rig.write_arrow(b"gw-0", DEVICES, ts=2)
    rig.pipeline.run_once()
    rig.pipeline.run_once()
    assert rig.pipeline.summary.replayed == 16
    assert registry.get_sample_value("streamer_replayed_messages_total") == 16
    assert len(rig.broker.messages("out")) == 24


def test_input_messages_count_a_batch_message_once_dead_letters_too_and_replays_not_again(tmp_path):
    # The dead-letter rate's denominator (alerts.yml): dead letters are messages. Divided by
    # readings, half of a topic of batch messages dead-lettered had read as about 1%.
    registry = CollectorRegistry()
    rig = Rig(tmp_path, checkpoint_readings=10_000, metrics=Metrics(registry))
    rig.write_arrow(b"gw-0", DEVICES)
    rig.broker.append("in", b"gw-0", b"not arrow", [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)])
    rig.write(per_device=1, start_ts=1, bad=1)  # 8 readings, 1 not JSON
    for _ in range(3):
        rig.pipeline.run_once()
    assert registry.get_sample_value("streamer_input_messages_total") == 1 + 1 + 8 + 1
    assert registry.get_sample_value("streamer_readings_total") == 16
    assert sum(rig.pipeline.summary.dead_letters_by_reason.values()) == 2
    rig.restart()  # replays every message from the checkpoint at 0: none counts again
    rig.write_arrow(b"gw-0", DEVICES, ts=2)
    for _ in range(3):
        rig.pipeline.run_once()
    assert rig.pipeline.summary.replayed > 0
    assert registry.get_sample_value("streamer_input_messages_total") == 11 + 1


def test_anomalies_are_counted_once_however_often_their_readings_are_replayed(tmp_path):
    # The partitions leave and come back to this process: their readings are replayed from the
    # checkpoint at 0, the flagged ones among them, which had been counted again.
    registry = CollectorRegistry()
    rig = Rig(tmp_path, checkpoint_readings=10**9, metrics=Metrics(registry))
    for t in range(90):
        for device in DEVICES:
            value = 1e4 if t in (70, 80) else float(t % 3)
            body = {"device_id": device, "ts": 1_700_000_000 + t, "values": [value, value]}
            rig.broker.append("in", device.encode(), json.dumps(body).encode())
    for _ in range(3):
        rig.pipeline.run_once()
    flagged = sum(json.loads(m.value)["is_anomaly"] for m in rig.broker.messages("out"))
    assert flagged > 0 and registry.get_sample_value("streamer_anomalies_total") == flagged
    rig.consumer.rebalance(lost=[P0, P1])
    rig.consumer.rebalance(assigned=[P0, P1])
    for _ in range(6):
        rig.pipeline.run_once()
    assert registry.get_sample_value("streamer_replayed_messages_total") == 90 * len(DEVICES)
    assert len(rig.broker.messages("out")) == 90 * len(DEVICES)
    assert registry.get_sample_value("streamer_anomalies_total") == flagged == rig.pipeline.summary.anomalies


@pytest.mark.parametrize("how", ["lost", "revoked"])
def test_at_least_once_a_partition_gone_between_poll_and_step_publishes_nothing_of_it(tmp_path, how):
    # Taken away on the client's thread after the poll, before the step: its devices' rows went
    # with it, and its readings had been stepped from zero state and published, wrong.
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    before = len(rig.broker.messages("out"))
    rig.write(per_device=1, start_ts=1)
    records = rig.pipeline._poll_batch(None)
    assert {m.partition for m in records} == {0, 1}
    rig.consumer.rebalance_now(**{how: [P0]})
    rig.pipeline._process(records)
    for _ in range(2):  # settles the batch, commits once idle
        rig.pipeline.run_once()
    out = [json.loads(m.value) for m in rig.broker.messages("out")[before:]]
    p1 = sorted(d for d in DEVICES if rig_partition(d) == 1)
    assert sorted(o["device_id"] for o in out) == p1 and all(o["ts"] == 1_700_000_001 for o in out)
    assert rig.pipeline.summary.predictions == len(DEVICES) + len(p1)
    assert committed(rig)[P1] == len(rig.broker.topics["in"][1]) and rig.pipeline.partitions.owned.keys() == {P1}


def test_at_least_once_a_batch_whose_partitions_all_went_between_poll_and_step_is_not_a_batch(tmp_path):
    registry = CollectorRegistry()
    rig = Rig(tmp_path, metrics=Metrics(registry))
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.write(per_device=1, start_ts=1)
    records = rig.pipeline._poll_batch(None)
    rig.consumer.rebalance_now(revoked=[P0, P1])
    rig.pipeline._process(records)
    assert rig.pipeline.summary.batches == 1 and registry.get_sample_value("streamer_batches_total") == 1
    assert rig.pipeline._unsettled is None and len(rig.broker.messages("out")) == len(DEVICES)


def test_exactly_once_a_batch_dropped_as_a_partition_left_is_counted_as_aborted(tmp_path):
    registry = CollectorRegistry()
    rig = Rig(tmp_path, exactly_once=True, metrics=Metrics(registry))
    rig.write(per_device=2)
    records = rig.pipeline._poll_batch(None)
    rig.consumer.rebalance_now(lost=[P0])  # P0 leaves while the batch is in hand
    rig.pipeline._process(records)
    assert rig.pipeline.summary.aborted_batches == 1
    assert registry.get_sample_value("streamer_transactions_aborted_total") == 1


def arrow_rows(messages) -> list[dict]:
    """The rows of Arrow output messages, in order."""
    import pyarrow as pa

    return [row for m in messages for row in pa.ipc.open_stream(m.value).read_all().to_pylist()]


@pytest.mark.parametrize("exactly_once", [False, True])
def test_arrow_batch_output_one_message_per_batch_message_json_for_json_readings(tmp_path, exactly_once):
    """kafka.batch_output = arrow: a batch message's predictions go out as a batch message under
    its key and header; JSON readings keep JSON predictions; the values are those JSON carries."""
    (tmp_path / "json").mkdir()
    (tmp_path / "arrow").mkdir()
    rigs = {out: Rig(tmp_path / out, exactly_once=exactly_once, batch_output=out) for out in ("json", "arrow")}
    for rig in rigs.values():
        rig.write(per_device=1)
        rig.write_arrow(b"gw-0", DEVICES[:5], ts=1)
        rig.write_arrow(b"gw-1", DEVICES[5:], ts=1)
        rig.write(per_device=1, start_ts=2)
        for _ in range(3):
            rig.pipeline.run_once()
    as_json = [json.loads(m.value) for m in rigs["json"].broker.messages("out")]
    out = rigs["arrow"].broker.messages("out")
    batches = [m for m in out if m.headers == [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)]]
    assert [m.key for m in batches] == [b"gw-0", b"gw-1"]
    singles = [json.loads(m.value) for m in out if not m.headers]
    assert len(singles) == 16 and all(m.key == m_json["device_id"].encode() for m, m_json in
                                      zip([m for m in out if not m.headers], singles))
    rows = arrow_rows(batches)
    assert [r["device_id"] for r in rows] == DEVICES
    expected = {(o["device_id"], o["ts"]): o for o in as_json}
    assert len(expected) == 24
    for row in rows + singles:
        want = expected.pop((row["device_id"], row["ts"]))
        assert row["forecast"] == want["forecast"]  # float32 both ways: the same numbers
        assert (row["anomaly_score"], row["is_anomaly"], row["model_version"]) == (
            want["anomaly_score"], want["is_anomaly"], want["model_version"])
        assert row["residual"] == want["residual"]
    assert not expected
    assert rigs["arrow"].pipeline.summary.readings == 24


def test_arrow_batch_output_leaves_replayed_batch_messages_out(tmp_path):
    rig = Rig(tmp_path, checkpoint_readings=10_000, batch_output="arrow")
    rig.write_arrow(b"gw-0", DEVICES)
    rig.write(per_device=1, start_ts=1)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.restart()  # replays everything from the fresh checkpoint at 0, publishing nothing of it
    rig.write(per_device=1, start_ts=2)
    rig.write_arrow(b"gw-0", DEVICES, ts=3)
    for _ in range(3):
        rig.pipeline.run_once()
    assert rig.pipeline.summary.replayed == 16
    out = rig.broker.messages("out")
    batches = [m for m in out if m.headers]
    assert len(batches) == 2 and len(out) == 2 + 16
    assert [r["ts"] for r in arrow_rows(batches)] == [1_700_000_000.0] * 8 + [1_700_000_003.0] * 8


def test_the_lag_series_of_a_revoked_partition_is_removed(tmp_path):
    registry = CollectorRegistry()
    rig = Rig(tmp_path, metrics=Metrics(registry))
    rig.write(per_device=2)
    rig.pipeline.run_once()
    rig.pipeline._last_lag = 0.0
    rig.pipeline._maybe_lag()
    lag = {p: registry.get_sample_value("streamer_consumer_lag", {"topic": "in", "partition": p}) for p in "01"}
    assert lag == {"0": 0, "1": 0}
    rig.consumer.rebalance(revoked=[P0])
    rig.pipeline.run_once()
    rig.pipeline._last_lag = 0.0
    rig.pipeline._maybe_lag()
    assert registry.get_sample_value("streamer_consumer_lag", {"topic": "in", "partition": "0"}) is None
    assert registry.get_sample_value("streamer_consumer_lag", {"topic": "in", "partition": "1"}) == 0


def test_a_revocation_outside_the_loops_poll_commits_nothing(tmp_path):
    """consumer.close revokes too; a commit from inside it would never return (librdkafka holds
    it until the callback returns): only revocations inside the loop's poll settle and commit."""
    rig = Rig(tmp_path, checkpoint_readings=10_000, commit_interval_ms=60_000)
    for t in range(2):
        rig.write(per_device=1, start_ts=t)
        rig.pipeline.run_once()
    mark = rig.mark()
    rig.consumer._apply("revoked", [P0, P1])  # as consumer.close does, on the loop's thread
    assert "commit" not in rig.since(mark) and committed(rig) == {P0: None, P1: None}


def test_the_loop_by_itself_writes_every_partition_due_one_after_another(tmp_path):
    # Both partitions fall due in one batch; the writer takes one at a time, and the loop's own
    # turns hand it the other once the first is written (no test helper pumping it).
    rig = Rig(tmp_path, checkpoint_readings=3)
    rig.write(per_device=1)
    mark = len(rig.broker.journal)
    deadline = time.monotonic() + 10
    owned = rig.pipeline.partitions.owned
    while any(owned[tp].checkpoint_offset != end for tp, end in rig.ends().items()):
        assert time.monotonic() < deadline, {tp: o.checkpoint_offset for tp, o in owned.items()}
        rig.pipeline.run_once()
    saved = [e[1:] for e in rig.broker.journal[mark:] if e[0] == "checkpoint"]
    assert sorted(saved) == sorted((tp.partition, end) for tp, end in rig.ends().items())


@pytest.mark.parametrize("exactly_once", [False, True])
def test_predictions_that_are_not_finite_are_dead_lettered_and_their_devices_start_afresh(tmp_path, exactly_once):
    # Predictions that come out NaN or inf for some devices (no JSON for them; the engine resets
    # such devices itself, tests/test_engine.py): each message with such a reading is dead-lettered
    # as read (prediction_not_finite), a batch message whole, and the loop goes on, everything else
    # published and committed.
    rig = Rig(tmp_path, exactly_once=exactly_once, batch_output="arrow")
    engine = rig.pipeline.engine
    step = engine.step
    overflowing = {"dev-3", "dev-6"}

    def step_overflowing(batch, now=None):
        predictions, report = step(batch, now)
        for i, device_id in enumerate(predictions.device_ids):
            if device_id in overflowing:
                predictions.forecast[i] = np.inf if device_id == "dev-3" else np.nan
        return predictions, report

    engine.step = step_overflowing  # type: ignore[method-assign]
    rig.write(per_device=2)  # 16 JSON readings, two of dev-3 and two of dev-6
    rig.write_arrow(b"gw-0", DEVICES[4:8], ts=5)  # holds dev-6: refused whole
    rig.write_arrow(b"gw-1", DEVICES[:3], ts=5)
    for _ in range(3):
        rig.pipeline.run_once()
    out = rig.broker.messages("out")
    singles = [json.loads(m.value)["device_id"] for m in out if not m.headers]
    assert sorted(singles) == sorted(d for d in DEVICES for _ in range(2) if d not in overflowing)
    batches = [m for m in out if m.headers]
    assert [m.key for m in batches] == [b"gw-1"] and [r["device_id"] for r in arrow_rows(batches)] == DEVICES[:3]
    letters = rig.broker.messages("dlq")
    reasons = Counter((m.key, dict(m.headers)["streamer.reason"]) for m in letters)
    assert reasons == {(b"dev-3", b"prediction_not_finite"): 2, (b"dev-6", b"prediction_not_finite"): 2,
                       (b"gw-0", b"prediction_not_finite"): 1}
    inputs = {(m.partition, m.offset): m for p in (0, 1) for m in rig.broker.topics["in"][p]}
    for letter in letters:
        headers = dict(letter.headers)
        source = inputs[(int(headers["streamer.source.partition"]), int(headers["streamer.source.offset"]))]
        assert (letter.key, letter.value) == (source.key, source.value)  # the message as read
        what = "forecast of device 'dev-3'" if letter.key == b"dev-3" else "forecast of device 'dev-6'"
        assert what in headers["streamer.error"].decode() and "overflowed" in headers["streamer.error"].decode()
    rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert rig.pipeline.summary.dead_letters == 5


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_poll_of_only_dead_letters_or_an_empty_batch_message_goes_on(tmp_path, exactly_once):
    # No reading at all in a batch: every message refused, or one batch message of no rows (which
    # gets its empty reply under batch_output = arrow). Committed, nothing else published.
    rig = Rig(tmp_path, exactly_once=exactly_once, batch_output="arrow")
    rig.write(per_device=0, bad=3)
    rig.pipeline.run_once()
    rig.write_arrow(b"gw-empty", [])
    for _ in range(3):  # the batch, then idle: settled and committed
        rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert [dict(m.headers)["streamer.reason"] for m in rig.broker.messages("dlq")] == [b"not_json"] * 3
    [reply] = rig.broker.messages("out")
    assert reply.key == b"gw-empty" and arrow_rows([reply]) == []
    assert rig.pipeline.summary.readings == 0 and rig.pipeline.summary.dead_letters == 3


def test_a_model_file_changed_while_it_is_read_is_read_again_and_a_bad_one_counted_once(tmp_path, monkeypatch, caplog):
    # A copy made in place: the check sees the file truncated, the read sees it written. What was
    # read is not taken for what the file now holds: read again at the next check, which fails
    # (not a model) once, and with the file unchanged since, no more reads.
    registry = CollectorRegistry()
    rig = Rig(tmp_path, metrics=Metrics(registry), reload_interval_s=0.01)
    reads: list[int] = []

    def written_while_read(path):
        if not reads:
            path.write_bytes(b"\x00 this is no longer a model")
        reads.append(len(path.read_bytes()))
        return load_model_file(path)

    monkeypatch.setattr("streamer.pipeline.load_model_file", written_while_read)
    caplog.set_level(logging.INFO, logger="streamer.pipeline")
    rig.model_path.write_bytes(b"")
    for _ in range(6):  # seen, read (written meanwhile); seen again, read; then unchanged
        time.sleep(0.02)
        rig.pipeline.run_once()
    assert reads == [27, 27]
    assert registry.get_sample_value("streamer_model_reloads_total", {"outcome": "failed"}) == 1
    changed_again, failed = [r for r in caplog.records if r.name == "streamer.pipeline"]
    assert (changed_again.levelname, failed.levelname) == ("INFO", "ERROR")
    assert "changed again while it was read" in changed_again.getMessage()
    assert rig.pipeline.engine.model_version == "v1"
    rig.write(per_device=1)
    for _ in range(2):  # the batch, then its settling
        rig.pipeline.run_once()
    assert {json.loads(m.value)["model_version"] for m in rig.broker.messages("out")} == {"v1"}


def test_a_model_file_is_read_once_it_has_stayed_the_same_for_a_while(tmp_path, monkeypatch):
    # Seen truncated at one check, written before the next: read once, as written, at the check
    # that finds it as the one before it did.
    registry = CollectorRegistry()
    rig = Rig(tmp_path, metrics=Metrics(registry), reload_interval_s=0.01)
    reads: list[int] = []

    def noted(path):
        reads.append(len(path.read_bytes()))
        return load_model_file(path)

    monkeypatch.setattr("streamer.pipeline.load_model_file", noted)
    config = ModelConfig(2, 8, 1, 2)
    rig.model_path.write_bytes(b"")
    time.sleep(0.02)
    rig.pipeline.run_once()
    save_model_file(rig.model_path, init_random_model(config, seed=4), config, "v2")
    for _ in range(4):
        time.sleep(0.02)
        rig.pipeline.run_once()
    assert reads == [rig.model_path.stat().st_size]
    assert registry.get_sample_value("streamer_model_reloads_total", {"outcome": "failed"}) == 0
    assert registry.get_sample_value("streamer_model_reloads_total", {"outcome": "loaded"}) == 1
    assert rig.pipeline.engine.model_version == "v2"


def test_a_crafted_model_file_at_a_hot_reload_is_refused_and_the_old_model_serves_on(tmp_path):
    # Sizes and numbers torch cannot take (TypeError, OverflowError where a check expected
    # RuntimeError) had left run_once: the loop ended at the reload.
    registry = CollectorRegistry()
    rig = Rig(tmp_path, metrics=Metrics(registry), reload_interval_s=0.01)
    good = ModelConfig(2, 8, 1, 2).to_dict()
    crafted = [
        {**good, "input_size": 2**70, "output_size": 2**70},
        good,  # with a normalisation of an int past float64, below
    ]
    for i, config in enumerate(crafted):
        payload = {"config": config, "state_dict": init_random_model(ModelConfig(2, 8, 1, 2)).state_dict(),
                   "version": f"crafted-{i}"}
        if i == 1:
            payload["normalization"] = {"mean": [10**400, 0], "std": [1.0, 1.0]}
        torch.save(payload, rig.model_path)
        for _ in range(4):  # seen, settled, read
            time.sleep(0.02)
            rig.pipeline.run_once()
        assert registry.get_sample_value("streamer_model_reloads_total", {"outcome": "failed"}) == i + 1
    rig.write(per_device=1)
    for _ in range(2):
        rig.pipeline.run_once()
    assert {json.loads(m.value)["model_version"] for m in rig.broker.messages("out")} == {"v1"}


def test_a_model_switch_waits_for_the_partitions_an_aborted_transaction_left_to_recover(tmp_path, caplog):
    # The switch checkpoints the partitions owned; an abort had just sent the batch's partitions
    # back to recovery, and switched in that turn, their recovery refused the checkpoint of the
    # model before and started their devices from zero.
    registry = CollectorRegistry()
    rig = Rig(tmp_path, exactly_once=True, checkpoint_readings=10_000, reload_interval_s=0.01,
              metrics=Metrics(registry))
    rig.write(per_device=3)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.write(per_device=1, start_ts=3)
    config = ModelConfig(2, 8, 1, 2)  # the same shape: devices carry their state over
    save_model_file(rig.model_path, init_random_model(config, seed=7), config, "v2")
    watcher = rig.pipeline.model_watcher
    watcher._next_check = 0
    assert not watcher.changed()  # seen; reported once it has settled
    time.sleep(0.02)
    watcher._next_check = 0
    rig.broker.fail("commit_transaction", KafkaClientError("aborted"))
    with caplog.at_level(logging.INFO, logger="streamer.pipeline"):
        for _ in range(5):
            rig.pipeline.run_once()
    waits = [r for r in caplog.records if "the switch waits until" in r.getMessage()]
    assert len(waits) == 1, [r.getMessage() for r in caplog.records]
    assert rig.pipeline.engine.model_version == "v2"
    recoveries = {o: registry.get_sample_value("streamer_partition_recoveries_total", {"outcome": o})
                  for o in ("checkpoint", "no_checkpoint")}
    assert recoveries == {"checkpoint": 2, "no_checkpoint": 0}  # replayed under v1, then switched
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(4)})


def test_a_model_file_replaced_while_the_service_started_is_served_at_the_first_check(tmp_path):
    # run_service loads the model, then waits for the brokers, then builds the loop: the watcher
    # took the file as it found it then, so a file replaced meanwhile was never read.
    rig = Rig(tmp_path, reload_interval_s=0.01)
    config = ModelConfig(2, 8, 1, 2)
    engine = Engine.build(load_model_file(rig.model_path), capacity=rig.capacity, device="cpu")
    save_model_file(rig.model_path, init_random_model(config, seed=5), config, "v2")
    pipeline = Pipeline(rig.settings, engine, MemoryConsumer(rig.broker, "g2"), rig.new_producer(),
                        store=JournaledStore(rig.broker, tmp_path / "cp2", "g2"), producer_factory=rig.new_producer)
    pipeline.subscribe()
    for _ in range(4):
        time.sleep(0.02)
        pipeline.run_once()
    assert pipeline.engine.model_version == "v2"


def test_a_model_file_renamed_into_place_with_the_old_ones_mtime_and_size_is_noticed(tmp_path):
    # Builds that fix every file's mtime (SOURCE_DATE_EPOCH), `cp -p`, `touch -r`: the same mtime
    # and size had hidden the new file for good. A rename changes the inode and the ctime.
    import os

    from streamer.pipeline import ModelWatcher

    path, new = tmp_path / "m.pt", tmp_path / "m.pt.new"
    path.write_bytes(b"a" * 100)
    watcher = ModelWatcher(path, 0.001)
    new.write_bytes(b"b" * 100)
    st = path.stat()
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    assert (path.stat().st_mtime_ns, path.stat().st_size) == (st.st_mtime_ns, st.st_size)
    seen = []
    for _ in range(4):
        time.sleep(0.01)
        seen.append(watcher.changed())
    assert seen.count(True) == 1


def test_a_restart_under_a_model_of_the_same_config_but_another_normalisation_starts_devices_afresh(tmp_path):
    # Rows hold forecasts and statistics in the normalisation's units: a hot reload resets the
    # table for a new one, and a restart had carried the old model's rows over (the checkpoint's
    # stamp held the version and config, not the normalisation).
    from streamer.model import Normalization

    rig = Rig(tmp_path)
    rig.write(per_device=3)
    for _ in range(3):
        rig.pipeline.run_once()
    assert len(rig.pipeline.engine.table) == len(DEVICES)
    config = ModelConfig(2, 8, 1, 2)
    normalization = Normalization(torch.tensor([100.0, 100.0]), torch.tensor([10.0, 10.0]))
    save_model_file(rig.model_path, init_random_model(config, seed=3), config, "v2", normalization)
    rig.restart()
    assert len(rig.pipeline.engine.table) == 0  # nothing carried over from v1's rows
    rig.write(per_device=1, start_ts=3)
    for _ in range(2):
        rig.pipeline.run_once()
    outputs = [json.loads(m.value) for m in rig.broker.messages("out")][-len(DEVICES):]
    assert {o["model_version"] for o in outputs} == {"v2"} and all(o["residual"] == 0.0 for o in outputs)


def test_a_checkpoint_store_that_cannot_be_read_keeps_a_partition_waiting_not_the_loop(tmp_path, monkeypatch, caplog):
    # P0 assigned again while its checkpoint directory cannot be listed (a lost mount): P0 waits,
    # paused, with one line, and P1 goes on; once the directory reads again P0 is recovered from
    # its checkpoint and every reading is published once.
    import errno
    from pathlib import Path

    monkeypatch.setattr("streamer.pipeline.STORE_RETRY_S", 0.0, raising=False)
    caplog.set_level(logging.INFO, logger="streamer.pipeline")
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.consumer.rebalance(revoked=[P0], assigned=[P0])
    listdir = Path.iterdir

    def unreadable(path):
        if path.is_relative_to(tmp_path / "cp"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return listdir(path)

    monkeypatch.setattr(Path, "iterdir", unreadable)
    rig.write(per_device=1, start_ts=1)
    for _ in range(4):
        rig.pipeline.run_once()
    assert P0 in rig.pipeline.partitions.pending and P0 not in rig.pipeline.partitions.owned
    assert committed(rig)[P1] == rig.ends()[P1]  # the other partition went on
    waiting = [r for r in caplog.records if "checkpoint store cannot be read" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelname == "WARNING" and "Input/output error" in waiting[0].getMessage()
    monkeypatch.setattr(Path, "iterdir", listdir)
    for _ in range(4):
        rig.pipeline.run_once()
    assert committed(rig) == rig.ends()
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(2)})
    again = [r.getMessage() for r in caplog.records if "checkpoint store read again" in r.getMessage()]
    assert len(again) == 1 and again[0].endswith(": 1 partition recovered"), again


def test_a_partition_whose_checkpoint_cannot_be_read_for_a_while_keeps_only_itself_waiting(tmp_path, monkeypatch):
    # P0's checkpoint read times out (a changelog call waits 30 s): P1, recovered after it, had
    # waited as long, and P0 was tried again every turn. Now P1 goes on, and P0 is retried each
    # STORE_RETRY_S until it is recovered.
    from streamer.kafka.abstract import BrokerTimeout

    rig = Rig(tmp_path)
    rig.write(per_device=2)
    for _ in range(3):
        rig.pipeline.run_once()
    store = rig.pipeline.partitions.store
    load_latest, tried = store.load_latest, []

    def p0_times_out(topic, partition, *args, **kwargs):
        tried.append(partition)
        if partition == 0 and len(tried) < 4:
            raise BrokerTimeout("reading the changelog: its end not reached in 30s")
        return load_latest(topic, partition, *args, **kwargs)

    monkeypatch.setattr(store, "load_latest", p0_times_out)
    beats = []
    rig.pipeline.partitions.progress = lambda: beats.append(len(tried))
    rig.consumer.rebalance(lost=[P0, P1])
    rig.consumer.rebalance(assigned=[P0, P1])
    rig.write(per_device=1, start_ts=2)
    for _ in range(4):
        rig.pipeline.run_once()
    assert tried == [0, 1] and rig.pipeline.partitions.owned.keys() == {P1}
    assert beats == [1, 2]  # a liveness beat after each try, the failed one too
    assert committed(rig)[P1] == rig.ends()[P1]
    monkeypatch.setattr("streamer.pipeline.STORE_RETRY_S", 0.0)
    rig.pipeline._store_retry_at = 0.0
    for _ in range(6):
        rig.pipeline.run_once()
    assert tried == [0, 1, 0, 0] and rig.pipeline.partitions.owned.keys() == {P0, P1}
    assert committed(rig) == rig.ends()
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(3)})


def test_a_partition_whose_recovery_fails_slowly_leaves_the_next_turn_to_the_others(tmp_path, monkeypatch):
    # A turn ends once RECOVERY_TURN_S is up: with P0's read failing after the whole turn's time,
    # every turn had tried P0 alone, first in the same order, and P1 was never recovered.
    import streamer.partitions as partitions_module
    from streamer.kafka.abstract import BrokerTimeout

    monkeypatch.setattr(partitions_module, "RECOVERY_TURN_S", 0.0)
    monkeypatch.setattr("streamer.pipeline.STORE_RETRY_S", 0.0)
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    store = rig.pipeline.partitions.store
    load_latest, tried = store.load_latest, []

    def p0_fails(topic, partition, *args, **kwargs):
        tried.append(partition)
        if partition == 0:
            raise BrokerTimeout("reading the changelog: its end not reached in 30s")
        return load_latest(topic, partition, *args, **kwargs)

    monkeypatch.setattr(store, "load_latest", p0_fails)
    rig.consumer.rebalance(lost=[P0, P1])
    rig.consumer.rebalance(assigned=[P0, P1])
    for _ in range(4):
        rig.pipeline._store_retry_at = 0.0
        rig.pipeline.run_once()
    assert tried[:2] == [0, 1] and rig.pipeline.partitions.owned.keys() == {P1}
    assert rig.pipeline.partitions.pending == {P0}


def test_committed_offsets_refused_as_the_group_rebalances_at_recovery_are_asked_again(tmp_path, caplog):
    # The coordinator may answer a fetch of committed offsets with a rebalance in progress (or an
    # unknown member) while the group moves: that is no reason to end the run, as GroupMovedOn
    # (final for a commit, not retriable) had. The partitions wait, paused, and are recovered.
    # The brokers answered: one line says the recovery waits for the rebalance, no outage.
    caplog.set_level(logging.INFO)
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.consumer.rebalance(revoked=[P0])
    rig.pipeline.run_once()
    rig.consumer.rebalance(assigned=[P0])
    rig.broker.fail("committed", GroupMovedOn("fetching committed offsets: Broker: Group rebalance in progress"),
                    times=2)
    rig.write(per_device=1, start_ts=1)
    rig.pipeline.run_once()
    assert rig.pipeline.partitions.pending == {P0} and P0 not in rig.pipeline.partitions.owned
    for _ in range(4):
        rig.pipeline._store_retry_at = 0.0  # a retry interval later
        rig.pipeline.run_once()
    assert rig.pipeline.partitions.owned.keys() == {P0, P1}
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(2)})
    said = [r.getMessage() for r in caplog.records if "rebalance" in r.getMessage()]
    assert said == ["recovering partitions wait for the group's rebalance (fetching committed offsets: Broker: "
                    "Group rebalance in progress)"], said
    assert not any("unreachable" in r.getMessage() for r in caplog.records)


def test_partitions_recovered_past_a_turns_time_wait_for_the_next_turn_after_a_poll(tmp_path, monkeypatch):
    # Dozens of partitions recovered from the Kafka store in one go kept the loop from polling for
    # minutes: the group's rebalance waited on this member (and past max.poll.interval.ms it
    # would leave the group). A turn recovers at least one, then stops once RECOVERY_TURN_S is up.
    import streamer.partitions as partitions_module

    monkeypatch.setattr(partitions_module, "RECOVERY_TURN_S", 0.0)
    rig = Rig(tmp_path)
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.consumer.rebalance(revoked=[P0, P1])
    rig.pipeline.run_once()
    rig.consumer.rebalance(assigned=[P0, P1])
    polls = []
    poll = rig.consumer.poll

    def counted(timeout_s, max_records):
        polls.append(sorted(rig.pipeline.partitions.owned))
        return poll(timeout_s, max_records)

    rig.consumer.poll = counted  # type: ignore[method-assign]
    rig.pipeline.run_once()
    assert rig.pipeline.partitions.owned.keys() == {P0} and rig.pipeline.partitions.pending == {P1}
    rig.pipeline.run_once()
    assert rig.pipeline.partitions.owned.keys() == {P0, P1} and not rig.pipeline.partitions.pending
    assert [P0] in polls  # a poll between the two recoveries
    rig.write(per_device=1, start_ts=1)
    for _ in range(3):
        rig.pipeline.run_once()
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(2)})


def test_each_partition_recovered_or_checkpointed_on_its_way_out_is_a_liveness_beat(tmp_path):
    # Dozens of big partitions recovered or saved in one rebalance take minutes with the Kafka
    # store: the loop beat only once it was through, and /healthz went stale meanwhile.
    rig = Rig(tmp_path)
    beats = []
    rig.pipeline.partitions.progress = lambda: beats.append(sorted(rig.pipeline.partitions.owned))
    rig.write(per_device=1)
    for _ in range(3):
        rig.pipeline.run_once()
    rig.consumer.rebalance(revoked=[P0, P1])
    rig.pipeline.run_once()
    assert beats == [[P1], []]  # after P0's checkpoint, then P1's
    rig.consumer.rebalance(assigned=[P0, P1])
    rig.pipeline.run_once()
    assert beats[2:] == [[P0], [P0, P1]]


def test_waiting_for_a_broker_outside_the_poll_is_live_not_ready_and_counted_away(tmp_path, monkeypatch):
    # What the service's successor of an aborted transaction's producer calls while it waits.
    from types import SimpleNamespace

    from streamer import metrics
    from streamer.metrics import Health

    clock = SimpleNamespace(now=100.0, time=time.time)
    clock.monotonic = lambda: clock.now  # health's clock: moved by the test, not by the host's load
    monkeypatch.setattr(metrics, "time", clock)
    registry = CollectorRegistry()
    rig = Rig(tmp_path, exactly_once=True, metrics=Metrics(registry))
    rig.pipeline.health = health = Health(stale_after_s=0.2)
    rig.pipeline.run_once()
    assert health.readiness()[0] and registry.get_sample_value("streamer_broker_reachable") == 1
    clock.now += 0.3  # the loop's last beat is stale
    assert not health.status()[0]
    rig.pipeline.waiting_for_broker("no broker answers the new transactional producer")
    assert health.status()[0] and not health.readiness()[0]
    assert "no broker answers" in health.readiness()[1]
    assert registry.get_sample_value("streamer_broker_reachable") == 0


def test_a_seek_refused_for_a_while_at_recovery_is_tried_again(tmp_path, monkeypatch):
    # confluent-kafka refuses a seek of a partition it has not taken up yet (a chaos run, right
    # after an assignment): retriable, the partition waits and is recovered STORE_RETRY_S later.
    monkeypatch.setattr("streamer.pipeline.STORE_RETRY_S", 0.0)
    rig = Rig(tmp_path, exactly_once=True)
    rig.write(per_device=1)
    for _ in range(2):
        rig.pipeline.run_once()
    rig.consumer.rebalance(revoked=[P0], assigned=[P0])
    rig.broker.fail("seek", KafkaClientError("seek in[0]: Local: Erroneous state", retriable=True))
    rig.write(per_device=1, start_ts=1)
    for _ in range(4):
        rig.pipeline.run_once()
    assert P0 in rig.pipeline.partitions.owned and not rig.pipeline.partitions.pending
    assert committed(rig) == rig.ends()
    assert rig.outputs() == Counter({(d, 1_700_000_000 + t): 1 for d in DEVICES for t in range(2)})


def _kafka_store_pipeline(tmp_path, broker: MemoryBroker, exactly_once: bool, max_records: int,
                          made: list | None = None) -> Pipeline:
    """A pipeline with the Kafka checkpoint store over ``broker`` (topic "in", 2 partitions), its
    producers made by a factory (noted in ``made``)."""
    from streamer.checkpoint_kafka import KafkaCheckpointStore
    from streamer.kafka.memory import MemoryChangelog

    if not (tmp_path / "m1.pt").exists():
        config = ModelConfig(2, 8, 1, 2)
        save_model_file(tmp_path / "m1.pt", init_random_model(config, seed=3), config, "v1")
        save_model_file(tmp_path / "m2.pt", init_random_model(config, seed=4), config, "v2")
    settings = load_settings({
        "kafka": {"input_topic": "in", "output_topic": "out", "dead_letter_topic": "dlq", "group_id": "g",
                  "exactly_once": exactly_once},
        "model": {"path": tmp_path / "m1.pt", "device": "cpu", "reload_interval_s": 0},
        "checkpoint": {"directory": tmp_path / "cp", "interval_readings": 1_000_000},
        "batch": {"max_records": max_records, "max_wait_ms": 0}, "metrics": {"enabled": False},
        "run": {"status_interval_s": 0}})
    made = [] if made is None else made

    def factory() -> MemoryProducer:
        made.append(MemoryProducer(broker))
        return made[-1]

    pipeline = Pipeline(settings, Engine.build(load_model_file(tmp_path / "m1.pt"), capacity=100, device="cpu"),
                        MemoryConsumer(broker, "g"), factory(), store=KafkaCheckpointStore(MemoryChangelog(broker), "g"),
                        producer_factory=factory)
    pipeline.subscribe()
    return pipeline


def _write_all(broker: MemoryBroker, t: int) -> None:
    for d in DEVICES:
        broker.append("in", d.encode(), json.dumps({"device_id": d, "ts": 1_700_000_000 + t, "values": [1.0, t / 3]}).encode())


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_send_the_output_topic_refuses_for_good_ends_the_run_in_both_modes(tmp_path, exactly_once: bool):
    # Exactly-once had aborted, recovered and sent the batch again for ever, live and committing
    # nothing; at-least-once stops. Now both do, exactly-once after HOPELESS_ABORTS tries.
    broker = MemoryBroker()
    broker.create_topic("in", 2)
    made: list = []
    pipeline = _kafka_store_pipeline(tmp_path, broker, exactly_once, 100, made)
    _write_all(broker, 0)
    broker.rejected_topics.add("out")  # as a topic authorisation refusal: no retry helps
    with pytest.raises(PipelineError, match="transactions in a row aborted" if exactly_once else "sends of this batch"):
        for _ in range(30):
            pipeline.run_once()
    assert not broker.committed and pipeline.summary.aborted_batches == (pipeline_module.HOPELESS_ABORTS if exactly_once else 0)


class Switch:
    """A model watcher whose file changed, once, to ``path``."""

    def __init__(self, path) -> None:
        self.path, self.fired = path, False

    def changed(self) -> bool:
        fired, self.fired = self.fired, True
        return not fired

    def unchanged(self) -> bool:
        return True


def test_exactly_once_a_model_switch_waits_for_the_replay_after_an_aborted_transaction(tmp_path):
    # Switched mid-replay, the rest of the replay (readings published under v1) ran under v2: every
    # later prediction of the partition depended on whether a transaction had been aborted.
    broker = MemoryBroker()
    broker.create_topic("in", 2)
    pipeline = _kafka_store_pipeline(tmp_path, broker, True, 4)
    for t in range(6):
        _write_all(broker, t)
    for _ in range(20):
        pipeline.run_once()
    _write_all(broker, 6)
    broker.fail("commit_transaction", KafkaClientError("coordinator fenced"))
    for _ in range(3):  # aborted, recovered, one batch of the replay
        pipeline.run_once()
    assert pipeline.partitions.replaying()
    pipeline.model_watcher = Switch(tmp_path / "m2.pt")
    switched_while_replaying = False
    for _ in range(30):
        replaying = pipeline.partitions.replaying()
        pipeline._maybe_reload_model()
        switched_while_replaying |= bool(replaying) and pipeline.engine.model_version == "v2"
        pipeline.run_once()
    assert pipeline.engine.model_version == "v2" and not switched_while_replaying
    published = Counter((m["device_id"], m["ts"]) for m in (json.loads(r.value) for r in broker.messages("out")))
    assert len(published) == 56 and set(published.values()) == {1}  # each reading once


def test_a_run_ending_by_its_duration_is_not_ready_while_it_settles_and_checkpoints(tmp_path):
    # A stop sets the event that readiness watches; run.duration_s passing sets nothing, and the
    # service read ready while it settled, checkpointed and closed.
    from streamer.metrics import Health

    rig = Rig(tmp_path)
    run = rig.settings.run.model_copy(update={"duration_s": 0.05})
    rig.pipeline.settings = rig.settings.model_copy(update={"run": run})
    stop = threading.Event()
    rig.pipeline.health = health = Health(60.0, stopping=stop)
    rig.write(per_device=2)
    seen = []
    checkpoint_all = rig.pipeline.partitions.checkpoint_all

    def checkpointing():
        seen.append(health.readiness())
        checkpoint_all()

    rig.pipeline.partitions.checkpoint_all = checkpointing
    summary = rig.pipeline.run(stop)
    assert summary.readings == 2 * len(DEVICES) and not stop.is_set()
    assert seen == [(False, "stopping: the batch in hand is finished, checkpointed and committed")]
    assert health.status()[0]  # live: it is closing, not stuck


class TwoModels:
    """Models v1 and v2 of one config, one input partition of device "d" on the memory broker, and
    processes of group "g" made by the test (``process``), each serving what the model file
    ``path`` holds then (v1 first), partitions assigned by the test alone."""

    VALUES = [[0.5, -1.0], [1.5, 0.3], [-0.7, 2.0], [0.9, 0.1], [1.1, -0.4]]

    def __init__(self, tmp_path, exactly_once: bool = False) -> None:
        config = ModelConfig(2, 8, 1, 2)
        for version, seed in (("v1", 1), ("v2", 2)):
            save_model_file(tmp_path / f"{version}.pt", init_random_model(config, seed=seed), config, version)
        self.tmp_path, self.path = tmp_path, tmp_path / "m.pt"
        self.path.write_bytes((tmp_path / "v1.pt").read_bytes())
        self.settings = load_settings({
            "kafka": {"input_topic": "in", "output_topic": "out", "dead_letter_topic": "dlq", "group_id": "g",
                      "commit_interval_ms": 0, "exactly_once": exactly_once},
            "model": {"path": self.path, "device": "cpu", "reload_interval_s": 3600},
            "checkpoint": {"directory": tmp_path / "cp", "interval_readings": 1000, "interval_s": 1e6},
            "batch": {"max_records": 50, "max_wait_ms": 0}, "metrics": {"enabled": False},
            "run": {"status_interval_s": 0},
        })
        self.broker = MemoryBroker()
        for topic in ("in", "out", "dlq"):
            self.broker.create_topic(topic, 1)

    def write(self, i: int) -> None:
        body = {"device_id": "d", "ts": 1_700_000_000 + i, "values": self.VALUES[i]}
        self.broker.append("in", b"d", json.dumps(body).encode())

    def process(self, name: str) -> tuple[Pipeline, MemoryConsumer]:
        consumer = MemoryConsumer(self.broker, "g")
        consumer._joined = True  # assigned by the test alone
        pipeline = Pipeline(self.settings, Engine.build(load_model_file(self.path), capacity=10, device="cpu"),
                            consumer, MemoryProducer(self.broker, name),
                            store=DirectoryCheckpointStore(self.tmp_path / "cp", "g"))
        pipeline.subscribe()
        return pipeline, consumer

    @staticmethod
    def run(pipeline: Pipeline, turns: int = 4) -> None:
        for _ in range(turns):
            pipeline.run_once()
            pipeline.partitions.settle_writes()

    def assert_last_from_zero_state_under_v1(self, caplog) -> None:
        """Reading 4's forecast is v1's from zero state: no reading v2 applied was replayed under v1."""
        [last] = [json.loads(m.value) for m in self.broker.messages("out") if json.loads(m.value)["ts"] == 1_700_000_004]
        fresh = Engine.build(load_model_file(self.tmp_path / "v1.pt"), capacity=10, device="cpu")
        alone, _ = fresh.step(ReadingBatch(["d"], np.array([1_700_000_004.0]),
                                           np.array([self.VALUES[4]], dtype=np.float32)))
        assert last["model_version"] == "v1"
        np.testing.assert_allclose(last["forecast"], alone.forecast[0], rtol=0, atol=1e-6)
        assert any("has no usable checkpoint: its devices start from zero at offset 4" in r.getMessage()
                   for r in caplog.records)


def test_a_checkpoint_taken_over_from_another_model_is_stamped_with_the_model_now_applying(tmp_path, caplog):
    # Two processes of a group serve different models for a while (the model file replaced: one
    # started after, the other has not reached its next reload check). The one on the new model
    # took over the old model's checkpoint (same config, nothing to replay) and wrote none of its
    # own; killed, its partition went back to the one on the old model, which replayed the new
    # model's readings under the old one (a reviewer's model-based checker, seed reproduced here).
    # Now that checkpoint is stamped at once: the old model refuses it and starts from zero state,
    # as the README says a process does without a checkpoint of its model.
    group = TwoModels(tmp_path)
    old, old_consumer = group.process("old")  # serves v1: readings 0 and 1, then the partition moves
    old_consumer.rebalance(assigned=[P0])
    group.write(0), group.write(1)
    group.run(old)
    old_consumer.rebalance(revoked=[P0])  # checkpointed at 2, under v1
    group.run(old, 1)
    group.path.write_bytes((tmp_path / "v2.pt").read_bytes())
    new, new_consumer = group.process("new")  # serves v2, takes the partition and v1's checkpoint
    new_consumer.rebalance(assigned=[P0])
    group.run(new)
    group.write(2), group.write(3)
    group.run(new)  # readings 2 and 3 applied by v2, committed; then the process dies, nothing closed
    caplog.set_level(logging.WARNING, logger="streamer.partitions")
    old_consumer.rebalance(assigned=[P0])  # back to the process still on v1
    group.run(old)
    group.write(4)
    group.run(old)
    group.assert_last_from_zero_state_under_v1(caplog)


@pytest.mark.parametrize("exactly_once", [False, True])
def test_a_switch_whose_checkpoint_the_store_failed_is_not_replayed_across(tmp_path, caplog, exactly_once: bool):
    # A process switched from v1 to v2 and the store failed at the switch: the partition's newest
    # checkpoint was v1's, from before it. The process died; the partition went to one still on v1
    # (its reload check not yet come), which took that checkpoint and replayed under v1 the
    # readings v2 had applied (the case the README had left open). Now every commit says which
    # model applied the readings before it, and since which offset: that process starts from
    # zero state instead, as the README says one does without a checkpoint of its model.
    group = TwoModels(tmp_path, exactly_once)
    first, first_consumer = group.process("first")
    later, later_consumer = group.process("later")  # on v1 throughout
    first_consumer.rebalance(assigned=[P0])
    group.write(0), group.write(1)
    group.run(first)  # readings 0 and 1 applied by v1, committed; checkpoint at 0 (the partition's first)
    store = first.partitions.store
    save = store.save

    def failing(checkpoint):
        raise OSError("injected: the store is away")

    store.save = failing
    first.model_watcher = Switch(tmp_path / "v2.pt")
    first._maybe_reload_model()  # the switch at offset 2; its checkpoint fails
    assert first.engine.model_version == "v2"
    store.save = save
    group.write(2), group.write(3)
    group.run(first)  # readings 2 and 3 applied by v2, committed; then the process dies, nothing closed
    assert store.offsets("in", 0) == [0]  # only v1's, from before the switch
    caplog.set_level(logging.WARNING, logger="streamer.partitions")
    first_consumer.assigned.clear()
    later_consumer.rebalance(assigned=[P0])
    group.run(later)
    group.write(4)
    group.run(later)
    group.assert_last_from_zero_state_under_v1(caplog)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("were applied under another model than v1" in m for m in refusals), refusals

