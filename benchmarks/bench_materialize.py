"""Materialization throughput against asyncpg's binary COPY of the same rows, same run.

    .venv/bin/python benchmarks/bench_materialize.py --sizes 250000,1000000

For each size: a Feast repo copy with one extra view, `bench_wide` (50 float8 features
keyed by user_id), is applied; the demo generator fills its table (one version per
user, 2% nulls) in an embedded PostgreSQL; then, on the same latest-row query:

    copy_plain   asyncpg `copy_from_query(..., format='binary')` of
                 `SELECT DISTINCT ON (user_id) * ... ORDER BY user_id, event_timestamp
                 DESC, created DESC`, output discarded: the floor to compare against
    copy_shaped  the same for the job's own SELECT (COALESCEd columns, null masks)
    writes alone `store.redis.guarded_write` of pre-packed rows, in the job's batch shape
    job          `featurestore-materialize backfill` as a child process, into an embedded
                 Redis, twice: into an empty Redis, then over the same keys (the cron's
                 steady state): its summary line's rate (registry loading excluded,
                 reported apart), the Redis script's time per row, its peak RSS

Prints a table and writes benchmarks/results/materialize-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "feature_repo"))

from generate import GenerateOptions, generate  # noqa: E402

from featurestore.embedded import EmbeddedPostgres, EmbeddedRedis  # noqa: E402
from featurestore.registry import ViewDef, load_registry  # noqa: E402
from featurestore.store.keys import row_keys  # noqa: E402
from featurestore.store.layout import encode_rows  # noqa: E402
from featurestore.store.redis import guarded_write  # noqa: E402
from materialize.plan import Window, to_us  # noqa: E402
from materialize.sink import connect  # noqa: E402
from materialize.source import SourceQuery  # noqa: E402

VIEW = "bench_wide"
BENCH_VIEW = """

bench_wide = FeatureView(
    name="bench_wide",
    entities=[user],
    ttl=timedelta(days=30),
    source=_source("bench_wide"),
    schema=[Field(name=f"f{i:02d}", dtype=Float64) for i in range(50)],
    online=True,
)
"""


def pg_env(dsn: str) -> dict[str, str]:
    m = re.match(r"postgresql://(\w+)@([\d.]+):(\d+)/(\w+)", dsn)
    assert m, dsn
    user, host, port, db = m.groups()
    return {
        "FEATURESTORE_PG_HOST": host,
        "FEATURESTORE_PG_PORT": port,
        "FEATURESTORE_PG_DB": db,
        "FEATURESTORE_PG_USER": user,
        "FEATURESTORE_PG_PASSWORD": "",
        "FEATURESTORE_FEAST_REDIS": "127.0.0.1:6379",
    }


def make_repo(workdir: Path, dsn: str) -> Path:
    repo = workdir / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    with (repo / "features.py").open("a") as f:
        f.write(BENCH_VIEW)
    os.environ.update(pg_env(dsn))
    feast = Path(sys.executable).parent / "feast"
    subprocess.run([str(feast), "apply"], cwd=repo, check=True, capture_output=True)
    return repo


async def copy_rate(dsn: str, sql: str, args: list[Any]) -> tuple[int, float]:
    conn = await asyncpg.connect(dsn)
    received = 0

    async def sink(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    try:
        started = time.perf_counter()
        await conn.copy_from_query(sql, *args, output=sink, format="binary")
        return received, time.perf_counter() - started
    finally:
        await conn.close()


async def guarded_write_rate(redis_url: str, view: ViewDef, rows: int) -> float:
    """Rows/s of `guarded_write` alone: pre-packed rows, the job's batch and pipeline shape."""
    rng = np.random.default_rng(0)
    now_us = int(time.time() * 1e6)
    batch = 8_000
    columns = {f.name: rng.random(batch) for f in view.layout.features}
    packed = encode_rows(view.layout, np.full(batch, now_us), columns)
    client = connect(redis_url, max_connections=4)
    sha: list[str] = []

    async def writer(first: int, step: int) -> None:
        for start in range(first, rows, step):
            keys = row_keys("bench", view.name, [b"%d" % i for i in range(start, start + batch)])
            pipe = [(keys[i : i + 1000], packed[i : i + 1000]) for i in range(0, batch, 1000)]
            await guarded_write(client, pipe, 0, sha)

    try:
        started = time.perf_counter()
        await asyncio.gather(writer(0, 2 * batch), writer(batch, 2 * batch))
        return rows / (time.perf_counter() - started)
    finally:
        await client.flushdb()
        await client.aclose()


def _watch_peak_rss(proc: subprocess.Popen[bytes]) -> int:
    """The child's peak RSS in kB: VmHWM of its own address space, read until it exits.

    Not wait4's ru_maxrss: Linux carries the pre-exec high-water mark of the forked
    parent (this benchmark, holding the generator's data) over into the child.
    """
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            break
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        peak = max(peak, int(match[1])) if match else peak
        time.sleep(0.02)
    return peak


