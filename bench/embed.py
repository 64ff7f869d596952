"""P6: embeddings/s through mongarsd's Embedder vs a bare onnxruntime session, int8 vs fp32.

Both sides run in this process, one after the other, on the same ONNX file, the same
intra-op threads and the same texts in batches of 32; the bare side tokenizes with the same
tokenizer.json, pads each batch to its longest text and calls `session.run` directly. The
Embedder's cache is off (`cache_entries=0`) and every text is new, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from bench.common import BenchSettings, Skip, make_entry, median, skipped_entry, spread

BATCH: Final = 32
BATCHES_PER_REP: Final = 4
REPS: Final = 3
MAX_SEQ_TOKENS: Final = 256
MODEL_DIR_NAME: Final = "all-minilm-l6-v2"
FILES: Final = {"int8": "model.int8.onnx", "fp32": "model.onnx"}

_SUBJECTS = (
    "The river",
    "A small robot",
    "My neighbour",
    "The old library",
    "This recipe",
    "The night train",
    "Our garden",
    "The committee",
)
_VERBS = ("remembers", "explains", "carries", "measures", "forgets", "describes", "repairs", "celebrates")
_OBJECTS = (
    "the history of the valley and the people who built the first bridge",
    "a careful plan for the harvest before the winter storms arrive",
    "three reasons why the battery drains faster in cold weather",
    "the quiet joy of reading letters written many years ago",
    "how to keep bread fresh for a week without a refrigerator",
    "the noise of the market on a busy Saturday morning",
)


def make_texts(seed: int, n: int) -> list[str]:
    """Return n distinct sentences of 12–30 words (deterministic)."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} (note {seed}-{i}), {rng.choice(_OBJECTS)}." for i in range(n)
    ]


class BareSession:
    """The reference: tokenizer + onnxruntime.InferenceSession and nothing else."""

    def __init__(self, model_dir: Path, variant: str, threads: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_dir / FILES[variant]), sess_options=opts, providers=["CPUExecutionProvider"])
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=MAX_SEQ_TOKENS)

    def embed(self, texts: Sequence[str]) -> Any:
        """Embed one batch (blocking)."""
        import numpy as np

        encs = [self.tok.encode(t) for t in texts]
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, e in enumerate(encs):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
            types[row, : len(e.ids)] = e.type_ids
        (out,) = self.session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        return out


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


async def async_measure(model_dir: Path, threads: int) -> dict[str, dict[str, list[float]]]:
    """Interleave Embedder and bare session for both variants; return embeddings/s samples."""
    from mongarsd.inference.embed import Embedder

    rates: dict[str, dict[str, list[float]]] = {v: {"embedder": [], "bare": []} for v in FILES}
    embedders = {
        v: Embedder(model_dir=model_dir, variant=v, threads=threads, batch_size=BATCH, cache_entries=0, preload=True) for v in FILES
    }
    bares = {v: BareSession(model_dir, v, threads) for v in FILES}
    try:
        for emb in embedders.values():
            await emb.async_start()
            if not emb.loaded:
                raise Skip(f"Embedder did not load: {emb.last_error}")
        for v in FILES:  # warm-up: first runs allocate arenas
            await embedders[v].async_embed(make_texts(1, BATCH))
            bares[v].embed(make_texts(2, BATCH))
        seed = 10
        for _ in range(REPS):
            for v in FILES:
                seed += 1
                texts = make_texts(seed, BATCH * BATCHES_PER_REP)
                t0 = time.perf_counter()
                for i in range(0, len(texts), BATCH):  # one call per batch of 32, as a client would
                    await embedders[v].async_embed(texts[i : i + BATCH])
                rates[v]["embedder"].append(_rate(len(texts), time.perf_counter() - t0))
                seed += 1
                texts = make_texts(seed, BATCH * BATCHES_PER_REP)
                t0 = time.perf_counter()
                for i in range(0, len(texts), BATCH):
                    bares[v].embed(texts[i : i + BATCH])
                rates[v]["bare"].append(_rate(len(texts), time.perf_counter() - t0))
    finally:
        for emb in embedders.values():
            await emb.async_stop()
    return rates


def run(results: dict[str, Any], *, settings: BenchSettings, log: Callable[[str], None] = print) -> None:
    """Measure P6 into results."""
    model_dir = settings.models_dir / MODEL_DIR_NAME
    missing = [name for name in (*FILES.values(), "tokenizer.json") if not (model_dir / name).is_file()]
    if missing:
        results["P6"] = skipped_entry("P6", f"missing in {model_dir}: {', '.join(missing)} (make install)")
        return
    try:
        from mongarsd.inference.embed import Embedder  # noqa: F401  (present?)
    except ImportError as err:
        results["P6"] = skipped_entry("P6", f"mongarsd.inference.embed is not importable: {err}")
        return
    threads = settings.embed_threads
    try:
        rates = asyncio.run(async_measure(model_dir, threads))
    except Skip as err:
        results["P6"] = skipped_entry("P6", str(err))
        return
    e8, b8 = median(rates["int8"]["embedder"]), median(rates["int8"]["bare"])
    e32, b32 = median(rates["fp32"]["embedder"]), median(rates["fp32"]["bare"])
    speedup = e8 / e32 if e8 and e32 else None
    details = {
        "method": f"{REPS} interleaved reps of {BATCH * BATCHES_PER_REP} new texts, one call per batch of {BATCH}; embeddings/s medians",
        "threads": threads,
        "int8_embedder": spread(rates["int8"]["embedder"]),
        "int8_bare": spread(rates["int8"]["bare"]),
        "fp32_embedder": spread(rates["fp32"]["embedder"]),
        "fp32_bare": spread(rates["fp32"]["bare"]),
        "fp32_ratio": round(e32 / b32, 3) if e32 and b32 else None,
        "bare_int8_speedup": round(b8 / b32, 3) if b8 and b32 else None,
    }
    results["P6"] = make_entry("P6", value=e8, reference=b8, int8_speedup=speedup, details=details)
    log(f"  P6 int8 {e8:.1f}/s vs bare {b8:.1f}/s; fp32 {e32:.1f}/s" if e8 and b8 and e32 else "  P6 done")
