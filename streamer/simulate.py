"""A simulated fleet of sensors: daily cycles, noise and labelled injected anomalies, to Kafka.

Device i is ``sensor-{i:05d}``. Its parameters (base level, daily amplitude, phase, a weaker
second harmonic, per-feature variations) are drawn once from the spec's seed, so ``history``
(clean training data) and ``Fleet`` (the live stream, with anomalies) are the same process.
The clean signal of device d, feature f at step k is

    base[d, f] + amp[d, f] * (sin(2 pi k / period + phase[d, f])
                              + harmonic[d] * sin(4 pi k / period + phase2[d]))

plus gaussian noise with standard deviation ``noise * amp[d, f]``. ``history(spec, n)`` covers
steps -n..-1, the readings just before the live fleet's step 0.

Everything is deterministic given the seed: separate random streams are used for the device
parameters, the history noise, the live noise and the anomalies.
"""

from __future__ import annotations

import gc
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import msgspec
import numpy as np

from streamer.errors import StreamerError
from streamer.kafka.abstract import KafkaClientError, Producer
from streamer.records import ARROW_CONTENT_TYPE, CONTENT_TYPE_HEADER, Reading, encode_arrow_readings

ANOMALY_KINDS = ("spike", "level_shift", "dropout")

MessageFormat = Literal["json", "arrow"]
MESSAGE_FORMATS: tuple[MessageFormat, ...] = ("json", "arrow")
DEFAULT_BATCH_ROWS = 1000
FLUSH_TIMEOUT_S = 60.0  # for the last sends' acknowledgements
ARROW_HEADERS = [(CONTENT_TYPE_HEADER, ARROW_CONTENT_TYPE)]

# Independent random streams under one seed (numpy SeedSequence entropy [seed, stream]).
_PARAMS_STREAM, _HISTORY_STREAM, _LIVE_NOISE_STREAM, _ANOMALY_STREAM = 0, 1, 2, 3

# Anomaly shapes, in units of the device's daily amplitude.
SPIKE_OFFSET = (6.0, 10.0)  # one reading offset by +-U(6, 10) * amp
LEVEL_SHIFT_OFFSET = (4.0, 6.0)  # U(4, 6) * amp, sign random
LEVEL_SHIFT_LENGTH = (5, 20)  # readings, inclusive
DROPOUT_LENGTH = (3, 12)  # readings, inclusive


class SimulationError(StreamerError):
    """The simulator could not deliver its readings to Kafka."""

    def __init__(self, topic: str, reason: str, failed: int = 0) -> None:
        super().__init__(f"simulator -> topic {topic!r}: {reason}")
        self.topic = topic
        self.reason = reason
        self.failed = failed


@dataclass(frozen=True)
class FleetSpec:
    """devices sensors with features values each; period readings per simulated day (288 = 5 min)."""

    devices: int
    features: int = 1
    seed: int = 0
    period: int = 288
    noise: float = 0.05  # noise standard deviation, as a fraction of the daily amplitude
    anomaly_rate: float = 0.002  # probability per reading that an anomaly starts

    def __post_init__(self) -> None:
        for name in ("devices", "features", "period"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FleetSpec.{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"FleetSpec.seed must be a non-negative int, got {self.seed!r}")
        if not 0.0 <= self.anomaly_rate <= 1.0:
            raise ValueError(f"FleetSpec.anomaly_rate must be in [0, 1], got {self.anomaly_rate!r}")
        if not self.noise >= 0.0:  # also rejects NaN
            raise ValueError(f"FleetSpec.noise must be >= 0, got {self.noise!r}")


@dataclass(frozen=True)
class SimReading:
    """One reading of one device. values: (features,) float; anomaly: the injected kind or None."""

    device_id: str
    step: int
    values: list[float]
    anomaly: str | None


@dataclass(frozen=True)
class SimulationSummary:
    readings: int
    anomalies: int  # readings labelled with an anomaly kind
    devices: int
    seconds: float


def device_id(index: int) -> str:
    return f"sensor-{index:05d}"


def gateway_id(index: int) -> str:
    """The key of gateway ``index``'s batch messages: devices index*batch_rows.. of the fleet."""
    return f"gateway-{index:05d}"


@dataclass(frozen=True)
class _DeviceParams:
    """Per-device, per-feature parameters; arrays are (devices, features) unless noted."""

    base: np.ndarray
    amp: np.ndarray
    phase: np.ndarray
    harmonic: np.ndarray  # (devices, 1): second-harmonic amplitude relative to the first
    phase2: np.ndarray  # (devices, 1)


def _rng(spec: FleetSpec, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, stream])


