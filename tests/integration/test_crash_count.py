"""A native crash is never silent: a Python stack in the journal, and a counter at the next start."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.conftest import start_daemon


def test_segfault_dumps_a_stack_and_the_next_start_counts_it(tmp_path: Path) -> None:
    first = start_daemon(tmp_path)
    os.kill(first.proc.pid, signal.SIGSEGV)  # what a crash in llama.cpp or onnxruntime looks like
    assert first.proc.wait(timeout=30) == -signal.SIGSEGV
    crash_log = first.log()
    assert "Fatal Python error: Segmentation fault" in crash_log
    assert "most recent call first" in crash_log and 'File "' in crash_log  # faulthandler's stack
    assert (first.state_dir / "running").exists()

    second = start_daemon(tmp_path, state_dir=first.state_dir)  # a new port, so a log of its own
    try:
        events = [json.loads(line) for line in second.log().splitlines() if line.startswith("{")]
        crashed = [e for e in events if e["event"] == "previous_run_crashed"]
        assert len(crashed) == 1 and crashed[0]["level"] == "warning" and crashed[0]["unclean_exits"] == 1
        assert "mongarsd_unclean_exits_total 1.0" in second.get("/metrics").body.decode()
        assert second.get("/api/v1/status").json()["unclean_exits"] == 1
    finally:
        assert second.stop() == 0
    assert not (first.state_dir / "running").exists()  # a clean stop leaves no marker
