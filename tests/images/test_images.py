"""The flashable images (make test-image): built from Debian packages and the .deb, inspected
without mounting, then booted under QEMU to a daemon that real systemd started.

- x86-64: the whole disk boots through OVMF and systemd-boot under TCG (`-cpu max`: x86-64-v3,
  no AVX-512, so the portable llama.cpp build is what runs).
- pi4: the image's own disk under `qemu-system-aarch64 -M virt -cpu cortex-a72`, with the
  Debian arm64 kernel and initramfs the image's boot partition holds.

From outside, through the forwarded port only: /ready, a chat with the admin token the first
boot printed on the console, and 401 without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mongarsd import __version__
from tests.conftest import free_port

pytestmark = pytest.mark.image

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 3600
BOOT_TIMEOUT_S = {"x86-64": 900.0, "pi4": 1500.0}  # TCG on two cores; the arm64 model load is the long part
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TOKEN_RE = re.compile(r"admin token: (mgs_[A-Za-z0-9_\-]+)")
BOOT_LABEL = {"pi4": "RASPIFIRM", "x86-64": "MGESP"}
ROOT_LABEL = {"pi4": "RASPIROOT", "x86-64": "MGROOT"}


def say(line: str) -> None:
    """Progress of a long step, shown even while pytest captures output."""
    print(f"[image {time.strftime('%H:%M:%S')}] {line}", file=__import__("sys").__stderr__, flush=True)


@dataclass(frozen=True)
class Partition:
    start: int  # bytes
    size: int  # bytes
    type: str
    bootable: bool


@dataclass(frozen=True)
class Image:
    board: str
    path: Path
    label: str  # dos | gpt
    partitions: tuple[Partition, ...]


def build(board: str) -> Image:
    if os.environ.get("MONGARSD_TEST_IMAGES") != "1":
        pytest.skip("the image builds and boots run under make test-image")
    if os.geteuid() != 0:
        pytest.skip("building an image needs root (chroot, file ownership)")
    path = REPO / "dist" / f"mongarsd-{__version__}-{board}.img"
    if os.environ.get("MONGARSD_TEST_IMAGE_PREBUILT") == "1" and path.is_file():
        say(f"testing the image already built: {path.name} (MONGARSD_TEST_IMAGE_PREBUILT=1)")
        return describe(board, path)
    say(f"make image BOARD={board} (the Debian root is cached after the first build)")
    tail: list[str] = []
    with subprocess.Popen(
        ["make", "--no-print-directory", "image", f"BOARD={board}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            say(line.rstrip())
            tail = [*tail[-40:], line]
        code = proc.wait(timeout=BUILD_TIMEOUT_S)
    if code != 0:
        pytest.fail(f"make image BOARD={board} failed:\n{''.join(tail)}")
    return describe(board, path)


def describe(board: str, path: Path) -> Image:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True, timeout=60).stdout)[
        "partitiontable"
    ]
    sector = int(table.get("sectorsize", 512))
    parts = tuple(
        Partition(int(p["start"]) * sector, int(p["size"]) * sector, str(p["type"]), bool(p.get("bootable", False)))
        for p in table["partitions"]
    )
    return Image(board, path, table["label"], parts)


@pytest.fixture(scope="session")
def images() -> Iterator[dict[str, Image]]:
    made: dict[str, Image] = {}
    yield made


def image_for(images: dict[str, Image], board: str) -> Image:
    if board not in images:
        images[board] = build(board)
    return images[board]


def extract(image: Image, index: int, dest: Path) -> Path:
    """Copy one partition out of the image (sparse), for debugfs and mtools."""
    part = image.partitions[index]
    mib = 1 << 20
    assert part.start % mib == 0 and part.size % mib == 0, part
    subprocess.run(
        [
            "dd",
            f"if={image.path}",
            f"of={dest}",
            "bs=1M",
            f"skip={part.start // mib}",
            f"count={part.size // mib}",
            "conv=sparse",
            "status=none",
        ],
        check=True,
        timeout=300,
    )
    return dest


def debugfs(fs: Path, command: str) -> str:
    r = subprocess.run(["debugfs", "-R", command, str(fs)], capture_output=True, text=True, timeout=60, check=False)
    return r.stdout


def fat_read(fs: Path, name: str) -> str:
    r = subprocess.run(["mtype", "-i", str(fs), f"::{name}"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, f"{name} is not on the boot partition: {r.stderr}"
    return r.stdout


def fat_list(fs: Path, folder: str = "") -> set[str]:
    r = subprocess.run(["mdir", "-b", "-i", str(fs), f"::{folder}"], capture_output=True, text=True, timeout=60, check=True)
    return {line.rstrip("/").rsplit("/", 1)[-1] for line in r.stdout.splitlines() if line.strip()}


def fs_label(fs: Path) -> str:
    return subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "LABEL", str(fs)], capture_output=True, text=True, timeout=60, check=False
    ).stdout.strip()


# --- the images, inspected -----------------------------------------------------------------


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("board", ["pi4", "x86-64"])
def test_image_has_its_partitions_boot_files_an_enabled_unit_and_no_secrets(images: dict[str, Image], board: str, tmp_path: Path) -> None:
    image = image_for(images, board)
    assert len(image.partitions) == 3, image.partitions
    boot_p, root_p, state_p = image.partitions
    boot = extract(image, 0, tmp_path / "boot.fat")
    root = extract(image, 1, tmp_path / "root.ext4")
    state = extract(image, 2, tmp_path / "state.ext4")
    assert (fs_label(boot), fs_label(root), fs_label(state)) == (BOOT_LABEL[board], ROOT_LABEL[board], "MGSTATE")
    files = fat_list(boot)
    if board == "pi4":
        # The Pi's firmware reads the first partition of an MBR disk: FAT, bootable.
        assert image.label == "dos" and boot_p.type == "c" and boot_p.bootable and root_p.type == state_p.type == "83"
        assert {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "vmlinuz", "initrd.img", "config.txt", "cmdline.txt"} <= files, files
        config = fat_read(boot, "config.txt")
        assert re.search(r"^arm_64bit=1$", config, re.M) and re.search(r"^kernel=vmlinuz$", config, re.M), config
        assert re.search(r"^initramfs initrd\.img followkernel$", config, re.M), config
        assert "root=LABEL=RASPIROOT" in fat_read(boot, "cmdline.txt")
    else:
        assert image.label == "gpt" and boot_p.type.upper() == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        assert {"vmlinuz", "initrd.img"} <= files and "BOOTX64.EFI" in fat_list(boot, "EFI/BOOT")
        entry = fat_read(boot, "loader/entries/mongarsd.conf")
        assert "root=LABEL=MGROOT" in entry and "linux /vmlinuz" in " ".join(entry.split())
    assert "README-mongarsd.txt" in files

    # systemd starts mongarsd and the first-boot step; sshd stays off.
    wants = debugfs(root, "ls -l /etc/systemd/system/multi-user.target.wants")
    for unit in ("mongarsd.service", "mongarsd-firstboot.service", "systemd-networkd.service", "avahi-daemon.service"):
        assert unit in wants, f"{unit} is not enabled:\n{wants}"
    assert "ssh.service" not in wants and "sshd.service" not in debugfs(root, "ls /etc/systemd/system")
    assert "ExecStart=/usr/bin/mongarsd run" in debugfs(root, "cat /usr/lib/systemd/system/mongarsd.service")
    # No password hash, no SSH key (host or authorized), no machine id, no node identity or token.
    shadow = debugfs(root, "cat /etc/shadow")
    assert any(line.startswith("root:") for line in shadow.splitlines()), shadow[:200]
    for line in shadow.splitlines():
        name, hashed = line.split(":")[:2]
        assert hashed in ("*", "!", "!*") or (hashed.startswith("!") and len(hashed) <= 2), f"{name} has a password hash"
    assert "ssh_host_" not in debugfs(root, "ls /etc/ssh")
    assert "authorized_keys" not in debugfs(root, "ls /root") + debugfs(root, "ls /root/.ssh")
    assert debugfs(root, "cat /etc/machine-id").strip() == ""
    for fs in (root, state):
        listing = debugfs(fs, "ls /var/lib/mongarsd" if fs is root else "ls /")
        assert "admin.token" not in listing and "identity" not in listing, listing
    # The state partition holds the default models, owned by the daemon's user.
    manifest = json.loads(debugfs(state, "cat /models/manifest.json"))
    assert manifest, "the models' manifest is empty"
    uid = next(line.split(":")[2] for line in debugfs(root, "cat /etc/passwd").splitlines() if line.startswith("mongarsd:"))
    assert re.search(rf"User:\s+{uid}\b", debugfs(state, "stat /models")), "the models are not the daemon's"
    assert "LABEL=MGSTATE" in debugfs(root, "cat /etc/fstab")


# --- the images, booted -------------------------------------------------------------------

INSIDE = r"""
echo "active=$(systemctl is-active mongarsd.service)"
echo "ssh_enabled=$(systemctl is-enabled ssh.service)"
echo "token=$(stat -c '%a %U' /var/lib/mongarsd/admin.token)"
echo "state=$(findmnt -n -o TARGET,FSTYPE,LABEL /var/lib/mongarsd)"
echo "root=$(passwd -S root)"
echo "password_auth=$(sshd -T 2>/dev/null | grep -i '^passwordauthentication')"
echo "hostname=$(hostname)"
echo "mdns=$(getent hosts "$(hostname).local")"
echo "boot=$(ls /boot/firmware /boot/efi 2>/dev/null | tr '\n' ' ')"
"""


def inside(board: str, key: Path, port: int) -> dict[str, str]:
    """Run INSIDE on the booted board over SSH (retried while sshd comes up); its key=value lines."""
    cmd = ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=30"]
    cmd += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1", INSIDE]
    last = ""
    for _ in range(20):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        if r.returncode == 0:
            return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        last = r.stderr.strip()
        time.sleep(6)
    pytest.fail(f"no SSH into the {board} board with the dropped key: {last}")


def http(method: str, url: str, token: str | None = None, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][-160:] if lines else ""


@pytest.mark.timeout(BUILD_TIMEOUT_S + 1800)
@pytest.mark.parametrize("board", ["x86-64", "pi4"])
def test_image_boots_to_a_ready_daemon_that_needs_the_first_boot_token(images: dict[str, Image], board: str, tmp_path: Path) -> None:
    boot = [b.strip() for b in os.environ.get("MONGARSD_IMAGE_BOOT", "x86-64,pi4").split(",")]
    if board not in boot:
        pytest.skip(f"MONGARSD_IMAGE_BOOT={','.join(boot)} leaves out the {board} boot (make test-image boots both)")
    image = image_for(images, board)
    tool = "qemu-system-x86_64" if board == "x86-64" else "qemu-system-aarch64"
    if shutil.which(tool) is None:
        subprocess.run([str(REPO / "images" / "host-tools.sh"), board, "--boot"], check=True, timeout=900)
    # A copy of the image with an SSH key dropped on its boot partition, as a user would.
    disk = tmp_path / image.path.name
    subprocess.run(["cp", "--sparse=always", str(image.path), str(disk)], check=True, timeout=300)
    for suffix in (".vmlinuz", ".initrd.img"):
        side = image.path.with_suffix(suffix)
        if side.exists():
            disk.with_suffix(suffix).symlink_to(side)
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
    boot_at = f"{disk}@@{image.partitions[0].start}"
    subprocess.run(["mcopy", "-i", boot_at, str(key) + ".pub", "::authorized_keys"], check=True, timeout=60)
    port, ssh_port = free_port(), free_port()
    serial = tmp_path / "console.log"
    base = f"http://127.0.0.1:{port}"
    cmd = [str(REPO / "images" / "run-qemu.sh"), "--board", board, "--image", str(disk), "--port", str(port), "--ssh-port", str(ssh_port)]
    cmd += ["--serial", str(serial)]
    say(f"booting the {board} image under QEMU (TCG): {' '.join(cmd[1:])}")
    started = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as qemu:
        try:
            deadline = started + BOOT_TIMEOUT_S[board]
            next_report = started + 30
            ready = False
            while time.monotonic() < deadline:
                if qemu.poll() is not None:
                    out = qemu.stdout.read() if qemu.stdout else ""
                    pytest.fail(f"QEMU exited with {qemu.returncode}: {out}\nconsole tail:\n{serial.read_text(errors='replace')[-3000:]}")
                try:
                    status, _ = http("GET", base + "/ready", timeout=5)
                    ready = status == 200
                except (OSError, ValueError):
                    ready = False
                if ready:
                    break
                if time.monotonic() >= next_report:
                    say(f"{board}: {time.monotonic() - started:.0f} s, console: {last_line(serial)}")
                    next_report += 30
                time.sleep(3)
            console = serial.read_text(errors="replace")
            assert ready, f"no ready daemon after {BOOT_TIMEOUT_S[board]:.0f} s; console tail:\n{console[-4000:]}"
            say(f"{board}: ready after {time.monotonic() - started:.0f} s")
            # The first boot ran before the daemon, under systemd, and printed the token on the console.
            assert re.search(r"Finished .*mongarsd-firstboo", ANSI.sub("", console)), console[-4000:]
            found = TOKEN_RE.search(console)
            assert found, f"the first boot printed no admin token on the console:\n{console[-4000:]}"
            token = found.group(1)
            assert re.search(r"mongarsd on mongarsd-[0-9a-f]{4}:", console), "the board did not take its own hostname"

            status, doc = http("GET", base + "/v1/models")
            assert status == 401, (status, doc)
            status, doc = http("GET", base + "/v1/models", "mgs_not-a-real-token")
            assert status == 401, (status, doc)
            status, doc = http("GET", base + "/v1/models", token)
            assert status == 200 and doc["data"], doc
            model = doc["data"][0]["id"]
            # Real systemd runs it: a unit's invocation, the notify socket (READY=1) and the watchdog.
            status, doc = http("GET", base + "/api/v1/status", token)
            assert status == 200 and doc["ready"] is True and doc["you"]["role"] == "admin", doc
            assert doc["process"]["service_manager"] == "systemd" and doc["process"]["watchdog_s"] == 30.0, doc["process"]
            chat = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0}
            status, doc = http("POST", base + "/v1/chat/completions", None, chat)
            assert status == 401, (status, doc)
            t0 = time.monotonic()
            status, doc = http("POST", base + "/v1/chat/completions", token, chat, timeout=600)
            assert status == 200, (status, doc)
            content = doc["choices"][0]["message"]["content"]
            assert isinstance(content, str) and content.strip() and doc["usage"]["completion_tokens"] >= 1, doc
            say(f"{board}: chat answered in {time.monotonic() - t0:.1f} s: {content!r}")

            # Inside, over the SSH the dropped key turned on: the state, the token's mode, mDNS.
            facts = inside(board, key, ssh_port)
            assert facts["active"] == "active" and facts["ssh_enabled"] == "enabled", facts
            assert facts["token"] == "600 mongarsd", facts
            assert facts["state"].split() == ["/var/lib/mongarsd", "ext4", "MGSTATE"], facts
            assert facts["root"].split()[:2] == ["root", "L"], facts  # locked: no password to log in with
            assert facts["password_auth"] == "passwordauthentication no", facts
            assert facts["hostname"].startswith("mongarsd-") and facts["mdns"].split()[-1] == facts["hostname"] + ".local", facts
            assert "authorized_keys.installed" in facts["boot"], facts
        finally:
            qemu.terminate()
            try:
                qemu.wait(timeout=30)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait(timeout=30)
