"""Train the demo ranker on the demo data and export it to ONNX.

    python feature_repo/train_model.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Reads the model's declaration from models.yaml (its inputs, in matrix order), the latest
row of every user and item from PostgreSQL (asyncpg; rows older than their view's TTL
count as missing, as the online store reports them), draws (user, item, hour) triples,
labels each with a synthetic click (a logistic function of plausible signals: item CTR
and rating, promotion, the user's CTR, a category the user just browsed, the user's
matching preference, price, the hour; plus noise), fits a gradient-boosted tree ensemble
(scikit-learn, 100 trees of depth 4) and writes it with skl2onnx to the model's path
(models/ranker.onnx).
The same seed gives the same model.

Needs the `train` packages: scikit-learn, skl2onnx (which brings onnx).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from featurestore.inference.models import InputColumn, ModelSpec, parse_models
from featurestore.registry import Registry, load_registry

HERE = Path(__file__).resolve().parent
# item category -> the user preference that makes it attractive
_PREFERENCE = {
    "sports": "pref_sports",
    "music": "pref_music",
    "movies": "pref_movies",
    "games": "pref_games",
    "electronics": "pref_tech",
    "fashion": "pref_fashion",
    "grocery": "pref_food",
    "books": "pref_news",
}


async def latest_rows(
    dsn: str, registry: Registry, views: Sequence[str], now: datetime
) -> dict[str, dict[int, dict[str, Any]]]:
    """view -> entity id -> its newest row (absent if older than the view's TTL)."""
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for name in views:
            view = registry.view(name)
            key = view.join_keys[0].name
            rows = await conn.fetch(
                f'SELECT DISTINCT ON ("{key}") * FROM "{view.table}"'
                f' ORDER BY "{key}", "{view.timestamp_field}" DESC, "created" DESC'
            )
            fresh = {}
            for row in rows:
                age_s = (now - row[view.timestamp_field]).total_seconds()
                if not view.ttl_s or age_s <= view.ttl_s:
                    fresh[row[key]] = dict(row)
            out[name] = fresh
        return out
    finally:
        await conn.close()


def value(column: InputColumn, row: dict[str, Any] | None) -> float:
    """One matrix cell as the server builds it: fill when missing, vocabulary for strings."""
    raw = None if row is None else row.get(column.feature)
    if raw is None:
        return 0.0 if column.default is None else column.default
    if column.vocabulary is not None:
        return float(column.vocabulary.get(str(raw).encode(), -1))
    return float(np.float32(raw))


def build(
    spec: ModelSpec, rows: dict[str, dict[int, dict[str, Any]]], users: Any, items: Any, hours: Any
) -> npt.NDArray[np.float32]:
    matrix = np.empty((len(users), spec.width), dtype=np.float32)
    for j, column in enumerate(spec.columns):
        if column.is_request:
            matrix[:, j] = hours
            continue
        ids = users if "user" in column.view else items
        table = rows[column.view]
        matrix[:, j] = [value(column, table.get(int(i))) for i in ids]
    return matrix


def click_labels(spec: ModelSpec, m: npt.NDArray[np.float32], rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Synthetic clicks, plausibly driven by the features (and 0.6 logits of noise)."""
    col = {c.ref: j for j, c in enumerate(spec.columns)}

    def f(ref: str) -> npt.NDArray[np.float32]:
        return m[:, col[ref]]

    categories = list(spec.columns[col["item_stats:category"]].vocabulary or {})
    pref = np.zeros(len(m), dtype=np.float32)
    for k, name in enumerate(categories):
        if name.decode() in _PREFERENCE:
            hit = f("item_stats:category") == k
            pref[hit] = f(f"user_profile:{_PREFERENCE[name.decode()]}")[hit]
    logit = (
        -2.2
        + 6.0 * f("item_stats:ctr_7d")
        + 0.5 * (f("item_stats:rating_avg") - 3.0)
        + 0.7 * f("item_stats:is_promoted")
        + 4.0 * f("user_activity:ctr_24h")
        + 1.2 * (f("user_activity:last_category") == f("item_stats:category"))
        + 2.0 * pref
        - 0.25 * np.log1p(f("item_stats:price"))
        + 0.3 * np.cos((f("request:hour_of_day") - 20.0) / 24.0 * 2 * np.pi)
        + 0.4 * f("user_profile:is_premium")
        + rng.normal(0.0, 0.6, len(m))
    )
    return (rng.random(len(m)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)


def train(matrix: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], seed: int) -> Any:
    # Classic gradient boosting: skl2onnx converts it exactly (its converter for the
    # histogram variant fails on this scikit-learn's missing-value attributes).
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(
        n_estimators=100, max_depth=4, learning_rate=0.1, subsample=0.8, random_state=seed
    )
    return model.fit(matrix, labels)


def export(model: Any, width: int, path: Path) -> int:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(
        model,
        initial_types=[("features", FloatTensorType([None, width]))],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    blob: bytes = onx.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return len(blob)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", required=True, help="PostgreSQL holding the demo data")
    parser.add_argument("--repo", type=Path, default=HERE)
    parser.add_argument("--model", default="ranker")
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    registry = load_registry(args.repo)
    spec = parse_models(args.repo / "models.yaml", registry)[args.model]
    views = sorted({c.view for c in spec.columns if not c.is_request})
    rows = asyncio.run(latest_rows(args.dsn, registry, views, datetime.now(UTC)))
    rng = np.random.default_rng(args.seed)
    user_ids = np.array(sorted({i for v in views if "user" in v for i in rows[v]}))
    item_ids = np.array(sorted({i for v in views if "item" in v for i in rows[v]}))
    users = rng.choice(user_ids, args.samples)
    items = rng.choice(item_ids, args.samples)
    hours = rng.integers(0, 24, args.samples)
    matrix = build(spec, rows, users, items, hours)
    labels = click_labels(spec, matrix, rng)
    split = int(0.8 * args.samples)
    model = train(matrix[:split], labels[:split], args.seed)
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(labels[split:], model.predict_proba(matrix[split:])[:, 1])
    size = export(model, spec.width, spec.path)
    print(
        f"{spec.name}: {spec.width} inputs from {len(views)} views, {args.samples} samples,"
        f" click rate {labels.mean():.3f}, held-out AUC {auc:.3f};"
        f" wrote {spec.path} ({size:,} bytes) in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
