"""What `Client` and `AsyncClient` share: the channel's credentials and the token's
metadata, request builders, response parsers, the results, and the translation of gRPC
errors. No I/O here but reading the TLS files once; each client method is

    request = <kind>_request(...)          # build (may raise InvalidArgument)
    with translated_errors:
        response = stub.<Rpc>(request, timeout=..., metadata=<the token's, or None>)
    return <parser>(response)              # parse

Every fixed-width column becomes an array with one `numpy.frombuffer` (no per-value work);
strings and bytes become numpy object arrays.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import grpc
import numpy as np
import numpy.typing as npt

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.errors import ERROR_METADATA_KEY, FeatureStoreError, InvalidArgument, error_class
from featurestore.limits import MAX_K, MAX_MESSAGE_BYTES

__all__ = [
    "CHANNEL_OPTIONS",
    "ChannelOptions",
    "Metadata",
    "Neighbours",
    "OnlineFeatures",
    "Prediction",
    "Ranking",
    "RequestValues",
    "call_metadata",
    "channel_credentials",
    "channel_options",
    "error_from_rpc",
    "neighbours",
    "online_features_request",
    "predict_request",
    "prediction",
    "rank_request",
    "ranking",
    "search_request",
    "translated_errors",
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

ChannelOptions = Sequence[tuple[str, Any]]


def channel_options(extra: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """The clients' channel options: `CHANNEL_OPTIONS`, then `extra`, which replaces a default of the same key.

    `extra` is how a caller reaches gRPC's own channel arguments, e.g. client-side load
    balancing over every address of a headless Service or a list of replicas:

    >>> channel_options([("grpc.lb_policy_name", "round_robin")])[-1]
    ('grpc.lb_policy_name', 'round_robin')
    """
    given = {key for key, _ in extra}
    return [(key, value) for key, value in CHANNEL_OPTIONS if key not in given] + list(extra)


RequestValues = Mapping[str, Sequence[float] | Sequence[int] | Sequence[bool] | npt.NDArray[Any]]
Metadata = tuple[tuple[str, str], ...]
PathLike = str | os.PathLike[str]

# RFC 6750's b64token: what a bearer token may hold (a gRPC metadata value must be printable ASCII).
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    tls_ca: PathLike | None,
    tls_cert: PathLike | None,
    tls_key: PathLike | None,
) -> grpc.ChannelCredentials | None:
    """The channel's TLS credentials from the clients' arguments; None for plaintext.

    Parameters:
        credentials: ready-made credentials (exclusive with the paths).
        tls_ca: PEM CA certificates that signed the server's certificate (None with a
            client certificate: the system's roots).
        tls_cert, tls_key: PEM client certificate and key, for mutual TLS (both or neither).

    Raises InvalidArgument for a mix of `credentials` and paths, half a client pair, or a
    file that cannot be read (naming it).

    >>> channel_credentials(None, None, None, None) is None
    True
    """
    if credentials is not None:
        if tls_ca is not None or tls_cert is not None or tls_key is not None:
            raise InvalidArgument("pass credentials= or tls_ca=/tls_cert=/tls_key=, not both")
        return credentials
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("tls_cert= and tls_key= go together: give both for mutual TLS")
    if tls_ca is None and tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read("tls_ca", tls_ca),
        private_key=_read("tls_key", tls_key),
        certificate_chain=_read("tls_cert", tls_cert),
    )


def _read(name: str, path: PathLike | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise InvalidArgument(f"{name}={os.fspath(path)!r} cannot be read: {exc.strerror}") from None


def call_metadata(token: str | None) -> Metadata | None:
    """The metadata every call sends: `authorization: Bearer <token>`; None without a token.

    Raises InvalidArgument, without echoing it, for a token that is not a bearer token
    (letters, digits and -._~+/, then any =).

    >>> call_metadata("s3cr3t-t0ken")
    (('authorization', 'Bearer s3cr3t-t0ken'),)
    """
    if token is None:
        return None
    if not isinstance(token, str) or _TOKEN.fullmatch(token) is None:
        raise InvalidArgument("token= must be a bearer token: letters, digits and -._~+/ (then any =)")
    return (("authorization", f"Bearer {token}"),)


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


def error_from_rpc(exc: grpc.RpcError) -> FeatureStoreError:
    """This package's error for a failed call: the class the server raised, when it sent one
    (see `errors.error_class`), else the status's canonical class; message "CODE: details".
    """
    code, details = exc.code(), exc.details()
    return error_class(code.name, _error_name(exc))(f"{code.name}: {details}")


def _error_name(exc: grpc.RpcError) -> str | None:
    # Sync calls give a tuple of (key, value), aio calls an aio.Metadata: both iterate as pairs.
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY:
            return value if isinstance(value, str) else None
    return None


class _TranslatedErrors:
    """`with translated_errors:` around a stub call (awaited or not) raises a grpc.RpcError
    as `error_from_rpc(exc) from exc`; it holds no state, so one instance serves every call."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, grpc.RpcError):
            raise error_from_rpc(exc) from exc


