"""The server on a Redis Cluster, end to end: materialization into the cluster, lookups,
the hot-key cache and its invalidation, similarity search, and a master that dies while
lookups run (they recover without a restart).

The same data is materialized into one standalone Redis, served by a second server, and
every answer of the cluster's server must equal that server's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import asyncpg
import numpy as np
import pytest
import redis

from featurestore import AsyncClient
from featurestore.config import CacheSettings, ServerSettings, Settings
from featurestore.embedded import EmbeddedRedisCluster
from featurestore.errors import Unavailable
from featurestore.registry import Registry, load_registry
from featurestore.serving.server import FeatureServer
from featurestore.store.redis import ClusterClient, connect
from materialize.job import Settings as JobSettings
from materialize.job import run

USERS, ITEMS = 4_000, 2_000
FEATURES = ["user_profile", "user_activity"]


@pytest.fixture(scope="module")
def registry(feature_repo: Path) -> Registry:
    return load_registry(feature_repo)


@pytest.fixture(scope="module")
async def generated(pg_dsn: str, registry: Registry, generator: ModuleType) -> datetime:
    now = datetime.now(UTC)
    options = generator.GenerateOptions(users=USERS, items=ITEMS, versions=2, seed=5)
    await generator.generate(pg_dsn, registry, options, now=now)
    return now


def _job(repo: Path, url: str, dsn: str) -> JobSettings:
    return JobSettings(repo=repo, redis_url=url, dsn=dsn, mode="incremental")


@pytest.fixture(scope="module")
async def stores(
    generated: datetime, feature_repo: Path, pg_dsn: str, redis_url: str, redis_cluster_url: str
) -> AsyncIterator[tuple[str, str]]:
    """(standalone URL, cluster URL), both materialized from the same tables."""
    standalone = redis_url.rsplit("/", 1)[0] + "/5"
    with redis.Redis.from_url(standalone) as plain:
        plain.flushdb()
    cluster = connect(redis_cluster_url)
    assert isinstance(cluster, ClusterClient)
    await cluster.rows.each_master(b"FLUSHALL")
    await run(_job(feature_repo, standalone, pg_dsn))
    await run(_job(feature_repo, redis_cluster_url, pg_dsn))
    yield standalone, redis_cluster_url
    await cluster.rows.each_master(b"FLUSHALL")
    await cluster.aclose()
    with redis.Redis.from_url(standalone) as plain:
        plain.flushdb()


async def _serve(repo: Path, url: str, cache_bytes: int = 256 << 20) -> FeatureServer:
    server = FeatureServer(
        Settings(
            repo=repo,
            redis_url=url,
            server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0),
            cache=CacheSettings(budget_bytes=cache_bytes),
        )
    )
    await server.start()
    return server


@pytest.fixture(scope="module")
async def clients(feature_repo: Path, stores: tuple[str, str]) -> AsyncIterator[tuple[AsyncClient, AsyncClient]]:
    """Clients of a server on the standalone Redis and of one on the cluster."""
    servers = [await _serve(feature_repo, url) for url in stores]
    clients = [AsyncClient(f"127.0.0.1:{s.port}") for s in servers]
    for client in clients:
        await client.wait_until_serving(30)
    yield clients[0], clients[1]
    for client, server in zip(clients, servers, strict=True):
        await client.close()
        await server.stop(0)


async def test_lookups_on_the_cluster_equal_lookups_on_one_redis(clients: tuple[AsyncClient, AsyncClient]) -> None:
    users = [*range(1, 200), 10**9]  # and one that does not exist
    plain, cluster = [await c.get_online_features({"user_id": users}, FEATURES) for c in clients]
    expected, got = plain.to_dict(), cluster.to_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        np.testing.assert_array_equal(cluster.statuses(name), plain.statuses(name))


async def test_search_on_the_cluster_finds_what_one_redis_finds(clients: tuple[AsyncClient, AsyncClient]) -> None:
    queries = np.random.default_rng(3).normal(size=(20, 64)).astype(np.float32)
    plain, cluster = [await c.search_similar("item_embedding", queries, k=10) for c in clients]
    np.testing.assert_array_equal(cluster.ids, plain.ids)
    assert (cluster.ids >= 0).mean() > 0.9


async def test_the_hot_cache_serves_from_memory_and_follows_a_run_on_the_cluster(
    clients: tuple[AsyncClient, AsyncClient], feature_repo: Path, pg_dsn: str, stores: tuple[str, str]
) -> None:
    client = clients[1]
    for _ in range(5):
        await client.get_online_features({"user_id": [7, 8, 9]}, ["user_activity"])
    before = await client.get_online_features({"user_id": [7]}, ["user_activity:clicks_1h"])
    assert before["clicks_1h"][0] != 777_000
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "INSERT INTO user_activity (user_id, event_timestamp, created, clicks_1h) VALUES (7, now(), now(), 777000)"
        )
        done = await run(_job(feature_repo, stores[1], pg_dsn))
        await conn.execute("DELETE FROM user_activity WHERE clicks_1h = 777000")
    finally:
        await conn.close()
    assert done.counts.written == 1
    deadline = time.monotonic() + 5  # the run's event reaches the server through the cluster
    while (await client.get_online_features({"user_id": [7]}, ["user_activity:clicks_1h"]))["clicks_1h"][0] != 777_000:
        assert time.monotonic() < deadline, "the cache kept serving the old row"
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_lookups_recover_without_a_restart_when_a_master_dies(
    make_cluster: Callable[[], EmbeddedRedisCluster], feature_repo: Path, pg_dsn: str, generated: datetime
) -> None:
    cluster = make_cluster()
    await run(
        JobSettings(repo=feature_repo, redis_url=cluster.url, dsn=pg_dsn, mode="incremental", views=("user_profile",))
    )
    for port in cluster.master_ports():  # every row on the replicas before a master goes
        with redis.Redis(host="127.0.0.1", port=port) as node:
            node.execute_command("WAIT", 1, 5000)  # type: ignore[no-untyped-call]
    server = await _serve(feature_repo, cluster.url, cache_bytes=0)  # every lookup reads the cluster
    users = list(range(1, 101))
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout_s=2.0) as client:
            await client.wait_until_serving(30)
            expected = (await client.get_online_features({"user_id": users}, ["user_profile"])).to_dict()
            cluster.kill(cluster.master_ports()[1])
            killed, failures = time.monotonic(), 0
            while True:
                try:
                    got = (await client.get_online_features({"user_id": users}, ["user_profile"])).to_dict()
                except Unavailable:
                    failures += 1
                    assert time.monotonic() - killed < 15, "lookups did not recover"
                    await asyncio.sleep(0.02)
                    continue
                if failures:
                    break
                raise AssertionError("a lookup touching the dead master's slots succeeded")
            recovered_s = time.monotonic() - killed
            for name, column in expected.items():
                np.testing.assert_array_equal(got[name], column)
            print(f"lookups answered again {recovered_s:.2f} s after the master died ({failures} failed)")
            assert recovered_s < 10
    finally:
        await server.stop(0)
