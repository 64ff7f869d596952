"""Evolution Engine: tune the inference settings of this board by measured, reversible trials.

While the daemon is idle (a Sommeil job), one candidate at a time is measured against the
active settings. Candidates are a small deterministic neighbourhood of the active settings
(threads ±1 within the cores, n_batch and n_ubatch halved or doubled, the KV cache type, flash
attention, mmap; the embedder's threads and graph optimisation when it can be applied) or a
result a peer of the same board and model shared. Each measurement is a sandboxed subprocess
(trial.py) under an address-space and CPU limit, at nice 10 and with a timeout: a crash, an
out-of-memory kill or a hang is a failed trial, never the daemon's. Baseline and candidate runs
alternate (B C, C B, ...) so that a drift of the board's speed falls on both alike.

A candidate is adopted only when its tokens/s beat the baseline's with one-sided Mann-Whitney
p <= 1 - evolution.confidence, its median gain is at least evolution.min_gain and its peak RSS
fits the inference memory budget. Every adoption is a version (evolution_versions) with its
measurements and reason, signed with the node identity and shared with the mesh; every trial is
a row of evolution_trials. Rollback restores the previous version, and a production tokens/s
EWMA below (1 - evolution.regression_margin) of the adopted version's measured decode rate
rolls back by itself.

The measured rate is the fixed request's tokens/s: generated tokens over prompt plus generation
time, so that batch sizes (prompt processing) count as well as threads (decoding). The decode
rate alone is kept too: it is what production reports per generation, and what a regression is
judged by.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import math
import os
import resource
import signal
import sqlite3
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from mongarsd.const import EVOLUTION_TRIAL_COMMAND
from mongarsd.errors import MeshError, ModelError, MongarsError, NotFoundError, OverloadedError, StoreError, ValidationError
from mongarsd.inference.kv_cache import KV_CACHE_TYPES
from mongarsd.maintenance.stats import mann_whitney_greater, median
from mongarsd.supervisor import TaskSupervisor

if TYPE_CHECKING:
    import aiosqlite

    from mongarsd.board import BoardInfo
    from mongarsd.config import EvolutionConfig, InferenceConfig
    from mongarsd.inference.manager import InferenceManager
    from mongarsd.memory.db import Database
    from mongarsd.mesh.identity import NodeIdentity
    from mongarsd.mesh.service import MeshService
    from mongarsd.metrics import Sample

log = structlog.get_logger("mongarsd.maintenance.evolution")

Settings = dict[str, Any]

JOB_NAME: Final = "evolution"
TRIAL_TOKENS: Final = 32  # tokens generated per measured run
# Measured runs per trial process (after its warm-up); their median is the process's one sample, so
# samples stay independent (one process each) while a transient stall of the board is voted out.
TRIAL_RUNS_PER_PROCESS: Final = 3
TRIAL_AS_HEADROOM_MB: Final = 1024  # address space beyond the memory budget: interpreter, libraries, thread stacks
TRIAL_NICE: Final = 10
OOM_SCORE_ADJ: Final = b"1000"  # the first process the kernel's OOM killer picks
TRIAL_CPU_MARGIN_S: Final = 10  # CPU seconds beyond timeout x threads before SIGXCPU
REAP_TIMEOUT_S: Final = 5.0  # after SIGKILL, how long to wait for the trial to be reaped
STDERR_TAIL_CHARS: Final = 400
EWMA_ALPHA: Final = 0.1  # weight of one production observation
EWMA_MIN_OBSERVATIONS: Final = 20  # before the production EWMA may roll back a version
MIN_OBSERVED_TOKENS: Final = 8  # shorter generations give too noisy a rate to judge production by
RETRIAL_AFTER_S: Final = 7 * 86400.0  # settings trialled or used within this long are not trialled again
HISTORY_TRIALS: Final = 20
HISTORY_VERSIONS: Final = 50
PEER_QUEUE_MAX: Final = 8
MAX_PAYLOAD_BYTES: Final = 3072
N_BATCH_MIN: Final = 32  # LlamaContext's floor
N_BATCH_MAX: Final = 2048
KV_CHOICES: Final = ("f16", "q8_0")
GRAPH_OPT_LEVELS: Final = ("all", "extended", "basic")
FROZEN_TRIAL_COMMAND: Final = EVOLUTION_TRIAL_COMMAND
TUNING_KIND: Final = "mongarsd.tuning"
TUNING_VERSION: Final = 1
LLM_SETTING_KEYS: Final = frozenset(
    {"threads", "threads_batch", "n_ctx", "n_batch", "n_ubatch", "slots", "kv_pool", "kv_cache_type", "flash_attn", "use_mmap", "use_mlock"}
)
EMBED_SETTING_KEYS: Final = frozenset({"embed_threads", "embed_graph_opt"})
# What a peer's result may change here: its context size, slots and mlock are its own choices.
TUNED_KEYS: Final = ("threads", "n_batch", "n_ubatch", "kv_cache_type", "flash_attn", "use_mmap", "embed_threads", "embed_graph_opt")
MANAGER_KEYS: Final = frozenset(
    {"threads", "threads_batch", "n_batch", "n_ubatch", "kv_cache_type", "flash_attn", "use_mmap", "use_mlock", "slots"}
)


# ----------------------------------------------------------------------------------------
# Pure decisions


def canonical(value: Any) -> str:
    """Return the canonical JSON of a value: sorted keys, no spaces, ASCII (pure)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_key(settings: Mapping[str, Any]) -> str:
    """Return a short digest of the configured settings: a version line belongs to one configuration (pure)."""
    return hashlib.sha256(canonical(settings).encode("ascii")).hexdigest()[:16]


def settings_from_config(inference: InferenceConfig, board: BoardInfo, *, embed_threads: int | None = None) -> Settings:
    """Return the settings the configuration gives, threads resolved for the board (pure)."""
    from mongarsd.board import recommended_threads

    settings: Settings = {
        "threads": inference.threads if inference.threads > 0 else recommended_threads(board),
        "n_ctx": inference.n_ctx,
        "n_batch": inference.n_batch,
        "n_ubatch": min(inference.n_ubatch, inference.n_batch),
        "slots": inference.slots,
        "kv_cache_type": inference.kv_cache_type,
        "flash_attn": inference.flash_attn,
        "use_mmap": inference.use_mmap,
        "use_mlock": inference.use_mlock,
    }
    if inference.threads_batch > 0:
        settings["threads_batch"] = inference.threads_batch
    if inference.kv_pool > 0:  # only when set: configurations without a pool keep their version lines
        settings["kv_pool"] = inference.kv_pool
    if embed_threads is not None:
        settings["embed_threads"] = max(1, embed_threads)
        settings["embed_graph_opt"] = "all"
    return settings


