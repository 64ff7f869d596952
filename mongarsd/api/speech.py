"""OpenAI speech surface: POST /v1/audio/speech (text to speech with Bouche's voice)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import structlog
from aiohttp import web

from mongarsd.api.app import CTX, AppContext
from mongarsd.api.auth import principal_of
from mongarsd.api.io import get_number, get_str, read_json, require_str
from mongarsd.api.streaming import DisconnectGuard
from mongarsd.cognition import mimicry
from mongarsd.cognition.voice import DEFAULT_LANGUAGE, FORMATS, MAX_SPEED, MAX_VOICE_NAME_CHARS, MIN_SPEED, normalize_language
from mongarsd.errors import InferenceError, MongarsError, OverloadedError, StoreError, UnavailableError, ValidationError
from mongarsd.memory.profiles import ProfileStore

if TYPE_CHECKING:
    from mongarsd.cognition.voice import Voice

log = structlog.get_logger("mongarsd.api.speech")

SPEECH_PATH = "/v1/audio/speech"
DEFAULT_FORMAT = "wav"  # OpenAI defaults to mp3, which needs an encoder this daemon does not ship
UNSUPPORTED_FORMATS = ("mp3", "opus", "aac", "flac")  # OpenAI's other formats: refused by name
KNOWN_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "espeak-ng")  # any other name is accepted too
MAX_MODEL_NAME_CHARS = 256
MAX_INSTRUCTIONS_CHARS = 4096  # accepted and ignored (espeak-ng takes no style prompt)
MAX_LANGUAGE_CHARS = 35
MEDIA_TYPES: Mapping[str, str] = {"wav": "audio/wav", "pcm": "audio/pcm"}
MODEL_HEADER = "X-Speech-Model"
VOICE_HEADER = "X-Speech-Voice"
ENGINE_HEADER = "X-Speech-Engine"
RATE_HEADER = "X-Sample-Rate"
B64_SLICE_BYTES = 3 * 256 * 1024  # base64 of a chat answer's audio, a slice at a time (a multiple of 3: no padding inside)
WRITE_SLICE_BYTES = 256 * 1024  # a WAV body goes out in slices of this size (flow control between them)
_HEADER_SAFE = "-._~:/+@ "  # a client's model name travels back in a header: anything else is percent-encoded


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    """A parsed /v1/audio/speech body."""

    model: str
    input: str
    voice: str
    fmt: str
    speed: float
    language: str | None


def _voice_of(body: Mapping[str, Any]) -> str:
    value = body.get("voice")
    if isinstance(value, dict):  # OpenAI's newer form: {"id": "..."}
        value = value.get("id")
        if not isinstance(value, str) or not value.strip():
            raise ValidationError("'voice.id' must be a non-empty string", param="voice.id")
        if len(value) > MAX_VOICE_NAME_CHARS:
            raise ValidationError(f"'voice.id' is too long (at most {MAX_VOICE_NAME_CHARS} characters)", param="voice.id")
        return value.strip()
    if value is None:
        raise ValidationError("'voice' is required: alloy, echo, fable, onyx, nova, shimmer, ... or an espeak-ng voice", param="voice")
    if not isinstance(value, str):
        raise ValidationError('\'voice\' must be a string or an object like {"id": "alloy"}', param="voice")
    return require_str(body, "voice", max_len=MAX_VOICE_NAME_CHARS).strip()


def parse_speech_request(body: Mapping[str, Any], *, max_input_chars: int) -> SpeechRequest:
    """Validate a /v1/audio/speech body (pure)."""
    model = require_str(body, "model", max_len=MAX_MODEL_NAME_CHARS)
    text = body.get("input")
    if text is None:
        raise ValidationError("'input' is required: the text to speak", param="input")
    text = require_str(body, "input", max_len=max_input_chars)
    voice = _voice_of(body)
    fmt = (get_str(body, "response_format", default=DEFAULT_FORMAT, max_len=16) or DEFAULT_FORMAT).lower()
    if fmt in UNSUPPORTED_FORMATS:
        raise ValidationError(
            f"'response_format' {fmt} is not supported by this server (no {fmt} encoder); use one of {', '.join(FORMATS)}",
            param="response_format",
        )
    if fmt not in FORMATS:
        raise ValidationError(f"'response_format' must be one of {', '.join(FORMATS)}, got {fmt!r}", param="response_format")
    speed = get_number(body, "speed", default=1.0, lo=MIN_SPEED, hi=MAX_SPEED)
    get_str(body, "instructions", max_len=MAX_INSTRUCTIONS_CHARS)  # checked, then ignored
    stream_format = get_str(body, "stream_format", default="audio", max_len=16)
    if stream_format != "audio":
        raise ValidationError(f"'stream_format' must be 'audio' (raw audio bytes), got {stream_format!r}", param="stream_format")
    language = get_str(body, "language", max_len=MAX_LANGUAGE_CHARS)
    if language is not None:
        normalize_language(language)
    return SpeechRequest(model, text, voice, fmt, 1.0 if speed is None else speed, language)


def header_value(value: str) -> str:
    """A client's string made safe to send back in a response header (pure)."""
    return quote(value[:MAX_MODEL_NAME_CHARS], safe=_HEADER_SAFE)


