"""Loading device histories from CSV / Parquet (long, per device, directories) and writing tables."""

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamer.errors import StreamerError
from streamer.history import BadRow, HistoryError, iter_time_order, load_histories, write_table

NAB = Path("/work/shared/data/nab/data")
T0 = 1_392_388_200.0  # 2014-02-14 14:30:00 UTC


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_long_csv_is_sorted_per_device_in_first_seen_order(tmp_path):
    path = write(tmp_path / "data.csv", (
        "device_id,timestamp,a,b\n"
        "x,30,3,30\n"
        "y,2014-02-14T14:30:00Z,1,10\n"  # ISO with offset and epoch seconds mix
        "x,10,1,10\n"
        "z,5,0.5,5\n"
        "x,20,2,20\n"
        "y,1392388100,0,0\n"
        "x,20,2.5,25\n"  # same timestamp as line 6: keeps file order
    ))
    h = load_histories(path)
    assert list(h.devices) == ["x", "y", "z"]
    assert h.value_columns == ("a", "b")
    assert h.bad_rows == []
    x = h.devices["x"]
    np.testing.assert_array_equal(x.ts, [10, 20, 20, 30])
    np.testing.assert_array_equal(x.values, np.array([[1, 10], [2, 20], [2.5, 25], [3, 30]], np.float32))
    np.testing.assert_array_equal(x.lines, [4, 6, 8, 2])
    assert x.ts.dtype == np.float64 and x.values.dtype == np.float32 and x.lines.dtype == np.int64
    assert x.source == str(path)
    np.testing.assert_array_equal(h.devices["y"].ts, [1392388100, T0])
    assert h.time_range() == (5.0, T0)


def test_value_columns_pick_and_order(tmp_path):
    path = write(tmp_path / "d.csv", "ts,device_id,a,b,c\n1,x,1,2,3\n2,x,4,5,6\n")
    h = load_histories(path, value_columns=["c", "a"])
    assert h.value_columns == ("c", "a")
    np.testing.assert_array_equal(h.devices["x"].values, [[3, 1], [6, 4]])
    with pytest.raises(HistoryError, match=r"d\.csv.*missing value column\(s\) \['nope'\]"):
        load_histories(path, value_columns=["nope"])


def test_directory_of_per_device_files_nested(tmp_path):
    write(tmp_path / "b" / "inner" / "dev2.csv", "timestamp,value\n2014-02-14 14:35:00,2\n2014-02-14 14:30:00,1\n")
    write(tmp_path / "a" / "dev1.csv", "timestamp,value\n100,7\n")
    write(tmp_path / "notes.txt", "ignored")
    h = load_histories(tmp_path)
    assert list(h.devices) == ["a/dev1", "b/inner/dev2"]  # sorted by path
    dev2 = h.devices["b/inner/dev2"]
    np.testing.assert_array_equal(dev2.ts, [T0, T0 + 300])
    np.testing.assert_array_equal(dev2.lines, [3, 2])
    assert dev2.source == str(tmp_path / "b" / "inner" / "dev2.csv")


def test_single_per_device_file_is_named_by_stem(tmp_path):
    h = load_histories(write(tmp_path / "sub" / "pump-7.csv", "timestamp,v1,v2\n1,1,2\n"))
    assert list(h.devices) == ["pump-7"]
    assert h.devices["pump-7"].values.shape == (1, 2)


