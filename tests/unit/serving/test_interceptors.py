"""ErrorInterceptor on a real grpc.aio server (port 0) whose handlers raise on demand.

Every error of errors.py becomes its own status with its message; anything else INTERNAL;
an error once the caller's deadline passed DEADLINE_EXCEEDED; each call is counted by
method and code; streaming handlers are left as they are.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio
from prometheus_client import REGISTRY

from featurestore import errors
from featurestore.errors import FeatureStoreError
from featurestore.serving.interceptors import ErrorInterceptor

SERVICE = "featurestore.test.Errors"

# errors.py's tree, written out: the statuses clients branch on.
STATUSES = {
    "FeatureStoreError": grpc.StatusCode.INTERNAL,
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "ConfigError": grpc.StatusCode.FAILED_PRECONDITION,
    "MissingFeature": grpc.StatusCode.FAILED_PRECONDITION,
    "ModelError": grpc.StatusCode.INTERNAL,
    "LockHeld": grpc.StatusCode.ABORTED,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
    "Overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def error_classes() -> dict[str, type[FeatureStoreError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, FeatureStoreError) and cls.__module__ == errors.__name__
    }


async def raise_named(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    """Raise the error class named by the request ("Echo:<text>" answers <text>)."""
    name = request.decode()
    if name.startswith("Echo:"):
        return name[5:].encode()
    if name == "Abort":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by the handler")
    if name == "Unexpected":
        raise ValueError("boom")
    raise error_classes()[name](f"{name} happened: fix the request")


LATE_RAISED: dict[bytes, asyncio.Event] = {}  # request -> set once its handler has raised


async def outlive_the_deadline(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
    """Wait past the deadline; grpc then cancels the call, which this handler (like a library
    translating cancellation into its own error) turns into an exception."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        raise RuntimeError("gave up late") from None
    finally:
        LATE_RAISED[request].set()  # the interceptor handles the error in this same step
    return b"too late"


async def stream(request: bytes, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for k in range(3):
        yield b"%d" % k
    if request == b"NotFound":
        raise errors.NotFound("a stream's own error")


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[aio.Channel]:
    server = aio.server(interceptors=[ErrorInterceptor()])
    handlers = {
        "Raise": grpc.unary_unary_rpc_method_handler(raise_named),
        "Late": grpc.unary_unary_rpc_method_handler(outlive_the_deadline),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(0)


def count(method: str, code: grpc.StatusCode) -> float:
    return REGISTRY.get_sample_value("featurestore_requests_total", {"method": method, "code": code.name}) or 0.0


async def call(channel: aio.Channel, request: bytes, method: str = "Raise", timeout_s: float = 10.0) -> bytes:
    reply: bytes = await channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=timeout_s)
    return reply


def test_the_table_covers_every_error_of_errors_py() -> None:
    assert set(error_classes()) == set(STATUSES)


@pytest.mark.parametrize("name", sorted(STATUSES))
async def test_each_error_becomes_its_status_with_its_message(channel: aio.Channel, name: str) -> None:
    code = STATUSES[name]
    before = count("Raise", code)
    with pytest.raises(aio.AioRpcError) as caught:
        await call(channel, name.encode())
    assert caught.value.code() == code
    assert caught.value.details() == f"{name} happened: fix the request"
    assert count("Raise", code) == before + 1


async def test_an_unexpected_exception_is_internal_and_logged(
    channel: aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    before = count("Raise", grpc.StatusCode.INTERNAL)
    with (
        caplog.at_level(logging.ERROR, logger="featurestore.serving.interceptors"),
        pytest.raises(aio.AioRpcError) as caught,
    ):
        await call(channel, b"Unexpected")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error: ValueError: boom"
    assert count("Raise", grpc.StatusCode.INTERNAL) == before + 1
    (record,) = [r for r in caplog.records if r.name == "featurestore.serving.interceptors"]
    assert record.exc_info is not None and record.exc_info[0] is ValueError  # with its traceback


async def test_an_error_after_the_deadline_is_deadline_exceeded_not_internal(channel: aio.Channel) -> None:
    internal, late = count("Late", grpc.StatusCode.INTERNAL), count("Late", grpc.StatusCode.DEADLINE_EXCEEDED)
    LATE_RAISED[b"late"] = asyncio.Event()
    with pytest.raises(aio.AioRpcError) as caught:
        await call(channel, b"late", method="Late", timeout_s=0.1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client sees DEADLINE_EXCEEDED whatever the server does: the server's count tells.
    async with asyncio.timeout(5):
        await LATE_RAISED[b"late"].wait()
    assert count("Late", grpc.StatusCode.DEADLINE_EXCEEDED) == late + 1
    assert count("Late", grpc.StatusCode.INTERNAL) == internal


async def test_a_successful_call_is_counted_ok_and_timed(channel: aio.Channel) -> None:
    before = count("Raise", grpc.StatusCode.OK)
    timed = REGISTRY.get_sample_value("featurestore_request_seconds_count", {"method": "Raise"}) or 0.0
    assert await call(channel, b"Echo:hello") == b"hello"
    assert await call(channel, b"Echo:again") == b"again"  # the wrapped handler is reused
    assert count("Raise", grpc.StatusCode.OK) == before + 2
    assert REGISTRY.get_sample_value("featurestore_request_seconds_count", {"method": "Raise"}) == timed + 2


async def test_a_handlers_own_abort_keeps_its_status(channel: aio.Channel) -> None:
    internal = count("Raise", grpc.StatusCode.INTERNAL)
    with pytest.raises(aio.AioRpcError) as caught:
        await call(channel, b"Abort")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "aborted by the handler"
    assert count("Raise", grpc.StatusCode.INTERNAL) == internal  # not taken for an unexpected error


async def test_streams_pass_through_untouched(channel: aio.Channel) -> None:
    before = {code: count("Stream", code) for code in grpc.StatusCode}
    replies = [reply async for reply in channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10)]
    assert replies == [b"0", b"1", b"2"]
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in channel.unary_stream(f"/{SERVICE}/Stream")(b"NotFound", timeout=10):
            pass
    assert caught.value.code() == grpc.StatusCode.UNKNOWN  # grpc's own handling, not mapped to NOT_FOUND
    assert {code: count("Stream", code) for code in grpc.StatusCode} == before  # not counted either
