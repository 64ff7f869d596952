"""llama.cpp engine service: load a model, run its inference thread, admit and stream requests.

The parts, each in its own module:

* settings.EngineSettings: how the model runs (context, batching, threads, slots, KV cache);
* context.LlamaContext: the llama.cpp objects (model, context with one KV stream per slot,
  batch, samplers), loading, freeing and tokenizing;
* batcher.Batcher: the inference thread's continuous-batching step loop over slots, with the
  KV as prefix cache;
* slots: the pure decisions (slot choice, prefix length, retry estimate);
* events: what a request streams back (TokenEvent, Timings) and the counters (EngineStats).

This module is the service around them: start/stop, submission and admission control.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from mongarsd.errors import InferenceError, OverloadedError, ValidationError
from mongarsd.inference.batcher import Batcher, Request
from mongarsd.inference.chat_template import ChatTemplate
from mongarsd.inference.context import LlamaContext
from mongarsd.inference.events import EngineStats, TokenEvent
from mongarsd.inference.gguf import GGUFInfo
from mongarsd.inference.grammar import GrammarCompiler
from mongarsd.inference.sampling import GenerationParams, check_fits, validate_params
from mongarsd.inference.settings import EngineSettings
from mongarsd.inference.slots import MIN_RETRY_AFTER_S, retry_after_s

log = structlog.get_logger("mongarsd.inference.llm")

ENGINE_JOIN_TIMEOUT_S = 4.0  # one decode step is far shorter; within the inference stop budget
GRAMMAR_IN_THREAD_CHARS = 2048  # build bigger grammars off the event loop
TOKENIZE_IN_THREAD_CHARS = 4096  # tokenize longer text off the event loop


class LlamaEngine:
    """A loaded GGUF model served by one inference thread with continuous batching."""

    name = "llm"
    start_timeout_s = 120.0
    stop_timeout_s = 6.0

    def __init__(self, *, model_path: Path, settings: EngineSettings = EngineSettings(), model_id: str | None = None) -> None:
        self.model_path = Path(model_path)
        self.model_id = model_id or self.model_path.stem
        self.settings = settings
        self.slots = settings.slots
        self.queue_depth = settings.queue_depth
        self._llama = LlamaContext(model_path=self.model_path, model_id=self.model_id, settings=settings)
        self._batcher = Batcher(
            self._llama,
            slots=settings.slots,
            stream_interval_ms=settings.stream_interval_ms,
            prompt_cache_mb=settings.prompt_cache_mb,
        )
        self._grammars = GrammarCompiler()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._inflight = 0  # loop-side: admitted and not yet finished/abandoned
        self._rejected_total = 0  # loop-side

    # ------------------------------------------------------------------ lifecycle

    async def async_start(self) -> None:
        """Load the model in a worker thread, then start the inference thread."""
        if self._thread is not None:
            return
        batcher = self._batcher
        batcher.loop = asyncio.get_running_loop()
        batcher.closed = False
        await asyncio.to_thread(self._llama.load)
        batcher.stopping = False
        self._accepting = True
        batcher.ready.clear()
        self._thread = threading.Thread(
            target=batcher.run, kwargs={"warmup": self.settings.warmup}, name="mongarsd-llm-" + self.model_id, daemon=True
        )
        self._thread.start()
        # the warm-up decode runs on the inference thread so that its OpenMP team is the one
        # reused for every later decode
        await asyncio.to_thread(batcher.ready.wait, self.start_timeout_s)
        if not self._thread.is_alive():
            self._thread = None
            await asyncio.to_thread(self._free)
            raise InferenceError("inference thread for " + self.model_id + " died while starting")
        log.info(
            "llm_started",
            model=self.model_id,
            n_ctx=self._llama.n_cells,
            n_ctx_per_slot=self._llama.n_ctx_slot,
            kv_unified=self._llama.unified,
            slots=self.slots,
            threads=self._llama.threads,
            threads_batch=self._llama.threads_batch,
            weights=self._llama.weights,
            weights_huge_pages_mb=self._llama.weights_huge_mb,
            prefetch_bytes=self._llama.prefetch_bytes,
            f16c_scales=self._llama.f16c_scales,
        )

    async def async_stop(self) -> None:
        """Refuse new work, cancel everything, join the thread and free llama.cpp objects."""
        self._accepting = False
        thread = self._thread
        if thread is not None:
            self._batcher.stopping = True
            self._batcher.wake.set()
            await asyncio.to_thread(thread.join, ENGINE_JOIN_TIMEOUT_S)
            if thread.is_alive():
                # never free memory a running decode may still touch
                log.error("llm_thread_join_timeout", model=self.model_id)
                return
            self._thread = None
        await asyncio.to_thread(self._free)

    def _free(self) -> None:
        """Forget the slots' caches and free the llama.cpp objects (blocking; thread exited)."""
        if self._llama.lib is None:
            return
        self._batcher.clear_cache()
        self._llama.free()

    # ------------------------------------------------------------------ properties

    @property
    def n_ctx_per_slot(self) -> int:
        """Tokens one request may use in total (prompt + completion)."""
        return self._llama.n_ctx_slot

    @property
    def n_ctx(self) -> int:
        """KV cells of all slots' streams together."""
        return self._llama.n_cells

    @property
    def n_vocab(self) -> int:
        return self._llama.n_vocab

    @property
    def loaded(self) -> bool:
        return self._llama.loaded

    @property
    def info(self) -> GGUFInfo | None:
        return self._llama.info

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._llama.chat_template

    # ------------------------------------------------------------------ text <-> tokens

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokenize `text` (thread-safe; CPU-bound for long text, see async_tokenize)."""
        return self._llama.tokenize(text, add_special, parse_special)

    async def async_tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokenize on the loop for short text, in a worker thread for long text."""
        if len(text) < TOKENIZE_IN_THREAD_CHARS:
            return self.tokenize(text, add_special, parse_special)
        return await asyncio.to_thread(self.tokenize, text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Turn tokens back into text (thread-safe)."""
        return self._llama.detokenize(tokens, special)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> str:
        """Render messages with the model's own chat template."""
        self._llama.require_loaded()
        assert self._llama.chat_template is not None
        if tools:
            return self._llama.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=list(tools))
        return self._llama.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def tokenize_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Render and tokenize a conversation (special tokens parsed, no double BOS); `tools` go to templates that render them."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        bos = self._llama.bos_text
        add_special = not (bos and text.startswith(bos))
        return self.tokenize(text, add_special=add_special, parse_special=True)

    # ------------------------------------------------------------------ generation

    async def async_generate(
        self,
        prompt_tokens: list[int],
        params: GenerationParams,
        *,
        cache_key: str | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Stream the completion of `prompt_tokens`; the last event has finish_reason set.

        Raises (on the first iteration, before anything is queued) ValidationError,
        ContextOverflowError or OverloadedError. Closing the iterator early cancels the
        request; its slot is free again after at most one decode step.
        """
        if not self._accepting:
            raise OverloadedError("model " + self.model_id + " is not running", retry_after_s=MIN_RETRY_AFTER_S, status=503)
        llama = self._llama
        llama.require_loaded()
        n_ctx_slot = llama.n_ctx_slot
        validate_params(params, n_ctx=n_ctx_slot)
        n_prompt = len(prompt_tokens)
        if n_prompt == 0:
            raise ValidationError("prompt is empty", param="prompt")
        if min(prompt_tokens) < 0 or max(prompt_tokens) >= llama.n_vocab:
            raise ValidationError("prompt has token ids outside the vocabulary", param="prompt")
        check_fits(n_prompt, params.max_tokens, n_ctx_slot)
        if self._inflight >= self.slots + self.queue_depth:
            self._rejected_total += 1
            raise OverloadedError(
                "model "
                + self.model_id
                + " is busy: "
                + str(self.slots)
                + " generating and "
                + str(self._inflight - self.slots)
                + " waiting",
                retry_after_s=retry_after_s(self._inflight - self.slots, self.slots, self._batcher.avg_request_s()),
            )
        self._inflight += 1
        req: Request | None = None
        try:
            grammar = await self._grammars.async_grammar_for(params)
            if grammar is not None and len(grammar) > GRAMMAR_IN_THREAD_CHARS:
                sampler = await self._async_make_sampler_in_thread(params, grammar)
            else:
                sampler = llama.make_sampler(params, grammar)
            queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
            req = Request(list(prompt_tokens), params, cache_key, sampler, queue.put_nowait)
            if not self._batcher.submit(req):  # once submitted, the thread owns the sampler
                llama.free_sampler(sampler)
                raise OverloadedError("model " + self.model_id + " is shutting down", retry_after_s=MIN_RETRY_AFTER_S, status=503)
            self._batcher.wake.set()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._inflight -= 1
            if req is not None and not req.finished:
                req.cancelled = True
                self._batcher.wake.set()

    async def _async_make_sampler_in_thread(self, params: GenerationParams, grammar: str) -> Any:
        """Build a sampler with a big grammar off the loop; free it if the caller goes away."""
        llama = self._llama
        fut = asyncio.get_running_loop().run_in_executor(None, llama.make_sampler, params, grammar)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:

            def _free_orphan(f: asyncio.Future[Any]) -> None:
                if not f.cancelled() and f.exception() is None:
                    llama.free_sampler(f.result())

            fut.add_done_callback(_free_orphan)
            raise

    # ------------------------------------------------------------------ stats

    def stats(self) -> EngineStats:
        """Snapshot the counters (safe from any thread)."""
        return self._batcher.stats(requests_rejected=self._rejected_total)
