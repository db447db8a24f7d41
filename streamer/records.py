"""Boundary types and codecs: bytes from Kafka in, readings or dead letters out; predictions to bytes.

Two input formats, told apart by the message's ``content-type`` header:

JSON (no such header, or any other value): one reading per message, value
``{"device_id": str, "ts": epoch seconds | ISO-8601, "values": [float, ...]}`` with key = device
id; values and ts must be finite, values as float32 (the model's dtype) and within ±1e18
(MAX_ABS_VALUE; beyond it: out_of_range), ts a number or an ISO-8601 string (naive = UTC), never
a boolean, from year 1 to 9999 as epoch seconds (TS_MIN..TS_MAX, as histories; beyond:
out_of_range, usually epoch milliseconds or nanoseconds). Unknown extra fields are ignored. Decoded by
msgspec into a typed struct; a message msgspec refuses, or one the fast path cannot vouch for
(over FAST_PATH_MAX_BYTES, possibly nested deeper than the old parser allowed, not UTF-8), is
read again by jiter (pydantic-core's JSON parser, the one the pydantic decoder used) and checked
field by field, so that every message gets the reason and detail the pydantic decoder gave.

Arrow batch (``content-type: application/vnd.apache.arrow.stream``): many readings of many
devices in one message, an Arrow IPC stream with the columns ``device_id`` (string or
large_string, 1..MAX_DEVICE_ID_LENGTH characters), ``ts`` (float64 epoch seconds, or a timestamp
of any unit; a timestamp's time zone is ignored, its value being UTC already) and ``values``
(fixed_size_list<float32> of the model's input size), no nulls in them; other columns are
ignored (nulls there too), though a stream that does not validate as a whole (a string column of
invalid UTF-8 among them, say) is not_arrow. Rows are readings in the order the engine applies them (per device: time order). The
key names the sender (a gateway id), not a device: it must be present and stable, since the key
picks the partition and a device's state belongs to the partition its readings arrive on, so a
device must always be sent by the same key. A message is all or nothing: one bad row
dead-letters the whole message (one message, one dead letter, its detail naming the column,
the first bad row and how many rows are bad); checks in this order: one readable Arrow stream,
its buffers no more than ARROW_MAX_DECODED_BYTES once decompressed (too_large, told from the
metadata before anything is decompressed), nothing after it (not_arrow), columns and types
(invalid_schema; a list size other than the model's input size: wrong_value_count), nulls and
device id lengths (invalid_schema), NaN/inf in ts or values (non_finite), values beyond ±1e18
and ts outside years 1 to 9999 (out_of_range), key present (key_mismatch). A
message of no rows gives no predictions: one empty output batch message back under
kafka.batch_output = "arrow", nothing as JSON. Every reading of a message shares its SourcePosition.

Output value (JSON): {"device_id", "ts" (epoch seconds), "forecast", "anomaly_score",
"is_anomaly", "residual", "model_version"}, floats written shortest-round-trip (they read back
bit for bit), never NaN or infinity.

Output batch (kafka.batch_output = "arrow", for readings that came in a batch message): the
predictions of one batch message's readings as Arrow IPC streams with the same content-type
header and the input message's key, in row order, each of at most ARROW_OUTPUT_BYTES (a big
input message gives several, in order): columns device_id (string), ts (float64), forecast
(fixed_size_list<float32>), anomaly_score (float64), is_anomaly (bool), residual (float32),
model_version (dictionary<int8, string>); the same fields and values as the JSON output.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, NamedTuple, Protocol

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic_core import from_json

from streamer.engine import PredictionBatch, ReadingBatch

MAX_DEVICE_ID_LENGTH = 256
# From here on a float64 rounds to infinity in float32: halfway between float32's max and 2^128
# (ties go to the even mantissa, 2^128's). Between float32's max and it a value rounds to the max.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
# Readings beyond this magnitude are refused (out_of_range): squared in float32 (a device's
# normalisation, residuals), values past about 1.8e19 overflow to inf, and the forecasts with them.
MAX_ABS_VALUE = 1e18
# Timestamps ISO-8601 can write (years 1 to 9999), in epoch seconds: what histories accept too.
# Past them, a ts is usually epoch milliseconds or nanoseconds, and had been taken live (time
# features of another phase than training's, event-time latency off by the factor) while train
# and replay refused the same column.
TS_MIN = datetime(1, 1, 1, tzinfo=timezone.utc).timestamp()
TS_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
TS_RANGE_HINT = "past year 9999 or before year 1 as epoch seconds (epoch milliseconds or nanoseconds?)"
# A batch message whose buffers take more than this once decompressed is refused (too_large) before
# it is read: 64 times the broker's default max.message.bytes.
ARROW_MAX_DECODED_BYTES = 64 << 20
CONTENT_TYPE_HEADER = "content-type"
ARROW_CONTENT_TYPE = b"application/vnd.apache.arrow.stream"
ARROW_STREAM_MARKER = b"\xff\xff\xff\xff"  # an Arrow IPC stream's first message starts so
SENDER_IDS = 1 << 20  # device ids of batch messages kept for their senders' next messages (_SenderIds)
# The fast path vouches only for messages the old parser (jiter) surely reads the same way:
# jiter refuses numbers of more than about 4300 digits and nesting deeper than about 200, which
# msgspec accepts in fields it skips; a message longer than this or with this many brackets
# takes the exact path.
FAST_PATH_MAX_BYTES = 4096
FAST_PATH_MAX_BRACKETS = 200


class DeadLetterReason(StrEnum):
    NOT_JSON = "not_json"
    INVALID_SCHEMA = "invalid_schema"
    WRONG_VALUE_COUNT = "wrong_value_count"
    NON_FINITE = "non_finite"
    KEY_MISMATCH = "key_mismatch"
    NOT_ARROW = "not_arrow"  # a batch message that is not a readable Arrow IPC stream
    OUT_OF_RANGE = "out_of_range"  # a value beyond ±MAX_ABS_VALUE
    TOO_LARGE = "too_large"  # a batch message whose buffers decompress to more than ARROW_MAX_DECODED_BYTES
    # Refused after the step (never by the decoder): the model gave a forecast, score or residual that
    # is NaN or infinite for this message's readings (the engine resets a device whose own step gave one).
    PREDICTION_NOT_FINITE = "prediction_not_finite"


class Reading(msgspec.Struct, frozen=True, gc=False):
    """One sensor reading as it arrives on the input topic: ts in epoch seconds."""

    device_id: str
    ts: float
    values: list[float]


class _WireReading(msgspec.Struct, gc=False):
    """A JSON reading as the fast path reads it: ints and floats as float, no booleans, values
    within ±MAX_ABS_VALUE, extra fields skipped."""

    device_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DEVICE_ID_LENGTH)]
    ts: float | str
    values: Annotated[list[Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]], msgspec.Meta(min_length=1)]


class SourcePosition(msgspec.Struct, frozen=True, gc=False):
    """Where a message was read: a value (equal and hashed by its fields), cheap to make per message."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be used, kept byte for byte with why."""

    reason: DeadLetterReason
    detail: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    source: SourcePosition

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        """The original headers, then ours (streamer.*) naming the reason and the source."""
        return [*self.headers, *self._ours()]

    def _ours(self, error_bytes: int = 1024) -> list[tuple[str, bytes]]:
        return [
            ("streamer.reason", self.reason.value.encode()),
            ("streamer.error", _utf8_cut(self.detail, error_bytes)),
            ("streamer.source.topic", self.source.topic.encode()),
            ("streamer.source.partition", str(self.source.partition).encode()),
            ("streamer.source.offset", str(self.source.offset).encode()),
        ]

    def kafka_record(self, max_bytes: int | None = None) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """(key, value, headers) for the dead-letter topic: the message as read with
        kafka_headers(), an empty value for a message of neither key nor value (clients cannot
        send one). A record that would not fit ``max_bytes`` (the topic's limit: a message near
        the input topic's limit, plus our headers, may exceed it) is cut to fit rather than
        refused by the broker, which would stop the loop at this message for good: the value first,
        then the original headers, then the key (streamer.error kept to 256 bytes), each cut said in
        a streamer.truncated header with the original sizes and the value's SHA-256. The source
        position leads back to the whole message while the input topic retains it."""
        value = self.value if self.value is not None or self.key is not None else b""
        key, headers = self.key, self.kafka_headers()
        if max_bytes is None or _record_bytes(key, value, headers) <= max_bytes:
            return key, value, headers
        whole = value or b""
        said = (f"value of {len(whole)} bytes (sha256 {hashlib.sha256(whole).hexdigest()}), key of"
                f" {len(key or b'')} bytes and {len(self.headers)} headers, cut to fit the dead-letter topic's"
                f" {max_bytes} bytes")
        ours = [*self._ours(256), ("streamer.truncated", said.encode())]
        for theirs in (self.headers, []):  # the original headers, if they leave room for a key
            room = max_bytes - _record_bytes(key, b"", [*theirs, *ours])
            if room >= 0:
                return key, whole[:room], [*theirs, *ours]
        room = max(0, max_bytes - _record_bytes(b"", b"", ours))
        return (key or b"")[:room], b"", ours


