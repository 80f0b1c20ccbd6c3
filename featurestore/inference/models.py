"""Model declarations: `models.yaml` next to the Feast repo, parsed into `ModelSpec`s.

    specs = parse_models(repo / "models.yaml", registry)   # name -> ModelSpec

`models.yaml` (paths relative to it):

    models:
      ranker:
        path: models/ranker.onnx
        features: ranking_v1          # a feature service, a view, or a list of refs
        request: {hour_of_day: int64} # request-time inputs (float32, int64 or bool)
        vocabularies: {item_stats:category: [books, electronics]}
        fill: {default: 0.0, item_stats:price: required, user_profile:age: 35}
        output: probabilities         # ONNX output read (default: the last one)
        output_column: 1              # of a 2-D output
        batching: {enabled: true, max_rows: 4096, max_requests: 64, max_wait_us: 0}
        candidate_key: item_id        # Rank: the join key candidates are ids of
        retrieval_view: item_embedding
        intra_op_threads: 2           # ONNX Runtime threads (default: --model-threads)

The input matrix is float32, one column per input in a fixed order: the features in the
order the references resolve (`Registry.resolve`), then the request-time inputs. Numbers
and bools are cast; a string feature becomes its index in its declared vocabulary (-1
when not in it). A view or service reference skips the string features that have no
vocabulary; a `view:feature` reference to one is a configuration error; lists are not
model inputs. A value that is not PRESENT (missing, null or older than its view's TTL)
takes its fill value, or, for a `required` input, fails the request with
FAILED_PRECONDITION naming the feature and the entity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from featurestore.errors import ConfigError, FeatureStoreError, InvalidArgument
from featurestore.registry import Registry
from featurestore.store.layout import DType

__all__ = [
    "BatchingConfig",
    "InputColumn",
    "ModelSpec",
    "check_request_values",
    "parse_models",
]

log = logging.getLogger(__name__)


REQUEST = "request"  # the pseudo-view of request-time inputs: "request:hour_of_day"
_REQUEST_TYPES = {"float32": DType.FLOAT32, "int64": DType.INT64, "bool": DType.BOOL}
_NUMERIC = (
    DType.INT32,
    DType.INT64,
    DType.FLOAT32,
    DType.FLOAT64,
    DType.BOOL,
    DType.UNIX_TIMESTAMP,
)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """How concurrent calls of one model are coalesced (see featurestore.inference.batching).

    enabled: False scores every call on its own. max_rows / max_requests: a batch closes
    at either. max_wait_us: how long an open batch waits for more calls once the model
    is free (0: take whatever is queued, never wait when idle).
    """

    enabled: bool = True
    max_rows: int = 4096
    max_requests: int = 64
    max_wait_us: int = 0


@dataclass(frozen=True, slots=True)
class InputColumn:
    """One column of the input matrix.

    ref: "view:feature" or "request:name". default: the fill value, None if required.
    vocabulary: string -> index, for string features only.
    """

    ref: str
    view: str
    feature: str
    dtype: DType
    default: float | None
    vocabulary: Mapping[bytes, int] | None = None

    @property
    def is_request(self) -> bool:
        return self.view == REQUEST


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model as declared in models.yaml, with its inputs resolved against the registry."""

    name: str
    path: Path
    columns: tuple[InputColumn, ...]
    output: str | None = None
    output_column: int = 1
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    candidate_key: str = ""
    retrieval_view: str = ""
    intra_op_threads: int | None = None  # None: the server's --model-threads

    @property
    def width(self) -> int:
        return len(self.columns)


