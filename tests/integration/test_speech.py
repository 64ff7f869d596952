"""Bouche's voice end to end: real espeak-ng child processes, real WAV files read back with `wave`,
and POST /v1/audio/speech through a real aiohttp server on 127.0.0.1 and the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import stat
import sys
import time
import wave
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from aiohttp import web

from mongarsd.api import speech
from mongarsd.api.app import AppContext, create_app
from mongarsd.api.auth import LOCAL_ADMIN_USER
from mongarsd.board import BoardInfo
from mongarsd.cognition import voice as voice_mod
from mongarsd.cognition.voice import ESPEAK_SAMPLE_RATE_HZ, Voice
from mongarsd.config import AuthConfig, Config, LoadedConfig
from mongarsd.errors import InferenceError, OverloadedError, UnavailableError, ValidationError
from mongarsd.memory.db import Database
from mongarsd.memory.profiles import ProfileStore
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics
from tests.conftest import in_ci

ESPEAK_MISSING = shutil.which("espeak-ng") is None
if ESPEAK_MISSING and in_ci():
    pytest.fail("espeak-ng is not installed (scripts/install-test-deps.sh installs it); under CI these tests must run", pytrace=False)
pytestmark = [
    pytest.mark.skipif(ESPEAK_MISSING, reason="espeak-ng is not installed"),
    # The foundation's middlewares key requests with plain strings; not this module's to fix.
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. Yesterday, Alice and Bob walked to the old market near the river; "
    "they bought apples, bread, and cheese. Then they went home, cooked dinner, and talked about their plans for the summer holidays."
)
ENGLISH_WORDS = len(ENGLISH.split())  # 42
LONG = " ".join(f"Paragraph {i} tells a long and winding story, with many words, so that synthesis takes a while." for i in range(40))
MAX_LOOP_LAG_S = 0.050
TICK_S = 0.005
WAIT_S = 5.0
POLL_S = 0.02


def wav_info(data: bytes) -> tuple[int, int, int, int, float]:
    """(channels, sample width, rate, frames, seconds) of a WAV file, as Python's wave module reads it."""
    with wave.open(io.BytesIO(data)) as w:
        frames = w.getnframes()
        assert len(w.readframes(frames)) == frames * w.getsampwidth() * w.getnchannels()  # the header's count is the truth
        return w.getnchannels(), w.getsampwidth(), w.getframerate(), frames, frames / w.getframerate()


async def synth(v: Voice, text: str, *, voice: str | None = "alloy", language: str | None = None, speed: float = 1.0, fmt: str = "wav") -> list[bytes]:  # fmt: skip
    async with aclosing(v.async_synthesize(text, voice=voice, language=language, speed=speed, fmt=fmt)) as chunks:
        return [c async for c in chunks]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # exited and reaped: no zombie either
    return True


async def wait_gone(v: Voice, pids: list[int]) -> None:
    deadline = time.monotonic() + WAIT_S
    for _ in range(int(WAIT_S / POLL_S)):  # bounded polling: the kernel has no event for "reaped"
        if not (v.engine_pids() or any(alive(p) for p in pids)) or time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_S)
    assert v.engine_pids() == []
    assert not [p for p in pids if alive(p)]


