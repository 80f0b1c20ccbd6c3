"""MicroBatcher's contract, on a real event loop with stages that record and can be held.

A call that finds the batcher idle runs both stages in its own task (the direct path: no
loop task, no queue time); calls that overlap it queue and are coalesced. Batches close at
max_rows / max_requests, or max_wait_us after their first call; the fetch of batch n+1
runs while batch n is scored, and the hand-off holds one batch; a stage that raises fails
its own batch only; close() fails what waits with Unavailable, and drain_and_close()
finishes it first.

Stages are held at gates (events) instead of sleeps, so the order of events is exact; the
few wall-clock bounds are loose (a shared 2-core machine).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import pytest

from featurestore.errors import Unavailable
from featurestore.inference.batching import MicroBatcher

WAIT_S = 5.0  # the most any awaited event may take before the test fails instead of hanging


class Item:
    """A call: its name, row count and future, as the batcher wants them; `queued` is set
    when the batcher stamps its queue time."""

    __slots__ = ("_enqueued", "dequeued", "future", "name", "queued", "rows")

    def __init__(self, name: str, rows: int = 1) -> None:
        self.name, self.rows = name, rows
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queued = asyncio.Event()
        self._enqueued = self.dequeued = 0.0

    @property
    def enqueued(self) -> float:
        return self._enqueued

    @enqueued.setter
    def enqueued(self, value: float) -> None:
        self._enqueued = value
        self.queued.set()


class Stages:
    """fetch and score that record their batches, can be held at gates and made to raise.

    `hold("score", "a")` holds the score of the batch that holds item "a" until
    `release("score", "a")`; `fail("fetch", "b", exc)` makes the fetch of b's batch raise;
    `started("fetch", "b")` is set once that fetch has begun.
    """

    def __init__(self) -> None:
        self.batches: dict[str, list[list[str]]] = {"fetch": [], "score": []}
        self._gates: dict[tuple[str, str], asyncio.Event] = {}
        self._errors: dict[tuple[str, str], Exception] = {}
        self._started: defaultdict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self.resolve_first_then_raise = False  # score: a result for the first item, then raise

    def hold(self, stage: str, name: str) -> None:
        self._gates[stage, name] = asyncio.Event()

    def release(self, stage: str, name: str) -> None:
        self._gates[stage, name].set()

    def fail(self, stage: str, name: str, exc: Exception) -> None:
        self._errors[stage, name] = exc

    async def started(self, stage: str, name: str) -> None:
        async with asyncio.timeout(WAIT_S):
            await self._started[stage, name].wait()

    async def _enter(self, stage: str, items: Sequence[Item]) -> None:
        names = [item.name for item in items]
        self.batches[stage].append(names)
        for name in names:
            self._started[stage, name].set()
        for name in names:
            gate = self._gates.get((stage, name))
            if gate is not None:
                await gate.wait()
        for name in names:
            if (stage, name) in self._errors and stage == "fetch":
                raise self._errors[stage, name]

    async def fetch(self, batch: Sequence[Item]) -> list[Item]:
        await self._enter("fetch", batch)
        return list(batch)

    async def score(self, batch: list[Item]) -> None:
        await self._enter("score", batch)
        for k, item in enumerate(batch):
            error = self._errors.get(("score", item.name))
            if error is not None and (k > 0 or not self.resolve_first_then_raise):
                raise error
            if not item.future.done():
                item.future.set_result(f"{item.name} scored")


Batcher = MicroBatcher[Item, list[Item]]


@pytest.fixture
async def make_batcher() -> AsyncIterator[Callable[..., tuple[Batcher, Stages]]]:
    """A factory of batchers over fresh Stages; every batcher is closed after the test."""
    made: list[Batcher] = []

    def make(**settings: int) -> tuple[Batcher, Stages]:
        stages = Stages()
        batcher: Batcher = MicroBatcher(stages.fetch, stages.score, **settings)
        made.append(batcher)
        return batcher, stages

    yield make
    for batcher in made:
        await batcher.close()


async def submitted(batcher: Batcher, items: Iterable[Item]) -> list[asyncio.Task[Any]]:
    """Submit each item from its own task, in order; return once all are queued."""
    items = list(items)
    tasks = [asyncio.create_task(batcher.submit(item)) for item in items]
    async with asyncio.timeout(WAIT_S):
        for item in items:
            await item.queued.wait()
    return tasks


async def results(tasks: Iterable[Awaitable[Any]]) -> list[Any]:
    """Each task's result or exception, waiting at most WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        return await asyncio.gather(*tasks, return_exceptions=True)


