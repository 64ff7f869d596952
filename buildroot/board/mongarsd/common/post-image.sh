#!/bin/sh
# Post-image script of the mongarsd defconfigs: lays out the disk image with
# genimage. Buildroot runs it from its top directory with BINARIES_DIR as $1
# and BR2_ROOTFS_POST_SCRIPT_ARGS after it: here the board's folder name
# under board/mongarsd/ (raspberrypi4, raspberrypi5, pc_x86_64_efi).
set -eu

BOARD="${2:?usage: post-image.sh BINARIES_DIR BOARD}"
BOARD_DIR="${BR2_EXTERNAL_MONGARSD_PATH}/board/mongarsd/${BOARD}"
COMMON_DIR="${BR2_EXTERNAL_MONGARSD_PATH}/board/mongarsd/common"
GENIMAGE_CFG="${BINARIES_DIR}/genimage-${BOARD}.cfg"

# What the boot partition tells whoever holds the card or disk.
install -m 0644 "${COMMON_DIR}/README-mongarsd.txt" "${BINARIES_DIR}/README-mongarsd.txt"

cp "${BOARD_DIR}/genimage.cfg" "${GENIMAGE_CFG}"

# EFI boards: GRUB's menu goes on the EFI system partition, and the root
# partition's GPT UUID is the root filesystem's UUID (new at every build),
# which the kernel command line names.
if [ -f "${BOARD_DIR}/grub.cfg" ]; then
	uuid="$(dumpe2fs -h "${BINARIES_DIR}/rootfs.ext4" 2>/dev/null | sed -n 's/^Filesystem UUID: *//p')"
	[ -n "${uuid}" ] || { echo "post-image.sh: no UUID in rootfs.ext4" >&2; exit 1; }
	mkdir -p "${BINARIES_DIR}/efi-part/EFI/BOOT"
	sed "s/@ROOT_PARTUUID@/${uuid}/g" "${BOARD_DIR}/grub.cfg" \
		>"${BINARIES_DIR}/efi-part/EFI/BOOT/grub.cfg"
	sed -i "s/@ROOT_PARTUUID@/${uuid}/g" "${GENIMAGE_CFG}"
fi

exec support/scripts/genimage.sh -c "${GENIMAGE_CFG}"
