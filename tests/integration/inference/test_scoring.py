"""Scorer (Predict and Rank) against a real Redis and a real ONNX model, without a server.

Rows are packed with store.layout.encode_rows into Redis under a hand-built registry (no
Feast); the model is a linear ONNX graph with a distinct weight per input column, so a
value in a wrong column or a wrong fill changes its score. Every expected score is the
model run directly (onnxruntime, no featurestore code) on a matrix built here from the
rows written.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import redis.asyncio as aioredis
from onnx import TensorProto, helper
from registries import int_key, make_registry, make_view

from featurestore.decode import NOT_FOUND, NULL_VALUE, OUTSIDE_MAX_AGE, PRESENT
from featurestore.errors import DeadlineExceeded, InvalidArgument, MissingFeature
from featurestore.inference.models import ModelSpec
from featurestore.inference.runtime import ModelRegistry
from featurestore.inference.scoring import Scorer
from featurestore.lookup import Lookup
from featurestore.registry import ViewDef
from featurestore.store import keys
from featurestore.store.layout import DType, FeatureSpec, encode_rows
from featurestore.store.pipe import RedisPipe

PROJECT = "scoring"
HOUR_US = 3600 * 1_000_000


USER_VIEW = make_view(
    "user_profile",
    int_key("user_id"),
    0,
    FeatureSpec("age", DType.INT32),
    FeatureSpec("country", DType.STRING),
    FeatureSpec("score", DType.FLOAT64),
)
ITEM_VIEW = make_view(
    "item_stats",
    int_key("item_id"),
    3600,
    FeatureSpec("price", DType.FLOAT32),
    FeatureSpec("category", DType.STRING),
    FeatureSpec("stock", DType.INT64),
)
REGISTRY = make_registry(USER_VIEW, ITEM_VIEW, project=PROJECT)

# The rows in Redis (None: a null value). User 99 and item 999 have no row; item 4 is older
# than its view's one-hour TTL.
USERS: dict[int, dict[str, Any]] = {
    1: {"age": 30, "country": "DE", "score": 0.5},
    2: {"age": 41, "country": None, "score": 1.5},
    7: {"age": 25, "country": "FR", "score": -0.25},
    8: {"age": 60, "country": "XX", "score": 2.0},  # not in the vocabulary: -1
}
ITEMS: dict[int, dict[str, Any]] = {
    1: {"price": 1.5, "category": "books", "stock": 10},
    2: {"price": 2.5, "category": "toys", "stock": 0},
    3: {"price": None, "category": "games", "stock": 5},
    4: {"price": 4.0, "category": "books", "stock": 1},
    **{i: {"price": 0.5 * i, "category": ("books", "toys")[i % 2], "stock": (i * 7) % 13} for i in range(5, 41)},
}
STALE_ITEMS = {4}

MODELS = """
models:
  ranker: &ranker
    path: linear.onnx
    features: [user_profile:age, item_stats:price, user_profile:country, item_stats:category,
               item_stats:stock, user_profile:score]
    request: {hour: int64, boost: float32}
    vocabularies:
      user_profile:country: [US, DE, FR]
      item_stats:category: [books, toys]
    fill: &fill {default: 0.0, user_profile:age: 35, item_stats:price: 9.5, request:hour: 12}
    output: score
    candidate_key: item_id
    batching: {max_wait_us: 0}
  unbatched:
    <<: *ranker
    batching: {enabled: false}
  strict:
    <<: *ranker
    fill: {<<: *fill, item_stats:price: required}
    # the test sends four calls at once: the first runs alone (the batcher is idle), and the
    # batch of the other three closes when they are queued, else after 2 s
    batching: {max_requests: 3, max_wait_us: 2000000}
