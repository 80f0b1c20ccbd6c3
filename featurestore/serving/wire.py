"""Every translation between protobuf and the domain: the servicers call nothing else.

    request (proto) -> parse here -> one domain call -> build here -> response (proto)

Parsing checks the form of a request (packed bytes of the right width, one value list per
column, a oneof set) and raises InvalidArgument naming the field; what the values mean
(a known view, a vector of the right dimension, a join key of the right type) is the
domain's to check. GetOnlineFeatures: `entities`, `features_response`. SearchSimilar:
`search_query`, `search_response`. Predict and Rank: `predict_call`, `rank_call`,
`predict_response`, `rank_response`. CacheStatus: `cache_status_response`.

Everything in a response but the bytes of values, offsets, statuses and timestamps
depends only on the request plan (column names, types, lengths, views). So each plan's
metadata is built into a template message once; a response is a C-level copy of it with
the per-request bytes set: about five times cheaper than constructing fifty
FeatureColumn messages per request, and byte-identical on the wire.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.cache.hotcache import CacheStatus
from featurestore.decode import LookupResult, RequestPlan
from featurestore.errors import InvalidArgument
from featurestore.inference.scoring import Ranked, RequestColumn, RequestColumns, Retrieval, Scored, Timings
from featurestore.retrieval.search import SimilarQuery, SimilarResult
from featurestore.store.layout import DType

__all__ = [
    "PredictCall",
    "RankCall",
    "cache_status_response",
    "entities",
    "features_response",
    "float32s",
    "ids",
    "predict_call",
    "predict_response",
    "rank_call",
    "rank_response",
    "request_values",
    "search_query",
    "search_response",
]

_VALUE_TYPES = {dtype: pb.ValueType.Value(f"VALUE_TYPE_{dtype.name}") for dtype in DType}
_TEMPLATES_MAX = 512
# Templates by plan. Plans are cached by the Lookup and replaced when the registry
# changes; the cap keeps templates of retired plans from piling up.
_templates: dict[RequestPlan, pb.GetOnlineFeaturesResponse] = {}


def _template(plan: RequestPlan) -> pb.GetOnlineFeaturesResponse:
    template = _templates.get(plan)
    if template is None:
        template = pb.GetOnlineFeaturesResponse(
            columns=[
                pb.FeatureColumn(name=c.name, value_type=_VALUE_TYPES[c.dtype], length=c.length, view=c.view)
                for c in plan.columns
            ],
            views=[pb.ViewTimestamps(view=name) for name in plan.view_names],
        )
        if len(_templates) >= _TEMPLATES_MAX:
            _templates.clear()
        _templates[plan] = template
    return template


def features_response(result: LookupResult) -> pb.GetOnlineFeaturesResponse:
    """The wire form of a lookup's result."""
    response = pb.GetOnlineFeaturesResponse()
    response.CopyFrom(_template(result.plan))
    response.row_count = result.rows
    for column, values, offsets, statuses in zip(
        response.columns, result.values, result.offsets, result.statuses, strict=True
    ):
        column.values = values
        if offsets:
            column.offsets = offsets
        column.statuses = statuses
    for view, timestamps in zip(response.views, result.event_ts_us, strict=True):
        view.event_timestamps_us = timestamps
    return response


def entities(columns: Sequence[pb.EntityColumn]) -> dict[str, Sequence[Any]]:
    """Join-key name -> values, from a request's entity columns (checked by the lookup)."""
    out: dict[str, Sequence[Any]] = {}
    for column in columns:
        if column.name in out:
            raise InvalidArgument(f"entity column {column.name!r} is sent twice")
        ints, strings = column.int64_values, column.string_values
        if ints and strings:
            raise InvalidArgument(f"entity column {column.name!r} sets both int64_values and string_values")
        out[column.name] = strings if strings else ints
    return out


def ids(raw: bytes, what: str) -> npt.NDArray[np.int64]:
    """Little-endian int64 entity ids packed in `raw` (field `what`)."""
    if len(raw) % 8:
        raise InvalidArgument(f"{what} hold {len(raw)} bytes: send packed int64, 8 bytes per id")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def float32s(raw: bytes, what: str) -> npt.NDArray[np.float32]:
    """Little-endian float32 values packed in `raw` (field `what`)."""
    if len(raw) % 4:
        raise InvalidArgument(f"{what} hold {len(raw)} bytes: send packed float32, 4 bytes each")
    return np.frombuffer(raw, dtype="<f4")


# SearchSimilar ---------------------------------------------------------------------------


def search_query(request: pb.SearchSimilarRequest) -> SimilarQuery:
    """A SearchSimilarRequest as the domain's query (arrays instead of packed bytes)."""
    which = request.WhichOneof("query")
    vectors = None
    if which == "query_vectors":
        flat = float32s(request.query_vectors, "query_vectors")
        count = request.query_count
        if count and flat.size % count:
            raise InvalidArgument(
                f"query_vectors hold {flat.size} floats for query_count={count}: send query_count x dim floats"
            )
        vectors = flat.reshape(count, -1) if count and flat.size else flat
    return SimilarQuery(
        request.view,
        request.k,
        vectors=vectors,
        ids=ids(request.query_ids, "query_ids") if which == "query_ids" else None,
        exclude_query_entity=request.exclude_query_entity,
        allow_ids=ids(request.allow_ids, "allow_ids") if request.HasField("allow_ids") else None,
        exclude_ids=ids(request.exclude_ids, "exclude_ids") if request.exclude_ids else None,
        features=tuple(request.features),
        full_feature_names=request.full_feature_names,
    )


