#!/usr/bin/env python3
"""streamer's benchmark: one JSON object per figure on stdout.

Engine: device-steps/s of Engine.step for B distinct devices (one reading each) in
{1k, 16k, 131k}, and of the naive per-message loop (state in a dict, nn.LSTM on a batch of
one, as in the note), in the same process. End to end through a real broker: readings/s of
the streamer pipeline vs, over the same topic, a consume-only kafka-python loop and a
passthrough loop (consume, produce one message per reading, flush, commit; no model).

BENCH_READINGS (200000) sets the end-to-end size; KAFKA_BOOTSTRAP_SERVERS an existing broker
(else deploy/kafka/local-kafka is started on free ports and stopped afterwards).

The process keeps freed memory as `streamer run` has it kept (run.malloc_keep_mb, set before
anything is timed, the per-message loop included); BENCH_MALLOC_KEEP_MB=0 leaves glibc's
defaults. Here that changes no figure (two rounds of each, in turn): the figures before the
engine's free large blocks, which raises glibc's own limits; a process that steps large
batches first, under glibc's defaults, can fault pages in again at every step (streamer.malloc).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from kafka.structs import OffsetAndMetadata  # noqa: E402

from streamer.compiled import COMPILE_OPTIONS, lstm_cell  # noqa: E402
from streamer.engine import Engine, ReadingBatch, plan_waves  # noqa: E402
from streamer.kafka import ensure_topics  # noqa: E402
from streamer.malloc import retain_freed_memory  # noqa: E402
from streamer.model import ModelBundle, ModelConfig, init_random_model, save_model_file  # noqa: E402
from streamer.settings import RunSettings  # noqa: E402

HIDDEN, LAYERS, FEATURES = 64, 2, 1
E2E_READINGS = int(os.environ.get("BENCH_READINGS", "200000"))
E2E_DEVICES = 5000
E2E_PARTITIONS = 6
MALLOC_KEEP_MB = int(os.environ.get("BENCH_MALLOC_KEEP_MB", RunSettings.model_fields["malloc_keep_mb"].default))


def emit(**figure: object) -> None:
    print(json.dumps(figure), flush=True)


def timed(fn, min_seconds: float = 2.0, min_runs: int = 3) -> float:
    """Median seconds per call of fn() over enough runs to fill min_seconds."""
    fn()  # warm-up
    runs = []
    started = time.perf_counter()
    while len(runs) < min_runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return float(np.median(runs))


def naive_per_message(model: torch.nn.Module, rng: np.random.Generator) -> float:
    """Device-steps/s of the note's way: one dict of per-device states, nn.LSTM on a batch of
    one per reading (CPU)."""
    states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    n_devices, n_readings = 1000, 5000
    xs = torch.from_numpy(rng.normal(size=(n_readings, 1, 1, FEATURES)).astype(np.float32))

    def naive() -> None:
        with torch.inference_mode():
            for i in range(n_readings):
                key = f"d{i % n_devices}"
                _, hidden = model(xs[i], states.get(key))
                states[key] = hidden

    return n_readings / timed(naive, min_seconds=3.0)


def step_flops(hidden: int, layers: int, features: int) -> int:
    """Multiply-adds x 2 of one device-step: each layer's (input + H) x 4H projection, the head."""
    flops, inp = 0, features
    for _ in range(layers):
        flops += 2 * (inp + hidden) * 4 * hidden
        inp = hidden
    return flops + 2 * hidden * features


