"""Streaming plumbing shared by the surfaces: disconnect cancellation and the SSE / NDJSON writers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import structlog
from aiohttp import web

from mongarsd.api.io import dumps_bytes
from mongarsd.errors import MongarsError
from mongarsd.inference.events import TokenEvent
from mongarsd.inference.tools import GenEvent, ToolCall, ToolCallEvent

log = structlog.get_logger("mongarsd.api.streaming")

DISCONNECT_POLL_S = 0.05  # how often a running generation checks that its client is still there
# After a write the next check waits this long: a write to a client that went away fails by
# itself, so a stream that keeps writing needs no timer of its own (longer than any stream
# hand-over interval a profile sets, shorter than a user notices a slot held).
DISCONNECT_QUIET_S = 0.5


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


CLIENT_CLOSED_STATUS = 499  # nginx's "client closed request": what the access metrics record


class DisconnectGuard:
    """Cancel the handler as soon as its client disconnects, and end the request quietly.

    aiohttp does not cancel handlers on disconnect (handler_cancellation is off), and a
    generation that waits in the queue or prefills writes nothing for a while, so the
    transport is polled to free the slot at once. Use as:

        async with (guard := DisconnectGuard(request)):
            ... return response
        return guard.response   # reached only when the client went away
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.fired = False
        self.response = web.Response(status=CLIENT_CLOSED_STATUS)

    async def __aenter__(self) -> DisconnectGuard:
        self._task = asyncio.current_task()
        self._request[GUARD_KEY] = self
        self._check()
        return self

    def wrote(self) -> None:
        """The handler has just written to its client: push the next check back."""
        timer = self._timer
        if timer is None:  # fired, or the handler is done
            return
        timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(DISCONNECT_QUIET_S, self._check)

    def _check(self) -> None:
        """Poll the transport from a timer callback (no task, no wake-up of the handler)."""
        self._timer = None
        if self.fired or self._task is None or self._task.done():
            return
        if client_gone(self._request):
            self.fired = True
            self._task.cancel()
            return
        self._timer = asyncio.get_running_loop().call_later(DISCONNECT_POLL_S, self._check)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        self._request.pop(GUARD_KEY, None)
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self.fired:
            task = self._task
            if task is not None and task.cancelling():
                task.uncancel()
            log.info("client_disconnected", path=self._request.path)
            return isinstance(exc, asyncio.CancelledError | ConnectionResetError) or exc is None
        if isinstance(exc, ConnectionResetError):
            log.info("client_disconnected", path=self._request.path)
            return True
        return False


GUARD_KEY: Final = web.RequestKey("mongarsd_disconnect_guard", DisconnectGuard)  # what StreamWriter tells of its writes


async def async_first(events: AsyncIterator[GenEvent]) -> GenEvent:
    """Pull the first event (so refusals become proper HTTP errors before any byte is sent)."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        raise MongarsError("generation ended without a final event") from None


async def async_collect(first: GenEvent, events: AsyncIterator[GenEvent]) -> tuple[str, list[ToolCall], TokenEvent]:
    """Gather the whole text, the tool calls and the final event."""
    parts: list[str] = []
    calls: list[ToolCall] = []
    event = first
    while True:
        if isinstance(event, ToolCallEvent):
            calls.append(event.call)
        else:
            parts.append(event.text)
            if event.finish_reason is not None:
                return "".join(parts), calls, event
        try:
            event = await events.__anext__()
        except StopAsyncIteration:
            raise MongarsError("generation ended without a final event") from None


# ----------------------------------------------------------------------------------------
# Stream writers


class StreamWriter:
    """Write SSE events or NDJSON lines to a prepared response."""

    def __init__(self, request: web.Request, kind: str) -> None:
        self._request = request
        self._kind = kind
        content_type = "text/event-stream" if kind == "sse" else "application/x-ndjson"
        self.response = web.StreamResponse(
            status=200, headers={"Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._guard = request.get(GUARD_KEY)  # told of each write, so it need not poll a flowing stream

    async def async_prepare(self) -> None:
        await self.response.prepare(self._request)

    async def async_send(self, obj: Mapping[str, Any]) -> None:
        data = dumps_bytes(obj, compact=True)
        if self._kind == "sse":
            await self.response.write(b"data: " + data + b"\n\n")
        else:
            await self.response.write(data + b"\n")
        if self._guard is not None:
            self._guard.wrote()

    async def async_done(self) -> web.StreamResponse:
        if self._kind == "sse":
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
