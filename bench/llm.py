"""P1–P5 and P12: the daemon's HTTP API against llama.cpp's own llama-bench and llama-server.

Both sides use the same GGUF file, the same thread count, the same batch sizes and the same
prompts; the measurements of the two sides are interleaved (daemon, reference, daemon, …)
so that drift on a busy two-core machine hits both alike. Every request is sequential
except the 4-stream runs of P4, which run 4 streams on each side in turn, never both at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.common import (
    LOOPBACK,
    BenchSettings,
    Proc,
    Skip,
    StreamResult,
    async_stream,
    free_port,
    histogram_delta,
    histogram_quantile,
    http_get,
    log_event,
    make_entry,
    median,
    native_tool,
    paired_ratio,
    parse_histogram,
    present,
    ratio_of_medians,
    round_ratio,
    skipped_entry,
    spawn,
    spread,
    start_daemon,
)

REPS: Final = 5  # repetitions per side for P2, P5, P13 (median reported): the VM drifts up to 30 % in a run
# Reps whose two servers alternate in order are even: the one measured right after a llama-bench
# run (or after the other server's 4 streams) was measured 3-4 % slower on the 2-core VM, and an
# odd count gives one side that place once more.
# P4: on the AVX2 EPYC VM, whose single-thread decode moved between 50 and 90 t/s within a minute,
# the median of 6 per-rep ratios read 0.93, 1.01 and 0.94 in three runs of the same build, and
# 16 reps of the same two servers read 1.03; 12 keep one run's median within a few percent.
DEFAULTS_REPS: Final = 12  # P4 with each side's defaults: what a user gets
P4_REPS: Final = 12  # P4 matched (and P12's lag samples)
P1_REPS: Final = 10  # P1, matched and with defaults: a ±2 % question on a VM whose pairs scatter by ±5 %
P2_REPS: Final = 10  # P2's pairs scattered from 0.86 to 1.21 in one run of 5 (llama-bench pp512 210-275 t/s)
# P3 is cheap and noisy: in one run on a slow host (TTFT ~145 ms) the per-rep differences
# scattered from -31 to +68 ms and the median of 10 read +10.6 ms. Even, so each side goes first as often.
TTFT_REPS: Final = 20
DECODE_TOKENS: Final = 128
PP_TOKENS: Final = 512
CONVERSATION_TOKENS: Final = 900  # + chat-template tokens ~ 940, under one 1024-token slot
STREAMS: Final = 4
CTX_PER_STREAM: Final = 1024
# P1's matched context: llama-bench tg128 decodes in a context of 128 cells, which llama.cpp pads
# to 256. Without flash attention V is stored transposed, and a 256-cell attention window over a
# longer cache is a strided view: llama.cpp's own decode loop ran 6-10 % slower in a 1024-cell
# context than in a 256-cell one (same process, same weights, interleaved); with flash attention
# the context size made no difference. The count prompt (27-38 tokens) + 128 fit in 256.
P1_CTX: Final = 256
N_BATCH: Final = 512
LLAMA_BENCH_TIMEOUT_S: Final = 120.0
LAG_METRIC: Final = "mongarsd_event_loop_lag_seconds"

WORDS: Final = (
    "river",
    "stone",
    "market",
    "window",
    "garden",
    "letter",
    "morning",
    "silver",
    "engine",
    "harbor",
    "forest",
    "valley",
    "winter",
    "summer",
    "teacher",
    "doctor",
    "village",
    "mountain",
    "question",
    "answer",
    "library",
    "bridge",
    "candle",
    "travel",
    "number",
    "pattern",
    "kitchen",
    "season",
    "planet",
    "signal",
    "machine",
    "thunder",
    "castle",
    "meadow",
    "lantern",
    "painter",
    "harvest",
    "voyage",
    "shadow",
    "crystal",
    "ribbon",
    "orchard",
    "compass",
    "blanket",
    "feather",
    "whistle",
    "mirror",
    "puzzle",
    "journey",
    "story",
    "quietly",
    "slowly",
    "bright",
    "gentle",
    "ancient",
    "modern",
    "careful",
    "simple",
    "heavy",
    "narrow",
    "golden",
    "hidden",
    "open",
    "builds",
    "carries",
    "follows",
    "watches",
    "finds",
    "keeps",
    "writes",
    "reads",
    "opens",
    "remembers",
    "measures",
    "explains",
)


def count_prompt(start: int) -> str:
    """A prompt the model continues for hundreds of tokens at temperature 0 (no ignore_eos needed)."""
    return f"Count from {start} to {start + 900}: {start}, {start + 1}, {start + 2}, {start + 3},"


def filler(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class TokenCounter:
    """Count tokens with the model's own vocabulary (llama-cpp-python, vocab only)."""

    def __init__(self, model_path: Path) -> None:
        self._llama: Any = None
        try:
            from llama_cpp import Llama

            self._llama = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        except (ImportError, OSError, ValueError, RuntimeError):
            self._llama = None  # fall back to an estimate; the daemon's usage tells the truth

    def count(self, text: str) -> int:
        if self._llama is None:
            return int(len(text.split()) * 1.4)
        return len(self._llama.tokenize(text.encode(), add_bos=True, special=False))


