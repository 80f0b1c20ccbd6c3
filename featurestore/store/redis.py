"""The online store's operations on Redis: the one-round-trip read, the guarded write, and
the bulk reads of background work (SCAN in batches, MGET, PING) through redis-py.

Reads are one MGET for every key a request needs, whatever the number of views, sent on
a pipelined connection (store/pipe.py).
Writes go through `GUARDED_SET`, a server-side script that compares event timestamps in
the same round trip, so an older row never overwrites a newer one (a backfill can run at
any time); rows to keys that do not exist can go as native SET ... NX instead
(`set_absent`), the same guard at a third of Redis's CPU. The materialization job sends
both on a `BulkClient`'s `BulkPipe` (store/bulk.py). Redis errors are translated here
into `Unavailable`.

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
import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from featurestore.errors import Unavailable
from featurestore.store.bulk import BulkPipe, pack_evalsha, pack_set_nx
from featurestore.store.cluster import ClusterPipe, pack
from featurestore.store.pipe import RedisPipe
from featurestore.store.slots import group_by_slot, is_cluster_url, parse_cluster_url

__all__ = [
    "GUARDED_SET",
    "BulkClient",
    "Client",
    "ClusterClient",
    "Rows",
    "WriteCounts",
    "connect",
    "connect_bulk",
    "guarded_write",
    "mget",
    "ping",
    "read_rows",
    "scan_keys",
    "set_absent",
]

# KEYS: the row keys of one batch.
# ARGV[1]: expiry after the event time in milliseconds (0: no expiry); ARGV[2 .. n+1]: the
#   packed rows, one per key (bytes 8..15 of a row hold its int64 event time in
#   microseconds, little-endian; see store/layout.py).
# Each row is written, with its expiry at event time + ARGV[1] (PEXPIREAT, in ms), unless
# the stored row has a newer event time; equal times overwrite, so a rerun is idempotent.
# A stored value shorter than a row's header is overwritten.
# Returns {written, skipped_as_older, keys_that_existed}.
#
# Why this shape (Redis's own work per row, counted with callgrind on 1,000-row calls of
# 423-byte rows): each redis.call costs thousands of instructions of argument copies,
# command dispatch and reply conversion, so the script makes as few as it can: one MGET of
# the stored rows (not a GETRANGE per key), one MSET of every row to write, then one
# PEXPIREAT per row (Redis has no multi-key expiry), its time formatted with '%d' (Lua's
# own number-to-string is a '%.14g' printf). 18,100 instructions per new key and 21,200
# per replaced row, against 29,500 and 30,200 for a GETRANGE and a SET ... PXAT per row.
# Lua's unpack takes at most 8,000 values, hence the chunks of 4,000.
GUARDED_SET = """
local expiry_ms = tonumber(ARGV[1])
local call, int64, floor, format, min = redis.call, struct.unpack, math.floor, string.format, math.min
local n, chunk = #KEYS, 4000
local existed, old = 0, {}
for j = 1, n, chunk do
  local part = call('MGET', unpack(KEYS, j, min(j + chunk - 1, n)))
  for k = 1, #part do
    old[j + k - 1] = part[k]
    if part[k] then existed = existed + 1 end
  end
end
local pairs_, at, written, skipped = {}, {}, 0, 0
for i = 1, n do
  local row, stored = ARGV[i + 1], old[i]
  local ts = int64('<i8', row, 9)
  if stored and #stored >= 16 and int64('<i8', stored, 9) > ts then
    skipped = skipped + 1
  else
    written = written + 1
    pairs_[2 * written - 1], pairs_[2 * written] = KEYS[i], row
    at[written] = floor(ts / 1000) + expiry_ms
  end
end
for j = 1, 2 * written, chunk do
  call('MSET', unpack(pairs_, j, min(j + chunk - 1, 2 * written)))
end
if expiry_ms > 0 then
  for j = 1, written do call('PEXPIREAT', pairs_[2 * j - 1], format('%d', at[j])) end
end
return {written, skipped, existed}
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

Rows = Sequence[bytes] | npt.NDArray[np.uint8]
"""Packed rows (store/layout.py): a bytes object per row, or a uint8 matrix of one row
per line (`encode_fixed_rows`, for views without variable-width features)."""


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