def test_parquet_long_and_per_device_with_arrow_timestamps(tmp_path):
    stamps = [datetime(2014, 2, 14, 14, 35), datetime(2014, 2, 14, 14, 30), datetime(2014, 2, 14, 14, 40)]
    pq.write_table(pa.table({
        "device_id": ["p", "q", "p"],
        "timestamp": pa.array(stamps, pa.timestamp("ms")),  # naive: taken as UTC
        "load": pa.array([1, 2, 3], pa.int32()),
        "temp": [0.5, 1.5, 2.5],
    }), tmp_path / "long.parquet")
    pq.write_table(pa.table({
        "ts": pa.array([datetime(2014, 2, 14, 15, 30, tzinfo=timezone.utc)] * 2, pa.timestamp("us", tz="Europe/Berlin")),
        "load": [9.0, 8.0],
        "temp": [1.0, 2.0],
    }), tmp_path / "solo.parquet")
    pq.write_table(pa.table({"timestamp": ["2014-02-14 14:30:00", "1392388201"], "load": ["1.5", "2"], "temp": [1, 2]}),
                   tmp_path / "text.parquet")
    h = load_histories(tmp_path)
    assert list(h.devices) == ["p", "q", "solo", "text"]
    assert h.value_columns == ("load", "temp")
    np.testing.assert_array_equal(h.devices["p"].ts, [T0 + 300, T0 + 600])
    np.testing.assert_array_equal(h.devices["p"].values, [[1, 0.5], [3, 2.5]])
    np.testing.assert_array_equal(h.devices["p"].lines, [1, 3])  # 1-based rows
    np.testing.assert_array_equal(h.devices["solo"].ts, [T0 + 3600, T0 + 3600])
    np.testing.assert_array_equal(h.devices["solo"].lines, [1, 2])
    np.testing.assert_array_equal(h.devices["text"].ts, [T0, T0 + 1])
    np.testing.assert_array_equal(h.devices["text"].values, [[1.5, 1], [2, 2]])


def test_parquet_bad_rows_name_the_row(tmp_path):
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({
        "device_id": ["a", None, "a", " "],
        "timestamp": [1.0, 2.0, float("nan"), 4.0],
        "value": [1.0, 2.0, 3.0, None],
    }), path)
    with pytest.raises(HistoryError, match=r"long\.parquet line 2: empty device_id"):
        load_histories(path)
    h = load_histories(path, on_bad="skip")
    assert [(b.line, b.reason) for b in h.bad_rows] == [
        (2, "empty device_id"), (3, "non-finite timestamp"), (4, "empty device_id")]
    np.testing.assert_array_equal(h.devices["a"].lines, [1])



@pytest.mark.parametrize("ids", [
    pa.array([b"\xff\xfe", b"ok"], pa.binary()),  # bytes that are not UTF-8
    pa.array([[1], [2]], pa.list_(pa.int64())),
    pa.array([{"x": 1}, {"x": 2}]),
])
def test_parquet_device_ids_that_are_not_text_or_numbers_are_a_clear_error(tmp_path, ids):
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"device_id": ids, "timestamp": [1.0, 2.0], "value": [1.0, 2.0]}), path)
    with pytest.raises(HistoryError, match=r"column 'device_id' of type .* cannot be read as device ids"):
        load_histories(path)

BAD_CSV = (
    "device_id,timestamp,value\n"  # line 1
    "d,1,1.0\n"  # 2
    "d,2,abc\n"  # 3 unparsable value
    "d,yesterday,3\n"  # 4 unparsable timestamp
    ",4,4\n"  # 5 empty device_id
    "d,5\n"  # 6 too few fields
    "d,6,inf\n"  # 7 non-finite value
    "\n"  # 8 blank: no data, not bad
    "d,nan,8\n"  # 9 non-finite timestamp
    "d,10,1e39\n"  # 10 overflows float32
    "e,11," + "9" * 100 + "x\n"  # 11 long text is shortened
    "d,12,12\n"  # 12
    "d,13,2e18\n"  # 13 beyond what the float32 statistics hold
    "d,1700000000000,14\n"  # 14 epoch milliseconds
    "d,15,15,16\n"  # 15 too many fields
    "d,16,16,\n"  # 16 a trailing comma: an empty extra field is no data
)


def test_refuse_names_file_line_and_value(tmp_path):
    path = write(tmp_path / "data.csv", BAD_CSV)
    with pytest.raises(HistoryError, match=r"^history .*data\.csv line 3: unparsable value \(got 'abc'\)$") as err:
        load_histories(path)
    assert isinstance(err.value, StreamerError)
    assert (err.value.line, err.value.reason) == (3, "unparsable value")


