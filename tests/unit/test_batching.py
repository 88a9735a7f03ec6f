"""DynamicBatcher against a fake engine (a plain function standing in for CTranslate2, which
the integration tier runs for real): grouping, flushing, budgets, deadlines, cancellation,
failures and backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Hashable
from typing import Any

import pytest

from app.backends.ctranslate2.batcher import DynamicBatcher
from app.domain import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
)


class FakeItem:
    def __init__(
        self,
        name: str,
        group: Hashable = "g",
        cost: int = 10,
        deadline_s: float = 30,
        max_tokens: int = 8,
        priority: int = 1,
        tenant: str | None = None,
    ):
        self.name = name
        self.priority = priority
        self.tenant = tenant
        self.group = group
        self.cost_tokens = cost
        self.max_tokens = max_tokens
        self.deadline = time.monotonic() + deadline_s
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self.outcome: asyncio.Future[str] = self._loop.create_future()

    def complete(self) -> None:  # engine thread
        self.finished = True
        self._loop.call_soon_threadsafe(self.outcome.set_result, "done")

    def fail(self, error: Exception) -> None:
        if not self.finished:
            self.finished = True
            self._loop.call_soon_threadsafe(self.outcome.set_exception, error)


class FakeEngine:
    """Records each batch; holds it until `gate` opens; can raise or leave items unfinished."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.error: Exception | None = None
        self.skip: set[str] = set()
        self.held: set[str] = set()  # batches with these wait for held_gate instead
        self.held_gate = threading.Event()

    def __call__(self, items: list[FakeItem]) -> None:
        self.batches.append([item.name for item in items])
        self.started.release()
        held = any(item.name in self.held for item in items)
        assert (self.held_gate if held else self.gate).wait(10)
        if self.error is not None:
            raise self.error
        for item in items:
            if item.name not in self.skip:
                item.complete()

    async def wait_started(self, count: int = 1) -> None:
        for _ in range(count):
            assert await asyncio.to_thread(self.started.acquire, True, 10)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def make_batcher(engine: FakeEngine) -> AsyncIterator[Any]:
    batchers: list[DynamicBatcher[FakeItem]] = []

    def make(**options: Any) -> DynamicBatcher[FakeItem]:
        settings: dict[str, Any] = {
            "max_batch_size": 8,
            "max_wait_ms": 20,
            "arrival_gap_ms": 10_000,  # most tests are about max_wait_ms
            "max_batch_tokens": 10_000,
            "max_queue_size": 100,
            "concurrency": 1,
        }
        settings.update(options)
        batcher = DynamicBatcher(engine, **settings)
        batcher.start()
        batchers.append(batcher)
        return batcher

    yield make
    engine.gate.set()
    for batcher in batchers:
        await batcher.close()


async def outcomes(items: list[FakeItem]) -> list[str | BaseException]:
    async with asyncio.timeout(10):
        return await asyncio.gather(*(i.outcome for i in items), return_exceptions=True)


async def test_groups_never_share_a_batch(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(max_wait_ms=50)
    items = [FakeItem(f"{g}{i}", group=g) for i in range(3) for g in ("a", "b")]
    for item in items:
        batcher.submit(item)
    assert await outcomes(items) == ["done"] * 6
    assert sorted(engine.batches) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]


