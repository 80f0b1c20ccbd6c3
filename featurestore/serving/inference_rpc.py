"""Predict and Rank between protobuf and `scoring.Scorer`: translation only.

The servicer in server.py hands both calls here; every check lives in `Scorer`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from grpc import aio

from featurestore import metrics
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.errors import InvalidArgument
from featurestore.inference.runtime import ModelRegistry
from featurestore.inference.scoring import RequestValues, Scorer, Timings
from featurestore.lookup import Lookup
from featurestore.registry import Registry
from featurestore.retrieval.indexes import ViewIndexes
from featurestore.retrieval.search import ids_from_bytes
from featurestore.serving import wire
from featurestore.store.pipe import RedisPipe

__all__ = ["InferenceRpc"]


class InferenceRpc:
    """Handles Predict and Rank for a `Scorer`; errors raise (the interceptor maps them)."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    @classmethod
    async def start(
        cls,
        models_path: Path,
        registry: Registry,
        lookup: Lookup,
        redis_url: str,
        redis_timeout_s: float,
        indexes: ViewIndexes | None,
    ) -> InferenceRpc:
        """Load the models declared in `models_path` (a model that fails is logged, not served).

        Batches read through a pipelined Redis connection of their own.
        """
        models = ModelRegistry(models_path, registry)
        await models.load_all()
        pipe = RedisPipe.from_url(redis_url, timeout_s=redis_timeout_s)
        return cls(Scorer(models, lookup, pipe, indexes))

    async def reload(self, registry: Registry | None = None) -> dict[str, str]:
        """Re-read the models file: changed models load beside the serving ones and swap in."""
        return await self.scorer.models.reload(registry)

    async def close(self) -> None:
        await self.scorer.close()

    async def predict(self, request: pb.PredictRequest, context: aio.ServicerContext[Any, Any]) -> pb.PredictResponse:
        result = await self.scorer.predict(
            request.model,
            wire.entities(request.entities),
            _request_values(request.request_values),
            timeout_s=context.time_remaining(),
        )
        start = time.perf_counter()
        response = pb.PredictResponse(
            row_count=result.scores.shape[0],
            scores=result.scores.astype("<f4").tobytes(),
            statuses=[pb.InputStatuses(input=k, statuses=v) for k, v in result.statuses.items()],
            model_version=result.version,
        )
        _finish(response, result.timings, start, request.return_breakdown)
        return response

    async def rank(self, request: pb.RankRequest, context: aio.ServicerContext[Any, Any]) -> pb.RankResponse:
        which = request.WhichOneof("candidates")
        if which is None:
            raise InvalidArgument("send candidate_ids or retrieval")
        kw: dict[str, Any] = {}
        if which == "candidate_ids":
            kw["candidate_ids"] = ids_from_bytes(request.candidate_ids, "candidate_ids")
        else:
            r = request.retrieval
            if r.WhichOneof("query") == "query_vector":
                if len(r.query_vector) % 4:
                    raise InvalidArgument("query_vector must be packed float32 (4 bytes each)")
                kw["query_vector"] = np.frombuffer(r.query_vector, dtype="<f4")
            elif r.WhichOneof("query") == "seed_ids":
                kw["seed_ids"] = ids_from_bytes(r.seed_ids, "seed_ids")
            kw.update(retrieval_view=r.view, n_candidates=r.n_candidates, exclude_seeds=not r.keep_seeds)
        result = await self.scorer.rank(
            request.model,
            wire.entities(request.entities),
            top_n=request.top_n,
            request_values=_request_values(request.request_values),
            timeout_s=context.time_remaining(),
            **kw,
        )
        start = time.perf_counter()
        response = pb.RankResponse(
            ids=result.ids.astype("<i8").tobytes(),
            scores=result.scores.astype("<f4").tobytes(),
            candidate_count=result.candidates,
            model_version=result.version,
        )
        _finish(response, result.timings, start, request.return_breakdown)
        return response


def _finish(response: Any, timings: Timings, start: float, breakdown: bool) -> None:
    end = time.perf_counter()
    timings.serialization = end - start
    timings.total += end - start
    metrics.INFERENCE_SERIALIZATION.observe(timings.serialization)
    metrics.INFERENCE_TOTAL.observe(timings.total)
    if timings.retrieval:
        metrics.INFERENCE_RETRIEVAL.observe(timings.retrieval)
    if breakdown:
        us = {f"{k}_us": v * 1e6 for k, v in timings.as_dict().items()}
        response.breakdown.CopyFrom(
            pb.LatencyBreakdown(batch_requests=timings.batch_requests, batch_rows=timings.batch_rows, **us)
        )


def _request_values(columns: Sequence[pb.RequestColumn]) -> RequestValues:
    out: dict[str, tuple[str, Sequence[Any]]] = {}
    for column in columns:
        if column.name in out:
            raise InvalidArgument(f"request value {column.name!r} is sent twice")
        lists = [
            (kind, values)
            for kind, values in (
                ("float", column.float_values),
                ("int64", column.int64_values),
                ("bool", column.bool_values),
            )
            if values
        ]
        if len(lists) != 1:
            raise InvalidArgument(
                f"request value {column.name!r} must set exactly one of float_values,"
                f" int64_values and bool_values (it sets {len(lists)})"
            )
        out[column.name] = lists[0]
    return out
