"""The daemon as a user runs it: a real subprocess, real HTTP, real signals and sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DaemonProc, free_port, http, run_cli, start_daemon


def test_ops_routes(daemon: DaemonProc) -> None:
    root = daemon.get("/")
    assert root.status == 200 and root.body.decode().startswith("mongarsd is running")
    assert daemon.get("/health").json() == {"status": "ok"}
    ready = daemon.get("/ready")
    assert ready.status == 200 and ready.json()["ready"] is True
    assert ready.json()["services"]["store"] == "started"
    status = daemon.get("/api/v1/status").json()
    assert status["version"] and status["ready"] is True
    assert status["board"]["cores_logical"] >= 1 and status["profile"]
    assert status["you"] == {"user": "local", "role": "admin"}
    metrics = daemon.get("/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    for name in (
        "process_resident_memory_bytes",
        "mongarsd_event_loop_lag_seconds_bucket",
        "mongarsd_http_requests_total",
        "mongarsd_http_request_duration_seconds_bucket",
        "mongarsd_ready 1.0",
    ):
        assert name in text, name
    assert 'route="/api/v1/status"' in text
    assert daemon.get("/health").headers.get("X-Request-Id")


def test_sigterm_drains_and_exits_zero(daemon: DaemonProc) -> None:
    t0 = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10  # well inside the drain timeout
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    events = [e["event"] for e in lines]
    assert "daemon_stopping" in events and events[-1] == "daemon_stopped"


def test_bad_config_value_exits_78_naming_the_key(tmp_path: Path) -> None:
    res = run_cli("run", "--state-dir", str(tmp_path / "s"), env={"MONGARSD_INFERENCE__SLOTS": "lots"})
    assert res.returncode == 78
    assert "inference.slots = 'lots' from env:MONGARSD_INFERENCE__SLOTS" in res.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nprot = 1\n")
    res = run_cli("run", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 78 and "unknown key server.prot" in res.stderr


def test_refuses_non_loopback_bind_without_a_token(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, args=["--host", "0.0.0.0"], wait_ready=False)
    code = d.proc.wait(timeout=60)
    assert code == 78
    assert "refusing to listen on 0.0.0.0" in d.log() and "mongarsd token create" in d.log()


def test_non_loopback_bind_works_once_a_token_exists(tmp_path: Path) -> None:
    state = tmp_path / "state"
    res = run_cli("token", "create", "--user", "admin", "--role", "admin", "--state-dir", str(state))
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    d = start_daemon(tmp_path, args=["--host", "0.0.0.0"], state_dir=state, wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if d.proc.poll() is not None:
                pytest.fail(d.log())
            try:
                if http("GET", f"http://127.0.0.1:{d.port}/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        assert http("GET", f"http://127.0.0.1:{d.port}/api/v1/status", token=token).json()["you"]["role"] == "admin"
    finally:
        assert d.stop() == 0


def test_user_token_cannot_reach_admin_routes(daemon: DaemonProc) -> None:
    res = run_cli("token", "create", "--user", "alice", "--role", "user", "--state-dir", str(daemon.state_dir))
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    me = daemon.get("/api/v1/status", token=token)
    assert me.status == 200 and me.json()["you"] == {"user": "alice", "role": "user"}
    for method, path, body in (("GET", "/metrics", None), ("POST", "/api/v1/tokens", {"user": "eve", "role": "admin"})):
        r = http(method, daemon.url + path, body, token=token)
        assert r.status == 403, (path, r.status)
        assert r.json()["error"]["code"] == "forbidden" and "admin role" in r.json()["error"]["message"]
    # Own tokens only
    listing = daemon.get("/api/v1/tokens", token=token).json()["tokens"]
    assert {t["user"] for t in listing} == {"alice"}
    bad = daemon.get("/api/v1/status", token="mgs_000000000000_" + "x" * 43)
    assert bad.status == 401 and bad.headers.get("WWW-Authenticate") == "Bearer"


def test_admin_can_create_and_revoke_tokens_over_http(daemon: DaemonProc) -> None:
    created = daemon.post("/api/v1/tokens", {"user": "bob", "role": "user", "label": "phone"})
    assert created.status == 201
    tok = created.json()["token"]
    assert daemon.get("/api/v1/status", token=tok).status == 200
    assert http("DELETE", f"{daemon.url}/api/v1/tokens/{created.json()['id']}").status == 200
    # Revoked through this daemon: its verification cache forgets the token at once (TOKEN_CACHE_TTL_S
    # bounds only a revocation made by another process, such as the CLI).
    assert daemon.get("/api/v1/status", token=tok).status == 401
    bad = daemon.post("/api/v1/tokens", {"user": "bob", "role": "king"})
    assert bad.status == 400 and bad.json()["error"]["param"] == "role"
    bad = daemon.post("/api/v1/tokens", {"user": "../etc", "role": "user"})
    assert bad.status == 400 and bad.json()["error"]["param"] == "user"


def test_loopback_untrusted_requires_a_token(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, env={"MONGARSD_AUTH__LOOPBACK_TRUSTED": "false"})
    try:
        r = d.get("/api/v1/status")
        assert r.status == 401 and "Bearer" in r.json()["error"]["message"]
        assert d.get("/health").status == 200  # public
    finally:
        d.stop()


def test_ready_and_status_on_a_notify_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    try:
        d = start_daemon(tmp_path, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}, wait_ready=False)
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert any(m.startswith("STATUS=starting") for m in messages)
        assert d.get("/ready").status == 200
        while not any(m == "WATCHDOG=1" for m in messages):
            messages.append(sock.recv(4096).decode())
        assert d.stop() == 0
        sock.settimeout(5)
        tail: list[str] = []
        try:
            while True:
                tail.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in tail
    finally:
        sock.close()


def test_sighup_restarts_cleanly(tmp_path: Path) -> None:
    sock_path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    d = start_daemon(tmp_path, env={"NOTIFY_SOCKET": str(sock_path)})
    try:
        before = d.get("/api/v1/status").json()["uptime_s"]
        d.proc.send_signal(signal.SIGHUP)
        seen: list[str] = []
        while "RELOADING=1" not in seen:
            seen.append(sock.recv(4096).decode())
        while not seen[-1].startswith("READY=1"):
            seen.append(sock.recv(4096).decode())
        assert d.proc.poll() is None
        after = d.get("/api/v1/status").json()
        assert after["ready"] is True and after["uptime_s"] < before + 30
    finally:
        sock.close()
        assert d.stop() == 0


def test_second_instance_on_the_same_state_dir_is_refused(daemon: DaemonProc, tmp_path: Path) -> None:
    (tmp_path / "second").mkdir()
    second = start_daemon(tmp_path / "second", state_dir=daemon.state_dir, wait_ready=False)
    assert second.proc.wait(timeout=60) == 1
    assert "already running with state dir" in second.log()


def test_each_surface_speaks_its_own_error_shape(daemon: DaemonProc) -> None:
    openai = daemon.get("/v1/no-such-route")
    assert openai.status == 404 and set(openai.json()["error"]) == {"message", "type", "param", "code"}
    ollama = daemon.get("/api/no-such-route")
    assert ollama.status == 404 and isinstance(ollama.json()["error"], str)
    native = daemon.post("/api/v1/tokens", b"{not json")
    assert native.status == 400
    assert native.json()["error"]["code"] == "bad_request" and "not valid JSON" in native.json()["error"]["message"]
    bad_utf8 = daemon.post("/api/v1/tokens", b'{"user": "\xff"}')
    assert bad_utf8.status == 400 and "UTF-8" in bad_utf8.json()["error"]["message"]
    array = daemon.post("/api/v1/tokens", [1, 2])
    assert array.status == 400 and "JSON object" in array.json()["error"]["message"]
    method = http("PUT", daemon.url + "/health")
    assert method.status == 405


def test_body_size_cap(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, env={"MONGARSD_SERVER__MAX_BODY_BYTES": "2048"})
    try:
        r = d.post("/api/v1/tokens", {"user": "x" * 5000})
        assert r.status == 413 and "limit 2048 bytes" in r.json()["error"]["message"]
    finally:
        d.stop()


def test_per_token_rate_limit(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, env={"MONGARSD_AUTH__RATE_LIMIT_RPS": "1", "MONGARSD_AUTH__RATE_LIMIT_BURST": "3"})
    try:
        token = run_cli("token", "create", "--user", "carol", "--state-dir", str(d.state_dir)).stdout.strip()
        codes = [d.get("/api/v1/status", token=token).status for _ in range(6)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        limited = d.get("/api/v1/status", token=token)
        assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
        assert d.get("/api/v1/status").status == 200  # the local admin is not throttled by carol's bucket
    finally:
        d.stop()


def test_cors_is_closed_by_default(daemon: DaemonProc) -> None:
    pre = http("OPTIONS", daemon.url + "/api/v1/status", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert pre.status == 403
    plain = daemon.get("/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in plain.headers


def test_config_show_prints_values_with_sources(tmp_path: Path) -> None:
    res = run_cli("config", "show", "--state-dir", str(tmp_path), "--port", "9999", env={"MONGARSD_INFERENCE__SLOTS": "3"})
    assert res.returncode == 0, res.stderr
    assert "server.port" in res.stdout and "9999" in res.stdout and "# cli:--port" in res.stdout
    assert "# env:MONGARSD_INFERENCE__SLOTS" in res.stdout
    data = json.loads(run_cli("config", "show", "--json", "--state-dir", str(tmp_path)).stdout)
    assert data["values"]["server.port"] == {"value": 8642, "source": "default"}


def test_token_cli_list_and_revoke(tmp_path: Path) -> None:
    state = str(tmp_path / "s")
    created = run_cli("token", "create", "--user", "dave", "--role", "user", "--label", "ci", "--state-dir", state)
    assert created.returncode == 0 and created.stdout.startswith("mgs_")
    listing = json.loads(run_cli("token", "list", "--json", "--state-dir", state).stdout)
    assert listing[0]["user"] == "dave" and "token" not in listing[0] and "hash" not in listing[0]
    assert run_cli("token", "revoke", listing[0]["id"], "--state-dir", state).returncode == 0
    missing = run_cli("token", "revoke", "ffffffffffff", "--state-dir", state)
    assert missing.returncode == 1 and "no token with id" in missing.stderr
    bad = run_cli("token", "create", "--user", "bad name!", "--state-dir", state)
    assert bad.returncode == 1 and "user must be" in bad.stderr


def test_port_in_use_is_a_clear_failure(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        d = start_daemon(tmp_path, port=port, wait_ready=False)
        assert d.proc.wait(timeout=60) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in d.log()


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(timeout=20)
    assert code in (0, 128 + signal.SIGTERM)
    assert os.path.exists(d.log_path)


def test_console_script_entry_point_exists() -> None:
    res = subprocess.run([str(Path(sys.executable).parent / "mongarsd"), "version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.startswith("mongarsd ")


def test_sdk_placeholder_keys_on_trusted_loopback_are_the_local_admin(daemon: DaemonProc) -> None:
    # OpenAI/Ollama SDKs always send some api_key; on trusted loopback a non-mongarsd key changes nothing.
    assert daemon.get("/api/v1/status", token="sk-placeholder").json()["you"] == {"user": "local", "role": "admin"}
    # A real-looking mongarsd token that does not verify is still refused, even on loopback.
    assert daemon.get("/api/v1/status", token="mgs_000000000000_" + "y" * 43).status == 401
