"""Device histories from CSV or Parquet, for training and replay.

Three layouts, detected per file by the presence of a ``device_id`` column:

* long: ``device_id``, ``timestamp`` (or ``ts``) and value columns, many devices mixed;
* per device: ``timestamp`` (or ``ts``) and value columns; the device id is the file's path
  relative to the directory given, without suffix, or the file stem for a single file;
* a directory: every ``*.csv`` / ``*.parquet`` under it (recursive, sorted by path), each
  long or per device; all files must have the same value columns, matched by name (in any
  order; the first file's order is kept).

Value columns are ``value_columns`` when given, else every column other than ``device_id`` and
the timestamp column (unnamed columns, e.g. a written index, are ignored, and so is the index
pandas writes to Parquet). Timestamps are epoch
seconds, ISO-8601 text (naive means UTC) or Parquet timestamp/date columns (a column of dates
written YYYYMMDD, read as numbers, is refused: as seconds they would be instants of 1970). Each device's rows
come back sorted by timestamp, equal timestamps in file order. A device id belongs to one file:
the same id in two files is an error naming both.
"""

from __future__ import annotations

import csv
import gc
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from streamer.errors import StreamerError
from streamer.records import (  # refused here as on the live path
    MAX_ABS_VALUE,
    MAX_DEVICE_ID_LENGTH,
    TS_MAX,
    TS_MIN,
    epoch_seconds,
    iso_seconds,
)

SUFFIXES = (".csv", ".parquet")
DEVICE_COLUMN = "device_id"
TIME_COLUMNS = ("timestamp", "ts")  # first one present wins
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")  # an unnamed index, as pandas writes it to Parquet
SHOWN_CHARS = 80  # offending text is cut to this many characters
# TS_MIN, TS_MAX (records): timestamps ISO-8601 can write (years 1 to 9999), in epoch seconds;
# past them a column is usually epoch milliseconds, microseconds or nanoseconds.


def _short(text: object) -> str:
    text = str(text)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


class HistoryError(StreamerError):
    """History data that cannot be used; names the file, line and value when there is one."""

    def __init__(self, reason: str, path: object = None, line: int | None = None, value: object = None) -> None:
        where = ""
        if path is not None:
            where = f" {path}" + (f" line {line}" if line is not None else "")
        shown = f" (got {_short(value)!r})" if value is not None else ""
        super().__init__(f"history{where}: {reason}{shown}")
        self.reason = reason
        self.path = path
        self.line = line
        self.value = value


@dataclass(frozen=True)
class DeviceHistory:
    """One device's readings: ts (T,) float64 epoch seconds, non-decreasing; values (T, F)
    float32, finite; lines (T,) int64 CSV line (header = 1) or 1-based Parquet row of each."""

    device_id: str
    ts: np.ndarray
    values: np.ndarray
    source: str
    lines: np.ndarray


@dataclass(frozen=True)
class BadRow:
    """A skipped row: file, CSV line or Parquet row, why, and the offending text (<= 80 chars)."""

    path: str
    line: int
    reason: str
    value: str


@dataclass(frozen=True)
class Histories:
    """Devices in first-seen order (files in path order, rows in file order)."""

    devices: dict[str, DeviceHistory]
    value_columns: tuple[str, ...]
    bad_rows: list[BadRow] = field(default_factory=list)  # only filled when on_bad="skip"

    def time_range(self) -> tuple[float, float]:
        """(earliest, latest) timestamp over all devices."""
        return (float(min(h.ts[0] for h in self.devices.values())), float(max(h.ts[-1] for h in self.devices.values())))


# ----------------------------------------------------------------------------- parsing helpers


def _parse_one_ts(text: str) -> float:
    """Epoch seconds from epoch-seconds or ISO-8601 text (naive = UTC). Raises ValueError."""
    text = text.strip()
    try:
        return _number(text)
    except ValueError:
        return iso_seconds(text)


