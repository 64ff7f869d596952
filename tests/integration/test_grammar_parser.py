"""The grammar bounds hold against llama.cpp's real parser, in a subprocess so a crash cannot take pytest down."""

from __future__ import annotations

import json
import subprocess
import sys

from mongarsd.inference import grammar as g
from tests.conftest import DEFAULT_LLM, requires_models

MODEL = DEFAULT_LLM

pytestmark = requires_models(DEFAULT_LLM)

# Parse each grammar with llama_sampler_init_grammar on a thread with a deliberately small stack
# (a quarter of Linux's default thread stack): the bound must hold with a wide margin.
RUNNER = r"""
import json, sys, threading
import llama_cpp as lib

model_path, stack_kib = sys.argv[1], int(sys.argv[2])
grammars = json.load(sys.stdin)
lib.llama_backend_init()
mp = lib.llama_model_default_params()
mp.vocab_only = True
model = lib.llama_model_load_from_file(model_path.encode(), mp)
vocab = lib.llama_model_get_vocab(model)
results = []

def work():
    for text in grammars:
        s = lib.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        results.append(bool(s))
        if s:
            lib.llama_sampler_free(s)

threading.stack_size(stack_kib * 1024)
t = threading.Thread(target=work)
t.start()
t.join()
lib.llama_model_free(model)
print(json.dumps(results))
"""

STACK_KIB = 2048  # Linux threads get 8 MiB by default


def parse_in_subprocess(grammars: list[str]) -> list[bool]:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(MODEL), str(STACK_KIB)],
        input=json.dumps(grammars),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"parser subprocess died with {proc.returncode}: {proc.stderr[-2000:]}"
    results: list[bool] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def test_grammars_at_every_bound_parse_in_the_real_parser() -> None:
    n = g.MAX_GRAMMAR_NESTING
    at_nesting = "root ::= " + '("a" ' * n + ")?" * n
    schemas = [
        {"type": "string", "maxLength": 100000},  # the segfault, now unbounded
        {"type": "array", "items": {"type": "integer"}, "maxItems": 1000000},  # the other one
        {"type": "string", "maxLength": g.MAX_REPETITION},  # the deepest a schema can nest
        {"type": "array", "items": {"type": "string", "maxLength": g.MAX_REPETITION}, "maxItems": g.MAX_REPETITION},
        {"type": "object", "properties": {"a": {"type": "string", "minLength": g.MAX_REPETITION}}},
    ]
    texts = [g.schema_to_gbnf(s) for s in schemas]
    for text in [at_nesting, *texts]:
        g.check_grammar(text, param="x")
    # every schema at the bounds parses; the deepest nesting allowed does not crash the parser
    # (llama.cpp may refuse it by its own rule-count threshold: that is a clean NULL, not a crash)
    results = parse_in_subprocess([*texts, at_nesting])
    assert results[: len(texts)] == [True] * len(texts)
    assert len(results) == len(texts) + 1


def test_a_grammar_the_parser_refuses_is_reported_not_crashed() -> None:
    # llama.cpp's own repetition threshold: the parser refuses it and returns NULL
    assert parse_in_subprocess(['root ::= "a"{0,1000} "b"{0,1000} ("c"{0,1000}){0,1000}']) == [False]
