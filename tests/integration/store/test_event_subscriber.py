"""The one event subscriber against real Redis: every listener gets each event once, a
listener that raises deafens nobody, a dropped connection is a gap (and the subscription
comes back), close() leaves nothing behind."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from featurestore.embedded import free_port
from featurestore.store.events import (
    EventSubscriber,
    Gap,
    WarmEvent,
    WrittenEvent,
    publish_warm,
    publish_written,
)
from featurestore.store.keys import events_channel

PROJECTS = (f"events{i}" for i in itertools.count())  # a channel of its own per test


class Recorder:
    """A listener that keeps what it was handed."""

    def __init__(self) -> None:
        self.events: list[WrittenEvent | WarmEvent] = []
        self.gaps: list[Gap] = []

    def on_event(self, event: WrittenEvent | WarmEvent) -> None:
        self.events.append(event)

    def on_gap(self, gap: Gap) -> None:
        self.gaps.append(gap)


class Broken(Recorder):
    """A listener that raises on everything (after keeping it)."""

    def on_event(self, event: WrittenEvent | WarmEvent) -> None:
        super().on_event(event)
        raise RuntimeError("a broken listener")

    def on_gap(self, gap: Gap) -> None:
        super().on_gap(gap)
        raise RuntimeError("a broken listener")


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Return once `condition()` holds; fail after `timeout_s`."""
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out waiting")


@pytest.fixture
def project() -> str:
    return next(PROJECTS)


@pytest.fixture
async def subscriber(redis_url: str, project: str) -> AsyncIterator[EventSubscriber]:
    events = EventSubscriber(redis_url, project)
    yield events
    await events.close()


async def test_every_listener_gets_each_event_once(
    subscriber: EventSubscriber, redis_client: aioredis.Redis, project: str
) -> None:
    first, second = Recorder(), Recorder()
    subscriber.add(first)
    subscriber.add(second)
    subscriber.add(first)  # added once only
    subscriber.start()
    await asyncio.wait_for(subscriber.wait_subscribed(), 5)
    assert subscriber.subscribed
    assert await publish_written(redis_client, project, ["a", "b"], ids={"a": [1, 2]}) == 1
    assert await publish_warm(redis_client, project, 7) == 1
    await until(lambda: len(first.events) == len(second.events) == 2)
    await asyncio.sleep(0.05)  # nothing more comes
    for listener in (first, second):
        written, warm = listener.events
        assert isinstance(written, WrittenEvent) and written.views == ("a", "b")
        assert written.ids["a"].tolist() == [1, 2] and written.ids_of("b") is None
        assert written.versions == {"a": 1, "b": 1}
        assert warm == WarmEvent(7)
        assert listener.gaps == []  # the first subscription is no gap
    assert first.events[0] is second.events[0]  # parsed once


async def test_a_raising_listener_does_not_stop_the_others(
    subscriber: EventSubscriber, redis_client: aioredis.Redis, project: str, caplog: pytest.LogCaptureFixture
) -> None:
    broken, healthy = Broken(), Recorder()
    subscriber.add(broken)
    subscriber.add(healthy)
    subscriber.start()
    await asyncio.wait_for(subscriber.wait_subscribed(), 5)
    for view in ("a", "b", "c"):
        await publish_written(redis_client, project, [view])
    await until(lambda: len(healthy.events) == 3)
    assert [e.views for e in healthy.events] == [("a",), ("b",), ("c",)]  # type: ignore[union-attr]
    assert len(broken.events) == 3  # the loop went on after each failure
    assert caplog.text.count("Broken failed to follow an event") == 3
    await redis_client.client_kill_filter(_type="pubsub")  # a failing on_gap too
    await until(lambda: healthy.gaps == [Gap.LOST, Gap.RESUBSCRIBED])
    assert broken.gaps == [Gap.LOST, Gap.RESUBSCRIBED]


async def test_a_killed_connection_is_a_gap_and_the_subscription_comes_back(
    subscriber: EventSubscriber, redis_client: aioredis.Redis, project: str
) -> None:
    listener = Recorder()
    subscriber.add(listener)
    subscriber.start()
    await asyncio.wait_for(subscriber.wait_subscribed(), 5)
    channel = events_channel(project)
    for kill in range(1, 3):
        assert await redis_client.client_kill_filter(_type="pubsub") >= 1
        await until(lambda kill=kill: len(listener.gaps) == 2 * kill)  # type: ignore[misc]
        assert listener.gaps == [Gap.LOST, Gap.RESUBSCRIBED] * kill
        assert await redis_client.pubsub_numsub(channel) == [(channel, 1)]
        await publish_written(redis_client, project, [f"after kill {kill}"])
        await until(lambda kill=kill: len(listener.events) == kill)  # type: ignore[misc]
    assert [e.views for e in listener.events] == [("after kill 1",), ("after kill 2",)]  # type: ignore[union-attr]


async def test_close_leaves_no_task_and_no_subscription(redis_url: str, redis_client: aioredis.Redis) -> None:
    project = next(PROJECTS)
    channel = events_channel(project)
    before = asyncio.all_tasks()
    async with EventSubscriber(redis_url, project) as events:
        events.add(Recorder())
        await asyncio.wait_for(events.wait_subscribed(), 5)
        assert await redis_client.pubsub_numsub(channel) == [(channel, 1)]
        assert len(asyncio.all_tasks() - before) == 1
    assert asyncio.all_tasks() - before == set()
    for _ in range(1000):  # Redis notices the closed connection shortly
        if await redis_client.pubsub_numsub(channel) == [(channel, 0)]:
            break
        await asyncio.sleep(0.005)
    assert await redis_client.pubsub_numsub(channel) == [(channel, 0)]


async def test_an_unreachable_redis_is_a_gap_retried_until_close(caplog: pytest.LogCaptureFixture) -> None:
    listener = Recorder()
    before = asyncio.all_tasks()
    events = EventSubscriber(f"redis://127.0.0.1:{free_port()}", next(PROJECTS))
    events.add(listener)
    events.start()
    await until(lambda: len(listener.gaps) >= 2)  # refused, waited 0.1 s, refused again
    assert set(listener.gaps) == {Gap.LOST} and not events.subscribed
    assert "subscribing again in 0.1 s" in caplog.text and "subscribing again in 0.2 s" in caplog.text
    await events.close()
    assert asyncio.all_tasks() - before == set()


async def test_a_discarded_listener_hears_nothing_more(
    subscriber: EventSubscriber, redis_client: aioredis.Redis, project: str
) -> None:
    kept, dropped = Recorder(), Recorder()
    subscriber.add(kept)
    subscriber.add(dropped)
    subscriber.start()
    await asyncio.wait_for(subscriber.wait_subscribed(), 5)
    subscriber.discard(dropped)
    subscriber.discard(dropped)  # twice: nothing happens
    await publish_written(redis_client, project, ["a"])
    await until(lambda: len(kept.events) == 1)
    assert dropped.events == []
