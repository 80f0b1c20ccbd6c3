"""Windows per view: from the watermark, from the TTL horizon, or the backfill's own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from featurestore.errors import InvalidArgument
from featurestore.registry import JoinKey, ViewDef
from featurestore.store.layout import DType, FeatureSpec, Layout
from materialize.plan import backfill_windows, incremental_windows, to_datetime, to_us

DAY_US = 86_400_000_000


def _view(name: str, ttl_s: float) -> ViewDef:
    return ViewDef(
        name=name,
        join_keys=(JoinKey("user_id", DType.INT64),),
        ttl_s=ttl_s,
        layout=Layout(name, (FeatureSpec("x", DType.FLOAT32),)),
        table=name,
        timestamp_field="event_timestamp",
        created_field="created",
        vector=None,
    )


@pytest.mark.parametrize(
    ("watermark", "ttl_s", "start"),
    [
        (123, 86_400.0, 123),  # continues from its watermark
        (None, 86_400.0, 10 * DAY_US - DAY_US),  # first run: from the TTL horizon
        (None, 0.0, None),  # no TTL, no watermark: all history
    ],
    ids=["watermark", "ttl-horizon", "no-ttl"],
)
def test_incremental_window_starts_at_watermark_else_ttl_horizon(
    watermark: int | None, ttl_s: float, start: int | None
) -> None:
    view = _view("v", ttl_s)
    (window,) = incremental_windows([view], {"v": watermark}, now_us=10 * DAY_US)
    assert (window.start_us, window.end_us, window.advances_watermark) == (
        start,
        10 * DAY_US,
        True,
    )


def test_backfill_windows_leave_watermarks_and_refuse_empty_windows() -> None:
    views = [_view("a", 60.0), _view("b", 0.0)]
    windows = backfill_windows(views, 5, 9)
    assert [(w.view.name, w.start_us, w.end_us) for w in windows] == [("a", 5, 9), ("b", 5, 9)]
    assert not any(w.advances_watermark for w in windows)
    with pytest.raises(InvalidArgument, match="window is empty"):
        backfill_windows(views, 9, 9)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2026, 11, 23, 13, 29, 2, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 23, 15, 0, tzinfo=timezone(timedelta(hours=2))),
    ],
    ids=["epoch", "microseconds", "before-epoch", "other-zone"],
)
def test_microsecond_times_round_trip_exactly(moment: datetime) -> None:
    assert to_datetime(to_us(moment)) == moment
    assert to_us(moment.replace(tzinfo=None)) == to_us(moment.replace(tzinfo=UTC))
