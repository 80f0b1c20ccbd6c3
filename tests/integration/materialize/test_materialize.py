"""The materialization job against real PostgreSQL and Redis, with generated demo data.

Ground truth comes from PostgreSQL itself, through a different query than the job's
(a window function instead of DISTINCT ON), and every value, null and timestamp that
Redis holds is compared with it after decoding with `store.layout.decode_rows`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from featurestore.embedded import free_port
from featurestore.errors import ConfigError, LockHeld
from featurestore.registry import Registry, ViewDef, load_registry
from featurestore.store.events import WrittenEvent, parse_event
from featurestore.store.keys import (
    entity_tokens,
    events_channel,
    lock_key,
    row_keys,
    watermark_key,
)
from featurestore.store.layout import DType, decode_rows
from materialize.__main__ import main
from materialize.job import Settings, run
from materialize.plan import Window, to_us
from materialize.source import CopyParser, RowBatch, SourceQuery
from materialize.watermark import RunLock

ROOT = Path(__file__).resolve().parents[3]
CLI = str(Path(sys.executable).parent / "featurestore-materialize")
USERS, ITEMS = 20_000, 1_000


@pytest.fixture(scope="module")
def registry(feature_repo: Path) -> Registry:
    return load_registry(feature_repo)


@pytest.fixture(scope="module")
async def generated(pg_dsn: str, registry: Registry, generator: ModuleType) -> datetime:
    """Demo data in every view's table; returns the generator's `now`."""
    gen = generator
    now = datetime.now(UTC)
    options = gen.GenerateOptions(users=USERS, items=ITEMS, versions=3, seed=7)
    await gen.generate(pg_dsn, registry, options, now=now)
    return now  # type: ignore[no-any-return]


@pytest.fixture
def scratch_dbs(flushed_dbs: Callable[..., tuple[str, ...]]) -> tuple[str, ...]:
    """Two more flushed logical databases (1 and 2), flushed again afterwards."""
    return flushed_dbs(1, 2)


def _settings(feature_repo: Path, redis_url: str, pg_dsn: str, **kw: Any) -> Settings:
    return Settings(repo=feature_repo, redis_url=redis_url, dsn=pg_dsn, **kw)


async def _truth(pg_dsn: str, view: ViewDef, start_us: int, end_us: int) -> list[asyncpg.Record]:
    """The latest row per entity in [start, end), newest `created` breaking ties."""
    keys = ", ".join(k.name for k in view.join_keys)
    sql = f"""
        SELECT * FROM (
            SELECT *, row_number() OVER (
                PARTITION BY {keys} ORDER BY event_timestamp DESC, created DESC) AS rn
            FROM {view.table}
            WHERE event_timestamp >= $1 AND event_timestamp < $2) AS ranked
        WHERE rn = 1 ORDER BY {keys}"""
    conn = await asyncpg.connect(pg_dsn)
    try:
        start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=start_us)
        end = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=end_us)
        return list(await conn.fetch(sql, start, end))
    finally:
        await conn.close()


def _keys(registry: Registry, view: ViewDef, records: list[asyncpg.Record]) -> list[bytes]:
    columns = [[r[k.name] for r in records] for k in view.join_keys]
    return row_keys(registry.project, view.name, entity_tokens(columns))


def _assert_rows_equal(view: ViewDef, records: list[asyncpg.Record], values: list[Any]) -> None:
    """Every value, null and event time of the Redis rows equals the PostgreSQL row's."""
    decoded = decode_rows(view.layout, values)
    assert decoded.found.all(), f"{view.name}: {int((~decoded.found).sum())} rows missing"
    expected_ts = np.array([to_us(r["event_timestamp"]) for r in records], dtype=np.int64)
    np.testing.assert_array_equal(decoded.event_ts_us, expected_ts)
    for j, spec in enumerate(view.layout.features):
        column = decoded.columns[spec.name]
        for i, record in enumerate(records):
            value = record[spec.name]
            assert decoded.nulls[i, j] == (value is None), (view.name, spec.name, i)
            if value is None:
                continue
            got = column[i]
            if spec.dtype.is_list:
                np.testing.assert_array_equal(got, np.asarray(value, dtype=spec.dtype.element))
            elif spec.dtype is DType.UNIX_TIMESTAMP:
                assert got == to_us(value)
            elif spec.dtype.element is not None:
                assert got == np.asarray(value, dtype=spec.dtype.element), (spec.name, i)
            else:
                assert got == value, (spec.name, i)


