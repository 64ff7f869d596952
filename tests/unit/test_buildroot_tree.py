"""Structure and conventions of the Buildroot external tree in buildroot/, checked in CI.

Buildroot's own `utils/check-package` is run by hand from a Buildroot checkout (buildroot/README.md):
Buildroot's code is on no package registry and is not committed here, so CI cannot run it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TREE = REPO / "buildroot"
NAME = "MONGARSD"
EXT_PATH = f"$(BR2_EXTERNAL_{NAME}_PATH)"
PKG_DIR = TREE / "package"
PACKAGES = sorted(p.name for p in PKG_DIR.iterdir() if p.is_dir())
DEFCONFIGS = sorted(p.name for p in (TREE / "configs").glob("*_defconfig"))
BOARDS = ("raspberrypi4_64", "raspberrypi5", "pc_x86_64_efi")
ALL_FILES = sorted(p for p in TREE.rglob("*") if p.is_file())
SCRIPTS = sorted(str(p.relative_to(TREE)) for p in ALL_FILES if p.read_bytes().startswith(b"#!"))
HASH_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
KINDS = {"generic", "autotools", "cmake", "meson", "python", "cargo", "golang", "perl", "luarocks", "kconfig", "waf", "qmake", "virtual"}
EVAL_RE = re.compile(r"\$\(eval \$\((host-)?([a-z0-9-]+)-package\)\)")
VAR_RE = re.compile(r"(?:define\s+([A-Za-z0-9_]+)|([A-Za-z0-9_]+)\s*([+:?]?=)\s*(.*))")
# A development machine's paths; /root/.ssh is the board's own root home (authorized_keys).
DEV_PATH_RE = re.compile(r"(?<![\w.)}-])/(?:work|tmp|home)/|(?<![\w.)}-])/root/(?!\.ssh\b)")


def upper(pkg: str) -> str:
    return pkg.upper().replace("-", "_")


def mk_top_level(text: str) -> list[str]:
    """Top-level logical lines of a .mk: continuations joined; comments and define bodies dropped."""
    out: list[str] = []
    pending, in_define = "", False
    for raw in text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if in_define:
            in_define = not line.startswith("endef")
        elif line.strip() and not line.startswith("#"):
            out.append(line)
            in_define = line.startswith("define ")
    return out


def mk_vars(text: str) -> dict[str, str]:
    """Top-level variables of a .mk (`+=` appends), `define` names with an empty value."""
    values: dict[str, str] = {}
    for line in mk_top_level(text):
        if m := VAR_RE.fullmatch(line):
            name = m[1] or m[2]
            values[name] = f"{values.get(name, '')} {m[4]}".strip() if m[3] == "+=" else (m[4] or "").strip()
    return values


def evals(text: str) -> list[tuple[bool, str]]:
    """(is host, kind) of each `$(eval $(...-package))` line."""
    return [(bool(m[1]), m[2]) for line in mk_top_level(text) if (m := EVAL_RE.fullmatch(line.strip()))]


def read(pkg: str, name: str) -> str:
    return (PKG_DIR / pkg / name).read_text()


def host_only(pkg: str) -> bool:
    return all(host for host, _ in evals(read(pkg, f"{pkg}.mk")))


PKG_SYMBOLS = [f"BR2_PACKAGE_{upper(p)}" for p in PACKAGES]
CONFIG_INS = sorted(str(f.relative_to(TREE)) for f in PKG_DIR.glob("*/Config.in"))
DEFINED = set(re.findall(r"^(?:menu)?config\s+(\w+)", "\n".join((TREE / f).read_text() for f in CONFIG_INS), re.M))


def tree_symbol(sym: str) -> bool:
    """A symbol of this tree's packages (or one of their options); others are Buildroot's."""
    return any(sym == s or sym.startswith(s + "_") for s in PKG_SYMBOLS)


def mk_problems(pkg: str, text: str) -> list[str]:
    up, problems = upper(pkg), []
    if text.splitlines()[:6] != ["#" * 80, "#", f"# {pkg}", "#", "#" * 80, ""]:
        problems.append(f"no 80-column ##### header block naming {pkg}, then a blank line")
    kinds, lines, values = evals(text), mk_top_level(text), mk_vars(text)
    if not kinds or not lines or not EVAL_RE.fullmatch(lines[-1]):
        problems.append("does not end with a $(eval $(...-package)) line")
    if len({k for _, k in kinds}) > 1 or not {k for _, k in kinds} <= KINDS:
        problems.append(f"package infrastructures mixed or unknown: {kinds}")
    prefixes = (f"{up}_", f"HOST_{up}_") if any(host for host, _ in kinds) else (f"{up}_",)
    problems += [f"variable {v} does not start with {' or '.join(prefixes)}" for v in values if not v.startswith(prefixes)]
    if not values.get(f"{up}_VERSION"):
        problems.append(f"no {up}_VERSION")
    if any(k == "python" for _, k in kinds) and not values.get(f"{up}_SETUP_TYPE"):
        problems.append(f"python package without {up}_SETUP_TYPE")
    return problems


def config_problems(pkg: str, text: str) -> list[str]:
    sym, lines, problems = f"BR2_PACKAGE_{upper(pkg)}", text.splitlines(), []
    if lines[:2] != [f"config {sym}", f'\tbool "{pkg}"']:
        problems.append(f'does not start with "config {sym}" then a tab and bool "{pkg}"')
    in_help = False
    for n, line in enumerate(lines, 1):
        if in_help and line.strip() and not line.startswith("\t  "):
            if line[0].isspace():
                problems.append(f"line {n}: help text not indented with a tab and two spaces: {line!r}")
            else:
                in_help = False  # a new entry at column 0 ends the help text
        in_help = in_help or line == "\thelp"
    if "\thelp" not in lines:
        problems.append("no help section")
    for line in text.replace("\\\n", " ").splitlines():
        if re.match(r"\s*(select|depends on|imply|default|if)\s", line):
            refs = re.findall(r"BR2_PACKAGE_\w+", line.split("#")[0])
            problems += [f"{ref} is of this tree but defined nowhere in it" for ref in refs if tree_symbol(ref) and ref not in DEFINED]
    return problems


def hash_problems(pkg: str, text: str) -> list[str]:
    problems, hashed = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\w+)  ([0-9a-f]+)  (\S+)", line)
        if not m:
            problems.append(f"line {n}: not '<algo>  <hex>  <file>' with two spaces: {line!r}")
        elif HASH_LEN.get(m[1]) != len(m[2]):
            problems.append(f"line {n}: {m[1]} is not one of {sorted(HASH_LEN)} or its hash has the wrong length")
        else:
            hashed.add(m[3])
    license_files = mk_vars(read(pkg, f"{pkg}.mk")).get(f"{upper(pkg)}_LICENSE_FILES", "").split()
    return problems + [f"no hash line for license file {f}" for f in license_files if f not in hashed]


CHECKERS: dict[str, Callable[[str, str], list[str]]] = {".mk": mk_problems, "Config.in": config_problems, ".hash": hash_problems}


def test_external_desc_and_mk() -> None:
    desc = (TREE / "external.desc").read_text()
    name = re.search(r"^name:\s*(\S+)\s*$", desc, re.M)
    assert name and re.fullmatch(r"[A-Z][A-Z0-9_]*", name[1]) and name[1] == NAME, desc
    assert re.search(r"^desc:\s*\S", desc, re.M), desc
    mk = (TREE / "external.mk").read_text()
    assert re.search(rf"^include .*\$\(wildcard {re.escape(EXT_PATH)}/package/\*/\*\.mk\)", mk, re.M), mk


def test_top_config_sources_every_package_config() -> None:
    sourced = re.findall(r'^\s*source\s+"([^"]*)"', (TREE / "Config.in").read_text(), re.M)
    prefix = f"$BR2_EXTERNAL_{NAME}_PATH/"
    assert all(s.startswith(prefix) for s in sourced), sourced
    rel = [s.removeprefix(prefix) for s in sourced]
    assert [r for r in rel if not (TREE / r).is_file()] == [], "sources a file that does not exist"
    assert rel == CONFIG_INS, "one source per package Config.in, sorted"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_package_files(pkg: str) -> None:
    d = PKG_DIR / pkg
    assert (d / f"{pkg}.mk").is_file() and (d / f"{pkg}.hash").is_file()
    # Host-only packages (every eval a host-...-package) have no menu entry; all others have one.
    assert (d / "Config.in").is_file() != host_only(pkg), "a Config.in exactly when not host only"


PKG_FILES = [f"{p}/{n}" for p in PACKAGES for n in (f"{p}.mk", "Config.in", f"{p}.hash") if (PKG_DIR / p / n).is_file()]


@pytest.mark.parametrize("file", PKG_FILES)
def test_package_conventions(file: str) -> None:
    pkg, name = file.split("/")
    problems = CHECKERS[name.removeprefix(pkg)](pkg, read(pkg, name))
    assert not problems, "\n".join(problems)


# Each check can fail: a mutation of mongarsd's own files, and the problem it must report.
MUTATIONS = [
    (".mk", "# mongarsd\n", "# mongars\n", "header"),
    (".mk", "MONGARSD_LICENSE =", "LICENSE =", "variable LICENSE"),
    (".mk", "MONGARSD_DEPENDENCIES", "HOST_MONGARSD_DEPENDENCIES", "variable HOST_"),
    (".mk", "MONGARSD_VERSION", "MONGARSD_RELEASE", "no MONGARSD_VERSION"),
    (".mk", "MONGARSD_SETUP_TYPE", "MONGARSD_SETUP", "without MONGARSD_SETUP_TYPE"),
    (".mk", "$(python-package)", "$(pyton-package)", "unknown"),
    (".mk", "$(eval $(python-package))", "", "does not end with"),
    ("Config.in", '\tbool "mongarsd"', '\tbool "mongars"', "does not start"),
    ("Config.in", "\t  mongarsd: a private", "\t mongarsd: a private", "not indented"),
    ("Config.in", "\tselect BR2_PACKAGE_PYTHON_PYPDF ", "\tselect BR2_PACKAGE_PYTHON_PYPDF_X ", "defined nowhere"),
    (".hash", "  packaging/", " packaging/", "two spaces"),
    (".hash", "sha256  9728a1", "sha512  9728a1", "wrong length"),
    (".hash", "  packaging/deb/copyright", "  copyright", "no hash line"),
]


@pytest.mark.parametrize(("kind", "old", "new", "expected"), MUTATIONS, ids=[f"{m[0]}:{m[3]}" for m in MUTATIONS])
def test_checks_can_fail(kind: str, old: str, new: str, expected: str) -> None:
    text = read("mongarsd", kind if kind == "Config.in" else "mongarsd" + kind)
    assert old in text
    assert any(expected in p for p in CHECKERS[kind]("mongarsd", text.replace(old, new)))


@pytest.mark.parametrize("pkg", [p for p in PACKAGES if mk_vars(read(p, f"{p}.mk")).get(f"{upper(p)}_SITE_METHOD") == "local"])
def test_local_package_license_hash_matches_checkout(pkg: str) -> None:
    values = mk_vars(read(pkg, f"{pkg}.mk"))
    site = Path(values[f"{upper(pkg)}_SITE"].replace(EXT_PATH, str(TREE)))
    hashes = {m[2]: m[1] for m in re.finditer(r"^sha256  ([0-9a-f]{64})  (\S+)$", read(pkg, f"{pkg}.hash"), re.M)}
    for lic in values[f"{upper(pkg)}_LICENSE_FILES"].split():
        actual = hashlib.sha256((site / lic).read_bytes()).hexdigest()
        assert hashes.get(lic) == actual, f"{lic} changed: update its line in {pkg}.hash to sha256  {actual}  {lic}"


@pytest.mark.parametrize("board", BOARDS)
def test_board_has_a_defconfig(board: str) -> None:
    assert f"{board}_{NAME.lower()}_defconfig" in DEFCONFIGS


@pytest.mark.parametrize("defconfig", DEFCONFIGS)
def test_defconfig(defconfig: str) -> None:
    text = (TREE / "configs" / defconfig).read_text()
    values = dict(re.findall(r"^(BR2_\w+)=(.*)$", text, re.M))
    problems = [f"{key} is not =y" for key in (f"BR2_PACKAGE_{NAME}", "BR2_INIT_SYSTEMD") if values.get(key) != "y"]
    if EXT_PATH not in values.get("BR2_ROOTFS_OVERLAY", ""):
        problems.append(f"no BR2_ROOTFS_OVERLAY in {EXT_PATH}")
    if values.get("BR2_ROOTFS_POST_IMAGE_SCRIPT", '""') == '""':
        problems.append("no BR2_ROOTFS_POST_IMAGE_SCRIPT")
    if values.get("BR2_TARGET_GENERIC_ROOT_PASSWD", '""') != '""':
        problems.append("BR2_TARGET_GENERIC_ROOT_PASSWD is set: no secret in the image")
    paths = re.findall(rf"{re.escape(EXT_PATH)}/([^\s\"]+)", text)
    problems += [f"{EXT_PATH}/{rel} does not exist" for rel in paths if not (TREE / rel).exists()]
    problems += [f"{key} is of this tree but defined nowhere in it" for key in values if tree_symbol(key) and key not in DEFINED]
    # post-image.sh takes the board's folder under board/mongarsd/ as its argument.
    board = values.get("BR2_ROOTFS_POST_SCRIPT_ARGS", '""').strip('"').split()
    if board and not (TREE / "board" / NAME.lower() / board[0]).is_dir():
        problems.append(f"BR2_ROOTFS_POST_SCRIPT_ARGS: no board/{NAME.lower()}/{board[0]}")
    assert not problems, "\n".join(problems)


def test_no_development_machine_paths() -> None:
    hits = [
        f"{path.relative_to(TREE)}:{n}: {line.strip()}"
        for path in ALL_FILES
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if DEV_PATH_RE.search(line)
    ]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_script(script: str) -> None:
    path = TREE / script
    assert os.access(path, os.X_OK), "not executable"
    shebang = path.read_text().splitlines()[0]
    shell = "bash" if re.search(r"\bbash\b", shebang) else "sh" if re.search(r"[/ ]sh\b", shebang) else None
    if shell is None:
        return  # another interpreter: only the executable bit is checked
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell} here")
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_llama_package_applies_every_patch_the_other_builds_apply() -> None:
    """buildroot's llama-cpp-python links to native/patches/: the same patches as the wheel and tools."""
    pkg = PKG_DIR / "python-llama-cpp"
    version = re.search(r"^PYTHON_LLAMA_CPP_VERSION\s*=\s*(\S+)", (pkg / "python-llama-cpp.mk").read_text(), re.M)
    assert version, "python-llama-cpp.mk names no version"
    native = REPO / "native" / "patches" / f"llama-cpp-python-{version.group(1)}"
    wanted = sorted(p.name for p in native.glob("*.patch"))
    assert wanted, f"no patches in {native}"
    linked = sorted(p.name for p in pkg.glob("*.patch"))
    assert linked == wanted
    for name in linked:
        link = pkg / name
        assert link.is_symlink() and link.resolve() == (native / name).resolve(), f"{name} is not a link to native/patches"
