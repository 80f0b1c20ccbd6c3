"""The ONNX Runtime stage: loaded models, run off the event loop, swapped while serving.

    models = ModelRegistry(repo / "models.yaml", registry, intra_op_threads=1, poll_s=1.0)
    await models.load_all()                       # at start-up; then watches the files
    model = models.get("ranker")                  # NotFound for an unknown name
    scores = await model.run(matrix)              # off the event loop, float32 (rows,)
    await models.reload()                         # new versions load beside, then swap
    models.close()

Versions: a model's version is the start of its file's SHA-256, and every Predict and Rank
response names the version that answered. A new version (its file replaced, or its
models.yaml entry changed) is loaded into a fresh session on a loader thread, beside the
serving one and never on the inference thread, so calls in flight are not held up; it is
checked (input width, one test row) and warmed up (a batch of `WARM_ROWS` rows: the first
run of a session allocates its buffers), and only then does one reference assignment make
it the serving version. Calls already holding the old model finish with it. A file that
fails any step never replaces a working model, and is not tried again until it changes.

Noticing: `load_all` starts a watcher that every `poll_s` seconds compares the size and
modification time of models.yaml and of every declared model file with what it saw (a few
stat calls, microseconds); a change that holds still for one more poll triggers `reload`
(so a file still being written is not loaded half-way; replacing it by a rename is best).
`reload` also runs with the server's registry refresh.

Where a model runs: batches on the one inference thread that all models share (ONNX
Runtime releases the GIL, so the event loop fetches the next batch meanwhile); a lone
call whose run is expected to take at most INLINE_BUDGET_S on the event loop itself
(`Model.inline`), which saves the hop to that thread and back.

Threads: each session runs its operators on `intra_op_threads` threads (the settings'
`--model-threads`, or the model's `intra_op_threads` in models.yaml); ONNX Runtime would
otherwise start one per core in every session and fight the event loop and the other
server processes for them.

Per model, Prometheus shows its version, input width, threads, a memory estimate (how
much the process grew while the session loaded and warmed up, at least the file's size;
the first model loaded also carries ONNX Runtime's own start-up: 12 MB for the demo trees
loaded first, 5 MB for the fp32 MLP, 2.5 MB for the int8 one), its run time and the CPU
time its runs took (featurestore/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from featurestore import metrics
from featurestore.errors import ConfigError, ModelError, NotFound
from featurestore.inference.models import ModelSpec, parse_models
from featurestore.registry import Registry
from featurestore.tasks import cancel_all

__all__ = ["INLINE_BUDGET_S", "WARM_ROWS", "Model", "ModelInfo", "ModelRegistry", "providers", "session_options"]

log = logging.getLogger(__name__)

WARM_ROWS = 256  # the warm-up batch of a new session: a few hundred rows, as Predict and Rank send
# The longest model run a lone call does on the event loop itself: the hop to the inference
# thread and back costs ~0.2 ms at the median in the server on this 2-core VM (more at the
# tail), about the run of the demo trees for 100 rows; longer runs leave the loop free.
INLINE_BUDGET_S = 0.001


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Options for a serving session: `intra_op_threads` threads, sequential, every graph
    optimisation, no spinning (an idle session must not burn a core).

    >>> session_options(1).intra_op_num_threads
    1
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


class ModelInfo(NamedTuple):
    """What a served model costs: its version, input width, intra-op threads, estimated
    memory (bytes), file size (bytes) and how long it took to load (seconds)."""

    name: str
    version: str
    width: int
    threads: int
    memory_bytes: int
    file_bytes: int
    load_s: float


class Model:
    """A loaded, checked, warmed-up model: its spec, ONNX Runtime session and version.

    `run` scores a float32 matrix on the registry's executor, off the event loop.
    """

    __slots__ = (
        "_cpu",
        "_executor",
        "_input",
        "_output",
        "_run_seconds",
        "info",
        "row_s",
        "session",
        "spec",
        "version",
    )

    def __init__(self, spec: ModelSpec, executor: ThreadPoolExecutor, intra_op_threads: int = 1) -> None:
        """Load, check and warm up `spec.path` (blocking: call from a worker thread).

        `intra_op_threads` applies unless the spec sets its own.
        """
        self.spec = spec
        self._executor = executor
        threads = spec.intra_op_threads or intra_op_threads
        started, rss_before = time.perf_counter(), _rss_bytes()
        try:
            blob = spec.path.read_bytes()
            self.version = hashlib.sha256(blob).hexdigest()[:12]
            self.session = ort.InferenceSession(blob, sess_options=session_options(threads), providers=providers())
        except Exception as exc:  # ORT raises its own (Fail, InvalidProtobuf, ...) types
            raise ConfigError(f"model {spec.name!r}: cannot load {spec.path}: {exc}") from exc
        self._input, self._output = self._check_signature()
        self._run_seconds = metrics.MODEL_RUN_SECONDS.labels(spec.name)
        self._cpu = metrics.MODEL_CPU_SECONDS.labels(spec.name)
        self.row_s = 0.0  # seconds per row of a run, a moving average: what running inline would cost
        self.score(np.zeros((1, spec.width), dtype=np.float32))  # the check: one row scores
        self.row_s = 0.0  # seeded by the warm-up, not by the one row's fixed costs
        try:  # the warm-up; a model that cannot take a batch fails its calls, as it would anyway
            for _ in range(2):
                self.score(np.zeros((WARM_ROWS, spec.width), dtype=np.float32))
        except ModelError as exc:
            log.warning("model %r: the warm-up with %d rows failed: %s", spec.name, WARM_ROWS, exc)
        memory = max(_rss_bytes() - rss_before, len(blob))
        self.info = ModelInfo(
            spec.name, self.version, spec.width, threads, memory, len(blob), time.perf_counter() - started
        )

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
        return self.timed_score(matrix)[0]

    def timed_score(self, matrix: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], float]:
        """`score`, and how many seconds ONNX Runtime took."""
        cpu, started = time.thread_time(), time.perf_counter()
        try:
            out = np.asarray(self.session.run([self._output], {self._input: matrix})[0])
        except Exception as exc:
            raise ModelError(f"model {self.spec.name!r} failed at run time: {exc}") from exc
        finally:
            run_s = time.perf_counter() - started
            self._run_seconds.observe(run_s)
            self._cpu.inc(time.thread_time() - cpu)
        rows = matrix.shape[0]
        self.row_s = run_s / rows if not self.row_s else 0.9 * self.row_s + 0.1 * run_s / rows
        if out.ndim == 2 and out.shape[1] > 1:
            out = out[:, self.spec.output_column]
        scores = out.reshape(-1).astype(np.float32, copy=False)
        if scores.shape[0] != rows:
            raise ModelError(f"model {self.spec.name!r} returned {scores.shape[0]} scores for {rows} rows")
        return scores, run_s

    def inline(self, rows: int) -> bool:
        """Whether a lone call of `rows` rows runs on the event loop: when the run is
        expected (by the model's measured cost per row) to block it for at most
        INLINE_BUDGET_S, which the saved hop to the inference thread pays for."""
        return rows * self.row_s <= INLINE_BUDGET_S

    async def run(self, matrix: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """`score` on the inference thread (ONNX Runtime releases the GIL)."""
        return (await self.timed_run(matrix))[0]

    async def timed_run(self, matrix: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], float]:
        """`timed_score` on the inference thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.timed_score, matrix)


