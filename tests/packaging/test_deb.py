"""The Debian package: its fields and files, lintian, and an install and purge in a clean bookworm root.

The package is built by packaging/deb/build-deb.sh from the real x86-64 folder build (the
`dist_x86_64` fixture builds it, cached), or from the one MONGARSD_TEST_BUNDLE names; the arm64
package from the arm64 build under `make test-dist`. The default config and the maintainer
scripts are checked without a build.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mongarsd import __version__
from mongarsd.config import Config, load_config
from tests.packaging.conftest import DistBuild
from tests.packaging.rootfs import elf_machine, root_tar, run_in, say, unpack

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = REPO / "packaging" / "deb"
BUILD_SCRIPT = DEB_DIR / "build-deb.sh"
SCRIPTS = ("postinst", "prerm", "postrm")
DEB_ARCH = {62: "amd64", 183: "arm64"}  # ELF e_machine
BUILD_TIMEOUT_S = 1200
LINTIAN_TIMEOUT_S = 900
APT_TIMEOUT_S = 900
STATE = "/var/lib/mongarsd"
# The daemon's user, as the package's postinst becomes it.
AS_MONGARSD = ["setpriv", "--reuid=mongarsd", "--regid=mongarsd", "--init-groups", "--reset-env"]


@dataclass(frozen=True)
class Deb:
    path: Path
    arch: str


def host_deb_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def bundle_dir(request: pytest.FixtureRequest) -> Path:
    value = os.environ.get("MONGARSD_TEST_BUNDLE")
    if not value:
        build: DistBuild = request.getfixturevalue("dist_x86_64")
        return build.folder
    path = Path(value)
    if not (path / "mongarsd").is_file() or not (path / "_internal").is_dir():
        pytest.fail(f"MONGARSD_TEST_BUNDLE={path} is not a PyInstaller one-dir build (mongarsd + _internal/)")
    return path


def build_deb(bundle: Path, arch: str, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(BUILD_SCRIPT), "--arch", arch, "--version", __version__, "--bundle", str(bundle), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)


@pytest.fixture(scope="session")
def deb(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Deb:
    arch = DEB_ARCH[elf_machine(bundle_dir / "mongarsd")]
    out = tmp_path_factory.mktemp("deb")
    say(f"building the {arch} .deb from {bundle_dir} (xz of the whole folder: a few minutes)")
    r = build_deb(bundle_dir, arch, out)
    for line in r.stdout.splitlines():
        say(line)
    assert r.returncode == 0, r.stderr[-3000:]
    path = out / f"mongarsd_{__version__}_{arch}.deb"
    assert path.is_file(), f"build-deb.sh made no {path.name}: {sorted(p.name for p in out.iterdir())}"
    return Deb(path=path, arch=arch)


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=300).stdout


# --------------------------------------------------------------------------- no bundle needed


def test_default_config_parses_and_documents_every_default(tmp_path: Path) -> None:
    conf = DEB_DIR / "mongarsd.toml"
    loaded = load_config(config_path=conf, env={}, profiles=tmp_path)
    assert loaded.config.server.state_dir == Path("/var/lib/mongarsd")
    assert loaded.config.server.effective_models_dir == Path("/var/lib/mongarsd/models")
    set_here = {k for k, _, source in loaded.rows() if source.startswith("file:")}
    assert set_here == {"server.state_dir", "server.models_dir"}, "only the paths are set; every other key is a commented default"

    # Uncommented, every `# key = value` line must be a real key holding its built-in default.
    line = re.compile(r"^# ([a-z_]+ = .*?)(?:\s+#.*)?$")
    uncommented = "\n".join(m.group(1) if (m := line.match(text)) else text for text in conf.read_text().splitlines())
    documented = {f"{section}.{key}" for section, keys in tomllib.loads(uncommented).items() for key in keys}
    every = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(Config(), s.name))}
    assert every - documented == set(), "keys missing from packaging/deb/mongarsd.toml"
    full = tmp_path / "uncommented.toml"
    full.write_text(uncommented)
    values = {k: v for k, v, _ in load_config(config_path=full, env={}, profiles=tmp_path).rows()}
    (tmp_path / "empty.toml").write_text("")
    defaults = {k: v for k, v, _ in load_config(config_path=tmp_path / "empty.toml", env={}, profiles=tmp_path).rows()}
    differ = {
        k: (values[k], defaults[k])
        for k in every - set_here
        if values[k] != defaults[k] and defaults[k] is not None  # mesh.enabled: unset by default, an example shown
    }
    assert differ == {}, "commented values in packaging/deb/mongarsd.toml that are not the built-in defaults"


@pytest.mark.parametrize("script", SCRIPTS)
def test_maintainer_script_is_posix_sh(script: str) -> None:
    path = DEB_DIR / script
    assert path.read_text().startswith("#!/bin/sh\n") and os.access(path, os.X_OK)
    r = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    if shutil.which("checkbashisms"):
        r = subprocess.run(["checkbashisms", str(path)], capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not (shutil.which("dpkg-deb") and shutil.which("readelf")), reason="needs dpkg-deb and readelf (dpkg, binutils)")
def test_build_script_refuses_what_is_not_a_one_dir_build(tmp_path: Path) -> None:
    (tmp_path / "mongarsd").write_text("#!/bin/sh\n")
    (tmp_path / "mongarsd").chmod(0o755)
    r = build_deb(tmp_path, "amd64", tmp_path / "out")
    assert r.returncode != 0 and "no _internal/ folder" in r.stderr
    (tmp_path / "_internal").mkdir()
    r = build_deb(tmp_path, "amd64", tmp_path / "out")
    assert r.returncode != 0 and "is not an ELF executable" in r.stderr
    shutil.copy("/bin/true", tmp_path / "mongarsd")  # an ELF of this machine, declared for the other architecture
    other = "arm64" if DEB_ARCH.get(elf_machine(tmp_path / "mongarsd")) == "amd64" else "amd64"
    r = build_deb(tmp_path, other, tmp_path / "out")
    assert r.returncode != 0 and f"not {other}" in r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- the package


@pytest.mark.dist
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_control_fields(deb: Deb) -> None:
    fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", dpkg_deb("-f", str(deb.path)), flags=re.M))
    assert fields["Package"] == "mongarsd"
    assert fields["Version"] == __version__
    assert fields["Architecture"] == deb.arch
    assert fields["Section"] == "net" and fields["Priority"] == "optional"
    assert re.fullmatch(r"[^<>@]+ <[^<>@\s]+@[^<>@\s]+>", fields["Maintainer"]), fields["Maintainer"]
    size_kib = int(fields["Installed-Size"])
    assert size_kib > 10_000, "Installed-Size is in KiB and the folder build is large"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    libc = next(d for d in depends if d.startswith("libc6"))
    assert re.fullmatch(r"libc6 \(>= 2\.(\d+)\)", libc) and int(libc.split(".")[1].rstrip(")")) >= 36, libc
    assert "passwd" in depends
    description = dpkg_deb("-f", str(deb.path), "Description").splitlines()
    assert description[0] and len(description) > 5, "a synopsis and an extended description"
    assert dpkg_deb("-I", str(deb.path), "conffiles").split() == ["/etc/mongarsd/mongarsd.toml"]


@dataclass(frozen=True)
class Entry:
    mode: str
    owner: str
    size: int
    path: str
    target: str | None


def contents(deb: Deb) -> dict[str, Entry]:
    """The package's file list (`dpkg-deb -c`), keyed by absolute path without a trailing slash."""
    entries: dict[str, Entry] = {}
    for line in dpkg_deb("-c", str(deb.path)).splitlines():
        mode, owner, size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        path = "/" + path.removeprefix("./").rstrip("/")
        entries[path] = Entry(mode, owner, int(size), path, target or None)
    return entries


