"""Ordered service start/stop and named, supervised background tasks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog

from mongarsd.const import TASK_RESTART_BACKOFF_MAX_S, TASK_RESTART_BACKOFF_MIN_S
from mongarsd.errors import MongarsError

log = structlog.get_logger("mongarsd.supervisor")


class Service(Protocol):
    name: str
    start_timeout_s: float
    stop_timeout_s: float

    async def async_start(self) -> None: ...

    async def async_stop(self) -> None: ...


class StartError(MongarsError):
    """A service failed to start; the ones started before it were stopped again."""


class ServiceStack:
    """Start services in order, stop them in reverse; every stage time-bounded."""

    def __init__(self, on_change: Callable[[str, bool], None] | None = None) -> None:
        self._started: list[Service] = []
        self._on_change = on_change
        self.state: dict[str, str] = {}

    @property
    def started(self) -> list[str]:
        return [s.name for s in self._started]

    async def async_start(self, services: Sequence[Service], notify: Callable[[str], object] | None = None) -> None:
        for svc in services:
            self.state[svc.name] = "starting"
            if notify:
                notify(f"starting {svc.name}")
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(svc.async_start(), timeout=svc.start_timeout_s)
            except (Exception, asyncio.CancelledError) as err:
                self.state[svc.name] = "failed"
                why = "timed out" if isinstance(err, TimeoutError) else f"{type(err).__name__}: {err}"
                log.error("service_start_failed", service=svc.name, error=why)
                await self.async_stop()  # unwind exactly like a stop
                if isinstance(err, asyncio.CancelledError):
                    raise
                raise StartError(f"service {svc.name} failed to start: {why}") from err
            self._started.append(svc)
            self.state[svc.name] = "started"
            if self._on_change:
                self._on_change(svc.name, True)
            log.info("service_started", service=svc.name, elapsed_ms=round((time.monotonic() - t0) * 1000, 1))

    async def async_stop(self) -> list[str]:
        """Stop in reverse order; return the errors collected (never stop at the first)."""
        errors: list[str] = []
        while self._started:
            svc = self._started.pop()
            self.state[svc.name] = "stopping"
            try:
                await asyncio.wait_for(svc.async_stop(), timeout=svc.stop_timeout_s)
            except TimeoutError:
                errors.append(f"{svc.name}: stop timed out after {svc.stop_timeout_s}s")
                log.error("service_stop_timeout", service=svc.name, timeout_s=svc.stop_timeout_s, tasks=_running_tasks())
            except Exception as err:  # collected: the teardown must go on for the rest
                errors.append(f"{svc.name}: {type(err).__name__}: {err}")
                log.error("service_stop_failed", service=svc.name, error=str(err), exc_info=True)
            self.state[svc.name] = "stopped"
            if self._on_change:
                self._on_change(svc.name, False)
        return errors


def _running_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if not t.done())


class TaskSupervisor:
    """Own named background tasks; restart idempotent loops with capped backoff."""

    def __init__(self, on_fatal: Callable[[str, BaseException], None] | None = None) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._on_fatal = on_fatal
        self.restarts: dict[str, int] = {}

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True, fatal: bool = False) -> asyncio.Task[None]:
        if name in self._tasks and not self._tasks[name].done():
            raise MongarsError(f"task {name} is already running")
        task = asyncio.get_running_loop().create_task(self._run(name, factory, restart, fatal), name=f"mongarsd:{name}")
        self._tasks[name] = task
        task.add_done_callback(self._done)
        return task

    async def _run(self, name: str, factory: Callable[[], Awaitable[None]], restart: bool, fatal: bool) -> None:
        backoff = TASK_RESTART_BACKOFF_MIN_S
        while True:
            t0 = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a crashed loop is logged and restarted or escalated
                log.error("task_crashed", task=name, error=str(err), exc_info=True)
                if fatal:
                    if self._on_fatal:
                        self._on_fatal(name, err)
                    return
                if not restart:
                    return
            if time.monotonic() - t0 > 60:
                backoff = TASK_RESTART_BACKOFF_MIN_S  # it ran for a while: start over
            self.restarts[name] = self.restarts.get(name, 0) + 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, TASK_RESTART_BACKOFF_MAX_S)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task_died", task=task.get_name(), error=str(exc))

    @property
    def names(self) -> list[str]:
        return sorted(n for n, t in self._tasks.items() if not t.done())

    async def async_stop(self, timeout_s: float = 5.0) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            if pending:
                log.error("tasks_did_not_stop", tasks=[t.get_name() for t in pending])
        self._tasks.clear()
