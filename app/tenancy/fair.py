"""The order in which queued work is served, wherever it waits (the batcher's queue, the
admission queue in front of upstream replicas): higher priority classes first; within a
class, the keys in turn, so that a key with 200 queued requests does not starve one with 2.

Round robin: each key's n-th queued request comes before any key's (n+1)-th; among requests
of the same rank, the key served longest ago goes first, then arrival order. `Turns`
remembers when each key was last served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from app.domain import OverloadedError

T = TypeVar("T")


class Turns:
    """When each key was last served (a counter, not a clock). Keys are configured, so this
    stays small."""

    def __init__(self) -> None:
        self._last: dict[str | None, int] = {}
        self._tick = 0

    def served(self, tenant: str | None) -> None:
        self._tick += 1
        self._last[tenant] = self._tick

    def last(self, tenant: str | None) -> int:
        return self._last.get(tenant, 0)

    def order(
        self, queued: Sequence[T], priority: Callable[[T], int], tenant: Callable[[T], str | None]
    ) -> list[T]:
        """`queued` (in arrival order) in the order to serve it."""
        ranks: dict[tuple[int, str | None], int] = {}
        order: list[tuple[int, int, int, int]] = []
        for index, item in enumerate(queued):
            lane = (priority(item), tenant(item))
            rank = ranks.get(lane, 0)
            ranks[lane] = rank + 1
            order.append((lane[0], rank, self.last(lane[1]), index))
        if len(ranks) <= 1:  # one key in one class: arrival order
            return list(queued)
        order.sort()
        return [queued[index] for *_, index in order]


class _Waiter(Generic[T]):
    __slots__ = ("future", "priority", "tenant")

    def __init__(self, priority: int, tenant: str | None, future: asyncio.Future[T | None]):
        self.priority, self.tenant, self.future = priority, tenant, future


class AdmissionQueue(Generic[T]):
    """Requests waiting for a slot (an upstream replica under its concurrency cap). Whoever
    frees a slot hands it to the next waiter in fair order (`wake(slot)`), or wakes one to
    look again (`wake(None)`). A slot handed to a waiter that has just left is passed on,
    or given back through `unclaimed`."""

    def __init__(
        self,
        max_waiting: int,
        unclaimed: Callable[[T], None],
        on_change: Callable[[int], None] = lambda waiting: None,
    ) -> None:
        self._max_waiting = max_waiting
        self._unclaimed = unclaimed
        self._on_change = on_change  # told how many wait, whenever that changes
        self._waiting: list[_Waiter[T]] = []
        self._turns = Turns()

    def __len__(self) -> int:
        return len(self._waiting)

    async def wait(self, priority: int, tenant: str | None) -> T | None:
        if len(self._waiting) >= self._max_waiting:
            raise OverloadedError(
                f"{self._max_waiting} requests are waiting for a free upstream; retry later"
            )
        waiter: _Waiter[T] = _Waiter(priority, tenant, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._on_change(len(self._waiting))
        try:
            return await waiter.future
        except BaseException:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                self._on_change(len(self._waiting))
            elif not waiter.future.cancelled():  # woken, then cancelled before it ran
                slot = waiter.future.result()
                if not self.wake(slot) and slot is not None:
                    self._unclaimed(slot)
            raise

    def wake(self, slot: T | None) -> bool:
        """Hand `slot` (or None: a reason to look again) to the next waiter; False if none."""
        if not self._waiting:
            return False
        first = self._turns.order(self._waiting, lambda w: w.priority, lambda w: w.tenant)[0]
        self._waiting.remove(first)
        self._on_change(len(self._waiting))
        self._turns.served(first.tenant)
        first.future.set_result(slot)
        return True
