"""Redis key names.

A row of feature view V for an entity lives at

    <project>:<V>:{<entity>}

where <entity> is the entity's join-key values in the view's join-key order, joined by
`|`: an int64 in decimal, a string as UTF-8 with `%`, `|`, `{` and `}` percent-escaped
(so no two entities share a key and the braces stay balanced). The braces are a Redis
Cluster hash tag: every view of one entity hashes to the same slot, so one entity's rows
are read from one node.

Bookkeeping lives under `<project>:{__meta__}:...`: the hash tag puts every bookkeeping
key of every project in one slot of a Redis Cluster (the meta slot, on one node), so a
script or an MGET may take several of them (the watermarks of a run, its lock and a
watermark):

    <project>:{__meta__}:watermark:<view>[:shard-<i>-of-<n>]   a view's watermark (of one shard)
    <project>:{__meta__}:lock:materialize[:shard-<i>-of-<n>]   the run lock (of one shard)
    <project>:{__meta__}:hot        the fleet's hot row keys (a sorted set, see cache/hotset.py)
    <project>:{__meta__}:versions   each view's write version (a hash, see store/events.py)

`<project>:__meta__:events` is the pub/sub channel of materialization events: a channel
is no key (it has no slot; a cluster delivers a message to every node), so its name
stays as it was. Before the hash tag, bookkeeping keys were `<project>:__meta__:...`;
`legacy_watermark_key` names the old watermark, which the materializer still reads
when a view has no new one (so an upgrade does not restart incremental runs from the
TTL horizon; materialize/watermark.py).

    >>> row_key("recsys", "user_profile", entity_token([42]))
    b'recsys:user_profile:{42}'
    >>> watermark_key("recsys", "user_profile")
    b'recsys:{__meta__}:watermark:user_profile'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

__all__ = [
    "META_TAG",
    "entity_token",
    "entity_tokens",
    "events_channel",
    "hot_key",
    "legacy_watermark_key",
    "lock_key",
    "meta_key",
    "row_key",
    "row_keys",
    "view_key_pattern",
    "watermark_key",
]

_ESCAPES = str.maketrans({"%": "%25", "|": "%7C", "{": "%7B", "}": "%7D"})


def _part(value: int | str) -> str:
    if isinstance(value, bool):  # bool is an int; never a join key
        raise TypeError(f"a join key is int64 or string, not bool ({value!r})")
    if isinstance(value, int):
        return str(value)
    return value.translate(_ESCAPES)


def entity_token(values: Sequence[int | str]) -> bytes:
    """The <entity> part of a key, from one entity's join-key values in order."""
    return "|".join(_part(v) for v in values).encode()


def entity_tokens(columns: Sequence[Sequence[int | str]]) -> list[bytes]:
    """Tokens for many entities, given one sequence per join key (columnar)."""
    if len(columns) == 1:
        col = columns[0]
        if col and isinstance(col[0], int):
            return [b"%d" % v for v in cast("Sequence[int]", col)]
        return [_part(v).encode() for v in col]
    return [entity_token(row) for row in zip(*columns, strict=True)]


def row_key(project: str, view: str, token: bytes) -> bytes:
    return b"%s:%s:{%s}" % (project.encode(), view.encode(), token)


def row_keys(project: str, view: str, tokens: Iterable[bytes]) -> list[bytes]:
    head = b"%s:%s:{" % (project.encode(), view.encode())
    return [head + t + b"}" for t in tokens]


def view_key_pattern(project: str, view: str) -> bytes:
    """The SCAN MATCH pattern of every row key of `view`, glob characters escaped."""
    head = row_key(project, view, b"")[:-2]  # b"<project>:<view>:"
    escaped = b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in head)
    return escaped + b"{*}"


META_TAG = "{__meta__}"  # the hash tag of every bookkeeping key: one slot on a cluster


def meta_key(project: str, *parts: str) -> bytes:
    """A bookkeeping key: `<project>:{__meta__}:<parts joined by :>`."""
    return ":".join((project, META_TAG, *parts)).encode()


def watermark_key(project: str, view: str, shard: str = "") -> bytes:
    """The watermark of `view` (of one shard, e.g. "shard-0-of-3", when given)."""
    return meta_key(project, "watermark", view, *((shard,) if shard else ()))


def legacy_watermark_key(project: str, view: str) -> bytes:
    """The watermark's name before bookkeeping keys had a hash tag (read, never written)."""
    return ":".join((project, "__meta__", "watermark", view)).encode()


def lock_key(project: str, name: str = "materialize") -> bytes:
    return meta_key(project, "lock", name)


def events_channel(project: str) -> bytes:
    """The pub/sub channel on which materialization announces the views it wrote (a
    channel, not a key: no hash tag, its name unchanged)."""
    return ":".join((project, "__meta__", "events")).encode()


def versions_key(project: str) -> bytes:
    """The hash of each view's write version, incremented with every announced write."""
    return meta_key(project, "versions")


def hot_key(project: str) -> bytes:
    """The sorted set of the fleet's hot row keys, scored by decayed request counts."""
    return meta_key(project, "hot")
