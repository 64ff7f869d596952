"""Energy and heat: joules per request and per token, labelled with where the figure comes from.

Sources, best first (the first one readable at start is used, and logged):

- ``rapl``: x86 RAPL counters, ``/sys/class/powercap/intel-rapl:N/energy_uj``, package domains
  only (their ``intel-rapl:N:M`` subdomains, core/uncore/dram, are parts of the package and
  ``psys`` contains it: adding them would count joules twice); each counter wraps at its
  ``max_energy_range_uj``. Kernels since 5.10 make ``energy_uj`` readable by root only: without a
  udev or tmpfiles rule granting the daemon's group read access, the next source is used.
- ``ina3221``: the INA3221 power monitors of Jetson boards (hwmon under
  ``/sys/bus/i2c/drivers/ina3221*/``): rail voltage (mV) × current (mA), integrated over time
  with the trapezoid rule. ``VDD_IN`` is the module input when the board has it (Orin Nano/NX:
  the other rails are inside it); otherwise (AGX Orin) the labelled rails are summed, ``NC``
  (unconnected) channels left out.
- ``pmic``: the Raspberry Pi 5's PMIC. No kernel driver exposes its ADCs in sysfs (the Pi 5's
  hwmon devices are cpu_thermal, rp1_adc, pwmfan and rpi_volt, none a power meter), so it is read
  through ``vcgencmd pmic_read_adc`` (which needs /dev/vcio: the video group, and a unit that
  does not hide devices). The sum of V × A over the rails the PMIC generates leaves out its own
  conversion losses and the 5 V USB/peripheral supply: it reads lower than the wall.
- ``cpu-model``: no meter. The daemon's CPU time (its own and its reaped children's, psutil) ×
  the board's full-load watts / its logical CPUs. Idle power is not modelled (a second of CPU
  costs the same share of full-load power whatever else runs) and neither is a GPU.

Per-request rule: every source is machine-wide (the meters) or process-wide (the model), so at
each instant the measured power is shared equally among the requests open at that instant. The
energy of a sample interval goes to each request in proportion to its share-seconds in it
(∫ 1/n(t) dt); a request that ends between samples gets its unsettled share-seconds × the last
measured power (`async_end` samples first, which makes that tail exact). Meter figures are gross:
they include the board's idle draw while a request runs.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import psutil
import structlog

from mongarsd.board import (
    PROFILE_AGX_ORIN,
    PROFILE_GENERIC,
    PROFILE_ORIN_NANO,
    PROFILE_PI4,
    PROFILE_PI5,
    PROFILE_X86_I7,
    BoardInfo,
)
from mongarsd.config import EnergyConfig
from mongarsd.errors import ConfigError, MongarsError
from mongarsd.maintenance.thermal import MAX_READ_BYTES, ThermalProbe, ThermalReading, next_hot, read_int, read_text

log = structlog.get_logger("mongarsd.energy")

SOURCE_RAPL: Final = "rapl"
SOURCE_INA3221: Final = "ina3221"
SOURCE_PMIC: Final = "pmic"
SOURCE_CPU_MODEL: Final = "cpu-model"
SOURCES: Final = (SOURCE_RAPL, SOURCE_INA3221, SOURCE_PMIC, SOURCE_CPU_MODEL)

SAMPLE_INTERVAL_S: Final = 2.0  # how often the loop reads the meter and the thermal state
OPEN_SETTLE_S: Final = 0.2  # two readings this far apart at start give a first power figure
VCGENCMD_TIMEOUT_S: Final = 2.0
MAX_RAILS: Final = 64  # INA3221 channels considered (3 per chip; boards carry one or two chips)
MAX_RAPL_DOMAINS: Final = 64
MAX_OPEN_MARKS: Final = 1024  # requests tracked at once; more means callers leak marks
UJ_PER_J: Final = 1_000_000
MW_MA_PER_W: Final = 1_000_000  # mV × mA = µW
UW_PER_W: Final = 1_000_000
INA_TOTAL_RAIL: Final = "VDD_IN"
INA_UNCONNECTED: Final = "NC"

# Whole-board watts at full CPU load, for the CPU-time model (energy.cpu_watts overrides).
FULL_LOAD_WATTS: Final[Mapping[str, float]] = {
    PROFILE_PI4: 6.4,
    PROFILE_PI5: 8.0,
    PROFILE_ORIN_NANO: 15.0,
    PROFILE_AGX_ORIN: 40.0,
    PROFILE_X86_I7: 45.0,
    PROFILE_GENERIC: 15.0,
}

_RAPL_TOP_RE: Final = re.compile(r"intel-rapl:\d+")
# "  VDD_CORE_A current(7)=1.54489000A" / "  VDD_CORE_V volt(15)=0.88725180V"
_PMIC_LINE_RE: Final = re.compile(r"^\s*([A-Za-z0-9_]+?)_([AV])\s+\w+\(\d+\)=([-+0-9.eE]+)\s*[AV]\s*$")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # permission denied on a parent: treat as absent
        return False


# --------------------------------------------------------------------------- pure helpers


def rapl_delta_uj(prev: int, now: int, max_range_uj: int | None) -> int:
    """Return the µJ counted between two readings of a RAPL counter that wraps at max_range_uj (pure).

    A counter that went backwards without a known range (or past it) is taken as reset: 0.
    """
    if now >= prev:
        return now - prev
    if max_range_uj and max_range_uj >= prev:
        return max_range_uj - prev + now
    return 0


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Return {rail: watts} from `vcgencmd pmic_read_adc` output: rails with both a current and a voltage (pure)."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC_LINE_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        (amps if m.group(2) == "A" else volts)[m.group(1)] = value
    return {rail: max(0.0, amps[rail] * volts[rail]) for rail in sorted(amps.keys() & volts.keys())}


def ina_total_watts(rails: Mapping[str, float]) -> float:
    """Return the board's power from INA3221 rail powers: VDD_IN when present, else their sum (pure)."""
    if INA_TOTAL_RAIL in rails:
        return rails[INA_TOTAL_RAIL]
    return sum(w for name, w in rails.items() if name != INA_UNCONNECTED)


