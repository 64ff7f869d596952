"""Sommeil Paradoxal: an idle detector and a runner of idle-time jobs that a request preempts at once.

Every `check_interval_s` the loop decides (pure `is_idle`) whether the daemon is idle: no user
request for `idle_after_s`, none in flight, the CPU quiet, the board not hot, not on battery.
When it is and a cycle is due, the due jobs run one at a time, each as a task of its own. The
`RequestState` listener cancels the running job the instant user work starts, so a request
waits for at most one cancellation (measured: `last_preempt_ms`); the cycle stops there and the
jobs it did not finish run again in the next idle period. Every run is a row of `sommeil_runs`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import psutil
import structlog

from mongarsd.config import SommeilConfig
from mongarsd.errors import MongarsError, UnavailableError, ValidationError
from mongarsd.memory.db import Database
from mongarsd.supervisor import TaskSupervisor

log = structlog.get_logger("mongarsd.maintenance.sommeil")

STATES: Final = ("idle", "busy", "running", "paused_hot", "disabled")
RUN_STATUSES: Final = ("running", "done", "paused", "cancelled", "failed", "skipped")
DEFAULT_RUNS_LIMIT: Final = 20
MAX_RUNS_LIMIT: Final = 200
RUNS_KEPT: Final = 10_000  # older rows of sommeil_runs are pruned after each cycle
SUMMARY_MAX_CHARS: Final = 16_000  # a run's stored summary; a bigger one is replaced by a note
HOT_POLL_S: Final = 1.0  # a running job checks this often whether the board got hot
JOB_CANCEL_WAIT_S: Final = 5.0  # a job cancelled for heat or overtime gets this long to unwind
FORCED_QUIET_WAIT_S: Final = 30.0  # a forced cycle waits this long at most for the requests in flight (its own POST) to end
HANDOVER_WAIT_S: Final = 2.0  # an admin's forced cycle waits this long for a preempted automatic cycle to unwind
STOP_WAIT_S: Final = 0.8  # within the service's stop budget (stop_timeout_s)
RECORD_TIMEOUT_S: Final = 0.5  # a run's final record while the service stops
SKIPPED_KEY: Final = "skipped"  # a job's summary with this key (the reason) is recorded as 'skipped'
RESULT_KEY: Final = "result"  # where a run's summary keeps what the job returned

REASONS: Final = {
    "request": "a request arrived",
    "hot": "the board is hot",
    "stop": "the daemon is stopping",
    "timeout": "the job ran past sommeil.max_job_s",
}
# How a run stopped by each reason is recorded.
STOP_STATUS: Final = {"request": "cancelled", "hot": "paused", "stop": "cancelled", "timeout": "failed"}


class IdleJob(Protocol):
    """One kind of idle-time work; Sommeil runs it alone, and cancels it when a request arrives."""

    name: str  # "consolidate", "evolution", "self_training", ... (unique per Sommeil)

    def due(self, now: float) -> bool:
        """Tell cheaply whether there may be work now (`now`: time.time(); loop-only, must not block)."""
        ...

    async def async_run(self) -> dict[str, Any]:
        """Do the work and return a JSON-able summary; cancellable at any await (reap subprocesses in finally).

        A summary with the key "skipped" (its value the reason) is recorded as status 'skipped'.
        """
        ...


class WorkState(Protocol):
    """What Sommeil reads of the API's RequestState (mongarsd.api.app)."""

    busy: int
    last_activity: float
    listeners: list[Callable[[bool], None]]


# ------------------------------------------------------------------------------ pure decisions


def is_idle(
    now: float, last_activity: float, busy: int, *, cpu_pct: float | None, hot: bool, on_battery: bool, config: SommeilConfig
) -> tuple[bool, str]:
    """Decide whether idle work may run now, and say why not (pure).

    `now` and `last_activity` are on the same monotonic clock; `cpu_pct` None means unknown
    (the first sample), which does not count against idleness.
    """
    if not config.enabled:
        return False, "disabled"
    if busy > 0:
        return False, "busy"
    if hot:
        return False, "hot"
    if on_battery:
        return False, "on_battery"
    if now - last_activity < config.idle_after_s:
        return False, "recent_activity"
    if cpu_pct is not None and cpu_pct >= config.cpu_idle_pct:
        return False, "cpu_busy"
    return True, "idle"


