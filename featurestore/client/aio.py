"""`AsyncClient`: the asyncio twin of `Client` (same methods, awaited; docs on `Client`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import numpy as np
import numpy.typing as npt
from grpc import aio

from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.client.core import (
    ChannelOptions,
    Neighbours,
    OnlineFeatures,
    PathLike,
    Prediction,
    Ranking,
    RequestValues,
    call_metadata,
    channel_credentials,
    channel_options,
    neighbours,
    online_features_request,
    predict_request,
    prediction,
    rank_request,
    ranking,
    search_request,
    translated_errors,
)
from featurestore.errors import Unavailable

__all__ = ["AsyncClient"]


class AsyncClient:
    """The asyncio client; the same calls as `Client`, awaited (parameters, TLS and tokens: see `Client`).

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.get_online_features({"user_id": [1]}, ["user_profile"])
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        options: ChannelOptions = (),
    ) -> None:
        self._metadata = call_metadata(token)  # sent with every call
        tls = channel_credentials(credentials, tls_ca, tls_cert, tls_key)
        if tls is None:
            self._channel = aio.insecure_channel(target, options=channel_options(options))
        else:
            self._channel = aio.secure_channel(target, tls, options=channel_options(options))
        self._stub = pb_grpc.FeatureStoreStub(self._channel)
        self._timeout_s = timeout_s

    async def get_online_features(
        self,
        entities: Mapping[str, Sequence[int] | Sequence[str] | npt.NDArray[Any]],
        features: Sequence[str] | str,
        *,
        full_feature_names: bool = False,
        timeout_s: float | None = None,
    ) -> OnlineFeatures:
        """Features for a batch of entity rows; see `Client.get_online_features`."""
        request = online_features_request(entities, features, full_feature_names)
        with translated_errors:
            response = await self._stub.GetOnlineFeatures(
                request, timeout=timeout_s or self._timeout_s, metadata=self._metadata
            )
        return OnlineFeatures(response)

    async def search_similar(
        self,
        view: str,
        vectors: npt.ArrayLike | None = None,
        ids: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        k: int = 10,
        *,
        exclude_query: bool = False,
        allow_ids: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        exclude_ids: Sequence[int] | npt.NDArray[np.integer[Any]] | None = None,
        features: Sequence[str] | str | None = None,
        full_feature_names: bool = False,
        timeout_s: float | None = None,
    ) -> Neighbours:
        """The k nearest entities of `view` to each query; see `Client.search_similar`."""
        request = search_request(
            view, vectors, ids, k, exclude_query, allow_ids, exclude_ids, features, full_feature_names
        )
        with translated_errors:
            response = await self._stub.SearchSimilar(
                request, timeout=timeout_s or self._timeout_s, metadata=self._metadata
            )
        return neighbours(response)

    async def predict(
        self,
        model: str,
        entities: Mapping[str, Any],
        *,
        request_values: RequestValues | None = None,
        breakdown: bool = False,
        timeout_s: float | None = None,
    ) -> Prediction:
        """Score entity rows with a served model; see `Client.predict`."""
        request = predict_request(model, entities, request_values, breakdown)
        with translated_errors:
            response = await self._stub.Predict(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        return prediction(response)

    async def rank(
        self,
        model: str,
        context: Mapping[str, Any],
        *,
        candidate_ids: Any = None,
        query_vector: Any = None,
        seed_ids: Any = None,
        n_candidates: int = 500,
        top_n: int = 20,
        request_values: RequestValues | None = None,
        breakdown: bool = False,
        timeout_s: float | None = None,
    ) -> Ranking:
        """The best candidates for `context` by a model; see `Client.rank`."""
        request = rank_request(
            model, context, candidate_ids, query_vector, seed_ids, n_candidates, top_n, request_values, breakdown
        )
        with translated_errors:
            response = await self._stub.Rank(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        return ranking(response)

    async def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        """Wait until the server's health check answers SERVING; Unavailable on timeout."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"the feature server was not SERVING within {timeout_s} s")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