def full_load_watts(config: EnergyConfig, board: BoardInfo) -> float:
    """Return the full-load watts the CPU-time model uses: energy.cpu_watts, else the board's default."""
    if config.cpu_watts > 0:
        return config.cpu_watts
    return FULL_LOAD_WATTS.get(board.profile, FULL_LOAD_WATTS[PROFILE_GENERIC])


# --------------------------------------------------------------------------- sources


class EnergySource(Protocol):
    """A meter: joules counted since it was opened (blocking reads; callers serialise them)."""

    label: str
    detail: str

    def read_joules(self) -> float: ...


class _Unavailable(MongarsError):
    """A source cannot be used on this machine (the message says why)."""


@dataclass(slots=True)
class _RaplDomain:
    name: str
    energy: Path
    max_range_uj: int | None
    last_uj: int


class RaplSource:
    """Sum the package domains of the RAPL powercap counters, handling wraparound."""

    label = SOURCE_RAPL

    def __init__(self, root: Path) -> None:
        """Find the package domains and take their first readings (blocking: reads sysfs)."""
        base = root / "sys/class/powercap"
        domains: list[_RaplDomain] = []
        seen_unreadable: list[str] = []
        for zone in sorted(base.glob("intel-rapl:*"))[:MAX_RAPL_DOMAINS]:
            if not _RAPL_TOP_RE.fullmatch(zone.name):
                continue  # intel-rapl:0:0 and deeper are subdomains inside a package
            name = read_text(zone / "name") or ""
            if not name.startswith("package"):
                continue  # psys (platform) contains the packages; dram alone is not the CPU
            now = read_int(zone / "energy_uj")
            if now is None:
                seen_unreadable.append(zone.name)
                continue
            domains.append(_RaplDomain(name, zone / "energy_uj", read_int(zone / "max_energy_range_uj"), now))
        if not domains:
            why = (
                f"energy_uj not readable ({', '.join(seen_unreadable)}; root only by default)"
                if seen_unreadable
                else "no RAPL package domain"
            )
            raise _Unavailable(why)
        self._domains = domains
        self._uj = 0
        self.detail = "+".join(d.name for d in domains)

    def read_joules(self) -> float:
        """Return the joules counted since opening (blocking: reads sysfs)."""
        for d in self._domains:
            now = read_int(d.energy)
            if now is None:
                continue  # a transient read error: the next reading covers the interval
            self._uj += rapl_delta_uj(d.last_uj, now, d.max_range_uj)
            d.last_uj = now
        return self._uj / UJ_PER_J


