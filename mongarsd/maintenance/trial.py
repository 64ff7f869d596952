"""One sandboxed Evolution trial: load a model with given settings, run a fixed workload, report.

Run as ``python -m mongarsd.maintenance.trial --kind llm --model FILE --settings JSON``. The
parent (evolution.py) starts it under resource limits and a timeout; whatever happens here (a
bad setting, an out-of-memory kill, a crash inside llama.cpp) ends this process only.

The workload is fixed so that runs compare: a fixed prompt, then exactly `--tokens` tokens
decoded greedily, whatever the model would rather stop at, after one unmeasured warm-up.
The output is one JSON line on stdout:

    {"ok": true, "kind": "llm", "tokens_per_s": [...], "prompt_tokens_per_s": [...],
     "prompt_tokens": 40, "tokens": 32, "peak_rss_mb": 123.4, "load_s": 0.4, "llama_cpp": "0.3.x"}

`tokens_per_s` is the decode rate of each measured run, `prompt_tokens_per_s` its prompt rate.

or ``{"ok": false, "error": "..."}`` with exit status 2 when the settings cannot run. For the
embedder (``--kind embed``) the rate is input tokens embedded per second by ONNX Runtime with
the given intra-op threads and graph optimisation level.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

EXIT_BAD_SETTINGS: Final = 2
DEFAULT_TOKENS: Final = 32
DEFAULT_REPEATS: Final = 1
MAX_TOKENS: Final = 1024
MAX_REPEATS: Final = 50
# A fixed prompt of a few dozen tokens: long enough to exercise prompt batching, short enough
# that a trial on a small board takes seconds.
PROMPT: Final = (
    "The lighthouse keeper wrote in his log every evening: the wind, the colour of the sea, "
    "the ships that passed and the birds that rested on the rail. One winter night he wrote"
)
EMBED_TEXTS: Final = (
    "A small board keeps its memories in a SQLite file.",
    "Which settings make the model answer faster on two cores?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Embeddings turn sentences into vectors that can be compared by cosine similarity.",
) * 4
LLM_KEYS: Final = frozenset(
    {"threads", "threads_batch", "n_ctx", "n_batch", "n_ubatch", "slots", "kv_pool", "kv_cache_type", "flash_attn", "use_mmap", "use_mlock"}
)
EMBED_KEYS: Final = frozenset({"embed_threads", "embed_graph_opt"})
GRAPH_OPT_LEVELS: Final = ("disable", "basic", "extended", "all")


class TrialError(Exception):
    """The settings cannot run (reported as a failed trial, not a crash)."""


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _int(settings: Mapping[str, Any], key: str, default: int) -> int:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrialError(f"setting {key} must be an integer, not {value!r}")
    return value


def _bool(settings: Mapping[str, Any], key: str, default: bool) -> bool:
    value = settings.get(key, default)
    if not isinstance(value, bool):
        raise TrialError(f"setting {key} must be true or false, not {value!r}")
    return value


def engine_settings(settings: Mapping[str, Any]) -> Any:
    """Build EngineSettings from a trial's settings (TrialError when one is invalid)."""
    from mongarsd.errors import ValidationError
    from mongarsd.inference.settings import EngineSettings

    unknown = set(settings) - LLM_KEYS
    if unknown:
        raise TrialError("unknown llm settings: " + ", ".join(sorted(unknown)))
    kv = settings.get("kv_cache_type", "f16")
    if not isinstance(kv, str):
        raise TrialError(f"setting kv_cache_type must be a string, not {kv!r}")
    values = {
        "threads": _int(settings, "threads", 0),
        "threads_batch": _int(settings, "threads_batch", 0),
        "n_ctx": _int(settings, "n_ctx", 512),
        "n_batch": _int(settings, "n_batch", 512),
        "n_ubatch": _int(settings, "n_ubatch", 512),
        "slots": _int(settings, "slots", 1),
        "kv_pool": _int(settings, "kv_pool", 0),
    }
    for key, value in values.items():
        if value < (0 if key.startswith("threads") or key == "kv_pool" else 1):
            raise TrialError(f"setting {key} is out of range: {value}")
    try:
        return EngineSettings(
            **values,
            kv_cache_type=kv,
            flash_attn=_bool(settings, "flash_attn", False),
            use_mmap=_bool(settings, "use_mmap", False),
            use_mlock=_bool(settings, "use_mlock", False),
            warmup=False,
        )
    except ValidationError as err:
        raise TrialError(str(err)) from err


def _decode(llama: Any, tokens: Sequence[int], start_pos: int) -> None:
    from mongarsd.errors import InferenceError

    try:
        llama.decode_sequence(tokens, start_pos)
    except InferenceError as err:
        raise TrialError(str(err)) from err


