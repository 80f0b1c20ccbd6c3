"""The row cache without Redis: hits and misses, the byte budget (checked against the
memory Python really allocates), the maximum age, invalidation by keys and by view."""

from __future__ import annotations

import sys
import time
import tracemalloc

import pytest

from featurestore.cache.rows import ABSENT, ENTRY_OVERHEAD, SEGMENT_ENTRIES, RowCache
from featurestore.store import keys


def user_keys(ids: list[int] | range) -> list[bytes]:
    return keys.row_keys("proj", "user", keys.entity_tokens([list(ids)]))


def test_hits_and_misses() -> None:
    cache = RowCache("proj", 1 << 20)
    k0, k1, k2 = user_keys([0, 1, 2])
    assert cache.put(k0, b"row0", time.monotonic())
    assert cache.put(k1, b"row1", time.monotonic())
    assert cache.get_many([k0, k2, k1]) == [b"row0", None, b"row1"]
    assert len(cache) == 2 and k0 in cache and k2 not in cache
    assert sorted(cache.keys()) == [k0, k1]
    cache.put(k0, b"row0 v2", time.monotonic())  # a re-read replaces and moves to the end
    assert cache.get_many([k0]) == [b"row0 v2"] and len(cache) == 2
    assert list(cache.keys()) == [k1, k0]


def test_byte_budget_holds_under_a_flood_of_keys() -> None:
    budget = 200_000
    cache = RowCache("proj", budget)
    row = b"x" * 300
    now = time.monotonic()
    flood = user_keys(range(20_000))
    for key in flood:
        cache.put(key, row, now)
        assert cache.bytes <= budget
    size = sys.getsizeof(flood[-1]) + sys.getsizeof(row) + ENTRY_OVERHEAD
    assert len(cache) >= budget // size - SEGMENT_ENTRIES  # whole segments go at a time
    assert flood[-1] in cache and flood[0] not in cache  # first in, first out
    assert cache.evictions >= 20_000 - len(cache)
    assert not cache.put(b"proj:user:{big}", b"x" * (budget + 1), now)
    assert b"proj:user:{big}" not in cache and cache.bytes <= budget
    assert cache.put(b"proj:user:{none}", ABSENT, now)  # Redis had no row: cached too
    assert cache.get_many([b"proj:user:{none}"]) == [ABSENT]


@pytest.mark.parametrize("row_size", [40, 300, 2000])
def test_the_budget_bounds_the_memory_really_allocated(row_size: int) -> None:
    """The accounting against tracemalloc, with the cache owning its keys and rows (as in
    the server, where they come from requests and Redis replies) and churning."""
    budget = 8 << 20
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = RowCache("proj", budget)
        peak = 0
        for i in range(120_000):
            cache.put(b"proj:user:{%d}" % (i * 7919 % 90_000), b"r" * (row_size + i % 64), time.monotonic())
            if i % 997 == 0:
                peak = max(peak, tracemalloc.get_traced_memory()[0] - before)
        assert cache.bytes <= budget
        assert peak <= budget * 1.02, f"{peak} bytes allocated for a {budget} budget"
        assert peak >= budget * 0.6  # and the accounting does not waste half of it
    finally:
        tracemalloc.stop()


def test_no_row_is_served_past_its_maximum_age() -> None:
    cache = RowCache("proj", 1 << 20, max_age_s=0.2)
    k0, k1 = user_keys([0, 1])
    cache.put(k0, b"old", time.monotonic())
    time.sleep(0.1)
    for i in range(SEGMENT_ENTRIES):  # fill the first segment: k1 opens a new one
        cache.put(b"proj:user:{x%d}" % i, b"filler", time.monotonic())
    cache.put(k1, b"new", time.monotonic())
    time.sleep(0.15)  # k0 is 0.25 s old, k1 0.15 s
    assert cache.get_many([k0, k1]) == [None, b"new"]
    time.sleep(0.1)
    assert cache.get_many([k1]) == [None]
    assert len(cache) == 0 and cache.bytes == 0


def test_a_read_older_than_the_newest_segment_is_refused() -> None:
    cache = RowCache("proj", 1 << 20)
    k0, k1 = user_keys([0, 1])
    assert cache.put(k0, b"row", time.monotonic())
    assert not cache.put(k1, b"row", time.monotonic() - 5.0)  # a read that hung for 5 s


def test_invalidation_by_keys_and_by_view() -> None:
    cache = RowCache("proj", 1 << 20)
    now = time.monotonic()
    users = user_keys([1, 2, 3])
    items = keys.row_keys("proj", "item", keys.entity_tokens([[1, 2]]))
    for key in users + items:
        cache.put(key, b"row", now)
    epoch = cache.epoch
    assert cache.invalidate(user_keys([2, 7])) == user_keys([2])
    assert cache.epoch > epoch
    assert sorted(cache.invalidate_view("item")) == sorted(items)
    assert all(k not in cache for k in items) and len(cache) == 2
    assert cache.invalidate_view("unknown") == []
    assert cache.invalidate_view("use") == []  # a prefix of a view's name is another view
    before = cache.bytes
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 < before
    cache.put(users[0], b"row", time.monotonic())  # usable after a clear
    assert cache.get_many(users[:1]) == [b"row"]
