"""Evolution Engine with the real model: sandboxed trials, adoption, rollback, failures, peers; and its routes.

Trials are real subprocesses running SmolLM2-135M with a tiny workload. The board running the
tests may be shared with other work; a setting a few tenths faster can then lose one trial to a
stall, so the test of a better setting allows it a second trial.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio
from aiohttp import web

from mongarsd.api import evolution as evolution_api
from mongarsd.api.app import AppContext, create_app
from mongarsd.board import BoardInfo
from mongarsd.config import AuthConfig, Config, EvolutionConfig, InferenceConfig, LoadedConfig
from mongarsd.inference.manager import InferenceManager
from mongarsd.inference.models import ModelRegistry
from mongarsd.inference.sampling import GenerationParams
from mongarsd.maintenance import evolution as evo
from mongarsd.maintenance.evolution import EvolutionEngine, sign_payload, tuning_payload
from mongarsd.memory.db import Database
from mongarsd.memory.tokens import TokenStore
from mongarsd.mesh.identity import NodeIdentity
from mongarsd.metrics import Metrics
from tests.conftest import DEFAULT_LLM, MODELS_DIR, requires_models
from tests.unit.test_evolution import FAKE_TRIAL

MODEL_ID = "smollm2-135m-instruct:q4_1"
BOARD = BoardInfo(profile="test-board", model="Test Board", arch="x86_64", cores_logical=2, cores_physical=2, ram_mb=4096)
needs_model = requires_models(DEFAULT_LLM)


def inference(**kw: Any) -> InferenceConfig:
    values: dict[str, Any] = {
        "default_model": MODEL_ID,
        "threads": 1,
        "n_ctx": 256,
        "n_batch": 32,
        "n_ubatch": 32,
        "slots": 1,
        "keep_alive_s": -1,
        "stream_interval_ms": 0,
    }
    values.update(kw)
    return InferenceConfig(**values)


@dataclass
class Stack:
    db: Database
    manager: InferenceManager
    engine: EvolutionEngine


@pytest.fixture(autouse=True)
def tiny_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 tokens after the fixed prompt, two measured runs per process: a few seconds per trial process
    monkeypatch.setattr(evo, "TRIAL_TOKENS", 8)
    monkeypatch.setattr(evo, "TRIAL_RUNS_PER_PROCESS", 2)


@pytest_asyncio.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Stack] = []

    async def make(*, config: EvolutionConfig | None = None, inference_cfg: InferenceConfig | None = None, **kw: Any) -> Stack:
        section = inference_cfg or inference()
        db = Database(path=tmp_path / f"state{len(made)}.db")
        await db.async_start()
        manager = InferenceManager.from_config(section, registry=ModelRegistry(MODELS_DIR), board=BOARD, metrics=None)
        engine = EvolutionEngine(
            config=config or EvolutionConfig(trial_repeats=4, trial_timeout_s=120.0),
            inference=section,
            db=db,
            board=BOARD,
            model_id=MODEL_ID,
            manager=manager,
            **kw,
        )
        await engine.async_start()  # before the manager, as the daemon does: the preload uses the active settings
        await manager.async_start()
        stack = Stack(db, manager, engine)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        await stack.engine.async_stop()
        await stack.manager.async_stop()
        await stack.db.async_stop()


async def generate(manager: InferenceManager) -> str:
    """Prove the daemon's own engine still serves: a short greedy generation."""
    parts: list[str] = []
    async with manager.async_use(MODEL_ID) as lease:
        tokens = await lease.engine.async_tokenize("The capital of France is", True, False)
        async for event in lease.engine.async_generate(tokens, GenerationParams(max_tokens=6, temperature=0.0)):
            parts.append(event.text)
    return "".join(parts)


def loaded_settings(manager: InferenceManager) -> Any:
    return manager._models[MODEL_ID].engine.settings


