"""Per-partition checkpoints of device state: where state goes between hosts and restarts.

A checkpoint of an input partition holds every row of that partition's devices (h, c, the last
forecast and the residual statistics) and the input offset it includes: every reading before
``offset`` has been applied, none after. The run loop writes one only after the offsets up to
``offset`` have been committed, so a checkpoint never runs ahead of the group.

File format (little endian), no pickle:

    b"STRMCKP1"                   magic and format version
    u32 header length, header     JSON: topic, partition, offset, count, width, ids_bytes, created,
                                  model_version, model_config
    u32[count] id lengths, ids    device ids, UTF-8
    f32[count * width]            rows
    f64[count]                    last seen (epoch s)
    32 bytes                      SHA-256 of everything above

``model_version`` and ``model_config`` name the model that applies the partition's readings from
``offset`` on (the run loop writes a checkpoint of every owned partition at each model switch),
so a loader can tell whether replaying from a checkpoint would cross a switch (see
``pick_latest``). The group's committed offsets say the same from the other side: each is
committed with a ``ModelSpan`` (the model that applied the readings before it, and since which
offset), so a switch whose checkpoint is missing is not crossed either.

Files are written to a temporary name, fsynced and renamed into place, so a reader sees a whole
checkpoint or none; a write that fails removes its temporary file. The checksum refuses a torn
or corrupted one, and the loader falls back to the previous checkpoint.
``DirectoryCheckpointStore`` keeps them as <root>/<group>/<topic>/<partition>/<offset>.ckpt: on a
local disk for one host, or on a directory shared by several hosts (NFS and the like: rename is
atomic there too), which is how processes on different hosts hand partitions over.
``checkpoint_kafka.KafkaCheckpointStore`` keeps the same bytes in a compacted changelog topic, so
that hosts share nothing but the brokers. Both are a ``CheckpointStore`` (checkpoint.store selects
one) and pick what to load by the same rules (``pick_latest``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.engine import PartitionState
from streamer.errors import StreamerError

log = logging.getLogger(__name__)

MAGIC = b"STRMCKP1"
SUFFIX = ".ckpt"
DIGEST_SIZE = 32
# A temporary file this old was left by a writer that died mid-write (kill -9): no live writer
# takes minutes over a checkpoint, so it is removed.
STALE_TMP_S = 600.0


class StoreUnreadable(StreamerError):
    """The checkpoint store cannot be read now (a directory that cannot be listed: a lost
    mount, an I/O error): not a bad checkpoint but a store to wait for."""


class CheckpointError(StreamerError):
    """A checkpoint file that cannot be used."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Checkpoint:
    topic: str
    partition: int
    offset: int  # the next input offset: readings before it are applied, none after
    state: PartitionState
    width: int
    model_version: str = ""  # the model that applies the readings from ``offset`` on
    created: float = 0.0
    model_config: dict | None = None  # its ModelConfig.to_dict(); None in older files


