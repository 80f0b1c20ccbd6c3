"""Embedding vectors read from Redis: a whole view (SCAN + MGET) or named entities (MGET).

    ids, vectors = await scan_vectors(client, "recsys", view)              # every usable row
    ids, vectors = await read_vectors(client, "recsys", view, np.array([7, 9]))

Both leave out the same rows: absent, written under another schema, null, past the
view's TTL, non-finite, or zero under the cosine metric. The Redis commands themselves
(and the translation of Redis errors into Unavailable) are store.redis's; this module
decodes.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from featurestore.registry import ViewDef
from featurestore.retrieval.spec import Vectors
from featurestore.store.keys import entity_tokens, row_keys, view_key_pattern
from featurestore.store.layout import decode_rows
from featurestore.store.redis import Client, mget, scan_keys
from featurestore.types import Ids

__all__ = ["read_vectors", "scan_vectors"]

log = logging.getLogger(__name__)


async def scan_vectors(
    client: Client,
    project: str,
    view: ViewDef,
    *,
    scan_count: int = 1000,
    now_us: int | None = None,
) -> tuple[Ids, Vectors]:
    """Every usable (entity id, vector) of `view` in Redis, read in SCAN batches + MGET.

    `now_us` (microseconds since the epoch) enables the TTL check; by default the
    current time.
    """
    assert view.vector is not None
    now = int(time.time() * 1e6) if now_us is None else now_us
    ids: list[Ids] = []
    vectors: list[Vectors] = []
    batch: list[bytes] = []
    skipped = 0

    async def flush() -> None:
        nonlocal skipped
        where, column, dropped = _usable(view, await mget(client, batch), now)
        skipped += dropped
        ids.append(np.array([int(batch[i][batch[i].rindex(b"{") + 1 : -1]) for i in where], dtype=np.int64))
        vectors.append(column)
        batch.clear()

    async for keys in scan_keys(
        client, view_key_pattern(project, view.name), count=scan_count, what=f"view {view.name!r}"
    ):
        batch += keys
        if len(batch) >= scan_count:
            await flush()
    if batch:
        await flush()
    if skipped:
        log.warning("view %s: %d rows left out of the index (null, stale, NaN or zero)", view.name, skipped)
    all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    all_vectors = np.concatenate(vectors) if vectors else np.empty((0, view.vector.dim), np.float32)
    # SCAN may return a key twice (during a rehash): keep each entity once.
    unique_ids, first = np.unique(all_ids, return_index=True)
    return unique_ids, all_vectors[first]


async def read_vectors(
    client: Client,
    project: str,
    view: ViewDef,
    entity_ids: Ids,
    *,
    batch_size: int = 2000,
    now_us: int | None = None,
) -> tuple[Ids, Vectors]:
    """The usable (entity id, vector) rows of `entity_ids` (unique) in `view`, by MGET.

    Reads `batch_size` keys per MGET and decodes each batch off the event loop; rows
    are left out exactly as `scan_vectors` leaves them out (absent, stale schema, null,
    past the TTL at `now_us` (default now), non-finite, zero under cosine).

    >>> ids, vectors = await read_vectors(client, "recsys", view, np.array([7, 9]))
    """
    assert view.vector is not None
    now = int(time.time() * 1e6) if now_us is None else now_us
    ids: list[Ids] = [np.empty(0, np.int64)]
    vectors: list[Vectors] = [np.empty((0, view.vector.dim), np.float32)]
    for start in range(0, entity_ids.shape[0], batch_size):
        part = entity_ids[start : start + batch_size]
        keys = row_keys(project, view.name, entity_tokens([part.tolist()]))
        values = await mget(client, keys)
        where, column, _ = await asyncio.to_thread(_usable, view, values, now)
        ids.append(part[where])
        vectors.append(column)
    return np.concatenate(ids), np.concatenate(vectors)


def _usable(view: ViewDef, values: list[bytes | None], now_us: int) -> tuple[Ids, Vectors, int]:
    """Decode MGET `values` of `view`: the positions of the usable rows, their vectors
    (float32), and how many present rows were left out."""
    assert view.vector is not None
    feature = view.vector.feature
    rows = decode_rows(view.layout, values)
    keep = rows.found & ~rows.nulls[:, view.layout.names.index(feature)]
    if view.ttl_s:
        keep &= rows.event_ts_us + int(view.ttl_s * 1e6) >= now_us
    column = rows.columns[feature]
    keep &= np.isfinite(column).all(axis=1)
    if view.vector.metric == "cosine":
        keep &= np.linalg.norm(column, axis=1) > 0
    where = np.flatnonzero(keep)
    return where, column[where].astype(np.float32, copy=False), int((rows.found & ~keep).sum())
