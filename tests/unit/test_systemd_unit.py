"""The systemd unit, its Jetson drop-in and the sysusers file say what DESIGN.md section 8 asks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "mongarsd.service"
JETSON = REPO / "systemd" / "jetson.conf"
SYSUSERS = REPO / "systemd" / "mongarsd.sysusers.conf"
PROFILES = REPO / "configs" / "boards"
# Exposure score of `systemd-analyze security`, x10 (the unit scores 1.4 with systemd 252).
MAX_EXPOSURE_X10 = 20


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key)
    assert values, f"{key}= missing"
    return values[-1]


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(value[: -len(suffix)]) * factor
    return float(value)


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT)["Service"]


def test_lifecycle_keys(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "ExecStart").split() == ["/usr/bin/mongarsd", "run", "--config", "/etc/mongarsd/mongarsd.toml"]
    assert seconds(one(service, "WatchdogSec")) == 30
    assert one(service, "Restart") == "on-failure"
    assert seconds(one(service, "RestartSec")) == 2
    assert "78" in one(service, "RestartPreventExitStatus").split()
    assert one(service, "KillMode") == "mixed"
    assert one(service, "StateDirectory") == "mongarsd"
    assert one(service, "RuntimeDirectory") == "mongarsd"
    assert one(service, "ConfigurationDirectory") == "mongarsd"
    assert one(service, "User") == "mongarsd"
    assert one(service, "DynamicUser") == "no"
    assert "MONGARSD_LOG__FORMAT=json" in service["Environment"]
    assert one(service, "MemoryMax")


def test_hardening_keys(service: dict[str, list[str]]) -> None:
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "SystemCallArchitectures": "native",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expected.items():
        assert one(service, key) == value, key
    assert service["SystemCallFilter"][0] == "@system-service"
    families = set(one(service, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # Board detection reads /proc/cpuinfo and /proc/meminfo: ProcSubset=pid would hide them.
    assert "ProcSubset" not in service


def test_stop_budgets_add_up_under_the_unit_timeout(service: dict[str, list[str]], tmp_path: Path) -> None:
    from mongarsd.board import detect_board
    from mongarsd.config import load_config
    from mongarsd.const import STOP_TIMEOUT_S, TASKS_STOP_TIMEOUT_S
    from mongarsd.daemon import Daemon
    from mongarsd.metrics import Metrics
    from mongarsd.supervisor import ServiceStack, TaskSupervisor, members

    stop_s = seconds(one(service, "TimeoutStopSec"))
    assert stop_s == STOP_TIMEOUT_S
    board = detect_board()
    for profile in sorted(PROFILES.glob("*.toml")):
        (tmp_path / "none.toml").write_text("")
        loaded = load_config(profile=profile.stem, config_path=tmp_path / "none.toml", cli={"server": {"state_dir": tmp_path}})
        services, _ = Daemon(loaded=loaded, board=board).build_services(Metrics(), ServiceStack(), TaskSupervisor())
        # the daemon stops: HTTP drain, service loops, every service in reverse, then its own tasks
        total = sum(s.stop_timeout_s for s in members(services)) + 3 * TASKS_STOP_TIMEOUT_S
        assert total <= stop_s - 5, f"{profile.stem}: {total} s = {sorted((s.name, s.stop_timeout_s) for s in members(services))}"


def test_jetson_dropin_reopens_gpu_devices() -> None:
    dropin = parse_unit(JETSON)["Service"]
    assert one(dropin, "PrivateDevices") == "no"
    assert "video" in one(dropin, "SupplementaryGroups").split()


def test_sysusers_declares_the_service_user() -> None:
    lines = [ln.split() for ln in SYSUSERS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert any(parts[:2] == ["u", "mongarsd"] for parts in lines)


def _runnable_copy(tmp_path: Path, dropin: bool = False) -> Path:
    """Copy the unit with ExecStart pointing at an executable that exists here."""
    exe = shutil.which("mongarsd") or str(Path(sys.executable).with_name("mongarsd"))
    if not Path(exe).exists():
        exe = "/bin/true"
    text = UNIT.read_text()
    lines = [f"ExecStart={exe} run" if ln.startswith("ExecStart=") else ln for ln in text.splitlines()]
    unit = tmp_path / "mongarsd.service"
    unit.write_text("\n".join(lines) + "\n")
    if dropin:
        (tmp_path / "mongarsd.service.d").mkdir()
        shutil.copy(JETSON, tmp_path / "mongarsd.service.d" / "jetson.conf")
    return unit


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        print("systemd-analyze not installed (scripts/install-test-deps.sh installs it)")
        pytest.skip("systemd-analyze is not installed; run scripts/install-test-deps.sh")
    return tool


@pytest.mark.parametrize("dropin", [False, True], ids=["plain", "jetson"])
def test_systemd_analyze_verify(tmp_path: Path, dropin: bool) -> None:
    tool = _systemd_analyze()
    unit = _runnable_copy(tmp_path, dropin=dropin)
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 even on unknown keys; its complaints name the file on stderr.
    complaints = [ln for ln in proc.stderr.splitlines() if "mongarsd.service" in ln or "jetson.conf" in ln]
    assert proc.returncode == 0, proc.stderr
    assert complaints == []


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _runnable_copy(tmp_path)
    proc = subprocess.run(
        [tool, "security", "--offline=yes", f"--threshold={MAX_EXPOSURE_X10}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "Unknown option" in proc.stderr or "unrecognized option" in proc.stderr:
        pytest.skip("systemd-analyze too old for --offline/--threshold (needs systemd >= 250)")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


def test_sysusers_creates_user_in_scratch_root(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed; run scripts/install-test-deps.sh")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([tool, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    entry = next(ln for ln in passwd.splitlines() if ln.startswith("mongarsd:"))
    fields = entry.split(":")
    assert fields[5] == "/var/lib/mongarsd"
    assert fields[6].endswith("nologin")
    assert int(fields[2]) < 1000  # a system uid


def test_status_tells_whether_systemd_runs_the_daemon_and_its_watchdog() -> None:
    from mongarsd.api.ops import service_manager

    assert service_manager({}) == {"service_manager": None, "watchdog_s": None}
    # INVOCATION_ID alone (a shell inside a unit's environment copy) is not enough
    assert service_manager({"INVOCATION_ID": "abc"})["service_manager"] is None
    unit = {"INVOCATION_ID": "abc", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert service_manager(unit) == {"service_manager": "systemd", "watchdog_s": 30.0}
    assert service_manager({**unit, "WATCHDOG_USEC": "junk"}) == {"service_manager": "systemd", "watchdog_s": None}
    assert service_manager({"INVOCATION_ID": "abc", "JOURNAL_STREAM": "8:123"})["service_manager"] == "systemd"
