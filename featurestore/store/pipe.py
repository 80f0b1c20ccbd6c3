"""A pipelined Redis connection for the read hot path: hiredis parsing, no pool.

redis-py's asyncio client costs about 130 us per command here on top of the network
(connection pool lock, StreamReader, per-call bookkeeping): a quarter of a lookup's
whole budget. A lookup needs one command, MGET, so this module sends it on a single
connection and matches replies to callers in order: Redis answers the commands of one
connection in the order it received them, so concurrent requests are pipelined for
free. Packing and parsing are hiredis's (C); only the transport is ours. Everything
else (writes, scripts, pub/sub, admin) stays on redis-py.

    pipe = RedisPipe("127.0.0.1", 6379, db=0)
    rows = await pipe.execute(b"MGET", b"k1", b"k2")
    await pipe.close()

A reply that does not come within `timeout_s` fails its caller with Unavailable and
closes the connection (its later replies would be out of order for nobody, but a stuck
server is better reconnected); the next call reconnects. Each pipe has a circuit breaker
(store/breaker.py): after a few connection failures in a row, calls fail at once with
Unavailable instead of each waiting `timeout_s`, until a probe gets a reply again.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import hiredis

from featurestore.errors import ConfigError, Unavailable
from featurestore.store.breaker import Breaker

__all__ = ["RedisPipe"]


class _Protocol(asyncio.Protocol):
    """Feeds bytes to a hiredis Reader and resolves the oldest waiting future per reply."""

    __slots__ = ("closed", "reader", "transport", "waiting")

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            future = self.waiting.popleft()
            if not future.done():  # else its caller timed out or was cancelled
                future.set_result(reply)  # a ReplyError too: the connection works (see execute)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = Unavailable(f"Redis closed the connection: {exc or 'EOF'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


def _expire(future: asyncio.Future[Any], protocol: _Protocol, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(Unavailable(f"Redis did not answer within {timeout_s} s"))
        if protocol.transport is not None:
            protocol.transport.close()


class RedisPipe:
    """One pipelined connection to Redis for commands whose replies we parse with hiredis.

    Parameters:
        host, port, db: the server and logical database.
        timeout_s: connect and reply timeout, float seconds.
        password: for AUTH, when the server asks for one.
        breaker: the circuit breaker of this connection (default: a Breaker of its own).
    """

    __slots__ = (
        "_connecting",
        "_protocol",
        "auth",
        "breaker",
        "db",
        "host",
        "password",
        "path",
        "port",
        "timeout_s",
        "tls",
    )

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        timeout_s: float = 1.0,
        password: str | None = None,
        tls: bool = False,
        path: str | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.timeout_s = timeout_s
        self.password = password
        self.auth: tuple[str, ...] = (password,) if password else ()
        self.tls = tls  # rediss://: TLS with the system's trust store
        self.path = path  # unix://: a Unix socket instead of host and port
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self.breaker = breaker or Breaker(f"Redis at {path or f'{host}:{port}'}")

    def with_user(self, username: str | None) -> RedisPipe:
        """Authenticate as `username` (Redis 6 ACLs) rather than the default user."""
        if username and self.password:
            self.auth = (username, self.password)
        return self

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 1.0) -> RedisPipe:
        """From redis://[:password@]host[:port][/db], rediss://... or unix:///path[?db=N];
        for redis+cluster://host:port,... a `store.cluster.ClusterPipe` (a RedisPipe)."""
        if url.partition("://")[0].lower() in ("redis+cluster", "rediss+cluster"):
            from featurestore.store.cluster import ClusterPipe  # it builds on this module

            return ClusterPipe.from_url(url, timeout_s=timeout_s)
        parts = urlsplit(url)
        if parts.scheme == "unix":
            db = int(parse_qs(parts.query).get("db", ["0"])[0])
            pipe = cls("", 0, db=db, timeout_s=timeout_s, password=parts.password, path=parts.path)
            return pipe.with_user(parts.username)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(f"a Redis URL starts with redis://, rediss:// or unix://: {url!r}")
        db = int(parts.path.lstrip("/") or 0)
        pipe = cls(
            parts.hostname or "127.0.0.1",
            parts.port or 6379,
            db=db,
            timeout_s=timeout_s,
            password=parts.password,
            tls=parts.scheme == "rediss",
        )
        return pipe.with_user(parts.username)

    async def execute(self, *args: bytes | str | int, timeout_s: float | None = None) -> Any:
        """Send one command and await its reply (hiredis types: bytes, list, int, None).

        Unavailable when Redis is unreachable, does not answer within `timeout_s` (default
        the pipe's), answers with an error, or is known to be down (the breaker: at once).
        """
        self.breaker.check()
        try:
            reply = await self._command(args, timeout_s)
        except Unavailable as exc:
            self.breaker.failure(exc)
            raise
        self.breaker.success()
        if isinstance(reply, hiredis.ReplyError):
            raise Unavailable(f"Redis refused the read: {reply}")
        return reply

    async def _command(self, args: tuple[bytes | str | int, ...], timeout_s: float | None) -> Any:
        """One command's reply, a hiredis.ReplyError included; Unavailable when the connection fails."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.waiting.append(future)
        protocol.transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]
        # A timer rather than asyncio.wait_for: no extra task or future per call.
        timeout_s = timeout_s or self.timeout_s
        timer = loop.call_later(timeout_s, _expire, future, protocol, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol  # another caller connected while we waited
            loop = asyncio.get_running_loop()
            try:
                if self.path:
                    opening = loop.create_unix_connection(_Protocol, self.path)
                else:
                    context = ssl.create_default_context() if self.tls else None
                    opening = loop.create_connection(_Protocol, self.host, self.port, ssl=context)
                _, protocol = await asyncio.wait_for(opening, self.timeout_s)
            except (OSError, TimeoutError) as exc:
                where = self.path or f"{self.host}:{self.port}"
                raise Unavailable(f"Redis is unreachable at {where}: {exc}") from exc
            self._protocol = protocol
            try:
                if self.password:
                    await self._set_up(b"AUTH", *self.auth)
                if self.db:
                    await self._set_up(b"SELECT", self.db)
            except Unavailable:
                await self.close()  # never leave an unauthenticated connection behind
                raise
            return protocol

    async def _set_up(self, *args: bytes | str | int) -> None:
        """A command of the connection's set-up (not `execute`: the breaker let its caller through already)."""
        reply = await self._command(args, None)
        if isinstance(reply, hiredis.ReplyError):
            raise Unavailable(f"Redis refused {args[0]!r}: {reply}")

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
