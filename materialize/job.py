"""One materialization run: registry -> windows -> PostgreSQL -> Redis -> watermarks.

    summary = await run(Settings(repo=Path("feature_repo"), redis_url="redis://...",
                                 dsn="postgresql://...", mode="incremental"))
    print(summary.line())

Views run one after the other on one PostgreSQL connection; inside a view, reading and
writing overlap (see `sink`). The run holds the project's lock throughout, and moves a
view's watermark only after Redis acknowledged every write of its window.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import yaml
from redis.exceptions import RedisError
from tqdm import tqdm

from featurestore.config import redact_url
from featurestore.errors import ConfigError, Unavailable
from featurestore.registry import Registry, ViewDef, load_registry
from featurestore.store.events import MAX_EVENT_IDS, publish_written
from featurestore.store.redis import Client
from materialize import source
from materialize.plan import Shard, Window, backfill_windows, incremental_windows, to_datetime, to_us
from materialize.sink import Counts, SinkOptions, WrittenIds, connect, write_through
from materialize.watermark import RunLock, advance_watermark, read_watermarks

__all__ = ["Settings", "Summary", "dsn_from_repo", "run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything one run needs, read once at the edge (the CLI) and passed down.

    dsn: PostgreSQL; None takes it from the repo's feature_store.yaml `offline_store`.
    views: the views to materialize; empty means all of the registry's.
    batch_rows: rows per guarded-write script call; `pipeline_batches` of them go in
        one pipeline (one round trip).
    expiry_grace_s: Redis keeps a row this long past its view's TTL.
    lock_ttl_s: how long the run lock outlives a run that died.
    shard: only the entities of this shard, with its own watermarks and lock (None: all).
    """

    repo: Path
    redis_url: str
    mode: Literal["incremental", "backfill"]
    dsn: str | None = None
    views: tuple[str, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    batch_rows: int = 1000
    pipeline_batches: int = 8
    writers: int = 2
    expiry_grace_s: float = 86_400.0
    lock_ttl_s: float = 30.0
    progress: bool = False
    shard: Shard | None = None


@dataclass(slots=True)
class Summary:
    """What a run did, for the final line and for callers."""

    views: tuple[str, ...]
    counts: Counts = field(default_factory=Counts)
    shard: Shard | None = None
    setup_s: float = 0.0  # loading the registry (importing Feast dominates)
    seconds: float = 0.0  # from connecting to the last acknowledged write and watermark

    def line(self) -> str:
        c = self.counts
        rate = c.read / self.seconds if self.seconds > 0 else 0.0
        shard = "" if self.shard is None else f" (shard {self.shard.index}/{self.shard.count})"
        return (
            f"materialized {','.join(self.views)}{shard}: read {c.read} rows, wrote {c.written},"
            f" skipped {c.skipped} as older, in {self.seconds:.2f} s ({rate:,.0f} rows/s)"
        )


def dsn_from_repo(repo: Path) -> str:
    """The PostgreSQL DSN of the repo's `offline_store` (feature_store.yaml, env expanded)."""
    path = repo / "feature_store.yaml"
    try:
        config = yaml.safe_load(os.path.expandvars(path.read_text()))
        store = config["offline_store"]
        user, password = quote(str(store.get("user") or "postgres")), store.get("password")
        auth = f"{user}:{quote(str(password))}" if password else user
        port = int(store.get("port") or 5432)
        return f"postgresql://{auth}@{store['host']}:{port}/{store.get('database', 'postgres')}"
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"no PostgreSQL DSN: pass --dsn, or give {path} an offline_store with host,"
            f" port and database ({type(exc).__name__}: {exc})"
        ) from exc


def _select_views(registry: Registry, names: tuple[str, ...]) -> list[ViewDef]:
    return [registry.view(n) for n in names] if names else list(registry.views.values())


