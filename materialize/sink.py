"""Packs row batches with `store.layout` and writes them to Redis with guarded writes.

Reading, packing and writing overlap: the reader (PostgreSQL COPY -> numpy -> packed
rows) puts packed batches on a bounded queue, and a few writer tasks each send one
pipeline at a time, the whole batch in one round trip. While a writer waits for Redis,
the reader parses and the other writers send, so PostgreSQL, Python and Redis work at
the same time. The queue's depth bounds memory: when Redis is slower than PostgreSQL,
the reader waits on the queue, the COPY callback waits on the reader, and asyncpg stops
reading the socket.

A batch is written one of two ways, both the guarded write (store/redis.py): while most
keys are new (a first load), `set_absent` (a native SET ... NX per row) and the script
for the keys that existed; while most exist (a rerun, the daily cron), the script alone
(`guarded_write`: `script_rows` rows per call). Each batch tells which case the next one
is likely in. Views without variable-width features travel as a uint8 matrix of rows
(`encode_fixed_rows`), which `store.bulk` packs into commands without a bytes object per
row. Redis's CPU per row of bench_wide (50 float8 features) fell from 5.5-7 us to 2.2-2.6
us for a first load and from ~9 to ~5 us for a rerun (benchmarks/README.md,
"bench_materialize.py").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from featurestore.errors import FeatureStoreError
from featurestore.registry import ViewDef
from featurestore.store.keys import entity_tokens, row_keys
from featurestore.store.layout import DType, encode_fixed_rows, encode_rows
from featurestore.store.redis import (
    BulkClient,
    Client,
    Rows,
    WriteCounts,
    connect_bulk,
    guarded_write,
    set_absent,
)
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

# Row keys, packed rows, and each row's expiry in Unix milliseconds (None: no expiry).
Packed = tuple[list[bytes], Rows, "npt.NDArray[np.int64] | None"]
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


def connect(url: str, *, timeout_s: float = 10.0, max_connections: int = 8) -> Client:
    """The job's Redis client (`store.redis.connect_bulk`): a `BulkClient` for one Redis,
    whose rows go on its `BulkPipe`, or a `ClusterClient` for redis+cluster://.

    Parameters:
        timeout_s: socket connect and reply timeout; a pipeline of a few thousand script
            calls must fit in it.
        max_connections: redis-py's pool, for the bookkeeping (lock, watermarks, events).
    """
    return connect_bulk(url, timeout_s=timeout_s, max_connections=max_connections)


def expiry_ms(view: ViewDef, grace_s: float) -> int:
    """Redis expiry after the event time: the view's TTL plus a grace (0: never expires).

    The grace keeps a value past its TTL readable for a while, so the server reports it
    OUTSIDE_MAX_AGE instead of NOT_FOUND.
    """
    if not view.ttl_s:
        return 0
    return round((view.ttl_s + grace_s) * 1000)


def pack(project: str, view: ViewDef, batch: RowBatch, expiry: int = 0) -> Packed:
    """The Redis keys and packed rows of a batch (vectorised; a uint8 matrix for a view
    without variable-width features, see `encode_fixed_rows`), and each row's expiry in
    Unix milliseconds (event time + `expiry`, as the guard computes it; None when
    `expiry` is 0: no expiry)."""
    keys = row_keys(project, view.name, entity_tokens(batch.keys))
    layout = view.layout
    encode = encode_rows if layout.var_features else encode_fixed_rows
    rows = encode(layout, batch.event_ts_us, batch.columns, batch.nulls)
    expire_at = batch.event_ts_us // 1000 + expiry if expiry else None
    return keys, rows, expire_at


def _split(keys: Sequence[bytes], rows: Rows, size: int) -> list[tuple[Sequence[bytes], Rows]]:
    return [(keys[i : i + size], rows[i : i + size]) for i in range(0, len(keys), size)]


class _Writes:
    """The writers' shared way of writing: new keys by SET NX first, or the script alone.

    A first load finds no key and a rerun finds them all; a batch tells which case the
    next one is likely in (most of its keys new or not), so each batch pays for at most
    the wrong guess of its predecessor.
    """

    def __init__(self, client: Client, expiry: int, options: SinkOptions) -> None:
        self.client = client
        self.expiry = expiry
        self.options = options
        self.sha: list[str] = []  # the guarded-write script's SHA1
        self.new_keys = isinstance(client, BulkClient)  # SET NX needs the BulkPipe

    async def write(self, packed: Packed) -> WriteCounts:
        keys, rows, expire_at = packed
        if not self.new_keys:
            done = await guarded_write(self.client, _split(keys, rows, self.options.script_rows), self.expiry, self.sha)
        else:
            assert isinstance(self.client, BulkClient)
            existed = await set_absent(self.client, keys, rows, expire_at)
            done = WriteCounts(written=len(keys) - len(existed), existed=len(existed))
            if existed:
                rest_keys = [keys[i] for i in existed]
                rest_rows = rows[existed] if isinstance(rows, np.ndarray) else [rows[i] for i in existed]
                rest = await guarded_write(
                    self.client, _split(rest_keys, rest_rows, self.options.script_rows), self.expiry, self.sha
                )
                done.written += rest.written
                done.skipped += rest.skipped
        if isinstance(self.client, BulkClient):
            self.new_keys = done.existed * 2 < len(keys)
        return done


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
    writes = _Writes(client, expiry, options)

    async def on_batch(batch: RowBatch) -> None:
        counts.read += len(batch)
        await queue.put(pack(project, view, batch, expiry))

    async def writer() -> None:
        while (item := await queue.get()) is not None:
            done = await writes.write(item)
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
