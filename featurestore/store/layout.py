"""The packed row: how one (feature view, entity) row is stored as one Redis value.

Format version 1. All integers little-endian. The first 16 bytes never move in later
versions: readers and the server-side write guard rely on them.

    offset  size        field
    0       1           format version (1)
    1       1           flags (0; reserved)
    2       2           reserved (0)
    4       4           schema id: CRC-32 of the view's layout signature (see `Layout`)
    8       8           event timestamp, int64 microseconds since the Unix epoch (UTC)
    16      ceil(n/8)   null bitmap over the view's n features in column order;
                        bit i (byte i // 8, bit i % 8, least significant first) set
                        means feature i is null
    ...     fixed       the fixed-width features in column order, packed without
                        padding; a null holds zeros
                          int32 4 | int64 8 | float32 4 | float64 8 | bool 1 |
                          unix_timestamp 8 (int64 microseconds) |
                          a list with a declared length d: d x its element's width
    ...     variable    the variable-width features in column order, each as a uint32
                        byte length followed by the bytes: string (UTF-8), bytes, and
                        lists without a declared length (packed elements)

The schema id pins the column order and types: a row whose schema id is not the layout's
is never decoded with that layout (the reader reports it as not found until it is
re-materialized), so a schema change can never return wrong values.

Decoding a batch of rows of one view is one `numpy.frombuffer` over the joined
fixed-width prefixes; only variable-width features are read row by row.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from featurestore.errors import InvalidArgument

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "DType",
    "DecodedRows",
    "FeatureSpec",
    "Layout",
    "VarColumn",
    "decode_rows",
    "encode_fixed_rows",
    "encode_rows",
]

FORMAT_VERSION = 1
HEADER_SIZE = 16
_HEADER_FIELDS: list[tuple[str, Any]] = [
    ("version", "u1"),
    ("flags", "u1"),
    ("reserved", "<u2"),
    ("schema_id", "<u4"),
    ("event_ts_us", "<i8"),
]


class DType(enum.Enum):
    """The value types a feature can have, named as in Feast (`feast.types`)."""

    INT32 = "int32"
    INT64 = "int64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BOOL = "bool"
    STRING = "string"
    BYTES = "bytes"
    UNIX_TIMESTAMP = "unix_timestamp"
    INT32_LIST = "int32_list"
    INT64_LIST = "int64_list"
    FLOAT32_LIST = "float32_list"
    FLOAT64_LIST = "float64_list"

    @property
    def element(self) -> np.dtype[Any] | None:
        """The numpy dtype of one element (None for string and bytes)."""
        return _ELEMENT.get(self)

    @property
    def is_list(self) -> bool:
        return self.value.endswith("_list")


_ELEMENT: dict[DType, np.dtype[Any]] = {
    DType.INT32: np.dtype("<i4"),
    DType.INT64: np.dtype("<i8"),
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT64: np.dtype("<f8"),
    DType.BOOL: np.dtype("?"),
    DType.UNIX_TIMESTAMP: np.dtype("<i8"),
    DType.INT32_LIST: np.dtype("<i4"),
    DType.INT64_LIST: np.dtype("<i8"),
    DType.FLOAT32_LIST: np.dtype("<f4"),
    DType.FLOAT64_LIST: np.dtype("<f8"),
}


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature of a view: its name, type and, for fixed-length lists, its length."""

    name: str
    dtype: DType
    length: int = 0  # elements of a fixed-length list; 0 for scalars and free lists

    def __post_init__(self) -> None:
        if self.length and not self.dtype.is_list:
            raise InvalidArgument(f"feature {self.name!r}: only lists have a length")
        if self.length < 0:
            raise InvalidArgument(f"feature {self.name!r}: length must be >= 0")

    @property
    def fixed(self) -> bool:
        """True when every row stores this feature in the same number of bytes."""
        if self.dtype.is_list:
            return self.length > 0
        return self.dtype.element is not None

    @property
    def signature(self) -> str:
        return f"{self.name}:{self.dtype.value}:{self.length}"