def _utf8_cut(text: str, max_bytes: int) -> bytes:
    """``text`` in UTF-8, cut to at most ``max_bytes`` at a character's boundary (a header cut in
    the middle of one is no UTF-8 that a reader can decode)."""
    return text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore").encode("utf-8")


# A lone record's framing beyond its key, value and headers: the record batch's header (61 bytes)
# and the record's varints (headers' own varints are counted with them), with room to spare.
RECORD_FRAMING_BYTES = 128


def _record_bytes(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """An upper bound of a lone record's size on the wire, as the broker's max.message.bytes counts it."""
    header_bytes = sum(len(k.encode("utf-8")) + len(v) + 10 for k, v in headers)
    return RECORD_FRAMING_BYTES + len(key or b"") + len(value or b"") + header_bytes


class BatchSpan(NamedTuple):
    """The readings [start, stop) of one batch message, its key and position; ``ids``: its
    device ids as the message's own Arrow column (the output's column for them, unbuilt)."""

    start: int
    stop: int
    key: bytes
    position: SourcePosition
    ids: pa.Array | None = None


@dataclass
class DecodedBatch:
    """Readings that passed validation (offset order; a batch message's rows in row order, sharing
    its position) and the dead letters of the rest (one per message); where each batch message's
    rows are among the readings. Where each reading came from, as columns: ``sources``, the
    position of every message that gave readings, and ``source_of`` (int32, one per reading), its
    message's index in ``sources`` (a batch message's rows share one: no per-row objects)."""

    readings: ReadingBatch
    sources: list[SourcePosition]
    source_of: np.ndarray
    dead_letters: list[DeadLetter] = field(default_factory=list)
    batch_spans: list[BatchSpan] = field(default_factory=list)

    def position(self, i: int) -> SourcePosition:
        """Where reading ``i`` came from."""
        return self.sources[int(self.source_of[i])]

    @property
    def positions(self) -> list[SourcePosition]:
        """Where each reading came from, one per reading (built on demand: tests, rare paths)."""
        sources = self.sources
        return [sources[j] for j in self.source_of.tolist()]


class KafkaMessage(Protocol):
    """What the decoder reads of a consumed message (kafka-python's ConsumerRecord, streamer.kafka's Message)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None


Refusal = tuple[DeadLetterReason, str]


class ArrowRows(NamedTuple):
    """The readings of one batch message: ts (n,) float64 epoch seconds, values (n, input_size)
    float32; ids_column: the device ids as read (utf8), when they are one Arrow array."""

    device_ids: Sequence[str]
    ts: np.ndarray
    values: np.ndarray
    ids_column: pa.Array | None = None


class ReadingDecoder:
    """Validates raw Kafka messages into a ReadingBatch for a model of ``input_size`` features."""

    def __init__(self, input_size: int, sender_ids: int = SENDER_IDS) -> None:
        """``sender_ids``: device ids of batch messages kept for their senders' next ones (_SenderIds)."""
        self.input_size = input_size
        self._wire = msgspec.json.Decoder(_WireReading)
        self._ids = _SenderIds(sender_ids)

    def decode_one(self, key: bytes | None, value: bytes | None) -> Reading | Refusal:
        """One JSON message: its reading, or the reason and detail it is refused."""
        if value is None:
            return DeadLetterReason.NOT_JSON, "empty message (null value)"
        reading = self._fast(value)
        if reading is None:
            reading = _exact(value)
            if type(reading) is not Reading:
                return reading
            values = reading.values
            beyond = next((i for i, v in enumerate(values) if abs(v) >= FLOAT32_OVERFLOW), None)
            if beyond is not None:  # finite as a float64, infinite in the model's float32
                return (
                    DeadLetterReason.NON_FINITE,
                    f"values.{beyond}: {values[beyond]!r} is beyond float32, the model's dtype",
                )
            beyond = next((i for i, v in enumerate(values) if abs(v) > MAX_ABS_VALUE), None)
            if beyond is not None:
                return DeadLetterReason.OUT_OF_RANGE, f"values.{beyond}: {values[beyond]!r} is beyond ±{MAX_ABS_VALUE:g}"
        if not TS_MIN <= reading.ts <= TS_MAX:
            return DeadLetterReason.OUT_OF_RANGE, f"ts: {reading.ts!r} is {TS_RANGE_HINT}"
        values = reading.values
        if len(values) != self.input_size:
            return DeadLetterReason.WRONG_VALUE_COUNT, f"{len(values)} values, the model takes {self.input_size}"
        if key is None:
            return DeadLetterReason.KEY_MISMATCH, "message has no key; the key must be the device id"
        if key != reading.device_id.encode("utf-8"):
            return DeadLetterReason.KEY_MISMATCH, f"key {key[:64]!r} != device_id {reading.device_id[:64]!r}"
        return reading

    def _fast(self, value: bytes) -> Reading | None:
        """msgspec's reading of a message that is surely good as far as the schema goes, values
        within ±MAX_ABS_VALUE; None when the exact path must decide (any refusal, or a message msgspec
        may read laxer than jiter)."""
        if len(value) > FAST_PATH_MAX_BYTES:
            return None
        if len(value) > FAST_PATH_MAX_BRACKETS and value.count(b"[") + value.count(b"{") >= FAST_PATH_MAX_BRACKETS:
            return None
        if not value.isascii():
            try:  # msgspec does not check the UTF-8 of the fields it skips
                value.decode("utf-8")
            except UnicodeDecodeError:
                return None
        try:
            wire = self._wire.decode(value)
        except Exception:  # DecodeError, ValidationError, RecursionError: the exact path says why
            return None
        ts = wire.ts
        if type(ts) is str:
            try:
                ts = iso_seconds(ts)
            except ValueError:
                return None
            if not math.isfinite(ts):
                return None
        return Reading(wire.device_id, ts, wire.values)  # msgspec's floats are finite: it refuses NaN and overflow

    def decode_arrow(self, key: bytes | None, value: bytes | None) -> ArrowRows | Refusal:
        """One Arrow batch message: its rows, or the reason and detail the whole message is
        refused (see the module docstring)."""
        if value is None:
            return DeadLetterReason.NOT_ARROW, "empty message (null value)"
        try:
            decoded_bytes = _arrow_decoded_bytes(value)
        except Exception as exc:  # no IPC stream, or one whose metadata does not hold together
            return DeadLetterReason.NOT_ARROW, f"not an Arrow IPC stream: {exc}"[:512]
        if decoded_bytes > ARROW_MAX_DECODED_BYTES:
            return DeadLetterReason.TOO_LARGE, (
                f"its buffers decompress to {decoded_bytes} bytes, more than the {ARROW_MAX_DECODED_BYTES}"
                " a batch message may (send fewer rows per message)")
        try:
            source = pa.BufferReader(value)
            table = pa.ipc.open_stream(source).read_all()
            table.validate(full=True)  # offsets within their buffers, strings UTF-8
        except Exception as exc:  # whatever pyarrow raises for bytes that are no IPC stream
            return DeadLetterReason.NOT_ARROW, f"not an Arrow IPC stream: {exc}"[:512]
        if source.tell() != len(value):  # a second stream, or other bytes, after the end of the first
            return DeadLetterReason.NOT_ARROW, (
                f"{len(value) - source.tell()} bytes after the end of the Arrow IPC stream (one stream per message)")
        refused = _schema_refusal(table.schema, self.input_size)
        if refused is not None:
            return refused
        values_type = table.schema.field("values").type
        # The three columns alone: other columns are ignored, and combining them could fail on a
        # valid stream (replacement dictionaries of a small index type, or of lists, which pyarrow
        # cannot unify), and had ended the loop with pyarrow's error.
        table = table.select(["device_id", "ts", "values"]).combine_chunks()
        ids_column = table.column("device_id").chunk(0) if table.num_rows else pa.array([], pa.string())
        ts_column = table.column("ts").chunk(0) if table.num_rows else pa.array([], pa.float64())
        values_column = table.column("values").chunk(0) if table.num_rows else pa.array([], values_type)
        flat = values_column.flatten()
        for name, column in (("device_id", ids_column), ("ts", ts_column), ("values", values_column), ("values", flat)):
            if column.null_count:
                return _rows_refused(DeadLetterReason.INVALID_SCHEMA, name, "null", column.is_null(), flat is column, self.input_size)
        lengths = pc.utf8_length(ids_column)
        bad_length = pc.or_(pc.less(lengths, 1), pc.greater(lengths, MAX_DEVICE_ID_LENGTH))
        if pc.any(bad_length).as_py():
            what = f"not 1..{MAX_DEVICE_ID_LENGTH} characters long"
            return _rows_refused(DeadLetterReason.INVALID_SCHEMA, "device_id", what, bad_length, False, self.input_size)
        if pa.types.is_timestamp(ts_column.type):
            ts = epoch_seconds(ts_column.cast(pa.int64()).to_numpy(), ts_column.type.unit)
        else:
            ts = ts_column.to_numpy()
            if not np.isfinite(ts).all():
                return _rows_refused(DeadLetterReason.NON_FINITE, "ts", "not finite", ~np.isfinite(ts), False, self.input_size)
        values = flat.to_numpy().reshape(len(ts), self.input_size)
        finite = np.isfinite(values)
        if not finite.all():
            return _rows_refused(DeadLetterReason.NON_FINITE, "values", "not finite", ~finite, True, self.input_size)
        beyond = np.abs(values) > MAX_ABS_VALUE
        if beyond.any():
            return _rows_refused(DeadLetterReason.OUT_OF_RANGE, "values", f"beyond ±{MAX_ABS_VALUE:g}", beyond, True,
                                 self.input_size)
        outside = (ts < TS_MIN) | (ts > TS_MAX)  # after the values' checks, as JSON's order is
        if outside.any():
            return _rows_refused(DeadLetterReason.OUT_OF_RANGE, "ts", TS_RANGE_HINT, outside, False, self.input_size)
        if key is None:
            return DeadLetterReason.KEY_MISMATCH, "batch message has no key; the key must name its sender (a gateway id)"
        # ts and values copied: they must not pin the message's buffer, and the engine may want them
        # writable. The id column stays a view of the message (utf8 only: the output's type), used
        # for the batch's output while the message is still in hand.
        return ArrowRows(self._ids.of(key, ids_column), np.array(ts, dtype=np.float64), np.array(values, dtype=np.float32),
                         ids_column if pa.types.is_string(ids_column.type) else None)

    def decode(self, messages: list[KafkaMessage]) -> DecodedBatch:
        """Every message becomes its readings (in offset order, a batch message's in row order)
        or one dead letter; never an exception."""
        ids: list[str] = []
        ts: list[float] = []
        values: list[list[float]] = []
        sources: list[SourcePosition] = []  # of the messages that gave readings
        source_of: list[int] = []  # of each JSON reading
        batches: list[tuple[int, ArrowRows, int, bytes]] = []  # (JSON readings before it, rows, source, key)
        dead: list[DeadLetter] = []
        decode_one = self.decode_one
        for msg in messages:
            if msg.headers and _is_arrow(msg.headers):
                result = self.decode_arrow(msg.key, msg.value)
                if type(result) is ArrowRows:
                    batches.append((len(ids), result, len(sources), msg.key))
                    sources.append(SourcePosition(msg.topic, msg.partition, msg.offset))
                    continue
            else:
                result = decode_one(msg.key, msg.value)
                if type(result) is Reading:
                    ids.append(result.device_id)
                    ts.append(result.ts)
                    values.append(result.values)
                    source_of.append(len(sources))
                    sources.append(SourcePosition(msg.topic, msg.partition, msg.offset))
                    continue
            reason, detail = result
            headers = [(k, v if v is not None else b"") for k, v in (msg.headers or [])]
            dead.append(DeadLetter(reason, detail, msg.key, msg.value, headers, SourcePosition(msg.topic, msg.partition, msg.offset)))
        json_rows = ArrowRows(ids, np.asarray(ts, dtype=np.float64),
                              np.asarray(values, dtype=np.float32).reshape(len(ids), self.input_size))
        json_sources = np.asarray(source_of, dtype=np.int32)
        spans: list[BatchSpan] = []
        readings, of = (_assemble(json_rows, json_sources, sources, batches, spans) if batches
                        else (json_rows, json_sources))
        partitions = np.asarray([p.partition for p in sources], dtype=np.int32)[of]
        # Batch messages alone: the step plans per sender's list (Engine.step, plan_lists).
        lists = tuple(tuple(rows.device_ids) for _, rows, _, _ in batches) if batches and not ids else None
        return DecodedBatch(ReadingBatch(readings.device_ids, readings.ts, readings.values, partitions, lists), sources,
                            of, dead, spans)


def _arrow_decoded_bytes(value: bytes) -> int:
    """The bytes an Arrow IPC stream's record and dictionary batches take once read: their
    buffers' lengths, or for a compressed body the uncompressed length each buffer starts with.
    From the messages' metadata and those 8-byte prefixes alone, before anything is decompressed:
    a compressed message of a few kB can ask for gigabytes (zstd of zeros), and reading it would
    be the process's end, then that of the next consumer to read it. Raises on a stream that is
    not one, or whose metadata does not hold together."""
    total = 0
    dictionaries: dict[int, int] = {}  # a dictionary's id -> its bytes so far
    for message in pa.ipc.MessageReader.open_stream(pa.BufferReader(value)):
        # pyarrow names a DictionaryBatch message "dictionary": named "dictionary batch" here
        # before, dictionaries went uncounted, and a dictionary column (ignored, but read all the
        # same) of 400 MiB came in a message of 14 kB.
        if message.type not in ("record batch", "dictionary"):
            continue
        meta, body = _Flat(message.metadata.to_pybytes()), message.body or pa.py_buffer(b"")
        root = meta.table(meta.u32(0))
        header = meta.offset(root, 2)  # Message.header: a RecordBatch or DictionaryBatch table
        batch = header if message.type == "record batch" else meta.offset(header, 1)  # DictionaryBatch.data
        size = _buffers_bytes(meta, batch, body)
        if message.type == "dictionary":
            dictionary = meta.scalar(header, 0, "<q", 0)  # DictionaryBatch.id
            if meta.scalar(header, 2, "<?", False):  # DictionaryBatch.isDelta
                # Reading appends a delta to the dictionary so far, into a new one, and the record
                # batches before it keep the old: n deltas cost the sum of n growing copies.
                size += dictionaries.get(dictionary, 0)
            dictionaries[dictionary] = size
        total += size
    return total


def _buffers_bytes(meta: "_Flat", batch: int, body: pa.Buffer) -> int:
    """The bytes the buffers of the RecordBatch table at ``batch`` take once read (see
    _arrow_decoded_bytes)."""
    total = 0
    compressed = meta.field(batch, 3) is not None  # RecordBatch.compression
    for offset, length in meta.structs(batch, 2):  # RecordBatch.buffers: (offset, length) in the body
        if offset < 0 or length < 0 or offset + length > body.size:
            raise ValueError(f"a buffer at {offset} of {length} bytes, in a body of {body.size}")
        if compressed and length:
            if length < 8:
                raise ValueError(f"a compressed buffer of {length} bytes")
            uncompressed = int.from_bytes(body[offset : offset + 8].to_pybytes(), "little", signed=True)
            if uncompressed < -1:  # -1 alone says "stored as is"; another would cancel real bytes out
                raise ValueError(f"a compressed buffer of {uncompressed} bytes")
            total += length - 8 if uncompressed == -1 else uncompressed
        else:
            total += length
    return total


class _Flat:
    """Just enough of a FlatBuffers reader for Arrow's message metadata (Message.fbs, Schema.fbs):
    tables, their scalar and offset fields, and vectors of 16-byte structs. Out-of-range reads raise."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _read(self, fmt: str, at: int) -> int:
        if at < 0:
            raise ValueError(f"metadata read at {at}")
        return struct.unpack_from(fmt, self.data, at)[0]

    def u32(self, at: int) -> int:
        return self._read("<I", at)

    def table(self, at: int) -> int:
        self._read("<i", at)  # in range
        return at

    def field(self, table: int, index: int) -> int | None:
        """Where field ``index`` of the table at ``table`` is, or None where it is absent."""
        vtable = table - self._read("<i", table)
        entry = 4 + 2 * index
        if entry >= self._read("<H", vtable):
            return None
        at = self._read("<H", vtable + entry)
        return table + at if at else None

    def scalar(self, table: int, index: int, fmt: str, default: int | bool) -> int | bool:
        """A scalar field (struct format ``fmt``), or its default where it is absent."""
        at = self.field(table, index)
        return default if at is None else self._read(fmt, at)

    def offset(self, table: int, index: int) -> int:
        """The table an offset field points to."""
        at = self.field(table, index)
        if at is None:
            raise ValueError(f"metadata field {index} missing")
        return self.table(at + self.u32(at))

    def structs(self, table: int, index: int) -> list[tuple[int, int]]:
        """A vector of (int64, int64) structs, empty where the field is absent."""
        at = self.field(table, index)
        if at is None:
            return []
        vector = at + self.u32(at)
        n = self.u32(vector)
        if vector + 4 + 16 * n > len(self.data):
            raise ValueError(f"a vector of {n} buffers past the metadata's end")
        return [struct.unpack_from("<qq", self.data, vector + 4 + 16 * i) for i in range(n)]


class _SenderIds:
    """The device ids of each sender's last batch message, as Python strings, for its next one.

    A gateway that lists the same devices in the same order again (one polling its sensors in
    turn) gets the very same str objects back: no 16k strings made again per message, and their
    hashes, which the state table's lookup needs, already computed (bench/batch_messages.py,
    BATCH_ORDERS). A message whose ids differ in any way is read afresh and takes its sender's
    place. At most ``max_rows`` ids are kept (the pipeline gives
    the state table's capacity: the ids of the devices it can hold), the senders heard from least
    recently dropped first; 0 keeps none. Each kept sender costs a copy of its id column and a
    reference per id; the strings are mostly those the state table holds anyway."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._last: OrderedDict[bytes, tuple[pa.Array, tuple[str, ...]]] = OrderedDict()
        self._rows = 0

    def __len__(self) -> int:
        """Ids kept."""
        return self._rows

    def of(self, key: bytes, ids_column: pa.Array) -> tuple[str, ...]:
        """``ids_column``'s values as Python strings: the kept ones if its sender's last message had them."""
        last = self._last.get(key)
        if last is not None and last[0].equals(ids_column):  # same type, length and values
            self._last.move_to_end(key)
            return last[1]
        ids = tuple(ids_column.to_pylist())
        if last is not None:
            self._rows -= len(last[1])
            del self._last[key]
        if 0 < len(ids) <= self.max_rows:
            while self._rows + len(ids) > self.max_rows:
                self._rows -= len(self._last.popitem(last=False)[1][1])
            # A copy: the column is a view of the message, whose other columns would stay with it.
            self._last[key] = (pa.concat_arrays([ids_column]), ids)
            self._rows += len(ids)
        return ids


def _arrow_hint(value: bytes) -> str:
    """For a message refused as JSON that starts as an Arrow IPC stream does (its continuation
    marker): what a batch message needs, which it may have only near-missed (``Content-Type``,
    a parameter after the type)."""
    if not value.startswith(ARROW_STREAM_MARKER):
        return ""
    return (f"; it starts as an Arrow IPC stream does: a batch message needs the header"
            f" {CONTENT_TYPE_HEADER}: {ARROW_CONTENT_TYPE.decode()}, exactly")


def _is_arrow(headers: list[tuple[str, bytes | None]]) -> bool:
    return any(k == CONTENT_TYPE_HEADER and v == ARROW_CONTENT_TYPE for k, v in headers)


def _assemble(
    json_rows: ArrowRows,
    json_sources: np.ndarray,
    sources: list[SourcePosition],
    batches: list[tuple[int, ArrowRows, int, bytes]],
    spans: list[BatchSpan],
) -> tuple[ArrowRows, np.ndarray]:
    """The JSON readings with each batch message's rows put in after the JSON readings before it,
    and each reading's source; appends each batch message's span to ``spans``."""
    ids: list[str] = []
    ts: list[np.ndarray] = []
    values: list[np.ndarray] = []
    of: list[np.ndarray] = []
    done = 0
    for before, rows, source, key in [*batches, (len(json_rows.device_ids), None, 0, None)]:
        ids += json_rows.device_ids[done:before]
        ts.append(json_rows.ts[done:before])
        values.append(json_rows.values[done:before])
        of.append(json_sources[done:before])
        done = before
        if rows is not None:
            spans.append(BatchSpan(len(ids), len(ids) + len(rows.device_ids), key, sources[source], rows.ids_column))
            ids += rows.device_ids
            ts.append(rows.ts)
            values.append(rows.values)
            of.append(np.full(len(rows.device_ids), source, dtype=np.int32))
    return ArrowRows(ids, np.concatenate(ts), np.concatenate(values)), np.concatenate(of)


# --- Arrow batch messages -----------------------------------------------------------------------

_ARROW_COLUMNS = (
    ("device_id", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    ("ts", lambda t: pa.types.is_float64(t) or pa.types.is_timestamp(t), "float64 epoch seconds or a timestamp"),
    ("values", lambda t: pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type), "fixed_size_list<float32>"),
)


def _schema_refusal(schema: pa.Schema, input_size: int) -> Refusal | None:
    """Why a batch message's columns cannot be used, or None."""
    for name, accepts, wanted in _ARROW_COLUMNS:
        index = schema.get_field_index(name)
        if index < 0:
            present = ", ".join(schema.names)[:200]
            return DeadLetterReason.INVALID_SCHEMA, f"column {name!r} missing or repeated (columns: {present})"
        if not accepts(schema.field(index).type):
            return DeadLetterReason.INVALID_SCHEMA, f"{name}: {schema.field(index).type}, expected {wanted}"
    size = schema.field("values").type.list_size
    if size != input_size:
        return DeadLetterReason.WRONG_VALUE_COUNT, f"values: {size} values, the model takes {input_size}"
    return None


def epoch_seconds(raw: np.ndarray, unit: str) -> np.ndarray:
    """Epoch seconds (float64, correctly rounded) of int64 timestamps in ``unit`` (s, ms, us,
    ns): whole seconds and the fraction apart. Divided at once, nanoseconds past 2**53 were rounded
    twice, a quarter of them an ulp off the seconds JSON and histories give for the same instant."""
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    return (raw // per_second).astype(np.float64) + (raw % per_second) / per_second


def _rows_refused(
    reason: DeadLetterReason, column: str, what: str, bad: object, per_value: bool, input_size: int
) -> Refusal:
    """A whole batch message refused for its bad rows: the column, the first bad row, how many."""
    mask = np.asarray(bad.to_numpy(zero_copy_only=False) if isinstance(bad, pa.Array) else bad, dtype=bool)
    rows = np.flatnonzero(mask.reshape(-1, input_size).any(axis=1) if per_value else mask)
    more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
    return reason, f"{column}: row {rows[0]} {what}{more}; the whole message is refused"


def encode_arrow_readings(device_ids: list[str], ts: np.ndarray, values: np.ndarray) -> bytes:
    """A batch message's value (send it with the header CONTENT_TYPE_HEADER: ARROW_CONTENT_TYPE
    and a gateway id as key): ts (n,) epoch seconds, values (n, features), written as float32."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    table = pa.table({
        "device_id": pa.array(device_ids, pa.string()),
        "ts": pa.array(np.asarray(ts, dtype=np.float64)),
        "values": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]),
    })
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# --- The exact path: jiter and the pydantic decoder's rules, error for error --------------------


def iso_seconds(text: str) -> float:
    """Epoch seconds of ISO-8601 text (naive = UTC). Raises ValueError. Python 3.11's
    fromisoformat reads the text only up to a NUL after a whole time ("...T00:00:00\x00" is
    midnight): refused here."""
    if "\x00" in text:
        raise ValueError(f"not ISO-8601: {text!r}")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)  # naive times are taken as UTC
    return parsed.timestamp()


class _Error(NamedTuple):
    kind: str  # the pydantic error type where it decides the reason: "finite_number", else "schema"
    where: str
    msg: str


def _exact(value: bytes) -> Reading | Refusal:
    """The pydantic decoder's verdict on a message, with its reason and detail: jiter parses
    (NaN, Infinity and out-of-range numbers included), then every field is checked and every
    error collected in field order; non-finite numbers make it non_finite, else invalid_schema."""
    try:
        obj = from_json(value, allow_inf_nan=True)
    except ValueError as exc:
        return DeadLetterReason.NOT_JSON, f"message: Invalid JSON: {exc}{_arrow_hint(value)}"
    if not isinstance(obj, dict):
        return DeadLetterReason.INVALID_SCHEMA, "message: Input should be an object"
    errors: list[_Error] = []
    device_id = _check_device_id(obj, errors)
    ts = _check_ts(obj, errors)
    values = _check_values(obj, errors)
    if errors:
        first = errors[0]
        detail = f"{first.where}: {first.msg}"
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
        if any(e.kind == "finite_number" for e in errors):
            return DeadLetterReason.NON_FINITE, detail
        return DeadLetterReason.INVALID_SCHEMA, detail
    return Reading(device_id, ts, values)


def _check_device_id(obj: dict, errors: list[_Error]) -> str:
    if "device_id" not in obj:
        errors.append(_Error("schema", "device_id", "Field required"))
        return ""
    device_id = obj["device_id"]
    if not isinstance(device_id, str):
        errors.append(_Error("schema", "device_id", "Input should be a valid string"))
    elif not device_id:
        errors.append(_Error("schema", "device_id", "String should have at least 1 character"))
    elif len(device_id) > MAX_DEVICE_ID_LENGTH:
        errors.append(_Error("schema", "device_id", f"String should have at most {MAX_DEVICE_ID_LENGTH} characters"))
    return device_id


def _check_ts(obj: dict, errors: list[_Error]) -> float:
    if "ts" not in obj:
        errors.append(_Error("schema", "ts", "Field required"))
        return 0.0
    raw = obj["ts"]
    if isinstance(raw, bool):
        errors.append(_Error("schema", "ts", "Value error, ts must be epoch seconds or an ISO-8601 string, not a boolean"))
        return 0.0
    if isinstance(raw, int | float):
        try:
            seconds = float(raw)
        except OverflowError:  # JSON integers are unbounded: 10**400 is beyond any float
            seconds = math.inf
    elif isinstance(raw, str):
        try:
            seconds = iso_seconds(raw)
        except ValueError:
            errors.append(_Error("schema", "ts", f"Value error, ts {raw[:64]!r} is not ISO-8601"))
            return 0.0
    else:
        kind = type(raw).__name__
        errors.append(_Error("schema", "ts", f"Value error, ts must be epoch seconds or an ISO-8601 string, got {kind}"))
        return 0.0
    if not math.isfinite(seconds):
        errors.append(_Error("finite_number", "ts", "ts must be finite"))
    return seconds


def _check_values(obj: dict, errors: list[_Error]) -> list[float]:
    if "values" not in obj:
        errors.append(_Error("schema", "values", "Field required"))
        return []
    raw = obj["values"]
    if not isinstance(raw, list):
        errors.append(_Error("schema", "values", "Input should be a valid array"))
        return []
    values: list[float] = []
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, int | float):  # strict: no strings, no booleans
            errors.append(_Error("schema", f"values.{i}", "Input should be a valid number"))
            continue
        try:
            number = float(v)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            errors.append(_Error("finite_number", f"values.{i}", "Input should be a finite number"))
        values.append(number)
    if not raw:
        errors.append(_Error("schema", "values", "List should have at least 1 item after validation, not 0"))
    return values


# --- Predictions out -----------------------------------------------------------------------------


_ENCODER = msgspec.json.Encoder()
_PREDICTION = (
    b'{"device_id":%b,"ts":%b,"forecast":[%b],"anomaly_score":%b,"is_anomaly":%b,"residual":%b,"model_version":'
)


def encode_predictions(predictions: PredictionBatch, model_version: str) -> list[tuple[bytes, bytes]]:
    """(key, value) per prediction, in order: key the device id (UTF-8), value compact JSON whose
    floats read back exactly. ValueError when a number is NaN or infinite (JSON has none)."""
    columns = {
        "ts": predictions.ts,
        "forecast": predictions.forecast,
        "anomaly_score": predictions.anomaly_score,
        "residual": predictions.residual,
    }
    for name, column in columns.items():
        finite = np.isfinite(column)
        if not finite.all():
            row = int(np.flatnonzero(~finite.reshape(len(predictions), -1).all(axis=1))[0])
            raise ValueError(
                f"prediction {name} of device {predictions.device_ids[row]!r} is {column[row]!r}: not finite, not JSON"
            )
    device_ids = predictions.device_ids
    if not device_ids:
        return []
    # Column by column, msgspec writing each column in one call, then one bytes template per
    # prediction: no Python object per number, which at 100k predictions costs more than the JSON.
    ids = _ENCODER.encode_lines(device_ids).split(b"\n")  # JSON strings escape their newlines
    features = predictions.forecast.shape[1]
    forecast = _json_numbers(predictions.forecast.reshape(-1))
    if features > 1:
        forecast = [b",".join(forecast[i : i + features]) for i in range(0, len(forecast), features)]
    flags = [b"true" if flag else b"false" for flag in predictions.is_anomaly.tolist()]
    template = _PREDICTION + _ENCODER.encode(model_version).replace(b"%", b"%%") + b"}"
    rows = zip(ids, _json_numbers(predictions.ts), forecast, _json_numbers(predictions.anomaly_score), flags,
               _json_numbers(predictions.residual))
    return [(device_id.encode("utf-8"), template % row) for device_id, row in zip(device_ids, rows)]


# An output batch message stays below this (the broker's default max.message.bytes is 1 MiB):
# a batch message of more rows gives several.
ARROW_OUTPUT_BYTES = 768 * 1024


def encode_arrow_predictions(predictions: PredictionBatch, model_version: str, ids: pa.Array | None = None) -> list[bytes]:
    """The predictions as Arrow IPC streams (the output batch format of the module docstring), in
    row order, each of at most ARROW_OUTPUT_BYTES unless one row alone is bigger; for none, one
    stream of no rows (a gateway reads one message back per batch message it sent). ``ids``: the
    device ids as an Arrow utf8 array already (a batch message's own column), else built here."""
    n = len(predictions)
    features = predictions.forecast.shape[1]
    row_bytes = 8 + 8 + 4 * features + 8 + 1 + 4 + 1  # ts, forecast, score, flag, residual, version index
    if ids is None:
        ids = pa.array(predictions.device_ids, pa.string())
    elif len(ids) != n or not pa.types.is_string(ids.type):
        raise ValueError(f"ids: {len(ids)} of type {ids.type} for {n} predictions (utf8 wanted)")
    # Each row's bytes (its id's UTF-8 and offset, the other columns), summed from the first: the
    # messages are cut by what their own rows take, long ids bunched together or not. IPC framing
    # and padding are a few hundred bytes a message: the margin keeps them inside the bound.
    ends = np.cumsum(pc.binary_length(ids).to_numpy(zero_copy_only=False).astype(np.int64) + (row_bytes + 4))
    cuts = [0]
    while cuts[-1] < n:
        before = int(ends[cuts[-1] - 1]) if cuts[-1] else 0
        cuts.append(max(cuts[-1] + 1, int(np.searchsorted(ends, before + ARROW_OUTPUT_BYTES - 4096, side="right"))))
    table = pa.table({
        "device_id": ids,
        "ts": pa.array(np.asarray(predictions.ts, dtype=np.float64)),
        "forecast": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(predictions.forecast, dtype=np.float32).reshape(-1)), features),
        "anomaly_score": pa.array(np.asarray(predictions.anomaly_score, dtype=np.float64)),
        "is_anomaly": pa.array(np.asarray(predictions.is_anomaly, dtype=bool)),
        "residual": pa.array(np.asarray(predictions.residual, dtype=np.float32)),
        "model_version": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int8)), pa.array([model_version])),
    })
    values = []
    for start, stop in zip(cuts, cuts[1:]) if n else [(0, 0)]:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(start, stop - start))
        values.append(sink.getvalue().to_pybytes())
    return values


def _json_numbers(column: np.ndarray) -> list[bytes]:
    """Each number of a 1-D float array as JSON text (shortest that reads back exactly; a float32
    as the float64 it widens to). Numbers hold no commas, so one JSON array split on them."""
    return _ENCODER.encode(column.tolist())[1:-1].split(b",")
