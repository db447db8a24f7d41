"""Anomaly scores from forecast residuals: a per-device anomaly likelihood in [0, 1].

For a device's reading (normalised units, see streamer.features) and the forecast it made one
step earlier, the residual is r = RMS over features of (reading - forecast). Each device keeps,
in its state row: ``n`` (residuals folded in since its statistics (re)started), the long-run
mean of its residuals, a short-run mean of its residuals (weight max(1/n, short_alpha): about
the last 1/short_alpha residuals), the long-run mean square of (short - long mean), and
``streak`` (consecutive readings with tail probability below ADAPT_TAIL). Long-run statistics
are exact while 1/n > long_alpha, then exponentially weighted with long_alpha.

The tail probability of a reading is P(Z > z), Z standard normal, with
z = (short mean - long mean) / max(sqrt(mean square), min_std * sqrt(short_alpha / (2 - short_alpha))):
how unusual the recent residual level is against the device's own history of that level. The
short mean's spread is measured, not derived from the residuals' variance, so residuals that
are correlated in time (a model that misses a whole phase of a cycle) do not inflate scores.
The anomaly score is 1 - tail: the same scale on every device whatever its units or noise,
and a threshold p flags readings whose recent residual level is beyond the device's usual
p-quantile (0.9999: about one reading in 10,000 on a device behaving as it used to).
The threshold only decides flags; scores and statistics never depend on it.

Behaviour that changes for good: once ``adapt_after`` readings in a row have tail < ADAPT_TAIL,
the device's residual statistics (and its running input normalisation, when the model uses
one) start afresh, as a new device's would, so the new behaviour becomes its normal: flags stop
within adapt_after + warmup readings of a lasting change. Scores start after ``warmup``
residuals (at least 2) since the statistics (re)started; before that the score is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Residuals are capped (normalised units) so that absurd readings that are still finite, say
# 1e20 with a fixed normalisation, cannot overflow the float32 statistics.
RESIDUAL_CAP = 1e6
# Statistics are kept of residual ** RESIDUAL_POWER: a residual of independent noise is |noise|,
# whose short means are skewed to the right; the power makes them near normal, so that tail
# probabilities hold in the far tail too (see tests/test_anomaly.py for the measured rates).
RESIDUAL_POWER = 0.5  # applied as a square root
ADAPT_TAIL = 1e-3  # a reading this unlikely counts towards a lasting change
LOG_ADAPT_TAIL = math.log(ADAPT_TAIL)


@dataclass(frozen=True)
class AnomalyParams:
    threshold: float = 0.9999  # flag when the anomaly score (1 - tail probability) is >= this
    warmup: int = 50  # residuals a device's statistics need before it is scored
    short_alpha: float = 0.5  # weight of a new residual in the short-run mean (~ the last 1/alpha)
    long_alpha: float = 0.001  # weight of a new residual in the long-run mean and variance
    min_std: float = 1e-2  # floor of the long-run residual std (normalised units)
    adapt_after: int = 100  # readings in a row with tail < ADAPT_TAIL before statistics restart

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("short_alpha", "long_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.min_std <= 0 or self.warmup < 0 or self.adapt_after < 1:
            raise ValueError(f"min_std > 0, warmup >= 0 and adapt_after >= 1 needed, got {self}")

    @property
    def log_tail_threshold(self) -> float:
        """ln(1 - threshold): flag readings whose ln(tail) is at or below it."""
        return math.log1p(-self.threshold)


@dataclass(frozen=True)
class Scored:
    """log_tail: (B,) ln P(Z > z), 0 where not scored; is_anomaly (B,) bool; restart (B,) bool:
    devices whose statistics restart after this reading; the rest: (B,) updated statistics
    (var: the mean square of short - mean), all zeros where restart (see ``stacked``)."""

    log_tail: Tensor
    is_anomaly: Tensor
    restart: Tensor
    n: Tensor
    mean: Tensor
    var: Tensor
    short: Tensor
    streak: Tensor


def residual_of(x: Tensor, forecast: Tensor) -> Tensor:
    """RMS over features of x - forecast, both (B, F) in normalised units -> (B,), capped."""
    diff = (x - forecast).clamp(-RESIDUAL_CAP, RESIDUAL_CAP)
    return torch.sqrt(torch.mean(diff * diff, dim=1))


def score_and_update(
    residual: Tensor,
    has_residual: Tensor,
    n: Tensor,
    mean: Tensor,
    var: Tensor,
    short: Tensor,
    streak: Tensor,
    params: AnomalyParams,
) -> Scored:
    """Score residuals (B,) and fold them into the devices' statistics (all (B,), float32).

    has_residual: (B,) bool, False for a device's first reading (no forecast yet): it is not
    scored and leaves the statistics as they are. var: the mean square of short - mean.
    """
    level = torch.sqrt(residual)  # residual ** RESIDUAL_POWER
    short_new = short + torch.clamp(1.0 / (n + 1.0), min=params.short_alpha) * (level - short)
    floor = params.min_std * math.sqrt(params.short_alpha / (2.0 - params.short_alpha))
    excess = short_new - mean
    z = excess / torch.sqrt(var).clamp_min(floor)
    scored = has_residual & (n >= max(params.warmup, 2))
    log_tail = torch.where(scored, torch.special.log_ndtr(-z), torch.zeros_like(z))
    is_anomaly = scored & (log_tail <= params.log_tail_threshold)

    weight = torch.clamp(1.0 / (n + 1.0), min=params.long_alpha)
    mean_new = torch.where(has_residual, mean + weight * (level - mean), mean)
    var_new = torch.where(has_residual, var + weight * (excess * excess - var), var)
    short_new = torch.where(has_residual, short_new, short)
    n_new = torch.where(has_residual, n + 1.0, n)
    streak_new = torch.where(scored & (log_tail <= LOG_ADAPT_TAIL), streak + 1.0, torch.zeros_like(streak))
    restart = streak_new >= params.adapt_after
    # One select over the stacked statistics, not one per statistic: this runs every step.
    stats = torch.stack([n_new, mean_new, var_new, short_new, streak_new], dim=1)
    stats = torch.where(restart.unsqueeze(1), torch.zeros((), dtype=stats.dtype, device=stats.device), stats)
    return Scored(log_tail, is_anomaly, restart, *stats.unbind(1))
