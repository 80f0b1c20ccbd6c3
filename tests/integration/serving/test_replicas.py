"""Three replicas behind client-side round robin, with a materialization in the middle.

Three `featurestore serve` processes on separate ports share one Redis, each with its
hot-key cache on; a client spreads calls over them with gRPC's round_robin policy (the
way a client reaches the pods of deploy/k8s's headless Service), and one poller per
replica asks that replica alone, so that every answer is attributed. Mid-traffic, newer
rows arrive in PostgreSQL and `featurestore-materialize incremental` copies them into
Redis. Then, per the README's "Freshness guarantee":

* every replica serves the new values, and none serves an old one in a call that started
  later than --cache-max-staleness-s after the run finished (its announcement is sent
  before it exits); once a replica served the new values it never goes back;
* no call fails, through the round-robin client or to any replica;
* the round-robin client reached all three replicas (their own request counters).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import asyncpg
import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from featurestore import AsyncClient
from featurestore.cli.cache_status import cache_status
from featurestore.cli.options import variable
from featurestore.config import OPTIONS
from featurestore.embedded import free_port
from featurestore.registry import load_registry

BIN = Path(sys.executable).parent
REPLICAS = 3
USERS, ITEMS = 2_000, 200
ENTITIES = list(range(1, 101))  # one lookup: 100 users
FEATURE = "user_activity:clicks_1h"
NEW_OFFSET = 1_000_000  # a new value is NEW_OFFSET + user id; generated values are far below
STALENESS_S = 2.0  # --cache-max-staleness-s of the replicas: the documented bound
PAUSE_S = 0.005  # between one caller's calls: four callers and three servers share two cores

pytestmark = pytest.mark.slow


@dataclass
class Replica:
    port: int
    metrics_port: int
    process: subprocess.Popen[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Answer:
    """One call: when it started and ended (monotonic s), how many of its rows were new, or its error."""

    started: float
    ended: float
    new_rows: int = 0
    error: str = ""


@dataclass
class Caller:
    name: str
    answers: list[Answer] = field(default_factory=list)

    async def run(self, client: AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                result = await client.get_online_features({"user_id": ENTITIES}, [FEATURE], timeout_s=5.0)
                values = result.values(FEATURE)
                new_rows = int(np.count_nonzero(values == NEW_OFFSET + np.asarray(ENTITIES)))
                self.answers.append(Answer(started, time.monotonic(), new_rows))
            except Exception as exc:  # every failure is a finding: the test asserts there are none
                self.answers.append(Answer(started, time.monotonic(), error=f"{type(exc).__name__}: {exc}"))
            await asyncio.sleep(PAUSE_S)


@pytest.fixture(scope="module")
async def data_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """A database of this module's own, so other tests' tables stay put."""
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("DROP DATABASE IF EXISTS replicas_test WITH (FORCE)")
    await conn.execute("CREATE DATABASE replicas_test")
    yield pg_dsn.rsplit("/", 1)[0] + "/replicas_test"
    await conn.execute("DROP DATABASE replicas_test WITH (FORCE)")
    await conn.close()


def _materialize(repo: Path, redis_url: str, dsn: str) -> list[str]:
    return [str(BIN / "featurestore-materialize"), "--repo", str(repo), "--redis", redis_url, "--dsn", dsn]


def _environment() -> dict[str, str]:
    """This environment without the serve options' variables (the flags below say everything)."""
    ours = {variable(option.name) for option in OPTIONS}
    return {k: v for k, v in os.environ.items() if k not in ours}


