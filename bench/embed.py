"""P6: embeddings/s through mongarsd's Embedder vs a bare onnxruntime session, int8 vs fp32.

Both sides run in this process, one after the other, on the same ONNX file, the same
intra-op threads and the same texts in batches of 32; the bare side tokenizes with the same
tokenizer.json, pads each batch to its longest text and calls `session.run` directly. The
Embedder's cache is off (`cache_entries=0`), so it recomputes every text. Each rep gives both
sides the same new texts (the padded width of a batch moves the cost by several percent) and
alternates which side goes first, so drift in the machine's load hits both alike.

int8 beats fp32 only where the CPU multiplies int8 faster than fp32 (VNNI, Arm dot product);
the details record the CPU's relevant features and the bare int8/fp32 GEMM speed ratio at
the batch's shape, the ceiling for `int8_speedup` on that machine.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from bench.common import BenchSettings, Skip, make_entry, median, paired_ratio, per_rep_ratios, round_ratio, skipped_entry, spread

BATCH: Final = 32
BATCHES_PER_REP: Final = 4
REPS: Final = 9  # P6: 5 reps scattered 0.68-1.38 per rep on a noisy VM, and their median with them
MAX_SEQ_TOKENS: Final = 256
MODEL_DIR_NAME: Final = "all-minilm-l6-v2"
FILES: Final = {"int8": "model.int8.onnx", "fp32": "model.onnx"}
GEMM_SHAPE: Final = (BATCH * 32, 384, 1536)  # tokens of a batch x hidden -> FFN width (MiniLM)
GEMM_REPS: Final = 5
# /proc/cpuinfo flags that give int8 matrix products their speed (x86 VNNI/AMX, Arm dot product/i8mm).
INT8_CPU_FLAGS: Final = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")

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
    from mongarsd.heap import tune_malloc
    from mongarsd.inference.embed import Embedder

    tune_malloc()  # the malloc settings `mongarsd run` starts with, for both sides of the ratio
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
        for rep in range(REPS):
            for v in FILES:
                seed += 1
                texts = make_texts(seed, BATCH * BATCHES_PER_REP)  # the same texts for both sides
                for side in ("embedder", "bare") if rep % 2 == 0 else ("bare", "embedder"):
                    t0 = time.perf_counter()
                    for i in range(0, len(texts), BATCH):  # one call per batch of 32, as a client would
                        if side == "embedder":
                            await embedders[v].async_embed(texts[i : i + BATCH])
                        else:
                            bares[v].embed(texts[i : i + BATCH])
                    rates[v][side].append(_rate(len(texts), time.perf_counter() - t0))
    finally:
        for emb in embedders.values():
            await emb.async_stop()
    return rates


def cpu_int8_flags() -> list[str]:
    """Return which of INT8_CPU_FLAGS this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in INT8_CPU_FLAGS if f in flags]


def gemm_int8_speedup(threads: int) -> float | None:
    """Time one fp32 MatMul vs its int8 MatMulInteger in bare onnxruntime; return fp32 time / int8 time."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)

    def best_s(elem: int, b: Any, x: Any) -> float:
        graph = helper.make_graph(
            [helper.make_node("MatMul" if elem == TensorProto.FLOAT else "MatMulInteger", ["x", "b"], ["y"])],
            "gemm",
            [helper.make_tensor_value_info("x", elem, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT if elem == TensorProto.FLOAT else TensorProto.INT32, [m, n])],
            initializer=[numpy_helper.from_array(b, "b")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"x": x})
        times = []
        for _ in range(GEMM_REPS):
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
        return min(times)

    fp32 = best_s(TensorProto.FLOAT, rng.normal(size=(k, n)).astype(np.float32), rng.normal(size=(m, k)).astype(np.float32))
    # uint8 activations x int8 weights: what dynamic quantisation runs.
    int8 = best_s(TensorProto.UINT8, rng.integers(-64, 64, size=(k, n), dtype=np.int8), rng.integers(0, 256, size=(m, k), dtype=np.uint8))
    return round(fp32 / int8, 3) if int8 > 0 else None


def run(results: dict[str, Any], *, settings: BenchSettings, log: Callable[[str], None] = print) -> None:
    """Measure P6 into results."""
    model_dir = settings.models_dir / MODEL_DIR_NAME
    missing = [name for name in (*FILES.values(), "tokenizer.json") if not (model_dir / name).is_file()]
    if missing:
        results["P6"] = skipped_entry("P6", f"missing in {model_dir}: {', '.join(missing)} (make install)")
        return
    try:
        from mongarsd.inference.embed import DISABLED_OPTIMIZERS
    except ImportError as err:
        results["P6"] = skipped_entry("P6", f"mongarsd.inference.embed is not importable: {err}")
        return
    threads = settings.embed_threads
    try:
        rates = asyncio.run(async_measure(model_dir, threads))
    except Skip as err:
        results["P6"] = skipped_entry("P6", str(err))
        return
    # Ratios are medians of per-rep ratios, as P1/P2/P4/P15 take them: a rep's int8 and fp32
    # passes (and its two sides) run back to back, so a slow stretch of the machine hits both.
    i8e, i8b, f32e, f32b = rates["int8"]["embedder"], rates["int8"]["bare"], rates["fp32"]["embedder"], rates["fp32"]["bare"]
    e8, b8, e32 = median(i8e), median(i8b), median(f32e)
    details = {
        "method": (
            f"{REPS} reps of {BATCH * BATCHES_PER_REP} new texts, the same for both sides, which alternate going first; "
            f"one call per batch of {BATCH}; embeddings/s medians; ratio and int8_speedup are medians of per-rep ratios"
        ),
        "int8_ratio_per_rep": spread(per_rep_ratios(i8e, i8b)),
        "int8_speedup_per_rep": spread(per_rep_ratios(i8e, f32e)),
        "cpu_int8_flags": cpu_int8_flags(),
        "gemm_int8_speedup": gemm_int8_speedup(threads),
        "threads": threads,
        # the Embedder's only graph-level difference from a bare session (ONNX Runtime's defaults)
        "embedder_disabled_optimizers": list(DISABLED_OPTIMIZERS),
        "int8_embedder": spread(i8e),
        "int8_bare": spread(i8b),
        "fp32_embedder": spread(f32e),
        "fp32_bare": spread(f32b),
        "fp32_ratio": round_ratio(paired_ratio(f32e, f32b)),
        "bare_int8_speedup": round_ratio(paired_ratio(i8b, f32b)),
    }
    results["P6"] = make_entry(
        "P6", value=e8, reference=b8, ratio=paired_ratio(i8e, i8b), int8_speedup=paired_ratio(i8e, f32e), details=details
    )
    log(f"  P6 int8 {e8:.1f}/s vs bare {b8:.1f}/s; fp32 {e32:.1f}/s" if e8 and b8 and e32 else "  P6 done")
