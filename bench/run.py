"""Run the performance targets of DESIGN §9 one after another and write the results.

    python -m bench.run [--models-dir models] [--only P1,P6] [--out bench/results/latest.json]

Writes the JSON (each target id -> value, reference, ratio, target, unit, machine, met,
checks, details), a dated copy next to it, a PNG chart, and prints a table. Measurements
never overlap: on a two-core board two benchmarks at once would measure each other.
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import inspect
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import embed, llm, startup
from bench.common import REPO, TARGET_IDS, describe_machine, dump_json, finalize, format_table, resolve_settings, skipped_entry
from mongarsd.inference.settings import F16C_SCALES_ENV, PREFETCH_ENV

DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
TEAM_MODULES = {"recall": ("P7",), "mesh": ("P10", "P11"), "dist": ("P15", "P16"), "mind": ("P17",), "sommeil": ("P14",)}
LLM_IDS = {"P1", "P2", "P3", "P4", "P5", "P12", "P13"}
NOT_YET: dict[str, str] = {}


@contextmanager
def load_noted(results: dict[str, Any], pids: tuple[str, ...], log: Any = print) -> Iterator[None]:
    """Record the 1-minute load average before and after a group in its entries' details.

    Other work on a small board skews every number; this says how busy the machine was, and
    warns when another process uses the CPU as the group starts.
    """
    before = os.getloadavg()[0]
    busy = busy_processes()
    log(f"  load average {before:.2f}" + (" - warning, busy: " + "; ".join(busy) if busy else ""))
    yield
    after = os.getloadavg()[0]
    for pid in pids:
        entry = results.get(pid)
        if isinstance(entry, dict):
            details = entry.setdefault("details", {})
            if isinstance(details, dict):
                details["loadavg_1m_before_after"] = [round(before, 2), round(after, 2)]
                if busy:
                    details["busy_at_start"] = busy


def parse_only(text: str | None) -> set[str]:
    """Turn 'P1,p6' into {'P1', 'P6'}; None means every target (pure)."""
    if not text:
        return set(TARGET_IDS)
    wanted = {part.strip().upper() for part in text.split(",") if part.strip()}
    unknown = wanted - set(TARGET_IDS)
    if unknown:
        raise SystemExit(f"unknown target id(s): {', '.join(sorted(unknown))}; known: {', '.join(TARGET_IDS)}")
    return wanted


def run_team_module(name: str, pids: tuple[str, ...], results: dict[str, Any], only: set[str], log: Any) -> None:
    """Call bench.<name>.run(results) when that module exists; else mark its ids skipped."""
    wanted = [p for p in pids if p in only]
    if not wanted:
        return
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"bench.{name}":
            raise
        for pid in wanted:
            results[pid] = skipped_entry(pid, f"bench/{name}.py does not exist yet")
        return
    sub: dict[str, Any] = {}
    params = inspect.signature(module.run).parameters
    kwargs: dict[str, Any] = {}
    if "only" in params:
        kwargs["only"] = set(wanted)
    if "log" in params:
        kwargs["log"] = log
    try:
        module.run(sub, **kwargs)
    except Exception as err:  # a teammate's broken module must not lose the other results
        for pid in wanted:
            results[pid] = skipped_entry(pid, f"error in bench/{name}.py: {type(err).__name__}: {err}")
        log(f"  bench/{name}.py failed: {type(err).__name__}: {err}")
        return
    for pid in wanted:
        results[pid] = sub.get(pid) or skipped_entry(pid, f"bench/{name}.py did not report {pid}")


def busy_processes(threshold_pct: float = 30.0, sample_s: float = 1.0) -> list[str]:
    """Name the other processes using more than threshold_pct of a core right now (blocking, ~1 s)."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.info["pid"] != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            continue  # gone or not ours to read
    time.sleep(sample_s)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= threshold_pct:
            busy.append(f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])[:60]} ({pct:.0f}%)")
    return busy


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def compile_bytecode() -> bool:
    """Write mongarsd's bytecode caches, as an installed package has them (compileall skips fresh ones).

    Every start of a daemon the bench times would otherwise compile the package's sources
    anew where the environment sets PYTHONDONTWRITEBYTECODE (0.5 s of P9 on a 2-core host):
    the .deb and the single executable ship bytecode, and `make run` and `make test` write it.
    """
    return bool(compileall.compile_dir(str(REPO / "mongarsd"), quiet=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--only", help="comma-separated target ids, e.g. P1,P6 (others keep their previous results in --out)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' state dirs and logs")
    args = parser.parse_args(argv)
    # `timeout`/CI stop us with SIGTERM: unwind (finally blocks stop the daemons and servers we started).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    only = parse_only(args.only)
    # llama.cpp's own tools run as released: mongarsd's decode prefetch (native/patches, 0002) and
    # F16C block scales (0003) are built into them but only the daemon turns them on
    os.environ.pop(PREFETCH_ENV, None)
    os.environ.pop(F16C_SCALES_ENV, None)

    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    models_dir = args.models_dir.resolve()
    settings = resolve_settings(models_dir)
    machine = describe_machine()
    started = time.monotonic()
    now = datetime.now(UTC)
    log(f"bench: {machine}; profile {settings.profile}; llama threads {settings.threads}; embed threads {settings.embed_threads}")
    if not compile_bytecode():
        log("warning: mongarsd's bytecode caches could not all be written: its daemons compile sources at start")
    busy = busy_processes()
    if busy:
        log("warning: other processes are using the CPU; llama.cpp with all cores busy slows down many times over: " + "; ".join(busy))
    results: dict[str, Any] = {}
    workdir = Path(tempfile.mkdtemp(prefix="mongarsd-bench-"))
    try:
        if "P6" in only:
            log("P6 embeddings ...")
            with load_noted(results, ("P6",), log=log):
                embed.run(results, settings=settings, log=log)
        if {"P8", "P9"} & only:
            log("P8/P9 startup ...")
            with load_noted(results, ("P8", "P9"), log=log):
                startup.run(results, settings=settings, workdir=workdir, only=only, log=log)
        if LLM_IDS & only:
            log("P1-P5, P12, P13 inference ...")
            with load_noted(results, tuple(LLM_IDS), log=log):
                llm.run(results, settings=settings, workdir=workdir, only=only, log=log)
        for name, pids in TEAM_MODULES.items():
            if set(pids) & only:
                log(f"{'/'.join(pids)} {name} ...")
                with load_noted(results, pids, log=log):
                    run_team_module(name, pids, results, only, log)
        for pid, reason in NOT_YET.items():
            if pid in only:
                results[pid] = skipped_entry(pid, reason)
    finally:
        if args.keep_logs:
            log(f"logs and state dirs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    previous: dict[str, Any] = {}
    if only != set(TARGET_IDS) and args.out.is_file():
        try:
            previous = json.loads(args.out.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
    merged = {pid: (results.get(pid) if pid in only else previous.get(pid)) for pid in TARGET_IDS}
    for pid in TARGET_IDS:
        if merged[pid] is None:
            merged[pid] = skipped_entry(pid, "not run (--only) and no earlier result in " + str(args.out.name))
    final = finalize({k: v for k, v in merged.items() if v is not None}, machine=machine, measured_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    for pid in TARGET_IDS:  # keep the measured_at/machine of results carried over from an earlier run
        if pid not in only and previous.get(pid):
            final[pid]["machine"] = previous[pid].get("machine", machine)
            final[pid]["measured_at"] = previous[pid].get("measured_at")
    dump_json(final, args.out)
    dated = args.out.parent / (now.strftime("%Y-%m-%dT%H%M%SZ") + ".json")
    dump_json(final, dated)
    if not args.no_chart:
        try:
            from bench.chart import draw

            draw(final, args.out.with_suffix(".png"), f"mongarsd bench — {machine} — {now:%Y-%m-%d %H:%M} UTC")
        except ImportError as err:
            log(f"no chart: {err}")
    print()
    print(format_table(final))
    print(f"\nwrote {args.out} and {dated.name} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
