"""Anomaly scores: calibrated, comparable across devices, independent of the threshold, adaptive."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from streamer.anomaly import AnomalyParams, record_breaks, score_and_update
from streamer.engine import Engine, ReadingBatch
from streamer.settings import AnomalySettings
from tests.conftest import make_bundle


def run_scores(
    residuals: np.ndarray, params: AnomalyParams, readings: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Feed (T, B) residuals and readings (T, B, F) through record_breaks and score_and_update
    -> (anomaly score, flags), both (T, B). Readings default to a different constant per step:
    never out of range, never a run."""
    t_len, b = residuals.shape
    if readings is None:
        readings = np.tile((np.arange(t_len) % 2)[:, None, None], (1, b, 1))
    n, mean, var, short, var_one, streak, peak, run, longest = (torch.zeros(b) for _ in range(9))
    low = high = last = torch.zeros(b, readings.shape[2])
    scores, flags = np.zeros((t_len, b)), np.zeros((t_len, b), bool)
    for t in range(t_len):
        has = torch.full((b,), t > 0)
        residual = torch.from_numpy(residuals[t]).float()
        values = torch.from_numpy(readings[t]).float()
        r = record_breaks(values, has, n, low, high, last, run, longest, params)
        low, high, last, run, longest = r.low, r.high, r.last, r.run, r.longest
        s = score_and_update(
            residual, has, n, mean, var, short, var_one, streak, peak, r.broke, r.beyond_range, params
        )
        n, mean, var, short, var_one, streak, peak = s.n, s.mean, s.var, s.short, s.var_one, s.streak, s.peak
        scores[t] = -np.expm1(s.log_tail.double().numpy())
        flags[t] = s.is_anomaly.numpy()
    return scores, flags


def stream(engine: Engine, device: str, values: np.ndarray, t0: int = 0):
    """Step one device through ``values`` (T,) one reading at a time -> list of PredictionBatch."""
    out = []
    for t, value in enumerate(values):
        ts = np.array([1.7e9 + 300.0 * (t0 + t)])
        preds, _ = engine.step(ReadingBatch([device], ts, np.array([[value]], np.float32)), now=0.0)
        out.append(preds)
    return out


def test_settings_and_params_share_defaults():
    assert AnomalySettings().model_dump() == dataclasses.asdict(AnomalyParams())


@pytest.mark.parametrize(("p", "low", "high"), [(0.99, 0.25, 1.25), (0.999, 0.15, 1.25), (0.9999, 0.05, 1.25)])
@pytest.mark.parametrize("novelty_decay", [0.995, 0.0])
def test_flag_rate_on_stationary_noise_matches_the_threshold(p: float, low: float, high: float, novelty_decay: float):
    """Residuals of a device behaving as it always did (|gaussian noise|): the share flagged at
    threshold p is at most 1.25 x (1 - p), and within a factor of 20 below it: the score is
    conservative (measured with novelty: 0.40, 0.28, 0.13 x; without: 0.47, 0.30, 0.13 x)."""
    rng = np.random.default_rng(0)
    residuals = np.abs(rng.normal(size=(10_000, 50)))
    _, flags = run_scores(residuals, AnomalyParams(threshold=p, warmup=200, novelty_decay=novelty_decay))
    ratio = flags[1000:].mean() / (1 - p)
    assert low <= ratio <= high, ratio


def test_scale_of_the_readings_does_not_change_scores():
    """Two devices, the same noisy cycle at scales 1 and 1e6 (and an offset): same scores."""
    bundle = make_bundle(input_size=1, hidden_size=8, num_layers=1, seed=4, device_norm_alpha=0.01)
    engine = Engine.build(bundle, capacity=4, device="cpu", anomaly=AnomalyParams(warmup=20))
    rng = np.random.default_rng(3)
    base = np.sin(np.arange(600) / 10.0) + rng.normal(scale=0.1, size=600)
    base[400] += 20.0
    small = stream(engine, "small", base)
    large = stream(engine, "large", base * 1e6 + 3e6)
    s_small = np.array([p.anomaly_score[0] for p in small])
    s_large = np.array([p.anomaly_score[0] for p in large])
    np.testing.assert_allclose(s_small, s_large, atol=1e-3)
    assert s_small[400] > 0.9999 and s_large[400] > 0.9999


