"""The server's life cycle: build every part, serve gRPC, stay fresh, drain on stop.

    server = FeatureServer(settings)
    port = await server.start()      # bound and answering; SERVING once warm
    ...
    await server.stop()              # NOT_SERVING, drain within grace_s, close everything

This module is the composition root: it builds the Redis connections (store/), the lookup,
the hot-key cache (cache/), the retrieval indexes (retrieval/), the models (inference/) and
the servicers (servicers.py) that translate between them and gRPC, with health, reflection
and the one error interceptor (interceptors.py).

Start: health NOT_SERVING -> the registry is loaded, Redis answers PING, the cache is warm
(within `warm_budget_s`) and every embedding view has an index -> SERVING. Everything
started is registered on an exit stack, so a start that fails part-way (a port already
taken, a broken models.yaml) closes what it had opened and leaves no task running. A
background task re-reads the registry every `registry_refresh_s` off the event loop and
swaps it in when its fingerprint changed (`feast apply` needs no restart); models.yaml is
re-read with it. One subscription to the materialization events (store/events.py) feeds
both the hot-key cache and the retrieval indexes.

Stop: NOT_SERVING, then in-flight calls drain within the grace period, then every part
closes in the reverse order of its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import AsyncExitStack

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis

from featurestore import metrics
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.cache.hotcache import HotCache
from featurestore.config import Settings
from featurestore.errors import ConfigError, Unavailable
from featurestore.inference.runtime import ModelRegistry
from featurestore.inference.scoring import Scorer
from featurestore.limits import MAX_MESSAGE_BYTES
from featurestore.lookup import Lookup
from featurestore.registry import Registry, load_registry
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.search import Candidates
from featurestore.retrieval.spec import IndexConfig
from featurestore.serving.interceptors import ErrorInterceptor
from featurestore.serving.servicers import AdminServicer, FeatureStoreServicer
from featurestore.store.events import EventSubscriber
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import connect, ping
from featurestore.tasks import cancel_all

__all__ = ["SERVICE_NAME", "FeatureServer", "run"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStore"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStoreAdmin"].full_name


class FeatureServer:
    """One server process: gRPC on `settings.address` and everything behind it.

    After `start`, `lookup`, `indexes`, `scorer` and `cache` (None when off) are the
    running parts, for tests and operations.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.lookup: Lookup | None = None
        self.indexes: ViewIndexes | None = None
        self.scorer: Scorer | None = None
        self.cache: HotCache | None = None
        self.events: EventSubscriber | None = None
        self.port = 0
        self._server: aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._parts = AsyncExitStack()  # what `stop` closes, in reverse order of start

    async def start(self) -> int:
        """Load the registry, build every part, bind and serve; returns the bound port.

        Health turns SERVING in the background once Redis answers, the cache is warm and
        the indexes are built. On any failure everything started so far is closed and
        the error propagates (ConfigError for a port that cannot be bound).
        """
        async with AsyncExitStack() as parts:
            await self._start_parts(parts)
            self._parts = parts.pop_all()
        return self.port

    async def _start_parts(self, parts: AsyncExitStack) -> None:
        settings = self.settings
        registry = await asyncio.to_thread(load_registry, settings.repo)
        # redis-py for PING; the read hot path has its own pipelined connection
        # (store/pipe.py: a quarter of a lookup's budget saved).
        redis = connect(settings.redis_url, timeout_s=settings.server.redis_timeout_s)
        parts.push_async_callback(redis.aclose)
        events = self.events = EventSubscriber(settings.redis_url, registry.project)  # cache and indexes
        if settings.cache.budget_bytes > 0:
            self.cache = HotCache(
                registry.project,
                settings.redis_url,
                cache_bytes=settings.cache.budget_bytes,
                max_staleness_s=settings.cache.max_staleness_s,
                max_age_s=settings.cache.max_age_s,
                publish_s=settings.cache.hot_publish_s,
                events=events,
            )
            parts.push_async_callback(self.cache.close)
            self.cache.start()
        pipe = RedisPipe.from_url(settings.redis_url, timeout_s=settings.server.redis_timeout_s)
        self.lookup = Lookup(pipe, registry, max_rows=settings.server.max_rows, cache=self.cache)
        parts.push_async_callback(self.lookup.close)
        self.indexes = ViewIndexes(
            registry, settings.redis_url, _index_config(settings), refresh_s=settings.index.refresh_s, events=events
        )
        parts.push_async_callback(self.indexes.close)
        self.indexes.start()
        parts.push_async_callback(events.close)  # closes before its listeners
        events.start()
        self.scorer = await self._start_scorer(parts, registry, self.lookup, self.indexes)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server = self._build_server()
        parts.push_async_callback(self._stop_server, 0.0)  # a failed start drains nothing
        try:
            self.port = self._server.add_insecure_port(settings.address)
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            self.port = 0
            cause: Exception | None = exc
        else:
            cause = None
        if self.port == 0:
            raise ConfigError(
                f"cannot bind gRPC to {settings.address}: the port is taken or the address is wrong"
            ) from cause
        await self._server.start()
        parts.push_async_callback(cancel_all, self._tasks)
        self._tasks.append(asyncio.create_task(self._become_ready(redis)))
        if settings.server.registry_refresh_s > 0:
            self._tasks.append(asyncio.create_task(self._refresh_forever()))
        log.info("featurestore listening on %s:%d", settings.server.host, self.port)

    async def _start_scorer(
        self, parts: AsyncExitStack, registry: Registry, lookup: Lookup, indexes: ViewIndexes
    ) -> Scorer:
        """The models of the repo's models.yaml (a model that fails is logged, not served);
        batches read through a pipelined Redis connection of their own."""
        inference = self.settings.inference
        models = ModelRegistry(
            self.settings.models_path,
            registry,
            intra_op_threads=inference.model_threads,
            poll_s=inference.model_poll_s,
        )
        parts.callback(models.close)
        await models.load_all()
        pipe = RedisPipe.from_url(self.settings.redis_url, timeout_s=self.settings.server.redis_timeout_s)
        scorer = Scorer(models, lookup, pipe, Candidates(indexes))
        parts.push_async_callback(scorer.close)
        return scorer

    def _build_server(self) -> aio.Server:
        assert self.lookup is not None
        options = [
            ("grpc.so_reuseport", 1 if self.settings.server.workers > 1 else 0),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        server = aio.server(interceptors=[ErrorInterceptor()], options=options)
        servicer = FeatureStoreServicer(self.lookup, self.settings.server.redis_timeout_s, self.indexes, self.scorer)
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

    async def _become_ready(self, redis: Redis) -> None:
        delay = 0.05
        while True:
            try:
                await ping(redis)
                break
            except Unavailable as exc:
                log.warning("%s; retrying", exc)
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
        """Re-read the registry (and models.yaml) off the event loop; True when a changed
        registry was swapped in."""
        assert self.lookup is not None, "start() first"
        registry = await asyncio.to_thread(load_registry, self.settings.repo)
        swapped = self.lookup.swap(registry)
        if swapped:
            log.info("registry changed: now serving fingerprint %s", registry.fingerprint)
            if self.indexes is not None:
                self.indexes.sync(registry)
        if self.scorer is not None:  # models.yaml changes are picked up here too
            await self.scorer.models.reload(registry)
        return swapped

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.server.registry_refresh_s)
            try:
                await self.reload()
            except Exception:  # a bad registry must not stop the serving one
                log.exception("registry reload failed; still serving the previous one")

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, then let in-flight calls finish within `grace_s` (default the
        settings'), then close every part."""
        await cancel_all(self._tasks)
        self._tasks.clear()
        await self.health.enter_graceful_shutdown()
        await self._stop_server(self.settings.server.grace_s if grace_s is None else grace_s)
        await self._parts.aclose()

    async def _stop_server(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

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