def items(*names: str, rows: Sequence[int] = ()) -> list[Item]:
    return [Item(name, rows[k] if rows else 1) for k, name in enumerate(names)]


@pytest.mark.parametrize(
    ("settings", "rows", "batches"),
    [
        ({"max_requests": 4}, [1] * 9, [["a", "b", "c", "d"], ["e", "f", "g", "h"], ["i"]]),
        ({"max_rows": 6}, [3, 3, 3, 5, 1, 2], [["a", "b"], ["c"], ["d", "e"], ["f"]]),
        ({"max_rows": 6}, [2, 10, 2, 2], [["a"], ["b"], ["c", "d"]]),  # larger than max_rows: alone
        ({"max_rows": 6, "max_requests": 2}, [1, 1, 1, 4, 2], [["a", "b"], ["c", "d"], ["e"]]),
        ({}, [1] * 70, [[f"i{k}" for k in range(64)], [f"i{k}" for k in range(64, 70)]]),  # defaults: 64 calls
    ],
    ids=["max-requests", "max-rows", "oversize-alone", "either-limit", "default-64"],
)
async def test_a_batch_closes_at_max_rows_or_max_requests(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
    settings: dict[str, int],
    rows: list[int],
    batches: list[list[str]],
) -> None:
    batcher, stages = make_batcher(**settings)
    stages.hold("fetch", "plug")
    plug = await submitted(batcher, items("plug"))
    await stages.started("fetch", "plug")  # the fetch loop is busy: the rest queue up
    names = [chr(ord("a") + k) for k in range(len(rows))] if len(rows) < 26 else [f"i{k}" for k in range(len(rows))]
    queued = await submitted(batcher, items(*names, rows=rows))
    stages.release("fetch", "plug")
    assert await results(plug + queued) == [f"{name} scored" for name in ["plug", *names]]
    assert stages.batches["fetch"] == [["plug"], *batches]
    assert stages.batches["score"] == stages.batches["fetch"]


@pytest.mark.parametrize(
    "settings",
    [{"max_rows": 0}, {"max_requests": 0}, {"max_wait_us": -1}],
    ids=["rows", "requests", "wait"],
)
def test_bad_limits_are_refused(settings: dict[str, int]) -> None:
    stages = Stages()
    with pytest.raises(ValueError, match="max_rows and max_requests must be >= 1"):
        MicroBatcher(stages.fetch, stages.score, **settings)


