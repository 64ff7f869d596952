"""Heat: the hottest thermal zone, throttling signals, and the hot/cool hysteresis.

Every probe reads files under a filesystem `root` (``/`` in production, a recorded board tree in
tests) and tolerates missing or garbled content. Throttling is read from the most direct signal
the machine has, in this order:

1. the Raspberry Pi firmware's ``get_throttled`` word (older Pi kernels expose it in sysfs;
   ``scaling_cur_freq`` does not show the firmware's throttling on a Pi);
2. the x86 ``thermal_throttle`` event counters (``core_/package_throttle_count``) increasing;
3. cpufreq: CPUs that were busy over the last interval running well below the frequency ceiling
   they had when probing started (a power mode such as Jetson's nvpmodel lowers the ceiling on
   purpose; a later drop under it, or a clock below it while busy, is throttling).

Only the pure helpers decide; ThermalProbe only reads (blocking; call it from a thread).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mongarsd.cognition.hands import read_thermal_zones

# sysfs values are a few bytes; /proc/stat of a 1024-cpu machine stays under this.
MAX_READ_BYTES: Final = 256 * 1024
# Highest CPU id scanned for cpufreq and thermal_throttle entries.
MAX_CPUS: Final = 1024
# get_throttled bits that mean "now": 1 ARM frequency capped, 2 throttled, 3 soft temperature
# limit active (bit 0, under-voltage, is reported apart; bits 16-19 are the sticky "since boot").
PI_THROTTLED_NOW_MASK: Final = 0b1110
PI_UNDERVOLTAGE_NOW_MASK: Final = 0b0001
# A CPU counts as busy over an interval when it was not idle this share of the time.
BUSY_FRACTION_MIN: Final = 0.9
# Busy CPUs running below this share of their frequency ceiling are throttled.
THROTTLED_FREQ_RATIO: Final = 0.8

_PI_THROTTLED_GLOBS: Final = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",  # Pi 4 and older
    "sys/devices/platform/soc*/soc*:firmware/get_throttled",  # Pi 5 (soc@107c000000)
)


def read_text(path: Path) -> str | None:
    """Read a small text file, None when it cannot be read (blocking)."""
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_READ_BYTES).decode("utf-8", "replace").strip()
    except (OSError, ValueError):  # missing, unreadable, a directory: all mean "unknown"
        return None


def read_int(path: Path) -> int | None:
    """Read a small file holding an integer, None when absent or garbled (blocking)."""
    text = read_text(path)
    if not text:
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def cpu_ids(cpu_dir: Path) -> list[int]:
    """Return the ids of the cpuN folders under `cpu_dir`, sorted, at most MAX_CPUS (blocking)."""
    ids: set[int] = set()
    try:
        names = [p.name for p in cpu_dir.glob("cpu[0-9]*")]
    except OSError:  # an unreadable folder: no CPUs to look at
        return []
    for name in names:
        try:
            cpu = int(name[3:])
        except ValueError:
            continue
        if 0 <= cpu < MAX_CPUS:
            ids.add(cpu)
    return sorted(ids)


# --------------------------------------------------------------------------- pure decisions


def parse_get_throttled(text: str | None) -> tuple[bool, bool] | None:
    """Return (throttled now, under-voltage now) from the Pi firmware's hex word, None when garbled."""
    if not text:
        return None
    try:
        word = int(text.split()[0], 16)
    except ValueError:
        return None
    return bool(word & PI_THROTTLED_NOW_MASK), bool(word & PI_UNDERVOLTAGE_NOW_MASK)


def parse_proc_stat(text: str | None) -> dict[int, tuple[int, int]]:
    """Return {cpu: (idle jiffies, total jiffies)} from /proc/stat's per-cpu lines; {} when garbled."""
    out: dict[int, tuple[int, int]] = {}
    for line in (text or "").splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            fields = [int(v) for v in rest.split()]
        except ValueError:
            continue
        if len(fields) < 4 or not 0 <= cpu < MAX_CPUS:
            continue
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        out[cpu] = (idle, sum(fields[:8]))
    return out


def busy_fractions(prev: Mapping[int, tuple[int, int]], now: Mapping[int, tuple[int, int]]) -> dict[int, float]:
    """Return each CPU's non-idle share between two /proc/stat readings (pure)."""
    out: dict[int, float] = {}
    for cpu, (idle, total) in now.items():
        before = prev.get(cpu)
        if before is None:
            continue
        d_total = total - before[1]
        d_idle = idle - before[0]
        if d_total <= 0 or d_idle < 0:  # no time passed, or a hot-plugged CPU restarted its counters
            continue
        out[cpu] = min(1.0, max(0.0, 1.0 - d_idle / d_total))
    return out


