"""Lookup latency and throughput through gRPC, against floors measured in the same run.

    .venv/bin/python benchmarks/bench_lookup.py [--users 100000] [--iterations 2000]
                                                [--redis-delay-ms 0.25] [--cache-mib 256]

Starts an embedded Redis, writes `--users` rows of user_profile and user_activity and as
many item_stats rows (encode_rows + guarded_write, as materialization does), starts the
feature server in its own process and measures from this process, with the Python
AsyncClient: 1, 100 and 1,000 entities x 50 features (user_profile 24 + user_activity 23
+ 3 of item_stats: three views, so 3 keys per entity), sequential and with 8/32/64 calls
in flight. Floors, same run: a bare grpc.aio echo (own process) returning as many bytes
as the lookup's response, and a redis.asyncio MGET of the same keys; floor = echo + MGET.
Beside them: the same echo on the classic threaded `grpc.server` (is it the faster
server here?), and the lookup followed by `to_dict()` (the client turns every column into
arrays; a plain lookup decodes a column on first access).

`--redis-delay-ms D` puts Redis behind benchmarks/relay.py (D ms each way, a relay per
server; the MGET floor goes through the first one; the rows are written direct).
`--cache-mib M` starts a second server with the hot-key cache and measures the same
lookups on both in alternating blocks of 100: every call repeats its size's entities, so
after the first call every row is cached (the cache's best case: no Redis round trip).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from grpc import aio
from harness import Stats, latency, print_table, run_on_uvloop, side_by_side, throughput, write_results
from relay import Hop, add_delay_option, redis_hop

from featurestore import AsyncClient
from featurestore.client.core import online_features_request
from featurestore.embedded import EmbeddedRedis, free_port
from featurestore.registry import Registry, load_registry
from featurestore.store import keys
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ["user_profile", "user_activity", "item_stats:price", "item_stats:category", "item_stats:rating_avg"]
VIEWS = ("user_profile", "user_activity", "item_stats")
ENV = {
    "FEATURESTORE_PG_HOST": "127.0.0.1",
    "FEATURESTORE_PG_PORT": "5432",
    "FEATURESTORE_PG_DB": "postgres",
    "FEATURESTORE_PG_USER": "postgres",
    "FEATURESTORE_PG_PASSWORD": "",
    "FEATURESTORE_FEAST_REDIS": "127.0.0.1:6379",
}


def applied_repo(workdir: Path) -> Path:
    """A copy of feature_repo/ with `feast apply` run (the registry needs no database)."""
    repo = workdir / "feature_repo"
    shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    feast = Path(sys.executable).parent / "feast"
    subprocess.run([str(feast), "apply"], cwd=repo, check=True, capture_output=True, env={**os.environ, **ENV})
    return repo


def _columns(registry: Registry, view: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for spec in registry.views[view].layout.features:
        if spec.fixed:
            shape = (n, spec.length) if spec.length else n
            columns[spec.name] = (rng.random(shape) * 100).astype(spec.dtype.element)
        else:
            columns[spec.name] = [f"{spec.name[:4]}-{i % 97}" for i in range(n)]
    return columns


async def write_rows(redis_url: str, registry: Registry, count: int, chunk: int = 2000) -> None:
    """`count` rows of each view, ids 0..count-1, in pipelined guarded writes."""
    client = aioredis.Redis.from_url(redis_url)
    rng = np.random.default_rng(1)
    now_us = int(time.time() * 1e6)
    sha: list[str] = []
    for view in VIEWS:
        for start in range(0, count, chunk):
            ids = list(range(start, min(start + chunk, count)))
            rows = encode_rows(
                registry.views[view].layout, np.full(len(ids), now_us), _columns(registry, view, len(ids), rng)
            )
            row_keys = keys.row_keys(registry.project, view, keys.entity_tokens([ids]))
            await guarded_write(client, [(row_keys, rows)], 0, sha)
    await client.aclose()


@contextmanager
def process(
    cmd: list[str], port: int, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` (in `env`, default ours, plus the Feast variables; in `cwd`) until it
    listens on `port`; stop it after. (`python -m` puts the working folder first on
    sys.path, ahead of PYTHONPATH: a server of another checkout must run in it.)"""
    proc = subprocess.Popen(cmd, env={**(env or os.environ), **ENV}, cwd=cwd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {proc.returncode}")
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def serve_command(repo: Path, url: str, port: int, *extra: str) -> list[str]:
    """`featurestore serve` on loopback for a benchmark: no registry or index refresh, and
    no hot-key cache unless `extra` gives one (argparse takes the last value;
    bench_hotcache measures the cache)."""
    return [
        sys.executable,
        "-m",
        "featurestore.cli",  # python -m featurestore.cli: the `featurestore` command
        "serve",
        "--repo",
        str(repo),
        "--redis",
        url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--registry-refresh-s",
        "0",
        "--index-refresh-s",
        "0",
        "--cache-bytes",
        "0",
        *extra,
    ]


@asynccontextmanager
async def populated_store(
    name: str, users: int, prepare: Callable[[Path], None] | None = None
) -> AsyncIterator[tuple[Path, Registry, str]]:
    """A temporary applied copy of feature_repo/ (`prepare` may change it first) and an
    embedded Redis holding `users` rows of every view: (repo, registry, Redis URL)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        workdir = Path(tmp)
        repo = applied_repo(workdir)
        if prepare is not None:
            prepare(repo)
        registry = load_registry(repo)
        with EmbeddedRedis(workdir / "redis") as redis_server:
            started = time.perf_counter()
            await write_rows(redis_server.url, registry, users)
            print(f"wrote {users} rows x {len(VIEWS)} views in {time.perf_counter() - started:.1f} s")
            yield repo, registry, redis_server.url


def entities(registry: Registry, n: int, users: int, rng: np.random.Generator) -> dict[str, Any]:
    return {"user_id": rng.integers(0, users, n), "item_id": rng.integers(0, users, n)}


def mget_keys(registry: Registry, ents: dict[str, Any]) -> list[bytes]:
    out: list[bytes] = []
    for view in VIEWS:
        column = ents["item_id" if view == "item_stats" else "user_id"].tolist()
        out += keys.row_keys(registry.project, view, keys.entity_tokens([column]))
    return out


async def measure_size(
    args: argparse.Namespace,
    registry: Registry,
    servers: dict[str, tuple[int, Hop]],
    echo_ports: tuple[int, int],
    n: int,
) -> dict[str, Any]:
    """Lookup, echo floors (grpc.aio, threaded grpc.server) and MGET floor for `n` entities;
    sequential latencies; with a cached server, lookups on both servers side by side."""
    rng = np.random.default_rng(n)
    ents = entities(registry, n, args.users, rng)
    iterations = args.iterations if n <= 100 else max(args.iterations // 5, 200)
    server_port, hop = servers["cache_off"]
    target = f"127.0.0.1:{server_port}"
    async with (
        AsyncClient(target) as client,
        aio.insecure_channel(
            f"127.0.0.1:{echo_ports[0]}", options=[("grpc.max_receive_message_length", -1)]
        ) as echo_channel,
        aio.insecure_channel(
            f"127.0.0.1:{echo_ports[1]}", options=[("grpc.max_receive_message_length", -1)]
        ) as threaded_channel,
    ):
        request = online_features_request(ents, FEATURES, False)
        stub_response = await client._stub.GetOnlineFeatures(request)
        sizes = (request.ByteSize(), stub_response.ByteSize())
        echo = echo_channel.unary_unary("/bench.Echo/Echo")
        threaded_echo = threaded_channel.unary_unary("/bench.Echo/Echo")
        payload = sizes[1].to_bytes(8, "little") + bytes(max(sizes[0] - 8, 0))
        redis = aioredis.Redis.from_url(hop.url)
        row_keys = mget_keys(registry, ents)

        async def lookup() -> Any:
            return await client.get_online_features(ents, FEATURES)

        async def lookup_to_dict() -> Any:
            return (await client.get_online_features(ents, FEATURES)).to_dict()

        async def echo_call() -> Any:
            return await echo(payload)

        async def threaded_echo_call() -> Any:
            return await threaded_echo(payload)

        async def mget_call() -> Any:
            return await redis.mget(row_keys)

        if "cache_on" in servers:
            sides = await lookups_side_by_side(servers, ents, iterations)
            stats = {"lookup": sides["cache_off"].stats, "lookup_cache_on": sides["cache_on"].stats}
        else:
            stats = {"lookup": await latency(f"lookup {n}x50", lookup, iterations=iterations)}
        stats["lookup_to_dict"] = await latency(f"lookup {n}x50 + to_dict()", lookup_to_dict, iterations=iterations)
        stats["echo"] = await latency(f"echo {sizes[1]} B", echo_call, iterations=iterations)
        stats["threaded_echo"] = await latency(
            f"echo {sizes[1]} B, threaded grpc.server", threaded_echo_call, iterations=iterations
        )
        stats["mget"] = await latency(f"MGET {len(row_keys)} keys", mget_call, iterations=iterations)
        rates = {}
        if n == 100:
            for k in (8, 32, 64):
                rates[f"lookup@{k}"] = await throughput(lookup, in_flight=k)
                rates[f"echo@{k}"] = await throughput(echo_call, in_flight=k)
        await redis.aclose()
    out = {"entities": n, "request_bytes": sizes[0], "response_bytes": sizes[1], "stats": stats, "throughput": rates}
    if "cache_on" in servers:
        out["no_trip_share"] = {mode: side.no_trip_share for mode, side in sides.items()}
    return out


async def lookups_side_by_side(servers: dict[str, tuple[int, Hop]], ents: dict[str, Any], iterations: int) -> Any:
    """The same lookup on every server in alternating blocks of 100 (harness.side_by_side)."""
    n = len(ents["user_id"])
    async with (
        AsyncClient(f"127.0.0.1:{servers['cache_off'][0]}") as off,
        AsyncClient(f"127.0.0.1:{servers['cache_on'][0]}") as on,
    ):
        clients = {"cache_off": off, "cache_on": on}
        calls = {mode: (lambda e, c=c: c.get_online_features(e, FEATURES)) for mode, c in clients.items()}
        trips = {mode: hop.chunks_sent for mode, (_, hop) in servers.items() if hop.relay}
        sides = await side_by_side(calls, lambda: ents, iterations=iterations, trips=trips)
    return {
        mode: replace(side, stats=replace(side.stats, name=f"lookup {n}x50 {mode}")) for mode, side in sides.items()
    }


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        s: dict[str, Stats] = r["stats"]
        floor_p50 = s["echo"].p50_ms + s["mget"].p50_ms
        floor_p99 = s["echo"].p99_ms + s["mget"].p99_ms
        for key in ("lookup", "lookup_cache_on", "lookup_to_dict", "echo", "threaded_echo", "mget"):
            if key in s:
                rows.append(
                    {"name": s[key].name, "p50 ms": s[key].p50_ms, "p99 ms": s[key].p99_ms, "p99.9 ms": s[key].p999_ms}
                )
        if "lookup_cache_on" in s:
            on, off = s["lookup_cache_on"], s["lookup"]
            rows.append(
                {"name": "  cache off / on", "p50 ms": off.p50_ms / on.p50_ms, "p99 ms": off.p99_ms / on.p99_ms}
            )
            if r["no_trip_share"]["cache_on"] is not None:
                rows.append({"name": "  calls with no Redis trip, cache on", "p50 ms": r["no_trip_share"]["cache_on"]})
        rows.append({"name": f"  floor {r['entities']} (echo+MGET)", "p50 ms": floor_p50, "p99 ms": floor_p99})
        rows.append(
            {
                "name": "  lookup / floor",
                "p50 ms": s["lookup"].p50_ms / floor_p50,
                "p99 ms": s["lookup"].p99_ms / floor_p99,
            }
        )
        r["floor"] = {
            "p50_ms": floor_p50,
            "p99_ms": floor_p99,
            "ratio_p50": s["lookup"].p50_ms / floor_p50,
            "ratio_p99": s["lookup"].p99_ms / floor_p99,
        }
    return rows


async def run(args: argparse.Namespace) -> None:
    async with populated_store("lookup", args.users) as (repo, registry, url):
        modes = {"cache_off": ("--cache-bytes", "0")}
        if args.cache_mib:
            modes["cache_on"] = ("--cache-bytes", str(args.cache_mib << 20))
        with ExitStack() as stack:
            servers: dict[str, tuple[int, Hop]] = {}
            for mode, extra in modes.items():  # each behind a relay of its own (none at 0 ms)
                hop = stack.enter_context(redis_hop(url, args.redis_delay_ms))
                port = free_port()
                stack.enter_context(process(serve_command(repo, hop.url, port, *extra), port))
                servers[mode] = (port, hop)
            echo_ports = (free_port(), free_port())
            echo = [sys.executable, str(Path(__file__).parent / "echo_server.py")]
            stack.enter_context(process([*echo, str(echo_ports[0])], echo_ports[0]))
            stack.enter_context(process([*echo, str(echo_ports[1]), "--threaded"], echo_ports[1]))
            for port, _ in servers.values():
                async with AsyncClient(f"127.0.0.1:{port}") as client:
                    await client.wait_until_serving(60)
            results = [await measure_size(args, registry, servers, echo_ports, n) for n in args.entities]
    rows = summarize(results)
    print_table(rows, ["name", "p50 ms", "p99 ms", "p99.9 ms"])
    for r in results:
        for name, rate in r["throughput"].items():
            print(f"throughput {r['entities']}x50 {name} in flight: {rate:.0f} calls/s")
    if args.redis_delay_ms:
        print(f"Redis behind relay.py, {args.redis_delay_ms} ms each way (the MGET floor too)")
    config = {"redis_delay_ms": args.redis_delay_ms, "cache_mib": args.cache_mib}
    print("wrote", write_results("lookup", {"config": config, "results": results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--entities", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument(
        "--cache-mib", type=int, default=0, help="also a server with this hot-key cache, side by side (0: none)"
    )
    add_delay_option(parser)
    args = parser.parse_args()
    run_on_uvloop(run(args))


if __name__ == "__main__":
    main()
