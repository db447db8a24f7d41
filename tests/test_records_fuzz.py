"""Fuzzing the decoder: every message becomes exactly one reading or one dead letter, never an exception.

Hypothesis builds batches of messages of four kinds: arbitrary bytes, arbitrary JSON, reading-shaped
objects with arbitrary fields, and near-valid readings with one thing wrong (a field missing or of
the wrong type, a non-finite or out-of-float32 number, a wrong key, a cut or padded payload...).
Near-valid payloads carry the outcome they must have; every batch is checked by ``check_batch``.
``PAYLOADS`` counts the messages decoded, so that the last test can hold this file to MIN_PAYLOADS.
The tests in tests/integration/test_fuzz_pipeline_kafka.py reuse ``bad_payloads`` and ``Payload``.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.records import (
    MAX_ABS_VALUE,
    MAX_DEVICE_ID_LENGTH,
    TS_MAX,
    TS_MIN,
    DeadLetter,
    DeadLetterReason,
    Reading,
    ReadingDecoder,
)

MIN_PAYLOADS = 100_000
PAYLOADS: Counter[str] = Counter()  # messages decoded, per test
FLOAT32_MAX = float(np.finfo(np.float32).max)
FIELDS = ("device_id", "ts", "values")
GOOD = "good"
R = DeadLetterReason

FUZZ = settings(
    deadline=None,
    database=None,  # every run fresh, the payload count its own; a failure prints its reproduce blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@dataclass(frozen=True)
class Message:
    """Stands for a kafka-python ConsumerRecord: the fields the decoder reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Payload:
    """A key and value to decode, with the outcomes allowed for them (GOOD or reasons; None: any)."""

    key: bytes | None
    value: bytes | None
    expect: frozenset | None = None
    kind: str = "?"


# Text: any code point, lone surrogates and a few characters that break naive code.
odd_chars = st.sampled_from(["\x00", "\x1f", "\x7f", "\u0301", "\u2028", "\u202e", "\ufeff", "\ufffd", "😀", '"', "\\"])
clean_chars = st.one_of(st.characters(codec="utf-8"), odd_chars)  # every code point but lone surrogates
clean_text = st.text(clean_chars, max_size=20)
any_text = st.text(st.one_of(clean_chars, st.characters(categories=["Cs"])), max_size=20)

# Numbers: 10**k for k up to 1000 exceeds float64 (k > 308) and float32 (k > 38) but stays within
# the 4300 digits Python's json writes.
signs = st.sampled_from([1, -1])
powers_of_ten = st.builds(lambda sign, k: sign * 10**k, signs, st.integers(0, 1000))
json_numbers = st.one_of(st.integers(), powers_of_ten, st.floats())  # nan, inf, -0.0, subnormal, 1.7e308


@dataclass(frozen=True)
class JsonKinds:
    """JSON values by kind, arrays and objects nested two deep. Drawn without filters or
    st.recursive, both several times slower to draw here."""

    scalars: st.SearchStrategy  # null, booleans, numbers
    text: st.SearchStrategy[str]
    arrays: st.SearchStrategy[list]
    objects: st.SearchStrategy[dict]

    @classmethod
    def over(cls, text: st.SearchStrategy[str]) -> "JsonKinds":
        scalars = st.one_of(st.none(), st.booleans(), json_numbers)

        def arrays(kids: st.SearchStrategy) -> st.SearchStrategy[list]:
            return st.lists(kids, max_size=3)

        def objects(kids: st.SearchStrategy) -> st.SearchStrategy[dict]:
            return st.lists(st.tuples(text, kids), max_size=3).map(dict)

        leaves = st.one_of(scalars, text)
        inner = st.one_of(leaves, arrays(leaves), objects(leaves))
        return cls(scalars, text, arrays(inner), objects(inner))

    def values(self) -> st.SearchStrategy:
        return st.one_of(self.scalars, self.text, self.arrays, self.objects)


clean = JsonKinds.over(clean_text)  # JSON that parses: jiter refuses lone surrogates
clean_json = clean.values()
any_json = JsonKinds.over(any_text).values()

