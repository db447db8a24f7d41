"""NAB (Numenta Anomaly Benchmark) scoring, as restated in shared/data/nab/README.md.

Per file of N rows (scores in [0, 1], one per row; a detection is a row with score >= threshold):

- The first P = min(floor(0.15 N), 750) rows are never scored: a detection there is neither a
  TP nor an FP.
- sigma(y) = 2 / (1 + exp(5 y)) - 1, and -1 for y > 3.
- A detection at row i of window [L, R] (W = R - L + 1) is worth A_TP * sigma(y) / sigma(-1),
  y = -(R - i + 1) / W; a window counts only its best (= earliest) detection; a missed window
  costs -A_FN.
- A detection outside every window is worth A_FP * sigma((i - R_prev) / (W_prev - 1)) for the
  closest window before it, or -A_FP when no window precedes it.
- normalised = 100 (S - S_null) / (S_perfect - S_null), S_perfect = A_TP * windows,
  S_null = -A_FN * windows; one threshold for the whole corpus, chosen to maximise S.

Decisions the README leaves open:

- Width-1 windows: W_prev - 1 == 0 would divide by zero, so the FP distance is divided by
  max(W_prev - 1, 1); a width-1 window thus behaves like a width-2 one (the row after it
  already costs sigma(1) * A_FP ~ -0.987 A_FP, i.e. no tolerance), which is continuous in W.
- Windows and the probationary period: a window reaching into the probationary period keeps
  its full geometry (W, R and hence every row's value); only its rows >= P can detect it, and
  it counts in TP/FN and in S_perfect/S_null. A window that ends before P has no scored row,
  so like those rows it is not scored at all (not TP, not FN, not in S_perfect/S_null); it
  still is the "closest window before" for FP weighting. In the shared 34-file subset no
  window touches the probationary period (closest: realAdExchange/exchange-2_cpc_results.csv,
  P = 243, first window starts at row 244), so this choice does not affect that corpus.
- Ties of the optimised total are broken towards the higher threshold (fewer detections);
  the "never fire" threshold is the next float above the highest scored row's score.
- A corpus with no scored window has normalised score NaN (S_perfect == S_null).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Profile:
    """Weights (A_TP, A_FP, A_FN) of one NAB application profile; all positive."""

    a_tp: float
    a_fp: float
    a_fn: float


PROFILES: dict[str, Profile] = {
    "standard": Profile(1.0, 0.11, 1.0),
    "reward_low_FP_rate": Profile(1.0, 0.22, 1.0),
    "reward_low_FN_rate": Profile(1.0, 0.11, 2.0),
}


def load_windows(path: str | Path) -> dict[str, list[tuple[datetime, datetime]]]:
    """Read windows.json: "<category>/<name>.csv" -> [(start, end), ...] as naive datetimes."""
    raw = json.loads(Path(path).read_text())
    return {
        name: [(datetime.fromisoformat(s), datetime.fromisoformat(e)) for s, e in wins]
        for name, wins in raw.items()
    }


def window_rows(
    timestamps: Sequence[datetime] | np.ndarray,
    windows: Sequence[tuple[datetime, datetime]],
    name: str = "<file>",
) -> list[tuple[int, int]]:
    """Inclusive row ranges (L, R) of `windows` in `timestamps` (non-decreasing, as in NAB).

    Both ends must equal a row's timestamp exactly (compared as datetimes, microsecond
    resolution), else ValueError naming `name` and the timestamp. A duplicated timestamp
    (NAB files repeat a few, e.g. at DST changes) maps to its first row, start and end alike,
    as NAB's own scorer does (``timestamps.index``): a window ending on a repeated timestamp
    ends at its first row.
    """
    ts = np.asarray(timestamps, dtype="datetime64[us]")
    out = []
    for start, end in windows:
        rows = []
        for which, t in (("start", start), ("end", end)):
            hits = np.flatnonzero(ts == np.datetime64(t, "us"))
            if hits.size == 0:
                raise ValueError(f"{name}: window {which} {t} is not a row timestamp")
            rows.append(int(hits[0]))
        if rows[0] > rows[1]:
            raise ValueError(f"{name}: window ({start}, {end}) maps to rows {rows} (end first)")
        out.append((rows[0], rows[1]))
    return out


@dataclass(frozen=True)
class FileScores:
    """One file's detector output: `scores` (float64, one per row, in [0, 1]) and its windows
    as sorted, non-overlapping inclusive row ranges (L, R). Validated on construction."""

    name: str
    scores: np.ndarray
    windows: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = np.asarray(self.scores, dtype=np.float64)
        if s.ndim != 1 or not np.all((s >= 0) & (s <= 1)):  # also rejects NaN
            raise ValueError(f"{self.name}: scores must be 1-D, finite and in [0, 1]")
        wins = [(int(a), int(b)) for a, b in self.windows]
        prev_r = -1
        for a, b in wins:
            if not prev_r < a <= b < s.size:
                raise ValueError(f"{self.name}: windows {wins} not sorted disjoint rows < {s.size}")
            prev_r = b
        object.__setattr__(self, "scores", s)
        object.__setattr__(self, "windows", wins)


@dataclass(frozen=True)
class CorpusResult:
    """Score of a corpus at `threshold`: raw S, normalised (0 = null, 100 = perfect), windows
    detected (tp) and missed (fn), FP rows (fp), and each file's raw contribution to S."""

    threshold: float
    raw: float
    normalised: float
    tp: int
    fn: int
    fp: int
    per_file: dict[str, float]


