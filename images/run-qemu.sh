#!/usr/bin/env bash
# Boot a mongarsd image under QEMU, its API forwarded to a port of this machine's loopback.
#
# Usage: images/run-qemu.sh --board x86-64|pi4 --image FILE [--port N] [--serial FILE]
#                           [--ssh-port N] [--memory MiB] [--keep]
#
#   x86-64  the whole disk through UEFI (OVMF, package ovmf) and systemd-boot
#   pi4     QEMU has no Pi 4 machine with a network: the image's own disk boots under
#           qemu-system-aarch64 -M virt -cpu cortex-a72 with the same Debian arm64 kernel and
#           initramfs (images/build.sh leaves them beside the image), root found by its label
#
#   --port    127.0.0.1:N on this machine reaches the daemon's 8642 (default 8642)
#   --ssh-port  127.0.0.1:N reaches the board's SSH (off unless a key was dropped on the
#               boot partition, see images/README.md)
#   --serial  the console goes to this file (default: this terminal)
#   --keep    write to the image; by default changes go to a temporary overlay and the image
#             stays as flashed (every run is a first boot)
#
# Emulation is plain TCG: KVM is used only with MONGARSD_QEMU_ACCEL=kvm, where it can run guests.
# Under TCG on two cores expect a minute or more to the login prompt, and a few more to a
# loaded model on the arm64 board.
set -euo pipefail

die() { echo "run-qemu: $*" >&2; exit 1; }
usage() { die "usage: images/run-qemu.sh --board x86-64|pi4 --image FILE [--port N] [--ssh-port N] [--serial FILE] [--memory MiB] [--keep]"; }

BOARD="" IMAGE="" PORT=8642 SSH_PORT="" SERIAL="" MEMORY=2048 SNAPSHOT=on
while [ $# -gt 0 ]; do
    case "$1" in
        --board) BOARD="${2:-}"; shift 2 || usage ;;
        --image) IMAGE="${2:-}"; shift 2 || usage ;;
        --port) PORT="${2:-}"; shift 2 || usage ;;
        --serial) SERIAL="${2:-}"; shift 2 || usage ;;
        --ssh-port) SSH_PORT="${2:-}"; shift 2 || usage ;;
        --memory) MEMORY="${2:-}"; shift 2 || usage ;;
        --keep) SNAPSHOT=off; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) usage ;;
    esac
done
[ -n "$BOARD" ] && [ -n "$IMAGE" ] || usage
[ -f "$IMAGE" ] || die "no image at $IMAGE (make image BOARD=$BOARD)"
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "--port must be 1..65535"
[ -z "$SSH_PORT" ] || { [[ "$SSH_PORT" =~ ^[0-9]+$ ]] && [ "$SSH_PORT" -ge 1 ] && [ "$SSH_PORT" -le 65535 ]; } || die "--ssh-port must be 1..65535"
[[ "$MEMORY" =~ ^[0-9]+$ ]] && [ "$MEMORY" -ge 512 ] || die "--memory must be at least 512 (MiB)"

accel="tcg,thread=multi"
[ "${MONGARSD_QEMU_ACCEL:-tcg}" = kvm ] && accel=kvm
if [ -n "$SERIAL" ]; then
    console=(-display none -monitor none -serial "file:$SERIAL")
else
    console=(-nographic)
fi
# shellcheck disable=SC2054  # the commas are QEMU option syntax
common=(-smp 2 -m "$MEMORY" -no-reboot
    -drive "file=$IMAGE,format=raw,if=virtio,snapshot=$SNAPSHOT"
    -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$PORT-:8642${SSH_PORT:+,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22}"
    -device virtio-net-pci,netdev=net0
    -object rng-random,filename=/dev/urandom,id=rng0 -device virtio-rng-pci,rng=rng0)

case "$BOARD" in
    x86-64)
        command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (images/host-tools.sh x86-64 --boot)"
        code=/usr/share/OVMF/OVMF_CODE_4M.fd vars=/usr/share/OVMF/OVMF_VARS_4M.fd
        [ -f "$code" ] && [ -f "$vars" ] || die "OVMF is missing (apt-get install ovmf)"
        # UEFI variables are per boot: a copy next to the image, overwritten each time.
        vars_copy="${IMAGE%.img}.ovmf-vars.fd"
        cp "$vars" "$vars_copy"
        # -cpu max under TCG is x86-64-v3 without AVX-512: it also proves the portable build.
        exec qemu-system-x86_64 -machine q35 -accel "$accel" -cpu max "${common[@]}" "${console[@]}" \
            -drive "if=pflash,format=raw,readonly=on,file=$code" \
            -drive "if=pflash,format=raw,file=$vars_copy"
        ;;
    pi4)
        command -v qemu-system-aarch64 >/dev/null || die "qemu-system-aarch64 is missing (images/host-tools.sh pi4 --boot)"
        kernel="${IMAGE%.img}.vmlinuz" initrd="${IMAGE%.img}.initrd.img"
        [ -f "$kernel" ] && [ -f "$initrd" ] || die "no $kernel or $initrd beside the image (images/build.sh leaves them there)"
        # cortex-a72 is the Pi 4's core; -cpu max is much slower under TCG.
        exec qemu-system-aarch64 -machine virt -accel "$accel" -cpu cortex-a72 "${common[@]}" "${console[@]}" \
            -kernel "$kernel" -initrd "$initrd" \
            -append "root=LABEL=RASPIROOT rw rootwait console=ttyAMA0 fsck.repair=yes net.ifnames=0"
        ;;
    *) die "unknown board '$BOARD' (x86-64 or pi4)" ;;
esac
