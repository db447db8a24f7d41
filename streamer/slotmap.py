"""Device id -> slot for whole batches: an open-addressing hash table held in numpy arrays.

A Python dict maps one id at a time, and each lookup in a table of millions waits on two or
three cache misses in turn (the hash index, the entry, the stored key's characters, then the
slot's int object). Here a batch is hashed once (``fingerprints``, C calls over the list) and
every lookup of the batch advances together, one probe round per numpy gather, whose misses
overlap: at 10M devices 0.40 us per reading against 1.42 for a dict, on a shared 2-core host
(``bench/scale.py``, ``id_to_slot``; README, State table).

Keys are 128-bit fingerprints of the ids, two 64-bit hashes (Python's own str hash, SipHash
keyed per process, of the id and of the id with a byte appended): two ids are one device only
if both hashes agree, which for 10M devices happens with a probability of about 1e-25 (n^2 /
2^129), far below that of a memory error. Fingerprints live only in this process: checkpoints
keep the ids themselves and hash them again when restored.

Layout: per slot its two key halves (16 bytes) and whether it is in the map; per position of
the probe table (a power of two, at least twice the capacity) the slot there, EMPTY or
TOMB (a deleted entry, skipped by lookups, reused by inserts). Linear probing; the table is
rebuilt without tombstones when live entries and tombstones fill MAX_FILL of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import numpy as np

EMPTY = -1
TOMB = -2
MAX_FILL = 0.7  # live entries + tombstones, as a share of the probe table, before a rebuild
SALT = "\x00"  # appended for the second hash: another message, so another SipHash value


def fingerprints(device_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(k1, k2): two (n,) int64 hashes per id, in C calls over the sequence (no Python frame per id)."""
    n = len(device_ids)
    k1 = np.fromiter(map(hash, device_ids), dtype=np.int64, count=n)
    k2 = np.fromiter(map(hash, map(str.__add__, device_ids, repeat(SALT))), dtype=np.int64, count=n)
    return k1, k2


class SlotMap:
    """Fingerprint -> slot for slots in [0, capacity). Batch operations take (k1, k2) arrays."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        positions = 1 << max(3, (2 * capacity - 1).bit_length())  # >= 2 x capacity: live load <= 1/2
        self._mask = positions - 1
        self._pos = np.full(positions, EMPTY, dtype=np.int32 if capacity < 2**31 else np.int64)
        self._k1 = np.zeros(capacity, dtype=np.int64)
        self._k2 = np.zeros(capacity, dtype=np.int64)
        self._present = np.zeros(capacity, dtype=bool)
        self._live = 0
        self._tombs = 0

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return self._pos.nbytes + self._k1.nbytes + self._k2.nbytes + self._present.nbytes

    def get(self, device_id: str) -> int | None:
        """The slot of one id, or None."""
        slot = int(self.get_many(*fingerprints([device_id]))[0])
        return None if slot < 0 else slot

    def get_many(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """(n,) int64 slots of the keys, -1 where absent."""
        out = np.full(len(k1), -1, dtype=np.int64)
        idx = np.arange(len(k1))
        pos = k1 & self._mask
        a, b = k1, k2
        while idx.size:
            at = self._pos[pos]
            live = at >= 0
            hit = live.copy()
            slot = at[live]
            hit[live] = (self._k1[slot] == a[live]) & (self._k2[slot] == b[live])
            out[idx[hit]] = at[hit]
            go = ~hit & (at != EMPTY)  # a tombstone or another key: probe on
            idx, a, b, pos = idx[go], a[go], b[go], (pos[go] + 1) & self._mask
        return out

    def insert_many(self, k1: np.ndarray, k2: np.ndarray, slots: np.ndarray) -> None:
        """Map distinct keys, none in the map, to free slots (each at most once)."""
        if not len(slots):
            return
        slots = np.asarray(slots, dtype=np.int64)
        if self._present[slots].any() or len(np.unique(slots)) != len(slots):
            raise ValueError("insert_many: a slot already mapped, or given twice")
        self._k1[slots] = k1
        self._k2[slots] = k2
        self._present[slots] = True
        self._live += len(slots)
        if self._live + self._tombs > MAX_FILL * len(self._pos):
            self._rebuild()  # places every present slot, these included
            return
        self._place(slots)

    def delete_many(self, slots: np.ndarray) -> None:
        """Unmap these slots (distinct, each mapped)."""
        if not len(slots):
            return
        slots = np.asarray(slots, dtype=np.int64)
        if not self._present[slots].all():
            raise KeyError("delete_many: a slot that is not mapped")
        pending = slots
        pos = self._k1[slots] & self._mask
        while pending.size:
            at = self._pos[pos]
            hit = at == pending
            if (at[~hit] == EMPTY).any():  # cannot happen while _present is right
                raise KeyError("delete_many: a mapped slot missing from the probe table")
            self._pos[pos[hit]] = TOMB
            pending, pos = pending[~hit], (pos[~hit] + 1) & self._mask
        self._present[slots] = False
        self._live -= len(slots)
        self._tombs += len(slots)

    def clear(self) -> None:
        self._pos.fill(EMPTY)
        self._present.fill(False)
        self._live = self._tombs = 0

    def _place(self, slots: np.ndarray) -> None:
        """Put present slots at the first free position of their probe sequences."""
        pending = slots
        pos = self._k1[slots] & self._mask
        while pending.size:
            at = self._pos[pos]
            free = np.flatnonzero(at < 0)
            # Several slots may reach one free position in a round: the first of them takes it.
            _, first = np.unique(pos[free], return_index=True)
            won = free[first]
            self._tombs -= int(np.count_nonzero(at[won] == TOMB))
            self._pos[pos[won]] = pending[won]
            rest = np.ones(len(pending), dtype=bool)
            rest[won] = False
            pending, pos = pending[rest], (pos[rest] + 1) & self._mask

    def _rebuild(self) -> None:
        """The probe table anew from the present slots, without tombstones."""
        self._pos.fill(EMPTY)
        self._tombs = 0
        self._place(np.flatnonzero(self._present))
