"""P14: time to first token while Sommeil's idle work runs vs the same daemon idle between cycles.

One daemon with its board profile's defaults and short idle thresholds (idle after 1 s, a check
every 0.2 s, no wait between cycles), on a state dir seeded with a month-old conversation history
(sessions for the local model to consolidate), unembedded, near-duplicate and expired memories,
so a cycle has real work. Interleaved samples of a short streamed /v1/chat/completions request:
(a) sent while no idle job runs (between cycles), (b) sent while a forced cycle (POST
/api/v1/sommeil/run) consolidates sessions with the model, once GET /api/v1/sommeil says so.
P14's value is the median TTFT during the work, its reference the median idle TTFT.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from bench.common import (
    LOOPBACK,
    REPO,
    BenchSettings,
    Proc,
    Skip,
    daemon_env,
    free_port,
    http_get,
    http_post_json,
    make_entry,
    median,
    resolve_settings,
    spawn,
    spread,
)
from bench.llm import Side, async_chat

SAMPLES: Final = 7  # of each kind, interleaved
MAX_TOKENS: Final = 4
JOB_WAIT_S: Final = 180.0  # for the forced cycle to reach the consolidation (the first one embeds the backlog)
QUIET_WAIT_S: Final = 30.0
POLL_S: Final = 0.01
# Sent this long after consolidation is seen running: the arrival falls in different phases (prefill, decode).
DELAYS_S: Final = (0.0, 0.15, 0.3, 0.5, 0.8, 1.2, 0.05)
WORK_JOB: Final = "consolidate"
USERS: Final = ("ana", "ben", "chloe", "dev")
SESSIONS_PER_USER: Final = 40
TURNS_PER_SESSION: Final = 6
OLD_DAYS: Final = 30.0
FACTS_PER_USER: Final = 50
DUPLICATES_PER_USER: Final = 10
EXPIRED_PER_USER: Final = 20
PROMPT: Final = "Question {n}: In one short sentence, what colour is the sky on a clear day?"
OVERRIDES: Final = {
    "MONGARSD_SOMMEIL__ENABLED": "true",
    "MONGARSD_SOMMEIL__IDLE_AFTER_S": "1",
    "MONGARSD_SOMMEIL__CHECK_INTERVAL_S": "0.2",
    "MONGARSD_SOMMEIL__CYCLE_INTERVAL_S": "0",
    "MONGARSD_AUTH__RATE_LIMIT_RPS": "1000",  # the status polls
    "MONGARSD_AUTH__RATE_LIMIT_BURST": "1000",
}
PLACES: Final = ("Lyon", "Kyoto", "Lisbon", "Montreal", "Oslo", "Nairobi", "Hanoi", "Quito")
HOBBIES: Final = ("the cello", "bouldering", "chess", "sourdough baking", "birdwatching", "pottery", "trail running", "origami")
PEOPLE: Final = ("my sister Maud", "my friend Idris", "my son Leo", "my partner Sam", "my neighbour Ines", "my aunt Vera")


def _turns(user: int, session: int) -> list[tuple[str, str]]:
    """A session's (user, assistant) turns: statements about the user's life, deterministic (pure)."""
    k = user * 131 + session * 17
    out = []
    for t in range(TURNS_PER_SESSION):
        place, hobby, person = PLACES[(k + t) % len(PLACES)], HOBBIES[(k + 3 * t) % len(HOBBIES)], PEOPLE[(k + 5 * t) % len(PEOPLE)]
        said = f"Last week I went to {place} with {person}, and on Sunday I practised {hobby} for {t + 2} hours."
        out.append((said, f"That sounds like a good week; how was {place}?"))
    return out


def seed(db_path: Path, now: float) -> dict[str, int]:
    """Create the daemon's database with a month-old history and memories to work on (blocking)."""
    from mongarsd.memory.db import open_and_migrate

    open_and_migrate(db_path)
    conn = sqlite3.connect(db_path, isolation_level=None)
    counts = {"sessions": 0, "messages": 0, "memories": 0}
    try:
        conn.execute("BEGIN")
        old = now - OLD_DAYS * 86400.0
        for u, user in enumerate(USERS):
            for s in range(SESSIONS_PER_USER):
                sid = f"s{s:03d}"
                t0 = old + s * 600.0
                conn.execute("INSERT INTO sessions(user, id, created_at, updated_at) VALUES (?, ?, ?, ?)", (user, sid, t0, t0 + 60))
                counts["sessions"] += 1
                for t, (said, answer) in enumerate(_turns(u, s)):
                    for role, text in (("user", said), ("assistant", answer)):
                        conn.execute(
                            "INSERT INTO messages(user, session_id, role, content, created_at) VALUES (?, ?, ?, ?, ?)",
                            (user, sid, role, text, t0 + t * 10),
                        )
                        counts["messages"] += 1
            rows: list[tuple[str, float | None]] = []
            rows += [
                (f"{user} likes {HOBBIES[i % len(HOBBIES)]} and visited {PLACES[i % len(PLACES)]} in year {2000 + i}.", None)
                for i in range(FACTS_PER_USER)
            ]
            for i in range(DUPLICATES_PER_USER):
                text = f"My favourite dish number {i} is {PLACES[i % len(PLACES)]}-style noodles with ginger"
                rows += [(text + ".", None), (text + "!", None)]
            rows += [(f"Temporary door code {i} for {user}: {1000 + i}.", now - 3600.0) for i in range(EXPIRED_PER_USER)]
            for text, expires in rows:
                conn.execute(
                    "INSERT INTO memories(user, text, importance, kind, source, created_at, expires_at) VALUES (?, ?, 0.5, 'fact', 'user', ?, ?)",
                    (user, text, old, expires),
                )
                counts["memories"] += 1
        conn.execute("COMMIT")
    finally:
        conn.close()
    return counts


