"""Operations routes: /, /health, /ready, /metrics, /api/v1/status."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import Any

import psutil
from aiohttp import web

from mongarsd.api.app import CTX
from mongarsd.api.auth import principal_of, public, require
from mongarsd.api.io import json_response


@public
async def handle_root(request: web.Request) -> web.Response:
    return web.Response(text="mongarsd is running\n")


@public
async def handle_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@public
async def handle_ready(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = {"ready": ctx.state.ready, "services": ctx.services_state()}
    return json_response(body, status=200 if ctx.state.ready else 503, headers=None if ctx.state.ready else {"Retry-After": "1"})


@require("admin")
async def handle_metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await asyncio.to_thread(ctx.metrics.render)  # collectors read /proc: off the loop
    return web.Response(body=body, content_type="text/plain", charset="utf-8", headers={"X-Prometheus-Format": "0.0.4"})


def service_manager(environ: Mapping[str, str]) -> dict[str, Any]:
    """Whether systemd runs this process as a service, and its watchdog period (pure)."""
    # systemd sets INVOCATION_ID for every unit it starts; WATCHDOG_USEC with WatchdogSec=
    under_systemd = bool(environ.get("INVOCATION_ID")) and bool(environ.get("NOTIFY_SOCKET") or environ.get("JOURNAL_STREAM"))
    usec = environ.get("WATCHDOG_USEC", "")
    return {
        "service_manager": "systemd" if under_systemd else None,
        "watchdog_s": int(usec) / 1e6 if under_systemd and usec.isdigit() and int(usec) > 0 else None,
    }


async def handle_status(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    principal = principal_of(request)
    board = ctx.board
    proc = psutil.Process(os.getpid())
    body = {
        "name": "mongarsd",
        "version": ctx.version,
        "ready": ctx.state.ready,
        "uptime_s": round(time.time() - ctx.started_at, 3),
        "board": {
            "profile": board.profile,
            "model": board.model,
            "arch": board.arch,
            "cores_logical": board.cores_logical,
            "cores_physical": board.cores_physical,
            "big_cores": list(board.big_cores),
            "little_cores": list(board.little_cores),
            "ram_mb": board.ram_mb,
            "accelerators": list(board.accelerators),
        },
        "profile": ctx.loaded.profile,
        "services": ctx.services_state(),
        "you": {"user": principal.user, "role": principal.role},
        "process": {
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "threads": proc.num_threads(),
            **service_manager(os.environ),
        },
        "event_loop_lag": ctx.metrics.loop_lag_summary(),
        "inflight_requests": ctx.state.inflight,
        "unclean_exits": ctx.unclean_exits,
        "energy": ctx.energy.status() if ctx.energy is not None else None,
    }
    return json_response(body)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", handle_root)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/ready", handle_ready)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/api/v1/status", handle_status)
