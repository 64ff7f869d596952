"""Identify the board we run on and what its CPU, memory and accelerators look like.

Every probe reads a file under `root` (``/`` in production, a recorded tree in tests) and
tolerates missing or garbled content: detection falls back, it never raises. Only the
pure `classify_*` / `split_*` helpers decide; the `_read_*` helpers only read.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROFILE_PI4 = "pi4"
PROFILE_PI5 = "pi5"
PROFILE_ORIN_NANO = "jetson-orin-nano"
PROFILE_AGX_ORIN = "jetson-agx-orin"
PROFILE_X86_I7 = "x86-i7"
PROFILE_GENERIC = "generic"
PROFILES = (PROFILE_PI4, PROFILE_PI5, PROFILE_ORIN_NANO, PROFILE_AGX_ORIN, PROFILE_X86_I7, PROFILE_GENERIC)

# Files larger than this are not ours to parse (a recorded /proc/cpuinfo of a 256-thread
# server is ~400 KB); reading stops there instead of pulling an arbitrary file into memory.
MAX_PROBE_BYTES = 1 << 20
# Highest CPU id we scan in sysfs; bounds the work when `online` is garbled.
MAX_CPUS = 1024
# A cluster counts as "little" only when its max frequency is below this share of the
# fastest cluster: binning differences between big clusters (RK3588 reports 2.352 vs
# 2.4 GHz on some boards) must not turn half the big cores into little ones.
LITTLE_FREQ_RATIO = 0.85
# A tegra234 board without a known module id is taken for an AGX Orin above this much RAM.
AGX_MIN_RAM_MB = 20 * 1024
# Embedding threads: two once the board has this many physical cores, else one, so the
# embedder never competes with the LLM for every core.
EMBED_TWO_THREADS_MIN_CORES = 6

_DMI_JUNK = frozenset(
    s.casefold()
    for s in (
        "",
        "To Be Filled By O.E.M.",
        "To be filled by O.E.M.",
        "System manufacturer",
        "System Product Name",
        "Default string",
        "Not Applicable",
        "None",
        "OEM",
        "O.E.M.",
    )
)
# Intel Core i5/i7/i9 and Core Ultra 5/7/9, AMD Ryzen 5/7/9: desktop/laptop class CPUs
# the x86-i7 profile is sized for. i3, Pentium, Celeron, Atom and unknown CPUs get generic.
_X86_DESKTOP_RE = re.compile(
    r"Core\(TM\)\s+i[579]-|Core\s+i[579]\b|Core\(TM\)\s+Ultra\s+[579]|Core\s+Ultra\s+[579]|Ryzen\s+[579]\s",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class BoardInfo:
    """What the daemon needs to know about the machine; cpu ids are logical ids."""

    profile: str
    model: str
    arch: str
    cores_logical: int
    cores_physical: int
    big_cores: tuple[int, ...] = ()
    little_cores: tuple[int, ...] = ()
    ram_mb: int = 0  # 0: unknown
    accelerators: tuple[str, ...] = ()
    # Physical cores among big_cores (differs from len(big_cores) only on hybrid x86 with SMT).
    big_cores_physical: int = 0

    @property
    def is_big_little(self) -> bool:
        return bool(self.big_cores) and bool(self.little_cores)


# --------------------------------------------------------------------------- reading


def _read_bytes(path: Path) -> bytes | None:
    """Read at most MAX_PROBE_BYTES of a file; None when it cannot be read (blocking)."""
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_PROBE_BYTES)
    except (OSError, ValueError):  # missing, unreadable, a directory, odd path: all "unknown"
        return None


def _read_text(path: Path) -> str | None:
    """Read a small text file, NULs and surrounding whitespace stripped (blocking)."""
    raw = _read_bytes(path)
    if raw is None:
        return None
    return raw.decode("utf-8", "replace").replace("\0", " ").strip()


def _read_strings(path: Path) -> tuple[str, ...]:
    """Read a NUL-separated device-tree string list (blocking)."""
    raw = _read_bytes(path)
    if raw is None:
        return ()
    return tuple(s for s in raw.decode("utf-8", "replace").split("\0") if s.strip())


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # permission denied on a parent, name too long: treat as absent
        return False


# --------------------------------------------------------------------------- pure parsers


def parse_cpu_list(text: str | None) -> tuple[int, ...]:
    """Parse a sysfs cpu list such as ``0-3,6,8-9``; garbage yields ()."""
    if not text:
        return ()
    cpus: set[int] = set()
    for raw in text.strip().split(","):
        part = raw.strip()
        if not part:
            continue
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            return ()
        if lo < 0 or hi < lo or hi >= MAX_CPUS:
            return ()
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def parse_cpuinfo(text: str | None) -> list[dict[str, str]]:
    """Split /proc/cpuinfo into one dict per processor block (plus trailing global lines)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in (text or "").splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_meminfo_mb(text: str | None) -> int:
    """Return MemTotal in MiB from /proc/meminfo text, 0 when absent or garbled."""
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            try:
                kb = int(parts[1])
            except (IndexError, ValueError):
                return 0
            unit = parts[2].lower() if len(parts) > 2 else "kb"
            factor = {"kb": 1024, "mb": 1024 * 1024, "b": 1}.get(unit, 1024)
            return max(0, kb * factor // (1024 * 1024))
    return 0


def split_big_little(max_freq_by_cpu: Mapping[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return (big, little) cpu ids from per-cpu max frequencies; ((), ()) when homogeneous.

    Little cores are the slowest cluster; every faster cluster (big, and "prime" on
    three-tier SoCs) counts as big. The split needs ≥2 distinct frequencies, every cpu
    known, and a real gap (LITTLE_FREQ_RATIO) so binning noise is not a cluster.
    """
    freqs = {cpu: f for cpu, f in max_freq_by_cpu.items() if f > 0}
    if len(freqs) < 2 or len(freqs) != len(max_freq_by_cpu):
        return (), ()
    lowest, highest = min(freqs.values()), max(freqs.values())
    if lowest == highest or lowest >= highest * LITTLE_FREQ_RATIO:
        return (), ()
    little = tuple(sorted(c for c, f in freqs.items() if f == lowest))
    big = tuple(sorted(c for c, f in freqs.items() if f != lowest))
    return big, little


def count_physical_from_siblings(siblings: Iterable[tuple[int, ...]]) -> int:
    """Count physical cores as distinct thread-sibling sets (0 when none are known)."""
    return len({s for s in siblings if s})


def count_physical_from_cpuinfo(blocks: list[dict[str, str]]) -> int:
    """Count physical cores from (physical id, core id) pairs, else `cpu cores` per package."""
    procs = [b for b in blocks if "processor" in b]
    pairs = {(b.get("physical id"), b.get("core id")) for b in procs if "core id" in b}
    if pairs and all(len(p) == 2 for p in pairs):
        return len(pairs)
    per_package: dict[str, int] = {}
    for b in procs:
        try:
            per_package[b.get("physical id", "0")] = int(b["cpu cores"])
        except (KeyError, ValueError):
            continue
    return sum(per_package.values())


def classify_x86(cpu_model: str) -> str:
    """Return the x86 profile for a /proc/cpuinfo model name."""
    return PROFILE_X86_I7 if _X86_DESKTOP_RE.search(cpu_model) else PROFILE_GENERIC


def classify_arm(
    model: str,
    compatible: tuple[str, ...],
    tegra_release: str | None,
    ram_mb: int,
    cores_logical: int,
) -> str | None:
    """Return the profile of a Raspberry Pi or Jetson from device-tree facts, else None."""
    compat = [c.strip().lower() for c in compatible]
    low_model = model.lower()
    if "brcm,bcm2712" in compat or low_model.startswith(("raspberry pi 5", "raspberry pi compute module 5", "raspberry pi 500")):
        return PROFILE_PI5
    if "brcm,bcm2711" in compat or low_model.startswith(("raspberry pi 4", "raspberry pi compute module 4", "raspberry pi 400")):
        return PROFILE_PI4
    # Jetson module ids: p3767 = Orin Nano / Orin NX (carrier p3768 or p3509),
    # p3701 = AGX Orin (carrier p3737). Entries look like "nvidia,p3768-0000+p3767-0005[-super]".
    if any("p3701" in c for c in compat) or "agx orin" in low_model:
        return PROFILE_AGX_ORIN
    if any("p3767" in c for c in compat) or "orin nano" in low_model or "orin nx" in low_model:
        return PROFILE_ORIN_NANO
    if "nvidia,tegra234" in compat or tegra_release is not None:
        # Unknown Orin-class module: size it by RAM and cores.
        if ram_mb >= AGX_MIN_RAM_MB or cores_logical >= 8:
            return PROFILE_AGX_ORIN
        return PROFILE_ORIN_NANO
    return None


def arch_from_cpuinfo(blocks: list[dict[str, str]]) -> str | None:
    """Infer the machine architecture from /proc/cpuinfo fields (for recorded trees)."""
    for b in blocks:
        if "cpu architecture" in b:
            return {"8": "aarch64", "7": "armv7l", "6": "armv6l"}.get(b["cpu architecture"])
        flags = b.get("flags")
        if flags is not None and "vendor_id" in b:
            return "x86_64" if " lm " in f" {flags} " else "i686"
    return None


# --------------------------------------------------------------------------- probing


def _online_cpus(root: Path, blocks: list[dict[str, str]]) -> tuple[int, ...]:
    cpu_dir = root / "sys/devices/system/cpu"
    for name in ("online", "present"):
        cpus = parse_cpu_list(_read_text(cpu_dir / name))
        if cpus:
            return cpus
    ids: list[int] = []
    for b in blocks:
        try:
            ids.append(int(b["processor"]))
        except (KeyError, ValueError):
            continue
    if ids:
        return tuple(sorted(set(ids)))
    if root == Path("/"):
        return tuple(range(os.cpu_count() or 1))
    return (0,)


def _siblings(root: Path, cpus: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for cpu in cpus:
        topo = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        sib = parse_cpu_list(_read_text(topo / "core_cpus_list")) or parse_cpu_list(_read_text(topo / "thread_siblings_list"))
        if not sib:
            # Ids alone: (package, cluster, core) is unique; (package, core) alone collides
            # across clusters on arm64, so it is only used when cluster_id exists or the
            # arch has no clusters (x86 always has thread_siblings_list anyway).
            core = _read_int(topo / "core_id")
            pkg = _read_int(topo / "physical_package_id")
            cluster = _read_int(topo / "cluster_id")
            if core is None or pkg is None:
                return []
            out.append((-1, pkg, cluster if cluster is not None else -1, core))
            continue
        out.append(sib)
    return out


def _max_freqs(root: Path, cpus: tuple[int, ...]) -> dict[int, int]:
    freqs: dict[int, int] = {}
    for cpu in cpus:
        f = _read_int(root / f"sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq")
        freqs[cpu] = f if f is not None and f > 0 else 0
    return freqs


def _x86_hybrid(root: Path, cpus: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return (P-cores, E-cores) from the perf PMUs of Intel hybrid CPUs, else ((), ())."""
    big = parse_cpu_list(_read_text(root / "sys/devices/cpu_core/cpus"))
    little = parse_cpu_list(_read_text(root / "sys/devices/cpu_atom/cpus"))
    online = set(cpus)
    big = tuple(c for c in big if c in online)
    little = tuple(c for c in little if c in online)
    return (big, little) if big and little else ((), ())


def _accelerators(root: Path, tegra: bool) -> tuple[str, ...]:
    found: list[str] = []
    if tegra:
        found.append("tegra-gpu")
    dev = root / "dev"
    discrete = _exists(dev / "nvidiactl") or _exists(dev / "nvidia0")
    # On Jetson the CUDA driver (libcuda) ships in the L4T BSP, not as /dev/nvidia*.
    tegra_cuda = tegra and any(
        _exists(root / d / "libcuda.so.1.1") or _exists(root / d / "libcuda.so.1")
        for d in ("usr/lib/aarch64-linux-gnu/nvidia", "usr/lib/aarch64-linux-gnu/tegra", "usr/local/cuda/compat")
    )
    if discrete or tegra_cuda:
        found.append("cuda")
    return tuple(found)


def _dmi(root: Path) -> str:
    parts: list[str] = []
    for name in ("sys_vendor", "product_name"):
        value = _read_text(root / "sys/class/dmi/id" / name)
        if value and value.casefold() not in _DMI_JUNK:
            parts.append(value)
    return " ".join(parts)


def detect_board(root: Path = Path("/")) -> BoardInfo:
    """Probe the procfs/sysfs/etc tree under `root` and describe the board (blocking, never raises)."""
    cpuinfo = parse_cpuinfo(_read_text(root / "proc/cpuinfo"))
    ram_mb = parse_meminfo_mb(_read_text(root / "proc/meminfo"))
    dt_model = " ".join(_read_strings(root / "proc/device-tree/model")).strip()
    compatible = _read_strings(root / "proc/device-tree/compatible")
    tegra_release = _read_text(root / "etc/nv_tegra_release")

    # The running userland decides which binaries work, so "/" asks Python; a recorded
    # tree only has its cpuinfo to go by.
    live_arch = platform.machine() if root == Path("/") else ""
    arch = live_arch or arch_from_cpuinfo(cpuinfo) or "unknown"

    cpus = _online_cpus(root, cpuinfo)
    cores_logical = len(cpus)
    siblings = _siblings(root, cpus)
    cores_physical = count_physical_from_siblings(siblings) or count_physical_from_cpuinfo(cpuinfo)
    if not 0 < cores_physical <= cores_logical:
        # The original monGARS fell back to logical CPUs when physical ones were unknown.
        cores_physical = cores_logical

    is_x86 = arch in ("x86_64", "amd64", "i386", "i686")
    if is_x86:
        big, little = _x86_hybrid(root, cpus)
    else:
        big, little = split_big_little(_max_freqs(root, cpus))
    big_physical = len(big)
    if big and len(siblings) == len(cpus):
        by_cpu = dict(zip(cpus, siblings, strict=True))
        big_physical = count_physical_from_siblings(by_cpu[c] for c in big) or len(big)

    cpu_model = next((b["model name"] for b in cpuinfo if b.get("model name")), "")
    tegra = tegra_release is not None or any(c.startswith("nvidia,tegra") for c in compatible)

    profile = classify_arm(dt_model, compatible, tegra_release, ram_mb, cores_logical)
    if profile is None:
        profile = classify_x86(cpu_model) if is_x86 else PROFILE_GENERIC

    if dt_model:
        model = dt_model
    else:
        dmi = _dmi(root)
        model = " / ".join(p for p in (dmi, cpu_model) if p) or "unknown machine"

    return BoardInfo(
        profile=profile,
        model=model,
        arch=arch,
        cores_logical=cores_logical,
        cores_physical=cores_physical,
        big_cores=big,
        little_cores=little,
        ram_mb=ram_mb,
        accelerators=_accelerators(root, tegra),
        big_cores_physical=big_physical,
    )


# --------------------------------------------------------------------------- decisions


def recommended_threads(info: BoardInfo) -> int:
    """Return llama.cpp's thread count: big cores on big.LITTLE, else physical cores, ≥1.

    Threads spread over little cores make every step wait for the slowest core; llama.cpp
    runs about 2x slower on big.LITTLE with all cores than with the big ones only.
    """
    if info.is_big_little:
        return max(1, info.big_cores_physical or len(info.big_cores))
    return max(1, info.cores_physical or info.cores_logical)


def recommended_embed_threads(info: BoardInfo) -> int:
    """Return the ONNX embedder's intra-op threads: 1, or 2 on boards with many cores."""
    return 2 if info.cores_physical >= EMBED_TWO_THREADS_MIN_CORES else 1