@pytest.mark.dist
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_files_owners_and_modes(deb: Deb) -> None:
    files = contents(deb)
    assert {e.owner for e in files.values()} == {"root/root"}
    writable = [p for p, e in files.items() if e.mode[8] == "w" and not e.mode.startswith("l")]
    assert writable == [], "world-writable entries"
    assert files["/usr/bin/mongarsd"].target == "../lib/mongarsd/mongarsd"
    assert files["/usr/lib/mongarsd/mongarsd"].mode == "-rwxr-xr-x"
    assert files["/usr/lib/mongarsd/_internal"].mode.startswith("d")
    executables = [p for p, e in files.items() if e.mode.startswith("-") and "x" in e.mode]
    assert executables == ["/usr/lib/mongarsd/mongarsd"], "only the executable has the x bit (shared objects need none)"
    for path in (
        "/usr/lib/systemd/system/mongarsd.service",
        "/usr/lib/sysusers.d/mongarsd.conf",
        "/usr/lib/tmpfiles.d/mongarsd.conf",
        "/etc/mongarsd/mongarsd.toml",
        "/usr/share/doc/mongarsd/copyright",
        "/usr/share/doc/mongarsd/README.md",
        "/usr/share/doc/mongarsd/examples/jetson.conf",
        "/usr/share/man/man1/mongarsd.1.gz",
        "/usr/share/lintian/overrides/mongarsd",
    ):
        assert files[path].mode == "-rw-r--r--", (path, files[path].mode)
    changelog = "changelog.Debian.gz" if "-" in __version__ else "changelog.gz"
    assert f"/usr/share/doc/mongarsd/{changelog}" in files
    assert not [p for p in files if p.startswith("/var/")], "the state dir is made by postinst, never shipped"


