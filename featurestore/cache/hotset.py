"""The fleet's hot set: which cached keys are hottest, written to and read from Redis.

    async for names, counts in hot_slices(hot, rows): ...      # ranked a slice at a time
    top = await hottest(hot, rows, 20)                          # [(key, count)], hottest first
    await publish(pipe, hot_key, hot, rows, keep=100_000, ttl_s=300)
    keys = await read(pipe, hot_key, limit=100_000)             # the hottest first

The candidates are a replica's cached keys (each was requested before it was admitted)
ranked by the request-count sketch (sketch.py). Every step runs on the event loop, so
the work is cut into slices of SLICE keys (~0.2 ms each), yielding to requests between
them: one C-level copy of the cache's keys, then per slice the sketch's estimates and,
when publishing, one ZADD packed by hiredis. Redis does the ranking of the fleet's set
(`keys.hot_key(project)`, a sorted set scored by decayed counts; the last replica to write
a key sets its score).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from featurestore.cache.rows import RowCache
from featurestore.cache.sketch import HotKeys
from featurestore.store.pipe import RedisPipe

__all__ = ["SLICE", "hot_slices", "hottest", "publish", "read"]

SLICE = 1_000  # keys ranked, and written by one ZADD, per step


async def hot_slices(hot: HotKeys, rows: RowCache) -> AsyncIterator[tuple[list[bytes], npt.NDArray[np.float32]]]:
    """The cached keys counted at least `hot.min_count`, and their counts, a slice at a
    time, yielding to requests between slices."""
    hot.drain()
    snapshot = rows.snapshot()
    for start in range(0, len(snapshot), SLICE):
        await asyncio.sleep(0)
        chunk = [k for k in snapshot[start : start + SLICE] if k[0]]  # not a marker
        counts = hot.estimates(chunk)
        chosen = np.flatnonzero(counts >= hot.min_count)
        yield [chunk[i] for i in chosen.tolist()], counts[chosen]


async def hottest(hot: HotKeys, rows: RowCache, limit: int) -> list[tuple[bytes, float]]:
    """The `limit` hottest cached keys and their decayed counts, hottest first."""
    best: list[tuple[bytes, float]] = []
    async for names, counts in hot_slices(hot, rows):
        if len(names) > limit:
            top = np.argpartition(counts, -limit)[-limit:].tolist()
            names, counts = [names[i] for i in top], counts[top]
        best = sorted([*best, *zip(names, counts.tolist(), strict=True)], key=lambda kv: kv[1], reverse=True)[:limit]
    return best


async def publish(pipe: RedisPipe, hot_key: bytes, hot: HotKeys, rows: RowCache, *, keep: int, ttl_s: int) -> int:
    """Write every cached key counted at least `hot.min_count` to the fleet's hot set with
    its count as score; trim the set to its `keep` highest; let it expire after `ttl_s`
    without a publication. Returns how many keys were written."""
    written = 0
    async for names, counts in hot_slices(hot, rows):
        if names:
            pairs = itertools.chain.from_iterable(zip(counts.tolist(), names, strict=True))
            await pipe.execute(b"ZADD", hot_key, *cast(Any, pairs))
            written += len(names)
    if written:
        await pipe.execute(b"ZREMRANGEBYRANK", hot_key, 0, -keep - 1)
        await pipe.execute(b"EXPIRE", hot_key, ttl_s)
    return written


async def read(pipe: RedisPipe, hot_key: bytes, limit: int) -> list[bytes]:
    """The fleet's `limit` hottest keys, hottest first."""
    return cast(list[bytes], await pipe.execute(b"ZREVRANGE", hot_key, 0, limit - 1))