@needs_model
async def test_a_worse_setting_is_never_adopted(make_stack: Any) -> None:
    stack = await make_stack(config=EvolutionConfig(trial_repeats=3, trial_timeout_s=120.0))
    engine: EvolutionEngine = stack.engine
    assert engine.active is not None
    first = engine.active
    result = await engine.async_trial({**first.settings, "n_ubatch": 1})  # one token per prompt decode
    assert result["outcome"] == "refused", result
    assert engine.active is first and loaded_settings(stack.manager).n_ubatch == 32
    history = await engine.async_history()
    trial = history["trials"][0]
    assert trial["changes"] == {"n_ubatch": [32, 1]}
    assert len(trial["samples"]["tokens_per_s"]) == 3 and len(trial["baseline"]["tokens_per_s"]) == 3
    assert trial["samples"]["peak_rss_mb"] > 0 and trial["samples"]["llama_cpp"]
    assert [v["id"] for v in history["versions"]] == [first.id]
    assert await generate(stack.manager)


@needs_model
async def test_a_better_setting_is_adopted_with_its_measurements_and_rollback_restores(make_stack: Any) -> None:
    stack = await make_stack()  # one thread; two are a real gain on any board of two or more cores
    engine: EvolutionEngine = stack.engine
    assert engine.active is not None
    first = engine.active
    assert loaded_settings(stack.manager).threads == 1
    # n_ubatch on the 37-token trial prompt is within the noise of a tiny model; a second thread is not
    better = {**first.settings, "threads": 2}
    result = await engine.async_trial(better)
    if result["outcome"] != "adopted":  # a stall of the shared board: one more trial
        result = await engine.async_trial(better)
    assert result["outcome"] == "adopted", result
    version = engine.active
    assert version.id == result["version"] and version.settings["threads"] == 2 and version.previous == first.id
    m = version.measurements
    assert m["tokens_per_s"] > m["baseline_tokens_per_s"] > 0 and m["gain"] >= 0.03 and m["p_value"] <= 0.05
    assert len(m["samples"]) == 4 and len(m["baseline_samples"]) == 4 and m["peak_rss_mb"] > 0 and m["decode_tokens_per_s"] > 0
    # the daemon's engine was reloaded with the adopted settings, and serves
    assert stack.manager.engine_settings.threads == 2 and loaded_settings(stack.manager).threads == 2
    assert await generate(stack.manager)
    history = await engine.async_history()
    assert history["active"]["id"] == version.id and "adopted" in history["active"]["reason"]
    restored = await engine.async_rollback(reason="test")
    assert restored["settings"] == first.settings and f"rollback of {version.id}" in restored["reason"]
    assert loaded_settings(stack.manager).threads == 1
    assert await generate(stack.manager)


@needs_model
async def test_failed_trials_are_recorded_and_never_harm_the_daemon(make_stack: Any) -> None:
    stack = await make_stack(config=EvolutionConfig(trial_repeats=3, trial_timeout_s=0.3))
    engine: EvolutionEngine = stack.engine
    assert engine.active is not None
    timed_out = await engine.async_trial({**engine.active.settings, "n_ubatch": 16})
    assert timed_out["outcome"] == "failed" and "timed out" in timed_out["reason"]
    assert await generate(stack.manager)

    bogus = await make_stack(config=EvolutionConfig(trial_repeats=3, trial_timeout_s=60.0))
    # 256 slots of the model's whole context: a KV cache no memory holds, the trial cannot run it
    crashed = await bogus.engine.async_trial({**bogus.engine.active.settings, "n_ctx": 8192, "slots": 256})  # type: ignore[union-attr]
    assert crashed["outcome"] == "failed" and "candidate run 1 failed" in crashed["reason"], crashed
    assert await generate(bogus.manager)

    starved = await make_stack(config=EvolutionConfig(trial_repeats=3, trial_timeout_s=60.0, trial_memory_mb=64))
    oom = await starved.engine.async_trial({**starved.engine.active.settings, "n_ubatch": 16})  # type: ignore[union-attr]
    assert oom["outcome"] == "failed" and "baseline run 1 failed" in oom["reason"], oom
    assert await generate(starved.manager)
    rows = await starved.db.async_fetchall("SELECT outcome FROM evolution_trials")
    assert [r["outcome"] for r in rows] == ["failed"]
    assert starved.engine.active is not None and starved.engine.active.origin == "config"