@dataclass(frozen=True, slots=True)
class VarColumn:
    """A variable-width column in Arrow's shape: row i is `data[offsets[i]:offsets[i+1]]`.

    Strings are UTF-8; lists are their packed little-endian elements.
    """

    data: bytes
    offsets: npt.NDArray[np.int64]

    @classmethod
    def from_values(cls, values: Sequence[Any], spec: FeatureSpec) -> VarColumn:
        """Build from Python values (str, bytes or sequences of numbers); None gives b""."""
        parts = [_var_bytes(v, spec) for v in values]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return cls(b"".join(parts), offsets)


def _var_bytes(value: Any, spec: FeatureSpec) -> bytes:
    if value is None:
        return b""
    if spec.dtype is DType.STRING:
        return str(value).encode()
    if spec.dtype is DType.BYTES:
        return bytes(value)
    return np.asarray(value, dtype=spec.dtype.element).tobytes()


@dataclass(frozen=True)
class Layout:
    """The byte layout of one feature view's rows; see the module docstring.

    >>> layout = Layout("user", (FeatureSpec("age", DType.INT64),))
    >>> rows = encode_rows(layout, np.array([0]), {"age": np.array([42])})
    >>> decode_rows(layout, rows).columns["age"][0]
    np.int64(42)
    """

    view: str
    features: tuple[FeatureSpec, ...]
    schema_id: int = field(init=False)
    prefix_dtype: np.dtype[Any] = field(init=False, repr=False)
    var_features: tuple[FeatureSpec, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"view {self.view!r} names a feature twice: {names}")
        signature = f"v{FORMAT_VERSION}|" + ";".join(f.signature for f in self.features)
        object.__setattr__(self, "schema_id", zlib.crc32(signature.encode()))
        fields = list(_HEADER_FIELDS)
        fields.append(("__nulls", ("u1", (self.bitmap_size,))))
        for f in self.features:
            if f.fixed:
                elem = f.dtype.element
                fields.append((f.name, (elem, (f.length,)) if f.length else elem))
        object.__setattr__(self, "prefix_dtype", np.dtype(fields))
        object.__setattr__(self, "var_features", tuple(f for f in self.features if not f.fixed))

    @property
    def bitmap_size(self) -> int:
        return (len(self.features) + 7) // 8

    @property
    def prefix_size(self) -> int:
        """Bytes before the variable section: header, bitmap and fixed-width features."""
        return int(self.prefix_dtype.itemsize)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)


@dataclass(frozen=True, slots=True)
class DecodedRows:
    """A batch of rows of one view, decoded column by column.

    `found[i]` is False where row i was missing or written under another schema
    (`stale_schema[i]` tells the second case); its values are zeros and its nulls set.
    Fixed-width columns are numpy arrays (lists: 2-D); variable-width ones are lists.
    """

    found: npt.NDArray[np.bool_]
    stale_schema: npt.NDArray[np.bool_]
    event_ts_us: npt.NDArray[np.int64]
    nulls: npt.NDArray[np.bool_]  # (rows, features), column order of the layout
    columns: dict[str, Any]


def encode_rows(
    layout: Layout,
    event_ts_us: npt.ArrayLike,
    columns: Mapping[str, Any],
    nulls: Mapping[str, npt.ArrayLike] | None = None,
) -> list[bytes]:
    """Pack N rows of `layout`'s view into N values.

    Parameters:
        event_ts_us: N event timestamps, int64 microseconds since the epoch.
        columns: every feature of the layout: a numpy array (N, or N x length for
            fixed-length lists) for fixed-width ones; a `VarColumn` or a sequence of
            Python values for the others.
        nulls: optional boolean masks of N by feature name; a null's value is ignored.

    Returns the values in row order. Vectorised: the only per-row Python work is the
    final slicing of one buffer into N bytes objects (`encode_fixed_rows` skips it).
    """
    prefix, null_matrix = _prefixes(layout, event_ts_us, columns, nulls)
    if not layout.var_features:
        blob = prefix.tobytes()
        size = layout.prefix_size
        return [blob[i : i + size] for i in range(0, len(prefix) * size, size)]
    return _with_var_section(layout, prefix, columns, null_matrix)


