"""Choose which llama.cpp library build the daemon loads (DESIGN.md section 8).

A distributed build (the single executable, the .deb) carries llama.cpp compiled for a few
instruction-set levels side by side, ``<libs>/<variant>/libllama.so``; none of them uses
``-march=native``. The board profile (``inference.cpu_variant``) names one, or ``auto``
takes the fastest one this CPU can run. A developer's venv has no such folder: it loads
llama-cpp-python's own build, compiled for the machine it runs on (``native``).

The choice must be made before ``llama_cpp`` is imported: llama-cpp-python reads
``LLAMA_CPP_LIB_PATH`` once, at import. Only `detect_hwcaps` and `libs_dir` read the
machine; `select` decides from what they return.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mongarsd.errors import ConfigError

ENV_LIB_PATH: Final = "LLAMA_CPP_LIB_PATH"
ENV_LIBS_DIR: Final = "MONGARSD_NATIVE_LIBS"
# Folder of the variants inside a PyInstaller bundle (sys._MEIPASS).
BUNDLE_LIBS: Final = "llama_libs"
AUTO: Final = "auto"
NATIVE: Final = "native"
LIB_FILE: Final = "libllama.so"

# getauxval(AT_HWCAP) bits of arm64 Linux (arch/arm64/include/uapi/asm/hwcap.h). Read from the
# auxiliary vector rather than /proc/cpuinfo: qemu-user reports the emulated CPU there.
_AT_HWCAP: Final = 16
_ARM64_HWCAP_BITS: Final[Mapping[int, str]] = {0: "fp", 1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp"}


@dataclass(frozen=True, slots=True)
class Variant:
    """One instruction-set build of llama.cpp."""

    name: str
    arch: str  # "x86_64" | "arm64"
    requires: frozenset[str]  # CPU features (Linux names) it executes
    description: str


_X86_64_V3: Final = frozenset({"avx", "avx2", "fma", "f16c", "bmi2"})
_X86_64_V4: Final = _X86_64_V3 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}

# Fastest first within an architecture: `auto` takes the first one the CPU can run.
VARIANTS: Final[tuple[Variant, ...]] = (
    # VNNI's 8-bit dot product is what the quantized matrix-vector products of decoding run on
    # (native/README.md gives the measurement).
    Variant(
        "x86-64-v4-vnni",
        "x86_64",
        _X86_64_V4 | {"avx512_vnni"},
        "AVX-512 with VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and later)",
    ),
    Variant("x86-64-v4", "x86_64", _X86_64_V4, "AVX-512 F/CD/BW/DQ/VL, no VNNI (Skylake-SP)"),
    Variant("x86-64-v3", "x86_64", _X86_64_V3, "AVX2 + FMA, no AVX-512 (Haswell, Zen and later)"),
    Variant("x86-64-v2", "x86_64", frozenset({"sse4_2", "ssse3", "popcnt"}), "SSE4.2 baseline (any x86-64 since Nehalem)"),
    Variant("armv8.2-a+dotprod", "arm64", frozenset({"asimddp", "fphp", "asimdhp"}), "dotprod + fp16 (Cortex-A76 / A78: Pi 5, Orin)"),
    Variant("armv8-a", "arm64", frozenset({"asimd"}), "Armv8.0 baseline, no dotprod (Cortex-A72: Pi 4)"),
)
VARIANT_NAMES: Final = tuple(v.name for v in VARIANTS)
CHOICES: Final = (AUTO, NATIVE, *VARIANT_NAMES)


@dataclass(frozen=True, slots=True)
class LibChoice:
    """What will be loaded and why; `path` is None for llama-cpp-python's own build."""

    variant: str
    path: Path | None
    reason: str

    def describe(self) -> str:
        where = str(self.path) if self.path is not None else "llama-cpp-python's own build"
        return f"{self.variant} ({where}): {self.reason}"


def normalise_arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    return m


