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
                                        (featurestore/cache/warmup.py; `publish_warm`)

Pub/sub delivers at most once and only to connected subscribers, so an event is a hint:
a server that misses one catches up on its periodic refresh (indexes) or version poll
(the hot cache). Publishing never fails a
materialization (the rows are already written and acknowledged). Parsing never raises:
a malformed message names no view, and a malformed `ids` entry means a full re-read.

A server subscribes once (`EventSubscriber`) and hands every parsed event to its
listeners (the hot cache, the retrieval indexes):

    events = EventSubscriber(redis_url, "recsys")
    events.add(cache)                     # anything with on_event(event) and on_gap(gap)
    events.start()
    await events.wait_subscribed()
    ...
    await events.close()

Each message is parsed once; a listener that raises is logged and the others still get
the event. When the connection drops, listeners hear `Gap.LOST` (events sent from now on
are lost) and, once subscribed again, `Gap.RESUBSCRIBED` (events sent in between were
lost); the first subscription is no gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from featurestore.store.keys import events_channel, versions_key
from featurestore.store.redis import Client, ClusterClient, connect
from featurestore.store.slots import is_cluster_url, parse_cluster_url
from featurestore.types import Ids

__all__ = [
    "DEFAULT_WARM_KEYS",
    "MAX_EVENT_IDS",
    "EventListener",
    "EventSubscriber",
    "Gap",
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
_RETRY_S = (0.1, 5.0)  # first and longest wait before subscribing again


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
    client: Client,
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


async def publish_warm(client: Client, project: str, limit: int) -> int:
    """Ask every server to re-warm its hot cache with the fleet's `limit` hottest keys;
    returns the subscribers reached (on a cluster: those of the node that published; the
    message reaches every node's). Redis errors propagate (the caller asked for this)."""
    message = json.dumps({"event": "warm", "limit": int(limit)})
    if isinstance(client, ClusterClient):  # a channel is no key: any node publishes to all
        await client.initialize()
        node = client.get_random_node()
        return int(await client.execute_command("PUBLISH", events_channel(project), message, target_nodes=node))
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


class Gap(enum.Enum):
    """How a listener may have missed events (`EventListener.on_gap`); the value says it."""

    LOST = "lost the events channel"  # the connection dropped: nothing arrives for now
    RESUBSCRIBED = "resubscribed to events"  # what was published in between is lost


class EventListener(Protocol):
    """What `EventSubscriber` feeds. Both methods run on the event loop: no blocking."""

    def on_event(self, event: WrittenEvent | WarmEvent) -> None:
        """Follow one message of the channel, parsed once for every listener."""

    def on_gap(self, gap: Gap) -> None:
        """Events may have been lost (`gap` says how): catch up by other means."""


class EventSubscriber:
    """The one subscription of a server to its project's events channel.

    It parses each message once (`parse_message`) and hands the event to every listener,
    in the order they were added; a listener that raises is logged and the others still
    get the event. When the connection drops (a Redis error or a closed socket: the only
    place pub/sub errors are caught), listeners hear `Gap.LOST`, the subscriber waits
    (0.1 s, doubling up to 5 s) and subscribes again, then listeners hear
    `Gap.RESUBSCRIBED`. The first subscription is no gap.

    Parameters:
        redis_url: the online store; a redis-py client of its own, without a socket
            timeout: the subscription waits as long as it takes for the next message.
        project: the registry's project, whose channel is `keys.events_channel(project)`.

    Example:

        async with EventSubscriber(redis_url, "recsys") as events:   # start() ... close()
            events.add(listener)
            await events.wait_subscribed()
    """

    def __init__(self, redis_url: str, project: str) -> None:
        self.project = project
        self.channel = events_channel(project)
        self._url = redis_url
        self._redis: aioredis.Redis | None = None
        self._attempts = 0  # subscriptions tried (a cluster's seeds are tried in turn)
        self._listeners: list[EventListener] = []
        self._subscribed = asyncio.Event()  # set by the first subscription, never cleared
        self._task: asyncio.Task[None] | None = None

    def add(self, listener: EventListener) -> None:
        """Hand every event and gap from now on to `listener` too."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def discard(self, listener: EventListener) -> None:
        """Stop handing events to `listener` (nothing if it was not added)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def start(self) -> None:
        """Subscribe in the background, and keep subscribed until `close`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    @property
    def subscribed(self) -> bool:
        """True once the first subscription succeeded (it stays True across gaps)."""
        return self._subscribed.is_set()

    async def wait_subscribed(self) -> None:
        """Return once the first subscription succeeded."""
        await self._subscribed.wait()

    async def close(self) -> None:
        """Stop listening (no task is left running) and close the Redis client."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()

    async def _client(self) -> aioredis.Redis:
        """The client of the next subscription: one for the life of the subscriber, or on a
        Redis Cluster, the next of the URL's nodes in turn (PUBLISH on a cluster reaches
        every node, replicas too, so any live node will do)."""
        if not is_cluster_url(self._url):
            if self._redis is None:
                self._redis = _plain(connect(self._url, timeout_s=None))
            return self._redis
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
        address = parse_cluster_url(self._url)
        host, port = address.seeds[self._attempts % len(address.seeds)]
        self._attempts += 1
        self._redis = _plain(connect(address.node_url(host, port), timeout_s=None))
        return self._redis

    async def __aenter__(self) -> EventSubscriber:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self) -> None:
        delay, first = _RETRY_S[0], True
        while True:
            pubsub = (await self._client()).pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if not first:  # events sent while disconnected are lost
                    self._gap(Gap.RESUBSCRIBED)
                first, delay = False, _RETRY_S[0]
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._deliver(parse_message(message["data"]))
            except (RedisError, OSError) as exc:
                log.warning("events of %s: %s; subscribing again in %.1f s", self.project, exc, delay)
                self._gap(Gap.LOST)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_S[1])
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _deliver(self, event: WrittenEvent | WarmEvent) -> None:
        for listener in tuple(self._listeners):  # a listener may discard itself
            try:
                listener.on_event(event)
            except Exception:  # one broken listener must not deafen the others
                log.exception("%s failed to follow an event of %s", type(listener).__name__, self.project)

    def _gap(self, gap: Gap) -> None:
        for listener in tuple(self._listeners):
            try:
                listener.on_gap(gap)
            except Exception:
                log.exception("%s failed to catch up after %s", type(listener).__name__, gap.value)


def _plain(client: Client) -> aioredis.Redis:
    assert isinstance(client, aioredis.Redis), "a node URL makes a plain client"
    return client
