"""The sink's two ways of writing (SET NX first while keys are new, the script alone while
they exist) leave Redis exactly as the plain script does, batch after batch, whichever
way each batch took."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import redis

from featurestore.registry import JoinKey, ViewDef
from featurestore.store.keys import entity_tokens, row_keys
from featurestore.store.layout import DType, FeatureSpec, Layout, encode_rows
from featurestore.store.redis import BulkClient, connect, connect_bulk, guarded_write
from materialize.sink import SinkOptions, expiry_ms, write_through
from materialize.source import RowBatch

GRACE_S = 60.0


def _view(layout: Layout) -> ViewDef:
    return ViewDef("v", (JoinKey("id", DType.INT64),), 3600.0, layout, "v", "event_timestamp", "", None)


FIXED = _view(Layout("v", (FeatureSpec("x", DType.INT64), FeatureSpec("y", DType.FLOAT64))))
VARIABLE = _view(Layout("v", (FeatureSpec("x", DType.INT64), FeatureSpec("s", DType.STRING))))


def _batch(view: ViewDef, ids: range, ts_us: int, value: int) -> RowBatch:
    n = len(ids)
    x = np.full(n, value, dtype=np.int64)
    columns: dict[str, object] = {"x": x}
    if "y" in view.layout.names:
        columns["y"] = x * 0.5
    else:
        columns["s"] = [f"s{value}-{i}" for i in ids]
    nulls = {"x": np.arange(n) % 7 == 3}  # a few nulls, which must stay null
    return RowBatch([list(ids)], np.full(n, ts_us, dtype=np.int64), columns, nulls)


def _batches(view: ViewDef, now: int) -> list[RowBatch]:
    """New keys, then the same keys again (equal and older times), then new keys again,
    then a mix: each batch makes the writer guess the next one's case differently."""
    return [
        _batch(view, range(0, 300), now, 1),
        _batch(view, range(0, 150), now, 2),  # equal times: rewritten
        _batch(view, range(150, 300), now - 1, 3),  # older: skipped
        _batch(view, range(300, 600), now + 5, 4),  # new again
        _batch(view, range(200, 500), now + 9, 5),  # half existing (newer), half new
        _batch(view, range(550, 700), now - 9, 6),  # older for 550-599 (skipped), new from 600
    ]


async def _reference(url: str, view: ViewDef, batches: list[RowBatch], seeded: list[bytes]) -> tuple[int, int]:
    """The plain script through redis-py, batch by batch; returns (written, skipped)."""
    client = connect(url)
    written = skipped = 0
    try:
        await client.mset({key: row for key, row in zip(seeded[::2], seeded[1::2], strict=True)})
        for batch in batches:
            keys = row_keys("p", view.name, entity_tokens(batch.keys))
            rows = encode_rows(view.layout, batch.event_ts_us, batch.columns, batch.nulls)
            done = await guarded_write(client, [(keys, rows)], expiry_ms(view, GRACE_S), [])
            written, skipped = written + done.written, skipped + done.skipped
    finally:
        await client.aclose()
    return written, skipped


def _state(url: str) -> tuple[dict[bytes, bytes], dict[bytes, int]]:
    """Every key's value, and its expiry as a Unix time in milliseconds (-1: none)."""
    with redis.Redis.from_url(url) as client:
        keys: list[bytes] = client.keys(b"*")  # type: ignore[assignment]
        values = dict(zip(keys, client.mget(keys), strict=True))  # type: ignore[arg-type]
        now_ms = int(time.time() * 1000)
        expiries = {k: (ttl if (ttl := client.pttl(k)) < 0 else now_ms + ttl) for k in keys}  # type: ignore[operator]
    return values, expiries  # type: ignore[return-value]


@pytest.mark.parametrize("view", [FIXED, VARIABLE], ids=["matrix", "bytes"])
async def test_both_ways_leave_what_the_plain_script_leaves(
    view: ViewDef, flushed_dbs: Callable[..., tuple[str, ...]]
) -> None:
    ours_url, reference_url = flushed_dbs(5, 6)
    now = int(time.time() * 1e6)
    batches = _batches(view, now)
    # Keys that already hold a newer row, or a value that is no row.
    newer = encode_rows(view.layout, [now + 100], {"x": [9], "y": [9.0], "s": ["nine"]})[0]
    seeded = [b"p:v:{10}", newer, b"p:v:{650}", newer, b"p:v:{320}", b"junk"]
    expected = await _reference(reference_url, view, batches, seeded)

    client = connect_bulk(ours_url)
    assert isinstance(client, BulkClient)
    await client.mset({key: row for key, row in zip(seeded[::2], seeded[1::2], strict=True)})
    await client.config_resetstat()

    async def produce(on_batch: Callable[[RowBatch], Awaitable[None]]) -> None:
        for batch in batches:
            await on_batch(batch)

    try:
        options = SinkOptions(script_rows=64, writers=1, expiry_grace_s=GRACE_S)
        counts = await write_through(client, "p", view, produce, options)
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    assert (counts.written, counts.skipped) == expected
    (values, expiries), (want_values, want_expiries) = _state(ours_url), _state(reference_url)
    assert values == want_values
    assert expiries.keys() == want_expiries.keys()
    assert all(abs(expiries[k] - want_expiries[k]) < 2_000 for k in expiries)
    # Both ways were taken: SET NX for the new keys, the script for the others.
    assert stats["cmdstat_set"]["calls"] >= 600
    assert stats["cmdstat_evalsha"]["calls"] > 0
