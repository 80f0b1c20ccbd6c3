"""Hot keys: track them, pre-warm them, serve their rows from memory, never stale.

    cache = HotCache("recsys", redis_url, cache_bytes=256 << 20)
    cache.start()                          # listener, version poll, counting, publication
    await cache.wait_ready()               # subscribed and versions read
    await cache.warm(100_000, budget_s=10) # the fleet's hot rows, before SERVING
    rows = await cache.read(row_keys, fetch)   # cached rows + one fetch of the misses

Parts: HotKeys (hotkeys.py) counts every requested row key off the request path (a
count-min sketch; the cache's keys ranked by it are the hottest); RowCache (rowcache.py)
holds packed rows within a byte budget and a maximum age; this module keeps them honest
and warm:

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
- Invalidation. Materialization announces every view it wrote on the events channel,
  after Redis acknowledged the rows, with the view's new write version (a counter in
  the hash `<project>:__meta__:versions`, incremented in the same script that
  publishes; store/events.py) and, for runs of at most 100k rows, the entity ids. An
  event with ids drops those keys (and re-reads the ones that were cached); one without
  drops the view's keys (and re-reads them); a version that skips one (an event was
  lost) drops the view.
- Lost events. Every `max_staleness_s / 2` the versions hash is read; a view whose
  version moved without its event is dropped, a counter that went back (Redis was
  flushed or replaced) drops everything. The cache serves rows only while the last such
  check started less than `max_staleness_s` ago (a lease): when Redis cannot be reached
  to check, the cache stops serving rather than serve rows it cannot vouch for.
- Pre-warm: `warm` reads the fleet's hot set (the sorted set `<project>:__meta__:hot`,
  which every replica refreshes with its own hot keys every `publish_s`; hotset.py) into
  the cache; the server calls it before reporting SERVING; a "warm" event
  (`featurestore-materialize warm`) makes every replica call it again. After a run,
  the rows it invalidated are read again in the background.

The guarantee (README, "Freshness"): a row rewritten by materialization is not served
from a cache once that run's event for its view reached the replica, and in any case
not later than `max_staleness_s` after the event was published; no cached row is served
more than `max_age_s` after it was read from Redis (which covers what materialization
does not announce: Redis expiring a row, a manual write).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from featurestore import metrics
from featurestore.cache import hotset
from featurestore.cache.rows import ABSENT, RowCache
from featurestore.cache.sketch import HotKeys
from featurestore.errors import Unavailable
from featurestore.store import keys
from featurestore.store.events import DEFAULT_WARM_KEYS, WarmEvent, WrittenEvent, parse_message
from featurestore.store.pipe import RedisPipe
from featurestore.tasks import cancel_all

__all__ = ["CacheStatus", "HotCache"]

log = logging.getLogger(__name__)

_RETRY_S = (0.1, 5.0)  # first and longest wait before resubscribing
_WARM_BATCH = 1000  # keys per MGET while warming
_ROOM = 0.9  # below this share of the budget, every fetched row is admitted
# Traffic without hot keys (a hit ratio under _BYPASS_BELOW over `bypass_window` lookups)
# makes the cache cost more than it saves (a lookup in a large dict is a few CPU cache
# misses, as in Redis): then only 1 read in _PROBE goes through it, which keeps measuring.
_BYPASS_BELOW = 0.5
_PROBE = 16
_DRAIN_S = 0.01  # how often queued keys are counted and counters exported

Fetch = Callable[[list[bytes]], Awaitable[list[bytes | None]]]


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
        project: the registry's project (key prefix, events channel, hot set, versions).
        redis_url: the online store; a client of its own (pub/sub, polls, warm-up).
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
        self.max_staleness_s = max_staleness_s
        self.publish_s = publish_s
        self.publish_keys = publish_keys
        self.admit_count = admit_count
        self.hot_key = keys.hot_key(project)
        self.events = 0  # events processed (tests, logs)
        self.hits = self.misses = self.lost_events = self.invalidations = 0
        self.warm_seconds = 0.0
        self.warmed_rows = 0
        self._exported = (0, 0, 0, 0)  # hits, misses, evictions, lost events exported
        self._evicted_count = 0.0  # the median count of the keys last evicted
        self.bypassed = False  # the last window's hit ratio was under _BYPASS_BELOW
        self._dropping = 0  # views being dropped: reads skip the cache meanwhile
        self._reads = 0
        self._window = [0, 0]  # hits and lookups since the window began
        self.bypass_window = bypass_window
        self._versions: dict[str, int] | None = None  # write version per view, as known
        self._valid_until = 0.0  # the lease: monotonic time until which rows are served
        # Polls, warm-up reads and publication go through a pipelined hiredis connection
        # (C packing and parsing: a publication of 100k keys costs ~1/3 of redis-py's);
        # pub/sub through redis-py, without a socket timeout: the listener waits as long
        # as it takes for the next message.
        self._pipe = RedisPipe.from_url(redis_url, timeout_s=max(max_staleness_s / 2, 1.0))
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=None,
            socket_connect_timeout=5.0,
            socket_keepalive=True,
            decode_responses=False,
            health_check_interval=0,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._polled = asyncio.Event()

    # The request path ----------------------------------------------------------------------

    async def read(self, row_keys: list[bytes], fetch: Fetch) -> list[bytes | None]:
        """The row of each key: cached where possible, the rest from `fetch` (once)."""
        self.hot.record(row_keys)
        self._reads += 1
        if time.monotonic() >= self._valid_until or self._dropping or (self.bypassed and self._reads % _PROBE):
            # The lease ran out, a view is being dropped, or the traffic is not skewed.
            self.misses += len(row_keys)
            return await fetch(row_keys)
        rows = self.rows.get_many(row_keys)
        missing = rows.count(None)
        self.hits += len(rows) - missing
        self.misses += missing
        self._window[0] += len(rows) - missing
        self._window[1] += len(rows)
        if self._window[1] >= self.bypass_window:
            self.bypassed = self._window[0] < _BYPASS_BELOW * self._window[1]
            self._window = [0, 0]
        if not missing:
            return rows
        epoch, started = self.rows.epoch, time.monotonic()
        if missing == len(rows):
            rows = await fetch(row_keys)
            self.admit(row_keys, rows, epoch, started)
            return rows
        at = [i for i, row in enumerate(rows) if row is None]
        wanted = [row_keys[i] for i in at]
        fetched = await fetch(wanted)
        for i, row in zip(at, fetched, strict=True):
            rows[i] = row
        self.admit(wanted, fetched, epoch, started)
        return rows

    @property
    def epoch(self) -> int:
        return self.rows.epoch

    def admit(
        self,
        row_keys: Sequence[bytes],
        rows: Sequence[bytes | None],
        epoch: int,
        fetched_at: float,
        *,
        admit_all: bool = False,
    ) -> int:
        """Cache the rows (None: absent) of `row_keys`, read by a read that started at
        `fetched_at` (monotonic) in `epoch`; nothing when an invalidation ran since. While
        the cache has room every row is taken; once it is nearly full, only those of keys
        requested at least as often as the keys the last eviction dropped (their median
        count; at least `admit_count`), so that keys asked for once do not push out hot
        ones and the cache does not churn. `admit_all` takes every row. Returns how many
        were cached."""
        if epoch != self.rows.epoch:
            return 0
        if admit_all or self.rows.bytes < self.rows.cache_bytes * _ROOM:
            candidates = list(zip(row_keys, rows, strict=True))
        else:
            bar = max(self.admit_count, self._evicted_count)
            wanted = (self.hot.estimates(row_keys) >= bar).tolist()
            candidates = list(itertools.compress(zip(row_keys, rows, strict=True), wanted))
        put, evictions = self.rows.put, self.rows.evictions
        admitted = sum(put(key, ABSENT if row is None else row, fetched_at) for key, row in candidates)
        if self.rows.evictions != evictions:  # the bar: as hot as what goes out
            self._evicted_count = float(np.median(self.hot.estimates(self.rows.evicted)))
        return admitted

    # Background work -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the events listener, the version poll, counting and publication."""
        self._tasks.append(asyncio.create_task(self._listen()))
        self._tasks.append(asyncio.create_task(self._poll_forever()))
        self._tasks.append(asyncio.create_task(self._drain_forever()))
        if self.publish_s > 0:
            self._tasks.append(asyncio.create_task(self._publish_forever()))

    async def wait_ready(self) -> None:
        """Return once the listener is subscribed and the versions were read once."""
        await self._subscribed.wait()
        await self._polled.wait()

    async def _listen(self) -> None:
        delay = _RETRY_S[0]
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.events_channel(self.project))
                if not first:  # events sent while disconnected are lost
                    self._drop_all("resubscribed to events")
                first, delay = False, _RETRY_S[0]
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.follow(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("hot cache events: %s; resubscribing in %.1f s", exc, delay)
                self._drop_all("lost the events channel")
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_S[1])
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def follow(self, data: bytes | str) -> None:
        """Apply one message of the events channel: invalidate, or re-warm on "warm"."""
        self.events += 1
        event = parse_message(data)
        if isinstance(event, WarmEvent):
            self._spawn(self._warm_logged(event.limit))
            return
        rewarm: list[bytes] = []
        for view in event.views:
            rewarm += self._invalidate(view, event)
        if rewarm:
            self._spawn(self._rewarm(rewarm))

    def _invalidate(self, view: str, event: WrittenEvent) -> list[bytes]:
        """Drop what `event` rewrote in `view`; returns the keys that were cached."""
        self.invalidations += 1
        metrics.CACHE_INVALIDATIONS.inc()
        version = event.versions.get(view)
        known = None if self._versions is None else self._versions.get(view, 0)
        if version is not None and known is not None:
            skipped = version > known + 1  # an earlier event of this view never arrived
            self._versions[view] = max(known, version)  # type: ignore[index]
            if skipped:
                self.lost_events += 1
                self.drop_view(view)
                return []
        ids = event.ids_of(view)
        if ids is None:
            self.drop_view(view)
            return []
        tokens = keys.entity_tokens([ids.tolist()])
        return self.rows.invalidate(keys.row_keys(self.project, view, tokens))

    def drop_view(self, view: str) -> None:
        """Drop every cached row of `view`, then read them again, in the background.

        From this call until the last row is dropped, reads skip the cache (and cache
        nothing): dropping 200k rows takes ~0.1 s of Python, done in slices so that
        requests keep flowing, and no slice boundary may serve one of them."""
        self._dropping += 1
        self.rows.epoch += 1  # reads in flight from before: not cached
        self._spawn(self._drop_view(view))

    async def _drop_view(self, view: str) -> None:
        dropped: list[bytes] = []
        try:
            snapshot = self.rows.snapshot()
            step = 10 * hotset.SLICE  # a prefix test is cheaper than a ranking
            for start in range(0, len(snapshot), step):
                dropped += self.rows.invalidate_view(view, snapshot[start : start + step])
                await asyncio.sleep(0)
        finally:
            self._dropping -= 1
        await self._rewarm(dropped)

    def _drop_all(self, why: str) -> None:
        if len(self.rows):
            log.warning("hot cache: dropping %d rows: %s", len(self.rows), why)
        self.rows.clear()
        self.invalidations += 1
        metrics.CACHE_INVALIDATIONS.inc()

    async def poll(self) -> None:
        """Compare the views' write versions with those announced; drop what moved
        unannounced; renew the lease on success. Redis errors propagate."""
        started, events = time.monotonic(), self.events
        raw = await self._pipe.execute(b"HGETALL", keys.versions_key(self.project), timeout_s=self.max_staleness_s / 2)
        if self.events != events:  # an event arrived meanwhile: compare next time
            return
        current = {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}
        known = self._versions
        if known is not None:
            if any(current.get(view, 0) < n for view, n in known.items()):
                self.lost_events += 1
                self._drop_all("the write versions went back (Redis flushed or replaced)")
            else:
                for view in [v for v, n in current.items() if n > known.get(v, 0)]:
                    self.lost_events += 1
                    log.warning("hot cache: %s was written without an event reaching us", view)
                    self.drop_view(view)
        self._versions = current
        self._valid_until = started + self.max_staleness_s
        self._polled.set()

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except (RedisError, OSError, Unavailable) as exc:
                log.warning("hot cache: cannot read the write versions: %s", exc)
            await asyncio.sleep(self.max_staleness_s / 4 if not self._polled.is_set() else self.max_staleness_s / 2)

    async def _drain_forever(self) -> None:
        while True:
            await asyncio.sleep(_DRAIN_S)
            self.hot.drain()
            self.export()

    def export(self) -> None:
        """Hand the counters kept on the request path to Prometheus."""
        now = (self.hits, self.misses, self.rows.evictions, self.lost_events)
        counters = (metrics.CACHE_HITS, metrics.CACHE_MISSES, metrics.CACHE_EVICTIONS, metrics.CACHE_LOST_EVENTS)
        for counter, value, before in zip(counters, now, self._exported, strict=True):
            if value > before:
                counter.inc(value - before)
        self._exported = now
        metrics.CACHE_BYTES.set(self.rows.bytes)
        metrics.CACHE_ENTRIES.set(len(self.rows))
        metrics.CACHE_SERVING.set(time.monotonic() < self._valid_until)

    async def _rewarm(self, row_keys: list[bytes]) -> None:
        """Read invalidated keys again, so their next request is a hit."""
        with contextlib.suppress(RedisError, OSError, TimeoutError, Unavailable):
            async with asyncio.timeout(max(5.0, len(row_keys) / 50_000)):
                await self._fill(row_keys)

    async def _fill(self, row_keys: Sequence[bytes]) -> int:
        filled = 0
        for start in range(0, len(row_keys), _WARM_BATCH):
            batch = list(row_keys[start : start + _WARM_BATCH])
            epoch, fetched_at = self.rows.epoch, time.monotonic()
            rows = await self._pipe.execute(b"MGET", *batch)
            filled += self.admit(batch, rows, epoch, fetched_at, admit_all=True)
        return filled

    async def warm(self, limit: int = DEFAULT_WARM_KEYS, budget_s: float = 10.0) -> int:
        """Fill the cache with the rows of the fleet's `limit` hottest keys, within
        `budget_s` float seconds (what was read by then stays); returns the rows cached.
        Redis errors end the warm-up early (logged), never raise."""
        start = time.perf_counter()
        filled = 0
        try:
            async with asyncio.timeout(budget_s):
                filled = await self._fill(await hotset.read(self._pipe, self.hot_key, limit))
        except TimeoutError:
            log.warning("warm-up stopped after its budget of %.1f s", budget_s)
        except (RedisError, OSError, Unavailable) as exc:
            log.warning("warm-up failed: %s", exc)
        elapsed = time.perf_counter() - start
        self.warm_seconds, self.warmed_rows = elapsed, filled
        metrics.CACHE_WARM_SECONDS.set(elapsed)
        log.info("hot cache warmed with %d rows in %.2f s", filled, elapsed)
        return filled

    async def _warm_logged(self, limit: int) -> None:
        await self.warm(limit)

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
            except (RedisError, OSError, Unavailable) as exc:
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
            invalidations=self.invalidations,
            lost_events=self.lost_events,
            bypassed=self.bypassed,
            warm_seconds=self.warm_seconds,
            warmed_rows=self.warmed_rows,
            serving=time.monotonic() < self._valid_until,
            top=hottest,
        )

    def _spawn(self, work: Awaitable[None]) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.ensure_future(work))

    async def close(self) -> None:
        """Stop the background tasks and close the Redis client."""
        await cancel_all(self._tasks)
        self._tasks.clear()
        await self._pipe.close()
        await self._redis.aclose()
