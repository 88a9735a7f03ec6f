"""Flight: one generation, many waiters; a waiter leaving takes only itself away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.cache.coalescing import Flight, Published
from app.domain import EngineError, Generation, GenerationEvent, TokenEvent

FINAL = Generation("abc", "length", "length", 3, 3)


class Source:
    """A generation that emits a token whenever `step` is released, and records whether
    it was cancelled (a plain async generator standing in for a backend)."""

    def __init__(self, fail: bool = False) -> None:
        self.step = asyncio.Semaphore(0)
        self.cancelled = asyncio.Event()
        self.fail = fail

    async def events(self) -> AsyncIterator[GenerationEvent]:
        try:
            for i, text in enumerate("abc"):
                await self.step.acquire()
                yield TokenEvent(i, text, None)
            if self.fail:
                raise EngineError("engine failed")
            yield FINAL
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def collect(flight: Flight) -> list[GenerationEvent]:
    return [event async for event in flight.join()]


async def test_late_waiter_catches_up_and_all_get_everything() -> None:
    source, finished = Source(), asyncio.Event()

    async def done(history: list[Published]) -> None:
        finished.set()

    flight = Flight(source.events(), done)
    first = asyncio.create_task(collect(flight))
    source.step.release()
    await asyncio.sleep(0.01)
    second = asyncio.create_task(collect(flight))  # joins after the first token
    for _ in range(2):
        source.step.release()
    results = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert results[0] == results[1]
    assert results[0][-1] == FINAL
    assert [e.text for e in results[0]] == ["a", "b", "c", "abc"]
    await asyncio.wait_for(finished.wait(), 5)


async def test_one_waiter_leaving_leaves_the_others_served() -> None:
    source = Source()

    async def done(history: list[Published]) -> None:
        pass

    flight = Flight(source.events(), done)
    leaving = asyncio.create_task(collect(flight))
    staying = asyncio.create_task(collect(flight))
    source.step.release()
    await asyncio.sleep(0.01)
    leaving.cancel()
    for _ in range(2):
        source.step.release()
    result = await asyncio.wait_for(staying, 5)
    assert result[-1] == FINAL
    assert not source.cancelled.is_set()


async def test_generation_is_cancelled_when_the_last_waiter_leaves() -> None:
    source = Source()
    history_seen: list[Published] = []

    async def done(history: list[Published]) -> None:
        history_seen.extend(history)

    flight = Flight(source.events(), done)
    waiters = [asyncio.create_task(collect(flight)) for _ in range(3)]
    source.step.release()
    await asyncio.sleep(0.01)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.wait_for(source.cancelled.wait(), 5)
    assert not any(isinstance(o, Generation) for o in history_seen)


async def test_a_failed_generation_fails_every_waiter() -> None:
    source = Source(fail=True)

    async def done(history: list[Published]) -> None:
        pass

    flight = Flight(source.events(), done)
    waiters = [asyncio.create_task(collect(flight)) for _ in range(2)]
    for _ in range(3):
        source.step.release()
    for waiter in waiters:
        with pytest.raises(EngineError):
            await asyncio.wait_for(waiter, 5)
