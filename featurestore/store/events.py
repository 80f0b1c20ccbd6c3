"""Materialization events: "these views were written", over Redis pub/sub.

    await publish_written(client, "recsys", ["item_embedding"])   # the materializer
    views = parse_event(message["data"])                           # the server

A message on `keys.events_channel(project)` is JSON:

    {"event": "written", "views": ["item_embedding", ...]}

Pub/sub delivers at most once and only to connected subscribers, so an event is a hint:
a server that misses one catches up on its periodic refresh. Publishing never fails a
materialization (the rows are already written and acknowledged).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from featurestore.store.keys import events_channel

__all__ = ["parse_event", "publish_written"]

log = logging.getLogger(__name__)


async def publish_written(client: aioredis.Redis, project: str, views: Sequence[str]) -> int:
    """Announce that `views` were written; returns the subscribers reached (0 on error)."""
    message = json.dumps({"event": "written", "views": list(views)})
    try:
        return int(await client.publish(events_channel(project), message))
    except (RedisError, OSError) as exc:
        log.warning("could not announce the write of %s: %s", ", ".join(views), exc)
        return 0


def parse_event(data: bytes | str) -> tuple[str, ...]:
    """The views a "written" event names; () for anything else (logged, never raised)."""
    try:
        event = json.loads(data)
        if isinstance(event, dict) and event.get("event") == "written":
            views = event.get("views")
            if isinstance(views, list) and all(isinstance(v, str) for v in views):
                return tuple(views)
    except (ValueError, TypeError):
        pass
    log.warning("ignoring a malformed materialization event: %.200r", data)
    return ()
