"""How an embedding view's FAISS index is chosen, built and placed on a device.

`IndexConfig` is the frozen set of choices; `build_faiss_index` turns vectors into a CPU
index by those choices; `to_gpu` places a copy on the GPU when FAISS reports one. The
index manager in `featurestore.retrieval.manager` owns the rest (ids, swaps, searches).

Labels. Every index here stores *positions* (0, 1, 2, ... in insertion order) as its
FAISS labels, never entity ids: HNSW and CAGRA cannot take arbitrary ids and GPU indexes
differ in what they accept, so one scheme for all keeps the id mapping in one place
(`EmbeddingIndex.label_ids`, a numpy array) and makes filters plain label sets.

Choice by size and hardware:

    n < exact_max                 flat (exact)
    n >= exact_max, kind "ivf"    IVF-Flat, nlist ~ 4 * sqrt(n), trained on a sample of
                                  the real vectors; nprobe per search
    n >= exact_max, kind "hnsw"   HNSW-Flat, M = 32; efSearch per search
    on a GPU                      flat and IVF are copied to the GPU; HNSW has no GPU form
                                  in FAISS, so it becomes CAGRA when `use_cagra` and the
                                  installed FAISS has `GpuIndexCagra`, else stays on the CPU
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

import faiss as _faiss
import numpy as np
import numpy.typing as npt

from featurestore.errors import ConfigError

# FAISS's bundled stubs miss most of its SWIG API (selectors, GPU, HNSW parameters).
faiss: Any = _faiss

__all__ = [
    "IndexConfig",
    "Metric",
    "build_faiss_index",
    "gpu_count",
    "normalize",
    "search_params",
    "set_faiss_threads",
    "to_gpu",
]

Metric = Literal["cosine", "inner_product", "l2"]
IndexKind = Literal["flat", "ivf", "hnsw", "cagra"]
Vectors = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """Choices for one embedding view's index; validated on construction.

    Parameters:
        exact_max: below this many vectors the index is exact (flat).
        approximate: the index at and above `exact_max`: "hnsw" or "ivf".
        ivf_nlist: IVF lists; 0 means 4 * sqrt(n), at least 16.
        ivf_nprobe: lists visited per IVF search; 0 means nlist / 16 within [16, 256],
            so recall holds as n (and with it nlist) grows: a fixed nprobe of 16 already
            falls to ~0.93 recall@10 at 20k clustered vectors.
        ivf_train_max: at most this many real vectors (a random sample) train IVF, or
            40 per list when that is more (FAISS's minimum for stable centroids).
        hnsw_m: HNSW graph degree.
        hnsw_ef_construction, hnsw_ef_search: HNSW build and search beam widths
            (a search uses max(ef_search, k)).
        device: "auto" (GPU when FAISS reports one), "cpu" or "gpu" (fail without one).
        gpu_device: which GPU.
        use_cagra: on a GPU, build CAGRA instead of the CPU-only HNSW.
        omp_threads: OpenMP threads per FAISS call (searches and builds). 1 by default:
            the server runs one process per core, and oversubscribed OpenMP threads spin
            and make the tail.
        max_batch: most queries the coalescing searcher sends to FAISS in one call.
        exact_subset_max: an allow-list up to this size is searched exactly over just
            those vectors (better and faster than a filtered ANN search).
        max_tombstone_fraction: HNSW cannot delete; deleted vectors are masked until they
            exceed this fraction of the index, then it is rebuilt.
        max_filter_ids: most ids an allow- or exclude-list may hold.
    """

    exact_max: int = 50_000
    approximate: Literal["hnsw", "ivf"] = "hnsw"
    ivf_nlist: int = 0
    ivf_nprobe: int = 0
    ivf_train_max: int = 100_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    device: Literal["auto", "cpu", "gpu"] = "auto"
    gpu_device: int = 0
    use_cagra: bool = True
    cagra_graph_degree: int = 32
    cagra_itopk: int = 64
    omp_threads: int = 1
    max_batch: int = 256
    exact_subset_max: int = 10_000
    max_tombstone_fraction: float = 0.2
    max_filter_ids: int = 100_000

    def __post_init__(self) -> None:
        positive = (
            "exact_max",
            "ivf_train_max",
            "hnsw_m",
            "hnsw_ef_construction",
            "hnsw_ef_search",
            "cagra_graph_degree",
            "cagra_itopk",
            "omp_threads",
            "max_batch",
            "max_filter_ids",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.approximate not in ("hnsw", "ivf"):
            raise ConfigError(f"IndexConfig.approximate must be 'hnsw' or 'ivf', got {self.approximate!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"IndexConfig.device must be auto, cpu or gpu, got {self.device!r}")
        if not 0.0 < self.max_tombstone_fraction < 1.0:
            raise ConfigError(
                f"IndexConfig.max_tombstone_fraction must be in (0, 1), got {self.max_tombstone_fraction}"
            )
        if min(self.ivf_nlist, self.ivf_nprobe, self.exact_subset_max) < 0:
            raise ConfigError("IndexConfig.ivf_nlist, ivf_nprobe, exact_subset_max must be >= 0")

    def kind_for(self, n: int) -> IndexKind:
        """The CPU index kind for `n` vectors (before any GPU placement)."""
        return "flat" if n < self.exact_max else self.approximate

    def nlist_for(self, n: int) -> int:
        """IVF lists for `n` vectors: the configured number, else ~4 * sqrt(n)."""
        nlist = self.ivf_nlist or max(16, int(4 * math.sqrt(n)))
        return min(nlist, max(1, n // 39))  # FAISS wants >= 39 training points per list

    def nprobe_for(self, nlist: int) -> int:
        """IVF lists probed per search for an index of `nlist` lists."""
        return min(nlist, self.ivf_nprobe or max(16, min(256, nlist // 16)))

    def wants_gpu(self) -> bool:
        """True when the index should be placed on a GPU; raises if "gpu" and none."""
        if self.device == "cpu":
            return False
        available = gpu_count() > 0 and hasattr(faiss, "StandardGpuResources")
        if self.device == "gpu" and not available:
            raise ConfigError(
                "IndexConfig.device is 'gpu' but FAISS reports no GPU: "
                "install faiss-gpu on a machine with a GPU, or use 'auto'"
            )
        return available


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu, which lacks the GPU symbols)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def set_faiss_threads(n: int) -> None:
    """Set FAISS's OpenMP thread count for FAISS calls made from the calling thread.

    libgomp keeps this setting per thread: set it on the thread that calls FAISS.
    """
    faiss.omp_set_num_threads(max(1, min(n, os.cpu_count() or 1)))


def faiss_metric(metric: str) -> int:
    """The FAISS metric constant; cosine is inner product over normalised vectors."""
    return int(faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)


def normalize(vectors: Vectors) -> Vectors:
    """Rows scaled to unit L2 norm (a new array); callers reject zero rows first."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: Vectors = (vectors / norms).astype(np.float32, copy=False)
    return out


def build_faiss_index(vectors: Vectors, kind: IndexKind, metric: str, config: IndexConfig, seed: int = 1234) -> Any:
    """A CPU index of `kind` holding `vectors` under labels 0..n-1.

    `vectors` are already normalised for cosine. IVF is trained on a random sample of
    these same vectors (at most `ivf_train_max`), never on synthetic data: the lists must
    follow the real distribution or recall collapses. A "cagra" index keeps a flat CPU
    master: the graph lives on the GPU and the master only serves fallbacks and rebuilds.
    """
    n, dim = vectors.shape
    fmetric = faiss_metric(metric)
    if kind in ("flat", "cagra"):
        index: Any = faiss.IndexFlat(dim, fmetric)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, fmetric)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    else:
        quantizer = faiss.IndexFlat(dim, fmetric)
        index = faiss.IndexIVFFlat(quantizer, dim, config.nlist_for(n), fmetric)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index frees it
        rng = np.random.default_rng(seed)
        nlist = int(index.nlist)  # FAISS warns below 39 training points per list
        take = min(n, max(config.ivf_train_max, 40 * nlist))
        sample = vectors if take == n else vectors[np.sort(rng.choice(n, take, replace=False))]
        index.train(sample)
        index.nprobe = config.nprobe_for(index.nlist)
    if n:
        if kind == "ivf":
            index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
        else:
            index.add(vectors)
    return index


