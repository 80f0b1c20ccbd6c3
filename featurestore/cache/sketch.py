"""Which row keys are hot: a count-min sketch of request counts, with decay.

    hot = HotKeys()
    hot.record(row_keys)            # the request path: one list append
    hot.drain()                     # a background task, every few milliseconds
    hot.estimates(row_keys)         # decayed counts, never under the true ones

Counting is kept off the request path: a request only appends its list of keys to a
queue, and `drain` counts everything queued since the last drain in a few numpy calls
(per key: one hash, already cached by the dict lookup that served it, and `depth` counter
increments). With `sample_every` = s > 1 each drained key is counted with probability
1/s, with weight s: counts stay unbiased, heavy hitters exact to a few percent, the cost
s-fold less.

The sketch has `depth` rows of 2^`width_bits` float32 counters (16 MiB at 4 x 2^20); a
key's estimate is the least of its `depth` counters. Every `decay_s` every counter halves,
so counts follow recent traffic: yesterday's hot keys fade. The sketch keeps no keys:
the candidates for "hottest" are the keys the row cache admitted (those requested before),
ranked by their estimates (HotCache.hottest, which publishes them for the fleet).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["HotKeys"]

_MULTIPLIERS = np.array(  # odd 64-bit constants: one multiply-shift hash per sketch row
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
    dtype=np.uint64,
)


class HotKeys:
    """Request counts of Redis row keys in bounded memory.

    Parameters:
        decay_s: the half-life of counts, float seconds (0: no decay by the clock).
        min_count: the least (decayed) count of a key called hot.
        width_bits, depth: the sketch's shape (see the module docstring).
        sample_every: count each key with probability 1 / this, weighted by it (1: all).
        max_pending: keys queued between drains beyond which requests go uncounted
            (a starved drain must not grow memory).
        seed: the sampling's random seed (None: fresh entropy).
    """

    def __init__(
        self,
        *,
        decay_s: float = 60.0,
        min_count: float = 2.0,
        width_bits: int = 20,
        depth: int = 4,
        sample_every: int = 1,
        max_pending: int = 1_000_000,
        seed: int | None = None,
    ) -> None:
        if not 1 <= depth <= len(_MULTIPLIERS):
            raise ValueError(f"depth must be 1 to {len(_MULTIPLIERS)}, not {depth}")
        if sample_every < 1:
            raise ValueError(f"sample_every must be >= 1, not {sample_every}")
        self.decay_s = decay_s
        self.min_count = min_count
        self.sample_every = sample_every
        self.max_pending = max_pending
        self.counted = 0  # keys counted (sampled ones with their weight)
        self._shift = np.uint64(64 - width_bits)
        self._mult = _MULTIPLIERS[:depth, None]
        self._offsets = (np.arange(depth, dtype=np.int64) << width_bits)[:, None]
        self._sketch = np.zeros(depth << width_bits, dtype=np.float32)
        self._pending: list[Sequence[bytes]] = []
        self._pending_keys = 0
        self._rng = np.random.default_rng(seed)
        self._next_decay = time.monotonic() + decay_s

    # The request path ---------------------------------------------------------------------

    def record(self, row_keys: Sequence[bytes]) -> None:
        """Queue `row_keys` to be counted by the next `drain` (the list is not copied)."""
        if self._pending_keys < self.max_pending:
            self._pending.append(row_keys)
            self._pending_keys += len(row_keys)

    # Background ----------------------------------------------------------------------------

    def drain(self) -> int:
        """Count every key queued since the last drain; returns how many were queued."""
        if self.decay_s > 0 and time.monotonic() >= self._next_decay:
            self.decay()
        pending, queued = self._pending, self._pending_keys
        if not pending:
            return 0
        self._pending, self._pending_keys = [], 0
        batch = list(itertools.chain.from_iterable(pending))
        step = self.sample_every
        if step > 1:  # each key independently, so no key's place in requests biases it
            chosen = self._rng.random(len(batch)) * step < 1.0
            batch = list(itertools.compress(batch, chosen.tolist()))
        if batch:
            self.add(batch, weight=float(step))
        return queued

    def add(self, row_keys: Sequence[bytes], weight: float = 1.0) -> None:
        """Count each of `row_keys` `weight` times, now."""
        np.add.at(self._sketch, self._slots(row_keys).ravel(), np.float32(weight))
        self.counted += int(len(row_keys) * weight)

    def _slots(self, row_keys: Sequence[bytes]) -> npt.NDArray[np.int64]:
        hashes = np.fromiter(map(hash, row_keys), dtype=np.int64, count=len(row_keys))
        slots = ((hashes.view(np.uint64) * self._mult) >> self._shift).astype(np.int64)
        slots += self._offsets
        return slots

    def decay(self) -> None:
        """Halve every count."""
        self._next_decay = time.monotonic() + self.decay_s
        self._sketch *= 0.5

    # Reading -------------------------------------------------------------------------------

    def estimates(self, row_keys: Sequence[bytes]) -> npt.NDArray[np.float32]:
        """The count-min estimate of each of `row_keys` (drained counts only)."""
        if not row_keys:
            return np.zeros(0, dtype=np.float32)
        return self._sketch[self._slots(row_keys)].min(axis=0)  # type: ignore[no-any-return]
