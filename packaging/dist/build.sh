#!/usr/bin/env bash
# Build mongarsd for one architecture as a folder (PyInstaller one-dir) and as one executable.
#
# Usage (as root: it runs chroot): packaging/dist/build.sh x86_64|arm64
#
#  1. llama.cpp, portable variants only (native/build-lib.sh; arm64 is cross-compiled);
#  2. the target's wheels, downloaded on this machine (pip download --platform);
#  3. a Debian bookworm root of the target architecture (mmdebstrap; an arm64 one runs under
#     qemu-user) with a venv of those wheels, and PyInstaller run inside it;
#  4. the llama.cpp variants put into the folder; the folder packed behind a small sh stub.
#
# Output: build/dist/<arch>/mongarsd/           the folder (the .deb installs it as is)
#         dist/mongarsd-<version>-linux-<arch>  the single executable
# Cache:  $MONGARSD_BUILD_CACHE (default ~/.cache/mongarsd-build): roots, wheels, libraries
#         and finished folders, keyed by their inputs; a clean clone reuses them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
CACHE="${MONGARSD_BUILD_CACHE:-$HOME/.cache/mongarsd-build}"
SUITE=bookworm
# Bump when the recipe changes in a way the input hashes do not see.
RECIPE=3

die() { echo "dist: $*" >&2; exit 1; }
[ $# = 1 ] || die "usage: packaging/dist/build.sh x86_64|arm64"
ARCH="$1"
case "$ARCH" in
    x86_64|amd64) ARCH=x86_64; DEBARCH=amd64; MACHINE=x86_64; VARIANTS=(x86-64-v4-vnni x86-64-v4 x86-64-v3 x86-64-v2) ;;
    arm64|aarch64) ARCH=arm64; DEBARCH=arm64; MACHINE=aarch64; VARIANTS=(armv8.2-a+dotprod armv8-a) ;;
    *) die "unknown architecture $ARCH (x86_64 or arm64)" ;;
esac
say() { echo "dist[$ARCH]: $*"; }
[ "$(id -u)" = 0 ] || die "needs root (it builds inside a chroot of the target architecture)"
[ -x "$PY" ] || die "no venv at $VENV (run make install first)"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/mongarsd/__init__.py")"
[ -n "$VERSION" ] || die "cannot read the version from mongarsd/__init__.py"
started=$SECONDS

# ---------------------------------------------------------------- 1. llama.cpp variants
"$HERE/host-tools.sh" "$ARCH"
for v in "${VARIANTS[@]}"; do
    "$REPO/native/build-lib.sh" "$ARCH" "$v"
done

# ---------------------------------------------------------------- 2. wheels
REQ="$CACHE/wheels/requirements-$MACHINE.txt"
mkdir -p "$CACHE/wheels/$MACHINE"
"$PY" "$HERE/requirements.py" >"$REQ.new"
if ! cmp -s "$REQ.new" "$REQ" || [ ! -f "$CACHE/wheels/$MACHINE/.complete" ]; then
    say "downloading the $MACHINE wheels ($(wc -l <"$REQ.new") requirements)"
    platforms=()
    for t in manylinux_2_36 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
             manylinux_2_24 manylinux_2_17 manylinux2014; do
        platforms+=(--platform "${t}_$MACHINE")
    done
    rm -f "$CACHE/wheels/$MACHINE/.complete"
    "$PY" -m pip download --quiet --progress-bar off -d "$CACHE/wheels/$MACHINE" "${platforms[@]}" --platform any \
        --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none --only-binary=:all: -r "$REQ.new" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$CACHE/wheels/$MACHINE/.complete"
fi
mv "$REQ.new" "$REQ"
REQ_KEY="$(sha256sum "$REQ" | cut -c1-12)"

# ---------------------------------------------------------------- 3. build root + venv
# PyInstaller needs the shared libpython (Debian ships it apart) and binutils.
BUILD_PACKAGES=python3,python3-venv,libpython3.11,binutils
BASE_TAR="$CACHE/roots/$SUITE-$DEBARCH-pybuild-$(echo "$BUILD_PACKAGES" | sha256sum | cut -c1-8).tar"
if [ ! -f "$BASE_TAR" ]; then
    say "building a $SUITE $DEBARCH root with python3 (mmdebstrap, a few minutes under qemu-user)"
    mkdir -p "$CACHE/roots"
    mmdebstrap --quiet --variant=minbase --architectures="$DEBARCH" --include="$BUILD_PACKAGES" \
        "$SUITE" "$BASE_TAR.tmp.tar"
    mv "$BASE_TAR.tmp.tar" "$BASE_TAR"
fi

WORK="$REPO/build/dist/$ARCH/work"
ROOT="$WORK/root"
chroot_run() {
    # A private mount namespace: /proc, /dev and /tmp exist inside, and vanish with the command.
    unshare --mount --propagation private --fork sh -ec '
        root="$1"; shift
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount -t tmpfs tmpfs "$root/tmp"
        exec chroot "$root" /usr/bin/env -i PATH=/opt/build/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
    ' sh "$ROOT" "$@"
}
fresh_root() {
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    tar -xf "$1" -C "$ROOT"
}

