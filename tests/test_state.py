from collections import OrderedDict
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import state
from streamer.errors import CapacityError
from streamer.state import DeviceStateTable, table_bytes


def test_new_devices_get_zeroed_slots_and_keep_them():
    table = DeviceStateTable(capacity=4, width=3)
    got = table.acquire(["a", "b"], now=1.0)
    assert list(got.slots) == [0, 1] and got.new_devices == 2 and got.evicted_for_capacity == 0
    table.scatter(torch.tensor([0, 1]), torch.ones(2, 3))
    again = table.acquire(["b", "a", "c"], now=2.0)
    assert list(again.slots) == [1, 0, 2] and again.new_devices == 1
    assert torch.equal(table.gather(torch.tensor([0, 1, 2])), torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3]))
    assert table.last_seen("a") == 2.0 and len(table) == 3


def test_slots_are_reused_after_eviction_and_restart_from_zeros():
    table = DeviceStateTable(capacity=2, width=2)
    table.acquire(["a", "b"], now=1.0)
    table.scatter(torch.tensor([0, 1]), torch.full((2, 2), 7.0))
    assert table.evict("a")
    got = table.acquire(["c"], now=2.0)
    assert list(got.slots) == [0]  # a's slot, reused
    assert torch.equal(table.gather(torch.tensor([0])), torch.zeros(1, 2))
    back = table.acquire(["a"], now=3.0)  # a comes back: evicts b (least recent), from zeros
    assert back.new_devices == 1 and back.evicted_for_capacity == 1
    assert "b" not in table and torch.equal(table.gather(torch.from_numpy(back.slots)), torch.zeros(1, 2))


def test_ttl_evicts_idle_devices_only():
    table = DeviceStateTable(capacity=8, width=1, ttl_seconds=10.0)
    table.acquire(["old"], now=0.0)
    table.acquire(["mid"], now=5.0)
    table.acquire(["new"], now=12.0)
    assert table.evict_idle(now=12.0) == 1
    assert table.device_ids() == ["mid", "new"]
    assert table.evict_idle(now=15.0) == 0
    assert table.evict_idle(now=16.0) == 1 and table.device_ids() == ["new"]


def test_capacity_evicts_least_recently_seen_never_from_the_batch():
    table = DeviceStateTable(capacity=3, width=1)
    table.acquire(["a", "b", "c"], now=1.0)
    table.acquire(["a"], now=2.0)  # b is now the least recently seen
    table.scatter(torch.tensor([table.slot_of("a")]), torch.tensor([[5.0]]))
    # More distinct devices in one batch than the table holds cannot be served.
    with pytest.raises(CapacityError):
        table.acquire(["c", "a", "d", "e"], now=3.0)
    got = table.acquire(["c", "d"], now=3.0)  # b is evicted, a and c survive
    assert got.evicted_for_capacity == 1 and "b" not in table and "a" in table
    assert table.gather(torch.tensor([table.slot_of("a")])).item() == 5.0
    got = table.acquire(["e", "d", "c"], now=4.0)  # a is least recent outside the batch
    assert got.evicted_for_capacity == 1 and set(table.device_ids()) == {"c", "d", "e"}


def test_a_restore_of_more_devices_than_the_table_holds_keeps_those_seen_last():
    # A checkpoint written under a larger state.capacity: what a table of this size would have
    # kept (the devices seen last) comes back bitwise, the rest is left out and counted.
    big = DeviceStateTable(capacity=6, width=2)
    ids = ["a", "b", "c", "d", "e", "f"]
    for i, device in enumerate(["c", "a", "f", "b", "e", "d"]):  # seen in this order
        big.acquire([device], now=float(i), partitions=np.zeros(1, np.int32))
    big.scatter(torch.from_numpy(np.array([big.slot_of(d) for d in ids])), torch.arange(12.0).reshape(6, 2))
    exported, rows, seen = big.export(big.slots_of_partition(0))
    small = DeviceStateTable(capacity=3, width=2)
    small.acquire(["z"], now=9.0)
    assert small.restore(exported, rows, seen, partition=0) == 1 + 3  # z evicted for room, a, c, f left out
    assert small.device_ids() == ["b", "e", "d"] and [small.last_seen(d) for d in "bed"] == [3.0, 4.0, 5.0]
    for device in "bed":
        row = small.gather(torch.tensor([small.slot_of(device)]))[0]
        assert torch.equal(row, torch.from_numpy(rows[exported.index(device)]))
    assert small.restore([], np.zeros((0, 2), np.float32), np.zeros(0), partition=1) == 0


