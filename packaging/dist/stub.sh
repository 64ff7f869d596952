#!/bin/sh
# mongarsd @VERSION@ for linux-@ARCH@: a self-extracting single executable.
# The first start unpacks the bundled folder (Python, mongarsd, llama.cpp, ONNX Runtime) once
# into a versioned cache; every later start runs it from there, with no extraction.
# Cache: $MONGARSD_BUNDLE_DIR, else $XDG_CACHE_HOME/mongarsd or ~/.cache/mongarsd, else
# /var/cache/mongarsd (root), else /tmp/mongarsd-<uid>. Needs only sh, tail, tar and gzip.
set -eu
KEY='@KEY@'
OFFSET=@OFFSET@
self="$0"
case "$self" in */*) ;; *) self="$(command -v -- "$self")" ;; esac
pick_base() {
    if [ -n "${MONGARSD_BUNDLE_DIR:-}" ]; then echo "$MONGARSD_BUNDLE_DIR"; return; fi
    if [ -n "${XDG_CACHE_HOME:-}" ]; then echo "$XDG_CACHE_HOME/mongarsd"; return; fi
    if [ -n "${HOME:-}" ] && [ "$HOME" != / ] && mkdir -p "$HOME/.cache" 2>/dev/null && [ -w "$HOME/.cache" ]; then
        echo "$HOME/.cache/mongarsd"; return
    fi
    if [ "$(id -u)" = 0 ]; then echo /var/cache/mongarsd; return; fi
    echo "/tmp/mongarsd-$(id -u)"
}
base="$(pick_base)"
dir="$base/bundle-$KEY"
if [ ! -x "$dir/mongarsd" ]; then
    mkdir -p "$base"
    chmod 0700 "$base" 2>/dev/null || true
    if [ ! -O "$base" ]; then
        echo "mongarsd: $base is not owned by this user; set MONGARSD_BUNDLE_DIR" >&2
        exit 1
    fi
    tmp="$base/.unpack-$KEY-$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    echo "mongarsd: first start of this version: unpacking into $dir (once)" >&2
    if ! tail -c +"$OFFSET" "$self" | gzip -dc | tar -xf - -C "$tmp"; then
        rm -rf "$tmp"
        echo "mongarsd: unpacking failed (disk full? see above); nothing was kept" >&2
        exit 1
    fi
    # Another start may have finished first: theirs is complete, keep it.
    if ! mv "$tmp" "$dir" 2>/dev/null; then rm -rf "$tmp"; fi
    [ -x "$dir/mongarsd" ] || { echo "mongarsd: $dir is incomplete; remove it and start again" >&2; exit 1; }
    # Older versions of the bundle in the same cache are removed.
    for old in "$base"/bundle-*; do
        [ "$old" = "$dir" ] || rm -rf "$old"
    done
fi
exec "$dir/mongarsd" "$@"
