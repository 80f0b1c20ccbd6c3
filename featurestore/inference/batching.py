"""Adaptive micro-batching: a lone call runs at once; overlapping calls are coalesced.

    batcher = MicroBatcher(fetch, score, max_rows=4096, max_requests=64, max_wait_us=0)
    result = await batcher.submit(item)     # item.rows, item.future set by the stages
    await batcher.close()

A call that finds the batcher idle (nothing queued, nothing fetched or scored) takes the
direct path: it runs `fetch([item])` and then `score_direct(...)` (default `score`) in
its own task, with no queue, no task switch and no copy; that is the whole cost of
batching at one call in flight. Meanwhile each stage is the direct call's: the loops
below wait for it, so calls that arrive during its fetch form the next batch. Calls that
arrive while anything is in flight queue up, and two stages run them as a pipeline, each
in its own task:

    queue --(fetch loop: takes a batch, awaits `fetch(batch)`: Redis, decode, matrix)-->
    hand-off (holds ONE fetched batch) --(score loop: awaits `score(prepared)`: model)-->

While the model scores batch k (or the direct call), batch k+1's features are fetched;
batch k+2 forms in the queue meanwhile, because the fetch loop blocks on the full
hand-off. So coalescing starts exactly when calls overlap and grows with the load, as
Triton's dynamic batcher does. A batch closes at `max_rows` rows or `max_requests` calls,
or when `max_wait_us` passed since its first call; with the default 0 it takes whatever
is queued the moment the fetch loop is free, so no call ever waits for company.

The stages own the items' futures: they set each item's result or exception (an item
whose caller gave up has a done future and is skipped). Whatever a stage raises fails
every item of its batch that is not done yet; the loops go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from featurestore import metrics
from featurestore.errors import Unavailable
from featurestore.tasks import cancel_all

__all__ = ["Batchable", "MicroBatcher"]

log = logging.getLogger(__name__)


class Batchable(Protocol):
    """What the batcher needs of an item: its row count, its future, its queue time."""

    rows: int
    future: asyncio.Future[Any]
    enqueued: float  # time.perf_counter() at submit
    dequeued: float  # set by the batcher when the fetch loop takes the item


T = TypeVar("T", bound=Batchable)
P = TypeVar("P")


class MicroBatcher(Generic[T, P]):
    """Coalesces items into batches and pipelines `fetch` (I/O) with `score` (compute).

    Parameters:
        fetch: turns a batch into a prepared batch (may fail some items itself).
        score: finishes a prepared batch, resolving its items' futures.
        score_direct: `score` for a call on the direct path (default: `score`), e.g. one
            that runs a small model on the event loop instead of a worker thread.
        max_rows, max_requests: a batch closes at either (one larger item is a batch alone).
        max_wait_us: how long a batch may wait for more items, microseconds (0: none).
    """

    def __init__(
        self,
        fetch: Callable[[Sequence[T]], Awaitable[P]],
        score: Callable[[P], Awaitable[None]],
        *,
        score_direct: Callable[[P], Awaitable[None]] | None = None,
        max_rows: int = 4096,
        max_requests: int = 64,
        max_wait_us: int = 0,
    ) -> None:
        if max_rows < 1 or max_requests < 1 or max_wait_us < 0:
            raise ValueError("max_rows and max_requests must be >= 1, max_wait_us >= 0")
        self._fetch, self._score = fetch, score
        self._score_direct = score_direct or score
        self.max_rows, self.max_requests = max_rows, max_requests
        self.max_wait_s = max_wait_us / 1e6
        self._queue: collections.deque[T] = collections.deque()
        self._wake = asyncio.Event()
        self._handoff: asyncio.Queue[tuple[Sequence[T], P]] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._in_flight = 0  # direct calls and batches taken from the queue, not finished
        self._idle = asyncio.Event()  # set whenever the queue is empty and nothing in flight
        self._idle.set()
        # Clear while a direct call fetches / while its model runs: the loops wait for it,
        # so each stage holds one batch at a time whichever path it came by.
        self._direct_fetched = asyncio.Event()
        self._direct_fetched.set()
        self._direct_scored = asyncio.Event()
        self._direct_scored.set()
        self._stopped = False  # close() ran: a direct call in flight goes no further
        self._direct_items: dict[int, T] = {}  # by id: the direct calls in flight
        self.direct_calls = self.batched_calls = 0  # how calls went, for tests and metrics

    async def submit(self, item: T) -> Any:
        """Run `item` (at once if the batcher is idle, else in a batch); its future's result."""
        if self._closed:
            raise Unavailable("the model's batcher is closed (the server is stopping)")
        item.enqueued = time.perf_counter()
        if not self._in_flight and not self._queue:
            return await self._direct(item)
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._fetch_loop()),
                asyncio.create_task(self._score_loop()),
            ]
        self.batched_calls += 1
        metrics.INFERENCE_BATCHED.inc()
        self._queue.append(item)
        self._wake.set()
        return await item.future

    async def _direct(self, item: T) -> Any:
        """Both stages in the caller's task; calls arriving meanwhile queue behind it."""
        self.direct_calls += 1
        metrics.INFERENCE_DIRECT.inc()
        self._in_flight += 1
        self._direct_items[id(item)] = item
        item.dequeued = item.enqueued
        try:
            self._direct_fetched.clear()
            try:
                prepared = await self._fetch((item,))
            finally:
                self._direct_fetched.set()
            if self._stopped:
                raise Unavailable("the server is stopping")
            self._direct_scored.clear()
            try:
                await self._score_direct(prepared)
            finally:
                self._direct_scored.set()
        except Exception as exc:
            _fail((item,), exc)
        finally:
            del self._direct_items[id(item)]
            self._finished()
        return await item.future

    def _take(self) -> list[T]:
        """Pop the next batch: at least one item, then up to the size limits."""
        queue, batch = self._queue, [self._queue.popleft()]
        rows = batch[0].rows
        while queue and len(batch) < self.max_requests and rows + queue[0].rows <= self.max_rows:
            rows += queue[0].rows
            batch.append(queue.popleft())
        now = time.perf_counter()
        for item in batch:
            item.dequeued = now
        return batch

    def _full(self) -> bool:
        queue = self._queue
        return len(queue) >= self.max_requests or sum(i.rows for i in queue) >= self.max_rows

    async def _fetch_loop(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._direct_fetched.wait()  # calls that queued behind a direct call
            if self.max_wait_s > 0 and not self._full():
                await self._linger(self._queue[0].enqueued + self.max_wait_s)
            batch = [item for item in self._take() if not item.future.done()]
            if not batch:  # every caller gave up: nothing in flight for them
                self._check_idle()
                continue
            self._in_flight += 1
            try:
                prepared = await self._fetch(batch)
            except Exception as exc:
                self._finished()
                _fail(batch, exc)
                continue
            except asyncio.CancelledError:
                _fail(batch, Unavailable("the server is stopping"))
                raise
            try:
                await self._handoff.put((batch, prepared))
            except asyncio.CancelledError:  # fetched, but not handed off: fail it here
                _fail(batch, Unavailable("the server is stopping"))
                raise

    async def _linger(self, deadline: float) -> None:
        """Wait until the queue fills up or `deadline` (perf_counter seconds) passes."""
        while not self._full():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _score_loop(self) -> None:
        while True:
            await self._direct_scored.wait()  # so a batch waits in the hand-off, not here
            batch, prepared = await self._handoff.get()
            try:
                await self._direct_scored.wait()  # one may have started meanwhile
                await self._score(prepared)
            except Exception as exc:
                _fail(batch, exc)
            except asyncio.CancelledError:
                _fail(batch, Unavailable("the server is stopping"))
                raise
            finally:
                self._finished()

    def _finished(self) -> None:
        self._in_flight -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._in_flight and not self._queue:
            self._idle.set()

    async def drain_and_close(self) -> None:
        """Take no more items, let the queued and in-flight ones finish, then `close`."""
        self._closed = True
        while self._queue or self._in_flight:
            self._idle.clear()
            await self._idle.wait()
        await self.close()

    async def close(self) -> None:
        """Stop both loops; items still queued or in the pipeline fail with Unavailable.

        A direct call runs in its caller's task: it finishes the stage it is in (its
        caller's deadline bounds it) and then fails with Unavailable too.
        """
        self._closed = self._stopped = True
        await cancel_all(self._tasks)
        self._tasks = []
        pending = [*self._queue, *self._direct_items.values()]
        while not self._handoff.empty():
            pending += self._handoff.get_nowait()[0]
        _fail(pending, Unavailable("the server is stopping"))


def _fail(items: Sequence[Batchable], exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
