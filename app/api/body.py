"""Reading request bodies, bounded in size, in time and in number, so that clients sending
slowly (or too much) cannot hold the server: a body over `max_bytes` is refused (413, also a
chunked one, as soon as it passes the limit), one still arriving `timeout_s` after its request
is cut off (408), and at most `max_readers` bodies are awaited at once: past that, the one
that has waited longest for its next bytes is cut off (408), so that slow senders make room
for working clients rather than take their places. Refusals close the connection (its
unread body)."""

from __future__ import annotations

import asyncio
import time

from starlette.types import Message, Receive

from app.domain import PayloadTooLargeError, RequestTimeoutError


class BodyReaders:
    """The bounds, and the bodies being awaited now (in the order their waits started)."""

    def __init__(self, max_bytes: int, timeout_s: float, max_readers: int) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._max_readers = max_readers
        self._waiting: dict[BodyReceiver, asyncio.Timeout] = {}

    def receiver(self, receive: Receive, arrived_at: float) -> BodyReceiver:
        return BodyReceiver(self, receive, arrived_at + self.timeout_s)

    def declared_too_large(self, content_length: str) -> PayloadTooLargeError | None:
        """The refusal of a body whose declared length is over the limit, before reading it."""
        if content_length.isdigit() and int(content_length) > self.max_bytes:
            return self.too_large()
        return None

    def too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the request body is larger than {self.max_bytes} bytes")

    def wait_started(self, reader: BodyReceiver, timeout: asyncio.Timeout) -> None:
        self._waiting[reader] = timeout
        while len(self._waiting) > self._max_readers:
            oldest, its_timeout = next(iter(self._waiting.items()))
            del self._waiting[oldest]
            if not its_timeout.expired():  # else it is being cut off already
                oldest.evicted = True
                its_timeout.reschedule(asyncio.get_running_loop().time())

    def wait_ended(self, reader: BodyReceiver) -> None:
        self._waiting.pop(reader, None)


class BodyReceiver:
    """The ASGI `receive` of one request, as its app sees it."""

    __slots__ = ("_deadline", "_readers", "_receive", "_received", "done", "evicted")

    def __init__(self, readers: BodyReaders, receive: Receive, deadline: float) -> None:
        self._readers = readers
        self._receive = receive
        self._deadline = deadline  # time.monotonic()
        self._received = 0
        self.done = False  # the whole body has arrived
        self.evicted = False

    async def __call__(self) -> Message:
        if self.done:  # later calls wait for the disconnect: no bound
            return await self._receive()
        loop = asyncio.get_running_loop()
        # The loop's clock may differ from time.monotonic() (uvloop): convert once.
        timeout = asyncio.timeout_at(loop.time() + (self._deadline - time.monotonic()))
        self._readers.wait_started(self, timeout)
        try:
            async with timeout:
                message = await self._receive()
        except TimeoutError:
            if self.evicted:
                raise RequestTimeoutError(
                    "the request body was still arriving when too many others were; "
                    "it was cut off for a faster one"
                ) from None
            raise RequestTimeoutError(
                f"the request body did not arrive within {self._readers.timeout_s:g} s"
            ) from None
        finally:
            self._readers.wait_ended(self)
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._readers.max_bytes:
                raise self._readers.too_large()
            self.done = not message.get("more_body", False)
        return message
