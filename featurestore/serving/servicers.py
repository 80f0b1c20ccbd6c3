"""The gRPC servicers: each RPC is parse (wire) -> one domain call -> build (wire).

    FeatureStore.GetOnlineFeatures  Lookup.get_online_features
    FeatureStore.SearchSimilar      retrieval.search.search_similar
    FeatureStore.Predict            inference.scoring.Scorer.predict
    FeatureStore.Rank               inference.scoring.Scorer.rank
    FeatureStoreAdmin.CacheStatus   cache.hotcache.HotCache.status

Servicers raise the errors of featurestore/errors.py and never abort themselves: the one
error interceptor (interceptors.py) maps them to statuses. Stage timings go to Prometheus
here, where the response is built.
"""

from __future__ import annotations

import time
from typing import Any, TypeAlias

from grpc import aio

from featurestore import metrics
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.cache.hotcache import HotCache
from featurestore.errors import InvalidArgument, Unavailable
from featurestore.inference.scoring import Scorer, Timings
from featurestore.limits import DEFAULT_TOP, MAX_TOP
from featurestore.lookup import Lookup
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.search import search_similar
from featurestore.serving import wire

__all__ = ["AdminServicer", "FeatureStoreServicer"]

Context: TypeAlias = "aio.ServicerContext[Any, Any]"


class FeatureStoreServicer(pb_grpc.FeatureStoreServicer):
    """The FeatureStore service of one server.

    Parameters:
        lookup: feature lookups.
        redis_timeout_s: the Redis socket timeout, float seconds: a caller's deadline
            shorter than it bounds the feature reads instead.
        indexes: the retrieval indexes (None: SearchSimilar is UNAVAILABLE).
        scorer: the models (None: Predict and Rank are UNAVAILABLE).
    """

    def __init__(
        self,
        lookup: Lookup,
        redis_timeout_s: float,
        indexes: ViewIndexes | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self._lookup = lookup
        self._redis_timeout_s = redis_timeout_s
        self._indexes = indexes
        self._scorer = scorer

    async def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: Context
    ) -> pb.GetOnlineFeaturesResponse:
        result = await self._lookup.get_online_features(
            wire.entities(request.entities),
            request.features,
            full_feature_names=request.full_feature_names,
            timeout_s=self._read_timeout_s(context),
        )
        start = time.perf_counter()
        response = wire.features_response(result)
        plan_s, redis_s, decode_s = result.timings_s
        metrics.STAGE_PLAN.observe(plan_s)
        metrics.STAGE_REDIS.observe(redis_s)
        metrics.STAGE_DECODE.observe(decode_s)
        metrics.STAGE_RESPONSE.observe(time.perf_counter() - start)
        return response

    async def SearchSimilar(self, request: pb.SearchSimilarRequest, context: Context) -> pb.SearchSimilarResponse:
        if self._indexes is None:
            raise Unavailable("this server has no retrieval indexes")
        query = wire.search_query(request)
        result = await search_similar(self._indexes, self._lookup, query, timeout_s=self._read_timeout_s(context))
        return wire.search_response(result)

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        scorer = self._models()
        call = wire.predict_call(request)
        result = await scorer.predict(
            call.model, call.entities, call.request_values, timeout_s=context.time_remaining()
        )
        response = wire.predict_response(result, request.return_breakdown)
        _observe(result.timings)
        return response

    async def Rank(self, request: pb.RankRequest, context: Context) -> pb.RankResponse:
        scorer = self._models()
        call = wire.rank_call(request)
        result = await scorer.rank(
            call.model,
            call.context,
            candidate_ids=call.candidate_ids,
            retrieval=call.retrieval,
            top_n=call.top_n,
            request_values=call.request_values,
            timeout_s=context.time_remaining(),
        )
        response = wire.rank_response(result, request.return_breakdown)
        _observe(result.timings)
        return response

    def _models(self) -> Scorer:
        if self._scorer is None:
            raise Unavailable("this server serves no models")
        return self._scorer

    def _read_timeout_s(self, context: Context) -> float | None:
        """The caller's remaining time when it is shorter than the Redis socket timeout
        (which bounds every Redis call anyway), else None."""
        remaining = context.time_remaining()
        return remaining if remaining is not None and remaining < self._redis_timeout_s else None


def _observe(timings: Timings) -> None:
    metrics.INFERENCE_SERIALIZATION.observe(timings.serialization)
    metrics.INFERENCE_TOTAL.observe(timings.total)
    if timings.retrieval:
        metrics.INFERENCE_RETRIEVAL.observe(timings.retrieval)


class AdminServicer(pb_grpc.FeatureStoreAdminServicer):
    """Answers CacheStatus from this replica's cache (None: the cache is off)."""

    def __init__(self, cache: HotCache | None) -> None:
        self._cache = cache

    async def CacheStatus(self, request: pb.CacheStatusRequest, context: Context) -> pb.CacheStatusResponse:
        top = request.top or DEFAULT_TOP
        if top > MAX_TOP:
            raise InvalidArgument(f"top must be at most {MAX_TOP}, not {top}")
        return wire.cache_status_response(None if self._cache is None else await self._cache.status(top))
