"""Plan and step: advance every device that has new readings, one reading each, per wave.

The CPU side plans (which devices, which slots, which waves); the torch side executes one
batched step per wave. A device with k readings in a batch appears in waves 0..k-1, in the order
its readings were given (offset order), so per-device order always holds. Nothing here knows of
Kafka or Prometheus.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streamer.anomaly import AnomalyParams
from streamer.compiled import CompiledWave
from streamer.errors import CapacityError, StreamerError
from streamer.features import time_features
from streamer.hostmem import memory_room
from streamer.kernels import CPU_ROW_BLOCK, CPU_ROWS_PER_STEP, make_lstm_step
from streamer.model import ModelBundle, ModelConfig, Normalization, allocation_failed
from streamer.slotmap import Keys, hashes_repeat, keys_of
from streamer.state import DeviceStateTable, table_bytes
from streamer.wave import not_finite, row_after, score_wave

log = logging.getLogger(__name__)

# On CUDA a wave of up to GRAPH_MAX_ROWS rows is padded to its bucket (a power of two, at least
# GRAPH_MIN_ROWS) and its step replayed from a CUDA graph captured once per bucket: one launch
# instead of dozens, which bound small batches. Larger waves are long enough to hide launches.
GRAPH_MAX_ROWS = 16384
GRAPH_MIN_ROWS = 64

# A batch's id lists are planned per list (plan_lists) from this many ids a list on average: the
# Python step per list costs as much as hashing and sorting the readings' ids at about 16 (131k
# readings, each list 4 times: 2.6x faster at 64, 4.4x at 256), and 15x more with lists of one id.
LIST_PLAN_MIN_IDS = 64


@dataclass(frozen=True)
class ReadingBatch:
    """Decoded readings in offset order. values: (n, values_size) float32; ts: (n,) epoch seconds;
    partitions: (n,) int32 input partition of each reading, when it came from one."""

    device_ids: list[str]
    ts: np.ndarray
    values: np.ndarray
    partitions: np.ndarray | None = None
    # device_ids as the id lists it was made of, one after another (a batch of batch messages, a
    # list each: a gateway that lists the same devices again sends the same tuple, see
    # records._SenderIds); the step then plans per distinct list, not per reading (plan_lists).
    id_lists: tuple[tuple[str, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.device_ids)

    @classmethod
    def empty(cls, input_size: int) -> "ReadingBatch":
        return cls([], np.zeros(0), np.zeros((0, input_size), dtype=np.float32))


@dataclass(frozen=True)
class PredictionBatch:
    """One prediction per reading, in the readings' order. forecast: the next reading, in the
    readings' units; residual: this reading against the previous forecast, in normalised units
    (0 for a device's first reading); anomaly_score: 1 - tail probability, in [0, 1] (float64, so
    that scores near 1 stay distinct); surprise: -log10 of the tail probability (0 when not
    scored), the same ranking without the float64 ceiling near 1."""

    device_ids: list[str]
    ts: np.ndarray  # (n,) float64
    forecast: np.ndarray  # (n, values_size) float32
    anomaly_score: np.ndarray  # (n,) float64
    is_anomaly: np.ndarray  # (n,) bool
    residual: np.ndarray  # (n,) float32
    surprise: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return len(self.device_ids)


@dataclass(frozen=True)
class PartitionState:
    """Exported rows of one input partition's devices: ids (n,), rows (n, width) float32, last seen (n,)."""

    device_ids: list[str]
    rows: np.ndarray
    last_seen: np.ndarray

    def __len__(self) -> int:
        return len(self.device_ids)


@dataclass(frozen=True)
class StepReport:
    readings: int
    devices: int
    waves: int
    new_devices: int
    evicted_idle: int
    evicted_capacity: int
    anomalies: int
    step_seconds: float
    reset_not_finite: int = 0  # devices whose state was dropped after a NaN or infinite output


@dataclass(frozen=True)
class Plan:
    """unique: distinct devices in first-seen order; first: the reading index where each first
    appears; waves: per wave, (reading idx, unique idx)."""

    unique: list[str]
    first: np.ndarray
    waves: list[tuple[np.ndarray, np.ndarray]]