def test_skip_reports_every_bad_row_and_keeps_the_good(tmp_path):
    path = write(tmp_path / "data.csv", BAD_CSV)
    h = load_histories(path, on_bad="skip")
    got = [(b.line, b.reason) for b in h.bad_rows]
    assert got == [
        (3, "unparsable value"), (4, "unparsable timestamp"), (5, "empty device_id"), (6, "too few fields"),
        (7, "non-finite value"), (9, "non-finite timestamp"), (10, "value beyond ±1e+18"),
        (11, "unparsable value"), (13, "value beyond ±1e+18"),
        (14, "timestamp past year 9999 or before year 1 as epoch seconds (epoch milliseconds or nanoseconds?)"),
        (15, "too many fields (4, the header has 3)"),
    ]
    assert all(b.path == str(path) for b in h.bad_rows)
    assert h.bad_rows[0] == BadRow(str(path), 3, "unparsable value", "abc")
    assert len(h.bad_rows[7].value) == 80 and h.bad_rows[7].value.endswith("...")
    assert list(h.devices) == ["d"]  # e had only a bad row
    np.testing.assert_array_equal(h.devices["d"].lines, [2, 12, 16])
    np.testing.assert_array_equal(h.devices["d"].values[:, 0], [1, 12, 16])


def test_malformed_csv_is_a_bad_row(tmp_path):
    import csv

    old_limit = csv.field_size_limit(50)  # a field over the limit is a csv.Error
    try:
        path = write(tmp_path / "m.csv", "timestamp,value\n1,1\n2," + "7" * 60 + "\n3,3\n")
        with pytest.raises(HistoryError, match=r"m\.csv line 3: malformed CSV"):
            load_histories(path)
        h = load_histories(path, on_bad="skip")
    finally:
        csv.field_size_limit(old_limit)
    assert [(b.line, b.reason) for b in h.bad_rows] == [(3, "malformed CSV")]
    np.testing.assert_array_equal(h.devices["m"].ts, [1, 3])


def test_a_header_field_past_the_csv_limit_is_one_error_not_a_traceback(tmp_path):
    # The header is read first, outside the guards of the rows: csv.Error had escaped (exit 1).
    path = write(tmp_path / "h.csv", "timestamp,v," + "x" * 200_000 + "\n1,2,3\n")
    for on_bad in ("refuse", "skip"):
        with pytest.raises(HistoryError, match=r"h\.csv line 1: malformed CSV header: field larger than field limit"):
            load_histories(path, on_bad=on_bad)


def test_mixed_value_counts_are_refused_naming_the_file(tmp_path):
    write(tmp_path / "a.csv", "timestamp,value\n1,1\n")
    write(tmp_path / "b.csv", "timestamp,v1,v2\n1,1,2\n")
    with pytest.raises(HistoryError, match=r"b\.csv: value column\(s\) \['v1', 'v2'\], but .*a\.csv has \['value'\]"):
        load_histories(tmp_path)


def test_value_columns_are_matched_by_name_from_file_to_file(tmp_path):
    # The same columns in another order are read in the first file's; other names are refused
    # (they were taken by position: a humidity read as a temperature).
    write(tmp_path / "x.csv", "timestamp,temp,hum\n1,20,80\n")
    pq.write_table(pa.table({"timestamp": [1.0, 2.0], "hum": [81.0, 82.0], "temp": ["21", "bad"]}), tmp_path / "y.parquet")
    got = load_histories(tmp_path, on_bad="skip")
    assert got.value_columns == ("temp", "hum")
    assert got.devices["y"].values.tolist() == [[21.0, 81.0]]
    assert [(b.line, b.reason, b.value) for b in got.bad_rows] == [(2, "unparsable value", "bad")]
    write(tmp_path / "z.csv", "timestamp,temp,humidity\n1,20,80\n")
    with pytest.raises(HistoryError, match=r"z\.csv: value column\(s\) \['temp', 'humidity'\], but .* has \['temp', 'hum'\]"):
        load_histories(tmp_path, on_bad="skip")


def test_the_index_pandas_writes_to_parquet_is_no_value_column(tmp_path):
    # pandas writes a filtered frame's index as __index_level_0__, a named one under its name,
    # and lists them in the schema's metadata; a timestamp index stays the timestamp.
    meta = b'{"index_columns": ["__index_level_0__", "row"], "columns": []}'
    table = pa.table({"timestamp": [1.0, 2.0], "value": [5.0, 6.0], "__index_level_0__": [3, 7], "row": [0, 1]})
    pq.write_table(table.replace_schema_metadata({b"pandas": meta}), tmp_path / "d.parquet")
    got = load_histories(tmp_path / "d.parquet")
    assert got.value_columns == ("value",) and got.devices["d"].values.tolist() == [[5.0], [6.0]]
    assert load_histories(tmp_path / "d.parquet", value_columns=["value", "row"]).value_columns == ("value", "row")
    meta = b'{"index_columns": ["timestamp"], "columns": []}'
    pq.write_table(pa.table({"value": [5.0], "timestamp": [1.0]}).replace_schema_metadata({b"pandas": meta}),
                   tmp_path / "t.parquet")
    assert load_histories(tmp_path / "t.parquet").devices["t"].ts.tolist() == [1.0]