def neighbourhood(active: Mapping[str, Any], *, cores: int) -> list[Settings]:
    """Return the candidates one step from `active`, most promising first, deterministic (pure).

    Threads ±1 within the cores (or down to the cores when above), n_ubatch halved, doubled
    (up to n_batch) or equal to n_batch, n_batch halved or doubled within N_BATCH_MIN..MAX,
    flash attention and mmap toggled, the KV cache f16 <-> q8_0; with embed settings, the
    embedder's threads ±1 and its other graph optimisation levels.
    """
    base = dict(active)
    out: list[Settings] = []

    def add(**change: Any) -> None:
        cand = {**base, **change}
        if cand != base and cand not in out:
            out.append(cand)

    cores = max(cores, 1)
    threads = int(base["threads"])
    if threads > cores:
        add(threads=cores)
    else:
        if threads - 1 >= 1:
            add(threads=threads - 1)
        if threads + 1 <= cores:
            add(threads=threads + 1)
    nb, nu = int(base["n_batch"]), int(base["n_ubatch"])
    if nu // 2 >= 1:
        add(n_ubatch=nu // 2)
    if nu * 2 <= nb:
        add(n_ubatch=nu * 2)
    if nu != nb:
        add(n_ubatch=nb)  # llama.cpp's default: one micro-batch per batch
    if nb // 2 >= N_BATCH_MIN:
        add(n_batch=nb // 2, n_ubatch=min(nu, nb // 2))
    if nb * 2 <= N_BATCH_MAX:
        add(n_batch=nb * 2)
    add(flash_attn=not base["flash_attn"])
    add(kv_cache_type="q8_0" if base["kv_cache_type"] == "f16" else "f16")
    add(use_mmap=not base["use_mmap"])
    if "embed_threads" in base:
        et = int(base["embed_threads"])
        if et - 1 >= 1:
            add(embed_threads=et - 1)
        if et + 1 <= cores:
            add(embed_threads=et + 1)
        for level in GRAPH_OPT_LEVELS:
            add(embed_graph_opt=level)
    return out


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Return {key: [old, new]} for the settings that differ (pure)."""
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Return "threads 2→3, flash_attn False→True" (pure)."""
    return ", ".join(f"{k} {a}→{b}" for k, (a, b) in changes(old, new).items()) or "no change"


def trial_kind(active: Mapping[str, Any], candidate: Mapping[str, Any]) -> str:
    """Return "embed" when only embedder settings differ, else "llm" (pure)."""
    changed = set(changes(active, candidate))
    return "embed" if changed and changed <= EMBED_SETTING_KEYS else "llm"


def validate_settings(settings: Mapping[str, Any], *, cores: int) -> Settings:
    """Return a checked copy of candidate settings; ValidationError naming the first bad one (pure)."""
    out = dict(settings)
    unknown = sorted(set(out) - LLM_SETTING_KEYS - EMBED_SETTING_KEYS)
    if unknown:
        raise ValidationError("unknown settings: " + ", ".join(unknown), param="settings")

    def integer(key: str, lo: int, hi: int) -> None:
        if key not in out:
            return
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValidationError(f"setting {key} must be an integer in {lo}..{hi}, not {value!r}", param="settings")

    integer("threads", 1, max(cores, 1))
    integer("threads_batch", 1, max(cores, 1))
    integer("n_ctx", 64, 1 << 20)
    integer("n_batch", N_BATCH_MIN, N_BATCH_MAX)
    integer("n_ubatch", 1, int(out.get("n_batch", N_BATCH_MAX)) if isinstance(out.get("n_batch"), int) else N_BATCH_MAX)
    integer("slots", 1, 256)
    integer("kv_pool", 0, 1 << 22)
    integer("embed_threads", 1, max(cores, 1))
    for key in ("flash_attn", "use_mmap", "use_mlock"):
        if key in out and not isinstance(out[key], bool):
            raise ValidationError(f"setting {key} must be true or false", param="settings")
    if "kv_cache_type" in out and out["kv_cache_type"] not in KV_CACHE_TYPES:
        raise ValidationError("setting kv_cache_type must be one of " + ", ".join(KV_CACHE_TYPES), param="settings")
    if "embed_graph_opt" in out and out["embed_graph_opt"] not in (*GRAPH_OPT_LEVELS, "disable"):
        raise ValidationError("setting embed_graph_opt must be one of all, extended, basic, disable", param="settings")
    return out


def overlay_tuned(active: Mapping[str, Any], peer_settings: Mapping[str, Any]) -> Settings:
    """Return `active` with the tuned keys a peer's settings set (its context, slots and mlock stay ours) (pure)."""
    out = dict(active)
    for key in TUNED_KEYS:
        if key in peer_settings and (key in active or key not in EMBED_SETTING_KEYS):
            out[key] = peer_settings[key]
    if "n_batch" in out and "n_ubatch" in out and isinstance(out["n_batch"], int) and isinstance(out["n_ubatch"], int):
        out["n_ubatch"] = min(out["n_ubatch"], out["n_batch"])
    return out


def pick_candidate(neighbours: Sequence[Settings], recent: Mapping[str, float], now: float) -> Settings | None:
    """Return the first neighbour not trialled or used within RETRIAL_AFTER_S, else None (pure)."""
    for cand in neighbours:
        last = recent.get(canonical(cand))
        if last is None or now - last >= RETRIAL_AFTER_S:
            return cand
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to adopt a candidate, with the figures and the reason in words."""

    adopt: bool
    p_value: float | None
    gain: float | None
    baseline_median: float | None
    candidate_median: float | None
    reason: str


def decide(
    *,
    baseline: Sequence[float],
    candidate: Sequence[float],
    confidence: float,
    min_gain: float,
    peak_rss_mb: float,
    budget_mb: float,
) -> Decision:
    """Adopt only when faster with confidence, by at least min_gain, within the memory budget (pure)."""
    if len(baseline) < 2 or len(candidate) < 2:
        return Decision(False, None, None, None, None, f"too few runs to judge ({len(candidate)} candidate, {len(baseline)} baseline)")
    test = mann_whitney_greater(candidate, baseline)
    b_med, c_med = median(baseline), median(candidate)
    gain = c_med / b_med - 1.0 if b_med > 0 else (math.inf if c_med > 0 else 0.0)
    alpha = 1.0 - confidence
    figures = (
        f"median {c_med:.2f} vs {b_med:.2f} tokens/s ({gain * 100:+.1f}%), p={test.p:.4f}, "
        f"peak RSS {peak_rss_mb:.0f} MB, {len(candidate)} runs each"
    )
    refusals = []
    if test.p > alpha:
        refusals.append(f"not faster with {confidence:.0%} confidence (p={test.p:.4f} > {alpha:.4f})")
    if gain < min_gain:
        refusals.append(f"gain {gain * 100:+.1f}% below the {min_gain * 100:.1f}% required")
    if peak_rss_mb > budget_mb:
        refusals.append(f"peak RSS {peak_rss_mb:.0f} MB over the {budget_mb:.0f} MB memory budget")
    if refusals:
        return Decision(False, test.p, gain, b_med, c_med, "refused: " + "; ".join(refusals) + " — " + figures)
    return Decision(True, test.p, gain, b_med, c_med, "adopted: " + figures)


class RegressionWatch:
    """The production tokens/s EWMA of the active version (loop-only)."""

    def __init__(self, alpha: float = EWMA_ALPHA) -> None:
        self.alpha = alpha
        self.count = 0
        self.ewma = 0.0

    def observe(self, value: float) -> float:
        """Fold one observation in; return the EWMA."""
        self.count += 1
        self.ewma = value if self.count == 1 else (1.0 - self.alpha) * self.ewma + self.alpha * value
        return self.ewma

    def reset(self) -> None:
        self.count = 0
        self.ewma = 0.0

    def regressed(self, reference: float | None, margin: float, min_observations: int = EWMA_MIN_OBSERVATIONS) -> bool:
        """Tell whether the EWMA is below (1 - margin) x reference after enough observations."""
        if reference is None or reference <= 0 or self.count < min_observations:
            return False
        return self.ewma < (1.0 - margin) * reference


# ----------------------------------------------------------------------------------------
# Signed tuning payloads (shared over the mesh's signed peer messages)


def tuning_payload(
    *,
    board: str,
    model: str,
    model_sha256: str,
    llama_cpp: str,
    settings: Mapping[str, Any],
    tokens_per_s: float,
    node: str,
    public_key: bytes,
) -> dict[str, Any]:
    """Return an unsigned tuning payload (pure)."""
    return {
        "kind": TUNING_KIND,
        "v": TUNING_VERSION,
        "board": board,
        "model": model,
        "model_sha256": model_sha256,
        "llama_cpp": llama_cpp,
        "settings": dict(settings),
        "tokens_per_s": round(float(tokens_per_s), 3),
        "node": node,
        "public_key": base64.b64encode(public_key).decode("ascii"),
    }


def sign_payload(identity: NodeIdentity, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return the payload with `sig`: Ed25519 over its canonical JSON without `sig`."""
    body = {k: v for k, v in payload.items() if k != "sig"}
    return {**body, "sig": base64.b64encode(identity.sign(canonical(body).encode("ascii"))).decode("ascii")}


def verify_payload(payload: Mapping[str, Any]) -> str | None:
    """Return None when the payload is well formed and signed by the key its node id derives from, else a reason (pure)."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    from mongarsd.mesh.identity import node_id_from_public_key

    if payload.get("kind") != TUNING_KIND:
        return "not_tuning"
    if payload.get("v") != TUNING_VERSION:
        return "unsupported_version"
    for key in ("board", "model", "model_sha256", "llama_cpp", "node", "public_key", "sig"):
        if not isinstance(payload.get(key), str):
            return "malformed"
    if not isinstance(payload.get("settings"), dict) or not isinstance(payload.get("tokens_per_s"), int | float):
        return "malformed"
    try:
        public_key = base64.b64decode(payload["public_key"], validate=True)
        signature = base64.b64decode(payload["sig"], validate=True)
    except (binascii.Error, ValueError):
        return "malformed"
    if len(public_key) != 32 or node_id_from_public_key(public_key) != payload["node"]:
        return "bad_identity"
    body = {k: v for k, v in payload.items() if k != "sig"}
    try:
        VerifyKey(public_key).verify(canonical(body).encode("ascii"), signature)
    except (BadSignatureError, ValueError):
        return "bad_signature"
    return None


# ----------------------------------------------------------------------------------------
# Trial processes


@dataclass(frozen=True, slots=True)
class TrialRun:
    """What one trial process measured, or why it failed."""

    ok: bool
    tokens_per_s: tuple[float, ...] = ()
    decode_tokens_per_s: tuple[float, ...] = ()
    peak_rss_mb: float = 0.0
    llama_cpp: str = ""
    error: str = ""

    @property
    def sample(self) -> float:
        """The process's request tokens/s: the median of its runs."""
        return median(self.tokens_per_s)

    @property
    def decode_sample(self) -> float:
        """The process's decode tokens/s: the median of its runs."""
        return median(self.decode_tokens_per_s)


def request_rates(result: Mapping[str, Any], tokens: int) -> tuple[list[float], list[float]]:
    """Return (request tokens/s, decode tokens/s) per run of a trial's output (pure).

    Request tokens/s = generated tokens / (prompt time + generation time), where prompt time
    is derived from the reported prompt rate over the fixed prompt; for the embedder the
    reported rate is used as is.
    """
    decode = [float(x) for x in result.get("tokens_per_s", [])]
    prompt = [float(x) for x in result.get("prompt_tokens_per_s", [])]
    n_prompt = result.get("prompt_tokens")
    if not prompt or not isinstance(n_prompt, int) or len(prompt) != len(decode):
        return decode, decode
    request = []
    for d, p in zip(decode, prompt, strict=True):
        seconds = (n_prompt / p if p > 0 else math.inf) + (tokens / d if d > 0 else math.inf)
        request.append(round(tokens / seconds, 3) if math.isfinite(seconds) and seconds > 0 else 0.0)
    return request, decode


def parse_trial_output(stdout: bytes, returncode: int, stderr: bytes, *, tokens: int) -> TrialRun:
    """Turn a finished trial process into a TrialRun (pure)."""
    line = ""
    for raw in reversed(stdout.decode("utf-8", "replace").splitlines()):
        if raw.strip().startswith("{"):
            line = raw.strip()
            break
    result: Any = None
    if line:
        with contextlib.suppress(ValueError):
            result = json.loads(line)
    if returncode == 0 and isinstance(result, dict) and result.get("ok") is True:
        request, decode = request_rates(result, tokens)
        if not request or len(decode) != len(request) or not all(math.isfinite(x) and x > 0 for x in (*request, *decode)):
            return TrialRun(False, error="the trial reported no usable rates")
        rss = result.get("peak_rss_mb")
        return TrialRun(
            True,
            tuple(request),
            tuple(decode),
            float(rss) if isinstance(rss, int | float) else 0.0,
            str(result.get("llama_cpp") or ""),
        )
    if isinstance(result, dict) and isinstance(result.get("error"), str):
        return TrialRun(False, error=result["error"][:STDERR_TAIL_CHARS])
    tail = stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL_CHARS:]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        why = {"SIGKILL": " (out of memory?)", "SIGXCPU": " (CPU time limit)", "SIGSEGV": " (crash)"}.get(name, "")
        return TrialRun(False, error=f"killed by {name}{why}" + (": " + tail if tail else ""))
    return TrialRun(False, error=f"exit status {returncode}" + (": " + tail if tail else ""))


def default_trial_command() -> tuple[str, ...]:
    """Return how to start trial.py: this interpreter, or the frozen executable's hidden subcommand."""
    if getattr(sys, "frozen", False):  # a PyInstaller bundle has no `-m`: cli.py dispatches FROZEN_TRIAL_COMMAND
        return (sys.executable, FROZEN_TRIAL_COMMAND)
    return (sys.executable, "-m", "mongarsd.maintenance.trial")


def _limit_child(as_bytes: int, cpu_s: int, nice: int) -> None:
    """Set the trial's limits in the forked child before exec (runs in the child: syscalls only)."""
    if as_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    os.nice(nice)
    # If the board runs out of memory anyway, the kernel's OOM killer takes the trial, not the daemon.
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, OOM_SCORE_ADJ)
        finally:
            os.close(fd)
    except OSError:
        pass  # no procfs here: the address-space limit still holds


