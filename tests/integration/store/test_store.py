"""The online store's read and guarded write against a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from featurestore.embedded import free_port
from featurestore.errors import ConfigError, Unavailable
from featurestore.store.layout import DType, FeatureSpec, Layout, decode_rows, encode_rows
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import connect, guarded_write, read_rows

LAYOUT = Layout("v", (FeatureSpec("x", DType.INT64), FeatureSpec("s", DType.STRING)))


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[RedisPipe]:
    pipe = RedisPipe.from_url(redis_url)
    yield pipe
    await pipe.close()


def _now_us() -> int:
    return int(time.time() * 1e6)


def _rows(ts: list[int], x: list[int]) -> list[bytes]:
    return encode_rows(LAYOUT, ts, {"x": x, "s": [str(v) for v in x]})


async def test_older_rows_never_overwrite_newer_ones(redis_client: aioredis.Redis, pipe: RedisPipe) -> None:
    keys = [b"k1", b"k2", b"k3"]
    sha: list[str] = []
    now = _now_us()
    first = await guarded_write(redis_client, [(keys, _rows([now] * 3, [1, 2, 3]))], 0, sha)
    assert (first.written, first.skipped) == (3, 0)
    # k1 older (skipped), k2 same time (rewritten: reruns are idempotent), k3 newer.
    second = await guarded_write(redis_client, [(keys, _rows([now - 1, now, now + 1], [10, 20, 30]))], 0, sha)
    assert (second.written, second.skipped) == (2, 1)
    decoded = decode_rows(LAYOUT, await read_rows(pipe, keys))
    assert decoded.columns["x"].tolist() == [1, 20, 30]
    assert decoded.columns["s"] == ["1", "20", "30"]


async def test_expiry_is_event_time_plus_the_given_span(redis_client: aioredis.Redis) -> None:
    event_us = _now_us() - 10_000_000  # ten seconds ago
    await guarded_write(redis_client, [([b"k"], _rows([event_us], [1]))], 60_000, [])
    remaining_ms = await redis_client.pttl(b"k")  # Redis 6.2 has no PEXPIRETIME
    expected_ms = event_us // 1000 + 60_000 - int(time.time() * 1000)
    assert abs(remaining_ms - expected_ms) < 2_000


async def test_rows_past_their_expiry_are_not_kept(redis_client: aioredis.Redis) -> None:
    await guarded_write(redis_client, [([b"k"], _rows([_now_us() - 120_000_000], [1]))], 60_000, [])
    assert await redis_client.exists(b"k") == 0


async def test_script_is_reloaded_after_a_flush(redis_client: aioredis.Redis) -> None:
    sha: list[str] = []
    await guarded_write(redis_client, [([b"a"], _rows([1], [1]))], 0, sha)
    await redis_client.script_flush()
    counts = await guarded_write(redis_client, [([b"b"], _rows([1], [2]))], 0, sha)
    assert counts.written == 1


async def test_many_batches_in_one_pipeline(redis_client: aioredis.Redis, pipe: RedisPipe) -> None:
    n = 2_000
    keys = [b"k%d" % i for i in range(n)]
    rows = _rows([_now_us()] * n, list(range(n)))
    batches = [(keys[i : i + 500], rows[i : i + 500]) for i in range(0, n, 500)]
    counts = await guarded_write(redis_client, batches, 0, [])
    assert counts.written == n
    decoded = decode_rows(LAYOUT, await read_rows(pipe, keys))
    np.testing.assert_array_equal(decoded.columns["x"], np.arange(n))


async def test_unreachable_redis_is_unavailable() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(Unavailable, match="unreachable"):
        await read_rows(RedisPipe("127.0.0.1", free_port()), [b"k"])
    with pytest.raises(Unavailable, match="unreachable"):
        await guarded_write(client, [([b"k"], _rows([1], [1]))], 0, [])
    await client.aclose()


async def test_concurrent_reads_on_one_pipe_get_their_own_replies(
    redis_client: aioredis.Redis, pipe: RedisPipe
) -> None:
    await redis_client.mset({b"k%d" % i: b"v%d" % i for i in range(200)})
    replies = await asyncio.gather(*(read_rows(pipe, [b"k%d" % i, b"missing", b"k%d" % (199 - i)]) for i in range(200)))
    for i, reply in enumerate(replies):
        assert reply == [b"v%d" % i, None, b"v%d" % (199 - i)]


async def test_a_slow_reply_fails_its_caller_and_the_pipe_recovers(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    await redis_client.set(b"k", b"v")
    pipe = RedisPipe.from_url(redis_url, timeout_s=0.2)
    await redis_client.client_pause(500)
    with pytest.raises(Unavailable, match="did not answer within"):
        await read_rows(pipe, [b"k"])
    await asyncio.sleep(0.4)
    assert await read_rows(pipe, [b"k"]) == [b"v"]
    await pipe.close()


async def test_a_cancelled_caller_does_not_shift_later_replies(redis_client: aioredis.Redis, pipe: RedisPipe) -> None:
    await redis_client.mset({b"a": b"1", b"b": b"2"})
    first = asyncio.ensure_future(read_rows(pipe, [b"a"]))
    await asyncio.sleep(0)
    first.cancel()
    assert await read_rows(pipe, [b"b"]) == [b"2"]
    assert await read_rows(pipe, [b"a"]) == [b"1"]


async def test_the_pipe_selects_its_database(redis_url: str) -> None:
    other = redis_url.rsplit("/", 1)[0] + "/3"
    client = connect(other)
    await client.set(b"in-db-3", b"yes")
    pipe = RedisPipe.from_url(other)
    assert await read_rows(pipe, [b"in-db-3"]) == [b"yes"]
    await client.delete(b"in-db-3")
    await client.aclose()
    await pipe.close()


def test_the_pipe_works_on_uvloop(redis_url: str) -> None:
    """The server runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    uvloop = pytest.importorskip("uvloop")

    async def read() -> list[bytes | None]:
        pipe = RedisPipe.from_url(redis_url)
        try:
            return await read_rows(pipe, [b"nothing-here"])
        finally:
            await pipe.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(read()) == [None]


def test_pipe_urls() -> None:
    tls = RedisPipe.from_url("rediss://app:s3cret@cache.internal:6380/2")
    assert (tls.host, tls.port, tls.db, tls.tls, tls.auth) == (
        "cache.internal",
        6380,
        2,
        True,
        ("app", "s3cret"),
    )
    sock = RedisPipe.from_url("unix:///run/redis.sock?db=4")
    assert (sock.path, sock.db, sock.tls) == ("/run/redis.sock", 4, False)
    with pytest.raises(ConfigError, match="redis://, rediss:// or unix://"):
        RedisPipe.from_url("http://localhost:6379")


async def test_a_wrong_password_is_unavailable_and_not_kept(redis_url: str) -> None:
    pipe = RedisPipe.from_url(redis_url.replace("redis://", "redis://:wrong@"))
    with pytest.raises(Unavailable, match="refused"):
        await read_rows(pipe, [b"k"])
    assert pipe._protocol is None
