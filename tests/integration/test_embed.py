"""Neurons: the converted all-MiniLM-L6-v2 ONNX models and the Embedder service, for real."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import structlog
from tokenizers import Tokenizer

from mongarsd.errors import EmbedderUnavailableError, ValidationError
from mongarsd.inference import embed as embed_mod
from mongarsd.inference import onnx_convert as oc
from mongarsd.inference.defaults import EMBED_DIR_NAME, install_default_models
from mongarsd.inference.embed import MAX_TEXTS_PER_REQUEST, Embedder, select_providers

REPO = Path(__file__).resolve().parents[2]

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The stock market fell today.",
    "Hello",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "Le chat dort sur le canapé.",
    "Remind me to buy milk tomorrow morning, and also eggs if they are on sale.",
    "Why is the sky blue?",
    "The quick brown fox jumps over the lazy dog, then runs into the forest to hide from the hunters.",
]

# The int8 model's quality gate: short, long, code, numbers, other scripts, emoji, special tokens.
VARIED = [
    "hi",
    "no",
    "Sure.",
    "OK",
    "?",
    "42",
    "3.14159",
    "2024-11-30T08:50:57Z",
    "A man is eating food.",
    "The stock market fell sharply after the announcement.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "I love this!!! 😍😍😍",
    "lol idk tbh, ttyl",
    "https://example.com/path?q=1&r=2",
    "Remind me to buy milk tomorrow morning, and also eggs if they are on sale.",
    "ERROR 2024-01-01 kernel: Out of memory: Killed process 1234 (python)",
    "The patient was prescribed 5 mg of amlodipine once daily for hypertension.",
    " ".join(["The history of the valley and the people who built the first bridge is long."] * 12),
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "[CLS] [SEP] [PAD] [UNK] [MASK]",
]
INT8_MIN_COSINE = 0.98


@pytest.fixture(scope="session")
def model_dir() -> Path:
    install_default_models(REPO / "models", REPO / ".cache" / "models", progress=lambda _line: None)
    assert "torch" not in sys.modules, "the installer must not import torch"
    return REPO / "models" / EMBED_DIR_NAME


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> np.ndarray[Any, Any]:
    """Numpy reference embeddings of SENTENCES, tokenized like sentence-transformers."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    feed = _feed(enc)
    cfg = oc.BertConfig.load(model_dir / "config.json")
    weights = oc.load_weights(model_dir / "model.safetensors")
    _, sent = oc.reference_forward(weights, cfg, feed["input_ids"], feed["attention_mask"], feed["token_type_ids"])
    return sent


def _feed(encodings: list[Any]) -> dict[str, np.ndarray[Any, Any]]:
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def _onnx_embed(path: Path, model_dir: Path, texts: list[str]) -> np.ndarray[Any, Any]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(["sentence_embedding"], _feed(tok.encode_batch(texts)))
    return np.asarray(out)


@pytest.fixture
async def embedder(model_dir: Path) -> Any:
    emb = Embedder(model_dir=model_dir, variant="int8", batch_size=4, cache_entries=64)
    await emb.async_start()
    yield emb
    await emb.async_stop()


# ---------------------------------------------------------------- conversion proof


def test_reference_is_a_sentence_encoder(reference: np.ndarray[Any, Any]) -> None:
    sims = reference @ reference.T
    np.testing.assert_allclose(np.diag(sims), 1.0, atol=1e-5)
    assert sims[0, 1] > 0.6  # eating food / eating bread
    assert sims[0, 1] > sims[0, 2] + 0.3  # ... vs riding a horse
    assert sims[0, 1] > sims[0, 3] + 0.3  # ... vs the stock market


def test_fp32_onnx_matches_numpy_reference(model_dir: Path, reference: np.ndarray[Any, Any]) -> None:
    got = _onnx_embed(model_dir / "model.onnx", model_dir, SENTENCES)
    cos = (got * reference).sum(axis=1)
    assert cos.min() >= 0.999, cos


def test_int8_onnx_is_close_to_reference(model_dir: Path, reference: np.ndarray[Any, Any]) -> None:
    got = _onnx_embed(model_dir / "model.int8.onnx", model_dir, SENTENCES)
    cos = (got * reference).sum(axis=1)
    assert cos.min() >= 0.98, cos
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2]
    assert sims[0, 1] > sims[0, 3]


