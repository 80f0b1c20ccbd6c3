"""Sharded materialization (`--shard i/N`) against real PostgreSQL and Redis (and a Redis Cluster).

N shards run side by side must leave Redis exactly as one unsharded run leaves it, and
that must be PostgreSQL's latest row per entity (the ground truth comes from a window
function, not the job's DISTINCT ON); each shard reads only its own entities, has its
own watermarks and lock, and starts from the unsharded (or pre-upgrade) watermark.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import numpy as np
import pytest
import redis.asyncio as aioredis

from featurestore.errors import InvalidArgument, LockHeld
from featurestore.registry import Registry, ViewDef, load_registry
from featurestore.store.keys import entity_tokens, legacy_watermark_key, lock_key, row_keys, watermark_key
from featurestore.store.layout import decode_rows
from featurestore.store.redis import Client, ClusterClient, connect, mget, scan_keys
from materialize import __main__ as materialize_cli
from materialize.job import Settings, Summary, run
from materialize.plan import Shard, to_us
from materialize.source import shard_hash, shard_hash_sql
from materialize.watermark import RunLock, advance_watermark

CLI = str(Path(sys.executable).parent / "featurestore-materialize")
USERS, ITEMS = 6_000, 600


@pytest.fixture(scope="module")
def registry(feature_repo: Path) -> Registry:
    return load_registry(feature_repo)


@pytest.fixture(scope="module")
async def generated(pg_dsn: str, registry: Registry, generator: ModuleType) -> datetime:
    now = datetime.now(UTC)
    options = generator.GenerateOptions(users=USERS, items=ITEMS, versions=3, seed=11)
    await generator.generate(pg_dsn, registry, options, now=now)
    return now


@pytest.fixture
def two_dbs(flushed_dbs: Callable[..., tuple[str, ...]]) -> tuple[str, ...]:
    """Two flushed logical databases (3 and 4), flushed again afterwards."""
    return flushed_dbs(3, 4)


def _settings(repo: Path, url: str, dsn: str, shard: Shard | None = None, **kw: Any) -> Settings:
    return Settings(repo=repo, redis_url=url, dsn=dsn, mode="incremental", shard=shard, **kw)


async def _dump(url: str) -> dict[bytes, bytes | None]:
    """Every row key and value (bookkeeping left out), on one Redis or a whole cluster."""
    client = connect(url, timeout_s=None)
    try:
        keys = [k async for batch in scan_keys(client, b"*", count=5000) for k in batch if b"{__meta__}" not in k]
        return dict(zip(keys, await mget(client, keys), strict=True))
    finally:
        await client.aclose()


async def _truth(dsn: str, view: ViewDef, start_us: int, end_us: int) -> list[asyncpg.Record]:
    keys = ", ".join(k.name for k in view.join_keys)
    sql = f"""
        SELECT * FROM (
            SELECT *, row_number() OVER (
                PARTITION BY {keys} ORDER BY event_timestamp DESC, created DESC) AS rn
            FROM {view.table} WHERE event_timestamp >= $1 AND event_timestamp < $2) AS ranked
        WHERE rn = 1 ORDER BY {keys}"""
    conn = await asyncpg.connect(dsn)
    try:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        return list(
            await conn.fetch(sql, epoch + timedelta(microseconds=start_us), epoch + timedelta(microseconds=end_us))
        )
    finally:
        await conn.close()


async def _assert_equals_sql(client: Client, dsn: str, registry: Registry, view: ViewDef, end_us: int) -> int:
    """Redis holds exactly PostgreSQL's latest row per entity of `view` in its TTL: every
    event time and value of the first feature; returns how many."""
    records = await _truth(dsn, view, end_us - int(view.ttl_s * 1e6), end_us)
    columns = [[r[k.name] for r in records] for k in view.join_keys]
    values = await mget(client, row_keys(registry.project, view.name, entity_tokens(columns)))
    decoded = decode_rows(view.layout, values)
    assert decoded.found.all()
    np.testing.assert_array_equal(decoded.event_ts_us, [to_us(r["event_timestamp"]) for r in records])
    first = view.layout.features[0]
    expected = [r[first.name] for r in records]
    got = decoded.columns[first.name]
    for i, value in enumerate(expected):
        assert decoded.nulls[i, 0] == (value is None)
        if value is not None and not first.dtype.is_list:
            assert got[i] == value
    return len(records)


@pytest.fixture(params=["standalone", "cluster"])
async def target(request: pytest.FixtureRequest, two_dbs: tuple[str, str]) -> AsyncIterator[tuple[str, str]]:
    """(where the shards write, where one unsharded run writes): two standalone databases,
    or the cluster (flushed) and a standalone database."""
    if request.param == "standalone":
        yield two_dbs
        return
    cluster_url = request.getfixturevalue("redis_cluster_url")
    client = connect(cluster_url)
    assert isinstance(client, ClusterClient)
    await client.rows.each_master(b"FLUSHALL")
    yield cluster_url, two_dbs[1]
    await client.rows.each_master(b"FLUSHALL")
    await client.aclose()


async def test_three_shards_side_by_side_write_what_one_run_writes(
    generated: datetime, registry: Registry, feature_repo: Path, pg_dsn: str, target: tuple[str, str]
) -> None:
    sharded_url, whole_url = target
    shards = [Shard(i, 3) for i in range(3)]
    summaries: list[Summary] = await asyncio.gather(
        *(run(_settings(feature_repo, sharded_url, pg_dsn, shard)) for shard in shards)
    )
    whole = await run(_settings(feature_repo, whole_url, pg_dsn))
    sharded_rows, whole_rows = await _dump(sharded_url), await _dump(whole_url)
    assert sharded_rows == whole_rows and len(whole_rows) > USERS
    reads = [s.counts.read for s in summaries]
    assert sum(reads) == whole.counts.read and all(r < whole.counts.read * 0.45 for r in reads)
    client = connect(sharded_url)
    try:
        for view in registry.views.values():
            marks = [await client.get(watermark_key(registry.project, view.name, s.label)) for s in shards]
            assert all(marks) and await client.get(watermark_key(registry.project, view.name)) is None
            # Every shard's window ended at its own start; the rows are those of the latest window.
            end_us = min(int(m) for m in marks if m)
            assert await _assert_equals_sql(client, pg_dsn, registry, view, end_us) > 0
    finally:
        await client.aclose()


async def test_a_shard_writes_only_the_entities_whose_hash_is_its_own(
    generated: datetime, registry: Registry, feature_repo: Path, pg_dsn: str, two_dbs: tuple[str, str]
) -> None:
    summary = await run(_settings(feature_repo, two_dbs[0], pg_dsn, Shard(1, 3), views=("user_profile",)))
    rows = await _dump(two_dbs[0])
    ids = [int(k[k.index(b"{") + 1 : -1]) for k in rows]
    assert len(ids) == summary.counts.read > USERS // 4
    assert all(Shard(1, 3).holds(shard_hash([i])) for i in ids)


async def test_postgresql_and_python_agree_on_the_shard_hash(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TEMP TABLE keyed (k1 int8, k2 text)")
        values = [(i, s) for i in (0, -1, 7, 2**62) for s in ("", "a|b", "é{x}%", "user 42")]
        await conn.executemany("INSERT INTO keyed VALUES ($1, $2)", values)
        one = await conn.fetch(f"SELECT k1, {shard_hash_sql(['k1'])} AS h FROM keyed AS src")
        two = await conn.fetch(f"SELECT k1, k2, {shard_hash_sql(['k1', 'k2'])} AS h FROM keyed AS src")
        # Immutable, so it can be indexed (and an index lets a shard read only its rows).
        await conn.execute(f"CREATE INDEX ON keyed (({shard_hash_sql(['k1', 'k2'], alias='')}))")
    finally:
        await conn.close()
    assert all(r["h"] == shard_hash([r["k1"]]) for r in one)
    assert all(r["h"] == shard_hash([r["k1"], r["k2"]]) for r in two)
    assert len({Shard(1, 4).holds(r["h"]) for r in two}) == 2


def test_the_shards_ranges_cover_the_hash_once() -> None:
    for count in (1, 2, 3, 7):
        shards = [Shard(i, count) for i in range(count)]
        assert shards[0].bounds[0] == 0 and shards[-1].bounds[1] == 2**32
        assert all(a.bounds[1] == b.bounds[0] for a, b in itertools.pairwise(shards))
        for h in (0, 1, 2**31, 2**32 - 1, shard_hash(["x"])):
            assert sum(s.holds(h) for s in shards) == 1


async def test_each_shard_has_its_own_lock(
    generated: datetime, feature_repo: Path, pg_dsn: str, two_dbs: tuple[str, str], registry: Registry
) -> None:
    url = two_dbs[0]
    client = aioredis.Redis.from_url(url)
    try:
        await client.set(lock_key(registry.project, "materialize:shard-1-of-2"), b"another-run", px=60_000)
        with pytest.raises(LockHeld, match="shard-1-of-2"):
            await run(_settings(feature_repo, url, pg_dsn, Shard(1, 2), views=("item_stats",)))
        done = await run(_settings(feature_repo, url, pg_dsn, Shard(0, 2), views=("item_stats",)))
        assert done.counts.written > 0
        assert await client.exists(lock_key(registry.project)) == 0  # the unsharded lock: untouched
    finally:
        await client.aclose()


async def test_a_shard_starts_from_the_unsharded_watermark_and_the_pre_upgrade_one(
    generated: datetime, feature_repo: Path, pg_dsn: str, two_dbs: tuple[str, str], registry: Registry
) -> None:
    url = two_dbs[0]
    views = ("item_stats",)
    first = await run(_settings(feature_repo, url, pg_dsn, views=views))
    assert first.counts.read > 0
    # No watermark of its own yet: the shard continues from the unsharded one (nothing new).
    assert (await run(_settings(feature_repo, url, pg_dsn, Shard(0, 2), views=views))).counts.read == 0
    client = aioredis.Redis.from_url(url)
    try:
        # An unsharded watermark of before the {__meta__} tag is read too.
        mark = await client.get(watermark_key(registry.project, "item_stats"))
        await client.delete(watermark_key(registry.project, "item_stats"))
        await client.set(legacy_watermark_key(registry.project, "item_stats"), mark)
        assert (await run(_settings(feature_repo, url, pg_dsn, views=views))).counts.read == 0
        assert (await run(_settings(feature_repo, url, pg_dsn, Shard(1, 2), views=views))).counts.read == 0
        # Without any unsharded watermark: a shard that ran continues from its own, a new one
        # starts at the TTL horizon.
        await client.delete(legacy_watermark_key(registry.project, "item_stats"))
        await client.delete(watermark_key(registry.project, "item_stats"))
        assert (await run(_settings(feature_repo, url, pg_dsn, Shard(1, 2), views=views))).counts.read == 0
        assert (await run(_settings(feature_repo, url, pg_dsn, Shard(1, 3), views=views))).counts.read > 0
    finally:
        await client.aclose()


async def test_a_watermark_never_moves_for_a_run_that_lost_its_lock(redis_client: aioredis.Redis) -> None:
    async with RunLock(redis_client, "p", ttl_s=5, shard="shard-0-of-2") as lock:
        await advance_watermark(redis_client, "p", "v", 10, shard="shard-0-of-2", lock=lock)
        await redis_client.set(lock.key, b"the-next-run")  # it expired, another run took it
        with pytest.raises(LockHeld, match="lost the lock"):
            await advance_watermark(redis_client, "p", "v", 20, shard="shard-0-of-2", lock=lock)
    assert await redis_client.get(watermark_key("p", "v", "shard-0-of-2")) == b"10"


def _shard_of(argv: list[str], environ: dict[str, str]) -> Shard | None:
    """The shard the command line makes of `argv` (after the mode) and `environ`."""
    return materialize_cli._settings(materialize_cli._parser(environ).parse_args(["incremental", *argv])).shard


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["--shard", "1/4"], {}, Shard(1, 4)),
        ([], {"FEATURESTORE_SHARD": "2/4"}, Shard(2, 4)),
        (["--shard", "1/4"], {"FEATURESTORE_SHARD_COUNT": "8", "JOB_COMPLETION_INDEX": "5"}, Shard(1, 4)),
        ([], {"FEATURESTORE_SHARD": "2/4", "FEATURESTORE_SHARD_COUNT": "8", "JOB_COMPLETION_INDEX": "5"}, Shard(2, 4)),
        ([], {"FEATURESTORE_SHARD_COUNT": "8", "JOB_COMPLETION_INDEX": "5"}, Shard(5, 8)),
        ([], {"JOB_COMPLETION_INDEX": "5"}, None),  # an indexed Job that does not shard
        (["--shard", "0/1"], {}, None),
        ([], {}, None),
    ],
)
def test_the_shard_comes_from_the_flag_or_an_indexed_job(
    argv: list[str], environ: dict[str, str], expected: Shard | None
) -> None:
    assert _shard_of(argv, environ) == expected


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        (["--shard", "4/4"], {}, "shard 4/4 does not exist"),
        (["--shard", "1-4"], {}, "a shard is index/count"),
        ([], {"FEATURESTORE_SHARD_COUNT": "4"}, "needs JOB_COMPLETION_INDEX"),
        ([], {"FEATURESTORE_SHARD_COUNT": "4", "JOB_COMPLETION_INDEX": "4"}, "JOB_COMPLETION_INDEX='4'"),
        ([], {"FEATURESTORE_SHARD_COUNT": "x", "JOB_COMPLETION_INDEX": "0"}, "a shard is index/count"),
    ],
)
def test_a_bad_shard_is_one_clear_error(argv: list[str], environ: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        _shard_of(argv, environ)


def test_the_command_line_runs_a_shard_of_an_indexed_job(
    generated: datetime, feature_repo: Path, pg_dsn: str, two_dbs: tuple[str, str]
) -> None:
    env = {**os.environ, "FEATURESTORE_SHARD_COUNT": "2", "JOB_COMPLETION_INDEX": "1"}
    cmd = [CLI, "--repo", str(feature_repo), "--redis", two_dbs[0], "--dsn", pg_dsn, "incremental"]
    done = subprocess.run([*cmd, "--views", "item_stats"], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert b"materialized item_stats (shard 1/2): read" in done.stdout
    bad = subprocess.run([*cmd, "--shard", "2/2"], capture_output=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().splitlines() == [
        "featurestore-materialize: shard 2/2 does not exist: the index runs from 0 to the count minus 1 (0/2 to 1/2)"
    ]
    env.pop("JOB_COMPLETION_INDEX")
    bad = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().splitlines() == [
        "featurestore-materialize: FEATURESTORE_SHARD_COUNT=2 needs JOB_COMPLETION_INDEX (set by a Kubernetes"
        " indexed Job) or --shard i/N"
    ]
