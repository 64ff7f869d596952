"""The aiohttp application factory and the context handlers read collaborators from."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from mongarsd import __version__
from mongarsd.api.auth import PRINCIPAL, Principal
from mongarsd.config import LoadedConfig
from mongarsd.memory.db import Database
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics

if TYPE_CHECKING:
    from mongarsd.board import BoardInfo
    from mongarsd.cognition.cortex import Cortex
    from mongarsd.cognition.iris.fetch import Fetcher
    from mongarsd.cognition.iris.ingest import Ingestor
    from mongarsd.cognition.pipeline import ConversationPipeline
    from mongarsd.cognition.voice import Voice
    from mongarsd.config import Config
    from mongarsd.inference.embed import Embedder
    from mongarsd.inference.manager import InferenceManager
    from mongarsd.maintenance.energy import EnergyMonitor
    from mongarsd.maintenance.evolution import EvolutionEngine
    from mongarsd.maintenance.self_training import SelfTrainingEngine
    from mongarsd.maintenance.sommeil import Sommeil
    from mongarsd.memory.hippocampus import Hippocampus
    from mongarsd.mesh.service import MeshService
    from mongarsd.social.service import SocialService


@dataclass(slots=True)
class RequestState:
    """What changes while the daemon runs: readiness and requests in flight (event loop only)."""

    ready: bool = False
    inflight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    busy: int = 0  # requests in flight that are a user's work (not PASSIVE_PATHS)
    last_activity: float = 0.0  # time.monotonic() when the last such request started or ended; 0: none yet
    # Called (on the loop, must not block) with True when work starts on an idle daemon and False
    # when the last piece of work ends: Sommeil pauses its idle work on True.
    listeners: list[Callable[[bool], None]] = field(default_factory=list)

    def work_started(self) -> None:
        self.busy += 1
        self.last_activity = time.monotonic()
        if self.busy == 1:
            for listener in list(self.listeners):
                listener(True)

    def work_ended(self) -> None:
        self.busy -= 1
        self.last_activity = time.monotonic()
        if self.busy == 0:
            for listener in list(self.listeners):
                listener(False)


@dataclass(frozen=True, slots=True)
class AppContext:
    """The collaborators handlers use, built once by the composition root (daemon.py).

    Optional parts are None when the daemon runs without them (tests, tools); handlers say so
    with a clear 503 instead of guessing.
    """

    loaded: LoadedConfig
    board: BoardInfo
    metrics: Metrics
    db: Database
    tokens: TokenStore
    services_state: Callable[[], dict[str, str]] = dict
    llm: InferenceManager | None = None
    embedder: Embedder | None = None
    hippocampus: Hippocampus | None = None
    pipeline: ConversationPipeline | None = None
    mesh: MeshService | None = None
    fetcher: Fetcher | None = None  # Iris: polite HTTP fetcher and searcher
    ingestor: Ingestor | None = None  # Iris: documents into memory
    cortex: Cortex | None = None  # Curiosity Engine: research for knowledge gaps
    voice: Voice | None = None  # Bouche's voice: speech synthesis
    social: SocialService | None = None  # vault and Mastodon-compatible posting
    sommeil: Sommeil | None = None  # idle-time work
    evolution: EvolutionEngine | None = None  # auto-tuning
    self_training: SelfTrainingEngine | None = None  # recall re-ranker from feedback
    energy: EnergyMonitor | None = None  # joules and heat
    version: str = __version__
    started_at: float = field(default_factory=time.time)
    unclean_exits: int = 0  # previous runs on this state dir that ended without a clean stop
    state: RequestState = field(default_factory=RequestState)

    @property
    def config(self) -> Config:
        return self.loaded.config


CTX = web.AppKey("mongarsd_ctx", AppContext)
__all__ = ["CTX", "PRINCIPAL", "AppContext", "Principal", "create_app"]


def create_app(ctx: AppContext, route_setups: list[Callable[[web.Application], None]] | None = None) -> web.Application:
    """Build the app: middlewares in order, then every surface's routes."""
    from mongarsd.api import admin, openapi, ops
    from mongarsd.api.middlewares import async_add_request_id, build_middlewares

    cfg = ctx.loaded.config
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes, middlewares=build_middlewares(ctx), handler_args={"max_field_size": 16384}
    )
    app[CTX] = ctx
    app.on_response_prepare.append(async_add_request_id)
    ops.setup_routes(app)
    openapi.setup_routes(app)  # /openapi.json and /docs: built from the route table when first asked
    admin.setup_routes(app)
    for setup in route_setups or []:
        setup(app)
    return app
