"""Train an LSTMModel to forecast each device's next reading, as `streamer run` will use it.

Data: per device, its readings in time order, ``(ts (T,) epoch seconds, values (T, F))``
(``streamer.history.load_histories`` reads them from CSV or Parquet, ``simulated_series`` makes
them). The model's input at reading t is what the engine computes for that reading
(``model_inputs``): the values normalised (running per device, fixed global, or raw), then the
time features of ts[t]; its target is reading t + 1's normalised values. Training samples random
windows of ``window`` + 1 readings and fits every step of each window from the zero state:
``model.fc`` is applied to every step of ``model.lstm``'s output, the head LSTMModel applies to
the last step, so the trained model streams unchanged.

Validation is by time: readings at or after a cutoff, the last ``val_fraction`` of the data's
time range, validate and the ones before it train, for every device. Device normalisation runs
over a device's whole history before the split, so validation inputs are the ones the engine
computes after streaming the training part. Each epoch ends with the validation loss; training
stops once it has not improved for ``patience`` epochs and keeps the best epoch's weights.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from streamer.engine import resolve_device
from streamer.errors import StreamerError
from streamer.features import REL_STD_FLOOR, check_time_features, normalize_sequences, time_features
from streamer.history import unwritable_reason
from streamer.model import MAX_LAYERS, MAX_SIZE, LSTMModel, ModelConfig, Normalization, allocation_failed, save_model_file
from streamer.settings import check_device_name
from streamer.simulate import FleetSpec, history

log = logging.getLogger("streamer.train")

Series = tuple[np.ndarray, np.ndarray]  # one device: ts (T,) epoch seconds, values (T, F)
NormalizationKind = Literal["device", "global", "none"]
NORMALIZATIONS: tuple[str, ...] = ("device", "global", "none")
STD_FLOOR = 1e-6  # global normalisation: a constant feature at 0 gets this std
# ... and one at level m at least REL_STD_FLOOR * |m| (as device normalisation floors it): a
# feature constant while training at 1e6 had made a change of 1 an input of 1e6.
MAX_THREADS = 8  # larger models gain little past a few threads
# Threads one may ask for, as for model.cpu_threads: libgomp fails to start tens of thousands
# (exit 1), or torch crashes (exit 139).
THREADS_LIMIT = 1024
# Inputs past this magnitude make float32 training overflow, whatever the lr (squares past 1e38).
LARGEST_INPUT = 1e15
SMALL_HIDDEN = 64  # up to this hidden size, train on one thread
VAL_BATCH = 1024  # validation windows per forward pass
SIM_END_TS = 1_704_067_200.0  # 2024-01-01T00:00:00Z: simulated history ends one spacing before it


class TrainingDataError(StreamerError):
    """Training data that cannot be used (files: see streamer.history.HistoryError)."""

    def __init__(self, reason: str, value: object = None) -> None:
        shown = f" (got {value!r})" if value is not None else ""
        super().__init__(f"training data: {reason}{shown}")
        self.reason = reason
        self.value = value


MAX_BATCH_SIZE = 65536  # windows per step; a step's activations grow with it, window and hidden size


class TrainOptionsError(StreamerError, ValueError):
    """A TrainOptions field out of range; names the field and the value."""

    def __init__(self, name: str, requirement: str, value: object) -> None:
        super().__init__(f"train option {name} {requirement}, got {value!r}")
        self.name = name
        self.value = value


@dataclass(frozen=True)
class TrainOptions:
    """How to train. window: readings per training window (each also gets the next reading as
    its last target); an epoch is enough random windows to cover the training readings once
    (at least one batch); val_fraction: the last part of the data's time range kept for
    validation (0: none, train for ``epochs``); patience: epochs without a better validation
    loss before stopping; normalization: "device" (running per device, weight norm_alpha),
    "global" (mean and std of the training readings) or "none"; device: "auto" is cuda when
    available; time_budget_s: stop after the step that passes it; threads: torch CPU threads
    (None: one for small models); progress: a tqdm bar on stderr (when it is a terminal);
    ttl_seconds: the serving state.ttl_seconds (None: never): a device idle longer is evicted by
    the engine and starts again from zero state and a fresh normalisation, so a series is cut
    there into series of their own (see ``split_at_gaps``)."""

    hidden_size: int = 32
    num_layers: int = 2
    window: int = 64
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-2
    val_fraction: float = 0.2
    patience: int = 3
    time_features: tuple[str, ...] = ()
    normalization: NormalizationKind = "device"
    norm_alpha: float = 1e-3
    device: str = "auto"
    seed: int = 0
    time_budget_s: float | None = None
    progress: bool = True
    threads: int | None = None
    ttl_seconds: float | None = 86400.0  # state.ttl_seconds' default

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "window", "epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainOptionsError(name, "must be an int >= 1", value)
        if self.hidden_size > MAX_SIZE:  # as a model file's config is bounded (torch's sizes overflow past it)
            raise TrainOptionsError("hidden_size", f"must be at most {MAX_SIZE}", self.hidden_size)
        if self.num_layers > MAX_LAYERS:
            raise TrainOptionsError("num_layers", f"must be at most {MAX_LAYERS}", self.num_layers)
        if self.batch_size > MAX_BATCH_SIZE:  # its activations would not fit any host's memory
            raise TrainOptionsError("batch_size", f"must be at most {MAX_BATCH_SIZE}", self.batch_size)
        if self.threads is not None and (not isinstance(self.threads, int) or not 1 <= self.threads <= THREADS_LIMIT):
            raise TrainOptionsError("threads", f"must be None or an int in [1, {THREADS_LIMIT}]", self.threads)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainOptionsError("lr", "must be a finite number > 0", self.lr)
        if not (isinstance(self.val_fraction, int | float) and 0 <= self.val_fraction < 1):
            raise TrainOptionsError("val_fraction", "must be in [0, 1)", self.val_fraction)
        if not (isinstance(self.norm_alpha, int | float) and 0 < self.norm_alpha <= 1):
            raise TrainOptionsError("norm_alpha", "must be in (0, 1]", self.norm_alpha)
        if self.normalization not in NORMALIZATIONS:
            raise TrainOptionsError("normalization", f"must be one of {NORMALIZATIONS}", self.normalization)
        if self.time_budget_s is not None and not self.time_budget_s >= 0:
            raise TrainOptionsError("time_budget_s", "must be None or >= 0", self.time_budget_s)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise TrainOptionsError("seed", "must be an int >= 0", self.seed)
        if self.ttl_seconds is not None and not (isinstance(self.ttl_seconds, int | float) and self.ttl_seconds > 0):
            raise TrainOptionsError("ttl_seconds", "must be None or > 0", self.ttl_seconds)
        try:
            object.__setattr__(self, "time_features", check_time_features(self.time_features))
        except (TypeError, ValueError) as exc:
            raise TrainOptionsError("time_features", str(exc), self.time_features) from None
        try:
            check_device_name(self.device)
        except ValueError:
            raise TrainOptionsError("device", "must be auto, cpu, cuda or cuda:N (N from 0 to 127)", self.device) from None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-like values (time_features as a list; norm_alpha None unless normalization
        is "device", the only one that uses it: a value there read as if the model used it)."""
        out = asdict(self)
        out["time_features"] = list(self.time_features)
        if self.normalization != "device":
            out["norm_alpha"] = None
        return out


