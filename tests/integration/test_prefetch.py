"""The daemon's llama.cpp prefetches weight rows while decoding, as `inference.prefetch_bytes` says.

native/patches/*/0002 makes ggml's matrix-vector product ask for the weight rows
GGML_MUL_MAT_PREFETCH bytes ahead (read once per process); LlamaContext sets that variable from
the engine settings before the first decode. Each case runs in its own process, with a getenv
shim preloaded that records whether ggml asked for the variable: the patched path really runs,
and the prefetch changes no number llama.cpp computes.
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
from mongarsd.inference.settings import PREFETCH_ENV, EngineSettings
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
    if (name && strcmp(name, "GGML_MUL_MAT_PREFETCH") == 0) {
        const char *log = real("PREFETCH_TEST_LOG");
        FILE *f = log ? fopen(log, "a") : NULL;
        if (f) { fputs("asked\n", f); fclose(f); }
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
print(json.dumps({"tokens": out, "logits": digest, "in_effect": ctx.prefetch_bytes, "env": os.environ.get("GGML_MUL_MAT_PREFETCH")}))
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


def decode(shim: Path, tmp_path: Path, nbytes: int) -> tuple[dict[str, object], list[str]]:
    log = tmp_path / f"getenv-{nbytes}.log"
    env = {k: v for k, v in os.environ.items() if k != PREFETCH_ENV}
    env.update({"LD_PRELOAD": str(shim), "PREFETCH_TEST_LOG": str(log), "PYTHONPATH": str(REPO)})
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
    assert asked_on and set(asked_on) == {"asked"} and len(asked_on) <= 2
    assert asked_off and set(asked_off) == {"asked"} and len(asked_off) <= 2
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
