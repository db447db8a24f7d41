#!/usr/bin/env python3
"""A state table of millions of devices: bytes per device, the id -> slot cost, the step rate
over random devices of a full table, memory under device churn and the id -> slot map's
rebuild. One JSON object per figure.

    python bench/scale.py [--devices 10000000] [--hidden 32] [--layers 2] [--state-dtype bfloat16]
                          [--device cpu] [--batch 16384]

Memory is read from /proc/self/status (VmRSS, VmHWM) on the CPU, torch.cuda's counters on a GPU.
The defaults fit 10M devices well under 8 GiB on a CPU (H=32, bfloat16 h and c); the
``state_bytes_per_device`` figure also gives the row bytes of H=64 and H=128 for each dtype
(exact: columns x element size), which do not need to be allocated to be known.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamer.engine import Engine, ReadingBatch, StateLayout  # noqa: E402
from streamer.kernels import STATE_DTYPES  # noqa: E402
from streamer.model import ModelBundle, ModelConfig, init_random_model  # noqa: E402

MIB = 2**20


def emit(**figure: object) -> None:
    print(json.dumps(figure), flush=True)


def rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def device_id(i: int) -> str:
    return f"sensor-{i:09d}"  # 16 characters, a typical device id


def row_bytes(hidden: int, layers: int, dtype: torch.dtype) -> int:
    layout = StateLayout.of(ModelConfig(1, hidden, layers, 1))
    lead = layout.c.stop
    return lead * torch.empty(0, dtype=dtype).element_size() + (layout.width - lead) * 4


def map_entry_bytes(n: int = 1_000_000) -> dict[str, float]:
    """Bytes per id -> slot entry (n entries): the table's map (streamer.slotmap, its arrays),
    and for comparison a dict's and an ordered dict's entries with their slot ints (tracemalloc;
    the table kept a dict before), and the id string itself."""
    out = {}
    try:  # absent before the table had it (this script also runs on older trees, for comparisons)
        from streamer.slotmap import SlotMap

        out["slot_map"] = SlotMap(n).nbytes / n
    except ImportError:
        pass
    ids = [device_id(i) for i in range(n)]
    slots = np.arange(1000, 1000 + n)  # past the small-int cache, like most slots
    for name, kind in (("ordered_dict", OrderedDict), ("dict", dict)):
        tracemalloc.start()
        m = kind(zip(ids, map(int, slots)))
        out[name] = tracemalloc.get_traced_memory()[0] / n
        tracemalloc.stop()
        del m
    tracemalloc.start()
    more = [device_id(i) for i in range(n, 2 * n)]
    out["id_str_and_list_slot"] = tracemalloc.get_traced_memory()[0] / n
    tracemalloc.stop()
    del more
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000_000)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--state-dtype", choices=sorted(STATE_DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--churn-rounds", type=int, default=400, help="batches of new devices for the churn figure")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--map-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, batch = args.devices, args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = STATE_DTYPES[args.state_dtype]

    if args.map_only:
        emit(figure="id_map_bytes_per_entry", **{k: round(v, 1) for k, v in map_entry_bytes().items()})
        return 0
    # In a process of its own: freed Python memory is reused, and would blur the figures below.
    subprocess.run([sys.executable, __file__, "--map-only"], check=True)
    emit(figure="state_bytes_per_device", layers=args.layers,
         rows={f"H{h}_{name}": row_bytes(h, args.layers, dt) for h in (32, 64, 128) for name, dt in STATE_DTYPES.items()})

    config = ModelConfig(1, args.hidden, args.layers, 1)
    bundle = ModelBundle(init_random_model(config, 0), config, "scale", None)
    start_rss = rss()[0]
    ids = [device_id(i) for i in range(n)]
    ids_rss = rss()[0]
    engine = Engine.build(bundle, capacity=n, device=args.device, ttl_seconds=3600.0, state_dtype=dtype)
    table = engine.table
    # Fill: every device's first reading, in batches (the id -> slot insert cost).
    rng = np.random.default_rng(0)
    values = rng.normal(size=(batch, 1)).astype(np.float32)
    insert_s = 0.0
    for start in range(0, n, batch):
        chunk = ids[start : start + batch]
        t0 = time.perf_counter()
        table.acquire(chunk, now=0.0)
        insert_s += time.perf_counter() - t0
    gc.collect()
    full_rss, _ = rss()
    cuda_bytes = torch.cuda.memory_allocated() if engine.device.type == "cuda" else 0
    bookkeeping = full_rss - ids_rss - (0 if engine.device.type == "cuda" else table.state_bytes)
    emit(figure="table_memory", devices=n, hidden=args.hidden, layers=args.layers, state_dtype=args.state_dtype,
         device=str(engine.device), row_bytes=row_bytes(args.hidden, args.layers, dtype),
         state_bytes_per_device=round(table.state_bytes / n, 1),
         bookkeeping_bytes_per_device=round(bookkeeping / n, 1),
         id_strings_bytes_per_device=round((ids_rss - start_rss) / n, 1),
         rss_mib=round(full_rss / MIB), cuda_mib=round(cuda_bytes / MIB))

    # Known devices in turn (each batch the least recently seen, as devices reporting on a period
    # are), over half the table: their older entries die at the touch log's oldest end.
    turn_runs = []
    for k in range(max(8, n // 2 // batch + 1)):
        chunk = [device_id(i % n) for i in range(k * batch, (k + 1) * batch)]
        t0 = time.perf_counter()
        table.acquire(chunk, now=0.5)
        turn_runs.append(time.perf_counter() - t0)
    emit(figure="id_to_slot_in_turn", devices=n,
         lookup_us_per_reading=round(sum(turn_runs) / (len(turn_runs) * batch) * 1e6, 3),
         lookup_batch_ms_median=round(float(np.median(turn_runs)) * 1e3, 1),
         lookup_batch_ms_max=round(max(turn_runs) * 1e3, 1))

    # The id -> slot cost of known devices, random among n (acquire alone, then a whole step),
    # over half the table's touches at least (the touch log's upkeep, a compaction or a sweep,
    # included; the slowest batch shows its pause). Each batch's ids are fresh strings, as
    # decoding messages makes them: the hash of a string is computed anew, and no id is the very
    # object the table keeps.
    picks = [rng.choice(n, size=batch, replace=False) for _ in range(max(8, n // 2 // batch + 1))]
    lookup_runs = []
    for k, pick in enumerate(picks):
        chunk = [device_id(i) for i in pick.tolist()]
        t0 = time.perf_counter()
        table.acquire(chunk, now=float(k + 1))
        lookup_runs.append(time.perf_counter() - t0)
    emit(figure="id_to_slot", devices=n, insert_us_per_device=round(insert_s / n * 1e6, 3),
         lookup_us_per_reading=round(sum(lookup_runs) / (len(picks) * batch) * 1e6, 3),
         lookup_batch_ms_median=round(float(np.median(lookup_runs)) * 1e3, 1),
         lookup_batch_ms_max=round(max(lookup_runs) * 1e3, 1))

    runs = []
    for k, pick in enumerate(picks[:8] * 2):
        readings = ReadingBatch([device_id(i) for i in pick.tolist()], np.zeros(batch), values)
        t0 = time.perf_counter()
        engine.step(readings, now=100.0 + k)
        runs.append(time.perf_counter() - t0)
    small = Engine.build(bundle, capacity=batch, device=args.device, state_dtype=dtype)
    small_runs = []
    for k in range(len(runs)):
        readings = ReadingBatch([device_id(i) for i in range(batch)], np.zeros(batch), values)
        t0 = time.perf_counter()
        small.step(readings, now=100.0 + k)
        small_runs.append(time.perf_counter() - t0)
    del small
    emit(figure="step_random_devices", devices=n, batch=batch, hidden=args.hidden, layers=args.layers,
         state_dtype=args.state_dtype, device=str(engine.device), threads=torch.get_num_threads(),
         device_steps_per_s=round(batch / float(np.median(runs[1:]))),
         same_batch_in_a_table_of_the_batch=round(batch / float(np.median(small_runs[1:]))))

    # Churn: batches of devices never seen before; at capacity each evicts the least recently
    # seen, and its id goes with it (this script drops its own list of ids first). Memory must
    # level off: RSS after each quarter of the rounds.
    del ids, picks, readings
    gc.collect()
    before, _ = rss()
    next_id = n
    evicted = 0
    rss_by_quarter = []
    t0 = time.perf_counter()
    round_s: list[float] = []
    id_map = getattr(table, "_slot_of", None)
    tombs = getattr(id_map, "_tombs", None)
    # Rebuilds: the map's count, or (a tree without it) the tombstones seen dropping to none.
    rebuilds = -getattr(id_map, "rebuilds", 0)
    for k in range(args.churn_rounds):
        chunk = [device_id(i) for i in range(next_id, next_id + batch)]
        next_id += batch
        began = time.perf_counter()
        evicted += table.acquire(chunk, now=1000.0 + k).evicted_for_capacity
        round_s.append(time.perf_counter() - began)
        if tombs is not None:
            rebuilds += not hasattr(id_map, "rebuilds") and id_map._tombs <= batch < tombs // 4
            tombs = id_map._tombs
        if (k + 1) % max(1, args.churn_rounds // 4) == 0:
            rss_by_quarter.append(round(rss()[0] / MIB))
    rebuilds += getattr(id_map, "rebuilds", 0)
    churn_s = time.perf_counter() - t0
    gc.collect()
    after, peak = rss()
    emit(figure="churn", devices=n, new_devices=args.churn_rounds * batch, evicted=evicted, table_len=len(table),
         us_per_new_device=round(churn_s / (args.churn_rounds * batch) * 1e6, 3),
         acquire_ms_median=round(float(np.median(round_s)) * 1e3, 1),
         acquire_ms_p99=round(float(np.percentile(round_s, 99)) * 1e3, 1), acquire_ms_max=round(max(round_s) * 1e3, 1),
         id_map_rebuilds=rebuilds if tombs is not None else None,
         id_map_tombstones_per_device=round(tombs / len(table), 3) if tombs is not None else None,
         rss_before_mib=round(before / MIB), rss_by_quarter_mib=rss_by_quarter, rss_after_mib=round(after / MIB),
         peak_rss_mib=round(peak / MIB))
    # The id -> slot map's rebuild (its tombstones dropped): the pause it would be in one step,
    # if tombstones ever filled the probe table (under churn they level off below that).
    if hasattr(id_map, "_rebuild"):
        t0 = time.perf_counter()
        id_map._rebuild()
        emit(figure="id_map_rebuild", devices=len(table), ms=round((time.perf_counter() - t0) * 1e3))
    # TTL: devices idle past the TTL go, oldest first.
    t0 = time.perf_counter()
    gone = table.evict_idle(now=1000.0 + args.churn_rounds + 3600.0 - 1.0)
    emit(figure="ttl_evict", evicted=gone, table_len=len(table),
         us_per_device=round((time.perf_counter() - t0) / max(gone, 1) * 1e6, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
