"""The client's core without a channel: request builders, response parsers, and the
status -> error mapping derived from errors.py."""

from __future__ import annotations

import re
from typing import Any

import grpc
import numpy as np
import pytest
from grpc import aio

from featurestore import errors
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.client.core import (
    CHANNEL_OPTIONS,
    OnlineFeatures,
    error_from_rpc,
    neighbours,
    online_features_request,
    predict_request,
    prediction,
    rank_request,
    ranking,
    search_request,
    translated_errors,
)
from featurestore.errors import (
    ConfigError,
    DeadlineExceeded,
    FeatureStoreError,
    InvalidArgument,
    LockHeld,
    MissingFeature,
    ModelError,
    NotFound,
    Unavailable,
    error_class,
)
from featurestore.limits import MAX_MESSAGE_BYTES

VT = pb.ValueType


def offsets(*ends: int) -> bytes:
    return np.array([0, *ends], dtype="<i4").tobytes()


def response(n: int, *columns: pb.FeatureColumn, views: tuple[str, ...] = ("v",)) -> pb.GetOnlineFeaturesResponse:
    stamps = [pb.ViewTimestamps(view=v, event_timestamps_us=np.arange(n, dtype="<i8").tobytes()) for v in views]
    return pb.GetOnlineFeaturesResponse(row_count=n, columns=columns, views=stamps)


def column(name: str, vt: int, values: bytes, n: int, **kw: Any) -> pb.FeatureColumn:
    return pb.FeatureColumn(name=name, value_type=vt, values=values, statuses=bytes([1] * n), **kw)


# Request builders


@pytest.mark.parametrize(
    ("values", "field", "want"),
    [
        ([1, 2], "int64_values", [1, 2]),
        (np.array([1, 2], dtype=np.int32), "int64_values", [1, 2]),
        (np.array([2**63 - 1, -(2**63)]), "int64_values", [2**63 - 1, -(2**63)]),
        (np.array([7], dtype=np.uint16), "int64_values", [7]),
        (["a", "é"], "string_values", ["a", "é"]),
        (("a",), "string_values", ["a"]),
        (np.array(["ab", "c"]), "string_values", ["ab", "c"]),
        (np.array(["ab", "c"], dtype=object), "string_values", ["ab", "c"]),
        (np.array([3, 4], dtype=object), "int64_values", [3, 4]),
        ([], "int64_values", []),
    ],
    ids=[
        "int-list",
        "int32-array",
        "int64-bounds",
        "uint-array",
        "str-list",
        "str-tuple",
        "str-array",
        "str-object-array",
        "int-object-array",
        "empty",
    ],
)
def test_entity_columns_are_int64_or_strings_by_their_values(values: Any, field: str, want: list[Any]) -> None:
    for request in (
        online_features_request({"key": values}, "v", False),
        predict_request("m", {"key": values}, None, False),
        rank_request("m", {"key": values}, [1], None, None, 10, 5, None, False),
    ):
        (col,) = request.entities
        assert col.name == "key"
        assert list(getattr(col, field)) == want
        other = "string_values" if field == "int64_values" else "int64_values"
        assert not getattr(col, other)


def test_a_float_entity_column_fails_in_protobuf() -> None:
    with pytest.raises(TypeError):
        online_features_request({"key": [1.5]}, "v", False)
    with pytest.raises(TypeError):
        predict_request("m", {"key": np.array([1.5])}, None, False)


def test_online_features_request_takes_one_ref_or_many() -> None:
    one = online_features_request({"user_id": [1], "item_id": [2]}, "user_profile:age", True)
    assert list(one.features) == ["user_profile:age"]
    assert one.full_feature_names
    assert [c.name for c in one.entities] == ["user_id", "item_id"]
    many = online_features_request({"user_id": [1]}, ("user_profile", "svc"), False)
    assert list(many.features) == ["user_profile", "svc"]
    assert not many.full_feature_names


def test_search_request_by_vectors_packs_float32_rows() -> None:
    one = search_request("emb", [1.0, 2.0], None, 5, False, None, None, None, False)
    assert one.WhichOneof("query") == "query_vectors"
    assert one.query_count == 1 and one.k == 5
    assert np.frombuffer(one.query_vectors, "<f4").tolist() == [1.0, 2.0]
    assert not one.HasField("allow_ids") and one.exclude_ids == b"" and not one.features
    two = search_request("emb", np.ones((2, 3), dtype=np.float64), None, 1, False, [4], [5, 6], "v:f", True)
    assert two.query_count == 2
    assert np.frombuffer(two.query_vectors, "<f4").shape == (6,)
    assert np.frombuffer(two.allow_ids, "<i8").tolist() == [4]
    assert np.frombuffer(two.exclude_ids, "<i8").tolist() == [5, 6]
    assert list(two.features) == ["v:f"] and two.full_feature_names