@dataclass(frozen=True)
class DataSummary:
    """What was trained on. first_ts / last_ts: epoch seconds over all devices; cutoff_ts:
    validation holds the readings at or after it (None: no validation split)."""

    first_ts: float
    last_ts: float
    cutoff_ts: float | None
    devices: int
    train_readings: int
    val_readings: int


@dataclass(frozen=True)
class EpochLoss:
    """train_loss: mean MSE of the epoch's batches; val_loss: MSE over every validation
    transition (None without validation). Normalised units, per value."""

    epoch: int
    train_loss: float
    val_loss: float | None


@dataclass(frozen=True)
class TrainResult:
    """model: eval mode, on the CPU, with the best epoch's weights (the last epoch's without
    validation). train_loss / val_loss: that epoch's. normalization: set for "global" only."""

    model: LSTMModel
    config: ModelConfig
    normalization: Normalization | None
    options: TrainOptions
    data: DataSummary
    train_loss: float
    val_loss: float | None
    best_epoch: int
    epochs_run: int
    steps: int
    epoch_losses: tuple[EpochLoss, ...]
    seconds: float
    device: str
    threads: int = 1  # torch CPU threads used: with the seed, what makes the weights reproducible


def model_inputs(
    series: Sequence[Series], config: ModelConfig, normalization: Normalization | None = None
) -> list[np.ndarray]:
    """Per device, the LSTM's input at each of its readings, as the engine computes it:
    (T_i, config.input_size) float32 = [z (T_i, F), time_features(ts, config.time_features)],
    z the values normalised as config and normalization say (device running normalisation
    from the device's first reading on; else (x - mean) / std; else x). Row t + 1's first F
    columns are the target of row t.
    """
    values = [np.asarray(v, dtype=np.float32) for _, v in series]
    if config.device_norm_alpha is not None:
        z = normalize_sequences(values, config.device_norm_alpha)
    elif normalization is not None:
        mean = normalization.mean.detach().cpu().numpy()
        std = normalization.std.detach().cpu().numpy()
        z = [(v - mean) / std for v in values]
    else:
        z = values
    if not config.time_features:
        return z
    return [np.concatenate([zi, time_features(ts, config.time_features)], axis=1) for (ts, _), zi in zip(series, z)]


