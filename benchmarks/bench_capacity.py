"""Per-core costs of a lookup, for the capacity model (docs/capacity.md).

    .venv/bin/python benchmarks/bench_capacity.py [--users 100000] [--entities 1 10 100 1000]

The same store as bench_lookup.py (an embedded Redis with `--users` rows of user_profile,
user_activity and item_stats; one server process with the cache off, uniform ids), then
for each batch size and each number of calls in flight, a closed loop of `--duration-s`:

* calls/s and client-side p50/p99 (the client shares the 2 cores: a ceiling, not the
  server's limit);
* CPU seconds the server process and Redis spent per call (/proc/<pid>/stat; Redis's
  INFO cpu), which give lookups/s per core independent of what else runs;
* Redis commands per call and Redis's own microseconds per MGET (INFO commandstats), and
  bytes in and out of Redis and of gRPC per call;

and the stored size of a row of each view (STRLEN, MEMORY USAGE). Last, the Redis side of a
Redis Cluster read on one node: the 100 x 50 lookup's keys as one MGET, against the same
keys as one MGET per hash tag (an MGET must stay in one slot, and each entity has its
own tag), all pipelined: Redis CPU per lookup either way; and what one round trip costs
Redis (a 2-key MGET, from 1 and from 16 connections at once), which a cluster pays once
per node a lookup touches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from bench_lookup import FEATURES, VIEWS, entities, mget_keys, populated_store, process, serve_command
from harness import print_table, run_on_uvloop, write_results

from featurestore import AsyncClient
from featurestore.client.core import online_features_request
from featurestore.embedded import free_port
from featurestore.registry import Registry
from featurestore.store import keys

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def redis_counters(client: aioredis.Redis) -> dict[str, float]:
    """Redis's CPU seconds, commands, MGET microseconds and network bytes so far."""
    info = await client.info("all")
    mget = info.get("cmdstat_mget", {"calls": 0, "usec": 0})
    commands = sum(v["calls"] for k, v in info.items() if k.startswith("cmdstat_") and isinstance(v, dict))
    return {
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "commands": float(commands),
        "mget_calls": float(mget["calls"]),
        "mget_usec": float(mget["usec"]),
        "bytes_in": float(info["total_net_input_bytes"]),
        "bytes_out": float(info["total_net_output_bytes"]),
    }


async def closed_loop(client: AsyncClient, ents: dict[str, Any], in_flight: int, duration_s: float) -> np.ndarray:
    """Latencies (ns) of every call of `in_flight` callers looping for `duration_s`."""
    samples: list[int] = []
    stop_at = time.perf_counter() + duration_s
    clock = time.perf_counter_ns

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            start = clock()
            await client.get_online_features(ents, FEATURES)
            samples.append(clock() - start)

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return np.asarray(samples, dtype=np.int64)


async def measure(
    args: argparse.Namespace, registry: Registry, port: int, server_pid: int, url: str
) -> list[dict[str, Any]]:
    redis = aioredis.Redis.from_url(url)
    rows = []
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        for n in args.entities:
            ents = entities(registry, n, args.users, np.random.default_rng(n))
            request = online_features_request(ents, FEATURES, False)
            response = await client._stub.GetOnlineFeatures(request)
            for _ in range(200):  # warm-up
                await client.get_online_features(ents, FEATURES)
            for k in args.in_flight:
                before_server, before_redis = cpu_s(server_pid), await redis_counters(redis)
                started = time.perf_counter()
                samples = await closed_loop(client, ents, k, args.duration_s)
                wall_s = time.perf_counter() - started
                server_cpu = cpu_s(server_pid) - before_server
                after = await redis_counters(redis)
                delta = {key: after[key] - before_redis[key] for key in after}
                calls = len(samples)
                ms = samples / 1e6
                rows.append(
                    {
                        "entities": n,
                        "in_flight": k,
                        "calls": calls,
                        "calls_per_s": calls / wall_s,
                        "p50_ms": float(np.percentile(ms, 50)),
                        "p99_ms": float(np.percentile(ms, 99)),
                        "server_cpu_ms_per_call": 1e3 * server_cpu / calls,
                        "server_core_share": server_cpu / wall_s,
                        "redis_cpu_ms_per_call": 1e3 * delta["cpu_s"] / calls,
                        # INFO's own command counts itself once per read.
                        "redis_commands_per_call": (delta["commands"] - 1) / calls,
                        "mget_us_per_call": delta["mget_usec"] / max(delta["mget_calls"], 1),
                        "redis_bytes_in_per_call": delta["bytes_in"] / calls,
                        "redis_bytes_out_per_call": delta["bytes_out"] / calls,
                        "grpc_request_bytes": request.ByteSize(),
                        "grpc_response_bytes": response.ByteSize(),
                    }
                )
                print({key: round(value, 3) if isinstance(value, float) else value for key, value in rows[-1].items()})
    await redis.aclose()
    return rows