# Serialisation: lone surrogates become \udXXX escapes (ascii) or invalid UTF-8 bytes (the others).
STYLES = ("ascii", "compact", "pretty")
RAW = "@@raw-literal-7f3a@@"  # stands in the object for a literal json.dumps cannot write (1e400)


def dump(obj: object, style: str, raw: bytes | None = None) -> bytes:
    if style == "ascii":
        data = json.dumps(obj).encode()
    else:
        layout = {"indent": 2} if style == "pretty" else {"separators": (",", ":")}
        data = json.dumps(obj, ensure_ascii=False, **layout).encode("utf-8", "surrogatepass")
    return data if raw is None else data.replace(json.dumps(RAW).encode(), raw)


# A good reading's parts.
def repeat_to(length: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    """Text of exactly ``length`` code points, cheaply (a short piece repeated)."""
    return st.builds(lambda piece, n: (piece * n)[:n], st.text(clean_chars, min_size=1, max_size=3), length)


device_ids = st.one_of(
    st.integers(0, 999_999).map(lambda n: f"dev-{n}"),
    st.text(clean_chars, min_size=1, max_size=24),
    repeat_to(st.just(MAX_DEVICE_ID_LENGTH)),
)
offsets = st.builds(
    timezone, st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))
)
ISO_STYLES: dict[str, Callable[[datetime], str]] = {
    "T": datetime.isoformat,
    "space": lambda dt: dt.isoformat(sep=" "),
    "ms": lambda dt: dt.isoformat(timespec="milliseconds"),
    "minutes": lambda dt: dt.isoformat(timespec="minutes"),
    "date": lambda dt: dt.date().isoformat(),
    "Z": lambda dt: dt.replace(tzinfo=None).isoformat() + "Z",
}
iso_times = st.builds(
    lambda dt, style: ISO_STYLES[style](dt),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.none() | offsets),
    st.sampled_from(sorted(ISO_STYLES)),
)
good_ts = st.one_of(st.integers(int(TS_MIN), int(TS_MAX)), st.floats(TS_MIN, TS_MAX), iso_times)  # years 1 to 9999
finite32 = st.one_of(
    st.floats(-MAX_ABS_VALUE, MAX_ABS_VALUE).map(lambda x: float(np.float32(x))),  # -0.0, subnormals
    st.sampled_from([MAX_ABS_VALUE, -MAX_ABS_VALUE]),
    st.floats(-1e6, 1e6),
    st.integers(-(2**31), 2**31),
)


def value_lists(n: int) -> st.SearchStrategy[list]:
    return st.lists(finite32, min_size=n, max_size=n)


keys = st.one_of(st.none(), st.binary(max_size=24), clean_text.map(lambda s: s.encode()))
headers = st.lists(st.tuples(st.text(max_size=8), st.none() | st.binary(max_size=8)), max_size=2)


def outcome(*allowed) -> frozenset:
    return frozenset(allowed)


def iso_outcome(text: str) -> frozenset:
    """GOOD when ``text`` is an ISO-8601 time (what Python's datetime reads), else INVALID_SCHEMA."""
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return outcome(R.INVALID_SCHEMA)
    return outcome(GOOD)


def key_outcome(key: bytes | None, device_id: str) -> frozenset:
    return outcome(GOOD if key == device_id.encode() else R.KEY_MISMATCH)


