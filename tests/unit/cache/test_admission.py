"""Admission without Redis: every row while the cache has room, then only keys as hot as
the last evicted ones; never a read that raced an invalidation; the bypass window."""

from __future__ import annotations

import time

import pytest

from featurestore.cache.admission import PROBE, ROOM, Admission
from featurestore.cache.rows import ABSENT, RowCache
from featurestore.cache.sketch import HotKeys
from featurestore.store import keys


def user_keys(ids: range | list[int]) -> list[bytes]:
    return keys.row_keys("proj", "user", keys.entity_tokens([list(ids)]))


def admission(cache_bytes: int = 1 << 20, *, admit_count: float = 1.0, bypass_window: int = 100_000) -> Admission:
    hot, rows = HotKeys(decay_s=0), RowCache("proj", cache_bytes)
    return Admission(hot, rows, admit_count=admit_count, bypass_window=bypass_window)


def test_every_row_and_absence_is_admitted_while_there_is_room() -> None:
    taking = admission()
    row_keys = user_keys(range(3))  # never requested: counts of 0
    assert taking.admit(row_keys, [b"r0", None, b"r2"], taking.rows.epoch, time.monotonic()) == 3
    assert taking.rows.get_many(row_keys) == [b"r0", ABSENT, b"r2"]


def test_a_read_that_raced_an_invalidation_is_not_admitted() -> None:
    taking = admission()
    epoch = taking.rows.epoch
    taking.rows.invalidate(user_keys([1]))
    assert taking.admit(user_keys([1]), [b"old"], epoch, time.monotonic(), admit_all=True) == 0
    assert len(taking.rows) == 0


def test_a_nearly_full_cache_admits_only_keys_as_hot_as_the_evicted_ones() -> None:
    budget = 4 << 20
    taking = admission(budget, admit_count=1.0)
    assert taking.bar == 1.0  # nothing evicted yet: admit_count
    start = 0
    while not (taking.rows.evictions and taking.rows.bytes > ROOM * budget):
        filler = user_keys(range(start, start + 1000))
        taking.hot.add(filler, weight=4.0)
        taking.admit(filler, [b"x" * 100] * len(filler), taking.rows.epoch, time.monotonic(), admit_all=True)
        start += 1000
    assert taking.bar == 4.0  # the evicted keys' median count
    cold, warm, hot = user_keys([10**6, 10**6 + 1, 10**6 + 2])
    taking.hot.add([warm], weight=3.0)  # above admit_count, under the bar
    taking.hot.add([hot], weight=4.0)
    assert taking.admit([cold, warm, hot], [b"row"] * 3, taking.rows.epoch, time.monotonic()) == 1
    assert hot in taking.rows and cold not in taking.rows and warm not in taking.rows
    assert taking.admit([cold], [b"row"], taking.rows.epoch, time.monotonic(), admit_all=True) == 1


@pytest.mark.parametrize(
    ("hits", "lookups", "bypassed"),
    [(49, 100, True), (50, 100, False), (0, 99, False), (0, 100, True), (100, 100, False)],
    ids=["under-half", "half", "window-not-over", "no-hits", "all-hits"],
)
def test_the_window_hit_ratio_decides_the_bypass(hits: int, lookups: int, bypassed: bool) -> None:
    taking = admission(bypass_window=100)
    taking.measure(hits, lookups)
    assert taking.bypassed is bypassed


def test_while_bypassed_one_read_in_sixteen_goes_through_the_cache() -> None:
    taking = admission(bypass_window=100)
    assert not any(taking.skips() for _ in range(2 * PROBE))  # not bypassed: none skips
    taking.measure(0, 100)
    assert [taking.skips() for _ in range(2 * PROBE)].count(False) == 2  # the probes
    taking.measure(30, 50)  # a window half measured decides nothing yet
    assert taking.bypassed
    taking.measure(50, 50)  # 80 hits in 100 lookups: the bypass ends
    assert not taking.bypassed and not taking.skips()
