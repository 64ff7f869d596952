"""Shared fixtures: a real daemon subprocess on a free loopback port, and leak checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Property and fuzz tests: a bounded run in `make test`, a long one under `make fuzz`.
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("MONGARSD_TEST_MODELS", REPO / "models"))
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m mongarsd ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "mongarsd", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@dataclass
class Http:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str, url: str, body: Any = None, *, token: str | None = None, headers: dict[str, str] | None = None, timeout: float = 60
) -> Http:
    """Make one real HTTP request with the standard library (curl-style)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Http(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        return Http(err.code, dict(err.headers), err.read())


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    log_path: Path
    host: str = "127.0.0.1"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str, **kw: Any) -> Http:
        return http("GET", self.url + path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Http:
        return http("POST", self.url + path, body, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


def start_daemon(
    tmp: Path,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    wait_ready: bool = True,
    models: bool = False,
) -> DaemonProc:
    """Start `mongarsd run` as a user would; by default without loading models."""
    port = port or free_port()
    state_dir = state_dir or tmp / "state"
    log_path = tmp / f"daemon-{port}.log"
    base_env = {
        "MONGARSD_LOG__FORMAT": "json",
        "MONGARSD_LOG__LEVEL": "debug",
        "MONGARSD_CONFIG": str(tmp / "none.toml") if not (env or {}).get("MONGARSD_CONFIG") else env["MONGARSD_CONFIG"],  # type: ignore[index]
        "PYTHONUNBUFFERED": "1",
    }
    if not models:
        base_env["MONGARSD_INFERENCE__PRELOAD"] = "false"
        base_env["MONGARSD_EMBED__PRELOAD"] = "false"
    if "MONGARSD_CONFIG" not in (env or {}):
        (tmp / "none.toml").write_text("")
    cmd = [
        sys.executable,
        "-m",
        "mongarsd",
        "run",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--models-dir",
        str(MODELS_DIR),
        *(args or []),
    ]
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(cmd, env={**os.environ, **base_env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    d = DaemonProc(proc, port, state_dir, log_path)
    if wait_ready:
        wait_until_ready(d)
    return d


def wait_until_ready(d: DaemonProc, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.log()[-4000:]}")
        try:
            if d.get("/ready", timeout=2).status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    d.stop(signal.SIGKILL)
    raise AssertionError(f"daemon not ready within {timeout}s:\n{d.log()[-4000:]}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    """A daemon without models, for tests of the foundation."""
    d = start_daemon(tmp_path)
    yield d
    d.stop()


@pytest.fixture(autouse=True)
def verify_no_thread_leak() -> Iterator[None]:
    """Fail a test that leaves threads running behind it."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t.ident not in before and t.is_alive() and not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"
