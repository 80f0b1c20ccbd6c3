"""Beyond one machine: a Redis Cluster against one Redis, sharded materialization against one
run, and a master's failover, each measured against its twin in the same run.

    .venv/bin/python benchmarks/bench_cluster.py lookup   [--users 100000] [--iterations 2000]
    .venv/bin/python benchmarks/bench_cluster.py shards   [--rows 1000000] [--shards 2]
    .venv/bin/python benchmarks/bench_cluster.py failover [--kills 3] [--node-timeout-ms 1000]
    .venv/bin/python benchmarks/bench_cluster.py all

lookup    One embedded Redis and one embedded Redis Cluster (3 masters + 3 replicas, all on
          this machine) hold the same `--users` rows of the three views bench_lookup reads;
          one `featurestore serve` process per store (no hot-key cache); 100 x 50 lookups
          from this process, the two servers' calls alternating one by one (so noise hits
          both alike), then the same for the bare reads under them (RedisPipe MGET against
          ClusterPipe's per-slot MGETs on every master). Targets: cluster / one Redis
          p50 <= 1.3x, p99 <= 1.5x.
shards    The bench_wide view of bench_materialize (50 float8 features) with `--rows`
          entities in an embedded PostgreSQL; `featurestore-materialize backfill` into an
          embedded Redis, once unsharded, then as `--shards` processes side by side
          (`--shard i/N`), alternating `--rounds` times, with an index on the shard hash (unless
          --no-hash-index). Rows/s of the side-by-side runs = all rows /
          (last exit - first start of a timed part); the CPU seconds that the jobs
          (Python), PostgreSQL and Redis spent on each, to say what limits it. Target:
          2 shards >= 1.6x one run.
failover  An embedded cluster, a server with no cache, 100 x 50 lookups in a loop; a master
          is killed (SIGKILL) and the time until lookups answer again is measured, with
          no restart of anything; the node is restarted (it rejoins as a replica) before
          the next kill. Target: <= 5 s.

Results go to benchmarks/results/cluster-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import redis
from bench_lookup import FEATURES, VIEWS, _columns, applied_repo, entities, mget_keys, process, serve_command
from harness import Stats, print_table, run_on_uvloop, throughput, write_results

from featurestore import AsyncClient
from featurestore.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedRedisCluster, free_port
from featurestore.errors import Unavailable
from featurestore.registry import Registry, load_registry
from featurestore.store import keys
from featurestore.store.layout import encode_rows
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import connect, guarded_write
from materialize.source import shard_hash_sql

ROOT = Path(__file__).resolve().parent.parent
MATERIALIZE = str(Path(sys.executable).parent / "featurestore-materialize")


async def write_rows(url: str, registry: Registry, count: int, chunk: int = 4000) -> None:
    """`count` rows of each of bench_lookup's views (ids 0..count-1), on one Redis or a cluster."""
    client = connect(url, timeout_s=30)
    rng = np.random.default_rng(1)
    now_us = int(time.time() * 1e6)
    sha: list[str] = []
    try:
        for view in VIEWS:
            layout = registry.views[view].layout
            for start in range(0, count, chunk):
                ids = list(range(start, min(start + chunk, count)))
                rows = encode_rows(layout, np.full(len(ids), now_us), _columns(registry, view, len(ids), rng))
                row_keys = keys.row_keys(registry.project, view, keys.entity_tokens([ids]))
                await guarded_write(client, [(row_keys, rows)], 0, sha)
    finally:
        await client.aclose()


async def alternating(
    calls: dict[str, Callable[[], Awaitable[Any]]], iterations: int, warmup: int = 200
) -> dict[str, Stats]:
    """Latency of each call, the calls taking turns one by one (A, B, A, B, ...)."""
    for _ in range(warmup):
        for call in calls.values():
            await call()
    samples = {name: np.empty(iterations, dtype=np.int64) for name in calls}
    clock = time.perf_counter_ns
    for i in range(iterations):
        for name, call in calls.items():
            start = clock()
            await call()
            samples[name][i] = clock() - start
    return {name: Stats.of(name, s) for name, s in samples.items()}


