"""Shared parts of the benchmark harness: targets, result entries, statistics, processes, HTTP.

The pure parts (targets, `make_entry`, `evaluate`, `finalize`, statistics, Prometheus
histogram parsing, table formatting) are unit-tested in tests/unit/test_bench_common.py.
Everything that talks to processes or sockets uses loopback addresses only, and every wait
is bounded by a named timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
LOOPBACK: Final = "127.0.0.1"
TARGET_IDS: Final = tuple(f"P{i}" for i in range(1, 18))
DEFAULT_MODEL_FILE: Final = "SmolLM2-135M-Instruct-Q4_1.gguf"
DEFAULT_MODEL_ID: Final = "smollm2-135m-instruct:q4_1"
NATIVE_BIN: Final = REPO / "native" / "bin"

READY_TIMEOUT_S: Final = 120.0
READY_POLL_S: Final = 0.02
STOP_TIMEOUT_S: Final = 30.0
HTTP_TIMEOUT_S: Final = 120.0
RSS_SETTLE_S: Final = 1.0
RSS_STABLE_MB: Final = 1.0
RSS_STABLE_MAX_S: Final = 10.0


class Skip(Exception):
    """Raised by a measurement that cannot run here; the message is the reason."""


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Check:
    """One pass/fail condition on a field of a result entry."""

    field: str
    op: str  # ">=" or "<="
    threshold: float

    def text(self) -> str:
        return f"{self.field} {self.op} {self.threshold:g}"

    def passes(self, observed: float) -> bool:
        if self.op == ">=":
            return observed >= self.threshold
        if self.op == "<=":
            return observed <= self.threshold
        raise ValueError(f"unknown operator {self.op!r}")


@dataclass(frozen=True)
class TargetSpec:
    """What a target id measures, in which unit, and what counts as met (DESIGN §9)."""

    what: str
    unit: str
    checks: tuple[Check, ...]


TARGETS: Final[dict[str, TargetSpec]] = {
    "P1": TargetSpec(
        "single-stream decode t/s via HTTP vs llama-bench tg; vs llama-server measured the same way: matched settings (one slot; four slots vs -np 4) / each side's defaults",
        "tokens/s",
        (
            Check("ratio", ">=", 0.95),
            Check("vs_llama_server", ">=", 1.0),
            Check("four_slots_vs_llama_server", ">=", 1.0),
            Check("defaults_ratio", ">=", 0.95),
            Check("defaults_vs_llama_server", ">=", 1.0),
        ),
    ),
    "P2": TargetSpec("prompt processing t/s via HTTP vs llama-bench pp", "tokens/s", (Check("ratio", ">=", 0.95),)),
    "P3": TargetSpec("TTFT over HTTP vs llama-server (same prompt)", "ms", (Check("delta_ms", "<=", 10.0),)),
    "P4": TargetSpec(
        "aggregate decode t/s, 4 streams, vs llama-server -np 4: matched settings / each side's defaults",
        "tokens/s",
        (Check("ratio", ">=", 0.95), Check("defaults_ratio", ">=", 0.95)),
    ),
    "P5": TargetSpec("follow-up TTFT with prefix cache vs cold, ~1k-token conversation", "ms", (Check("ratio", "<=", 0.3),)),
    "P6": TargetSpec(
        "embeddings/s at batch 32 vs bare onnxruntime; int8 vs fp32",
        "embeddings/s",
        (Check("ratio", ">=", 0.9), Check("int8_speedup", ">=", 1.5)),
    ),
    "P7": TargetSpec("top-10 recall p95 over 100k memories (384-d)", "ms", (Check("value", "<=", 10.0), Check("recall_at_10", ">=", 0.99))),
    "P8": TargetSpec(
        "idle RSS: models not loaded / default models loaded", "MB", (Check("value", "<=", 80.0), Check("loaded_rss_mb", "<=", 300.0))
    ),
    "P9": TargetSpec("cold start to READY with default models", "s", (Check("value", "<=", 3.0),)),
    "P10": TargetSpec(
        "gossip: update reaches 99.99% of 30 nodes / failure detected / bytes per node",
        "s",
        (Check("value", "<=", 2.0), Check("failure_detect_s", "<=", 6.0), Check("bytes_per_node_kbps", "<=", 40.0)),
    ),
    "P11": TargetSpec(
        "3-node mesh throughput (tokens decoded per second) vs 1 node under saturating load, same CPU budget per node: non-streamed / streamed / lost on failover",
        "tokens/s",
        (Check("ratio", ">=", 2.5), Check("stream_ratio", ">=", 2.5), Check("failover_lost", "<=", 0.0)),
    ),
    "P12": TargetSpec("event-loop lag p99 while generating", "ms", (Check("value", "<=", 20.0),)),
    "P13": TargetSpec("decode t/s under a JSON-schema grammar vs unconstrained, same prompt", "tokens/s", (Check("ratio", ">=", 0.8),)),
    "P14": TargetSpec("TTFT while Sommeil work runs vs an idle daemon", "ms", (Check("ratio", "<=", 1.5),)),
    "P15": TargetSpec("portable llama.cpp build decode vs the native build", "tokens/s", (Check("ratio", ">=", 0.95),)),
    "P16": TargetSpec("single executable's second start to READY vs the venv's", "s", (Check("ratio", "<=", 1.2),)),
    "P17": TargetSpec(
        "event-loop lag p99 while chats stream and research, ingest and speech run / chats alone", "ms", (Check("value", "<=", 20.0),)
    ),
}


def target_text(pid: str) -> str:
    """Return the human-readable target of a target id, e.g. 'ratio >= 0.95'."""
    return "; ".join(c.text() for c in TARGETS[pid].checks)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def safe_ratio(value: float | None, reference: float | None) -> float | None:
    """Return value/reference, or None when either is missing or the reference is zero."""
    v, r = _number(value), _number(reference)
    if v is None or r is None or r == 0:
        return None
    return v / r


def evaluate(entry: Mapping[str, Any], checks: Sequence[Check]) -> tuple[bool | None, list[dict[str, Any]]]:
    """Judge an entry against its checks: True/False, or None when a checked field is missing."""
    rows: list[dict[str, Any]] = []
    verdicts: list[bool | None] = []
    for check in checks:
        observed = _number(entry.get(check.field))
        ok = None if observed is None else check.passes(observed)
        verdicts.append(ok)
        rows.append({"check": check.text(), "observed": observed, "met": ok})
    if any(v is False for v in verdicts):
        return False, rows
    if verdicts and all(v is True for v in verdicts):
        return True, rows
    return None, rows


def make_entry(
    pid: str,
    *,
    value: float | None,
    reference: float | None,
    unit: str | None = None,
    ratio: float | None = None,
    details: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build one result entry; `ratio` defaults to value/reference."""
    entry: dict[str, Any] = {
        "value": _round(value),
        "reference": _round(reference),
        "ratio": _round(ratio if ratio is not None else safe_ratio(value, reference), 4),
        "target": target_text(pid),
        "unit": unit or TARGETS[pid].unit,
    }
    for key, val in extra.items():
        entry[key] = _round(val, 4) if isinstance(val, float) else val
    if details:
        entry["details"] = dict(details)
    return entry


