"""RedisPipe's circuit breaker against a real Redis that is absent, stopped (SIGSTOP) or paused.

A Redis that refuses or hangs opens the breaker after THRESHOLD failed calls, and then a
call fails in well under a millisecond instead of waiting for its timeout; the first probe
after Redis is back closes it. A caller that gives up (its deadline) and an error reply
are not connection failures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from featurestore.embedded import EmbeddedRedis, free_port
from featurestore.errors import Unavailable
from featurestore.store.breaker import COOLDOWN_S, THRESHOLD
from featurestore.store.pipe import RedisPipe


@pytest.fixture
def paused_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server


def pid_of(server: EmbeddedRedis) -> int:
    assert server._proc is not None
    return server._proc.pid


async def timed_failure(pipe: RedisPipe) -> tuple[float, str]:
    start = time.perf_counter()
    with pytest.raises(Unavailable) as caught:
        await pipe.execute(b"PING")
    return time.perf_counter() - start, str(caught.value)


async def test_a_refusing_redis_fails_calls_at_once_until_a_probe_finds_it_back(tmp_path: Path) -> None:
    port = free_port()
    pipe = RedisPipe("127.0.0.1", port, timeout_s=1.0)
    try:
        for _ in range(THRESHOLD):
            _, message = await timed_failure(pipe)
            assert "unreachable" in message
        assert pipe.breaker.state == "open"
        elapsed_s, message = await timed_failure(pipe)
        assert "failing at once" in message and elapsed_s < 0.005
        with EmbeddedRedis(tmp_path / "redis", port=port):
            with pytest.raises(Unavailable, match="failing at once"):
                await pipe.execute(b"PING")  # back, but the cool-down has not passed
            await asyncio.sleep(COOLDOWN_S)
            assert await pipe.execute(b"PING") == b"PONG"  # the probe
            assert pipe.breaker.state == "closed"
    finally:
        await pipe.close()


async def test_a_hung_redis_costs_one_timeout_then_calls_fail_at_once(paused_redis: EmbeddedRedis) -> None:
    pipe = RedisPipe.from_url(paused_redis.url, timeout_s=0.3)
    assert await pipe.execute(b"PING") == b"PONG"
    os.kill(pid_of(paused_redis), signal.SIGSTOP)
    try:
        start = time.perf_counter()
        waits = await asyncio.gather(*(timed_failure(pipe) for _ in range(THRESHOLD)))
        assert all("did not answer within 0.3 s" in m or "closed the connection" in m for _, m in waits), waits
        assert time.perf_counter() - start < 0.6  # the calls in flight time out together
        fast = [await timed_failure(pipe) for _ in range(100)]
        assert max(s for s, _ in fast) < 0.005, max(fast)
        assert all("failing at once" in m for _, m in fast)
    finally:
        os.kill(pid_of(paused_redis), signal.SIGCONT)
    await asyncio.sleep(COOLDOWN_S)
    assert await pipe.execute(b"PING") == b"PONG"
    assert pipe.breaker.state == "closed"
    await pipe.close()


async def test_callers_that_give_up_and_error_replies_do_not_open_it(paused_redis: EmbeddedRedis) -> None:
    pipe = RedisPipe.from_url(paused_redis.url, timeout_s=5.0)
    pauser = aioredis.Redis.from_url(paused_redis.url)
    try:
        for _ in range(THRESHOLD + 1):
            with pytest.raises(Unavailable, match="refused the read"):
                await pipe.execute(b"NOSUCHCOMMAND")
        assert pipe.breaker.failures == 0
        await pipe.execute(b"SET", b"k", b"v")
        await pauser.client_pause(300)
        for _ in range(THRESHOLD + 1):  # each caller's deadline passes while Redis is paused
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):
                    await pipe.execute(b"GET", b"k")
        assert pipe.breaker.state == "closed" and pipe.breaker.failures == 0
        assert await pipe.execute(b"GET", b"k") == b"v"  # the same connection, in order
    finally:
        await pauser.aclose()
        await pipe.close()
