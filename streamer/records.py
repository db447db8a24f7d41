"""Boundary types and codecs: bytes from Kafka in, readings or dead letters out; predictions to bytes.

Input value (JSON): {"device_id": str, "ts": epoch seconds | ISO-8601, "values": [float, ...]},
with key = device id; values and ts must be finite, values as float32 (the model's dtype).
Unknown extra fields are ignored. Output value (JSON): {"device_id", "ts" (epoch seconds),
"forecast", "anomaly_score", "is_anomaly", "residual", "model_version"}.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from streamer.engine import PredictionBatch, ReadingBatch

MAX_DEVICE_ID_LENGTH = 256
FLOAT32_MAX = float(np.finfo(np.float32).max)


class DeadLetterReason(StrEnum):
    NOT_JSON = "not_json"
    INVALID_SCHEMA = "invalid_schema"
    WRONG_VALUE_COUNT = "wrong_value_count"
    NON_FINITE = "non_finite"
    KEY_MISMATCH = "key_mismatch"


FiniteFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # strict: no strings, no booleans


class Reading(BaseModel):
    """One sensor reading as it arrives on the input topic."""

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
            except OverflowError:  # JSON integers are unbounded: 10**400 is beyond any float
                value = math.inf
        elif isinstance(raw, str):
            try:
                parsed = datetime.fromisoformat(raw)
            except ValueError:
                raise ValueError(f"ts {raw[:64]!r} is not ISO-8601") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)  # naive times are taken as UTC
            value = parsed.timestamp()
        else:
            raise ValueError(f"ts must be epoch seconds or an ISO-8601 string, got {type(raw).__name__}")
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "ts must be finite")
        return value


@dataclass(frozen=True)
class SourcePosition:
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
        return [
            *self.headers,
            ("streamer.reason", self.reason.value.encode()),
            ("streamer.error", self.detail.encode("utf-8", "replace")[:1024]),
            ("streamer.source.topic", self.source.topic.encode()),
            ("streamer.source.partition", str(self.source.partition).encode()),
            ("streamer.source.offset", str(self.source.offset).encode()),
        ]


@dataclass
class DecodedBatch:
    """Readings that passed validation (offset order) and the dead letters of the rest."""

    readings: ReadingBatch
    positions: list[SourcePosition]  # one per reading
    dead_letters: list[DeadLetter] = field(default_factory=list)


class ReadingDecoder:
    """Validates raw Kafka messages into a ReadingBatch for a model of ``input_size`` features."""

    def __init__(self, input_size: int) -> None:
        self.input_size = input_size

    def decode_one(self, key: bytes | None, value: bytes | None) -> Reading | tuple[DeadLetterReason, str]:
        if value is None:
            return DeadLetterReason.NOT_JSON, "empty message (null value)"
        try:
            reading = Reading.model_validate_json(value)
        except ValidationError as exc:
            return _classify(exc)
        beyond = next((i for i, v in enumerate(reading.values) if abs(v) > FLOAT32_MAX), None)
        if beyond is not None:  # finite as a float64, infinite in the model's float32
            return (
                DeadLetterReason.NON_FINITE,
                f"values.{beyond}: {reading.values[beyond]!r} is beyond float32, the model's dtype",
            )
        if len(reading.values) != self.input_size:
            return (
                DeadLetterReason.WRONG_VALUE_COUNT,
                f"{len(reading.values)} values, the model takes {self.input_size}",
            )
        if key is None:
            return DeadLetterReason.KEY_MISMATCH, "message has no key; the key must be the device id"
        if key != reading.device_id.encode("utf-8"):
            return (
                DeadLetterReason.KEY_MISMATCH,
                f"key {key[:64]!r} != device_id {reading.device_id[:64]!r}",
            )
        return reading

    def decode(self, messages: list) -> DecodedBatch:
        """``messages``: kafka-python ConsumerRecords (topic, partition, offset, key, value, headers)."""
        ids: list[str] = []
        ts: list[float] = []
        values: list[list[float]] = []
        positions: list[SourcePosition] = []
        dead: list[DeadLetter] = []
        for msg in messages:
            result = self.decode_one(msg.key, msg.value)
            position = SourcePosition(msg.topic, msg.partition, msg.offset)
            if isinstance(result, Reading):
                ids.append(result.device_id)
                ts.append(result.ts)
                values.append(result.values)
                positions.append(position)
            else:
                reason, detail = result
                headers = [(k, v if v is not None else b"") for k, v in (msg.headers or [])]
                dead.append(DeadLetter(reason, detail, msg.key, msg.value, headers, position))
        batch = ReadingBatch(
            ids,
            np.asarray(ts, dtype=np.float64),
            np.asarray(values, dtype=np.float32).reshape(len(ids), self.input_size),
            np.fromiter((p.partition for p in positions), dtype=np.int32, count=len(positions)),
        )
        return DecodedBatch(batch, positions, dead)


def _classify(exc: ValidationError) -> tuple[DeadLetterReason, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    detail = f"{where}: {first['msg']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    kinds = {e["type"] for e in errors}
    if kinds & {"json_invalid", "json_type"}:
        return DeadLetterReason.NOT_JSON, detail
    if "finite_number" in kinds:
        return DeadLetterReason.NON_FINITE, detail
    return DeadLetterReason.INVALID_SCHEMA, detail


def encode_predictions(predictions: PredictionBatch, model_version: str) -> list[tuple[bytes, bytes]]:
    """(key, value) per prediction, in order."""
    forecasts = predictions.forecast.tolist()
    scores = predictions.anomaly_score.tolist()
    flags = predictions.is_anomaly.tolist()
    residuals = predictions.residual.tolist()
    ts = predictions.ts.tolist()
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    out = []
    for i, device_id in enumerate(predictions.device_ids):
        body = {
            "device_id": device_id,
            "ts": ts[i],
            "forecast": forecasts[i],
            "anomaly_score": scores[i],
            "is_anomaly": flags[i],
            "residual": residuals[i],
            "model_version": model_version,
        }
        out.append((device_id.encode("utf-8"), dumps(body).encode("utf-8")))
    return out
