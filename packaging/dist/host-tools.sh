#!/usr/bin/env bash
# Install what packaging/dist/build.sh needs on this Debian machine (as root, idempotent):
# mmdebstrap for the build roots, patchelf for the libraries' RUNPATH; for arm64 also the cross compiler and qemu-user with its
# binfmt handler enabled (an arm64 root's programs then run here, emulated), and arch-test, with which mmdebstrap checks
# that the foreign architecture runs (only a Recommends of mmdebstrap, which --no-install-recommends leaves out).
set -euo pipefail
ARCH="${1:-x86_64}"
pkgs=(mmdebstrap patchelf)
[ "$ARCH" = arm64 ] && pkgs+=(crossbuild-essential-arm64 qemu-user-static binfmt-support arch-test)
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
if [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64
    fi
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || { echo "host-tools: the qemu-aarch64 binfmt handler is not enabled" >&2; exit 1; }
fi
