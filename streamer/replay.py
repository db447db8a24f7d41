"""Replay device histories through the engine that `streamer run` serves, with no broker.

Readings go to ``Engine.step`` merged in timestamp order (``iter_time_order``), cut into
batches of at most ``batch_size`` readings, each stepped with ``now`` = the batch's latest
timestamp, so that the state table's TTL follows event time as it follows wall time live. A
device restarts from zeros exactly when a reading comes more than ``state.ttl_seconds`` after
its previous one, as if the engine were stepped at each reading's own time: batches are cut
short where their time span would evict a device that goes on in them, and a device due a
restart is evicted just before the batch that holds its next reading. (With more devices than
the table holds, which least recently seen device makes room follows batch order.)

Devices are independent, so a device's predictions equal those of `streamer run` given the same
readings in the same per-device order (tests/integration/test_replay_kafka.py).

Result rows are grouped by device (in the histories' device order), each device's rows in time
order. The forecast at a device's row t is the model's forecast of the device's reading at row
t + 1; the residual, anomaly score and flag at row t judge reading t against the forecast made
at row t - 1.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from streamer.engine import Engine, ReadingBatch
from streamer.errors import StreamerError
from streamer.history import TS_MAX, TS_MIN, Histories, iter_time_order, unwritable_reason, write_table

MAX_NAME_CHARS = 120  # of a plot's file name from its device id (file systems allow 255 bytes)
YEAR_S = 366 * 86400.0
DATE_AXIS_S = (TS_MIN + YEAR_S, TS_MAX - YEAR_S)  # plots' time axis as dates within this (epoch s)


class ReplayError(StreamerError):
    """Histories that this engine cannot replay, or a plot request that names unknown devices."""


@dataclass(frozen=True)
class ReplayResult:
    """One row per reading. columns: ``device_id`` (object), ``ts`` (float64 epoch seconds),
    ``value_<name>`` and ``forecast_<name>`` per value column (float32, reading units),
    ``residual`` (float32, normalised units), ``anomaly_score`` (float64 in [0, 1]),
    ``surprise`` (float32, -log10 tail probability), ``is_anomaly`` (bool); all of equal length.
    device_rows: each device's rows, a slice of every column. evicted_ttl / evicted_capacity:
    devices the state table evicted during the replay (each restarts from zeros if seen again)."""

    columns: dict[str, np.ndarray]
    value_columns: tuple[str, ...]
    device_rows: dict[str, slice]
    threshold: float
    model_version: str
    evicted_ttl: int
    evicted_capacity: int
    seconds: float

    def __len__(self) -> int:
        return len(self.columns["ts"])

    @property
    def flagged(self) -> int:
        return int(self.columns["is_anomaly"].sum())

    def device(self, device_id: str) -> dict[str, np.ndarray]:
        """Every column of one device's rows (views, time order)."""
        rows = self.device_rows[device_id]
        return {name: column[rows] for name, column in self.columns.items()}

    def write(self, path: str | Path) -> None:
        """Write the columns as CSV or Parquet, chosen by the suffix of ``path``."""
        write_table(path, self.columns)