def select(*, arch: str, hwcaps: Iterable[str], requested: str, available: Iterable[str] | None, libs: Path | None = None) -> LibChoice:
    """Decide which build to load; ConfigError when the request cannot run here.

    `available` is the set of variant folders present (None: no portable libraries are
    installed, as in a developer's venv, which then loads its own native build).
    """
    caps = frozenset(hwcaps)
    if requested not in CHOICES:
        raise ConfigError(f"inference.cpu_variant: unknown value {requested!r}; choose one of {', '.join(CHOICES)}")
    if available is None or libs is None:
        if requested in (AUTO, NATIVE):
            return LibChoice(NATIVE, None, "no portable libraries installed; the build made for this machine")
        return LibChoice(NATIVE, None, f"{requested} asked for, but no portable libraries are installed; the build made for this machine")
    present = frozenset(available)
    if requested == NATIVE:
        return LibChoice(NATIVE, None, "asked for by inference.cpu_variant")
    candidates = [v for v in VARIANTS if v.arch == arch]
    if not candidates:
        raise ConfigError(f"no llama.cpp variant is built for the {arch} architecture")
    if requested == AUTO:
        for v in candidates:
            if v.name in present and v.requires <= caps:
                return LibChoice(v.name, libs / v.name, f"auto: the fastest variant this CPU runs ({v.description})")
        raise ConfigError(
            f"none of the installed llama.cpp variants ({', '.join(sorted(present)) or 'none'}) runs on this CPU "
            f"(features seen: {', '.join(sorted(caps)) or 'none'})"
        )
    variant = next((v for v in VARIANTS if v.name == requested), None)
    assert variant is not None  # requested is in CHOICES
    if variant.arch != arch:
        raise ConfigError(f"inference.cpu_variant = {requested!r} is for {variant.arch}, this machine is {arch}")
    if variant.name not in present:
        raise ConfigError(f"inference.cpu_variant = {requested!r} is not installed (have: {', '.join(sorted(present)) or 'none'})")
    missing = sorted(variant.requires - caps)
    if missing:
        raise ConfigError(
            f"inference.cpu_variant = {requested!r} needs CPU features this machine lacks ({', '.join(missing)}); "
            "it would die with 'illegal instruction'. Use auto or another board profile"
        )
    return LibChoice(variant.name, libs / variant.name, f"asked for ({variant.description})")


# --------------------------------------------------------------------------- reading the machine


def parse_x86_flags(cpuinfo: str) -> frozenset[str]:
    """The `flags` of the first processor in /proc/cpuinfo."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def arm64_hwcaps(hwcap: int) -> frozenset[str]:
    return frozenset(name for bit, name in _ARM64_HWCAP_BITS.items() if hwcap >> bit & 1)


def detect_hwcaps(arch: str) -> frozenset[str]:
    """CPU features of this machine, by their Linux names (blocking; never raises)."""
    if arch == "arm64":
        try:
            getauxval = ctypes.CDLL(None).getauxval
            getauxval.restype = ctypes.c_ulong
            getauxval.argtypes = [ctypes.c_ulong]
            return arm64_hwcaps(int(getauxval(_AT_HWCAP)))
        except (OSError, AttributeError):
            return frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return parse_x86_flags(fh.read(1 << 20))
    except OSError:
        return frozenset()


def libs_dir() -> Path | None:
    """Where the portable variants are: $MONGARSD_NATIVE_LIBS, else inside a frozen bundle."""
    if env := os.environ.get(ENV_LIBS_DIR):
        return Path(env).absolute()
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None:
        path = Path(bundle) / BUNDLE_LIBS
        if path.is_dir():
            return path
    return None


def available_variants(libs: Path | None) -> frozenset[str] | None:
    if libs is None:
        return None
    try:
        return frozenset(p.name for p in libs.iterdir() if (p / LIB_FILE).is_file())
    except OSError:
        return frozenset()


def choose(requested: str) -> LibChoice:
    """Read the machine and decide (blocking)."""
    arch = normalise_arch(platform.machine())
    libs = libs_dir()
    return select(arch=arch, hwcaps=detect_hwcaps(arch), requested=requested, available=available_variants(libs), libs=libs)


def activate(choice: LibChoice) -> None:
    """Point llama-cpp-python at the chosen build; must run before `import llama_cpp`."""
    if "llama_cpp.llama_cpp" in sys.modules:
        loaded = os.environ.get(ENV_LIB_PATH)
        wanted = str(choice.path) if choice.path is not None else None
        if loaded != wanted:
            raise RuntimeError(f"llama_cpp is already imported with {loaded or 'its own build'}; cannot switch to {choice.describe()}")
        return
    if choice.path is not None:
        os.environ[ENV_LIB_PATH] = str(choice.path)
