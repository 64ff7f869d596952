"""`apply_prefetch`: the first model loaded sets llama.cpp's prefetch distance (and F16C scales) for the process."""

from __future__ import annotations

import pytest

from mongarsd.inference import context
from mongarsd.inference.settings import F16C_SCALES_ENV, PREFETCH_ENV


def test_first_distance_wins_and_later_ones_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "_prefetch_in_effect", None)
    monkeypatch.setenv(PREFETCH_ENV, "123")  # the configuration overrides what the environment had
    assert context.apply_prefetch(2048) == 2048
    assert context.os.environ[PREFETCH_ENV] == "2048"
    # ggml has read it by now: another distance cannot take effect, the one in effect is returned
    assert context.apply_prefetch(0) == 2048
    assert context.os.environ[PREFETCH_ENV] == "2048"
    assert context.apply_prefetch(2048) == 2048


def test_f16c_scales_are_turned_on_unless_the_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "_prefetch_in_effect", None)
    monkeypatch.delenv(F16C_SCALES_ENV, raising=False)
    context.apply_prefetch(0)
    assert context.os.environ[F16C_SCALES_ENV] == "1"
    assert context.f16c_scales_requested()
    monkeypatch.setattr(context, "_prefetch_in_effect", None)
    monkeypatch.setenv(F16C_SCALES_ENV, "0")  # an operator's choice is kept
    context.apply_prefetch(0)
    assert context.os.environ[F16C_SCALES_ENV] == "0"
    assert not context.f16c_scales_requested()


@pytest.mark.parametrize(
    ("value", "on"), [("1", True), (" 2", True), ("1x", True), ("0", False), ("-1", False), ("", False), ("yes", False)]
)
def test_f16c_scales_requested_reads_the_value_as_ggml_does(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv(F16C_SCALES_ENV, value)  # ggml: atoi(value) > 0
    assert context.f16c_scales_requested() is on
