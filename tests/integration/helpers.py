"""Reading and writing test topics on the real broker."""

from __future__ import annotations

import threading
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamer.kafka import ensure_topics


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    ensure_topics(bootstrap, {topic: partitions})


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None, list | None]]) -> None:
    """(key, value, headers) in order; waits for every acknowledgement."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=k, value=v, headers=h) for k, v, h in messages]
        producer.flush()
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()


def read_topic(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0, settle_s: float = 1.0,
    committed_only: bool = False,
) -> list:
    """Every record of ``topic`` from the beginning: waits for ``expected`` and then ``settle_s``
    more, so that a surplus (duplicates) would be seen too. ``committed_only``: read_committed."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed" if committed_only else "read_uncommitted",
    )
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while not partitions and time.monotonic() < deadline:  # None, or empty while being created
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                time.sleep(0.2)
        if not partitions:
            return []
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records: list = []
        settle_until = None
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            if len(records) >= expected:
                settle_until = settle_until or time.monotonic() + settle_s
                if time.monotonic() >= settle_until:
                    break
        return records
    finally:
        consumer.close()


def service_settings(bootstrap: str, topics: dict[str, str], group: str, model_path, checkpoints, **sections):
    """Settings for a test run of the service: topics {"in", "out", "dlq"}, CPU, no status lines,
    metrics off; ``sections`` override or add settings by section."""
    from streamer.settings import load_settings

    base: dict[str, dict] = {
        "kafka": {"bootstrap_servers": bootstrap, "input_topic": topics["in"], "output_topic": topics["out"],
                  "dead_letter_topic": topics["dlq"], "group_id": group},
        "batch": {"max_records": 64, "max_wait_ms": 20},
        "model": {"path": model_path, "device": "cpu"},
        "state": {"capacity": 1000},
        "checkpoint": {"directory": checkpoints},
        "metrics": {"enabled": False},
        "run": {"status_interval_s": 0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(base)


class ServiceThread:
    """streamer.service.run_service on a thread, with its own metrics registry.

    A service a test leaves running (an assertion failed before its stop) is stopped when the
    test ends (``stop_left_running``, from conftest), so that it does not go on beside the next
    tests: its client log handling is process-wide."""

    started: list[ServiceThread] = []

    def __init__(self, settings) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.stop_event = threading.Event()
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, args=(settings,), daemon=True)
        self.thread.start()
        ServiceThread.started.append(self)

    @classmethod
    def stop_left_running(cls, timeout_s: float = 60.0) -> None:
        while cls.started:
            service = cls.started.pop()
            service.stop_event.set()
            service.thread.join(timeout=timeout_s)

    def _run(self, settings) -> None:
        from streamer.service import run_service

        try:
            self.result["summary"] = run_service(settings, self.stop_event, self.registry)
        except BaseException as exc:  # surfaced by stop()
            self.result["error"] = exc

    def alive(self) -> bool:
        return self.thread.is_alive()

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0

    def stop(self, timeout_s: float = 60.0):
        """Stop the loop; returns its RunSummary, or raises what stopped it."""
        self.stop_event.set()
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), "the run loop did not stop"
        if "error" in self.result:
            raise self.result["error"]
        return self.result["summary"]
