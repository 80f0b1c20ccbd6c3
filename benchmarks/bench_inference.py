"""Predict and Rank: latency, throughput, stage breakdown, three models, hot swap, quality.

    nice -n 10 .venv/bin/python benchmarks/bench_inference.py [--users 20000] [--iterations 1000]
                                                              [--redis-delay-ms 0.25] [--cache-mib 256]

Starts an embedded Redis, writes `--users` rows of user_profile, user_activity and
item_stats (as bench_lookup does) and `--users` item embeddings, starts the feature server
in its own process with the models of feature_repo/models.yaml (`ranker`: trees, batching
as models.yaml sets it; `ranker_mlp` and `ranker_mlp_int8`: the neural ranker in fp32
and int8) plus `ranker_unbatched` (the trees, batching off) and `swap` (a file this
harness replaces), and measures from this process:

    lookup 100        GetOnlineFeatures, 100 entities x 50 features (the floor to beat)
    predict 1x100     one user x 100 items, sequential; the default batching and batching
                      off in alternating blocks of 50 calls (their ratio is the target)
    models            Predict 1x100 and Rank 500 -> 20 (explicit candidates) per model, the
                      three models in rotating blocks of 50 calls, with the model stage;
                      Rank 500 -> 20 by retrieval (item_embedding)
    throughput        Predict 1x100 with 8, 32, 64 calls in flight, batching on and off,
                      in alternating 1-second windows (on-off-off-on-on-...), with p99
                      and the server process's CPU time per call
    hot swap          Predict on `swap` with 16 in flight: a steady window, then a window
                      in which its file is replaced (by a rename) every 2 s: errors, p99
    quality           AUC and log-loss of each model on fresh demo data (embedded
                      PostgreSQL, feature_repo/generate.py with another seed; none of
                      it was trained on): the cost of int8 against fp32

Requests are drawn at random once (1,024 per kind), serialized, and cycled, so that the
client's cost per call is the gRPC call alone (the client shares the 2 cores with the
server). Server-side stage breakdowns (LatencyBreakdown) are collected on every measured
call; "fetch" is redis + decode. `--skip-quality` leaves out the PostgreSQL part.

`--redis-delay-ms D` puts Redis behind benchmarks/relay.py (D ms each way, a relay per
server; the rows are written direct). `--cache-mib M` starts a second server with the
hot-key cache and measures Predict 1x100 (ranker) on both, the same requests in
alternating blocks of 100, after one pass over the request pool on the cached server:
every row of the pool's 1,024 requests is then cached (the cache's best case).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import yaml
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lookup import FEATURES, ROOT, applied_repo, populated_store, process, serve_command
from harness import Stats, print_table, run_on_uvloop, side_by_side, write_results
from relay import Hop, add_delay_option, redis_hop

from featurestore import AsyncClient
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.client.core import online_features_request
from featurestore.embedded import free_port
from featurestore.registry import Registry
from featurestore.store import keys
from featurestore.store.layout import encode_rows
from featurestore.store.redis import guarded_write

STAGES = ("queue", "redis", "decode", "retrieval", "matrix", "model", "serialization", "total")
SHARES = ("queue", "fetch", "retrieval", "matrix", "model", "serialization")  # fetch = redis + decode
MODELS = ("ranker", "ranker_mlp", "ranker_mlp_int8")
SWAP_FILES = ("ranker_mlp.onnx", "ranker_mlp_int8.onnx")  # what `swap` alternates between


POOL = 1024  # distinct requests per kind, cycled


def _identity(data: bytes) -> bytes:
    return data


def cycle(rpc: Any, pool: list[bytes]) -> Any:
    """A call that sends the next of the pre-serialized requests `pool` through `rpc`."""
    at = 0

    def call() -> Any:
        nonlocal at
        at = (at + 1) % len(pool)
        return rpc(pool[at])

    return call


def write_models(repo: Path) -> None:
    """The repo's models with absolute paths, plus ranker_unbatched and swap."""
    path = repo / "models.yaml"
    doc = yaml.safe_load(path.read_text())
    for entry in doc["models"].values():
        entry["path"] = str((ROOT / "feature_repo" / entry["path"]).resolve())
    ranker = doc["models"]["ranker"]
    doc["models"]["ranker_unbatched"] = {**ranker, "batching": {"enabled": False}}
    shutil.copyfile(ROOT / "feature_repo/models" / SWAP_FILES[0], repo / "swap.onnx")
    doc["models"]["swap"] = {**ranker, "path": str(repo / "swap.onnx")}
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
    """Client latencies (ns), server breakdowns (us), versions and errors of measured calls."""

    def __init__(self) -> None:
        self.latency_ns: list[int] = []
        self.stages: dict[str, list[float]] = {s: [] for s in STAGES}
        self.batch_requests: list[int] = []
        self.versions: set[str] = set()
        self.errors = 0

    def add(self, ns: int, response: Any) -> None:
        self.latency_ns.append(ns)
        self.versions.add(getattr(response, "model_version", ""))
        b = response.breakdown
        if b.total_us:
            for s in STAGES:
                self.stages[s].append(getattr(b, f"{s}_us"))
            self.batch_requests.append(b.batch_requests)

    def summary(self, name: str) -> dict[str, Any]:
        stats = Stats.of(name, np.array(self.latency_ns, dtype=np.int64))
        out: dict[str, Any] = {"name": name, "calls": stats.calls, "p50 ms": stats.p50_ms, "p99 ms": stats.p99_ms}
        if self.errors:
            out["errors"] = self.errors
        if not self.stages["total"]:
            return out
        stage = {s: np.array(v) for s, v in self.stages.items()}
        stage["fetch"] = stage["redis"] + stage["decode"]
        total50, total99 = np.percentile(stage["total"], [50, 99])
        out["server p50 us"], out["server p99 us"] = float(total50), float(total99)
        for s in (*STAGES[:-1], "fetch"):
            out[f"{s} p50 us"], out[f"{s} p99 us"] = (float(x) for x in np.percentile(stage[s], [50, 99]))
        shares = {s: (out[f"{s} p50 us"] / total50, out[f"{s} p99 us"] / total99) for s in SHARES}
        top = max(shares, key=lambda s: max(shares[s]))
        out["largest stage p50/p99"] = f"{top} {shares[top][0]:.0%}/{shares[top][1]:.0%}"
        out["largest share"] = max(shares[top])
        out["fetch share p50/p99"] = "{:.0%}/{:.0%}".format(*shares["fetch"])
        out["model share p50/p99"] = "{:.0%}/{:.0%}".format(*shares["model"])
        out["mean batch calls"] = float(np.mean(self.batch_requests))
        return out


