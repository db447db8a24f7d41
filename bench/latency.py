#!/usr/bin/env python3
"""Latency from event time to the prediction's acknowledgement, at half the measured max rate,
default settings, from `streamer simulate` through the real broker: one JSON object per figure.

1. max rate: `streamer simulate --rate 0` writes LATENCY_READINGS (100000) readings of 5000
   devices to a topic of 6 partitions; the run loop (default settings, model of hidden 64 x 2
   layers on the CPU) reads them all: readings/s from its first message to its last.
2. latency: on a fresh topic the run loop runs in a thread while `streamer simulate --rate R/2
   --duration LATENCY_SECONDS (20)` writes to it; every prediction's latency is what the loop
   measures for streamer_latency_seconds (acknowledged at minus the reading's ts, the
   simulator's emission time), taken here per prediction, not from the histogram's buckets.
   The first LATENCY_WARMUP_S (3) seconds are left out. Each latency is also split in two: its
   batch's time in the loop (from decoding to the acknowledgement seen, and the commit when one
   went with it: streamer_batch_seconds) and the time before it. What run.malloc_keep_mb is
   about: minor_page_faults, the process's while the simulator wrote, and max_rss_mib, its peak
   resident memory; of the steps after the warm-up (steps, step_max_ms), steps_faulting counts
   those whose thread faulted 256 pages (1 MiB of 4 KiB pages) or more in (faults_in_steps: all
   the steps' faults), and the median time per reading of those against the others', among the
   steps of 1,000 readings or more.
Figures: latency_max_rate (readings/s), latency (p50/p90/p99/max ms, the achieved input rate), at
half the max rate and at LATENCY_ALSO_AT (10000 and 0.37) readings/s. At 0.37 (a reading every
2.7 s, for at least 30 s) the topic is quiet between readings: the loop then asks the broker for
its partitions' ends every second (lag and readiness), and a reading that comes meanwhile waits;
2.7 s is no multiple of that second, so the readings come at every point of it.
LATENCY_RATES (comma-separated readings/s) runs those rates alone instead, the max rate left
unmeasured: for comparing two trees at one load.
KAFKA_BOOTSTRAP_SERVERS uses a running broker; else deploy/kafka/local-kafka is started on
free ports and stopped afterwards. LATENCY_CLIENT picks kafka.client (default: the setting's).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from kafka_clients import close_loop, emit, first_messages_at, open_loop, start_broker, stop_broker  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from streamer.engine import PredictionBatch, ReadingBatch, StepReport  # noqa: E402
from streamer.kafka import ensure_topics  # noqa: E402
from streamer.metrics import Metrics  # noqa: E402
from streamer.model import ModelConfig, init_random_model, save_model_file  # noqa: E402
from streamer.settings import Settings, load_settings  # noqa: E402

READINGS = int(os.environ.get("LATENCY_READINGS", "100000"))
SECONDS = float(os.environ.get("LATENCY_SECONDS", "20"))
WARMUP_S = float(os.environ.get("LATENCY_WARMUP_S", "3"))
CLIENT = os.environ.get("LATENCY_CLIENT")
# Also at these rates, for a view of latency under a lighter load. The simulator writes through
# the same client library as the loop (kafka.client); on a small host it shares the CPUs with the
# broker and the loop, so the max rate is the loop's alone and half of it a heavy load.
ALSO_AT = [float(r) for r in os.environ.get("LATENCY_ALSO_AT", "10000,0.37").split(",") if r.strip()]
ONLY_AT = [float(r) for r in os.environ.get("LATENCY_RATES", "").split(",") if r.strip()]
DEVICES, PARTITIONS, HIDDEN, LAYERS = 5000, 6, 64, 2


def _rounded(rate: float) -> float:
    return round(rate) if rate >= 100 else round(rate, 2)


def seconds_at(rate: float) -> float:
    """How long the simulator writes at ``rate``: enough readings for a percentile below 1/s."""
    return SECONDS if rate >= 1 else max(SECONDS, 30.0)


class LatencyTaken(Metrics):
    """The streamer's metrics, keeping each batch's per-prediction latencies (seconds), its time
    in the loop (streamer_batch_seconds) and when it was accounted for."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.taken: list[tuple[float, np.ndarray, float]] = []

    def on_batch(self, **figures) -> None:  # type: ignore[override]
        latencies = np.asarray(figures["latencies"], dtype=np.float64)
        self.taken.append((time.monotonic(), latencies, figures["batch_seconds"]))
        super().on_batch(**figures)


