"""The request-count sketch without Redis: counts of a Zipf stream, counting off the
request path, sampling, decay."""

from __future__ import annotations

import time

import numpy as np
import pytest

from featurestore.cache.sketch import HotKeys
from featurestore.store import keys


def zipf_ids(n: int, users: int, s: float, rng: np.random.Generator) -> list[int]:
    """`n` ids in [0, users) from a Zipf law of exponent `s` (id 0 the most frequent)."""
    weights = np.arange(1, users + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights / weights.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(n)), users - 1).tolist()  # type: ignore[no-any-return]


def user_keys(ids: list[int]) -> list[bytes]:
    return keys.row_keys("proj", "user", keys.entity_tokens([ids]))


@pytest.mark.parametrize("sample_every", [1, 4])
def test_counts_of_a_zipf_stream(sample_every: int) -> None:
    rng = np.random.default_rng(0)
    hot = HotKeys(decay_s=0, sample_every=sample_every, width_bits=16, seed=1)
    stream = zipf_ids(200_000, 1_000_000, 1.1, rng)
    for start in range(0, len(stream), 100):  # requests of 100 entities
        hot.record(user_keys(stream[start : start + 100]))
        if start % 5000 == 0:
            hot.drain()
    hot.drain()
    assert hot.counted == pytest.approx(len(stream), rel=0.01)
    candidates = user_keys(list(range(1000)))
    estimates = hot.estimates(candidates)
    counts = np.bincount(stream, minlength=1000)[:1000]
    if sample_every == 1:  # count-min: never under the true count, and close
        assert (estimates >= counts).all()
    top20 = np.argsort(-estimates)[:20]
    for i in range(20):  # heavy hitters: within a few percent, sampled or not
        assert estimates[i] == pytest.approx(counts[i], rel=0.25)
    assert set(top20.tolist()) <= set(range(30))  # the hottest found are truly hot
    assert hot.estimates(user_keys([999_999]))[0] < estimates[0] / 100


def test_recording_is_deferred_until_the_drain() -> None:
    hot = HotKeys(decay_s=0)
    key = user_keys([3])
    hot.record(key)
    hot.record(key)
    assert hot.estimates(key)[0] == 0
    assert hot.drain() == 2
    assert hot.estimates(key)[0] == 2
    assert hot.drain() == 0


def test_a_starved_drain_bounds_the_queue() -> None:
    hot = HotKeys(decay_s=0, max_pending=250)
    for _ in range(10):
        hot.record(user_keys(list(range(100))))
    assert hot.drain() == 300  # three lists queued, the rest went uncounted


def test_sampling_counts_one_key_in_n_with_weight_n() -> None:
    hot = HotKeys(decay_s=0, sample_every=4, seed=2)
    every_other = user_keys([5, 6]) * 1000  # a fixed pattern must not bias the sample
    for start in range(0, len(every_other), 100):
        hot.record(every_other[start : start + 100])
        hot.drain()
    counts = hot.estimates(user_keys([5, 6])).tolist()
    assert counts == [pytest.approx(1000, rel=0.2)] * 2
    assert all(count % 4 == 0 for count in counts)


def test_counts_halve_with_decay() -> None:
    hot = HotKeys(decay_s=0)
    key = user_keys([1])
    hot.add(key * 64)
    for _ in range(5):
        hot.decay()
    assert hot.estimates(key)[0] == 2  # 64 / 32


def test_counts_decay_on_the_drains_clock() -> None:
    hot = HotKeys(decay_s=0.05)
    key = user_keys([1])
    hot.add(key * 8)
    for _ in range(3):
        time.sleep(0.06)
        hot.drain()  # the drain runs on a timer: decay follows the clock, not traffic
    assert hot.estimates(key)[0] <= 1


def test_invalid_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        HotKeys(depth=9)
    with pytest.raises(ValueError, match="sample_every"):
        HotKeys(sample_every=0)
