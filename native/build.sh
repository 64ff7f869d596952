#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, llama-server, rpc-server, llama-batched-bench)
# from the exact llama.cpp source vendored by the installed llama-cpp-python version.
#
# Usage: native/build.sh            (BOARD=auto)
#        BOARD=pi5 native/build.sh  (x86 | arm64 | pi4 | pi5 | cuda | auto)
# Env:   VENV (default: <repo>/.venv), JOBS (default: nproc), FORCE=1 (rebuild),
#        CUDA_ARCHS (default 87 = Jetson Orin), CMAKE_EXTRA (extra -D flags).
# Output: native/bin/<tool> and native/bin/VERSION (the stamp checked for idempotency).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
BOARD="${BOARD:-auto}"
JOBS="${JOBS:-$(nproc)}"
CUDA_ARCHS="${CUDA_ARCHS:-87}"
TARGETS=(llama-bench llama-server rpc-server llama-batched-bench)

die() { echo "native/build.sh: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no python at $PY (set VENV=...)"
VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null)" \
    || die "llama-cpp-python is not installed in $VENV"

detect_board() {
    local model=""
    [ -r /proc/device-tree/model ] && model="$(tr -d '\0' </proc/device-tree/model)"
    # CUDA only with both a GPU and a toolkit: nvcc alone (a CI image) is not a GPU.
    local nvcc=""
    command -v nvcc >/dev/null 2>&1 && nvcc=1
    [ -x /usr/local/cuda/bin/nvcc ] && nvcc=1
    if [ -n "$nvcc" ] && { [ -e /etc/nv_tegra_release ] || [ -e /dev/nvidiactl ]; }; then
        echo cuda; return
    fi
    case "$(uname -m)" in
        x86_64|amd64) echo x86 ;;
        aarch64|arm64)
            case "$model" in
                "Raspberry Pi 5"*|"Raspberry Pi Compute Module 5"*|"Raspberry Pi 500"*) echo pi5 ;;
                "Raspberry Pi 4"*|"Raspberry Pi Compute Module 4"*|"Raspberry Pi 400"*) echo pi4 ;;
                *) echo arm64 ;;
            esac ;;
        *) echo generic ;;
    esac
}
[ "$BOARD" = auto ] && BOARD="$(detect_board)"

# Per-board flags. GGML_NATIVE=ON tunes for the CPU doing the build (the right choice when
# building on the board itself); the Pi entries pin the ISA instead so the same flags also
# work when cross-building (Cortex-A72: Armv8.0 + CRC, no dotprod; Cortex-A76: Armv8.2 with
# dotprod, fp16, rcpc).
case "$BOARD" in
    x86)     BOARD_FLAGS=(-DGGML_NATIVE=ON) ;;
    arm64)   BOARD_FLAGS=(-DGGML_NATIVE=ON) ;;
    pi4)     BOARD_FLAGS=(-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a+crc) ;;
    pi5)     BOARD_FLAGS=(-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+fp16+dotprod+rcpc) ;;
    cuda)    BOARD_FLAGS=(-DGGML_NATIVE=ON -DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS") ;;
    generic) BOARD_FLAGS=(-DGGML_NATIVE=OFF) ;;
    *) die "unknown BOARD=$BOARD (x86 | arm64 | pi4 | pi5 | cuda | generic | auto)" ;;
esac
# A native x86 build leaves AMX out, as the daemon's own build does (the Makefile's LLAMA_CFLAGS):
# this llama.cpp's AMX kernels crash on their first prompt batch on AMX CPUs.
if [ "$BOARD" = x86 ] || { [ "$BOARD" = cuda ] && [ "$(uname -m)" = x86_64 ]; }; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    BOARD_FLAGS+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
fi

FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF          # self-contained binaries in native/bin
    -DGGML_RPC=ON                    # rpc-server
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF   # no network at build time
    "${BOARD_FLAGS[@]}"
)
# shellcheck disable=SC2206
[ -n "${CMAKE_EXTRA:-}" ] && FLAGS+=($CMAKE_EXTRA)

PATCHES="$("$HERE/patches.sh" key "$VERSION")"  # mongarsd's patches to it (native/patches/)
STAMP="llama-cpp-python $VERSION patches=$PATCHES board=$BOARD flags=${FLAGS[*]}"
BIN="$HERE/bin"
if [ "${FORCE:-0}" != 1 ] && [ -f "$BIN/VERSION" ] && [ "$(cat "$BIN/VERSION")" = "$STAMP" ]; then
    missing=0
    for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || missing=1; done
    if [ "$missing" = 0 ]; then echo "native: up to date ($STAMP)"; exit 0; fi
fi

LLAMA="$(VENV="$VENV" "$HERE/fetch-src.sh")"

BUILD="$HERE/build/$VERSION-$BOARD"
mkdir -p "$BUILD"

# The RPC server's CMake target was renamed (rpc-server -> ggml-rpc-server) and moved
# (examples/rpc -> tools/rpc); build whatever this llama.cpp calls it, install it as rpc-server.
RPC_TARGET=rpc-server
for d in tools/rpc examples/rpc; do
    if [ -f "$LLAMA/$d/CMakeLists.txt" ]; then
        t="$(sed -n 's/^set(TARGET \([A-Za-z0-9_-]*\)).*/\1/p' "$LLAMA/$d/CMakeLists.txt" | head -1)"
        [ -n "$t" ] && RPC_TARGET="$t"
        break
    fi
done
BUILD_TARGETS=(llama-bench llama-server llama-batched-bench "$RPC_TARGET")
echo "native: configuring $BOARD: ${FLAGS[*]}"
cmake -S "$LLAMA" -B "$BUILD" "${FLAGS[@]}" >"$BUILD.configure.log" 2>&1 \
    || { tail -40 "$BUILD.configure.log"; die "cmake configure failed (log: $BUILD.configure.log)"; }
echo "native: building ${BUILD_TARGETS[*]} with -j$JOBS"
cmake --build "$BUILD" --config Release -j"$JOBS" --target "${BUILD_TARGETS[@]}"

mkdir -p "$BIN"
for t in llama-bench llama-server llama-batched-bench; do
    install -m 0755 "$BUILD/bin/$t" "$BIN/$t"
done
install -m 0755 "$BUILD/bin/$RPC_TARGET" "$BIN/rpc-server"
# The patched flash-attention kernel against a double-precision reference (CPU builds; the
# CUDA build's static ggml would need the CUDA libraries linked in too).
if [ "$BOARD" != cuda ]; then
    echo "native: checking flash-attention decoding (native/checks/fa_decode.cpp)"
    "${CXX:-c++}" -O2 -std=c++17 -I"$LLAMA/ggml/include" "$HERE/checks/fa_decode.cpp" \
        "$BUILD/ggml/src/libggml.a" "$BUILD/ggml/src/libggml-cpu.a" "$BUILD/ggml/src/libggml-base.a" \
        -fopenmp -lpthread -lm -o "$BUILD/fa_decode" \
        || die "cannot build native/checks/fa_decode.cpp"
    "$BUILD/fa_decode" >"$BUILD/fa_decode.log" 2>&1 \
        || { cat "$BUILD/fa_decode.log"; die "flash-attention decode check failed (log: $BUILD/fa_decode.log)"; }
    tail -1 "$BUILD/fa_decode.log"
fi
echo "$STAMP" >"$BIN/VERSION"
echo "native: installed ${TARGETS[*]} into $BIN ($STAMP)"
