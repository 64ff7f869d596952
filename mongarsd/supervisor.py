"""Ordered service start/stop and named, supervised background tasks."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from mongarsd.const import TASK_RESTART_BACKOFF_MAX_S, TASK_RESTART_BACKOFF_MIN_S, TASKS_STOP_TIMEOUT_S
from mongarsd.errors import MongarsError

log = structlog.get_logger("mongarsd.supervisor")

T = TypeVar("T")


class Service(Protocol):
    name: str
    start_timeout_s: float
    stop_timeout_s: float

    async def async_start(self) -> None: ...

    async def async_stop(self) -> None: ...


class StartError(MongarsError):
    """A service failed to start; the ones started before it were stopped again."""


class Together:
    """Services with no start-order dependency on each other, started concurrently by ServiceStack.

    For the blocking loads of startup (the embedding model, the LLM, the energy source's first
    reading) that run in threads: on a board with two or more cores they overlap.
    """

    __slots__ = ("services",)

    def __init__(self, *services: Service) -> None:
        self.services: tuple[Service, ...] = services


def members(stages: Sequence[Service | Together]) -> list[Service]:
    """The services of a start sequence in start order, groups flattened (pure)."""
    return [svc for stage in stages for svc in (stage.services if isinstance(stage, Together) else (stage,))]


class ServiceStack:
    """Start services in order, stop them in reverse; every stage time-bounded."""

    def __init__(self, on_change: Callable[[str, bool], None] | None = None) -> None:
        self._started: list[Service] = []
        self._on_change = on_change
        self.state: dict[str, str] = {}

    @property
    def started(self) -> list[str]:
        return [s.name for s in self._started]

    async def async_start(self, services: Sequence[Service | Together], notify: Callable[[str], object] | None = None) -> None:
        """Start each stage in order: a service, or a `Together` group whose members start concurrently.

        A failed stage stops everything started so far (the group's members that did start
        included) and raises StartError naming the first service that failed.
        """
        for stage in services:
            group = stage.services if isinstance(stage, Together) else (stage,)
            for svc in group:
                self.state[svc.name] = "starting"
                if notify:
                    notify(f"starting {svc.name}")
            outcomes = await asyncio.gather(*(self._async_start_one(svc) for svc in group), return_exceptions=True)
            failed = [(svc, err) for svc, err in zip(group, outcomes, strict=True) if err is not None]
            if not failed:
                continue
            await self.async_stop()  # unwind exactly like a stop
            svc, err = failed[0]
            if isinstance(err, asyncio.CancelledError):
                raise err
            raise StartError(f"service {svc.name} failed to start: {_why(err)}") from err

    async def _async_start_one(self, svc: Service) -> None:
        """Start one service within its timeout and record it; a failure is logged and raised."""
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(svc.async_start(), timeout=svc.start_timeout_s)
        except (Exception, asyncio.CancelledError) as err:
            self.state[svc.name] = "failed"
            log.error("service_start_failed", service=svc.name, error=_why(err))
            raise
        self._started.append(svc)
        self.state[svc.name] = "started"
        if self._on_change:
            self._on_change(svc.name, True)
        log.info("service_started", service=svc.name, elapsed_ms=round((time.monotonic() - t0) * 1000, 1))

    async def async_stop_through(self, svc: Service) -> list[str]:
        """Stop, in reverse, the services started after `svc`, then `svc` itself (the edge, then the API)."""
        errors: list[str] = []
        while svc in self._started:
            errors += await self._async_stop_service(self._started.pop())
        return errors

    async def async_stop(self) -> list[str]:
        """Stop in reverse order; return the errors collected (never stop at the first)."""
        errors: list[str] = []
        while self._started:
            errors += await self._async_stop_service(self._started.pop())
        return errors

    async def _async_stop_service(self, svc: Service) -> list[str]:
        errors: list[str] = []
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


def _why(err: BaseException) -> str:
    """How a service's start failed, for the log and the StartError (pure)."""
    return "timed out" if isinstance(err, TimeoutError) else f"{type(err).__name__}: {err}"


