"""The Python client: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as client:
        result = client.get_online_features(
            entities={"user_id": [1, 2, 3]}, features=["user_profile:age", "user_activity"]
        )
        result.values("age")              # numpy int64 array, one value per entity row
        result.statuses("user_profile:age")  # uint8 FieldStatus per row (1 = PRESENT)

Every fixed-width column becomes an array with one `numpy.frombuffer` (no per-value
work); strings and bytes become numpy object arrays. gRPC errors are raised as this
package's errors (NotFound, InvalidArgument, Unavailable, ...), chained to the RpcError.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import grpc
import numpy as np
import numpy.typing as npt
from grpc import aio

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.client.inference import (
    Prediction,
    Ranking,
    RequestValues,
    predict_request,
    prediction,
    rank_request,
    ranking,
)
from featurestore.errors import (
    ConfigError,
    DeadlineExceeded,
    FeatureStoreError,
    InvalidArgument,
    LockHeld,
    NotFound,
    Unavailable,
)
from featurestore.limits import MAX_MESSAGE_BYTES

__all__ = ["AsyncClient", "Client", "Neighbours", "OnlineFeatures", "Prediction", "Ranking"]

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
_VT = pb.ValueType
_FIXED: dict[int, np.dtype[Any]] = {
    _VT.VALUE_TYPE_INT32: np.dtype("<i4"),
    _VT.VALUE_TYPE_INT64: np.dtype("<i8"),
    _VT.VALUE_TYPE_FLOAT32: np.dtype("<f4"),
    _VT.VALUE_TYPE_FLOAT64: np.dtype("<f8"),
    _VT.VALUE_TYPE_BOOL: np.dtype("?"),
    _VT.VALUE_TYPE_UNIX_TIMESTAMP: np.dtype("<i8"),
    _VT.VALUE_TYPE_INT32_LIST: np.dtype("<i4"),
    _VT.VALUE_TYPE_INT64_LIST: np.dtype("<i8"),
    _VT.VALUE_TYPE_FLOAT32_LIST: np.dtype("<f4"),
    _VT.VALUE_TYPE_FLOAT64_LIST: np.dtype("<f8"),
}
_LISTS = {
    _VT.VALUE_TYPE_INT32_LIST,
    _VT.VALUE_TYPE_INT64_LIST,
    _VT.VALUE_TYPE_FLOAT32_LIST,
    _VT.VALUE_TYPE_FLOAT64_LIST,
}
_ERRORS: dict[grpc.StatusCode, type[FeatureStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: ConfigError,
    grpc.StatusCode.ABORTED: LockHeld,
}


class OnlineFeatures:
    """The result of one lookup: a numpy array and a status array per feature.

    Columns are found by their name in the response (`names`), or as "view:feature".
    Values of rows whose status is not PRESENT (1) are zeros or empty.
    """

    __slots__ = ("_by_name", "_response", "_ts", "_values", "names", "rows", "views")

    def __init__(self, response: pb.GetOnlineFeaturesResponse) -> None:
        self._response = response
        self.rows = n = response.row_count
        self.views = tuple(v.view for v in response.views)
        self._ts = {v.view: np.frombuffer(v.event_timestamps_us, dtype="<i8") for v in response.views}
        # One pass, few attribute reads per column: this loop is the client's hot path.
        values: list[tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]] = []
        names = []
        frombuffer, u8 = np.frombuffer, np.uint8
        for col in response.columns:
            names.append(col.name)
            vt, length = col.value_type, col.length
            dtype = _FIXED.get(vt)
            if dtype is not None and (length or vt not in _LISTS):
                array = frombuffer(col.values, dtype=dtype)
                if length:
                    array = array.reshape(n, length)
            else:
                array = _var_column(col, vt, dtype, n)
            values.append((array, frombuffer(col.statuses, dtype=u8)))
        self._values = values
        self.names = tuple(names)
        self._by_name = {name: i for i, name in enumerate(names)}

    def values(self, name: str) -> npt.NDArray[Any]:
        """The values of feature `name`: (rows,) or (rows, length) for fixed-length lists."""
        return self._values[self._index(name)][0]

    def statuses(self, name: str) -> npt.NDArray[np.uint8]:
        """Feast FieldStatus per row: 1 PRESENT, 2 NULL_VALUE, 3 NOT_FOUND, 4 OUTSIDE_MAX_AGE."""
        return self._values[self._index(name)][1]

    def event_timestamps(self, view: str) -> npt.NDArray[np.int64]:
        """Event time of each row of `view`, int64 microseconds since the epoch (0: none)."""
        return self._ts[view]

    def to_dict(self) -> dict[str, npt.NDArray[Any]]:
        """Column name -> values."""
        return {name: v for name, (v, _) in zip(self.names, self._values, strict=True)}

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.values(name)

    def _index(self, name: str) -> int:
        index = self._by_name.get(name)
        if index is None and ":" in name:
            index = self._aliases().get(name)
        if index is None:
            raise KeyError(f"no feature {name!r} in this result; it has {self.names}")
        return index

    def _aliases(self) -> dict[str, int]:
        """ "view:feature" -> column index, built on first use."""
        aliases: dict[str, int] = {}
        for i, col in enumerate(self._response.columns):
            view = self.views[col.view]
            feature = col.name.removeprefix(f"{view}__")
            aliases.setdefault(f"{view}:{feature}", i)
        return aliases


def _var_column(col: pb.FeatureColumn, vt: int, dtype: np.dtype[Any] | None, n: int) -> npt.NDArray[Any]:
    """Strings, bytes and lists without a declared length: an object array."""
    out = np.empty(n, dtype=object)
    data, raw_offsets = col.values, col.offsets
    if vt == _VT.VALUE_TYPE_STRING and n > 8 and b"\x00" not in data:
        out[:] = _split_strings(data, np.frombuffer(raw_offsets, dtype="<i4"), n)
        return out
    offsets = np.frombuffer(raw_offsets, dtype="<i4").tolist()
    if vt == _VT.VALUE_TYPE_STRING:
        out[:] = [data[a:b].decode() for a, b in itertools.pairwise(offsets)]
    elif vt == _VT.VALUE_TYPE_BYTES:
        out[:] = [data[a:b] for a, b in itertools.pairwise(offsets)]
    else:
        assert dtype is not None
        flat = np.frombuffer(data, dtype=dtype)
        size = dtype.itemsize
        for i, (a, b) in enumerate(itertools.pairwise(offsets)):
            out[i] = flat[a // size : b // size]
    return out


def _split_strings(data: bytes, offsets: npt.NDArray[np.int32], n: int) -> list[str]:
    """n strings from Arrow-style data + offsets, with no per-value Python work.

    A NUL is inserted after every value (vectorised) and one `str.split` cuts them all;
    only valid when the data holds no NUL of its own.
    """
    lengths = np.diff(offsets)
    out = np.zeros(len(data) + n, dtype=np.uint8)
    shift = np.repeat(np.arange(n, dtype=np.intp), lengths)
    out[np.arange(len(data), dtype=np.intp) + shift] = np.frombuffer(data, dtype=np.uint8)
    return out.tobytes().decode().split("\x00")[:n]


def _request(
    entities: Mapping[str, Any], features: Sequence[str] | str, full_feature_names: bool
) -> pb.GetOnlineFeaturesRequest:
    columns = []
    for name, values in entities.items():
        if isinstance(values, np.ndarray):
            kind, values = values.dtype.kind, values.tolist()
        else:
            values = list(values)
            kind = "U" if values and isinstance(values[0], str) else "i"
        if kind in "iu":
            columns.append(pb.EntityColumn(name=name, int64_values=values))
        else:
            columns.append(pb.EntityColumn(name=name, string_values=values))
    refs = [features] if isinstance(features, str) else list(features)
    return pb.GetOnlineFeaturesRequest(entities=columns, features=refs, full_feature_names=full_feature_names)


class Neighbours(NamedTuple):
    """The result of `search_similar`.

    ids: (queries, k) int64 entity ids, nearest first; -1 where fewer than k were found.
    scores: (queries, k) float32: cosine similarity or inner product (higher is nearer)
        or squared L2 distance (lower is nearer), by the view's metric.
    features: the neighbours' features when asked (one row per entry of `ids.ravel()`;
        rows of -1 ids are NOT_FOUND), else None.
    """

    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    features: OnlineFeatures | None


def _search_request(
    view: str,
    vectors: Any,
    ids: Any,
    k: int,
    exclude_query: bool,
    allow_ids: Any,
    exclude_ids: Any,
    features: Sequence[str] | str | None,
    full_feature_names: bool,
) -> pb.SearchSimilarRequest:
    if (vectors is None) == (ids is None):
        raise InvalidArgument("pass exactly one of vectors= and ids=")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 2**32:
        raise InvalidArgument(f"k={k!r} is out of range: ask for 1 to 1000 neighbours")
    refs = [] if features is None else [features] if isinstance(features, str) else list(features)
    request = pb.SearchSimilarRequest(
        view=view,
        k=k,
        exclude_query_entity=exclude_query,
        features=refs,
        full_feature_names=full_feature_names,
        exclude_ids=b"" if exclude_ids is None else _packed_ids(exclude_ids),
    )
    if vectors is not None:
        array = np.asarray(vectors, dtype="<f4")
        array = array.reshape(1, -1) if array.ndim == 1 else array
        request.query_vectors = np.ascontiguousarray(array).tobytes()
        request.query_count = array.shape[0] if array.ndim == 2 else 0
    else:
        request.query_ids = _packed_ids(ids)
    if allow_ids is not None:
        request.allow_ids = _packed_ids(allow_ids)
    return request


def _packed_ids(ids: Any) -> bytes:
    array = np.asarray(ids)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidArgument(f"entity ids must be integers, got dtype {array.dtype}")
    return np.ascontiguousarray(array.reshape(-1), dtype="<i8").tobytes()


def _neighbours(response: pb.SearchSimilarResponse) -> Neighbours:
    shape = (response.query_count, response.k)
    ids = np.frombuffer(response.ids, dtype="<i8").reshape(shape)
    scores = np.frombuffer(response.scores, dtype="<f4").reshape(shape)
    features = OnlineFeatures(response.features) if response.HasField("features") else None
    return Neighbours(ids, scores, features)


def _error(exc: grpc.RpcError) -> FeatureStoreError:
    code, details = exc.code(), exc.details()
    return _ERRORS.get(code, FeatureStoreError)(f"{code.name}: {details}")


class Client:
    """A blocking client of the feature server at `target` ("host:port").

    Parameters:
        target: the server address.
        timeout_s: default deadline of each call, float seconds (None: no deadline).
        credentials: TLS channel credentials; None for plaintext.
    """

    def __init__(
        self, target: str, *, timeout_s: float | None = 5.0, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=_OPTIONS)
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

        >>> client.get_online_features({"user_id": [1]}, ["user_profile:age"]).values("age")
        ... # doctest: +SKIP
        """
        request = _request(entities, features, full_feature_names)
        try:
            response = self._stub.GetOnlineFeatures(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
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

        >>> client.search_similar("item_embedding", ids=[42], k=5, exclude_query=True)
        ... # doctest: +SKIP
        """
        request = _search_request(
            view, vectors, ids, k, exclude_query, allow_ids, exclude_ids, features, full_feature_names
        )
        try:
            response = self._stub.SearchSimilar(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        return _neighbours(response)

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

        >>> client.predict("ranker", {"user_id": [7], "item_id": [1, 2]})  # doctest: +SKIP
        """
        request = predict_request(model, entities, request_values, breakdown)
        try:
            response = self._stub.Predict(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
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
        """
        request = rank_request(
            model, context, candidate_ids, query_vector, seed_ids, n_candidates, top_n, request_values, breakdown
        )
        try:
            response = self._stub.Rank(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
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
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient:
    """The asyncio client; the same calls as `Client`, awaited.

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.get_online_features({"user_id": [1]}, ["user_profile"])
    """

    def __init__(
        self, target: str, *, timeout_s: float | None = 5.0, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        if credentials is None:
            self._channel = aio.insecure_channel(target, options=_OPTIONS)
        else:
            self._channel = aio.secure_channel(target, credentials, options=_OPTIONS)
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
        request = _request(entities, features, full_feature_names)
        try:
            response = await self._stub.GetOnlineFeatures(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
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
        request = _search_request(
            view, vectors, ids, k, exclude_query, allow_ids, exclude_ids, features, full_feature_names
        )
        try:
            response = await self._stub.SearchSimilar(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        return _neighbours(response)

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
        try:
            response = await self._stub.Predict(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
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
        try:
            response = await self._stub.Rank(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        return ranking(response)

    async def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        """Wait until the server's health check answers SERVING; Unavailable on timeout."""
        import asyncio

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
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