def test_search_request_by_ids_packs_int64() -> None:
    request = search_request("emb", None, np.array([[1], [2]], dtype=np.int32), 3, True, [], None, ["a", "b"], False)
    assert request.WhichOneof("query") == "query_ids"
    assert np.frombuffer(request.query_ids, "<i8").tolist() == [1, 2]
    assert request.exclude_query_entity
    assert request.HasField("allow_ids") and request.allow_ids == b""  # set, empty: nothing allowed
    assert list(request.features) == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"vectors": None, "ids": None}, "exactly one of vectors= and ids="),
        ({"vectors": [1.0], "ids": [1]}, "exactly one of vectors= and ids="),
        ({"k": -1}, "k=-1 is out of range: ask for 1 to 1000 neighbours"),
        ({"k": 2**32}, "out of range"),
        ({"k": True}, "k=True is out of range"),
        ({"k": 2.0}, "k=2.0 is out of range"),
        ({"vectors": None, "ids": [1.5]}, "entity ids must be integers, got dtype float64"),
        ({"allow_ids": ["x"]}, "entity ids must be integers"),
        ({"exclude_ids": np.array([0.5])}, "entity ids must be integers"),
    ],
    ids=["neither", "both", "k-negative", "k-too-big", "k-bool", "k-float", "ids-float", "allow-str", "exclude-float"],
)
def test_bad_search_arguments_raise_invalid_argument(kwargs: dict[str, Any], words: str) -> None:
    args: dict[str, Any] = {"vectors": [1.0], "ids": None, "k": 10, "allow_ids": None, "exclude_ids": None} | kwargs
    with pytest.raises(InvalidArgument, match=re.escape(words)) as caught:
        search_request(
            "emb", args["vectors"], args["ids"], args["k"], False, args["allow_ids"], args["exclude_ids"], None, False
        )
    assert words in str(caught.value)


def test_predict_request_types_request_values_by_dtype() -> None:
    request = predict_request(
        "ranker",
        {"user_id": [7], "item_id": [1, 2]},
        {"flag": [True, False], "hour": [9], "price": np.array([1.5, 2.5], dtype=np.float32)},
        True,
    )
    assert request.model == "ranker" and request.return_breakdown
    flag, hour, price = request.request_values
    assert (flag.name, list(flag.bool_values)) == ("flag", [True, False])
    assert (hour.name, list(hour.int64_values)) == ("hour", [9])
    assert (price.name, list(price.float_values)) == ("price", [1.5, 2.5])
    assert not predict_request("ranker", {"user_id": [7]}, None, False).request_values


def test_a_string_request_value_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="request value 'country' has type <U2: send floats, ints or bools"):
        predict_request("ranker", {"user_id": [7]}, {"country": ["US"]}, False)
    with pytest.raises(InvalidArgument, match="request value 'country'"):
        rank_request("ranker", {"user_id": [7]}, [1], None, None, 10, 5, {"country": ["US"]}, False)


def test_rank_request_takes_exactly_one_candidate_source() -> None:
    given = rank_request("ranker", {"user_id": [7]}, [3, 1], None, None, 500, 2, {"hour": [9]}, True)
    assert given.WhichOneof("candidates") == "candidate_ids"
    assert np.frombuffer(given.candidate_ids, "<i8").tolist() == [3, 1]
    assert given.top_n == 2 and given.return_breakdown and given.request_values[0].name == "hour"
    by_vector = rank_request("ranker", {"user_id": [7]}, None, [[0.5, 1.0]], None, 50, 5, None, False)
    assert by_vector.WhichOneof("candidates") == "retrieval"
    assert np.frombuffer(by_vector.retrieval.query_vector, "<f4").tolist() == [0.5, 1.0]
    assert by_vector.retrieval.n_candidates == 50
    by_seeds = rank_request("ranker", {"user_id": [7]}, None, None, [4, 5], 60, 5, None, False)
    assert np.frombuffer(by_seeds.retrieval.seed_ids, "<i8").tolist() == [4, 5]
    assert by_seeds.retrieval.n_candidates == 60
    for sources in [(None, None, None), ([1], [0.5], None), ([1], None, [2]), (None, [0.5], [2])]:
        with pytest.raises(InvalidArgument, match="exactly one of candidate_ids=, query_vector= and seed_ids="):
            rank_request("ranker", {"user_id": [7]}, *sources, 500, 5, None, False)