def _capped(want: int, kind: int) -> int:
    """Return `want` lowered to the current hard limit of `kind` (a child cannot raise it)."""
    _soft, hard = resource.getrlimit(kind)
    return want if hard == resource.RLIM_INFINITY else min(want, hard)


def _file_sha256(path: Path) -> str:
    """Return a file's SHA-256 (blocking: reads the whole file; run it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _llama_cpp_version() -> str:
    """Return llama-cpp-python's version (blocking on the first call: imports it; run it in a thread)."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # OSError: the shared library failed to load
        return ""
    return str(getattr(llama_cpp, "__version__", ""))


# ----------------------------------------------------------------------------------------
# The service


@dataclass(frozen=True, slots=True)
class Version:
    """One row of evolution_versions."""

    id: int
    created_at: float
    settings: Settings
    measurements: dict[str, Any]
    reason: str
    origin: str
    active: bool

    @property
    def previous(self) -> int | None:
        prev = self.measurements.get("previous")
        return prev if isinstance(prev, int) else None


@dataclass(frozen=True, slots=True)
class TrialRecord:
    """One row of evolution_trials to write."""

    settings: Settings
    samples: Mapping[str, Any]
    baseline: Mapping[str, Any]
    p_value: float | None
    outcome: str
    reason: str
    origin: str