def run_job(repo: Path, dsn: str, redis_url: str, start: datetime, end: datetime) -> dict[str, Any]:
    cmd = [
        str(Path(sys.executable).parent / "featurestore-materialize"),
        "--repo",
        str(repo),
        "--dsn",
        dsn,
        "--redis",
        redis_url,
        "--views",
        VIEW,
        "-v",
        "backfill",
        "--start",
        start.isoformat(),
        "--end",
        end.isoformat(),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_kb = _watch_peak_rss(proc)
    out_b, err_b = proc.communicate()
    wall = time.perf_counter() - started
    out, err = out_b.decode(), err_b.decode()
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}): {err}")
    m = re.search(r"read (\d+) rows, wrote (\d+), skipped (\d+) as older, in ([\d.]+) s", out)
    assert m, out
    read, wrote, skipped, seconds = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    return {
        "read": read,
        "written": wrote,
        "skipped": skipped,
        "seconds": seconds,
        "rows_per_s": read / seconds,
        "wall_s_with_registry_load": wall,
        "peak_rss_mb": peak_kb / 1024,
        "summary": out.strip(),
    }


async def measure(size: int, dsn: str, redis_url: str, repo: Path) -> dict[str, Any]:
    registry = load_registry(repo)
    now = datetime.now(UTC)
    started = time.perf_counter()
    await generate(
        dsn,
        registry,
        GenerateOptions(users=size, versions=1, stale_fraction=0.0, chunk_rows=100_000),
        views=[VIEW],
        now=now,
    )
    gen_s = time.perf_counter() - started
    view = registry.view(VIEW)
    start, end = now - timedelta(days=40), now + timedelta(seconds=1)
    window = Window(view, to_us(start), to_us(end), advances_watermark=False)
    shaped_sql, args = SourceQuery(view).select(window)
    plain_sql = (
        "SELECT DISTINCT ON (user_id) * FROM bench_wide WHERE event_timestamp < $1"
        " AND event_timestamp >= $2 ORDER BY user_id, event_timestamp DESC, created DESC"
    )
    await copy_rate(dsn, plain_sql, args)  # warm the cache: every measure reads from memory
    plain_bytes, plain_s = await copy_rate(dsn, plain_sql, args)
    _, shaped_s = await copy_rate(dsn, shaped_sql, args)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    redis_alone = await guarded_write_rate(redis_url, view, size)  # flushes after itself
    # First into an empty Redis (every key new), then again over the same keys: the
    # daily cron's steady state, where each write replaces a row of the same size.
    first, rerun = (_job_with_redis_cost(client, repo, dsn, redis_url, start, end) for _ in range(2))
    client.flushdb()
    client.close()
    assert first["read"] == rerun["read"] == size, (first, rerun)
    return {
        "rows": size,
        "features": 50,
        "generate_s": gen_s,
        "copy_plain_rows_per_s": size / plain_s,
        "copy_plain_mb": plain_bytes / 1e6,
        "copy_shaped_rows_per_s": size / shaped_s,
        "guarded_write_alone_rows_per_s": redis_alone,
        "job_into_empty_redis": first,
        "job_over_existing_keys": rerun,
        "ratio_job_to_copy_plain": first["rows_per_s"] / (size / plain_s),
        "ratio_rerun_to_copy_plain": rerun["rows_per_s"] / (size / plain_s),
    }


def _job_with_redis_cost(
    client: redis.Redis, repo: Path, dsn: str, redis_url: str, start: datetime, end: datetime
) -> dict[str, Any]:
    client.config_resetstat()
    job = run_job(repo, dsn, redis_url, start, end)
    stats: Any = client.info("commandstats")
    script = stats.get("cmdstat_evalsha", {})
    job["redis_script_us_per_row"] = script.get("usec", 0) / max(1, job["read"])
    return job


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"{'rows':>9} {'COPY plain':>11} {'COPY shaped':>12} {'writes alone':>13}"
        f" {'run':>6} {'job':>10} {'ratio':>6} {'Redis script':>13} {'peak RSS':>9}"
    )
    for r in results:
        for label, key in (("empty", "job_into_empty_redis"), ("rerun", "job_over_existing_keys")):
            job = r[key]
            print(
                f"{r['rows']:>9,} {r['copy_plain_rows_per_s']:>9,.0f}/s"
                f" {r['copy_shaped_rows_per_s']:>10,.0f}/s"
                f" {r['guarded_write_alone_rows_per_s']:>11,.0f}/s {label:>6}"
                f" {job['rows_per_s']:>8,.0f}/s"
                f" {job['rows_per_s'] / r['copy_plain_rows_per_s']:>6.2f}"
                f" {job['redis_script_us_per_row']:>7.2f} us/row {job['peak_rss_mb']:>6.0f} MB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250000,1000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mat-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # PostgreSQL runs as an unprivileged user when we are root
        with EmbeddedPostgres(work / "pg") as pg, EmbeddedRedis(work / "redis") as rds:
            repo = make_repo(work, pg.dsn)
            for size in sizes:
                results.append(asyncio.run(measure(size, pg.dsn, rds.url, repo)))
    print_table(results)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "benchmarks" / "results" / f"materialize-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "materialize",
                "date": stamp,
                "command": " ".join(sys.argv),
                "load_average_at_end": os.getloadavg(),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