def test_novelty_reports_the_onset_and_what_gets_worse():
    rng = np.random.default_rng(4)
    residuals = np.abs(rng.normal(size=(2000, 1)))
    residuals[1000:1030] += 5.0  # an episode at one level ...
    residuals[1030:1040] += 50.0  # ... that gets much worse
    scores, flags = run_scores(residuals, AnomalyParams())
    plain, plain_flags = run_scores(residuals, AnomalyParams(novelty_decay=0.0))
    episode = np.flatnonzero(flags[1000:1040, 0]) + 1000
    assert episode.min() <= 1002 and (episode >= 1030).any()
    assert flags[1005:1030].sum() < plain_flags[1005:1030].sum()


def test_threshold_changes_flags_only():
    rng = np.random.default_rng(1)
    residuals = np.abs(rng.normal(size=(3000, 8)))
    residuals[2000:2005] += 6.0
    low, flags_low = run_scores(residuals, AnomalyParams(threshold=0.99))
    high, flags_high = run_scores(residuals, AnomalyParams(threshold=0.999999))
    np.testing.assert_array_equal(low, high)
    assert flags_high.sum() < flags_low.sum()
    assert flags_high[2000:2005].any(axis=0).all()


@pytest.mark.parametrize("shift", [3.0, 10.0, 1000.0])
def test_a_lasting_change_stops_being_flagged(shift: float):
    """A device whose level and noise change for good: flagged at first, then no more flags
    from its residuals after adapt_after + warmup readings (the documented bound); new
    extremes of the new noise may still break the device's range, rarely (documented: about
    ln(n) in n readings; here at most 3 in 2,350)."""
    rng = np.random.default_rng(2)
    before = 10 + rng.normal(scale=0.5, size=1500)
    after = 10 + shift + rng.normal(scale=0.5 * (1 + shift / 10), size=2500)
    late = {}
    for range_tolerance in (None, 0.05):
        params = AnomalyParams(warmup=50, adapt_after=100, range_tolerance=range_tolerance)
        bundle = make_bundle(input_size=1, hidden_size=8, num_layers=1, seed=6, device_norm_alpha=0.001)
        engine = Engine.build(bundle, capacity=2, device="cpu", anomaly=params)
        flags = np.array([p.is_anomaly[0] for p in stream(engine, "d", np.concatenate([before, after]))])
        assert flags[1500:1510].any()
        late[range_tolerance] = np.flatnonzero(flags[1500 + params.adapt_after + params.warmup :])
    assert len(late[None]) == 0, late[None][-5:]
    assert len(late[0.05]) <= 3, late[0.05]


def test_a_reading_beyond_the_range_with_an_unusual_residual_is_flagged():
    """Readings in [0, 1], residuals |N(0, 1)|. On feature 2: 1.2 (20% of the range beyond it)
    with a residual of 3.5 (tail below 0.01, above 1e-4: not flagged by itself) scores
    1 - 1e-5 and is flagged; 1.04 (within the tolerance) with the same residual is not; 1.2
    with an ordinary residual is not (the forecast saw it coming). A slow trend breaks nothing."""
    rng = np.random.default_rng(7)
    t_len = 600
    readings = rng.uniform(size=(t_len, 1, 2))
    readings[:200, 0, 1] = np.linspace(0.0, 1.0, 200)
    residuals = np.abs(rng.normal(size=(t_len, 1)))
    readings[300, 0, 1], residuals[300] = 1.2, 0.5
    readings[400, 0, 1], residuals[400] = 1.04, 3.5
    readings[500, 0, 1], residuals[500] = 1.3, 3.5
    scores, flags = run_scores(residuals, AnomalyParams(), readings)
    assert np.flatnonzero(flags[:, 0]).tolist() == [500]
    assert scores[500, 0] == pytest.approx(1 - 1e-5, abs=1e-9)
    assert 0.99 < scores[400, 0] < 0.9999
    off, off_flags = run_scores(residuals, AnomalyParams(range_tolerance=None), readings)
    assert not off_flags.any() and 0.99 < off[500, 0] < 0.9999


def test_a_run_of_identical_readings_longer_than_any_before_is_flagged_once():
    """Noise, then a sensor stuck at its last value for 6 readings (a run of 7 identical
    readings): flagged at the first repeat only; stuck for 4 later sets no record; stuck for 9
    breaks it at the run's 8th reading; off with flat_runs=False. Residuals never change, so
    only records can flag."""
    rng = np.random.default_rng(9)
    readings = rng.normal(size=(1000, 1, 2))
    for start, length in ((300, 6), (500, 4), (700, 9)):
        readings[start : start + length] = readings[start - 1]
    residuals = np.full((1000, 1), 0.5)
    _, flags = run_scores(residuals, AnomalyParams(range_tolerance=None), readings)
    assert np.flatnonzero(flags[:, 0]).tolist() == [300, 706]
    _, off = run_scores(residuals, AnomalyParams(range_tolerance=None, flat_runs=False), readings)
    assert not off.any()


