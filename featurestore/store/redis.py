"""The online store's operations on Redis: the one-round-trip read, the guarded write, and
the bulk reads of background work (SCAN in batches, MGET, PING) through redis-py.

Reads are one MGET for every key a request needs, whatever the number of views, sent on
a pipelined connection (store/pipe.py).
Writes go through `GUARDED_SET`, a server-side script that compares event timestamps in
the same round trip, so an older row never overwrites a newer one (a backfill can run at
any time). Redis errors are translated here into `Unavailable`.

On a Redis Cluster (a redis+cluster:// URL, store/slots.py), `connect` returns a
`ClusterClient`: redis-py's cluster client for the bookkeeping (every bookkeeping key
shares the slot of `{__meta__}`, store/keys.py, so their scripts and MGETs stay on one
node), plus a `ClusterPipe` (store/cluster.py) for the bulk work, where keys span every
slot: `mget` is one MGET per slot on every master at once, `guarded_write` one
`GUARDED_SET` per slot (a script's keys must share a slot), and `scan_keys` walks every
master in turn. The functions below take either client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from featurestore.errors import Unavailable
from featurestore.store.cluster import ClusterPipe, pack
from featurestore.store.pipe import RedisPipe
from featurestore.store.slots import group_by_slot, is_cluster_url, parse_cluster_url

__all__ = [
    "GUARDED_SET",
    "Client",
    "ClusterClient",
    "WriteCounts",
    "connect",
    "guarded_write",
    "mget",
    "ping",
    "read_rows",
    "scan_keys",
]

# KEYS: the row keys of one batch.
# ARGV[1]: expiry after the event time in milliseconds (0: no expiry); ARGV[2 .. n+1]: the
#   packed rows, one per key (bytes 8..15 of a row hold its int64 event time in
#   microseconds, little-endian; see store/layout.py).
# Each row is written (SET, with PXAT = event time + expiry) unless the stored row has a
# newer event time; equal times overwrite, so a rerun is idempotent.
# Returns {written, skipped_as_older}.
GUARDED_SET = """
local expiry_ms = tonumber(ARGV[1])
local written, skipped = 0, 0
for i, key in ipairs(KEYS) do
  local row = ARGV[i + 1]
  local new_ts = struct.unpack('<i8', string.sub(row, 9, 16))
  local old = redis.call('GETRANGE', key, 8, 15)
  if #old == 8 and struct.unpack('<i8', old) > new_ts then
    skipped = skipped + 1
  else
    if expiry_ms > 0 then
      redis.call('SET', key, row, 'PXAT', math.floor(new_ts / 1000) + expiry_ms)
    else
      redis.call('SET', key, row)
    end
    written = written + 1
  end