class _Integrator:
    """Integrate a power reading over the clock with the trapezoid rule."""

    def __init__(self, clock: Callable[[], float], watts: float) -> None:
        self._clock = clock
        self._t = clock()
        self._w = watts
        self.joules = 0.0

    def add(self, watts: float) -> float:
        now = self._clock()
        dt = now - self._t
        if dt > 0:
            self.joules += (self._w + watts) / 2 * dt
        self._t = max(self._t, now)
        self._w = watts
        return self.joules


@dataclass(slots=True)
class _Rail:
    label: str
    volts: Path | None  # in*_input, mV
    amps: Path | None  # curr*_input, mA
    power: Path | None  # power*_input, µW (other INA chips)
    last_w: float = 0.0


class Ina3221Source:
    """Integrate the Jetson INA3221 rails (hwmon) over time."""

    label = SOURCE_INA3221

    def __init__(self, root: Path, clock: Callable[[], float]) -> None:
        """Find the labelled rails and take a first reading (blocking: reads sysfs)."""
        rails: list[_Rail] = []
        for hw in sorted(root.glob("sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*")):
            for label_file in sorted(hw.glob("in*_label")):
                idx = label_file.name[2:].removesuffix("_label")
                label = read_text(label_file)
                if not idx.isdigit() or not label or label == INA_UNCONNECTED:
                    continue
                volts, amps, power = hw / f"in{idx}_input", hw / f"curr{idx}_input", hw / f"power{idx}_input"
                rail = _Rail(label, volts, amps, power if _is_file(power) else None)
                if rail.power is None and (read_int(volts) is None or read_int(amps) is None):
                    continue
                rails.append(rail)
                if len(rails) >= MAX_RAILS:
                    break
        if not rails:
            raise _Unavailable("no readable INA3221 rail under /sys/bus/i2c/drivers/ina3221*")
        self._rails = rails
        labels = [r.label for r in rails]
        self.detail = INA_TOTAL_RAIL if INA_TOTAL_RAIL in labels else "+".join(labels)
        self._int = _Integrator(clock, self.watts())

    def rail_watts(self) -> dict[str, float]:
        """Return each rail's power now; a rail that fails to read keeps its last value (blocking)."""
        out: dict[str, float] = {}
        for r in self._rails:
            w: float | None = None
            if r.power is not None:
                uw = read_int(r.power)
                w = None if uw is None else uw / UW_PER_W
            elif r.volts is not None and r.amps is not None:
                mv, ma = read_int(r.volts), read_int(r.amps)
                w = None if mv is None or ma is None else mv * ma / MW_MA_PER_W
            if w is not None and w >= 0:
                r.last_w = w
            out[r.label] = out.get(r.label, 0.0) + r.last_w
        return out

    def watts(self) -> float:
        """Return the board's power now (blocking: reads sysfs)."""
        return ina_total_watts(self.rail_watts())

    def read_joules(self) -> float:
        """Return the joules integrated since opening (blocking: reads sysfs)."""
        return self._int.add(self.watts())


