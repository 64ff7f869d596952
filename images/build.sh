#!/usr/bin/env bash
# Build a flashable disk image of mongarsd from Debian packages and the mongarsd .deb.
#
# Usage: images/build.sh --board pi4|x86-64 --deb FILE --models DIR [--out FILE] [--cache DIR]
#
#   --board   pi4: MBR, Pi boot partition (RASPIFIRM), root (RASPIROOT), state (MGSTATE), arm64
#             x86-64: GPT, EFI system partition with systemd-boot (MGESP), root (MGROOT), state
#   --deb     the mongarsd package of the board's architecture (make deb ARCH=...)
#   --models  the default models folder (make install puts them in models/)
#   --out     the image file (default dist/mongarsd-<board>.img)
#   --cache   where root filesystems are kept between builds (default
#             $MONGARSD_BUILD_CACHE or ~/.cache/mongarsd-build, then images/)
#
# No loop devices and no mounts of the image: every filesystem is made from a folder (mkfs.ext4
# -d, mkfs.vfat + mcopy) and placed into the partition table sfdisk wrote on the image file.
# The Debian root (mmdebstrap: kernel, systemd, avahi, openssh-server, ...) is cached by its
# package list; the mongarsd package, the models and the board's files are added on each build.
# An arm64 root is made on x86-64 under qemu-user (binfmt), as packaging/dist/build.sh does.
# Needs root. Every long step prints a timestamped line.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
SUITE=bookworm
MIRROR="${MONGARSD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Bump when the root's content changes in a way its package list does not show.
ROOT_RECIPE=1

say() { printf '%s image: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '%s image: error: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }
usage() { die "usage: images/build.sh --board pi4|x86-64 --deb FILE --models DIR [--out FILE] [--cache DIR]"; }

BOARD="" DEB="" MODELS="" OUT="" CACHE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --board) BOARD="${2:-}"; shift 2 || usage ;;
        --deb) DEB="${2:-}"; shift 2 || usage ;;
        --models) MODELS="${2:-}"; shift 2 || usage ;;
        --out) OUT="${2:-}"; shift 2 || usage ;;
        --cache) CACHE="${2:-}"; shift 2 || usage ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) usage ;;
    esac
done
[ -n "$BOARD" ] && [ -n "$DEB" ] && [ -n "$MODELS" ] || usage
[ "$(id -u)" = 0 ] || die "building an image needs root (file ownership inside the image, chroot)"

# --- the board ------------------------------------------------------------------------------
COMMON=(systemd systemd-sysv systemd-timesyncd systemd-resolved udev dbus kmod initramfs-tools
    iproute2 avahi-daemon libnss-mdns openssh-server ca-certificates procps)
case "$BOARD" in
    pi4)
        DEBARCH=arm64 COMPONENTS=main,non-free-firmware
        PACKAGES=("${COMMON[@]}" linux-image-arm64 raspi-firmware)
        BOOT_LABEL=RASPIFIRM ROOT_LABEL=RASPIROOT BOOT_MOUNT=/boot/firmware
        TABLE=dos ;;
    x86-64)
        DEBARCH=amd64 COMPONENTS=main
        PACKAGES=("${COMMON[@]}" linux-image-amd64 systemd-boot-efi)
        BOOT_LABEL=MGESP ROOT_LABEL=MGROOT BOOT_MOUNT=/boot/efi
        TABLE=gpt ;;
    pi5)
        die "no Debian kernel boots a Raspberry Pi 5 yet (bookworm's has no BCM2712/RP1 support): install the .deb on Raspberry Pi OS (images/README.md)" ;;
    *) die "unknown board '$BOARD' (pi4 or x86-64)" ;;
esac
STATE_LABEL=MGSTATE
BOOT_MB=256
CACHE="${CACHE:-${MONGARSD_BUILD_CACHE:-$HOME/.cache/mongarsd-build}/images}"
OUT="${OUT:-$REPO/dist/mongarsd-$BOARD.img}"