def _number(text: str) -> float:
    """float(text), but only for what a number is written as in a data file: Python's float()
    also reads digit groups (``1_000``) and digits of other scripts, which are refused here."""
    number = text.strip()  # float() takes white space around a number, a no-break space too
    if "_" in number or not number.isascii():
        raise ValueError(f"not a number: {text!r}")
    return float(number)


def _all_numbers(texts: list) -> np.ndarray | None:
    """_number() of every text at C speed, or None when one is not a number as _number reads it
    (then each is looked at on its own)."""
    try:
        values = np.fromiter(map(float, texts), np.float64, len(texts))
    except (ValueError, TypeError):
        return None
    joined = "".join(texts)  # one pass for what float() reads and _number refuses
    return values if "_" not in joined and joined.isascii() else None


def _floats(texts: list) -> tuple[np.ndarray, np.ndarray]:
    """_number() of every text; (values, unparsable mask). Unparsable entries are NaN."""
    n = len(texts)
    values = _all_numbers(texts)
    if values is not None:
        return values, np.zeros(n, bool)
    out, bad = np.full(n, np.nan), np.zeros(n, bool)
    for i, text in enumerate(texts):
        if text is None:  # a null of a Parquet text column: unparsable (had raised in _number)
            bad[i] = True
            continue
        try:
            out[i] = _number(text)
        except (ValueError, TypeError):
            bad[i] = True
    return out, bad


