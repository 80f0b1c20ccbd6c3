"""Hot keys: track them, pre-warm them, serve their rows from memory, never stale.

    events = EventSubscriber(redis_url, "recsys")   # the server's one subscription
    cache = HotCache("recsys", redis_url, cache_bytes=256 << 20, events=events)
    cache.start()                          # follows events; version poll, counting, publication
    events.start()
    await cache.wait_ready()               # subscribed and versions read
    await cache.warm(100_000, budget_s=10) # the fleet's hot rows, before SERVING
    rows = await cache.read(row_keys, fetch)   # cached rows + one fetch of the misses

Parts, one idea each: HotKeys (sketch.py) counts every requested row key off the request
path (a count-min sketch; the cache's keys ranked by it are the hottest); RowCache
(rows.py) holds packed rows within a byte budget and a maximum age; Admission
(admission.py) decides which fetched rows are cached and when reads skip the cache;
Freshness (freshness.py) keeps them honest: invalidation from events, write versions, the
lease, and the freshness guarantee; Warmup (warmup.py) keeps them warm: the fleet's hot
set (hotset.py) before serving and on a "warm" event, invalidated rows after a run. This
module composes them:

- `read` takes the cached rows, fetches only the misses (one round trip, none when all
  are cached), and admits a fetched row (or its absence) unless an invalidation ran
  during the fetch (the `epoch`); once the cache is nearly full, only rows of keys
  requested at least as often as those the last eviction dropped (count-min estimates):
  a key asked for once does not push out a hot one, and the cache does not churn. When
  the hit ratio over the last 100k lookups is under 50% (traffic without hot keys), 15
  reads in 16 skip the cache: its lookups would cost more than they save. The
  caller decodes the combined rows exactly as without a cache: the cache holds packed
  rows, so TTL (OUTSIDE_MAX_AGE, from each row's own event time, at decode time) and
  schema checks apply to cached rows identically.
- Events: the cache listens to the server's one subscription (store/events.py). A
  "written" event goes to Freshness, a gap in the events drops everything, and a "warm"
  event (`featurestore-materialize warm`) makes the replica warm again.
- Publication: every `publish_s` this replica's hot keys go to the fleet's hot set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from featurestore import metrics
from featurestore.cache import hotset
from featurestore.cache.admission import Admission
from featurestore.cache.freshness import Freshness
from featurestore.cache.rows import RowCache
from featurestore.cache.sketch import HotKeys
from featurestore.cache.warmup import Warmup
from featurestore.errors import Unavailable
from featurestore.lookup import Fetch
from featurestore.store import keys
from featurestore.store.events import DEFAULT_WARM_KEYS, EventSubscriber, Gap, WarmEvent, WrittenEvent
from featurestore.store.pipe import RedisPipe
from featurestore.tasks import cancel_all

__all__ = ["CacheStatus", "HotCache"]

log = logging.getLogger(__name__)

_DRAIN_S = 0.01  # how often queued keys are counted and counters exported


@dataclass(frozen=True, slots=True)
class CacheStatus:
    """What the admin RPC and `featurestore cache-status` report about one replica."""

    entries: int
    size_bytes: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int
    invalidations: int
    lost_events: int
    bypassed: bool
    warm_seconds: float
    warmed_rows: int
    serving: bool
    top: list[tuple[bytes, float]]

    @property
    def hit_ratio(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


class HotCache:
    """The hot-key cache of one server.

    Parameters:
        project: the registry's project (key prefix, hot set, versions).
        redis_url: the online store; a pipelined connection of its own (polls, warm-up,
            publication).
        events: the server's event subscriber, which `start` adds the cache to (None: no
            events; only the version poll invalidates, within `max_staleness_s`).
        cache_bytes: the rows' byte budget (RowCache).
        max_staleness_s: the longest a row rewritten by materialization is served after
            the run announced it, when the announcement is lost, float seconds.
        max_age_s: the longest any row is served after it was read, float seconds.
        publish_s: how often this replica's hot keys go to the fleet's set (0: never).
        publish_keys: how many of them.
        admit_count: the least count-min estimate of a key whose fetched row is cached.
        decay_s, sample_every: the tracker's (HotKeys).
        bypass_window: the lookups over which the hit ratio decides the bypass.
    """

    def __init__(
        self,
        project: str,
        redis_url: str,
        *,
        events: EventSubscriber | None = None,
        cache_bytes: int = 256 << 20,
        max_staleness_s: float = 5.0,
        max_age_s: float = 600.0,
        publish_s: float = 30.0,
        publish_keys: int = 100_000,
        admit_count: float = 1.0,
        decay_s: float = 60.0,
        sample_every: int = 1,
        bypass_window: int = 100_000,
    ) -> None:
        self.project = project
        self.hot = HotKeys(decay_s=decay_s, sample_every=sample_every)
        self.rows = RowCache(project, cache_bytes, max_age_s)
        self.admission = Admission(self.hot, self.rows, admit_count=admit_count, bypass_window=bypass_window)
        self.publish_s = publish_s
        self.publish_keys = publish_keys
        self.hot_key = keys.hot_key(project)
        self.hits = self.misses = 0
        self._exported = (0, 0, 0, 0)  # hits, misses, evictions, lost events exported
        # Polls, warm-up reads and publication go through a pipelined hiredis connection
        # (C packing and parsing: a publication of 100k keys costs ~1/3 of redis-py's);
        # events come from the server's one subscription (store/events.py).
        self._pipe = RedisPipe.from_url(redis_url, timeout_s=max(max_staleness_s / 2, 1.0))
        self.warmup = Warmup(self._pipe, self.hot_key, self.rows, self.admission)
        self.freshness = Freshness(
            project,
            self.rows,
            self._pipe,
            max_staleness_s=max_staleness_s,
            rewarm=self.warmup.rewarm,
            spawn=self._spawn,
        )
        self._events = events
        self._tasks: list[asyncio.Future[object]] = []

    # The request path ----------------------------------------------------------------------

    async def read(self, row_keys: list[bytes], fetch: Fetch) -> list[bytes | None]:
        """The row of each key: cached where possible, the rest from `fetch` (once)."""
        self.hot.record(row_keys)
        skips = self.admission.skips()
        freshness = self.freshness
        if skips or freshness.dropping or time.monotonic() >= freshness.valid_until:
            # The traffic is not skewed, a view is being dropped, or the lease ran out.
            self.misses += len(row_keys)
            return await fetch(row_keys)
        rows = self.rows.get_many(row_keys)
        missing = rows.count(None)
        self.hits += len(rows) - missing
        self.misses += missing
        self.admission.measure(len(rows) - missing, len(rows))
        if not missing:
            return rows
        epoch, started = self.rows.epoch, time.monotonic()
        if missing == len(rows):
            rows = await fetch(row_keys)
            self.admission.admit(row_keys, rows, epoch, started)
            return rows
        at = [i for i, row in enumerate(rows) if row is None]
        wanted = [row_keys[i] for i in at]
        fetched = await fetch(wanted)
        for i, row in zip(at, fetched, strict=True):
            rows[i] = row
        self.admission.admit(wanted, fetched, epoch, started)
        return rows

    # Events (an EventListener of store/events.py) ----------------------------------------

    def on_event(self, event: WrittenEvent | WarmEvent) -> None:
        """Follow one event: invalidate what a "written" one rewrote, warm again on "warm"."""
        self.freshness.follow(event)
        if isinstance(event, WarmEvent):
            self._spawn(self.warmup.warm(event.limit))

    def on_gap(self, gap: Gap) -> None:
        """Events may have been lost: drop everything (the rows can no longer be vouched for)."""
        self.freshness.drop_all(gap.value)

    # Background work -----------------------------------------------------------------------

    def start(self) -> None:
        """Follow the events, start the version poll, counting and publication."""
        if self._events is not None:
            self._events.add(self)
        self._tasks.append(asyncio.create_task(self.freshness.poll_forever()))
        self._tasks.append(asyncio.create_task(self._drain_forever()))
        if self.publish_s > 0:
            self._tasks.append(asyncio.create_task(self._publish_forever()))

    async def wait_ready(self) -> None:
        """Return once the events are subscribed to and the versions were read once."""
        if self._events is not None:
            await self._events.wait_subscribed()
        await self.freshness.wait_polled()

    async def warm(self, limit: int = DEFAULT_WARM_KEYS, budget_s: float = 10.0) -> int:
        """Fill the cache with the rows of the fleet's `limit` hottest keys, within
        `budget_s` float seconds (what was read by then stays); returns the rows cached.
        Redis errors end the warm-up early (logged), never raise (Warmup.warm)."""
        return await self.warmup.warm(limit, budget_s)

    async def _drain_forever(self) -> None:
        while True:
            await asyncio.sleep(_DRAIN_S)
            self.hot.drain()
            self.export()

    def export(self) -> None:
        """Hand the counters kept on the request path to Prometheus."""
        now = (self.hits, self.misses, self.rows.evictions, self.freshness.lost_events)
        counters = (metrics.CACHE_HITS, metrics.CACHE_MISSES, metrics.CACHE_EVICTIONS, metrics.CACHE_LOST_EVENTS)
        for counter, value, before in zip(counters, now, self._exported, strict=True):
            if value > before:
                counter.inc(value - before)
        self._exported = now
        metrics.CACHE_BYTES.set(self.rows.bytes)
        metrics.CACHE_ENTRIES.set(len(self.rows))
        metrics.CACHE_SERVING.set(self.freshness.serving)

    async def hottest(self, limit: int) -> list[tuple[bytes, float]]:
        """The `limit` hottest cached keys and their decayed counts, hottest first."""
        return await hotset.hottest(self.hot, self.rows, limit)

    async def publish(self) -> int:
        """Write this replica's hot keys to the fleet's hot set (hotset.py), trimmed to
        2 x `publish_keys`, expiring after 10 publication periods without one; returns
        how many keys were written."""
        return await hotset.publish(
            self._pipe,
            self.hot_key,
            self.hot,
            self.rows,
            keep=2 * self.publish_keys,
            ttl_s=max(int(10 * self.publish_s), 60),
        )

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self.publish_s)
            try:
                await self.publish()
            except Unavailable as exc:
                log.warning("could not publish hot keys: %s", exc)

    async def status(self, top: int = 20) -> CacheStatus:
        """This replica's cache figures and its `top` hottest keys."""
        hottest = await self.hottest(top)
        return CacheStatus(
            entries=len(self.rows),
            size_bytes=self.rows.bytes,
            budget_bytes=self.rows.cache_bytes,
            hits=self.hits,
            misses=self.misses,
            evictions=self.rows.evictions,
            invalidations=self.freshness.invalidations,
            lost_events=self.freshness.lost_events,
            bypassed=self.admission.bypassed,
            warm_seconds=self.warmup.warm_seconds,
            warmed_rows=self.warmup.warmed_rows,
            serving=self.freshness.serving,
            top=hottest,
        )

    def _spawn(self, work: Awaitable[object]) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.ensure_future(work))

    async def close(self) -> None:
        """Stop following events, stop the background tasks, close the Redis connection."""
        if self._events is not None:
            self._events.discard(self)
        await cancel_all(self._tasks)
        self._tasks.clear()
        await self._pipe.close()
