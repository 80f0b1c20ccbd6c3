"""What the sink notes about the rows it writes (the ids announced to servers)."""

from __future__ import annotations

import numpy as np

from featurestore.registry import JoinKey, ViewDef
from featurestore.store.layout import DType, FeatureSpec, Layout
from materialize.sink import WrittenIds
from materialize.source import RowBatch


def view(*keys: JoinKey) -> ViewDef:
    layout = Layout("v", (FeatureSpec("x", DType.INT64),))
    return ViewDef("v", keys, 0.0, layout, "v", "event_timestamp", "", None)


def batch(*keys: list[object]) -> RowBatch:
    n = len(keys[0])
    return RowBatch(list(keys), np.zeros(n, np.int64), {"x": np.zeros(n, np.int64)}, {"x": np.zeros(n, bool)})


def test_written_ids_are_collected_up_to_the_limit() -> None:
    written = WrittenIds(view(JoinKey("item_id", DType.INT64)), limit=5)
    assert written.ids is not None and written.ids.tolist() == []
    written.add(batch([7, 3]))
    written.add(batch([2**62, -1, 0]))
    assert written.ids is not None and written.ids.dtype == np.int64
    assert written.ids.tolist() == [7, 3, 2**62, -1, 0]
    written.add(batch([9]))  # the sixth row: too many to announce
    written.add(batch([1]))
    assert written.ids is None


def test_written_ids_are_not_collected_for_other_join_keys() -> None:
    by_string = WrittenIds(view(JoinKey("account_id", DType.STRING)), limit=5)
    by_string.add(batch(["a"]))
    two_keys = WrittenIds(view(JoinKey("a", DType.INT64), JoinKey("b", DType.INT64)), limit=5)
    two_keys.add(batch([1], [2]))
    assert by_string.ids is None and two_keys.ids is None
