"""Bouche's voice, the pure parts: voice names, languages, speed, formats, WAV headers, request parsing."""

from __future__ import annotations

import io
import struct
import wave
from typing import Any

import pytest

from mongarsd.api.speech import header_value, parse_speech_request
from mongarsd.cognition import voice as v
from mongarsd.cognition.voice import (
    OPENAI_VOICES,
    check_format,
    check_input,
    normalize_language,
    parse_voices,
    parse_wav_prefix,
    piper_sample_rate,
    resolve_voice,
    speakable,
    voice_for_language,
    wav_header,
    wpm_for_speed,
)
from mongarsd.errors import ValidationError

# The shape of `espeak-ng --voices` and `--voices=variant` output (espeak-ng 1.51).
VOICES = """\
Pty Language       Age/Gender VoiceName          File                 Other Languages
 5  de              --/M      German             gmw/de
 2  en-gb           --/M      English_(Great_Britain) gmw/en               (en 2)
 5  en-gb-x-rp      --/M      English_(Received_Pronunciation) gmw/en-GB-x-rp       (en-gb 4)(en 5)
 2  en-us           --/M      English_(America)  gmw/en-US            (en 3)
 5  es              --/M      Spanish_(Spain)    roa/es
 5  fr-be           --/M      French_(Belgium)   roa/fr-BE            (fr 8)
 5  fr-fr           --/M      French_(France)    roa/fr               (fr 5)
 5  pt              --/M      Portuguese_(Portugal) roa/pt               (pt-pt 5)
 5  pt-br           --/M      Portuguese_(Brazil) roa/pt-BR            (pt 5)
 5  cmn             --/M      Chinese_(Mandarin) sit/cmn              (zh-cmn 5)(zh 5)
"""
VARIANTS = """\
Pty Language       Age/Gender VoiceName          File                 Other Languages
 5  variant         --/M      Alex               !v/Alex
 5  variant         --/F      f1                 !v/f1
 5  variant         --/F      f2                 !v/f2
 5  variant         --/F      f3                 !v/f3
 5  variant         --/F      f4                 !v/f4
 5  variant         --/F      f5                 !v/f5
 5  variant         --/M      m2                 !v/m2
 5  variant         --/M      m3                 !v/m3
 5  variant         --/M      m4                 !v/m4
 5  variant         --/M      m5                 !v/m5
 5  variant         --/M      m6                 !v/m6
 5  variant         --/M      m7                 !v/m7
"""
CAT = parse_voices(VOICES, VARIANTS)


def test_parse_voices_reads_codes_files_other_languages_and_variants() -> None:
    assert CAT.languages["en-us"] == "en-us" and CAT.languages["fr-fr"] == "fr-fr"
    assert CAT.files["gmw/en-us"] == "gmw/en-US"
    assert {"en", "fr", "zh", "pt", "en-gb"} <= CAT.also
    assert CAT.variants["alex"] == "Alex" and "m3" in CAT.variants
    assert len(CAT) == 10
    assert len(parse_voices("")) == 0


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        (None, "en-us"),  # English when nothing says otherwise
        ("en", "en-us"),
        ("EN-GB", "en-gb"),
        ("en_US", "en-us"),
        ("en-AU", "en-us"),  # unknown region: the language's preferred voice
        ("fr", "fr-fr"),
        ("fr-FR", "fr-fr"),
        ("fr-BE", "fr-be"),
        ("fr-CA", "fr-fr"),
        ("de-DE", "de"),
        ("pt", "pt"),
        ("pt-BR", "pt-br"),
        ("cmn", "cmn"),
        ("zh", "zh"),  # only as another language: espeak-ng chooses its voice
    ],
)
def test_language_to_voice(language: str | None, expected: str) -> None:
    assert voice_for_language(language, CAT) == expected


@pytest.mark.parametrize("language", ["xx", "klingon-x", "e", "fr FR", "fr;rm -rf", "", "12"])
def test_bad_or_unknown_language_is_refused_naming_the_field(language: str) -> None:
    with pytest.raises(ValidationError) as err:
        voice_for_language(language, CAT)
    assert err.value.param == "language"


def test_normalize_language() -> None:
    assert normalize_language("fr_CA") == "fr-ca"
    with pytest.raises(ValidationError):
        normalize_language("-fr")


