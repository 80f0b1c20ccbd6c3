"""Searches of the embedding indexes: SearchSimilar, and Rank's candidates.

    query = SimilarQuery("item_embedding", k=10, vectors=q)        # q: (queries, dim) float32
    result = await search_similar(indexes, lookup, query)
    result.ids, result.scores          # (queries, k) int64 / float32, -1 padded
    result.features                    # a LookupResult of the q x k neighbours, or None

    candidates = Candidates(indexes)   # what inference's Rank retrieves through
    ids = await candidates.nearest("item_embedding", seed_ids=seeds, k=500, exclude_seeds=True)

The gRPC layer turns bytes into arrays (serving/wire.py); every check of their meaning
lives here, so it is tested without a channel. Queries go through the view's
`IndexManager` (validated on the loop, searched on the FAISS thread, coalesced with
concurrent requests); the neighbours' features are one `Lookup.get_online_features`
call, hence one Redis round trip.

Bad input raises InvalidArgument naming the value (wrong dimension, NaN or inf, k out of
range); an unknown view NotFound; a feature view that is not an embedding view
InvalidArgument (the request names something that can never be searched); an embedding
view that cannot be indexed ConfigError (FAILED_PRECONDITION: the server's configuration,
not the request, must change); an index not built yet Unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurestore.decode import LookupResult
from featurestore.errors import InvalidArgument, NotFound
from featurestore.lookup import Lookup
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.manager import IndexManager, SearchResult
from featurestore.types import Floats, Ids

__all__ = ["Candidates", "SimilarQuery", "SimilarResult", "search_similar"]


@dataclass(frozen=True, slots=True)
class SimilarQuery:
    """One SearchSimilar call.

    view: an embedding view.
    k: neighbours per query, 1 to 1,000.
    vectors: (queries, d) float32 query vectors, or a flat (n,) array whose rows the
        view's dimension decides; or
    ids: entity ids whose stored embeddings are the queries (exactly one of the two).
    exclude_query_entity: with `ids`, an entity is never its own neighbour.
    allow_ids: when not None, only these ids may be returned; exclude_ids: never these.
    features: references as in GetOnlineFeatures, looked up for the q x k neighbours
        keyed by the view's join key; empty: none.
    """

    view: str
    k: int
    vectors: Floats | None = None
    ids: Ids | None = None
    exclude_query_entity: bool = False
    allow_ids: Ids | None = None
    exclude_ids: Ids | None = None
    features: tuple[str, ...] = ()
    full_feature_names: bool = False


@dataclass(frozen=True, slots=True)
class SimilarResult:
    """Neighbours of each query and, when asked, their features.

    ids: (queries, k) int64, -1 where fewer than k were found.
    scores: (queries, k) float32 (see `metric`); -inf/+inf where the id is -1.
    features: one row per entry of `ids` (row-major), or None when none were asked.
    """

    ids: Ids
    scores: Floats
    metric: str
    generation: int
    features: LookupResult | None


async def search_similar(
    indexes: ViewIndexes, lookup: Lookup, query: SimilarQuery, *, timeout_s: float | None = None
) -> SimilarResult:
    """The k nearest entities of `query.view` to each query, and their features if asked.

    `timeout_s` is the caller's remaining time for the feature lookup (None: none).
    """
    manager = indexes.manager(query.view)
    index = manager.index  # the generation the search will run on (taken without a pause)
    generation = index.stats.generation if index is not None else 0
    result = await _search(manager, query)
    looked_up = None
    if query.features:
        join_key = manager.view.join_keys[0].name
        looked_up = await lookup.get_online_features(
            {join_key: result.ids.reshape(-1)},
            list(query.features),
            full_feature_names=query.full_feature_names,
            timeout_s=timeout_s,
        )
    return SimilarResult(result.ids, result.scores, manager.spec.metric, generation, looked_up)


async def _search(manager: IndexManager, query: SimilarQuery) -> SearchResult:
    if (query.vectors is None) == (query.ids is None):
        raise InvalidArgument("set exactly one of query_vectors and query_ids")
    exclude, allow = query.exclude_ids, query.allow_ids
    if query.ids is not None:
        if not query.ids.size:
            raise InvalidArgument("query_ids is empty: send 1 to 10,000 entity ids")
        return await manager.search_by_id(
            query.ids, query.k, exclude_self=query.exclude_query_entity, exclude_ids=exclude, allow_ids=allow
        )
    if query.exclude_query_entity:
        raise InvalidArgument("exclude_query_entity applies to queries by entity id (query_ids), not by vector")
    assert query.vectors is not None
    vectors = _queries(query.vectors, manager.spec.dim, query.view)
    return await manager.search(vectors, query.k, exclude_ids=exclude, allow_ids=allow)


def _queries(vectors: Floats, dim: int, view: str) -> Floats:
    """`vectors` as (queries, dim); a flat array is cut into rows of `dim`."""
    if vectors.ndim == 1 and vectors.size and vectors.size % dim == 0:
        return vectors.reshape(-1, dim)
    if vectors.ndim == 2 and vectors.shape[1] == dim and vectors.shape[0]:
        return vectors
    per_query = f"{vectors.shape[1]} floats per query" if vectors.ndim == 2 else f"{vectors.size} floats"
    raise InvalidArgument(
        f"query_vectors hold {per_query}; view {view!r} takes {dim}-dimensional float32 vectors:"
        f" send query_count x {dim} x 4 bytes"
    )


class Candidates:
    """Rank's candidate retrieval over the server's indexes (inference's CandidateSource).

    Parameters:
        indexes: the server's embedding indexes.
    """

    def __init__(self, indexes: ViewIndexes) -> None:
        self._indexes = indexes

    async def nearest(
        self, view: str, *, query_vector: Floats | None, seed_ids: Ids | None, k: int, exclude_seeds: bool
    ) -> Ids:
        """The ids of the `k` nearest entities of `view` to `query_vector`, or to the mean
        embedding of `seed_ids` (left out of the result with `exclude_seeds`).

        Raises InvalidArgument (not exactly one of the two, empty seeds), NotFound (a seed
        without a vector), and what `ViewIndexes.manager` and `IndexManager.search` raise.
        """
        manager = self._indexes.manager(view)
        if (query_vector is None) == (seed_ids is None):
            raise InvalidArgument("retrieval needs exactly one of query_vector and seed_ids")
        exclude = None
        if seed_ids is not None:
            index = manager.index
            if index is None or not seed_ids.size:
                raise InvalidArgument("seed_ids is empty" if index else f"{view!r} is not built")
            labels, found = index.labels_of(seed_ids)
            if not found.all():
                raise NotFound(f"view {view!r} has no vector for seed ids {seed_ids[~found][:10].tolist()}")
            query_vector = index.vectors[labels].mean(axis=0, dtype=np.float32)
            exclude = seed_ids if exclude_seeds else None
        assert query_vector is not None
        result = await manager.search(query_vector.reshape(1, -1), k, exclude_ids=exclude)
        ids: Ids = result.ids[0]
        return ids[ids >= 0]