def plan_waves(device_ids: list[str], keys: Keys | None = None) -> Plan:
    """Group readings into waves: the j-th reading of each device goes in wave j.

    keys: ``slotmap.keys_of(device_ids)`` (computed here when not given). Readings are grouped
    by their ids' hashes in numpy, the ids of equal hashes compared; ids that differ under one
    hash (a collision) are grouped by id instead, in Python.
    """
    n = len(device_ids)
    if n == 0:
        return Plan([], np.zeros(0, dtype=np.int64), [])
    hashes, ids = keys_of(device_ids) if keys is None else keys
    if not hashes_repeat(hashes):  # one reading per device
        every = np.arange(n)
        return Plan(list(device_ids), every, [(every, every)])
    # Readings sorted by hash, and within a hash in offset order. A stable argsort of the hashes
    # gives that, at five times the time of the plain one whose runs are put in order after, by
    # sorting (run, offset) as one int64 key: every key distinct, any sort is stable.
    order = np.argsort(hashes)
    sorted_hashes = hashes[order]
    new_run = np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]]
    run_sorted = np.cumsum(new_run) - 1  # the run of each sorted position
    if n < 1 << 31:
        key = run_sorted * n + order
        key.sort()
        order = key % n
    else:  # (run, offset) would not fit an int64
        order = np.argsort(hashes, kind="stable")
    starts = np.flatnonzero(new_run)  # each run's start in the sorted order
    run = np.empty(n, dtype=np.int64)
    run[order] = run_sorted  # the run of each reading
    run_first = order[starts]  # each run's first reading
    # Every reading's id equal to its run's first: one device per hash, else group by id. Later
    # readings are compared in offset order (their strings near each other in memory), with the
    # runs' first ids, fewer than the readings.
    first_of = run_first[run]
    later = np.flatnonzero(first_of != np.arange(n))
    if not (ids[later] == ids[first_of[later]]).all():
        return _plan_waves_by_id(device_ids)
    wave = np.empty(n, dtype=np.int64)
    wave[order] = np.arange(n) - starts[run_sorted]
    # Devices in first-seen order.
    by_first = np.argsort(run_first)
    unique_of_run = np.empty(len(starts), dtype=np.int64)
    unique_of_run[by_first] = np.arange(len(starts))
    first = run_first[by_first]
    return _waves_of(device_ids, first, unique_of_run[run], wave)


def distinct_lists(id_lists: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]]:
    """Each list object of ``id_lists`` once, in first-seen order (the same tuple again is the
    same list: a sender's repeat, see records._SenderIds)."""
    return list({id(ids): ids for ids in id_lists}.values())


def plan_lists(id_lists: tuple[tuple[str, ...], ...], device_ids: list[str]) -> tuple[Plan, Keys] | None:
    """plan_waves of ``device_ids``, the concatenated ``id_lists``, and the keys of its unique
    devices, taken per distinct list (the same tuple object again is the same list): each list's
    hashes taken once; its readings' waves the count of its earlier repeats when the distinct
    lists are of distinct devices, within and between them, else plan_waves with the readings'
    keys made of the lists' (it groups an id twice, or two ids of one hash). None where no list
    repeats (plan_waves alone is as cheap), or where the lists are short (fewer than
    LIST_PLAN_MIN_IDS ids a list on average: a step per list costs more than hashing its ids)."""
    n = len(device_ids)
    listed = sum(len(ids) for ids in id_lists)
    if listed != n:
        raise StreamerError(f"the batch's id lists hold {listed} ids, its readings are {n}")
    if n < LIST_PLAN_MIN_IDS * len(id_lists):
        return None
    distinct = distinct_lists(id_lists)
    index = {id(ids): d for d, ids in enumerate(distinct)}  # id() of each distinct list -> its place among them
    rows = sum(len(ids) for ids in distinct)
    if rows == n:
        return None
    unique = [device for ids in distinct for device in ids]
    hashes, objects = keys_of(unique)
    base = np.cumsum([0] + [len(ids) for ids in distinct])
    if hashes_repeat(hashes):
        at = [np.arange(base[index[id(ids)]], base[index[id(ids)] + 1]) for ids in id_lists]
        every = np.concatenate(at)
        keys = (hashes[every], objects[every])
        plan = plan_waves(device_ids, keys)
        return plan, (keys[0][plan.first], keys[1][plan.first])
    first = np.empty(rows, dtype=np.int64)
    waves: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    seen = [0] * len(distinct)
    start = 0
    for ids in id_lists:
        size = len(ids)
        if not size:  # every empty list is the one (): its repeats are no readings, no wave
            continue
        d = index[id(ids)]
        readings_at = np.arange(start, start + size)
        if seen[d] == len(waves):
            waves.append(([], []))
        if not seen[d]:
            first[base[d] : base[d + 1]] = readings_at
        readings, devices = waves[seen[d]]
        readings.append(readings_at)
        devices.append(np.arange(base[d], base[d + 1]))
        seen[d] += 1
        start += size
    plan_of = [(np.concatenate(r), np.concatenate(u)) for r, u in waves]
    return Plan(unique, first, plan_of), (hashes, objects)


