"""Embedded inference: models declared next to the Feast repo, run by ONNX Runtime.

    models = ModelRegistry(repo / "models.yaml", registry)
    await models.load_all()                       # at start-up
    model = models.get("ranker")                  # NotFound for an unknown name
    scores = await model.run(matrix)              # off the event loop, float32 (rows,)
    await models.reload()                         # new versions load beside, then swap

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

The input matrix is float32, one column per input in a fixed order: the features in the
order the references resolve (`Registry.resolve`), then the request-time inputs. Numbers
and bools are cast; a string feature becomes its index in its declared vocabulary (-1
when not in it). A view or service reference skips the string features that have no
vocabulary; a `view:feature` reference to one is a configuration error; lists are not
model inputs. A value that is not PRESENT (missing, null or older than its view's TTL)
takes its fill value, or, for a `required` input, fails the request with
FAILED_PRECONDITION naming the feature and the entity.

Versions: a model's version is the start of its file's SHA-256. `reload`/`put` load the
new file into a fresh session beside the serving one, check it (input width, one test
row) and only then swap the reference; a file that fails any step never replaces a
working model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import yaml

from featurestore.errors import ConfigError, FeatureStoreError, InvalidArgument, NotFound
from featurestore.registry import Registry
from featurestore.store.layout import DType

__all__ = [
    "BatchingConfig",
    "InputColumn",
    "MissingFeature",
    "Model",
    "ModelError",
    "ModelRegistry",
    "ModelSpec",
    "check_request_values",
    "parse_models",
    "providers",
    "session_options",
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


class MissingFeature(FeatureStoreError):
    """A `required` model input is missing, null or stale for an entity."""

    status = ConfigError.status  # FAILED_PRECONDITION: the data, not the request, is wrong


class ModelError(FeatureStoreError):
    """The model raised while scoring (INTERNAL, with ONNX Runtime's message)."""


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """How concurrent calls of one model are coalesced (see featurestore.batching).

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
    intra_op_threads: int = 1

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
                f"model {name!r}: request input {key!r} has type {type_name!r};"
                f" use one of {sorted(_REQUEST_TYPES)}"
            )
        ref = f"{REQUEST}:{key}"
        columns.append(
            _column(name, ref, REQUEST, key, _REQUEST_TYPES[type_name], fill, fallback, None)
        )
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
        intra_op_threads=int(entry.get("intra_op_threads", 1)),
    )


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


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options for a serving session: few threads, sequential, every graph optimisation.

    One intra-op thread per server process suits a small box: the processes (and the
    event loop) already use the cores; more threads only contend.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers() -> list[str]:
    """CUDA first when this onnxruntime build reports it, the CPU always."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Model:
    """A loaded, checked model: its spec, ONNX Runtime session and version.

    `run` scores a float32 matrix on the registry's executor, off the event loop.
    """

    __slots__ = ("_executor", "_input", "_output", "session", "spec", "version")

    def __init__(self, spec: ModelSpec, executor: ThreadPoolExecutor) -> None:
        """Load and check `spec.path` (blocking: call from a worker thread)."""
        self.spec = spec
        self._executor = executor
        try:
            blob = spec.path.read_bytes()
            self.version = hashlib.sha256(blob).hexdigest()[:12]
            self.session = ort.InferenceSession(
                blob, sess_options=session_options(spec.intra_op_threads), providers=providers()
            )
        except Exception as exc:  # ORT raises its own (Fail, InvalidProtobuf, ...) types
            raise ConfigError(f"model {spec.name!r}: cannot load {spec.path}: {exc}") from exc
        self._input, self._output = self._check_signature()
        self.score(np.zeros((1, spec.width), dtype=np.float32))

    def _check_signature(self) -> tuple[str, str]:
        spec, inputs = self.spec, self.session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"model {spec.name!r} takes {len(inputs)} inputs; one matrix wanted")
        shape = inputs[0].shape
        width = shape[-1] if len(shape) == 2 else None
        if isinstance(width, int) and width != spec.width:
            raise ConfigError(
                f"model {spec.name!r} ({spec.path.name}) takes {width} columns, but models.yaml"
                f" gives it {spec.width}: retrain it or fix its features"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        output = spec.output or outputs[-1]
        if output not in outputs:
            raise ConfigError(f"model {spec.name!r} has no output {output!r}; it has {outputs}")
        return inputs[0].name, output

    def score(self, matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Scores of the rows of `matrix`, on the calling thread; ModelError if the model raises."""
        try:
            out = np.asarray(self.session.run([self._output], {self._input: matrix})[0])
        except Exception as exc:
            raise ModelError(f"model {self.spec.name!r} failed at run time: {exc}") from exc
        if out.ndim == 2 and out.shape[1] > 1:
            out = out[:, self.spec.output_column]
        scores = out.reshape(-1).astype(np.float32, copy=False)
        if scores.shape[0] != matrix.shape[0]:
            raise ModelError(
                f"model {self.spec.name!r} returned {scores.shape[0]} scores for"
                f" {matrix.shape[0]} rows"
            )
        return scores

    async def run(self, matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """`score` on the inference thread (ONNX Runtime releases the GIL)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.score, matrix)


class ModelRegistry:
    """The models of one server, loaded from models.yaml; replaced while serving.

    Parameters:
        path: the models.yaml file (absent: no models).
        registry: the compiled Feast registry the inputs resolve against.
        executor: where sessions load and run (default: one thread of its own).
    """

    def __init__(
        self, path: Path, registry: Registry, executor: ThreadPoolExecutor | None = None
    ) -> None:
        self.path = path
        self.registry = registry
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._models: dict[str, Model] = {}
        self._failed: dict[str, str] = {}  # models that never loaded: name -> why

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def get(self, name: str) -> Model:
        """The serving model called `name`; NotFound (or ConfigError if it failed to load)."""
        model = self._models.get(name)
        if model is not None:
            return model
        if name in self._failed:
            raise ConfigError(
                f"model {name!r} is declared but failed to load: {self._failed[name]}"
            )
        known = ", ".join(sorted(self._models)) or "none"
        raise NotFound(f"unknown model {name!r}; models served: {known}")

    async def load_all(self) -> dict[str, str]:
        """Load every declared model; see `reload` (the same, at start-up)."""
        return await self.reload()

    async def reload(self, registry: Registry | None = None) -> dict[str, str]:
        """Re-read models.yaml and load what changed; returns name -> what happened.

        Outcomes: "loaded <version>", "unchanged", "failed: <why>" (the serving version,
        if any, stays). Models no longer declared are dropped.
        """
        if registry is not None:
            self.registry = registry
        specs = await asyncio.to_thread(parse_models, self.path, self.registry)
        outcome = {}
        for spec in specs.values():
            try:
                outcome[spec.name] = await self._load_if_changed(spec)
            except ConfigError as exc:
                log.error("%s; still serving %s", exc, self._serving(spec.name))
                if spec.name not in self._models:
                    self._failed[spec.name] = str(exc)
                outcome[spec.name] = f"failed: {exc}"
        for gone in set(self._models) - set(specs):
            del self._models[gone]
            outcome[gone] = "removed"
        return outcome

    async def put(self, spec: ModelSpec) -> Model:
        """Load `spec` beside the serving version and swap it in; ConfigError keeps the old."""
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(self.executor, Model, spec, self.executor)
        self._models[spec.name] = model  # one reference assignment: calls in flight keep theirs
        self._failed.pop(spec.name, None)
        log.info("model %s version %s serving", spec.name, model.version)
        return model

    async def _load_if_changed(self, spec: ModelSpec) -> str:
        current = self._models.get(spec.name)
        if current is not None and current.spec == spec:
            digest = await asyncio.to_thread(_digest, spec.path)
            if digest == current.version:
                return "unchanged"
        return f"loaded {(await self.put(spec)).version}"

    def _serving(self, name: str) -> str:
        model = self._models.get(name)
        return f"version {model.version}" if model else "nothing under that name"

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


def check_request_values(column: InputColumn, values: Sequence[Any], kind: str) -> None:
    """Raise InvalidArgument unless request values of `kind` suit `column`'s type."""
    wanted = {DType.FLOAT32: "float", DType.INT64: "int64", DType.BOOL: "bool"}[column.dtype]
    if kind != wanted:
        raise InvalidArgument(
            f"request value {column.feature!r} was sent as {kind}, but the model takes"
            f" {wanted}: send it in {wanted}_values"
        )
