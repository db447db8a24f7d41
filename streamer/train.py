"""Train an LSTMModel to forecast each device's next reading, on the CPU.

Data: per-device sequences (T_i, F) float32, in time order (``load_csv`` reads them from a CSV,
``streamer.simulate.history`` makes them). Training normalises every feature with the mean and
std of all the data, samples random windows of seq_len + 1 readings, and fits the model to
predict reading t + 1 from readings 0..t at every t of the window, starting from the zero state:
``model.fc`` is applied to every step of ``model.lstm``'s output, which is the head LSTMModel
applies to the last step, so the trained model streams unchanged.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from streamer.errors import StreamerError
from streamer.model import LSTMModel, ModelConfig, Normalization, save_model_file

CSV_COLUMNS = ("device_id", "timestamp", "value")
STD_FLOOR = 1e-6
MAX_THREADS = 8  # larger models gain little past a few threads
SMALL_HIDDEN = 64  # up to this hidden size, train on one thread
EVAL_WINDOWS = 256  # windows in the fixed batch loss_first and loss_last are measured on


class TrainingDataError(StreamerError):
    """Training data that cannot be used; names the file, line and value when there is one."""

    def __init__(self, reason: str, path: object = None, line: int | None = None, value: object = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}" + (f" line {line}" if line is not None else "") + ": "
        shown = f" (got {value!r})" if value is not None else ""
        super().__init__(f"training data {where}{reason}{shown}")
        self.reason = reason
        self.path = path
        self.line = line
        self.value = value


@dataclass(frozen=True)
class TrainResult:
    """model is in eval mode. loss_first / loss_last: MSE in normalised units on one fixed batch
    of windows, before the first and after the last optimiser step."""

    model: LSTMModel
    config: ModelConfig
    normalization: Normalization
    loss_first: float
    loss_last: float
    steps: int
    seconds: float


def _parse_timestamp(text: str) -> float:
    """Epoch seconds, from epoch seconds or ISO-8601 (naive means UTC). Raises ValueError."""
    text = text.strip()
    try:
        ts = float(text)
    except ValueError:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        ts = parsed.timestamp()
    if not math.isfinite(ts):
        raise ValueError(f"non-finite timestamp {text!r}")
    return ts


def load_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``device_id,timestamp,value`` rows (any column order, extra columns ignored).

    timestamp: epoch seconds or ISO-8601 (naive = UTC). Returns device_id -> (T, 1) float32
    values sorted by timestamp (rows with equal timestamps keep file order), devices in
    first-seen order. Every problem raises TrainingDataError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError("no such file", path)
    rows: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in CSV_COLUMNS if name not in header]
        if missing:
            raise TrainingDataError(f"missing column(s) {missing}", path, 1, header)
        reader.fieldnames = header
        try:
            for row in reader:
                line = reader.line_num
                device = (row["device_id"] or "").strip()
                if not device:
                    raise TrainingDataError("empty device_id", path, line, row["device_id"])
                raw_ts, raw_value = row["timestamp"], row["value"]
                if raw_ts is None or raw_value is None:
                    raise TrainingDataError("row has too few fields", path, line, row)
                try:
                    ts = _parse_timestamp(raw_ts)
                except ValueError:
                    raise TrainingDataError("unparsable timestamp", path, line, raw_ts) from None
                try:
                    value = float(raw_value)
                except ValueError:
                    raise TrainingDataError("unparsable value", path, line, raw_value) from None
                if not math.isfinite(value):
                    raise TrainingDataError("non-finite value", path, line, raw_value)
                rows.setdefault(device, []).append((ts, value))
        except csv.Error as exc:
            raise TrainingDataError(f"malformed CSV: {exc}", path, reader.line_num) from exc
    if not rows:
        raise TrainingDataError("no data rows", path)
    out: dict[str, np.ndarray] = {}
    for device, pairs in rows.items():
        pairs.sort(key=lambda pair: pair[0])  # stable: equal timestamps keep file order
        out[device] = np.array([value for _, value in pairs], dtype=np.float32).reshape(-1, 1)
    return out


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_threads(hidden_size: int) -> int:
    """One thread for small models: a second one saves ~20% at hidden 32 on an idle machine but
    costs ~3x when another process holds a core (the threads spin waiting for each other)."""
    if hidden_size <= SMALL_HIDDEN:
        return 1
    return min(_cpu_count(), MAX_THREADS)


def _check_sequences(sequences: list[np.ndarray]) -> int:
    """The common feature count F; raises TrainingDataError naming the first bad sequence."""
    if len(sequences) == 0:
        raise TrainingDataError("no sequences given")
    features: int | None = None
    for i, seq in enumerate(sequences):
        shape = getattr(seq, "shape", None)
        if shape is None or len(shape) != 2 or shape[1] < 1:
            raise TrainingDataError(f"sequence {i} must be a (T, F) array", value=shape)
        if features is None:
            features = shape[1]
        elif shape[1] != features:
            raise TrainingDataError(f"sequence {i} has {shape[1]} features, sequence 0 has {features}", value=shape)
        if not np.isfinite(seq).all():
            raise TrainingDataError(f"sequence {i} has non-finite values", value=int((~np.isfinite(seq)).sum()))
    assert features is not None
    return features


def _sequence_loss(model: LSTMModel, windows: Tensor) -> Tensor:
    """MSE of predicting windows[:, t + 1] from windows[:, :t + 1] for every t. windows: (B, L + 1, F)."""
    seq, _ = model.lstm(windows[:, :-1])
    return nn.functional.mse_loss(model.fc(seq), windows[:, 1:])


def train_model(
    sequences: list[np.ndarray],
    hidden_size: int = 32,
    num_layers: int = 2,
    seq_len: int = 64,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    time_budget_s: float | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Fit an LSTMModel (F -> F) to next-reading prediction on the CPU; see the module docstring.

    sequences: (T_i, F) arrays in time order, same F. Sequences shorter than seq_len + 1 are
    not sampled (they still count towards the normalisation). Stops after ``steps`` optimiser
    steps or once ``time_budget_s`` has passed (checked after each step, so at least one step).
    threads: torch intra-op threads while training (restored after); None picks by model size.
    Deterministic for a seed and thread count. Raises TrainingDataError when no sequence is long
    enough or the sequences are malformed.
    """
    if steps < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"steps, batch_size and seq_len must be >= 1, got {steps}, {batch_size}, {seq_len}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    features = _check_sequences(sequences)
    start = time.monotonic()

    data = np.concatenate([np.asarray(seq, dtype=np.float64) for seq in sequences], axis=0)
    mean = data.mean(axis=0)
    std = np.maximum(data.std(axis=0), STD_FLOOR)
    normalization = Normalization(torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))

    window = seq_len + 1
    usable = [np.asarray(seq, dtype=np.float32) for seq in sequences if len(seq) >= window]
    if not usable:
        longest = max(len(seq) for seq in sequences)
        raise TrainingDataError(f"longest sequence is shorter than seq_len + 1 = {window}", value=longest)
    # All usable sequences end to end; a window starts at offset[i] + s, s in [0, len_i - window].
    flat = torch.from_numpy((np.concatenate(usable, axis=0) - mean) / std).float()
    lengths = torch.tensor([len(seq) for seq in usable])
    offsets = torch.cumsum(lengths, 0) - lengths
    starts_per_seq = lengths - window + 1
    weights = starts_per_seq.double()  # every window equally likely
    span = torch.arange(window)

    generator = torch.Generator().manual_seed(seed)

    def sample(n: int) -> Tensor:
        which = torch.multinomial(weights, n, replacement=True, generator=generator)
        within = (torch.rand(n, generator=generator, dtype=torch.float64) * starts_per_seq[which]).long()
        return flat[(offsets[which] + within)[:, None] + span]  # (n, window, F)

    if threads is None:
        threads = _default_threads(hidden_size)
    with _torch_threads(threads):
        torch.manual_seed(seed)
        config = ModelConfig(features, hidden_size, num_layers, features)
        model = LSTMModel.from_config(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        eval_windows = sample(EVAL_WINDOWS)
        model.eval()
        with torch.no_grad():
            loss_first = _sequence_loss(model, eval_windows).item()
        model.train()
        done = 0
        while done < steps:
            optimizer.zero_grad(set_to_none=True)
            loss = _sequence_loss(model, sample(batch_size))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            if time_budget_s is not None and time.monotonic() - start >= time_budget_s:
                break
        model.eval()
        with torch.no_grad():
            loss_last = _sequence_loss(model, eval_windows).item()
    return TrainResult(model, config, normalization, loss_first, loss_last, done, time.monotonic() - start)


def save(result: TrainResult, path: str | Path, version: str) -> None:
    """Write the trained model, with its normalisation, in the model file format."""
    save_model_file(path, result.model, result.config, version, result.normalization)