async def _children() -> list[psutil.Process]:
    return await asyncio.to_thread(lambda: psutil.Process().children(recursive=True))


@needs_model
async def test_cancellation_kills_the_trial_process(make_stack: Any) -> None:
    stack = await make_stack(config=EvolutionConfig(trial_repeats=3, trial_timeout_s=120.0))
    before = {p.pid for p in await _children()}
    task = asyncio.ensure_future(stack.engine.job().async_run())  # what Sommeil runs, and cancels on a request
    trial_pids: set[int] = set()
    for _ in range(400):
        trial_pids = {p.pid for p in await _children()} - before
        if trial_pids:
            break
        await asyncio.sleep(0.02)
    assert trial_pids, "no trial process started"
    await asyncio.sleep(0.3)  # it is loading the model now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    left = {p.pid for p in await _children()} - before
    assert left == set()
    for pid in trial_pids:
        assert not await asyncio.to_thread(psutil.pid_exists, pid)
    assert await stack.db.async_fetchall("SELECT id FROM evolution_trials") == []  # retried in a later idle period
    assert stack.engine.job().due(0.0)
    assert await generate(stack.manager)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_model
async def test_a_peer_result_is_trialled_before_adoption_and_a_bad_signature_dropped(make_stack: Any) -> None:
    stack = await make_stack(inference_cfg=inference(n_ubatch=1))
    engine: EvolutionEngine = stack.engine
    assert engine.active is not None
    first = engine.active
    peer = NodeIdentity.generate()
    sha = await asyncio.to_thread(_sha256, DEFAULT_LLM)
    payload = sign_payload(
        peer,
        tuning_payload(
            board=BOARD.profile,
            model=MODEL_ID,
            model_sha256=sha,
            llama_cpp="0.3",
            settings={**first.settings, "n_ubatch": 32, "n_ctx": 4096},
            tokens_per_s=30.0,
            node=peer.node_id,
            public_key=peer.public_key,
        ),
    )
    forged = {**payload, "settings": {**payload["settings"], "threads": 2}}
    assert engine.receive_peer_payload(forged, sender=peer.node_id) == "bad_signature"
    other = sign_payload(peer, {k: v for k, v in {**payload, "board": "rpi5"}.items() if k != "sig"})
    assert engine.receive_peer_payload(other, sender=peer.node_id) == "other_board"
    assert engine.receive_peer_payload(payload, sender=peer.node_id) == "queued"
    assert engine.active is first and loaded_settings(stack.manager).n_ubatch == 1  # never adopted unmeasured
    result = await engine.job().async_run()
    assert result["origin"] == "peer:" + peer.node_id and result["outcome"] in ("adopted", "refused"), result
    history = await engine.async_history()
    trial = history["trials"][0]
    assert trial["origin"] == "peer:" + peer.node_id and trial["changes"] == {"n_ubatch": [1, 32]}
    if result["outcome"] == "adopted":
        assert trial["note"] == f"from peer {peer.node_id}, confirmed here by trial {trial['id']}"
        assert history["active"]["note"] == trial["note"] and engine.active.settings["n_ctx"] == 256  # our context kept
        assert loaded_settings(stack.manager).n_ubatch == 32
    else:
        assert trial["note"] == f"from peer {peer.node_id}, refused here by trial {trial['id']}"
        assert engine.active is first
    assert history["peer_payloads"] == {"bad_signature": 1, "other_board": 1, "queued": 1}


@needs_model
async def test_thermal_limit_halves_the_threads_of_a_real_engine(make_stack: Any) -> None:
    stack = await make_stack(inference_cfg=inference(threads=2, slots=2))
    manager = stack.manager
    llama = manager._models[MODEL_ID].engine._llama
    assert llama.lib.llama_n_threads(llama.ctx) == 2
    manager.set_thermal_limit(True)
    assert llama.lib.llama_n_threads(llama.ctx) == 1 and llama.lib.llama_n_threads_batch(llama.ctx) == 1
    assert await generate(manager)
    manager.set_thermal_limit(False)
    assert llama.lib.llama_n_threads(llama.ctx) == 2
    assert await generate(manager)


