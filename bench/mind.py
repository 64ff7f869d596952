"""P17: event-loop lag while chats stream and the rest of the mind works (research, ingest, speech).

One daemon with its board profile's defaults (what a user gets) and Iris pointed at a local web
site (tests/fixtures/fake_web.py, its own process on loopback). The same four concurrent chat
streams run twice, interleaved over repetitions: alone, and while the daemon researches a
knowledge gap on the site, ingests a large HTML document and synthesises speech. The lag comes
from the daemon's own `mongarsd_event_loop_lag_seconds` histogram (bucket deltas over each
phase); P17's value is the p99 with the extra work, its reference the p99 of the chat alone.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench.common import (
    REPO,
    BenchSettings,
    Proc,
    Skip,
    histogram_delta,
    histogram_quantile,
    http_get,
    make_entry,
    resolve_settings,
    start_daemon,
)
from bench.llm import Side, async_many, count_prompt, scrape_lag

FAKE_WEB: Final = REPO / "tests" / "fixtures" / "fake_web.py"
REPS: Final = 3
STREAMS: Final = 4
DECODE_TOKENS: Final = 128
RESEARCH_WAIT_S: Final = 120.0
BIG_PARAGRAPHS: Final = 1500  # about 300 KB of HTML: trafilatura's worst case for the loop
SPEECH_TEXT: Final = (
    "The glass kites of Quimtaro rise over the valley every spring, and the town rings its silver bells "
    "while the children count the colours. "
) * 12


def _site(root: Path) -> None:
    (root / "private").mkdir(parents=True, exist_ok=True)
    (root / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    (root / "index.html").write_text('<html><head><title>Quimtaro</title></head><body><a href="/zorbulon.html">Zorbulon</a></body></html>')
    (root / "zorbulon.html").write_text(
        "<html><head><title>The Zorbulon festival</title></head><body><article><h1>The Zorbulon festival</h1>"
        "<p>The Zorbulon festival is held in Quimtaro every 17 March; people fly kites of blown glass.</p>"
        + "".join(f"<p>Paragraph {i} of the festival's long history, with the glassmakers' guild and its bells.</p>" for i in range(400))
        + "</article></body></html>"
    )


def _big_html(rep: int) -> str:
    body = "".join(
        f"<p>Section {i} of handbook {rep}: the Veltrane pump number {i} is descaled every {i % 90 + 10} days.</p>"
        for i in range(BIG_PARAGRAPHS)
    )
    return f"<html><head><title>Handbook {rep}</title></head><body><article>{body}</article></body></html>"


async def _async_side_work(base: str, rep: int) -> dict[str, Any]:
    """Research, ingest and speech at once (while the streams run); return what each answered."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def post(path: str, body: dict[str, Any]) -> tuple[int, int]:
            async with session.post(base + path, json=body) as resp:
                data = await resp.read()
                return resp.status, len(data)

        t0 = time.monotonic()
        answers = await asyncio.gather(
            post("/api/v1/conversation/chat", {"message": f"What is the Zorbulon festival of Quimtaro (question {rep})?", "max_tokens": 8}),
            post(
                "/api/v1/ingest",
                {"text": _big_html(rep), "title": f"Handbook {rep}", "source": f"handbook-{rep}.html", "content_type": "text/html"},
            ),
            post("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": SPEECH_TEXT, "response_format": "wav"}),
        )
    return {"chat": answers[0], "ingest": answers[1], "speech": answers[2], "seconds": round(time.monotonic() - t0, 2)}


async def _async_phase(side: Side, base: str, rep: int, *, with_work: bool) -> dict[str, Any]:
    prompts = [count_prompt(100 * (i + 1) + rep * 1000 + (7 if with_work else 0)) for i in range(STREAMS)]
    streams = asyncio.create_task(async_many(side, prompts, DECODE_TOKENS))
    work = await _async_side_work(base, rep) if with_work else None
    results, _, _ = await streams
    return {"tokens": sum(r.completion_tokens for r in results), "work": work}


