"""Typed, frozen configuration merged from layered sources with provenance.

Layers, lowest first: built-in defaults -> board profile (configs/boards/<profile>.toml)
-> config file (/etc/mongarsd/mongarsd.toml or --config) -> MONGARSD_<SECTION>__<KEY>
environment variables -> command-line flags. Every value remembers which layer set it so
`mongarsd config show` can say where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from mongarsd.const import DEFAULT_CONFIG_PATH, DEFAULT_GOSSIP_PORT, DEFAULT_HOST, DEFAULT_HTTP_PORT, ENV_PREFIX, NON_CONFIG_ENV
from mongarsd.errors import ConfigError
from mongarsd.inference.kv_cache import KV_CACHE_TYPES
from mongarsd.inference.libvariant import CHOICES as CPU_VARIANT_CHOICES
from mongarsd.inference.settings import MAX_PREFETCH_BYTES

PROFILE_NAMES = ("pi4", "pi5", "jetson-orin-nano", "jetson-agx-orin", "x86-i7", "generic")


def default_state_dir() -> Path:
    """Return the state directory systemd gave us, else a per-user one."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mongarsd"


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_HTTP_PORT
    state_dir: Path = field(default_factory=default_state_dir)
    models_dir: Path = Path("")  # empty: <state_dir>/models
    drain_timeout_s: float = 10.0
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()

    @property
    def effective_models_dir(self) -> Path:
        return self.models_dir if str(self.models_dir) not in ("", ".") else self.state_dir / "models"


@dataclass(frozen=True)
class AuthConfig:
    loopback_trusted: bool = True
    rate_limit_rps: float = 20.0
    rate_limit_burst: int = 40


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True)
class InferenceConfig:
    default_model: str = "smollm2-135m-instruct:q4_1"
    threads: int = 0
    threads_batch: int = 0
    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    slots: int = 4
    # KV cells the slots share (0: each slot its own stream of n_ctx cells); with flash
    # attention one unified pool, else one stream of kv_pool / slots cells per slot
    kv_pool: int = 0
    queue_depth: int = 16
    kv_cache_type: str = "f16"
    flash_attn: bool = False
    # False: the weights are read into the daemon's own memory, on transparent huge pages where
    # the kernel has them (inference/hugepages.py; +5 % decode here); True: memory-mapped from
    # the page cache, shared with other processes and reclaimable under memory pressure.
    use_mmap: bool = False
    use_mlock: bool = False  # keep the weights in RAM (needs RLIMIT_MEMLOCK / CAP_IPC_LOCK)
    gpu_layers: int = 0
    keep_alive_s: float = 300.0
    memory_budget_mb: int = 0
    max_tokens_default: int = 256
    preload: bool = True
    max_prompt_chars: int = 200_000
    stream_interval_ms: int = 50
    # With a shared KV pool: host memory for idle conversations' cells, moved out of the pool
    # when another request starts (every cell in the pool costs every decode step) and copied
    # back when their conversation returns; 0 leaves them in the pool.
    prompt_cache_mb: int = 64
    # Decoding reads every weight row once per token; llama.cpp's CPU matrix-vector product asks
    # for the rows this many bytes ahead (native/patches: 0002), 0 = only the hardware
    # prefetcher (llama.cpp's released behaviour). 1.6x decode on a 2-core x86 VM.
    prefetch_bytes: int = 4096
    # Which llama.cpp build a distributed install loads (inference/libvariant.py): auto, native
    # or a variant name; a developer's venv always loads its own native build.
    cpu_variant: str = "auto"


@dataclass(frozen=True)
class EmbedConfig:
    model: str = "all-minilm-l6-v2"
    variant: str = "int8"
    threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    batch_size: int = 32
    idle_unload_s: float = 600.0
    cache_entries: int = 4096
    preload: bool = True


@dataclass(frozen=True)
class MemoryConfig:
    recall_k: int = 5
    history_turns: int = 8
    purge_interval_s: float = 600.0
    default_ttl_days: int = 0


