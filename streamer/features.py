"""What the LSTM sees of a reading: its values, normalised, and optional features of its time.

The same functions serve training, `streamer run` and `streamer replay`, so a model sees the
same inputs offline and live.

- Time features: for each period named in the model file (``day``, ``week``), the sine and
  cosine of the reading's phase in that period, from its epoch-seconds ``ts`` (UTC).
- Normalisation, chosen by the model file: ``global`` (one mean and std per feature, fixed at
  training time), ``device`` (a running mean and variance per device and feature, kept in the
  device's state row; exact over its first 1/alpha readings, exponentially weighted after, so
  it follows level shifts), or none.

Running normalisation of a reading x with the device's statistics (n readings seen, mean m,
variance v): first fold x in with weight w = max(1 / (n + 1), alpha), then
z = (x - m) / (sqrt(v) + REL_STD_FLOOR * |m|), clamped to +-Z_CAP; z = 0 where that std is 0
(the device has only ever read x). Scale invariant: a device reading 1e6 times another's
values gets the same z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

TIME_PERIODS: dict[str, float] = {"day": 86_400.0, "week": 7 * 86_400.0}
REL_STD_FLOOR = 1e-4  # a std below 0.01% of the level is treated as that much
Z_CAP = 20.0  # normalised inputs are clamped here: beyond it a reading is anomalous anyway


def check_time_features(names: Sequence[str]) -> tuple[str, ...]:
    """The names as a tuple; ValueError naming the first unknown or repeated one."""
    seen: list[str] = []
    for name in names:
        if name not in TIME_PERIODS:
            raise ValueError(f"unknown time feature {name!r} (known: {', '.join(TIME_PERIODS)})")
        if name in seen:
            raise ValueError(f"time feature {name!r} given twice")
        seen.append(name)
    return tuple(seen)


def time_features(ts: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """(n, 2 * len(names)) float32: per name, sin and cos of 2 pi (ts mod period) / period.

    ts: (n,) epoch seconds. Computed in float64 before the cast, so that 2026's epoch seconds
    keep sub-second phase.
    """
    ts = np.asarray(ts, dtype=np.float64)
    out = np.empty((len(ts), 2 * len(names)), dtype=np.float32)
    for k, name in enumerate(names):
        period = TIME_PERIODS[name]
        phase = (2 * math.pi / period) * np.mod(ts, period)
        out[:, 2 * k] = np.sin(phase)
        out[:, 2 * k + 1] = np.cos(phase)
    return out


def normalize_step(
    x: Tensor, seen: Tensor, mean: Tensor, var: Tensor, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Running normalisation of one reading per device.

    x, mean, var: (B, F); seen: (B,) readings the devices consumed before x.
    Returns (z (B, F), mean', var') with x folded into the statistics.
    """
    weight = torch.clamp(1.0 / (seen + 1.0), min=alpha).unsqueeze(1)
    delta = x - mean
    # Once the weights are exponential (seen >= 1 / alpha), a reading folds in at most Z_CAP of
    # the device's spreads from its mean: one absurd reading (1e18 where the device reads 20)
    # had grown the variance by 30 orders, and every z after it was 0 for ~ln(1e30) / alpha
    # readings. A lasting change still moves the statistics, by Z_CAP spreads a reading.
    spread = _scale(mean, var)
    bound = torch.where((seen * alpha >= 1.0).unsqueeze(1) & (spread > 0), Z_CAP * spread, torch.full_like(spread, math.inf))
    delta = delta.clamp(-bound, bound)
    mean = mean + weight * delta
    var = (1.0 - weight) * (var + weight * delta * delta)
    std = _scale(mean, var)
    z = torch.where(std > 0, (x - mean) / torch.where(std > 0, std, 1.0), torch.zeros_like(x))
    return z.clamp(-Z_CAP, Z_CAP), mean, var


def denormalize(forecast: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """A forecast in a device's normalised units back to reading units, with its current stats."""
    return forecast * _scale(mean, var) + mean


def _scale(mean: Tensor, var: Tensor) -> Tensor:
    """The std a device's values are divided by: sqrt(var), floored relative to the level."""
    return torch.sqrt(var) + REL_STD_FLOOR * mean.abs()


def normalize_sequences(sequences: Sequence[np.ndarray], alpha: float) -> list[np.ndarray]:
    """Running normalisation of whole per-device sequences, as the engine applies it reading by
    reading: the same float32 operations, batched over devices, one step per time index.

    sequences: per device (T_i, F) float. Returns per device (T_i, F) float32.
    """
    return [z for z, _, _ in normalize_sequences_with_stats(sequences, alpha)]


def normalize_sequences_with_stats(
    sequences: Sequence[np.ndarray], alpha: float
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """As normalize_sequences, with the running mean and variance after each reading:
    per device (z, mean, var), each (T_i, F) float32."""
    if not sequences:
        return []
    features = sequences[0].shape[1]
    lengths = np.array([len(s) for s in sequences])
    horizon = int(lengths.max(initial=0))
    padded = np.zeros((len(sequences), horizon, features), dtype=np.float32)
    for i, seq in enumerate(sequences):
        padded[i, : len(seq)] = seq
    x_all = torch.from_numpy(padded)
    z_all = torch.empty_like(x_all)
    mean_all = torch.empty_like(x_all)
    var_all = torch.empty_like(x_all)
    b = len(sequences)
    mean = torch.zeros(b, features)
    var = torch.zeros(b, features)
    with torch.inference_mode():
        for t in range(horizon):
            # Devices whose sequence ended are stepped on padding; their outputs are dropped.
            seen = torch.full((b,), float(t))
            z_all[:, t], mean, var = normalize_step(x_all[:, t], seen, mean, var, alpha)
            mean_all[:, t], var_all[:, t] = mean, var
    return [
        tuple(a[i, : lengths[i]].numpy().copy() for a in (z_all, mean_all, var_all))  # type: ignore[misc]
        for i in range(len(sequences))
    ]