async def _count_keys(client: aioredis.Redis, pattern: bytes) -> int:
    return len([k async for k in client.scan_iter(match=pattern, count=10_000)])


async def test_incremental_writes_the_latest_row_per_entity_within_the_ttl(
    generated: datetime,
    registry: Registry,
    feature_repo: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    pg_dsn: str,
) -> None:
    summary = await run(_settings(feature_repo, redis_url, pg_dsn, mode="incremental"))
    total = 0
    for view in registry.views.values():
        end_us = int(await redis_client.get(watermark_key(registry.project, view.name)))
        records = await _truth(pg_dsn, view, end_us - int(view.ttl_s * 1e6), end_us)
        assert len(records) > 0
        values = await redis_client.mget(_keys(registry, view, records))
        _assert_rows_equal(view, records, values)
        pattern = f"{registry.project}:{view.name}:*".encode()
        assert await _count_keys(redis_client, pattern) == len(records)
        total += len(records)
    assert (summary.counts.read, summary.counts.written) == (total, total)
    assert summary.counts.skipped == 0
    # The generator made some entities stale (newest row older than the TTL): not written.
    assert total < USERS * 2 + ITEMS * 2


async def test_next_incremental_run_reads_only_rows_after_the_watermark(
    generated: datetime,
    registry: Registry,
    feature_repo: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    pg_dsn: str,
) -> None:
    settings = _settings(feature_repo, redis_url, pg_dsn, mode="incremental", views=("user_activity",))
    await run(settings)
    again = await run(settings)
    assert again.counts.read == 0
    conn = await asyncpg.connect(pg_dsn)
    try:  # a newer row for user 1 arrives: the next run writes exactly that row
        await conn.execute(
            "INSERT INTO user_activity (user_id, event_timestamp, created, clicks_1h) VALUES (1, now(), now(), 4242)"
        )
        third = await run(settings)
        await conn.execute("DELETE FROM user_activity WHERE clicks_1h = 4242")
    finally:
        await conn.close()
    assert (third.counts.read, third.counts.written) == (1, 1)
    view = registry.view("user_activity")
    row = decode_rows(view.layout, [await redis_client.get(b"recsys:user_activity:{1}")])
    assert row.columns["clicks_1h"][0] == 4242
    assert row.nulls[0, 1:].all()  # every other feature of that row is null


async def test_backfill_of_older_window_never_overwrites_newer_values(
    generated: datetime,
    registry: Registry,
    feature_repo: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    pg_dsn: str,
) -> None:
    view = registry.view("user_activity")
    await run(_settings(feature_repo, redis_url, pg_dsn, mode="incremental", views=(view.name,)))
    mark = await redis_client.get(watermark_key(registry.project, view.name))
    end_us = int(mark)
    start_us, old_end_us = end_us - 10 * 86_400_000_000, end_us - 12 * 3_600_000_000
    old = await _truth(pg_dsn, view, start_us, old_end_us)
    keys = _keys(registry, view, old)
    before = decode_rows(view.layout, await redis_client.mget(keys))
    old_ts = np.array([to_us(r["event_timestamp"]) for r in old], dtype=np.int64)
    newer = before.found & (before.event_ts_us > old_ts)
    assert newer.any() and (~newer).any()

    summary = await run(
        _settings(
            feature_repo,
            redis_url,
            pg_dsn,
            mode="backfill",
            views=(view.name,),
            start=datetime.fromtimestamp(start_us / 1e6, UTC),
            end=datetime.fromtimestamp(old_end_us / 1e6, UTC),
            expiry_grace_s=30 * 86_400.0,  # else rows past TTL + grace expire at once
        )
    )

    assert summary.counts.read == len(old)
    assert summary.counts.skipped == int(newer.sum())
    assert summary.counts.written == int((~newer).sum())
    after = decode_rows(view.layout, await redis_client.mget(keys))
    np.testing.assert_array_equal(after.event_ts_us, np.maximum(before.event_ts_us, old_ts))
    older_won = np.flatnonzero(~newer).tolist()
    _assert_rows_equal(view, [old[i] for i in older_won], await redis_client.mget([keys[i] for i in older_won]))
    assert await redis_client.get(watermark_key(registry.project, view.name)) == mark


