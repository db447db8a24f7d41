"""Checkpoints in a compacted changelog topic: hosts share nothing but the brokers.

A checkpoint is the bytes ``checkpoint.encode`` gives (the directory store's file format, with
its own SHA-256), cut into chunks of at most ``chunk_bytes`` (under the broker's message size)
and written as records of the changelog:

    <group>/<topic>/<partition>/<offset:020d>/<chunk:05d>-<gen>  a chunk of the checkpoint's bytes
    <group>/<topic>/<partition>/<offset:020d>/manifest           JSON: the chunks' keys, sizes,
                                                                 SHA-256s and the whole's size
                                                                 and SHA-256

<gen> is the start of the whole checkpoint's SHA-256: a checkpoint written again at the same
offset (a model switch rewrites an idle partition's) writes new chunk keys, so the checkpoint
already there stays whole until the new manifest replaces it (its chunks are deleted then).
Chunk keys without <gen> (written before it) are read as the manifest names them.

The chunks are written and acknowledged first, the manifest after: a checkpoint exists once its
manifest is in the log, and a reader trusts it only when the manifest and every chunk it names
are there and verify (each chunk's SHA-256, then the whole's, then the format's own checksum).
A save that fails (or a writer that dies) between chunks and manifest leaves chunks no manifest
names: they are never read, and a later save of that partition deletes them once they are older
than every checkpoint kept (this process remembers its own failed writes; others' it learns of
when it reads the changelog partition again). After a new manifest lands, the records of the
checkpoints beyond ``keep`` are deleted by tombstones (manifest first, then its chunks), and
compaction (cleanup.policy=compact) drops what tombstones and newer records replaced.

Layout: an input partition's records all go to one changelog partition, crc32 of
"<group>/<topic>/<partition>" modulo the changelog's partition count (topics.checkpoint_partitions),
so recovering a partition reads one changelog partition, shared with a few others, not the whole
topic. Each changelog partition is indexed in memory on first use and caught up at each
``load_latest`` (another host may have written since): the index holds this group's manifests
and the changelog offsets of their chunks, never the chunks' bytes, which are read again by
offset when a checkpoint is loaded. For 100 input partitions x 3 kept checkpoints that is 300
manifests and their chunk offsets; a catch-up reads the bytes written to that changelog
partition since the last one (at start-up: everything compaction kept, about ``keep`` checkpoints
of each input partition that hashes there).

Failures: a checkpoint that could not be written raises ``ChangelogUnavailable`` (an OSError, as a
full disk is for the directory store: the run loop retries it later); a changelog that cannot be
read while loading raises the client's KafkaClientError (retriable): "no checkpoint" would be a
wrong answer, since it starts devices from zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamer.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    ModelSpan,
    ModelStamp,
    Refused,
    _safe,
    encode,
    pick_latest,
)
from streamer.kafka.abstract import Changelog, KafkaClientError, Message

log = logging.getLogger(__name__)

MANIFEST = "manifest"
MANIFEST_FORMAT = 1
CALL_TIMEOUT_S = 30.0  # a changelog read or write that takes longer is taken to have failed
SLOWEST_READ_BYTES_PER_S = 4e6  # a checkpoint's read gets CALL_TIMEOUT_S and its bytes at this rate
LONGEST_READ_S = 600.0
GEN_HEX = 12  # hex digits of the checkpoint's SHA-256 in its chunks' keys


class ChangelogUnavailable(OSError):
    """A checkpoint could not be written to the changelog (the brokers are away, a record too big)."""


@dataclass(frozen=True)
class ChunkRef:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    key: str
    topic: str
    partition: int
    offset: int
    size: int
    sha256: str
    chunks: tuple[ChunkRef, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of its records: the manifest's, then its chunks'."""
        return (self.key, *(c.key for c in self.chunks))

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "size": self.size,
                "sha256": self.sha256,
                "chunks": [[c.key, c.size, c.sha256] for c in self.chunks],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, key: str, data: bytes) -> "Manifest":
        """Raises CheckpointError for a manifest that cannot be parsed."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError(f"not a JSON object but {type(doc).__name__}")
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"manifest format {doc.get('format')!r}, this reader knows {MANIFEST_FORMAT}")
            chunks = tuple(ChunkRef(_text(k), _count(n), _text(h)) for k, n, h in doc["chunks"])
            return cls(key, _text(doc["topic"]), _count(doc["partition"]), _count(doc["offset"]), _count(doc["size"]),
                       _text(doc["sha256"]), chunks)
        # RecursionError: JSON nested past the parser's depth; anything on the changelog may be foreign.
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(key, f"unreadable manifest ({type(exc).__name__}: {str(exc)[:200]})") from None


def _count(value: object) -> int:
    """A manifest's whole number as written (JSON: int), not a float, a bool or text."""
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value


