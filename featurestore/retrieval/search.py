"""SearchSimilar: packed queries in, neighbours (and their features) out.

    result = await search_similar(indexes, lookup, "item_embedding", k=10,
                                  query_vectors=q.astype("<f4").tobytes(), query_count=len(q))
    result.ids, result.scores          # (queries, k) int64 / float32, -1 padded
    result.features                    # a LookupResult of the q x k neighbours, or None

The gRPC servicer only copies fields in and out; every check lives here, so it is tested
without a channel. Queries go through the view's `IndexManager` (validated on the loop,
searched on the FAISS thread, coalesced with concurrent requests); the neighbours'
features are one `Lookup.get_online_features` call, hence one Redis round trip.

Bad input raises InvalidArgument naming the value (wrong dimension, NaN or inf, k out of
range, malformed id lists); an unknown view NotFound; a feature view that is not an
embedding view InvalidArgument (the request names something that can never be
searched); an embedding view that cannot be indexed ConfigError (FAILED_PRECONDITION:
the server's configuration, not the request, must change); an index not built yet
Unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from featurestore.decode import LookupResult
from featurestore.errors import InvalidArgument
from featurestore.lookup import Lookup
from featurestore.retrieval.index import Ids
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.manager import IndexManager, SearchResult

__all__ = ["SimilarResult", "ids_from_bytes", "search_similar", "vectors_from_bytes"]


@dataclass(frozen=True, slots=True)
class SimilarResult:
    """Neighbours of each query and, when asked, their features.

    ids: (queries, k) int64, -1 where fewer than k were found.
    scores: (queries, k) float32 (see `metric`); -inf/+inf where the id is -1.
    features: one row per entry of `ids` (row-major), or None when none were asked.
    """

    ids: Ids
    scores: npt.NDArray[np.float32]
    metric: str
    generation: int
    features: LookupResult | None


def vectors_from_bytes(raw: bytes, count: int, dim: int, view: str) -> npt.NDArray[np.float32]:
    """`count` x `dim` little-endian float32 query vectors from `raw` (count 0: inferred)."""
    row_bytes = dim * 4
    if count == 0 and raw and len(raw) % row_bytes == 0:
        count = len(raw) // row_bytes
    if count == 0 or len(raw) != count * row_bytes:
        sent = f"{len(raw)} bytes" + (f" ({len(raw) / count / 4:g} floats per query)" if count else "")
        raise InvalidArgument(
            f"query_vectors hold {sent} for query_count={count}; view {view!r} takes"
            f" {dim}-dimensional float32 vectors: send query_count x {dim} x 4 bytes"
        )
    array: npt.NDArray[np.float32] = np.frombuffer(raw, dtype="<f4").reshape(count, dim)
    return array


def ids_from_bytes(raw: bytes, what: str) -> Ids:
    """Little-endian int64 entity ids packed in `raw`."""
    if len(raw) % 8:
        raise InvalidArgument(f"{what} hold {len(raw)} bytes: send packed int64, 8 bytes per id")
    ids: Ids = np.frombuffer(raw, dtype="<i8").astype(np.int64)
    return ids


async def search_similar(
    indexes: ViewIndexes,
    lookup: Lookup,
    view: str,
    *,
    k: int,
    query_vectors: bytes | None = None,
    query_count: int = 0,
    query_ids: bytes | None = None,
    exclude_query_entity: bool = False,
    allow_ids: bytes | None = None,
    exclude_ids: bytes = b"",
    features: tuple[str, ...] | list[str] = (),
    full_feature_names: bool = False,
    timeout_s: float | None = None,
) -> SimilarResult:
    """The k nearest entities of `view` to each query, and their features if asked.

    Parameters:
        view: an embedding view.
        k: neighbours per query, 1 to 1,000.
        query_vectors, query_count: packed float32 queries (see `vectors_from_bytes`);
            or query_ids: packed int64 entity ids whose stored embeddings are the queries.
        exclude_query_entity: with query_ids, an entity is never its own neighbour.
        allow_ids: packed int64; when not None, only these ids may be returned.
        exclude_ids: packed int64 ids never returned.
        features: references as in GetOnlineFeatures, looked up for the q x k neighbours
            keyed by the view's join key; empty: none.
        timeout_s: the caller's remaining time for the feature lookup.
    """
    manager = indexes.manager(view)
    allow = None if allow_ids is None else ids_from_bytes(allow_ids, "allow_ids")
    exclude = ids_from_bytes(exclude_ids, "exclude_ids") if exclude_ids else None
    index = manager.index  # the generation the search will run on (taken without a pause)
    generation = index.stats.generation if index is not None else 0
    result = await _search(
        manager, view, k, query_vectors, query_count, query_ids, exclude_query_entity, allow, exclude
    )
    looked_up = None
    if features:
        join_key = manager.view.join_keys[0].name
        looked_up = await lookup.get_online_features(
            {join_key: result.ids.reshape(-1)},
            list(features),
            full_feature_names=full_feature_names,
            timeout_s=timeout_s,
        )
    return SimilarResult(result.ids, result.scores, manager.spec.metric, generation, looked_up)


async def _search(
    manager: IndexManager,
    view: str,
    k: int,
    query_vectors: bytes | None,
    query_count: int,
    query_ids: bytes | None,
    exclude_query_entity: bool,
    allow: Any,
    exclude: Any,
) -> SearchResult:
    if (query_vectors is None) == (query_ids is None):
        raise InvalidArgument("set exactly one of query_vectors and query_ids")
    if query_ids is not None:
        ids = ids_from_bytes(query_ids, "query_ids")
        if not ids.size:
            raise InvalidArgument("query_ids is empty: send 1 to 10,000 entity ids")
        return await manager.search_by_id(
            ids, k, exclude_self=exclude_query_entity, exclude_ids=exclude, allow_ids=allow
        )
    if exclude_query_entity:
        raise InvalidArgument("exclude_query_entity applies to queries by entity id (query_ids), not by vector")
    assert query_vectors is not None
    vectors = vectors_from_bytes(query_vectors, query_count, manager.spec.dim, view)
    return await manager.search(vectors, k, exclude_ids=exclude, allow_ids=allow)
