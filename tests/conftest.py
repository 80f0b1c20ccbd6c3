"""Real Redis and PostgreSQL for the tests, on free loopback ports.

Each server is started once per session from the embedded wheels (see
featurestore/embedded.py), or taken from the environment instead:

    FEATURESTORE_TEST_REDIS_URL=redis://127.0.0.1:6379/15
    FEATURESTORE_TEST_PG_DSN=postgresql://postgres@127.0.0.1:5432/postgres
    FEATURESTORE_TEST_REDIS_CLUSTER_URL=redis+cluster://127.0.0.1:7000,127.0.0.1:7001/

The Redis Cluster (3 masters, 3 replicas, on loopback; `redis_cluster_url`) starts only
for the tests that ask for it; tests that kill nodes start their own (`make_cluster`).

`feature_repo` is a copy of the project's Feast repo, applied against the test
PostgreSQL, so tests never touch the developer's own registry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from featurestore.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedRedisCluster
from featurestore.store.redis import ClusterClient, connect

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("FEATURESTORE_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster of 3 masters and 3 replicas for the session (its redis+cluster:// URL)."""
    url = os.environ.get("FEATURESTORE_TEST_REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    with EmbeddedRedisCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


@pytest.fixture
def make_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], EmbeddedRedisCluster]]:
    """A factory of Redis Clusters (3 masters, 3 replicas) of a test's own, for tests that
    kill or pause nodes; all stopped after the test."""
    with contextlib.ExitStack() as stack:

        def make() -> EmbeddedRedisCluster:
            return stack.enter_context(EmbeddedRedisCluster(tmp_path_factory.mktemp("own-cluster")))

        yield make


@pytest.fixture
async def cluster_client(redis_cluster_url: str) -> AsyncIterator[ClusterClient]:
    """A client of the session's cluster, every master flushed; flushed again after the test."""
    client = connect(redis_cluster_url)
    assert isinstance(client, ClusterClient)
    await client.rows.each_master(b"FLUSHALL")
    yield client
    await client.rows.each_master(b"FLUSHALL")
    await client.aclose()


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn = os.environ.get("FEATURESTORE_TEST_PG_DSN")
    if dsn:
        yield dsn
        return
    # As root, PostgreSQL runs as an unprivileged user, which cannot enter pytest's
    # temporary folders (private to root): give it a folder it can reach.
    data_dir = Path(tempfile.mkdtemp(prefix="featurestore-pg-"))
    data_dir.chmod(0o755)
    try:
        with EmbeddedPostgres(data_dir / "pg") as server:
            yield server.dsn
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def pg_env(dsn: str, feast_redis: str = "127.0.0.1:6379") -> dict[str, str]:
    """The environment feature_repo/feature_store.yaml reads, for a DSN."""
    parts = urlsplit(dsn)
    return {
        "FEATURESTORE_PG_HOST": parts.hostname or "127.0.0.1",
        "FEATURESTORE_PG_PORT": str(parts.port or 5432),
        "FEATURESTORE_PG_DB": parts.path.lstrip("/") or "postgres",
        "FEATURESTORE_PG_USER": parts.username or "postgres",
        "FEATURESTORE_PG_PASSWORD": parts.password or "",
        "FEATURESTORE_FEAST_REDIS": feast_redis,
    }


def feast_apply(repo: Path) -> None:
    """Run `feast apply` in `repo` (with the environment feature_store.yaml reads)."""
    feast = Path(sys.executable).parent / "feast"
    subprocess.run([str(feast), "apply"], cwd=repo, check=True, capture_output=True, env=os.environ.copy())


@pytest.fixture(scope="session")
def generator() -> ModuleType:
    """feature_repo/generate.py (the demo data generator) as a module; it is a script
    beside the Feast definitions, not part of the installed package."""
    spec = importlib.util.spec_from_file_location("generate", ROOT / "feature_repo/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def apply_repo() -> Callable[[Path], None]:
    """`feast apply` as a function, for tests that change a repo's definitions."""
    return feast_apply


@pytest.fixture(scope="session")
def make_repo(feature_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Mapping[str, str]], Path]:
    """A factory: a copy of the applied repo plus extra definition files, applied again.

    make_repo("search", {"extra.py": "...Feast definitions..."}) -> the new repo's path
    """

    def make(name: str, files: Mapping[str, str]) -> Path:
        repo = tmp_path_factory.mktemp(name) / "repo"
        shutil.copytree(feature_repo, repo)
        for file, text in files.items():
            (repo / file).write_text(text)
        feast_apply(repo)
        return repo

    return make


@pytest.fixture(scope="session")
def feature_repo(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str) -> Path:
    """A copy of feature_repo/ with `feast apply` run in it; its registry is fresh."""
    repo = tmp_path_factory.mktemp("repo") / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    os.environ.update(pg_env(pg_dsn))
    feast_apply(repo)
    return repo


async def _flushed(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on a flushed database; flushed again after the test."""
    async for client in _flushed(redis_url):
        yield client


@pytest.fixture(scope="module")
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on a flushed database for a whole module; flushed again after it."""
    async for client in _flushed(redis_url):
        yield client


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Commands run in-process (`main([...])`) configure logging for the process; put the
    root logger back after each test, so no test sees another's level or handlers."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)


@pytest.fixture
def flushed_dbs(redis_url: str) -> Iterator[Callable[..., tuple[str, ...]]]:
    """A factory: URLs of the test Redis's logical databases by number, each flushed now
    and again after the test (tests that compare whole runs side by side use them)."""
    import redis as sync_redis

    clients: list[sync_redis.Redis] = []

    def make(*numbers: int) -> tuple[str, ...]:
        urls = tuple(redis_url.rsplit("/", 1)[0] + f"/{n}" for n in numbers)
        for url in urls:
            clients.append(client := sync_redis.Redis.from_url(url))
            client.flushdb()
        return urls

    yield make
    for client in clients:
        client.flushdb()
        client.close()
