################################################################################
#
# python-llama-cpp
#
################################################################################

# llama-cpp-python: ctypes bindings plus the llama.cpp it vendors
# (vendor/llama.cpp). Its PEP 517 backend, scikit-build-core, runs CMake on
# the vendored tree and puts libllama/libggml*.so into the wheel, next to the
# Python code, where the bindings load them. Building from the sdist keeps
# the library and the bindings at the exact llama.cpp revision they were
# released for (Buildroot's own llama-cpp package follows another one).
PYTHON_LLAMA_CPP_VERSION = 0.3.36
PYTHON_LLAMA_CPP_SOURCE = llama_cpp_python-$(PYTHON_LLAMA_CPP_VERSION).tar.gz
PYTHON_LLAMA_CPP_SITE = https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3
PYTHON_LLAMA_CPP_SETUP_TYPE = pep517
PYTHON_LLAMA_CPP_LICENSE = MIT
PYTHON_LLAMA_CPP_LICENSE_FILES = LICENSE.md vendor/llama.cpp/LICENSE
PYTHON_LLAMA_CPP_DEPENDENCIES = \
	$(BR2_CMAKE_HOST_DEPENDENCY) \
	host-ninja \
	host-python-scikit-build-core

# Cross-compile with Buildroot's toolchain file. Never -march=native: the
# instruction set is the one chosen in the package's menu (the same variants
# as native/build-lib.sh). Only the libraries the bindings load are built.
PYTHON_LLAMA_CPP_CMAKE_ARGS = \
	-DCMAKE_TOOLCHAIN_FILE=$(HOST_DIR)/share/buildroot/toolchainfile.cmake \
	-DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
	-DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF \
	-DLLAMA_CURL=OFF \
	-DLLAMA_OPENSSL=OFF \
	-DGGML_NATIVE=OFF \
	-DGGML_BACKEND_DL=OFF \
	-DGGML_CPU_ALL_VARIANTS=OFF \
	-DGGML_BLAS=OFF \
	-DGGML_VULKAN=OFF

ifeq ($(BR2_TOOLCHAIN_HAS_OPENMP),y)
PYTHON_LLAMA_CPP_CMAKE_ARGS += -DGGML_OPENMP=ON
else
PYTHON_LLAMA_CPP_CMAKE_ARGS += -DGGML_OPENMP=OFF
endif

# x86 switches are all given, so nothing depends on ggml's defaults.
PYTHON_LLAMA_CPP_X86_OFF = \
	-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_BMI2=OFF -DGGML_FMA=OFF \
	-DGGML_F16C=OFF -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF \
	-DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

ifeq ($(BR2_PACKAGE_PYTHON_LLAMA_CPP_CPU_ARMV8A),y)
# Cortex-A72 (Raspberry Pi 4): the Armv8.0 baseline, no dotprod.
PYTHON_LLAMA_CPP_CMAKE_ARGS += -DGGML_CPU_ARM_ARCH=armv8-a
else ifeq ($(BR2_PACKAGE_PYTHON_LLAMA_CPP_CPU_ARMV8_2A_DOTPROD),y)
# Cortex-A76 (Raspberry Pi 5): Armv8.2 with dotprod and fp16.
PYTHON_LLAMA_CPP_CMAKE_ARGS += -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16
else ifeq ($(BR2_PACKAGE_PYTHON_LLAMA_CPP_CPU_X86_64_V2),y)
# SSE4.2/POPCNT: any x86-64 since Nehalem.
PYTHON_LLAMA_CPP_CMAKE_ARGS += $(PYTHON_LLAMA_CPP_X86_OFF) -DGGML_SSE42=ON
else ifeq ($(BR2_PACKAGE_PYTHON_LLAMA_CPP_CPU_X86_64_V3),y)
# AVX2/FMA/F16C/BMI2, no AVX-512: Haswell, Zen and later.
PYTHON_LLAMA_CPP_CMAKE_ARGS += $(PYTHON_LLAMA_CPP_X86_OFF) \
	-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON
endif

# scikit-build-core adds CMAKE_ARGS to its own CMake command line.
PYTHON_LLAMA_CPP_ENV = CMAKE_ARGS="$(PYTHON_LLAMA_CPP_CMAKE_ARGS)"

$(eval $(python-package))