def settings_for(bootstrap: str, topic: str, model_path: Path, checkpoints: Path) -> Settings:
    """Default settings but for where things are."""
    kafka = {"bootstrap_servers": bootstrap, "input_topic": topic, "output_topic": f"{topic}-out",
             "dead_letter_topic": f"{topic}-dlq", "group_id": f"latency-{uuid.uuid4().hex[:6]}"}
    if CLIENT:
        kafka["client"] = CLIENT
    return load_settings({
        "kafka": kafka,
        "model": {"path": model_path, "device": "cpu"},
        "state": {"capacity": 2 * DEVICES},
        "checkpoint": {"directory": checkpoints},
        "metrics": {"enabled": False},
        "run": {"status_interval_s": 0},
    })


def simulate(bootstrap: str, topic: str, rate: float, *limit: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", "simulate", "--kafka-bootstrap-servers", bootstrap, "--topic", topic,
         "--devices", str(DEVICES), "--features", "1", "--rate", str(rate), "--progress-interval", "3600", *limit],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def max_rate(bootstrap: str, work: Path, model_path: Path) -> float:
    topic = f"latency-max-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: PARTITIONS, f"{topic}-out": PARTITIONS, f"{topic}-dlq": 1})
    filled = simulate(bootstrap, topic, 0, "--max-readings", str(READINGS))
    _, err = filled.communicate(timeout=900)
    if filled.returncode != 0:
        sys.exit(f"streamer simulate failed:\n{err[-3000:]}")
    pipeline = open_loop(settings_for(bootstrap, topic, model_path, work / "cp-max"))
    first = first_messages_at(pipeline)  # the first batch's own processing counts, its wait for data not
    pipeline.subscribe()
    pipeline.prepare_process()  # as Pipeline.run does
    stop = threading.Event()
    while pipeline.summary.readings < READINGS:
        pipeline.run_once(stop)
    seconds = time.perf_counter() - first[0]
    close_loop(pipeline)
    gc.unfreeze()
    return READINGS / seconds