def test_numbers_python_reads_but_data_files_do_not_write_are_bad_rows(tmp_path):
    # float() takes digit groups and other scripts' digits; a data file's number has neither.
    path = write(tmp_path / "d.csv", "timestamp,value\n1,1_0\n2,\u0661\u0662\n3,2.5\n1_700_000_004,3\n5,4\u00a0\n")
    got = load_histories(path, on_bad="skip")
    assert got.devices["d"].values.tolist() == [[2.5], [4.0]]  # white space around a number, a no-break space too
    assert [(b.line, b.reason) for b in got.bad_rows] == [
        (2, "unparsable value"), (3, "unparsable value"), (5, "unparsable timestamp")]


def test_a_boolean_parquet_timestamp_column_is_refused(tmp_path):
    pq.write_table(pa.table({"timestamp": [False, True], "value": [1.0, 2.0]}), tmp_path / "b.parquet")
    with pytest.raises(HistoryError, match=r"b\.parquet: column 'timestamp' has type bool, not timestamps"):
        load_histories(tmp_path / "b.parquet")


def test_dates_written_yyyymmdd_are_refused_not_read_as_epoch_seconds_of_1970(tmp_path):
    # 20200101 had been read as epoch seconds: daily readings a second apart, in August 1970.
    write(tmp_path / "d.csv", "timestamp,value\n20200101,1\n20200102,2\n20200201,3\n")
    with pytest.raises(HistoryError, match=r"d\.csv: timestamps such as 20200101 read as dates written YYYYMMDD.*"
                                           r"ISO-8601 \(2020-01-01\)"):
        load_histories(tmp_path / "d.csv")
    pq.write_table(pa.table({"timestamp": [20200101, 20200102], "value": [1.0, 2.0]}), tmp_path / "d.parquet")
    with pytest.raises(HistoryError, match=r"d\.parquet: timestamps such as 20200101"):
        load_histories(tmp_path / "d.parquet")
    # As text in Parquet too (read as seconds of 1970 before).
    pq.write_table(pa.table({"timestamp": ["20200101", "20200102"], "value": [1.0, 2.0]}), tmp_path / "t.parquet")
    with pytest.raises(HistoryError, match=r"t\.parquet: timestamps such as 20200101"):
        load_histories(tmp_path / "t.parquet")
    # Epoch seconds that merely pass through that range (a relative clock), or ISO dates, are read.
    write(tmp_path / "rel.csv", "timestamp,value\n19999990,1\n20000050,2\n20000110,3\n")
    assert load_histories(tmp_path / "rel.csv").devices["rel"].ts.tolist() == [19999990.0, 20000050.0, 20000110.0]
    write(tmp_path / "iso.csv", "timestamp,value\n2020-01-01,1\n2020-01-02,2\n")
    assert load_histories(tmp_path / "iso.csv").devices["iso"].ts[0] == datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("on_bad", ["refuse", "skip"])
def test_parquet_text_values_with_a_null_and_a_non_number_are_bad_rows(tmp_path, on_bad):
    # The cast to numbers fails on "x", and each text is read alone: the null had raised
    # AttributeError (a traceback from replay and train).
    pq.write_table(pa.table({"timestamp": [1.0, 2.0, 3.0], "value": ["1.5", None, "x"]}), tmp_path / "n.parquet")
    if on_bad == "refuse":
        with pytest.raises(HistoryError, match=r"n\.parquet line 2: unparsable value"):
            load_histories(tmp_path / "n.parquet")
        return
    histories = load_histories(tmp_path / "n.parquet", on_bad="skip")
    assert [(b.line, b.reason) for b in histories.bad_rows] == [(2, "unparsable value"), (3, "unparsable value")]
    assert histories.devices["n"].values.tolist() == [[1.5]]


@pytest.mark.parametrize("column", [pa.array([0, 300_000_000_000_000], pa.timestamp("ms")),
                                    pa.array([0, 3_000_000], pa.date32())], ids=["timestamp", "date"])
