"""Composition root: build every service from the config, run them, stop them in reverse."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog
from aiohttp import web

from mongarsd.api.app import AppContext, RequestState, create_app
from mongarsd.api.connections import ConnectionGuard, ConnectionLimits, GuardedAppRunner, fd_limited_max_total
from mongarsd.board import BoardInfo
from mongarsd.cognition.hands import Hands
from mongarsd.config import LoadedConfig
from mongarsd.const import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, HTTP_CLOSE_MARGIN_S, HTTP_FD_RESERVE, LOOP_LAG_INTERVAL_S
from mongarsd.errors import ConfigError, MongarsError
from mongarsd.heap import release_free_heap
from mongarsd.memory.db import Database
from mongarsd.memory.tokens import TokenStore
from mongarsd.metrics import Metrics
from mongarsd.principal import is_loopback_host
from mongarsd.runmarker import RunMarker
from mongarsd.supervisor import Service, ServiceStack, StartError, TaskSupervisor, Together
from mongarsd.systemd import Notifier

if TYPE_CHECKING:
    from mongarsd.cognition.cortex import Cortex
    from mongarsd.cognition.iris.fetch import Fetcher
    from mongarsd.cognition.iris.ingest import Ingestor
    from mongarsd.cognition.pipeline import ConversationPipeline
    from mongarsd.cognition.voice import Voice
    from mongarsd.inference.embed import Embedder
    from mongarsd.inference.manager import InferenceManager
    from mongarsd.maintenance.energy import EnergyMonitor
    from mongarsd.maintenance.evolution import EvolutionEngine
    from mongarsd.maintenance.self_training import SelfTrainingEngine
    from mongarsd.maintenance.sommeil import Sommeil
    from mongarsd.memory.hippocampus import Hippocampus
    from mongarsd.mesh.service import MeshService
    from mongarsd.social.service import SocialService

log = structlog.get_logger("mongarsd.daemon")

DB_FILE = "mongarsd.db"
LOCK_FILE = "mongarsd.lock"
EMBED_IDLE_CHECK_S = 30.0


@dataclass(frozen=True, slots=True)
class CoreServices:
    """Inference, memory and cognition, built together (they use each other)."""

    embedder: Embedder
    manager: InferenceManager
    hippocampus: Hippocampus
    pipeline: ConversationPipeline
    fetcher: Fetcher | None  # Iris (None when [iris] enabled = false)
    ingestor: Ingestor | None
    cortex: Cortex | None  # Curiosity Engine (None without Iris or when [curiosity] enabled = false)
    energy: EnergyMonitor | None
    self_training: SelfTrainingEngine | None


class InstanceLock:
    """An exclusive flock on the state dir: one daemon per state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise MongarsError naming the holder (blocking but instantaneous)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise MongarsError(f"another mongarsd (pid {holder}) is already running with state dir {self.path.parent}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class BindGuard:
    """Refuse to expose the API beyond loopback while no token exists."""

    name = "bind-guard"
    start_timeout_s = 10.0
    stop_timeout_s = 1.0

    def __init__(self, *, host: str, tokens: TokenStore, state_dir: Path) -> None:
        self._host = host
        self._tokens = tokens
        self._state_dir = state_dir

    async def async_start(self) -> None:
        if is_loopback_host(self._host) or await self._tokens.async_count_live() > 0:
            return
        raise ConfigError(
            f"refusing to listen on {self._host}: no API token exists yet, so anyone on the network would be admin-less "
            f"and locked out. Create one first: mongarsd token create --user admin --role admin --state-dir {self._state_dir} "
            "(or listen on 127.0.0.1)"
        )

    async def async_stop(self) -> None:
        return None


class MdnsService:
    """The mesh's mDNS advertisement and browsing, as an edge: peers find us only once we answer."""

    name = "mdns"
    start_timeout_s = 15.0
    stop_timeout_s = 2.0  # sends the goodbye packets; part of the stop budget (const.STOP_TIMEOUT_S)

    def __init__(self, mesh: MeshService) -> None:
        self._mesh = mesh

    async def async_start(self) -> None:
        await self._mesh.async_start_discovery()

    async def async_stop(self) -> None:
        await self._mesh.async_stop_discovery()


class HttpService:
    """The aiohttp server; stopping it drains in-flight requests up to the drain timeout.

    Every connection is bounded (README "Connection limits"): a head deadline, an idle keep-alive
    deadline, and per-client and global caps that shed idle connections first (mongarsd.api.connections).
    """

    name = "api"
    start_timeout_s = 10.0

    def __init__(
        self, *, app: web.Application, host: str, port: int, drain_timeout_s: float, limits: ConnectionLimits | None = None
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._drain_timeout_s = drain_timeout_s
        self.stop_timeout_s = drain_timeout_s + HTTP_CLOSE_MARGIN_S
        limits = limits or ConnectionLimits()
        nofile_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limits = dataclasses.replace(limits, max_total=fd_limited_max_total(limits.max_total, nofile_soft, HTTP_FD_RESERVE))
        self.connections = ConnectionGuard(limits)
        self._runner: web.AppRunner | None = None
        self.bound: list[tuple[str, int]] = []

    async def async_start(self) -> None:
        limits = self.connections.limits
        runner = GuardedAppRunner(
            self._app,
            guard=self.connections,
            # aiohttp waits shutdown_timeout for handlers, then cancels their body reads and waits
            # as long again before cancelling them: half the drain each keeps the whole drain in budget
            shutdown_timeout=self._drain_timeout_s / 2,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=limits.keepalive_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise MongarsError(f"cannot listen on {self._host}:{self._port}: {err.strerror or err}") from err
        self._runner = runner
        server = site._server  # aiohttp keeps the asyncio server here; read the real bound ports
        if server is not None and hasattr(server, "sockets"):
            self.bound = [s.getsockname()[:2] for s in server.sockets]
        log.info(
            "http_listening",
            host=self._host,
            port=self._port,
            bound=self.bound,
            header_timeout_s=limits.header_timeout_s,
            keepalive_timeout_s=limits.keepalive_timeout_s,
            max_connections_per_client=limits.max_per_client,
            max_connections_total=limits.max_total,
        )

    async def async_stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            try:
                await runner.cleanup()
            finally:
                self.connections.async_close()


class Daemon:
    """Own one run of mongarsd: services, signals, readiness, watchdog."""

    def __init__(
        self,
        *,
        loaded: LoadedConfig,
        board: BoardInfo,
        reload_config: Callable[[], LoadedConfig] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.loaded = loaded
        self.board = board
        self._reload_config = reload_config
        self.notifier = notifier or Notifier()
        self._stop = asyncio.Event()
        self._reload = False
        self._signals = 0
        self._exit_code = EXIT_OK
        self.ctx: AppContext | None = None
        self.http: HttpService | None = None
        self.unclean_exits = 0
        self._marker: RunMarker | None = None
        # Supervised loops (name, factory) that services ask for; spawned once every service started.
        self.loops: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    def request_stop(self, exit_code: int = EXIT_OK) -> None:
        self._exit_code = exit_code
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second_signal_exit_now", signal=signal.Signals(signum).name)
            if self._marker is not None:
                self._marker.end()  # asked for by the operator: not a crash
            os._exit(128 + signum)
        log.info("signal_received_draining", signal=signal.Signals(signum).name)
        self.request_stop(EXIT_OK)

    def _on_hup(self) -> None:
        log.info("sighup_restarting")
        self._reload = True
        self._stop.set()

    async def async_run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        lock = InstanceLock(self.loaded.config.server.state_dir)
        try:
            lock.acquire()
            # Only under the lock: another live daemon's marker is not a crash.
            self._marker = RunMarker(self.loaded.config.server.state_dir)
            self.unclean_exits = self._marker.begin()
            while True:
                code = await self._async_run_once()
                if not self._reload or code != EXIT_OK:
                    return code
                self._reload = False
                self._stop.clear()
                self.notifier.reloading()
                if self._reload_config is not None:
                    try:
                        self.loaded = self._reload_config()
                    except ConfigError as err:
                        log.error("reload_config_invalid_keeping_old", error=str(err))
        except MongarsError as err:
            log.error("daemon_failed", error=str(err))
            return EXIT_CONFIG if isinstance(err, ConfigError) else EXIT_FAILURE
        finally:
            if self._marker is not None:
                marker, self._marker = self._marker, None
                marker.end()
            lock.release()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def build_services(self, metrics: Metrics, stack: ServiceStack, tasks: TaskSupervisor) -> tuple[list[Service | Together], AppContext]:
        """Wire every service with the collaborators it uses, in start order; build the handlers' context once."""
        from mongarsd.api import curiosity, evolution, ingest, native, ollama, openai, peers, self_training, social, sommeil, speech

        cfg = self.loaded.config
        db = Database(path=cfg.server.state_dir / DB_FILE, tasks=tasks)
        tokens = TokenStore(db=db)
        core = self._core_services(db, metrics, tasks)
        mesh = self._mesh_service(core.manager, db, metrics, tasks)
        voice = self._voice(metrics)
        social_service = self._social(metrics)
        state = RequestState()
        evolution_engine = self._evolution(core, db, mesh, metrics, tasks)
        sommeil_service = self._sommeil(core, db=db, state=state, evolution=evolution_engine, metrics=metrics, tasks=tasks)
        ctx = AppContext(
            loaded=self.loaded,
            board=self.board,
            metrics=metrics,
            db=db,
            tokens=tokens,
            services_state=lambda: dict(stack.state),
            llm=core.manager,
            embedder=core.embedder,
            hippocampus=core.hippocampus,
            pipeline=core.pipeline,
            mesh=mesh,
            fetcher=core.fetcher,
            ingestor=core.ingestor,
            cortex=core.cortex,
            voice=voice,
            social=social_service,
            sommeil=sommeil_service,
            evolution=evolution_engine,
            self_training=core.self_training,
            energy=core.energy,
            unclean_exits=self.unclean_exits,
            state=state,
        )
        app = create_app(
            ctx,
            [
                openai.setup_routes,
                speech.setup_routes,
                ollama.setup_routes,
                native.setup_routes,
                ingest.setup_routes,
                curiosity.setup_routes,
                social.setup_routes,
                sommeil.setup_routes,
                evolution.setup_routes,
                self_training.setup_routes,
                peers.setup_routes,
            ],
        )
        self.http = HttpService(app=app, host=cfg.server.host, port=cfg.server.port, drain_timeout_s=cfg.server.drain_timeout_s)
        services: list[Service | Together] = [
            db,
            BindGuard(host=cfg.server.host, tokens=tokens, state_dir=cfg.server.state_dir),
            *(svc for svc in (evolution_engine,) if svc is not None),  # before inference: the preload uses adopted settings
            # The energy source's first reading waits 0.2 s between two samples, in a thread: the
            # embedding model loads meanwhile. The LLM's load is not overlapped with it: both hold
            # the GIL for much of their load and, measured, together took longer than in turn.
            Together(*(svc for svc in (core.energy, core.embedder) if svc is not None)),
            core.manager,
            core.hippocampus,
            *(svc for svc in (core.self_training, core.fetcher, core.ingestor, core.cortex) if svc is not None),
            core.pipeline,
            *(svc for svc in (voice, social_service, sommeil_service) if svc is not None),
            mesh,
            self.http,
            *self._edge_services(ctx),
        ]
        return services, ctx

    def _core_services(self, db: Database, metrics: Metrics, tasks: TaskSupervisor) -> CoreServices:
        """Inference, memory and cognition: started after the store, before the API."""
        from mongarsd.cognition.pipeline import ConversationPipeline
        from mongarsd.inference.embed import Embedder
        from mongarsd.inference.manager import InferenceManager
        from mongarsd.inference.models import ModelRegistry
        from mongarsd.memory.hippocampus import Hippocampus
        from mongarsd.memory.profiles import ProfileStore

        cfg = self.loaded.config
        models_dir = cfg.server.effective_models_dir
        embed = cfg.embed
        embedder = Embedder(
            model_dir=models_dir / embed.model,
            variant=embed.variant,
            threads=embed.threads,
            providers=embed.providers,
            batch_size=embed.batch_size,
            idle_unload_s=embed.idle_unload_s,
            cache_entries=embed.cache_entries,
            preload=embed.preload,
        )
        manager = InferenceManager.from_config(
            cfg.inference, registry=ModelRegistry(models_dir), board=self.board, metrics=metrics, tasks=tasks
        )
        hippocampus = Hippocampus(
            db=db, embedder=embedder, purge_interval_s=cfg.memory.purge_interval_s, default_ttl_days=cfg.memory.default_ttl_days
        )
        fetcher, ingestor, cortex = self._iris(hippocampus, metrics)
        energy = self._energy(manager, metrics)
        self_training = None
        if cfg.self_training.enabled:
            from mongarsd.maintenance.self_training import SelfTrainingEngine

            self_training = SelfTrainingEngine(config=cfg.self_training, db=db)
            hippocampus.set_reranker(self_training.rerank)
            metrics.add_source(self_training.metrics)
        pipeline = ConversationPipeline(
            hippocampus=hippocampus,
            llm=manager,
            profiles=ProfileStore(db=db),
            recall_k=cfg.memory.recall_k,
            history_turns=cfg.memory.history_turns,
            default_model=cfg.inference.default_model,
            max_tokens_default=cfg.inference.max_tokens_default,
            hands=self._hands(fetcher),
            board=self.board.profile,
            timezone=cfg.hands.timezone or None,
            max_tool_rounds=cfg.hands.max_rounds,
            cortex=cortex,
            research_budget_s=cfg.curiosity.research_budget_s,
            self_training=self_training,
            energy=energy,
        )
        metrics.add_source(hippocampus.metrics)
        metrics.add_source(pipeline.metrics)
        self.loops += [
            ("hippocampus-purge", hippocampus.async_purge_loop),
            ("embedder-idle-unload", lambda: self._async_embedder_idle(embedder)),
        ]
        return CoreServices(
            embedder=embedder,
            manager=manager,
            hippocampus=hippocampus,
            pipeline=pipeline,
            fetcher=fetcher,
            ingestor=ingestor,
            cortex=cortex,
            energy=energy,
            self_training=self_training,
        )

    def _energy(self, manager: InferenceManager, metrics: Metrics) -> EnergyMonitor | None:
        """Joules and heat; when hot, fewer slots and threads (and Sommeil pauses, reading `hot`)."""
        from mongarsd.maintenance.energy import EnergyMonitor

        cfg = self.loaded.config
        if not cfg.energy.enabled:
            return None
        energy = EnergyMonitor(config=cfg.energy, board=self.board, on_hot=manager.set_thermal_limit)
        metrics.add_source(energy.metrics)
        self.loops.append(("energy-sample", energy.async_sample_loop))
        return energy

    def _evolution(
        self, core: CoreServices, db: Database, mesh: MeshService, metrics: Metrics, tasks: TaskSupervisor
    ) -> EvolutionEngine | None:
        """The auto-tuner of the default model's settings (its trials run in Sommeil's idle time)."""
        from mongarsd.maintenance.evolution import EvolutionEngine

        cfg = self.loaded.config
        if not cfg.evolution.enabled or not cfg.sommeil.enabled:
            return None
        engine = EvolutionEngine(
            config=cfg.evolution,
            inference=cfg.inference,
            db=db,
            board=self.board,
            model_id=cfg.inference.default_model,
            manager=core.manager,
            mesh=mesh,
            tasks=tasks,
        )
        metrics.add_source(engine.metrics_source)
        return engine

    def _sommeil(
        self,
        core: CoreServices,
        *,
        db: Database,
        state: RequestState,
        evolution: EvolutionEngine | None,
        metrics: Metrics,
        tasks: TaskSupervisor,
    ) -> Sommeil:
        """Idle-time work: built even when disabled, so that its route says so."""
        from mongarsd.maintenance.jobs import builtin_jobs
        from mongarsd.maintenance.sommeil import Sommeil

        cfg = self.loaded.config
        energy = core.energy
        sommeil = Sommeil(
            config=cfg.sommeil,
            state=state,
            db=db,
            tasks=tasks,
            energy_hot=(lambda: energy.hot) if energy is not None else None,
            jobs=builtin_jobs(cfg.sommeil, hippocampus=core.hippocampus, llm=core.manager, db=db),
        )
        if evolution is not None:
            sommeil.add_job(evolution.job(), before="db_upkeep")
        if core.self_training is not None:
            sommeil.add_job(core.self_training.job(), before="db_upkeep")
        metrics.add_source(sommeil.metrics)
        self.loops.append(("sommeil", sommeil.async_loop))
        return sommeil

    def _iris(self, hippocampus: Hippocampus, metrics: Metrics) -> tuple[Fetcher | None, Ingestor | None, Cortex | None]:
        """Iris (fetcher and ingester) and the Curiosity Engine that researches through it, as configured."""
        from mongarsd.cognition.cortex import Cortex
        from mongarsd.cognition.iris.fetch import Fetcher
        from mongarsd.cognition.iris.ingest import Ingestor

        cfg = self.loaded.config
        if not cfg.iris.enabled:
            return None, None, None
        fetcher = Fetcher(config=cfg.iris)
        ingestor = Ingestor(
            hippocampus=hippocampus,
            fetcher=fetcher,
            folders=[Path(f).expanduser() for f in cfg.iris.folders],
            scan_interval_s=cfg.iris.folder_scan_interval_s,
        )
        metrics.add_source(fetcher.metrics)
        metrics.add_source(ingestor.metrics)
        if cfg.iris.folders:
            self.loops.append(("iris-folder-scan", ingestor.async_scan_loop))
        cortex = None
        if cfg.curiosity.enabled:
            cortex = Cortex(hippocampus=hippocampus, fetcher=fetcher, config=cfg.curiosity, crawl_max_pages=cfg.iris.crawl_max_pages)
            metrics.add_source(cortex.metrics)
        return fetcher, ingestor, cortex

    def _voice(self, metrics: Metrics) -> Voice | None:
        """Bouche's voice (espeak-ng by default), unless [voice] enabled = false."""
        from mongarsd.cognition.voice import Voice

        cfg = self.loaded.config.voice
        if not cfg.enabled:
            return None
        voice = Voice.from_config(cfg)
        metrics.add_source(voice.metrics)
        return voice

    def _social(self, metrics: Metrics) -> SocialService | None:
        """The social vault and poster, unless [social] enabled = false."""
        from mongarsd.social.service import SocialService

        cfg = self.loaded.config
        if not cfg.social.enabled:
            return None
        return SocialService(config=cfg.social, state_dir=cfg.server.state_dir, metrics=metrics)

    async def _async_embedder_idle(self, embedder: Embedder) -> None:
        while True:
            await asyncio.sleep(EMBED_IDLE_CHECK_S)
            await embedder.async_unload_if_idle()

    def _hands(self, fetcher: Fetcher | None) -> Hands | None:
        """Mains Virtuelles for the persona, as configured ([hands] enabled, tools); Iris fetch when it has sources."""
        from mongarsd.cognition.hands import default_hands
        from mongarsd.cognition.iris.hand import iris_hand

        cfg = self.loaded.config
        hcfg = cfg.hands
        if not hcfg.enabled:
            return None
        hands = default_hands()
        if fetcher is not None and (cfg.iris.urls or cfg.iris.allow_internet):
            hands.append(iris_hand(fetcher))
        try:
            return Hands(hands, enabled=hcfg.tools or None)
        except ValueError as err:
            raise ConfigError("hands.tools: " + str(err)) from None

    def _mesh_service(self, manager: InferenceManager, db: Database, metrics: Metrics, tasks: TaskSupervisor) -> MeshService:
        """The peer mesh (gossip, discovery, scheduler); it stays idle unless mesh.enabled. Its routes always exist."""
        from mongarsd.mesh.service import MeshService

        return MeshService(
            config=self.loaded.config, board=self.board, llm=manager, db=db, metrics=metrics, tasks=tasks, defer_discovery=True
        )

    def _edge_services(self, ctx: AppContext) -> list[Service]:
        """Mesh advertisement: started once the API listens, stopped before it drains."""
        return [MdnsService(ctx.mesh)] if ctx.mesh is not None else []

    async def _async_run_once(self) -> int:
        cfg = self.loaded.config
        metrics = Metrics()
        metrics.unclean_exits.inc(self.unclean_exits)
        stack = ServiceStack(on_change=lambda name, up: metrics.service_up.labels(name).set(1 if up else 0))
        # Daemon-level loops (lag, watchdog) run until the very end; the service loops (self.loops) are
        # cancelled before the services they use stop, service-owned tasks by their service's stop (what
        # is left at the end is swept); a fatal one stops the daemon.
        tasks = TaskSupervisor(on_fatal=lambda name, err: self.request_stop(EXIT_FAILURE))
        service_tasks = TaskSupervisor(on_fatal=self._on_fatal_task)
        self.loops = []
        services, ctx = self.build_services(metrics, stack, service_tasks)
        self.ctx = ctx
        t0 = time.monotonic()
        log.info(
            "daemon_starting",
            host=cfg.server.host,
            port=cfg.server.port,
            profile=self.loaded.profile,
            board=self.board.model,
            state_dir=str(cfg.server.state_dir),
        )
        tasks.spawn("loop-lag", lambda: self._async_measure_lag(metrics))
        try:
            await stack.async_start(services, notify=self.notifier.status)
        except StartError as err:
            await service_tasks.async_stop()
            await tasks.async_stop()
            cause = err.__cause__
            log.error("daemon_start_failed", error=str(cause or err))
            return EXIT_CONFIG if isinstance(cause, ConfigError) else EXIT_FAILURE
        for name, factory in self.loops:
            service_tasks.spawn(name, factory, owner=self)
        release_free_heap()
        ctx.state.ready = True
        metrics.ready.set(1)
        if self.notifier.watchdog_interval_s:
            interval = self.notifier.watchdog_interval_s
            tasks.spawn("watchdog", lambda: self._async_watchdog(interval))
        self.notifier.ready(f"serving on {cfg.server.host}:{cfg.server.port}")
        log.info("daemon_ready", elapsed_ms=round((time.monotonic() - t0) * 1000, 1), services=stack.started)
        await self._stop.wait()

        ctx.state.ready = False
        metrics.ready.set(0)
        self.notifier.stopping()
        log.info("daemon_stopping", inflight=ctx.state.inflight, drain_timeout_s=cfg.server.drain_timeout_s)
        # The edge (mDNS advertisement) goes first, then the API drains: requests in flight may
        # still use the services the loops below work with.
        http = self.http
        errors = await stack.async_stop_through(http) if http is not None else []
        # Our loops go before the services they use; a service cancels its own tasks when it stops.
        await service_tasks.async_stop(owner=self)
        errors += await stack.async_stop()
        await service_tasks.async_stop()
        await tasks.async_stop()
        if errors:
            log.error("daemon_stop_errors", errors=errors)
        log.info("daemon_stopped", exit_code=self._exit_code)
        return self._exit_code

    def _on_fatal_task(self, name: str, err: BaseException) -> None:
        log.error("fatal_task_died_stopping", task=name, error=str(err))
        self.request_stop(EXIT_FAILURE)

    async def _async_measure_lag(self, metrics: Metrics) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LOOP_LAG_INTERVAL_S)
            metrics.observe_loop_lag(max(0.0, loop.time() - t0 - LOOP_LAG_INTERVAL_S))

    async def _async_watchdog(self, interval_s: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)
