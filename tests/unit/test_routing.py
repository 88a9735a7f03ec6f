"""Routing policies for upstream replicas: prefixes stay where their KV cache is unless that
replica is overloaded; sessions stick by rendezvous hashing and move only when their replica
leaves or is over its bound; ties take turns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from app.backends.routing import COLD, LOAD_OVERRIDE, PREFIX_HIT, SESSION, Router
from app.settings import RoutingSettings

SYSTEM = "You are a helpful assistant for ACME. " * 40  # a long shared prefix


@dataclass(eq=False)
class Replica:
    url: str
    outstanding: int = 0


def replicas(n: int = 3) -> list[Replica]:
    return [Replica(f"http://r{i}:8000") for i in range(n)]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_least_outstanding_ties_take_turns() -> None:
    router, pool = Router(RoutingSettings()), replicas()
    chosen = Counter(router.choose(pool, "x", None)[0].url for _ in range(30))
    assert sorted(chosen.values()) == [10, 10, 10]
    pool[0].outstanding = 5
    assert all(router.choose(pool, "x", None)[0] is not pool[0] for _ in range(10))


def test_a_shared_prefix_stays_on_one_replica() -> None:
    router, pool = Router(RoutingSettings(policy="prefix")), replicas()
    first, reason = router.choose(pool, SYSTEM + "Question 0", None)
    assert reason == COLD
    for i in range(1, 10):
        replica, reason = router.choose(pool, SYSTEM + f"Question {i}", None)
        assert (replica, reason) == (first, PREFIX_HIT)
    # Another tenant's prefix is cold, and goes to the least loaded.
    first.outstanding = 1
    other, reason = router.choose(pool, "Another system prompt entirely. " * 40, None)
    assert reason == COLD
    assert other is not first


def test_with_two_replicas_a_holder_far_above_the_other_passes_its_prefix_on() -> None:
    router, pool = Router(RoutingSettings(policy="prefix")), replicas(2)
    holder, _ = router.choose(pool, SYSTEM + "q", None)
    other = pool[1] if holder is pool[0] else pool[0]
    holder.outstanding, other.outstanding = 10, 8  # about even: the prefix stays
    assert router.choose(pool, SYSTEM + "q1", None) == (holder, PREFIX_HIT)
    holder.outstanding, other.outstanding = 20, 5  # 15 more than 5 (+1) over 0.5: it goes
    assert router.choose(pool, SYSTEM + "q2", None) == (other, LOAD_OVERRIDE)


def test_an_overloaded_replica_passes_its_prefix_on() -> None:
    router, pool = Router(RoutingSettings(policy="prefix")), replicas()
    holder, _ = router.choose(pool, SYSTEM + "q", None)
    holder.outstanding = 10  # the others idle: far over the mean
    replica, reason = router.choose(pool, SYSTEM + "q2", None)
    assert reason == LOAD_OVERRIDE
    assert replica is not holder
    # Both hold the prefix now; a little busier than the others, the holder is still worth
    # its cache against a cold replica.
    replica.outstanding = 20
    holder.outstanding = 1
    assert router.choose(pool, SYSTEM + "q3", None) == (holder, PREFIX_HIT)


def test_a_replica_leaving_forgets_its_prefixes_and_they_age_out() -> None:
    clock = Clock()
    router, pool = Router(RoutingSettings(policy="prefix", ttl_s=60), clock), replicas()
    holder, _ = router.choose(pool, SYSTEM + "q", None)
    router.forget(holder.url)
    assert router.choose([r for r in pool if r is not holder], SYSTEM + "q", None)[1] == COLD
    again, _ = router.choose(pool, SYSTEM + "q", None)
    assert router.choose(pool, SYSTEM + "q", None) == (again, PREFIX_HIT)
    clock.now = 61
    assert router.choose(pool, SYSTEM + "q", None)[1] == COLD


def test_remembered_blocks_are_bounded() -> None:
    router, pool = Router(RoutingSettings(policy="prefix", max_blocks=8)), replicas(1)
    for i in range(100):
        router.choose(pool, f"prompt {i} " * 50, None)
    assert len(router._blocks[pool[0].url]) == 8


def test_sessions_stick_and_move_only_with_their_replica() -> None:
    router, pool = Router(RoutingSettings(policy="session")), replicas(4)
    users = [f"user{i}" for i in range(200)]
    home = {u: router.choose(pool, "", u) for u in users}
    assert {reason for _, reason in home.values()} == {SESSION}
    assert min(Counter(r.url for r, _ in home.values()).values()) > 20  # spread
    assert all(router.choose(pool, "", u)[0] is home[u][0] for u in users)
    gone = pool[0]
    rest = pool[1:]
    for u in users:
        moved = router.choose(rest, "", u)[0]
        if home[u][0] is not gone:
            assert moved is home[u][0]  # rendezvous: only the leaver's users move


def test_a_session_over_its_load_bound_moves_on() -> None:
    router, pool = Router(RoutingSettings(policy="session", load_epsilon=0.25)), replicas(2)
    replica, _ = router.choose(pool, "", "alice")
    replica.outstanding = 4  # the other 0: mean 2.5 with this request, bound ceil(3.1)
    other, reason = router.choose(pool, "", "alice")
    assert (other is not replica, reason) == (True, LOAD_OVERRIDE)