def test_a_parquet_timestamp_past_year_9999_is_a_bad_row_shown_as_its_number(tmp_path, column):
    # Shown through Python's datetime, which stops at 9999, the bad row had ended in OverflowError.
    pq.write_table(pa.table({"timestamp": column, "value": [1.0, 2.0]}), tmp_path / "f.parquet")
    with pytest.raises(HistoryError, match=r"line 2: timestamp past year 9999.* \(got '\d+ ms since 1970'\)"):
        load_histories(tmp_path / "f.parquet")
    histories = load_histories(tmp_path / "f.parquet", on_bad="skip")
    assert len(histories.bad_rows) == 1 and histories.devices["f"].ts.tolist() == [0.0]


def test_a_device_id_from_a_path_longer_than_the_live_path_takes_is_refused(tmp_path):
    # Per-device files are named by their path: 305 characters had been scored as a device id.
    folder = tmp_path / ("x" * 200) / ("y" * 100)
    folder.mkdir(parents=True)
    write(folder / "dev.csv", "timestamp,value\n1,2\n2,3\n")
    write(tmp_path / "ok.csv", "timestamp,value\n1,2\n")
    for on_bad in ("refuse", "skip"):
        with pytest.raises(HistoryError, match=r"dev\.csv: device id 'x+'\.\.\. \(from the file's path\) is 305 characters"):
            load_histories(tmp_path, on_bad=on_bad)


def test_a_device_id_the_live_path_refuses_as_too_long_is_a_bad_row(tmp_path):
    # run dead-letters an id of more than 256 characters (invalid_schema); replay had scored it.
    long_id = "x" * 257
    write(tmp_path / "l.csv", f"device_id,timestamp,value\n{long_id},1,1\nok,1,2\n{'y' * 256},2,3\n")
    h = load_histories(tmp_path / "l.csv", on_bad="skip")
    assert sorted(h.devices) == ["ok", "y" * 256]
    assert [(b.line, b.reason) for b in h.bad_rows] == [(2, "device_id longer than 256 characters")]


def test_duplicate_device_across_files_names_both(tmp_path):
    write(tmp_path / "x.csv", "timestamp,value\n1,1\n")
    pq.write_table(pa.table({"timestamp": [2.0], "value": [2.0]}), tmp_path / "x.parquet")
    with pytest.raises(HistoryError, match=r"x\.parquet: device 'x' also in .*x\.csv"):
        load_histories(tmp_path)


