"""`mongarsd keys install -`: a key read from stdin (first-boot scripts keep it out of argv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mongarsd.mesh.keyring import encode_key, generate_key, key_id

REPO = Path(__file__).resolve().parents[2]


def mongarsd(*args: str, stdin: str = "", state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MONGARSD_CONFIG": str(state / "none.toml")}
    return subprocess.run(
        [sys.executable, "-m", "mongarsd", *args, "--state-dir", str(state)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )


def test_a_key_from_stdin_is_installed_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "none.toml").write_text("")
    key = generate_key()
    r = mongarsd("keys", "install", "-", stdin=encode_key(key) + "\n", state=tmp_path)
    assert r.returncode == 0, r.stderr
    assert encode_key(key) not in r.stdout + r.stderr  # the key itself is never echoed
    listed = mongarsd("keys", "list", "--json", state=tmp_path)
    assert json.loads(listed.stdout) == [{"id": key_id(key).hex(), "primary": True}]
    bad = mongarsd("keys", "install", "-", stdin="not base64 at all\n", state=tmp_path)
    assert bad.returncode != 0 and "key" in bad.stderr.lower() and "Traceback" not in bad.stderr
    assert json.loads(mongarsd("keys", "list", "--json", state=tmp_path).stdout) == [{"id": key_id(key).hex(), "primary": True}]
