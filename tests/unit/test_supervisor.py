"""Ordered start, reverse stop, bounded stages, unwinding and supervised task restarts."""

from __future__ import annotations

import asyncio

import pytest

from mongarsd import supervisor as sup
from mongarsd.supervisor import ServiceStack, StartError, TaskSupervisor


class Svc:
    def __init__(self, name: str, log: list[str], *, fail_start: bool = False, hang_stop: bool = False, fail_stop: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail_start = fail_start
        self.hang_stop = hang_stop
        self.fail_stop = fail_stop
        self.start_timeout_s = 1.0
        self.stop_timeout_s = 0.2

    async def async_start(self) -> None:
        self.log.append(f"start {self.name}")
        if self.fail_start:
            raise RuntimeError("boom")

    async def async_stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.hang_stop:
            await asyncio.sleep(10)
        if self.fail_stop:
            raise RuntimeError("stop failed")


async def test_start_in_order_stop_in_reverse() -> None:
    log: list[str] = []
    stack = ServiceStack()
    await stack.async_start([Svc("a", log), Svc("b", log), Svc("c", log)])
    assert stack.started == ["a", "b", "c"]
    assert await stack.async_stop() == []
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_failed_start_unwinds_what_started() -> None:
    log: list[str] = []
    stack = ServiceStack()
    with pytest.raises(StartError, match="service b failed to start: RuntimeError: boom"):
        await stack.async_start([Svc("a", log), Svc("b", log, fail_start=True), Svc("c", log)])
    assert log == ["start a", "start b", "stop a"]
    assert stack.state == {"a": "stopped", "b": "failed"}


async def test_stop_collects_errors_and_timeouts_and_goes_on() -> None:
    log: list[str] = []
    stack = ServiceStack()
    await stack.async_start([Svc("a", log), Svc("b", log, hang_stop=True), Svc("c", log, fail_stop=True)])
    errors = await stack.async_stop()
    assert log[-3:] == ["stop c", "stop b", "stop a"]
    assert errors == ["c: RuntimeError: stop failed", "b: stop timed out after 0.2s"]


async def test_supervised_task_restarts_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "TASK_RESTART_BACKOFF_MIN_S", 0.01)
    runs = 0
    done = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("crash")
        done.set()
        await asyncio.sleep(10)

    tasks = TaskSupervisor()
    tasks.spawn("flaky", flaky)
    await asyncio.wait_for(done.wait(), 5)
    assert runs == 3 and tasks.restarts["flaky"] == 2
    assert tasks.names == ["flaky"]
    await tasks.async_stop()
    assert tasks.names == []


async def test_fatal_task_escalates() -> None:
    fatal: list[str] = []

    async def dies() -> None:
        raise RuntimeError("fatal")

    tasks = TaskSupervisor(on_fatal=lambda name, err: fatal.append(f"{name}: {err}"))
    t = tasks.spawn("core", dies, fatal=True)
    await asyncio.wait_for(t, 2)
    assert fatal == ["core: fatal"]
    await tasks.async_stop()