@pytest.mark.parametrize("make, pattern", [
    (lambda d: d / "missing.csv", "no such file"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no data files"),
    (lambda d: write(d / "data.json", "{}"), "unsupported file type '.json'"),
    (lambda d: write(d / "h.csv", "device_id,timestamp,value\n"), "no rows"),
    (lambda d: write(d / "h.csv", "device_id,value\nx,1\n"), "no timestamp column"),
    (lambda d: write(d / "h.csv", "device_id,timestamp\nx,1\n"), "no value columns"),
    (lambda d: write(d / "h.csv", ""), "empty file"),
    (lambda d: write(d / "h.csv", "device_id,timestamp,value,value\nx,1,2,3\n"), r"\['value'\] appear more than once"),
    (lambda d: os.mkfifo(d / "fifo.csv") or d / "fifo.csv", "not a regular file"),  # would block the read
])
def test_unusable_inputs_name_the_path(tmp_path, make, pattern):
    path = make(tmp_path)
    with pytest.raises(HistoryError, match=pattern) as err:
        load_histories(path)
    assert str(path) in str(err.value)


def test_value_columns_that_are_the_time_or_device_column_or_repeat_are_refused(tmp_path):
    path = write(tmp_path / "h.csv", "device_id,timestamp,value\nx,1,2\n")
    for columns, said in ((["timestamp"], r"\['timestamp'\] are the timestamp column"),
                          (["value", "device_id"], r"\['device_id'\] are the device column"),
                          (["value", "value"], "name a column twice")):
        with pytest.raises(HistoryError, match=said):
            load_histories(path, value_columns=columns)


def test_parquet_integers_past_2_53_and_epoch_nanoseconds_are_bad_rows_not_arrow_errors(tmp_path):
    # int64 epoch nanoseconds (a common way to store time) and huge integer values: Arrow refused to
    # cast them to float64 exactly; now each is a bad row naming why.
    ns = [1_700_000_000_000_000_007 + i * 60_000_000_000 for i in range(3)]
    pq.write_table(pa.table({"timestamp": pa.array(ns, pa.int64()), "value": [1.0, 2.0, 3.0]}), tmp_path / "ns.parquet")
    with pytest.raises(HistoryError, match=r"ns\.parquet line 1: timestamp past year 9999 .*nanoseconds\?"):
        load_histories(tmp_path / "ns.parquet")
    big = pa.array([2**60 + 1, 5, 2**64 - 1], pa.uint64())
    pq.write_table(pa.table({"timestamp": [1.0, 2.0, 3.0], "value": big}), tmp_path / "big.parquet")
    h = load_histories(tmp_path / "big.parquet", on_bad="skip")
    assert [(b.line, b.reason) for b in h.bad_rows] == [(1, "value beyond ±1e+18"), (3, "value beyond ±1e+18")]
    assert h.devices["big"].values[:, 0].tolist() == [5.0]


@pytest.mark.skipif(not NAB.is_dir(), reason="NAB data not present")
def test_real_nab_file():
    path = NAB / "realAWSCloudwatch" / "ec2_cpu_utilization_24ae8d.csv"
    h = load_histories(path)
    dev = h.devices["ec2_cpu_utilization_24ae8d"]
    assert len(dev.ts) == 4032 and dev.values.shape == (4032, 1)
    assert dev.ts[0] == T0 and np.all(np.diff(dev.ts) >= 0)
    assert dev.values[0, 0] == np.float32(0.132) and dev.lines[0] == 2


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_table_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    ts = T0 + np.arange(6) * 0.1  # fractional seconds survive
    cols = {
        "device_id": np.array(["a", "b", "a", "b", "a", "b"]),
        "timestamp": ts,
        "forecast": rng.normal(size=6),  # float64: full precision
        "score": rng.normal(size=6).astype(np.float32),
    }
    path = tmp_path / f"out{suffix}"
    write_table(path, cols)
    h = load_histories(path)
    assert h.value_columns == ("forecast", "score")
    a = h.devices["a"]
    np.testing.assert_array_equal(a.ts, ts[::2])
    np.testing.assert_array_equal(a.values[:, 1], cols["score"][::2])
    if suffix == ".csv":  # values come back as float32; check the text keeps float64 exactly
        import csv

        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [float(r["forecast"]) for r in rows] == cols["forecast"].tolist()
        assert [float(r["timestamp"]) for r in rows] == ts.tolist()
    else:
        assert pq.read_table(path).column("forecast").to_pylist() == cols["forecast"].tolist()
    with pytest.raises(HistoryError, match="equal length"):
        write_table(path, {"a": np.zeros(2), "b": np.zeros(3)})


FILE_SIZE_LIMIT = """
import resource, signal, sys
import numpy as np
from streamer.history import write_table
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    write_table(sys.argv[1], {"timestamp": np.arange(1e5), "value": np.random.default_rng(0).normal(size=100_000)})
except OSError as exc:
    print("failed:", exc)
"""


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("existed", [False, True])
def test_a_write_that_fails_part_way_leaves_no_part_of_a_file(tmp_path, suffix, existed):
    """A table cut short by the disk (here a 64 KiB file size limit) would read back as a whole,
    shorter one: the failed write removes what it wrote, as it would an older file's remains."""
    import subprocess
    import sys

    path = tmp_path / f"out{suffix}"
    if existed:
        path.write_text("timestamp,value\n1,2\n")
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("failed:"), done.stdout
    assert not path.exists()


def test_a_file_the_write_cannot_open_is_left_as_it_was(tmp_path, monkeypatch):
    import streamer.history

    def refused(path, mode="rb"):  # as a file that is not the writer's is (root is never refused)
        raise PermissionError(13, "Permission denied", str(path))

    path = tmp_path / "out.csv"
    path.write_text("theirs\n")
    monkeypatch.setattr(streamer.history, "_arrow_file", refused)
    with pytest.raises(PermissionError):
        write_table(path, {"timestamp": np.zeros(2)})
    assert path.read_text() == "theirs\n"


def test_iter_time_order_is_stable_on_ties(tmp_path):
    path = write(tmp_path / "d.csv", (
        "device_id,timestamp,value\n"
        "b,2,20\n"
        "a,2,21\n"
        "b,1,10\n"
        "a,2,22\n"
        "c,0,0\n"
    ))
    h = load_histories(path)
    assert list(h.devices) == ["b", "a", "c"]
    ids, ts, values = iter_time_order(h)
    assert ids == ["c", "b", "b", "a", "a"]
    np.testing.assert_array_equal(ts, [0, 1, 2, 2, 2])
    np.testing.assert_array_equal(values[:, 0], [0, 10, 20, 21, 22])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_where_no_file_can_be_created_is_unwritable_even_for_root():
    from streamer.history import unwritable_reason

    reason = unwritable_reason(Path("/proc/streamer-out.csv"))  # access() says yes to root there
    assert reason is not None and reason.startswith("cannot create files in /proc")


CELLS = ["1", "-0", "1e5", "1E-3", ".5", "5.", "+2", " 3 ", "\t4", "nan", "NaN", "inf", "-Infinity", "1_000",
         "\u0661", "", "abc", "0x10", "1e400", "1e39", "1e18", "-1e19", "2014-02-14T14:30:00Z",
         "2014-02-14 14:30:00", "2014-02-14T14:30:00+02:00", "1392388100", "1392388100.5", "\u00a05",
         "9" * 30, "0.1000000000000000055511151231257827", "nan(1)", "NAN(abc)"]


@pytest.mark.parametrize("seed", range(7))
@pytest.mark.parametrize("layout", ["long", "single"])
def test_arrows_reading_of_a_csv_gives_what_the_csv_modules_gives(tmp_path, monkeypatch, seed, layout):
    """The fast path (Arrow's reader: 2.3x less memory and 1.6x faster on 3M rows, bench/history_csv.py) must give
    the histories and bad rows of the csv module's reading, whatever the cells hold; files it
    cannot read so (quotes, blank lines, ragged rows) go the csv module's way."""
    import random

    import streamer.history as history

    rng = random.Random(seed)
    header = "device_id,timestamp,a,b" if layout == "long" else "timestamp,a,b"
    lines = [header]
    for i in range(300):
        cells = [str(1_700_000_000 + i) if rng.random() < 0.8 else rng.choice(CELLS),
                 rng.choice(CELLS) if rng.random() < 0.3 else f"{rng.gauss(0, 10):.6g}",
                 rng.choice(CELLS) if rng.random() < 0.3 else str(rng.randint(-5, 5))]
        if layout == "long":
            cells.insert(0, rng.choice(["d1", " d1", "d2 ", "d\u00e9", "", "d3\t"]))
        lines.append(",".join(cells))
    extras = {0: [], 1: ["\r\n"], 2: ["blank"], 3: ["quote"], 4: ["ragged"], 5: ["bom"], 6: ["\n\r"]}[seed]
    text = "\n".join(lines) + "\n"
    if "\r\n" in extras:
        text = text.replace("\n", "\r\n")
    if "blank" in extras:
        text = text.replace("\n", "\n\n", 3)
    if "\n\r" in extras:  # a blank line of a lone CR: the csv module skips it, Arrow reads a row of empty fields
        text = text.replace("\n", "\n\r", 2)
    if "quote" in extras:
        text = text + ('"d1",1700000999,1,2\n' if layout == "long" else '1700000999,"1",2\n')
    if "ragged" in extras:
        text = text + ("d1,1700000999,1\n" if layout == "long" else "1700000999,1\n")
    if "bom" in extras:
        text = "\ufeff" + text
    path = tmp_path / "h.csv"
    path.write_text(text, encoding="utf-8")

    def load():
        try:
            h = load_histories(path, on_bad="skip")
        except HistoryError as exc:
            return str(exc)
        return ({d: (v.ts.tolist(), v.values.tolist(), v.lines.tolist()) for d, v in h.devices.items()},
                [(b.line, b.reason, b.value) for b in h.bad_rows])

    fast_calls = []
    fast = history._read_csv_arrow
    monkeypatch.setattr(history, "_read_csv_arrow", lambda *a: fast_calls.append(fast(*a)) or fast_calls[-1])
    got = load()
    monkeypatch.setattr(history, "_read_csv_arrow", lambda *a: None)
    expected = load()
    assert got == expected
    assert (fast_calls[0] is not None) == (not set(extras) & {"blank", "quote", "ragged", "\n\r"}), extras