def skipped_entry(pid: str, reason: str) -> dict[str, Any]:
    """Build the entry of a measurement that did not run."""
    return {"value": None, "reference": None, "ratio": None, "target": target_text(pid), "unit": TARGETS[pid].unit, "skipped": reason}


def finalize(results: Mapping[str, Mapping[str, Any]], *, machine: str, measured_at: str) -> dict[str, dict[str, Any]]:
    """Return every target id in order, each with target, unit, machine, met and checks filled in."""
    out: dict[str, dict[str, Any]] = {}
    for pid in TARGET_IDS:
        raw = results.get(pid)
        entry = dict(raw) if raw is not None else skipped_entry(pid, "not measured (no module for it)")
        for key in ("value", "reference", "ratio"):
            entry.setdefault(key, None)
        if entry["ratio"] is None and not entry.get("skipped"):
            entry["ratio"] = _round(safe_ratio(entry["value"], entry["reference"]), 4)
        entry["target"] = target_text(pid)
        entry.setdefault("unit", TARGETS[pid].unit)
        entry["machine"] = machine
        entry["measured_at"] = measured_at
        met, rows = evaluate(entry, TARGETS[pid].checks)
        entry["met"] = None if entry.get("skipped") else met
        entry["checks"] = rows
        out[pid] = entry
    return out


