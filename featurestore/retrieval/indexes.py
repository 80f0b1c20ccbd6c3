"""The retrieval indexes of a server: one `IndexManager` per embedding view, kept fresh.

    indexes = ViewIndexes(registry, redis_url, IndexConfig(), refresh_s=300, events=events)
    indexes.start()                 # background: first builds, events, periodic refresh
    await indexes.wait_ready()      # every indexable view has a live index
    manager = indexes.manager("item_embedding")

How an index follows the store. Each view has one worker task that refreshes it when
asked; requests that arrive while it works merge into one more refresh. A refresh reads
every live row of the view (`retrieval.vectors.scan_vectors`: absent, expired, past-TTL, null
and non-finite rows are left out), compares with the live index and

    nothing changed              keeps the index (no new generation)
    a few ids changed or went    `apply_changes` (upserts + deletes) on a copy, then swap
    many, or a flat index        `build` from the rows read, then swap

so an expired entity leaves the index on the next refresh, whatever its cause. Refreshes
are asked for by materialization events on the project's pub/sub channel (the server's
one `store.events.EventSubscriber`, which this listens to), by a registry change, after
a gap in the events (once subscribed again), and every `refresh_s` in case an event was
lost.

An event that lists the entity ids a run wrote asks for an update instead: only those
keys are read (`retrieval.vectors.read_vectors`, MGET in batches), and

    present and usable, new or changed     upserted
    absent, expired or unusable now        deleted (if indexed)

through `apply_changes`, so its cost follows the run's size, not the view's. Ids asked
for while the worker is busy merge; a full refresh asked for at the same time wins, and
more than `MAX_EVENT_IDS` pending ids become one.
Searches never wait on any of this: they run on the generation that was live when they
started (see `retrieval`).

Views that cannot be indexed (a join key other than one int64) are refused at start-up
with a log line, and searching them is FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from featurestore.errors import ConfigError, InvalidArgument, Unavailable
from featurestore.registry import Registry, ViewDef
from featurestore.retrieval.index import EmbeddingIndex, check_vectors
from featurestore.retrieval.manager import IndexManager
from featurestore.retrieval.spec import IndexConfig, Vectors
from featurestore.retrieval.vectors import read_vectors, scan_vectors
from featurestore.store.events import MAX_EVENT_IDS, EventSubscriber, Gap, WarmEvent, WrittenEvent
from featurestore.store.redis import connect
from featurestore.tasks import cancel_all
from featurestore.types import Ids

__all__ = ["Changes", "ViewIndexes", "diff_ids", "diff_index"]

log = logging.getLogger(__name__)
# Above this fraction of changed ids a refresh rebuilds rather than patching a copy.
_REBUILD_FRACTION = 0.3
_RETRY_S = (0.1, 5.0)  # first and longest wait before retrying a failed refresh


@dataclass(frozen=True, slots=True)
class Changes:
    """What differs between an index and the rows in the store."""

    upsert_ids: Ids
    upsert_vectors: Vectors  # as read from the store (not normalised)
    delete_ids: Ids

    def __len__(self) -> int:
        return int(self.upsert_ids.shape[0] + self.delete_ids.shape[0])


def diff_index(index: EmbeddingIndex, ids: Ids, vectors: Vectors) -> Changes:
    """The upserts and deletes that turn `index` into the store's rows (`ids`, `vectors`).

    Blocking numpy work (about 0.1 s per million vectors): run it off the event loop.
    """
    changed = _changed(index, ids, vectors)
    live_ids = index.label_ids[index.live]
    deletes = live_ids[~np.isin(live_ids, ids, assume_unique=True)]
    return Changes(ids[changed], vectors[changed], deletes.astype(np.int64, copy=False))


def diff_ids(index: EmbeddingIndex, asked: Ids, ids: Ids, vectors: Vectors) -> Changes:
    """The changes for the entities `asked` (unique), of which the store holds usable
    rows for `ids` (`vectors`): new or changed ones upserted, indexed ones without a
    usable row deleted. Blocking numpy work: run it off the event loop."""
    changed = _changed(index, ids, vectors)
    gone = asked[~np.isin(asked, ids, assume_unique=True)]
    _, indexed = index.labels_of(gone)
    return Changes(ids[changed], vectors[changed], gone[indexed])


def _changed(index: EmbeddingIndex, ids: Ids, vectors: Vectors) -> npt.NDArray[np.bool_]:
    """Which of the store's rows (`ids`, `vectors`) the index lacks or holds differently."""
    prepared = check_vectors(vectors, index.dim, index.metric, "stored vectors")
    labels, found = index.labels_of(ids)
    changed = ~found
    same = (index.vectors[labels] == prepared[found]).all(axis=1)
    changed[np.flatnonzero(found)[~same]] = True
    return changed