@dataclass(frozen=True, slots=True)
class PeerCandidate:
    """A peer's signed result waiting for its trial here."""

    node: str
    settings: Settings
    payload: dict[str, Any]


class EvolutionJob:
    """The Sommeil job: one trial per idle run."""

    name = JOB_NAME

    def __init__(self, engine: EvolutionEngine) -> None:
        self._engine = engine

    def due(self, now: float) -> bool:
        """Tell whether there is a candidate to trial (cheap)."""
        return self._engine.has_work()

    async def async_run(self) -> dict[str, Any]:
        """Trial one candidate (cancellable: the trial process is killed)."""
        return await self._engine.async_run_once()


def _row_json(value: Any, default: Any) -> Any:
    try:
        return json.loads(value) if isinstance(value, str) else default
    except ValueError:
        return default


def _version_from_row(row: sqlite3.Row) -> Version:
    settings = _row_json(row["settings"], {})
    measurements = _row_json(row["measurements"], {})
    return Version(
        id=int(row["id"]),
        created_at=float(row["created_at"]),
        settings=settings if isinstance(settings, dict) else {},
        measurements=measurements if isinstance(measurements, dict) else {},
        reason=str(row["reason"]),
        origin=str(row["origin"]),
        active=bool(row["active"]),
    )


class EvolutionEngine:
    """Service: sandboxed trials of inference settings, versions, rollback and mesh sharing."""

    name = "evolution"
    start_timeout_s = 10.0
    stop_timeout_s = 1.0

    def __init__(
        self,
        *,
        config: EvolutionConfig,
        inference: InferenceConfig,
        db: Database,
        board: BoardInfo,
        model_id: str,
        model_path: Path | None = None,
        manager: InferenceManager | None = None,
        identity: NodeIdentity | None = None,
        mesh: MeshService | None = None,
        clock: Callable[[], float] = time.time,
        embed_model_dir: Path | None = None,
        embed_threads: int = 1,
        on_embed_settings: Callable[[Mapping[str, Any]], Awaitable[None]] | None = None,
        trial_command: Sequence[str] | None = None,
        tasks: TaskSupervisor | None = None,
    ) -> None:
        self.config = config
        self._inference = inference
        self._db = db
        self._board = board
        self.board_profile = board.profile or "generic"
        self.model_id = model_id
        self._model_path = model_path
        self._resolved_id = model_id  # the registry's id for it, once resolved
        self._manager = manager
        self._identity = identity
        self._mesh = mesh
        self._clock = clock
        self._embed_dir = embed_model_dir if on_embed_settings is not None else None
        self._on_embed_settings = on_embed_settings
        self._embed_threads = embed_threads
        self._trial_command = tuple(trial_command) if trial_command else default_trial_command()
        self._tasks = tasks if tasks is not None else TaskSupervisor()
        self.cores = max(board.cores_logical, 1)
        self.active: Version | None = None
        self._applied: str | None = None  # canonical settings last applied to the manager
        self._recent: dict[str, float] = {}  # canonical settings -> when last trialled or used
        self._peer_queue: deque[PeerCandidate] = deque(maxlen=PEER_QUEUE_MAX)
        self._trial_lock = asyncio.Lock()
        self._version_lock = asyncio.Lock()
        self._watch = RegressionWatch()
        self._rolling_back = False
        self._resync = False
        self._model_sha256: str | None = None
        self._llama_version: str | None = None
        self.trials_total: Counter[str] = Counter()
        self.peer_payloads: Counter[str] = Counter()
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def async_start(self) -> None:
        """Load the active version (recording the configured settings as the first one) and apply it."""
        if self._started:
            return
        config_settings = self.config_settings()
        key = config_key(config_settings)
        active = await self._async_load_active()
        if active is None or active.measurements.get("config_key") != key:
            reason = "baseline: the configured settings" if active is None else "baseline: the configuration changed"
            active = await self._async_insert_version(
                config_settings, {"config_key": key, "previous": None}, reason=reason, origin="config", trial=None
            )
        self.active = active
        await self._async_load_recent()
        if self._mesh is not None:
            self._mesh.add_message_listener(self._on_mesh_message)
        self._started = True
        await self._async_ensure_applied()
        log.info("evolution_started", version=active.id, settings=active.settings, board=self.board_profile, model=self.model_id)

    async def async_stop(self) -> None:
        """Stop sharing and forget the mesh hook (idempotent); a running trial belongs to Sommeil's task."""
        if self._mesh is not None:
            self._mesh.remove_message_listener(self._on_mesh_message)
        await self._tasks.async_stop(self.stop_timeout_s, owner=self)
        self._started = False

    def job(self) -> EvolutionJob:
        """Return the idle job Sommeil runs ("evolution")."""
        return EvolutionJob(self)

    # ------------------------------------------------------------------ settings

    def config_settings(self) -> Settings:
        """Return the settings the configuration gives (the first version)."""
        return settings_from_config(self._inference, self._board, embed_threads=self._embed_threads if self._embed_dir else None)

    def budget_mb(self) -> float:
        """Return the inference memory budget a candidate's peak RSS must fit."""
        if self._manager is not None:
            return float(self._manager.budget_mb)
        from mongarsd.inference.manager import effective_budget_mb

        ram = self._board.ram_mb
        if ram <= 0:
            import psutil

            ram = int(psutil.virtual_memory().total / 2**20)
        return effective_budget_mb(self._inference.memory_budget_mb, ram)

    def neighbours(self) -> list[Settings]:
        """Return the local candidates around the active settings."""
        if self.active is None:
            return []
        return neighbourhood(self.active.settings, cores=self.cores)

    def has_work(self) -> bool:
        """Tell whether a trial is waiting: a peer's result, or a neighbour not trialled lately."""
        if not self._started or not self.config.enabled or self.active is None:
            return False
        return bool(self._peer_queue) or pick_candidate(self.neighbours(), self._recent, self._clock()) is not None

    # ------------------------------------------------------------------ idle work

    async def async_run_once(self) -> dict[str, Any]:
        """Trial the next candidate: a peer's first, else a fresh neighbour; return what was done."""
        if not self._started or self.active is None:
            return {"skipped": "the evolution engine is not running"}
        await self._async_ensure_applied()
        if self._peer_queue:
            peer = self._peer_queue.popleft()
            try:
                why = await self._async_check_peer_model(peer.payload)
                if why is not None:
                    self._count_peer(why, peer.node)
                    return {"skipped": "peer result dropped: " + why, "peer": peer.node}
                if peer.settings == self.active.settings:
                    self._count_peer("already_active", peer.node)
                    return {"skipped": "peer result already active", "peer": peer.node}
                return await self.async_trial(peer.settings, origin="peer:" + peer.node)
            except asyncio.CancelledError:
                self._peer_queue.appendleft(peer)  # trialled in a later idle period
                raise
        cand = pick_candidate(self.neighbours(), self._recent, self._clock())
        if cand is None:
            return {"skipped": "nothing to trial: every neighbour of the active settings was trialled lately"}
        return await self.async_trial(cand)

    async def async_trial(self, candidate: Mapping[str, Any], *, origin: str = "local") -> dict[str, Any]:
        """Measure `candidate` against the active settings; adopt it if the rules allow; return a summary.

        Cancellable at any await: the trial process is killed and reaped, nothing is recorded.
        """
        if self.active is None:
            raise ValidationError("the evolution engine is not started")
        cand = validate_settings(candidate, cores=self.cores)
        async with self._trial_lock:
            await self._async_resync()
            base = self.active
            if cand == base.settings:
                raise ValidationError("the candidate is the active settings", param="settings")
            kind = trial_kind(base.settings, cand)
            if kind == "embed" and self._embed_dir is None:
                raise ValidationError("embedder settings cannot be trialled: no embedder to apply them to", param="settings")
            model_path = await self._async_model_path()
            log.info("evolution_trial_started", origin=origin, changes=describe_changes(base.settings, cand), kind=kind)
            runs: dict[str, list[TrialRun]] = {"baseline": [], "candidate": []}
            failure = ""
            for r in range(self.config.trial_repeats):
                order = ("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")
                for arm in order:
                    run = await self._async_run_trial(kind, base.settings if arm == "baseline" else cand, model_path)
                    if not run.ok:
                        failure = f"{arm} run {r + 1} failed: {run.error}"
                        break
                    runs[arm].append(run)
                if failure:
                    break
            b_rates = [run.sample for run in runs["baseline"]]
            c_rates = [run.sample for run in runs["candidate"]]
            rss = max((run.peak_rss_mb for run in runs["candidate"]), default=0.0)
            samples = self._samples(runs["candidate"], kind)
            baseline = {**self._samples(runs["baseline"], kind), "version": base.id, "settings": base.settings}
            if failure:
                trial_id = await self._async_insert_trial(TrialRecord(cand, samples, baseline, None, "failed", failure, origin))
                self.trials_total["failed"] += 1
                log.warning("evolution_trial_failed", trial=trial_id, origin=origin, reason=failure)
                return {"status": "trial failed", "trial": trial_id, "outcome": "failed", "reason": failure, "origin": origin}
            decision = decide(
                baseline=b_rates,
                candidate=c_rates,
                confidence=self.config.confidence,
                min_gain=self.config.min_gain,
                peak_rss_mb=rss,
                budget_mb=self.budget_mb(),
            )
            samples["p_value"] = decision.p_value
            samples["gain"] = decision.gain
            reason = describe_changes(base.settings, cand) + ": " + decision.reason
            version = None
            if decision.adopt:
                record = TrialRecord(cand, samples, baseline, decision.p_value, "adopted", reason, origin)
                version = await self._async_adopt(record, base, decision)
                if version is None:  # a rollback happened meanwhile: the comparison is stale
                    reason = describe_changes(base.settings, cand) + ": refused: the active version changed during the trial"
            if version is None:
                trial_id = await self._async_insert_trial(TrialRecord(cand, samples, baseline, decision.p_value, "refused", reason, origin))
                self.trials_total["refused"] += 1
                log.info("evolution_trial_refused", trial=trial_id, origin=origin, reason=reason)
                return {
                    "status": "refused",
                    "trial": trial_id,
                    "outcome": "refused",
                    "reason": reason,
                    "p_value": decision.p_value,
                    "gain": decision.gain,
                    "origin": origin,
                }
            trial_id = int(version.measurements["trial"])
            self.trials_total["adopted"] += 1
            return {
                "status": "adopted",
                "trial": trial_id,
                "version": version.id,
                "outcome": "adopted",
                "reason": reason,
                "p_value": decision.p_value,
                "gain": decision.gain,
                "origin": origin,
            }

    @staticmethod
    def _samples(runs: Sequence[TrialRun], kind: str) -> dict[str, Any]:
        rates = [run.sample for run in runs]  # one sample per process (what the test compares)
        decode = [run.decode_sample for run in runs]
        return {
            "kind": kind,
            "tokens_per_s": rates,
            "decode_tokens_per_s": decode,
            "median_tokens_per_s": median(rates) if rates else None,
            "median_decode_tokens_per_s": median(decode) if decode else None,
            "peak_rss_mb": max((run.peak_rss_mb for run in runs), default=None),
            "llama_cpp": next((run.llama_cpp for run in runs if run.llama_cpp), ""),
        }

    async def _async_adopt(self, record: TrialRecord, base: Version, decision: Decision) -> Version | None:
        """Record the trial and its version in one transaction, apply and share it; None if `base` is no longer active."""
        cand, samples, baseline, origin = record.settings, record.samples, record.baseline, record.origin
        measurements: dict[str, Any] = {
            "tokens_per_s": decision.candidate_median,
            "decode_tokens_per_s": samples.get("median_decode_tokens_per_s"),
            "baseline_tokens_per_s": decision.baseline_median,
            "gain": decision.gain,
            "p_value": decision.p_value,
            "samples": samples["tokens_per_s"],
            "baseline_samples": baseline["tokens_per_s"],
            "peak_rss_mb": samples.get("peak_rss_mb"),
            "llama_cpp": samples.get("llama_cpp") or "",
            "config_key": base.measurements.get("config_key"),
            "previous": base.id,
        }
        payload = await self._async_signed_payload(cand, measurements)
        if payload is not None:
            measurements["node"] = payload["node"]
            measurements["signature"] = payload["sig"]
        async with self._version_lock:
            if self.active is not base:
                return None
            version = await self._async_insert_version(cand, measurements, reason=record.reason, origin=origin, trial=record)
            self.active = version
            self._watch.reset()
        log.info("evolution_adopted", version=version.id, trial=version.measurements.get("trial"), origin=origin, reason=record.reason)
        await self._async_ensure_applied()
        if payload is not None and origin == "local" and self.config.share:
            self._tasks.spawn_once("evolution-share", self._async_share(payload), owner=self, expected=(MongarsError,))
        return version

    # ------------------------------------------------------------------ rollback and production

    async def async_rollback(self, *, reason: str = "requested by an administrator") -> dict[str, Any]:
        """Restore the version before the active one (a new row); ValidationError 409 when there is none."""
        async with self._version_lock:
            await self._async_resync()
            active = self.active
            if active is None:
                raise ValidationError("the evolution engine is not started", status=409)
            prev_id = active.previous
            if prev_id is None:
                raise ValidationError(f"nothing to roll back to: version {active.id} is the first of its line", status=409)
            row = await self._db.async_fetchone("SELECT * FROM evolution_versions WHERE id = ?", (prev_id,))
            if row is None:
                raise ValidationError(f"nothing to roll back to: version {prev_id} is gone", status=409)
            prev = _version_from_row(row)
            measurements = {
                k: v for k, v in prev.measurements.items() if k not in ("trial", "signature", "node", "previous", "rollback_of", "restores")
            }
            measurements.update({"rollback_of": active.id, "restores": prev.id, "previous": prev.previous})
            version = await self._async_insert_version(
                prev.settings,
                measurements,
                reason=f"rollback of {active.id} to version {prev.id}: {reason}",
                origin="rollback",
                trial=None,
            )
            self.active = version
            self._watch.reset()
            self._recent[canonical(active.settings)] = self._clock()  # not trialled again soon
        log.warning("evolution_rolled_back", version=version.id, rolled_back=active.id, restored=prev.id, reason=reason)
        await self._async_ensure_applied()
        return self.version_public(version)

    def observe_production(self, tokens_per_s: float, *, tokens: int | None = None, model: str | None = None) -> None:
        """Fold one finished generation's decode tokens/s into the EWMA; roll back on a regression (loop-only).

        `tokens`: how many tokens it generated (below MIN_OBSERVED_TOKENS it is ignored); `model`:
        the model that generated (another model than the tuned one is ignored). Nothing is
        observed while the board is hot: the thermal limit halves the threads on purpose.
        """
        if not isinstance(tokens_per_s, int | float) or not math.isfinite(tokens_per_s) or tokens_per_s <= 0:
            return
        if tokens is not None and tokens < MIN_OBSERVED_TOKENS:
            return
        if model is not None and model not in (self.model_id, self._resolved_id):
            return
        if self._manager is not None and self._manager.thermal_hot:
            return
        self._watch.observe(float(tokens_per_s))
        active = self.active
        if active is None or active.previous is None or self._rolling_back or not self._started:
            return
        reference = self.reference_tokens_per_s()
        if not self._watch.regressed(reference, self.config.regression_margin):
            return
        self._rolling_back = True
        why = (
            f"production regression: tokens/s EWMA {self._watch.ewma:.2f} over {self._watch.count} generations "
            f"below {(1 - self.config.regression_margin) * (reference or 0):.2f} "
            f"({1 - self.config.regression_margin:.0%} of the measured {reference or 0:.2f})"
        )
        self._tasks.spawn_once("evolution-regression-rollback", self._async_regression_rollback(why), owner=self, expected=(MongarsError,))

    def reference_tokens_per_s(self) -> float | None:
        """Return the active version's measured decode tokens/s (what production is held to)."""
        if self.active is None:
            return None
        ref = self.active.measurements.get("decode_tokens_per_s")
        return float(ref) if isinstance(ref, int | float) and ref > 0 else None

    async def _async_regression_rollback(self, why: str) -> None:
        try:
            await self.async_rollback(reason=why)
        finally:
            self._rolling_back = False

    # ------------------------------------------------------------------ history

    async def async_history(self, *, trials: int = HISTORY_TRIALS) -> dict[str, Any]:
        """Return the active version, the versions (newest first) and the last trials, with why."""
        await self._async_resync()
        rows = await self._db.async_fetchall(
            "SELECT * FROM evolution_versions WHERE board = ? AND model = ? ORDER BY id DESC LIMIT ?",
            (self.board_profile, self.model_id, HISTORY_VERSIONS),
        )
        versions = [_version_from_row(r) for r in rows]
        trial_rows = await self._db.async_fetchall(
            "SELECT * FROM evolution_trials WHERE json_extract(baseline, '$.board') = ? AND json_extract(baseline, '$.model') = ? "
            "ORDER BY id DESC LIMIT ?",
            (self.board_profile, self.model_id, max(0, trials)),
        )
        by_trial = {v.measurements.get("trial"): v.id for v in versions if v.measurements.get("trial") is not None}
        reference = self.reference_tokens_per_s()
        return {
            "enabled": self.config.enabled,
            "board": self.board_profile,
            "model": self.model_id,
            "active": self.version_public(self.active) if self.active is not None else None,
            "versions": [self.version_public(v) for v in versions],
            "trials": [self._trial_public(r, by_trial) for r in trial_rows],
            "candidates_waiting": len(self._peer_queue),
            "production": {
                "observations": self._watch.count,
                "ewma_tokens_per_s": round(self._watch.ewma, 3) if self._watch.count else None,
                "reference_tokens_per_s": reference,
                "rollback_below_tokens_per_s": round((1 - self.config.regression_margin) * reference, 3) if reference else None,
                "min_observations": EWMA_MIN_OBSERVATIONS,
            },
            "peer_payloads": dict(self.peer_payloads),
        }

    def version_public(self, v: Version) -> dict[str, Any]:
        """Describe a version for the API."""
        out: dict[str, Any] = {
            "id": v.id,
            "created_at": v.created_at,
            "active": v.active,
            "origin": v.origin,
            "settings": v.settings,
            "measurements": v.measurements,
            "reason": v.reason,
            "previous": v.previous,
        }
        if v.origin.startswith("peer:") and "trial" in v.measurements:
            out["note"] = f"from peer {v.origin[5:]}, confirmed here by trial {v.measurements['trial']}"
        return out

    @staticmethod
    def _trial_public(row: sqlite3.Row, by_trial: Mapping[Any, int]) -> dict[str, Any]:
        samples = _row_json(row["samples"], {})
        baseline = _row_json(row["baseline"], {})
        settings = _row_json(row["settings"], {})
        base_settings = baseline.get("settings", {}) if isinstance(baseline, dict) else {}
        trial_id = int(row["id"])
        out: dict[str, Any] = {
            "id": trial_id,
            "created_at": float(row["created_at"]),
            "origin": str(row["origin"]),
            "outcome": str(row["outcome"]),
            "settings": settings,
            "changes": changes(base_settings, settings) if isinstance(settings, dict) and isinstance(base_settings, dict) else {},
            "p_value": row["p_value"],
            "samples": samples,
            "baseline": baseline,
            "reason": str(row["reason"]),
            "version": by_trial.get(trial_id),
        }
        origin = str(row["origin"])
        if origin.startswith("peer:"):
            verb = {"adopted": "confirmed", "refused": "refused", "failed": "failed"}.get(out["outcome"], out["outcome"])
            out["note"] = f"from peer {origin[5:]}, {verb} here by trial {trial_id}"
        return out

    # ------------------------------------------------------------------ mesh

    def _on_mesh_message(self, item: dict[str, Any]) -> bool:
        """Take tuning payloads out of the mesh's message stream (loop-only; never raises)."""
        message = item.get("message")
        if not isinstance(message, dict) or message.get("kind") != TUNING_KIND:
            return False
        sender = str(item.get("from") or "")
        self.receive_peer_payload(message, sender=None if sender.startswith("admin:") else sender)
        return True

    def receive_peer_payload(self, payload: Mapping[str, Any], *, sender: str | None = None) -> str:
        """Queue a peer's signed result for a trial here; return "queued" or why it was dropped (logged, counted)."""
        if not isinstance(payload, Mapping):
            return self._count_peer("malformed", sender)
        try:
            size = len(canonical(payload))
        except (TypeError, ValueError):
            return self._count_peer("malformed", sender)
        if size > MAX_PAYLOAD_BYTES:
            return self._count_peer("too_large", sender)
        why = verify_payload(payload)
        if why is not None:
            return self._count_peer(why, sender)
        node = str(payload["node"])
        if sender is not None and sender != node:
            return self._count_peer("sender_mismatch", sender)
        own = self._own_node_id()
        if own is not None and node == own:
            return self._count_peer("own_result", node)
        if payload["board"] != self.board_profile:
            return self._count_peer("other_board", node)
        if payload["model"] != self.model_id:
            return self._count_peer("other_model", node)
        if not self._started or self.active is None or not self.config.enabled:
            return self._count_peer("not_running", node)
        try:
            cand = validate_settings(overlay_tuned(self.active.settings, payload["settings"]), cores=self.cores)
        except ValidationError:
            return self._count_peer("invalid_settings", node)
        if cand == self.active.settings:
            return self._count_peer("already_active", node)
        if trial_kind(self.active.settings, cand) == "embed" and self._embed_dir is None:
            return self._count_peer("invalid_settings", node)
        if any(p.settings == cand for p in self._peer_queue):
            return self._count_peer("duplicate", node)
        if len(self._peer_queue) >= PEER_QUEUE_MAX:
            return self._count_peer("queue_full", node)
        self._peer_queue.append(PeerCandidate(node=node, settings=cand, payload=dict(payload)))
        self.peer_payloads["queued"] += 1
        log.info("evolution_peer_result_queued", peer=node, changes=describe_changes(self.active.settings, cand))
        return "queued"

    def _count_peer(self, reason: str, peer: str | None) -> str:
        self.peer_payloads[reason] += 1
        log.info("evolution_peer_payload_dropped", reason=reason, peer=peer)
        return reason

    def _own_node_id(self) -> str | None:
        identity = self._current_identity()
        return identity.node_id if identity is not None else None

    def _current_identity(self) -> NodeIdentity | None:
        if self._identity is not None:
            return self._identity
        return self._mesh.identity if self._mesh is not None else None

    async def _async_check_peer_model(self, payload: Mapping[str, Any]) -> str | None:
        """Return why a peer's result is for another model file, else None."""
        try:
            sha = await self._async_model_sha256()
        except (OSError, ModelError, NotFoundError):
            return "model_unreadable"
        return None if payload.get("model_sha256") == sha else "other_model_file"

    async def _async_signed_payload(self, settings: Settings, measurements: Mapping[str, Any]) -> dict[str, Any] | None:
        identity = self._current_identity()
        if identity is None:
            return None
        try:
            sha = await self._async_model_sha256()
        except (OSError, ModelError, NotFoundError) as err:
            log.warning("evolution_model_unreadable", model=self.model_id, error=str(err))
            return None
        version = str(measurements.get("llama_cpp") or "")
        if not version:  # the trial reports the version it ran; else ask the library
            if self._llama_version is None:
                self._llama_version = await asyncio.to_thread(_llama_cpp_version)
            version = self._llama_version
        payload = tuning_payload(
            board=self.board_profile,
            model=self.model_id,
            model_sha256=sha,
            llama_cpp=version,
            settings=settings,
            tokens_per_s=float(measurements.get("tokens_per_s") or 0.0),
            node=identity.node_id,
            public_key=identity.public_key,
        )
        return sign_payload(identity, payload)

    async def _async_share(self, payload: dict[str, Any]) -> None:
        """Send an adopted result to the alive peers of the same board (signed message each)."""
        mesh = self._mesh
        if mesh is None or not mesh.running:
            return
        sent = 0
        for member in mesh.members():
            if member.node_id == mesh.node_id or member.state != "alive" or member.meta.get("board") != self.board_profile:
                continue
            try:
                status = await mesh.async_send_message(member.node_id, payload, user=JOB_NAME)
            except MeshError as err:
                log.info("evolution_share_failed", peer=member.node_id, error=str(err))
                continue
            sent += status == 200
        log.info("evolution_shared", peers=sent)

    # ------------------------------------------------------------------ metrics

    def metrics_source(self) -> Iterable[Sample]:
        """Yield trial, peer-payload and production figures for /metrics."""
        for outcome, n in sorted(self.trials_total.items()):
            yield ("mongarsd_evolution_trials_total", "counter", "Evolution trials by outcome.", float(n), {"outcome": outcome})
        for result, n in sorted(self.peer_payloads.items()):
            yield ("mongarsd_evolution_peer_payloads_total", "counter", "Tuning results received from peers.", float(n), {"result": result})
        if self.active is not None:
            yield ("mongarsd_evolution_active_version", "gauge", "Id of the active settings version.", float(self.active.id), {})
        if self._watch.count:
            yield ("mongarsd_evolution_production_tokens_per_s", "gauge", "Production decode tokens/s EWMA.", self._watch.ewma, {})

    # ------------------------------------------------------------------ internals

    async def _async_model_path(self) -> Path:
        if self._model_path is not None:
            return self._model_path
        if self._manager is None:
            raise ModelError("no model file to trial: neither a path nor an inference manager")
        entry = await self._manager.async_resolve(self.model_id)
        self._resolved_id = entry.id
        self._model_path = Path(entry.path)
        return self._model_path

    async def _async_model_sha256(self) -> str:
        if self._model_sha256 is None:
            path = await self._async_model_path()
            self._model_sha256 = await asyncio.to_thread(_file_sha256, path)
        return self._model_sha256

    async def _async_run_trial(self, kind: str, settings: Mapping[str, Any], model_path: Path) -> TrialRun:
        """Run one trial process under limits and a timeout; kill and reap it on timeout or cancellation."""
        if kind == "embed":
            assert self._embed_dir is not None
            target, keys = self._embed_dir, EMBED_SETTING_KEYS
        else:
            target, keys = model_path, LLM_SETTING_KEYS
        argv = [
            *self._trial_command,
            "--kind",
            kind,
            "--model",
            str(target),
            "--settings",
            canonical({k: v for k, v in settings.items() if k in keys}),
            "--tokens",
            str(TRIAL_TOKENS),
            "--repeats",
            str(TRIAL_RUNS_PER_PROCESS),
        ]
        memory_mb = self.config.trial_memory_mb or int(self.budget_mb()) + TRIAL_AS_HEADROOM_MB
        threads = int(settings.get("embed_threads" if kind == "embed" else "threads", 1))
        cpu_s = math.ceil(self.config.trial_timeout_s * max(threads, 1)) + TRIAL_CPU_MARGIN_S
        limits = functools.partial(
            _limit_child,
            _capped(memory_mb * 2**20, resource.RLIMIT_AS),
            _capped(cpu_s, resource.RLIMIT_CPU),
            TRIAL_NICE,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=limits,
                start_new_session=True,  # its own process group: a kill takes any helper it started too
            )
        except (OSError, ValueError) as err:  # the interpreter is missing, or a limit could not be set
            return TrialRun(False, error=f"the trial could not be started: {err}")
        try:
            async with asyncio.timeout(self.config.trial_timeout_s):
                out, err_out = await proc.communicate()
        except TimeoutError:
            return TrialRun(False, error=f"timed out after {self.config.trial_timeout_s:g} s (evolution.trial_timeout_s)")
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError, ProcessLookupError):
                    await asyncio.wait_for(proc.communicate(), REAP_TIMEOUT_S)  # reaps it and drains its pipes
        assert proc.returncode is not None
        return parse_trial_output(out, proc.returncode, err_out, tokens=TRIAL_TOKENS)

    async def _async_resync(self) -> None:
        """Read the active version again after a version write was cancelled (it may have committed)."""
        if not self._resync:
            return
        active = await self._async_load_active()
        if active is not None:
            self.active = active
            self._watch.reset()
        self._resync = False

    async def _async_ensure_applied(self) -> None:
        """Make the manager (and the embedder) use the active settings, once per change."""
        await self._async_resync()
        active = self.active
        if active is None:
            return
        key = canonical(active.settings)
        if key == self._applied:
            return
        if self._manager is not None:
            overrides = {k: v for k, v in active.settings.items() if k in MANAGER_KEYS}
            try:
                unloaded = await self._manager.async_apply_overrides(overrides)
            except ValidationError as err:  # settings this build cannot take: keep running on the old ones
                log.error("evolution_apply_failed", version=active.id, error=str(err))
                return
            if unloaded:
                await self._async_reload()
        if self._on_embed_settings is not None and any(k in active.settings for k in EMBED_SETTING_KEYS):
            await self._on_embed_settings({k: v for k, v in active.settings.items() if k in EMBED_SETTING_KEYS})
        self._applied = key
        log.info("evolution_settings_applied", version=active.id)

    async def _async_reload(self) -> None:
        """Load the model again with the new settings so the next request does not wait for it."""
        assert self._manager is not None
        try:
            await self._manager.async_load(self.model_id)
        except (ModelError, NotFoundError, OverloadedError) as err:  # the next request loads it, or says why
            log.warning("evolution_reload_failed", model=self.model_id, error=str(err))

    async def _async_load_active(self) -> Version | None:
        row = await self._db.async_fetchone(
            "SELECT * FROM evolution_versions WHERE board = ? AND model = ? AND active = 1 ORDER BY id DESC LIMIT 1",
            (self.board_profile, self.model_id),
        )
        return _version_from_row(row) if row is not None else None

    async def _async_load_recent(self) -> None:
        since = self._clock() - RETRIAL_AFTER_S
        rows = await self._db.async_fetchall(
            "SELECT settings, created_at FROM evolution_trials WHERE created_at >= ? AND json_extract(baseline, '$.board') = ? "
            "AND json_extract(baseline, '$.model') = ?",
            (since, self.board_profile, self.model_id),
        )
        rows += await self._db.async_fetchall(
            "SELECT settings, created_at FROM evolution_versions WHERE created_at >= ? AND board = ? AND model = ?",
            (since, self.board_profile, self.model_id),
        )
        for row in rows:
            settings = _row_json(row["settings"], None)
            if isinstance(settings, dict):
                key = canonical(settings)
                self._recent[key] = max(self._recent.get(key, 0.0), float(row["created_at"]))

    async def _async_write_trial(self, conn: aiosqlite.Connection, record: TrialRecord, now: float) -> int:
        """Insert one trial row inside a write transaction; return its id."""
        baseline = {**record.baseline, "board": self.board_profile, "model": self.model_id}
        cur = await conn.execute(
            "INSERT INTO evolution_trials (created_at, settings, samples, baseline, p_value, outcome, reason, origin) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                now,
                canonical(record.settings),
                canonical(record.samples),
                canonical(baseline),
                record.p_value,
                record.outcome,
                record.reason,
                record.origin,
            ),
        )
        return int(cur.lastrowid or 0)

    async def _async_insert_trial(self, record: TrialRecord) -> int:
        now = self._clock()

        async def op(conn: aiosqlite.Connection) -> int:
            return await self._async_write_trial(conn, record, now)

        try:
            trial_id: int = await self._db.async_write(op)
        except StoreError:
            log.error("evolution_trial_not_recorded", outcome=record.outcome, reason=record.reason)
            raise
        self._recent[canonical(record.settings)] = now
        return trial_id

    async def _async_insert_version(
        self,
        settings: Settings,
        measurements: dict[str, Any],
        *,
        reason: str,
        origin: str,
        trial: TrialRecord | None,
    ) -> Version:
        """Insert a version (and the trial that adopted it) in one transaction; it becomes the only active one."""
        now = self._clock()
        board, model = self.board_profile, self.model_id
        measured = dict(measurements)

        async def op(conn: aiosqlite.Connection) -> int:
            if trial is not None:
                measured["trial"] = await self._async_write_trial(conn, trial, now)
            await conn.execute("UPDATE evolution_versions SET active = 0 WHERE board = ? AND model = ? AND active = 1", (board, model))
            cur = await conn.execute(
                "INSERT INTO evolution_versions (created_at, settings, measurements, reason, origin, board, model, active) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                (now, canonical(settings), canonical(measured), reason, origin, board, model),
            )
            return int(cur.lastrowid or 0)

        try:
            version_id: int = await self._db.async_write(op)
        except asyncio.CancelledError:
            self._resync = True  # the writer may still commit it: read the active version again before using it
            raise
        self._recent[canonical(settings)] = now
        return Version(
            id=version_id, created_at=now, settings=dict(settings), measurements=measured, reason=reason, origin=origin, active=True
        )