# ---------------------------------------------------------------------------------------- routes


@pytest.fixture
def fake_trial(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_trial.py"
    script.write_text(FAKE_TRIAL)
    return [sys.executable, str(script)]


async def test_routes(tmp_path: Path, fake_trial: list[str]) -> None:
    db = Database(path=tmp_path / "api.db")
    await db.async_start()
    engine = EvolutionEngine(
        config=EvolutionConfig(trial_repeats=3),
        inference=inference(),
        db=db,
        board=BOARD,
        model_id=MODEL_ID,
        model_path=tmp_path / "model.gguf",
        trial_command=fake_trial,
    )
    await engine.async_start()
    tokens = TokenStore(db=db)
    admin, _ = await tokens.async_create("root", "admin")
    user, _ = await tokens.async_create("alice", "user")
    cfg = Config(auth=AuthConfig(loopback_trusted=False, rate_limit_rps=1000.0, rate_limit_burst=1000))
    ctx = AppContext(loaded=LoadedConfig(cfg, {}, "generic"), board=BOARD, metrics=Metrics(), db=db, tokens=tokens, evolution=engine)
    bare = AppContext(loaded=LoadedConfig(cfg, {}, "generic"), board=BOARD, metrics=Metrics(), db=db, tokens=tokens)
    runners = [web.AppRunner(create_app(c, [evolution_api.setup_routes])) for c in (ctx, bare)]
    urls = []
    for c, runner in zip((ctx, bare), runners, strict=True):
        c.state.ready = True
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")  # type: ignore[union-attr]
    url, bare_url = urls

    async def call(
        http: aiohttp.ClientSession, method: str, path: str, token: str | None, body: Any = None, *, base: str = url
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with http.request(method, base + path, headers=headers, json=body) as resp:
            return resp.status, await resp.json()

    try:
        async with aiohttp.ClientSession() as http:
            assert (await call(http, "GET", "/api/v1/evolution", None))[0] == 401
            status, doc = await call(http, "GET", "/api/v1/evolution", user)
            assert status == 200 and doc["active"]["origin"] == "config" and doc["trials"] == [] and doc["model"] == MODEL_ID
            status, doc = await call(http, "GET", "/api/v1/evolution?trials=0", user)
            assert status == 400 and doc["error"]["param"] == "trials"
            status, doc = await call(http, "POST", "/api/v1/evolution/rollback", user)
            assert status == 403 and doc["error"]["code"] == "forbidden"
            status, doc = await call(http, "POST", "/api/v1/evolution/rollback", admin)
            assert status == 409 and doc["error"]["code"] == "conflict" and "nothing to roll back to" in doc["error"]["message"]
            assert engine.active is not None
            adopted = await engine.async_trial({**engine.active.settings, "threads": 2})
            assert adopted["outcome"] == "adopted"
            status, doc = await call(http, "GET", "/api/v1/evolution", user)
            assert doc["active"]["id"] == adopted["version"] and doc["trials"][0]["outcome"] == "adopted"
            status, doc = await call(http, "POST", "/api/v1/evolution/rollback", admin, {"reason": 7})
            assert status == 400 and doc["error"]["param"] == "reason"
            status, doc = await call(http, "POST", "/api/v1/evolution/rollback", admin, {"reason": "slower in use"})
            assert status == 200 and doc["rolled_back"] is True and doc["active"]["settings"]["threads"] == 1
            assert "slower in use (by root)" in doc["active"]["reason"]
            status, doc = await call(http, "GET", "/api/v1/evolution", user, base=bare_url)
            assert status == 200 and doc["enabled"] is False and "evolution.enabled" in doc["reason"]  # a report, never a 5xx
            status, doc = await call(http, "POST", "/api/v1/evolution/rollback", admin, base=bare_url)
            assert status == 409 and "not enabled" in doc["error"]["message"]
    finally:
        for runner in runners:
            await runner.cleanup()
        await engine.async_stop()
        await db.async_stop()
