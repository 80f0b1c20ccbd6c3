"""Materialization events: "these views were written", over Redis pub/sub.

    await publish_written(client, "recsys", ["item_embedding"],        # the materializer
                          ids={"item_embedding": written_ids}, epoch_us=window_end_us)
    event = parse_event(message["data"])                               # the server
    event.views, event.ids_of("item_embedding")   # ("item_embedding",), array or None

A message on `keys.events_channel(project)` is JSON:

    {"event": "written", "views": ["item_embedding", ...],
     "epoch_us": 1732370000000000,
     "ids": {"item_embedding": [17, 42, ...]},
     "versions": {"item_embedding": 7}}

    views     the views whose rows were written
    epoch_us  optional: the run's window end, microseconds since the Unix epoch; one
              value per run of a view, for caches that want to tell runs apart
    ids       optional: per view, the entity ids (the one int64 join key) of every row
              the run wrote, when there were at most MAX_EVENT_IDS of them; a view
              without an entry (too many rows, another kind of key, an older
              materializer) means "anything may have changed: re-read the whole view"
    versions  per view, its write version after this write: the hash
              `keys.versions_key(project)` counts the announced writes of each view, and
              the count is incremented and the message published by one script, so the
              n-th event of a view carries n; a subscriber that sees a number skipped, or
              reads a higher count in the hash than the events it got, knows it lost one

Size: up to ~20 bytes per id (an int64 in decimal and a comma), so at most ~2 MB for
MAX_EVENT_IDS ids, under Redis's default pub/sub output-buffer limits (8 MB soft, 32 MB
hard) and about 20 ms of JSON parsing for the subscriber.

Other kinds of event share the channel; a subscriber ignores kinds it does not know:

    {"event": "warm", "limit": 100000}  every server re-reads the fleet's hot set
                                        (featurestore/cache/hotcache.py; `publish_warm`)

Pub/sub delivers at most once and only to connected subscribers, so an event is a hint:
a server that misses one catches up on its periodic refresh (indexes) or version poll
(the hot cache). Publishing never fails a
materialization (the rows are already written and acknowledged). Parsing never raises:
a malformed message names no view, and a malformed `ids` entry means a full re-read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from featurestore.store.keys import events_channel, versions_key
from featurestore.types import Ids

__all__ = [
    "DEFAULT_WARM_KEYS",
    "MAX_EVENT_IDS",
    "WarmEvent",
    "WrittenEvent",
    "parse_event",
    "parse_message",
    "publish_warm",
    "publish_written",
]

log = logging.getLogger(__name__)
# Most entity ids one event carries per view; a larger run is announced without them.
MAX_EVENT_IDS = 100_000
DEFAULT_WARM_KEYS = 100_000  # hot keys a "warm" event without a valid limit re-reads
_INT64 = (-(2**63), 2**63 - 1)


# Increment each view's write version and publish the message with the new versions, in
# one step: no subscriber can see a version before its event was sent.
# KEYS[1] the versions hash; ARGV[1] the channel, ARGV[2] the message's JSON without its
# closing brace, ARGV[3..] the views.
_ANNOUNCE = """
local parts = {}
for i = 3, #ARGV do
  local version = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
  parts[#parts + 1] = cjson.encode(ARGV[i]) .. ': ' .. version
end
local versions = '{' .. table.concat(parts, ', ') .. '}'
return redis.call('PUBLISH', ARGV[1], ARGV[2] .. ', "versions": ' .. versions .. '}')
"""


@dataclass(frozen=True, slots=True)
class WrittenEvent:
    """A parsed "written" event: the views written, and the written ids of some of them.

    `ids` maps a view to the int64 entity ids of the rows its run wrote; a view of
    `views` missing from it was written in unknown places (re-read all of it).
    """

    views: tuple[str, ...] = ()
    ids: Mapping[str, Ids] = field(default_factory=dict)
    epoch_us: int | None = None
    versions: Mapping[str, int] = field(default_factory=dict)

    def ids_of(self, view: str) -> Ids | None:
        """The written entity ids of `view`, or None when they are unknown."""
        return self.ids.get(view)


async def publish_written(
    client: aioredis.Redis,
    project: str,
    views: Sequence[str],
    *,
    ids: Mapping[str, Sequence[int] | Ids] | None = None,
    epoch_us: int | None = None,
) -> int:
    """Announce that `views` were written; returns the subscribers reached (0 on error).

    Parameters:
        ids: per view, the int64 entity ids written; a view with more than
            MAX_EVENT_IDS is announced without them (subscribers re-read it whole).
        epoch_us: the run's window end, microseconds since the Unix epoch.
    """
    message: dict[str, object] = {"event": "written", "views": list(views)}
    if epoch_us is not None:
        message["epoch_us"] = int(epoch_us)
    written = {
        view: np.asarray(ids[view], dtype=np.int64).tolist()
        for view in views
        if ids is not None and view in ids and len(ids[view]) <= MAX_EVENT_IDS
    }
    if written:
        message["ids"] = written
    head = json.dumps(message)[:-1]  # the script appends the versions and the brace
    try:
        reached = await client.eval(  # type: ignore[misc]
            _ANNOUNCE, 1, versions_key(project), events_channel(project), head, *views
        )
        return int(reached)
    except (RedisError, OSError) as exc:
        log.warning("could not announce the write of %s: %s", ", ".join(views), exc)
        return 0


async def publish_warm(client: aioredis.Redis, project: str, limit: int) -> int:
    """Ask every server to re-warm its hot cache with the fleet's `limit` hottest keys;
    returns the subscribers reached. Redis errors propagate (the caller asked for this)."""
    message = json.dumps({"event": "warm", "limit": int(limit)})
    return int(await client.publish(events_channel(project), message))


@dataclass(frozen=True, slots=True)
class WarmEvent:
    """A parsed "warm" event: re-read the fleet's `limit` hottest keys."""

    limit: int = DEFAULT_WARM_KEYS


def parse_message(data: bytes | str) -> WrittenEvent | WarmEvent:
    """A message of the events channel, parsed once: a "warm" event, else what
    `parse_event` makes of it."""
    event = _json(data)
    if isinstance(event, dict) and event.get("event") == "warm":
        limit = event.get("limit")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return WarmEvent(limit)
        return WarmEvent()
    return _written(event, data)


def parse_event(data: bytes | str) -> WrittenEvent:
    """The "written" event in `data`; one naming no view for anything else (logged)."""
    return _written(_json(data), data)


def _json(data: bytes | str) -> object:
    try:
        return json.loads(data)
    except (ValueError, TypeError):
        return None


def _written(event: object, data: bytes | str) -> WrittenEvent:
    views = event.get("views") if isinstance(event, dict) else None
    if (
        not isinstance(event, dict)
        or event.get("event") != "written"
        or not isinstance(views, list)
        or not all(isinstance(v, str) for v in views)
    ):
        kind = event.get("event") if isinstance(event, dict) else None
        if isinstance(kind, str) and kind != "written":  # another kind of event: not ours
            return WrittenEvent()
        log.warning("ignoring a malformed materialization event: %.200r", data)
        return WrittenEvent()
    epoch = event.get("epoch_us")
    epoch_us = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
    written = event.get("ids")
    written = written if isinstance(written, dict) else {}
    ids: dict[str, Ids] = {}
    for view in views:
        if view not in written:
            continue
        parsed = _ids(written[view])
        if parsed is None:
            log.warning("event for %s: malformed ids, re-reading the whole view", view)
        else:
            ids[view] = parsed
    versions = event.get("versions")
    known = {
        view: n
        for view, n in (versions.items() if isinstance(versions, dict) else ())
        if view in views and type(n) is int and n > 0
    }
    return WrittenEvent(tuple(views), ids, epoch_us, known)


def _ids(value: object) -> Ids | None:
    """`value` as int64 ids when it is a list of integers within int64, else None."""
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        return None
    if value and not _INT64[0] <= min(value) <= max(value) <= _INT64[1]:
        return None
    return np.array(value, dtype=np.int64)