def test_restored_devices_are_evicted_when_their_last_seen_times_say_and_the_clock_never_goes_back():
    # A partition restored among devices seen since: its long-idle devices had been touched last,
    # so TTL eviction stopped at the recent ones before them, and capacity evicted those first.
    src = DeviceStateTable(capacity=4, width=1)
    src.acquire(["old"], now=10.0, partitions=np.zeros(1, np.int32))
    src.acquire(["mid"], now=990.0, partitions=np.zeros(1, np.int32))
    exported = src.export(src.slots_of_partition(0))
    table = DeviceStateTable(capacity=4, width=1, ttl_seconds=100.0)
    table.acquire(["a", "b"], now=1000.0)
    table.restore(*exported, partition=0)
    assert table.device_ids() == ["old", "mid", "a", "b"]
    assert table.evict_idle(1050.0) == 1 and "old" not in table  # cutoff 950
    got = table.acquire(["e", "f"], now=1060.0)  # room for one more: the least recently seen goes
    assert got.evicted_for_capacity == 1 and table.device_ids() == ["a", "b", "e", "f"]
    # A clock stepped back: "g" counts as seen at 1060, not before everything else.
    table.acquire(["g"], now=500.0)
    assert table.last_seen("g") == 1060.0 and table.device_ids()[-1] == "g"


def test_devices_seen_after_a_restore_from_a_clock_ahead_of_ours_are_not_stamped_before_its_devices():
    # The checkpoint's host stamped P at 560; ours reads 505 when Q comes. Stamped 505 and queued
    # after P, Q was out of last-seen order: TTL at 530 stopped at P, short of the idle Q, and
    # capacity evicted P (seen last) for R before Q.
    table = DeviceStateTable(capacity=10, width=1, ttl_seconds=10.0)
    table.acquire(["A"], now=500.0)
    table.restore(["P"], np.zeros((1, 1), np.float32), np.array([560.0]), partition=1)
    table.acquire(["Q"], now=505.0)
    assert table.last_seen("Q") == 560.0 and table.device_ids() == ["A", "P", "Q"]
    assert table.evict_idle(530.0) == 1 and table.device_ids() == ["P", "Q"]  # A alone is idle by every stamp
    small = DeviceStateTable(capacity=2, width=1)
    small.restore(["P"], np.zeros((1, 1), np.float32), np.array([560.0]), partition=1)
    small.acquire(["Q"], now=505.0)
    assert small.acquire(["R"], now=506.0).evicted_for_capacity == 1 and small.device_ids() == ["Q", "R"]
    # Once the partition stamped ahead has gone, devices are stamped by our clock again: their
    # TTL had waited out the skew for good (a day ahead: no device evicted for a day).
    ahead = DeviceStateTable(capacity=10, width=1, ttl_seconds=10.0)
    ahead.restore(["P"], np.zeros((1, 1), np.float32), np.array([1000.0 + 86_400]), partition=1)
    ahead.acquire(["Q"], now=1000.0, partitions=np.zeros(1, np.int32))
    assert ahead.last_seen("Q") == 87_400.0  # while P is here: not before it
    assert ahead.drop_partition(1) == 1
    ahead.acquire(["S"], now=1001.0, partitions=np.zeros(1, np.int32))
    assert ahead.last_seen("S") == 87_400.0  # Q, stamped ahead while P was here, is still here
    fresh = DeviceStateTable(capacity=10, width=1, ttl_seconds=10.0)
    fresh.restore(["P"], np.zeros((1, 1), np.float32), np.array([1000.0 + 86_400]), partition=1)
    fresh.drop_partition(1)
    fresh.acquire(["Q"], now=1000.0)
    assert fresh.last_seen("Q") == 1000.0 and fresh.evict_idle(1000.0 + 3600) == 1


@pytest.mark.parametrize("ttl", [None, 100.0])
def test_a_restore_orders_devices_the_table_had_among_the_new_by_their_last_seen_times(ttl):
    # "A" was in the table (read from partition 0 before a rebalance); partition 1's checkpoint
    # has it seen at 200 and "B" at 150. acquire had touched A before B, so B counted as the more
    # recent: capacity evicted A, and TTL kept B past its time.
    table = DeviceStateTable(capacity=3, width=1, ttl_seconds=ttl)
    table.acquire(["A"], now=100.0, partitions=np.zeros(1, np.int32))
    table.restore(["A", "B"], np.array([[1.0], [2.0]], np.float32), np.array([200.0, 150.0]), partition=1)
    assert table.device_ids() == ["B", "A"] and (table.last_seen("A"), table.last_seen("B")) == (200.0, 150.0)
    if ttl is None:
        table.acquire(["C"], now=300.0)
        assert table.acquire(["D"], now=400.0).evicted_for_capacity == 1
        assert sorted(table.device_ids()) == ["A", "C", "D"]
    else:
        assert table.evict_idle(260.0) == 1 and table.device_ids() == ["A"]  # cutoff 160


