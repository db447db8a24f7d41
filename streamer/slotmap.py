"""Device id -> slot for whole batches: an open-addressing hash table held in numpy arrays.

A Python dict maps one id at a time, and each lookup in a table of millions waits on its cache
misses in turn (the hash index, the entry, the stored key's characters, then the slot's int
object). Here a batch is hashed once (``keys_of``: C calls over the list) and every lookup of
the batch advances together, one probe round per numpy gather, whose misses overlap
(``bench/scale.py``, ``id_to_slot``; README, State table).

A key is the id's Python str hash (SipHash, keyed per process) with the id itself: a probe
stops at a position whose slot has the same hash, and the id stored for that slot is compared
with the one looked up (object arrays, compared in C), so two ids are one device only if they
are equal. Hashes that collide (CPython hashes a string's stored bytes, so the id of the two
characters U+0000 U+0001 hashes as the id U+0100 does) only lengthen a probe. Hashes live only
in this process: checkpoints keep the ids and hash them again when restored.

Layout: per slot its hash (8 bytes), its id (an object reference, 8 bytes: the table's slot ->
id) and whether it is in the map; per position of the probe table (a power of two, at least
four times the capacity) the slot there, EMPTY or TOMB (a deleted entry, skipped by lookups,
reused by inserts; a run of them that ends at an EMPTY position is EMPTY again as soon as it is
made). Linear probing. The probe table is rebuilt without tombstones if live entries and
tombstones ever fill MAX_FILL of it (at 10M devices 1.2-1.5 s); under churn (each new device
evicting an old one) tombstones level off far below that, at 0.2-0.45 per live entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EMPTY = -1
TOMB = -2
MAX_FILL = 0.7  # live entries + tombstones, as a share of the probe table, before a rebuild
WINDOW = 8  # positions a probe round looks at, past the first round
_AHEAD = np.arange(WINDOW, dtype=np.int64)

# (hashes (n,) int64, ids (n,) object): made by keys_of. The ids must be an object array: a
# str array ("<U") would drop trailing NUL characters, and "a\x00" would look like "a".
Keys = tuple[np.ndarray, np.ndarray]


def hashes_repeat(hashes: np.ndarray) -> bool:
    """Whether any hash appears twice (one sort: numpy's SIMD sort, a tenth of a stable argsort)."""
    ordered = np.sort(hashes)
    return bool((ordered[1:] == ordered[:-1]).any())


def keys_of(device_ids: Sequence[str]) -> Keys:
    """The ids' hashes, in C calls over the sequence (no Python frame per id), and the ids as an
    object array."""
    n = len(device_ids)
    ids = np.empty(n, dtype=object)
    ids[:] = device_ids
    return np.fromiter(map(hash, device_ids), dtype=np.int64, count=n), ids


def _positions(capacity: int) -> int:
    return 1 << max(3, (4 * capacity - 1).bit_length())  # >= 4 x capacity: live load <= 1/4


def _position_dtype(capacity: int) -> type:
    return np.int32 if capacity < 2**31 else np.int64


class SlotMap:
    """Id -> slot for slots in [0, capacity). Batch operations take ``keys_of`` the ids."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        positions = _positions(capacity)
        self._mask = positions - 1
        self._pos = np.full(positions, EMPTY, dtype=_position_dtype(capacity))
        self._hash = np.zeros(capacity, dtype=np.int64)
        self.ids = np.full(capacity, None, dtype=object)  # slot -> id, None where free
        self._present = np.zeros(capacity, dtype=bool)
        self._live = 0
        self._tombs = 0
        self.rebuilds = 0

    def __len__(self) -> int:
        return self._live

    @staticmethod
    def bytes_for(capacity: int) -> int:
        """``nbytes`` of a map of ``capacity`` slots, before it is made."""
        return _positions(capacity) * np.dtype(_position_dtype(capacity)).itemsize + capacity * (8 + 8 + 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the map's arrays (the ids' strings not included)."""
        return self._pos.nbytes + self._hash.nbytes + self.ids.nbytes + self._present.nbytes

    def get(self, device_id: str) -> int | None:
        """The slot of one id, or None."""
        slot = int(self.get_many(keys_of([device_id]))[0])
        return None if slot < 0 else slot

    def get_many(self, keys: Keys) -> np.ndarray:
        """(n,) int64 slots of the ids, -1 where absent.

        The first round probes each id's home position alone (where five ids in six sit);
        later rounds look WINDOW positions ahead at once, so that the rare long probe runs cost
        a few numpy calls rather than one round per position.
        """
        hashes, ids = keys
        pos = hashes & self._mask
        at = self._pos[pos]
        out = at.astype(np.int64)
        hit = at >= 0
        slot = out[hit]
        hit[hit] = self._hash[slot] == hashes[hit]
        hit[hit] = self.ids[out[hit]] == ids[hit]
        go = ~hit & (at != EMPTY)  # a tombstone or another id there: probe on
        out[~hit] = -1
        idx = np.flatnonzero(go)
        h, pos = hashes[idx], (pos[idx] + 1) & self._mask
        while idx.size:
            at = self._pos[(pos[:, None] + _AHEAD) & self._mask]  # (r, WINDOW)
            row, col = np.nonzero(at >= 0)
            same = self._hash[at[row, col]] == h[row]
            row, col = row[same], col[same]
            same = self.ids[at[row, col]] == ids[idx[row]]
            row, col = row[same], col[same]  # at most one per row: an id is mapped once
            out[idx[row]] = at[row, col]
            go = (at != EMPTY).all(axis=1)  # an empty position ends the id's probe run
            go[row] = False
            idx, h, pos = idx[go], h[go], (pos[go] + WINDOW) & self._mask
        return out

    def insert_many(self, keys: Keys, slots: np.ndarray) -> None:
        """Map distinct ids, none in the map, to free slots (each at most once)."""
        if not len(slots):
            return
        slots = np.asarray(slots, dtype=np.int64)
        if self._present[slots].any() or (len(slots) > 1 and (np.diff(np.sort(slots)) == 0).any()):
            raise ValueError("insert_many: a slot already mapped, or given twice")
        self._hash[slots], self.ids[slots] = keys
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
        if len(slots) > 1 and (np.diff(np.sort(slots)) == 0).any():
            raise KeyError("delete_many: a slot given twice")
        pending = slots
        pos = self._hash[slots] & self._mask
        tombed = []
        while pending.size:
            window = (pos[:, None] + _AHEAD) & self._mask
            at = self._pos[window]
            row, col = np.nonzero(at == pending[:, None])
            tombed.append(window[row, col])
            self._pos[tombed[-1]] = TOMB
            go = np.ones(len(pending), dtype=bool)
            go[row] = False
            if (at[go] == EMPTY).any():  # cannot happen while _present is right
                raise KeyError("delete_many: a mapped slot missing from the probe table")
            pending, pos = pending[go], (pos[go] + WINDOW) & self._mask
        self._present[slots] = False
        self.ids[slots] = None
        self._live -= len(slots)
        self._tombs += len(slots)
        self._clear_tombs_before_empty(np.concatenate(tombed))

    def _clear_tombs_before_empty(self, tombs: np.ndarray) -> None:
        """Turn back into EMPTY the runs of tombstones, these positions' among them, that end at
        an EMPTY position.

        A probe passes a position only to reach an entry further on, with no EMPTY position in
        between; a tombstone right before an EMPTY position has no entry behind it, so it can be
        EMPTY again, and so can the tombstone before it, back to the run's first entry. With a
        probe table four times the capacity most runs are a position or two, so churn (each new
        device evicting an old one) leaves few tombstones and seldom needs a rebuild.
        """
        found = []
        run = tombs
        while run.size:  # forward to each run's last tombstone
            after = self._pos[(run + 1) & self._mask]
            found.append(run[after == EMPTY])
            run = (run[after == TOMB] + 1) & self._mask
        ends = found[0] if len(found) == 1 else np.concatenate(found)
        # Tombstones of one run meet at its end: each end once (written and read back, no sort).
        mark = -3 - np.arange(len(ends), dtype=self._pos.dtype)
        self._pos[ends] = mark
        ends = ends[self._pos[ends] == mark]
        while ends.size:
            self._pos[ends] = EMPTY
            self._tombs -= len(ends)
            before = (ends - 1) & self._mask
            ends = before[self._pos[before] == TOMB]  # distinct, as the ends were

    def _place(self, slots: np.ndarray) -> None:
        """Put present slots at the first free position of their probe sequences: a first round
        at each home position alone (where most go), then WINDOW positions a round. Several
        slots may pick one position in a round: one of the writes stays, read back (no sort),
        and the others look again next round."""
        pos = self._hash[slots] & self._mask
        at = self._pos[pos]
        free = np.flatnonzero(at < 0)
        self._pos[pos[free]] = slots[free]
        won = free[self._pos[pos[free]] == slots[free]]
        self._tombs -= int(np.count_nonzero(at[won] == TOMB))
        rest = np.ones(len(slots), dtype=bool)
        rest[won] = False
        pending, pos = slots[rest], (pos[rest] + 1) & self._mask
        while pending.size:
            window = (pos[:, None] + _AHEAD) & self._mask
            at = self._pos[window]
            free = at < 0
            has = free.any(axis=1)
            rows = np.flatnonzero(has)
            col = free[rows].argmax(axis=1)  # each row's first free position
            target, was = window[rows, col], at[rows, col]
            self._pos[target] = pending[rows]
            won = self._pos[target] == pending[rows]
            self._tombs -= int(np.count_nonzero(was[won] == TOMB))
            rest = np.ones(len(pending), dtype=bool)
            rest[rows[won]] = False
            pos = np.where(has, pos, (pos + WINDOW) & self._mask)  # a full window: the next one
            pending, pos = pending[rest], pos[rest]

    def _rebuild(self) -> None:
        """The probe table anew from the present slots, without tombstones."""
        self._pos.fill(EMPTY)
        self._tombs = 0
        self.rebuilds += 1
        self._place(np.flatnonzero(self._present))
