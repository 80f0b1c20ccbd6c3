"""A circuit breaker for a Redis connection: while Redis is known to be down, fail at once.

Without it, every call made while Redis hangs (a stopped process, a dropped route) waits
for the whole socket timeout (`--redis-timeout-s`, 1 s by default) before it fails, and
the calls pile up in flight. With it:

    closed      calls go through; `threshold` connection failures in a row open it
    open        calls fail at once with Unavailable, for `cooldown_s`
    half-open   after the cool-down, ONE call goes through as the probe (the others still
                fail at once): its success closes the breaker, its failure opens it for
                another cool-down

A connection failure is a failed connect, a connection lost, or a reply that did not come
within the connection's own timeout. A reply (even an error reply) is a success; a caller
that gave up (its deadline, a cancellation) is neither. A probe whose caller gave up
frees the probe slot after one more cool-down, so the breaker never stays half-open.

    breaker = Breaker("Redis at 127.0.0.1:6379")
    breaker.check()        # Unavailable at once while open
    ...                    # the call
    breaker.success()      # or breaker.failure(exc)

The cool-down is short on purpose: a Redis that is back is used again within
`cooldown_s` (recovery stays a fraction of a second), while a Redis that hangs costs one
probe at a time instead of every call's timeout. `store/pipe.py`'s RedisPipe uses one
per connection; another pipe (a Redis Cluster node's) uses it the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from featurestore.errors import Unavailable

__all__ = ["COOLDOWN_S", "THRESHOLD", "Breaker"]

THRESHOLD = 5  # connection failures in a row that open the breaker
COOLDOWN_S = 0.25  # seconds an open breaker fails calls at once before it lets a probe through


class Breaker:
    """Closed, open or half-open (see the module docstring); not thread-safe (one event loop).

    Parameters:
        name: what it guards, for messages ("Redis at 127.0.0.1:6379").
        threshold: connection failures in a row that open it, at least 1.
        cooldown_s: seconds it stays open before one probe goes through, > 0.
        clock: monotonic seconds (tests pass their own).
    """

    __slots__ = ("_clock", "_last_error", "_opened_at", "_probe_at", "cooldown_s", "failures", "name", "threshold")

    def __init__(
        self,
        name: str,
        *,
        threshold: int = THRESHOLD,
        cooldown_s: float = COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or not cooldown_s > 0:
            raise ValueError(f"threshold must be >= 1 and cooldown_s > 0, not {threshold} and {cooldown_s}")
        self.name, self.threshold, self.cooldown_s = name, threshold, cooldown_s
        self.failures = 0  # connection failures in a row
        self._opened_at: float | None = None  # None: closed
        self._probe_at: float | None = None  # when the probe in flight was let through
        self._last_error = ""
        self._clock = clock

    @property
    def state(self) -> str:
        """One of "closed", "open" (failing at once) and "half-open" (a probe may go, or is in flight)."""
        if self._opened_at is None:
            return "closed"
        return "open" if self._clock() - self._opened_at < self.cooldown_s else "half-open"

    def check(self) -> None:
        """Return when a call may go through; raise Unavailable at once while open.

        Half-open, the first caller becomes the probe; the others fail until the probe
        reports (or, if it never does, until another cool-down passed).
        """
        if self._opened_at is None:
            return
        now = self._clock()
        if now - self._opened_at >= self.cooldown_s and (
            self._probe_at is None or now - self._probe_at >= self.cooldown_s
        ):
            self._probe_at = now
            return
        raise Unavailable(
            f"{self.name} is unavailable ({self.failures} connection failures in a row, the last: "
            f"{self._last_error}); failing at once, a probe every {self.cooldown_s:g} s"
        )

    def success(self) -> None:
        """The call got a reply: close."""
        if self._opened_at is not None or self.failures:
            self.failures = 0
            self._opened_at = self._probe_at = None

    def failure(self, error: BaseException) -> None:
        """The call failed to connect or to get a reply: count it; open at `threshold`
        (again, for a failed probe)."""
        self.failures += 1
        self._last_error = str(error)[:200]
        if self.failures >= self.threshold:
            self._opened_at = self._clock()
            self._probe_at = None
