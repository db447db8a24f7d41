"""Chaos: three `streamer run` processes in one group, killed, scaled and starved of their broker.

>= 200k readings from 5k devices over 12 partitions, produced while the group runs; kill -9 of a
random process three times at random points, scale 1 -> 3 -> 1, one broker restart. Afterwards
every reading has a prediction (at-least-once) or exactly one committed prediction
(exactly-once), and every prediction equals the no-fault reference.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamer.engine import Engine, ReadingBatch
from streamer.kafka import ensure_topics
from streamer.model import ModelConfig, init_random_model, load_model_file, save_model_file
from tests.integration.conftest import LOCAL_KAFKA

pytestmark = [pytest.mark.kafka, pytest.mark.chaos]

DEVICES = 5000
READINGS_PER_DEVICE = 40  # 200k readings
PARTITIONS = 12
PRODUCE_SECONDS = 50.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def own_broker(tmp_path):
    """A broker this test may restart (the session's may be shared or external)."""
    env = {**os.environ, "KAFKA_PORT": "auto", "KAFKA_STATE_DIR": str(tmp_path / "kafka")}
    started = subprocess.run([str(LOCAL_KAFKA), "start"], env=env, capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, started.stderr[-3000:]
    bootstrap = started.stdout.strip().splitlines()[-1]

    def restart() -> None:
        subprocess.run([str(LOCAL_KAFKA), "stop"], env=env, capture_output=True, timeout=120, check=True)
        time.sleep(2.0)
        again = subprocess.run([str(LOCAL_KAFKA), "start"], env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]

    yield bootstrap, restart
    subprocess.run([str(LOCAL_KAFKA), "clean"], env=env, capture_output=True, timeout=120)


class Fleet:
    """The group's processes; keeps its own log of what happened to them."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[int, subprocess.Popen] = {}
        self.started = 0
        self.events: list[str] = []

    def start(self, instance: str | None = None) -> None:
        """Start a process; ``instance`` names the one it replaces (a supervisor restarting a pod)."""
        self.started += 1
        instance = instance or f"instance-{self.started}"
        log = open(self.logs / f"run-{self.started}.log", "w")
        env = {**self.env, "STREAMER_KAFKA__INSTANCE_ID": instance}
        proc = subprocess.Popen([sys.executable, "-m", "streamer", "run"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
        proc.instance = instance
        self.procs[self.started] = proc
        self.events.append(f"start #{self.started} ({instance})")

    def alive(self) -> list[int]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def kill9(self, rng: random.Random) -> str:
        """kill -9 a random live process; returns its instance name."""
        victim = rng.choice(self.alive())
        self.procs[victim].send_signal(signal.SIGKILL)
        self.procs[victim].wait()
        self.events.append(f"kill -9 #{victim}")
        return self.procs[victim].instance

    def terminate(self, n: int, timeout: float = 60.0) -> int:
        proc = self.procs[n]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=timeout)
        self.events.append(f"SIGTERM #{n} -> {code}")
        return code

    def crashed_numbers(self) -> list[int]:
        """Processes that exited on their own with an error (not killed by us)."""
        return [n for n, p in self.procs.items() if p.returncode not in (None, 0, -signal.SIGKILL)]

    def crashed(self) -> list[str]:
        return [f"#{n}: {self.procs[n].returncode}" for n in self.crashed_numbers()]


def produce_slowly(bootstrap: str, topic: str, values: np.ndarray, stop: threading.Event) -> None:
    """Reading t of every device, round after round, spread over PRODUCE_SECONDS."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all", retries=2**31 - 1,
                             delivery_timeout_ms=300_000, batch_size=256 * 1024)
    started = time.monotonic()
    for t in range(READINGS_PER_DEVICE):
        for d in range(DEVICES):
            device = f"dev-{d:05d}"
            body = {"device_id": device, "ts": 1_700_000_000.0 + t, "values": [float(values[d, t])]}
            producer.send(topic, key=device.encode(), value=json.dumps(body).encode())
        producer.flush()
        ahead = started + PRODUCE_SECONDS * (t + 1) / READINGS_PER_DEVICE - time.monotonic()
        if ahead > 0 and stop.wait(ahead):
            break
    producer.close()


def read_positions(bootstrap: str, topic: str) -> dict[tuple[str, float], tuple[int, int]]:
    """(device_id, ts) -> (partition, offset) of every reading on the input topic."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    end = consumer.end_offsets(partitions)
    positions = {}
    while any(consumer.position(tp) < end[tp] for tp in partitions):
        for batch in consumer.poll(timeout_ms=500, max_records=10000).values():
            for r in batch:
                body = json.loads(r.value)
                positions[(body["device_id"], body["ts"])] = (r.partition, r.offset)
    consumer.close()
    return positions


def ranges(offsets: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'"""
    out, start, prev = [], None, None
    for o in sorted(offsets) + [None]:
        if start is None:
            start = prev = o
        elif o is not None and o == prev + 1:
            prev = o
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = o
    return ", ".join(out)


def read_outputs(bootstrap: str, topic: str, committed_only: bool) -> list[dict]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             isolation_level="read_committed" if committed_only else "read_uncommitted")
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    end = consumer.end_offsets(partitions)
    out = []
    deadline = time.monotonic() + 120
    while any(consumer.position(tp) < end[tp] for tp in partitions) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500, max_records=10000).values():
            out.extend(json.loads(r.value) for r in batch)
    consumer.close()
    return out