def probation(n: int) -> int:
    """P = min(floor(0.15 n), 750), in exact integer arithmetic."""
    return min(n * 15 // 100, 750)


def sigma(y: np.ndarray | float) -> np.ndarray:
    """NAB's scaled sigmoid: 2 / (1 + exp(5 y)) - 1, and -1 for y > 3."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(y > 3, -1.0, 2.0 / (1.0 + np.exp(5.0 * np.minimum(y, 4.0))) - 1.0)


def _file_rows(f: FileScores, p: Profile) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per row: value if detected, window index (-1 outside windows); P; scored windows."""
    n = f.scores.size
    i = np.arange(n)
    wid = np.full(n, -1, dtype=np.int64)
    val = np.full(n, -p.a_fp)  # FP with no window before it
    if f.windows:
        ls, rs = np.array(f.windows).T
        k = np.searchsorted(ls, i, side="right") - 1  # last window starting at or before i
        inside = (k >= 0) & (i <= rs[np.maximum(k, 0)])
        wid[inside] = k[inside]
        w = rs - ls + 1
        kin = k[inside]
        val[inside] = p.a_tp * sigma(-(rs[kin] - i[inside] + 1) / w[kin]) / sigma(-1.0)
        prev = np.searchsorted(rs, i, side="left") - 1  # last window ending before i
        after = ~inside & (prev >= 0)
        kp = prev[after]
        val[after] = p.a_fp * sigma((i[after] - rs[kp]) / np.maximum(w[kp] - 1, 1))
    pp = probation(n)
    return val, wid, pp, sum(r >= pp for _, r in f.windows)


def _normalised(raw: float, n_win: int, p: Profile) -> float:
    return 100.0 * (raw + p.a_fn * n_win) / ((p.a_tp + p.a_fn) * n_win) if n_win else float("nan")


def score_at_threshold(files: list[FileScores], profile: Profile, threshold: float) -> CorpusResult:
    """Direct scoring of every file with detections = scored rows with score >= threshold."""
    raw = 0.0
    tp = fn = fp = n_win = 0
    per_file: dict[str, float] = {}
    for f in files:
        val, wid, pp, nw = _file_rows(f, profile)
        det = f.scores >= threshold
        det[:pp] = False
        fp_rows = det & (wid < 0)
        s = float(val[fp_rows].sum())
        fp += int(fp_rows.sum())
        for lo, hi in f.windows:
            if hi < pp:
                continue  # wholly probationary: not scored
            hits = np.flatnonzero(det[lo : hi + 1])
            if hits.size:
                tp, s = tp + 1, s + float(val[lo + hits[0]])
            else:
                fn, s = fn + 1, s - profile.a_fn
        per_file[f.name] = s
        raw += s
        n_win += nw
    norm = _normalised(raw, n_win, profile)
    return CorpusResult(float(threshold), raw, norm, tp, fn, fp, per_file)


def sweep(files: list[FileScores], profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Raw corpus score S at every candidate threshold, in one sort.

    Returns (thresholds, totals), thresholds descending: first the "never fire" one (just
    above the highest scored row's score; +inf if no row is scored), then every distinct
    score of a scored row. FP rows add their own value; a window's value is that of its
    earliest detected row, so each row's effect is the change in its window's running best.
    """
    parts = [_file_rows(f, profile) for f in files]
    s = np.concatenate([f.scores[q[2] :] for f, q in zip(files, parts)] or [np.empty(0)])
    v = np.concatenate([val[pp:] for val, _, pp, _ in parts] or [np.empty(0)])
    offs = np.cumsum([0] + [len(f.windows) for f in files])
    g = np.concatenate(
        [np.where(wid[pp:] >= 0, wid[pp:] + o, -1) for (_, wid, pp, _), o in zip(parts, offs)]
        or [np.empty(0, np.int64)]
    )
    base = -profile.a_fn * sum(nw for *_, nw in parts)
    if s.size == 0:
        return np.array([np.inf]), np.array([base])
    order = np.argsort(-s, kind="stable")
    delta = np.where(g[order] < 0, v[order], 0.0)
    pos = np.flatnonzero(g[order] >= 0)  # sorted positions of window rows
    if pos.size:
        gw, rows = g[order][pos], order[pos]  # rows index s/v; a window's rows are contiguous
        o2 = np.lexsort((pos, gw))  # group by window, then by detection order
        gw, rows, pos = gw[o2], rows[o2], pos[o2]
        m = np.int64(s.size + 1)  # running min of rows per window via one global running max
        earliest = gw * m - np.maximum.accumulate(gw * m - rows)
        best = v[earliest]
        first = np.r_[True, gw[1:] != gw[:-1]]
        prev = np.where(first, -profile.a_fn, np.r_[0.0, best[:-1]])
        delta[pos] = best - prev
    ss = s[order]
    ends = np.r_[ss[1:] != ss[:-1], True]  # evaluate only after a whole tie group
    thresholds = np.r_[np.nextafter(ss[0], np.inf), ss[ends]]
    totals = np.r_[base, base + np.cumsum(delta)[ends]]
    return thresholds, totals


def score_corpus(files: list[FileScores], profile: Profile) -> CorpusResult:
    """Score at the single threshold maximising raw S over all files (see `sweep`)."""
    thresholds, totals = sweep(files, profile)
    return score_at_threshold(files, profile, float(thresholds[int(np.argmax(totals))]))


def score_all_profiles(files: list[FileScores]) -> dict[str, CorpusResult]:
    """`score_corpus` for every profile in PROFILES, each with its own optimal threshold."""
    return {name: score_corpus(files, p) for name, p in PROFILES.items()}
