"""The lookup's planning, entity validation and vectorised decode, without Redis or gRPC.

The decode is checked against store.layout.decode_rows (the reference codec) on rows of
every type, with nulls, missing rows, rows of another schema and expired rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from registries import make_registry, make_view

from featurestore import decode as decode_module
from featurestore.decode import NOT_FOUND, NULL_VALUE, OUTSIDE_MAX_AGE, PRESENT, RequestPlan, decode
from featurestore.errors import InvalidArgument, NotFound
from featurestore.lookup import Lookup
from featurestore.registry import JoinKey
from featurestore.store.layout import DType, FeatureSpec, Layout, decode_rows, encode_rows

NOW_US = 1_700_000_000_000_000

ALL_TYPES = (
    FeatureSpec("i32", DType.INT32),
    FeatureSpec("s", DType.STRING),
    FeatureSpec("i64", DType.INT64),
    FeatureSpec("f32", DType.FLOAT32),
    FeatureSpec("b", DType.BYTES),
    FeatureSpec("f64", DType.FLOAT64),
    FeatureSpec("flag", DType.BOOL),
    FeatureSpec("ts", DType.UNIX_TIMESTAMP),
    FeatureSpec("vec", DType.FLOAT32_LIST, 3),
    FeatureSpec("ids", DType.INT64_LIST),
    FeatureSpec("i32v", DType.INT32_LIST, 2),
    FeatureSpec("f64v", DType.FLOAT64_LIST, 2),
    FeatureSpec("i64v", DType.INT64_LIST, 1),
    FeatureSpec("f32s", DType.FLOAT32_LIST),
)


USER = JoinKey("user_id", DType.INT64)
ITEM = JoinKey("item_sku", DType.STRING)
TYPED = make_view("typed", USER, 3600, *ALL_TYPES)
SMALL = make_view("small", ITEM, 0, FeatureSpec("a", DType.INT64), FeatureSpec("s", DType.STRING))
REGISTRY = make_registry(TYPED, SMALL, services={"svc": (("small", ("a",)), ("typed", ("i64",)))})


def sample_columns(n: int, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "i32": rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int32),
        "s": [f"é{i}-{'x' * (i % 5)}" for i in range(n)],
        "i64": rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
        "f32": rng.standard_normal(n).astype(np.float32),
        "b": [bytes([i % 256]) * (i % 4) for i in range(n)],
        "f64": rng.standard_normal(n),
        "flag": rng.integers(0, 2, n).astype(bool),
        "ts": rng.integers(0, 2**62, n, dtype=np.int64),
        "vec": rng.standard_normal((n, 3)).astype(np.float32),
        "ids": [list(range(i % 4)) for i in range(n)],
        "i32v": rng.integers(0, 100, (n, 2), dtype=np.int32),
        "f64v": rng.standard_normal((n, 2)),
        "i64v": rng.integers(0, 100, (n, 1), dtype=np.int64),
        "f32s": [np.full(i % 3, i, dtype=np.float32) for i in range(n)],
    }


def column_array(result: Any, c: int) -> Any:
    """Decode one LookupResult column the way the client does."""
    col = result.plan.columns[c]
    n = result.rows
    if col.dtype.element is None or (col.dtype.is_list and not col.length):
        offsets = np.frombuffer(result.offsets[c], dtype="<i4")
        data = result.values[c]
        parts = [data[offsets[i] : offsets[i + 1]] for i in range(n)]
        if col.dtype is DType.STRING:
            return [p.decode() for p in parts]
        if col.dtype is DType.BYTES:
            return parts
        return [np.frombuffer(p, dtype=col.dtype.element) for p in parts]
    values = np.frombuffer(result.values[c], dtype=col.dtype.element)
    return values.reshape(n, col.length) if col.length else values


def test_decode_matches_reference_codec_for_every_type() -> None:
    n = 40
    rng = np.random.default_rng(7)
    ts = np.full(n, NOW_US - 10_000_000)
    ts[5] = NOW_US - 3601 * 1_000_000  # older than the view's one-hour TTL
    nulls = {"s": np.arange(n) % 3 == 0, "f64": np.arange(n) % 4 == 1, "vec": np.arange(n) == 2}
    rows: list[bytes | None] = list(encode_rows(TYPED.layout, ts, sample_columns(n, rng), nulls))
    rows[7] = None  # missing
    other = Layout("typed", ALL_TYPES[:-1])  # another schema of the same view
    rows[9] = encode_rows(other, ts[:1], sample_columns(1, rng))[0]
    reference = decode_rows(TYPED.layout, rows)
    plan = RequestPlan(REGISTRY.resolve(["typed"]), False)
    result = decode(plan, list(rows), n, NOW_US)
    for c, spec in enumerate(ALL_TYPES):
        status = np.frombuffer(result.statuses[c], dtype=np.uint8)
        expected = np.where(reference.nulls[:, c], NULL_VALUE, PRESENT)
        expected[5] = OUTSIDE_MAX_AGE
        expected[[7, 9]] = NOT_FOUND
        np.testing.assert_array_equal(status, expected, err_msg=spec.name)
        got = column_array(result, c)
        want = reference.columns[spec.name]
        for i in np.flatnonzero(reference.found & ~reference.nulls[:, c]):
            np.testing.assert_array_equal(got[i], want[i], err_msg=f"{spec.name}[{i}]")
    event_ts = np.frombuffer(result.event_ts_us[0], dtype=np.int64)
    np.testing.assert_array_equal(event_ts, np.where(reference.found, ts, 0))


def test_decode_of_absent_rows_gives_zeros_and_not_found() -> None:
    plan = RequestPlan(REGISTRY.resolve(["typed:i64", "typed:s", "small"]), True)
    result = decode(plan, [None, None, None, None], 2, NOW_US)
    assert [c.name for c in plan.columns] == ["typed__i64", "typed__s", "small__a", "small__s"]
    for c in range(4):
        assert set(result.statuses[c]) == {NOT_FOUND}
    assert result.values[0] == bytes(16)
    assert result.values[1] == b"" and result.offsets[1] == bytes(12)


def test_plan_orders_columns_by_view_and_resolves_services() -> None:
    plan = RequestPlan(REGISTRY.resolve(["svc"]), False)
    assert plan.view_names == ("small", "typed")
    assert [c.name for c in plan.columns] == ["a", "i64"]


def test_plan_rejects_clashing_names_without_full_feature_names() -> None:
    with pytest.raises(InvalidArgument, match=r"\['s'\].*full_feature_names"):
        RequestPlan(REGISTRY.resolve(["typed:s", "small:s"]), False)


@pytest.mark.parametrize(
    ("entities", "features", "error", "match"),
    [
        ({"user_id": [1]}, ["nope:x"], NotFound, "unknown feature view 'nope'"),
        ({"user_id": [1]}, ["typed:nope"], NotFound, "no feature 'nope'"),
        ({"user_id": [1]}, ["ghost"], NotFound, "'ghost' is neither"),
        ({"user_id": [1]}, ["a:b:c"], InvalidArgument, "malformed feature reference 'a:b:c'"),
        ({"user_id": [1]}, [], InvalidArgument, "no features requested"),
        ({}, ["typed"], InvalidArgument, "no entity columns"),
        ({"user_id": []}, ["typed"], InvalidArgument, "empty batch"),
        ({"user_id": list(range(11))}, ["typed"], InvalidArgument, "11 entity rows exceeds"),
        ({"user_id": [1, 2], "item_sku": ["a"]}, ["svc"], InvalidArgument, "unequal lengths"),
        ({"user_id": [1]}, ["svc"], InvalidArgument, "no 'item_sku' entity column"),
        ({"user_id": [1], "x": [1]}, ["typed"], InvalidArgument, r"\['x'\] are not join keys"),
        ({"user_id": ["1"]}, ["typed"], InvalidArgument, "'user_id' is int64.*string"),
        ({"item_sku": [1]}, ["small"], InvalidArgument, "'item_sku' is string.*int64"),
        ({"user_id": [1.5]}, ["typed"], InvalidArgument, "'user_id' must hold int64"),
    ],
    ids=[
        "view",
        "feature",
        "service",
        "malformed",
        "no-refs",
        "no-columns",
        "empty",
        "oversize",
        "unequal",
        "missing-key",
        "extra-key",
        "str-for-int",
        "int-for-str",
        "float",
    ],
)
def test_bad_input_names_what_was_wrong(
    entities: dict[str, Any], features: list[str], error: type[Exception], match: str
) -> None:
    lookup = Lookup(None, REGISTRY, max_rows=10)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        lookup.row_keys(lookup.plan(features), entities)


def test_row_keys_cover_every_view_once_per_entity() -> None:
    lookup = Lookup(None, REGISTRY)  # type: ignore[arg-type]
    keys, n = lookup.row_keys(lookup.plan(["svc"]), {"user_id": np.array([1, 2]), "item_sku": ["a|b", "c"]})
    assert n == 2
    assert keys == [b"proj:small:{a%7Cb}", b"proj:small:{c}", b"proj:typed:{1}", b"proj:typed:{2}"]


def test_plans_are_cached_and_dropped_on_registry_swap() -> None:
    lookup = Lookup(None, REGISTRY)  # type: ignore[arg-type]
    plan = lookup.plan(["typed:i64"])
    assert lookup.plan(["typed:i64"]) is plan
    assert not lookup.swap(REGISTRY)
    changed = make_registry(make_view("typed", USER, 0, *ALL_TYPES[:3]))
    assert lookup.swap(changed)
    assert lookup.plan(["typed:i64"]) is not plan
    with pytest.raises(NotFound):
        lookup.plan(["typed:f32"])


@pytest.mark.parametrize("n", [1, 2, 3, 40])
def test_the_small_batch_walk_of_variable_width_values_equals_the_vectorised_gather(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(n)
    ts = np.full(n, NOW_US - 10_000_000)
    nulls = {"s": np.arange(n) % 3 == 0, "ids": np.arange(n) % 2 == 1}
    typed: list[bytes | None] = list(encode_rows(TYPED.layout, ts, sample_columns(n, rng), nulls))
    typed[0] = None  # missing: an empty row of its view, every length 0
    small = encode_rows(SMALL.layout, ts, {"a": np.arange(n), "s": [f"s{i}" * i for i in range(n)]})
    plan = RequestPlan(REGISTRY.resolve(["typed", "small:s", "small:a"]), True)
    monkeypatch.setattr(decode_module, "SMALL_VAR_VALUES", 10**9)  # always the walk
    walked = decode(plan, [*typed, *small], n, NOW_US)
    monkeypatch.setattr(decode_module, "SMALL_VAR_VALUES", -1)  # always the vectorised gather
    gathered = decode(plan, [*typed, *small], n, NOW_US)
    assert walked.values == gathered.values and walked.offsets == gathered.offsets
    assert walked.statuses == gathered.statuses
