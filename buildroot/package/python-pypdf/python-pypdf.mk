################################################################################
#
# python-pypdf
#
################################################################################

PYTHON_PYPDF_VERSION = 7.1.1
PYTHON_PYPDF_SOURCE = pypdf-$(PYTHON_PYPDF_VERSION).tar.gz
PYTHON_PYPDF_SITE = https://files.pythonhosted.org/packages/96/5f/f41984a8150ec37c6ee50fa6fa1868d065337b65ba510a155848b2ce0b62
PYTHON_PYPDF_SETUP_TYPE = flit
PYTHON_PYPDF_LICENSE = BSD-3-Clause
PYTHON_PYPDF_LICENSE_FILES = LICENSE

$(eval $(python-package))
