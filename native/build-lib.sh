#!/usr/bin/env bash
# Build llama.cpp as the shared libraries llama-cpp-python loads (libllama + ggml), for
# distribution: never -march=native, one explicit instruction-set variant per build.
#
# Usage: native/build-lib.sh ARCH VARIANT
#   x86_64  x86-64-v2           SSE4.2/POPCNT: any x86-64 since Nehalem (old i7s)
#   x86_64  x86-64-v3           AVX2/FMA/F16C/BMI2, no AVX-512: Haswell and later, Zen
#   x86_64  x86-64-v4           + AVX-512 F/CD/BW/DQ/VL: Skylake-SP and later, Zen 4
#   x86_64  x86-64-v4-vnni      + AVX-512 VNNI: Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4
#   arm64   armv8-a             Cortex-A72 (Pi 4), any 64-bit Arm: no dotprod
#   arm64   armv8.2-a+dotprod   Cortex-A76 (Pi 5), Cortex-A78AE (Orin): dotprod + fp16
# Env:   VENV (default <repo>/.venv), JOBS (default nproc),
#        MONGARSD_BUILD_CACHE (default ~/.cache/mongarsd-build): finished builds are kept
#        there under a key of the llama.cpp version, the flags and the compiler, so a clean
#        clone on the same machine reuses them.
# Output: native/libs/<arch>/<variant>/ with libllama.so, libggml*.so.0, libgomp.so.1 and
#         BUILDINFO (one line: version, variant, compiler, flags).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
JOBS="${JOBS:-$(nproc)}"
CACHE="${MONGARSD_BUILD_CACHE:-$HOME/.cache/mongarsd-build}"
# Bump when the way the libraries are built or laid out changes.
RECIPE=2

die() { echo "native/build-lib.sh: $*" >&2; exit 1; }
[ $# = 2 ] || die "usage: native/build-lib.sh ARCH VARIANT (see the header)"
ARCH="$1"
VARIANT="$2"

[ -x "$PY" ] || die "no python at $PY (set VENV=...)"
VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null)" \
    || die "llama-cpp-python is not installed in $VENV"

# Every instruction-set switch is given explicitly, so nothing depends on CMake defaults.
X86_OFF=(-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_AVX_VNNI=OFF
         -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF
         -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
X86_V3=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
case "$ARCH/$VARIANT" in
    x86_64/x86-64-v2)
        ISA=("${X86_OFF[@]}" -DGGML_SSE42=ON); CC_PREFIX="" ;;
    x86_64/x86-64-v3)
        ISA=("${X86_OFF[@]}" "${X86_V3[@]}"); CC_PREFIX="" ;;
    x86_64/x86-64-v4)
        ISA=("${X86_OFF[@]}" "${X86_V3[@]}" -DGGML_AVX512=ON); CC_PREFIX="" ;;
    x86_64/x86-64-v4-vnni)
        # Tuned for a current AVX-512 core: tuning picks among instructions the variant may
        # use anyway, so it runs the same everywhere (native/README.md has the measurement).
        ISA=("${X86_OFF[@]}" "${X86_V3[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
             -DCMAKE_C_FLAGS=-mtune=sapphirerapids -DCMAKE_CXX_FLAGS=-mtune=sapphirerapids); CC_PREFIX="" ;;
    arm64/armv8-a)
        ISA=(-DGGML_CPU_ARM_ARCH=armv8-a); CC_PREFIX=aarch64-linux-gnu- ;;
    arm64/armv8.2-a+dotprod)
        ISA=(-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16); CC_PREFIX=aarch64-linux-gnu- ;;
    *) die "unknown ARCH/VARIANT $ARCH/$VARIANT (x86_64: x86-64-v2 x86-64-v3 x86-64-v4 x86-64-v4-vnni; arm64: armv8-a armv8.2-a+dotprod)" ;;
esac

HOST_ARCH="$(uname -m)"
TOOLCHAIN=()
if [ "$ARCH" = arm64 ] && [ "$HOST_ARCH" != aarch64 ]; then
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 \
        || die "cross-compiling for arm64 needs aarch64-linux-gnu-gcc (Debian: apt-get install crossbuild-essential-arm64)"
    TOOLCHAIN=(-DCMAKE_TOOLCHAIN_FILE="$HERE/toolchain-aarch64.cmake")
elif [ "$ARCH" = x86_64 ] && [ "$HOST_ARCH" != x86_64 ]; then
    die "x86_64 libraries are built on an x86_64 host"
else
    CC_PREFIX=""
fi
CC="${CC_PREFIX}gcc"
CC_VERSION="$("$CC" -dumpfullversion 2>/dev/null)" || die "no compiler $CC"

FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    -DGGML_NATIVE=OFF
    -DGGML_BACKEND_DL=OFF
    -DGGML_OPENMP=ON
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    "${ISA[@]}"
)
PATCHES="$("$HERE/patches.sh" key "$VERSION")"  # mongarsd's patches to it (native/patches/)
INFO="llama-cpp-python=$VERSION patches=$PATCHES arch=$ARCH variant=$VARIANT cc=$CC-$CC_VERSION recipe=$RECIPE flags=${FLAGS[*]}"
KEY="$(printf '%s' "$INFO" | sha256sum | cut -c1-16)"
CACHED="$CACHE/native-libs/$ARCH-$VARIANT-$KEY"
OUT="$HERE/libs/$ARCH/$VARIANT"