translated_errors = _TranslatedErrors()


def online_features_request(
    entities: Mapping[str, Any], features: Sequence[str] | str, full_feature_names: bool
) -> pb.GetOnlineFeaturesRequest:
    """The GetOnlineFeatures request for `Client.get_online_features`'s arguments."""
    refs = [features] if isinstance(features, str) else list(features)
    return pb.GetOnlineFeaturesRequest(
        entities=_entity_columns(entities), features=refs, full_feature_names=full_feature_names
    )


def _entity_columns(entities: Mapping[str, Any]) -> list[pb.EntityColumn]:
    """One column per join key: strings for a str (or bytes) array or a column whose first
    value is a str, int64 otherwise (other types fail in protobuf with a TypeError)."""
    columns = []
    for name, values in entities.items():
        if isinstance(values, np.ndarray):
            kind, items = values.dtype.kind, values.tolist()
        else:
            kind, items = "O", list(values)
        if kind == "O":
            kind = "U" if items and isinstance(items[0], str) else "i"
        if kind in ("U", "S"):
            columns.append(pb.EntityColumn(name=name, string_values=items))
        else:
            columns.append(pb.EntityColumn(name=name, int64_values=items))
    return columns


class OnlineFeatures:
    """The result of one lookup: a numpy array and a status array per feature.

    Columns are found by their name in the response (`names`), or as "view:feature".
    Values of rows whose status is not PRESENT (1) are zeros or empty. Each column is
    turned into arrays on first access (`values`, `statuses`, `to_dict`) and kept: the
    arrays of fixed-width columns are views of the response's bytes, so a caller that
    reads five of fifty features pays for five.
    """

    __slots__ = ("_by_name", "_columns", "_response", "_ts", "_values", "names", "rows", "views")

    def __init__(self, response: pb.GetOnlineFeaturesResponse) -> None:
        self._response = response
        self.rows = response.row_count
        self._columns = columns = response.columns
        self.names = names = tuple([col.name for col in columns])
        self._by_name = {name: i for i, name in enumerate(names)}
        self._values: list[tuple[npt.NDArray[Any], npt.NDArray[np.uint8]] | None] = [None] * len(names)
        self._ts: dict[str, npt.NDArray[np.int64]] | None = None
        self.views = tuple([v.view for v in response.views])

    def values(self, name: str) -> npt.NDArray[Any]:
        """The values of feature `name`: (rows,) or (rows, length) for fixed-length lists."""
        return self._column(self._index(name))[0]

    def statuses(self, name: str) -> npt.NDArray[np.uint8]:
        """Feast FieldStatus per row: 1 PRESENT, 2 NULL_VALUE, 3 NOT_FOUND, 4 OUTSIDE_MAX_AGE."""
        return self._column(self._index(name))[1]

    def event_timestamps(self, view: str) -> npt.NDArray[np.int64]:
        """Event time of each row of `view`, int64 microseconds since the epoch (0: none)."""
        if self._ts is None:
            self._ts = {v.view: np.frombuffer(v.event_timestamps_us, dtype="<i8") for v in self._response.views}
        return self._ts[view]

    def to_dict(self) -> dict[str, npt.NDArray[Any]]:
        """Column name -> values."""
        return {name: self._column(i)[0] for i, name in enumerate(self.names)}

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.values(name)

    def _column(self, i: int) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]:
        """Column i's (values, statuses), decoded on first use."""
        done = self._values[i]
        if done is None:
            col, n = self._columns[i], self.rows
            vt, length = col.value_type, col.length
            dtype = _FIXED.get(vt)
            if dtype is not None and (length or vt not in _LISTS):
                array = np.frombuffer(col.values, dtype=dtype)
                if length:
                    array = array.reshape(n, length)
            else:
                array = _var_column(col, vt, dtype, n)
            done = self._values[i] = (array, np.frombuffer(col.statuses, dtype=np.uint8))
        return done

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


