"""Requests and results of the Predict and Rank calls, for featurestore.client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.errors import InvalidArgument

__all__ = ["Prediction", "Ranking", "predict_request", "prediction", "rank_request", "ranking"]

RequestValues = Mapping[str, Sequence[float] | Sequence[int] | Sequence[bool] | npt.NDArray[Any]]


class Prediction(NamedTuple):
    """The result of `predict`: one score per entity row.

    statuses: input name ("view:feature" or "request:name") -> one Feast FieldStatus byte
        per row, for the inputs that were not PRESENT in some row (filled by the model's
        declared default).
    breakdown: stage -> microseconds (queue, redis, decode, matrix, model, ...), when asked.
    """

    scores: npt.NDArray[np.float32]
    statuses: dict[str, npt.NDArray[np.uint8]]
    model_version: str
    breakdown: dict[str, float] | None


class Ranking(NamedTuple):
    """The result of `rank`: the best `top_n` candidate ids, best first, and their scores."""

    ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    candidate_count: int
    model_version: str
    breakdown: dict[str, float] | None


def _entity_columns(entities: Mapping[str, Any]) -> list[pb.EntityColumn]:
    columns = []
    for name, values in entities.items():
        items = values.tolist() if isinstance(values, np.ndarray) else list(values)
        if items and isinstance(items[0], str):
            columns.append(pb.EntityColumn(name=name, string_values=items))
        else:
            columns.append(pb.EntityColumn(name=name, int64_values=items))
    return columns


def _request_columns(values: RequestValues | None) -> list[pb.RequestColumn]:
    columns = []
    for name, column in (values or {}).items():
        array = np.asarray(column)
        if array.dtype.kind == "b":
            columns.append(pb.RequestColumn(name=name, bool_values=array.tolist()))
        elif array.dtype.kind in "iu":
            columns.append(pb.RequestColumn(name=name, int64_values=array.tolist()))
        elif array.dtype.kind == "f":
            columns.append(pb.RequestColumn(name=name, float_values=array.tolist()))
        else:
            raise InvalidArgument(f"request value {name!r} has type {array.dtype}: send floats, ints or bools")
    return columns


def predict_request(
    model: str, entities: Mapping[str, Any], request_values: RequestValues | None, breakdown: bool
) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model,
        entities=_entity_columns(entities),
        request_values=_request_columns(request_values),
        return_breakdown=breakdown,
    )


def rank_request(
    model: str,
    context: Mapping[str, Any],
    candidate_ids: Any,
    query_vector: Any,
    seed_ids: Any,
    n_candidates: int,
    top_n: int,
    request_values: RequestValues | None,
    breakdown: bool,
) -> pb.RankRequest:
    given = sum(x is not None for x in (candidate_ids, query_vector, seed_ids))
    if given != 1:
        raise InvalidArgument("pass exactly one of candidate_ids=, query_vector= and seed_ids=")
    request = pb.RankRequest(
        model=model,
        entities=_entity_columns(context),
        top_n=top_n,
        request_values=_request_columns(request_values),
        return_breakdown=breakdown,
    )
    if candidate_ids is not None:
        request.candidate_ids = np.asarray(candidate_ids, dtype="<i8").tobytes()
    elif query_vector is not None:
        vector = np.asarray(query_vector, dtype="<f4").ravel()
        request.retrieval.CopyFrom(pb.Retrieval(query_vector=vector.tobytes(), n_candidates=n_candidates))
    else:
        seeds = np.asarray(seed_ids, dtype="<i8").tobytes()
        request.retrieval.CopyFrom(pb.Retrieval(seed_ids=seeds, n_candidates=n_candidates))
    return request


def _breakdown(message: Any) -> dict[str, float] | None:
    if not message.HasField("breakdown"):
        return None
    return {field.name: float(value) for field, value in message.breakdown.ListFields()}


def prediction(response: pb.PredictResponse) -> Prediction:
    statuses = {s.input: np.frombuffer(s.statuses, dtype=np.uint8) for s in response.statuses}
    scores = np.frombuffer(response.scores, dtype="<f4")
    return Prediction(scores, statuses, response.model_version, _breakdown(response))


def ranking(response: pb.RankResponse) -> Ranking:
    return Ranking(
        np.frombuffer(response.ids, dtype="<i8"),
        np.frombuffer(response.scores, dtype="<f4"),
        response.candidate_count,
        response.model_version,
        _breakdown(response),
    )