class ModelRegistry:
    """The models of one server, loaded from models.yaml; replaced while serving.

    Parameters:
        path: the models.yaml file (absent: no models).
        registry: the compiled Feast registry the inputs resolve against.
        executor: where models run (default: one inference thread of its own).
        intra_op_threads: ONNX Runtime threads per session, unless models.yaml sets them.
        poll_s: seconds between checks of the files for changes (0: only `reload`).
    """

    def __init__(
        self,
        path: Path,
        registry: Registry,
        executor: ThreadPoolExecutor | None = None,
        *,
        intra_op_threads: int = 1,
        poll_s: float = 1.0,
    ) -> None:
        self.path = path
        self.registry = registry
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.intra_op_threads = intra_op_threads
        self.poll_s = poll_s
        self._models: dict[str, Model] = {}
        self._failed: dict[str, str] = {}  # models that never loaded: name -> why
        self._lock = asyncio.Lock()  # one reload at a time (the watcher's, the server's)
        self._watcher: asyncio.Task[None] | None = None
        self._seen: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) at the last reload
        self.swaps = 0  # versions swapped in after the first load

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

    def describe(self) -> list[ModelInfo]:
        """Each serving model's version, width, threads and memory estimate, by name."""
        return [self._models[name].info for name in sorted(self._models)]

    async def load_all(self) -> dict[str, str]:
        """Load every declared model (see `reload`), then watch the files every `poll_s`."""
        outcome = await self.reload()
        if self.poll_s > 0 and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())
        return outcome

    async def reload(self, registry: Registry | None = None) -> dict[str, str]:
        """Re-read models.yaml and load what changed; returns name -> what happened.

        Outcomes: "loaded <version>", "unchanged", "failed: <why>" (the serving version,
        if any, stays). Models no longer declared are dropped.
        """
        async with self._lock:
            if registry is not None:
                self.registry = registry
            self._seen = await asyncio.to_thread(self._stat_all)
            specs = await asyncio.to_thread(parse_models, self.path, self.registry)
            outcome = {}
            for spec in specs.values():
                try:
                    outcome[spec.name] = await self._load_if_changed(spec)
                except ConfigError as exc:
                    log.error("%s; still serving %s", exc, self._serving(spec.name))
                    if spec.name not in self._models:
                        self._failed[spec.name] = str(exc)
                    metrics.MODEL_LOADS.labels(spec.name, "failed").inc()
                    outcome[spec.name] = f"failed: {exc}"
            for gone in set(self._models) - set(specs):
                _unpublish(self._models.pop(gone), dropped=True)
                metrics.MODEL_LOADS.labels(gone, "removed").inc()
                outcome[gone] = "removed"
            for gone in set(self._failed) - set(specs):
                del self._failed[gone]
            return outcome

    async def put(self, spec: ModelSpec) -> Model:
        """Load `spec` beside the serving version and swap it in; ConfigError keeps the old."""
        model = await asyncio.to_thread(Model, spec, self.executor, self.intra_op_threads)
        old = self._models.get(spec.name)
        self._models[spec.name] = model  # one reference assignment: calls in flight keep theirs
        self._failed.pop(spec.name, None)
        if old is not None:
            self.swaps += 1
            _unpublish(old)
        _publish(model)
        metrics.MODEL_LOADS.labels(spec.name, "loaded").inc()
        log.info(
            "model %s version %s serving (%d inputs, %d threads, ~%d KiB, loaded in %.0f ms)",
            spec.name,
            model.version,
            model.info.width,
            model.info.threads,
            model.info.memory_bytes >> 10,
            model.info.load_s * 1e3,
        )
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

    def _files(self) -> set[Path]:
        """models.yaml and every model file it declared at the last reload."""
        files = {self.path, *(m.spec.path for m in self._models.values())}
        with contextlib.suppress(ConfigError):
            files |= {spec.path for spec in parse_models(self.path, self.registry).values()}
        return files

    def _stat_all(self) -> dict[Path, tuple[int, int]]:
        return {path: _stat(path) for path in self._files()}

    async def _watch(self) -> None:
        """Reload once a watched file changed and then held still for one poll."""
        pending: dict[Path, tuple[int, int]] | None = None
        while True:
            await asyncio.sleep(self.poll_s)
            now = {path: _stat(path) for path in self._seen}  # a few stat calls: microseconds
            if now == self._seen:
                pending = None
                continue
            if now != pending:  # changed since the last poll: let it settle
                pending = now
                continue
            pending = None
            try:
                outcome = await self.reload()
            except ConfigError as exc:  # a broken models.yaml: keep serving, wait for the next change
                log.error("%s; still serving the models loaded before", exc)
                self._seen = now
                continue
            except Exception:  # the watcher must outlive any surprise
                log.exception("model reload failed; still serving the models loaded before")
                self._seen = now
                continue
            log.info("models changed on disk: %s", outcome)

    def close(self) -> None:
        """Stop watching and release the inference thread."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        for model in self._models.values():
            _unpublish(model, dropped=True)
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """`close`, waiting for the watcher to stop."""
        if self._watcher is not None:
            await cancel_all([self._watcher])
            self._watcher = None
        self.close()


def _publish(model: Model) -> None:
    info = model.info
    metrics.MODEL_INFO.labels(info.name, info.version).set(1)
    metrics.MODEL_INPUT_WIDTH.labels(info.name).set(info.width)
    metrics.MODEL_THREADS.labels(info.name).set(info.threads)
    metrics.MODEL_MEMORY_BYTES.labels(info.name).set(info.memory_bytes)


def _unpublish(model: Model, dropped: bool = False) -> None:
    """A replaced version's info series drops to 0 (and, when `dropped`, the model's
    gauges too): series are never removed, which multi-process Prometheus cannot do."""
    metrics.MODEL_INFO.labels(model.info.name, model.info.version).set(0)
    if dropped:
        for gauge in (metrics.MODEL_INPUT_WIDTH, metrics.MODEL_THREADS, metrics.MODEL_MEMORY_BYTES):
            gauge.labels(model.info.name).set(0)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _rss_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere, and the estimate falls back to the file size)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return ""