async def test_redis_expiry_is_event_time_plus_ttl_plus_grace(
    generated: datetime,
    registry: Registry,
    feature_repo: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    pg_dsn: str,
) -> None:
    view = registry.view("item_stats")
    grace_s = 3_600.0
    await run(
        _settings(feature_repo, redis_url, pg_dsn, mode="incremental", views=(view.name,), expiry_grace_s=grace_s)
    )
    keys = [k async for k in redis_client.scan_iter(match=b"recsys:item_stats:*", count=1000)]
    rows = decode_rows(view.layout, await redis_client.mget(keys))
    pipe = redis_client.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    ttls_ms = np.array(await pipe.execute(), dtype=np.int64)
    now_ms = time.time() * 1000
    expected_ms = rows.event_ts_us // 1000 + (view.ttl_s + grace_s) * 1000 - now_ms
    assert np.abs(ttls_ms - expected_ms).max() < 5_000


async def test_watermark_moves_only_for_views_whose_writes_all_succeeded(
    generated: datetime,
    registry: Registry,
    feature_repo: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    pg_dsn: str,
) -> None:
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("ALTER TABLE item_stats RENAME TO item_stats_away")
    try:
        before = time.time() * 1e6
        with pytest.raises(ConfigError, match="item_stats"):
            await run(
                _settings(feature_repo, redis_url, pg_dsn, mode="incremental", views=("user_profile", "item_stats"))
            )
    finally:
        await conn.execute("ALTER TABLE item_stats_away RENAME TO item_stats")
        await conn.close()
    mark = await redis_client.get(watermark_key("recsys", "user_profile"))
    assert mark is not None and before <= int(mark) <= time.time() * 1e6
    assert await redis_client.get(watermark_key("recsys", "item_stats")) is None
    assert await redis_client.exists(lock_key("recsys")) == 0  # released on failure too


async def test_run_announces_the_entity_ids_it_wrote(
    generated: datetime,
    registry: Registry,
    feature_repo: Path,
    scratch_dbs: tuple[str, str],
    pg_dsn: str,
) -> None:
    client = aioredis.Redis.from_url(scratch_dbs[0])
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(events_channel(registry.project))
    try:
        await run(
            _settings(feature_repo, scratch_dbs[0], pg_dsn, mode="incremental", views=("item_stats", "item_embedding"))
        )
        events: list[WrittenEvent] = []
        deadline = time.monotonic() + 10
        while len(events) < 2 and time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None:
                events.append(parse_event(message["data"]))
        assert [e.views for e in events] == [("item_stats",), ("item_embedding",)]
        for event in events:
            view = event.views[0]
            pattern = f"{registry.project}:{view}:*".encode()
            stored = [int(k[k.index(b"{") + 1 : -1]) async for k in client.scan_iter(pattern)]
            written = event.ids_of(view)
            assert written is not None and written.dtype == np.int64
            assert sorted(written.tolist()) == sorted(stored) and len(stored) > 0
            assert event.epoch_us == int(await client.get(watermark_key("recsys", view)))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


def _dump(url: str) -> dict[bytes, bytes]:
    """Every row key and value of a database (bookkeeping keys left out)."""
    client = redis.Redis.from_url(url)
    keys = [k for k in client.scan_iter(count=10_000) if b":{__meta__}:" not in k]  # bookkeeping: issue 12
    dump = dict(zip(keys, client.mget(keys), strict=True)) if keys else {}
    client.close()
    return dump