def _timestamps_from_arrow(arr: pa.Array) -> np.ndarray:
    """Epoch seconds float64 of a timestamp array; nulls become NaN."""
    raw = pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    secs = epoch_seconds(raw, arr.type.unit)  # as the live decoder's
    secs[arr.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return secs


def _timestamp_texts(texts: list | None, arr: pa.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Epoch seconds of timestamp texts (a list, or a string Arrow array); (seconds,
    unparsable mask). None is unparsable."""
    if texts is not None:
        seconds = _all_numbers(texts)  # epoch seconds
        if seconds is not None:
            return seconds, np.zeros(len(texts), bool)
        arr = pa.array(texts, pa.string())
    assert arr is not None
    n = len(arr)
    # numbers, or ISO text all naive or all with offsets: Arrow parses the column at C speed
    if arr.null_count == 0:
        for kind in (pa.float64(), pa.timestamp("us"), pa.timestamp("us", tz="UTC")):
            try:
                parsed = pc.cast(arr, kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            secs = parsed.to_numpy(zero_copy_only=False) if kind == pa.float64() else _timestamps_from_arrow(parsed)
            return secs, np.zeros(n, bool)
    texts = arr.to_pylist() if texts is None else texts
    out, bad = np.full(n, np.nan), np.zeros(n, bool)  # mixed or bad: one at a time
    for i, text in enumerate(texts):
        try:
            out[i] = _parse_one_ts(text)
        except (ValueError, TypeError, AttributeError, OverflowError):
            bad[i] = True
    return out, bad


def _refuse_compact_dates(ts: np.ndarray, bad: np.ndarray, path: object) -> None:
    """HistoryError when every timestamp reads as a date written YYYYMMDD (20200101): taken for
    epoch seconds they are instants of 1970-71 a second or so apart, and the time features, the
    validation split and expiry would all be wrong without a word."""
    good = ts[~bad]
    if good.size == 0 or not ((good >= 19000101) & (good <= 29991231) & (good == np.floor(good))).all():
        return
    month, day = (good // 100) % 100, good % 100
    if ((month >= 1) & (month <= 12) & (day >= 1) & (day <= 31)).all():
        first = int(good[0])
        raise HistoryError(f"timestamps such as {first} read as dates written YYYYMMDD, or as epoch seconds of"
                           f" 1970-71; write them as ISO-8601 ({str(first)[:4]}-{str(first)[4:6]}-{str(first)[6:]})"
                           " or as epoch seconds", path)


@dataclass
class _Table:
    """One file's rows before checks: raw columns plus the text to show for a bad entry."""

    path: Path
    n: int
    lines: np.ndarray  # int64
    device_codes: np.ndarray | None  # long format: int64 index into device_names per row, -1 = null
    device_names: list[str]  # stripped ids, in first-seen order; "" = empty
    ts: np.ndarray  # float64 seconds, NaN where unparsable
    ts_bad: np.ndarray  # bool: unparsable
    values: list[np.ndarray]  # float64 per value column
    values_bad: list[np.ndarray]  # bool per value column: unparsable
    value_names: tuple[str, ...]
    show_ts: Callable[[int], object]  # row -> timestamp as read, for BadRow.value
    show_value: Callable[[int, int], object]  # (value column, row) -> value as read
    early_bad: list[BadRow]  # rows never parsed (too few fields, malformed CSV)


def _layout(names: list[str], value_columns: Sequence[str] | None, path: Path) -> tuple[str | None, str, list[str]]:
    """(device column or None, timestamp column, value columns) of a file's header."""
    time_col = next((name for name in TIME_COLUMNS if name in names), None)
    if time_col is None:
        raise HistoryError(f"no timestamp column (want one of {list(TIME_COLUMNS)})", path, value=names)
    device_col = DEVICE_COLUMN if DEVICE_COLUMN in names else None
    if value_columns is not None:
        missing = [name for name in value_columns if name not in names]
        if missing:
            raise HistoryError(f"missing value column(s) {missing}", path, value=names)
        taken = [name for name in value_columns if name in (time_col, device_col)]
        if taken:
            raise HistoryError(f"value column(s) {taken} are the {'timestamp' if time_col in taken else 'device'} column",
                               path, value=names)
        if len(set(value_columns)) != len(value_columns):
            raise HistoryError(f"value columns {list(value_columns)} name a column twice", path, value=names)
        chosen = list(value_columns)
    else:
        chosen = [name for name in names if name and name not in (DEVICE_COLUMN, time_col)]
    if not chosen:
        raise HistoryError("no value columns", path, value=names)
    twice = sorted({name for name in (time_col, device_col, *chosen) if name and names.count(name) > 1})
    if twice:
        raise HistoryError(f"column(s) {twice} appear more than once in the header", path, value=names)
    return device_col, time_col, chosen


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Millions of new row lists (no cycles) would trigger many useless GC passes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _arrow_file(path: Path, mode: str = "rb") -> pa.NativeFile:
    """``path`` opened by Arrow under its name's bytes: given a str, Arrow encodes it as UTF-8,
    which a name holding bytes that are not (Python's surrogate escapes) cannot be."""
    return pa.OSFile(os.fsencode(path), mode)


def _read_csv(path: Path, value_columns: Sequence[str] | None) -> _Table:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: drop a BOM
            try:
                header = next(csv.reader(handle), None)
            except csv.Error as exc:  # e.g. a field past csv's limit (131,072 characters): had been a traceback
                raise HistoryError(f"malformed CSV header: {exc}", path, 1) from None
        if header is not None:
            fast = _read_csv_arrow(path, header, value_columns)
            if fast is not None:
                return fast
        with _gc_paused(), path.open(newline="", encoding="utf-8-sig") as handle:
            return _parse_csv(path, csv.reader(handle), value_columns)
    except UnicodeDecodeError as exc:
        raise HistoryError(f"not UTF-8 text ({exc.reason} at byte {exc.start} of a read block)", path) from None
    except OSError as exc:
        raise HistoryError(f"unreadable: {exc.strerror or exc}", path) from exc


def _read_csv_arrow(path: Path, header: list[str], value_columns: Sequence[str] | None) -> _Table | None:
    """The columns a file needs, read by Arrow's CSV reader as text (C speed, a few bytes a value
    instead of a Python string's 50 or more), then parsed as _parse_csv parses them; None where the
    file needs the csv module's reading for _parse_csv's results: quotes (a quoted newline would
    shift the line numbers of bad rows), rows of other widths, blank lines, header names with white
    space around them or repeated, bytes that are not UTF-8. Layout errors are raised as there."""
    names = [name.strip() for name in header]
    device_col, time_col, chosen = _layout(names, value_columns, path)
    if names != header or len(set(names)) != len(names) or "" in names:
        return None
    try:
        with path.open("rb") as raw:  # quotes, or blank lines (Arrow reads one as a row of empty fields)
            if _holds(raw, (b'"', b"\n\n", b"\n\r", b"\r\r")):
                return None
        with _arrow_file(path) as source:
            table = pacsv.read_csv(
                source,
                parse_options=pacsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in names},
                    strings_can_be_null=False, quoted_strings_can_be_null=False, null_values=[],
                ),
            )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowKeyError):
        return None
    # A field longer than the csv module takes is a malformed row there, in any column.
    limit = csv.field_size_limit()
    if any((pc.max(pc.utf8_length(column)).as_py() or 0) > limit for column in table.columns):
        return None
    table = table.select([name for name in (device_col, time_col, *chosen) if name])
    n = table.num_rows
    ts_col = table.column(time_col).combine_chunks()
    ts, ts_bad = _timestamp_texts(None, ts_col)
    _refuse_compact_dates(ts, ts_bad, path)
    value_cols = [table.column(name).combine_chunks() for name in chosen]
    parsed = [_floats_arrow(col) for col in value_cols]
    codes, devices = None, []
    if device_col is not None:  # ids stripped as _parse_csv strips them, once per distinct id
        encoded = table.column(device_col).combine_chunks().dictionary_encode()
        stripped = [str(raw).strip() for raw in encoded.dictionary.to_pylist()]  # first-seen order, as the dictionary's
        remap, devices = _first_seen_codes(stripped)
        codes = remap[encoded.indices.to_numpy(zero_copy_only=False)] if n else np.zeros(0, np.int64)
    return _Table(
        path, n, np.arange(2, n + 2, dtype=np.int64), codes, devices, ts, ts_bad,
        [p[0] for p in parsed], [p[1] for p in parsed], tuple(chosen),
        show_ts=lambda i: ts_col[i].as_py(), show_value=lambda c, i: value_cols[c][i].as_py(), early_bad=[],
    )


