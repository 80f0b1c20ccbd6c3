"""SearchSimilar end to end: a real server on port 0, real Redis, the Python client.

The server serves the project's Feast repo plus two embedding views: `item_small` (8-d,
L2, small enough for an exact index) and `account_embedding` (keyed by a string, which
cannot be indexed). `item_embedding` (64-d, cosine) holds 20,000 clustered vectors and,
with `index_exact_max=5000`, gets the approximate (HNSW) index. Rows are written the way
materialization writes them (encode_rows + guarded_write) and announced with the
materializer's own `publish_written`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import redis.asyncio as aioredis
from grpc import aio

from featurestore import AsyncClient
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.config import IndexSettings, ServerSettings, Settings
from featurestore.decode import NOT_FOUND, PRESENT
from featurestore.errors import Unavailable
from featurestore.registry import load_registry
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.spec import IndexConfig
from featurestore.serving.server import FeatureServer
from featurestore.store import keys
from featurestore.store.events import publish_written
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write

N_ITEMS, DIM, N_SMALL, SMALL_DIM = 20_000, 64, 2_000, 8
F32 = npt.NDArray[np.float32]
EXTRA_VIEWS = """
from datetime import timedelta
from feast import Entity, FeatureView, Field, ValueType
from feast.types import Array, Float32
from features import _source, item