def reference(model_path: Path, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """No-fault forecasts and scores: all devices streamed in one engine, reading by reading."""
    engine = Engine.build(load_model_file(model_path), capacity=DEVICES, device="cpu")
    ids = [f"dev-{d:05d}" for d in range(DEVICES)]
    forecasts = np.zeros((DEVICES, READINGS_PER_DEVICE), np.float32)
    scores = np.zeros((DEVICES, READINGS_PER_DEVICE), np.float32)
    for t in range(READINGS_PER_DEVICE):
        preds, _ = engine.step(ReadingBatch(ids, np.zeros(DEVICES), values[:, t : t + 1]), now=0.0)
        forecasts[:, t] = preds.forecast[:, 0]
        scores[:, t] = preds.anomaly_score
    return forecasts, scores


# The Kafka checkpoint store runs on one client only (confluent-kafka, the faster one), to keep the
# added time to two runs; the directory store runs on both.
KAFKA_STORE_CLIENT = "confluent-kafka"


@pytest.mark.parametrize("store", ["directory", "kafka"])
@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_chaos(own_broker, tmp_path: Path, exactly_once: bool, store: str, kafka_client: str):
    if store == "kafka" and kafka_client != KAFKA_STORE_CLIENT:
        pytest.skip(f"the Kafka checkpoint store's chaos run is on {KAFKA_STORE_CLIENT} only")
    bootstrap, restart_broker = own_broker
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (CHAOS_SEED={seed} repeats it)")
    topics = {"in": "readings", "out": "predictions", "dlq": "dead-letters"}
    ensure_topics(bootstrap, {topics["in"]: PARTITIONS, topics["out"]: PARTITIONS, topics["dlq"]: 1})
    config = ModelConfig(1, 16, 2, 1)
    model_path = tmp_path / "model.pt"
    save_model_file(model_path, init_random_model(config, seed=1), config, "chaos-v1")
    values = np.random.default_rng(seed).normal(size=(DEVICES, READINGS_PER_DEVICE)).astype(np.float32)
    env = {
        **os.environ,
        "STREAMER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "STREAMER_KAFKA__INPUT_TOPIC": topics["in"],
        "STREAMER_KAFKA__OUTPUT_TOPIC": topics["out"],
        "STREAMER_KAFKA__DEAD_LETTER_TOPIC": topics["dlq"],
        "STREAMER_KAFKA__GROUP_ID": "chaos",
        "STREAMER_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "STREAMER_KAFKA__EXACTLY_ONCE": str(exactly_once).lower(),
        "STREAMER_MODEL__PATH": str(model_path),
        "STREAMER_MODEL__DEVICE": "cpu",
        "STREAMER_CHECKPOINT__DIRECTORY": str(tmp_path / "checkpoints"),
        "STREAMER_CHECKPOINT__INTERVAL_S": "3",
        "STREAMER_CHECKPOINT__STORE": store,
        "STREAMER_CHECKPOINT__TOPIC": "checkpoints",
        "STREAMER_BATCH__MAX_RECORDS": "2000",
        "STREAMER_STATE__CAPACITY": str(2 * DEVICES),
        "STREAMER_METRICS__ENABLED": "false",
        "STREAMER_RUN__STATUS_INTERVAL_S": "5",
    }
    fleet = Fleet(env, tmp_path)
    stop_producing = threading.Event()
    producer = threading.Thread(target=produce_slowly, args=(bootstrap, topics["in"], values, stop_producing))
    try:
        fleet.start()  # scale 1
        time.sleep(3)
        producer.start()
        # Chaos points: the three kills at random moments between the other events.
        kill_at = sorted(rng.uniform(8, 46) for _ in range(3))
        schedule = [(6.0, "scale to 3"), (24.0 + rng.uniform(-3, 3), "restart broker"), (50.0, "scale to 1")]
        schedule += [(t, "kill -9") for t in kill_at]
        started = time.monotonic()
        for at, action in sorted(schedule):
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            if action == "scale to 3":
                fleet.start()
                fleet.start()
            elif action == "restart broker":
                fleet.events.append("broker restart")
                restart_broker()
            elif action == "kill -9":
                fleet.start(fleet.kill9(rng))  # as a supervisor would restart it
            elif action == "scale to 1":
                for n in fleet.alive()[:-1]:
                    assert fleet.terminate(n) == 0
        producer.join(timeout=300)
        # Let the last process drain the topic, then stop it cleanly.
        expected = DEVICES * READINGS_PER_DEVICE
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            outputs = read_outputs(bootstrap, topics["out"], committed_only=exactly_once)
            if len({(o["device_id"], o["ts"]) for o in outputs}) >= expected:
                break
            time.sleep(3)
        for n in fleet.alive():
            assert fleet.terminate(n) == 0
        crashed = fleet.crashed()
    finally:
        stop_producing.set()
        for proc in fleet.procs.values():
            if proc.poll() is None:
                proc.kill()
    outputs = read_outputs(bootstrap, topics["out"], committed_only=exactly_once)

    ref_forecast, ref_score = reference(model_path, values)
    seen: dict[tuple[str, float], int] = {}
    max_error = max_score_error = 0.0
    for o in outputs:
        d, t = int(o["device_id"][4:]), int(round(o["ts"] - 1_700_000_000.0))
        seen[(o["device_id"], o["ts"])] = seen.get((o["device_id"], o["ts"]), 0) + 1
        max_error = max(max_error, abs(o["forecast"][0] - float(ref_forecast[d, t])))
        max_score_error = max(max_score_error, abs(o["anomaly_score"] - float(ref_score[d, t])))
    duplicates = len(outputs) - len(seen)
    missing = expected - len(seen)
    positions = read_positions(bootstrap, topics["in"])
    assert len(positions) == expected, f"the input topic holds {len(positions)} readings, not {expected}"
    for name, wrong in (("missing", lambda n: n == 0), ("duplicated", lambda n: n > 1)):
        found: dict[int, list[int]] = {}
        for key, (partition, offset) in positions.items():
            if wrong(seen.get(key, 0)):
                found.setdefault(partition, []).append(offset)
        if found:
            print(f"{name} input offsets: " + "; ".join(f"[{p}] {ranges(o)}" for p, o in sorted(found.items())))
    print(f"chaos {'exactly-once' if exactly_once else 'at-least-once'}, {store} store: events {fleet.events}")
    print(f"readings {expected}, predictions {len(outputs)}, duplicates {duplicates}, missing {missing}, "
          f"max error {max_error:.2e}, max score error {max_score_error:.2e}")
    # The crashed processes' own logs, the error line at their end (the others would push them out of sight).
    crashed_logs = "\n".join(f"--- run-{n}.log\n" + (tmp_path / f"run-{n}.log").read_text()[-4000:]
                              for n in fleet.crashed_numbers())
    assert not crashed, f"processes exited with errors: {crashed}\n{crashed_logs}"
    assert fleet.events.count("broker restart") == 1 and sum(e.startswith("kill -9") for e in fleet.events) == 3
    # Every process's last lines: where the ones left running were when the drain ran out.
    logs = "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(tmp_path.glob("run-*.log")))
    assert missing == 0, logs
    if exactly_once:
        assert duplicates == 0, logs
    assert max_error <= 1e-5
    assert max_score_error <= 1e-3
