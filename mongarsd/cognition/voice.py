"""Bouche's voice: speech synthesis with espeak-ng (the embedded default) or a piper voice.

The engine runs as a child process (never a shell): the text goes in on stdin, audio comes out
on stdout and is passed on as it is produced. Every run is bounded by `voice.timeout_s` and the
child is killed and reaped whatever ends the request (done, error, timeout, cancellation, a
client that went away). A missing engine never stops the daemon: the voice reports itself
unavailable and each request gets a clear UnavailableError (503).

Audio is signed 16-bit little-endian mono PCM. espeak-ng always speaks at 22050 Hz
(ESPEAK_SAMPLE_RATE_HZ); a piper voice speaks at the rate its `.onnx.json` names.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mongarsd.cognition import bouche, pacing
from mongarsd.errors import InferenceError, OverloadedError, UnavailableError, ValidationError
from mongarsd.supervisor import TaskSupervisor

if TYPE_CHECKING:
    from mongarsd.config import VoiceConfig
    from mongarsd.metrics import Sample

log = structlog.get_logger("mongarsd.cognition.voice")

ESPEAK = "espeak-ng"
PIPER = "piper"
ENGINES = (ESPEAK, PIPER)
FORMATS = ("wav", "pcm")
ESPEAK_SAMPLE_RATE_HZ = 22050  # espeak-ng's own voices all speak at this rate (checked on every header)
SAMPLE_WIDTH_BYTES = 2  # signed 16-bit little-endian
CHANNELS = 1
BASE_WPM = 175  # espeak-ng's default rate: what speed 1.0 means
MIN_WPM = 80  # espeak-ng's slowest rate
MAX_WPM = 450  # espeak-ng's fastest rate
MIN_SPEED = 0.25  # OpenAI's range for `speed`
MAX_SPEED = 4.0
DEFAULT_LANGUAGE = "en"
MAX_VOICE_NAME_CHARS = 64
PROBE_TIMEOUT_S = 10.0  # `--version` and `--voices` at start
REPROBE_INTERVAL_S = 30.0  # an unavailable engine is looked for again at most this often (installed later)
READ_CHUNK_BYTES = 16384  # one read from the engine's stdout; streamed on as it comes
MAX_HEADER_BYTES = 4096  # the WAV header espeak-ng writes before its samples (44 bytes in practice)
JOIN_IN_THREAD_BYTES = 1 << 20  # a WAV body larger than this is assembled in a thread (CPython copies it without the GIL)
MAX_AUDIO_S = 1200  # a synthesis that produces more audio than this is stopped (memory bound)
MAX_CONCURRENT_SYNTHESES = 4  # engine processes at once; more requests get 429
STDERR_KEEP_BYTES = 2048  # of an engine's error output, for the error message
KILL_WAIT_S = 1.0  # after SIGKILL, how long to wait for the child to be reaped
ENGINE_NICE = 10  # scheduling niceness of engine children (0 normal, 19 lowest)
PIPER_MIN_RATE_HZ = 8000
PIPER_MAX_RATE_HZ = 48000

# OpenAI's voice names mapped to espeak-ng variants, applied to the language's base voice.
OPENAI_VOICES: Mapping[str, str] = {
    "alloy": "f3",
    "ash": "m4",
    "ballad": "m5",
    "coral": "f5",
    "echo": "m3",
    "fable": "m2",
    "nova": "f2",
    "onyx": "m7",
    "sage": "f1",
    "shimmer": "f4",
    "verse": "m6",
}
# Base voice for a language subtag where espeak-ng's own choice is not the usual one.
PREFERRED_VOICES: Mapping[str, str] = {"en": "en-us", "fr": "fr-fr"}

_LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8}){0,4}$")
_VOICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*(?:\+[A-Za-z0-9_-]+)?$")
_OTHER_LANG_RE = re.compile(r"\(([^\s()]+)\s+\d+\)")
_VERSION_RE = re.compile(r"(\d+\.\d+(?:\.\d+)?)")


# ----------------------------------------------------------------------------------------
# Pure decisions


@dataclass(frozen=True, slots=True)
class VoiceCatalog:
    """The voices an espeak-ng install offers, keyed in lower case, valued as espeak-ng spells them."""

    languages: Mapping[str, str]  # main language codes ("en-us", "fr-fr")
    also: frozenset[str]  # languages voices also speak ("en", "fr"): espeak-ng picks its best voice
    files: Mapping[str, str]  # voice files ("gmw/en-US")
    variants: Mapping[str, str]  # variants for "+name" ("m3", "f2", "klatt")

    def __len__(self) -> int:
        return len(self.languages)


EMPTY_CATALOG = VoiceCatalog({}, frozenset(), {}, {})


def parse_voices(listing: str, variants: str = "") -> VoiceCatalog:
    """Read `espeak-ng --voices` (and `--voices=variant`) output into a catalog (pure)."""
    languages: dict[str, str] = {}
    also: set[str] = set()
    files: dict[str, str] = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0].isdigit():
            continue  # the header line, blank lines
        languages[fields[1].lower()] = fields[1]
        files[fields[4].lower()] = fields[4]
        also.update(m.group(1).lower() for m in _OTHER_LANG_RE.finditer(line))
    names: dict[str, str] = {}
    for line in variants.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0].isdigit():
            continue
        name = fields[4].rsplit("/", 1)[-1]
        names[name.lower()] = name
    return VoiceCatalog(languages, frozenset(also), files, names)


def wpm_for_speed(speed: float) -> int:
    """Map OpenAI's `speed` (0.25..4.0, 1.0 normal) to espeak-ng words per minute, within its 80..450 (pure)."""
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValidationError(f"'speed' must be a number between {MIN_SPEED:g} and {MAX_SPEED:g}, got {speed!r}", param="speed")
    return max(MIN_WPM, min(MAX_WPM, round(BASE_WPM * speed)))