[ -f "$DEB" ] || die "no package at $DEB (make deb ARCH=$([ "$DEBARCH" = arm64 ] && echo arm64 || echo x86_64))"
deb_arch="$(dpkg-deb -f "$DEB" Architecture)"
[ "$deb_arch" = "$DEBARCH" ] || die "$DEB is for $deb_arch; the $BOARD image needs $DEBARCH"
[ -f "$MODELS/manifest.json" ] || die "no default models in $MODELS (make install downloads them)"
for tool in mmdebstrap mkfs.ext4 mkfs.vfat mcopy sfdisk dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool is missing (images/host-tools.sh installs what image builds need)"
done
if [ "$DEBARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
    grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || die "arm64 programs cannot run here: images/host-tools.sh enables qemu-user's binfmt handler"
fi

# What the package needs from Debian goes into the cached root, so dpkg -i needs no network.
deb_depends="$(dpkg-deb -f "$DEB" Depends | tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' | grep -v '^$' || true)"
mapfile -t extra <<<"$deb_depends"
PACKAGES+=("${extra[@]}")
mapfile -t PACKAGES < <(printf '%s\n' "${PACKAGES[@]}" | grep -v '^$' | sort -u)
root_key="$(printf '%s\n' "$SUITE" "$DEBARCH" "$COMPONENTS" "$MIRROR" "$ROOT_RECIPE" "${PACKAGES[@]}" | sha256sum | cut -c1-12)"
ROOT_TAR="$CACHE/roots/$SUITE-$BOARD-$root_key.tar"

WORK="$REPO/build/image/$BOARD"
ROOT="$WORK/root"
cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m"
    done
    return 0
}
trap cleanup EXIT

# --- 1. the Debian root (cached) -----------------------------------------------------------
if [ -f "$ROOT_TAR" ]; then
    say "Debian $SUITE $DEBARCH root: cached ($(basename "$ROOT_TAR"))"
else
    mkdir -p "$CACHE/roots"
    say "Debian $SUITE $DEBARCH root: mmdebstrap of ${#PACKAGES[@]} packages and their dependencies (several minutes$([ "$DEBARCH" = arm64 ] && echo ', under qemu-user'))"
    tmp="$CACHE/roots/.partial-$SUITE-$BOARD-$root_key.tar"  # mmdebstrap picks the format by the extension
    rm -f "$tmp"
    # The kernel's initramfs must boot any board of the architecture, not the build machine:
    # initramfs-tools' MODULES=most (its default) is kept; no recommends keeps the root small.
    # update-initramfs is diverted to true while packages install (the kernel, initramfs-tools'
    # trigger and raspi-firmware would each build it, a few minutes apiece under qemu-user),
    # then restored and run once.
    hooks=()
    if [ "$BOARD" = pi4 ]; then
        # raspi-firmware's scripts refuse to run unless /boot/firmware is a mount point (where
        # they cannot tell a chroot): give them one for the build; they fill it, and the image
        # build takes the firmware from /usr/lib/raspi-firmware.
        hooks+=(--essential-hook='mkdir -p "$1/boot/firmware" && mount --bind "$1/boot/firmware" "$1/boot/firmware"')
    fi
    hooks+=(--customize-hook='rm -f "$1/usr/sbin/update-initramfs" && chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs && chroot "$1" update-initramfs -c -k all')
    [ "$BOARD" = pi4 ] && hooks+=(--customize-hook='umount "$1/boot/firmware" && rm -rf "$1/boot/firmware" && mkdir -m 0700 "$1/boot/firmware"')
    mmdebstrap --variant=minbase --architectures="$DEBARCH" --components="$COMPONENTS" \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --essential-hook='chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && ln -sf /bin/true "$1/usr/sbin/update-initramfs"' \
        "${hooks[@]}" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" "$tmp" "$MIRROR" \
        || die "mmdebstrap failed (is $MIRROR reachable?)"
    mv "$tmp" "$ROOT_TAR"
    # Keep the newest root of each board only.
    find "$CACHE/roots" -name "$SUITE-$BOARD-*.tar" ! -name "$(basename "$ROOT_TAR")" -delete
    say "Debian root cached: $(du -h "$ROOT_TAR" | cut -f1)"
fi

# --- 2. the root with mongarsd ----------------------------------------------------------------
cleanup
rm -rf "$WORK"
mkdir -p "$ROOT" "$WORK/boot" "$WORK/state"
say "unpacking the root"
tar -xf "$ROOT_TAR" -C "$ROOT" --numeric-owner

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }
mount --bind /dev "$ROOT/dev"
mount -t devpts devpts "$ROOT/dev/pts" -o newinstance,ptmxmode=0666 2>/dev/null || true
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"

say "installing $(basename "$DEB")$([ "$DEBARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ] && echo ' (its first-start step runs under qemu-user)')"
cp "$DEB" "$ROOT/tmp/mongarsd.deb"
in_root dpkg -i /tmp/mongarsd.deb >"$WORK/dpkg.log" 2>&1 || { cat "$WORK/dpkg.log" >&2; die "dpkg -i mongarsd failed"; }
rm -f "$ROOT/tmp/mongarsd.deb"
in_root /usr/bin/mongarsd --version >/dev/null || die "the installed mongarsd does not run in the $DEBARCH root"