def encode(checkpoint: Checkpoint) -> bytes:
    state = checkpoint.state
    count = len(state)
    rows = np.ascontiguousarray(state.rows, dtype="<f4")
    if rows.shape != (count, checkpoint.width):
        raise ValueError(f"rows {rows.shape} do not match {count} devices of width {checkpoint.width}")
    encoded_ids = [device_id.encode("utf-8") for device_id in state.device_ids]
    ids_blob = b"".join(encoded_ids)
    header = json.dumps(
        {
            "topic": checkpoint.topic,
            "partition": checkpoint.partition,
            "offset": checkpoint.offset,
            "count": count,
            "width": checkpoint.width,
            "ids_bytes": len(ids_blob),
            "created": checkpoint.created or time.time(),
            "model_version": checkpoint.model_version,
            "model_config": checkpoint.model_config,
        },
        separators=(",", ":"),
    ).encode()
    body = b"".join(
        [
            MAGIC,
            struct.pack("<I", len(header)),
            header,
            np.asarray([len(b) for b in encoded_ids], dtype="<u4").tobytes(),
            ids_blob,
            rows.tobytes(),
            np.ascontiguousarray(state.last_seen, dtype="<f8").tobytes(),
        ]
    )
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, path: object = "<bytes>") -> Checkpoint:
    """Parse and verify; any defect is a CheckpointError naming ``path``."""
    if len(data) < len(MAGIC) + 4 + DIGEST_SIZE or not data.startswith(MAGIC):
        raise CheckpointError(path, "not a streamer checkpoint (bad magic or too short)")
    body, digest = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(path, "checksum mismatch: the file is truncated or corrupted")
    (header_len,) = struct.unpack_from("<I", body, len(MAGIC))
    at = len(MAGIC) + 4
    try:
        header = json.loads(body[at : at + header_len])
        count, width, ids_bytes = int(header["count"]), int(header["width"]), int(header["ids_bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(path, f"unreadable header ({exc})") from None
    at += header_len
    expected = at + 4 * count + ids_bytes + 4 * count * width + 8 * count
    if expected != len(body):
        raise CheckpointError(path, f"size {len(body)} does not match its header (expected {expected})")
    lengths = np.frombuffer(body, dtype="<u4", count=count, offset=at)
    at += 4 * count
    ids_blob = body[at : at + ids_bytes]
    at += ids_bytes
    ids, cursor = [], 0
    try:
        for length in lengths.tolist():
            ids.append(ids_blob[cursor : cursor + length].decode("utf-8"))
            cursor += length
    except UnicodeDecodeError as exc:
        raise CheckpointError(path, f"device id {len(ids)} is not UTF-8 ({exc.reason})") from None
    if cursor != ids_bytes:
        raise CheckpointError(path, f"device id lengths add up to {cursor} bytes, not {ids_bytes}")
    if len(set(ids)) != len(ids):
        raise CheckpointError(path, "a device id appears twice")
    rows = np.frombuffer(body, dtype="<f4", count=count * width, offset=at).reshape(count, width).astype(np.float32)
    at += 4 * count * width
    last_seen = np.frombuffer(body, dtype="<f8", count=count, offset=at).astype(np.float64)
    try:  # a header of another writer (a field missing or of another type) is a defect like any other
        return Checkpoint(
            topic=str(header["topic"]),
            partition=int(header["partition"]),
            offset=int(header["offset"]),
            state=PartitionState(ids, rows, last_seen),
            width=width,
            model_version=str(header.get("model_version", "")),
            created=float(header.get("created", 0.0)),
            model_config=header.get("model_config") if isinstance(header.get("model_config"), dict) else None,
        )
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(path, f"bad header ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Refused:
    """A checkpoint skipped while loading, and why: ``path`` is its file (directory store) or its
    changelog key (Kafka store)."""

    path: Path | str
    reason: str


class CheckpointStore(ABC):
    """Where checkpoints of one consumer group go: save one, load the newest usable one.

    ``save`` is atomic: a reader sees a whole checkpoint or none, and the last ``keep`` of a
    partition are kept. ``load_latest`` follows ``pick_latest``'s rules."""

    keep: int
    # Called as a long load goes on (the Kafka store: per chunk read), by whoever reads the store.
    progress: Callable[[], None] = staticmethod(lambda: None)

    @abstractmethod
    def save(self, checkpoint: Checkpoint) -> object:
        """Store ``checkpoint`` (replacing one at the same offset) and prune beyond ``keep`` those
        at or below its offset (one above it never pushes it out: see discard_above);
        returns where it went. Raises OSError or StreamerError when it could not be stored."""

    @abstractmethod
    def discard_above(self, topic: str, partition: int, offset: int) -> list[int]:
        """Delete the checkpoints of a partition above ``offset`` (the group's committed offset
        at recovery), returning their offsets, lowest first. Checkpoints are taken at committed
        offsets, so those are of another history of the partition (its offsets reset, expired, or
        the topic created anew); kept, they would be restored once the offsets pass them again."""

    @abstractmethod
    def offsets(self, topic: str, partition: int) -> list[int]:
        """Offsets of the stored checkpoints of a partition, newest (highest) first, unverified."""

    @abstractmethod
    def load_latest(
        self,
        topic: str,
        partition: int,
        width: int,
        max_offset: int | None = None,
        model: ModelStamp | None = None,
        span: ModelSpan | None = None,
    ) -> tuple[Checkpoint | None, list[Refused]]:
        """The newest usable checkpoint with offset <= ``max_offset``, and those refused on the way
        (see ``pick_latest``)."""

    def close(self) -> None:
        """Release what the store holds open (clients); nothing by default."""


Candidate = tuple[int, "Path | str", Callable[[], bytes]]  # (offset, where, read its bytes)


def pick_latest(
    candidates: Iterable[Candidate],
    topic: str,
    partition: int,
    width: int,
    max_offset: int | None = None,
    model: ModelStamp | None = None,
    span: ModelSpan | None = None,
) -> tuple[Checkpoint | None, list[Refused]]:
    """The newest usable checkpoint of ``candidates`` (newest first) with offset <= ``max_offset``
    (when given), and those refused on the way.

    One that cannot be read or verified (``read`` raises OSError or CheckpointError) is refused
    and the previous one tried. One of another row width, or (when ``model`` is given) of another
    model version, was written under another model than this one: replaying from it would cross
    a model switch, and so would replaying from any older one, so the search stops there with
    nothing usable. The one exception is a checkpoint of another version but the same model
    config at ``max_offset`` itself: nothing to replay, and its rows carry over to the new model
    as a hot reload carries them.

    ``span``: what the group's offset at ``max_offset`` was committed with (see ModelSpan). With
    readings to replay, a checkpoint is refused, and the search stops, when another model than
    ``model`` applied them, or when it lies before the offset since which ``model`` has: a switch
    whose checkpoint is missing (the store failed at the switch, or the process died first).
    """
    refused: list[Refused] = []
    for offset, where, read in candidates:
        if max_offset is not None and offset > max_offset:
            continue  # ahead of the group's committed offset: not this group's history
        try:
            checkpoint = decode(read(), where)
        except (OSError, CheckpointError) as exc:
            reason = exc.reason if isinstance(exc, CheckpointError) else str(exc)
            log.warning("checkpoint %s refused: %s; trying the previous one", where, reason)
            refused.append(Refused(where, reason))
            continue
        if checkpoint.topic != topic or checkpoint.partition != partition:
            refused.append(Refused(where, f"belongs to {checkpoint.topic}[{checkpoint.partition}]"))
            continue
        if max_offset is not None and checkpoint.offset > max_offset:
            continue
        reason = _model_mismatch(checkpoint, width, model, max_offset) or _crosses_switch(
            checkpoint, model, span, max_offset)
        if reason is not None:
            log.warning("checkpoint %s refused: %s; no older one is used either", where, reason)
            refused.append(Refused(where, reason))
            return None, refused
        return checkpoint, refused
    return None, refused


class DirectoryCheckpointStore(CheckpointStore):
    """Checkpoints as files under ``root``/<group>/<topic>/<partition>/, the last ``keep`` kept."""

    def __init__(self, root: Path, group_id: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.group_id = group_id
        self.keep = keep

    def _dir(self, topic: str, partition: int) -> Path:
        return self.root / _safe(self.group_id) / _safe(topic) / str(partition)

    def paths(self, topic: str, partition: int) -> list[Path]:
        """Checkpoint files of a partition, newest (highest offset) first."""
        directory = self._dir(topic, partition)
        if not directory.is_dir():
            return []
        found = []
        for path in directory.iterdir():
            if path.suffix == SUFFIX and path.stem.isascii() and path.stem.isdigit():
                found.append((int(path.stem), path))
        return [path for _, path in sorted(found, reverse=True)]

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` atomically and prune the oldest beyond ``keep``. Raises OSError
        (a full disk, a lost mount) with no temporary file left behind."""
        directory = self._dir(checkpoint.topic, checkpoint.partition)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{checkpoint.offset:020d}{SUFFIX}"
        tmp = directory / f".{path.name}.{os.getpid()}.tmp"
        data = encode(checkpoint)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError as exc:
                log.debug("could not remove %s: %s", tmp, exc)
            raise
        _fsync_dir(directory)
        stale_before = time.time() - STALE_TMP_S
        leftovers = [p for p in directory.glob(".*.tmp") if _mtime(p) < stale_before]
        at_or_below = [p for p in self.paths(checkpoint.topic, checkpoint.partition) if int(p.stem) <= checkpoint.offset]
        for old in at_or_below[self.keep :] + leftovers:
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:  # the new checkpoint is in place; an old one can go next time
                log.debug("could not prune %s: %s", old, exc)
        return path

    def discard_above(self, topic: str, partition: int, offset: int) -> list[int]:
        """Delete the files above ``offset`` (see CheckpointStore); one that cannot be deleted is
        left with a warning (saves below it are not pruned by it)."""
        removed = []
        for path in self.paths(topic, partition):
            if int(path.stem) <= offset:
                break
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete checkpoint %s, above the committed offset %d: %s", path, offset, exc)
                continue
            removed.append(int(path.stem))
        return sorted(removed)

    def offsets(self, topic: str, partition: int) -> list[int]:
        return [int(path.stem) for path in self.paths(topic, partition)]

    def load_latest(
        self,
        topic: str,
        partition: int,
        width: int,
        max_offset: int | None = None,
        model: ModelStamp | None = None,
        span: ModelSpan | None = None,
    ) -> tuple[Checkpoint | None, list[Refused]]:
        """The newest usable checkpoint file (``pick_latest``); a file that cannot be read is refused.
        StoreUnreadable when the partition's directory cannot be listed."""
        try:
            paths = self.paths(topic, partition)
        except OSError as exc:
            raise StoreUnreadable(f"checkpoint directory {self._dir(topic, partition)} cannot be listed: {exc}") from exc
        candidates = ((int(path.stem), path, path.read_bytes) for path in paths)
        return pick_latest(candidates, topic, partition, width, max_offset, model, span)


@dataclass(frozen=True)
class ModelStamp:
    """The model a checkpoint is written or loaded under: its version and config (to_dict())."""

    version: str
    config: dict

    @classmethod
    def of(cls, version: str, config: dict) -> "ModelStamp":
        """With ``config`` as a checkpoint header gives it back (through JSON)."""
        return cls(version, json.loads(json.dumps(config)))

    def digest(self) -> str:
        """16 hex digits naming this version and config (a ModelSpan's ``model``)."""
        named = json.dumps([self.version, self.config], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(named.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# confluent-kafka commits the metadata with a NUL after it (librdkafka reads it back without)
_SPAN = re.compile(r"streamer/applied model=([0-9a-f]{16}) since=(0|[1-9][0-9]{0,18})\x00?")


@dataclass(frozen=True)
class ModelSpan:
    """The metadata the run loop commits with a partition's offset: the model (a ModelStamp's
    digest) that applied every reading of the partition from offset ``since`` up to that commit.
    ``since`` moves at each model switch, and to the committed offset when a partition is taken
    over under another model. A recovery replays from a checkpoint only inside the span (see
    pick_latest): one before ``since``, or a span of another model, lies across a switch."""

    model: str
    since: int

    def encode(self) -> str:
        return f"streamer/applied model={self.model} since={self.since}"

    @classmethod
    def decode(cls, metadata: str) -> "ModelSpan | None":
        """The span a commit's metadata names; None for anything else (another tool's, none)."""
        found = _SPAN.fullmatch(metadata)
        return None if found is None else cls(found[1], int(found[2]))


def _crosses_switch(checkpoint: Checkpoint, model: ModelStamp | None, span: ModelSpan | None,
                    replay_to: int | None) -> str | None:
    """Why replaying from ``checkpoint`` up to ``replay_to`` under ``model`` would cross a model
    switch that the committed offset's ``span`` tells of, or None."""
    if span is None or model is None or replay_to is None or checkpoint.offset >= replay_to:
        return None
    if span.model != model.digest():
        return (f"the readings before offset {replay_to} were applied under another model than {model.version}"
                f" (the committed offset's metadata says so)")
    if checkpoint.offset < span.since:
        return (f"model {model.version} applies the readings since offset {span.since} (the committed offset's"
                f" metadata), readings {checkpoint.offset}..{span.since - 1} were applied under the model before")
    return None


def _model_mismatch(checkpoint: Checkpoint, width: int, model: ModelStamp | None, replay_to: int | None) -> str | None:
    """Why ``checkpoint`` cannot be replayed under ``model`` (rows of ``width``), or None."""
    if checkpoint.width != width:
        return f"rows of width {checkpoint.width}, this model needs {width}"
    if model is None:
        return None
    if checkpoint.model_version == model.version:
        # A version is a name, and may be given again to another model (streamer train names one
        # by its shape and data directory): rows of another config would be read in another layout.
        if checkpoint.model_config is not None and checkpoint.model_config != model.config:
            return f"written under model {model.version} of another config than the one served under that name"
        return None
    written_under = f"written under model {checkpoint.model_version or '(unknown)'}, serving {model.version}"
    if checkpoint.model_config != model.config:
        return f"{written_under} of another config"
    if replay_to is None or checkpoint.offset < replay_to:
        upto = "" if replay_to is None else f"..{replay_to - 1}"
        return f"{written_under}: readings {checkpoint.offset}{upto} were applied under the old model"
    return None


SAFE_NAME_MAX = 200  # a path component's characters: longer ones are hashed
NAME_MAX_BYTES = 255  # a file name's bytes on the file systems checkpoints go to


def _safe(name: str, max_bytes: int | None = NAME_MAX_BYTES) -> str:
    """A path component for a topic or group name (Kafka allows [a-zA-Z0-9._-] in topics), one per
    name: other characters as %xx, or %uxxxxxx past U+00FF ("x€" is not "x ac"); "." and ".." escaped
    (they would name the directory itself, or its parent); past SAFE_NAME_MAX characters, a prefix
    and the SHA-256 of the name (a group id has no length limit, a file name has).

    Letters outside ASCII are kept, 2 to 4 bytes each, so a name of fewer characters could still
    pass ``max_bytes``: a group of 150 CJK letters had a directory name no file system takes, and
    no checkpoint. Such a name, and only such a one (every name that worked keeps its path), is
    hashed again to a prefix of bytes. None: no byte limit (the Kafka store's keys)."""
    if name in (".", ".."):
        return "%2e" * len(name)
    safe = "".join(ch if ch.isalnum() or ch in "._-" else f"%{ord(ch):02x}" if ord(ch) <= 0xFF else f"%u{ord(ch):06x}"
                   for ch in name) or "%"
    digest = None
    if len(safe) > SAFE_NAME_MAX:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        safe = f"{safe[:SAFE_NAME_MAX - 65]}~{digest}"
    encoded = safe.encode("utf-8")
    if max_bytes is not None and len(encoded) > max_bytes:
        digest = digest or hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        safe = f"{encoded[: SAFE_NAME_MAX - 65].decode('utf-8', 'ignore')}~{digest}"
    return safe


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone meanwhile
        return float("inf")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
