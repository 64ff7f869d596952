#!/usr/bin/env bash
# mongarsd's patches to the llama.cpp that llama-cpp-python vendors, kept per version in
# native/patches/llama-cpp-python-<version>/NNNN-*.patch with paths relative to the sdist's
# root (patch -p1). Every build of llama.cpp goes through here: the daemon's wheel
# (scripts/llama-wheel.sh), llama.cpp's own tools and the portable libraries (native/fetch-src.sh),
# and Buildroot's package (which applies the same files from its package folder).
#
# Usage: native/patches.sh key VERSION        print a short hash of that version's patches, or "none"
#        native/patches.sh apply VERSION DIR  apply them, once, to the unpacked sdist DIR
# Env:   MONGARSD_LLAMA_PATCHES (default: the patches folder beside this script)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${MONGARSD_LLAMA_PATCHES:-$HERE/patches}"
MARKER=.mongarsd-patches

die() { echo "native/patches.sh: $*" >&2; exit 1; }

list() {
    # the version's patches in order; none is fine (a version without patches builds as released)
    find "$ROOT/llama-cpp-python-$1" -maxdepth 1 -name '*.patch' 2>/dev/null | LC_ALL=C sort
}

key() {
    local files
    files="$(list "$1")"
    if [ -z "$files" ]; then echo none; return; fi
    # names and contents: a renamed, reordered or edited patch is another build
    while IFS= read -r f; do basename "$f"; cat "$f"; done <<<"$files" | sha256sum | cut -c1-16
}

case "${1:-}" in
    key)
        [ $# = 2 ] || die "usage: native/patches.sh key VERSION"
        key "$2" ;;
    apply)
        [ $# = 3 ] || die "usage: native/patches.sh apply VERSION DIR"
        version="$2"; dir="$3"
        [ -d "$dir" ] || die "no unpacked sdist at $dir"
        want="$(key "$version")"
        if [ -f "$dir/$MARKER" ]; then
            have="$(cat "$dir/$MARKER")"
            [ "$have" = "$want" ] && exit 0
            die "$dir already has other patches applied ($have, want $want): unpack the sdist again"
        fi
        while IFS= read -r f; do
            [ -n "$f" ] || continue
            echo "native: applying $(basename "$f")" >&2
            patch -p1 --forward --quiet -d "$dir" <"$f" >&2 \
                || die "$(basename "$f") does not apply to $dir (llama-cpp-python $version)"
        done <<<"$(list "$version")"
        echo "$want" >"$dir/$MARKER" ;;
    *) die "usage: native/patches.sh key VERSION | apply VERSION DIR" ;;
esac
