"""MembershipWatch: a consumer stuck outside its group (kafka-python 3.0.12's lost SyncGroup reply)
is found after the grace period and made to rejoin; the loop's health fails while it stays out."""

from __future__ import annotations

import logging

from kafka.coordinator.base import Generation
from kafka.structs import MemberState, TopicPartition
from prometheus_client import CollectorRegistry

from streamer.kafka.clients import MembershipWatch
from streamer.metrics import Health, Metrics

TP = TopicPartition("in", 0)


class FakeCoordinator:
    """The attributes of kafka-python 3.0.12's coordinator that the watch reads, stuck as seen:
    the join attempt in flight (its reply lost), rebalancing, heartbeats off."""

    def __init__(self) -> None:
        self.state = MemberState.REBALANCING
        self._generation = Generation(3, "member-1", "cooperative-sticky")
        self._heartbeat_enabled = False
        self._join_task = object()
        self.rejoin_needed = False
        self.rejoin_requests = 0

    def settle(self) -> None:
        self.state, self._heartbeat_enabled = MemberState.STABLE, True

    def request_rejoin(self) -> None:
        self.rejoin_needed = True
        self.rejoin_requests += 1


class FakeConsumer:
    def __init__(self) -> None:
        self.topics = {"in"}
        self.assigned: set[TopicPartition] = set()
        self._coordinator = FakeCoordinator()

    def subscription(self):
        return self.topics or None

    def assignment(self):
        return self.assigned


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(grace_s: float = 20.0) -> tuple[MembershipWatch, FakeConsumer, Clock]:
    consumer, clock = FakeConsumer(), Clock()
    return MembershipWatch(consumer, grace_s, clock), consumer, clock


def test_fires_after_the_grace_period_not_before_and_forces_a_rejoin(caplog):
    w, consumer, clock = watch()
    coordinator = consumer._coordinator
    with caplog.at_level(logging.WARNING, logger="streamer.kafka.clients"):
        assert not w.check()  # first sight starts the clock
        clock.now += 19.9
        assert not w.check() and w.outside is None
        clock.now += 0.2
        assert w.check()
    assert coordinator.rejoin_requests == 1 and coordinator.rejoin_needed
    assert coordinator._join_task is None  # the stale attempt is dropped: the next poll sends a fresh JoinGroup
    assert w.outside is not None and "no partitions" in w.outside
    assert w.rejoins == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "outside its group" in warnings[0].getMessage()

    # Still out: the next forced rejoin only a grace period later.
    clock.now += 5
    assert not w.check() and w.outside is not None
    clock.now += 15.1
    assert w.check() and coordinator.rejoin_requests == 2

    # Back in: healthy again.
    consumer.assigned = {TP}
    coordinator.settle()
    assert not w.check() and w.outside is None


def test_never_fires_while_assigned():
    w, consumer, clock = watch()
    consumer.assigned = {TP}
    for _ in range(10):
        assert not w.check()
        clock.now += 10
    assert consumer._coordinator.rejoin_requests == 0


def test_never_fires_while_the_broker_is_away_and_restarts_the_clock_after():
    w, consumer, clock = watch()
    assert not w.check()
    for _ in range(10):
        clock.now += 10
        assert not w.check(broker_reachable=False)
    clock.now += 10
    assert not w.check(broker_reachable=True)  # the grace period starts again
    clock.now += 19
    assert not w.check()
    clock.now += 2
    assert w.check()


def test_a_settled_member_without_partitions_is_left_alone():
    """More members than partitions: a member in the generation, heartbeating, gets nothing."""
    w, consumer, clock = watch()
    consumer._coordinator.settle()
    for _ in range(10):
        assert not w.check()
        clock.now += 10
    assert consumer._coordinator.rejoin_requests == 0


def test_heartbeats_off_or_unknown_generation_count_as_outside():
    w, consumer, clock = watch()
    coordinator = consumer._coordinator
    coordinator.settle()
    coordinator._heartbeat_enabled = False  # stable on paper, heartbeats stopped
    w.check()
    clock.now += 21
    assert w.check()

    w, consumer, clock = watch()
    coordinator = consumer._coordinator
    coordinator.settle()
    coordinator._generation = Generation.NO_GENERATION
    w.check()
    clock.now += 21
    assert w.check()


def test_not_subscribed_never_fires():
    w, consumer, clock = watch()
    consumer.topics = set()
    w.check()
    clock.now += 100
    assert not w.check()


def test_pipeline_hook_fails_health_and_counts(tmp_path):
    from streamer.engine import Engine
    from streamer.kafka.kafka_python import KafkaPythonConsumer
    from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file
    from streamer.pipeline import Pipeline
    from streamer.settings import load_settings

    config = ModelConfig(2, 8, 1, 2)
    save_model_file(tmp_path / "m.pt", init_random_model(config, seed=1), config, "v1")
    settings = load_settings({"model": {"path": tmp_path / "m.pt", "device": "cpu"}, "checkpoint": {"enabled": False}})
    engine = Engine.build(load_model_file(tmp_path / "m.pt"), capacity=10, device="cpu")
    consumer = FakeConsumer()
    registry = CollectorRegistry()
    health = Health(60.0)
    health.beat()  # past start-up: the loop's first poll
    pipeline = Pipeline(settings, engine, KafkaPythonConsumer(consumer), producer=None, metrics=Metrics(registry), health=health)  # type: ignore[arg-type]
    clock = Clock()
    pipeline.membership.clock = clock
    assert pipeline.membership.grace_s == 2 * settings.kafka.session_timeout_ms / 1000

    pipeline._watch_membership()
    assert health.status() == (True, "ok")
    clock.now += pipeline.membership.grace_s + 1
    pipeline._watch_membership()
    ok, reason = health.status()
    assert not ok and "outside its group" in reason
    assert not health.readiness()[0]
    assert registry.get_sample_value("streamer_group_rejoins_forced_total") == 1

    consumer.assigned = {TP}
    pipeline._watch_membership()
    assert health.status() == (True, "ok")

    # While the broker is away it is not the member's fault: no rejoin, no failed liveness.
    consumer.assigned = set()
    pipeline._broker_answers = False
    clock.now += 1000
    pipeline._watch_membership()
    clock.now += 1000
    pipeline._watch_membership()
    assert health.status()[0]
    assert registry.get_sample_value("streamer_group_rejoins_forced_total") == 1


def test_only_kafka_python_has_a_membership_watch(tmp_path):
    """librdkafka runs group membership on its own threads: no lost-SyncGroup work-around there."""
    from streamer.kafka.confluent import ConfluentConsumer
    from streamer.kafka.kafka_python import KafkaPythonConsumer

    assert isinstance(KafkaPythonConsumer(FakeConsumer()).group_watch(20.0), MembershipWatch)  # type: ignore[arg-type]
    assert ConfluentConsumer(object(), "earliest", cooperative=True).group_watch(20.0) is None  # type: ignore[arg-type]
