"""The demo data generator, in a database of its own so other tests' tables stay put."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import asyncpg
import numpy as np
import pytest

from featurestore.registry import Registry, load_registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def gen_dsn(pg_dsn: str) -> AsyncIterator[str]:
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("DROP DATABASE IF EXISTS generate_test")
    await conn.execute("CREATE DATABASE generate_test")
    yield pg_dsn.rsplit("/", 1)[0] + "/generate_test"
    await conn.execute("DROP DATABASE generate_test WITH (FORCE)")
    await conn.close()


@pytest.fixture(scope="module")
def registry(feature_repo: Path) -> Registry:
    return load_registry(feature_repo)


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_generated_tables_are_plausible_and_deterministic(
    gen_dsn: str, registry: Registry, generator: ModuleType
) -> None:
    gen = generator
    now = datetime(2026, 11, 23, tzinfo=UTC)
    options = gen.GenerateOptions(users=400, items=100, versions=3, null_fraction=0.05, seed=3)
    counts = await gen.generate(gen_dsn, registry, options, now=now)
    assert counts == {"user_profile": 1200, "user_activity": 1200, "item_stats": 300, "item_embedding": 300}
    first = await _fetch(gen_dsn, "SELECT * FROM user_activity ORDER BY user_id, event_timestamp")
    await gen.generate(gen_dsn, registry, options, now=now)
    assert await _fetch(gen_dsn, "SELECT * FROM user_activity ORDER BY 1, 2") == first

    stats = (
        await _fetch(
            gen_dsn,
            """
        SELECT min(ctr_24h) AS ctr_min, max(ctr_24h) AS ctr_max, min(clicks_7d) AS clicks_min,
               avg((ctr_7d IS NULL)::int) AS null_share, max(event_timestamp) AS newest,
               min(event_timestamp) AS oldest, count(DISTINCT device_type) AS devices
        FROM user_activity""",
        )
    )[0]
    assert stats["ctr_min"] >= 0 and stats["ctr_max"] <= 1 and stats["clicks_min"] >= 0
    assert 0.02 < stats["null_share"] < 0.09
    assert stats["newest"] <= now and stats["oldest"] > now - timedelta(days=10)
    assert 2 <= stats["devices"] <= 5
    prices = await _fetch(gen_dsn, "SELECT min(price) AS low FROM item_stats")
    assert prices[0]["low"] > 0


async def test_embeddings_are_unit_length_and_clustered(
    gen_dsn: str, registry: Registry, generator: ModuleType
) -> None:
    gen = generator
    options = gen.GenerateOptions(users=10, items=2000, versions=1, null_fraction=0.0)
    await gen.generate(gen_dsn, registry, options, views=["item_embedding"])
    rows = await _fetch(gen_dsn, "SELECT embedding FROM item_embedding")
    vectors = np.array([r["embedding"] for r in rows], dtype=np.float32)
    assert vectors.shape == (2000, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Clustered: most vectors have a close neighbour (random 64-d vectors have none).
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    assert np.median(similarity.max(axis=1)) > 0.8


def test_command_line_reports_rows_per_view(
    gen_dsn: str, feature_repo: Path, capsys: pytest.CaptureFixture[str], generator: ModuleType
) -> None:
    gen = generator
    argv = ["--dsn", gen_dsn, "--repo", str(feature_repo), "--views", "item_stats", "--items", "50", "--versions", "2"]
    assert gen.main(argv) == 0
    assert "item_stats: 100 rows" in capsys.readouterr().out
    assert gen.main([*argv[:4], "--views", "nope"]) == 1
    assert "unknown feature view 'nope'" in capsys.readouterr().err
