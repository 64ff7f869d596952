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
