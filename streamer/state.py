"""The device state table: one preallocated row per device slot, on the engine's torch device.

CPU side: an ordered id -> slot map (least recently seen first), a free list and the last-seen
time per slot. Accelerator side: ``rows`` (capacity, width), gathered and scattered for a
batch by one index tensor. What a row holds is the engine's business (see engine.StateLayout);
the table only guarantees that a slot given to a new device reads as zeros.

Eviction is explicit and counted: idle devices past the TTL, and at capacity the least recently
seen device not in the current batch. A device evicted and seen again starts from zeros.
"""

from __future__ import annotations

from collections import OrderedDict
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
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0 or None, got {ttl_seconds}")
        self.capacity = capacity
        self.width = width
        self.device = torch.device(device)
        self.ttl_seconds = ttl_seconds
        self.rows: Tensor = torch.zeros(capacity, width, device=self.device, dtype=dtype)
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently seen first
        self._device_of: list[str | None] = [None] * capacity
        self._last_seen = np.zeros(capacity, dtype=np.float64)
        self._partition = np.full(capacity, NO_PARTITION, dtype=np.int32)  # input partition per slot
        self._free: list[int] = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first

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
        slots = np.empty(len(device_ids), dtype=np.int64)
        new_positions: list[int] = []
        # First touch every known device, so that eviction below can only pick devices outside
        # this batch (they are all older than anything touched here).
        for pos, device_id in enumerate(device_ids):
            slot = slot_of.get(device_id)
            if slot is None:
                new_positions.append(pos)
            else:
                slot_of.move_to_end(device_id)
                slots[pos] = slot
        evicted = 0
        for pos in new_positions:
            if not self._free:
                self._evict_oldest()
                evicted += 1
            slot = self._free.pop()
            device_id = device_ids[pos]
            slot_of[device_id] = slot
            self._device_of[slot] = device_id
            slots[pos] = slot
        self._last_seen[slots] = now
        if partitions is not None:
            self._partition[slots] = partitions
        if new_positions:
            fresh = torch.from_numpy(slots[new_positions]).to(self.device)
            self.rows.index_fill_(0, fresh, 0)
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
        self.scatter(slots, torch.from_numpy(np.ascontiguousarray(rows[order])).to(self.device, self.rows.dtype))
        return acquired.evicted_for_capacity

    def drop_partition(self, partition: int) -> int:
        """Evict every device of ``partition`` (its partition moved elsewhere); returns how many."""
        slots = self.slots_of_partition(partition)
        for slot in slots:
            self._release(self._device_of[int(slot)])
        return len(slots)

    def gather(self, slots: Tensor) -> Tensor:
        """rows[slots]: (n, width), a copy."""
        return self.rows.index_select(0, slots)

    def scatter(self, slots: Tensor, values: Tensor) -> None:
        """rows[slots] = values; slots must be distinct."""
        self.rows.index_copy_(0, slots, values)

    def _evict_oldest(self) -> None:
        device_id = next(iter(self._slot_of))
        self._release(device_id)

    def _release(self, device_id: str) -> None:
        slot = self._slot_of.pop(device_id)
        self._device_of[slot] = None
        self._partition[slot] = NO_PARTITION
        self._free.append(slot)
