"""Circuit breakers around peer calls: closed, open, half-open with exactly one probe.

The original monGARS breaker reset its failure count when the timeout elapsed and let every
concurrent caller through (no real half-open state), so a dead peer got a burst of requests each
time the timeout expired. Here, after `reset_timeout_s` the breaker goes half-open and grants a
single probe; every other caller is refused until that probe reports success (closed) or failure
(open again, timer restarted). A probe that ends without an outcome (cancelled) is released so
the next caller may probe. The clock is injected so tests never sleep.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Final

FAILURE_THRESHOLD: Final = 3
RESET_TIMEOUT_S: Final = 10.0
MAX_BREAKERS: Final = 1024  # one per peer; least recently used evicted beyond this

Clock = Callable[[], float]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """One breaker (loop-only: no locks, callers are on the event loop)."""

    def __init__(
        self, *, failure_threshold: int = FAILURE_THRESHOLD, reset_timeout_s: float = RESET_TIMEOUT_S, clock: Clock = time.monotonic
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.opens_total = 0

    @property
    def state(self) -> BreakerState:
        """Return the state, reporting OPEN as HALF_OPEN once the reset timeout has elapsed."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def available(self) -> bool:
        """Return whether `allow()` would grant a call now, without taking the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN:
            return not self._probing
        return False

    def allow(self) -> bool:
        """Grant a call (taking the single half-open probe if that is what it is) or refuse."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probing:
            return False
        self._state = BreakerState.HALF_OPEN
        self._probing = True
        return True

    def record_success(self) -> None:
        """A granted call succeeded: close and forget past failures."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probing = False

    def record_failure(self) -> None:
        """A granted call failed: count it; open at the threshold, or re-open after a failed probe."""
        if self._state is BreakerState.HALF_OPEN or self._probing:
            self._open()
            return
        if self._state is BreakerState.OPEN:
            return  # a call granted before the breaker opened reports late; the timer stands
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open()

    def release(self) -> None:
        """A granted call ended without an outcome (cancelled): free the probe, keep the state."""
        self._probing = False

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probing = False
        self.opens_total += 1


class BreakerBoard:
    """Breakers per peer, created on first use, bounded in number."""

    def __init__(
        self,
        *,
        failure_threshold: int = FAILURE_THRESHOLD,
        reset_timeout_s: float = RESET_TIMEOUT_S,
        clock: Clock = time.monotonic,
        max_breakers: int = MAX_BREAKERS,
    ) -> None:
        self._kw = {"failure_threshold": failure_threshold, "reset_timeout_s": reset_timeout_s}
        self._clock = clock
        self._max = max_breakers
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()

    def get(self, peer: str) -> CircuitBreaker:
        b = self._breakers.pop(peer, None)
        if b is None:
            b = CircuitBreaker(
                failure_threshold=int(self._kw["failure_threshold"]), reset_timeout_s=float(self._kw["reset_timeout_s"]), clock=self._clock
            )
        self._breakers[peer] = b
        while len(self._breakers) > self._max:
            self._breakers.popitem(last=False)
        return b

    def available(self, peer: str) -> bool:
        b = self._breakers.get(peer)
        return b is None or b.available()

    def items(self) -> Iterator[tuple[str, CircuitBreaker]]:
        return iter(list(self._breakers.items()))