VENV_TAR="$CACHE/roots/$SUITE-$DEBARCH-venv-$REQ_KEY-$(basename "$BASE_TAR" .tar | rev | cut -d- -f1 | rev).tar"
if [ ! -f "$VENV_TAR" ]; then
    say "installing the wheels into a venv inside the $DEBARCH root"
    fresh_root "$BASE_TAR"
    mkdir -p "$ROOT/wheels"
    cp "$CACHE/wheels/$MACHINE/"*.whl "$ROOT/wheels/"
    cp "$REQ" "$ROOT/wheels/requirements.txt"
    chroot_run python3 -m venv /opt/build
    chroot_run /opt/build/bin/pip install --quiet --no-index --find-links /wheels -r /wheels/requirements.txt
    rm -rf "$ROOT/wheels"
    tar -cf "$VENV_TAR.tmp.tar" -C "$ROOT" .
    mv "$VENV_TAR.tmp.tar" "$VENV_TAR"
    # Older venv roots of this architecture are superseded.
    find "$CACHE/roots" -name "$SUITE-$DEBARCH-venv-*.tar" ! -name "$(basename "$VENV_TAR")" -delete
fi

# ---------------------------------------------------------------- 4. the folder
SITE="$("$PY" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))' 2>/dev/null)" \
    || die "llama_cpp is not importable from $VENV"
src_hash() {
    (
        cd "$REPO"
        find mongarsd configs packaging/dist -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
        find "$SITE" -name '*.py' -print0 | sort -z | xargs -0 sha256sum | sed "s#$SITE##"
        echo "recipe=$RECIPE req=$REQ_KEY"
    ) | sha256sum | cut -c1-16
}
FROZEN_KEY="$(src_hash)"
FROZEN="$CACHE/frozen/$ARCH-$FROZEN_KEY"
OUT="$REPO/build/dist/$ARCH/mongarsd"
if [ -f "$FROZEN/.complete" ]; then
    say "frozen Python up to date (cache $FROZEN_KEY)"
else
    say "freezing mongarsd with PyInstaller inside the $DEBARCH root (minutes; longer under qemu-user)"
    fresh_root "$VENV_TAR"
    SP="$(echo "$ROOT"/opt/build/lib/python3*/site-packages)"
    mkdir -p "$SP/llama_cpp"
    # llama-cpp-python's Python package only: its lib/ is this machine's native build.
    (cd "$SITE" && find . -name '*.py' -print0 | xargs -0 cp --parents -t "$SP/llama_cpp")
    mkdir -p "$ROOT/src"
    cp -r "$REPO/mongarsd" "$REPO/configs" "$ROOT/src/"
    mkdir -p "$ROOT/src/packaging"
    cp -r "$HERE" "$ROOT/src/packaging/dist"
    find "$ROOT/src" -name __pycache__ -prune -exec rm -rf {} +
    chroot_run sh -ec 'cd /src && pyinstaller --noconfirm --log-level WARN --distpath /out --workpath /tmp/pyi packaging/dist/mongarsd.spec'
    [ -x "$ROOT/out/mongarsd/mongarsd" ] || die "PyInstaller produced no executable"
    [ -d "$ROOT/out/mongarsd/_internal" ] || die "unexpected PyInstaller layout (no _internal/)"
    rm -rf "$ROOT/out/mongarsd/_internal/llama_cpp/lib"
    rm -rf "$FROZEN.tmp"
    mkdir -p "$(dirname "$FROZEN")"
    mv "$ROOT/out/mongarsd" "$FROZEN.tmp"
    touch "$FROZEN.tmp/.complete"
    mv "$FROZEN.tmp" "$FROZEN"
    find "$CACHE/frozen" -maxdepth 1 -name "$ARCH-*" ! -name "$ARCH-$FROZEN_KEY" -exec rm -rf {} +
fi
rm -rf "$WORK" "$OUT"
mkdir -p "$(dirname "$OUT")"
cp -a "$FROZEN" "$OUT"
rm -f "$OUT/.complete"
for v in "${VARIANTS[@]}"; do
    mkdir -p "$OUT/_internal/llama_libs/$v"
    cp -a "$REPO/native/libs/$ARCH/$v/." "$OUT/_internal/llama_libs/$v/"
done
KEY="$( (echo "$FROZEN_KEY"; cd "$OUT/_internal/llama_libs" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)"
echo "mongarsd $VERSION linux-$ARCH key=$KEY" >"$OUT/_internal/BUNDLE"

# ---------------------------------------------------------------- 5. the single executable
mkdir -p "$REPO/dist"
EXE="$REPO/dist/mongarsd-$VERSION-linux-$ARCH"
if [ -f "$EXE" ] && [ -f "$EXE.key" ] && [ "$(cat "$EXE.key")" = "$KEY" ]; then
    say "single executable up to date"
else
    say "packing the single executable"
    "$PY" "$HERE/pack.py" --folder "$OUT" --stub "$HERE/stub.sh" --version "$VERSION" --arch "$ARCH" --key "$KEY" --out "$EXE"
    echo "$KEY" >"$EXE.key"
fi
say "done in $((SECONDS - started)) s: $EXE ($(du -h "$EXE" | cut -f1)), folder $OUT ($(du -sh "$OUT" | cut -f1))"
