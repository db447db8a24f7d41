"""Plan and step: advance every device that has new readings, one reading each, per wave.

The CPU side plans (which devices, which slots, which waves); the torch side executes one
batched step per wave. A device with k readings in a batch appears in waves 0..k-1, in the order
its readings were given (offset order), so per-device order always holds. Nothing here knows of
Kafka or Prometheus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streamer.anomaly import AnomalyParams, score_and_update
from streamer.errors import StreamerError
from streamer.model import ModelBundle, StepWeights
from streamer.state import DeviceStateTable

CPU_ROWS_PER_STEP = 4096


@dataclass(frozen=True)
class ReadingBatch:
    """Decoded readings in offset order. values: (n, input_size) float32; ts: (n,) epoch seconds;
    partitions: (n,) int32 input partition of each reading, when it came from one."""

    device_ids: list[str]
    ts: np.ndarray
    values: np.ndarray
    partitions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.device_ids)

    @classmethod
    def empty(cls, input_size: int) -> "ReadingBatch":
        return cls([], np.zeros(0), np.zeros((0, input_size), dtype=np.float32))


@dataclass(frozen=True)
class PredictionBatch:
    """One prediction per reading, in the readings' order. forecast in the readings' units."""

    device_ids: list[str]
    ts: np.ndarray  # (n,) float64
    forecast: np.ndarray  # (n, output_size) float32
    anomaly_score: np.ndarray  # (n,) float32
    is_anomaly: np.ndarray  # (n,) bool

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


@dataclass(frozen=True)
class Plan:
    """unique: distinct devices in first-seen order; first: the reading index where each first
    appears; waves: per wave, (reading idx, unique idx)."""

    unique: list[str]
    first: np.ndarray
    waves: list[tuple[np.ndarray, np.ndarray]]


def plan_waves(device_ids: list[str]) -> Plan:
    """Group readings into waves: the j-th reading of each device goes in wave j."""
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
    unique = list(position)
    first_index = np.asarray(first, dtype=np.int64)
    n_waves = max(count, default=0)
    if n_waves <= 1:
        return Plan(unique, first_index, [(np.arange(len(device_ids)), unique_index)] if device_ids else [])
    order = np.argsort(wave, kind="stable")
    bounds = np.searchsorted(wave[order], np.arange(n_waves + 1))
    waves = []
    for j in range(n_waves):
        idx = order[bounds[j] : bounds[j + 1]]
        waves.append((idx, unique_index[idx]))
    return Plan(unique, first_index, waves)


@dataclass(frozen=True)
class StateLayout:
    """Column layout of a device row: h and c of every layer, last forecast, residual stats."""

    num_layers: int
    hidden_size: int
    output_size: int

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
        return slice(2 * self.lh, 2 * self.lh + self.output_size)

    @property
    def seen(self) -> int:
        return 2 * self.lh + self.output_size

    @property
    def width(self) -> int:
        return 2 * self.lh + self.output_size + 3


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamerError(f"device {name!r} asked for, but CUDA is not available here")
    return device


class Engine:
    """Streams readings through the model, one step per reading, state carried per device."""

    def __init__(self, bundle: ModelBundle, table: DeviceStateTable, anomaly: AnomalyParams | None = None):
        config = bundle.config
        if config.output_size != config.input_size:
            raise StreamerError(
                f"model {bundle.path}: output_size {config.output_size} != input_size {config.input_size};"
                " forecasts must predict the next reading to be scored"
            )
        self.layout = StateLayout(config.num_layers, config.hidden_size, config.output_size)
        if table.width != self.layout.width:
            raise StreamerError(f"state table width {table.width} != {self.layout.width} needed by the model")
        self.bundle = bundle
        self.config = config
        self.table = table
        self.device = table.device
        self.anomaly = anomaly or AnomalyParams()
        self.weights = StepWeights(bundle.model, self.device)
        # On a CPU, steps over more rows than fit in cache run several times slower per row
        # (fresh multi-MB temporaries fault their pages in on every call): cut waves into chunks.
        self.max_rows_per_step = CPU_ROWS_PER_STEP if self.device.type == "cpu" else None
        norm = bundle.normalization
        self._mean = norm.mean.to(self.device) if norm else None
        self._std = norm.std.to(self.device) if norm else None

    @classmethod
    def build(
        cls,
        bundle: ModelBundle,
        capacity: int,
        device: str = "auto",
        ttl_seconds: float | None = None,
        anomaly: AnomalyParams | None = None,
    ) -> "Engine":
        layout = StateLayout(bundle.config.num_layers, bundle.config.hidden_size, bundle.config.output_size)
        table = DeviceStateTable(capacity, layout.width, resolve_device(device), ttl_seconds=ttl_seconds)
        return cls(bundle, table, anomaly)

    @property
    def model_version(self) -> str:
        return self.bundle.version

    def swap_model(self, bundle: ModelBundle) -> None:
        """Serve ``bundle`` from the next step on, keeping every device's state.

        Only a model of the same shape can take over carried state; others are refused.
        """
        if bundle.config != self.config:
            raise StreamerError(
                f"model {bundle.path}: shape {bundle.config.to_dict()} differs from the running "
                f"{self.config.to_dict()}; restart to change shape (carried state would not fit)"
            )
        weights = StepWeights(bundle.model, self.device)
        norm = bundle.normalization
        self._mean = norm.mean.to(self.device) if norm else None
        self._std = norm.std.to(self.device) if norm else None
        self.weights = weights
        self.bundle = bundle

    def step(self, batch: ReadingBatch, now: float | None = None) -> tuple[PredictionBatch, StepReport]:
        """One prediction per reading of ``batch``. ``now`` (epoch s) drives TTL and LRU."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        n = len(batch)
        if batch.values.shape != (n, self.config.input_size):
            raise StreamerError(f"values shape {batch.values.shape} != ({n}, {self.config.input_size})")
        evicted_idle = self.table.evict_idle(now)
        plan = plan_waves(batch.device_ids)
        partitions = None if batch.partitions is None else batch.partitions[plan.first]
        acquired = self.table.acquire(plan.unique, now, partitions)
        forecast, score, flagged = self._execute(plan, acquired.slots, batch.values)
        predictions = PredictionBatch(batch.device_ids, batch.ts, forecast, score, flagged)
        report = StepReport(
            readings=n,
            devices=len(plan.unique),
            waves=len(plan.waves),
            new_devices=acquired.new_devices,
            evicted_idle=evicted_idle,
            evicted_capacity=acquired.evicted_for_capacity,
            anomalies=int(flagged.sum()),
            step_seconds=time.perf_counter() - started,
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
    def _execute(self, plan: Plan, unique_slots: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
        n, out_size = len(values), self.config.output_size
        device = self.device
        if n == 0:
            return np.zeros((0, out_size), np.float32), np.zeros(0, np.float32), np.zeros(0, bool)
        x_all = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)
        if self._mean is not None:
            x_all = (x_all - self._mean) / self._std
        pieces = list(self._pieces(plan))
        if len(pieces) > 1:
            out_all = torch.empty(n, out_size, device=device)
            score_all = torch.empty(n, device=device)
            flag_all = torch.empty(n, dtype=torch.bool, device=device)
        for reading_idx, unique_idx in pieces:
            slots = torch.from_numpy(unique_slots[unique_idx]).to(device)
            if len(pieces) == 1:
                out_all, score_all, flag_all = self._step_wave(x_all, slots)
                continue
            at = torch.from_numpy(reading_idx).to(device)
            out, score, flag = self._step_wave(x_all.index_select(0, at), slots)
            out_all.index_copy_(0, at, out)
            score_all.index_copy_(0, at, score)
            flag_all.index_copy_(0, at, flag)
        if self._mean is not None:
            out_all = out_all * self._std + self._mean
        return out_all.cpu().numpy(), score_all.cpu().numpy(), flag_all.cpu().numpy()

    def _pieces(self, plan: Plan):
        """The plan's waves, each cut into chunks of at most max_rows_per_step readings, in order."""
        limit = self.max_rows_per_step
        for reading_idx, unique_idx in plan.waves:
            if limit is None or len(reading_idx) <= limit:
                yield reading_idx, unique_idx
                continue
            for start in range(0, len(reading_idx), limit):
                yield reading_idx[start : start + limit], unique_idx[start : start + limit]

    def _step_wave(self, x: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gather the wave's rows, score the readings, step the LSTM, scatter the rows back."""
        lay, b = self.layout, len(slots)
        rows = self.table.gather(slots)
        h = rows[:, lay.h].view(b, lay.num_layers, lay.hidden_size)
        c = rows[:, lay.c].view(b, lay.num_layers, lay.hidden_size)
        s = lay.seen
        scored = score_and_update(x, rows[:, lay.forecast], rows[:, s], rows[:, s + 1], rows[:, s + 2], self.anomaly)
        out, h_new, c_new = self.weights.step(x, h, c)
        new_rows = torch.cat(
            [
                h_new.reshape(b, -1),
                c_new.reshape(b, -1),
                out,
                torch.stack([scored.seen, scored.mean, scored.var], dim=1),
            ],
            dim=1,
        )
        self.table.scatter(slots, new_rows)
        return out, scored.score, scored.is_anomaly
