#!/usr/bin/env bash
# Print the path of the llama.cpp source that the installed llama-cpp-python vendors,
# downloading its sdist into native/src/ once (~77 MB), unpacking vendor/llama.cpp only and
# applying mongarsd's patches for that version (native/patches.sh), as the daemon's wheel has them.
# Env: VENV (default <repo>/.venv). Progress goes to stderr, the path to stdout.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$(dirname "$HERE")/.venv}"
PY="$VENV/bin/python"
die() { echo "native/fetch-src.sh: $*" >&2; exit 1; }
VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null)" \
    || die "llama-cpp-python is not installed in $VENV"
SRC_ROOT="$HERE/src"
SDIST="$SRC_ROOT/llama_cpp_python-$VERSION.tar.gz"
UNPACKED="$SRC_ROOT/llama_cpp_python-$VERSION"
LLAMA="$UNPACKED/vendor/llama.cpp"
mkdir -p "$SRC_ROOT"
if [ ! -f "$SDIST" ]; then
    echo "native: downloading the llama-cpp-python $VERSION sdist" >&2
    "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$SRC_ROOT" "llama-cpp-python==$VERSION" >&2
fi
[ -f "$SDIST" ] || die "sdist not found at $SDIST"
# A tree unpacked before these patches (or with others) is unpacked again; tar keeps the
# archive's timestamps, so an existing build folder recompiles only the patched files.
if [ ! -f "$LLAMA/CMakeLists.txt" ] \
    || [ "$(cat "$UNPACKED/.mongarsd-patches" 2>/dev/null)" != "$("$HERE/patches.sh" key "$VERSION")" ]; then
    rm -rf "$UNPACKED"
    tar -xzf "$SDIST" -C "$SRC_ROOT" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    "$HERE/patches.sh" apply "$VERSION" "$UNPACKED"
fi
echo "$LLAMA"
