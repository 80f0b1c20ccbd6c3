"""Hot keys: track them, pre-warm them, serve their rows from memory, never stale.

    cache = HotCache("recsys", redis_url, cache_bytes=64 << 20, max_staleness_s=5.0)
    cache.start()                          # events listener, hot-set publisher
    await cache.warm(10_000, budget_s=10)  # the fleet's hot rows, before SERVING
    lookup = Lookup(pipe, registry, cache=cache)

Three parts:

    HotKeys    which Redis row keys are requested most: a count-min sketch (4 x 2^16
               float32 counters, 1 MiB) plus a dict of the top candidates, every count
               halved every `decay_s`, so a key that stops being asked for is forgotten
    RowCache   row key -> (packed row bytes, when it was read): LRU within a byte budget
               (len(key) + len(row) + 100 bytes per entry); only keys HotKeys calls hot
               are admitted
    HotCache   both, plus what keeps them honest: invalidation by materialization events,
               the periodic publication of this replica's hot keys to the sorted set
               `<project>:__meta__:hot` (ZADD of decayed counts, trimmed, EXPIRE), and
               `warm`, which reads that set and fills the cache

A lookup with a cache takes the fresh cached rows, MGETs only the misses (still one round
trip; none when everything is cached), and decodes the combined list exactly as without
a cache: the cache holds the packed rows, not decoded values, so TTL (OUTSIDE_MAX_AGE,
from the row's own event time, at decode time) and schema checks apply to cached rows
identically.

The guarantee. A cached row is never served after the invalidation for it arrived, and
never more than `max_staleness_s` after it was read from Redis:

- an event listing the entity ids written to a view drops those keys (and re-reads the
  ones that were cached, in the background); an event without ids for a view drops every
  cached key of that view; a re-subscription (events may have been lost) drops
  everything;
- a row read from Redis is admitted only if no invalidation was processed since that
  read started (an `epoch` counter): a read racing a write and its event cannot put the
  old value back after the event;
- an entry older than `max_staleness_s` (measured from when its read started) is a miss
  and is read again: this bounds staleness when an event is lost (pub/sub is at most
  once). Materialization publishes its event after Redis acknowledged the writes.

A "warm" event on the events channel (`featurestore-materialize warm`) makes every
replica re-run `warm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from featurestore import metrics
from featurestore.store import keys
from featurestore.store.events import parse_event

__all__ = ["ENTRY_OVERHEAD", "HotCache", "HotKeys", "RowCache"]

log = logging.getLogger(__name__)

ENTRY_OVERHEAD = 100  # bytes counted per cache entry beyond its key and row
_MULTIPLIERS = np.array(  # odd 64-bit constants: one multiply-shift hash per sketch row
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)
_RETRY_S = (0.1, 5.0)  # first and longest wait before resubscribing
_WARM_BATCH = 1000  # keys per MGET while warming


class HotKeys:
    """A bounded-memory heavy-hitter tracker over row keys.

    A count-min sketch (`depth` rows of 2^`width_bits` float32 counters) estimates every
    key's count from above; a key whose estimate reaches the admission threshold enters
    `top`, a dict of candidates pruned back to the `top_k` largest when it doubles (the
    k-th count becomes the threshold). Every `decay_s` all counts are halved and
    candidates under `min_count` dropped, so counts follow recent traffic.

    Parameters:
        top_k: how many keys count as hot.
        decay_s: the half-life of counts, float seconds (0: never decay by itself).
        min_count: the least (decayed) count of a hot key.
        sample_every: count the keys of 1 call of `add` in this many (1: all).
    """

    def __init__(self, *, top_k: int = 10_000, decay_s: float = 60.0, min_count: float = 2.0,
                 width_bits: int = 16, depth: int = 4, sample_every: int = 1) -> None:  # fmt: skip
        if not 1 <= depth <= len(_MULTIPLIERS):
            raise ValueError(f"depth must be 1 to {len(_MULTIPLIERS)}, not {depth}")
        self.top_k = top_k
        self.decay_s = decay_s
        self.min_count = min_count
        self._shift = np.uint64(64 - width_bits)
        self._mult = _MULTIPLIERS[:depth, None]
        self._offsets = (np.arange(depth, dtype=np.int64) << width_bits)[:, None]
        self._sketch = np.zeros(depth << width_bits, dtype=np.float32)
        self._top: dict[bytes, float] = {}
        self._threshold = min_count  # the k-th count once `top` was pruned
        self._sample_every = sample_every
        self._calls = 0
        self._next_decay = time.monotonic() + decay_s

    def add(self, row_keys: Sequence[bytes]) -> None:
        """Count one occurrence of each of `row_keys` (of 1 call in `sample_every`)."""
        self._calls += 1
        if self._calls % self._sample_every or not row_keys:
            return
        if self.decay_s > 0 and time.monotonic() >= self._next_decay:
            self.decay()
        hashes = np.fromiter(map(hash, row_keys), dtype=np.int64, count=len(row_keys))
        slots = ((hashes.view(np.uint64) * self._mult) >> self._shift).astype(np.int64)
        slots += self._offsets
        np.add.at(self._sketch, slots.ravel(), np.float32(self._sample_every))
        estimates = self._sketch[slots].min(axis=0)
        top = self._top
        for i in np.flatnonzero(estimates >= max(self._threshold, self.min_count)).tolist():
            top[row_keys[i]] = float(estimates[i])
        if len(top) > 2 * self.top_k:
            self._prune()

    def _prune(self) -> None:
        ranked = sorted(self._top.items(), key=lambda kv: kv[1], reverse=True)[: self.top_k]
        self._top = dict(ranked)
        self._threshold = ranked[-1][1] if ranked else self.min_count

    def decay(self) -> None:
        """Halve every count and forget candidates under `min_count`."""
        self._next_decay = time.monotonic() + self.decay_s
        self._sketch *= 0.5
        self._threshold *= 0.5
        self._top = {k: c / 2 for k, c in self._top.items() if c / 2 >= self.min_count}

    def is_hot(self, key: bytes) -> bool:
        return key in self._top

    def seed(self, row_keys: Sequence[bytes]) -> None:
        """Call `row_keys` hot (e.g. the fleet's hot set at warm-up) until they decay."""
        for key in row_keys:
            self._top.setdefault(key, max(self._threshold, self.min_count))

    def top(self, limit: int) -> list[tuple[bytes, float]]:
        """The `limit` hottest keys and their (decayed) counts, hottest first."""
        return sorted(self._top.items(), key=lambda kv: kv[1], reverse=True)[:limit]


class _Entry:
    __slots__ = ("fetched_at", "row", "size", "view")

    def __init__(self, row: bytes, fetched_at: float, view: bytes, size: int) -> None:
        self.row = row
        self.fetched_at = fetched_at  # time.monotonic() when the read that got it started
        self.view = view
        self.size = size


class RowCache:
    """Packed rows by Redis row key, LRU within a byte budget, with an invalidation epoch.

    An OrderedDict in use order (least recently used first) makes LRU two O(1) calls; a
    set of keys per view makes dropping a whole view proportional to that view's entries.

    Parameters:
        project: the key prefix (store/keys.py) to tell a key's view.
        cache_bytes: the budget: len(key) + len(row) + ENTRY_OVERHEAD summed over entries.
        max_staleness_s: entries read longer ago than this are misses, float seconds.
    """

    def __init__(self, project: str, cache_bytes: int, max_staleness_s: float = 5.0) -> None:
        self.cache_bytes = cache_bytes
        self.max_staleness_s = max_staleness_s
        self.bytes = 0
        self.epoch = 0  # incremented by every invalidation
        self._skip = len(project) + 1
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._views: dict[bytes, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get_many(self, row_keys: Sequence[bytes]) -> tuple[list[bytes | None], list[int]]:
        """The fresh cached rows of `row_keys` (None for a miss) and the misses' indices."""
        n = len(row_keys)
        if not self._entries:
            return [None] * n, list(range(n))
        rows: list[bytes | None] = [None] * n
        misses: list[int] = []
        oldest = time.monotonic() - self.max_staleness_s
        entries = self._entries
        for i, key in enumerate(row_keys):
            entry = entries.get(key)
            if entry is None or entry.fetched_at < oldest:
                misses.append(i)
            else:
                rows[i] = entry.row
                entries.move_to_end(key)
        return rows, misses

    def put(self, key: bytes, row: bytes, fetched_at: float) -> None:
        """Cache `row` at `key` (replacing any entry), then evict down to the budget."""
        size = len(key) + len(row) + ENTRY_OVERHEAD
        if size > self.cache_bytes:
            return
        self._drop(key)
        view = key[self._skip : key.find(b":{", self._skip)]
        self._entries[key] = _Entry(row, fetched_at, view, size)
        self._views.setdefault(view, set()).add(key)
        self.bytes += size
        while self.bytes > self.cache_bytes:
            self._drop(next(iter(self._entries)))
            metrics.CACHE_EVICTIONS.inc()

    def _drop(self, key: bytes) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        members = self._views[entry.view]
        members.discard(key)
        if not members:
            del self._views[entry.view]
        return True

    def invalidate(self, row_keys: Sequence[bytes]) -> list[bytes]:
        """Drop `row_keys`; returns those that were cached."""
        self.epoch += 1
        return [key for key in row_keys if self._drop(key)]

    def invalidate_view(self, view: str) -> int:
        """Drop every entry of `view`; returns how many there were."""
        self.epoch += 1
        members = list(self._views.get(view.encode(), ()))
        for key in members:
            self._drop(key)
        return len(members)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._views.clear()
        self.bytes = 0


class HotCache:
    """The hot-key cache of one server: tracker, rows, invalidation, publication, warm-up.

    Parameters:
        project: the registry's project (key prefix, events channel, hot set).
        redis_url: the online store; a client of its own (pub/sub, warm-up, publication).
        cache_bytes: the rows' byte budget.
        max_staleness_s: the longest a cached row is served after it was read, seconds.
        publish_s: how often this replica's hot keys go to the fleet's set (0: never).
        publish_keys: how many of them.
        top_k, decay_s: the tracker's (HotKeys).
    """

    def __init__(self, project: str, redis_url: str, *, cache_bytes: int = 64 << 20,
                 max_staleness_s: float = 5.0, publish_s: float = 10.0,
                 publish_keys: int = 10_000, top_k: int = 10_000,
                 decay_s: float = 60.0, min_count: float = 2.0) -> None:  # fmt: skip
        self.project = project
        self.hot = HotKeys(top_k=top_k, decay_s=decay_s, min_count=min_count)
        self.rows = RowCache(project, cache_bytes, max_staleness_s)
        self.publish_s = publish_s
        self.publish_keys = publish_keys
        self.hot_key = keys.hot_key(project)
        self.events = 0  # events processed (for tests and logs)
        self._redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=None, socket_connect_timeout=5.0,
            socket_keepalive=True, decode_responses=False, health_check_interval=0,
        )  # fmt: skip
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()

    # The request path (Lookup) -----------------------------------------------------------

    def get_many(self, row_keys: Sequence[bytes]) -> tuple[list[bytes | None], list[int]]:
        """Count `row_keys` as requested; their fresh cached rows and the misses' indices."""
        self.hot.add(row_keys)
        rows, misses = self.rows.get_many(row_keys)
        metrics.CACHE_HITS.inc(len(row_keys) - len(misses))
        metrics.CACHE_MISSES.inc(len(misses))
        return rows, misses

    @property
    def epoch(self) -> int:
        return self.rows.epoch

    def put_many(self, row_keys: Sequence[bytes], rows: Sequence[bytes | None], epoch: int,
                 fetched_at: float, *, admit_all: bool = False) -> int:  # fmt: skip
        """Cache the present rows of hot keys read by a read that started at `fetched_at`
        (monotonic) in `epoch`; nothing when an invalidation came since. Returns the count."""
        if epoch != self.rows.epoch:
            return 0
        admitted = 0
        is_hot = self.hot.is_hot
        for key, row in zip(row_keys, rows, strict=True):
            if row is not None and (admit_all or is_hot(key)):
                self.rows.put(key, row, fetched_at)
                admitted += 1
        metrics.CACHE_BYTES.set(self.rows.bytes)
        return admitted

    # Background work ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the events listener and the periodic publication of hot keys."""
        self._tasks.append(asyncio.create_task(self._listen()))
        if self.publish_s > 0:
            self._tasks.append(asyncio.create_task(self._publish_periodically()))

    async def wait_subscribed(self) -> None:
        """Return once the events listener is subscribed."""
        await self._subscribed.wait()

    async def _listen(self) -> None:
        delay = _RETRY_S[0]
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.events_channel(self.project))
                if not first:  # events sent while disconnected are lost
                    self.rows.clear()
                    metrics.CACHE_INVALIDATIONS.inc()
                first, delay = False, _RETRY_S[0]
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.follow(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("hot cache events: %s; resubscribing in %.1f s", exc, delay)
                self.rows.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_S[1])
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def follow(self, data: bytes | str) -> None:
        """Apply one message of the events channel: invalidate, or re-warm on "warm"."""
        self.events += 1
        warm = _warm_limit(data)
        if warm is not None:
            self._tasks.append(asyncio.create_task(self._warm_logged(warm)))
            return
        event = parse_event(data)
        rewarm: list[bytes] = []
        for view in event.views:
            ids = event.ids_of(view)
            metrics.CACHE_INVALIDATIONS.inc()
            if ids is None:
                self.rows.invalidate_view(view)
            else:
                tokens = keys.entity_tokens([ids.tolist()])
                rewarm += self.rows.invalidate(keys.row_keys(self.project, view, tokens))
        metrics.CACHE_BYTES.set(self.rows.bytes)
        if rewarm:
            self._tasks.append(asyncio.create_task(self._rewarm(rewarm)))
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _rewarm(self, row_keys: list[bytes]) -> None:
        """Read invalidated hot keys again, so their next request is a hit."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(5.0):
                await self._fill(row_keys, admit_all=True)

    async def _fill(self, row_keys: Sequence[bytes], *, admit_all: bool) -> int:
        filled = 0
        for start in range(0, len(row_keys), _WARM_BATCH):
            batch = row_keys[start : start + _WARM_BATCH]
            epoch, fetched_at = self.rows.epoch, time.monotonic()
            rows = await self._redis.mget(batch)
            filled += self.put_many(batch, rows, epoch, fetched_at, admit_all=admit_all)
        return filled

    async def warm(self, limit: int = 10_000, budget_s: float = 10.0) -> int:
        """Fill the cache with the rows of the fleet's `limit` hottest keys, within
        `budget_s` float seconds (what was read by then stays); returns the rows cached.
        Redis errors end the warm-up early (logged), never raise."""
        start = time.perf_counter()
        filled = 0
        try:
            async with asyncio.timeout(budget_s):
                hot = await self._redis.zrevrange(self.hot_key, 0, limit - 1)
                self.hot.seed(hot)
                filled = await self._fill(hot, admit_all=True)
        except TimeoutError:
            log.warning("warm-up stopped after its budget of %.1f s", budget_s)
        except (RedisError, OSError) as exc:
            log.warning("warm-up failed: %s", exc)
        elapsed = time.perf_counter() - start
        metrics.CACHE_WARM_SECONDS.set(elapsed)
        log.info("hot cache warmed with %d rows in %.2f s", filled, elapsed)
        return filled

    async def _warm_logged(self, limit: int) -> None:
        await self.warm(limit)

    async def publish(self) -> int:
        """Write this replica's hottest keys to the fleet's hot set; returns how many.

        Each key's score is this replica's decayed count (the last replica to publish a
        key sets it); the set is trimmed to 10 x `publish_keys` and expires after
        10 publication periods without a publication."""
        top = self.hot.top(self.publish_keys)
        if not top:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(self.hot_key, dict(top))
        pipe.zremrangebyrank(self.hot_key, 0, -(10 * self.publish_keys) - 1)
        pipe.expire(self.hot_key, max(int(10 * self.publish_s), 60))
        await pipe.execute()
        return len(top)

    async def _publish_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.publish_s)
            try:
                await self.publish()
            except (RedisError, OSError) as exc:
                log.warning("could not publish hot keys: %s", exc)

    async def close(self) -> None:
        """Stop the background tasks and close the Redis client."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._redis.aclose()


def _warm_limit(data: bytes | str) -> int | None:
    """The key limit of a "warm" event, or None for any other message."""
    try:
        event = json.loads(data)
    except (ValueError, TypeError):
        return None
    if not isinstance(event, dict) or event.get("event") != "warm":
        return None
    limit = event.get("limit")
    valid = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
    return limit if valid else 10_000