def _running_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if not t.done())


@dataclass(frozen=True, slots=True)
class _Owned:
    name: str
    owner: object | None


class TaskSupervisor:
    """Own named background tasks; restart idempotent loops with capped backoff."""

    # Every task is strongly referenced until it is done, named `mongarsd:<name>` and logged if it
    # crashes (rule 2). `owner` tags a task with the object that spawned it, so that a service
    # sharing the daemon's supervisor cancels only its own tasks when it stops: async_stop(owner=self).

    def __init__(self, on_fatal: Callable[[str, BaseException], None] | None = None) -> None:
        self._tasks: dict[asyncio.Task[Any], _Owned] = {}
        self._on_fatal = on_fatal
        self.restarts: dict[str, int] = {}

    def spawn(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        *,
        restart: bool = True,
        fatal: bool = False,
        owner: object | None = None,
    ) -> asyncio.Task[None]:
        """Run a long-lived loop; restart it with capped backoff if it crashes (unless fatal or restart=False)."""
        if any(o.name == name and not t.done() and not t.cancelling() for t, o in self._tasks.items()):
            raise MongarsError(f"task {name} is already running")
        task = asyncio.get_running_loop().create_task(self._run(name, factory, restart, fatal), name=f"mongarsd:{name}")
        self._own(task, name, owner)
        task.add_done_callback(self._done)
        return task

    def spawn_once(
        self,
        name: str,
        coro: Coroutine[Any, Any, T],
        *,
        owner: object | None = None,
        expected: tuple[type[BaseException], ...] = (),
    ) -> asyncio.Task[T]:
        """Run a one-shot helper: forgotten when done (names may repeat), logged if it crashes."""
        # Exceptions of the `expected` types are results for whoever awaits the task, not crashes.
        task = asyncio.get_running_loop().create_task(coro, name=f"mongarsd:{name}")
        self._own(task, name, owner)
        task.add_done_callback(functools.partial(self._once_done, expected))
        return task

    def _own(self, task: asyncio.Task[Any], name: str, owner: object | None) -> None:
        self._tasks[task] = _Owned(name, owner)

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
            log.warning("task_restarting", task=name, backoff_s=backoff, restarts=self.restarts[name])
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, TASK_RESTART_BACKOFF_MAX_S)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task_died", task=task.get_name(), error=str(exc))

    def _once_done(self, expected: tuple[type[BaseException], ...], task: asyncio.Task[Any]) -> None:
        owned = self._tasks.pop(task, None)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so a task nobody awaits never warns "never retrieved"
        if exc is None:
            return
        name = owned.name if owned is not None else task.get_name()
        if isinstance(exc, expected):
            log.debug("task_failed", task=name, error=str(exc))
        else:
            log.error("task_crashed", task=name, error=repr(exc), exc_info=exc)

    @property
    def names(self) -> list[str]:
        """Return the names of the running tasks, sorted (one-shot helpers may repeat)."""
        return sorted(o.name for t, o in self._tasks.items() if not t.done())

    def count(self, name: str | None = None, *, owner: object | None = None) -> int:
        """Return how many tasks run with this name (any if None) for this owner (any if None)."""
        return sum(
            1 for t, o in self._tasks.items() if not t.done() and (name is None or o.name == name) and (owner is None or o.owner is owner)
        )

    async def async_stop(self, timeout_s: float = TASKS_STOP_TIMEOUT_S, *, keep: Sequence[str] = (), owner: object | None = None) -> None:
        """Cancel every task (only `owner`'s if given, but those named in `keep`) and wait for them, bounded."""
        tasks = [t for t, o in self._tasks.items() if not t.done() and o.name not in keep and (owner is None or o.owner is owner)]
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            if pending:
                # still referenced here until they end: a later stop waits for them again
                log.error("tasks_did_not_stop", tasks=sorted(t.get_name() for t in pending))
