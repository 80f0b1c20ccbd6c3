"""Stopping background tasks: cancel them all, then wait until each has finished.

    await cancel_all(self._tasks)

Cancelling first and awaiting second lets every task unwind at once; a task that ends
with CancelledError (the usual case) is not an error here, any other exception is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_all"]


async def cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel every one of `tasks` and wait for each to finish."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
