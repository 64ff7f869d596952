"""The build scripts' own logic, fast and without root: the self-extracting stub and the pins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO

PACK = REPO / "packaging" / "dist" / "pack.py"
STUB = REPO / "packaging" / "dist" / "stub.sh"


def make_folder(root: Path, marker: str) -> Path:
    """A stand-in one-folder build: its `mongarsd` prints its arguments and a file it carries."""
    folder = root / f"folder-{marker}"
    (folder / "_internal").mkdir(parents=True)
    (folder / "_internal" / "marker").write_text(marker)
    exe = folder / "mongarsd"
    exe.write_text('#!/bin/sh\necho "ran $(cat "$(dirname "$0")/_internal/marker") $*"\n')
    exe.chmod(0o755)
    return folder


def pack(folder: Path, out: Path, key: str) -> Path:
    cmd = [
        sys.executable,
        str(PACK),
        "--folder",
        str(folder),
        "--stub",
        str(STUB),
        "--version",
        "9.9",
        "--arch",
        "x86_64",
        "--key",
        key,
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out


def run(exe: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "MONGARSD_BUNDLE_DIR": str(cache)}
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_stub_unpacks_once_then_runs_the_folder_directly(tmp_path: Path) -> None:
    exe = pack(make_folder(tmp_path, "one"), tmp_path / "mongarsd-exe", "k1")
    cache = tmp_path / "cache"
    first = run(exe, cache, "run", "--port", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "ran one run --port 1"
    assert "unpacking into" in first.stderr
    second = run(exe, cache, "version")
    assert second.stdout.strip() == "ran one version" and second.stderr == ""
    assert sorted(p.name for p in cache.iterdir()) == ["bundle-k1"]
    assert (cache.stat().st_mode & 0o777) == 0o700


def test_a_new_version_replaces_the_old_one_in_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run(pack(make_folder(tmp_path, "old"), tmp_path / "old-exe", "k1"), cache)
    new = run(pack(make_folder(tmp_path, "new"), tmp_path / "new-exe", "k2"), cache, "x")
    assert new.stdout.strip() == "ran new x"
    assert sorted(p.name for p in cache.iterdir()) == ["bundle-k2"]


def test_a_truncated_executable_fails_clearly_and_leaves_nothing_half_unpacked(tmp_path: Path) -> None:
    exe = pack(make_folder(tmp_path, "one"), tmp_path / "mongarsd-exe", "k1")
    data = exe.read_bytes()
    exe.write_bytes(data[: len(data) - 40])
    cache = tmp_path / "cache"
    r = run(exe, cache)
    assert r.returncode != 0
    assert "unpacking failed" in r.stderr and "nothing was kept" in r.stderr
    assert list(cache.iterdir()) == []


def test_a_cache_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    exe = pack(make_folder(tmp_path, "one"), tmp_path / "mongarsd-exe", "k1")
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chown(cache, 65534, 65534)
    r = run(exe, cache)
    assert r.returncode == 1 and "is not owned by this user" in r.stderr


def test_the_archive_offset_is_a_fixed_point(tmp_path: Path) -> None:
    sys.path.insert(0, str(PACK.parent))
    try:
        import pack as pack_module  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    for key in ("k", "k" * 40):
        head = pack_module.stub_text(STUB.read_text(), version="1.0", arch="arm64", key=key)
        offset = int(head.decode().split("OFFSET=", 1)[1].split()[0])
        assert offset == len(head) + 1


def test_requirements_pin_the_venvs_versions_without_llama_cpp_python() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "packaging" / "dist" / "requirements.py")], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    pins = dict(line.split("==", 1) for line in out.split())
    import numpy

    assert pins["numpy"] == numpy.__version__
    assert "llama-cpp-python" not in pins and "diskcache" in pins  # its run-time requirement, not itself
    assert pins["pyinstaller"]
