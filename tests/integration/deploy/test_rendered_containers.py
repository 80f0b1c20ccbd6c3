"""The manifests' containers run: the server and the materializer, started with the environment
their pods would get (deploy/k8s/base rendered), pointed at the test Redis and PostgreSQL.

Only what must differ on this machine is replaced: the Secret's Redis URL and DSN (the test
servers), the repo path (the test's applied copy), the listen address and the ports (free
loopback ports). Every other variable is the ConfigMap's, so a value that parses but stops
the server at start-up, or a drain that outlasts the pod's grace period, fails here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest
import redis.asyncio as aioredis

# The renderer the unit tests use (tests/unit/deploy/deploy_render.py): one reading of deploy/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "deploy"))
from deploy_render import K8S, build, command_line, container_environment, find

from featurestore import AsyncClient
from featurestore.cli.options import PREFIX
from featurestore.embedded import free_port
from featurestore.errors import Unavailable
from featurestore.registry import load_registry

BIN = Path(sys.executable).parent
BASE = build(K8S / "base")

pytestmark = pytest.mark.slow


def _local(environ: dict[str, str], **overrides: str) -> dict[str, str]:
    """This process's environment without FEATURESTORE_* serve/job variables, then the pod's, then `overrides`."""
    own = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX) or k.startswith("FEATURESTORE_PG_")}
    return {**own, **environ, **overrides}


@pytest.fixture(scope="module")
async def data_dsn(pg_dsn: str, feature_repo: Path, generator: ModuleType) -> AsyncIterator[str]:
    """A database of this module's own with a little demo data, so other tests' tables stay put."""
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("DROP DATABASE IF EXISTS deploy_test WITH (FORCE)")
    await conn.execute("CREATE DATABASE deploy_test")
    dsn = pg_dsn.rsplit("/", 1)[0] + "/deploy_test"
    options = generator.GenerateOptions(users=200, items=50, versions=1, seed=3)
    await generator.generate(dsn, load_registry(feature_repo), options)
    yield dsn
    await conn.execute("DROP DATABASE deploy_test WITH (FORCE)")
    await conn.close()


async def test_the_server_container_starts_serves_metrics_and_drains_within_its_grace_period(
    feature_repo: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    deployment = find(BASE, "Deployment", "featurestore")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    port, metrics_port = free_port(), free_port()
    environ = _local(
        container_environment(container, BASE),
        FEATURESTORE_REDIS_URL=redis_url,
        FEATURESTORE_REPO=str(feature_repo),
        FEATURESTORE_HOST="127.0.0.1",
        FEATURESTORE_PORT=str(port),
        FEATURESTORE_METRICS_PORT=str(metrics_port),
    )
    line = command_line(container, environ)
    assert line[0] == "featurestore"
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child server, waited for below
        [str(BIN / line[0]), *line[1:]], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            probe = container["startupProbe"]
            deadline = time.monotonic() + probe["failureThreshold"] * probe["periodSeconds"]
            while True:  # the startup probe's budget, or until the server exits
                assert proc.poll() is None, f"the server exited with {proc.returncode}"
                try:
                    await client.wait_until_serving(timeout_s=1.0)
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, "not SERVING within the startup probe's budget"
            await client.get_online_features({"user_id": [1]}, ["user_profile"])
        page = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        )
        assert "featurestore_requests_total" in page
    finally:
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=spec["terminationGracePeriodSeconds"])
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            pytest.fail(f"the server outlived terminationGracePeriodSeconds: {output[-2000:]}")
    assert proc.returncode == 0, output[-2000:]
    assert time.monotonic() - stopped < spec["terminationGracePeriodSeconds"]


async def test_the_materialize_cron_job_container_runs_an_incremental_pass(
    feature_repo: Path, redis_url: str, redis_client: aioredis.Redis, data_dsn: str
) -> None:
    cron = find(BASE, "CronJob", "featurestore-materialize")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    environ = _local(
        container_environment(container, BASE),
        FEATURESTORE_REDIS_URL=redis_url,
        FEATURESTORE_DSN=data_dsn,
        FEATURESTORE_REPO=str(feature_repo),
    )
    line = command_line(container, environ)
    assert line[:2] == ["featurestore-materialize", "incremental"]
    done = await asyncio.to_thread(
        subprocess.run, [str(BIN / line[0]), *line[1:]], env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert await redis_client.dbsize() > 200  # user, activity, item and embedding rows
