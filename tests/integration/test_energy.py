"""The energy monitor on this machine's real /sys and /proc: a source is picked and real work costs joules."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from mongarsd.board import detect_board
from mongarsd.config import EnergyConfig
from mongarsd.errors import MongarsError
from mongarsd.maintenance.energy import SOURCES, EnergyMonitor, RaplSource, full_load_watts
from mongarsd.maintenance.thermal import ThermalProbe
from mongarsd.metrics import Metrics

BUSY_CPU_S = 0.4  # CPU seconds of hashing the request does
BUSY_WALL_CAP_S = 20.0  # on a loaded shared runner the CPU time may come slowly


def burn_cpu() -> float:
    """Hash until this thread has used BUSY_CPU_S of CPU; return the CPU seconds used (blocking)."""
    t0 = time.thread_time()
    deadline = time.monotonic() + BUSY_WALL_CAP_S
    data = b"x" * 4096
    while time.thread_time() - t0 < BUSY_CPU_S and time.monotonic() < deadline:
        for _ in range(200):
            data = hashlib.sha256(data).digest() * 128
    return time.thread_time() - t0


def rapl_readable() -> bool:
    """Whether this machine's RAPL package counters can be read by us (blocking)."""
    try:
        RaplSource(Path("/"))
    except MongarsError:  # no package domain, or energy_uj readable by root only
        return False
    return True


async def test_monitor_on_this_machine_reports_joules_for_real_work() -> None:
    info = await asyncio.to_thread(detect_board)
    mon = EnergyMonitor(config=EnergyConfig(), board=info, root=Path("/"))
    await mon.async_start()
    assert mon.source in SOURCES
    if await asyncio.to_thread(rapl_readable):
        assert mon.source == "rapl"
    mark = mon.begin()
    cpu_s = await asyncio.to_thread(burn_cpu)
    out = await mon.async_end(mark, tokens=100)
    assert out["source"] == mon.source
    assert out["joules"] > 0
    assert abs(out["joules_per_token"] - out["joules"] / 100) < 1e-5
    if mon.source == "cpu-model":
        # The only request open: it is charged at least this thread's CPU time at the watts per CPU.
        watts_per_cpu = full_load_watts(mon.config, mon.board) / max(1, mon.board.cores_logical)
        assert cpu_s >= BUSY_CPU_S * 0.5
        assert out["joules"] >= cpu_s * watts_per_cpu * 0.9, (out, cpu_s, watts_per_cpu)
    st = mon.status()
    assert st["source"] == mon.source and st["joules_total"] > 0
    metrics = Metrics()
    metrics.add_source(mon.metrics)
    text = (await asyncio.to_thread(metrics.render)).decode()
    assert f'mongarsd_energy_joules_total{{source="{mon.source}"}}' in text
    assert f'mongarsd_energy_joules_per_token{{source="{mon.source}"}}' in text
    await mon.async_stop()


async def test_thermal_probe_on_this_machine_never_raises() -> None:
    probe = ThermalProbe(Path("/"))
    first = await asyncio.to_thread(probe.read)
    second = await asyncio.to_thread(probe.read)
    assert second.throttle_signal == first.throttle_signal
    assert first.celsius is None or -40.0 <= first.celsius <= 150.0