def test_channel_options_raise_the_message_limits() -> None:
    assert dict(CHANNEL_OPTIONS) == {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    }


# Response parsers

FIXED_CASES = [
    (VT.VALUE_TYPE_INT32, "<i4", [-(2**31), 0, 2**31 - 1]),
    (VT.VALUE_TYPE_INT64, "<i8", [-(2**63), 0, 2**63 - 1]),
    (VT.VALUE_TYPE_FLOAT32, "<f4", [-1.5, 0.0, np.inf]),
    (VT.VALUE_TYPE_FLOAT64, "<f8", [1e-300, 0.0, -2.5]),
    (VT.VALUE_TYPE_BOOL, "?", [True, False, True]),
    (VT.VALUE_TYPE_UNIX_TIMESTAMP, "<i8", [1_700_000_000_000_000, 0, 1]),
]


@pytest.mark.parametrize(("vt", "dtype", "values"), FIXED_CASES, ids=lambda x: str(x))
def test_fixed_width_columns_are_arrays_of_their_dtype(vt: int, dtype: str, values: list[Any]) -> None:
    raw = np.array(values, dtype=dtype).tobytes()
    result = OnlineFeatures(response(3, column("f", vt, raw, 3)))
    got = result.values("f")
    assert got.dtype == np.dtype(dtype) and got.shape == (3,)
    assert got.tolist() == values


@pytest.mark.parametrize(
    ("vt", "dtype", "length"),
    [
        (VT.VALUE_TYPE_INT32_LIST, "<i4", 2),
        (VT.VALUE_TYPE_INT64_LIST, "<i8", 3),
        (VT.VALUE_TYPE_FLOAT32_LIST, "<f4", 4),
        (VT.VALUE_TYPE_FLOAT64_LIST, "<f8", 1),
    ],
    ids=["int32", "int64", "float32", "float64"],
)
def test_fixed_length_lists_are_rows_by_length(vt: int, dtype: str, length: int) -> None:
    n = 3
    flat = np.arange(n * length, dtype=dtype)
    result = OnlineFeatures(response(n, column("vec", vt, flat.tobytes(), n, length=length)))
    got = result.values("vec")
    assert got.shape == (n, length) and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, flat.reshape(n, length))


def test_lists_without_a_length_are_object_arrays_of_slices() -> None:
    parts = [np.array([1.5, 2.5], dtype="<f4"), np.array([], dtype="<f4"), np.array([3.0], dtype="<f4")]
    data = b"".join(p.tobytes() for p in parts)
    col = column("l", VT.VALUE_TYPE_FLOAT32_LIST, data, 3, offsets=offsets(8, 8, 12))
    got = OnlineFeatures(response(3, col)).values("l")
    assert got.dtype == object and got.shape == (3,)
    for value, want in zip(got, parts, strict=True):
        assert value.dtype == np.dtype("<f4")
        np.testing.assert_array_equal(value, want)


@pytest.mark.parametrize(
    "strings",
    [
        ["a", "", "héllo"],  # few rows: decoded one by one
        [f"s{i}" * (i % 3) for i in range(20)],  # many rows: the vectorised split
        ["", "", "", "", "", "", "", "", "", ""],  # many rows, all empty
        ["x\x00y", "z", *["w"] * 10],  # a NUL in the data: one by one again
        ["ünï", "cödé", *["日本"] * 9],  # multi-byte UTF-8 in the vectorised path
    ],
    ids=["few", "many", "many-empty", "with-nul", "many-utf8"],
)
def test_string_columns_decode_to_object_arrays(strings: list[str]) -> None:
    encoded = [s.encode() for s in strings]
    ends = np.cumsum([len(e) for e in encoded]).tolist()
    col = column("s", VT.VALUE_TYPE_STRING, b"".join(encoded), len(strings), offsets=offsets(*ends))
    got = OnlineFeatures(response(len(strings), col)).values("s")
    assert got.dtype == object
    assert got.tolist() == strings