@dataclass
class _PartitionIndex:
    """What one changelog partition holds for this group, read up to ``position``."""

    position: int = 0
    manifests: dict[tuple[str, int], dict[int, Manifest]] = field(default_factory=dict)  # (topic, partition) -> offset -> manifest
    chunks: dict[str, int] = field(default_factory=dict)  # chunk key -> changelog offset
    failed: dict[str, int] = field(default_factory=dict)  # key of a failed save's record -> its checkpoint's offset

    def wrote(self, offsets: list[int]) -> None:
        """Records this store wrote at ``offsets`` and put in the index itself: read past them
        when they follow on from ``position`` (someone else's records in between are read)."""
        for at in sorted(offsets):
            if at == self.position:
                self.position += 1

    def apply(self, key: str, value: bytes | None, at: int) -> None:
        parts = key.split("/")
        if len(parts) != 5 or not _decimal(parts[2]) or not _decimal(parts[3]):
            log.debug("changelog record %r at %d is not a checkpoint record; ignored", key, at)
            return
        where, offset = (parts[1], int(parts[2])), int(parts[3])
        if parts[4] != MANIFEST:
            if value is None:
                self.chunks.pop(key, None)
            else:
                self.chunks[key] = at
            return
        if value is None:
            self.manifests.get(where, {}).pop(offset, None)
            return
        try:
            manifest = Manifest.from_bytes(key, value)
            if (manifest.topic, manifest.partition, manifest.offset) != (*where, offset):
                raise CheckpointError(key, f"manifest of {manifest.topic}[{manifest.partition}] at offset"
                                           f" {manifest.offset} under another checkpoint's key")
        except CheckpointError as exc:
            log.warning("%s; that checkpoint is not used", exc)
            self.manifests.get(where, {}).pop(offset, None)
            return
        self.manifests.setdefault(where, {})[offset] = manifest


