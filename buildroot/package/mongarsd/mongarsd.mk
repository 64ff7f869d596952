################################################################################
#
# mongarsd
#
################################################################################

# This external tree is the buildroot/ folder of the mongarsd source tree:
# the package is built from that checkout (local site method), so nothing
# is downloaded and there is no archive to hash. Keep the version in step
# with mongarsd/__init__.py.
MONGARSD_VERSION = 0.1.0
MONGARSD_SITE = $(BR2_EXTERNAL_MONGARSD_PATH)/..
MONGARSD_SITE_METHOD = local
MONGARSD_SETUP_TYPE = setuptools
MONGARSD_LICENSE = MIT
MONGARSD_LICENSE_FILES = packaging/deb/copyright
# pyproject.toml's build requirements: setuptools (from the setup type) and
# wheel.
MONGARSD_DEPENDENCIES = host-python-wheel

# setup.py needs mongarsd/, configs/boards/, systemd/, README.md; packaging/
# holds the tmpfiles.d entry and the configuration file. Everything else of
# a working checkout (virtualenv, models, build outputs, tests, this tree)
# stays out of the build directory.
MONGARSD_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude='/.*' \
	--exclude=/bench \
	--exclude=/build \
	--exclude=/buildroot \
	--exclude=/dist \
	--exclude=/images \
	--exclude=/models \
	--exclude=/native \
	--exclude=/scripts \
	--exclude=/tests \
	--exclude='*.egg-info' \
	--exclude=__pycache__

# The wheel's data files (share/mongarsd/configs/boards, the board
# profiles) belong under /usr, where the daemon looks (sys.prefix).
MONGARSD_INSTALL_TARGET_OPTS = --data=$(TARGET_DIR)/usr

# The daemon's system user; its home is the state directory. Same user as
# systemd/mongarsd.sysusers.conf, made at build time so that files in the
# image can belong to it.
define MONGARSD_USERS
	mongarsd -1 mongarsd -1 * /var/lib/mongarsd - - mongarsd AI daemon
endef

define MONGARSD_INSTALL_CONFIG
	$(INSTALL) -D -m 0644 $(@D)/packaging/deb/mongarsd.toml \
		$(TARGET_DIR)/etc/mongarsd/mongarsd.toml
endef
MONGARSD_POST_INSTALL_TARGET_HOOKS += MONGARSD_INSTALL_CONFIG

define MONGARSD_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/systemd/mongarsd.service \
		$(TARGET_DIR)/usr/lib/systemd/system/mongarsd.service
	$(INSTALL) -D -m 0644 $(@D)/systemd/mongarsd.sysusers.conf \
		$(TARGET_DIR)/usr/lib/sysusers.d/mongarsd.conf
	$(INSTALL) -D -m 0644 $(@D)/packaging/deb/tmpfiles.conf \
		$(TARGET_DIR)/usr/lib/tmpfiles.d/mongarsd.conf
endef

$(eval $(python-package))