def test_int8_model_is_close_to_fp32_model_on_varied_texts(model_dir: Path) -> None:
    fp32 = _onnx_embed(model_dir / "model.onnx", model_dir, VARIED)
    int8 = _onnx_embed(model_dir / "model.int8.onnx", model_dir, VARIED)
    cos = (fp32 * int8).sum(axis=1)
    worst = int(cos.argmin())
    assert cos.min() >= INT8_MIN_COSINE, f"{VARIED[worst]!r}: {cos[worst]:.4f}"


def test_int8_model_stores_the_word_table_in_int8(model_dir: Path) -> None:
    import onnx

    model = onnx.load(str(model_dir / "model.int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["embeddings.word_embeddings.weight_int8"].data_type == onnx.TensorProto.INT8
    big_fp32 = [t.name for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1_000_000]
    assert big_fp32 == [], big_fp32  # 47 MB as fp32 before; the largest fp32 tensor left is 0.6 M weights
    assert (model_dir / "model.int8.onnx").stat().st_size < 30_000_000  # was 60 MB with the fp32 table
    assert oc.model_convert_version({p.key: p.value for p in model.metadata_props}) == oc.CONVERT_VERSION


def test_int8_model_quantises_every_linear_and_keeps_the_outlier_channels_in_fp32(model_dir: Path) -> None:
    import onnx

    model = onnx.load(str(model_dir / "model.int8.onnx"))
    quantised = {n.name.removesuffix(".matmul_quant") for n in model.graph.node if n.op_type == "MatMulInteger"}
    linears = {
        f"encoder.layer.{i}.{name}"
        for i in range(6)
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    assert quantised == linears  # layer 0's down-projection included: its outlier channel has its own path
    side = {n.name for n in model.graph.node if oc.OUTLIER_PATH in n.name}
    assert side, "the calibration found no outlier channel: MiniLM has five"
    assert {n.op_type for n in model.graph.node if n.name in side} == {"MatMul"}  # fp32
    assert sum(n.op_type == "FastGelu" for n in model.graph.node) == 6


@pytest.mark.parametrize("variant", ["fp32", "int8"])
async def test_embedder_matches_reference_and_ranks(model_dir: Path, reference: np.ndarray[Any, Any], variant: str) -> None:
    emb = Embedder(model_dir=model_dir, variant=variant, batch_size=3)
    await emb.async_start()
    try:
        got = await emb.async_embed(SENTENCES)
    finally:
        await emb.async_stop()
    assert got.dtype == np.float32
    assert got.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * reference).sum(axis=1)
    assert cos.min() >= (0.999 if variant == "fp32" else 0.98), cos
    assert got[0] @ got[1] > got[0] @ got[2]
    assert got[0] @ got[1] > got[0] @ got[3]


async def test_batch_result_equals_single_result(model_dir: Path) -> None:
    batched = Embedder(model_dir=model_dir, variant="fp32", batch_size=32, cache_entries=0)
    single = Embedder(model_dir=model_dir, variant="fp32", batch_size=1, cache_entries=0)
    await batched.async_start()
    await single.async_start()
    try:
        many = await batched.async_embed(SENTENCES)
        one_by_one = np.concatenate([await single.async_embed([s]) for s in SENTENCES])
    finally:
        await batched.async_stop()
        await single.async_stop()
    np.testing.assert_allclose(many, one_by_one, atol=1e-5)
    assert batched.stats()["batches"] == 1
    assert single.stats()["batches"] == len(SENTENCES)


# ---------------------------------------------------------------- service behaviour


async def test_batching_and_cache_counters(embedder: Embedder) -> None:
    first = await embedder.async_embed(SENTENCES)
    s = embedder.stats()
    assert (s["requests"], s["texts"], s["cache_misses"], s["cache_hits"]) == (1, 10, 10, 0)
    assert s["batches"] == 3  # 10 texts, batch_size 4
    again = await embedder.async_embed([SENTENCES[3], SENTENCES[0], "A new sentence."])
    s = embedder.stats()
    assert (s["cache_hits"], s["cache_misses"], s["batches"]) == (2, 11, 4)
    np.testing.assert_array_equal(again[0], first[3])
    np.testing.assert_array_equal(again[1], first[0])
    again[0][:] = 0  # callers own their result; the cache is unaffected
    np.testing.assert_array_equal((await embedder.async_embed([SENTENCES[3]]))[0], first[3])


async def test_cache_is_bounded_lru(model_dir: Path) -> None:
    emb = Embedder(model_dir=model_dir, cache_entries=2)
    await emb.async_start()
    try:
        await emb.async_embed(["a", "b"])
        await emb.async_embed(["a"])  # a is now most recent
        await emb.async_embed(["c"])  # evicts b
        assert emb.stats()["cache_entries"] == 2
        hits = emb.stats()["cache_hits"]
        await emb.async_embed(["a"])
        assert emb.stats()["cache_hits"] == hits + 1
        misses = emb.stats()["cache_misses"]
        await emb.async_embed(["b"])
        assert emb.stats()["cache_misses"] == misses + 1
    finally:
        await emb.async_stop()


async def test_duplicate_texts_in_one_request(embedder: Embedder) -> None:
    out = await embedder.async_embed(["same", "same", "other"])
    np.testing.assert_array_equal(out[0], out[1])
    assert embedder.stats()["batches"] == 1


async def test_idle_unload_then_transparent_reload(model_dir: Path) -> None:
    emb = Embedder(model_dir=model_dir, idle_unload_s=0.0, cache_entries=0)
    await emb.async_start()
    try:
        assert emb.loaded
        before = await emb.async_embed(["keep me warm"])
        assert await emb.async_unload_if_idle()
        assert not emb.loaded
        assert not await emb.async_unload_if_idle()  # nothing left to unload
        after = await emb.async_embed(["keep me warm"])
        assert emb.loaded
        np.testing.assert_allclose(before, after, atol=1e-6)
        assert emb.stats()["loads"] == 2
        assert emb.stats()["unloads"] == 1
    finally:
        await emb.async_stop()


async def test_a_burst_keeps_its_buffers_and_hands_them_back_once_idle(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[str] = []

    def recording_trim() -> None:
        trims.append(threading.current_thread().name)
        real_trim()

    real_trim = embed_mod.trim_heap
    monkeypatch.setattr(embed_mod, "trim_heap", recording_trim)
    monkeypatch.setattr(embed_mod, "TRIM_IDLE_S", 0.2)
    emb = Embedder(model_dir=model_dir, cache_entries=0)
    await emb.async_start()
    try:
        for i in range(4):  # a burst: each batch re-arms the idle timer
            await emb.async_embed([f"burst {i} text {j}" for j in range(8)])
        assert trims == [] and emb.stats()["trims"] == 0
        for _ in range(100):
            if trims:
                break
            await asyncio.sleep(0.02)
        assert emb.stats()["trims"] == 1 and len(trims) == 1 and trims[0].startswith("mongarsd-embed")
        await asyncio.sleep(0.4)
        assert emb.stats()["trims"] == 1  # nothing ran since: no second trim
    finally:
        await emb.async_stop()
    assert len(trims) == 2  # stopping drops the session and hands its memory back too


async def test_not_idle_yet_is_kept(model_dir: Path) -> None:
    emb = Embedder(model_dir=model_dir, idle_unload_s=600.0)
    await emb.async_start()
    try:
        await emb.async_embed(["x"])
        assert not await emb.async_unload_if_idle()
        assert emb.loaded
    finally:
        await emb.async_stop()


async def test_lazy_load_without_preload(model_dir: Path) -> None:
    emb = Embedder(model_dir=model_dir, preload=False)
    await emb.async_start()
    try:
        assert not emb.loaded
        assert await emb.async_count_tokens(["hello world"]) == [4]  # [CLS] hello world [SEP]
        out = await emb.async_embed(["hello world"])
        assert emb.loaded
        assert out.shape == (1, 384)
    finally:
        await emb.async_stop()


async def test_count_tokens_truncates_like_the_model(embedder: Embedder) -> None:
    counts = await embedder.async_count_tokens(["hi", "word " * 1000])
    assert counts == [3, 256]


@pytest.fixture
def broken_dir(model_dir: Path, tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "broken"
    d.mkdir()
    for name in ("tokenizer.json", "config.json", "sentence_bert_config.json"):
        shutil.copy(model_dir / name, d / name)
    yield d


async def test_missing_model_dir_is_unavailable(tmp_path: Path) -> None:
    emb = Embedder(model_dir=tmp_path / "nope")
    await emb.async_start()  # starts degraded, never fakes vectors
    try:
        assert not emb.loaded
        with pytest.raises(EmbedderUnavailableError, match="missing"):
            await emb.async_embed(["hello"])
        with pytest.raises(EmbedderUnavailableError):
            await emb.async_count_tokens(["hello"])
        assert emb.last_error is not None
    finally:
        await emb.async_stop()


async def test_corrupt_model_file_is_unavailable(broken_dir: Path) -> None:
    await asyncio.to_thread((broken_dir / "model.int8.onnx").write_bytes, b"\x08\x07garbage" * 100)
    emb = Embedder(model_dir=broken_dir)
    await emb.async_start()
    try:
        with pytest.raises(EmbedderUnavailableError, match="cannot load embedding model"):
            await emb.async_embed(["hello"])
    finally:
        await emb.async_stop()


async def test_model_from_an_older_converter_loads_with_a_warning(model_dir: Path, broken_dir: Path) -> None:
    import onnx

    def write_old() -> None:
        model = onnx.load(str(model_dir / "model.int8.onnx"))
        del model.metadata_props[:]  # what CONVERT_VERSION <= 2 wrote
        onnx.save_model(model, str(broken_dir / "model.int8.onnx"))

    await asyncio.to_thread(write_old)
    emb = Embedder(model_dir=broken_dir)
    with structlog.testing.capture_logs() as logs:
        await emb.async_start()
    try:
        assert emb.loaded
        assert (await emb.async_embed(["hello"])).shape == (1, 384)
    finally:
        await emb.async_stop()
    outdated = [e for e in logs if e["event"] == "embed_model_outdated"]
    assert outdated
    assert outdated[0]["convert_version"] is None
    assert outdated[0]["current"] == oc.CONVERT_VERSION


async def test_current_model_loads_without_warning(model_dir: Path) -> None:
    emb = Embedder(model_dir=model_dir)
    with structlog.testing.capture_logs() as logs:
        await emb.async_start()
    await emb.async_stop()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == []


async def test_missing_variant_file_is_unavailable(broken_dir: Path) -> None:
    emb = Embedder(model_dir=broken_dir, variant="fp32")
    await emb.async_start()
    try:
        assert await emb.async_count_tokens(["hi"]) == [3]  # tokenizer is fine
        with pytest.raises(EmbedderUnavailableError, match=r"model\.onnx is missing"):
            await emb.async_embed(["hello"])
    finally:
        await emb.async_stop()


async def test_not_started_is_unavailable(model_dir: Path) -> None:
    emb = Embedder(model_dir=model_dir)
    with pytest.raises(EmbedderUnavailableError, match="not running"):
        await emb.async_embed(["hello"])
    await emb.async_stop()  # idempotent, even when never started


@pytest.mark.parametrize(
    "bad",
    [[], "a plain string", [1, 2], ["ok", None], ["x"] * (MAX_TEXTS_PER_REQUEST + 1), None],
)
async def test_bad_input_is_a_validation_error(embedder: Embedder, bad: Any) -> None:
    with pytest.raises(ValidationError) as info:
        await embedder.async_embed(bad)
    assert info.value.param == "input"
    assert embedder.stats()["requests"] == 0


def test_select_providers_keeps_available_and_cpu_last() -> None:
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["CPUExecutionProvider"], avail) == ["CPUExecutionProvider"]
    assert select_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], avail) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert select_providers(["auto"], avail) == avail
    assert select_providers(["OpenVINOExecutionProvider"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


async def test_stop_is_idempotent_and_unloads(model_dir: Path) -> None:
    emb = Embedder(model_dir=model_dir)
    await emb.async_start()
    assert emb.loaded
    await emb.async_stop()
    await emb.async_stop()
    assert not emb.loaded
    with pytest.raises(EmbedderUnavailableError):
        await emb.async_embed(["after stop"])
