"""The one place where errors become gRPC statuses, and where calls are counted, timed and shed.

    FeatureStoreError subclass   -> its own `status` (errors.py), with its message and its
                                    class name in the trailing metadata ERROR_METADATA_KEY
    bytes that do not decode     -> INVALID_ARGUMENT (InvalidArgument), on every method
    more than `max_in_flight`    -> RESOURCE_EXHAUSTED (Overloaded) at once, before any work
    the caller's deadline passed -> DEADLINE_EXCEEDED (counted too when grpc cancels the call)
    a method left unimplemented  -> UNIMPLEMENTED
    anything else                -> INTERNAL (logged with its traceback)

Servicers raise; they never call `context.abort` themselves. The process keeps serving
whatever a call raises or sends.

Why the deserializer is wrapped: grpc.aio parses a request before any interceptor or
handler runs, and answers a parse failure itself with UNKNOWN ("Unexpected DecodeError")
and a traceback in the log, which anyone who can reach the port can repeat. So the
handlers this interceptor returns carry a deserializer that cannot raise: bytes that do
not parse become an `_Undecodable` marker, and the guarded handler answers it with
INVALID_ARGUMENT like any other bad request (streams, health Watch and reflection, get
the same check for each request, nothing more).

Every status message goes through `errors.bounded` (input echoed in it is cut, so it
never outgrows the client's header limit), and the log gets at most one line per failed
call, without a traceback unless the error is ours (INTERNAL), and at most `LOG_BURST`
lines at once and `LOG_PER_S` a second after that (the line after a quiet spell says how
many were dropped).

Overload: calls of the services this server defines (not `grpc.*`: health probes and
reflection must answer an overloaded server) are counted while they run; the count is
the `featurestore_in_flight_requests` gauge, and with `max_in_flight` > 0 a call that
would exceed it is refused with RESOURCE_EXHAUSTED before it is parsed any further.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from grpc import aio

from featurestore import metrics
from featurestore.errors import (
    ERROR_METADATA_KEY,
    FeatureStoreError,
    InvalidArgument,
    Overloaded,
    bounded,
)

__all__ = ["LOG_BURST", "LOG_PER_S", "ErrorInterceptor"]

log = logging.getLogger(__name__)

Behavior = Callable[[Any, aio.ServicerContext[Any, Any]], Any]
Context: TypeAlias = "aio.ServicerContext[Any, Any]"

LOG_BURST = 20  # failed-call lines logged back to back before the rate applies
LOG_PER_S = 5.0  # failed-call lines a second after a burst

# Statuses that mean the caller (or its deadline) was wrong: one INFO line, no traceback.
_CALLER_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class _Undecodable:
    """A request whose bytes did not parse: what the safe deserializer returns instead of raising."""

    __slots__ = ("error", "size")

    def __init__(self, size: int, error: Exception) -> None:
        self.size, self.error = size, error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` made unable to raise (None, raw bytes, stays None)."""
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, or anything a custom deserializer raises
            return _Undecodable(len(raw), exc)

    return deserialize


def _message_name(deserializer: Callable[[bytes], Any] | None) -> str:
    """The message's full name ("featurestore.v1.PredictRequest" for `PredictRequest.FromString`), or "request"."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


def _refusal(request: _Undecodable, message_name: str) -> InvalidArgument:
    return InvalidArgument(
        f"the request's {request.size} bytes are not a valid {message_name}"
        f" ({type(request.error).__name__}: {request.error}): send a message built from the .proto"
    )


class _Throttle:
    """A token bucket for log lines: `burst` at once, then `per_s` a second; counts the lines it drops."""

    __slots__ = ("burst", "dropped", "per_s", "stamp", "tokens")

    def __init__(self, burst: int = LOG_BURST, per_s: float = LOG_PER_S) -> None:
        self.burst, self.per_s = burst, per_s
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.dropped = 0

    def take(self) -> int | None:
        """None when this line must be dropped; else how many were dropped before it."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.per_s)
        self.stamp = now
        if self.tokens < 1:
            self.dropped += 1
            return None
        self.tokens -= 1
        dropped, self.dropped = self.dropped, 0
        return dropped


class ErrorInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions of unary calls to statuses; records latency and counts; sheds load.

    Parameters:
        max_in_flight: calls of this server's own services allowed to run at once; beyond
            it RESOURCE_EXHAUSTED at once. 0: no limit (the gauge still counts).
    """

    def __init__(self, max_in_flight: int = 0) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # calls of limited methods running now (the gauge's value in this server)
        self._throttle = _Throttle()
        # Wrapped handlers by the handler they wrap: the servicer's handlers are fixed
        # once the server starts, so each is wrapped once, not per call.
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        cached = self._wrapped.get(id(handler))
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[id(handler)] = (handler, self._wrap(handler, handler_call_details.method))
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        """`handler` with a safe deserializer, unary calls guarded, streams checked for undecodable requests."""
        method = full_method.rsplit("/", 1)[-1]
        name = _message_name(handler.request_deserializer)
        deserializer = _safe(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            limited = not full_method.startswith("/grpc.")  # health and reflection are never shed
            behavior = self._guard(handler.unary_unary, method, name, limited)
            return grpc.unary_unary_rpc_method_handler(behavior, deserializer, serializer)
        if handler.unary_stream is not None:
            behavior = self._checked(handler.unary_stream, method, name, client_streaming=False)
            return grpc.unary_stream_rpc_method_handler(behavior, deserializer, serializer)
        if handler.stream_unary is not None:
            behavior = self._checked(handler.stream_unary, method, name, client_streaming=True)
            return grpc.stream_unary_rpc_method_handler(behavior, deserializer, serializer)
        behavior = self._checked(handler.stream_stream, method, name, client_streaming=True)
        return grpc.stream_stream_rpc_method_handler(behavior, deserializer, serializer)

    def _guard(self, behavior: Behavior, method: str, message_name: str, limited: bool) -> Behavior:
        latency = metrics.REQUEST_SECONDS.labels(method)
        ok = metrics.REQUESTS.labels(method, grpc.StatusCode.OK.name)
        gauge = metrics.IN_FLIGHT

        async def guarded(request: Any, context: Context) -> Any:
            start = time.perf_counter()
            if limited:
                if self.max_in_flight and self.in_flight >= self.max_in_flight:
                    await self._fail(context, method, Overloaded(self._overloaded()))
                self.in_flight += 1
                gauge.inc()
            try:
                if type(request) is _Undecodable:
                    raise _refusal(request, message_name)
                response = await behavior(request, context)
            except FeatureStoreError as exc:
                await self._fail(context, method, exc)
            except aio.AbortError:
                raise
            except asyncio.CancelledError:  # grpc ended the call: its deadline passed, or the caller left
                code = grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED
                metrics.REQUESTS.labels(method, code.name).inc()
                raise
            except NotImplementedError:
                await self._end(context, method, grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
            except Exception as exc:
                if _deadline_passed(context):
                    await self._end(context, method, grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed")
                self._log_unexpected(method, exc)
                message = f"internal error: {type(exc).__name__}: {exc}"
                await self._end(context, method, grpc.StatusCode.INTERNAL, message, logged=True)
            finally:
                if limited:
                    self.in_flight -= 1
                    gauge.dec()
            ok.inc()
            latency.observe(time.perf_counter() - start)
            return response

        return guarded

    def _overloaded(self) -> str:
        return (
            f"the server has {self.in_flight} calls in flight, its limit (--max-in-flight {self.max_in_flight}):"
            " retry with backoff, or on another replica"
        )

    def _checked(self, behavior: Behavior, method: str, message_name: str, *, client_streaming: bool) -> Behavior:
        """A streaming handler that refuses undecodable requests and is otherwise `behavior` itself
        (no counting, no mapping of errors: streams are health Watch and reflection)."""

        async def checked_requests(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                if type(request) is _Undecodable:
                    await self._fail(context, method, _refusal(request, message_name))
                yield request

        async def checked(request: Any, context: Context) -> Any:
            if client_streaming:
                return checked_requests(request, context)
            if type(request) is _Undecodable:
                await self._fail(context, method, _refusal(request, message_name))
            return request

        if inspect.isasyncgenfunction(behavior):

            async def replies(request: Any, context: Context) -> AsyncIterator[Any]:
                async for reply in behavior(await checked(request, context), context):
                    yield reply

            return replies

        async def writes(request: Any, context: Context) -> Any:  # a handler that calls context.write
            return await behavior(await checked(request, context), context)

        return writes

    async def _fail(self, context: Context, method: str, exc: FeatureStoreError) -> None:
        """End the call with `exc`'s status and message, its class named in the trailing metadata.

        The class name matters: two classes may share a status (MissingFeature and
        ConfigError: FAILED_PRECONDITION), and the client raises the class itself, not the
        status's canonical one.
        """
        await self._end(context, method, exc.status, str(exc), type(exc).__name__)

    async def _end(
        self,
        context: Context,
        method: str,
        code: grpc.StatusCode,
        message: str,
        error_name: str | None = None,
        *,
        logged: bool = False,
    ) -> None:
        """Count the call, log one (throttled) line unless `logged`, and abort it with `code`
        and the bounded `message`."""
        message = bounded(message)
        metrics.REQUESTS.labels(method, code.name).inc()
        if not logged:
            self._log(method, code, message)
        metadata = () if error_name is None else ((ERROR_METADATA_KEY, error_name),)
        await context.abort(code, message, trailing_metadata=metadata)

    def _log(self, method: str, code: grpc.StatusCode, message: str) -> None:
        level = (
            logging.INFO
            if code in _CALLER_ERRORS
            else logging.WARNING
            if code is grpc.StatusCode.UNAVAILABLE
            else logging.ERROR
        )
        if not log.isEnabledFor(level):
            return
        dropped = self._throttle.take()
        if dropped is not None:
            log.log(level, "%s %s: %s%s", method, code.name, message.replace("\n", " "), _dropped(dropped))

    def _log_unexpected(self, method: str, exc: Exception) -> None:
        dropped = self._throttle.take()
        if dropped is not None:
            log.error("%s failed%s", method, _dropped(dropped), exc_info=exc)


def _dropped(count: int) -> str:
    return f" ({count} earlier lines about failed calls dropped)" if count else ""


def _deadline_passed(context: Context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