@pytest.fixture(scope="module")
async def materialized(
    feature_repo: Path, data_dsn: str, redis_url: str, redis: aioredis.Redis, generator: ModuleType
) -> None:
    """Demo data in PostgreSQL, materialized once into the (flushed) Redis."""
    options = generator.GenerateOptions(users=USERS, items=ITEMS, versions=2, seed=11, stale_fraction=0.0)
    await generator.generate(data_dsn, load_registry(feature_repo), options)
    done = await asyncio.to_thread(
        subprocess.run,
        [*_materialize(feature_repo, redis_url, data_dsn), "incremental"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def replicas(feature_repo: Path, redis_url: str, materialized: None) -> Iterator[list[Replica]]:
    """Three `featurestore serve` processes on their own ports, each with the hot-key cache on."""
    started = []
    for _ in range(REPLICAS):
        port, metrics_port = free_port(), free_port()
        command = [
            str(BIN / "featurestore"),
            "serve",
            "--repo",
            str(feature_repo),
            "--redis",
            redis_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--registry-refresh-s",
            "0",
            "--cache-max-staleness-s",
            str(STALENESS_S),
            "--hot-publish-s",
            "0",
        ]
        process = subprocess.Popen(
            command, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        started.append(Replica(port, metrics_port, process))
    yield started
    for replica in started:
        replica.process.send_signal(signal.SIGTERM)
    for replica in started:
        try:
            output, _ = replica.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            output, _ = replica.process.communicate()
        assert replica.process.returncode == 0, output[-2000:]


def _calls_answered(replica: Replica) -> float:
    """The replica's count of OK GetOnlineFeatures calls, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "featurestore_requests_total"
                and labels.get("method", "").endswith("GetOnlineFeatures")
                and labels.get("code") == "OK"
            ):
                return float(sample.value)
    return 0.0


def _round_robin(replicas: list[Replica]) -> AsyncClient:
    target = "ipv4:" + ",".join(r.target for r in replicas)
    return AsyncClient(target, options=[("grpc.lb_policy_name", "round_robin")])


async def _new_rows_arrive(data_dsn: str) -> None:
    """A newer row for each of ENTITIES in user_activity (only clicks_1h set)."""
    conn = await asyncpg.connect(data_dsn)
    try:
        await conn.executemany(
            "INSERT INTO user_activity (user_id, event_timestamp, created, clicks_1h) VALUES ($1, now(), now(), $2)",
            [(user, NEW_OFFSET + user) for user in ENTITIES],
        )
    finally:
        await conn.close()


async def test_every_replica_serves_the_new_values_within_the_bound_and_no_call_fails(
    replicas: list[Replica], feature_repo: Path, redis_url: str, data_dsn: str
) -> None:
    clients = [AsyncClient(r.target) for r in replicas]
    round_robin = _round_robin(replicas)
    try:
        for client in clients:
            await client.wait_until_serving(timeout_s=120)
        await round_robin.wait_until_serving(timeout_s=30)

        # Every replica reads the rows once: they are now in its cache, old values.
        for client in clients:
            result = await client.get_online_features({"user_id": ENTITIES}, [FEATURE])
            assert not np.any(result.values(FEATURE) >= NEW_OFFSET)
        for replica in replicas:
            status = await asyncio.to_thread(cache_status, replica.target)
            assert status.enabled and status.entries >= len(ENTITIES), replica.target

        # Round robin alone: the calls spread over the three replicas.
        before = [await asyncio.to_thread(_calls_answered, r) for r in replicas]
        for _ in range(30 * REPLICAS):
            await round_robin.get_online_features({"user_id": ENTITIES}, [FEATURE])
        spread = [await asyncio.to_thread(_calls_answered, r) - b for r, b in zip(replicas, before, strict=True)]
        assert all(calls >= 20 for calls in spread), f"round robin answered by {spread}"

        # Traffic on every path, then a materialization in the middle of it.
        stop = asyncio.Event()
        callers = [Caller(f"replica {r.port}") for r in replicas] + [Caller("round robin")]
        tasks = [
            asyncio.create_task(caller.run(client, stop))
            for caller, client in zip(callers, [*clients, round_robin], strict=True)
        ]
        await asyncio.sleep(1.0)
        await _new_rows_arrive(data_dsn)
        run = await asyncio.create_subprocess_exec(
            *_materialize(feature_repo, redis_url, data_dsn),
            "incremental",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await run.communicate()
        finished = time.monotonic()
        assert run.returncode == 0, err.decode()
        await asyncio.sleep(STALENESS_S + 1.0)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        for client in [*clients, round_robin]:
            await client.close()

    for caller in callers:
        errors = [a.error for a in caller.answers if a.error]
        assert not errors, f"{caller.name}: {len(errors)} failed calls, first: {errors[0]}"
        assert any(a.started < finished for a in caller.answers), f"{caller.name}: no call during the run"
        late_stale = [a for a in caller.answers if a.started > finished + STALENESS_S and a.new_rows < len(ENTITIES)]
        assert not late_stale, f"{caller.name}: old values {late_stale[0].started - finished:.2f} s after the run"
        first_new = next((a for a in caller.answers if a.new_rows == len(ENTITIES)), None)
        assert first_new is not None, f"{caller.name} never served the new values"
        went_back = [a for a in caller.answers if a.started > first_new.ended and a.new_rows < len(ENTITIES)]
        if caller.name != "round robin":  # one replica's answers: never back to old values once new
            assert not went_back, f"{caller.name} served old values again after new ones"
        print(
            f"{caller.name}: {len(caller.answers)} calls, new values {first_new.ended - finished:+.3f} s after the run"
        )