def connect_bulk(url: str, *, timeout_s: float = 10.0, max_connections: int = 8) -> Client:
    """A client for bulk writes: for one Redis a `BulkClient` (redis-py for the
    bookkeeping, a `BulkPipe` for the rows), for a redis+cluster:// URL a `ClusterClient`
    (whose rows go one script call per slot through its `ClusterPipe`).

    Parameters:
        timeout_s: connect and reply timeout, float seconds; a pipeline of a few thousand
            script calls must fit in it.
        max_connections: redis-py's pool size (per node on a cluster).
    """
    if is_cluster_url(url):
        return _connect_cluster(url, timeout_s, max_connections)
    pool = aioredis.ConnectionPool.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=max_connections
    )
    client = BulkClient(connection_pool=pool)
    client.auto_close_connection_pool = True  # the client owns the pool: aclose() closes both
    client.rows = BulkPipe.from_url(url, timeout_s=timeout_s)
    return client


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
    """What a guarded write did: rows written, rows skipped as older than the stored ones,
    and how many of the keys existed before (the writer's hint for its next batch)."""

    __slots__ = ("existed", "skipped", "written")

    def __init__(self, written: int = 0, skipped: int = 0, existed: int = 0) -> None:
        self.written = written
        self.skipped = skipped
        self.existed = existed

    def add(self, other: WriteCounts) -> None:
        self.written += other.written
        self.skipped += other.skipped
        self.existed += other.existed

    @classmethod
    def of(cls, replies: Sequence[Any]) -> WriteCounts:
        """The sum of `GUARDED_SET` replies ({written, skipped, existed} each)."""
        counts = cls()
        for reply in replies:
            counts.add(cls(int(reply[0]), int(reply[1]), int(reply[2])))
        return counts


class BulkClient(aioredis.Redis):
    """redis-py's asyncio client of one Redis, plus `rows`: a `BulkPipe` to the same server
    for the bulk writes (`guarded_write`, `set_absent`). `aclose` closes both.

    The materialization job's client (materialize/sink.py `connect`); on a cluster a
    `ClusterClient` plays this part.
    """

    rows: BulkPipe

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await self.rows.close()
        await super().aclose(close_connection_pool)


async def guarded_write(
    client: Client,
    batches: Sequence[tuple[Sequence[bytes], Rows]],
    expiry_ms: int,
    sha: list[str],
) -> WriteCounts:
    """Write batches of (keys, rows) with `GUARDED_SET`, one script call per batch, all in
    one pipelined round trip.

    `sha` is a one-element cache of the script's SHA1 (loaded on first use and again
    after a NOSCRIPT, e.g. when Redis restarted). Returns the summed counts once Redis
    has acknowledged every batch. On a cluster the rows go one script call per slot; a
    `BulkClient` sends them on its `BulkPipe` (packed by numpy when the rows are a matrix).
    """
    if isinstance(client, ClusterClient):
        return await _guarded_write_cluster(client.rows, batches, expiry_ms, sha)
    if isinstance(client, BulkClient):
        return await _guarded_write_bulk(client.rows, batches, expiry_ms, sha)
    if not sha:
        sha.append(await _load(client))
    try:
        replies = await _run(client, batches, expiry_ms, sha[0])
    except NoScriptError:
        sha[0] = await _load(client)
        replies = await _run(client, batches, expiry_ms, sha[0])
    return WriteCounts.of(replies)


def _row_list(rows: Rows) -> Sequence[bytes]:
    if not isinstance(rows, np.ndarray):
        return rows
    blob, size = rows.tobytes(), rows.shape[1]
    return [blob[i : i + size] for i in range(0, len(blob), size)]


# A row whose key does not exist is written by GUARDED_SET whatever its event time, so a
# native SET ... NX is the same guarded write for such keys, at Redis's native cost: 10,600
# instructions per row against 18,100 for the script (callgrind, 423-byte rows). A key that
# exists is left alone by NX and its row goes through the script; between the two, a key
# that appears or changes is judged by the script as it stands then.
_SET_NX = b"*4\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$2\r\nNX\r\n"
_SET_NX_PXAT = b"*6\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$4\r\nPXAT\r\n$%d\r\n%d\r\n$2\r\nNX\r\n"


async def set_absent(
    client: BulkClient, keys: Sequence[bytes], rows: Rows, expire_at_ms: npt.NDArray[np.int64] | None
) -> list[int]:
    """Write each row whose key does not exist (SET ... NX, with PXAT its expiry), all in
    one round trip; returns the indices of the rows not written: their key existed (or
    their expiry is not a positive time, which only the script handles).

    With `guarded_write` of the returned rows, this is the guarded write of a batch
    whose keys are mostly new (a first load), at a fraction of the script's cost.

    Parameters:
        keys, rows: the row keys and packed rows, in the same order.
        expire_at_ms: each row's expiry, Unix milliseconds (event time + the view's
            expiry, as GUARDED_SET computes it), or None: no expiry.

    Example:
        rest = await set_absent(client, keys, rows, None)
        await guarded_write(client, [([keys[i] for i in rest], [rows[i] for i in rest])], 0, sha)
    """
    n = len(keys)
    sent = np.arange(n)
    if expire_at_ms is not None and (expire_at_ms <= 0).any():
        sent = np.flatnonzero(expire_at_ms > 0)  # PXAT takes positive times only
        keys, rows, expire_at_ms = [keys[i] for i in sent.tolist()], _take(rows, sent), expire_at_ms[sent]
    if isinstance(rows, np.ndarray):
        packed, order = pack_set_nx(keys, rows, expire_at_ms)
    else:
        packed, order = memoryview(b"".join(_set_nx_commands(keys, rows, expire_at_ms))), np.arange(len(keys))
    replies = await client.rows.run(packed, len(keys))
    error = next((r for r in replies if isinstance(r, hiredis.ReplyError)), None)
    if error is not None:
        raise Unavailable(f"Redis failed the write: {error}")
    written = np.zeros(n, dtype=bool)
    written[sent[order[np.fromiter((r is not None for r in replies), dtype=bool, count=len(replies))]]] = True
    return np.flatnonzero(~written).tolist()


