"""The device state table: one preallocated row per device slot, on the engine's torch device.

CPU side: an id -> slot map (streamer.slotmap: a batch's ids looked up together in numpy
arrays, not one dict lookup each), a free list, the last-seen time per slot and the recency
order: a log of touches (slot, touch number) oldest first, in which a slot's entry counts only
while it is the slot's latest touch (``_touched``), so that seeing a known device costs a
vectorised write, not a reordering of the map per device. Eviction reads the log from its oldest end. The
log is a ring: what eviction leaves behind its oldest end is room for new touches, so devices
coming and going need no compaction. A device seen again leaves its older entry dead: the head
passes over those at the oldest end (``_trim``: devices reporting in turn leave theirs there),
and a sweep moves the live entries together a bounded amount per touch once dead entries are
many (``_sweep``), so that no one batch pays for the whole table.

Accelerator side: rows of ``width`` columns, gathered and scattered for a batch by one index
tensor. The first ``lead_width`` columns (the LSTM's h and c) may be kept in
another dtype (bfloat16: half the bytes) in their own tensor ``lead``; the rest in ``rest``
(float32). With one dtype both are views of one (capacity + 1, width) tensor. What a row holds
is the engine's business (see engine.StateLayout); the table only guarantees that a slot given
to a new device reads as zeros. Row ``sink`` (= capacity) belongs to no device: a step padded to
a fixed row count points its padding there (engine: CUDA graphs), and reads back what it wrote.

Bytes per device: width x 4 (or lead_width x 2 + the rest x 4 under bfloat16) on the torch
device, plus on the CPU 8 (last seen) + 8 (latest touch) + 4 (partition) + 8 (free stack)
bytes, 12 x LOG_ROOM (the touch log; up to 12 x (1 + the largest batch's share of the
capacity) once a batch has touched more than half of the table), the id -> slot map (per
slot its hash, its id (the slot -> id) and a flag: 17 bytes, and 16-32 of probe table; against
~63 for a dict entry and its int, and 8 for a list of ids) and the id string itself
(bench/scale.py measures them).

Eviction is explicit and counted: idle devices past the TTL, and at capacity the least recently
seen device not in the current batch. A device evicted and seen again starts from zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streamer.errors import CapacityError
from streamer.slotmap import Keys, SlotMap, hashes_repeat, keys_of

NO_PARTITION = -1
LOG_ROOM = 1.5  # touch log entries per slot: the ring's size
LOG_MIN = 1024
# Dead entries (a device seen again leaves its older entry dead) go two ways, a bounded amount
# per touch, so that no step pays for the whole table (at 10M devices compacting the whole log
# at once had been a pause of 190-440 ms, bench/scale.py):
# - those at the log's oldest end are passed over by the head (devices reporting in turn, the
#   oldest seen again first, leave theirs there): up to TRIM_RATIO entries per entry touched;
# - once dead entries pass SWEEP_START of the capacity, a sweep moves the live ones together,
#   SWEEP_RATIO entries per entry touched (at least SWEEP_MIN), starting again within the touch
#   if it reaches the tail with budget left and dead entries are still many.
# A touched entry makes one dead entry at most, and is answered by SWEEP_RATIO swept: a pass
# of the sweep over the ring (at most LOG_ROOM x the capacity) leaves at most LOG_ROOM /
# (SWEEP_RATIO - 1) of the capacity (0.21) dead behind it, so dead entries stay under about
# SWEEP_START + 0.21 = 0.46 of the capacity, within the LOG_ROOM - 1 (0.5) that the ring has for
# them (tests/test_state.py holds it for devices in turn, at random, with newcomers, and with
# batches of half the table among small ones).
TRIM_RATIO = 2
SWEEP_START = 0.25
SWEEP_RATIO = 8
SWEEP_MIN = 1024
DEAD = -1  # a log entry's touch number where the sweep left a gap: no slot's latest touch


@dataclass(frozen=True)
class Acquired:
    """Slots for a batch's devices, in the order asked."""

    slots: np.ndarray  # (n,) int64
    new_devices: int  # devices that got a fresh (zeroed) slot
    evicted_for_capacity: int  # devices dropped to make room


def _log_size(capacity: int) -> int:
    return max(LOG_MIN, int(capacity * LOG_ROOM))