def _round(v: Any, digits: int = 3) -> Any:
    n = _number(v)
    return round(n, digits) if n is not None else None


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Render the finalized results as a plain-text table (one row per target id)."""
    header = f"{'id':<4} {'value':>10} {'reference':>10} {'ratio':>8}  {'unit':<13} {'target':<52} status"
    lines = [header, "-" * len(header)]
    for pid in TARGET_IDS:
        e = results.get(pid)
        if e is None:
            continue
        if e.get("skipped"):
            status = f"skipped: {e['skipped']}"
        else:
            status = {True: "met", False: "MISSED", None: "unknown"}[e.get("met")]
            extras = [
                f"{r['check'].split()[0]}={_fmt(r['observed'])}"
                for r in e.get("checks", [])
                if r["check"].split()[0] not in ("value", "ratio")
            ]
            if extras:
                status += " (" + ", ".join(extras) + ")"
        lines.append(
            f"{pid:<4} {_fmt(e.get('value')):>10} {_fmt(e.get('reference')):>10} {_fmt(e.get('ratio')):>8}  {e.get('unit', ''):<13} {e.get('target', ''):<52} {status}"
        )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    n = _number(v)
    if n is None:
        return "-"
    return f"{n:.3g}" if abs(n) < 10 else f"{n:.1f}"


def dump_json(results: Mapping[str, Any], path: Path) -> None:
    """Write results as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- statistics


def median(xs: Iterable[float]) -> float | None:
    data = [float(x) for x in xs]
    return statistics.median(data) if data else None


def paired_ratio(ours: Sequence[float | None], theirs: Sequence[float | None]) -> float | None:
    """Median over reps of ours[i] / theirs[i], for the reps where both sides have a number.

    Each rep measures the two sides back to back, so a drift of the machine's speed over a run
    (up to 30 % on the 2-core VM) cancels within a pair instead of landing in one side's median.
    """
    ratios = per_rep_ratios(ours, theirs)
    return statistics.median(ratios) if ratios else None


def per_rep_ratios(ours: Sequence[float | None], theirs: Sequence[float | None]) -> list[float]:
    """ours[i] / theirs[i] for the reps where both sides have a number (paired_ratio's samples)."""
    return [a / b for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None and b > 0]


def present(xs: Iterable[float | None]) -> list[float]:
    """The samples that were measured (a rep whose reference failed leaves None)."""
    return [x for x in xs if x is not None]


def round_ratio(x: float | None) -> float | None:
    """A ratio as entries store it (4 digits), for fields set outside make_entry."""
    return _round(x, 4)  # type: ignore[no-any-return]


def ratio_of_medians(ours: Iterable[float | None], theirs: Iterable[float | None]) -> float | None:
    """median(ours) / median(theirs) over the measured samples: the figure before paired ratios."""
    return round_ratio(safe_ratio(median(present(ours)), median(present(theirs))))


def spread(xs: Iterable[float]) -> dict[str, Any]:
    """Return the samples and their median/min/max, for the details block."""
    data = [float(x) for x in xs]
    if not data:
        return {"n": 0}
    return {
        "n": len(data),
        "median": round(statistics.median(data), 3),
        "min": round(min(data), 3),
        "max": round(max(data), 3),
        "samples": [round(x, 3) for x in data],
    }


