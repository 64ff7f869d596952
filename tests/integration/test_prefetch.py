"""The daemon's llama.cpp runs mongarsd's two opt-in decode patches, and they change no number.

native/patches/*/0002 makes ggml's matrix-vector product ask for the weight rows
GGML_MUL_MAT_PREFETCH bytes ahead; 0003 makes the x86 Q4_1 and Q8_0 dot products convert their
fp16 block scales with F16C when GGML_CPU_F16C_SCALES is set. ggml reads each variable once per
process; LlamaContext sets both before the first decode (the prefetch from the engine settings,
the F16C loops on unless the environment says otherwise). Each case runs in its own process, with
a getenv shim preloaded that records which of them ggml asked for: the patched paths really run,
and neither changes a token or a bit of the logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from mongarsd.config import InferenceConfig
from mongarsd.inference.settings import F16C_SCALES_ENV, PREFETCH_ENV, EngineSettings
from tests.conftest import DEFAULT_LLM, requires_models

pytestmark = requires_models(DEFAULT_LLM)

REPO = Path(__file__).resolve().parents[2]

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
char *getenv(const char *name) {
    static char *(*real)(const char *);
    if (!real) real = (char *(*)(const char *)) dlsym(RTLD_NEXT, "getenv");
    if (name && (strcmp(name, "GGML_MUL_MAT_PREFETCH") == 0 || strcmp(name, "GGML_CPU_F16C_SCALES") == 0)) {
        const char *log = real("PREFETCH_TEST_LOG");
        FILE *f = log ? fopen(log, "a") : NULL;
        if (f) { fprintf(f, "%s\n", name); fclose(f); }
    }
    return real(name);
}
"""

# greedy decoding of the real model; prints the tokens, the last logits and what was in effect
CHILD = r"""
import hashlib, json, os, sys
from pathlib import Path
from mongarsd.inference.context import LlamaContext
from mongarsd.inference.settings import EngineSettings
nbytes = int(sys.argv[2])
ctx = LlamaContext(model_path=Path(sys.argv[1]), model_id="t",
                   settings=EngineSettings(n_ctx=256, slots=1, threads=2, threads_batch=2, n_batch=64, n_ubatch=64, prefetch_bytes=nbytes))
ctx.load()
toks = ctx.tokenize("The capital of France is")
ctx.decode_sequence(toks, 0)
out = []
pos = len(toks)
for _ in range(12):
    tok = int(ctx.logits(-1).argmax())
    out.append(tok)
    ctx.decode_sequence([tok], pos)
    pos += 1
digest = hashlib.sha256(ctx.logits(-1).tobytes()).hexdigest()
print(json.dumps({"tokens": out, "logits": digest, "in_effect": ctx.prefetch_bytes, "env": os.environ.get("GGML_MUL_MAT_PREFETCH"),
                  "f16c": ctx.f16c_scales, "f16c_env": os.environ.get("GGML_CPU_F16C_SCALES")}))
ctx.free()
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler for the getenv shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM)
    so = d / "shim.so"
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", str(so), str(d / "shim.c"), "-ldl"], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    return so


def decode(shim: Path, tmp_path: Path, nbytes: int, f16c: str | None = None) -> tuple[dict[str, object], list[str]]:
    """Decode in a child process; `f16c` is GGML_CPU_F16C_SCALES in its environment (None: unset)."""
    log = tmp_path / f"getenv-{nbytes}-{f16c}.log"
    env = {k: v for k, v in os.environ.items() if k not in (PREFETCH_ENV, F16C_SCALES_ENV)}
    env.update({"LD_PRELOAD": str(shim), "PREFETCH_TEST_LOG": str(log), "PYTHONPATH": str(REPO)})
    if f16c is not None:
        env[F16C_SCALES_ENV] = f16c
    run = subprocess.run([sys.executable, "-c", CHILD, str(DEFAULT_LLM), str(nbytes)], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result, log.read_text().split() if log.exists() else []


def test_the_installed_ggml_reads_the_prefetch_distance() -> None:
    lib = Path(llama_cpp.__file__).parent / "lib"
    cpu = sorted(lib.glob("libggml-cpu.so*"))
    assert cpu, f"no libggml-cpu in {lib}"
    assert b"GGML_MUL_MAT_PREFETCH" in cpu[0].read_bytes(), "llama-cpp-python was built without native/patches 0002"


def test_decoding_with_and_without_prefetch_gives_the_same_numbers(shim: Path, tmp_path: Path) -> None:
    on, asked_on = decode(shim, tmp_path, 4096)
    off, asked_off = decode(shim, tmp_path, 0)
    # the patched product ran and looked the distance up in both: once, or once per compute
    # thread when both reach their first product together (the cached value is a relaxed atomic)
    assert 1 <= asked_on.count(PREFETCH_ENV) <= 2
    assert 1 <= asked_off.count(PREFETCH_ENV) <= 2
    assert on["env"] == "4096" and on["in_effect"] == 4096
    assert off["env"] == "0" and off["in_effect"] == 0
    assert len(on["tokens"]) == 12  # type: ignore[arg-type]
    # a prefetch moves no data into the computation: same tokens, bit-identical logits
    assert on["tokens"] == off["tokens"]
    assert on["logits"] == off["logits"]


def test_the_default_is_on_and_bad_distances_are_refused() -> None:
    assert InferenceConfig().prefetch_bytes == 4096 == EngineSettings().prefetch_bytes
    with pytest.raises(Exception, match="prefetch_bytes must be between 0 and 1048576"):
        EngineSettings(prefetch_bytes=-1)
    with pytest.raises(Exception, match="prefetch_bytes must be between 0 and 1048576"):
        EngineSettings(prefetch_bytes=(1 << 20) + 1)


def x86_f16c() -> bool:
    """Whether this CPU runs 0003's loops: an x86 build of ggml with AVX2 and F16C."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return "avx2" in flags and "f16c" in flags


def test_the_installed_ggml_has_the_f16c_scale_loops() -> None:
    if not x86_f16c():
        pytest.skip("0003 is for x86 CPUs with AVX2 and F16C")
    lib = Path(llama_cpp.__file__).parent / "lib"
    cpu = sorted(lib.glob("libggml-cpu.so*"))
    assert cpu, f"no libggml-cpu in {lib}"
    assert b"GGML_CPU_F16C_SCALES" in cpu[0].read_bytes(), "llama-cpp-python was built without native/patches 0003"


def test_f16c_scales_are_on_by_default_and_give_the_same_numbers(shim: Path, tmp_path: Path) -> None:
    if not x86_f16c():
        pytest.skip("0003 is for x86 CPUs with AVX2 and F16C")
    on, asked_on = decode(shim, tmp_path, 0)  # unset: the daemon turns the loops on
    off, asked_off = decode(shim, tmp_path, 0, f16c="0")  # an operator's 0 is kept: released loops
    assert on["f16c_env"] == "1" and on["f16c"] is True
    assert off["f16c_env"] == "0" and off["f16c"] is False
    # the Q4_1 and Q8_0 products asked (once, or once per thread reaching its first product together)
    assert 1 <= asked_on.count(F16C_SCALES_ENV) <= 2
    assert 1 <= asked_off.count(F16C_SCALES_ENV) <= 2
    assert len(on["tokens"]) == 12  # type: ignore[arg-type]
    # the same products in the same order: same tokens, bit-identical logits
    assert on["tokens"] == off["tokens"]
    assert on["logits"] == off["logits"]
