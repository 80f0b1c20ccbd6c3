"""The guarded write on a real Redis, by every way it is sent: the script through redis-py,
the script through a BulkClient's BulkPipe (rows as bytes or as a matrix), and SET NX
(`set_absent`) for new keys. Each must leave Redis exactly as the guard says: an older
row never replaces a newer one, an equal one does (reruns), whole rows, expiry at the
event time plus the given span."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from featurestore.embedded import free_port
from featurestore.errors import Unavailable
from featurestore.store.bulk import BulkPipe
from featurestore.store.layout import DType, FeatureSpec, Layout, decode_rows, encode_fixed_rows
from featurestore.store.redis import BulkClient, Client, Rows, connect_bulk, guarded_write, set_absent

LAYOUT = Layout("v", (FeatureSpec("x", DType.INT64),))
SPAN_MS = 3_600_000  # the expiry after the event time


def _now_us() -> int:
    return int(time.time() * 1e6)


def _rows(ts_us: list[int], x: list[int], as_matrix: bool) -> Rows:
    matrix = encode_fixed_rows(LAYOUT, ts_us, {"x": np.array(x)})
    return matrix if as_matrix else [row.tobytes() for row in matrix]


@pytest.fixture
async def bulk(redis_url: str, redis_client: aioredis.Redis) -> AsyncIterator[BulkClient]:
    """A BulkClient on the flushed database of `redis_client`."""
    client = connect_bulk(redis_url)
    assert isinstance(client, BulkClient)
    yield client
    await client.aclose()


async def _stored(client: aioredis.Redis, keys: list[bytes]) -> tuple[list[int], list[int]]:
    """x and the event time of each key's row (-1, -1 where absent or not a row)."""
    decoded = decode_rows(LAYOUT, await client.mget(keys))
    x = np.where(decoded.found, decoded.columns["x"], -1).tolist()
    ts = np.where(decoded.found, decoded.event_ts_us, -1).tolist()
    return x, ts