def _device_params(spec: FleetSpec) -> _DeviceParams:
    rng = _rng(spec, _PARAMS_STREAM)
    d, f = spec.devices, spec.features
    base = rng.uniform(10.0, 50.0, size=(d, 1)) * rng.uniform(0.8, 1.2, size=(d, f))
    amp = rng.uniform(2.0, 10.0, size=(d, 1)) * rng.uniform(0.7, 1.3, size=(d, f))
    # Keep the clean signal positive (a plausible sensor range): its swing is at most 1.3 * amp.
    amp = np.minimum(amp, 0.4 * base)
    phase = rng.uniform(0.0, 2 * np.pi, size=(d, 1)) + rng.uniform(-0.5, 0.5, size=(d, f))
    harmonic = rng.uniform(0.1, 0.3, size=(d, 1))
    phase2 = rng.uniform(0.0, 2 * np.pi, size=(d, 1))
    return _DeviceParams(base, amp, phase, harmonic, phase2)


def _clean(params: _DeviceParams, steps: np.ndarray, period: int) -> np.ndarray:
    """Noise-free signal at the given steps: (devices, len(steps), features) float64."""
    angle = 2 * np.pi * np.asarray(steps, dtype=np.float64)[None, :, None] / period
    first = np.sin(angle + params.phase[:, None, :])
    second = params.harmonic[:, None, :] * np.sin(2 * angle + params.phase2[:, None, :])
    return params.base[:, None, :] + params.amp[:, None, :] * (first + second)


