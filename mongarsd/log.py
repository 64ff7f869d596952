"""Logging setup: JSON lines for journald and pipes, readable lines on a TTY."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the daemon process (the library layer never calls this)."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if use_json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        # plain tracebacks: the rich formatter (used when rich is installed) reads source files on the loop
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (aiohttp, zeroconf) go to the same stream.
    logging.basicConfig(stream=out, level=max(_LEVELS[level], logging.WARNING), format="%(name)s %(levelname)s %(message)s")
    # aiohttp logs every malformed request (a bad request line, a client that hung up) as an ERROR
    # with a traceback: a hostile client could fill an SD card's journal with them. The 400 is
    # answered all the same; keep those out and let real server errors through.
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientNoiseFilter) for f in server_log.filters):
        server_log.addFilter(ClientNoiseFilter())


class ClientNoiseFilter(logging.Filter):
    """Drop aiohttp's reports of client-side errors: malformed HTTP, payload errors, hang-ups."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError | RequestPayloadError | ConnectionResetError)