async def test_with_no_wait_an_idle_batcher_fetches_a_lone_call_at_once(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher(max_wait_us=0)
    (item,) = items("a")
    assert await results([batcher.submit(item)]) == ["a scored"]
    assert stages.batches["fetch"] == [["a"]]
    # No company was awaited; a linger of even 0.1 s would show (the bound is loose: a busy VM).
    assert item.dequeued - item.enqueued < 0.1


async def test_max_wait_keeps_a_batch_open_that_long_after_its_first_call_and_no_longer(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    wait_s = 0.2
    batcher, stages = make_batcher(max_wait_us=int(wait_s * 1e6), max_requests=1000)
    stages.hold("score", "plug")  # a direct call keeps the model busy: the rest must queue
    tasks = await submitted(batcher, items("plug"))
    await stages.started("score", "plug")
    calls: list[Item] = []
    deadline = time.perf_counter() + 1.0  # a steady stream of calls for longer than the wait
    while time.perf_counter() < deadline:
        call = Item(f"c{len(calls)}")
        calls.append(call)
        tasks.append(asyncio.create_task(batcher.submit(call)))
        await asyncio.sleep(0.02)
    stages.release("score", "plug")
    await results(tasks)
    first = stages.batches["fetch"][1]
    assert len(first) > 1  # it waited for company
    lingered_s = calls[0].dequeued - calls[0].enqueued
    assert lingered_s >= wait_s  # exact: both are perf_counter readings of the batcher
    # Closed by its first call's clock, not kept open while calls keep coming (1 s of them).
    assert lingered_s < wait_s + 0.5
    assert len(stages.batches["fetch"]) >= 3


async def test_max_wait_ends_early_when_the_batch_is_full(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher(max_wait_us=60_000_000, max_requests=2)
    stages.hold("score", "plug")
    tasks = await submitted(batcher, items("plug"))
    await stages.started("score", "plug")
    tasks += await submitted(batcher, items("a", "b"))
    await stages.started("fetch", "a")  # within WAIT_S, not after a minute
    stages.release("score", "plug")
    assert await results(tasks) == ["plug scored", "a scored", "b scored"]
    assert stages.batches["fetch"] == [["plug"], ["a", "b"]]


async def test_an_idle_batcher_runs_a_call_at_once_in_the_callers_task(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher(max_wait_us=1_000_000)  # a wait applies to queued calls only
    started = time.perf_counter()
    for name in "abc":  # one after the other: each finds the batcher idle
        (item,) = items(name)
        assert await batcher.submit(item) == f"{name} scored"
        assert item.dequeued == item.enqueued  # no queue time at all
    assert time.perf_counter() - started < 0.5  # never waited a second for company
    assert stages.batches["fetch"] == stages.batches["score"] == [["a"], ["b"], ["c"]]
    assert (batcher.direct_calls, batcher.batched_calls) == (3, 0)
    assert batcher._tasks == []  # no loop task was needed


async def test_calls_that_overlap_a_direct_call_are_coalesced(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    stages.hold("fetch", "a")
    tasks = await submitted(batcher, items("a"))
    await stages.started("fetch", "a")
    tasks += await submitted(batcher, items("b", "c", "d"))
    await asyncio.sleep(0.02)
    assert stages.batches["fetch"] == [["a"]]  # the fetch stage is a's until it is done
    stages.release("fetch", "a")
    assert await results(tasks) == [f"{name} scored" for name in "abcd"]
    assert stages.batches["fetch"] == stages.batches["score"] == [["a"], ["b", "c", "d"]]
    assert (batcher.direct_calls, batcher.batched_calls) == (1, 3)
    (e,) = items("e")
    assert await results([batcher.submit(e)]) == ["e scored"]  # idle again: direct
    assert batcher.direct_calls == 2


async def test_a_batch_never_reaches_the_model_while_a_direct_call_runs_it(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    stages.hold("score", "plug")
    tasks = await submitted(batcher, items("plug"))
    await stages.started("score", "plug")
    tasks += await submitted(batcher, items("x"))  # starts the loops
    stages.release("score", "plug")
    assert await results(tasks) == ["plug scored", "x scored"]  # idle, the score loop waiting for work
    stages.hold("score", "a")
    tasks = await submitted(batcher, items("a"))  # direct
    await stages.started("score", "a")
    tasks += await submitted(batcher, items("b"))  # fetched and handed to the waiting score loop
    await stages.started("fetch", "b")
    await asyncio.sleep(0.02)
    assert stages.batches["score"] == [["plug"], ["x"], ["a"]]  # b waits for a's model run
    stages.release("score", "a")
    assert await results(tasks) == ["a scored", "b scored"]
    assert stages.batches["score"][-2:] == [["a"], ["b"]]


@pytest.mark.parametrize("stage", ["fetch", "score"])
async def test_a_direct_call_whose_stage_raises_fails_alone(
    make_batcher: Callable[..., tuple[Batcher, Stages]], stage: str
) -> None:
    batcher, stages = make_batcher()
    error = RuntimeError(f"{stage} broke")
    stages.fail(stage, "a", error)
    assert await results([batcher.submit(Item("a"))]) == [error]
    assert await results([batcher.submit(Item("b"))]) == ["b scored"]
    assert batcher.direct_calls == 2


async def test_a_direct_caller_that_gives_up_leaves_the_batcher_idle(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    stages.hold("score", "a")
    (a,) = items("a")
    task = asyncio.create_task(batcher.submit(a))
    await stages.started("score", "a")
    task.cancel()  # its deadline passed during the model run
    assert isinstance((await results([task]))[0], asyncio.CancelledError)
    assert await results([batcher.submit(Item("b"))]) == ["b scored"]
    assert batcher.direct_calls == 2  # b found the batcher idle


async def test_the_next_batch_is_fetched_while_the_model_scores_and_one_waits_in_the_hand_off(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    stages.hold("score", "a")
    tasks = await submitted(batcher, items("a"))
    await stages.started("score", "a")
    tasks += await submitted(batcher, items("b"))
    await stages.started("fetch", "b")  # while a is being scored
    assert not tasks[0].done()
    # b waits in the hand-off: the fetch loop takes c once the hand-off is free, so c and d
    # form one batch in the queue meanwhile.
    tasks += await submitted(batcher, items("c"))
    await stages.started("fetch", "c")  # fetched, then blocked on the full hand-off
    tasks += await submitted(batcher, items("d", "e"))
    await asyncio.sleep(0.05)
    assert stages.batches["fetch"] == [["a"], ["b"], ["c"]]
    assert stages.batches["score"] == [["a"]]
    stages.release("score", "a")
    assert await results(tasks) == [f"{name} scored" for name in "abcde"]
    assert stages.batches["fetch"] == [["a"], ["b"], ["c"], ["d", "e"]]
    assert stages.batches["score"] == stages.batches["fetch"]


@pytest.mark.parametrize("stage", ["fetch", "score"])
async def test_a_stage_that_raises_fails_its_batch_only_and_the_batcher_keeps_serving(
    make_batcher: Callable[..., tuple[Batcher, Stages]], stage: str
) -> None:
    batcher, stages = make_batcher(max_requests=2)
    error = RuntimeError(f"{stage} broke")
    stages.hold("fetch", "a")
    stages.fail(stage, "b", error)
    tasks = await submitted(batcher, items("a"))
    await stages.started("fetch", "a")
    tasks += await submitted(batcher, items("b", "c", "d"))  # batches [b, c] and [d]
    stages.release("fetch", "a")
    assert await results(tasks) == ["a scored", error, error, "d scored"]
    assert await results([batcher.submit(Item("e"))]) == ["e scored"]
    assert stages.batches["fetch"] == [["a"], ["b", "c"], ["d"], ["e"]]


async def test_a_stage_that_raises_spares_the_items_it_already_resolved(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    error = RuntimeError("score broke after the first item")
    stages.resolve_first_then_raise = True
    stages.fail("score", "b", error)
    stages.hold("fetch", "plug")
    tasks = await submitted(batcher, items("plug"))
    await stages.started("fetch", "plug")
    tasks += await submitted(batcher, items("a", "b"))
    stages.release("fetch", "plug")
    assert await results(tasks) == ["plug scored", "a scored", error]


async def test_an_item_whose_caller_gave_up_is_skipped(make_batcher: Callable[..., tuple[Batcher, Stages]]) -> None:
    batcher, stages = make_batcher()
    stages.hold("fetch", "a")
    tasks = await submitted(batcher, items("a"))
    await stages.started("fetch", "a")
    tasks += await submitted(batcher, items("b", "c"))
    tasks[1].cancel()  # b's caller gives up while b is queued
    stages.release("fetch", "a")
    outcome = await results(tasks)
    assert outcome[0] == "a scored" and outcome[2] == "c scored"
    assert isinstance(outcome[1], asyncio.CancelledError)
    assert stages.batches["fetch"] == [["a"], ["c"]]


async def pipeline_full(batcher: Batcher, stages: Stages) -> list[asyncio.Task[Any]]:
    """Calls in every place: a scoring (direct), b in the hand-off, c fetching, d queued (all held)."""
    stages.hold("score", "a")
    stages.hold("fetch", "c")
    tasks = await submitted(batcher, items("a"))
    await stages.started("score", "a")
    tasks += await submitted(batcher, items("b"))
    await stages.started("fetch", "b")
    tasks += await submitted(batcher, items("c"))
    await stages.started("fetch", "c")
    tasks += await submitted(batcher, items("d"))
    return tasks


async def test_close_fails_every_waiting_item_with_unavailable(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    tasks = await pipeline_full(batcher, stages)
    async with asyncio.timeout(WAIT_S):
        await batcher.close()
    stages.release("score", "a")  # the direct call finishes its model run, then fails too
    outcome = await results(tasks)
    assert [type(o) for o in outcome] == [Unavailable] * 4, outcome
    assert stages.batches["score"] == [["a"]]  # nothing ran after close
    with pytest.raises(Unavailable, match="closed"):
        await batcher.submit(Item("late"))


async def test_close_fails_a_fetched_batch_waiting_for_the_hand_off(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    stages.hold("score", "a")
    tasks = await submitted(batcher, items("a"))
    await stages.started("score", "a")
    tasks += await submitted(batcher, items("b"))  # fetched, in the hand-off
    await stages.started("fetch", "b")
    tasks += await submitted(batcher, items("c"))  # fetched, waiting for the hand-off
    await stages.started("fetch", "c")
    await asyncio.sleep(0.01)
    await batcher.close()
    stages.release("score", "a")
    async with asyncio.timeout(1.0):
        outcome = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(o) for o in outcome] == [Unavailable] * 3


async def test_drain_and_close_finishes_what_was_submitted_and_takes_nothing_new(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher()
    tasks = await pipeline_full(batcher, stages)
    draining = asyncio.create_task(batcher.drain_and_close())
    await asyncio.sleep(0.01)
    assert not draining.done()
    with pytest.raises(Unavailable, match="closed"):
        await batcher.submit(Item("late"))
    stages.release("score", "a")
    stages.release("fetch", "c")
    assert await results(tasks) == [f"{name} scored" for name in "abcd"]
    async with asyncio.timeout(WAIT_S):
        await draining
    assert stages.batches["score"] == [["a"], ["b"], ["c"], ["d"]]


async def test_drain_and_close_of_an_idle_batcher_returns_at_once(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, _ = make_batcher()
    assert await results([batcher.submit(Item("a"))]) == ["a scored"]
    async with asyncio.timeout(WAIT_S):
        await batcher.drain_and_close()
    with pytest.raises(Unavailable):
        await batcher.submit(Item("late"))


async def test_drain_and_close_returns_when_the_queued_callers_gave_up(
    make_batcher: Callable[..., tuple[Batcher, Stages]],
) -> None:
    batcher, stages = make_batcher(max_wait_us=100_000)
    stages.hold("score", "plug")
    tasks = await submitted(batcher, items("plug"))
    await stages.started("score", "plug")
    tasks += await submitted(batcher, items("a"))  # queued: lingers 0.1 s for company
    tasks[1].cancel()
    stages.release("score", "plug")
    async with asyncio.timeout(1.0):
        await batcher.drain_and_close()
    assert stages.batches["fetch"] == [["plug"]]
