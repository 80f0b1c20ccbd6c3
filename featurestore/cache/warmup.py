"""Warm-up: the fleet's hot rows read into the cache before serving, and re-read on demand.

    warmup = Warmup(pipe, keys.hot_key("recsys"), rows, admission)
    await warmup.warm(100_000, budget_s=10)   # the fleet's hot rows, before SERVING
    await warmup.rewarm(row_keys)             # invalidated rows, read again in the background

Pre-warm: `warm` reads the fleet's hot set (the sorted set `<project>:{__meta__}:hot`,
which every replica refreshes with its own hot keys every `publish_s`; hotset.py) into
the cache; the server calls it before reporting SERVING; a "warm" event
(`featurestore-materialize warm`) makes every replica call it again. After a run,
the rows it invalidated are read again in the background (`rewarm`, freshness.py), so
their next request is a hit.

Rows are read with MGET in batches of 1000 keys on the cache's own pipelined connection
and admitted whatever their counts (they are hot by the fleet's measure), unless an
invalidation ran during the read (the row store's `epoch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from featurestore import metrics
from featurestore.cache import hotset
from featurestore.cache.admission import Admission
from featurestore.cache.rows import RowCache
from featurestore.errors import Unavailable
from featurestore.store.events import DEFAULT_WARM_KEYS
from featurestore.store.pipe import RedisPipe

__all__ = ["WARM_BATCH", "Warmup"]

log = logging.getLogger(__name__)

WARM_BATCH = 1000  # keys per MGET while warming


class Warmup:
    """Reads rows into one cache: the fleet's hot set, or keys that were invalidated.

    Parameters:
        pipe: the cache's pipelined connection (its errors are Unavailable).
        hot_key: the fleet's hot set (`keys.hot_key(project)`).
        rows: the row store (its `epoch` tells a read that raced an invalidation).
        admission: admits what was read.
    """

    __slots__ = ("admission", "hot_key", "pipe", "rows", "warm_seconds", "warmed_rows")

    def __init__(self, pipe: RedisPipe, hot_key: bytes, rows: RowCache, admission: Admission) -> None:
        self.pipe = pipe
        self.hot_key = hot_key
        self.rows = rows
        self.admission = admission
        self.warm_seconds = 0.0  # the last warm-up's duration
        self.warmed_rows = 0  # and the rows it cached

    async def warm(self, limit: int = DEFAULT_WARM_KEYS, budget_s: float = 10.0) -> int:
        """Fill the cache with the rows of the fleet's `limit` hottest keys, within
        `budget_s` float seconds (what was read by then stays); returns the rows cached.
        Redis errors end the warm-up early (logged), never raise."""
        start = time.perf_counter()
        filled = 0
        try:
            async with asyncio.timeout(budget_s):
                filled = await self.fill(await hotset.read(self.pipe, self.hot_key, limit))
        except TimeoutError:
            log.warning("warm-up stopped after its budget of %.1f s", budget_s)
        except Unavailable as exc:
            log.warning("warm-up failed: %s", exc)
        elapsed = time.perf_counter() - start
        self.warm_seconds, self.warmed_rows = elapsed, filled
        metrics.CACHE_WARM_SECONDS.set(elapsed)
        log.info("hot cache warmed with %d rows in %.2f s", filled, elapsed)
        return filled

    async def rewarm(self, row_keys: list[bytes]) -> None:
        """Read invalidated keys again, so their next request is a hit (errors and a
        timeout of 5 s, or 1 s per 50k keys, end it quietly: it is only a head start)."""
        with contextlib.suppress(TimeoutError, Unavailable):
            async with asyncio.timeout(max(5.0, len(row_keys) / 50_000)):
                await self.fill(row_keys)

    async def fill(self, row_keys: Sequence[bytes]) -> int:
        """Read the rows of `row_keys` (MGET in batches) and admit them all; returns how
        many were cached. Unavailable propagates."""
        filled = 0
        for start in range(0, len(row_keys), WARM_BATCH):
            batch = list(row_keys[start : start + WARM_BATCH])
            epoch, fetched_at = self.rows.epoch, time.monotonic()
            rows = await self.pipe.execute(b"MGET", *batch)
            filled += self.admission.admit(batch, rows, epoch, fetched_at, admit_all=True)
        return filled
