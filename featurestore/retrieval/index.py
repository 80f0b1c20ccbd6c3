"""`EmbeddingIndex`: one immutable FAISS index of an embedding view, with its ids and stats.

Immutable once published: an update builds a new `EmbeddingIndex` (`with_changes`) and
the manager swaps the reference, so a search holding the old one finishes on it.

Invariants (n_labels = every label ever added to this generation):
    label_ids[label]   the entity id stored under a FAISS label (labels are positions)
    live[label]        False once the entity was deleted or re-upserted under a new label
    vectors[label]     the stored vector (unit length for cosine); for search by id,
                       exact allow-list search and rebuilds without asking FAISS
Dead labels are removed from IVF indexes (remove_ids) and masked in HNSW ones (which
cannot delete) by a bitmap selector on every search, until the next compaction.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import faiss as _faiss
import numpy as np
import numpy.typing as npt

from featurestore.errors import InvalidArgument
from featurestore.retrieval.spec import (
    IndexConfig,
    IndexKind,
    Vectors,
    build_faiss_index,
    cagra_params,
    gpu_kind,
    normalize,
    search_params,
    to_gpu,
)
from featurestore.types import Ids

# FAISS's bundled stubs miss most of its SWIG API (selectors, GPU, HNSW parameters).
faiss: Any = _faiss

__all__ = ["BuildStats", "EmbeddingIndex", "SearchResult", "check_vectors"]

_GPU_K_MAX = 2048  # FAISS GPU indexes answer at most this many neighbours per query


class SearchResult(NamedTuple):
    """Neighbours per query: entity ids (q, k) int64, -1 where fewer than k were found;
    scores (q, k) float32: inner product (cosine similarity for cosine) or squared L2
    distance; where an id is -1 its score is -inf (similarities) or +inf (L2)."""

    ids: Ids
    scores: npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class BuildStats:
    """How an index generation was built."""

    generation: int
    kind: str  # flat, ivf, hnsw or cagra
    device: str  # "cpu" or "gpu:<n>"
    vectors: int  # live vectors
    dead: int  # deleted vectors still masked in the index (HNSW), until compaction
    dim: int
    metric: str
    build_s: float
    memory_bytes_est: int
    incremental: bool  # True when made by copy + remove + add rather than a rebuild


def check_vectors(vectors: Any, dim: int, metric: str, what: str) -> Vectors:
    """`vectors` as a C-contiguous float32 (n, dim) array, unit rows for cosine.

    Raises InvalidArgument naming `what` for a wrong shape, NaN/inf or a zero vector
    under cosine (it has no direction).
    """
    try:
        array = np.ascontiguousarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} must be numbers convertible to float32: {exc}") from exc
    if array.ndim == 1 and array.shape[0] == dim:
        array = array.reshape(1, dim)
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidArgument(
            f"{what} have shape {array.shape}; expected (n, {dim}) for this view's {dim}-dimensional embeddings"
        )
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise InvalidArgument(
            f"{what} row {int(np.argmax(bad))} holds NaN or inf ({int(bad.sum())} such rows); send finite values"
        )
    if metric == "cosine" and array.shape[0]:
        zero = ~np.linalg.norm(array, axis=1).astype(bool)
        if zero.any():
            raise InvalidArgument(
                f"{what} row {int(np.argmax(zero))} is all zeros; a cosine view needs vectors with a direction"
            )
        array = normalize(array)
    return array


def check_ids(ids: Any, what: str, n: int | None = None) -> Ids:
    """`ids` as a 1-D int64 array (of length `n` when given), without duplicates."""
    array = np.asarray(ids)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidArgument(
            f"{what} must be a 1-D sequence of int64 entity ids, got dtype {array.dtype} and shape {array.shape}"
        )
    array = array.astype(np.int64, copy=False)
    if n is not None and array.shape[0] != n:
        raise InvalidArgument(f"{what}: {array.shape[0]} ids for {n} vectors")
    unique, counts = np.unique(array, return_counts=True)
    if unique.shape[0] != array.shape[0]:
        raise InvalidArgument(f"{what} repeat entity id {int(unique[counts > 1][0])}")
    return array


class EmbeddingIndex:
    """A built FAISS index of one view, its label -> entity id map and build stats."""

    __slots__ = (
        "_live_sel",
        "_sorted_ids",
        "_sorted_labels",
        "config",
        "cpu",
        "dim",
        "gpu",
        "kind",
        "label_ids",
        "live",
        "metric",
        "stats",
        "vectors",
    )

    def __init__(
        self,
        cpu: Any,
        kind: IndexKind,
        metric: str,
        config: IndexConfig,
        label_ids: Ids,
        live: npt.NDArray[np.bool_],
        vectors: Vectors,
        stats: BuildStats,
    ) -> None:
        self.cpu, self.gpu, self.kind, self.metric = cpu, None, kind, metric
        self.config, self.dim, self.stats = config, vectors.shape[1], stats
        self.label_ids, self.live, self.vectors = label_ids, live, vectors
        live_labels = np.flatnonzero(live)
        order = np.argsort(label_ids[live_labels], kind="stable")
        self._sorted_ids: Ids = label_ids[live_labels][order]
        self._sorted_labels: Ids = live_labels[order].astype(np.int64)
        self._live_sel: tuple[Any, Any] | None = None
        if stats.dead:  # HNSW tombstones: every search must skip them
            bitmap = np.packbits(live, bitorder="little")
            self._live_sel = (bitmap, faiss.IDSelectorBitmap(bitmap))

    def __len__(self) -> int:
        return int(self._sorted_ids.shape[0])

    @classmethod
    def build(cls, ids: Any, vectors: Any, metric: str, config: IndexConfig, generation: int = 1) -> EmbeddingIndex:
        """Build a CPU index of `vectors` (n, dim) under entity `ids` (n,), by `config`.

        Raises InvalidArgument for duplicate ids, a wrong shape, NaN/inf or zero cosine
        vectors. GPU placement is separate (`place_on_gpu`, on the GPU thread).
        """
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise InvalidArgument(f"vectors must be 2-D (n, dim), got shape {array.shape}")
        prepared = check_vectors(array, array.shape[1], metric, "vectors")
        return cls.from_checked(check_ids(ids, "ids", prepared.shape[0]), prepared, metric, config, generation)

    @classmethod
    def from_checked(
        cls, ids: Ids, vectors: Vectors, metric: str, config: IndexConfig, generation: int
    ) -> EmbeddingIndex:
        start = time.perf_counter()
        kind = config.kind_for(vectors.shape[0])
        if config.wants_gpu():
            kind = gpu_kind(kind, config)
        cpu = build_faiss_index(vectors, kind, metric, config)
        stored = _stored_vectors(cpu, kind, vectors)
        live = np.ones(ids.shape[0], dtype=bool)
        stats = _stats(
            generation,
            kind,
            cpu,
            stored.shape[0],
            0,
            metric,
            config,
            time.perf_counter() - start,
            incremental=False,
        )
        return cls(cpu, kind, metric, config, ids.copy(), live, stored, stats)

    def place_on_gpu(self) -> None:
        """Copy the index to the GPU when the config and FAISS allow; before publishing only."""
        self.gpu = to_gpu(self.cpu, self.kind, self.vectors, self.metric, self.config)
        if self.gpu is not None:
            device = f"gpu:{self.config.gpu_device}"
            self.stats = dataclasses.replace(self.stats, device=device)

    def labels_of(self, entity_ids: Ids) -> tuple[Ids, npt.NDArray[np.bool_]]:
        """Labels of the live `entity_ids` that are present, and which ones were found."""
        if not len(self):
            return np.empty(0, np.int64), np.zeros(entity_ids.shape[0], dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, entity_ids), len(self) - 1)
        found = self._sorted_ids[pos] == entity_ids
        return self._sorted_labels[pos[found]], found

    def with_changes(
        self, upsert_ids: Ids, upsert_vectors: Vectors, delete_ids: Ids, generation: int
    ) -> EmbeddingIndex:
        """A new generation with `upsert_*` added or replaced and `delete_ids` removed.

        Arguments are validated (`check_ids`, `check_vectors`). IVF and HNSW change a copy
        (remove/mask + add); flat, GPU-placed and heavily tombstoned indexes, and those
        crossing `exact_max`, are rebuilt from the live vectors.
        """
        start = time.perf_counter()
        gone, _ = self.labels_of(np.concatenate([upsert_ids, delete_ids]))
        live = self.live.copy()
        live[gone] = False
        n_live = int(live.sum()) + upsert_ids.shape[0]
        dead = int((~live).sum()) if self.kind == "hnsw" else 0
        if (
            self.kind not in ("ivf", "hnsw")
            or self.gpu is not None
            or self.config.kind_for(n_live) != self.kind
            or dead > self.config.max_tombstone_fraction * (live.shape[0] + upsert_ids.shape[0])
        ):
            ids = np.concatenate([self.label_ids[live], upsert_ids])
            vectors = np.concatenate([self.vectors[live], upsert_vectors])
            return EmbeddingIndex.from_checked(ids, vectors, self.metric, self.config, generation)
        cpu = faiss.clone_index(self.cpu)
        first = self.label_ids.shape[0]
        if self.kind == "ivf":
            if gone.size:
                cpu.remove_ids(faiss.IDSelectorBatch(gone))
            cpu.add_with_ids(upsert_vectors, np.arange(first, first + upsert_ids.shape[0]))
        else:
            cpu.add(upsert_vectors)  # HNSW labels continue from ntotal == first
        stored = _stored_vectors(cpu, self.kind, np.concatenate([self.vectors, upsert_vectors]))
        live = np.concatenate([live, np.ones(upsert_ids.shape[0], dtype=bool)])
        stats = _stats(
            generation,
            self.kind,
            cpu,
            n_live,
            dead,
            self.metric,
            self.config,
            time.perf_counter() - start,
            incremental=True,
        )
        return EmbeddingIndex(
            cpu,
            self.kind,
            self.metric,
            self.config,
            np.concatenate([self.label_ids, upsert_ids]),
            live,
            stored,
            stats,
        )

    def search(self, queries: Vectors, k: int, allow: Ids | None = None, exclude: Ids | None = None) -> SearchResult:
        """Search prepared `queries` (from `check_vectors`) for k neighbours; blocking.

        `allow` / `exclude` are labels (see `labels_of`). A small allow-list is searched
        exactly over its own vectors; otherwise a FAISS IDSelector filters on the CPU, and
        the GPU over-fetches and drops excluded labels (GPU indexes take no selectors).
        """
        if allow is not None:
            if exclude is not None and exclude.size:
                allow = np.setdiff1d(allow, exclude)
            if allow.size <= self.config.exact_subset_max:
                return self._exact_subset(queries, k, allow)
        fetch = k + (exclude.size if exclude is not None else 0)
        if self.gpu is not None and allow is None and fetch <= _GPU_K_MAX:
            params = cagra_params(fetch, self.config) if self.kind == "cagra" else None
            dist, labels = self.gpu.search(queries, fetch, params=params)
            if fetch > k:
                assert exclude is not None
                dist, labels = drop_where(dist, labels, np.isin(labels, exclude), k)
            return self._to_result(dist, labels)
        selector, keep_alive = self._selector(allow, exclude)
        nlist = int(self.cpu.nlist) if self.kind == "ivf" else 0
        params = search_params(self.kind, selector, k, self.config, nlist)
        dist, labels = self.cpu.search(queries, k, params=params)
        del keep_alive  # only now may the selector parts be freed
        return self._to_result(dist, labels)

    def _selector(self, allow: Ids | None, exclude: Ids | None) -> tuple[Any, list[Any]]:
        """The FAISS selector for a search (None: everything) and every part of it: SWIG
        selectors hold raw pointers to each other and to the bitmap, so the caller keeps
        the list alive until the search returns."""
        if allow is not None:  # allow labels are live ones already, minus the excluded
            batch = faiss.IDSelectorBatch(allow)
            return batch, [batch]
        outer: Any = None
        parts: list[Any] = []
        if exclude is not None and exclude.size:
            batch = faiss.IDSelectorBatch(exclude)
            outer = faiss.IDSelectorNot(batch)
            parts += [batch, outer]
        if self._live_sel is not None:
            bitmap, live = self._live_sel
            outer = live if outer is None else faiss.IDSelectorAnd(live, outer)
            parts += [bitmap, live, outer]
        return outer, parts

    def _exact_subset(self, queries: Vectors, k: int, allow: Ids) -> SearchResult:
        q = queries.shape[0]
        if allow.size == 0:
            return self._to_result(np.zeros((q, k), np.float32), np.full((q, k), -1, np.int64))
        vecs = self.vectors[allow]
        scores = queries @ vecs.T
        if self.metric == "l2":  # FAISS's own expansion, clamped like FAISS does
            norms = (queries**2).sum(1)[:, None] + (vecs**2).sum(1)[None, :]
            scores = np.maximum(norms - 2 * scores, 0)
        order_key = scores if self.metric == "l2" else -scores
        top = min(k, allow.size)
        part = np.argpartition(order_key, top - 1, axis=1)[:, :top]
        part = np.take_along_axis(part, np.argsort(np.take_along_axis(order_key, part, 1), axis=1, kind="stable"), 1)
        dist = np.full((q, k), 0, np.float32)
        labels = np.full((q, k), -1, np.int64)
        dist[:, :top] = np.take_along_axis(scores, part, 1)
        labels[:, :top] = allow[part]
        return self._to_result(dist, labels)

    def _to_result(self, dist: Any, labels: Any) -> SearchResult:
        missing = labels < 0
        ids = np.where(missing, -1, self.label_ids[np.where(missing, 0, labels)])
        pad = np.float32(np.inf if self.metric == "l2" else -np.inf)
        scores = np.where(missing, pad, dist).astype(np.float32, copy=False)
        return SearchResult(ids.astype(np.int64, copy=False), scores)


def drop_where(dist: Any, labels: Any, drop: npt.NDArray[np.bool_], k: int) -> tuple[Any, Any]:
    """Per row, the first k entries not marked in `drop`, padded with label -1."""
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    labels = np.where(np.take_along_axis(drop, order, 1), -1, np.take_along_axis(labels, order, 1))
    return np.take_along_axis(dist, order, 1), labels


def _stored_vectors(cpu: Any, kind: str, vectors: Vectors) -> Vectors:
    """The vectors by label. Flat and HNSW indexes already hold them contiguously, so
    theirs are a read-only view into FAISS's memory (no second copy of n x dim floats);
    valid while `cpu` lives and is not added to, which immutability guarantees."""
    n = vectors.shape[0]
    if kind == "ivf" or n == 0:
        return vectors
    flat = cpu if kind in ("flat", "cagra") else faiss.downcast_index(cpu.storage)
    view: Vectors = faiss.rev_swig_ptr(flat.get_xb(), n * vectors.shape[1]).reshape(n, -1)
    view.flags.writeable = False
    return view


def _stats(
    generation: int,
    kind: str,
    cpu: Any,
    live: int,
    dead: int,
    metric: str,
    config: IndexConfig,
    build_s: float,
    *,
    incremental: bool,
) -> BuildStats:
    n, dim = int(cpu.ntotal), int(cpu.d)
    memory = n * dim * 4
    if kind == "ivf":  # codes + ids + centroids, and our own copy of the vectors
        memory += n * 8 + int(cpu.nlist) * dim * 4 + (live + dead) * dim * 4
    elif kind == "hnsw":  # level 0 holds 2M neighbours, upper levels ~1/M of that again
        memory += int(n * (2 * config.hnsw_m * 4 * (1 + 1 / config.hnsw_m) + 8))
    return BuildStats(generation, kind, "cpu", live, dead, dim, metric, build_s, memory, incremental)
