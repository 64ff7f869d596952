"""Project-wide constants: ports, exit codes and timing with units in their names."""

from __future__ import annotations

from typing import Final

DEFAULT_HTTP_PORT: Final = 8642
DEFAULT_GOSSIP_PORT: Final = 8643
DEFAULT_HOST: Final = "127.0.0.1"

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 78  # EX_CONFIG from sysexits.h; systemd's RestartPreventExitStatus

ENV_PREFIX: Final = "MONGARSD_"
DEFAULT_CONFIG_PATH: Final = "/etc/mongarsd/mongarsd.toml"

SERVICE_START_TIMEOUT_S: Final = 60.0
SERVICE_STOP_TIMEOUT_S: Final = 10.0
LOOP_LAG_INTERVAL_S: Final = 0.1
WATCHDOG_FALLBACK_INTERVAL_S: Final = 10.0
TASK_RESTART_BACKOFF_MIN_S: Final = 0.5
TASK_RESTART_BACKOFF_MAX_S: Final = 30.0

TOKEN_PREFIX: Final = "mgs_"
TOKEN_CACHE_TTL_S: Final = 2.0
