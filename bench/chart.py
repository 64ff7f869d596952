"""Draw bench results as one bar per check, scaled so that 1.0 is the target line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.common import TARGET_IDS, TARGETS

GREEN = "#2e9e44"
RED = "#d1392b"
GREY = "#b0b0b0"


def chart_rows(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, float | None, bool | None, str]]:
    """Return (label, observed/threshold, met, annotation) per check, in target order (pure)."""
    rows: list[tuple[str, float | None, bool | None, str]] = []
    for pid in TARGET_IDS:
        entry = results.get(pid) or {}
        checks = entry.get("checks") or [{"check": c.text(), "observed": None, "met": None} for c in TARGETS[pid].checks]
        for i, spec in enumerate(TARGETS[pid].checks):
            row = checks[i] if i < len(checks) else {"observed": None, "met": None}
            observed = row.get("observed")
            label = pid if len(TARGETS[pid].checks) == 1 else f"{pid} {spec.field}"
            if entry.get("skipped") or observed is None:
                rows.append((label, None, None, "skipped" if entry.get("skipped") else "n/a"))
                continue
            value, reference = entry.get("value"), entry.get("reference")
            if (
                spec.field == "delta_ms"
                and isinstance(value, int | float)
                and isinstance(reference, int | float)
                and reference + spec.threshold > 0
            ):
                # "<= reference + 10 ms": scale the value by its allowance, so the line is still the target
                allowed = reference + spec.threshold
                rows.append((label, value / allowed, row.get("met"), f"{value:.3g} ms (<= {reference:.3g} + {spec.threshold:g})"))
                continue
            scaled = observed / spec.threshold if spec.threshold else None
            rows.append((label, scaled, row.get("met"), f"{observed:.3g} ({spec.op} {spec.threshold:g})"))
    return rows


def draw(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Write a PNG bar chart (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = chart_rows(results)
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.4))
    labels = [r[0] for r in rows]
    values = [max(r[1], 0.0) if r[1] is not None else 0.0 for r in rows]
    colors = [GREY if r[1] is None else GREEN if r[2] else RED for r in rows]
    ys = range(len(rows))
    ax.barh(list(ys), values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    top = max([*values, 1.0]) * 1.35
    for y, r in zip(ys, rows, strict=True):
        ax.text(max(r[1] or 0.0, 0.0) + top * 0.01, y, r[3], va="center", fontsize=8)
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, top)
    ax.set_xlabel("observed / target threshold (dashed line = target; >= targets pass right of it, <= targets left)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
