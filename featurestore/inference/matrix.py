"""From packed Redis rows straight to a model's float32 input matrix, in one gather.

    plan = InputPlan(spec, lookup)                  # once per model and registry
    batch = gather(plan, parts, rows, now_us)       # the feature inputs of a batch of calls
    batch = finish(plan, parts, batch)              # request values, fill values

A model's feature inputs are split by join keys (user_id, item_id, ...): each group is one
`RequestPlan` of the lookup, so a call with one user and 100 items reads 1 + 100 rows per
view, not 100 + 100. `rows` is the batch's MGET reply: group after group, in each view
after view, in each the calls' rows in order.

Why not the lookup's decode: `featurestore.decode` turns rows into wire columns (bytes per
feature, statuses and timestamps for every column); a model wants none of that, only its
inputs as float32 in matrix order. So the reply is joined into one buffer, and ONE fancy
index reads, for every row of the batch, every byte the model needs from the rows it
reads (each view's header, the null bytes of its inputs, its fixed-width inputs grouped by
element type): a (batch rows, bytes) array from which each element type is a view cast
into its matrix columns. A broadcast row (one user scored against 100 items) is simply
read at each batch row. The per-feature arrays and the stacking of the older path are
gone: on the demo ranker (66 inputs, 1 user x 100 items) the matrix costs about a third
of what decode + assembly did (README, Predict and Rank).

Statuses are Feast's FieldStatus numbers, as the lookup reports them: NOT_FOUND (no row,
a row too short for its layout, or written under another format or schema: its bytes are
never trusted), OUTSIDE_MAX_AGE (older than the view's TTL), NULL_VALUE (its null bit),
else PRESENT. Values read from a row that is not PRESENT are garbage by design (padding
keeps every read inside the buffer); `finish` replaces them with the input's fill value.
String inputs map through their vocabularies without a loop over rows: each view's
variable-width lengths are walked for all rows at once, then the first W bytes of every
value (W = the longest word), prefixed with the input's number, are looked up in the
sorted words of all vocabularies (`np.searchsorted`); a value not in its input's
vocabulary becomes -1.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from featurestore.decode import NOT_FOUND, OUTSIDE_MAX_AGE, PRESENT, RequestPlan
from featurestore.inference.models import InputColumn, ModelSpec
from featurestore.lookup import Lookup
from featurestore.store.layout import FORMAT_VERSION, HEADER_SIZE, DType, Layout
from featurestore.types import Floats, Statuses

__all__ = ["BatchMatrix", "BatchPart", "InputGroup", "InputPlan", "fill_missing", "finish", "gather"]

Rows = Sequence[bytes | None]
Index = npt.NDArray[np.intp]
_NO_TTL_US = 1 << 62  # a view without TTL: no row is ever that old
_FEW_STRINGS = 8  # up to this many string values in a view, a Python loop beats numpy's fixed costs
_FEW_ROWS = 4  # up to this many rows of a view, struct.unpack_from beats a numpy cast


class InputGroup:
    """The feature inputs of a model that share one tuple of join keys: their lookup plan
    (which views, hence which Redis keys) and their matrix columns.

    `block` is the slice of matrix columns they fill when those are contiguous (the
    usual case: a feature service lists a view's features together), else None.
    """

    __slots__ = ("block", "join_keys", "members", "plan", "positions")

    def __init__(self, join_keys: tuple[str, ...], members: Sequence[tuple[int, InputColumn]], lookup: Lookup) -> None:
        self.join_keys = join_keys
        self.members = list(members)
        self.plan: RequestPlan = lookup.plan([c.ref for _, c in members], full_feature_names=True)
        self.positions = np.array([j for j, _ in members], dtype=np.intp)
        first = int(self.positions[0])
        contiguous = self.positions.tolist() == list(range(first, first + len(members)))
        self.block = slice(first, first + len(members)) if contiguous else None


class _View:
    """How a model reads one view's rows: the inputs as fields of the row's prefix (cast
    to float32 in one `astype`), their null bits, and their string values to look up.

    `columns` are the inputs' places among their group's inputs (a slice if contiguous).
    """

    __slots__ = (
        "bitmap_size",
        "bits",
        "cast",
        "columns",
        "group",
        "pick",
        "prefix",
        "row",
        "row_places",
        "strings",
        "walk",
    )

    def __init__(self, group: int, layout: Layout, members: Sequence[tuple[int, InputColumn]]) -> None:
        """`members`: (place among the group's inputs, input) of the inputs this view holds."""
        self.group = group
        self.prefix = layout.prefix_size
        self.bitmap_size = layout.bitmap_size
        names, formats, offsets = [], [], []
        var_names = [f.name for f in layout.var_features]
        self.strings: list[tuple[int, int, _Vocabulary]] = []  # (field k, var index, vocabulary)
        for k, (_, column) in enumerate(members):
            names.append(f"c{k}")
            if column.dtype is DType.STRING:
                assert column.vocabulary is not None  # parse_models allows no other
                formats.append(np.dtype("u1"))  # a placeholder: the vocabulary index replaces it
                offsets.append(0)
                self.strings.append((k, var_names.index(column.feature), _Vocabulary(column.vocabulary)))
            else:
                element, offset = _field(layout, column.feature)
                formats.append(element)
                offsets.append(offset)
        self.pick = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": self.prefix})
        self.row, self.row_places = _row_struct(
            [(offset, k, element) for k, (offset, element) in enumerate(zip(offsets, formats, strict=True))],
            {k for k, _, _ in self.strings},
        )
        self.cast = np.dtype({"names": names, "formats": [np.float32] * len(names)})
        self.bits = np.array([layout.names.index(c.feature) for _, c in members], dtype=np.intp)
        self.walk = max([var + 1 for _, var, _ in self.strings], default=0)
        places = [k for k, _ in members]
        contiguous = places == list(range(places[0], places[0] + len(places)))
        self.columns: slice | Index = (
            slice(places[0], places[0] + len(places)) if contiguous else np.array(places, dtype=np.intp)
        )

    def read(self, blob: bytes, starts: Index, ends: Index, found: npt.NDArray[np.bool_], out: Floats) -> None:
        """The view's inputs of the rows at `starts` into `out`'s `columns`."""
        if len(starts) <= _FEW_ROWS and self.row is not None:  # a broadcast user: struct beats numpy
            values = np.empty((len(starts), len(self.bits)), dtype=np.float32)
            for i, start in enumerate(starts.tolist()):
                values[i, self.row_places] = self.row.unpack_from(blob, start)
        else:
            prefixes = _items(blob, self.prefix)[starts]
            values = prefixes.view(self.pick).astype(self.cast).view(np.float32).reshape(len(starts), -1)
        if self.strings:
            self._strings(blob, starts, ends, found, values)
        out[:, self.columns] = values

    def _strings(self, blob: bytes, starts: Index, ends: Index, found: npt.NDArray[np.bool_], values: Floats) -> None:
        if len(starts) * len(self.strings) <= _FEW_STRINGS:
            for i, (start, end, ok) in enumerate(zip(starts.tolist(), ends.tolist(), found.tolist(), strict=True)):
                if ok:
                    words = _walk(blob, start + self.prefix, end, self.walk)
                    for k, var, vocabulary in self.strings:
                        values[i, k] = vocabulary.map.get(words[var], -1)
            return
        items4 = _items(blob, 4)
        pos, data, lengths = starts + self.prefix, [], []
        for step in range(self.walk):
            # A row that is not PRESENT reads nothing; a length past the row's end is cut.
            length = np.where(found, items4[pos].view("<u4").astype(np.intp), 0)
            np.clip(length, 0, np.maximum(ends - pos - 4, 0), out=length)
            data.append(pos + 4)
            lengths.append(length)
            if step + 1 < self.walk:
                pos = pos + 4 + length
        for k, var, vocabulary in self.strings:
            values[:, k] = vocabulary.lookup(blob, data[var], lengths[var])


_STRUCT_CODES = {"i4": "i", "i8": "q", "f4": "f", "f8": "d", "b1": "?"}


def _row_struct(fields: Sequence[tuple[int, int, np.dtype[Any]]], skip: set[int]) -> tuple[struct.Struct | None, Index]:
    """A struct reading the numeric fields (offset, place, type) of one row in one call, and
    the places its values go to; None when two inputs share a field."""
    numeric = sorted((offset, k, element) for offset, k, element in fields if k not in skip)
    text, at = "<", 0
    for offset, _, element in numeric:
        if offset < at:
            return None, np.zeros(0, dtype=np.intp)
        text += "x" * (offset - at) + _STRUCT_CODES[element.kind + str(element.itemsize)]
        at = offset + element.itemsize
    return struct.Struct(text), np.array([k for _, k, _ in numeric], dtype=np.intp)


def _walk(blob: bytes, pos: int, end: int, count: int) -> list[bytes]:
    """The first `count` variable-width values of one row, from `pos`; cut at `end`."""
    out = []
    for _ in range(count):
        length = min(int.from_bytes(blob[pos : pos + 4], "little"), max(end - pos - 4, 0))
        out.append(blob[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return out


class _Vocabulary:
    """A string input's vocabulary: a dict for a few values, and for many a sorted table of
    keys (the word's length as one byte, then the word, zero-padded to the longest) for
    `np.searchsorted`; the length byte keeps "US" and "US\\x00" apart."""

    __slots__ = ("index", "keys", "map", "masks", "width")

    def __init__(self, vocabulary: Mapping[bytes, int]) -> None:
        self.map = dict(vocabulary)
        self.width = width = max([1, *(len(word) for word in vocabulary)])
        table = sorted((bytes([len(word)]) + word, index) for word, index in vocabulary.items() if len(word) < 255)
        table.append((b"\xff" * (width + 1), -1))  # past every key: searchsorted stays in the table
        self.keys = np.array([key for key, _ in table], dtype=f"S{width + 1}")
        self.index = np.array([index for _, index in table], dtype=np.float32)
        # masks[n]: keeps the first n bytes of a value read `width` bytes wide
        self.masks = (np.arange(width)[None, :] < np.arange(width + 1)[:, None]).astype(np.uint8) * 255

    def lookup(self, blob: bytes, starts: Index, lengths: Index) -> Floats:
        """The index of each value (`lengths[i]` bytes at `starts[i]` in `blob`), -1 if unknown."""
        width = self.width
        keys = np.empty((len(starts), width + 1), dtype=np.uint8)
        keys[:, 0] = np.minimum(lengths, width + 1)  # longer than every word: matches none
        np.bitwise_and(
            _items(blob, width)[starts].view(np.uint8).reshape(-1, width),
            self.masks[np.minimum(lengths, width)],
            out=keys[:, 1:],
        )
        found = keys.view(f"S{width + 1}").reshape(-1)
        at = np.searchsorted(self.keys, found)
        return np.where(self.keys[at] == found, self.index[at], np.float32(-1))


class InputPlan:
    """How to build a model's matrix: its feature groups, how to read each of their views'
    rows, and its request-time columns. Built for the registry the lookup serves; `stale()`
    tells when it changed. Views are numbered across groups in reply order.
    """

    __slots__ = (
        "bitmap_masks",
        "bitmap_width",
        "checks",
        "defaults",
        "fingerprint",
        "groups",
        "join_keys",
        "pad",
        "request",
        "required",
        "spec",
        "views",
    )

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
        self._plan_views(lookup)

    def _plan_views(self, lookup: Lookup) -> None:
        self.views: list[_View] = []
        checks = []
        for g, group in enumerate(self.groups):
            for name in group.plan.view_names:
                definition = lookup.registry.view(name)
                layout = definition.layout
                mine = [(k, c) for k, (_, c) in enumerate(group.members) if c.view == name]
                self.views.append(_View(g, layout, mine))
                min_len = layout.prefix_size + 4 * len(layout.var_features)
                checks.append((layout.schema_id, min_len, int(definition.ttl_s * 1e6) or _NO_TTL_US))
        # Per view: the schema id, the least length and the TTL a PRESENT row has.
        self.checks = np.array(checks, dtype=np.int64).reshape(-1, 3)
        self.bitmap_width = max([0, *(v.bitmap_size for v in self.views)])
        masks = np.zeros((len(self.views), self.bitmap_width), dtype=np.uint8)
        for v, view in enumerate(self.views):
            for bit in view.bits.tolist():
                masks[v, bit // 8] |= 1 << (bit % 8)
        self.bitmap_masks = masks  # per view: the null bits of the model's inputs
        widest = max([0, *(vocab.width for v in self.views for _, _, vocab in v.strings)]) + 1
        walk = max([0, *(v.walk for v in self.views)])
        # Reads of rows that are absent or short, and a walk past a row's end, stay in here.
        longest = max([HEADER_SIZE + self.bitmap_width, *(int(c[1]) for c in checks)])
        self.pad = bytes(longest + 4 * walk + widest + 16)

    def stale(self, lookup: Lookup) -> bool:
        return lookup.registry.fingerprint != self.fingerprint


def _field(layout: Layout, name: str) -> tuple[np.dtype[Any], int]:
    """A fixed-width feature's element type and byte offset in its view's rows."""
    fields = layout.prefix_dtype.fields
    assert fields is not None  # a structured dtype
    dtype, offset = fields[name][:2]
    return dtype, int(offset)


def _items(blob: bytes, width: int) -> npt.NDArray[np.void]:
    """`blob` as overlapping items of `width` bytes, item i starting at byte i: a gather
    through it reads a whole value per index (the trick of featurestore.decode)."""
    return np.ndarray((len(blob) - width + 1,), dtype=np.dtype((np.void, width)), buffer=blob, strides=(1,))


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
    starts[i]:starts[i + 1]; `missing` marks the cells that took their fill value (empty
    until `finish`)."""

    matrix: Floats
    statuses: Statuses
    starts: list[int]
    missing: npt.NDArray[np.bool_]


def gather(plan: InputPlan, parts: Sequence[BatchPart], rows: Rows, now_us: int) -> BatchMatrix:
    """The feature inputs of the calls `parts`, stacked, from their MGET reply `rows`
    (group after group, view after view, in each the calls' rows in order).

    >>> batch = gather(plan, [call], rows, time.time_ns() // 1000)  # doctest: +SKIP
    """
    starts: list[int] = np.cumsum([0] + [p.rows for p in parts]).tolist()
    total = starts[-1]
    matrix = np.empty((total, plan.spec.width), dtype=np.float32)
    statuses = np.full((total, plan.spec.width), PRESENT, dtype=np.uint8)
    if plan.groups:
        with np.errstate(over="ignore", invalid="ignore"):  # rows not PRESENT hold garbage
            _Gather(plan, parts, rows, now_us).into(matrix, statuses)
    return BatchMatrix(matrix, statuses, starts, np.zeros((0, 0), dtype=np.bool_))


class _Gather:
    """One batch's reply, joined, with every row's status; `into` fills the matrix."""

    __slots__ = ("blob", "ends", "found", "header", "parts", "plan", "row_status", "sizes", "starts", "views")

    def __init__(self, plan: InputPlan, parts: Sequence[BatchPart], rows: Rows, now_us: int) -> None:
        self.plan, self.parts = plan, parts
        self.sizes = [sum(part.counts[g] for part in parts) for g in range(len(plan.groups))]  # rows per group
        self.views = [self.sizes[view.group] for view in plan.views]  # rows per view
        count = len(rows)
        present: Sequence[bytes] = [b"" if r is None else r for r in rows] if None in rows else rows  # type: ignore[assignment]
        lengths = np.fromiter(map(len, present), dtype=np.intp, count=count)
        self.starts = np.zeros(count, dtype=np.intp)
        np.cumsum(lengths[:-1], out=self.starts[1:])
        self.ends = self.starts + lengths
        self.blob = b"".join([*present, plan.pad])
        width = HEADER_SIZE + plan.bitmap_width
        header = _items(self.blob, width)[self.starts].view(np.uint8).reshape(count, width)
        schema_id, min_len, ttl_us = np.repeat(plan.checks, self.views, axis=0).T
        found = header[:, 0] == FORMAT_VERSION
        found &= header[:, 4:8].view("<u4")[:, 0] == schema_id
        found &= lengths >= min_len
        fresh = header[:, 8:16].view("<i8")[:, 0] >= now_us - ttl_us
        self.found = found
        self.row_status = np.where(found, np.where(fresh, PRESENT, OUTSIDE_MAX_AGE), NOT_FOUND).astype(np.uint8)
        masks = np.repeat(plan.bitmap_masks, self.views, axis=0)
        # Statuses are worked out per input only when some row is not PRESENT or has a null input.
        self.header: Statuses | None = (
            header if not (found & fresh).all() or (header[:, HEADER_SIZE:] & masks).any() else None
        )

    def into(self, matrix: Floats, statuses: Statuses) -> None:
        """Fill the groups' columns of `matrix` and, where needed, of `statuses`."""
        plan, at = self.plan, 0
        buffers = [self._buffers(g, group, matrix, statuses) for g, group in enumerate(plan.groups)]
        for view, n in zip(plan.views, self.views, strict=True):
            rows = slice(at, at + n)
            values, group_statuses, _ = buffers[view.group]
            view.read(self.blob, self.starts[rows], self.ends[rows], self.found[rows], values)
            if self.header is not None:
                group_statuses[:, view.columns] = self._statuses(view, rows)
            at += n
        for group, (values, group_statuses, batch_rows) in zip(plan.groups, buffers, strict=True):
            if batch_rows is not None:  # from the group's buffers into the batch, in one gather
                columns = group.positions if group.block is None else group.block
                matrix[:, columns] = values[batch_rows]
                if self.header is not None:
                    statuses[:, columns] = group_statuses[batch_rows]

    def _buffers(
        self, g: int, group: InputGroup, matrix: Floats, statuses: Statuses
    ) -> tuple[Floats, Statuses, Index | slice | None]:
        """Where group g's inputs are read to, and the gather from there into the batch.

        Straight into the matrix (gather None) when the group's columns are contiguous and
        each batch row reads its own row; else into buffers of the group's rows, gathered
        into the batch once all its views are read (a broadcast row lands on many rows).
        """
        n, width = self.sizes[g], len(group.members)
        batch_rows: Index | slice | None = _batch_rows(self.parts, g)
        if batch_rows is None and group.block is not None:
            return matrix[:, group.block], statuses[:, group.block], None
        if n == 1:  # one row for the whole batch (one call, one user): numpy broadcasts it
            batch_rows = slice(0, 1)
        values = np.empty((n, width), dtype=np.float32)
        group_statuses = np.empty((n, width), dtype=np.uint8) if self.header is not None else statuses[:0, :0]
        return values, group_statuses, slice(None) if batch_rows is None else batch_rows

    def _statuses(self, view: _View, rows: slice) -> Statuses:
        """(rows, the view's inputs): the row's status, or NULL_VALUE where an input is null."""
        assert self.header is not None
        row_status = self.row_status[rows, None]
        bitmap = self.header[rows, HEADER_SIZE : HEADER_SIZE + view.bitmap_size]
        nulls = np.unpackbits(bitmap, axis=1, bitorder="little")[:, view.bits]
        return np.where(row_status == PRESENT, PRESENT + nulls, row_status)


def _batch_rows(parts: Sequence[BatchPart], g: int) -> Index | None:
    """Row of group g's reply (per view) for every batch row (None: row i is row i)."""
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


def finish(plan: InputPlan, parts: Sequence[BatchPart], batch: BatchMatrix) -> BatchMatrix:
    """Add the calls' request-time values to a gathered batch and fill what is not PRESENT."""
    matrix, statuses, starts = batch.matrix, batch.statuses, batch.starts
    for j, _ in plan.request:
        for part, start in zip(parts, starts[:-1], strict=True):
            given = part.request.get(j)
            if given is None:
                statuses[start : start + part.rows, j] = NOT_FOUND
            else:
                matrix[start : start + part.rows, j] = given
    missing = fill_missing(matrix, statuses, plan.defaults)
    return BatchMatrix(matrix, statuses, starts, missing)
