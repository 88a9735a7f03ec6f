"""Request coalescing: identical cacheable requests in flight share one generation.

A `Flight` runs the generation in its own task and hands every event to each waiter, a
late waiter first catching up on what it missed. A waiter that leaves takes only itself
away; the generation is cancelled when the last waiter leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from app.protocol import Generation, GenerationEvent

Outcome = GenerationEvent | Exception


class Flight:
    def __init__(
        self,
        events: AsyncIterator[GenerationEvent],
        on_done: Callable[[list[Outcome]], Awaitable[None]],
    ) -> None:
        self._history: list[Outcome] = []
        self._waiters: set[asyncio.Queue[Outcome]] = set()
        self.from_cache = False  # set by the source when it replays a cached result
        self._task = asyncio.create_task(self._pump(events, on_done))

    async def _pump(
        self,
        events: AsyncIterator[GenerationEvent],
        on_done: Callable[[list[Outcome]], Awaitable[None]],
    ) -> None:
        try:
            async for event in events:
                self._publish(event)
        except Exception as exc:
            self._publish(exc)
        finally:
            await on_done(self._history)

    def _publish(self, outcome: Outcome) -> None:
        self._history.append(outcome)
        for queue in self._waiters:
            queue.put_nowait(outcome)

    async def join(self) -> AsyncIterator[GenerationEvent]:
        """This waiter's copy of the events; an error of the generation is raised."""
        queue: asyncio.Queue[Outcome] = asyncio.Queue()
        for outcome in self._history:  # catch up, then follow: no await in between
            queue.put_nowait(outcome)
        self._waiters.add(queue)
        try:
            while True:
                outcome = await queue.get()
                if isinstance(outcome, Exception):
                    raise outcome
                yield outcome
                if isinstance(outcome, Generation):
                    return
        finally:
            self._waiters.discard(queue)
            if not self._waiters and not self._task.done():
                self._task.cancel()
