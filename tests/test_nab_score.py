"""NAB scoring (bench/nab_score.py) on hand-made cases, against brute force, and on the real
window labels under shared/data/nab when present."""

from __future__ import annotations

import csv
import math
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.nab_score import (  # noqa: E402
    PROFILES,
    FileScores,
    Profile,
    load_windows,
    probation,
    score_all_profiles,
    score_at_threshold,
    score_corpus,
    sweep,
    window_rows,
)

NAB = Path("/work/shared/data/nab")
STD = PROFILES["standard"]
N = 1000  # P = 150


def sig(y: float) -> float:
    return 2 / (1 + math.exp(5 * y)) - 1


def one(hits: list[int], windows: list[tuple[int, int]], n: int = N) -> FileScores:
    s = np.zeros(n)
    s[hits] = 1.0
    return FileScores("f.csv", s, windows)


def raw(hits: list[int], windows: list[tuple[int, int]], p: Profile = STD) -> float:
    return score_at_threshold([one(hits, windows)], p, 0.5).raw


def test_probation() -> None:
    assert probation(N) == 150 and probation(4032) == 604 and probation(10_000) == 750
    assert probation(60) == 9  # exact, not floor(0.15 * 60) in floats


@pytest.mark.parametrize("name", list(PROFILES))
def test_perfect_and_null(name: str) -> None:
    p = PROFILES[name]
    wins = [[(200, 299), (600, 649)], [], [(500, 500)]]
    perfect = [one([w[0] for w in ws], ws) for ws in wins]
    r = score_corpus(perfect, p)
    assert r.normalised == pytest.approx(100.0) and (r.tp, r.fn, r.fp) == (3, 0, 0)
    assert r.raw == pytest.approx(3 * p.a_tp)
    null = [one([], ws) for ws in wins]
    r = score_corpus(null, p)
    assert r.normalised == pytest.approx(0.0) and (r.tp, r.fn, r.fp) == (0, 3, 0)
    assert score_at_threshold(null, p, 0.5).normalised == pytest.approx(0.0)
    # a detector that never reaches the threshold is the null detector too
    assert score_at_threshold(perfect, p, 1.0 + 1e-9).normalised == pytest.approx(0.0)


def test_true_positive_values() -> None:
    w = [(400, 499)]  # W = 100
    missed = -STD.a_fn
    assert raw([400], w) == pytest.approx(STD.a_tp)
    last = sig(-1 / 100) / sig(-1)
    assert last == pytest.approx(math.tanh(0.025) / math.tanh(2.5))  # sigma(y) = -tanh(5y/2)
    assert last < 0.03  # the last row is worth about nothing
    assert raw([499], w) == pytest.approx(last * STD.a_tp)
    assert raw([449], w) == pytest.approx(sig(-51 / 100) / sig(-1))
    assert raw([], w) == pytest.approx(missed)
    # only the best (earliest) detection of a window counts
    assert raw([420, 400, 499], w) == pytest.approx(STD.a_tp)
    assert raw([499], w, PROFILES["reward_low_FN_rate"]) == pytest.approx(last)


def test_false_positive_values() -> None:
    w = [(400, 499)]
    base = raw([], w)
    assert raw([900], w) - base == pytest.approx(-STD.a_fp)  # y = 401/99 > 3
    assert raw([700], w) - base == pytest.approx(STD.a_fp * sig(201 / 99))
    just_after = raw([500], w) - base
    assert just_after == pytest.approx(STD.a_fp * sig(1 / 99)) and -0.03 * STD.a_fp < just_after < 0
    assert raw([300], w) - base == pytest.approx(-STD.a_fp)  # no window before it
    low_fp = PROFILES["reward_low_FP_rate"]
    assert raw([900], w, low_fp) - raw([], w, low_fp) == pytest.approx(-low_fp.a_fp)
    # the closest preceding window sets the scale: W = 2 after (600, 601)
    two = [(400, 499), (600, 601)]
    assert raw([603], two) - raw([], two) == pytest.approx(STD.a_fp * sig(2 / 1))


def test_width_one_window() -> None:
    w = [(400, 400)]
    assert raw([400], w) == pytest.approx(STD.a_tp)  # y = -1
    # W_prev - 1 == 0 is guarded as 1: distance in rows
    assert raw([401], w) - raw([], w) == pytest.approx(STD.a_fp * sig(1.0))
    assert raw([410], w) - raw([], w) == pytest.approx(-STD.a_fp)


def test_probationary_rows_never_count() -> None:
    w = [(400, 499)]
    assert raw([0, 10, 149], w) == raw([], w)
    assert raw([150], w) - raw([], w) == pytest.approx(-STD.a_fp)  # first scored row
    # a window reaching into probation keeps its geometry; only rows >= P detect it
    r = score_at_threshold([one([100, 150], [(100, 199)])], STD, 0.5)
    assert (r.tp, r.fn, r.fp) == (1, 0, 0) and r.raw == pytest.approx(sig(-50 / 100) / sig(-1))
    # a window wholly inside probation is not scored at all
    r = score_at_threshold([one([100], [(100, 120), (400, 499)])], STD, 0.5)
    assert (r.tp, r.fn, r.fp, r.raw) == (0, 1, 0, -1.0) and r.normalised == pytest.approx(0.0)


