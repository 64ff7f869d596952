"""P8 idle RSS (no models / default models) and P9 cold start to READY.

Each start is a fresh `mongarsd run` with the board profile's defaults (an empty config
file, a new state dir) on a free loopback port. "Cold" means a new process; the model files
may be in the page cache (dropping caches would disturb everything else on the machine).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from bench.common import (
    BenchSettings,
    Skip,
    http_get,
    http_post_json,
    make_entry,
    median,
    settled_rss_mb,
    skipped_entry,
    spread,
    start_daemon,
)
from bench.llm import filler

STARTS_WITH_MODELS: Final = 3
STARTS_WITHOUT_MODELS: Final = 2
IN_USE_CHATS: Final = 4  # concurrent chats, one per slot of the generic profile
IN_USE_WORDS: Final = 520  # ~550 prompt tokens with the chat template
IN_USE_IDLE_S: Final = 12.0  # past the embedder's 10 s idle trim: what stays held, not a burst's buffers


def rss_split_mb(pid: int) -> dict[str, float]:
    """Return a process's resident anonymous and file-backed memory in MB (Linux /proc; empty elsewhere).

    File-backed pages (mmap'd GGUF, shared libraries) are clean and the kernel can drop them
    under pressure; anonymous ones (KV cache, ONNX Runtime tensors, Python heap) it cannot.
    """
    out: dict[str, float] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key.removeprefix("Rss").lower()] = round(int(value.split()[0]) / 1024, 1)
    return out


def in_use_rss_mb(url: str, pid: int, model: str) -> tuple[float, list[int]]:
    """Run IN_USE_CHATS chats at once (as users would, memory on), idle, then return the RSS and the status codes."""

    def chat(i: int) -> int:
        text = filler(i, IN_USE_WORDS)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Summarise note {i}: {text}"}],
            "max_tokens": 64,
            "user": f"bench{i}",
        }
        try:
            status, _ = http_post_json(url + "/v1/chat/completions", body, timeout=300)
        except OSError:  # refused, reset or timed out: the status list shows it
            return 0
        return status

    with ThreadPoolExecutor(max_workers=IN_USE_CHATS) as pool:
        codes = list(pool.map(chat, range(IN_USE_CHATS)))
    time.sleep(IN_USE_IDLE_S)
    return settled_rss_mb(pid), codes


def _models_loaded(url: str) -> Any:
    """What the daemon says is loaded (Ollama /api/ps), or None when it cannot say."""
    try:
        status, body = http_get(url + "/api/ps", timeout=5)
    except OSError:
        return None
    if status != 200:
        return None
    try:
        return [m.get("name") or m.get("model") for m in json.loads(body).get("models", [])]
    except (ValueError, AttributeError):
        return None


def run(results: dict[str, Any], *, settings: BenchSettings, workdir: Path, only: set[str], log: Callable[[str], None] = print) -> None:
    """Measure P8 and P9 (those in `only`) into results."""
    if not ({"P8", "P9"} & only):
        return
    ready_s: list[float] = []
    loaded_rss: list[float] = []
    loaded_split: list[dict[str, float]] = []
    bare_rss: list[float] = []
    bare_split: list[dict[str, float]] = []
    loaded_models: Any = None
    services: Any = None
    in_use: tuple[float, list[int]] | None = None
    try:
        for i in range(STARTS_WITH_MODELS):
            d = start_daemon(workdir, settings, name=f"start{i}", models=True)
            try:
                assert d.ready_s is not None
                ready_s.append(d.ready_s)
                loaded_rss.append(settled_rss_mb(d.pid))
                loaded_split.append(rss_split_mb(d.pid))
                loaded_models = _models_loaded(d.url)
                status, body = http_get(d.url + "/ready", timeout=5)
                services = json.loads(body).get("services") if status == 200 else None
                if i == 0 and "P8" in only:
                    in_use = in_use_rss_mb(d.url, d.pid, settings.model_id)
            finally:
                d.stop()
        if "P8" in only:
            for i in range(STARTS_WITHOUT_MODELS):
                d = start_daemon(workdir, settings, name=f"bare{i}", models=False)
                try:
                    bare_rss.append(settled_rss_mb(d.pid))
                    bare_split.append(rss_split_mb(d.pid))
                finally:
                    d.stop()
    except Skip as err:
        for pid in ("P8", "P9"):
            if pid in only:
                results[pid] = skipped_entry(pid, f"daemon did not start: {err}")
        return

    loaded = bool(loaded_models) or any(k in str(services).lower() for k in ("llm", "inference"))
    note = (
        None
        if loaded
        else "the daemon reports no loaded LLM (no /api/ps entry, no inference service in /ready): default models are not loaded at READY yet"
    )
    if "P9" in only:
        details = {
            "method": "spawn `mongarsd run` (board defaults, preload on) -> first GET /ready 200, polled every 20 ms; median",
            "ready_s": spread(ready_s),
            "services": services,
            "loaded_models": loaded_models,
        }
        if note:
            details["note"] = note
        if loaded:
            results["P9"] = make_entry("P9", value=median(ready_s), reference=None, details=details)
        else:
            results["P9"] = skipped_entry("P9", note or "") | {"details": details}
    if "P8" in only:
        details = {
            "method": "VmRSS of the daemon process once /ready and RSS stopped growing; MONGARSD_INFERENCE__PRELOAD/EMBED__PRELOAD=false vs board defaults",
            "no_models_mb": spread(bare_rss),
            "default_models_mb": spread(loaded_rss),
            "no_models_anon_file_mb": bare_split,
            "default_models_anon_file_mb": loaded_split,
            "loaded_models": loaded_models,
        }
        if in_use is not None:
            details["in_use"] = {
                "method": f"the first start with models, after {IN_USE_CHATS} concurrent /v1/chat/completions of ~550 prompt tokens and 64 answer tokens (memory on), then {IN_USE_IDLE_S:.0f} s idle; reported, not checked",
                "rss_mb": round(in_use[0], 1),
                "status_codes": in_use[1],
            }
        if note:
            details["note"] = note
        results["P8"] = make_entry(
            "P8", value=median(bare_rss), reference=None, loaded_rss_mb=median(loaded_rss) if loaded else None, details=details
        )
    log(f"  P8/P9 ready {median(ready_s)} s, rss {median(bare_rss)} / {median(loaded_rss)} MB")
