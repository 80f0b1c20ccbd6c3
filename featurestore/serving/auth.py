"""Who may call what: bearer tokens with scopes, checked in one server interceptor.

    keyring = Keyring(Path("tokens.txt"))        # ConfigError naming the file and line
    keyring.load()
    server = aio.server(interceptors=[ErrorInterceptor(), AuthInterceptor(keyring)])

A caller sends the metadata `authorization: Bearer <token>`. The server never holds a
token, only its SHA-256, in a token file (`--auth-tokens`, re-read when it changes) or in
the setting `--auth-token-hashes` (the same entries separated by `;`, for deployments that
pass secrets in the environment):

    # name the holder: the name shows in the log when one of its calls is refused
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 read recommender
    sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752 read,admin ops

`featurestore hash-token` writes such a line. What each method needs:

    /grpc.health.v1.Health/*                          nothing: probes must work
    /grpc.reflection.v1alpha.ServerReflection/*       nothing with reflection_open,
                                                      else any valid token
    /featurestore.v1.FeatureStore/*                   the read scope (lookups, search,
                                                      Predict, Rank)
    /featurestore.v1.FeatureStoreAdmin/*, any other   the admin scope

No token, a malformed `authorization` or a token the server does not know is
UNAUTHENTICATED; a known token without the scope is PERMISSION_DENIED. Scopes are
independent: admin does not imply read.

The comparison is constant-time: the presented token's SHA-256 is compared with every known
hash by `hmac.compare_digest`, without stopping at a match, so the time taken says nothing
about how close a guess was or which entry matched.

Order: the ErrorInterceptor runs outside this one. A refused unary call gets a handler that
raises Unauthenticated or PermissionDenied, which the ErrorInterceptor turns into the status
and counts per code in featurestore_requests_total like every other error, with no
traceback. Refused streams (reflection) end here, counted the same way. A refused handler
has no request deserializer: a caller without a valid token cannot make the server parse a
byte of its message. Refusals are logged at most once per `LOG_EVERY_S` (method, peer,
reason, and how many more were refused since): a flood of bad calls cannot flood the log.
Tokens never reach a log line, a status message or a repr; a line of the token file that
does not parse is named by its number only (it may hold a pasted token).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from featurestore import metrics
from featurestore._proto.featurestore.v1 import featurestore_pb2 as pb
from featurestore.config import SecuritySettings
from featurestore.errors import ERROR_METADATA_KEY, ConfigError, PermissionDenied, Unauthenticated

__all__ = [
    "ADMIN",
    "READ",
    "SCOPES",
    "AuthInterceptor",
    "Keyring",
    "Token",
    "Tokens",
    "bind_warning",
    "hash_token",
    "parse_tokens",
    "token_line",
]

log = logging.getLogger(__name__)

READ, ADMIN = "read", "admin"
SCOPES = (READ, ADMIN)
LOG_EVERY_S = 10.0  # at most one log line per this many seconds about refused calls

_OPEN = ""  # the requirement of a method open to all
_ANY = "*"  # the requirement of a method open to any valid token
_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
_SERVICE_SCOPES = {
    f"/{pb.DESCRIPTOR.services_by_name['FeatureStore'].full_name}/": READ,
    f"/{pb.DESCRIPTOR.services_by_name['FeatureStoreAdmin'].full_name}/": ADMIN,
}
_ENTRY = re.compile(r"sha256:([0-9a-fA-F]{64})")
_NAME = re.compile(r"[A-Za-z0-9._@:/+-]{1,64}")


def hash_token(token: str) -> str:
    """The token file's form of `token`: "sha256:" and the hex of its SHA-256.

    >>> hash_token("test")
    'sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
    """
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_line(token: str, scopes: Sequence[str], name: str = "") -> str:
    """One line of a token file for `token` with `scopes` and the holder's `name`; ConfigError on a bad scope or name.

    >>> token_line("test", ["read"], "app")
    'sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 read app'
    """
    line = f"{hash_token(token)} {','.join(scopes)}" + (f" {name}" if name else "")
    parse_tokens(line, "the new line")  # the same checks as the server's
    return line


@dataclass(frozen=True, slots=True)
class Token:
    """A token the server accepts: its holder's name, its SHA-256 and its scopes."""

    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[str]