def test_bytes_columns_stay_bytes() -> None:
    values = [b"\x00\x01", b"", b"\xff"]
    col = column("b", VT.VALUE_TYPE_BYTES, b"".join(values), 3, offsets=offsets(2, 2, 3))
    assert OnlineFeatures(response(3, col)).values("b").tolist() == values


def test_statuses_timestamps_names_and_aliases() -> None:
    ages = column("user_profile__age", VT.VALUE_TYPE_INT64, np.array([30, 0], "<i8").tobytes(), 2, view=0)
    ages.statuses = bytes([1, 3])
    score = column("score", VT.VALUE_TYPE_FLOAT32, np.array([0.5, 1.5], "<f4").tobytes(), 2, view=1)
    result = OnlineFeatures(response(2, ages, score, views=("user_profile", "item_stats")))
    assert result.rows == 2
    assert result.names == ("user_profile__age", "score")
    assert result.views == ("user_profile", "item_stats")
    assert result.statuses("user_profile__age").tolist() == [1, 3]
    assert result.statuses("user_profile__age").dtype == np.uint8
    assert result.values("user_profile:age").tolist() == [30, 0]  # "view:feature" with full names
    assert result["item_stats:score"].tolist() == [0.5, 1.5]  # "view:feature" with short names
    assert result.event_timestamps("item_stats").tolist() == [0, 1]
    assert list(result.to_dict()) == ["user_profile__age", "score"]
    with pytest.raises(KeyError, match="no feature 'price' in this result"):
        result.values("price")
    with pytest.raises(KeyError, match="'item_stats:price'"):
        result.values("item_stats:price")


def test_an_empty_response_has_no_columns() -> None:
    result = OnlineFeatures(pb.GetOnlineFeaturesResponse())
    assert result.rows == 0 and result.names == () and result.to_dict() == {}


def test_neighbours_are_queries_by_k_with_optional_features() -> None:
    ids = np.array([[1, 2], [3, -1]], dtype="<i8")
    scores = np.array([[0.9, 0.8], [0.7, -np.inf]], dtype="<f4")
    bare = neighbours(pb.SearchSimilarResponse(query_count=2, k=2, ids=ids.tobytes(), scores=scores.tobytes()))
    np.testing.assert_array_equal(bare.ids, ids)
    np.testing.assert_array_equal(bare.scores, scores)
    assert bare.ids.shape == bare.scores.shape == (2, 2) and bare.features is None
    features = response(4, column("f", VT.VALUE_TYPE_INT32, np.arange(4, dtype="<i4").tobytes(), 4))
    with_features = neighbours(
        pb.SearchSimilarResponse(query_count=2, k=2, ids=ids.tobytes(), scores=scores.tobytes(), features=features)
    )
    assert with_features.features is not None
    assert with_features.features.values("f").tolist() == [0, 1, 2, 3]


def test_prediction_and_ranking_parse_scores_statuses_and_breakdown() -> None:
    scores = np.array([0.25, 0.75], dtype="<f4")
    response_ = pb.PredictResponse(
        row_count=2,
        scores=scores.tobytes(),
        statuses=[pb.InputStatuses(input="item_stats:price", statuses=bytes([1, 3]))],
        model_version="abc123",
        breakdown=pb.LatencyBreakdown(batch_rows=2, model_us=12.5),
    )
    got = prediction(response_)
    assert got.scores.dtype == np.float32 and got.scores.tolist() == [0.25, 0.75]
    assert {k: v.tolist() for k, v in got.statuses.items()} == {"item_stats:price": [1, 3]}
    assert got.model_version == "abc123"
    assert got.breakdown == {"batch_rows": 2.0, "model_us": 12.5}  # fields that were set
    assert prediction(pb.PredictResponse(scores=scores.tobytes())).breakdown is None

    ranked = ranking(
        pb.RankResponse(
            ids=np.array([9, 4], "<i8").tobytes(),
            scores=np.array([0.9, 0.1], "<f4").tobytes(),
            candidate_count=7,
            model_version="v",
        )
    )
    assert ranked.ids.tolist() == [9, 4] and ranked.ids.dtype == np.int64
    assert ranked.scores.tolist() == pytest.approx([0.9, 0.1])
    assert (ranked.candidate_count, ranked.model_version, ranked.breakdown) == (7, "v", None)


# Errors: the status -> class table derived from errors.py