# lookup ------------------------------------------------------------------------------------


async def bench_lookup(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        repo = applied_repo(work)
        registry = load_registry(repo)
        with EmbeddedRedis(work / "redis") as one, EmbeddedRedisCluster(work / "cluster") as cluster:
            urls = {"one Redis": one.url, "cluster": cluster.url}
            for url in urls.values():
                started = time.perf_counter()
                await write_rows(url, registry, args.users)
                print(
                    f"wrote {args.users} rows x {len(VIEWS)} views into {url} in {time.perf_counter() - started:.1f} s"
                )
            ports = {name: free_port() for name in urls}
            with contextlib.ExitStack() as servers:
                for name, url in urls.items():
                    servers.enter_context(process(serve_command(repo, url, ports[name]), ports[name]))
                return await _measure_lookups(args, registry, urls, ports)


async def _measure_lookups(
    args: argparse.Namespace, registry: Registry, urls: dict[str, str], ports: dict[str, int]
) -> dict[str, Any]:
    clients = {name: AsyncClient(f"127.0.0.1:{port}") for name, port in ports.items()}
    pipes = {name: RedisPipe.from_url(url) for name, url in urls.items()}
    try:
        for client in clients.values():
            await client.wait_until_serving(60)
        rng = np.random.default_rng(100)
        batches = [entities(registry, 100, args.users, rng) for _ in range(64)]
        turn = {name: 0 for name in urls}

        def lookup(name: str) -> Callable[[], Awaitable[Any]]:
            async def call() -> Any:
                turn[name] += 1  # both servers see the same entities, in the same order
                return await clients[name].get_online_features(batches[turn[name] % 64], FEATURES)

            return call

        def read(name: str) -> Callable[[], Awaitable[Any]]:
            row_keys = [mget_keys(registry, b) for b in batches]

            async def call() -> Any:
                turn[name] += 1
                return await pipes[name].execute(b"MGET", *row_keys[turn[name] % 64])

            return call

        lookups = await alternating({n: lookup(n) for n in urls}, args.iterations)
        reads = await alternating({n: read(n) for n in urls}, args.iterations)
        rates = {name: await throughput(lookup(name), in_flight=32) for name in urls}
    finally:
        for client in clients.values():
            await client.close()
        for pipe in pipes.values():
            await pipe.close()
    rows = []
    for label, stats in (("lookup 100x50", lookups), ("MGET 300 keys", reads)):
        for name, s in stats.items():
            rows.append({"name": f"{label}, {name}", "p50 ms": s.p50_ms, "p99 ms": s.p99_ms, "p99.9 ms": s.p999_ms})
        one, cl = stats["one Redis"], stats["cluster"]
        rows.append(
            {"name": f"  {label}: cluster / one", "p50 ms": cl.p50_ms / one.p50_ms, "p99 ms": cl.p99_ms / one.p99_ms}
        )
    print_table(rows, ["name", "p50 ms", "p99 ms", "p99.9 ms"])
    for name, rate in rates.items():
        print(f"throughput 100x50, 32 in flight, {name}: {rate:.0f} calls/s")
    one, cl = lookups["one Redis"], lookups["cluster"]
    return {
        "users": args.users,
        "iterations": args.iterations,
        "lookups": lookups,
        "reads": reads,
        "throughput_32": rates,
        "ratio_p50": cl.p50_ms / one.p50_ms,
        "ratio_p99": cl.p99_ms / one.p99_ms,
    }


# shards ------------------------------------------------------------------------------------


def _postgres_cpu_s(pid: int) -> float:
    """CPU seconds of the postmaster and the backends it reaped (which served the jobs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def _redis_cpu_s(client: redis.Redis) -> float:
    info: Any = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _jobs(repo: Path, dsn: str, url: str, start: datetime, end: datetime, shards: int) -> dict[str, Any]:
    """Run the backfill as `shards` processes side by side (1: unsharded); rows/s over the
    union of their timed parts, and each process's summary."""
    base = [MATERIALIZE, "--repo", str(repo), "--dsn", dsn, "--redis", url, "--views", "bench_wide"]
    window = ["backfill", "--start", start.isoformat(), "--end", end.isoformat()]
    commands = [base + window] if shards == 1 else [[*base, "--shard", f"{i}/{shards}", *window] for i in range(shards)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for cmd in commands]
    ended: dict[int, float] = {}
    while len(ended) < len(procs):
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.perf_counter()
        time.sleep(0.005)
    runs = []
    for i, proc in enumerate(procs):
        out, err = (b.decode() for b in proc.communicate())
        if proc.returncode != 0:
            raise SystemExit(f"job failed ({proc.returncode}): {err}")
        m = re.search(r"read (\d+) rows, wrote (\d+), skipped \d+ as older, in ([\d.]+) s", out)
        assert m, out
        runs.append({"read": int(m[1]), "written": int(m[2]), "seconds": float(m[3]), "ended": ended[i]})
    first_start = min(r["ended"] - r["seconds"] for r in runs)
    span = max(r["ended"] for r in runs) - first_start
    rows = sum(r["read"] for r in runs)
    return {"shards": shards, "rows": rows, "span_s": span, "rows_per_s": rows / span, "runs": runs}


def _measured(
    repo: Path, pg: EmbeddedPostgres, rds: EmbeddedRedis, start: datetime, end: datetime, n: int
) -> dict[str, Any]:
    client = redis.Redis.from_url(rds.url)
    client.flushdb()
    assert pg._proc is not None
    cpu = (_children_cpu_s(), _postgres_cpu_s(pg._proc.pid), _redis_cpu_s(client))
    result = _jobs(repo, pg.dsn, rds.url, start, end, n)
    after = (_children_cpu_s(), _postgres_cpu_s(pg._proc.pid), _redis_cpu_s(client))
    jobs_s, postgres_s, redis_s = (b - a for a, b in zip(cpu, after, strict=True))
    client.close()
    result["cpu_s"] = {"jobs (Python, incl. start-up)": jobs_s, "PostgreSQL": postgres_s, "Redis": redis_s}
    result["cores_busy"] = (jobs_s + postgres_s + redis_s) / result["span_s"]
    return result


async def _index_hash(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE INDEX ON bench_wide (({shard_hash_sql(['user_id'], alias='')}))")
        await conn.execute("ANALYZE bench_wide")
    finally:
        await conn.close()


def bench_shards(args: argparse.Namespace) -> dict[str, Any]:
    from bench_materialize import GenerateOptions, generate, make_repo

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # PostgreSQL runs as an unprivileged user when we are root
        with EmbeddedPostgres(work / "pg") as pg, EmbeddedRedis(work / "redis") as rds:
            repo = make_repo(work, pg.dsn)
            registry = load_registry(repo)
            now = datetime.now(UTC)
            options = GenerateOptions(users=args.rows, versions=1, stale_fraction=0.0, chunk_rows=100_000)
            asyncio.run(generate(pg.dsn, registry, options, views=["bench_wide"], now=now))
            if args.hash_index:  # what README "Sharded materialization" advises for large tables
                asyncio.run(_index_hash(pg.dsn))
            start, end = now - timedelta(days=40), now + timedelta(seconds=1)
            _jobs(repo, pg.dsn, rds.url, start, end, 1)  # PostgreSQL's cache warm for both
            rounds = []
            for _ in range(args.rounds):
                rounds.append({"one": _measured(repo, pg, rds, start, end, 1)})
                rounds[-1]["sharded"] = _measured(repo, pg, rds, start, end, args.shards)
    table = []
    for i, r in enumerate(rounds):
        for label in ("one", "sharded"):
            m = r[label]
            cpu = m["cpu_s"]
            table.append(
                {
                    "run": f"round {i + 1}, {m['shards']} process(es)",
                    "rows/s": m["rows_per_s"],
                    "span s": m["span_s"],
                    "jobs CPU s": cpu["jobs (Python, incl. start-up)"],
                    "PostgreSQL CPU s": cpu["PostgreSQL"],
                    "Redis CPU s": cpu["Redis"],
                    "cores busy": m["cores_busy"],
                }
            )
        table.append(
            {"run": f"  round {i + 1}: sharded / one", "rows/s": r["sharded"]["rows_per_s"] / r["one"]["rows_per_s"]}
        )
    print_table(table, ["run", "rows/s", "span s", "jobs CPU s", "PostgreSQL CPU s", "Redis CPU s", "cores busy"])
    ratios = [r["sharded"]["rows_per_s"] / r["one"]["rows_per_s"] for r in rounds]
    return {"rows": args.rows, "shards": args.shards, "hash_index": args.hash_index, "rounds": rounds, "ratios": ratios}


# failover ----------------------------------------------------------------------------------


async def bench_failover(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        work = Path(tmp)
        repo = applied_repo(work)
        registry = load_registry(repo)
        with EmbeddedRedisCluster(work / "cluster", node_timeout_ms=args.node_timeout_ms) as cluster:
            await write_rows(cluster.url, registry, args.users)
            for port in cluster.master_ports():  # the replicas hold every row
                with redis.Redis(host="127.0.0.1", port=port) as node:
                    node.execute_command("WAIT", 1, 10_000)
            port = free_port()
            with process(serve_command(repo, cluster.url, port), port):
                async with AsyncClient(f"127.0.0.1:{port}", timeout_s=2.0) as client:
                    await client.wait_until_serving(60)
                    kills = [await _one_failover(cluster, client, registry, args, k) for k in range(args.kills)]
    for k in kills:
        recovered, failed = k["recovered_s"], k["failed_calls"]
        print(f"kill {k['port']}: lookups answered again after {recovered:.2f} s ({failed} failed calls)")
    return {"node_timeout_ms": args.node_timeout_ms, "kills": kills}


async def _one_failover(
    cluster: EmbeddedRedisCluster, client: AsyncClient, registry: Registry, args: argparse.Namespace, k: int
) -> dict[str, Any]:
    ents = entities(registry, 100, args.users, np.random.default_rng(k))
    for _ in range(50):
        await client.get_online_features(ents, FEATURES)
    victim = cluster.master_ports()[k % 3]
    cluster.kill(victim)
    killed, failed, first_failure = time.perf_counter(), 0, None
    while True:
        try:
            await client.get_online_features(ents, FEATURES)
        except Unavailable:
            failed += 1
            first_failure = first_failure or time.perf_counter() - killed
            if time.perf_counter() - killed > 60:
                raise SystemExit("lookups did not recover within 60 s") from None
            continue
        if failed:
            break
    recovered = time.perf_counter() - killed
    cluster.restart(victim)  # it rejoins as a replica of its successor
    cluster.wait_ok(60)
    return {"port": victim, "recovered_s": recovered, "first_failure_s": first_failure, "failed_calls": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["lookup", "shards", "failover", "all"])
    parser.add_argument("--users", type=int, default=100_000, help="rows per view (lookup, failover)")
    parser.add_argument("--iterations", type=int, default=2000, help="lookups per store (lookup)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="entities of bench_wide (shards)")
    parser.add_argument("--shards", type=int, default=2, help="processes side by side (shards)")
    parser.add_argument("--rounds", type=int, default=3, help="one run, then the shards, this many times (shards)")
    parser.add_argument(
        "--no-hash-index", dest="hash_index", action="store_false", help="no index on the shard hash (shards)"
    )
    parser.add_argument("--kills", type=int, default=3, help="masters killed one after another (failover)")
    parser.add_argument("--node-timeout-ms", type=int, default=1000, help="cluster-node-timeout (failover)")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.what in ("lookup", "all"):
        results["lookup"] = run_on_uvloop(bench_lookup(args))
    if args.what in ("shards", "all"):
        results["shards"] = bench_shards(args)
    if args.what in ("failover", "all"):
        args.users = min(args.users, 20_000)
        results["failover"] = run_on_uvloop(bench_failover(args))
    print("wrote", write_results("cluster", results))


if __name__ == "__main__":
    main()