def test_a_bfloat16_lead_block_is_its_own_tensor_and_rows_read_as_float32():
    table = DeviceStateTable(capacity=4, width=5, lead_width=3, lead_dtype=torch.bfloat16)
    assert table.lead.dtype == torch.bfloat16 and table.rest.dtype == torch.float32
    assert table.state_bytes == (4 + 1) * (3 * 2 + 2 * 4)  # the sink row too
    table.acquire(["a", "b"], now=1.0)
    values = torch.tensor([[1.0, 2.0, 1.0 / 3.0, 4.0, 1.0 / 3.0], [5.0, 6.0, 7.0, 8.0, 9.0]])
    table.scatter(torch.tensor([0, 1]), values)
    got = table.gather(torch.tensor([0, 1]))
    assert got.dtype == torch.float32
    # Lead columns are rounded to bfloat16, the rest kept exactly.
    assert torch.equal(got[:, :3], values[:, :3].bfloat16().float()) and torch.equal(got[:, 3:], values[:, 3:])
    assert got[0, 2] != values[0, 2] and torch.equal(table.rows, torch.cat([got, torch.zeros(2, 5)]))
    # A scatter from a column on writes only those columns, across the two tensors.
    table.scatter(torch.tensor([1]), torch.tensor([[-1.0, -2.0]]), start=2)
    assert table.gather(torch.tensor([1])).tolist() == [[5.0, 6.0, -1.0, -2.0, 9.0]]
    # Without the lead columns, the rest is gathered in place.
    assert torch.equal(table.gather(torch.tensor([1]), lead=False)[:, 3:], torch.tensor([[-2.0, 9.0]]))
    with pytest.raises(ValueError, match="past the row width"):
        table.scatter(torch.tensor([0]), torch.ones(1, 3), start=3)


def test_one_dtype_keeps_one_tensor_and_lead_and_rest_are_views_of_it():
    table = DeviceStateTable(capacity=3, width=4, lead_width=2)
    table.acquire(["a"], now=0.0)
    table.lead[0] = 7.0
    table.rest[0] = 9.0
    assert table.rows.tolist()[0] == [7.0, 7.0, 9.0, 9.0]
    table.scatter(torch.tensor([0]), torch.tensor([[1.0, 2.0]]), start=1)
    assert table.rows.tolist()[0] == [7.0, 1.0, 2.0, 9.0]


def test_a_released_slot_is_handed_out_again_and_fresh_slots_are_zeroed_in_both_blocks():
    table = DeviceStateTable(capacity=3, width=3, lead_width=2, lead_dtype=torch.bfloat16)
    got = table.acquire(["a", "b", "c"], now=0.0)
    assert list(got.slots) == [0, 1, 2]
    table.scatter(torch.tensor([0, 1, 2]), torch.ones(3, 3))
    assert table.evict("b") and not table.evict("b")
    again = table.acquire(["d"], now=1.0)
    assert list(again.slots) == [1] and table.gather(torch.tensor([1])).tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="lead_width"):
        DeviceStateTable(capacity=1, width=2, lead_width=3)


class _Reference:
    """The table's bookkeeping as the plainest model: an ordered map, least recently seen first."""

    def __init__(self, capacity: int, ttl: float) -> None:
        self.capacity, self.ttl = capacity, ttl
        self.order: OrderedDict[str, list] = OrderedDict()  # id -> [last seen, partition]

    def acquire(self, ids: list[str], now: float, partition: int) -> tuple[int, int]:
        for device in ids:
            if device in self.order:
                self.order.move_to_end(device)
        new = [device for device in ids if device not in self.order]
        evicted = 0
        for device in new:
            if len(self.order) == self.capacity:
                self.order.popitem(last=False)
                evicted += 1
            self.order[device] = [now, partition]
        for device in ids:
            self.order[device] = [now, partition]
        return len(new), evicted

    def evict_idle(self, now: float) -> int:
        gone = 0
        while self.order and next(iter(self.order.values()))[0] < now - self.ttl:
            self.order.popitem(last=False)
            gone += 1
        return gone

    def drop_partition(self, partition: int) -> int:
        gone = [device for device, (_, p) in self.order.items() if p == partition]
        for device in gone:
            del self.order[device]
        return len(gone)


