"""Sommeil: idle decisions, cycle bookkeeping and preemption, with fake jobs on a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from mongarsd.api.app import RequestState
from mongarsd.config import SommeilConfig
from mongarsd.errors import MongarsError, ValidationError
from mongarsd.maintenance import sommeil as sommeil_mod
from mongarsd.maintenance.jobs import (
    MemoryMeta,
    clean_summary,
    interval_due,
    plan_merges,
    similar_pairs,
    summary_prompt,
    summary_provenance,
    transcript_lines,
    unit_rows,
    vacuum_worthwhile,
)
from mongarsd.maintenance.sommeil import Sommeil, cpu_busy_pct, cpu_totals, cycle_due, encode_summary, is_idle, run_status
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import Message

CFG = SommeilConfig(idle_after_s=10.0, cpu_idle_pct=50.0, check_interval_s=0.01, cycle_interval_s=0.0, max_job_s=5.0)


def idle(**kw: Any) -> tuple[bool, str]:
    args: dict[str, Any] = {
        "now": 100.0,
        "last_activity": 50.0,
        "busy": 0,
        "cpu_pct": 5.0,
        "hot": False,
        "on_battery": False,
        "config": CFG,
    }
    args.update(kw)
    return is_idle(args.pop("now"), args.pop("last_activity"), args.pop("busy"), **args)


# ------------------------------------------------------------------------------ pure decisions


def test_is_idle_says_why_not() -> None:
    assert idle() == (True, "idle")
    assert idle(config=SommeilConfig(enabled=False)) == (False, "disabled")
    assert idle(busy=1) == (False, "busy")
    assert idle(hot=True) == (False, "hot")
    assert idle(on_battery=True) == (False, "on_battery")
    assert idle(last_activity=95.0) == (False, "recent_activity")  # 5 s < idle_after_s 10 s
    assert idle(last_activity=90.0) == (True, "idle")  # exactly idle_after_s
    assert idle(cpu_pct=50.0) == (False, "cpu_busy")
    assert idle(cpu_pct=49.9) == (True, "idle")
    assert idle(cpu_pct=None) == (True, "idle")  # the first sample: unknown does not block
    # busy outranks everything but disabled: a request in flight is the reason shown
    assert idle(busy=2, hot=True, on_battery=True, cpu_pct=99.0) == (False, "busy")


def test_cycle_due() -> None:
    assert cycle_due(10.0, None, None, 3600.0)  # never ran
    assert not cycle_due(10.0, 5.0, None, 3600.0)
    assert cycle_due(3605.0, 5.0, None, 3600.0)
    assert cycle_due(10.0, 5.0, ["consolidate"], 3600.0)  # an interrupted cycle resumes in the next idle period
    assert not cycle_due(10.0, 5.0, [], 3600.0)
    assert cycle_due(5.0, 5.0, None, 0.0)


def test_cpu_percent_from_cpu_times() -> None:
    fields = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
    a = cpu_totals((10.0, 0.0, 5.0, 80.0, 5.0, 0.0, 0.0, 0.0, 3.0, 0.0), fields)
    assert a == (15.0, 100.0)  # guest is inside user already; iowait counts as idle
    b = cpu_totals((40.0, 0.0, 5.0, 100.0, 5.0, 0.0, 0.0, 0.0, 3.0, 0.0), fields)
    assert cpu_busy_pct(a, b) == pytest.approx(60.0)  # 30 busy of 50
    assert cpu_busy_pct(None, b) is None
    assert cpu_busy_pct(b, b) is None  # no time passed


def test_run_status_and_summary_encoding() -> None:
    assert run_status({"purged": 3}) == "done"
    assert run_status({"skipped": "no language model is configured"}) == "skipped"
    small = encode_summary({"cycle": 1, "result": {"a": 1}})
    assert json.loads(small) == {"cycle": 1, "result": {"a": 1}}
    big = json.loads(encode_summary({"cycle": 2, "result": {"text": "x" * 50}}, max_chars=40))
    assert big["cycle"] == 2 and big["result"]["truncated"] is True and big["result"]["chars"] > 40


def test_plan_merges_keeps_the_older_with_the_higher_importance() -> None:
    meta = {
        1: MemoryMeta(1, 100.0, 0.3),
        2: MemoryMeta(2, 200.0, 0.9),
        3: MemoryMeta(3, 300.0, 0.5),
        4: MemoryMeta(4, 50.0, 0.2),
    }
    merges = plan_merges([(1, 2, 0.97), (2, 3, 0.99), (1, 3, 0.96)], meta, limit=10)
    # closest first: 2~3 keeps 2 (older); then 1~2 keeps 1 and takes 2's importance; 1~3: 3 is gone
    assert [(m.keep, m.drop) for m in merges] == [(2, 3), (1, 2)]
    assert merges[1].importance == 0.9
    assert plan_merges([(1, 4, 0.99)], meta, limit=10)[0].keep == 4  # older by time, not by id
    assert len(plan_merges([(1, 2, 0.97), (3, 4, 0.98)], meta, limit=1)) == 1  # bounded per run


def test_similar_pairs_finds_only_upper_triangle_matches() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 16)).astype(np.float32)
    base[4] = base[1] + 0.01  # a near duplicate of row 1
    mat = unit_rows(base)
    pairs = similar_pairs(mat, 0.99, 0, 6)
    assert [(i, j) for i, j, _ in pairs] == [(1, 4)]
    assert pairs[0][2] >= 0.99
    assert similar_pairs(mat, 0.99, 4, 6) == []  # row 4's partner 1 is before it: found from row 1's block only
    assert np.allclose(np.linalg.norm(unit_rows(np.zeros((1, 4), dtype=np.float32))), 0.0)


def test_due_helpers() -> None:
    assert interval_due(100.0, None, 7.0)
    assert not interval_due(100.0, 50.0, 1.0)
    assert interval_due(100.0 + 86400.0, 50.0, 1.0)
    assert interval_due(100.0, 99.0, 0.0)  # 0: every run
    assert vacuum_worthwhile(11, 100) and not vacuum_worthwhile(10, 100) and not vacuum_worthwhile(0, 0)


def test_summary_prompt_and_cleanup() -> None:
    msgs = [
        Message(1, "s", "user", "I   live in Lyon\nwith my cat.", 0.0),
        Message(2, "s", "assistant", "Nice!", 0.0),
        Message(3, "s", "tool", "ignored", 0.0),
        Message(4, "s", "user", "x" * 1000, 0.0),
    ]
    lines = transcript_lines(msgs)
    assert lines[:2] == ["User: I live in Lyon with my cat.", "Assistant: Nice!"]
    assert len(lines) == 3 and lines[2].endswith("…") and len(lines[2]) < 700
    prompt = summary_prompt(lines)
    assert prompt[0]["role"] == "system" and "Summarise what the user said about themselves" in prompt[1]["content"]
    assert prompt[1]["content"].endswith(lines[-1])
    assert clean_summary('  Summary:  "The user lives in Lyon."  ', msgs) == "The user lives in Lyon."
    assert clean_summary("   ", msgs) == "The user said: I live in Lyon with my cat."
    assert clean_summary("", [Message(1, "s", "assistant", "hi", 0.0)]) == ""
    prov = json.loads(summary_provenance("s", 1, 4, 123.0, "m"))
    assert prov == {"session_id": "s", "messages": [1, 4], "consolidated_at": 123.0, "model": "m"}


# ------------------------------------------------------------------------------ the runner, fake jobs


class FakeJob:
    """A job that records its runs; `block` makes it wait (cancellably) until released."""

    def __init__(self, name: str, *, result: dict[str, Any] | None = None, due: bool = True, error: Exception | None = None) -> None:
        self.name = name
        self.result = result if result is not None else {"did": name}
        self.is_due = due
        self.error = error
        self.block = False
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0
        self.cancelled = 0
        self.completed = 0

    def due(self, now: float) -> bool:
        assert now > 1e9  # wall clock
        return self.is_due

    async def async_run(self) -> dict[str, Any]:
        self.runs += 1
        self.started.set()
        try:
            if self.block:
                await self.release.wait()
            if self.error is not None:
                raise self.error
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.completed += 1
        return self.result


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    store = Database(path=tmp_path / "mongarsd.db")
    await store.async_start()
    yield store
    await store.async_stop()


async def runs(db: Database) -> list[tuple[str, str, dict[str, Any]]]:
    rows = await db.async_fetchall("SELECT job, status, summary FROM sommeil_runs ORDER BY id")
    return [(r["job"], r["status"], json.loads(r["summary"])) for r in rows]


@pytest_asyncio.fixture
async def service(db: Database) -> AsyncIterator[tuple[Sommeil, RequestState]]:
    state = RequestState()
    s = Sommeil(config=CFG, state=state, db=db)
    await s.async_start()
    yield s, state
    await s.async_stop()


async def test_cycle_runs_due_jobs_in_order_and_records_each(service: tuple[Sommeil, RequestState], db: Database) -> None:
    s, _ = service
    order: list[str] = []
    jobs = [
        FakeJob("a"),
        FakeJob("b", due=False),
        FakeJob("c", result={"skipped": "nothing configured"}),
        FakeJob("d", error=RuntimeError("boom")),
        FakeJob("e"),
    ]
    for job in jobs:
        s.add_job(job)
        job.started.clear()
    with pytest.raises(MongarsError, match="already registered"):
        s.add_job(FakeJob("a"))
    s.add_job(FakeJob("z"), before="c")
    assert s.jobs == ["a", "b", "z", "c", "d", "e"]
    out = await s.async_run_cycle(forced=False)
    for job in jobs:
        if job.runs:
            order.append(job.name)
    assert order == ["a", "c", "d", "e"] and jobs[1].runs == 0
    assert out["complete"] is True and out["cycle"] == 1
    assert out["jobs"] == {"a": "done", "b": "not_due", "z": "done", "c": "skipped", "d": "failed", "e": "done"}
    recorded = await runs(db)
    assert [(j, st) for j, st, _ in recorded] == [("a", "done"), ("z", "done"), ("c", "skipped"), ("d", "failed"), ("e", "done")]
    assert recorded[0][2]["result"] == {"did": "a"} and recorded[0][2]["cycle"] == 1 and recorded[0][2]["forced"] is False
    assert "RuntimeError: boom" in recorded[3][2]["error"]
    listed = await s.async_runs(2)
    assert [r["job"] for r in listed] == ["e", "d"] and listed[0]["summary"]["result"] == {"did": "e"}
    assert listed[0]["finished_at"] >= listed[0]["started_at"]
    with pytest.raises(ValidationError):
        await s.async_runs(0)
    samples = {(name, tuple(sorted(labels.items()))): value for name, _, _, value, labels in s.metrics()}
    assert samples[("mongarsd_sommeil_runs_total", (("job", "d"), ("status", "failed")))] == 1.0
    assert samples[("mongarsd_sommeil_running", ())] == 0.0
    assert s.status()["last_cycle"]["jobs"]["b"] == "not_due"


async def test_a_request_cancels_the_running_job_at_once_and_the_cycle_resumes_later(
    service: tuple[Sommeil, RequestState], db: Database
) -> None:
    s, state = service
    first, slow, last = FakeJob("first"), FakeJob("slow"), FakeJob("last")
    slow.block = True
    for job in (first, slow, last):
        s.add_job(job)
    async with asyncio.TaskGroup() as tg:
        running = tg.create_task(s.async_run_cycle(forced=False))
        await asyncio.wait_for(slow.started.wait(), 5)
        assert s.status()["state"] == "running" and s.status()["current_job"] == "slow"
        with pytest.raises(ValidationError) as err:
            await s.async_run_cycle(forced=True)
        assert err.value.status == 409
        t0 = time.perf_counter()
        state.work_started()  # what the middleware does when a user's request arrives
        out = await running
        elapsed_ms = (time.perf_counter() - t0) * 1000
    state.work_ended()
    assert slow.cancelled == 1 and last.runs == 0
    assert s.last_preempt_ms is not None and s.last_preempt_ms < 100.0 and elapsed_ms < 500.0
    assert s.preemptions_total == 1
    assert out["complete"] is False and out["pending"] == ["slow", "last"] and out["stopped_by"] == "a request arrived"
    recorded = await runs(db)
    assert [(j, st) for j, st, _ in recorded] == [("first", "done"), ("slow", "cancelled")]
    assert recorded[1][2]["reason"] == "a request arrived" and recorded[1][2]["preempt_ms"] < 100.0
    assert s.status()["pending"] == ["slow", "last"]

    # the next idle period resumes with the jobs not finished (not `first` again)
    slow.block = False
    out = await s.async_run_cycle(forced=False)
    assert out["complete"] is True and list(out["jobs"]) == ["slow", "last"]
    assert first.runs == 1 and slow.completed == 1 and last.completed == 1
    assert [(j, st) for j, st, _ in await runs(db)][-2:] == [("slow", "done"), ("last", "done")]
    assert s.status()["pending"] == []


async def test_forced_cycle_waits_for_its_own_post_then_answers_409_while_running(
    service: tuple[Sommeil, RequestState], db: Database
) -> None:
    s, state = service
    job = FakeJob("work")
    job.block = True
    s.add_job(job)
    state.work_started()  # the admin's POST is in flight
    number = await s.async_start_cycle(forced=True)
    assert number == 1
    await asyncio.sleep(0.05)
    assert job.runs == 0  # not while the POST is in flight: nothing could preempt it then
    with pytest.raises(ValidationError) as err:
        await s.async_start_cycle(forced=True)
    assert err.value.status == 409
    state.work_ended()
    await asyncio.wait_for(job.started.wait(), 5)
    assert s.status()["forced"] is True and s.status()["cycle"] == 1
    job.release.set()
    for _ in range(500):
        if s.status()["state"] != "running":
            break
        await asyncio.sleep(0.01)
    recorded = await runs(db)
    assert recorded == [
        ("work", "done", {"cycle": 1, "forced": True, "result": {"did": "work"}, "elapsed_ms": recorded[0][2]["elapsed_ms"]})
    ]


async def test_forced_cycle_is_still_preempted_by_requests(service: tuple[Sommeil, RequestState], db: Database) -> None:
    s, state = service
    job = FakeJob("work")
    job.block = True
    s.add_job(job)
    await s.async_start_cycle(forced=True)
    await asyncio.wait_for(job.started.wait(), 5)
    state.work_started()
    for _ in range(100):
        if s.status()["state"] != "running":
            break
        await asyncio.sleep(0.01)
    state.work_ended()
    assert job.cancelled == 1 and s.status()["pending"] == ["work"]
    assert [(j, st) for j, st, _ in await runs(db)] == [("work", "cancelled")]


async def test_hot_board_pauses_the_job_and_timeout_fails_it(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sommeil_mod, "HOT_POLL_S", 0.01)
    hot = {"now": False}
    state = RequestState()
    s = Sommeil(config=SommeilConfig(max_job_s=0.2), state=state, db=db, energy_hot=lambda: hot["now"])
    await s.async_start()
    try:
        warm, slow = FakeJob("warm"), FakeJob("slow")
        warm.block = slow.block = True
        s.add_job(warm)
        s.add_job(slow)
        async with asyncio.TaskGroup() as tg:
            running = tg.create_task(s.async_run_cycle(forced=False))
            await asyncio.wait_for(warm.started.wait(), 5)
            hot["now"] = True
            assert s.status()["state"] == "running"
            out = await running
        assert out["complete"] is False and out["stopped_by"] == "the board is hot" and slow.runs == 0
        assert s.status()["state"] == "paused_hot" and s.status()["hot"] is True
        hot["now"] = False
        warm.is_due = False
        out = await s.async_run_cycle(forced=False)  # resumes; the slow job runs past max_job_s
        assert slow.cancelled == 1 and out["jobs"] == {"warm": "not_due", "slow": "failed"} and out["complete"] is True
        recorded = await runs(db)
        assert [(j, st) for j, st, _ in recorded] == [("warm", "paused"), ("slow", "failed")]
        assert recorded[1][2]["reason"] == "the job ran past sommeil.max_job_s"
        assert s.preemptions_total == 0  # heat and overtime are not preemptions by requests
    finally:
        await s.async_stop()


async def test_loop_runs_cycles_only_while_idle(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # the shared test machine's CPU must not decide this: no CPU time passes between samples (unknown use)
    monkeypatch.setattr(sommeil_mod, "_read_power", lambda: ((1.0, 2.0), False))
    state = RequestState()
    clock = {"t": 1000.0}
    cfg = SommeilConfig(idle_after_s=30.0, check_interval_s=0.01, cycle_interval_s=0.0)
    s = Sommeil(config=cfg, state=state, db=db, clock=lambda: clock["t"])
    job = FakeJob("j")
    s.add_job(job)
    await s.async_start()
    try:
        async with asyncio.TaskGroup() as tg:
            loop = tg.create_task(s.async_loop())
            await asyncio.sleep(0.1)
            assert job.runs == 0 and s.status()["reason"] == "recent_activity"  # the start counts as activity
            assert s.status()["state"] == "busy" and s.status()["next_check_in_s"] is not None
            clock["t"] += 31.0
            await asyncio.wait_for(job.started.wait(), 5)
            state.work_started()
            state.last_activity = clock["t"]
            await asyncio.sleep(0.05)
            runs_while_busy = job.runs
            await asyncio.sleep(0.1)
            assert job.runs == runs_while_busy  # nothing runs while a request is in flight
            assert s.status()["reason"] == "busy"
            loop.cancel()
        state.work_ended()
    except* asyncio.CancelledError:
        pass
    finally:
        await s.async_stop()
    assert job.completed >= 1


async def test_disabled_sommeil_refuses_forced_cycles_and_its_loop_returns(db: Database) -> None:
    s = Sommeil(config=SommeilConfig(enabled=False), state=RequestState(), db=db)
    await s.async_start()
    try:
        await asyncio.wait_for(s.async_loop(), 1)
        assert s.status()["state"] == "disabled"
        with pytest.raises(ValidationError, match="disabled") as refused:
            await s.async_start_cycle()
        assert refused.value.status == 409  # the configuration, not a fault: never a 5xx
    finally:
        await s.async_stop()


async def test_stop_cancels_the_running_job_and_removes_the_listener(db: Database) -> None:
    state = RequestState()
    s = Sommeil(config=CFG, state=state, db=db)
    job = FakeJob("long")
    job.block = True
    s.add_job(job)
    await s.async_start()
    assert len(state.listeners) == 1
    await s.async_start_cycle(forced=True)
    await asyncio.wait_for(job.started.wait(), 5)
    t0 = time.monotonic()
    await s.async_stop()
    assert time.monotonic() - t0 < s.stop_timeout_s
    assert state.listeners == [] and job.cancelled == 1
    assert [(j, st) for j, st, _ in await runs(db)] == [("long", "cancelled")]


async def test_a_new_service_closes_stale_runs_and_continues_cycle_numbers(db: Database) -> None:
    await db.async_execute(
        "INSERT INTO sommeil_runs(job, started_at, status, summary) VALUES ('x', ?, 'running', ?)", (time.time(), '{"cycle": 41}')
    )
    s = Sommeil(config=CFG, state=RequestState(), db=db, jobs=[FakeJob("y")])
    await s.async_start()
    try:
        out = await s.async_run_cycle(forced=True)
        assert out["cycle"] == 42
        recorded = await runs(db)
        assert recorded[0][:2] == ("x", "failed") and recorded[0][2]["error"] == "the daemon stopped during the run"
        assert recorded[1][:2] == ("y", "done") and recorded[1][2]["cycle"] == 42
    finally:
        await s.async_stop()


async def test_power_readings_come_from_psutil_in_a_thread() -> None:
    (busy, total), on_battery = await asyncio.to_thread(sommeil_mod._read_power)
    assert 0.0 <= busy <= total and total > 0.0 and isinstance(on_battery, bool)


async def test_busy_cpu_or_battery_keeps_the_loop_from_working(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    reading = {"busy": 0.0, "total": 0.0, "step": 90.0, "battery": False}

    def fake_power() -> tuple[tuple[float, float], bool]:
        reading["busy"] += reading["step"]
        reading["total"] += 100.0
        return (reading["busy"], reading["total"]), bool(reading["battery"])

    monkeypatch.setattr(sommeil_mod, "_read_power", fake_power)
    clock = {"t": 5000.0}
    s = Sommeil(
        config=SommeilConfig(idle_after_s=1.0, check_interval_s=0.01, cpu_idle_pct=50.0),
        state=RequestState(),
        db=db,
        clock=lambda: clock["t"],
    )
    job = FakeJob("j")
    s.add_job(job)
    await s.async_start()
    clock["t"] += 10.0
    try:
        async with asyncio.TaskGroup() as tg:
            loop = tg.create_task(s.async_loop())
            await asyncio.sleep(0.1)
            assert job.runs == 0 and s.status()["reason"] == "cpu_busy" and s.status()["cpu_pct"] == 90.0
            reading["step"], reading["battery"] = 10.0, True
            await asyncio.sleep(0.1)
            assert job.runs == 0 and s.status()["reason"] == "on_battery" and s.status()["on_battery"] is True
            reading["battery"] = False
            await asyncio.wait_for(job.started.wait(), 5)  # quiet and on mains: it works
            loop.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await s.async_stop()


async def test_dedupe_merges_near_duplicates_per_user_and_skips_unchanged_stores(db: Database) -> None:
    from mongarsd.maintenance.jobs import DedupeJob
    from mongarsd.memory.hippocampus import Hippocampus
    from mongarsd.memory.vectors import to_blob

    hippo = Hippocampus(db=db, embedder=None, dim=4)
    await hippo.async_start()
    base = np.array([1.0, 0.2, 0.0, 0.0], dtype=np.float32)
    near = base + np.array([0.0, 0.0, 0.01, 0.0], dtype=np.float32)
    far = np.array([0.0, 0.0, 1.0, 0.0], dtype=np.float32)

    async def put(user: str, vec: np.ndarray[Any, Any], *, kind: str = "fact", importance: float = 0.5, created: float = 100.0) -> int:
        mid = await db.async_execute(
            "INSERT INTO memories(user, text, embedding, importance, kind, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (user, f"{user} {kind} {created}", to_blob(vec), importance, kind, created),
        )
        hippo.index.add(user, [mid], vec[None, :] / np.linalg.norm(vec))
        return mid

    older = await put("ann", base, importance=0.2, created=100.0)
    newer = await put("ann", near, importance=0.9, created=200.0)
    distinct = await put("ann", far)
    doc1, doc2 = await put("ann", base, kind="document"), await put("ann", near, kind="document")
    other_user = await put("bob", near)
    job = DedupeJob(hippo, 0.99)
    assert job.due(time.time())
    out = await job.async_run()
    assert out["merged"] == 1 and out["pairs"][0][:2] == [older, newer] and out["users"] == 2
    ids = {int(r["id"]) for r in await db.async_fetchall("SELECT id FROM memories")}
    assert ids == {older, distinct, doc1, doc2, other_user}  # documents and other users untouched
    assert newer not in hippo.index and older in hippo.index
    assert (await hippo.async_get_memory("ann", older)).importance == pytest.approx(0.9)
    again = await job.async_run()
    assert again["merged"] == 0 and "unchanged" not in again  # the pass after a merge looks again...
    assert (await job.async_run())["unchanged"] is True  # ...then nothing changed: no work
    await put("ann", far + np.array([0.0, 0.0, 0.0, 0.001], dtype=np.float32), created=300.0)
    assert (await job.async_run())["merged"] == 1  # a new memory: compared again
    await hippo.async_stop()


async def test_db_upkeep_checkpoints_always_and_analyzes_and_vacuums_when_due(db: Database) -> None:
    from mongarsd.maintenance.jobs import DatabaseUpkeepJob

    await db.async_execute(
        "INSERT INTO memories(user, text, kind, created_at) "
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600) SELECT 'junk', printf('%d %.2000c', i, 'x'), 'note', 0 FROM n"
    )
    await db.async_execute("DELETE FROM memories")
    state = RequestState()
    job = DatabaseUpkeepJob(db, analyze_interval_days=1.0, vacuum_interval_days=7.0)
    s = Sommeil(config=CFG, state=state, db=db, jobs=[job])
    await s.async_start()
    try:
        await s.async_run_cycle(forced=True)
        first = (await s.async_runs(1))[0]["summary"]["result"]
        assert first["analyzed"] is True and first["vacuumed"] is True and first["integrity"] == "ok"
        assert first["free_pages"] > 0.1 * first["pages"] and first["pages_after"] < first["pages"]
        assert first["checkpoint"]["busy"] is False
        await s.async_run_cycle(forced=True)
        second = (await s.async_runs(1))[0]["summary"]["result"]
        assert "analyzed" not in second and second["vacuum"] == "not due" and "checkpoint" in second
    finally:
        await s.async_stop()
    free = await db.async_fetchone("PRAGMA freelist_count")
    assert free is not None and int(free[0]) == 0


async def test_side_statements_are_interrupted_by_a_cancellation(db: Database) -> None:
    from mongarsd.maintenance.jobs import async_side

    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000) SELECT count(*) FROM n"
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(async_side(db.path, [(endless, ())], readonly=True))
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert time.perf_counter() - t0 < 1.0  # interrupted, not run to the end
    ((row,),) = await async_side(db.path, [("SELECT 41 + 1", ())], readonly=True)
    assert row == (42,)
