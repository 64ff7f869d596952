"""The inference thread: continuous batching over slots with the KV as prefix cache.

Mirrors llama-server's slot loop. One dedicated thread owns the llama.cpp context. Each step
it puts, into one reused llama_batch, the next token of every generating slot, then prompt
tokens of prefilling slots up to `n_batch`, calls llama_decode once, and samples every slot
that produced logits with that request's own sampler. New requests join between steps.

Events go to the event loop with one `call_soon_threadsafe` per hand-over into one asyncio.Queue
per request. A stream's text is held for up to `stream_interval_ms` and handed over as one
event: on two cores every loop wake-up, SSE write and client read per token is CPU taken from
llama.cpp's threads, which wait on each other at every operation (measured: 0.5 ms of loop
time and 0.4 ms of client time per token against 17 ms per token of decoding). A request's
first text, its end and errors are handed over at once, so time to first token is unchanged,
and a stream slower than the interval gets every token as it comes.

The prefix cache is the KV itself: a slot keeps the tokens of its last request; a new request
goes to the slot last used by its `cache_key`, else to the idle slot sharing the longest token
prefix (slots.choose_slot), and only the non-shared suffix is decoded. In a shared pool, idle
slots' cells would slow every decode step down, so when a request starts they move to host
memory (prompt_cache) and come back when a request shares a longer prefix with them than with
any slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from mongarsd.errors import InferenceError, ValidationError
from mongarsd.inference.context import LlamaContext
from mongarsd.inference.events import FINISH_LENGTH, FINISH_STOP, EngineStats, Timings, TokenEvent
from mongarsd.inference.prompt_cache import PromptCache, SavedPrompt
from mongarsd.inference.sampling import GenerationParams, StopMatcher, Utf8Stream
from mongarsd.inference.slots import MIN_SHARED_PREFIX, SlotCandidate, cells_to_free, choose_slot, common_prefix_len

log = structlog.get_logger("mongarsd.inference.llm")

IDLE_WAIT_S = 1.0

Outbox = list[tuple["Request", TokenEvent | BaseException]]


class Request:
    """One generation, shared by the event loop (consumer) and the inference thread."""

    __slots__ = (
        "cache_key",
        "cancelled",
        "deliver",
        "delivered",
        "dirty",
        "finished",
        "generating",
        "held",
        "held_token",
        "last_token",
        "n_cached",
        "n_decoded",
        "params",
        "pos",
        "prompt",
        "sampler",
        "stopper",
        "t_first",
        "t_start",
        "t_submit",
        "utf8",
    )

    def __init__(
        self,
        prompt: list[int],
        params: GenerationParams,
        cache_key: str | None,
        sampler: Any,
        deliver: Callable[[TokenEvent | BaseException], None],
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.cache_key = cache_key
        self.sampler = sampler
        self.deliver = deliver  # loop-side put_nowait of this request's queue
        self.cancelled = False  # set by the loop; read by the thread
        self.finished = False  # set by the thread once the final event is queued
        self.held = ""  # text sampled but not yet handed over (thread only)
        self.held_token = -1
        self.dirty = False  # in the batcher's list of requests holding text
        self.delivered = False  # something was handed over already
        self.stopper = StopMatcher(params.stop)
        self.utf8 = Utf8Stream()
        self.pos = 0  # next prompt index to decode
        self.n_cached = 0
        self.n_decoded = 0
        self.last_token = -1
        self.generating = False
        self.t_submit = time.perf_counter()
        self.t_start = 0.0
        self.t_first = 0.0


class Slot:
    """One parallel sequence: its KV stream's tokens and the request using it, if any."""

    __slots__ = ("cache_key", "index", "last_used", "req", "tokens")

    def __init__(self, index: int) -> None:
        self.index = index
        self.tokens: list[int] = []  # exactly what the KV holds for seq `index`
        self.cache_key: str | None = None
        self.last_used = 0
        self.req: Request | None = None


