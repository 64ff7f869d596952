################################################################################
#
# python-structlog
#
################################################################################

PYTHON_STRUCTLOG_VERSION = 26.1.0
PYTHON_STRUCTLOG_SOURCE = structlog-$(PYTHON_STRUCTLOG_VERSION).tar.gz
PYTHON_STRUCTLOG_SITE = https://files.pythonhosted.org/packages/5e/89/b4a0bcfdf4f71a3dea31379f095929613d7e4528a0996bca6aa964cd0dca
PYTHON_STRUCTLOG_SETUP_TYPE = hatch
PYTHON_STRUCTLOG_LICENSE = MIT or Apache-2.0
PYTHON_STRUCTLOG_LICENSE_FILES = LICENSE-APACHE LICENSE-MIT NOTICE
# hatch-vcs reads the version from PKG-INFO; fancy-pypi-readme builds the
# long description.
PYTHON_STRUCTLOG_DEPENDENCIES = \
	host-python-hatch-fancy-pypi-readme \
	host-python-hatch-vcs

$(eval $(python-package))
