"""The admin servicer: FeatureStoreAdmin.CacheStatus, one replica's hot-key cache.

It reports hit ratio, entries and bytes against the budget, evictions, invalidations,
lost events, the last warm-up and the hottest keys (`featurestore cache-status` prints
them). The same figures are Prometheus metrics (featurestore/metrics.py) apart from the
keys, which would be a label of unbounded cardinality there.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.cache.hotcache import HotCache
from featurestore.errors import InvalidArgument
from featurestore.limits import MAX_TOP

__all__ = ["DEFAULT_TOP", "AdminServicer"]

DEFAULT_TOP = 20


class AdminServicer(pb_grpc.FeatureStoreAdminServicer):
    """Answers CacheStatus from this replica's cache (None: the cache is off)."""

    def __init__(self, cache: HotCache | None) -> None:
        self._cache = cache

    async def CacheStatus(
        self, request: pb.CacheStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CacheStatusResponse:
        top = request.top or DEFAULT_TOP
        if top > MAX_TOP:
            raise InvalidArgument(f"top must be at most {MAX_TOP}, not {top}")
        if self._cache is None:
            return pb.CacheStatusResponse(enabled=False)
        status = await self._cache.status(top)
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
