"""Energy sources on the recorded board trees, thermal hysteresis and per-request attribution."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mongarsd.board import BoardInfo, detect_board
from mongarsd.config import EnergyConfig
from mongarsd.errors import ConfigError, MongarsError
from mongarsd.maintenance import energy
from mongarsd.maintenance.energy import (
    CpuModelSource,
    EnergyMonitor,
    Ina3221Source,
    PmicSource,
    RaplSource,
    RequestLedger,
    full_load_watts,
    ina_total_watts,
    parse_pmic_adc,
    rapl_delta_uj,
    select_source,
)
from mongarsd.maintenance.thermal import (
    ThermalProbe,
    busy_fractions,
    freq_throttled,
    next_hot,
    parse_get_throttled,
    parse_proc_stat,
)
from mongarsd.metrics import Metrics

TREES = Path(__file__).resolve().parent.parent / "fixtures" / "boards"
RAPL = "sys/class/powercap"
NANO_INA = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
PMIC_TXT = "usr/lib/vcgencmd-fixture/pmic_read_adc.txt"


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def tree_copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(TREES / name, dst)
    return dst


def put(root: Path, rel: str, value: object) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


BOARDS = {tree.name: detect_board(tree) for tree in TREES.iterdir() if tree.is_dir()}


def board(name: str) -> BoardInfo:
    return BOARDS[name]


@pytest.fixture(autouse=True)
def _no_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "OPEN_SETTLE_S", 0.0)


# ----------------------------------------------------------------------------------- RAPL


@pytest.mark.parametrize(
    ("prev", "now", "max_range", "delta"),
    [
        (100, 250, 1000, 150),
        (900, 100, 1000, 200),  # wrapped once at the range
        (900, 100, None, 0),  # went back with no known range: a reset, not a wrap
        (1200, 100, 1000, 0),  # a previous value past the range is garbage
        (5, 5, 1000, 0),
    ],
)
def test_rapl_delta(prev: int, now: int, max_range: int | None, delta: int) -> None:
    assert rapl_delta_uj(prev, now, max_range) == delta


def test_rapl_counts_package_domains_only(tmp_path: Path) -> None:
    root = tree_copy("x86-i7", tmp_path)
    src = RaplSource(root)
    assert src.detail == "package-0"
    assert src.read_joules() == 0.0
    base = {name: int((root / RAPL / name / "energy_uj").read_text()) for name in ("intel-rapl:0", "intel-rapl:0:0", "intel-rapl:1")}
    put(root, f"{RAPL}/intel-rapl:0/energy_uj", base["intel-rapl:0"] + 2_500_000)
    put(root, f"{RAPL}/intel-rapl:0:0/energy_uj", base["intel-rapl:0:0"] + 1_900_000)  # core: inside the package
    put(root, f"{RAPL}/intel-rapl:1/energy_uj", base["intel-rapl:1"] + 9_000_000)  # psys: contains the package
    assert src.read_joules() == pytest.approx(2.5)


def test_rapl_wraps_at_max_energy_range(tmp_path: Path) -> None:
    root = tree_copy("x86-i7", tmp_path)
    max_uj = int((root / RAPL / "intel-rapl:0/max_energy_range_uj").read_text())
    put(root, f"{RAPL}/intel-rapl:0/energy_uj", max_uj - 1_000_000)
    src = RaplSource(root)
    put(root, f"{RAPL}/intel-rapl:0/energy_uj", 500_000)
    assert src.read_joules() == pytest.approx(1.5)
    put(root, f"{RAPL}/intel-rapl:0/energy_uj", 3_500_000)
    assert src.read_joules() == pytest.approx(4.5)


def test_rapl_sums_two_packages(tmp_path: Path) -> None:
    root = tree_copy("x86-i7", tmp_path)
    put(root, f"{RAPL}/intel-rapl:2/name", "package-1")
    put(root, f"{RAPL}/intel-rapl:2/energy_uj", 1_000_000)
    put(root, f"{RAPL}/intel-rapl:2/max_energy_range_uj", 262143328850)
    src = RaplSource(root)
    assert src.detail == "package-0+package-1"
    put(root, f"{RAPL}/intel-rapl:2/energy_uj", 3_000_000)
    assert src.read_joules() == pytest.approx(2.0)


def test_unreadable_rapl_falls_back_and_says_why(tmp_path: Path) -> None:
    root = tree_copy("x86-i7", tmp_path)
    (root / RAPL / "intel-rapl:0/energy_uj").unlink()  # what a non-root reader meets: no value
    src, skipped = select_source(root, board("x86-i7"), EnergyConfig())
    assert src.label == "cpu-model"
    assert "intel-rapl:0" in skipped["rapl"] and "root only" in skipped["rapl"]
    assert set(skipped) == {"rapl", "ina3221", "pmic"}


# ----------------------------------------------------------------------------------- INA3221


def test_ina3221_integrates_vdd_in_over_two_samples(tmp_path: Path) -> None:
    root = tree_copy("jetson-orin-nano", tmp_path)
    clock = FakeClock()
    src = Ina3221Source(root, clock)
    assert src.detail == "VDD_IN"
    rails = src.rail_watts()
    assert set(rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    p0 = 5064 * 1256 / 1e6
    assert src.watts() == pytest.approx(p0)  # VDD_IN only: the other rails are inside it
    put(root, f"{NANO_INA}/curr1_input", 1856)
    clock.t += 2.0
    p1 = 5064 * 1856 / 1e6
    assert src.read_joules() == pytest.approx((p0 + p1) / 2 * 2.0)
    clock.t += 1.0
    assert src.read_joules() == pytest.approx((p0 + p1) / 2 * 2.0 + p1 * 1.0)


def test_ina3221_rail_read_error_keeps_last_value(tmp_path: Path) -> None:
    root = tree_copy("jetson-orin-nano", tmp_path)
    clock = FakeClock()
    src = Ina3221Source(root, clock)
    p0 = src.watts()
    (root / NANO_INA / "curr1_input").unlink()
    clock.t += 4.0
    assert src.read_joules() == pytest.approx(p0 * 4.0)


def test_ina3221_agx_sums_labelled_rails_without_nc() -> None:
    src = Ina3221Source(TREES / "jetson-agx-orin", FakeClock())
    rails = src.rail_watts()
    assert set(rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    expected = (19144 * 364 + 19144 * 104 + 4984 * 728 + 19136 * 28) / 1e6
    assert src.watts() == pytest.approx(expected)
    assert "NC" not in src.detail and src.detail.count("+") == 3


def test_ina_total_prefers_vdd_in() -> None:
    assert ina_total_watts({"VDD_IN": 7.0, "VDD_SOC": 3.0}) == 7.0
    assert ina_total_watts({"A": 1.5, "B": 2.0}) == 3.5
    assert ina_total_watts({}) == 0.0


# ----------------------------------------------------------------------------------- Pi 5 PMIC


def test_parse_pmic_adc_pairs_current_and_voltage() -> None:
    text = (
        "  VDD_CORE_A current(7)=2.00000000A\n"
        "  VDD_CORE_V volt(15)=0.90000000V\n"
        "   3V3_SYS_A current(1)=0.10000000A\n"
        "   3V3_SYS_V volt(9)=3.30000000V\n"
        "     EXT5V_V volt(24)=5.10000000V\n"  # input voltage: no current, no power
        "error=1 error_msg=junk\n"
        "   BAD_A current(3)=nanA\n"
        "   BAD_V volt(4)=1.0V\n"
    )
    assert parse_pmic_adc(text) == pytest.approx({"VDD_CORE": 1.8, "3V3_SYS": 0.33})
    assert parse_pmic_adc("") == {}


def test_pmic_reads_vcgencmd_and_integrates(tmp_path: Path) -> None:
    root = tree_copy("pi5", tmp_path)
    clock = FakeClock()
    src = PmicSource(root, clock)
    text = (root / PMIC_TXT).read_text()
    p0 = sum(parse_pmic_adc(text).values())
    assert src.detail == "12 rails"
    assert 2.0 < p0 < 5.0  # an idle Pi 5's rails
    (root / PMIC_TXT).write_text(text.replace("VDD_CORE_A current(7)=1.21500000A", "VDD_CORE_A current(7)=4.21500000A"))
    p1 = p0 + 3.0 * 0.864
    clock.t += 2.0
    assert src.read_joules() == pytest.approx((p0 + p1) / 2 * 2.0)


def test_pmic_without_vcgencmd_says_so(tmp_path: Path) -> None:
    root = tree_copy("pi5", tmp_path)
    (root / "usr/bin/vcgencmd").unlink()
    src, skipped = select_source(root, board("pi5"), EnergyConfig())
    assert src.label == "cpu-model"
    assert "no PMIC file in sysfs" in skipped["pmic"]


def test_pmic_failing_vcgencmd_falls_back(tmp_path: Path) -> None:
    root = tree_copy("pi5", tmp_path)
    script = root / "usr/bin/vcgencmd"
    script.write_text("#!/bin/sh\necho 'error=2 error_msg=\"Command not registered\"'\nexit 2\n")
    src, skipped = select_source(root, board("pi5"), EnergyConfig())
    assert src.label == "cpu-model"
    assert "gave no rails" in skipped["pmic"]


# ----------------------------------------------------------------------------------- choice and model


@pytest.mark.parametrize(
    ("tree", "label"),
    [
        ("x86-i7", "rapl"),
        ("jetson-orin-nano", "ina3221"),
        ("jetson-agx-orin", "ina3221"),
        ("pi5", "pmic"),
        ("pi4", "cpu-model"),
        ("rk3588", "cpu-model"),
        ("vm-nofreq", "cpu-model"),
    ],
)
def test_source_chosen_per_board(tree: str, label: str) -> None:
    src, skipped = select_source(TREES / tree, board(tree), EnergyConfig())
    assert src.label == label
    assert label not in skipped


@pytest.mark.parametrize(("tree", "watts"), [("pi4", 6.4), ("pi5", 8.0), ("jetson-orin-nano", 15.0), ("x86-i7", 45.0), ("rk3588", 15.0)])
def test_full_load_watts_per_board(tree: str, watts: float) -> None:
    assert full_load_watts(EnergyConfig(), board(tree)) == watts
    assert full_load_watts(EnergyConfig(cpu_watts=9.5), board(tree)) == 9.5


def test_cpu_model_is_cpu_seconds_times_watts_per_cpu() -> None:
    info = board("vm-nofreq")
    cpu = [10.0]
    src = CpuModelSource(full_load_watts(EnergyConfig(), info), info.cores_logical, cpu_seconds=lambda: cpu[0])
    assert src.read_joules() == 0.0
    cpu[0] += 2.0  # two CPU seconds on a 4-vCPU generic machine at 15 W full load
    assert src.read_joules() == pytest.approx(2.0 * 15.0 / 4)
    assert "idle not modelled" in src.detail


async def test_monitor_on_vm_nofreq_uses_the_cpu_model() -> None:
    mon = EnergyMonitor(config=EnergyConfig(), board=board("vm-nofreq"), root=TREES / "vm-nofreq")
    with capture_logs() as logs:
        await mon.async_start()
    assert mon.source == "cpu-model"
    selected = [e for e in logs if e["event"] == "energy_source_selected"]
    assert selected and selected[0]["source"] == "cpu-model" and set(selected[0]["skipped"]) == {"rapl", "ina3221", "pmic"}
    st = mon.status()
    assert st["temperature_c"] is None and st["throttle_signal"] == "none" and st["hot"] is False
    await mon.async_stop()


# ----------------------------------------------------------------------------------- thermal


@pytest.mark.parametrize(
    ("tree", "celsius", "signal"),
    [
        ("x86-i7", 46.0, "x86-counters"),
        ("jetson-orin-nano", 48.75, "cpufreq"),  # the -256 °C cv zones are ignored
        ("jetson-agx-orin", 44.281, "cpufreq"),
        ("pi4", 48.686, "pi-firmware"),
        ("pi5", 52.3, "pi-firmware"),
        ("rk3588", 42.461, "none"),
        ("vm-nofreq", None, "none"),
    ],
)
def test_thermal_per_board(tree: str, celsius: float | None, signal: str) -> None:
    reading = ThermalProbe(TREES / tree).read()
    assert reading.celsius == (None if celsius is None else pytest.approx(celsius))
    assert reading.throttle_signal == signal
    assert reading.throttled is False


@pytest.mark.parametrize(
    ("hot", "celsius", "throttled", "after"),
    [
        (False, 79.9, False, False),
        (False, 80.0, False, True),
        (False, 50.0, True, True),
        (False, None, False, False),
        (True, 75.0, False, True),  # between the thresholds: stays hot
        (True, 70.0, False, False),
        (True, 60.0, True, True),  # cool but throttled: stays hot
        (True, None, False, True),  # unknown: no change
    ],
)
def test_hysteresis(hot: bool, celsius: float | None, throttled: bool, after: bool) -> None:
    assert next_hot(hot, celsius, throttled, hot_c=80.0, cool_c=70.0) is after


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0", (False, False)),
        ("50005", (True, True)),
        ("50000", (False, False)),
        ("8", (True, False)),
        ("1", (False, True)),
        ("zz", None),
        ("", None),
    ],
)
def test_parse_get_throttled(text: str, parsed: tuple[bool, bool] | None) -> None:
    assert parse_get_throttled(text) == parsed


def test_x86_throttle_counters_increasing(tmp_path: Path) -> None:
    root = tree_copy("x86-i7", tmp_path)
    probe = ThermalProbe(root)
    probe.open()
    assert probe.read().throttled is False
    counter = root / "sys/devices/system/cpu/cpu4/thermal_throttle/core_throttle_count"
    put(root, "sys/devices/system/cpu/cpu4/thermal_throttle/core_throttle_count", int(counter.read_text()) + 5)
    assert probe.read().throttled is True
    assert probe.read().throttled is False  # no new events since the last look


def test_pi_firmware_word(tmp_path: Path) -> None:
    root = tree_copy("pi4", tmp_path)
    probe = ThermalProbe(root)
    put(root, "sys/devices/platform/soc/soc:firmware/get_throttled", "50005")
    reading = probe.read()
    assert reading.throttled and reading.undervoltage and reading.throttle_signal == "pi-firmware"
    put(root, "sys/devices/platform/soc/soc:firmware/get_throttled", "50000")  # only "since boot" bits
    assert probe.read().throttled is False


def _stat(busy: dict[int, tuple[int, int]]) -> str:
    lines = ["cpu  1 1 1 1 0 0 0 0 0 0"]
    lines += [f"cpu{cpu} {user} 0 0 {idle} 0 0 0 0 0 0" for cpu, (user, idle) in sorted(busy.items())]
    return "\n".join(lines) + "\nintr 1 2 3\n"


def test_proc_stat_and_busy_fractions() -> None:
    prev = parse_proc_stat(_stat({0: (100, 900), 1: (100, 900)}))
    now = parse_proc_stat(_stat({0: (1100, 900), 1: (200, 1800)}))
    busy = busy_fractions(prev, now)
    assert busy == pytest.approx({0: 1.0, 1: 0.1})
    assert parse_proc_stat("garbage\ncpuX 1 2 3\n") == {}


def test_freq_throttled_only_counts_busy_cpus() -> None:
    ceiling = {0: 2_000_000, 1: 2_000_000}
    assert freq_throttled({0: 0.95, 1: 0.1}, {0: 1_000_000, 1: 400_000}, ceiling) is True
    assert freq_throttled({0: 0.95, 1: 0.1}, {0: 1_900_000, 1: 400_000}, ceiling) is False
    assert freq_throttled({0: 0.2, 1: 0.1}, {0: 400_000, 1: 400_000}, ceiling) is False  # idle: governor's choice


def test_cpufreq_throttle_on_jetson(tmp_path: Path) -> None:
    root = tree_copy("jetson-orin-nano", tmp_path)
    cpus = range(6)
    for c in cpus:  # nvpmodel's power mode caps CPUs at 1.19 GHz: that ceiling is not throttling
        put(root, f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_max_freq", 1_190_400)
    put(root, "proc/stat", _stat(dict.fromkeys(cpus, (1000, 1000))))
    probe = ThermalProbe(root)
    probe.open()
    assert probe.signal == "cpufreq"
    for c in cpus:
        put(root, f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_cur_freq", 1_190_400)
    put(root, "proc/stat", _stat(dict.fromkeys(cpus, (2000, 1010))))  # all busy at the ceiling
    assert probe.read().throttled is False
    for c in cpus:
        put(root, f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_cur_freq", 729_600)
    put(root, "proc/stat", _stat(dict.fromkeys(cpus, (3000, 1020))))  # busy, clocked down
    assert probe.read().throttled is True
    put(root, "proc/stat", _stat(dict.fromkeys(cpus, (3010, 2020))))  # idle at a low clock
    assert probe.read().throttled is False


async def test_monitor_hot_and_cool_with_callback(tmp_path: Path) -> None:
    root = await asyncio.to_thread(tree_copy, "pi4", tmp_path)
    calls: list[bool] = []
    mon = EnergyMonitor(config=EnergyConfig(hot_c=80.0, cool_c=70.0), board=board("pi4"), root=root, on_hot=calls.append)
    await mon.async_start()
    zone = "sys/class/thermal/thermal_zone0/temp"

    async def at(millicelsius: int, word: str = "0") -> bool:
        await asyncio.to_thread(put, root, zone, millicelsius)
        await asyncio.to_thread(put, root, "sys/devices/platform/soc/soc:firmware/get_throttled", word)
        await mon.async_sample()
        return mon.hot

    with capture_logs() as logs:
        assert await at(79_000) is False
        assert await at(81_500) is True
        assert await at(75_000) is True  # between cool_c and hot_c
        assert await at(69_000) is False
        assert await at(55_000, "4") is True  # throttled by the firmware though cool
        assert await at(55_000) is False
    assert calls == [True, False, True, False]
    assert [e["event"] for e in logs if e["event"].startswith("thermal_")] == ["thermal_hot", "thermal_cool", "thermal_hot", "thermal_cool"]
    st = mon.status()
    assert st["temperature_c"] == 55.0 and st["throttled"] is False and st["hot"] is False


def test_cool_must_be_below_hot() -> None:
    with pytest.raises(ConfigError, match=r"energy\.cool_c"):
        EnergyMonitor(config=EnergyConfig(hot_c=70.0, cool_c=70.0), board=board("pi4"))


# ----------------------------------------------------------------------------------- per request


def test_ledger_splits_overlapping_requests() -> None:
    ledger = RequestLedger(0.0)
    a = ledger.begin(0.0)
    b = ledger.begin(1.0)
    ledger.settle(2.0, 10.0, 2.0)  # 5 W: A alone for 1 s, then A and B share 1 s
    assert ledger.end(b, 2.0, 5.0) == pytest.approx(2.5)
    assert ledger.end(a, 2.0, 5.0) == pytest.approx(7.5)
    with pytest.raises(MongarsError, match="already ended"):
        ledger.end(a, 3.0, 5.0)


def test_ledger_estimates_an_unsampled_tail_with_the_last_power() -> None:
    ledger = RequestLedger(0.0)
    a = ledger.begin(0.0)
    b = ledger.begin(0.0)
    assert ledger.end(b, 1.0, 4.0) == pytest.approx(2.0)  # 1 s shared by two at 4 W
    ledger.settle(2.0, 8.0, 2.0)
    assert ledger.end(a, 2.0, 4.0) == pytest.approx(2.0 + 4.0)  # its half, then 1 s alone


def test_ledger_evicts_leaked_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "MAX_OPEN_MARKS", 2)
    ledger = RequestLedger(0.0)
    first = ledger.begin(0.0)
    ledger.begin(0.0)
    ledger.begin(0.0)
    assert ledger.open_count == 2 and ledger.evicted == 1
    with pytest.raises(MongarsError):
        ledger.end(first, 1.0, 1.0)


class ScriptedSource:
    """A meter counting a constant power against the fake clock."""

    label = "rapl"
    detail = "scripted"

    def __init__(self, clock: Callable[[], float], watts: float) -> None:
        self.clock = clock
        self.watts = watts
        self.t0 = clock()

    def read_joules(self) -> float:
        return (self.clock() - self.t0) * self.watts


async def test_monitor_attributes_overlapping_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(0.0)
    monkeypatch.setattr(energy, "select_source", lambda root, board, config, clock: (ScriptedSource(clock, 5.0), {}))
    mon = EnergyMonitor(config=EnergyConfig(), board=board("x86-i7"), root=TREES / "vm-nofreq", clock=clock)
    await mon.async_start()
    a = mon.begin()
    clock.t = 1.0
    b = mon.begin()
    clock.t = 2.0
    await mon.async_sample()
    clock.t = 3.0
    rb = await mon.async_end(b, tokens=10)
    clock.t = 4.0
    ra = await mon.async_end(a, tokens=0)
    # 5 W for 4 s: A alone 1 s (5 J), shared 2 s (5 J each), alone again 1 s (5 J)
    assert rb == {"joules": pytest.approx(5.0), "joules_per_token": pytest.approx(0.5), "source": "rapl"}
    assert ra == {"joules": pytest.approx(15.0), "joules_per_token": None, "source": "rapl"}
    assert ra["joules"] + rb["joules"] == pytest.approx(await asyncio.to_thread(mon.joules_total))
    assert mon.status()["joules_per_token"] == pytest.approx(0.5)
    assert mon.power_w == pytest.approx(5.0)


async def test_metrics_are_labelled_with_the_source(tmp_path: Path) -> None:
    root = await asyncio.to_thread(tree_copy, "x86-i7", tmp_path)
    clock = FakeClock()
    mon = EnergyMonitor(config=EnergyConfig(), board=board("x86-i7"), root=root, clock=clock)
    await mon.async_start()
    mark = mon.begin()
    clock.t += 1.0
    energy_uj = root / RAPL / "intel-rapl:0/energy_uj"
    before = int(await asyncio.to_thread(energy_uj.read_text))
    await asyncio.to_thread(put, root, f"{RAPL}/intel-rapl:0/energy_uj", before + 3_000_000)
    out = await mon.async_end(mark, tokens=30)
    assert out["source"] == "rapl" and out["joules"] == pytest.approx(3.0) and out["joules_per_token"] == pytest.approx(0.1)
    samples = {name: (kind, value, labels) for name, kind, _, value, labels in mon.metrics()}
    kind, value, labels = samples["mongarsd_energy_joules_total"]
    assert (kind, labels) == ("counter", {"source": "rapl"}) and value == pytest.approx(3.0)
    kind, value, labels = samples["mongarsd_energy_joules_per_token"]
    assert (kind, labels) == ("gauge", {"source": "rapl"}) and value == pytest.approx(0.1)
    assert samples["mongarsd_thermal_celsius"][1] == 46.0
    assert samples["mongarsd_thermal_throttled"][1] == 0.0 and samples["mongarsd_thermal_hot"][1] == 0.0
    metrics = Metrics()
    metrics.add_source(mon.metrics)
    text = (await asyncio.to_thread(metrics.render)).decode()
    assert 'mongarsd_energy_joules_total{source="rapl"} 3.0' in text
    assert 'mongarsd_energy_joules_per_token{source="rapl"} 0.1' in text
    st = mon.status()
    assert st["source"] == "rapl" and st["source_detail"] == "package-0" and st["joules_total"] == pytest.approx(3.0)


def test_joules_total_opens_and_reads_now(tmp_path: Path) -> None:
    root = tree_copy("jetson-orin-nano", tmp_path)
    clock = FakeClock()
    mon = EnergyMonitor(config=EnergyConfig(), board=board("jetson-orin-nano"), root=root, clock=clock)
    assert mon.joules_total() == 0.0
    assert mon.source == "ina3221"
    clock.t += 10.0
    assert mon.joules_total() == pytest.approx(5064 * 1256 / 1e6 * 10.0)
