"""A circuit breaker for an optional dependency (Redis): a dead or frozen server then costs
a request at most one timeout, and usually none."""

from __future__ import annotations

import time


class CircuitBreaker:
    """After `failures` faults in a row the dependency is left alone for `reset_s`; then
    calls try it again, and the first fault opens the breaker once more."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._failures = 0
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self._failures >= self._threshold and time.monotonic() < self._open_until

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self._threshold:
            self._open_until = time.monotonic() + self._reset_s
