"""Predict and Rank latency, throughput and per-stage breakdown, beside a plain lookup.

    nice -n 10 .venv/bin/python benchmarks/bench_inference.py [--users 20000] [--iterations 1000]

Starts an embedded Redis, writes `--users` rows of user_profile, user_activity and
item_stats (as bench_lookup does) and `--users` item embeddings, starts the feature server
in its own process with the demo ranker twice (`ranker`: batching on, max wait 0;
`ranker_unbatched`: batching off) and measures from this process:

    lookup 100        GetOnlineFeatures, 100 entities x 50 features (the floor to beat)
    predict 1x100     one user x 100 items, sequential, batching on and off
    rank 500->20      500 explicit candidates, top 20; and 500 retrieved (item_embedding)
    throughput        predict 1x100 with 8, 32, 64 calls in flight, on and off, with p99

Server-side stage breakdowns (LatencyBreakdown) are collected on every measured call.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import yaml
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lookup import FEATURES, populated_store, process, serve_command
from harness import Stats, print_table, run_on_uvloop, write_results

from featurestore import AsyncClient
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.embedded import free_port
from featurestore.registry import Registry
from featurestore.store import keys
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write

STAGES = ("queue", "redis", "decode", "retrieval", "matrix", "model", "serialization", "total")


def write_models(repo: Path) -> None:
    path = repo / "models.yaml"
    doc = yaml.safe_load(path.read_text())
    ranker = doc["models"]["ranker"]
    ranker["path"] = str((repo / ranker["path"]).resolve())
    doc["models"]["ranker_unbatched"] = {**ranker, "batching": {"enabled": False}}
    path.write_text(yaml.safe_dump(doc))


async def write_embeddings(url: str, registry: Registry, count: int) -> None:
    client = aioredis.Redis.from_url(url)
    rng = np.random.default_rng(2)
    layout = registry.views["item_embedding"].layout
    now_us = int(time.time() * 1e6)
    for start in range(0, count, 2000):
        ids = list(range(start, min(start + 2000, count)))
        vectors = rng.standard_normal((len(ids), 64)).astype(np.float32)
        rows = encode_rows(layout, np.full(len(ids), now_us), {"embedding": vectors})
        row_keys = keys.row_keys(registry.project, "item_embedding", keys.entity_tokens([ids]))
        await guarded_write(client, [(row_keys, rows)], 0, [])
    await client.aclose()


class Recorder:
    """Client latencies (ns) and server breakdowns (us) of measured calls."""

    def __init__(self) -> None:
        self.latency_ns: list[int] = []
        self.stages: dict[str, list[float]] = {s: [] for s in STAGES}
        self.batch_requests: list[int] = []

    def add(self, ns: int, response: Any) -> None:
        self.latency_ns.append(ns)
        b = response.breakdown
        if b.total_us:
            for s in STAGES:
                self.stages[s].append(getattr(b, f"{s}_us"))
            self.batch_requests.append(b.batch_requests)

    def summary(self, name: str) -> dict[str, Any]:
        stats = Stats.of(name, np.array(self.latency_ns, dtype=np.int64))
        out: dict[str, Any] = {
            "name": name,
            "calls": stats.calls,
            "p50 ms": stats.p50_ms,
            "p99 ms": stats.p99_ms,
        }
        if self.stages["total"]:
            total = np.array(self.stages["total"])
            p50, p99 = np.percentile(total, [50, 99])
            out["server p50 us"], out["server p99 us"] = float(p50), float(p99)
            for s in STAGES[:-1]:
                v = np.array(self.stages[s])
                out[f"{s} p50 us"], out[f"{s} p99 us"] = (float(x) for x in np.percentile(v, [50, 99]))
            fetch = np.array(self.stages["redis"]) + np.array(self.stages["decode"])
            f50, f99 = np.percentile(fetch, [50, 99])
            m50, m99 = np.percentile(np.array(self.stages["model"]), [50, 99])
            out["fetch share p50/p99"] = f"{f50 / p50:.0%}/{f99 / p99:.0%}"
            out["model share p50/p99"] = f"{m50 / p50:.0%}/{m99 / p99:.0%}"
            out["mean batch calls"] = float(np.mean(self.batch_requests))
        return out


async def sequential(name: str, call: Any, iterations: int, warmup: int = 200) -> dict[str, Any]:
    for _ in range(warmup):
        await call()
    rec = Recorder()
    for _ in range(iterations):
        start = time.perf_counter_ns()
        response = await call()
        rec.add(time.perf_counter_ns() - start, response)
    return rec.summary(name)


async def loaded(name: str, call: Any, in_flight: int, duration_s: float) -> dict[str, Any]:
    rec = Recorder()
    stop_at = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter_ns()
            response = await call()
            rec.add(time.perf_counter_ns() - start, response)

    await asyncio.gather(*(worker() for _ in range(min(in_flight, 8))))  # warm-up
    rec = Recorder()
    started = time.perf_counter()
    stop_at = started + duration_s
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    out = rec.summary(name)
    out["calls/s"] = len(rec.latency_ns) / (time.perf_counter() - started)
    return out


async def measure(args: argparse.Namespace, port: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    async with (
        aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        AsyncClient(f"127.0.0.1:{port}") as client,
    ):
        await client.wait_until_serving(120)
        stub = pb_grpc.FeatureStoreStub(channel)

        def predict(model: str) -> Any:
            def call() -> Any:
                items = rng.integers(0, args.users, 100).tolist()
                return stub.Predict(
                    pb.PredictRequest(
                        model=model,
                        return_breakdown=True,
                        entities=[
                            pb.EntityColumn(name="user_id", int64_values=[int(rng.integers(args.users))]),
                            pb.EntityColumn(name="item_id", int64_values=items),
                        ],
                        request_values=[pb.RequestColumn(name="hour_of_day", int64_values=[20])],
                    )
                )

            return call

        def rank(retrieve: bool) -> Any:
            def call() -> Any:
                user = [pb.EntityColumn(name="user_id", int64_values=[int(rng.integers(args.users))])]
                if retrieve:
                    seeds = rng.integers(0, args.users, 3).astype("<i8").tobytes()
                    return stub.Rank(
                        pb.RankRequest(
                            model="ranker",
                            entities=user,
                            top_n=20,
                            retrieval=pb.Retrieval(seed_ids=seeds, n_candidates=500),
                            return_breakdown=True,
                        )
                    )
                ids = rng.choice(args.users, 500, replace=False).astype("<i8").tobytes()
                return stub.Rank(
                    pb.RankRequest(
                        model="ranker",
                        entities=user,
                        top_n=20,
                        candidate_ids=ids,
                        return_breakdown=True,
                    )
                )

            return call

        async def lookup() -> Any:
            ents = {
                "user_id": rng.integers(0, args.users, 100),
                "item_id": rng.integers(0, args.users, 100),
            }
            return await client.get_online_features(ents, FEATURES)

        async def lookup_call() -> Any:
            await lookup()
            return pb.PredictResponse()  # no breakdown

        n = args.iterations
        rows = [await sequential("lookup 100x50", lookup_call, n)]
        rows.append(await sequential("predict 1x100 batching on", predict("ranker"), n))
        rows.append(await sequential("predict 1x100 batching off", predict("ranker_unbatched"), n))
        rows.append(await sequential("rank 500->20 explicit", rank(False), n))
        rows.append(await sequential("rank 500->20 retrieval", rank(True), n))
        for in_flight in (8, 32, 64):
            for model, label in (("ranker", "on"), ("ranker_unbatched", "off")):
                rows.append(
                    await loaded(
                        f"predict 1x100 x{in_flight} batching {label}",
                        predict(model),
                        in_flight,
                        args.duration_s,
                    )
                )
        return rows


async def run(args: argparse.Namespace) -> None:
    async with populated_store("inference", args.users, write_models) as (repo, registry, url):
        await write_embeddings(url, registry, args.users)
        port = free_port()
        with process(serve_command(repo, url, port), port):
            rows = await measure(args, port)
    print_table(
        rows,
        [
            "name",
            "p50 ms",
            "p99 ms",
            "calls/s",
            "server p50 us",
            "server p99 us",
            "fetch share p50/p99",
            "model share p50/p99",
            "mean batch calls",
        ],
    )
    print()
    print_table([r for r in rows if "server p50 us" in r], ["name", *[f"{s} p50 us" for s in STAGES[:-1]]])
    targets = check_targets(rows)
    for line in targets:
        print(line)
    print("wrote", write_results("inference", {"results": rows, "targets": targets}))


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in rows}
    lookup_p99 = by["lookup 100x50"]["p99 ms"]
    predict_p99 = by["predict 1x100 batching on"]["p99 ms"]
    on, off = by["predict 1x100 x32 batching on"], by["predict 1x100 x32 batching off"]
    idle_p99 = predict_p99
    return [
        f"predict 1x100 p99 {predict_p99:.2f} ms vs lookup 100 p99 {lookup_p99:.2f} ms:"
        f" {predict_p99 / lookup_p99:.2f}x (target <= 1.5x)",
        f"x32 throughput batching on/off: {on['calls/s']:.0f}/{off['calls/s']:.0f} ="
        f" {on['calls/s'] / off['calls/s']:.2f}x (target >= 2x)",
        f"x32 batching-on p99 {on['p99 ms']:.2f} ms vs idle p99 {idle_p99:.2f} ms:"
        f" {on['p99 ms'] / idle_p99:.2f}x (target <= 2x)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--duration-s", type=float, default=3.0)
    args = parser.parse_args()
    run_on_uvloop(run(args))


if __name__ == "__main__":
    main()
