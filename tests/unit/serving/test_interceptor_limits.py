"""ErrorInterceptor's defences on a real grpc.aio server: undecodable bytes, long input, log floods, overload.

Bytes that do not parse as the method's message are INVALID_ARGUMENT (unary and streaming
methods); a 100 KB name in a message comes back cut; a flood of bad calls writes a bounded
number of log lines without tracebacks; calls beyond max_in_flight are RESOURCE_EXHAUSTED
at once while `grpc.*` services (health) still answer; the in-flight gauge counts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio
from prometheus_client import REGISTRY

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.errors import ERROR_METADATA_KEY, NotFound
from featurestore.serving.interceptors import LOG_BURST, LOG_PER_S, ErrorInterceptor

SERVICE = "featurestore.test.Limits"
PROBE = "grpc.test.Probe"  # a grpc.* service: never shed, like health
LIMIT = 2
RELEASE = asyncio.Event()
NOT_PROTOBUF = b"\xff\xff\xff"  # field 31, wire type 7: no such wire type


async def top(request: pb.CacheStatusRequest, context: aio.ServicerContext[Any, Any]) -> pb.CacheStatusRequest:
    return pb.CacheStatusRequest(top=request.top + 1)


async def hold(request: pb.CacheStatusRequest, context: aio.ServicerContext[Any, Any]) -> pb.CacheStatusRequest:
    await RELEASE.wait()
    return request


async def named(request: pb.PredictRequest, context: aio.ServicerContext[Any, Any]) -> pb.PredictRequest:
    raise NotFound(f"unknown model {request.model!r}; models served: ranker")


async def unimplemented(request: pb.CacheStatusRequest, context: aio.ServicerContext[Any, Any]) -> None:
    raise NotImplementedError("Method not implemented!")


async def generated(request: pb.CacheStatusRequest, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    for k in range(request.top):
        yield pb.CacheStatusRequest(top=k)


async def written(request: pb.CacheStatusRequest, context: aio.ServicerContext[Any, Any]) -> None:
    await context.write(pb.CacheStatusRequest(top=request.top))


def unary(behavior: Any, cls: Any = pb.CacheStatusRequest) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behavior, cls.FromString, cls.SerializeToString)


def streaming(behavior: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(
        behavior, pb.CacheStatusRequest.FromString, pb.CacheStatusRequest.SerializeToString
    )


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[tuple[aio.Channel, ErrorInterceptor]]:
    interceptor = ErrorInterceptor(max_in_flight=LIMIT)
    server = aio.server(interceptors=[interceptor])
    handlers = {
        "Top": unary(top),
        "Hold": unary(hold),
        "Named": unary(named, pb.PredictRequest),
        "Unimplemented": unary(unimplemented),
        "Generated": streaming(generated),
        "Written": streaming(written),
    }
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(SERVICE, handlers),
            grpc.method_handlers_generic_handler(PROBE, {"Top": unary(top)}),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, interceptor
    await server.stop(0)


def raw(channel: aio.Channel, method: str, service: str = SERVICE) -> Any:
    return channel.unary_unary(f"/{service}/{method}")


async def test_undecodable_bytes_are_invalid_argument_naming_the_message(
    served: tuple[aio.Channel, ErrorInterceptor], caplog: pytest.LogCaptureFixture
) -> None:
    channel, _ = served
    with caplog.at_level(logging.INFO), pytest.raises(aio.AioRpcError) as caught:
        await raw(channel, "Top")(NOT_PROTOBUF, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith("the request's 3 bytes are not a valid featurestore.v1.CacheStatusRequest"), details
    assert dict(caught.value.trailing_metadata() or ())[ERROR_METADATA_KEY] == "InvalidArgument"
    assert all(r.exc_info is None for r in caplog.records)  # a client error: no traceback
    assert await raw(channel, "Top")(pb.CacheStatusRequest(top=4).SerializeToString(), timeout=5) == b"\x08\x05"


@pytest.mark.parametrize("method", ["Generated", "Written"])
async def test_streams_refuse_undecodable_bytes_and_serve_the_rest(
    served: tuple[aio.Channel, ErrorInterceptor], method: str
) -> None:
    channel, _ = served
    stream = channel.unary_stream(f"/{SERVICE}/{method}")
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in stream(NOT_PROTOBUF, timeout=5):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    replies = [reply async for reply in stream(pb.CacheStatusRequest(top=2).SerializeToString(), timeout=5)]
    assert replies == ([b"", b"\x08\x01"] if method == "Generated" else [b"\x08\x02"])


async def test_a_100_kb_name_is_cut_in_the_status_and_the_log(
    served: tuple[aio.Channel, ErrorInterceptor], caplog: pytest.LogCaptureFixture
) -> None:
    channel, _ = served
    request = pb.PredictRequest(model="m" * 100_000).SerializeToString()
    with caplog.at_level(logging.INFO, logger="featurestore.serving.interceptors"), pytest.raises(aio.AioRpcError) as e:
        await raw(channel, "Named")(request, timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED from the client's header limit
    details = e.value.details() or ""
    assert details.startswith("unknown model 'mmm") and details.endswith("mmm'; models served: ranker")
    assert re.search(r"…\(1000\d\d chars\)…", details) and len(details) < 300, details
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


async def test_a_flood_of_bad_calls_writes_a_bounded_log_without_tracebacks(
    served: tuple[aio.Channel, ErrorInterceptor], caplog: pytest.LogCaptureFixture
) -> None:
    channel, interceptor = served
    interceptor._throttle.tokens = LOG_BURST  # whatever the tests before spent
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="featurestore.serving.interceptors"):
        for _ in range(200):
            with pytest.raises(aio.AioRpcError):
                await raw(channel, "Top")(NOT_PROTOBUF, timeout=5)
        await asyncio.sleep(0.25)  # a token comes back
        with pytest.raises(aio.AioRpcError):
            await raw(channel, "Top")(NOT_PROTOBUF, timeout=5)
    lines = [r for r in caplog.records if r.name == "featurestore.serving.interceptors"]
    refilled = LOG_PER_S * (time.monotonic() - started)  # lines the rate allowed meanwhile
    assert LOG_BURST < len(lines) <= LOG_BURST + refilled + 1, len(lines)  # the burst, then the rate
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in lines)
    assert lines[0].getMessage().startswith("Top INVALID_ARGUMENT: the request's 3 bytes are not a valid")
    assert "earlier lines about failed calls dropped" in lines[-1].getMessage()


async def test_a_method_left_unimplemented_is_unimplemented(served: tuple[aio.Channel, ErrorInterceptor]) -> None:
    channel, _ = served
    with pytest.raises(aio.AioRpcError) as caught:
        await raw(channel, "Unimplemented")(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def in_flight_gauge() -> float:
    return REGISTRY.get_sample_value("featurestore_in_flight_requests") or 0.0


async def test_calls_beyond_the_limit_are_refused_at_once_and_probes_still_answer(
    served: tuple[aio.Channel, ErrorInterceptor],
) -> None:
    channel, interceptor = served
    RELEASE.clear()
    gauge = in_flight_gauge()
    held = [asyncio.ensure_future(raw(channel, "Hold")(b"", timeout=10)) for _ in range(LIMIT)]
    while interceptor.in_flight < LIMIT:  # noqa: ASYNC110 - the server runs on this loop
        await asyncio.sleep(0.001)
    assert in_flight_gauge() == gauge + LIMIT
    for _ in range(20):
        start = time.perf_counter()
        with pytest.raises(aio.AioRpcError) as caught:
            await raw(channel, "Top")(b"", timeout=10)
        assert time.perf_counter() - start < 0.05
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 calls in flight, its limit (--max-in-flight 2)" in (caught.value.details() or "")
        assert dict(caught.value.trailing_metadata() or ())[ERROR_METADATA_KEY] == "Overloaded"
    assert await raw(channel, "Top", PROBE)(b"", timeout=5) == b"\x08\x01"  # health-like: never shed
    RELEASE.set()
    assert await asyncio.gather(*held) == [b""] * LIMIT
    assert interceptor.in_flight == 0 and in_flight_gauge() == gauge
    assert await raw(channel, "Top")(b"", timeout=5) == b"\x08\x01"
