"""Predict and Rank: entity rows -> features -> matrix -> model scores, batched.

    scorer = Scorer(models, lookup, pipe, indexes)
    result = await scorer.predict("ranker", {"user_id": [7], "item_id": items})
    ranked = await scorer.rank("ranker", {"user_id": [7]}, candidate_ids=ids, top_n=20)

A call is checked and its Redis keys are built in the caller's task (so a bad call fails
alone), then it goes to its model's `MicroBatcher`, which runs it at once when the model
is idle and batches it with the calls it overlaps otherwise (with batching off, the call
runs the same two stages by itself):

    fetch   the keys of every call of the batch, every view: ONE MGET; the batch matrix
            gathered straight from the packed rows (matrix.gather); request and fill
            values (matrix.finish); a call missing a required input fails alone
    score   one model run on the inference thread, or on the event loop for a lone call
            within the inline budget (runtime.Model.inline); scores split back per call

Entity columns hold n values, or 1 to broadcast (a user scored against n items): a
group whose keys are all broadcast reads one row per view. Request-time inputs work the
same way. Per-stage seconds (`Timings`) travel with each call and go to Prometheus:
queue (waiting for the batcher, for the model, and the hop to the inference thread),
redis, decode (the gather), matrix (request and fill values), model (the ONNX Runtime
run), and the servicer adds serialization; fetch = redis + decode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from featurestore import metrics
from featurestore.decode import PRESENT
from featurestore.errors import DeadlineExceeded, InvalidArgument, MissingFeature, quote
from featurestore.inference.batching import MicroBatcher
from featurestore.inference.matrix import BatchMatrix, InputPlan, finish, gather
from featurestore.inference.models import (
    check_request_values,
)
from featurestore.inference.runtime import Model, ModelRegistry
from featurestore.limits import MAX_CANDIDATES, MAX_ROWS
from featurestore.lookup import Lookup
from featurestore.store.pipe import RedisPipe
from featurestore.tasks import cancel_all
from featurestore.types import Entities, Floats, Ids

__all__ = ["CandidateSource", "Ranked", "RequestColumn", "RequestColumns", "Retrieval", "Scored", "Scorer", "Timings"]

_STAGES = ("queue", "redis", "decode", "retrieval", "matrix", "model", "serialization", "total")


class RequestColumn(NamedTuple):
    """The values of one request-time input and the list they came in ("float",
    "int64" or "bool"), which must suit the input's declared type."""

    kind: str
    values: Sequence[Any]


RequestColumns = Mapping[str, RequestColumn | tuple[str, Sequence[Any]]]  # input name -> its values


class CandidateSource(Protocol):
    """Where Rank retrieves candidates (featurestore.retrieval.search.Candidates over the
    server's indexes); inference never imports retrieval."""

    async def nearest(
        self, view: str, *, query_vector: Floats | None, seed_ids: Ids | None, k: int, exclude_seeds: bool
    ) -> Ids:
        """The ids of the `k` entities of `view` nearest to `query_vector` or to the mean
        embedding of `seed_ids` (without the seeds when `exclude_seeds`)."""
        ...


@dataclass(frozen=True, slots=True)
class Retrieval:
    """Rank's candidates by retrieval: the `n_candidates` nearest neighbours in `view`
    (empty: the model's retrieval_view) of `query_vector`, or of the mean embedding of
    `seed_ids` (left out of the candidates with `exclude_seeds`)."""

    view: str = ""
    query_vector: Floats | None = None
    seed_ids: Ids | None = None
    n_candidates: int = 0
    exclude_seeds: bool = True


class Timings:
    """Seconds per stage of one call; `batch_*` describe the batch it was scored in."""

    __slots__ = (*_STAGES, "batch_requests", "batch_rows")

    def __init__(self) -> None:
        self.queue = self.redis = self.decode = self.retrieval = 0.0
        self.matrix = self.model = self.serialization = self.total = 0.0
        self.batch_requests = 1
        self.batch_rows = 0

    def as_dict(self) -> dict[str, float]:
        return {stage: getattr(self, stage) for stage in _STAGES}