def check_format(fmt: str) -> str:
    """Accept an audio format this voice produces: wav or pcm (pure)."""
    value = fmt.lower() if isinstance(fmt, str) else fmt
    if value not in FORMATS:
        raise ValidationError(f"'response_format' must be one of {', '.join(FORMATS)}, got {fmt!r}", param="response_format")
    return str(value)


def check_input(text: str, max_chars: int) -> str:
    """Accept a text to speak: a string of 1..max_chars characters with something to say (pure)."""
    if not isinstance(text, str):
        raise ValidationError("'input' must be a string", param="input")
    if len(text) > max_chars:
        raise ValidationError(f"'input' is too long ({len(text)} characters; at most {max_chars})", param="input")
    if "\x00" in text:
        raise ValidationError("'input' must not contain NUL characters", param="input")
    if not pacing.plain_text(text).strip():
        raise ValidationError("'input' has nothing to speak", param="input")
    return text


def normalize_language(tag: str) -> str:
    """Check a BCP-47-like language tag ("fr", "fr-FR", "en_US") and return it lower-cased with hyphens (pure)."""
    if not isinstance(tag, str) or not _LANGUAGE_RE.match(tag):
        raise ValidationError(f"'language' must be a language tag like 'en', 'fr' or 'fr-FR', got {str(tag)[:40]!r}", param="language")
    return tag.replace("_", "-").lower()


def voice_for_language(language: str | None, catalog: VoiceCatalog) -> str:
    """Pick the espeak-ng base voice that speaks a language (English when None) (pure)."""
    tag = normalize_language(DEFAULT_LANGUAGE if language is None else language)
    if tag in catalog.languages:
        return catalog.languages[tag]
    primary = tag.split("-", 1)[0]
    preferred = PREFERRED_VOICES.get(primary)
    if preferred is not None and preferred in catalog.languages:
        return catalog.languages[preferred]
    if primary in catalog.languages:
        return catalog.languages[primary]
    if primary in catalog.also or tag in catalog.also:
        return primary if primary in catalog.also else tag
    raise ValidationError(f"no espeak-ng voice speaks language {language!r}", param="language")


