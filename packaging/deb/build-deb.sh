#!/usr/bin/env bash
# Build the Debian package of a mongarsd folder build, with dpkg-deb alone (no debhelper).
#
# Usage: packaging/deb/build-deb.sh --arch amd64|arm64 --version V --bundle DIR --out DIR
#
#   --bundle  the PyInstaller one-dir build: an ELF executable `mongarsd` and `_internal/`
#             (packaging/dist/build.sh leaves it in build/dist/<arch>/mongarsd)
#   --out     where mongarsd_<version>_<arch>.deb goes
#
# The package installs the folder as /usr/lib/mongarsd (/usr/bin/mongarsd links to it), the
# systemd unit, sysusers.d and tmpfiles.d entries, /etc/mongarsd/mongarsd.toml (a conffile),
# a man page and the docs; its postinst creates the user and runs `mongarsd init`.
# Needs dpkg-deb, gzip and readelf (binutils; it reads the libraries the folder needs).
# SOURCE_DATE_EPOCH, when set, dates the changelog and every file (default: the executable's
# mtime), so one folder always gives the same package.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PACKAGE=mongarsd
MAINTAINER="${MONGARSD_DEB_MAINTAINER:-mongarsd developers <mongarsd@mongarsd.invalid>}"
# The oldest glibc the folder is built and tested for (Debian bookworm's; packaging/dist).
GLIBC_FLOOR=2.36

die() { echo "build-deb: $*" >&2; exit 1; }
say() { echo "build-deb: $*"; }
usage() { die "usage: packaging/deb/build-deb.sh --arch amd64|arm64 --version V --bundle DIR --out DIR"; }

ARCH="" VERSION="" BUNDLE="" OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH="${2:-}"; shift 2 || usage ;;
        --version) VERSION="${2:-}"; shift 2 || usage ;;
        --bundle) BUNDLE="${2:-}"; shift 2 || usage ;;
        --out) OUT="${2:-}"; shift 2 || usage ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) usage ;;
    esac
done
[ -n "$ARCH" ] && [ -n "$VERSION" ] && [ -n "$BUNDLE" ] && [ -n "$OUT" ] || usage

case "$ARCH" in
    amd64) ELF_MACHINE=62 ;;
    arm64) ELF_MACHINE=183 ;;
    *) die "unknown architecture '$ARCH' (amd64 or arm64)" ;;
esac
# Debian policy 5.6.12: [epoch:]upstream[-revision], upstream starting with a digit.
[[ "$VERSION" =~ ^([0-9]+:)?[0-9][A-Za-z0-9.+~-]*$ ]] || die "'$VERSION' is not a Debian version"
for tool in dpkg-deb gzip readelf; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpkg-dev gzip binutils)"
done

BUNDLE="$(cd "$BUNDLE" 2>/dev/null && pwd)" || die "no bundle folder at $BUNDLE"
EXE="$BUNDLE/mongarsd"
[ -f "$EXE" ] && [ -x "$EXE" ] || die "$BUNDLE has no executable 'mongarsd' (expected a PyInstaller one-dir build)"
[ -d "$BUNDLE/_internal" ] || die "$BUNDLE has no _internal/ folder (expected a PyInstaller one-dir build)"
[ "$(head -c 4 "$EXE" | od -An -c | tr -d ' ')" = '177ELF' ] || die "$EXE is not an ELF executable"
machine="$(od -An -tu2 -j18 -N2 --endian=little "$EXE" | tr -d ' ')"
[ "$machine" = "$ELF_MACHINE" ] || die "$EXE is for ELF machine $machine, not $ARCH ($ELF_MACHINE)"

SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(stat -c %Y "$EXE")}"
export SOURCE_DATE_EPOCH
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DEB="$OUT/${PACKAGE}_${VERSION#*:}_${ARCH}.deb"

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/mongarsd-deb.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/root"
umask 022

# ---------------------------------------------------------------- the folder build
say "copying the folder build from $BUNDLE"
LIB="$ROOT/usr/lib/$PACKAGE"
mkdir -p "$ROOT/usr/lib" "$ROOT/usr/bin"
cp -R --no-preserve=ownership,mode "$BUNDLE" "$LIB"
# Owners come from --root-owner-group; modes are set here: directories 0755, files 0644 but the
# executable. Shared objects need no execute bit (Debian policy 8.1; lintian checks it).
find "$LIB" -type d -exec chmod 0755 {} +
find "$LIB" -type f -exec chmod 0644 {} +
chmod 0755 "$LIB/mongarsd"
ln -s "../lib/$PACKAGE/mongarsd" "$ROOT/usr/bin/mongarsd"

# ---------------------------------------------------------------- dependencies
# The Debian package of each library the folder needs but does not carry (PyInstaller leaves
# out glibc and the libraries every system has). An unknown one stops the build: add it here.
soname_package() {
    case "$1" in
        libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|libutil.so.1|libresolv.so.2|libanl.so.1) echo libc6 ;;
        ld-linux-x86-64.so.2|ld-linux-aarch64.so.1) echo libc6 ;;
        libgcc_s.so.1) echo libgcc-s1 ;;
        libstdc++.so.6) echo libstdc++6 ;;
        libgomp.so.1) echo libgomp1 ;;
        libz.so.1) echo zlib1g ;;
        libcrypt.so.1) echo libcrypt1 ;;
        *) return 1 ;;
    esac
}

say "reading the libraries the folder needs"
declare -A carried=() needed=()
while IFS= read -r -d '' file; do
    carried["${file##*/}"]=1
