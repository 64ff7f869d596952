"""Transparent huge pages for a model's weights read into the daemon's own memory (Linux).

Decoding streams every weight once per token: 92 MB for the default model, 23,000 pages of
4 KB, each a TLB miss waiting to happen. Backed by 2 MB pages the same weights are 46 pages.
Measured with llama-bench on a 2-core EPYC (SmolLM2-135M Q4_1, tg128, flash attention): weights
memory-mapped from the page cache 131-133 t/s, read into anonymous memory on huge pages
138-140 t/s.

Most kernels only give huge pages to memory that asks for them (`transparent_hugepage` =
`madvise`), and llama.cpp allocates its weight buffer inside `llama_model_load_from_file`,
then reads the file into it. The loader's progress callback runs after that allocation and
before the first tensor is read: `WeightsAdvisor` notes the anonymous mappings that exist before
the load, and at the first callback advises `MADV_HUGEPAGE` on the ones that are new and
large, so the reads fault in 2 MB pages directly (no copy, and no page more than the buffer
already holds: only whole 2 MB extents inside a new mapping are advised).

Where huge pages are off (`never`), unsupported, or not Linux, the advice fails quietly and
the weights load on ordinary pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import structlog

log = structlog.get_logger("mongarsd.inference.llm")

MADV_HUGEPAGE: Final = 14  # linux/mman.h (the same on x86-64 and arm64)
DEFAULT_HUGE_PAGE: Final = 2 << 20
MIN_ADVISED_BYTES: Final = 8 << 20  # new mappings smaller than this are not a model's weights
MAPS: Final = Path("/proc/self/maps")
SMAPS_ROLLUP: Final = Path("/proc/self/smaps_rollup")
THP_DIR: Final = Path("/sys/kernel/mm/transparent_hugepage")

Range = tuple[int, int]  # [start, end) of a mapping


def parse_anon_ranges(maps_text: str) -> list[Range]:
    """Return the private read-write anonymous mappings of a /proc/PID/maps text, sorted (pure).

    Anonymous: no path, or a name the kernel or an allocator gave (`[anon:...]`); the heap,
    stacks and file mappings are left out.
    """
    out: list[Range] = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1] != "rw-p":
            continue
        name = fields[5].strip() if len(fields) == 6 else ""
        if name and not name.startswith("[anon:"):
            continue
        start, _, end = fields[0].partition("-")
        try:
            out.append((int(start, 16), int(end, 16)))
        except ValueError:
            continue
    out.sort()
    return out


def subtract(after: Iterable[Range], before: Iterable[Range]) -> list[Range]:
    """Return the parts of `after` that no range of `before` covers (pure).

    A new allocation can merge with a neighbouring mapping, so mappings are compared by the
    addresses they cover, not as whole lines.
    """
    old = sorted(before)
    out: list[Range] = []
    for start, end in sorted(after):
        pos = start
        for o_start, o_end in old:
            if o_end <= pos or o_start >= end:
                continue
            if o_start > pos:
                out.append((pos, o_start))
            pos = max(pos, o_end)
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end))
    return out


def aligned_interior(start: int, end: int, page: int) -> Range | None:
    """Return the whole `page`-aligned extents inside [start, end), or None if there are none (pure)."""
    lo = (start + page - 1) // page * page
    hi = end // page * page
    return (lo, hi) if hi > lo else None


def huge_page_bytes() -> int:
    """The PMD huge page size the kernel uses (2 MB on x86-64 and 4 KB-page arm64)."""
    try:
        return int((THP_DIR / "hpage_pmd_size").read_text().strip())
    except (OSError, ValueError):
        return DEFAULT_HUGE_PAGE


def thp_mode() -> str:
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), or `unavailable`."""
    try:
        text = (THP_DIR / "enabled").read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def anon_huge_bytes() -> int:
    """Bytes of this process's anonymous memory on huge pages (0 where unknown)."""
    try:
        for line in SMAPS_ROLLUP.read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _read_maps() -> list[Range]:
    try:
        return parse_anon_ranges(MAPS.read_text())
    except OSError:
        return []


class WeightsAdvisor:
    """Advise huge pages on the anonymous mappings a model load creates (see the module docstring).

    Create it just before `llama_model_load_from_file` and call `advise` from the loader's
    progress callback; only the first call does anything. Nothing here raises. `min_bytes`: the
    smallest new mapping taken for the weights (half the model file: another thread's
    allocation made during the load is left alone).
    """

    def __init__(self, min_bytes: int = MIN_ADVISED_BYTES) -> None:
        self.min_bytes = max(min_bytes, MIN_ADVISED_BYTES)
        self.enabled = sys.platform.startswith("linux") and thp_mode() in ("always", "madvise")
        self._before = _read_maps() if self.enabled else []
        self._done = not self.enabled
        self.advised_bytes = 0
        self._madvise = None
        if self.enabled:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                madvise = libc.madvise
                madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                madvise.restype = ctypes.c_int
                self._madvise = madvise
            except (OSError, AttributeError):
                self._done = True

    def advise(self) -> int:
        """Advise MADV_HUGEPAGE on the new large anonymous mappings; return the bytes advised."""
        if self._done:
            return 0
        self._done = True
        page = huge_page_bytes()
        for start, end in subtract(_read_maps(), self._before):
            if end - start < self.min_bytes:
                continue
            inner = aligned_interior(start, end, page)
            if inner is None or self._madvise is None:
                continue
            if self._madvise(inner[0], inner[1] - inner[0], MADV_HUGEPAGE) == 0:
                self.advised_bytes += inner[1] - inner[0]
            else:
                log.info("huge_pages_refused", errno=ctypes.get_errno(), mb=round((inner[1] - inner[0]) / 2**20, 1))
        return self.advised_bytes
