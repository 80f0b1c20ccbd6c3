"""Freshness: what keeps cached rows honest (invalidation from events, write versions, the lease).

    freshness = Freshness("recsys", rows, pipe, max_staleness_s=5.0, rewarm=..., spawn=...)
    freshness.follow(event)             # each event of the channel (store/events.py)
    freshness.drop_all("why")           # after a gap in the events
    await freshness.poll_forever()      # the version poll, which renews the lease
    freshness.serving                   # rows may be served (the lease runs)

- Invalidation. Materialization announces every view it wrote on the events channel,
  after Redis acknowledged the rows, with the view's new write version (a counter in
  the hash `<project>:{__meta__}:versions`, incremented in the same script that
  publishes; store/events.py) and, for runs of at most 100k rows, the entity ids. An
  event with ids drops those keys (and re-reads the ones that were cached); one without
  drops the view's keys (and re-reads them); a version that skips one (an event was
  lost) drops the view.
- Lost events. Every `max_staleness_s / 2` the versions hash is read; a view whose
  version moved without its event is dropped, a counter that went back (Redis was
  flushed or replaced) drops everything. The cache serves rows only while the last such
  check started less than `max_staleness_s` ago (a lease): when Redis cannot be reached
  to check, the cache stops serving rather than serve rows it cannot vouch for.
- A gap in the events. When the subscription is lost (the connection dropped), and again
  once subscribed anew (events sent in between are gone), everything is dropped.
- Dropping a view takes ~0.1 s of Python for 200k rows: it is done in slices so that
  requests keep flowing, and from its start until its last slice reads skip the cache
  (`dropping`) and cache nothing (the row store's `epoch` moves), so no slice boundary
  may serve one of its rows.

The guarantee (README, "Freshness"): a row rewritten by materialization is not served
from a cache once that run's event for its view reached the replica, and in any case
not later than `max_staleness_s` after the event was published; no cached row is served
more than `max_age_s` after it was read from Redis (which covers what materialization
does not announce: Redis expiring a row, a manual write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from featurestore import metrics
from featurestore.cache import hotset
from featurestore.cache.rows import RowCache
from featurestore.errors import Unavailable
from featurestore.store import keys
from featurestore.store.events import WarmEvent, WrittenEvent
from featurestore.store.pipe import RedisPipe

__all__ = ["Freshness"]

log = logging.getLogger(__name__)

Rewarm = Callable[[list[bytes]], Awaitable[None]]
Spawn = Callable[[Awaitable[object]], None]


class Freshness:
    """Invalidation, write versions and the lease of one cache's row store.

    Parameters:
        project: the registry's project (keys, the versions hash).
        rows: the row store it drops rows from.
        pipe: the cache's pipelined connection, for the version poll.
        max_staleness_s: the longest a row rewritten by materialization is served after
            the run announced it, when the announcement is lost, float seconds; also the
            lease's length (it is renewed every half of it).
        rewarm: reads dropped keys again (Warmup.rewarm).
        spawn: runs background work until the cache closes.
    """

    def __init__(
        self,
        project: str,
        rows: RowCache,
        pipe: RedisPipe,
        *,
        max_staleness_s: float,
        rewarm: Rewarm,
        spawn: Spawn,
    ) -> None:
        self.project = project
        self.rows = rows
        self.pipe = pipe
        self.max_staleness_s = max_staleness_s
        self.events = 0  # events followed (tests, logs; a poll that overlaps one is void)
        self.lost_events = 0
        self.invalidations = 0
        self.dropping = 0  # views being dropped: reads skip the cache meanwhile
        self.valid_until = 0.0  # the lease: monotonic time until which rows are served
        self._versions: dict[str, int] | None = None  # write version per view, as known
        self._polled = asyncio.Event()
        self._rewarm = rewarm
        self._spawn = spawn

    @property
    def serving(self) -> bool:
        """True while the lease runs: cached rows may be served."""
        return time.monotonic() < self.valid_until

    async def wait_polled(self) -> None:
        """Return once the versions were read once (the lease began)."""
        await self._polled.wait()

    def follow(self, event: WrittenEvent | WarmEvent) -> None:
        """Follow one event of the channel: drop what a "written" event rewrote (and read
        it again in the background); every event voids a poll that overlaps it."""
        self.events += 1
        if isinstance(event, WarmEvent):
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
        self.dropping += 1
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
            self.dropping -= 1
        await self._rewarm(dropped)

    def drop_all(self, why: str) -> None:
        """Drop every cached row (logged with `why` when there were any)."""
        if len(self.rows):
            log.warning("hot cache: dropping %d rows: %s", len(self.rows), why)
        self.rows.clear()
        self.invalidations += 1
        metrics.CACHE_INVALIDATIONS.inc()

    async def poll(self) -> None:
        """Compare the views' write versions with those announced; drop what moved
        unannounced; renew the lease on success. Unavailable propagates."""
        started, events = time.monotonic(), self.events
        raw = await self.pipe.execute(b"HGETALL", keys.versions_key(self.project), timeout_s=self.max_staleness_s / 2)
        if self.events != events:  # an event arrived meanwhile: compare next time
            return
        current = {raw[i].decode(): int(raw[i + 1]) for i in range(0, len(raw), 2)}
        known = self._versions
        if known is not None:
            if any(current.get(view, 0) < n for view, n in known.items()):
                self.lost_events += 1
                self.drop_all("the write versions went back (Redis flushed or replaced)")
            else:
                for view in [v for v, n in current.items() if n > known.get(v, 0)]:
                    self.lost_events += 1
                    log.warning("hot cache: %s was written without an event reaching us", view)
                    self.drop_view(view)
        self._versions = current
        self.valid_until = started + self.max_staleness_s
        self._polled.set()

    async def poll_forever(self) -> None:
        """Poll every `max_staleness_s / 2` (a quarter until the first poll succeeded)."""
        while True:
            try:
                await self.poll()
            except Unavailable as exc:
                log.warning("hot cache: cannot read the write versions: %s", exc)
            await asyncio.sleep(self.max_staleness_s / 4 if not self._polled.is_set() else self.max_staleness_s / 2)