@pytest.mark.dist
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_packaged_maintainer_scripts_are_valid_sh(deb: Deb, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb.path), str(tmp_path / "DEBIAN")], check=True, timeout=120)
    for script in SCRIPTS:
        path = tmp_path / "DEBIAN" / script
        assert path.stat().st_mode & 0o777 == 0o755, script
        r = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, f"{script}: {r.stderr}"
        assert "#DEBHELPER#" not in path.read_text()


def ensure_lintian() -> str:
    if path := shutil.which("lintian"):
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("lintian is missing: apt-get install lintian")
        subprocess.run(["apt-get", "install", "-y", "-q", "lintian"], capture_output=True, timeout=900, check=False)
    if path := shutil.which("lintian"):
        return path
    pytest.skip("lintian is not installed and could not be installed (apt-get install lintian)")


def lintian_tags(path: Path) -> list[str]:
    """lintian's errors and warnings for a .deb (info and overridden tags left out)."""
    lintian = ensure_lintian()
    say(f"lintian {path.name} (about a minute)")
    r = subprocess.run(
        [lintian, "--no-cfg", "--fail-on", "none", "--display-level", ">=warning", str(path)],
        capture_output=True,
        text=True,
        timeout=LINTIAN_TIMEOUT_S,
        check=False,
    )
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    for line in tags:
        say(f"lintian: {line}")
    assert r.returncode == 0, r.stderr[-2000:]
    return tags


@pytest.mark.dist
@pytest.mark.timeout(BUILD_TIMEOUT_S + LINTIAN_TIMEOUT_S)
def test_lintian_reports_no_errors(deb: Deb) -> None:
    assert [t for t in lintian_tags(deb.path) if t.startswith("E:")] == []


