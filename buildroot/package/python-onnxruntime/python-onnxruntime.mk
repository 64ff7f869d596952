################################################################################
#
# python-onnxruntime
#
################################################################################

# ONNX Runtime with its Python bindings, CPU execution provider only.
# Upstream ships no sdist: this is the GitHub source of the release tag,
# built with CMake (cmake/ is the project), then packed into a wheel by
# upstream's setup.py and installed like any other Python package.
PYTHON_ONNXRUNTIME_VERSION = 1.21.0
PYTHON_ONNXRUNTIME_SITE = $(call github,microsoft,onnxruntime,v$(PYTHON_ONNXRUNTIME_VERSION))
PYTHON_ONNXRUNTIME_SUBDIR = cmake
PYTHON_ONNXRUNTIME_SUPPORTS_IN_SOURCE_BUILD = NO
# ONNX Runtime is MIT; the libraries it compiles in are listed in
# ThirdPartyNotices.txt (Apache-2.0, BSD, BSL-1.0, MIT, MPL-2.0).
PYTHON_ONNXRUNTIME_LICENSE = MIT, Apache-2.0, BSD-2-Clause, BSD-3-Clause, BSL-1.0, MPL-2.0
PYTHON_ONNXRUNTIME_LICENSE_FILES = LICENSE ThirdPartyNotices.txt
PYTHON_ONNXRUNTIME_DEPENDENCIES = \
	host-python-numpy \
	host-python-packaging \
	host-python-installer \
	host-python-setuptools \
	host-python-wheel \
	host-python3 \
	python-numpy \
	python3

# The build takes its dependencies from cmake/deps.txt, as archives that
# CMake's FetchContent would download at configure time. Buildroot
# downloads (and checks) them instead, and puts each where upstream's build
# looks for a local copy first: <source>/mirror/<URL without https://>.
# This list is the one of a Linux CPU build with the Python bindings; it
# must follow cmake/deps.txt on each version bump.
PYTHON_ONNXRUNTIME_DEPS = \
	github.com/abseil/abseil-cpp/archive/refs/tags/20240722.0.zip \
	github.com/HowardHinnant/date/archive/refs/tags/v3.0.1.zip \
	github.com/dmlc/dlpack/archive/refs/tags/v0.6.zip \
	gitlab.com/libeigen/eigen/-/archive/1d8b82b0740839c0de7f1242a3585e3390ff5f33/eigen-1d8b82b0740839c0de7f1242a3585e3390ff5f33.zip \
	github.com/google/flatbuffers/archive/refs/tags/v23.5.26.zip \
	github.com/nlohmann/json/archive/refs/tags/v3.11.3.zip \
	github.com/microsoft/GSL/archive/refs/tags/v4.0.0.zip \
	github.com/boostorg/mp11/archive/refs/tags/boost-1.82.0.zip \
	github.com/onnx/onnx/archive/refs/tags/v1.17.0.zip \
	github.com/protocolbuffers/protobuf/archive/refs/tags/v21.12.zip \
	github.com/pybind/pybind11/archive/refs/tags/v2.13.6.zip \
	github.com/pytorch/cpuinfo/archive/8a1772a0c5c447df2d18edf33ec4603a8c9c04a6.zip \
	github.com/google/re2/archive/refs/tags/2024-07-02.zip \
	github.com/dcleblanc/SafeInt/archive/refs/tags/3.0.28.zip \
	github.com/protocolbuffers/utf8_range/archive/72c943dea2b9240cd09efde15191e144bc7c7d38.zip

# protoc must run on the build machine and match the protobuf library
# above (21.12): when cross-compiling, upstream uses the protoc release
# binary for the build machine's architecture.
ifeq ($(HOSTARCH),x86_64)
PYTHON_ONNXRUNTIME_DEPS += \
	github.com/protocolbuffers/protobuf/releases/download/v21.12/protoc-21.12-linux-x86_64.zip
else ifeq ($(HOSTARCH),aarch64)
PYTHON_ONNXRUNTIME_DEPS += \
	github.com/protocolbuffers/protobuf/releases/download/v21.12/protoc-21.12-linux-aarch_64.zip
endif

PYTHON_ONNXRUNTIME_EXTRA_DOWNLOADS = $(addprefix https://,$(PYTHON_ONNXRUNTIME_DEPS))

define PYTHON_ONNXRUNTIME_FILL_DEPS_MIRROR
	$(foreach d,$(PYTHON_ONNXRUNTIME_DEPS),\
		$(INSTALL) -D -m 0644 $(PYTHON_ONNXRUNTIME_DL_DIR)/$(notdir $(d)) \
			$(@D)/mirror/$(d)$(sep))
endef
PYTHON_ONNXRUNTIME_POST_EXTRACT_HOOKS += PYTHON_ONNXRUNTIME_FILL_DEPS_MIRROR

# - FETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER: always the pinned archives
#   above, never a different version of abseil/protobuf/re2... that other
#   packages may have put in staging.
# - Python: the host interpreter (with host-python-numpy, for the version
#   check) but the target's headers.
# - --compile-no-warning-as-error: upstream turns warnings into errors,
#   which a newer compiler than upstream's CI would trip on.
# - CMAKE_POLICY_VERSION_MINIMUM: some bundled projects still declare a
#   CMake minimum that CMake 4 no longer accepts.
PYTHON_ONNXRUNTIME_CONF_OPTS = \
	--compile-no-warning-as-error \
	-DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
	-DFETCHCONTENT_TRY_FIND_PACKAGE_MODE=NEVER \
	-Donnxruntime_CROSS_COMPILING=ON \
	-Donnxruntime_ENABLE_PYTHON=ON \
	-Donnxruntime_BUILD_SHARED_LIB=OFF \
	-Donnxruntime_BUILD_UNIT_TESTS=OFF \
	-Donnxruntime_BUILD_BENCHMARKS=OFF \
	-Donnxruntime_RUN_ONNX_TESTS=OFF \
	-Donnxruntime_USE_XNNPACK=OFF \
	-Donnxruntime_USE_MIMALLOC=OFF \
	-Donnxruntime_ENABLE_LTO=OFF \
	-Donnxruntime_ENABLE_CPUINFO=ON \
	-DPython_EXECUTABLE=$(HOST_DIR)/bin/python3 \
	-DPython_INCLUDE_DIR=$(STAGING_DIR)/usr/include/python$(PYTHON3_VERSION_MAJOR) \
	-DPython_NumPy_INCLUDE_DIR=$(PYTHON3_PATH)/site-packages/numpy/_core/include

# The CMake build leaves the Python package tree (onnxruntime/ with the
# compiled onnxruntime_pybind11_state.so) in the build directory; upstream's
# setup.py, run from there, makes the wheel.
define PYTHON_ONNXRUNTIME_BUILD_WHEEL
	cd $(PYTHON_ONNXRUNTIME_BUILDDIR) && rm -rf dist && \
		$(PKG_PYTHON_SETUPTOOLS_ENV) \
		$(HOST_DIR)/bin/python3 $(@D)/setup.py bdist_wheel
endef
PYTHON_ONNXRUNTIME_POST_BUILD_HOOKS += PYTHON_ONNXRUNTIME_BUILD_WHEEL

define PYTHON_ONNXRUNTIME_INSTALL_TARGET_CMDS
	cd $(PYTHON_ONNXRUNTIME_BUILDDIR) && \
		$(PKG_PYTHON_SETUPTOOLS_ENV) \
		$(HOST_DIR)/bin/python3 \
		$(PKG_PYTHON_SETUPTOOLS_INSTALL_TARGET_CMD)
endef

$(eval $(cmake-package))