def parse_tokens(text: str, source: str, *, separator: str = "\n") -> tuple[Token, ...]:
    """The tokens of a token file's text (or of `;`-separated entries with separator=";").

    Parameters:
        text: lines of `sha256:<64 hex> <scopes> [name]`; blank lines and lines starting
            with # are skipped; scopes are read and/or admin, comma-separated.
        source: how errors name the text, e.g. "token file '/etc/featurestore/tokens'".
        separator: what separates entries.

    Returns the tokens in order. Raises ConfigError naming `source` and the entry's number
    (never its text) for an entry that does not parse or repeats an earlier hash.

    >>> parse_tokens("sha256:" + "0" * 64 + " read,admin ops", "example")[0].scopes == {"read", "admin"}
    True
    """
    tokens: list[Token] = []
    seen: dict[bytes, int] = {}
    unit = "line" if separator == "\n" else "entry"
    for number, raw in enumerate(text.split(separator), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, {unit} {number}"
        parts = line.split()
        matched = _ENTRY.fullmatch(parts[0])
        if matched is None or len(parts) not in (2, 3):
            raise ConfigError(
                f"{where}: expected `sha256:<64 hex digits> <scopes> [name]` (see featurestore hash-token)"
            )
        scopes = frozenset(parts[1].split(","))
        if not scopes <= set(SCOPES) or "" in scopes:
            raise ConfigError(f"{where}: scopes must be read, admin or read,admin")
        name = parts[2] if len(parts) == 3 else parts[0][:15]  # "sha256:" and 8 hex digits
        if len(parts) == 3 and _NAME.fullmatch(name) is None:
            raise ConfigError(f"{where}: a name is 1 to 64 letters, digits or ._@:/+-")
        digest = bytes.fromhex(matched.group(1))
        if digest in seen:
            raise ConfigError(f"{where}: the same hash as entry {seen[digest]}")
        seen[digest] = number
        tokens.append(Token(name, digest, scopes))
    return tuple(tokens)


class Tokens:
    """An immutable set of accepted tokens; `find` compares in constant time."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: Sequence[Token] = ()) -> None:
        self._tokens = tuple(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def find(self, presented: str) -> Token | None:
        """The token whose hash is the SHA-256 of `presented`, or None.

        Every known hash is compared, whatever matched: the time does not depend on which
        entry matched, nor (through the hash) on how close `presented` is to a token.
        """
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for token in self._tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


class Keyring:
    """The tokens the server accepts: the token file's, re-read when it changes, plus fixed entries.

    Parameters:
        path: the token file (None: none).
        entries: `;`-separated entries in the file's format (None: none).
        poll_s: seconds between reads of the file, in `watch`.

    `load` reads both at start (ConfigError when either does not parse); `watch` then
    reads the file every `poll_s` off the event loop and swaps in its tokens when its bytes
    changed (bytes, not the modification time, which a quick second write can leave as it
    was) and it parses. A file that fails to parse or vanishes is logged once and the
    previous tokens stay: a half-written file never locks every caller out. Calls already
    checked keep their answer.

        keyring = Keyring(Path("/etc/featurestore/tokens"))
        keyring.load()
        task = asyncio.create_task(keyring.watch())
    """

    def __init__(self, path: Path | None = None, entries: str | None = None, *, poll_s: float = 1.0) -> None:
        self.path = path
        self.poll_s = poll_s
        self.tokens = Tokens()
        self._fixed = parse_tokens(entries, "auth_token_hashes", separator=";") if entries else ()
        self._seen: bytes | None = None  # the file's bytes when last loaded or refused
        self.reloads = 0  # times the file was read and its tokens swapped in, the first load included

    @classmethod
    def from_settings(cls, settings: SecuritySettings) -> Keyring | None:
        """The keyring the settings ask for, loaded; None when calls need no token."""
        if not settings.auth:
            return None
        keyring = cls(settings.auth_tokens, settings.auth_token_hashes)
        keyring.load()
        return keyring

    def load(self) -> None:
        """Read the token file now; ConfigError naming the file (and line) when it cannot be used."""
        data = self._bytes()
        self._swap(data, self._parse(data))
        if not self.tokens:
            log.warning("no tokens are configured: every call but health is refused")

    def reload(self) -> bool:
        """Re-read the token file if it changed; True when new tokens were swapped in. Never raises."""
        if self.path is None:
            return False
        try:
            data = self._bytes()
        except ConfigError as exc:
            if self._seen is not None:  # log a vanished file once, not every poll
                log.warning("%s; still accepting the tokens read before", exc)
            self._seen = None
            return False
        if data == self._seen:
            return False
        try:
            tokens = self._parse(data)
        except ConfigError as exc:
            self._seen = data  # log a broken file once, not every poll
            log.warning("%s; still accepting the tokens read before", exc)
            return False
        self._swap(data, tokens)
        log.info("token file %r re-read: %d tokens", str(self.path), len(self.tokens))
        return True

    async def watch(self) -> None:
        """Reload the token file whenever it changes, until cancelled."""
        while True:
            await asyncio.sleep(self.poll_s)
            await asyncio.to_thread(self.reload)

    def _source(self) -> str:
        return f"token file {str(self.path)!r}"

    def _bytes(self) -> bytes | None:
        if self.path is None:
            return None
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self._source()} cannot be read: {exc.strerror}") from None

    def _parse(self, data: bytes | None) -> tuple[Token, ...]:
        if data is None:
            return ()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{self._source()} cannot be read: not UTF-8") from None
        return parse_tokens(text, self._source())

    def _swap(self, data: bytes | None, from_file: tuple[Token, ...]) -> None:
        self.tokens = Tokens(from_file + self._fixed)  # one assignment: a call sees the old set or the new
        self._seen = data
        self.reloads += 1


def _required(method: str, reflection_open: bool) -> str:
    """What `method` ("/package.Service/Method") needs: _OPEN, _ANY or a scope."""
    if method.startswith(_HEALTH):
        return _OPEN
    if method.startswith(_REFLECTION):
        return _OPEN if reflection_open else _ANY
    service = method[: method.rfind("/") + 1]
    return _SERVICE_SCOPES.get(service, ADMIN)


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> tuple[str | None, str]:
    """The bearer token of a call's metadata, or None and why not."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None, "the authorization metadata must be `Bearer <token>`"
            return token, ""
    return None, "a bearer token is required: send the metadata `authorization: Bearer <token>`"


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Lets a call through when its bearer token has the scope its method needs (see the module docstring).

    Parameters:
        keyring: the accepted tokens (read at each call: a reload applies to the next call).
        reflection_open: reflection needs no token (else any valid token).

    Place it after the ErrorInterceptor: `aio.server(interceptors=[ErrorInterceptor(), auth])`.
    """

    def __init__(self, keyring: Keyring, *, reflection_open: bool = False) -> None:
        self._keyring = keyring
        self._reflection_open = reflection_open
        # Refusing handlers by (method, reason): fixed objects, so the ErrorInterceptor wraps
        # each once; bounded, since only methods the server has get one.
        self._refusals: dict[tuple[str, str], grpc.RpcMethodHandler] = {}
        self._next_log = 0.0
        self._unlogged = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        required = _required(method, self._reflection_open)
        handler = await continuation(handler_call_details)
        if required == _OPEN or handler is None:  # None: UNIMPLEMENTED, as without tokens
            return handler
        presented, why = _bearer(handler_call_details.invocation_metadata)
        token = self._keyring.tokens.find(presented) if presented is not None else None
        if token is None:
            return self._refusal(handler, method, Unauthenticated, why or "the bearer token is not valid here")
        if required != _ANY and required not in token.scopes:
            short, scopes = method.rsplit("/", 1)[-1], ",".join(sorted(token.scopes))
            why = f"token {token.name!r} has the scopes {scopes}; {short} needs {required}"
            return self._refusal(handler, method, PermissionDenied, why)
        return handler

    def _refusal(
        self, handler: grpc.RpcMethodHandler, method: str, error: type[Unauthenticated | PermissionDenied], why: str
    ) -> grpc.RpcMethodHandler:
        refusal = self._refusals.get((method, why))
        if refusal is None:
            refusal = self._refusals[(method, why)] = self._build_refusal(handler, method, error, why)
        return refusal

    def _build_refusal(
        self, handler: grpc.RpcMethodHandler, method: str, error: type[Unauthenticated | PermissionDenied], why: str
    ) -> grpc.RpcMethodHandler:
        """A handler of `handler`'s kind that refuses every call with `error(why)`, without parsing it."""
        short = method.rsplit("/", 1)[-1]

        async def refuse(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            self._note(method, context.peer(), error.status, why)
            raise error(why)  # the ErrorInterceptor maps and counts it

        async def refuse_stream(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            # Streams pass the ErrorInterceptor by: end and count them here, as it would.
            self._note(method, context.peer(), error.status, why)
            metrics.REQUESTS.labels(short, error.status.name).inc()
            await context.abort(error.status, why, trailing_metadata=((ERROR_METADATA_KEY, error.__name__),))

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(refuse)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse_stream)
        return grpc.stream_stream_rpc_method_handler(refuse_stream)

    def _note(self, method: str, peer: str, status: grpc.StatusCode, why: str) -> None:
        """Log a refusal, at most one line per LOG_EVERY_S with the count of those left out."""
        now = time.monotonic()
        if now < self._next_log:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last line)" if self._unlogged else ""
        log.warning("refused %s from %s: %s: %s%s", method, peer, status.name, why, more)
        self._next_log, self._unlogged = now + LOG_EVERY_S, 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def bind_warning(host: str, port: int, settings: SecuritySettings) -> str | None:
    """The start-up warning for a listener others can reach unprotected, or None.

    Bound to a non-loopback address: without tokens or client certificates anyone who can
    reach the port reads every feature (TLS alone only encrypts); with tokens but without
    TLS the tokens cross the network in clear text.

    >>> bind_warning("127.0.0.1", 50051, SecuritySettings()) is None
    True
    """
    if _loopback(host):
        return None
    where = f"gRPC on {host}:{port}"
    if not settings.auth and settings.tls_client_ca is None:
        what = "has neither tokens nor client certificates" if settings.tls else "has neither TLS nor tokens"
        return (
            f"{where} {what}: anyone who can reach the port reads every feature and calls the admin RPC;"
            " set --auth-tokens and --tls-cert/--tls-key (README, Security), or bind --host 127.0.0.1"
        )
    if settings.auth and not settings.tls:
        return (
            f"{where} checks tokens without TLS: tokens and features cross the network in clear text;"
            " set --tls-cert/--tls-key unless a proxy or mesh encrypts the traffic"
        )
    return None
