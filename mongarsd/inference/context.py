"""One model's llama.cpp objects: model, vocabulary, context, batch and sampler chains.

The context has `n_seq_max = slots`; `kv_cache.kv_layout` decides how their cells are laid
out. Without `kv_pool` each slot has its own KV stream of `n_ctx` cells (`kv_unified = false`,
llama-server's layout with `--kv-unified` off): a request only ever touches its own cells, and
since the submission check guarantees prompt + max_tokens fits one slot, admission never has
to evict anything. With `kv_pool` and flash attention the slots share one pool of cells
(`kv_unified = true`, llama-server's default): more conversations in the same memory, and the
batcher reserves each request's cells on admission, evicting idle slots' cached prefixes when
the pool is short. Without flash attention a unified cache makes every token attend over every
used cell, idle slots' included: measured here, four cached 900-token conversations halved
prompt processing (284 -> 133 t/s) and cut decoding from 88 to 55 t/s, so there the pool is
split into per-slot streams instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from mongarsd.errors import InferenceError, ModelError, ValidationError
from mongarsd.heap import trim_heap
from mongarsd.inference.chat_template import ChatTemplate
from mongarsd.inference.gguf import GGUFInfo, read_gguf
from mongarsd.inference.hugepages import WeightsAdvisor, anon_huge_bytes
from mongarsd.inference.kv_cache import kv_cache_types, kv_layout
from mongarsd.inference.sampling import GenerationParams
from mongarsd.inference.settings import F16C_SCALES_ENV, PREFETCH_ENV, EngineSettings
from mongarsd.inference.tools import TRIGGER_PATTERN

log = structlog.get_logger("mongarsd.inference.llm")
_prefetch_lock = threading.Lock()

PIECE_BUF_BYTES = 256
MAX_LOGIT_VIEWS = 64  # rows of logits with a cached view (llama.cpp's outputs of one batch)

# llama_get_logits_ith and llama_vocab_is_eog called without releasing the GIL: they only read
# llama.cpp's buffers, and a release after each decode hands the GIL to the event loop, which
# the inference thread then waits for (see Greedy).
_LOGITS_ITH = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)
_IS_EOG = ctypes.PYFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int32)


def _set_field(struct: Any, name: str, value: Any) -> None:
    """Set a field of a llama.cpp parameter struct, refusing a name the struct does not have.

    A ctypes Structure takes any attribute: a field renamed upstream (llama.cpp replaced
    `use_mmap` and `use_mlock` with `load_mode`) would otherwise be set on the Python object
    and silently never reach llama.cpp.
    """
    if name not in {f[0] for f in type(struct)._fields_}:
        raise InferenceError("this llama.cpp build has no parameter '" + name + "'")
    setattr(struct, name, value)


def load_mode(lib: Any, *, use_mmap: bool, use_mlock: bool) -> int:
    """llama.cpp's load mode for `inference.use_mmap` and `inference.use_mlock`."""
    if use_mmap:
        return int(lib.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mlock else lib.LLAMA_LOAD_MODE_MMAP)
    return int(lib.LLAMA_LOAD_MODE_MLOCK if use_mlock else lib.LLAMA_LOAD_MODE_NONE)


def _fast(proto: Any, fn: Any) -> Any:
    """The same C function as a ctypes binding, called through `proto` (no GIL release)."""
    return proto(ctypes.cast(fn, ctypes.c_void_p).value)


class Greedy:
    """Greedy sampling without a llama.cpp chain: the argmax of the logits, read in place.

    llama.cpp's greedy sampler first copies every logit into a candidate array (49k entries of
    12 bytes for the default model) and scans that; numpy's argmax reads the 196 KB of logits
    once and picks the same token (the first of equal maxima). Measured after each decode, when
    the decode has pushed everything else out of the caches: 130 us per token through the
    chain, 50 us here, about 1 % of a token of the default model. Only for temperature 0 without
    penalties or grammar: anything with state goes through a chain.
    """

    __slots__ = ()


GREEDY = Greedy()

_log_callback_ref: list[Any] = []  # keeps the ctypes callback alive for the process