@dataclass(frozen=True)
class MeshConfig:
    enabled: bool | None = None  # None: on when a cluster keyring exists (`mongarsd keys generate|install`)
    bind_host: str = "0.0.0.0"
    gossip_port: int = DEFAULT_GOSSIP_PORT
    advertise_host: str = ""
    interfaces: tuple[str, ...] = ()
    skip_virtual_interfaces: bool = True
    seeds: tuple[str, ...] = ()
    cluster_label: str = "mongars"
    timing: str = "lan"
    mdns: bool = True
    hop_limit: int = 2


@dataclass(frozen=True)
class HandsConfig:
    """Mains Virtuelles: the daemon's own tools for the persona (cognition/hands.py)."""

    enabled: bool = True
    tools: tuple[str, ...] = ()  # empty: every built-in hand
    timezone: str = ""  # IANA name for the clock hand; empty: the system's local time
    max_rounds: int = 1  # generation rounds per answer that may call hands (then the answer)


@dataclass(frozen=True)
class IrisConfig:
    """Iris, the polite fetcher and ingester (cognition/iris): what it may read and how gently."""

    enabled: bool = True
    folders: tuple[str, ...] = ()  # local folders of documents, ingested as shared documents
    urls: tuple[str, ...] = ()  # allowlist: a URL (a page and what lies below it) or a bare host name
    allow_internet: bool = False  # off: only the allowlist and the LAN SearxNG are ever fetched
    searxng_url: str = ""  # a SearxNG instance (usually on the LAN) used to search
    timeout_s: float = 10.0
    max_bytes: int = 2 << 20
    max_redirects: int = 5
    host_rate_rps: float = 1.0  # requests per second per host (token bucket)
    host_burst: int = 2
    robots_ttl_s: float = 3600.0
    crawl_max_pages: int = 20  # pages read per research from one allowlisted site
    folder_scan_interval_s: float = 3600.0


@dataclass(frozen=True)
class CuriosityConfig:
    """Cortex / Curiosity Engine: knowledge gaps in a turn become research through Iris."""

    enabled: bool = True
    gap_similarity: float = 0.45  # best recall similarity below this (or an uncovered entity) is a gap
    research_budget_s: float = 3.0  # how long a turn waits for research before answering with what it knows
    max_concurrent: int = 2
    max_open_per_user: int = 4
    results_per_research: int = 3  # research memories stored per research


@dataclass(frozen=True)
class VoiceConfig:
    """Bouche's voice: speech synthesis for /v1/audio/speech and `speak` on the native chat."""

    enabled: bool = True
    engine: str = "espeak-ng"  # espeak-ng (embedded default) | piper (needs voice_model)
    espeak_path: str = "espeak-ng"
    voice_model: str = ""  # a piper .onnx voice file, for engine = piper
    default_voice: str = ""  # empty: from the user's language (mimicry profile), else English
    max_input_chars: int = 4096
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SocialConfig:
    """Social posting: credentials vault and a Mastodon-compatible client behind a breaker."""

    enabled: bool = True
    timeout_s: float = 15.0
    failure_threshold: int = 3
    reset_timeout_s: float = 60.0


@dataclass(frozen=True)
class SommeilConfig:
    """Sommeil Paradoxal: preemptible idle-time work (maintenance/sommeil.py)."""

    enabled: bool = True
    idle_after_s: float = 120.0  # no user request for this long (and the CPU quiet) is idle
    cpu_idle_pct: float = 50.0  # system CPU use below this counts as quiet
    check_interval_s: float = 5.0
    cycle_interval_s: float = 3600.0  # at most one automatic cycle per this
    consolidate_after_days: float = 7.0  # sessions untouched this long are summarised into long-term memories
    dedupe_similarity: float = 0.95  # memories of one user closer than this are merged
    analyze_interval_days: float = 1.0
    vacuum_interval_days: float = 7.0  # VACUUM rewrites the file: rare, to spare SD cards
    max_job_s: float = 600.0


@dataclass(frozen=True)
class EvolutionConfig:
    """Evolution Engine: auto-tuning of inference settings in sandboxed trials (maintenance/evolution.py)."""

    enabled: bool = True
    trial_repeats: int = 5
    trial_timeout_s: float = 180.0
    trial_memory_mb: int = 0  # address-space limit of a trial; 0: from the inference memory budget
    confidence: float = 0.95  # one-sided Mann-Whitney U confidence needed to adopt
    min_gain: float = 0.03  # and at least this relative gain in median tokens/s
    regression_margin: float = 0.15  # production tokens/s EWMA this far below the adopted baseline rolls back
    share: bool = True  # gossip adopted settings to peers of the same board and model