@dataclass(frozen=True, slots=True)
class Scored:
    """Scores of one Predict call; `statuses` only for inputs with a row not PRESENT."""

    scores: npt.NDArray[np.float32]
    statuses: dict[str, bytes]
    version: str
    timings: Timings


@dataclass(frozen=True, slots=True)
class Ranked:
    """The top of a Rank call: ids and scores, best first."""

    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    candidates: int
    version: str
    timings: Timings


class _Call:
    """One call in flight: its checked input and, per group, its keys and row count."""

    __slots__ = (
        "counts",
        "dequeued",
        "enqueued",
        "entities",
        "future",
        "keys",
        "model",
        "plan",
        "request",
        "rows",
        "timings",
    )

    def __init__(
        self,
        model: Model,
        plan: InputPlan,
        rows: int,
        keys: list[tuple[list[bytes], int]],
        request: dict[int, npt.NDArray[np.float32]],
    ) -> None:
        self.model, self.plan = model, plan  # a batch holds calls of one model version
        self.entities: Entities = {}  # for error messages only
        self.rows = rows
        self.keys = keys  # per group: (row keys, 1 or rows)
        self.counts = [count for _, count in keys]  # per group: rows read, 1 or rows
        self.request = request  # matrix column -> values (1 or rows)
        self.future: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        self.timings = Timings()
        self.enqueued = self.dequeued = 0.0


class _Batch:
    """A fetched batch, ready for the model."""

    __slots__ = ("calls", "matrix", "missing", "model", "starts", "statuses")

    def __init__(
        self,
        model: Model,
        calls: Sequence[_Call],
        matrix: npt.NDArray[np.float32],
        statuses: npt.NDArray[np.uint8],
        starts: list[int],
    ) -> None:
        self.model, self.calls, self.matrix = model, calls, matrix
        self.statuses, self.starts = statuses, starts