def cycle_due(now: float, last_full_cycle: float | None, pending: Sequence[str] | None, interval_s: float) -> bool:
    """Tell whether an automatic cycle should start: an interrupted one resumes at once, else one per interval (pure)."""
    if pending:
        return True
    return last_full_cycle is None or now - last_full_cycle >= interval_s


def cpu_totals(times: Sequence[float], fields: Sequence[str]) -> tuple[float, float]:
    """Return (busy, total) CPU seconds from a psutil.cpu_times() tuple and its field names (pure).

    On Linux guest time is already counted in user/nice, so it is left out of the total.
    """
    values = dict(zip(fields, times, strict=True))
    total = sum(v for k, v in values.items() if k not in ("guest", "guest_nice"))
    idle = values.get("idle", 0.0) + values.get("iowait", 0.0)
    return total - idle, total


def cpu_busy_pct(before: tuple[float, float] | None, after: tuple[float, float]) -> float | None:
    """Percent of CPU time busy between two cpu_totals samples; None when unknown (pure)."""
    if before is None:
        return None
    d_total = after[1] - before[1]
    if d_total <= 0:
        return None
    return max(0.0, min(100.0, 100.0 * (after[0] - before[0]) / d_total))


def run_status(result: dict[str, Any]) -> str:
    """The status of a run that returned `result` (pure)."""
    return "skipped" if SKIPPED_KEY in result else "done"


def encode_summary(summary: dict[str, Any], max_chars: int = SUMMARY_MAX_CHARS) -> str:
    """Serialize a run's summary for the table; an oversized job result is replaced by a note (pure)."""
    text = json.dumps(summary, default=str, ensure_ascii=False)
    if len(text) <= max_chars:
        return text
    trimmed = {k: v for k, v in summary.items() if k != RESULT_KEY}
    trimmed[RESULT_KEY] = {"truncated": True, "chars": len(text)}
    return json.dumps(trimmed, default=str, ensure_ascii=False)


def decode_summary(text: object) -> dict[str, Any]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"value": value}


def _read_power() -> tuple[tuple[float, float], bool]:
    """Sample CPU times and whether the board runs on battery (blocking: psutil reads /proc and /sys; thread)."""
    times = psutil.cpu_times()
    sample = cpu_totals(tuple(times), times._fields)
    on_battery = False
    sensors = getattr(psutil, "sensors_battery", None)  # absent on some platforms
    if sensors is not None:
        battery = sensors()
        on_battery = battery is not None and battery.power_plugged is False
    return sample, on_battery


async def async_last_done(db: Database, job: str, flag: str) -> float | None:
    """When `job` last finished 'done' with result[flag] true (wall clock), or None."""
    row = await db.async_fetchone(
        "SELECT max(started_at) AS t FROM sommeil_runs WHERE job = ? AND status = 'done' AND json_extract(summary, ?) = 1",
        (job, f"$.{RESULT_KEY}.{flag}"),
    )
    return None if row is None or row["t"] is None else float(row["t"])


# ------------------------------------------------------------------------------ service


@dataclass
class _Current:
    job: str
    run_id: int
    started: float  # monotonic
    task: asyncio.Task[dict[str, Any]]


