"""The rest of monGARS' mind through the running daemon, as a user meets it: curiosity research
through Iris from a local site, ingested documents named in answers, speech, and social posting.

Everything is real: `mongarsd run` with the default models, a web site and a Mastodon stand-in
in their own process on 127.0.0.1 (tests/fixtures/fake_web.py), espeak-ng, curl-style requests.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProc, requires_models, run_cli, start_daemon

pytestmark = [requires_models(), pytest.mark.timeout(600)]

FAKE_WEB = Path(__file__).resolve().parents[1] / "fixtures" / "fake_web.py"
RESEARCH_WAIT_S = 90.0
TOPIC_PAGE = """<!doctype html><html><head><title>The Zorbulon festival</title></head><body>
<nav><a href="/">Home</a> | <a href="/news.html">News</a></nav>
<article><h1>The Zorbulon festival of Quimtaro</h1>
<p>The Zorbulon festival is held in the mountain town of Quimtaro every year on 17 March.
Its people fly kites made of blown glass over the valley, and the brightest kite wins a
silver bell.</p>
<p>The festival began in 1911, when a glassmaker named Ottavia Brel launched the first glass
kite from the town's bell tower.</p></article>
<footer>Quimtaro tourist office</footer></body></html>"""
SECRET_PAGE = """<!doctype html><html><head><title>Zorbulon secrets</title></head><body>
<p>The Zorbulon festival secret: the kites are painted with saffron dye.</p></body></html>"""
INDEX_PAGE = """<!doctype html><html><head><title>Quimtaro</title></head><body>
<p>Welcome to Quimtaro.</p><a href="/zorbulon.html">Zorbulon festival</a>
<a href="/private/zorbulon-secrets.html">Secrets</a><a href="/news.html">News</a></body></html>"""
NEWS_PAGE = "<html><head><title>News</title></head><body><p>The town library reopened on Monday.</p></body></html>"


@dataclass
class Web:
    url: str
    log: Path
    proc: subprocess.Popen[str]

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@dataclass
class Mind:
    daemon: DaemonProc
    web: Web
    alice: str
    bob: str


def _start_web(tmp: Path) -> Web:
    root = tmp / "site"
    (root / "private").mkdir(parents=True)
    (root / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    (root / "index.html").write_text(INDEX_PAGE)
    (root / "zorbulon.html").write_text(TOPIC_PAGE)
    (root / "news.html").write_text(NEWS_PAGE)
    (root / "private" / "zorbulon-secrets.html").write_text(SECRET_PAGE)
    log = tmp / "web.log"
    proc = subprocess.Popen([sys.executable, str(FAKE_WEB), str(root), str(log)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "PORT", line
    return Web(f"http://127.0.0.1:{line[1]}", log, proc)


@pytest.fixture(scope="module")
def mind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mind]:
    tmp = tmp_path_factory.mktemp("mind")
    web = _start_web(tmp)
    d = None
    try:
        env = {
            "MONGARSD_IRIS__URLS": web.url + "/",
            "MONGARSD_IRIS__HOST_RATE_RPS": "20",
            "MONGARSD_IRIS__HOST_BURST": "10",
            "MONGARSD_CURIOSITY__RESEARCH_BUDGET_S": "30",
            "MONGARSD_AUTH__RATE_LIMIT_RPS": "1000",
            "MONGARSD_AUTH__RATE_LIMIT_BURST": "1000",
        }
        d = start_daemon(tmp, env=env, models=True)
        alice = run_cli("token", "create", "--user", "alice", "--state-dir", str(d.state_dir)).stdout.strip()
        bob = run_cli("token", "create", "--user", "bob", "--state-dir", str(d.state_dir)).stdout.strip()
        yield Mind(d, web, alice, bob)
    finally:
        if d is not None:
            d.stop()
        web.proc.terminate()
        web.proc.wait(timeout=10)
        if web.proc.stdout is not None:
            web.proc.stdout.close()


def _chat(m: Mind, token: str, message: str, **extra: Any) -> dict[str, Any]:
    body = {"message": message, "max_tokens": 40, "temperature": 0.0, "seed": 1, **extra}
    res = m.daemon.post("/api/v1/conversation/chat", body, token=token, timeout=120)
    assert res.status == 200, res.body[:500]
    out: dict[str, Any] = res.json()
    return out


def _research(m: Mind, token: str) -> list[dict[str, Any]]:
    res = m.daemon.get("/api/v1/curiosity", token=token)
    assert res.status == 200, res.body[:300]
    items: list[dict[str, Any]] = res.json()["research"]
    return items


def _memories(m: Mind, token: str) -> list[dict[str, Any]]:
    res = m.daemon.get("/api/v1/memory?limit=200", token=token)
    assert res.status == 200
    items: list[dict[str, Any]] = res.json()["memories"]
    return items


def test_a_knowledge_gap_is_researched_for_that_user_only_and_recalled_next_time(mind: Mind) -> None:
    topic_url = mind.web.url + "/zorbulon.html"
    first = _chat(mind, mind.alice, "What is the Zorbulon festival?")
    assert first["research"] is not None, first
    deadline = time.monotonic() + RESEARCH_WAIT_S
    while True:
        items = _research(mind, mind.alice)
        assert items, "the turn's research is listed for its user"
        if items[0]["status"] not in ("open", "running"):
            break
        assert time.monotonic() < deadline, items
        time.sleep(0.5)
    assert items[0]["status"] == "done", items[0]
    research = [m for m in _memories(mind, mind.alice) if m["kind"] == "research"]
    assert research, "the research is stored as alice's memory"
    provenance = [json.loads(m["provenance"]) for m in research]
    assert any(p["source"] == topic_url for p in provenance), provenance
    assert all(p["fetched_at"] > 0 and 0.0 <= p["confidence"] <= 1.0 and p["extract"] for p in provenance)
    assert any("17 March" in m["text"] or "glass" in m["text"] for m in research)
    # nothing for bob, and never stored as alice's own words
    assert not [m for m in _memories(mind, mind.bob) if m["kind"] == "research"]
    assert _research(mind, mind.bob) == []
    assert all(m["source"] == "research" for m in research)
    # robots.txt: the disallowed page was never asked for; every request said who it was
    reqs = mind.web.requests()
    assert not [r for r in reqs if r["path"].startswith("/private/")]
    assert any(r["path"] == "/robots.txt" for r in reqs)
    assert all("mongarsd" in r["ua"] for r in reqs if r["method"] == "GET")

    again = _chat(mind, mind.alice, "Tell me about the Zorbulon festival in Quimtaro.")
    used = again["memories_used"]
    assert any(u.get("kind") == "research" and u["source"]["source"] == topic_url for u in used), used
    assert any(s["source"] == topic_url for s in again["sources"]), again["sources"]
    assert topic_url in again["response"], "the answer names its source"
    # bob asking the same is a gap of his own: he may get research of his own, never alice's
    alice_ids = {m["id"] for m in research}
    bob = _chat(mind, mind.bob, "Tell me about the Zorbulon festival in Quimtaro.")
    assert not alice_ids & {u["id"] for u in bob["memories_used"]}
    assert not alice_ids & {m["id"] for m in _memories(mind, mind.bob)}


def test_a_shared_document_is_recalled_with_its_source_named(mind: Mind) -> None:
    text = (
        "Board maintenance note: the Veltrane water pump in greenhouse 4 must be descaled every 40 days "
        "with citric acid, and its filter replaced every 120 days."
    )
    res = mind.daemon.post(
        "/api/v1/ingest", {"text": text, "title": "Greenhouse handbook", "source": "handbook/greenhouse.md", "shared": True}
    )
    assert res.status == 201, res.body[:300]
    refused = mind.daemon.post("/api/v1/ingest", {"text": text, "title": "x", "source": "x.md", "shared": True}, token=mind.bob)
    assert refused.status == 403
    out = _chat(mind, mind.bob, "How often must the Veltrane water pump be descaled?")
    assert any(u.get("kind") == "document" for u in out["memories_used"]), out["memories_used"]
    assert "handbook/greenhouse.md" in out["response"]


def test_speech_is_a_playable_wav_of_the_right_length(mind: Mind) -> None:
    words = "The glass kites of Quimtaro fly over the valley every spring while the town rings its silver bells."
    res = mind.daemon.post("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": words, "response_format": "wav"})
    assert res.status == 200, res.body[:300]
    assert res.headers["Content-Type"].startswith("audio/wav")
    with wave.open(io.BytesIO(res.body), "rb") as w:
        seconds = w.getnframes() / w.getframerate()
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
    wpm = len(words.split()) / (seconds / 60.0)
    assert 100 <= wpm <= 260, (seconds, wpm)
    bad = mind.daemon.post("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": words, "response_format": "mp3"})
    assert bad.status == 400 and "wav" in bad.json()["error"]["message"]

    spoken = _chat(mind, mind.alice, "Say hello.", speak=True)
    wav = base64.b64decode(spoken["audio"]["data"])
    with wave.open(io.BytesIO(wav), "rb") as w:
        assert w.getnframes() > 0 and w.getframerate() == spoken["audio"]["sample_rate"]


def test_a_social_post_reaches_the_server_exactly_once(mind: Mind) -> None:
    account = {"name": "board", "instance": mind.web.url, "token": "good-token"}
    assert mind.daemon.post("/api/v1/social/accounts", account, token=mind.alice).status == 403
    res = mind.daemon.post("/api/v1/social/accounts", account)
    assert res.status in (200, 201), res.body[:300]
    listed = mind.daemon.get("/api/v1/social/accounts")
    assert "good-token" not in listed.body.decode()
    vault = b"".join(p.read_bytes() for p in (mind.daemon.state_dir / "social").rglob("*") if p.is_file())
    assert b"good-token" not in vault
    post = {"account": "board", "status": "Glass kites over Quimtaro today.", "idempotency_key": "kites-1"}
    first = mind.daemon.post("/api/v1/social/post", post)
    assert first.status in (200, 201), first.body[:300]
    second = mind.daemon.post("/api/v1/social/post", post)
    assert second.status in (200, 201) and second.json()["id"] == first.json()["id"]
    created = [r for r in mind.web.requests() if r["path"] == "/api/v1/statuses" and r.get("created")]
    assert len(created) == 1, created
    assert "good-token" not in mind.daemon.log()