def parse_histogram(text: str, name: str) -> list[tuple[float, float]]:
    """Return the (upper bound, cumulative count) buckets of a Prometheus text histogram."""
    buckets: list[tuple[float, float]] = []
    pattern = re.compile(r"^" + re.escape(name) + r'_bucket\{(?:[^}]*,)?le="([^"]+)"[^}]*\}\s+(\S+)')
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            le = math.inf if m.group(1) in ("+Inf", "Inf") else float(m.group(1))
            buckets.append((le, float(m.group(2))))
    buckets.sort(key=lambda b: b[0])
    return buckets


def histogram_delta(after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Subtract two cumulative histograms with the same buckets (observations in between)."""
    prev = dict(before)
    return [(le, count - prev.get(le, 0.0)) for le, count in after]


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Estimate a quantile from cumulative buckets like Prometheus' histogram_quantile."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


# --------------------------------------------------------------------------- machine


def machine_description(cpuinfo: str, cores: int, arch: str) -> str:
    """Describe the machine in a few words: CPU model, logical cores, architecture (pure)."""
    model = ""
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model") and val.strip():
            model = val.strip()
            break
    model = re.sub(r"\s+", " ", model) or "unknown CPU"
    return f"{model}, {cores} cores, {arch}"


def describe_machine() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return machine_description(cpuinfo, cores, platform.machine())


@dataclass(frozen=True)
class BenchSettings:
    """What both sides of every ratio share: model, threads, board profile."""

    models_dir: Path
    model_path: Path
    model_id: str
    threads: int
    embed_threads: int
    profile: str


def resolve_settings(models_dir: Path) -> BenchSettings:
    """Read threads from the board profile (inference.threads, else recommended_threads)."""
    from mongarsd.board import detect_board, recommended_threads
    from mongarsd.config import load_config

    board = detect_board()
    env = {k: v for k, v in os.environ.items() if k.startswith("MONGARSD_INFERENCE__") or k.startswith("MONGARSD_EMBED__")}
    cfg = load_config(profile=board.profile, config_path=None, env={**env, "MONGARSD_CONFIG": "/dev/null"}).config
    threads = cfg.inference.threads or recommended_threads(board)
    return BenchSettings(
        models_dir=models_dir,
        model_path=models_dir / DEFAULT_MODEL_FILE,
        model_id=DEFAULT_MODEL_ID,
        threads=threads,
        embed_threads=cfg.embed.threads,
        profile=board.profile,
    )


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET a loopback URL with the standard library; return (status, body) (blocking)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def http_post_json(url: str, body: Any, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, Any]:
    """POST JSON to a loopback URL; return (status, decoded JSON or raw text) (blocking)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), int(resp.status)
    except urllib.error.HTTPError as err:
        raw, status = err.read(), int(err.code)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


@dataclass
class Proc:
    """A child process serving HTTP on a loopback port, with its log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_at: float
    ready_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Poll GET path until 200; return seconds since spawn (blocking)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Skip(f"process exited with {self.proc.returncode}: {self.log_tail(600).strip()[-400:]}")
            try:
                status, _ = http_get(self.url + path, timeout=2.0)
                if status == 200:
                    self.ready_s = time.monotonic() - self.started_at
                    return self.ready_s
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass  # not listening yet
            time.sleep(READY_POLL_S)
        self.stop()
        raise Skip(f"not ready within {timeout_s:.0f} s: {self.log_tail(600).strip()[-400:]}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after the timeout (blocking)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def spawn(cmd: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None, port: int) -> Proc:
    """Start a child with stdout/stderr into log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as fh:
        t0 = time.monotonic()
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    return Proc(proc=proc, port=port, log_path=log_path, started_at=t0)


