"""Pack a one-folder build behind stub.sh into one self-extracting executable.

Usage: python packaging/dist/pack.py --folder DIR --stub stub.sh --version V --arch A --key K --out FILE

The archive is a gzip'd tar of the folder (sorted, owner 0, fixed mtimes: the same folder
gives the same bytes); the stub finds it by byte offset (`tail -c +OFFSET`).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tarfile
from pathlib import Path


def _reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def stub_text(template: str, *, version: str, arch: str, key: str) -> bytes:
    """Fill the stub; OFFSET is the 1-based byte where the archive starts (a fixed point)."""
    text = template.replace("@VERSION@", version).replace("@ARCH@", arch).replace("@KEY@", key)
    offset = 0
    for _ in range(5):
        data = text.replace("@OFFSET@", str(offset)).encode()
        if len(data) + 1 == offset:
            return data
        offset = len(data) + 1
    raise SystemExit("pack.py: the stub's offset did not settle")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--stub", type=Path, required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not (args.folder / "mongarsd").is_file():
        raise SystemExit(f"pack.py: {args.folder} has no mongarsd executable")
    head = stub_text(args.stub.read_text(encoding="utf-8"), version=args.version, arch=args.arch, key=args.key)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(head)
        # gzip level 6: a Pi unpacks it in seconds; the size differs little from 9.
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            for path in sorted(args.folder.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(args.folder)), recursive=False, filter=_reset)
    os.chmod(tmp, 0o755)
    shutil.move(tmp, args.out)
    print(f"pack: {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
