"""P15 and P16: what a user of the distributed build gets, against the developer's venv.

P15: single-stream decode of the daemon loading the portable llama.cpp library that
     `inference.cpu_variant = auto` picks (native/libs/<arch>, what the executable and the
     .deb carry) vs the same daemon loading llama-cpp-python's native (-march=native) build.
P16: the single executable's second start to READY (the first one unpacked it) vs the venv's
     `python -m mongarsd run`, both with the board defaults and the default models.

Both sides alternate, rep by rep; medians. Build what they need with `make native-libs`
and `make dist` (the bench does not build).
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench.common import (
    REPO,
    Proc,
    Skip,
    daemon_env,
    free_port,
    make_entry,
    median,
    resolve_settings,
    skipped_entry,
    spawn,
    spread,
    start_daemon,
)
from bench.llm import DECODE_TOKENS, Side, async_one, count_prompt

# One daemon start per sample, the sides 7 s apart, scattered 0.93-1.04 over runs on one build
# pair: streams on this VM vary ±15 %, and only streams measured back to back cancel that drift.
P15_STARTS: Final = 3
P15_PAIRS: Final = 8
STARTS: Final = 6  # P16: starts per side; 3 read 1.03 and 1.21 for the same build on a noisy VM


def arch() -> str:
    m = platform.machine().lower()
    return "arm64" if m in ("aarch64", "arm64") else "x86_64"


def executable() -> Path:
    import mongarsd

    return REPO / "dist" / f"mongarsd-{mongarsd.__version__}-linux-{arch()}"


def _decode(d: Proc, model: str, rep: int) -> float:
    r = asyncio.run(async_one(Side("mongarsd", d.url, model), count_prompt(17 + rep * 100), DECODE_TOKENS))
    rate = r.decode_rate()
    if rate is None:
        raise Skip(f"the stream returned {r.completion_tokens} tokens; cannot time decoding")
    return rate


def _variant_of(d: Proc) -> str:
    for line in d.log_tail(200_000).splitlines():
        if "llama_library" in line:
            # the library's path relative to the checkout: results are committed, this machine's paths are not
            return line.strip().replace(str(REPO) + "/", "")[-300:]
    return "?"


def p15(results: dict[str, Any], workdir: Path, log: Callable[[str], None]) -> None:
    settings = resolve_settings(REPO / "models")
    libs = REPO / "native" / "libs" / arch()
    if not (libs.is_dir() and any(libs.glob("*/libllama.so"))):
        results["P15"] = skipped_entry("P15", f"no portable libraries in {libs.relative_to(REPO)} (make native-libs)")
        return
    native: list[float] = []
    portable: list[float] = []
    ratios: list[float] = []
    loaded: dict[str, str] = {}
    sides = {"native": {"MONGARSD_INFERENCE__CPU_VARIANT": "native"}, "portable": {"MONGARSD_NATIVE_LIBS": str(libs)}}
    for rep in range(P15_STARTS):
        daemons: dict[str, Proc] = {}
        try:
            for side, overrides in sides.items():
                daemons[side] = d = start_daemon(workdir, settings, name=f"p15-{side}-{rep}", overrides=overrides)
                loaded[side] = _variant_of(d)
                _decode(d, settings.model_id, rep + 50)  # warm: page the weights in
            for k in range(P15_PAIRS):
                # back to back, each side first every other pair: the VM's drift falls on both
                order = ("native", "portable") if k % 2 == 0 else ("portable", "native")
                rate = {side: _decode(daemons[side], settings.model_id, rep * P15_PAIRS + k) for side in order}
                native.append(rate["native"])
                portable.append(rate["portable"])
                ratios.append(rate["portable"] / rate["native"])
                log(f"    start {rep + 1} pair {k + 1}: native {rate['native']:.1f}, portable {rate['portable']:.1f} tokens/s")
        finally:
            for d in daemons.values():
                d.stop()
    details = {
        "method": f"stream /v1/completions, {DECODE_TOKENS} tokens, (completion_tokens-1)/(last-first token); daemon with profile defaults; "
        "portable = MONGARSD_NATIVE_LIBS=native/libs/<arch> with cpu_variant auto, native = llama-cpp-python's -march=native build; "
        f"{P15_STARTS} starts of both daemons side by side, each warmed by one stream, then {P15_PAIRS} pairs of streams back to back "
        "in alternating order; ratio: median of the per-pair ratios",
        "portable_tokens_s": spread(portable),
        "native_tokens_s": spread(native),
        "ratios": spread(ratios),
        "loaded": loaded,
        "model": settings.model_path.name,
        "threads": settings.threads,
    }
    results["P15"] = make_entry("P15", value=median(portable), reference=median(native), ratio=median(ratios), details=details)


def _start_exe(exe: Path, workdir: Path, settings: Any, name: str, bundle_dir: Path) -> Proc:
    port = free_port()
    env = daemon_env(workdir, settings, {"MONGARSD_BUNDLE_DIR": str(bundle_dir)})
    cmd = [
        str(exe),
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--state-dir",
        str(workdir / f"state-{name}"),
        "--models-dir",
        str(settings.models_dir),
    ]
    d = spawn(cmd, log_path=workdir / f"{name}.log", env=env, port=port)
    d.wait_ready("/ready")
    return d


def p16(results: dict[str, Any], workdir: Path, log: Callable[[str], None]) -> None:
    settings = resolve_settings(REPO / "models")
    exe = executable()
    if not exe.is_file():
        results["P16"] = skipped_entry("P16", f"{exe.relative_to(REPO)} is not built (make dist)")
        return
    bundle_dir = Path(tempfile.mkdtemp(prefix="mongarsd-bundle-", dir=workdir))
    first = _start_exe(exe, workdir, settings, "p16-first", bundle_dir)  # unpacks once
    first_s = first.ready_s
    first.stop()
    exe_s: list[float] = []
    venv_s: list[float] = []
    for rep in range(STARTS):
        if rep % 2:  # the sides alternate going first
            v = start_daemon(workdir, settings, name=f"p16-venv-{rep}")
            v.stop()
        d = _start_exe(exe, workdir, settings, f"p16-exe-{rep}", bundle_dir)
        d.stop()
        if not rep % 2:
            v = start_daemon(workdir, settings, name=f"p16-venv-{rep}")
            v.stop()
        assert d.ready_s is not None and v.ready_s is not None
        exe_s.append(d.ready_s)
        venv_s.append(v.ready_s)
        log(f"    rep {rep + 1}: executable {d.ready_s:.2f} s, venv {v.ready_s:.2f} s")
    details = {
        "method": "spawn -> first GET /ready 200 (polled every 20 ms), board defaults with the default models; the executable's "
        "first start (which unpacks it) is excluded and reported apart; sides alternate; medians",
        "executable_s": spread(exe_s),
        "venv_s": spread(venv_s),
        "first_start_with_unpacking_s": first_s,
        "executable": exe.name,
        "executable_mb": round(exe.stat().st_size / 1e6, 1),
        "python": sys.version.split()[0],
    }
    results["P16"] = make_entry("P16", value=median(exe_s), reference=median(venv_s), details=details)


def run(results: dict[str, Any], *, only: set[str], log: Callable[[str], None] = print) -> None:
    with tempfile.TemporaryDirectory(prefix="mongarsd-bench-dist-") as tmp:
        workdir = Path(tmp)
        for pid, fn in (("P15", p15), ("P16", p16)):
            if pid not in only:
                continue
            log(f"  {pid} ...")
            try:
                fn(results, workdir, log)
            except Skip as err:
                results[pid] = skipped_entry(pid, str(err))


if __name__ == "__main__":  # python -m bench.dist: print both rows
    out: dict[str, Any] = {}
    run(out, only={"P15", "P16"})
    for key, value in out.items():
        print(key, {k: v for k, v in value.items() if k != "details"}, value.get("details"))
    os._exit(0)
