"""Per-view watermarks and the run lock, both kept in Redis next to the rows.

A view's watermark (`store.keys.watermark_key`) is the end of the last incremental
window whose every row Redis acknowledged, as decimal microseconds since the epoch. It
moves only after that acknowledgement, so a run that dies midway leaves it where it
was and the next run covers the same window again; guarded writes make that harmless.

The run lock (`store.keys.lock_key`) keeps two runs of one project from overlapping:
`SET NX PX` with a random token, refreshed while the run lives and deleted on exit only
by its holder (compare-and-delete). If the holder dies, the lock expires on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from featurestore.errors import LockHeld, Unavailable
from featurestore.store.keys import lock_key, watermark_key

__all__ = ["RunLock", "advance_watermark", "read_watermarks"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# KEYS[1]: the lock key. ARGV[1]: the holder's token; ARGV[2]: new time to live, ms.
# Extends the lock only if the token still holds it. Returns 1 if extended, else 0.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1]: the lock key. ARGV[1]: the holder's token.
# Deletes the lock only if the token still holds it. Returns 1 if deleted, else 0.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


async def _redis(call: Awaitable[T], what: str) -> T:
    """Await a Redis call, translating its errors into `Unavailable`."""
    try:
        return await call
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis failed while {what}: {exc}") from exc


async def read_watermarks(client: aioredis.Redis, project: str, views: Sequence[str]) -> dict[str, int | None]:
    """Each view's watermark (microseconds since the epoch), or None if it has none."""
    keys = [watermark_key(project, v) for v in views]
    values: list[Any] = await _redis(client.mget(keys), "reading watermarks")
    return {v: None if raw is None else int(raw) for v, raw in zip(views, values, strict=True)}


async def advance_watermark(client: aioredis.Redis, project: str, view: str, end_us: int) -> None:
    """Set `view`'s watermark to `end_us`; call only once every write was acknowledged."""
    await _redis(client.set(watermark_key(project, view), str(end_us)), "moving a watermark")


class RunLock:
    """The project's materialization lock, held for the lifetime of an `async with`.

    Parameters:
        client: the Redis client.
        project: the registry's project (one lock per project).
        ttl_s: how long the lock outlives a holder that died; it is refreshed every
            third of it while the holder lives.

    Raises `LockHeld` on entry when another run holds it. `check()` raises `LockHeld`
    if the lock was lost meanwhile (e.g. the process stalled past the TTL), so the run
    stops before it moves a watermark it no longer owns.
    """

    def __init__(self, client: aioredis.Redis, project: str, ttl_s: float = 30.0) -> None:
        self.client = client
        self.key = lock_key(project)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = secrets.token_hex(16).encode()
        self._refresher: asyncio.Task[None] | None = None
        self._lost = False

    async def __aenter__(self) -> RunLock:
        taken = await _redis(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms), "taking the lock")
        if not taken:
            left_ms = await _redis(self.client.pttl(self.key), "reading the lock")
            raise LockHeld(
                f"another materialization run holds the lock {self.key.decode()} (it expires"
                f" in {max(0, left_ms) / 1000:.0f} s unless its holder refreshes it); wait for"
                " that run to finish"
            )
        self._refresher = asyncio.create_task(self._refresh_forever())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        with contextlib.suppress(RedisError, OSError):  # it expires anyway
            await self.client.eval(_RELEASE, 1, self.key, self.token)  # type: ignore[misc]

    def check(self) -> None:
        """Raise `LockHeld` if this run no longer holds the lock."""
        if self._lost:
            raise LockHeld(f"this run lost the lock {self.key.decode()}; another run may own it")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                ok = await self.client.eval(  # type: ignore[misc]
                    _REFRESH, 1, self.key, self.token, self.ttl_ms
                )
            except (RedisError, OSError) as exc:
                log.warning("could not refresh the run lock: %s", exc)
                continue
            if not ok:
                self._lost = True
                return