say "configuring the board: network, mDNS, first boot, SSH off, no password"
OVERLAY="$HERE/overlay"
cp -a "$OVERLAY/." "$ROOT/"
chmod 0755 "$ROOT/usr/lib/mongarsd-image/"*
# Debian's defaults name the boot partition's mount point; the scripts read it from here.
printf 'BOOT_MOUNT=%s\nBOARD=%s\n' "$BOOT_MOUNT" "$BOARD" >"$ROOT/etc/mongarsd/image.env"

cat >"$ROOT/etc/fstab" <<EOF
# <file system>      <mount point>        <type> <options>                                  <dump> <pass>
LABEL=$ROOT_LABEL    /                    ext4   defaults,noatime,errors=remount-ro          0 1
LABEL=$STATE_LABEL   /var/lib/mongarsd    ext4   defaults,noatime,nosuid,nodev               0 2
LABEL=$BOOT_LABEL    $BOOT_MOUNT    vfat   defaults,umask=0077,nofail                  0 2
EOF
# The boot partition is nofail (a board boots without it), so local-fs.target does not wait
# for it: the units that read files dropped there wait for its mount themselves.
boot_unit="$(printf '%s' "${BOOT_MOUNT#/}" | tr / -).mount"
for unit in mongarsd-firstboot.service mongarsd-ssh-keys.service; do
    mkdir -p "$ROOT/usr/lib/systemd/system/$unit.d"
    printf '[Unit]\nWants=%s\nAfter=%s\n' "$boot_unit" "$boot_unit" >"$ROOT/usr/lib/systemd/system/$unit.d/boot-partition.conf"
done
echo mongarsd >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tmongarsd\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
ln -sfn /run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"

# Services: the network, name resolution, time (the mesh needs clocks within 30 s), mDNS, the
# first-boot step and mongarsd on; sshd off (mongarsd-ssh-keys.service turns it on when a key
# is dropped on the boot partition).
in_root systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
    avahi-daemon.service mongarsd-firstboot.service mongarsd-ssh-keys.service mongarsd.service >/dev/null 2>&1 \
    || die "systemctl enable failed"
in_root systemctl disable ssh.service ssh.socket >/dev/null 2>&1 || true
in_root systemctl is-enabled mongarsd.service >/dev/null || die "mongarsd.service is not enabled"

# Nothing secret or per-board is baked in: no SSH host keys, no machine id, no password.
rm -f "$ROOT"/etc/ssh/ssh_host_*
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
in_root usermod --password '*' root
awk -F: '$2 !~ /^(\*|!.*)?$/ {bad=1; print "image: the account " $1 " has a password hash" > "/dev/stderr"} END {exit bad}' \
    "$ROOT/etc/shadow" || die "an account has a password"
# The package's first-start step ran at install: its identity and token belong to this
# machine, not to every board flashed with the image. The first boot makes the board's own.
find "$ROOT/var/lib/mongarsd" -mindepth 1 -maxdepth 1 ! -name models -exec rm -rf {} +
rm -rf "$ROOT/var/cache/apt/"*.bin "$ROOT/var/lib/apt/lists/"* "$ROOT/var/log/"*.log "$ROOT/tmp/"*
cleanup

# --- 3. the partitions' contents ---------------------------------------------------------------
say "state partition: default models"
uid="$(awk -F: '$1 == "mongarsd" {print $3}' "$ROOT/etc/passwd")"
gid="$(awk -F: '$1 == "mongarsd" {print $3}' "$ROOT/etc/group")"
[ -n "$uid" ] && [ -n "$gid" ] || die "the package did not create the mongarsd user"
mkdir -p "$WORK/state/models"
cp -a "$MODELS/." "$WORK/state/models/"
rm -f "$WORK/state/models/.installed"
chown -R "$uid:$gid" "$WORK/state"
chmod 0750 "$WORK/state"
rm -rf "$ROOT/var/lib/mongarsd"
install -d -m 0750 -o "$uid" -g "$gid" "$ROOT/var/lib/mongarsd"
install -d -m 0700 "$ROOT$BOOT_MOUNT"

kernel="$(find "$ROOT/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -1)"
initrd="$(find "$ROOT/boot" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -1)"
[ -n "$kernel" ] && [ -n "$initrd" ] || die "the root has no kernel or initramfs"
kver="${kernel##*/vmlinuz-}"
cp "$kernel" "$WORK/boot/vmlinuz"
cp "$initrd" "$WORK/boot/initrd.img"
case "$BOARD" in
    pi4)
        say "boot partition: Raspberry Pi firmware, device trees, kernel $kver"
        cp -a "$ROOT/usr/lib/raspi-firmware/." "$WORK/boot/"
        for dtb in bcm2711-rpi-4-b.dtb bcm2711-rpi-400.dtb bcm2711-rpi-cm4.dtb bcm2711-rpi-cm4s.dtb; do
            src="$ROOT/usr/lib/linux-image-$kver/broadcom/$dtb"
            [ -f "$src" ] && cp "$src" "$WORK/boot/"
        done
        [ -f "$WORK/boot/bcm2711-rpi-4-b.dtb" ] || die "kernel $kver has no Pi 4 device tree"
        [ -f "$WORK/boot/start4.elf" ] || die "raspi-firmware has no start4.elf"
        cp "$HERE/boards/pi4/config.txt" "$WORK/boot/config.txt"
        echo "console=tty0 console=ttyS1,115200 root=LABEL=$ROOT_LABEL rw rootwait fsck.repair=yes net.ifnames=0" >"$WORK/boot/cmdline.txt"
        # Later kernel upgrades: raspi-firmware's hooks rewrite the boot partition with these.
        printf 'ROOTPART=LABEL=%s\nCONSOLES="tty0 ttyS1,115200"\n' "$ROOT_LABEL" >"$ROOT/etc/default/raspi-firmware"
        ;;
    x86-64)
        say "EFI system partition: systemd-boot, kernel $kver"
        mkdir -p "$WORK/boot/EFI/BOOT" "$WORK/boot/loader/entries"
        cp "$ROOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$WORK/boot/EFI/BOOT/BOOTX64.EFI"
        printf 'default mongarsd.conf\ntimeout 0\neditor no\n' >"$WORK/boot/loader/loader.conf"
        cat >"$WORK/boot/loader/entries/mongarsd.conf" <<EOF
