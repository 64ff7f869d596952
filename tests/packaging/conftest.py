"""Fixtures of the packaging tests: the folder and single-executable builds, made once.

`packaging/dist/build.sh` caches by its inputs, so after the first build (several minutes,
more for arm64 under qemu-user) a session finds them ready in seconds.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from mongarsd import __version__
from tests.packaging.rootfs import say

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 3600


@dataclass(frozen=True)
class DistBuild:
    arch: str
    folder: Path  # the PyInstaller one-dir build
    executable: Path  # the single self-extracting file


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the packaging builds and tests run chroot: root only")


def build(arch: str) -> DistBuild:
    _needs_root()
    say(f"building the {arch} executable (packaging/dist/build.sh; cached after the first time)")
    tail: list[str] = []
    with subprocess.Popen(
        [str(REPO / "packaging" / "dist" / "build.sh"), arch],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            say(line.rstrip())
            tail = [*tail[-30:], line]
        code = proc.wait(timeout=BUILD_TIMEOUT_S)
    if code != 0:
        pytest.fail(f"packaging/dist/build.sh {arch} failed:\n{''.join(tail)}")
    return DistBuild(
        arch=arch,
        folder=REPO / "build" / "dist" / arch / "mongarsd",
        executable=REPO / "dist" / f"mongarsd-{__version__}-linux-{arch}",
    )


@pytest.fixture(scope="session")
def dist_x86_64() -> DistBuild:
    return build("x86_64")


@pytest.fixture(scope="session")
def dist_arm64() -> DistBuild:
    if os.environ.get("MONGARSD_TEST_DIST_ARM64") != "1":
        pytest.skip("the arm64 build and its qemu-user smoke test run under make test-dist")
    return build("arm64")
