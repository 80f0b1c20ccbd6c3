"""Real `featurestore serve` processes and a Redis of their own, for the fault tests
(conftest.py makes `own_redis` and `serve` fixtures of this folder).

    proc = await serve(own_redis.url, "--grace-s", "5")   # SERVING, or the test fails
    proc.port, proc.metrics_port, proc.output()          # after it exited: everything it logged

A fault test kills, pauses or restarts its Redis, so it gets one that no other test
shares (`own_redis`, per module; `own_redis.restart()` brings it back on the same port).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from featurestore import Client
from featurestore.cli.options import variable
from featurestore.config import OPTIONS
from featurestore.embedded import EmbeddedRedis, free_port
from featurestore.registry import load_registry
from featurestore.store.keys import entity_tokens, row_keys
from featurestore.store.layout import DType, Layout, encode_rows
from featurestore.store.redis import guarded_write

FEATURESTORE = str(Path(sys.executable).parent / "featurestore")
CLICKS = 7  # user_activity:clicks_1h of every user `write_users` writes


class ServeProcess:
    """A `featurestore serve` child on 127.0.0.1:`port`, its log in a file (a pipe could fill and block it)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, metrics_port: int, log: Path) -> None:
        self.proc, self.port, self.metrics_port, self.log = proc, port, metrics_port, log

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The value of the sample `name` with `labels` on the process's /metrics (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float) -> int:
        """The exit code, once the process exited (the test fails after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"serve did not exit within {timeout_s} s"
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _environment() -> dict[str, str]:
    """This environment without the serve options' variables (the flags say everything)."""
    ours = {variable(option.name) for option in OPTIONS}
    return {k: v for k, v in os.environ.items() if k not in ours}


class RestartableRedis(EmbeddedRedis):
    """An EmbeddedRedis that a test may kill and start again on the same port."""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def kill(self) -> None:
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.start()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableRedis]:
    with RestartableRedis(tmp_path_factory.mktemp("own-redis")) as server:
        yield server


def rows_of(layout: Layout, n: int, value: int = CLICKS) -> dict[str, Any]:
    """Columns of `n` rows for every feature of `layout`: `value` where a number goes, random unit vectors
    in fixed-length float lists (embeddings, so that retrieval has neighbours), "x" in strings."""
    rng = np.random.default_rng(n)
    columns: dict[str, Any] = {}
    for f in layout.features:
        if f.fixed and f.length:
            vectors = rng.standard_normal((n, f.length))
            columns[f.name] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(f.dtype.element)
        elif f.fixed:
            columns[f.name] = np.full(n, value, dtype=f.dtype.element)
        elif f.dtype is DType.BYTES:
            columns[f.name] = [b"x"] * n
        elif f.dtype is DType.STRING:
            columns[f.name] = ["x"] * n
        else:
            columns[f.name] = [[value]] * n
    return columns


async def write_rows(redis_url: str, repo: Path, view_name: str, ids: list[int], value: int = CLICKS) -> None:
    """Rows of `view_name` for `ids` (see `rows_of`), written as materialization writes them."""
    registry = load_registry(repo)
    view = registry.view(view_name)
    rows = encode_rows(view.layout, [time.time_ns() // 1000] * len(ids), rows_of(view.layout, len(ids), value))
    client = aioredis.Redis.from_url(redis_url)
    try:
        await guarded_write(client, [(row_keys(registry.project, view.name, entity_tokens([ids])), rows)], 0, [])
    finally:
        await client.aclose()


async def write_users(redis_url: str, repo: Path, ids: list[int]) -> None:
    """user_activity rows for `ids`: user_activity:clicks_1h is CLICKS."""
    await write_rows(redis_url, repo, "user_activity", ids)


def start_serve(repo: Path, redis_url: str, log: Path, *flags: str) -> ServeProcess:
    """`featurestore serve` on free ports, its output in `log`; returns once health says SERVING."""
    port, metrics_port = free_port(), free_port()
    cmd = [FEATURESTORE, "serve", "--repo", str(repo), "--redis", redis_url, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--metrics-port", str(metrics_port), "--registry-refresh-s", "0", *flags]
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=_environment())
    served = ServeProcess(proc, port, metrics_port, log)
    try:
        with Client(served.target) as client:
            client.wait_until_serving(timeout_s=60)
    except BaseException:
        served.kill()
        raise
    return served


Serve = Callable[..., Awaitable[ServeProcess]]


@pytest.fixture
async def serve(feature_repo: Path, tmp_path: Path) -> AsyncIterator[Serve]:
    """A factory: await serve(redis_url, *flags) -> a SERVING `featurestore serve`; killed at teardown."""
    started: list[ServeProcess] = []

    async def start(redis_url: str, *flags: str) -> ServeProcess:
        log = tmp_path / f"serve-{len(started)}.log"
        served = await asyncio.to_thread(start_serve, feature_repo, redis_url, log, *flags)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()