command -v patchelf >/dev/null 2>&1 || die "patchelf is missing (Debian: apt-get install patchelf)"
install_from_cache() {
    rm -rf "$OUT.tmp"
    mkdir -p "$OUT.tmp"
    cp -a "$CACHED/." "$OUT.tmp/"
    # CMake leaves the build tree's absolute path as the libraries' RUNPATH; they must find
    # each other (and libgomp) in their own folder wherever it is unpacked.
    for lib in "$OUT.tmp"/*.so*; do
        patchelf --set-rpath '$ORIGIN' "$lib"
    done
    rm -rf "$OUT"
    mv "$OUT.tmp" "$OUT"
}

if [ -f "$OUT/BUILDINFO" ] && [ "$(cat "$OUT/BUILDINFO")" = "$INFO" ] \
    && [ "$(patchelf --print-rpath "$OUT/libllama.so" 2>/dev/null)" = '$ORIGIN' ]; then
    echo "native: $ARCH/$VARIANT up to date"
    exit 0
fi
if [ -f "$CACHED/BUILDINFO" ] && [ "$(cat "$CACHED/BUILDINFO")" = "$INFO" ]; then
    install_from_cache
    echo "native: $ARCH/$VARIANT from the build cache ($CACHED)"
    exit 0
fi

LLAMA="$("$HERE/fetch-src.sh")"
BUILD="$HERE/build/lib-$VERSION-$ARCH-$VARIANT"
mkdir -p "$BUILD"
echo "native: configuring $ARCH/$VARIANT (${ISA[*]})"
cmake -S "$LLAMA" -B "$BUILD" "${TOOLCHAIN[@]}" "${FLAGS[@]}" >"$BUILD.configure.log" 2>&1 \
    || { tail -40 "$BUILD.configure.log"; die "cmake configure failed (log: $BUILD.configure.log)"; }
echo "native: building libllama for $ARCH/$VARIANT with -j$JOBS (several minutes on two cores)"
started=$SECONDS
# Progress: cmake prints one "[ nn%] Building ..." line per object; keep every tenth.
cmake --build "$BUILD" --config Release -j"$JOBS" --target llama 2>&1 \
    | awk '/^\[ *[0-9]+%\]/ { n++; if (n % 10 == 1) { print "native:   " $0; fflush() } next } /error|Error/ { print; fflush() }'
[ -f "$BUILD/bin/libllama.so" ] || die "the build produced no libllama.so (see above)"

# The patched flash-attention kernel against a double-precision reference, where this CPU can
# run the variant (checks/fa_decode.cpp; native/README.md). What a variant needs is the
# daemon's own table (mongarsd/inference/libvariant.py).
runs_here() {
    PYTHONPATH="$REPO" "$PY" -c '
import platform, sys
from mongarsd.inference.libvariant import VARIANTS, detect_hwcaps, normalise_arch
arch = normalise_arch(platform.machine())
v = next(v for v in VARIANTS if v.name == sys.argv[1])
sys.exit(0 if v.arch == arch and v.requires <= detect_hwcaps(arch) else 1)' "$VARIANT"
}
if runs_here; then
    "${CC_PREFIX}g++" -O2 -std=c++17 -I"$LLAMA/ggml/include" "$HERE/checks/fa_decode.cpp" \
        -L"$BUILD/bin" -Wl,-rpath,"$BUILD/bin" -lggml -lggml-cpu -lggml-base -lm -o "$BUILD/fa_decode" \
        || die "cannot build native/checks/fa_decode.cpp"
    "$BUILD/fa_decode" >"$BUILD/fa_decode.log" 2>&1 \
        || { cat "$BUILD/fa_decode.log"; die "flash-attention decode check failed for $ARCH/$VARIANT (log: $BUILD/fa_decode.log)"; }
    echo "native: $ARCH/$VARIANT: $(tail -1 "$BUILD/fa_decode.log")"
fi

STAGE="$CACHED.tmp.$$"
rm -rf "$STAGE"
mkdir -p "$STAGE"
# Copy under the names the loader asks for (the sonames), following the symlinks.
cp -L "$BUILD/bin/libllama.so" "$STAGE/libllama.so"
for lib in libggml libggml-base libggml-cpu; do
    cp -L "$BUILD/bin/$lib.so" "$STAGE/$lib.so.0"
done
# OpenMP's runtime travels with the libraries (RUNPATH=$ORIGIN finds it): a minimal root
# has no libgomp1.
GOMP="$("$CC" -print-file-name=libgomp.so.1)"
[ -f "$GOMP" ] || die "the $CC toolchain has no libgomp.so.1"
cp -L "$GOMP" "$STAGE/libgomp.so.1"
STRIP="${CC_PREFIX}strip"
"$STRIP" --strip-unneeded "$STAGE"/*.so* 2>/dev/null || true
echo "$INFO" >"$STAGE/BUILDINFO"
mkdir -p "$(dirname "$CACHED")"
rm -rf "$CACHED"
mv "$STAGE" "$CACHED"
install_from_cache
echo "native: $ARCH/$VARIANT built in $((SECONDS - started)) s into $OUT (cached as $CACHED)"
