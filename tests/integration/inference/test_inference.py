"""Predict and Rank end to end: demo data in PostgreSQL, materialized into Redis, a real
server on port 0, calls over gRPC.

Expected scores come from the ONNX model run directly (onnxruntime, no server code) on a
matrix built here from PostgreSQL: the newest row per entity, a fill value where it is
null, absent or older than its view's TTL.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import redis.asyncio as aioredis
from grpc import aio
from onnx import TensorProto, helper

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore._proto.featurestore.v1 import featurestore_pb2_grpc as pb_grpc
from featurestore.config import CacheSettings, IndexSettings, ServerSettings, Settings
from featurestore.errors import ConfigError
from featurestore.inference.models import ModelSpec, parse_models
from featurestore.inference.runtime import ModelRegistry
from featurestore.registry import load_registry
from featurestore.serving.server import FeatureServer
from materialize.job import Settings as MaterializeSettings
from materialize.job import run as materialize

ROOT = Path(__file__).resolve().parents[3]
USERS, ITEMS, WIDTH = 200, 400, 66
MODELS = """
models:
  ranker: &ranker
    path: models/ranker.onnx
    features: ranking_v1
    request: {hour_of_day: int64}
    vocabularies:
      user_profile:country: [US, DE, FR, GB, IN, BR, JP, ES, IT, NL, PL, CA]
      user_activity:last_category: &categories
        [books, electronics, fashion, home, sports, toys, beauty, grocery, garden, music,
         movies, games]
      item_stats:category: *categories
    fill: &fill
      default: 0.0
      item_stats:rating_avg: 3.0
      user_profile:age: 35
      request:hour_of_day: 12
    output: probabilities
    candidate_key: item_id
    retrieval_view: item_embedding
    batching: {max_wait_us: 2000}
  unbatched:
    <<: *ranker
    batching: {enabled: false}
  ranker_mlp:
    <<: *ranker
    path: models/ranker_mlp.onnx
  ranker_mlp_int8:
    <<: *ranker
    path: models/ranker_mlp_int8.onnx
  strict:
    <<: *ranker
    fill: {<<: *fill, item_stats:price: required}
  swap:
    <<: *ranker
    path: models/swap.onnx
    output: null
  fails_on_batches:
    <<: *ranker
    path: models/fails.onnx
    output: null