def encode_fixed_rows(
    layout: Layout,
    event_ts_us: npt.ArrayLike,
    columns: Mapping[str, Any],
    nulls: Mapping[str, npt.ArrayLike] | None = None,
) -> npt.NDArray[np.uint8]:
    """Pack N rows of a view without variable-width features into an N x `prefix_size`
    uint8 matrix: row i holds the bytes of value i (what `encode_rows` returns, without
    a bytes object per row). Parameters as `encode_rows`'s; InvalidArgument when the
    view has variable-width features.

    >>> layout = Layout("user", (FeatureSpec("age", DType.INT64),))
    >>> encode_fixed_rows(layout, [0], {"age": np.array([42])}).shape
    (1, 25)
    """
    if layout.var_features:
        raise InvalidArgument(f"view {layout.view!r} has variable-width features: its rows differ in size")
    prefix, _ = _prefixes(layout, event_ts_us, columns, nulls)
    return prefix.view(np.uint8).reshape(len(prefix), layout.prefix_size)


def _prefixes(
    layout: Layout,
    event_ts_us: npt.ArrayLike,
    columns: Mapping[str, Any],
    nulls: Mapping[str, npt.ArrayLike] | None,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """The rows' fixed parts (a structured array of `layout.prefix_dtype`) and their nulls."""
    ts = np.asarray(event_ts_us, dtype=np.int64)
    n = ts.shape[0]
    missing = [name for name in layout.names if name not in columns]
    if missing:
        raise InvalidArgument(f"view {layout.view!r}: no column for features {missing}")
    # Every byte of the prefix is a field, and each is set below (no zeroing pass first);
    # columns go straight into their fields, numpy converting (and byte-swapping the
    # source's big-endian views) on the way: half the time of a converted copy first.
    prefix = np.empty(n, dtype=layout.prefix_dtype)
    prefix["version"] = FORMAT_VERSION
    prefix["flags"] = 0
    prefix["reserved"] = 0
    prefix["schema_id"] = layout.schema_id
    prefix["event_ts_us"] = ts
    null_matrix = np.zeros((n, len(layout.features)), dtype=bool)
    for i, spec in enumerate(layout.features):
        null = None
        if nulls is not None and spec.name in nulls:
            null = null_matrix[:, i] = np.asarray(nulls[spec.name], dtype=bool)
        if spec.fixed:
            values = columns[spec.name]
            if not isinstance(values, np.ndarray):
                values = np.asarray(values, dtype=spec.dtype.element)
            if values.shape[0] != n:
                raise InvalidArgument(f"column {spec.name!r} has {values.shape[0]} rows, not {n}")
            field = prefix[spec.name]
            field[...] = values
            if null is not None and null.any():
                field[null] = 0
    prefix["__nulls"] = np.packbits(null_matrix, axis=1, bitorder="little")
    return prefix, null_matrix


def _with_var_section(
    layout: Layout,
    prefix: npt.NDArray[Any],
    columns: Mapping[str, Any],
    null_matrix: npt.NDArray[np.bool_],
) -> list[bytes]:
    """Scatter prefixes and variable-width parts into one buffer, then slice it."""
    n = prefix.shape[0]
    index = {f.name: i for i, f in enumerate(layout.features)}
    var_cols = []
    for spec in layout.var_features:
        col = columns[spec.name]
        if not isinstance(col, VarColumn):
            col = VarColumn.from_values(col, spec)
        lengths = np.diff(col.offsets)
        lengths = np.where(null_matrix[:, index[spec.name]], 0, lengths)
        var_cols.append((col, lengths))
    sizes = layout.prefix_size + sum(4 + lengths for _, lengths in var_cols)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    out = np.zeros(int(starts[-1]), dtype=np.uint8)
    _scatter_fixed(out, starts[:-1], prefix.view(np.uint8).reshape(n, layout.prefix_size))
    cursor = starts[:-1] + layout.prefix_size
    for col, lengths in var_cols:
        _scatter_fixed(out, cursor, lengths.astype("<u4").view(np.uint8).reshape(n, 4))
        cursor = cursor + 4
        src = np.frombuffer(col.data, dtype=np.uint8)
        total = int(lengths.sum())
        if total:
            shift = np.repeat(cursor - col.offsets[:-1], lengths)
            src_index = _ranges(col.offsets[:-1], lengths, total)
            out[src_index + shift] = src[src_index]
        cursor = cursor + lengths
    blob = out.tobytes()
    bounds = starts.tolist()
    return [blob[bounds[i] : bounds[i + 1]] for i in range(n)]


def _scatter_fixed(out: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], rows: npt.NDArray[np.uint8]) -> None:
    width = rows.shape[1]
    out[(starts[:, None] + np.arange(width)).ravel()] = rows.ravel()


