"""Ordered start, reverse stop, bounded stages, unwinding and supervised task restarts."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from mongarsd import supervisor as sup
from mongarsd.errors import MongarsError
from mongarsd.supervisor import ServiceStack, StartError, TaskSupervisor, Together, members


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


class Slow(Svc):
    """Starts in `delay` seconds (a blocking load in a thread, as the model loaders do)."""

    def __init__(self, name: str, log: list[str], delay: float, **kw: bool) -> None:
        super().__init__(name, log, **kw)
        self.delay = delay

    async def async_start(self) -> None:
        self.log.append(f"begin {self.name}")
        await asyncio.to_thread(time.sleep, self.delay)
        await super().async_start()


async def test_together_starts_a_group_concurrently_and_stops_it_in_reverse() -> None:
    log: list[str] = []
    stack = ServiceStack()
    t0 = time.monotonic()
    await stack.async_start([Svc("a", log), Together(Slow("b", log, 0.3), Slow("c", log, 0.3)), Svc("d", log)])
    elapsed = time.monotonic() - t0
    assert elapsed < 0.55, f"the group took {elapsed:.2f} s: its members did not overlap"
    assert log[:3] == ["start a", "begin b", "begin c"]  # both began before either finished
    assert log[-1] == "start d"  # the next stage waits for the whole group
    started = stack.started
    assert started[0] == "a" and sorted(started[1:3]) == ["b", "c"] and started[3] == "d"
    await stack.async_stop()
    assert log[-4:] == [f"stop {name}" for name in reversed(started)]  # the reverse of the order they finished starting


async def test_a_failure_in_a_group_unwinds_its_started_members_and_names_the_service() -> None:
    log: list[str] = []
    stack = ServiceStack()
    with pytest.raises(StartError, match="service c failed to start: RuntimeError: boom"):
        await stack.async_start([Svc("a", log), Together(Slow("b", log, 0.1), Svc("c", log, fail_start=True)), Svc("d", log)])
    assert "start d" not in log
    assert log[-2:] == ["stop b", "stop a"]  # b finished starting after c failed: it is stopped too
    assert stack.state == {"a": "stopped", "b": "stopped", "c": "failed"}


def test_members_flattens_groups_in_start_order() -> None:
    log: list[str] = []
    a, b, c, d = (Svc(n, log) for n in "abcd")
    assert [s.name for s in members([a, Together(b, c), d])] == ["a", "b", "c", "d"]


async def test_stop_collects_errors_and_timeouts_and_goes_on() -> None:
    log: list[str] = []
    stack = ServiceStack()
    await stack.async_start([Svc("a", log), Svc("b", log, hang_stop=True), Svc("c", log, fail_stop=True)])
    errors = await stack.async_stop()
    assert log[-3:] == ["stop c", "stop b", "stop a"]
    assert errors == ["c: RuntimeError: stop failed", "b: stop timed out after 0.2s"]


async def test_fatal_task_escalates() -> None:
    fatal: list[str] = []

    async def dies() -> None:
        raise RuntimeError("fatal")

    tasks = TaskSupervisor(on_fatal=lambda name, err: fatal.append(f"{name}: {err}"))
    t = tasks.spawn("core", dies, fatal=True)
    await asyncio.wait_for(t, 2)
    assert fatal == ["core: fatal"]
    await tasks.async_stop()


async def test_crashing_loop_restarts_with_capped_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "TASK_RESTART_BACKOFF_MIN_S", 0.01)
    monkeypatch.setattr(sup, "TASK_RESTART_BACKOFF_MAX_S", 0.03)
    runs = 0
    done = asyncio.Event()

    async def probe_loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 5:
            raise RuntimeError("probe crashed")
        done.set()
        await asyncio.sleep(10)

    tasks = TaskSupervisor()
    with capture_logs() as logs:
        tasks.spawn("probe", probe_loop, restart=True)
        await asyncio.wait_for(done.wait(), 5)
    crashed = [e for e in logs if e["event"] == "task_crashed"]
    restarting = [e for e in logs if e["event"] == "task_restarting"]
    assert len(crashed) == 5 and all(e["task"] == "probe" and e["log_level"] == "error" for e in crashed)
    assert [e["backoff_s"] for e in restarting] == [0.01, 0.02, 0.03, 0.03, 0.03]  # doubled, then capped
    assert tasks.restarts["probe"] == 5 and tasks.names == ["probe"]
    with pytest.raises(MongarsError, match="already running"):
        tasks.spawn("probe", probe_loop)
    await tasks.async_stop()
    assert tasks.names == []


async def test_spawn_once_logs_crashes_and_forgets_done_tasks() -> None:
    tasks = TaskSupervisor()
    release = asyncio.Event()

    async def helper(fail: BaseException | None = None) -> int:
        await release.wait()
        if fail is not None:
            raise fail
        return 7

    with capture_logs() as logs:
        ok = tasks.spawn_once("resolve", helper())
        crash = tasks.spawn_once("resolve", helper(RuntimeError("bug")))  # names may repeat
        answer = tasks.spawn_once("load", helper(MongarsError("model too big")), expected=(MongarsError,))
        assert ok.get_name() == "mongarsd:resolve"
        assert tasks.names == ["load", "resolve", "resolve"]
        assert tasks.count("resolve") == 2 and tasks.count() == 3
        release.set()
        await asyncio.wait([ok, crash, answer])
        await asyncio.sleep(0)  # done callbacks run
    assert ok.result() == 7
    assert tasks.names == [] and tasks.count() == 0  # forgotten: bounded however many run
    errors = [(e["event"], e["task"]) for e in logs if e["log_level"] == "error"]
    assert errors == [("task_crashed", "resolve")]  # the expected failure is an answer, not a crash
    assert [(e["event"], e["task"]) for e in logs if e["log_level"] == "debug"] == [("task_failed", "load")]
    assert isinstance(answer.exception(), MongarsError)


async def test_async_stop_cancels_everything_within_its_timeout() -> None:
    tasks = TaskSupervisor()
    stubborn_may_end = asyncio.Event()

    async def loop() -> None:
        await asyncio.sleep(10)

    async def stubborn() -> None:
        while not stubborn_may_end.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # ignores cancellation: the stop must still return on time

    tasks.spawn("loop", loop, restart=True)
    helpers = [tasks.spawn_once("helper", loop()) for _ in range(3)]
    t0 = time.monotonic()
    await tasks.async_stop(timeout_s=1.0)
    assert time.monotonic() - t0 < 0.5
    assert all(h.cancelled() for h in helpers) and tasks.names == []

    stuck = tasks.spawn_once("stubborn", stubborn())
    await asyncio.sleep(0)
    with capture_logs() as logs:
        t0 = time.monotonic()
        await tasks.async_stop(timeout_s=0.1)
        assert 0.1 <= time.monotonic() - t0 < 1.0
    assert [e["tasks"] for e in logs if e["event"] == "tasks_did_not_stop"] == [["mongarsd:stubborn"]]
    assert tasks.names == ["stubborn"]  # still owned until it ends
    stubborn_may_end.set()
    stuck.cancel()
    await asyncio.wait([stuck])
    await asyncio.sleep(0)
    assert tasks.names == []


async def test_owners_stop_only_their_own_tasks() -> None:
    tasks = TaskSupervisor()
    mesh, inference = object(), object()

    async def loop() -> None:
        await asyncio.sleep(10)

    tasks.spawn("mesh-probe", loop, owner=mesh)
    tasks.spawn_once("mesh-join", loop(), owner=mesh)
    tasks.spawn("inference-idle", loop, owner=inference)
    tasks.spawn("store-writer", loop, restart=False)
    assert tasks.count(owner=mesh) == 2 and tasks.count("mesh-join", owner=inference) == 0
    await tasks.async_stop(owner=mesh)
    assert tasks.names == ["inference-idle", "store-writer"]
    await tasks.async_stop(keep=("store-writer",))
    assert tasks.names == ["store-writer"]
    await tasks.async_stop()
    assert tasks.names == []