def search_request(
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
    """The SearchSimilar request for `Client.search_similar`'s arguments; InvalidArgument
    for neither or both of `vectors` and `ids`, a `k` out of range or non-integer ids."""
    if (vectors is None) == (ids is None):
        raise InvalidArgument("pass exactly one of vectors= and ids=")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 2**32:
        raise InvalidArgument(f"k={k!r} is out of range: ask for 1 to {MAX_K} neighbours")
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


def neighbours(response: pb.SearchSimilarResponse) -> Neighbours:
    """The `Neighbours` of a SearchSimilar response (arrays over its bytes, no copy)."""
    shape = (response.query_count, response.k)
    ids = np.frombuffer(response.ids, dtype="<i8").reshape(shape)
    scores = np.frombuffer(response.scores, dtype="<f4").reshape(shape)
    features = OnlineFeatures(response.features) if response.HasField("features") else None
    return Neighbours(ids, scores, features)


class Prediction(NamedTuple):
    """The result of `predict`: one score per entity row.

    statuses: input name ("view:feature" or "request:name") -> one Feast FieldStatus byte
        per row, for the inputs that were not PRESENT in some row (filled by the model's
        declared default).
    breakdown: stage -> microseconds (queue, redis, decode, matrix, model, ...), when asked.
    """

    scores: npt.NDArray[np.float32]
    statuses: dict[str, npt.NDArray[np.uint8]]
    model_version: str
    breakdown: dict[str, float] | None


class Ranking(NamedTuple):
    """The result of `rank`: the best `top_n` candidate ids, best first, and their scores."""

    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    candidate_count: int
    model_version: str
    breakdown: dict[str, float] | None


def _request_columns(values: RequestValues | None) -> list[pb.RequestColumn]:
    columns = []
    for name, column in (values or {}).items():
        array = np.asarray(column)
        if array.dtype.kind == "b":
            columns.append(pb.RequestColumn(name=name, bool_values=array.tolist()))
        elif array.dtype.kind in "iu":
            columns.append(pb.RequestColumn(name=name, int64_values=array.tolist()))
        elif array.dtype.kind == "f":
            columns.append(pb.RequestColumn(name=name, float_values=array.tolist()))
        else:
            raise InvalidArgument(f"request value {name!r} has type {array.dtype}: send floats, ints or bools")
    return columns


def predict_request(
    model: str, entities: Mapping[str, Any], request_values: RequestValues | None, breakdown: bool
) -> pb.PredictRequest:
    """The Predict request for `Client.predict`'s arguments; InvalidArgument for a request
    value that is not floats, ints or bools."""
    return pb.PredictRequest(
        model=model,
        entities=_entity_columns(entities),
        request_values=_request_columns(request_values),
        return_breakdown=breakdown,
    )


def rank_request(
    model: str,
    context: Mapping[str, Any],
    candidate_ids: Any,
    query_vector: Any,
    seed_ids: Any,
    n_candidates: int,
    top_n: int,
    request_values: RequestValues | None,
    breakdown: bool,
) -> pb.RankRequest:
    """The Rank request for `Client.rank`'s arguments; InvalidArgument unless exactly one
    of `candidate_ids`, `query_vector` and `seed_ids` is given."""
    given = sum(x is not None for x in (candidate_ids, query_vector, seed_ids))
    if given != 1:
        raise InvalidArgument("pass exactly one of candidate_ids=, query_vector= and seed_ids=")
    request = pb.RankRequest(
        model=model,
        entities=_entity_columns(context),
        top_n=top_n,
        request_values=_request_columns(request_values),
        return_breakdown=breakdown,
    )
    if candidate_ids is not None:
        request.candidate_ids = np.asarray(candidate_ids, dtype="<i8").tobytes()
    elif query_vector is not None:
        vector = np.asarray(query_vector, dtype="<f4").ravel()
        request.retrieval.CopyFrom(pb.Retrieval(query_vector=vector.tobytes(), n_candidates=n_candidates))
    else:
        seeds = np.asarray(seed_ids, dtype="<i8").tobytes()
        request.retrieval.CopyFrom(pb.Retrieval(seed_ids=seeds, n_candidates=n_candidates))
    return request


def _breakdown(message: Any) -> dict[str, float] | None:
    if not message.HasField("breakdown"):
        return None
    return {field.name: float(value) for field, value in message.breakdown.ListFields()}


def prediction(response: pb.PredictResponse) -> Prediction:
    """The `Prediction` of a Predict response."""
    statuses = {s.input: np.frombuffer(s.statuses, dtype=np.uint8) for s in response.statuses}
    scores = np.frombuffer(response.scores, dtype="<f4")
    return Prediction(scores, statuses, response.model_version, _breakdown(response))


def ranking(response: pb.RankResponse) -> Ranking:
    """The `Ranking` of a Rank response."""
    return Ranking(
        np.frombuffer(response.ids, dtype="<i8"),
        np.frombuffer(response.scores, dtype="<f4"),
        response.candidate_count,
        response.model_version,
        _breakdown(response),
    )
