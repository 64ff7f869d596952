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
# MONGARSD_* variables that are not configuration keys (read by the CLI, the client, the
# llama.cpp library chooser and the single executable's stub).
NON_CONFIG_ENV: Final = frozenset(
    {
        "MONGARSD_CONFIG",
        "MONGARSD_PROFILES_DIR",
        "MONGARSD_PROFILE",
        "MONGARSD_TOKEN",
        "MONGARSD_NATIVE_LIBS",
        "MONGARSD_BUNDLE_DIR",
        "MONGARSD_BUILD_CACHE",
    }
)
DEFAULT_CONFIG_PATH: Final = "/etc/mongarsd/mongarsd.toml"

SERVICE_START_TIMEOUT_S: Final = 60.0
SERVICE_STOP_TIMEOUT_S: Final = 10.0
LOOP_LAG_INTERVAL_S: Final = 0.1
WATCHDOG_FALLBACK_INTERVAL_S: Final = 10.0
TASK_RESTART_BACKOFF_MIN_S: Final = 0.5
TASK_RESTART_BACKOFF_MAX_S: Final = 30.0

# Stopping: every stage is bounded and the stages add up under the unit's TimeoutStopSec
# (tests/unit/test_systemd_unit.py sums them for every board profile).
STOP_TIMEOUT_S: Final = 60.0  # systemd/mongarsd.service TimeoutStopSec
TASKS_STOP_TIMEOUT_S: Final = 1.0  # cancelled background loops must be gone within this
HTTP_CLOSE_MARGIN_S: Final = 2.0  # after the drain: close sockets and cancel what is left

TOKEN_PREFIX: Final = "mgs_"
TOKEN_CACHE_TTL_S: Final = 2.0

# The persona: a model id that runs the caller's memory pipeline here and never leaves this node.
PERSONA_MODEL_ID: Final = "mongars"

# HTTP connection hygiene (README "Connection limits"): every connection is bounded in time and count.
HTTP_HEADER_TIMEOUT_S: Final = 10.0  # connect, or first byte after a keep-alive pause, to a complete request head
HTTP_KEEPALIVE_TIMEOUT_S: Final = 30.0  # an idle keep-alive connection is closed after this
HTTP_MAX_CONNECTIONS_PER_CLIENT: Final = 64  # per IPv4 address or IPv6 /64
HTTP_MAX_CONNECTIONS_TOTAL: Final = 1024  # lowered to RLIMIT_NOFILE minus the reserve below when that is smaller
HTTP_FD_RESERVE: Final = 128  # descriptors kept for the database, models, mesh sockets and logs

# Probes and reports that are not a user's activity (monitoring polls them all day): they never
# wake the daemon from Sommeil's idle work.
PASSIVE_PATHS: Final = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/api/v1/status",
        "/api/v1/sommeil",
        "/api/v1/evolution",
        "/api/v1/self-training",
        "/api/v1/curiosity",
        "/openapi.json",
        "/docs",
    }
)
# The hidden first argument that runs an Evolution Engine trial in a frozen build (no `python -m`).
EVOLUTION_TRIAL_COMMAND: Final = "_evolution-trial"
