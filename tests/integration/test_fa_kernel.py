"""The daemon's own llama.cpp runs mongarsd's flash-attention decode kernel correctly.

native/checks/fa_decode.cpp is compiled against the headers and shared ggml libraries of the
llama-cpp-python installed in this venv (the wheel scripts/llama-wheel.sh built with
native/patches applied) and run: single-token flash attention over 1 to 2048 KV cells, F16,
F32 and Q8_0 caches, masks, ALiBi and soft-cap, one and two threads, against a double-precision
reference. native/build.sh runs the same check against llama.cpp's own tools' build.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import llama_cpp
import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "native" / "checks" / "fa_decode.cpp"


def test_flash_attention_decode_matches_reference(tmp_path: Path) -> None:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build native/checks/fa_decode.cpp")
    lib = Path(llama_cpp.__file__).parent / "lib"
    include = Path(llama_cpp.__file__).parents[1] / "include"
    assert (include / "ggml-cpu.h").is_file(), f"llama-cpp-python installed no ggml headers under {include}"
    exe = tmp_path / "fa_decode"
    build = subprocess.run(
        [
            compiler,
            "-O2",
            "-std=c++17",
            f"-I{include}",
            str(CHECK),
            f"-L{lib}",
            f"-Wl,-rpath,{lib}",
            "-lggml",
            "-lggml-cpu",
            "-lggml-base",
            "-lm",
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    cases = [line for line in run.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(cases) == 51 and all(line.startswith("ok") for line in cases), run.stdout
    assert "all flash-attention decode cases within tolerance" in run.stdout
