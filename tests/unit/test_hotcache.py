"""The hot-key tracker and the row cache, without Redis: heavy hitters of a Zipf stream,
decay, the byte budget, staleness and the invalidation epoch."""

from __future__ import annotations

import time

import numpy as np

from featurestore.hotcache import ENTRY_OVERHEAD, HotKeys, RowCache
from featurestore.store import keys


def zipf_ids(n: int, users: int, s: float, rng: np.random.Generator) -> list[int]:
    """`n` ids in [0, users) from a Zipf law of exponent `s` (id 0 the most frequent)."""
    weights = np.arange(1, users + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights / weights.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(n)), users - 1).tolist()  # type: ignore[no-any-return]


def user_keys(ids: list[int]) -> list[bytes]:
    return keys.row_keys("proj", "user", keys.entity_tokens([ids]))


def test_tracker_finds_the_heavy_hitters_of_a_zipf_stream() -> None:
    rng = np.random.default_rng(0)
    hot = HotKeys(top_k=100, decay_s=0)
    stream = zipf_ids(200_000, 1_000_000, 1.1, rng)
    for start in range(0, len(stream), 100):  # requests of 100 entities
        hot.add(user_keys(stream[start : start + 100]))
    found = {k for k, _ in hot.top(100)}
    truth = set(user_keys(list(range(100))))  # the 100 most probable ids
    counts = np.bincount(stream, minlength=100)[:20]
    assert set(user_keys(list(range(20)))) <= found  # the heaviest 20: all of them
    assert len(found & truth) >= 80
    top = dict(hot.top(20))
    for i, key in enumerate(user_keys(list(range(20)))):  # count-min: never under
        assert top[key] >= counts[i]
    assert not hot.is_hot(user_keys([999_999])[0])


def test_tracker_forgets_after_decay() -> None:
    hot = HotKeys(top_k=10, decay_s=0, min_count=2)
    key = user_keys([1])
    for _ in range(64):
        hot.add(key)
    assert hot.is_hot(key[0])
    for _ in range(5):
        hot.decay()
    assert hot.is_hot(key[0])  # 64 / 32 = 2
    hot.decay()
    assert not hot.is_hot(key[0])
    assert hot.top(10) == []


def test_tracker_decays_on_its_own_clock() -> None:
    hot = HotKeys(top_k=10, decay_s=0.05, min_count=2)
    key = user_keys([1])
    for _ in range(8):
        hot.add(key)
    assert hot.is_hot(key[0])
    for _ in range(3):
        time.sleep(0.06)
        hot.add(user_keys([2]))  # other traffic drives the clock
    assert not hot.is_hot(key[0])


def test_byte_budget_holds_under_a_flood_of_keys() -> None:
    budget = 100_000
    cache = RowCache("proj", budget, max_staleness_s=60)
    row = b"x" * 300
    now = time.monotonic()
    for key in user_keys(list(range(20_000))):
        cache.put(key, row, now)
        assert cache.bytes <= budget
    size = len(user_keys([19_999])[0]) + len(row) + ENTRY_OVERHEAD
    assert len(cache) >= budget // size - 1
    assert user_keys([19_999])[0] in cache  # the newest stay, the oldest went
    assert user_keys([0])[0] not in cache
    cache.put(b"proj:user:{big}", b"x" * (budget + 1), now)  # larger than the budget
    assert b"proj:user:{big}" not in cache and cache.bytes <= budget


def test_lru_keeps_recently_read_entries() -> None:
    row = b"r" * 100
    size = len(user_keys([0])[0]) + len(row) + ENTRY_OVERHEAD
    cache = RowCache("proj", 3 * size, max_staleness_s=60)
    k0, k1, k2, k3 = user_keys([0, 1, 2, 3])
    now = time.monotonic()
    for key in (k0, k1, k2):
        cache.put(key, row, now)
    cache.get_many([k0])  # k0 used: k1 is now the least recently used
    cache.put(k3, row, now)
    assert k0 in cache and k1 not in cache and k3 in cache


def test_stale_entries_are_misses() -> None:
    cache = RowCache("proj", 1 << 20, max_staleness_s=0.5)
    k0, k1 = user_keys([0, 1])
    cache.put(k0, b"old", time.monotonic() - 1.0)
    cache.put(k1, b"new", time.monotonic())
    rows, misses = cache.get_many([k0, k1, b"proj:user:{9}"])
    assert rows == [None, b"new", None] and misses == [0, 2]


def test_invalidation_by_keys_and_by_view() -> None:
    cache = RowCache("proj", 1 << 20, max_staleness_s=60)
    now = time.monotonic()
    users = user_keys([1, 2, 3])
    items = keys.row_keys("proj", "item", keys.entity_tokens([[1, 2]]))
    for key in users + items:
        cache.put(key, b"row", now)
    epoch = cache.epoch
    assert cache.invalidate(user_keys([2, 7])) == user_keys([2])
    assert cache.epoch > epoch
    assert cache.invalidate_view("item") == 2
    assert all(k not in cache for k in items) and len(cache) == 2
    assert cache.invalidate_view("unknown") == 0
    before = cache.bytes
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 < before


def test_sampling_counts_one_call_in_n() -> None:
    hot = HotKeys(top_k=10, decay_s=0, sample_every=4)
    key = user_keys([5])
    for _ in range(8):
        hot.add(key)
    assert dict(hot.top(1))[key[0]] == 8  # 2 sampled calls, each counting 4