class _Asked:
    """What a view's worker was asked for since it last looked: a full refresh, and/or
    the entity ids of written rows (an update). Ids merge; past `MAX_EVENT_IDS` of them
    the request becomes a full refresh, which also covers any ids."""

    __slots__ = ("count", "event", "full", "ids")

    def __init__(self) -> None:
        self.event = asyncio.Event()  # set while anything is asked for
        self.full = False
        self.ids: list[Ids] = []
        self.count = 0

    def refresh(self) -> None:
        self.full, self.ids, self.count = True, [], 0
        self.event.set()

    def update(self, ids: Ids) -> None:
        if not self.full:
            self.ids.append(ids)
            self.count += ids.shape[0]
            if self.count > MAX_EVENT_IDS:
                self.refresh()
        self.event.set()

    def take(self) -> Ids | None:
        """Clear the request; the unique ids to update, or None for a full refresh."""
        full, ids = self.full, self.ids
        self.full, self.ids, self.count = False, [], 0
        self.event.clear()
        return None if full else np.unique(np.concatenate(ids))


class ViewIndexes:
    """Every embedding view's index of one registry, built and refreshed in the background.

    Parameters:
        registry: the compiled registry; `sync` replaces it.
        redis_url: the online store; a client of its own (scans) keeps the lookups'
            connection pool free.
        config: how indexes are built and searched.
        refresh_s: the safety refresh period, float seconds (0: events only).
        scan_count: rows per SCAN + MGET while reading a view.
        events: the server's event subscriber, which `start` adds the indexes to (None:
            no events; only registry changes and the periodic refresh).
    """

    def __init__(
        self,
        registry: Registry,
        redis_url: str,
        config: IndexConfig,
        *,
        refresh_s: float = 300.0,
        scan_count: int = 5000,
        events: EventSubscriber | None = None,
    ) -> None:
        self.config = config
        self._registry = registry
        self._refresh_s = refresh_s
        self._scan_count = scan_count
        self._events = events
        # Replies can take a while (a large MGET): no socket timeout.
        self._redis = connect(redis_url, timeout_s=None)
        self._managers: dict[str, IndexManager] = {}
        self._refused: dict[str, str] = {}  # view -> why it cannot be indexed
        self._wanted: dict[str, _Asked] = {}  # view -> the refresh or update asked for
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()  # set after each refresh that succeeded
        self.refreshes = 0  # refreshes completed (any outcome but an error)

    @property
    def views(self) -> tuple[str, ...]:
        """The embedding views being indexed (refused ones excluded)."""
        return tuple(self._wanted)

    def start(self) -> None:
        """Start the workers (first builds), follow the events, start the periodic refresh."""
        self.sync(self._registry)
        if self._events is not None:
            self._events.add(self)
        if self._refresh_s > 0:
            self._tasks.append(asyncio.create_task(self._refresh_periodically()))

    def sync(self, registry: Registry) -> None:
        """Follow `registry`: index its new embedding views, rebuild changed ones, drop
        removed ones. A changed view keeps serving its old index until the new one is
        built."""
        self._registry = registry
        indexable = {}
        for view in registry.views.values():
            if view.vector is None:
                continue
            try:
                IndexManager(registry.project, view, self.config)
            except ConfigError as exc:
                if self._refused.get(view.name) != str(exc):
                    log.error("not indexing %s: %s", view.name, exc)
                self._refused[view.name] = str(exc)
                continue
            self._refused.pop(view.name, None)
            indexable[view.name] = view
        for name in [n for n in self._wanted if n not in indexable]:
            self._workers.pop(name).cancel()
            self._wanted.pop(name)
            self._managers.pop(name, None)
        for name in indexable:
            if name not in self._wanted:
                self._wanted[name] = _Asked()
                self._workers[name] = asyncio.create_task(self._work(name))
        self.request_refresh(indexable)

    def request_refresh(self, views: Iterable[str]) -> None:
        """Ask for a refresh of each of `views` (unknown names are ignored)."""
        for name in views:
            wanted = self._wanted.get(name)
            if wanted is not None:
                wanted.refresh()

    def request_update(self, name: str, entity_ids: Ids) -> None:
        """Ask for the update of view `name`'s entities `entity_ids` (int64) from the
        store: upserted if usable there, deleted otherwise (an unknown view is ignored)."""
        wanted = self._wanted.get(name)
        if wanted is not None:
            wanted.update(entity_ids)

    @property
    def ready(self) -> bool:
        """True when every indexable view has a live index."""
        return all((m := self._managers.get(n)) is not None and m.ready for n in self._wanted)

    async def wait_ready(self) -> None:
        """Return once every indexable view has a live index."""
        while not self.ready:
            self._progress.clear()
            await self._progress.wait()

    def manager(self, name: str) -> IndexManager:
        """The index manager of view `name`.

        Raises NotFound (no such view), InvalidArgument (not an embedding view),
        ConfigError (an embedding view that cannot be indexed), Unavailable (not built yet).
        """
        view = self._registry.view(name)
        manager = self._managers.get(name)
        if manager is not None:
            return manager
        if view.vector is None:
            vectors = sorted(self._wanted) or ["none"]
            raise InvalidArgument(
                f"feature view {name!r} is not an embedding view (no indexed vector feature);"
                f" searchable views: {', '.join(vectors)}"
            )
        if name in self._refused:
            raise ConfigError(f"view {name!r} cannot be searched: {self._refused[name]}")
        raise Unavailable(f"the index of view {name!r} is being built; retry shortly")

    async def refresh(self, name: str, now_us: int | None = None) -> str:
        """Bring view `name`'s index up to date with the store now; returns what was done
        ("built", "updated" or "unchanged"). Normally the view's worker calls this."""
        view = self._registry.views[name]
        manager = self._managers.get(name)
        ids, vectors = await scan_vectors(
            self._redis, self._registry.project, view, scan_count=self._scan_count, now_us=now_us
        )
        live = manager.index if manager is not None and manager.view == view else None
        if manager is None or live is None or live.kind == "flat":
            fresh = self._new_manager(view) if live is None or manager is None else manager
            await fresh.build(ids, vectors)
            self._managers[name] = fresh
            return "built"
        assert manager is not None
        changes = await asyncio.to_thread(diff_index, live, ids, vectors)
        if not len(changes):
            return "unchanged"
        if len(changes) > _REBUILD_FRACTION * max(len(live), ids.shape[0]):
            await manager.build(ids, vectors)
            return "built"
        await manager.apply_changes(changes.upsert_ids, changes.upsert_vectors, changes.delete_ids)
        return "updated"

    async def update(self, name: str, entity_ids: Ids, now_us: int | None = None) -> str:
        """Bring the index entries of view `name`'s `entity_ids` (unique) up to date with
        the store, reading only their keys; returns "updated" or "unchanged" (or what
        `refresh` returns when the view has no index of its current definition yet)."""
        view = self._registry.views[name]
        manager = self._managers.get(name)
        live = manager.index if manager is not None and manager.view == view else None
        if manager is None or live is None:
            return await self.refresh(name, now_us)
        ids, vectors = await read_vectors(self._redis, self._registry.project, view, entity_ids, now_us=now_us)
        changes = await asyncio.to_thread(diff_ids, live, entity_ids, ids, vectors)
        if not len(changes):
            return "unchanged"
        await manager.apply_changes(changes.upsert_ids, changes.upsert_vectors, changes.delete_ids)
        return "updated"

    def _new_manager(self, view: ViewDef) -> IndexManager:
        return IndexManager(self._registry.project, view, self.config)

    async def _work(self, name: str) -> None:
        """Refresh `name` whenever asked; retry with backoff while refreshes fail."""
        wanted = self._wanted[name]
        delay = _RETRY_S[0]
        while True:
            await wanted.event.wait()
            ids = wanted.take()
            start = time.perf_counter()
            try:
                outcome = await (self.refresh(name) if ids is None else self.update(name, ids))
            except (Unavailable, OSError) as exc:
                log.warning("refresh of %s failed (%s); retrying in %.1f s", name, exc, delay)
            except Exception:  # a bad row or a FAISS error must not end the worker
                log.exception("refresh of %s failed; retrying in %.1f s", name, delay)
            else:
                self.refreshes += 1
                self._progress.set()
                delay = _RETRY_S[0]
                log.info(
                    "view %s: index %s in %.2f s%s",
                    name,
                    outcome,
                    time.perf_counter() - start,
                    "" if ids is None else f" ({ids.shape[0]} ids)",
                )
                continue
            if ids is None:  # ask again for what failed
                wanted.refresh()
            else:
                wanted.update(ids)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_S[1])

    def on_event(self, event: WrittenEvent | WarmEvent) -> None:
        """Ask for what a materialization event calls for: per view, an update of the
        ids it lists, else a full refresh (other events are not for the indexes)."""
        if isinstance(event, WarmEvent):
            return
        for name in event.views:
            ids = event.ids_of(name)
            if ids is None:
                self.request_refresh([name])
            else:
                self.request_update(name, ids)

    def on_gap(self, gap: Gap) -> None:
        """Once subscribed again, refresh every view: events sent while disconnected are lost."""
        if gap is Gap.RESUBSCRIBED:
            self.request_refresh(self._wanted)

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            self.request_refresh(self._wanted)

    async def close(self) -> None:
        """Stop following events, stop every background task and close the Redis client."""
        if self._events is not None:
            self._events.discard(self)
        await cancel_all([*self._tasks, *self._workers.values()])
        self._tasks.clear()
        self._workers.clear()
        await self._redis.aclose()
