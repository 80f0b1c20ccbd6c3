"""`featurestore serve`: several processes on one port, stopped by SIGTERM; configured by the environment."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from featurestore import AsyncClient
from featurestore.cli.cache_status import cache_status
from featurestore.cli.options import variable
from featurestore.config import OPTIONS
from featurestore.embedded import free_port
from featurestore.errors import InvalidArgument
from featurestore.registry import load_registry
from featurestore.store.keys import entity_tokens, row_keys
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write


async def test_two_workers_serve_one_port_and_stop_on_sigterm(
    feature_repo: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    registry = load_registry(feature_repo)
    view = registry.view("user_activity")
    ids = [1, 2, 3]
    columns = {f.name: ["x"] * 3 if not f.fixed else np.full(3, 7) for f in view.layout.features}
    rows = encode_rows(view.layout, [time.time_ns() // 1000] * 3, columns)
    keys = row_keys(registry.project, view.name, entity_tokens([ids]))
    await guarded_write(redis_client, [(keys, rows)], 0, [])
    port = free_port()
    featurestore = Path(sys.executable).parent / "featurestore"
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child server, waited for below
        [
            str(featurestore),
            "serve",
            "--repo",
            str(feature_repo),
            "--redis",
            redis_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            await client.wait_until_serving(timeout_s=60)
            for _ in range(20):  # new connections may land on either worker
                result = await client.get_online_features({"user_id": ids}, ["user_activity"])
                assert result.values("user_activity:clicks_1h").tolist() == [7, 7, 7]
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-2000:]
    assert output.count("listening on") == 2  # both workers started and logged


def _environment(**options: str) -> dict[str, str]:
    """This process's environment without the serve options' variables, plus `options` as variables.

    The repo's variables (FEATURESTORE_PG_*, read by feature_store.yaml) stay.
    """
    ours = {variable(option.name) for option in OPTIONS}
    own = {k: v for k, v in os.environ.items() if k not in ours}
    return {**own, **{variable(name): value for name, value in options.items()}}


async def test_serve_configured_only_by_the_environment(feature_repo: Path, redis_url: str) -> None:
    port = free_port()
    featurestore = Path(sys.executable).parent / "featurestore"
    environ = _environment(
        repo=str(feature_repo),
        redis_url=redis_url,
        host="127.0.0.1",
        port=str(port),
        cache_bytes="0",
        max_rows="2",
        models=str(feature_repo / "absent.yaml"),
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child server, waited for below
        [str(featurestore), "serve"], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            await client.wait_until_serving(timeout_s=60)
            with pytest.raises(InvalidArgument, match="limit of 2"):
                await client.get_online_features({"user_id": [1, 2, 3]}, ["user_profile"])
            await client.get_online_features({"user_id": [1, 2]}, ["user_profile"])
        status = await asyncio.to_thread(cache_status, f"127.0.0.1:{port}")
        assert not status.enabled  # FEATURESTORE_CACHE_BYTES=0
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-2000:]
    assert f"listening on 127.0.0.1:{port}" in output
    assert "absent.yaml" in output  # FEATURESTORE_MODELS: the settings name it


def test_a_bad_environment_value_stops_serve_with_one_line() -> None:
    featurestore = Path(sys.executable).parent / "featurestore"
    done = subprocess.run(
        [str(featurestore), "serve", "--port", "0"],
        env=_environment(grace_s="soon"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "environment variable FEATURESTORE_GRACE_S: invalid float value: 'soon'" in lines[0]