def _take(rows: Rows, at: npt.NDArray[np.intp]) -> Rows:
    return rows[at] if isinstance(rows, np.ndarray) else [rows[i] for i in at.tolist()]


def _set_nx_commands(
    keys: Sequence[bytes], rows: Sequence[bytes], expire_at_ms: npt.NDArray[np.int64] | None
) -> list[bytes]:
    """SET ... NX packed per row (rows of different sizes: no matrix to pack them from)."""
    if expire_at_ms is None:
        return [_SET_NX % (len(k), k, len(r), r) for k, r in zip(keys, rows, strict=True)]
    pxat = _SET_NX_PXAT
    return [
        pxat % (len(k), k, len(r), r, len(b"%d" % at), at)
        for k, r, at in zip(keys, rows, expire_at_ms.tolist(), strict=True)
    ]


async def _guarded_write_bulk(
    pipe: BulkPipe, batches: Sequence[tuple[Sequence[bytes], Rows]], expiry_ms: int, sha: list[str]
) -> WriteCounts:
    if not sha:
        sha.append(await _load_bulk(pipe))
    commands = [_evalsha(sha[0], keys, rows, expiry_ms) for keys, rows in batches]
    replies = await pipe.run(memoryview(b"".join(commands)), len(commands))
    missing = [i for i, reply in enumerate(replies) if _noscript(reply)]
    if missing:  # Redis restarted or its scripts were flushed: the same SHA1 once loaded again
        sha[0] = await _load_bulk(pipe)
        again = await pipe.run(memoryview(b"".join(commands[i] for i in missing)), len(missing))
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    error = next((r for r in replies if isinstance(r, hiredis.ReplyError)), None)
    if error is not None:
        raise Unavailable(f"Redis failed the write: {error}")
    return WriteCounts.of(replies)


def _evalsha(sha: str, keys: Sequence[bytes], rows: Rows, expiry_ms: int) -> bytes | memoryview:
    """One GUARDED_SET call, packed."""
    if isinstance(rows, np.ndarray):
        packed, _ = pack_evalsha(sha, keys, rows, expiry_ms, per_call=max(len(keys), 1))
        return packed
    return pack((b"EVALSHA", sha, len(keys), *keys, expiry_ms, *rows))


def _noscript(reply: Any) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


async def _load_bulk(pipe: BulkPipe) -> str:
    (reply,) = await pipe.run(pack((b"SCRIPT", b"LOAD", GUARDED_SET)), 1)
    if isinstance(reply, hiredis.ReplyError):
        raise Unavailable(f"Redis refused to load the guarded-write script: {reply}")
    return str(reply.decode())


async def _load(client: aioredis.Redis) -> str:
    try:
        return str(await client.script_load(GUARDED_SET))
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise Unavailable(f"Redis is unreachable: {exc}") from exc


async def _run(
    client: aioredis.Redis, batches: Sequence[tuple[Sequence[bytes], Rows]], expiry_ms: int, sha: str
) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for keys, rows in batches:
        pipe.evalsha(sha, len(keys), *keys, expiry_ms, *_row_list(rows))
    try:
        return await pipe.execute(raise_on_error=True)
    except NoScriptError:
        raise
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise Unavailable(f"Redis is unreachable: {exc}") from exc
    except RedisError as exc:
        raise Unavailable(f"Redis failed the write: {exc}") from exc


async def _guarded_write_cluster(
    pipe: ClusterPipe, batches: Sequence[tuple[Sequence[bytes], Rows]], expiry_ms: int, sha: list[str]
) -> WriteCounts:
    """`GUARDED_SET` per slot (a cluster refuses a script whose keys span slots), every
    master at once; the script is loaded on every master first, and again after NOSCRIPT
    (a promoted replica may not have it)."""
    keys = [key for batch_keys, _ in batches for key in batch_keys]
    rows = [row for _, batch_rows in batches for row in _row_list(batch_rows)]
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
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise Unavailable(f"Redis failed the write: {reply}")
    return WriteCounts.of(replies)


async def _load_everywhere(pipe: ClusterPipe) -> str:
    replies = await pipe.each_master(b"SCRIPT", b"LOAD", GUARDED_SET)
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise Unavailable(f"Redis refused to load the guarded-write script: {reply}")
    return str(replies[0].decode())