async def test_flushes_at_once_when_batch_is_full(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(max_batch_size=4, max_wait_ms=5_000)
    items = [FakeItem(str(i)) for i in range(4)]
    started = time.monotonic()
    for item in items:
        batcher.submit(item)
    await outcomes(items)
    assert time.monotonic() - started < 2.5  # far below max_wait
    assert engine.batches == [["0", "1", "2", "3"]]


async def test_flushes_a_partial_batch_after_max_wait(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(max_batch_size=8, max_wait_ms=150)
    item = FakeItem("only")
    started = time.monotonic()
    batcher.submit(item)
    await outcomes([item])
    assert time.monotonic() - started >= 0.15
    assert engine.batches == [["only"]]


async def test_token_budget_splits_batches(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(max_batch_tokens=100, max_wait_ms=50)
    items = [FakeItem(str(i), cost=40) for i in range(3)]
    for item in items:
        batcher.submit(item)
    await outcomes(items)
    assert engine.batches == [["0", "1"], ["2"]]


async def test_one_item_over_budget_still_runs_alone(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(max_batch_tokens=100, max_wait_ms=10)
    item = FakeItem("big", cost=500)
    batcher.submit(item)
    assert await outcomes([item]) == ["done"]


async def test_waiting_work_is_split_across_free_slots(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(concurrency=2, max_batch_size=8, max_wait_ms=50)
    engine.gate.clear()
    items = [FakeItem(str(i)) for i in range(8)]
    for item in items:
        batcher.submit(item)
    await engine.wait_started(2)
    engine.gate.set()
    await outcomes(items)
    assert sorted(len(batch) for batch in engine.batches) == [4, 4]


async def test_long_requests_leave_a_slot_to_the_others(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(concurrency=2, long_tokens=100, max_wait_ms=5)
    engine.held = {"long a", "long b"}
    long_a = FakeItem("long a", group="a", max_tokens=8000)
    long_b = FakeItem("long b", group="b", max_tokens=8000)
    batcher.submit(long_a)
    await engine.wait_started()
    batcher.submit(long_b)
    # Short requests of long b's group: served beside long a, without long b in their batch.
    short = [FakeItem(f"short {i}", group="b") for i in range(3)]
    for item in short:
        batcher.submit(item)
    assert await outcomes(short) == ["done"] * 3
    assert engine.batches == [["long a"], ["short 0", "short 1", "short 2"]]
    engine.held_gate.set()  # long a ends: long b takes its place
    assert await outcomes([long_a, long_b]) == ["done", "done"]
    assert engine.batches[-1] == ["long b"]


async def test_a_batch_class_backlog_leaves_a_slot_to_the_others(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(concurrency=2, max_batch_size=2, max_wait_ms=5)
    engine.held = {f"bulk {i}" for i in range(6)}
    bulk = [FakeItem(f"bulk {i}", tenant="bulk", priority=2) for i in range(6)]
    for item in bulk:
        batcher.submit(item)
    await engine.wait_started()
    # One slot holds batch-class work; the other stays free for what comes next.
    chat = FakeItem("chat", tenant="chat", priority=0)
    batcher.submit(chat)
    assert await outcomes([chat]) == ["done"]
    assert engine.batches == [["bulk 0", "bulk 1"], ["chat"]]
    engine.held_gate.set()
    assert await outcomes(bulk) == ["done"] * 6


async def test_deadline_passed_in_queue_fails_with_timeout(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    blocker = FakeItem("blocker")
    batcher.submit(blocker)
    await engine.wait_started()
    late = FakeItem("late", deadline_s=0.05)
    batcher.submit(late)
    await asyncio.sleep(0.1)  # let the deadline pass while the only slot is busy
    engine.gate.set()
    result = await outcomes([blocker, late])
    assert result[0] == "done"
    assert isinstance(result[1], DeadlineExceededError)
    assert engine.batches == [["blocker"]]


async def test_cancelled_item_leaves_the_queue_and_never_runs(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    first, cancelled, last = FakeItem("first"), FakeItem("cancelled"), FakeItem("last")
    batcher.submit(first)
    await engine.wait_started()
    batcher.submit(cancelled)
    batcher.submit(last)
    assert batcher.remove(cancelled)
    assert batcher.queue_depth == 1
    engine.gate.set()
    assert await outcomes([first, last]) == ["done", "done"]
    assert engine.batches == [["first"], ["last"]]
    assert not batcher.remove(cancelled)


async def test_engine_error_reaches_every_caller(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(max_wait_ms=20)
    engine.error = RuntimeError("CUDA out of memory")
    items = [FakeItem(str(i)) for i in range(3)]
    for item in items:
        batcher.submit(item)
    results = await outcomes(items)
    assert all(isinstance(r, EngineError) and "CUDA out of memory" in str(r) for r in results)
    engine.error = None
    after = FakeItem("after")
    batcher.submit(after)
    assert await outcomes([after]) == ["done"]  # the slot was given back


async def test_the_engines_verdict_on_the_requests_reaches_them_as_it_is(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(max_wait_ms=20)
    engine.error = InvalidRequestError("the engine refused: top_k", param="top_k")
    items = [FakeItem(str(i)) for i in range(2)]
    for item in items:
        batcher.submit(item)
    assert await outcomes(items) == [engine.error, engine.error]


async def test_item_left_unfinished_by_engine_gets_an_error(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(max_wait_ms=20)
    engine.skip = {"forgotten"}
    items = [FakeItem("kept"), FakeItem("forgotten")]
    for item in items:
        batcher.submit(item)
    results = await outcomes(items)
    assert results[0] == "done"
    assert isinstance(results[1], EngineError)


async def test_full_queue_refuses_at_once(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(max_batch_size=1, max_wait_ms=0, max_queue_size=2)
    engine.gate.clear()
    running = FakeItem("running")
    batcher.submit(running)
    await engine.wait_started()
    queued = [FakeItem("q1"), FakeItem("q2")]
    for item in queued:
        batcher.submit(item)
    with pytest.raises(OverloadedError) as refused:
        batcher.submit(FakeItem("refused"))
    assert refused.value.retry_after_s >= 1
    engine.gate.set()
    assert await outcomes([running, *queued]) == ["done"] * 3


async def test_close_fails_queued_items(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(max_batch_size=1, max_wait_ms=0)
    engine.gate.clear()
    running, queued = FakeItem("running"), FakeItem("queued")
    batcher.submit(running)
    await engine.wait_started()
    batcher.submit(queued)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    engine.gate.set()
    await closing
    results = await outcomes([running, queued])
    assert results[0] == "done"
    assert isinstance(results[1], NotReadyError)
    with pytest.raises(NotReadyError):
        batcher.submit(FakeItem("late"))


async def test_lone_request_waits_only_the_arrival_gap(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(concurrency=2, max_wait_ms=2_000, arrival_gap_ms=20)
    item = FakeItem("alone")
    started = time.monotonic()
    batcher.submit(item)
    await outcomes([item])
    assert time.monotonic() - started < 1.0  # the gap, not max_wait


async def test_a_burst_forms_one_batch_despite_short_gaps(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(concurrency=1, max_batch_size=16, max_wait_ms=2_000,
                           arrival_gap_ms=200)  # fmt: skip
    items = [FakeItem(str(i)) for i in range(6)]
    for item in items:
        batcher.submit(item)
        await asyncio.sleep(0.01)  # arrivals spread, each well within the gap
    await outcomes(items)
    assert engine.batches == [[str(i) for i in range(6)]]


async def test_last_free_slot_waits_for_stragglers(engine: FakeEngine, make_batcher: Any) -> None:
    batcher = make_batcher(concurrency=2, max_batch_size=16, max_wait_ms=300, arrival_gap_ms=1)
    engine.gate.clear()
    first = FakeItem("first")
    batcher.submit(first)
    await engine.wait_started()  # one slot busy: the other is the last free one
    late = [FakeItem("a"), FakeItem("b")]
    batcher.submit(late[0])
    await asyncio.sleep(0.05)  # far past the gap, within max_wait
    batcher.submit(late[1])
    await engine.wait_started()
    engine.gate.set()
    await outcomes([first, *late])
    assert engine.batches == [["first"], ["a", "b"]]


async def test_higher_classes_first_and_keys_take_turns(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(max_batch_size=2)
    engine.gate.clear()
    blocker = FakeItem("blocker")
    batcher.submit(blocker)
    await engine.wait_started()
    # Queued behind the running batch: a batch key with many, another with two, an
    # interactive request last.
    items = [FakeItem(f"bulk{i}", tenant="bulk", priority=2) for i in range(6)]
    items += [FakeItem(f"small{i}", tenant="small", priority=2) for i in range(2)]
    items += [FakeItem("urgent", tenant="chat", priority=0)]
    for item in items:
        batcher.submit(item)
    engine.gate.set()
    await outcomes([blocker, *items])
    assert engine.batches[1:] == [
        ["urgent", "bulk0"],
        ["small0", "bulk1"],
        ["small1", "bulk2"],
        ["bulk3", "bulk4"],
        ["bulk5"],
    ]


async def test_a_full_queue_sheds_the_lowest_class_for_a_higher_one(
    engine: FakeEngine, make_batcher: Any
) -> None:
    batcher = make_batcher(max_queue_size=3)
    engine.gate.clear()
    batcher.submit(FakeItem("blocker"))
    await engine.wait_started()
    low = [FakeItem(f"low{i}", priority=2) for i in range(3)]
    for item in low:
        batcher.submit(item)
    with pytest.raises(OverloadedError):
        batcher.submit(FakeItem("another-low", priority=2))  # nothing below it to shed
    urgent = FakeItem("urgent", priority=0)
    batcher.submit(urgent)
    with pytest.raises(OverloadedError, match="higher-priority"):
        await low[2].outcome  # the newest of the lowest class made room
    assert batcher.queue_depth == 3
    engine.gate.set()
    assert await outcomes([*low[:2], urgent]) == ["done"] * 3