def _plan_waves_by_id(device_ids: list[str]) -> Plan:
    """plan_waves, grouping by the ids themselves."""
    position: dict[str, int] = {}
    count: list[int] = []
    first: list[int] = []
    unique_index = np.empty(len(device_ids), dtype=np.int64)
    wave = np.empty(len(device_ids), dtype=np.int64)
    for i, device_id in enumerate(device_ids):
        u = position.get(device_id)
        if u is None:
            u = position[device_id] = len(count)
            count.append(0)
            first.append(i)
        unique_index[i] = u
        wave[i] = count[u]
        count[u] += 1
    return _waves_of(device_ids, np.asarray(first, dtype=np.int64), unique_index, wave)


def _waves_of(device_ids: list[str], first: np.ndarray, unique_index: np.ndarray, wave: np.ndarray) -> Plan:
    """The plan of readings whose device (index into ``first``) and wave are known."""
    n_waves = int(wave.max()) + 1
    order = np.argsort(wave, kind="stable")
    bounds = np.searchsorted(wave[order], np.arange(n_waves + 1))
    waves = []
    for j in range(n_waves):
        idx = order[bounds[j] : bounds[j + 1]]
        waves.append((idx, unique_index[idx]))
    return Plan([device_ids[i] for i in first.tolist()], first, waves)


@dataclass(frozen=True)
class StateLayout:
    """Column layout of a device row: h and c of every layer, the last forecast (normalised
    units), the running input normalisation when the model uses one (count, mean, variance per
    value), then the reading count and the residual statistics of streamer.anomaly, then its
    records: the range of values (low, high per value), the last reading, the current and the
    longest run of identical readings."""

    num_layers: int
    hidden_size: int
    values_size: int
    device_norm: bool = False

    @classmethod
    def of(cls, config: ModelConfig) -> "StateLayout":
        return cls(config.num_layers, config.hidden_size, config.values_size, config.device_norm_alpha is not None)

    @property
    def lh(self) -> int:
        return self.num_layers * self.hidden_size

    @property
    def h(self) -> slice:
        return slice(0, self.lh)

    @property
    def c(self) -> slice:
        return slice(self.lh, 2 * self.lh)

    @property
    def forecast(self) -> slice:
        return slice(2 * self.lh, 2 * self.lh + self.values_size)

    @property
    def _norm_base(self) -> int:
        return 2 * self.lh + self.values_size

    @property
    def norm_width(self) -> int:
        return 1 + 2 * self.values_size if self.device_norm else 0

    @property
    def norm_count(self) -> int:
        return self._norm_base

    @property
    def norm_mean(self) -> slice:
        return slice(self._norm_base + 1, self._norm_base + 1 + self.values_size)

    @property
    def norm_var(self) -> slice:
        return slice(self._norm_base + 1 + self.values_size, self._norm_base + 1 + 2 * self.values_size)

    @property
    def seen(self) -> int:
        """Readings the device consumed; then n, mean, var, short, var_one, streak, peak of the
        residuals (streamer.anomaly)."""
        return self._norm_base + self.norm_width

    STATS = 8  # seen, n, mean, var, short, var_one, streak, peak

    @property
    def low(self) -> slice:
        return slice(self.seen + self.STATS, self.seen + self.STATS + self.values_size)

    @property
    def high(self) -> slice:
        return slice(self.low.stop, self.low.stop + self.values_size)

    @property
    def last(self) -> slice:
        return slice(self.high.stop, self.high.stop + self.values_size)

    @property
    def runs(self) -> slice:
        """The current and the longest finished run of identical readings."""
        return slice(self.last.stop, self.last.stop + 2)

    @property
    def width(self) -> int:
        return self.runs.stop


