"""Debian roots for the packaging tests: built once with mmdebstrap, cached, run with chroot.

Commands run in a private mount namespace (`unshare --mount`), so the /proc, /dev, /sys, /tmp
and bind mounts they need vanish with them; the network namespace is the host's, so a daemon
inside listens on this machine's loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

CACHE = Path(os.environ.get("MONGARSD_BUILD_CACHE") or Path.home() / ".cache" / "mongarsd-build")
MMDEBSTRAP_TIMEOUT_S = 900


def say(line: str) -> None:
    """Progress of a long step, shown even while pytest captures output."""
    print(f"[packaging] {line}", file=sys.__stderr__, flush=True)


def root_tar(arch: str, *, include: Sequence[str] = (), name: str = "minbase") -> Path:
    """A cached tarball of a minimal Debian bookworm root of `arch` (amd64 | arm64)."""
    path = CACHE / "roots" / f"bookworm-{arch}-{name}.tar"
    if path.is_file():
        return path
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is missing (apt-get install mmdebstrap)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.tar")  # mmdebstrap picks the format from the suffix
    say(f"building a bookworm {arch} root ({name}) with mmdebstrap, once (about a minute; longer for arm64)")
    cmd = ["mmdebstrap", "--quiet", "--variant=minbase", f"--architectures={arch}"]
    if include:
        cmd.append("--include=" + ",".join(include))
    subprocess.run([*cmd, "bookworm", str(tmp)], check=True, timeout=MMDEBSTRAP_TIMEOUT_S)
    tmp.replace(path)
    return path


def unpack(tar: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as tf:
        tf.extractall(dest, filter="fully_trusted")  # our own mmdebstrap output: devices, owners
    return dest


def elf_machine(path: Path) -> int:
    """The ELF header's e_machine (62: x86-64, 183: AArch64)."""
    with path.open("rb") as fh:
        head = fh.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


def emulated(root: Path) -> bool:
    """Whether `root`'s programs run under qemu-user here (its architecture is not this machine's)."""
    return (root / "lib" / "ld-linux-aarch64.so.1").exists() and os.uname().machine != "aarch64"


def chroot_argv(
    root: Path, argv: Sequence[str], *, env: Mapping[str, str] | None = None, binds: Mapping[Path, str] | None = None
) -> list[str]:
    """The command line that runs `argv` inside `root` with /proc, /dev, /sys, /tmp and read-only binds."""
    script = ["set -e", 'mount -t proc proc "$R/proc"', 'mount --rbind /dev "$R/dev"', 'mount -t tmpfs tmpfs "$R/tmp"']
    if not emulated(root):
        # Board detection and ONNX Runtime's CPU probe read it. Not under qemu-user: there the
        # host's x86 /proc/cpuinfo sits beside it and ONNX Runtime's arm64 probe crashes on the
        # mix; without /sys the probe gives up cleanly (a warning) and the CPU provider runs.
        script.append('mount --rbind /sys "$R/sys"')
    for i, guest in enumerate((binds or {}).values()):
        script.append(f'mkdir -p "$R{guest}" && mount --bind "$B{i}" "$R{guest}" && mount -o remount,bind,ro "$R{guest}"')
    script.append('shift; exec chroot "$R" /usr/bin/env -i "$@"')
    base_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    base_env.update(env or {})
    bind_env = [f"B{i}={host}" for i, host in enumerate(binds or {})]
    return [
        "unshare", "--mount", "--propagation", "private", "--fork",
        "env", f"R={root}", *bind_env,
        "sh", "-c", "\n".join(script), "sh", "--",
        *(f"{k}={v}" for k, v in base_env.items()), *argv,
    ]  # fmt: skip


def run_in(root: Path, argv: Sequence[str], *, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(chroot_argv(root, argv, **kw), capture_output=True, text=True, timeout=timeout, check=False)  # type: ignore[arg-type]
