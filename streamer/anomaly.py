"""Anomaly scores from forecast residuals, with running residual statistics per device.

For a device's reading x (normalised units) and the forecast it made one step earlier, the
residual is r = RMS over features of (x - forecast). Each device keeps: ``seen`` (readings
consumed), and the mean and variance of its past residuals, exact while few (weight 1/n) and
exponentially weighted once 1/n < alpha, so old behaviour fades out.

score = (r - mean) / max(std, min_std), once the device has at least two past residuals, else 0.
A reading is flagged when score > threshold and at least ``warmup`` readings came before it.
Residuals enter the statistics winsorised at mean + threshold * std, so one spike does not
blind the detector to the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Residuals are capped (normalised units) so that absurd readings that are still finite, say
# 1e20, cannot overflow the float32 statistics: anything near the cap is an anomaly anyway.
RESIDUAL_CAP = 1e6


@dataclass(frozen=True)
class AnomalyParams:
    threshold: float = 4.0
    warmup: int = 10
    alpha: float = 0.01
    min_std: float = 1e-3


@dataclass(frozen=True)
class Scored:
    score: Tensor  # (B,)
    is_anomaly: Tensor  # (B,) bool
    seen: Tensor  # (B,) updated statistics
    mean: Tensor
    var: Tensor


def score_and_update(
    x: Tensor, forecast: Tensor, seen: Tensor, mean: Tensor, var: Tensor, params: AnomalyParams
) -> Scored:
    """Score readings x (B, F) against the previous forecasts (B, F) and fold in the residuals.

    seen, mean, var: (B,) the devices' statistics before these readings.
    """
    diff = (x - forecast).clamp(-RESIDUAL_CAP, RESIDUAL_CAP)
    residual = torch.sqrt(torch.mean(diff * diff, dim=1))
    has_residual = seen >= 1
    past = seen - 1  # residuals already folded into mean/var
    std = torch.sqrt(var).clamp_min(params.min_std)
    scorable = past >= 2
    score = torch.where(scorable, (residual - mean) / std, torch.zeros_like(residual))
    is_anomaly = scorable & (seen >= params.warmup) & (score > params.threshold)

    capped = torch.where(scorable, torch.minimum(residual, mean + params.threshold * std), residual)
    weight = torch.clamp(1.0 / (past + 1).clamp_min(1), min=params.alpha)
    delta = capped - mean
    new_mean = torch.where(has_residual, mean + weight * delta, mean)
    new_var = torch.where(has_residual, (1 - weight) * (var + weight * delta * delta), var)
    return Scored(score, is_anomaly, seen + 1, new_mean, new_var)
