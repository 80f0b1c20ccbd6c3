"""SIGTERM drains a real `featurestore serve`: NOT_SERVING first, then every accepted call completes.

The calls are kept in flight by pausing the server's Redis (CLIENT PAUSE): they are
accepted and waiting for their MGET when SIGTERM arrives, 5 ms after they were sent (before
the drain delay existed, half of such calls ended CANCELLED: grpc cancels calls it has not
handed to the server yet when the listener closes).
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_helpers import CLICKS, RestartableRedis, Serve, write_users

from featurestore import AsyncClient

CALLS = 32
DRAIN_DELAY_S, GRACE_S, PAUSE_MS = 1.0, 10.0, 1500


async def test_sigterm_drains_32_calls_in_flight(serve: Serve, own_redis: RestartableRedis, feature_repo: Path) -> None:
    served = await serve(
        own_redis.url,
        "--cache-bytes=0",  # every call reads Redis
        "--redis-timeout-s=5",
        f"--drain-delay-s={DRAIN_DELAY_S}",
        f"--grace-s={GRACE_S}",
    )
    ids = list(range(1, CALLS + 1))
    await write_users(own_redis.url, feature_repo, ids)
    clients = [AsyncClient(served.target, timeout_s=30) for _ in range(4)]
    pauser = aioredis.Redis.from_url(own_redis.url)
    try:
        for client in clients:  # connected before the test starts
            await client.get_online_features({"user_id": [1]}, ["user_activity:clicks_1h"])
        await pauser.client_pause(PAUSE_MS)
        calls = [
            asyncio.ensure_future(clients[i % 4].get_online_features({"user_id": [i]}, ["user_activity:clicks_1h"]))
            for i in ids
        ]
        await asyncio.sleep(0.005)
        sigterm_at = time.monotonic()
        served.terminate()
        async with aio.insecure_channel(served.target) as channel:  # a new connection, during the delay
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert time.monotonic() - sigterm_at < DRAIN_DELAY_S
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [repr(r) for r in results if isinstance(r, BaseException)]
        assert not failures, failures
        assert [r.values("clicks_1h").tolist() for r in results] == [[CLICKS]] * CALLS  # type: ignore[union-attr]
        assert await served.wait(timeout_s=DRAIN_DELAY_S + GRACE_S + 5) == 0
        exited_s = time.monotonic() - sigterm_at
    finally:
        for client in clients:
            await client.close()
        await pauser.aclose()
    output = served.output()
    assert "Traceback" not in output, output
    drained = re.search(r"drained (\d+) calls in flight in ([\d.]+) s", output)
    assert drained is not None and int(drained.group(1)) == CALLS, output  # still in flight when the listener closed
    print(f"drain: {CALLS}/{CALLS} OK; exit 0 {exited_s:.2f} s after SIGTERM ({drained.group(0)})")
    assert exited_s < DRAIN_DELAY_S + GRACE_S


async def test_the_listener_closes_after_the_delay_and_watchers_are_told(
    serve: Serve, own_redis: RestartableRedis
) -> None:
    served = await serve(own_redis.url, "--drain-delay-s=0.5", "--grace-s=5")
    async with aio.insecure_channel(served.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        served.terminate()
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await watch.read() is aio.EOF  # the stream ends when the listener closes, not at the grace's end
        assert 0.4 < time.monotonic() - started < 3
        assert await watch.code() == grpc.StatusCode.OK
        assert await served.wait(timeout_s=10) == 0
    assert time.monotonic() - started < 4  # no waiting out the 5 s grace for the watcher


async def test_a_second_signal_cuts_the_drain_delay_short(serve: Serve, own_redis: RestartableRedis) -> None:
    served = await serve(own_redis.url, "--drain-delay-s=60", "--grace-s=5")
    started = time.monotonic()
    served.terminate()
    await asyncio.sleep(0.5)  # NOT_SERVING, still serving
    served.proc.send_signal(signal.SIGINT)  # Ctrl-C: stop now
    assert await served.wait(timeout_s=15) == 0
    assert time.monotonic() - started < 15
    assert "stopped" in served.output()
