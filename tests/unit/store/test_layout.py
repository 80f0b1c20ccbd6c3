"""The packed row format: golden bytes, round trips for every type and null, schema ids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from featurestore.errors import InvalidArgument
from featurestore.store.layout import (
    HEADER_SIZE,
    DType,
    FeatureSpec,
    Layout,
    VarColumn,
    decode_rows,
    encode_rows,
)

GOLDEN = Layout(
    "golden",
    (
        FeatureSpec("i64", DType.INT64),
        FeatureSpec("f32", DType.FLOAT32),
        FeatureSpec("f64", DType.FLOAT64),
        FeatureSpec("flag", DType.BOOL),
        FeatureSpec("name", DType.STRING),
        FeatureSpec("vec", DType.FLOAT32_LIST, 2),
        FeatureSpec("i32", DType.INT32),
        FeatureSpec("raw", DType.BYTES),
        FeatureSpec("ts", DType.UNIX_TIMESTAMP),
    ),
)
GOLDEN_COLUMNS: dict[str, Any] = {
    "i64": [-(2**63), 2**63 - 1],
    "f32": [1.5, 0],
    "f64": [-0.25, 0],
    "flag": [True, False],
    "name": ["héllo", None],
    "vec": [[1, -1], [0, 0]],
    "i32": [7, 0],
    "raw": [b"\x00\xff", b""],
    "ts": [3, 0],
}
GOLDEN_NULLS = {name: [False, True] for name in ("f32", "f64", "flag", "name", "vec", "i32", "ts")}
# Written once by hand-checked encoding (see the module docstring of store/layout.py):
# version 01, flags 00, reserved 0000, schema id 0x77ab8497, event time 1700000000123456 us,
# null bitmap (2 bytes), fixed-width features, then uint32-length-prefixed strings/bytes.
GOLDEN_SCHEMA_ID = 2007729303
GOLDEN_ROWS = [
    "010000009784ab7740222018240a0600"
    "0000"
    "0000000000000080"
    "0000c03f"
    "000000000000d0bf"
    "01"
    "0000803f000080bf"
    "07000000"
    "0300000000000000"
    "0600000068c3a96c6c6f"
    "0200000000ff",
    "010000009784ab770500000000000000"
    "7e01"
    "ffffffffffffff7f"
    "00000000"
    "0000000000000000"
    "00"
    "0000000000000000"
    "00000000"
    "0000000000000000"
    "00000000"
    "00000000",
]


def test_golden_bytes_pin_the_format() -> None:
    rows = encode_rows(GOLDEN, [1_700_000_000_123_456, 5], GOLDEN_COLUMNS, GOLDEN_NULLS)
    assert GOLDEN.schema_id == GOLDEN_SCHEMA_ID
    assert [r.hex() for r in rows] == GOLDEN_ROWS


def test_golden_bytes_decode() -> None:
    decoded = decode_rows(GOLDEN, [bytes.fromhex(r) for r in GOLDEN_ROWS])
    assert decoded.found.tolist() == [True, True]
    assert decoded.event_ts_us.tolist() == [1_700_000_000_123_456, 5]
    assert decoded.columns["i64"].tolist() == [-(2**63), 2**63 - 1]
    assert decoded.columns["f32"][0] == 1.5
    assert decoded.columns["name"][0] == "héllo"
    assert decoded.columns["raw"][0] == b"\x00\xff"
    assert decoded.columns["vec"][0].tolist() == [1.0, -1.0]
    assert decoded.nulls[1].tolist() == [False, True, True, True, True, True, True, False, True]
    assert not decoded.nulls[0].any()


def test_event_time_sits_at_bytes_8_to_16_for_the_write_guard() -> None:
    (row,) = encode_rows(GOLDEN, [123_456_789], {k: v[:1] for k, v in GOLDEN_COLUMNS.items()})
    assert HEADER_SIZE == 16
    assert int.from_bytes(row[8:16], "little", signed=True) == 123_456_789


# One line per type: (dtype, length, values of three rows, the middle one null).
TYPE_SAMPLES = [
    (DType.INT32, 0, [-(2**31), 0, 2**31 - 1]),
    (DType.INT64, 0, [-(2**63), 0, 2**63 - 1]),
    (DType.FLOAT32, 0, [-3.5, 0.0, np.float32(3.4e38)]),
    (DType.FLOAT64, 0, [-1e308, 0.0, 5e-324]),
    (DType.BOOL, 0, [True, False, False]),
    (DType.UNIX_TIMESTAMP, 0, [0, 0, 1_800_000_000_000_000]),
    (DType.STRING, 0, ["", None, "ünïcödé " * 10]),
    (DType.BYTES, 0, [b"\x00", None, bytes(range(256))]),
    (DType.FLOAT32_LIST, 3, [[1, 2, 3], [0, 0, 0], [-1, 0.5, 1e-3]]),
    (DType.FLOAT64_LIST, 2, [[1e300, -1e300], [0, 0], [0.1, 0.2]]),
    (DType.INT64_LIST, 0, [[1, 2, 3], None, []]),
    (DType.FLOAT32_LIST, 0, [[0.5], None, [1.0, 2.0, 3.0, 4.0]]),
]


@pytest.mark.parametrize(
    ("dtype", "length", "values"), TYPE_SAMPLES, ids=[f"{d.value}-{n}" for d, n, _ in TYPE_SAMPLES]
)
def test_round_trip_every_type_with_a_null(dtype: DType, length: int, values: list[Any]) -> None:
    layout = Layout(
        "v", (FeatureSpec("before", DType.STRING), FeatureSpec("x", dtype, length), FeatureSpec("after", DType.INT64))
    )
    nulls = {"x": [False, True, False]}
    columns = {"before": ["a", "bb", None], "x": values, "after": [1, 2, 3]}
    if FeatureSpec("x", dtype, length).fixed:
        columns["x"] = np.asarray(values, dtype=dtype.element)
    decoded = decode_rows(layout, encode_rows(layout, [1, 2, 3], columns, nulls))
    assert decoded.found.all()
    assert decoded.nulls[:, 1].tolist() == [False, True, False]
    assert decoded.columns["after"].tolist() == [1, 2, 3]
    assert decoded.columns["before"][:2] == ["a", "bb"]
    for i in (0, 2):
        got, want = decoded.columns["x"][i], values[i]
        if dtype.is_list:
            np.testing.assert_array_equal(got, np.asarray(want, dtype=dtype.element))
        elif dtype is DType.FLOAT32:
            assert got == np.float32(want)
        else:
            assert got == want


def test_var_column_input_equals_python_values() -> None:
    layout = Layout("v", (FeatureSpec("s", DType.STRING), FeatureSpec("t", DType.STRING)))
    values = ["x", "", "yz"]
    arrow = VarColumn.from_values(values, layout.features[0])
    a = encode_rows(layout, [1, 2, 3], {"s": arrow, "t": values})
    b = encode_rows(layout, [1, 2, 3], {"s": values, "t": values})
    assert a == b


def test_other_schema_is_reported_missing_never_misread() -> None:
    old = Layout("v", (FeatureSpec("a", DType.INT64), FeatureSpec("b", DType.INT64)))
    new = Layout("v", (FeatureSpec("b", DType.INT64), FeatureSpec("a", DType.INT64)))
    assert old.schema_id != new.schema_id
    rows = encode_rows(old, [1], {"a": [1], "b": [2]})
    decoded = decode_rows(new, [*rows, None])
    assert decoded.found.tolist() == [False, False]
    assert decoded.stale_schema.tolist() == [True, False]
    assert decoded.nulls.all()


@pytest.mark.parametrize(
    "junk", [b"", b"\x01", b"\x02" + bytes(200), bytes(3)], ids=["empty", "one-byte", "future-version", "short"]
)
def test_malformed_values_are_not_found(junk: bytes) -> None:
    layout = Layout("v", (FeatureSpec("a", DType.INT64),))
    decoded = decode_rows(layout, [junk])
    assert not decoded.found.any()


def test_bad_definitions_and_columns_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="names a feature twice"):
        Layout("v", (FeatureSpec("a", DType.INT64), FeatureSpec("a", DType.BOOL)))
    with pytest.raises(InvalidArgument, match="only lists have a length"):
        FeatureSpec("a", DType.INT64, 3)
    layout = Layout("v", (FeatureSpec("a", DType.INT64), FeatureSpec("b", DType.INT64)))
    with pytest.raises(InvalidArgument, match=r"no column for features \['b'\]"):
        encode_rows(layout, [1], {"a": [1]})
    with pytest.raises(InvalidArgument, match="has 2 rows, not 1"):
        encode_rows(layout, [1], {"a": [1, 2], "b": [1]})