async def _seed_mixed(client: aioredis.Redis, now: int) -> list[bytes]:
    """Keys for every case of the guard; the stored rows are written at `now`.

    new: absent | newer: stored at now, written at now - 1 (skipped) | equal: stored and
    written at now (replaced) | older: stored at now, written at now + 1 (replaced) |
    short: a stored value shorter than a row's header (replaced).
    """
    keys = [b"new", b"newer", b"equal", b"older", b"short"]
    stored = encode_fixed_rows(LAYOUT, [now] * 3, {"x": np.array([-2, -3, -4])})
    for key, row in zip(keys[1:4], stored, strict=True):
        await client.set(key, row.tobytes(), pxat=now // 1000 + SPAN_MS)
    await client.set(b"short", b"0123456789")
    return keys


@pytest.mark.parametrize(
    ("kind", "as_matrix"), [("redis-py", False), ("bulk", False), ("bulk", True)], ids=["redis-py", "bulk", "matrix"]
)
async def test_the_guard_on_a_batch_of_every_case(
    kind: str, as_matrix: bool, redis_client: aioredis.Redis, bulk: BulkClient
) -> None:
    client: Client = redis_client if kind == "redis-py" else bulk
    now = _now_us()
    keys = await _seed_mixed(redis_client, now)
    rows = _rows([now, now - 1, now, now + 1, now], [1, 2, 3, 4, 5], as_matrix)
    counts = await guarded_write(client, [(keys, rows)], SPAN_MS, [])
    assert (counts.written, counts.skipped, counts.existed) == (4, 1, 4)
    x, ts = await _stored(redis_client, keys)
    assert x == [1, -2, 3, 4, 5]
    assert ts == [now, now, now, now + 1, now]
    # Every written row expires at its event time plus the span, in milliseconds.
    expected_ms = [(now + d) // 1000 + SPAN_MS for d in (0, 0, 0, 1, 0)]
    remaining = [await redis_client.pttl(k) for k in keys]
    now_ms = int(time.time() * 1000)
    assert all(abs(r - (e - now_ms)) < 2_000 for r, e in zip(remaining, expected_ms, strict=True))


async def test_a_script_call_of_more_keys_than_lua_unpacks_at_once(
    redis_client: aioredis.Redis, bulk: BulkClient
) -> None:
    """Lua's unpack stops at 8,000 values: the script reads and writes in chunks."""
    n, now = 9_001, _now_us()
    keys = [b"k%d" % i for i in range(n)]
    await guarded_write(bulk, [(keys[::2], _rows([now] * len(keys[::2]), [0] * len(keys[::2]), True))], 0, [])
    counts = await guarded_write(bulk, [(keys, _rows([now - 1] * n, list(range(n)), True))], 0, [])
    assert (counts.written, counts.skipped, counts.existed) == (n // 2, n // 2 + 1, n // 2 + 1)
    x, _ = await _stored(redis_client, keys)
    assert x == [0 if i % 2 == 0 else i for i in range(n)]


@pytest.mark.parametrize("as_matrix", [False, True], ids=["bytes", "matrix"])
async def test_set_absent_writes_only_new_keys_and_returns_the_others(
    as_matrix: bool, redis_client: aioredis.Redis, bulk: BulkClient
) -> None:
    now = _now_us()
    keys = await _seed_mixed(redis_client, now)
    keys = [b"a-new-key-of-another-length", *keys, b"n2"]  # key lengths interleaved: 27, 3, 5 x 4, 2
    rows = _rows([now + 2, now, now - 1, now, now + 1, now, now + 3], [6, 1, 2, 3, 4, 5, 7], as_matrix)
    expire_at = np.array([now + 2, now, now - 1, now, now + 1, now, now + 3]) // 1000 + SPAN_MS
    rest = await set_absent(bulk, keys, rows, expire_at)
    assert rest == [2, 3, 4, 5]  # the keys that existed, whatever their stored row
    x, ts = await _stored(redis_client, keys)
    assert x == [6, 1, -2, -3, -4, -1, 7]
    assert ts == [now + 2, now, now, now, now, -1, now + 3]
    assert await redis_client.get(b"short") == b"0123456789"
    now_ms = int(time.time() * 1000)
    for i in (0, 1, 6):
        assert abs(await redis_client.pttl(keys[i]) - (int(expire_at[i]) - now_ms)) < 2_000
    # The rest through the script: the same state as the guard on the whole batch.
    take = rows[rest] if isinstance(rows, np.ndarray) else [rows[i] for i in rest]
    counts = await guarded_write(bulk, [([keys[i] for i in rest], take)], SPAN_MS, [])
    assert (counts.written, counts.skipped) == (3, 1)
    x, _ = await _stored(redis_client, keys)
    assert x == [6, 1, -2, 3, 4, 5, 7]


async def test_set_absent_without_expiry_and_with_an_expiry_that_is_no_time(
    redis_client: aioredis.Redis, bulk: BulkClient
) -> None:
    keys = [b"a", b"b", b"c"]
    rows = _rows([5_000, -10_000_000, 7_000], [1, 2, 3], True)
    assert await set_absent(bulk, keys, rows, None) == []
    assert [await redis_client.pttl(k) for k in keys] == [-1, -1, -1]  # no expiry
    await redis_client.flushdb()
    # PXAT takes positive times only: such a row (an event time long before 1970) is
    # left to the script, not sent as a command Redis would refuse.
    later_ms = int(time.time() * 1000) + SPAN_MS
    assert await set_absent(bulk, keys, rows, np.array([later_ms, 0, later_ms])) == [1]
    assert [await redis_client.exists(k) for k in keys] == [1, 0, 1]


async def test_the_bulk_pipe_reloads_the_script_after_a_flush(redis_client: aioredis.Redis, bulk: BulkClient) -> None:
    sha: list[str] = []
    rows = _rows([1], [1], True)
    await guarded_write(bulk, [([b"a"], rows)], 0, sha)
    await redis_client.script_flush()
    counts = await guarded_write(bulk, [([b"b"], rows), ([b"c"], rows)], 0, sha)
    assert counts.written == 2


async def test_the_bulk_pipe_selects_its_database_and_carries_concurrent_pipelines(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/4"
    client = connect_bulk(url)
    assert isinstance(client, BulkClient)
    try:
        n = 2_000
        batches = [([b"d4:%d:%d" % (j, i) for i in range(n)], _rows([1] * n, [j] * n, True)) for j in range(4)]
        done = await asyncio.gather(*(guarded_write(client, [batch], 0, []) for batch in batches))
        assert [c.written for c in done] == [n] * 4
        assert await client.dbsize() == 4 * n  # redis-py, on database 4 too
        assert (await _stored(client, [b"d4:3:7"]))[0] == [3]
    finally:
        await client.flushdb()
        await client.aclose()


async def test_an_unreachable_or_silent_redis_is_unavailable() -> None:
    pipe = BulkPipe("127.0.0.1", free_port(), timeout_s=0.5)
    with pytest.raises(Unavailable, match="unreachable"):
        await pipe.run(b"*1\r\n$4\r\nPING\r\n", 1)
    # A server that accepts the connection and never answers.
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
    pipe = BulkPipe("127.0.0.1", server.sockets[0].getsockname()[1], timeout_s=0.3)
    with pytest.raises(Unavailable, match=r"did not answer within 0\.3 s"):
        await pipe.run(b"*1\r\n$4\r\nPING\r\n", 1)
    await pipe.close()
    for writer in accepted:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_wrong_password_is_one_clear_error(redis_url: str) -> None:
    pipe = BulkPipe.from_url(redis_url.replace("redis://", "redis://:wrong@"))
    with pytest.raises(Unavailable, match="refused the connection's set-up"):
        await pipe.run(b"*1\r\n$4\r\nPING\r\n", 1)
    assert pipe._protocol is None
