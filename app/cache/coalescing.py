"""Request coalescing: identical cacheable requests in flight share one generation.

A `Flight` runs the generation in its own task and hands every event to each waiter, a
late waiter first catching up on what it missed. A waiter that leaves takes only itself
away; the generation is cancelled when the last waiter leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from app.domain import BackendEvent, Generation, Waited

# What a flight hands its waiters: each event, or the error that ended the generation.
Published = BackendEvent | Exception


class Flight:
    def __init__(
        self,
        events: AsyncIterator[BackendEvent],
        on_done: Callable[[list[Published]], Awaitable[None]],
    ) -> None:
        self._history: list[Published] = []
        self._waiters: set[asyncio.Queue[Published]] = set()
        self._task = asyncio.create_task(self._pump(events, on_done))

    async def _pump(
        self,
        events: AsyncIterator[BackendEvent],
        on_done: Callable[[list[Published]], Awaitable[None]],
    ) -> None:
        try:
            async for event in events:
                self._publish(event)
        except Exception as exc:
            self._publish(exc)
        finally:
            await on_done(self._history)

    def _publish(self, item: Published) -> None:
        self._history.append(item)
        for queue in self._waiters:
            queue.put_nowait(item)

    async def join(self) -> AsyncIterator[BackendEvent]:
        """This waiter's copy of the events; an error of the generation is raised."""
        queue: asyncio.Queue[Published] = asyncio.Queue()
        for item in self._history:  # catch up, then follow: no await in between
            if not isinstance(item, Waited):  # this waiter was not there yet
                queue.put_nowait(item)
        self._waiters.add(queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, Generation):
                    return
        finally:
            self._waiters.discard(queue)
            if not self._waiters and not self._task.done():
                self._task.cancel()
