"""The hot-key cache: Zipf traffic with the cache on and off, and restarts with and without
pre-warm, in the same run.

    .venv/bin/python benchmarks/bench_hotcache.py [--users 1000000] [--iterations 2000]

Starts an embedded Redis, writes `--users` rows of user_profile, user_activity and
item_stats (as bench_lookup.py does), then two feature servers on the same Redis: one with
the cache (64 MiB, 5 s staleness) and one with --cache-bytes 0. Requests draw
user and item ids from a Zipf law (s = 1.1) over the `--users` written ids, 1 and 100
entities x 50 features (3 views: 3 keys per entity). Reported per server and size: hit
ratio (the server's own counters, from /metrics), p50/p99 sequential, throughput with 32
calls in flight. Then the cached server is restarted twice, with pre-warm (it reads the
hot set the first one published) and with --warm-budget-s 0, and the first 1,000 100x50
requests after SERVING are timed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from bench_lookup import FEATURES, applied_repo, process, write_rows
from harness import Stats, latency, print_table, run_on_uvloop, throughput, write_results

from featurestore import AsyncClient
from featurestore.embedded import EmbeddedRedis, free_port
from featurestore.registry import load_registry

ZIPF_S = 1.1


def zipf_batches(count: int, n: int, users: int, rng: np.random.Generator) -> list[Any]:
    """`count` entity batches of `n` rows, user and item ids Zipf(s) over [0, users)."""
    weights = np.arange(1, users + 1, dtype=np.float64) ** -ZIPF_S
    cdf = np.cumsum(weights / weights.sum())
    perm = rng.permutation(users)  # the hottest ids are spread over the id space

    def draw() -> list[int]:
        return perm[np.minimum(np.searchsorted(cdf, rng.random(n)), users - 1)].tolist()  # type: ignore[no-any-return]

    return [{"user_id": draw(), "item_id": draw()} for _ in range(count)]


def scrape(metrics_port: int) -> dict[str, float]:
    """The server's cache counters from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("featurestore_cache_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


ON = str(64 << 20)  # the cache's budget when on: 64 MiB (it is off by default)


@contextmanager
def server(repo: Path, url: str, *extra: str) -> Iterator[tuple[int, int]]:
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "featurestore", "serve", "--repo", str(repo), "--redis", url,
           "--host", "127.0.0.1", "--port", str(port), "--registry-refresh-s", "0",
           "--metrics-port", str(metrics_port), *extra]  # fmt: skip
    with process(cmd, port):
        yield port, metrics_port


async def measure(port: int, metrics_port: int, batches: dict[int, list[Any]],
                  iterations: int) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        await client.wait_until_serving(60)
        for n, pool in batches.items():
            it = iter(range(10**9))

            async def call(pool: list[Any] = pool, it: Iterator[int] = it) -> Any:
                return await client.get_online_features(pool[next(it) % len(pool)], FEATURES)

            before = scrape(metrics_port)
            stats = await latency(f"{n}x50", call, iterations=iterations, warmup=500)
            after = scrape(metrics_port)
            hits = after.get("featurestore_cache_hits_total", 0) - before.get(
                "featurestore_cache_hits_total", 0)  # fmt: skip
            misses = after.get("featurestore_cache_misses_total", 0) - before.get(
                "featurestore_cache_misses_total", 0)  # fmt: skip
            rate = await throughput(call, in_flight=32, duration_s=3.0)
            out[f"{n}x50"] = {"stats": stats, "hit_ratio": hits / max(hits + misses, 1),
                              "throughput_at_32": rate}  # fmt: skip
        out["cache_bytes"] = scrape(metrics_port).get("featurestore_cache_bytes", 0)
    return out


async def first_requests(port: int, pool: list[Any], count: int = 1000) -> dict[str, Any]:
    """Time to SERVING and the latencies of the first `count` calls after it."""
    start = time.perf_counter()
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        await client.wait_until_serving(60)
        serving_s = time.perf_counter() - start
        samples = np.empty(count, dtype=np.int64)
        for i in range(count):
            t0 = time.perf_counter_ns()
            await client.get_online_features(pool[i % len(pool)], FEATURES)
            samples[i] = time.perf_counter_ns() - t0
    return {"serving_after_s": serving_s, "first": Stats.of(f"first {count} 100x50", samples)}


async def run(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(11)
    batches = {n: zipf_batches(4000 if n == 1 else 2000, n, args.users, rng) for n in (1, 100)}
    with tempfile.TemporaryDirectory(prefix="bench-hotcache-") as tmp:
        workdir = Path(tmp)
        repo = applied_repo(workdir)
        registry = load_registry(repo)
        with EmbeddedRedis(workdir / "redis") as redis_server:
            url = redis_server.url
            started = time.perf_counter()
            await write_rows(url, registry, args.users)
            write_s = time.perf_counter() - started
            print(f"wrote {args.users} rows x 3 views in {write_s:.1f} s")
            results: dict[str, Any] = {"users": args.users, "zipf_s": ZIPF_S,
                                       "write_s": write_s}  # fmt: skip
            with server(repo, url, "--cache-bytes", "0") as (port, mport):
                results["cache_off"] = await measure(port, mport, batches, args.iterations)
            with server(repo, url, "--cache-bytes", ON, "--hot-publish-s", "1") as (port, mport):
                results["cache_on"] = await measure(port, mport, batches, args.iterations)
                await asyncio.sleep(1.5)  # one more publication of the hot set
            restart_pool = zipf_batches(1000, 100, args.users, np.random.default_rng(12))
            with server(repo, url, "--cache-bytes", ON) as (port, _):
                results["restart_prewarm"] = await first_requests(port, restart_pool)
            with server(repo, url, "--cache-bytes", ON, "--warm-budget-s", "0") as (port, _):
                results["restart_cold"] = await first_requests(port, restart_pool)
    rows = []
    for mode in ("cache_off", "cache_on"):
        for size in ("1x50", "100x50"):
            r = results[mode][size]
            rows.append({"name": f"{mode} {size}", "hit ratio": r["hit_ratio"],
                         "p50 ms": r["stats"].p50_ms, "p99 ms": r["stats"].p99_ms,
                         "calls/s @32": r["throughput_at_32"]})  # fmt: skip
    for mode in ("restart_prewarm", "restart_cold"):
        r = results[mode]
        rows.append({"name": f"{mode} first 1000 100x50", "p50 ms": r["first"].p50_ms,
                     "p99 ms": r["first"].p99_ms})  # fmt: skip
    print_table(rows, ["name", "hit ratio", "p50 ms", "p99 ms", "calls/s @32"])
    print("wrote", write_results("hotcache", results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    run_on_uvloop(run(args))


if __name__ == "__main__":
    main()