class Sommeil:
    """Service: decide when the daemon is idle and run the idle jobs, one at a time, preemptibly."""

    name = "sommeil"
    start_timeout_s = 1.0
    stop_timeout_s = 1.0

    def __init__(
        self,
        *,
        config: SommeilConfig,
        state: WorkState,
        db: Database,
        jobs: Sequence[IdleJob] = (),
        energy_hot: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tasks: TaskSupervisor | None = None,
    ) -> None:
        self.config = config
        self._state = state
        self._db = db
        self._energy_hot = energy_hot  # loop-side and cheap (the energy monitor's cached verdict)
        self._clock = clock  # the clock of RequestState.last_activity: idle decisions only
        self._tasks = tasks if tasks is not None else TaskSupervisor()
        self._jobs: list[IdleJob] = []
        for job in jobs:
            self.add_job(job)
        self._started = False
        self._started_at = clock()
        self._prepared = False
        self._prepare_lock = asyncio.Lock()
        self._quiet = asyncio.Event()  # set while no user work is in flight
        self._cycle_done = asyncio.Event()  # set while no cycle runs
        self._cycle_done.set()
        self._cycle_busy = False  # a cycle holds the runner (reserved synchronously, before any await)
        self._cycle_id: int | None = None
        self._cycle_forced = False
        self._cycle_no = 0
        self._current: _Current | None = None
        self._stop_reason: str | None = None  # why the running job was cancelled (REASONS key)
        self._preempt_t0: float | None = None
        self._pending: list[str] | None = None  # jobs an interrupted cycle did not finish
        self._last_full_cycle: float | None = None
        self._last_cycle: dict[str, Any] | None = None
        self._next_check: float | None = None
        self._cpu_sample: tuple[float, float] | None = None
        self.cpu_pct: float | None = None
        self.on_battery = False
        self.last_preempt_ms: float | None = None
        self.preemptions_total = 0
        self.runs_total: dict[tuple[str, str], int] = {}

    # ---------------------------------------------------------------- wiring and lifecycle

    @property
    def jobs(self) -> list[str]:
        return [j.name for j in self._jobs]

    def add_job(self, job: IdleJob, *, before: str | None = None) -> None:
        """Add a job to every cycle, last or before the job named `before` (e.g. "db_upkeep")."""
        if not isinstance(job.name, str) or not job.name:
            raise MongarsError("an idle job needs a non-empty name")
        if job.name in self.jobs:
            raise MongarsError(f"an idle job named {job.name!r} is already registered")
        names = self.jobs
        if before is not None and before in names:
            self._jobs.insert(names.index(before), job)
        else:
            self._jobs.append(job)

    async def async_start(self) -> None:
        if self._started:
            return
        self._started = True
        self._started_at = self._clock()
        if self._state.busy == 0:
            self._quiet.set()
        self._state.listeners.append(self._on_work)

    async def async_stop(self) -> None:
        self._started = False
        if self._on_work in self._state.listeners:
            self._state.listeners.remove(self._on_work)
        if self._current is not None:
            self._cancel_job(self._current.task, "stop")
        await self._tasks.async_stop(STOP_WAIT_S, owner=self)

    async def _async_prepare(self) -> None:
        """Close the runs a previous daemon left 'running' and continue its cycle numbers (once)."""
        if self._prepared:
            return
        async with self._prepare_lock:
            if self._prepared:
                return
            await self._db.async_execute(
                "UPDATE sommeil_runs SET status = 'failed', finished_at = ?, summary = json_set(summary, '$.error', ?) "
                "WHERE status = 'running'",
                (time.time(), "the daemon stopped during the run"),
            )
            row = await self._db.async_fetchone("SELECT max(CAST(json_extract(summary, '$.cycle') AS INTEGER)) AS n FROM sommeil_runs")
            self._cycle_no = max(self._cycle_no, int(row["n"]) if row is not None and row["n"] is not None else 0)
            self._prepared = True

    # ---------------------------------------------------------------- preemption

    def _on_work(self, started: bool) -> None:
        """RequestState listener (loop, must not block): cancel the running job when user work starts."""
        if not started:
            self._quiet.set()
            return
        self._quiet.clear()
        if self._current is not None:
            self._cancel_job(self._current.task, "request")

    def _cancel_job(self, task: asyncio.Task[dict[str, Any]], reason: str) -> None:
        if task.done():
            return
        if self._stop_reason is None:
            self._stop_reason = reason
        if reason == "request":
            self.preemptions_total += 1
            self._preempt_t0 = time.perf_counter()
        task.cancel()

    def _job_done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        if self._preempt_t0 is not None:
            self.last_preempt_ms = (time.perf_counter() - self._preempt_t0) * 1000.0
            self._preempt_t0 = None
            log.info("sommeil_preempted", ms=round(self.last_preempt_ms, 2), task=task.get_name())

    def _hot(self) -> bool:
        return bool(self._energy_hot()) if self._energy_hot is not None else False

    # ---------------------------------------------------------------- the loop

    async def async_loop(self) -> None:
        """Every check_interval_s, decide whether the daemon is idle and run a cycle when one is due (run supervised)."""
        if not self.config.enabled:
            log.info("sommeil_disabled")
            return
        await self._async_prepare()
        await self._async_sample_power()  # the baseline: CPU use is measured over each check interval
        while True:
            self._next_check = self._clock() + self.config.check_interval_s
            await asyncio.sleep(self.config.check_interval_s)
            if not self._started:
                return  # the service stopped before its loop was cancelled
            await self._async_sample_power()
            now = self._clock()
            idle, _ = self._decide(now)
            if idle and not self._cycle_busy and cycle_due(now, self._last_full_cycle, self._pending, self.config.cycle_interval_s):
                await self.async_run_cycle(forced=False)

    async def _async_sample_power(self) -> None:
        sample, self.on_battery = await asyncio.to_thread(_read_power)
        self.cpu_pct = cpu_busy_pct(self._cpu_sample, sample)
        self._cpu_sample = sample

    def _decide(self, now: float) -> tuple[bool, str]:
        last = self._state.last_activity or self._started_at  # no request yet: quiet since the start
        return is_idle(now, last, self._state.busy, cpu_pct=self.cpu_pct, hot=self._hot(), on_battery=self.on_battery, config=self.config)

    # ---------------------------------------------------------------- cycles

    def _reserve(self, forced: bool) -> None:
        if self._cycle_busy:
            raise ValidationError("a Sommeil cycle is already running; see GET /api/v1/sommeil", status=409)
        self._cycle_busy, self._cycle_forced = True, forced
        self._cycle_done.clear()

    def _release(self) -> None:
        self._cycle_busy = False
        self._cycle_id = None
        self._cycle_done.set()

    async def async_run_cycle(self, *, forced: bool) -> dict[str, Any]:
        """Run one cycle now and return what it did; ValidationError (409) when one is running."""
        if not self._started:
            raise UnavailableError("Sommeil is not running (the daemon is starting or stopping)")
        self._reserve(forced)
        try:
            await self._async_prepare()
            self._cycle_no += 1
            return await self._async_cycle(self._cycle_no, forced=forced)
        finally:
            self._release()

    async def async_start_cycle(self, *, forced: bool = True) -> int:
        """Start a cycle in the background (the admin's POST) and return its number at once.

        The POST that asks for it is itself a request: an automatic cycle running then is being
        preempted by it, so it is given HANDOVER_WAIT_S to unwind before this answers 409.
        """
        if not self.config.enabled:
            # the configuration, not a fault: a conflict with the daemon's state, never a 5xx
            raise ValidationError("Sommeil is disabled on this daemon (sommeil.enabled = false)", param="sommeil", status=409)
        if not self._started:
            raise UnavailableError("Sommeil is not running (the daemon is starting or stopping)")
        if self._cycle_busy and not self._cycle_forced:
            try:
                async with asyncio.timeout(HANDOVER_WAIT_S):
                    await self._cycle_done.wait()
            except TimeoutError:
                pass  # still running: answered 409 below
        self._reserve(forced)
        try:
            await self._async_prepare()
        except BaseException:
            self._release()
            raise
        self._cycle_no += 1
        number = self._cycle_no
        self._tasks.spawn_once(f"sommeil-cycle-{number}", self._async_owned_cycle(number, forced), owner=self)
        return number

    async def _async_owned_cycle(self, number: int, forced: bool) -> None:
        try:
            await self._async_cycle(number, forced=forced)
        finally:
            self._release()

    async def _async_cycle(self, number: int, *, forced: bool) -> dict[str, Any]:
        self._cycle_id = number
        started = time.time()
        resume = self._pending if not forced and self._pending is not None else None
        todo = list(self._jobs) if resume is None else [j for j in self._jobs if j.name in resume]
        outcome: dict[str, str] = {}
        stopped: str | None = None
        stop_at = len(todo)
        log.info("sommeil_cycle_started", cycle=number, forced=forced, jobs=[j.name for j in todo])
        if forced and self._state.busy > 0:
            # the POST that asked for this cycle (or another request) is still in flight
            self._quiet.clear()
            try:
                async with asyncio.timeout(FORCED_QUIET_WAIT_S):
                    await self._quiet.wait()
            except TimeoutError:
                stopped, stop_at = "request", 0
        for index, job in enumerate(todo):
            if stopped is not None:
                break
            if not self._started:
                stopped, stop_at = "stop", index
                break
            if self._hot():
                stopped, stop_at = "hot", index
                break
            if self._state.busy > 0:
                stopped, stop_at = "request", index
                break
            if not job.due(time.time()):
                outcome[job.name] = "not_due"
                continue
            status = await self._async_run_job(job, number, forced)
            outcome[job.name] = status
            if status in ("cancelled", "paused"):
                stopped, stop_at = self._stop_reason or "request", index
        if stopped is None:
            self._pending = None
            self._last_full_cycle = self._clock()
        else:
            self._pending = [j.name for j in todo[stop_at:]]
        self._last_cycle = {
            "cycle": number,
            "forced": forced,
            "started_at": started,
            "finished_at": time.time(),
            "jobs": outcome,
            "complete": stopped is None,
            "stopped_by": None if stopped is None else REASONS.get(stopped, stopped),
            "pending": list(self._pending or []),
        }
        if stopped is None:
            await self._async_prune()  # not when preempted: the store's writer is the request's now
        log.info("sommeil_cycle_finished", cycle=number, complete=stopped is None, jobs=outcome)
        return dict(self._last_cycle)

    async def _async_run_job(self, job: IdleJob, cycle: int, forced: bool) -> str:
        """Run one job as a task of its own, bounded by max_job_s; record and return its status."""
        meta: dict[str, Any] = {"cycle": cycle, "forced": forced}
        self._stop_reason = None
        run_id = await self._db.async_execute(
            "INSERT INTO sommeil_runs(job, started_at, status, summary) VALUES (?, ?, 'running', ?)",
            (job.name, time.time(), encode_summary(meta)),
        )
        if self._state.busy > 0:  # a request came while the row was written: the job does not start
            return await self._async_finish(run_id, job.name, "cancelled", {**meta, "reason": REASONS["request"]}, 0.0)
        t0 = time.monotonic()
        task = self._tasks.spawn_once(f"sommeil-{job.name}", job.async_run(), owner=self, expected=(Exception,))
        task.add_done_callback(self._job_done)
        self._current = _Current(job.name, run_id, t0, task)
        try:
            await self._async_wait_job(task)
        except asyncio.CancelledError:
            # the cycle itself is cancelled (the service stops): the job goes with it, recorded if time allows
            self._cancel_job(task, "stop")
            self._current = None
            await asyncio.wait({task}, timeout=RECORD_TIMEOUT_S)
            try:
                async with asyncio.timeout(RECORD_TIMEOUT_S):
                    await self._async_finish(run_id, job.name, "cancelled", {**meta, "reason": REASONS["stop"]}, time.monotonic() - t0)
            except (TimeoutError, MongarsError):
                pass  # the next start closes the row ('failed': the daemon stopped during the run)
            raise
        finally:
            self._current = None
        status, summary = self._outcome(task, meta)
        return await self._async_finish(run_id, job.name, status, summary, time.monotonic() - t0)

    async def _async_wait_job(self, task: asyncio.Task[dict[str, Any]]) -> None:
        deadline = time.monotonic() + self.config.max_job_s
        while not task.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._cancel_job(task, "timeout")
                await asyncio.wait({task}, timeout=JOB_CANCEL_WAIT_S)
                return
            await asyncio.wait({task}, timeout=min(remaining, HOT_POLL_S))
            if not task.done() and self._hot():
                self._cancel_job(task, "hot")
                await asyncio.wait({task}, timeout=JOB_CANCEL_WAIT_S)
                return

    def _outcome(self, task: asyncio.Task[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        reason = self._stop_reason
        if not task.done():
            # it ignored its cancellation: it stays owned (and cancelled again at stop), the cycle goes on
            log.error("sommeil_job_did_not_stop", task=task.get_name())
            return "failed", {**meta, "error": "the job did not stop when cancelled (" + REASONS.get(reason or "", "") + ")"}
        if task.cancelled():
            why = reason or "stop"
            summary: dict[str, Any] = {**meta, "reason": REASONS.get(why, why)}
            if why == "request" and self.last_preempt_ms is not None:
                summary["preempt_ms"] = round(self.last_preempt_ms, 3)
            return STOP_STATUS.get(why, "cancelled"), summary
        exc = task.exception()
        if exc is not None:
            log.warning("sommeil_job_failed", job=task.get_name(), error=repr(exc))
            return "failed", {**meta, "error": f"{type(exc).__name__}: {exc}"}
        result = task.result()
        if not isinstance(result, dict):
            return "failed", {**meta, "error": f"the job returned {type(result).__name__}, not a summary object"}
        return run_status(result), {**meta, RESULT_KEY: result}

    async def _async_finish(self, run_id: int, job: str, status: str, summary: dict[str, Any], elapsed_s: float) -> str:
        summary = {**summary, "elapsed_ms": round(elapsed_s * 1000.0, 1)}
        await self._db.async_execute(
            "UPDATE sommeil_runs SET status = ?, finished_at = ?, summary = ? WHERE id = ?",
            (status, time.time(), encode_summary(summary), run_id),
        )
        key = (job, status)
        self.runs_total[key] = self.runs_total.get(key, 0) + 1
        log.info("sommeil_job_finished", job=job, status=status, run=run_id, ms=summary["elapsed_ms"])
        return status

    async def _async_prune(self) -> None:
        await self._db.async_execute(
            "DELETE FROM sommeil_runs WHERE id <= (SELECT max(id) FROM sommeil_runs) - ? AND status != 'running'", (RUNS_KEPT,)
        )

    # ---------------------------------------------------------------- reports

    def status(self) -> dict[str, Any]:
        """What Sommeil is doing now and did last (loop-only, cheap)."""
        now = self._clock()
        hot = self._hot()
        idle, reason = self._decide(now)
        if not self.config.enabled:
            state = "disabled"
        elif self._cycle_busy:
            state = "running"
        elif hot:
            state = "paused_hot"
        else:
            state = "idle" if idle else "busy"
        cur = self._current
        last = self._state.last_activity or self._started_at
        return {
            "state": state,
            "reason": reason,
            "enabled": self.config.enabled,
            "cycle": self._cycle_id if self._cycle_busy else None,
            "forced": self._cycle_forced if self._cycle_busy else None,
            "current_job": None if cur is None else cur.job,
            "current_run": None if cur is None else cur.run_id,
            "job_elapsed_s": None if cur is None else round(time.monotonic() - cur.started, 3),
            "next_check_in_s": None if self._next_check is None or not self.config.enabled else round(max(0.0, self._next_check - now), 3),
            "idle_for_s": round(max(0.0, now - last), 3),
            "cpu_pct": None if self.cpu_pct is None else round(self.cpu_pct, 1),
            "on_battery": self.on_battery,
            "hot": hot,
            "jobs": self.jobs,
            "pending": list(self._pending or []),
            "last_cycle": None if self._last_cycle is None else dict(self._last_cycle),
            "last_preempt_ms": None if self.last_preempt_ms is None else round(self.last_preempt_ms, 3),
            "preemptions": self.preemptions_total,
        }

    async def async_runs(self, limit: int = DEFAULT_RUNS_LIMIT) -> list[dict[str, Any]]:
        """The latest runs, newest first, each with what it did."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RUNS_LIMIT:
            raise ValidationError(f"limit must be an integer between 1 and {MAX_RUNS_LIMIT}", param="limit")
        rows = await self._db.async_fetchall(
            "SELECT id, job, started_at, finished_at, status, summary FROM sommeil_runs ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [
            {
                "id": int(r["id"]),
                "job": str(r["job"]),
                "status": str(r["status"]),
                "started_at": float(r["started_at"]),
                "finished_at": None if r["finished_at"] is None else float(r["finished_at"]),
                "summary": decode_summary(r["summary"]),
            }
            for r in rows
        ]

    def metrics(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        """Pull-time samples for Metrics.add_source."""
        for (job, status), n in sorted(self.runs_total.items()):
            yield ("mongarsd_sommeil_runs_total", "counter", "Idle jobs run, by job and outcome.", float(n), {"job": job, "status": status})
        yield (
            "mongarsd_sommeil_preemptions_total",
            "counter",
            "Idle jobs cancelled because a request arrived.",
            float(self.preemptions_total),
            {},
        )
        yield ("mongarsd_sommeil_running", "gauge", "1 while an idle job runs.", 1.0 if self._current is not None else 0.0, {})
        if self.last_preempt_ms is not None:
            yield (
                "mongarsd_sommeil_last_preempt_seconds",
                "gauge",
                "Time from a request's arrival to the idle job being stopped, last time.",
                self.last_preempt_ms / 1000.0,
                {},
            )
