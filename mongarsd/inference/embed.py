"""Neurons: sentence embeddings with ONNX Runtime (all-MiniLM-L6-v2, 384-d), batched and cached.

All ONNX Runtime and tokenizer work runs on one dedicated worker thread, so session load,
inference and unload never race and never block the event loop. There is no fallback: when the
model is missing or broken, callers get `EmbedderUnavailableError`, never fake vectors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, NoReturn

import numpy as np
import numpy.typing as npt
import structlog

from mongarsd.errors import EmbedderUnavailableError, ValidationError
from mongarsd.heap import trim_heap
from mongarsd.inference.onnx_convert import CONVERT_VERSION, model_convert_version

log = structlog.get_logger("mongarsd.embed")

MODEL_ID: Final = "all-minilm-l6-v2"
DEFAULT_DIM: Final = 384
DEFAULT_MAX_SEQ_TOKENS: Final = 256  # sentence_bert_config.json max_seq_length
MAX_TEXTS_PER_REQUEST: Final = 2048
VARIANT_FILES: Final = {"int8": "model.int8.onnx", "fp32": "model.onnx"}
REQUIRED_FILES: Final = ("tokenizer.json", "config.json")
OUTPUT_NAME: Final = "sentence_embedding"
# ONNX Runtime's fusion of the residual Add and LayerNormalization into SkipLayerNormalization:
# its CPU kernel was 5x slower than the two ops it replaces on the int8 model (36 vs ~8 ms of a
# 260 ms batch of 32 on an AVX2 core), the fp32 model is not fused either way.
DISABLED_OPTIMIZERS: Final = ("SkipLayerNormFusion",)
# Once no batch has run for this long, the batches' freed buffers go back to the OS (they stay
# in glibc's heap during a burst: see mongarsd.heap.MMAP_THRESHOLD). A client that sends a batch
# every few seconds keeps them: trimmed 2 s after each batch, its next first batch faulted them in
# again (P6 0.90-0.96 of a bare session with 2.5 s between batches; 0.99-1.01 kept).
TRIM_IDLE_S: Final = 10.0
INSTALL_HINT: Final = "install it with `python -m mongarsd.inference.defaults --models-dir DIR`"
# Accelerated providers we try first when present, in order of preference.
KNOWN_PROVIDERS: Final = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)

Vectors = npt.NDArray[np.float32]


def select_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Keep the requested providers that this onnxruntime build has; CPU is always the last resort.

    The entry "auto" stands for KNOWN_PROVIDERS (TensorRT, CUDA, OpenVINO, CPU) in that order.
    """
    wanted: list[str] = []
    for name in requested:
        for p in KNOWN_PROVIDERS if name == "auto" else (name,):
            if p not in wanted:
                wanted.append(p)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def validate_texts(texts: object, max_texts: int = MAX_TEXTS_PER_REQUEST) -> list[str]:
    """Check a client's list of texts and return it as a list (pure)."""
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise ValidationError("input must be a list of strings", param="input")
    if not texts:
        raise ValidationError("input must not be empty", param="input")
    if len(texts) > max_texts:
        raise ValidationError(f"input has {len(texts)} texts; at most {max_texts} per request", param="input")
    out: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValidationError(f"input[{i}] must be a string, not {type(text).__name__}", param="input")
        out.append(text)
    return out


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices by token length (shortest first) into batches, to pad as little as possible."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Embedder:
    """Embedding service: tokenizer + ONNX Runtime session on a single worker thread."""

    name = "embed"
    start_timeout_s = 60.0
    stop_timeout_s = 2.0

    def __init__(
        self,
        *,
        model_dir: Path,
        variant: str = "int8",
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        batch_size: int = 32,
        idle_unload_s: float = 600.0,
        cache_entries: int = 4096,
        preload: bool = True,
        max_texts: int = MAX_TEXTS_PER_REQUEST,
    ) -> None:
        if variant not in VARIANT_FILES:
            raise ValueError(f"variant must be one of {sorted(VARIANT_FILES)}, not {variant!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model_dir = Path(model_dir)
        self.variant = variant
        self.threads = threads
        self.requested_providers = tuple(providers)
        self.batch_size = batch_size
        self.idle_unload_s = idle_unload_s
        self.cache_entries = cache_entries
        self.preload = preload
        self.max_texts = max_texts

        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the worker thread (except reads of `is not None`).
        self._session: Any = None
        self._tokenizer: Any = None
        self._max_seq_tokens = DEFAULT_MAX_SEQ_TOKENS
        self._digest: tuple[tuple[int, int], str] | None = None
        self._dim = DEFAULT_DIM
        self._providers_used: list[str] = []
        self._last_error: str | None = None
        # Loop-side state.
        self._cache: OrderedDict[str, Vectors] = OrderedDict()
        self._trim_handle: asyncio.TimerHandle | None = None
        self._last_used = time.monotonic()
        self._in_flight = 0
        self._stats = {
            "requests": 0,
            "texts": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "batches": 0,
            "loads": 0,
            "unloads": 0,
            "trims": 0,  # idle trims handed to the worker thread
        }

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Return the embedding width."""
        return self._dim

    @property
    def model_id(self) -> str:
        """Return the public model id."""
        return MODEL_ID

    @property
    def loaded(self) -> bool:
        """Say whether the ONNX session is in memory."""
        return self._session is not None

    @property
    def last_error(self) -> str | None:
        """Return why the last load failed, or None."""
        return self._last_error

    @property
    def model_path(self) -> Path:
        """Return the ONNX file of the configured variant."""
        return self.model_dir / VARIANT_FILES[self.variant]

    def stats(self) -> dict[str, Any]:
        """Return counters for metrics and status."""
        return {
            **self._stats,
            "cache_entries": len(self._cache),
            "loaded": self.loaded,
            "variant": self.variant,
            "providers": list(self._providers_used),
        }

    # ------------------------------------------------------------------ lifecycle

    async def async_start(self) -> None:
        """Start the worker thread, load the tokenizer and, with preload, the session."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mongarsd-embed")
        try:
            if self.preload:
                await self._async_call(self._ensure_session_blocking)
            else:
                # Lazy: check the files now (clear errors at start), load them on first use.
                files = (self.model_dir / "tokenizer.json", self.model_path)
                missing = await self._async_call(lambda: [p.name for p in files if not p.is_file()])
                if missing:
                    self._fail(f"embedding model files missing in {self.model_dir}: {', '.join(missing)}")
        except EmbedderUnavailableError as err:
            # Start degraded rather than take the daemon down: recall and /v1/embeddings
            # report the error on every call until the files are fixed.
            log.error("embed_unavailable", model_dir=str(self.model_dir), error=str(err))
        self._last_used = time.monotonic()

    async def async_stop(self) -> None:
        """Drop the session and stop the worker thread (idempotent)."""
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # Queued behind any running batch, so the join below finds an idle thread.
        await asyncio.get_running_loop().run_in_executor(executor, self._unload_blocking)
        # Joining the worker blocks (briefly: it is idle by now), so it happens off the loop too.
        await asyncio.to_thread(executor.shutdown, wait=True)
        self._cache.clear()

    async def async_unload_if_idle(self, now: float | None = None) -> bool:
        """Unload the session when unused for `idle_unload_s`; return True if it was unloaded."""
        now = time.monotonic() if now is None else now
        if not self.loaded or self._in_flight or now - self._last_used < self.idle_unload_s:
            return False
        unloaded = bool(await self._async_call(self._unload_blocking))
        if unloaded:
            self._stats["unloads"] += 1
            log.info("embed_unloaded", idle_s=round(now - self._last_used, 1))
        return unloaded

    # ------------------------------------------------------------------ API

    async def async_embed(self, texts: Sequence[str]) -> Vectors:
        """Embed texts; return float32 [n, dim], each row L2-normalised."""
        items = validate_texts(texts, self.max_texts)
        self._stats["requests"] += 1
        self._stats["texts"] += len(items)
        found: dict[str, Vectors] = {}
        missing: list[str] = []
        for text in items:
            if text in found:
                continue
            vec = self._cache.get(text)
            if vec is not None:
                self._cache.move_to_end(text)
                found[text] = vec
            elif text not in missing:
                missing.append(text)
        self._stats["cache_hits"] += len(items) - sum(1 for t in items if t in missing)
        self._stats["cache_misses"] += sum(1 for t in items if t in missing)
        if missing:
            self._in_flight += 1
            try:
                vectors, batches = await self._async_call(self._embed_blocking, missing)
            finally:
                self._in_flight -= 1
                self._last_used = time.monotonic()
                self._schedule_trim()
            self._stats["batches"] += batches
            for text, vec in zip(missing, vectors, strict=True):
                vec.flags.writeable = False
                found[text] = vec
                self._remember(text, vec)
        else:
            self._last_used = time.monotonic()
        return np.stack([found[t] for t in items]).astype(np.float32, copy=False)

    async def async_digest(self) -> str:
        """sha256 of the model file, as Ollama lists digests ("" when unreadable); hashed once per file version."""
        path = self.model_path

        def compute() -> tuple[tuple[int, int], str]:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if self._digest is not None and self._digest[0] == stamp:
                return self._digest
            h = hashlib.sha256()
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            return stamp, h.hexdigest()

        try:
            self._digest = await asyncio.to_thread(compute)
        except OSError:
            return ""
        return self._digest[1]

    @property
    def max_seq_tokens(self) -> int:
        """Tokens the model reads per text; longer texts are truncated (known once the tokenizer is loaded)."""
        return self._max_seq_tokens

    async def async_count_tokens(self, texts: Sequence[str]) -> list[int]:
        """count_tokens on the embedder's worker thread: the first call may load the tokenizer."""
        items = validate_texts(texts, self.max_texts)
        counts: list[int] = await self._async_call(self.count_tokens, items)
        return counts

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Return the tokens the model sees per text (special tokens included, truncated).

        Without preload the tokenizer is read on first use: a one-off ~0.5 MB parse, then cached.
        """
        items = validate_texts(texts, self.max_texts)
        if self._tokenizer is None:
            self._load_tokenizer_blocking()
        tok = self._tokenizer
        if tok is None:
            raise EmbedderUnavailableError(self._last_error or "embedder tokenizer is not loaded")
        return [len(enc.ids) for enc in tok.encode_batch(items)]

    # ------------------------------------------------------------------ internals

    def _remember(self, text: str, vec: Vectors) -> None:
        if self.cache_entries <= 0:
            return
        self._cache[text] = vec
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)

    def _schedule_trim(self) -> None:
        """(Re)arm the idle trim: TRIM_IDLE_S after the last batch (loop only)."""
        if self._trim_handle is not None:
            self._trim_handle.cancel()
        self._trim_handle = asyncio.get_running_loop().call_later(TRIM_IDLE_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim_handle = None
        executor = self._executor
        if executor is None or self._in_flight:
            return  # stopped, or a batch is running: its end re-arms the trim
        self._stats["trims"] += 1
        executor.submit(trim_heap)  # malloc_trim walks every arena: off the loop, behind no batch

    async def _async_call(self, fn: Any, *args: Any) -> Any:
        executor = self._executor
        if executor is None:
            raise EmbedderUnavailableError("embedder is not running")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def _load_tokenizer_blocking(self) -> None:
        """Load tokenizer.json and the model config (worker thread)."""
        if self._tokenizer is not None:
            return
        for name in REQUIRED_FILES:
            if not (self.model_dir / name).is_file():
                self._fail(f"embedding model file {self.model_dir / name} is missing; {INSTALL_HINT}")
        from tokenizers import Tokenizer

        try:
            config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
            self._dim = int(config["hidden_size"])
            st_path = self.model_dir / "sentence_bert_config.json"
            if st_path.is_file():
                st = json.loads(st_path.read_text(encoding="utf-8"))
                self._max_seq_tokens = int(st.get("max_seq_length", DEFAULT_MAX_SEQ_TOKENS))
            tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        except Exception as err:  # tokenizers raises plain Exception on a corrupt tokenizer.json
            self._fail(f"cannot load embedding tokenizer/config from {self.model_dir}: {err}")
        # tokenizer.json ships with fixed 128 padding/truncation; we pad per batch ourselves
        # and truncate like sentence-transformers (max_seq_length).
        tok.no_padding()
        tok.enable_truncation(max_length=self._max_seq_tokens)
        self._tokenizer = tok

    def _fail(self, message: str) -> NoReturn:
        self._last_error = message
        raise EmbedderUnavailableError(message)

    def _ensure_session_blocking(self) -> None:
        """Load the ONNX session if it is not loaded (worker thread)."""
        self._load_tokenizer_blocking()
        if self._session is not None:
            return
        path = self.model_path
        if not path.is_file():
            self._fail(f"embedding model {path} is missing; {INSTALL_HINT}")
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = select_providers(self.requested_providers, available)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(0, self.threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Do not spin idle worker threads: on a small board llama.cpp needs those cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Without the arena, peak-sized buffers of odd-shaped batches go back to the OS (~35 MB here)
        # at no measured speed cost; memory patterns stay on: turning them off saved ~24 MB but cost
        # a few percent of embeddings/s (DESIGN §9 P6 vs P8).
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3
        started = time.monotonic()
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers, disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as err:  # onnxruntime's pybind errors derive from Exception only
            self._fail(f"cannot load embedding model {path}: {err}")
        outputs = {o.name for o in session.get_outputs()}
        if OUTPUT_NAME not in outputs:
            self._fail(f"embedding model {path} has no {OUTPUT_NAME!r} output (has {sorted(outputs)})")
        self._session = session
        self._providers_used = list(session.get_providers())
        self._last_error = None
        self._stats["loads"] += 1
        version = model_convert_version(session.get_modelmeta().custom_metadata_map)
        if version != CONVERT_VERSION:
            # an install from before the last converter change: it works, but not as measured
            log.warning("embed_model_outdated", path=str(path), convert_version=version, current=CONVERT_VERSION, hint=INSTALL_HINT)
        log.info(
            "embed_loaded",
            model=MODEL_ID,
            variant=self.variant,
            convert_version=version,
            path=str(path),
            providers=self._providers_used,
            requested=list(self.requested_providers),
            threads=self.threads,
            load_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _unload_blocking(self) -> bool:
        """Drop the session (worker thread); return True if one was loaded."""
        had = self._session is not None
        self._session = None
        if had:
            trim_heap()  # the session's weights and buffers
        return had

    def _embed_blocking(self, texts: list[str]) -> tuple[list[Vectors], int]:
        """Tokenize, batch and run the session (worker thread); return vectors and batch count."""
        self._ensure_session_blocking()
        session = self._session
        encodings = [self._tokenizer.encode(t) for t in texts]
        out: list[Vectors | None] = [None] * len(texts)
        batches = plan_batches([len(e.ids) for e in encodings], self.batch_size)
        for batch in batches:
            width = max(len(encodings[i].ids) for i in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            types = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                enc = encodings[i]
                n = len(enc.ids)
                ids[row, :n] = enc.ids
                mask[row, :n] = 1
                types[row, :n] = enc.type_ids
            try:
                (emb,) = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
            except Exception as err:  # onnxruntime's pybind errors derive from Exception only
                raise EmbedderUnavailableError(f"embedding inference failed: {err}") from err
            emb = np.asarray(emb, dtype=np.float32)
            for row, i in enumerate(batch):
                out[i] = emb[row].copy()
        result = [v for v in out if v is not None]
        if len(result) != len(texts):
            raise EmbedderUnavailableError("embedding inference returned too few rows")
        return result, len(batches)
