"""The error interceptor names the error class in the trailing metadata, and both clients
raise that class: a real grpc.aio server on port 0 whose Predict raises what it is asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from featurestore import AsyncClient, Client, errors
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.errors import ERROR_METADATA_KEY, FeatureStoreError
from featurestore.serving.interceptors import ErrorInterceptor

CLASSES = [
    cls
    for cls in (getattr(errors, name) for name in errors.__all__)
    if isinstance(cls, type) and issubclass(cls, FeatureStoreError)
]


class Raising(pb_grpc.FeatureStoreServicer):  # type: ignore[misc]
    """Predict raises the errors.py class named by `model` (a plain RuntimeError otherwise)."""

    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        cls = getattr(errors, request.model, None)
        if isinstance(cls, type) and issubclass(cls, FeatureStoreError):
            raise cls(f"raised {request.model}")
        raise RuntimeError("not one of ours")


@pytest.fixture(scope="module")
async def target() -> AsyncIterator[str]:
    server = aio.server(interceptors=[ErrorInterceptor()])
    pb_grpc.add_FeatureStoreServicer_to_server(Raising(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def call(target: str, model: str) -> aio.AioRpcError:
    async with aio.insecure_channel(target) as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await pb_grpc.FeatureStoreStub(channel).Predict(pb.PredictRequest(model=model), timeout=10)
    return caught.value


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
async def test_the_class_name_travels_in_the_trailing_metadata(target: str, cls: type[FeatureStoreError]) -> None:
    exc = await call(target, cls.__name__)
    assert exc.code() == cls.status
    assert exc.details() == f"raised {cls.__name__}"
    assert exc.trailing_metadata().get_all(ERROR_METADATA_KEY) == [cls.__name__]


async def test_an_unexpected_error_sends_internal_without_a_name(target: str) -> None:
    exc = await call(target, "RuntimeError")
    assert exc.code() == grpc.StatusCode.INTERNAL
    assert exc.details() == "internal error: RuntimeError: not one of ours"
    assert ERROR_METADATA_KEY not in exc.trailing_metadata()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
async def test_the_async_client_raises_the_class_the_server_raised(target: str, cls: type[FeatureStoreError]) -> None:
    async with AsyncClient(target) as client:
        with pytest.raises(FeatureStoreError) as caught:
            await client.predict(cls.__name__, {"user_id": [1]})
    assert type(caught.value) is cls
    assert str(caught.value) == f"{cls.status.name}: raised {cls.__name__}"
    assert isinstance(caught.value.__cause__, grpc.RpcError)


async def test_the_blocking_client_raises_missing_feature_not_config_error(target: str) -> None:
    def predict(model: str) -> FeatureStoreError:
        with Client(target) as client, pytest.raises(FeatureStoreError) as caught:
            client.predict(model, {"user_id": [1]})
        return caught.value

    # The server shares this event loop: the blocking calls run in a thread.
    missing = await asyncio.to_thread(predict, "MissingFeature")
    assert type(missing) is errors.MissingFeature
    assert str(missing) == "FAILED_PRECONDITION: raised MissingFeature"
    assert type(await asyncio.to_thread(predict, "ConfigError")) is errors.ConfigError
    unexpected = await asyncio.to_thread(predict, "RuntimeError")
    assert type(unexpected) is FeatureStoreError
    assert str(unexpected) == "INTERNAL: internal error: RuntimeError: not one of ours"