@pytest.mark.parametrize("name", sorted(OPENAI_VOICES))
def test_every_openai_voice_maps_to_a_variant_of_the_language_voice(name: str) -> None:
    assert resolve_voice(name, None, CAT) == "en-us+" + OPENAI_VOICES[name]
    assert resolve_voice(name.upper(), "fr", CAT) == "fr-fr+" + OPENAI_VOICES[name]


def test_openai_voices_differ_by_gender_and_cover_the_documented_names() -> None:
    assert set(OPENAI_VOICES) == {"alloy", "echo", "fable", "onyx", "nova", "shimmer", "ash", "ballad", "coral", "sage", "verse"}
    assert len(set(OPENAI_VOICES.values())) == len(OPENAI_VOICES)


def test_a_missing_variant_falls_back_to_the_base_voice() -> None:
    bare = parse_voices(VOICES, "")
    assert resolve_voice("nova", "fr", bare) == "fr-fr"


@pytest.mark.parametrize(
    ("voice", "expected"),
    [
        ("en-us", "en-us"),
        ("EN-US", "en-us"),
        ("fr-fr+m3", "fr-fr+m3"),
        ("en-us+alex", "en-us+Alex"),
        ("gmw/en-us", "gmw/en-US"),
        ("fr", "fr"),
        ("de+F2", "de+f2"),
    ],
)
def test_espeak_voice_names_are_accepted_in_espeak_spelling(voice: str, expected: str) -> None:
    assert resolve_voice(voice, "fr", CAT) == expected  # an explicit voice wins over the language


@pytest.mark.parametrize("voice", ["nosuch", "en-us+nosuch", "-v", "en us", "en-us+m3+f2", "../../etc/passwd", "x" * 80, "", "  "])
def test_unknown_or_hostile_voice_names_are_refused(voice: str) -> None:
    with pytest.raises(ValidationError) as err:
        resolve_voice(voice, None, CAT)
    assert err.value.param == "voice"


def test_unknown_voice_message_lists_the_choices() -> None:
    with pytest.raises(ValidationError, match=r"alloy, ash, ballad.*en-us"):
        resolve_voice("nosuch", None, CAT)


def test_no_voice_speaks_the_language() -> None:
    assert resolve_voice(None, "fr", CAT) == "fr-fr"


@pytest.mark.parametrize(("speed", "wpm"), [(1.0, 175), (2.0, 350), (0.5, 88), (0.25, 80), (4.0, 450), (2.57, 450), (1, 175)])
def test_speed_to_words_per_minute_is_clamped_to_espeak(speed: float, wpm: int) -> None:
    assert wpm_for_speed(speed) == wpm


@pytest.mark.parametrize("speed", [0.2, 4.01, 0, -1, float("nan"), float("inf"), True, "1"])
def test_speed_outside_openai_range_is_refused(speed: Any) -> None:
    with pytest.raises(ValidationError) as err:
        wpm_for_speed(speed)
    assert err.value.param == "speed"


def test_formats() -> None:
    assert check_format("wav") == "wav" and check_format("PCM") == "pcm"
    for bad in ("mp3", "opus", "", "wave"):
        with pytest.raises(ValidationError, match="wav, pcm"):
            check_format(bad)


def test_input_checks() -> None:
    assert check_input("Hi.", 10) == "Hi."
    for bad, why in (("x" * 11, "too long"), ("a\x00b", "NUL"), ("   ", "nothing to speak"), ("```\n```", "nothing to speak")):
        with pytest.raises(ValidationError, match=why):
            check_input(bad, 10)


def test_wav_header_gives_the_true_frame_count() -> None:
    pcm = struct.pack("<4h", 0, 1000, -1000, 32767)
    data = wav_header(len(pcm), 22050) + pcm
    assert len(wav_header(0, 22050)) == 44
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 22050, 4)
        assert w.readframes(4) == pcm


def test_parse_wav_prefix_reads_a_streaming_header_with_placeholder_sizes() -> None:
    # espeak-ng writes 0x7ffff000-style sizes when its output is a pipe
    header = bytearray(wav_header(0, 22050))
    struct.pack_into("<I", header, 4, 0x7FFFF024)
    struct.pack_into("<I", header, 40, 0x7FFFF000)
    stream = bytes(header) + b"\x01\x02\x03\x04"
    for cut in range(0, 44):
        assert parse_wav_prefix(stream[:cut]) is None
    fmt, offset = parse_wav_prefix(stream) or (None, 0)
    assert fmt == v.WavFormat(22050, 1, 16) and offset == 44