def table_bytes(capacity: int, width: int, dtype: torch.dtype = torch.float32, lead_width: int = 0,
                lead_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(rows, bookkeeping): the bytes a DeviceStateTable of these arguments allocates when it is
    made, its rows on its torch device and its bookkeeping on the CPU (the module docstring's
    list; the ids' strings come with the devices)."""
    lead_dtype = lead_dtype or dtype
    rows = (capacity + 1) * (lead_width * lead_dtype.itemsize + (width - lead_width) * dtype.itemsize)
    log_entry = (4 if capacity < 2**31 else 8) + 8
    bookkeeping = capacity * (8 + 8 + 4 + 8) + _log_size(capacity) * log_entry + SlotMap.bytes_for(capacity)
    return rows, bookkeeping


class DeviceStateTable:
    def __init__(
        self,
        capacity: int,
        width: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        ttl_seconds: float | None = None,
        lead_width: int = 0,
        lead_dtype: torch.dtype | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0 or None, got {ttl_seconds}")
        if not 0 <= lead_width <= width:
            raise ValueError(f"lead_width must be in [0, {width}], got {lead_width}")
        self.capacity = capacity
        self.width = width
        self.device = torch.device(device)
        self.ttl_seconds = ttl_seconds
        self.dtype = dtype
        self.lead_width = lead_width
        self.lead_dtype = lead_dtype or dtype
        self.sink = capacity  # the padding row: no device's
        self._rows: Tensor | None = None
        self._scratch: dict[int, Tensor] = {}  # gather(scratch=True)'s buffers, per row count
        if self.lead_dtype == dtype:
            self._rows = torch.zeros(capacity + 1, width, device=self.device, dtype=dtype)
            self.lead: Tensor = self._rows[:, :lead_width]
            self.rest: Tensor = self._rows[:, lead_width:]
        else:
            self.lead = torch.zeros(capacity + 1, lead_width, device=self.device, dtype=self.lead_dtype)
            self.rest = torch.zeros(capacity + 1, width - lead_width, device=self.device, dtype=dtype)
        self._slot_of = SlotMap(capacity)  # id -> slot, probed per batch (streamer.slotmap)
        self._device_of = self._slot_of.ids  # slot -> id (None: free), an object array
        self._last_seen = np.full(capacity, -np.inf)  # -inf on free slots: max() is the newest device's
        # Recency: touch number of each slot's latest touch (0: free), and the log of touches,
        # live between _log_head and _log_tail, oldest first. Head and tail count entries; an
        # entry's position is its count modulo the log's size (a ring).
        self._touched = np.zeros(capacity, dtype=np.int64)
        self._touches = 0
        log_size = _log_size(capacity)
        self._log_slot = np.zeros(log_size, dtype=np.int32 if capacity < 2**31 else np.int64)
        self._log_touch = np.zeros(log_size, dtype=np.int64)
        self._log_head = self._log_tail = 0
        # The sweep (None: none under way): live entries of [_log_head, _sweep_read) are moved,
        # in order, to [_log_head, _sweep_write); [_sweep_write, _sweep_read) is a gap of DEAD
        # entries; [_sweep_read, _log_tail) is not swept yet. When it reaches the tail, the
        # tail comes back to _sweep_write. Eviction reaching the gap jumps over it.
        self._sweep_read: int | None = None
        self._sweep_write = 0
        self._partition = np.full(capacity, NO_PARTITION, dtype=np.int32)  # input partition per slot
        self._now = -np.inf  # the latest ``now`` acquire was given
        self._newest = -np.inf  # the latest last-seen time written (acquire's, or a restored one)
        # A stack of free slots (top at _n_free - 1): slot 0 is handed out first.
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)
        self._n_free = capacity

    @property
    def rows(self) -> Tensor:
        """The devices' rows (capacity, width) in the table's dtype: a view of the storage when
        lead and rest share a dtype, else a copy."""
        if self._rows is not None:
            return self._rows[: self.capacity]
        return torch.cat([self.lead[: self.capacity].to(self.dtype), self.rest[: self.capacity]], dim=1)

    @property
    def state_bytes(self) -> int:
        """Bytes of row storage on the torch device."""
        return sum(t.element_size() * t.shape[0] * t.shape[1] for t in (self.lead, self.rest))

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, device_id: str) -> bool:
        return self._slot_of.get(device_id) is not None

    def slot_of(self, device_id: str) -> int | None:
        return self._slot_of.get(device_id)

    def last_seen(self, device_id: str) -> float | None:
        slot = self._slot_of.get(device_id)
        return None if slot is None else float(self._last_seen[slot])

    def device_ids(self) -> list[str]:
        """Known devices, least recently seen first."""
        return self._device_of[self._live_entries(self._log_head, self._log_tail)[0]].tolist()

    def acquire(
        self, device_ids: Sequence[str], now: float, partitions: np.ndarray | None = None,
        keys: Keys | None = None,
    ) -> Acquired:
        """Slots for distinct ``device_ids``, marking them seen at ``now``.

        Known devices keep their slot and rows; new ones get a zeroed slot, from the free list
        or by evicting the least recently seen devices outside this call. ``partitions`` (one per
        device) records which input partition each device's readings come from. ``keys``: the
        ``slotmap.keys_of(device_ids)`` when the caller has them already.
        """
        if len(device_ids) > self.capacity:
            raise CapacityError(
                f"{len(device_ids)} distinct devices in one batch exceed the state table capacity {self.capacity}"
            )
        # A clock stepped back does not make devices older than those seen before (TTL and
        # capacity eviction read the touch log as last-seen order), nor does a restored checkpoint
        # stamped by a host whose clock ran ahead: a device seen after it had been stamped before
        # its devices and queued after them, and TTL stopped at them, short of the idle ones.
        # Such stamps last while a device stamped ahead is in the table (drop_partition looks again).
        self._now = max(now, self._now)
        now = self._newest = max(self._now, self._newest)
        hashes, ids = keys_of(device_ids) if keys is None else keys
        slots = self._slot_of.get_many((hashes, ids))
        new_positions = np.flatnonzero(slots < 0)
        if len(new_positions) > 1 and not _distinct(hashes[new_positions], ids[new_positions]):
            raise ValueError("acquire: device ids must be distinct")
        # First touch every known device, so that eviction below can only pick devices outside
        # this batch (they are all older than anything touched here).
        self._touch(slots if not len(new_positions) else slots[slots >= 0])
        evicted = max(0, len(new_positions) - self._n_free)
        if len(new_positions):
            # New devices take the free slots first (top of the stack first), then the victims'.
            victims = self._oldest(evicted) if evicted else np.zeros(0, dtype=np.int64)
            self._release_slots(victims, free=False)
            taken = len(new_positions) - evicted
            fresh = np.concatenate([self._free[self._n_free - taken : self._n_free][::-1], victims])
            self._n_free -= taken
            self._slot_of.insert_many((hashes[new_positions], ids[new_positions]), fresh)  # slot -> id too
            slots[new_positions] = fresh
            self._touch(fresh)
        self._last_seen[slots] = now
        if partitions is not None:
            self._partition[slots] = partitions
        if len(new_positions):
            rows = torch.from_numpy(slots[new_positions]).to(self.device)
            for block in self.blocks():
                block.index_fill_(0, rows, 0)
        return Acquired(slots, len(new_positions), evicted)

    def reset(self, slots: Tensor) -> None:
        """Zero the rows of ``slots`` (their devices stay, their state starts afresh, as a new device's)."""
        for block in self.blocks():
            block.index_fill_(0, slots.to(self.device), 0)

    def evict_idle(self, now: float) -> int:
        """Evict devices not seen for more than ttl_seconds before ``now``; returns how many."""
        if self.ttl_seconds is None:
            return 0
        cutoff = now - self.ttl_seconds
        evicted = 0
        while self._skip_gap() < self._log_tail:
            # The oldest devices in windows of the log: release up to the first one seen since.
            stop = min(self._log_tail, self._log_head + max(LOG_MIN, 4 * evicted))
            window, live = self._entries(self._log_head, stop)
            idle = live & (self._last_seen[window] < cutoff)
            recent = np.flatnonzero(live & ~idle)
            end = int(recent[0]) if len(recent) else len(window)
            gone = window[:end][idle[:end]].astype(np.int64)
            self._release_slots(gone)
            evicted += len(gone)
            self._log_head += end
            if len(recent):
                break
        return evicted

    def evict(self, device_id: str) -> bool:
        """Drop one device; its next reading starts from zeros."""
        return self.evict_many([device_id]) == 1

    def evict_many(self, device_ids: Sequence[str]) -> int:
        """Drop these devices (those known; an id given twice counts once); returns how many."""
        slots = self._slot_of.get_many(keys_of(device_ids))
        slots = slots[slots >= 0]
        _, first = np.unique(slots, return_index=True)
        slots = slots[np.sort(first)]  # in the order given: the last one is handed out first
        self._release_slots(slots)
        return len(slots)

    def slots_of_partition(self, partition: int) -> np.ndarray:
        """Occupied slots whose devices read from ``partition``, ascending."""
        return np.flatnonzero(self._partition == partition)

    def export(self, slots: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(device ids, rows (n, width) float32 on the CPU, last seen (n,)) of ``slots``."""
        ids = self._device_of[np.asarray(slots, dtype=np.int64)].tolist()
        rows = self.gather(torch.from_numpy(slots).to(self.device)).cpu().numpy()
        return ids, rows, self._last_seen[slots].copy()

    def restore(self, device_ids: Sequence[str], rows: np.ndarray, last_seen: np.ndarray, partition: int) -> int:
        """Put exported devices back, bitwise, replacing what the table had for them.

        Returns the devices evicted to make room. Restored devices keep their last-seen times
        and take their places in the recency order by them (among equal times after the devices
        there), so that TTL and capacity eviction reach them when their times say, not after
        every device seen before the restore. More devices than the table holds (its capacity
        lowered since they were exported): the ``capacity`` seen last are restored, as the table
        would have kept them, and the others are left out, counted with the evicted; they start
        from zero when seen again, as evicted devices do.
        """
        if rows.shape != (len(device_ids), self.width):
            raise ValueError(f"rows of shape {rows.shape} for {len(device_ids)} devices of width {self.width}")
        if len(device_ids) == 0:
            return 0
        order = np.argsort(last_seen, kind="stable")
        left_out = max(0, len(order) - self.capacity)
        order = order[left_out:]
        ids = [device_ids[i] for i in order]
        newest_before = self._newest
        acquired = self.acquire(ids, now=0.0, partitions=np.full(len(ids), partition, np.int32))
        # acquire touched the devices the table had first, then the new ones: touched again here,
        # all of them, in last-seen order (a restored device already in the table had been taken
        # as older than a new one seen before it, and evicted first).
        self._touch(acquired.slots)
        self._last_seen[acquired.slots] = last_seen[order]
        slots = torch.from_numpy(acquired.slots).to(self.device)
        self.scatter(slots, torch.from_numpy(np.ascontiguousarray(rows[order])).to(self.device, self.dtype))
        self._newest = max(self._newest, float(last_seen[order[-1]]))
        if len(self) > len(ids) and last_seen[order[0]] < newest_before:
            self._order_log_by_last_seen()
        return acquired.evicted_for_capacity + left_out

    def drop_partition(self, partition: int) -> int:
        """Evict every device of ``partition`` (its partition moved elsewhere); returns how many."""
        slots = self.slots_of_partition(partition)
        self._release_slots(slots)
        # The newest stamp left: a partition restored from a host whose clock ran ahead no longer
        # stamps every later device ahead once it has gone (their TTL had waited out the skew).
        # Looked for only while stamps run ahead of our clock (one pass over the table).
        if self._newest > self._now:
            self._newest = float(self._last_seen.max())
        return len(slots)

    def gather(self, slots: Tensor, lead: bool = True, scratch: bool = False) -> Tensor:
        """rows[slots]: (n, width) in the table's dtype, a copy. lead=False leaves the lead
        columns of the copy unset (uninitialised): for a step that reads them from ``lead``.
        scratch=True: the copy is written into a buffer the table keeps per row count and hands
        out again at the next scratch gather of as many rows (a step's working copy): a fresh
        multi-MB tensor per call faults its pages in every time, which on the CPU cost more
        than the gather itself."""
        out = self._scratch_for(len(slots)) if scratch else None
        if lead and self._rows is not None:
            return self._rows.index_select(0, slots) if out is None else torch.index_select(self._rows, 0, slots, out=out)
        if out is None:
            out = torch.empty(len(slots), self.width, device=self.device, dtype=self.dtype)
        torch.index_select(self.rest, 0, slots, out=out[:, self.lead_width :])
        if lead:
            out[:, : self.lead_width] = self.lead.index_select(0, slots)
        return out

    def _scratch_for(self, n: int) -> Tensor:
        buf = self._scratch.get(n)
        if buf is None:
            if len(self._scratch) > 8:  # a few sizes recur (full chunks, a tail): keep those
                self._scratch.clear()
            buf = self._scratch[n] = torch.empty(n, self.width, device=self.device, dtype=self.dtype)
        return buf

    def scatter(self, slots: Tensor, values: Tensor, start: int = 0) -> None:
        """rows[slots, start : start + values.shape[1]] = values (cast to the columns' dtype);
        slots must be distinct."""
        stop = start + values.shape[1]
        if stop > self.width:
            raise ValueError(f"columns [{start}, {stop}) past the row width {self.width}")
        if self._rows is not None:
            target = self._rows if (start, stop) == (0, self.width) else self._rows[:, start:stop]
            target.index_copy_(0, slots, values.to(self.dtype))
            return
        lw = self.lead_width
        if start < lw:
            cut = min(stop, lw)
            self.lead[:, start:cut].index_copy_(0, slots, values[:, : cut - start].to(self.lead_dtype))
        if stop > lw:
            first = max(start, lw)
            self.rest[:, first - lw : stop - lw].index_copy_(0, slots, values[:, first - start :].to(self.dtype))

    def blocks(self) -> tuple[Tensor, ...]:
        """The row storage, sink row included: (rows,) when lead and rest share a dtype, else
        (lead, rest). The same tensors for the table's life, written in place."""
        return (self._rows,) if self._rows is not None else (self.lead, self.rest)

    def _touch(self, slots: np.ndarray) -> None:
        """Mark ``slots`` seen now, in their order: they become the most recent, the last one newest."""
        n = len(slots)
        if not n:
            return
        # Touched first: these slots' older entries are dead from now on, for the trim and the
        # sweep too (a sweep would otherwise move them as live, and leave them behind).
        touches = np.arange(self._touches + 1, self._touches + 1 + n, dtype=np.int64)
        self._touches += n
        self._touched[slots] = touches
        self._trim(max(LOG_MIN, TRIM_RATIO * n))
        # Every known device has one live entry, but these slots' are to come: the rest are dead.
        live = len(self._slot_of) - n
        budget = max(SWEEP_MIN, SWEEP_RATIO * n)
        while budget > 0:
            if self._sweep_read is None:
                if self._log_tail - self._log_head - live <= SWEEP_START * self.capacity:
                    break
                # A sweep starts (or starts again, with what is left of this touch's budget).
                self._sweep_read = self._sweep_write = self._log_head
            looked = self._sweep(budget)
            if not looked:  # nothing left to sweep: the head is at the tail
                break
            budget -= looked
        if self._log_tail - self._log_head + n > len(self._log_slot):
            self._compact_log(n)  # a batch of more than the ring's room
        at = self._positions(self._log_tail, self._log_tail + n)
        self._log_slot[at] = slots
        self._log_touch[at] = touches
        self._log_tail += n

    def _positions(self, start: int, stop: int) -> np.ndarray | slice:
        """Where log entries [start, stop) are: a slice, or positions where they wrap round."""
        size = len(self._log_slot)
        first = start % size
        if first + stop - start <= size:
            return slice(first, first + stop - start)
        return np.arange(start, stop, dtype=np.int64) % size

    def _entries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots of log entries [start, stop), and which are live (their slot's latest touch)."""
        at = self._positions(start, stop)
        slots = self._log_slot[at]
        return slots, self._touched[slots] == self._log_touch[at]

    def _live_entries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots and touch numbers of the live log entries in [start, stop), oldest first."""
        at = self._positions(start, stop)
        slots, touches = self._log_slot[at], self._log_touch[at]
        live = self._touched[slots] == touches
        return slots[live], touches[live]

    def _skip_gap(self) -> int:
        """The log's head, moved past the sweep's gap if it was in it."""
        if self._sweep_read is not None and self._sweep_write <= self._log_head < self._sweep_read:
            self._log_head = self._sweep_read
        return self._log_head

    def _trim(self, budget: int) -> None:
        """Move the log's head past the dead entries at its oldest end, looking at up to
        ``budget`` entries."""
        window = 64  # growing: most of the time the oldest entry is live, and one look is enough
        while budget > 0 and self._skip_gap() < self._log_tail:
            stop = min(self._log_tail, self._log_head + min(window, budget))
            _, live = self._entries(self._log_head, stop)
            if live.any():
                self._log_head += int(np.argmax(live))
                return
            budget -= stop - self._log_head
            self._log_head = stop
            window *= 4

    def _sweep(self, budget: int) -> int:
        """Sweep up to ``budget`` more log entries (see ``_sweep_read``): their live entries
        move back to the gap's start, in order, and where they were is DEAD. Returns how many
        it looked at."""
        head, tail = self._log_head, self._log_tail
        # Eviction may have taken the head past the gap, or past the swept part.
        write = max(self._sweep_write, head)
        read = max(self._sweep_read, head)
        stop = min(tail, read + budget)
        slots, touches = self._live_entries(read, stop)
        moved = write + len(slots)
        to = self._positions(write, moved)
        self._log_slot[to] = slots
        self._log_touch[to] = touches
        self._log_touch[self._positions(max(moved, read), stop)] = DEAD
        if stop == tail:
            self._log_tail = moved
            self._sweep_read = None
        else:
            self._sweep_read, self._sweep_write = stop, moved
        return stop - read

    def _compact_log(self, room: int) -> None:
        """Make ``room`` for more entries: finish the sweep under way; if that is not enough, keep
        the live entries only (one per device), at the log's start, growing it if need be."""
        if self._sweep_read is not None:
            self._sweep(self._log_tail - max(self._sweep_read, self._log_head))  # to the tail
            if self._log_tail - self._log_head + room <= len(self._log_slot):
                return
        slots, touches = self._live_entries(self._log_head, self._log_tail)
        self._write_log(slots, touches, room)

    def _write_log(self, slots: np.ndarray, touches: np.ndarray, room: int = 0) -> None:
        """The log afresh: these entries at its start, with ``room`` for more after them."""
        n = len(slots)
        if n + room > len(self._log_slot):
            size = n + max(room, self.capacity // 4 + 1)  # room for a quarter of the table's touches again
            self._log_slot = np.zeros(size, dtype=self._log_slot.dtype)
            self._log_touch = np.zeros(size, dtype=np.int64)
        self._log_slot[:n] = slots
        self._log_touch[:n] = touches
        self._log_head, self._log_tail = 0, n

    def _order_log_by_last_seen(self) -> None:
        """Write the touch log afresh, its live entries in last-seen order (stable): devices
        restored with their last-seen times were touched after devices seen later. O(devices):
        at a restore of a partition's devices among others, not per batch."""
        if self._sweep_read is not None:
            self._sweep(self._log_tail - max(self._sweep_read, self._log_head))  # to the tail
        slots, _ = self._live_entries(self._log_head, self._log_tail)
        slots = slots[np.argsort(self._last_seen[slots], kind="stable")]
        touches = np.arange(self._touches + 1, self._touches + 1 + len(slots), dtype=np.int64)
        self._touches += len(slots)
        self._touched[slots] = touches
        self._write_log(slots, touches)

    def _oldest(self, k: int) -> np.ndarray:
        """The k least recently seen devices' slots, oldest first; the log's head moves past them."""
        taken: list[np.ndarray] = []
        found = 0
        while found < k:
            if self._skip_gap() >= self._log_tail:
                raise RuntimeError(f"the touch log ran out after {found} of {k} devices to evict")  # a bug if seen
            stop = min(self._log_tail, self._log_head + max(LOG_MIN, 4 * (k - found)))
            window, live = self._entries(self._log_head, stop)
            live = np.flatnonzero(live)[: k - found]
            taken.append(window[live].astype(np.int64))
            found += len(live)
            self._log_head = self._log_head + int(live[-1]) + 1 if found == k else stop
        return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)

    def _release_slots(self, slots: np.ndarray, free: bool = True) -> None:
        """Forget the devices of ``slots`` (distinct, occupied); free=True puts the slots on the
        free stack (in order: the last one is handed out first)."""
        if not len(slots):
            return
        self._slot_of.delete_many(slots)  # slot -> id too
        self._touched[slots] = 0  # their log entries are dead
        self._partition[slots] = NO_PARTITION
        self._last_seen[slots] = -np.inf
        if free:
            self._free[self._n_free : self._n_free + len(slots)] = slots
            self._n_free += len(slots)


def _distinct(hashes: np.ndarray, ids: np.ndarray) -> bool:
    """No id twice: the ids compared (as a set) only when some hash repeats."""
    if not hashes_repeat(hashes):
        return True
    return len(set(ids.tolist())) == len(ids)