# Bad (or odd) replacements, by where they go.
non_strings = st.one_of(clean.scalars, clean.arrays, clean.objects)
non_lists = st.one_of(clean.scalars, clean.text, clean.objects)
containers_or_null = st.one_of(st.none(), st.booleans(), clean.arrays, clean.objects)
garbage_ts = st.one_of(
    clean_text,
    json_numbers.map(str),  # "1700000000" is not ISO-8601
    st.builds(lambda s, at, junk: s[:at] + junk + s[at:], iso_times, st.integers(0, 40), clean_text),
)
non_finite_ts = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.builds(lambda sign, k: sign * 10**k, signs, st.integers(309, 1000)),
)
huge_finite_ts = st.one_of(
    st.sampled_from([1e308, -1e308, 1.7976931348623157e308, TS_MAX + 1, TS_MIN - 1]),
    st.builds(lambda sign, k: sign * 10**k, signs, st.integers(12, 308)),
    st.integers(10**12, 10**19),  # epoch milliseconds to nanoseconds
)
# Finite in float32, beyond what streamer's float32 statistics hold.
out_of_range = st.one_of(
    st.builds(lambda sign, x: sign * x, signs, st.floats(MAX_ABS_VALUE, FLOAT32_MAX, exclude_min=True)),
    st.builds(lambda sign, k: sign * 10**k, signs, st.integers(19, 38)),
)
beyond_float32 = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.builds(lambda sign, k: sign * 10**k, signs, st.integers(39, 1000)),  # ints: exact, no rounding
    st.builds(lambda sign, x: sign * x, signs, st.floats(3.5e38, 1.7976931348623157e308)),
)
RAW_BEYOND_FLOAT64 = [b"1e400", b"-1e400", b"1.5e99999", b"-2E+309"]
BAD_UTF8 = [b"\xff", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00", b"\n", b"\x1f"]
JSON_WHITESPACE = b" \t\r\n"
MUTATIONS = (
    "none", "extra_fields", "missing_field", "device_id_type", "device_id_length", "ts_type", "ts_string",
    "ts_non_finite", "ts_raw_beyond_float64", "ts_huge_finite", "values_type", "values_empty", "values_count",
    "values_element_type", "values_non_finite", "values_out_of_range", "values_raw_beyond_float64", "values_underflow", "key_none",
    "key_other", "key_other_encoding", "not_an_object", "truncated", "trailing_bytes", "leading_whitespace",
    "bom", "invalid_utf8", "lone_surrogate",
)  # fmt: skip


@st.composite
def near_valid(draw, input_size: int, mutations: tuple[str, ...] = MUTATIONS) -> Payload:
    """A good reading with at most one thing wrong, and the outcome that thing must lead to."""
    device_id = draw(device_ids)
    obj: object = {"device_id": device_id, "ts": draw(good_ts), "values": draw(value_lists(input_size))}
    key: bytes | None = device_id.encode()
    style = draw(st.sampled_from(STYLES))
    raw: bytes | None = None
    expect = outcome(GOOD)
    mutation = draw(st.sampled_from(mutations))
    values = obj["values"]
    match mutation:
        case "none":
            pass
        case "extra_fields":  # ignored: still a good reading, whatever the order of the fields
            extra = draw(st.lists(st.tuples(clean_text, clean_json), min_size=1, max_size=3))
            extra = [(name + "_" if name in FIELDS else name, value) for name, value in extra]
            obj = dict(draw(st.permutations([*obj.items(), *extra])))
        case "missing_field":
            del obj[draw(st.sampled_from(FIELDS))]
            expect = outcome(R.INVALID_SCHEMA)
        case "device_id_type":
            obj["device_id"] = draw(non_strings)
            expect = outcome(R.INVALID_SCHEMA)
        case "device_id_length":
            obj["device_id"] = draw(st.just("") | repeat_to(st.integers(MAX_DEVICE_ID_LENGTH + 1, 300)))
            key = obj["device_id"].encode()
            expect = outcome(R.INVALID_SCHEMA)
        case "ts_type":
            obj["ts"] = draw(containers_or_null)
            expect = outcome(R.INVALID_SCHEMA)
        case "ts_string":
            obj["ts"] = draw(garbage_ts)
            expect = iso_outcome(obj["ts"])
        case "ts_non_finite":  # 10**400: an int no float holds
            obj["ts"] = draw(non_finite_ts)
            expect = outcome(R.NON_FINITE)
        case "ts_raw_beyond_float64":
            obj["ts"], raw = RAW, draw(st.sampled_from(RAW_BEYOND_FLOAT64))
            expect = outcome(R.NON_FINITE)
        case "ts_huge_finite":  # finite, past year 9999 or before year 1 as epoch seconds (ms, ns, ...)
            obj["ts"] = draw(huge_finite_ts)
            expect = outcome(R.OUT_OF_RANGE)
        case "values_type":
            obj["values"] = draw(non_lists)
            expect = outcome(R.INVALID_SCHEMA)
        case "values_empty":
            obj["values"] = []
            expect = outcome(R.INVALID_SCHEMA)
        case "values_count":
            count = draw(st.sampled_from([n for n in range(1, input_size + 7) if n != input_size]))
            obj["values"] = draw(value_lists(count))
            expect = outcome(R.WRONG_VALUE_COUNT)
        case "values_element_type":  # booleans, null, "1.5", [1.5], {}: strict, no coercion
            at = draw(st.integers(0, input_size - 1))
            values[at] = draw(st.one_of(containers_or_null, st.just(str(values[at])), clean_text))
            expect = outcome(R.INVALID_SCHEMA)
        case "values_non_finite":  # the model computes in float32: beyond its range is not finite
            values[draw(st.integers(0, input_size - 1))] = draw(beyond_float32)
            expect = outcome(R.NON_FINITE)
        case "values_out_of_range":
            values[draw(st.integers(0, input_size - 1))] = draw(out_of_range)
            expect = outcome(R.OUT_OF_RANGE)
        case "values_raw_beyond_float64":
            values[draw(st.integers(0, input_size - 1))] = RAW
            raw = draw(st.sampled_from(RAW_BEYOND_FLOAT64))
            expect = outcome(R.NON_FINITE)
        case "values_underflow":  # rounds to (signed) zero: a good reading
            values[draw(st.integers(0, input_size - 1))] = RAW
            raw = draw(st.sampled_from([b"1e-400", b"-4.9e-325", b"1e-46"]))
        case "key_none":
            key = None
            expect = outcome(R.KEY_MISMATCH)
        case "key_other":
            key = draw(keys)
            expect = outcome(R.KEY_MISMATCH) if key is None else key_outcome(key, device_id)
        case "key_other_encoding":  # the same id, other bytes: only UTF-8 names the device
            how = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "NFD", "NFC"]))
            if how in ("NFD", "NFC"):
                key = unicodedata.normalize(how, device_id).encode()
            else:
                key = device_id.encode(how, "replace")
            expect = key_outcome(key, device_id)
        case "not_an_object":
            obj = draw(st.one_of(clean.scalars, clean.text, clean.arrays, st.just([obj])))
            expect = outcome(R.INVALID_SCHEMA)
        case "lone_surrogate":  # jiter refuses lone surrogates, escaped or as bytes
            where = draw(st.sampled_from(["device_id", "extra"]))
            text = draw(clean_text) + draw(st.characters(categories=["Cs"])) + draw(clean_text)
            if where == "device_id":
                obj["device_id"] = text
                key = text.encode("utf-8", "surrogatepass")
            else:
                obj["note"] = text
            expect = outcome(R.NOT_JSON)
    data = dump(obj, style, raw)
    match mutation:
        case "truncated":  # a proper prefix of an object is never JSON
            data = data[: draw(st.integers(0, len(data) - 1))]
            expect = outcome(R.NOT_JSON)
        case "trailing_bytes":
            suffix = draw(st.binary(min_size=1, max_size=8))
            data += suffix
            expect = outcome(GOOD) if all(b in JSON_WHITESPACE for b in suffix) else outcome(R.NOT_JSON)
        case "leading_whitespace":
            data = draw(st.text(" \t\r\n", min_size=1, max_size=4)).encode() + data
        case "bom":
            data = b"\xef\xbb\xbf" + data
            expect = outcome(R.NOT_JSON)
        case "invalid_utf8":  # bytes that are not UTF-8, or raw control characters, inside a string
            at = data.index(b'"device_id"') + len('"device_id"')
            quote = data.index(b'"', at) + 1
            data = data[:quote] + draw(st.sampled_from(BAD_UTF8)) + data[quote:]
            expect = outcome(R.NOT_JSON)
    return Payload(key, data, expect, mutation)