def voice_of(ctx: AppContext) -> Voice:
    voice = ctx.voice
    if voice is None:
        raise UnavailableError("speech synthesis is not enabled on this daemon (voice.enabled)")
    return voice


async def async_profile_language(ctx: AppContext, user: str, text: str) -> str | None:
    """The language to speak a text in: the text's own when it is clear, else the caller's usual one (mimicry profile)."""
    try:
        row = await ProfileStore(db=ctx.db).async_get(user)
    except StoreError as err:  # a profile read failing must not cost the caller their audio
        log.warning("speech_profile_unreadable", user=user, error=str(err))
        return mimicry.detect_language(text)
    return mimicry.dominant_language(row.mimicry, text)


async def handle_speech(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    body = await read_json(request)
    max_chars = ctx.voice.max_input_chars if ctx.voice is not None else ctx.config.voice.max_input_chars
    req = parse_speech_request(body, max_input_chars=max_chars)
    voice = voice_of(ctx)
    language = req.language or await async_profile_language(ctx, principal_of(request).user, req.input)  # None: English
    resolved = await voice.async_resolve_voice(req.voice, language)  # refusals before any audio work
    headers = {
        MODEL_HEADER: header_value(req.model),
        VOICE_HEADER: header_value(resolved),
        ENGINE_HEADER: voice.engine,
        RATE_HEADER: str(voice.sample_rate_hz),
        "Cache-Control": "no-cache",
    }
    chunks = voice.async_synthesize(req.input, voice=resolved, language=language, speed=req.speed, fmt=req.fmt)
    guard = DisconnectGuard(request)
    async with aclosing(chunks):
        async with guard:
            first = await anext(chunks, b"")  # a refusal or an engine failure is still a plain HTTP error here
            if req.fmt == "wav":  # one body: the header's sizes are the true ones
                return await _async_send_wav(request, first, headers)
            resp = web.StreamResponse(status=200, headers={**headers, "Content-Type": MEDIA_TYPES["pcm"], "X-Accel-Buffering": "no"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(first)
            try:
                async for chunk in chunks:
                    await resp.write(chunk)
            except MongarsError as err:  # headers are out: the audio just ends early, and the log says why
                log.warning("speech_stream_failed", error=str(err))
            await resp.write_eof()
            return resp
        return guard.response


async def _async_send_wav(request: web.Request, data: bytes, headers: Mapping[str, str]) -> web.StreamResponse:
    """Send a whole WAV file with its Content-Length, in slices so a long one never holds the loop."""
    if len(data) <= WRITE_SLICE_BYTES:
        return web.Response(body=data, content_type=MEDIA_TYPES["wav"], headers=headers)
    resp = web.StreamResponse(status=200, headers={**headers, "Content-Type": MEDIA_TYPES["wav"]})
    resp.content_length = len(data)
    await resp.prepare(request)
    view = memoryview(data)
    for start in range(0, len(data), WRITE_SLICE_BYTES):
        await resp.write(view[start : start + WRITE_SLICE_BYTES])  # waits while the client is slower than us
    await resp.write_eof()
    return resp


async def async_speech_attachment(ctx: AppContext, user: str, text: str) -> dict[str, Any]:
    """The `audio` object of a native chat answer asked with `speak: true`: the answer as a base64 WAV, or why there is none.

    Never raises for a speech failure: the text answer stands on its own, `data` is then null and
    `error` says why.
    """
    voice = ctx.voice
    if voice is None:
        return {"format": "wav", "data": None, "error": "speech synthesis is not enabled on this daemon (voice.enabled)"}
    language = await async_profile_language(ctx, user, text)
    try:
        wav = await voice.async_speak_wav(text, language=language)
    except (ValidationError, UnavailableError, OverloadedError, InferenceError) as err:  # speech is optional
        log.warning("chat_speech_failed", user=user, error=str(err))
        return {"format": "wav", "data": None, "error": str(err)}
    return {
        "format": "wav",
        "sample_rate": voice.sample_rate_hz,
        "language": language or DEFAULT_LANGUAGE,
        "data": await _async_b64(wav),
    }


async def _async_b64(data: bytes) -> str:
    """Base64 in slices, yielding to the loop between them (a minute of speech is megabytes)."""
    parts: list[bytes] = []
    for start in range(0, len(data), B64_SLICE_BYTES):
        parts.append(base64.b64encode(data[start : start + B64_SLICE_BYTES]))
        await asyncio.sleep(0)
    return b"".join(parts).decode("ascii")


def setup_routes(app: web.Application) -> None:
    """Register POST /v1/audio/speech."""
    app.router.add_post(SPEECH_PATH, handle_speech)
