"""Demo data for the feature views of a Feast repo, written into PostgreSQL.

    python feature_repo/generate.py --dsn postgresql://postgres@127.0.0.1:5432/postgres \\
        --repo feature_repo --users 100000 --items 20000 --versions 3

For every feature view of the compiled registry (`featurestore.registry.load_registry`)
this drops and recreates the view's table from its layout (join keys, `event_timestamp`,
`created`, one column per feature) and fills it with `versions` timestamped rows per
entity: event times spread over the last days, the newest one inside the view's TTL for
most entities and older than it for a few, some nulls, values in plausible ranges by
feature name, and clustered unit-length float32 embeddings for vector features. Rows go
in with binary COPY in chunks, so memory stays bounded whatever the size. The same seed
gives the same data (event times are relative to `now`, which callers may pin).

Importable: `await generate(dsn, registry, users=1000, items=200)` is what tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from featurestore.registry import Registry, ViewDef, load_registry
from featurestore.store.layout import DType, FeatureSpec

__all__ = ["GenerateOptions", "generate", "main", "pg_type"]

_PG_TYPES = {
    DType.INT32: "integer",
    DType.INT64: "bigint",
    DType.FLOAT32: "real",
    DType.FLOAT64: "double precision",
    DType.BOOL: "boolean",
    DType.STRING: "text",
    DType.BYTES: "bytea",
    DType.UNIX_TIMESTAMP: "timestamptz",
    DType.INT32_LIST: "integer[]",
    DType.INT64_LIST: "bigint[]",
    DType.FLOAT32_LIST: "real[]",
    DType.FLOAT64_LIST: "double precision[]",
}

# Small vocabularies, so string features look like categories, not noise.
_VOCABULARIES = {
    "gender": ["female", "male", "other", "unknown"],
    "country": ["US", "DE", "FR", "GB", "IN", "BR", "JP", "ES", "IT", "NL", "PL", "CA"],
    "language": ["en", "de", "fr", "es", "pt", "ja", "it", "nl", "pl", "hi"],
    "category": [
        "books",
        "electronics",
        "fashion",
        "home",
        "sports",
        "toys",
        "beauty",
        "grocery",
        "garden",
        "music",
        "movies",
        "games",
    ],
    "brand": [f"brand_{i:02d}" for i in range(40)],
    "device": ["ios", "android", "web", "tv", "tablet"],
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_US = 86_400_000_000
_HOUR_US = 3_600_000_000
_CLUSTERS = 256


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    """How much data to make, and how.

    users/items: entities of views keyed by user_id / item_id (other keys use users).
    versions: rows per entity. null_fraction: share of feature values that are null.
    stale_fraction: share of entities whose newest row is older than the view's TTL.
    chunk_rows: rows per COPY chunk (bounds memory).
    """

    users: int = 100_000
    items: int = 20_000
    versions: int = 3
    null_fraction: float = 0.02
    stale_fraction: float = 0.05
    seed: int = 0
    chunk_rows: int = 50_000


def pg_type(dtype: DType) -> str:
    """The PostgreSQL column type that holds features of `dtype`."""
    return _PG_TYPES[dtype]


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted (a dotted name is quoted part by part)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _entities(view: ViewDef, options: GenerateOptions) -> int:
    key = view.join_keys[0].name
    return options.items if key.startswith("item") else options.users


async def generate(
    dsn: str,
    registry: Registry,
    options: GenerateOptions = GenerateOptions(),
    *,
    views: Sequence[str] | None = None,
    now: datetime | None = None,
) -> dict[str, int]:
    """(Re)create and fill the table of each view; returns rows written per view.

    Parameters:
        dsn: PostgreSQL to write to.
        registry: the compiled Feast registry whose views define the tables.
        options: sizes, null fraction and seed.
        views: names of the views to generate (default: all).
        now: the reference time for event times (default: the current time).
    """
    now = now or datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        counts = {}
        for view in [registry.view(v) for v in views] if views else registry.views.values():
            counts[view.name] = await _fill_view(conn, view, options, now)
        return counts
    finally:
        await conn.close()


async def _fill_view(conn: asyncpg.Connection, view: ViewDef, options: GenerateOptions, now: datetime) -> int:
    if "(" in view.table or not view.table:
        raise ValueError(f"view {view.name!r} reads a query, not a table: {view.table!r}")
    table = quote_ident(view.table)
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.execute(_create_table_sql(view))
    schema, _, name = view.table.rpartition(".")
    columns = _column_names(view)
    written = 0
    for records in _chunks(view, options, now):
        await conn.copy_records_to_table(name, schema_name=schema or None, records=records, columns=columns)
        written += len(records)
    keys = ", ".join(quote_ident(k.name) for k in view.join_keys)
    ts = quote_ident(view.timestamp_field)
    await conn.execute(f"CREATE INDEX ON {table} ({keys}, {ts} DESC)")
    # VACUUM too: it sets hint bits and the visibility map now, so the first reads of
    # the fresh table (a benchmark's, say) are not slowed down by doing it themselves.
    await conn.execute(f"VACUUM (ANALYZE) {table}")
    return written


def _column_names(view: ViewDef) -> list[str]:
    names = [k.name for k in view.join_keys] + [view.timestamp_field]
    if view.created_field:
        names.append(view.created_field)
    return names + list(view.layout.names)


def _create_table_sql(view: ViewDef) -> str:
    columns = [f"{quote_ident(k.name)} {pg_type(k.dtype)} NOT NULL" for k in view.join_keys]
    columns.append(f"{quote_ident(view.timestamp_field)} timestamptz NOT NULL")
    if view.created_field:
        columns.append(f"{quote_ident(view.created_field)} timestamptz")
    columns += [f"{quote_ident(f.name)} {pg_type(f.dtype)}" for f in view.layout.features]
    return f"CREATE TABLE {quote_ident(view.table)} ({', '.join(columns)})"


def _rng(options: GenerateOptions, view: str, *parts: int) -> np.random.Generator:
    # Seeded per (view, chunk): chunks are reproducible on their own and views independent.
    return np.random.default_rng([options.seed, zlib.crc32(view.encode()), *parts])


def _chunks(view: ViewDef, options: GenerateOptions, now: datetime) -> Iterator[list[Any]]:
    """Records of the view's table, `chunk_rows` at a time (entity-major order)."""
    entities = _entities(view, options)
    per_chunk = max(1, options.chunk_rows // max(1, options.versions))
    centres = _centres(view, options)
    now_us = int((now - _EPOCH) / timedelta(microseconds=1))
    for index, first in enumerate(range(0, entities, per_chunk)):
        rng = _rng(options, view.name, index)
        ids = np.arange(first + 1, min(first + per_chunk, entities) + 1, dtype=np.int64)
        columns = _key_columns(view, np.repeat(ids, options.versions))
        columns += _time_columns(view, len(ids), options, now_us, rng)
        n = len(ids) * options.versions
        for spec in view.layout.features:
            values = _feature_values(spec, n, rng, centres)
            columns.append(_with_nulls(values, rng.random(n) < options.null_fraction))
        yield list(zip(*columns, strict=True))


def _key_columns(view: ViewDef, ids: npt.NDArray[np.int64]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for key in view.join_keys:
        values = ids.tolist()
        out.append(values if key.dtype is DType.INT64 else [f"{key.name}_{v}" for v in values])
    return out


def _time_columns(
    view: ViewDef, entities: int, options: GenerateOptions, now_us: int, rng: np.random.Generator
) -> list[list[Any]]:
    """Event times (newest first per entity) and created times.

    The newest row is inside the TTL for most entities, older than it for
    `stale_fraction`; older versions lie 1 h to 1 day apart. One entity in fifty has two
    rows with the same event time, told apart by `created` (the tie-breaker).
    """
    ttl_us = int(view.ttl_s * 1e6) if view.ttl_s else 30 * _DAY_US
    recent = min(ttl_us, 3 * _DAY_US)
    newest_age = (rng.random(entities) * 0.9 * recent).astype(np.int64)
    stale = rng.random(entities) < options.stale_fraction
    # At least an hour past the TTL: runs started within that hour agree on which rows
    # lie inside their TTL horizon (tests compare runs made seconds apart).
    stale_age = ttl_us + _HOUR_US + (rng.random(int(stale.sum())) * _DAY_US).astype(np.int64)
    newest_age[stale] = stale_age
    gaps = rng.integers(_HOUR_US, _DAY_US, size=(entities, options.versions))
    gaps[:, 0] = 0
    gaps[rng.random(entities) < 0.02, min(1, options.versions - 1)] = 0
    event = now_us - newest_age[:, None] - np.cumsum(gaps, axis=1)
    created = event + rng.integers(1_000_000, 600_000_000, size=event.shape)
    created[:, 1:] -= np.where(gaps[:, 1:] == 0, _HOUR_US, 0)
    if not view.created_field:
        return [_datetimes(event.ravel())]
    return [_datetimes(event.ravel()), _datetimes(created.ravel())]


def _datetimes(us: npt.NDArray[np.int64]) -> list[datetime]:
    return [_EPOCH + timedelta(microseconds=v) for v in us.tolist()]


def _with_nulls(values: list[Any], mask: npt.NDArray[np.bool_]) -> list[Any]:
    for i in np.flatnonzero(mask).tolist():
        values[i] = None
    return values


def _centres(view: ViewDef, options: GenerateOptions) -> dict[str, npt.NDArray[np.float32]]:
    """Cluster centres (unit vectors) for each list feature with a declared length."""
    rng = _rng(options, view.name, 1 << 30)
    out = {}
    for spec in view.layout.features:
        if spec.dtype.is_list and spec.length:
            c = rng.standard_normal((_CLUSTERS, spec.length)).astype(np.float32)
            out[spec.name] = c / np.linalg.norm(c, axis=1, keepdims=True)
    return out


def _feature_values(spec: FeatureSpec, n: int, rng: np.random.Generator, centres: dict[str, Any]) -> list[Any]:
    """N plausible values for a feature, chosen by its type and name."""
    name = spec.name
    if spec.dtype.is_list:
        return _list_values(spec, n, rng, centres.get(name))
    if spec.dtype is DType.STRING:
        vocab = next((v for k, v in _VOCABULARIES.items() if k in name), None)
        vocab = vocab or [f"{name}_{i}" for i in range(20)]
        return [vocab[i] for i in rng.zipf(1.6, n) % len(vocab)]
    if spec.dtype is DType.BYTES:
        return [rng.bytes(int(k)) for k in rng.integers(0, 32, n)]
    if spec.dtype is DType.BOOL:
        flags: list[Any] = (rng.random(n) < 0.3).tolist()
        return flags
    if spec.dtype is DType.UNIX_TIMESTAMP:
        return _datetimes(int(time.time() * 1e6) - rng.integers(0, 30 * _DAY_US, n))
    values = _numbers(name, n, rng)
    if spec.dtype in (DType.INT32, DType.INT64):
        values = np.maximum(values, 0).astype(np.int64)
    out: list[Any] = values.astype(spec.dtype.element).tolist()
    return out


def _numbers(name: str, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    if any(w in name for w in ("ctr", "rate", "pct", "score", "pref_")):
        return rng.beta(2.0, 8.0 if "ctr" in name else 3.0, n)
    if any(w in name for w in ("price", "spend", "revenue", "value")):
        return rng.lognormal(3.0, 1.0, n)
    if name.endswith("lat"):
        return rng.uniform(-55.0, 70.0, n)
    if name.endswith("lon"):
        return rng.uniform(-180.0, 180.0, n)
    if name == "age":
        return rng.integers(18, 80, n).astype(np.float64)
    if "rating_avg" in name:
        return rng.uniform(1.0, 5.0, n)
    if any(w in name for w in ("days", "hours", "minutes", "dwell", "length", "level")):
        return rng.gamma(2.0, 20.0, n)
    # Counts and everything else: non-negative, heavy-tailed.
    return rng.geometric(0.05, n).astype(np.float64) - 1.0


def _list_values(
    spec: FeatureSpec, n: int, rng: np.random.Generator, centres: npt.NDArray[np.float32] | None
) -> list[Any]:
    if centres is not None and spec.dtype in (DType.FLOAT32_LIST, DType.FLOAT64_LIST):
        picks = centres[rng.integers(0, len(centres), n)]
        # Noise of norm ~0.35 around a unit centre: members of a cluster have cosine ~0.9.
        noise = rng.standard_normal(picks.shape).astype(np.float32) * (0.35 / spec.length**0.5)
        vectors = picks + noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        out: list[Any] = vectors.tolist()
        return out
    lengths = rng.integers(1, 8, n) if not spec.length else np.full(n, spec.length)
    return [rng.integers(0, 1000, int(k)).tolist() for k in lengths]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", required=True, help="PostgreSQL DSN to write to")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--views", default="", help="comma-separated views (default: all)")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--null-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: generate, print rows per view, return the exit code."""
    args = _parse(argv)
    options = GenerateOptions(
        users=args.users,
        items=args.items,
        versions=args.versions,
        null_fraction=args.null_fraction,
        seed=args.seed,
    )
    try:
        registry = load_registry(args.repo)
        views = [v for v in args.views.split(",") if v] or None
        started = time.perf_counter()
        counts = asyncio.run(generate(args.dsn, registry, options, views=views))
    except (OSError, asyncpg.PostgresError, ValueError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # our own errors (ConfigError, NotFound) carry clear messages
        print(f"generate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for view, rows in counts.items():
        print(f"{view}: {rows} rows")
    print(f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