def _start(workdir: Path, settings: BenchSettings, state: Path, overrides: Mapping[str, str]) -> Proc:
    """`mongarsd run` on a free loopback port with the seeded state dir (blocking until /ready)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "mongarsd", "run", "--host", LOOPBACK, "--port", str(port),
        "--state-dir", str(state), "--models-dir", str(settings.models_dir),
    ]  # fmt: skip
    proc = spawn(cmd, log_path=workdir / f"daemon-sommeil-{port}.log", env=daemon_env(workdir, settings, overrides), port=port)
    proc.wait_ready("/ready")
    return proc


def _status(daemon: Proc) -> dict[str, Any]:
    status, body = http_get(daemon.url + "/api/v1/sommeil", timeout=10)
    if status == 404:
        raise Skip("the daemon has no GET /api/v1/sommeil (Sommeil is not wired into daemon.py yet)")
    if status != 200:
        raise Skip(f"GET /api/v1/sommeil answered {status}: {body[:200]!r}")
    doc: dict[str, Any] = json.loads(body)
    return doc


def _wait(daemon: Proc, pred: Callable[[dict[str, Any]], bool], timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        doc = _status(daemon)
        if pred(doc):
            return doc
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    raise Skip(f"Sommeil never reached '{what}' within {timeout_s:.0f} s (last state {doc['state']}, job {doc['status']['current_job']})")


def _quiet(daemon: Proc) -> None:
    """Stop any automatic cycle (a user request preempts it) and wait until no job runs."""
    http_get(daemon.url + "/v1/models", timeout=10)  # a user's request: preempts whatever runs
    _wait(daemon, lambda d: d["state"] != "running" and d["status"]["current_job"] is None, QUIET_WAIT_S, "no job running")


def _ttft_ms(side: Side, n: int) -> float:
    r = asyncio.run(async_chat(side, [{"role": "user", "content": PROMPT.format(n=n)}], MAX_TOKENS))
    if r.ttft_s is None:
        raise Skip("no token came back from the daemon")
    return r.ttft_s * 1000.0


def run(results: dict[str, Any], *, only: set[str] | None = None, log: Callable[[str], None] = print) -> None:
    """Measure P14 into `results`."""
    settings = resolve_settings(REPO / "models")
    if not settings.model_path.exists():
        raise Skip(f"{settings.model_path.name} is not installed (run `make models`)")
    workdir = Path(tempfile.mkdtemp(prefix="mongarsd-bench-sommeil-"))
    state = workdir / "state"
    counts = seed(state / "mongarsd.db", time.time())
    log(f"    seeded {counts}")
    daemon = _start(workdir, settings, state, OVERRIDES)
    try:
        side = Side("mongarsd", daemon.url, settings.model_id)
        _status(daemon)
        _ttft_ms(side, 999)  # warm-up: model, template, first decode
        idle: list[float] = []
        during: list[float] = []
        samples: list[dict[str, Any]] = []
        for i in range(-1, SAMPLES):  # the first pair warms up: the backlog embedded, each side's slot settled
            _quiet(daemon)
            ttft_idle = _ttft_ms(side, 2 * i + 2)
            code, answer = http_post_json(daemon.url + "/api/v1/sommeil/run", {}, timeout=30)
            if code not in (202, 409):
                raise Skip(f"POST /api/v1/sommeil/run answered {code}: {str(answer)[:200]}")
            seen = _wait(daemon, lambda d: d["status"]["current_job"] == WORK_JOB, JOB_WAIT_S, f"{WORK_JOB} running")
            time.sleep(DELAYS_S[i % len(DELAYS_S)])
            ttft_during = _ttft_ms(side, 2 * i + 3)
            if i < 0:
                continue
            idle.append(ttft_idle)
            during.append(ttft_during)
            after = _status(daemon)
            run_row = next((r for r in after["runs"] if r["id"] == seen["status"]["current_run"]), None)
            samples.append(
                {
                    "idle_ms": round(idle[-1], 2),
                    "during_ms": round(during[-1], 2),
                    "job": seen["status"]["current_job"],
                    "delay_s": DELAYS_S[i % len(DELAYS_S)],
                    "run_status": None if run_row is None else run_row["status"],
                    "preempt_ms": None if run_row is None else run_row["summary"].get("preempt_ms"),
                }
            )
            log(
                f"    sample {i + 1}/{SAMPLES}: idle {idle[-1]:.1f} ms, during {WORK_JOB} {during[-1]:.1f} ms ({samples[-1]['run_status']})"
            )
        value, ref = median(during), median(idle)
        preempted = [s for s in samples if s["run_status"] == "cancelled"]
        details = {
            "method": "streamed /v1/chat/completions (4 tokens), send to first SSE token; idle between cycles vs during a forced "
            "cycle's consolidation (sessions summarised by the local model), interleaved, medians; profile defaults, "
            "sommeil idle_after_s 1, check_interval_s 0.2, cycle_interval_s 0",
            "idle_ms": spread(idle),
            "during_ms": spread(during),
            "preempted_runs": len(preempted),
            "preempt_ms": [s["preempt_ms"] for s in preempted],
            "samples": samples,
            "seeded": counts,
        }
        results["P14"] = make_entry("P14", value=value, reference=ref, details=details)
    finally:
        daemon.stop()
