"""P6's figures from recorded per-rep rates: medians of per-rep ratios, not ratios of medians."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import embed
from bench.common import BenchSettings


def _settings(models_dir: Path) -> BenchSettings:
    return BenchSettings(models_dir=models_dir, model_path=models_dir / "m.gguf", model_id="m", threads=2, embed_threads=2, profile="i7")


def _model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / embed.MODEL_DIR_NAME
    model_dir.mkdir()
    for name in (*embed.FILES.values(), "tokenizer.json"):
        (model_dir / name).write_bytes(b"")
    return model_dir


def _run_p6(rates: dict[str, dict[str, list[float]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run bench.embed.run on recorded rates (the measuring loop replaced), return the P6 entry."""

    async def recorded(model_dir: Path, threads: int) -> dict[str, dict[str, list[float]]]:
        return rates

    monkeypatch.setattr(embed, "async_measure", recorded)
    monkeypatch.setattr(embed, "gemm_int8_speedup", lambda threads: None)
    _model_dir(tmp_path)
    results: dict[str, Any] = {}
    embed.run(results, settings=_settings(tmp_path), log=lambda _: None)
    return dict(results["P6"])


def test_p6_ratios_are_medians_of_per_rep_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rep 1 is slow for both variants (the machine's slow start), rep 3's fp32 pass is quick:
    # per rep int8/fp32 is 1.5, 1.5, 1.667, a median of 1.5; the medians' ratio is 150/96 = 1.5625.
    i8e, f32e = [60.0, 150.0, 160.0], [40.0, 100.0, 96.0]
    rates = {
        "int8": {"embedder": i8e, "bare": [60.0 / 1.05, 150.0 / 1.05, 160.0 / 1.05]},
        "fp32": {"embedder": f32e, "bare": [40.0 / 0.9, 100.0 / 0.9, 96.0 / 0.9]},
    }

    entry = _run_p6(rates, tmp_path, monkeypatch)
    assert entry["ratio"] == pytest.approx(1.05, abs=1e-4)
    assert entry["int8_speedup"] == pytest.approx(1.5, abs=1e-4)
    assert entry["details"]["int8_speedup_per_rep"]["samples"] == [1.5, 1.5, 1.667]
    assert entry["details"]["fp32_ratio"] == pytest.approx(0.9, abs=1e-4)
    assert entry["details"]["bare_int8_speedup"] == pytest.approx(1.5 * 0.9 / 1.05, abs=1e-4)
    assert entry["value"] == pytest.approx(150.0)


def test_p6_skips_a_rep_whose_reference_is_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rates = {
        "int8": {"embedder": [100.0, 100.0, 100.0], "bare": [0.0, 50.0, 100.0]},
        "fp32": {"embedder": [50.0, 50.0, 50.0], "bare": [50.0, 50.0, 50.0]},
    }

    entry = _run_p6(rates, tmp_path, monkeypatch)
    assert entry["ratio"] == pytest.approx(1.5)  # median of 2.0 and 1.0
    assert entry["details"]["int8_ratio_per_rep"]["n"] == 2


def test_p6_skips_without_the_model_files(tmp_path: Path) -> None:
    results: dict[str, Any] = {}
    embed.run(results, settings=_settings(tmp_path), log=lambda _: None)
    assert "missing" in results["P6"]["skipped"]
