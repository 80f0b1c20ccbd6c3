"""`featurestore serve --workers 2`: several processes on one port, stopped by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from featurestore import AsyncClient
from featurestore.embedded import free_port
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
