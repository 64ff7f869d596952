"""Print the pinned requirements of a bundle: setup.py's install_requires at the versions in VENV.

Usage: VENV/bin/python packaging/dist/requirements.py  (one `name==version` per line)

llama-cpp-python itself is left out (its run-time requirements are in): the bundle carries only
its Python package (pure Python over ctypes) and llama.cpp built by native/build-lib.sh.
PyInstaller is added, pinned.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = {"llama-cpp-python"}
# The freezer, pinned here (the venv does not need it): 6.22.3 ships Linux x86_64 and aarch64 bootloaders.
FREEZER = ("pyinstaller==6.22.3", "pyinstaller-hooks-contrib==2026.9")


def install_requires() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires" and isinstance(node.value, ast.List):
            return [str(ast.literal_eval(e)) for e in node.value.elts]
    raise SystemExit("setup.py has no install_requires list")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0]


def main() -> int:
    names = [_name(r) for r in install_requires()]
    # llama-cpp-python's own run-time requirements (not its extras) travel with its Python package.
    names += [_name(r) for r in md.requires("llama-cpp-python") or [] if "extra ==" not in r]
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        key = name.lower().replace("_", "-")
        if key in SKIP or key in seen:
            continue
        seen.add(key)
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            print(f"requirements.py: {name} is not installed in this venv (make install, or pip install {name})", file=sys.stderr)
            return 1
    print("\n".join([*out, *FREEZER]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