def search_params(kind: str, sel: Any, k: int, config: IndexConfig, nlist: int = 0) -> Any:
    """Per-call FAISS search parameters: the selector and the kind's beam/probe width.

    Passed per call rather than set on the index, so one index is safely shared by
    concurrent searches and builds.
    """
    if kind == "ivf":
        return faiss.SearchParametersIVF(sel=sel, nprobe=config.nprobe_for(nlist))
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=sel, efSearch=max(config.hnsw_ef_search, k))
    return faiss.SearchParameters(sel=sel)


class _GpuResources:
    """One StandardGpuResources per process, made on first use (it reserves GPU memory)."""

    _lock = threading.Lock()
    _resources: Any = None

    @classmethod
    def get(cls) -> Any:
        with cls._lock:
            if cls._resources is None:
                cls._resources = faiss.StandardGpuResources()
            return cls._resources


def to_gpu(cpu_index: Any, kind: IndexKind, vectors: Vectors, metric: str, config: IndexConfig) -> Any | None:
    """A GPU copy of `cpu_index` (or a CAGRA graph of `vectors`); None when it stays on CPU.

    Must run on the single GPU thread (see retrieval): StandardGpuResources is not safe
    to use from two threads at once.
    """
    if not config.wants_gpu():
        return None
    resources = _GpuResources.get()
    if kind == "cagra":
        cagra_config = faiss.GpuIndexCagraConfig()
        cagra_config.graph_degree = config.cagra_graph_degree
        cagra_config.intermediate_graph_degree = 2 * config.cagra_graph_degree
        cagra_config.device = config.gpu_device
        index = faiss.GpuIndexCagra(resources, vectors.shape[1], faiss_metric(metric), cagra_config)
        index.train(vectors)  # CAGRA builds its graph in train; labels are row numbers
        return index
    if kind == "hnsw":
        return None  # FAISS has no GPU HNSW; the graph stays on the CPU
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False  # keep scores identical to the CPU master
    return faiss.index_cpu_to_gpu(resources, config.gpu_device, cpu_index, options)


def gpu_kind(kind: IndexKind, config: IndexConfig) -> IndexKind:
    """The kind actually built when the index goes to a GPU: HNSW becomes CAGRA if it can."""
    if kind == "hnsw" and config.use_cagra and hasattr(faiss, "GpuIndexCagra"):
        return "cagra"
    return kind


def cagra_params(k: int, config: IndexConfig) -> Any:
    """CAGRA search parameters (itopk must be >= k), when this FAISS has them."""
    if not hasattr(faiss, "SearchParametersCagra"):
        return None
    params = faiss.SearchParametersCagra()
    params.itopk_size = max(config.cagra_itopk, k)
    return params
