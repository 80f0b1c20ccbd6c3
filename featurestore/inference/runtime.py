"""The ONNX Runtime stage: loaded models, run off the event loop, swapped while serving.

    models = ModelRegistry(repo / "models.yaml", registry)
    await models.load_all()                       # at start-up
    model = models.get("ranker")                  # NotFound for an unknown name
    scores = await model.run(matrix)              # off the event loop, float32 (rows,)
    await models.reload()                         # new versions load beside, then swap

Versions: a model's version is the start of its file's SHA-256. `reload`/`put` load the
new file into a fresh session beside the serving one, check it (input width, one test
row) and only then swap the reference; a file that fails any step never replaces a
working model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from featurestore.errors import ConfigError, ModelError, NotFound
from featurestore.inference.models import ModelSpec, parse_models
from featurestore.registry import Registry

__all__ = ["Model", "ModelRegistry", "providers", "session_options"]

log = logging.getLogger(__name__)


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
            raise ModelError(f"model {self.spec.name!r} returned {scores.shape[0]} scores for {matrix.shape[0]} rows")
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

    def __init__(self, path: Path, registry: Registry, executor: ThreadPoolExecutor | None = None) -> None:
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
            raise ConfigError(f"model {name!r} is declared but failed to load: {self._failed[name]}")
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