def test_range_breaks_on_stationary_noise_are_rare():
    """Gaussian readings: new extremes beyond 5% of the range add at most 3e-4 flags per
    reading over readings 1,000 to 6,000 (measured: 2.1e-4; 0.7e-4 from 5,000 to 10,000),
    falling as about 1/n: at the default threshold the flag rate stays within 4x of 1 - p, and
    the scores of readings within their range are unchanged."""
    rng = np.random.default_rng(8)
    readings = rng.normal(size=(6000, 100, 1))
    residuals = np.abs(readings[..., 0])  # a model that forecasts the mean
    scores, flags = run_scores(residuals, AnomalyParams(warmup=200), readings)
    alone, alone_flags = run_scores(residuals, AnomalyParams(warmup=200, range_tolerance=None), readings)
    added = flags[1000:].mean() - alone_flags[1000:].mean()
    assert 0 < added <= 3e-4, added
    assert flags[1000:].mean() <= 4e-4
    same = ~flags | alone_flags
    np.testing.assert_array_equal(scores[same & ~flags], alone[same & ~flags])


def test_scores_leave_lstm_state_alone():
    """The forecast path does not read the anomaly statistics: streamed forecasts are identical
    whatever the scoring parameters."""
    rng = np.random.default_rng(5)
    values = rng.normal(size=200) * 3
    out = []
    for params in (AnomalyParams(), AnomalyParams(threshold=0.5, short_alpha=1.0, long_alpha=0.5, adapt_after=1)):
        engine = Engine.build(make_bundle(input_size=1, hidden_size=8, seed=2), capacity=2, device="cpu", anomaly=params)
        out.append(np.stack([p.forecast[0] for p in stream(engine, "d", values)]))
    np.testing.assert_array_equal(out[0], out[1])


def test_unscored_readings_score_plus_zero():
    """Before warm-up the score is 0.0, never -0.0 (which JSON writes as "-0.0")."""
    engine = Engine.build(make_bundle(input_size=1, hidden_size=8, seed=2), capacity=2, device="cpu")
    preds = stream(engine, "d", np.arange(3, dtype=np.float32))
    assert all(np.signbit(p.anomaly_score).sum() == 0 and p.anomaly_score[0] == 0.0 for p in preds)


def test_a_residual_at_the_devices_own_mean_is_not_improbable_however_steady_it_is():
    """A stuck sensor under no normalisation has a constant, non-zero residual: its spread falls
    towards the floor and the gamma's shape (mean^2 / var) past its clamp at 1e4. The clamp had
    kept the rate mean / var, which moved the gamma's mean to a 10,000th of the device's, and
    flagged the stuck sensor in bursts of about 94 readings every 3,400 readings, for good."""
    from streamer.anomaly import gamma_arguments, gamma_log_tail

    mean = torch.tensor([1.0, 1.0, 0.05])
    var = torch.tensor([1.76e-5, 1e-9, 1e-12])
    tail = gamma_log_tail(*gamma_arguments(mean, mean, var))
    assert (tail > -1.0).all() and (tail < 0).all(), tail  # about ln 0.5 at the mean, as for any large shape
    residuals = np.full((20_000, 1), 1.0)  # constant readings: no record breaks after the first run
    _, flags = run_scores(residuals, AnomalyParams(range_tolerance=None, flat_runs=False))
    assert not flags.any(), np.flatnonzero(flags[:, 0])[:10]


def test_a_run_counted_past_float32s_integers_is_not_a_new_record_at_every_reading():
    """float32 counts to 2^24: past it run + 1 == run, and a run equal to a longest of 2^24 - 1
    had been a new record at every identical reading (a device stuck for good, flagged for good)."""
    values = torch.zeros(3, 1)
    has = torch.ones(3, dtype=torch.bool)
    n = torch.full((3,), 100.0)
    run = torch.tensor([2.0**24, 2.0**24 - 1, 5.0])
    longest = torch.tensor([2.0**24 - 1, 2.0**24 - 1, 5.0])
    r = record_breaks(values, has, n, values - 1, values + 1, values, run, longest, AnomalyParams())
    assert r.broke.tolist() == [False, True, True]  # saturated: no record; the two that count on: records


