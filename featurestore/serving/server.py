"""The gRPC server: the FeatureStore servicer, health, reflection, registry refresh.

The servicer only translates: proto request -> `Lookup` -> proto response. Errors are
raised and mapped to statuses by `interceptors.ErrorInterceptor`.

Life cycle (`FeatureServer`): start -> health NOT_SERVING -> the registry is loaded and
Redis answers PING -> SERVING. A background task re-reads the registry every
`registry_refresh_s` off the event loop and swaps it in when its fingerprint changed
(`feast apply` needs no restart). With `cache_bytes` > 0 the hot-key cache
(hotcache.py) follows materialization events from start-up, is warmed with the fleet's hot
set within `warm_budget_s` before SERVING, and publishes this server's hot keys every
`hot_publish_s`. On stop: NOT_SERVING, then in-flight calls drain
within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from featurestore import metrics
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.cache.hotcache import HotCache
from featurestore.config import Settings
from featurestore.errors import ConfigError, Unavailable
from featurestore.limits import MAX_MESSAGE_BYTES
from featurestore.lookup import Lookup
from featurestore.registry import load_registry
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.search import search_similar
from featurestore.retrieval.spec import IndexConfig
from featurestore.serving import wire
from featurestore.serving.admin import AdminServicer
from featurestore.serving.inference_rpc import InferenceRpc
from featurestore.serving.interceptors import ErrorInterceptor
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import connect
from featurestore.tasks import cancel_all

__all__ = ["SERVICE_NAME", "FeatureServer", "FeatureStoreServicer", "run"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStore"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStoreAdmin"].full_name


class FeatureStoreServicer(pb_grpc.FeatureStoreServicer):
    """Translates GetOnlineFeatures between protobuf and `Lookup`, and SearchSimilar
    between protobuf and `search.search_similar`."""

    def __init__(
        self,
        lookup: Lookup,
        redis_timeout_s: float,
        indexes: ViewIndexes | None = None,
        inference: InferenceRpc | None = None,
    ) -> None:
        self._lookup = lookup
        self._redis_timeout_s = redis_timeout_s
        self._indexes = indexes
        self._inference = inference  # Predict and Rank (inference_rpc.py)

    async def Predict(self, request: pb.PredictRequest, context: aio.ServicerContext[Any, Any]) -> pb.PredictResponse:
        if self._inference is None:
            raise Unavailable("this server serves no models")
        return await self._inference.predict(request, context)

    async def Rank(self, request: pb.RankRequest, context: aio.ServicerContext[Any, Any]) -> pb.RankResponse:
        if self._inference is None:
            raise Unavailable("this server serves no models")
        return await self._inference.rank(request, context)

    async def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetOnlineFeaturesResponse:
        entities = wire.entities(request.entities)
        remaining = context.time_remaining()
        # The socket timeout bounds every Redis call; a shorter caller deadline wins.
        timeout_s = remaining if remaining is not None and remaining < self._redis_timeout_s else None
        result = await self._lookup.get_online_features(
            entities,
            request.features,
            full_feature_names=request.full_feature_names,
            timeout_s=timeout_s,
        )
        start = time.perf_counter()
        response = wire.features_response(result)
        plan_s, redis_s, decode_s = result.timings_s
        metrics.STAGE_PLAN.observe(plan_s)
        metrics.STAGE_REDIS.observe(redis_s)
        metrics.STAGE_DECODE.observe(decode_s)
        metrics.STAGE_RESPONSE.observe(time.perf_counter() - start)
        return response

    async def SearchSimilar(
        self, request: pb.SearchSimilarRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.SearchSimilarResponse:
        if self._indexes is None:
            raise Unavailable("this server has no retrieval indexes")
        query = request.WhichOneof("query")
        remaining = context.time_remaining()
        result = await search_similar(
            self._indexes,
            self._lookup,
            request.view,
            k=request.k,
            query_vectors=request.query_vectors if query == "query_vectors" else None,
            query_count=request.query_count,
            query_ids=request.query_ids if query == "query_ids" else None,
            exclude_query_entity=request.exclude_query_entity,
            allow_ids=request.allow_ids if request.HasField("allow_ids") else None,
            exclude_ids=request.exclude_ids,
            features=list(request.features),
            full_feature_names=request.full_feature_names,
            timeout_s=remaining if remaining is not None and remaining < self._redis_timeout_s else None,
        )
        q, k = result.ids.shape
        return pb.SearchSimilarResponse(
            query_count=q,
            k=k,
            ids=result.ids.astype("<i8", copy=False).tobytes(),
            scores=result.scores.astype("<f4", copy=False).tobytes(),
            metric=result.metric,
            index_generation=result.generation,
            features=None if result.features is None else wire.features_response(result.features),
        )


class FeatureServer:
    """One server process: gRPC on `settings.address`, a Lookup, the refresh task.

    server = FeatureServer(settings)
    port = await server.start()
    ...
    await server.stop()
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.lookup: Lookup | None = None
        self.indexes: ViewIndexes | None = None
        self.inference: InferenceRpc | None = None
        self.cache: HotCache | None = None
        self.redis: Redis | None = None
        self.port = 0
        self._server: aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        """Load the registry, bind, start serving; returns the bound port.

        Health turns SERVING once Redis answers a PING (retried in the background).
        """
        settings = self.settings
        registry = await asyncio.to_thread(load_registry, settings.repo)
        # redis-py for everything but the read hot path, which has its own pipelined
        # connection (store/pipe.py: a quarter of a lookup's budget saved).
        redis = self.redis = connect(settings.redis_url, timeout_s=settings.server.redis_timeout_s)
        pipe = RedisPipe.from_url(settings.redis_url, timeout_s=settings.server.redis_timeout_s)
        if settings.cache.budget_bytes > 0:
            self.cache = HotCache(
                registry.project,
                settings.redis_url,
                cache_bytes=settings.cache.budget_bytes,
                max_staleness_s=settings.cache.max_staleness_s,
                max_age_s=settings.cache.max_age_s,
                publish_s=settings.cache.hot_publish_s,
            )
            self.cache.start()
        self.lookup = Lookup(pipe, registry, max_rows=settings.server.max_rows, cache=self.cache)
        self.indexes = ViewIndexes(
            registry, settings.redis_url, _index_config(settings), refresh_s=settings.index.refresh_s
        )
        self.indexes.start()
        self.inference = await InferenceRpc.start(
            settings.models_path,
            registry,
            self.lookup,
            settings.redis_url,
            settings.server.redis_timeout_s,
            self.indexes,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server = self._build_server(self.lookup)
        self.port = self._server.add_insecure_port(settings.address)
        if self.port == 0:
            raise ConfigError(f"cannot bind gRPC to {settings.address}")
        await self._server.start()
        self._tasks.append(asyncio.create_task(self._become_ready(redis)))
        if settings.server.registry_refresh_s > 0:
            self._tasks.append(asyncio.create_task(self._refresh_forever()))
        log.info("featurestore listening on %s:%d", settings.server.host, self.port)
        return self.port

    def _build_server(self, lookup: Lookup) -> aio.Server:
        options = [
            ("grpc.so_reuseport", 1 if self.settings.server.workers > 1 else 0),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        server = aio.server(interceptors=[ErrorInterceptor()], options=options)
        servicer = FeatureStoreServicer(lookup, self.settings.server.redis_timeout_s, self.indexes, self.inference)
        pb_grpc.add_FeatureStoreServicer_to_server(servicer, server)
        pb_grpc.add_FeatureStoreAdminServicer_to_server(AdminServicer(self.cache), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server,
        )
        return server

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _become_ready(self, redis: Any) -> None:
        delay = 0.05
        while True:
            try:
                await redis.ping()
                break
            except (RedisError, OSError) as exc:
                log.warning("Redis does not answer PING yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if self.cache is not None:  # listening first: an event during warm-up counts
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.cache.warm_budget_s):
                    await self.cache.wait_ready()
            await self.cache.warm(budget_s=self.settings.cache.warm_budget_s)
        if self.indexes is not None:  # readiness includes every embedding view's index
            await self.indexes.wait_ready()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def reload(self) -> bool:
        """Re-read the registry off the event loop; True when a changed one was swapped in."""
        assert self.lookup is not None, "start() first"
        registry = await asyncio.to_thread(load_registry, self.settings.repo)
        swapped = self.lookup.swap(registry)
        if swapped:
            log.info("registry changed: now serving fingerprint %s", registry.fingerprint)
            if self.indexes is not None:
                self.indexes.sync(registry)
        if self.inference is not None:  # models.yaml changes are picked up here too
            await self.inference.reload(registry)
        return swapped

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.server.registry_refresh_s)
            try:
                await self.reload()
            except Exception:  # a bad registry must not stop the serving one
                log.exception("registry reload failed; still serving the previous one")

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, then let in-flight calls finish within `grace_s` and stop."""
        await cancel_all(self._tasks)
        self._tasks.clear()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.server.grace_s if grace_s is None else grace_s)
            self._server = None
        if self.inference is not None:
            await self.inference.close()
        if self.lookup is not None:
            await self.lookup.close()
        if self.cache is not None:
            await self.cache.close()
        if self.indexes is not None:
            await self.indexes.close()
        if self.redis is not None:
            await self.redis.aclose()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _index_config(settings: Settings) -> IndexConfig:
    return IndexConfig(exact_max=settings.index.exact_max, approximate=settings.index.approximate)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain: the body of `featurestore serve`."""
    import gc
    import signal

    metrics.serve_metrics(settings.server.metrics_port)
    server = FeatureServer(settings)
    await server.start()
    # Everything alive now lives as long as the process: keep the collector off it, so
    # collections stay short (fewer tail-latency pauses).
    gc.collect()
    gc.freeze()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping: NOT_SERVING, draining for up to %.1f s", settings.server.grace_s)
    await server.stop()