def simulated_series(spec: FleetSpec, readings: int, end_ts: float = SIM_END_TS) -> list[Series]:
    """``streamer.simulate.history(spec, readings)`` with timestamps: one reading every
    86400 / spec.period s (a simulated day is a day, so time features follow its daily cycle),
    the last one spacing before end_ts. Devices in fleet order."""
    spacing = 86_400.0 / spec.period
    ts = end_ts + spacing * np.arange(-readings, 0, dtype=np.float64)
    return [(ts, values) for values in history(spec, readings)]


def check_output_path(path: str | Path) -> None:
    """Raise StreamerError naming path when a model file cannot be written there (the path is a
    directory, or its directory is missing or not writable), or would replace what is not a
    file: it is written beside the path and renamed over it (a device or a FIFO would be gone,
    /dev/null too when run as root)."""
    path = Path(path)
    reason = unwritable_reason(path)
    if reason is None and path.exists() and not path.is_file():
        reason = "is not a regular file (a device, a FIFO or a socket), which the model file would replace"
    if reason is not None:
        raise StreamerError(f"cannot write model file {path}: {reason}")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _check_series(series: Sequence[Series]) -> tuple[list[Series], int]:
    """(series as float64 ts and float32 values, value count F); TrainingDataError naming the
    first bad series otherwise."""
    if len(series) == 0:
        raise TrainingDataError("no series given")
    out: list[Series] = []
    features: int | None = None
    for i, item in enumerate(series):
        ts, values = (np.asarray(a) for a in item)
        if ts.ndim != 1 or values.ndim != 2 or values.shape[1] < 1 or len(ts) != len(values) or len(ts) == 0:
            raise TrainingDataError(f"series {i} must be ts (T,) and values (T, F) with T, F >= 1",
                                    (ts.shape, values.shape))
        if features is None:
            features = values.shape[1]
        elif values.shape[1] != features:
            raise TrainingDataError(f"series {i} has {values.shape[1]} values per reading, series 0 has {features}")
        if not (np.isfinite(ts).all() and np.isfinite(values).all()):
            raise TrainingDataError(f"series {i} has non-finite timestamps or values")
        if (np.diff(ts) < 0).any():
            raise TrainingDataError(f"series {i} is not in time order", int(np.argmax(np.diff(ts) < 0)) + 1)
        out.append((ts.astype(np.float64), values.astype(np.float32)))
    assert features is not None
    return out, features


def split_at_gaps(series: Sequence[Series], ttl_seconds: float | None) -> list[Series]:
    """Each series cut where a reading comes more than ``ttl_seconds`` after the one before it
    (the engine's TTL eviction: ``last_seen < now - ttl``), into series of their own: there the
    engine starts the device again from zero state and a fresh running normalisation, and
    normalised straight through, training had fitted inputs the engine never computes."""
    if ttl_seconds is None:
        return list(series)
    out: list[Series] = []
    for ts, values in series:
        cuts = np.flatnonzero(ts[:-1] < ts[1:] - ttl_seconds) + 1
        out.extend(zip(np.split(ts, cuts), np.split(values, cuts)))
    return out