def replay(histories: Histories, engine: Engine, *, batch_size: int = 4096, progress: bool = True) -> ReplayResult:
    """Step every reading of ``histories`` through ``engine`` (order and time: see the module
    doc). The engine's table is used as it is: give a fresh engine for a replay from zero state.
    A progress bar of readings goes to stderr unless ``progress`` is False.

    Raises ReplayError when the histories hold no readings, or their value columns are not the
    model's values per reading.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not any(len(h.ts) for h in histories.devices.values()):
        raise ReplayError("no readings to replay")
    _check_value_count(histories, engine)
    started = time.perf_counter()
    devices = list(histories.devices.values())
    counts = np.array([len(h.ts) for h in devices], dtype=np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    n = int(ends[-1])
    ids, ts, values = iter_time_order(histories)
    # Merged position <-> result row: a device's k-th reading in merged order is its k-th in
    # time order, and a stable sort by device keeps that order within each device.
    position = {device.device_id: i for i, device in enumerate(devices)}
    merged_of_row = np.argsort(np.fromiter(map(position.__getitem__, ids), np.int64, n), kind="stable")
    row_of = np.empty(n, dtype=np.int64)
    row_of[merged_of_row] = np.arange(n)
    ttl = engine.table.ttl_seconds
    if ttl is not None:
        deadline, restart_prev = _idle_limits(ts, row_of, merged_of_row, starts[counts > 0], ttl)  # none of an empty device
    del merged_of_row

    width = len(histories.value_columns)
    forecast = [np.empty(n, np.float32) for _ in range(width)]
    residual = np.empty(n, np.float32)
    score = np.empty(n, np.float64)
    surprise = np.empty(n, np.float32)
    flagged = np.empty(n, bool)
    evicted_ttl = evicted_capacity = 0
    with tqdm(total=n, unit="reading", unit_scale=True, file=sys.stderr, disable=not progress, desc="replay") as bar:
        start = 0
        while start < n:
            stop = min(start + batch_size, n)
            if ttl is not None:
                stop = _batch_stop(start, stop, ts, deadline, restart_prev)
                restarting = np.flatnonzero(restart_prev[start:stop] >= 0) + start
                if len(restarting):
                    evicted_ttl += engine.table.evict_many([ids[i] for i in restarting.tolist()])
            batch = ReadingBatch(ids[start:stop], ts[start:stop], values[start:stop])
            predictions, report = engine.step(batch, now=float(ts[stop - 1]))  # ts is sorted: the batch's latest
            rows = row_of[start:stop]
            for k in range(width):
                forecast[k][rows] = predictions.forecast[:, k]
            residual[rows] = predictions.residual
            score[rows] = predictions.anomaly_score
            surprise[rows] = predictions.surprise
            flagged[rows] = predictions.is_anomaly
            evicted_ttl += report.evicted_idle
            evicted_capacity += report.evicted_capacity
            bar.update(stop - start)
            start = stop

    names = histories.value_columns
    columns: dict[str, np.ndarray] = {
        "device_id": np.repeat(np.array([h.device_id for h in devices], dtype=object), counts),
        "ts": np.concatenate([h.ts for h in devices]),
    }
    for k, name in enumerate(names):
        columns[f"value_{name}"] = np.concatenate([h.values[:, k] for h in devices])
    for k, name in enumerate(names):
        columns[f"forecast_{name}"] = forecast[k]
    columns.update(residual=residual, anomaly_score=score, surprise=surprise, is_anomaly=flagged)
    return ReplayResult(
        columns=columns,
        value_columns=names,
        device_rows={h.device_id: slice(int(a), int(b)) for h, a, b in zip(devices, starts, ends)},
        threshold=engine.anomaly.threshold,
        model_version=engine.model_version,
        evicted_ttl=evicted_ttl,
        evicted_capacity=evicted_capacity,
        seconds=time.perf_counter() - started,
    )


def _idle_limits(
    ts: np.ndarray, row_of: np.ndarray, merged_of_row: np.ndarray, starts: np.ndarray, ttl: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per reading in merged order: (deadline, restart_prev). A reading within ``ttl`` of its
    device's previous one continues the device; its deadline is that previous timestamp + ttl,
    the latest ``now`` at which the engine keeps the device (inf for the rest). A reading more
    than ``ttl`` after its device's previous one restarts the device (as the engine stepped at
    each reading's own time would): restart_prev is the merged position of that previous
    reading, -1 for the rest."""
    first = np.zeros(len(ts), bool)
    first[starts] = True
    has_prev = ~first[row_of]
    prev = np.where(has_prev, merged_of_row[row_of - 1], 0)  # row_of - 1 is -1 only at a first reading
    gap = ts - ts[prev]
    restart = has_prev & (gap > ttl)
    deadline = np.where(has_prev & ~restart, ts[prev] + ttl, np.inf)
    return deadline, np.where(restart, prev, -1)