async def row_sizes(url: str, registry: Registry, sample: int = 200) -> dict[str, Any]:
    """Stored bytes per row of each view: the value (STRLEN) and the key with its overhead (MEMORY USAGE)."""
    redis = aioredis.Redis.from_url(url)
    sizes: dict[str, Any] = {}
    for view in VIEWS:
        row_keys = keys.row_keys(registry.project, view, keys.entity_tokens([list(range(sample))]))
        values = [await redis.strlen(k) for k in row_keys]
        usage = [await redis.memory_usage(k, samples=0) for k in row_keys]
        sizes[view] = {
            "features": len(registry.views[view].layout.features),
            "value_bytes": float(np.mean(values)),
            "memory_usage_bytes": float(np.mean([u or 0 for u in usage])),
        }
    info = await redis.info("memory")
    sizes["used_memory_bytes"] = info["used_memory"]
    sizes["keys"] = await redis.dbsize()
    await redis.aclose()
    return sizes


def by_tag(row_keys: list[bytes]) -> list[list[bytes]]:
    """`row_keys` grouped by their hash tag (the text between the braces), in first-seen order."""
    groups: dict[bytes, list[bytes]] = {}
    for key in row_keys:
        groups.setdefault(key[key.index(b"{") + 1 : key.rindex(b"}")], []).append(key)
    return list(groups.values())


async def split_cost(url: str, registry: Registry, users: int, repeats: int) -> dict[str, Any]:
    """Redis CPU per 100 x 50 lookup: one MGET of every key, or one pipelined MGET per hash tag."""
    redis = aioredis.Redis.from_url(url)
    row_keys = mget_keys(registry, entities(registry, 100, users, np.random.default_rng(100)))
    groups = by_tag(row_keys)

    async def whole() -> None:
        await redis.mget(row_keys)

    async def split() -> None:
        pipe = redis.pipeline(transaction=False)
        for group in groups:
            pipe.mget(group)
        await pipe.execute()

    cpu = {"one MGET": 0.0, "MGET per tag": 0.0}
    for _ in range(5):  # alternating blocks: both modes see the same machine
        for name, call in (("one MGET", whole), ("MGET per tag", split)):
            before = (await redis_counters(redis))["cpu_s"]
            for _ in range(repeats // 5):
                await call()
            cpu[name] += (await redis_counters(redis))["cpu_s"] - before
    await redis.aclose()
    whole_ms, split_ms = (1e3 * cpu[name] / repeats for name in ("one MGET", "MGET per tag"))
    return {
        "keys": len(row_keys),
        "tags": len(groups),
        "one_mget_redis_cpu_ms": whole_ms,
        "mget_per_tag_redis_cpu_ms": split_ms,
        "ratio": split_ms / whole_ms,
        "us_per_extra_command": 1e3 * (split_ms - whole_ms) / (len(groups) - 1),
    }


async def round_trip_cost(url: str, registry: Registry, repeats: int) -> dict[str, float]:
    """Redis CPU per round trip of a 2-key MGET (one entity's two user views), 1 and 16 connections."""
    redis = aioredis.Redis.from_url(url, max_connections=16)
    row_keys = by_tag(mget_keys(registry, entities(registry, 1, 1000, np.random.default_rng(1))))[0]
    out = {}
    for connections in (1, 16):

        async def caller(count: int) -> None:
            for _ in range(count):
                await redis.mget(row_keys)

        before = (await redis_counters(redis))["cpu_s"]
        await asyncio.gather(*(caller(repeats // connections) for _ in range(connections)))
        spent = (await redis_counters(redis))["cpu_s"] - before
        out[f"us_per_round_trip_{connections}_connections"] = 1e6 * spent / (repeats // connections * connections)
    await redis.aclose()
    return out


async def run(args: argparse.Namespace) -> None:
    async with populated_store("capacity", args.users) as (repo, registry, url):
        port = free_port()
        with process(serve_command(repo, url, port), port) as server:
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                await client.wait_until_serving(60)
            # With one worker, `featurestore serve` serves in its own process: server.pid.
            rows = await measure(args, registry, port, server.pid, url)
        sizes = await row_sizes(url, registry)
        split = await split_cost(url, registry, args.users, args.split_repeats)
        split.update(await round_trip_cost(url, registry, 5 * args.split_repeats))
    columns = [
        "entities",
        "in_flight",
        "calls_per_s",
        "p50_ms",
        "p99_ms",
        "server_cpu_ms_per_call",
        "server_core_share",
        "redis_cpu_ms_per_call",
        "redis_commands_per_call",
        "mget_us_per_call",
        "redis_bytes_out_per_call",
        "grpc_response_bytes",
    ]
    print_table(rows, columns)
    print(sizes)
    print(split)
    results = {"config": vars(args), "lookups": rows, "row_sizes": sizes, "split_per_tag": split}
    print("wrote", write_results("capacity", results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--entities", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--split-repeats", type=int, default=2000, help="lookups per mode in the split measurement")
    args = parser.parse_args()
    sys.setrecursionlimit(10_000)
    run_on_uvloop(run(args))


if __name__ == "__main__":
    main()
