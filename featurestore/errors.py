"""The errors of the feature store. Each one knows the gRPC status it maps to.

    FeatureStoreError                 INTERNAL            (canonical for INTERNAL and unknown codes)
    ├── InvalidArgument               INVALID_ARGUMENT    (bad key type, empty batch, bad ref)
    ├── NotFound                      NOT_FOUND           (unknown view, feature, service, model)
    ├── Unavailable                   UNAVAILABLE         (Redis or PostgreSQL unreachable)
    ├── DeadlineExceeded              DEADLINE_EXCEEDED   (the caller's deadline passed)
    ├── ConfigError                   FAILED_PRECONDITION (bad settings, missing registry; canonical)
    ├── LockHeld                      ABORTED             (another materialization runs)
    ├── MissingFeature                FAILED_PRECONDITION (a required model input is absent)
    ├── ModelError                    INTERNAL            (the model raised while scoring)
    ├── Unauthenticated               UNAUTHENTICATED     (no token, or one the server does not know)
    ├── PermissionDenied              PERMISSION_DENIED   (a valid token without the call's scope)
    └── Overloaded                    RESOURCE_EXHAUSTED  (too many calls in flight: retry with backoff)

Library errors are translated at the boundary (`raise NotFound(...) from exc`), so upper
layers see this tree only. The server maps them to statuses in one interceptor, which
also sends the class name in the trailing metadata `ERROR_METADATA_KEY`; the client turns
status and name back into the class with `error_class`. The table both sides use is
derived from the classes below: no second copy to keep in step. Where two classes share a
status, the first one declared here is the status's canonical class (what a status
without a known name becomes), so a new class goes below the one it shares a status with.

Messages quote what the caller sent, and the caller may send 100 KB where a name was
expected: `quote` cuts one value for a message, and `bounded` cuts a whole message (the
interceptor applies it to every status it sends and every line it logs), so that no
status outgrows the client's 16 KB header limit (which would turn NOT_FOUND into
RESOURCE_EXHAUSTED) and no log line outgrows a screen.
"""

from __future__ import annotations

import re

import grpc

__all__ = [
    "ERROR_METADATA_KEY",
    "MAX_MESSAGE_CHARS",
    "MAX_QUOTE_CHARS",
    "ConfigError",
    "DeadlineExceeded",
    "FeatureStoreError",
    "InvalidArgument",
    "LockHeld",
    "MissingFeature",
    "ModelError",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "bounded",
    "error_class",
    "quote",
]

# Trailing-metadata key of a failed call: the name of the error class the server raised.
ERROR_METADATA_KEY = "featurestore-error"


class FeatureStoreError(Exception):
    """Base of every error this package raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(FeatureStoreError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FeatureStoreError):
    status = grpc.StatusCode.NOT_FOUND


class Unavailable(FeatureStoreError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FeatureStoreError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ConfigError(FeatureStoreError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class LockHeld(FeatureStoreError):
    status = grpc.StatusCode.ABORTED


class MissingFeature(FeatureStoreError):
    """A `required` model input is missing, null or stale for an entity."""

    status = grpc.StatusCode.FAILED_PRECONDITION  # the data, not the request, is wrong


class ModelError(FeatureStoreError):
    """The model raised while scoring (INTERNAL, with ONNX Runtime's message)."""


class Unauthenticated(FeatureStoreError):
    """The call carried no bearer token, or one the server does not accept."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FeatureStoreError):
    """The call's token is valid but lacks the scope its method needs (read or admin)."""

    status = grpc.StatusCode.PERMISSION_DENIED


class Overloaded(FeatureStoreError):
    """The server has `max_in_flight` calls in flight: refused at once, retry with backoff."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


# Every class above, in declaration order (module globals keep it). Names come from the
# wire, so only these classes can ever be chosen by one.
_CLASSES: tuple[type[FeatureStoreError], ...] = tuple(
    value for value in tuple(globals().values()) if isinstance(value, type) and issubclass(value, FeatureStoreError)
)
_BY_NAME: dict[str, type[FeatureStoreError]] = {cls.__name__: cls for cls in _CLASSES}
# Status name -> canonical class: built backwards so the first class declared wins.
_CANONICAL: dict[str, type[FeatureStoreError]] = {cls.status.name: cls for cls in reversed(_CLASSES)}


def error_class(code_name: str, error_name: str | None = None) -> type[FeatureStoreError]:
    """The error class for a failed call's status code and the class name the server sent.

    Parameters:
        code_name: the gRPC status code's name, e.g. "FAILED_PRECONDITION".
        error_name: the value of the `ERROR_METADATA_KEY` trailing metadata, if any.

    Returns the class named `error_name` when it is one of this module's and its status is
    `code_name`; else the status's canonical class (the first declared with that status);
    FeatureStoreError for a code no class declares.

    >>> error_class("FAILED_PRECONDITION", "MissingFeature").__name__
    'MissingFeature'
    >>> error_class("FAILED_PRECONDITION", None).__name__
    'ConfigError'
    >>> error_class("NOT_FOUND", "MissingFeature").__name__  # the status must match
    'NotFound'
    """
    cls = _BY_NAME.get(error_name) if error_name is not None else None
    if cls is not None and cls.status.name == code_name:
        return cls
    return _CANONICAL.get(code_name, FeatureStoreError)


MAX_QUOTE_CHARS = 200  # one quoted value in a message
MAX_MESSAGE_CHARS = 1000  # a whole message: even as %-escaped UTF-8, far below 16 KB
_CUT_MARK = "…"
# A run of characters without a space, long enough to be input rather than our prose.
_LONG_RUN = re.compile(rf"\S{{{MAX_QUOTE_CHARS + 1},}}")


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """`repr(value)` for a message, cut to about `limit` characters when longer.

    Parameters:
        value: what the caller sent (a name, a reference, a list).
        limit: the characters kept, head and tail together.

    Returns the repr, or its head, a mark with the full length, and its tail (so the
    closing quote or bracket stays).

    >>> quote("user_profile:age")
    "'user_profile:age'"
    >>> quote("x" * 100_000, limit=20)
    "'xxxxxxxxxxxxxxx…(100002 chars)…xxx'"
    """
    return _cut(repr(value), limit)


def bounded(message: str) -> str:
    """`message` with every run of more than MAX_QUOTE_CHARS non-space characters cut
    (`quote`'s way) and the whole cut to MAX_MESSAGE_CHARS; short messages are unchanged.

    >>> bounded("unknown model '" + "m" * 100_000 + "'")[:30]
    "unknown model 'mmmmmmmmmmmmmmm"
    >>> len(bounded("unknown model '" + "m" * 100_000 + "'")) < 250
    True
    """
    if len(message) <= MAX_QUOTE_CHARS:
        return message
    message = _LONG_RUN.sub(lambda run: _cut(run.group(), MAX_QUOTE_CHARS), message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 20] + f"{_CUT_MARK}(message cut)"
    return message


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    tail = max(limit // 5, 1)
    return f"{text[: limit - tail]}{_CUT_MARK}({len(text)} chars){_CUT_MARK}{text[-tail:]}"
