"""The one place where errors become gRPC statuses, and where calls are counted and timed.

    FeatureStoreError subclass   -> its own `status` (errors.py), with its message and its
                                    class name in the trailing metadata ERROR_METADATA_KEY
    the caller's deadline passed -> DEADLINE_EXCEEDED
    anything else                -> INTERNAL (logged with its traceback)

Servicers raise; they never call `context.abort` themselves. The process keeps serving
whatever a call raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from featurestore import metrics
from featurestore.errors import ERROR_METADATA_KEY, FeatureStoreError

__all__ = ["ErrorInterceptor"]

log = logging.getLogger(__name__)

Behavior = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]


class ErrorInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions of unary-unary calls to statuses; records latency and counts."""

    def __init__(self) -> None:
        # Wrapped handlers by the handler they wrap: the servicer's handlers are fixed
        # once the server starts, so each is wrapped once, not per call.
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streams (health Watch, reflection) pass through
        cached = self._wrapped.get(id(handler))
        if cached is None or cached[0] is not handler:
            method = handler_call_details.method.rsplit("/", 1)[-1]
            wrapped = grpc.unary_unary_rpc_method_handler(
                _guard(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            cached = self._wrapped[id(handler)] = (handler, wrapped)
        return cached[1]


def _guard(behavior: Behavior, method: str) -> Behavior:
    latency = metrics.REQUEST_SECONDS.labels(method)
    ok = metrics.REQUESTS.labels(method, grpc.StatusCode.OK.name)

    async def guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        start = time.perf_counter()
        try:
            response = await behavior(request, context)
        except FeatureStoreError as exc:
            await _abort(context, method, exc.status, str(exc), type(exc).__name__)
        except aio.AbortError:
            raise
        except Exception as exc:
            if _deadline_passed(context):
                await _abort(context, method, grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed")
            log.exception("%s failed", method)
            await _abort(context, method, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        ok.inc()
        latency.observe(time.perf_counter() - start)
        return response

    return guarded


def _deadline_passed(context: aio.ServicerContext[Any, Any]) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


async def _abort(
    context: aio.ServicerContext[Any, Any],
    method: str,
    code: grpc.StatusCode,
    message: str,
    error_name: str | None = None,
) -> None:
    """Counts the call and ends it with `code` and `message`.

    `error_name`, the FeatureStoreError class raised, goes in the trailing metadata: two
    classes may share a status (MissingFeature and ConfigError: FAILED_PRECONDITION), and
    the client raises the class itself, not the status's canonical one.
    """
    metrics.REQUESTS.labels(method, code.name).inc()
    metadata = () if error_name is None else ((ERROR_METADATA_KEY, error_name),)
    await context.abort(code, message, trailing_metadata=metadata)
