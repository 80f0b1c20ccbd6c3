"""The response built from a plan's template equals one built field by field."""

from __future__ import annotations

import time

import numpy as np

from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.decode import RequestPlan, decode
from featurestore.registry import JoinKey, Selection, ViewDef
from featurestore.serving.wire import features_response
from featurestore.store.layout import DType, FeatureSpec, Layout, encode_rows

SPECS = (
    FeatureSpec("i64", DType.INT64),
    FeatureSpec("s", DType.STRING),
    FeatureSpec("vec", DType.FLOAT32_LIST, 3),
    FeatureSpec("flag", DType.BOOL),
)
VIEWS = [
    ViewDef(name, (JoinKey("id", DType.INT64),), 60.0, Layout(name, SPECS), name, "ts", "", None) for name in ("a", "b")
]


def test_template_response_matches_a_hand_built_one() -> None:
    plan = RequestPlan([Selection(v, v.layout.names) for v in VIEWS], True)
    n = 3
    now = time.time_ns() // 1000
    columns = {"i64": [1, 2, 3], "s": ["x", None, "yz"], "vec": np.ones((n, 3)), "flag": [1, 0, 1]}
    rows: list[bytes | None] = []
    for view in VIEWS:
        rows += encode_rows(view.layout, [now] * n, columns, {"s": [False, True, False]})
    rows[1] = None  # one entity missing in the first view
    result = decode(plan, rows, n, now)
    by_hand = pb.GetOnlineFeaturesResponse(row_count=n)
    for c, v, o, s in zip(plan.columns, result.values, result.offsets, result.statuses, strict=True):
        value_type = pb.ValueType.Value(f"VALUE_TYPE_{c.dtype.name}")
        by_hand.columns.add(
            name=c.name, value_type=value_type, length=c.length, values=v, offsets=o, statuses=s, view=c.view
        )
    for name, ts in zip(plan.view_names, result.event_ts_us, strict=True):
        by_hand.views.add(view=name, event_timestamps_us=ts)
    assert features_response(result) == by_hand
    again = features_response(result)  # from the cached template this time
    assert again.SerializeToString() == by_hand.SerializeToString()
    assert again.columns[0].statuses == bytes([1, 3, 1])