class PmicSource:
    """Integrate the Raspberry Pi 5 PMIC rails read through `vcgencmd pmic_read_adc`."""

    label = SOURCE_PMIC

    def __init__(self, root: Path, clock: Callable[[], float]) -> None:
        """Check that vcgencmd answers with rails and take a first reading (blocking: runs vcgencmd)."""
        self._cmd = root / "usr/bin/vcgencmd"
        if not _is_file(self._cmd):
            raise _Unavailable("no PMIC file in sysfs and no vcgencmd")
        rails = self._rails()
        if not rails:
            raise _Unavailable("no PMIC file in sysfs; vcgencmd pmic_read_adc gave no rails (not a Pi 5, or no access to /dev/vcio)")
        self.detail = f"{len(rails)} rails"
        self._last_w = sum(rails.values())
        self._int = _Integrator(clock, self._last_w)

    def _rails(self) -> dict[str, float]:
        try:
            done = subprocess.run(  # a fixed argv, no shell
                [str(self._cmd), "pmic_read_adc"],
                capture_output=True,
                timeout=VCGENCMD_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):  # not executable, timed out: no reading
            return {}
        if done.returncode != 0:
            return {}
        return parse_pmic_adc(done.stdout[:MAX_READ_BYTES].decode("utf-8", "replace"))

    def read_joules(self) -> float:
        """Return the joules integrated since opening (blocking: runs vcgencmd)."""
        rails = self._rails()
        if rails:
            self._last_w = sum(rails.values())
        return self._int.add(self._last_w)


def process_cpu_seconds() -> float:
    """Return this process's CPU time, its reaped children's included (blocking: psutil reads /proc)."""
    t = psutil.Process().cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


class CpuModelSource:
    """Model energy as CPU seconds × full-load watts / logical CPUs (no meter; idle not modelled)."""

    label = SOURCE_CPU_MODEL

    def __init__(self, watts_full_load: float, cpus: int, cpu_seconds: Callable[[], float] = process_cpu_seconds) -> None:
        """Take the CPU-time baseline (blocking: psutil reads /proc)."""
        self.watts_per_cpu = watts_full_load / max(1, cpus)
        self._cpu_seconds = cpu_seconds
        self._base = cpu_seconds()
        self.detail = f"{watts_full_load:g} W at full load over {max(1, cpus)} CPUs, idle not modelled"

    def read_joules(self) -> float:
        """Return the modelled joules since opening (blocking: psutil reads /proc)."""
        return max(0.0, self._cpu_seconds() - self._base) * self.watts_per_cpu


def select_source(
    root: Path, board: BoardInfo, config: EnergyConfig, clock: Callable[[], float] = time.monotonic
) -> tuple[EnergySource, dict[str, str]]:
    """Open the best readable source; return it and why each better one was skipped (blocking)."""
    skipped: dict[str, str] = {}
    openers: tuple[tuple[str, Callable[[], EnergySource]], ...] = (
        (SOURCE_RAPL, lambda: RaplSource(root)),
        (SOURCE_INA3221, lambda: Ina3221Source(root, clock)),
        (SOURCE_PMIC, lambda: PmicSource(root, clock)),
    )
    for label, opener in openers:
        try:
            return opener(), skipped
        except _Unavailable as err:
            skipped[label] = str(err)
    return CpuModelSource(full_load_watts(config, board), board.cores_logical), skipped


# --------------------------------------------------------------------------- per-request ledger


@dataclass(eq=False, slots=True)
class EnergyMark:
    """A request's handle from EnergyMonitor.begin(); end it exactly once."""

    id: int
    started: float


@dataclass(slots=True)
class _Share:
    joules: float = 0.0  # settled from sampled intervals
    weight_s: float = 0.0  # share-seconds since the last sample: ∫ 1/n(t) dt


class RequestLedger:
    """Split measured energy among overlapping requests (loop-only, no I/O; see the module docstring)."""

    def __init__(self, now: float) -> None:
        self._open: dict[int, _Share] = {}
        self._t = now
        self._ids = itertools.count(1)
        self.evicted = 0

    @property
    def open_count(self) -> int:
        return len(self._open)

    def _advance(self, now: float) -> None:
        dt = now - self._t
        if dt > 0 and self._open:
            w = dt / len(self._open)
            for share in self._open.values():
                share.weight_s += w
        self._t = max(self._t, now)

    def begin(self, now: float) -> int:
        self._advance(now)
        if len(self._open) >= MAX_OPEN_MARKS:
            oldest = next(iter(self._open))
            del self._open[oldest]
            self.evicted += 1
            log.warning("energy_mark_evicted", mark=oldest, open=len(self._open))
        rid = next(self._ids)
        self._open[rid] = _Share()
        return rid

    def end(self, rid: int, now: float, power_w: float) -> float:
        """Close a request: its settled joules plus its unsettled share-seconds × power_w."""
        self._advance(now)
        share = self._open.pop(rid, None)
        if share is None:
            raise MongarsError(f"energy mark {rid} is unknown or already ended")
        return share.joules + share.weight_s * power_w

    def settle(self, now: float, joules: float, interval_s: float) -> None:
        """Hand a sampled interval's joules to the open requests by their share-seconds in it."""
        self._advance(now)
        power = joules / interval_s if interval_s > 0 else 0.0
        for share in self._open.values():
            share.joules += power * share.weight_s
            share.weight_s = 0.0


