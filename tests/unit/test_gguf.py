"""GGUF header reader: valid files, hostile files, and a fuzz of arbitrary bytes."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mongarsd.errors import ModelError
from mongarsd.inference import gguf
from mongarsd.inference.gguf import ArrayInfo, parse_gguf_bytes, read_gguf
from mongarsd.inference.models import ModelRegistry, model_id_for
from tests.conftest import DEFAULT_LLM, requires_models

DEFAULT_MODEL = DEFAULT_LLM


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", gguf.T_STRING) + s(value)


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<I", gguf.T_UINT32) + struct.pack("<I", value)


def kv_arr_str(key: str, items: Sequence[str]) -> bytes:
    body = b"".join(s(i) for i in items)
    return s(key) + struct.pack("<IIQ", gguf.T_ARRAY, gguf.T_STRING, len(items)) + body


def kv_arr_i32(key: str, items: Sequence[int]) -> bytes:
    body = b"".join(struct.pack("<i", i) for i in items)
    return s(key) + struct.pack("<IIQ", gguf.T_ARRAY, gguf.T_INT32, len(items)) + body


def tensor(name: str, shape: Sequence[int], offset: int = 0) -> bytes:
    dims = b"".join(struct.pack("<Q", d) for d in shape)
    return s(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", 2, offset)


def build(kvs: Sequence[bytes], tensors: Sequence[bytes] = (), *, version: int = 3, pad: int = 64) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    return head + b"".join(kvs) + b"".join(tensors) + b"\0" * pad


def tiny_model() -> bytes:
    return build(
        [
            kv_str("general.architecture", "llama"),
            kv_str("general.name", "Tiny Test"),
            kv_str("general.size_label", "1K"),
            kv_u32("general.file_type", 3),
            kv_u32("llama.context_length", 4096),
            kv_str("tokenizer.chat_template", "{{ messages }}"),
            kv_arr_str("tokenizer.ggml.tokens", ["a", "b", "c"]),
            kv_arr_i32("tokenizer.ggml.token_type", list(range(gguf.KEEP_ARRAY_ITEMS + 5))),
        ],
        [tensor("tok_embd.weight", (8, 4)), tensor("output.weight", (4, 2), 32)],
    )


def test_valid_header_is_read() -> None:
    info = parse_gguf_bytes(tiny_model())
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.name == "Tiny Test"
    assert info.size_label == "1K"
    assert info.quantization == "Q4_1"
    assert info.context_length == 4096
    assert info.chat_template == "{{ messages }}"
    assert info.parameter_count == 8 * 4 + 4 * 2
    assert info.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert info.metadata["tokenizer.ggml.token_type"] == ArrayInfo(gguf.T_INT32, gguf.KEEP_ARRAY_ITEMS + 5)


def test_version_2_is_accepted() -> None:
    assert parse_gguf_bytes(build([kv_str("general.architecture", "gpt2")], version=2)).architecture == "gpt2"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "only 0 bytes"),
        (b"GGML" + b"\0" * 40, "bad magic"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "unsupported GGUF version 1"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, gguf.MAX_KV_COUNT + 1), "metadata count"),
        (b"GGUF" + struct.pack("<IQQ", 3, gguf.MAX_TENSOR_COUNT + 1, 0), "tensor count"),
        (b"GGUF" + struct.pack("<I", 3), "truncated"),
    ],
)
def test_malformed_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        parse_gguf_bytes(data)


def test_truncation_anywhere_is_a_model_error() -> None:
    data = tiny_model()
    end = parse_gguf_bytes(data).header_bytes
    for cut in range(end):
        with pytest.raises(ModelError):
            parse_gguf_bytes(data[:cut])


def test_huge_string_length_is_refused_before_allocation() -> None:
    bad = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<IQ", gguf.T_STRING, 2**62)
    with pytest.raises(ModelError, match="over the cap"):
        parse_gguf_bytes(bad + b"\0" * 64)


def test_huge_key_length_is_refused() -> None:
    bad = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40)
    with pytest.raises(ModelError, match="metadata key"):
        parse_gguf_bytes(bad + b"\0" * 64)


def test_huge_array_is_refused() -> None:
    bad = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<IIQ", gguf.T_ARRAY, gguf.T_UINT8, 2**50)
    with pytest.raises(ModelError, match="over the cap"):
        parse_gguf_bytes(bad + b"\0" * 64)


def test_array_claiming_more_than_the_file_is_truncated() -> None:
    bad = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<IIQ", gguf.T_ARRAY, gguf.T_UINT64, 100_000)
    with pytest.raises(ModelError, match="truncated"):
        parse_gguf_bytes(bad + b"\0" * 64)


def test_nested_arrays_are_bounded() -> None:
    value = b""
    for _ in range(gguf.MAX_NESTING + 1):
        value = struct.pack("<IQ", gguf.T_ARRAY, 1) + value
    bad = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<I", gguf.T_ARRAY) + value
    with pytest.raises(ModelError):
        parse_gguf_bytes(bad + b"\0" * 64)


def test_unknown_value_type_and_bad_utf8() -> None:
    with pytest.raises(ModelError, match="unknown GGUF value type"):
        parse_gguf_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<I", 99) + b"\0" * 16)
    with pytest.raises(ModelError, match="UTF-8"):
        parse_gguf_bytes(build([s("k") + struct.pack("<I", gguf.T_STRING) + s(b"\xff\xfe")]))


def test_tensor_past_end_and_bad_dims_are_refused() -> None:
    with pytest.raises(ModelError, match="past the end"):
        parse_gguf_bytes(build([], [tensor("t", (2,), offset=10**9)]))
    with pytest.raises(ModelError, match="dims"):
        parse_gguf_bytes(build([], [tensor("t", (1, 1, 1, 1, 1))]))
    with pytest.raises(ModelError, match="shape"):
        parse_gguf_bytes(build([], [tensor("t", (0,))]))


def test_metadata_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf, "MAX_METADATA_BYTES", 64)
    with pytest.raises(ModelError, match="exceeds"):
        parse_gguf_bytes(tiny_model())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_never_crash(data: bytes) -> None:
    for candidate in (data, b"GGUF" + data, b"GGUF\x03\0\0\0" + data):
        try:
            parse_gguf_bytes(candidate)
        except ModelError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.binary(min_size=1, max_size=8))
def test_fuzz_mutated_valid_file(position: int, junk: bytes) -> None:
    data = bytearray(tiny_model())
    pos = position % len(data)
    data[pos : pos + len(junk)] = junk
    try:
        parse_gguf_bytes(bytes(data))
    except ModelError:
        pass


def test_model_ids() -> None:
    assert model_id_for("SmolLM2-135M-Instruct-Q4_1", "Q4_1") == "smollm2-135m-instruct:q4_1"
    assert model_id_for("qwen2.5-0.5b-instruct-q4_k_m", "Q4_K_M") == "qwen2.5-0.5b-instruct:q4_k_m"
    assert model_id_for("Llama 3 8B.Q8_0", "Q8_0") == "llama-3-8b:q8_0"
    assert model_id_for("mystery", None) == "mystery:latest"
    assert model_id_for("phi-f16", None) == "phi:latest"


def test_registry_lists_good_files_and_reports_bad_ones(tmp_path: Path) -> None:
    (tmp_path / "Tiny-Test-Q4_1.gguf").write_bytes(tiny_model())
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\0\0\0garbage")
    (tmp_path / "notes.txt").write_text("ignored")
    reg = ModelRegistry(tmp_path)
    models = reg.list()
    assert [m.id for m in models] == ["tiny-test:q4_1"]
    entry = reg.get("tiny-test:q4_1")
    assert entry.architecture == "llama"
    assert entry.quantization == "Q4_1"
    assert entry.context_length == 4096
    assert entry.parameters == 40
    assert entry.size == len(tiny_model())
    assert len(entry.sha256) == 64
    assert [e.path.name for e in reg.errors()] == ["broken.gguf"]
    assert reg.get("tiny-test") is entry  # tag-less lookup when unambiguous
    with pytest.raises(ModelError, match=r"unknown model 'nope'.*tiny-test:q4_1"):
        reg.get("nope")


def test_registry_add_and_remove(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    good = src_dir / "Other-Q8_0.gguf"
    good.write_bytes(tiny_model())
    bad = src_dir / "bad.gguf"
    bad.write_bytes(b"not a model")
    reg = ModelRegistry(tmp_path / "models")
    assert reg.list() == []
    entry = reg.add(good)
    assert entry.id == "other:q4_1"
    assert (tmp_path / "models" / "Other-Q8_0.gguf").exists()
    with pytest.raises(ModelError, match="already exists"):
        reg.add(good)
    with pytest.raises(ModelError, match="bad magic"):
        reg.add(bad)
    assert not list((tmp_path / "models").glob(".*part"))
    reg.remove("other:q4_1")
    assert reg.list() == []
    assert not (tmp_path / "models" / "Other-Q8_0.gguf").exists()
    with pytest.raises(ModelError):
        reg.remove("other:q4_1")


@requires_models(DEFAULT_LLM)
def test_default_model_header() -> None:
    info = read_gguf(DEFAULT_MODEL)
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.parameter_count is not None and 100_000_000 < info.parameter_count < 200_000_000
    reg = ModelRegistry(DEFAULT_MODEL.parent)
    assert reg.get("smollm2-135m-instruct:q4_1").path == DEFAULT_MODEL