end
return {written, skipped}
"""


class ClusterClient(RedisCluster):
    """redis-py's asyncio cluster client, plus `rows`: a `ClusterPipe` on the same cluster
    for the per-slot bulk work (`mget`, `guarded_write`). `aclose` closes both.

    Make one with `connect("redis+cluster://host:port,...")`.
    """

    rows: ClusterPipe

    async def aclose(self) -> None:
        await self.rows.close()
        await super().aclose()


Client = aioredis.Redis | ClusterClient
"""What `connect` returns: a client of one Redis, or of a Redis Cluster."""


def connect(url: str, *, timeout_s: float | None = 2.0, max_connections: int = 64) -> Client:
    """An asyncio Redis client for `url` (redis://host:port/db, rediss://, unix://, or
    redis+cluster://host:port,... for a `ClusterClient`) with bytes replies; every redis-py
    client of the package is made here.

    Parameters:
        timeout_s: how long a reply may take, float seconds; None: as long as it takes
            (a pub/sub listener waiting for the next message, large background reads).
            Connecting takes at most this, or 5 s when None.
        max_connections: the client's pool size (per node on a cluster).
    """
    if is_cluster_url(url):
        return _connect_cluster(url, timeout_s, max_connections)
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=5.0 if timeout_s is None else timeout_s,
        socket_keepalive=True,
        max_connections=max_connections,
        decode_responses=False,
        health_check_interval=0,
    )


def _connect_cluster(url: str, timeout_s: float | None, max_connections: int) -> ClusterClient:
    address = parse_cluster_url(url)
    client = ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in address.seeds],
        require_full_coverage=False,  # a master down stops its own slots, not the client
        username=address.username,
        password=address.password,
        ssl=address.tls,
        socket_timeout=timeout_s,
        socket_connect_timeout=5.0 if timeout_s is None else timeout_s,
        socket_keepalive=True,
        max_connections=max_connections,
        decode_responses=False,
    )
    # No timeout means a long one for the bulk reads (a whole view's MGETs).
    client.rows = ClusterPipe(address, timeout_s=60.0 if timeout_s is None else timeout_s)
    return client


async def ping(client: Client) -> None:
    """PING; Unavailable when Redis does not answer."""
    try:
        await client.ping()  # type: ignore[misc]
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis does not answer PING: {exc}") from exc


async def mget(client: Client, keys: Sequence[bytes]) -> list[bytes | None]:
    """The values at `keys` (None where absent) in one MGET (on a cluster, one per slot,
    every master at once); Unavailable when Redis fails."""
    if isinstance(client, ClusterClient):
        return await client.rows.read_rows(keys)
    try:
        return await client.mget(keys)  # type: ignore[no-any-return]
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis failed a read of {len(keys)} keys: {exc}") from exc


async def scan_keys(client: Client, pattern: bytes, *, count: int = 1000, what: str = "") -> AsyncIterator[list[bytes]]:
    """Every key matching `pattern`, in the batches SCAN returns (`count` is its hint), on
    every master of a cluster in turn; a key may come twice if Redis rehashes meanwhile.
    Unavailable when Redis fails, naming `what` was scanned (default: the pattern)."""
    try:
        if isinstance(client, ClusterClient):
            await client.initialize()
            for node in client.get_primaries():
                async for keys in _scan(client, pattern, count, node):
                    yield keys
        else:
            async for keys in _scan(client, pattern, count, None):
                yield keys
    except (RedisError, OSError) as exc:
        raise Unavailable(f"Redis failed the scan of {what or repr(pattern)}: {exc}") from exc


async def _scan(client: Client, pattern: bytes, count: int, node: ClusterNode | None) -> AsyncIterator[list[bytes]]:
    cursor = 0
    while True:
        if node is None:
            cursor, keys = await client.scan(cursor, match=pattern, count=count)
        else:  # a cluster answers per node: {node name: cursor}, keys
            cursors, keys = await client.scan(cursor, match=pattern, count=count, target_nodes=node)
            cursor = cursors[node.name]
        if keys:
            yield keys
        if cursor == 0:
            return


async def read_rows(pipe: RedisPipe, keys: Sequence[bytes]) -> list[bytes | None]:
    """Fetch the rows at `keys` in one round trip (MGET); None where a key is absent."""
    return await pipe.execute(b"MGET", *keys)  # type: ignore[no-any-return]


class WriteCounts:
    __slots__ = ("skipped", "written")

    def __init__(self, written: int = 0, skipped: int = 0) -> None:
        self.written = written
        self.skipped = skipped


async def guarded_write(
    client: Client,
    batches: Sequence[tuple[Sequence[bytes], Sequence[bytes]]],
    expiry_ms: int,
    sha: list[str],
) -> WriteCounts:
    """Write batches of (keys, rows) with `GUARDED_SET`, all in one pipelined round trip.

    `sha` is a one-element cache of the script's SHA1 (loaded on first use and again
    after a NOSCRIPT, e.g. when Redis restarted). Returns the summed counts once Redis
    has acknowledged every batch. On a cluster the rows go one script call per slot.
    """
    if isinstance(client, ClusterClient):
        return await _guarded_write_cluster(client.rows, batches, expiry_ms, sha)
    if not sha:
        sha.append(await _load(client))
    try:
        replies = await _run(client, batches, expiry_ms, sha[0])
    except NoScriptError:
        sha[0] = await _load(client)
        replies = await _run(client, batches, expiry_ms, sha[0])
    counts = WriteCounts()
    for written, skipped in replies:
        counts.written += int(written)
        counts.skipped += int(skipped)
    return counts


async def _load(client: aioredis.Redis) -> str:
    try:
        return str(await client.script_load(GUARDED_SET))
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise Unavailable(f"Redis is unreachable: {exc}") from exc


async def _run(
    client: aioredis.Redis, batches: Sequence[tuple[Sequence[bytes], Sequence[bytes]]], expiry_ms: int, sha: str
) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for keys, rows in batches:
        pipe.evalsha(sha, len(keys), *keys, expiry_ms, *rows)
    try:
        return await pipe.execute(raise_on_error=True)
    except NoScriptError:
        raise
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise Unavailable(f"Redis is unreachable: {exc}") from exc
    except RedisError as exc:
        raise Unavailable(f"Redis failed the write: {exc}") from exc


async def _guarded_write_cluster(
    pipe: ClusterPipe, batches: Sequence[tuple[Sequence[bytes], Sequence[bytes]]], expiry_ms: int, sha: list[str]
) -> WriteCounts:
    """`GUARDED_SET` per slot (a cluster refuses a script whose keys span slots), every
    master at once; the script is loaded on every master first, and again after NOSCRIPT
    (a promoted replica may not have it)."""
    keys = [key for batch_keys, _ in batches for key in batch_keys]
    rows = [row for _, batch_rows in batches for row in batch_rows]
    groups = {slot: ([keys[i] for i in at], [rows[i] for i in at]) for slot, at in group_by_slot(keys).items()}
    if not sha:
        sha.append(await _load_everywhere(pipe))
    slots = list(groups)
    commands = [pack((b"EVALSHA", sha[0], len(k), *k, expiry_ms, *r)) for k, r in groups.values()]
    replies = await pipe.run_per_slot(slots, commands)
    missing = [
        i for i, reply in enumerate(replies) if isinstance(reply, hiredis.ReplyError) and "NOSCRIPT" in str(reply)
    ]
    if missing:
        sha[0] = await _load_everywhere(pipe)
        again = await pipe.run_per_slot([slots[i] for i in missing], [commands[i] for i in missing])
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    counts = WriteCounts()
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise Unavailable(f"Redis failed the write: {reply}")
        counts.written += int(reply[0])
        counts.skipped += int(reply[1])
    return counts


async def _load_everywhere(pipe: ClusterPipe) -> str:
    replies = await pipe.each_master(b"SCRIPT", b"LOAD", GUARDED_SET)
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise Unavailable(f"Redis refused to load the guarded-write script: {reply}")
    return str(replies[0].decode())
