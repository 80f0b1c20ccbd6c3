"""The online store's read and guarded write against a real Redis."""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis.asyncio as aioredis

from featurestore.embedded import free_port
from featurestore.errors import Unavailable
from featurestore.store.layout import DType, FeatureSpec, Layout, decode_rows, encode_rows
from featurestore.store.redis import connect, guarded_write, read_rows

LAYOUT = Layout("v", (FeatureSpec("x", DType.INT64), FeatureSpec("s", DType.STRING)))


def _now_us() -> int:
    return int(time.time() * 1e6)


def _rows(ts: list[int], x: list[int]) -> list[bytes]:
    return encode_rows(LAYOUT, ts, {"x": x, "s": [str(v) for v in x]})


async def test_older_rows_never_overwrite_newer_ones(redis_client: aioredis.Redis) -> None:
    keys = [b"k1", b"k2", b"k3"]
    sha: list[str] = []
    now = _now_us()
    first = await guarded_write(redis_client, [(keys, _rows([now] * 3, [1, 2, 3]))], 0, sha)
    assert (first.written, first.skipped) == (3, 0)
    # k1 older (skipped), k2 same time (rewritten: reruns are idempotent), k3 newer.
    second = await guarded_write(
        redis_client, [(keys, _rows([now - 1, now, now + 1], [10, 20, 30]))], 0, sha
    )
    assert (second.written, second.skipped) == (2, 1)
    decoded = decode_rows(LAYOUT, await read_rows(redis_client, keys))
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


async def test_many_batches_in_one_pipeline(redis_client: aioredis.Redis) -> None:
    n = 2_000
    keys = [b"k%d" % i for i in range(n)]
    rows = _rows([_now_us()] * n, list(range(n)))
    batches = [(keys[i : i + 500], rows[i : i + 500]) for i in range(0, n, 500)]
    counts = await guarded_write(redis_client, batches, 0, [])
    assert counts.written == n
    decoded = decode_rows(LAYOUT, await read_rows(redis_client, keys))
    np.testing.assert_array_equal(decoded.columns["x"], np.arange(n))


async def test_unreachable_redis_is_unavailable() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(Unavailable, match="unreachable"):
        await read_rows(client, [b"k"])
    with pytest.raises(Unavailable, match="unreachable"):
        await guarded_write(client, [([b"k"], _rows([1], [1]))], 0, [])
    await client.aclose()
