"""Reads (and bulk writes) on a Redis Cluster: every master at once, one round trip of wall time.

    pipe = ClusterPipe.from_url("redis+cluster://10.0.0.5:7000,10.0.0.6:7000/")
    rows = await pipe.execute(b"MGET", *row_keys)      # as RedisPipe.execute
    await pipe.close()

A `ClusterPipe` is a `RedisPipe` (store/pipe.py) for a cluster, so the lookup, the hot
cache and the scorer use it unchanged: `RedisPipe.from_url` returns one for a
redis+cluster:// URL. A cluster refuses an MGET whose keys are in different slots (even
on one node), so a read is cut into one MGET per slot (row keys hash on their entity,
store/slots.py: one MGET per entity, all its views), the MGETs of one master are packed
by hiredis into one write on that master's connection, every master's write goes out
before any reply is awaited, and the replies are put back in the caller's order: the
wall time is one round trip (the slowest master's), not one per master. Each master
has one pipelined connection, like RedisPipe's; replies come back in order, so
concurrent calls pipeline for free.

The slot map (which master serves which slot) comes from CLUSTER SLOTS, asked of the
known masters and then the URL's seeds, on first use and again whenever a reply says
it is stale. The rules, per slot group of one call:

- MOVED: the map is stale (a failover, a resharding): the slot is pointed at the new
  master at once, the map is read again, and the group is sent again, once.
- ASK: the slot is being migrated and this key already moved: the group is sent again,
  once, to the node named, preceded by ASKING (the map stays as it is).
- TRYAGAIN, CLUSTERDOWN, or a master that cannot be reached (connection refused or
  lost): the map is read again (at most every 0.1 s) and the group sent again, once.
- A master that does not answer within the timeout: no second try (the time is spent).

A group that still fails fails the whole call with `Unavailable` (UNAVAILABLE for the
caller), naming the master and how many of the call's keys it serves; rows that other
masters returned are not served. The choice (README, "Redis Cluster"): a row we could
not read is not absent, and reporting NOT_FOUND would let a model score on defaults
without knowing it; UNAVAILABLE is what the caller already handles for a down Redis,
and a retry succeeds once the cluster has promoted a replica (cluster-node-timeout plus
an election: about 2 s with a 1 s node timeout, see benchmarks/README.md). Rows the hot
cache holds are still served from it.

Each node has its own circuit breaker (store/breaker.py): while a master is known to be
down its slot groups fail at once (and, like any failed group, are retried once after a
slot-map refresh, which finds the promoted replica), while the others are served as usual.

Commands other than MGET go to the master of their first key's slot (keyless ones to
any master); `run_per_slot` sends prepared commands slot by slot (the guarded write
uses it: store/redis.py), and `each_master` sends one command to every master (SCRIPT
LOAD). Reads always go to masters: a replica may lag behind a write the caller just
made.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis

from featurestore.errors import Unavailable
from featurestore.store.breaker import Breaker
from featurestore.store.pipe import RedisPipe
from featurestore.store.slots import SLOTS, ClusterAddress, group_by_slot, key_slot, parse_cluster_url

__all__ = ["ClusterPipe", "pack"]

log = logging.getLogger(__name__)

# hiredis's stub declares a 1-tuple; any tuple of bytes, str and numbers is packed.
pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)
_ASKING = pack((b"ASKING",))
_REFRESH_MIN_S = 0.1  # the slot map is re-read at most this often after a failed node
# Commands without a key: any master answers them.
_KEYLESS = frozenset({b"PING", b"ECHO", b"INFO", b"TIME", b"CLUSTER", b"SCRIPT", b"DBSIZE", b"FLUSHALL", b"FLUSHDB"})


class _Batch:
    """The replies to `expected` commands written together on one connection."""

    __slots__ = ("expected", "future", "replies", "timed_out")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int) -> None:
        self.future = future
        self.expected = expected
        self.replies: list[Any] = []
        self.timed_out = False


class _Protocol(asyncio.Protocol):
    """hiredis parsing; replies (error replies too, as values) go to the oldest batch."""

    __slots__ = ("closed", "reader", "transport", "waiting")

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[_Batch] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while (reply := self.reader.gets()) is not False:
            batch = waiting[0]
            batch.replies.append(reply)
            if len(batch.replies) == batch.expected:
                waiting.popleft()
                if not batch.future.done():  # its caller gave up: the replies are dropped
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            batch = self.waiting.popleft()
            if not batch.future.done():
                batch.future.set_exception(Unavailable(f"Redis closed the connection: {exc or 'EOF'}"))


class _Node:
    """One cluster node and our pipelined connection to it (opened on first use)."""

    __slots__ = ("_connecting", "address", "breaker", "host", "port", "protocol")

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.breaker = Breaker(f"Redis Cluster node {self.address}")
        self.protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @property
    def connected(self) -> bool:
        return self.protocol is not None and not self.protocol.closed

    def send(self, packed: bytes, expected: int) -> _Batch:
        """Write packed commands (`expected` replies); the caller awaits the batch's future."""
        protocol = self.protocol
        assert protocol is not None and protocol.transport is not None
        batch = _Batch(asyncio.get_running_loop().create_future(), expected)
        protocol.waiting.append(batch)
        protocol.transport.write(packed)
        return batch

    async def connect(self, address: ClusterAddress, timeout_s: float) -> None:
        """Open the connection (and AUTH); Unavailable when the node cannot be reached."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return
            loop = asyncio.get_running_loop()
            context = ssl.create_default_context() if address.tls else None
            try:
                opening = loop.create_connection(_Protocol, self.host, self.port, ssl=context)
                _, protocol = await asyncio.wait_for(opening, timeout_s)
            except (OSError, TimeoutError) as exc:
                raise Unavailable(f"Redis Cluster node {self.address} is unreachable: {exc}") from exc
            self.protocol = protocol
            if address.password:
                auth = (b"AUTH", *(() if address.username is None else (address.username,)), address.password)
                batch = self.send(pack(auth), 1)
                try:
                    (reply,) = await asyncio.wait_for(batch.future, timeout_s)
                except (Unavailable, TimeoutError) as exc:
                    self.close()
                    raise Unavailable(f"Redis Cluster node {self.address} did not authenticate us: {exc}") from exc
                if isinstance(reply, hiredis.ReplyError):
                    self.close()
                    raise Unavailable(f"Redis Cluster node {self.address} refused AUTH: {reply}")

    def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None


@dataclass(slots=True)
class _Failure:
    """Why the command at `index` failed in a round, and where to send it next."""

    index: int
    reason: str
    retry: bool  # worth a second try (after reading the map again, or at `ask`)
    ask: _Node | None = None
    moved: _Node | None = None


def _expire(batches: Iterable[tuple[_Node, list[int], _Batch, bool]], timeout_s: float) -> None:
    for node, _, batch, _ in batches:
        if not batch.future.done():
            batch.timed_out = True
            batch.future.set_exception(
                Unavailable(f"Redis Cluster node {node.address} did not answer within {timeout_s} s")
            )
            node.close()  # a stuck node is better reconnected: its late replies would be out of order


class ClusterPipe(RedisPipe):
    """A `RedisPipe` for a Redis Cluster: per-slot commands fanned out to every master at once.

    Parameters:
        address: the seeds and credentials (`store.slots.parse_cluster_url`).
        timeout_s: connect and reply timeout of each round, float seconds.

    Example:

        pipe = ClusterPipe.from_url("redis+cluster://127.0.0.1:7000/", timeout_s=1.0)
        rows = await pipe.read_rows([b"recsys:user_profile:{1}", b"recsys:user_profile:{2}"])
    """

    __slots__ = ("_nodes", "_owners", "_refreshed_at", "_refreshing", "address")

    def __init__(self, address: ClusterAddress, *, timeout_s: float = 1.0) -> None:
        host, port = address.seeds[0]
        super().__init__(host, port, timeout_s=timeout_s, password=address.password, tls=address.tls)
        self.address = address
        self._nodes: dict[tuple[str, int], _Node] = {}
        self._owners: list[_Node | None] | None = None  # slot -> its master; None until read
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = 0.0

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0) -> ClusterPipe:
        """From redis+cluster://[user:password@]host:port[,host:port...][/] (or rediss+cluster://)."""
        return cls(parse_cluster_url(url), timeout_s=timeout_s)

    # Commands -----------------------------------------------------------------------------

    async def execute(self, *args: bytes | str | int, timeout_s: float | None = None) -> Any:
        """Send one command and await its reply, as `RedisPipe.execute` does: MGET across
        slots is split per slot; another command goes to the master of its first key."""
        name = args[0].upper() if isinstance(args[0], bytes) else str(args[0]).upper().encode()
        if name == b"MGET":
            return await self.read_rows([_key(a) for a in args[1:]], timeout_s)
        slot = 0 if name in _KEYLESS or len(args) < 2 else key_slot(_key(args[1]))
        (reply,) = await self.run_per_slot([slot], [pack(args)], timeout_s)
        if isinstance(reply, hiredis.ReplyError):
            raise Unavailable(f"Redis refused the read: {reply}")
        return reply

    async def read_rows(self, keys: Sequence[bytes], timeout_s: float | None = None) -> list[bytes | None]:
        """The value at each key (None where absent): one MGET per slot, every master at once."""
        groups = group_by_slot(keys)
        commands = [pack((b"MGET", *[keys[i] for i in at])) for at in groups.values()]
        replies = await self.run_per_slot(list(groups), commands, timeout_s)
        rows: list[bytes | None] = [None] * len(keys)
        for at, reply in zip(groups.values(), replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                raise Unavailable(f"Redis refused the read: {reply}")
            for i, row in zip(at, reply, strict=True):
                rows[i] = row
        return rows

    async def run_per_slot(
        self, slots: Sequence[int], commands: Sequence[bytes], timeout_s: float | None = None
    ) -> list[Any]:
        """Send each packed command to the master of its slot, every master at once, and
        return the replies in order. Redirections and unreachable masters are handled as
        the module docstring says; other error replies come back as `hiredis.ReplyError`
        values. Unavailable when a command still fails after its second try."""
        if self._owners is None:
            await self.refresh()
        timeout_s = timeout_s or self.timeout_s
        replies: list[Any] = [None] * len(commands)
        todo: Sequence[int] = range(len(commands))
        asked: dict[int, _Node] = {}
        for attempt in (1, 2):
            failed = await self._round(slots, commands, todo, asked, replies, timeout_s)
            if not failed:
                return replies
            if attempt == 2 or not all(f.retry for f in failed):
                break
            for f in failed:
                if f.moved is not None and self._owners is not None:
                    self._owners[slots[f.index]] = f.moved
            if any(f.ask is None for f in failed):
                await self.refresh(min_age_s=_REFRESH_MIN_S)
            asked = {f.index: f.ask for f in failed if f.ask is not None}
            todo = [f.index for f in failed]
        worst = next((f for f in failed if not f.retry), failed[0])
        raise Unavailable(f"{worst.reason} ({len(failed)} of the call's {len(commands)} slot groups failed)")

    async def each_master(self, *args: bytes | str | int, timeout_s: float | None = None) -> list[Any]:
        """Send one command to every master (e.g. SCRIPT LOAD); their replies, error
        replies as `hiredis.ReplyError` values."""
        if self._owners is None:
            await self.refresh()
        first: dict[_Node, int] = {}
        for slot, node in enumerate(self._owners or ()):
            if node is not None and node not in first:
                first[node] = slot
        packed = pack(args)
        return await self.run_per_slot(list(first.values()), [packed] * len(first), timeout_s)

    # One round: every master written to, then every reply awaited ---------------------------

    async def _round(
        self,
        slots: Sequence[int],
        commands: Sequence[bytes],
        todo: Iterable[int],
        asked: dict[int, _Node],
        replies: list[Any],
        timeout_s: float,
    ) -> list[_Failure]:
        owners = self._owners or [None] * SLOTS
        failed: list[_Failure] = []
        by_node: dict[tuple[_Node, bool], list[int]] = {}  # (node, after ASKING) -> commands
        verdicts: dict[_Node, str | None] = {}  # each node's breaker asked once per round
        for i in todo:
            node = asked.get(i) or owners[slots[i]]
            if node is None:
                failed.append(_Failure(i, f"no Redis Cluster master serves slot {slots[i]}", retry=True))
            elif (
                refused := verdicts[node] if node in verdicts else verdicts.setdefault(node, _refused(node))
            ):  # known down: fail at once, retry after a refresh
                failed.append(_Failure(i, refused, retry=True))
            elif (at := by_node.get(where := (node, i in asked))) is None:
                by_node[where] = [i]
            else:
                at.append(i)
        await self._connect_all(by_node, failed, timeout_s)
        sent = []
        for (node, asking), at in by_node.items():
            if asking:  # ASKING applies to the next command only: one before each
                batch = node.send(b"".join(_ASKING + commands[i] for i in at), 2 * len(at))
            elif len(at) == 1:
                batch = node.send(commands[at[0]], 1)
            else:
                batch = node.send(b"".join([commands[i] for i in at]), len(at))
            sent.append((node, at, batch, asking))
        timer = asyncio.get_running_loop().call_later(timeout_s, _expire, sent, timeout_s)
        try:
            for node, at, batch, asking in sent:
                try:
                    got = await batch.future
                except Unavailable as exc:
                    node.breaker.failure(exc)
                    retry = not batch.timed_out
                    failed += [_Failure(i, f"Redis Cluster node {node.address}: {exc}", retry) for i in at]
                    continue
                node.breaker.success()
                for i, reply in zip(at, got[1::2] if asking else got, strict=True):
                    if isinstance(reply, hiredis.ReplyError) and (failure := self._redirected(i, reply)):
                        failed.append(failure)
                    else:
                        replies[i] = reply
        finally:
            timer.cancel()
            for _, _, batch, _ in sent:  # a caller cancelled mid-way: nobody will read these
                if not batch.future.done():
                    batch.future.cancel()
        return failed

    async def _connect_all(
        self, by_node: dict[tuple[_Node, bool], list[int]], failed: list[_Failure], timeout_s: float
    ) -> None:
        closed = list(dict.fromkeys(node for node, _ in by_node if not node.connected))
        if not closed:
            return
        results = await asyncio.gather(*(n.connect(self.address, timeout_s) for n in closed), return_exceptions=True)
        for node, result in zip(closed, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Unavailable):
                    raise result
                node.breaker.failure(result)
                for where in [w for w in by_node if w[0] is node]:
                    failed += [_Failure(i, str(result), retry=True) for i in by_node.pop(where)]

    def _redirected(self, index: int, reply: hiredis.ReplyError) -> _Failure | None:
        """The failure an error reply means for the cluster (None: the caller's to judge)."""
        text = str(reply)
        kind, _, rest = text.partition(" ")
        if kind in ("MOVED", "ASK"):
            _, _, target = rest.partition(" ")
            host, _, port = target.rpartition(":")
            node = self._node(host or self.host, int(port))
            if kind == "ASK":
                return _Failure(index, f"Redis Cluster redirected a read twice: {text}", retry=True, ask=node)
            return _Failure(index, f"the Redis Cluster slot map kept moving: {text}", retry=True, moved=node)
        if kind in ("TRYAGAIN", "CLUSTERDOWN"):
            return _Failure(index, f"Redis Cluster: {text}", retry=True)
        return None

    # The slot map -------------------------------------------------------------------------

    def _node(self, host: str, port: int) -> _Node:
        node = self._nodes.get((host, port))
        if node is None:
            node = self._nodes[host, port] = _Node(host, port)
        return node

    async def refresh(self, *, min_age_s: float = 0.0) -> None:
        """Read the slot map again (concurrent callers share one read); skipped when the
        last one finished less than `min_age_s` ago. Unavailable when no node answers."""
        if min_age_s and time.monotonic() - self._refreshed_at < min_age_s and self._owners is not None:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_map())
            self._refreshing.add_done_callback(_retrieve)
        await asyncio.shield(self._refreshing)

    async def _read_map(self) -> None:
        masters = list(dict.fromkeys(n for n in self._owners or () if n is not None))
        candidates = [n for n in masters if n.connected] + [self._node(h, p) for h, p in self.address.seeds]
        candidates += [n for n in masters if not n.connected] + list(self._nodes.values())
        errors: list[str] = []
        for node in dict.fromkeys(candidates):
            try:
                if not node.connected:
                    await node.connect(self.address, self.timeout_s)
                batch = node.send(pack((b"CLUSTER", b"SLOTS")), 1)
                (reply,) = await asyncio.wait_for(batch.future, self.timeout_s)
            except (Unavailable, TimeoutError) as exc:
                node.close()
                errors.append(f"{node.address}: {exc or 'no answer'}")
                continue
            if isinstance(reply, hiredis.ReplyError):
                errors.append(f"{node.address}: {reply}")
                continue
            self._owners = self._parse_slots(reply, node)
            self._refreshed_at = time.monotonic()
            self._forget_others()
            return
        raise Unavailable(f"no Redis Cluster node answered CLUSTER SLOTS ({'; '.join(errors)})")

    def _parse_slots(self, reply: list[Any], asked: _Node) -> list[_Node | None]:
        """CLUSTER SLOTS -> slot to master: [[start, end, [host, port, id, ...], replicas...], ...]."""
        owners: list[_Node | None] = [None] * SLOTS
        for start, end, master, *_ in reply:
            host = master[0].decode() if master[0] else asked.host  # "": the node we asked
            node = self._node(host, int(master[1]))
            owners[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
        return owners

    def _forget_others(self) -> None:
        """Close connections to nodes that are neither masters nor seeds any more."""
        keep = {(n.host, n.port) for n in self._owners or () if n is not None} | set(self.address.seeds)
        for where in [w for w in self._nodes if w not in keep]:
            self._nodes.pop(where).close()

    async def close(self) -> None:
        """Close every node's connection (the next call opens them again)."""
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Unavailable):
                await self._refreshing
        for node in self._nodes.values():
            node.close()
        self._owners = None

    def masters(self) -> list[str]:
        """host:port of every master in the current slot map (empty before the first read)."""
        return sorted({n.address for n in self._owners or () if n is not None})


def _key(arg: bytes | str | int) -> bytes:
    return arg if isinstance(arg, bytes) else str(arg).encode()


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a shared refresh's error as seen (its waiters may all have been cancelled)."""
    if not future.cancelled():
        future.exception()


def _refused(node: _Node) -> str | None:
    """Why `node`'s breaker refuses a call now (None: it may go through, maybe as the probe)."""
    try:
        node.breaker.check()
    except Unavailable as exc:
        return str(exc)
    return None