class KafkaCheckpointStore(CheckpointStore):
    """Checkpoints of consumer group ``group_id`` in the compacted topic ``changelog.topic``, the
    last ``keep`` of each input partition kept (see the module docstring)."""

    def __init__(self, changelog: Changelog, group_id: str, keep: int = 3, chunk_bytes: int = 512 * 1024) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.changelog = changelog
        self.group_id = group_id
        self.keep = keep
        self.chunk_bytes = chunk_bytes
        self._prefix = _safe(group_id, max_bytes=None) + "/"  # keys have no file name's limit: as they always were
        self.partitions = changelog.partition_count(CALL_TIMEOUT_S)
        self._indexes: dict[int, _PartitionIndex] = {}

    def changelog_partition(self, topic: str, partition: int) -> int:
        """The changelog partition that holds the checkpoints of input ``topic``[``partition``]."""
        return zlib.crc32(f"{self._prefix}{topic}/{partition}".encode()) % self.partitions

    def _key(self, topic: str, partition: int, offset: int, suffix: str) -> str:
        return f"{self._prefix}{topic}/{partition}/{offset:020d}/{suffix}"

    def _caught_up(self, at: int) -> _PartitionIndex:
        """The index of changelog partition ``at``, after reading what was written to it since."""
        index = self._indexes.setdefault(at, _PartitionIndex())
        end = self.changelog.end_offset(at, CALL_TIMEOUT_S)
        for message in self.changelog.read(at, index.position, end, CALL_TIMEOUT_S):
            if message.key is not None:
                key = message.key.decode("utf-8", "replace")
                if key.startswith(self._prefix):
                    index.apply(key, message.value, message.offset)
            # Applied in order, each once: a read cut short (a timeout) goes on from here next time.
            index.position = max(index.position, message.offset + 1)
        index.position = max(index.position, end)
        return index

    def _index(self, at: int) -> _PartitionIndex:
        return self._indexes[at] if at in self._indexes else self._caught_up(at)

    def offsets(self, topic: str, partition: int) -> list[int]:
        index = self._caught_up(self.changelog_partition(topic, partition))
        return sorted(index.manifests.get((topic, partition), {}), reverse=True)

    def save(self, checkpoint: Checkpoint) -> str:
        """Chunks, then the manifest, each batch acknowledged; then tombstones for what is beyond
        ``keep``. Returns the manifest's key. ChangelogUnavailable when it could not be written."""
        topic, partition, offset = checkpoint.topic, checkpoint.partition, checkpoint.offset
        at = self.changelog_partition(topic, partition)
        data = encode(checkpoint)
        digest = hashlib.sha256(data).hexdigest()
        chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        refs = tuple(
            ChunkRef(self._key(topic, partition, offset, f"{n:05d}-{digest[:GEN_HEX]}"), len(chunk),
                     hashlib.sha256(chunk).hexdigest())
            for n, chunk in enumerate(chunks)
        )
        manifest = Manifest(self._key(topic, partition, offset, MANIFEST), topic, partition, offset, len(data),
                            digest, refs)
        index = None
        try:
            index = self._index(at)
            chunk_offsets = self.changelog.write(at, [(r.key.encode(), c) for r, c in zip(refs, chunks)], CALL_TIMEOUT_S)
            manifest_offsets = self.changelog.write(at, [(manifest.key.encode(), manifest.to_bytes())], CALL_TIMEOUT_S)
        except KafkaClientError as exc:
            if index is not None:  # some may have gone in: deleted once older than every checkpoint kept
                index.failed.update((key, offset) for key in [*(r.key for r in refs), manifest.key])
            raise ChangelogUnavailable(f"checkpoint {manifest.key} not written to {self.changelog.topic}: {exc}") from exc
        for ref, chunk_at in zip(refs, chunk_offsets):
            index.chunks[ref.key] = chunk_at
        index.manifests.setdefault((topic, partition), {})[offset] = manifest
        index.wrote([*chunk_offsets, *manifest_offsets])  # a recovery need not read our own writes back
        self._prune(at, index, topic, partition, offset)
        return manifest.key

    def discard_above(self, topic: str, partition: int, offset: int) -> list[int]:
        """Delete the checkpoints of a partition above ``offset`` (see CheckpointStore); the
        client's KafkaClientError (retriable) when the tombstones could not be written."""
        at = self.changelog_partition(topic, partition)
        index = self._index(at)
        manifests = index.manifests.get((topic, partition), {})
        above = [manifests[o] for o in sorted(manifests) if o > offset]
        own = f"{self._prefix}{topic}/{partition}/"
        stray = [key for key in [*index.chunks, *index.failed]  # chunks no manifest names, failed saves' records
                 if key.startswith(own) and _offset_in(key) > offset]
        self._delete(at, index, above, stray)
        return [m.offset for m in above]

    def _prune(self, at: int, index: _PartitionIndex, topic: str, partition: int, saved: int) -> None:
        """Tombstones for the checkpoints of a partition beyond ``keep`` at or below ``saved``
        (the offset just saved: never itself), and for chunks no kept manifest names that are
        older than the oldest kept (a writer died before its manifest, or a failed save of this
        process) or at a kept offset (replaced by a checkpoint written again there)."""
        own = f"{self._prefix}{topic}/{partition}/"
        failed = [key for key in index.failed if key.startswith(own)]
        if failed:
            # A failed save's records may have landed after all (a send that timed out on our side):
            # read the log first, so that a manifest among them is known before its chunks are judged.
            try:
                self._caught_up(at)
            except KafkaClientError as exc:
                log.debug("could not read changelog partition %d before pruning: %s; failed saves' records wait", at, exc)
                failed = []
        manifests = index.manifests.get((topic, partition), {})
        # Checkpoints above the one saved are of another history of the partition (its offsets
        # were reset): recovery deletes them (discard_above); they never push this one out.
        newest_first = sorted((o for o in manifests if o <= saved), reverse=True)
        kept = newest_first[: self.keep]
        dropped = [manifests[o] for o in newest_first[self.keep :]]
        named = {k for o in kept for k in manifests[o].keys}
        orphans = [key for key in [*index.chunks, *failed]
                   if key.startswith(own) and key not in named and (_offset_in(key) < kept[-1] or _offset_in(key) in kept)]
        try:
            self._delete(at, index, dropped, orphans)
        except KafkaClientError as exc:  # the new checkpoint is in place; the old ones can go next time
            log.debug("could not delete old checkpoint records of %s[%d]: %s", topic, partition, exc)

    def _delete(self, at: int, index: _PartitionIndex, manifests: list[Manifest], keys: list[str]) -> None:
        """Tombstones for ``manifests`` (each record of theirs) and for the records ``keys``, then
        out of the index; the client's KafkaClientError when they could not be written."""
        keys = list(dict.fromkeys([k for m in manifests for k in m.keys] + keys))
        if not keys:
            return
        written = self.changelog.write(at, [(key.encode(), None) for key in keys], CALL_TIMEOUT_S)
        for m in manifests:
            self._forget(index, m)
        for key in keys:
            index.chunks.pop(key, None)
            index.failed.pop(key, None)
        index.wrote(written)

    def load_latest(
        self,
        topic: str,
        partition: int,
        width: int,
        max_offset: int | None = None,
        model: ModelStamp | None = None,
        span: ModelSpan | None = None,
    ) -> tuple[Checkpoint | None, list[Refused]]:
        """The newest usable checkpoint (``pick_latest``), the changelog read up to its end first.
        A manifest whose chunks are missing or do not verify is refused."""
        at = self.changelog_partition(topic, partition)
        index = self._caught_up(at)
        manifests = index.manifests.get((topic, partition), {})
        candidates = (
            (offset, manifests[offset].key, lambda m=manifests[offset]: self._assemble(at, index, m))
            for offset in sorted(manifests, reverse=True)
        )
        return pick_latest(candidates, topic, partition, width, max_offset, model, span)

    def _assemble(self, at: int, index: _PartitionIndex, manifest: Manifest) -> bytes:
        """The checkpoint's bytes from its chunks, each verified; CheckpointError naming what is wrong.
        A checkpoint with a chunk missing or gone never becomes whole (chunks come before their
        manifest in the log): it leaves the index, so that it is refused once, not at every load
        (a manifest deleted while this index was not read for longer than the broker keeps
        tombstones, delete.retention.ms, is one)."""
        located = []
        for ref in manifest.chunks:
            if ref.key not in index.chunks:
                self._forget(index, manifest)
                raise CheckpointError(manifest.key, f"chunk {ref.key} is missing")
            located.append(index.chunks[ref.key])
        if not located:
            raise CheckpointError(manifest.key, "names no chunks")
        wanted = {o: ref for o, ref in zip(located, manifest.chunks)}
        found: dict[str, bytes] = {}
        # A big checkpoint takes longer than a call: the deadline grows with its bytes, so that one
        # that cannot be read within a call is not tried again and again, never read whole.
        timeout_s = min(CALL_TIMEOUT_S + manifest.size / SLOWEST_READ_BYTES_PER_S, LONGEST_READ_S)
        for message in self._read(at, min(located), max(located) + 1, timeout_s):
            self.progress()
            ref = wanted.get(message.offset)
            if ref is not None and message.key == ref.key.encode() and message.value is not None:
                found[ref.key] = message.value
        parts = []
        for ref in manifest.chunks:
            chunk = found.get(ref.key)
            if chunk is None:
                self._forget(index, manifest)
                raise CheckpointError(manifest.key, f"chunk {ref.key} is gone from the changelog")
            if len(chunk) != ref.size or hashlib.sha256(chunk).hexdigest() != ref.sha256:
                raise CheckpointError(manifest.key, f"chunk {ref.key} does not match its manifest (replaced or corrupted)")
            parts.append(chunk)
        data = b"".join(parts)
        if len(data) != manifest.size or hashlib.sha256(data).hexdigest() != manifest.sha256:
            raise CheckpointError(manifest.key, "the chunks together do not match the manifest")
        return data

    @staticmethod
    def _forget(index: _PartitionIndex, manifest: Manifest) -> None:
        index.manifests.get((manifest.topic, manifest.partition), {}).pop(manifest.offset, None)

    def _read(self, at: int, start: int, end: int, timeout_s: float = CALL_TIMEOUT_S) -> Iterator[Message]:
        return self.changelog.read(at, start, end, timeout_s)

    def close(self) -> None:
        self.changelog.close()


def _offset_in(key: str) -> int:
    """The checkpoint offset in a record key <group>/<topic>/<partition>/<offset>/<suffix>."""
    return int(key.split("/")[3])


def _decimal(text: str) -> bool:
    """Whether ``text`` is a decimal number int() reads ("²".isdigit() is True, int("²") fails)."""
    return text.isascii() and text.isdigit()
