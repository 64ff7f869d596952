"""glibc heap hygiene: fewer malloc arenas, and freed pages handed back to the OS.

glibc keeps the pages a process freed for its next allocations; after a one-off peak (loading
models, building a vector copy, a burst of embeddings) that is memory nothing uses again. These
calls do nothing on other C libraries (musl, macOS).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
from typing import Any

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
# Blocks below this come from the heap, not a fresh mmap: the embedder's batch buffers (ONNX
# Runtime without its arena) would otherwise be mapped, faulted in and unmapped on every batch,
# 10 % of int8 embeddings/s. Freed heap pages go back by trim_heap (at READY, when the
# embedder goes idle, when a model is freed), not by glibc's 128 KB automatic trim.
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 128 << 20
# glibc's own environment variables win over these settings
_ENV = {M_ARENA_MAX: "MALLOC_ARENA_MAX", M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_"}


@functools.cache
def _glibc() -> Any:
    """glibc's handle, loaded once (trim_heap runs after every embedding burst); None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc (musl, macOS)


def tune_malloc() -> None:
    """Cap glibc's malloc arenas and raise its mmap and trim thresholds (before any thread starts).

    glibc gives each thread that allocates its own arena, up to eight per core, and each keeps
    the pages it freed. The daemon's threads (inference, embedder, executors) would each hold a
    few MB that no one uses again; two arenas cost nothing measurable in speed here. A setting
    whose glibc environment variable is set is left to it.
    """
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return  # not glibc: nothing to tune
    for param, value in ((M_ARENA_MAX, MALLOC_ARENAS), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if _ENV[param] not in os.environ:
            mallopt(param, value)


def trim_heap() -> None:
    """Hand freed heap pages of every arena back to the OS (any thread; ctypes drops the GIL)."""
    malloc_trim = getattr(_glibc(), "malloc_trim", None)
    if malloc_trim is not None:  # not glibc (musl, macOS): nothing to trim
        malloc_trim(0)


def release_free_heap() -> None:
    """Collect start-up garbage, then trim the heap (~10 ms)."""
    gc.collect()
    trim_heap()
