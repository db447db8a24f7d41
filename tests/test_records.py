"""The codecs: the msgspec decoder gives every JSON message the pydantic decoder's verdict (reason
and detail, or the same reading bit for bit); Arrow batch messages; predictions that read back exactly.

``PydanticDecoder`` is the decoder as it was before msgspec, kept as the reference (bench/codecs.py
times it as the baseline).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Annotated

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from streamer.engine import PredictionBatch
from streamer.records import (
    ARROW_CONTENT_TYPE,
    ARROW_OUTPUT_BYTES,
    FLOAT32_OVERFLOW,
    MAX_ABS_VALUE,
    MAX_DEVICE_ID_LENGTH,
    TS_MAX,
    TS_MIN,
    DeadLetterReason,
    Reading,
    ReadingDecoder,
    SourcePosition,
    encode_arrow_predictions,
    encode_predictions,
    iso_seconds,
)
from tests.test_records_fuzz import (
    Message,
    Payload,
    any_json,
    arbitrary_bytes,
    bad_payloads,
    clean_text,
    dump,
    near_valid,
    reading_shaped,
)

R = DeadLetterReason
ARROW = [("content-type", ARROW_CONTENT_TYPE)]


# --- the reference: the pydantic decoder as it was --------------------------------------------

FiniteFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class PydanticReading(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    device_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_DEVICE_ID_LENGTH)]
    ts: float
    values: Annotated[list[FiniteFloat], Field(min_length=1)]

    @field_validator("ts", mode="before")
    @classmethod
    def _epoch_seconds(cls, raw: object) -> float:
        if isinstance(raw, bool):
            raise ValueError("ts must be epoch seconds or an ISO-8601 string, not a boolean")
        if isinstance(raw, int | float):
            try:
                value = float(raw)
            except OverflowError:
                value = math.inf
        elif isinstance(raw, str):
            try:
                if "\x00" in raw:  # refused since: Python 3.11 reads "...T00:00:00\x00" as midnight
                    raise ValueError(raw)
                parsed = datetime.fromisoformat(raw)
            except ValueError:
                raise ValueError(f"ts {raw[:64]!r} is not ISO-8601") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            value = parsed.timestamp()
        else:
            raise ValueError(f"ts must be epoch seconds or an ISO-8601 string, got {type(raw).__name__}")
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "ts must be finite")
        return value


class PydanticDecoder:
    """decode_one of the pydantic decoder, verbatim but for the out_of_range rules added since
    (values, then ts): a reading or (reason, detail)."""

    def __init__(self, input_size: int) -> None:
        self.input_size = input_size

    def decode_one(self, key: bytes | None, value: bytes | None) -> PydanticReading | tuple[DeadLetterReason, str]:
        if value is None:
            return R.NOT_JSON, "empty message (null value)"
        try:
            reading = PydanticReading.model_validate_json(value)
        except ValidationError as exc:
            return _classify(exc, value)
        beyond = next((i for i, v in enumerate(reading.values) if abs(v) >= FLOAT32_OVERFLOW), None)  # rounds to inf
        if beyond is not None:
            return R.NON_FINITE, f"values.{beyond}: {reading.values[beyond]!r} is beyond float32, the model's dtype"
        beyond = next((i for i, v in enumerate(reading.values) if abs(v) > MAX_ABS_VALUE), None)  # added since
        if beyond is not None:
            return R.OUT_OF_RANGE, f"values.{beyond}: {reading.values[beyond]!r} is beyond ±{MAX_ABS_VALUE:g}"
        if not datetime(1, 1, 1, tzinfo=timezone.utc).timestamp() <= reading.ts <= datetime(  # added since
                9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp():
            return R.OUT_OF_RANGE, (f"ts: {reading.ts!r} is past year 9999 or before year 1 as epoch seconds (epoch"
                                    " milliseconds or nanoseconds?)")
        if len(reading.values) != self.input_size:
            return R.WRONG_VALUE_COUNT, f"{len(reading.values)} values, the model takes {self.input_size}"
        if key is None:
            return R.KEY_MISMATCH, "message has no key; the key must be the device id"
        if key != reading.device_id.encode("utf-8"):
            return R.KEY_MISMATCH, f"key {key[:64]!r} != device_id {reading.device_id[:64]!r}"
        return reading


def _classify(exc: ValidationError, value: bytes) -> tuple[DeadLetterReason, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    detail = f"{where}: {first['msg']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    kinds = {e["type"] for e in errors}
    if kinds & {"json_invalid", "json_type"}:
        if value.startswith(b"\xff\xff\xff\xff"):  # added since: an Arrow stream without its header
            detail += ("; it starts as an Arrow IPC stream does: a batch message needs the header content-type:"
                       " application/vnd.apache.arrow.stream, exactly")
        return R.NOT_JSON, detail
    if "finite_number" in kinds:
        return R.NON_FINITE, detail
    return R.INVALID_SCHEMA, detail


def verdicts(key: bytes | None, value: bytes | None, input_size: int) -> tuple[object, object]:
    """(new, old) verdicts as comparable values: (reason, detail), or the reading's fields with
    ts and values as bytes (bit for bit)."""

    def plain(result: object) -> object:
        if isinstance(result, tuple):
            return result
        assert isinstance(result, Reading | PydanticReading)
        values = np.asarray(result.values, dtype=np.float64).tobytes()
        return result.device_id, np.float64(result.ts).tobytes(), values

    return plain(ReadingDecoder(input_size).decode_one(key, value)), plain(PydanticDecoder(input_size).decode_one(key, value))


# --- JSON: the same verdict as the pydantic decoder --------------------------------------------

HAND_MADE = [
    None, b"", b"{", b"[]", b"1", b'"x"', b"null", b"{}", b"\xef\xbb\xbf{}", b'{"a":"\xff"}',
    b'{"device_id":"a","ts":1,"values":[1,2]}',
    b' \t\r\n{"device_id":"a","ts":1,"values":[1,2]}\n ',
    b'{"device_id":"a","ts":1,"values":[1,2]}x',
    b'{"device_id":1,"ts":true,"values":[true,"1"]}',
    b'{"device_id":"","ts":"x","values":[]}',
    b'{"device_id":"' + b"a" * 300 + b'","ts":null,"values":{}}',
    b'{"device_id":"a","ts":NaN,"values":[NaN, 1e400]}',
    b'{"device_id":"a","ts":Infinity,"values":[1, -Infinity]}',
    b'{"device_id":"a","ts":1e400,"values":[1' + b"0" * 400 + b", 2]}",
    b'{"device_id":"a","ts":1' + b"0" * 400 + b',"values":[1,2]}',
    b'{"device_id":"a","ts":[],"values":[null,{}]}',
    b'{"device_id":"a","ts":"2020-01-01","values":[1,2,3]}',
    b'{"device_id":"a","ts":"2020-01-01T10:00:00+05:30","values":[1,2]}',
    b'{"device_id":"a","ts":"2020-01-01T10:00:00Z","values":[1,2]}',
    b'{"device_id":"a","ts":"1e5","values":[1,2]}',
    b'{"device_id":"a","ts":1,"values":[1e39,2,3]}',
    b'{"device_id":"a","ts":-1e308,"values":[-3.4028235e38, 3.4028236e38]}',
    b'{"device_id":"a","ts":1,"values":[3.4028234663852886e38, -3.4028234663852886e38]}',
    b'{"device_id":"a","ts":1,"values":[1e-400, -4.9e-325]}',
    b'{"device_id":"a","ts":1,"values":[%d, %d]}' % (2**64 + 1, 2**80 + 2**27 + 1),
    b'{"device_id":"a","ts":1,"values":[%d, 1]}' % (2**1024 - 2**970),
    b'{"device_id":"a","ts":%d,"values":[1, 2]}' % (2**1024 - 2**971),
    b'{"device_id":"a","ts":%d,"values":[1, 2]}' % (2**63 + 2**10 + 1),
    b'{"device_id":"a","device_id":1,"ts":1,"values":[1,2]}',
    b'{"device_id":1,"device_id":"a","ts":1,"values":[1,2]}',
    b'{"device_id":"a","ts":1,"values":[1,2],"x":"\xff"}',
    b'{"device_id":"a","ts":1,"values":[1,2],"x":"\xed\xa0\x80"}',
    b'{"device_id":"a","ts":1,"values":[1,2],"x":"\\ud800"}',
    b'{"device_id":"a","ts":1,"values":[1,2],"x":"\x01"}',
    b'{"device_id":"a","ts":1,"values":[1,2],"x":1' + b"0" * 5000 + b"}",
    b'{"device_id":"a","ts":1,"values":[1,2],"x":' + b"[" * 199 + b"]" * 199 + b"}",
    b'{"device_id":"a","ts":1,"values":[1,2],"x":' + b"[" * 200 + b"]" * 200 + b"}",
    b'{"device_id":"a","ts":1,"values":[1,2],"x":' + b"[" * 201 + b"]" * 201 + b"}",
    b'{"device_id":"a","ts":1,"values":[1,2],"x":' + b"[" * 100000 + b"]" * 100000 + b"}",
    b'{"device_id":"a","ts":1,"values":[1,2],"pad":"' + b"p" * 5000 + b'"}',
    b'{"device_id":"\xc3\xa9","ts":1,"values":[1,2]}',
    b'{"device_id":"a","ts":"\x00","values":[1,2]}',
    b'{"device_id":"a","ts":"2024-01-01T00:00:00\\u0000","values":[1,2]}',
    b'{"device_id":"a","ts":"2024-01-01T00:00:00+01:00\\u0000","values":[1,2]}',
]


@pytest.mark.parametrize("value", HAND_MADE, ids=range(len(HAND_MADE)))
@pytest.mark.parametrize("key", [b"a", "é".encode(), None])
def test_hand_made_messages_get_the_pydantic_verdict(value: bytes | None, key: bytes | None) -> None:
    new, old = verdicts(key, value, 2)
    assert new == old


def test_a_nul_after_an_iso_time_is_refused_not_read_up_to_it() -> None:
    # Python 3.11's fromisoformat stops at a NUL after a whole time: "...T00:00:00\x00" was midnight.
    for text in ("2024-01-01T00:00:00\x00", "2024-01-01T00:00:00+01:00\x00", "2024-01-01T00\x00"):
        body = json.dumps({"device_id": "a", "ts": text, "values": [1, 2]}).encode()
        assert ReadingDecoder(2).decode_one(b"a", body) == (R.INVALID_SCHEMA, f"ts: Value error, ts {text!r} is not ISO-8601")
        with pytest.raises(ValueError):
            iso_seconds(text)
    assert iso_seconds("2024-01-01T00:00:00") == 1_704_067_200.0


def test_hand_made_messages_cover_every_outcome() -> None:
    """The list above is worth comparing: it holds good readings and every reason."""
    outcomes = set()
    for value in HAND_MADE:
        result = ReadingDecoder(2).decode_one(b"a", value)
        outcomes.add("good" if isinstance(result, Reading) else result[0])
    assert outcomes == {"good", R.NOT_JSON, R.INVALID_SCHEMA, R.NON_FINITE, R.OUT_OF_RANGE, R.WRONG_VALUE_COUNT,
                        R.KEY_MISMATCH}


COMPARE = settings(deadline=None, database=None, max_examples=1500, suppress_health_check=list(HealthCheck))

big_numbers = st.one_of(
    st.integers(-(2**1030), 2**1030),
    st.builds(lambda sign, k: sign * 10**k, st.sampled_from([1, -1]), st.integers(0, 400)),
    st.floats(),
)


@st.composite
def odd_readings(draw, input_size: int) -> Payload:
    """Readings with big or odd numbers, duplicate fields, deep or long extras, as raw text."""
    device_id = draw(st.sampled_from(["a", "é", "dev-1"]))
    ts = draw(st.one_of(big_numbers, st.sampled_from(['"2020-01-01"', '"x"', "true", "null"])))
    values = draw(st.lists(big_numbers, min_size=0, max_size=input_size + 1))
    fields = [f'"device_id":{json.dumps(device_id)}', f'"ts":{json.dumps(ts) if not isinstance(ts, str) else ts}',
              f'"values":{json.dumps(values)}']
    extra = draw(st.sampled_from([
        "", ',"device_id":1', ',"ts":"2021-01-01"', ',"values":[1]', ',"x":' + "[" * 200 + "]" * 200,
        ',"x":' + "[" * 202 + "]" * 202, ',"x":"' + "y" * 4100 + '"', ',"x":NaN',
    ]))
    text = "{" + ",".join(draw(st.permutations(fields))) + extra + "}"
    return Payload(device_id.encode(), text.encode(), None, "odd")


def any_payloads(input_size: int) -> st.SearchStrategy[Payload]:
    return st.one_of(
        near_valid(input_size), bad_payloads(input_size), reading_shaped(input_size), odd_readings(input_size),
        arbitrary_bytes, st.builds(lambda v: Payload(None, dump(v, "compact")), any_json),
    )


@COMPARE
@given(st.data())
def test_generated_messages_get_the_pydantic_verdict(data: st.DataObject) -> None:
    input_size = data.draw(st.integers(1, 4))
    payload = data.draw(any_payloads(input_size))
    new, old = verdicts(payload.key, payload.value, input_size)
    assert new == old, payload


@settings(deadline=None, database=None, max_examples=300)
@given(st.lists(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70)), min_size=1, max_size=3),
       st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70)))
def test_numbers_read_as_python_reads_them(values: list, ts: float) -> None:
    body = json.dumps({"device_id": "d", "ts": ts, "values": values}).encode()
    result = ReadingDecoder(len(values)).decode_one(b"d", body)
    if any(abs(float(v)) >= FLOAT32_OVERFLOW for v in values):
        assert result[0] is R.NON_FINITE
        return
    if any(abs(float(v)) > MAX_ABS_VALUE for v in values):
        assert result[0] is R.OUT_OF_RANGE
        return
    if not TS_MIN <= float(ts) <= TS_MAX:  # years 1 to 9999 as epoch seconds
        assert result[0] is R.OUT_OF_RANGE and result[1].startswith("ts: ")
        return
    assert isinstance(result, Reading)
    assert np.float64(result.ts).tobytes() == np.float64(float(ts)).tobytes()
    assert np.asarray(result.values).tobytes() == np.asarray([float(v) for v in values]).tobytes()


def test_decode_keeps_offset_order_and_positions() -> None:
    messages = [
        Message("in", 0, 5, b"a", b'{"device_id":"a","ts":1,"values":[1.5]}', []),
        Message("in", 1, 9, b"b", b'{"device_id":"b","ts":2,"values":[true]}', [("h", None)]),
        Message("in", 1, 10, b"b", b'{"device_id":"b","ts":"1970-01-01T00:00:03","values":[2.5]}', []),
    ]
    decoded = ReadingDecoder(1).decode(messages)
    assert decoded.readings.device_ids == ["a", "b"]
    assert decoded.readings.ts.tolist() == [1.0, 3.0] and decoded.readings.values.tolist() == [[1.5], [2.5]]
    assert decoded.positions == [SourcePosition("in", 0, 5), SourcePosition("in", 1, 10)]
    assert decoded.readings.partitions.tolist() == [0, 1]
    [letter] = decoded.dead_letters
    assert letter.reason is R.INVALID_SCHEMA and letter.source == SourcePosition("in", 1, 9)
    assert letter.headers == [("h", b"")]


def test_an_empty_batch_decodes_to_no_readings() -> None:
    decoded = ReadingDecoder(3).decode([])
    assert len(decoded.readings) == 0 and decoded.readings.values.shape == (0, 3) and not decoded.dead_letters


# --- Arrow batch messages -----------------------------------------------------------------------


def arrow_message(columns: dict[str, pa.Array], batches: int = 1, compression: str | None = None) -> bytes:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        rows = table.num_rows
        for i in range(batches):
            writer.write_table(table.slice(i * rows // batches, (i + 1) * rows // batches - i * rows // batches))
    return sink.getvalue().to_pybytes()


def good_columns(n: int = 4, size: int = 2) -> dict[str, pa.Array]:
    values = np.arange(n * size, dtype=np.float32).reshape(n, size) / 3
    return {
        "device_id": pa.array([f"dev-{i % 3}" for i in range(n)]),
        "ts": pa.array(1.7e9 + np.arange(n, dtype=np.float64) / 7),
        "values": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), size),
    }


@pytest.mark.parametrize("header", [("Content-Type", ARROW_CONTENT_TYPE), ("content-type", ARROW_CONTENT_TYPE + b"; v=1"),
                                    ("content-type", None), None])
def test_a_batch_message_whose_header_is_missed_is_refused_as_json_saying_what_it_needs(header) -> None:
    # Decoded as JSON, as the header is not the one marking a batch message: the dead letter had
    # said "Invalid JSON" and nothing of the header.
    value = arrow_message(good_columns())
    decoded = ReadingDecoder(2).decode([Message("in", 0, 7, b"gateway-1", value, [header] if header else [])])
    [letter] = decoded.dead_letters
    assert letter.reason is R.NOT_JSON and letter.detail.startswith("message: Invalid JSON: ")
    assert letter.detail.endswith("; it starts as an Arrow IPC stream does: a batch message needs the header"
                                  " content-type: application/vnd.apache.arrow.stream, exactly")
    assert "Arrow" not in ReadingDecoder(2).decode_one(b"a", b"\xff\xfe{")[1]  # other bytes than the marker: no hint


@pytest.mark.parametrize("batches, compression", [(1, None), (3, None), (2, "zstd"), (1, "lz4")])
def test_a_batch_message_gives_its_rows_in_order(batches: int, compression: str | None) -> None:
    columns = {**good_columns(6), "gateway_note": pa.array(["x"] * 6)}  # extra columns are ignored
    value = arrow_message(columns, batches, compression)
    before = Message("in", 2, 40, b"dev-9", b'{"device_id":"dev-9","ts":5,"values":[1,2]}', [])
    batch = Message("in", 2, 41, b"gateway-1", value, [("trace", b"t"), *ARROW])
    after = Message("in", 2, 42, b"dev-8", b'{"device_id":"dev-8","ts":6,"values":[3,4]}', [])
    decoded = ReadingDecoder(2).decode([before, batch, after])
    readings = decoded.readings
    assert not decoded.dead_letters
    assert readings.device_ids == ["dev-9", *columns["device_id"].to_pylist(), "dev-8"]
    assert readings.ts.tobytes() == np.concatenate([[5.0], columns["ts"].to_numpy(), [6.0]]).tobytes()
    expected = np.concatenate([[[1, 2]], columns["values"].flatten().to_numpy().reshape(6, 2), [[3, 4]]])
    assert readings.values.dtype == np.float32 and readings.values.tobytes() == expected.astype(np.float32).tobytes()
    assert [p.offset for p in decoded.positions] == [40, *[41] * 6, 42]
    assert readings.partitions.tolist() == [2] * 8
    # Where readings came from, as columns: a batch message's rows share its one source.
    assert decoded.sources == [SourcePosition("in", 2, o) for o in (40, 41, 42)]
    assert decoded.source_of.dtype == np.int32 and decoded.source_of.tolist() == [0, *[1] * 6, 2]
    assert decoded.position(3) == SourcePosition("in", 2, 41)
    [span] = decoded.batch_spans
    assert (span.start, span.stop, span.key, span.position) == (1, 7, b"gateway-1", SourcePosition("in", 2, 41))
    assert span.ids is not None and span.ids.to_pylist() == columns["device_id"].to_pylist()


def test_sources_leave_dead_letters_out_and_keep_partitions() -> None:
    good = arrow_message(good_columns(3))
    messages = [
        Message("in", 4, 7, b"gateway-1", good, ARROW),
        Message("in", 1, 3, b"x", b"not json", []),
        Message("in", 1, 4, b"dev-1", b'{"device_id":"dev-1","ts":5,"values":[1,2]}', []),
        Message("in", 0, 9, b"gateway-2", b"not arrow", ARROW),
        Message("in", 0, 10, b"gateway-2", good, ARROW),
    ]
    decoded = ReadingDecoder(2).decode(messages)
    assert [letter.source.offset for letter in decoded.dead_letters] == [3, 9]
    assert decoded.sources == [SourcePosition("in", 4, 7), SourcePosition("in", 1, 4), SourcePosition("in", 0, 10)]
    assert decoded.source_of.tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert decoded.readings.partitions.tolist() == [4, 4, 4, 1, 0, 0, 0]
    assert [s.start for s in decoded.batch_spans] == [0, 4]
    empty = ReadingDecoder(2).decode([messages[1]])
    assert empty.sources == [] and empty.source_of.tolist() == [] and empty.positions == []
    assert empty.readings.partitions.dtype == np.int32 and len(empty.readings.partitions) == 0


def test_a_large_string_id_column_is_decoded_and_its_ids_built_again_for_output() -> None:
    columns = good_columns(3)
    columns["device_id"] = columns["device_id"].cast(pa.large_string())
    decoded = ReadingDecoder(2).decode([Message("in", 0, 1, b"gateway-1", arrow_message(columns), ARROW)])
    assert decoded.readings.device_ids == ["dev-0", "dev-1", "dev-2"]
    assert decoded.batch_spans[0].ids is None  # the output's column is utf8: built from the ids


def test_a_sender_that_lists_the_same_devices_again_gets_the_same_strings_back() -> None:
    decoder = ReadingDecoder(2)
    columns = good_columns(5)
    first = decoder.decode_arrow(b"gateway-1", arrow_message(columns))
    again = decoder.decode_arrow(b"gateway-1", arrow_message({**columns, "ts": pa.array(np.full(5, 2e9))}))
    assert again.device_ids is first.device_ids and list(again.device_ids) == columns["device_id"].to_pylist()
    assert again.ts.tolist() == [2e9] * 5  # only the ids are kept, never the readings
    # Another sender, another order, a device more or less, the ids as large_string: read afresh.
    other = decoder.decode_arrow(b"gateway-2", arrow_message(columns))
    assert other.device_ids is not first.device_ids and other.device_ids == first.device_ids
    for changed in (columns["device_id"].take([1, 0, 2, 3, 4]), pa.array(["dev-0", "dev-1", "dev-2", "dev-0", "dev-9"]),
                    columns["device_id"].slice(0, 4), columns["device_id"].cast(pa.large_string())):
        n = len(changed)
        rows = decoder.decode_arrow(b"gateway-1", arrow_message({
            "device_id": changed, "ts": columns["ts"].slice(0, n), "values": columns["values"].slice(0, n)}))
        assert list(rows.device_ids) == changed.to_pylist() and rows.device_ids is not first.device_ids
    # The ids of JSON messages, and the readings of every message, come out as without the kept ids.
    messages = [Message("in", 0, i, b"gateway-1", arrow_message(columns), ARROW) for i in range(3)]
    kept, fresh = ReadingDecoder(2).decode(messages).readings, ReadingDecoder(2, sender_ids=0).decode(messages).readings
    assert kept.device_ids == fresh.device_ids == columns["device_id"].to_pylist() * 3
    assert kept.values.tobytes() == fresh.values.tobytes() and kept.ts.tobytes() == fresh.ts.tobytes()


def test_a_batch_of_batch_messages_alone_says_which_id_lists_it_is_made_of() -> None:
    columns, other = good_columns(3), {**good_columns(2), "device_id": pa.array(["x-0", "x-1"])}
    messages = [Message("in", 0, 0, b"gw-1", arrow_message(columns), ARROW),
                Message("in", 0, 1, b"gw-2", arrow_message(other), ARROW),
                Message("in", 0, 2, b"gw-1", arrow_message(columns), ARROW),
                Message("in", 0, 3, b"gw-3", b"not arrow", ARROW)]
    readings = ReadingDecoder(2).decode(messages).readings
    lists = readings.id_lists
    assert [list(ids) for ids in lists] == [["dev-0", "dev-1", "dev-2"], ["x-0", "x-1"], ["dev-0", "dev-1", "dev-2"]]
    assert lists[2] is lists[0]  # the sender's list again: planned once per batch (Engine.step)
    assert readings.device_ids == [device for ids in lists for device in ids]
    # A JSON reading among them, or no batch message: no lists.
    json_reading = Message("in", 0, 4, b"dev-9", b'{"device_id":"dev-9","ts":5,"values":[1,2]}', [])
    assert ReadingDecoder(2).decode([*messages, json_reading]).readings.id_lists is None
    assert ReadingDecoder(2).decode([json_reading]).readings.id_lists is None


def test_the_ids_kept_for_senders_are_bounded_the_least_recent_sender_dropped_first() -> None:
    def message(ids: list[str]) -> bytes:
        n = len(ids)
        return arrow_message({"device_id": pa.array(ids), "ts": pa.array(np.zeros(n)),
                              "values": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * n, np.float32)), 2)})

    decoder = ReadingDecoder(2, sender_ids=10)
    rows = {gw: decoder.decode_arrow(gw, message([f"{gw.decode()}-{i}" for i in range(4)])) for gw in (b"a", b"b")}
    assert decoder.decode_arrow(b"a", message(["a-0", "a-1", "a-2", "a-3"])).device_ids is rows[b"a"].device_ids
    decoder.decode_arrow(b"c", message(["c-0", "c-1", "c-2", "c-3"]))  # 12 > 10: b, heard from least recently, goes
    assert len(decoder._ids) == 8
    assert decoder.decode_arrow(b"a", message(["a-0", "a-1", "a-2", "a-3"])).device_ids is rows[b"a"].device_ids
    assert decoder.decode_arrow(b"b", message(["b-0", "b-1", "b-2", "b-3"])).device_ids is not rows[b"b"].device_ids
    big = [f"big-{i}" for i in range(11)]  # more than all that may be kept: read, never kept
    assert decoder.decode_arrow(b"d", message(big)).device_ids == tuple(big) and len(decoder._ids) <= 10
    assert decoder.decode_arrow(b"d", message(big)).device_ids is not decoder.decode_arrow(b"d", message(big)).device_ids
    none = ReadingDecoder(2, sender_ids=0)
    assert none.decode_arrow(b"a", message(["x"])).device_ids is not none.decode_arrow(b"a", message(["x"])).device_ids
    assert len(none._ids) == 0


@pytest.mark.parametrize("unit, factor", [("s", 1), ("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
@pytest.mark.parametrize("tz", [None, "UTC", "+05:30"])
def test_batch_timestamps_are_epoch_seconds(unit: str, factor: int, tz: str | None) -> None:
    columns = good_columns(3)
    ticks = np.array([0, 1_700_000_000 * factor, -5 * factor], dtype=np.int64)
    columns["ts"] = pa.array(ticks, pa.timestamp(unit, tz=tz))
    rows = ReadingDecoder(2).decode_arrow(b"gw", arrow_message(columns))
    assert rows.ts.tolist() == [0.0, 1.7e9, -5.0]


def test_an_empty_batch_message_has_no_readings_and_no_dead_letter() -> None:
    columns = {k: v.slice(0, 0) for k, v in good_columns().items()}
    decoded = ReadingDecoder(2).decode([Message("in", 0, 1, b"gw", arrow_message(columns), ARROW)])
    assert len(decoded.readings) == 0 and decoded.readings.values.shape == (0, 2) and not decoded.dead_letters


def bad_utf8_ids() -> pa.Array:
    data = pa.py_buffer(b"okbad\xff")
    offsets = pa.py_buffer(np.array([0, 2, 6, 6, 6], dtype=np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), 4, [None, offsets, data])


def with_column(name: str, array: pa.Array) -> dict[str, pa.Array]:
    return {**good_columns(4), name: array}


def drop_column(name: str) -> dict[str, pa.Array]:
    return {k: v for k, v in good_columns(4).items() if k != name}


def fixed(values: list, size: int = 2, type_: pa.DataType = pa.float32()) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values, type_), size)


FOUR_ROWS = [0.0] * 8
BAD_BATCHES = {
    "missing device_id": (drop_column("device_id"), R.INVALID_SCHEMA, "column 'device_id' missing"),
    "missing values": (drop_column("values"), R.INVALID_SCHEMA, "column 'values' missing"),
    "device_id not string": (with_column("device_id", pa.array([1, 2, 3, 4])), R.INVALID_SCHEMA, "device_id: int64"),
    "ts int": (with_column("ts", pa.array([1, 2, 3, 4])), R.INVALID_SCHEMA, "ts: int64"),
    "values float64": (with_column("values", fixed(FOUR_ROWS, 2, pa.float64())), R.INVALID_SCHEMA, "values: fixed_size_list"),
    "values variable list": (with_column("values", pa.array([[0.0, 1.0]] * 4, pa.list_(pa.float32()))), R.INVALID_SCHEMA, "values: list"),
    "values wrong size": (with_column("values", fixed([0.0] * 12, 3)), R.WRONG_VALUE_COUNT, "values: 3 values, the model takes 2"),
    "null device_id": (with_column("device_id", pa.array(["a", None, "b", None])), R.INVALID_SCHEMA, "device_id: row 1 null (and 1 more rows)"),
    "null ts": (with_column("ts", pa.array([1.0, 2.0, None, 4.0])), R.INVALID_SCHEMA, "ts: row 2 null"),
    "null row of values": (with_column("values", pa.FixedSizeListArray.from_arrays(pa.array(FOUR_ROWS, pa.float32()), 2, mask=pa.array([False, False, False, True]))), R.INVALID_SCHEMA, "values: row 3 null"),
    "null value": (with_column("values", fixed([0.0, 1.0, 2.0, None, 4.0, 5.0, None, 7.0])), R.INVALID_SCHEMA, "values: row 1 null (and 1 more rows)"),
    "empty device_id": (with_column("device_id", pa.array(["a", "", "b", "c"])), R.INVALID_SCHEMA, "device_id: row 1 not 1..256"),
    "long device_id": (with_column("device_id", pa.array(["a", "b", "c", "é" * 257])), R.INVALID_SCHEMA, "device_id: row 3 not 1..256"),
    "nan ts": (with_column("ts", pa.array([1.0, math.nan, 2.0, 3.0])), R.NON_FINITE, "ts: row 1 not finite"),
    "inf ts": (with_column("ts", pa.array([1.0, 2.0, 3.0, -math.inf])), R.NON_FINITE, "ts: row 3 not finite"),
    "inf value": (with_column("values", fixed([0.0, 1.0, 2.0, 3.0, math.inf, 5.0, 6.0, math.nan])), R.NON_FINITE, "values: row 2 not finite (and 1 more rows)"),
    "invalid utf-8": (with_column("device_id", bad_utf8_ids()), R.NOT_ARROW, "not an Arrow IPC stream"),
    "value beyond 1e18": (with_column("values", fixed([0.0, 1.0, 2.0, -2e18, 4.0, 5.0, 6.0, 7.0])), R.OUT_OF_RANGE,
                          "values: row 1 beyond ±1e+18; the whole message is refused"),
    # Epoch milliseconds and seconds past year 9999: taken before, while train and replay refuse them.
    "ts in milliseconds": (with_column("ts", pa.array([1.7e9, 1.7e12, 1.7e12, 1.7e9])), R.OUT_OF_RANGE,
                           "ts: row 1 past year 9999 or before year 1 as epoch seconds (epoch milliseconds or"
                           " nanoseconds?) (and 1 more rows)"),
    "ts before year 1": (with_column("ts", pa.array([1.7e9, 1.7e9, 1.7e9, -7e10])), R.OUT_OF_RANGE, "ts: row 3 past"),
    "timestamp[s] past 9999": (with_column("ts", pa.array([0, 300_000_000_000, 0, 0], pa.timestamp("s"))),
                               R.OUT_OF_RANGE, "ts: row 1 past year 9999"),
    # The order of the checks is JSON's: non-finite values before a ts out of range.
    "ts in ms and a NaN value": ({**with_column("ts", pa.array([1.7e12, 1.7e9, 1.7e9, 1.7e9])),
                                  "values": fixed([0.0, 1.0, math.nan, 3.0, 4.0, 5.0, 6.0, 7.0])},
                                 R.NON_FINITE, "values: row 1 not finite"),
}


@pytest.mark.parametrize("ts", [1_700_000_000_000, 1.7e12, 1_700_000_000_000_000_000, 253402300800, -62135596801,
                                "1e12"])
def test_a_json_ts_past_year_9999_or_before_year_1_is_out_of_range(ts) -> None:
    value = b'{"device_id":"a","ts":%s,"values":[1,2]}' % (json.dumps(ts).encode() if ts != "1e12" else b"1e12")
    reason, detail = ReadingDecoder(2).decode_one(b"a", value)
    assert reason is R.OUT_OF_RANGE and detail.startswith("ts: ") and "epoch milliseconds or nanoseconds?" in detail
    for edge in (TS_MIN, TS_MAX, "0001-01-01T00:00:00", "9999-12-31T23:59:59Z"):
        reading = ReadingDecoder(2).decode_one(b"a", json.dumps({"device_id": "a", "ts": edge, "values": [1, 2]}).encode())
        assert isinstance(reading, Reading) and TS_MIN <= reading.ts <= TS_MAX


def test_arrow_nanosecond_timestamps_are_the_seconds_json_and_histories_give() -> None:
    # Divided at once, int64 nanoseconds past 2**53 were rounded twice: a quarter an ulp off.
    from fractions import Fraction

    from streamer.history import _timestamps_from_arrow

    ns = np.random.default_rng(3).integers(1_600_000_000 * 10**9, 1_900_000_000 * 10**9, size=2000)
    columns = {**good_columns(2000), "ts": pa.array(ns, pa.timestamp("ns"))}
    decoded = ReadingDecoder(2).decode([Message("in", 0, 0, b"gw", arrow_message(columns), ARROW)])
    exact = np.array([float(Fraction(int(n), 10**9)) for n in ns])
    assert np.array_equal(decoded.readings.ts, exact)
    assert np.array_equal(_timestamps_from_arrow(pa.array(ns, pa.timestamp("ns"))), exact)


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_a_bad_row_dead_letters_the_whole_message(case: str) -> None:
    columns, reason, detail = BAD_BATCHES[case]
    value = arrow_message(columns)
    good = Message("in", 0, 7, b"dev-1", b'{"device_id":"dev-1","ts":5,"values":[1,2]}', [])
    decoded = ReadingDecoder(2).decode([Message("in", 0, 6, b"gw", value, ARROW), good])
    assert decoded.readings.device_ids == ["dev-1"] and decoded.positions == [SourcePosition("in", 0, 7)]
    [letter] = decoded.dead_letters
    assert letter.reason is reason and detail in letter.detail, letter.detail
    assert (letter.key, letter.value, letter.source.offset) == (b"gw", value, 6)
    assert letter.headers == ARROW


def test_a_message_that_decompresses_past_the_bound_is_refused_before_it_is_read(monkeypatch) -> None:
    # 9 kB of zstd holding a 256 MiB column (ignored, but read all the same): reading it had
    # allocated the 256 MiB; a message of 1 MiB could ask for tens of GB and end the process.
    columns = {**good_columns(1), "blob": pa.array([bytes(256 << 20)], pa.large_binary())}
    value = arrow_message(columns, compression="zstd")
    assert len(value) < 64 << 10

    def never(*args, **kwargs):
        raise AssertionError("read")

    monkeypatch.setattr(pa.ipc, "open_stream", never)
    reason, detail = ReadingDecoder(2).decode_arrow(b"gw", value)
    assert reason is R.TOO_LARGE and "more than the 67108864 a batch message may" in detail
    assert (256 << 20) < int(detail.split("decompress to ")[1].split(" bytes")[0]) < (256 << 20) + 100
    letter, = ReadingDecoder(2).decode([Message("in", 0, 1, b"gw", value, ARROW)]).dead_letters
    assert letter.reason is R.TOO_LARGE


def test_a_value_float32_rounds_to_its_max_is_out_of_range_and_one_past_it_non_finite() -> None:
    # float32's max as written (3.4028235e38) reads as a float64 just above it, yet rounds back
    # to it in float32: it had been called non_finite.
    below = float(np.nextafter(FLOAT32_OVERFLOW, 0.0))
    for value, reason in [("3.4028235e38", R.OUT_OF_RANGE), (repr(below), R.OUT_OF_RANGE),
                          (repr(FLOAT32_OVERFLOW), R.NON_FINITE), ("-3.4028236e38", R.NON_FINITE), ("1e39", R.NON_FINITE)]:
        with np.errstate(over="ignore"):
            assert np.isinf(np.float32(float(value))) == (reason is R.NON_FINITE)
        body = b'{"device_id":"d","ts":1,"values":[' + value.encode() + b']}'
        assert ReadingDecoder(1).decode_one(b"d", body)[0] is reason, value


def test_a_dictionary_column_counts_toward_the_bound(monkeypatch) -> None:
    # An ignored dictionary column holding one 80 MiB string, 3 kB with zstd: dictionaries had gone
    # uncounted (pyarrow calls their messages "dictionary"), and reading it allocated the 80 MiB.
    blob = pa.DictionaryArray.from_arrays(pa.array([0], pa.int32()), pa.array(["x" * (80 << 20)], pa.large_string()))
    value = arrow_message({**good_columns(1), "note": blob}, compression="zstd")
    assert len(value) < 64 << 10

    def never(*args, **kwargs):
        raise AssertionError("read")

    monkeypatch.setattr(pa.ipc, "open_stream", never)
    reason, detail = ReadingDecoder(2).decode_arrow(b"gw", value)
    assert reason is R.TOO_LARGE and (80 << 20) < int(detail.split("decompress to ")[1].split(" bytes")[0]) < (81 << 20)


def delta_dictionary_message(deltas: int, entry_bytes: int) -> bytes:
    """A batch message of ``deltas`` record batches, each adding one entry of ``entry_bytes`` to an
    ignored dictionary column by a delta (zstd)."""
    schema = pa.schema([("device_id", pa.string()), ("ts", pa.float64()), ("values", pa.list_(pa.float32(), 1)),
                        ("note", pa.dictionary(pa.int32(), pa.string()))])
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd", emit_dictionary_deltas=True)
    entries: list[str] = []
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        for i in range(deltas):
            entries.append(chr(65 + i % 26) * entry_bytes)
            note = pa.DictionaryArray.from_arrays(pa.array([i], pa.int32()), pa.array(entries))
            writer.write_batch(pa.record_batch([pa.array([f"dev-{i}"]), pa.array([1.7e9 + i]),
                                                pa.FixedSizeListArray.from_arrays(pa.array([1.0], pa.float32()), 1), note],
                                               schema=schema))
    return sink.getvalue().to_pybytes()


def test_delta_dictionaries_count_every_copy_reading_makes() -> None:
    # 24 deltas of 1 MiB: 24 MiB of dictionary data, but reading makes each delta's dictionary
    # anew, the earlier record batches keeping theirs: 300 MiB of copies, past the bound.
    import streamer.records

    value = delta_dictionary_message(24, 1 << 20)
    types = [m.type for m in pa.ipc.MessageReader.open_stream(pa.BufferReader(value))]
    assert types.count("dictionary") == 24
    counted = streamer.records._arrow_decoded_bytes(value)
    assert 300 << 20 < counted < (300 << 20) + (1 << 20)
    assert ReadingDecoder(1).decode_arrow(b"gw", value)[0] is R.TOO_LARGE
    small = delta_dictionary_message(4, 100)  # within the bound: read, the column ignored
    rows = ReadingDecoder(1).decode_arrow(b"gw", small)
    assert list(rows.device_ids) == ["dev-0", "dev-1", "dev-2", "dev-3"] and rows.ts.tolist() == [1.7e9 + i for i in range(4)]


@pytest.mark.parametrize("note", ["int8 index", "list values"])
def test_other_columns_are_ignored_even_where_pyarrow_cannot_combine_them(note: str) -> None:
    # Two record batches, each with a replacement dictionary for the ignored column: combining
    # the whole table needed a larger index type (200 entries in int8), or unified list
    # dictionaries, which pyarrow cannot; its error had ended the loop.
    schema_type = (pa.dictionary(pa.int8(), pa.string()) if note == "int8 index"
                   else pa.dictionary(pa.int32(), pa.list_(pa.int32())))
    schema = pa.schema([("device_id", pa.string()), ("ts", pa.float64()), ("values", pa.list_(pa.float32(), 2)),
                        ("note", schema_type)])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for b in range(2):
            entries = (pa.array([f"u{b}-{j}" for j in range(100)]) if note == "int8 index"
                       else pa.array([[b, j] for j in range(100)], pa.list_(pa.int32())))
            indices = pa.array([0, 1], schema_type.index_type)
            writer.write_batch(pa.record_batch([
                pa.array([f"dev-{2 * b}", f"dev-{2 * b + 1}"]), pa.array([1.0 + 2 * b, 2.0 + 2 * b]),
                pa.FixedSizeListArray.from_arrays(pa.array(np.arange(4, dtype=np.float32) + 4 * b), 2),
                pa.DictionaryArray.from_arrays(indices, entries)], schema=schema))
    value = sink.getvalue().to_pybytes()
    good = Message("in", 0, 7, b"dev-9", b'{"device_id":"dev-9","ts":5,"values":[1,2]}', [])
    decoded = ReadingDecoder(2).decode([Message("in", 0, 6, b"gw", value, ARROW), good])
    assert not decoded.dead_letters
    assert list(decoded.readings.device_ids) == ["dev-0", "dev-1", "dev-2", "dev-3", "dev-9"]
    assert decoded.readings.ts.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert decoded.readings.values.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [1, 2]]


def test_a_negative_uncompressed_length_is_not_arrow_and_cancels_nothing_out() -> None:
    # Two batches of 500,000 zero rows: a compressed buffer says it holds 4,000,000 bytes. A second
    # one saying -4,000,000 had cancelled the first out (0 bytes: read, 88 MiB allocated).
    n = 1_000_000
    columns = {**good_columns(n, 1), "pad": pa.array(np.zeros(n))}
    columns["device_id"] = pa.array(["d"] * n)
    value = arrow_message(columns, batches=2, compression="zstd")
    size = (4_000_000).to_bytes(8, "little", signed=True)
    at = value.rindex(size)
    patched = value[:at] + (-4_000_000).to_bytes(8, "little", signed=True) + value[at + 8 :]
    reason, detail = ReadingDecoder(1).decode_arrow(b"gw", patched)
    assert reason is R.NOT_ARROW and "a compressed buffer of -4000000 bytes" in detail, detail


@pytest.mark.parametrize("compression", [None, "zstd", "lz4"])
@pytest.mark.parametrize("batches", [1, 3])
def test_the_decoded_size_is_read_from_the_metadata_before_decompressing(compression: str | None, batches: int, monkeypatch) -> None:
    import streamer.records

    columns = {**good_columns(30), "note": pa.array(["x" * (i % 7) for i in range(30)]).dictionary_encode(),
               "blob": pa.array([bytes(i) for i in range(30)], pa.binary())}
    plain, value = arrow_message(columns, batches), arrow_message(columns, batches, compression)
    size = streamer.records._arrow_decoded_bytes(value)
    assert size == streamer.records._arrow_decoded_bytes(plain) <= len(plain)  # the same buffers, compressed or not
    assert size > sum(len(b) for b in [bytes(i) for i in range(30)])
    monkeypatch.setattr(streamer.records, "ARROW_MAX_DECODED_BYTES", size)
    assert type(ReadingDecoder(2).decode_arrow(b"gw", value)).__name__ == "ArrowRows"  # at the bound: read
    monkeypatch.setattr(streamer.records, "ARROW_MAX_DECODED_BYTES", size - 1)
    assert ReadingDecoder(2).decode_arrow(b"gw", value)[0] is R.TOO_LARGE


@pytest.mark.parametrize("after", ["stream", "junk"])
def test_bytes_after_the_end_of_the_stream_are_not_arrow(after: str) -> None:
    # Two streams joined, or other bytes after the first: its rows alone would be read, the rest dropped.
    first = arrow_message(good_columns(2))
    value = first + (arrow_message(good_columns(3)) if after == "stream" else b"xyz")
    result = ReadingDecoder(2).decode_arrow(b"gw", value)
    assert result[0] is R.NOT_ARROW and f"{len(value) - len(first)} bytes after the end of the Arrow IPC stream" in result[1]
    assert list(ReadingDecoder(2).decode_arrow(b"gw", first).device_ids) == good_columns(2)["device_id"].to_pylist()


def test_a_dead_letter_too_big_for_its_topic_is_cut_to_fit_and_says_so() -> None:
    import hashlib

    from streamer.records import DeadLetter, _record_bytes

    value = bytes(range(256)) * 4000  # 1,024,000 bytes
    letter = DeadLetter(R.NOT_JSON, "message: Invalid JSON", b"dev-1", value, [("trace", b"t" * 100)],
                        SourcePosition("in", 3, 77))
    assert letter.kafka_record(None) == (b"dev-1", value, letter.kafka_headers())
    assert letter.kafka_record(2 * len(value)) == (b"dev-1", value, letter.kafka_headers())  # fits: whole
    for limit in (1_000_000, 600_000, 2_000):
        key, cut, headers = letter.kafka_record(limit)
        assert _record_bytes(key, cut, headers) <= limit
        assert key == b"dev-1" and value.startswith(cut) and len(cut) < len(value)
        named = dict(headers)
        assert named["streamer.reason"] == b"not_json" and named["streamer.source.offset"] == b"77"
        said = named["streamer.truncated"].decode()
        assert f"value of {len(value)} bytes (sha256 {hashlib.sha256(value).hexdigest()})" in said and str(limit) in said
        assert headers[0] == ("trace", b"t" * 100)  # the original headers kept while they leave room
    # Original headers bigger than the topic takes: dropped, then the key cut.
    loud = DeadLetter(R.NOT_JSON, "x", b"k" * 5000, value, [("big", b"h" * 50_000)], SourcePosition("in", 0, 1))
    key, cut, headers = loud.kafka_record(20_000)
    assert _record_bytes(key, cut, headers) <= 20_000 and "big" not in dict(headers) and key == b"k" * 5000
    key, cut, headers = loud.kafka_record(3_000)
    assert _record_bytes(key, cut, headers) <= 3_000 and cut == b"" and 0 < len(key) < 5000 and set(key) == {ord("k")}
    # No key and no value: an empty value, clients cannot send neither.
    assert DeadLetter(R.NOT_JSON, "x", None, None, [], SourcePosition("in", 0, 1)).kafka_record(10_000)[1] == b""


def test_a_dead_letters_error_header_is_cut_at_a_characters_boundary() -> None:
    """Details quote device ids, which may hold any character: cut to 256 (or 1,024) bytes in
    the middle of one, the header had been no UTF-8 a reader could decode."""
    from streamer.records import DeadLetter

    for detail in ("\U0001F600" * 300, "é" * 600, "a" + "\U0001F600" * 300):
        letter = DeadLetter(R.KEY_MISMATCH, detail, b"x", b"v" * 200_000, [], SourcePosition("in", 0, 1))
        for limit in (None, 100_000):
            error = dict(letter.kafka_record(limit)[2])["streamer.error"]
            text = error.decode("utf-8")  # raises where cut inside a character
            assert detail.startswith(text) and len(error) > (200 if limit else 1000)


def test_a_batch_message_needs_a_key() -> None:
    result = ReadingDecoder(2).decode_arrow(None, arrow_message(good_columns()))
    assert result[0] is R.KEY_MISMATCH and "gateway" in result[1]


@pytest.mark.parametrize("value", [None, b"", b"{}", b"\xff" * 40, b'{"device_id":"a","ts":1,"values":[1,2]}'])
def test_what_is_no_arrow_stream_is_not_arrow(value: bytes | None) -> None:
    result = ReadingDecoder(2).decode_arrow(b"gw", value)
    assert result[0] is R.NOT_ARROW and result[1]


def test_only_the_arrow_content_type_makes_a_batch_message() -> None:
    """Other content types (or none) are read as JSON, as before batch messages existed."""
    json_value = b'{"device_id":"a","ts":1,"values":[1,2]}'
    for headers in ([], [("content-type", b"application/json")], [("Content-Type", ARROW_CONTENT_TYPE)]):
        decoded = ReadingDecoder(2).decode([Message("in", 0, 0, b"a", json_value, headers)])
        assert decoded.readings.device_ids == ["a"]
    decoded = ReadingDecoder(2).decode([Message("in", 0, 0, b"a", json_value, ARROW)])
    assert decoded.dead_letters[0].reason is R.NOT_ARROW


@settings(deadline=None, database=None, max_examples=400)
@given(st.data())
def test_damaged_batch_messages_become_dead_letters_never_exceptions(data: st.DataObject) -> None:
    value = bytearray(arrow_message(good_columns(5), data.draw(st.integers(1, 2))))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(value) - 1))
        value[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(value)))
    damaged = bytes(value[:cut]) if data.draw(st.booleans()) else bytes(value)
    decoded = ReadingDecoder(2).decode([Message("in", 0, 3, b"gw", damaged, ARROW)])
    if decoded.dead_letters:
        assert len(decoded.readings) == 0 and len(decoded.dead_letters) == 1
    else:  # damage the format could not notice (inside the numbers): still well-formed readings
        readings = decoded.readings
        assert readings.values.shape == (len(readings), 2) and np.isfinite(readings.values).all()
        assert all(1 <= len(d) <= MAX_DEVICE_ID_LENGTH for d in readings.device_ids)


# --- Predictions out ----------------------------------------------------------------------------


def old_encode(predictions: PredictionBatch, model_version: str) -> list[tuple[bytes, bytes]]:
    """The json-module encoder it replaces."""
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    return [
        (d.encode(), dumps({"device_id": d, "ts": t, "forecast": f, "anomaly_score": s, "is_anomaly": a,
                            "residual": r, "model_version": model_version}).encode())
        for d, t, f, s, a, r in zip(predictions.device_ids, predictions.ts.tolist(), predictions.forecast.tolist(),
                                    predictions.anomaly_score.tolist(), predictions.is_anomaly.tolist(),
                                    predictions.residual.tolist())
    ]


def predictions_of(ids: list[str], ts: list[float], forecast: np.ndarray, score: list[float], residual: list[float]) -> PredictionBatch:
    """forecast: (n, features)."""
    n = len(ids)
    return PredictionBatch(
        ids, np.asarray(ts, dtype=np.float64), forecast.astype(np.float32),
        np.asarray(score, dtype=np.float64), np.asarray(score, dtype=np.float64) > 0.5,
        np.asarray(residual, dtype=np.float32), np.zeros(n, dtype=np.float32),
    )


finite64 = st.floats(allow_nan=False, allow_infinity=False)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def drawn_predictions(data: st.DataObject, most: int) -> tuple[list[str], PredictionBatch, str]:
    """Up to ``most`` predictions of 1-3 values with awkward ids and finite numbers, and a model version."""
    n = data.draw(st.integers(0, most))
    features = data.draw(st.integers(1, 3))
    ids = data.draw(st.lists(st.one_of(clean_text.filter(bool), st.just("é\n\"\\\u2028😀")), min_size=n, max_size=n))
    batch = predictions_of(
        ids, data.draw(st.lists(finite64, min_size=n, max_size=n)),
        np.asarray(data.draw(st.lists(finite32, min_size=n * features, max_size=n * features)), dtype=np.float32).reshape(n, features),
        data.draw(st.lists(finite64, min_size=n, max_size=n)), data.draw(st.lists(finite32, min_size=n, max_size=n)),
    )
    return ids, batch, data.draw(st.one_of(st.just('v%s%%b"é'), clean_text))


@settings(deadline=None, database=None, max_examples=300)
@given(st.data())
def test_predictions_read_back_exactly(data: st.DataObject) -> None:
    ids, batch, version = drawn_predictions(data, 6)
    encoded = encode_predictions(batch, version)
    assert [k for k, _ in encoded] == [d.encode() for d in ids]
    for row, (_, value) in enumerate(encoded):
        body = json.loads(value)
        assert list(body) == ["device_id", "ts", "forecast", "anomaly_score", "is_anomaly", "residual", "model_version"]
        assert body["device_id"] == ids[row] and body["model_version"] == version
        assert np.float64(body["ts"]).tobytes() == batch.ts[row : row + 1].tobytes()
        assert np.asarray(body["forecast"], dtype=np.float32).tobytes() == batch.forecast[row].tobytes()
        assert np.asarray(body["forecast"], dtype=np.float64).tobytes() == batch.forecast[row].astype(np.float64).tobytes()
        assert np.float64(body["anomaly_score"]).tobytes() == batch.anomaly_score[row : row + 1].tobytes()
        assert np.float64(body["residual"]).tobytes() == batch.residual[row : row + 1].astype(np.float64).tobytes()
        assert body["is_anomaly"] is bool(batch.is_anomaly[row])
    assert [json.loads(v) for _, v in encoded] == [json.loads(v) for _, v in old_encode(batch, version)]


@pytest.mark.parametrize("field", ["ts", "forecast", "anomaly_score", "residual"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_prediction_that_is_not_finite_is_refused(field: str, bad: float) -> None:
    batch = predictions_of(["a", "b"], [1.0, 2.0], np.array([[1.0], [2.0]]), [0.1, 0.2], [0.0, 0.5])
    getattr(batch, field)[1] = bad
    with pytest.raises(ValueError, match=rf"prediction {field} of device 'b' is .*not finite"):
        encode_predictions(batch, "v")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_arrow_predictions_carry_what_json_carries_bit_for_bit(data) -> None:
    ids, batch, version = drawn_predictions(data, 30)
    n = len(ids)
    batch.is_anomaly[:] = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    values = encode_arrow_predictions(batch, version)
    assert len(values) == 1  # none: one stream of no rows, for the gateway waiting for its reply
    rows = [row for v in values for row in pa.ipc.open_stream(v).read_all().to_pylist()]
    as_json = [json.loads(v) for _, v in encode_predictions(batch, version)]
    assert [list(row) for row in rows] == [list(body) for body in as_json]
    for row, body in zip(rows, as_json):
        assert row == body  # forecast and residual: float32 widened, exactly as JSON writes them


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_arrow_predictions_from_the_messages_own_id_column_are_the_same_bytes(data) -> None:
    """A batch message's ids go out as its own Arrow column (a slice of the message's, at any
    offset), cut into messages the same way as ids built from the strings."""
    import streamer.records

    ids, batch, version = drawn_predictions(data, 60)  # 6 KiB messages: 20-50 rows each
    before = data.draw(st.integers(0, 5))
    column = pa.array(["x" * 200] * before + ids, pa.string()).slice(before)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streamer.records, "ARROW_OUTPUT_BYTES", 6 * 1024)
        assert encode_arrow_predictions(batch, version, column) == encode_arrow_predictions(batch, version)


def test_arrow_predictions_refuse_ids_that_do_not_fit() -> None:
    batch = predictions_of(["a", "b"], [1.0, 2.0], np.array([[1.0], [2.0]]), [0.1, 0.2], [0.0, 0.5])
    with pytest.raises(ValueError, match="1 of type string for 2 predictions"):
        encode_arrow_predictions(batch, "v", pa.array(["a"]))
    with pytest.raises(ValueError, match="large_string"):
        encode_arrow_predictions(batch, "v", pa.array(["a", "b"], pa.large_string()))


def test_arrow_predictions_are_cut_by_their_own_rows_long_ids_bunched_or_not() -> None:
    # 800 ids of 1 KiB (256 emoji) then 12,600 of one byte: cut by the average id, the first
    # message had held 1,055,152 bytes, over the bound and over the broker's default 1 MiB.
    ids = ["\U0001F600" * 256] * 800 + ["a"] * 12_600
    n = len(ids)
    batch = predictions_of(ids, list(np.arange(n, dtype=float)), np.ones((n, 1)), [0.5] * n, [0.1] * n)
    for own_column in (False, True):
        values = encode_arrow_predictions(batch, "v1", pa.array(ids) if own_column else None)
        assert max(map(len, values)) <= ARROW_OUTPUT_BYTES and len(values) == 2
        joined = pa.concat_tables([pa.ipc.open_stream(v).read_all() for v in values])
        assert joined.column("device_id").to_pylist() == ids and joined.column("ts").to_pylist() == list(range(n))
    [one] = encode_arrow_predictions(predictions_of(["x" * 256], [1.0], np.ones((1, 1)), [0.5], [0.1]), "v1")
    assert pa.ipc.open_stream(one).read_all().num_rows == 1


def test_arrow_predictions_are_cut_into_messages_below_the_size_bound(monkeypatch) -> None:
    import streamer.records

    monkeypatch.setattr(streamer.records, "ARROW_OUTPUT_BYTES", 12 * 1024)
    n = 2000
    ids = [f"sensor-{i:06d}-{'x' * (i % 40)}" for i in range(n)]
    batch = predictions_of(ids, list(np.arange(n, dtype=float)), np.ones((n, 2)), [0.5] * n, [0.1] * n)
    values = encode_arrow_predictions(batch, "v1")
    assert len(values) > 5 and max(map(len, values)) <= 12 * 1024
    tables = [pa.ipc.open_stream(v).read_all() for v in values]
    assert tables[0].schema.field("forecast").type == pa.list_(pa.float32(), 2)
    assert tables[0].schema.field("model_version").type == pa.dictionary(pa.int8(), pa.string())
    joined = pa.concat_tables(tables)
    assert joined.column("device_id").to_pylist() == ids and joined.column("ts").to_pylist() == list(range(n))
