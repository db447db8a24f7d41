#!/usr/bin/env python3
"""`make demo`: the whole product on a local broker, for a bounded time, then a report.

Starts a Kafka broker (deploy/kafka/local-kafka, or the one KAFKA_BOOTSTRAP_SERVERS names),
creates the topics, trains a small model on simulated history, runs `streamer run` and
`streamer simulate` side by side while printing a live line from /metrics, then reads the
predictions back: a few samples, and how many injected anomalies were flagged. Stops what it
started, also on Ctrl-C.

Environment: DEMO_DEVICES (500), DEMO_RATE readings/s (2000), DEMO_SECONDS of simulation (30).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from streamer.kafka import ensure_topics  # noqa: E402

DEVICES = int(os.environ.get("DEMO_DEVICES", "500"))
RATE = float(os.environ.get("DEMO_RATE", "2000"))
SECONDS = float(os.environ.get("DEMO_SECONDS", "30"))
PARTITIONS = 6
TOPICS = {"input": "demo-readings", "output": "demo-predictions", "dlq": "demo-dead-letters"}


WARMUP = 30  # readings a device needs before it is scored (anomaly.warmup)

def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_broker(work: Path) -> tuple[str, dict | None]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return os.environ["KAFKA_BOOTSTRAP_SERVERS"], None
    env = {**os.environ, "KAFKA_PORT": "auto", "KAFKA_STATE_DIR": str(work / "kafka")}
    say("starting a local Kafka broker (the first run downloads the broker jars with Maven)")
    result = subprocess.run([str(REPO / "deploy/kafka/local-kafka"), "start"], env=env, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit("[demo] the local Kafka broker did not start")
    return result.stdout.strip().splitlines()[-1], env


def streamer(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamer", *args]


def scrape(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    values: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] += float(value)
    return values


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        consumer.seek_to_beginning()
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def report(predictions: list, labels_path: Path) -> None:
    flagged = {}
    bodies = [json.loads(record.value) for record in predictions]
    for body in bodies:
        flagged[(body["device_id"], body["ts"])] = body["is_anomaly"]
    # The last readings of a few devices, and the latest flagged one.
    samples = bodies[-4:] + [b for b in bodies if b["is_anomaly"]][-1:]
    say("some predictions from the output topic:")
    for body in samples:
        forecast = ", ".join(f"{v:.3f}" for v in body["forecast"])
        print(f"    {body['device_id']} ts={body['ts']:.3f} forecast=[{forecast}] "
              f"score={body['anomaly_score']:.2f} anomaly={body['is_anomaly']} model={body['model_version']}")
    # An injected anomaly is an event: consecutive labelled readings of one device.
    events: dict[tuple[str, int], bool] = {}
    labelled = set()
    last_step: dict[str, tuple[int, int]] = {}
    for line in labels_path.read_text().splitlines():
        label = json.loads(line)
        device, step = label["device_id"], label["step"]
        labelled.add((device, label["ts"]))
        start = last_step[device][1] if device in last_step and last_step[device][0] == step - 1 else step
        last_step[device] = (step, start)
        events[(device, start)] = events.get((device, start), False) or flagged.get((device, label["ts"]), False)
    detected = sum(events.values())
    # A device is scored from its WARMUP-th residual on: events before that cannot be caught.
    scored_events = {key: hit for key, hit in events.items() if key[1] > WARMUP}
    scored_detected = sum(scored_events.values())
    false_alarms = sum(1 for key, is_anomaly in flagged.items() if is_anomaly and key not in labelled)
    total_flags = sum(flagged.values())
    say(f"injected anomalies: {len(events)} events ({len(labelled)} readings); flagged: {detected} of the events "
        f"({100 * detected / max(1, len(events)):.0f}%); of the {len(scored_events)} events after a device's "
        f"warm-up ({WARMUP} readings): {scored_detected} ({100 * scored_detected / max(1, len(scored_events)):.0f}%)")
    say(f"readings flagged: {total_flags}, of which {false_alarms} outside any injected anomaly "
        f"({100 * false_alarms / max(1, len(flagged)):.2f}% of all readings)")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="streamer-demo-"))
    procs: list[subprocess.Popen] = []
    broker_env = None
    try:
        bootstrap, broker_env = start_broker(work)
        say(f"broker at {bootstrap}")
        ensure_topics(bootstrap, {TOPICS["input"]: PARTITIONS, TOPICS["output"]: PARTITIONS, TOPICS["dlq"]: 1})

        model = work / "model.pt"
        say("training a small LSTM on simulated history")
        subprocess.run(streamer("train", "--out", str(model), "--devices", "200", "--history", "1000",
                                "--time-budget", "40"), check=True)

        metrics_port = free_port()
        run_env = {
            **os.environ,
            "STREAMER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "STREAMER_KAFKA__INPUT_TOPIC": TOPICS["input"],
            "STREAMER_KAFKA__OUTPUT_TOPIC": TOPICS["output"],
            "STREAMER_KAFKA__DEAD_LETTER_TOPIC": TOPICS["dlq"],
            "STREAMER_KAFKA__GROUP_ID": "demo",
            "STREAMER_MODEL__PATH": str(model),
            "STREAMER_CHECKPOINT__DIRECTORY": str(work / "checkpoints"),
            "STREAMER_METRICS__PORT": str(metrics_port),
            "STREAMER_RUN__STATUS_INTERVAL_S": "0",
            "STREAMER_ANOMALY__WARMUP": str(WARMUP),
        }
        run_log = open(work / "run.log", "w")
        runner = subprocess.Popen(streamer("run"), env=run_env, stdout=run_log, stderr=subprocess.STDOUT)
        procs.append(runner)
        labels = work / "labels.jsonl"
        say(f"simulating {DEVICES} sensors at {RATE:.0f} readings/s for {SECONDS:.0f}s; "
            f"metrics at http://127.0.0.1:{metrics_port}/metrics")
        simulator = subprocess.Popen(
            streamer("simulate", "--kafka-bootstrap-servers", bootstrap, "--topic", TOPICS["input"], "--devices", str(DEVICES),
                     "--rate", str(RATE), "--duration", str(SECONDS), "--labels", str(labels), "--seed", "7"),
            stdout=subprocess.PIPE, text=True)
        procs.append(simulator)
        # A few malformed messages, to show the dead-letter topic at work.
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for key, value in [(b"sensor-00001", b"{oops"), (b"sensor-00002", b'{"device_id": "sensor-00002", "ts": 1}'),
                           (b"sensor-00003", b'{"device_id": "sensor-00003", "ts": 1, "values": [NaN]}')]:
            producer.send(TOPICS["input"], key=key, value=value)
        producer.flush()
        producer.close()

        last, last_t = 0.0, time.monotonic()
        while simulator.poll() is None:
            time.sleep(5)
            m, now = scrape(metrics_port), time.monotonic()
            readings = m.get("streamer_readings_total", 0.0)
            say(f"live: {(readings - last) / (now - last_t):7.0f} readings/s | {int(m.get('streamer_active_devices', 0))} "
                f"devices | {int(m.get('streamer_predictions_total', 0))} predictions | {int(m.get('streamer_anomalies_total', 0))} anomalies flagged | "
                f"{int(m.get('streamer_dead_letters_total', 0))} dead letters | lag {int(m.get('streamer_consumer_lag', 0))}")
            last, last_t = readings, now
            if runner.poll() is not None:
                raise SystemExit(f"[demo] streamer run exited early ({runner.returncode}); see {work / 'run.log'}")
        sim_out = simulator.stdout.read()
        if simulator.returncode != 0:
            raise SystemExit("[demo] the simulator failed")
        simulated = json.loads(sim_out.strip().splitlines()[-1])["simulated"]["readings"]
        deadline = time.monotonic() + 60
        while scrape(metrics_port).get("streamer_readings_total", 0) < simulated and time.monotonic() < deadline:
            time.sleep(0.5)
        runner.send_signal(signal.SIGTERM)
        code = runner.wait(timeout=60)
        say(f"streamer run stopped with exit code {code}")
        predictions = read_all(bootstrap, TOPICS["output"], simulated, timeout_s=60)
        say(f"{simulated} readings simulated, {len(predictions)} predictions on {TOPICS['output']}")
        report(predictions, labels)
        return 0 if code == 0 and len(predictions) >= simulated else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if broker_env is not None:
            subprocess.run([str(REPO / "deploy/kafka/local-kafka"), "stop"], env=broker_env)


if __name__ == "__main__":
    sys.exit(main())
