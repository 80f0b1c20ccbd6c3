"""The retrieval core on small synthetic clustered data: exactness, recall, filters,
updates, swaps under load, coalescing and every bad input."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from featurestore.errors import ConfigError, InvalidArgument, NotFound, Unavailable
from featurestore.registry import JoinKey, VectorSpec, ViewDef
from featurestore.retrieval.index import EmbeddingIndex
from featurestore.retrieval.manager import IndexManager, search_thread
from featurestore.retrieval.spec import IndexConfig, gpu_count
from featurestore.store.layout import DType, FeatureSpec, Layout

DIM = 64
F32 = npt.NDArray[np.float32]


def clustered(n: int, seed: int = 0, clusters: int = 100, dim: int = DIM) -> F32:
    """Points around `clusters` centres in a 16-d subspace, plus a little full-rank noise:
    the shape real embeddings have (a low intrinsic dimension). Centres and subspace are
    fixed, so vectors and queries of different seeds share one distribution."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(12345).normal(size=(16, dim)) / 4
    centres = np.random.default_rng(54321).normal(size=(clusters, 16)) * 2
    latent = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, 16))
    return (latent @ basis + 0.05 * rng.normal(size=(n, dim))).astype(np.float32)


def view(metric: str = "cosine", dim: int = DIM) -> ViewDef:
    layout = Layout("item_embedding", (FeatureSpec("embedding", DType.FLOAT32_LIST, dim),))
    return ViewDef(
        name="item_embedding",
        join_keys=(JoinKey("item_id", DType.INT64),),
        ttl_s=0.0,
        layout=layout,
        table="item_embedding",
        timestamp_field="event_timestamp",
        created_field="",
        vector=VectorSpec("embedding", dim, metric),
    )


def brute_force(vectors: F32, queries: F32, k: int, metric: str) -> tuple[Any, Any]:
    """Exact neighbours (positions, scores) by numpy, as FAISS's flat index defines them."""
    if metric == "cosine":
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    dots = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    if metric == "l2":
        dist = (queries**2).sum(1)[:, None] + (vectors**2).sum(1)[None, :] - 2 * dots
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(dist, order, 1)
    order = np.argsort(-dots, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dots, order, 1)


def recall(found: Any, truth: Any) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return float(hits / truth.size)


async def manager_with(
    n: int, metric: str = "cosine", seed: int = 0, **config: Any
) -> tuple[IndexManager, npt.NDArray[np.int64], F32]:
    ids = np.arange(n, dtype=np.int64) * 7 + 1000  # entity ids are not positions
    vectors = clustered(n, seed)
    manager = IndexManager("test", view(metric), IndexConfig(device="cpu", **config))
    await manager.build(ids, vectors)
    return manager, ids, vectors


@pytest.mark.parametrize("metric", ["cosine", "inner_product", "l2"])
async def test_flat_matches_numpy_brute_force(metric: str) -> None:
    manager, ids, vectors = await manager_with(3000, metric)
    queries = clustered(40, seed=9)
    got_ids, got_scores = await manager.search(queries, k=10)
    order, scores = brute_force(vectors, queries, 10, metric)
    assert manager.index is not None and manager.index.kind == "flat"
    np.testing.assert_array_equal(got_ids, ids[order])
    np.testing.assert_allclose(got_scores, scores, rtol=1e-4, atol=1e-3)
    assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32


@pytest.fixture(scope="module")
def ann_data() -> tuple[npt.NDArray[np.int64], F32, F32]:
    n = 20_000
    return np.arange(n, dtype=np.int64) + 1, clustered(n, seed=1), clustered(200, seed=2)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
async def test_approximate_recall_at_10(kind: Any, ann_data: Any) -> None:
    ids, vectors, queries = ann_data
    config = IndexConfig(device="cpu", exact_max=1000, approximate=kind)
    manager = IndexManager("test", view("cosine"), config)
    stats = await manager.build(ids, vectors)
    assert stats.kind == kind and stats.vectors == 20_000
    if kind == "ivf":  # ~4 sqrt(n) lists, trained on these vectors
        assert manager.index is not None and manager.index.cpu.nlist == 512
    got, _ = await manager.search(queries, k=10)
    order, _ = brute_force(vectors, queries, 10, "cosine")
    assert recall(got, ids[order]) >= 0.95