def run_llm(model: Path, settings: Mapping[str, Any], *, tokens: int, repeats: int) -> dict[str, Any]:
    """Load the model with `settings` and time `repeats` greedy generations of `tokens` tokens (blocking)."""
    from mongarsd.errors import MongarsError
    from mongarsd.inference.context import LlamaContext
    from mongarsd.inference.sampling import GenerationParams

    es = engine_settings(settings)
    llama = LlamaContext(model_path=model, model_id=model.stem, settings=es)
    t0 = time.perf_counter()
    try:
        llama.load()
    except MongarsError as err:
        raise TrialError(str(err)) from err
    load_s = time.perf_counter() - t0
    try:
        prompt = llama.tokenize(PROMPT, True, False)
        if len(prompt) + tokens + 1 > llama.n_ctx_slot:
            raise TrialError(f"the trial needs {len(prompt) + tokens + 1} tokens of context, the settings give {llama.n_ctx_slot}")
        sampler = llama.make_sampler(GenerationParams(temperature=0.0, max_tokens=tokens), None)
        rates: list[float] = []
        prompt_rates: list[float] = []
        try:
            for run in range(repeats + 1):  # run 0 is the warm-up
                llama.lib.llama_memory_clear(llama.mem, True)
                t_prompt = time.perf_counter()
                _decode(llama, prompt, 0)
                tok = llama.sample(sampler, -1)
                t_gen = time.perf_counter()
                for i in range(tokens):
                    _decode(llama, [tok], len(prompt) + i)
                    tok = llama.sample(sampler, -1)
                t_end = time.perf_counter()
                if run > 0:
                    prompt_rates.append(len(prompt) / max(t_gen - t_prompt, 1e-9))
                    rates.append(tokens / max(t_end - t_gen, 1e-9))
        finally:
            llama.free_sampler(sampler)
    finally:
        llama.free()
    import llama_cpp

    return {
        "ok": True,
        "kind": "llm",
        "tokens_per_s": [round(r, 3) for r in rates],
        "prompt_tokens_per_s": [round(r, 3) for r in prompt_rates],
        "prompt_tokens": len(prompt),
        "tokens": tokens,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_s": round(load_s, 3),
        "llama_cpp": str(getattr(llama_cpp, "__version__", "")),
    }


def run_embed(model_dir: Path, settings: Mapping[str, Any], *, repeats: int, variant: str = "int8") -> dict[str, Any]:
    """Time `repeats` embeddings of a fixed batch with the given ORT threads and optimisation level (blocking)."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from mongarsd.inference.embed import DISABLED_OPTIMIZERS, VARIANT_FILES

    unknown = set(settings) - EMBED_KEYS
    if unknown:
        raise TrialError("unknown embed settings: " + ", ".join(sorted(unknown)))
    threads = _int(settings, "embed_threads", 1)
    level = settings.get("embed_graph_opt", "all")
    if threads < 0 or level not in GRAPH_OPT_LEVELS:
        raise TrialError(f"bad embed settings: threads={threads!r} graph_opt={level!r}")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = levels[level]
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    t0 = time.perf_counter()
    try:
        session = ort.InferenceSession(
            str(model_dir / VARIANT_FILES[variant]),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),  # what the daemon's Embedder runs
        )
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as err:  # onnxruntime and tokenizers raise plain Exception subclasses
        raise TrialError(f"cannot load the embedding model: {err}") from err
    load_s = time.perf_counter() - t0
    tok.no_padding()
    encodings = [tok.encode(t) for t in EMBED_TEXTS]
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    n_tokens = int(mask.sum())
    rates: list[float] = []
    for run in range(repeats + 1):
        t = time.perf_counter()
        session.run(None, feed)
        if run > 0:
            rates.append(n_tokens / max(time.perf_counter() - t, 1e-9))
    return {
        "ok": True,
        "kind": "embed",
        "tokens_per_s": [round(r, 3) for r in rates],
        "prompt_tokens_per_s": [],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_s": round(load_s, 3),
        "llama_cpp": "",
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mongarsd.maintenance.trial", description="Run one Evolution trial and print one JSON line.")
    p.add_argument("--kind", choices=("llm", "embed"), default="llm")
    p.add_argument("--model", required=True, type=Path, help="GGUF file (llm) or model folder (embed)")
    p.add_argument("--settings", required=True, help="JSON object of settings")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trial the arguments describe; print one JSON line; return the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import structlog

    # stdout carries the one result line: llama.cpp's warnings (routed to structlog) go to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        settings = json.loads(args.settings)
        if not isinstance(settings, dict):
            raise TrialError("--settings must be a JSON object")
        if not 1 <= args.tokens <= MAX_TOKENS or not 1 <= args.repeats <= MAX_REPEATS:
            raise TrialError(f"--tokens must be in 1..{MAX_TOKENS} and --repeats in 1..{MAX_REPEATS}")
        if args.kind == "llm":
            result = run_llm(args.model, settings, tokens=args.tokens, repeats=args.repeats)
        else:
            result = run_embed(args.model, settings, repeats=args.repeats)
    except (TrialError, ValueError, OSError) as err:  # ValueError: bad JSON; OSError: unreadable model
        print(json.dumps({"ok": False, "error": str(err)[:500]}), flush=True)
        return EXIT_BAD_SETTINGS
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
