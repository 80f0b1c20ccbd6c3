"""Streams the latest row per entity in a window out of PostgreSQL, as numpy columns.

PostgreSQL picks the rows (`DISTINCT ON` the join keys, newest event time first, then
newest `created`) and sends them with a binary COPY, which asyncpg hands over as raw
chunks without building a Python object per value. We shape the SELECT so the chunks
parse with numpy:

    fixed part     join keys (int8), event time (timestamptz: int64 microseconds since
                   2000-01-01), null-mask words (int8, 63 fixed features each), then the
                   fixed-width features, COALESCEd so that every value has its full width
                   (fixed-length lists: a 1-D array of exactly `length` non-null elements,
                   else zeros and the null bit)
    variable part  string join keys, then the variable-width features (text, bytea,
                   arrays); a NULL there is the COPY's -1 length, no mask bit needed

Every tuple of a view without variable-width columns has the same length, so a chunk
is one `np.frombuffer` with a big-endian structured dtype. Otherwise a short Python loop
reads only the length words to find tuple boundaries, and numpy gathers the rest.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from featurestore.errors import ConfigError, Unavailable
from featurestore.registry import ViewDef
from featurestore.store.layout import DType, FeatureSpec, VarColumn
from materialize.plan import Shard, Window, to_datetime

__all__ = ["RowBatch", "SourceQuery", "connect", "shard_hash", "shard_hash_sql", "stream_window"]

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds
_MASK_BITS = 63  # bits per int8 mask word; the sign bit stays unused
_INT32 = struct.Struct(">i")
_CAST = {
    DType.INT32: "int4",
    DType.INT64: "int8",
    DType.FLOAT32: "float4",
    DType.FLOAT64: "float8",
    DType.BOOL: "bool",
    DType.UNIX_TIMESTAMP: "timestamptz",
    DType.STRING: "text",
    DType.BYTES: "bytea",
    DType.INT32_LIST: "int4[]",
    DType.INT64_LIST: "int8[]",
    DType.FLOAT32_LIST: "float4[]",
    DType.FLOAT64_LIST: "float8[]",
}
_ZERO = {DType.BOOL: "false", DType.UNIX_TIMESTAMP: "'epoch'::timestamptz"}


@dataclass(slots=True)
class RowBatch:
    """Rows of one view, column by column, ready for `store.layout.encode_rows`.

    `keys` holds one sequence of Python values per join key (what `entity_tokens`
    takes); `columns` and `nulls` are keyed by feature name.
    """

    keys: list[list[Any]]
    event_ts_us: npt.NDArray[np.int64]
    columns: dict[str, Any]
    nulls: dict[str, npt.NDArray[np.bool_]]

    def __len__(self) -> int:
        return int(self.event_ts_us.shape[0])


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table_sql(table: str) -> str:
    if table.lstrip().startswith("("):
        return table  # a query source: already a parenthesised subquery
    return ".".join(_ident(part) for part in table.split("."))


def _list_ok(col: str, spec: FeatureSpec) -> str:
    """SQL: the array has exactly the declared shape, so its binary form has fixed width."""
    return (
        f"({col} IS NOT NULL AND array_ndims({col}) = 1 AND cardinality({col}) = {spec.length}"
        f" AND array_position({col}, NULL) IS NULL)"
    )


def _be(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder(">") if dtype.itemsize > 1 else dtype


def shard_hash_sql(join_keys: Sequence[str], alias: str = "src") -> str:
    """SQL: the shard hash of an entity, from its join-key columns: an int8 from 0 to 2**32 - 1.

    The first 32 bits of the MD5 of the join-key values as text, joined by `|`
    (PostgreSQL's documented md5, so every server version agrees; `shard_hash` is its
    Python twin). A shard holds a range of it (`Shard.bounds`), so an index on the
    expression (without the alias) lets each shard read only its rows, e.g.

        CREATE INDEX ON user_profile ((('x' || substr(md5(coalesce("user_id"::text, '')), 1, 8))::bit(32)::int8));

    Without one, each shard scans the table and keeps its entities before sorting them.
    Every function in it is immutable (what an index expression must be).
    """
    prefix = f"{alias}." if alias else ""
    text = " || '|' || ".join(f"coalesce({prefix}{_ident(k)}::text, '')" for k in join_keys)
    return f"('x' || substr(md5({text}), 1, 8))::bit(32)::int8"


def shard_hash(values: Sequence[int | str]) -> int:
    """The shard hash of an entity from its join-key values (see `shard_hash_sql`).

    >>> Shard(2, 4).holds(shard_hash([42]))   # entity 42 is in the third of 4 shards
    True
    """
    text = "|".join(str(v) for v in values)
    return int(hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()[:8], 16)


class SourceQuery:
    """The SELECT of one view and the numpy dtype of its fixed part, built once per view."""

    def __init__(self, view: ViewDef) -> None:
        self.view = view
        self.int_keys = [k.name for k in view.join_keys if k.dtype is not DType.STRING]
        self.str_keys = [k.name for k in view.join_keys if k.dtype is DType.STRING]
        self.fixed = [f for f in view.layout.features if f.fixed]
        self.var = list(view.layout.var_features)
        self.mask_words = (len(self.fixed) + _MASK_BITS - 1) // _MASK_BITS
        self.dtype = self._fixed_dtype()
        self.n_fields = (len(self.dtype.names or ()) - 1) // 2 + len(self.str_keys) + len(self.var)

    def _fixed_dtype(self) -> np.dtype[Any]:
        # Each field is preceded by its int32 length word; the tuple by an int16 count.
        fields: list[tuple[str, Any]] = [("__n", ">i2")]
        columns: list[tuple[str, Any]] = [(f"__key{i}", ">i8") for i in range(len(self.int_keys))]
        columns.append(("__ts", ">i8"))
        columns += [(f"__mask{i}", ">i8") for i in range(self.mask_words)]
        for spec in self.fixed:
            elem = _be(np.dtype(spec.dtype.element))
            if spec.length:  # array header (20 bytes), then (length word, value) pairs
                pair = np.dtype([("len", ">i4"), ("v", elem)])
                columns.append((spec.name, [("head", "V20"), ("e", pair, (spec.length,))]))
            else:
                columns.append((spec.name, elem))
        for i, (name, dtype) in enumerate(columns):
            fields += [(f"__len{i}", ">i4"), (name, dtype)]
        return np.dtype(fields)

    def select(self, window: Window, shard: Shard | None = None) -> tuple[str, list[Any]]:
        """The latest-row query of `window` (of the entities of `shard` only, when given),
        and its arguments."""
        view = self.view
        keys = ", ".join(_ident(k.name) for k in view.join_keys)
        ts = _ident(view.timestamp_field)
        order = f"{keys}, {ts} DESC"
        if view.created_field:
            order += f", {_ident(view.created_field)} DESC NULLS LAST"
        where, args = f"{ts} < $1", [to_datetime(window.end_us)]
        if window.start_us is not None:
            where += f" AND {ts} >= $2"
            args.append(to_datetime(window.start_us))
        if shard is not None:  # its entities before DISTINCT ON: it sorts only its rows
            low, high = shard.bounds
            hashed = shard_hash_sql([k.name for k in view.join_keys])
            where += f" AND {hashed} >= {low} AND {hashed} < {high}"
        return (
            f"SELECT {', '.join(self._columns())} FROM (SELECT DISTINCT ON ({keys}) *"
            f" FROM {_table_sql(view.table)} AS src WHERE {where} ORDER BY {order}) AS t",
            args,
        )

    def _columns(self) -> list[str]:
        cols = [f"t.{_ident(k)}::int8" for k in self.int_keys]
        cols.append(f"t.{_ident(self.view.timestamp_field)}::timestamptz")
        cols += self._mask_columns()
        for spec in self.fixed:
            col, cast = f"t.{_ident(spec.name)}", _CAST[spec.dtype]
            if spec.length:
                zero = f"array_fill(0::{cast[:-2]}, ARRAY[{spec.length}])"
                cols.append(f"CASE WHEN {_list_ok(col, spec)} THEN {col}::{cast} ELSE {zero} END")
            else:
                cols.append(f"COALESCE({col}::{cast}, {_ZERO.get(spec.dtype, '0')})")
        cols += [f"t.{_ident(k)}::text" for k in self.str_keys]
        cols += [f"t.{_ident(f.name)}::{_CAST[f.dtype]}" for f in self.var]
        return cols

    def _mask_columns(self) -> list[str]:
        words = []
        for w in range(self.mask_words):
            scalars: list[tuple[str, str]] = []  # (column, its mask term)
            lists: list[tuple[str, str]] = []
            for bit, spec in enumerate(self.fixed[w * _MASK_BITS : (w + 1) * _MASK_BITS]):
                col = f"t.{_ident(spec.name)}"
                null = f"NOT {_list_ok(col, spec)}" if spec.length else f"{col} IS NULL"
                (lists if spec.length else scalars).append((col, f"(CASE WHEN {null} THEN {1 << bit} ELSE 0 END)"))
            terms = [term for _, term in lists]
            if len(scalars) > 2:
                # One num_nulls call settles a row without nulls: the OR chain costs a
                # function call per feature (PostgreSQL's CPU per row, the job's floor).
                columns = ", ".join(col for col, _ in scalars)
                chain = " | ".join(term for _, term in scalars)
                terms.append(f"(CASE WHEN num_nulls({columns}) = 0 THEN 0 ELSE ({chain}) END)")
            else:
                terms += [term for _, term in scalars]
            words.append("(" + " | ".join(terms) + ")::int8")
        return words


class CopyParser:
    """Turns the chunks of one binary COPY into `RowBatch`es of complete tuples.

    Chunks are buffered until about `min_bytes` are pending, so numpy works on large
    slices; the bytes of a tuple cut by a chunk boundary wait for the next chunk.
    """

    def __init__(self, query: SourceQuery, min_bytes: int) -> None:
        self.q = query
        self.min_bytes = min_bytes
        self._parts: list[bytes] = []
        self._pending = 0
        self._header_done = False
        self.done = False

    def feed(self, chunk: bytes) -> RowBatch | None:
        """Buffer `chunk`; parse and return the complete tuples once enough is pending."""
        self._parts.append(chunk)
        self._pending += len(chunk)
        return self.parse() if self._pending >= self.min_bytes else None

    def parse(self) -> RowBatch | None:
        """Parse every complete tuple pending now (also called once the COPY has ended)."""
        buf = b"".join(self._parts)
        pos = 0 if self._header_done else self._skip_header(buf)
        if pos < 0:
            return None
        if self.q.var or self.q.str_keys:
            starts, var_at, pos = self._walk(buf, pos)
            batch = self._gather(buf, starts, var_at) if starts else None
        else:
            count = (len(buf) - pos) // self.q.dtype.itemsize
            fixed = np.frombuffer(buf, dtype=self.q.dtype, count=count, offset=pos)
            pos += count * self.q.dtype.itemsize
            batch = self._batch(fixed, []) if count else None
        if buf[pos : pos + 2] == b"\xff\xff":  # the trailer: no tuples after it
            self.done = True
            pos += 2
        rest = buf[pos:]
        self._parts, self._pending = ([rest] if rest else []), len(rest)
        return batch

    def _skip_header(self, buf: bytes) -> int:
        if len(buf) < 19:
            return -1
        if buf[:11] != _SIGNATURE:
            raise Unavailable("PostgreSQL sent an unexpected COPY header (not binary COPY)")
        end: int = 19 + _INT32.unpack_from(buf, 15)[0]  # after the header extension
        if len(buf) < end:
            return -1
        self._header_done = True
        return end

    def _walk(self, buf: bytes, pos: int) -> tuple[list[int], list[int], int]:
        """Tuple starts and the offsets of their variable fields' length words.

        The only per-row Python loop of the job: it reads one length word per variable
        field and nothing else; numpy does the copying afterwards.
        """
        unpack, end, width = _INT32.unpack_from, len(buf), self.q.dtype.itemsize
        n_var = len(self.q.str_keys) + len(self.q.var)
        starts: list[int] = []
        var_at: list[int] = []
        while pos + width + 4 * n_var <= end and buf[pos] != 0xFF:
            p, at = pos + width, []
            for _ in range(n_var):
                if p + 4 > end:
                    break
                at.append(p)
                length = unpack(buf, p)[0]
                p += 4 + (length if length > 0 else 0)
            if len(at) < n_var or p > end:
                break
            starts.append(pos)
            var_at += at
            pos = p
        return starts, var_at, pos

    def _gather(self, buf: bytes, starts: list[int], var_at: list[int]) -> RowBatch:
        raw = np.frombuffer(buf, dtype=np.uint8)
        width = self.q.dtype.itemsize
        index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(width)
        fixed = raw[index].view(self.q.dtype).reshape(len(starts))
        at = np.asarray(var_at, dtype=np.int64).reshape(len(starts), -1)
        var_cols = [_var_column(raw, at[:, j]) for j in range(at.shape[1])]
        return self._batch(fixed, var_cols)

    def _batch(self, fixed: npt.NDArray[Any], var_cols: list[tuple[VarColumn, Any]]) -> RowBatch:
        q = self.q
        if (fixed["__n"] != q.n_fields).any():
            raise Unavailable("COPY tuples do not have the expected number of columns")
        keys: list[list[Any]] = [fixed[f"__key{i}"].tolist() for i in range(len(q.int_keys))]
        ts = fixed["__ts"].astype(np.int64) + _PG_EPOCH_US
        columns: dict[str, Any] = {}
        nulls: dict[str, npt.NDArray[np.bool_]] = {}
        for i, spec in enumerate(q.fixed):
            word = fixed[f"__mask{i // _MASK_BITS}"]
            nulls[spec.name] = ((word >> (i % _MASK_BITS)) & 1).astype(bool)
            value = fixed[spec.name]["e"]["v"] if spec.length else fixed[spec.name]
            if spec.dtype is DType.UNIX_TIMESTAMP:
                value = value.astype(np.int64) + _PG_EPOCH_US
            columns[spec.name] = value
        for col, _ in var_cols[: len(q.str_keys)]:
            keys.append(_strings(col))
        for spec, (col, null) in zip(q.var, var_cols[len(q.str_keys) :], strict=True):
            columns[spec.name] = _unpack_arrays(col, spec) if spec.dtype.is_list else col
            nulls[spec.name] = null
        # Join keys in the view's order (int keys were emitted first, string keys last).
        order = {n: i for i, n in enumerate(q.int_keys + q.str_keys)}
        keys = [keys[order[k.name]] for k in q.view.join_keys]
        return RowBatch(keys, ts, columns, nulls)


def _var_column(raw: npt.NDArray[np.uint8], at: npt.NDArray[np.int64]) -> tuple[VarColumn, Any]:
    """Gather one variable-width field of every tuple; returns it and its null mask."""
    lengths = raw[(at[:, None] + np.arange(4)).ravel()].view(">i4").astype(np.int64)
    null = lengths < 0
    lengths[null] = 0
    offsets = np.zeros(len(at) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    data_start = at + 4
    index = np.arange(total, dtype=np.int64) + np.repeat(data_start - offsets[:-1], lengths)
    return VarColumn(raw[index].tobytes(), offsets), null


def _strings(col: VarColumn) -> list[str]:
    bounds = col.offsets.tolist()
    data = col.data
    return [data[bounds[i] : bounds[i + 1]].decode() for i in range(len(bounds) - 1)]


def _unpack_arrays(col: VarColumn, spec: FeatureSpec) -> VarColumn:
    """PostgreSQL binary arrays -> packed little-endian elements (a rare, per-row path)."""
    elem = np.dtype(spec.dtype.element)
    pair = np.dtype([("len", ">i4"), ("v", _be(elem))])
    bounds = col.offsets.tolist()
    parts = []
    for i in range(len(bounds) - 1):
        raw = col.data[bounds[i] : bounds[i + 1]]
        ndim = _INT32.unpack_from(raw, 0)[0] if raw else 0
        body = np.frombuffer(raw, dtype=pair, offset=12 + 8 * ndim) if ndim else None
        parts.append(b"" if body is None else body["v"].astype(elem).tobytes())
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return VarColumn(b"".join(parts), offsets)


async def connect(dsn: str, *, timeout_s: float = 10.0) -> asyncpg.Connection:
    """A PostgreSQL connection; `Unavailable` when the server cannot be reached."""
    try:
        return await asyncpg.connect(dsn, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unavailable(f"PostgreSQL at {_safe(dsn)} is unreachable: {exc}") from exc


def _safe(dsn: str) -> str:
    """The DSN without its password, for messages."""
    head, at, tail = dsn.rpartition("@")
    if not at:
        return dsn
    scheme, _, creds = head.partition("://")
    return f"{scheme}://{creds.split(':')[0]}@{tail}"


# A server that goes away: the connection lost or refused, an administrator's shutdown,
# or (a shutdown's FATAL message read between two operations, before the connection
# closed) asyncpg's protocol left mid-error when the next statement starts.
_GONE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
)


async def stream_window(
    conn: asyncpg.Connection,
    window: Window,
    on_batch: Callable[[RowBatch], Awaitable[None]],
    *,
    batch_rows: int = 8000,
    shard: Shard | None = None,
) -> None:
    """Stream the latest row per entity of `window`, calling `on_batch` for each batch.

    Parameters:
        conn: the PostgreSQL connection (held for the whole COPY).
        window: the view and the event-time range.
        on_batch: awaited with each batch; while it waits, reading pauses, which is the
            back-pressure that keeps memory bounded.
        batch_rows: about how many rows make one batch (fewer when rows carry long
            variable-width values: a batch is batch_rows fixed-width parts in bytes).
        shard: only the entities of this shard (None: all).
    """
    query = SourceQuery(window.view)
    parser = CopyParser(query, batch_rows * query.dtype.itemsize)
    sql, args = query.select(window, shard)

    async def sink(chunk: bytes) -> None:
        batch = parser.feed(chunk)
        if batch is not None:
            await on_batch(batch)

    try:
        await conn.copy_from_query(sql, *args, output=sink, format="binary")
    except asyncpg.UndefinedTableError as exc:
        raise ConfigError(
            f"view {window.view.name!r} reads table {window.view.table!r}, which PostgreSQL does not have: {exc}"
        ) from exc
    except asyncpg.UndefinedColumnError as exc:
        raise ConfigError(f"view {window.view.name!r}: its table lacks a column: {exc}") from exc
    except _GONE as exc:
        raise Unavailable(f"PostgreSQL failed during the read: {exc}") from exc
    last = parser.parse()
    if last is not None:
        await on_batch(last)
    if not parser.done:
        raise Unavailable("the COPY from PostgreSQL ended before its trailer")