@st.composite
def reading_shaped(draw, input_size: int) -> Payload:
    """An object with some of the reading's fields, each good or arbitrary, plus arbitrary others."""
    fields = {
        "device_id": st.one_of(device_ids, any_json),
        "ts": st.one_of(good_ts, any_json),
        "values": st.one_of(value_lists(input_size), st.lists(st.one_of(finite32, any_json), max_size=input_size + 2), any_json),
    }
    obj = dict(draw(st.lists(st.tuples(any_text, any_json), max_size=2)))
    obj.update(draw(st.fixed_dictionaries({}, optional=fields)))
    device_id = obj.get("device_id")
    key = draw(keys)
    if isinstance(device_id, str) and draw(st.booleans()):
        key = device_id.encode("utf-8", "surrogatepass")
    return Payload(key, dump(obj, draw(st.sampled_from(STYLES))), None, "reading_shaped")


arbitrary_bytes = st.builds(
    Payload, keys, st.none() | st.binary(max_size=200) | st.sampled_from([b"", b"{}", b"null", b"[]", b"{", b'"']),
    kind=st.just("bytes"),
)
arbitrary_json = st.builds(
    lambda key, value, style: Payload(key, dump(value, style), None, "json"), keys, any_json, st.sampled_from(STYLES)
)


