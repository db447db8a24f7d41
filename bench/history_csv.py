#!/usr/bin/env python3
"""Reading a training history from CSV: one JSON object per figure on stdout.

A file of ROWS rows (``timestamp,value``, default 3M, about 56 MB) loaded by
``streamer.history.load_histories`` through Arrow's CSV reader (the path it takes for a file
without quotes, blank lines or ragged rows) and through the csv module (the path it keeps for
those), each in a process of its own (peak resident memory is per process), alternating
ROUNDS rounds; the process's resident memory after its imports is given beside each, so that the
figure that matters is the growth. `streamer train` reads its histories this way.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = int(os.environ.get("ROWS", "3000000"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))


def load(path: str, way: str) -> None:
    """In a child process: load ``path`` the ``way`` given and print the figure."""
    sys.path.insert(0, str(REPO))
    import streamer.history as history

    if way == "csv":
        history._read_csv_arrow = lambda *args: None  # the csv module's reading, as for a quoted file
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    histories = history.load_histories(path)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = sum(len(d.ts) for d in histories.devices.values())
    print(json.dumps({"figure": "history_csv_load", "way": way, "rows": rows, "bytes": os.path.getsize(path),
                      "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds),
                      "rss_after_imports_mib": before // 1024, "peak_rss_mib": peak // 1024,
                      "growth_mib": (peak - before) // 1024}), flush=True)


def main() -> None:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.csv"
        rng = np.random.default_rng(0)
        ts = 1_600_000_000 + 60 * np.arange(ROWS)
        values = np.round(rng.normal(size=ROWS) * 10, 4)
        with path.open("w") as out:
            out.write("timestamp,value\n")
            out.writelines(f"{t},{v}\n" for t, v in zip(ts.tolist(), values.tolist()))
        for _ in range(ROUNDS):
            for way in ("arrow", "csv"):
                subprocess.run([sys.executable, __file__, "--child", str(path), way], check=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        load(sys.argv[2], sys.argv[3])
    else:
        main()