def check_table_fits(capacity: int, layout: StateLayout, where: torch.device, state_dtype: torch.dtype,
                     total: bool = False) -> None:
    """CapacityError (one line) when a state table of ``capacity`` rows of ``layout`` would take
    more of the host's memory (its rows, if on the CPU, and its bookkeeping) than the process may
    still take (hostmem.memory_room): rather than be killed for it. torch fills the rows with
    zeros as it makes them, every page at once; a CUDA device's own allocation says when it is
    full. ``total``: than it may take at all (check-config, which may run beside the service)."""
    rows, bookkeeping = table_bytes(capacity, layout.width, torch.float32, layout.c.stop, state_dtype)
    needed = bookkeeping + (rows if where.type == "cpu" else 0)
    room = memory_room(total)
    if room is not None and needed > room:
        raise CapacityError(
            f"state table capacity {capacity}: {needed / 2**30:.2f} GiB of rows and bookkeeping on the host, more"
            f" than the {room / 2**30:.2f} GiB of memory this process {'may have' if total else 'may still take'}")


def _allocate_table(
    capacity: int, layout: StateLayout, where: torch.device, ttl_seconds: float | None, state_dtype: torch.dtype
) -> DeviceStateTable:
    """A table of ``capacity`` rows of ``layout``; CapacityError (one line) when they do not fit."""
    check_table_fits(capacity, layout, where, state_dtype)
    try:
        return DeviceStateTable(
            capacity, layout.width, where, ttl_seconds=ttl_seconds, lead_width=layout.c.stop, lead_dtype=state_dtype,
        )
    except (RuntimeError, MemoryError) as exc:
        if not allocation_failed(exc):
            raise
        row_bytes = layout.c.stop * state_dtype.itemsize + (layout.width - layout.c.stop) * 4
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CapacityError(
            f"state table capacity {capacity}: {capacity * row_bytes / 2**30:.1f} GiB of rows on {where}"
            f" could not be allocated ({reason})") from None


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamerError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise StreamerError(f"device {name!r} asked for, but this host has {torch.cuda.device_count()} CUDA device(s)")
    return device


