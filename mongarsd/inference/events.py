"""What an engine reports: streamed token events, per-request timings, counters."""

from __future__ import annotations

from dataclasses import dataclass

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Timings:
    """Per-request timings in milliseconds (llama-server's `timings` block)."""

    prompt_ms: float
    predicted_ms: float
    prompt_n: int
    predicted_n: int

    @property
    def prompt_per_second(self) -> float:
        return self.prompt_n * 1000.0 / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_second(self) -> float:
        return self.predicted_n * 1000.0 / self.predicted_ms if self.predicted_ms > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One streamed piece of text; the last event of a request has `finish_reason` set.

    `text` is never a partial UTF-8 character nor part of a stop sequence. On the final
    event `token` is -1, `text` holds any text released at the end, and the counters are
    filled in: `prompt_tokens` (whole prompt), `cached_tokens` (reused from the prefix
    cache, not decoded), `completion_tokens`, `timings`.
    """

    text: str
    token: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timings: Timings | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters since start, named after llama-server's /metrics (see `metrics()`)."""

    slots_total: int
    slots_busy: int
    requests_processing: int
    requests_deferred: int
    requests_total: int
    requests_rejected: int
    prompt_tokens_total: int
    prompt_seconds_total: float
    tokens_predicted_total: int
    tokens_predicted_seconds_total: float
    cached_tokens_total: int
    n_decode_total: int
    n_busy_slots_total: int
    kv_cache_tokens: int
    kv_cache_cells: int
    kv_evictions_total: int = 0  # idle slots' cached prefixes dropped to make room in a shared pool
    prompt_cache_bytes: int = 0  # idle conversations' cells held in host memory (prompt_cache)
    prompt_cache_entries: int = 0
    prompt_cache_saves_total: int = 0
    prompt_cache_restores_total: int = 0

    @property
    def slots_idle(self) -> int:
        return self.slots_total - self.slots_busy

    @property
    def kv_cache_usage_ratio(self) -> float:
        return self.kv_cache_tokens / self.kv_cache_cells if self.kv_cache_cells else 0.0

    def metrics(self) -> dict[str, float]:
        """Return the values under llama-server's metric names."""
        per_decode = self.n_busy_slots_total / self.n_decode_total if self.n_decode_total else 0.0
        return {
            "llamacpp:prompt_tokens_total": float(self.prompt_tokens_total),
            "llamacpp:prompt_seconds_total": self.prompt_seconds_total,
            "llamacpp:tokens_predicted_total": float(self.tokens_predicted_total),
            "llamacpp:tokens_predicted_seconds_total": self.tokens_predicted_seconds_total,
            "llamacpp:n_decode_total": float(self.n_decode_total),
            "llamacpp:n_busy_slots_per_decode": per_decode,
            "llamacpp:prompt_tokens_seconds": (self.prompt_tokens_total / self.prompt_seconds_total if self.prompt_seconds_total else 0.0),
            "llamacpp:predicted_tokens_seconds": (
                self.tokens_predicted_total / self.tokens_predicted_seconds_total if self.tokens_predicted_seconds_total else 0.0
            ),
            "llamacpp:kv_cache_usage_ratio": self.kv_cache_usage_ratio,
            "llamacpp:kv_cache_tokens": float(self.kv_cache_tokens),
            "llamacpp:requests_processing": float(self.requests_processing),
            "llamacpp:requests_deferred": float(self.requests_deferred),
        }
