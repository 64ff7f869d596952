"""The KV cache types llama.cpp offers, in one table.

Config validation, the engine's context parameters and the memory estimate all read it, so a
type is accepted exactly where it can be loaded and costed. Rows follow llama.cpp's own list
(`kv_cache_types` in common/arg.cpp); ids are `enum ggml_type` (ggml.h); sizes are ggml block
bytes over values per block (q8_0 = 34 bytes / 32 values, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class KVCacheType:
    """One KV cache element type: its ggml id, its size and whether it is quantized."""

    name: str
    ggml_type: int
    bytes_per_elem: float
    quantized: bool


KV_CACHE_TYPES: Mapping[str, KVCacheType] = MappingProxyType(
    {
        t.name: t
        for t in (
            KVCacheType("f32", 0, 4.0, quantized=False),
            KVCacheType("f16", 1, 2.0, quantized=False),
            KVCacheType("bf16", 30, 2.0, quantized=False),
            KVCacheType("q8_0", 8, 34 / 32, quantized=True),
            KVCacheType("q4_0", 2, 18 / 32, quantized=True),
            KVCacheType("q4_1", 3, 20 / 32, quantized=True),
            KVCacheType("iq4_nl", 20, 18 / 32, quantized=True),
            KVCacheType("q5_0", 6, 22 / 32, quantized=True),
            KVCacheType("q5_1", 7, 24 / 32, quantized=True),
        )
    }
)
UNQUANTIZED_V = KV_CACHE_TYPES["f16"]


def kv_cache_types(name: str, *, flash_attn: bool) -> tuple[KVCacheType, KVCacheType]:
    """Return the (K, V) cache types the engine uses for `name` (KeyError if unknown).

    llama.cpp needs flash attention for a quantized V cache; without it only K is quantized
    and V stays f16.
    """
    k = KV_CACHE_TYPES[name]
    return k, (k if flash_attn or not k.quantized else UNQUANTIZED_V)


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How the slots' KV cells are laid out in one llama.cpp context."""

    unified: bool  # one pool shared by every slot (llama.cpp's kv_unified)
    cells: int  # cells of the whole cache: llama.cpp's n_ctx
    per_request: int  # tokens one request may use, prompt and answer together


def kv_layout(*, n_ctx: int, slots: int, kv_pool: int, flash_attn: bool, n_ctx_train: int = 0) -> KVLayout:
    """Return the cache layout of the settings (pure).

    `n_ctx` is what one request may use (capped at the model's training context). Without a
    pool every slot has its own stream of that size. With a pool and flash attention the slots
    share `kv_pool` cells and the engine reserves each request's cells on admission; flash
    attention's kernel skips the cells of other sequences, so a stream only pays for its own.
    Without flash attention every stream would attend over the whole pool (measured: decoding
    halved), so a pool there is split into one stream of `kv_pool / slots` cells per slot, the
    same memory.
    """
    per = min(n_ctx, n_ctx_train) if n_ctx_train > 0 else n_ctx
    slots = max(slots, 1)
    if kv_pool <= 0:
        return KVLayout(False, per * slots, per)
    if flash_attn and slots > 1:
        return KVLayout(True, kv_pool, min(per, kv_pool))
    each = max(min(per, kv_pool // slots), 1)
    return KVLayout(False, each * slots, each)