def parse_models(path: Path, registry: Registry) -> dict[str, ModelSpec]:
    """Read models.yaml at `path` (none there: no models); raises ConfigError naming the fault."""
    if not path.exists():
        return {}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
        entries = doc.get("models") or {}
        if not isinstance(entries, dict):
            raise TypeError("'models' must map model names to their settings")
        return {name: _spec(name, entry, path.parent, registry) for name, entry in entries.items()}
    except ConfigError:
        raise
    except (OSError, yaml.YAMLError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{path}: {type(exc).__name__}: {exc}") from exc


def _spec(name: str, entry: dict[str, Any], base: Path, registry: Registry) -> ModelSpec:
    refs = entry["features"]
    refs = [refs] if isinstance(refs, str) else list(refs)
    fill = dict(entry.get("fill") or {})
    fallback = fill.pop("default", 0.0)
    vocabularies = {k: [str(v) for v in vs] for k, vs in (entry.get("vocabularies") or {}).items()}
    columns = []
    try:
        selections = registry.resolve(refs)
    except FeatureStoreError as exc:
        raise ConfigError(f"model {name!r}: features {refs}: {exc}") from exc
    explicit = {r for r in refs if ":" in r}
    for sel in selections:
        specs = {f.name: f for f in sel.view.layout.features}
        for feature in sel.features:
            ref, dtype = f"{sel.view.name}:{feature}", specs[feature].dtype
            vocab = vocabularies.pop(ref, None)
            if dtype not in _NUMERIC and not (dtype is DType.STRING and vocab is not None):
                if ref in explicit:
                    raise ConfigError(
                        f"model {name!r}: input {ref} is {dtype.value}; numbers, bools and"
                        " strings with a vocabulary (vocabularies:) can be model inputs"
                    )
                continue
            columns.append(_column(name, ref, sel.view.name, feature, dtype, fill, fallback, vocab))
    for key, type_name in (entry.get("request") or {}).items():
        if type_name not in _REQUEST_TYPES:
            raise ConfigError(
                f"model {name!r}: request input {key!r} has type {type_name!r}; use one of {sorted(_REQUEST_TYPES)}"
            )
        ref = f"{REQUEST}:{key}"
        columns.append(_column(name, ref, REQUEST, key, _REQUEST_TYPES[type_name], fill, fallback, None))
    unused = sorted(set(fill) | set(vocabularies))
    if unused:
        raise ConfigError(f"model {name!r}: fill/vocabularies name inputs it has not: {unused}")
    batching = BatchingConfig(**(entry.get("batching") or {}))
    if batching.max_rows < 1 or batching.max_requests < 1 or batching.max_wait_us < 0:
        raise ConfigError(f"model {name!r}: bad batching settings {batching}")
    return ModelSpec(
        name=name,
        path=(base / entry["path"]).resolve(),
        columns=tuple(columns),
        output=entry.get("output"),
        output_column=int(entry.get("output_column", 1)),
        batching=batching,
        candidate_key=entry.get("candidate_key", ""),
        retrieval_view=entry.get("retrieval_view", ""),
        intra_op_threads=_threads(name, entry.get("intra_op_threads")),
    )


def _threads(model: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ConfigError(f"model {model!r}: intra_op_threads is {value!r}; an integer from 1 to 256")
    return value


def _column(
    model: str,
    ref: str,
    view: str,
    feature: str,
    dtype: DType,
    fill: dict[str, Any],
    fallback: Any,
    vocab: list[str] | None,
) -> InputColumn:
    value = fill.pop(ref, fallback)
    if value == "required":
        default = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        default = float(value)
    else:
        raise ConfigError(f"model {model!r}: fill for {ref} is {value!r}; a number or 'required'")
    mapping = None if vocab is None else {v.encode(): i for i, v in enumerate(vocab)}
    return InputColumn(ref, view, feature, dtype, default, mapping)


def check_request_values(column: InputColumn, values: Sequence[Any], kind: str) -> None:
    """Raise InvalidArgument unless request values of `kind` suit `column`'s type."""
    wanted = {DType.FLOAT32: "float", DType.INT64: "int64", DType.BOOL: "bool"}[column.dtype]
    if kind != wanted:
        raise InvalidArgument(
            f"request value {column.feature!r} was sent as {kind}, but the model takes"
            f" {wanted}: send it in {wanted}_values"
        )