def _first_seen_codes(ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """(each id's code, the distinct ids in first-seen order), in C-speed loops only: dict.fromkeys
    keeps first-seen order."""
    index = dict.fromkeys(ids)
    for code, device in enumerate(index):
        index[device] = code
    return np.fromiter(map(index.__getitem__, ids), np.int64, len(ids)), list(index)


def _holds(handle: Any, needles: tuple[bytes, ...], block: int = 1 << 24) -> bool:
    """Whether the rest of ``handle`` holds one of ``needles`` (of 3 bytes at most), read a block
    at a time (each block after the last 2 bytes of the one before, for needles across blocks)."""
    tail = b""
    while chunk := handle.read(block):
        seen = tail + chunk
        if any(needle in seen for needle in needles):
            return True
        tail = seen[-2:]
    return False


def _floats_arrow(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """_floats of a text column: Arrow parses it when every entry is a number Python would read the
    same way (plain ASCII decimal or exponent notation, no white space); else one at a time, and
    so is a column with a NaN (Arrow also reads C's ``nan(...)``, which Python refuses)."""
    try:
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _floats(col.to_pylist())
    if np.isnan(values).any():
        return _floats(col.to_pylist())
    return values, np.zeros(len(values), bool)


def _parse_csv(path: Path, reader: Any, value_columns: Sequence[str] | None) -> _Table:
    """Columns of an open csv.reader (needs its line_num); short or broken rows go to early_bad."""
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise HistoryError("empty file (no header)", path) from None
    except csv.Error as exc:
        raise HistoryError(f"malformed CSV header: {exc}", path, 1) from exc
    device_col, time_col, chosen = _layout(header, value_columns, path)
    di = header.index(device_col) if device_col else None
    ti = header.index(time_col)
    vis = [header.index(name) for name in chosen]
    need = max([ti, *vis] + ([di] if di is not None else [])) + 1
    width = len(header)
    rows: list[list[str]] = []
    lines: list[int] = []
    early: list[BadRow] = []
    keep_row, keep_line = rows.append, lines.append
    while True:  # csv.reader goes on after an error; restart the loop on the next line
        try:
            for row in reader:
                if need <= len(row) <= width or (len(row) > width and not any(row[width:])):  # a trailing comma
                    keep_row(row)
                    keep_line(reader.line_num)
                elif len(row) > width:
                    early.append(BadRow(str(path), reader.line_num, f"too many fields ({len(row)}, the header has {width})",
                                        _short(",".join(row))))
                elif row:  # blank lines are no data
                    early.append(BadRow(str(path), reader.line_num, "too few fields", _short(",".join(row))))
            break
        except csv.Error as exc:
            early.append(BadRow(str(path), reader.line_num, "malformed CSV", _short(exc)))
    ts_texts = list(map(itemgetter(ti), rows))
    ts, ts_bad = _timestamp_texts(ts_texts)
    _refuse_compact_dates(ts, ts_bad, path)
    value_texts = [list(map(itemgetter(vi), rows)) for vi in vis]
    parsed = [_floats(texts) for texts in value_texts]
    codes, devices = None, []
    if di is not None:
        codes, devices = _first_seen_codes(list(map(str.strip, map(itemgetter(di), rows))))
    return _Table(
        path, len(rows), np.array(lines, np.int64), codes, devices, ts, ts_bad,
        [p[0] for p in parsed], [p[1] for p in parsed], tuple(chosen),
        show_ts=lambda i: ts_texts[i], show_value=lambda c, i: value_texts[c][i], early_bad=early,
    )


def _parquet_numbers(col: pa.Array, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """float64 of a numeric or numeric-text column; (values, unparsable-or-null mask)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col = pc.cast(col, pa.float64())
        except pa.ArrowInvalid:
            return _floats(col.to_pylist())
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
        raise HistoryError(f"column {name!r} has type {col.type}, not numbers", path)
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    # safe=False: integers past 2**53 round to the nearest float64 (the checks then judge their range).
    return pc.fill_null(col.cast(pa.float64(), safe=False), np.nan).to_numpy(zero_copy_only=False), nulls


def _read_parquet(path: Path, value_columns: Sequence[str] | None) -> _Table:
    try:
        with _arrow_file(path) as source:
            schema = pq.read_schema(source)
        names = schema.names
        if value_columns is None:  # a DataFrame's index that pandas wrote is no value, as in a CSV
            index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
            index -= {DEVICE_COLUMN, *TIME_COLUMNS}
            names = ["" if name in index or _PANDAS_INDEX.fullmatch(name) else name for name in names]
        device_col, time_col, chosen = _layout(names, value_columns, path)
        wanted = ([device_col] if device_col else []) + [time_col] + chosen
        with _arrow_file(path) as source:
            table = pq.read_table(source, columns=list(dict.fromkeys(wanted)))
    except (pa.ArrowException, OSError) as exc:
        raise HistoryError(f"unreadable Parquet: {exc}", path) from exc
    n = table.num_rows
    tcol = table.column(time_col).combine_chunks()
    if pa.types.is_dictionary(tcol.type):
        tcol = tcol.cast(tcol.type.value_type)
    if pa.types.is_date(tcol.type):
        tcol = tcol.cast(pa.timestamp("ms"))
    if pa.types.is_boolean(tcol.type):
        raise HistoryError(f"column {time_col!r} has type bool, not timestamps", path)
    if pa.types.is_timestamp(tcol.type):  # stored as UTC instants; naive ones taken as UTC
        ts, ts_bad = _timestamps_from_arrow(tcol), tcol.is_null().to_numpy(zero_copy_only=False)
    elif pa.types.is_string(tcol.type) or pa.types.is_large_string(tcol.type):
        ts, ts_bad = _timestamp_texts(None, tcol)
        _refuse_compact_dates(ts, ts_bad, path)  # as text in a CSV file
    else:
        ts, ts_bad = _parquet_numbers(tcol, time_col, path)
        _refuse_compact_dates(ts, ts_bad, path)
    vcols = [table.column(name).combine_chunks() for name in chosen]
    parsed = [_parquet_numbers(col, name, path) for col, name in zip(vcols, chosen)]
    codes, device_names = None, []
    if device_col:  # dictionary_encode numbers ids in first-seen order
        try:  # numbers and text become ids; bytes that are not UTF-8, lists or structs cannot
            ids = pc.utf8_trim_whitespace(table.column(device_col).cast(pa.string()).combine_chunks())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise HistoryError(f"column {device_col!r} of type {table.schema.field(device_col).type} cannot be"
                               f" read as device ids ({str(exc).splitlines()[0][:160]})", path) from None
        encoded = pc.dictionary_encode(ids)
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        device_names = encoded.dictionary.to_pylist()
    return _Table(
        path, n, np.arange(1, n + 1, dtype=np.int64), codes, device_names, ts, ts_bad,
        [p[0] for p in parsed], [p[1] for p in parsed], tuple(chosen),
        show_ts=lambda i: _shown(tcol, i), show_value=lambda c, i: vcols[c][i].as_py(), early_bad=[],
    )


def _shown(col: pa.Array, i: int) -> object:
    """col[i] as Python has it, to show in a bad row; a timestamp Python's datetime cannot hold
    (past year 9999: epoch milliseconds stored as seconds, say) as its number and unit."""
    try:
        return col[i].as_py()
    except (OverflowError, ValueError):
        if not pa.types.is_timestamp(col.type):
            raise
        return f"{col.slice(i, 1).cast(pa.int64())[0].as_py()} {col.type.unit} since 1970"


def _in_order(table: _Table, names: tuple[str, ...]) -> _Table:
    """``table`` with its value columns in the order of ``names`` (the same names)."""
    where = [table.value_names.index(name) for name in names]
    show = table.show_value
    return replace(table, values=[table.values[c] for c in where], values_bad=[table.values_bad[c] for c in where],
                   value_names=names, show_value=lambda c, i: show(where[c], i))


def _check(table: _Table) -> tuple[np.ndarray, list[BadRow]]:
    """(good-row mask, bad rows in line order); a row's first failing check names it."""
    where = str(table.path)
    reason: dict[int, tuple[str, object]] = {}

    def flag(mask: np.ndarray, why: str, show: Callable[[int], object]) -> None:
        for i in np.flatnonzero(mask):
            reason.setdefault(int(i), (why, show(int(i))))

    if table.device_codes is not None:
        empty = table.device_codes < 0
        if "" in table.device_names:
            empty |= table.device_codes == table.device_names.index("")
        flag(empty, "empty device_id", lambda i: "")
        # As the live path refuses them (invalid_schema): replay would score what run never does.
        too_long = [code for code, name in enumerate(table.device_names) if len(name) > MAX_DEVICE_ID_LENGTH]
        if too_long:
            codes = table.device_codes
            flag(np.isin(codes, too_long), f"device_id longer than {MAX_DEVICE_ID_LENGTH} characters",
                 lambda i: table.device_names[int(codes[i])])
    flag(table.ts_bad, "unparsable timestamp", table.show_ts)
    flag(~table.ts_bad & ~np.isfinite(table.ts), "non-finite timestamp", table.show_ts)
    outside = np.isfinite(table.ts) & ((table.ts < TS_MIN) | (table.ts > TS_MAX))
    flag(outside, "timestamp past year 9999 or before year 1 as epoch seconds (epoch milliseconds or nanoseconds?)",
         table.show_ts)
    for c, (vals, bad) in enumerate(zip(table.values, table.values_bad)):
        show = lambda i, c=c: table.show_value(c, i)  # noqa: E731
        flag(bad, "unparsable value", show)
        finite = np.isfinite(vals)
        flag(~bad & ~finite, "non-finite value", show)
        flag(finite & (np.abs(vals) > MAX_ABS_VALUE), f"value beyond ±{MAX_ABS_VALUE:g}", show)
    good = np.ones(table.n, bool)
    good[list(reason)] = False
    bad_rows = [BadRow(where, int(table.lines[i]), why, _short(value)) for i, (why, value) in reason.items()]
    bad_rows += table.early_bad
    bad_rows.sort(key=lambda b: b.line)
    return good, bad_rows


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise HistoryError("no such file or directory", path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise HistoryError(f"no data files ({' or '.join('*' + s for s in SUFFIXES)}) in directory", path)
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise HistoryError(f"unsupported file type {path.suffix!r} (want .csv or .parquet)", path)
    if not path.is_file():  # a FIFO or a device would block the read, or never end
        raise HistoryError("not a regular file", path)
    return [path]


def load_histories(
    path: str | Path,
    *,
    value_columns: Sequence[str] | None = None,
    on_bad: Literal["refuse", "skip"] = "refuse",
) -> Histories:
    """Load every device's history from a file or directory (layouts: see the module doc).

    A bad row (unparsable or non-finite timestamp or value, empty device_id, too few fields,
    malformed CSV) raises HistoryError naming file, line and text with on_bad="refuse" (the
    first bad line of the first file that has one); with "skip" it is left out and reported in
    ``bad_rows``. Devices whose rows are all bad are left out. Raises HistoryError for a
    missing path, no data files, missing columns, value columns differing from file to file, a device id
    in two files, an unknown suffix, or no good rows at all.
    """
    if on_bad not in ("refuse", "skip"):
        raise ValueError(f"on_bad must be 'refuse' or 'skip', not {on_bad!r}")
    root = Path(path)
    files = _data_files(root)
    devices: dict[str, DeviceHistory] = {}
    bad_rows: list[BadRow] = []
    names: tuple[str, ...] | None = None
    first_file: Path | None = None
    for file in files:
        reader = _read_parquet if file.suffix.lower() == ".parquet" else _read_csv
        table = reader(file, value_columns)
        if names is None:
            names, first_file = table.value_names, file
        elif table.value_names != names:
            if sorted(table.value_names) != sorted(names):
                raise HistoryError(
                    f"value column(s) {list(table.value_names)}, but {first_file} has {list(names)}", file)
            table = _in_order(table, names)  # the same columns in another order: matched by name
        good, bad = _check(table)
        if bad and on_bad == "refuse":
            raise HistoryError(bad[0].reason, file, bad[0].line, bad[0].value)
        bad_rows += bad
        values = np.stack(table.values, axis=1)[good].astype(np.float32)
        ts, lines = table.ts[good], table.lines[good]
        if table.device_codes is None:
            device = file.stem if file == root else file.relative_to(root).with_suffix("").as_posix()
            if len(device) > MAX_DEVICE_ID_LENGTH:  # as long-format ids, and as run dead-letters them
                raise HistoryError(f"device id {device[:64]!r}... (from the file's path) is {len(device)} characters,"
                                   f" longer than {MAX_DEVICE_ID_LENGTH}", file)
            groups = [(device, np.argsort(ts, kind="stable"))] if len(ts) else []
        else:
            groups = _group(table.device_codes[good], table.device_names, ts)
        for device, order in groups:
            if device in devices:
                raise HistoryError(f"device {device!r} also in {devices[device].source}", file)
            devices[device] = DeviceHistory(device, ts[order], values[order], str(file), lines[order])
    if not devices:
        raise HistoryError("no rows", root)
    assert names is not None
    return Histories(devices, names, bad_rows)


def _group(codes: np.ndarray, names: list[str], ts: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(device, row indices sorted by ts, stable) per device present in codes, devices in order
    of their first row here (a device whose first rows were bad moves to its first good row)."""
    if not len(codes):
        return []
    uniq, first, dense = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    dense = rank[dense.reshape(-1)]
    order = np.lexsort((ts, dense))  # lexsort is stable: equal (device, ts) keep file order
    bounds = np.cumsum(np.bincount(dense, minlength=len(uniq)))[:-1]
    ids = [names[code] for code in uniq[np.argsort(first, kind="stable")]]
    return list(zip(ids, np.split(order, bounds)))


def iter_time_order(histories: Histories) -> tuple[list[str], np.ndarray, np.ndarray]:
    """All readings merged by timestamp: (device id per reading, ts (N,), values (N, F)).

    Ties keep device order (``histories.devices``), then row order within a device.
    """
    hs = list(histories.devices.values())
    ts = np.concatenate([h.ts for h in hs])
    values = np.concatenate([h.values for h in hs])
    codes = np.repeat(np.arange(len(hs)), [len(h.ts) for h in hs])
    order = np.argsort(ts, kind="stable")
    ids = np.array([h.device_id for h in hs], dtype=object)[codes[order]].tolist()
    return ids, ts[order], values[order]


def write_table(path: str | Path, columns: dict[str, np.ndarray]) -> None:
    """Write equal-length 1-D columns as CSV or Parquet, chosen by suffix.

    CSV floats are written at shortest round-trip precision (float() reads back the same value).
    A write that fails (a full disk, a file size limit, an interrupt) leaves no part of a file at
    ``path``: a truncated table would read back as a whole one.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise HistoryError(f"unsupported file type {path.suffix!r} (want .csv or .parquet)", path)
    arrays = {name: np.asarray(col) for name, col in columns.items()}
    lengths = {name: col.shape for name, col in arrays.items()}
    if len({shape for shape in lengths.values()}) > 1 or any(len(shape) != 1 for shape in lengths.values()):
        raise HistoryError(f"columns must be 1-D and of equal length, got shapes {lengths}", path)
    table = pa.table({name: pa.array(col.tolist() if col.dtype == object else col) for name, col in arrays.items()})
    sink = _arrow_file(path, "wb")
    try:
        with sink:
            if suffix == ".parquet":
                pq.write_table(table, sink)
            else:
                pacsv.write_csv(table, sink)
    except BaseException:  # only once opened: a file the open refused is not this write's
        _remove_partial(path)
        raise


def _remove_partial(path: Path) -> None:
    """Remove what a failed write left at ``path`` when it is a regular file (a device or a FIFO
    the user named is theirs)."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def overwrites_data(path: Path, data: Path) -> bool:
    """Whether writing ``path`` would replace a file of the history at ``data`` (the file itself,
    or a data file in the directory), which a typo in an output flag makes easy; or, in the
    directory, add one that the next run reads as data."""
    try:
        if not data.exists():
            return False
        if data.is_dir():
            inside = path.resolve().is_relative_to(data.resolve())
            return inside and not path.is_dir() and path.suffix.lower() in SUFFIXES
        return path.exists() and os.path.samefile(path, data)
    except OSError:
        return False


def unwritable_reason(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` (it is a directory, its directory is missing or
    not writable, or the file is there and not writable), or None when it can."""
    if path.is_dir():
        return "is a directory"
    parent = path.parent
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return "not writable"
    return cannot_create_files_in(parent)


def cannot_create_files_in(directory: Path) -> str | None:
    """Why no file can be created in the existing ``directory``, found by creating one (what
    access() cannot tell: root on a read-only or virtual filesystem such as /proc), or None."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return f"cannot create files in {directory} ({exc.strerror or exc})"
    return None
