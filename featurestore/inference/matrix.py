"""From lookup columns to a model's float32 input matrix, without a loop over values.

    plan = InputPlan(spec, lookup)                   # once per model and registry
    group = plan.groups[0]                           # inputs that share join keys
    values, statuses = group.decode(lookup_result)   # (rows, inputs of the group)
    batch = assemble(plan, calls, decoded)           # the matrix of a batch of calls

A model's feature inputs are split by join keys (user_id, item_id, ...): each group is one
`RequestPlan` of the lookup, so a call with one user and 100 items reads 1 + 100 rows per
view, not 100 + 100, and the user's row is broadcast. Columns of one element type are
joined and read with a single `np.frombuffer`, then cast into their matrix columns; a
string column maps through its vocabulary (one dict lookup per row: strings are rare
inputs). Statuses come out as (rows, inputs) uint8, the lookup's FieldStatus numbers.

A batch stacks the rows of several calls; a call whose group was read once (a broadcast
user) has that row repeated by one numpy gather, and request-time values are copied in
per call. Inputs that are not PRESENT take their fill values (`fill_missing`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from featurestore.decode import NOT_FOUND, PRESENT, LookupResult, RequestPlan
from featurestore.inference.models import InputColumn, ModelSpec
from featurestore.lookup import Lookup
from featurestore.store.layout import DType
from featurestore.types import Floats, Statuses

__all__ = ["BatchMatrix", "BatchPart", "InputGroup", "InputPlan", "assemble", "fill_missing"]


class InputGroup:
    """The feature inputs of a model that share one tuple of join keys.

    `positions[k]` is the matrix column of the group's k-th input; `numeric` joins the
    plan columns of one element type; `strings` lists (plan column, k, vocabulary).
    """

    __slots__ = ("join_keys", "numeric", "plan", "plan_columns", "positions", "strings")

    def __init__(self, join_keys: tuple[str, ...], members: Sequence[tuple[int, InputColumn]], lookup: Lookup) -> None:
        self.join_keys = join_keys
        refs = [c.ref for _, c in members]
        self.plan: RequestPlan = lookup.plan(refs, full_feature_names=True)
        index = {c.name: i for i, c in enumerate(self.plan.columns)}
        self.plan_columns = [index[f"{c.view}__{c.feature}"] for _, c in members]
        self.positions = np.array([j for j, _ in members], dtype=np.intp)
        by_type: dict[np.dtype[Any], tuple[list[int], list[int]]] = {}
        self.strings: list[tuple[int, int, dict[bytes, int]]] = []
        for k, ((_, column), plan_col) in enumerate(zip(members, self.plan_columns, strict=True)):
            if column.dtype is DType.STRING:
                assert column.vocabulary is not None  # parse_models allows no other
                self.strings.append((plan_col, k, dict(column.vocabulary)))
                continue
            element = column.dtype.element
            assert element is not None
            cols, ks = by_type.setdefault(element, ([], []))
            cols.append(plan_col)
            ks.append(k)
        self.numeric = [(dt, cols, np.array(ks, dtype=np.intp)) for dt, (cols, ks) in by_type.items()]

    def decode(self, result: LookupResult) -> tuple[Floats, Statuses]:
        """The group's values (rows, inputs) as float32 and their statuses (rows, inputs)."""
        n = result.rows
        values = np.empty((n, len(self.plan_columns)), dtype=np.float32)
        for element, cols, ks in self.numeric:
            raw = result.values[cols[0]] if len(cols) == 1 else b"".join([result.values[c] for c in cols])
            values[:, ks] = np.frombuffer(raw, dtype=element).reshape(len(cols), n).T
        for col, k, vocab in self.strings:
            data, offsets = result.values[col], np.frombuffer(result.offsets[col], dtype="<i4")
            bounds = offsets.tolist()
            values[:, k] = [vocab.get(data[bounds[i] : bounds[i + 1]], -1) for i in range(n)]
        statuses = (
            np.frombuffer(b"".join([result.statuses[c] for c in self.plan_columns]), dtype=np.uint8)
            .reshape(len(self.plan_columns), n)
            .T
        )
        return values, statuses


