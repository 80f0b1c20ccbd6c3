"""The feature matrix without Redis: InputPlan's groups and columns, `gather` straight
from packed rows (statuses, strings through vocabularies, broadcast rows, batches of
calls), `finish` and fill_missing.

The registry is built by hand (no Feast); rows are packed by store.layout.encode_rows, as
materialization writes them. The randomized test checks `gather` against the lookup's own
decoder (featurestore.decode), an independent reading of the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from registries import make_registry, make_view

from featurestore.decode import INVALID, NOT_FOUND, NULL_VALUE, OUTSIDE_MAX_AGE, PRESENT, decode
from featurestore.inference.matrix import BatchMatrix, InputGroup, InputPlan, fill_missing, finish, gather
from featurestore.inference.models import InputColumn, ModelSpec
from featurestore.lookup import Lookup
from featurestore.registry import JoinKey, ViewDef
from featurestore.store.layout import DType, FeatureSpec, Layout, encode_rows

NOW_US = 1_700_000_000_000_000
FRESH_US = NOW_US - 10_000_000
USER = JoinKey("user_id", DType.INT64)
ITEM = JoinKey("item_id", DType.INT64)


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
REQUEST_COLUMNS = np.array([c.is_request for c in COLUMNS])


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
    assert item.block is None and user.block is None  # interleaved columns: no contiguous block
    assert user.plan.view_names == ("user_profile", "user_stats")  # two views, one read per row
    assert [(j, c.feature) for j, c in plan.request] == [(2, "hour"), (11, "boost")]
    spec = ModelSpec("bare", Path("bare.onnx"), (feature("request:hour", DType.INT64),))
    plan = InputPlan(spec, lookup)
    assert plan.groups == [] and plan.join_keys == frozenset()
    assert [j for j, _ in plan.request] == [0]


@dataclass
class Part:
    """A call's share of a batch, as the scorer's calls give it."""

    rows: int
    counts: list[int]
    request: Mapping[int, npt.NDArray[np.float32]] = field(default_factory=dict)


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
USER_SPEC = ModelSpec("users", Path("users.onnx"), tuple(c for c in COLUMNS if c.view.startswith("user_")))


def packed(
    view: ViewDef, columns: dict[str, Any], nulls: dict[str, Any], ts: Any, missing: set[int]
) -> list[bytes | None]:
    rows: list[bytes | None] = list(encode_rows(view.layout, ts, columns, nulls))
    for i in missing:
        rows[i] = None
    return rows


def user_rows(plan: InputPlan) -> list[bytes | None]:
    """The user group's reply: its views' rows in plan order, as Redis would return them."""
    by_view = {
        "user_profile": packed(PROFILE, PROFILE_ROWS, PROFILE_NULLS, PROFILE_TS, PROFILE_MISSING),
        "user_stats": packed(STATS, STATS_ROWS, STATS_NULLS, np.full(USERS, 0), STATS_MISSING),
    }
    return [row for view in group_of(plan, "user_id").plan.view_names for row in by_view[view]]


def expected_value(column: InputColumn, i: int) -> float:
    source = PROFILE_ROWS if column.view == "user_profile" else STATS_ROWS
    raw = source[column.feature][i]
    if column.vocabulary is not None:
        return float(column.vocabulary.get(raw.encode(), -1))
    return float(np.float32(raw))  # the cast numpy does: int64 and float64 round to float32


def test_gather_gives_each_input_its_values_and_statuses(lookup: Lookup) -> None:
    plan = InputPlan(USER_SPEC, lookup)
    batch = gather(plan, [Part(USERS, [USERS])], user_rows(plan), NOW_US)
    assert batch.matrix.dtype == np.float32 and batch.matrix.shape == (USERS, USER_SPEC.width)
    assert batch.statuses.dtype == np.uint8 and batch.statuses.shape == (USERS, USER_SPEC.width)
    for j, column in enumerate(USER_SPEC.columns):
        assert batch.statuses[:, j].tolist() == USER_STATUSES[column.feature], column.ref
        for i in np.flatnonzero(batch.statuses[:, j] == PRESENT).tolist():
            assert batch.matrix[i, j] == expected_value(column, i), (column.ref, i)


def test_strings_map_through_their_vocabulary_and_unknown_ones_to_minus_one(lookup: Lookup) -> None:
    plan = InputPlan(USER_SPEC, lookup)
    j = [c.feature for c in USER_SPEC.columns].index("country")
    batch = gather(plan, [Part(USERS, [USERS])], user_rows(plan), NOW_US)
    present = batch.statuses[:, j] == PRESENT
    assert batch.matrix[present, j].tolist() == [1.0, -1.0, 0.0]  # DE, XX, US
    one = gather(plan, [Part(1, [1])], user_rows(plan)[:1] + user_rows(plan)[USERS : USERS + 1], NOW_US)
    assert one.matrix[0, j] == 1.0  # one row: the Python path for few strings, same answer


def test_gather_reads_several_inputs_of_one_type_each_into_its_column(lookup: Lookup) -> None:
    """Two float32 inputs (price, weight) are read in one cast; each keeps its own values."""
    spec = ModelSpec("items", Path("items.onnx"), tuple(c for c in COLUMNS if c.view == "item_stats"))
    plan = InputPlan(spec, lookup)
    n = 3
    columns = {
        "price": np.array([1.5, 2.5, 3.5], dtype=np.float32),
        "category": ["toys", "books", "games"],
        "weight": np.array([-1.0, 0.25, 8.0], dtype=np.float32),
        "stock": np.array([7, 2**53, 0], dtype=np.int64),
    }
    batch = gather(plan, [Part(n, [n])], list(encode_rows(ITEMS.layout, np.full(n, FRESH_US), columns)), NOW_US)
    assert [c.feature for c in spec.columns] == ["price", "category", "stock", "weight"]
    np.testing.assert_array_equal(
        batch.matrix,
        np.array([[1.5, 1, 7, -1.0], [2.5, 0, 2.0**53, 0.25], [3.5, -1, 0, 8.0]], dtype=np.float32),
    )
    assert (batch.statuses == PRESENT).all()


def test_a_broadcast_row_fills_every_row_of_its_call_and_calls_stack_in_order(lookup: Lookup) -> None:
    plan = InputPlan(SPEC, lookup)
    user, items = group_of(plan, "user_id"), group_of(plan, "item_id")
    rng = np.random.default_rng(4)

    def part(rows: int, users: int) -> Part:
        return Part(rows, [users if g is user else rows for g in plan.groups])

    calls = [part(3, 1), part(2, 2), part(1, 1)]  # call 0 broadcasts its user
    users = sum(p.counts[plan.groups.index(user)] for p in calls)
    n_items = sum(p.counts[plan.groups.index(items)] for p in calls)
    profile = random_rows(PROFILE, users, rng, missing=0.0)
    stats = random_rows(STATS, users, rng, missing=0.0)
    item_rows = random_rows(ITEMS, n_items, rng, missing=0.0)
    by_group = {user: profile + stats, items: item_rows}
    rows = [r for g in plan.groups for r in by_group[g]]
    batch = gather(plan, calls, rows, NOW_US)
    assert batch.starts == [0, 3, 5, 6]
    want = reference(plan, calls, rows, NOW_US)
    np.testing.assert_array_equal(batch.statuses, want.statuses)
    present = (want.statuses == PRESENT) & ~REQUEST_COLUMNS
    np.testing.assert_array_equal(batch.matrix[present], want.matrix[present])
    age = [c.ref for c in SPEC.columns].index("user_profile:age")
    assert batch.matrix[0, age] == batch.matrix[1, age] == batch.matrix[2, age]  # one user row, three rows


def random_rows(view: ViewDef, n: int, rng: np.random.Generator, missing: float = 0.15) -> list[bytes | None]:
    """`n` rows of `view` with random values, nulls, stale times, and some rows absent,
    truncated or written under another schema."""
    columns: dict[str, Any] = {}
    nulls: dict[str, Any] = {}
    for spec in view.layout.features:
        if spec.dtype is DType.STRING:
            words = ["US", "DE", "FR", "books", "toys", "", "US\x00", "a-much-longer-word", "\u00e9t\u00e9"]
            columns[spec.name] = [words[k] for k in rng.integers(0, len(words), n)]
        elif spec.dtype is DType.INT64_LIST:
            columns[spec.name] = [list(range(k)) for k in rng.integers(0, 4, n)]
        elif spec.dtype is DType.BOOL:
            columns[spec.name] = rng.random(n) < 0.5
        else:
            columns[spec.name] = (rng.standard_normal(n) * 1e3).astype(spec.dtype.element)
        nulls[spec.name] = rng.random(n) < 0.1
    ts = np.where(rng.random(n) < 0.1, NOW_US - 10**13, FRESH_US)
    rows: list[bytes | None] = list(encode_rows(view.layout, ts, columns, nulls))
    other = Layout(view.name, (*view.layout.features, FeatureSpec("extra", DType.INT32)))
    for i in range(n):
        roll = rng.random()
        if roll < missing / 3:
            rows[i] = None
        elif roll < 2 * missing / 3:
            rows[i] = (rows[i] or b"")[: int(rng.integers(0, 30))]
        elif roll < missing:
            rows[i] = encode_rows(
                other,
                np.array([FRESH_US]),
                {**{k: v[i : i + 1] for k, v in columns.items()}, "extra": np.array([1], np.int32)},
            )[0]
    return rows


def reference(plan: InputPlan, parts: Sequence[Part], rows: list[bytes | None], now_us: int) -> BatchMatrix:
    """The batch's matrix and statuses by the lookup's decoder and plain Python."""
    total = sum(p.rows for p in parts)
    matrix = np.zeros((total, plan.spec.width), dtype=np.float32)
    statuses = np.full((total, plan.spec.width), PRESENT, dtype=np.uint8)
    at = 0
    for g, group in enumerate(plan.groups):
        n = sum(p.counts[g] for p in parts)
        size = n * len(group.plan.view_names)
        result = decode(group.plan, list(rows[at : at + size]), n, now_us)
        at += size
        names = [c.name for c in group.plan.columns]
        batch_row = 0
        reply_row = 0
        for part in parts:
            for i in range(part.rows):
                r = reply_row + (0 if part.counts[g] == 1 else i)
                for j, column in group.members:
                    c = names.index(f"{column.view}__{column.feature}")
                    statuses[batch_row, j] = result.statuses[c][r]
                    if column.vocabulary is not None:
                        offsets = np.frombuffer(result.offsets[c], dtype="<i4")
                        word = result.values[c][offsets[r] : offsets[r + 1]]
                        matrix[batch_row, j] = column.vocabulary.get(word, -1)
                    else:
                        element = column.dtype.element
                        assert element is not None
                        matrix[batch_row, j] = np.frombuffer(result.values[c], dtype=element)[r]
                batch_row += 1
            reply_row += part.counts[g]
    return BatchMatrix(matrix, statuses, [], np.zeros((0, 0), dtype=np.bool_))


@pytest.mark.parametrize("seed", range(6))
def test_gather_agrees_with_the_lookups_decoder_on_random_rows(lookup: Lookup, seed: int) -> None:
    """Absent, truncated and foreign-schema rows, nulls, stale rows, unknown and odd words
    (empty, a trailing NUL, longer than any word, not ASCII), broadcast and many calls."""
    plan = InputPlan(SPEC, lookup)
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(int(rng.integers(1, 6))):
        n = int(rng.integers(1, 40))
        users = 1 if rng.random() < 0.5 else n  # a broadcast user, or one per row
        calls.append(Part(n, [users if g.join_keys == ("user_id",) else n for g in plan.groups]))
    by_view = {}
    for g, group in enumerate(plan.groups):
        count = sum(p.counts[g] for p in calls)
        for name in group.plan.view_names:
            by_view[name] = random_rows(lookup.registry.view(name), count, rng)
    rows = [r for group in plan.groups for name in group.plan.view_names for r in by_view[name]]
    batch = gather(plan, calls, rows, NOW_US)
    want = reference(plan, calls, rows, NOW_US)
    np.testing.assert_array_equal(batch.statuses, want.statuses)
    present = (want.statuses == PRESENT) & ~REQUEST_COLUMNS  # request values come with `finish`
    np.testing.assert_array_equal(batch.matrix[present], want.matrix[present])
    assert (want.statuses != PRESENT).any() and present.any()  # the rows exercise both


def test_finish_adds_request_values_and_fills_what_is_not_present(lookup: Lookup) -> None:
    """The whole path of a matrix: gathered, request values added, then filled."""
    plan = InputPlan(SPEC, lookup)
    hour, boost = 2, 11
    counts = [USERS if g.join_keys == ("user_id",) else 1 for g in plan.groups]
    parts = [Part(USERS, counts, {hour: np.array([21], dtype=np.float32)})]
    item = list(
        encode_rows(
            ITEMS.layout,
            np.array([FRESH_US]),
            {
                "price": np.array([1.5], np.float32),
                "category": ["toys"],
                "weight": np.array([2.0], np.float32),
                "stock": np.array([3]),
            },
        )
    )
    rows = [r for g in plan.groups for r in (user_rows(plan) if g.join_keys == ("user_id",) else item)]
    batch = finish(plan, parts, gather(plan, parts, rows, NOW_US))
    age, country = SPEC.columns[1], SPEC.columns[3]
    assert batch.matrix[:, 1].tolist() == [30, 41, 35, 35, -7, 19]  # rows 2 and 3: age's fill, 35
    assert batch.matrix[:, 3].tolist() == [1, -2, -2, -2, -1, 0]  # null, absent, stale: country's fill, -2
    assert batch.matrix[:, 0].tolist() == [1.5] * USERS  # the one item, broadcast
    assert batch.matrix[:, hour].tolist() == [21] * USERS and batch.statuses[:, hour].tolist() == [PRESENT] * USERS
    assert batch.statuses[:, boost].tolist() == [NOT_FOUND] * USERS  # required and not sent
    assert batch.missing[:, 1].tolist() == [s != PRESENT for s in USER_STATUSES[age.feature]]
    assert batch.missing[:, 3].tolist() == [s != PRESENT for s in USER_STATUSES[country.feature]]
    required = (batch.missing & plan.required).any(axis=1)
    assert required.tolist() == [True] * USERS  # boost, required, was not sent


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
