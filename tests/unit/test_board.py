"""Board detection against recorded procfs/sysfs trees, and the pure decisions behind it."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from mongarsd import board
from mongarsd.board import (
    BoardInfo,
    classify_x86,
    count_physical_from_cpuinfo,
    detect_board,
    parse_cpu_list,
    parse_meminfo_mb,
    recommended_embed_threads,
    recommended_threads,
    split_big_little,
)
from mongarsd.inference.kv_cache import KV_CACHE_TYPES

TREES = Path(__file__).resolve().parent.parent / "fixtures" / "boards"
PROFILES_DIR = Path(__file__).resolve().parents[2] / "configs" / "boards"

# tree -> (profile, model, arch, logical, physical, big, little, ram_mb, accelerators, threads, embed)
EXPECTED = {
    "pi4": ("pi4", "Raspberry Pi 4 Model B Rev 1.4", "aarch64", 4, 4, (), (), 3793, (), 4, 1),
    "pi5": ("pi5", "Raspberry Pi 5 Model B Rev 1.0", "aarch64", 4, 4, (), (), 8052, (), 4, 1),
    "jetson-orin-nano": (
        "jetson-orin-nano",
        "NVIDIA Jetson Orin Nano Developer Kit",
        "aarch64",
        6,
        6,
        (),
        (),
        7441,
        ("tegra-gpu", "cuda"),
        6,
        2,
    ),
    "jetson-agx-orin": (
        "jetson-agx-orin",
        "NVIDIA Jetson AGX Orin Developer Kit",
        "aarch64",
        12,
        12,
        (),
        (),
        62827,
        ("tegra-gpu", "cuda"),
        12,
        2,
    ),
    "x86-i7": (
        "x86-i7",
        "Dell Inc. OptiPlex 7060 / Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz",
        "x86_64",
        12,
        6,
        (),
        (),
        32032,
        (),
        6,
        2,
    ),
    "rk3588": (
        "generic",
        "Radxa ROCK 5B",
        "aarch64",
        8,
        8,
        (4, 5, 6, 7),
        (0, 1, 2, 3),
        15733,
        (),
        4,
        2,
    ),
    "vm-nofreq": (
        "generic",
        "QEMU Standard PC (Q35 + ICH9, 2009) / Intel Xeon Processor (Cascadelake)",
        "x86_64",
        4,
        4,
        (),
        (),
        3933,
        (),
        4,
        1,
    ),
}


@pytest.mark.parametrize("tree", sorted(EXPECTED))
def test_detect_recorded_tree(tree: str) -> None:
    profile, model, arch, logical, physical, big, little, ram, accel, threads, embed = EXPECTED[tree]
    info = detect_board(TREES / tree)
    assert info.profile == profile
    assert info.model == model
    assert info.arch == arch
    assert info.cores_logical == logical
    assert info.cores_physical == physical
    assert info.big_cores == big
    assert info.little_cores == little
    assert info.ram_mb == ram
    assert info.accelerators == accel
    assert recommended_threads(info) == threads
    assert recommended_embed_threads(info) == embed


def test_every_profile_has_a_tree_and_a_file() -> None:
    detected = {detect_board(TREES / t).profile for t in EXPECTED}
    assert detected == set(board.PROFILES)
    for name in board.PROFILES:
        assert (PROFILES_DIR / f"{name}.toml").is_file()


def test_empty_tree_falls_back(tmp_path: Path) -> None:
    info = detect_board(tmp_path)
    assert info == BoardInfo(
        profile="generic",
        model="unknown machine",
        arch="unknown",
        cores_logical=1,
        cores_physical=1,
    )
    assert recommended_threads(info) == 1
    assert recommended_embed_threads(info) == 1


GARBAGE = [b"", b"\xff\xfe\x00garbage\x00", b"-1\n", b"0-\n", b"abc-def,,", b"\0\0\0", b"9999999-1\n"]


@pytest.mark.parametrize("junk", GARBAGE)
def test_garbled_files_never_raise(tmp_path: Path, junk: bytes) -> None:
    for rel in (
        "proc/cpuinfo",
        "proc/meminfo",
        "proc/device-tree/model",
        "proc/device-tree/compatible",
        "sys/class/dmi/id/sys_vendor",
        "sys/class/dmi/id/product_name",
        "sys/devices/system/cpu/online",
        "sys/devices/system/cpu/present",
        "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
        "sys/devices/system/cpu/cpu0/topology/core_id",
        "sys/devices/system/cpu/cpu0/topology/thread_siblings_list",
        "sys/devices/cpu_core/cpus",
    ):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(junk)
    info = detect_board(tmp_path)
    assert info.profile in board.PROFILES
    assert info.cores_logical >= 1
    assert 1 <= info.cores_physical <= info.cores_logical
    assert info.ram_mb >= 0
    assert recommended_threads(info) >= 1


def test_directory_in_place_of_a_file_is_tolerated(tmp_path: Path) -> None:
    (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").mkdir(parents=True)
    info = detect_board(tmp_path)
    assert info.cores_logical == 1
    assert info.ram_mb == 0


def test_pi_tree_still_pi_when_compatible_missing(tmp_path: Path) -> None:
    model = tmp_path / "proc" / "device-tree" / "model"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"Raspberry Pi Compute Module 4 Rev 1.1\0")
    assert detect_board(tmp_path).profile == "pi4"
    model.write_bytes(b"Raspberry Pi 500 Rev 1.0\0")
    assert detect_board(tmp_path).profile == "pi5"


def test_jetson_without_device_tree_uses_tegra_release_and_ram(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R35 (release), REVISION: 4.1\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:       32000000 kB\n")
    info = detect_board(tmp_path)
    assert info.profile == "jetson-agx-orin"
    assert "tegra-gpu" in info.accelerators
    assert "cuda" not in info.accelerators  # no libcuda in this tree


def test_orin_nano_super_compatible(tmp_path: Path) -> None:
    compat = tmp_path / "proc" / "device-tree" / "compatible"
    compat.parent.mkdir(parents=True)
    compat.write_bytes(b"nvidia,p3768-0000+p3767-0005-super\0nvidia,p3767-0005\0nvidia,tegra234\0")
    assert detect_board(tmp_path).profile == "jetson-orin-nano"


def test_discrete_nvidia_device_means_cuda(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidiactl").write_bytes(b"")
    assert detect_board(tmp_path).accelerators == ("cuda",)


def test_intel_hybrid_uses_p_cores(tmp_path: Path) -> None:
    # i7-12700H-like: 6 P-cores with SMT (cpu0-11) and 8 E-cores (cpu12-19).
    cpu = tmp_path / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text("0-19\n")
    for c in range(20):
        sib = f"{c - c % 2},{c - c % 2 + 1}" if c < 12 else str(c)
        topo = cpu / f"cpu{c}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(sib + "\n")
    for pmu, cpus in (("cpu_core", "0-11"), ("cpu_atom", "12-19")):
        (tmp_path / "sys" / "devices" / pmu).mkdir(parents=True)
        (tmp_path / "sys" / "devices" / pmu / "cpus").write_text(cpus + "\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: 12th Gen Intel(R) Core(TM) i7-12700H\nflags\t\t: fpu lm avx2\n"
    )
    info = detect_board(tmp_path)
    assert info.profile == "x86-i7"
    assert info.cores_physical == 14
    assert info.big_cores == tuple(range(12))
    assert info.little_cores == tuple(range(12, 20))
    assert recommended_threads(info) == 6  # P-cores, not their hyperthreads


# ----------------------------------------------------------------- pure functions


def test_split_big_little_two_clusters() -> None:
    freqs = {0: 1800000, 1: 1800000, 2: 2400000, 3: 2400000}
    assert split_big_little(freqs) == ((2, 3), (0, 1))


def test_split_big_little_three_tiers_count_prime_as_big() -> None:
    # Snapdragon-like: 4 little, 3 big, 1 prime.
    freqs = {i: 1800000 for i in range(4)} | {4: 2420000, 5: 2420000, 6: 2420000, 7: 2840000}
    assert split_big_little(freqs) == ((4, 5, 6, 7), (0, 1, 2, 3))


def test_split_big_little_ignores_binning_noise() -> None:
    # RK3588 boards where one A76 pair is binned at 2.352 GHz: still homogeneous bigs.
    assert split_big_little({0: 2352000, 1: 2352000, 2: 2400000, 3: 2400000}) == ((), ())


@pytest.mark.parametrize(
    "freqs",
    [{}, {0: 1800000}, {0: 1800000, 1: 1800000}, {0: 0, 1: 2400000}, {0: 1000000, 1: 0, 2: 2000000}],
)
def test_split_big_little_needs_every_cpu_and_two_clusters(freqs: dict[int, int]) -> None:
    assert split_big_little(freqs) == ((), ())


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3\n", (0, 1, 2, 3)), ("0,2-3", (0, 2, 3)), ("5", (5,)), ("", ()), ("3-1", ()), ("x", ()), ("0-99999", ())],
)
def test_parse_cpu_list(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    ("text", "mb"),
    [("MemTotal:        3884360 kB\n", 3793), ("MemTotal: x kB", 0), ("", 0), ("MemFree: 5 kB", 0)],
)
def test_parse_meminfo(text: str, mb: int) -> None:
    assert parse_meminfo_mb(text) == mb


def test_physical_from_cpu_cores_when_core_ids_missing() -> None:
    blocks = [{"processor": str(i), "physical id": "0", "cpu cores": "4"} for i in range(8)]
    assert count_physical_from_cpuinfo(blocks) == 4
    assert count_physical_from_cpuinfo([{"processor": "0"}]) == 0


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "x86-i7"),
        ("Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz", "x86-i7"),
        ("13th Gen Intel(R) Core(TM) i9-13900K", "x86-i7"),
        ("Intel(R) Core(TM) Ultra 7 155H", "x86-i7"),
        ("AMD Ryzen 7 5800X 8-Core Processor", "x86-i7"),
        ("Intel(R) Core(TM) i3-8100 CPU @ 3.60GHz", "generic"),
        ("Intel(R) Celeron(R) N4020 CPU @ 1.10GHz", "generic"),
        ("Intel Xeon Processor (Cascadelake)", "generic"),
        ("", "generic"),
    ],
)
def test_classify_x86(name: str, profile: str) -> None:
    assert classify_x86(name) == profile


def test_recommended_threads_prefers_big_cores() -> None:
    info = BoardInfo(
        profile="generic",
        model="m",
        arch="aarch64",
        cores_logical=8,
        cores_physical=8,
        big_cores=(4, 5, 6, 7),
        little_cores=(0, 1, 2, 3),
    )
    assert recommended_threads(info) == 4
    homogeneous = dataclasses.replace(info, big_cores=(), little_cores=())
    assert recommended_threads(homogeneous) == 8


def test_board_info_is_frozen() -> None:
    info = detect_board(TREES / "pi4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.profile = "pi5"  # type: ignore[misc]


def test_live_detection_does_not_raise() -> None:
    info = detect_board()
    assert info.cores_logical >= 1
    assert info.arch


# ----------------------------------------------------------------- profiles


def _profile(name: str) -> dict[str, dict[str, object]]:
    with (PROFILES_DIR / f"{name}.toml").open("rb") as fh:
        return tomllib.load(fh)


@pytest.mark.parametrize("name", board.PROFILES)
def test_profile_loads_through_config(name: str, tmp_path: Path) -> None:
    config = pytest.importorskip("mongarsd.config")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    loaded = config.load_config(profile=name, config_path=empty, env={}, profiles=PROFILES_DIR)
    raw = _profile(name)
    assert set(raw) <= {"inference", "embed", "server"}
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(loaded.config, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"
            assert loaded.sources[f"{section}.{key}"] == f"board:{name}"


@pytest.mark.parametrize("name", board.PROFILES)
def test_profile_values_are_sane(name: str) -> None:
    inf = _profile(name)["inference"]
    assert inf["threads"] == 0  # auto: recommended_threads() of the detected board
    assert inf["n_ubatch"] <= inf["n_batch"] <= inf["n_ctx"]
    assert inf["slots"] <= inf["queue_depth"]
    # llama.cpp needs flash attention for a quantized V cache.
    if KV_CACHE_TYPES[inf.get("kv_cache_type", "f16")].quantized:
        assert inf.get("flash_attn") is True
    gpu = name.startswith("jetson")
    assert (inf.get("gpu_layers", 0) != 0) == gpu
    providers = _profile(name)["embed"].get("providers", ["CPUExecutionProvider"])
    assert providers[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers) == gpu
