"""Every request gets a defined status: a property-based fuzz of every RPC of a running `featurestore serve`.

For each method (the four FeatureStore ones, FeatureStoreAdmin.CacheStatus, health Check,
List and Watch, reflection), hypothesis sends random bytes, valid messages with bytes
flipped, cut or inserted, and random valid messages built from the method's descriptor
(strings drawn partly from the repo's real names, so that calls get past the first check).
Every answer must be OK or a documented status; afterwards the server must still answer a
normal call with the right values, and its log must hold no traceback and at most one
line per failed call.

Then the requests the issue found, one by one: a Rank context of two or three values,
retrieval with one candidate, a 100 KB model name or feature reference, health List.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import CLICKS, RestartableRedis, ServeProcess, start_serve, write_rows

from featurestore import Client, InvalidArgument, NotFound
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb

ITEMS = list(range(1, 41))
USERS = list(range(1, 21))

# Method path -> (request class, how it is called).
METHODS: dict[str, tuple[type[Message], str]] = {
    "/featurestore.v1.FeatureStore/GetOnlineFeatures": (pb.GetOnlineFeaturesRequest, "unary"),
    "/featurestore.v1.FeatureStore/SearchSimilar": (pb.SearchSimilarRequest, "unary"),
    "/featurestore.v1.FeatureStore/Predict": (pb.PredictRequest, "unary"),
    "/featurestore.v1.FeatureStore/Rank": (pb.RankRequest, "unary"),
    "/featurestore.v1.FeatureStoreAdmin/CacheStatus": (pb.CacheStatusRequest, "unary"),
    "/grpc.health.v1.Health/Check": (health_pb2.HealthCheckRequest, "unary"),
    "/grpc.health.v1.Health/List": (health_pb2.HealthListRequest, "unary"),
    "/grpc.health.v1.Health/Watch": (health_pb2.HealthCheckRequest, "stream"),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (
        reflection_pb2.ServerReflectionRequest,
        "bidi",
    ),
}
# What the API documents (README "API"): anything else, UNKNOWN and INTERNAL above all, is a bug.
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES = 80  # per method and kind: 9 methods x 4 kinds x 80 = 2,880 calls at most
KINDS = ("bytes", "corrupt", "valid", "near")
SEEN: collections.Counter[tuple[str, str, str]] = collections.Counter()  # (method, kind, status) -> calls

NAMES = [
    "user_profile",
    "user_activity",
    "item_stats",
    "item_embedding",
    "ranking_v1",
    "ranker",
    "user_id",
    "item_id",
    "user_profile:age",
    "user_activity:clicks_1h",
    "item_stats:price",
    "item_embedding:embedding",
    "hour_of_day",
    "featurestore.v1.FeatureStore",
    "grpc.health.v1.Health",
    "",
]


@pytest.fixture(scope="module")
def server(
    own_redis: RestartableRedis, feature_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    async def seed() -> None:
        for view, ids in (("user_profile", USERS), ("user_activity", USERS), ("item_stats", ITEMS)):
            await write_rows(own_redis.url, feature_repo, view, ids)
        await write_rows(own_redis.url, feature_repo, "item_embedding", ITEMS)

    asyncio.run(seed())  # before the start: the index is built from these
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    served = start_serve(feature_repo, own_redis.url, log)
    yield served
    served.kill()
    print("\nfuzz figures (method, kind: status x calls):")
    for method in METHODS:
        for kind in KINDS:
            statuses = {s: n for (m, k, s), n in sorted(SEEN.items()) if (m, k) == (method, kind)}
            print(f"  {method.rsplit('/', 1)[-1]:<22} {kind:<8} {statuses}")
    total = collections.Counter[str]()
    for (_, _, status), n in SEEN.items():
        total[status] += n
    print(f"  all: {sum(total.values())} calls, {dict(total)}")


@pytest.fixture(scope="module")
def channel(server: ServeProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def call(channel: grpc.Channel, method: str, raw: bytes) -> grpc.StatusCode:
    """Send `raw` as the request of `method`; the status it ends with (OK once a stream answered)."""
    kind = METHODS[method][1]
    try:
        if kind == "unary":
            channel.unary_unary(method)(raw, timeout=10)
        elif kind == "stream":
            replies = channel.unary_stream(method)(raw, timeout=10)
            next(replies)  # Watch answers the current status, then waits for changes
            replies.cancel()
        else:
            for _ in channel.stream_stream(method)(iter([raw]), timeout=10):
                pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _ids(*ids: int) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


HOUR = pb.RequestColumn(name="hour_of_day", int64_values=[9])
# A request that succeeds, per method: "near" requests are these with random fields merged in.
GOOD: dict[str, Message] = {
    "GetOnlineFeatures": pb.GetOnlineFeaturesRequest(
        entities=[pb.EntityColumn(name="user_id", int64_values=[1, 2])],
        features=["user_activity:clicks_1h", "user_profile"],
    ),
    "SearchSimilar": pb.SearchSimilarRequest(view="item_embedding", query_ids=_ids(1, 2), k=3),
    "Predict": pb.PredictRequest(
        model="ranker",
        entities=[
            pb.EntityColumn(name="user_id", int64_values=[1]),
            pb.EntityColumn(name="item_id", int64_values=[1, 2]),
        ],
        request_values=[HOUR],
    ),
    "Rank": pb.RankRequest(
        model="ranker",
        entities=[pb.EntityColumn(name="user_id", int64_values=[1])],
        candidate_ids=_ids(1, 2, 3, 4),
        top_n=2,
        request_values=[HOUR],
    ),
    "CacheStatus": pb.CacheStatusRequest(top=5),
    "Check": health_pb2.HealthCheckRequest(service=""),
    "List": health_pb2.HealthListRequest(),
    "Watch": health_pb2.HealthCheckRequest(service="featurestore.v1.FeatureStore"),
    "ServerReflectionInfo": reflection_pb2.ServerReflectionRequest(list_services=""),
}


# Random valid messages, from the descriptor ---------------------------------------------

_INT_RANGES = {
    pbd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _packed(dtype: str, values: st.SearchStrategy[Any], size: int) -> st.SearchStrategy[bytes]:
    return st.lists(values, max_size=size).map(lambda xs: np.asarray(xs, dtype=dtype).tobytes())


_BYTES = st.one_of(
    st.binary(max_size=64),
    _packed("<i8", st.one_of(st.sampled_from(ITEMS), st.integers(-(2**63), 2**63 - 1)), 12),  # ids
    _packed("<f4", st.floats(width=32), 70),  # vectors (item_embedding has 64 dimensions)
    st.just(np.ones(64, dtype="<f4").tobytes()),
)


def _value(field: pbd.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.one_of(st.integers(low, high), st.integers(max(low, -2), min(high, 50)))
    if t == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (pbd.FieldDescriptor.TYPE_FLOAT, pbd.FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if t == pbd.FieldDescriptor.TYPE_FLOAT else 64)
    if t == pbd.FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(NAMES), st.text(max_size=20))
    if t == pbd.FieldDescriptor.TYPE_BYTES:
        return _BYTES
    if t == pbd.FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    assert field.message_type is not None
    return messages(field.message_type, depth + 1)


def messages(descriptor: Any, depth: int = 0) -> st.SearchStrategy[Message]:
    """Random messages of `descriptor`: each field set or not, lists of up to 5, one field per oneof."""
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
        message = cls()
        chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in descriptor.oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if (oneof is not None and chosen[oneof.name] is not field) or depth > 3 or not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                for k, v in draw(st.dictionaries(_value(key, depth), _value(value, depth), max_size=3)).items():
                    if value.message_type is None:
                        getattr(message, field.name)[k] = v
                    else:
                        getattr(message, field.name)[k].CopyFrom(v)
            elif field.is_repeated:
                values = draw(st.lists(_value(field, depth), max_size=5))
                if field.message_type is None:
                    getattr(message, field.name).extend(values)
                else:
                    for value in values:
                        getattr(message, field.name).add().CopyFrom(value)
            elif field.message_type is not None:
                getattr(message, field.name).CopyFrom(draw(_value(field, depth)))
            else:
                setattr(message, field.name, draw(_value(field, depth)))
        return message

    return build()


@st.composite
def corrupted(draw: Callable[[st.SearchStrategy[Any]], Any], descriptor: Any) -> bytes:
    """A valid message's bytes with one to three bytes flipped, cut or inserted."""
    data = bytearray(draw(messages(descriptor)).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if how == "flip" and data:
            data[min(at, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def _check(channel: grpc.Channel, method: str, kind: str, raw: bytes) -> None:
    code = call(channel, method, raw)
    SEEN[(method, kind, code.name)] += 1
    assert code in DOCUMENTED, f"{method} answered {code.name} to {kind} {raw[:200]!r}"


@pytest.mark.parametrize("method", list(METHODS))
@FUZZ
@given(data=st.data())
def test_random_bytes_get_a_defined_status(channel: grpc.Channel, method: str, data: st.DataObject) -> None:
    _check(channel, method, "bytes", data.draw(st.binary(max_size=512)))


@pytest.mark.parametrize("method", list(METHODS))
@FUZZ
@given(data=st.data())
def test_corrupted_messages_get_a_defined_status(channel: grpc.Channel, method: str, data: st.DataObject) -> None:
    _check(channel, method, "corrupt", data.draw(corrupted(METHODS[method][0].DESCRIPTOR)))


@pytest.mark.parametrize("method", list(METHODS))
@FUZZ
@given(data=st.data())
def test_random_valid_messages_get_a_defined_status(channel: grpc.Channel, method: str, data: st.DataObject) -> None:
    _check(channel, method, "valid", data.draw(messages(METHODS[method][0].DESCRIPTOR)).SerializeToString())


@pytest.mark.parametrize("method", list(METHODS))
@FUZZ
@given(data=st.data())
def test_good_requests_with_random_fields_merged_in_get_a_defined_status(
    channel: grpc.Channel, method: str, data: st.DataObject
) -> None:
    request = type(GOOD[method.rsplit("/", 1)[-1]])()
    request.CopyFrom(GOOD[method.rsplit("/", 1)[-1]])
    request.MergeFrom(data.draw(messages(request.DESCRIPTOR)))  # fields replaced, lists extended, oneofs switched
    _check(channel, method, "near", request.SerializeToString())


def test_the_good_requests_succeed(channel: grpc.Channel) -> None:
    for method in METHODS:
        assert call(channel, method, GOOD[method.rsplit("/", 1)[-1]].SerializeToString()) == grpc.StatusCode.OK, method


def test_after_the_fuzz_the_server_answers_correctly_and_logged_no_traceback(server: ServeProcess) -> None:
    assert SEEN, "run with the fuzz tests above"
    with Client(server.target) as client:
        result = client.get_online_features({"user_id": USERS}, ["user_activity:clicks_1h", "user_profile:age"])
        assert result.values("clicks_1h").tolist() == [CLICKS] * len(USERS)
        assert result.values("age").tolist() == [CLICKS] * len(USERS)
        ranked = client.rank(
            "ranker", {"user_id": [1]}, candidate_ids=ITEMS, top_n=5, request_values={"hour_of_day": [9]}
        )
        assert len(ranked.ids) == 5 and set(ranked.ids.tolist()) <= set(ITEMS)
    output = server.output()
    assert "Traceback" not in output and "Unexpected" not in output, output[-5000:]
    failed = sum(n for (_, _, status), n in SEEN.items() if status != "OK")
    lines = [line for line in output.splitlines() if "featurestore.serving.interceptors" in line]
    assert len(lines) <= failed  # at most one per failed call (and throttled: far fewer)
    print(f"\nlog: {len(lines)} lines for {failed} failed calls")


# The requests the issue found ------------------------------------------------------------


def _rank(client: Client, context: dict[str, list[int]], **kw: Any) -> Any:
    return client.rank("ranker", context, top_n=2, request_values={"hour_of_day": [9]}, **kw)


@pytest.mark.parametrize(
    ("context", "candidates"),
    [
        ({"user_id": [1, 2]}, {"candidate_ids": [5]}),
        ({"user_id": [1, 2]}, {"query_vector": np.ones(64, dtype=np.float32), "n_candidates": 1}),
        ({"user_id": [1, 2, 3]}, {"candidate_ids": [5, 6, 7]}),
        ({"user_id": []}, {"candidate_ids": [5]}),
    ],
    ids=["two-values-one-candidate", "two-values-retrieval-of-one", "three-values-three-candidates", "empty"],
)
def test_a_rank_context_holds_one_value_per_column(
    server: ServeProcess, context: dict[str, list[int]], candidates: dict[str, Any]
) -> None:
    with Client(server.target) as client:
        with pytest.raises(InvalidArgument, match=r"context \(entities\) column 'user_id' holds \d values"):
            _rank(client, context, **candidates)
        assert len(_rank(client, {"user_id": [1]}, **candidates).ids) >= 1


@pytest.mark.parametrize(
    ("call_", "error"),
    [
        (lambda c, big: c.predict(big, {"user_id": [1]}), NotFound),
        (lambda c, big: c.get_online_features({"user_id": [1]}, [big]), NotFound),
        (lambda c, big: c.get_online_features({"user_id": [1]}, [f"user_profile:{big}"]), NotFound),
        (lambda c, big: c.get_online_features({big: [1]}, ["user_profile"]), InvalidArgument),
        (lambda c, big: c.search_similar(big, ids=[1], k=3), NotFound),
    ],
    ids=["model", "feature-service", "feature", "join-key", "view"],
)
def test_a_100_kb_name_comes_back_cut_with_its_own_status(
    server: ServeProcess, call_: Callable[[Client, str], Any], error: type[Exception]
) -> None:
    big = "m" * 100_000
    with Client(server.target) as client, pytest.raises(error) as caught:
        call_(client, big)
    message = str(caught.value)
    assert len(message.encode()) < 1200, message[:300]
    assert re.search(r"…\(1000\d\d chars\)…", message), message[:300]


def test_health_list_answers_every_service(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    assert {name: status.status for name, status in reply.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        "featurestore.v1.FeatureStore": health_pb2.HealthCheckResponse.SERVING,
    }