def daemon_env(
    workdir: Path, settings: BenchSettings, overrides: Mapping[str, str] | None = None, *, models: bool = True
) -> dict[str, str]:
    """Environment of a bench daemon: an empty config file (so /etc is not read) plus overrides."""
    cfg = workdir / "empty.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGARSD_")}
    env.update({"MONGARSD_CONFIG": str(cfg), "MONGARSD_LOG__FORMAT": "json", "MONGARSD_LOG__LEVEL": "info", "PYTHONUNBUFFERED": "1"})
    if not models:
        env["MONGARSD_INFERENCE__PRELOAD"] = "false"
        env["MONGARSD_EMBED__PRELOAD"] = "false"
    env.update(overrides or {})
    return env


def start_daemon(
    workdir: Path, settings: BenchSettings, *, name: str, overrides: Mapping[str, str] | None = None, models: bool = True, wait: bool = True
) -> Proc:
    """Run `mongarsd run` on a free loopback port with a fresh state dir (blocking until /ready)."""
    port = free_port()
    state = workdir / f"state-{name}-{port}"
    cmd = [
        sys.executable,
        "-m",
        "mongarsd",
        "run",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--state-dir",
        str(state),
        "--models-dir",
        str(settings.models_dir),
    ]
    proc = spawn(
        cmd, log_path=workdir / f"daemon-{name}-{port}.log", env=daemon_env(workdir, settings, overrides, models=models), port=port
    )
    if wait:
        proc.wait_ready("/ready")
    return proc


def log_event(proc: Proc, event: str) -> dict[str, Any] | None:
    """Return the last JSON log line of `proc` whose event is `event`, or None."""
    found = None
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if event not in line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event") == event:
            found = obj
    return found


def native_tool(name: str) -> Path:
    """Return native/bin/<name> or raise Skip saying how to build it."""
    path = NATIVE_BIN / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise Skip(f"{path.relative_to(REPO)} is not built (run `make native`)")
    return path


def rss_mb(pid: int) -> float:
    """Return a process's resident set (VmRSS) in MB."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def settled_rss_mb(pid: int) -> float:
    """Wait RSS_SETTLE_S, then until RSS stops growing (bounded); return it in MB (blocking)."""
    time.sleep(RSS_SETTLE_S)
    last = rss_mb(pid)
    deadline = time.monotonic() + RSS_STABLE_MAX_S
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_mb(pid)
        if abs(now - last) < RSS_STABLE_MB:
            return now
        last = now
    return last


# --------------------------------------------------------------------------- streaming HTTP


@dataclass
class StreamResult:
    """Timings of one streamed completion, all on the client's monotonic clock."""

    t_send: float
    t_first: float | None = None
    t_last: float | None = None
    chunks: int = 0
    text: str = ""
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    finish_reason: str | None = None
    status: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def completion_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return int(self.usage["completion_tokens"])
        return self.chunks

    @property
    def prompt_tokens(self) -> int | None:
        if self.usage and isinstance(self.usage.get("prompt_tokens"), int):
            return int(self.usage["prompt_tokens"])
        return None

    def decode_rate(self) -> float | None:
        """Tokens per second between the first and the last token."""
        n = self.completion_tokens
        if self.t_first is None or self.t_last is None or n < 2 or self.t_last <= self.t_first:
            return None
        return (n - 1) / (self.t_last - self.t_first)