def history(spec: FleetSpec, steps: int) -> np.ndarray:
    """Clean readings of every device at steps -steps..-1: (devices, steps, features) float32.

    No anomalies are injected. Same device parameters as ``Fleet(spec)``, independent noise.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"history steps must be a non-negative int, got {steps!r}")
    params = _device_params(spec)
    clean = _clean(params, np.arange(-steps, 0), spec.period)
    noise = _rng(spec, _HISTORY_STREAM).standard_normal(clean.shape)
    return (clean + noise * (spec.noise * params.amp[:, None, :])).astype(np.float32)


class Fleet:
    """The live fleet: each ``next_round`` gives one reading per device, step 0, 1, 2, ...

    An anomaly starts on a device's reading with probability ``spec.anomaly_rate`` when none is
    in progress there; every reading it touches carries its kind:
    - spike: one reading offset by +-U(6, 10) * amp;
    - level_shift: 5..20 readings offset by +-U(4, 6) * amp (one offset for the run);
    - dropout: 3..12 readings stuck at 0, or at the last reading before the dropout.
    An anomaly offsets or replaces every feature of the reading.
    """

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.device_ids = [device_id(i) for i in range(spec.devices)]
        self._params = _device_params(spec)
        self._noise_rng = _rng(spec, _LIVE_NOISE_STREAM)
        self._anomaly_rng = _rng(spec, _ANOMALY_STREAM)
        self.step = 0  # the step the next round will carry
        d, f = spec.devices, spec.features
        self._kind: list[str | None] = [None] * d  # anomaly in progress per device
        self._remaining = np.zeros(d, dtype=np.int64)  # readings it still covers
        self._offset = np.zeros((d, f))  # level_shift offset
        self._stuck = np.zeros((d, f))  # dropout value
        self._last = np.zeros((d, f))  # last reading emitted, for a stuck dropout

    @property
    def amplitude(self) -> np.ndarray:
        """(devices, features) daily amplitude, the unit anomalies and noise are scaled by."""
        return self._params.amp.copy()

    def clean(self, step: int) -> np.ndarray:
        """Noise-free, anomaly-free signal at ``step``: (devices, features) float64."""
        return _clean(self._params, np.array([step]), self.spec.period)[:, 0, :]

    def next_round(self) -> list[SimReading]:
        """One reading per device, in device order, all at step ``self.step``; advances the step."""
        spec, params = self.spec, self._params
        step = self.step
        values = self.clean(step) + self._noise_rng.standard_normal(params.amp.shape) * (spec.noise * params.amp)
        labels = self._inject(values)
        self._last = values
        self.step += 1
        return [
            SimReading(device, step, row, label)
            for device, row, label in zip(self.device_ids, values.tolist(), labels, strict=True)
        ]

    def _inject(self, values: np.ndarray) -> list[str | None]:
        """Start new anomalies, apply the ones in progress to ``values`` in place; labels per device."""
        rng, amp = self._anomaly_rng, self._params.amp
        d = self.spec.devices
        # Draw the same amount of randomness every round, so a round's draws do not depend on
        # which devices happen to be in an anomaly.
        starts = rng.random(d) < self.spec.anomaly_rate
        kind_pick = rng.integers(0, len(ANOMALY_KINDS), size=d)
        sign = np.where(rng.random(d) < 0.5, -1.0, 1.0)
        spike = rng.uniform(*SPIKE_OFFSET, size=d)
        shift = rng.uniform(*LEVEL_SHIFT_OFFSET, size=d)
        shift_len = rng.integers(LEVEL_SHIFT_LENGTH[0], LEVEL_SHIFT_LENGTH[1] + 1, size=d)
        drop_len = rng.integers(DROPOUT_LENGTH[0], DROPOUT_LENGTH[1] + 1, size=d)
        drop_zero = rng.random(d) < 0.5

        labels: list[str | None] = [None] * d
        idle = self._remaining == 0
        for i in np.flatnonzero(starts & idle).tolist():
            kind = ANOMALY_KINDS[kind_pick[i]]
            self._kind[i] = kind
            if kind == "spike":
                self._remaining[i] = 1
                self._offset[i] = sign[i] * spike[i] * amp[i]
            elif kind == "level_shift":
                self._remaining[i] = shift_len[i]
                self._offset[i] = sign[i] * shift[i] * amp[i]
            else:
                self._remaining[i] = drop_len[i]
                # Before the first round there is no last reading: stuck at 0 then.
                self._stuck[i] = 0.0 if drop_zero[i] or self.step == 0 else self._last[i]
        for i in np.flatnonzero(self._remaining > 0).tolist():
            kind = self._kind[i]
            if kind == "dropout":
                values[i] = self._stuck[i]
            else:
                values[i] += self._offset[i]
            labels[i] = kind
            self._remaining[i] -= 1
            if self._remaining[i] == 0:
                self._kind[i] = None
        return labels


_Outgoing = tuple[bytes, bytes, list[tuple[str, bytes]] | None, float, list[SimReading]]  # key, value, headers, ts, readings


_encode_json = msgspec.json.Encoder().encode


def _json_message(reading: SimReading) -> _Outgoing:
    ts = time.time()
    value = _encode_json(Reading(reading.device_id, ts, reading.values))  # {"device_id", "ts", "values"}
    return reading.device_id.encode(), value, None, ts, [reading]


def _batch_message(readings: list[SimReading], gateway: str, features: int) -> _Outgoing:
    ts = time.time()
    values = np.array([r.values for r in readings]).reshape(len(readings), features)
    value = encode_arrow_readings([r.device_id for r in readings], np.full(len(readings), ts), values)
    return gateway.encode(), value, ARROW_HEADERS, ts, readings


def run_simulator(
    producer: Producer,
    topic: str,
    spec: FleetSpec,
    rate: float,
    duration_s: float | None = None,
    max_readings: int | None = None,
    labels_path: str | Path | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, float], None] | None = None,
    progress_interval_s: float = 5.0,
    message_format: MessageFormat = "json",
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> SimulationSummary:
    """Produce the fleet's readings to ``topic`` at ``rate`` readings/s overall (<= 0: unpaced).

    ``message_format`` "json": one message per reading, key = device_id (utf-8), value = JSON
    ``{"device_id", "ts", "values"}`` with ts the emission time (time.time(), epoch seconds).
    "arrow": batch messages (streamer.records): the fleet is split into gateways of
    ``batch_rows`` consecutive devices, and every round each gateway sends one message with one
    reading of each of its devices, key = gateway_id(g), header content-type
    application/vnd.apache.arrow.stream, ts the message's emission time. Rounds are emitted in
    device order, one round after another, in chunks of about 20 ms worth of readings (json) or
    one message at a time (arrow), so the rate holds to within one chunk. Stops after
    ``duration_s`` seconds, after ``max_readings`` readings, or when ``stop`` is set, whichever comes first; at least one of duration_s and max_readings is needed.
    If ``labels_path`` is given, it is overwritten with one JSON line
    ``{"device_id", "ts", "step", "kind"}`` per anomalous reading sent (ts as in the message).
    ``producer``: any client behind the seam (streamer.kafka.open_producer; not transactional).
    It is flushed before returning, not closed; any failed send raises SimulationError.
    ``progress(readings sent, seconds since the start)`` is called about every ``progress_interval_s``.
    """
    if duration_s is None and max_readings is None:
        raise ValueError("run_simulator needs duration_s or max_readings (or both), got neither")
    if math.isnan(rate) or math.isinf(rate):
        raise ValueError(f"rate must be a finite number of readings/s (<= 0: unpaced), got {rate!r}")
    if not progress_interval_s > 0:
        raise ValueError(f"progress_interval_s must be > 0, got {progress_interval_s!r}")
    if duration_s is not None and not duration_s >= 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s!r}")
    if max_readings is not None and max_readings < 0:
        raise ValueError(f"max_readings must be >= 0, got {max_readings!r}")
    if message_format not in MESSAGE_FORMATS:
        raise ValueError(f"message_format must be one of {MESSAGE_FORMATS}, got {message_format!r}")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")

    labels_file: IO[str] | None = open(labels_path, "w", encoding="utf-8") if labels_path is not None else None
    failures: list[BaseException] = []
    fleet = Fleet(spec)
    # What exists now (the fleet, the client, imported modules) lives as long as the loop: out of
    # the collector's sight, the collections that a round's many small objects set off stay cheap
    # (a round of 5,000 devices took 4x as long with them).
    gc.freeze()
    # Pace in chunks of about 20 ms worth of readings: sleep between chunks, not between messages.
    # A batch message is a chunk of its own: gateway g's devices start at g * batch_rows, and every
    # chunk starts at a gateway's first device, so each device is always sent under one key.
    chunk = max(1, int(rate * 0.02)) if rate > 0 else spec.devices
    if message_format == "arrow":
        chunk = batch_rows
    sent = anomalies = 0
    start = time.monotonic()
    deadline = start + duration_s if duration_s is not None else None
    next_progress = start + progress_interval_s
    error: SimulationError | None = None
    try:
        round_: list[SimReading] = []
        pos = 0
        while max_readings is None or sent < max_readings:
            if stop is not None and stop.is_set():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if pos == len(round_):
                round_, pos = fleet.next_round(), 0
            n = min(chunk, len(round_) - pos)
            if max_readings is not None:
                n = min(n, max_readings - sent)
            if message_format == "arrow":
                messages = [_batch_message(round_[pos : pos + n], gateway_id(pos // batch_rows), spec.features)]
            else:
                messages = [_json_message(reading) for reading in round_[pos : pos + n]]
            for key, value, headers, ts, readings in messages:
                try:
                    producer.produce(topic, key, value, headers)
                except KafkaClientError as exc:
                    raise SimulationError(topic, f"send failed after {sent} readings: {exc}") from exc
                sent += len(readings)
                labelled = [r for r in readings if r.anomaly is not None]
                anomalies += len(labelled)
                if labels_file is not None:
                    for reading in labelled:
                        label = {"device_id": reading.device_id, "ts": ts, "step": reading.step, "kind": reading.anomaly}
                        labels_file.write(json.dumps(label) + "\n")
            pos += n
            if time.monotonic() >= next_progress:
                failures += producer.delivery_failures()  # and the producer forgets the sends it settled
                if progress is not None:
                    progress(sent, time.monotonic() - start)
                next_progress = max(next_progress + progress_interval_s, time.monotonic())
            if rate > 0:
                wait = start + sent / rate - time.monotonic()
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if wait > 0:
                    if stop is not None:
                        stop.wait(wait)
                    else:
                        time.sleep(wait)
    except SimulationError as exc:
        error = exc
    finally:
        gc.unfreeze()
        if labels_file is not None:
            labels_file.close()
        flushed = producer.flush(FLUSH_TIMEOUT_S)
        failures += producer.delivery_failures()
        if not flushed:
            error = error or SimulationError(topic, f"not every send was acknowledged within {FLUSH_TIMEOUT_S:.0f} s")
    if error is not None:
        raise error
    if failures:
        raise SimulationError(topic, f"{len(failures)} of {sent} sends failed, first: {failures[0]}", len(failures))
    return SimulationSummary(sent, anomalies, spec.devices, time.monotonic() - start)
