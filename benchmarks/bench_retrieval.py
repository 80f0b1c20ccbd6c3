"""Retrieval benchmark: flat, IVF and HNSW (and GPU variants when FAISS reports a GPU).

For each index: build time, index memory (serialized size), single-query latency straight
into FAISS and through the coalescing `IndexManager`, batched QPS (batches of 64), many
concurrent single-query callers through the manager, and recall@10 against an exact
numpy search on 1,000 queries. Prints a table and writes JSON to benchmarks/results/.

    nice -n 19 .venv/bin/python benchmarks/bench_retrieval.py --n 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from featurestore.registry import JoinKey, VectorSpec, ViewDef
from featurestore.retrieval.manager import IndexManager
from featurestore.retrieval.spec import IndexConfig, gpu_count
from featurestore.store.layout import DType, FeatureSpec, Layout

DIM = 64
RESULTS = Path(__file__).resolve().parent / "results"
F32 = npt.NDArray[np.float32]


def clustered(n: int, seed: int, clusters: int) -> F32:
    """Clusters in a 16-d subspace of R^64 plus small full-rank noise (low intrinsic
    dimension, like real embeddings); generated in chunks to bound memory."""
    basis = np.random.default_rng(12345).normal(size=(16, DIM)) / 4
    centres = np.random.default_rng(54321).normal(size=(clusters, 16)) * 2
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        latent = centres[rng.integers(0, clusters, m)] + rng.normal(size=(m, 16))
        out[start : start + m] = latent @ basis + 0.05 * rng.normal(size=(m, DIM))
    return out


def view() -> ViewDef:
    layout = Layout("item_embedding", (FeatureSpec("embedding", DType.FLOAT32_LIST, DIM),))
    return ViewDef(
        "item_embedding",
        (JoinKey("item_id", DType.INT64),),
        0.0,
        layout,
        "",
        "",
        "",
        VectorSpec("embedding", DIM, "cosine"),
    )


def exact_top10(vectors: F32, queries: F32) -> npt.NDArray[np.int64]:
    """Ground truth by numpy (cosine), in query chunks to bound memory."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.empty((q.shape[0], 10), np.int64)
    for s in range(0, q.shape[0], 50):
        sims = q[s : s + 50] @ v.T
        part = np.argpartition(-sims, 10, axis=1)[:, :10]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        out[s : s + 50] = np.take_along_axis(part, order, 1)
    return out


def pct(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


async def measure(
    name: str, config: IndexConfig, ids: Any, vectors: F32, queries: F32, truth: Any, args: argparse.Namespace
) -> dict[str, Any]:
    manager = IndexManager("bench", view(), config)
    stats = await manager.build(ids, vectors)
    index = manager.index
    assert index is not None
    prepared = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    result: dict[str, Any] = {"index": name, "kind": stats.kind, "device": stats.device, "build_s": stats.build_s}
    result["memory_mb"] = faiss.serialize_index(index.cpu).nbytes / 2**20
    found = index.search(prepared, 10).ids
    result["recall_at_10"] = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, ids[truth], strict=True)]))
    lat = []
    for i in range(args.iters):
        t = time.perf_counter()
        index.search(prepared[i % 1000 : i % 1000 + 1], 10)
        lat.append(time.perf_counter() - t)
    result["faiss_single"] = pct(lat)
    lat = []
    for i in range(args.iters):
        t = time.perf_counter()
        await manager.search(queries[i % 1000], 10)
        lat.append(time.perf_counter() - t)
    result["manager_single"] = pct(lat)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        s = (done * 64) % 960
        index.search(prepared[s : s + 64], 10)
        done += 64
    result["batch64_qps"] = done / (time.perf_counter() - t0)
    result["concurrent"] = await concurrent(manager, queries, args)
    return result


async def concurrent(manager: IndexManager, queries: F32, args: argparse.Namespace) -> dict[str, Any]:
    """`args.callers` coroutines each sending single queries back to back for a while."""
    lat: list[float] = []
    calls_before, stop = manager.faiss_calls, time.perf_counter() + args.seconds

    async def caller(c: int) -> None:
        i = c
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await manager.search(queries[i % 1000], 10)
            lat.append(time.perf_counter() - t)
            i += args.callers

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(args.callers)))
    elapsed = time.perf_counter() - t0
    calls = manager.faiss_calls - calls_before
    return {"callers": args.callers, "qps": len(lat) / elapsed, **pct(lat), "mean_batch": len(lat) / max(calls, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'index':<10}{'build s':>9}{'MB':>8}{'recall':>8}{'1q p50':>8}{'1q p99':>8}"
        f"{'mgr p50':>8}{'mgr p99':>8}{'b64 qps':>9}{'conc qps':>9}{'c p50':>7}{'c p99':>7}"
        f"{'batch':>6}"
    )
    lines = [head]
    for r in rows:
        c = r["concurrent"]
        lines.append(
            f"{r['index']:<10}{r['build_s']:>9.1f}{r['memory_mb']:>8.0f}{r['recall_at_10']:>8.3f}"
            f"{r['faiss_single']['p50_ms']:>8.2f}{r['faiss_single']['p99_ms']:>8.2f}"
            f"{r['manager_single']['p50_ms']:>8.2f}{r['manager_single']['p99_ms']:>8.2f}"
            f"{r['batch64_qps']:>9.0f}{c['qps']:>9.0f}{c['p50_ms']:>7.1f}{c['p99_ms']:>7.1f}"
            f"{c['mean_batch']:>6.1f}"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1M)")
    parser.add_argument("--iters", type=int, default=300, help="single-query samples")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput phase")
    parser.add_argument("--callers", type=int, default=64, help="concurrent single callers")
    parser.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    parser.add_argument("--only", default="flat,ivf,hnsw", help="comma-separated kinds")
    args = parser.parse_args()
    vectors = clustered(args.n, seed=1, clusters=max(100, args.n // 1000))
    queries = clustered(1000, seed=2, clusters=max(100, args.n // 1000))
    ids = np.arange(args.n, dtype=np.int64) * 3 + 17
    t = time.perf_counter()
    truth = exact_top10(vectors, queries)
    print(f"n={args.n} dim={DIM} ground truth in {time.perf_counter() - t:.1f}s")
    devices: list[Literal["cpu", "gpu"]] = ["cpu", "gpu"] if gpu_count() > 0 else ["cpu"]
    variants = [(k, d) for d in devices for k in args.only.split(",")]
    rows = []
    for kind, device in variants:
        config = IndexConfig(
            exact_max=args.n + 1 if kind == "flat" else 1,
            approximate="ivf" if kind == "ivf" else "hnsw",
            device=device,
            omp_threads=args.threads,
        )
        row = await measure(f"{kind}-{device}", config, ids, vectors, queries, truth, args)
        print(table([row]).splitlines()[1], flush=True)
        rows.append(row)
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"retrieval_n{args.n}_{stamp}.json"
    meta = {
        "n": args.n,
        "dim": DIM,
        "threads": args.threads,
        "callers": args.callers,
        "faiss": faiss.__version__,
        "cpus": os.cpu_count(),
        "gpus": gpu_count(),
        "machine": platform.platform(),
        "date": stamp,
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
