"""The device state table: one preallocated row per device slot, on the engine's torch device.

CPU side: an ordered id -> slot map (least recently seen first), a free list and the last-seen
time per slot. Accelerator side: rows of ``width`` columns, gathered and scattered for a batch
by one index tensor. The first ``lead_width`` columns (the LSTM's h and c) may be kept in
another dtype (bfloat16: half the bytes) in their own tensor ``lead``; the rest in ``rest``
(float32). With one dtype both are views of one (capacity, width) tensor ``rows``. What a row
holds is the engine's business (see engine.StateLayout); the table only guarantees that a slot
given to a new device reads as zeros.

Bytes per device: width x 4 (or lead_width x 2 + the rest x 4 under bfloat16) on the torch
device, plus on the CPU 8 (last seen) + 4 (partition) + 8 (free stack) + 8 (slot -> id) bytes
and the id -> slot entry (an OrderedDict entry and a Python int, ~112 bytes) with its key, the
id string (bench/scale.py measures them).

Eviction is explicit and counted: idle devices past the TTL, and at capacity the least recently
seen device not in the current batch. A device evicted and seen again starts from zeros.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streamer.errors import CapacityError

NO_PARTITION = -1


@dataclass(frozen=True)
class Acquired:
    """Slots for a batch's devices, in the order asked."""

    slots: np.ndarray  # (n,) int64
    new_devices: int  # devices that got a fresh (zeroed) slot
    evicted_for_capacity: int  # devices dropped to make room


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
        self._rows: Tensor | None = None
        self._scratch: dict[int, Tensor] = {}  # gather(scratch=True)'s buffers, per row count
        if self.lead_dtype == dtype:
            self._rows = torch.zeros(capacity, width, device=self.device, dtype=dtype)
            self.lead: Tensor = self._rows[:, :lead_width]
            self.rest: Tensor = self._rows[:, lead_width:]
        else:
            self.lead = torch.zeros(capacity, lead_width, device=self.device, dtype=self.lead_dtype)
            self.rest = torch.zeros(capacity, width - lead_width, device=self.device, dtype=dtype)
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently seen first
        self._device_of: list[str | None] = [None] * capacity
        self._last_seen = np.zeros(capacity, dtype=np.float64)
        self._partition = np.full(capacity, NO_PARTITION, dtype=np.int32)  # input partition per slot
        # A stack of free slots (top at _n_free - 1): slot 0 is handed out first.
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)
        self._n_free = capacity

    @property
    def rows(self) -> Tensor:
        """All rows (capacity, width) in the table's dtype: the storage itself when lead and rest
        share a dtype, else a copy."""
        if self._rows is not None:
            return self._rows
        return torch.cat([self.lead.to(self.dtype), self.rest], dim=1)

    @property
    def state_bytes(self) -> int:
        """Bytes of row storage on the torch device."""
        return sum(t.element_size() * t.shape[0] * t.shape[1] for t in (self.lead, self.rest))

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._slot_of

    def slot_of(self, device_id: str) -> int | None:
        return self._slot_of.get(device_id)

    def last_seen(self, device_id: str) -> float | None:
        slot = self._slot_of.get(device_id)
        return None if slot is None else float(self._last_seen[slot])

    def device_ids(self) -> list[str]:
        """Known devices, least recently seen first."""
        return list(self._slot_of)

    def acquire(self, device_ids: Sequence[str], now: float, partitions: np.ndarray | None = None) -> Acquired:
        """Slots for distinct ``device_ids``, marking them seen at ``now``.

        Known devices keep their slot and rows; new ones get a zeroed slot, from the free list
        or by evicting the least recently seen devices outside this call. ``partitions`` (one per
        device) records which input partition each device's readings come from.
        """
        if len(device_ids) > self.capacity:
            raise CapacityError(
                f"{len(device_ids)} distinct devices in one batch exceed the state table capacity {self.capacity}"
            )
        slot_of = self._slot_of
        found = list(map(slot_of.get, device_ids))
        # First touch every known device, so that eviction below can only pick devices outside
        # this batch (they are all older than anything touched here). The loops run in C when
        # every device is known, the steady state.
        if None not in found:
            new_positions: list[int] = []
            deque(map(slot_of.move_to_end, device_ids), maxlen=0)
            slots = np.array(found, dtype=np.int64)
        else:
            new_positions = [pos for pos, slot in enumerate(found) if slot is None]
            for device_id, slot in zip(device_ids, found):
                if slot is not None:
                    slot_of.move_to_end(device_id)
            slots = np.array([-1 if slot is None else slot for slot in found], dtype=np.int64)
        evicted = 0
        device_of = self._device_of
        for pos in new_positions:
            if not self._n_free:
                self._evict_oldest()
                evicted += 1
            self._n_free -= 1
            slot = int(self._free[self._n_free])
            device_id = device_ids[pos]
            slot_of[device_id] = slot
            device_of[slot] = device_id
            slots[pos] = slot
        self._last_seen[slots] = now
        if partitions is not None:
            self._partition[slots] = partitions
        if new_positions:
            fresh = torch.from_numpy(slots[new_positions]).to(self.device)
            for block in self._blocks():
                block.index_fill_(0, fresh, 0)
        return Acquired(slots, len(new_positions), evicted)

    def evict_idle(self, now: float) -> int:
        """Evict devices not seen for more than ttl_seconds before ``now``; returns how many."""
        if self.ttl_seconds is None:
            return 0
        cutoff = now - self.ttl_seconds
        evicted = 0
        while self._slot_of:
            device_id, slot = next(iter(self._slot_of.items()))
            if self._last_seen[slot] >= cutoff:
                break
            self._release(device_id)
            evicted += 1
        return evicted

    def evict(self, device_id: str) -> bool:
        """Drop one device; its next reading starts from zeros."""
        if device_id not in self._slot_of:
            return False
        self._release(device_id)
        return True

    def slots_of_partition(self, partition: int) -> np.ndarray:
        """Occupied slots whose devices read from ``partition``, ascending."""
        return np.flatnonzero(self._partition == partition)

    def export(self, slots: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(device ids, rows (n, width) float32 on the CPU, last seen (n,)) of ``slots``."""
        ids = [self._device_of[int(slot)] for slot in slots]
        rows = self.gather(torch.from_numpy(slots).to(self.device)).cpu().numpy()
        return ids, rows, self._last_seen[slots].copy()

    def restore(self, device_ids: Sequence[str], rows: np.ndarray, last_seen: np.ndarray, partition: int) -> int:
        """Put exported devices back, bitwise, replacing what the table had for them.

        Returns the devices evicted to make room. Restored devices keep their last-seen times
        and enter the recency order oldest first.
        """
        if rows.shape != (len(device_ids), self.width):
            raise ValueError(f"rows of shape {rows.shape} for {len(device_ids)} devices of width {self.width}")
        if len(device_ids) == 0:
            return 0
        order = np.argsort(last_seen, kind="stable")
        ids = [device_ids[i] for i in order]
        acquired = self.acquire(ids, now=0.0, partitions=np.full(len(ids), partition, np.int32))
        self._last_seen[acquired.slots] = last_seen[order]
        slots = torch.from_numpy(acquired.slots).to(self.device)
        self.scatter(slots, torch.from_numpy(np.ascontiguousarray(rows[order])).to(self.device, self.dtype))
        return acquired.evicted_for_capacity

    def drop_partition(self, partition: int) -> int:
        """Evict every device of ``partition`` (its partition moved elsewhere); returns how many."""
        slots = self.slots_of_partition(partition)
        for slot in slots:
            self._release(self._device_of[int(slot)])
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

    def _blocks(self) -> tuple[Tensor, ...]:
        return (self._rows,) if self._rows is not None else (self.lead, self.rest)

    def _evict_oldest(self) -> None:
        device_id = next(iter(self._slot_of))
        self._release(device_id)

    def _release(self, device_id: str) -> None:
        slot = self._slot_of.pop(device_id)
        self._device_of[slot] = None
        self._partition[slot] = NO_PARTITION
        self._free[self._n_free] = slot
        self._n_free += 1
