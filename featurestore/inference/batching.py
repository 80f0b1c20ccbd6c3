"""Micro-batching: concurrent calls coalesced so Redis and the model each see one per batch.

    batcher = MicroBatcher(fetch, score, max_rows=4096, max_requests=64, max_wait_us=0)
    result = await batcher.submit(item)     # item.rows, item.future set by the stages
    await batcher.close()

Two stages run as a pipeline, each in its own task:

    queue --(fetch loop: takes a batch, awaits `fetch(batch)`: Redis, decode, matrix)-->
    hand-off (holds ONE fetched batch) --(score loop: awaits `score(prepared)`: model)-->

While the model scores batch k, batch k+1's features are fetched; batch k+2 forms in the
queue meanwhile, because the fetch loop blocks on the full hand-off. A batch closes at
`max_rows` rows or `max_requests` calls, or when `max_wait_us` passed since its first
call; with the default 0 it takes whatever is queued the moment the fetch loop is free,
so an idle server adds no wait (Triton's dynamic batcher without a queue delay).

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
        max_rows, max_requests: a batch closes at either (one larger item is a batch alone).
        max_wait_us: how long a batch may wait for more items, microseconds (0: none).
    """

    def __init__(
        self,
        fetch: Callable[[Sequence[T]], Awaitable[P]],
        score: Callable[[P], Awaitable[None]],
        *,
        max_rows: int = 4096,
        max_requests: int = 64,
        max_wait_us: int = 0,
    ) -> None:
        if max_rows < 1 or max_requests < 1 or max_wait_us < 0:
            raise ValueError("max_rows and max_requests must be >= 1, max_wait_us >= 0")
        self._fetch, self._score = fetch, score
        self.max_rows, self.max_requests = max_rows, max_requests
        self.max_wait_s = max_wait_us / 1e6
        self._queue: collections.deque[T] = collections.deque()
        self._wake = asyncio.Event()
        self._handoff: asyncio.Queue[tuple[Sequence[T], P]] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._in_flight = 0  # batches taken from the queue and not finished
        self._idle = asyncio.Event()  # set whenever the queue is empty and nothing in flight
        self._idle.set()

    async def submit(self, item: T) -> Any:
        """Queue `item` and wait for its result (its future's)."""
        if self._closed:
            raise Unavailable("the model's batcher is closed (the server is stopping)")
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._fetch_loop()),
                asyncio.create_task(self._score_loop()),
            ]
        item.enqueued = time.perf_counter()
        self._queue.append(item)
        self._wake.set()
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
            batch, prepared = await self._handoff.get()
            try:
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
        """Stop both loops; items still queued or in flight fail with Unavailable."""
        self._closed = True
        await cancel_all(self._tasks)
        self._tasks = []
        pending = list(self._queue)
        while not self._handoff.empty():
            pending += self._handoff.get_nowait()[0]
        _fail(pending, Unavailable("the server is stopping"))


def _fail(items: Sequence[Batchable], exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