class InputPlan:
    """How to build a model's matrix: its feature groups and its request-time columns.

    Built for the registry the lookup serves; `stale()` tells when it changed.
    """

    __slots__ = ("defaults", "fingerprint", "groups", "join_keys", "request", "required", "spec")

    def __init__(self, spec: ModelSpec, lookup: Lookup) -> None:
        self.spec = spec
        self.fingerprint = lookup.registry.fingerprint
        registry = lookup.registry
        members: dict[tuple[str, ...], list[tuple[int, InputColumn]]] = {}
        self.request: list[tuple[int, InputColumn]] = []
        for j, column in enumerate(spec.columns):
            if column.is_request:
                self.request.append((j, column))
                continue
            keys = tuple(k.name for k in registry.view(column.view).join_keys)
            members.setdefault(keys, []).append((j, column))
        self.groups = [InputGroup(keys, m, lookup) for keys, m in members.items()]
        self.join_keys = frozenset(k for g in self.groups for k in g.join_keys)
        self.defaults = np.array([0.0 if c.default is None else c.default for c in spec.columns], dtype=np.float32)
        self.required = np.array([c.default is None for c in spec.columns], dtype=np.bool_)

    def stale(self, lookup: Lookup) -> bool:
        return lookup.registry.fingerprint != self.fingerprint


def fill_missing(matrix: Floats, statuses: Statuses, defaults: Floats) -> npt.NDArray[np.bool_]:
    """Put each column's fill value where its status is not PRESENT; returns that mask."""
    missing: npt.NDArray[np.bool_] = statuses != PRESENT
    np.copyto(matrix, defaults, where=missing)
    return missing


class BatchPart(Protocol):
    """One call's share of a batch: its row count, the rows read per input group (1: a
    broadcast row, or `rows`), and its request-time values by matrix column (1 or `rows`)."""

    @property
    def rows(self) -> int: ...

    @property
    def counts(self) -> Sequence[int]: ...

    @property
    def request(self) -> Mapping[int, Floats]: ...


class BatchMatrix(NamedTuple):
    """The model input of a batch: `matrix` and `statuses` (rows, inputs); call i owns rows
    starts[i]:starts[i + 1]; `missing` marks the cells that took their fill value."""

    matrix: Floats
    statuses: Statuses
    starts: list[int]
    missing: npt.NDArray[np.bool_]


def assemble(plan: InputPlan, parts: Sequence[BatchPart], decoded: Sequence[tuple[Floats, Statuses]]) -> BatchMatrix:
    """Stack the calls `parts` into one matrix from each input group's decoded values and
    statuses (`InputGroup.decode` of the batch's rows, calls in order), add the request
    values and fill what is not PRESENT."""
    starts: list[int] = np.cumsum([0] + [p.rows for p in parts]).tolist()
    total = starts[-1]
    matrix = np.empty((total, plan.spec.width), dtype=np.float32)
    statuses = np.full((total, plan.spec.width), PRESENT, dtype=np.uint8)
    for g, (values, group_statuses) in enumerate(decoded):
        gather = _gather(parts, g)
        positions = plan.groups[g].positions
        if gather is None:
            matrix[:, positions] = values
            statuses[:, positions] = group_statuses
        else:
            matrix[:, positions] = values[gather]
            statuses[:, positions] = group_statuses[gather]
    for j, _ in plan.request:
        for part, start in zip(parts, starts[:-1], strict=True):
            given = part.request.get(j)
            if given is None:
                statuses[start : start + part.rows, j] = NOT_FOUND
            else:
                matrix[start : start + part.rows, j] = given
    missing = fill_missing(matrix, statuses, plan.defaults)
    return BatchMatrix(matrix, statuses, starts, missing)


def _gather(parts: Sequence[BatchPart], g: int) -> npt.NDArray[np.intp] | None:
    """Row of the group's decoded values for every batch row (None: the identity)."""
    if all(part.counts[g] == part.rows for part in parts):
        return None
    pieces, at = [], 0
    for part in parts:
        count = part.counts[g]
        pieces.append(
            np.full(part.rows, at, dtype=np.intp)
            if count == 1 and part.rows > 1
            else np.arange(at, at + count, dtype=np.intp)
        )
        at += count
    return np.concatenate(pieces)