title   mongarsd (Debian $SUITE, kernel $kver)
linux   /vmlinuz
initrd  /initrd.img
options root=LABEL=$ROOT_LABEL rw console=tty0 console=ttyS0,115200 fsck.repair=yes
EOF
        ;;
esac
# A key for SSH and a cluster key may be dropped here later; say so on the partition itself.
cp "$HERE/boards/BOOT-README.txt" "$WORK/boot/README-mongarsd.txt"

# --- 4. filesystems and the image ------------------------------------------------------------
mib_of() { du -s --block-size=1M "$1" | cut -f1; }
root_mb=$(( $(mib_of "$ROOT") * 5 / 4 + 256 ))
state_mb=$(( $(mib_of "$WORK/state") + 512 ))
say "filesystems: boot ${BOOT_MB} MiB, root ${root_mb} MiB, state ${state_mb} MiB"
rm -f "$WORK"/*.part
mkfs.vfat -F 32 -n "$BOOT_LABEL" -C "$WORK/boot.part" $(( BOOT_MB * 1024 )) >/dev/null
mcopy -s -Q -i "$WORK/boot.part" "$WORK/boot/"* ::/
truncate -s "${root_mb}M" "$WORK/root.part"
mkfs.ext4 -q -L "$ROOT_LABEL" -d "$ROOT" -E root_owner=0:0 "$WORK/root.part"
truncate -s "${state_mb}M" "$WORK/state.part"
mkfs.ext4 -q -L "$STATE_LABEL" -d "$WORK/state" -E root_owner="$uid:$gid" "$WORK/state.part"

say "partition table ($TABLE) and image assembly"
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
total_mb=$(( 1 + BOOT_MB + root_mb + state_mb + 1 ))
truncate -s "${total_mb}M" "$OUT"
if [ "$TABLE" = gpt ]; then
    # Types: EFI system, Linux root (x86-64) and Linux filesystem (discoverable partitions spec).
    sfdisk --quiet "$OUT" <<EOF
label: gpt
start=1MiB, size=${BOOT_MB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="$BOOT_LABEL"
size=${root_mb}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="$ROOT_LABEL"
size=${state_mb}MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="$STATE_LABEL"
EOF
else
    sfdisk --quiet "$OUT" <<EOF
label: dos
start=1MiB, size=${BOOT_MB}MiB, type=c, bootable
size=${root_mb}MiB, type=83
size=${state_mb}MiB, type=83
EOF
fi
offset=1
for part in boot root state; do
    dd if="$WORK/$part.part" of="$OUT" bs=1M seek="$offset" conv=notrunc,sparse status=none
    offset=$(( offset + $(stat -c %s "$WORK/$part.part") / 1048576 ))
done
rm -f "$WORK"/*.part
rm -rf "$ROOT"

# The boot test and users of -M virt want the kernel and initramfs next to the image.
cp "$WORK/boot/vmlinuz" "${OUT%.img}.vmlinuz"
cp "$WORK/boot/initrd.img" "${OUT%.img}.initrd.img"
say "done: $OUT ($(( total_mb )) MiB, $(du -h "$OUT" | cut -f1) on disk); flash it with: dd if=$(basename "$OUT") of=/dev/sdX bs=4M conv=fsync"