@pytest.mark.dist_arm64
@pytest.mark.timeout(3600 + BUILD_TIMEOUT_S + LINTIAN_TIMEOUT_S)
def test_arm64_package_holds_the_arm64_build_and_lintian_reports_no_errors(dist_arm64: DistBuild, tmp_path: Path) -> None:
    r = build_deb(dist_arm64.folder, "arm64", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    path = tmp_path / f"mongarsd_{__version__}_arm64.deb"
    assert dpkg_deb("-f", str(path), "Architecture").strip() == "arm64"
    unpacked = tmp_path / "x"
    subprocess.run(["dpkg-deb", "-x", str(path), str(unpacked)], check=True, timeout=300)
    assert elf_machine(unpacked / "usr" / "lib" / "mongarsd" / "mongarsd") == 183  # AArch64
    assert [t for t in lintian_tags(path) if t.startswith("E:")] == []


# --------------------------------------------------------------------------- install and purge


def passwd_entry(root: Path, name: str) -> list[str] | None:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


def state_files(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Mode, owner and content of the files `mongarsd init` makes."""
    out: dict[str, tuple[int, int, bytes]] = {}
    for rel in ("admin.token", "mesh/identity.key"):
        path = root / STATE.lstrip("/") / rel
        st = path.stat()
        out[rel] = (st.st_mode & 0o777, st.st_uid, path.read_bytes())
    return out


@pytest.fixture
def bookworm_root(deb: Deb, tmp_path: Path) -> Iterator[Path]:
    if deb.arch != host_deb_arch():
        pytest.skip(f"installing the {deb.arch} package needs a {deb.arch} machine (this one is {host_deb_arch()})")
    if os.geteuid() != 0:
        pytest.skip("the install test runs chroot: root only")
    root = unpack(root_tar(deb.arch), tmp_path / "root")
    # apt may need the mirror for a dependency; the root shares this machine's network.
    resolv = root / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    if Path("/etc/resolv.conf").exists():
        shutil.copy("/etc/resolv.conf", resolv)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # a few hundred MB; pytest keeps its last temp dirs


@pytest.mark.dist
@pytest.mark.timeout(BUILD_TIMEOUT_S + 3 * APT_TIMEOUT_S)
def test_install_reinstall_and_purge_in_a_clean_bookworm_root(deb: Deb, bookworm_root: Path, tmp_path: Path) -> None:
    root = bookworm_root
    # /tmp of the root is a fresh tmpfs inside run_in; the package goes through a bind instead.
    pkg_dir = tmp_path / "pkg"
    pkg_dir.mkdir()
    shutil.copy(deb.path, pkg_dir / deb.path.name)
    assert not (root / "usr" / "lib" / "systemd" / "systemd").exists(), "the minimal root has no systemd: the fallbacks run"

    def in_root(argv: list[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        say(what)
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        r = run_in(root, argv, timeout=kw.pop("timeout", APT_TIMEOUT_S), env=env, binds={pkg_dir: "/srv/pkg"})
        if kw.pop("ok", True):
            assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", f"/srv/pkg/{deb.path.name}"]
    r = in_root(install, f"apt-get install ./{deb.path.name} in a clean bookworm root", ok=False)
    if r.returncode != 0 and re.search(r"unmet dependencies|Unable to locate|Unable to correct", r.stdout + r.stderr):
        in_root(["apt-get", "update", "-q"], "apt-get update: a dependency is missing from the minimal root")
        r = in_root(install, "apt-get install again")
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    said = r.stdout + r.stderr

    # The user, its directories, the enabled unit.
    user = passwd_entry(root, "mongarsd")
    assert user is not None, "no mongarsd user in /etc/passwd"
    uid = int(user[2])
    assert uid < 1000 and user[5] == STATE and user[6].endswith("nologin"), user
    assert any(line.startswith("mongarsd:") for line in (root / "etc" / "group").read_text().splitlines())
    state = root / STATE.lstrip("/")
    assert (state.stat().st_mode & 0o777, state.stat().st_uid) == (0o750, uid)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "mongarsd.service"
    assert wants.is_symlink() and os.readlink(wants).endswith("/systemd/system/mongarsd.service"), "the unit is not enabled"

    # The first-start step ran as mongarsd: identity and token, 0600, the token's path said, never the secret.
    files = state_files(root)
    assert {rel: (mode, owner) for rel, (mode, owner, _) in files.items()} == {
        "admin.token": (0o600, uid),
        "mesh/identity.key": (0o600, uid),
    }
    secret = files["admin.token"][2].decode().strip()
    assert secret.startswith("mgs_") and secret not in said
    assert f"{STATE}/admin.token" in said, said[-2000:]
    listed = in_root([*AS_MONGARSD, "mongarsd", "token", "list", "--state-dir", STATE], "mongarsd token list (as mongarsd)")
    token_id = secret.split("_")[1]
    assert re.search(rf"^{token_id}\s+admin\s+admin\s+live", listed.stdout, flags=re.M), listed.stdout

    # The command works in the root, with the packaged config.
    version = in_root(["/usr/bin/mongarsd", "version"], "/usr/bin/mongarsd version")
    assert version.stdout.strip() == f"mongarsd {__version__}"
    shown = in_root(["mongarsd", "config", "show", "--config", "/etc/mongarsd/mongarsd.toml"], "mongarsd config show")
    assert re.search(r'^server\.state_dir\s+= "/var/lib/mongarsd"\s+# file:/etc/mongarsd/mongarsd\.toml', shown.stdout, flags=re.M)

    # Installing again changes nothing: same identity, same token.
    again = in_root([*install[:3], "--reinstall", *install[3:]], "apt-get install --reinstall: the first-start step is idempotent")
    assert "nothing changed" in again.stdout, again.stdout[-2000:]
    assert state_files(root) == files

    # Purge: the package, its state, its config and the enablement go; the system user stays (Debian practice).
    in_root(["apt-get", "purge", "-y", "-q", "mongarsd"], "apt-get purge mongarsd")
    status = in_root(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "mongarsd"], "dpkg-query", ok=False)
    assert status.returncode != 0 or status.stdout.strip() in ("", "un", "pn"), status.stdout
    for gone in ("usr/lib/mongarsd", "usr/bin/mongarsd", STATE.lstrip("/"), "etc/mongarsd", "usr/lib/systemd/system/mongarsd.service"):
        assert not os.path.lexists(root / gone), f"/{gone} survived the purge"
    assert not os.path.lexists(wants)
    assert passwd_entry(root, "mongarsd") is not None
