"""The fleet's hot set (cache/hotset.py) against a real Redis: slices, hottest, publish, read.

A RowCache holds more keys than one slice (SLICE), with the hottest spread over all of
them; counts are added to the sketch directly (no decay), all distinct, so every ranking
has one right answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from featurestore.cache import hotset
from featurestore.cache.rows import SEGMENT_ENTRIES, RowCache
from featurestore.cache.sketch import HotKeys
from featurestore.store import keys
from featurestore.store.pipe import RedisPipe

PROJECT = "proj"
HOT_KEY = keys.hot_key(PROJECT)
CACHED = 2 * hotset.SLICE + 500  # three slices, and more than one RowCache segment
COLD = 300  # the first COLD cached keys are counted once: under min_count (2)


def row_key(i: int) -> bytes:
    return keys.row_key(PROJECT, "user", keys.entity_token([i]))


def count_of(i: int) -> float:
    """Key i's count: 1 for the cold ones, else distinct and scattered over the cache order
    (key COLD has exactly min_count, 2: the least count called hot)."""
    if i < COLD:
        return 1.0
    return 2.0 if i == COLD else float(2 + (i * 7919) % CACHED)  # i * 7919 % CACHED is 0 for i = 0 only


def ranking(limit: int | None = None) -> list[tuple[bytes, float]]:
    """The hot cached keys and their counts, hottest first."""
    hot = sorted(((row_key(i), count_of(i)) for i in range(COLD, CACHED)), key=lambda kv: -kv[1])
    return hot[:limit]


@pytest.fixture
def cache() -> tuple[HotKeys, RowCache]:
    hot = HotKeys(decay_s=0, min_count=2.0)
    rows = RowCache(PROJECT, cache_bytes=64 << 20)
    now = time.monotonic()
    for i in range(CACHED):
        rows.put(row_key(i), b"row %d" % i, now)
    by_count: dict[float, list[bytes]] = {}
    for i in range(CACHED):
        by_count.setdefault(count_of(i), []).append(row_key(i))
    for count, group in by_count.items():
        hot.add(group, weight=count)
    hot.add([row_key(10**9)], weight=1000.0)  # counted, but not cached: never a candidate
    assert len(rows) == CACHED and CACHED > SEGMENT_ENTRIES
    return hot, rows


@pytest.fixture
async def pipe(redis_client: aioredis.Redis, redis_url: str) -> AsyncIterator[RedisPipe]:
    """A pipe on the flushed database `redis_client` watches."""
    pipe = RedisPipe.from_url(redis_url)
    yield pipe
    await pipe.close()


async def test_slices_cover_every_hot_cached_key_once(cache: tuple[HotKeys, RowCache]) -> None:
    hot, rows = cache
    seen: dict[bytes, float] = {}
    slices = 0
    async for names, counts in hotset.hot_slices(hot, rows):
        slices += 1
        assert len(names) == len(counts) <= hotset.SLICE
        for name, counted in zip(names, counts.tolist(), strict=True):
            assert name not in seen
            seen[name] = counted
    assert slices >= 3
    assert seen == dict(ranking())  # every hot key, its count; no cold key, no segment marker


async def test_slices_with_no_threshold_are_exactly_the_cached_keys(cache: tuple[HotKeys, RowCache]) -> None:
    hot, rows = cache
    hot.min_count = 0.0  # every cached key qualifies: markers must still be left out
    names = [name async for chunk, _ in hotset.hot_slices(hot, rows) for name in chunk]
    assert sorted(names) == sorted(rows.keys())


async def test_slices_count_what_was_recorded_and_not_yet_drained(cache: tuple[HotKeys, RowCache]) -> None:
    hot, rows = cache
    newly = [row_key(0)] * 5  # a cold key, requested five times since the last drain
    hot.record(newly)
    found: dict[bytes, float] = {}
    async for names, counts in hotset.hot_slices(hot, rows):
        found.update(zip(names, counts.tolist(), strict=True))
    assert found[row_key(0)] == 6.0


async def test_slices_yield_to_the_event_loop_between_them(cache: tuple[HotKeys, RowCache]) -> None:
    hot, rows = cache
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    seen = []
    async for _ in hotset.hot_slices(hot, rows):
        seen.append(ticks)
    task.cancel()
    assert len(set(seen)) == len(seen)  # the ticker ran between every two slices


@pytest.mark.parametrize("limit", [1, 10, hotset.SLICE + 7, CACHED])
async def test_hottest_is_the_top_of_every_slice_hottest_first(cache: tuple[HotKeys, RowCache], limit: int) -> None:
    hot, rows = cache
    assert await hotset.hottest(hot, rows, limit) == ranking(limit)


async def test_publish_writes_the_hot_keys_trims_to_keep_and_sets_the_ttl(
    cache: tuple[HotKeys, RowCache], pipe: RedisPipe, redis_client: aioredis.Redis
) -> None:
    hot, rows = cache
    other = b"proj:user:{other replica}"  # another replica's entries: the hottest stays, a cold one goes
    await redis_client.zadd(HOT_KEY, {other: 10.0 * CACHED, b"proj:user:{cold elsewhere}": 2.0})
    written = await hotset.publish(pipe, HOT_KEY, hot, rows, keep=100, ttl_s=300)
    assert written == CACHED - COLD
    stored = await redis_client.zrevrange(HOT_KEY, 0, -1, withscores=True)
    assert stored == [(other, 10.0 * CACHED), *ranking(99)]
    assert 0 < await redis_client.ttl(HOT_KEY) <= 300


async def test_a_publication_replaces_the_scores_of_its_keys(
    cache: tuple[HotKeys, RowCache], pipe: RedisPipe, redis_client: aioredis.Redis
) -> None:
    hot, rows = cache
    hottest_key, count = ranking(1)[0]
    await redis_client.zadd(HOT_KEY, {hottest_key: 1.0})  # an older, lower score
    await hotset.publish(pipe, HOT_KEY, hot, rows, keep=CACHED, ttl_s=60)
    assert await redis_client.zscore(HOT_KEY, hottest_key) == count
    assert await redis_client.zcard(HOT_KEY) == CACHED - COLD


async def test_publishing_nothing_hot_writes_nothing(
    cache: tuple[HotKeys, RowCache], pipe: RedisPipe, redis_client: aioredis.Redis
) -> None:
    hot, rows = cache
    hot.min_count = 1e9
    await redis_client.zadd(HOT_KEY, {b"proj:user:{kept}": 5.0})
    assert await hotset.publish(pipe, HOT_KEY, hot, rows, keep=1, ttl_s=60) == 0
    assert await redis_client.zrange(HOT_KEY, 0, -1) == [b"proj:user:{kept}"]
    assert await redis_client.ttl(HOT_KEY) == -1  # no expiry set by a publication of nothing


async def test_read_returns_the_hottest_first(
    cache: tuple[HotKeys, RowCache], pipe: RedisPipe, redis_client: aioredis.Redis
) -> None:
    hot, rows = cache
    assert await hotset.read(pipe, HOT_KEY, limit=10) == []  # no hot set yet
    await hotset.publish(pipe, HOT_KEY, hot, rows, keep=500, ttl_s=60)
    assert await hotset.read(pipe, HOT_KEY, limit=10) == [key for key, _ in ranking(10)]
    assert await hotset.read(pipe, HOT_KEY, limit=1000) == [key for key, _ in ranking(500)]