def resolve_voice(voice: str | None, language: str | None, catalog: VoiceCatalog) -> str:
    """Turn a requested voice into an espeak-ng `-v` argument (pure).

    An OpenAI name (alloy, echo, ...) picks a variant of the language's base voice; anything
    else must be an espeak-ng voice (a language code or voice file, optionally `+variant`)
    that this install has; None speaks the language's base voice.
    """
    if voice is None:
        return voice_for_language(language, catalog)
    if not isinstance(voice, str) or not voice.strip():
        raise ValidationError("'voice' must be a non-empty string", param="voice")
    name = voice.strip()
    variant = OPENAI_VOICES.get(name.lower())
    if variant is not None:
        base = voice_for_language(language, catalog)
        return base + "+" + catalog.variants[variant] if variant in catalog.variants else base
    if len(name) > MAX_VOICE_NAME_CHARS or not _VOICE_NAME_RE.match(name):
        raise ValidationError(_unknown_voice(voice), param="voice")
    head, _, tail = name.partition("+")
    key = head.lower()
    if key in catalog.languages:
        head = catalog.languages[key]
    elif key in catalog.files:
        head = catalog.files[key]
    elif key in catalog.also:
        head = key
    else:
        raise ValidationError(_unknown_voice(voice), param="voice")
    if not tail:
        return head
    if tail.lower() not in catalog.variants:
        raise ValidationError(f"espeak-ng has no voice variant {tail!r} (try m1..m7 or f1..f5)", param="voice")
    return head + "+" + catalog.variants[tail.lower()]


def _unknown_voice(voice: str) -> str:
    return (
        f"unknown voice {voice[:MAX_VOICE_NAME_CHARS]!r}: use one of {', '.join(sorted(OPENAI_VOICES))}, "
        "or an espeak-ng voice such as 'en-us', 'fr-fr' or 'en-us+f2' (see `espeak-ng --voices`)"
    )


def wav_header(data_bytes: int, rate_hz: int, *, channels: int = CHANNELS, width: int = SAMPLE_WIDTH_BYTES) -> bytes:
    """A 44-byte RIFF/WAVE PCM header whose sizes are the true ones for `data_bytes` of samples (pure)."""
    block = channels * width
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        channels,
        rate_hz,
        rate_hz * block,
        block,
        width * 8,
        b"data",
        data_bytes,
    )


@dataclass(frozen=True, slots=True)
class WavFormat:
    rate_hz: int
    channels: int
    bits: int


def parse_wav_prefix(buf: bytes) -> tuple[WavFormat, int] | None:
    """Read a WAV header from the start of a stream: (format, offset of the samples), None while incomplete (pure).

    The sizes in the header are ignored: espeak-ng writes placeholders when its output is a pipe.
    Raises ValueError when the bytes are not a PCM WAV header.
    """
    if len(buf) < 12:
        return None
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise ValueError("engine output is not a WAV stream")
    pos = 12
    fmt: WavFormat | None = None
    while True:
        if len(buf) < pos + 8:
            if pos + 8 > MAX_HEADER_BYTES:
                raise ValueError("engine WAV header has no data chunk")
            return None
        chunk_id, size = struct.unpack_from("<4sI", buf, pos)
        body = pos + 8
        if chunk_id == b"data":
            if fmt is None:
                raise ValueError("engine WAV header has no fmt chunk before its data")
            return fmt, body
        if body + size > MAX_HEADER_BYTES:
            raise ValueError("engine WAV header is too large")
        if len(buf) < body + size:
            return None
        if chunk_id == b"fmt ":
            if size < 16:
                raise ValueError("engine WAV fmt chunk is truncated")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", buf, body)
            if tag != 1:
                raise ValueError(f"engine WAV data is not PCM (format tag {tag})")
            fmt = WavFormat(rate, channels, bits)
        pos = body + size + (size & 1)  # chunks are word-aligned