# --------------------------------------------------------------------------- the monitor


class EnergyMonitor:
    """Measure joules (labelled by source) and heat; call on_hot when the board gets hot or cools."""

    name = "energy"
    start_timeout_s = 10.0  # finding the source may run vcgencmd once (2 s cap) and waits OPEN_SETTLE_S
    stop_timeout_s = 1.0  # nothing to drain: the sample loop belongs to the daemon's supervisor

    def __init__(
        self,
        *,
        config: EnergyConfig,
        board: BoardInfo,
        root: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
        on_hot: Callable[[bool], None] | None = None,
    ) -> None:
        if config.cool_c >= config.hot_c:
            raise ConfigError(f"energy.cool_c ({config.cool_c}) must be below energy.hot_c ({config.hot_c})")
        self.config = config
        self.board = board
        self.root = root
        self._clock = clock
        self._on_hot = on_hot
        self._thermal = ThermalProbe(root)
        self._read_lock = threading.Lock()  # one reader at a time keeps (t, joules) monotone
        self._source: EnergySource | None = None
        self.source = "none"
        self.source_detail = ""
        self.skipped: dict[str, str] = {}
        self._ledger = RequestLedger(clock())
        self._t_last: float | None = None
        self._joules = 0.0
        self._power_w: float | None = None
        self._reading: ThermalReading | None = None
        self._hot = False
        self._last_jpt: float | None = None
        self.samples_total = 0
        self.hot_changes_total = 0

    # ----------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Pick the source, take the baselines and a first power figure (blocking: reads sysfs, may run vcgencmd; thread)."""
        with self._read_lock:
            if self._source is not None:
                return
            source, self.skipped = select_source(self.root, self.board, self.config, self._clock)
            self._thermal.open()
            t0 = self._clock()
            j0 = source.read_joules()
            self._source = source
            self.source = source.label
            self.source_detail = source.detail
        time.sleep(OPEN_SETTLE_S)
        t1, j1, reading = self._read()
        dt = t1 - t0
        self._t_last, self._joules = t1, j1
        self._power_w = (j1 - j0) / dt if dt > 0 else None
        self._reading = reading

    async def async_start(self) -> None:
        await asyncio.to_thread(self.open)
        log.info(
            "energy_source_selected",
            source=self.source,
            detail=self.source_detail,
            skipped=self.skipped,
            throttle_signal=self._thermal.signal,
        )
        if self._reading is not None:
            self._update_hot(self._reading)

    async def async_stop(self) -> None:
        """Nothing to release: the sample loop is cancelled by its supervisor."""

    # ----------------------------------------------------------------- sampling

    def _read(self, *, thermal: bool = True) -> tuple[float, float, ThermalReading | None]:
        """Read the clock, the meter and (unless told not to) the thermal state together (blocking; thread)."""
        with self._read_lock:
            if self._source is None:
                raise MongarsError("energy monitor is not open")
            t = self._clock()
            joules = self._source.read_joules()
            reading = self._thermal.read() if thermal else None
        return t, joules, reading

    def joules_total(self) -> float:
        """Return the joules counted since start, reading the meter now (blocking: reads sysfs; thread)."""
        if self._source is None:
            self.open()
        return self._read()[1]

    async def async_sample(self, *, thermal: bool = True) -> None:
        """Read the meter (and the heat) in a thread, then account for them on the loop."""
        t, joules, reading = await asyncio.to_thread(self._read, thermal=thermal)
        self._apply(t, joules, reading)

    def _apply(self, t: float, joules: float, reading: ThermalReading | None) -> None:
        if self._t_last is not None and t <= self._t_last:
            return  # a newer sample was applied first; its total already covers this one
        if self._t_last is not None:
            interval = t - self._t_last
            delta = max(0.0, joules - self._joules)
            self._ledger.settle(t, delta, interval)
            self._power_w = delta / interval
        self._t_last, self._joules = t, max(self._joules, joules)
        self.samples_total += 1
        if reading is not None:
            self._reading = reading
            self._update_hot(reading)

    def _update_hot(self, reading: ThermalReading) -> None:
        hot = next_hot(self._hot, reading.celsius, reading.throttled, hot_c=self.config.hot_c, cool_c=self.config.cool_c)
        if hot == self._hot:
            return
        self._hot = hot
        self.hot_changes_total += 1
        event = "thermal_hot" if hot else "thermal_cool"
        log.warning(event, celsius=reading.celsius, throttled=reading.throttled, signal=reading.throttle_signal, hot_c=self.config.hot_c)
        if self._on_hot is not None:
            self._on_hot(hot)  # on the loop; must not block (Sommeil pause, inference thermal limit)

    async def async_sample_loop(self) -> None:
        """Sample the meter and the heat every SAMPLE_INTERVAL_S (run supervised)."""
        while True:
            await self.async_sample()
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    # ----------------------------------------------------------------- per request

    def begin(self) -> EnergyMark:
        """Start accounting a request (loop-only, no I/O)."""
        now = self._clock()
        return EnergyMark(self._ledger.begin(now), now)

    def end(self, mark: EnergyMark, tokens: int) -> dict[str, Any]:
        """Close a request: its joules, joules per token (None without tokens) and the source (loop-only, no I/O)."""
        joules = max(0.0, self._ledger.end(mark.id, self._clock(), self._power_w or 0.0))
        per_token = joules / tokens if tokens > 0 else None
        if per_token is not None:
            self._last_jpt = per_token
        return {
            "joules": round(joules, 4),
            "joules_per_token": None if per_token is None else round(per_token, 6),
            "source": self.source,
        }

    async def async_end(self, mark: EnergyMark, tokens: int) -> dict[str, Any]:
        """Sample the meter first (in a thread), then close the request: no estimated tail."""
        if self._source is not None:
            # The meter only: throttle windows (x86 counters, busy CPUs) stay the loop's 2 s ones.
            await self.async_sample(thermal=False)
        return self.end(mark, tokens)

    # ----------------------------------------------------------------- reporting

    @property
    def hot(self) -> bool:
        return self._hot

    @property
    def power_w(self) -> float | None:
        return self._power_w

    def status(self) -> dict[str, Any]:
        """The energy/heat block of /api/v1/status (loop-only, no I/O)."""
        r = self._reading
        return {
            "source": self.source,
            "source_detail": self.source_detail,
            "joules_total": round(self._joules, 3),
            "power_w": None if self._power_w is None else round(self._power_w, 3),
            "joules_per_token": None if self._last_jpt is None else round(self._last_jpt, 6),
            "temperature_c": None if r is None or r.celsius is None else round(r.celsius, 1),
            "throttled": bool(r and r.throttled),
            "throttle_signal": self._thermal.signal,
            "hot": self._hot,
        }

    def metrics(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        """Pull-time samples for Metrics.add_source."""
        src = {"source": self.source}
        yield ("mongarsd_energy_joules_total", "counter", "Energy measured since start, by source.", self._joules, src)
        if self._power_w is not None:
            yield ("mongarsd_energy_watts", "gauge", "Power over the last sample interval, by source.", self._power_w, src)
        if self._last_jpt is not None:
            yield ("mongarsd_energy_joules_per_token", "gauge", "Joules per token of the last request, by source.", self._last_jpt, src)
        r = self._reading
        if r is not None and r.celsius is not None:
            yield ("mongarsd_thermal_celsius", "gauge", "Hottest thermal zone.", r.celsius, {})
        yield ("mongarsd_thermal_throttled", "gauge", "1 when the CPU is throttled now.", 1.0 if r is not None and r.throttled else 0.0, {})
        yield ("mongarsd_thermal_hot", "gauge", "1 while hot (fewer slots and threads, idle work paused).", 1.0 if self._hot else 0.0, {})