async def timed(rec: Recorder, call: Any) -> None:
    start = time.perf_counter_ns()
    try:
        response = await call()
    except aio.AioRpcError:
        rec.errors += 1
        return
    rec.add(time.perf_counter_ns() - start, response)


async def sequential(name: str, call: Any, iterations: int, warmup: int = 200) -> dict[str, Any]:
    for _ in range(warmup):
        await call()
    rec = Recorder()
    for _ in range(iterations):
        await timed(rec, call)
    return rec.summary(name)


async def alternating(names: Sequence[str], calls: Sequence[Any], iterations: int) -> list[dict[str, Any]]:
    """Calls, sequential, in rotating blocks of 50 (the order reversed every other round):
    drift on the machine hits them all alike."""
    for _ in range(200):
        for call in calls:
            await call()
    recs = [Recorder() for _ in calls]
    for block in range(iterations // 50):
        order = range(len(calls)) if block % 2 == 0 else reversed(range(len(calls)))
        for k in order:
            for _ in range(50):
                await timed(recs[k], calls[k])
    return [rec.summary(name) for rec, name in zip(recs, names, strict=True)]


async def loaded(calls: dict[str, Any], in_flight: int, duration_s: float) -> list[dict[str, Any]]:
    """Each call with `in_flight` outstanding, in 1-second windows alternating A B B A A B ...
    (`duration_s` each in all): the load of other processes on the machine hits both alike."""
    names = list(calls)
    recs = {name: Recorder() for name in names}
    elapsed = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for name in names:
        await window(Recorder(), calls[name], in_flight, 0.5)  # warm
    for round_ in range(max(1, round(duration_s))):
        for name in names if round_ % 2 == 0 else names[::-1]:
            started, cpu_s = time.perf_counter(), server_cpu_s()
            await window(recs[name], calls[name], in_flight, 1.0)
            elapsed[name] += time.perf_counter() - started
            cpu[name] += server_cpu_s() - cpu_s
    out = []
    for name in names:
        row = recs[name].summary(name)
        row["calls/s"] = len(recs[name].latency_ns) / elapsed[name]
        row["server cpu us/call"] = cpu[name] / max(len(recs[name].latency_ns), 1) * 1e6
        out.append(row)
    return out


SERVER_PID = 0  # the feature server's process, for its CPU time


def server_cpu_s() -> float:
    """CPU seconds the server process used so far, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{SERVER_PID}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def window(rec: Recorder, call: Any, in_flight: int, duration_s: float) -> None:
    stop_at = time.perf_counter() + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            await timed(rec, call)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def hot_swap(call: Any, swap: Path, sources: list[Path], in_flight: int) -> list[dict[str, Any]]:
    """A steady window, then one in which `swap` is replaced every 2 s (rename: atomic)."""
    steady, swapping = Recorder(), Recorder()
    await window(Recorder(), call, in_flight, 1.0)
    await window(steady, call, in_flight, 6.0)

    async def replace() -> None:
        for k in range(3):
            await asyncio.sleep(1.0)
            staged = swap.with_suffix(".staged")
            shutil.copyfile(sources[(k + 1) % len(sources)], staged)
            os.replace(staged, swap)
            await asyncio.sleep(1.0)

    await asyncio.gather(window(swapping, call, in_flight, 7.0), replace())
    rows = [steady.summary(f"swap x{in_flight}, steady"), swapping.summary(f"swap x{in_flight}, 3 swaps")]
    rows[0]["versions"], rows[1]["versions"] = len(steady.versions), len(swapping.versions)
    rows[1]["errors"] = swapping.errors
    return rows


async def cache_side_by_side(
    args: argparse.Namespace, servers: dict[str, tuple[int, Hop]], rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Predict 1x100 (ranker) on the servers without and with the cache, the same
    requests in alternating blocks of 100, after one pass over the pool on both."""
    pool = [
        pb.PredictRequest(
            model="ranker",
            entities=[
                pb.EntityColumn(name="user_id", int64_values=[int(rng.integers(args.users))]),
                pb.EntityColumn(name="item_id", int64_values=rng.integers(0, args.users, 100).tolist()),
            ],
            request_values=[pb.RequestColumn(name="hour_of_day", int64_values=[20])],
        ).SerializeToString()
        for _ in range(POOL)
    ]
    async with (
        aio.insecure_channel(f"127.0.0.1:{servers['cache_off'][0]}") as off,
        aio.insecure_channel(f"127.0.0.1:{servers['cache_on'][0]}") as on,
    ):
        calls = {
            mode: channel.unary_unary(
                "/featurestore.v1.FeatureStore/Predict",
                request_serializer=_identity,
                response_deserializer=pb.PredictResponse.FromString,
            )
            for mode, channel in (("cache_off", off), ("cache_on", on))
        }
        for request in pool:  # every row of the pool is cached from here on
            for call in calls.values():
                await call(request)
        next_request = cycle(lambda request: request, pool)
        trips = {mode: hop.chunks_sent for mode, (_, hop) in servers.items() if hop.relay}
        sides = await side_by_side(calls, next_request, iterations=args.iterations, trips=trips)
    rows = []
    for mode, side in sides.items():
        row: dict[str, Any] = {
            "name": f"predict 1x100 ranker, {mode.replace('_', ' ')}",
            "calls": side.stats.calls,
            "p50 ms": side.stats.p50_ms,
            "p99 ms": side.stats.p99_ms,
        }
        if side.no_trip_share is not None:
            row["no trip"] = side.no_trip_share
        rows.append(row)
    return rows


async def measure(args: argparse.Namespace, servers: dict[str, tuple[int, Hop]], repo: Path) -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    port = servers["cache_off"][0]
    async with (
        aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        AsyncClient(f"127.0.0.1:{port}") as client,
    ):
        await client.wait_until_serving(120)

        # Requests are drawn once, serialized, and cycled: the client's cost per call is the
        # gRPC call alone, so that on this 2-core machine the figures are the server's.
        predict_rpc = channel.unary_unary(
            "/featurestore.v1.FeatureStore/Predict",
            request_serializer=_identity,
            response_deserializer=pb.PredictResponse.FromString,
        )
        rank_rpc = channel.unary_unary(
            "/featurestore.v1.FeatureStore/Rank",
            request_serializer=_identity,
            response_deserializer=pb.RankResponse.FromString,
        )

        def predict(model: str) -> Any:
            pool = [
                pb.PredictRequest(
                    model=model,
                    return_breakdown=True,
                    entities=[
                        pb.EntityColumn(name="user_id", int64_values=[int(rng.integers(args.users))]),
                        pb.EntityColumn(name="item_id", int64_values=rng.integers(0, args.users, 100).tolist()),
                    ],
                    request_values=[pb.RequestColumn(name="hour_of_day", int64_values=[20])],
                ).SerializeToString()
                for _ in range(POOL)
            ]
            return cycle(predict_rpc, pool)

        def rank(model: str, retrieve: bool) -> Any:
            pool = []
            for _ in range(POOL):
                user = [pb.EntityColumn(name="user_id", int64_values=[int(rng.integers(args.users))])]
                candidates: dict[str, Any] = {
                    "candidate_ids": rng.choice(args.users, 500, replace=False).astype("<i8").tobytes()
                }
                if retrieve:
                    seeds = rng.integers(0, args.users, 3).astype("<i8").tobytes()
                    candidates = {"retrieval": pb.Retrieval(seed_ids=seeds, n_candidates=500)}
                request = pb.RankRequest(model=model, entities=user, top_n=20, return_breakdown=True, **candidates)
                pool.append(request.SerializeToString())
            return cycle(rank_rpc, pool)

        lookup_rpc = channel.unary_unary(
            "/featurestore.v1.FeatureStore/GetOnlineFeatures",
            request_serializer=_identity,
            response_deserializer=pb.GetOnlineFeaturesResponse.FromString,
        )
        lookups = [
            online_features_request(
                {"user_id": rng.integers(0, args.users, 100), "item_id": rng.integers(0, args.users, 100)},
                FEATURES,
                False,
            ).SerializeToString()
            for _ in range(POOL)
        ]
        lookup = cycle(lookup_rpc, lookups)

        async def lookup_call() -> Any:
            await lookup()
            return pb.PredictResponse()  # no breakdown

        n = args.iterations
        rows = [await sequential("lookup 100x50", lookup_call, n)]
        if "cache_on" in servers:
            rows += await cache_side_by_side(args, servers, rng)
        rows += await alternating(
            ("predict 1x100 ranker, default batching", "predict 1x100 ranker, batching off"),
            (predict("ranker"), predict("ranker_unbatched")),
            n,
        )
        rows += await alternating([f"predict 1x100 {m}" for m in MODELS], [predict(m) for m in MODELS], n)
        rows += await alternating([f"rank 500->20 {m}" for m in MODELS], [rank(m, False) for m in MODELS], n)
        rows.append(await sequential("rank 500->20 ranker, retrieved", rank("ranker", True), n))
        for in_flight in (8, 32, 64):
            rows += await loaded(
                {
                    f"predict 1x100 x{in_flight} default batching": predict("ranker"),
                    f"predict 1x100 x{in_flight} batching off": predict("ranker_unbatched"),
                },
                in_flight,
                args.duration_s,
            )
        sources = [ROOT / "feature_repo/models" / name for name in SWAP_FILES]
        rows += await hot_swap(predict("swap"), repo / "swap.onnx", sources, 16)
        return rows


def quality(samples: int) -> list[dict[str, Any]]:
    """AUC and log-loss of each model on demo data none of them was trained on."""
    sys.path.insert(0, str(ROOT / "feature_repo"))
    import generate  # type: ignore[import-not-found]  # feature_repo/, on sys.path above
    import train_model  # type: ignore[import-not-found]

    from featurestore.embedded import EmbeddedPostgres
    from featurestore.inference.models import parse_models
    from featurestore.registry import load_registry

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # PostgreSQL runs as another user when we are root
        repo = applied_repo(folder)
        registry = load_registry(repo)
        specs = parse_models(ROOT / "feature_repo/models.yaml", registry)
        with EmbeddedPostgres(folder / "pg") as pg:
            options = generate.GenerateOptions(users=20_000, items=5_000, seed=7)
            asyncio.run(generate.generate(pg.dsn, registry, options))
            matrix, labels = asyncio.run(train_model.dataset(pg.dsn, registry, specs["ranker"], samples, 7))
    out = []
    for name in MODELS:
        q = train_model.evaluate(specs[name], specs[name].path, matrix, labels)
        out.append({"name": f"quality {name}", "AUC": q.auc, "log-loss": q.log_loss, "samples": samples})
    return out


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    async with populated_store("inference", args.users, write_models) as (repo, registry, url):
        await write_embeddings(url, registry, args.users)
        modes = {"cache_off": ("--cache-bytes", "0")}
        if args.cache_mib:
            modes["cache_on"] = ("--cache-bytes", str(args.cache_mib << 20))
        with ExitStack() as stack:
            servers: dict[str, tuple[int, Hop]] = {}
            pids = []
            for mode, extra in modes.items():  # each behind a relay of its own (none at 0 ms)
                hop = stack.enter_context(redis_hop(url, args.redis_delay_ms))
                port = free_port()
                pids.append(stack.enter_context(process(serve_command(repo, hop.url, port, *extra), port)).pid)
                servers[mode] = (port, hop)
            global SERVER_PID
            SERVER_PID = pids[0]
            return await measure(args, servers, repo)


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in rows}
    lookup = by["lookup 100x50"]
    on, off = by["predict 1x100 ranker, default batching"], by["predict 1x100 ranker, batching off"]
    on32, off32 = by["predict 1x100 x32 default batching"], by["predict 1x100 x32 batching off"]
    fp32, int8 = by["predict 1x100 ranker_mlp"], by["predict 1x100 ranker_mlp_int8"]
    steady, swapping = by["swap x16, steady"], by["swap x16, 3 swaps"]
    shares = "; ".join(
        f"{model} {by[f'predict 1x100 {model}']['largest stage p50/p99']},"
        f" rank {by[f'rank 500->20 {model}']['largest stage p50/p99']}"
        for model in MODELS
    )
    rank32, rank8 = by["rank 500->20 ranker_mlp"], by["rank 500->20 ranker_mlp_int8"]
    lines = [
        f"sequential predict 1x100 p50, default batching / off: {on['p50 ms']:.2f} / {off['p50 ms']:.2f} ms ="
        f" {on['p50 ms'] / off['p50 ms']:.2f}x (target <= 1.1x)",
        f"x32 throughput default / off: {on32['calls/s']:.0f} / {off32['calls/s']:.0f} ="
        f" {on32['calls/s'] / off32['calls/s']:.2f}x (target >= 1.5x); p99 {on32['p99 ms']:.1f} /"
        f" {off32['p99 ms']:.1f} ms = {on32['p99 ms'] / off32['p99 ms']:.2f}x (target <= 1x); server CPU per call"
        f" {on32['server cpu us/call']:.0f} / {off32['server cpu us/call']:.0f} us",
        f"largest stage share of server time p50/p99, predict 1x100 and rank 500->20: {shares} (target <= 50%)",
        f"predict 1x100 p99 {on['p99 ms']:.2f} ms vs lookup 100 p99 {lookup['p99 ms']:.2f} ms:"
        f" {on['p99 ms'] / lookup['p99 ms']:.2f}x (target <= 1.3x)",
        f"int8 MLP model stage p50 {int8['model p50 us']:.0f} us vs fp32 {fp32['model p50 us']:.0f} us:"
        f" {fp32['model p50 us'] / int8['model p50 us']:.2f}x faster; rank 500: {rank8['model p50 us']:.0f} vs"
        f" {rank32['model p50 us']:.0f} us, {rank32['model p50 us'] / rank8['model p50 us']:.2f}x (target >= 1.5x)",
        f"hot swap x16: {swapping.get('errors', 0)} errors, {swapping['versions']} versions answered,"
        f" p99 {swapping['p99 ms']:.2f} ms vs steady {steady['p99 ms']:.2f} ms ="
        f" {swapping['p99 ms'] / steady['p99 ms']:.2f}x (target 0 errors, <= 2x)",
    ]
    if "predict 1x100 ranker, cache on" in by:
        off, on = by["predict 1x100 ranker, cache off"], by["predict 1x100 ranker, cache on"]
        trips = f", {on['no trip']:.1%} of calls with the cache made no Redis round trip" if "no trip" in on else ""
        lines.append(
            f"predict 1x100 cache off / on, every row cached: p50 {off['p50 ms']:.2f} / {on['p50 ms']:.2f} ms ="
            f" {off['p50 ms'] / on['p50 ms']:.2f}x, p99 {off['p99 ms']:.2f} / {on['p99 ms']:.2f} ms ="
            f" {off['p99 ms'] / on['p99 ms']:.2f}x{trips} (at Zipf 1.1: bench_hotcache.py; target p99 >= 1.5x)"
        )
    if "quality ranker_mlp" in by:
        q32, q8 = by["quality ranker_mlp"], by["quality ranker_mlp_int8"]
        lines.append(
            f"int8 MLP AUC {q8['AUC']:.4f} vs fp32 {q32['AUC']:.4f}: drop {q32['AUC'] - q8['AUC']:.4f}"
            f" (aim <= 0.005); log-loss {q8['log-loss']:.4f} vs {q32['log-loss']:.4f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--duration-s", type=float, default=6.0, help="seconds per mode and load")
    parser.add_argument("--quality-samples", type=int, default=20_000)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--cache-mib", type=int, default=0, help="also a server with this hot-key cache: Predict 1x100 side by side"
    )
    add_delay_option(parser)
    args = parser.parse_args()
    rows = run_on_uvloop(run(args))
    if not args.skip_quality:
        rows += quality(args.quality_samples)
    print_table(
        [r for r in rows if "p50 ms" in r],
        [
            "name",
            "p50 ms",
            "p99 ms",
            "calls/s",
            "server cpu us/call",
            "server p50 us",
            "server p99 us",
            "largest stage p50/p99",
            "fetch share p50/p99",
            "model share p50/p99",
            "mean batch calls",
            "no trip",
        ],
    )
    print()
    print_table(
        [r for r in rows if "server p50 us" in r],
        [
            "name",
            *[f"{s} p50 us" for s in ("queue", "redis", "decode", "retrieval", "matrix", "model", "serialization")],
        ],
    )
    print()
    if not args.skip_quality:
        print_table([r for r in rows if "AUC" in r], ["name", "AUC", "log-loss", "samples"])
        print()
    print_table([r for r in rows if "versions" in r], ["name", "calls", "errors", "versions", "p50 ms", "p99 ms"])
    print()
    targets = check_targets(rows)
    for line in targets:
        print(line)
    print("wrote", write_results("inference", {"results": rows, "targets": targets}))


if __name__ == "__main__":
    main()
