"""ViewIndexes following materialization events, against real Redis.

`item_embedding` (64-d, cosine) of the project's Feast repo holds 3,000 vectors and,
with `exact_max=1000`, gets an HNSW index, which events patch in place. Each test
changes some rows in Redis *without* announcing them: whether those reach the index
tells a partial update (they do not) from a full re-read (they do).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import redis.asyncio as aioredis

from featurestore.registry import Registry, load_registry
from featurestore.retrieval.index import EmbeddingIndex
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.spec import IndexConfig
from featurestore.store import keys
from featurestore.store.events import EventSubscriber, publish_written
from featurestore.store.layout import encode_rows

VIEW, N, DIM = "item_embedding", 3000, 64
F32 = npt.NDArray[np.float32]
IDS = np.arange(N, dtype=np.int64) * 7 + 1
SEEDS = itertools.count(100)  # each test's rows differ from every earlier test's


def vectors(n: int, seed: int) -> F32:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def registry(feature_repo: Path) -> Registry:
    return load_registry(feature_repo)


async def write(
    redis: aioredis.Redis, registry: Registry, ids: npt.NDArray[np.int64], rows: F32, ts_us: int | None = None
) -> None:
    """Write rows in the stored format (a plain MSET: event times may go backwards)."""
    ts = np.full(ids.shape[0], ts_us or int(time.time() * 1e6), dtype=np.int64)
    packed = encode_rows(registry.views[VIEW].layout, ts, {"embedding": rows})
    row_keys = keys.row_keys(registry.project, VIEW, keys.entity_tokens([ids.tolist()]))
    await redis.mset(dict(zip(row_keys, packed, strict=True)))


@pytest.fixture(scope="module")
async def indexes(redis: aioredis.Redis, registry: Registry, redis_url: str) -> AsyncIterator[ViewIndexes]:
    await write(redis, registry, IDS, vectors(N, seed=1))
    config = IndexConfig(device="cpu", exact_max=1000)
    events = EventSubscriber(redis_url, registry.project)
    indexes = ViewIndexes(registry, redis_url, config, refresh_s=0, events=events)
    indexes.start()
    events.start()
    await asyncio.wait_for(indexes.wait_ready(), 60)
    await asyncio.wait_for(events.wait_subscribed(), 5)
    yield indexes
    await events.close()
    await indexes.close()


def live(indexes: ViewIndexes) -> EmbeddingIndex:
    index = indexes.manager(VIEW).index
    assert index is not None
    return index


def indexed(indexes: ViewIndexes, entity_ids: npt.NDArray[np.int64]) -> F32 | None:
    """The index's (normalised) vectors of `entity_ids`, None if any is missing."""
    index = live(indexes)
    labels, found = index.labels_of(entity_ids)
    return index.vectors[labels] if found.all() else None


def normalised(rows: F32) -> F32:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


async def until_refreshed(indexes: ViewIndexes, before: int, timeout_s: float = 10.0) -> None:
    start = time.perf_counter()
    while indexes.refreshes <= before:
        assert time.perf_counter() - start < timeout_s, "no refresh"
        await asyncio.sleep(0.01)


async def test_event_with_ids_updates_exactly_those_entities(
    indexes: ViewIndexes, redis: aioredis.Redis, registry: Registry
) -> None:
    changed, new, deleted, expired = IDS[10:12], np.array([10**8]), IDS[20:22], IDS[30:31]
    silent = IDS[40:41]  # changed in Redis, not announced
    silent_before = indexed(indexes, silent)
    generation, size = live(indexes).stats.generation, len(live(indexes))
    fresh = vectors(3, seed=2)
    await write(redis, registry, np.concatenate([changed, new]), fresh)
    await write(redis, registry, silent, vectors(1, seed=3))
    tokens = keys.entity_tokens([deleted.tolist()])
    await redis.delete(*keys.row_keys(registry.project, VIEW, tokens))
    month_ago = int((time.time() - 31 * 86_400) * 1e6)  # past the view's 30-day TTL
    await write(redis, registry, expired, vectors(1, seed=4), ts_us=month_ago)
    announced = np.concatenate([changed, new, deleted, expired, [424242]])  # last: no row

    before = indexes.refreshes
    await publish_written(redis, registry.project, [VIEW], ids={VIEW: announced}, epoch_us=int(time.time() * 1e6))
    await until_refreshed(indexes, before)

    index = live(indexes)
    assert index.stats.generation == generation + 1 and index.stats.incremental
    got = indexed(indexes, np.concatenate([changed, new]))
    assert got is not None
    np.testing.assert_allclose(got, normalised(fresh), rtol=1e-6)
    for gone in (deleted, expired):
        assert not index.labels_of(gone)[1].any()
    np.testing.assert_array_equal(indexed(indexes, silent), silent_before)  # type: ignore[arg-type]
    assert len(index) == size + 1 - 3


async def test_event_without_ids_still_rereads_the_whole_view(
    indexes: ViewIndexes, redis: aioredis.Redis, registry: Registry
) -> None:
    silent, rows = IDS[50:52], vectors(2, seed=5)
    await write(redis, registry, silent, rows)
    before = indexes.refreshes
    await publish_written(redis, registry.project, [VIEW])  # an older materializer's event
    await until_refreshed(indexes, before)
    np.testing.assert_allclose(indexed(indexes, silent), normalised(rows), rtol=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "rereads"),
    [
        (b"\xff not json", False),
        (b'{"event": "written", "views": "item_embedding"}', False),
        (b'{"event": "deleted", "views": ["item_embedding"]}', False),
        (b'{"event": "written", "views": ["item_embedding"], "ids": {"item_embedding": [1.5]}}', True),
        (b'{"event": "written", "views": ["item_embedding"], "ids": [1, 2]}', True),
    ],
    ids=["not-json", "views-not-a-list", "other-event", "float-ids", "ids-not-per-view"],
)
async def test_malformed_event_is_ignored_or_rereads_the_view(
    indexes: ViewIndexes,
    redis: aioredis.Redis,
    registry: Registry,
    message: bytes,
    rereads: bool,
) -> None:
    silent, announced = IDS[60:61], IDS[61:62]
    silent_rows, announced_rows = vectors(1, next(SEEDS)), vectors(1, next(SEEDS))
    await write(redis, registry, silent, silent_rows)
    await write(redis, registry, announced, announced_rows)
    before = indexes.refreshes
    await redis.publish(keys.events_channel(registry.project), message)
    if rereads:  # views named, ids unusable: the whole view is re-read
        await until_refreshed(indexes, before)
    else:  # nothing done, and the listener still follows the next event
        await publish_written(redis, registry.project, [VIEW], ids={VIEW: announced})
        await until_refreshed(indexes, before)
        assert indexes.refreshes == before + 1
        np.testing.assert_allclose(
            indexed(indexes, announced),
            normalised(announced_rows),  # type: ignore[arg-type]
            rtol=1e-6,
        )
    got = indexed(indexes, silent)
    assert got is not None and np.allclose(got, normalised(silent_rows), rtol=1e-6) == rereads


async def test_a_lost_subscription_rereads_every_view_once_subscribed_again(
    indexes: ViewIndexes, redis: aioredis.Redis, registry: Registry
) -> None:
    silent, rows = IDS[70:71], vectors(1, next(SEEDS))
    await write(redis, registry, silent, rows)  # as if announced while disconnected
    before = indexes.refreshes
    assert await redis.client_kill_filter(_type="pubsub") >= 1
    await until_refreshed(indexes, before)
    np.testing.assert_allclose(indexed(indexes, silent), normalised(rows), rtol=1e-6)  # type: ignore[arg-type]
