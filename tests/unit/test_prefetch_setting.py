"""`apply_prefetch`: the first model loaded sets llama.cpp's prefetch distance for the process."""

from __future__ import annotations

import pytest

from mongarsd.inference import context
from mongarsd.inference.settings import PREFETCH_ENV


def test_first_distance_wins_and_later_ones_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "_prefetch_in_effect", None)
    monkeypatch.setenv(PREFETCH_ENV, "123")  # the configuration overrides what the environment had
    assert context.apply_prefetch(2048) == 2048
    assert context.os.environ[PREFETCH_ENV] == "2048"
    # ggml has read it by now: another distance cannot take effect, the one in effect is returned
    assert context.apply_prefetch(0) == 2048
    assert context.os.environ[PREFETCH_ENV] == "2048"
    assert context.apply_prefetch(2048) == 2048