def search_response(result: SimilarResult) -> pb.SearchSimilarResponse:
    """The wire form of a search's neighbours (and their features)."""
    q, k = result.ids.shape
    return pb.SearchSimilarResponse(
        query_count=q,
        k=k,
        ids=result.ids.astype("<i8", copy=False).tobytes(),
        scores=result.scores.astype("<f4", copy=False).tobytes(),
        metric=result.metric,
        index_generation=result.generation,
        features=None if result.features is None else features_response(result.features),
    )


# Predict and Rank ------------------------------------------------------------------------


class PredictCall(NamedTuple):
    """A PredictRequest's arguments for `Scorer.predict`."""

    model: str
    entities: dict[str, Sequence[Any]]
    request_values: RequestColumns


class RankCall(NamedTuple):
    """A RankRequest's arguments for `Scorer.rank`: exactly one of `candidate_ids` and
    `retrieval` is set."""

    model: str
    context: dict[str, Sequence[Any]]
    candidate_ids: npt.NDArray[np.int64] | None
    retrieval: Retrieval | None
    top_n: int
    request_values: RequestColumns


def predict_call(request: pb.PredictRequest) -> PredictCall:
    return PredictCall(request.model, entities(request.entities), request_values(request.request_values))


def rank_call(request: pb.RankRequest) -> RankCall:
    which = request.WhichOneof("candidates")
    if which is None:
        raise InvalidArgument("send candidate_ids or retrieval")
    candidate_ids, retrieval = None, None
    if which == "candidate_ids":
        candidate_ids = ids(request.candidate_ids, "candidate_ids")
    else:
        r = request.retrieval
        query = r.WhichOneof("query")
        retrieval = Retrieval(
            view=r.view,
            query_vector=float32s(r.query_vector, "query_vector") if query == "query_vector" else None,
            seed_ids=ids(r.seed_ids, "seed_ids") if query == "seed_ids" else None,
            n_candidates=r.n_candidates,
            exclude_seeds=not r.keep_seeds,
        )
    return RankCall(
        request.model,
        entities(request.entities),
        candidate_ids,
        retrieval,
        request.top_n,
        request_values(request.request_values),
    )


def request_values(columns: Sequence[pb.RequestColumn]) -> RequestColumns:
    """Request-time model inputs: name -> (kind, values), one value list per column."""
    out: dict[str, RequestColumn] = {}
    for column in columns:
        if column.name in out:
            raise InvalidArgument(f"request value {column.name!r} is sent twice")
        lists = [
            (kind, values)
            for kind, values in (
                ("float", column.float_values),
                ("int64", column.int64_values),
                ("bool", column.bool_values),
            )
            if values
        ]
        if len(lists) != 1:
            raise InvalidArgument(
                f"request value {column.name!r} must set exactly one of float_values,"
                f" int64_values and bool_values (it sets {len(lists)})"
            )
        out[column.name] = RequestColumn(*lists[0])
    return out


def predict_response(result: Scored, breakdown: bool) -> pb.PredictResponse:
    """The wire form of a Predict result; `breakdown` adds the per-stage timings."""
    start = time.perf_counter()
    response = pb.PredictResponse(
        row_count=result.scores.shape[0],
        scores=result.scores.astype("<f4").tobytes(),
        statuses=[pb.InputStatuses(input=k, statuses=v) for k, v in result.statuses.items()],
        model_version=result.version,
    )
    _finish(response, result.timings, start, breakdown)
    return response


def rank_response(result: Ranked, breakdown: bool) -> pb.RankResponse:
    """The wire form of a Rank result; `breakdown` adds the per-stage timings."""
    start = time.perf_counter()
    response = pb.RankResponse(
        ids=result.ids.astype("<i8").tobytes(),
        scores=result.scores.astype("<f4").tobytes(),
        candidate_count=result.candidates,
        model_version=result.version,
    )
    _finish(response, result.timings, start, breakdown)
    return response


def _finish(response: pb.PredictResponse | pb.RankResponse, timings: Timings, start: float, breakdown: bool) -> None:
    """Count the serialization into the call's timings, and report them if asked."""
    end = time.perf_counter()
    timings.serialization = end - start
    timings.total += end - start
    if breakdown:
        us = {f"{k}_us": v * 1e6 for k, v in timings.as_dict().items()}
        response.breakdown.CopyFrom(
            pb.LatencyBreakdown(batch_requests=timings.batch_requests, batch_rows=timings.batch_rows, **us)
        )


# CacheStatus -----------------------------------------------------------------------------


def cache_status_response(status: CacheStatus | None) -> pb.CacheStatusResponse:
    """The wire form of one replica's cache status (None: the cache is off)."""
    if status is None:
        return pb.CacheStatusResponse(enabled=False)
    return pb.CacheStatusResponse(
        enabled=True,
        serving=status.serving,
        entries=status.entries,
        bytes=status.size_bytes,
        budget_bytes=status.budget_bytes,
        hits=status.hits,
        misses=status.misses,
        hit_ratio=status.hit_ratio,
        evictions=status.evictions,
        invalidations=status.invalidations,
        lost_events=status.lost_events,
        bypassed=status.bypassed,
        warm_seconds=status.warm_seconds,
        warmed_rows=status.warmed_rows,
        top_keys=[pb.HotKey(key=key, count=count) for key, count in status.top],
    )
