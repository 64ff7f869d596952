"""Inference manager: load GGUF models on demand, keep them warm, unload idle ones.

One `LlamaEngine` per loaded model. Loads are serialised (one at a time: a small board has
one memory budget and one disk), checked against the memory budget first (idle models are
evicted least recently used first), and shared: concurrent requests for a model that is
loading wait for the same load. Each use sets the model's expiry (`keep_alive`, Ollama's
semantics: 0 unloads after the request, negative keeps it forever); an owned loop unloads
expired models that nobody is using.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil
import structlog

from mongarsd.errors import ModelError, MongarsError, NotFoundError, OverloadedError, ValidationError
from mongarsd.inference.gguf import GGUFInfo, read_gguf
from mongarsd.inference.kv_cache import KV_CACHE_TYPES, kv_cache_types, kv_layout
from mongarsd.inference.llm import LlamaEngine
from mongarsd.inference.models import ModelEntry, ModelRegistry, model_id_for
from mongarsd.inference.settings import EngineSettings
from mongarsd.supervisor import TaskSupervisor

if TYPE_CHECKING:
    from mongarsd.board import BoardInfo
    from mongarsd.metrics import Metrics, Sample

log = structlog.get_logger("mongarsd.inference.manager")

FOREVER_S = math.inf
IDLE_CHECK_MAX_S = 30.0  # the idle loop wakes at least this often
LOAD_WAIT_S = 120.0  # a request waits this long for a model that is loading, then gets 503
BUDGET_FRACTION_OF_RAM = 0.6  # memory_budget_mb = 0: this share of the board's RAM
COMPUTE_OVERHEAD_MB = 48.0  # compute buffers, batch, sampler state per loaded model (measured ~30-40 MB for SmolLM2)
BUSY_RETRY_AFTER_S = 5.0
IDLE_TASK = "inference-idle"
# Engine settings the Evolution Engine may override for later loads (maintenance/evolution.py).
OVERRIDABLE_SETTINGS = frozenset(
    {"threads", "threads_batch", "n_batch", "n_ubatch", "kv_cache_type", "flash_attn", "use_mmap", "use_mlock", "slots"}
)


class EngineFactory(Protocol):
    """Builds the engine of one model (LlamaEngine; tests pass fakes)."""

    def __call__(self, *, model_path: Path, settings: EngineSettings, model_id: str) -> LlamaEngine: ...


# ----------------------------------------------------------------------------------------
# Pure decisions


_DURATION_RE = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: object, *, param: str = "keep_alive") -> float | None:
    """Parse Ollama's keep_alive: seconds (number) or a Go duration ("5m", "1h30m"); None if absent.

    Negative values mean forever (returned as math.inf); 0 means unload after the request.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValidationError("'" + param + '\' must be a number of seconds or a duration like "5m"', param=param)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValidationError("'" + param + "' must be finite", param=param)
        return FOREVER_S if value < 0 else float(value)
    if not isinstance(value, str):
        raise ValidationError("'" + param + '\' must be a number of seconds or a duration like "5m"', param=param)
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ValidationError("'" + param + "' must be finite", param=param)
        return FOREVER_S if number < 0 else number
    negative = text.startswith("-")
    body = text[1:] if negative else text
    parts = _DURATION_RE.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValidationError(
            "'" + param + "' is not a duration: " + repr(value[:40]) + ' (use e.g. "30s", "5m", "1h", 0 or -1)', param=param
        )
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if negative and seconds > 0:
        return FOREVER_S
    return seconds


