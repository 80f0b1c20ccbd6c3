"""SearchSimilar through the server, against raw FAISS and a plain lookup in the same run.

    nice -n 10 .venv/bin/python benchmarks/bench_search.py [--n 1000000] [--iterations 2000]

Starts an embedded Redis, writes `--n` clustered 64-d vectors into `item_embedding`
(encode_rows + guarded_write, as materialization does), starts the feature server in its
own process (`featurestore serve`, default index settings: HNSW at >= 50,000 vectors,
one OpenMP thread) and measures from this process with the Python AsyncClient:

    search 1q           SearchSimilar, one query, k=10, sequential
    faiss 1q            the same search straight into an identical index built in this
                        process (EmbeddingIndex.search): the floor of a search
    lookup 1 entity     a plain GetOnlineFeatures of one entity: the floor of a call
    throughput          queries/s: single-query calls with 32 in flight (coalesced by the
                        server), and calls of 64 queries with 4 in flight
    update              10,000 changed items written (guarded writes) and announced with
                        the materializer's `publish_written`, while 8 callers search
                        without pause: seconds from the announcement (and from the first
                        write) to the first answer from the new index generation, and
                        the number of failed searches; once announced with the written
                        ids (what the materializer sends: the server reads those keys),
                        once without (an older materializer: the server re-reads the view)
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from bench_lookup import applied_repo, process, serve_command
from bench_retrieval import clustered
from harness import Stats, latency, print_table, run_on_uvloop, throughput, write_results

from featurestore import AsyncClient
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.embedded import EmbeddedRedis, free_port
from featurestore.registry import Registry, load_registry
from featurestore.retrieval.index import EmbeddingIndex
from featurestore.retrieval.spec import IndexConfig
from featurestore.store import keys
from featurestore.store.events import publish_written
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write

VIEW, DIM, K, CLUSTERS = "item_embedding", 64, 10, 1000
F32 = npt.NDArray[np.float32]


async def write_vectors(
    client: aioredis.Redis, registry: Registry, ids: npt.NDArray[np.int64], vectors: F32, chunk: int = 10_000
) -> None:
    """Rows of item_embedding in pipelined guarded writes, as materialization writes them."""
    layout = registry.views[VIEW].layout
    now_us = int(time.time() * 1e6)
    sha: list[str] = []
    for start in range(0, ids.shape[0], chunk):
        part = ids[start : start + chunk]
        rows = encode_rows(layout, np.full(part.shape[0], now_us), {"embedding": vectors[start : start + chunk]})
        row_keys = keys.row_keys(registry.project, VIEW, keys.entity_tokens([part.tolist()]))
        batches = [(row_keys[i : i + 1000], rows[i : i + 1000]) for i in range(0, len(rows), 1000)]
        await guarded_write(client, batches, 0, sha)


def request(queries: F32) -> pb.SearchSimilarRequest:
    return pb.SearchSimilarRequest(
        view=VIEW, k=K, query_vectors=queries.astype("<f4").tobytes(), query_count=queries.shape[0]
    )


async def measure_update(
    client: AsyncClient,
    redis: aioredis.Redis,
    registry: Registry,
    ids: npt.NDArray[np.int64],
    n_changed: int,
    *,
    with_ids: bool,
    seed: int,
) -> dict[str, Any]:
    """Change `n_changed` items under a search load; time until the new generation answers.

    With `with_ids` the event lists the changed ids, as the materializer sends them."""
    stub = client._stub
    probe = request(clustered(1, seed=77, clusters=CLUSTERS))
    before = (await stub.SearchSimilar(probe)).index_generation
    stop = asyncio.Event()
    counts = {"ok": 0, "failed": 0}
    queries = clustered(256, seed=78, clusters=CLUSTERS)

    async def load(i: int) -> None:
        j = i
        while not stop.is_set():
            try:
                await stub.SearchSimilar(request(queries[j % 256 : j % 256 + 1]), timeout=5)
                counts["ok"] += 1
            except Exception:
                counts["failed"] += 1
            j += 8

    loaders = [asyncio.create_task(load(i)) for i in range(8)]
    await asyncio.sleep(0.5)
    changed = np.random.default_rng(seed).choice(ids, n_changed, replace=False)
    t_write = time.perf_counter()
    await write_vectors(redis, registry, changed, clustered(n_changed, seed=seed + 1000, clusters=CLUSTERS))
    t_publish = time.perf_counter()
    await publish_written(redis, registry.project, [VIEW], ids={VIEW: changed} if with_ids else None)
    # Polled through the server on purpose: what counts is a caller seeing the new index.
    while (await stub.SearchSimilar(probe)).index_generation <= before:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    t_visible = time.perf_counter()
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*loaders)
    return {
        "changed": n_changed,
        "write_s": t_publish - t_write,
        "publish_to_visible_s": t_visible - t_publish,
        "write_start_to_visible_s": t_visible - t_write,
        "searches_ok": counts["ok"],
        "searches_failed": counts["failed"],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    vectors = clustered(args.n, seed=1, clusters=CLUSTERS)
    ids = np.arange(args.n, dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        workdir = Path(tmp)
        repo = applied_repo(workdir)
        registry = load_registry(repo)
        with EmbeddedRedis(workdir / "redis") as redis_server:
            redis = aioredis.Redis.from_url(redis_server.url)
            started = time.perf_counter()
            await write_vectors(redis, registry, ids, vectors)
            write_s = time.perf_counter() - started
            print(f"wrote {args.n} vectors in {write_s:.1f} s")
            port = free_port()
            with process(serve_command(repo, redis_server.url, port), port):
                started = time.perf_counter()
                async with AsyncClient(f"127.0.0.1:{port}", timeout_s=60) as client:
                    await client.wait_until_serving(3600)
                    serving_s = time.perf_counter() - started
                    print(f"server SERVING after {serving_s:.1f} s (index built from Redis)")
                    out = await measure(args, client, redis, registry, vectors, ids)
            await redis.aclose()
    out.update(n=args.n, write_s=write_s, start_to_serving_s=serving_s)
    return out


async def measure(
    args: argparse.Namespace,
    client: AsyncClient,
    redis: aioredis.Redis,
    registry: Registry,
    vectors: F32,
    ids: npt.NDArray[np.int64],
) -> dict[str, Any]:
    queries = clustered(1000, seed=2, clusters=CLUSTERS)
    config = IndexConfig(device="cpu")
    started = time.perf_counter()
    local = EmbeddingIndex.build(ids, vectors, "cosine", config)
    print(f"in-process {local.kind} index for the FAISS floor: {time.perf_counter() - started:.1f} s")
    normalised = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    it = iter(range(10**9))

    async def search_one() -> Any:
        i = next(it) % 1000
        return await client.search_similar(VIEW, queries[i], k=K)

    async def faiss_one() -> Any:
        i = next(it) % 1000
        return local.search(normalised[i : i + 1], K)

    async def lookup_one() -> Any:
        i = next(it) % 1000
        return await client.get_online_features({"item_id": [i]}, [f"{VIEW}:embedding"])

    stats = {
        "search": await latency("search 1q k=10", search_one, iterations=args.iterations),
        "faiss": await latency("faiss 1q k=10 (floor)", faiss_one, iterations=args.iterations),
        "lookup": await latency("lookup 1 entity (floor)", lookup_one, iterations=args.iterations),
    }
    stub = client._stub
    batch = request(queries[:64])

    def batch_call() -> Any:
        return stub.SearchSimilar(batch)

    rates = {
        "single@32_qps": await throughput(search_one, in_flight=32, duration_s=args.duration_s),
        "batch64@4_qps": 64 * await throughput(batch_call, in_flight=4, duration_s=args.duration_s),
    }
    update = await measure_update(client, redis, registry, ids, args.changed, with_ids=True, seed=5)
    full = await measure_update(client, redis, registry, ids, args.changed, with_ids=False, seed=6)
    return {"stats": stats, "throughput": rates, "update": update, "update_full_reread": full, "index_kind": local.kind}


def report(out: dict[str, Any]) -> None:
    s: dict[str, Stats] = out["stats"]
    floor_p50 = s["faiss"].p50_ms + s["lookup"].p50_ms
    floor_p99 = s["faiss"].p99_ms + s["lookup"].p99_ms
    rows = [{"name": v.name, "p50 ms": v.p50_ms, "p99 ms": v.p99_ms, "p99.9 ms": v.p999_ms} for v in s.values()]
    rows.append({"name": "  floor (faiss + lookup)", "p50 ms": floor_p50, "p99 ms": floor_p99})
    rows.append(
        {"name": "  search / floor", "p50 ms": s["search"].p50_ms / floor_p50, "p99 ms": s["search"].p99_ms / floor_p99}
    )
    out["floor"] = {"p50_ms": floor_p50, "p99_ms": floor_p99}
    print(f"\nn={out['n']} x {DIM}, index {out['index_kind']}; SERVING {out['start_to_serving_s']:.1f} s after start")
    print_table(rows, ["name", "p50 ms", "p99 ms", "p99.9 ms"])
    for name, value in out["throughput"].items():
        print(f"throughput {name}: {value:,.0f} queries/s (target >= 2,000)")
    for key, how in (("update", "with ids"), ("update_full_reread", "without ids")):
        u = out[key]
        print(
            f"update of {u['changed']} items announced {how}: writes {u['write_s']:.2f} s; "
            f"announced -> new generation answering {u['publish_to_visible_s']:.2f} s (target"
            f" <= 5 s); first write -> visible {u['write_start_to_visible_s']:.2f} s; searches"
            f" during it {u['searches_ok']} ok, {u['searches_failed']} failed"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--changed", type=int, default=10_000)
    args = parser.parse_args()
    out = run_on_uvloop(run(args))
    report(out)
    print("wrote", write_results(f"search-n{args.n}", out))


if __name__ == "__main__":
    main()
