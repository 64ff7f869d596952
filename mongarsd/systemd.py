"""sd_notify over $NOTIFY_SOCKET without libsystemd: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("mongarsd.systemd")


class Notifier:
    """Send state changes to the service manager; a no-op outside systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        if addr.startswith("@"):
            self._addr = "\0" + addr[1:]  # abstract namespace socket
        elif addr.startswith("/"):
            self._addr = addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the period, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval_s = int(usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, message: str) -> bool:
        """Send one datagram without ever waiting (loop-safe); False when it could not be sent.

        A manager that does not read its socket fills the datagram queue (net.unix.max_dgram_qlen,
        often 10); a blocking send would then freeze the event loop until it reads. The message is
        dropped instead: the next one (a later STATUS, READY, WATCHDOG) says the same again.
        """
        if self._addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
                sock.connect(self._addr)
                sock.send(message.encode())
        except BlockingIOError:
            log.warning("sd_notify_dropped", reason="the service manager's queue is full", message=message.split("\n", 1)[0])
            return False
        except OSError as err:  # the manager went away: keep serving, say it once per call
            log.warning("sd_notify_failed", error=str(err))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")
