################################################################################
#
# python-scikit-build-core
#
################################################################################

# Host only: the PEP 517 build backend of python-llama-cpp (it drives CMake).
PYTHON_SCIKIT_BUILD_CORE_VERSION = 1.1.2
PYTHON_SCIKIT_BUILD_CORE_SOURCE = scikit_build_core-$(PYTHON_SCIKIT_BUILD_CORE_VERSION).tar.gz
PYTHON_SCIKIT_BUILD_CORE_SITE = https://files.pythonhosted.org/packages/30/8a/a1777e7eef0e91cc182b8a1eea3b88be6520c7b5afaf08232a7d8899c0ae
PYTHON_SCIKIT_BUILD_CORE_SETUP_TYPE = hatch
PYTHON_SCIKIT_BUILD_CORE_LICENSE = Apache-2.0
PYTHON_SCIKIT_BUILD_CORE_LICENSE_FILES = LICENSE
HOST_PYTHON_SCIKIT_BUILD_CORE_DEPENDENCIES = \
	host-python-hatch-vcs \
	host-python-packaging \
	host-python-pathspec

$(eval $(host-python-package))