GOOD_MUTATIONS = ("none", "extra_fields", "values_underflow", "leading_whitespace")


def bad_payloads(input_size: int) -> st.SearchStrategy[Payload]:
    """Payloads of every kind the decoder must refuse (or, for the arbitrary ones, may refuse)."""
    return st.one_of(
        arbitrary_bytes,
        arbitrary_json,
        reading_shaped(input_size),
        near_valid(input_size, tuple(m for m in MUTATIONS if m not in GOOD_MUTATIONS)),
    )


def read_independently(key: bytes | None, value: bytes, input_size: int) -> tuple[str, float, list[float]]:
    """A good reading as Python's json reads it, asserting the contract: an object whose device_id
    is the key, with input_size numbers that fit a float32 and a finite ts."""
    obj = json.loads(value.decode("utf-8"))
    assert isinstance(obj, dict)
    device_id, ts, values = obj["device_id"], obj["ts"], obj["values"]
    assert isinstance(device_id, str) and 1 <= len(device_id) <= MAX_DEVICE_ID_LENGTH
    assert key == device_id.encode("utf-8")
    assert isinstance(values, list) and len(values) == input_size
    for v in values:
        assert isinstance(v, int | float) and not isinstance(v, bool) and abs(v) <= MAX_ABS_VALUE, v
    assert not isinstance(ts, bool)
    if isinstance(ts, str):
        parsed = datetime.fromisoformat(ts)
        seconds = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    else:
        assert isinstance(ts, int | float)
        seconds = float(ts)
    assert math.isfinite(seconds)
    return device_id, seconds, [float(v) for v in values]


def check_headers(letter: DeadLetter, original: list[tuple[str, bytes | None]]) -> None:
    out = letter.kafka_headers()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in out)
    assert out[: len(original)] == [(k, b"" if v is None else v) for k, v in original]
    ours = dict(out[len(original) :])
    assert ours["streamer.reason"].decode() in {r.value for r in DeadLetterReason}
    assert 0 < len(ours["streamer.error"]) <= 1024
    source = letter.source
    assert ours["streamer.source.topic"] == source.topic.encode()
    assert (int(ours["streamer.source.partition"]), int(ours["streamer.source.offset"])) == (source.partition, source.offset)


