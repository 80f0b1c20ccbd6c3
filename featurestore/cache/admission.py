"""Admission: which fetched rows the cache takes, and whether a read goes through it at all.

    admission = Admission(hot, rows, admit_count=1.0, bypass_window=100_000)
    if admission.skips(): ...                          # 15 reads in 16 while bypassed
    admission.measure(hits, lookups)                   # per read that used the cache
    admission.admit(row_keys, rows, epoch, fetched_at) # the fetched rows (None: absent)

While the cache has room (under 90% of its byte budget) every fetched row is admitted,
and its absence too. Once it is nearly full, only rows of keys requested at least as
often as those the last eviction dropped (their median count-min estimate, and at least
`admit_count`): a key asked for once does not push out a hot one, and the cache does not
churn. A row whose read started before an invalidation (the row store's `epoch` moved)
is never admitted: it may be older than the invalidation.

Traffic without hot keys makes the cache cost more than it saves (a lookup in a large
dict is a few CPU cache misses, as in Redis): when the hit ratio over the last
`bypass_window` lookups (100k by default) is under 50%, 15 reads in 16 skip the cache;
the 16th still goes through it and keeps measuring, so the bypass ends when hot keys
come back.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from featurestore.cache.rows import ABSENT, RowCache
from featurestore.cache.sketch import HotKeys

__all__ = ["BYPASS_BELOW", "PROBE", "ROOM", "Admission"]

ROOM = 0.9  # below this share of the budget, every fetched row is admitted
BYPASS_BELOW = 0.5  # a window's hit ratio under this turns the bypass on
PROBE = 16  # while bypassed, 1 read in PROBE goes through the cache


class Admission:
    """The admission bar and the bypass of one cache.

    Parameters:
        hot: the request counts (count-min estimates) that rank keys.
        rows: the row store that admitted rows go to.
        admit_count: the least estimate of a key whose fetched row is cached once the
            cache is nearly full.
        bypass_window: the lookups over which the hit ratio decides the bypass.
    """

    __slots__ = ("_evicted_count", "_reads", "_window", "admit_count", "bypass_window", "bypassed", "hot", "rows")

    def __init__(self, hot: HotKeys, rows: RowCache, *, admit_count: float = 1.0, bypass_window: int = 100_000) -> None:
        self.hot = hot
        self.rows = rows
        self.admit_count = admit_count
        self.bypass_window = bypass_window
        self.bypassed = False  # the last window's hit ratio was under BYPASS_BELOW
        self._evicted_count = 0.0  # the median count of the keys last evicted
        self._reads = 0
        self._window = [0, 0]  # hits and lookups since the window began

    @property
    def bar(self) -> float:
        """The least estimate a key needs for its row to be admitted to a nearly full cache."""
        return max(self.admit_count, self._evicted_count)

    def skips(self) -> bool:
        """Count one read; True when it should skip the cache (bypassed, and not a probe)."""
        self._reads += 1
        return self.bypassed and self._reads % PROBE != 0

    def measure(self, hits: int, lookups: int) -> None:
        """Count a read's `hits` among its `lookups`; at the end of each window, turn
        the bypass on or off by the window's hit ratio."""
        window = self._window
        window[0] += hits
        window[1] += lookups
        if window[1] >= self.bypass_window:
            self.bypassed = window[0] < BYPASS_BELOW * window[1]
            self._window = [0, 0]

    def admit(
        self,
        row_keys: Sequence[bytes],
        rows: Sequence[bytes | None],
        epoch: int,
        fetched_at: float,
        *,
        admit_all: bool = False,
    ) -> int:
        """Cache the rows (None: absent) of `row_keys`, read by a read that started at
        `fetched_at` (monotonic) in `epoch`; nothing when an invalidation ran since. While
        the cache has room every row is taken; once it is nearly full, only those of keys
        requested at least as often as the keys the last eviction dropped (their median
        count; at least `admit_count`), so that keys asked for once do not push out hot
        ones and the cache does not churn. `admit_all` takes every row. Returns how many
        were cached."""
        if epoch != self.rows.epoch:
            return 0
        if admit_all or self.rows.bytes < self.rows.cache_bytes * ROOM:
            candidates = list(zip(row_keys, rows, strict=True))
        else:
            wanted = (self.hot.estimates(row_keys) >= self.bar).tolist()
            candidates = list(itertools.compress(zip(row_keys, rows, strict=True), wanted))
        put, evictions = self.rows.put, self.rows.evictions
        admitted = sum(put(key, ABSENT if row is None else row, fetched_at) for key, row in candidates)
        if self.rows.evictions != evictions:  # the bar: as hot as what goes out
            self._evicted_count = float(np.median(self.hot.estimates(self.rows.evicted)))
        return admitted
