"""`make nab`: the NAB series in ../shared/data/nab through `streamer replay`'s engine, scored by
NAB's method (bench/nab_score.py).

One recipe for every file, no labels, no per-file settings: for each file (one device, one
value), a model is trained on that file's probationary rows only (the first
min(15% of rows, 750)), with the options in RECIPE (early stopping on the last quarter of
those rows; a file too short for RECIPE's window, or whose probationary rows hold a long gap before
the cutoff, trains with the window halved until it fits, down to MIN_WINDOW: the same rule for
every file, from its probationary rows alone); then every row of the file goes through
the same Engine `streamer run` and `streamer replay` build, with the default anomaly settings,
oldest first. The detector's score for NAB is the anomaly score mapped monotonically into
[0, 1) through its surprise s = -log10(tail probability): s / (1 + s), which keeps apart the
scores that float64 rounds to 1.0.

Prints one JSON object per profile (normalised score, threshold, detected windows, false-positive
rows) and one with the totals and wall time. --per-file adds each file's raw contribution.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import nab_score  # noqa: E402

from streamer.anomaly import AnomalyParams  # noqa: E402
from streamer.engine import Engine  # noqa: E402
from streamer.history import Histories, load_histories  # noqa: E402
from streamer.model import ModelBundle  # noqa: E402
from streamer.replay import replay  # noqa: E402
from streamer.train import TrainingDataError, TrainOptions, train_model  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nab"
RECIPE = TrainOptions(
    hidden_size=16,
    num_layers=1,
    window=64,
    epochs=200,
    batch_size=32,
    val_fraction=0.25,  # the last quarter of the probationary rows, for early stopping
    patience=5,
    normalization="device",
    norm_alpha=1e-3,
    device="cpu",
    progress=False,
    threads=1,
    ttl_seconds=None,  # the replay engine below evicts nothing: no series is cut at a gap either
)
MIN_WINDOW = 8  # a file too short for RECIPE.window trains on windows halved down to this


def train(ts: np.ndarray, values: np.ndarray):
    """train_model on one file's probationary rows with RECIPE, its window halved while the rows
    before the validation cutoff are too few for it (TrainingDataError), down to MIN_WINDOW."""
    window = RECIPE.window
    while True:
        try:
            return train_model([(ts, values)], replace(RECIPE, window=window))
        except TrainingDataError:
            if window <= MIN_WINDOW:
                raise
            window = max(MIN_WINDOW, window // 2)


def detect(histories: Histories, device_id: str, anomaly: AnomalyParams) -> np.ndarray:
    """Scores in [0, 1) for every row of one file, by the recipe above."""
    history = histories.devices[device_id]
    probation = nab_score.probation(len(history.ts))
    result = train(history.ts[:probation], history.values[:probation])
    bundle = ModelBundle(result.model, result.config, f"nab-{device_id}", result.normalization)
    engine = Engine.build(bundle, capacity=1, device="cpu", anomaly=anomaly)
    one = Histories({device_id: history}, histories.value_columns, [])
    surprise = replay(one, engine, progress=False).columns["surprise"].astype(np.float64)
    return surprise / (1.0 + surprise)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with data/ and windows.json")
    parser.add_argument("--per-file", action="store_true", help="print each file's raw score (standard profile)")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    windows = nab_score.load_windows(args.data / "windows.json")
    histories = load_histories(args.data / "data")
    anomaly = AnomalyParams()
    files = []
    for device_id, history in histories.devices.items():
        name = device_id + ".csv"
        stamps = history.ts.astype("datetime64[s]").astype("datetime64[us]")
        rows = nab_score.window_rows(stamps, windows.get(name, []), name)
        files.append(nab_score.FileScores(name, detect(histories, device_id, anomaly), rows))
    results = nab_score.score_all_profiles(files)
    for profile, result in results.items():
        print(json.dumps({"nab": profile, "score": round(result.normalised, 2), "threshold": result.threshold,
                          "windows_detected": result.tp, "windows_missed": result.fn, "false_positive_rows": result.fp}))
    if args.per_file:
        for name, raw in results["standard"].per_file.items():
            print(json.dumps({"file": name, "raw_standard": round(raw, 3)}))
    print(json.dumps({
        "nab_files": len(files),
        "standard": round(results["standard"].normalised, 2),
        "reward_low_FP_rate": round(results["reward_low_FP_rate"].normalised, 2),
        "reward_low_FN_rate": round(results["reward_low_FN_rate"].normalised, 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "recipe": {**RECIPE.to_dict(), "anomaly": asdict(anomaly)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
