"""What a run covers: one time window per feature view.

An incremental run continues each view from its watermark (the end of the last window
that was written completely) to the run's start time; a view without a watermark starts
at its TTL horizon, since older values would be reported stale anyway (a view without a
TTL starts at the beginning of time). A backfill covers the window it is given and
leaves watermarks alone: it fills history, it does not advance the incremental job.

Times are int64 microseconds since the Unix epoch (UTC) throughout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from featurestore.errors import InvalidArgument
from featurestore.registry import ViewDef

__all__ = ["Window", "backfill_windows", "incremental_windows", "to_datetime", "to_us"]


@dataclass(frozen=True, slots=True)
class Window:
    """Rows of `view` with `start_us <= event time < end_us` (no lower bound if None).

    `advances_watermark` is True for incremental windows: once every row of the window
    is acknowledged by Redis, the view's watermark moves to `end_us`.
    """

    view: ViewDef
    start_us: int | None
    end_us: int
    advances_watermark: bool


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def to_datetime(us: int) -> datetime:
    """The UTC datetime of `us` microseconds since the epoch."""
    return datetime.fromtimestamp(us // 1_000_000, tz=UTC).replace(microsecond=us % 1_000_000)


def incremental_windows(views: Sequence[ViewDef], watermarks: Mapping[str, int | None], now_us: int) -> list[Window]:
    """One window per view, from its watermark (or TTL horizon) up to `now_us`.

    >>> [w.start_us for w in incremental_windows([view], {view.name: 5}, 10)]  # doctest: +SKIP
    [5]
    """
    windows = []
    for view in views:
        start = watermarks.get(view.name)
        if start is None and view.ttl_s:
            start = now_us - int(view.ttl_s * 1_000_000)
        windows.append(Window(view, start, now_us, advances_watermark=True))
    return windows


def backfill_windows(views: Sequence[ViewDef], start_us: int, end_us: int) -> list[Window]:
    """The same window [start_us, end_us) for every view; watermarks stay where they are."""
    if start_us >= end_us:
        raise InvalidArgument(
            f"backfill window is empty: --start {to_datetime(start_us).isoformat()} is not"
            f" before --end {to_datetime(end_us).isoformat()}"
        )
    return [Window(v, start_us, end_us, advances_watermark=False) for v in views]