def freq_throttled(busy: Mapping[int, float], cur_khz: Mapping[int, int], ceiling_khz: Mapping[int, int]) -> bool:
    """Return True when the busy CPUs run, on average, well below their frequency ceiling (pure).

    Idle CPUs are ignored: governors lower their clocks on purpose.
    """
    ratios = [
        cur_khz[cpu] / ceiling_khz[cpu]
        for cpu, share in busy.items()
        if share >= BUSY_FRACTION_MIN and cur_khz.get(cpu, 0) > 0 and ceiling_khz.get(cpu, 0) > 0
    ]
    return bool(ratios) and sum(ratios) / len(ratios) < THROTTLED_FREQ_RATIO


def next_hot(hot: bool, celsius: float | None, throttled: bool, *, hot_c: float, cool_c: float) -> bool:
    """Apply the hysteresis: hot at ≥ hot_c or throttled; cool again at ≤ cool_c and not throttled (pure).

    An unknown temperature keeps the current state unless throttling decides.
    """
    if not hot:
        return throttled or (celsius is not None and celsius >= hot_c)
    if throttled:
        return True
    return not (celsius is not None and celsius <= cool_c)


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True, slots=True)
class ThermalReading:
    """One look at the machine's heat."""

    celsius: float | None  # hottest thermal zone; None when the machine has none
    throttled: bool
    throttle_signal: str  # "pi-firmware", "x86-counters", "cpufreq" or "none": what `throttled` came from
    undervoltage: bool = False  # Pi only: the supply is too weak right now


class ThermalProbe:
    """Read temperature and throttling under `root`; keeps the previous counters between reads."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self._lock = threading.Lock()  # reads may come from more than one worker thread
        self._pi_file: Path | None = None
        self._throttle_counts: list[Path] = []
        self._cpufreq_cpus: list[int] = []
        self._ceiling: dict[int, int] = {}
        self._prev_count: int | None = None
        self._prev_stat: dict[int, tuple[int, int]] = {}
        self.signal = "none"
        self._opened = False

    def open(self) -> None:
        """Find which throttling signal this machine has and take the baselines (blocking: reads sysfs)."""
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        if self._opened:
            return
        self._opened = True
        for pattern in _PI_THROTTLED_GLOBS:
            for path in sorted(self.root.glob(pattern)):
                if parse_get_throttled(read_text(path)) is not None:
                    self._pi_file = path
                    self.signal = "pi-firmware"
                    return
        cpu_dir = self.root / "sys/devices/system/cpu"
        cpus = cpu_ids(cpu_dir)
        counts = [
            cpu_dir / f"cpu{cpu}/thermal_throttle" / name for cpu in cpus for name in ("core_throttle_count", "package_throttle_count")
        ]
        self._throttle_counts = [p for p in counts if read_int(p) is not None]
        if self._throttle_counts:
            self._prev_count = self._sum_counts()
            self.signal = "x86-counters"
            return
        for cpu in cpus:
            freq = cpu_dir / f"cpu{cpu}/cpufreq"
            hw_max = read_int(freq / "cpuinfo_max_freq")
            if hw_max is None or hw_max <= 0 or read_int(freq / "scaling_cur_freq") is None:
                continue
            policy_max = read_int(freq / "scaling_max_freq")
            # The ceiling is the policy limit at start: a configured power mode is not throttling.
            self._ceiling[cpu] = min(hw_max, policy_max) if policy_max and policy_max > 0 else hw_max
            self._cpufreq_cpus.append(cpu)
        if self._cpufreq_cpus:
            self._prev_stat = parse_proc_stat(read_text(self.root / "proc/stat"))
            self.signal = "cpufreq"

    def _sum_counts(self) -> int:
        return sum(read_int(p) or 0 for p in self._throttle_counts)

    def read(self) -> ThermalReading:
        """Return the hottest zone and whether the CPU is throttled now (blocking: reads sysfs and /proc)."""
        with self._lock:
            if not self._opened:
                self._open_locked()
            celsius = read_thermal_zones(str(self.root / "sys/class/thermal"))
            throttled = False
            undervoltage = False
            if self._pi_file is not None:
                parsed = parse_get_throttled(read_text(self._pi_file))
                if parsed is not None:
                    throttled, undervoltage = parsed
            elif self._throttle_counts:
                count = self._sum_counts()
                throttled = self._prev_count is not None and count > self._prev_count
                self._prev_count = count
            elif self._cpufreq_cpus:
                stat = parse_proc_stat(read_text(self.root / "proc/stat"))
                busy = busy_fractions(self._prev_stat, stat)
                self._prev_stat = stat
                cpu_dir = self.root / "sys/devices/system/cpu"
                cur = {cpu: read_int(cpu_dir / f"cpu{cpu}/cpufreq/scaling_cur_freq") or 0 for cpu in busy if cpu in self._ceiling}
                throttled = freq_throttled(busy, cur, self._ceiling)
            return ThermalReading(celsius=celsius, throttled=throttled, throttle_signal=self.signal, undervoltage=undervoltage)
