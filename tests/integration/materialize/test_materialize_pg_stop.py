"""PostgreSQL stopped in the middle of a materialization run: no torn row, a clear exit, a rerun that converges.

The run reads a PostgreSQL of its own (the session's serves every other test), stopped
with a fast shutdown (its sessions are terminated) once a third of the rows are in Redis.
The job must exit with one line naming PostgreSQL (exit code 4, no traceback); every row
it wrote must equal the row of an uninterrupted run (a row is written whole or not at
all); and once PostgreSQL is back, the next run leaves Redis byte for byte as the
uninterrupted run did.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis

from featurestore.embedded import EmbeddedPostgres
from featurestore.registry import load_registry
from materialize.job import Settings, run

CLI = str(Path(sys.executable).parent / "featurestore-materialize")
USERS, ITEMS = 5_000, 500


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    # As root, PostgreSQL runs as an unprivileged user: a folder it can reach (as tests/conftest.py does).
    folder = Path(tempfile.mkdtemp(prefix="featurestore-pg-stop-"))
    folder.chmod(0o755)
    try:
        with EmbeddedPostgres(folder / "pg") as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_dbs(flushed_dbs: Callable[..., tuple[str, ...]]) -> tuple[str, ...]:
    """Logical databases 3 and 4 of the test Redis, flushed before and after."""
    return flushed_dbs(3, 4)


def dump(url: str) -> dict[bytes, bytes]:
    """Every row key and value of a database (bookkeeping keys left out)."""
    client = redis.Redis.from_url(url)
    keys = [k for k in client.scan_iter(count=10_000) if b"__meta__" not in k]
    values: list[bytes] = client.mget(keys) if keys else []  # type: ignore[assignment]
    rows = dict(zip(keys, values, strict=True))
    client.close()
    return rows


def fast_shutdown(server: EmbeddedPostgres) -> None:
    """pg_ctl stop -m fast: SIGINT to the postmaster, which terminates every session."""
    assert server._proc is not None
    os.kill(server._proc.pid, signal.SIGINT)
    server._proc.wait(30)
    server._proc = None


async def test_postgres_stopped_mid_run_leaves_no_torn_row_and_the_rerun_converges(
    own_pg: EmbeddedPostgres, feature_repo: Path, two_dbs: tuple[str, str], generator: ModuleType
) -> None:
    stopped_url, clean_url = two_dbs
    registry = load_registry(feature_repo)
    await generator.generate(own_pg.dsn, registry, generator.GenerateOptions(users=USERS, items=ITEMS, seed=11))
    await run(Settings(repo=feature_repo, redis_url=clean_url, dsn=own_pg.dsn, mode="incremental"))
    expected = dump(clean_url)
    victim = await asyncio.create_subprocess_exec(
        *(CLI, "--repo", str(feature_repo), "--redis", stopped_url, "--dsn", own_pg.dsn),
        *("--batch-rows", "5", "--lock-ttl-s", "1", "incremental"),  # small batches: a long run
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = redis.Redis.from_url(stopped_url)
    deadline = time.monotonic() + 60
    # Polling another process's progress: there is no event to wait on.
    while int(client.dbsize()) < len(expected) // 3 and time.monotonic() < deadline:  # type: ignore[arg-type]  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    await asyncio.to_thread(fast_shutdown, own_pg)
    out, err = await asyncio.wait_for(victim.communicate(), 60)
    try:
        assert victim.returncode == 4, err.decode()
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and "PostgreSQL" in lines[0], err.decode()
        assert out == b""
        print(f"\nPostgreSQL stopped mid-run: exit {victim.returncode}, {lines[0]!r}")
        partial = dump(stopped_url)
        assert 0 < len(partial) < len(expected)
        torn = [k for k, v in partial.items() if expected.get(k) != v]
        assert not torn, torn[:5]  # every row written is whole and the same as the clean run's
    finally:
        await asyncio.to_thread(own_pg.start)  # the same cluster, back on its port
    await asyncio.sleep(1.2)  # a lock the victim may have left expires
    await run(Settings(repo=feature_repo, redis_url=stopped_url, dsn=own_pg.dsn, mode="incremental"))
    assert dump(stopped_url) == expected
    client.close()
