"""The hot-key cache against real Redis: same answers as without it, never a value older
than its invalidation, bounded staleness when the event is lost, the lease, warm start-up,
Predict through the cache, the admin RPC, and the MGET count (one per request, none when
every row is cached)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from featurestore import AsyncClient
from featurestore.cache.hotcache import HotCache
from featurestore.cache.rows import ENTRY_OVERHEAD
from featurestore.cli import cache_status as admin
from featurestore.cli.main import main as cli
from featurestore.config import CacheSettings, IndexSettings, ServerSettings, Settings
from featurestore.decode import OUTSIDE_MAX_AGE, PRESENT
from featurestore.lookup import Lookup
from featurestore.registry import Registry, load_registry
from featurestore.serving import wire
from featurestore.serving.server import FeatureServer
from featurestore.store import keys
from featurestore.store.events import EventSubscriber, parse_message, publish_warm, publish_written
from featurestore.store.layout import encode_rows
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import guarded_write

FEATURES = ["user_profile", "user_activity", "item_stats:price"]
DAY_US = 86_400 * 10**6


class CountingPipe(RedisPipe):
    """A RedisPipe that counts the commands it sends."""

    calls = 0

    async def execute(self, *args: bytes | str | int, timeout_s: float | None = None) -> Any:
        self.calls += 1
        return await super().execute(*args, timeout_s=timeout_s)


def columns(registry: Registry, view: str, values: Sequence[float]) -> dict[str, Any]:
    """A column per feature of `view`, row i holding `values[i]` (or its text)."""
    out: dict[str, Any] = {}
    for spec in registry.views[view].layout.features:
        if spec.fixed:
            col = np.asarray(values, dtype=np.float64)
            if spec.length:
                col = np.repeat(col[:, None], spec.length, axis=1)
            out[spec.name] = col.astype(spec.dtype.element)
        else:
            out[spec.name] = [f"v{v}" for v in values]
    return out


async def write(
    client: aioredis.Redis, registry: Registry, view: str, ids: Sequence[int], values: Sequence[float], ts_us: int
) -> None:
    layout = registry.views[view].layout
    rows = encode_rows(layout, np.full(len(ids), ts_us), columns(registry, view, values))
    row_keys = keys.row_keys(registry.project, view, keys.entity_tokens([list(ids)]))
    await guarded_write(client, [(row_keys, rows)], 0, [])


async def write_all(client: aioredis.Redis, registry: Registry, n: int, ts_us: int) -> None:
    ids = list(range(n))
    for view in ("user_profile", "user_activity", "item_stats"):
        await write(client, registry, view, ids, [float(i) for i in ids], ts_us)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Return once `condition()` holds; fail after `timeout_s`."""
    for _ in range(int(timeout_s / 0.001)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("timed out waiting")


def now_us() -> int:
    return time.time_ns() // 1000


@pytest.fixture
def registry(feature_repo: Path) -> Registry:
    return load_registry(feature_repo)


@pytest.fixture
async def cached(
    redis_url: str, registry: Registry, redis_client: aioredis.Redis
) -> AsyncIterator[tuple[Lookup, HotCache]]:
    events = EventSubscriber(redis_url, registry.project)
    cache = HotCache(registry.project, redis_url, events=events, max_staleness_s=60, publish_s=0, sample_every=1)
    cache.start()
    events.start()
    await asyncio.wait_for(cache.wait_ready(), 5)
    lookup = Lookup(CountingPipe.from_url(redis_url), registry, cache=cache)
    yield lookup, cache
    await lookup.close()
    await events.close()
    await cache.close()


@pytest.fixture
async def plain(redis_url: str, registry: Registry) -> AsyncIterator[Lookup]:
    lookup = Lookup(RedisPipe.from_url(redis_url), registry)
    yield lookup
    await lookup.close()


def entities(ids: Sequence[int]) -> dict[str, list[int]]:
    return {"user_id": list(ids), "item_id": list(ids)}


def wire_bytes(result: Any) -> bytes:
    return wire.features_response(result).SerializeToString()  # type: ignore[no-any-return]


async def value_of(lookup: Lookup, user: int) -> float:
    result = await lookup.get_online_features({"item_id": [user]}, ["item_stats:price"])
    return float(np.frombuffer(result.values[0], dtype="<f8")[0])


def mget_pipe(lookup: Lookup) -> CountingPipe:
    pipe = lookup._redis
    assert isinstance(pipe, CountingPipe)
    return pipe


async def test_cache_on_and_off_answer_byte_identically(
    cached: tuple[Lookup, HotCache],
    plain: Lookup,
    registry: Registry,
    redis_client: aioredis.Redis,
) -> None:
    lookup, cache = cached
    await write_all(redis_client, registry, 300, now_us())
    # Rows past user_activity's TTL (2 days) and absent rows are in the requests too.
    old_us = now_us() - 3 * DAY_US
    await write(redis_client, registry, "user_activity", [0, 1, 2], [0, 1, 2], old_us)
    rng = np.random.default_rng(3)
    hits_before = REGISTRY.get_sample_value("featurestore_cache_hits_total") or 0.0
    for _ in range(300):
        n = int(rng.choice([1, 10, 100]))
        ids = np.minimum(rng.zipf(1.3, n) - 1, 399).tolist()  # ids >= 300 are absent
        on = await lookup.get_online_features(entities(ids), FEATURES)
        off = await plain.get_online_features(entities(ids), FEATURES)
        assert wire_bytes(on) == wire_bytes(off)
    hits = (REGISTRY.get_sample_value("featurestore_cache_hits_total") or 0.0) - hits_before
    assert hits > 1000 and len(cache.rows) > 0


async def test_ttl_statuses_are_the_same_for_cached_rows(
    cached: tuple[Lookup, HotCache],
    plain: Lookup,
    registry: Registry,
    redis_client: aioredis.Redis,
) -> None:
    lookup, cache = cached
    await write(redis_client, registry, "user_activity", [5, 6], [5, 6], now_us() - 3 * DAY_US)
    await write(redis_client, registry, "user_activity", [7], [7], now_us())
    ents = {"user_id": [5, 6, 7]}
    for _ in range(5):
        result = await lookup.get_online_features(ents, ["user_activity"])
        cache.hot.drain()
    assert set(keys.row_keys(registry.project, "user_activity", [b"5", b"6", b"7"])) <= set(cache.rows.keys())
    statuses = np.frombuffer(result.statuses[0], dtype=np.uint8).tolist()
    assert statuses == [OUTSIDE_MAX_AGE, OUTSIDE_MAX_AGE, PRESENT]
    off = await plain.get_online_features(ents, ["user_activity"])
    assert wire_bytes(result) == wire_bytes(off)


async def test_one_mget_per_request_and_none_when_all_cached(
    cached: tuple[Lookup, HotCache], registry: Registry, redis_client: aioredis.Redis
) -> None:
    lookup, _ = cached
    pipe = mget_pipe(lookup)
    await write_all(redis_client, registry, 50, now_us())
    ids = list(range(50))
    for _ in range(3):  # admitted by the first read (the cache has room), then served
        await lookup.get_online_features(entities(ids), FEATURES)
        assert pipe.calls == 1
    await lookup.get_online_features(entities([*ids, 60]), FEATURES)  # one miss: one MGET
    assert pipe.calls == 2


async def test_a_nearly_full_cache_admits_only_keys_requested_before(redis_url: str, registry: Registry) -> None:
    budget = 4 << 20
    cache = HotCache(registry.project, redis_url, cache_bytes=budget, publish_s=0)
    try:
        row = b"r" * 300
        size = sys.getsizeof(b"recsys:item_stats:{1000}") + sys.getsizeof(row) + ENTRY_OVERHEAD
        ids = list(range(1000, 1000 + int(0.95 * budget / size)))  # 4-digit ids: `size`
        filler = keys.row_keys(registry.project, "item_stats", keys.entity_tokens([ids]))
        cache.admission.admit(filler, [row] * len(filler), cache.rows.epoch, time.monotonic())
        assert 0.9 * budget < cache.rows.bytes <= budget  # nearly full
        once, twice = keys.row_keys(registry.project, "user_profile", [b"1", b"2"])
        cache.hot.record([twice])
        cache.hot.drain()
        assert cache.admission.admit([once, twice], [b"row", b"row"], cache.rows.epoch, time.monotonic()) == 1
        assert twice in cache.rows and once not in cache.rows
    finally:
        await cache.close()


async def test_invalidated_value_is_never_served_after_the_event(
    cached: tuple[Lookup, HotCache], registry: Registry, redis_client: aioredis.Redis
) -> None:
    lookup, cache = cached
    await write_all(redis_client, registry, 10, now_us())
    for _ in range(3):
        assert await value_of(lookup, 4) == 4.0
        cache.hot.drain()
    for version in range(1, 6):
        await write(redis_client, registry, "item_stats", [4], [100.0 + version], now_us())
        events = cache.freshness.events
        await publish_written(redis_client, registry.project, ["item_stats"], ids={"item_stats": [4]})
        await until(lambda events=events: cache.freshness.events > events)  # type: ignore[misc]
        assert await value_of(lookup, 4) == 100.0 + version  # at once, and ever after
        await asyncio.sleep(0.05)  # the re-warm ran: a hit with the new value
        assert await value_of(lookup, 4) == 100.0 + version
    # An event without ids drops the whole view.
    await write(redis_client, registry, "item_stats", [3], [33.0], now_us())
    await publish_written(redis_client, registry.project, ["item_stats"])
    await until(lambda: cache.freshness.events > events + 1)
    assert await value_of(lookup, 3) == 33.0


async def test_a_read_that_raced_an_invalidation_is_not_cached(
    cached: tuple[Lookup, HotCache],
) -> None:
    _, cache = cached
    key = b"x:item_stats:{1}"
    epoch = cache.rows.epoch
    cache.rows.invalidate([key])  # the event arrived while the read was in flight
    assert cache.admission.admit([key], [b"old row"], epoch, time.monotonic(), admit_all=True) == 0
    assert key not in cache.rows


async def test_a_lost_event_is_bounded_by_max_staleness(
    cached: tuple[Lookup, HotCache],
    redis_url: str,
    registry: Registry,
    redis_client: aioredis.Redis,
) -> None:
    _, listening = cached  # only so that the published event is received by someone
    cache = HotCache(registry.project, redis_url, max_staleness_s=0.5, publish_s=0, sample_every=1)
    cache.start()  # no event subscriber: the event is lost
    await asyncio.wait_for(cache.wait_ready(), 5)
    lookup = Lookup(RedisPipe.from_url(redis_url), registry, cache=cache)
    try:
        await write_all(redis_client, registry, 10, now_us())
        for _ in range(3):
            assert await value_of(lookup, 2) == 2.0
            cache.hot.drain()
        assert keys.row_key(registry.project, "item_stats", b"2") in cache.rows
        await write(redis_client, registry, "item_stats", [2], [222.0], now_us())
        events = listening.freshness.events
        await publish_written(redis_client, registry.project, ["item_stats"], ids={"item_stats": [2]})
        announced = time.monotonic()
        await until(lambda: listening.freshness.events > events)  # published, and we were deaf
        seen = await value_of(lookup, 2)
        while seen != 222.0:
            await asyncio.sleep(0.01)
            seen = await value_of(lookup, 2)
        assert time.monotonic() - announced <= 0.5 + 0.05
        assert cache.freshness.lost_events == 1
    finally:
        await lookup.close()
        await cache.close()


async def test_a_skipped_version_drops_the_view(
    cached: tuple[Lookup, HotCache], registry: Registry, redis_client: aioredis.Redis
) -> None:
    lookup, cache = cached
    await write_all(redis_client, registry, 10, now_us())
    await lookup.get_online_features(entities(range(10)), FEATURES)  # cached: it has room
    assert len(cache.rows) == 30
    version = int(await redis_client.hget(keys.versions_key(registry.project), "item_stats") or 0)
    # The run of version + 1 rewrote item 5, its event was lost; that of version + 2
    # names only item 3.
    await write(redis_client, registry, "item_stats", [5], [55.0], now_us())
    cache.on_event(
        parse_message(
            b'{"event": "written", "views": ["item_stats"], "ids": {"item_stats": [3]},'
            b' "versions": {"item_stats": %d}}' % (version + 2)
        )
    )
    assert cache.freshness.lost_events == 1
    assert await value_of(lookup, 5) == 55.0  # at once: reads skip the view while it drops
    await until(lambda: not cache.freshness.dropping and len(cache.rows) == 30)  # dropped, re-read
    calls = mget_pipe(lookup).calls
    assert await value_of(lookup, 5) == 55.0 and mget_pipe(lookup).calls == calls  # a hit


async def test_a_lost_subscription_drops_everything_when_lost_and_when_back(
    cached: tuple[Lookup, HotCache], registry: Registry, redis_client: aioredis.Redis
) -> None:
    lookup, cache = cached
    await write_all(redis_client, registry, 10, now_us())
    await lookup.get_online_features(entities(range(10)), FEATURES)  # cached: it has room
    assert len(cache.rows) == 30
    invalidations = cache.freshness.invalidations
    assert await redis_client.client_kill_filter(_type="pubsub") >= 1
    await until(lambda: cache.freshness.invalidations == invalidations + 2)  # lost, then resubscribed
    assert len(cache.rows) == 0
    events = cache.freshness.events
    await publish_written(redis_client, registry.project, ["user_profile"])  # followed again
    await until(lambda: cache.freshness.events > events)


async def test_rewritten_versions_going_back_drop_everything(
    cached: tuple[Lookup, HotCache], registry: Registry, redis_client: aioredis.Redis
) -> None:
    lookup, cache = cached
    await publish_written(redis_client, registry.project, ["user_profile"])
    await until(lambda: cache.freshness.events > 0)
    await write_all(redis_client, registry, 10, now_us())
    await lookup.get_online_features(entities(range(10)), FEATURES)  # cached: it has room
    await cache.freshness.poll()
    assert len(cache.rows) == 30
    await redis_client.delete(keys.versions_key(registry.project))  # as after a FLUSHALL
    await cache.freshness.poll()
    assert len(cache.rows) == 0


async def test_the_cache_serves_nothing_once_its_lease_ran_out(
    redis_url: str, registry: Registry, redis_client: aioredis.Redis
) -> None:
    """The version poll renews the lease; without it (Redis unreachable from the poll),
    rows the cache cannot vouch for are not served."""
    cache = HotCache(registry.project, redis_url, max_staleness_s=0.3, publish_s=0, sample_every=1)
    lookup = Lookup(CountingPipe.from_url(redis_url), registry, cache=cache)
    try:
        await write_all(redis_client, registry, 10, now_us())
        assert await value_of(lookup, 1) == 1.0  # no poll yet: nothing served, nothing kept
        cache.hot.drain()
        await cache.freshness.poll()  # the lease: 0.3 s
        for _ in range(2):
            assert await value_of(lookup, 1) == 1.0
            cache.hot.drain()
        calls = mget_pipe(lookup).calls
        assert await value_of(lookup, 1) == 1.0 and mget_pipe(lookup).calls == calls  # a hit
        await asyncio.sleep(0.35)
        assert await value_of(lookup, 1) == 1.0 and mget_pipe(lookup).calls == calls + 1
        assert (await cache.status()).serving is False
    finally:
        await lookup.close()
        await cache.close()


async def test_a_fresh_server_starts_with_the_hot_set_loaded(
    feature_repo: Path,
    redis_url: str,
    registry: Registry,
    redis_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await write_all(redis_client, registry, 100, now_us())
    settings = Settings(
        repo=feature_repo,
        redis_url=redis_url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0),
        cache=CacheSettings(budget_bytes=64 << 20, hot_publish_s=0),
        index=IndexSettings(refresh_s=0),
    )
    first = FeatureServer(settings)
    await first.start()
    try:
        assert first.lookup is not None and first.cache is not None
        for _ in range(3):
            await first.lookup.get_online_features(entities(range(20)), FEATURES)
            first.cache.hot.drain()
        assert await first.cache.publish() == 60
    finally:
        await first.stop(0)
    second = FeatureServer(settings)
    await second.start()
    try:
        assert second.lookup is not None and second.cache is not None
        async with AsyncClient(f"127.0.0.1:{second.port}") as client:
            await client.wait_until_serving(10)
        assert len(second.cache.rows) == 60
        channel = keys.events_channel(registry.project)  # one subscription feeds cache and indexes
        assert await redis_client.pubsub_numsub(channel) == [(channel, 1)]
        before = REGISTRY.get_sample_value("featurestore_cache_misses_total") or 0.0
        await second.lookup.get_online_features(entities(range(20)), FEATURES)
        assert (REGISTRY.get_sample_value("featurestore_cache_misses_total") or 0.0) == before
        # A "warm" event makes it warm again (e.g. after `featurestore-materialize warm`).
        second.cache.rows.clear()
        await publish_warm(redis_client, registry.project, 10)
        cache = second.cache
        await until(lambda: len(cache.rows) >= 10)
        # The admin RPC and the command that prints it.
        await second.lookup.get_online_features(entities(range(20)), FEATURES)
        status = await asyncio.to_thread(admin.cache_status, f"127.0.0.1:{second.port}", 5)
        assert status.enabled and status.serving and status.hits >= 60
        assert status.entries == len(cache.rows) and 0 < status.bytes <= status.budget_bytes
        assert status.warmed_rows == 10 and len(status.top_keys) == 5  # the last warm-up
        assert status.top_keys[0].count >= status.top_keys[-1].count > 0
        target = f"127.0.0.1:{second.port}"
        code = await asyncio.to_thread(cli, ["cache-status", "--target", target, "--top", "3"])
        out = capsys.readouterr().out
        assert code == 0 and "hit ratio" in out and "top 3 keys" in out
        assert "recsys:" in out  # the keys themselves
        code = await asyncio.to_thread(cli, ["cache-status", "--target", target, "--top", "20000"])
        assert code == 1 and "INVALID_ARGUMENT" in capsys.readouterr().err
    finally:
        await second.stop(0)


async def test_cache_status_of_a_server_without_a_cache(
    feature_repo: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(
        repo=feature_repo,
        redis_url=redis_url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0),
        cache=CacheSettings(budget_bytes=0),
        index=IndexSettings(refresh_s=0),
    )
    server = FeatureServer(settings)
    await server.start()
    try:
        target = f"127.0.0.1:{server.port}"
        assert await asyncio.to_thread(cli, ["cache-status", "--target", target, "--json"]) == 0
        assert '"enabled": false' in capsys.readouterr().out
    finally:
        await server.stop(0)
    code = await asyncio.to_thread(cli, ["cache-status", "--target", target])  # stopped
    assert code == 1 and "UNAVAILABLE" in capsys.readouterr().err


async def test_materialize_warm_makes_servers_rewarm(
    cached: tuple[Lookup, HotCache],
    feature_repo: Path,
    redis_url: str,
    registry: Registry,
    redis_client: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from materialize.__main__ import main

    _, cache = cached
    await write_all(redis_client, registry, 10, now_us())
    hot = keys.row_keys(registry.project, "item_stats", [b"%d" % i for i in range(10)])
    await redis_client.zadd(keys.hot_key(registry.project), {k: 10 - i for i, k in enumerate(hot)})
    argv = ["warm", "--repo", str(feature_repo), "--redis", redis_url, "--limit", "4"]
    assert await asyncio.to_thread(main, argv) == 0
    assert "asked 1 subscriber(s)" in capsys.readouterr().out
    await until(lambda: len(cache.rows) == 4)
    assert all(k in cache.rows for k in hot[:4])


async def test_traffic_without_hot_keys_mostly_skips_the_cache(redis_url: str, registry: Registry) -> None:
    cache = HotCache(registry.project, redis_url, publish_s=0, bypass_window=10_000)
    fetched = 0

    async def fetch(wanted: list[bytes]) -> list[bytes | None]:
        nonlocal fetched
        fetched += len(wanted)
        return [b"row"] * len(wanted)

    try:
        await cache.freshness.poll()  # the lease
        for start in range(0, 10_000, 100):  # every key once: a hit ratio of 0
            await cache.read(user_keys(range(start, start + 100)), fetch)
        assert cache.admission.bypassed
        cached, fetched = len(cache.rows), 0
        for _ in range(32):  # the same 100 keys: 30 of 32 reads skip the cache
            await cache.read(user_keys(range(100)), fetch)
        assert fetched >= 30 * 100 and len(cache.rows) >= cached
        for _ in range(1700):  # hot keys again: the probes find them, the bypass ends
            await cache.read(user_keys(range(100)), fetch)
        assert not cache.admission.bypassed and (await cache.status()).hit_ratio > 0
    finally:
        await cache.close()


def user_keys(ids: range) -> list[bytes]:
    return keys.row_keys("recsys", "user_profile", keys.entity_tokens([list(ids)]))