def _install_llama_log(llama_cpp: Any) -> None:
    """Route llama.cpp warnings/errors to structlog and drop its info chatter (process-wide)."""
    if _log_callback_ref:
        return

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def _cb(level: int, text: bytes, user_data: Any) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            msg = text.decode("utf-8", "replace").rstrip()
            if msg:
                log.warning("llama_cpp_log", level=level, message=msg)

    _log_callback_ref.append(_cb)
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))


_prefetch_in_effect: int | None = None


def apply_prefetch(nbytes: int) -> int:
    """Give llama.cpp the decode prefetch distance; return the one in effect in this process.

    ggml reads it once, at the first matrix product of the process: the first model loaded sets
    it, and a later one asking for another distance gets the first one's (logged). The F16C
    block-scale loops (x86) are turned on at the same time unless the environment says otherwise.
    """
    global _prefetch_in_effect
    with _prefetch_lock:
        if _prefetch_in_effect is None:
            os.environ[PREFETCH_ENV] = str(nbytes)
            os.environ.setdefault(F16C_SCALES_ENV, "1")  # read at the same first product
            _prefetch_in_effect = nbytes
        elif _prefetch_in_effect != nbytes:
            log.warning("prefetch_bytes_unchanged", requested=nbytes, in_effect=_prefetch_in_effect)
        return _prefetch_in_effect


def f16c_scales_requested() -> bool:
    """Whether this process asks ggml for the F16C block-scale loops (its test: atoi(value) > 0)."""
    digits = re.match(r"\s*[+-]?\d+", os.environ.get(F16C_SCALES_ENV, ""))
    return digits is not None and int(digits.group()) > 0