done < <(find "$LIB" \( -type f -o -type l \) -print0)
# readelf reads every file in one go; it complains (stderr, non-zero) about those that are not ELF.
elf_report() { find "$LIB" -type f -print0 | { xargs -0 readelf "$@" --wide 2>/dev/null || true; }; }
while IFS= read -r soname; do
    needed["$soname"]=1
done < <(elf_report -d | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p' | sort -u)
glibc="$( { echo "$GLIBC_FLOOR"; elf_report -V | sed -n 's/.*Name: GLIBC_\([0-9][0-9.]*\).*/\1/p'; } | sort -uV | tail -n1)"
# The executable itself is loaded by the system's ld.so before PyInstaller's bootloader runs, so
# what it needs comes from the system even when the folder carries a copy (libz.so.1).
declare -A from_system=()
while IFS= read -r soname; do
    from_system["$soname"]=1
    needed["$soname"]=1
done < <(readelf -d --wide "$LIB/mongarsd" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')
declare -A packages=()
for soname in "${!needed[@]}"; do
    [ -n "${carried[$soname]:-}" ] && [ -z "${from_system[$soname]:-}" ] && continue
    pkg="$(soname_package "$soname")" || die "the folder needs $soname, which it does not carry; add its Debian package to soname_package()"
    packages["$pkg"]=1
done
depends="libc6 (>= $glibc)"
for pkg in $(printf '%s\n' "${!packages[@]}" | sort); do
    [ "$pkg" = libc6 ] || depends="$depends, $pkg"
done
# passwd: useradd, for systems without systemd-sysusers (a chroot, an image being built).
depends="$depends, passwd"

# ---------------------------------------------------------------- systemd, config, docs
install -D -m 0644 "$REPO/systemd/mongarsd.service" "$ROOT/usr/lib/systemd/system/mongarsd.service"
install -D -m 0644 "$REPO/systemd/mongarsd.sysusers.conf" "$ROOT/usr/lib/sysusers.d/mongarsd.conf"
install -D -m 0644 "$HERE/tmpfiles.conf" "$ROOT/usr/lib/tmpfiles.d/mongarsd.conf"
install -D -m 0644 "$HERE/mongarsd.toml" "$ROOT/etc/mongarsd/mongarsd.toml"

DOC="$ROOT/usr/share/doc/$PACKAGE"
install -D -m 0644 "$HERE/copyright" "$DOC/copyright"
install -D -m 0644 "$REPO/README.md" "$DOC/README.md"  # the unit's Documentation= points here
install -D -m 0644 "$HERE/README.Debian" "$DOC/README.Debian"
install -D -m 0644 "$REPO/systemd/jetson.conf" "$DOC/examples/jetson.conf"
# A native version (no Debian revision) keeps its history in changelog.gz, any other in
# changelog.Debian.gz (Debian policy 12.7).
case "$VERSION" in *-*) changelog=changelog.Debian.gz ;; *) changelog=changelog.gz ;; esac
{
    echo "$PACKAGE ($VERSION) bookworm; urgency=medium"
    echo
    echo "  * mongarsd $VERSION: the folder build of packaging/dist, packaged by"
    echo "    packaging/deb/build-deb.sh."
    echo
    echo " -- $MAINTAINER  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$DOC/$changelog"
chmod 0644 "$DOC/$changelog"

install -d -m 0755 "$ROOT/usr/share/man/man1"
gzip -9n <"$HERE/mongarsd.1" >"$ROOT/usr/share/man/man1/mongarsd.1.gz"
chmod 0644 "$ROOT/usr/share/man/man1/mongarsd.1.gz"
install -D -m 0644 "$HERE/lintian-overrides" "$ROOT/usr/share/lintian/overrides/$PACKAGE"

# ---------------------------------------------------------------- DEBIAN/
install -d -m 0755 "$ROOT/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$HERE/$script" "$ROOT/DEBIAN/$script"
done
echo /etc/mongarsd/mongarsd.toml >"$ROOT/DEBIAN/conffiles"
chmod 0644 "$ROOT/DEBIAN/conffiles"

# Installed-Size the way dpkg-gencontrol counts it: KiB per regular file, rounded up, and 1 for
# every other entry (directory, symlink).
installed_size="$(find "$ROOT" -mindepth 1 -path "$ROOT/DEBIAN" -prune -o \( -type f -printf '%s\n' -o -printf 'x\n' \) \
    | awk '$1 == "x" { n += 1; next } { n += int(($1 + 1023) / 1024) } END { print n }')"

sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@MAINTAINER@|$MAINTAINER|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" \
    "$HERE/control.in" >"$ROOT/DEBIAN/control"
chmod 0644 "$ROOT/DEBIAN/control"
grep -q '@[A-Z_]*@' "$ROOT/DEBIAN/control" && die "control.in has a placeholder this script does not fill"

( cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0r md5sum | sed 's|  \./|  |' ) \
    >"$ROOT/DEBIAN/md5sums"
chmod 0644 "$ROOT/DEBIAN/md5sums"

# Every file dated SOURCE_DATE_EPOCH, so the same folder gives the same package.
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

say "building $DEB (Installed-Size $installed_size KiB; Depends: $depends)"
rm -f "$DEB"
# gzip: a third larger than xz, but built in seconds instead of minutes on two cores.
dpkg-deb --root-owner-group -Zgzip -z9 --build "$ROOT" "$DEB" >/dev/null
say "done: $DEB ($(du -h "$DEB" | cut -f1))"
