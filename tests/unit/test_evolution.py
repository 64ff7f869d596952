"""Evolution Engine: pure decisions, the engine over a scripted trial program, and the manager's hooks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_asyncio

from mongarsd.board import BoardInfo
from mongarsd.config import EvolutionConfig, InferenceConfig
from mongarsd.errors import OverloadedError, ValidationError
from mongarsd.inference.events import EngineStats
from mongarsd.inference.manager import InferenceManager
from mongarsd.inference.models import ModelRegistry
from mongarsd.inference.settings import EngineSettings
from mongarsd.maintenance import evolution as evo
from mongarsd.maintenance.evolution import (
    EvolutionEngine,
    RegressionWatch,
    canonical,
    decide,
    neighbourhood,
    overlay_tuned,
    parse_trial_output,
    pick_candidate,
    request_rates,
    sign_payload,
    trial_kind,
    tuning_payload,
    validate_settings,
    verify_payload,
)
from mongarsd.memory.db import Database
from mongarsd.mesh.identity import NodeIdentity
from tests.unit.test_gguf import tiny_model

BOARD = BoardInfo(profile="test-board", model="Test Board", arch="x86_64", cores_logical=4, cores_physical=4, ram_mb=4096)
ACTIVE = {
    "threads": 2,
    "n_ctx": 512,
    "n_batch": 64,
    "n_ubatch": 64,
    "slots": 1,
    "kv_cache_type": "f16",
    "flash_attn": False,
    "use_mmap": True,
    "use_mlock": False,
}

# A stand-in for trial.py: its rate is 10 tokens/s per thread (n_batch 128: 12 per thread, a small
# gain), with a little jitter; n_ubatch 3 exits non-zero, n_ubatch 5 hangs, n_ubatch 7 is killed
# by a signal, n_ubatch 9 reports a huge RSS. Each run writes its pid to PIDS_DIR.
FAKE_TRIAL = textwrap.dedent(
    """
    import argparse, json, os, random, signal, sys, time
    p = argparse.ArgumentParser()
    for a in ("--kind", "--model", "--settings"):
        p.add_argument(a)
    p.add_argument("--tokens", type=int)
    p.add_argument("--repeats", type=int)
    a = p.parse_args()
    s = json.loads(a.settings)
    pids = os.environ.get("EVO_TEST_PIDS")
    if pids:
        open(os.path.join(pids, str(os.getpid())), "w").close()
    u = s.get("n_ubatch")
    if u == 3:
        print(json.dumps({"ok": False, "error": "bogus setting"}))
        sys.exit(2)
    if u == 5:
        time.sleep(60)
    if u == 7:
        os.kill(os.getpid(), signal.SIGSEGV)
    per_thread = 12.0 if s.get("n_batch") == 128 else 10.0
    rate = s.get("threads", 1) * per_thread * (1 + random.random() * 0.01)
    rss = 10_000_000.0 if u == 9 else 50.0
    print(json.dumps({"ok": True, "kind": a.kind, "tokens_per_s": [rate], "prompt_tokens_per_s": [rate * 4],
                      "prompt_tokens": 40, "tokens": a.tokens, "peak_rss_mb": rss, "llama_cpp": "test"}))
    """
)


# ---------------------------------------------------------------------------------------- pure


def test_neighbourhood_is_deterministic_and_within_limits() -> None:
    first = neighbourhood(ACTIVE, cores=4)
    assert first == neighbourhood(ACTIVE, cores=4)
    assert ACTIVE not in first
    changed = [next(iter(evo.changes(ACTIVE, c))) for c in first]
    assert changed[:2] == ["threads", "threads"]
    assert {c["threads"] for c in first} == {1, 2, 3}
    assert {"n_ubatch", "n_batch", "flash_attn", "kv_cache_type", "use_mmap"} <= set(changed)
    for c in first:
        assert 1 <= c["threads"] <= 4
        assert evo.N_BATCH_MIN <= c["n_batch"] <= evo.N_BATCH_MAX
        assert 1 <= c["n_ubatch"] <= c["n_batch"]
        assert c["kv_cache_type"] in ("f16", "q8_0")
    # halving n_batch keeps n_ubatch within it; one core leaves no thread step up
    halved = next(c for c in first if c["n_batch"] == 32)
    assert halved["n_ubatch"] == 32
    assert all(c["threads"] == 1 for c in neighbourhood({**ACTIVE, "threads": 1}, cores=1))
    # above the cores: back down to the cores
    assert neighbourhood({**ACTIVE, "threads": 8}, cores=4)[0]["threads"] == 4


def test_neighbourhood_with_embed_settings() -> None:
    cands = neighbourhood({**ACTIVE, "embed_threads": 1, "embed_graph_opt": "all"}, cores=2)
    embed = [c for c in cands if trial_kind({**ACTIVE, "embed_threads": 1, "embed_graph_opt": "all"}, c) == "embed"]
    assert {(c["embed_threads"], c["embed_graph_opt"]) for c in embed} == {(2, "all"), (1, "extended"), (1, "basic")}


def test_decide_adopts_only_a_confident_gain_within_budget() -> None:
    base = [10.0, 10.2, 9.9, 10.1, 10.05]
    better = [12.0, 12.3, 11.9, 12.2, 12.1]
    ok = decide(baseline=base, candidate=better, confidence=0.95, min_gain=0.03, peak_rss_mb=100, budget_mb=1000)
    assert ok.adopt and ok.p_value == pytest.approx(1 / 252) and ok.gain == pytest.approx(12.1 / 10.05 - 1)
    assert "adopted" in ok.reason
    worse = decide(baseline=better, candidate=base, confidence=0.95, min_gain=0.03, peak_rss_mb=100, budget_mb=1000)
    assert not worse.adopt and "not faster" in worse.reason
    small = decide(baseline=base, candidate=[x * 1.01 + 0.2 for x in base], confidence=0.95, min_gain=0.05, peak_rss_mb=1, budget_mb=10)
    assert not small.adopt and "below the 5.0% required" in small.reason
    big = decide(baseline=base, candidate=better, confidence=0.95, min_gain=0.03, peak_rss_mb=2000, budget_mb=1000)
    assert not big.adopt and "memory budget" in big.reason
    noisy = decide(baseline=[10.0, 13.0, 9.0], candidate=[12.0, 9.5, 12.5], confidence=0.95, min_gain=0.0, peak_rss_mb=1, budget_mb=10)
    assert not noisy.adopt and noisy.p_value is not None and noisy.p_value > 0.05
    few = decide(baseline=[10.0], candidate=[20.0], confidence=0.95, min_gain=0.0, peak_rss_mb=1, budget_mb=10)
    assert not few.adopt and "too few" in few.reason


def test_pick_candidate_skips_recent_settings() -> None:
    cands = neighbourhood(ACTIVE, cores=4)
    now = 1_000_000.0
    assert pick_candidate(cands, {}, now) == cands[0]
    recent = {canonical(cands[0]): now - 10, canonical(cands[1]): now - evo.RETRIAL_AFTER_S - 1}
    assert pick_candidate(cands, recent, now) == cands[1]
    assert pick_candidate(cands, {canonical(c): now for c in cands}, now) is None


def test_regression_watch() -> None:
    watch = RegressionWatch(alpha=0.5)
    for _ in range(19):
        watch.observe(5.0)
    assert not watch.regressed(10.0, 0.15)  # 19 observations: not yet
    watch.observe(5.0)
    assert watch.regressed(10.0, 0.15)
    assert not watch.regressed(None, 0.15)
    assert not watch.regressed(5.5, 0.15)  # 5.0 >= 0.85 * 5.5
    watch.reset()
    assert watch.count == 0 and not watch.regressed(10.0, 0.15)


def test_validate_settings_names_the_bad_one() -> None:
    assert validate_settings(ACTIVE, cores=4) == ACTIVE
    for bad, needle in (
        ({"threads": 9}, "threads"),
        ({"threads": True}, "threads"),
        ({"n_ubatch": 65}, "n_ubatch"),
        ({"kv_cache_type": "q2"}, "kv_cache_type"),
        ({"flash_attn": "yes"}, "flash_attn"),
        ({"gpu": 1}, "unknown settings: gpu"),
    ):
        with pytest.raises(ValidationError, match=needle):
            validate_settings({**ACTIVE, **bad}, cores=4)


def test_overlay_keeps_our_context_and_slots() -> None:
    peer = {**ACTIVE, "threads": 3, "n_ctx": 8192, "slots": 8, "flash_attn": True, "n_batch": 32}
    out = overlay_tuned(ACTIVE, peer)
    assert out["threads"] == 3 and out["flash_attn"] is True
    assert out["n_ctx"] == 512 and out["slots"] == 1
    assert out["n_batch"] == 32 and out["n_ubatch"] == 32  # kept within the batch


def test_parse_trial_output() -> None:
    good = json.dumps({"ok": True, "tokens_per_s": [20.0], "prompt_tokens_per_s": [40.0], "prompt_tokens": 40, "peak_rss_mb": 99.5})
    run = parse_trial_output(b"noise\n" + good.encode() + b"\n", 0, b"", tokens=20)
    assert run.ok and run.decode_tokens_per_s == (20.0,) and run.peak_rss_mb == 99.5
    assert run.tokens_per_s == (10.0,)  # 20 tokens in 1 s of prompt + 1 s of generation
    assert request_rates({"tokens_per_s": [5.0]}, 10) == ([5.0], [5.0])
    bad = parse_trial_output(b'{"ok": false, "error": "n_ubatch is bogus"}\n', 2, b"", tokens=20)
    assert not bad.ok and bad.error == "n_ubatch is bogus"
    killed = parse_trial_output(b"", -9, b"", tokens=20)
    assert not killed.ok and "SIGKILL" in killed.error and "memory" in killed.error
    crashed = parse_trial_output(b"", 1, b"Traceback...\nMemoryError\n", tokens=20)
    assert not crashed.ok and "exit status 1" in crashed.error and "MemoryError" in crashed.error


def test_payload_signature() -> None:
    ident = NodeIdentity.generate()
    payload = sign_payload(
        ident,
        tuning_payload(
            board="test-board",
            model="m",
            model_sha256="ab" * 32,
            llama_cpp="0.3",
            settings=ACTIVE,
            tokens_per_s=12.5,
            node=ident.node_id,
            public_key=ident.public_key,
        ),
    )
    assert verify_payload(payload) is None
    assert verify_payload({**payload, "settings": {**ACTIVE, "threads": 4}}) == "bad_signature"
    assert verify_payload({k: v for k, v in payload.items() if k != "sig"}) == "malformed"
    other = NodeIdentity.generate()
    assert verify_payload({**payload, "node": other.node_id}) == "bad_identity"
    forged = sign_payload(other, payload)  # ident's id and key, signed by another key
    assert verify_payload(forged) == "bad_signature"
    swapped = sign_payload(other, {**payload, "public_key": base64.b64encode(other.public_key).decode()})
    assert verify_payload(swapped) == "bad_identity"  # the node id does not derive from that key
    assert verify_payload({**payload, "v": 2}) == "unsupported_version"


# ---------------------------------------------------------------------------------------- engine


class FakeManager:
    """The part of InferenceManager the engine uses."""

    def __init__(self) -> None:
        self.budget_mb = 1000.0
        self.thermal_hot = False
        self.applied: list[dict[str, Any]] = []
        self.loads = 0

    async def async_apply_overrides(self, overrides: dict[str, Any]) -> list[str]:
        self.applied.append(dict(overrides))
        return ["m"]

    async def async_load(self, model_id: str) -> None:
        self.loads += 1


class FakeMesh:
    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self.listeners: list[Any] = []
        self.running = False

    def add_message_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_message_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    store = Database(path=tmp_path / "state.db")
    await store.async_start()
    yield store
    await store.async_stop()


@pytest.fixture
def fake_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Path]:
    script = tmp_path / "fake_trial.py"
    script.write_text(FAKE_TRIAL)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("EVO_TEST_PIDS", str(pids))
    return [sys.executable, str(script)], pids


async def pids_in(folder: Path) -> list[int]:
    """Return the pids the scripted trials wrote (read in a thread: it is file I/O)."""
    return [int(name) for name in await asyncio.to_thread(os.listdir, folder)]


def make_engine(db: Database, command: list[str], **kw: Any) -> EvolutionEngine:
    config = kw.pop("config", EvolutionConfig(trial_repeats=4, trial_timeout_s=20.0))
    inference = kw.pop("inference", InferenceConfig(threads=1, n_ctx=512, n_batch=64, n_ubatch=64, slots=1))
    model = kw.pop("model_path", Path(__file__))
    return EvolutionEngine(
        config=config, inference=inference, db=db, board=BOARD, model_id="m", model_path=model, trial_command=command, **kw
    )


async def test_baseline_version_then_a_better_candidate_is_adopted_and_a_worse_refused(
    db: Database, fake_trial: tuple[list[str], Path]
) -> None:
    manager = FakeManager()
    engine = make_engine(db, fake_trial[0], manager=manager)
    await engine.async_start()
    try:
        assert engine.active is not None and engine.active.origin == "config" and engine.active.settings["threads"] == 1
        assert manager.applied[0]["threads"] == 1  # the active settings are applied at start
        assert engine.job().name == "evolution" and engine.job().due(0.0)
        better = await engine.async_trial({**engine.active.settings, "threads": 2})
        assert better["outcome"] == "adopted", better
        assert better["p_value"] <= 0.02  # 4 runs each, fully separated: 1/70 exact (a rounding tie: normal approximation)
        assert engine.active.settings["threads"] == 2 and engine.active.previous is not None
        assert manager.applied[-1]["threads"] == 2 and manager.loads == 2
        m = engine.active.measurements
        assert m["trial"] == better["trial"] and len(m["samples"]) == 4 and len(m["baseline_samples"]) == 4
        # request rate: 32 tokens after 40 prompt tokens at 80/s and 32 decoded at 20/s = 32 / 2.1 s
        assert 14.5 < m["tokens_per_s"] < 16 and 19.9 < m["decode_tokens_per_s"] < 20.3 and m["peak_rss_mb"] == 50.0
        worse = await engine.async_trial({**engine.active.settings, "threads": 1})
        assert worse["outcome"] == "refused" and "not faster" in worse["reason"]
        assert engine.active.settings["threads"] == 2
        history = await engine.async_history()
        assert history["active"]["id"] == engine.active.id
        assert [v["origin"] for v in history["versions"]] == ["local", "config"]
        assert [t["outcome"] for t in history["trials"]] == ["refused", "adopted"]
        assert history["trials"][1]["version"] == engine.active.id
        assert history["trials"][0]["changes"] == {"threads": [2, 1]}
        assert history["trials"][0]["samples"]["tokens_per_s"] and history["trials"][0]["baseline"]["version"] == engine.active.id
        json.dumps(history)  # JSON-able as the API sends it
    finally:
        await engine.async_stop()


async def test_memory_and_gain_rules_refuse(db: Database, fake_trial: tuple[list[str], Path]) -> None:
    engine = make_engine(db, fake_trial[0], config=EvolutionConfig(trial_repeats=4, min_gain=0.5))
    await engine.async_start()
    try:
        assert engine.active is not None
        small = await engine.async_trial({**engine.active.settings, "n_batch": 128, "n_ubatch": 64})
        assert small["outcome"] == "refused" and "below the 50.0% required" in small["reason"]
        huge = await engine.async_trial({**engine.active.settings, "threads": 2, "n_ubatch": 9})
        assert huge["outcome"] == "refused" and "memory budget" in huge["reason"]
        assert engine.active.origin == "config"
    finally:
        await engine.async_stop()


@pytest.mark.parametrize(
    ("n_ubatch", "needle"),
    [(3, "bogus setting"), (5, "timed out"), (7, "SIGSEGV")],
)
async def test_failing_trials_are_recorded_failed(db: Database, fake_trial: tuple[list[str], Path], n_ubatch: int, needle: str) -> None:
    engine = make_engine(db, fake_trial[0], config=EvolutionConfig(trial_repeats=3, trial_timeout_s=1.5))
    await engine.async_start()
    try:
        assert engine.active is not None
        result = await engine.async_trial({**engine.active.settings, "n_ubatch": n_ubatch})
        assert result["outcome"] == "failed" and needle in result["reason"] and "candidate run 1" in result["reason"]
        assert engine.active.origin == "config"
        for pid in await pids_in(fake_trial[1]):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # every trial process is gone (reaped)
        rows = await db.async_fetchall("SELECT outcome, reason FROM evolution_trials")
        assert [r["outcome"] for r in rows] == ["failed"]
    finally:
        await engine.async_stop()


async def test_cancellation_kills_the_trial_process(db: Database, fake_trial: tuple[list[str], Path]) -> None:
    engine = make_engine(db, fake_trial[0], config=EvolutionConfig(trial_repeats=3, trial_timeout_s=60.0))
    await engine.async_start()
    try:
        assert engine.active is not None
        task = asyncio.ensure_future(engine.async_trial({**engine.active.settings, "n_ubatch": 5}))
        for _ in range(200):  # the baseline run finishes, then the hanging candidate starts
            if len(await pids_in(fake_trial[1])) >= 2:
                break
            await asyncio.sleep(0.05)
        pids = await pids_in(fake_trial[1])
        assert len(pids) == 2
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert await db.async_fetchall("SELECT id FROM evolution_trials") == []  # nothing recorded: retried later
    finally:
        await engine.async_stop()


async def test_rollback_and_nothing_to_roll_back(db: Database, fake_trial: tuple[list[str], Path]) -> None:
    manager = FakeManager()
    engine = make_engine(db, fake_trial[0], manager=manager)
    await engine.async_start()
    try:
        assert engine.active is not None
        first = engine.active
        with pytest.raises(ValidationError) as err:
            await engine.async_rollback()
        assert err.value.status == 409
        adopted = await engine.async_trial({**first.settings, "threads": 2})
        assert adopted["outcome"] == "adopted"
        restored = await engine.async_rollback()
        assert restored["settings"] == first.settings and restored["origin"] == "rollback"
        assert f"rollback of {adopted['version']}" in restored["reason"]
        assert engine.active.settings == first.settings and manager.applied[-1]["threads"] == 1
        with pytest.raises(ValidationError):
            await engine.async_rollback()  # back at the first version's line
        # the rolled-back settings are not trialled again soon
        assert canonical({**first.settings, "threads": 2}) in engine._recent
        active_rows = await db.async_fetchall("SELECT id FROM evolution_versions WHERE active = 1")
        assert [r["id"] for r in active_rows] == [engine.active.id]
    finally:
        await engine.async_stop()


async def test_restart_keeps_the_adopted_version_and_a_config_change_starts_a_new_line(
    db: Database, fake_trial: tuple[list[str], Path]
) -> None:
    engine = make_engine(db, fake_trial[0])
    await engine.async_start()
    assert engine.active is not None
    await engine.async_trial({**engine.active.settings, "threads": 2})
    adopted = engine.active.id
    await engine.async_stop()
    manager = FakeManager()
    again = make_engine(db, fake_trial[0], manager=manager)
    await again.async_start()
    assert again.active is not None and again.active.id == adopted
    assert manager.applied == [{k: v for k, v in again.active.settings.items() if k in evo.MANAGER_KEYS}]
    await again.async_stop()
    changed = make_engine(db, fake_trial[0], inference=InferenceConfig(threads=1, n_ctx=1024, n_batch=64, n_ubatch=64, slots=1))
    await changed.async_start()
    assert changed.active is not None and changed.active.origin == "config" and changed.active.previous is None
    assert "configuration changed" in changed.active.reason
    await changed.async_stop()


async def test_production_regression_rolls_back_by_itself(db: Database, fake_trial: tuple[list[str], Path]) -> None:
    manager = FakeManager()
    engine = make_engine(db, fake_trial[0], config=EvolutionConfig(trial_repeats=4, regression_margin=0.2), manager=manager)
    await engine.async_start()
    try:
        assert engine.active is not None
        await engine.async_trial({**engine.active.settings, "threads": 2})
        adopted = engine.active
        ref = engine.reference_tokens_per_s()
        assert ref is not None and ref > 19
        for _ in range(30):
            engine.observe_production(ref)  # as measured: no rollback
        await asyncio.sleep(0)
        assert engine.active is adopted
        for _ in range(60):
            engine.observe_production(ref * 0.1, tokens=2)  # too short to judge: ignored
            engine.observe_production(float("nan"))  # ignored
        manager.thermal_hot = True
        for _ in range(60):
            engine.observe_production(ref * 0.4, tokens=64)  # slow on purpose while hot: ignored
        await asyncio.sleep(0.05)
        assert engine.active is adopted
        manager.thermal_hot = False
        for _ in range(60):
            engine.observe_production(ref * 0.4, tokens=64, model="another:q8_0")  # not the tuned model: ignored
        await asyncio.sleep(0.05)
        assert engine.active is adopted
        for _ in range(60):
            engine.observe_production(ref * 0.5, tokens=64, model="m")
        for _ in range(100):
            if engine.active is not adopted:
                break
            await asyncio.sleep(0.01)
        assert engine.active is not adopted and engine.active.origin == "rollback"
        assert "production regression" in engine.active.reason
        assert engine.active.settings["threads"] == 1
    finally:
        await engine.async_stop()


async def test_job_runs_one_candidate_and_skips_when_all_were_tried(db: Database, fake_trial: tuple[list[str], Path]) -> None:
    engine = make_engine(db, fake_trial[0], config=EvolutionConfig(trial_repeats=3))
    await engine.async_start()
    try:
        job = engine.job()
        first = await job.async_run()
        assert first["trial"] == 1 and first["origin"] == "local"
        assert engine.active is not None
        engine._recent.update({canonical(c): engine._clock() for c in engine.neighbours()})
        assert not job.due(0.0)
        assert "skipped" in await job.async_run()
    finally:
        await engine.async_stop()


def signed(ident: NodeIdentity, settings: dict[str, Any], *, board: str = "test-board", model: str = "m", sha: str = "") -> dict[str, Any]:
    return sign_payload(
        ident,
        tuning_payload(
            board=board,
            model=model,
            model_sha256=sha,
            llama_cpp="0.3",
            settings=settings,
            tokens_per_s=20.0,
            node=ident.node_id,
            public_key=ident.public_key,
        ),
    )


@pytest.fixture
def model_file(tmp_path: Path) -> tuple[Path, str]:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights")
    return model, hashlib.sha256(b"weights").hexdigest()


async def test_peer_results_are_trialled_first_and_bad_ones_dropped(
    db: Database, fake_trial: tuple[list[str], Path], model_file: tuple[Path, str]
) -> None:
    model, sha = model_file
    own = NodeIdentity.generate()
    mesh = FakeMesh(own)
    engine = make_engine(db, fake_trial[0], model_path=model, mesh=mesh)
    await engine.async_start()
    try:
        assert engine.active is not None and len(mesh.listeners) == 1
        peer = NodeIdentity.generate()
        good = signed(peer, {**engine.active.settings, "threads": 2, "n_ctx": 4096}, sha=sha)
        tampered = {**good, "settings": {**good["settings"], "threads": 3}}
        assert engine.receive_peer_payload(tampered, sender=peer.node_id) == "bad_signature"
        assert engine.receive_peer_payload(signed(peer, good["settings"], board="other"), sender=peer.node_id) == "other_board"
        assert engine.receive_peer_payload(signed(peer, good["settings"], model="x"), sender=peer.node_id) == "other_model"
        assert engine.receive_peer_payload(good, sender="someone-else") == "sender_mismatch"
        assert engine.receive_peer_payload(signed(own, good["settings"], sha=sha)) == "own_result"
        # through the mesh's message listener: consumed, and queued
        assert mesh.listeners[0]({"from": peer.node_id, "user": "evolution", "message": good}) is True
        assert mesh.listeners[0]({"from": peer.node_id, "message": {"text": "hello"}}) is False  # not ours: the inbox keeps it
        assert engine.receive_peer_payload(good, sender=peer.node_id) == "duplicate"
        other_file = NodeIdentity.generate()
        assert engine.receive_peer_payload(signed(other_file, {**engine.active.settings, "flash_attn": True}, sha="00" * 32)) == "queued"
        assert engine.peer_payloads["bad_signature"] == 1 and engine.peer_payloads["queued"] == 2
        # the peer's result is trialled before any local candidate, never adopted unmeasured
        assert engine.active.settings["threads"] == 1
        result = await engine.job().async_run()
        assert result["origin"] == "peer:" + peer.node_id and result["outcome"] == "adopted"
        assert engine.active.origin == "peer:" + peer.node_id and engine.active.settings["n_ctx"] == 512  # our context kept
        history = await engine.async_history()
        assert history["active"]["note"] == f"from peer {peer.node_id}, confirmed here by trial {result['trial']}"
        assert history["trials"][0]["note"].startswith(f"from peer {peer.node_id}, confirmed here by trial")
        # the adopted version is signed with our identity
        assert history["active"]["measurements"]["node"] == own.node_id and history["active"]["measurements"]["signature"]
        dropped = await engine.job().async_run()
        assert "other_model_file" in dropped["skipped"]
    finally:
        await engine.async_stop()
    assert mesh.listeners == []


def test_payload_verification_uses_its_own_key(tmp_path: Path) -> None:
    ident = NodeIdentity.generate()
    payload = signed(ident, ACTIVE)
    raw = json.loads(json.dumps(payload))  # as it arrives over HTTP
    assert verify_payload(raw) is None


# ---------------------------------------------------------------------------------------- manager hooks


class FakeLib:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def llama_set_n_threads(self, ctx: object, threads: int, threads_batch: int) -> None:
        self.calls.append((threads, threads_batch))


class FakeLlama:
    def __init__(self) -> None:
        self.lib = FakeLib()
        self.ctx = object()


class FakeEngine:
    """A LlamaEngine stand-in: loads nothing, reports idle slots."""

    made: ClassVar[list[FakeEngine]] = []

    def __init__(self, *, model_path: Path, settings: EngineSettings, model_id: str) -> None:
        self.model_id = model_id
        self.settings = settings
        self.slots = settings.slots
        self._llama = FakeLlama()
        self.busy = 0
        self.stopped = False
        FakeEngine.made.append(self)

    async def async_start(self) -> None:
        return None

    async def async_stop(self) -> None:
        self.stopped = True

    def stats(self) -> EngineStats:
        return EngineStats(self.slots, self.busy, self.busy, 0, 0, 0, 0, 0.0, 0, 0.0, 0, 0, 0, 0, 1)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-Q4_1.gguf").write_bytes(tiny_model())
    return models


@pytest_asyncio.fixture
async def manager(models_dir: Path) -> AsyncIterator[InferenceManager]:
    models = models_dir
    FakeEngine.made.clear()
    mgr = InferenceManager(
        registry=ModelRegistry(models),
        default_model="tiny:q4_1",
        engine=EngineSettings(threads=4, slots=4),
        engine_factory=FakeEngine,  # type: ignore[arg-type]
        memory_budget_mb=1000,
    )
    await mgr.async_start()
    yield mgr
    await mgr.async_stop()


async def test_apply_overrides_reloads_idle_models_and_waits_for_busy_ones(manager: InferenceManager) -> None:
    first = FakeEngine.made[0]
    assert first.settings.threads == 4
    unloaded = await manager.async_apply_overrides({"threads": 2, "n_ubatch": 128})
    assert unloaded == ["tiny:q4_1"] and first.stopped
    async with manager.async_use("tiny:q4_1") as lease:
        engine = lease.engine
        assert engine.settings.threads == 2 and engine.settings.threads_batch == 2 and engine.settings.n_ubatch == 128
        # a busy model is never interrupted: it is marked and unloaded once idle
        assert await manager.async_apply_overrides({}) == []
        assert not engine.stopped  # type: ignore[attr-defined]
    for _ in range(100):
        if engine.stopped:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert engine.stopped  # type: ignore[attr-defined]
    async with manager.async_use("tiny:q4_1") as lease:
        assert lease.engine.settings.threads == 4  # the configured settings again
    for bad in ({"n_ctx": 1}, {"threads": "2"}, {"threads": 0}, {"kv_cache_type": "nope"}, {"flash_attn": 1}):
        with pytest.raises(ValidationError):
            await manager.async_apply_overrides(bad)


async def test_thermal_limit_halves_slots_and_threads(manager: InferenceManager) -> None:
    async with manager.async_use("tiny:q4_1") as lease:
        engine: Any = lease.engine
    manager.set_thermal_limit(True)
    assert engine._llama.lib.calls == [(2, 2)]  # idle: set at once
    entered = 0
    release = asyncio.Event()

    async def hold() -> None:
        nonlocal entered
        async with manager.async_use("tiny:q4_1"):
            entered += 1
            await release.wait()

    async with asyncio.TaskGroup() as tg:
        for _ in range(3):
            tg.create_task(hold())
        await asyncio.sleep(0.1)
        assert entered == 2  # half of 4 slots
        manager.set_thermal_limit(False)
        await asyncio.sleep(0.05)
        assert entered == 3  # cool again: all slots
        release.set()
    async with manager.async_use("tiny:q4_1"):
        pass
    assert engine._llama.lib.calls[-1] == (4, 4)  # full threads once idle again


async def test_thermal_admission_times_out_with_503(manager: InferenceManager, monkeypatch: pytest.MonkeyPatch) -> None:
    from mongarsd.inference import manager as manager_mod

    monkeypatch.setattr(manager_mod, "LOAD_WAIT_S", 0.2)
    manager.set_thermal_limit(True)
    async with manager.async_use("tiny:q4_1"), manager.async_use("tiny:q4_1"):
        with pytest.raises(OverloadedError) as err:
            async with manager.async_use("tiny:q4_1"):
                pass
        assert err.value.status == 503 and "hot" in str(err.value)


# ---------------------------------------------------------------------------------------- mesh hook


async def test_mesh_message_listener_consumes_tuning_payloads(db: Database, fake_trial: tuple[list[str], Path]) -> None:
    from mongarsd.config import Config
    from mongarsd.mesh.service import MeshService

    mesh = MeshService(config=Config(), board=BOARD)
    mesh.identity = NodeIdentity.generate()  # what async_start loads from the state folder
    engine = make_engine(db, fake_trial[0], mesh=mesh)
    await engine.async_start()
    try:
        assert engine.active is not None
        peer = NodeIdentity.generate()
        payload = signed(peer, {**engine.active.settings, "threads": 2})
        mesh.receive_message(sender=peer.node_id, user="evolution", message=payload)
        assert list(mesh.inbox) == [] and mesh.counters["messages_consumed"] == 1
        assert engine.peer_payloads["queued"] == 1 and engine.job().due(0.0)
        mesh.receive_message(sender=peer.node_id, user="alice", message={"text": "hello"})
        assert [item["message"] for item in mesh.inbox] == [{"text": "hello"}]
        forged = {**payload, "settings": {**payload["settings"], "threads": 3}}
        mesh.receive_message(sender=peer.node_id, user="evolution", message=forged)
        assert engine.peer_payloads["bad_signature"] == 1 and len(mesh.inbox) == 1  # dropped, counted, not in the inbox
    finally:
        await engine.async_stop()
    mesh.receive_message(sender=peer.node_id, user="evolution", message=payload)
    assert len(mesh.inbox) == 2  # the engine stopped: its listener is gone
