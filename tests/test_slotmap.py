from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import slotmap
from streamer.engine import _plan_waves_by_id, plan_waves
from streamer.slotmap import SlotMap, keys_of
from streamer.state import DeviceStateTable


def keys(pairs):
    """Keys of made-up ids (hash, name): the hash is given, not computed, so that ids can share one."""
    ids = np.empty(len(pairs), dtype=object)
    ids[:] = [f"{h}/{name}" for h, name in pairs]
    return np.array([p[0] for p in pairs], dtype=np.int64), ids


# Ids from a tiny space: their hashes collide often (long probe runs, wrapping past the table's
# end); the ids tell them apart. Negative and extreme values as hashes too.
_K1 = st.sampled_from([0, 1, 7, 8, 15, -1, -8, 2**63 - 1, -(2**63)])
_KEY = st.tuples(_K1, st.integers(0, 3))
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.lists(_KEY, max_size=6, unique=True)),
        st.tuples(st.just("delete"), st.lists(_KEY, max_size=6, unique=True)),
        st.tuples(st.just("get"), st.lists(_KEY, max_size=8)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, capacity=st.integers(1, 12))
def test_slot_map_follows_a_dict(ops, capacity):
    # Inserts, deletes and lookups against a dict of id -> slot, with tombstones and rebuilds at
    # small capacities.
    table = SlotMap(capacity)
    model: dict[tuple[int, int], int] = {}
    for op, pairs in ops:
        if op == "insert":
            fresh = [p for p in pairs if p not in model][: capacity - len(model)]
            free = sorted(set(range(capacity)) - set(model.values()))[: len(fresh)]
            table.insert_many(keys(fresh), np.array(free, dtype=np.int64))
            model.update(zip(fresh, free))
        elif op == "delete":
            gone = [p for p in pairs if p in model]
            table.delete_many(np.array([model.pop(p) for p in gone], dtype=np.int64))
        got = table.get_many(keys(pairs))
        assert got.tolist() == [model.get(p, -1) for p in pairs]
        assert len(table) == len(model)
        assert table._live == np.count_nonzero(table._pos >= 0)
        assert table._tombs == np.count_nonzero(table._pos == slotmap.TOMB)
        assert table._live + table._tombs <= slotmap.MAX_FILL * len(table._pos)


def test_slot_map_refuses_what_would_corrupt_it():
    table = SlotMap(4)
    table.insert_many(keys([(1, 1), (2, 2)]), np.array([0, 1]))
    with pytest.raises(ValueError):
        table.insert_many(keys([(3, 3)]), np.array([1]))  # slot 1 is mapped
    with pytest.raises(ValueError):
        table.insert_many(keys([(3, 3), (4, 4)]), np.array([2, 2]))
    with pytest.raises(KeyError):
        table.delete_many(np.array([3]))
    with pytest.raises(KeyError):
        table.delete_many(np.array([0, 0]))
    assert table.get_many(keys([(1, 1), (2, 2), (3, 3)])).tolist() == [0, 1, -1]
    assert len(table) == 2 and table.ids.tolist()[:3] == ["1/1", "2/2", None]


def test_keys_are_the_ids_own_hashes():
    ids = [f"sensor-{i}" for i in range(2_000)] + ["", "é", "a\x00", "a"]
    hashes, objects = keys_of(ids)
    again = keys_of(["".join(list(i)) for i in ids])  # equal strings, other objects
    assert np.array_equal(hashes, again[0]) and objects.tolist() == ids
    table = SlotMap(len(ids))
    table.insert_many(again, np.arange(len(ids)))
    assert np.array_equal(table.get_many(keys_of(ids)), np.arange(len(ids)))
    assert table.get("absent") is None and table.get("a") == len(ids) - 1


def _assert_same_plan(fast, ids):
    """``fast`` is the plan of ``ids`` made by grouping the ids themselves."""
    exact = _plan_waves_by_id(ids) if ids else plan_waves(ids)
    assert fast.unique == exact.unique and np.array_equal(fast.first, exact.first)
    assert [(r.tolist(), u.tolist()) for r, u in fast.waves] == [(r.tolist(), u.tolist()) for r, u in exact.waves]


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=30))
def test_plan_by_hashes_is_the_plan_by_id(ids):
    with mock.patch("streamer.engine._plan_waves_by_id", side_effect=AssertionError("no collision: no fallback")):
        fast = plan_waves(ids)
    _assert_same_plan(fast, ids)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.sampled_from("abcde"), max_size=30),
       hash_of=st.fixed_dictionaries({k: st.sampled_from([0, 1, -(2**63)]) for k in "abcde"}))
def test_plan_by_hashes_that_collide_is_the_plan_by_id(ids, hash_of):
    # Hashes from three values: ids of one hash are often different devices.
    objects = np.empty(len(ids), dtype=object)
    objects[:] = ids
    keys = (np.array([hash_of[i] for i in ids], dtype=np.int64), objects)
    _assert_same_plan(plan_waves(ids, keys), ids)


def test_ids_whose_hashes_collide_are_still_two_devices():
    ids = ["x", "y", "x", "y", "y"]
    hashes = np.zeros(5, dtype=np.int64)  # every hash equal
    objects = np.array(ids, dtype=object)
    plan = plan_waves(ids, (hashes, objects))
    assert plan.unique == ["x", "y"] and [r.tolist() for r, _ in plan.waves] == [[0, 1], [2, 3], [4]]
    table = DeviceStateTable(capacity=2, width=1)
    got = table.acquire(["x", "y"], now=0.0, keys=(hashes[:2], objects[:2]))
    assert got.new_devices == 2 and sorted(got.slots.tolist()) == [0, 1]
    again = table.acquire(["y", "x"], now=1.0, keys=(hashes[:2], objects[1::-1].copy()))
    assert again.new_devices == 0 and again.slots.tolist() == got.slots.tolist()[::-1]
    assert table.device_ids() == ["y", "x"]