@dataclass(frozen=True)
class SelfTrainingConfig:
    """SelfTrainingEngine: a recall re-ranker learnt from feedback (maintenance/self_training.py)."""

    enabled: bool = True
    min_examples: int = 40  # labelled recalls needed before training
    holdout_fraction: float = 0.25


@dataclass(frozen=True)
class EnergyConfig:
    """Energy and heat: joules per request/token and thermal throttling (maintenance/energy.py)."""

    enabled: bool = True
    hot_c: float = 80.0  # at or above: fewer slots and threads, idle work paused
    cool_c: float = 70.0  # at or below again: restored
    cpu_watts: float = 0.0  # CPU-time model when no sensor: watts at full load; 0: from the board profile


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    hands: HandsConfig = field(default_factory=HandsConfig)
    sommeil: SommeilConfig = field(default_factory=SommeilConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    iris: IrisConfig = field(default_factory=IrisConfig)
    curiosity: CuriosityConfig = field(default_factory=CuriosityConfig)
    voice: VoiceConfig = field(default_factory=VoiceConfig)
    social: SocialConfig = field(default_factory=SocialConfig)


SECTIONS: dict[str, type[Any]] = dict(typing.get_type_hints(Config))


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _port(v: Any) -> str | None:
    return None if 1 <= v <= 65535 else "must be a TCP/UDP port between 1 and 65535"


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of " + ", ".join(allowed)

    return check


# Per-key checks beyond the type; each returns an error phrase or None.
RULES: dict[str, Callable[[Any], str | None]] = {
    "server.port": _port,
    "server.drain_timeout_s": _non_negative,
    "server.max_body_bytes": _positive,
    "auth.rate_limit_rps": _positive,
    "auth.rate_limit_burst": _positive,
    "log.format": _choice("auto", "json", "console"),
    "log.level": _choice("debug", "info", "warning", "error"),
    "inference.threads": _non_negative,
    "inference.threads_batch": _non_negative,
    "inference.stream_interval_ms": lambda v: None if 0 <= v <= 1000 else "must be between 0 and 1000",
    "inference.prompt_cache_mb": lambda v: None if 0 <= v <= 1 << 20 else "must be between 0 and 1048576",
    "inference.prefetch_bytes": lambda v: None if 0 <= v <= MAX_PREFETCH_BYTES else f"must be between 0 and {MAX_PREFETCH_BYTES}",
    "inference.n_ctx": lambda v: None if 128 <= v <= 1 << 20 else "must be between 128 and 1048576",
    "inference.n_batch": _positive,
    "inference.n_ubatch": _positive,
    "inference.slots": lambda v: None if 1 <= v <= 64 else "must be between 1 and 64",
    "inference.queue_depth": _non_negative,
    "inference.kv_pool": lambda v: None if v == 0 or 128 <= v <= 1 << 22 else "must be 0 (one stream per slot) or between 128 and 4194304",
    "inference.kv_cache_type": _choice(*KV_CACHE_TYPES),
    "inference.cpu_variant": _choice(*CPU_VARIANT_CHOICES),
    "inference.gpu_layers": lambda v: None if v >= -1 else "must be >= -1 (-1 = all)",
    "inference.keep_alive_s": lambda v: None if v >= -1 else "must be >= -1 (-1 = forever)",
    "inference.memory_budget_mb": _non_negative,
    "inference.max_tokens_default": _positive,
    "inference.max_prompt_chars": _positive,
    "embed.variant": _choice("int8", "fp32"),
    "embed.threads": _positive,
    "embed.batch_size": lambda v: None if 1 <= v <= 1024 else "must be between 1 and 1024",
    "embed.idle_unload_s": _non_negative,
    "embed.cache_entries": _non_negative,
    "memory.recall_k": lambda v: None if 0 <= v <= 100 else "must be between 0 and 100",
    "memory.history_turns": lambda v: None if 0 <= v <= 200 else "must be between 0 and 200",
    "memory.purge_interval_s": _positive,
    "memory.default_ttl_days": _non_negative,
    "mesh.gossip_port": _port,
    "mesh.timing": _choice("lan", "local", "memberlist"),
    "mesh.hop_limit": lambda v: None if 0 <= v <= 8 else "must be between 0 and 8",
    "sommeil.idle_after_s": _non_negative,
    "sommeil.cpu_idle_pct": lambda v: None if 0.0 < v <= 100.0 else "must be in (0, 100]",
    "sommeil.check_interval_s": _positive,
    "sommeil.cycle_interval_s": _non_negative,
    "sommeil.consolidate_after_days": _non_negative,
    "sommeil.dedupe_similarity": lambda v: None if 0.5 <= v <= 1.0 else "must be between 0.5 and 1",
    "sommeil.analyze_interval_days": _non_negative,
    "sommeil.vacuum_interval_days": _non_negative,
    "sommeil.max_job_s": _positive,
    "evolution.trial_repeats": lambda v: None if 3 <= v <= 50 else "must be between 3 and 50",
    "evolution.trial_timeout_s": _positive,
    "evolution.trial_memory_mb": _non_negative,
    "evolution.confidence": lambda v: None if 0.5 <= v < 1.0 else "must be in [0.5, 1)",
    "evolution.min_gain": _non_negative,
    "evolution.regression_margin": lambda v: None if 0.0 < v < 1.0 else "must be in (0, 1)",
    "self_training.min_examples": lambda v: None if v >= 4 else "must be >= 4",
    "self_training.holdout_fraction": lambda v: None if 0.05 <= v <= 0.5 else "must be between 0.05 and 0.5",
    "energy.hot_c": lambda v: None if 30.0 <= v <= 120.0 else "must be between 30 and 120",
    "energy.cool_c": lambda v: None if 20.0 <= v <= 110.0 else "must be between 20 and 110",
    "energy.cpu_watts": _non_negative,
    "hands.max_rounds": lambda v: None if 0 <= v <= 8 else "must be between 0 and 8",
    "iris.timeout_s": _positive,
    "iris.max_bytes": lambda v: None if 1024 <= v <= 64 << 20 else "must be between 1024 and 67108864",
    "iris.max_redirects": lambda v: None if 0 <= v <= 20 else "must be between 0 and 20",
    "iris.host_rate_rps": _positive,
    "iris.host_burst": _positive,
    "iris.robots_ttl_s": _non_negative,
    "iris.crawl_max_pages": lambda v: None if 1 <= v <= 500 else "must be between 1 and 500",
    "iris.folder_scan_interval_s": _positive,
    "curiosity.gap_similarity": lambda v: None if 0.0 <= v <= 1.0 else "must be between 0 and 1",
    "curiosity.research_budget_s": _non_negative,
    "curiosity.max_concurrent": lambda v: None if 1 <= v <= 16 else "must be between 1 and 16",
    "curiosity.max_open_per_user": lambda v: None if 1 <= v <= 100 else "must be between 1 and 100",
    "curiosity.results_per_research": lambda v: None if 1 <= v <= 20 else "must be between 1 and 20",
    "voice.engine": _choice("espeak-ng", "piper"),
    "voice.max_input_chars": lambda v: None if 1 <= v <= 100_000 else "must be between 1 and 100000",
    "voice.timeout_s": _positive,
    "social.timeout_s": _positive,
    "social.failure_threshold": _positive,
    "social.reset_timeout_s": _positive,
}


@dataclass(frozen=True)
class LoadedConfig:
    """The effective config plus where each key came from."""

    config: Config
    sources: dict[str, str]
    profile: str

    def rows(self) -> Iterable[tuple[str, Any, str]]:
        """Yield (dotted key, value, source) for every key, in declaration order."""
        for section in dataclasses.fields(Config):
            obj = getattr(self.config, section.name)
            for f in dataclasses.fields(obj):
                key = f"{section.name}.{f.name}"
                yield key, getattr(obj, f.name), self.sources.get(key, "default")


def _field_types(cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    """Turn a raw TOML/env/CLI value into the field's type or raise ConfigError."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key} = {value!r} from {source}: {why}")

    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
        origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("expected a boolean (true/false)")
    if typ is int:
        if isinstance(value, bool):
            raise bad("expected an integer, got a boolean")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip(), 0)
            except ValueError:
                raise bad("expected an integer") from None
        raise bad("expected an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("expected a number, got a boolean")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad("expected a number") from None
        raise bad("expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad("expected a string")
    if typ is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise bad("expected a path string")
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise bad("expected a JSON list or comma-separated strings") from None
            else:
                value = [p.strip() for p in text.split(",") if p.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad("expected a list of strings")
    raise bad(f"unsupported type {typ}")  # pragma: no cover - schema error


def _apply_layer(
    merged: dict[str, dict[str, Any]],
    sources: dict[str, str],
    layer: Mapping[str, Any],
    source: str,
) -> None:
    """Validate and merge one layer of {section: {key: value}} into `merged`."""
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{source}: expected a table of sections")
    for section, values in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] in {source}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] in {source} must be a table of keys")
        types_ = _field_types(SECTIONS[section])
        for key, raw in values.items():
            dotted = f"{section}.{key}"
            if key not in types_:
                raise ConfigError(f"unknown key {dotted} in {source}; known keys of [{section}]: {', '.join(types_)}")
            value = _coerce(dotted, raw, types_[key], source)
            if (rule := RULES.get(dotted)) and (why := rule(value)):
                raise ConfigError(f"{dotted} = {raw!r} from {source}: {why}")
            merged.setdefault(section, {})[key] = value
            sources[dotted] = source


def read_toml(path: Path, source: str) -> dict[str, Any]:
    """Read a TOML file or raise ConfigError naming the file and the problem."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found: {path}") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied reading {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: invalid TOML in {path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: {path} is not UTF-8: {err}") from None


def env_layer(env: Mapping[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Pick MONGARSD_<SECTION>__<KEY> variables; return the layer and each key's variable name."""
    layer: dict[str, dict[str, str]] = {}
    names: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV or name.startswith(ENV_PREFIX + "TEST_"):
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" not in rest:
            raise ConfigError(f"environment variable {name}: expected MONGARSD_<SECTION>__<KEY>")
        section, key = rest.split("__", 1)
        layer.setdefault(section.lower(), {})[key.lower()] = value
        names[f"{section.lower()}.{key.lower()}"] = name
    return layer, names


def profiles_dir() -> Path:
    """Find configs/boards: env override, the source checkout, then the installed share dir."""
    if env := os.environ.get("MONGARSD_PROFILES_DIR"):
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "configs" / "boards"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "mongarsd" / "configs" / "boards"


def load_config(
    *,
    profile: str = "generic",
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Mapping[str, Any]] | None = None,
    profiles: Path | None = None,
) -> LoadedConfig:
    """Merge every layer into a frozen Config; raise ConfigError naming key, value, source."""
    env = dict(os.environ) if env is None else env
    merged: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}

    if profile not in PROFILE_NAMES:
        raise ConfigError(f"unknown board profile {profile!r}; known: {', '.join(PROFILE_NAMES)}")
    prof_path = (profiles or profiles_dir()) / f"{profile}.toml"
    if prof_path.is_file():
        _apply_layer(merged, sources, read_toml(prof_path, f"board profile {profile}"), f"board:{profile}")

    explicit = config_path is not None or "MONGARSD_CONFIG" in env
    path = config_path or Path(env.get("MONGARSD_CONFIG", DEFAULT_CONFIG_PATH))
    if explicit or path.is_file():
        _apply_layer(merged, sources, read_toml(path, f"config file {path}"), f"file:{path}")

    layer, names = env_layer(env)
    for section, values in layer.items():
        for key, value in values.items():
            _apply_layer(merged, sources, {section: {key: value}}, f"env:{names[f'{section}.{key}']}")

    for cli_section, cli_values in (cli or {}).items():
        for key, value in cli_values.items():
            if value is not None:
                _apply_layer(merged, sources, {cli_section: {key: value}}, f"cli:--{key.replace('_', '-')}")

    built = {name: SECTIONS[name](**merged.get(name, {})) for name in SECTIONS}
    return LoadedConfig(config=Config(**built), sources=sources, profile=profile)
