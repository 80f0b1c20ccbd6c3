"""Building the retrieval index from a real Redis: SCAN + MGET + decode, what is left out."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import numpy.typing as npt
import pytest
import redis.asyncio as aioredis

from featurestore.embedded import free_port
from featurestore.errors import Unavailable
from featurestore.registry import JoinKey, VectorSpec, ViewDef
from featurestore.retrieval.manager import IndexManager
from featurestore.retrieval.spec import IndexConfig
from featurestore.store.keys import entity_tokens, row_keys
from featurestore.store.layout import DType, FeatureSpec, Layout, encode_rows
from featurestore.store.redis import connect, guarded_write

DIM = 64
NOW_US = int(time.time() * 1e6)
LAYOUT = Layout("item_embedding", (FeatureSpec("embedding", DType.FLOAT32_LIST, DIM),))
VIEW = ViewDef(
    name="item_embedding",
    join_keys=(JoinKey("item_id", DType.INT64),),
    ttl_s=3600.0,
    layout=LAYOUT,
    table="item_embedding",
    timestamp_field="event_timestamp",
    created_field="",
    vector=VectorSpec("embedding", DIM, "cosine"),
)


def clustered(n: int, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, DIM)) * 2
    return (centres[rng.integers(0, 20, n)] + rng.normal(size=(n, DIM))).astype(np.float32)


async def write(
    client: aioredis.Redis,
    project: str,
    ids: npt.NDArray[np.int64],
    vectors: npt.NDArray[np.float32],
    *,
    ts_us: int = NOW_US,
    layout: Layout = LAYOUT,
    nulls: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Materialize rows the way the materializer does: packed rows, guarded writes."""
    keys = row_keys(project, "item_embedding", entity_tokens([ids.tolist()]))
    rows = encode_rows(
        layout,
        np.full(ids.shape[0], ts_us),
        {"embedding": vectors},
        nulls={"embedding": nulls} if nulls is not None else None,
    )
    batches = [(keys[i : i + 500], rows[i : i + 500]) for i in range(0, len(keys), 500)]
    await guarded_write(client, batches, 0, [])


def exact_top(vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.intp]:
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ v.T), axis=1, kind="stable")[:, :k]


async def test_build_from_store_keeps_only_usable_rows(redis_client: aioredis.Redis) -> None:
    ids = np.arange(1, 3001, dtype=np.int64) * 11
    vectors = clustered(3000, seed=1)
    await write(redis_client, "recsys", ids, vectors)
    # Rows that must stay out: null vector, past the view's TTL, older schema, NaN,
    # another view with a name sharing the prefix, another project.
    await write(redis_client, "recsys", np.array([7]), clustered(1, 2), nulls=np.array([True]))
    await write(redis_client, "recsys", np.array([8]), clustered(1, 3), ts_us=NOW_US - 2 * 3600 * 10**6)
    old = Layout("item_embedding", (FeatureSpec("embedding", DType.FLOAT32_LIST, 32),))
    await write(redis_client, "recsys", np.array([9]), clustered(1, 4)[:, :32], layout=old)
    await write(redis_client, "recsys", np.array([10]), np.full((1, DIM), np.nan, np.float32))
    await redis_client.set(b"recsys:item_embedding_v2:{12}", b"x" * 300)
    await write(redis_client, "other", np.array([13]), clustered(1, 5))

    manager = IndexManager("recsys", VIEW, IndexConfig(device="cpu"))
    assert not manager.ready
    stats = await manager.rebuild_from_store(redis_client, scan_count=256)
    assert manager.ready and stats.vectors == 3000 and stats.kind == "flat"
    index = manager.index
    assert index is not None
    assert sorted(index.label_ids.tolist()) == ids.tolist()

    queries = clustered(20, seed=6)
    got, scores = await manager.search(queries, k=10)
    np.testing.assert_array_equal(got, ids[exact_top(vectors, queries, 10)])
    assert (np.diff(scores, axis=1) <= 1e-6).all()


async def test_rebuild_sees_new_changed_and_deleted_rows(redis_client: aioredis.Redis) -> None:
    ids = np.arange(1, 1001, dtype=np.int64)
    vectors = clustered(1000, seed=1)
    await write(redis_client, "recsys", ids, vectors)
    manager = IndexManager("recsys", VIEW, IndexConfig(device="cpu"))
    await manager.rebuild_from_store(redis_client)
    far = clustered(1, seed=9) * 10
    await write(redis_client, "recsys", np.array([5000]), far)  # new
    await write(redis_client, "recsys", np.array([1]), -far, ts_us=NOW_US + 1)  # changed
    await redis_client.delete(b"recsys:item_embedding:{2}")  # expired or deleted
    stats = await manager.rebuild_from_store(redis_client)
    assert stats.generation == 2 and stats.vectors == 1000
    got, _ = await manager.search(np.concatenate([far, -far]), k=1)
    assert got.ravel().tolist() == [5000, 1]
    got, _ = await manager.search(vectors[1:2], k=50)
    assert 2 not in got


async def test_glob_characters_in_names_are_matched_literally(
    redis_client: aioredis.Redis,
) -> None:
    await write(redis_client, "p[0-9]*", np.array([1, 2]), clustered(2, seed=1))
    await write(redis_client, "p5x", np.array([3]), clustered(1, seed=2))  # would match the glob
    manager = IndexManager("p[0-9]*", VIEW, IndexConfig(device="cpu"))
    stats = await manager.rebuild_from_store(redis_client)
    assert stats.vectors == 2


async def test_unreachable_redis_is_unavailable() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    manager = IndexManager("recsys", dataclasses.replace(VIEW, ttl_s=0.0))
    with pytest.raises(Unavailable, match="scan of view 'item_embedding'"):
        await manager.rebuild_from_store(client)
    assert not manager.ready
    await client.aclose()
