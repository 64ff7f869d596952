"""scripts/llama-wheel.sh: one llama-cpp-python wheel per version, flags and CPU, built once.

The script's pip is replaced by a stand-in that records each build and writes an empty wheel:
what is checked is the script's own logic (when it builds, when it reuses, where it puts it).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "llama-wheel.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for a venv's python: the version query, `-m pip download ... -d DIR SPEC` (a tiny
# sdist whose vendored file says "stock") and `-m pip wheel ... --wheel-dir DIR SRC`, which
# records the flags and what the vendored file says in the tree it is given
if [ "$1" = -c ]; then echo 3.11; exit 0; fi
if [ "$3" = download ]; then
    while [ $# -gt 0 ]; do [ "$1" = -d ] && out="$2"; shift; done
    mkdir -p "$out/llama_cpp_python-0.3.36/vendor/llama.cpp"
    echo stock >"$out/llama_cpp_python-0.3.36/vendor/llama.cpp/kernel.txt"
    tar -czf "$out/llama_cpp_python-0.3.36.tar.gz" -C "$out" llama_cpp_python-0.3.36
    rm -rf "$out/llama_cpp_python-0.3.36"
    exit 0
fi
if [ "${FAKE_PIP_FAIL:-0}" = 1 ]; then exit 1; fi
src="${*: -1}"
echo "CFLAGS=$CFLAGS CMAKE_ARGS=$CMAKE_ARGS kernel=$(cat "$src/vendor/llama.cpp/kernel.txt") $*" >>"$FAKE_PIP_LOG"
while [ $# -gt 0 ]; do
    if [ "$1" = --wheel-dir ]; then : >"$2/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"; fi
    shift
done
"""

PATCH = """--- a/vendor/llama.cpp/kernel.txt
+++ b/vendor/llama.cpp/kernel.txt
@@ -1 +1 @@
-stock
+{new}
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    py = tmp_path / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    return py


def _patches(tmp_path: Path, new: str) -> Path:
    """A patches folder whose one patch for 0.3.36 turns the vendored file's "stock" into `new`."""
    root = tmp_path / "patches"
    folder = root / "llama-cpp-python-0.3.36"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "0001-kernel.patch").write_text(PATCH.format(new=new))
    return root


def _run(py: Path, tmp_path: Path, *, cflags: str, fail: bool = False, patches: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MONGARSD_BUILD_CACHE": str(tmp_path / "cache"),
        "FAKE_PIP_LOG": str(tmp_path / "pip.log"),
        "FAKE_PIP_FAIL": "1" if fail else "0",
        "CMAKE_ARGS": "-DGGML_NATIVE=ON",
        "LLAMA_CFLAGS": cflags,
        "MONGARSD_LLAMA_PATCHES": str(patches or _patches(tmp_path, "blocked")),
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
    # built from the sdist's tree with the version's patches applied
    assert "kernel=blocked" in builds[0]

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


def test_changed_patches_get_their_own_wheel(fake_python: Path, tmp_path: Path) -> None:
    a = _run(fake_python, tmp_path, cflags="", patches=_patches(tmp_path / "a", "blocked"))
    b = _run(fake_python, tmp_path, cflags="", patches=_patches(tmp_path / "b", "tiled"))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    assert Path(a.stdout.strip()).parent != Path(b.stdout.strip()).parent
    assert [re.findall(r"kernel=\S+", line) for line in _builds(tmp_path)] == [["kernel=blocked"], ["kernel=tiled"]]


def test_a_patch_that_does_not_apply_is_named(fake_python: Path, tmp_path: Path) -> None:
    patches = _patches(tmp_path, "blocked")
    (patches / "llama-cpp-python-0.3.36" / "0001-kernel.patch").write_text(PATCH.replace("-stock", "-other").format(new="x"))
    r = _run(fake_python, tmp_path, cflags="", patches=patches)
    assert r.returncode != 0
    assert "0001-kernel.patch does not apply" in r.stderr
    assert _builds(tmp_path) == []
    assert not list((tmp_path / "cache").rglob("*.whl"))