class LlamaContext:
    """A GGUF model loaded into llama.cpp with its slots' KV cache and one reused batch.

    `load` and `free` block (worker thread; `free` only once no decode can run); `warmup`,
    `piece` and every use of `batch`, `ctx` and `mem` belong to the inference thread;
    tokenizing and building samplers are thread-safe.
    """

    def __init__(self, *, model_path: Path, model_id: str, settings: EngineSettings) -> None:
        self.model_path = model_path
        self.model_id = model_id
        self.settings = settings
        self.n_ctx_req = max(settings.n_ctx, 64)
        self.n_batch = max(settings.n_batch, settings.slots, 32)
        self.n_ubatch = max(min(settings.n_ubatch, self.n_batch), 1)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = settings.threads if settings.threads > 0 else max(cpus or 1, 1)
        self.threads_batch = settings.threads_batch if settings.threads_batch > 0 else self.threads

        self.lib: Any = None
        self.model: Any = None
        self.ctx: Any = None
        self.mem: Any = None
        self.vocab: Any = None
        self.batch: Any = None
        self.n_vocab = 0
        self.n_cells = 0  # KV cells of all slots' streams together
        self.unified = False  # the slots share one pool of n_cells cells
        self.n_ctx_slot = 0  # tokens one request may use in total
        self.info: GGUFInfo | None = None
        self.chat_template: ChatTemplate | None = None
        self.bos_text = ""
        self.add_bos = False
        self.warmup_token = 0
        self.pieces: dict[int, bytes] = {}  # token -> bytes, filled by the inference thread
        self.eog: dict[int, bool] = {}  # token -> end of generation, filled by the inference thread
        self._piece_buf = ctypes.create_string_buffer(PIECE_BUF_BYTES)
        self._byte_tokens: dict[int, int] | None = None  # see byte_tokens
        self._logits_ith: Any = None
        self._is_eog: Any = None
        self._row: Any = None  # ctypes type of one row of logits
        self._views: dict[int, np.ndarray] = {}  # address -> view of one row of logits
        self.weights = ""  # "mmap" (the page cache's pages) or "memory" (read into the daemon's own)
        self.weights_huge_mb = 0.0  # of them on transparent huge pages (see hugepages.py)
        self.prefetch_bytes = 0  # llama.cpp's prefetch distance in effect in this process
        self.f16c_scales = False  # whether this process asked for the F16C block-scale loops

    @property
    def loaded(self) -> bool:
        return self.ctx is not None

    def require_loaded(self) -> Any:
        """Return the llama_cpp module; InferenceError if the model is not loaded."""
        if self.vocab is None:
            raise InferenceError("model " + self.model_id + " is not loaded")
        return self.lib

    # ------------------------------------------------------------------ load / free

    def load(self) -> None:
        """Validate and load the model, create the context and batch (blocking)."""
        if self.model is not None:
            return
        self.info = read_gguf(self.model_path, read_tensors=False)  # untrusted: check first
        import llama_cpp

        lib: Any = llama_cpp
        self.lib = lib
        _install_llama_log(lib)
        self.prefetch_bytes = apply_prefetch(self.settings.prefetch_bytes)
        self.f16c_scales = f16c_scales_requested()
        lib.llama_backend_init()

        s = self.settings
        mparams = lib.llama_model_default_params()
        _set_field(mparams, "n_gpu_layers", s.gpu_layers)
        _set_field(mparams, "load_mode", load_mode(lib, use_mmap=s.use_mmap, use_mlock=s.use_mlock))
        advisor = None if s.use_mmap else WeightsAdvisor(min_bytes=self.model_path.stat().st_size // 2)
        callback = None
        if advisor is not None and advisor.enabled:

            def _loading(progress: float, user_data: Any) -> bool:
                try:
                    advisor.advise()  # the first call: the weight buffer exists, nothing read into it yet
                except Exception:  # a C callback must not raise; the load goes on without the advice
                    log.exception("huge_pages_failed")
                return True

            callback = lib.llama_progress_callback(_loading)
            _set_field(mparams, "progress_callback", callback)
        huge_before = anon_huge_bytes()
        model = lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        del callback  # llama.cpp keeps no reference to it after the load
        if not model:
            raise ModelError("llama.cpp could not load model " + str(self.model_path))
        self.model = model
        self.weights = "mmap" if s.use_mmap else "memory"
        self.weights_huge_mb = round(max(anon_huge_bytes() - huge_before, 0) / 2**20, 1)
        try:
            self._init_context(lib, model)
        except BaseException:
            self.free()
            raise

    def _init_context(self, lib: Any, model: Any) -> None:
        s = self.settings
        vocab = lib.llama_model_get_vocab(model)
        self.vocab = vocab
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self._row = ctypes.c_float * self.n_vocab
        self._logits_ith = _fast(_LOGITS_ITH, lib.llama_get_logits_ith)
        self._is_eog = _fast(_IS_EOG, lib.llama_vocab_is_eog)
        n_ctx_train = int(lib.llama_model_n_ctx_train(model))

        cparams = lib.llama_context_default_params()
        layout = kv_layout(n_ctx=self.n_ctx_req, slots=s.slots, kv_pool=s.kv_pool, flash_attn=s.flash_attn, n_ctx_train=n_ctx_train)
        self.unified = layout.unified
        _set_field(cparams, "n_ctx", layout.cells)
        _set_field(cparams, "n_batch", self.n_batch)
        _set_field(cparams, "n_ubatch", self.n_ubatch)
        _set_field(cparams, "n_seq_max", s.slots)
        _set_field(cparams, "n_threads", self.threads)
        _set_field(cparams, "n_threads_batch", self.threads_batch)
        _set_field(cparams, "kv_unified", layout.unified)  # see the module docstring
        _set_field(cparams, "no_perf", True)
        _set_field(cparams, "flash_attn_type", lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        type_k, type_v = kv_cache_types(s.kv_cache_type, flash_attn=s.flash_attn)
        if type_v is not type_k:
            log.warning("kv_cache_v_unquantized", kv_cache_type=s.kv_cache_type)
        _set_field(cparams, "type_k", type_k.ggml_type)
        _set_field(cparams, "type_v", type_v.ggml_type)
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelError("llama.cpp could not create a context for " + str(self.model_path))
        self.ctx = ctx
        self.mem = lib.llama_get_memory(ctx)
        self.n_cells = int(lib.llama_n_ctx(ctx))
        # unified: llama.cpp lets one sequence use the whole pool; a request gets n_ctx of it
        self.n_ctx_slot = min(int(lib.llama_n_ctx_seq(ctx)), layout.per_request)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)

        self.add_bos = bool(lib.llama_vocab_get_add_bos(vocab))
        bos = int(lib.llama_vocab_bos(vocab))
        eos = int(lib.llama_vocab_eos(vocab))
        self.bos_text = self._special_text(bos)
        template_src = self.info.chat_template if self.info else None
        self.chat_template = ChatTemplate(template_src, bos_token=self.bos_text, eos_token=self._special_text(eos))
        self.warmup_token = bos if bos >= 0 else 0

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self.lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def warmup(self) -> None:
        """Run one decode so the first request does not pay for lazy init (inference thread)."""
        lib = self.lib
        b = self.batch
        b.n_tokens = 1
        b.token[0] = self.warmup_token
        b.pos[0] = 0
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = 1
        lib.llama_decode(self.ctx, b)
        lib.llama_memory_clear(self.mem, True)

    def decode_sequence(self, tokens: Sequence[int], start_pos: int) -> None:
        """Decode `tokens` from `start_pos` on sequence 0 in n_batch chunks, logits for the last one.

        For one-sequence work outside the batcher (tuning trials, tests); inference thread or
        while no batcher runs.
        """
        batch = self.batch
        pos = start_pos
        for begin in range(0, len(tokens), self.n_batch):
            chunk = tokens[begin : begin + self.n_batch]
            for j, tok in enumerate(chunk):
                batch.token[j] = tok
                batch.pos[j] = pos + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = 0
            batch.logits[len(chunk) - 1] = 1
            batch.n_tokens = len(chunk)
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise InferenceError(f"llama_decode failed with code {rc}")
            pos += len(chunk)

    def save_seq(self, seq: int) -> mmap.mmap | None:
        """Copy sequence `seq`'s KV cells into a new anonymous mapping; None if it holds none or no memory is left (inference thread).

        Anonymous mappings, not heap blocks: a dropped conversation's memory goes straight back
        to the OS (the heap keeps blocks under heap.MMAP_THRESHOLD until a trim).
        """
        size = int(self.lib.llama_state_seq_get_size(self.ctx, seq))
        if size <= 0:
            return None
        try:
            buf = mmap.mmap(-1, size)
        except OSError as err:  # out of memory or map count: the cells stay in the pool
            log.warning("prompt_cache_save_failed", seq=seq, bytes=size, error=str(err))
            return None
        view = (ctypes.c_uint8 * size).from_buffer(buf)
        written = int(self.lib.llama_state_seq_get_data(self.ctx, view, size, seq))
        del view  # the mapping cannot close while a ctypes view exports it
        if written != size:
            buf.close()
            return None
        return buf

    def load_seq(self, seq: int, data: mmap.mmap) -> bool:
        """Copy cells saved by save_seq into sequence `seq`, replacing what it held (inference thread).

        False when llama.cpp found no room or refused the data; `seq` is then empty.
        """
        size = len(data)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        read = int(self.lib.llama_state_seq_set_data(self.ctx, view, size, seq))
        del view
        if read != size:
            self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
            return False
        return True

    def free(self) -> None:
        """Free batch, context and model (blocking; only once the inference thread has exited)."""
        lib = self.lib
        if lib is None:
            return
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
            self.mem = None
        if self.model is not None:
            lib.llama_model_free(self.model)
            self.model = None
            self.vocab = None
        self._views.clear()  # views of the freed context's logits buffer
        self._byte_tokens = None
        trim_heap()  # the KV cache and compute buffers come from the heap (heap.MMAP_THRESHOLD)

    # ------------------------------------------------------------------ text <-> tokens

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokenize `text` (thread-safe; CPU-bound for long text)."""
        lib = self.require_loaded()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
            if n < 0:
                raise InferenceError("tokenization failed")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Turn tokens back into text (thread-safe)."""
        lib = self.require_loaded()
        n_tok = len(tokens)
        arr = (lib.llama_token * max(n_tok, 1))(*tokens)
        cap = n_tok * 16 + 16
        while True:
            out = ctypes.create_string_buffer(cap)
            n = lib.llama_detokenize(self.vocab, arr, n_tok, out, cap, False, special)
            if n >= 0:
                return out.raw[:n].decode("utf-8", "replace")
            cap = -n + 1

    def piece(self, tok: int) -> bytes:
        """Return and cache the bytes of one token (inference thread: shares one buffer)."""
        piece = self._to_piece(tok, False)
        self.pieces[tok] = piece
        return piece

    def grammar_piece(self, tok: int) -> bytes:
        """The bytes llama.cpp's grammars see for a token: control tokens spelled out (inference thread)."""
        return self._to_piece(tok, True)

    def _to_piece(self, tok: int, special: bool) -> bytes:
        buf = self._piece_buf
        n = self.lib.llama_token_to_piece(self.vocab, tok, buf, PIECE_BUF_BYTES, 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, tok, big, -n, 0, special)
            return big.raw[: max(n, 0)]
        return buf.raw[:n]

    def byte_tokens(self) -> dict[int, int]:
        """A token for each byte value the vocabulary spells with a one-byte token (inference thread).

        Built on first use by reading every piece once (~50 ms for 49k tokens), then kept.
        """
        if self._byte_tokens is None:
            found: dict[int, int] = {}
            for tok in range(self.n_vocab):
                piece = self._to_piece(tok, False)
                if len(piece) == 1:
                    found.setdefault(piece[0], tok)
            self._byte_tokens = found
        return self._byte_tokens

    # ------------------------------------------------------------------ samplers

    def make_sampler(self, params: GenerationParams, grammar: str | None) -> Any:
        """Build a sampler: penalties, top_k, top_p, min_p, temp, dist/greedy, and a grammar checked after.

        Plain greedy (no penalties, no grammar) is `GREEDY`, an argmax with no chain; otherwise a
        llama.cpp sampler chain, or with a grammar a ConstrainedSampler.
        """
        if grammar is None and params.greedy and not params.penalties_enabled:
            return GREEDY
        lib = self.lib
        chain_params = lib.llama_sampler_chain_default_params()
        _set_field(chain_params, "no_perf", True)
        chain = lib.llama_sampler_chain_init(chain_params)
        add = lib.llama_sampler_chain_add
        g = None
        lazy = grammar is not None and params.tools is not None and params.tools.lazy
        param = grammar_param(params)
        if grammar is not None:
            if lazy:  # tool_choice auto: free text until the model opens a call, then the call's grammar
                patterns = (ctypes.c_char_p * 1)(TRIGGER_PATTERN.encode("utf-8"))
                g = lib.llama_sampler_init_grammar_lazy_patterns(self.vocab, grammar.encode("utf-8"), b"root", patterns, 1, None, 0)
            else:
                g = lib.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
            if not g:
                lib.llama_sampler_free(chain)
                what = "grammar" if param == "grammar" else "'" + param + "' compiles to a grammar that"
                raise ValidationError(what + " could not be parsed", param=param)
        if params.penalties_enabled:
            last_n = params.repeat_last_n if params.repeat_last_n >= 0 else self.n_ctx_slot
            add(
                chain,
                lib.llama_sampler_init_penalties(
                    self.n_vocab,
                    last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.greedy:
            add(chain, lib.llama_sampler_init_greedy())
            if g is None:
                return chain
            return ConstrainedSampler(
                self, chain, g, argmax=not params.penalties_enabled, lazy_source=grammar if lazy else None, param=param
            )
        if params.top_k > 0:
            add(chain, lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
        add(chain, lib.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else 0xFFFFFFFF  # LLAMA_DEFAULT_SEED
        add(chain, lib.llama_sampler_init_dist(seed))
        return chain if g is None else ConstrainedSampler(self, chain, g, lazy_source=grammar if lazy else None, param=param)

    def free_sampler(self, sampler: Any) -> None:
        """Free a sampler built by make_sampler."""
        if sampler is GREEDY:
            return
        if isinstance(sampler, ConstrainedSampler):
            sampler.free()
        else:
            self.lib.llama_sampler_free(sampler)

    def sample(self, sampler: Any, i: int) -> int:
        """Sample the next token of output `i` of the last decode (inference thread)."""
        if sampler is GREEDY:
            return int(self.logits(i).argmax())
        if isinstance(sampler, ConstrainedSampler):
            return sampler.sample(i)
        return int(self.lib.llama_sampler_sample(sampler, self.ctx, i))

    def logits(self, i: int) -> np.ndarray:
        """Return output `i` of the last decode as a view of llama.cpp's buffer (inference thread).

        Valid until the next decode. `np.ctypeslib.as_array` would build a ctypes array type per
        call (60 us); the row type is built once, and the views of the rows llama.cpp points at
        are kept (one per output row: a view is the address and the row's length, so it reads
        the same as a new one as long as llama.cpp returned that address for this decode).
        """
        addr = self._logits_ith(self.ctx, i)
        view = self._views.get(addr)
        if view is None:
            if not addr:
                raise InferenceError(f"llama.cpp has no logits for output {i}")
            if len(self._views) >= MAX_LOGIT_VIEWS:
                self._views.clear()
            view = self._views[addr] = np.frombuffer(self._row.from_address(addr), dtype=np.float32)
        return view

    def is_eog(self, tok: int) -> bool:
        """Whether a token ends generation, cached per token (inference thread)."""
        eog = self.eog.get(tok)
        if eog is None:
            eog = self.eog[tok] = bool(self._is_eog(self.vocab, tok))
        return eog


def grammar_param(params: GenerationParams) -> str:
    """The request field a generation's grammar comes from, for errors about it."""
    if params.grammar is not None:
        return "grammar"
    if params.json_schema is not None:
        return params.schema_param
    if params.tools is not None:
        return "tools"
    return "response_format"


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
# tokens refused one by one for completing a lazy grammar's trigger with text its grammar refuses,
# before the next token is taken from the trigger's own spelling instead
MAX_TRIGGER_REFUSALS = 32


class ConstrainedSampler:
    """A sampler chain with a grammar checked after sampling, as llama.cpp's own tools do.

    Applying a grammar to the whole vocabulary costs about as much as decoding a token of a
    small model. Most of the time the token the chain picks is one the grammar allows anyway:
    that one token is checked, and only when it is refused is the grammar applied to every
    candidate and the chain run again. The output is the same as grammar-first sampling.
    `argmax`: the chain is greedy alone, so its first pick is the logits' argmax (see Greedy).

    `lazy_source`: the GBNF text of a lazy grammar (tool_choice auto), which constrains nothing
    until the generated text contains TRIGGER_PATTERN. llama.cpp then feeds the grammar the text
    from the trigger on, including whatever the triggering token carries past it, and throws a
    C++ exception (which aborts the process) when the grammar refuses that text: `<tool_call`
    followed by the token `>``, say. Such a token is refused here before it is accepted, checked
    against a throwaway copy of the grammar. Inference thread only.
    """

    __slots__ = (
        "_argmax",
        "_arr",
        "_cur",
        "_ids",
        "_lazy_source",
        "_lib",
        "_llama",
        "_one",
        "_one_cur",
        "_param",
        "_tail",
        "_trigger",
        "_vocab_n",
        "chain",
        "grammar",
    )

    def __init__(
        self,
        llama: LlamaContext,
        chain: Any,
        grammar: Any,
        *,
        argmax: bool = False,
        lazy_source: str | None = None,
        param: str = "grammar",
    ) -> None:
        lib = llama.lib
        n_vocab = llama.n_vocab
        self._argmax = argmax
        self._llama = llama
        self._lib = lib
        self.chain = chain
        self.grammar = grammar
        self._vocab_n = n_vocab
        self._ids = np.arange(n_vocab, dtype="<i4")
        self._arr = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        data_p = ctypes.POINTER(lib.llama_token_data)
        self._cur = lib.llama_token_data_array(self._arr.ctypes.data_as(data_p), n_vocab, -1, False)
        self._one_cur = lib.llama_token_data_array(self._one.ctypes.data_as(data_p), 1, -1, False)
        # while a lazy grammar waits: its trigger, and the generated bytes that could start it
        self._trigger = TRIGGER_PATTERN.encode("utf-8") if lazy_source is not None else None
        self._lazy_source = lazy_source
        self._tail = b""
        self._param = param  # the request field the grammar came from, for errors

    def _fill(self, i: int) -> None:
        self._arr["id"] = self._ids
        self._arr["logit"] = self._llama.logits(i)
        self._arr["p"] = 0.0
        self._cur.size = self._vocab_n
        self._cur.selected = -1
        self._cur.sorted = False

    def _selected(self) -> int:
        cur = self._cur
        if cur.selected < 0:
            raise InferenceError("the sampler selected no token")
        return int(cur.data[cur.selected].id)

    def _pick(self, i: int, refused: list[int] | None = None) -> int:
        """The chain's choice for output `i`, the `refused` tokens left out (grammar not applied)."""
        if self._argmax:
            row = self._llama.logits(i)
            if refused:
                row = row.copy()
                row[refused] = -np.inf
            return int(row.argmax())
        self._fill(i)
        if refused:
            self._arr["logit"][refused] = -np.inf
        self._lib.llama_sampler_apply(self.chain, ctypes.byref(self._cur))
        return self._selected()

    def _allowed(self, grammar: Any, token: int) -> bool:
        """Whether `grammar` accepts `token` next (its state is not changed)."""
        one = self._one
        one["id"][0] = token
        one["logit"][0] = 1.0
        self._one_cur.size = 1
        self._one_cur.selected = -1
        self._one_cur.sorted = False
        self._lib.llama_sampler_apply(grammar, ctypes.byref(self._one_cur))
        return bool(np.isfinite(one["logit"][0]))

    def sample(self, i: int) -> int:
        lib = self._lib
        token = self._pick(i)
        if self._trigger is not None:  # the lazy grammar constrains nothing yet
            token = self._safe_for_trigger(i, token)
        elif not self._allowed(self.grammar, token):  # refused: constrain every candidate, then sample again
            self._fill(i)
            lib.llama_sampler_apply(self.grammar, ctypes.byref(self._cur))
            if not np.isfinite(self._arr["logit"]).any():
                # accepting any token now would abort the process inside llama.cpp
                raise ValidationError(
                    "'" + self._param + "' allows no next token, nor an end, after the text generated so far",
                    param=self._param,
                    status=422,
                )
            lib.llama_sampler_apply(self.chain, ctypes.byref(self._cur))
            token = self._selected()
        lib.llama_sampler_accept(self.grammar, token)
        lib.llama_sampler_accept(self.chain, token)
        return token

    def _safe_for_trigger(self, i: int, token: int) -> int:
        """Return `token`, or the chain's next choice when `token` would trigger the grammar with text it refuses."""
        trigger = self._trigger
        assert trigger is not None
        refused: list[int] = []
        while True:
            text = self._tail + self._llama.grammar_piece(token)
            at = text.find(trigger)
            if at < 0:
                self._tail = text[-(len(trigger) - 1) :]
                return token
            if self._call_may_start(text[at:]):
                self._trigger = None  # from now on the grammar constrains every token
                return token
            refused.append(token)
            if len(refused) >= MAX_TRIGGER_REFUSALS:
                return self._spell_trigger()
            token = self._pick(i, refused)

    def _call_may_start(self, text: bytes) -> bool:
        """Whether the lazy grammar accepts `text` (its trigger and what follows) as the start of a call.

        A fresh copy of the grammar is fed `text` one byte at a time, each byte checked before it
        is accepted: byte by byte, a refusal is an answer and never an exception.
        """
        if text == self._trigger:
            return True
        spell = self._llama.byte_tokens()
        if any(b not in spell for b in text):
            return False
        lib = self._lib
        probe = lib.llama_sampler_init_grammar(self._llama.vocab, (self._lazy_source or "").encode("utf-8"), b"root")
        if not probe:
            return False
        try:
            for b in text:
                if not self._allowed(probe, spell[b]):
                    return False
                lib.llama_sampler_accept(probe, spell[b])
            return True
        finally:
            lib.llama_sampler_free(probe)

    def _spell_trigger(self) -> int:
        """The one-byte token for the next byte of the trigger: it never carries text past it.

        A vocabulary with no such token gets its end-of-sequence token: the reply ends, unharmed.
        """
        trigger = self._trigger
        assert trigger is not None
        tail = self._tail
        have = next(n for n in range(min(len(tail), len(trigger) - 1), -1, -1) if tail.endswith(trigger[:n]))
        token = self._llama.byte_tokens().get(trigger[have])
        if token is None:
            return int(self._lib.llama_vocab_eos(self._llama.vocab))
        if have == len(trigger) - 1:
            self._trigger = None
        self._tail = (tail + trigger[have : have + 1])[-(len(trigger) - 1) :]
        return token

    def free(self) -> None:
        self._lib.llama_sampler_free(self.chain)
        self._lib.llama_sampler_free(self.grammar)