def _cli(repo: Path, url: str, dsn: str, *args: str) -> subprocess.Popen[bytes]:
    cmd = [CLI, "--repo", str(repo), "--redis", url, "--dsn", dsn, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def test_killed_run_then_rerun_leaves_redis_as_an_uninterrupted_run(
    generated: datetime, feature_repo: Path, scratch_dbs: tuple[str, str], pg_dsn: str
) -> None:
    killed_url, clean_url = scratch_dbs
    await run(_settings(feature_repo, clean_url, pg_dsn, mode="incremental"))
    expected = _dump(clean_url)
    # Small batches make the run long enough to be killed in the middle of a view.
    victim = await asyncio.create_subprocess_exec(
        CLI,
        "--repo",
        str(feature_repo),
        "--redis",
        killed_url,
        "--dsn",
        pg_dsn,
        "--batch-rows",
        "5",
        "--lock-ttl-s",
        "1",
        "incremental",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(killed_url)
    deadline = time.monotonic() + 60
    # Polling another process's progress: there is no event to wait on.
    while client.dbsize() < len(expected) // 3 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    await victim.wait()
    partial = _dump(killed_url)
    assert 0 < len(partial) < len(expected)
    # Views the victim finished have moved their watermark; the one it was in has not.
    assert len(client.keys(b"recsys:{__meta__}:watermark:*")) < 4
    await asyncio.sleep(1.2)  # the dead run's lock expires
    await run(_settings(feature_repo, killed_url, pg_dsn, mode="incremental"))
    assert _dump(killed_url) == expected
    assert len(client.keys(b"recsys:{__meta__}:watermark:*")) == 4
    client.close()


def test_second_run_is_refused_while_the_lock_is_held(
    generated: datetime, feature_repo: Path, scratch_dbs: tuple[str, str], pg_dsn: str
) -> None:
    url = scratch_dbs[0]
    client = redis.Redis.from_url(url)
    client.set(lock_key("recsys"), b"another-run", px=60_000)
    proc = _cli(feature_repo, url, pg_dsn, "incremental")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5
    assert out == b""
    assert len(err.decode().strip().splitlines()) == 1
    assert "holds the lock" in err.decode()
    assert client.get(lock_key("recsys")) == b"another-run"  # not taken, not released
    assert client.dbsize() == 1
    client.close()


def _missing_registry_repo(tmp: Path) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "feature_store.yaml").write_text((ROOT / "feature_repo/feature_store.yaml").read_text())
    return repo


BAD_INPUTS = [
    # (id, argv builder(repo, redis_url, dsn, tmp) -> argv, exit code, words in the message)
    (
        "pg-unreachable",
        lambda r, u, d, t: [
            "--repo",
            r,
            "--redis",
            u,
            "--dsn",
            f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
            "incremental",
        ],
        4,
        "PostgreSQL",
    ),
    (
        "redis-unreachable",
        lambda r, u, d, t: ["--repo", r, "--redis", f"redis://127.0.0.1:{free_port()}/0", "--dsn", d, "incremental"],
        4,
        "Redis",
    ),
    (
        "registry-missing",
        lambda r, u, d, t: ["--repo", str(_missing_registry_repo(t)), "--redis", u, "--dsn", d, "incremental"],
        3,
        "feast apply",
    ),
    (
        "repo-missing",
        lambda r, u, d, t: ["--repo", str(t / "nowhere"), "--redis", u, "--dsn", d, "incremental"],
        3,
        "feature_store.yaml",
    ),
    (
        "view-unknown",
        lambda r, u, d, t: ["--repo", r, "--redis", u, "--dsn", d, "--views", "user_profile,nope", "incremental"],
        2,
        "unknown feature view 'nope'",
    ),
    (
        "backfill-empty-window",
        lambda r, u, d, t: [
            "--repo",
            r,
            "--redis",
            u,
            "--dsn",
            d,
            "backfill",
            "--start",
            "2026-01-02",
            "--end",
            "2026-01-01",
        ],
        2,
        "window is empty",
    ),
]


@pytest.mark.parametrize(("build", "code", "words"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_non_zero_with_one_clear_line(
    build: Any,
    code: int,
    words: str,
    feature_repo: Path,
    scratch_dbs: tuple[str, str],
    pg_dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(build(str(feature_repo), scratch_dbs[0], pg_dsn, tmp_path)) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert words in err


async def test_lock_is_exclusive_refreshed_while_held_and_released_by_its_holder(
    redis_client: aioredis.Redis,
) -> None:
    async with RunLock(redis_client, "recsys", ttl_s=0.3) as lock:
        with pytest.raises(LockHeld, match="holds the lock"):
            async with RunLock(redis_client, "recsys", ttl_s=0.3):
                pass
        await asyncio.sleep(0.7)  # beyond the TTL: the refresher kept it alive
        assert await redis_client.get(lock_key("recsys")) == lock.token
        lock.check()
    assert await redis_client.exists(lock_key("recsys")) == 0


async def test_lock_of_a_dead_holder_expires(redis_client: aioredis.Redis) -> None:
    await redis_client.set(lock_key("recsys"), b"dead", px=200)
    await asyncio.sleep(0.3)
    async with RunLock(redis_client, "recsys", ttl_s=5):
        pass


async def _copy_bytes(pg_dsn: str, sql: str, args: list[Any]) -> bytes:
    parts: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        parts.append(chunk)

    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.copy_from_query(sql, *args, output=sink, format="binary")
    finally:
        await conn.close()
    return b"".join(parts)


def _parse_all(query: SourceQuery, data: bytes, sizes: Iterator[int], min_bytes: int) -> RowBatch:
    parser, batches, pos = CopyParser(query, min_bytes), [], 0
    while pos < len(data):
        step = next(sizes)
        batch = parser.feed(data[pos : pos + step])
        pos += step
        if batch is not None:
            batches.append(batch)
    last = parser.parse()
    batches += [last] if last is not None else []
    assert parser.done
    return batches[0] if len(batches) == 1 else _concat(query.view, batches)


def _concat(view: ViewDef, batches: list[RowBatch]) -> RowBatch:
    keys = [[v for b in batches for v in b.keys[i]] for i in range(len(view.join_keys))]
    ts = np.concatenate([b.event_ts_us for b in batches])
    columns: dict[str, Any] = {}
    for spec in view.layout.features:
        if spec.fixed:
            columns[spec.name] = np.concatenate([b.columns[spec.name] for b in batches])
        else:
            columns[spec.name] = [c for b in batches for c in _var_values(b.columns[spec.name])]
    nulls = {n: np.concatenate([b.nulls[n] for b in batches]) for n in view.layout.names}
    return RowBatch(keys, ts, columns, nulls)


def _var_values(col: Any) -> list[bytes]:
    bounds = col.offsets.tolist()
    return [col.data[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


@pytest.mark.parametrize("view_name", ["user_activity", "item_embedding"])
async def test_copy_parser_gives_the_same_rows_whatever_the_chunk_boundaries(
    view_name: str, generated: datetime, registry: Registry, pg_dsn: str
) -> None:
    view = registry.view(view_name)
    query = SourceQuery(view)
    sql, args = query.select(Window(view, None, to_us(generated) + 1, advances_watermark=True))
    data = await _copy_bytes(pg_dsn, sql, args)
    whole = _parse_all(query, data, iter([len(data)]), min_bytes=1 << 40)
    rng = np.random.default_rng(0)
    sliced = _parse_all(query, data, iter(rng.integers(1, 700, size=len(data)).tolist()), 2_000)
    assert len(whole) == len(sliced) == (USERS if view_name.startswith("user") else ITEMS)
    assert whole.keys == sliced.keys
    np.testing.assert_array_equal(whole.event_ts_us, sliced.event_ts_us)
    for spec in view.layout.features:
        np.testing.assert_array_equal(whole.nulls[spec.name], sliced.nulls[spec.name])
        if spec.fixed:
            np.testing.assert_array_equal(whole.columns[spec.name], sliced.columns[spec.name])
        else:
            assert _var_values(whole.columns[spec.name]) == sliced.columns[spec.name]


@pytest.fixture(autouse=True)
def _no_leftover_env() -> Iterator[None]:
    # The CLI reads FEATURESTORE_REDIS_URL as its default; tests always pass --redis.
    saved = os.environ.pop("FEATURESTORE_REDIS_URL", None)
    yield
    if saved is not None:
        os.environ["FEATURESTORE_REDIS_URL"] = saved