_IDS = [f"d{i}" for i in range(12)]
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.lists(st.sampled_from(_IDS), min_size=1, max_size=7, unique=True),
                  st.integers(0, 2)),
        st.tuples(st.just("idle")),
        st.tuples(st.just("evict"), st.sampled_from(_IDS)),
        st.tuples(st.just("drop"), st.integers(0, 2)),
        st.tuples(st.just("move"), st.integers(0, 2), st.integers(0, 2)),
    ),
    max_size=60,
)


# How the touch log is kept: (SWEEP_START, SWEEP_RATIO, SWEEP_MIN, TRIM_RATIO). The defaults
# sweep a small log at once; the others sweep always, or late, a few entries a touch, over
# evictions that move the head past the sweep, and too slowly to keep the log from filling
# (then it is compacted at once).
_SWEEPS = st.sampled_from([(state.SWEEP_START, state.SWEEP_RATIO, state.SWEEP_MIN, state.TRIM_RATIO),
                           (0.0, 1, 1, 1), (0.5, 2, 1, 1), (0.0, 1, 1, 0), (2.0, 1, 1, 1)])


def _keeping(log_min: int, sweep) -> mock._patch:
    start, ratio, least, trim = sweep
    return mock.patch.multiple(state, LOG_MIN=log_min, SWEEP_START=start, SWEEP_RATIO=ratio, SWEEP_MIN=least,
                               TRIM_RATIO=trim)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, capacity=st.integers(1, 6), log_min=st.sampled_from([1, 4, state.LOG_MIN]), sweep=_SWEEPS)
def test_recency_eviction_and_rows_follow_the_ordered_map_model(ops, capacity: int, log_min: int, sweep):
    # Every operation against the plainest model of the bookkeeping: the devices known and their
    # recency order, counts of new and evicted devices, and each known device's rows its own
    # (a device evicted and seen again reads zeros). A small touch log is swept, compacted and
    # grown often.
    with _keeping(log_min, sweep):
        _against_the_model(ops, capacity)


# Devices seen again and again in small batches, a few evicted by age: the log fills with dead
# entries and is swept while the same devices keep coming.
_REPEATS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.lists(st.sampled_from(_IDS[:8]), min_size=1, max_size=3, unique=True),
                  st.integers(0, 2)),
        st.tuples(st.just("idle")),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_REPEATS, capacity=st.integers(3, 10), sweep=_SWEEPS)
def test_the_touch_log_swept_a_little_at_a_time_keeps_the_recency_order(ops, capacity: int, sweep):
    with _keeping(1, sweep):
        _against_the_model(ops, capacity)