def chunk_text(chunk: Mapping[str, Any]) -> str:
    """Return the text of an OpenAI completion or chat SSE chunk (pure)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if isinstance(c.get("text"), str):
        return str(c["text"])
    delta = c.get("delta") or {}
    content = delta.get("content")
    return content if isinstance(content, str) else ""


class Dechunker:
    """Decode an HTTP/1.1 chunked body fed in arbitrary pieces (pure)."""

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # bytes of the current chunk still to come
        self._state = "size"
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out: list[bytes] = []
        while not self.done:
            if self._state == "size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(self._buf[:end].split(b";", 1)[0].strip() or b"0", 16)
                self._buf = self._buf[end + 2 :]
                self._left, self._state = size, "data"
                self.done = size == 0
            elif self._state == "data":
                take = self._buf[: self._left]
                out.append(take)
                self._buf = self._buf[len(take) :]
                self._left -= len(take)
                if self._left:
                    break
                self._state = "crlf"
            else:  # the CRLF after a chunk's data
                if len(self._buf) < 2:
                    break
                self._buf = self._buf[2:]
                self._state = "size"
        return b"".join(out)


def _take_event(res: StreamResult, payload: bytes, now: float) -> bool:
    """Account one SSE data payload received at `now`; return True at [DONE] (pure)."""
    if payload == b"[DONE]":
        return True
    try:
        chunk = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(chunk, dict):
        return False
    if chunk.get("usage"):
        res.usage = chunk["usage"]
    if chunk.get("timings"):
        res.timings = chunk["timings"]
    text = chunk_text(chunk)
    choices = chunk.get("choices") or []
    finish = choices[0].get("finish_reason") if choices else None
    if text or finish:
        if res.t_first is None:
            res.t_first = now
        if text:
            res.chunks += 1
            res.text += text
            res.t_last = now
    if finish:
        res.finish_reason = finish
    return False


def parse_sse_response(res: StreamResult, pieces: Sequence[tuple[float, bytes]], what: str) -> StreamResult:
    """Fill `res` from a raw HTTP response received as (arrival time, bytes) pieces (pure).

    Each SSE event is timed by the arrival of the piece that completed it. Raises Skip on a
    status other than 200, naming `what`.
    """
    head = b""
    body_pieces: list[tuple[float, bytes]] = []
    for i, (t, data) in enumerate(pieces):
        head += data
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            body_pieces = [(t, head[end + 4 :]), *pieces[i + 1 :]]
            head = head[:end]
            break
    else:
        raise Skip(f"{what}: the response ended before its headers did")
    lines = head.decode("latin-1").split("\r\n")
    try:
        res.status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise Skip(f"{what}: not an HTTP status line: {lines[0][:80]!r}") from None
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    dechunk = Dechunker() if "chunked" in headers.get("transfer-encoding", "").lower() else None
    if res.status != 200:
        body = b"".join(dechunk.feed(d) if dechunk else d for _, d in body_pieces)
        raise Skip(f"{what} answered {res.status}: {body.decode(errors='replace')[:300]}")
    buf = b""
    for t, data in body_pieces:
        buf += dechunk.feed(data) if dechunk else data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:") and _take_event(res, line[5:].strip(), t):
                return res
    return res


def post_stream(url: str, body: Mapping[str, Any], timeout_s: float = HTTP_TIMEOUT_S) -> StreamResult:
    """POST a streaming OpenAI request over a plain socket and time its SSE events (blocking).

    While the stream runs the client only keeps each recv() with its arrival time, as little
    work as curl does; the response is parsed once the server closes it. The servers under
    test share this machine's cores with the client: an aiohttp client that decoded each event
    as it came took 0.3-0.4 ms of CPU per event, and llama-server sends an event per token.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or LOOPBACK, parts.port or 80
    data = json.dumps(dict(body)).encode()
    request = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
    what = "POST " + parts.path.lstrip("/")
    res = StreamResult(t_send=time.monotonic())
    deadline = res.t_send + timeout_s
    pieces: list[tuple[float, bytes]] = []
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(request)
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                got = sock.recv(65536)
                if not got:
                    break
                pieces.append((time.monotonic(), got))
                if got == b"0\r\n\r\n" or got.endswith(b"\r\n0\r\n\r\n"):  # the last chunk: the close may lag
                    break
    except TimeoutError:
        raise Skip(f"{what} ran past {timeout_s:.0f} s") from None
    except OSError as err:
        raise Skip(f"{what} failed: {err}") from None
    return parse_sse_response(res, pieces, what)


async def async_stream(url: str, body: Mapping[str, Any], timeout_s: float = HTTP_TIMEOUT_S) -> StreamResult:
    """`post_stream` in a worker thread, so that several streams can run at once."""
    return await asyncio.to_thread(post_stream, url, body, timeout_s)