def latency(bootstrap: str, work: Path, model_path: Path, rate: float) -> dict[str, float]:
    topic = f"latency-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: PARTITIONS, f"{topic}-out": PARTITIONS, f"{topic}-dlq": 1})
    metrics = LatencyTaken(CollectorRegistry())
    pipeline = open_loop(settings_for(bootstrap, topic, model_path, work / "cp-latency"), metrics)
    # Each step: when, readings, seconds, and the minor page faults of the loop's thread (one torch
    # thread by default: the step's own).
    steps: list[tuple[float, int, float, int]] = []
    step = pipeline.engine.step

    def counted(batch: ReadingBatch, now: float | None = None) -> tuple[PredictionBatch, StepReport]:
        faults0, started0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.perf_counter()
        out = step(batch, now)
        steps.append((time.monotonic(), len(batch), time.perf_counter() - started0,
                      resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults0))
        return out

    pipeline.engine.step = counted  # type: ignore[method-assign]
    stop = threading.Event()
    runner = threading.Thread(target=pipeline.run, args=(stop,), daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while len(pipeline.partitions.owned) < PARTITIONS and time.monotonic() < deadline:
        time.sleep(0.05)  # every partition assigned and recovered before the first reading is sent
    started = time.monotonic()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sim = simulate(bootstrap, topic, rate, "--duration", str(seconds_at(rate)))
    out, err = sim.communicate(timeout=seconds_at(rate) + 300)
    if sim.returncode != 0:
        sys.exit(f"streamer simulate failed:\n{err[-3000:]}")
    simulated = json.loads(out.strip().splitlines()[-1])["simulated"]  # its own count and time, start-up left out
    time.sleep(1.0)  # the last batches acknowledged
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    stop.set()
    runner.join(60)
    close_loop(pipeline)
    taken = [(lat, in_loop) for at, lat, in_loop in metrics.taken if at - started >= WARMUP_S]
    all_ms = np.concatenate([lat for lat, _ in taken]) * 1000 if taken else np.zeros(0)
    # Each prediction's latency in two parts: its batch's time in the loop (decode, step,
    # produce, the next poll, the acknowledgement), and the time before (simulator, broker, fetch).
    loop_ms = np.concatenate([np.full(len(lat), in_loop) for lat, in_loop in taken]) * 1000 if taken else np.zeros(0)
    readings = pipeline.summary.readings

    def pct(ms: np.ndarray, q: float) -> float | None:  # None (JSON null) for no values
        return round(float(np.percentile(ms, q)), 1) if ms.size else None

    # Steps that faulted 256 pages or more in (1 MiB of 4 KiB pages); the time per reading of
    # those and of the others, among the steps of 1,000 readings or more (small steps cost more
    # per reading either way).
    measured = [(n, s, f) for at, n, s, f in steps if at - started >= WARMUP_S]
    faulting = np.array([s / n * 1e6 for n, s, f in measured if f >= 256 and n >= 1000])
    others = np.array([s / n * 1e6 for n, s, f in measured if f < 256 and n >= 1000])

    return {
        "readings": readings, "predictions_measured": int(all_ms.size),
        "input_readings_per_s": _rounded(simulated["readings"] / simulated["seconds"]),
        "p50_ms": pct(all_ms, 50), "p90_ms": pct(all_ms, 90), "p99_ms": pct(all_ms, 99), "max_ms": round(float(all_ms.max()), 1),
        "in_loop_p50_ms": pct(loop_ms, 50), "in_loop_p99_ms": pct(loop_ms, 99),
        "before_loop_p50_ms": pct(all_ms - loop_ms, 50), "before_loop_p99_ms": pct(all_ms - loop_ms, 99),
        "minor_page_faults": faults, "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "steps": len(measured), "steps_faulting": sum(f >= 256 for _, _, f in measured),
        "faults_in_steps": int(sum(f for _, _, f in measured)),
        "faulting_step_us_per_reading_p50": pct(faulting, 50), "other_step_us_per_reading_p50": pct(others, 50),
        "step_max_ms": round(max(s for _, s, _ in measured) * 1e3, 1) if measured else None,
    }


def main() -> None:
    bootstrap, broker_env = start_broker()
    work = Path(tempfile.mkdtemp(prefix="streamer-bench-latency-"))
    try:
        model_path = work / "model.pt"
        config = ModelConfig(1, HIDDEN, LAYERS, 1)
        save_model_file(model_path, init_random_model(config, seed=0), config, "bench")
        client = settings_for(bootstrap, "x", model_path, work).kafka.client
        top = None
        if not ONLY_AT:
            top = max_rate(bootstrap, work, model_path)
            emit(figure="latency_max_rate", client=client, readings=READINGS, readings_per_s=round(top))
        for rate in ONLY_AT or (top / 2, *ALSO_AT):
            figures = latency(bootstrap, work, model_path, rate)
            emit(figure="latency", client=client, target_readings_per_s=_rounded(rate), half_max=top is not None and rate == top / 2,
                 seconds=seconds_at(rate), warmup_s=WARMUP_S, **figures, goal_p99_ms=50)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        stop_broker(broker_env)


if __name__ == "__main__":
    main()
