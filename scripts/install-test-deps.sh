#!/usr/bin/env bash
# Install the Debian packages the test suite uses, idempotently and quietly:
#   iproute2    `ip netns` / veth for multi-node mesh tests
#   systemd     systemd-analyze (unit verify/security) and systemd-sysusers
#   espeak-ng   speech output tests
#   mmdebstrap  Debian roots for the single executable's and the .deb's tests (tests/packaging)
#   lintian     the .deb's checks
#   binutils    readelf/objdump: instruction sets and glibc floor of the bundled libraries
#   patchelf    the portable llama.cpp libraries' RUNPATH ($ORIGIN)
# Skips (exit 0, one line on stderr) when not root or when apt-get is missing.
# Runs `apt-get update` only when a package is missing and the lists are absent or stale.
set -euo pipefail

PACKAGES=(iproute2 systemd espeak-ng mmdebstrap lintian binutils patchelf)

if [ "$(id -u)" != 0 ]; then
    echo "install-test-deps: not root, skipping (${PACKAGES[*]})" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-test-deps: no apt-get, skipping (${PACKAGES[*]})" >&2
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
[ "${#missing[@]}" = 0 ] && exit 0

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
quiet() { "$@" >>"$log" 2>&1 || { cat "$log" >&2; return 1; }; }
# Lists older than a day (or absent) are refreshed once; otherwise install from what we have.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -1 -print -quit 2>/dev/null)" ]; then
    quiet apt-get update -qq
fi
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    # A stale list can name versions the mirror no longer has: refresh and retry once.
    quiet apt-get update -qq
    quiet apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "install-test-deps: installed ${missing[*]}" >&2
