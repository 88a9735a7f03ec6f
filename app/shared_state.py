"""State that every gateway replica shares through Redis: experiment weights and API keys.
A change made through the admin API is written to Redis at once; every replica reads the
stored state at startup and then every `sync_interval_s`, so a change reaches them all
within about that long and survives restarts. Without Redis the state is process-local."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import redis.asyncio as redis

logger = logging.getLogger(__name__)

Stored = TypeVar("Stored")


class RedisShared(ABC, Generic[Stored]):
    def __init__(self, redis_url: str | None, sync_interval_s: float, what: str) -> None:
        """`what` names the state in log lines."""
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        ) if redis_url else None  # fmt: skip
        self._sync_interval_s = sync_interval_s
        self._what = what
        self._poller: asyncio.Task[None] | None = None
        self._read_failing = False

    @abstractmethod
    async def _read(self, client: redis.Redis) -> Stored | None:
        """The stored state, or None when it has not changed since the last read."""

    @abstractmethod
    def _take(self, stored: Stored) -> None:
        """Make the stored state this replica's (what is unusable in it is logged, left)."""

    async def sync(self) -> None:
        assert self._redis is not None
        try:
            stored = await self._read(self._redis)
        except redis.RedisError as exc:
            if not self._read_failing:  # once, not every poll
                logger.warning("cannot read %s changes from Redis: %s", self._what, exc)
            self._read_failing = True
            return
        self._read_failing = False
        if stored is not None:
            self._take(stored)

    async def start(self) -> None:
        if self._redis is None:
            return
        await self.sync()
        self._poller = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._redis is not None:
            await self._redis.aclose()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            await self.sync()