async def test_exclude_and_allow_filters_on_flat_are_exact() -> None:
    manager, ids, vectors = await manager_with(2000, "l2")
    queries = clustered(5, seed=3)
    order, _ = brute_force(vectors, queries, 40, "l2")
    excluded = ids[order[:, :5]].ravel()  # each query's five best
    got, _ = await manager.search(queries, k=10, exclude_ids=excluded)
    assert not np.isin(got, excluded).any()
    allowed = ids[::3]
    got, scores = await manager.search(queries, k=10, allow_ids=allowed, exclude_ids=excluded)
    keep = np.flatnonzero(~np.isin(ids, excluded) & np.isin(ids, allowed))
    sub_order, sub_scores = brute_force(vectors[keep], queries, 10, "l2")
    np.testing.assert_array_equal(got, ids[keep][sub_order])
    np.testing.assert_allclose(scores, sub_scores, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
async def test_filters_on_approximate_indexes(kind: str) -> None:
    manager, ids, _ = await manager_with(4000, exact_max=1000, approximate=kind, exact_subset_max=10)
    queries = clustered(8, seed=4)
    first, _ = await manager.search(queries, k=10)
    got, _ = await manager.search(queries, k=10, exclude_ids=first.ravel())
    assert not np.isin(got, first).any() and (got >= 0).all()
    allowed = ids[:500]  # above exact_subset_max: an IDSelectorBatch inside FAISS
    got, _ = await manager.search(queries, k=10, allow_ids=allowed)
    assert np.isin(got[got >= 0], allowed).all() and (got >= 0).mean() > 0.9


async def test_allow_list_with_fewer_ids_than_k_pads() -> None:
    manager, ids, _ = await manager_with(500, "inner_product")
    got, scores = await manager.search(clustered(2, seed=5), k=5, allow_ids=[ids[3], 123456789])
    assert got[:, 0].tolist() == [ids[3]] * 2
    assert (got[:, 1:] == -1).all() and np.isneginf(scores[:, 1:]).all()


async def test_search_by_id_excludes_itself_on_request() -> None:
    manager, ids, _ = await manager_with(1000)
    got, _ = await manager.search_by_id(ids[:3], k=5)
    assert got.shape == (3, 5) and not (got == ids[:3, None]).any()
    got, scores = await manager.search_by_id(ids[:3], k=5, exclude_self=False)
    assert got[:, 0].tolist() == ids[:3].tolist()
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    with pytest.raises(NotFound, match="no vector for entity ids \\[5\\]"):
        await manager.search_by_id([5], k=5)


@pytest.mark.parametrize(("kind", "exact_max"), [("flat", 50_000), ("ivf", 1000), ("hnsw", 1000)])
async def test_upsert_and_delete_are_visible_to_the_next_search(kind: str, exact_max: int) -> None:
    manager, ids, vectors = await manager_with(
        3000, exact_max=exact_max, approximate=kind if kind != "flat" else "hnsw"
    )
    new = clustered(2, seed=6) * 5  # far from everything else
    moved, deleted = ids[10], ids[:10]
    stats = await manager.apply_changes([99_999, moved], new, delete_ids=deleted)
    assert stats.generation == 2 and stats.vectors == 3000 - 10 + 1
    assert stats.incremental is (kind != "flat") and stats.kind == kind
    got, _ = await manager.search(new, k=3)
    assert got[:, 0].tolist() == [99_999, moved]
    got, _ = await manager.search(vectors[:11], k=20)
    assert not np.isin(got, deleted).any()
    got, _ = await manager.search(vectors[10:11], k=50)
    assert moved not in got  # its old vector is gone
    got, _ = await manager.search_by_id([moved], k=1, exclude_self=False)
    assert got.tolist() == [[moved]]


async def test_hnsw_tombstones_are_compacted_past_the_limit() -> None:
    manager, ids, _ = await manager_with(2000, exact_max=1000, max_tombstone_fraction=0.2)
    small = await manager.apply_changes([], np.empty((0, DIM)), delete_ids=ids[:100])
    assert small.incremental and small.dead == 100
    got, _ = await manager.search(clustered(20, seed=7), k=50)
    assert not np.isin(got, ids[:100]).any()
    big = await manager.apply_changes([], np.empty((0, DIM)), delete_ids=ids[100:500])
    assert not big.incremental and big.dead == 0 and big.vectors == 1500


async def test_concurrent_searches_during_swaps_are_all_answered() -> None:
    n = 2000
    old_ids, new_ids = np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64) + 10**6
    manager = IndexManager("test", view(), IndexConfig(device="cpu"))
    await manager.build(old_ids, clustered(n, seed=1))
    queries = clustered(16, seed=8)

    async def one(i: int) -> npt.NDArray[np.int64]:
        await asyncio.sleep(0.0005 * (i % 50))
        got, _ = await manager.search(queries[i % 16], k=5)
        return got

    swaps = [manager.build(new_ids if s % 2 == 0 else old_ids, clustered(n, seed=s)) for s in range(6)]
    results: list[Any] = await asyncio.gather(*(one(i) for i in range(300)), *swaps)
    for got in results[:300]:
        assert got.shape == (1, 5)
        assert np.isin(got, old_ids).all() or np.isin(got, new_ids).all()
    assert manager.index is not None and manager.index.stats.generation == 7