def test_parse_wav_prefix_skips_other_chunks_and_refuses_garbage() -> None:
    base = wav_header(0, 16000)
    with_list = base[:36] + b"LIST" + struct.pack("<I", 3) + b"abc\x00" + base[36:]
    parsed = parse_wav_prefix(with_list)
    assert parsed is not None and parsed[0].rate_hz == 16000 and parsed[1] == len(with_list)
    with pytest.raises(ValueError, match="not a WAV"):
        parse_wav_prefix(b"ID3\x00" + b"\x00" * 40)
    with pytest.raises(ValueError, match="not PCM"):
        parse_wav_prefix(base[:20] + struct.pack("<H", 3) + base[22:])
    with pytest.raises(ValueError, match="too large"):
        parse_wav_prefix(base[:12] + b"JUNK" + struct.pack("<I", 10**6))


def test_piper_sample_rate_from_voice_config() -> None:
    assert piper_sample_rate({"audio": {"sample_rate": 22050}}) == 22050
    bads: list[dict[str, Any]] = [{}, {"audio": {}}, {"audio": {"sample_rate": "22050"}}, {"audio": {"sample_rate": 100}}, {"audio": []}]
    for bad in bads:
        with pytest.raises(ValueError, match="sample_rate"):
            piper_sample_rate(bad)


def test_speakable_cuts_a_long_answer_after_a_sentence() -> None:
    text = "First sentence here. Second one is longer than the rest. Third."
    assert speakable(text, 100) == text
    cut = speakable(text, 40)
    assert cut == "First sentence here." and len(cut) <= 40


def test_voice_rejects_unknown_engine() -> None:
    with pytest.raises(ValueError, match="espeak-ng, piper"):
        v.Voice(engine="festival")


# ---- the OpenAI request body (api/speech.py) ----------------------------------------------


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "tts-1", "input": "Hello there.", "voice": "alloy", **kw}


def test_parse_speech_request_defaults_to_wav() -> None:
    req = parse_speech_request(body(), max_input_chars=4096)
    assert (req.model, req.input, req.voice, req.fmt, req.speed, req.language) == ("tts-1", "Hello there.", "alloy", "wav", 1.0, None)


def test_parse_speech_request_reads_every_field() -> None:
    req = parse_speech_request(
        body(voice={"id": "nova"}, response_format="PCM", speed=2, language="fr-FR", instructions="cheerful", model="anything/else"),
        max_input_chars=4096,
    )
    assert (req.voice, req.fmt, req.speed, req.language, req.model) == ("nova", "pcm", 2.0, "fr-FR", "anything/else")


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
def test_encoded_formats_are_refused_naming_the_supported_ones(fmt: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_speech_request(body(response_format=fmt), max_input_chars=4096)
    assert err.value.param == "response_format" and "wav, pcm" in str(err.value) and fmt in str(err.value)


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"input": None}, "input"),
        ({"input": ""}, "input"),
        ({"input": "x" * 101}, "input"),
        ({"input": ["a"]}, "input"),
        ({"voice": None}, "voice"),
        ({"voice": 7}, "voice"),
        ({"voice": {"name": "x"}}, "voice.id"),
        ({"voice": "x" * 100}, "voice"),
        ({"speed": 0.1}, "speed"),
        ({"speed": 5}, "speed"),
        ({"speed": "fast"}, "speed"),
        ({"response_format": "ogg"}, "response_format"),
        ({"response_format": 1}, "response_format"),
        ({"stream_format": "sse"}, "stream_format"),
        ({"language": "not a tag"}, "language"),
        ({"instructions": 5}, "instructions"),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(bad: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_speech_request(body(**bad), max_input_chars=100)
    assert err.value.param == param


def test_header_value_cannot_inject_headers() -> None:
    assert header_value("tts-1") == "tts-1"
    assert "\r" not in header_value("x\r\nSet-Cookie: a=b") and "\n" not in header_value("x\r\nSet-Cookie: a=b")
    assert header_value("modèle").isascii()
