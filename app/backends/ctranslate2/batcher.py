"""DynamicBatcher: collects requests into batches for an engine with no continuous batching.

One task owns the queue. A batch is formed from the oldest request and the queued requests
that can share its engine call (same `group`), in arrival order, once `max_batch_size` or the
token budget is reached, or requests stop arriving (none for `arrival_gap_ms`), or the oldest
has waited `max_wait_ms`. The gap rule lets a burst of clients (which reaches the server
spread over tens of milliseconds) form one batch, while a lone request waits only the gap;
the last free slot of several ignores the gap, since a request that just misses it waits a
whole batch.
Up to `concurrency` batches
run at once, each in its own thread; when several engine slots are free the waiting requests
are split evenly across them, since two half batches in parallel beat one full batch on CPU.
A batch runs until its longest request ends, and there is no preempting it. So batches
that hold a request for more than `long_tokens` new tokens, or a request of the batch
priority class, may take all the slots but one: the other requests (interactive and
standard, short) always find a slot soon, rather than behind long generations or a batch
backlog (with a single slot, nothing can be kept back). The price: with only such work
queued, one slot stays idle.

Which queued requests a batch takes first is `Turns.order`'s: higher priority classes first,
and the keys of a class in turn. A full queue makes room for a request of a higher class by
refusing the newest request of the lowest class below it.

Every submitted item gets exactly one outcome: the engine finishes it, or the batcher fails
it (deadline passed in the queue, engine raised, shutdown). Cancelled items leave the queue
at once; running ones are expected to stop themselves at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

from app.domain import (
    BATCH_PRIORITY,
    DeadlineExceededError,
    EngineError,
    GatewayError,
    NotReadyError,
    OverloadedError,
)
from app.tenancy.fair import Turns

logger = logging.getLogger(__name__)


class BatchItem(Protocol):
    @property
    def group(self) -> Hashable: ...  # items of one group can share an engine call
    @property
    def cost_tokens(self) -> int: ...  # prompt + max new tokens
    @property
    def max_tokens(self) -> int: ...  # max new tokens
    @property
    def deadline(self) -> float: ...  # time.monotonic()
    @property
    def priority(self) -> int: ...  # an index into PRIORITY_CLASSES: lower goes first
    @property
    def tenant(self) -> str | None: ...  # the key it came with: keys take turns
    @property
    def finished(self) -> bool: ...
    def fail(self, error: Exception) -> None: ...


ItemT = TypeVar("ItemT", bound=BatchItem)


class BatchObserver(Protocol):
    def queued(self, depth: int) -> None: ...
    def batch_started(self, size: int, queue_waits_s: list[float]) -> None: ...


class DynamicBatcher(Generic[ItemT]):
    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], None],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        arrival_gap_ms: float,
        max_batch_tokens: int,
        max_queue_size: int,
        concurrency: int,
        long_tokens: int | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._arrival_gap_s = min(arrival_gap_ms, max_wait_ms) / 1000
        self._last_arrival = 0.0
        self._max_batch_tokens = max_batch_tokens
        self._max_queue_size = max_queue_size
        self._concurrency = concurrency
        self._long_tokens = long_tokens
        self._max_yielding = max(1, concurrency - 1)  # batches that leave the last slot free
        self._yielding_running = 0
        self._observer = observer
        self._pending: deque[tuple[float, ItemT]] = deque()  # (enqueued at, item)
        self._turns = Turns()
        self._arrived = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._free_slots = concurrency
        self._running: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="engine")
        self._scheduler: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._scheduler = asyncio.create_task(self._schedule(), name="batch-scheduler")

    def submit(self, item: ItemT) -> None:
        """Queue an item, or refuse it at once when the queue is full."""
        if self._closed:
            raise NotReadyError("the server is shutting down")
        if len(self._pending) >= self._max_queue_size:
            self._shed_for(item)
        self._last_arrival = time.monotonic()
        self._pending.append((self._last_arrival, item))
        self._arrived.set()
        self._notify_depth()

    def _shed_for(self, item: ItemT) -> None:
        """Refuse the newest queued request of the lowest class below `item`'s, or `item`."""
        lowest = max(entry[1].priority for entry in self._pending)
        if lowest <= item.priority:
            raise OverloadedError(
                f"the request queue is full ({self._max_queue_size} waiting); retry later",
                retry_after_s=1,
            )
        victim = next(e for e in reversed(self._pending) if e[1].priority == lowest)
        self._pending.remove(victim)
        victim[1].fail(
            OverloadedError("the request queue is full; higher-priority requests went first")
        )

    def remove(self, item: ItemT) -> bool:
        """Take a not-yet-started item out of the queue; False if it is not queued."""
        for entry in self._pending:
            if entry[1] is item:
                self._pending.remove(entry)
                self._notify_depth()
                return True
        return False

    async def close(self, grace_s: float = 10.0) -> None:
        self._closed = True
        if self._scheduler is not None:
            self._scheduler.cancel()
        while self._pending:
            self._pending.popleft()[1].fail(NotReadyError("the server is shutting down"))
        self._notify_depth()
        if self._running:
            await asyncio.wait(self._running, timeout=grace_s)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _schedule(self) -> None:
        while True:
            while self._free_slots == 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            batch = await self._next_batch()
            self._free_slots -= 1
            yielding = any(self._yields(item) for item in batch)
            self._yielding_running += yielding
            task = asyncio.create_task(self._run(batch, yielding))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[ItemT]:
        while True:
            self._fail_expired()
            eligible = self._eligible()
            if not eligible:  # none queued, or only yielding ones while they have their slots
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = self._ready_batch(eligible)
            if batch is not None:
                return self._take(batch)
            self._arrived.clear()
            wait_s = self._wait_until(min(entry[0] for entry in eligible)) - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait_s)

    def _yields(self, item: ItemT) -> bool:
        """Long, or of the batch class: it may not take the last free slot."""
        long = self._long_tokens is not None and item.max_tokens > self._long_tokens
        return long or item.priority >= BATCH_PRIORITY

    def _eligible(self) -> list[tuple[float, ItemT]]:
        """The queued items the next batch may take, in the order to serve them."""
        if self._yielding_running < self._max_yielding:
            eligible = list(self._pending)
        else:
            eligible = [entry for entry in self._pending if not self._yields(entry[1])]
        return self._turns.order(eligible, lambda e: e[1].priority, lambda e: e[1].tenant)

    def _wait_until(self, oldest: float) -> float:
        deadline = oldest + self._max_wait_s
        if self._free_slots == 1 and self._concurrency > 1:
            # The last free slot: a straggler it misses waits a whole batch, so wait longer.
            return deadline
        return min(deadline, self._last_arrival + self._arrival_gap_s)

    def _ready_batch(self, eligible: list[tuple[float, ItemT]]) -> list[tuple[float, ItemT]] | None:
        """The batch the oldest eligible item leads, once it is full or that item has waited
        enough."""
        group = eligible[0][1].group
        compatible = [entry for entry in eligible if entry[1].group == group]
        full = (
            len(compatible) >= self._max_batch_size
            or sum(entry[1].cost_tokens for entry in compatible) > self._max_batch_tokens
        )
        oldest = min(entry[0] for entry in compatible)
        if not full and time.monotonic() < self._wait_until(oldest):
            return None
        # Leave work for the other free slots rather than running one big batch.
        size = min(self._max_batch_size, math.ceil(len(compatible) / self._free_slots))
        batch: list[tuple[float, ItemT]] = []
        tokens = 0
        for entry in compatible:
            cost = entry[1].cost_tokens
            if batch and (len(batch) == size or tokens + cost > self._max_batch_tokens):
                break
            batch.append(entry)
            tokens += cost
        return batch

    def _take(self, batch: list[tuple[float, ItemT]]) -> list[ItemT]:
        now = time.monotonic()
        taken = {id(entry) for entry in batch}
        for _, item in batch:
            self._turns.served(item.tenant)
        self._pending = deque(entry for entry in self._pending if id(entry) not in taken)
        self._notify_depth()
        waits = [now - enqueued for enqueued, _ in batch]
        logger.debug(
            "batch of %d (max wait %.1f ms), %d left waiting, %d free slot(s)",
            len(batch), 1000 * max(waits), len(self._pending), self._free_slots,
        )  # fmt: skip
        if self._observer is not None:
            self._observer.batch_started(len(batch), waits)
        return [item for _, item in batch]

    def _fail_expired(self) -> None:
        now = time.monotonic()
        expired = [entry for entry in self._pending if entry[1].deadline <= now]
        for entry in expired:
            self._pending.remove(entry)
            entry[1].fail(DeadlineExceededError("the request timed out waiting in the queue"))
        if expired:
            self._notify_depth()

    async def _run(self, batch: list[ItemT], yielding: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._run_batch, batch)
        except GatewayError as exc:  # the engine's verdict on the requests themselves
            error: Exception = exc
        except Exception as exc:
            logger.exception("engine failed on a batch of %d", len(batch))
            error = EngineError(f"the engine failed: {type(exc).__name__}: {exc}")
        else:
            error = EngineError("the engine ended the batch without finishing this request")
        finally:
            self._free_slots += 1
            self._yielding_running -= yielding
            self._slot_freed.set()
            self._arrived.set()  # yielding items may be eligible again
        for item in batch:
            if not item.finished:
                item.fail(error)

    def _notify_depth(self) -> None:
        if self._observer is not None:
            self._observer.queued(len(self._pending))