"""
WEIGHTS = [1.0, -0.5, 0.25, 2.0, 3.0, 0.125, 0.75, -1.5]  # one per input: a misplaced value shows


def linear_model(weights: Sequence[float]) -> bytes:
    """score = matrix @ weights + 0.5, a (rows, 1) output."""
    width = len(weights)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["product"]),
            helper.make_node("Add", ["product", "b"], ["score"]),
        ],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, [width, 1], list(weights)),
            helper.make_tensor("b", TensorProto.FLOAT, [1], [0.5]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def packed(view: ViewDef, rows: dict[int, dict[str, Any]], ts_us: list[int]) -> dict[bytes, bytes]:
    ids = list(rows)
    names = view.layout.names
    columns: dict[str, Any] = {name: [rows[i][name] for i in ids] for name in names}
    nulls = {name: [v is None for v in columns[name]] for name in names}
    for spec in view.layout.features:  # a null's value is ignored, but must have the column's type
        if spec.fixed:
            columns[spec.name] = np.array([0 if v is None else v for v in columns[spec.name]], dtype=spec.dtype.element)
    values = encode_rows(view.layout, np.array(ts_us, dtype=np.int64), columns, nulls)
    return dict(zip(keys.row_keys(PROJECT, view.name, keys.entity_tokens([ids])), values, strict=True))


async def write_rows(redis: aioredis.Redis) -> None:
    now_us = time.time_ns() // 1000
    item_ts = [now_us - (2 * HOUR_US if i in STALE_ITEMS else 60_000_000) for i in ITEMS]
    await redis.mset(packed(USER_VIEW, USERS, [now_us - HOUR_US] * len(USERS)))
    await redis.mset(packed(ITEM_VIEW, ITEMS, item_ts))


@pytest.fixture(scope="module")
async def scorer(
    redis: aioredis.Redis, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Scorer]:
    folder = tmp_path_factory.mktemp("scoring")
    (folder / "linear.onnx").write_bytes(linear_model(WEIGHTS))
    (folder / "models.yaml").write_text(MODELS)
    await write_rows(redis)
    models = ModelRegistry(folder / "models.yaml", REGISTRY)
    outcome = await models.load_all()
    assert all(v.startswith("loaded") for v in outcome.values()), outcome
    pipe = RedisPipe.from_url(redis_url)
    scorer = Scorer(models, Lookup(pipe, REGISTRY), pipe)
    yield scorer
    await scorer.close()


def spec_of(scorer: Scorer, model: str) -> ModelSpec:
    return scorer.models.get(model).spec


def stored(view: str, entity: int) -> dict[str, Any] | None:
    """The row as the store reports it: None when absent or older than the view's TTL."""
    if view == "user_profile":
        return USERS.get(entity)
    return None if entity in STALE_ITEMS else ITEMS.get(entity)


def expected_matrix(
    spec: ModelSpec, users: Sequence[int], items: Sequence[int], request: Mapping[str, Sequence[float]]
) -> npt.NDArray[np.float32]:
    """The input matrix built from the rows written, one column at a time."""
    n = max(len(users), len(items))
    matrix = np.zeros((n, spec.width), dtype=np.float32)
    for j, column in enumerate(spec.columns):
        for i in range(n):
            if column.is_request:
                given = request.get(column.feature)
                raw: Any = None if given is None else given[i if len(given) > 1 else 0]
            else:
                ids = users if column.view == "user_profile" else items
                row = stored(column.view, ids[i if len(ids) > 1 else 0])
                raw = None if row is None else row[column.feature]
            assert raw is not None or column.default is not None, f"{column.ref} is required"
            if raw is None:
                matrix[i, j] = column.default
            elif column.vocabulary is not None:
                matrix[i, j] = column.vocabulary.get(raw.encode(), -1)
            else:
                matrix[i, j] = np.float32(raw)
    return matrix