def test_one_absurd_reading_does_not_blind_a_device_for_thousands_of_readings():
    """A residual of 1e6 (capped) folded in whole had grown the long-run spreads a billionfold:
    a spike of 8 spreads 200 or 2,000 readings later went unflagged (for ~20,000 readings).
    Folded in at most STAT_CAP_SPREADS spreads, the device flags such spikes again at once."""
    rng = np.random.default_rng(4)
    t_len, glitch = 4_000, 2_000
    residuals = np.abs(rng.normal(size=(t_len, 3)))
    residuals[glitch, :] = 1e6
    for column, k in enumerate((200, 800, 1_900)):
        residuals[glitch + k, column] = 8.0
    _, flags = run_scores(residuals, AnomalyParams(range_tolerance=None))
    for column, k in enumerate((200, 800, 1_900)):
        assert flags[glitch + k, column], k


def test_one_absurd_reading_leaves_a_devices_normalisation_usable():
    """Device normalisation (exponential weights once seen >= 1 / alpha): a reading of 1e18 where
    the device reads about 20 had grown its variance by 30 orders, and every z after it was about
    0 for ~ln(1e30) / alpha readings. Folded in at most Z_CAP spreads from the mean, a spike of 8
    spreads 100 readings later still has a z of several."""
    from streamer.features import normalize_step

    rng = np.random.default_rng(5)
    alpha = 0.01
    x = torch.from_numpy(20 + rng.normal(size=(1_300, 1, 1))).float()
    x[1_000] = 1e18
    x[1_100] = 20 + 8.0
    seen, mean, var = torch.zeros(1), torch.zeros(1, 1), torch.zeros(1, 1)
    for t in range(len(x)):
        z, mean, var = normalize_step(x[t], seen, mean, var, alpha)
        seen = seen + 1
        if t == 1_100:
            assert z.item() > 3.0, z
    assert abs(mean.item() - 20) < 1 and 0.5 < var.item() < 5


@pytest.mark.parametrize("threshold", [0.5, 0.99, 0.999, 0.9999, 0.99999, 0.999999, 0.9999999, 0.123456789])
def test_a_flag_is_raised_exactly_where_the_published_score_reaches_the_threshold(threshold: float):
    # Log tails are float32 and scores 1 - exp of them in float64; the threshold's log compared in
    # float32 (rounded to nearest) had flagged a record break at 0.99999 whose score was 0.9999899999968.
    params = AnomalyParams(threshold=threshold)
    bound = torch.tensor(math.log1p(-threshold), dtype=torch.float32)
    tails = [bound]
    for direction in (math.inf, -math.inf):
        t = bound
        for _ in range(3):
            t = torch.nextafter(t, torch.tensor(direction))
            tails.append(t)
    for t in tails:
        score = -math.expm1(float(t))
        assert (float(t) <= params.log_tail_threshold) == (score >= threshold), (float(t), score)
    # A record break is flagged at 0.99999 and its score reaches it.
    one = torch.ones(1)
    scored = score_and_update(torch.full((1,), 1e-3), torch.ones(1, dtype=torch.bool), one * 100, one, one, one, one,
                              torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool),
                              AnomalyParams(threshold=0.99999))
    assert bool(scored.is_anomaly[0]) and -math.expm1(float(scored.log_tail[0])) >= 0.99999


def test_a_larger_residual_never_gets_a_larger_tail():
    # The tail had been taken at the time scale of the larger standardised excess alone; the two
    # gammas have other shapes, and past the switch the tail jumped up: at this state a residual
    # of 5.2 was flagged (ln tail -13.5) and one of 5.25 was not (-8.9).
    rng = np.random.default_rng(0)
    states = [(0.8, 0.0635, 1.5562, 0.360)] + [tuple(rng.uniform([0.1, 0.01, 0.0, 0.05], [2.0, 1.0, 4.0, 2.0]))
                                                  for _ in range(40)]
    residuals = torch.linspace(0.0, 12.0, 2401)
    params = AnomalyParams(novelty_decay=0.0, range_tolerance=None)
    for mean, var, short, var_one in states:
        full = lambda v: torch.full_like(residuals, v)  # noqa: E731
        scored = score_and_update(residuals, torch.ones_like(residuals, dtype=torch.bool), full(1000.0), full(mean),
                                  full(var), full(short), full(var_one), torch.zeros_like(residuals),
                                  torch.zeros_like(residuals), torch.zeros_like(residuals, dtype=torch.bool),
                                  torch.zeros_like(residuals, dtype=torch.bool), params)
        tail = scored.log_tail
        assert bool((tail[1:] <= tail[:-1]).all()), (mean, var, short, var_one)
        flags = scored.is_anomaly.int()
        assert bool((flags[1:] >= flags[:-1]).all())  # once flagged, every larger residual is