account = Entity(name="account", join_keys=["account_id"], value_type=ValueType.STRING)
item_small = FeatureView(
    name="item_small", entities=[item], ttl=timedelta(days=1), source=_source("item_small"),
    schema=[Field(name="vec", dtype=Array(Float32), vector_index=True, vector_length=8,
                  vector_search_metric="L2")],
    online=True,
)
account_embedding = FeatureView(
    name="account_embedding", entities=[account], ttl=timedelta(days=1),
    source=_source("account_embedding"),
    schema=[Field(name="vec", dtype=Array(Float32), vector_index=True, vector_length=4)],
    online=True,
)
"""


def clustered(n: int, dim: int, seed: int) -> F32:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(50, dim)) * 2
    return (centres[rng.integers(0, 50, n)] + rng.normal(size=(n, dim))).astype(np.float32)


ITEMS = clustered(N_ITEMS, DIM, seed=1)
ITEM_IDS = np.arange(N_ITEMS, dtype=np.int64) * 3 + 1
SMALL = clustered(N_SMALL, SMALL_DIM, seed=2)
SMALL_IDS = np.arange(N_SMALL, dtype=np.int64) + 10**9


async def write(
    redis: aioredis.Redis, repo: Path, view: str, ids: npt.NDArray[np.int64], vectors: F32, *, ts_us: int | None = None
) -> None:
    registry = load_registry(repo)
    layout = registry.views[view].layout
    feature = layout.names[0]
    ts = np.full(ids.shape[0], ts_us or int(time.time() * 1e6), dtype=np.int64)
    row_keys = keys.row_keys(registry.project, view, keys.entity_tokens([ids.tolist()]))
    rows = encode_rows(layout, ts, {feature: vectors})
    batches = [(row_keys[i : i + 1000], rows[i : i + 1000]) for i in range(0, len(rows), 1000)]
    await guarded_write(redis, batches, 0, [])


@pytest.fixture(scope="module")
def repo(make_repo: Callable[[str, Mapping[str, str]], Path]) -> Path:
    return make_repo("search", {"extra.py": EXTRA_VIEWS})


@pytest.fixture(scope="module")
async def server(repo: Path, redis: aioredis.Redis, redis_url: str) -> AsyncIterator[FeatureServer]:
    await write(redis, repo, "item_embedding", ITEM_IDS, ITEMS)
    await write(redis, repo, "item_small", SMALL_IDS, SMALL)
    settings = Settings(
        repo=repo,
        redis_url=redis_url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0),
        index=IndexSettings(refresh_s=0, exact_max=5000),
    )
    server = FeatureServer(settings)
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def client(server: FeatureServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout_s=30) as client:
        await client.wait_until_serving(60)
        yield client


def cosine_top(vectors: F32, queries: F32, k: int) -> npt.NDArray[np.intp]:
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(q @ v.T), axis=1, kind="stable")[:, :k]


async def test_serving_only_once_every_index_is_built(client: AsyncClient, server: FeatureServer) -> None:
    assert server.indexes is not None and server.indexes.ready
    assert server.indexes.views == ("item_embedding", "item_small")
    stats = [server.indexes.manager(v).index.stats for v in server.indexes.views]  # type: ignore[union-attr]
    assert [(s.kind, s.vectors) for s in stats] == [("hnsw", N_ITEMS), ("flat", N_SMALL)]


async def test_index_not_built_yet_is_unavailable(repo: Path, redis_url: str) -> None:
    indexes = ViewIndexes(load_registry(repo), redis_url, IndexConfig(device="cpu"))
    try:
        with pytest.raises(Unavailable, match="being built"):
            indexes.manager("item_embedding")
    finally:
        await indexes.close()


async def test_flat_index_equals_numpy_brute_force(client: AsyncClient) -> None:
    queries = clustered(25, SMALL_DIM, seed=3)
    result = await client.search_similar("item_small", queries, k=10)
    distances = ((queries[:, None, :] - SMALL[None, :, :]) ** 2).sum(axis=2)
    order = np.argsort(distances, axis=1, kind="stable")[:, :10]
    assert result.ids.shape == (25, 10) and result.ids.dtype == np.int64
    np.testing.assert_array_equal(result.ids, SMALL_IDS[order])
    np.testing.assert_allclose(result.scores, np.take_along_axis(distances, order, 1), rtol=1e-4)
    assert result.features is None


async def test_search_by_id_excludes_the_query_entity_and_filters(client: AsyncClient) -> None:
    query = SMALL_IDS[:3]
    result = await client.search_similar("item_small", ids=query, k=5, exclude_query=True)
    distances = ((SMALL[:3, None, :] - SMALL[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(result.ids, SMALL_IDS[np.argsort(distances, axis=1)[:, 1:6]])
    allowed = SMALL_IDS[100:110]
    only = await client.search_similar("item_small", ids=query[:1], k=20, allow_ids=allowed, exclude_ids=allowed[:2])
    assert set(only.ids[0][only.ids[0] >= 0]) == set(allowed[2:].tolist())
    assert (only.ids[0][8:] == -1).all() and np.isposinf(only.scores[0][8:]).all()


async def test_approximate_index_recall_at_10(client: AsyncClient) -> None:
    queries = clustered(200, DIM, seed=4)
    result = await client.search_similar("item_embedding", queries, k=10)
    truth = ITEM_IDS[cosine_top(ITEMS, queries, 10)]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.ids, truth, strict=True)])
    assert recall >= 0.95, recall


async def test_neighbour_features_come_with_one_mget(client: AsyncClient, redis: aioredis.Redis) -> None:
    await redis.config_resetstat()
    result = await client.search_similar(
        "item_small",
        ids=SMALL_IDS[:4],
        k=3,
        features=["item_small", "item_embedding:embedding"],
        full_feature_names=True,
    )
    stats = await redis.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert result.features is not None and result.features.rows == 12
    by_id = dict(zip(SMALL_IDS.tolist(), SMALL, strict=True))
    expected = np.stack([by_id[i] for i in result.ids.ravel().tolist()])
    np.testing.assert_array_equal(result.features.values("item_small__vec"), expected)
    assert set(result.features.statuses("item_small:vec").tolist()) == {PRESENT}
    assert set(result.features.statuses("item_embedding:embedding").tolist()) == {NOT_FOUND}


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> float:
    """Poll the async predicate `condition` until true; the seconds it took."""
    start = time.perf_counter()
    while not await condition():
        assert time.perf_counter() - start < timeout_s, "timed out"
        await asyncio.sleep(0.02)
    return time.perf_counter() - start


async def test_update_after_materialization_is_visible_to_the_next_search(
    client: AsyncClient, redis: aioredis.Redis, repo: Path
) -> None:
    target = clustered(1, DIM, seed=5)
    new_id, moved_id = np.array([10**7], np.int64), ITEM_IDS[7:8]
    await write(redis, repo, "item_embedding", new_id, target * 2)  # same direction
    await write(redis, repo, "item_embedding", moved_id, target + 1e-3)
    assert await publish_written(redis, "recsys", ["item_embedding"]) >= 1

    async def both_on_top() -> bool:
        top = (await client.search_similar("item_embedding", target, k=2)).ids[0]
        return set(top.tolist()) == {int(new_id[0]), int(moved_id[0])}

    assert await wait_for(both_on_top) < 5.0


async def test_expired_entity_is_no_longer_returned(
    client: AsyncClient, redis: aioredis.Redis, repo: Path, server: FeatureServer
) -> None:
    # 5 and 6 expired in Redis (the key is gone); 8 is present but older than the view's
    # TTL (1 day); 7 stays.
    tokens = keys.entity_tokens([SMALL_IDS[[5, 6, 8]].tolist()])
    await redis.delete(*keys.row_keys("recsys", "item_small", tokens))
    await write(redis, repo, "item_small", SMALL_IDS[8:9], SMALL[8:9], ts_us=int((time.time() - 2 * 86400) * 1e6))
    assert server.indexes is not None
    server.indexes.request_refresh(["item_small"])  # what the periodic refresh does
    expired = set(SMALL_IDS[[5, 6, 8]].tolist())

    async def all_gone() -> bool:
        found = await client.search_similar("item_small", SMALL[5:9], k=10)
        return not set(found.ids.ravel().tolist()) & expired

    await wait_for(all_gone)
    found = await client.search_similar("item_small", SMALL[7:8], k=1)
    assert found.ids[0, 0] == SMALL_IDS[7]


async def test_searches_during_index_swaps_are_all_answered(
    client: AsyncClient, redis: aioredis.Redis, repo: Path, server: FeatureServer
) -> None:
    assert server.indexes is not None
    manager = server.indexes.manager("item_embedding")
    first = manager.index.stats.generation  # type: ignore[union-attr]
    queries = clustered(64, DIM, seed=6)
    stop = asyncio.Event()
    answered: list[int] = []

    async def search_loop(i: int) -> None:
        while not stop.is_set():
            result = await client.search_similar("item_embedding", queries[i], k=10)
            assert (result.ids >= 0).all()
            answered.append(i)

    loops = [asyncio.create_task(search_loop(i)) for i in range(16)]
    for round_ in range(3):
        changed = ITEM_IDS[1000 * round_ : 1000 * round_ + 500]
        await write(redis, repo, "item_embedding", changed, clustered(500, DIM, seed=10 + round_))
        await publish_written(redis, "recsys", ["item_embedding"])
        generation = first + round_ + 1

        async def swapped(generation: int = generation) -> bool:
            index = manager.index
            return index is not None and index.stats.generation >= generation

        await wait_for(swapped)
    stop.set()
    await asyncio.gather(*loops)  # any failed search raises here
    assert len(answered) > 50 and manager.index.stats.incremental  # type: ignore[union-attr]


def _vectors(rows: npt.NDArray[np.floating[Any]]) -> dict[str, object]:
    return {"query_vectors": rows.astype("<f4").tobytes(), "query_count": rows.shape[0]}


NAN = np.full((1, DIM), 0.5, np.float32)
NAN[0, 3] = np.nan
INF = np.full((1, DIM), 0.5, np.float32)
INF[0, 9] = np.inf
GOOD = np.ones((1, DIM), np.float32)
CASES = [
    (
        "wrong-dimension",
        {"view": "item_embedding", "k": 5, **_vectors(np.ones((1, 32)))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "32 floats per query",
    ),
    ("nan", {"view": "item_embedding", "k": 5, **_vectors(NAN)}, grpc.StatusCode.INVALID_ARGUMENT, "NaN or inf"),
    ("inf", {"view": "item_embedding", "k": 5, **_vectors(INF)}, grpc.StatusCode.INVALID_ARGUMENT, "NaN or inf"),
    ("k-zero", {"view": "item_embedding", "k": 0, **_vectors(GOOD)}, grpc.StatusCode.INVALID_ARGUMENT, "k=0"),
    (
        "k-too-large",
        {"view": "item_embedding", "k": 1001, **_vectors(GOOD)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "k=1001",
    ),
    ("unknown-view", {"view": "nope", "k": 5, **_vectors(GOOD)}, grpc.StatusCode.NOT_FOUND, "'nope'"),
    (
        "not-embedding-view",
        {"view": "item_stats", "k": 5, **_vectors(GOOD)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "'item_stats' is not an embedding view",
    ),
    (
        "unindexable-view",
        {"view": "account_embedding", "k": 5, **_vectors(np.ones((1, 4)))},
        grpc.StatusCode.FAILED_PRECONDITION,
        "account_id",
    ),
    (
        "id-without-embedding",
        {"view": "item_embedding", "k": 5, "query_ids": np.array([2, 424242], "<i8").tobytes()},
        grpc.StatusCode.NOT_FOUND,
        "[2, 424242]",
    ),
    ("no-query", {"view": "item_embedding", "k": 5}, grpc.StatusCode.INVALID_ARGUMENT, "query_vectors and query_ids"),
    (
        "exclude-self-by-vector",
        {"view": "item_embedding", "k": 5, "exclude_query_entity": True, **_vectors(GOOD)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "exclude_query_entity",
    ),
    (
        "ragged-ids",
        {"view": "item_embedding", "k": 5, "query_ids": b"\x01" * 12},
        grpc.StatusCode.INVALID_ARGUMENT,
        "12 bytes",
    ),
    (
        "unknown-feature",
        {"view": "item_embedding", "k": 5, "features": ["item_stats:nope"], **_vectors(GOOD)},
        grpc.StatusCode.NOT_FOUND,
        "'nope'",
    ),
]


@pytest.fixture(scope="module")
async def stub(server: FeatureServer, client: AsyncClient) -> AsyncIterator[pb_grpc.FeatureStoreStub]:
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.FeatureStoreStub(channel)


@pytest.mark.parametrize(("fields", "code", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(
    stub: pb_grpc.FeatureStoreStub,
    client: AsyncClient,
    fields: dict[str, object],
    code: grpc.StatusCode,
    named: str,
) -> None:
    with pytest.raises(aio.AioRpcError) as raised:
        await stub.SearchSimilar(pb.SearchSimilarRequest(**fields), timeout=10)  # type: ignore[arg-type]
    assert raised.value.code() == code
    assert named in (raised.value.details() or "")
    after = await client.search_similar("item_embedding", GOOD, k=3)
    assert (after.ids >= 0).all()
