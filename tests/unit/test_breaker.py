"""CircuitBreaker: closed -> open at the threshold, one probe at a time when half-open."""

from __future__ import annotations

from mongarsd.mesh.breaker import BreakerBoard, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(threshold: int = 3, reset_s: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset_s, clock=clock), clock


def test_opens_at_threshold_and_refuses_until_timeout() -> None:
    b, clock = make()
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and b.opens_total == 1
    assert not b.allow() and not b.available()
    clock.t += 9.99
    assert not b.allow()
    clock.t += 0.01
    assert b.state is BreakerState.HALF_OPEN and b.available()


def test_success_resets_the_failure_count() -> None:
    b, _ = make()
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.failures == 2


def test_half_open_grants_exactly_one_probe() -> None:
    """The original let every concurrent caller through after the timeout; here only one passes."""
    b, clock = make(threshold=1)
    b.record_failure()
    clock.t += 10
    granted = [b.allow() for _ in range(5)]
    assert granted == [True, False, False, False, False]
    assert not b.available()
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert all(b.allow() for _ in range(5))


def test_failed_probe_reopens_and_restarts_the_timer() -> None:
    b, clock = make(threshold=1)
    b.record_failure()
    clock.t += 10
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and b.opens_total == 2
    clock.t += 9
    assert not b.allow()
    clock.t += 1
    assert b.allow()


def test_released_probe_lets_the_next_caller_probe() -> None:
    b, clock = make(threshold=1)
    b.record_failure()
    clock.t += 10
    assert b.allow()
    assert not b.allow()
    b.release()  # the probe was cancelled: no outcome
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()


def test_late_failure_while_open_does_not_extend_the_timer() -> None:
    b, clock = make(threshold=1)
    b.record_failure()
    clock.t += 5
    b.record_failure()  # a call granted before the breaker opened reports late
    clock.t += 5
    assert b.allow()


def test_board_is_per_peer_and_bounded() -> None:
    clock = Clock()
    board = BreakerBoard(failure_threshold=1, reset_timeout_s=10, clock=clock, max_breakers=2)
    board.get("a").record_failure()
    assert not board.available("a")
    assert board.available("b") and board.available("never-seen")
    board.get("b")
    board.get("c")  # evicts the least recently used ("a")
    assert [p for p, _ in board.items()] == ["b", "c"]
    assert board.available("a")