class Scorer:
    """Predict and Rank for the models of a `ModelRegistry`.

    Parameters:
        models: the served models.
        lookup: plans and keys of feature reads (its registry is followed).
        pipe: the Redis connection batches read through (one MGET per batch).
        candidates: where Rank retrieves candidates by query vector or seed items
            (None: Rank takes candidate ids only).
    """

    def __init__(
        self,
        models: ModelRegistry,
        lookup: Lookup,
        pipe: RedisPipe,
        candidates: CandidateSource | None = None,
    ) -> None:
        self.models = models
        self._lookup, self._pipe, self._candidates = lookup, pipe, candidates
        self._plans: dict[str, tuple[Model, InputPlan]] = {}
        self._batchers: dict[str, tuple[Model, MicroBatcher[_Call, _Batch]]] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    async def predict(
        self,
        model_name: str,
        entities: Entities,
        request_values: RequestColumns | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Scored:
        """Score every entity row with `model_name`; see the module docstring.

        Raises NotFound (model), InvalidArgument (entities, request values, size),
        MissingFeature (a required input not PRESENT), ModelError, DeadlineExceeded.

        >>> await scorer.predict("ranker", {"user_id": [7], "item_id": [1, 2]})  # doctest: +SKIP
        """
        started = time.perf_counter()
        model = self.models.get(model_name)
        call = self._call(model, self._plan(model), entities, request_values or {})
        result = await self._submit(model, call, timeout_s)
        result.timings.total = time.perf_counter() - started
        return result

    async def rank(
        self,
        model_name: str,
        context: Entities,
        *,
        candidate_ids: Ids | None = None,
        retrieval: Retrieval | None = None,
        top_n: int = 10,
        request_values: RequestColumns | None = None,
        timeout_s: float | None = None,
    ) -> Ranked:
        """The `top_n` best candidates for `context` (e.g. {"user_id": [7]}).

        Candidates are `candidate_ids`, or what `retrieval` finds (see `Retrieval`).
        """
        started = time.perf_counter()
        model = self.models.get(model_name)
        key = model.spec.candidate_key
        if not key:
            raise InvalidArgument(f"model {model_name!r} declares no candidate_key: it cannot Rank")
        if top_n < 1:
            raise InvalidArgument(f"top_n={top_n}: ask for at least 1")
        if (candidate_ids is None) == (retrieval is None):
            raise InvalidArgument("send candidate_ids or retrieval")
        _check_context(context, key)
        retrieval_s = 0.0
        if retrieval is not None:
            t0 = time.perf_counter()
            candidate_ids = await self._retrieve(model, retrieval)
            retrieval_s = time.perf_counter() - t0
        assert candidate_ids is not None
        if not 1 <= candidate_ids.shape[0] <= MAX_CANDIDATES:
            raise InvalidArgument(f"{candidate_ids.shape[0]} candidates: send 1 to {MAX_CANDIDATES}")
        entities = {**context, key: candidate_ids.tolist()}
        scored = await self.predict(model_name, entities, request_values, timeout_s=timeout_s)
        order = np.argsort(-scored.scores, kind="stable")[:top_n]
        timings = scored.timings
        timings.retrieval = retrieval_s
        timings.total = time.perf_counter() - started
        return Ranked(
            candidate_ids[order],
            scored.scores[order],
            int(candidate_ids.shape[0]),
            scored.version,
            timings,
        )

    async def _retrieve(self, model: Model, retrieval: Retrieval) -> Ids:
        if self._candidates is None:
            raise InvalidArgument("this server has no retrieval indexes: send candidate_ids")
        view = retrieval.view or model.spec.retrieval_view
        if not view:
            raise InvalidArgument(f"model {model.spec.name!r} has no retrieval_view: name one")
        return await self._candidates.nearest(
            view,
            query_vector=retrieval.query_vector,
            seed_ids=retrieval.seed_ids,
            k=retrieval.n_candidates,
            exclude_seeds=retrieval.exclude_seeds,
        )

    def _plan(self, model: Model) -> InputPlan:
        cached = self._plans.get(model.spec.name)
        if cached is not None and cached[0] is model and not cached[1].stale(self._lookup):
            return cached[1]
        plan = InputPlan(model.spec, self._lookup)
        self._plans[model.spec.name] = (model, plan)
        return plan

    def _call(self, model: Model, plan: InputPlan, entities: Entities, values: RequestColumns) -> _Call:
        n = _row_count(entities, MAX_ROWS)
        extra = sorted(set(entities) - plan.join_keys)
        if extra:
            raise InvalidArgument(
                f"entity columns {extra} are not join keys of model"
                f" {plan.spec.name!r} (it takes {sorted(plan.join_keys)})"
            )
        keys = []
        for group in plan.groups:
            missing = [k for k in group.join_keys if k not in entities]
            if missing:
                raise InvalidArgument(f"model {plan.spec.name!r} needs entity column(s) {missing}")
            columns = {k: entities[k] for k in group.join_keys}
            broadcast = n > 1 and all(len(c) == 1 for c in columns.values())
            keys.append(self._lookup.row_keys(group.plan, columns))
            assert keys[-1][1] == (1 if broadcast else n)
        call = _Call(model, plan, n, keys, _request_columns(plan, values, n))
        call.entities = entities
        return call

    async def _submit(self, model: Model, call: _Call, timeout_s: float | None) -> Scored:
        batching = model.spec.batching
        try:
            async with asyncio.timeout(timeout_s):
                if not batching.enabled:
                    metrics.INFERENCE_UNBATCHED.inc()
                    call.enqueued = call.dequeued = time.perf_counter()
                    await self._score(await self._fetch([call]))
                    return await call.future
                scored: Scored = await self._batcher(model).submit(call)
                return scored
        except TimeoutError as exc:
            raise DeadlineExceeded(f"the caller's deadline passed while scoring with {model.spec.name!r}") from exc

    def _batcher(self, model: Model) -> MicroBatcher[_Call, _Batch]:
        """The batcher of this model version (batches never mix versions)."""
        entry = self._batchers.get(model.spec.name)
        if entry is None or entry[0] is not model:
            if entry is not None:  # a new version: the old batcher finishes its calls, then goes
                task = asyncio.create_task(entry[1].drain_and_close())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            config = model.spec.batching
            batcher: MicroBatcher[_Call, _Batch] = MicroBatcher(
                self._fetch,
                self._score,
                score_direct=self._score_direct,
                max_rows=config.max_rows,
                max_requests=config.max_requests,
                max_wait_us=config.max_wait_us,
            )
            entry = self._batchers[model.spec.name] = (model, batcher)
        return entry[1]

    async def close(self) -> None:
        """Stop every batcher; calls still waiting fail with Unavailable."""
        for _, batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()
        await cancel_all(self._retiring)
        await self._pipe.close()
        self.models.close()

    async def _fetch(self, calls: Sequence[_Call]) -> _Batch:
        """Stage 1: one MGET for every call and view; the batch matrix straight from the rows."""
        model, plan = calls[0].model, calls[0].plan
        t0 = time.perf_counter()
        rows = await self._lookup.read_rows(_batch_keys(plan, calls), pipe=self._pipe)
        t1 = time.perf_counter()
        gathered = gather(plan, calls, rows, time.time_ns() // 1000)
        t2 = time.perf_counter()
        batch = _finish(model, plan, calls, gathered)
        t3 = time.perf_counter()
        metrics.INFERENCE_REDIS.observe(t1 - t0)
        metrics.INFERENCE_DECODE.observe(t2 - t1)
        metrics.INFERENCE_FETCH.observe(t2 - t0)
        metrics.INFERENCE_MATRIX.observe(t3 - t2)
        for call in calls:
            tm = call.timings
            tm.queue = call.dequeued - call.enqueued
            tm.redis, tm.decode, tm.matrix = t1 - t0, t2 - t1, t3 - t2
            tm.batch_requests, tm.batch_rows = len(calls), batch.matrix.shape[0]
            call.enqueued = t3  # from here: waiting for the model counts as queue time
        return batch

    async def _score(self, batch: _Batch) -> None:
        """Stage 2: one model run on the inference thread; each call gets its rows' scores."""
        self._scored(batch, time.perf_counter(), *(await batch.model.timed_run(batch.matrix)))

    async def _score_direct(self, batch: _Batch) -> None:
        """Stage 2 of a lone call: a small run on the event loop itself (see Model.inline),
        else on the inference thread."""
        if batch.model.inline(batch.matrix.shape[0]):
            self._scored(batch, time.perf_counter(), *batch.model.timed_score(batch.matrix))
        else:
            await self._score(batch)

    def _scored(self, batch: _Batch, t0: float, scores: Floats, run_s: float) -> None:
        """Resolve the calls of a scored batch. The model stage is the run itself; the hop
        to the inference thread and back (and a wait behind other runs) counts as queue."""
        waited = time.perf_counter() - t0 - run_s
        metrics.INFERENCE_MODEL.observe(run_s)
        metrics.INFERENCE_BATCH_ROWS.observe(batch.matrix.shape[0])
        metrics.INFERENCE_BATCH_REQUESTS.observe(len(batch.calls))
        names = [c.ref for c in batch.model.spec.columns]
        for call, start in zip(batch.calls, batch.starts, strict=True):
            if call.future.done():
                continue
            end = start + call.rows
            tm = call.timings
            tm.queue += t0 - call.enqueued + waited
            tm.model = run_s
            metrics.INFERENCE_QUEUE.observe(tm.queue)
            call.future.set_result(
                Scored(
                    scores[start:end],
                    _statuses(batch.statuses[start:end], names),
                    batch.model.version,
                    tm,
                )
            )


def _check_context(context: Entities, candidate_key: str) -> None:
    """Rank scores ONE context against its candidates: every context column holds one value.

    (Two values against one candidate used to broadcast the candidate and fail on the
    ranking's indexes; three against three scored three contexts silently.)
    """
    if candidate_key in context:
        raise InvalidArgument(f"{candidate_key!r} is the candidate key: send it as candidates, not in the context")
    for name, values in context.items():
        if len(values) != 1:
            raise InvalidArgument(
                f"context (entities) column {quote(name)} holds {len(values)} values: Rank scores one context"
                " against its candidates, so send exactly one value per column"
            )


def _row_count(entities: Entities, limit: int) -> int:
    """The entity rows of a call: the length of its columns, which hold n values or 1 (broadcast)."""
    if not entities:
        raise InvalidArgument("no entity columns: send one column per join key, e.g. user_id")
    sizes = {k: len(v) for k, v in entities.items()}
    longest = max(sizes, key=sizes.__getitem__)
    n = sizes[longest]
    for name, size in sizes.items():
        if size == 0:
            raise InvalidArgument(f"entity column {quote(name)} is empty: send 1 value or one per row")
        if size not in (1, n):
            raise InvalidArgument(
                f"entity column {quote(name)} holds {size} values but {quote(longest)} holds {n}:"
                f" send {n} in every column, or 1 to broadcast"
            )
    if n > limit:
        raise InvalidArgument(f"{n} entity rows exceed the limit of {limit} per call: split it")
    return n


def _request_columns(plan: InputPlan, values: RequestColumns, n: int) -> dict[int, npt.NDArray[np.float32]]:
    by_name = {column.feature: (j, column) for j, column in plan.request}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise InvalidArgument(
            f"model {plan.spec.name!r} takes no request values {unknown} (it takes {sorted(by_name)})"
        )
    out = {}
    for name, (j, column) in by_name.items():
        if name not in values:
            if column.default is None:
                raise InvalidArgument(f"request value {name!r} is required by model {plan.spec.name!r}: send it")
            continue
        kind, given = values[name]
        check_request_values(column, given, kind)
        if len(given) not in (1, n):
            raise InvalidArgument(f"request value {name!r} holds {len(given)} values; send 1 or {n}")
        out[j] = np.asarray(given, dtype=np.float32)
    return out


def _batch_keys(plan: InputPlan, calls: Sequence[_Call]) -> list[bytes]:
    """The keys of a batch in the order `gather` reads them: per group, view after view,
    in each the calls' rows in order (a lone call's keys already are)."""
    if len(calls) == 1:
        mine = calls[0].keys
        return mine[0][0] if len(mine) == 1 else [key for group_keys, _ in mine for key in group_keys]
    out: list[bytes] = []
    for g, group in enumerate(plan.groups):
        for v in range(len(group.plan.view_names)):
            for call in calls:
                keys, n = call.keys[g]
                out += keys[v * n : (v + 1) * n]
    return out


def _finish(model: Model, plan: InputPlan, calls: Sequence[_Call], gathered: BatchMatrix) -> _Batch:
    """Request values and fill values; calls whose required inputs are missing fail here."""
    batch = finish(plan, calls, gathered)
    if plan.required.any():
        _fail_required(model, plan, calls, batch.starts, batch.missing)
    return _Batch(model, calls, batch.matrix, batch.statuses, batch.starts[:-1])


def _fail_required(
    model: Model,
    plan: InputPlan,
    calls: Sequence[_Call],
    starts: list[int],
    missing: npt.NDArray[np.bool_],
) -> None:
    bad = missing & plan.required
    for call, start in zip(calls, starts[:-1], strict=True):
        rows = bad[start : start + call.rows]
        if not rows.any() or call.future.done():
            continue
        row, j = (int(x) for x in np.argwhere(rows)[0])
        column = model.spec.columns[j]
        keys = next(g.join_keys for g in plan.groups if j in g.positions)
        entity = ", ".join(f"{k}={call.entities[k][row if len(call.entities[k]) > 1 else 0]!r}" for k in keys)
        call.future.set_exception(
            MissingFeature(
                f"model {model.spec.name!r} requires {column.ref}, but it is missing, null or"
                f" stale for {entity} (row {row} of the call;"
                f" {int(rows.any(axis=1).sum())} row(s) affected): materialize it or give it a"
                " fill value in models.yaml"
            )
        )


def _statuses(statuses: npt.NDArray[np.uint8], names: Sequence[str]) -> dict[str, bytes]:
    bad = np.flatnonzero((statuses != PRESENT).any(axis=0))
    return {names[j]: statuses[:, j].tobytes() for j in bad.tolist()}
