"""Where the real default model's weights live: `inference.use_mmap` and `use_mlock` reach llama.cpp.

llama.cpp replaced its `use_mmap`/`use_mlock` model parameters with `load_mode`; setting the old
names on the ctypes struct was accepted silently and changed nothing. These tests load the real
model through `LlamaContext` and look at this process's own mappings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mongarsd.config import InferenceConfig
from mongarsd.errors import InferenceError
from mongarsd.inference.context import LlamaContext, _set_field, load_mode
from mongarsd.inference.hugepages import thp_mode
from mongarsd.inference.settings import EngineSettings
from tests.conftest import DEFAULT_LLM, requires_models

pytestmark = requires_models(DEFAULT_LLM)


def gguf_mappings(path: Path) -> int:
    name = str(path.resolve())
    return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(name))


def load(use_mmap: bool) -> LlamaContext:
    ctx = LlamaContext(
        model_path=DEFAULT_LLM,
        model_id="t",
        settings=EngineSettings(n_ctx=256, slots=1, threads=2, threads_batch=2, n_batch=64, n_ubatch=64, use_mmap=use_mmap),
    )
    ctx.load()
    return ctx


def test_use_mmap_maps_the_file_and_its_default_off_reads_it_into_memory() -> None:
    assert InferenceConfig().use_mmap is False
    assert EngineSettings().use_mmap is False
    base = gguf_mappings(DEFAULT_LLM)

    mapped = load(use_mmap=True)
    try:
        assert mapped.weights == "mmap"
        assert gguf_mappings(DEFAULT_LLM) > base
        assert mapped.weights_huge_mb == 0
    finally:
        mapped.free()
    assert gguf_mappings(DEFAULT_LLM) == base

    own = load(use_mmap=False)
    try:
        assert own.weights == "memory"
        assert gguf_mappings(DEFAULT_LLM) == base  # read into the process, not mapped
        own.decode_sequence(own.tokenize("Hello"), 0)  # and the weights work
        assert own.logits(-1).shape == (own.n_vocab,)
        file_mb = DEFAULT_LLM.stat().st_size / 2**20
        if thp_mode() in ("always", "madvise"):
            # the weights were faulted in on 2 MB pages as they were read
            assert own.weights_huge_mb >= file_mb / 2, (own.weights_huge_mb, file_mb)
    finally:
        own.free()


def test_load_modes_follow_the_two_settings() -> None:
    import llama_cpp

    lib = llama_cpp
    assert load_mode(lib, use_mmap=True, use_mlock=False) == lib.LLAMA_LOAD_MODE_MMAP
    assert load_mode(lib, use_mmap=True, use_mlock=True) == lib.LLAMA_LOAD_MODE_MMAP_MLOCK
    assert load_mode(lib, use_mmap=False, use_mlock=False) == lib.LLAMA_LOAD_MODE_NONE
    assert load_mode(lib, use_mmap=False, use_mlock=True) == lib.LLAMA_LOAD_MODE_MLOCK


def test_a_parameter_llama_cpp_does_not_have_is_refused_not_ignored() -> None:
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    with pytest.raises(InferenceError, match="no parameter 'use_mmap'"):
        _set_field(params, "use_mmap", False)
    _set_field(params, "load_mode", llama_cpp.LLAMA_LOAD_MODE_NONE)
    assert params.load_mode == llama_cpp.LLAMA_LOAD_MODE_NONE
