"""`Client`: the blocking client. Requests, results and errors come from `core`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import numpy as np
import numpy.typing as npt

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

__all__ = ["Client"]


class Client:
    """A blocking client of the feature server at `target` ("host:port").

    Parameters:
        target: the server address.
        timeout_s: default deadline of each call, float seconds (None: no deadline).
        credentials: TLS channel credentials, ready-made (e.g. grpc.ssl_channel_credentials()
            for the system's roots); or
        tls_ca: the PEM CA certificates that signed the server's certificate (TLS);
        tls_cert, tls_key: PEM client certificate and key, for mutual TLS (the system's
            roots check the server unless `tls_ca` is given). Without any of these: plaintext.
        token: a bearer token, sent as `authorization: Bearer <token>` with every call
            (never printed); the server refuses a call without a valid one
            (Unauthenticated) or without the method's scope (PermissionDenied).
        options: further gRPC channel arguments, e.g. [("grpc.lb_policy_name", "round_robin")]
            to spread calls over every address `target` resolves to (a headless Service's
            pods, or "ipv4:10.0.0.1:50051,10.0.0.2:50051"); a key given here replaces the
            client's default of the same key.

    Failed calls raise this package's errors (NotFound, InvalidArgument, MissingFeature,
    Unavailable, ...: the class the server raised), chained to the grpc.RpcError. A server
    whose certificate `tls_ca` did not sign, or that refuses the client's certificate,
    fails the call with Unavailable.

        with Client("127.0.0.1:50051") as client:
            result = client.get_online_features({"user_id": [1, 2]}, ["user_profile:age"])

        with Client("features.prod:50051", tls_ca="ca.pem", token=os.environ["FEATURES_TOKEN"]) as client:
            ...
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
            self._channel = grpc.insecure_channel(target, options=channel_options(options))
        else:
            self._channel = grpc.secure_channel(target, tls, options=channel_options(options))
        self._stub = pb_grpc.FeatureStoreStub(self._channel)
        self._timeout_s = timeout_s

    def get_online_features(
        self,
        entities: Mapping[str, Sequence[int] | Sequence[str] | npt.NDArray[Any]],
        features: Sequence[str] | str,
        *,
        full_feature_names: bool = False,
        timeout_s: float | None = None,
    ) -> OnlineFeatures:
        """Features for a batch of entity rows.

        Parameters:
            entities: one column per join key, e.g. {"user_id": [1, 2]} (ints or strs).
            features: "view:feature", "view" or feature service names.
            full_feature_names: name columns "view__feature".
            timeout_s: this call's deadline (default: the client's).

        Returns an `OnlineFeatures`: one numpy array and one status array per feature.

        >>> client.get_online_features({"user_id": [1]}, ["user_profile:age"]).values("age")
        ... # doctest: +SKIP
        """
        request = online_features_request(entities, features, full_feature_names)
        with translated_errors:
            response = self._stub.GetOnlineFeatures(
                request, timeout=timeout_s or self._timeout_s, metadata=self._metadata
            )
        return OnlineFeatures(response)

    def search_similar(
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
        """The k nearest entities of embedding view `view` to each query.

        Parameters:
            view: an embedding view, e.g. "item_embedding".
            vectors: (queries, dim) or (dim,) query vectors; or
            ids: entity ids whose stored embeddings are the queries.
            k: neighbours per query, 1 to 1,000.
            exclude_query: with `ids`, an entity is never its own neighbour.
            allow_ids: only these ids may be returned; exclude_ids: never these.
            features: the neighbours' features to return ("view:feature", "view" or a
                service), looked up in the same call.
            timeout_s: this call's deadline (default: the client's).

        Returns `Neighbours` (ids, scores, features).

        >>> client.search_similar("item_embedding", ids=[42], k=5, exclude_query=True)
        ... # doctest: +SKIP
        """
        request = search_request(
            view, vectors, ids, k, exclude_query, allow_ids, exclude_ids, features, full_feature_names
        )
        with translated_errors:
            response = self._stub.SearchSimilar(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        return neighbours(response)

    def predict(
        self,
        model: str,
        entities: Mapping[str, Any],
        *,
        request_values: RequestValues | None = None,
        breakdown: bool = False,
        timeout_s: float | None = None,
    ) -> Prediction:
        """Score entity rows with a served model (features fetched in the same call).

        Parameters:
            model: a model of the server's models.yaml, e.g. "ranker".
            entities: one column per join key; a column of one value is broadcast
                ({"user_id": [7], "item_id": [1, 2, 3]}).
            request_values: request-time inputs by name, one value or one per row.
            breakdown: also return where the time went, per stage.
            timeout_s: this call's deadline (default: the client's).

        Returns a `Prediction`: one score per row. A `required` input missing for some row
        raises MissingFeature.

        >>> client.predict("ranker", {"user_id": [7], "item_id": [1, 2]})  # doctest: +SKIP
        """
        request = predict_request(model, entities, request_values, breakdown)
        with translated_errors:
            response = self._stub.Predict(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        return prediction(response)

    def rank(
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
        """The `top_n` best candidates for `context` (e.g. {"user_id": [7]}) by a model.

        Candidates are `candidate_ids`, or `n_candidates` retrieved from the model's
        embedding view by `query_vector` or by the mean embedding of `seed_ids`.

        Parameters:
            model: a model of the server's models.yaml, e.g. "ranker".
            context: the context's entity columns, e.g. {"user_id": [7]}; the candidates
                are the model's `candidate_key`.
            candidate_ids, query_vector, seed_ids: exactly one of them (InvalidArgument
                otherwise).
            n_candidates: how many to retrieve by `query_vector` or `seed_ids`.
            top_n: how many to return, best first.
            request_values: request-time inputs by name, as for `predict`.
            breakdown: also return where the time went, per stage.
            timeout_s: this call's deadline (default: the client's).

        Returns a `Ranking` (ids, scores, candidate_count, model_version, breakdown).

        >>> client.rank("ranker", {"user_id": [7]}, candidate_ids=[1, 2, 3], top_n=2)  # doctest: +SKIP
        """
        request = rank_request(
            model, context, candidate_ids, query_vector, seed_ids, n_candidates, top_n, request_values, breakdown
        )
        with translated_errors:
            response = self._stub.Rank(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)
        return ranking(response)

    def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        """Block until the server's health check answers SERVING; Unavailable on timeout."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"the feature server was not SERVING within {timeout_s} s")
            time.sleep(0.1)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