class Batcher:
    """The slots, the waiting requests and the step loop run by the inference thread.

    `run` is the thread's target; `submit`, `stats`, `avg_request_s` and the `wake`/`stopping`
    signals are for the event loop; `clear_cache` only once the thread has exited.
    """

    def __init__(self, llama: LlamaContext, *, slots: int, stream_interval_ms: int = 0, prompt_cache_mb: int = 0) -> None:
        self._llama = llama
        self._cache = PromptCache(prompt_cache_mb << 20)  # used only with a shared pool
        self._interval_s = stream_interval_ms / 1000.0
        self._held: list[Request] = []  # requests holding text (thread only)
        self._urgent = False  # something in the outbox must go now
        self._last_flush = 0.0
        self.model_id = llama.model_id
        self.n_slots = slots
        self.slots = [Slot(i) for i in range(slots)]
        self._pool = 0  # cells the slots share (0: a stream each); known once the model is loaded
        self._caching = False  # idle conversations go to the prompt cache (a shared pool with a budget)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake = threading.Event()
        self.ready = threading.Event()  # set once warmed up (or dead)
        self.stopping = False
        self._incoming: deque[Request] = deque()  # mutated only under _in_lock
        self._in_lock = threading.Lock()
        self.closed = False  # set under _in_lock when the thread stops taking requests
        self._use_counter = 0

        # counters (written by the inference thread, read anywhere)
        self._requests_total = 0
        self._prompt_tokens_total = 0
        self._prompt_seconds_total = 0.0
        self._predicted_total = 0
        self._predicted_seconds_total = 0.0
        self._cached_total = 0
        self._evicted_total = 0  # idle slots' caches dropped to make room in a shared pool
        self._n_decode_total = 0
        self._n_busy_slots_total = 0
        self._finished_requests = 0
        self._finished_seconds = 0.0

    # ------------------------------------------------------------------ loop side

    def submit(self, req: Request) -> bool:
        """Queue a request unless the thread stopped taking them; on True the thread owns its sampler."""
        with self._in_lock:
            closed = self.closed or self.stopping
            if not closed:
                self._incoming.append(req)
        return not closed

    def avg_request_s(self) -> float:
        """Return the mean time from submission to the end of a request, 0 if none finished."""
        return self._finished_seconds / self._finished_requests if self._finished_requests else 0.0

    def stats(self, *, requests_rejected: int) -> EngineStats:
        """Snapshot the counters (safe from any thread)."""
        busy = sum(1 for s in self.slots if s.req is not None)
        return EngineStats(
            slots_total=self.n_slots,
            slots_busy=busy,
            requests_processing=busy,
            requests_deferred=len(self._incoming),
            requests_total=self._requests_total,
            requests_rejected=requests_rejected,
            prompt_tokens_total=self._prompt_tokens_total,
            prompt_seconds_total=self._prompt_seconds_total,
            tokens_predicted_total=self._predicted_total,
            tokens_predicted_seconds_total=self._predicted_seconds_total,
            cached_tokens_total=self._cached_total,
            n_decode_total=self._n_decode_total,
            n_busy_slots_total=self._n_busy_slots_total,
            kv_cache_tokens=sum(len(s.tokens) for s in self.slots),
            kv_cache_cells=self._llama.n_cells,
            kv_evictions_total=self._evicted_total,
            prompt_cache_bytes=self._cache.bytes,
            prompt_cache_entries=len(self._cache.entries),
            prompt_cache_saves_total=self._cache.saved_total,
            prompt_cache_restores_total=self._cache.restored_total,
        )

    def clear_cache(self) -> None:
        """Forget what the slots' KV streams held (before the context is freed)."""
        for slot in self.slots:
            slot.tokens.clear()
            slot.cache_key = None
        self._cache.clear()

    # ------------------------------------------------------------------ inference thread

    def run(self, *, warmup: bool) -> None:
        """Inference thread main loop: admit, batch, decode, sample, deliver."""
        slots = self.slots
        self._pool = self._llama.n_cells if self._llama.unified else 0
        self._caching = bool(self._pool) and self._cache.enabled
        try:
            if warmup:
                self._llama.warmup()
            self.ready.set()
            out: Outbox = []
            while not self.stopping:
                self.wake.clear()
                self._reap_cancelled()
                if self._incoming:
                    self._admit()
                active = [s for s in slots if s.req is not None]
                if not active:
                    if out or self._held:
                        self._flush(out)
                        out = []
                    self.wake.wait(IDLE_WAIT_S)
                    continue
                self._step(active, out)
                if self._urgent or ((out or self._held) and time.perf_counter() - self._last_flush >= self._interval_s):
                    self._flush(out)
                    out = []
        except BaseException as err:
            log.exception("llm_thread_crashed", model=self.model_id)
            self._fail_all(InferenceError("inference thread crashed: " + str(err)))
            raise
        finally:
            self.ready.set()
            self._fail_all(InferenceError("model " + self.model_id + " stopped"))

    def _hold(self, req: Request, text: str, token: int) -> None:
        """Keep a stream's text until the next hand-over (the first text goes at once)."""
        req.held += text
        req.held_token = token
        if not req.dirty:
            req.dirty = True
            self._held.append(req)
        if not req.delivered:
            self._urgent = True

    @staticmethod
    def _take_held(req: Request) -> str:
        """Return and clear what a request holds (its final event or error carries it)."""
        text = req.held
        req.held = ""
        return text

    def _flush(self, out: Outbox) -> None:
        """Hand held text, then final events and errors, to the loop in one callback."""
        items: Outbox = []
        for req in self._held:
            req.dirty = False
            if req.held and not req.cancelled:
                items.append((req, TokenEvent(req.held, req.held_token)))
                req.delivered = True
            req.held = ""
        self._held.clear()
        items.extend(out)
        self._urgent = False
        self._last_flush = time.perf_counter()
        if items:
            self._send(items)

    def _send(self, out: Outbox) -> None:
        loop = self.loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(_deliver_all, out)
        except RuntimeError:  # loop closed: nobody is listening any more
            for req, _ in out:
                req.cancelled = True

    def _fail_all(self, err: InferenceError) -> None:
        out: Outbox = []
        for slot in self.slots:
            req = slot.req
            if req is not None:
                self._release(slot, req)
                if not req.cancelled:
                    out.append((req, InferenceError(str(err))))
        with self._in_lock:
            self.closed = True
            waiting = list(self._incoming)
            self._incoming.clear()
        for req in waiting:
            req.finished = True
            self._llama.free_sampler(req.sampler)
            if not req.cancelled:
                out.append((req, InferenceError(str(err))))
        self._flush(out)

    def _release(self, slot: Slot, req: Request) -> None:
        """Detach a finished/cancelled request from its slot; its KV stays as prefix cache."""
        req.finished = True
        slot.req = None
        slot.cache_key = req.cache_key
        self._use_counter += 1
        slot.last_used = self._use_counter
        self._llama.free_sampler(req.sampler)
        req.sampler = None

    def _reap_cancelled(self) -> None:
        for slot in self.slots:
            req = slot.req
            if req is not None and req.cancelled:
                self._account(req, time.perf_counter())
                self._release(slot, req)
        if self._incoming:
            with self._in_lock:
                gone = [r for r in self._incoming if r.cancelled]
                for r in gone:
                    self._incoming.remove(r)
            for r in gone:
                r.finished = True
                self._llama.free_sampler(r.sampler)

    def _admit(self) -> None:
        """Move waiting requests into idle slots, FIFO, while their KV reservation fits."""
        lib = self._llama.lib
        mem = self._llama.mem
        while self._incoming:
            idle = [s for s in self.slots if s.req is None]
            if not idle:
                return
            req = self._incoming[0]
            cands = [
                SlotCandidate(
                    s.index,
                    s.cache_key,
                    len(s.tokens),
                    common_prefix_len(s.tokens, req.prompt),
                    s.last_used,
                )
                for s in idle
            ]
            index = choose_slot(cands, req.cache_key, len(req.prompt))
            assert index is not None
            keep = next(c.prefix_len for c in cands if c.index == index)
            restore: SavedPrompt | None = None
            if self._caching:
                cands = self._park_idle(index, cands)  # the chosen slot's candidate stays as it was
                restore = self._cache.worth_restoring(req.prompt, keep)
            if self._pool and not self._reserve(req, index, cands):
                return  # FIFO: the head waits until a running request gives its cells back
            slot = self.slots[index]
            if self._caching and (restore is not None or len(slot.tokens) - keep >= MIN_SHARED_PREFIX):
                # Another conversation takes this slot over, often for a shared system prompt:
                # keep this one's cells (a continuing conversation only loses a token or two).
                self._save(slot, pinned=restore)
            if restore is not None:
                keep = self._restore(slot, restore, req.prompt)
            keep = min(keep, len(req.prompt) - 1)  # always decode >= 1 token for logits
            # The request fits its slot (prompt + max_tokens <= n_ctx_per_slot was checked on
            # submission; in a shared pool _reserve made room): only its own stale suffix goes.
            if keep < len(slot.tokens):
                if not lib.llama_memory_seq_rm(mem, index, keep, -1):
                    lib.llama_memory_seq_rm(mem, index, -1, -1)
                    keep = 0
                del slot.tokens[keep:]
            with self._in_lock:
                self._incoming.popleft()
            req.pos = keep
            req.n_cached = keep
            req.t_start = time.perf_counter()
            slot.req = req
            slot.cache_key = req.cache_key
            self._requests_total += 1

    def _park_idle(self, chosen: int, cands: list[SlotCandidate]) -> list[SlotCandidate]:
        """Move the other idle slots' cells to the prompt cache; return `cands` as they are now (thread only).

        llama-server's `--cache-idle-slots`: every cell in a shared pool costs every decode step
        (see prompt_cache), so a request starts with only running requests' cells beside its own.
        A conversation the cache cannot hold stays where it is.
        """
        out: list[SlotCandidate] = []
        for c in cands:
            slot = self.slots[c.index]
            if c.index != chosen and slot.tokens and self._save(slot):
                self._llama.lib.llama_memory_seq_rm(self._llama.mem, c.index, -1, -1)
                slot.tokens.clear()
                slot.cache_key = None
                out.append(dataclasses.replace(c, cache_key=None, n_cached=0, prefix_len=0))
            else:
                out.append(c)
        return out

    def _save(self, slot: Slot, *, pinned: SavedPrompt | None = None) -> bool:
        """Copy an idle slot's cells to the prompt cache; False if they must stay in the pool (thread only).

        `pinned`: the saved conversation about to be copied into this slot, which must survive.
        """
        tokens = slot.tokens
        if len(tokens) < MIN_SHARED_PREFIX or self._cache.covers(tokens):
            return True  # too short to be worth a copy, or saved already
        data = self._llama.save_seq(slot.index)
        return data is not None and self._cache.add(tokens, slot.cache_key, data, pinned=pinned)

    def _restore(self, slot: Slot, entry: SavedPrompt, prompt: list[int]) -> int:
        """Copy a saved conversation into `slot`; return the prompt tokens it covers (thread only)."""
        if not self._llama.load_seq(slot.index, entry.data):
            # no contiguous room in the pool now; the entry stays for a later request
            log.warning("prompt_cache_restore_failed", model=self.model_id, tokens=len(entry.tokens))
            slot.tokens.clear()
            slot.cache_key = None
            return 0
        slot.tokens[:] = entry.tokens
        slot.cache_key = entry.cache_key
        self._cache.used(entry)
        return common_prefix_len(entry.tokens, prompt)

    def _reserve(self, req: Request, index: int, cands: list[SlotCandidate]) -> bool:
        """Hold prompt + max_tokens cells of the shared pool for `req` in slot `index` (thread only).

        Running requests keep their reservations and idle slots their cached prefixes until the
        pool is short; then idle caches go (slots.cells_to_free). False: it cannot fit yet.
        """
        need = self._cells_for(req)
        others = [c for c in cands if c.index != index]
        reserved = sum(self._cells_for(s.req) for s in self.slots if s.req is not None)
        evict = cells_to_free(need, self._pool - reserved - sum(c.n_cached for c in others), others)
        if evict is None:
            return False
        lib, mem = self._llama.lib, self._llama.mem
        for i in evict:
            lib.llama_memory_seq_rm(mem, i, -1, -1)
            self.slots[i].tokens.clear()
            self.slots[i].cache_key = None
        self._evicted_total += len(evict)
        return True

    def _cells_for(self, req: Request) -> int:
        """Return the cells a request may fill: its prompt and every token it may generate."""
        return min(len(req.prompt) + req.params.max_tokens, self._llama.n_ctx_slot)

    def _step(self, active: list[Slot], out: Outbox) -> None:
        """Build one batch from all active slots, decode it, sample and emit (thread only)."""
        llama = self._llama
        lib = llama.lib
        batch = llama.batch
        b_token = batch.token
        b_pos = batch.pos
        b_nseq = batch.n_seq_id
        b_seq = batch.seq_id
        b_logits = batch.logits
        n_batch = llama.n_batch
        n = 0
        outputs: list[tuple[Slot, int]] = []
        n_prompt_tokens = 0
        # generating slots first: one token each (llama-server order)
        for slot in active:
            req = slot.req
            assert req is not None
            if req.generating:
                toks = slot.tokens
                b_token[n] = req.last_token
                b_pos[n] = len(toks)
                b_nseq[n] = 1
                b_seq[n][0] = slot.index
                b_logits[n] = 1
                toks.append(req.last_token)
                outputs.append((slot, n))
                n += 1
        # then prompt chunks with what is left of n_batch
        for slot in active:
            req = slot.req
            assert req is not None
            if req.generating or n >= n_batch:
                continue
            prompt = req.prompt
            start = req.pos
            take = min(len(prompt) - start, n_batch - n)
            if take > 1 and start + take == len(prompt) and req.params.seed is not None:
                # A seeded request decodes its last prompt token alone, exactly as a prefix-cache
                # hit does: the same logits then give the same sample (ggml's numerics depend on
                # the batch shape), so a repeated seeded request reproduces its answer.
                take -= 1
            toks = slot.tokens
            base = len(toks)
            index = slot.index
            for j in range(take):
                b_token[n] = prompt[start + j]
                b_pos[n] = base + j
                b_nseq[n] = 1
                b_seq[n][0] = index
                b_logits[n] = 0
                n += 1
            toks.extend(prompt[start : start + take])
            req.pos = start + take
            n_prompt_tokens += take
            if req.pos == len(prompt):
                b_logits[n - 1] = 1
                outputs.append((slot, n - 1))
        batch.n_tokens = n
        ctx = llama.ctx
        rc = lib.llama_decode(ctx, batch)
        self._n_decode_total += 1
        self._n_busy_slots_total += len(active)
        self._prompt_tokens_total += n_prompt_tokens
        if rc != 0:
            self._decode_failed(rc, active, out)
            return
        now = time.perf_counter()
        sample = llama.sample
        is_eog = llama.is_eog
        pieces = llama.pieces
        n_ctx_slot = llama.n_ctx_slot
        for slot, i in outputs:
            req = slot.req
            assert req is not None
            if not req.generating:
                req.generating = True
                req.t_first = now
            try:
                tok = sample(req.sampler, i)
            except ValidationError as err:  # its grammar has no way on: that request ends, not the engine
                self._sample_refused(slot, req, err, out)
                continue
            if is_eog(tok):
                self._finish(slot, req=req, reason=FINISH_STOP, text="", now=now, out=out)
                continue
            req.n_decoded += 1
            req.last_token = tok
            piece = pieces.get(tok)
            if piece is None:
                piece = llama.piece(tok)
            text, stopped = req.stopper.feed(req.utf8.feed(piece))
            if stopped:
                self._finish(
                    slot,
                    req=req,
                    reason=FINISH_STOP,
                    text=text,
                    now=now,
                    out=out,
                    stopped_by_text=True,
                )
                continue
            if req.n_decoded >= req.params.max_tokens or len(slot.tokens) + 1 >= n_ctx_slot:
                self._finish(slot, req=req, reason=FINISH_LENGTH, text=text, now=now, out=out)
                continue
            if text:
                self._hold(req, text, tok)

    def _finish(
        self,
        slot: Slot,
        *,
        req: Request,
        reason: str,
        text: str,
        now: float,
        out: Outbox,
        stopped_by_text: bool = False,
    ) -> None:
        tail = ""
        if not stopped_by_text:
            # length or end-of-generation: release what was held back as a possible stop
            # prefix or an unfinished UTF-8 sequence
            flushed, hit = req.stopper.feed(req.utf8.flush())
            tail = flushed if hit else flushed + req.stopper.flush()
        prompt_ms, predicted_ms = self._account(req, now)
        self._release(slot, req)
        self._urgent = True
        if not req.cancelled:
            out.append(
                (
                    req,
                    TokenEvent(
                        self._take_held(req) + text + tail,
                        -1,
                        finish_reason=reason,
                        prompt_tokens=len(req.prompt),
                        completion_tokens=req.n_decoded,
                        cached_tokens=req.n_cached,
                        timings=Timings(
                            prompt_ms,
                            predicted_ms,
                            len(req.prompt) - req.n_cached,
                            req.n_decoded,
                        ),
                    ),
                )
            )

    def _account(self, req: Request, now: float) -> tuple[float, float]:
        t_first = req.t_first or now
        prompt_s = max(t_first - req.t_start, 0.0) if req.t_start else 0.0
        predicted_s = max(now - t_first, 0.0)
        self._prompt_seconds_total += prompt_s
        self._predicted_seconds_total += predicted_s
        self._predicted_total += req.n_decoded
        self._cached_total += req.n_cached
        self._finished_requests += 1
        self._finished_seconds += now - req.t_submit
        return prompt_s * 1000.0, predicted_s * 1000.0

    def _sample_refused(self, slot: Slot, req: Request, err: ValidationError, out: Outbox) -> None:
        """End a request whose sampler found no token it may take; its text so far goes first (thread only)."""
        log.info("generation_refused", model=self.model_id, param=err.param, tokens=req.n_decoded, reason=str(err))
        self._account(req, time.perf_counter())
        self._release(slot, req)
        self._urgent = True
        if not req.cancelled:
            out.append((req, err))

    def _decode_failed(self, rc: int, active: list[Slot], out: Outbox) -> None:
        """Fail every request of the batch and drop their KV (thread only)."""
        log.error("llama_decode_failed", model=self.model_id, rc=rc, slots=len(active))
        err = InferenceError("llama_decode failed with code " + str(rc))
        for slot in active:
            req = slot.req
            assert req is not None
            self._llama.lib.llama_memory_seq_rm(self._llama.mem, slot.index, -1, -1)
            slot.tokens.clear()
            self._account(req, time.perf_counter())
            self._release(slot, req)
            slot.cache_key = None
            self._urgent = True
            if not req.cancelled:
                out.append((req, InferenceError(str(err))))


def _deliver_all(items: Outbox) -> None:
    """Put each event into its request's queue (runs on the event loop)."""
    for req, event in items:
        req.deliver(event)