def _global_normalization(parts: list[np.ndarray]) -> Normalization:
    data = np.concatenate(parts, axis=0).astype(np.float64)
    mean = data.mean(axis=0)
    std = np.maximum(data.std(axis=0), np.maximum(REL_STD_FLOOR * np.abs(mean), STD_FLOOR))
    return Normalization(torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))


class _TrainWindows:
    """Random windows of ``length`` consecutive rows of the pieces at least that long, every
    window equally likely; sample(n) -> (n, length, D) on device."""

    def __init__(self, pieces: list[np.ndarray], length: int, device: torch.device, generator: torch.Generator):
        usable = [p for p in pieces if len(p) >= length]
        self.flat = torch.from_numpy(np.concatenate(usable, axis=0)).to(device)
        lengths = torch.tensor([len(p) for p in usable])
        self.offsets = torch.cumsum(lengths, 0) - lengths
        self.starts = lengths - length + 1
        self.weights = self.starts.double()
        self.span = torch.arange(length)
        self.generator = generator

    def sample(self, n: int) -> Tensor:
        which = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        within = (torch.rand(n, generator=self.generator, dtype=torch.float64) * self.starts[which]).long()
        return self.flat[((self.offsets[which] + within)[:, None] + self.span).to(self.flat.device)]


def _validation_windows(pieces: list[np.ndarray], window: int) -> tuple[Tensor, Tensor] | None:
    """Every transition (row t -> t + 1) of the pieces exactly once, in windows of up to
    window + 1 rows run from the zero state: (N, W + 1, D) zero padded and (N, W) bool mask of
    real targets, W <= window. None when no piece has two rows."""
    chunks = [p[s : s + window + 1] for p in pieces for s in range(0, len(p) - 1, window)]
    if not chunks:
        return None
    width = max(len(c) for c in chunks)
    windows = np.zeros((len(chunks), width, chunks[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(chunks), width - 1), dtype=bool)
    for i, chunk in enumerate(chunks):
        windows[i, : len(chunk)] = chunk
        mask[i, : len(chunk) - 1] = True
    return torch.from_numpy(windows), torch.from_numpy(mask)


def _window_loss(model: LSTMModel, windows: Tensor, features: int) -> Tensor:
    """MSE of forecasting rows 1.. (their first ``features`` columns) from rows ..-1. (B, L + 1, D)."""
    seq, _ = model.lstm(windows[:, :-1])
    return nn.functional.mse_loss(model.fc(seq), windows[:, 1:, :features])


@torch.no_grad()
def _validation_loss(model: LSTMModel, windows: Tensor, mask: Tensor, features: int) -> float:
    total = 0.0
    for s in range(0, len(windows), VAL_BATCH):
        w, m = windows[s : s + VAL_BATCH], mask[s : s + VAL_BATCH]
        seq, _ = model.lstm(w[:, :-1])
        total += (model.fc(seq) - w[:, 1:, :features]).double().pow(2).sum(-1)[m].sum().item()  # float64: no overflow of the sum
    return total / (int(mask.sum()) * features)


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


def train_model(series: Sequence[Series], options: TrainOptions = TrainOptions()) -> TrainResult:
    """Fit an LSTMModel to next-reading forecasting; see the module docstring.

    series: per device (ts (T,), values (T, F)), ts non-decreasing, same F for all.
    Deterministic for a seed and thread count on the CPU. Raises TrainingDataError for
    malformed series, no readings before the validation cutoff, or no device with window + 1
    readings before it; StreamerError when the loss turns non-finite or the device is missing.
    Validation is skipped, with a warning, when no device has two readings after the cutoff.
    """
    start = time.monotonic()
    checked, features = _check_series(series)
    devices = len(checked)
    checked = split_at_gaps(checked, options.ttl_seconds)
    device = resolve_device(options.device)
    first_ts = min(float(ts[0]) for ts, _ in checked)
    last_ts = max(float(ts[-1]) for ts, _ in checked)
    cutoff = first_ts + (1 - options.val_fraction) * (last_ts - first_ts) if options.val_fraction > 0 else None
    splits = [len(ts) if cutoff is None else int(np.searchsorted(ts, cutoff, side="left")) for ts, _ in checked]
    train_readings = sum(splits)
    val_readings = sum(len(ts) for ts, _ in checked) - train_readings
    data = DataSummary(first_ts, last_ts, cutoff, devices, train_readings, val_readings)
    if train_readings == 0:
        raise TrainingDataError("no readings before the validation cutoff", _iso(cutoff or first_ts))

    normalization = None
    if options.normalization == "global":
        normalization = _global_normalization([values[:k] for (_, values), k in zip(checked, splits)])
    tf = options.time_features
    config = ModelConfig(
        features + 2 * len(tf), options.hidden_size, options.num_layers, features, tf,
        options.norm_alpha if options.normalization == "device" else None,
    )
    inputs = model_inputs(checked, config, normalization)
    train_pieces = [x[:k] for x, k in zip(inputs, splits)]
    longest = max(len(p) for p in train_pieces)
    if longest < options.window + 1:
        cuts = len(checked) - devices
        because = "" if not cuts else (
            f" (the series are cut at {cuts} gaps longer than ttl_seconds = {options.ttl_seconds:g} s, where the"
            " engine starts a device again: readings spaced wider than that need a larger --state-ttl-seconds)")
        raise TrainingDataError(
            f"no device has window + 1 = {options.window + 1} readings before the validation cutoff{because}; "
            "use a smaller window or val_fraction", longest)
    val_set = _validation_windows([x[k:] for x, k in zip(inputs, splits)], options.window)
    if val_set is None and cutoff is not None:
        log.warning("no validation: no device has two readings after the cutoff %s; training for %d epochs",
                    _iso(cutoff), options.epochs)
    log.info("training on %d device(s), %s .. %s: %d readings, %d for validation (from %s), on %s",
             data.devices, _iso(first_ts), _iso(last_ts), data.train_readings, data.val_readings,
             _iso(cutoff) if cutoff is not None else "-", device)

    generator = torch.Generator().manual_seed(options.seed)
    sampler = _TrainWindows(train_pieces, options.window + 1, device, generator)
    if val_set is not None:
        val_set = (val_set[0].to(device), val_set[1].to(device))
    windows_per_epoch = math.ceil(train_readings / options.window)
    steps_per_epoch = max(1, math.ceil(windows_per_epoch / options.batch_size))
    # The largest input the model sees: past float32's comfort (raw values near 1e18, or a
    # global normalisation of a value constant in training and not in validation), the loss
    # overflows whatever the lr, or stays finite near peak² with nothing learnt (values of 1e17:
    # a loss of 4e35, and a model written as if trained). Refused before training, saying why.
    peak = max(float(np.abs(x).max()) if len(x) else 0.0 for x in inputs)
    if peak > LARGEST_INPUT:
        remedy = ("use normalization 'device' (or 'global' where values vary in training)"
                  if options.normalization == "none" else
                  "a value lies that far outside the spread of the training readings (a column nearly constant"
                  " in training): use normalization 'device'")
        raise StreamerError(f"the model's inputs reach {peak:.3g} under normalization {options.normalization!r},"
                            f" too large for float32 training (at most {LARGEST_INPUT:.0e}); {remedy}")
    threads = options.threads or _default_threads(options.hidden_size)
    with _torch_threads(threads):
        torch.manual_seed(options.seed)
        try:
            model = LSTMModel.from_config(config).to(device)
        except (MemoryError, RuntimeError) as exc:
            if not allocation_failed(exc):
                raise
            raise TrainOptionsError(
                "hidden_size", f"makes a model too big for the memory of {device} with {options.num_layers} layers"
                f" ({str(exc).strip().splitlines()[0][:120] or type(exc).__name__})", options.hidden_size) from None
        try:
            losses, best_epoch, steps = _fit(model, sampler, val_set, features, steps_per_epoch, options, start)
        except (MemoryError, RuntimeError) as exc:
            if not allocation_failed(exc):
                raise
            raise TrainOptionsError(
                "batch_size", f"is too big for the memory of {device} at window {options.window} and hidden size"
                f" {options.hidden_size} ({str(exc).strip().splitlines()[0][:120] or type(exc).__name__})",
                options.batch_size) from None
    best = losses[best_epoch - 1]
    return TrainResult(
        model.cpu().eval(), config, normalization, options, data, best.train_loss, best.val_loss, best_epoch,
        len(losses), steps, tuple(losses), time.monotonic() - start, str(device), threads,
    )


def _fit(
    model: LSTMModel,
    sampler: _TrainWindows,
    val_set: tuple[Tensor, Tensor] | None,
    features: int,
    steps_per_epoch: int,
    options: TrainOptions,
    start: float,
) -> tuple[list[EpochLoss], int, int]:
    """Train ``model`` in place for up to options.epochs epochs of steps_per_epoch steps, then
    load the best epoch's weights. Returns (per-epoch losses, best epoch (1-based), steps).
    Stops early on patience, or once options.time_budget_s has passed since ``start``
    (time.monotonic()) after a step; the epoch cut short is still validated."""
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    losses: list[EpochLoss] = []
    best_state: dict[str, Tensor] | None = None
    best_val = math.inf
    best_epoch = stale = steps = 0
    bar = tqdm(total=options.epochs * steps_per_epoch, desc="train", unit="step", file=sys.stderr,
               disable=None if options.progress else True, dynamic_ncols=True)
    try:
        for epoch in range(1, options.epochs + 1):
            model.train()
            total, done = 0.0, 0
            out_of_time = False
            for _ in range(steps_per_epoch):
                optimizer.zero_grad(set_to_none=True)
                loss = _window_loss(model, sampler.sample(options.batch_size), features)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                total, done, steps = total + loss.item(), done + 1, steps + 1
                bar.update(1)
                if options.time_budget_s is not None and time.monotonic() - start >= options.time_budget_s:
                    out_of_time = True
                    break
            model.eval()
            train_loss = total / done
            val_loss = None if val_set is None else _validation_loss(model, *val_set, features)
            losses.append(EpochLoss(epoch, train_loss, val_loss))
            bar.set_postfix(epoch=epoch, loss=f"{train_loss:.4g}", val="-" if val_loss is None else f"{val_loss:.4g}")
            if not math.isfinite(train_loss) or (val_loss is not None and not math.isfinite(val_loss)):
                raise StreamerError(f"training diverged at epoch {epoch} (loss {train_loss}, validation "
                                    f"loss {val_loss}); try a smaller lr than {options.lr}")
            if val_loss is None:  # nothing to choose by: the last epoch is the best
                best_epoch = epoch
            elif val_loss < best_val:
                best_val, best_epoch, stale = val_loss, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            if out_of_time or stale >= options.patience:
                break
    finally:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return losses, best_epoch, steps


def training_meta(result: TrainResult) -> dict[str, object]:
    """What the model file records about its training: plain JSON-like values."""
    data = result.data
    return {
        "data": {
            "first": _iso(data.first_ts),
            "last": _iso(data.last_ts),
            "validation_from": _iso(data.cutoff_ts) if data.cutoff_ts is not None else None,
            "devices": data.devices,
            "train_readings": data.train_readings,
            "val_readings": data.val_readings,
        },
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "steps": result.steps,
        "epoch_losses": [[e.train_loss, e.val_loss] for e in result.epoch_losses],
        "options": result.options.to_dict(),
        "seconds": round(result.seconds, 3),
        "device": result.device,
        "threads": result.threads,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save(result: TrainResult, path: str | Path, version: str, extra_meta: dict[str, object] | None = None) -> None:
    """Write the model file: weights, config, normalisation, and meta = training_meta(result)
    plus extra_meta (e.g. the data source; its keys must not clash with training_meta's)."""
    meta = training_meta(result)
    clash = sorted(set(meta) & set(extra_meta or {}))
    if clash:
        raise ValueError(f"extra_meta keys {clash} clash with the training meta")
    save_model_file(path, result.model, result.config, version, result.normalization, {**meta, **(extra_meta or {})})
