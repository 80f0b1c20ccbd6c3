"""The server's life cycle: build every part, serve gRPC, stay fresh, drain on stop.

    server = FeatureServer(settings)
    port = await server.start()      # bound and answering; SERVING once warm
    ...
    await server.stop()              # NOT_SERVING, drain within grace_s, close everything

This module is the composition root: it builds the Redis connections (store/), the lookup,
the hot-key cache (cache/), the retrieval indexes (retrieval/), the models (inference/) and
the servicers (servicers.py) that translate between them and gRPC, with health, reflection
and the one error interceptor (interceptors.py); with tokens, the auth interceptor
(auth.py) runs inside it, and with a certificate the port speaks TLS only (tls.py).
`--health-port` adds a plaintext port that serves only health, for probes that cannot do
TLS. Bound to a non-loopback address without tokens or client certificates (or with tokens
but without TLS), the server logs one warning at start.

Start: health NOT_SERVING -> the registry is loaded, Redis answers PING, the cache is warm
(within `warm_budget_s`) and every embedding view has an index -> SERVING. Everything
started is registered on an exit stack, so a start that fails part-way (a port already
taken, a broken models.yaml) closes what it had opened and leaves no task running. A
background task re-reads the registry every `registry_refresh_s` off the event loop and
swaps it in when its fingerprint changed (`feast apply` needs no restart); models.yaml is
re-read with it. One subscription to the materialization events (store/events.py) feeds
both the hot-key cache and the retrieval indexes.

Stop (SIGTERM, `run`): health turns NOT_SERVING at once while calls are still served for
`drain_delay_s` (load balancers and Kubernetes see it and stop sending; a second signal
cuts the delay short); then the listener closes, health Watch streams end, every call
already accepted completes within `grace_s` (grpc cancels what is left after that), and
every part closes in the reverse order of its start. Without the delay, calls a client
sent just before the listener closed but that the server had not yet picked up are
cancelled by grpc (16 of 32 sent 5 ms before SIGTERM, measured): the delay is what makes
the drain lossless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

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
from featurestore.serving.auth import AuthInterceptor, Keyring, bind_warning
from featurestore.serving.health import HealthServicer
from featurestore.serving.interceptors import ErrorInterceptor
from featurestore.serving.servicers import AdminServicer, FeatureStoreServicer
from featurestore.serving.tls import CertificateFiles, server_credentials
from featurestore.store.events import EventSubscriber
from featurestore.store.pipe import RedisPipe
from featurestore.store.redis import Client, connect, ping
from featurestore.tasks import cancel_all

__all__ = ["SERVICE_NAME", "FeatureServer", "run"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStore"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStoreAdmin"].full_name


class FeatureServer:
    """One server process: gRPC on `settings.address` and everything behind it.

    After `start`, `lookup`, `indexes`, `scorer` and `cache` (None when off) are the
    running parts, `keyring` and `certificates` (None when off) the tokens and TLS files
    in use, and `interceptor.in_flight` counts the calls running now.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = HealthServicer()
        self.interceptor = ErrorInterceptor(max_in_flight=settings.server.max_in_flight)
        self.lookup: Lookup | None = None
        self.indexes: ViewIndexes | None = None
        self.scorer: Scorer | None = None
        self.cache: HotCache | None = None
        self.events: EventSubscriber | None = None
        self.keyring: Keyring | None = None
        self.certificates: CertificateFiles | None = None
        self.port = 0
        self.health_port = 0
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
        # The cheap checks first: a bad token file or certificate fails before anything starts.
        self.keyring = Keyring.from_settings(settings.security)
        credentials = server_credentials(settings.security)
        self.certificates = credentials[1] if credentials else None
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
        self.port = _bind(self._server, settings.address, credentials[0] if credentials else None)
        await self._start_health_port(parts)
        await self._server.start()
        parts.push_async_callback(cancel_all, self._tasks)
        self._tasks.append(asyncio.create_task(self._become_ready(redis)))
        if settings.server.registry_refresh_s > 0:
            self._tasks.append(asyncio.create_task(self._refresh_forever()))
        if self.keyring is not None and self.keyring.path is not None:
            self._tasks.append(asyncio.create_task(self.keyring.watch()))
        log.info("featurestore listening on %s:%d (%s)", settings.server.host, self.port, _protection(settings))
        warning = bind_warning(settings.server.host, self.port, settings.security)
        if warning is not None:
            log.warning("%s", warning)

    async def _start_health_port(self, parts: AsyncExitStack) -> None:
        """The plaintext health-only port, when asked for: probes that cannot speak TLS use it."""
        if self.settings.security.health_port == 0:
            return
        server = aio.server(options=[("grpc.so_reuseport", 1 if self.settings.server.workers > 1 else 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)  # the same statuses as the main port
        address = f"{self.settings.server.host}:{self.settings.security.health_port}"
        self.health_port = _bind(server, address, None)
        await server.start()
        parts.push_async_callback(server.stop, 0)

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
        # The error interceptor outside: it maps and counts auth's refusals like any error.
        interceptors: list[aio.ServerInterceptor] = [self.interceptor]
        if self.keyring is not None:
            interceptors.append(AuthInterceptor(self.keyring, reflection_open=self.settings.security.reflection_open))
        options = [
            ("grpc.so_reuseport", 1 if self.settings.server.workers > 1 else 0),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        age_s = self.settings.server.max_connection_age_s
        if age_s > 0:  # clients reconnect (and re-resolve) now and then: scale-ups get their share
            options += [
                ("grpc.max_connection_age_ms", int(age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.settings.server.grace_s * 1000)),
            ]
        server = aio.server(interceptors=interceptors, options=options)
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

    async def _become_ready(self, redis: Client) -> None:
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

    async def stop(
        self, grace_s: float | None = None, *, drain_delay_s: float = 0.0, cut_short: asyncio.Event | None = None
    ) -> None:
        """NOT_SERVING; keep serving for `drain_delay_s` (or until `cut_short` is set); close
        the listener and let accepted calls finish within `grace_s` (default the settings');
        close every part.

        `run` passes the settings' drain_delay_s; a direct call (tests, the demo) drains
        without the delay unless asked.
        """
        grace_s = self.settings.server.grace_s if grace_s is None else grace_s
        await cancel_all(self._tasks)
        self._tasks.clear()
        await self.health.enter_graceful_shutdown()
        if drain_delay_s > 0:
            cut = cut_short or asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cut.wait(), drain_delay_s)
        in_flight, started = self.interceptor.in_flight, time.monotonic()
        await self.health.end_watches()
        await self._stop_server(grace_s)
        if in_flight:
            log.info("drained %d calls in flight in %.3f s", in_flight, time.monotonic() - started)
        await self._parts.aclose()

    async def _stop_server(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _bind(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `server` to `address` (TLS with `credentials`); the port, or ConfigError."""
    try:
        if credentials is None:
            port: int = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc's way of saying the bind failed
        raise ConfigError(f"cannot bind gRPC to {address}: the port is taken or the address is wrong") from exc
    if port == 0:
        raise ConfigError(f"cannot bind gRPC to {address}: the port is taken or the address is wrong")
    return port


def _protection(settings: Settings) -> str:
    """How the port is protected, for the start-up line: "TLS, client certificates, tokens" or "plaintext"."""
    security = settings.security
    on = {"TLS": security.tls, "client certificates": security.tls_client_ca is not None, "tokens": security.auth}
    return ", ".join(name for name, yes in on.items() if yes) or "plaintext"


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
    stopping, cut_short = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (cut_short if stopping.is_set() else stopping).set()  # the second one cuts the delay short

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stopping.wait()
    delay_s, grace_s = settings.server.drain_delay_s, settings.server.grace_s
    log.info("stopping: NOT_SERVING for %.1f s while serving, then draining for up to %.1f s", delay_s, grace_s)
    await server.stop(drain_delay_s=delay_s, cut_short=cut_short)
    log.info("stopped")
