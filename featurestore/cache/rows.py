"""Packed rows by Redis row key, in memory, within a byte budget and a maximum age.

    cache = RowCache("recsys", cache_bytes=256 << 20, max_age_s=600.0)
    cache.put(key, row, fetched_at)           # fetched_at: monotonic start of the read
    rows = cache.get_many(row_keys)           # the row, or None, per key
    cache.invalidate(row_keys); cache.invalidate_view("user_profile"); cache.clear()

One OrderedDict holds the rows in the order they were read (a row read again moves to the
end), so a hit is a C-level `dict.get` with no bookkeeping (a request's keys are looked up
with one `map`). A key Redis holds no row for is cached too, as ABSENT (b"", which the
decode reports NOT_FOUND like a missing row), so unknown entities do not cost a round
trip each time. The order is cut into segments of at most SEGMENT_ENTRIES rows, each
opened by a marker entry (a key no row key can equal, value None) whose time is at or
before the read start of every row in the segment. Both ways out drop whole segments from
the front:

- age: a segment whose marker is older than `max_age_s` is dropped before the next
  lookup, so no row is served more than `max_age_s` after its read started;
- budget: while the accounted bytes exceed `cache_bytes`, the oldest segment goes
  (first in, first out: a hot row is read again at most once per trip through the cache).

The accounting is the memory really held: the size of each key and row object (their
length plus a bytes object's header) plus ENTRY_OVERHEAD for the OrderedDict's slot and
link (measured with tracemalloc; the test suite checks the budget against tracemalloc).
Every invalidation increments `epoch`, which lets a caller refuse to cache a row whose
read raced an invalidation.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence

__all__ = ["ABSENT", "ENTRY_OVERHEAD", "SEGMENT_ENTRIES", "RowCache"]

ABSENT = b""  # the cached "Redis has no row here" (shorter than any row: NOT_FOUND)

# Bytes per entry beyond its key and row objects: the OrderedDict's table slot and index
# (a slot per 2/3 of capacity, which doubles) and its link node; measured with
# tracemalloc at several fill levels, rounded up (tests/unit/cache/test_rows.py checks it).
ENTRY_OVERHEAD = 184
SEGMENT_ENTRIES = 1024
_TWO_HEADERS = 2 * sys.getsizeof(b"") + ENTRY_OVERHEAD  # key and row objects, bookkeeping
_SLACK_S = 1.0  # a segment's time is its first read's start minus this (at most a tenth
# of the maximum age), so that reads which started a little earlier still fit


class RowCache:
    """Rows of Redis keys, FIFO in read order within a byte budget and a maximum age.

    Parameters:
        project: the key prefix (store/keys.py) by which keys tell their view.
        cache_bytes: the budget for keys, rows and their bookkeeping.
        max_age_s: no row is served longer than this after its read started, float s.
    """

    def __init__(self, project: str, cache_bytes: int, max_age_s: float = 600.0) -> None:
        self.project = project
        self.cache_bytes = cache_bytes
        self.max_age_s = max_age_s
        self.bytes = 0
        self.epoch = 0  # incremented by every invalidation
        self.evictions = 0  # rows dropped for the budget
        self.evicted: list[bytes] = []  # the keys of the last segment dropped for it
        self._rows: OrderedDict[bytes, bytes | None] = OrderedDict()  # None: a marker
        self._marks: deque[tuple[float, bytes]] = deque()  # (time, marker key) per segment
        self._segment_left = 0  # rows the newest segment still takes
        self._marker_seq = 0

    def __len__(self) -> int:
        return len(self._rows) - len(self._marks)

    def __contains__(self, key: object) -> bool:
        return self._rows.get(key) is not None  # type: ignore[call-overload]

    def keys(self) -> Iterator[bytes]:
        """The cached row keys, oldest read first."""
        return (k for k, row in self._rows.items() if row is not None)

    def snapshot(self) -> list[bytes]:
        """A copy of the keys, in no particular order, in one C-level call (~1 ms per 100k
        keys: the dict's own table, not the OrderedDict's linked list, which is 15x
        slower); it includes the segment markers, whose keys start with a NUL byte."""
        return list(dict.keys(self._rows))

    def get_many(self, row_keys: Sequence[bytes]) -> list[bytes | None]:
        """The cached row of each key (ABSENT: Redis had none), None where not cached."""
        marks = self._marks
        if marks and marks[0][0] < time.monotonic() - self.max_age_s:
            self.expire()
        return list(map(self._rows.get, row_keys))

    def put(self, key: bytes, row: bytes, fetched_at: float) -> bool:
        """Cache `row` (ABSENT: Redis has none) at `key`, replacing any entry, from a read
        that started at `fetched_at` (time.monotonic()); evicts down to the budget. False
        when refused: larger than the budget, or read before the newest segment began (a
        read slower than the segment's slack)."""
        marks = self._marks
        if marks and fetched_at < marks[-1][0]:
            return False
        size = len(key) + len(row) + _TWO_HEADERS
        if size > self.cache_bytes:
            return False
        old = self._rows.pop(key, None)
        if old is not None:
            self.bytes -= _size(key, old)
        if self._segment_left == 0:
            self._open_segment(fetched_at)
        self._rows[key] = row
        self._segment_left -= 1
        self.bytes += size
        while self.bytes > self.cache_bytes:
            self.evicted = self._drop_segment()
            self.evictions += len(self.evicted)
        return True

    def _open_segment(self, fetched_at: float) -> None:
        at = fetched_at - min(_SLACK_S, self.max_age_s / 10)
        if self._marks:
            at = max(at, self._marks[-1][0])
        self._marker_seq += 1
        marker = b"\x00segment %d" % self._marker_seq  # no row key starts with a NUL
        self._marks.append((at, marker))
        self._rows[marker] = None
        self.bytes += _size(marker, None)
        self._segment_left = SEGMENT_ENTRIES

    def _drop_segment(self) -> list[bytes]:
        """Drop the oldest segment; returns the keys of the rows it held."""
        rows = self._rows
        _, marker = self._marks.popleft()
        del rows[marker]
        self.bytes -= _size(marker, None)
        following = self._marks[0][1] if self._marks else None
        if following is None:
            self._segment_left = 0
        dropped = []
        while rows:
            key = next(iter(rows))
            if key is following:
                break
            self.bytes -= _size(key, rows.pop(key))
            dropped.append(key)
        return dropped

    def expire(self) -> int:
        """Drop the segments older than `max_age_s`; returns the rows they held."""
        cutoff = time.monotonic() - self.max_age_s
        dropped = 0
        while self._marks and self._marks[0][0] < cutoff:
            dropped += len(self._drop_segment())
        return dropped

    def invalidate(self, row_keys: Sequence[bytes]) -> list[bytes]:
        """Drop `row_keys`; returns those that were cached."""
        self.epoch += 1
        rows, dropped = self._rows, []
        for key in row_keys:
            row = rows.get(key)
            if row is not None:  # None: not cached (or a marker, never asked for)
                del rows[key]
                self.bytes -= _size(key, row)
                dropped.append(key)
        return dropped

    def invalidate_view(self, view: str, among: Sequence[bytes] | None = None) -> list[bytes]:
        """Drop the rows of `view` among the keys `among` (default: all cached keys, one
        pass; a caller with many can pass slices of `snapshot()`); returns their keys."""
        prefix = f"{self.project}:{view}:{{".encode()
        keys = self.snapshot() if among is None else among
        return self.invalidate([k for k in keys if k.startswith(prefix)])

    def clear(self) -> None:
        """Drop everything."""
        self.epoch += 1
        self._rows.clear()
        self._marks.clear()
        self._segment_left = 0
        self.bytes = 0


def _size(key: bytes, row: bytes | None) -> int:
    return len(key) + (0 if row is None else len(row)) + _TWO_HEADERS
