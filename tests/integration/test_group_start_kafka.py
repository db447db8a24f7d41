"""Three members of one group starting at once all get partitions (issue 7, item 7), on each client.

kafka-python 3.0.12 can leave a member outside its group after a start-up race (a lost SyncGroup
reply); streamer's MembershipWatch forces it back in. Each start runs the consumers the way the run
loop does (short polls, the client's group watch checked after each, where it has one) and must
see every member assigned. confluent-kafka (librdkafka) has no such watch and needs none.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from streamer.kafka import open_consumer
from streamer.kafka.abstract import RebalanceHooks
from streamer.kafka.clients import OUTSIDE_GROUP_SESSIONS
from streamer.pipeline import IDLE_POLL_MS
from streamer.settings import KafkaSettings
from tests.integration.helpers import create_topic

pytestmark = pytest.mark.kafka

MEMBERS, PARTITIONS, STARTS = 3, 6, 10
SESSION_TIMEOUT_MS = 6000  # the least allowed: the watch's grace period is two of them
ASSIGNED_WITHIN_S = 30.0


def lose_first_sync_reply(consumer) -> None:
    """Makes the consumer's first JoinGroup/SyncGroup attempt never finish after its SyncGroup reply
    came, as when kafka-python 3.0.12 leaves the reply unprocessed: generation known, state
    rebalancing, heartbeats off, the attempt cached in ``_join_task`` for good."""
    coordinator = consumer._coordinator
    original = coordinator._do_join_and_sync_async
    calls = []

    async def attempt():
        result = await original()
        if not calls:
            calls.append(1)
            await coordinator._manager._net.sleep(3600)
        return result

    coordinator._do_join_and_sync_async = attempt


def start_group(
    bootstrap: str, topic: str, group: str, stuck: int | None = None, watched: bool = True
) -> tuple[list[int], int, float]:
    """Start MEMBERS consumers at once; returns each one's partition count once all are assigned
    (or at the deadline), the rejoins the watches forced, and the seconds it took. ``stuck``: a
    member whose first SyncGroup reply is lost."""
    settings = KafkaSettings(
        bootstrap_servers=bootstrap, input_topic=topic, group_id=group, session_timeout_ms=SESSION_TIMEOUT_MS,
        auto_offset_reset="earliest", client=os.environ["STREAMER_KAFKA__CLIENT"],  # set by the kafka_client fixture
    )
    barrier = threading.Barrier(MEMBERS)
    stop = threading.Event()
    counts = [0] * MEMBERS
    rejoins = [0] * MEMBERS
    errors: list[BaseException] = []

    def member(i: int) -> None:
        try:
            consumer = open_consumer(settings, max_poll_records=100)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            return
        if i == stuck:
            lose_first_sync_reply(consumer.client)
        watch = consumer.group_watch(OUTSIDE_GROUP_SESSIONS * SESSION_TIMEOUT_MS / 1000)
        nothing = lambda partitions: None  # noqa: E731
        try:
            barrier.wait(timeout=60)
            consumer.subscribe([topic], RebalanceHooks(nothing, nothing, nothing))
            while not stop.is_set():
                consumer.poll(IDLE_POLL_MS / 1000, 100)
                if watched and watch is not None:
                    watch.check()
                counts[i] = len(consumer.assignment())
                rejoins[i] = getattr(watch, "rejoins", 0)
        except BaseException as exc:
            errors.append(exc)
        finally:
            consumer.close(5.0)

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(MEMBERS)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while time.monotonic() - started < ASSIGNED_WITHIN_S and not errors:
        if all(counts) and sum(counts) == PARTITIONS:
            break
        time.sleep(0.1)
    took = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    return list(counts), sum(rejoins), took


def test_members_starting_at_once_all_get_partitions(kafka_bootstrap, unique):
    topic = f"group-start-{unique}"
    create_topic(kafka_bootstrap, topic, PARTITIONS)
    t0 = time.monotonic()
    outcomes = []
    for start in range(STARTS):
        counts, rejoins, took = start_group(kafka_bootstrap, topic, f"group-start-{unique}-{start}")
        outcomes.append((counts, rejoins, round(took, 1)))
        assert all(counts) and sum(counts) == PARTITIONS, f"start {start}: partitions per member {counts}; so far {outcomes}"
    print(f"{STARTS} starts in {time.monotonic() - t0:.0f}s (counts, forced rejoins, seconds): {outcomes}")


def test_a_member_whose_sync_reply_was_lost_is_brought_back(kafka_bootstrap, unique, kafka_client):
    if kafka_client != "kafka-python":
        pytest.skip("the lost SyncGroup reply is kafka-python 3.0.12's; librdkafka's group membership has no such path")
    topic = f"group-lost-sync-{unique}"
    create_topic(kafka_bootstrap, topic, PARTITIONS)
    counts, rejoins, took = start_group(kafka_bootstrap, topic, f"group-lost-sync-{unique}", stuck=0)
    assert all(counts) and sum(counts) == PARTITIONS, f"partitions per member {counts} after {took:.1f}s"
    assert rejoins >= 1
