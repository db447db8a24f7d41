"""The scoring half of a wave's step, around the LSTM: one code for the eager step
(Engine._step_wave) and the compiled one (streamer.compiled.wave_maths).

``col(columns)`` reads columns of the wave's gathered rows by their place in a whole row
(engine.StateLayout: an int or a slice); each step gathers its rows its own way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from torch import Tensor

from streamer.anomaly import AnomalyParams, Records, Scored, record_breaks, residual_of, score_and_update
from streamer.features import denormalize, normalize_step

if TYPE_CHECKING:
    from streamer.engine import StateLayout

Columns = Callable[[int | slice], Tensor]


class WaveScores(NamedTuple):
    """x: the LSTM's input (values normalised per device when the model says so); residual,
    seen (readings before this one), records and scored as anomaly's; norm: the per-device
    normalisation after this reading (count before it, mean, var), or None."""

    x: Tensor
    residual: Tensor
    seen: Tensor
    records: Records
    scored: Scored
    norm: tuple[Tensor, Tensor, Tensor] | None


def score_wave(x: Tensor, col: Columns, layout: "StateLayout", anomaly: AnomalyParams,
               norm_alpha: float | None) -> WaveScores:
    """Normalise and score a wave's readings x (b, values + time features) against its rows."""
    f, s = layout.values_size, layout.seen
    seen, n, mean, var, short, var_one, streak, peak = col(slice(s, s + layout.STATS)).unbind(1)
    values = x[:, :f]
    norm = None
    if layout.device_norm:
        count = col(layout.norm_count)
        z, norm_mean, norm_var = normalize_step(values, count, col(layout.norm_mean), col(layout.norm_var), norm_alpha)
        x = torch.cat([z, x[:, f:]], dim=1) if x.shape[1] > f else z
        norm = (count, norm_mean, norm_var)
    has_forecast = seen >= 1
    residual = torch.where(has_forecast, residual_of(x[:, :f], col(layout.forecast)), torch.zeros_like(seen))
    run, longest = col(layout.runs).unbind(1)
    records = record_breaks(values, has_forecast, n, col(layout.low), col(layout.high), col(layout.last), run, longest,
                            anomaly)
    scored = score_and_update(
        residual, has_forecast, n, mean, var, short, var_one, streak, peak, records.broke, records.beyond_range, anomaly,
    )
    return WaveScores(x, residual, seen, records, scored, norm)


def row_after(out: Tensor, scores: WaveScores) -> tuple[Tensor, Tensor]:
    """(the rows' columns from the forecast on, as StateLayout orders them, the forecast in the
    readings' units (or the globally normalised ones)) after the LSTM gave ``out``."""
    parts = [out]
    if scores.norm is not None:
        count, norm_mean, norm_var = scores.norm
        parts += [torch.where(scores.scored.restart, torch.zeros_like(count), count + 1.0).unsqueeze(1), norm_mean,
                  norm_var]
        out = denormalize(out, norm_mean, norm_var)
    scored = scores.scored
    stats = torch.stack(
        [scores.seen + 1.0, scored.n, scored.mean, scored.var, scored.short, scored.var_one, scored.streak, scored.peak],
        dim=1,
    )
    return torch.cat(parts + [stats, scores.records.columns()], dim=1), out


def not_finite(out: Tensor, log_tail: Tensor, residual: Tensor) -> Tensor:
    """(b,) bool: the readings whose forecast or residual is NaN or infinite, or whose tail is NaN
    (Engine._reset_not_finite zeroes their devices' rows)."""
    return ~(torch.isfinite(out).all(dim=1) & torch.isfinite(residual)) | torch.isnan(log_tail)
