"""Anomaly scores from forecast residuals: a per-device anomaly likelihood in [0, 1].

For a device's reading (normalised units, see streamer.features) and the forecast it made one
step earlier, the residual is r = RMS over features of (reading - forecast). Each device keeps,
in its state row: ``n`` (residuals folded in since its statistics (re)started), the long-run
mean m of its residuals, a short-run mean s (weight max(1/n, short_alpha): about the last
1/short_alpha residuals), the long-run mean square v of (s - m), ``streak`` (consecutive
readings with tail probability below ADAPT_TAIL) and ``peak`` (see novelty below). Long-run
statistics are exact while 1/n > long_alpha, then exponentially weighted with long_alpha. Once
the device is scored, a residual folds into them at most STAT_CAP_SPREADS (20) of their spreads
above their mean, so that one absurd reading cannot inflate them for thousands of readings; its
own tail is taken from it as it is.

Tail probability. The short mean of positive, right-skewed residuals is modelled by a gamma
distribution with the device's own mean and spread: mean max(m, min_std), variance
max(v, (min_std * sqrt(short_alpha / (2 - short_alpha)))**2); the tail of a reading is
P(S >= s) under it. The spread is measured, not derived from the residuals' variance, so
residuals correlated in time (a model that misses a whole phase of a cycle) do not inflate
scores; the gamma shape keeps the far tail honest for skewed residuals (a normal one would
flag |noise| 10x more often than its probability says at 0.9999).

Novelty. A device in trouble stays improbable for many readings; what an operator needs is
the moment it starts, or gets worse. ``peak`` is the largest surprise (-log10 tail) the device
showed recently, shrinking by the factor ``novelty_decay`` per reading (0.995: halved in ~140
readings). A reading's reported tail is its own when its surprise exceeds ``peak``, else 1.
novelty_decay = 0 reports every tail as it is.

The anomaly score is 1 - reported tail: the same scale on every device whatever its units or
noise. A threshold p flags readings whose recent residual level is beyond the device's usual
p-quantile and beyond anything it showed recently (0.9999: at most about one reading in 10,000
on a device behaving as it used to; tests/test_anomaly.py measures the rates; record breaks add
about 2e-4 per reading over readings 1,000 to 6,000 of Gaussian noise, falling as 1/n). The threshold
only decides flags; scores and statistics never depend on it.

Records (``record_breaks``). Independently of the forecast, a reading that breaks one of the
device's records has a surprise of at least RECORD_SURPRISE (score >= 1 - 1e-5; flagged at any
threshold up to 0.99999): the model continues whatever it sees, and a device that does what it
never did is worth a look even when the forecast followed it. Two records, both scale free:
- range: a reading beyond the range of values the device has shown since its statistics
  (re)started, by more than ``range_tolerance`` times that range, on any feature, whose
  residual is also unusual (tail below 0.01 before novelty: a young device's daily cycle
  widens its range every day, and the model forecasts it). Each break widens the range by
  more than the tolerance, so a device that moves to new levels for good breaks it at most
  about ln(final range / first range) / ln(1 + range_tolerance) times; slow trends (a step per
  reading below range_tolerance x range) never do. None turns it off.
- flat run (``flat_runs``): a reading that makes the run of identical readings (every feature
  equal to the previous reading's) one longer than any the device finished before: a sensor
  stuck at its last value, which continuous noise never repeats. One break per record run, so
  a device stuck for good is flagged once; a coarsely quantised sensor's runs set their records
  early (about ln(n) breaks in n readings, like the range).
Breaks are reported from the same reading as tails (``warmup``) and feed neither ``peak`` nor
the adaptation streak.

Behaviour that changes for good: once ``adapt_after`` readings in a row have tail < ADAPT_TAIL
(before novelty), the device's residual statistics (and its running input normalisation, when
the model uses one) start afresh, as a new device's would, so the new behaviour becomes its
normal: flags stop within adapt_after + warmup readings of a lasting change (with novelty,
usually at once). Scores start after ``warmup`` residuals (at least 2) since the statistics
(re)started; before that the score is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from streamer.gamma import lgamma, log_gamma_q

# Residuals are capped (normalised units) so that absurd readings that are still finite, say
# 1e20 with a fixed normalisation, cannot overflow the float32 statistics.
RESIDUAL_CAP = 1e6
ADAPT_TAIL = 1e-3  # a reading this unlikely counts towards a lasting change
LOG_ADAPT_TAIL = math.log(ADAPT_TAIL)
MIN_TAIL = 1e-30  # float32 tails below this are taken from the asymptotic form instead
LOG_MIN_TAIL = math.log(MIN_TAIL)
SHAPE_RANGE = (1e-3, 1e4)  # gamma shapes outside this add nothing but slow, unstable maths
LN10 = math.log(10.0)
LN2 = math.log(2.0)
# Novelty compares a reading's surprise with the recent peak; peaks are remembered up to this
# surprise (a tail of 1e-10), so that one absurd reading cannot mask every later anomaly.
PEAK_CAP = 10.0
# A scored residual folds into the long-run statistics at most this many spreads above their mean.
STAT_CAP_SPREADS = 20.0
# The surprise (-log10 tail) of a reading that breaks one of the device's records (see Records).
RECORD_SURPRISE = 5.0


def float32_at_or_below(x: float) -> float:
    """The largest float32 value <= x. Log tails are float32: compared with it, a flag is raised
    exactly where the score published from that tail (1 - exp, in float64) is >= its bound. The
    nearest float32 of ln(1e-5) lies above it, and a record break at 0.99999 had been flagged
    with a score of 0.9999899999968."""
    nearest = torch.tensor(x, dtype=torch.float32)
    if float(nearest) > x:
        nearest = torch.nextafter(nearest, torch.tensor(-math.inf))
    return float(nearest)


LOG_RECORD_TAIL = float32_at_or_below(-RECORD_SURPRISE * LN10)
# A range break counts only where the residual's own tail is below this: a cycle the device
# has not yet shown in full widens its range every day, and the model forecasts it.
LOG_RANGE_GATE = math.log(0.01)


@dataclass(frozen=True)
class AnomalyParams:
    threshold: float = 0.9999  # flag when the anomaly score (1 - tail probability) is >= this
    warmup: int = 50  # residuals a device's statistics need before it is scored
    short_alpha: float = 0.3  # weight of a new residual in the short-run mean (~ the last 1/alpha)
    long_alpha: float = 0.001  # weight of a new residual in the long-run statistics
    min_std: float = 1e-2  # floor of the residuals' mean and spread (normalised units)
    adapt_after: int = 100  # readings in a row with tail < ADAPT_TAIL before statistics restart
    novelty_decay: float = 0.995  # per reading shrink of the recent peak surprise (0: no novelty)
    range_tolerance: float | None = 0.05  # a reading this far (x range) beyond the device's range (None: off)
    flat_runs: bool = True  # a run of identical readings longer than any before is a record break

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("short_alpha", "long_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.novelty_decay < 1:
            raise ValueError(f"novelty_decay must be in [0, 1), got {self.novelty_decay}")
        if self.range_tolerance is not None and not 0 <= self.range_tolerance < math.inf:
            raise ValueError(f"range_tolerance must be >= 0 and finite, or None, got {self.range_tolerance}")
        if self.min_std <= 0 or self.warmup < 0 or self.adapt_after < 1:
            raise ValueError(f"min_std > 0, warmup >= 0 and adapt_after >= 1 needed, got {self}")

    @property
    def log_tail_threshold(self) -> float:
        """ln(1 - threshold), as the float32 at or below it: flag readings whose (float32) ln(tail)
        is at or below it, which are those whose score is >= threshold."""
        return float32_at_or_below(math.log1p(-self.threshold))


@dataclass(frozen=True)
class Scored:
    """log_tail: (B,) ln of the reported tail, 0 where not scored; is_anomaly (B,) bool; restart
    (B,) bool: devices whose statistics restart after this reading; the rest: (B,) updated
    statistics (var: the mean square of short - mean), all zeros where restart."""

    log_tail: Tensor
    is_anomaly: Tensor
    restart: Tensor
    n: Tensor
    mean: Tensor
    var: Tensor
    short: Tensor
    var_one: Tensor
    streak: Tensor
    peak: Tensor


@dataclass(frozen=True)
class Records:
    """broke: (B,) bool, the reading breaks its flat-run record; beyond_range: (B,) bool, it is
    beyond its range (a break if its residual is unusual too; both count once scored, see
    score_and_update); low, high, last: (B, F) the range of values and the reading; run: (B,) identical readings in a row,
    this one included; longest: (B,) the longest run the device finished."""

    broke: Tensor
    beyond_range: Tensor
    low: Tensor
    high: Tensor
    last: Tensor
    run: Tensor
    longest: Tensor

    def columns(self) -> Tensor:
        """(B, 3F + 2): low, high, last, run, longest, as a state row keeps them."""
        return torch.cat([self.low, self.high, self.last, self.run[:, None], self.longest[:, None]], dim=1)


def record_breaks(
    values: Tensor,
    has_residual: Tensor,
    n: Tensor,
    low: Tensor,
    high: Tensor,
    last: Tensor,
    run: Tensor,
    longest: Tensor,
    params: AnomalyParams,
) -> Records:
    """Check readings against the devices' records and update them.

    values, low, high, last: (B, F) in units fixed per device (raw, or under a global
    normalisation); has_residual, n: as for score_and_update (the range restarts with the
    residual statistics, n = 0); run, longest: (B,). A device's first reading starts both.
    """
    beyond_range = torch.zeros_like(has_residual)
    fresh = (n < 1.0).unsqueeze(1)  # statistics (re)started: the range starts at this reading
    if params.range_tolerance is not None:
        width = high - low
        beyond = torch.maximum(values - high, low - values)
        beyond_range = ((beyond > params.range_tolerance * width) & (width > 0)).any(dim=1)
    low_new = torch.where(fresh, values, torch.minimum(low, values))
    high_new = torch.where(fresh, values, torch.maximum(high, values))
    same = has_residual & (values == last).all(dim=1)
    run_new = torch.where(same, run + 1.0, torch.ones_like(run))
    longest_new = torch.where(same | ~has_residual, longest, torch.maximum(longest, run))
    # run_new > run: float32 counts no further than 2^24, where run + 1 == run would be a new
    # record at every later identical reading.
    flat = same & (run_new == longest + 1.0) & (run_new > run) if params.flat_runs else torch.zeros_like(same)
    return Records(flat, beyond_range, low_new, high_new, values, run_new, longest_new)


def residual_of(x: Tensor, forecast: Tensor) -> Tensor:
    """RMS over features of x - forecast, both (B, F) in normalised units -> (B,), capped."""
    diff = (x - forecast).clamp(-RESIDUAL_CAP, RESIDUAL_CAP)
    return torch.sqrt(torch.mean(diff * diff, dim=1))


def gamma_arguments(level: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """(shape k, x) of P(S >= level) = Q(k, x) for S gamma with the given mean (> 0) and variance
    (> 0), all (B,)."""
    # The shape clamped, the mean kept: a rate of mean / var with the shape clamped had made the
    # gamma's mean mean * 1e4 / (mean^2 / var), and a residual at the device's own mean improbable
    # (a stuck sensor's constant residual, flagged in bursts).
    shape = (mean * mean / var).clamp(*SHAPE_RANGE)
    return shape, level.clamp_min(0.0) * (shape / mean)


def gamma_log_tail(shape: Tensor, x: Tensor) -> Tensor:
    """ln Q(shape, x), the regularised upper incomplete gamma function, of gamma_arguments.

    Tails below MIN_TAIL, where float32 runs out, use ln Q(k, x) ~ (k - 1) ln x - x - ln Gamma(k)
    (capped at ln MIN_TAIL): still ordered, so a worse reading always has the smaller tail.
    """
    if torch.compiler.is_compiling():
        # The compiled CPU step: torch's gammaincc is a scalar loop there (about 40 ns a tail),
        # streamer.gamma's vectorises, and so does its lgamma. It is within 3e-5 of ln Q where
        # Q >= MIN_TAIL, where torch's float32 gammaincc is within 7e-4 (tests/test_gamma.py).
        log_q = log_gamma_q(shape, x)
        return torch.where(log_q <= LOG_MIN_TAIL, _far_log_tail(shape, x, lgamma(shape.double()).float()), log_q)
    tail = torch.special.gammaincc(shape, x)
    deep = tail <= MIN_TAIL
    # On a CPU the check is free and the far branch rarely needed; on an accelerator the check
    # would stall the queue, so the far branch is always computed there. Where no tail is deep
    # both give the same value.
    if x.device.type != "cpu" or bool(deep.any()):
        return torch.where(deep, _far_log_tail(shape, x, torch.lgamma(shape)), torch.log(tail.clamp_min(MIN_TAIL)))
    return torch.log(tail)


def _far_log_tail(shape: Tensor, x: Tensor, lgamma_shape: Tensor) -> Tensor:
    """ln Q(k, x) ~ (k - 1) ln x - x - ln Gamma(k), capped at ln MIN_TAIL: the tails below MIN_TAIL."""
    return ((shape - 1.0) * torch.log(x.clamp_min(1.0)) - x - lgamma_shape).clamp_max(LOG_MIN_TAIL)


def score_and_update(
    residual: Tensor,
    has_residual: Tensor,
    n: Tensor,
    mean: Tensor,
    var: Tensor,
    short: Tensor,
    var_one: Tensor,
    streak: Tensor,
    peak: Tensor,
    broke: Tensor,
    beyond_range: Tensor,
    params: AnomalyParams,
) -> Scored:
    """Score residuals (B,) and fold them into the devices' statistics (all (B,), float32).

    has_residual: (B,) bool, False for a device's first reading (no forecast yet): it is not
    scored and leaves the statistics as they are. var: the mean square of short - mean;
    peak: the recent peak surprise (-log10 tail). broke, beyond_range: (B,) bool from
    ``record_breaks``: a reading that breaks a record, or one beyond its range whose residual
    tail is below 0.01 too, has a tail of at most 10**-RECORD_SURPRISE.
    """
    # A device's first reading (no residual) gets weight 0 everywhere: its statistics stay.
    first = 1.0 / (n + 1.0)
    live = has_residual.to(residual.dtype)
    short_new = short + torch.clamp(first, min=params.short_alpha) * live * (residual - short)
    floor = params.min_std * math.sqrt(params.short_alpha / (2.0 - params.short_alpha))
    excess = short_new - mean
    jump = residual - mean
    typical = mean.clamp_min(params.min_std)
    # Two time scales, the short mean and the reading alone: the tail is the smaller of theirs
    # (one gamma evaluation over both, the step's dearest operation), doubled (Bonferroni) so that
    # looking twice does not flag more often than it says. The two gammas have other shapes, so
    # the scale of the larger standardised excess (taken alone before) was at times the one of
    # the larger tail: a larger residual could get a lower score, and lose its flag.
    spread_short = var.clamp_min(floor * floor)
    spread_one = var_one.clamp_min(params.min_std * params.min_std)
    # One evaluation over both, its arguments in one buffer each: compiled, one vectorised loop
    # over 2B contiguous elements (a mean shared by both halves, read twice through the rows'
    # gather, had kept the loop scalar).
    b = residual.shape[0]
    short_args = gamma_arguments(short_new, typical, spread_short)
    one_args = gamma_arguments(residual, typical, spread_one)
    both = gamma_log_tail(torch.cat([short_args[0], one_args[0]]), torch.cat([short_args[1], one_args[1]]))
    tail = torch.minimum(both[:b], both[b:])
    scored = has_residual & (n >= max(params.warmup, 2))
    log_tail = torch.where(scored, (tail + LN2).clamp_max(0.0), torch.zeros_like(tail))
    surprise = log_tail * (-1.0 / LN10)
    if params.novelty_decay > 0:
        reported = torch.where(surprise > peak, log_tail, torch.zeros_like(log_tail))
        peak_new = torch.maximum(surprise.clamp_max(PEAK_CAP), peak * params.novelty_decay)
    else:
        reported, peak_new = log_tail, peak
    broke = (broke | (beyond_range & (log_tail <= LOG_RANGE_GATE))) & scored
    reported = torch.where(broke, reported.clamp_max(LOG_RECORD_TAIL), reported)
    is_anomaly = scored & (reported <= params.log_tail_threshold)

    weight = torch.clamp(first, min=params.long_alpha) * live
    # Once scored, a residual folds into the long-run statistics at most STAT_CAP_SPREADS of its
    # spreads above their mean (its tail is taken from the reading as it is): one absurd reading
    # had grown the spreads a billionfold, and the device could flag nothing for ~20,000 readings.
    # A lasting change still moves them (and restarts them after adapt_after readings).
    jump = torch.where(scored, jump.clamp(max=STAT_CAP_SPREADS * torch.sqrt(spread_one)), jump)
    cap_short = STAT_CAP_SPREADS * torch.sqrt(spread_short)
    excess = torch.where(scored, excess.clamp(-cap_short, cap_short), excess)
    mean_new = mean + weight * jump
    var_new = var + weight * (excess * excess - var)
    var_one_new = var_one + weight * (jump * jump - var_one)
    n_new = n + live
    streak_new = torch.where(scored & (log_tail <= LOG_ADAPT_TAIL), streak + 1.0, torch.zeros_like(streak))
    restart = streak_new >= params.adapt_after
    # One select over the stacked statistics, not one per statistic: this runs every step.
    stats = torch.stack([n_new, mean_new, var_new, short_new, var_one_new, streak_new, peak_new], dim=1)
    stats = torch.where(restart.unsqueeze(1), torch.zeros((), dtype=stats.dtype, device=stats.device), stats)
    return Scored(reported, is_anomaly, restart, *stats.unbind(1))
