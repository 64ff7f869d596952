"""This node's own state for gossip: live load from the inference manager, temperature, size fitting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final, Protocol

import psutil

from mongarsd.errors import WireError
from mongarsd.mesh.state import encode_state

TOKENS_EWMA_ALPHA: Final = 0.3
THROTTLE_FALLBACK_C: Final = 80.0


def read_temperature() -> tuple[float | None, bool]:
    """Return (hottest sensor °C, throttled) from psutil when the platform has sensors (blocking; thread)."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None, False
    try:
        sensors = read()
    except (OSError, RuntimeError):  # unreadable sysfs entries on some boards
        return None, False
    hottest: float | None = None
    throttled = False
    for entries in sensors.values():
        for e in entries:
            if e.current is None or not math.isfinite(e.current):
                continue
            hottest = e.current if hottest is None else max(hottest, e.current)
            limit = e.high if e.high else THROTTLE_FALLBACK_C
            throttled = throttled or e.current >= limit
    return hottest, throttled


def fit_state(state: dict[str, Any]) -> dict[str, Any]:
    """Drop available-model ids until the state encodes within the gossip cap (pure)."""
    out = dict(state)
    while True:
        try:
            encode_state(out)
            return out
        except WireError:
            avail = list(out.get("models_available") or [])
            if avail:
                out["models_available"] = avail[:-1]
                continue
            loaded = list(out.get("models_loaded") or [])
            if loaded:
                out["models_loaded"] = loaded[:-1]
                continue
            raise


class _Entry(Protocol):
    @property
    def id(self) -> str: ...


class LoadedView(Protocol):
    """What the mesh reads of one loaded model (inference.manager.LoadedInfo)."""

    @property
    def entry(self) -> _Entry: ...
    @property
    def slots_total(self) -> int: ...
    @property
    def slots_busy(self) -> int: ...
    @property
    def requests_deferred(self) -> int: ...


class LocalInference(Protocol):
    """What the mesh uses of this node's inference (inference.manager.InferenceManager)."""

    def loaded(self) -> Sequence[LoadedView]: ...
    def decode_totals(self) -> tuple[float, float]: ...
    def available_ids(self) -> list[str]: ...


class LocalStats:
    """Live load of this node from the InferenceManager, with a tokens/s EWMA (loop-only)."""

    def __init__(self, llm: LocalInference | None, slots_default: int) -> None:
        self._llm = llm
        self._slots_default = max(1, slots_default)
        self._last: tuple[float, float] | None = None  # (tokens, seconds) totals
        self.tokens_per_s = 0.0
        self.available: list[str] = []

    def sample_rate(self) -> None:
        """Fold the decode rate since the last sample into the EWMA."""
        if self._llm is None:
            return
        totals = self._llm.decode_totals()
        if self._last is not None:
            dt, ds = totals[0] - self._last[0], totals[1] - self._last[1]
            if dt > 0 and ds > 0:
                rate = dt / ds
                self.tokens_per_s = (
                    rate if self.tokens_per_s <= 0 else (1 - TOKENS_EWMA_ALPHA) * self.tokens_per_s + TOKENS_EWMA_ALPHA * rate
                )
        elif totals[0] > 0 and totals[1] > 0:
            self.tokens_per_s = totals[0] / totals[1]
        self._last = totals

    def snapshot(self) -> dict[str, Any]:
        """Return loaded models, slots and queue right now."""
        loaded: list[str] = []
        slots_total = slots_busy = deferred = 0
        if self._llm is not None:
            for info in self._llm.loaded():
                loaded.append(info.entry.id)
                slots_total += int(info.slots_total)
                slots_busy += int(info.slots_busy)
                deferred += int(info.requests_deferred)
        if not loaded:
            slots_total = self._slots_default
        return {
            "models_loaded": loaded,
            "models_available": list(self.available),
            "slots_total": slots_total,
            "slots_free": max(0, slots_total - slots_busy),
            "queue_depth": deferred,
        }
