"""Embedding retrieval: one `IndexManager` per embedding view, searched without blocking.

    IndexManager            owns the live EmbeddingIndex of a view; builds the next one
      build / apply_changes / rebuild_from_store   off the event loop, then one reference
                            assignment swaps it in (searches in flight finish on the old)
      search / search_by_id validate on the loop, then queue for the coalescer
    _Coalescer              while one FAISS call runs, collects the queries that arrive and
                            sends them as one batched call; one process-wide search thread
                            runs every call (FAISS releases the GIL; GPU resources are used
                            from that thread only)

Index choice, GPU placement and the config live in `featurestore.retrieval.spec`; the index
itself in `featurestore.retrieval.index`. Only views with a single int64 join key can be
indexed: the entity id is the FAISS-side id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from featurestore.errors import ConfigError, InvalidArgument, NotFound, Unavailable
from featurestore.limits import MAX_K, MAX_QUERIES
from featurestore.registry import ViewDef
from featurestore.retrieval.index import (
    BuildStats,
    EmbeddingIndex,
    SearchResult,
    check_ids,
    check_vectors,
    drop_where,
)
from featurestore.retrieval.spec import IndexConfig, Vectors, set_faiss_threads
from featurestore.retrieval.vectors import scan_vectors
from featurestore.store.layout import DType
from featurestore.types import Ids

__all__ = [
    "BuildStats",
    "EmbeddingIndex",
    "IndexConfig",
    "IndexManager",
    "SearchResult",
    "search_thread",
]

log = logging.getLogger(__name__)

_executor_lock = threading.Lock()
_search_executor: ThreadPoolExecutor | None = None


def search_thread() -> ThreadPoolExecutor:
    """The one thread every FAISS search (and every GPU operation) of the process runs on."""
    global _search_executor
    with _executor_lock:
        if _search_executor is None:
            _search_executor = ThreadPoolExecutor(1, thread_name_prefix="faiss-search")
        return _search_executor


class _Pending:
    __slots__ = ("allow", "exclude", "future", "index", "k", "queries")

    def __init__(
        self,
        index: EmbeddingIndex,
        queries: Vectors,
        k: int,
        allow: Ids | None,
        exclude: Ids | None,
        future: asyncio.Future[SearchResult],
    ) -> None:
        self.index, self.queries, self.k = index, queries, k
        self.allow, self.exclude, self.future = allow, exclude, future


class _Coalescer:
    """Batches concurrent searches: the first runs at once; those arriving meanwhile wait
    for it and then go together. Costs a lone caller nothing, and under load turns many
    single-query FAISS calls into one (q, dim) call, which is what FAISS is fast at."""

    def __init__(self, max_batch: int, omp_threads: int) -> None:
        self._omp_threads = omp_threads
        self._queue: list[_Pending] = []
        self._drainer: asyncio.Task[None] | None = None
        self._max_batch = max_batch
        self.faiss_calls = 0  # FAISS search calls made; counted on the search thread

    async def submit(self, pending: _Pending) -> SearchResult:
        self._queue.append(pending)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await pending.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            size, cut = 0, 0
            while cut < len(self._queue) and (cut == 0 or size < self._max_batch):
                size += self._queue[cut].queries.shape[0]
                cut += 1
            batch, self._queue = self._queue[:cut], self._queue[cut:]
            try:
                results = await loop.run_in_executor(search_thread(), self._run, batch)
            except BaseException as exc:  # never strand a caller, whatever happened
                results = [exc] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():  # the caller was cancelled
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _run(self, batch: list[_Pending]) -> list[SearchResult | BaseException]:
        """On the search thread: one FAISS call per index for unfiltered searches (k is
        the largest asked; each caller gets its first k), one per filtered search."""
        set_faiss_threads(self._omp_threads)  # OpenMP's thread count is per calling thread
        results: list[SearchResult | BaseException] = [ValueError("unanswered")] * len(batch)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(batch):
            if p.allow is None and p.exclude is None:
                groups.setdefault(id(p.index), []).append(i)
            else:
                results[i] = self._call(p.index, p.queries, p.k, p.allow, p.exclude)
        for members in groups.values():
            index = batch[members[0]].index
            queries = np.concatenate([batch[i].queries for i in members])
            k = max(batch[i].k for i in members)
            joint = self._call(index, queries, k, None, None)
            start = 0
            for i in members:
                rows = slice(start, start + batch[i].queries.shape[0])
                start = rows.stop
                results[i] = (
                    joint
                    if isinstance(joint, BaseException)
                    else SearchResult(joint.ids[rows, : batch[i].k], joint.scores[rows, : batch[i].k])
                )
        return results

    def _call(
        self,
        index: EmbeddingIndex,
        queries: Vectors,
        k: int,
        allow: Ids | None,
        exclude: Ids | None,
    ) -> SearchResult | BaseException:
        self.faiss_calls += 1
        try:
            return index.search(queries, k, allow, exclude)
        except Exception as exc:  # FAISS raises RuntimeError; report it to the caller
            return exc


class IndexManager:
    """The retrieval index of one embedding view: builds, swaps, updates and searches it.

    >>> manager = IndexManager(registry.project, registry.view("item_embedding"))
    >>> await manager.rebuild_from_store(redis_client)  # doctest: +SKIP
    >>> ids, scores = await manager.search(queries, k=10)  # doctest: +SKIP
    """

    def __init__(self, project: str, view: ViewDef, config: IndexConfig | None = None) -> None:
        if view.vector is None:
            raise ConfigError(f"view {view.name!r} has no indexed vector feature")
        if len(view.join_keys) != 1 or view.join_keys[0].dtype is not DType.INT64:
            raise ConfigError(
                f"view {view.name!r}: retrieval needs one int64 join key, it has {[k.name for k in view.join_keys]}"
            )
        self.project, self.view, self.spec = project, view, view.vector
        self.config = config or IndexConfig()
        self._live: EmbeddingIndex | None = None
        self._generation = 0
        self._update_lock = asyncio.Lock()  # one build or update at a time: none is lost
        self._coalescer = _Coalescer(self.config.max_batch, self.config.omp_threads)

    @property
    def ready(self) -> bool:
        """True once an index (possibly empty) is live: the view can serve searches."""
        return self._live is not None

    @property
    def index(self) -> EmbeddingIndex | None:
        """The live index (None before the first build)."""
        return self._live

    @property
    def faiss_calls(self) -> int:
        """FAISS search calls made so far (fewer than searches when they were coalesced)."""
        return self._coalescer.faiss_calls

    async def build(self, ids: Any, vectors: Any) -> BuildStats:
        """Build an index of `vectors` (n, dim) under entity `ids` (n,) and swap it in.

        Runs off the event loop; searches keep using the previous index until the swap.
        Raises InvalidArgument for a wrong dimension, NaN/inf, or repeated ids.
        """
        checked = check_vectors(vectors, self.spec.dim, self.spec.metric, "vectors")
        checked_ids = check_ids(ids, "ids", checked.shape[0])
        async with self._update_lock:
            generation = self._generation + 1
            index = await self._off_loop(
                EmbeddingIndex.from_checked,
                checked_ids,
                checked,
                self.spec.metric,
                self.config,
                generation,
            )
            return await self._publish(index)

    async def apply_changes(self, upsert_ids: Any, upsert_vectors: Any, delete_ids: Any = ()) -> BuildStats:
        """Upsert vectors by entity id and delete ids (unknown ones are ignored), then swap.

        Produces a new index generation (a modified copy, or a rebuild; see
        `EmbeddingIndex.with_changes`) off the event loop; the next search sees it.
        """
        vectors = check_vectors(upsert_vectors, self.spec.dim, self.spec.metric, "upsert_vectors")
        ids = check_ids(upsert_ids, "upsert_ids", vectors.shape[0])
        deletes = check_ids(delete_ids, "delete_ids")
        async with self._update_lock:
            live = self._live
            if live is None:
                raise Unavailable(f"the index of view {self.view.name!r} is not built yet")
            generation = self._generation + 1
            index = await self._off_loop(live.with_changes, ids, vectors, deletes, generation)
            return await self._publish(index)

    async def _off_loop(self, build: Callable[..., EmbeddingIndex], *args: Any) -> EmbeddingIndex:
        """Run a build on a worker thread, with this view's OpenMP thread count (an
        OpenMP setting applies only to the thread that makes it)."""

        def run() -> EmbeddingIndex:
            set_faiss_threads(self.config.omp_threads)
            return build(*args)

        return await asyncio.to_thread(run)

    async def _publish(self, index: EmbeddingIndex) -> BuildStats:
        if self.config.wants_gpu():  # GPU work happens on the one GPU thread
            await asyncio.get_running_loop().run_in_executor(search_thread(), index.place_on_gpu)
        self._generation = index.stats.generation
        self._live = index  # the swap: one reference assignment
        log.info(
            "view %s: index generation %d live: %s",
            self.view.name,
            index.stats.generation,
            index.stats,
        )
        return index.stats

    async def rebuild_from_store(
        self, client: aioredis.Redis, *, scan_count: int = 1000, now_us: int | None = None
    ) -> BuildStats:
        """Rebuild from every row of the view in Redis and swap it in.

        SCANs `<project>:<view>:{*}` in batches of `scan_count`, MGETs each batch and
        decodes it with the view's layout. Rows that are absent (expired), stale-schema,
        null, past the view's TTL, non-finite or zero under cosine are left out.
        """
        ids, vectors = await scan_vectors(client, self.project, self.view, scan_count=scan_count, now_us=now_us)
        return await self.build(ids, vectors)

    async def search(self, queries: Any, k: int, exclude_ids: Any = None, allow_ids: Any = None) -> SearchResult:
        """The k nearest entities to each query row.

        Parameters:
            queries: (q, dim) numbers (a single (dim,) vector is one query).
            k: neighbours per query, 1..1000.
            exclude_ids: entity ids never returned.
            allow_ids: when given, only these entity ids may be returned.
        Returns SearchResult(ids (q, k) int64, scores (q, k) float32), -1 padded.
        Raises InvalidArgument (bad k, shape, values or filters), Unavailable (not built),
        NotFound (the index holds no vectors).
        """
        index = self._index_for(k)
        checked = check_vectors(queries, index.dim, index.metric, "queries")
        if not 1 <= checked.shape[0] <= MAX_QUERIES:
            raise InvalidArgument(f"{checked.shape[0]} queries; send 1 to {MAX_QUERIES} per call")
        return await self._submit(index, checked, k, exclude_ids, allow_ids)

    async def search_by_id(
        self,
        entity_ids: Any,
        k: int,
        *,
        exclude_self: bool = True,
        exclude_ids: Any = None,
        allow_ids: Any = None,
    ) -> SearchResult:
        """The k nearest entities to the stored vectors of `entity_ids` (one query each).

        With `exclude_self` an entity is never its own neighbour. Raises NotFound naming
        the ids that have no vector in the index; otherwise as `search`.
        """
        index = self._index_for(k)
        ids = check_ids(entity_ids, "entity_ids")
        labels, found = index.labels_of(ids)
        if not found.all():
            raise NotFound(f"view {self.view.name!r} has no vector for entity ids {ids[~found][:10].tolist()}")
        if not 1 <= ids.shape[0] <= MAX_QUERIES:
            raise InvalidArgument(f"{ids.shape[0]} entity ids; send 1 to {MAX_QUERIES}")
        queries = np.ascontiguousarray(index.vectors[labels])
        result = await self._submit(index, queries, k + exclude_self, exclude_ids, allow_ids)
        if not exclude_self:
            return result
        scores, ids_out = drop_where(result.scores, result.ids, result.ids == ids[:, None], k)
        pad = np.float32(np.inf if index.metric == "l2" else -np.inf)
        return SearchResult(ids_out, np.where(ids_out < 0, pad, scores).astype(np.float32))

    def _index_for(self, k: int) -> EmbeddingIndex:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k={k!r} is out of range: ask for 1 to {MAX_K} neighbours")
        index = self._live  # captured once: this search runs on this generation
        if index is None:
            raise Unavailable(
                f"the index of view {self.view.name!r} is not built yet; retry once the server reports SERVING"
            )
        if not len(index):
            raise NotFound(f"the index of view {self.view.name!r} holds no vectors: materialize the view first")
        return index

    async def _submit(
        self, index: EmbeddingIndex, queries: Vectors, k: int, exclude_ids: Any, allow_ids: Any
    ) -> SearchResult:
        allow = self._filter_labels(index, allow_ids, "allow_ids")
        exclude = self._filter_labels(index, exclude_ids, "exclude_ids")
        future: asyncio.Future[SearchResult] = asyncio.get_running_loop().create_future()
        return await self._coalescer.submit(_Pending(index, queries, int(k), allow, exclude, future))

    def _filter_labels(self, index: EmbeddingIndex, ids: Any, what: str) -> Ids | None:
        if ids is None:
            return None
        array = np.unique(np.asarray(ids))
        if array.size == 0:
            array = array.astype(np.int64)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InvalidArgument(f"{what} must be a 1-D sequence of int64 entity ids")
        if array.size > self.config.max_filter_ids:
            raise InvalidArgument(f"{what} holds {array.size} ids; at most {self.config.max_filter_ids} are allowed")
        labels, _ = index.labels_of(array.astype(np.int64, copy=False))
        return labels