def piper_sample_rate(config: Mapping[str, Any]) -> int:
    """The sample rate a piper voice's `.onnx.json` names (pure)."""
    audio = config.get("audio")
    rate = audio.get("sample_rate") if isinstance(audio, dict) else None
    if isinstance(rate, bool) or not isinstance(rate, int) or not PIPER_MIN_RATE_HZ <= rate <= PIPER_MAX_RATE_HZ:
        raise ValueError(f"audio.sample_rate must be an integer between {PIPER_MIN_RATE_HZ} and {PIPER_MAX_RATE_HZ}, got {rate!r}")
    return rate


def speakable(text: str, max_chars: int) -> str:
    """Fit an answer to the voice's input limit, cut after a whole sentence when it is longer (pure)."""
    if len(text) <= max_chars:
        return text
    return bouche.cut_at_sentence_end(text[: max(1, max_chars - 1)])[:max_chars]


# ----------------------------------------------------------------------------------------
# Engine child process


@dataclass(frozen=True, slots=True)
class _Job:
    argv: tuple[str, ...]
    stdin: bytes
    rate_hz: int
    wav_header: bool  # espeak-ng writes a WAV header before its samples; piper's raw output has none
    engine: str


class _EngineRun:
    """One engine child: feed stdin, read PCM from stdout, kill and reap it on close (event loop only)."""

    def __init__(self, job: _Job, *, deadline: float, timeout_s: float, tasks: TaskSupervisor) -> None:
        self.job = job
        self._tasks = tasks
        self._deadline = deadline
        self._timeout_s = timeout_s
        self.proc: asyncio.subprocess.Process | None = None
        self._helper: asyncio.Task[None] | None = None
        self._stderr = bytearray()
        self._buf = b""
        self._header_done = not job.wav_header
        self.pcm_bytes = 0
        self.timed_out = False
        self.closed = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def async_open(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.job.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as err:  # the binary vanished or is not executable since the probe
            raise UnavailableError(f"speech engine {self.job.argv[0]!r} could not be started: {err.strerror or err}") from err
        try:
            # speech runs faster than real time: it yields the CPU to the event loop and the LLM threads
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, ENGINE_NICE)
        except OSError:
            pass  # already gone, or not permitted here: it then runs at normal priority
        self._helper = self._tasks.spawn_once("voice-engine-io", self._async_feed(), owner=self)

    async def _async_feed(self) -> None:
        """Write the text to stdin and close it, then keep the tail of stderr (so neither pipe can fill)."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stderr is not None
        try:
            proc.stdin.write(self.job.stdin)
            await proc.stdin.drain()
            proc.stdin.close()
            await proc.stdin.wait_closed()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the engine exited before reading everything: its exit status says why
        while chunk := await proc.stderr.read(READ_CHUNK_BYTES):
            self._stderr += chunk
            del self._stderr[:-STDERR_KEEP_BYTES]

    async def _async_read_raw(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        if self.closed:
            raise InferenceError(f"{self.job.engine} was stopped (the daemon is shutting down)")
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self.proc.stdout.read(READ_CHUNK_BYTES)
        except TimeoutError:
            self.timed_out = True
            raise InferenceError(f"speech synthesis did not finish within {self._timeout_s:g} s (voice.timeout_s)") from None

    async def async_read(self) -> bytes:
        """Return the next PCM bytes, b"" at the end of the stream."""
        while not self._header_done:
            data = await self._async_read_raw()
            if not data:
                await self._async_check_exit()
                raise InferenceError(f"{self.job.engine} produced no audio")
            self._buf += data
            try:
                parsed = parse_wav_prefix(self._buf)
            except ValueError as err:
                raise InferenceError(str(err)) from None
            if parsed is None:
                continue
            fmt, offset = parsed
            if (fmt.rate_hz, fmt.channels, fmt.bits) != (self.job.rate_hz, CHANNELS, SAMPLE_WIDTH_BYTES * 8):
                raise InferenceError(
                    f"{self.job.engine} produced {fmt.rate_hz} Hz, {fmt.channels} channel(s), {fmt.bits}-bit audio; "
                    f"expected {self.job.rate_hz} Hz mono 16-bit"
                )
            self._header_done = True
            rest, self._buf = self._buf[offset:], b""
            if rest:
                return self._count(rest)
        data = await self._async_read_raw()
        if not data:
            await self._async_check_exit()
            return b""
        return self._count(data)

    def _count(self, data: bytes) -> bytes:
        self.pcm_bytes += len(data)
        if self.pcm_bytes > MAX_AUDIO_S * self.job.rate_hz * SAMPLE_WIDTH_BYTES:
            raise InferenceError(f"speech is longer than {MAX_AUDIO_S} s; send a shorter input")
        return data

    async def _async_check_exit(self) -> None:
        """After end of output: wait for the engine to exit (bounded) and fail on a non-zero status."""
        assert self.proc is not None
        try:
            async with asyncio.timeout_at(self._deadline):
                rc = await self.proc.wait()
                if self._helper is not None:
                    await self._helper
        except TimeoutError:
            self.timed_out = True
            raise InferenceError(f"speech synthesis did not finish within {self._timeout_s:g} s (voice.timeout_s)") from None
        if rc != 0:
            why = self._stderr.decode("utf-8", "replace").strip().replace("\n", " ")[-300:]
            raise InferenceError(f"{self.job.engine} failed (exit status {rc})" + (": " + why if why else ""))

    async def async_close(self) -> None:
        """Kill the child if it still runs, drain its pipes, reap it and stop the stdin/stderr helper (idempotent)."""
        helper, self._helper = self._helper, None
        if helper is not None:
            if not helper.done():
                helper.cancel()
            # the helper's own end (done, cancelled, or a pipe error) is not this run's failure
            await asyncio.gather(helper, return_exceptions=True)
        proc = self.proc
        if proc is None or self.closed:
            return
        self.closed = True
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass  # exited between the check and the kill
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            async with asyncio.timeout(KILL_WAIT_S):
                # wait() returns once every pipe has reached its end: a stdout paused by flow control
                # (nobody reading) would never get there, so what is left is read and dropped
                await _async_drain(proc.stdout)
                await _async_drain(proc.stderr)
                await proc.wait()
        except TimeoutError:
            log.error("voice_engine_not_reaped", pid=proc.pid)


async def _async_drain(stream: asyncio.StreamReader | None) -> None:
    """Read a pipe to its end and drop the bytes (unless its reader is waiting on it: then it reads the end)."""
    if stream is None:
        return
    try:
        while await stream.read(READ_CHUNK_BYTES * 4):
            pass
    except RuntimeError:
        pass  # a synthesis is reading it right now (stop during a read): its buffer is empty, so the end arrives


# ----------------------------------------------------------------------------------------
# The service


class Voice:
    """Speech synthesis service: espeak-ng by default, a piper voice when configured."""

    name = "voice"
    start_timeout_s = 3 * PROBE_TIMEOUT_S + 5.0
    stop_timeout_s = KILL_WAIT_S + 0.5

    def __init__(
        self,
        *,
        enabled: bool = True,
        engine: str = ESPEAK,
        espeak_path: str = ESPEAK,
        piper_path: str = PIPER,
        voice_model: str = "",
        default_voice: str = "",
        max_input_chars: int = 4096,
        timeout_s: float = 60.0,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"voice engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.enabled = enabled
        self.engine = engine
        self.espeak_path = espeak_path
        self.piper_path = piper_path
        self.voice_model = voice_model
        self.default_voice = default_voice
        self.max_input_chars = max_input_chars
        self.timeout_s = timeout_s
        self.version: str | None = None
        self._exe: str | None = None
        self._catalog = EMPTY_CATALOG
        self._rate_hz = ESPEAK_SAMPLE_RATE_HZ
        self._ready = False
        self._why = "the voice has not started"
        self._probed_at: float | None = None
        self._probe_lock = asyncio.Lock()
        self._runs: set[_EngineRun] = set()
        self._tasks = TaskSupervisor()  # the engines' stdin/stderr pumps, one per running synthesis
        self._requests: dict[tuple[str, str], int] = {}
        self._audio_s = 0.0

    @classmethod
    def from_config(cls, section: VoiceConfig) -> Voice:
        """Build from the `[voice]` config section."""
        return cls(
            enabled=section.enabled,
            engine=section.engine,
            espeak_path=section.espeak_path,
            voice_model=section.voice_model,
            default_voice=section.default_voice,
            max_input_chars=section.max_input_chars,
            timeout_s=section.timeout_s,
        )

    # ------------------------------------------------------------------ lifecycle

    async def async_start(self) -> None:
        """Look for the engine and log its version; a missing engine is reported, never fatal."""
        if not self.enabled:
            self._why = "speech synthesis is disabled (voice.enabled = false)"
            log.info("voice_disabled")
            return
        await self._async_probe()
        if not self._ready:
            log.warning("voice_unavailable", engine=self.engine, reason=self._why)

    async def async_stop(self) -> None:
        """Kill and reap every engine child still running (idempotent)."""
        runs, self._runs = list(self._runs), set()
        for run in runs:
            await run.async_close()

    @property
    def available(self) -> bool:
        return self.enabled and self._ready

    @property
    def unavailable_reason(self) -> str | None:
        return None if self.available else self._why

    @property
    def sample_rate_hz(self) -> int:
        """The rate of the PCM this voice produces (22050 Hz for espeak-ng)."""
        return self._rate_hz

    @property
    def catalog(self) -> VoiceCatalog:
        return self._catalog

    def engine_pids(self) -> list[int]:
        """The process ids of the engine children running now (diagnostics, tests)."""
        return [pid for run in self._runs if (pid := run.pid) is not None]

    def status(self) -> dict[str, Any]:
        """What /api/v1/status can show about the voice."""
        return {
            "enabled": self.enabled,
            "engine": self.engine,
            "available": self.available,
            "reason": self.unavailable_reason,
            "version": self.version,
            "sample_rate_hz": self._rate_hz,
            "voices": len(self._catalog),
            "inflight": len(self._runs),
        }

    # ------------------------------------------------------------------ engine discovery

    async def _async_probe(self) -> None:
        async with self._probe_lock:
            self._probed_at = time.monotonic()
            try:
                if self.engine == PIPER:
                    await self._async_probe_piper()
                else:
                    await self._async_probe_espeak()
            except UnavailableError as err:
                self._ready = False
                self._why = str(err)
            else:
                self._ready = True
                self._why = ""

    async def _async_probe_espeak(self) -> None:
        exe = await asyncio.to_thread(shutil.which, self.espeak_path)
        if exe is None:
            raise UnavailableError(
                f"speech synthesis is unavailable: {self.espeak_path!r} was not found "
                "(install the espeak-ng package, or set voice.espeak_path)"
            )
        out = await _async_capture((exe, "--version"))
        match = _VERSION_RE.search(out)
        voices = await _async_capture((exe, "--voices"))
        variants = await _async_capture((exe, "--voices=variant"))
        catalog = parse_voices(voices, variants)
        if not catalog.languages:
            raise UnavailableError(f"speech synthesis is unavailable: {exe} lists no voices (is espeak-ng-data installed?)")
        self._exe, self._catalog, self._rate_hz = exe, catalog, ESPEAK_SAMPLE_RATE_HZ
        self.version = match.group(1) if match else out.strip()[:80]
        log.info("voice_ready", engine=ESPEAK, version=self.version, path=exe, voices=len(catalog), variants=len(catalog.variants))

    async def _async_probe_piper(self) -> None:
        exe = await asyncio.to_thread(shutil.which, self.piper_path)
        if exe is None:
            raise UnavailableError(
                f"speech synthesis is unavailable: the piper executable {self.piper_path!r} is not on PATH "
                "(install piper-tts, or set voice.engine = espeak-ng)"
            )
        if not self.voice_model:
            raise UnavailableError("speech synthesis is unavailable: voice.engine = piper needs voice.voice_model (a piper .onnx voice)")
        self._rate_hz = await asyncio.to_thread(_read_piper_rate, Path(self.voice_model))
        self._exe, self.version = exe, None
        log.info("voice_ready", engine=PIPER, path=exe, model=self.voice_model, sample_rate_hz=self._rate_hz)

    async def _async_ensure_ready(self) -> None:
        if not self.enabled:
            raise UnavailableError("speech synthesis is disabled on this daemon (voice.enabled = false)")
        if self._ready:
            return
        if self._probed_at is None or time.monotonic() - self._probed_at >= REPROBE_INTERVAL_S:
            await self._async_probe()
        if not self._ready:
            raise UnavailableError(self._why)

    # ------------------------------------------------------------------ synthesis

    async def async_resolve_voice(self, voice: str | None, language: str | None) -> str:
        """Check the engine is there and turn a requested voice and language into the engine's voice."""
        await self._async_ensure_ready()
        if self.engine == PIPER:
            if voice is not None and (not isinstance(voice, str) or not voice.strip()):
                raise ValidationError("'voice' must be a non-empty string", param="voice")
            if language is not None:
                normalize_language(language)
            return Path(self.voice_model).stem  # one voice, one language: the model's
        return resolve_voice(voice, language, self._catalog)

    async def _async_job(self, text: str, *, voice: str | None, language: str | None, speed: float) -> _Job:
        resolved = await self.async_resolve_voice(voice, language)
        exe = self._exe
        assert exe is not None
        if self.engine == PIPER:
            argv: tuple[str, ...] = (exe, "--model", self.voice_model, "--output_raw", "--length_scale", f"{1.0 / speed:.3f}")
            return _Job(argv, pacing.plain_text(text).encode("utf-8", "replace") + b"\n", self._rate_hz, wav_header=False, engine=PIPER)
        argv = (exe, "--stdin", "--stdout", "-m", "-v", resolved, "-s", str(wpm_for_speed(speed)))
        return _Job(argv, pacing.to_ssml(text, speed=speed).encode("utf-8", "replace"), self._rate_hz, wav_header=True, engine=ESPEAK)

    async def async_synthesize(
        self, text: str, *, voice: str | None, language: str | None, speed: float, fmt: str
    ) -> AsyncGenerator[bytes, None]:
        """Speak a text: "pcm" streams raw s16le mono chunks as the engine produces them; "wav" yields one
        complete WAV file (header with the true sizes, then the samples) once the engine is done.

        Errors before the first chunk are the caller's to answer (ValidationError, UnavailableError,
        OverloadedError, InferenceError); the engine child is killed and reaped however iteration ends.
        """
        label = fmt.lower() if isinstance(fmt, str) and fmt.lower() in FORMATS else "other"  # bounded label values
        outcome = "failed"
        run: _EngineRun | None = None
        try:
            fmt = check_format(fmt)
            wpm_for_speed(speed)
            check_input(text, self.max_input_chars)
            job = await self._async_job(text, voice=voice, language=language, speed=speed)
            if len(self._runs) >= MAX_CONCURRENT_SYNTHESES:
                raise OverloadedError(f"the voice is busy ({MAX_CONCURRENT_SYNTHESES} syntheses running); retry shortly", retry_after_s=1.0)
            run = _EngineRun(job, deadline=asyncio.get_running_loop().time() + self.timeout_s, timeout_s=self.timeout_s, tasks=self._tasks)
            self._runs.add(run)
            await run.async_open()
            if fmt == "pcm":
                while chunk := await run.async_read():
                    yield chunk
            else:
                parts: list[bytes] = []
                while chunk := await run.async_read():
                    parts.append(chunk)
                size = run.pcm_bytes - run.pcm_bytes % (SAMPLE_WIDTH_BYTES * CHANNELS)
                if size < run.pcm_bytes:  # a torn last sample (never from a clean exit): dropped
                    parts[-1] = parts[-1][: len(parts[-1]) - (run.pcm_bytes - size)]
                yield await _async_join([wav_header(size, job.rate_hz), *parts])
            outcome = "ok"
        except ValidationError:
            outcome = "invalid"
            raise
        except UnavailableError:
            outcome = "unavailable"
            raise
        except OverloadedError:
            outcome = "overloaded"
            raise
        except InferenceError:
            outcome = "timeout" if run is not None and run.timed_out else "failed"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"  # the client went away or the caller stopped reading
            raise
        finally:
            if run is not None:
                self._runs.discard(run)
                await run.async_close()
                self._audio_s += run.pcm_bytes / (run.job.rate_hz * SAMPLE_WIDTH_BYTES * CHANNELS)
            self._requests[(label, outcome)] = self._requests.get((label, outcome), 0) + 1
            if outcome not in ("ok", "invalid", "cancelled"):
                log.warning("speech_failed", engine=self.engine, format=label, outcome=outcome)

    async def async_speak_wav(self, text: str, *, language: str | None) -> bytes:
        """Speak an answer at normal speed in the default voice (or the language's) and return a whole WAV file.

        An answer longer than voice.max_input_chars is cut after its last whole sentence that fits.
        """
        chunks = self.async_synthesize(
            speakable(text, self.max_input_chars), voice=self.default_voice or None, language=language, speed=1.0, fmt="wav"
        )
        async with aclosing(chunks):
            return b"".join([chunk async for chunk in chunks])

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> Iterator[Sample]:
        """Pull-time samples for Metrics.add_source."""
        for (fmt, outcome), n in sorted(self._requests.items()):
            yield (
                "mongarsd_speech_requests_total",
                "counter",
                "Speech synthesis requests by audio format and outcome.",
                float(n),
                {"format": fmt, "outcome": outcome},
            )
        yield ("mongarsd_speech_audio_seconds_total", "counter", "Seconds of speech audio produced.", self._audio_s, {})
        yield ("mongarsd_speech_inflight", "gauge", "Speech engine processes running now.", float(len(self._runs)), {})
        yield ("mongarsd_speech_available", "gauge", "1 when the speech engine is ready.", 1.0 if self.available else 0.0, {})