def direct_scores(matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(linear_model(WEIGHTS), providers=["CPUExecutionProvider"])
    scores: npt.NDArray[np.float32] = session.run(["score"], {"features": matrix})[0][:, 0]
    return scores


MODES = pytest.mark.parametrize("model", ["ranker", "unbatched"], ids=["batched", "unbatched"])


@MODES
async def test_scores_equal_the_model_run_directly_on_the_same_matrix(scorer: Scorer, model: str) -> None:
    users, items = [1, 2, 7, 8, 99, 1], [1, 2, 3, 4, 5, 999]
    request: dict[str, list[float]] = {"hour": [9, 10, 11, 12, 13, 14], "boost": [0.5] * 6}
    scored = await scorer.predict(
        model,
        {"user_id": users, "item_id": items},
        {"hour": ("int64", request["hour"]), "boost": ("float", request["boost"])},
    )
    want = direct_scores(expected_matrix(spec_of(scorer, model), users, items, request))
    np.testing.assert_array_equal(scored.scores, want)
    assert scored.scores.dtype == np.float32
    assert scored.version == scorer.models.get(model).version


@MODES
async def test_a_one_value_column_is_broadcast_to_every_row(scorer: Scorer, model: str) -> None:
    items = [1, 2, 5, 6, 999]
    one = await scorer.predict(model, {"user_id": [7], "item_id": items}, {"hour": ("int64", [21])})
    every = await scorer.predict(model, {"user_id": [7] * 5, "item_id": items}, {"hour": ("int64", [21] * 5)})
    np.testing.assert_array_equal(one.scores, every.scores)
    want = direct_scores(expected_matrix(spec_of(scorer, model), [7], items, {"hour": [21]}))
    np.testing.assert_array_equal(one.scores, want)
    items_once = await scorer.predict(model, {"user_id": [1, 2, 7], "item_id": [5]})  # the other way round
    want = direct_scores(expected_matrix(spec_of(scorer, model), [1, 2, 7], [5], {}))
    np.testing.assert_array_equal(items_once.scores, want)


async def test_request_values_fill_their_columns_and_missing_ones_take_their_fill(scorer: Scorer) -> None:
    entities = {"user_id": [1], "item_id": [1, 2]}
    spec = spec_of(scorer, "ranker")
    hour = spec.columns.index(next(c for c in spec.columns if c.ref == "request:hour"))
    given = await scorer.predict("ranker", entities, {"hour": ("int64", [3, 4]), "boost": ("float", [2.0])})
    matrix = expected_matrix(spec, [1], [1, 2], {"hour": [3, 4], "boost": [2.0]})
    assert matrix[:, hour].tolist() == [3, 4]
    np.testing.assert_array_equal(given.scores, direct_scores(matrix))
    assert "request:hour" not in given.statuses
    filled = await scorer.predict("ranker", entities)  # no request values: hour 12 (fill), boost 0 (default)
    matrix = expected_matrix(spec, [1], [1, 2], {})
    assert matrix[:, hour].tolist() == [12, 12]
    np.testing.assert_array_equal(filled.scores, direct_scores(matrix))
    assert filled.statuses["request:hour"] == bytes([NOT_FOUND] * 2)


async def test_statuses_name_the_inputs_that_were_not_present(scorer: Scorer) -> None:
    # rows: user 2 (country null) x item 3 (price null), user 99 (absent) x item 4 (stale),
    # user 1 x item 999 (absent), user 7 x item 1 (all present)
    scored = await scorer.predict(
        "ranker", {"user_id": [2, 99, 1, 7], "item_id": [3, 4, 999, 1]}, {"hour": ("int64", [1])}
    )
    p, null, absent, stale = PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE
    assert scored.statuses == {
        "user_profile:age": bytes([p, absent, p, p]),
        "item_stats:price": bytes([null, stale, absent, p]),
        "user_profile:country": bytes([null, absent, p, p]),
        "item_stats:category": bytes([p, stale, absent, p]),
        "item_stats:stock": bytes([p, stale, absent, p]),
        "user_profile:score": bytes([p, absent, p, p]),
        "request:boost": bytes([absent] * 4),
    }
    all_present = await scorer.predict("ranker", {"user_id": [7], "item_id": [1]}, {"boost": ("float", [1.0])})
    assert all_present.statuses == {"request:hour": bytes([absent])}


async def test_a_required_input_fails_only_its_own_call_in_a_batch(scorer: Scorer) -> None:
    calls = [([1], [1, 2]), ([2], [5, 999]), ([7], [6]), ([8], [7, 8, 9])]  # 999: no price
    outcome = await asyncio.gather(
        *(scorer.predict("strict", {"user_id": u, "item_id": i}) for u, i in calls), return_exceptions=True
    )
    error = outcome[1]
    assert isinstance(error, MissingFeature), outcome
    assert "item_stats:price" in str(error) and "item_id=999" in str(error)
    assert "row 1 of the call" in str(error)
    spec = spec_of(scorer, "strict")
    for k in (0, 2, 3):
        scored = outcome[k]
        assert not isinstance(scored, BaseException), scored
        # The first call found the batcher idle and ran alone; the rest overlapped it and
        # formed one batch with the failing call.
        assert scored.timings.batch_requests == (1 if k == 0 else 3)
        users, items = calls[k]
        np.testing.assert_array_equal(scored.scores, direct_scores(expected_matrix(spec, users, items, {})))


async def test_rank_orders_the_candidates_by_score_and_keeps_top_n(scorer: Scorer) -> None:
    candidates = np.array([*range(1, 41), 999], dtype=np.int64)
    ranked = await scorer.rank(
        "ranker", {"user_id": [7]}, candidate_ids=candidates, top_n=7, request_values={"hour": ("int64", [20])}
    )
    scores = direct_scores(expected_matrix(spec_of(scorer, "ranker"), [7], candidates.tolist(), {"hour": [20]}))
    best = np.argsort(-scores, kind="stable")[:7]
    assert ranked.ids.tolist() == candidates[best].tolist()
    np.testing.assert_array_equal(ranked.scores, scores[best])
    assert (np.diff(ranked.scores) <= 0).all()
    assert ranked.candidates == 41
    few = await scorer.rank("ranker", {"user_id": [7]}, candidate_ids=candidates[:3], top_n=10)
    assert sorted(few.ids.tolist()) == [1, 2, 3]  # top_n beyond the candidates: all of them


@pytest.mark.parametrize(
    ("context", "top_n", "words"),
    [
        ({"user_id": [7]}, 0, "top_n=0"),
        ({"user_id": [7], "item_id": [1]}, 5, "'item_id' is the candidate key"),
    ],
    ids=["top-n", "candidate-key-in-context"],
)
async def test_rank_refuses_bad_calls(scorer: Scorer, context: dict[str, list[int]], top_n: int, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        await scorer.rank("ranker", context, candidate_ids=np.array([1, 2], dtype=np.int64), top_n=top_n)


@MODES
async def test_a_tiny_timeout_is_deadline_exceeded_and_the_scorer_keeps_serving(scorer: Scorer, model: str) -> None:
    entities = {"user_id": [1], "item_id": list(range(1, 41))}
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        await scorer.predict(model, entities, timeout_s=1e-6)
    with pytest.raises(DeadlineExceeded):
        await scorer.rank(model, {"user_id": [1]}, candidate_ids=np.arange(1, 41, dtype=np.int64), timeout_s=1e-6)
    scored = await scorer.predict(model, entities, timeout_s=30)
    assert scored.scores.shape == (40,)


async def test_a_lone_small_call_is_scored_on_the_event_loop_and_others_on_the_inference_thread(
    scorer: Scorer,
) -> None:
    """The direct path skips the hop to the inference thread for a run within the inline
    budget; batching off (and batches) always take it. Shown with that thread held busy."""
    entities = {"user_id": [1], "item_id": [1, 2, 3]}
    await scorer.predict("ranker", entities)  # the model's cost per row is known by now
    assert scorer.models.get("ranker").inline(3)
    release = threading.Event()
    busy = asyncio.get_running_loop().run_in_executor(scorer.models.executor, release.wait, 30)
    try:
        async with asyncio.timeout(5):
            scored = await scorer.predict("ranker", entities)
        assert scored.scores.shape == (3,) and scored.timings.model > 0
        waiting = asyncio.create_task(scorer.predict("unbatched", entities))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it waits for the inference thread
    finally:
        release.set()
        await busy
    assert (await waiting).scores.tolist() == scored.scores.tolist()