def kv_bytes_per_cell(info: GGUFInfo, kv_cache_type: str, flash_attn: bool) -> float:
    """Return the KV cache bytes one context cell takes for this model (pure)."""
    meta = info.metadata
    arch = info.architecture or ""

    def num(key: str) -> int | None:
        value = meta.get(arch + "." + key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    layers = num("block_count")
    embd = num("embedding_length")
    heads = num("attention.head_count")
    if layers is None or embd is None or heads is None:
        return 0.0
    heads_kv = num("attention.head_count_kv") or heads
    k_len = num("attention.key_length") or embd // heads
    v_len = num("attention.value_length") or embd // heads
    # the cache types the engine will use (V quantized only with flash attention); an unknown one counts as f16
    k, v = kv_cache_types(kv_cache_type if kv_cache_type in KV_CACHE_TYPES else "f16", flash_attn=flash_attn)
    return float(layers * heads_kv * (k_len * k.bytes_per_elem + v_len * v.bytes_per_elem))


def estimate_model_mb(
    file_bytes: int,
    info: GGUFInfo | None,
    *,
    n_ctx: int,
    kv_cache_type: str,
    flash_attn: bool,
    slots: int = 1,
    kv_pool: int = 0,
    prompt_cache_mb: int = 0,
) -> float:
    """Estimate the resident memory of a loaded model: weights + KV cache + compute buffers (pure).

    `n_ctx` is one request's context; the cache holds kv_layout's cells, and a shared pool's idle
    conversations up to `prompt_cache_mb` more in host memory.
    """
    weights = file_bytes / 2**20
    if info is None:
        return weights * 1.2 + COMPUTE_OVERHEAD_MB
    layout = kv_layout(n_ctx=n_ctx, slots=slots, kv_pool=kv_pool, flash_attn=flash_attn, n_ctx_train=info.context_length or 0)
    kv = kv_bytes_per_cell(info, kv_cache_type, flash_attn) * layout.cells / 2**20
    return weights + kv + COMPUTE_OVERHEAD_MB + (prompt_cache_mb if layout.unified else 0)


@dataclass(frozen=True, slots=True)
class Resident:
    """What eviction planning needs to know about one loaded model."""

    model_id: str
    size_mb: float
    busy: bool
    last_used: float


def plan_evictions(budget_mb: float, need_mb: float, resident: Sequence[Resident]) -> list[str] | None:
    """Return the idle models to unload (least recently used first) so `need_mb` fits, else None (pure)."""
    if need_mb > budget_mb:
        return None
    free = budget_mb - sum(r.size_mb for r in resident)
    evict: list[str] = []
    for r in sorted((r for r in resident if not r.busy), key=lambda r: r.last_used):
        if free >= need_mb:
            break
        evict.append(r.model_id)
        free += r.size_mb
    return evict if free >= need_mb else None


def effective_budget_mb(memory_budget_mb: int, ram_mb: int) -> float:
    """Return the memory budget: the configured one, else BUDGET_FRACTION_OF_RAM of the RAM (pure)."""
    if memory_budget_mb > 0:
        return float(memory_budget_mb)
    return ram_mb * BUDGET_FRACTION_OF_RAM


def set_engine_threads(engine: Any, threads: int, threads_batch: int) -> bool:
    """Change a loaded engine's thread counts for its next decodes; False where llama.cpp cannot.

    Call only while the engine decodes nothing: llama.cpp reads the counts at each decode.
    """
    llama = getattr(engine, "_llama", None)  # LlamaEngine's LlamaContext (fakes in tests have none)
    lib = getattr(llama, "lib", None)
    ctx = getattr(llama, "ctx", None)
    if lib is None or ctx is None or not hasattr(lib, "llama_set_n_threads"):
        return False
    lib.llama_set_n_threads(ctx, threads, threads_batch)
    return True


def iso_time(ts: float) -> str:
    """Format a UNIX time as RFC 3339 with the local offset, like Ollama."""
    return datetime.fromtimestamp(ts, tz=UTC).astimezone().isoformat()


# ----------------------------------------------------------------------------------------
# State


@dataclass(slots=True)
class LoadedModel:
    """One model in memory and its lifetime bookkeeping (loop-side)."""

    entry: ModelEntry
    engine: LlamaEngine
    size_mb: float
    loaded_at: float  # wall clock
    load_s: float
    keep_alive_s: float
    expires_at: float  # monotonic; inf = never
    pinned: bool = False
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    stale: bool = False  # loaded with settings since overridden: unloaded once idle
    threads_now: tuple[int, int] = (0, 0)  # (threads, threads_batch) set at runtime; (0, 0): as loaded

    @property
    def busy(self) -> bool:
        if self.active:
            return True
        stats = self.engine.stats()
        return stats.slots_busy > 0 or stats.requests_deferred > 0


@dataclass(frozen=True, slots=True)
class Lease:
    """A model in use by one request; `load_s` is the load time this request waited for."""

    entry: ModelEntry
    engine: LlamaEngine
    load_s: float


@dataclass(frozen=True, slots=True)
class LoadedInfo:
    """A loaded model as /api/ps shows it."""

    entry: ModelEntry
    size_mb: float
    loaded_at: float
    expires_at_wall: float  # inf = never
    keep_alive_s: float
    active: int
    slots_total: int
    slots_busy: int
    requests_deferred: int
    n_ctx: int


class InferenceManager:
    """Service: the loaded models, their memory budget and keep-alive, and their metrics."""

    name = "inference"
    start_timeout_s = 180.0
    stop_timeout_s = 6.0  # engines stop together: one thread join each (ENGINE_JOIN_TIMEOUT_S) plus freeing

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        default_model: str = "smollm2-135m-instruct:q4_1",
        engine: EngineSettings = EngineSettings(),
        keep_alive_s: float = 300.0,
        memory_budget_mb: int = 0,
        max_tokens_default: int = 256,
        max_prompt_chars: int = 200_000,
        preload: bool = True,
        board: BoardInfo | None = None,
        metrics: Metrics | None = None,
        engine_factory: EngineFactory = LlamaEngine,
        tasks: TaskSupervisor | None = None,
    ) -> None:
        self.registry = registry
        self.default_model = default_model
        threads = engine.threads
        if threads <= 0 and board is not None:
            from mongarsd.board import recommended_threads

            threads = recommended_threads(board)
        # every engine gets the same resolved thread counts
        self.engine_settings = replace(engine, threads=threads, threads_batch=engine.threads_batch if engine.threads_batch > 0 else threads)
        self._configured = self.engine_settings
        self._batch_follows_threads = engine.threads_batch <= 0
        self.overrides: dict[str, Any] = {}
        self.thermal_hot = False
        self._capacity = asyncio.Event()  # set when a lease ends or the board cools (thermal admission)
        self.keep_alive_s = FOREVER_S if keep_alive_s < 0 else keep_alive_s
        ram_mb = board.ram_mb if board is not None and board.ram_mb > 0 else int(psutil.virtual_memory().total / 2**20)
        self.budget_mb = effective_budget_mb(memory_budget_mb, ram_mb)
        self.max_tokens_default = max_tokens_default
        self.max_prompt_chars = max_prompt_chars
        self.preload = preload
        self._metrics = metrics
        self._engine_factory = engine_factory

        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._load_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks = tasks if tasks is not None else TaskSupervisor()
        self._started = False
        self.loads_total = 0
        self.load_failures_total = 0
        self.unloads_total = 0

    @classmethod
    def from_config(
        cls,
        section: Any,
        *,
        registry: ModelRegistry,
        board: BoardInfo | None,
        metrics: Metrics | None,
        tasks: TaskSupervisor | None = None,
    ) -> InferenceManager:
        """Build from the `[inference]` config section."""
        return cls(
            registry=registry,
            default_model=section.default_model,
            engine=EngineSettings(
                n_ctx=section.n_ctx,
                n_batch=section.n_batch,
                n_ubatch=section.n_ubatch,
                threads=section.threads,
                threads_batch=section.threads_batch,
                slots=section.slots,
                kv_pool=section.kv_pool,
                queue_depth=section.queue_depth,
                kv_cache_type=section.kv_cache_type,
                flash_attn=section.flash_attn,
                use_mmap=section.use_mmap,
                use_mlock=section.use_mlock,
                gpu_layers=section.gpu_layers,
                stream_interval_ms=section.stream_interval_ms,
                prompt_cache_mb=section.prompt_cache_mb,
                prefetch_bytes=section.prefetch_bytes,
            ),
            keep_alive_s=section.keep_alive_s,
            memory_budget_mb=section.memory_budget_mb,
            max_tokens_default=section.max_tokens_default,
            max_prompt_chars=section.max_prompt_chars,
            preload=section.preload,
            board=board,
            metrics=metrics,
            tasks=tasks,
        )

    # ------------------------------------------------------------------ lifecycle

    async def async_start(self) -> None:
        """Scan the models folder, preload the default model, start the idle-unload loop."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.registry.scan)
        if self._metrics is not None:
            self._metrics.add_source(self._metrics_source)
        self._tasks.spawn(IDLE_TASK, self._async_idle_loop, restart=True, owner=self)
        if self.preload and self.default_model:
            try:
                entry = await self.async_resolve(self.default_model)
                await self._async_get_loaded(entry, wait_s=self.start_timeout_s)
            except (ModelError, NotFoundError, OverloadedError) as err:
                # the daemon serves the other models (and says why this one is missing)
                log.error("default_model_preload_failed", model=self.default_model, error=str(err))

    async def async_stop(self) -> None:
        """Stop the idle loop and every engine (idempotent)."""
        if not self._started:
            return
        self._started = False
        # the idle loop and the loads in flight (their waiters get CancelledError), then the engines
        await self._tasks.async_stop(self.stop_timeout_s, owner=self)
        async with self._load_lock:
            models, self._models = list(self._models.values()), {}
            results = await asyncio.gather(*(m.engine.async_stop() for m in models), return_exceptions=True)
        for m, res in zip(models, results, strict=True):
            if isinstance(res, BaseException):
                log.error("model_stop_failed", model=m.entry.id, error=repr(res))
        if self._metrics is not None:
            self._metrics.remove_source(self._metrics_source)

    # ------------------------------------------------------------------ models

    async def async_list_models(self) -> list[ModelEntry]:
        """Return the usable models of the models folder (rescans it)."""
        await asyncio.to_thread(self.registry.scan)
        return self.registry.list()

    async def async_resolve(self, model_id: str) -> ModelEntry:
        """Return the registry entry for a client's model name; NotFoundError/ModelError if none."""
        name = model_id.strip()
        candidates = [name]
        if name.lower().endswith(":latest"):
            candidates.append(name[: -len(":latest")])
        for rescan in (False, True):
            if rescan:
                await asyncio.to_thread(self.registry.scan)  # a file may have been added meanwhile
            for cand in candidates:
                try:
                    return self.registry.get(cand)
                except ModelError:
                    continue
        base = name.lower().split(":", 1)[0]
        for bad in self.registry.errors():
            if model_id_for(bad.path.stem, None).split(":", 1)[0] == base:
                raise ModelError("model file " + bad.path.name + " cannot be used: " + bad.error)
        raise NotFoundError("model '" + model_id + "' not found", param="model")

    @contextlib.asynccontextmanager
    async def async_use(self, model_id: str, *, keep_alive_s: float | None = None) -> AsyncIterator[Lease]:
        """Hold a model for one request (loading it if needed); set its expiry when done."""
        entry = await self.async_resolve(model_id)
        t0 = time.monotonic()
        was_loaded = entry.id in self._models
        lm = await self._async_get_loaded(entry)
        if self.thermal_hot:
            await self._async_thermal_admit(lm)
        self._apply_threads(lm)
        load_s = 0.0 if was_loaded else time.monotonic() - t0
        lm.active += 1
        try:
            yield Lease(entry=entry, engine=lm.engine, load_s=load_s)
        finally:
            lm.active -= 1
            self._capacity.set()
            self._touch(lm, keep_alive_s)

    async def async_engine(self, model_id: str, *, keep_alive_s: float | None = None) -> LlamaEngine:
        """Return the loaded engine for `model_id` (loading it if needed) and refresh its expiry."""
        entry = await self.async_resolve(model_id)
        lm = await self._async_get_loaded(entry)
        self._touch(lm, keep_alive_s)
        return lm.engine

    async def async_load(self, model_id: str, *, keep_alive_s: float | None = None) -> Lease:
        """Load a model without generating (Ollama's empty request); return how long it took."""
        async with self.async_use(model_id, keep_alive_s=keep_alive_s) as lease:
            return lease

    async def async_unload(self, model_id: str) -> bool:
        """Unload a model now if it is loaded and idle; return whether it was unloaded."""
        entry = await self.async_resolve(model_id)
        async with self._load_lock:
            lm = self._models.get(entry.id)
            if lm is None:
                return False
            if lm.busy:
                lm.expires_at = time.monotonic()  # unload as soon as it is idle
                self._wake.set()
                return False
            await self._async_unload_locked(entry.id, reason="requested")
            return True

    async def async_apply_overrides(self, overrides: Mapping[str, Any]) -> list[str]:
        """Load every model from now on with the configured settings plus `overrides`; return the ids unloaded now.

        Idle models are unloaded at once so that their next lease loads them with the new
        settings; a model that is generating is marked and unloaded once idle, never interrupted.
        An empty mapping restores the configured settings. ValidationError for an unknown key or
        a value EngineSettings refuses.
        """
        unknown = sorted(set(overrides) - OVERRIDABLE_SETTINGS)
        if unknown:
            raise ValidationError("settings that cannot be overridden: " + ", ".join(unknown), param="overrides")
        values = dict(overrides)
        for key, value in values.items():
            expected = type(getattr(self._configured, key))
            if type(value) is not expected:  # bool is an int subclass: compare exact types
                raise ValidationError("setting " + key + " must be of type " + expected.__name__, param="overrides")
        if "threads" in values and "threads_batch" not in values and self._batch_follows_threads:
            values["threads_batch"] = values["threads"]
        settings = replace(self._configured, **values)  # EngineSettings checks slots and the KV cache type
        if settings.threads < 1 or settings.threads_batch < 1 or settings.n_batch < 1 or settings.n_ubatch < 1:
            raise ValidationError("threads, threads_batch, n_batch and n_ubatch must be >= 1", param="overrides")
        self.overrides = dict(overrides)
        self.engine_settings = settings
        unloaded: list[str] = []
        async with self._load_lock:
            for model_id, lm in list(self._models.items()):
                if lm.engine.settings == settings:
                    lm.stale = False
                elif lm.busy:
                    lm.stale = True
                else:
                    await self._async_unload_locked(model_id, reason="settings_changed")
                    unloaded.append(model_id)
        self._wake.set()
        log.info("engine_overrides_applied", overrides=self.overrides, unloaded=unloaded)
        return unloaded

    def set_thermal_limit(self, hot: bool) -> None:
        """While hot, admit at most half the slots (at least one) per model and start generations with half the threads.

        Requests over the limit wait for a lease to end (at most LOAD_WAIT_S, then 503). The
        thread count changes between decodes only (llama_set_n_threads on an idle model, or at
        a model's next lease once it is idle); both are restored when cool.
        """
        if hot == self.thermal_hot:
            return
        self.thermal_hot = hot
        log.info("inference_thermal_limit", hot=hot)
        for lm in list(self._models.values()):
            self._apply_threads(lm)
        self._capacity.set()

    def thermal_slots(self, lm: LoadedModel) -> int:
        """Return how many leases of a model may generate at once now (all of them when cool)."""
        slots = max(int(getattr(lm.engine, "slots", 1)), 1)
        return max(1, slots // 2) if self.thermal_hot else slots

    async def _async_thermal_admit(self, lm: LoadedModel) -> None:
        deadline = time.monotonic() + LOAD_WAIT_S
        while self.thermal_hot and lm.active >= self.thermal_slots(lm):
            self._capacity.clear()
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(self._capacity.wait(), timeout=remaining)
            except TimeoutError:
                raise OverloadedError(
                    "the board is hot: model " + lm.entry.id + " runs fewer requests at once; retry shortly",
                    retry_after_s=BUSY_RETRY_AFTER_S,
                    status=503,
                ) from None

    def _apply_threads(self, lm: LoadedModel) -> None:
        """Set the model's thread counts for the thermal state, only while no decode can run."""
        es = lm.engine.settings
        cpus = os.cpu_count() or 1  # threads 0 means every CPU (LlamaContext)
        full = (es.threads if es.threads > 0 else cpus, es.threads_batch if es.threads_batch > 0 else cpus)
        want = (max(1, full[0] // 2), max(1, full[1] // 2)) if self.thermal_hot else full
        current = lm.threads_now if lm.threads_now != (0, 0) else full
        if want == current or lm.active > 0 or lm.busy:
            return
        if set_engine_threads(lm.engine, *want):
            lm.threads_now = want
            log.info("model_threads_set", model=lm.entry.id, threads=want[0], threads_batch=want[1], hot=self.thermal_hot)

    def decode_totals(self) -> tuple[float, float]:
        """Tokens decoded and seconds spent decoding, summed over the loaded engines (for the mesh's rate)."""
        tokens = seconds = 0.0
        for lm in list(self._models.values()):
            stats = lm.engine.stats()
            tokens += float(stats.tokens_predicted_total)
            seconds += float(stats.tokens_predicted_seconds_total)
        return tokens, seconds

    def available_ids(self) -> list[str]:
        """Ids of the usable models in the models folder (blocking: reads the folder; run it in a thread)."""
        return [entry.id for entry in self.registry.list()]

    def loaded(self) -> list[LoadedInfo]:
        """Describe the loaded models (for /api/ps)."""
        now_m, now_w = time.monotonic(), time.time()
        out = []
        for lm in self._models.values():
            stats = lm.engine.stats()
            out.append(
                LoadedInfo(
                    entry=lm.entry,
                    size_mb=lm.size_mb,
                    loaded_at=lm.loaded_at,
                    expires_at_wall=FOREVER_S if math.isinf(lm.expires_at) else now_w + max(lm.expires_at - now_m, 0.0),
                    keep_alive_s=lm.keep_alive_s,
                    active=lm.active,
                    slots_total=stats.slots_total,
                    slots_busy=stats.slots_busy,
                    requests_deferred=stats.requests_deferred,
                    n_ctx=lm.engine.n_ctx_per_slot,
                )
            )
        return sorted(out, key=lambda i: i.entry.id)

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._models

    # ------------------------------------------------------------------ internals

    def _touch(self, lm: LoadedModel, keep_alive_s: float | None) -> None:
        now = time.monotonic()
        lm.last_used = now
        if keep_alive_s is None:
            if lm.pinned:
                return  # the preloaded default model stays unless a request says otherwise
            keep_alive_s = self.keep_alive_s
        lm.keep_alive_s = keep_alive_s
        lm.expires_at = FOREVER_S if math.isinf(keep_alive_s) else now + keep_alive_s
        self._wake.set()

    async def _async_get_loaded(self, entry: ModelEntry, wait_s: float = LOAD_WAIT_S) -> LoadedModel:
        lm = self._models.get(entry.id)
        if lm is not None:
            return lm
        if not self._started:
            raise OverloadedError("inference is not running", retry_after_s=1.0, status=503)
        task = self._loading.get(entry.id)
        if task is None:
            # a failed load is an answer for its waiters (the engine error is logged by _async_load), not a crash
            task = self._tasks.spawn_once("inference-load:" + entry.id, self._async_load(entry), owner=self, expected=(MongarsError,))
            self._loading[entry.id] = task
            task.add_done_callback(self._load_done)
        try:
            # shield: a client that goes away must not abort a load other requests wait for
            return await asyncio.wait_for(asyncio.shield(task), timeout=wait_s)
        except TimeoutError:
            raise OverloadedError("model " + entry.id + " is still loading; retry shortly", retry_after_s=5.0, status=503) from None

    def _load_done(self, task: asyncio.Task[LoadedModel]) -> None:
        # the error reaches every waiter through the shield; the supervisor retrieves it, so a load
        # that nobody waits for any more (all clients gone) does not log "exception never retrieved"
        for model_id, t in list(self._loading.items()):
            if t is task:
                del self._loading[model_id]

    async def _async_load(self, entry: ModelEntry) -> LoadedModel:
        async with self._load_lock:
            lm = self._models.get(entry.id)
            if lm is not None:
                return lm
            try:
                info: GGUFInfo | None = await asyncio.to_thread(read_gguf, entry.path, read_tensors=False)
            except OSError as err:
                raise ModelError("cannot read model file " + str(entry.path) + ": " + str(err)) from err
            es = self.engine_settings
            need = estimate_model_mb(
                entry.size,
                info,
                n_ctx=es.n_ctx,
                kv_cache_type=es.kv_cache_type,
                flash_attn=es.flash_attn,
                slots=es.slots,
                kv_pool=es.kv_pool,
                prompt_cache_mb=es.prompt_cache_mb,
            )
            resident = [Resident(m.entry.id, m.size_mb, m.busy, m.last_used) for m in self._models.values()]
            evict = plan_evictions(self.budget_mb, need, resident)
            if evict is None:
                self.load_failures_total += 1
                if need > self.budget_mb:
                    raise ModelError(
                        "model "
                        + entry.id
                        + " needs about "
                        + str(round(need))
                        + " MB but the memory budget is "
                        + str(round(self.budget_mb))
                        + " MB (inference.memory_budget_mb)"
                    )
                used = sum(r.size_mb for r in resident)
                raise OverloadedError(
                    "cannot load model "
                    + entry.id
                    + " (about "
                    + str(round(need))
                    + " MB): "
                    + str(round(used))
                    + " MB of the "
                    + str(round(self.budget_mb))
                    + " MB memory budget are held by models in use",
                    retry_after_s=BUSY_RETRY_AFTER_S,
                    status=503,
                )
            for model_id in evict:
                await self._async_unload_locked(model_id, reason="memory_budget")
            engine = self._engine_factory(model_path=Path(entry.path), settings=es, model_id=entry.id)
            t0 = time.monotonic()
            try:
                await engine.async_start()
            except BaseException as err:
                self.load_failures_total += 1
                with contextlib.suppress(Exception):
                    await engine.async_stop()
                if isinstance(err, ModelError):
                    log.error("model_load_failed", model=entry.id, path=str(entry.path), error=str(err))
                    raise
                if isinstance(err, Exception) and not isinstance(err, ValidationError | OverloadedError):
                    log.error("model_load_failed", model=entry.id, path=str(entry.path), error=repr(err))
                    raise ModelError("model " + entry.id + " could not be loaded: " + str(err)) from err
                raise
            load_s = time.monotonic() - t0
            now = time.monotonic()
            pinned = self.preload and entry.id == self._default_id()
            keep = FOREVER_S if pinned else self.keep_alive_s
            lm = LoadedModel(
                entry=entry,
                engine=engine,
                size_mb=need,
                loaded_at=time.time(),
                load_s=load_s,
                keep_alive_s=keep,
                expires_at=FOREVER_S if math.isinf(keep) else now + keep,
                pinned=pinned,
            )
            self._models[entry.id] = lm
            self.loads_total += 1
            self._wake.set()
            log.info(
                "model_loaded", model=entry.id, load_ms=round(load_s * 1000, 1), size_mb=round(need, 1), budget_mb=round(self.budget_mb)
            )
            return lm

    def _default_id(self) -> str:
        try:
            return self.registry.get(self.default_model).id
        except ModelError:
            return self.default_model

    async def _async_unload_locked(self, model_id: str, *, reason: str) -> None:
        lm = self._models.pop(model_id, None)
        if lm is None:
            return
        await lm.engine.async_stop()
        self.unloads_total += 1
        log.info("model_unloaded", model=model_id, reason=reason, idle_s=round(time.monotonic() - lm.last_used, 1))

    async def _async_idle_loop(self) -> None:
        """Unload expired, idle models; sleep until the next expiry (owned task)."""
        while True:
            self._wake.clear()
            now = time.monotonic()
            expired = [m.entry.id for m in self._models.values() if (m.expires_at <= now or m.stale) and not m.busy]
            if expired:
                async with self._load_lock:
                    for model_id in expired:
                        lm = self._models.get(model_id)
                        if lm is not None and (lm.expires_at <= time.monotonic() or lm.stale) and not lm.busy:
                            await self._async_unload_locked(model_id, reason="settings_changed" if lm.stale else "keep_alive")
                continue
            pending = [m.expires_at - now for m in self._models.values() if not math.isinf(m.expires_at)]
            # a busy model past its expiry is checked again shortly after its requests end
            timeout = min([IDLE_CHECK_MAX_S, *(max(p, 0.25) for p in pending)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _metrics_source(self) -> Iterable[Sample]:
        """Yield per-model engine metrics in llama-server's vocabulary, plus manager counters."""
        yield ("mongarsd_models_loaded", "gauge", "Models loaded in memory.", float(len(self._models)), {})
        yield ("mongarsd_model_loads_total", "counter", "Model loads since start.", float(self.loads_total), {})
        yield (
            "mongarsd_model_load_failures_total",
            "counter",
            "Model loads that failed or were refused.",
            float(self.load_failures_total),
            {},
        )
        yield ("mongarsd_model_unloads_total", "counter", "Model unloads since start.", float(self.unloads_total), {})
        yield ("mongarsd_memory_budget_bytes", "gauge", "Memory budget for loaded models.", self.budget_mb * 2**20, {})
        for model_id, lm in list(self._models.items()):
            labels = {"model": model_id}
            stats = lm.engine.stats()
            for name, value in stats.metrics().items():
                kind = "counter" if name.endswith("_total") else "gauge"
                yield (name, kind, _LLAMA_HELP.get(name, name), value, labels)
            yield ("llamacpp:slots_total", "gauge", "Slots (parallel sequences) of the model.", float(stats.slots_total), labels)
            yield ("llamacpp:slots_busy", "gauge", "Slots generating or prefilling now.", float(stats.slots_busy), labels)
            yield (
                "llamacpp:requests_rejected_total",
                "counter",
                "Requests refused by admission control.",
                float(stats.requests_rejected),
                labels,
            )
            yield ("llamacpp:requests_total", "counter", "Requests admitted to a slot.", float(stats.requests_total), labels)
            yield (
                "llamacpp:cached_tokens_total",
                "counter",
                "Prompt tokens reused from the prefix cache.",
                float(stats.cached_tokens_total),
                labels,
            )
            yield (
                "mongarsd_kv_evictions_total",
                "counter",
                "Idle conversations' cached prefixes dropped to make room in the shared KV pool.",
                float(stats.kv_evictions_total),
                labels,
            )
            yield (
                "mongarsd_prompt_cache_bytes",
                "gauge",
                "Idle conversations' KV cells held in host memory, out of the shared pool.",
                float(stats.prompt_cache_bytes),
                labels,
            )
            yield (
                "mongarsd_prompt_cache_entries",
                "gauge",
                "Conversations held in the prompt cache.",
                float(stats.prompt_cache_entries),
                labels,
            )
            yield (
                "mongarsd_prompt_cache_saves_total",
                "counter",
                "Idle conversations moved from the shared KV pool to the prompt cache.",
                float(stats.prompt_cache_saves_total),
                labels,
            )
            yield (
                "mongarsd_prompt_cache_restores_total",
                "counter",
                "Conversations copied back from the prompt cache instead of decoding their prompt again.",
                float(stats.prompt_cache_restores_total),
                labels,
            )
            yield ("mongarsd_model_memory_bytes", "gauge", "Estimated memory of the loaded model.", lm.size_mb * 2**20, labels)
            yield ("mongarsd_model_active_requests", "gauge", "Requests holding the model.", float(lm.active), labels)


_LLAMA_HELP = {
    "llamacpp:prompt_tokens_total": "Number of prompt tokens processed.",
    "llamacpp:prompt_seconds_total": "Prompt process time.",
    "llamacpp:tokens_predicted_total": "Number of generation tokens processed.",
    "llamacpp:tokens_predicted_seconds_total": "Predict process time.",
    "llamacpp:n_decode_total": "Total number of llama_decode() calls.",
    "llamacpp:n_busy_slots_per_decode": "Average number of busy slots per llama_decode() call.",
    "llamacpp:prompt_tokens_seconds": "Average prompt throughput in tokens/s.",
    "llamacpp:predicted_tokens_seconds": "Average generation throughput in tokens/s.",
    "llamacpp:kv_cache_usage_ratio": "KV-cache usage. 1 means 100 percent usage.",
    "llamacpp:kv_cache_tokens": "KV-cache tokens.",
    "llamacpp:requests_processing": "Number of requests processing.",
    "llamacpp:requests_deferred": "Number of requests deferred.",
}