def rpc_error(code: grpc.StatusCode, details: str, name: str | None = None) -> aio.AioRpcError:
    trailing = aio.Metadata() if name is None else aio.Metadata((errors.ERROR_METADATA_KEY, name))
    return aio.AioRpcError(code, aio.Metadata(), trailing, details=details)


class SyncRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a blocking stub raises: trailing metadata as a tuple of pairs."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def initial_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


@pytest.mark.parametrize(
    ("code", "name", "want"),
    [
        ("FAILED_PRECONDITION", "MissingFeature", MissingFeature),
        ("FAILED_PRECONDITION", "ConfigError", ConfigError),
        ("FAILED_PRECONDITION", None, ConfigError),  # the canonical class of the status
        ("FAILED_PRECONDITION", "NoSuchError", ConfigError),  # an unknown name: the status decides
        ("FAILED_PRECONDITION", "Exception", ConfigError),  # a name, but not one of errors.py
        ("NOT_FOUND", "MissingFeature", NotFound),  # a known name with another status
        ("INTERNAL", "ModelError", ModelError),
        ("INTERNAL", None, FeatureStoreError),
        ("INTERNAL", "FeatureStoreError", FeatureStoreError),
        ("INVALID_ARGUMENT", None, InvalidArgument),
        ("NOT_FOUND", None, NotFound),
        ("UNAVAILABLE", None, Unavailable),
        ("DEADLINE_EXCEEDED", None, DeadlineExceeded),
        ("ABORTED", "LockHeld", LockHeld),
        ("UNKNOWN", None, FeatureStoreError),  # no class declares it
        ("DATA_LOSS", "ConfigError", FeatureStoreError),
        ("NOT_A_CODE", None, FeatureStoreError),
    ],
)
def test_error_class_prefers_the_sent_name_when_its_status_matches(
    code: str, name: str | None, want: type[FeatureStoreError]
) -> None:
    assert error_class(code, name) is want


def test_a_missing_feature_is_not_a_config_error_on_the_client() -> None:
    details = "model 'strict' needs item_stats:price, but it is missing"
    exc = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, details, "MissingFeature")
    error = error_from_rpc(exc)
    assert type(error) is MissingFeature
    assert str(error) == f"FAILED_PRECONDITION: {details}"
    assert type(error_from_rpc(rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "no registry"))) is ConfigError


def test_blocking_calls_metadata_tuples_are_read_too() -> None:
    key = errors.ERROR_METADATA_KEY
    exc = SyncRpcError(grpc.StatusCode.FAILED_PRECONDITION, "gone", (("other", "x"), (key, "MissingFeature")))
    assert type(error_from_rpc(exc)) is MissingFeature
    assert type(error_from_rpc(SyncRpcError(grpc.StatusCode.FAILED_PRECONDITION, "gone", ()))) is ConfigError


def test_translated_errors_raises_ours_from_the_rpc_error() -> None:
    exc = rpc_error(grpc.StatusCode.NOT_FOUND, "unknown view 'nope'", "NotFound")
    with pytest.raises(NotFound) as caught, translated_errors:
        raise exc
    assert str(caught.value) == "NOT_FOUND: unknown view 'nope'"
    assert caught.value.__cause__ is exc
    with pytest.raises(KeyError), translated_errors:  # not an RpcError: untouched
        raise KeyError("x")
    with translated_errors:
        pass


async def test_translated_errors_wraps_an_awaited_call() -> None:
    async def failing() -> None:
        raise rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")

    with pytest.raises(Unavailable, match=r"^UNAVAILABLE: connection refused$"), translated_errors:
        await failing()


def error_classes() -> list[type[FeatureStoreError]]:
    found = [getattr(errors, name) for name in errors.__all__]
    return [cls for cls in found if isinstance(cls, type) and issubclass(cls, FeatureStoreError)]


def test_errors_all_lists_every_class_of_the_tree() -> None:
    declared = {cls for cls in FeatureStoreError.__subclasses__() if cls.__module__ == errors.__name__}
    assert set(error_classes()) == {FeatureStoreError, *declared}
    assert {MissingFeature, ModelError} <= declared


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_round_trips_through_status_and_name(cls: type[FeatureStoreError]) -> None:
    sent = cls("boom")
    exc = rpc_error(sent.status, str(sent), type(sent).__name__)
    got = error_from_rpc(exc)
    assert type(got) is cls
    assert str(got) == f"{cls.status.name}: boom"
