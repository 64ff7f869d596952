"""glibc heap hygiene: fewer malloc arenas, and freed pages handed back to the OS.

glibc keeps the pages a process freed for its next allocations; after a one-off peak (loading
models, building a vector copy) that is memory nothing uses again. Both calls do nothing on
other C libraries (musl, macOS).
"""

from __future__ import annotations

import ctypes
import gc

M_ARENA_MAX = -8  # glibc mallopt parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas before any thread starts (blocking, instantaneous).

    glibc gives each thread that allocates its own arena, up to eight per core, and each keeps
    the pages it freed. The daemon's threads (inference, embedder, executors) would each hold a
    few MB that no one uses again; two arenas cost nothing measurable in speed here.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to cap


def trim_heap() -> None:
    """Hand freed heap pages of every arena back to the OS (any thread; ctypes drops the GIL)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to trim


def release_free_heap() -> None:
    """Collect start-up garbage, then trim the heap (~10 ms)."""
    gc.collect()
    trim_heap()