async def run(settings: Settings) -> Summary:
    """Run one materialization and return its summary.

    Raises ConfigError (no registry, no DSN, missing table), NotFound (unknown view),
    Unavailable (PostgreSQL or Redis unreachable) and LockHeld (another run holds the
    lock); no watermark moves for a view whose writes were not all acknowledged.
    """
    started = time.perf_counter()
    registry = load_registry(settings.repo)
    views = _select_views(registry, settings.views)
    dsn = settings.dsn or dsn_from_repo(settings.repo)
    summary = Summary(tuple(v.name for v in views), setup_s=time.perf_counter() - started, shard=settings.shard)
    shard = "" if settings.shard is None else settings.shard.label
    started = time.perf_counter()
    client = connect(settings.redis_url, max_connections=settings.writers + 2)
    try:
        await _ping(client, settings.redis_url)
        conn = await source.connect(dsn)
        try:
            async with RunLock(client, registry.project, settings.lock_ttl_s, shard=shard) as lock:
                windows = await _windows(client, registry.project, views, settings)
                for window in windows:
                    written = WrittenIds(window.view, MAX_EVENT_IDS)
                    counts = await _materialize(client, conn, registry, window, settings, written)
                    summary.counts.add(counts)
                    lock.check()
                    if window.advances_watermark:
                        name, end_us = window.view.name, window.end_us
                        await advance_watermark(client, registry.project, name, end_us, shard=shard, lock=lock)
                    if counts.written:  # servers refresh what they derive (retrieval indexes)
                        await _announce(client, registry.project, window, written)
        finally:
            await conn.close(timeout=5)
    finally:
        await client.aclose()
    summary.seconds = time.perf_counter() - started
    return summary


async def _ping(client: Client, url: str) -> None:
    try:
        await client.ping()  # type: ignore[misc]
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis at {redact_url(url)} is unreachable: {exc}") from exc


async def _windows(client: Client, project: str, views: list[ViewDef], settings: Settings) -> list[Window]:
    if settings.mode == "backfill":
        if settings.start is None or settings.end is None:
            raise ConfigError("a backfill needs both --start and --end")
        return backfill_windows(views, to_us(settings.start), to_us(settings.end))
    shard = "" if settings.shard is None else settings.shard.label
    marks = await read_watermarks(client, project, [v.name for v in views], shard)
    return incremental_windows(views, marks, int(time.time() * 1_000_000))


async def _announce(client: Client, project: str, window: Window, written: WrittenIds) -> None:
    """Tell servers the window's view was written, with its entity ids when few enough."""
    name, ids = window.view.name, written.ids
    await publish_written(client, project, [name], ids=None if ids is None else {name: ids}, epoch_us=window.end_us)


async def _materialize(
    client: Client,
    conn: Any,
    registry: Registry,
    window: Window,
    settings: Settings,
    written: WrittenIds,
) -> Counts:
    """Write `window`; the entity ids of the batches written are noted in `written`."""
    view = window.view
    start = "-inf" if window.start_us is None else to_datetime(window.start_us).isoformat()
    log.info("%s: [%s, %s)", view.name, start, to_datetime(window.end_us).isoformat())
    rows_per_batch = settings.batch_rows * settings.pipeline_batches

    def produce(on_batch: Callable[[source.RowBatch], Awaitable[None]]) -> Awaitable[None]:
        async def noted(batch: source.RowBatch) -> None:
            written.add(batch)
            await on_batch(batch)

        return source.stream_window(conn, window, noted, batch_rows=rows_per_batch, shard=settings.shard)

    options = SinkOptions(
        script_rows=settings.batch_rows,
        writers=settings.writers,
        expiry_grace_s=settings.expiry_grace_s,
    )
    # A pseudo-terminal may report a 0 x 0 screen, on which tqdm prints nothing; shutil
    # falls back to $COLUMNS/$LINES or 80 x 24 then.
    cols, rows = shutil.get_terminal_size()
    with tqdm(
        desc=view.name,
        unit=" rows",
        file=sys.stderr,
        disable=not settings.progress,
        ncols=cols,
        nrows=rows,
    ) as bar:
        counts = await write_through(client, registry.project, view, produce, options, bar.update)
    log.info("%s: read %d, wrote %d, skipped %d", view.name, counts.read, counts.written, counts.skipped)
    return counts