def test_acquire_refuses_a_new_device_twice():
    table = DeviceStateTable(capacity=4, width=1)
    with pytest.raises(ValueError, match="distinct"):
        table.acquire(["a", "b", "a"], now=0.0)
    assert len(table) == 0


def test_ids_made_to_collide_on_their_hash_are_two_devices():
    # CPython hashes a string's stored bytes: these two ids share their hash.
    ids = ["\x00\x01", "\u0100"]
    hashes, _ = keys_of(ids)
    assert hashes[0] == hashes[1]
    plan = plan_waves(ids + ids)
    assert plan.unique == ids and len(plan.waves) == 2
    table = DeviceStateTable(capacity=4, width=1)
    assert table.acquire(ids, now=0.0).new_devices == 2 and len(table) == 2
    assert table.acquire(ids[::-1], now=1.0).new_devices == 0
    assert table.slot_of(ids[0]) != table.slot_of(ids[1])


def test_evict_many_drops_the_known_ids_once_each():
    table = DeviceStateTable(capacity=4, width=1)
    table.acquire(["a", "b", "c"], now=0.0)
    assert table.evict_many(["b", "zz", "b", "a"]) == 2
    assert table.device_ids() == ["c"] and "a" not in table and "b" not in table
    # Released in the order given: "a" was given last, so its slot is handed out first.
    assert table.acquire(["d"], now=1.0).slots.tolist() == [0]
    assert table.evict_many([]) == 0


@pytest.mark.parametrize("home", ["first", "last"])
def test_an_id_behind_many_of_its_hash_is_found_windows_later(home):
    # Every id of one hash: a probe passes ids that fail the comparison, window after window;
    # from the last position it wraps past the table's end. Deletes leave tombstones in the run.
    table = SlotMap(40)
    h = 5 if home == "first" else table._mask
    pairs = [(h, f"id{i}") for i in range(40)]
    table.insert_many(keys(pairs), np.arange(40))
    gone = list(range(0, 40, 3))
    table.delete_many(np.array(gone))
    back = [(h, f"new{i}") for i in range(len(gone))]
    table.insert_many(keys(back), np.array(gone))
    model = {p: i for i, p in enumerate(pairs) if i not in gone} | dict(zip(back, gone))
    asked = pairs + back + [(h, "absent")]
    assert table.get_many(keys(asked)).tolist() == [model.get(p, -1) for p in asked]


def test_a_run_of_tombstones_that_ends_at_an_empty_position_is_empty_again():
    # Four ids of one hash in a run from their home; deleting the last two leaves nothing behind
    # them, so their positions are EMPTY again. Deleting the first leaves a tombstone: the ids
    # behind it are still reached through it.
    table = SlotMap(8)
    home = 3
    pairs = [(home, f"id{i}") for i in range(4)]
    for slot, pair in enumerate(pairs):  # one at a time: in this order along the run
        table.insert_many(keys([pair]), np.array([slot]))
    assert table._pos[home : home + 4].tolist() == [0, 1, 2, 3]
    table.delete_many(np.array([3, 2]))
    assert table._pos[home : home + 5].tolist() == [0, 1, slotmap.EMPTY, slotmap.EMPTY, slotmap.EMPTY]
    assert table._tombs == 0
    table.delete_many(np.array([0]))
    assert table._pos[home : home + 2].tolist() == [slotmap.TOMB, 1]
    assert table._tombs == 1
    assert table.get_many(keys(pairs)).tolist() == [-1, 1, -1, -1]
    # The run's last entry gone: the tombstone before it goes too.
    table.delete_many(np.array([1]))
    assert (table._pos == slotmap.EMPTY).all() and table._tombs == 0


def test_a_run_that_wraps_past_the_end_is_cleared_back_across_it():
    table = SlotMap(8)
    last = table._mask
    pairs = [(last, f"id{i}") for i in range(3)]  # at the last position, then 0 and 1
    for slot, pair in enumerate(pairs):
        table.insert_many(keys([pair]), np.array([slot]))
    assert [table._pos[last], table._pos[0], table._pos[1]] == [0, 1, 2]
    table.delete_many(np.array([0, 1]))
    assert table._tombs == 2 and table.get_many(keys(pairs)).tolist() == [-1, -1, 2]
    table.delete_many(np.array([2]))
    assert (table._pos == slotmap.EMPTY).all() and table._tombs == 0


def test_churn_leaves_few_tombstones_and_needs_no_rebuild():
    # Each round the oldest devices go and as many new ones come, in their slots: tombstones
    # level off (about 0.4 per live entry) instead of growing until a rebuild.
    capacity, batch = 4096, 256
    table = SlotMap(capacity)
    table.insert_many(keys_of([f"d{i}" for i in range(capacity)]), np.arange(capacity))
    next_id = capacity
    for r in range(200):  # 12 times the capacity replaced
        victims = (np.arange(batch) + r * batch) % capacity
        table.delete_many(victims)
        table.insert_many(keys_of([f"d{i}" for i in range(next_id, next_id + batch)]), victims)
        next_id += batch
    assert table.rebuilds == 0
    assert table._tombs == np.count_nonzero(table._pos == slotmap.TOMB) < 0.6 * capacity
    newest = [f"d{i}" for i in range(next_id - capacity, next_id)]
    assert sorted(table.get_many(keys_of(newest)).tolist()) == list(range(capacity))