def _ranges(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], total: int) -> npt.NDArray[np.int64]:
    """Concatenated arange(starts[i], starts[i] + lengths[i]) for all i, vectorised."""
    ends = np.cumsum(lengths)
    index = np.arange(total, dtype=np.int64)
    result: npt.NDArray[np.int64] = index + np.repeat(starts - (ends - lengths), lengths)
    return result


def decode_rows(layout: Layout, values: Sequence[bytes | None]) -> DecodedRows:
    """Decode values of `layout`'s view (None for a missing key) into columns.

    Rows are matched to the layout by schema id: a row written under another schema is
    reported not found (and `stale_schema`), never decoded into the wrong columns.
    """
    n = len(values)
    size = layout.prefix_size
    ok = [i for i, v in enumerate(values) if v is not None and len(v) >= size]
    prefixes = np.frombuffer(
        b"".join([values[i][:size] for i in ok]),  # type: ignore[index]
        dtype=layout.prefix_dtype,
    )
    good = (prefixes["version"] == FORMAT_VERSION) & (prefixes["schema_id"] == layout.schema_id)
    found = np.zeros(n, dtype=bool)
    stale = np.zeros(n, dtype=bool)
    ok_index = np.asarray(ok, dtype=np.int64)
    found[ok_index[good]] = True
    stale[ok_index[~good]] = True
    rows = prefixes[good]
    where = ok_index[good]
    ts = np.zeros(n, dtype=np.int64)
    ts[where] = rows["event_ts_us"]
    nulls = np.ones((n, len(layout.features)), dtype=bool)
    bits = np.unpackbits(rows["__nulls"], axis=1, bitorder="little", count=len(layout.features))
    nulls[where] = bits.astype(bool)
    columns: dict[str, Any] = {}
    for spec in layout.features:
        if spec.fixed:
            col = np.zeros((n, spec.length) if spec.length else n, dtype=spec.dtype.element)
            col[where] = rows[spec.name]
            columns[spec.name] = col
    if layout.var_features:
        _decode_var(layout, values, where.tolist(), columns)
    return DecodedRows(found, stale, ts, nulls, columns)


def _decode_var(layout: Layout, values: Sequence[bytes | None], where: list[int], columns: dict[str, Any]) -> None:
    n = len(values)
    out: list[list[Any]] = [[None] * n for _ in layout.var_features]
    for i in where:
        raw = values[i]
        assert raw is not None
        pos = layout.prefix_size
        for j, spec in enumerate(layout.var_features):
            length = int.from_bytes(raw[pos : pos + 4], "little")
            chunk = raw[pos + 4 : pos + 4 + length]
            pos += 4 + length
            if spec.dtype is DType.STRING:
                out[j][i] = chunk.decode()
            elif spec.dtype is DType.BYTES:
                out[j][i] = chunk
            else:
                out[j][i] = np.frombuffer(chunk, dtype=spec.dtype.element)
    for spec, col in zip(layout.var_features, out, strict=True):
        columns[spec.name] = col