class Engine:
    """Streams readings through the model, one step per reading, state carried per device."""

    def __init__(
        self, bundle: ModelBundle, table: DeviceStateTable, anomaly: AnomalyParams | None = None,
        cuda_graphs: bool = True, compile: bool = False,
    ):
        """cuda_graphs: on CUDA with the fused kernel, replay small waves' steps from CUDA graphs
        (padded to their bucket; see GRAPH_MAX_ROWS). compile: on the CPU, step waves through
        torch.compile's fused code (streamer.compiled; compiled here and at a swap to a model of
        another shape, never in a step); on CUDA the fused kernel runs regardless."""
        layout = StateLayout.of(bundle.config)
        if table.width != layout.width:
            raise StreamerError(f"state table width {table.width} != {layout.width} needed by the model")
        self.device = table.device
        self.anomaly = anomaly or AnomalyParams()
        # On a CPU, steps over more rows than fit in cache run several times slower per row
        # (fresh multi-MB temporaries fault their pages in on every call): cut waves into chunks.
        self.max_rows_per_step = CPU_ROWS_PER_STEP if self.device.type == "cpu" else None
        self.want_graphs = cuda_graphs
        self.want_compile = compile
        self._reset = 0  # devices reset in the current step (_reset_not_finite)
        self._serve(bundle, table, layout)

    def _serve(self, bundle: ModelBundle, table: DeviceStateTable, layout: StateLayout) -> None:
        """Serve ``bundle`` on ``table``. What may fail (the step's weights, a compile) is built
        before anything of the engine changes: a model that cannot be served leaves the one
        served before, its table and its rows, as they were."""
        # The LSTM step: the fused Triton kernel on CUDA, torch ops elsewhere (streamer.kernels).
        lstm = make_lstm_step(bundle.model, self.device, table.lead_dtype)
        norm = bundle.normalization
        mean = norm.mean.to(self.device) if norm else None
        std = norm.std.to(self.device) if norm else None
        compiled = None
        if self.want_compile and self.device.type == "cpu":
            compiled = CompiledWave(bundle.model, table, layout, self.anomaly, bundle.config.device_norm_alpha)
        self.table, self.layout, self.lstm, self._compiled = table, layout, lstm, compiled
        self._mean, self._std = mean, std
        self.bundle = bundle
        self.config = bundle.config
        # The graphs hold this model's weights and this table's storage: captured anew after a swap.
        self.cuda_graphs = self.want_graphs and self.device.type == "cuda" and getattr(self.lstm, "fused", False)
        self.pad_waves = self.cuda_graphs  # tests also pad on the CPU, running the padded step as it is
        self._padded: dict[tuple[int, int], PaddedStep] = {}

    @classmethod
    def build(
        cls,
        bundle: ModelBundle,
        capacity: int,
        device: str = "auto",
        ttl_seconds: float | None = None,
        anomaly: AnomalyParams | None = None,
        state_dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = True,
        compile: bool = False,
    ) -> "Engine":
        """state_dtype: of the LSTM's h and c in the table (float32 or bfloat16; the rest of a
        row stays float32). The bfloat16 error bound is in streamer.kernels."""
        layout = StateLayout.of(bundle.config)
        table = _allocate_table(capacity, layout, resolve_device(device), ttl_seconds, state_dtype)
        return cls(bundle, table, anomaly, cuda_graphs, compile)

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def swap_model(self, bundle: ModelBundle) -> bool:
        """Serve ``bundle`` from the next step on.

        A model of the same config takes over every device's carried state. One of another
        shape or input (hidden size, layers, time features, normalisation, the global
        normalisation's mean and std too: rows hold forecasts and statistics in its units)
        cannot: the table is replaced by an empty one of the new row width, and every device
        starts from zeros. Returns True when the table was reset.
        """
        reset = bundle.config != self.config or not _same_normalization(bundle.normalization, self.bundle.normalization)
        table, layout = self.table, self.layout
        if reset:
            layout = StateLayout.of(bundle.config)
            table = _allocate_table(table.capacity, layout, table.device, table.ttl_seconds, table.lead_dtype)
        self._serve(bundle, table, layout)  # the old model, table and rows stay if this raises
        return reset

    def step(self, batch: ReadingBatch, now: float | None = None) -> tuple[PredictionBatch, StepReport]:
        """One prediction per reading of ``batch``. ``now`` (epoch s) drives TTL and LRU."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        n = len(batch)
        if batch.values.shape != (n, self.config.values_size):
            raise StreamerError(f"values shape {batch.values.shape} != ({n}, {self.config.values_size})")
        listed = None if batch.id_lists is None else plan_lists(batch.id_lists, batch.device_ids)
        if listed is not None:
            plan, keys = listed
        else:
            keys = keys_of(batch.device_ids)
            plan = plan_waves(batch.device_ids, keys)
            if len(plan.unique) < n:  # the keys of each device's first reading
                keys = (keys[0][plan.first], keys[1][plan.first])
        evicted_idle = self.table.evict_idle(now)  # planned first: a batch refused above changes nothing
        self._reset = 0
        partitions = None if batch.partitions is None else batch.partitions[plan.first]
        acquired = self.table.acquire(plan.unique, now, partitions, keys=keys)
        forecast, log_tail, flagged, residual = self._execute(plan, acquired.slots, batch.values, batch.ts)
        log_tail = log_tail.astype(np.float64)
        score = -np.expm1(log_tail) + 0.0  # 1 - tail, exact near 0 and near 1; no -0.0
        surprise = (log_tail * (-1.0 / np.log(10.0))).astype(np.float32) + np.float32(0.0)  # no -0.0
        predictions = PredictionBatch(batch.device_ids, batch.ts, forecast, score, flagged, residual, surprise)
        report = StepReport(
            readings=n,
            devices=len(plan.unique),
            waves=len(plan.waves),
            new_devices=acquired.new_devices,
            evicted_idle=evicted_idle,
            evicted_capacity=acquired.evicted_for_capacity,
            anomalies=int(flagged.sum()),
            step_seconds=time.perf_counter() - started,
            reset_not_finite=self._reset,
        )
        return predictions, report

    def export_partition(self, partition: int) -> "PartitionState":
        """The rows of every device reading from ``partition``, on the CPU."""
        ids, rows, last_seen = self.table.export(self.table.slots_of_partition(partition))
        return PartitionState(ids, rows, last_seen)

    def restore_partition(self, partition: int, state: "PartitionState") -> int:
        """Put a partition's exported rows back; returns devices evicted to make room."""
        return self.table.restore(state.device_ids, state.rows, state.last_seen, partition)

    def drop_partition(self, partition: int) -> int:
        """Forget every device of ``partition``; returns how many."""
        return self.table.drop_partition(partition)

    @torch.inference_mode()
    def _execute(
        self, plan: Plan, unique_slots: np.ndarray, values: np.ndarray, ts: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """(forecast (n, F) reading units, ln tail (n,), flags (n,), residual (n,)) in reading order."""
        if self.device.type != "cuda":
            return self._execute_here(plan, unique_slots, values, ts)
        # On the engine's own GPU: Triton launches and graph captures go to the current device.
        with torch.cuda.device(self.device):
            return self._execute_here(plan, unique_slots, values, ts)

    def _execute_here(
        self, plan: Plan, unique_slots: np.ndarray, values: np.ndarray, ts: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        n, out_size = len(values), self.config.values_size
        device = self.device
        if n == 0:
            empty = np.zeros(0, np.float32)
            return np.zeros((0, out_size), np.float32), empty, np.zeros(0, bool), empty
        x_all = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)
        if self._mean is not None:
            x_all = (x_all - self._mean) / self._std
        if self.config.time_features:
            clock = torch.from_numpy(time_features(ts, self.config.time_features)).to(device)
            x_all = torch.cat([x_all, clock], dim=1)
        pieces = list(self._pieces(plan))
        chunks: list[tuple[Tensor, ...]] = []
        for reading_idx, unique_idx in pieces:
            slots = torch.from_numpy(unique_slots[unique_idx]).to(device)
            x = x_all if len(pieces) == 1 else x_all.index_select(0, torch.from_numpy(reading_idx).to(device))
            *results, bad = self._wave(x, slots)
            self._reset_not_finite(slots, bad)
            # A padded step's results are its graph's buffers, overwritten by the next wave of its bucket.
            chunks.append(tuple(result.clone() for result in results) if self.pad_waves and len(pieces) > 1 else tuple(results))
        if len(chunks) == 1:
            out_all, tail_all, flag_all, res_all = chunks[0]
        else:  # each result once, in reading order
            out_all, tail_all, flag_all, res_all = (torch.cat(column) for column in zip(*chunks))
            order = np.concatenate([reading_idx for reading_idx, _ in pieces])
            if not np.array_equal(order, np.arange(n)):  # a wave of one reading per device: in order already
                at = torch.from_numpy(order).to(device)
                out_all, tail_all, flag_all, res_all = (
                    torch.empty_like(result).index_copy_(0, at, result) for result in (out_all, tail_all, flag_all, res_all)
                )
        if self._mean is not None:
            out_all = out_all * self._std + self._mean
        return out_all.cpu().numpy(), tail_all.cpu().numpy(), flag_all.cpu().numpy(), res_all.cpu().numpy()

    def _reset_not_finite(self, slots: Tensor, bad: Tensor) -> None:
        """A wave's devices whose forecast, tail or residual came out NaN or infinite (``bad``,
        wave.not_finite; a model whose output overflows float32): their state may hold them too,
        and would pass them on to every later reading. Their rows are zeroed at once, before their
        next reading (of this batch or a later one), as a new device's: the same wherever batches
        are cut (live, or replay)."""
        if bool(bad.any()):  # on CUDA a wait for the wave: its results are fetched next anyway
            lost = slots[bad]
            self.table.reset(lost)
            self._reset += len(lost)

    def _pieces(self, plan: Plan):
        """The plan's waves, each cut into chunks of at most max_rows_per_step readings, in order."""
        limit = self.max_rows_per_step
        for reading_idx, unique_idx in plan.waves:
            if limit is None or len(reading_idx) <= limit:
                yield reading_idx, unique_idx
                continue
            for start in range(0, len(reading_idx), limit):
                yield reading_idx[start : start + limit], unique_idx[start : start + limit]

    def _wave(self, x: Tensor, slots: Tensor) -> tuple[Tensor, ...]:
        """_step_wave, through the wave's bucket when waves are padded (the results are views
        valid until the next wave of that bucket)."""
        b = len(slots)
        if not self.pad_waves or b > GRAPH_MAX_ROWS:
            if self.device.type == "cpu" and b % CPU_ROW_BLOCK:  # a device's result as in any other batch
                pad = CPU_ROW_BLOCK - b % CPU_ROW_BLOCK
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
                slots = torch.cat([slots, slots.new_full((pad,), self.table.sink)])
                return tuple(result[:b] for result in self._step_wave(x, slots))
            return self._step_wave(x, slots)
        key = (max(GRAPH_MIN_ROWS, 1 << (b - 1).bit_length()), x.shape[1])
        padded = self._padded.get(key)
        if padded is None:
            try:
                padded = self._padded[key] = PaddedStep(self, *key)
            except Exception as exc:
                if not self.cuda_graphs:
                    raise
                # A step this torch or driver cannot capture: serve it as it is, say so once.
                log.warning("CUDA graph capture of a %d-row step failed (%s); steps launch their kernels"
                            " one by one from now on", key[0], exc)
                self.cuda_graphs = self.pad_waves = False
                self._padded.clear()
                return self._step_wave(x, slots)
        return padded(x, slots)

    def _step_wave(self, x: Tensor, slots: Tensor, scratch: bool = True) -> tuple[Tensor, ...]:
        """Gather the wave's rows, normalise and score the readings, step the LSTM, scatter the rows.

        x: (b, values_size + time features), values already globally normalised if the model
        says so. Returns (forecast in reading units, or normalised units under a global
        normalisation (undone by the caller), ln tail, flags, residual, not finite), each over b
        readings.
        """
        if self._compiled is not None:
            return self._compiled(x, slots)
        # h and c: read by the LSTM step from these rows, or from the table itself (reads_lead).
        rows = self.table.gather(slots, lead=not self.lstm.reads_lead, scratch=scratch)  # read before the scatter below
        scores = score_wave(x, lambda columns: rows[:, columns], self.layout, self.anomaly,
                            self.config.device_norm_alpha)
        out = self.lstm(scores.x, slots, rows, self.table.lead)  # h and c of the slots written in the table
        tail, out = row_after(out, scores)
        self.table.scatter(slots, tail, start=self.layout.forecast.start)
        scored = scores.scored
        return out, scored.log_tail, scored.is_anomaly, scores.residual, not_finite(out, scored.log_tail, scores.residual)


def _same_normalization(a: "Normalization | None", b: "Normalization | None") -> bool:
    """Whether two models map readings to the same units (no global normalisation, or the same)."""
    if a is None or b is None:
        return a is b
    return torch.equal(a.mean.cpu(), b.mean.cpu()) and torch.equal(a.std.cpu(), b.std.cpu())


class PaddedStep:
    """A wave's step at a fixed row count: the readings in the first rows, zeros pointing at the
    table's sink row in the rest. On CUDA (Engine.cuda_graphs) the step is captured once in a
    CUDA graph and replayed; else it runs as it is (the CPU tests of the padding)."""

    def __init__(self, engine: Engine, rows: int, width: int) -> None:
        self.engine = engine
        self.table = engine.table
        device = engine.device
        self.x = torch.zeros(rows, width, device=device)
        self.slots = torch.full((rows,), self.table.sink, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[Tensor, ...] = ()
        if engine.cuda_graphs:
            # Warm up on a side stream (Triton compiles, the allocator settles) on padding alone,
            # which reads and writes the sink row only; then capture. Under capture every
            # temporary comes from the graph's own memory pool (no table scratch buffers).
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():
                engine._step_wave(self.x, self.slots, scratch=False)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device)), torch.inference_mode():
                self.out = engine._step_wave(self.x, self.slots, scratch=False)

    def __call__(self, x: Tensor, slots: Tensor) -> tuple[Tensor, ...]:
        b = len(slots)
        self.x[:b].copy_(x)
        self.x[b:].zero_()
        self.slots[:b].copy_(slots)
        self.slots[b:].fill_(self.table.sink)
        if self.graph is None:
            out = self.engine._step_wave(self.x, self.slots)
        else:
            self.graph.replay()
            out = self.out
        return tuple(t[:b] for t in out)
