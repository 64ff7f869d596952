#!/usr/bin/env bash
# Install what `make image` and `make test-image` need on this Debian machine (as root,
# idempotent): mmdebstrap and the filesystem tools for building, qemu-user for an arm64 root,
# and QEMU with OVMF for booting the images.
#
# Usage: images/host-tools.sh pi4|x86-64 [--boot]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BOARD="${1:-x86-64}"
BOOT="${2:-}"
case "$BOARD" in
    pi4|pi5) arch=arm64 ;;
    x86-64) arch=x86_64 ;;
    *) echo "host-tools: unknown board '$BOARD' (pi4 or x86-64)" >&2; exit 2 ;;
esac
# mmdebstrap, and for arm64 qemu-user with its binfmt handler: the same as for `make dist`.
"$HERE/../packaging/dist/host-tools.sh" "$arch"
pkgs=(dosfstools mtools fdisk e2fsprogs)
if [ "$BOOT" = --boot ]; then
    if [ "$arch" = arm64 ]; then pkgs+=(qemu-system-arm); else pkgs+=(qemu-system-x86 ovmf); fi
fi
missing=()
for p in "${pkgs[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || { echo "host-tools: install ${missing[*]} (no apt-get here)" >&2; exit 1; }
    echo "host-tools: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