def cpu_ceiling(naive: float) -> dict[torch.dtype, float]:
    """The matrix units' bound on this CPU: GEMM GFLOP/s at the step's shapes (B = 4096 rows,
    K = input + H, N = 4H) in float32 and bfloat16, with torch's threads, and the device-steps/s
    they would allow if the projections were all a step did, as a multiple of the naive loop.
    Returns the GFLOP/s per dtype."""
    per_step = step_flops(HIDDEN, LAYERS, FEATURES)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(4096, HIDDEN + HIDDEN, dtype=dtype)
        b = torch.randn(HIDDEN + HIDDEN, 4 * HIDDEN, dtype=dtype)
        out = torch.empty(4096, 4 * HIDDEN, dtype=dtype)
        seconds = timed(lambda: torch.mm(a, b, out=out), min_seconds=1.0)
        gflops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds / 1e9
        ceiling = gflops * 1e9 / per_step
        emit(figure="cpu_gemm_ceiling", dtype=str(dtype).removeprefix("torch."), torch_threads=torch.get_num_threads(),
             gemm_gflops=round(gflops, 1), step_flops=per_step, ceiling_device_steps_per_s=round(ceiling),
             ceiling_vs_naive_per_message=round(ceiling / naive, 1))
        rates[dtype] = round(gflops, 1)
    return rates


