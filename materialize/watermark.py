"""Per-view watermarks and the run lock, both kept in Redis next to the rows.

A view's watermark (`store.keys.watermark_key`) is the end of the last incremental
window whose every row Redis acknowledged, as decimal microseconds since the epoch. It
moves only after that acknowledgement, and only while the run still holds its lock (one
script checks the lock and sets the watermark: both keys share the meta slot, so this
holds on a Redis Cluster too), so a run that dies midway, or lost its lock, leaves it
where it was and the next run covers the same window again; guarded writes make that
harmless.

The run lock (`store.keys.lock_key`) keeps two runs of one project from overlapping:
`SET NX PX` with a random token, refreshed while the run lives and deleted on exit only
by its holder (compare-and-delete). If the holder dies, the lock expires on its own.

Shards (`--shard i/N`, materialize/plan.py) have a watermark per view and a lock of their
own (`shard-<i>-of-<n>` in both names): shards run side by side, two runs of one shard
never do. A shard's view without a watermark of its own starts from the view's unsharded
watermark (an unsharded run wrote every entity up to it), and a view without any from
its watermark of before the `{__meta__}` hash tag (`keys.legacy_watermark_key`), so
neither sharding nor the upgrade restarts incremental runs from the TTL horizon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

from redis.exceptions import RedisError

from featurestore.errors import LockHeld, Unavailable
from featurestore.store.keys import legacy_watermark_key, lock_key, watermark_key
from featurestore.store.redis import Client, mget

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

# KEYS[1]: the lock key, KEYS[2]: the watermark. ARGV[1]: the holder's token; ARGV[2]:
# the new watermark. Sets the watermark only while the token holds the lock. Returns 1
# if set, else 0.
_ADVANCE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


async def _redis(call: Awaitable[T], what: str) -> T:
    """Await a Redis call, translating its errors into `Unavailable`."""
    try:
        return await call
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis failed while {what}: {exc}") from exc


async def read_watermarks(client: Client, project: str, views: Sequence[str], shard: str = "") -> dict[str, int | None]:
    """Each view's watermark (microseconds since the epoch), or None if it has none; of
    shard `shard` ("shard-<i>-of-<n>") when given, falling back as the module says."""
    marks = await _read(client, [watermark_key(project, v, shard) for v in views])
    fallbacks: list[Callable[[str], bytes]] = [functools.partial(legacy_watermark_key, project)]
    if shard:
        fallbacks.insert(0, functools.partial(watermark_key, project))
    for fallback in fallbacks:
        missing = [i for i, mark in enumerate(marks) if mark is None]
        if not missing:
            break
        found = await _read(client, [fallback(views[i]) for i in missing])
        for i, mark in zip(missing, found, strict=True):
            marks[i] = mark
    return dict(zip(views, marks, strict=True))


async def _read(client: Client, keys: list[bytes]) -> list[int | None]:
    try:
        values = await mget(client, keys)
    except Unavailable as exc:
        raise Unavailable(f"Redis failed while reading watermarks: {exc}") from exc
    return [None if raw is None else int(raw) for raw in values]


async def advance_watermark(
    client: Client, project: str, view: str, end_us: int, *, shard: str = "", lock: RunLock | None = None
) -> None:
    """Set `view`'s watermark (of `shard`) to `end_us`; call only once every write was
    acknowledged. With `lock`, only while it still holds the lock (LockHeld if not)."""
    key = watermark_key(project, view, shard)
    if lock is None:
        await _redis(client.set(key, str(end_us)), "moving a watermark")
        return
    moved = await _redis(
        client.eval(_ADVANCE, 2, lock.key, key, lock.token, str(end_us)),  # type: ignore[arg-type]
        "moving a watermark",
    )
    if not moved:
        raise LockHeld(f"this run lost the lock {lock.key.decode()} before moving {view}'s watermark")


class RunLock:
    """The project's materialization lock, held for the lifetime of an `async with`.

    Parameters:
        client: the Redis client.
        project: the registry's project (one lock per project).
        ttl_s: how long the lock outlives a holder that died; it is refreshed every
            third of it while the holder lives.
        shard: a shard's label ("shard-<i>-of-<n>"): that shard's lock instead.

    Raises `LockHeld` on entry when another run holds it. `check()` raises `LockHeld`
    if the lock was lost meanwhile (e.g. the process stalled past the TTL), so the run
    stops before it moves a watermark it no longer owns.
    """

    def __init__(self, client: Client, project: str, ttl_s: float = 30.0, *, shard: str = "") -> None:
        self.client = client
        self.key = lock_key(project, f"materialize:{shard}" if shard else "materialize")
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
