"""Train the demo rankers on the demo data and export them to ONNX.

    python feature_repo/train_model.py --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        [--models ranker ranker_mlp]

Reads each model's declaration from models.yaml (its inputs, in matrix order), the latest
row of every user and item from PostgreSQL (asyncpg; rows older than their view's TTL
count as missing, as the online store reports them), draws (user, item, hour) triples,
labels each with a synthetic click (a logistic function of plausible signals: item CTR
and rating, promotion, the user's CTR, a category the user just browsed, the user's
matching preference, price, the hour; plus noise) and trains on 80% of them:

    ranker            gradient-boosted trees (scikit-learn, 100 trees of depth 4)
    ranker_mlp        a small neural network: the three string inputs one-hot encoded,
                      the rest standardized, two ReLU layers (512, 256), inside the ONNX
                      graph, so the server sends it the same matrix as the trees
    ranker_mlp_int8   ranker_mlp with its weights quantized to int8 by ONNX Runtime's
                      dynamic quantization (activations quantized per batch at run time)

skl2onnx writes each to its models.yaml path (models/*.onnx); the held-out 20% gives each
file's AUC and log-loss, read back through ONNX Runtime, so the int8 copy's quality cost
is measured on the file the server loads. The same seed gives the same models.

Needs the `train` packages: scikit-learn, skl2onnx (which brings onnx), onnxruntime.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import numpy as np
import numpy.typing as npt

from featurestore.inference.models import InputColumn, ModelSpec, parse_models
from featurestore.registry import Registry, load_registry

HERE = Path(__file__).resolve().parent
Floats = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
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
    clicks: Labels = (rng.random(len(m)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    return clicks


def train_trees(spec: ModelSpec, matrix: Floats, labels: Labels, seed: int) -> Any:
    # Classic gradient boosting: skl2onnx converts it exactly (its converter for the
    # histogram variant fails on this scikit-learn's missing-value attributes).
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(
        n_estimators=100, max_depth=4, learning_rate=0.1, subsample=0.8, random_state=seed
    )
    return model.fit(matrix, labels)


def train_mlp(spec: ModelSpec, matrix: Floats, labels: Labels, seed: int) -> Any:
    """One-hot strings (their vocabulary indices, -1 for unknown), standardized numbers, an MLP."""
    from sklearn.compose import ColumnTransformer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    strings = [j for j, c in enumerate(spec.columns) if c.vocabulary is not None]
    categories = [np.arange(-1, len(spec.columns[j].vocabulary or {}), dtype=np.float32) for j in strings]
    encode = ColumnTransformer(
        [("strings", OneHotEncoder(categories=categories, handle_unknown="ignore"), strings)],
        remainder=StandardScaler(),
    )
    network = MLPClassifier(
        hidden_layer_sizes=(512, 256), batch_size=256, max_iter=60, early_stopping=True, random_state=seed
    )
    return make_pipeline(encode, network).fit(matrix, labels)


TRAINERS: dict[str, Callable[[ModelSpec, Floats, Labels, int], Any]] = {"ranker": train_trees, "ranker_mlp": train_mlp}
QUANTIZED = {"ranker_mlp_int8": "ranker_mlp"}  # an int8 copy of: the model it quantizes


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


def quantize(source: Path, path: Path) -> int:
    """An int8 copy of `source`: weights int8, activations quantized per batch at run time."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process does not apply to MLPs
    quantize_dynamic(source, path, weight_type=QuantType.QInt8)
    return path.stat().st_size


class Quality(NamedTuple):
    """How well a model file ranks held-out clicks."""

    auc: float
    log_loss: float


def evaluate(spec: ModelSpec, path: Path, matrix: Floats, labels: Labels) -> Quality:
    """AUC and log-loss of the ONNX file at `path` (as ONNX Runtime runs it) on `matrix`."""
    import onnxruntime as ort
    from sklearn.metrics import log_loss, roc_auc_score

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output = spec.output or session.get_outputs()[-1].name
    clicks = np.asarray(session.run([output], {session.get_inputs()[0].name: matrix})[0])[:, spec.output_column]
    clicks = np.clip(clicks.astype(np.float64), 1e-7, 1 - 1e-7)
    return Quality(float(roc_auc_score(labels, clicks)), float(log_loss(labels, clicks)))


async def dataset(dsn: str, registry: Registry, spec: ModelSpec, samples: int, seed: int) -> tuple[Floats, Labels]:
    """`samples` labelled rows of `spec`'s matrix from the demo data at `dsn`, shuffled."""
    views = sorted({c.view for c in spec.columns if not c.is_request})
    rows = await latest_rows(dsn, registry, views, datetime.now(UTC))
    rng = np.random.default_rng(seed)
    user_ids = np.array(sorted({i for v in views if "user" in v for i in rows[v]}))
    item_ids = np.array(sorted({i for v in views if "item" in v for i in rows[v]}))
    users = rng.choice(user_ids, samples)
    items = rng.choice(item_ids, samples)
    hours = rng.integers(0, 24, samples)
    matrix = build(spec, rows, users, items, hours)
    return matrix, click_labels(spec, matrix, rng)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", required=True, help="PostgreSQL holding the demo data")
    parser.add_argument("--repo", type=Path, default=HERE)
    parser.add_argument("--models", nargs="+", default=[*TRAINERS], choices=[*TRAINERS], help="what to train")
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    registry = load_registry(args.repo)
    specs = parse_models(args.repo / "models.yaml", registry)
    for name in args.models:
        started = time.perf_counter()
        spec = specs[name]
        matrix, labels = asyncio.run(dataset(args.dsn, registry, spec, args.samples, args.seed))
        split = int(0.8 * args.samples)
        model = TRAINERS[name](spec, matrix[:split], labels[:split], args.seed)
        size = export(model, spec.width, spec.path)
        held_out = matrix[split:], labels[split:]
        quality = evaluate(spec, spec.path, *held_out)
        print(
            f"{spec.name}: {spec.width} inputs, {args.samples} samples, click rate {labels.mean():.3f};"
            f" held-out AUC {quality.auc:.4f}, log-loss {quality.log_loss:.4f};"
            f" wrote {spec.path} ({size:,} bytes) in {time.perf_counter() - started:.1f} s"
        )
        for copy, of in QUANTIZED.items():
            if of == name and copy in specs:
                size = quantize(spec.path, specs[copy].path)
                int8 = evaluate(specs[copy], specs[copy].path, *held_out)
                print(
                    f"{copy}: held-out AUC {int8.auc:.4f} ({int8.auc - quality.auc:+.4f} against fp32),"
                    f" log-loss {int8.log_loss:.4f} ({int8.log_loss - quality.log_loss:+.4f});"
                    f" wrote {specs[copy].path} ({size:,} bytes)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
