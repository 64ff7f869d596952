#!/usr/bin/env bash
# Build the llama-cpp-python wheel for this machine once, keep it, and print its path.
#
# Usage:  scripts/llama-wheel.sh PYTHON VERSION
# Env:    CMAKE_ARGS (llama.cpp's CMake flags), LLAMA_CFLAGS (extra C/C++ compiler flags),
#         MONGARSD_BUILD_CACHE (default ~/.cache/mongarsd-build),
#         MONGARSD_LLAMA_PATCHES (default native/patches: see native/patches.sh).
#
# The wheel is built from the version's sdist with mongarsd's patches to the llama.cpp it
# vendors applied (native/patches/llama-cpp-python-<version>/), the same patches llama.cpp's own
# tools and the portable libraries are built with.
#
# Why not pip's own wheel cache: pip keys a wheel it built from an sdist by the sdist alone,
# not by CMAKE_ARGS or the CPU. A -march=native build cached on one machine is then installed
# on another one (a home directory or cache shared between hosts), where it may use
# instructions that CPU lacks or cannot run; a changed CMAKE_ARGS is silently ignored too.
# Here the key is the version, the patches, the Python, the flags and the CPU's feature list.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PY="${1:?usage: llama-wheel.sh PYTHON VERSION}"
VERSION="${2:?usage: llama-wheel.sh PYTHON VERSION}"
CACHE="${MONGARSD_BUILD_CACHE:-$HOME/.cache/mongarsd-build}/llama-wheels"

die() { echo "llama-wheel: $*" >&2; exit 1; }

cpu_features() {
    # x86: "flags", Arm: "Features"; the first CPU is enough (the build targets the one it runs on)
    grep -m1 -E '^(flags|Features)[[:space:]]*:' /proc/cpuinfo 2>/dev/null || uname -m
}

PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || die "cannot run $PY"
PATCHES="$("$REPO/native/patches.sh" key "$VERSION")" || die "cannot read the patches for $VERSION"
KEY="$(printf '%s\n' "$VERSION" "$PATCHES" "$PYVER" "$(uname -m)" "${CMAKE_ARGS:-}" "${LLAMA_CFLAGS:-}" "$(cpu_features)" \
    | sha256sum | cut -c1-16)"
DIR="$CACHE/$KEY"

wheel="$(find "$DIR" -maxdepth 1 -name "llama_cpp_python-$VERSION-*.whl" 2>/dev/null | head -1 || true)"
if [ -z "$wheel" ]; then
    echo "llama-wheel: building llama-cpp-python $VERSION for this CPU (several minutes the first time; kept in $DIR)" >&2
    tmp="$DIR.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    command -v patch >/dev/null 2>&1 || die "patch is missing (Debian: apt-get install patch)"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp/src" "llama-cpp-python==$VERSION" >&2 \
        || die "cannot download the llama-cpp-python $VERSION sdist"
    sdist="$tmp/src/llama_cpp_python-$VERSION.tar.gz"
    [ -f "$sdist" ] || die "pip downloaded no llama_cpp_python-$VERSION.tar.gz"
    tar -xzf "$sdist" -C "$tmp/src"
    "$REPO/native/patches.sh" apply "$VERSION" "$tmp/src/llama_cpp_python-$VERSION"
    CFLAGS="${CFLAGS:-} ${LLAMA_CFLAGS:-}" CXXFLAGS="${CXXFLAGS:-} ${LLAMA_CFLAGS:-}" CMAKE_ARGS="${CMAKE_ARGS:-}" \
        "$PY" -m pip wheel --quiet --no-deps --no-cache-dir \
        --wheel-dir "$tmp" "$tmp/src/llama_cpp_python-$VERSION" >&2 \
        || die "building llama-cpp-python $VERSION failed"
    built="$(find "$tmp" -maxdepth 1 -name 'llama_cpp_python-*.whl' | head -1)"
    [ -n "$built" ] || die "pip built no llama-cpp-python wheel"
    mkdir -p "$DIR"
    mv "$built" "$DIR/"
    wheel="$DIR/$(basename "$built")"
fi
echo "$wheel"
