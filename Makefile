# mongarsd — one command to install, run, test, check and benchmark.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS ?= models
STATE ?= .state
# Build llama.cpp inside llama-cpp-python for this CPU (AVX2/AVX-512 on x86, NEON/dotprod on Arm).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
# x86: never AMX. The vendored llama.cpp's AMX kernels crash with a general protection fault on
# their first prompt batch on AMX CPUs (seen on a Sapphire Rapids-class VM: the tile configuration
# can be optimised away and worker threads never ask for the tile-data permission). native/build.sh
# leaves AMX out the same way, so llama.cpp's own tools and the daemon run the same kernels.
LLAMA_CFLAGS ?= $(if $(filter x86_64 amd64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16,)
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' setup.py)
STAMP := $(VENV)/.installed
MODELS_STAMP := $(MODELS)/.installed

ARCH ?= $(shell uname -m | sed -e 's/aarch64/arm64/' -e 's/amd64/x86_64/')
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' mongarsd/__init__.py)
DEB_ARCH = $(if $(filter arm64,$(ARCH)),arm64,amd64)

.PHONY: install dev run test test-fast test-dist image test-image fuzz check bench native native-libs dist deb clean distclean test-deps

install: $(STAMP) $(MODELS_STAMP)

# A developer's setup: the venv with llama.cpp built for this machine's CPU, and the default models.
dev: install

$(STAMP): setup.py pyproject.toml scripts/llama-wheel.sh native/patches.sh $(wildcard native/patches/*/*.patch)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip wheel setuptools
	@echo "installing mongarsd and its dependencies (the first build of llama-cpp-python takes several minutes)"
	@# llama-cpp-python from a wheel built for this CPU and these flags (scripts/llama-wheel.sh);
	@# its dependencies come with the package's install below, which keeps this wheel
	wheel="$$(CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CFLAGS="$(LLAMA_CFLAGS)" scripts/llama-wheel.sh $(PY) $(LLAMA_VERSION))" \
		&& $(PY) -m pip install -q --force-reinstall --no-deps "$$wheel"
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	@touch $@

$(MODELS_STAMP): $(STAMP) mongarsd/inference/defaults.py mongarsd/inference/onnx_convert.py
	$(PY) -m mongarsd.inference.defaults --models-dir $(MODELS) --cache-dir .cache/models
	@touch $@

test-deps:
	@bash scripts/install-test-deps.sh

# mongarsd's bytecode caches, as an installed package has them: without them (an editable install
# where the environment sets PYTHONDONTWRITEBYTECODE) every start compiles the sources again,
# 0.5 s on a 2-core board; every daemon the tests start pays it. Up-to-date files are skipped.
BYTECODE = $(PY) -m compileall -q mongarsd >/dev/null

run: install
	@$(BYTECODE)
	$(PY) -m mongarsd run --state-dir $(STATE) --models-dir $(MODELS)

test: install test-deps
	@$(BYTECODE)
	$(PY) -m pytest -q --durations=15

# Long fuzz run of every decoder and validator (make test runs the same properties briefly), and a
# long schemathesis run of every route against /openapi.json (SCHEMATHESIS_EXAMPLES per operation and mode).
FUZZ_TESTS := tests/unit/test_fuzz_inputs.py tests/unit/test_grammar_bounds.py tests/unit/test_gguf.py tests/mesh/test_wire.py tests/mesh/test_hostile.py tests/integration/test_fuzz_routes.py tests/integration/test_openapi.py
SCHEMATHESIS_EXAMPLES ?= 200
fuzz: install
	HYPOTHESIS_PROFILE=fuzz SCHEMATHESIS_EXAMPLES=$(SCHEMATHESIS_EXAMPLES) $(PY) -m pytest -q --timeout 3600 $(FUZZ_TESTS)

test-fast: install
	@$(BYTECODE)
	$(PY) -m pytest -q tests/unit

check: $(STAMP)
	$(VENV)/bin/ruff check mongarsd tests bench packaging
	$(VENV)/bin/ruff format --check mongarsd tests bench packaging
	$(VENV)/bin/mypy

native: $(STAMP)
	$(MAKE) -C native PYTHON=$(abspath $(PY))

# Portable llama.cpp libraries for distribution (never -march=native): native/libs/<arch>/<variant>.
native-libs: $(STAMP)
	native/build-lib.sh $(ARCH) $(if $(filter arm64,$(ARCH)),armv8-a,x86-64-v2)
	native/build-lib.sh $(ARCH) $(if $(filter arm64,$(ARCH)),armv8.2-a+dotprod,x86-64-v3)
	$(if $(filter arm64,$(ARCH)),,native/build-lib.sh $(ARCH) x86-64-v4)
	$(if $(filter arm64,$(ARCH)),,native/build-lib.sh $(ARCH) x86-64-v4-vnni)

# One executable per architecture (dist/mongarsd-<version>-linux-<arch>) and its folder build
# (build/dist/<arch>/mongarsd); ARCH=x86_64|arm64. Needs root (it builds in a chroot).
dist: $(STAMP)
	packaging/dist/build.sh $(ARCH)

# The Debian package of that folder build: dist/mongarsd_<version>_<deb arch>.deb.
deb: dist
	packaging/deb/build-deb.sh --arch $(DEB_ARCH) --version $(VERSION) --bundle build/dist/$(ARCH)/mongarsd --out dist

# The arm64 build and its smoke test under qemu-user (the x86-64 ones run in make test).
test-dist: install test-deps
	MONGARSD_TEST_DIST_ARM64=1 $(PY) -m pytest -q -s -m dist_arm64 tests/packaging

# A flashable disk image, BOARD=pi4|x86-64: Debian bookworm (mmdebstrap) with the board's
# kernel, systemd and the .deb of the board's architecture; dist/mongarsd-<version>-<board>.img.
# Needs root. The Debian root is cached in ~/.cache/mongarsd-build/images (images/README.md).
BOARD ?= x86-64
IMAGE_ARCH = $(if $(filter pi4 pi5,$(BOARD)),arm64,x86_64)
IMAGE_DEB = dist/mongarsd_$(VERSION)_$(if $(filter arm64,$(IMAGE_ARCH)),arm64,amd64).deb
image: install
	images/host-tools.sh $(BOARD)
	$(if $(filter pi5,$(BOARD)),images/build.sh --board pi5 --deb - --models -,$(MAKE) deb ARCH=$(IMAGE_ARCH))
	images/build.sh --board $(BOARD) --deb $(IMAGE_DEB) --models $(MODELS) --out dist/mongarsd-$(VERSION)-$(BOARD).img

# Build both images and boot them under QEMU: the x86-64 one with OVMF, the Pi 4's root under
# qemu-system-aarch64 -M virt; each answers a chat through a forwarded port (tests/images).
# -s: the builds and boots print timestamped progress as they go.
test-image: install test-deps
	MONGARSD_TEST_IMAGES=1 $(PY) -m pytest -q -s -m image tests/images

# P7's reference: sqlite-vec loaded into the system python3 (the venv's python may lack extension loading).
SQLITE_VEC := .cache/sqlite-vec/sqlite_vec

$(SQLITE_VEC):
	$(PY) -m pip install -q --target .cache/sqlite-vec sqlite-vec

bench: install native $(SQLITE_VEC)
	$(PY) -m bench.run --models-dir $(MODELS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache $(STATE)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(MODELS) .cache native/build native/src native/bin native/libs