def random_corpus(seed: int, ties: bool) -> list[FileScores]:
    rng = np.random.default_rng(seed)
    files = []
    for k in range(int(rng.integers(2, 5))):
        n = int(rng.integers(80, 300))
        s = rng.random(n) ** 3  # mostly low scores, as a detector gives
        if ties:
            s = np.round(s, 1)
        n_win = int(rng.integers(0, 4))  # starts from n // 10: some reach into probation
        bounds = np.sort(rng.choice(np.arange(n // 10, n), size=2 * n_win, replace=False))
        wins = [(int(a), int(b)) for a, b in bounds.reshape(-1, 2)]
        for a, b in wins:
            s[a : b + 1] = np.maximum(s[a : b + 1], rng.random(b - a + 1) * rng.random())
        files.append(FileScores(f"r{k}.csv", s, wins))
    return files


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("name", list(PROFILES))
def test_sweep_matches_brute_force(seed: int, name: str) -> None:
    p = PROFILES[name]
    files = random_corpus(seed, ties=seed % 3 == 0)
    thresholds, totals = sweep(files, p)
    scored = np.concatenate([f.scores[probation(f.scores.size) :] for f in files])
    assert np.array_equal(thresholds[1:], np.unique(scored)[::-1])
    assert thresholds[0] > scored.max()
    brute = np.array([score_at_threshold(files, p, t).raw for t in thresholds])
    np.testing.assert_allclose(totals, brute, atol=1e-9)
    best = score_corpus(files, p)
    assert best.raw == pytest.approx(brute.max(), abs=1e-9)
    scored = sum(1 for f in files for _, r in f.windows if r >= probation(f.scores.size))
    assert best.tp + best.fn == scored
    assert sum(best.per_file.values()) == pytest.approx(best.raw)


def test_score_all_profiles_and_validation() -> None:
    files = random_corpus(7, ties=False)
    res = score_all_profiles(files)
    assert set(res) == set(PROFILES)
    for name, r in res.items():
        assert r == score_corpus(files, PROFILES[name])
    with pytest.raises(ValueError):
        FileScores("bad.csv", np.array([0.5, 1.5]), [])
    with pytest.raises(ValueError):
        FileScores("bad.csv", np.zeros(10), [(5, 8), (7, 9)])


def test_window_rows() -> None:
    t0 = datetime(2014, 3, 9, 1)
    ts = [t0 + timedelta(minutes=5 * i) for i in range(10)]
    ts.insert(5, ts[4])  # a repeated timestamp, as NAB files have: an end there is its first row
    wins = [(ts[1], ts[4]), (ts[7], ts[9])]
    assert window_rows(ts, wins) == [(1, 4), (7, 9)]
    assert window_rows(np.array(ts, dtype="datetime64[ns]"), wins) == [(1, 4), (7, 9)]
    with pytest.raises(ValueError, match=r"x\.csv.*end 2014-03-09 01:02:00"):
        window_rows(ts, [(ts[1], t0 + timedelta(minutes=2))], name="x.csv")


def read_timestamps(path: Path) -> list[datetime]:
    with path.open() as fh:
        rows = csv.reader(fh)
        assert next(rows) == ["timestamp", "value"]
        return [datetime.fromisoformat(r[0]) for r in rows]


@pytest.mark.skipif(not (NAB / "data").is_dir(), reason="shared NAB data absent")
def test_real_windows_map_to_rows() -> None:
    windows = load_windows(NAB / "windows.json")
    assert len(windows) == 34
    files = []
    for name, wins in windows.items():
        ts = read_timestamps(NAB / "data" / name)
        rows = window_rows(ts, wins, name=name)
        p = probation(len(ts))
        assert all(p <= lo <= hi < len(ts) for lo, hi in rows), name  # none touch probation
        s = np.zeros(len(ts))
        s[[lo for lo, _ in rows]] = 1.0
        files.append(FileScores(name, s, rows))
    assert sum(len(f.windows) for f in files) == 50
    for r in score_all_profiles(files).values():
        assert r.normalised == pytest.approx(100.0) and r.tp == 50


def test_a_window_ending_on_a_repeated_timestamp_ends_at_its_first_row_as_nabs_scorer_does():
    # NAB maps both ends with timestamps.index (the first match); the last match had been taken
    # for an end, a window one row or more longer than NAB's (none of the 34 files has one).
    from datetime import datetime, timedelta

    t0 = datetime(2014, 3, 9, 1)
    stamps = [t0 + timedelta(hours=h) for h in (0, 1, 2, 2, 2, 3, 4)]
    assert window_rows(stamps, [(stamps[1], stamps[2])]) == [(1, 2)]
    assert window_rows(stamps, [(stamps[3], stamps[6])]) == [(2, 6)]


def test_the_nab_recipe_trains_on_a_file_too_short_for_its_window_with_the_window_halved():
    # A held-out file of a few hundred rows (or with a gap early on) has fewer probationary rows
    # before the validation cutoff than RECIPE's window: make nab had ended at that file.
    from bench import nab

    rng = np.random.default_rng(0)
    for rows in (60, 300):  # probationary rows: 60 -> windows of 32 do not fit either, 16 do
        ts = 1_400_000_000 + 300.0 * np.arange(rows)
        values = (np.sin(np.arange(rows) / 5) + 0.1 * rng.normal(size=rows)).astype(np.float32)[:, None]
        result = nab.train(ts, values)
        assert result.model is not None
    with pytest.raises(nab.TrainingDataError):
        nab.train(np.arange(5.0), np.zeros((5, 1), np.float32))
