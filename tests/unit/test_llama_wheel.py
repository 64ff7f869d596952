"""scripts/llama-wheel.sh: one llama-cpp-python wheel per version, flags and CPU, built once.

The script's pip is replaced by a stand-in that records each build and writes an empty wheel:
what is checked is the script's own logic (when it builds, when it reuses, where it puts it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "llama-wheel.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for a venv's python: the version query, and `-m pip wheel ... --wheel-dir DIR ...`
if [ "$1" = -c ]; then echo 3.11; exit 0; fi
if [ "${FAKE_PIP_FAIL:-0}" = 1 ]; then exit 1; fi
echo "CFLAGS=$CFLAGS CMAKE_ARGS=$CMAKE_ARGS $*" >>"$FAKE_PIP_LOG"
while [ $# -gt 0 ]; do
    if [ "$1" = --wheel-dir ]; then : >"$2/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"; fi
    shift
done
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    py = tmp_path / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    return py


def _run(py: Path, tmp_path: Path, *, cflags: str, fail: bool = False) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MONGARSD_BUILD_CACHE": str(tmp_path / "cache"),
        "FAKE_PIP_LOG": str(tmp_path / "pip.log"),
        "FAKE_PIP_FAIL": "1" if fail else "0",
        "CMAKE_ARGS": "-DGGML_NATIVE=ON",
        "LLAMA_CFLAGS": cflags,
    }
    return subprocess.run(["bash", str(SCRIPT), str(py), "0.3.36"], env=env, capture_output=True, text=True, timeout=30)


def _builds(tmp_path: Path) -> list[str]:
    log = tmp_path / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_builds_once_then_reuses(fake_python: Path, tmp_path: Path) -> None:
    first = _run(fake_python, tmp_path, cflags="-mno-amx-int8")
    assert first.returncode == 0, first.stderr
    wheel = Path(first.stdout.strip())
    assert wheel.is_file() and wheel.name.startswith("llama_cpp_python-0.3.36-")
    assert wheel.parent.parent == tmp_path / "cache" / "llama-wheels"
    builds = _builds(tmp_path)
    assert len(builds) == 1
    # the flags reach the build, pip's own cache does not
    assert "-mno-amx-int8" in builds[0] and "--no-cache-dir" in builds[0] and "-DGGML_NATIVE=ON" in builds[0]

    again = _run(fake_python, tmp_path, cflags="-mno-amx-int8")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(wheel)
    assert len(_builds(tmp_path)) == 1


def test_other_flags_get_their_own_wheel(fake_python: Path, tmp_path: Path) -> None:
    a = _run(fake_python, tmp_path, cflags="-mno-amx-int8")
    b = _run(fake_python, tmp_path, cflags="")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert Path(a.stdout.strip()).parent != Path(b.stdout.strip()).parent
    assert len(_builds(tmp_path)) == 2


def test_failed_build_says_so_and_leaves_nothing(fake_python: Path, tmp_path: Path) -> None:
    r = _run(fake_python, tmp_path, cflags="", fail=True)
    assert r.returncode != 0
    assert "building llama-cpp-python 0.3.36 failed" in r.stderr
    assert r.stdout == ""
    assert not list((tmp_path / "cache").rglob("*.whl"))
