"""Choosing the llama.cpp build: pure decisions from an architecture, CPU features and folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from mongarsd.config import load_config
from mongarsd.errors import ConfigError
from mongarsd.inference import libvariant
from mongarsd.inference.libvariant import AUTO, NATIVE, select

LIBS = Path("/opt/libs")
X86_ALL = {"x86-64-v4-vnni", "x86-64-v4", "x86-64-v3", "x86-64-v2"}
ARM_ALL = {"armv8.2-a+dotprod", "armv8-a"}
HASWELL = {"sse4_2", "ssse3", "popcnt", "avx", "avx2", "fma", "f16c", "bmi2"}
NEHALEM = {"sse4_2", "ssse3", "popcnt"}
AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # x86-64-v4
A76 = {"fp", "asimd", "fphp", "asimdhp", "asimddp"}
A72 = {"fp", "asimd"}


@pytest.mark.parametrize(
    ("arch", "caps", "want"),
    [
        ("x86_64", HASWELL, "x86-64-v3"),
        ("x86_64", NEHALEM | {"avx"}, "x86-64-v2"),  # AVX without AVX2 (Sandy Bridge): the baseline
        ("x86_64", HASWELL | AVX512, "x86-64-v4"),  # Skylake-SP
        ("x86_64", HASWELL | AVX512 | {"avx512_vnni"}, "x86-64-v4-vnni"),  # Cascade Lake, Ice Lake, Zen 4
        ("x86_64", HASWELL | {"avx_vnni", "avx512_vnni"}, "x86-64-v3"),  # VNNI flags without AVX-512 F..VL
        ("x86_64", HASWELL | {"avx512f", "avx512cd"}, "x86-64-v3"),  # Knights Landing: F and CD without BW/DQ/VL
        ("arm64", A76, "armv8.2-a+dotprod"),
        ("arm64", A72, "armv8-a"),
        ("arm64", A72 | {"asimddp"}, "armv8-a"),  # dotprod without fp16 arithmetic: baseline
    ],
)
def test_auto_takes_the_fastest_variant_the_cpu_runs(arch: str, caps: set[str], want: str) -> None:
    choice = select(arch=arch, hwcaps=caps, requested=AUTO, available=X86_ALL | ARM_ALL, libs=LIBS)
    assert choice.variant == want
    assert choice.path == LIBS / want


def test_auto_skips_a_variant_that_is_not_installed() -> None:
    choice = select(arch="x86_64", hwcaps=HASWELL, requested=AUTO, available={"x86-64-v2"}, libs=LIBS)
    assert choice.variant == "x86-64-v2"


def test_a_variant_the_cpu_cannot_run_is_refused_naming_the_missing_features() -> None:
    with pytest.raises(ConfigError, match=r"asimddp.*illegal instruction"):
        select(arch="arm64", hwcaps=A72, requested="armv8.2-a+dotprod", available=ARM_ALL, libs=LIBS)
    with pytest.raises(ConfigError, match="avx2"):
        select(arch="x86_64", hwcaps=NEHALEM, requested="x86-64-v3", available=X86_ALL, libs=LIBS)
    with pytest.raises(ConfigError, match=r"avx512bw, avx512dq, avx512vl\)"):
        select(arch="x86_64", hwcaps=HASWELL | {"avx512f", "avx512cd"}, requested="x86-64-v4", available=X86_ALL, libs=LIBS)


def test_a_variant_of_another_architecture_or_absent_is_refused() -> None:
    with pytest.raises(ConfigError, match="is for arm64"):
        select(arch="x86_64", hwcaps=HASWELL, requested="armv8-a", available=X86_ALL, libs=LIBS)
    with pytest.raises(ConfigError, match="not installed"):
        select(arch="x86_64", hwcaps=HASWELL, requested="x86-64-v3", available={"x86-64-v2"}, libs=LIBS)
    with pytest.raises(ConfigError, match="runs on this CPU"):
        select(arch="x86_64", hwcaps=set(), requested=AUTO, available=X86_ALL, libs=LIBS)
    with pytest.raises(ConfigError, match="unknown value"):
        select(arch="x86_64", hwcaps=HASWELL, requested="x86-64-v5", available=X86_ALL, libs=LIBS)


def test_a_developer_venv_without_portable_libraries_loads_its_native_build() -> None:
    for requested in (AUTO, NATIVE, "armv8.2-a+dotprod"):  # a pi5 profile on a developer's Pi 5
        choice = select(arch="arm64", hwcaps=A76, requested=requested, available=None)
        assert choice.variant == NATIVE and choice.path is None
    chosen = select(arch="x86_64", hwcaps=HASWELL, requested=NATIVE, available=X86_ALL, libs=LIBS)
    assert chosen.path is None


def test_cpu_features_are_read_from_cpuinfo_flags_and_arm_hwcap_bits() -> None:
    text = "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: other\n"
    assert libvariant.parse_x86_flags(text) == {"fpu", "sse4_2", "avx2", "fma"}
    assert libvariant.parse_x86_flags("garbage") == frozenset()
    assert libvariant.arm64_hwcaps((1 << 0) | (1 << 1) | (1 << 20)) == {"fp", "asimd", "asimddp"}
    assert libvariant.normalise_arch("aarch64") == "arm64" and libvariant.normalise_arch("AMD64") == "x86_64"


def test_libraries_are_found_by_the_file_each_variant_folder_must_hold(tmp_path: Path) -> None:
    (tmp_path / "x86-64-v3").mkdir()
    (tmp_path / "x86-64-v3" / "libllama.so").write_bytes(b"\x7fELF")
    (tmp_path / "x86-64-v2").mkdir()  # empty: not a usable variant
    assert libvariant.available_variants(tmp_path) == {"x86-64-v3"}
    assert libvariant.available_variants(None) is None


@pytest.mark.parametrize(
    ("profile", "want"),
    [("pi4", "armv8-a"), ("pi5", "armv8.2-a+dotprod"), ("jetson-orin-nano", "armv8.2-a+dotprod"), ("x86-i7", "auto"), ("generic", "auto")],
)
def test_board_profiles_pick_their_variant(profile: str, want: str) -> None:
    loaded = load_config(profile=profile, env={})
    assert loaded.config.inference.cpu_variant == want


def test_an_unknown_variant_in_the_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cpu_variant"):
        load_config(profile="generic", env={"MONGARSD_INFERENCE__CPU_VARIANT": "avx512"})