class LagMeter:
    """Measure how late a ticker task wakes up while something else runs on the loop."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _async_run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(TICK_S)
            self.max_lag = max(self.max_lag, loop.time() - t0 - TICK_S)
            self.ticks += 1

    async def __aenter__(self) -> LagMeter:
        self._task = asyncio.create_task(self._async_run(), name="lag-meter")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest_asyncio.fixture
async def voice() -> AsyncIterator[Voice]:
    v = Voice()
    await v.async_start()
    assert v.available, v.unavailable_reason
    yield v
    await v.async_stop()


# ---- the voice service ---------------------------------------------------------------------


async def test_start_reports_the_engine_version_and_voices(voice: Voice) -> None:
    st = voice.status()
    assert st["available"] and st["engine"] == "espeak-ng" and st["version"] and st["voices"] > 10
    assert voice.sample_rate_hz == ESPEAK_SAMPLE_RATE_HZ
    assert {"en-us", "fr-fr"} <= set(voice.catalog.languages)


async def test_wav_duration_matches_the_words_at_normal_and_double_speed(voice: Voice) -> None:
    normal = await synth(voice, ENGLISH, speed=1.0)
    fast = await synth(voice, ENGLISH, speed=2.0)
    assert len(normal) == 1 and len(fast) == 1  # one complete file each
    ch, width, rate, frames, secs = wav_info(normal[0])
    assert (ch, width, rate) == (1, 2, ESPEAK_SAMPLE_RATE_HZ) and frames > 0
    assert len(normal[0]) == 44 + frames * 2
    wpm = ENGLISH_WORDS / secs * 60
    assert 100 <= wpm <= 260, f"{wpm:.0f} words per minute at speed 1.0 ({secs:.2f} s)"
    fast_secs = wav_info(fast[0])[4]
    assert ENGLISH_WORDS / fast_secs * 60 >= 1.6 * wpm, (secs, fast_secs)
    slow = await synth(voice, ENGLISH, speed=0.5)
    assert wav_info(slow[0])[4] >= 1.6 * secs


async def test_pcm_streams_in_chunks_with_the_same_samples_as_wav(voice: Voice) -> None:
    chunks = await synth(voice, LONG, voice="en-us", fmt="pcm", speed=2.0)
    assert len(chunks) > 1
    pcm = b"".join(chunks)
    wav = (await synth(voice, LONG, voice="en-us", fmt="wav", speed=2.0))[0]
    frames = wav_info(wav)[3]
    assert len(pcm) == frames * 2 and wav[44:] == pcm  # espeak-ng is deterministic: the same samples
    assert not pcm.startswith(b"RIFF")  # raw samples, no header


async def test_accented_capitals_are_emphasised_through_ssml(voice: Voice) -> None:
    text = "Nous parlons à Émile et à Élodie de l'ÉCOLE Öberg"
    stressed = wav_info((await synth(voice, text, language="fr"))[0])[4]
    plain = wav_info((await synth(voice, text.lower(), language="fr"))[0])[4]
    # four emphasised words: espeak-ng says them longer (the original missed É, Ö as capitals)
    assert stressed - plain >= 0.2, (stressed, plain)
    # and a sentence break before an accented capital is a real pause
    split = wav_info((await synth(voice, "Il pleut. Étienne arrive", language="fr"))[0])[4]
    run_on = wav_info((await synth(voice, "Il pleut Étienne arrive", language="fr"))[0])[4]
    assert split - run_on >= 0.3, (split, run_on)


async def test_markup_in_the_text_is_spoken_not_obeyed(voice: Voice) -> None:
    hostile = 'Hello <break time="60s"/> world </speak><audio src="/etc/passwd"/> & goodbye'
    secs = wav_info((await synth(voice, hostile))[0])[4]
    assert 1.0 < secs < 20.0  # a 60 s break would have been obeyed if the text were not escaped


async def test_bad_requests_are_validation_errors(voice: Voice) -> None:
    for kw, param in (
        ({"voice": "nosuch"}, "voice"),
        ({"language": "xx"}, "language"),
        ({"speed": 9.0}, "speed"),
        ({"fmt": "mp3"}, "response_format"),
    ):
        with pytest.raises(ValidationError) as err:
            await synth(voice, "Hello.", **kw)
        assert err.value.param == param
    with pytest.raises(ValidationError, match="too long"):
        await synth(voice, "x" * (voice.max_input_chars + 1))
    assert voice.engine_pids() == []
    samples = {(s[4].get("format"), s[4].get("outcome")): s[3] for s in voice.metrics() if s[0] == "mongarsd_speech_requests_total"}
    assert samples[("wav", "invalid")] >= 4 and samples[("other", "invalid")] == 1


async def test_closing_the_stream_kills_and_reaps_the_engine(voice: Voice) -> None:
    gen = voice.async_synthesize(LONG, voice="en-us", language=None, speed=0.25, fmt="pcm")
    first = await anext(gen)
    assert first
    pids = voice.engine_pids()
    assert len(pids) == 1 and alive(pids[0])
    await gen.aclose()
    await wait_gone(voice, pids)
    outcomes = {s[4]["outcome"] for s in voice.metrics() if s[0] == "mongarsd_speech_requests_total"}
    assert "cancelled" in outcomes


async def test_cancelling_the_consumer_kills_the_engine(voice: Voice) -> None:
    started = asyncio.Event()
    pids: list[int] = []

    async def consume() -> None:
        async with aclosing(voice.async_synthesize(LONG, voice="en-us", language=None, speed=0.25, fmt="wav")) as chunks:
            async for _ in chunks:
                pass

    async def watch() -> None:
        for _ in range(int(WAIT_S / 0.001)):
            if voice.engine_pids():
                break
            await asyncio.sleep(0.001)
        pids.extend(voice.engine_pids())
        started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(watch(), WAIT_S)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_gone(voice, pids)


async def test_timeout_kills_the_engine_and_says_so() -> None:
    v = Voice(timeout_s=0.05)
    await v.async_start()
    try:
        with pytest.raises(InferenceError, match=r"did not finish within 0.05 s \(voice.timeout_s\)"):
            await synth(v, LONG, speed=0.25)
        assert v.engine_pids() == []
        assert any(s[4].get("outcome") == "timeout" for s in v.metrics())
    finally:
        await v.async_stop()


async def test_stop_kills_running_syntheses(voice: Voice) -> None:
    gen = voice.async_synthesize(LONG, voice="en-us", language=None, speed=0.25, fmt="pcm")
    await anext(gen)
    pids = voice.engine_pids()
    await voice.async_stop()
    await wait_gone(voice, pids)
    with pytest.raises((InferenceError, StopAsyncIteration)):  # the stream ends (or fails) once its engine is gone
        while True:
            await anext(gen)
    await gen.aclose()


async def test_too_many_syntheses_at_once_are_refused(voice: Voice) -> None:
    gens = [
        voice.async_synthesize(LONG, voice="en-us", language=None, speed=0.25, fmt="pcm")
        for _ in range(voice_mod.MAX_CONCURRENT_SYNTHESES + 1)
    ]
    try:
        for g in gens[:-1]:
            await anext(g)
        with pytest.raises(OverloadedError):
            await anext(gens[-1])
    finally:
        for g in gens:
            await g.aclose()
    assert voice.engine_pids() == []


async def test_the_loop_stays_responsive_while_synthesising(voice: Voice) -> None:
    async with LagMeter() as meter:
        wav = (await synth(voice, LONG, speed=0.5))[0]
        pcm = await synth(voice, LONG, voice="fable", speed=0.5, fmt="pcm")
    assert wav_info(wav)[4] > 60 and sum(map(len, pcm)) > 60 * ESPEAK_SAMPLE_RATE_HZ * 2
    assert meter.ticks > 10
    print(f"max loop lag {meter.max_lag * 1000:.1f} ms over {meter.ticks} ticks")
    assert meter.max_lag < MAX_LOOP_LAG_S, f"loop lag {meter.max_lag * 1000:.1f} ms"


async def test_speak_wav_for_the_native_chat(voice: Voice) -> None:
    answer = "**Bonjour** Émile! Voici la réponse.\n\n```\nls -l\n```\n" + "Une phrase de plus. " * 400
    data = await voice.async_speak_wav(answer, language="fr")
    ch, width, rate, _, secs = wav_info(data)
    assert (ch, width, rate) == (1, 2, ESPEAK_SAMPLE_RATE_HZ) and secs > 1.0  # cut to max_input_chars, never refused


async def test_missing_engine_is_reported_not_fatal(tmp_path: Path) -> None:
    v = Voice(espeak_path=str(tmp_path / "no-espeak-ng"))
    await v.async_start()  # never raises
    assert not v.available and "was not found" in (v.unavailable_reason or "")
    with pytest.raises(UnavailableError, match="install the espeak-ng package"):
        await synth(v, "Hello.")
    off = Voice(enabled=False)
    await off.async_start()
    with pytest.raises(UnavailableError, match=r"voice\.enabled = false"):
        await synth(off, "Hello.")
    assert [s[3] for s in v.metrics() if s[0] == "mongarsd_speech_available"] == [0.0]


# ---- piper (a neural voice): the plumbing, with a stand-in executable ------------------------

FAKE_PIPER = """#!{python}
# Stands in for piper: checks its arguments, reads the text, writes 0.1 s of raw s16le per word.
import sys
args = sys.argv[1:]
assert args[args.index("--model") + 1].endswith(".onnx") and "--output_raw" in args
scale = float(args[args.index("--length_scale") + 1])
words = sys.stdin.read().split()
sys.stdout.buffer.write(b"\\x01\\x00" * int(len(words) * 1600 * scale))
"""


def make_piper(tmp: Path, *, rate: int = 16000) -> tuple[Path, Path]:
    exe = tmp / "piper"
    exe.write_text(FAKE_PIPER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    model = tmp / "fr_FR-test-low.onnx"
    model.write_bytes(b"onnx")
    (tmp / "fr_FR-test-low.onnx.json").write_text(json.dumps({"audio": {"sample_rate": rate}}))
    return exe, model


async def test_piper_engine_streams_raw_audio_at_the_voice_rate(tmp_path: Path) -> None:
    exe, model = await asyncio.to_thread(make_piper, tmp_path)
    v = Voice(engine="piper", piper_path=str(exe), voice_model=str(model))
    await v.async_start()
    try:
        assert v.available and v.sample_rate_hz == 16000
        wav = (await synth(v, "**Un** deux trois quatre", voice="alloy", speed=2.0))[0]
        ch, width, rate, frames, _ = wav_info(wav)
        assert (ch, width, rate, frames) == (1, 2, 16000, 4 * 800)  # length_scale 1/speed halves it
        pcm = b"".join(await synth(v, "un deux", fmt="pcm"))
        assert len(pcm) == 2 * 1600 * 2
    finally:
        await v.async_stop()


async def test_piper_without_binary_or_model_is_unavailable_at_request_time(tmp_path: Path) -> None:
    exe, model = await asyncio.to_thread(make_piper, tmp_path)
    for piper_path, voice_model, why in (
        (tmp_path / "nope", str(model), "not on PATH"),
        (exe, "", r"needs voice\.voice_model"),
        (exe, str(tmp_path / "missing.onnx"), "does not exist"),
        (exe, str(tmp_path / "fr_FR-test-low.onnx.json"), r"must be a piper \.onnx voice"),
    ):
        v = Voice(engine="piper", piper_path=str(piper_path), voice_model=voice_model)
        await v.async_start()
        assert not v.available
        with pytest.raises(UnavailableError, match=why):
            await synth(v, "Bonjour.")
    await asyncio.to_thread((tmp_path / "fr_FR-test-low.onnx.json").write_text, "{}")
    v = Voice(engine="piper", piper_path=str(exe), voice_model=str(model))
    await v.async_start()
    with pytest.raises(UnavailableError, match="sample_rate"):
        await synth(v, "Bonjour.")


# ---- POST /v1/audio/speech ----------------------------------------------------------------


@dataclass
class Server:
    url: str
    voice: Voice | None
    db: Database
    ctx: AppContext


async def start_server(tmp: Path, voice: Voice | None) -> tuple[Server, web.AppRunner]:
    db = Database(path=tmp / "mongarsd.db")
    await db.async_start()
    board = BoardInfo(profile="generic", model="test", arch="x86_64", cores_logical=2, cores_physical=2)
    cfg = Config(auth=AuthConfig(rate_limit_rps=1000.0, rate_limit_burst=1000))
    ctx = AppContext(loaded=LoadedConfig(cfg, {}, "generic"), board=board, metrics=Metrics(), db=db, tokens=TokenStore(db=db), voice=voice)
    ctx.state.ready = True
    runner = web.AppRunner(create_app(ctx, [speech.setup_routes]))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Server(f"http://127.0.0.1:{port}", voice, db, ctx), runner


@pytest_asyncio.fixture
async def server(tmp_path: Path, voice: Voice) -> AsyncIterator[Server]:
    srv, runner = await start_server(tmp_path, voice)
    yield srv
    await runner.cleanup()
    await srv.db.async_stop()


async def post(srv: Server, body: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(srv.url + "/v1/audio/speech", json=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_openai_sdk_gets_a_playable_wav(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client, LagMeter() as meter:
        resp = await client.audio.speech.create(model="tts-1", voice="alloy", input=ENGLISH, response_format="wav")
        data = resp.read()
    assert resp.response.headers["content-type"] == "audio/wav"
    assert resp.response.headers[speech.MODEL_HEADER] == "tts-1" and resp.response.headers[speech.VOICE_HEADER] == "en-us+f3"
    ch, width, rate, frames, secs = wav_info(data)
    assert (ch, width, rate) == (1, 2, ESPEAK_SAMPLE_RATE_HZ)
    assert int(resp.response.headers["content-length"]) == len(data) == 44 + frames * 2
    assert 100 <= ENGLISH_WORDS / secs * 60 <= 260
    print(f"max loop lag {meter.max_lag * 1000:.1f} ms over {meter.ticks} ticks")
    assert meter.max_lag < MAX_LOOP_LAG_S, f"loop lag {meter.max_lag * 1000:.1f} ms"


async def test_openai_sdk_pcm_at_double_speed_and_voice_object(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        resp = await client.audio.speech.create(
            model="gpt-4o-mini-tts", voice="nova", input=ENGLISH, response_format="pcm", speed=2.0, instructions="Speak cheerfully."
        )
        pcm = resp.read()
    assert resp.response.headers["content-type"] == "audio/pcm"
    assert resp.response.headers[speech.RATE_HEADER] == str(ESPEAK_SAMPLE_RATE_HZ)
    secs = len(pcm) / (2 * ESPEAK_SAMPLE_RATE_HZ)
    assert ENGLISH_WORDS / secs * 60 > 260  # clearly faster than normal speech
    status, headers, body = await post(server, {"model": "espeak-ng", "voice": {"id": "echo"}, "input": "Hi there."})
    assert status == 200 and headers[speech.VOICE_HEADER] == "en-us+m3" and body.startswith(b"RIFF")


async def test_pcm_is_streamed_as_it_is_produced(server: Server) -> None:
    body = {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "pcm", "speed": 2.0}
    sizes: list[int] = []
    async with aiohttp.ClientSession() as s, s.post(server.url + "/v1/audio/speech", json=body) as resp:
        assert resp.status == 200 and resp.headers.get("Transfer-Encoding") == "chunked"
        async for chunk in resp.content.iter_any():
            sizes.append(len(chunk))
    assert len(sizes) > 1 and sum(sizes) % 2 == 0 and sum(sizes) > 10 * ESPEAK_SAMPLE_RATE_HZ * 2


async def test_long_speech_through_the_api_keeps_the_loop_responsive(server: Server) -> None:
    got: dict[str, bytes] = {}
    async with LagMeter() as meter:
        for fmt in ("wav", "pcm"):
            body = {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": fmt}
            async with aiohttp.ClientSession() as s, s.post(server.url + "/v1/audio/speech", json=body) as resp:
                assert resp.status == 200
                got[fmt] = await resp.read()
    frames = wav_info(got["wav"])[3]
    assert frames * 2 == len(got["pcm"]) and frames / ESPEAK_SAMPLE_RATE_HZ > 120  # minutes of speech, megabytes of audio
    print(f"max loop lag {meter.max_lag * 1000:.1f} ms over {meter.ticks} ticks")
    assert meter.max_lag < MAX_LOOP_LAG_S, f"loop lag {meter.max_lag * 1000:.1f} ms"


async def test_client_going_away_kills_the_engine(server: Server) -> None:
    assert server.voice is not None
    body = {"model": "tts-1", "voice": "alloy", "input": LONG, "response_format": "pcm", "speed": 0.25}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(server.url + "/v1/audio/speech", json=body)
        assert resp.status == 200
        await resp.content.readany()
        pids = server.voice.engine_pids()
        assert pids
        resp.close()  # drop the connection mid-stream
    await wait_gone(server.voice, pids)


async def test_language_comes_from_the_request_then_the_text_then_the_profile(server: Server) -> None:
    status, headers, _ = await post(server, {"model": "tts-1", "voice": "alloy", "input": "Bonjour.", "language": "fr-FR"})
    assert status == 200 and headers[speech.VOICE_HEADER] == "fr-fr+f3"
    status, headers, _ = await post(server, {"model": "tts-1", "voice": "alloy", "input": "Bonjour."})
    assert status == 200 and headers[speech.VOICE_HEADER] == "en-us+f3"  # no profile, no clear language: English
    french = "Je pense que le chat est sur la table."
    status, headers, _ = await post(server, {"model": "tts-1", "voice": "alloy", "input": french})
    assert status == 200 and headers[speech.VOICE_HEADER] == "fr-fr+f3"  # the text itself is clearly French
    await ProfileStore(db=server.db).async_update(LOCAL_ADMIN_USER, lambda m, p: ({**m, "languages": {"fr": 0.9, "en": 0.1}}, p))
    status, headers, body = await post(server, {"model": "tts-1", "voice": "shimmer", "input": "Ça va, Émile?"})
    assert status == 200 and headers[speech.VOICE_HEADER] == "fr-fr+f4" and wav_info(body)[3] > 0
    status, headers, _ = await post(server, {"model": "tts-1", "voice": "shimmer", "input": "Hello.", "language": "en"})
    assert status == 200 and headers[speech.VOICE_HEADER] == "en-us+f4"


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"voice": "alloy", "input": "Hi."}, 400, "model", "required"),
        ({"model": "tts-1", "voice": "alloy"}, 400, "input", "required"),
        ({"model": "tts-1", "input": "Hi."}, 400, "voice", "required"),
        ({"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "mp3"}, 400, "response_format", "wav, pcm"),
        ({"model": "tts-1", "voice": "alloy", "input": "Hi.", "response_format": "opus"}, 400, "response_format", "wav, pcm"),
        ({"model": "tts-1", "voice": "alloy", "input": "Hi.", "speed": 4.5}, 400, "speed", "between 0.25 and 4"),
        ({"model": "tts-1", "voice": "robot", "input": "Hi."}, 400, "voice", "unknown voice"),
        ({"model": "tts-1", "voice": "alloy", "input": "x" * 4097}, 400, "input", "too long"),
        ({"model": "tts-1", "voice": "alloy", "input": "Hi.", "language": "xx"}, 400, "language", "no espeak-ng voice"),
    ],
)
async def test_errors_use_the_openai_shape(server: Server, body: dict[str, Any], status: int, param: str, words: str) -> None:
    got, _, raw = await post(server, body)
    assert got == status, raw[:300]
    err = json.loads(raw)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"], err
    assert "code" in err


async def test_native_chat_speech_attachment(server: Server) -> None:
    answer = "Je pense que **le chat** est sur la table, Émile. " * 3
    audio = await speech.async_speech_attachment(server.ctx, "alice", answer)
    assert audio["format"] == "wav" and audio["language"] == "fr" and audio["sample_rate"] == ESPEAK_SAMPLE_RATE_HZ
    ch, width, rate, frames, secs = wav_info(base64.b64decode(audio["data"], validate=True))
    assert (ch, width, rate) == (1, 2, ESPEAK_SAMPLE_RATE_HZ) and frames > 0 and secs > 3
    nothing = await speech.async_speech_attachment(server.ctx, "alice", "```\n```")
    assert nothing["data"] is None and "nothing to speak" in nothing["error"]


async def test_no_voice_is_a_clear_503(tmp_path: Path) -> None:
    srv, runner = await start_server(tmp_path, None)
    try:
        async with openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30) as client:
            with pytest.raises(openai.APIStatusError) as err:
                await client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="wav")
        assert err.value.status_code == 503 and "not enabled" in str(err.value)
        audio = await speech.async_speech_attachment(srv.ctx, "alice", "Hello.")
        assert audio["data"] is None and "not enabled" in audio["error"]
        missing = Voice(espeak_path=str(tmp_path / "none"))
        await missing.async_start()
        await asyncio.to_thread((tmp_path / "b").mkdir)
        srv2, runner2 = await start_server(tmp_path / "b", missing)
        try:
            status, _, raw = await post(srv2, {"model": "tts-1", "voice": "alloy", "input": "Hello."})
            assert status == 503 and b"was not found" in raw
        finally:
            await runner2.cleanup()
            await srv2.db.async_stop()
    finally:
        await runner.cleanup()
        await srv.db.async_stop()
