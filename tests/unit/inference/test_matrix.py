"""The feature matrix without Redis: InputPlan's groups and columns, InputGroup.decode of
packed rows, fill_missing.

The registry is built by hand (no Feast); lookup results come from featurestore.decode
over rows packed by store.layout.encode_rows, as the server reads them from Redis.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from featurestore.decode import INVALID, NOT_FOUND, NULL_VALUE, OUTSIDE_MAX_AGE, PRESENT, LookupResult, decode
from featurestore.inference.matrix import InputGroup, InputPlan, fill_missing
from featurestore.inference.models import InputColumn, ModelSpec
from featurestore.lookup import Lookup
from featurestore.registry import JoinKey, Registry, ViewDef
from featurestore.store.layout import DType, FeatureSpec, Layout, encode_rows

NOW_US = 1_700_000_000_000_000
FRESH_US = NOW_US - 10_000_000
USER = JoinKey("user_id", DType.INT64)
ITEM = JoinKey("item_id", DType.INT64)


def make_view(name: str, key: JoinKey, ttl_s: float, *specs: FeatureSpec) -> ViewDef:
    return ViewDef(name, (key,), ttl_s, Layout(name, specs), name, "event_timestamp", "", None)


PROFILE = make_view(
    "user_profile",
    USER,
    3600,
    FeatureSpec("age", DType.INT32),
    FeatureSpec("country", DType.STRING),
    FeatureSpec("tags", DType.INT64_LIST),  # in the rows, never a model input
    FeatureSpec("score", DType.FLOAT64),
    FeatureSpec("active", DType.BOOL),
    FeatureSpec("signup", DType.UNIX_TIMESTAMP),
)
STATS = make_view("user_stats", USER, 0, FeatureSpec("clicks", DType.INT64), FeatureSpec("ctr", DType.FLOAT32))
ITEMS = make_view(
    "item_stats",
    ITEM,
    0,
    FeatureSpec("price", DType.FLOAT32),
    FeatureSpec("category", DType.STRING),
    FeatureSpec("weight", DType.FLOAT32),
    FeatureSpec("stock", DType.INT64),
)


def make_registry(*views: ViewDef, fingerprint: str = "fp-1") -> Registry:
    return Registry("proj", MappingProxyType({v.name: v for v in views}), MappingProxyType({}), fingerprint)


REGISTRY = make_registry(PROFILE, STATS, ITEMS)
COUNTRIES = {b"US": 0, b"DE": 1, b"FR": 2}
CATEGORIES = {b"books": 0, b"toys": 1}


def feature(ref: str, dtype: DType, default: float | None = 0.0, vocabulary: Any = None) -> InputColumn:
    view, name = ref.split(":")
    return InputColumn(ref, view, name, dtype, default, vocabulary)


# Groups interleaved on purpose: the matrix follows this order, whatever the views' order.
COLUMNS = (
    feature("item_stats:price", DType.FLOAT32, default=9.5),
    feature("user_profile:age", DType.INT32, default=35.0),
    feature("request:hour", DType.INT64, default=12.0),
    feature("user_profile:country", DType.STRING, default=-2.0, vocabulary=COUNTRIES),
    feature("item_stats:category", DType.STRING, vocabulary=CATEGORIES),
    feature("user_stats:clicks", DType.INT64, default=None),  # required
    feature("user_profile:score", DType.FLOAT64),
    feature("item_stats:stock", DType.INT64),
    feature("user_profile:active", DType.BOOL),
    feature("item_stats:weight", DType.FLOAT32),
    feature("user_profile:signup", DType.UNIX_TIMESTAMP),
    feature("request:boost", DType.FLOAT32, default=None),  # required
)
SPEC = ModelSpec("ranker", Path("ranker.onnx"), COLUMNS)


@pytest.fixture
def lookup() -> Lookup:
    return Lookup(None, REGISTRY)  # type: ignore[arg-type]  # plans only: never reads


def positions_of(spec: ModelSpec, view_prefixes: tuple[str, ...]) -> list[int]:
    return [j for j, c in enumerate(spec.columns) if c.view.startswith(view_prefixes)]


def group_of(plan: InputPlan, key: str) -> InputGroup:
    (group,) = [g for g in plan.groups if g.join_keys == (key,)]
    return group


def test_plan_groups_inputs_by_join_keys_in_matrix_order(lookup: Lookup) -> None:
    plan = InputPlan(SPEC, lookup)
    assert sorted(g.join_keys for g in plan.groups) == [("item_id",), ("user_id",)]
    item, user = group_of(plan, "item_id"), group_of(plan, "user_id")
    assert item.positions.tolist() == positions_of(SPEC, ("item_",)) == [0, 4, 7, 9]
    assert user.positions.tolist() == positions_of(SPEC, ("user_",)) == [1, 3, 5, 6, 8, 10]
    assert user.plan.view_names == ("user_profile", "user_stats")  # two views, one read per row
    assert [(j, c.feature) for j, c in plan.request] == [(2, "hour"), (11, "boost")]
    assert plan.join_keys == frozenset({"user_id", "item_id"})


def test_plan_defaults_and_required(lookup: Lookup) -> None:
    plan = InputPlan(SPEC, lookup)
    assert plan.defaults.dtype == np.float32
    assert plan.defaults.tolist() == [9.5, 35.0, 12.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert np.flatnonzero(plan.required).tolist() == [5, 11]


def test_plan_is_stale_once_the_lookup_serves_another_registry(lookup: Lookup) -> None:
    plan = InputPlan(SPEC, lookup)
    assert not plan.stale(lookup)
    lookup.swap(make_registry(PROFILE, STATS, ITEMS, fingerprint="fp-2"))
    assert plan.stale(lookup)
    assert not InputPlan(SPEC, lookup).stale(lookup)


def test_a_model_of_request_inputs_only_has_no_groups(lookup: Lookup) -> None:
    spec = ModelSpec("bare", Path("bare.onnx"), (feature("request:hour", DType.INT64),))
    plan = InputPlan(spec, lookup)
    assert plan.groups == [] and plan.join_keys == frozenset()
    assert [j for j, _ in plan.request] == [0]


# Rows of the user group: per view, per row, the values and how the row is stored.
USERS = 6
PROFILE_ROWS: dict[str, Any] = {
    "age": np.array([30, 41, 0, 52, -7, 19], dtype=np.int32),
    "country": ["DE", None, "US", "FR", "XX", "US"],  # "XX": not in the vocabulary
    "tags": [[1], [], [2, 3], [], [4], []],
    "score": np.array([0.1, 0.0, 0.0, 2.5, 1e-3, -4.25]),
    "active": np.array([True, False, False, True, False, True]),
    "signup": np.array([1_600_000_000_000_000, 0, 0, 5, 7, 2**40 + 1], dtype=np.int64),
}
PROFILE_NULLS = {"country": [False, True, False, False, False, False], "score": [False, True] + [False] * 4}
PROFILE_TS = np.array([FRESH_US, FRESH_US, FRESH_US, NOW_US - 3601 * 1_000_000, FRESH_US, FRESH_US])
PROFILE_MISSING = {2}  # no row in Redis
STATS_ROWS: dict[str, Any] = {
    "clicks": np.array([3, 0, 5, 2**40 + 1, 9, 1], dtype=np.int64),
    "ctr": np.zeros(USERS, dtype=np.float32),
}
STATS_NULLS = {"clicks": [False, True, False, False, False, False]}
STATS_MISSING = {5}

USER_STATUSES = {  # by input: one status per row
    "age": [PRESENT, PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE, PRESENT, PRESENT],
    "country": [PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE, PRESENT, PRESENT],
    "clicks": [PRESENT, NULL_VALUE, PRESENT, PRESENT, PRESENT, NOT_FOUND],
    "score": [PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE, PRESENT, PRESENT],
    "active": [PRESENT, PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE, PRESENT, PRESENT],
    "signup": [PRESENT, PRESENT, NOT_FOUND, OUTSIDE_MAX_AGE, PRESENT, PRESENT],
}


def packed(
    view: ViewDef, columns: dict[str, Any], nulls: dict[str, Any], ts: Any, missing: set[int]
) -> list[bytes | None]:
    rows: list[bytes | None] = list(encode_rows(view.layout, ts, columns, nulls))
    for i in missing:
        rows[i] = None
    return rows


def user_result(group: InputGroup) -> LookupResult:
    """The group's LookupResult: its views' rows in plan order, as Redis would return them."""
    by_view = {
        "user_profile": packed(PROFILE, PROFILE_ROWS, PROFILE_NULLS, PROFILE_TS, PROFILE_MISSING),
        "user_stats": packed(STATS, STATS_ROWS, STATS_NULLS, np.full(USERS, 0), STATS_MISSING),
    }
    rows = [row for view in group.plan.view_names for row in by_view[view]]
    return decode(group.plan, rows, USERS, NOW_US)


def expected_value(column: InputColumn, i: int) -> float:
    source = PROFILE_ROWS if column.view == "user_profile" else STATS_ROWS
    raw = source[column.feature][i]
    if column.vocabulary is not None:
        return float(column.vocabulary.get(raw.encode(), -1))
    return float(np.float32(raw))  # the cast numpy does: int64 and float64 round to float32


def test_decode_gives_each_input_its_values_and_statuses_in_group_order(lookup: Lookup) -> None:
    group = group_of(InputPlan(SPEC, lookup), "user_id")
    members = [SPEC.columns[j] for j in group.positions.tolist()]
    values, statuses = group.decode(user_result(group))
    assert values.dtype == np.float32 and values.shape == (USERS, len(members))
    assert statuses.dtype == np.uint8 and statuses.shape == (USERS, len(members))
    for k, column in enumerate(members):
        assert statuses[:, k].tolist() == USER_STATUSES[column.feature], column.ref
        for i in np.flatnonzero(statuses[:, k] == PRESENT).tolist():
            assert values[i, k] == expected_value(column, i), (column.ref, i)


def test_strings_map_through_their_vocabulary_and_unknown_ones_to_minus_one(lookup: Lookup) -> None:
    group = group_of(InputPlan(SPEC, lookup), "user_id")
    k = [SPEC.columns[j].feature for j in group.positions.tolist()].index("country")
    values, statuses = group.decode(user_result(group))
    present = statuses[:, k] == PRESENT
    assert values[present, k].tolist() == [1.0, -1.0, 0.0]  # DE, XX, US


def test_decode_joins_several_columns_of_one_type(lookup: Lookup) -> None:
    """Two float32 inputs (price, weight) are read in one frombuffer; each keeps its own values."""
    group = group_of(InputPlan(SPEC, lookup), "item_id")
    n = 3
    columns = {
        "price": np.array([1.5, 2.5, 3.5], dtype=np.float32),
        "category": ["toys", "books", "games"],
        "weight": np.array([-1.0, 0.25, 8.0], dtype=np.float32),
        "stock": np.array([7, 2**53, 0], dtype=np.int64),
    }
    result = decode(group.plan, list(encode_rows(ITEMS.layout, np.full(n, FRESH_US), columns)), n, NOW_US)
    values, statuses = group.decode(result)
    assert [SPEC.columns[j].feature for j in group.positions.tolist()] == ["price", "category", "stock", "weight"]
    np.testing.assert_array_equal(
        values,
        np.array([[1.5, 1, 7, -1.0], [2.5, 0, 2.0**53, 0.25], [3.5, -1, 0, 8.0]], dtype=np.float32),
    )
    assert (statuses == PRESENT).all()


def test_matrix_of_a_batch_after_fill_missing(lookup: Lookup) -> None:
    """The whole path of a matrix: groups decoded into their positions, then filled."""
    plan = InputPlan(SPEC, lookup)
    group = group_of(plan, "user_id")
    values, group_statuses = group.decode(user_result(group))
    matrix = np.zeros((USERS, SPEC.width), dtype=np.float32)
    statuses = np.full((USERS, SPEC.width), PRESENT, dtype=np.uint8)
    matrix[:, group.positions] = values
    statuses[:, group.positions] = group_statuses
    missing = fill_missing(matrix, statuses, plan.defaults)
    age, country = SPEC.columns[1], SPEC.columns[3]
    assert matrix[:, 1].tolist() == [30, 41, 35, 35, -7, 19]  # rows 2 and 3: age's fill, 35
    assert matrix[:, 3].tolist() == [1, -2, -2, -2, -1, 0]  # null, absent, stale: country's fill, -2
    assert missing[:, 1].tolist() == [s != PRESENT for s in USER_STATUSES[age.feature]]
    assert missing[:, 3].tolist() == [s != PRESENT for s in USER_STATUSES[country.feature]]
    assert (missing & plan.required).any(axis=1).tolist() == [False, True, False, False, False, True]  # clicks


@pytest.mark.parametrize(
    ("status", "filled"),
    [(PRESENT, False), (NULL_VALUE, True), (NOT_FOUND, True), (OUTSIDE_MAX_AGE, True), (INVALID, True)],
    ids=["present", "null", "not-found", "outside-max-age", "invalid"],
)
def test_fill_missing_replaces_every_value_that_is_not_present(status: int, filled: bool) -> None:
    matrix = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    statuses = np.full((2, 3), PRESENT, dtype=np.uint8)
    statuses[1, 1] = status
    defaults = np.array([-1.0, -2.0, -3.0], dtype=np.float32)
    missing = fill_missing(matrix, statuses, defaults)
    assert missing.tolist() == [[False, False, False], [False, filled, False]]
    assert matrix.tolist() == [[1.0, 2.0, 3.0], [4.0, -2.0 if filled else 5.0, 6.0]]
