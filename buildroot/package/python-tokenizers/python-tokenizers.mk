################################################################################
#
# python-tokenizers
#
################################################################################

# Hugging Face tokenizers: Rust crates bound to Python with PyO3, built by
# maturin. Buildroot vendors the crates at download time (cargo), so the
# archive it checks is <pkg>-<version>-cargoN.tar.gz, not the PyPI sdist.
PYTHON_TOKENIZERS_VERSION = 0.23.3
PYTHON_TOKENIZERS_SOURCE_PYPI = tokenizers-$(PYTHON_TOKENIZERS_VERSION).tar.gz
PYTHON_TOKENIZERS_SITE_PYPI = https://files.pythonhosted.org/packages/e0/7c/2cabb2174e772636683008f2c5621949b645da7d303c596589e84516a184
PYTHON_TOKENIZERS_SITE = $(PYTHON_TOKENIZERS_SITE_PYPI)/$(PYTHON_TOKENIZERS_SOURCE_PYPI)?buildroot-path=filename
PYTHON_TOKENIZERS_SETUP_TYPE = maturin
# The Python bindings' crate is not at the top of the sdist.
PYTHON_TOKENIZERS_CARGO_MANIFEST_PATH = bindings/python/Cargo.toml
PYTHON_TOKENIZERS_LICENSE = Apache-2.0
PYTHON_TOKENIZERS_LICENSE_FILES = tokenizers/LICENSE

$(eval $(python-package))
