"""The circuit breaker's states on a clock the test moves: closed, open, half-open (one probe), closed again."""

from __future__ import annotations

import pytest

from featurestore.errors import Unavailable
from featurestore.store.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> Breaker:
    return Breaker("Redis at 127.0.0.1:1", threshold=3, cooldown_s=1.0, clock=clock)


def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.check()
        breaker.failure(Unavailable("Redis is unreachable at 127.0.0.1:1: refused"))


def test_it_opens_after_threshold_failures_in_a_row(breaker: Breaker) -> None:
    fail(breaker, 2)
    assert breaker.state == "closed"
    breaker.check()  # still lets calls through
    fail(breaker)
    assert breaker.state == "open"
    with pytest.raises(Unavailable) as caught:
        breaker.check()
    message = str(caught.value)
    assert message.startswith("Redis at 127.0.0.1:1 is unavailable (3 connection failures in a row")
    assert "refused" in message and "a probe every 1 s" in message


def test_a_success_resets_the_count(breaker: Breaker) -> None:
    fail(breaker, 2)
    breaker.success()
    fail(breaker, 2)
    assert breaker.state == "closed" and breaker.failures == 2


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 0.99
    with pytest.raises(Unavailable):
        breaker.check()
    clock.now += 0.01
    assert breaker.state == "half-open"
    breaker.check()  # the probe
    with pytest.raises(Unavailable):
        breaker.check()  # everyone else waits for it
    breaker.success()
    assert breaker.state == "closed"
    breaker.check()
    breaker.check()


def test_a_failed_probe_opens_it_for_another_cooldown(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 1.0
    fail(breaker)  # the probe fails
    assert breaker.state == "open"
    clock.now += 0.5
    with pytest.raises(Unavailable):
        breaker.check()
    clock.now += 0.5
    breaker.check()  # the next probe


def test_a_probe_that_never_reports_frees_its_slot_after_a_cooldown(breaker: Breaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 1.0
    breaker.check()  # a probe whose caller gives up (deadline): neither success nor failure
    clock.now += 0.5
    with pytest.raises(Unavailable):
        breaker.check()
    clock.now += 0.5
    breaker.check()  # a new probe


@pytest.mark.parametrize(("threshold", "cooldown_s"), [(0, 1.0), (1, 0.0), (1, float("nan"))])
def test_bad_settings_are_refused(threshold: int, cooldown_s: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        Breaker("x", threshold=threshold, cooldown_s=cooldown_s)