def _batch_stop(start: int, limit: int, ts: np.ndarray, deadline: np.ndarray, restart_prev: np.ndarray) -> int:
    """End of the longest batch from ``start`` (up to ``limit``) whose step with now = its latest
    timestamp evicts no device that goes on in it, and in which a device restarts only at its first
    reading (replay evicts it just before the step). Always at least one reading."""
    window = slice(start, limit)
    ok = (ts[window] <= np.minimum.accumulate(deadline[window])) & (restart_prev[window] < start)
    return limit if ok.all() else start + max(int(np.argmin(ok)), 1)


def check_output_file(path: Path, suffixes: Sequence[str], what: str) -> None:
    """Raise ReplayError naming ``what`` and ``path`` unless a file with one of ``suffixes``
    (without dot, any case) can be written there: not a directory, its directory exists and is
    writable, and the file, if there, is writable."""
    name = f"{what} {path}"
    if path.suffix.lower().lstrip(".") not in suffixes:
        raise ReplayError(f"{name}: want a file ending in {' or '.join('.' + s for s in suffixes)}")
    reason = unwritable_reason(path)
    if reason is not None:
        raise ReplayError(f"{name}: {reason}")


def make_output_dir(path: Path, what: str) -> Path | None:
    """Create directory ``path`` (and its parents) if need be; ReplayError naming ``what`` and
    ``path`` when that fails or it is not writable. Returns the topmost directory it created
    (None: ``path`` was there), for ``remove_empty_dirs`` to take back."""
    top = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        top = directory
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReplayError(f"{what} {path}: cannot create the directory ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ReplayError(f"{what} {path}: directory not writable")
    return top


def remove_empty_dirs(path: Path, top: Path) -> None:
    """Remove ``path`` and its parents up to ``top`` (as make_output_dir returned it), each only
    while it is empty."""
    for directory in (path, *path.parents):
        try:
            directory.rmdir()
        except OSError:  # not empty (or gone): what is in it is not ours to remove
            return
        if directory == top:
            return


def _check_value_count(histories: Histories, engine: Engine) -> None:
    want, names = engine.config.values_size, histories.value_columns
    if len(names) == want:
        return
    sources = list(dict.fromkeys(h.source for h in histories.devices.values()))
    data = sources[0] + (f" (and {len(sources) - 1} more files)" if len(sources) > 1 else "")
    raise ReplayError(
        f"data {data} has {len(names)} value column(s) {list(names)}, but model "
        f"{engine.bundle.path or engine.model_version} takes {want} value(s) per reading"
        " (pick columns with --value-columns)"
    )


# --- plots -------------------------------------------------------------------------------------


def safe_file_name(device_id: str) -> str:
    """A file name (without suffix) from a device id: ``/`` -> ``__``, every other character
    outside [A-Za-z0-9._-] -> ``_``, cut to MAX_NAME_CHARS; never '', '.' or '..'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", device_id.replace("/", "__"))[:MAX_NAME_CHARS]
    if not name.strip("."):  # '', '.' and '..' name no file of their own
        name = "_" * max(len(name), 1)
    return name


def _pick_devices(result: ReplayResult, devices: Sequence[str] | None, most: int) -> list[str]:
    """``devices`` as given (unknown ids raise ReplayError), else the ``most`` devices with the
    most flagged readings, ties in data order."""
    if devices is not None:
        unknown = [d for d in devices if d not in result.device_rows]
        if unknown:
            raise ReplayError(f"no such device(s) in the replay: {unknown[:5]}" + (" ..." if len(unknown) > 5 else ""))
        return list(devices)[:most]
    flags = result.columns["is_anomaly"]
    counts = {d: int(flags[rows].sum()) for d, rows in result.device_rows.items()}
    return sorted(counts, key=lambda d: -counts[d])[:most]  # sorted is stable: ties keep data order


def _times(ts: np.ndarray) -> np.ndarray:
    """Epoch seconds as datetime64[ms], which matplotlib draws as dates; within a year of year 1
    or 9999, where matplotlib's dates end (its ticks reach past the data), the seconds as they are."""
    if len(ts) and (ts.min() < DATE_AXIS_S[0] or ts.max() > DATE_AXIS_S[1]):
        return ts
    return np.round(ts * 1000.0).astype("datetime64[ms]")


def _draw_series(ax, data: dict[str, np.ndarray], value: str, forecast: str, legend: bool) -> None:
    """The series, the forecast drawn at the time it forecasts, flagged readings in red."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    t = _times(data["ts"])
    flagged = data["is_anomaly"]
    ax.plot(t, data[value], lw=0.8, color="tab:blue", label="reading")
    ax.plot(t[1:], data[forecast][:-1], lw=0.8, color="tab:orange", alpha=0.8, label="forecast")
    ax.scatter(t[flagged], data[value][flagged], s=10, color="red", zorder=3, label="flagged")
    if legend:
        ax.legend(loc="upper left", fontsize="small")
    if not np.issubdtype(t.dtype, np.datetime64):
        ax.set_xlabel("epoch seconds")
        return
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    """An Agg figure and its axes, without pyplot: no display needed, and the process's
    backend and figure registry (a notebook's, say) are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kw)


def plot_devices(
    result: ReplayResult, out_dir: str | Path, devices: Sequence[str] | None = None, max_devices: int = 50
) -> list[Path]:
    """One PNG per device in ``out_dir`` (created), named by safe_file_name(device id) (with
    -2, -3, ... where two ids map to one name): the first value column with the forecast
    drawn at the time it forecasts and flagged readings in red, above the anomaly score and the
    threshold. Devices: ``devices`` (in that order), else those with the most flagged readings;
    at most ``max_devices``. Returns the files written, in device order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result.value_columns[0]
    value, forecast = f"value_{name}", f"forecast_{name}"
    fig, axes = _figure(12, 5, 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top, bottom = axes[0, 0], axes[1, 0]
    written: list[Path] = []
    used: set[str] = set()
    for device_id in _pick_devices(result, devices, max_devices):
        data = result.device(device_id)
        top.clear()
        bottom.clear()
        _draw_series(top, data, value, forecast, legend=True)
        # Ids and names as text: matplotlib reads $...$ as maths, and a bad formula ended the run.
        top.set_ylabel(name, parse_math=False)
        top.set_title(f"{device_id}: {len(data['ts'])} readings, {int(data['is_anomaly'].sum())} flagged",
                      parse_math=False)
        bottom.plot(_times(data["ts"]), data["anomaly_score"], lw=0.8, color="tab:gray")
        bottom.axhline(result.threshold, ls="--", lw=0.8, color="red")
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_ylabel("anomaly score")
        base = stem = safe_file_name(device_id)
        suffix = 2
        while stem in used:
            stem, suffix = f"{base}-{suffix}", suffix + 1
        used.add(stem)
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=80)
        written.append(path)
    return written


def plot_page(
    result: ReplayResult, path: str | Path, devices: Sequence[str] | None = None, max_devices: int = 16, cols: int = 4
) -> Path:
    """One PNG at ``path``: a grid of up to ``max_devices`` devices (chosen as plot_devices
    chooses), each its first value column, forecast and flagged readings."""
    chosen = _pick_devices(result, devices, max_devices)
    if not chosen:
        raise ReplayError("no devices to plot")
    cols = min(cols, len(chosen))
    rows = -(-len(chosen) // cols)
    name = result.value_columns[0]
    fig, axes = _figure(4.5 * cols, 2.6 * rows, rows, cols)
    for i, ax in enumerate(axes.flat):
        if i >= len(chosen):
            ax.set_axis_off()
            continue
        data = result.device(chosen[i])
        _draw_series(ax, data, f"value_{name}", f"forecast_{name}", legend=False)
        ax.set_title(f"{chosen[i]} ({int(data['is_anomaly'].sum())} flagged)", fontsize="small", parse_math=False)
        ax.tick_params(labelsize="x-small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    return path
