"""The gRPC server end to end: a real server on port 0, real Redis, the Python client.

The server serves a copy of the project's Feast repo with one extra view, `typed`, that
has a feature of every supported type; rows are written the way materialization writes
them (encode_rows + guarded_write).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from featurestore import AsyncClient, Client
from featurestore.config import ServerSettings, Settings
from featurestore.decode import NOT_FOUND, NULL_VALUE, OUTSIDE_MAX_AGE, PRESENT
from featurestore.embedded import EmbeddedRedis
from featurestore.errors import ConfigError, FeatureStoreError
from featurestore.registry import load_registry
from featurestore.serving.server import SERVICE_NAME, FeatureServer
from featurestore.store import keys
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write

NOW_US = int(time.time() * 1e6)
TYPED_VIEW = """
from datetime import timedelta
from feast import Entity, FeatureView, Field, ValueType
from feast.types import (Array, Bool, Bytes, Float32, Float64, Int32, Int64, String,
                         UnixTimestamp)
from features import _source

account = Entity(name="account", join_keys=["account_id"], value_type=ValueType.STRING)
typed = FeatureView(
    name="typed", entities=[account], ttl=timedelta(hours=1), source=_source("typed"),
    schema=[
        Field(name="i32", dtype=Int32), Field(name="i64", dtype=Int64),
        Field(name="f32", dtype=Float32), Field(name="f64", dtype=Float64),
        Field(name="flag", dtype=Bool), Field(name="s", dtype=String),
        Field(name="b", dtype=Bytes), Field(name="ts", dtype=UnixTimestamp),
        Field(name="vec", dtype=Array(Float32), vector_length=3),
        Field(name="ids", dtype=Array(Int64)),
    ],
    online=True,
)
"""


@pytest.fixture(scope="module")
def repo(make_repo: Callable[[str, Mapping[str, str]], Path]) -> Path:
    return make_repo("typed", {"typed.py": TYPED_VIEW})


@pytest.fixture(scope="module")
async def server(repo: Path, redis_url: str) -> AsyncIterator[FeatureServer]:
    settings = Settings(
        repo=repo,
        redis_url=redis_url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0, max_rows=10_000),
    )
    server = FeatureServer(settings)
    await server.start()
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def client(server: FeatureServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        await client.wait_until_serving(10)
        yield client


async def write(
    redis: aioredis.Redis,
    repo: Path,
    view: str,
    ids: Sequence[int | str],
    columns: dict[str, Any],
    ts_us: Sequence[int] | None = None,
    nulls: dict[str, Any] | None = None,
) -> None:
    """Write rows of `view` as materialization does."""
    registry = load_registry(repo)
    layout = registry.views[view].layout
    ts = np.asarray(ts_us if ts_us is not None else [NOW_US] * len(ids), dtype=np.int64)
    row_keys = keys.row_keys(registry.project, view, keys.entity_tokens([list(ids)]))
    rows = encode_rows(layout, ts, columns, nulls)
    await guarded_write(redis, [(row_keys, rows)], 0, [])


TYPED = {
    "i32": np.array([-(2**31), 2**31 - 1, 7], dtype=np.int32),
    "i64": np.array([-(2**63), 2**63 - 1, 7], dtype=np.int64),
    "f32": np.array([1.5, -0.0, np.inf], dtype=np.float32),
    "f64": np.array([np.pi, -1e300, np.nan]),
    "flag": np.array([True, False, True]),
    "s": ["héllo", "", "x|{}%"],
    "b": [b"\x00\x01", b"", b"\xff"],
    "ts": np.array([NOW_US, 0, -1], dtype=np.int64),
    "vec": np.arange(9, dtype=np.float32).reshape(3, 3),
    "ids": [[1, 2, 3], [], [2**62]],
}


async def test_every_type_and_null_round_trips(client: AsyncClient, redis_client: aioredis.Redis, repo: Path) -> None:
    ids = ["a", "b|c", "d"]
    nulls = {"s": [False, True, False], "f64": [False, False, True], "vec": [True, False, False]}
    await write(redis_client, repo, "typed", ids, TYPED, nulls=nulls)
    result = await client.get_online_features({"account_id": [*ids, "zz"]}, ["typed"])
    assert result.names == tuple(TYPED)
    for name, expected in TYPED.items():
        got, status = result.values(name), result.statuses(name)
        mask = np.asarray(nulls.get(name, [False] * 3))
        want = [*np.where(mask, NULL_VALUE, PRESENT).tolist(), NOT_FOUND]
        assert status.tolist() == want, name
        for i in np.flatnonzero(~mask):
            np.testing.assert_array_equal(got[i], expected[i], err_msg=f"{name}[{i}]")
    assert result.values("s").dtype == object and result.values("vec").shape == (4, 3)
    assert result.event_timestamps("typed").tolist() == [NOW_US] * 3 + [0]
    assert result.values("typed:i32")[2] == 7


async def test_sync_client_round_trips(server: FeatureServer, redis_client: aioredis.Redis, repo: Path) -> None:
    await write(redis_client, repo, "typed", ["a"], {k: v[:1] for k, v in TYPED.items()})

    def call() -> Any:
        with Client(f"127.0.0.1:{server.port}") as sync:
            return sync.get_online_features({"account_id": ["a"]}, ["typed:s", "typed:i64"])

    result = await asyncio.to_thread(call)
    assert result.values("s").tolist() == ["héllo"]
    assert result.values("i64").tolist() == [-(2**63)]


async def test_expired_rows_are_outside_max_age(client: AsyncClient, redis_client: aioredis.Redis, repo: Path) -> None:
    two_hours_ago = NOW_US - 7_200_000_000  # the view's TTL is one hour
    columns = {k: v[:2] for k, v in TYPED.items()}
    await write(redis_client, repo, "typed", ["old", "new"], columns, [two_hours_ago, NOW_US])
    result = await client.get_online_features({"account_id": ["old", "new"]}, ["typed:i64"])
    assert result.statuses("i64").tolist() == [OUTSIDE_MAX_AGE, PRESENT]
    assert result.values("i64").tolist() == TYPED["i64"][:2].tolist()  # last value, flagged


async def test_row_of_another_schema_is_not_found(
    client: AsyncClient, redis_client: aioredis.Redis, repo: Path
) -> None:
    await write(redis_client, repo, "typed", ["a"], {k: v[:1] for k, v in TYPED.items()})
    registry = load_registry(repo)
    other = registry.views["user_profile"].layout  # a valid row, but not typed's schema
    row = encode_rows(other, [NOW_US], {f.name: [0] if f.fixed else [""] for f in other.features})
    await redis_client.set(keys.row_key("recsys", "typed", b"b"), row[0])
    result = await client.get_online_features({"account_id": ["a", "b"]}, ["typed:i32"])
    assert result.statuses("i32").tolist() == [PRESENT, NOT_FOUND]


async def test_one_redis_round_trip_for_many_views_and_a_service(
    client: AsyncClient, redis_client: aioredis.Redis, repo: Path
) -> None:
    await write(redis_client, repo, "item_stats", [5], _zeros(repo, "item_stats", price=9.5))
    await redis_client.config_resetstat()
    entities = {"user_id": np.arange(100), "item_id": np.full(100, 5)}
    result = await client.get_online_features(entities, ["ranking_v1"], full_feature_names=True)
    stats = await redis_client.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert not {k for k in stats if k not in ("cmdstat_mget", "cmdstat_config")}
    assert result.views == ("user_profile", "user_activity", "item_stats")
    assert len(result.names) == 69 and result.values("item_stats__price").tolist() == [9.5] * 100
    assert set(result.statuses("user_profile:age").tolist()) == {NOT_FOUND}


def _zeros(repo: Path, view: str, **values: float) -> dict[str, Any]:
    layout = load_registry(repo).views[view].layout
    return {f.name: [values.get(f.name, 0)] if f.fixed else ["x"] for f in layout.features}


async def test_registry_reload_serves_a_changed_definition(
    server: FeatureServer, client: AsyncClient, repo: Path, apply_repo: Callable[[Path], None]
) -> None:
    assert not await server.reload()  # unchanged: nothing swapped
    text = (repo / "typed.py").read_text()
    (repo / "typed.py").write_text(text.replace('Field(name="i32", dtype=Int32), ', ""))
    try:
        await asyncio.to_thread(apply_repo, repo)
        assert await server.reload()
        with pytest.raises(FeatureStoreError, match="no feature 'i32'") as info:
            await client.get_online_features({"account_id": ["a"]}, ["typed:i32"])
        assert _code(info) == grpc.StatusCode.NOT_FOUND
    finally:
        (repo / "typed.py").write_text(text)
        await asyncio.to_thread(apply_repo, repo)
        assert await server.reload()


async def test_health_is_serving_and_reflection_lists_the_service(server: FeatureServer) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            assert "featurestore.v1.FeatureStore" in names
            break


def _code(info: pytest.ExceptionInfo[FeatureStoreError]) -> grpc.StatusCode:
    cause = info.value.__cause__
    assert isinstance(cause, grpc.RpcError)
    return cause.code()  # type: ignore[no-any-return]


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_INPUT = [
    ({"user_id": [1]}, ["nope:x"], grpc.StatusCode.NOT_FOUND, "unknown feature view 'nope'"),
    ({"user_id": [1]}, ["user_profile:nope"], grpc.StatusCode.NOT_FOUND, "no feature 'nope'"),
    ({"user_id": [1]}, ["ghost_service"], grpc.StatusCode.NOT_FOUND, "'ghost_service' is neither"),
    ({"user_id": [1]}, ["a:b:c"], INVALID, "malformed feature reference 'a:b:c'"),
    ({"user_id": ["1"]}, ["user_profile"], INVALID, "'user_id' is int64"),
    ({"account_id": [1]}, ["typed"], INVALID, "'account_id' is string"),
    ({"item_id": [1]}, ["user_profile"], INVALID, "no 'user_id' entity column"),
    ({"user_id": [1], "color": [2]}, ["user_profile"], INVALID, r"\['color'\] are not join"),
    (
        {"user_id": [1, 2], "item_id": [1]},
        ["user_profile:age", "item_stats:price"],
        INVALID,
        "unequal lengths",
    ),
    ({"user_id": []}, ["user_profile"], INVALID, "empty batch"),
    ({"user_id": list(range(10_001))}, ["user_profile"], INVALID, "10001 entity rows exceeds"),
    ({"user_id": [1]}, [], INVALID, "no features requested"),
    ({"user_id": [1], "item_id": [1]}, ["ranking_v1"], INVALID, "full_feature_names"),
]


@pytest.mark.parametrize(
    ("entities", "features", "code", "match"),
    BAD_INPUT,
    ids=[
        "view",
        "feature",
        "service",
        "malformed",
        "str-key",
        "int-key",
        "missing-key",
        "extra-key",
        "unequal",
        "empty",
        "oversize",
        "no-features",
        "name-clash",
    ],
)
async def test_bad_input_gets_a_clear_status(
    client: AsyncClient,
    entities: dict[str, Any],
    features: list[str],
    code: grpc.StatusCode,
    match: str,
) -> None:
    with pytest.raises(FeatureStoreError, match=match) as info:
        await client.get_online_features(entities, features)
    assert _code(info) == code


async def test_caller_deadline_during_the_redis_read(client: AsyncClient, redis_client: aioredis.Redis) -> None:
    await redis_client.execute_command("CLIENT", "PAUSE", "400")  # Redis stalls every client
    with pytest.raises(FeatureStoreError, match="DEADLINE_EXCEEDED") as info:
        # An id no test asked for: not in the server's hot-key cache, so Redis is read.
        await client.get_online_features({"user_id": [918_273]}, ["user_profile"], timeout_s=0.1)
    assert _code(info) == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.4)
    result = await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
    assert result.statuses("age").tolist() == [NOT_FOUND]  # and the server still serves


async def test_redis_down_is_unavailable_and_the_server_recovers(repo: Path, tmp_path: Path) -> None:
    redis = EmbeddedRedis(tmp_path / "redis")
    redis.start()
    settings = Settings(
        repo=repo,
        redis_url=redis.url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0, redis_timeout_s=0.5),
    )
    server = FeatureServer(settings)
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            await client.wait_until_serving(10)
            redis.stop()
            with pytest.raises(FeatureStoreError, match="Redis is unreachable") as info:
                await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
            assert _code(info) == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(FeatureStoreError, match="unknown feature view") as info:
                await client.get_online_features({"user_id": [1]}, ["nope:x"])
            assert _code(info) == grpc.StatusCode.NOT_FOUND
            redis.start()  # same port: the server reconnects by itself
            result = await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
            assert result.statuses("age").tolist() == [NOT_FOUND]
    finally:
        await server.stop(0)
        redis.stop()


async def _connections(redis: aioredis.Redis) -> int:
    return len(await redis.client_list())


async def test_a_failed_start_closes_everything_it_started(
    repo: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The port is taken, so start fails after the cache, the indexes and the models
    started: nothing of it may keep running or keep a Redis connection open."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tasks_before = asyncio.all_tasks()
        connections_before = await _connections(redis_client)
        server = FeatureServer(
            Settings(
                repo=repo, redis_url=redis_url, server=ServerSettings(host="127.0.0.1", port=port, registry_refresh_s=0)
            )
        )
        with pytest.raises(ConfigError, match=f"cannot bind gRPC to 127.0.0.1:{port}"):
            await server.start()
    assert server.cache is not None and server.indexes is not None and server.scorer is not None  # they had started
    await asyncio.sleep(0.05)  # cancelled tasks finish
    assert asyncio.all_tasks() - tasks_before == set()
    for _ in range(100):  # Redis notices closed sockets within a few ms
        if await _connections(redis_client) <= connections_before:
            break
        await asyncio.sleep(0.02)
    assert await _connections(redis_client) <= connections_before


async def test_connections_are_recycled_without_failing_a_call(repo: Path, redis_url: str) -> None:
    """--max-connection-age-s: the server sends GOAWAY after the age; calls in flight finish
    and the client reconnects by itself, so no call fails across several ages."""
    settings = Settings(
        repo=repo,
        redis_url=redis_url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0, max_connection_age_s=0.3, grace_s=1.0),
    )
    server = FeatureServer(settings)
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            await client.wait_until_serving(10)
            channel = client._channel
            states: list[grpc.ChannelConnectivity] = []

            async def watch() -> None:
                state = channel.get_state()
                while True:
                    await channel.wait_for_state_change(state)
                    state = channel.get_state()
                    states.append(state)

            watcher = asyncio.create_task(watch())
            started, calls = time.monotonic(), 0
            while time.monotonic() - started < 1.5:  # five connection ages
                result = await client.get_online_features({"user_id": [1]}, ["user_profile:age"])
                assert result.rows == 1
                calls += 1
            watcher.cancel()
            assert calls > 10
            assert grpc.ChannelConnectivity.IDLE in states  # a GOAWAY closed a connection: it was recycled
    finally:
        await server.stop(0)