def torch_lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lstm_cell's maths with torch's own sigmoid (an exponential and a division each, in
    Inductor's loops), as the compiled step had it before fast_tanh: the baseline of
    cpu_gate_ceiling."""
    i, fg, sg, o = (g.sigmoid() for g in gates.float().chunk(4, dim=1))
    c_next = fg * c + 2.0 * i * sg - i
    return c_next, o - 2.0 * o * torch.sigmoid(-2.0 * c_next)


def cpu_gate_ceiling(naive: float, bf16_gemm_gflops: float) -> None:
    """What the gate maths alone allow on this CPU: the compiled gate loops (streamer.compiled's
    lstm_cell: five tanh a hidden unit as fast_tanh's fractions, three divisions; no GEMM) over
    B = 4096 rows, timed with torch's threads, against the same loops with torch's sigmoid
    (torch_lstm_cell) in turn; with the bfloat16 GEMM at cpu_ceiling's rate added, the
    device-steps/s of a step that did nothing else, as a multiple of the naive loop. Skipped when
    torch.compile cannot build (no compiler)."""
    gates = torch.randn(4096, 4 * HIDDEN).bfloat16()
    c = torch.randn(4096, HIDDEN)
    try:
        compiled = {name: torch.compile(fn, fullgraph=True, options=COMPILE_OPTIONS)
                    for name, fn in (("fast_tanh", lstm_cell), ("torch_sigmoid", torch_lstm_cell))}
        for fn in compiled.values():
            fn(gates, c)
    except Exception as exc:  # no C++ compiler: the compiled step is not available either
        emit(figure="cpu_gate_ceiling", skipped=f"torch.compile failed: {type(exc).__name__}")
        return
    seconds = {name: float("inf") for name in compiled}
    for _ in range(2):  # in turn, the best of each
        for name, fn in compiled.items():
            seconds[name] = min(seconds[name], timed(lambda: fn(gates, c), min_seconds=1.0))
    for name, loop_seconds in seconds.items():
        per_row = LAYERS * loop_seconds / gates.shape[0] + step_flops(HIDDEN, LAYERS, FEATURES) / (bf16_gemm_gflops * 1e9)
        extra = {"vs_torch_sigmoid": round(seconds["torch_sigmoid"] / loop_seconds, 2)} if name == "fast_tanh" else {}
        # ns_per_sigmoid: the loop's whole time (conversions, products, stores too) per sigmoid or tanh.
        emit(figure="cpu_gate_ceiling", gates=name, torch_threads=torch.get_num_threads(), rows=gates.shape[0],
             gate_loop_us=round(loop_seconds * 1e6, 1),
             ns_per_sigmoid=round(loop_seconds / (gates.shape[0] * 5 * HIDDEN) * 1e9, 3), gemm_gflops=bf16_gemm_gflops,
             gates_only_device_steps_per_s=round(gates.shape[0] / (LAYERS * loop_seconds)),
             with_bf16_gemm_device_steps_per_s=round(1 / per_row), vs_naive_per_message=round(1 / per_row / naive, 1),
             **extra)


def bench_engine(device: str, naive: float) -> None:
    """Engine.step over B distinct devices, float32 and bfloat16 state, as a ratio of the
    per-message loop's device-steps/s (``naive``, measured in the same process). On the CPU also
    with model.compile (streamer.compiled), the eager and the compiled engine timed in turn, twice
    each (the best median of each counts), and their ratio."""
    config = ModelConfig(FEATURES, HIDDEN, LAYERS, FEATURES)
    bundle = ModelBundle(init_random_model(config, seed=0), config, "bench", None)
    rng = np.random.default_rng(0)
    variants = (False, True) if device == "cpu" else (False,)
    for state_dtype in (torch.float32, torch.bfloat16):
        for batch in (1024, 16384, 131072):
            ids = [f"d{i}" for i in range(batch)]
            values = rng.normal(size=(batch, FEATURES)).astype(np.float32)
            readings = ReadingBatch(ids, np.zeros(batch), values)
            engines = {c: Engine.build(bundle, capacity=batch, device=device, state_dtype=state_dtype, compile=c)
                       for c in variants}
            seconds = {c: float("inf") for c in variants}
            kernel_seconds = dict(seconds)
            plan = plan_waves(ids)
            for _ in range(2):
                for compiled, engine in engines.items():
                    seconds[compiled] = min(seconds[compiled], timed(lambda: engine.step(readings, now=0.0)))
                    # Without the CPU-side planning (waves, slots): gather, score, LSTM step, scatter.
                    slots = engine.table.acquire(plan.unique, now=0.0).slots
                    kernel_seconds[compiled] = min(kernel_seconds[compiled],
                                                   timed(lambda: engine._execute(plan, slots, values, readings.ts)))
            for compiled, engine in engines.items():
                extra = {"vs_eager": round(seconds[False] / seconds[True], 2)} if compiled else {}
                emit(figure="engine_step", device=str(engine.device), batch=batch, hidden=HIDDEN, layers=LAYERS,
                     state_dtype=str(state_dtype).removeprefix("torch."), fused=engine.lstm.fused, compiled=compiled,
                     torch_threads=torch.get_num_threads(),
                     device_steps_per_s=round(batch / seconds[compiled]), step_ms=round(seconds[compiled] * 1e3, 3),
                     kernel_device_steps_per_s=round(batch / kernel_seconds[compiled]),
                     vs_naive_per_message=round(batch / seconds[compiled] / naive, 1), **extra)


def fill_topic(bootstrap: str, topic: str) -> None:
    ensure_topics(bootstrap, {topic: E2E_PARTITIONS})
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024, acks="all")
    rng = np.random.default_rng(1)
    values = rng.normal(size=E2E_READINGS).round(4)
    ts = time.time()
    for i in range(E2E_READINGS):
        device = f"sensor-{i % E2E_DEVICES:05d}"
        body = json.dumps({"device_id": device, "ts": ts + i * 1e-3, "values": [float(values[i])]})
        producer.send(topic, key=device.encode(), value=body.encode())
    producer.flush()
    producer.close()


def consume_only(bootstrap: str, topic: str) -> float:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-consume-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=4096,
                             fetch_max_wait_ms=100)
    seen, started = 0, None
    while seen < E2E_READINGS:
        polled = consumer.poll(timeout_ms=500, max_records=4096)
        if polled and started is None:
            started = time.perf_counter()
        for messages in polled.values():
            for message in messages:
                seen += message.value is not None
    seconds = time.perf_counter() - started
    consumer.close()
    return seconds


def passthrough(bootstrap: str, topic: str) -> float:
    out_topic = f"{topic}-passthrough"
    ensure_topics(bootstrap, {out_topic: E2E_PARTITIONS})
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-pass-{uuid.uuid4().hex[:6]}",
                             auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=4096,
                             fetch_max_wait_ms=100)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024, acks="all")
    seen, started = 0, None
    while seen < E2E_READINGS:
        polled = consumer.poll(timeout_ms=500, max_records=4096)
        if not polled:
            continue
        started = started or time.perf_counter()
        offsets = {}
        for tp, messages in polled.items():
            for message in messages:
                producer.send(out_topic, key=message.key, value=message.value)
            offsets[tp] = OffsetAndMetadata(messages[-1].offset + 1, "", -1)
            seen += len(messages)
        producer.flush()
        consumer.commit(offsets)
    seconds = time.perf_counter() - started
    producer.close()
    consumer.close()
    return seconds


def streamer_pipeline(bootstrap: str, topic: str, model_path: Path) -> float:
    from kafka_clients import close_loop, open_loop  # this script's sibling
    from prometheus_client import CollectorRegistry

    from streamer.metrics import Metrics
    from streamer.settings import load_settings

    settings = load_settings({
        "kafka": {"bootstrap_servers": bootstrap, "input_topic": topic, "output_topic": f"{topic}-predictions",
                  "dead_letter_topic": f"{topic}-dlq", "group_id": f"bench-streamer-{uuid.uuid4().hex[:6]}"},
        "batch": {"max_records": 4096, "max_wait_ms": 20},
        "model": {"path": model_path, "device": "cpu"},
        "state": {"capacity": 2 * E2E_DEVICES},
        "checkpoint": {"directory": model_path.parent / "checkpoints"},
        "metrics": {"enabled": False},
        "run": {"status_interval_s": 0},
    })
    ensure_topics(bootstrap, {f"{topic}-predictions": E2E_PARTITIONS, f"{topic}-dlq": 1})
    pipeline = open_loop(settings, Metrics(CollectorRegistry()))
    pipeline.subscribe()
    pipeline.prepare_process()  # as Pipeline.run does
    stop = threading.Event()
    started = None
    while pipeline.summary.readings < E2E_READINGS:
        if pipeline.run_once(stop) and started is None:
            started = time.perf_counter()  # from the first batch, like the baselines
    seconds = time.perf_counter() - started
    close_loop(pipeline)
    gc.unfreeze()  # as Pipeline.run does when it returns
    return seconds


def bench_end_to_end() -> None:
    from kafka_clients import start_broker, stop_broker  # this script's sibling

    bootstrap, broker_env = start_broker()
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        fill_topic(bootstrap, topic)
        model_path = Path(tempfile.mkdtemp(prefix="streamer-bench-")) / "model.pt"
        config = ModelConfig(FEATURES, HIDDEN, LAYERS, FEATURES)
        save_model_file(model_path, init_random_model(config), config, "bench")
        figures = {
            "consume_only": consume_only(bootstrap, topic),
            "passthrough": passthrough(bootstrap, topic),
            "streamer": streamer_pipeline(bootstrap, topic, model_path),
        }
        for name, seconds in figures.items():
            emit(figure="end_to_end", loop=name, readings=E2E_READINGS, devices=E2E_DEVICES,
                 readings_per_s=round(E2E_READINGS / seconds),
                 vs_consume_only=round(figures["consume_only"] / seconds, 3),
                 vs_passthrough=round(figures["passthrough"] / seconds, 3))
    finally:
        stop_broker(broker_env)


def main() -> None:
    kept = retain_freed_memory(MALLOC_KEEP_MB)  # as Pipeline.prepare_process does, for every figure
    emit(figure="machine", python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
         torch_threads=torch.get_num_threads(), cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
         malloc_keep_mb=MALLOC_KEEP_MB if kept else 0)
    config = ModelConfig(FEATURES, HIDDEN, LAYERS, FEATURES)
    naive = naive_per_message(init_random_model(config, seed=0), np.random.default_rng(0))
    emit(figure="naive_per_message", device="cpu", hidden=HIDDEN, layers=LAYERS, device_steps_per_s=round(naive))
    gemm_gflops = cpu_ceiling(naive)
    cpu_gate_ceiling(naive, gemm_gflops[torch.bfloat16])
    bench_engine("cpu", naive)
    if torch.cuda.is_available():
        bench_engine("cuda", naive)
    if os.environ.get("BENCH_SKIP_KAFKA") != "1":
        bench_end_to_end()


if __name__ == "__main__":
    main()
