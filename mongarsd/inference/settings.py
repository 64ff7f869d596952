"""How an engine runs a model: one frozen value shared by the manager and every engine it loads."""

from __future__ import annotations

from dataclasses import dataclass

from mongarsd.errors import ValidationError
from mongarsd.inference.kv_cache import KV_CACHE_TYPES

# llama.cpp's patched matrix-vector product reads GGML_MUL_MAT_PREFETCH once per process and
# ignores values outside 0..1 MiB (native/patches/*/0002-*.patch)
PREFETCH_ENV = "GGML_MUL_MAT_PREFETCH"
MAX_PREFETCH_BYTES = 1 << 20
# ... and on x86 GGML_CPU_F16C_SCALES: the Q4_1 and Q8_0 dot products convert their fp16 block
# scales with F16C instead of ggml's lookup table, same results bit for bit (0003-*.patch).
# The daemon turns it on unless the environment already sets it (0: llama.cpp's released loops).
F16C_SCALES_ENV = "GGML_CPU_F16C_SCALES"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Context, batching, threads, slots, KV cache and placement of one loaded model."""

    n_ctx: int = 2048  # per slot: prompt + completion of one request
    n_batch: int = 512
    n_ubatch: int = 512
    threads: int = 0  # 0: every CPU this process may run on
    threads_batch: int = 0  # 0: same as threads
    slots: int = 4
    kv_pool: int = 0  # cells shared by the slots; 0: n_ctx cells per slot (see context.py)
    queue_depth: int = 16  # requests waiting for a slot before new ones are refused
    kv_cache_type: str = "f16"  # a key of KV_CACHE_TYPES
    flash_attn: bool = False
    use_mmap: bool = False
    use_mlock: bool = False
    gpu_layers: int = 0
    warmup: bool = True  # one decode at start so the first request does not pay for lazy init
    stream_interval_ms: int = 0  # hold a stream's tokens for up to this long and hand them over together
    prompt_cache_mb: int = 0  # shared pool only: host memory for idle conversations' cells (0: they stay in the pool)
    prefetch_bytes: int = 4096  # decoding: weight rows requested this far ahead (0: hardware prefetch only); per process

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValidationError("slots must be >= 1", param="slots")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise ValidationError("stream_interval_ms must be between 0 and 1000", param="stream_interval_ms")
        if not 0 <= self.prefetch_bytes <= MAX_PREFETCH_BYTES:
            raise ValidationError(f"prefetch_bytes must be between 0 and {MAX_PREFETCH_BYTES}", param="prefetch_bytes")
        if self.prompt_cache_mb < 0:
            raise ValidationError("prompt_cache_mb must be >= 0", param="prompt_cache_mb")
        if self.kv_pool < 0:
            raise ValidationError("kv_pool must be >= 0", param="kv_pool")
        if self.queue_depth < 0:
            raise ValidationError("queue_depth must be >= 0", param="queue_depth")
        if self.kv_cache_type not in KV_CACHE_TYPES:
            raise ValidationError("kv_cache_type must be one of " + ", ".join(KV_CACHE_TYPES), param="kv_cache_type")