"""


def linear_model(width: int, weight: float) -> bytes:
    """scores = matrix @ [weight, ...]: a valid model of `width` inputs."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [width, 1], [weight] * width)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["score"])],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def one_row_model(width: int) -> bytes:
    """Loads and scores one row; any other batch size fails inside ONNX Runtime (Reshape)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, width])
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["features", "shape"], ["flat"]),
            helper.make_node("ReduceSum", ["flat"], ["score"], keepdims=0),
        ],
        "one_row",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def repo(feature_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("inference") / "repo"
    shutil.copytree(feature_repo, repo)
    (repo / "models.yaml").write_text(MODELS)
    (repo / "models/swap.onnx").write_bytes(linear_model(WIDTH, 1.0))
    (repo / "models/fails.onnx").write_bytes(one_row_model(WIDTH))
    return repo


@pytest.fixture(scope="module")
async def data(repo: Path, pg_dsn: str, redis_url: str, generator: Any) -> dict[str, dict[int, dict[str, Any]]]:
    """Demo data in PostgreSQL, materialized into a flushed Redis; returns the SQL truth."""
    gen = generator
    registry = load_registry(repo)
    await gen.generate(pg_dsn, registry, gen.GenerateOptions(users=USERS, items=ITEMS, seed=5))
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    await materialize(MaterializeSettings(repo=repo, redis_url=redis_url, dsn=pg_dsn, mode="incremental"))
    return await truth(pg_dsn, repo)


async def truth(dsn: str, repo: Path) -> dict[str, dict[int, dict[str, Any]]]:
    registry, now = load_registry(repo), datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    try:
        for name in ("user_profile", "user_activity", "item_stats"):
            view = registry.view(name)
            key = view.join_keys[0].name
            rows = await conn.fetch(
                f"SELECT DISTINCT ON ({key}) * FROM {name} ORDER BY {key}, event_timestamp DESC, created DESC"
            )
            out[name] = {r[key]: dict(r) for r in rows if (now - r["event_timestamp"]).total_seconds() <= view.ttl_s}
    finally:
        await conn.close()
    return out


@pytest.fixture(scope="module")
def spec(repo: Path) -> ModelSpec:
    return parse_models(repo / "models.yaml", load_registry(repo))["ranker"]


def expected_matrix(
    spec: ModelSpec,
    data: dict[str, dict[int, dict[str, Any]]],
    user: int,
    items: list[int],
    hour: int | None,
) -> npt.NDArray[np.float32]:
    matrix = np.zeros((len(items), spec.width), dtype=np.float32)
    for j, column in enumerate(spec.columns):
        for i, item in enumerate(items):
            if column.is_request:
                raw: Any = hour
            else:
                row = data[column.view].get(user if column.view.startswith("user") else item)
                raw = None if row is None else row[column.feature]
            if raw is None:
                matrix[i, j] = column.default if column.default is not None else 0.0
            elif column.vocabulary is not None:
                matrix[i, j] = column.vocabulary.get(raw.encode(), -1)
            else:
                matrix[i, j] = np.float32(raw)
    return matrix


def direct_scores(matrix: npt.NDArray[np.float32], model: str = "ranker") -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(str(ROOT / f"feature_repo/models/{model}.onnx"), providers=["CPUExecutionProvider"])
    out: npt.NDArray[np.float32] = session.run(["probabilities"], {"features": matrix})[0][:, 1]
    return out


@pytest.fixture(scope="module")
async def server(repo: Path, redis_url: str, data: Any) -> AsyncIterator[FeatureServer]:
    settings = Settings(
        repo=repo,
        redis_url=redis_url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0),
        index=IndexSettings(refresh_s=0),
    )
    server = FeatureServer(settings)
    await server.start()
    assert server.indexes is not None
    await asyncio.wait_for(server.indexes.wait_ready(), 60)
    yield server
    await server.stop(0)


@pytest.fixture(scope="module")
async def stub(server: FeatureServer) -> AsyncIterator[pb_grpc.FeatureStoreStub]:
    async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.FeatureStoreStub(channel)


def predict_request(model: str, user: int, items: list[int], hour: int | None = 9, **kw: Any) -> pb.PredictRequest:
    values = [pb.RequestColumn(name="hour_of_day", int64_values=[hour])] if hour is not None else []
    return pb.PredictRequest(
        model=model,
        request_values=values,
        entities=[
            pb.EntityColumn(name="user_id", int64_values=[user]),
            pb.EntityColumn(name="item_id", int64_values=items),
        ],
        **kw,
    )


def scores_of(response: Any) -> npt.NDArray[np.float32]:
    return np.frombuffer(response.scores, dtype="<f4")


async def test_predict_equals_the_model_on_a_matrix_from_sql(
    stub: pb_grpc.FeatureStoreStub, spec: ModelSpec, data: Any
) -> None:
    items = [*range(1, 101), 10_001]  # the last one exists nowhere: every item input filled
    for user, hour in ((3, 9), (USERS + 50, None)):  # an unknown user: every user input filled
        response = await stub.Predict(predict_request("ranker", user, items, hour, return_breakdown=True))
        want = direct_scores(expected_matrix(spec, data, user, items, hour))
        np.testing.assert_allclose(scores_of(response), want, rtol=1e-6, atol=1e-7)
        statuses = {s.input: np.frombuffer(s.statuses, np.uint8) for s in response.statuses}
        assert statuses["item_stats:price"][-1] == 3  # NOT_FOUND
        assert ("request:hour_of_day" in statuses) == (hour is None)
        b = response.breakdown
        assert b.total_us > 0 and b.model_us > 0 and b.redis_us > 0 and b.batch_rows >= 101


async def test_the_trees_and_the_neural_ranker_in_fp32_and_int8_are_served_at_once(
    stub: pb_grpc.FeatureStoreStub, server: FeatureServer, spec: ModelSpec, data: Any
) -> None:
    assert server.scorer is not None
    items = list(range(1, 151))
    want = direct_scores(expected_matrix(spec, data, 5, items, 20), "ranker_mlp")
    scores = {}
    for model in ("ranker", "ranker_mlp", "ranker_mlp_int8"):
        calls = [stub.Predict(predict_request(model, 5, items, 20, return_breakdown=True)) for _ in range(3)]
        responses = await asyncio.gather(*calls)  # overlapping calls: batched and direct paths
        for response in responses:
            np.testing.assert_allclose(
                scores_of(response),
                direct_scores(expected_matrix(spec, data, 5, items, 20), model),
                rtol=1e-5,
                atol=1e-6,
            )
        assert responses[0].model_version == server.scorer.models.get(model).version
        scores[model] = scores_of(responses[0])
    # int8 weights move a score a little, not the ranking: the same top items, nearly the same scores
    assert np.abs(scores["ranker_mlp_int8"] - want).max() < 0.05
    assert np.corrcoef(scores["ranker_mlp_int8"], want)[0, 1] > 0.99
    assert len({r.model_version for r in responses}) == 1
    infos = {info.name: info for info in server.scorer.models.describe()}
    assert infos["ranker_mlp_int8"].file_bytes < infos["ranker_mlp"].file_bytes / 3
    assert all(info.width == WIDTH and info.threads == 1 for info in infos.values())


async def test_rank_top_n_equals_brute_force(stub: pb_grpc.FeatureStoreStub, spec: ModelSpec, data: Any) -> None:
    candidates = list(range(1, 301))
    response = await stub.Rank(
        pb.RankRequest(
            model="ranker",
            entities=[pb.EntityColumn(name="user_id", int64_values=[7])],
            candidate_ids=np.array(candidates, "<i8").tobytes(),
            top_n=20,
            request_values=[pb.RequestColumn(name="hour_of_day", int64_values=[21])],
        )
    )
    scores = direct_scores(expected_matrix(spec, data, 7, candidates, 21))
    best = np.argsort(-scores, kind="stable")[:20]
    assert np.frombuffer(response.ids, "<i8").tolist() == [candidates[i] for i in best]
    np.testing.assert_allclose(np.frombuffer(response.scores, "<f4"), scores[best], rtol=1e-6)
    assert response.candidate_count == 300


async def test_rank_by_retrieval_scores_the_nearest_items(
    stub: pb_grpc.FeatureStoreStub, server: FeatureServer, spec: ModelSpec, data: Any
) -> None:
    assert server.indexes is not None
    manager = server.indexes.manager("item_embedding")
    seeds = np.array([4, 8, 15], dtype=np.int64)
    index = manager.index
    assert index is not None
    query = index.vectors[index.labels_of(seeds)[0]].mean(axis=0, dtype=np.float32)
    near = (await manager.search(query.reshape(1, -1), 50, exclude_ids=seeds)).ids[0].tolist()
    response = await stub.Rank(
        pb.RankRequest(
            model="ranker",
            entities=[pb.EntityColumn(name="user_id", int64_values=[11])],
            retrieval=pb.Retrieval(seed_ids=seeds.astype("<i8").tobytes(), n_candidates=50),
            top_n=10,
            return_breakdown=True,
        )
    )
    scores = direct_scores(expected_matrix(spec, data, 11, near, None))
    best = np.argsort(-scores, kind="stable")[:10]
    assert np.frombuffer(response.ids, "<i8").tolist() == [near[i] for i in best]
    assert response.breakdown.retrieval_us > 0


async def test_batching_on_and_off_give_the_same_scores(stub: pb_grpc.FeatureStoreStub) -> None:
    # Scores are the same whichever path a call took. Whether 24 calls at once overlap in
    # the batcher is timing (a call that finds it idle runs at once, a small model on the
    # loop), so this does not require it: tests/unit/inference/test_batching.py checks the
    # coalescing itself.
    requests = [(user, list(range(user, user + 40))) for user in range(1, 25)]
    batched = await asyncio.gather(
        *(stub.Predict(predict_request("ranker", u, items, return_breakdown=True)) for u, items in requests)
    )
    alone = await asyncio.gather(
        *(stub.Predict(predict_request("unbatched", u, items, return_breakdown=True)) for u, items in requests)
    )
    for a, b in zip(batched, alone, strict=True):
        np.testing.assert_array_equal(scores_of(a), scores_of(b))
        assert b.breakdown.batch_requests == 1


async def test_a_bad_model_file_never_replaces_a_working_one(
    repo: Path, server: FeatureServer, stub: pb_grpc.FeatureStoreStub
) -> None:
    assert server.scorer is not None
    models: ModelRegistry = server.scorer.models
    before = models.get("swap").version
    path = repo / "models/swap.onnx"
    good = path.read_bytes()
    try:
        for bad in (b"not an onnx file", linear_model(WIDTH - 1, 1.0)):
            path.write_bytes(bad)
            outcome = await server.scorer.models.reload()
            assert outcome["swap"].startswith("failed"), outcome
            assert models.get("swap").version == before
            response = await stub.Predict(predict_request("swap", 1, [1, 2]))
            assert len(scores_of(response)) == 2
        path.write_bytes(linear_model(WIDTH, 0.0))  # a good new version is swapped in
        assert (await server.scorer.models.reload())["swap"].startswith("loaded")
        assert models.get("swap").version != before
        response = await stub.Predict(predict_request("swap", 1, [1, 2]))
        assert scores_of(response).tolist() == [0.0, 0.0]
    finally:
        path.write_bytes(good)
        await server.scorer.models.reload()


async def test_a_model_that_never_loaded_is_failed_precondition(repo: Path) -> None:
    (repo / "models/missing.yaml").write_text(MODELS.replace("models/fails.onnx", "models/absent.onnx"))
    models = ModelRegistry(repo / "models/missing.yaml", load_registry(repo))
    outcome = await models.load_all()
    assert outcome["fails_on_batches"].startswith("failed")
    with pytest.raises(ConfigError, match=r"absent\.onnx"):
        models.get("fails_on_batches")
    models.close()


ITEM_ROWS = pb.EntityColumn(name="item_id", int64_values=[1])


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (predict_request("nope", 1, [1]), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        (
            predict_request("strict", 1, [1, 2, 10_001]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "item_stats:price, but it is missing, null or stale for item_id=10001",
        ),
        (
            pb.PredictRequest(
                model="ranker",
                entities=[ITEM_ROWS, pb.EntityColumn(name="user_id", int64_values=[1])],
                request_values=[pb.RequestColumn(name="hour_of_day", float_values=[9.5])],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'hour_of_day' was sent as float, but the model takes int64",
        ),
        (
            pb.PredictRequest(
                model="ranker",
                entities=[ITEM_ROWS, pb.EntityColumn(name="user_id", int64_values=[1])],
                request_values=[pb.RequestColumn(name="weather", float_values=[1])],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "takes no request values ['weather']",
        ),
        (
            predict_request("ranker", 1, list(range(10_001))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "10001 entity rows exceed the limit of 10000",
        ),
        (
            pb.PredictRequest(model="ranker", entities=[ITEM_ROWS]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs entity column(s) ['user_id']",
        ),
        (
            predict_request("fails_on_batches", 1, [1, 2]),
            grpc.StatusCode.INTERNAL,
            "model 'fails_on_batches' failed at run time",
        ),
        (
            pb.RankRequest(
                model="ranker",
                entities=[pb.EntityColumn(name="user_id", int64_values=[1])],
                candidate_ids=b"\x01" * 8,
                top_n=0,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_n=0",
        ),
        (
            pb.RankRequest(
                model="ranker",
                entities=[pb.EntityColumn(name="user_id", int64_values=[1])],
                retrieval=pb.Retrieval(query_vector=b"\x00" * 12, n_candidates=10),
                top_n=3,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dim",
        ),
    ],
    ids=[
        "unknown-model",
        "required-missing",
        "request-type",
        "request-unknown",
        "oversize",
        "missing-entity",
        "model-raises",
        "rank-top-n",
        "rank-query-dim",
    ],
)
async def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(
    stub: pb_grpc.FeatureStoreStub, request_: Any, code: grpc.StatusCode, words: str
) -> None:
    call = stub.Rank if isinstance(request_, pb.RankRequest) else stub.Predict
    with pytest.raises(aio.AioRpcError) as caught:
        await call(request_)
    assert caught.value.code() == code, caught.value.details()
    assert words in (caught.value.details() or ""), caught.value.details()
    assert len(scores_of(await stub.Predict(predict_request("ranker", 1, [1, 2])))) == 2


async def test_a_missing_required_input_arrives_on_the_client_as_missing_feature(server: FeatureServer) -> None:
    from featurestore import AsyncClient, Client, MissingFeature

    target = f"127.0.0.1:{server.port}"
    entities = {"user_id": [1], "item_id": [1, 2, 10_001]}
    words = "item_stats:price, but it is missing, null or stale for item_id=10001"
    async with AsyncClient(target) as client:
        with pytest.raises(MissingFeature) as caught:
            await client.predict("strict", entities, request_values={"hour_of_day": [9]})
        assert type(caught.value) is MissingFeature and not isinstance(caught.value, ConfigError)
        assert str(caught.value).startswith("FAILED_PRECONDITION: ")
        assert words in str(caught.value)
        assert isinstance(caught.value.__cause__, grpc.RpcError)
        with pytest.raises(MissingFeature, match="item_id=10001"):
            await client.rank(
                "strict", {"user_id": [1]}, candidate_ids=[1, 10_001], request_values={"hour_of_day": [9]}
            )

    def blocking_predict() -> None:  # the server shares this event loop: call from a thread
        with Client(target) as sync_client:
            sync_client.predict("strict", entities, request_values={"hour_of_day": [9]})

    with pytest.raises(MissingFeature, match="item_id=10001"):
        await asyncio.to_thread(blocking_predict)


async def test_the_clients_predict_and_rank_match_the_direct_model(
    server: FeatureServer, spec: ModelSpec, data: Any
) -> None:
    from featurestore import AsyncClient, Client, InvalidArgument, NotFound

    items = list(range(1, 51))
    want = direct_scores(expected_matrix(spec, data, 3, items, 9))
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as client:
        got = await client.predict(
            "ranker", {"user_id": [3], "item_id": items}, request_values={"hour_of_day": [9]}, breakdown=True
        )
        np.testing.assert_allclose(got.scores, want, rtol=1e-6, atol=1e-7)
        assert got.breakdown is not None and got.breakdown["model_us"] > 0
        ranked = await client.rank(
            "ranker", {"user_id": [3]}, candidate_ids=items, top_n=5, request_values={"hour_of_day": [9]}
        )
        best = np.argsort(-want, kind="stable")[:5]
        assert ranked.ids.tolist() == [items[i] for i in best]
        assert ranked.candidate_count == len(items)
        with pytest.raises(NotFound, match="nope"):
            await client.predict("nope", {"user_id": [3], "item_id": items})
        with pytest.raises(InvalidArgument, match="exactly one of"):
            await client.rank("ranker", {"user_id": [3]}, top_n=5)

    def blocking_predict() -> Any:  # the server shares this event loop: call from a thread
        with Client(target) as sync_client:
            return sync_client.predict(
                "ranker", {"user_id": [3], "item_id": items}, request_values={"hour_of_day": [9]}
            )

    again = await asyncio.to_thread(blocking_predict)
    np.testing.assert_array_equal(again.scores, got.scores)


async def test_predict_and_rank_read_through_the_hot_cache(
    repo: Path, redis_url: str, spec: ModelSpec, data: Any
) -> None:
    from featurestore import AsyncClient

    settings = Settings(
        repo=repo,
        redis_url=redis_url,
        server=ServerSettings(host="127.0.0.1", port=0, registry_refresh_s=0),
        cache=CacheSettings(budget_bytes=16 << 20, hot_publish_s=0),
        index=IndexSettings(refresh_s=0),
    )
    server = FeatureServer(settings)
    await server.start()
    try:
        assert server.cache is not None
        items = list(range(1, 51))
        want = direct_scores(expected_matrix(spec, data, 3, items, 9))
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            await client.wait_until_serving(60)
            for _ in range(4):
                got = await client.predict(
                    "ranker", {"user_id": [3], "item_id": items}, request_values={"hour_of_day": [9]}
                )
                np.testing.assert_allclose(got.scores, want, rtol=1e-6, atol=1e-7)
                server.cache.hot.drain()
            for _ in range(3):
                hits, misses = server.cache.hits, server.cache.misses
                ranked = await client.rank(
                    "ranker", {"user_id": [3]}, candidate_ids=items, top_n=5, request_values={"hour_of_day": [9]}
                )
                server.cache.hot.drain()
        assert server.cache.hits > hits
        assert server.cache.misses == misses  # every row Rank needed came from memory
        best = np.argsort(-want, kind="stable")[:5]
        assert ranked.ids.tolist() == [items[i] for i in best]
    finally:
        await server.stop(0)