def sized_text(counter: TokenCounter, prefix: str, seed: int, tokens: int) -> str:
    """Return prefix + filler words with about `tokens` tokens (bounded search)."""
    lo, hi = 1, tokens * 2
    best = prefix
    for _ in range(24):  # binary search on the word count
        if lo > hi:
            break
        mid = (lo + hi) // 2
        text = prefix + filler(seed, mid)
        n = counter.count(text)
        if n <= tokens:
            best = text
            lo = mid + 1
        else:
            hi = mid - 1
    return best


# --------------------------------------------------------------------------- references


def llama_bench_once(settings: BenchSettings, kind: str, *, defaults: bool = False) -> tuple[float, str]:
    """Run one llama-bench test ("pp" = pp512 or "tg" = tg128), one repetition; return t/s and the command (blocking).

    `defaults`: llama-bench's own batch sizes and flash-attention setting (auto), only the thread
    count given; otherwise the settings the matched daemon runs with.
    """
    exe = native_tool("llama-bench")
    sizes = ["-p", str(PP_TOKENS), "-n", "0"] if kind == "pp" else ["-p", "0", "-n", str(DECODE_TOKENS)]
    matched = [] if defaults else ["-b", str(N_BATCH), "-ub", str(N_BATCH), "-fa", "0"]
    cmd = [str(exe), "-m", str(settings.model_path), "-t", str(settings.threads), *sizes, *matched, "-r", "1", "-o", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LLAMA_BENCH_TIMEOUT_S, cwd=settings.models_dir.parent)
    except subprocess.TimeoutExpired as err:
        raise Skip(f"llama-bench ran past {LLAMA_BENCH_TIMEOUT_S:.0f} s") from err
    if proc.returncode != 0:
        raise Skip(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    parsed = parse_llama_bench(proc.stdout)
    if kind not in parsed:
        raise Skip(f"llama-bench printed no {kind} row")
    return float(parsed[kind]), " ".join(cmd[1:]).replace(str(settings.model_path), settings.model_path.name)


def bench_sample(
    settings: BenchSettings, kind: str, samples: list[float | None], errors: list[str], *, defaults: bool = False
) -> str | None:
    """Append one llama-bench sample to `samples` (None when it cannot run; the first error is kept); return the command."""
    if errors:
        samples.append(None)
        return None
    try:
        rate, cmd = llama_bench_once(settings, kind, defaults=defaults)
    except Skip as err:
        errors.append(str(err))
        samples.append(None)
        return None
    samples.append(rate)
    return cmd


def parse_llama_bench(stdout: str) -> dict[str, Any]:
    """Pick pp and tg average t/s out of llama-bench's JSON output (pure)."""
    start = stdout.find("[")
    rows = json.loads(stdout[start:]) if start >= 0 else []
    out: dict[str, Any] = {}
    for row in rows:
        n_prompt, n_gen = int(row.get("n_prompt", 0)), int(row.get("n_gen", 0))
        key = "pp" if n_gen == 0 and n_prompt > 0 else "tg" if n_prompt == 0 and n_gen > 0 else None
        if key:
            out[key] = float(row["avg_ts"])
            out[key + "_stddev"] = float(row.get("stddev_ts", 0.0))
            out[key + "_samples"] = [round(float(x), 2) for x in row.get("samples_ts", [])]
            out["build"] = row.get("build_commit")
    return out


def start_llama_server(settings: BenchSettings, workdir: Path, *, slots: int = STREAMS, ctx_per_slot: int = CTX_PER_STREAM) -> Proc:
    """Start llama-server with `slots` slots of `ctx_per_slot` cells and the daemon's threads and batch (blocking)."""
    exe = native_tool("llama-server")
    port = free_port()
    t = str(settings.threads)
    cmd = [
        str(exe), "-m", str(settings.model_path), "--host", LOOPBACK, "--port", str(port),
        "-t", t, "-tb", t, "-np", str(slots), "-c", str(slots * ctx_per_slot),
        "-b", str(N_BATCH), "-ub", str(N_BATCH), "-fa", "off", "--no-webui",
    ]  # fmt: skip
    proc = spawn(cmd, log_path=workdir / f"llama-server-{port}.log", port=port)
    proc.extra["command"] = " ".join(cmd[1:]).replace(str(settings.model_path), settings.model_path.name)
    proc.wait_ready("/health")
    return proc


def daemon_overrides(settings: BenchSettings) -> dict[str, str]:
    """Make the daemon match llama-server: threads, 4 slots, ctx, batch, no flash attention."""
    t = str(settings.threads)
    return {
        "MONGARSD_INFERENCE__THREADS": t,
        "MONGARSD_INFERENCE__THREADS_BATCH": t,
        "MONGARSD_INFERENCE__SLOTS": str(STREAMS),
        "MONGARSD_INFERENCE__N_CTX": str(CTX_PER_STREAM),  # per slot, as llama-server -c total -np N
        "MONGARSD_INFERENCE__KV_POOL": "0",  # a stream per slot, as llama-server with -np N
        "MONGARSD_INFERENCE__N_BATCH": str(N_BATCH),
        "MONGARSD_INFERENCE__N_UBATCH": str(N_BATCH),
        "MONGARSD_INFERENCE__FLASH_ATTN": "false",
        "MONGARSD_INFERENCE__KV_CACHE_TYPE": "f16",
        "MONGARSD_INFERENCE__PRELOAD": "true",
        "MONGARSD_INFERENCE__QUEUE_DEPTH": "16",
        "MONGARSD_EMBED__PRELOAD": "false",
        "MONGARSD_SOMMEIL__ENABLED": "false",
    }


# --------------------------------------------------------------------------- requests


class Side:
    """One server under test: the daemon (model id) or llama-server (model ignored)."""

    def __init__(self, name: str, base_url: str, model: str) -> None:
        self.name = name
        self.base = base_url
        self.model = model

    def completion(self, prompt: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        return self.base + "/v1/completions", body

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, dict[str, Any]]:
        body = {
            "model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        return self.base + "/v1/chat/completions", body


async def async_one(side: Side, prompt: str, max_tokens: int) -> StreamResult:
    return await async_stream(*side.completion(prompt, max_tokens))


async def async_many(side: Side, prompts: list[str], max_tokens: int) -> tuple[list[StreamResult], float, float]:
    """Run the prompts as concurrent streams; return results, send time and last-token time."""
    t0 = time.monotonic()
    results = await asyncio.gather(*(async_stream(*side.completion(p, max_tokens)) for p in prompts))
    t_end = max((r.t_last or r.t_send) for r in results)
    return list(results), t0, t_end


async def async_chat(side: Side, messages: list[dict[str, str]], max_tokens: int) -> StreamResult:
    return await async_stream(*side.chat(messages, max_tokens))


def aggregate_rate(results: list[StreamResult], t0: float, t_end: float) -> float:
    """Total completion tokens over wall time from sending to the last token (both sides alike)."""
    tokens = sum(r.completion_tokens for r in results)
    return tokens / (t_end - t0) if t_end > t0 else 0.0


def scrape_lag(daemon: Proc) -> list[tuple[float, float]]:
    status, body = http_get(daemon.url + "/metrics", timeout=10)
    if status != 200:
        raise Skip(f"GET /metrics answered {status}")
    buckets = parse_histogram(body.decode(errors="replace"), LAG_METRIC)
    if not buckets:
        raise Skip(f"/metrics has no {LAG_METRIC} histogram")
    return buckets


# --------------------------------------------------------------------------- the run


@dataclass
class LlmRun:
    """What the measurements of one run share."""

    results: dict[str, Any]
    settings: BenchSettings
    daemon: Proc
    dside: Side
    sside: Side | None
    wanted: tuple[str, ...]
    common: dict[str, Any]
    server_error: str = ""


def _guard(results: dict[str, Any], pids: tuple[str, ...], fn: Callable[[], None], log: Callable[[str], None]) -> None:
    """Run one measurement; a Skip (or any error) marks its ids skipped instead of crashing."""
    try:
        fn()
    except Skip as err:
        for pid in pids:
            results.setdefault(pid, skipped_entry(pid, str(err)))
        log(f"  {'/'.join(pids)} skipped: {err}")
    except Exception as err:  # a bench run reports a broken part and goes on with the rest
        for pid in pids:
            results.setdefault(pid, skipped_entry(pid, f"error: {type(err).__name__}: {err}"))
        log(f"  {'/'.join(pids)} error: {type(err).__name__}: {err}")


def run(results: dict[str, Any], *, settings: BenchSettings, workdir: Path, only: set[str], log: Callable[[str], None] = print) -> None:
    """Measure P1–P5 and P12 (those in `only`) into `results`."""
    wanted = tuple(p for p in ("P1", "P2", "P3", "P4", "P5", "P12", "P13") if p in only)
    if not wanted:
        return
    if not settings.model_path.is_file():
        for pid in wanted:
            results[pid] = skipped_entry(pid, f"model file {settings.model_path} is missing (make install)")
        return

    common: dict[str, Any] = {"model": settings.model_path.name, "threads": settings.threads}

    log("  starting the daemon (4 slots) ...")
    try:
        daemon = start_daemon(workdir, settings, name="llm", overrides=daemon_overrides(settings))
    except Skip as err:
        for pid in wanted:
            results[pid] = skipped_entry(pid, f"daemon did not start: {err}")
        return
    server: Proc | None = None
    server_error = ""
    try:
        status, _ = http_get(daemon.url + "/v1/models", timeout=10)
        if status != 200:
            for pid in wanted:
                results[pid] = skipped_entry(pid, f"the daemon has no OpenAI API yet (GET /v1/models answered {status})")
            return
        dside = Side("mongarsd", daemon.url, settings.model_id)
        if {"P1", "P3", "P4"} & set(wanted):  # P1's vs_llama_server as well
            log("  starting llama-server -np 4 ...")
            try:
                server = start_llama_server(settings, workdir)
            except Skip as err:
                server_error = f"llama-server: {err}"
        sside = Side("llama-server", server.url, "ref") if server else None
        ctx = LlmRun(results, settings, daemon, dside, sside, wanted, common, server_error)
        # Warm both sides (first decode pages the weights in and builds caches).
        _guard(results, wanted, lambda: _warm(dside, sside), log)
        if any(results.get(p, {}).get("skipped") for p in wanted):
            return

        if "P1" in wanted:
            log("  P1 single-stream decode ...")
            _guard(results, ("P1",), lambda: _p1(ctx), log)
        if "P2" in wanted:
            log("  P2 prompt processing ...")
            _guard(results, ("P2",), lambda: _p2(ctx), log)
        if "P3" in wanted:
            log("  P3 time to first token ...")
            _guard(results, ("P3",), lambda: _p3(ctx), log)
        if {"P4", "P12"} & set(wanted):
            log("  P4/P12 4 concurrent streams ...")
            _guard(results, tuple(p for p in ("P4", "P12") if p in wanted), lambda: _p4_p12(ctx), log)
        if "P5" in wanted:
            log("  P5 prefix cache ...")
            _guard(results, ("P5",), lambda: _p5(ctx), log)
        if "P13" in wanted:
            log("  P13 decoding under a JSON-schema grammar ...")
            _guard(results, ("P13",), lambda: _p13(ctx), log)
        if server is not None:
            for pid in ("P3", "P4"):
                if pid in results and "details" in results[pid]:
                    results[pid]["details"]["llama_server_command"] = server.extra.get("command")
            if "four_slots" in results.get("P1", {}):
                results["P1"]["four_slots"]["llama_server_command"] = server.extra.get("command")
    finally:
        if server is not None:
            server.stop()
        daemon.stop()
    if "P1" in wanted and not results.get("P1", {}).get("skipped"):
        log("  P1 single-stream decode, one slot ...")
        _guard(results, ("P1",), lambda: _p1_one_slot(results, settings, workdir), log)
    with_defaults = tuple(p for p in ("P1", "P4") if p in wanted and p in results and not results[p].get("skipped"))
    if with_defaults:
        log(f"  {'/'.join(with_defaults)} with each side's defaults ...")
        _guard(results, with_defaults, lambda: _defaults(results, with_defaults, settings, workdir), log)


def _warm(dside: Side, sside: Side | None) -> None:
    for side in (dside, sside):
        if side is not None:
            asyncio.run(async_one(side, count_prompt(7), 16))


@dataclass
class DecodePairs:
    """P1's samples: per rep one llama-bench tg128 run, then the daemon and llama-server."""

    ours: list[float | None]
    theirs: list[float | None]
    ref: list[float | None]
    tokens: list[int]
    cmd: str | None
    ref_errors: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "api": spread(present(self.ours)),
            "completion_tokens": self.tokens,
            "llama_bench_tg": spread(present(self.ref)),
            "llama_bench_command": self.cmd,
            "llama_server_same_method": spread(present(self.theirs)),
            "ratio_of_medians": ratio_of_medians(self.ours, self.ref),
            **({"reference_skipped": self.ref_errors[0]} if self.ref_errors else {}),
        }


def decode_pairs(settings: BenchSettings, dside: Side, sside: Side | None, *, first_count: int, defaults: bool = False) -> DecodePairs:
    """Run P1_REPS reps of single-stream decoding on both servers, each with one llama-bench run."""
    got = DecodePairs([], [], [], [], None, [])
    for rep in range(P1_REPS):
        got.cmd = bench_sample(settings, "tg", got.ref, got.ref_errors, defaults=defaults) or got.cmd
        prompt = count_prompt(first_count + rep * 100)
        # the server going first alternates: the machine's speed drifts over a run
        for side in (dside, sside) if rep % 2 == 0 else (sside, dside):
            if side is None:
                got.theirs.append(None)
                continue
            r = asyncio.run(async_one(side, prompt, DECODE_TOKENS))
            rate = r.decode_rate()
            if side is dside:
                if rate is None:
                    raise Skip(f"the stream returned {r.completion_tokens} tokens; cannot time decoding")
                got.ours.append(rate)
                got.tokens.append(r.completion_tokens)
            else:
                got.theirs.append(rate)
    return got


def _p1(c: LlmRun) -> None:
    """P1 against the 4-slot daemon and `llama-server -np 4`: kept as details["four_slots"].

    The headline P1 (`_p1_one_slot`) matches llama-bench, which decodes one sequence in a
    context of its own; with four per-slot KV streams llama.cpp's own decode loop runs at
    0.93-0.96 of that layout (measured in-process), a cost both servers here pay alike.
    """
    got = decode_pairs(c.settings, c.dside, c.sside, first_count=11)
    c.results["P1"] = {
        "four_slots": {
            "method": "as P1, against the 4-slot daemon of P2-P5 and `llama-server -np 4` (one KV stream per slot on both); ratios are medians of the per-rep ratios",
            "ratio": round_ratio(paired_ratio(got.ours, got.ref)),
            "vs_llama_server": round_ratio(paired_ratio(got.ours, got.theirs)),
            **got.summary(),
        }
    }


def _p1_one_slot(results: dict[str, Any], settings: BenchSettings, workdir: Path) -> None:
    """P1 with settings matched to llama-bench tg128: one sequence, its context, threads, batch, no flash attention.

    The daemon runs one slot of P1_CTX cells, llama-server `-np 1 -c P1_CTX`, both with the
    batch sizes and flash-attention setting of the matched llama-bench runs.
    """
    four = results.pop("P1", {}).get("four_slots")  # no P1 entry on its own: a failure here marks P1 skipped
    overrides = {**daemon_overrides(settings), "MONGARSD_INFERENCE__SLOTS": "1", "MONGARSD_INFERENCE__N_CTX": str(P1_CTX)}
    daemon = start_daemon(workdir, settings, name="one-slot", overrides=overrides)
    try:
        server = start_llama_server(settings, workdir, slots=1, ctx_per_slot=P1_CTX)
        try:
            dside = Side("mongarsd", daemon.url, settings.model_id)
            sside = Side("llama-server", server.url, "ref")
            _warm(dside, sside)
            got = decode_pairs(settings, dside, sside, first_count=13)
        finally:
            server.stop()
    finally:
        daemon.stop()
    details = {
        "model": settings.model_path.name,
        "threads": settings.threads,
        "context_cells": P1_CTX,
        "method": f"stream /v1/completions, (completion_tokens-1)/(t_last_token - t_first_token), daemon with 1 slot of {P1_CTX} cells and llama-server -np 1 -c {P1_CTX} (matched to llama-bench's one sequence in a context of 128 cells, padded to 256 by llama.cpp); each rep one llama-bench tg128 run, then the daemon and llama-server in alternating order; ratios are medians of the per-rep ratios",
        **got.summary(),
        "llama_server_command": server.extra.get("command"),
        **({"four_slots": four} if four else {}),
    }
    results["P1"] = make_entry(
        "P1",
        value=median(present(got.ours)),
        reference=median(present(got.ref)),
        ratio=paired_ratio(got.ours, got.ref),
        vs_llama_server=paired_ratio(got.ours, got.theirs),
        four_slots_vs_llama_server=four.get("vs_llama_server") if four else None,
        details=details,
    )


def _p2(c: LlmRun) -> None:
    results, dside, settings, common = c.results, c.dside, c.settings, c.common
    counter = TokenCounter(settings.model_path)
    rates: list[float | None] = []
    ref: list[float | None] = []
    server_reported: list[float] = []
    prompt_tokens: list[int] = []
    ttfts: list[float] = []
    ref_errors: list[str] = []
    cmd = None
    for rep in range(P2_REPS):
        prompt = sized_text(counter, f"Report {rep * 37 + 5}. ", seed=1000 + rep, tokens=PP_TOKENS)
        # which side goes first alternates: the one right after the other ran measures slower
        if rep % 2 == 0:
            cmd = bench_sample(settings, "pp", ref, ref_errors) or cmd
        r = asyncio.run(async_one(dside, prompt, 1))
        if rep % 2 == 1:
            cmd = bench_sample(settings, "pp", ref, ref_errors) or cmd
        n, ttft = r.prompt_tokens, r.ttft_s
        if n is None:
            raise Skip("the stream has no usage.prompt_tokens (stream_options.include_usage)")
        if ttft is None or ttft <= 0:
            raise Skip("no token came back")
        rates.append(n / ttft)
        ttfts.append(ttft * 1000)
        prompt_tokens.append(n)
        if r.timings and r.timings.get("prompt_per_second"):
            server_reported.append(float(r.timings["prompt_per_second"]))
    details = {
        **common,
        "method": "stream /v1/completions, max_tokens 1, prompt_tokens / time to first token (nothing subtracted); each rep paired with one llama-bench pp512 run, which goes first in every other rep; ratio: median of the per-rep ratios",
        "api": spread(present(rates)),
        "ttft_ms": spread(ttfts),
        "prompt_tokens": prompt_tokens,
        "server_reported_prompt_per_second": spread(server_reported),
        "llama_bench_pp": spread(present(ref)),
        "ratio_of_medians": ratio_of_medians(rates, ref),
        "llama_bench_command": cmd,
    }
    if ref_errors:
        details["reference_skipped"] = ref_errors[0]
    results["P2"] = make_entry(
        "P2", value=median(present(rates)), reference=median(present(ref)), ratio=paired_ratio(rates, ref), details=details
    )


P3_PROMPT: Final = "Question {n}: In two short sentences, explain why the sky is blue during the day and why sunsets look red."


def _p3(c: LlmRun) -> None:
    results, dside, sside, server_error, common = c.results, c.dside, c.sside, c.server_error, c.common
    ours, theirs, deltas = [], [], []
    sides = [s for s in (dside, sside) if s is not None]
    for rep in range(TTFT_REPS):
        prompt = P3_PROMPT.format(n=rep * 13 + 3)  # new prompt each rep: no prefix-cache hit on either side
        # the two sides back to back, each first every other rep: the VM's drift falls on both
        got: dict[str, float] = {}
        for side in sides if rep % 2 == 0 else sides[::-1]:
            r = asyncio.run(async_one(side, prompt, 4))
            if r.ttft_s is not None:
                got[side.name] = r.ttft_s * 1000
        if dside.name not in got:
            raise Skip("no token came back from the daemon")
        ours.append(got[dside.name])
        if sside is not None and sside.name in got:
            theirs.append(got[sside.name])
            deltas.append(got[dside.name] - got[sside.name])
    value, ref = median(ours), median(theirs)
    details = {
        **common,
        "method": "stream /v1/completions, send to first SSE token; each rep both sides back to back, in alternating order; "
        "delta_ms: median of the per-rep differences",
        "api_ms": spread(ours),
        "llama_server_ms": spread(theirs),
        "delta_ms": spread(deltas),
    }
    if sside is None:
        details["reference_skipped"] = server_error
    results["P3"] = make_entry("P3", value=value, reference=ref, delta_ms=median(deltas) if deltas else None, details=details)


def _defaults(results: dict[str, Any], pids: tuple[str, ...], settings: BenchSettings, workdir: Path) -> None:
    """Add what a user gets to P1 and P4: each side with its own defaults, only the thread count shared.

    The daemon runs with its board profile's settings, llama-server as `llama-server -m MODEL`
    and llama-bench as `llama-bench -m MODEL -t N`. P1: one stream each, interleaved with one
    llama-bench tg128 run per rep. P4: the same 4 streams on both servers, in alternating order.
    """
    daemon = start_daemon(workdir, settings, name="defaults", overrides={"MONGARSD_INFERENCE__PRELOAD": "true"})
    server: Proc | None = None
    try:
        exe = native_tool("llama-server")
        port = free_port()
        cmd = [str(exe), "-m", str(settings.model_path), "--host", LOOPBACK, "--port", str(port), "--no-webui"]
        server = spawn(cmd, log_path=workdir / f"llama-server-defaults-{port}.log", port=port)
        server.wait_ready("/health")
        dside = Side("mongarsd", daemon.url, settings.model_id)
        sside = Side("llama-server", server.url, "ref")
        _warm(dside, sside)
        engine = log_event(daemon, "llm_started")
        common = {
            "mongarsd_engine": {k: engine.get(k) for k in ENGINE_FIELDS} if engine else None,
            "llama_server_command": " ".join(cmd[1:]).replace(str(settings.model_path), settings.model_path.name),
        }
        if "P1" in pids:
            _p1_defaults(results["P1"], settings, dside, sside, common)
        if "P4" in pids:
            _p4_defaults(results["P4"], dside, sside, common)
    finally:
        if server is not None:
            server.stop()
        daemon.stop()


ENGINE_FIELDS: Final = ("n_ctx", "n_ctx_per_slot", "kv_unified", "slots", "threads", "threads_batch", "prefetch_bytes", "f16c_scales")


def _p1_defaults(entry: dict[str, Any], settings: BenchSettings, dside: Side, sside: Side, common: dict[str, Any]) -> None:
    got = decode_pairs(settings, dside, sside, first_count=17, defaults=True)
    entry["defaults_ratio"] = round_ratio(paired_ratio(got.ours, got.ref))
    entry["defaults_vs_llama_server"] = round_ratio(paired_ratio(got.ours, got.theirs))
    entry.setdefault("details", {})["defaults"] = {
        "method": "as P1, against `mongarsd run` with its board profile's defaults, `llama-server -m MODEL` and `llama-bench -m MODEL -t N` (flash attention auto); ratios are medians of the per-rep ratios",
        **got.summary(),
        **common,
    }


def _p4_defaults(entry: dict[str, Any], dside: Side, sside: Side, common: dict[str, Any]) -> None:
    agg: dict[str, list[float]] = {"mongarsd": [], "llama-server": []}
    for rep in range(DEFAULTS_REPS):
        prompts = [count_prompt(300 * (i + 1) + rep * 3000) for i in range(STREAMS)]
        # the side going first alternates: the machine's speed drifts over a run
        for side in (dside, sside) if rep % 2 == 0 else (sside, dside):
            res, t0, t_end = asyncio.run(async_many(side, prompts, DECODE_TOKENS))
            agg[side.name].append(aggregate_rate(res, t0, t_end))
    entry["defaults_ratio"] = round_ratio(paired_ratio(agg["mongarsd"], agg["llama-server"]))
    entry.setdefault("details", {})["defaults"] = {
        "method": "the same 4 streams against `mongarsd run` with only the board profile's defaults and `llama-server -m MODEL` with its own; median of the per-rep ratios",
        "mongarsd_4_streams": spread(agg["mongarsd"]),
        "llama_server_4_streams": spread(agg["llama-server"]),
        "ratio_of_medians": ratio_of_medians(agg["mongarsd"], agg["llama-server"]),
        **common,
    }


JSON_SCHEMA: Final = {
    "type": "object",
    "properties": {"numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 40}},
    "required": ["numbers"],
}


def _p13(c: LlmRun) -> None:
    """Decode rate of the same chat with and without a JSON-schema response format (interleaved)."""
    results, dside, common = c.results, c.dside, c.common

    async def one(schema: bool, n: int) -> StreamResult:
        url, body = dside.chat([{"role": "user", "content": f"List the numbers from {n} to {n + 60} as JSON."}], DECODE_TOKENS)
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": JSON_SCHEMA}}
        return await async_stream(url, body)

    free: list[float] = []
    constrained: list[float] = []
    tokens: list[int] = []
    for rep in range(REPS):
        for schema, into in ((False, free), (True, constrained)):
            r = asyncio.run(one(schema, 10 + rep * 100))
            rate = r.decode_rate()
            if rate is None:
                raise Skip(f"the {'constrained' if schema else 'free'} stream returned {r.completion_tokens} tokens")
            into.append(rate)
            if schema:
                tokens.append(r.completion_tokens)
    details = {
        **common,
        "method": "stream /v1/chat/completions, same prompt, max_tokens 128, with response_format json_schema (an object holding >= 40 integers) vs without; (tokens-1)/(last-first); medians, interleaved",
        "constrained": spread(constrained),
        "unconstrained": spread(free),
        "constrained_completion_tokens": tokens,
        "schema": JSON_SCHEMA,
    }
    results["P13"] = make_entry("P13", value=median(constrained), reference=median(free), details=details)


def _p4_p12(c: LlmRun) -> None:
    results, daemon, dside, sside, server_error, wanted, common = c.results, c.daemon, c.dside, c.sside, c.server_error, c.wanted, c.common
    agg: dict[str, list[float]] = {"mongarsd": [], "llama-server": []}
    single: dict[str, list[float]] = {"mongarsd": [], "llama-server": []}
    lag_4stream: list[tuple[float, float]] = []
    for rep in range(P4_REPS):
        prompts = [count_prompt(100 * (i + 1) + rep * 1000) for i in range(STREAMS)]
        # the side going first alternates: the machine's speed drifts over a run
        for side in (dside, sside) if rep % 2 == 0 else (sside, dside):
            if side is None:
                continue
            before = scrape_lag(daemon) if side is dside and "P12" in wanted else []
            res, t0, t_end = asyncio.run(async_many(side, prompts, DECODE_TOKENS))
            agg[side.name].append(aggregate_rate(res, t0, t_end))
            if before:
                delta = histogram_delta(scrape_lag(daemon), before)
                lag_4stream = delta if not lag_4stream else [(le, c + d) for (le, c), (_, d) in zip(lag_4stream, delta, strict=True)]
            one, t0, t_end = asyncio.run(async_many(side, [prompts[0]], DECODE_TOKENS))
            single[side.name].append(aggregate_rate(one, t0, t_end))
    d4, s4 = median(agg["mongarsd"]), median(agg["llama-server"])
    d1, s1 = median(single["mongarsd"]), median(single["llama-server"])
    if "P4" in wanted:
        details = {
            **common,
            "method": "4 concurrent streams of 128 tokens (counting prompts); sum of completion tokens / (last token - send); the two sides in alternating order each rep; ratio: median of the per-rep ratios",
            "mongarsd_4_streams": spread(agg["mongarsd"]),
            "llama_server_4_streams": spread(agg["llama-server"]),
            "mongarsd_1_stream": spread(single["mongarsd"]),
            "llama_server_1_stream": spread(single["llama-server"]),
            "mongarsd_scaling_4_vs_1": round(d4 / d1, 3) if d4 and d1 else None,
            "llama_server_scaling_4_vs_1": round(s4 / s1, 3) if s4 and s1 else None,
        }
        if sside is None:
            details["reference_skipped"] = server_error
        else:
            details["ratio_of_medians"] = ratio_of_medians(agg["mongarsd"], agg["llama-server"])
        results["P4"] = make_entry("P4", value=d4, reference=s4, ratio=paired_ratio(agg["mongarsd"], agg["llama-server"]), details=details)
    if "P12" in wanted:
        p99 = histogram_quantile(0.99, lag_4stream)
        status, body = http_get(daemon.url + "/api/v1/status", timeout=10)
        status_lag = json.loads(body).get("event_loop_lag") if status == 200 else None
        samples = lag_4stream[-1][1] if lag_4stream else 0
        if not samples:
            raise Skip("no event-loop lag samples were observed while generating")
        details = {
            "method": f"/metrics {LAG_METRIC} bucket deltas over the daemon's 4-stream runs, p99 interpolated like histogram_quantile",
            "samples": samples,
            "buckets_le_s_count": [[le if le != float("inf") else "+Inf", c] for le, c in lag_4stream],
            "status_window_after": status_lag,
        }
        results["P12"] = make_entry("P12", value=None if p99 is None else p99 * 1000, reference=None, details=details)


def conversation(counter: TokenCounter, nonce: int, tokens: int) -> list[dict[str, str]]:
    """A multi-turn chat of about `tokens` tokens that starts with a unique nonce."""
    turns = 4
    per = max(tokens // (2 * turns) - 6, 16)
    msgs = [{"role": "system", "content": "You are a concise assistant."}]
    for t in range(turns):
        msgs.append(
            {
                "role": "user",
                "content": sized_text(counter, f"Conversation {nonce}, part {t}: summarize these notes. ", seed=nonce * 10 + t, tokens=per),
            }
        )
        msgs.append({"role": "assistant", "content": sized_text(counter, "Summary: ", seed=nonce * 10 + t + 5, tokens=per)})
    msgs.append({"role": "user", "content": "Which of these notes matters most, in one sentence?"})
    return msgs


def _p5(c: LlmRun) -> None:
    results, dside, settings, common = c.results, c.dside, c.settings, c.common
    counter = TokenCounter(settings.model_path)
    cold, warm, prompt_tokens, cached = [], [], [], []
    for rep in range(REPS):
        msgs = conversation(counter, nonce=rep * 7 + 101, tokens=CONVERSATION_TOKENS)
        first = asyncio.run(async_chat(dside, msgs, 16))
        if first.ttft_s is None:
            raise Skip("no token came back from /v1/chat/completions")
        cold.append(first.ttft_s * 1000)
        prompt_tokens.append(first.prompt_tokens)
        follow = [*msgs, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Why?"}]
        second = asyncio.run(async_chat(dside, follow, 16))
        if second.ttft_s is None:
            raise Skip("no token came back from the follow-up turn")
        warm.append(second.ttft_s * 1000)
        details_usage = (second.usage or {}).get("prompt_tokens_details") or {}
        cached.append(details_usage.get("cached_tokens"))
    details = {
        **common,
        "method": "stream /v1/chat/completions; cold = first request of a new ~1k-token conversation, follow-up = same conversation + reply + one user turn; TTFT medians",
        "cold_ms": spread(cold),
        "follow_up_ms": spread(warm),
        "cold_prompt_tokens": prompt_tokens,
        "follow_up_cached_tokens": cached,
    }
    results["P5"] = make_entry("P5", value=median(warm), reference=median(cold), details=details)