def check_batch(test: str, input_size: int, payloads: list[Payload], message_headers: list) -> None:
    """Decode ``payloads`` as one batch and check every property of the decoder's contract."""
    PAYLOADS[test] += len(payloads)
    decoder = ReadingDecoder(input_size)
    messages = [
        Message("in", i % 3, 1000 + i, p.key, p.value, message_headers[i % len(message_headers)])
        for i, p in enumerate(payloads)
    ]
    decoded = decoder.decode(messages)
    outcomes = [decoder.decode_one(m.key, m.value) for m in messages]

    # Each message is exactly one reading or one dead letter, in offset order, with its position.
    good = [m for m, o in zip(messages, outcomes) if isinstance(o, Reading)]
    bad = [(m, o) for m, o in zip(messages, outcomes) if not isinstance(o, Reading)]
    readings = decoded.readings
    assert len(readings) + len(decoded.dead_letters) == len(messages)
    assert [(p.partition, p.offset) for p in decoded.positions] == [(m.partition, m.offset) for m in good]
    assert readings.partitions.tolist() == [m.partition for m in good]
    assert [(d.source.partition, d.source.offset) for d in decoded.dead_letters] == [(m.partition, m.offset) for m, _ in bad]

    # Outcomes known in advance.
    for payload, result in zip(payloads, outcomes):
        got = GOOD if isinstance(result, Reading) else result[0]
        assert payload.expect is None or got in payload.expect, (payload, result)

    # Dead letters: a reason, a detail, the original bytes and headers.
    for letter, (message, (reason, detail)) in zip(decoded.dead_letters, bad):
        assert isinstance(letter.reason, DeadLetterReason) and letter.reason is reason
        assert isinstance(detail, str) and detail.strip() and letter.detail == detail
        assert (letter.key, letter.value) == (message.key, message.value)
        assert type(letter.key) is type(message.key) and type(letter.value) is type(message.value)
        check_headers(letter, message.headers)

    # Readings: what the JSON says, finite, float32-exact.
    assert readings.values.dtype == np.float32 and readings.values.shape == (len(good), input_size)
    assert readings.ts.dtype == np.float64 and readings.ts.shape == (len(good),)
    assert np.isfinite(readings.values).all() and np.isfinite(readings.ts).all()
    for row, message in enumerate(good):
        device_id, ts, values = read_independently(message.key, message.value, input_size)
        assert readings.device_ids[row] == device_id and readings.ts[row] == ts
        assert readings.values[row].tobytes() == np.asarray(values, dtype=np.float32).tobytes()

    # Good readings come out the same whatever surrounds them: alone, and all good ones together.
    together = decoder.decode(good)
    assert not together.dead_letters and together.readings.device_ids == readings.device_ids
    assert together.readings.ts.tobytes() == readings.ts.tobytes()
    assert together.readings.values.tobytes() == readings.values.tobytes()
    for row, message in enumerate(good):
        alone = decoder.decode([message]).readings
        assert alone.device_ids == [readings.device_ids[row]]
        assert alone.ts.tobytes() == readings.ts[row : row + 1].tobytes()
        assert alone.values.tobytes() == readings.values[row : row + 1].tobytes()


input_sizes = st.integers(1, 4)
BATCH = {"min_size": 30, "max_size": 40}  # examples x 30 >= MIN_PAYLOADS whatever sizes Hypothesis picks
BATCHES: dict[str, tuple[Callable[[int], st.SearchStrategy[Payload]], int]] = {
    # kind: (payloads for a model of n features, examples)
    "arbitrary_bytes": (lambda n: arbitrary_bytes, 1000),
    "arbitrary_json": (lambda n: arbitrary_json, 800),
    "reading_shaped": (reading_shaped, 300),
    "near_valid": (near_valid, 900),
    "good_among_bad": (lambda n: st.one_of(near_valid(n, GOOD_MUTATIONS), bad_payloads(n)), 400),
}


@pytest.mark.parametrize("kind", list(BATCHES))
def test_decode_batches(kind: str) -> None:
    payloads_for, examples = BATCHES[kind]

    @settings(FUZZ, max_examples=examples)
    @given(st.data())
    def decode_batch(data: st.DataObject) -> None:
        input_size = data.draw(input_sizes, label="input_size")
        payloads = data.draw(st.lists(payloads_for(input_size), **BATCH), label="payloads")
        check_batch(kind, input_size, payloads, data.draw(st.lists(headers, min_size=1, max_size=3), label="headers"))

    decode_batch()


def test_payload_total(capsys: pytest.CaptureFixture) -> None:
    """Runs last in this file: the fuzz tests above decoded at least MIN_PAYLOADS messages."""
    if set(PAYLOADS) != set(BATCHES):
        pytest.skip(f"only {sorted(PAYLOADS)} of the fuzz tests ran")
    total = sum(PAYLOADS.values())
    with capsys.disabled():
        print(f"\nfuzzed payloads: {total} ({', '.join(f'{k} {v}' for k, v in sorted(PAYLOADS.items()))})")
    assert total >= MIN_PAYLOADS, PAYLOADS