def _research_done(daemon: Proc) -> list[str]:
    import json

    status, body = http_get(daemon.url + "/api/v1/curiosity", timeout=10)
    if status != 200:
        raise Skip(f"GET /api/v1/curiosity answered {status}")
    return [str(r["status"]) for r in json.loads(body)["research"]]


def run(results: dict[str, Any], *, only: set[str] | None = None, log: Callable[[str], None] = print) -> None:
    """Measure P17 into `results`."""
    import tempfile

    settings: BenchSettings = resolve_settings(REPO / "models")
    workdir = Path(tempfile.mkdtemp(prefix="mongarsd-bench-mind-"))
    _site(workdir / "site")
    web = subprocess.Popen(
        [sys.executable, str(FAKE_WEB), str(workdir / "site"), str(workdir / "web.log")], stdout=subprocess.PIPE, text=True
    )
    daemon: Proc | None = None
    try:
        assert web.stdout is not None
        line = web.stdout.readline().split()
        if not line or line[0] != "PORT":
            raise Skip("the local web site did not start")
        site = f"http://127.0.0.1:{line[1]}/"
        overrides = {
            "MONGARSD_IRIS__URLS": site,
            "MONGARSD_IRIS__HOST_RATE_RPS": "20",
            "MONGARSD_IRIS__HOST_BURST": "10",
            "MONGARSD_CURIOSITY__RESEARCH_BUDGET_S": "0",  # the chat answers at once; research goes on beside the streams
            "MONGARSD_AUTH__RATE_LIMIT_RPS": "1000",
            "MONGARSD_AUTH__RATE_LIMIT_BURST": "1000",
            "MONGARSD_SOMMEIL__ENABLED": "false",
        }
        daemon = start_daemon(workdir, settings, name="mind", overrides=overrides)
        side = Side("mongarsd", daemon.url, settings.model_id)
        asyncio.run(_async_phase(side, daemon.url, -1, with_work=False))  # warm-up: model, embedder, espeak
        lag: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        work: list[dict[str, Any]] = []
        for rep in range(REPS):
            for with_work in (False, True):
                before = scrape_lag(daemon)
                out = asyncio.run(_async_phase(side, daemon.url, rep, with_work=with_work))
                if with_work:
                    deadline = time.monotonic() + RESEARCH_WAIT_S  # research still running belongs to this phase
                    while any(s in ("open", "running") for s in _research_done(daemon)) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    work.append(out["work"])
                delta = histogram_delta(scrape_lag(daemon), before)
                lag[with_work] = (
                    delta if not lag[with_work] else [(le, c + d) for (le, c), (_, d) in zip(lag[with_work], delta, strict=True)]
                )
            log(f"    rep {rep + 1}/{REPS}: side work {work[-1]}")
        p99_work = histogram_quantile(0.99, lag[True])
        p99_alone = histogram_quantile(0.99, lag[False])
        if p99_work is None or p99_alone is None:
            raise Skip("no event-loop lag samples were observed")
        details = {
            "method": f"{STREAMS} concurrent /v1/chat/completions streams of {DECODE_TOKENS} tokens, alone and while a research "
            "(a knowledge gap answered from a local site), a ~300 KB HTML ingest and a speech synthesis run; "
            "p99 of the daemon's loop-lag histogram deltas; profile defaults",
            "p99_chat_alone_ms": round(p99_alone * 1000, 3),
            "research_statuses": _research_done(daemon),
            "side_work": work,
            "samples_with_work": lag[True][-1][1],
            "buckets_le_s_count_with_work": [[le if le != float("inf") else "+Inf", c] for le, c in lag[True]],
        }
        results["P17"] = make_entry("P17", value=p99_work * 1000, reference=p99_alone * 1000, details=details)
    finally:
        if daemon is not None:
            daemon.stop()
        web.terminate()
        web.wait(timeout=10)
        if web.stdout is not None:
            web.stdout.close()