async def _async_join(parts: list[bytes]) -> bytes:
    """Join audio parts into one bytes object; megabytes of speech are copied off the loop."""
    if sum(map(len, parts)) < JOIN_IN_THREAD_BYTES:
        return b"".join(parts)
    return await asyncio.to_thread(_join, parts)


def _join(parts: list[bytes]) -> bytes:
    """Join bytes (blocking for large inputs: run in a thread; bytes.join releases the GIL above 1 MiB)."""
    return b"".join(parts)


async def _async_capture(argv: tuple[str, ...]) -> str:
    """Run a short engine command (no shell) and return its stdout; any failure is UnavailableError."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as err:
        raise UnavailableError(f"speech synthesis is unavailable: {argv[0]} could not be run: {err.strerror or err}") from err
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            out, err_out = await proc.communicate()
    except TimeoutError:
        raise UnavailableError(f"speech synthesis is unavailable: {' '.join(argv)} did not answer within {PROBE_TIMEOUT_S:g} s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        why = err_out.decode("utf-8", "replace").strip()[-200:]
        raise UnavailableError(f"speech synthesis is unavailable: {' '.join(argv)} failed (exit status {proc.returncode}): {why}")
    return out.decode("utf-8", "replace")


def _read_piper_rate(model: Path) -> int:
    """Check a piper voice file and read its sample rate from the `.onnx.json` beside it (blocking: run in a thread)."""
    if model.suffix != ".onnx":
        raise UnavailableError(f"speech synthesis is unavailable: voice.voice_model must be a piper .onnx voice, got {model.name!r}")
    if not model.is_file():
        raise UnavailableError(f"speech synthesis is unavailable: the piper voice {model} does not exist")
    config = model.with_name(model.name + ".json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        return piper_sample_rate(data if isinstance(data, dict) else {})
    except FileNotFoundError:
        raise UnavailableError(f"speech synthesis is unavailable: the piper voice config {config} does not exist") from None
    except (OSError, ValueError) as err:  # unreadable, not JSON, or no usable sample rate
        raise UnavailableError(f"speech synthesis is unavailable: the piper voice config {config} is unusable: {err}") from None
