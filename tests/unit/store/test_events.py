"""Parsing materialization events: tolerant of anything, exact about the ids it accepts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featurestore.store.events import WrittenEvent, parse_event

V = "item_embedding"
I64 = (-(2**63), 2**63 - 1)
CASES = [
    ("views-only", {"event": "written", "views": [V, "b"]}, (V, "b"), {}, None),
    (
        "ids-and-epoch",
        {"event": "written", "views": [V], "ids": {V: [3, 1, 2]}, "epoch_us": 1_700_000_000_000_000},
        (V,),
        {V: [3, 1, 2]},
        1_700_000_000_000_000,
    ),
    ("int64-bounds", {"event": "written", "views": [V], "ids": {V: list(I64)}}, (V,), {V: list(I64)}, None),
    ("empty-ids", {"event": "written", "views": [V], "ids": {V: []}}, (V,), {V: []}, None),
    ("ids-of-one-view", {"event": "written", "views": [V, "b"], "ids": {V: [1]}}, (V, "b"), {V: [1]}, None),
    ("ids-of-unnamed-view", {"event": "written", "views": [V], "ids": {"c": [1]}}, (V,), {}, None),
    ("past-int64", {"event": "written", "views": [V], "ids": {V: [2**63]}}, (V,), {}, None),
    ("float-ids", {"event": "written", "views": [V], "ids": {V: [1.0]}}, (V,), {}, None),
    ("bool-ids", {"event": "written", "views": [V], "ids": {V: [True]}}, (V,), {}, None),
    ("string-ids", {"event": "written", "views": [V], "ids": {V: ["1"]}}, (V,), {}, None),
    ("ids-not-a-map", {"event": "written", "views": [V], "ids": [1]}, (V,), {}, None),
    ("bad-epoch", {"event": "written", "views": [V], "epoch_us": "now"}, (V,), {}, None),
    ("other-event", {"event": "deleted", "views": [V]}, (), {}, None),
    ("views-not-a-list", {"event": "written", "views": V}, (), {}, None),
    ("view-not-a-string", {"event": "written", "views": [1]}, (), {}, None),
    ("not-an-object", [V], (), {}, None),
]


@pytest.mark.parametrize(("message", "views", "ids", "epoch_us"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_event_keeps_what_is_well_formed(
    message: object, views: tuple[str, ...], ids: dict[str, list[int]], epoch_us: int | None
) -> None:
    event = parse_event(json.dumps(message).encode())
    assert (event.views, event.epoch_us) == (views, epoch_us)
    assert {v: a.tolist() for v, a in event.ids.items()} == ids
    assert all(a.dtype == np.int64 for a in event.ids.values())
    for view in views:
        assert (event.ids_of(view) is None) == (view not in ids)


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"{", "null", b"42"])
def test_parse_event_never_raises_on_garbage(data: bytes | str) -> None:
    assert parse_event(data) == WrittenEvent()
