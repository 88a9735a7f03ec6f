"""Fair order (classes first, keys in turn) and the admission queue's hand-offs, including a
waiter that leaves as a slot reaches it."""

from __future__ import annotations

import asyncio

import pytest

from app.domain import OverloadedError
from app.tenancy.fair import AdmissionQueue, Turns

Item = tuple[str, int, str | None]  # label, priority, key


def order(turns: Turns, items: list[Item]) -> list[str]:
    return [label for label, _, _ in turns.order(items, lambda i: i[1], lambda i: i[2])]


def test_classes_first_then_keys_in_turn() -> None:
    items: list[Item] = [("a1", 1, "a"), ("a2", 1, "a"), ("a3", 1, "a"), ("b1", 1, "b"),
                         ("low", 2, "a"), ("high", 0, "c"), ("anon", 1, None)]  # fmt: skip
    assert order(Turns(), items) == ["high", "a1", "b1", "anon", "a2", "a3", "low"]


def test_the_key_served_longest_ago_goes_first() -> None:
    turns = Turns()
    items: list[Item] = [("a1", 1, "a"), ("a2", 1, "a"), ("b1", 1, "b")]
    turns.served("a")
    assert order(turns, items) == ["b1", "a1", "a2"]
    turns.served("b")
    assert order(turns, [*items[:2], ("b2", 1, "b")]) == ["a1", "b2", "a2"]


async def test_slots_go_in_fair_order_and_are_never_lost() -> None:
    unclaimed: list[str] = []
    queue: AdmissionQueue[str] = AdmissionQueue(3, unclaimed.append)
    bulk = asyncio.create_task(queue.wait(2, "bulk"))
    chat = asyncio.create_task(queue.wait(0, "chat"))
    leaver = asyncio.create_task(queue.wait(1, "std"))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        await queue.wait(0, "chat")  # max_waiting
    assert queue.wake("slot-1")
    assert await chat == "slot-1"
    # Handed a slot, then cancelled before it could run: the slot goes to the next.
    assert queue.wake("slot-2")
    leaver.cancel()
    assert await bulk == "slot-2"
    with pytest.raises(asyncio.CancelledError):
        await leaver
    # Nobody left to pass it to: it comes back through `unclaimed`.
    last = asyncio.create_task(queue.wait(1, "std"))
    await asyncio.sleep(0)
    assert queue.wake("slot-3")
    last.cancel()
    with pytest.raises(asyncio.CancelledError):
        await last
    assert unclaimed == ["slot-3"]
    assert len(queue) == 0
    assert not queue.wake("slot-4")
