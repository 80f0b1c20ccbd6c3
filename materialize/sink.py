"""Packs row batches with `store.layout` and writes them to Redis with guarded writes.

Reading, packing and writing overlap: the reader (PostgreSQL COPY -> numpy -> packed
rows) puts packed batches on a bounded queue, and a few writer tasks each send one
pipeline at a time (`store.redis.guarded_write`: `script_rows` rows per EVALSHA, the
whole batch in one round trip). While a writer waits for Redis, the reader parses and
the other writers send, so PostgreSQL, Python and Redis work at the same time. The
queue's depth bounds memory: when Redis is slower than PostgreSQL, the reader waits on
the queue, the COPY callback waits on the reader, and asyncpg stops reading the socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from featurestore.errors import FeatureStoreError
from featurestore.registry import ViewDef
from featurestore.store.keys import entity_tokens, row_keys
from featurestore.store.layout import DType, encode_rows
from featurestore.store.redis import Client, guarded_write
from featurestore.store.redis import connect as connect_any
from featurestore.store.slots import is_cluster_url
from materialize.source import RowBatch

__all__ = [
    "Counts",
    "SinkOptions",
    "WrittenIds",
    "connect",
    "expiry_ms",
    "pack",
    "write_through",
]

Packed = tuple[list[bytes], list[bytes]]  # (row keys, packed rows), in the same order
Producer = Callable[[Callable[[RowBatch], Awaitable[None]]], Awaitable[None]]


@dataclass(slots=True)
class Counts:
    """Rows read from PostgreSQL, written to Redis, and skipped as older than Redis's."""

    read: int = 0
    written: int = 0
    skipped: int = 0

    def add(self, other: Counts) -> None:
        self.read += other.read
        self.written += other.written
        self.skipped += other.skipped


class WrittenIds:
    """The entity ids of the rows a view's run wrote, kept while there are at most `limit`.

    Only for views with one int64 join key (`None` from `ids` otherwise). Memory stays
    bounded: past `limit` rows the ids are dropped and `ids` is None (announce the whole
    view). Ids of rows the guarded write skipped as older are included: a superset is
    harmless to whoever re-reads them.

    >>> written = WrittenIds(view, limit=100_000)
    >>> written.add(batch)  # each batch sent to Redis
    >>> written.ids         # int64 array, or None
    """

    __slots__ = ("_count", "_parts", "limit")

    def __init__(self, view: ViewDef, limit: int) -> None:
        self.limit = limit
        keys = view.join_keys
        self._parts: list[npt.NDArray[np.int64]] | None = (
            [] if len(keys) == 1 and keys[0].dtype is DType.INT64 else None
        )
        self._count = 0

    def add(self, batch: RowBatch) -> None:
        """Note the entity ids of `batch`."""
        self._count += len(batch)
        if self._parts is None:
            return
        if self._count > self.limit:
            self._parts = None  # too many to announce: stop collecting
            return
        self._parts.append(np.asarray(batch.keys[0], dtype=np.int64))

    @property
    def ids(self) -> npt.NDArray[np.int64] | None:
        """The ids noted so far, or None (too many, or not one int64 join key)."""
        if self._parts is None:
            return None
        return np.concatenate(self._parts) if self._parts else np.empty(0, np.int64)


@dataclass(frozen=True, slots=True)
class SinkOptions:
    """How to write: rows per EVALSHA, writers in flight, packed batches queued, expiry."""

    script_rows: int = 1000
    writers: int = 2
    queue_depth: int = 4
    expiry_grace_s: float = 86_400.0


class _HiredisPackedConnection(Connection):
    """redis-py's asyncio connection, packing commands with hiredis's C packer.

    redis-py packs asyncio commands in Python, argument by argument; for the guarded
    write's thousands of arguments per call that was the job's largest cost (1.4 us per
    row against 0.6 with hiredis, measured on 1,000-row batches).
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "SCRIPT LOAD": two words
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


def connect(url: str, *, timeout_s: float = 10.0, max_connections: int = 8) -> Client:
    """A Redis client for the job: bytes replies, hiredis packing, no health checks.

    Parameters:
        url: redis://host:port/db, or redis+cluster://host:port,... for a cluster (a
            `store.redis.ClusterClient`, whose rows go one script call per slot through
            its hiredis `ClusterPipe`).
        timeout_s: socket connect and read timeout, seconds; a pipeline of a few
            thousand script calls must fit in it.
        max_connections: at least the number of writers, plus one for bookkeeping.
    """
    if is_cluster_url(url):
        return connect_any(url, timeout_s=timeout_s, max_connections=max_connections)
    pool = aioredis.ConnectionPool.from_url(
        url,
        connection_class=_HiredisPackedConnection,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        max_connections=max_connections,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


def expiry_ms(view: ViewDef, grace_s: float) -> int:
    """Redis expiry after the event time: the view's TTL plus a grace (0: never expires).

    The grace keeps a value past its TTL readable for a while, so the server reports it
    OUTSIDE_MAX_AGE instead of NOT_FOUND.
    """
    if not view.ttl_s:
        return 0
    return round((view.ttl_s + grace_s) * 1000)


def pack(project: str, view: ViewDef, batch: RowBatch) -> Packed:
    """The Redis keys and packed rows of a batch (vectorised; see `encode_rows`)."""
    keys = row_keys(project, view.name, entity_tokens(batch.keys))
    rows = encode_rows(view.layout, batch.event_ts_us, batch.columns, batch.nulls)
    return keys, rows


def _split(packed: Packed, size: int) -> list[tuple[Sequence[bytes], Sequence[bytes]]]:
    keys, rows = packed
    return [(keys[i : i + size], rows[i : i + size]) for i in range(0, len(keys), size)]


async def write_through(
    client: Client,
    project: str,
    view: ViewDef,
    produce: Producer,
    options: SinkOptions,
    on_progress: Callable[[int], None] | None = None,
) -> Counts:
    """Run `produce` (which calls back with batches) and write every batch to Redis.

    Parameters:
        client: the Redis client (its pool must allow `options.writers` connections).
        project, view: where the rows go (`store.keys.row_keys`) and how they are packed.
        produce: awaited with the callback that takes each batch, e.g. a bound
            `source.stream_window`.
        on_progress: called with the number of rows of each acknowledged pipeline.

    Returns the counts once Redis has acknowledged every write; raises the first
    error of the reader or of any writer (the others are cancelled).
    """
    counts = Counts()
    queue: asyncio.Queue[Packed | None] = asyncio.Queue(maxsize=options.queue_depth)
    expiry = expiry_ms(view, options.expiry_grace_s)
    sha: list[str] = []  # the guarded-write script's SHA, shared by the writers

    async def on_batch(batch: RowBatch) -> None:
        counts.read += len(batch)
        await queue.put(pack(project, view, batch))

    async def writer() -> None:
        while (item := await queue.get()) is not None:
            done = await guarded_write(client, _split(item, options.script_rows), expiry, sha)
            counts.written += done.written
            counts.skipped += done.skipped
            if on_progress is not None:
                on_progress(len(item[0]))

    try:
        async with asyncio.TaskGroup() as group:
            writers = [group.create_task(writer()) for _ in range(options.writers)]
            await produce(on_batch)
            for _ in writers:
                await queue.put(None)
    except BaseExceptionGroup as group_error:
        raise _first_error(group_error) from None
    return counts


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Our own error if the group holds one (the one worth reporting), else the first."""
    errors = list(_leaves(group))
    return next((e for e in errors if isinstance(e, FeatureStoreError)), errors[0])


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]