async def test_concurrent_searches_are_coalesced_into_few_faiss_calls() -> None:
    manager, _, _ = await manager_with(2000)
    queries = clustered(64, seed=10)
    alone = [(await manager.search(q, k=3 + i % 5)) for i, q in enumerate(queries)]
    before = manager.faiss_calls
    together = await asyncio.gather(*(manager.search(q, k=3 + i % 5) for i, q in enumerate(queries)))
    assert manager.faiss_calls - before <= 2  # 64 searches, at most two FAISS calls
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


async def test_bad_inputs_raise_clear_errors() -> None:
    manager = IndexManager("test", view(), IndexConfig(device="cpu"))
    with pytest.raises(Unavailable, match="not built yet"):
        await manager.search(clustered(1), k=5)
    await manager.build(np.empty(0, np.int64), np.empty((0, DIM), np.float32))
    assert manager.ready
    with pytest.raises(NotFound, match="holds no vectors"):
        await manager.search(clustered(1), k=5)
    manager, ids, _ = await manager_with(500)
    q = clustered(2)
    cases: list[tuple[Any, str]] = [
        (manager.search(q[:, :32], k=5), r"shape \(2, 32\); expected \(n, 64\)"),
        (manager.search(np.where(np.eye(2, DIM) > 0, np.nan, q), k=5), "row 0 holds NaN or inf"),
        (manager.search(np.zeros((1, DIM)), k=5), "row 0 is all zeros"),
        (manager.search(q, k=0), "k=0 is out of range"),
        (manager.search(q, k=1001), "k=1001 is out of range"),
        (manager.search(q, k=True), "k=True is out of range"),
        (manager.search(q, k=5, allow_ids=[1.5]), "allow_ids must be a 1-D sequence"),
        (manager.search(np.empty((0, DIM)), k=5), "0 queries"),
        (manager.build([1, 1], clustered(2)), "repeat entity id 1"),
        (manager.build([1, 2], np.full((2, DIM), np.inf)), "vectors row 0 holds NaN or inf"),
        (manager.build([1], clustered(2)), "1 ids for 2 vectors"),
        (manager.apply_changes([1], clustered(1, dim=8), []), r"shape \(1, 8\)"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            await call
    small = IndexManager("t", view(), IndexConfig(device="cpu", max_filter_ids=3))
    await small.build(ids, clustered(500))
    with pytest.raises(InvalidArgument, match="exclude_ids holds 4 ids; at most 3"):
        await small.search(q, k=5, exclude_ids=[1, 2, 3, 4])


def test_config_and_view_validation() -> None:
    with pytest.raises(ConfigError, match="exact_max must be >= 1"):
        IndexConfig(exact_max=0)
    with pytest.raises(ConfigError, match="approximate must be 'hnsw' or 'ivf'"):
        IndexConfig(approximate="lsh")  # type: ignore[arg-type]
    if gpu_count() == 0:
        with pytest.raises(ConfigError, match="FAISS reports no GPU"):
            IndexConfig(device="gpu").wants_gpu()
    plain = view()
    no_vector = dataclasses.replace(plain, vector=None)
    with pytest.raises(ConfigError, match="no indexed vector"):
        IndexManager("t", no_vector)
    config = IndexConfig()
    assert (config.kind_for(49_999), config.kind_for(50_000)) == ("flat", "hnsw")
    assert config.nlist_for(1_000_000) == 4000


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="FAISS reports no GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
async def test_gpu_index_agrees_with_the_cpu(kind: str, ann_data: Any) -> None:
    ids, vectors, queries = ann_data
    settings = {"exact_max": 50_000 if kind == "flat" else 1000, "approximate": "hnsw" if kind == "flat" else kind}
    gpu = IndexManager("t", view(), IndexConfig(device="gpu", **settings))  # type: ignore[arg-type]
    stats = await gpu.build(ids, vectors)
    assert stats.device == "gpu:0"
    got, _ = await gpu.search(queries, k=10, exclude_ids=ids[:100])
    order, _ = brute_force(vectors, queries, 10, "cosine")
    assert not np.isin(got, ids[:100]).any()
    got, _ = await gpu.search(queries, k=10)
    assert recall(got, ids[order]) >= (0.999 if kind == "flat" else 0.9)


async def test_faiss_threads_are_set_on_the_search_thread() -> None:
    import faiss

    manager, _, _ = await manager_with(100, omp_threads=1)
    await manager.search(clustered(1), k=1)
    assert search_thread().submit(faiss.omp_get_max_threads).result() == 1


def test_embedding_index_build_is_usable_without_a_manager() -> None:
    index = EmbeddingIndex.build(np.arange(100), clustered(100, dim=8), "l2", IndexConfig())
    result = index.search(clustered(3, seed=1, dim=8), 4)
    assert result.ids.shape == (3, 4) and len(index) == 100