@pytest.mark.parametrize("pattern", ["in turn", "at random", "in turn, a tenth new", "at random, sizes mixed"])
@pytest.mark.parametrize("share", [24, 50, 150])
def test_the_touch_log_is_kept_a_little_per_touch(pattern: str, share: int):
    # Batches of capacity / share devices, seen again and again: in turn (the oldest first, as
    # devices reporting on a period), at random, in turn with a tenth of each batch new devices
    # that evict the oldest, or at random with every 20th batch half the table and the one after
    # it a few devices. The log never fills (no compaction of it all at once) with the ratios
    # alone (no minimum amounts), and keeps the recency order. Devices in turn leave their dead
    # entries at the oldest end, where the head passes them: no sweep.
    capacity = 3000
    n = capacity // share
    rng = np.random.default_rng(share)
    sweep = DeviceStateTable._sweep
    swept = []

    def sweeping(table, budget):
        swept.append(budget)
        return sweep(table, budget)

    with mock.patch.multiple(state, LOG_MIN=1, SWEEP_MIN=1), \
            mock.patch.object(DeviceStateTable, "_compact_log", side_effect=AssertionError("compacted at once")), \
            mock.patch.object(DeviceStateTable, "_sweep", sweeping):
        table = DeviceStateTable(capacity=capacity, width=1)
        ids = [f"d{i}" for i in range(capacity)]
        for start in range(0, capacity, n):
            table.acquire(ids[start : start + n], now=0.0)
        size = len(table._log_slot)
        fresh = capacity
        for step in range(20 * share):  # 20 times the capacity touched
            if pattern.startswith("at random"):
                k = n
                if pattern.endswith("mixed"):
                    k = {0: capacity // 2 - 1, 1: 20}.get(step % 20, n)
                batch = [ids[i] for i in rng.choice(capacity, k, replace=False).tolist()]
            else:
                oldest = table.device_ids()[:n]
                batch = oldest
                if pattern == "in turn, a tenth new":
                    batch = oldest[: n - n // 10] + [f"d{fresh + i}" for i in range(n // 10)]
                    fresh += n // 10
            table.acquire(batch, now=1.0 + step)
            assert table.device_ids()[-len(batch) :] == batch
        assert len(table._log_slot) == size and len(table) == capacity
        assert len(set(table.device_ids())) == capacity
        if pattern == "in turn":
            assert not swept


def _against_the_model(ops, capacity: int) -> None:
    table = DeviceStateTable(capacity=capacity, width=2, ttl_seconds=3.0)
    ref = _Reference(capacity, 3.0)
    marker: dict[str, float] = {}
    now = 0.0
    for op in ops:
        now += 1.0
        if op[0] == "acquire":
            ids, partition = op[1], op[2]
            if len(ids) > capacity:
                with pytest.raises(CapacityError):
                    table.acquire(ids, now, np.full(len(ids), partition, np.int32))
                continue
            got = table.acquire(ids, now, np.full(len(ids), partition, np.int32))
            fresh = [device for device in ids if device not in ref.order]
            assert (got.new_devices, got.evicted_for_capacity) == ref.acquire(ids, now, partition)
            rows = table.gather(torch.from_numpy(got.slots))
            for device, row in zip(ids, rows[:, 0].tolist()):
                assert row == (0.0 if device in fresh else marker[device])
            values = torch.tensor([[marker.setdefault(d, float(_IDS.index(d) + 1))] * 2 for d in ids])
            table.scatter(torch.from_numpy(got.slots), values)
        elif op[0] == "idle":
            assert table.evict_idle(now) == ref.evict_idle(now)
        elif op[0] == "evict":
            assert table.evict(op[1]) == (op[1] in ref.order)
            ref.order.pop(op[1], None)
        elif op[0] == "drop":
            assert table.drop_partition(op[1]) == ref.drop_partition(op[1])
        else:  # a partition's devices leave by checkpoint and come back by restore, elsewhere
            src, dst = op[1], op[2]
            ids, rows, seen = table.export(table.slots_of_partition(src))
            table.drop_partition(src)
            ref.drop_partition(src)
            order = np.argsort(seen, kind="stable")
            evicted = table.restore(ids, rows, seen, dst)
            _, ref_evicted = ref.acquire([ids[i] for i in order], 0.0, dst)
            for i in order:
                ref.order[ids[i]][0] = float(seen[i])
            # Restored devices take their places by their last-seen times (sorted is stable).
            ref.order = OrderedDict(sorted(ref.order.items(), key=lambda item: item[1][0]))
            assert evicted == ref_evicted
        assert table.device_ids() == list(ref.order) and len(table) == len(ref.order)
        for device, (seen_at, _) in ref.order.items():
            assert table.last_seen(device) == seen_at


@pytest.mark.parametrize("capacity, lead_dtype", [(3, torch.float32), (5000, torch.bfloat16), (70_000, torch.float32)])
def test_table_bytes_are_what_a_table_allocates(capacity: int, lead_dtype: torch.dtype):
    # What `run` and check-config hold against the memory available before a table is made.
    table = DeviceStateTable(capacity, 20, "cpu", lead_width=8, lead_dtype=lead_dtype)
    tensors = {id(v): v.nbytes for v in vars(table).values() if isinstance(v, torch.Tensor) and v._base is None}
    tensors |= {id(table._rows): table._rows.nbytes} if table._rows is not None else {}
    arrays = {v.ctypes.data: v.nbytes for owner in (table, table._slot_of) for v in vars(owner).values()
              if isinstance(v, np.ndarray)}  # slot -> id is one array under two names
    assert table_bytes(capacity, 20, torch.float32, 8, lead_dtype) == (sum(tensors.values()), sum(arrays.values()))


def test_a_table_past_the_memory_available_is_refused_before_it_is_made(monkeypatch):
    import streamer.engine
    from streamer.engine import Engine
    from tests.conftest import make_bundle

    monkeypatch.setattr(streamer.engine, "memory_room", lambda total=False: 5 * 2**20)
    with pytest.raises(CapacityError, match=r"state table capacity 100000: 0\.0\d GiB of rows and bookkeeping on the"
                                            r" host, more than the 0\.00 GiB of memory this process may still take"):
        Engine.build(make_bundle(input_size=2, hidden_size=8, seed=1), capacity=100_000, device="cpu")
    assert Engine.build(make_bundle(input_size=2, hidden_size=8, seed=1), capacity=1000, device="cpu").table.capacity == 1000
