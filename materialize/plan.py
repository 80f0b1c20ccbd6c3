"""What a run covers: one time window per feature view.

An incremental run continues each view from its watermark (the end of the last window
that was written completely) to the run's start time; a view without a watermark starts
at its TTL horizon, since older values would be reported stale anyway (a view without a
TTL starts at the beginning of time). A backfill covers the window it is given and
leaves watermarks alone: it fills history, it does not advance the incremental job.

Times are int64 microseconds since the Unix epoch (UTC) throughout.

A run may cover one shard of the entities (`Shard`, `--shard i/N`): the entities whose
join-key hash falls in the i-th of N equal ranges, the hash computed by PostgreSQL
(materialize/source.py), so N runs side by side write exactly what one run writes, each
receiving only its rows. A shard has its own watermark per view and its own run lock
(store/keys.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from featurestore.errors import InvalidArgument
from featurestore.registry import ViewDef

__all__ = ["Shard", "Window", "backfill_windows", "incremental_windows", "to_datetime", "to_us"]


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count`: the entities whose 32-bit key hash falls in the shard's
    range, the `index`-th of `count` equal ranges (`bounds`; the hash is
    materialize/source.py's `shard_hash`). Ranges rather than a modulo, so that an index
    on the hash expression can serve a shard.

    >>> Shard.parse("1/3")
    Shard(index=1, count=3)
    >>> Shard.parse("1/3").label
    'shard-1-of-3'
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise InvalidArgument(
                f"shard {self.index}/{self.count} does not exist: the index runs from 0 to the count"
                f" minus 1 (0/{max(self.count, 1)} to {max(self.count, 1) - 1}/{max(self.count, 1)})"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """A shard from "i/N"; InvalidArgument naming the text when it is not one."""
        index, slash, count = text.strip().partition("/")
        try:
            if not slash:
                raise ValueError(text)
            return cls(int(index), int(count))
        except ValueError:
            raise InvalidArgument(f"a shard is index/count, e.g. 0/4, not {text!r}") from None

    @property
    def bounds(self) -> tuple[int, int]:
        """The shard's range of the 32-bit entity hash: low (inclusive), high (exclusive)."""
        return self.index * 2**32 // self.count, (self.index + 1) * 2**32 // self.count

    def holds(self, entity_hash: int) -> bool:
        """True when an entity of hash `entity_hash` (see `source.shard_hash`) is in this shard."""
        low, high = self.bounds
        return low <= entity_hash < high

    @property
    def label(self) -> str:
        """The shard's name in its watermark and lock keys: "shard-<i>-of-<n>"."""
        return f"shard-{self.index}-of-{self.count}"


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
